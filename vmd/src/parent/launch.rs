//! Launching VMs, the parent's side: everything the parent does so that
//! a VM process (vm/) can run a guest, and nothing about which VMs exist
//! (that is the registry's) or how the guest is run (that is the VM
//! process's backend; the parent passes its settings through, built by
//! vm/, and hears back neutral facts: the guest's process ids, how they
//! ended).
//!
//! Nothing here waits. The interface, for the registry:
//! - [`Launcher::start`] checks what it can at once and hands the rest to
//!   a forked helper (helper.rs): the VM's files (kernel or BIOS, initrd,
//!   disk chains, cdrom; a non-root requester's own paths with its
//!   rights, userfiles.rs), its disks' locks, its console log, the kvm
//!   and tty groups and the free uids of `uid range`. When the helper
//!   answers, the VM process is spawned with all that and a pty
//!   ([`VmEvent::Launched`]), or the start ends ([`VmEvent::Ended`] with
//!   [`VmEnded::launch_error`], the message for vmctl).
//! - The guest runs only once its backend accepted its arguments and the
//!   guest was resumed: [`VmEvent::Running`]; a VM that ends before that
//!   carries the reason in [`VmEnded::start_failure`].
//! - [`Launcher::force_stop`] kills a VM at once (or gives up its start);
//!   [`Launcher::command`] asks its guest to pause, unpause or power down
//!   (answered later, as [`VmEvent::CommandDone`]).
//! - [`Launcher::info`] is what `status` shows of a running VM.
//! - The parent's loop passes events on tokens [`Launcher::owns_token`]
//!   says are ours to [`Launcher::handle_event`], every pid it reaps that
//!   is not one of its own children to [`Launcher::reaped`], calls
//!   [`Launcher::tick`] for the timers ([`Launcher::next_deadline`]) and
//!   collects [`Launcher::take_events`]. A VM process that ended is
//!   reported once its guest's processes have gone too (its disks
//!   unlocked), or after GUEST_GONE_WAIT: its uid, disk locks, pty and
//!   console log are then released. After a guest reset the pty is kept
//!   instead, for the restart ([`Launcher::start`] takes it up;
//!   [`Launcher::discard_parked`] closes it when there is no restart).
//!
//! The pty's slave belongs to the user who started the VM while it runs
//! (mode 0620, or 0660 and the VM's owner group when it has one), so
//! that user and root may open it (`vmctl console`); it goes back to
//! root, mode 0600, when the VM ends.

use crate::log::{self, log_debug, log_info, log_warn};
use crate::parent::backend::{
    Backend, CommandDone, Incoming, LocalNic, Requester, RunInfo, Usage, VmEnded, VmEvent,
};
use crate::parent::helper::{self, Answered, Helper, HelperError};
use crate::parent::net::vhost::{vhost_open_all, VHOST_NET};
use crate::parent::net::{Net, NetStatus};
use crate::parent::uidlock::{UidLocks, UID_LOCK_DIR};
use crate::parent::userfiles::{self, Opened, UserFilesError, Want, OPEN_TIMEOUT};
use crate::proc;
use common::config::{Accel, BootDevice, Globals, UidRange, VmConfig};
use common::ctl::CtlError;
use common::imsg::{
    Channel, FileRefusal, Frame, HelperAnswer, Message, RefusalReason, Role, VmCommand, VmFdKind,
    VmParams,
};
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::WaitStatus;
use nix::unistd::{Gid, Group, Pid, Uid, User};
use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use thiserror::Error;

/// Tokens from here up are the launcher's: VM processes' channels (base
/// + VM id, any u32), then from HELPER_TOKEN_BASE its helpers' sockets.
pub const VM_TOKEN_BASE: usize = 1 << 24;
const HELPER_TOKEN_BASE: usize = VM_TOKEN_BASE + u32::MAX as usize + 1;
/// The netlink socket's token (net/).
const NET_TOKEN: Token = Token(VM_TOKEN_BASE - 1);
/// nft's helper (net/nft.rs, locked lladdr).
const NFT_TOKEN: Token = Token(VM_TOKEN_BASE - 2);
/// How long a start's helper has for everything: its own user helpers
/// share OPEN_TIMEOUT of it, so their time-out is what vmctl reads.
pub const FILES_TIMEOUT: Duration = Duration::from_secs(OPEN_TIMEOUT.as_secs() + 2);
/// At most this many processes of a guest are believed (the VM process
/// names them).
const MAX_GUEST_PIDS: usize = 16;
/// The longest progress note of a VM process passed on to vmctl.
const MAX_NOTE: usize = 200;
/// How often a reaped VM's guest processes are looked for while they exit.
const GONE_POLL: Duration = Duration::from_millis(10);
/// How long a reaped VM's guest processes have to disappear before the
/// VM is reported stopped (so its disks are unlocked by then); one still
/// there after that keeps its uid from being reused until it is gone.
const GUEST_GONE_WAIT: Duration = Duration::from_secs(2);
/// The BIOS of VMs that boot without a kernel (Debian `seabios`).
pub const BIOS_PATH: &str = "/usr/share/seabios/bios.bin";

/// A rebooting VM's pty, between its VM processes.
struct ParkedPty {
    id: u32,
    master: OwnedFd,
    slave: OwnedFd,
    tty: String,
}

#[derive(Debug, Error)]
pub enum StartError {
    #[error("vm {0} is already running")]
    AlreadyRunning(u32),
    /// What the VM's backend cannot run yet (backend kvm), in words.
    #[error("{0}")]
    Unsupported(String),
    #[error("boot device net needs a local interface (-L or `local interface`), whose DHCP lease names auto_install")]
    NetBootWithoutLocal,
    #[error("vmm bios firmware file not found.")]
    BiosMissing,
    #[error("could not find specified iso image")]
    CdromMissing,
    #[error("specified iso image is not a regular file")]
    CdromInvalid,
    #[error("{0}: permission denied")]
    PermissionDenied(String),
    #[error("could not open kernel {path}: {why}")]
    Kernel { path: String, why: String },
    #[error("could not open initrd {path}: {why}")]
    Initrd { path: String, why: String },
    #[error("could not open disk image(s): {0}")]
    Disk(String),
    #[error("could not open iso image {path}: {why}")]
    Cdrom { path: String, why: String },
    #[error("{0}")]
    UserFiles(UserFilesError),
    #[error("could not open disk image(s): {0} is in use by another VM")]
    DiskInUse(String),
    #[error("cannot reserve a uid for the VM: {0}")]
    UidLock(String),
    #[error("no free uid in uid range {first}-{last}: stop a VM or widen `uid range` in vm.conf")]
    NoUid { first: u32, last: u32 },
    #[error("accel kvm: {0}")]
    Kvm(KvmMissing),
    #[error("backend kvm: cannot open /dev/kvm: {0}")]
    KvmDevice(String),
    #[error("{what} {path} is larger than {limit}, the most vmd loads")]
    TooLarge {
        what: &'static str,
        path: String,
        limit: String,
    },
    #[error("cannot open a pty: {0}")]
    Pty(Errno),
    #[error("cannot open console log {path}: {why}")]
    ConsoleLog { path: String, why: ConsoleLogError },
    #[error("cannot start the VM process: {0}")]
    Spawn(String),
    #[error("opening the VM's files: {0}")]
    Helper(HelperError),
    #[error("{0}")]
    Net(String),
}

impl StartError {
    /// As vmctl reports it: vmd's own codes where OpenBSD has one.
    pub fn to_ctl(&self) -> CtlError {
        match self {
            StartError::BiosMissing => CtlError::BiosMissing,
            StartError::CdromMissing => CtlError::CdromMissing,
            StartError::CdromInvalid => CtlError::CdromInvalid,
            StartError::Helper(e @ HelperError::Refused(_)) => e.to_ctl(),
            other => CtlError::Text(other.to_string()),
        }
    }

    /// A file the helper (or root) could not open, as the error for the
    /// kind of file it is.
    fn from_refusal(r: FileRefusal) -> StartError {
        let text = userfiles::refusal_text(&r);
        let why = match &r.why {
            RefusalReason::PermissionDenied => return StartError::PermissionDenied(r.path),
            RefusalReason::Missing => "No such file or directory".to_string(),
            RefusalReason::NotRegular => "not a regular file".to_string(),
            RefusalReason::Other(why) => why.clone(),
        };
        match (r.kind, &r.why) {
            (VmFdKind::Cdrom, RefusalReason::Missing) => StartError::CdromMissing,
            (VmFdKind::Cdrom, RefusalReason::NotRegular) => StartError::CdromInvalid,
            (VmFdKind::Cdrom, _) => StartError::Cdrom { path: r.path, why },
            (VmFdKind::Kernel, _) => StartError::Kernel { path: r.path, why },
            (VmFdKind::Initrd, _) => StartError::Initrd { path: r.path, why },
            _ => StartError::Disk(text),
        }
    }
}

impl From<UserFilesError> for StartError {
    fn from(e: UserFilesError) -> StartError {
        match e {
            UserFilesError::Refused(r) => StartError::from_refusal(r),
            other => StartError::UserFiles(other),
        }
    }
}

struct VmProc {
    id: u32,
    name: String,
    pid: Pid,
    token: Token,
    channel: Option<Channel>,
    uid: u32,
    tty: String,
    /// The processes that run the guest, as the VM process said.
    guest_pids: Vec<u32>,
    console_log: PathBuf,
    console_log_cap: u64,
    guest_reason: Option<String>,
    /// How the guest's processes ended, as the VM process reported it.
    guest_end: Option<String>,
    /// Why the guest could not start, as the VM process reported it.
    start_failed: Option<String>,
    /// The pty's master and slave: kept here so that a reboot restarts
    /// the VM on the same tty, and so that the slave goes back to root
    /// when the VM ends.
    pty_master: OwnedFd,
    pty_slave: OwnedFd,
}

