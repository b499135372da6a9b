//! The QEMU backend: QEMU's command line, starting it under the VM's uid,
//! and its QMP monitor.
//!
//! QEMU never opens a user's file by name: disks come as descriptors in
//! fdsets (`-add-fd`, `/dev/fdset/N`) with one explicit `-blockdev` node
//! per file of a qcow2 chain (in QEMU's JSON syntax, the only one with a
//! real `"backing": null`), the CD-ROM likewise, the kernel and initrd
//! (or, without a kernel, SeaBIOS and its serial console setting) as
//! memfds named by `/proc/self/fd/N`. QMP and the serial port are socketpairs
//! (`-chardev socket,fd=N`). It starts paused (`-S`); the VM process sends
//! `cont` once it has dropped its own privileges.
//!
//! QEMU inherits no seccomp filter (it is spawned before the VM process
//! installs its own) and installs QEMU's own with `-sandbox on,...`. It
//! starts in namespaces of its own: a network namespace with only a down
//! loopback (guest networking will come as tap descriptors, which work
//! across namespaces), no SysV IPC shared with the host, and a mount
//! namespace where `/tmp` and `/dev/shm` are empty tmpfs of its own.

use common::config::BootDevice;
use common::disk::DiskFormat;
use common::imsg::{BackendParams, QemuParams, VmParams};
use nix::errno::Errno;
use nix::unistd::Pid;
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use thiserror::Error;

/// The emulator (Debian `qemu-system-x86`).
pub const QEMU: &str = "/usr/bin/qemu-system-x86_64";

/// The kernel command line when the VM sets none.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0";

#[derive(Debug, Error)]
pub enum QemuError {
    #[error("cannot create a {what}: {err}")]
    Create { what: &'static str, err: Errno },
    #[error("cannot copy the {what} into memory: {err}")]
    Copy {
        what: &'static str,
        err: std::io::Error,
    },
    #[error("the {what} is larger than {}, the most vmd copies into memory for it", common::size::format(*limit))]
    TooLarge { what: &'static str, limit: u64 },
    #[error("cannot start {QEMU}: {0}")]
    Fork(Errno),
    #[error("a QEMU argument holds a NUL byte")]
    Nul,
}

/// One file of a disk's chain as the VM process received it.
pub struct DiskLayer {
    pub disk: u8,
    pub layer: u8,
    pub format: DiskFormat,
    pub writable: bool,
    pub fd: OwnedFd,
}

/// What the guest boots: a Linux kernel directly, or SeaBIOS, which
/// boots a disk or the CD-ROM.
pub enum Boot {
    Kernel {
        kernel: OwnedFd,
        initrd: Option<OwnedFd>,
    },
    Bios {
        bios: OwnedFd,
        /// The fw_cfg file `etc/sercon-port`: SeaBIOS's serial console,
        /// so what the BIOS and boot loaders write through int 10h shows
        /// on the VM's console.
        sercon: OwnedFd,
    },
}

/// SeaBIOS's `etc/sercon-port`: the serial port 0x3f8, little-endian.
/// (QEMU's `-fw_cfg string=` would store text, not these two bytes.)
pub const SERCON_PORT: [u8; 2] = [0xf8, 0x03];

/// What QEMU gets: every descriptor it inherits stays open here until it
/// has started.
pub struct QemuFiles {
    pub boot: Boot,
    pub disks: Vec<DiskLayer>,
    /// The CD-ROM image, read-only.
    pub cdrom: Option<OwnedFd>,
    /// QEMU's ends of the QMP and serial socketpairs.
    pub qmp: OwnedFd,
    pub serial: OwnedFd,
}

/// A file QEMU loads by name, which the VM process copies into memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootFile {
    Kernel,
    Initrd,
    Bios,
}

impl BootFile {
    /// The word for messages.
    pub fn what(self) -> &'static str {
        match self {
            BootFile::Kernel => "kernel",
            BootFile::Initrd => "initrd",
            BootFile::Bios => "BIOS",
        }
    }

