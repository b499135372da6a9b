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

//!
//! Its files: [`args`] (the command line and the memfds it names),
//! [`spawn`] (QEMU's start in its own session and namespaces), [`qmp`]
//! (the monitor's conversation) and [`reason`] (why a start failed, from
//! QEMU's standard error).

mod args;
mod backend;
mod lines;
mod qmp;
mod reason;
mod spawn;

pub use args::*;
pub use backend::prepare;
#[cfg(test)]
pub use backend::{QEMU_ARG_RULES, QEMU_SYSCALLS};
pub use qmp::*;
pub use reason::*;
pub use spawn::*;

use nix::errno::Errno;
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
    #[error("cannot read {path} for QEMU's root: {err}")]
    Root { path: String, err: std::io::Error },
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::config::BootDevice;
    use common::disk::DiskFormat;
    use common::imsg::{BackendParams, QemuParams, VmParams};
    use std::os::fd::{AsRawFd, OwnedFd};

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
            macs: Vec::new(),
            incoming: None,
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
                taps: Vec::new(),
                vhosts: Vec::new(),
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
            taps: Vec::new(),
            vhosts: Vec::new(),
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

    #[test]
    fn each_tap_is_a_virtio_net_device_with_its_mac() {
        let (a, b) = (null(), null());
        let (fa, fb) = (a.as_raw_fd(), b.as_raw_fd());
        // Given out of order: the devices follow the interfaces' order.
        let taps = vec![(1, b), (0, a)];
        let macs = [
            [0xfe, 0xe1, 0xbb, 0xd1, 0, 1],
            [0xfe, 0xe1, 0xbb, 0xd2, 0xab, 0xcd],
        ];
        let args = args::net_args(&taps, &[], &macs).join(" ");
        assert_eq!(
            args,
            format!(
                "-netdev tap,id=net0,fd={fa} -device virtio-net-pci,netdev=net0,mac=fe:e1:bb:d1:00:01,id=vio0 \
                 -netdev tap,id=net1,fd={fb} -device virtio-net-pci,netdev=net1,mac=fe:e1:bb:d2:ab:cd,id=vio1"
            )
        );
        // Interface 1 with vhost-net: only its -netdev says so.
        let v = null();
        let fv = v.as_raw_fd();
        let args = args::net_args(&taps, &[(1, v)], &macs).join(" ");
        assert!(args.contains(&format!("tap,id=net0,fd={fa} ")), "{args}");
        assert!(
            args.contains(&format!("tap,id=net1,fd={fb},vhost=on,vhostfd={fv} ")),
            "{args}"
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
                error: None,
                value: serde_json::json!({})
            }
        );
        assert_eq!(
            qmp_line(
                &mut state,
                r#"{"error": {"class": "GenericError", "desc": "no"}, "id": "unpause"}"#
            ),
            QmpReply::Answer {
                id: "unpause".into(),
                error: Some("no".into()),
                value: serde_json::Value::Null
            }
        );
        assert_eq!(
            qmp_line(
                &mut state,
                r#"{"event": "MIGRATION", "data": {"status": "completed"}}"#
            ),
            QmpReply::Migration("completed".into())
        );
        let line = qmp_command_with_args("getfd", serde_json::json!({"fdname": "x"}), "g");
        let parsed: serde_json::Value = serde_json::from_str(line.trim()).expect("json");
        assert_eq!(parsed["arguments"]["fdname"], "x");
        let line = qmp_command_with_id("system_powerdown", "powerdown");
        let parsed: serde_json::Value = serde_json::from_str(line.trim()).expect("json");
        assert_eq!(parsed["execute"], "system_powerdown");
        assert_eq!(parsed["id"], "powerdown");
    }
}