/// A start whose files a helper is opening.
struct PendingStart {
    id: u32,
    vm: VmConfig,
    tty_owner: u32,
    console_log: PathBuf,
    console_log_cap: u64,
    uid_range: UidRange,
    /// The pty of the run before a reboot, taken up by this start.
    parked: Option<ParkedPty>,
    helper: Helper,
}

/// A start whose files are open, waiting for its interfaces' netlink
/// steps (net/), until `until`: its helper's deadline, so the start
/// still ends within FILES_TIMEOUT (the kernel answers at once; this
/// only bounds a bug).
struct NetWait {
    pending: PendingStart,
    files: Vec<Opened>,
    answer: HelperAnswer,
    until: Instant,
}

/// A console log a helper is rotating for VM `id`.
struct PendingLog {
    id: u32,
    helper: Helper,
}

/// A console log (and its `.0`) a helper is removing.
struct PendingRemoval {
    path: PathBuf,
    helper: Helper,
}

/// A VM whose process was reaped while its guest process was still
/// exiting: reported once that has gone (its disks unlocked) or at
/// `until`.
struct Ending {
    ended: VmEnded,
    /// Its guest's processes that still held files.
    pids: Vec<u32>,
    uid: u32,
    until: Instant,
}

pub struct Launcher {
    registry: Registry,
    vms: Vec<VmProc>,
    parked: Vec<ParkedPty>,
    pending: Vec<PendingStart>,
    net_wait: Vec<NetWait>,
    /// The VMs' taps, the switches' bridges, netlink.
    net: Net,
    logs: Vec<PendingLog>,
    removals: Vec<PendingRemoval>,
    ending: Vec<Ending>,
    /// (uid, pid) of guest processes of ended VMs that had not exited yet: their
    /// uids are not given to another VM until they have.
    lingering: Vec<(u32, u32)>,
    /// The uids taken (running, ending, lingering), locked host-wide so
    /// that no other vmd gives them to a VM.
    uid_locks: UidLocks,
    /// Events for the parent's loop to collect.
    events: Vec<VmEvent>,
    next_helper: usize,
    /// `vmctl receive`'s streams, by the VM they start (until its VM
    /// process gets it, or its start ends).
    incoming: Vec<(u32, Incoming)>,
}

impl Launcher {
    /// `registry` is the parent loop's (a clone), for the VM channels,
    /// the helpers' sockets and netlink; `socket` is the control
    /// socket's path, which names the state file (net/state.rs).
    pub fn new(registry: Registry, socket: &Path) -> Launcher {
        let net = Net::new(
            &registry,
            NET_TOKEN,
            NFT_TOKEN,
            socket,
            Path::new(crate::parent::net::state::STATE_DIR),
        );
        Launcher {
            registry,
            vms: Vec::new(),
            parked: Vec::new(),
            pending: Vec::new(),
            net_wait: Vec::new(),
            net,
            logs: Vec::new(),
            removals: Vec::new(),
            ending: Vec::new(),
            lingering: Vec::new(),
            uid_locks: UidLocks::new(Path::new(UID_LOCK_DIR)),
            events: Vec::new(),
            next_helper: HELPER_TOKEN_BASE,
            incoming: Vec::new(),
        }
    }

    fn is_empty(&self) -> bool {
        self.vms.is_empty()
            && self.pending.is_empty()
            && self.net_wait.is_empty()
            && self.ending.is_empty()
            && self.net.is_idle()
    }

    /// Whether VM `id` runs or is starting.
    fn is_active(&self, id: u32) -> bool {
        self.vms.iter().any(|v| v.id == id)
            || self.pending.iter().any(|p| p.id == id)
            || self.net_wait.iter().any(|w| w.pending.id == id)
    }

    /// The configured switches (after a load, a reload, `reset
    /// switches`).
    fn set_switches(&mut self, switches: &[common::config::SwitchConfig], reapply: bool) {
        self.net.set_switches(switches, reapply);
    }

    fn helper_token(&mut self) -> Token {
        let token = Token(self.next_helper);
        self.next_helper = self.next_helper.checked_add(1).unwrap_or(HELPER_TOKEN_BASE);
        token
    }

    /// Starts VM `id` as configured in `vm` (kernel, initrd, cmdline,
    /// disks, memory, vcpus, accel), opening its files as `requester`;
    /// its tty belongs to `tty_owner` (and to the VM's owner group).
    /// What can wait (opening files, looking up users and groups) is a
    /// helper's: the launch follows its answer, reported as
    /// [`VmEvent::Launched`], or as [`VmEvent::Ended`] with the reason.
    fn start(
        &mut self,
        id: u32,
        vm: &VmConfig,
        globals: &Globals,
        requester: &Requester,
        tty_owner: u32,
    ) -> Result<(), StartError> {
        if self.is_active(id) {
            return Err(StartError::AlreadyRunning(id));
        }
        launch_check_built(vm)?;
        let accel = launch_accel(vm.accel_or(globals))?;
        // Its taps now (a restart after a reboot finds them made); their
        // netlink steps run while the helper opens the files.
        self.net
            .vm_start(id, vm, globals)
            .map_err(|e| StartError::Net(format!("vm {}: {e}", vm.name)))?;
        let console_log = Path::new(&globals.console_log_dir).join(format!("{}.console", vm.name));
        let taken = self.taken_uids();
        let range = globals.uid_range;
        let token = self.helper_token();
        // A received VM locks its disks once its stream is whole (the
        // sender on this host may hold them until then).
        let lock_disks = !self.incoming.iter().any(|(i, _)| *i == id);
        let helper = {
            let (vm, requester, console_log) = (vm.clone(), requester.clone(), console_log.clone());
            Helper::spawn(&self.registry, token, FILES_TIMEOUT, move || {
                let log = &console_log;
                launch_files_work(&vm, &requester, accel, range, &taken, log, lock_disks)
            })
            .map_err(|e| {
                self.net.vm_release(id);
                StartError::Helper(e)
            })?
        };
        log_debug!(
            "vm {} (vm {id}): opening its files (helper {})",
            vm.name,
            helper.pid()
        );
        let parked = self.take_parked(id);
        self.pending.push(PendingStart {
            id,
            vm: vm.clone(),
            tty_owner,
            console_log,
            console_log_cap: globals.console_log_size,
            uid_range: range,
            parked,
            helper,
        });
        Ok(())
    }

    /// A start's helper is done: the VM process is launched with its
    /// files, or the start has failed.
    fn start_answered(
        &mut self,
        mut pending: PendingStart,
        outcome: Result<Answered, HelperError>,
    ) {
        let (files, answer) = match outcome {
            Ok(answered) => answered,
            Err(e) => return self.start_launched(pending, Err(StartError::Helper(e))),
        };
        match self.net.vm_status(pending.id) {
            Some(NetStatus::Pending) => self.net_wait.push(NetWait {
                until: pending.helper.deadline(),
                pending,
                files,
                answer,
            }),
            Some(NetStatus::Failed(why)) => {
                let why = format!("vm {}: {why}", pending.vm.name);
                self.start_launched(pending, Err(StartError::Net(why)))
            }
            Some(NetStatus::Ready) | None => {
                let launched = self.launch(&mut pending, files, answer);
                self.start_launched(pending, launched)
            }
        }
    }

    /// The starts waiting for their interfaces whose netlink steps are
    /// done (or failed, or took too long) go on.
    fn net_wait_check(&mut self) {
        let now = Instant::now();
        let mut index = 0;
        while index < self.net_wait.len() {
            let status = self.net.vm_status(self.net_wait[index].pending.id);
            if status == Some(NetStatus::Pending) && self.net_wait[index].until > now {
                index += 1;
                continue;
            }
            let NetWait {
                mut pending,
                files,
                answer,
                ..
            } = self.net_wait.remove(index);
            let name = pending.vm.name.clone();
            let launched = match status {
                Some(NetStatus::Pending) => Err(StartError::Net(format!(
                    "vm {name}: its interfaces were not configured in time"
                ))),
                Some(NetStatus::Failed(why)) => Err(StartError::Net(format!("vm {name}: {why}"))),
                Some(NetStatus::Ready) | None => self.launch(&mut pending, files, answer),
            };
            self.start_launched(pending, launched);
        }
    }

    /// A start launched its VM process, or failed (what it made is
    /// released: its pty, its taps).
    fn start_launched(
        &mut self,
        mut pending: PendingStart,
        launched: Result<(u32, String), StartError>,
    ) {
        let id = pending.id;
        let name = pending.vm.name.clone();
        match launched {
            Ok((pid, tty)) => {
                self.events.push(VmEvent::Launched { id, pid, tty });
                let interfaces = pending.vm.effective_interfaces();
                let nics: Vec<LocalNic> = self
                    .net
                    .vm_local_taps(id)
                    .into_iter()
                    .map(|(index, ifindex)| LocalNic {
                        index: index as u32,
                        ifindex,
                        mac: interfaces
                            .get(index)
                            .and_then(|i| i.lladdr)
                            .unwrap_or_default(),
                    })
                    .collect();
                if !nics.is_empty() {
                    self.events.push(VmEvent::LocalInterfaces {
                        id,
                        name,
                        nics,
                        net_boot: pending.vm.boot_device == Some(BootDevice::Net),
                    });
                }
            }
            Err(e) => {
                log_debug!("vm {name} (vm {id}): not launched: {e}");
                // A reboot's pty not taken up goes back to root.
                if let Some(parked) = pending.parked.take() {
                    release_pty(&parked.slave, &parked.tty);
                }
                self.net.vm_release(id);
                self.events.push(VmEvent::Ended(VmEnded {
                    id,
                    name,
                    why: e.to_string(),
                    guest_reason: None,
                    start_failure: Some(e.to_string()),
                    launch_error: Some(e.to_ctl()),
                    console_log: Some(pending.console_log.clone()),
                }));
            }
        }
    }

