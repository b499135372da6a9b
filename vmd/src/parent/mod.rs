//! The parent process (root, no filter). Everything it does lives in
//! this folder: its event loop (here), the VM registry (registry.rs),
//! the seam to what runs VMs (backend.rs) and the real backend, which
//! launches VM processes (launch.rs), the forked helpers that do
//! whatever could wait (helper.rs) and the rules that open VMs' files
//! with the right user's rights (userfiles.rs), guest networking: taps,
//! switches' bridges over netlink, the state file (net/), and the packet
//! sockets of the DHCP server on local interfaces (dhcp.rs), and what
//! the service manager is told (notify.rs).
//!
//! The loop starts control and switch, writes their log lines and
//! restarts them when they die. It holds the VM registry and answers the
//! commands control forwards; SIGHUP reloads the configuration. SIGTERM
//! or SIGINT shut the daemon down ([`Shutdown`]): every VM's power
//! button, each forced at its shutdown timeout, the network removed,
//! then control and switch stopped.
//!
//! One mio loop, and nothing in it waits: a signalfd (SIGCHLD, SIGTERM,
//! SIGINT, SIGHUP), one channel per child, the backend's descriptors
//! (VM processes' channels, helpers' sockets), and a timeout for the
//! next timer (a staggered start batch, a graceful stop to force, a held
//! reply's deadline, a child's restart, the shutdown's, the backend's
//! own). A slow step
//! is a pending state that an event or a timer ends, never a wait.
//! Start, pause and unpause are held replies: a start is answered when
//! its files were opened and the VM process reports that the guest runs
//! (or why it could not start), pause and unpause when it reports the
//! guest's answer; a `status` is held while a VM's guest processes are
//! still exiting (at most GUEST_GONE_WAIT).

pub mod backend;
pub mod dhcp;
pub mod helper;
pub mod launch;
pub mod net;
pub mod notify;
pub mod registry;
pub mod stats;
pub mod uidlock;
pub mod userfiles;

use crate::log::{self, log_debug, log_info, log_warn};
use crate::parent::backend::{CommandDone, LocalNic, VmEnded, VmEvent};
use crate::parent::dhcp::{DhcpError, LocalDhcp, LocalInterface};
use crate::parent::helper::{Answered, Helper, HelperError};
use crate::parent::launch::{Launcher, FILES_TIMEOUT};
use crate::parent::registry::{Ended, Registry};
use crate::parent::stats::PendingStats;
use crate::parent::userfiles::OPEN_TIMEOUT;
use crate::proc;
use common::config::{self, Config};
use common::ctl::{Credentials, CtlError, CtlRequest, VmTarget, VM_START_TIMEOUT};
use common::event::EventKind;
use common::imsg::{Channel, Frame, HelperAnswer, Message, Role, VmCommand};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::io::ErrorKind;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use thiserror::Error;

const SIGNALS: Token = Token(0);
/// A role restarted this often within RESTART_WINDOW is given up on.
const MAX_RESTARTS: usize = 10;
const RESTART_WINDOW: Duration = Duration::from_secs(60);
/// How long a child that keeps dying waits before its next restart.
const RESTART_BACKOFF: Duration = Duration::from_secs(10);
/// How long children get to exit after SIGTERM before SIGKILL.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// How long VMs killed at shutdown get to end (their processes reaped,
/// their taps and the bridges removed) before vmd exits without them.
const SHUTDOWN_KILL_WAIT: Duration = Duration::from_secs(10);
/// How long the longest command waits for the VM process to confirm
/// (each has its own, [`VmCommand::reply_timeout`]).
const COMMAND_REPLY_TIMEOUT: Duration = common::imsg::LONGEST_COMMAND_REPLY;
// vmctl gives up on an answer after ANSWER_TIMEOUT (START_ANSWER_TIMEOUT
// for a start): every deadline vmd keeps before it answers ends first.
const _: () = assert!(
    common::ctl::ANSWER_TIMEOUT.as_secs()
        > FILES_TIMEOUT.as_secs() + COMMAND_REPLY_TIMEOUT.as_secs()
);
const _: () = assert!(
    common::ctl::START_ANSWER_TIMEOUT.as_secs()
        > FILES_TIMEOUT.as_secs() + VM_START_TIMEOUT.as_secs()
);

/// Why the parent could not set itself up or start a child.
#[derive(Debug, Error)]
pub enum ParentError {
    #[error("cannot {what}: {source}")]
    Setup {
        what: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Spawn(#[from] proc::ProcError),
    #[error("cannot register {role}: {source}")]
    Register {
        role: &'static str,
        source: std::io::Error,
    },
}

impl ParentError {
    fn setup<E: Into<std::io::Error>>(what: &'static str) -> impl FnOnce(E) -> ParentError {
        move |e| ParentError::Setup {
            what,
            source: e.into(),
        }
    }
}

pub struct ParentOptions {
    pub socket: PathBuf,
    /// The configuration file `reload` and SIGHUP read again.
    pub config_path: PathBuf,
    /// Whether that file must exist (it was given with -f).
    pub config_required: bool,
    /// `-D` macro definitions, applied to every file read.
    pub defines: Vec<(String, String)>,
    /// The configuration as read at startup.
    pub config: Config,
}

/// Whether a request is refused while vmd shuts down: whatever would
/// start a guest or change the configuration.
fn shutdown_refuses(request: &CtlRequest) -> bool {
    matches!(
        request,
        CtlRequest::Start(_) | CtlRequest::Load { .. } | CtlRequest::Reload
    )
}

/// The longest text a probe writes to its client's descriptor.
const MAX_PROBE_TEXT: usize = 4096;

/// Why a probe ([`CtlRequest::Probe`]) is refused: always, unless this
/// vmd was built for the tests; a text longer than [`MAX_PROBE_TEXT`].
fn probe_refusal(command: &VmCommand) -> Option<CtlError> {
    if !cfg!(any(test, feature = "test-triggers")) {
        return Some(CtlError::explained(
            nix::errno::Errno::EINVAL,
            "probe is a test command: this vmd was built without the test-triggers feature",
        ));
    }
    match command {
        VmCommand::Probe { text, .. } if text.len() > MAX_PROBE_TEXT => Some(CtlError::explained(
            nix::errno::Errno::EINVAL,
            format!("a probe's text is at most {MAX_PROBE_TEXT} bytes"),
        )),
        _ => None,
    }
}

/// VM `vmid`'s `command` made progress at `now`: the replies held for it
/// get a new deadline (a command's reply timeout is the longest it may
/// go without news). Their clients, to tell.
fn progress_made(
    replies: &mut [PendingReply],
    vmid: u32,
    command: VmCommand,
    now: Instant,
) -> Vec<(Token, u32)> {
    let deadline = now + command.reply_timeout();
    let held = Held::Command(command);
    replies
        .iter_mut()
        .filter(|r| r.vmid == vmid && r.held == held)
        .map(|r| {
            r.deadline = deadline;
            (r.token, r.peer)
        })
        .collect()
}

/// Keeps error lines within one frame: the first ones that fit, and a
/// count of the rest.
fn fit_lines(lines: Vec<String>) -> Vec<String> {
    const BUDGET: usize = common::imsg::MAX_PAYLOAD - 1024;
    let total = lines.len();
    let mut used = 0;
    let mut kept = Vec::new();
    for line in lines {
        let line: String = line.chars().take(1024).collect();
        used += line.len() + 8;
        if used > BUDGET {
            break;
        }
        kept.push(line);
    }
    if kept.len() < total {
        kept.push(format!("... and {} more errors", total - kept.len()));
    }
    kept
}

struct Child {
    role: Role,
    pid: Pid,
    token: Token,
    /// None once the child closed its end (or we closed it on an error).
    channel: Option<Channel>,
    /// It sent Ready: its drop succeeded.
    ready: bool,
}

/// What a held reply waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Held {
    /// A pause or unpause: the guest's answer.
    Command(VmCommand),
    /// A start: its files opened and the guest running (the answer
    /// carries its tty).
    Start,
}

impl Held {
    fn is_start(&self) -> bool {
        matches!(self, Held::Start)
    }

