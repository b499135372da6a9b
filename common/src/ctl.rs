//! The control protocol between vmctl, the control process and the
//! parent: what vmctl asks, who asked (as the control process read it
//! from the socket), and how a failure reads to the user.
//!
//! vmctl sends a [`CtlRequest`] in a `Message::Ctl` frame; control wraps
//! it with the peer's [`Credentials`] in a `Message::CtlForward` frame to
//! the parent, whose answers come back through control to the connection
//! that asked (by peer id).

use crate::config::VmConfig;
use nix::errno::Errno;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How long vmd holds a `start` answer while the VM comes up: from the
/// request until QEMU has accepted its arguments and runs the guest
/// (copying a large initrd and a slow TCG start included). A VM not
/// running by then is stopped and the start fails with a time-out. A
/// client that gives up on vmd must wait longer than this.
pub const VM_START_TIMEOUT: Duration = Duration::from_secs(40);

/// A VM named on vmctl's command line: a number is an id, anything else a
/// name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmTarget {
    Id(u32),
    Name(String),
}

impl VmTarget {
    /// `"3"` is id 3 (0 is no id), anything else a name.
    pub fn parse(word: &str) -> VmTarget {
        match word.parse::<u32>() {
            Ok(id) => VmTarget::Id(id),
            Err(_) => VmTarget::Name(word.to_string()),
        }
    }

    pub fn matches(&self, id: u32, name: &str) -> bool {
        match self {
            VmTarget::Id(want) => *want == id,
            VmTarget::Name(want) => want == name,
        }
    }
}

/// What `vmctl reset` purges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResetWhat {
    All,
    Vms,
    Switches,
}

/// `vmctl start`: the VM to start and what the command line sets. Fields
/// of `vm` left `None` (or empty) were not given; `vm.instance_of` is the
/// template of `-t`. Paths are absolute (vmctl resolves them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartRequest {
    pub target: VmTarget,
    pub vm: VmConfig,
}

impl StartRequest {
    /// Whether the request sets anything besides the boot image and the
    /// boot device (which an existing VM may be started with): vmctl's
    /// options, and what only a raw request can carry.
    pub fn sets_more_than_boot(&self) -> bool {
        // Every field, so that a new one is decided on here.
        let crate::config::VmConfig {
            name: _,
            source: _,
            enabled: _,
            boot: _,
            boot_device: _,
            instance_of,
            cdrom,
            disks,
            interfaces,
            interface_count,
            memory,
            owner,
            allow_instance,
            initrd,
            cmdline,
            vcpus,
            backend,
            accel,
            shutdown_timeout,
        } = &self.vm;
        memory.is_some()
            || !disks.is_empty()
            || !interfaces.is_empty()
            || interface_count.is_some()
            || cdrom.is_some()
            || instance_of.is_some()
            || initrd.is_some()
            || cmdline.is_some()
            || vcpus.is_some()
            || backend.is_some()
            || accel.is_some()
            || shutdown_timeout.is_some()
            || !allow_instance.is_empty()
            || *owner != crate::config::Owner::default()
    }
}

/// One command from vmctl.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CtlRequest {
    /// `status`: every VM, one `CtlVm` frame each, then `CtlVmEnd`.
    Status,
    Start(Box<StartRequest>),
    Stop {
        target: VmTarget,
        force: bool,
        wait: bool,
    },
    Wait {
        target: VmTarget,
    },
    Pause {
        target: VmTarget,
    },
    Unpause {
        target: VmTarget,
    },
    /// `load FILE`: an absolute path.
    Load {
        path: String,
    },
    Reload,
    Reset {
        what: ResetWhat,
    },
    /// `log brief` (0) or `log verbose` (2).
    Verbose {
        level: u8,
    },
    /// A test of the path a client's descriptor takes (the frame carries
    /// one) to VM `target`'s process: [`crate::imsg::VmCommand::Probe`].
    /// Root's; a vmd built without the `test-triggers` feature refuses it.
    Probe {
        target: VmTarget,
        text: String,
        steps: u8,
    },
    /// `send ID`: the frame carries vmctl's end of a socketpair, into
    /// which the VM process writes the stream (common::stream) of VM
    /// `target`, which ends once it is whole. Root's.
    Send {
        target: VmTarget,
    },
    /// `receive NAME`: a new VM NAME from a stream (common::stream) whose
    /// header vmctl read (`header`: its bytes, checked again by vmd); the
    /// frame carries vmctl's end of a socketpair with the rest. Root's.
    Receive {
        name: String,
        header: Vec<u8>,
    },
    /// `events [id]`: every lifecycle event of the VMs `target` names
    /// (None: all, and the configuration's), as it happens, one
    /// `CtlEvent` frame each, until the client closes. Held by control
    /// (see [`crate::event`]); visible as `status` is, to every client.
    Events {
        target: Option<VmTarget>,
    },
    /// `stats [id]`: one `CtlStats` frame per VM `target` names (None:
    /// every VM), then `CtlVmEnd`; visible as `status` is.
    Stats {
        target: Option<VmTarget>,
    },
}

