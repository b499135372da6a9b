//! Children: starting them by re-executing vmd, and dropping their
//! privileges.
//!
//! The parent opens /proc/self/exe once at startup; each child is a fork
//! that execs that fd (execveat) with `-P ROLE`, its end of a socketpair to
//! the parent on fd 3 ([`CHILD_FD`]). Every child starts from a fresh
//! address space and then calls [`drop_privileges`], which does the drop
//! in the one order that works (each step is impossible after the next).

use crate::exec::{self, ExecPlan, ExecProgram};
use crate::log::{self, log_debug, log_warn};
use crate::seccomp;
use common::imsg::{self, Channel, Frame, Message, Role};
use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::sys::wait::WaitStatus;
use nix::unistd::{Gid, Pid, Uid};
use seccompiler::BpfProgram;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use thiserror::Error;

/// The descriptor on which a child finds its socket to the parent.
pub const CHILD_FD: RawFd = 3;
/// The user control and switch run as.
pub const VMD_USER: &str = "_vmd";
/// The empty, root-owned directory control and switch are chrooted into.
pub const EMPTY_DIR: &str = "/var/lib/vmd/empty";

static SELF_EXE: OnceLock<OwnedFd> = OnceLock::new();

#[derive(Debug, Error)]
pub enum ProcError {
    #[error("cannot open /proc/self/exe: {0}")]
    SelfExe(Errno),
    #[error("cannot start a child: /proc/self/exe was not opened at startup")]
    NoSelfExe,
    #[error("cannot create a socketpair for {role}: {err}")]
    Socketpair { role: String, err: Errno },
    #[error("cannot fork {role}: {err}")]
    Fork { role: String, err: Errno },
    #[error("user {0} does not exist")]
    NoUser(String),
    #[error("cannot look up user {user}: {err}")]
    UserLookup { user: String, err: Errno },
    #[error("{step}: {err}")]
    Step { step: String, err: Errno },
    #[error("{path}: {why}")]
    Root { path: PathBuf, why: String },
    #[error("parent process went away while the child started")]
    ParentGone,
    #[error("cannot clear the inheritable capability set: {0}")]
    Caps(String),
    #[error("capability set {0} is not empty after the drop")]
    CapsLeft(&'static str),
    #[error("cannot install the seccomp filter: {0}")]
    Filter(String),
}

fn step(step: &str) -> impl FnOnce(Errno) -> ProcError + '_ {
    move |err| ProcError::Step {
        step: step.to_string(),
        err,
    }
}

/// Opens our own binary for later re-execution (call once, at startup,
/// before anything could replace the file).
pub fn open_self_exe() -> Result<(), ProcError> {
    let fd = nix::fcntl::open(
        "/proc/self/exe",
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(ProcError::SelfExe)?;
    // SAFETY: open just returned this descriptor; nothing else owns it.
    let opened = unsafe { OwnedFd::from_raw_fd(fd) };
    // Keep it clear of CHILD_FD, which a forked child overwrites before
    // it execs this fd.
    let moved = nix::fcntl::fcntl(
        opened.as_raw_fd(),
        nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10),
    )
    .map_err(ProcError::SelfExe)?;
    // SAFETY: fcntl just returned this new descriptor; nothing else owns it.
    let _ = SELF_EXE.set(unsafe { OwnedFd::from_raw_fd(moved) });
    Ok(())
}

/// Starts `vmd ARGS...` as a child, with its end of a new socketpair on
/// CHILD_FD. Returns its pid and our end. Call from the main thread: a
/// child's PR_SET_PDEATHSIG follows the thread that forked it.
pub fn spawn(role: &str, args: &[String]) -> Result<(Pid, OwnedFd), ProcError> {
    let exe = SELF_EXE.get().ok_or(ProcError::NoSelfExe)?;
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|err| ProcError::Socketpair {
        role: role.to_string(),
        err,
    })?;
    // Everything the child needs is built before fork: after it, only
    // raw system calls (exec.rs).
    let mut argv: Vec<CString> = vec![CString::from(c"vmd")];
    argv.extend(args.iter().filter_map(|a| CString::new(a.as_str()).ok()));
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    let plan = ExecPlan {
        program: ExecProgram::Fd(exe.as_raw_fd()),
        argv: &argv_ptrs,
        envp: &envp,
        fail_prefix: b"vmd: ",
        name: b"/proc/self/exe",
        // The parent blocks the signals it reads from a signalfd.
        clear_signal_mask: true,
        new_session: false,
        stdio: None,
        pass: &[(theirs.as_raw_fd(), CHILD_FD)],
        close_from: Some(CHILD_FD + 1),
        namespaces: 0,
        root: &[],
        identity: None,
        die_with: None,
        no_new_privs: false,
    };
    match exec::fork_exec(&plan) {
        Err(err) => Err(ProcError::Fork {
            role: role.to_string(),
            err,
        }),
        Ok(child) => {
            drop(theirs);
            Ok((child, ours))
        }
    }
}

