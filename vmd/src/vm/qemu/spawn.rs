//! QEMU's start: its own session, namespaces, root and uid.
//!
//! QEMU sees only what it needs ([`qemu_root`]): in its own mount
//! namespace, its root is a small read-only tmpfs holding the host's /usr
//! read-only (its binary, libraries, firmware and option ROMs) and the
//! top-level links into it (/lib64 -> usr/lib64, ...), /etc/ld.so.cache,
//! a /dev of its own with null, zero, full, random, urandom (and kvm
//! with hardware KVM), empty tmpfs on /tmp and /dev/shm, and a procfs of
//! its own mounted `hidepid=invisible,subset=pid`: only its own
//! processes (its uid is the VM's alone), no /proc/sys or /proc/meminfo.
//! The host's root is detached: /home, /etc, /root, /var, /run, other
//! VMs' processes and sockets are not there at all. Its files come as
//! descriptors (/proc/self/fd/N), its taps too.

use super::*;
use crate::exec::{fork_exec, ExecIdentity, ExecPlan, ExecProgram, RootOp};
use common::imsg::VmParams;
use nix::unistd::Pid;
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;

/// Where QEMU's root is built (mounted over in QEMU's own mount namespace
/// only): the empty directory vmd's children are chrooted into.
const NEW_ROOT: &str = crate::proc::EMPTY_DIR;
/// The empty tmpfs QEMU gets on /tmp and /dev/shm: small, no devices, no
/// setuid, no executables.
const PRIVATE_TMP_OPTIONS: &str = "mode=1777,size=16m,nr_inodes=4096";
/// The host's top-level entries QEMU's binary and libraries may be
/// reached through: a link (merged /usr) is copied, a directory bound
/// read-only.
const TOP_LEVEL: &[&str] = &["bin", "sbin", "lib", "lib32", "lib64", "libx32"];
/// The device nodes QEMU gets (and /dev/kvm with hardware KVM).
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom"];

/// The steps that build QEMU's root (see the module's comment), in order,
/// then make it `/` and detach the host's.
pub fn qemu_root(kvm: bool) -> Result<Vec<RootOp>, QemuError> {
    let c = |s: &str| CString::new(s).map_err(|_| QemuError::Nul);
    let new = |path: &str| c(&format!("{NEW_ROOT}{path}"));
    let mount = |source: Option<&str>,
                 target: &str,
                 fstype: Option<&str>,
                 flags: libc::c_ulong,
                 data: Option<&str>| {
        Ok::<_, QemuError>(RootOp::Mount {
            source: source.map(c).transpose()?,
            target: new(target)?,
            fstype: fstype.map(c).transpose()?,
            flags,
            data: data.map(c).transpose()?,
        })
    };
    let mkdir = |path: &str, mode| {
        Ok::<_, QemuError>(RootOp::Mkdir {
            path: new(path)?,
            mode,
        })
    };
    let tmpfs = |path: &str, options: &str| {
        mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            Some(options),
        )
    };
    // A read-only bind: the bind, then its remount (a bind ignores
    // MS_RDONLY).
    let bind_ro = |source: &str, target: &str, flags: libc::c_ulong| {
        Ok::<_, QemuError>([
            mount(
                Some(source),
                target,
                None,
                libc::MS_BIND | libc::MS_REC,
                None,
            )?,
            mount(
                None,
                target,
                None,
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | flags,
                None,
            )?,
        ])
    };
    let mut ops = vec![
        // Nothing mounted from here on reaches the host.
        RootOp::Mount {
            source: None,
            target: c("/")?,
            fstype: None,
            flags: libc::MS_REC | libc::MS_PRIVATE,
            data: None,
        },
        mount(
            Some("tmpfs"),
            "",
            Some("tmpfs"),
            libc::MS_NOSUID | libc::MS_NODEV,
            Some("mode=755,size=64k,nr_inodes=64"),
        )?,
        mkdir("/usr", 0o755)?,
    ];
    ops.extend(bind_ro("/usr", "/usr", libc::MS_NOSUID | libc::MS_NODEV)?);
    for name in TOP_LEVEL {
        let host = Path::new("/").join(name);
        let Ok(meta) = std::fs::symlink_metadata(&host) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&host).map_err(|err| QemuError::Root {
                path: host.display().to_string(),
                err,
            })?;
            ops.push(RootOp::Symlink {
                target: c(&target.to_string_lossy())?,
                path: new(&format!("/{name}"))?,
            });
        } else if meta.is_dir() {
            ops.push(mkdir(&format!("/{name}"), 0o755)?);
            let host = host.to_string_lossy();
            ops.extend(bind_ro(
                &host,
                &format!("/{name}"),
                libc::MS_NOSUID | libc::MS_NODEV,
            )?);
        }
    }
    ops.push(mkdir("/etc", 0o755)?);
    if Path::new("/etc/ld.so.cache").is_file() {
        ops.push(RootOp::File {
            path: new("/etc/ld.so.cache")?,
        });
        ops.extend(bind_ro("/etc/ld.so.cache", "/etc/ld.so.cache", 0)?);
    }
    ops.push(mkdir("/dev", 0o755)?);
    ops.push(mount(
        Some("tmpfs"),
        "/dev",
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("mode=755,size=64k,nr_inodes=64"),
    )?);
    let kvm_node: &[&str] = if kvm { &["kvm"] } else { &[] };
    for dev in DEVICES.iter().chain(kvm_node) {
        let path = format!("/dev/{dev}");
        ops.push(RootOp::File { path: new(&path)? });
        ops.push(mount(Some(&path), &path, None, libc::MS_BIND, None)?);
    }
    ops.push(RootOp::Symlink {
        target: c("/proc/self/fd")?,
        path: new("/dev/fd")?,
    });
    ops.push(mkdir("/dev/shm", 0o755)?);
    ops.push(tmpfs("/dev/shm", PRIVATE_TMP_OPTIONS)?);
    ops.push(mkdir("/tmp", 0o755)?);
    ops.push(tmpfs("/tmp", PRIVATE_TMP_OPTIONS)?);
    ops.push(mkdir("/proc", 0o555)?);
    ops.push(mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some("hidepid=invisible,subset=pid"),
    )?);
    ops.push(mkdir("/old", 0o700)?);
    ops.extend([
        RootOp::EnterRoot {
            new: c(NEW_ROOT)?,
            put_old: new("/old")?,
            old: c("/old")?,
        },
        // Its root, as the rest, read-only from now on.
        RootOp::Mount {
            source: None,
            target: c("/")?,
            fstype: None,
            flags: libc::MS_BIND
                | libc::MS_REMOUNT
                | libc::MS_RDONLY
                | libc::MS_NOSUID
                | libc::MS_NODEV,
            data: None,
        },
    ]);
    Ok(ops)
}

/// Starts QEMU with `args` in a session of its own, under `params`' uid,
/// gid and QEMU groups, with the descriptors in `keep` inherited under
/// their own numbers, stdin and stdout on /dev/null and stderr on
/// `stderr`. The caller has already cleared the capability bounding,
/// ambient and inheritable sets (they pass through fork), so after
/// setresuid QEMU holds no capability and cannot get one back.
///
/// Before the uid change (it takes CAP_SYS_ADMIN) the child enters new
/// network, IPC and mount namespaces and makes its root ([`qemu_root`]).
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
    let root = qemu_root(qemu_settings(params).kvm)?;
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
        root: &root,
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