/// How long vmctl waits for each answer from vmd before it gives up.
/// Longer than every deadline vmd keeps while it answers a request (10 s
/// for the users'-files helper, `userfiles::OPEN_TIMEOUT`; 10 s for a VM
/// to confirm a pause or unpause, `parent::COMMAND_REPLY_TIMEOUT`; vmd
/// asserts this at build time), so a working vmd always answers first.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// The same for `start`, which opens the VM's files and then has the VM
/// started: longer than the helper's deadline and [`VM_START_TIMEOUT`]
/// together (vmd asserts this at build time).
pub const START_ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

impl CtlRequest {
    /// How long vmctl waits for each answer to this request: without
    /// bound only where the user asked to wait (`wait`, `stop -w`).
    pub fn answer_timeout(&self) -> Option<std::time::Duration> {
        match self {
            CtlRequest::Wait { .. }
            | CtlRequest::Stop { wait: true, .. }
            | CtlRequest::Events { .. } => None,
            CtlRequest::Start(_) | CtlRequest::Receive { .. } => Some(START_ANSWER_TIMEOUT),
            _ => Some(ANSWER_TIMEOUT),
        }
    }

    /// Whether a user other than root may ask this (then only for VMs
    /// they own, which the parent checks). Everything else is root's.
    pub fn open_to_users(&self) -> bool {
        matches!(
            self,
            CtlRequest::Status
                | CtlRequest::Start(_)
                | CtlRequest::Stop { .. }
                | CtlRequest::Wait { .. }
                | CtlRequest::Pause { .. }
                | CtlRequest::Unpause { .. }
                | CtlRequest::Events { .. }
                | CtlRequest::Stats { .. }
        )
    }

    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            CtlRequest::Status => "status",
            CtlRequest::Start(_) => "start",
            CtlRequest::Stop { .. } => "stop",
            CtlRequest::Wait { .. } => "wait",
            CtlRequest::Pause { .. } => "pause",
            CtlRequest::Unpause { .. } => "unpause",
            CtlRequest::Load { .. } => "load",
            CtlRequest::Reload => "reload",
            CtlRequest::Reset { .. } => "reset",
            CtlRequest::Verbose { .. } => "log",
            CtlRequest::Probe { .. } => "probe",
            CtlRequest::Send { .. } => "send",
            CtlRequest::Receive { .. } => "receive",
            CtlRequest::Events { .. } => "events",
            CtlRequest::Stats { .. } => "stats",
        }
    }

    /// Whether its frame carries the client's descriptor (exactly one);
    /// control refuses a descriptor with any other request, and this one
    /// without.
    pub fn takes_fd(&self) -> bool {
        matches!(
            self,
            CtlRequest::Probe { .. } | CtlRequest::Send { .. } | CtlRequest::Receive { .. }
        )
    }
}

/// Why a request is refused for the descriptor that came with it (or
/// did not): control and the parent both ask, before anything else.
pub fn fd_refusal(request: &CtlRequest, has_fd: bool) -> Option<String> {
    let name = request.name();
    match (request.takes_fd(), has_fd) {
        (true, false) => Some(format!("{name} needs a descriptor and none came")),
        (false, true) => Some(format!("a descriptor came with {name}, which takes none")),
        _ => None,
    }
}

/// Who sent a request, as the control process read it from the socket
/// (SO_PEERCRED and SO_PEERGROUPS), never as the client claimed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

