//! One way to fork and exec a program with its privileges dropped, for
//! vmd's children (re-executing vmd) and QEMU alike.
//!
//! Everything the child needs is prepared before the fork ([`ExecPlan`]);
//! after it, the child makes only raw system calls, one per step, in the
//! one order that works (each step is impossible after the next), as
//! Firecracker's jailer does. A failed step is an [`ExecStep`]: the child
//! writes its message to its stderr and exits 127, and whoever reads that
//! stderr (the parent's log, the VM process for QEMU) says why.

use nix::unistd::{ForkResult, Pid};
use std::ffi::{CStr, CString};
use std::os::fd::RawFd;

/// A step of the child between fork and exec, each with what the child
/// writes when it fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecStep {
    SignalMask,
    Session,
    Stdio,
    PassFd,
    CloseOthers,
    Namespaces,
    PrivateRoot,
    Groups,
    Gid,
    Uid,
    ParentDeath,
    ParentGone,
    NoNewPrivs,
    Exec,
}

impl ExecStep {
    pub fn message(self) -> &'static [u8] {
        match self {
            ExecStep::SignalMask => b"cannot clear the signal mask\n",
            ExecStep::Session => b"setsid failed\n",
            ExecStep::Stdio => b"cannot set up standard input, output and error\n",
            ExecStep::PassFd => b"cannot pass a descriptor across exec\n",
            ExecStep::CloseOthers => b"cannot close inherited descriptors\n",
            ExecStep::Namespaces => b"cannot enter new network, IPC and mount namespaces\n",
            ExecStep::PrivateRoot => b"cannot set up its private root: ",
            ExecStep::Groups => b"setgroups failed\n",
            ExecStep::Gid => b"setresgid failed\n",
            ExecStep::Uid => b"setresuid failed\n",
            ExecStep::ParentDeath | ExecStep::ParentGone => b"its parent went away\n",
            ExecStep::NoNewPrivs => b"PR_SET_NO_NEW_PRIVS failed\n",
            ExecStep::Exec => b"cannot execute ",
        }
    }
}

/// What is executed.
pub enum ExecProgram<'a> {
    /// An open executable (execveat with AT_EMPTY_PATH).
    Fd(RawFd),
    Path(&'a CStr),
}

/// One step of building a process's own view of the file system in its
/// private mount namespace: one system call each, its strings prepared
/// before the fork. A failed step names its path.
pub enum RootOp {
    /// mount(2); `None` for a null pointer.
    Mount {
        source: Option<CString>,
        target: CString,
        fstype: Option<CString>,
        flags: libc::c_ulong,
        data: Option<CString>,
    },
    Mkdir {
        path: CString,
        mode: libc::mode_t,
    },
    /// An empty regular file (to bind a device node or a file onto).
    File {
        path: CString,
    },
    Symlink {
        target: CString,
        path: CString,
    },
    /// `new` becomes `/` ([`enter_root`]): the old root is put on
    /// `put_old` (a directory in `new`), which is `old` once inside.
    EnterRoot {
        new: CString,
        put_old: CString,
        old: CString,
    },
}

impl RootOp {
    /// The path a failure names.
    fn path(&self) -> &CStr {
        match self {
            RootOp::Mount { target: path, .. }
            | RootOp::Mkdir { path, .. }
            | RootOp::File { path }
            | RootOp::Symlink { path, .. }
            | RootOp::EnterRoot { new: path, .. } => path,
        }
    }

    /// Makes the step's one system call; false if it failed.
    fn run(&self) -> bool {
        let opt = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        // SAFETY (every arm): the pointers are valid C strings that live
        // until fork_exec returns, or null where the call allows it.
        let rc = match self {
            RootOp::Mount {
                source,
                target,
                fstype,
                flags,
                data,
            } => unsafe {
                libc::mount(
                    opt(source),
                    target.as_ptr(),
                    opt(fstype),
                    *flags,
                    opt(data).cast(),
                )
            },
            RootOp::Mkdir { path, mode } => unsafe { libc::mkdir(path.as_ptr(), *mode) },
            RootOp::File { path } => unsafe {
                libc::mknod(path.as_ptr(), libc::S_IFREG | 0o600, 0)
            },
            RootOp::Symlink { target, path } => unsafe {
                libc::symlink(target.as_ptr(), path.as_ptr())
            },
            RootOp::EnterRoot { new, put_old, old } => return enter_root(new, put_old, old),
        };
        rc == 0
    }
}