    /// The largest copy: well above any real kernel (tens of MiB), initrd
    /// or firmware (a few MiB), so that a huge or endless file cannot
    /// fill the host's memory (documented in vmd.8).
    pub fn limit(self) -> u64 {
        match self {
            BootFile::Kernel => 256 << 20,
            BootFile::Initrd => 1 << 30,
            BootFile::Bios => 64 << 20,
        }
    }
}

/// Copies a boot file into a new memfd (QEMU loads the kernel, initrd
/// and BIOS by name only; /proc/self/fd/N of a memfd is a name that
/// needs no path). Refuses a file over [`BootFile::limit`], by its size
/// first and by what it really reads (a file may grow, or not be a
/// regular file at all).
pub fn to_memfd(kind: BootFile, file: OwnedFd) -> Result<OwnedFd, QemuError> {
    let (what, limit) = (kind.what(), kind.limit());
    let too_large = QemuError::TooLarge { what, limit };
    let mut source = std::fs::File::from(file);
    let size = source
        .metadata()
        .map_err(|err| QemuError::Copy { what, err })?
        .len();
    if size > limit {
        return Err(too_large);
    }
    let mut memfd = memfd(what)?;
    let copied = std::io::copy(&mut std::io::Read::take(&mut source, limit + 1), &mut memfd)
        .map_err(|err| QemuError::Copy { what, err })?;
    if copied > limit {
        return Err(too_large);
    }
    Ok(OwnedFd::from(memfd))
}

/// A new memfd holding `bytes`.
pub fn memfd_with(what: &'static str, bytes: &[u8]) -> Result<OwnedFd, QemuError> {
    let mut memfd = memfd(what)?;
    std::io::Write::write_all(&mut memfd, bytes).map_err(|err| QemuError::Copy { what, err })?;
    Ok(OwnedFd::from(memfd))
}

fn memfd(what: &'static str) -> Result<std::fs::File, QemuError> {
    let name = CString::new(what).map_err(|_| QemuError::Nul)?;
    // SAFETY: memfd_create with a NUL-terminated name; returns a new fd.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(QemuError::Create {
            what: "memfd",
            err: Errno::last(),
        });
    }
    // SAFETY: memfd_create just returned this descriptor; nothing else owns it.
    Ok(std::fs::File::from(unsafe {
        <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
    }))
}

/// QEMU's arguments (after argv[0]) for `params` with `files`.
/// QEMU's own settings in `params`.
pub fn qemu_settings(params: &VmParams) -> &QemuParams {
    match &params.backend {
        BackendParams::Qemu(q) => q,
    }
}

pub fn qemu_args(params: &VmParams, files: &QemuFiles) -> Vec<String> {
    let mut args: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(|s| s.to_string()));
    push(&["-name", &params.name]);
    push(&["-S", "-nodefaults", "-no-user-config", "-no-reboot"]);
    push(&[
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    ]);
    push(&["-display", "none"]);
    if qemu_settings(params).kvm {
        push(&["-accel", "kvm", "-cpu", "host"]);
    } else {
        push(&["-accel", "tcg"]);
    }
    push(&["-m", &format!("{}M", params.memory >> 20)]);
    push(&["-smp", &params.vcpus.to_string()]);
    push(&[
        "-chardev",
        &format!("socket,id=qmp,fd={}", files.qmp.as_raw_fd()),
        "-mon",
        "chardev=qmp,mode=control",
    ]);
    push(&[
        "-chardev",
        &format!("socket,id=serial0,fd={}", files.serial.as_raw_fd()),
        "-serial",
        "chardev:serial0",
    ]);
    // SeaBIOS boots the devices in bootindex order: the CD-ROM first
    // unless told otherwise (as vmd's BIOS does, so an install image
    // boots), then the first disk. A kernel boots directly.
    let (disk_index, cdrom_index) = match &files.boot {
        Boot::Kernel { kernel, initrd } => {
            push(&["-kernel", &proc_fd(kernel.as_raw_fd())]);
            if let Some(initrd) = initrd {
                push(&["-initrd", &proc_fd(initrd.as_raw_fd())]);
            }
            push(&["-append", &qemu_settings(params).cmdline]);
            (None, None)
        }
        Boot::Bios { bios, sercon } => {
            push(&["-bios", &proc_fd(bios.as_raw_fd())]);
            push(&[
                "-fw_cfg",
                &format!("name=etc/sercon-port,file={}", proc_fd(sercon.as_raw_fd())),
            ]);
            match qemu_settings(params).boot_device {
                Some(BootDevice::Disk) => (Some(1), Some(2)),
                _ => (Some(2), Some(1)),
            }
        }
    };
    args.extend(disk_args(&files.disks, disk_index));
    if let Some(cdrom) = &files.cdrom {
        let set = files.disks.len() + 1;
        args.extend(cdrom_args(cdrom.as_raw_fd(), set, cdrom_index));
    }
    args
}