impl Credentials {
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// Whether the peer has `gid` as its group or a supplementary group.
    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

/// Why a VM command failed, as vmctl reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CtlError {
    /// A system error number (EPERM, ENOENT, EALREADY, ...).
    Errno(i32),
    /// `stop` or `wait` of a VM that is not running.
    StopInvalid,
    BiosMissing,
    DiskMissing,
    CdromMissing,
    CdromInvalid,
    TemplateInvalid,
    /// A failure only words describe (the daemon's own message).
    Text(String),
    /// A system error number and the daemon's words for it (`vm not
    /// found`, `vm web is already paused`): what vmctl prints instead of
    /// the bare strerror.
    Explained {
        errno: i32,
        why: String,
    },
}

impl CtlError {
    pub fn errno(e: Errno) -> CtlError {
        CtlError::Errno(e as i32)
    }

    /// `errno` with the daemon's reason for it.
    pub fn explained(e: Errno, why: impl Into<String>) -> CtlError {
        CtlError::Explained {
            errno: e as i32,
            why: why.into(),
        }
    }

    /// `vm not found` (ENOENT), OpenBSD vmctl's own words for it.
    pub fn not_found() -> CtlError {
        CtlError::explained(Errno::ENOENT, "vm not found")
    }

    /// The system error number, bare or explained.
    pub fn errno_code(&self) -> Option<i32> {
        match self {
            CtlError::Errno(n) | CtlError::Explained { errno: n, .. } => Some(*n),
            _ => None,
        }
    }

    /// The daemon's reason, else strerror or the message for vmd's own
    /// codes.
    pub fn describe(&self) -> String {
        match self {
            CtlError::Errno(n) => Errno::from_raw(*n).desc().to_string(),
            CtlError::StopInvalid => "cannot stop vm that is not running".into(),
            CtlError::BiosMissing => "vmm bios firmware file not found.".into(),
            CtlError::DiskMissing => "could not open disk image(s)".into(),
            CtlError::CdromMissing => "could not find specified iso image".into(),
            CtlError::CdromInvalid => "specified iso image is not a regular file".into(),
            CtlError::TemplateInvalid => "invalid template".into(),
            CtlError::Text(text) => text.clone(),
            CtlError::Explained { why, .. } => why.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_and_permissions() {
        assert_eq!(VmTarget::parse("12"), VmTarget::Id(12));
        assert_eq!(VmTarget::parse("web"), VmTarget::Name("web".into()));
        assert!(VmTarget::parse("web").matches(3, "web"));
        assert!(!VmTarget::Id(3).matches(4, "web"));
        assert!(CtlRequest::Status.open_to_users());
        assert!(!CtlRequest::Reload.open_to_users());
        assert!(!CtlRequest::Verbose { level: 2 }.open_to_users());
        let creds = Credentials {
            pid: 1,
            uid: 1000,
            gid: 1000,
            groups: vec![27, 1000],
        };
        assert!(creds.in_group(27) && creds.in_group(1000) && !creds.in_group(0));
        assert_eq!(
            CtlError::Errno(libc::EPERM).describe(),
            "Operation not permitted"
        );
        let missing = CtlError::not_found();
        assert_eq!(missing.describe(), "vm not found");
        assert_eq!(missing.errno_code(), Some(libc::ENOENT));
        assert_eq!(CtlError::TemplateInvalid.errno_code(), None);
    }

    #[test]
    fn vmctl_waits_without_bound_only_when_asked_to_wait() {
        let x = || VmTarget::Name("x".into());
        assert_eq!(CtlRequest::Wait { target: x() }.answer_timeout(), None);
        let stop = |wait| CtlRequest::Stop {
            target: x(),
            force: false,
            wait,
        };
        assert_eq!(stop(true).answer_timeout(), None);
        assert_eq!(stop(false).answer_timeout(), Some(ANSWER_TIMEOUT));
        assert_eq!(CtlRequest::Status.answer_timeout(), Some(ANSWER_TIMEOUT));
        let start = CtlRequest::Start(Box::new(StartRequest {
            target: x(),
            vm: VmConfig::new("x"),
        }));
        assert_eq!(start.answer_timeout(), Some(START_ANSWER_TIMEOUT));
    }
}