/// How a child ended, for the log: "exited with status 1", "was killed
/// by SIGKILL".
pub fn describe_exit(status: WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, 0) => "exited".to_string(),
        WaitStatus::Exited(_, code) => format!("exited with status {code}"),
        WaitStatus::Signaled(_, Signal::SIGSYS, _) => {
            "was killed by a refused system call (SIGSYS)".to_string()
        }
        WaitStatus::Signaled(_, sig, _) => format!("was killed by {}", sig.as_str()),
        other => format!("ended ({other:?})"),
    }
}

/// Whom a child becomes.
pub struct Identity {
    pub uid: Uid,
    pub gid: Gid,
    pub groups: Vec<Gid>,
}

impl Identity {
    /// The identity of `name` with its groups from the group database.
    /// Look it up before the chroot: afterwards there is no /etc/passwd.
    pub fn of_user(name: &str) -> Result<Identity, ProcError> {
        let user = nix::unistd::User::from_name(name)
            .map_err(|err| ProcError::UserLookup {
                user: name.to_string(),
                err,
            })?
            .ok_or_else(|| ProcError::NoUser(name.to_string()))?;
        let cname = CString::new(name).map_err(|_| ProcError::NoUser(name.to_string()))?;
        let groups =
            nix::unistd::getgrouplist(&cname, user.gid).map_err(|err| ProcError::UserLookup {
                user: name.to_string(),
                err,
            })?;
        Ok(Identity {
            uid: user.uid,
            gid: user.gid,
            groups,
        })
    }
}

/// Drops everything, in this order (each step is impossible after the
/// next): clear the capability bounding, ambient and inheritable sets;
/// chroot into `root` and chdir there; setgroups, setresgid, setresuid;
/// PR_SET_PDEATHSIG(SIGKILL) (the uid change reset it) and stop if the
/// parent is no longer `parent`; check every capability set is empty;
/// no_new_privs; the seccomp `filter` (the SIGSYS handler reporting to
/// `report_fd` goes in just before it).
pub fn drop_privileges(
    id: &Identity,
    root: &Path,
    parent: Pid,
    filter: &BpfProgram,
    report_fd: RawFd,
) -> Result<(), ProcError> {
    // 1. While root: no capability can ever come back through exec or a
    //    uid change.
    clear_capability_inheritance()?;

    // 2. Still root (CAP_SYS_CHROOT): an empty directory only root can write.
    check_empty_root(root)?;
    nix::unistd::chroot(root).map_err(step("chroot"))?;
    nix::unistd::chdir("/").map_err(step("chdir /"))?;

    // 3. and 4. The identity, tied to the parent's life.
    take_identity(id, parent)?;

    // 5. No privilege through exec ever again (also what seccomp requires
    //    of an unprivileged process).
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(step("PR_SET_NO_NEW_PRIVS")(Errno::last()));
    }

    // 6. The filter, last: nothing above needs to be allowed by it.
    seccomp::install_sigsys_handler(report_fd).map_err(|e| ProcError::Filter(e.to_string()))?;
    seccompiler::apply_filter(filter).map_err(|e| ProcError::Filter(e.to_string()))?;
    Ok(())
}

/// Becomes `id` entirely (after [`clear_capability_inheritance`]):
/// setgroups, setresgid, then setresuid (last, as it takes CAP_SETGID
/// away, and with it the permitted and effective capabilities);
/// PR_SET_PDEATHSIG(SIGKILL) (the id change reset it) and stop if the
/// parent is no longer `parent`; check every capability set is empty.
/// The children and the users'-files helper (userfiles.rs) share it.
pub fn take_identity(id: &Identity, parent: Pid) -> Result<(), ProcError> {
    nix::unistd::setgroups(&id.groups).map_err(step("setgroups"))?;
    nix::unistd::setresgid(id.gid, id.gid, id.gid).map_err(step("setresgid"))?;
    nix::unistd::setresuid(id.uid, id.uid, id.uid).map_err(step("setresuid"))?;
    // Die with the parent. If it already died, our parent is now init
    // and the signal will never come.
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
        return Err(step("PR_SET_PDEATHSIG")(Errno::last()));
    }
    if nix::unistd::getppid() != parent {
        return Err(ProcError::ParentGone);
    }
    check_no_capabilities()
}