fn bootindex(index: Option<u32>) -> String {
    index.map_or(String::new(), |i| format!(",bootindex={i}"))
}

/// The CD-ROM: a read-only node on fdset `set`, an IDE CD drive on the
/// machine's second IDE bus (SeaBIOS boots it with El Torito).
pub fn cdrom_args(fd: RawFd, set: usize, boot_index: Option<u32>) -> Vec<String> {
    let mut args = fdset_file_args(fd, set, "cd0-file", false);
    args.extend(blockdev(serde_json::json!({
        "driver": "raw", "node-name": "cd0", "file": "cd0-file", "read-only": true,
    })));
    args.push("-device".to_string());
    args.push(format!(
        "ide-cd,drive=cd0,bus=ide.1,id=cd0{}",
        bootindex(boot_index)
    ));
    args
}

/// One `-blockdev` in QEMU's JSON syntax. The key=value syntax cannot say
/// "no backing file": `backing=null` names a node called "null" (QEMU
/// 7.2), and only JSON has a real null.
fn blockdev(node: serde_json::Value) -> [String; 2] {
    ["-blockdev".to_string(), node.to_string()]
}

/// `-add-fd` for descriptor `fd` as fdset `set`, and the `file` node
/// `name` that opens it (read-only unless `writable`).
fn fdset_file_args(fd: RawFd, set: usize, name: &str, writable: bool) -> Vec<String> {
    let mut args = vec!["-add-fd".to_string(), format!("fd={fd},set={set}")];
    args.extend(blockdev(serde_json::json!({
        "driver": "file",
        "node-name": name,
        "filename": format!("/dev/fdset/{set}"),
        "read-only": !writable,
    })));
    args
}

fn proc_fd(fd: RawFd) -> String {
    format!("/proc/self/fd/{fd}")
}

/// `-add-fd` and `-blockdev` for every layer, bottom first (a node must
/// exist before an overlay names it as backing), then one virtio-blk
/// device per disk on its top node; the first disk boots at
/// `boot_index`. Only the top layer of a disk is writable.
pub fn disk_args(layers: &[DiskLayer], boot_index: Option<u32>) -> Vec<String> {
    let mut args = Vec::new();
    let node = |disk: u8, layer: u8| format!("disk{disk}-{layer}");
    let mut sorted: Vec<&DiskLayer> = layers.iter().collect();
    sorted.sort_by_key(|l| (l.disk, std::cmp::Reverse(l.layer)));
    for (set, l) in sorted.iter().enumerate() {
        let name = node(l.disk, l.layer);
        let file = format!("{name}-file");
        args.extend(fdset_file_args(
            l.fd.as_raw_fd(),
            set + 1,
            &file,
            l.writable,
        ));
        let mut format = serde_json::json!({
            "driver": l.format.to_string(),
            "node-name": name,
            "file": file,
            "read-only": !l.writable,
        });
        if l.format == DiskFormat::Qcow2 {
            // Always name the backing node, or null for none: QEMU must
            // not follow the name in the header.
            let below = layers
                .iter()
                .any(|b| b.disk == l.disk && b.layer == l.layer + 1);
            format["backing"] = if below {
                node(l.disk, l.layer + 1).into()
            } else {
                serde_json::Value::Null
            };
        }
        args.extend(blockdev(format));
    }
    let mut disks: Vec<u8> = layers.iter().map(|l| l.disk).collect();
    disks.sort();
    disks.dedup();
    for (i, disk) in disks.into_iter().enumerate() {
        args.push("-device".to_string());
        args.push(format!(
            "virtio-blk-pci,drive={},id=vd{disk}{}",
            node(disk, 0),
            bootindex(boot_index.filter(|_| i == 0))
        ));
    }
    args
}

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

