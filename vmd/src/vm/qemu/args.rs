//! QEMU's command line and the memfds it names.

use super::*;
use common::config::BootDevice;
use common::disk::DiskFormat;
use common::imsg::{BackendParams, QemuParams, VmParams};
use nix::errno::Errno;
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

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
    /// Each network interface's tap, by interface index.
    pub taps: Vec<(u8, OwnedFd)>,
    /// The interfaces' vhost-net descriptors, where the parent opened them.
    pub vhosts: Vec<(u8, OwnedFd)>,
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
/// QEMU's own settings in `params` (the VM process runs QEMU only for
/// QEMU's; any other backend's reads as QEMU's defaults, TCG).
pub fn qemu_settings(params: &VmParams) -> &QemuParams {
    static NONE: std::sync::LazyLock<QemuParams> = std::sync::LazyLock::new(|| QemuParams {
        cmdline: super::DEFAULT_CMDLINE.to_string(),
        boot_device: None,
        kvm: false,
        groups: Vec::new(),
    });
    match &params.backend {
        BackendParams::Qemu(q) => q,
        BackendParams::Kvm(_) => &NONE,
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
    args.extend(net_args(&files.taps, &files.vhosts, &params.macs));
    args
}

/// One virtio-net device per interface on its tap's descriptor, in
/// interface order (eth0 is interface 0), with its MAC. QEMU probes the
/// tap's virtio-net header and sets its offloads itself. An interface
/// with a vhost-net descriptor has QEMU hand its packets to the kernel's
/// vhost-net (`vhost=on`).
pub fn net_args(taps: &[(u8, OwnedFd)], vhosts: &[(u8, OwnedFd)], macs: &[[u8; 6]]) -> Vec<String> {
    let mut sorted: Vec<&(u8, OwnedFd)> = taps.iter().collect();
    sorted.sort_by_key(|(index, _)| *index);
    let mut args = Vec::new();
    for (index, fd) in sorted {
        let mac = macs.get(usize::from(*index)).copied().unwrap_or_default();
        args.push("-netdev".to_string());
        let vhost = match vhosts.iter().find(|(i, _)| i == index) {
            Some((_, v)) => format!(",vhost=on,vhostfd={}", v.as_raw_fd()),
            None => String::new(),
        };
        args.push(format!("tap,id=net{index},fd={}{vhost}", fd.as_raw_fd()));
        args.push("-device".to_string());
        args.push(format!(
            "virtio-net-pci,netdev=net{index},mac={},id=vio{index}",
            common::config::format_lladdr(&mac)
        ));
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