/// Clears the capability bounding, ambient and inheritable sets (needs
/// CAP_SETPCAP): no process started from here on can gain a capability
/// through exec. The VM process does this before it starts QEMU.
pub fn clear_capability_inheritance() -> Result<(), ProcError> {
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments. EINVAL past the last cap.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if rc != 0 && Errno::last() != Errno::EINVAL {
            return Err(step("clearing the capability bounding set")(Errno::last()));
        }
    }
    // SAFETY: prctl with integer arguments.
    if unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    } != 0
    {
        return Err(step("clearing the ambient capability set")(Errno::last()));
    }
    caps::clear(None, caps::CapSet::Inheritable).map_err(|e| ProcError::Caps(e.to_string()))?;

    Ok(())
}

/// Creates `root` if missing and refuses one that is not empty or that
/// others could fill.
fn check_empty_root(root: &Path) -> Result<(), ProcError> {
    let fail = |why: String| ProcError::Root {
        path: root.to_path_buf(),
        why,
    };
    if !root.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(root)
            .map_err(|e| fail(format!("cannot create: {e}")))?;
    }
    let meta = std::fs::symlink_metadata(root).map_err(|e| fail(e.to_string()))?;
    if !meta.is_dir() {
        return Err(fail("not a directory".into()));
    }
    if meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        return Err(fail(
            "must be owned by root and writable by root only".into(),
        ));
    }
    let mut entries = std::fs::read_dir(root).map_err(|e| fail(e.to_string()))?;
    if entries.next().is_some() {
        return Err(fail("must be empty".into()));
    }
    Ok(())
}

/// Every capability set must be empty now.
fn check_no_capabilities() -> Result<(), ProcError> {
    for (set, name) in [
        (caps::CapSet::Inheritable, "inheritable"),
        (caps::CapSet::Permitted, "permitted"),
        (caps::CapSet::Effective, "effective"),
    ] {
        if !caps::read(None, set)
            .map_err(|_| ProcError::CapsLeft(name))?
            .is_empty()
        {
            return Err(ProcError::CapsLeft(name));
        }
    }
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments; 1 means "in the set".
        if unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) } == 1 {
            return Err(ProcError::CapsLeft("bounding"));
        }
        // SAFETY: as above.
        if unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_IS_SET, cap, 0, 0) } == 1
        {
            return Err(ProcError::CapsLeft("ambient"));
        }
    }
    Ok(())
}

/// Sets the process title to `title` ("vmd: control"): the name in
/// /proc/PID/comm and the command line `ps -o args` shows. Call early,
/// before the drop (the first way needs CAP_SYS_RESOURCE).
pub fn set_title(title: &str) {
    let Ok(ctitle) = CString::new(title) else {
        return;
    };
    // SAFETY: PR_SET_NAME copies at most 16 bytes from a NUL-terminated string.
    unsafe { libc::prctl(libc::PR_SET_NAME, ctitle.as_ptr(), 0, 0, 0) };
    if !set_title_by_prctl(ctitle.as_bytes_with_nul()) {
        set_title_in_place(ctitle.as_bytes());
    }
}

/// Points the kernel's command line (arg_start..arg_end) at a copy of
/// the title that lives as long as the process (leaked on purpose, once).
fn set_title_by_prctl(title: &[u8]) -> bool {
    let bytes: &'static [u8] = Box::leak(title.to_vec().into_boxed_slice());
    let start = bytes.as_ptr() as libc::c_ulong;
    let end = start + bytes.len() as libc::c_ulong;
    let set = |what: libc::c_int, addr: libc::c_ulong| {
        // SAFETY: prctl records the address; the memory stays valid.
        unsafe { libc::prctl(libc::PR_SET_MM, what, addr, 0, 0) == 0 }
    };
    // The kernel wants start <= end after each call, and the new block
    // may lie above or below the old one.
    (set(libc::PR_SET_MM_ARG_START, start) && set(libc::PR_SET_MM_ARG_END, end))
        || (set(libc::PR_SET_MM_ARG_END, end) && set(libc::PR_SET_MM_ARG_START, start))
}