/// Makes `new` the root: pivot_root(2) into it with the old root on
/// `put_old`, chdir to `/`, the old root (now `old`) detached
/// (umount2 MNT_DETACH) and its directory removed. Where the old root is
/// the initramfs, which cannot be pivoted (EINVAL), as switch_root(8)
/// does: chdir to `new`, move its mount onto `/` (MS_MOVE) and chroot
/// there, the old root then under it, out of reach without
/// CAP_SYS_CHROOT. False at the first call that fails (errno set).
fn enter_root(new: &CStr, put_old: &CStr, old: &CStr) -> bool {
    // SAFETY (every call): valid C strings, or null where allowed.
    unsafe {
        if libc::syscall(libc::SYS_pivot_root, new.as_ptr(), put_old.as_ptr()) == 0 {
            return libc::chdir(c"/".as_ptr()) == 0
                && libc::umount2(old.as_ptr(), libc::MNT_DETACH) == 0
                && libc::rmdir(old.as_ptr()) == 0;
        }
        if nix::errno::Errno::last_raw() != libc::EINVAL {
            return false;
        }
        libc::rmdir(put_old.as_ptr()) == 0
            && libc::chdir(new.as_ptr()) == 0
            && libc::mount(
                c".".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_MOVE,
                std::ptr::null(),
            ) == 0
            && libc::chroot(c".".as_ptr()) == 0
            && libc::chdir(c"/".as_ptr()) == 0
    }
}

/// The ids the child takes before exec.
pub struct ExecIdentity<'a> {
    pub groups: &'a [libc::gid_t],
    pub gid: libc::gid_t,
    pub uid: libc::uid_t,
}

/// The child's steps, in order; every pointer must stay valid until
/// [`fork_exec`] returns.
pub struct ExecPlan<'a> {
    pub program: ExecProgram<'a>,
    /// NULL-terminated.
    pub argv: &'a [*const libc::c_char],
    /// NULL-terminated.
    pub envp: &'a [*const libc::c_char],
    /// Written before a failed step's message (e.g. "vmd: ").
    pub fail_prefix: &'static [u8],
    /// The program as messages name it.
    pub name: &'static [u8],
    /// Clear the signal mask (the parent blocks what it reads from a
    /// signalfd; the mask survives exec).
    pub clear_signal_mask: bool,
    pub new_session: bool,
    /// stdin and stdout from the first, stderr from the second.
    pub stdio: Option<(RawFd, RawFd)>,
    /// Descriptors passed across the exec: (ours, theirs); the same number
    /// only clears close-on-exec.
    pub pass: &'a [(RawFd, RawFd)],
    /// Every descriptor from this one up is closed at exec.
    pub close_from: Option<RawFd>,
    /// CLONE_NEW* flags to unshare (0: none).
    pub namespaces: libc::c_int,
    /// Steps that build the process's own root (with CLONE_NEWNS), made
    /// while it is still root.
    pub root: &'a [RootOp],
    pub identity: Option<ExecIdentity<'a>>,
    /// Die with this process (PR_SET_PDEATHSIG), which must still be the
    /// parent then.
    pub die_with: Option<libc::pid_t>,
    pub no_new_privs: bool,
}

/// Forks; the child follows `plan` and execs. Call from a single-threaded
/// process (or its only thread that matters: the child has only the
/// calling thread).
pub fn fork_exec(plan: &ExecPlan) -> Result<Pid, nix::errno::Errno> {
    // SAFETY: the child only makes raw system calls on data prepared by
    // the caller (exec_child), then execs or _exits.
    match unsafe { nix::unistd::fork() }? {
        ForkResult::Parent { child } => Ok(child),
        ForkResult::Child => exec_child(plan),
    }
}

/// Writes the step's message to stderr (fd 2, or the plan's stderr if it
/// was not set up yet) and exits 127.
fn fail(plan: &ExecPlan, step: ExecStep) -> ! {
    fail_at(plan, step, &[])
}

