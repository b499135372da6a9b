//! The parent process (root, no filter): starts control and switch,
//! writes their log lines, restarts them when they die, and stops them on
//! SIGTERM or SIGINT. Later it also holds the VM registry.
//!
//! One mio loop: a signalfd (SIGCHLD, SIGTERM, SIGINT, SIGHUP) and one
//! channel per child.

use crate::log::{self, log_debug, log_info, log_warn};
use crate::proc;
use crate::vmm::{self, Vmm};
use common::imsg::{Channel, Frame, Message, Role};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const SIGNALS: Token = Token(0);
/// A role restarted this often within RESTART_WINDOW is given up on.
const MAX_RESTARTS: usize = 10;
const RESTART_WINDOW: Duration = Duration::from_secs(60);
/// How long children get to exit after SIGTERM before SIGKILL.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

pub struct ParentOptions {
    pub socket: PathBuf,
    pub config: common::config::Config,
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

struct Parent {
    opts: ParentOptions,
    poll: Poll,
    signals: SignalFd,
    children: Vec<Child>,
    next_token: usize,
    restarts: Vec<(Role, Instant)>,
    /// Our control process bound the socket (so it is ours to remove).
    socket_bound: bool,
    /// Set once shutting down: the exit code and when to stop waiting.
    shutdown: Option<(ExitCode, Instant)>,
    /// The running VMs' processes.
    vmm: Vmm,
}

pub fn parent_main(opts: ParentOptions) -> ExitCode {
    proc::set_title("vmd: parent");
    let mut parent = match parent_init(opts) {
        Ok(parent) => parent,
        Err(e) => {
            log_warn!("{e}");
            return ExitCode::FAILURE;
        }
    };
    log_info!("startup");
    for role in [Role::Control, Role::Switch] {
        if let Err(e) = parent.spawn(role) {
            log_warn!("{e}");
            parent.begin_shutdown(ExitCode::FAILURE);
        }
    }
    parent.start_enabled_vms();
    parent.run()
}

fn parent_init(opts: ParentOptions) -> Result<Parent, String> {
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
        .map_err(|e| format!("cannot block signals: {e}"))?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(|e| format!("cannot create a signalfd: {e}"))?;
    let poll = Poll::new().map_err(|e| format!("cannot create the event loop: {e}"))?;
    poll.registry()
        .register(
            &mut SourceFd(&signals.as_raw_fd()),
            SIGNALS,
            Interest::READABLE,
        )
        .map_err(|e| format!("cannot register signals: {e}"))?;
    let vm_registry = poll
        .registry()
        .try_clone()
        .map_err(|e| format!("cannot share the event loop: {e}"))?;
    Ok(Parent {
        vmm: Vmm::new(vm_registry),
        opts,
        poll,
        signals,
        children: Vec::new(),
        next_token: 1,
        restarts: Vec::new(),
        socket_bound: false,
        shutdown: None,
    })
}

impl Parent {
    /// Starts the enabled VMs of the configuration that name a kernel
    /// (until the registry takes over: their ids are their positions).
    fn start_enabled_vms(&mut self) {
        let config = self.opts.config.clone();
        for (i, vm) in config.vms.iter().enumerate() {
            if !vm.enabled || vm.boot.is_none() {
                continue;
            }
            let vm = config.resolved_vm(vm);
            if let Err(e) =
                self.vmm
                    .start(i as u32 + 1, &vm, &config.globals, &vmm::Requester::root())
            {
                log_warn!("{}: {e}", vm.name);
            }
        }
    }