    /// Launches a VM process with the files its helper opened: a uid, the
    /// pty, and everything sent to the VM process. Nothing here waits.
    fn launch(
        &mut self,
        pending: &mut PendingStart,
        files: Vec<Opened>,
        answer: HelperAnswer,
    ) -> Result<(u32, String), StartError> {
        let HelperAnswer::Start {
            kvm,
            groups,
            tty_gid,
            free_uids,
            console_log_size,
        } = answer
        else {
            return Err(StartError::Helper(HelperError::Garbled(
                "not the answer to a start".into(),
            )));
        };
        let (id, vm) = (pending.id, &pending.vm);
        let taken = self.taken_uids();
        let mut uid = None;
        for candidate in free_uids.into_iter().filter(|u| !taken.contains(u)) {
            // Another vmd may hold it (same `uid range`): the next one.
            if self
                .uid_locks
                .take(candidate)
                .map_err(StartError::UidLock)?
            {
                uid = Some(candidate);
                break;
            }
        }
        let uid = uid.ok_or(StartError::NoUid {
            first: pending.uid_range.first,
            last: pending.uid_range.last,
        })?;
        let pty = match pending.parked.take() {
            Some(parked) => reuse_pty(parked, pending.tty_owner, vm.owner.gid, tty_gid),
            None => open_pty(pending.tty_owner, vm.owner.gid, tty_gid),
        };
        let (master, slave, tty) = pty.map_err(StartError::Pty)?;
        let pty_master = master
            .try_clone()
            .map_err(|e| StartError::Pty(errno_of(&e)))?;
        let pty_slave = slave
            .try_clone()
            .map_err(|e| StartError::Pty(errno_of(&e)))?;
        let release = |e: StartError| {
            release_pty(&pty_slave, &tty);
            e
        };
        let (logs, files): (Vec<Opened>, Vec<Opened>) = files
            .into_iter()
            .partition(|o| o.kind == VmFdKind::ConsoleLog);
        let mut fds: Vec<(VmFdKind, OwnedFd)> =
            files.into_iter().map(|o| (o.kind, o.file.into())).collect();
        fds.push((VmFdKind::PtyMaster, master));
        fds.push((VmFdKind::PtySlave, slave));
        let taps = self
            .net
            .vm_taps(id)
            .map_err(|e| release(StartError::Net(e)))?;
        fds.extend(
            taps.into_iter()
                .map(|(index, fd)| (VmFdKind::Tap { index }, fd)),
        );
        fds.extend(logs.into_iter().map(|o| (o.kind, o.file.into())));
        let incoming = self
            .incoming
            .iter()
            .position(|(i, _)| *i == id)
            .map(|at| self.incoming.remove(at).1);
        let incoming = incoming.map(|incoming| {
            fds.push((VmFdKind::Stream, incoming.fd));
            incoming.header
        });
        let params = VmParams {
            id,
            name: vm.name.clone(),
            memory: vm.memory_bytes(),
            vcpus: vm.vcpu_count(),
            uid,
            gid: uid,
            backend: crate::vm::backend_params(vm, kvm, groups),
            console_log_cap: pending.console_log_cap,
            console_log_size,
            macs: vm
                .effective_interfaces()
                .iter()
                .map(|i| i.lladdr.unwrap_or_default())
                .collect(),
            incoming,
            fd_count: fds.len() as u32,
        };

        let mut args = vec!["-P".to_string(), Role::Vm.name().to_string()];
        args.extend((0..log::verbosity()).map(|_| "-v".to_string()));
        args.extend(["-N".to_string(), vm.name.clone()]);
        let (pid, sock) = proc::spawn(Role::Vm.name(), &args)
            .map_err(|e| release(StartError::Spawn(e.to_string())))?;
        let token = Token(VM_TOKEN_BASE + id as usize);
        let mut channel = Channel::new(sock);
        let sent = channel
            .writer
            .push(Frame::new(Message::VmStart {
                params: Box::new(params),
            }))
            .and_then(|()| {
                for (kind, fd) in fds {
                    let mut frame = Frame::new(Message::VmFd { kind });
                    frame.fd = Some(fd);
                    channel.writer.push(frame)?;
                }
                channel.flush()
            })
            .map_err(|e| e.to_string())
            .and_then(|_| {
                self.registry
                    .register(
                        &mut SourceFd(&channel.sock.as_raw_fd()),
                        token,
                        Interest::READABLE | Interest::WRITABLE,
                    )
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = sent {
            let _ = kill(pid, Signal::SIGKILL);
            // The parent's reaping collects it; nothing else refers to it.
            return Err(release(StartError::Spawn(e)));
        }
        log_debug!(
            "vm {} (vm {id}): VM process {pid}, tty {tty}, uid {uid}{}",
            vm.name,
            if kvm { ", kvm" } else { ", tcg" }
        );
        self.vms.push(VmProc {
            id,
            name: vm.name.clone(),
            pid,
            token,
            channel: Some(channel),
            uid,
            tty: tty.clone(),
            guest_pids: Vec::new(),
            console_log: pending.console_log.clone(),
            console_log_cap: pending.console_log_cap,
            guest_reason: None,
            guest_end: None,
            start_failed: None,
            pty_master,
            pty_slave,
        });
        Ok((pid.as_raw() as u32, tty))
    }

    /// Gives up VM `id`'s start while its files are being opened: the
    /// helper is killed and the start ends; false if none is pending.
    fn cancel_start(&mut self, id: u32) -> bool {
        let mut pending = if let Some(index) = self.pending.iter().position(|p| p.id == id) {
            let mut pending = self.pending.remove(index);
            pending.helper.cancel(&self.registry);
            pending
        } else if let Some(index) = self.net_wait.iter().position(|w| w.pending.id == id) {
            self.net_wait.remove(index).pending
        } else {
            return false;
        };
        self.net.vm_release(id);
        if let Some(parked) = pending.parked.take() {
            release_pty(&parked.slave, &parked.tty);
        }
        let why = "stopped while its files were being opened".to_string();
        log_info!("vm {} (vm {id}): {why}", pending.vm.name);
        self.events.push(VmEvent::Ended(VmEnded {
            id,
            name: pending.vm.name.clone(),
            why: why.clone(),
            guest_reason: None,
            start_failure: Some(why),
            launch_error: None,
            console_log: Some(pending.console_log.clone()),
        }));
        true
    }

    /// Ends VM `id` at once (its VM process and guest, or the helper
    /// opening its files); false if it does not run. Its end is reported
    /// as [`VmEvent::Ended`].
    fn force_stop(&mut self, id: u32) -> bool {
        if self.cancel_start(id) {
            return true;
        }
        let Some(vm) = self.vms.iter().find(|v| v.id == id) else {
            return false;
        };
        kill_vm(vm);
        true
    }

    /// Asks VM `id`'s guest to pause, unpause, power down, ... (with the
    /// client's descriptor, made non-blocking so that the VM process's
    /// loop never waits on it); false if it does not run. The answer comes
    /// as a [`VmEvent::CommandDone`]. A start still opening its files is
    /// powered down by giving it up.
    fn command(&mut self, id: u32, command: VmCommand, fd: Option<OwnedFd>) -> bool {
        if command == VmCommand::Powerdown && self.cancel_start(id) {
            return true;
        }
        let Some(vm) = self.vms.iter_mut().find(|v| v.id == id) else {
            return false;
        };
        let Some(channel) = vm.channel.as_mut() else {
            return false;
        };
        let name = command.name();
        if let Some(fd) = &fd {
            if let Err(e) = set_nonblocking(fd.as_fd()) {
                log_warn!("vm {}: {name}: the client's descriptor: {e}", vm.name);
                return false;
            }
        }
        let frame = Frame {
            fd,
            ..Frame::new(Message::VmCommand { command })
        };
        match channel.send(frame) {
            Ok(_) => true,
            Err(e) => {
                log_warn!("vm {}: sending {name}: {e}", vm.name);
                false
            }
        }
    }

    fn take_parked(&mut self, id: u32) -> Option<ParkedPty> {
        let index = self.parked.iter().position(|p| p.id == id)?;
        Some(self.parked.remove(index))
    }

    /// Closes the pty and the taps kept for VM `id`'s restart, if it was
    /// not taken up.
    fn discard_parked(&mut self, id: u32) {
        if let Some(parked) = self.take_parked(id) {
            release_pty(&parked.slave, &parked.tty);
            log_debug!("vm {id}: released {}", parked.tty);
        }
        if !self.is_active(id) {
            self.net.vm_release(id);
        }
    }

    /// PID, TTY and CURMEM of a running VM.
    fn info(&self, id: u32) -> Option<RunInfo> {
        let vm = self.vms.iter().find(|v| v.id == id)?;
        Some(RunInfo {
            pid: vm.pid.as_raw() as u32,
            tty: vm.tty.clone(),
            cur_memory: guest_memory(&vm.guest_pids, vm.uid),
        })
    }

    /// The CPU time of a running VM's guest processes and its taps'
    /// counters (from /proc/net/dev: procfs answers at once, and reads
    /// the network namespace vmd runs in).
    fn usage(&self, id: u32) -> Option<Usage> {
        let vm = self.vms.iter().find(|v| v.id == id)?;
        let cpu_time_ms = vm
            .guest_pids
            .iter()
            .filter_map(|&pid| process_cpu_ms(pid, vm.uid))
            .reduce(|a, b| a + b);
        let taps = self.net.vm_tap_names(id);
        let counters = match taps.is_empty() {
            true => Vec::new(),
            false => std::fs::read_to_string("/proc/net/dev")
                .map(|text| common::stats::parse_net_dev(&text))
                .unwrap_or_default(),
        };
        let nics = taps
            .iter()
            .map(|tap| {
                let host = counters
                    .iter()
                    .find(|(name, _)| name == tap)
                    .map_or([0; 6], |(_, host)| *host);
                common::stats::nic_from_tap(tap, host)
            })
            .collect();
        Some(Usage { cpu_time_ms, nics })
    }

    /// Asks VM `id`'s process for its backend's counters.
    fn query_stats(&mut self, id: u32) -> bool {
        let Some(vm) = self.vms.iter_mut().find(|v| v.id == id) else {
            return false;
        };
        let Some(channel) = vm.channel.as_mut() else {
            return false;
        };
        match channel.send(Frame::new(Message::VmStatsQuery)) {
            Ok(_) => true,
            Err(e) => {
                log_warn!("vm {}: asking for its counters: {e}", vm.name);
                false
            }
        }
    }

    /// The daemon stops (the registry has asked every VM to power down):
    /// starts still opening their files are given up, and the network
    /// is removed once the last VM has ended.
    fn stop_all(&mut self) {
        self.cancel_all();
        self.net.stop();
    }

    /// The daemon stops and a VM did not: SIGKILL.
    fn kill_all(&mut self) {
        self.cancel_all();
        self.vms.iter().for_each(kill_vm);
    }

    fn cancel_all(&mut self) {
        let ids: Vec<u32> = (self.pending.iter().map(|p| p.id))
            .chain(self.net_wait.iter().map(|w| w.pending.id))
            .collect();
        for id in ids {
            self.cancel_start(id);
        }
        for job in &mut self.logs {
            job.helper.cancel(&self.registry);
        }
        self.logs.clear();
        for job in &mut self.removals {
            job.helper.cancel(&self.registry);
        }
        self.removals.clear();
    }

    /// When [`Launcher::tick`] has something to do next.
    fn next_deadline(&self) -> Option<Instant> {
        let helpers = self
            .pending
            .iter()
            .map(|p| p.helper.deadline())
            .chain(self.logs.iter().map(|l| l.helper.deadline()))
            .chain(self.removals.iter().map(|r| r.helper.deadline()));
        // A VM whose guest process is still exiting is looked at again soon.
        let poll = Instant::now() + GONE_POLL;
        let ending = self.ending.iter().map(|e| e.until.min(poll));
        let net = self.net_wait.iter().map(|w| w.until);
        let nft = self.net.nft_deadline();
        helpers.chain(ending).chain(net).chain(nft).min()
    }

    /// Times out the helpers whose deadline passed, and reports the VMs
    /// whose guest process has gone (or that waited long enough).
    fn tick(&mut self) {
        let now = Instant::now();
        while let Some(index) = self.pending.iter().position(|p| p.helper.deadline() <= now) {
            let mut pending = self.pending.remove(index);
            let e = pending.helper.expire(&self.registry);
            log_warn!(
                "vm {} (vm {}): opening its files: {e}",
                pending.vm.name,
                pending.id
            );
            self.start_answered(pending, Err(e));
        }
        while let Some(index) = self.logs.iter().position(|l| l.helper.deadline() <= now) {
            let mut job = self.logs.remove(index);
            let e = job.helper.expire(&self.registry);
            log_warn!("vm {}: rotating its console log: {e}", job.id);
        }
        while let Some(index) = self
            .removals
            .iter()
            .position(|r| r.helper.deadline() <= now)
        {
            let mut job = self.removals.remove(index);
            let e = job.helper.expire(&self.registry);
            log_warn!("removing {}: {e}", job.path.display());
        }
        self.net.nft_tick();
        self.net_wait_check();
        self.settle_ending(now);
    }

    /// Reports the VMs whose guest processes have gone since, or that waited long
    /// enough (done before every request, so that what vmctl is told
    /// follows what it can see in /proc).
    fn settle_ending(&mut self, now: Instant) {
        if self.ending.is_empty() {
            return;
        }
        for e in &mut self.ending {
            let uid = e.uid;
            e.pids.retain(|&pid| holds_files(pid, uid));
        }
        let (gone, ending): (Vec<Ending>, Vec<Ending>) = std::mem::take(&mut self.ending)
            .into_iter()
            .partition(|e| e.pids.is_empty() || e.until <= now);
        self.ending = ending;
        for e in gone {
            for pid in e.pids {
                log_warn!(
                    "vm {}: its guest's process {pid} is still exiting; uid {} stays reserved",
                    e.ended.name,
                    e.uid
                );
                self.lingering.push((e.uid, pid));
            }
            self.events.push(VmEvent::Ended(e.ended));
        }
    }

    /// Reads a VM process's channel or a helper's socket.
    fn handle_event(&mut self, token: Token) {
        if token == self.net.token() {
            self.net.handle_event();
            self.net_wait_check();
            return;
        }
        if token == NFT_TOKEN {
            self.net.nft_event();
            self.net_wait_check();
            return;
        }
        if let Some(index) = self.pending.iter().position(|p| p.helper.token() == token) {
            if let Some(outcome) = self.pending[index].helper.read(&self.registry) {
                let pending = self.pending.remove(index);
                self.start_answered(pending, outcome);
            }
            return;
        }
        if let Some(index) = self.logs.iter().position(|l| l.helper.token() == token) {
            if let Some(outcome) = self.logs[index].helper.read(&self.registry) {
                let job = self.logs.remove(index);
                self.log_answered(job.id, outcome);
            }
            return;
        }
        if let Some(index) = self.removals.iter().position(|r| r.helper.token() == token) {
            if let Some(outcome) = self.removals[index].helper.read(&self.registry) {
                let job = self.removals.remove(index);
                removal_answered(&job.path, outcome);
            }
            return;
        }
        let Some(index) = self.vms.iter().position(|v| v.token == token) else {
            return;
        };
        self.handle_channel(index);
    }

    fn handle_channel(&mut self, index: usize) {
        let Some(channel) = self.vms[index].channel.as_mut() else {
            return;
        };
        let (frames, eof) = match channel.flush().and_then(|_| channel.receive()) {
            Ok(received) => received,
            Err(e) => {
                log_warn!("vm {}: closing its channel: {e}", self.vms[index].name);
                self.close_channel(index);
                let _ = kill(self.vms[index].pid, Signal::SIGKILL);
                return;
            }
        };
        for frame in frames {
            self.dispatch(index, frame);
        }
        if eof {
            self.close_channel(index);
        }
    }

    fn close_channel(&mut self, index: usize) {
        if let Some(channel) = self.vms[index].channel.take() {
            let _ = self
                .registry
                .deregister(&mut SourceFd(&channel.sock.as_raw_fd()));
        }
    }

    fn dispatch(&mut self, index: usize, frame: Frame) {
        let vm = &mut self.vms[index];
        let name = vm.name.clone();
        match frame.message {
            Message::Ready { role: Role::Vm } => log_debug!("vm {name} (pid {}) ready", vm.pid),
            Message::Log { level, text } => log::write_line(level, &format!("vm {name}: {text}")),
            Message::RefusedSyscall { nr, name: call } => {
                log_warn!("vm {name}: refused system call {call} ({nr})")
            }
            Message::VmRunning { pids } => {
                log_debug!("vm {name}: the guest runs (pids {pids:?})");
                vm.guest_pids = pids.into_iter().take(MAX_GUEST_PIDS).collect();
                let id = vm.id;
                self.events.push(VmEvent::Running { id });
            }
            Message::VmShutdown { reason } => vm.guest_reason = Some(reason),
            Message::VmStartProgress { note } => {
                let id = vm.id;
                let note: String = note.chars().take(MAX_NOTE).collect();
                self.events.push(VmEvent::StartProgress { id, note })
            }
            Message::VmCommandProgress { command, note } => {
                let id = vm.id;
                let note: String = note.chars().take(MAX_NOTE).collect();
                self.events
                    .push(VmEvent::CommandProgress { id, command, note })
            }
            Message::VmCommandDone { command, error } => {
                let id = vm.id;
                self.events
                    .push(VmEvent::CommandDone(CommandDone { id, command, error }))
            }
            Message::VmGuestEnded { why } => vm.guest_end = Some(why),
            Message::VmStats(stats) => {
                let id = vm.id;
                self.events.push(VmEvent::Stats { id, stats });
            }
            Message::VmStartFailed { reason } => {
                // The VM process is less trusted than we are: its text
                // reaches the user bounded and on one line.
                let reason = crate::vm::start_reason(&reason);
                log_warn!("vm {name}: the guest did not start: {reason}");
                vm.start_failed = Some(reason);
            }
            Message::VmConsoleLogFull => self.rotate_console_log(index),
            other => log_warn!("vm {name}: unexpected message {}", other.type_code().1),
        }
    }

    /// Has a helper rotate a VM's console log if it really reached its
    /// cap (one old copy, NAME.console.0) and open it again; the VM
    /// process gets the file when the helper answers.
    fn rotate_console_log(&mut self, index: usize) {
        let (id, path, cap) = {
            let vm = &self.vms[index];
            (vm.id, vm.console_log.clone(), vm.console_log_cap)
        };
        if self.logs.iter().any(|l| l.id == id) {
            return;
        }
        let token = self.helper_token();
        match Helper::spawn(&self.registry, token, FILES_TIMEOUT, move || {
            rotate_console_log_work(&path, cap)
        }) {
            Ok(helper) => self.logs.push(PendingLog { id, helper }),
            Err(e) => log_warn!(
                "vm {}: cannot rotate its console log: {e}",
                self.vms[index].name
            ),
        }
    }

    /// Has a helper remove an ended VM's console log and its `.0`
    /// ([`remove_console_log_work`]).
    fn remove_console_log(&mut self, path: &Path) {
        let token = self.helper_token();
        let work_path = path.to_path_buf();
        match Helper::spawn(&self.registry, token, FILES_TIMEOUT, move || {
            remove_console_log_work(&work_path)
        }) {
            Ok(helper) => self.removals.push(PendingRemoval {
                path: path.to_path_buf(),
                helper,
            }),
            Err(e) => log_warn!("cannot remove {}: {e}", path.display()),
        }
    }

    /// A console log helper answered: the VM process gets the new file.
    fn log_answered(&mut self, id: u32, outcome: Result<Answered, HelperError>) {
        let Some(vm) = self.vms.iter_mut().find(|v| v.id == id) else {
            return;
        };
        let (file, size) = match outcome {
            Ok((mut files, HelperAnswer::ConsoleLog { size })) if files.len() == 1 => {
                (files.remove(0).file, size)
            }
            Ok(_) => {
                log_warn!("vm {}: the console log helper's answer is garbled", vm.name);
                return;
            }
            Err(e) => {
                log_warn!(
                    "vm {}: cannot open {}: {e}",
                    vm.name,
                    vm.console_log.display()
                );
                return;
            }
        };
        let mut frame = Frame::new(Message::VmConsoleLog { size });
        frame.fd = Some(file.into());
        if let Some(channel) = vm.channel.as_mut() {
            if let Err(e) = channel.send(frame) {
                log_warn!("vm {}: sending the console log: {e}", vm.name);
            }
        }
    }

    /// A child the parent reaped: a start's or a console log's helper, or
    /// a VM process (the VM ended: everything it held is released, and
    /// the end is reported once its guest process has gone too).
    fn reaped(&mut self, pid: Pid, status: WaitStatus) {
        if self.net.nft_reaped(pid) {
            self.net_wait_check();
            return;
        }
        if let Some(index) = self.pending.iter().position(|p| p.helper.pid() == pid) {
            let outcome = self.pending[index].helper.reaped(&self.registry);
            let pending = self.pending.remove(index);
            self.start_answered(pending, outcome);
            return;
        }
        if let Some(index) = self.logs.iter().position(|l| l.helper.pid() == pid) {
            let outcome = self.logs[index].helper.reaped(&self.registry);
            let job = self.logs.remove(index);
            self.log_answered(job.id, outcome);
            return;
        }
        if let Some(index) = self.removals.iter().position(|r| r.helper.pid() == pid) {
            let outcome = self.removals[index].helper.reaped(&self.registry);
            let job = self.removals.remove(index);
            removal_answered(&job.path, outcome);
            return;
        }
        // A guest's process reparented to us once its VM process died:
        // gone now.
        let raw = pid.as_raw() as u32;
        self.lingering.retain(|&(_, held_by)| held_by != raw);
        if let Some(index) = self.ending.iter().position(|e| e.pids.contains(&raw)) {
            self.ending[index].pids.retain(|&p| p != raw);
            self.settle_ending(Instant::now());
            return;
        }
        let Some(index) = self.vms.iter().position(|v| v.pid == pid) else {
            return;
        };
        // What it said last (why it failed, a refused call).
        if let Some(channel) = self.vms[index].channel.as_mut() {
            if let Ok((frames, _)) = channel.receive() {
                for frame in frames {
                    self.dispatch(index, frame);
                }
            }
        }
        self.close_channel(index);
        let vm = self.vms.remove(index);
        if let Some(job) = self.logs.iter().position(|l| l.id == vm.id) {
            let mut job = self.logs.remove(job);
            job.helper.cancel(&self.registry);
        }
        let process = proc::describe_exit(status);
        // A VM process killed from outside cannot say how its guest's
        // processes ended: they died of PDEATHSIG (SIGKILL) with it.
        let guest = vm
            .guest_end
            .as_deref()
            .unwrap_or(if vm.guest_pids.is_empty() {
                "its guest had not started"
            } else {
                "its guest was killed with it"
            });
        let why = match &vm.guest_reason {
            Some(reason) => format!("VM process {process}, {guest} (guest: {reason})"),
            None => format!("VM process {process}, {guest}"),
        };
        let clean = matches!(status, WaitStatus::Exited(_, 0)) && vm.guest_reason.is_some();
        if clean {
            log_info!("vm {} (vm {}, pid {}): {why}", vm.name, vm.id, vm.pid);
        } else {
            log_warn!("vm {} (vm {}, pid {}): {why}", vm.name, vm.id, vm.pid);
        }
        // A guest that never ran: what the VM process said, else how it
        // ended (killed from outside, or before it could say).
        let start_failure = match (vm.guest_pids.is_empty(), vm.start_failed) {
            (true, failed) => Some(failed.unwrap_or_else(|| why.clone())),
            (false, failed) => failed,
        };
        let ended = VmEnded {
            id: vm.id,
            name: vm.name,
            why,
            guest_reason: vm.guest_reason,
            start_failure,
            launch_error: None,
            console_log: Some(vm.console_log.clone()),
        };
        if ended.is_reboot() {
            self.parked.push(ParkedPty {
                id: vm.id,
                master: vm.pty_master,
                slave: vm.pty_slave,
                tty: vm.tty,
            });
        } else {
            release_pty(&vm.pty_slave, &vm.tty);
            // Its taps go (QEMU's copies close as it exits).
            self.net.vm_release(vm.id);
        }
        // Its guest's processes die with it (PDEATHSIG): the VM is
        // reported stopped once they have gone (its disks unlocked), or
        // after GUEST_GONE_WAIT, its uid then kept until they are gone.
        // A timer, not a wait.
        let holding: Vec<u32> = (vm.guest_pids.iter().copied())
            .filter(|&pid| holds_files(pid, vm.uid))
            .collect();
        if holding.is_empty() {
            self.events.push(VmEvent::Ended(ended));
        } else {
            self.ending.push(Ending {
                ended,
                pids: holding,
                uid: vm.uid,
                until: Instant::now() + GUEST_GONE_WAIT,
            });
        }
    }

    /// The uids a new VM may not have: running VMs', and those of guest processes
    /// of ended VMs still exiting. The locks of the others are let go.
    fn taken_uids(&mut self) -> Vec<u32> {
        self.lingering.retain(|&(uid, pid)| holds_files(pid, uid));
        let taken: Vec<u32> = self
            .vms
            .iter()
            .map(|v| v.uid)
            .chain(self.lingering.iter().map(|&(uid, _)| uid))
            .chain(self.ending.iter().map(|e| e.uid))
            .collect();
        self.uid_locks.keep_only(&taken);
        taken
    }
}

impl Backend for Launcher {
    /// Kept until VM `id`'s process is launched; the streams of starts
    /// that ended meanwhile go (vmctl sees its socket close).
    fn set_incoming(&mut self, id: u32, incoming: Incoming) {
        let live: Vec<u32> = self
            .pending
            .iter()
            .map(|p| p.id)
            .chain(self.net_wait.iter().map(|w| w.pending.id))
            .collect();
        self.incoming.retain(|(i, _)| live.contains(i));
        self.incoming.push((id, incoming));
    }

    fn start(
        &mut self,
        id: u32,
        vm: &VmConfig,
        globals: &Globals,
        requester: &Requester,
        tty_owner: u32,
    ) -> Result<(), CtlError> {
        Launcher::start(self, id, vm, globals, requester, tty_owner).map_err(|e| e.to_ctl())
    }

    fn remove_console_log(&mut self, path: &Path) {
        Launcher::remove_console_log(self, path)
    }

    fn force_stop(&mut self, id: u32) -> bool {
        Launcher::force_stop(self, id)
    }

    fn command(&mut self, id: u32, command: VmCommand, fd: Option<OwnedFd>) -> bool {
        Launcher::command(self, id, command, fd)
    }

    fn discard_parked(&mut self, id: u32) {
        Launcher::discard_parked(self, id)
    }

    fn info(&self, id: u32) -> Option<RunInfo> {
        Launcher::info(self, id)
    }

    fn usage(&self, id: u32) -> Option<Usage> {
        Launcher::usage(self, id)
    }

    fn query_stats(&mut self, id: u32) -> bool {
        Launcher::query_stats(self, id)
    }

    fn owns_token(&self, token: Token) -> bool {
        token.0 >= VM_TOKEN_BASE || token == NET_TOKEN || token == NFT_TOKEN
    }

    fn set_switches(&mut self, switches: &[common::config::SwitchConfig], reapply: bool) {
        Launcher::set_switches(self, switches, reapply)
    }

    fn handle_event(&mut self, token: Token) {
        Launcher::handle_event(self, token)
    }

    fn reaped(&mut self, pid: Pid, status: WaitStatus) {
        Launcher::reaped(self, pid, status);
        // A VM whose processes are all gone lets its uid go.
        self.taken_uids();
    }

    fn next_deadline(&self) -> Option<Instant> {
        Launcher::next_deadline(self)
    }

    fn tick(&mut self) {
        Launcher::tick(self)
    }

    fn settle(&mut self) {
        self.settle_ending(Instant::now());
        self.taken_uids();
    }

    fn is_ending(&self) -> bool {
        !self.ending.is_empty()
    }

    fn take_events(&mut self) -> Vec<VmEvent> {
        let closed = self.net.take_released().into_iter();
        self.events
            .extend(closed.map(|id| VmEvent::InterfacesClosed { id }));
        std::mem::take(&mut self.events)
    }

    fn is_empty(&self) -> bool {
        Launcher::is_empty(self)
    }

    fn stop_all(&mut self) {
        Launcher::stop_all(self)
    }

    fn kill_all(&mut self) {
        Launcher::kill_all(self)
    }
}

/// A start's helper (runs in it, as root): looks up the kvm and tty
/// groups and the free uids, opens the VM's files and console log and
/// locks its disks.
fn launch_files_work(
    vm: &VmConfig,
    requester: &Requester,
    accel: Accel,
    range: UidRange,
    taken: &[u32],
    console_log: &Path,
    lock_disks: bool,
) -> helper::Work {
    let deadline = Instant::now() + OPEN_TIMEOUT;
    let work = || -> Result<(Vec<Opened>, HelperAnswer), StartError> {
        let (kvm, groups) = launch_kvm_groups(accel)?;
        let mut files = launch_open_files(vm, requester, deadline)?;
        files.extend(launch_open_vhosts(vm, kvm));
        if crate::vm::backend_needs_kvm_device(vm) {
            files.push(launch_open_kvm_device()?);
        }
        if lock_disks {
            launch_lock_disks(&files)?;
        }
        let (log, console_log_size) =
            open_console_log(console_log).map_err(|why| StartError::ConsoleLog {
                path: console_log.display().to_string(),
                why,
            })?;
        let free_uids = free_uids(range, taken);
        if free_uids.is_empty() {
            return Err(StartError::NoUid {
                first: range.first,
                last: range.last,
            });
        }
        files.push(Opened {
            kind: VmFdKind::ConsoleLog,
            path: console_log.display().to_string(),
            file: log.into(),
        });
        let tty_gid = Group::from_name("tty")
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw());
        let answer = HelperAnswer::Start {
            kvm,
            groups,
            tty_gid,
            free_uids,
            console_log_size,
        };
        Ok((files, answer))
    };
    match work() {
        Ok((files, answer)) => (files, Ok(answer)),
        Err(e) => (Vec::new(), Err(e.to_ctl())),
    }
}

/// How many free uids a start's helper finds: the parent takes the
/// first one no VM launched meanwhile has.
const FREE_UIDS: usize = 16;

/// The first uids of `range` not `taken` that are neither a user nor a
/// group in the system's databases and that no process runs as (runs in
/// a helper: lookups can hang).
fn free_uids(range: UidRange, taken: &[u32]) -> Vec<u32> {
    let running = uids_of_processes();
    (range.first..=range.last)
        .filter(|uid| !taken.contains(uid) && !running.contains(uid))
        .filter(|&uid| {
            matches!(User::from_uid(Uid::from_raw(uid)), Ok(None))
                && matches!(Group::from_gid(Gid::from_raw(uid)), Ok(None))
        })
        .take(FREE_UIDS)
        .collect()
}

/// Every uid a live process has (real, effective, saved or file system),
/// from /proc.
fn uids_of_processes() -> std::collections::BTreeSet<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Default::default();
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("status")).ok())
        .filter_map(|status| {
            let line = status.lines().find(|l| l.starts_with("Uid:"))?;
            Some(
                line[4..]
                    .split_whitespace()
                    .filter_map(|u| u.parse::<u32>().ok())
                    .collect::<Vec<u32>>(),
            )
        })
        .flatten()
        .collect()
}