/// The QMP conversation: negotiate, then `cont`, then events and the
/// answers to commands the VM process sends with an `id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QmpState {
    /// Waiting for QEMU's greeting.
    Greeting,
    /// `qmp_capabilities` sent.
    Capabilities,
    /// `cont` sent.
    Cont,
    /// The guest runs.
    Running,
}

/// What one line from QMP means to the VM process.
#[derive(Debug, PartialEq, Eq)]
pub enum QmpReply {
    /// Send this command next.
    Send(&'static str),
    /// The guest now runs.
    Running,
    /// The guest shut down (reason as QEMU names it); QEMU exits.
    Shutdown(String),
    /// A command failed.
    Error(String),
    /// QEMU broke the protocol (a line that is not JSON).
    Protocol(String),
    /// QEMU answered the command sent with this id (`error` None: done).
    Answer {
        id: String,
        error: Option<String>,
    },
    Nothing,
}

/// Advances the conversation by one JSON line from QEMU.
pub fn qmp_line(state: &mut QmpState, line: &str) -> QmpReply {
    let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
        let start: String = line.chars().take(80).collect();
        return QmpReply::Protocol(format!("a line that is not JSON ({start:?})"));
    };
    if let Some(event) = msg.get("event").and_then(|e| e.as_str()) {
        if event == "SHUTDOWN" {
            let reason = msg
                .pointer("/data/reason")
                .and_then(|r| r.as_str())
                .unwrap_or("unknown");
            return QmpReply::Shutdown(reason.to_string());
        }
        return QmpReply::Nothing;
    }
    let error = msg.get("error").map(|error| {
        error
            .get("desc")
            .and_then(|d| d.as_str())
            .unwrap_or("unknown error")
            .to_string()
    });
    if let Some(id) = msg.get("id").and_then(|id| id.as_str()) {
        return QmpReply::Answer {
            id: id.to_string(),
            error,
        };
    }
    if let Some(error) = error {
        return QmpReply::Error(error);
    }
    match *state {
        QmpState::Greeting if msg.get("QMP").is_some() => {
            *state = QmpState::Capabilities;
            QmpReply::Send("qmp_capabilities")
        }
        QmpState::Capabilities if msg.get("return").is_some() => {
            *state = QmpState::Cont;
            QmpReply::Send("cont")
        }
        QmpState::Cont if msg.get("return").is_some() => {
            *state = QmpState::Running;
            QmpReply::Running
        }
        _ => QmpReply::Nothing,
    }
}

/// The longest reason for a failed start sent to the parent (and vmctl).
pub const START_REASON_MAX: usize = 400;

/// Why QEMU refused to start, from one line of its standard error: the
/// line without the program name, a `-blockdev` node named as the disk
/// the user knows (`disk 1`, `disk 1's backing file 1`, `cdrom`) instead
/// of its JSON, cut at [`START_REASON_MAX`]. None for a warning or an
/// empty line.
pub fn qemu_error_reason(line: &str) -> Option<String> {
    let text = line.trim();
    let text = ["qemu-system-x86_64: ", "qemu: "]
        .iter()
        .find_map(|prefix| text.strip_prefix(prefix))
        .unwrap_or(text);
    if text.is_empty() || text.starts_with("warning:") {
        return None;
    }
    let text = match text.strip_prefix("-blockdev ").and_then(blockdev_error) {
        Some(named) => named,
        None => text.to_string(),
    };
    Some(start_reason(&format!("QEMU: {text}")))
}

