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
use std::ffi::CStr;
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
    PrivateMounts,
    PrivateTmp,
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
            ExecStep::PrivateMounts => b"cannot make the mounts private\n",
            ExecStep::PrivateTmp => b"cannot mount a private tmpfs on /tmp or /dev/shm\n",
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

/// Fresh tmpfs mounted over directories, in a private mount namespace.
pub struct PrivateTmp<'a> {
    pub root: &'a CStr,
    pub fstype: &'a CStr,
    pub options: &'a CStr,
    pub dirs: &'a [&'a CStr],
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
    pub private_tmp: Option<PrivateTmp<'a>>,
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
    let err = plan.stdio.map_or(2, |(_, err)| err);
    let msg = step.message();
    // SAFETY: writes from buffers that live for the program's lifetime.
    unsafe {
        libc::write(
            err,
            plan.fail_prefix.as_ptr().cast(),
            plan.fail_prefix.len(),
        )
    };
    // SAFETY: as above.
    unsafe { libc::write(err, msg.as_ptr().cast(), msg.len()) };
    if step == ExecStep::Exec {
        // SAFETY: as above.
        unsafe { libc::write(err, plan.name.as_ptr().cast(), plan.name.len()) };
        // SAFETY: as above.
        unsafe { libc::write(err, b"\n".as_ptr().cast(), 1) };
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
    if let Some(tmp) = &plan.private_tmp {
        // Nothing mounted here reaches the host.
        // SAFETY: root is a valid C string; the other pointers may be null.
        if unsafe {
            libc::mount(
                std::ptr::null(),
                tmp.root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
        } != 0
        {
            fail(plan, ExecStep::PrivateMounts);
        }
        for dir in tmp.dirs {
            // SAFETY: every pointer is a valid C string.
            if unsafe {
                libc::mount(
                    tmp.fstype.as_ptr(),
                    dir.as_ptr(),
                    tmp.fstype.as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    tmp.options.as_ptr().cast(),
                )
            } != 0
            {
                fail(plan, ExecStep::PrivateTmp);
            }
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
            private_tmp: None,
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