/// A console log helper (runs in it): rotates the log if it really
/// reached its cap and opens it again.
fn rotate_console_log_work(path: &Path, cap: u64) -> helper::Work {
    let full = std::fs::metadata(path).map_or(true, |m| m.len() >= cap);
    if full {
        let mut old = path.to_path_buf().into_os_string();
        old.push(".0");
        if let Err(e) = std::fs::rename(path, &old) {
            let why = format!("cannot rotate {}: {e}", path.display());
            return (Vec::new(), Err(CtlError::Text(why)));
        }
    }
    match open_console_log(path) {
        Ok((fd, size)) => (
            vec![Opened {
                kind: VmFdKind::ConsoleLog,
                path: path.display().to_string(),
                file: fd.into(),
            }],
            Ok(HelperAnswer::ConsoleLog { size }),
        ),
        Err(why) => (Vec::new(), Err(CtlError::Text(why.to_string()))),
    }
}

/// A console log removal's helper answered: what it left, and why.
fn removal_answered(path: &Path, outcome: Result<Answered, HelperError>) {
    match outcome {
        Ok((_, HelperAnswer::Removed { kept })) => {
            for line in kept {
                log_info!("{line}");
            }
            log_debug!("removed {} of an ended vm", path.display());
        }
        Ok(_) => log_warn!(
            "removing {}: the helper's answer is garbled",
            path.display()
        ),
        Err(e) => log_warn!("removing {}: {e}", path.display()),
    }
}