/// Without CAP_SYS_RESOURCE: overwrite the original argument strings (and,
/// if the title is longer, the environment strings right after them,
/// once their contents are copied to the heap), as setproctitle(3) does.
fn set_title_in_place(title: &[u8]) {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    // Fields 48 to 51 (arg_start, arg_end, env_start, env_end) counted
    // after the command name, which may itself hold spaces.
    let Some(after_name) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return;
    };
    let fields: Vec<usize> = after_name
        .split_whitespace()
        .skip(45)
        .take(4)
        .filter_map(|f| f.parse().ok())
        .collect();
    let [arg_start, arg_end, env_start, env_end] = fields[..] else {
        return;
    };
    let mut end = arg_end;
    if title.len() + 1 > arg_end - arg_start && env_start == arg_end && env_end > env_start {
        // Give each variable a heap copy so the strings can be reused.
        for (key, value) in std::env::vars_os() {
            std::env::set_var(key, value);
        }
        end = env_end;
    }
    let room = end - arg_start;
    if room < 2 {
        return;
    }
    let len = title.len().min(room - 1);
    // SAFETY: [arg_start, end) is this process's own argument (and
    // environment) strings, mapped writable by the kernel at exec;
    // nothing reads them after startup (std::env was copied above).
    unsafe {
        let area = std::slice::from_raw_parts_mut(arg_start as *mut u8, room);
        area[..len].copy_from_slice(&title[..len]);
        area[len..].fill(0);
    }
}

/// A child's link to its parent, set up first thing after the exec.
pub struct ChildStart {
    /// The parent at startup: if it changes, the parent died.
    pub parent: Pid,
    pub channel: Channel,
}

/// First steps of every child: note the parent, take CHILD_FD as the
/// channel (and as the log), set the title.
pub fn child_start(role: Role, verbosity: u8) -> Result<ChildStart, String> {
    let parent = nix::unistd::getppid();
    match nix::sys::stat::fstat(CHILD_FD) {
        Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFSOCK => {}
        _ => {
            return Err(format!(
                "fd {CHILD_FD} is not a socket: vmd -P is started by vmd only"
            ))
        }
    }
    // SAFETY: fd 3 is the socket the parent left for us (checked above),
    // owned by nothing else in this fresh process.
    let sock = unsafe { OwnedFd::from_raw_fd(CHILD_FD) };
    log::init_child(CHILD_FD);
    log::set_verbosity(verbosity);
    set_title(&format!("vmd: {}", role.name()));
    Ok(ChildStart {
        parent,
        channel: Channel::new(sock),
    })
}

/// The drop for control and switch: user _vmd, chrooted into EMPTY_DIR,
/// with the filter made of `lists`. Then tells the parent it is ready.
pub fn child_drop_to_vmd(
    role: Role,
    start: &ChildStart,
    role_syscalls: &[seccomp::Allowed],
) -> Result<(), String> {
    let id = Identity::of_user(VMD_USER).map_err(|e| e.to_string())?;
    // Test builds also allow what the SIGRTMIN+n triggers need.
    #[cfg(feature = "test-triggers")]
    let lists = [
        seccomp::CHILD_SYSCALLS,
        role_syscalls,
        crate::trigger::SYSCALLS,
    ];
    #[cfg(not(feature = "test-triggers"))]
    let lists = [seccomp::CHILD_SYSCALLS, role_syscalls];
    let filter = seccomp::compile(&lists).map_err(|e| e.to_string())?;
    drop_privileges(&id, Path::new(EMPTY_DIR), start.parent, &filter, CHILD_FD)
        .map_err(|e| format!("dropping privileges: {e}"))?;
    imsg::send_blocking(
        start.channel.sock.as_fd(),
        Frame::new(Message::Ready { role }),
    )
    .map_err(|e| format!("telling the parent we are ready: {e}"))
}

/// Reads what the parent sent and handles what every child handles the
/// same way; returns the rest for the role. Exits when the parent closes
/// the socket (it died or wants us gone) or sends garbage.
pub fn child_receive(channel: &mut Channel) -> Vec<Frame> {
    let (frames, eof) = match channel.receive() {
        Ok(received) => received,
        Err(e) => {
            log_warn!("closing the channel to the parent: {e}");
            std::process::exit(1);
        }
    };
    let mut rest = Vec::new();
    for frame in frames {
        match frame.message {
            Message::SetVerbosity { level } => {
                log::set_verbosity(level);
                log_debug!("verbosity now {level}");
            }
            _ => rest.push(frame),
        }
    }
    if eof {
        std::process::exit(0);
    }
    rest
}
