//! QEMU's start: its own session, namespaces and uid.

use super::*;
use crate::exec::{fork_exec, ExecIdentity, ExecPlan, ExecProgram, PrivateTmp};
use common::imsg::VmParams;
use nix::unistd::Pid;
use std::ffi::{CStr, CString};
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
    let c = |s: &str| CString::new(s).map_err(|_| QemuError::Nul);
    let (root, tmpfs, tmp_options) = (c("/")?, c("tmpfs")?, c(PRIVATE_TMP_OPTIONS)?);
    let private_tmp: Vec<CString> = PRIVATE_TMP
        .iter()
        .filter(|dir| std::path::Path::new(dir).is_dir())
        .map(|dir| c(dir))
        .collect::<Result<_, _>>()?;
    let tmp_dirs: Vec<&CStr> = private_tmp.iter().map(|d| d.as_c_str()).collect();
    let pass: Vec<(RawFd, RawFd)> = keep.iter().map(|&fd| (fd, fd)).collect();
    let plan = ExecPlan {
        program: ExecProgram::Path(&path),
        argv: &argv_ptrs,
        envp: &envp,
        fail_prefix: b"",
        name: QEMU.as_bytes(),
        clear_signal_mask: false,
        new_session: true,
        stdio: Some((devnull, stderr.as_raw_fd())),
        pass: &pass,
        close_from: None,
        // Namespaces of its own, while it may still make them.
        namespaces: libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWNS,
        private_tmp: Some(PrivateTmp {
            root: &root,
            fstype: &tmpfs,
            options: &tmp_options,
            dirs: &tmp_dirs,
        }),
        identity: Some(ExecIdentity {
            groups: &groups,
            gid,
            uid,
        }),
        die_with: Some(me),
        no_new_privs: true,
    };
    let spawned = fork_exec(&plan).map_err(QemuError::Fork);
    let _ = nix::unistd::close(devnull);
    spawned
}
