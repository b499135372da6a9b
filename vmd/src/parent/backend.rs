//! The VM backend, as the registry and the parent's loop see it: a
//! trait object the registry holds ([`Backend`]), and the neutral facts
//! it reports ([`VmEvent`]). The parent knows nothing else of how a
//! guest runs: launch.rs is the real backend (VM processes), the
//! registry's unit tests use a fake one.

use common::config::{Globals, SwitchConfig, VmConfig};
use common::ctl::CtlError;
use common::imsg::VmCommand;
use mio::Token;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What runs VMs. The registry starts, stops and commands VMs through
/// it; the parent's loop routes it its descriptors' events, the pids it
/// reaps and its timers, and hands what it reports back to the registry.
/// Nothing here may wait: a slow step is a pending state that ends in an
/// event.
pub trait Backend {
    /// Starts VM `id` with `vm`'s settings, opening its files as
    /// `requester`; its tty belongs to `tty_owner`. Err only for what can
    /// be told at once; the rest comes as [`VmEvent::Launched`] or
    /// [`VmEvent::Ended`] with its `launch_error`.
    fn start(
        &mut self,
        id: u32,
        vm: &VmConfig,
        globals: &Globals,
        requester: &Requester,
        tty_owner: u32,
    ) -> Result<(), CtlError>;
    /// The next start of VM `id` is `vmctl receive`'s, from `incoming`.
    fn set_incoming(&mut self, _id: u32, _incoming: Incoming) {}
    /// Ends VM `id` at once; false if it does not run. Its end comes as
    /// [`VmEvent::Ended`].
    fn force_stop(&mut self, id: u32) -> bool;
    /// Asks VM `id`'s guest to pause, unpause, power down, ... with the
    /// client's descriptor for a command that
    /// [`takes_fd`](VmCommand::takes_fd); false if it does not run. The
    /// answer comes as [`VmEvent::CommandDone`], after any number of
    /// [`VmEvent::CommandProgress`].
    fn command(&mut self, id: u32, command: VmCommand, fd: Option<OwnedFd>) -> bool;
    /// Releases what was kept of VM `id` for a restart that did not come.
    fn discard_parked(&mut self, id: u32);
    /// Removes the console log (and its rotated `.0`) of a VM that ended
    /// and is forgotten, unless a VM of the same name writes it again.
    /// Done by a helper: removing a file can wait on its file system.
    fn remove_console_log(&mut self, path: &Path);
    /// What `status` shows of a running VM.
    fn info(&self, id: u32) -> Option<RunInfo>;
    /// What `stats` shows of a running VM that the parent reads itself
    /// (procfs answers at once).
    fn usage(&self, _id: u32) -> Option<Usage> {
        None
    }
    /// Asks VM `id` for its backend's counters; false if it cannot
    /// answer. The answer comes as [`VmEvent::Stats`].
    fn query_stats(&mut self, _id: u32) -> bool {
        false
    }
    /// The configured switches, after a load or a reload; `reapply`
    /// (`vmctl reset switches`) applies every one again.
    fn set_switches(&mut self, _switches: &[SwitchConfig], _reapply: bool) {}

    // --- the parent's loop ---
    /// Whether an event of the loop's is the backend's.
    fn owns_token(&self, token: Token) -> bool;
    fn handle_event(&mut self, token: Token);
    /// A child the loop reaped that is none of its own.
    fn reaped(&mut self, pid: Pid, status: WaitStatus);
    /// When [`Backend::tick`] has something to do.
    fn next_deadline(&self) -> Option<Instant>;
    fn tick(&mut self);
    /// Brings what it reports up to date with what a client can see
    /// (done before every request).
    fn settle(&mut self);
    /// Whether a VM is ending (what `status` would show is about to
    /// change).
    fn is_ending(&self) -> bool;
    fn take_events(&mut self) -> Vec<VmEvent>;
    /// Nothing runs and nothing is pending.
    fn is_empty(&self) -> bool;
    /// The daemon stops (the registry has asked every VM to power down):
    /// starts not yet launched are given up, and what the daemon made on
    /// the host is removed once the last VM has ended.
    fn stop_all(&mut self);
    /// Every VM ends at once.
    fn kill_all(&mut self);
}