    /// How long vmctl waits at most for the answer (a start: once its
    /// VM process was launched).
    fn timeout(&self) -> Duration {
        match self {
            Held::Command(command) => command.reply_timeout(),
            Held::Start => VM_START_TIMEOUT,
        }
    }

    /// How long vmctl waits at most from now: a start's files are opened
    /// first (their helper has FILES_TIMEOUT).
    fn first_deadline(&self) -> Instant {
        let files = if self.is_start() {
            FILES_TIMEOUT
        } else {
            Duration::ZERO
        };
        Instant::now() + files + self.timeout()
    }
}

/// A start, pause or unpause waiting for the VM process: where to send
/// the answer (control's token and the connection's peer id).
struct PendingReply {
    vmid: u32,
    held: Held,
    token: Token,
    peer: u32,
    /// When vmctl gets a time-out instead (a VM process that never answers
    /// must not hold the client and its connection for ever).
    deadline: Instant,
}

struct Parent {
    opts: ParentOptions,
    poll: Poll,
    signals: SignalFd,
    children: Vec<Child>,
    next_token: usize,
    restarts: Vec<(Role, Instant)>,
    /// Children to start again, and when.
    respawns: Vec<(Role, Instant)>,
    /// Our control process bound the socket (so it is ours to remove).
    socket_bound: bool,
    /// Set once shutting down: a state of the loop with its deadlines.
    shutdown: Option<Shutdown>,
    /// The service manager's socket (`$NOTIFY_SOCKET`), if any.
    notify: Option<notify::Notify>,
    /// READY=1 was sent (once control and switch first were ready).
    ready_notified: bool,
    registry: Registry,
    replies: Vec<PendingReply>,
    /// `status` requests held while a VM ends: (control's token, peer).
    held_status: Vec<(Token, u32)>,
    /// `stats` requests waiting for VM processes.
    stats: Vec<PendingStats>,
    /// Configuration files helpers are reading.
    loads: Vec<PendingLoad>,
    /// Local interfaces switch serves DHCP on, with their sockets.
    dhcp: LocalDhcp,
}

/// The daemon's shutdown (SIGTERM, SIGINT, or a child that could not
/// start): every VM got its power button and is forced at its own
/// `shutdown timeout` (the registry's stop deadlines, as for `vmctl
/// stop`); once none is left and the network is removed, control and
/// switch are stopped, then the socket is removed and vmd exits.
struct Shutdown {
    code: ExitCode,
    /// A second SIGTERM or SIGINT forced every VM.
    forced: bool,
    /// Every VM was forced but some have not ended: when vmd stops
    /// waiting for them.
    vms_until: Option<Instant>,
    /// Control and switch were sent SIGTERM: when they get SIGKILL.
    children_until: Option<Instant>,
}

impl Shutdown {
    /// When the loop must look at the shutdown again.
    fn deadline(&self) -> Option<Instant> {
        self.children_until.or(self.vms_until)
    }
}

/// A configuration file a helper reads for `load`, `reload` or SIGHUP.
struct PendingLoad {
    helper: Helper,
    path: PathBuf,
    reload: bool,
    /// Control's token and the connection's peer id; None for SIGHUP.
    reply: Option<(Token, u32)>,
}

pub fn parent_main(opts: ParentOptions) -> ExitCode {
    proc::set_title("vmd: parent");
    // Before any child or thread: the variable is removed.
    let notify = notify::Notify::from_env();
    let mut parent = match parent_init(opts, notify) {
        Ok(parent) => parent,
        Err(e) => {
            log_warn!("{e}");
            return ExitCode::FAILURE;
        }
    };
    log_info!("startup");
    let config = std::mem::take(&mut parent.opts.config);
    for line in parent.registry.apply(&config, true) {
        log_warn!("{line}");
    }
    for role in [Role::Control, Role::Switch] {
        if let Err(e) = parent.spawn(role) {
            log_warn!("{e}");
            parent.begin_shutdown(ExitCode::FAILURE);
        }
    }
    #[cfg(feature = "test-triggers")]
    parent.dhcp_serve_test_interfaces();
    parent.run()
}

fn parent_init(opts: ParentOptions, notify: Option<notify::Notify>) -> Result<Parent, ParentError> {
    let mut mask = SigSet::empty();
    for sig in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        mask.add(sig);
    }
    #[cfg(feature = "test-triggers")]
    mask.add(Signal::SIGUSR1);
    mask.thread_block()
        .map_err(ParentError::setup("block signals"))?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(ParentError::setup("create a signalfd"))?;
    // A guest process whose VM process was killed is reparented to us and reaped
    // by our loop, not left a zombie where init does not reap.
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        log_warn!("cannot become a subreaper: {}", nix::errno::Errno::last());
    }
    let poll = Poll::new().map_err(ParentError::setup("create the event loop"))?;
    poll.registry()
        .register(
            &mut SourceFd(&signals.as_raw_fd()),
            SIGNALS,
            Interest::READABLE,
        )
        .map_err(ParentError::setup("register signals"))?;
    let vm_registry = poll
        .registry()
        .try_clone()
        .map_err(ParentError::setup("share the event loop"))?;
    let launcher = Launcher::new(vm_registry, &opts.socket);
    Ok(Parent {
        opts,
        poll,
        signals,
        children: Vec::new(),
        next_token: 1,
        restarts: Vec::new(),
        respawns: Vec::new(),
        socket_bound: false,
        shutdown: None,
        notify,
        ready_notified: false,
        registry: Registry::with_backend(Box::new(launcher)),
        replies: Vec::new(),
        held_status: Vec::new(),
        stats: Vec::new(),
        loads: Vec::new(),
        dhcp: LocalDhcp::default(),
    })
}

