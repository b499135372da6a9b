//! The VM process (`vmd -P vm`), one per running VM.
//!
//! Started by the parent as root from a fresh exec, so it inherits no
//! seccomp filter. It receives the VM's parameters and every descriptor
//! it needs (kernel and initrd or the BIOS, disks, cdrom, pty, console
//! log), then, from its main thread and still root: clears the capability
//! bounding, ambient and inheritable sets, lets its backend
//! ([`backend::Backend`]; today [`qemu`], which spawns QEMU paused in its
//! own session under the VM's uid) prepare, chroots into the empty
//! directory, drops to the VM's uid and installs [`VM_SYSCALLS`] and the
//! backend's calls on top of [`seccomp::CHILD_SYSCALLS`]. Only then does
//! it resume the backend (QEMU: QMP `cont`).
//!
//! Then its mio loop (the epoll instance is created before the drop, so
//! the filter needs no epoll_create1) relays the console ([`console`]:
//! guest output to the pty and the console log, pty input to the guest,
//! rotation of the log at its cap by the parent), hands the parent's
//! [`common::imsg::VmCommand`]s to the backend and sends its events to the parent
//! (`VmRunning`: the parent answers the start then; `VmShutdown`;
//! `VmCommandDone`). When the backend has ended it tells the parent why
//! the start failed if the guest never ran (`VmStartFailed`), how the
//! backend ended (`VmGuestEnded`), and exits 0 if it ended cleanly,
//! else 1.

pub mod backend;
mod console;
pub mod kvm;
pub mod qemu;
pub mod receive;
pub mod send;

use common::config::Backend as BackendKind;
use common::config::VmConfig;
use common::imsg::{BackendParams, KvmParams, QemuParams};

// --- what the parent asks of the VM side, in neutral terms ---

/// The backend settings of a VM process for `vm`: `kvm` and `groups`
/// as the parent's helper found them (hardware KVM, and the groups that
/// gives the guest's processes).
pub fn backend_params(vm: &VmConfig, kvm: bool, groups: Vec<u32>) -> BackendParams {
    let cmdline = vm
        .cmdline
        .clone()
        .unwrap_or_else(|| qemu::DEFAULT_CMDLINE.to_string());
    match vm.backend() {
        BackendKind::Qemu => BackendParams::Qemu(QemuParams {
            cmdline,
            boot_device: vm.boot_device,
            kvm,
            groups,
        }),
        BackendKind::Kvm => BackendParams::Kvm(KvmParams { cmdline }),
    }
}

/// What of `vm` its backend cannot run yet, in words; None if it runs.
pub fn backend_unsupported(vm: &VmConfig) -> Option<String> {
    match vm.backend() {
        BackendKind::Qemu => None,
        BackendKind::Kvm => kvm::unsupported(vm),
    }
}

/// Whether the VM process needs /dev/kvm passed (our own monitor).
pub fn backend_needs_kvm_device(vm: &VmConfig) -> bool {
    vm.backend() == BackendKind::Kvm
}

/// The largest kernel, initrd or BIOS a VM process loads, with the word
/// for messages; None for other files.
pub fn boot_file_limit(kind: VmFdKind) -> Option<(&'static str, u64)> {
    let file = match kind {
        VmFdKind::Kernel => qemu::BootFile::Kernel,
        VmFdKind::Initrd => qemu::BootFile::Initrd,
        VmFdKind::Bios => qemu::BootFile::Bios,
        _ => return None,
    };
    Some((file.what(), file.limit()))
}

/// A VM process's start failure as users read it: sanitized, bounded,
/// on one line (it is less trusted than the parent).
pub fn start_reason(text: &str) -> String {
    qemu::start_reason(text)
}

use crate::log::{log_debug, log_warn};
use crate::proc::{self, ChildStart, Identity, CHILD_FD};
use crate::seccomp::{self, Allowed};
use backend::{Backend, BackendEvent, ThreadRole};
use common::imsg::{self, Channel, Frame, Message, Role, VmFdKind, VmParams};
use console::Console;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::unistd::{Gid, Uid};
use qemu::DiskLayer;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use thiserror::Error;