/// A console log removal's helper (runs in it): removes `path` and
/// `path.0` unless a running VM holds one (its shared lock, taken by
/// [`open_console_log`]): each is locked exclusively before it is
/// unlinked, so a start that opened it meanwhile waits for the lock,
/// finds it unlinked and creates a new one.
fn remove_console_log_work(path: &Path) -> helper::Work {
    let mut old = path.to_path_buf().into_os_string();
    old.push(".0");
    let mut kept = Vec::new();
    for path in [path, Path::new(&old)] {
        if let Err(why) = remove_unlocked(path) {
            kept.push(format!("{} kept: {why}", path.display()));
        }
    }
    (Vec::new(), Ok(HelperAnswer::Removed { kept }))
}

/// Unlinks `path` if no one holds a lock on it (a missing file is done).
fn remove_unlocked(path: &Path) -> Result<(), String> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(common::qcow2::io_message(&e)),
    };
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(match Errno::last() {
            Errno::EWOULDBLOCK => "a running vm writes it".to_string(),
            e => format!("cannot lock it: {}", e.desc()),
        });
    }
    // The name still is the file locked (not a new one created since).
    let opened = file.metadata().map_err(|e| common::qcow2::io_message(&e))?;
    match std::fs::symlink_metadata(path) {
        Ok(named) if named.ino() == opened.ino() && named.dev() == opened.dev() => {
            std::fs::remove_file(path).map_err(|e| common::qcow2::io_message(&e))
        }
        Ok(_) => Err("replaced meanwhile".to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(common::qcow2::io_message(&e)),
    }
}