/// Who asked for the start, and the paths they named themselves: those
/// are opened with the requester's credentials (userfiles.rs); the rest
/// come from root's configuration (or root) and are opened as root where
/// root alone controls them, else with the VM owner's rights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requester {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub named: Vec<String>,
}

impl Requester {
    pub fn root() -> Requester {
        Requester {
            uid: 0,
            gid: 0,
            groups: Vec::new(),
            named: Vec::new(),
        }
    }

    /// Whether `path` is opened with the requester's rights.
    pub fn opens(&self, path: &str) -> bool {
        self.uid != 0 && self.named.iter().any(|p| p == path)
    }
}

/// What `status` shows of a running VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunInfo {
    pub pid: u32,
    pub tty: String,
    /// The guest processes' resident memory, once the guest runs.
    pub cur_memory: Option<u64>,
}

/// What `stats` shows of a running VM besides its backend's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// CPU time of the guest's processes (vCPUs and emulation).
    pub cpu_time_ms: Option<u64>,
    /// Its taps' counters, in the VM's interface order.
    pub nics: Vec<common::stats::NicStats>,
}

/// A VM process ended; everything it held is released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmEnded {
    pub id: u32,
    pub name: String,
    /// How the VM process ended, for the log.
    pub why: String,
    /// The guest's own shutdown (QMP SHUTDOWN reason), if it reported one.
    pub guest_reason: Option<String>,
    /// The guest never ran: why (the backend's first error line, the VM
    /// process's error, or how it ended).
    pub start_failure: Option<String>,
    /// It was never launched: the error vmctl is to be told.
    pub launch_error: Option<CtlError>,
    /// The console log it was given (it may exist even if the launch
    /// failed).
    pub console_log: Option<PathBuf>,
}

impl VmEnded {
    /// The guest reset itself (a reboot): the VM process ends, and vmd
    /// decides whether the VM starts again.
    pub fn is_reboot(&self) -> bool {
        self.guest_reason.as_deref() == Some("guest-reset")
    }
}

/// A VM process's answer to [`Backend::command`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandDone {
    pub id: u32,
    pub command: VmCommand,
    pub error: Option<String>,
}

/// What a VM process's channel brought, for the parent's loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// VM `id`'s guest runs: its backend accepted its arguments and the
    /// guest was resumed.
    Running {
        id: u32,
    },
    CommandDone(CommandDone),
    /// VM `id`'s start from a stream is under way (`note`: how far).
    StartProgress {
        id: u32,
        note: String,
    },
    /// VM `id`'s long command is under way (`note`: how far).
    CommandProgress {
        id: u32,
        command: VmCommand,
        note: String,
    },
    /// VM `id`'s files are open and its VM process runs.
    Launched {
        id: u32,
        pid: u32,
        tty: String,
    },
    /// VM `id` ended, or its start failed before it was launched.
    Ended(VmEnded),
    /// VM `id` was launched with local interfaces, configured and up: the
    /// DHCP server is to serve them.
    LocalInterfaces {
        id: u32,
        name: String,
        nics: Vec<LocalNic>,
        /// `boot device net`: the leases carry `auto_install`.
        net_boot: bool,
    },
    /// VM `id`'s taps are closed (it has ended, not for a reboot).
    InterfacesClosed {
        id: u32,
    },
    /// VM `id`'s answer to [`Backend::query_stats`].
    Stats {
        id: u32,
        stats: common::stats::BackendStats,
    },
}

/// A local interface of a launched VM: its index in the VM, its tap's
/// ifindex and the guest's MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalNic {
    pub index: u32,
    pub ifindex: u32,
    pub mac: [u8; 6],
}

/// `vmctl receive`: the stream's header bytes and vmctl's socket with the
/// rest, for the VM process of the VM's next start.
#[derive(Debug)]
pub struct Incoming {
    pub header: Vec<u8>,
    pub fd: OwnedFd,
}