/// A reason for a failed start as it may reach vmctl: one line (control
/// characters replaced, so nothing reaches the user's terminal as an
/// escape sequence), at most [`START_REASON_MAX`] characters.
pub fn start_reason(text: &str) -> String {
    cut(&crate::log::sanitize(text), START_REASON_MAX)
}

/// `{node JSON}: message` as `disk N: message`, if the node is ours.
fn blockdev_error(text: &str) -> Option<String> {
    let mut nodes = serde_json::Deserializer::from_str(text).into_iter::<serde_json::Value>();
    let node = nodes.next()?.ok()?;
    let message = text[nodes.byte_offset()..].strip_prefix(": ")?;
    let name = node.get("node-name")?.as_str()?;
    let name = name.strip_suffix("-file").unwrap_or(name);
    let what = if name == "cd0" {
        "cdrom".to_string()
    } else {
        let (disk, layer) = name.strip_prefix("disk")?.split_once('-')?;
        let disk = disk.parse::<u32>().ok()? + 1;
        match layer.parse::<u32>().ok()? {
            0 => format!("disk {disk}"),
            layer => format!("disk {disk}'s backing file {layer}"),
        }
    };
    Some(format!("{what}: {message}"))
}

/// `text`, or its start and "..." in `max` characters.
fn cut(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let start: String = text.chars().take(max.saturating_sub(3)).collect();
    format!("{start}...")
}

/// A QMP command as one line.
pub fn qmp_command(name: &str) -> String {
    format!("{{\"execute\": \"{name}\"}}\n")
}