/// Refuses what a VM asks for that is not built yet, rather than
/// ignoring it (at start, and as a warning of `vmd -n`).
pub fn launch_check_built(vm: &VmConfig) -> Result<(), StartError> {
    // As in OpenBSD, no PXE: the VM boots its kernel, and the DHCP lease
    // of its local interface carries `auto_install`.
    if vm.boot_device == Some(BootDevice::Net) && !vm.effective_interfaces().iter().any(|i| i.local)
    {
        return Err(StartError::NetBootWithoutLocal);
    }
    if let Some(why) = crate::vm::backend_unsupported(vm) {
        return Err(StartError::Unsupported(why));
    }
    Ok(())
}

/// Refuses an interface on a switch that is not configured or is
/// disabled (OpenBSD starts the VM
/// with the interface on no switch): the errno and the words (at start,
/// and as a warning of `vmd -n`).
pub fn launch_check_switches(
    vm: &VmConfig,
    switches: &[common::config::SwitchConfig],
) -> Result<(), (Errno, String)> {
    for name in vm.interfaces.iter().filter_map(|i| i.switch.as_ref()) {
        let Some(sw) = switches.iter().find(|s| s.name == *name) else {
            let why = format!("switch \"{name}\" not found: define it in vm.conf");
            return Err((Errno::ENOENT, why));
        };
        if !sw.enabled {
            return Err((Errno::ENETDOWN, format!("switch \"{name}\" is disabled")));
        }
    }
    Ok(())
}

/// Opens every file VM `vm` needs: its kernel or else the BIOS, initrd,
/// disk chains and cdrom. The paths `requester` named are opened with its
/// rights by the helper (userfiles.rs); the others (the configuration's,
/// and root's) as root where root alone controls them, else with the
/// VM's owner's rights (`userfiles_open_root`).
fn launch_open_files(
    vm: &VmConfig,
    requester: &Requester,
    deadline: Instant,
) -> Result<Vec<Opened>, StartError> {
    let mut wants = Vec::new();
    let mut want = |kind, path: &str| {
        wants.push(Want {
            kind,
            path: path.to_string(),
        })
    };
    if let Some(kernel) = &vm.boot {
        want(VmFdKind::Kernel, kernel);
    }
    if let Some(initrd) = &vm.initrd {
        want(VmFdKind::Initrd, initrd);
    }
    for (i, disk) in vm.disks.iter().enumerate() {
        let kind = VmFdKind::Disk {
            disk: i as u8,
            layer: 0,
            format: disk.format,
            writable: true,
        };
        want(kind, &disk.path);
    }
    if let Some(cdrom) = &vm.cdrom {
        want(VmFdKind::Cdrom, cdrom);
    }
    let (theirs, ours): (Vec<Want>, Vec<Want>) =
        wants.into_iter().partition(|w| requester.opens(&w.path));
    let mut opened = userfiles::userfiles_open_as(requester, &theirs, deadline)?;
    let rights = if ours.is_empty() {
        userfiles::Rights::Ownerless
    } else {
        userfiles::userfiles_owner_rights(&vm.owner)?
    };
    for want in &ours {
        opened.extend(userfiles::userfiles_open_root(want, &rights, deadline)?);
    }
    if vm.boot.is_none() {
        let bios = userfiles::userfiles_open(&[Want {
            kind: VmFdKind::Bios,
            path: BIOS_PATH.to_string(),
        }])
        .map_err(|_| StartError::BiosMissing)?;
        opened.extend(bios);
    }
    launch_check_boot_sizes(&opened)?;
    Ok(opened)
}

/// Refuses a kernel, initrd or BIOS larger than the VM process copies
/// into memory, here where the path is known (the VM process checks
/// again as it copies: a file may grow).
fn launch_check_boot_sizes(opened: &[Opened]) -> Result<(), StartError> {
    for o in opened {
        let Some((what, limit)) = crate::vm::boot_file_limit(o.kind) else {
            continue;
        };
        let size = o.file.metadata().map(|m| m.len()).unwrap_or(0);
        if size > limit {
            return Err(StartError::TooLarge {
                what,
                path: o.path.clone(),
                limit: common::size::format(limit),
            });
        }
    }
    Ok(())
}

/// Whether a VM may use hardware KVM, as far as the parent can tell
/// without a lookup: `kvm` needs /dev/kvm, `tcg` never uses it, `auto`
/// only when the kvm_intel or kvm_amd module is loaded (other KVM
/// providers, such as kvm_pvm, are not hardware virtualization) and
/// /dev/kvm exists (else it is `tcg`). The helper then needs a group
/// kvm to give the guest's processes ([`launch_kvm_groups`]).
fn launch_accel(accel: Accel) -> Result<Accel, StartError> {
    match accel {
        Accel::Tcg => Ok(Accel::Tcg),
        Accel::Kvm if !Path::new("/dev/kvm").exists() => Err(StartError::Kvm(KvmMissing::Device)),
        Accel::Kvm => Ok(Accel::Kvm),
        Accel::Auto if hardware_kvm() && Path::new("/dev/kvm").exists() => Ok(Accel::Auto),
        Accel::Auto => Ok(Accel::Tcg),
    }
}

/// In a helper (the lookup can hang): whether the VM uses hardware KVM,
/// and the groups that gives the guest's processes (group kvm, which `kvm` requires and
/// without which `auto` is `tcg`).
fn launch_kvm_groups(accel: Accel) -> Result<(bool, Vec<u32>), StartError> {
    match (accel, kvm_group()) {
        (Accel::Tcg, _) | (Accel::Auto, None) => Ok((false, Vec::new())),
        (_, Some(gid)) => Ok((true, vec![gid.as_raw()])),
        (Accel::Kvm, None) => Err(StartError::Kvm(KvmMissing::Group)),
    }
}

