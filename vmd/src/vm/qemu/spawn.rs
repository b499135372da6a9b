//! QEMU's start: its own session, namespaces and uid.

use super::*;
use common::imsg::VmParams;
use nix::unistd::Pid;
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// The directories QEMU gets as empty tmpfs of its own (those that
/// exist), and their mount options: small, no devices, no setuid, no
/// executables.
const PRIVATE_TMP: &[&str] = &["/tmp", "/dev/shm"];
const PRIVATE_TMP_OPTIONS: &str = "mode=1777,size=16m,nr_inodes=4096";

/// Starts QEMU with `args` in a session of its own, under `params`' uid,
/// gid and QEMU groups, with the descriptors in `keep` inherited under
/// their own numbers, stdin and stdout on /dev/null and stderr on
/// `stderr`. The caller has already cleared the capability bounding,
/// ambient and inheritable sets (they pass through fork), so after
/// setresuid QEMU holds no capability and cannot get one back.
///
/// Before the uid change (it takes CAP_SYS_ADMIN) the child enters new
/// network, IPC and mount namespaces, makes every mount private (so
/// nothing it mounts reaches the host) and mounts fresh tmpfs on
/// [`PRIVATE_TMP`]. QEMU still sees the host's /usr, /lib and /proc (its
/// firmware, libraries and /proc/self/fd).
pub fn spawn(
    params: &VmParams,
    args: &[String],
    keep: &[RawFd],
    stderr: &OwnedFd,
) -> Result<Pid, QemuError> {
    let path = CString::new(QEMU).map_err(|_| QemuError::Nul)?;
    let mut argv = vec![CString::new("qemu-system-x86_64").map_err(|_| QemuError::Nul)?];
    for arg in args {
        argv.push(CString::new(arg.as_str()).map_err(|_| QemuError::Nul)?);
    }
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    let groups: Vec<libc::gid_t> = qemu_settings(params).groups.clone();
    let (uid, gid) = (params.uid, params.gid);
    let devnull = nix::fcntl::open(
        "/dev/null",
        nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|err| QemuError::Create {
        what: "/dev/null descriptor",
        err,
    })?;
    let me = std::process::id() as libc::pid_t;
    let err_fd = stderr.as_raw_fd();
    let c = |s: &str| CString::new(s).map_err(|_| QemuError::Nul);
    let (root, tmpfs, tmp_options) = (c("/")?, c("tmpfs")?, c(PRIVATE_TMP_OPTIONS)?);
    let private_tmp: Vec<CString> = PRIVATE_TMP
        .iter()
        .filter(|dir| std::path::Path::new(dir).is_dir())
        .map(|dir| c(dir))
        .collect::<Result<_, _>>()?;

    // SAFETY: the VM process is single-threaded; the child makes only raw
    // system calls on data prepared above before it execs or _exits.
    match unsafe { nix::unistd::fork() } {
        Err(err) => {
            let _ = nix::unistd::close(devnull);
            Err(QemuError::Fork(err))
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            let _ = nix::unistd::close(devnull);
            Ok(child)
        }
        Ok(nix::unistd::ForkResult::Child) => unsafe {
            let fail = |msg: &[u8]| -> ! {
                libc::write(err_fd, msg.as_ptr().cast(), msg.len());
                libc::_exit(127)
            };
            if libc::setsid() < 0 {
                fail(b"setsid failed\n");
            }
            libc::dup2(devnull, 0);
            libc::dup2(devnull, 1);
            libc::dup2(err_fd, 2);
            for fd in keep {
                libc::fcntl(*fd, libc::F_SETFD, 0);
            }
            // Namespaces of its own, while it may still make them.
            if libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWNS) != 0 {
                fail(b"cannot enter new network, IPC and mount namespaces\n");
            }
            if libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                fail(b"cannot make the mounts private\n");
            }
            for dir in &private_tmp {
                if libc::mount(
                    tmpfs.as_ptr(),
                    dir.as_ptr(),
                    tmpfs.as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    tmp_options.as_ptr().cast(),
                ) != 0
                {
                    fail(b"cannot mount a private tmpfs on /tmp or /dev/shm\n");
                }
            }
            // The drop, in the order that works (raw calls: this thread is
            // the only one).
            if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0 {
                fail(b"setgroups failed\n");
            }
            if libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0 {
                fail(b"setresgid failed\n");
            }
            if libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0 {
                fail(b"setresuid failed\n");
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0
                || libc::getppid() != me
            {
                fail(b"the VM process went away\n");
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                fail(b"PR_SET_NO_NEW_PRIVS failed\n");
            }
            libc::execve(path.as_ptr(), argv_ptrs.as_ptr(), envp.as_ptr());
            fail(b"cannot execute /usr/bin/qemu-system-x86_64\n")
        },
    }
}