    fn spawn(&mut self, role: Role) -> Result<(), String> {
        let mut args = vec!["-P".to_string(), role.name().to_string()];
        args.extend((0..log::verbosity()).map(|_| "-v".to_string()));
        if role == Role::Control {
            args.push("-s".to_string());
            args.push(self.opts.socket.display().to_string());
        }
        let (pid, sock) = proc::spawn(role.name(), &args).map_err(|e| e.to_string())?;
        let token = Token(self.next_token);
        self.next_token += 1;
        self.poll
            .registry()
            .register(
                &mut SourceFd(&sock.as_raw_fd()),
                token,
                Interest::READABLE | Interest::WRITABLE,
            )
            .map_err(|e| format!("cannot register {}: {e}", role.name()))?;
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
            if let Some((code, deadline)) = &self.shutdown {
                if self.children.is_empty() && self.vmm.is_empty() {
                    self.cleanup();
                    log_info!("terminating");
                    return *code;
                }
                if Instant::now() >= *deadline {
                    for child in &self.children {
                        log_warn!(
                            "{} (pid {}) did not exit; killing it",
                            child.role.name(),
                            child.pid
                        );
                        let _ = kill(child.pid, Signal::SIGKILL);
                    }
                    self.vmm.kill_all();
                    self.shutdown = Some((*code, Instant::now() + SHUTDOWN_GRACE));
                }
            }
            let timeout = self
                .shutdown
                .as_ref()
                .map(|(_, d)| d.saturating_duration_since(Instant::now()));
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
                    token if Vmm::owns_token(token) => self.vmm.handle_event(token),
                    token => self.handle_child(token),
                }
            }
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
                Ok(Signal::SIGHUP) => {
                    log_warn!("SIGHUP: reloading the configuration is not supported yet; ignored")
                }
                #[cfg(feature = "test-triggers")]
                Ok(Signal::SIGUSR1) => self.set_verbosity(log::verbosity().saturating_add(1)),
                _ => {}
            }
        }
    }

    /// Changes the verbosity here and in every child (vmctl log will use
    /// it; test builds do on SIGUSR1).
    #[cfg_attr(not(feature = "test-triggers"), allow(dead_code))]
    fn set_verbosity(&mut self, level: u8) {
        log::set_verbosity(level);
        log_debug!("verbosity now {level}");
        for token in self.children.iter().map(|c| c.token).collect::<Vec<_>>() {
            self.send(token, Frame::new(Message::SetVerbosity { level }));
        }
    }

    #[cfg_attr(not(feature = "test-triggers"), allow(dead_code))]
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
                    self.socket_bound |= role == Role::Control;
                    log_debug!("{name} (pid {}) ready", child.pid);
                }
            }
            Message::Log { level, text } => log::write_line(level, &format!("{name}: {text}")),
            Message::RefusedSyscall { nr, name: call } => {
                log_warn!("{name}: refused system call {call} ({nr})")
            }
            other => log_warn!("{name}: unexpected message {}", other.type_code().1),
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
            let Some(index) = self.children.iter().position(|c| c.pid == pid) else {
                if let Some(ended) = self.vmm.reaped(pid, status) {
                    log_debug!("vm {} (vm {}) stopped: {}", ended.name, ended.id, ended.why);
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
        let why = match status {
            WaitStatus::Exited(_, 0) => "exited".to_string(),
            WaitStatus::Exited(_, code) => format!("exited with status {code}"),
            WaitStatus::Signaled(_, Signal::SIGSYS, _) => {
                "was killed by a refused system call (SIGSYS)".to_string()
            }
            WaitStatus::Signaled(_, sig, _) => format!("was killed by {}", sig.as_str()),
            other => format!("ended ({other:?})"),
        };
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
        if self
            .restarts
            .iter()
            .filter(|(role, _)| *role == child.role)
            .count()
            >= MAX_RESTARTS
        {
            log_warn!(
                "{name} (pid {}) {why}; restarted {MAX_RESTARTS} times in {}s, shutting down",
                child.pid,
                RESTART_WINDOW.as_secs()
            );
            self.begin_shutdown(ExitCode::FAILURE);
            return;
        }
        self.restarts.push((child.role, now));
        log_warn!("{name} (pid {}) {why}; restarting it", child.pid);
        if let Err(e) = self.spawn(child.role) {
            log_warn!("cannot restart {name}: {e}; shutting down");
            self.begin_shutdown(ExitCode::FAILURE);
        }
    }

    fn begin_shutdown(&mut self, code: ExitCode) {
        if self.shutdown.is_some() {
            return;
        }
        for child in &self.children {
            let _ = kill(child.pid, Signal::SIGTERM);
        }
        self.vmm.stop_all();
        self.shutdown = Some((code, Instant::now() + SHUTDOWN_GRACE));
    }

    fn kill_all(&mut self) {
        for child in &self.children {
            let _ = kill(child.pid, Signal::SIGKILL);
        }
        self.vmm.kill_all();
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