fn hardware_kvm() -> bool {
    ["kvm_intel", "kvm_amd"]
        .iter()
        .any(|m| Path::new("/sys/module").join(m).exists())
}

fn kvm_group() -> Option<Gid> {
    Group::from_name("kvm").ok().flatten().map(|g| g.gid)
}

/// /dev/kvm for a VM our own monitor runs (its VM process creates the
/// VM with it after it was passed; it cannot open it once dropped). In
/// the start's helper: opening a device may wait on its driver.
fn launch_open_kvm_device() -> Result<Opened, StartError> {
    const KVM_DEVICE: &str = "/dev/kvm";
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(KVM_DEVICE)
        .map_err(|e| StartError::KvmDevice(common::qcow2::io_message(&e)))?;
    Ok(Opened {
        kind: VmFdKind::Kvm,
        path: KVM_DEVICE.to_string(),
        file,
    })
}

/// Locks every disk's image chain: the top of a writable disk
/// exclusively, the files below shared, so no other VM writes to a file
/// this one reads or writes.
/// A /dev/vhost-net descriptor per interface under hardware KVM (an
/// open may wait on the driver: the helper's); without, the VM runs on
/// QEMU's own tap path, and the log says why at debug level.
fn launch_open_vhosts(vm: &VmConfig, kvm: bool) -> Vec<Opened> {
    let count = vm.effective_interfaces().len();
    if count == 0 {
        return Vec::new();
    }
    match vhost_open_all(kvm, Path::new(VHOST_NET), count) {
        Ok(fds) => (fds.into_iter().enumerate())
            .map(|(index, fd)| Opened {
                kind: VmFdKind::Vhost { index: index as u8 },
                path: VHOST_NET.to_string(),
                file: fd.into(),
            })
            .collect(),
        Err(why) => {
            log_debug!("vm {}: {why}", vm.name);
            Vec::new()
        }
    }
}

fn launch_lock_disks(files: &[Opened]) -> Result<(), StartError> {
    for f in files {
        let VmFdKind::Disk { writable, .. } = f.kind else {
            continue;
        };
        let op = if writable {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.file.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
            return Err(match Errno::last() {
                Errno::EWOULDBLOCK => StartError::DiskInUse(f.path.clone()),
                e => StartError::Disk(format!("{}: cannot lock: {e}", f.path)),
            });
        }
    }
    Ok(())
}

/// A new pty, its slave raw at once and given to `owner` (see
/// [`give_pty`]; `tty_gid` is group tty's, looked up by a helper): the
/// master, the slave and the slave's name.
fn open_pty(
    owner: u32,
    group: Option<u32>,
    tty_gid: Option<u32>,
) -> Result<(OwnedFd, OwnedFd, String), Errno> {
    use nix::fcntl::OFlag;
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY)?;
    nix::fcntl::fcntl(
        master.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )?;
    nix::pty::grantpt(&master)?;
    nix::pty::unlockpt(&master)?;
    let name = nix::pty::ptsname_r(&master)?;
    let slave_raw = nix::fcntl::open(
        name.as_str(),
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    // SAFETY: open just returned this descriptor; nothing else owns it.
    let slave = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(slave_raw) };
    let mut termios = nix::sys::termios::tcgetattr(&slave)?;
    nix::sys::termios::cfmakeraw(&mut termios);
    nix::sys::termios::tcsetattr(&slave, nix::sys::termios::SetArg::TCSANOW, &termios)?;
    give_pty(&slave, owner, group, tty_gid)?;
    // SAFETY: PtyMaster owns the descriptor; into_raw_fd hands it over.
    let master = unsafe {
        <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(
            master,
        ))
    };
    Ok((master, slave, name))
}

/// Gives a VM's pty back to root, mode 0600, once the VM ended (a console
/// client may still hold it open).
fn release_pty(slave: &OwnedFd, tty: &str) {
    let released = nix::unistd::fchown(
        slave.as_raw_fd(),
        Some(Uid::from_raw(0)),
        Some(Gid::from_raw(0)),
    )
    .and_then(|()| {
        nix::sys::stat::fchmod(
            slave.as_raw_fd(),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
    });
    if let Err(e) = released {
        log_warn!("{tty}: cannot give it back to root: {e}");
    }
}

/// A parked pty for a restart, its slave given to `owner` (and `group`)
/// again.
fn reuse_pty(
    parked: ParkedPty,
    owner: u32,
    group: Option<u32>,
    tty_gid: Option<u32>,
) -> Result<(OwnedFd, OwnedFd, String), Errno> {
    give_pty(&parked.slave, owner, group, tty_gid)?;
    Ok((parked.master, parked.slave, parked.tty))
}

/// Gives a pty's slave to `owner` and group `tty` (mode 0620, as a login
/// terminal; 0600 and group root without a `tty` group), or to `owner`
/// and `group` (mode 0660).
fn give_pty(
    slave: &OwnedFd,
    owner: u32,
    group: Option<u32>,
    tty_gid: Option<u32>,
) -> Result<(), Errno> {
    let (gid, mode) = match (group, tty_gid) {
        (Some(gid), _) => (Gid::from_raw(gid), 0o660),
        (None, Some(tty)) => (Gid::from_raw(tty), 0o620),
        (None, None) => (Gid::from_raw(0), 0o600),
    };
    nix::unistd::fchown(slave.as_raw_fd(), Some(Uid::from_raw(owner)), Some(gid))?;
    nix::sys::stat::fchmod(
        slave.as_raw_fd(),
        nix::sys::stat::Mode::from_bits_truncate(mode),
    )
}

fn errno_of(e: &std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

/// Opens (creating) a console log for appending: root-owned, mode 0600,
/// never through a symlink. Returns it and its size.
fn open_console_log(path: &Path) -> Result<(OwnedFd, u64), ConsoleLogError> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|source| ConsoleLogError::Dir {
                dir: dir.to_path_buf(),
                source,
            })?;
    }
    // A shared lock, held while a VM writes it: a removal
    // (remove_console_log_work) leaves it be. A file a removal unlinked
    // while we waited for the lock is opened again, created anew.
    let mut tries = 0;
    let (file, meta) = loop {
        tries += 1;
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NOCTTY)
            .open(path)
            .map_err(ConsoleLogError::Open)?;
        // SAFETY: flock on a descriptor we own (it waits only while a
        // removal holds the file, in a helper).
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH) } != 0 {
            return Err(ConsoleLogError::Open(std::io::Error::last_os_error()));
        }
        let meta = file.metadata().map_err(ConsoleLogError::Open)?;
        if meta.nlink() > 0 || tries == 10 {
            break (file, meta);
        }
    };
    if !meta.is_file() {
        return Err(ConsoleLogError::NotRegular);
    }
    if meta.uid() != 0 {
        return Err(ConsoleLogError::NotRoots);
    }
    Ok((file.into(), meta.len()))
}

/// Why a console log could not be opened.
#[derive(Debug, Error)]
pub enum ConsoleLogError {
    #[error("cannot create {}: {source}", dir.display())]
    Dir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", common::qcow2::io_message(.0))]
    Open(std::io::Error),
    #[error("not a regular file")]
    NotRegular,
    #[error("not owned by root: remove it or give it to root")]
    NotRoots,
}

/// What hardware KVM lacks on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum KvmMissing {
    #[error("/dev/kvm does not exist")]
    Device,
    #[error("group kvm does not exist")]
    Group,
}

/// The `Uid:` (real) of /proc/PID/status and the rest of the file, if
/// the process exists and is not a zombie.
fn proc_status(pid: u32) -> Option<(u32, String)> {
    proc_status_any(pid)
        .filter(|(_, zombie, _)| !zombie)
        .map(|(uid, _, status)| (uid, status))
}

/// A process's real uid, whether it is a zombie, and its whole status.
fn proc_status_any(pid: u32) -> Option<(u32, bool, String)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|rest| rest.trim().to_string())
    };
    let zombie = field("State:").is_some_and(|s| s.starts_with('Z'));
    let uid = field("Uid:")?.split_whitespace().next()?.parse().ok()?;
    Some((uid, zombie, status))
}

/// SIGKILLs a VM's process and its guest's. The guest's pids come from
/// the VM process, which is less trusted than we are: each is killed
/// only if it runs as the VM's own uid.
fn kill_vm(vm: &VmProc) {
    for &pid in vm
        .guest_pids
        .iter()
        .filter(|&&pid| process_alive_as(pid, vm.uid))
    {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
    let _ = kill(vm.pid, Signal::SIGKILL);
}

fn process_alive_as(pid: u32, uid: u32) -> bool {
    proc_status(pid).is_some_and(|(u, _)| u == uid)
}

/// Whether `pid` (a guest's process of `uid`) still holds what it
/// opened: alive, or a zombie leader whose other threads are still
/// exiting (they hold its descriptors, and so the disks' locks, until the
/// last one is gone).
fn holds_files(pid: u32, uid: u32) -> bool {
    match proc_status_any(pid) {
        Some((u, false, _)) => u == uid,
        // A pid reused by someone else's process holds nothing of ours.
        Some((u, true, _)) if u == uid => {
            std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|tasks| tasks.count() > 1)
        }
        _ => false,
    }
}

/// The resident memory of a guest's processes (VmRSS), those of `pids`
/// that still run as `uid`; None if none does.
fn guest_memory(pids: &[u32], uid: u32) -> Option<u64> {
    pids.iter()
        .filter_map(|&pid| process_rss(pid, uid))
        .reduce(|a, b| a + b)
}