/// As [`fail`], naming `path` and the error's number after the message
/// (`... /usr (errno 2)`); the exec step names the program.
fn fail_at(plan: &ExecPlan, step: ExecStep, path: &[u8]) -> ! {
    let errno = nix::errno::Errno::last_raw();
    let err = plan.stdio.map_or(2, |(_, err)| err);
    // The errno in decimal, without allocating.
    let mut digits = [0u8; 12];
    let mut at = digits.len();
    let mut n = errno.unsigned_abs();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let named = !path.is_empty();
    let parts: [&[u8]; 7] = [
        plan.fail_prefix,
        step.message(),
        if step == ExecStep::Exec {
            plan.name
        } else {
            path
        },
        if named { b" (errno " } else { b"" },
        if named { &digits[at..] } else { b"" },
        if named { b")" } else { b"" },
        if step == ExecStep::Exec || named {
            b"\n"
        } else {
            b""
        },
    ];
    for part in parts {
        // SAFETY: writes from buffers that live until _exit.
        unsafe { libc::write(err, part.as_ptr().cast(), part.len()) };
    }
    // SAFETY: ends the forked child without running the parent's atexit
    // handlers or destructors.
    unsafe { libc::_exit(127) }
}

fn exec_child(plan: &ExecPlan) -> ! {
    if plan.clear_signal_mask {
        // SAFETY: sigemptyset fills a zeroed set we own.
        let none = unsafe {
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            none
        };
        // SAFETY: sets this thread's mask from a valid set.
        if unsafe { libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) } != 0 {
            fail(plan, ExecStep::SignalMask);
        }
    }
    // SAFETY: setsid takes no pointer.
    if plan.new_session && unsafe { libc::setsid() } < 0 {
        fail(plan, ExecStep::Session);
    }
    if let Some((null, err)) = plan.stdio {
        for (from, to) in [(null, 0), (null, 1), (err, 2)] {
            // SAFETY: dup2 on descriptors the caller keeps open.
            if unsafe { libc::dup2(from, to) } < 0 {
                fail(plan, ExecStep::Stdio);
            }
        }
    }
    for &(ours, theirs) in plan.pass {
        let passed = if ours == theirs {
            // SAFETY: clears close-on-exec on a descriptor the caller owns.
            unsafe { libc::fcntl(ours, libc::F_SETFD, 0) }
        } else {
            // SAFETY: dup2 on descriptors the caller keeps open; the copy
            // has no close-on-exec.
            unsafe { libc::dup2(ours, theirs) }
        };
        if passed < 0 {
            fail(plan, ExecStep::PassFd);
        }
    }
    if let Some(from) = plan.close_from {
        // Nothing else crosses the exec, whatever we inherited
        // (CLOSE_RANGE_CLOEXEC keeps an exe fd open until the exec
        // itself). Older kernels lack it: then only our own descriptors,
        // all O_CLOEXEC, are closed.
        // SAFETY: close_range takes no pointer.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_close_range,
                from as libc::c_uint,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            )
        };
        let old_kernel = matches!(
            nix::errno::Errno::last(),
            nix::errno::Errno::ENOSYS | nix::errno::Errno::EINVAL
        );
        if rc != 0 && !old_kernel {
            fail(plan, ExecStep::CloseOthers);
        }
    }
    // SAFETY: unshare takes no pointer.
    if plan.namespaces != 0 && unsafe { libc::unshare(plan.namespaces) } != 0 {
        fail(plan, ExecStep::Namespaces);
    }
    for op in plan.root {
        if !op.run() {
            fail_at(plan, ExecStep::PrivateRoot, op.path().to_bytes());
        }
    }
    if let Some(id) = &plan.identity {
        // Raw calls: libc's wrappers would signal threads this child does
        // not have.
        // SAFETY: groups points to groups.len() gids.
        if unsafe { libc::syscall(libc::SYS_setgroups, id.groups.len(), id.groups.as_ptr()) } != 0 {
            fail(plan, ExecStep::Groups);
        }
        // SAFETY: setresgid takes no pointer.
        if unsafe { libc::syscall(libc::SYS_setresgid, id.gid, id.gid, id.gid) } != 0 {
            fail(plan, ExecStep::Gid);
        }
        // SAFETY: setresuid takes no pointer.
        if unsafe { libc::syscall(libc::SYS_setresuid, id.uid, id.uid, id.uid) } != 0 {
            fail(plan, ExecStep::Uid);
        }
    }
    if let Some(parent) = plan.die_with {
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
            fail(plan, ExecStep::ParentDeath);
        }
        // SAFETY: getppid takes nothing.
        if unsafe { libc::getppid() } != parent {
            fail(plan, ExecStep::ParentGone);
        }
    }
    // SAFETY: prctl with integer arguments.
    if plan.no_new_privs && unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        fail(plan, ExecStep::NoNewPrivs);
    }
    match plan.program {
        ExecProgram::Fd(fd) => {
            // SAFETY: the empty path, argv and envp are valid and
            // NULL-terminated.
            unsafe {
                libc::syscall(
                    libc::SYS_execveat,
                    fd,
                    c"".as_ptr(),
                    plan.argv.as_ptr(),
                    plan.envp.as_ptr(),
                    libc::AT_EMPTY_PATH,
                )
            };
        }
        ExecProgram::Path(path) => {
            // SAFETY: as above.
            unsafe { libc::execve(path.as_ptr(), plan.argv.as_ptr(), plan.envp.as_ptr()) };
        }
    }
    fail(plan, ExecStep::Exec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::wait::{waitpid, WaitStatus};
    use std::io::Read;
    use std::os::fd::{AsRawFd, OwnedFd};

    /// Runs `plan` with stdio on /dev/null and a pipe; returns its exit
    /// status and what it wrote to stderr.
    fn run(mut plan: ExecPlan) -> (WaitStatus, String) {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        let null = OwnedFd::from(std::fs::File::open("/dev/null").expect("/dev/null"));
        plan.stdio = Some((null.as_raw_fd(), write.as_raw_fd()));
        let pid = fork_exec(&plan).expect("fork");
        drop(write);
        let mut out = String::new();
        std::fs::File::from(read)
            .read_to_string(&mut out)
            .expect("read");
        (waitpid(pid, None).expect("waitpid"), out)
    }

    fn plan<'a>(
        path: &'a CStr,
        argv: &'a [*const libc::c_char],
        envp: &'a [*const libc::c_char],
    ) -> ExecPlan<'a> {
        ExecPlan {
            program: ExecProgram::Path(path),
            argv,
            envp,
            fail_prefix: b"test: ",
            name: b"the test program",
            clear_signal_mask: true,
            new_session: true,
            stdio: None,
            pass: &[],
            close_from: Some(3),
            namespaces: 0,
            root: &[],
            identity: None,
            die_with: Some(std::process::id() as libc::pid_t),
            no_new_privs: true,
        }
    }

    #[test]
    fn runs_the_program_or_says_which_step_failed() {
        let envp = [std::ptr::null()];
        let sh = c"/bin/sh";
        let argv = [
            c"sh".as_ptr(),
            c"-c".as_ptr(),
            c"echo ran >&2".as_ptr(),
            std::ptr::null(),
        ];
        let (status, out) = run(plan(sh, &argv, &envp));
        assert!(matches!(status, WaitStatus::Exited(_, 0)), "{status:?}");
        assert_eq!(out, "ran\n");

        let missing = c"/nonexistent/program";
        let (status, out) = run(plan(missing, &argv, &envp));
        assert!(matches!(status, WaitStatus::Exited(_, 127)), "{status:?}");
        assert_eq!(out, "test: cannot execute the test program\n");

        // A root step that fails names its path and errno.
        let ops = [RootOp::Mkdir {
            path: CString::new("/nonexistent/dir").expect("path"),
            mode: 0o755,
        }];
        let mut rooted = plan(sh, &argv, &envp);
        rooted.root = &ops;
        let (status, out) = run(rooted);
        assert!(matches!(status, WaitStatus::Exited(_, 127)), "{status:?}");
        assert_eq!(
            out,
            format!(
                "test: cannot set up its private root: /nonexistent/dir (errno {})\n",
                libc::ENOENT
            )
        );

        // A step that fails: the process to die with is not the parent.
        let mut bad = plan(sh, &argv, &envp);
        bad.die_with = Some(1);
        let (status, out) = run(bad);
        if std::process::id() != 1 {
            assert!(matches!(status, WaitStatus::Exited(_, 127)), "{status:?}");
            assert_eq!(out, "test: its parent went away\n");
        }
    }
}