/// A QMP command whose answer carries `id` (a plain word).
pub fn qmp_command_with_id(name: &str, id: &str) -> String {
    format!("{{\"execute\": \"{name}\", \"id\": \"{id}\"}}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(disk: u8, layer: u8, format: DiskFormat, writable: bool) -> DiskLayer {
        let fd = nix::fcntl::open(
            "/dev/null",
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .expect("open /dev/null");
        DiskLayer {
            disk,
            layer,
            format,
            writable,
            // SAFETY: open just returned it.
            fd: unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) },
        }
    }

    /// The `-blockdev` nodes of `args`, parsed, in order.
    fn nodes(args: &[String]) -> Vec<serde_json::Value> {
        args.windows(2)
            .filter(|w| w[0] == "-blockdev")
            .map(|w| serde_json::from_str(&w[1]).expect("a -blockdev in JSON"))
            .collect()
    }

    fn node<'a>(nodes: &'a [serde_json::Value], name: &str) -> (usize, &'a serde_json::Value) {
        nodes
            .iter()
            .enumerate()
            .find(|(_, n)| n["node-name"] == name)
            .unwrap_or_else(|| panic!("no node {name} in {nodes:?}"))
    }

    #[test]
    fn qcow2_chain_nodes_bottom_first_with_explicit_backing() {
        let layers = vec![
            layer(0, 0, DiskFormat::Qcow2, true),
            layer(0, 1, DiskFormat::Raw, false),
            layer(1, 0, DiskFormat::Qcow2, true),
            layer(2, 0, DiskFormat::Qcow2, true),
            layer(2, 1, DiskFormat::Qcow2, false),
        ];
        let args = disk_args(&layers, Some(2));
        let nodes = nodes(&args);
        let (base, base_node) = node(&nodes, "disk0-1");
        let (top, top_node) = node(&nodes, "disk0-0");
        assert!(base < top, "{nodes:?}");
        assert_eq!(
            *top_node,
            serde_json::json!({"driver": "qcow2", "node-name": "disk0-0",
                "file": "disk0-0-file", "read-only": false, "backing": "disk0-1"})
        );
        assert_eq!(
            *base_node,
            serde_json::json!({"driver": "raw", "node-name": "disk0-1",
                "file": "disk0-1-file", "read-only": true})
        );
        // A qcow2 without a layer below has a real JSON null: the
        // key=value `backing=null` would name a node "null".
        let (_, lone) = node(&nodes, "disk1-0");
        assert!(lone["backing"].is_null() && lone.get("backing").is_some());
        assert_eq!(lone["read-only"], false);
        // qcow2 on qcow2: the bottom qcow2 ends the chain, read-only.
        let (_, bottom) = node(&nodes, "disk2-1");
        assert!(bottom["backing"].is_null() && bottom["read-only"] == true);
        assert_eq!(node(&nodes, "disk2-0").1["backing"], "disk2-1");
        let (_, file) = node(&nodes, "disk0-1-file");
        assert_eq!(file["driver"], "file");
        assert_eq!(file["read-only"], true);
        assert!(file["filename"]
            .as_str()
            .is_some_and(|f| f.starts_with("/dev/fdset/")));
        let joined = args.join(" ");
        assert!(joined.contains("virtio-blk-pci,drive=disk0-0,id=vd0,bootindex=2"));
        assert!(joined.contains("virtio-blk-pci,drive=disk1-0,id=vd1 "));
        assert!(joined.ends_with("virtio-blk-pci,drive=disk2-0,id=vd2"));
        assert!(!joined.contains("drive=disk0-1") && !joined.contains("drive=disk2-1"));
        assert_eq!(args.iter().filter(|a| *a == "-add-fd").count(), 5);
        // Each node names the fdset of its own descriptor.
        for l in &layers {
            let set = args
                .iter()
                .find_map(|a| {
                    a.strip_prefix(&format!("fd={},set=", l.fd.as_raw_fd()))
                        .map(str::to_string)
                })
                .expect("an -add-fd for every layer");
            let (_, f) = node(&nodes, &format!("disk{}-{}-file", l.disk, l.layer));
            assert_eq!(f["filename"], format!("/dev/fdset/{set}"));
        }
    }

    fn params(boot_device: Option<BootDevice>) -> VmParams {
        VmParams {
            id: 1,
            name: "b".into(),
            memory: 64 << 20,
            vcpus: 1,
            uid: 1,
            gid: 1,
            backend: BackendParams::Qemu(QemuParams {
                cmdline: DEFAULT_CMDLINE.into(),
                boot_device,
                kvm: false,
                groups: Vec::new(),
            }),
            console_log_cap: 1 << 20,
            console_log_size: 0,
            fd_count: 0,
        }
    }

    fn null() -> OwnedFd {
        layer(0, 0, DiskFormat::Raw, false).fd
    }

    #[test]
    fn bios_boot_order_and_serial_console() {
        let files = |boot_device| {
            let files = QemuFiles {
                boot: Boot::Bios {
                    bios: null(),
                    sercon: null(),
                },
                disks: vec![layer(0, 0, DiskFormat::Raw, true)],
                cdrom: Some(null()),
                qmp: null(),
                serial: null(),
            };
            let args = qemu_args(&params(boot_device), &files).join(" ");
            (args, files)
        };
        let (args, f) = files(None);
        let Boot::Bios { bios, sercon } = &f.boot else {
            unreachable!()
        };
        assert!(args.contains(&format!("-bios /proc/self/fd/{}", bios.as_raw_fd())));
        assert!(args.contains(&format!(
            "-fw_cfg name=etc/sercon-port,file=/proc/self/fd/{}",
            sercon.as_raw_fd()
        )));
        assert!(!args.contains("-kernel") && !args.contains("-append"));
        // The CD-ROM first unless the disk is asked for.
        assert!(args.contains("id=vd0,bootindex=2"), "{args}");
        assert!(args.contains("ide-cd,drive=cd0,bus=ide.1,id=cd0,bootindex=1"));
        let cd = nodes(&qemu_args(&params(None), &f));
        assert_eq!(node(&cd, "cd0-file").1["filename"], "/dev/fdset/2");
        assert_eq!(node(&cd, "cd0").1["read-only"], true);
        let (args, _) = files(Some(BootDevice::Disk));
        assert!(args.contains("id=vd0,bootindex=1"));
        assert!(args.contains("id=cd0,bootindex=2"));
        let (args, _) = files(Some(BootDevice::Cdrom));
        assert!(args.contains("id=cd0,bootindex=1"));
    }

    #[test]
    fn a_kernel_boots_directly() {
        let files = QemuFiles {
            boot: Boot::Kernel {
                kernel: null(),
                initrd: None,
            },
            disks: Vec::new(),
            cdrom: Some(null()),
            qmp: null(),
            serial: null(),
        };
        let args = qemu_args(&params(Some(BootDevice::Cdrom)), &files).join(" ");
        assert!(args.contains("-kernel /proc/self/fd/"));
        assert!(args.contains("-append console=ttyS0"));
        assert!(!args.contains("-bios") && !args.contains("bootindex"));
        assert!(args.contains("ide-cd,drive=cd0,bus=ide.1,id=cd0"));
        assert_eq!(
            memfd_with("sercon", &SERCON_PORT)
                .map(read_memfd)
                .expect("memfd"),
            vec![0xf8, 0x03]
        );
    }

    fn read_memfd(fd: OwnedFd) -> Vec<u8> {
        let mut f = std::fs::File::from(fd);
        let mut buf = Vec::new();
        std::io::Seek::rewind(&mut f).expect("rewind");
        std::io::Read::read_to_end(&mut f, &mut buf).expect("read");
        buf
    }

    #[test]
    fn boot_files_are_capped() {
        let dir = std::env::temp_dir().join(format!("vmd-memfd-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let _cleanup = Cleanup(dir.clone());
        let file = |name: &str, size: u64| {
            let path = dir.join(name);
            let f = std::fs::File::create(&path).expect("create");
            f.set_len(size).expect("set_len");
            OwnedFd::from(std::fs::File::open(&path).expect("open"))
        };
        // At the limit it is copied whole (sparse, so this is quick).
        let bios = to_memfd(BootFile::Bios, file("bios", BootFile::Bios.limit()));
        let bios = bios.expect("a BIOS at the limit");
        let len = std::fs::File::from(bios).metadata().expect("stat").len();
        assert_eq!(len, BootFile::Bios.limit());
        // One byte more is refused by its size, before any copy.
        for kind in [BootFile::Kernel, BootFile::Initrd, BootFile::Bios] {
            let err = to_memfd(kind, file("big", kind.limit() + 1)).expect_err("over the limit");
            assert!(matches!(err, QemuError::TooLarge { .. }), "{err}");
            let text = err.to_string();
            assert!(text.contains(kind.what()), "{text}");
            assert!(text.contains(&common::size::format(kind.limit())), "{text}");
        }
        assert_eq!(
            QemuError::TooLarge {
                what: "kernel",
                limit: 256 << 20
            }
            .to_string(),
            "the kernel is larger than 256M, the most vmd copies into memory for it"
        );
        // A file without a size (a device) is stopped at the limit.
        let zero = nix::fcntl::open(
            "/dev/zero",
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .expect("open /dev/zero");
        // SAFETY: open just returned it.
        let zero = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(zero) };
        let err = to_memfd(BootFile::Bios, zero).expect_err("an endless file");
        assert!(matches!(err, QemuError::TooLarge { what: "BIOS", .. }));
        // A small file arrives intact.
        std::fs::write(dir.join("small"), b"kernel bytes").expect("write");
        let small = std::fs::File::open(dir.join("small")).expect("open");
        let copy = to_memfd(BootFile::Kernel, OwnedFd::from(small)).expect("small kernel");
        assert_eq!(read_memfd(copy), b"kernel bytes");
    }

    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn start_errors_read_as_the_user_knows_the_disks() {
        let corrupt = r#"qemu-system-x86_64: -blockdev {"backing":null,"driver":"qcow2","file":"disk0-0-file","node-name":"disk0-0","read-only":false}: qcow2: Image is corrupt; cannot be opened read/write"#;
        assert_eq!(
            qemu_error_reason(corrupt).as_deref(),
            Some("QEMU: disk 1: qcow2: Image is corrupt; cannot be opened read/write")
        );
        let below = r#"qemu-system-x86_64: -blockdev {"driver":"file","filename":"/dev/fdset/3","node-name":"disk1-2-file","read-only":true}: Could not open '/dev/fdset/3': No such file"#;
        assert_eq!(
            qemu_error_reason(below).as_deref(),
            Some("QEMU: disk 2's backing file 2: Could not open '/dev/fdset/3': No such file")
        );
        assert_eq!(
            qemu_error_reason(
                "qemu: initrd is too large, cannot support.(max: 884735, need 1195136)\n"
            )
            .as_deref(),
            Some("QEMU: initrd is too large, cannot support.(max: 884735, need 1195136)")
        );
        assert_eq!(
            qemu_error_reason(
                "qemu-system-x86_64: cannot set up guest memory 'pc.ram': Cannot allocate memory"
            )
            .as_deref(),
            Some("QEMU: cannot set up guest memory 'pc.ram': Cannot allocate memory")
        );
        assert_eq!(
            qemu_error_reason("qemu-system-x86_64: warning: TCG doesn't support requested feature"),
            None
        );
        assert_eq!(qemu_error_reason("  "), None);
        // Not our node, or not JSON: the line as it is.
        let other = "qemu-system-x86_64: -blockdev {broken: x";
        assert_eq!(
            qemu_error_reason(other).as_deref(),
            Some("QEMU: -blockdev {broken: x")
        );
        assert_eq!(start_reason("a\x1b[2Jb\nc"), "a?[2Jb?c");
        let long = format!("qemu: {}", "é".repeat(5000));
        let reason = qemu_error_reason(&long).expect("a reason");
        assert!(reason.chars().count() <= START_REASON_MAX && reason.ends_with("..."));
    }

    #[test]
    fn qmp_conversation() {
        let mut state = QmpState::Greeting;
        assert_eq!(
            qmp_line(
                &mut state,
                r#"{"QMP": {"version": {}, "capabilities": []}}"#
            ),
            QmpReply::Send("qmp_capabilities")
        );
        assert_eq!(
            qmp_line(&mut state, r#"{"return": {}}"#),
            QmpReply::Send("cont")
        );
        assert_eq!(
            qmp_line(
                &mut state,
                r#"{"timestamp": {"seconds": 1}, "event": "RESUME"}"#
            ),
            QmpReply::Nothing
        );
        assert_eq!(qmp_line(&mut state, r#"{"return": {}}"#), QmpReply::Running);
        assert_eq!(
            qmp_line(
                &mut state,
                r#"{"event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}"#
            ),
            QmpReply::Shutdown("guest-shutdown".into())
        );
        assert!(matches!(qmp_line(&mut state, "{"), QmpReply::Protocol(_)));
        assert_eq!(
            qmp_line(
                &mut state,
                r#"{"error": {"class": "GenericError", "desc": "no"}}"#
            ),
            QmpReply::Error("no".into())
        );
        assert_eq!(
            qmp_line(&mut state, r#"{"return": {}, "id": "pause"}"#),
            QmpReply::Answer {
                id: "pause".into(),
                error: None
            }
        );
        assert_eq!(
            qmp_line(
                &mut state,
                r#"{"error": {"class": "GenericError", "desc": "no"}, "id": "unpause"}"#
            ),
            QmpReply::Answer {
                id: "unpause".into(),
                error: Some("no".into())
            }
        );
        let line = qmp_command_with_id("system_powerdown", "powerdown");
        let parsed: serde_json::Value = serde_json::from_str(line.trim()).expect("json");
        assert_eq!(parsed["execute"], "system_powerdown");
        assert_eq!(parsed["id"], "powerdown");
    }
}