/// A process's resident memory in bytes (VmRSS), if `pid` still runs as
/// `uid`.
fn process_rss(pid: u32, uid: u32) -> Option<u64> {
    let (u, status) = proc_status(pid)?;
    if u != uid {
        return None;
    }
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// The CPU time (user and system) a process has used, in milliseconds,
/// if `pid` still runs as `uid`.
fn process_cpu_ms(pid: u32, uid: u32) -> Option<u64> {
    let (u, _) = proc_status(pid)?;
    if u != uid {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks = stat_cpu_ticks(&stat)?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|&hz| hz > 0)? as u64;
    Some(ticks * 1000 / hz)
}

/// utime + stime (clock ticks) of a /proc/PID/stat line: fields 14 and
/// 15, counted after the command name's closing parenthesis (the name
/// may hold spaces and parentheses).
fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Adds O_NONBLOCK to `fd`'s open file description, keeping its other
/// flags (a client's descriptor may be opened for appending).
fn set_nonblocking(fd: BorrowedFd) -> nix::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_retain(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    #[test]
    fn cpu_time_is_read_past_a_name_with_parentheses() {
        let stat = "4242 (qemu (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0";
        assert_eq!(stat_cpu_ticks(stat), Some(300));
        assert_eq!(stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn tcg_never_and_auto_only_with_hardware_modules() {
        assert_eq!(launch_accel(Accel::Tcg).expect("tcg"), Accel::Tcg);
        assert!(!launch_kvm_groups(Accel::Tcg).expect("tcg").0);
        let auto = launch_accel(Accel::Auto)
            .and_then(launch_kvm_groups)
            .expect("auto")
            .0;
        assert_eq!(
            auto,
            hardware_kvm() && Path::new("/dev/kvm").exists() && kvm_group().is_some()
        );
    }

    #[test]
    fn own_rss_is_read_from_proc() {
        let me = std::process::id();
        let uid = nix::unistd::getuid().as_raw();
        assert!(process_rss(me, uid).is_some_and(|b| b > 0));
        assert_eq!(process_rss(me, uid.wrapping_add(1)), None);
        // A sleeping child's RSS holds still (this process's moves with
        // the other tests' threads).
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("sleep");
        let pid = child.id();
        // Asleep in nanosleep once exec and its start-up are done.
        let asleep = || {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            status.contains("Name:\tsleep\n") && status.contains("State:\tS")
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !asleep() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let doubled = guest_memory(&[pid, pid], uid);
        let single = process_rss(pid, uid);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(doubled, single.map(|b| 2 * b));
        assert_eq!(guest_memory(&[], uid), None);
        assert!(process_alive_as(me, uid));
    }

    #[test]
    fn console_log_is_appended_and_refuses_symlinks() {
        let dir = std::env::temp_dir().join(format!("vmd-vmm-test-{}", std::process::id()));
        let path = dir.join("sub").join("x.console");
        let (fd, size) = open_console_log(&path).expect("open");
        assert_eq!(size, 0);
        let mut file = File::from(fd);
        std::io::Write::write_all(&mut file, b"hello").expect("write");
        let (_, size) = open_console_log(&path).expect("reopen");
        assert_eq!(size, 5);
        let link = dir.join("link.console");
        std::os::unix::fs::symlink(&path, &link).expect("symlink");
        assert!(open_console_log(&link).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Waits (30 s at most) until `check` says a lock whose descriptor
    /// this test closed is free: a child another test forked meanwhile
    /// holds an inherited copy of it until it execs or exits.
    fn released(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !check() {
            assert!(Instant::now() < deadline, "{what} was never released");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn console_log_removal_leaves_a_log_in_use() {
        let dir = std::env::temp_dir().join(format!("vmd-logrm-test-{}", std::process::id()));
        let path = dir.join("i.console");
        let old = dir.join("i.console.0");
        let kept = |work: helper::Work| match work.1 {
            Ok(HelperAnswer::Removed { kept }) => kept,
            other => panic!("unexpected answer {other:?}"),
        };
        // A running VM holds its log (the shared lock of open_console_log).
        let (held, _) = open_console_log(&path).expect("open");
        std::fs::write(&old, b"rotated").expect("write .0");
        let lines = kept(remove_console_log_work(&path));
        assert_eq!(
            lines,
            vec![format!("{} kept: a running vm writes it", path.display())]
        );
        assert!(path.exists() && !old.exists());
        // Once it has ended, the log goes; nothing left is no error.
        drop(held);
        released("the log's lock", || {
            kept(remove_console_log_work(&path)).is_empty()
        });
        assert!(!path.exists());
        assert!(kept(remove_console_log_work(&path)).is_empty());
        // A start that opened the file before a removal unlinked it (it
        // waits for the removal's lock) finds it unlinked and creates it
        // anew: its log is never one that no longer has a name.
        let file = std::fs::File::create(&path).expect("create");
        // SAFETY: flock on a descriptor we own.
        assert_eq!(unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) }, 0);
        std::fs::remove_file(&path).expect("unlink");
        drop(file);
        let (fd, _) = open_console_log(&path).expect("open again");
        assert!(File::from(fd).metadata().expect("stat").nlink() == 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn pty_slave_is_raw_owned_and_released() {
        let tty = Group::from_name("tty")
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw());
        let (_master, slave, name) = open_pty(1, None, tty).expect("pty");
        assert!(name.starts_with("/dev/pts/"));
        let t = nix::sys::termios::tcgetattr(&slave).expect("tcgetattr");
        assert!(!t
            .local_flags
            .contains(nix::sys::termios::LocalFlags::ECHO | nix::sys::termios::LocalFlags::ICANON));
        let owned = nix::sys::stat::fstat(slave.as_raw_fd()).expect("fstat");
        assert_eq!(
            (owned.st_uid, owned.st_gid, owned.st_mode & 0o777),
            match tty {
                Some(gid) => (1, gid, 0o620),
                None => (1, 0, 0o600),
            }
        );
        release_pty(&slave, &name);
        let released = nix::sys::stat::fstat(slave.as_raw_fd()).expect("fstat");
        assert_eq!(
            (released.st_uid, released.st_gid, released.st_mode & 0o777),
            (0, 0, 0o600)
        );
        let (_master, slave, _) = open_pty(1, Some(2), tty).expect("pty");
        let grouped = nix::sys::stat::fstat(slave.as_raw_fd()).expect("fstat");
        assert_eq!(
            (grouped.st_uid, grouped.st_gid, grouped.st_mode & 0o777),
            (1, 2, 0o660)
        );
    }

    #[test]
    fn writable_disk_is_locked_against_a_second_user() {
        let dir = std::env::temp_dir().join(format!("vmd-vmm-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("d.img");
        std::fs::write(&path, vec![0u8; 4096]).expect("image");
        let open = || {
            let wants = [Want {
                kind: VmFdKind::Disk {
                    disk: 0,
                    layer: 0,
                    format: common::disk::DiskFormat::Raw,
                    writable: true,
                },
                path: path.display().to_string(),
            }];
            userfiles::userfiles_open(&wants).expect("open")
        };
        let first = open();
        launch_lock_disks(&first).expect("first lock");
        assert!(matches!(
            launch_lock_disks(&open()),
            Err(StartError::DiskInUse(_))
        ));
        drop(first);
        released("the first lock", || launch_lock_disks(&open()).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn refusals_read_as_vmd_messages() {
        let refusal = |kind, why| FileRefusal {
            kind,
            path: "/u/x".into(),
            why,
        };
        let cd = StartError::from_refusal(refusal(VmFdKind::Cdrom, RefusalReason::Missing));
        assert_eq!(cd.to_ctl(), CtlError::CdromMissing);
        assert_eq!(cd.to_ctl().describe(), "could not find specified iso image");
        let cd = StartError::from_refusal(refusal(VmFdKind::Cdrom, RefusalReason::NotRegular));
        assert_eq!(cd.to_ctl(), CtlError::CdromInvalid);
        assert_eq!(StartError::BiosMissing.to_ctl(), CtlError::BiosMissing);
        let denied =
            StartError::from_refusal(refusal(VmFdKind::Kernel, RefusalReason::PermissionDenied));
        assert_eq!(denied.to_string(), "/u/x: permission denied");
        let vm = VmConfig::new("x");
        let mut net = vm.clone();
        net.boot_device = Some(BootDevice::Net);
        // -B net needs a local interface, whose lease names auto_install.
        assert!(matches!(
            launch_check_built(&net),
            Err(StartError::NetBootWithoutLocal)
        ));
        net.interfaces.push(common::config::Interface {
            local: true,
            ..Default::default()
        });
        assert!(launch_check_built(&net).is_ok());
        let mut cd = vm.clone();
        cd.cdrom = Some("/x.iso".into());
        cd.boot_device = Some(BootDevice::Cdrom);
        assert!(launch_check_built(&cd).is_ok());
        // backend kvm: a kernel, disks and interfaces, any vCPUs.
        let mut direct = vm;
        direct.backend = Some(common::config::Backend::Kvm);
        direct.boot = Some("/k".into());
        assert!(launch_check_built(&direct).is_ok());
        let refused = |change: fn(&mut VmConfig)| {
            let mut vm = direct.clone();
            change(&mut vm);
            launch_check_built(&vm).map_err(|e| e.to_string()).err()
        };
        let said = |what: &str| Some(format!("backend kvm does not support {what} yet"));
        assert_eq!(
            refused(|vm| vm.boot = None),
            said("a BIOS or CD-ROM boot (it boots a Linux kernel, `boot`)")
        );
        assert_eq!(
            refused(|vm| vm.cdrom = Some("/x.iso".into())),
            said("a CD-ROM")
        );
        assert_eq!(refused(|vm| vm.vcpus = Some(2)), None);
        assert_eq!(refused(|vm| vm.interfaces.push(Default::default())), None);
        fn disk() -> common::config::Disk {
            common::config::Disk {
                path: "/d.img".into(),
                format: common::disk::DiskFormat::Raw,
            }
        }
        assert_eq!(refused(|vm| vm.disks.push(disk())), None);
        assert_eq!(
            refused(|vm| {
                vm.disks = vec![disk(), disk(), disk(), disk()];
                vm.interfaces.push(Default::default());
            }),
            said("more than 4 disks and network interfaces together")
        );
    }
}