/// What the VM process's loop adds to every child's calls (its backend
/// adds its own, [`Backend::thread_filter`]).
pub const VM_SYSCALLS: &[Allowed] = &[
    (
        libc::SYS_read,
        "read guest output, pty input and the backend's descriptors",
    ),
    (
        libc::SYS_write,
        "write to the pty, the guest, the console log and the backend's descriptors",
    ),
    (
        libc::SYS_epoll_ctl,
        "register the parent, the console and the backend's descriptors with mio",
    ),
];

/// How long the parent has to send the start sequence.
const START_TIMEOUT: Duration = Duration::from_secs(10);

const PARENT: Token = Token(0);
const SERIAL: Token = Token(1);
const PTY: Token = Token(2);
#[derive(Debug, Error)]
pub enum VmError {
    #[error("receiving the start sequence: {0}")]
    Receive(String),
    #[error("{0}")]
    Qemu(#[from] qemu::QemuError),
    #[error("{0}")]
    Kvm(#[from] kvm::KvmError),
    #[error("cannot create a {what}: {err}")]
    Create { what: &'static str, err: Errno },
    #[error("{0}")]
    Drop(String),
}

/// Descriptors of the start sequence.
#[derive(Default)]
pub struct StartFds {
    pub kernel: Option<OwnedFd>,
    pub initrd: Option<OwnedFd>,
    pub bios: Option<OwnedFd>,
    pub cdrom: Option<OwnedFd>,
    pub pty_master: Option<OwnedFd>,
    pub pty_slave: Option<OwnedFd>,
    pub console_log: Option<OwnedFd>,
    pub disks: Vec<DiskLayer>,
    /// Each network interface's tap, by interface index.
    pub taps: Vec<(u8, OwnedFd)>,
    /// Interfaces' vhost-net descriptors, by interface index.
    pub vhosts: Vec<(u8, OwnedFd)>,
    /// `vmctl receive`'s socket with the stream.
    pub stream: Option<OwnedFd>,
    /// /dev/kvm (backend kvm).
    pub kvm: Option<OwnedFd>,
}

pub fn vm_main(verbosity: u8) -> ExitCode {
    let mut start = match proc::child_start(Role::Vm, verbosity) {
        Ok(start) => start,
        Err(e) => {
            eprintln!("vmd: vm: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Our channel to the parent must not reach QEMU.
    if let Err(e) = nix::fcntl::fcntl(
        CHILD_FD,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    ) {
        log_warn!("cannot set close-on-exec on the parent socket: {e}");
        return ExitCode::FAILURE;
    }
    let (params, fds) = match vm_receive_start(&mut start.channel) {
        Ok(received) => received,
        Err(e) => {
            log_warn!("{e}");
            return ExitCode::FAILURE;
        }
    };
    proc::set_title(&format!("vmd: vm {}", params.name));
    // Log a failure while the channel (the log's way out) is still open,
    // and say it to the vmctl waiting for the start.
    let launched = match vm_launch(&start, &params, fds) {
        Ok(launched) => launched,
        Err(e) => {
            log_warn!("{e}");
            let reason = qemu::start_reason(&e.to_string());
            let frame = Frame::new(Message::VmStartFailed { reason });
            if let Err(e) = imsg::send_blocking(start.channel.sock.as_fd(), frame) {
                log_warn!("telling the parent the start failed: {e}");
            }
            std::process::exit(1)
        }
    };
    let mut vm = match Vm::new(start.channel, launched, &params) {
        Ok(vm) => vm,
        Err(e) => {
            log_warn!("{e}");
            std::process::exit(1)
        }
    };
    std::process::exit(if vm.run() { 0 } else { 1 })
}

/// Waits for VmStart and its VmFd frames.
fn vm_receive_start(channel: &mut Channel) -> Result<(VmParams, StartFds), VmError> {
    let deadline = Instant::now() + START_TIMEOUT;
    let mut params: Option<VmParams> = None;
    let mut fds = StartFds::default();
    let mut received = 0u32;
    loop {
        if let Some(p) = &params {
            if received == p.fd_count {
                break;
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(VmError::Receive("the parent sent nothing in time".into()));
        }
        wait_readable(channel.sock.as_fd(), left);
        let (frames, eof) = channel
            .receive()
            .map_err(|e| VmError::Receive(e.to_string()))?;
        for frame in frames {
            match (frame.message, frame.fd) {
                (Message::VmStart { params: p }, None) if params.is_none() => params = Some(*p),
                (Message::VmFd { kind }, Some(fd)) if params.is_some() => {
                    received += 1;
                    let slot = match kind {
                        VmFdKind::Kernel => &mut fds.kernel,
                        VmFdKind::Initrd => &mut fds.initrd,
                        VmFdKind::PtyMaster => &mut fds.pty_master,
                        VmFdKind::PtySlave => &mut fds.pty_slave,
                        VmFdKind::ConsoleLog => &mut fds.console_log,
                        VmFdKind::Bios => &mut fds.bios,
                        VmFdKind::Cdrom => &mut fds.cdrom,
                        VmFdKind::Stream => &mut fds.stream,
                        VmFdKind::Kvm => &mut fds.kvm,
                        VmFdKind::Tap { index } => {
                            fds.taps.push((index, fd));
                            continue;
                        }
                        VmFdKind::Vhost { index } => {
                            fds.vhosts.push((index, fd));
                            continue;
                        }
                        VmFdKind::Disk {
                            disk,
                            layer,
                            format,
                            writable,
                        } => {
                            fds.disks.push(DiskLayer {
                                disk,
                                layer,
                                format,
                                writable,
                                fd,
                            });
                            continue;
                        }
                    };
                    *slot = Some(fd);
                }
                (Message::SetVerbosity { level }, None) => crate::log::set_verbosity(level),
                (other, _) => {
                    return Err(VmError::Receive(format!(
                        "unexpected {}",
                        other.type_code().1
                    )))
                }
            }
        }
        if eof {
            return Err(VmError::Receive("the parent closed the channel".into()));
        }
    }
    params
        .map(|p| (p, fds))
        .ok_or_else(|| VmError::Receive("no parameters".into()))
}

/// Waits until `fd` is readable (or closed); false after `timeout`.
fn wait_readable(fd: std::os::fd::BorrowedFd, timeout: Duration) -> bool {
    let mut pfd = [PollFd::new(fd, PollFlags::POLLIN)];
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    matches!(
        nix::poll::poll(&mut pfd, PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)),
        Ok(n) if n > 0
    )
}

pub fn sock_pair(what: &'static str) -> Result<(OwnedFd, OwnedFd), VmError> {
    socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|err| VmError::Create { what, err })
}

pub fn set_nonblocking(fd: RawFd) -> Result<(), VmError> {
    nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .map(|_| ())
    .map_err(|err| VmError::Create {
        what: "non-blocking descriptor",
        err,
    })
}

/// What the VM process holds once its backend is prepared and it has
/// dropped.
struct Launched {
    /// Created before the drop: the filter has no epoll_create1.
    poll: Poll,
    backend: Box<dyn Backend>,
    serial: OwnedFd,
    pty: OwnedFd,
    pty_slave: OwnedFd,
    console_log: OwnedFd,
}

/// Prepares the backend (the guest does not run yet) and drops privileges.
fn vm_launch(
    start: &ChildStart,
    params: &VmParams,
    mut fds: StartFds,
) -> Result<Launched, VmError> {
    let missing = |what: &str| VmError::Receive(format!("no {what} descriptor"));
    let pty = fds.pty_master.take().ok_or_else(|| missing("pty"))?;
    let pty_slave = fds.pty_slave.take().ok_or_else(|| missing("pty slave"))?;
    let log_fd = fds
        .console_log
        .take()
        .ok_or_else(|| missing("console log"))?;

    proc::clear_capability_inheritance().map_err(|e| VmError::Drop(e.to_string()))?;
    let (serial, serial_guest) = sock_pair("serial socketpair")?;
    for fd in [serial.as_raw_fd(), pty.as_raw_fd()] {
        set_nonblocking(fd)?;
    }
    let mut backend: Box<dyn Backend> = match &params.backend {
        BackendParams::Qemu(_) => Box::new(qemu::prepare(params, &mut fds, serial_guest)?),
        BackendParams::Kvm(_) => Box::new(kvm::prepare(params, &mut fds, serial_guest)?),
    };

    // The registry's clone is a dup (fcntl), refused after the drop.
    let dropped = Poll::new()
        .and_then(|poll| {
            backend.keep_registry(poll.registry().try_clone()?);
            Ok(poll)
        })
        .map_err(|e| format!("cannot create the event loop: {e}"))
        .and_then(|poll| vm_drop(start, params, backend.as_ref()).map(|()| poll));
    match dropped {
        Ok(poll) => Ok(Launched {
            poll,
            backend,
            serial,
            pty,
            pty_slave,
            console_log: log_fd,
        }),
        Err(e) => {
            backend.kill();
            Err(VmError::Drop(e))
        }
    }
}

/// Drops to the VM's uid in the empty directory with the VM process's
/// filter and the backend's, and tells the parent.
fn vm_drop(start: &ChildStart, params: &VmParams, backend: &dyn Backend) -> Result<(), String> {
    let id = Identity {
        uid: Uid::from_raw(params.uid),
        gid: Gid::from_raw(params.gid),
        groups: Vec::new(),
    };
    let own = backend.thread_filter(ThreadRole::Main);
    let filter = seccomp::compile_with_args(
        &[seccomp::CHILD_SYSCALLS, VM_SYSCALLS, own.syscalls],
        &[own.with_args],
    )
    .map_err(|e| e.to_string())?;
    proc::drop_privileges(
        &id,
        Path::new(proc::EMPTY_DIR),
        start.parent,
        &filter,
        CHILD_FD,
    )
    .map_err(|e| format!("dropping privileges: {e}"))?;
    imsg::send_blocking(
        start.channel.sock.as_fd(),
        Frame::new(Message::Ready { role: Role::Vm }),
    )
    .map_err(|e| format!("telling the parent we are ready: {e}"))
}

struct Vm {
    channel: Channel,
    poll: Poll,
    backend: Box<dyn Backend>,
    console: Console,
}

impl Vm {
    /// Registers the parent and the console, then resumes the backend.
    fn new(channel: Channel, mut launched: Launched, params: &VmParams) -> Result<Vm, VmError> {
        let registry = launched.poll.registry();
        let watched = [
            (
                channel.sock.as_raw_fd(),
                PARENT,
                Interest::READABLE | Interest::WRITABLE,
            ),
            (launched.serial.as_raw_fd(), SERIAL, Interest::READABLE),
            (launched.pty.as_raw_fd(), PTY, Interest::READABLE),
        ];
        let registered = watched
            .into_iter()
            .try_for_each(|(fd, token, interest)| {
                registry.register(&mut SourceFd(&fd), token, interest)
            })
            .and_then(|()| launched.backend.resume(registry));
        if let Err(e) = registered {
            launched.backend.kill();
            return Err(VmError::Create {
                what: "mio registration",
                err: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
            });
        }
        Ok(Vm {
            channel,
            poll: launched.poll,
            backend: launched.backend,
            console: Console::new(
                launched.serial,
                launched.pty,
                launched.pty_slave,
                launched.console_log,
                params.console_log_size,
                params.console_log_cap,
            ),
        })
    }

    /// Relays until the backend ends; true if it ended cleanly.
    fn run(&mut self) -> bool {
        let mut buf = vec![0u8; 16 * 1024];
        let mut events = Events::with_capacity(16);
        while !self.backend.has_ended() {
            let timeout = self.backend.timer().map(|due| {
                due.saturating_duration_since(Instant::now()) + Duration::from_millis(1)
            });
            let polled = self.poll.poll(&mut events, timeout);
            if self.backend.timer().is_some() {
                self.backend.on_timer(Instant::now());
            }
            match polled {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log_warn!("waiting for events: {e}");
                    self.backend.kill();
                    break;
                }
            }
            for event in events.iter() {
                match event.token() {
                    PARENT => self.on_parent(),
                    SERIAL => {
                        if self.console.on_guest(&mut buf) {
                            self.send(Message::VmConsoleLogFull);
                        }
                    }
                    PTY => self.console.on_pty(&mut buf),
                    token => self.backend.on_ready(token, &mut buf),
                }
                self.send_backend_events();
            }
        }
        self.finish()
    }

    /// Tells the parent what the backend did.
    fn send_backend_events(&mut self) {
        for event in self.backend.take_events() {
            let message = match event {
                BackendEvent::Running { pids } => Message::VmRunning { pids },
                BackendEvent::Shutdown { reason } => Message::VmShutdown { reason },
                BackendEvent::StartProgress { note } => Message::VmStartProgress { note },
                BackendEvent::CommandProgress { command, note } => {
                    Message::VmCommandProgress { command, note }
                }
                BackendEvent::CommandDone { command, error } => {
                    Message::VmCommandDone { command, error }
                }
                BackendEvent::Disks(disks) => self.stats_message(disks),
            };
            self.send(message);
        }
    }

    /// The backend ended: how, to the parent.
    fn finish(&mut self) -> bool {
        let poll = &mut self.poll;
        let ended = self
            .backend
            .finish(&mut |deadline| wait_until(poll, deadline));
        self.send_backend_events();
        self.finish_report(ended.start_failed, ended.why);
        ended.clean
    }

    /// The answer to the parent's `VmStatsQuery`.
    fn stats_message(&self, disks: Vec<common::stats::DiskStats>) -> Message {
        Message::VmStats(common::stats::BackendStats {
            disks,
            console_log_size: self.console.log_size(),
        })
    }

    fn send(&mut self, message: Message) {
        if let Err(e) = self.channel.send_whole(Frame::new(message)) {
            log_warn!("sending to the parent: {e}");
        }
    }

    fn on_parent(&mut self) {
        if let Err(e) = self.channel.flush() {
            log_warn!("sending to the parent: {e}");
        }
        for frame in proc::child_receive(&mut self.channel) {
            match (frame.message, frame.fd) {
                (Message::VmConsoleLog { size }, Some(fd)) => {
                    log_debug!("console log rotated");
                    self.console.replace_log(fd, size);
                }
                // The parent sends a descriptor with exactly the commands
                // that take one; anything else is a broken parent.
                (Message::VmCommand { command }, fd) if command.takes_fd() == fd.is_some() => {
                    self.backend.command(command, fd)
                }
                // Answered at once without disks if the backend cannot
                // count them now, else with its answer.
                (Message::VmStatsQuery, None) => {
                    if !self.backend.query_disks() {
                        let message = self.stats_message(Vec::new());
                        self.send(message);
                    }
                }
                (other, _) => {
                    log_warn!("unexpected message {} from the parent", other.type_code().1)
                }
            }
        }
    }

    /// Sends what is still queued for the parent, then why the start
    /// failed (if it did) and how the backend ended: the parent reads
    /// them after it reaps us.
    fn finish_report(&mut self, start_failed: Option<String>, why: String) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while !matches!(self.channel.flush(), Ok(true) | Err(_))
            && wait_until(&mut self.poll, deadline)
        {}
        let failed = start_failed.map(|reason| Message::VmStartFailed { reason });
        for message in failed.into_iter().chain([Message::VmGuestEnded { why }]) {
            if let Err(e) = imsg::send_blocking(self.channel.sock.as_fd(), Frame::new(message)) {
                log_warn!("telling the parent how the guest ended: {e}");
            }
        }
    }
}

/// Waits for any event until `deadline`; false once it has passed.
fn wait_until(poll: &mut Poll, deadline: Instant) -> bool {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return false;
    }
    let mut events = Events::with_capacity(16);
    let _ = poll.poll(&mut events, Some(left.min(Duration::from_millis(100))));
    true
}