impl Parent {
    fn spawn(&mut self, role: Role) -> Result<(), ParentError> {
        let mut args = vec!["-P".to_string(), role.name().to_string()];
        args.extend((0..log::verbosity()).map(|_| "-v".to_string()));
        if role == Role::Control {
            args.push("-s".to_string());
            args.push(self.opts.socket.display().to_string());
        }
        let (pid, sock) = proc::spawn(role.name(), &args)?;
        let token = Token(self.next_token);
        self.next_token += 1;
        self.poll
            .registry()
            .register(
                &mut SourceFd(&sock.as_raw_fd()),
                token,
                Interest::READABLE | Interest::WRITABLE,
            )
            .map_err(|source| ParentError::Register {
                role: role.name(),
                source,
            })?;
        log_debug!("started {} (pid {pid})", role.name());
        self.children.push(Child {
            role,
            pid,
            token,
            channel: Some(Channel::new(sock)),
            ready: false,
        });
        Ok(())
    }

    fn run(&mut self) -> ExitCode {
        let mut events = Events::with_capacity(64);
        loop {
            if let Some(code) = self.shutdown_step() {
                return code;
            }
            let deadline = [
                self.registry.backend_ref().and_then(|b| b.next_deadline()),
                self.loads.iter().map(|l| l.helper.deadline()).min(),
                self.registry
                    .next_batch()
                    .filter(|_| self.shutdown.is_none()),
                self.registry.next_stop_deadline(),
                self.replies.iter().map(|r| r.deadline).min(),
                self.stats.iter().map(|s| s.deadline).min(),
                self.respawns
                    .iter()
                    .map(|(_, at)| *at)
                    .min()
                    .filter(|_| self.shutdown.is_none()),
                self.shutdown.as_ref().and_then(Shutdown::deadline),
            ]
            .into_iter()
            .flatten()
            .min();
            let timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                log_warn!("event loop: {e}");
                self.kill_all();
                return ExitCode::FAILURE;
            }
            for event in events.iter() {
                match event.token() {
                    SIGNALS => self.handle_signals(),
                    token if self.loads.iter().any(|l| l.helper.token() == token) => {
                        if let Some(index) =
                            self.loads.iter().position(|l| l.helper.token() == token)
                        {
                            self.load_event(index);
                        }
                    }
                    token
                        if self
                            .registry
                            .backend_ref()
                            .is_some_and(|b| b.owns_token(token)) =>
                    {
                        if let Some(backend) = self.registry.backend() {
                            backend.handle_event(token);
                        }
                    }
                    token => self.handle_child(token),
                }
                // Before the next event: a status must see a VM that ended.
                self.backend_events();
                self.send_events();
            }
            if let Some(backend) = self.registry.backend() {
                backend.tick();
            }
            self.backend_events();
            if self.shutdown.is_none()
                && self
                    .registry
                    .next_batch()
                    .is_some_and(|due| due <= Instant::now())
            {
                self.registry.start_batch();
            }
            if self
                .registry
                .next_stop_deadline()
                .is_some_and(|due| due <= Instant::now())
            {
                self.registry.expire_stops();
            }
            self.expire_replies();
            self.answer_stats();
            self.expire_loads();
            self.send_events();
            if self.shutdown.is_none() {
                self.respawn_due();
            }
        }
    }

    /// The `status` table for connection `peer`.
    fn answer_status(&mut self, token: Token, peer: u32) {
        let reply = |message: Message| Frame {
            peer_id: peer,
            ..Frame::new(message)
        };
        for info in self.registry.status() {
            self.send(token, reply(Message::CtlVm(info)));
        }
        self.send(token, reply(Message::CtlVmEnd));
    }

    /// Handles what the backend reported (events can bring more: a
    /// reboot's restart that fails at once), then answers the `status`
    /// requests held for a VM that was ending.
    fn backend_events(&mut self) {
        loop {
            let events = match self.registry.backend() {
                Some(backend) => backend.take_events(),
                None => return,
            };
            if events.is_empty() {
                if !self.held_status.is_empty()
                    && !self.registry.backend_ref().is_some_and(|b| b.is_ending())
                {
                    for (token, peer) in std::mem::take(&mut self.held_status) {
                        self.answer_status(token, peer);
                    }
                }
                return;
            }
            for event in events {
                match event {
                    VmEvent::Running { id } => self.vm_running(id),
                    VmEvent::CommandDone(done) => self.vm_command_done(done),
                    VmEvent::CommandProgress { id, command, note } => {
                        self.vm_command_progress(id, command, note)
                    }
                    VmEvent::StartProgress { id, note } => self.vm_start_progress(id, note),
                    VmEvent::Launched { id, pid, tty } => self.vm_launched(id, pid, tty),
                    VmEvent::Ended(ended) => {
                        for pending in &mut self.stats {
                            pending.forget(ended.id);
                        }
                        self.answer_stats();
                        self.vm_ended(ended);
                    }
                    VmEvent::LocalInterfaces {
                        id,
                        name,
                        nics,
                        net_boot,
                    } => self.dhcp_serve_vm(id, &name, &nics, net_boot),
                    VmEvent::InterfacesClosed { id } => self.dhcp_stop_vm(id),
                    VmEvent::Stats { id, stats } => {
                        if let Some(pending) = self.stats.iter_mut().find(|p| p.waits_for(id)) {
                            pending.answered(id, &stats);
                        }
                        self.answer_stats();
                    }
                }
            }
        }
    }

    /// Sends the `stats` answers that are complete or out of time.
    fn answer_stats(&mut self) {
        let now = Instant::now();
        let (done, rest): (Vec<PendingStats>, Vec<PendingStats>) = std::mem::take(&mut self.stats)
            .into_iter()
            .partition(|p| p.is_complete() || p.deadline <= now);
        self.stats = rest;
        for pending in done {
            let token = pending.token;
            for frame in pending.frames() {
                self.send(token, frame);
            }
        }
    }

    /// Sends the registry's lifecycle events to control, which hands
    /// them to its `events` listeners (peer id 0: for all of them).
    fn send_events(&mut self) {
        let events = self.registry.take_events();
        if events.is_empty() {
            return;
        }
        let Some(token) = self
            .children
            .iter()
            .find(|c| c.role == Role::Control)
            .map(|c| c.token)
        else {
            return;
        };
        for event in events {
            log_debug!(
                "event: vm {} {}: {}",
                event.vmid,
                event.name,
                event.kind.as_str()
            );
            self.send(token, Frame::new(Message::CtlEvent(event)));
        }
    }

    /// Answers the held replies whose VM process has not confirmed in
    /// time: a pause or unpause with ETIMEDOUT; a start with a time-out
    /// error, and the VM that did not come up is stopped.
    fn expire_replies(&mut self) {
        let now = Instant::now();
        let (expired, rest): (Vec<PendingReply>, Vec<PendingReply>) =
            std::mem::take(&mut self.replies)
                .into_iter()
                .partition(|r| r.deadline <= now);
        self.replies = rest;
        for reply in expired {
            let secs = reply.held.timeout().as_secs();
            let error = match &reply.held {
                Held::Command(command) => {
                    log_warn!("vm {}: no answer to {command:?} within {secs}s", reply.vmid);
                    CtlError::Errno(libc::ETIMEDOUT)
                }
                Held::Start => {
                    let vmid = reply.vmid;
                    log_warn!("vm {vmid}: the guest did not start within {secs}s; stopping it");
                    let root = Credentials::default();
                    if let Err(e) = self.registry.stop(&VmTarget::Id(vmid), true, false, &root) {
                        log_warn!("vm {vmid}: cannot stop it: {}", e.describe());
                    }
                    CtlError::Text(format!(
                        "vm {vmid} did not start within {secs} seconds; it was stopped"
                    ))
                }
            };
            self.answer(vec![reply], Err(error));
        }
    }

    fn handle_signals(&mut self) {
        loop {
            let info = match self.signals.read_signal() {
                Ok(Some(info)) => info,
                Ok(None) => return,
                Err(e) => {
                    log_warn!("reading signals: {e}");
                    return;
                }
            };
            match Signal::try_from(info.ssi_signo as i32) {
                Ok(Signal::SIGCHLD) => self.reap(),
                Ok(sig @ (Signal::SIGTERM | Signal::SIGINT)) if self.shutdown.is_none() => {
                    log_info!("received {}, shutting down", sig.as_str());
                    self.begin_shutdown(ExitCode::SUCCESS);
                }
                Ok(sig @ (Signal::SIGTERM | Signal::SIGINT)) => {
                    log_info!("received {} again: forcing the VMs", sig.as_str());
                    self.shutdown_force();
                }
                Ok(Signal::SIGHUP) if self.shutdown.is_some() => {
                    log_info!("SIGHUP: shutting down, not reloading");
                }
                Ok(Signal::SIGHUP) => {
                    log_info!("SIGHUP: reloading {}", self.opts.config_path.display());
                    if let Err(lines) = self.load_start(None, None) {
                        for line in lines {
                            log_warn!("{line}");
                        }
                        log_warn!("reload failed; nothing changed");
                    }
                }
                #[cfg(feature = "test-triggers")]
                Ok(Signal::SIGUSR1) => self.set_verbosity(log::verbosity().saturating_add(1)),
                _ => {}
            }
        }
    }

    /// Changes the verbosity here and in every child (`vmctl log`; test
    /// builds also on SIGUSR1).
    fn set_verbosity(&mut self, level: u8) {
        log::set_verbosity(level);
        log_debug!("verbosity now {level}");
        for token in self.children.iter().map(|c| c.token).collect::<Vec<_>>() {
            self.send(token, Frame::new(Message::SetVerbosity { level }));
        }
    }

    fn send(&mut self, token: Token, frame: Frame) {
        let Some(child) = self.children.iter_mut().find(|c| c.token == token) else {
            return;
        };
        let Some(channel) = child.channel.as_mut() else {
            return;
        };
        if let Err(e) = channel.send(frame) {
            let reason = format!("sending to it: {e}");
            self.close_child(token, &reason);
        }
    }

    fn handle_child(&mut self, token: Token) {
        let Some(child) = self.children.iter_mut().find(|c| c.token == token) else {
            return;
        };
        let Some(channel) = child.channel.as_mut() else {
            return;
        };
        let role = child.role;
        let result = channel.flush().and_then(|_| channel.receive());
        let (frames, eof) = match result {
            Ok(received) => received,
            Err(e) => {
                self.close_child(token, &e.to_string());
                return;
            }
        };
        for frame in frames {
            self.dispatch(token, role, frame);
        }
        if eof {
            if let Some(child) = self.children.iter_mut().find(|c| c.token == token) {
                if let Some(channel) = child.channel.take() {
                    let _ = self
                        .poll
                        .registry()
                        .deregister(&mut SourceFd(&channel.sock.as_raw_fd()));
                }
            }
        }
    }

    fn dispatch(&mut self, token: Token, role: Role, frame: Frame) {
        let name = role.name();
        match frame.message {
            Message::Ready { role: claimed } if claimed == role => {
                if let Some(child) = self.children.iter_mut().find(|c| c.token == token) {
                    child.ready = true;
                    log_debug!("{name} (pid {}) ready", child.pid);
                    if role == Role::Control {
                        self.socket_bound = true;
                        self.set_socket_owner();
                    }
                    if role == Role::Switch {
                        // Started or restarted: every socket, again.
                        for frame in self.dhcp.frames() {
                            self.send(token, frame);
                        }
                    }
                    self.notify_ready();
                }
            }
            Message::CtlForward { creds, request } if role == Role::Control => {
                self.dispatch_control(token, frame.peer_id, &creds, request, frame.fd)
            }
            Message::SwitchPortGone { port } if role == Role::Switch => {
                log_debug!("dhcp {port}: its interface is gone");
                self.dhcp.gone(port);
            }
            Message::Log { level, text } => log::write_line(level, &format!("{name}: {text}")),
            Message::RefusedSyscall { nr, name: call } => {
                log_warn!("{name}: refused system call {call} ({nr})")
            }
            other => log_warn!("{name}: unexpected message {}", other.type_code().1),
        }
    }

    /// Answers one vmctl command forwarded by control for connection
    /// `peer`, with the client's descriptor `fd` for a request that
    /// [`takes_fd`](CtlRequest::takes_fd).
    fn dispatch_control(
        &mut self,
        token: Token,
        peer: u32,
        creds: &Credentials,
        request: CtlRequest,
        fd: Option<OwnedFd>,
    ) {
        log_debug!(
            "{} from uid {} (connection {peer})",
            request.name(),
            creds.uid
        );
        let reply = |message: Message| Frame {
            peer_id: peer,
            ..Frame::new(message)
        };
        let fail = |errno: i32, lines: Vec<String>| reply(Message::CtlFail { errno, lines });
        let vm_result = |result: Result<u32, CtlError>| match result {
            Ok(vmid) => reply(Message::CtlVmResult {
                vmid,
                error: None,
                tty: None,
            }),
            Err(error) => reply(Message::CtlVmResult {
                vmid: 0,
                error: Some(error),
                tty: None,
            }),
        };
        // What a client can see in /proc is what it is told: a child that
        // has died is reaped (without waiting) before the answer.
        self.reap();
        if let Some(backend) = self.registry.backend() {
            backend.settle();
        }
        self.backend_events();
        // Control refuses these already; a second look costs nothing.
        if !creds.is_root() && !request.open_to_users() {
            self.send(token, fail(libc::EPERM, Vec::new()));
            return;
        }
        if let Some(why) = common::ctl::fd_refusal(&request, fd.is_some()) {
            self.send(token, fail(libc::EINVAL, vec![why]));
            return;
        }
        if self.shutdown.is_some() && shutdown_refuses(&request) {
            let why = format!("vmd is shutting down: {} refused", request.name());
            self.send(token, fail(libc::ESHUTDOWN, vec![why]));
            return;
        }
        let answer = match request {
            CtlRequest::Status => {
                // A VM whose guest processes still exit (its disks still
                // locked) is shown once it has ended: at most
                // GUEST_GONE_WAIT later.
                if self.registry.backend_ref().is_some_and(|b| b.is_ending()) {
                    self.held_status.push((token, peer));
                    return;
                }
                self.answer_status(token, peer);
                return;
            }
            CtlRequest::Start(req) => {
                // Answered once the guest runs (vm_running) or could not
                // start (vm_ended).
                let result = self.registry.start(&req, creds);
                match self.hold_reply(result, Held::Start, token, peer) {
                    Some(error) => vm_result(Err(error)),
                    None => return,
                }
            }
            CtlRequest::Stop {
                target,
                force,
                wait,
            } => vm_result(self.registry.stop(&target, force, wait, creds)),
            CtlRequest::Wait { target } => vm_result(self.registry.wait(&target, creds)),
            CtlRequest::Pause { target } => {
                let result = self.registry.pause(&target, creds);
                match self.hold_reply(result, Held::Command(VmCommand::Pause), token, peer) {
                    Some(error) => vm_result(Err(error)),
                    None => return,
                }
            }
            CtlRequest::Unpause { target } => {
                let result = self.registry.unpause(&target, creds);
                match self.hold_reply(result, Held::Command(VmCommand::Unpause), token, peer) {
                    Some(error) => vm_result(Err(error)),
                    None => return,
                }
            }
            // Answered once a helper read the file (load_answered).
            CtlRequest::Load { path } => {
                match self.load_start(Some(PathBuf::from(path)), Some((token, peer))) {
                    Ok(()) => return,
                    Err(lines) => fail(0, lines),
                }
            }
            CtlRequest::Reload => match self.load_start(None, Some((token, peer))) {
                Ok(()) => return,
                Err(lines) => fail(0, lines),
            },
            // Control holds these itself; one that came here anyway is
            // refused.
            CtlRequest::Events { .. } => {
                fail(libc::EINVAL, vec!["events: not for the parent".into()])
            }
            CtlRequest::Stats { target } => {
                let pending = PendingStats::begin(&mut self.registry, target.as_ref(), token, peer);
                self.stats.push(pending);
                self.answer_stats();
                return;
            }
            CtlRequest::Reset { what } => {
                self.registry.reset(what);
                reply(Message::CtlOk { lines: Vec::new() })
            }
            CtlRequest::Verbose { level } => {
                self.set_verbosity(level);
                reply(Message::CtlOk { lines: Vec::new() })
            }
            CtlRequest::Probe {
                target,
                text,
                steps,
            } => {
                let command = VmCommand::Probe { text, steps };
                let result = match (probe_refusal(&command), fd) {
                    (None, Some(fd)) => {
                        self.registry
                            .command_with_fd(&target, command.clone(), fd, creds)
                    }
                    // (no descriptor: fd_refusal said so already)
                    (refusal, _) => Err(refusal.unwrap_or(CtlError::Errno(libc::EBADF))),
                };
                match self.hold_reply(result, Held::Command(command), token, peer) {
                    Some(error) => vm_result(Err(error)),
                    None => return,
                }
            }
            CtlRequest::Send { target } => {
                // Answered when the stream is whole or has failed.
                let command = self.registry.send_command(&target, creds);
                // One at a time: its answer goes to every send held for it.
                let sending = |vmid: u32| {
                    self.replies.iter().any(|r| {
                        r.vmid == vmid && matches!(r.held, Held::Command(VmCommand::Send { .. }))
                    })
                };
                let result = match (command.clone(), fd) {
                    (Ok((vmid, _)), _) if sending(vmid) => Err(CtlError::explained(
                        nix::errno::Errno::EBUSY,
                        format!("a send of vm {vmid} is under way"),
                    )),
                    (Ok((_, command)), Some(fd)) => {
                        self.registry.command_with_fd(&target, command, fd, creds)
                    }
                    (Err(error), _) => Err(error),
                    // (no descriptor: fd_refusal said so already)
                    (Ok(_), None) => Err(CtlError::Errno(libc::EBADF)),
                };
                let held = Held::Command(command.map_or(VmCommand::Pause, |(_, c)| c));
                match self.hold_reply(result, held, token, peer) {
                    Some(error) => vm_result(Err(error)),
                    None => return,
                }
            }
            CtlRequest::Receive { name, header } => {
                // Answered as a start: once the guest runs, resumed
                // after the stream's hash checked out.
                let result = match (registry::receive_request(&name, &header), fd) {
                    (Ok(req), Some(fd)) => {
                        let incoming = backend::Incoming { header, fd };
                        self.registry.receive(&req, creds, incoming)
                    }
                    (Err(error), _) => Err(error),
                    // (no descriptor: fd_refusal said so already)
                    (Ok(_), None) => Err(CtlError::Errno(libc::EBADF)),
                };
                match self.hold_reply(result, Held::Start, token, peer) {
                    Some(error) => vm_result(Err(error)),
                    None => return,
                }
            }
        };
        self.send(token, answer);
    }

    /// A start, pause or unpause the VM process was asked for is answered
    /// when it has been done (vm_running, vm_command_done, vm_ended, or
    /// after its time-out); a refused one at once (Some).
    fn hold_reply(
        &mut self,
        result: Result<u32, CtlError>,
        held: Held,
        token: Token,
        peer: u32,
    ) -> Option<CtlError> {
        match result {
            Ok(vmid) => {
                let deadline = held.first_deadline();
                self.replies.push(PendingReply {
                    vmid,
                    held,
                    token,
                    peer,
                    deadline,
                });
                None
            }
            Err(error) => Some(error),
        }
    }

    /// VM `vmid` was launched: its start has VM_START_TIMEOUT from now
    /// for the guest to run.
    fn vm_launched(&mut self, vmid: u32, pid: u32, tty: String) {
        self.registry.launched(vmid, pid, tty);
        let deadline = Instant::now() + VM_START_TIMEOUT;
        for reply in &mut self.replies {
            if reply.vmid == vmid && reply.held.is_start() {
                reply.deadline = deadline;
            }
        }
    }

    /// VM `vmid`'s start from a stream makes progress: it has
    /// VM_START_TIMEOUT from now again, and its client hears how far.
    fn vm_start_progress(&mut self, vmid: u32, note: String) {
        let deadline = Instant::now() + VM_START_TIMEOUT;
        let clients = self
            .replies
            .iter_mut()
            .filter(|r| r.vmid == vmid && r.held.is_start())
            .map(|r| {
                r.deadline = deadline;
                (r.token, r.peer)
            })
            .collect();
        self.tell_progress(clients, vmid, &note);
    }

    /// Tells `clients` (held replies' connections) how far VM `vmid`'s
    /// request has come.
    fn tell_progress(&mut self, clients: Vec<(Token, u32)>, vmid: u32, note: &str) {
        for (token, peer) in clients {
            let progress = Message::CtlProgress {
                vmid,
                note: note.to_string(),
            };
            self.send(
                token,
                Frame {
                    peer_id: peer,
                    ..Frame::new(progress)
                },
            );
        }
    }

    /// VM `vmid`'s guest runs: its start is answered.
    fn vm_running(&mut self, vmid: u32) {
        self.registry.guest_running(vmid);
        self.answer_pending(vmid, Held::is_start, Ok(vmid));
    }

    /// A VM process answered a command: the registry updates the VM, and
    /// the pause or unpause waiting for it gets its answer.
    fn vm_command_done(&mut self, done: CommandDone) {
        let command = Held::Command(done.command.clone());
        let result = self
            .registry
            .command_done(done.id, done.command, done.error);
        self.answer_pending(done.id, |held| *held == command, result);
    }

    /// A VM process reports that a long command is under way: its client
    /// hears how far, and its reply deadline starts again.
    fn vm_command_progress(&mut self, vmid: u32, command: VmCommand, note: String) {
        let clients = progress_made(&mut self.replies, vmid, command, Instant::now());
        self.tell_progress(clients, vmid, &note);
    }

    /// Answers the held replies of VM `vmid` that `which` selects.
    fn answer_pending(
        &mut self,
        vmid: u32,
        which: impl Fn(&Held) -> bool,
        result: Result<u32, CtlError>,
    ) {
        let (matching, rest): (Vec<PendingReply>, Vec<PendingReply>) =
            std::mem::take(&mut self.replies)
                .into_iter()
                .partition(|r| r.vmid == vmid && which(&r.held));
        self.replies = rest;
        self.answer(matching, result);
    }

    /// Sends `result` to each held reply in `replies` (a start's success
    /// with the VM's tty).
    fn answer(&mut self, replies: Vec<PendingReply>, result: Result<u32, CtlError>) {
        for reply in replies {
            let message = match &result {
                Ok(vmid) => Message::CtlVmResult {
                    vmid: *vmid,
                    error: None,
                    tty: match reply.held {
                        Held::Start => Some(self.registry.tty(*vmid).unwrap_or_default()),
                        Held::Command(_) => None,
                    },
                },
                Err(error) => Message::CtlVmResult {
                    vmid: 0,
                    error: Some(error.clone()),
                    tty: None,
                },
            };
            self.send(
                reply.token,
                Frame {
                    peer_id: reply.peer,
                    ..Frame::new(message)
                },
            );
        }
    }

    /// A VM process has ended (it was reaped and launch.rs released what it
    /// held): the registry restarts the VM after a reboot or else marks
    /// it terminated, and then control releases everyone waiting for it.
    fn vm_ended(&mut self, ended: VmEnded) {
        let vmid = ended.id;
        // A start still held failed: the guest never ran, or ended before
        // its running was read.
        let error = ended.launch_error.clone().unwrap_or_else(|| {
            let why = ended
                .start_failure
                .clone()
                .unwrap_or_else(|| format!("it ended as it started ({})", ended.why));
            CtlError::Text(format!("vm {}: {why}", ended.name))
        });
        self.answer_pending(vmid, Held::is_start, Err(error));
        let outcome = self.registry.ended(&ended);
        if outcome == Ended::Restarted {
            return;
        }
        self.answer_pending(
            vmid,
            |_| true,
            Err(CtlError::Text(format!("vm {vmid} terminated"))),
        );
        let Ended::Terminated { timed_out } = outcome else {
            return;
        };
        let control = self
            .children
            .iter()
            .find(|c| c.role == Role::Control)
            .map(|c| c.token);
        if let Some(token) = control {
            self.send(
                token,
                Frame::new(Message::CtlTerminated { vmid, timed_out }),
            );
        }
    }

    /// `vmctl load FILE` (`file`), or `vmctl reload` and SIGHUP (None: the
    /// file vmd started with): a helper reads and parses the file (it may
    /// lie on a file system that hangs, and owners are looked up by
    /// name), and [`Parent::load_answered`] applies it; `reply` is whom
    /// to answer then (None for SIGHUP). Err: the helper did not start.
    fn load_start(
        &mut self,
        file: Option<PathBuf>,
        reply: Option<(Token, u32)>,
    ) -> Result<(), Vec<String>> {
        let reload = file.is_none();
        if reload {
            self.notify_send(&notify::reloading_text());
        }
        let (path, required) = match file {
            Some(path) => (path, true),
            None => (self.opts.config_path.clone(), self.opts.config_required),
        };
        let token = Token(self.next_token);
        self.next_token += 1;
        let defines = self.opts.defines.clone();
        let work_path = path.clone();
        let helper = Helper::spawn(self.poll.registry(), token, OPEN_TIMEOUT, move || {
            let answer = match config::load(&work_path, &defines, required) {
                Ok(loaded) => HelperAnswer::Config {
                    config: Box::new(loaded.config),
                    warnings: loaded.warnings,
                },
                Err(lines) => HelperAnswer::ConfigRefused { lines },
            };
            (Vec::new(), Ok(answer))
        })
        .map_err(|e| vec![format!("cannot read {}: {e}", path.display())])?;
        self.loads.push(PendingLoad {
            helper,
            path,
            reload,
            reply,
        });
        Ok(())
    }

    /// A configuration's helper answered (or failed): a file with errors
    /// changes nothing, the error lines come back, cut to what fits in
    /// one answer; else it is applied and its warnings come back.
    fn load_answered(&mut self, load: PendingLoad, outcome: Result<Answered, HelperError>) {
        if load.reload {
            // Reloaded or not, vmd runs on (RELOADING=1 was sent).
            self.notify_send("READY=1");
        }
        let path = load.path.display().to_string();
        let result = match outcome {
            Ok((_, HelperAnswer::Config { config, warnings })) => {
                Ok(self.load_apply(&load.path, load.reload, &config, warnings))
            }
            Ok((_, HelperAnswer::ConfigRefused { lines })) => Err(lines),
            Ok(_) => Err(vec![format!(
                "reading {path}: the helper's answer is garbled"
            )]),
            Err(e) => Err(vec![format!("reading {path}: {e}")]),
        };
        let result = result.map_err(|lines| {
            for line in &lines {
                log_warn!("{line}");
            }
            fit_lines(lines)
        });
        let Some((token, peer)) = load.reply else {
            if result.is_err() {
                log_warn!("reload failed; nothing changed");
            }
            return;
        };
        let message = match result {
            Ok(lines) => Message::CtlOk { lines },
            Err(lines) => Message::CtlFail { errno: 0, lines },
        };
        self.send(
            token,
            Frame {
                peer_id: peer,
                ..Frame::new(message)
            },
        );
    }

    /// Applies a configuration read from `path`; the lines to show.
    fn load_apply(
        &mut self,
        path: &std::path::Path,
        reload: bool,
        config: &Config,
        warnings: Vec<String>,
    ) -> Vec<String> {
        for line in &warnings {
            log_warn!("{line}");
        }
        let skipped = self.registry.apply(config, reload);
        for line in &skipped {
            log_warn!("{line}");
        }
        log_info!(
            "{} {}",
            if reload { "reloaded" } else { "loaded" },
            path.display()
        );
        let path_text = path.display().to_string();
        self.registry.daemon_event(if reload {
            EventKind::ConfigReloaded { path: path_text }
        } else {
            EventKind::ConfigLoaded { path: path_text }
        });
        if reload {
            self.set_socket_owner();
        }
        fit_lines(warnings.into_iter().chain(skipped).collect())
    }

    /// Reads a configuration helper's socket.
    fn load_event(&mut self, index: usize) {
        let registry = self.poll.registry();
        if let Some(outcome) = self.loads[index].helper.read(registry) {
            let load = self.loads.remove(index);
            self.load_answered(load, outcome);
        }
    }

    /// Gives up the configuration helpers whose deadline passed.
    fn expire_loads(&mut self) {
        let now = Instant::now();
        while let Some(index) = self.loads.iter().position(|l| l.helper.deadline() <= now) {
            let mut load = self.loads.remove(index);
            let e = load.helper.expire(self.poll.registry());
            self.load_answered(load, Err(e));
        }
    }

    /// Gives the control socket the owner `socket owner` names (control
    /// bound it root:root and cannot chown once it dropped its privileges).
    fn set_socket_owner(&self) {
        use std::os::unix::fs::FileTypeExt;
        let path = &self.opts.socket;
        let owner = &self.registry.globals.socket_owner;
        let gid = owner.gid.unwrap_or(0);
        if !std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
            log_warn!("{} is not a socket: its owner was not set", path.display());
            return;
        }
        if let Err(e) = nix::unistd::fchownat(
            None,
            path.as_path(),
            Some(nix::unistd::Uid::from_raw(owner.uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            log_warn!(
                "cannot set the owner of {} to {}:{gid}: {e}",
                path.display(),
                owner.uid
            );
        }
    }

    /// Closes a child's channel after an error; killing it lets the usual
    /// path (reap, restart) take over.
    fn close_child(&mut self, token: Token, reason: &str) {
        let Some(child) = self.children.iter_mut().find(|c| c.token == token) else {
            return;
        };
        log_warn!(
            "{} (pid {}): closing its channel: {reason}",
            child.role.name(),
            child.pid
        );
        if let Some(channel) = child.channel.take() {
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&channel.sock.as_raw_fd()));
        }
        let _ = kill(child.pid, Signal::SIGKILL);
    }

    /// Starts serving DHCP on a local interface: opens its packet socket
    /// and passes it to switch (now if switch is ready, else when it is).
    /// The caller (the local tap's setup) gives the tap's ifindex and the
    /// VM's name, id, interface index, MAC and whether it boots from the
    /// network; the addresses come from `local prefix`.
    pub(crate) fn dhcp_serve(&mut self, nic: &LocalInterface) -> Result<(), DhcpError> {
        let frame = self.dhcp.serve(self.registry.globals.local_prefix, nic)?;
        if let Some(token) = self.switch_token() {
            self.send(token, frame);
        }
        Ok(())
    }

    /// VM `vmid` was launched with local interfaces: DHCP serves each (a
    /// restart after a reboot serves them anew). One that cannot be
    /// served is logged; the guest runs without its lease.
    fn dhcp_serve_vm(&mut self, vmid: u32, name: &str, nics: &[LocalNic], net_boot: bool) {
        for nic in nics {
            let local = LocalInterface {
                ifindex: nic.ifindex,
                vm_name: name,
                vmid,
                index: nic.index,
                mac: nic.mac,
                net_boot,
            };
            match self.dhcp_serve(&local) {
                Ok(()) => log_debug!("{name}: dhcp serves interface {}", nic.index),
                Err(e) => log_warn!("{name}: no DHCP on interface {}: {e}", nic.index),
            }
        }
    }

    /// VM `vmid`'s taps are closed: its interfaces are served no more.
    fn dhcp_stop_vm(&mut self, vmid: u32) {
        for frame in self.dhcp.stop_vm(vmid) {
            if let Some(token) = self.switch_token() {
                self.send(token, frame);
            }
        }
    }

    /// The switch child, once it has dropped its privileges.
    fn switch_token(&self) -> Option<Token> {
        self.children
            .iter()
            .find(|c| c.role == Role::Switch && c.ready && c.channel.is_some())
            .map(|c| c.token)
    }

    /// Test builds: serve the interfaces VMD_TEST_DHCP_SERVE names
    /// (trigger.rs); one that cannot be served shuts vmd down.
    #[cfg(feature = "test-triggers")]
    fn dhcp_serve_test_interfaces(&mut self) {
        let specs = match crate::trigger::dhcp_serve() {
            Ok(specs) => specs,
            Err(e) => {
                log_warn!("{e}");
                self.begin_shutdown(ExitCode::FAILURE);
                return;
            }
        };
        for spec in specs {
            let name = std::ffi::CString::new(spec.ifname.as_str()).unwrap_or_default();
            // SAFETY: reads a NUL-terminated name we own.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            if ifindex == 0 {
                let e = std::io::Error::last_os_error();
                log_warn!("VMD_TEST_DHCP_SERVE: no interface {}: {e}", spec.ifname);
                self.begin_shutdown(ExitCode::FAILURE);
                return;
            }
            let nic = LocalInterface {
                ifindex,
                vm_name: &spec.vm_name,
                vmid: spec.vmid,
                index: spec.index,
                mac: spec.mac,
                net_boot: spec.net_boot,
            };
            match self.dhcp_serve(&nic) {
                Ok(()) => log_debug!(
                    "dhcp: serving {} as vm {} interface {}",
                    spec.ifname,
                    spec.vmid,
                    spec.index
                ),
                Err(e) => {
                    log_warn!("{e}");
                    self.begin_shutdown(ExitCode::FAILURE);
                    return;
                }
            }
        }
    }

    /// Collects dead children, says why they died, restarts them.
    fn reap(&mut self) {
        loop {
            let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => return,
                Ok(status) => status,
                Err(e) => {
                    log_warn!("waitpid: {e}");
                    return;
                }
            };
            let Some(pid) = status.pid() else { continue };
            if let Some(index) = self.loads.iter().position(|l| l.helper.pid() == pid) {
                let outcome = self.loads[index].helper.reaped(self.poll.registry());
                let load = self.loads.remove(index);
                self.load_answered(load, outcome);
                continue;
            }
            let Some(index) = self.children.iter().position(|c| c.pid == pid) else {
                // A VM process, a helper, or an orphan (a guest process whose VM
                // process was killed, a helper's own helper).
                if let Some(backend) = self.registry.backend() {
                    backend.reaped(pid, status);
                }
                continue;
            };
            let mut child = self.children.remove(index);
            if let Some(channel) = child.channel.take() {
                // Read what it said last (why it failed, which call was refused).
                let mut channel = channel;
                if let Ok((frames, _)) = channel.receive() {
                    for frame in frames {
                        self.dispatch(child.token, child.role, frame);
                    }
                }
                let _ = self
                    .poll
                    .registry()
                    .deregister(&mut SourceFd(&channel.sock.as_raw_fd()));
            }
            self.child_died(&child, status);
        }
    }

    fn child_died(&mut self, child: &Child, status: WaitStatus) {
        let name = child.role.name();
        let why = proc::describe_exit(status);
        if self.shutdown.is_some() {
            log_debug!("{name} (pid {}) {why}", child.pid);
            return;
        }
        if !child.ready {
            log_warn!(
                "{name} (pid {}) {why} before it was ready; shutting down",
                child.pid
            );
            self.begin_shutdown(ExitCode::FAILURE);
            return;
        }
        let now = Instant::now();
        self.restarts
            .retain(|(_, when)| now.duration_since(*when) < RESTART_WINDOW);
        let recent = self
            .restarts
            .iter()
            .filter(|(role, _)| *role == child.role)
            .count();
        // A crash loop slows down instead of taking the VMs with it.
        let at = if recent >= MAX_RESTARTS {
            log_warn!(
                "{name} (pid {}) {why}; restarted {MAX_RESTARTS} times in {}s, restarting it in {}s",
                child.pid,
                RESTART_WINDOW.as_secs(),
                RESTART_BACKOFF.as_secs()
            );
            now + RESTART_BACKOFF
        } else {
            log_warn!("{name} (pid {}) {why}; restarting it", child.pid);
            now
        };
        self.restarts.push((child.role, at));
        self.respawns.push((child.role, at));
        self.respawn_due();
    }

    /// Starts the children whose restart is due; one that cannot start
    /// shuts vmd down.
    fn respawn_due(&mut self) {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.respawns)
            .into_iter()
            .partition(|(_, at)| *at <= now);
        self.respawns = later;
        for (role, _) in due {
            if let Err(e) = self.spawn(role) {
                log_warn!("cannot restart {}: {e}; shutting down", role.name());
                self.begin_shutdown(ExitCode::FAILURE);
                return;
            }
        }
    }

    /// Shuts the daemon down (a state of the loop, [`Shutdown`]): every
    /// running VM gets its power button at once and is forced at its
    /// `shutdown timeout` as a `vmctl stop` would be; VMs waiting for a
    /// staggered start stay stopped, starts still opening their files are
    /// given up, and the network is removed once the last VM has ended
    /// ([`Parent::shutdown_step`] takes it from there).
    fn begin_shutdown(&mut self, code: ExitCode) {
        if self.shutdown.is_some() {
            return;
        }
        self.shutdown = Some(Shutdown {
            code,
            forced: false,
            vms_until: None,
            children_until: None,
        });
        self.shutdown_stop_vms(false);
        if let Some(backend) = self.registry.backend() {
            backend.stop_all();
        }
        // systemd's stop timeout cannot know the longest shutdown timeout:
        // vmd tells it how long it may take from now.
        let left = self
            .registry
            .last_stop_deadline()
            .map_or(Duration::ZERO, |d| {
                d.saturating_duration_since(Instant::now())
            });
        let margin = SHUTDOWN_KILL_WAIT + SHUTDOWN_GRACE * 2;
        self.notify_send(&notify::stopping_text(left + margin));
    }

    /// Asks every running VM to power down (`force`: kills it); one
    /// already stopping keeps its deadline unless forced.
    fn shutdown_stop_vms(&mut self, force: bool) {
        let root = Credentials::default();
        for info in self.registry.status() {
            if !info.state.is_active() {
                continue;
            }
            match self
                .registry
                .stop(&VmTarget::Id(info.id), force, true, &root)
            {
                Ok(_) | Err(CtlError::StopInvalid) => {}
                Err(e) => log_warn!("{}: cannot stop it: {}", info.name, e.describe()),
            }
        }
    }

    /// A second SIGTERM or SIGINT: every VM is forced at once.
    fn shutdown_force(&mut self) {
        match self.shutdown.as_mut() {
            Some(shutdown) if !shutdown.forced => shutdown.forced = true,
            _ => return,
        }
        self.shutdown_stop_vms(true);
        if let Some(backend) = self.registry.backend() {
            backend.kill_all();
        }
    }

    /// Moves the shutdown on (called at each turn of the loop): once no
    /// VM is left and the network is removed, control and switch get
    /// SIGTERM, then SIGKILL after SHUTDOWN_GRACE; once they are gone the
    /// socket is removed and the exit code returned. VMs forced that do
    /// not end within SHUTDOWN_KILL_WAIT are given up on.
    fn shutdown_step(&mut self) -> Option<ExitCode> {
        let now = Instant::now();
        let vms_left = self.registry.backend_ref().is_some_and(|b| !b.is_empty());
        let stops_pending = self.registry.next_stop_deadline().is_some();
        let shutdown = self.shutdown.as_mut()?;
        if shutdown.children_until.is_none() {
            let mut vms_done = !vms_left;
            if vms_left && !stops_pending {
                let until = *shutdown.vms_until.get_or_insert(now + SHUTDOWN_KILL_WAIT);
                if now >= until {
                    log_warn!(
                        "VMs still ending {}s after they were killed; exiting without them",
                        SHUTDOWN_KILL_WAIT.as_secs()
                    );
                    vms_done = true;
                }
            }
            if !vms_done {
                return None;
            }
            shutdown.children_until = Some(now + SHUTDOWN_GRACE);
            for child in &self.children {
                let _ = kill(child.pid, Signal::SIGTERM);
            }
        }
        let code = shutdown.code;
        if self.children.is_empty() {
            self.cleanup();
            log_info!("terminating");
            return Some(code);
        }
        if shutdown.children_until.is_some_and(|until| now >= until) {
            shutdown.children_until = Some(now + SHUTDOWN_GRACE);
            for child in &self.children {
                log_warn!(
                    "{} (pid {}) did not exit; killing it",
                    child.role.name(),
                    child.pid
                );
                let _ = kill(child.pid, Signal::SIGKILL);
            }
        }
        None
    }

    /// READY=1 to the service manager, once: control and switch are
    /// ready (the configuration was loaded before they started).
    fn notify_ready(&mut self) {
        let all_ready = [Role::Control, Role::Switch]
            .iter()
            .all(|role| self.children.iter().any(|c| c.role == *role && c.ready));
        if self.ready_notified || !all_ready || self.shutdown.is_some() {
            return;
        }
        self.ready_notified = true;
        self.notify_send("READY=1");
    }

    fn notify_send(&self, text: &str) {
        if let Some(notify) = &self.notify {
            notify.send(text);
        }
    }

    fn kill_all(&mut self) {
        for child in &self.children {
            let _ = kill(child.pid, Signal::SIGKILL);
        }
        if let Some(backend) = self.registry.backend() {
            backend.kill_all();
        }
        self.cleanup();
    }

    /// Removes the control socket: the chrooted control process cannot.
    fn cleanup(&self) {
        use std::os::unix::fs::FileTypeExt;
        let path = &self.opts.socket;
        if self.socket_bound
            && std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
        {
            if let Err(e) = std::fs::remove_file(path) {
                log_warn!("cannot remove {}: {e}", path.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_moves_only_its_commands_deadline() {
        let t0 = Instant::now();
        let probe = VmCommand::Probe {
            text: String::new(),
            steps: 1,
        };
        let held = |vmid, held, peer| PendingReply {
            vmid,
            held,
            token: Token(1),
            peer,
            deadline: t0 + Duration::from_secs(1),
        };
        let mut replies = vec![
            held(1, Held::Command(probe.clone()), 10),
            held(1, Held::Command(VmCommand::Pause), 11),
            held(2, Held::Command(probe.clone()), 12),
            held(1, Held::Start, 13),
        ];
        let later = t0 + Duration::from_secs(5);
        assert_eq!(
            progress_made(&mut replies, 1, probe.clone(), later),
            [(Token(1), 10)]
        );
        assert_eq!(replies[0].deadline, later + probe.reply_timeout());
        for other in &replies[1..] {
            assert_eq!(other.deadline, t0 + Duration::from_secs(1));
        }
    }
}
