//! The VM process (`vmd -P vm`), one per running VM.
//!
//! Started by the parent (vmm.rs) as root from a fresh exec, so it
//! inherits no seccomp filter. It receives the VM's parameters and every
//! descriptor it needs (kernel and initrd or the BIOS, disks, cdrom, pty,
//! console log), then,
//! from its main thread and still root: clears the capability bounding,
//! ambient and inheritable sets, starts QEMU (qemu.rs) in its own session
//! under the VM's uid, chroots into the empty directory, drops to the
//! VM's uid and installs [`VM_SYSCALLS`] on top of
//! [`seccomp::CHILD_SYSCALLS`]. Only then does it let the guest run (QMP
//! `cont`).
//!
//! Then its mio loop (the epoll instance is created before the drop, so
//! the filter needs no epoll_create1) relays the console ([`console`]:
//! guest output to the pty and the console log, pty input to the guest,
//! rotation of the log at its cap by the parent).
//! The parent's [`VmCommand`]s become QMP commands (`stop`, `cont`,
//! `system_powerdown`) whose answers go back as `VmCommandDone`.
//! The guest runs once `cont` succeeded (`VmRunning`: the parent answers
//! the start then). It ends when QEMU does (QMP closes): it tells the
//! parent why the start failed if the guest never ran (`VmStartFailed`:
//! QEMU's first error line, or its own error), how QEMU ended
//! (`VmGuestEnded`), and exits 0 if QEMU exited cleanly, else 1.
//!
//! What QEMU writes is bounded: a QMP line longer than [`QMP_LINE_MAX`]
//! or not JSON is a protocol error that gets QEMU killed; its stderr
//! lines are cut at [`STDERR_LINE_MAX`] and logged at most
//! [`STDERR_LINES_PER_SECOND`] a second.

mod console;
pub mod qemu;

use common::config::VmConfig;
use common::imsg::{BackendParams, QemuParams};

// --- what the parent asks of the VM side, in neutral terms ---

/// The backend settings of a VM process for `vm`: `kvm` and `groups`
/// as the parent's helper found them (hardware KVM, and the groups that
/// gives the guest's processes).
pub fn backend_params(vm: &VmConfig, kvm: bool, groups: Vec<u32>) -> BackendParams {
    BackendParams::Qemu(QemuParams {
        cmdline: vm
            .cmdline
            .clone()
            .unwrap_or_else(|| qemu::DEFAULT_CMDLINE.to_string()),
        boot_device: vm.boot_device,
        kvm,
        groups,
    })
}

/// Whether the backend `vm` asks for runs here.
pub fn backend_built(vm: &VmConfig) -> bool {
    vm.backend() == common::config::Backend::Qemu
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

use crate::log::{log_debug, log_info, log_warn};
use crate::proc::{self, ChildStart, Identity, CHILD_FD};
use crate::seccomp::{self, Allowed};
use common::imsg::{self, Channel, Frame, Message, Role, VmCommand, VmFdKind, VmParams};
use console::{read_some, write_all, Console};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{Gid, Pid, Uid};
use qemu::{Boot, BootFile, DiskLayer, QemuFiles, QmpReply, QmpState};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use thiserror::Error;

/// What the VM process's loop adds to every child's calls.
pub const VM_SYSCALLS: &[Allowed] = &[
    (
        libc::SYS_read,
        "read guest output, pty input, QMP and QEMU's stderr",
    ),
    (
        libc::SYS_write,
        "write to the pty, the guest, QMP and the console log",
    ),
    (
        libc::SYS_epoll_ctl,
        "register the console, QMP, QEMU's stderr and the parent with mio",
    ),
    (libc::SYS_wait4, "collect QEMU's exit status"),
    (libc::SYS_kill, "kill QEMU when the guest cannot be started"),
];

/// How long the parent has to send the start sequence.
const START_TIMEOUT: Duration = Duration::from_secs(10);

const PARENT: Token = Token(0);
const QMP: Token = Token(1);
const SERIAL: Token = Token(2);
const PTY: Token = Token(3);
const STDERR: Token = Token(4);
/// The longest QMP line: QEMU's greeting, events and answers to our
/// commands are a few hundred bytes; a longer line is a protocol error.
const QMP_LINE_MAX: usize = 64 * 1024;
/// The longest line of QEMU's standard error logged; the rest of a
/// longer line is dropped.
const STDERR_LINE_MAX: usize = 1024;
/// Lines of QEMU's standard error logged per second; the others are
/// counted and reported in one line when the second is over.
const STDERR_LINES_PER_SECOND: u32 = 10;

#[derive(Debug, Error)]
pub enum VmError {
    #[error("receiving the start sequence: {0}")]
    Receive(String),
    #[error("{0}")]
    Qemu(#[from] qemu::QemuError),
    #[error("cannot create a {what}: {err}")]
    Create { what: &'static str, err: Errno },
    #[error("{0}")]
    Drop(String),
}

/// Descriptors of the start sequence.
#[derive(Default)]
struct StartFds {
    kernel: Option<OwnedFd>,
    initrd: Option<OwnedFd>,
    bios: Option<OwnedFd>,
    cdrom: Option<OwnedFd>,
    pty_master: Option<OwnedFd>,
    pty_slave: Option<OwnedFd>,
    console_log: Option<OwnedFd>,
    disks: Vec<DiskLayer>,
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
    let qemu_pid = launched.qemu;
    let mut vm = match Vm::new(start.channel, launched, &params) {
        Ok(vm) => vm,
        Err(e) => {
            log_warn!("{e}");
            let _ = nix::sys::signal::kill(qemu_pid, nix::sys::signal::Signal::SIGKILL);
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

fn sock_pair(what: &'static str) -> Result<(OwnedFd, OwnedFd), VmError> {
    socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|err| VmError::Create { what, err })
}

fn set_nonblocking(fd: RawFd) -> Result<(), VmError> {
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

/// What the VM process holds once QEMU runs and it has dropped.
struct Launched {
    /// Created before the drop: the filter has no epoll_create1.
    poll: Poll,
    qemu: Pid,
    qmp: OwnedFd,
    serial: OwnedFd,
    pty: OwnedFd,
    pty_slave: OwnedFd,
    stderr: OwnedFd,
    console_log: OwnedFd,
}

/// Starts QEMU and drops privileges (the guest does not run yet).
fn vm_launch(start: &ChildStart, params: &VmParams, fds: StartFds) -> Result<Launched, VmError> {
    let missing = |what: &str| VmError::Receive(format!("no {what} descriptor"));
    let boot = match (fds.kernel, fds.bios) {
        (Some(kernel), _) => Boot::Kernel {
            kernel: qemu::to_memfd(BootFile::Kernel, kernel)?,
            initrd: fds
                .initrd
                .map(|fd| qemu::to_memfd(BootFile::Initrd, fd))
                .transpose()?,
        },
        (None, Some(bios)) => Boot::Bios {
            bios: qemu::to_memfd(BootFile::Bios, bios)?,
            sercon: qemu::memfd_with("sercon-port", &qemu::SERCON_PORT)?,
        },
        (None, None) => return Err(missing("kernel or BIOS")),
    };
    let pty = fds.pty_master.ok_or_else(|| missing("pty"))?;
    let pty_slave = fds.pty_slave.ok_or_else(|| missing("pty slave"))?;
    let log_fd = fds.console_log.ok_or_else(|| missing("console log"))?;

    proc::clear_capability_inheritance().map_err(|e| VmError::Drop(e.to_string()))?;
    let (qmp, qmp_qemu) = sock_pair("QMP socketpair")?;
    let (serial, serial_qemu) = sock_pair("serial socketpair")?;
    let (stderr, stderr_qemu) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|err| VmError::Create {
            what: "pipe for QEMU's stderr",
            err,
        })?;
    let files = QemuFiles {
        boot,
        disks: fds.disks,
        cdrom: fds.cdrom,
        qmp: qmp_qemu,
        serial: serial_qemu,
    };
    let args = qemu::qemu_args(params, &files);
    let mut keep: Vec<RawFd> = vec![files.qmp.as_raw_fd(), files.serial.as_raw_fd()];
    match &files.boot {
        Boot::Kernel { kernel, initrd } => {
            keep.push(kernel.as_raw_fd());
            keep.extend(initrd.as_ref().map(|fd| fd.as_raw_fd()));
        }
        Boot::Bios { bios, sercon } => keep.extend([bios.as_raw_fd(), sercon.as_raw_fd()]),
    }
    keep.extend(files.disks.iter().map(|l| l.fd.as_raw_fd()));
    keep.extend(files.cdrom.as_ref().map(|fd| fd.as_raw_fd()));
    for fd in [
        qmp.as_raw_fd(),
        serial.as_raw_fd(),
        pty.as_raw_fd(),
        stderr.as_raw_fd(),
    ] {
        set_nonblocking(fd)?;
    }
    let qemu_pid = qemu::spawn(params, &args, &keep, &stderr_qemu)?;
    log_debug!("QEMU (pid {qemu_pid}): {}", args.join(" "));
    // QEMU holds its own copies now (and so the disks' locks).
    drop(files);
    drop(stderr_qemu);

    let poll = match Poll::new() {
        Ok(poll) => poll,
        Err(e) => {
            let _ = nix::sys::signal::kill(qemu_pid, nix::sys::signal::Signal::SIGKILL);
            return Err(VmError::Drop(format!("cannot create the event loop: {e}")));
        }
    };
    let id = Identity {
        uid: Uid::from_raw(params.uid),
        gid: Gid::from_raw(params.gid),
        groups: Vec::new(),
    };
    let dropped = seccomp::compile(&[seccomp::CHILD_SYSCALLS, VM_SYSCALLS])
        .map_err(|e| e.to_string())
        .and_then(|filter| {
            proc::drop_privileges(
                &id,
                Path::new(proc::EMPTY_DIR),
                start.parent,
                &filter,
                CHILD_FD,
            )
            .map_err(|e| format!("dropping privileges: {e}"))
        })
        .and_then(|()| {
            imsg::send_blocking(
                start.channel.sock.as_fd(),
                Frame::new(Message::Ready { role: Role::Vm }),
            )
            .map_err(|e| format!("telling the parent we are ready: {e}"))
        });
    if let Err(e) = dropped {
        let _ = nix::sys::signal::kill(qemu_pid, nix::sys::signal::Signal::SIGKILL);
        return Err(VmError::Drop(e));
    }

    Ok(Launched {
        poll,
        qemu: qemu_pid,
        qmp,
        serial,
        pty,
        pty_slave,
        stderr,
        console_log: log_fd,
    })
}

struct Vm {
    channel: Channel,
    poll: Poll,
    qemu: Pid,
    qmp: Option<OwnedFd>,
    qmp_lines: LineBuffer,
    /// QEMU broke the protocol and was killed: QMP is only read to its end.
    qmp_broken: bool,
    qmp_state: QmpState,
    /// QEMU confirmed a `stop` (and no `cont` since).
    paused: bool,
    console: Console,
    stderr: Option<OwnedFd>,
    stderr_lines: LineBuffer,
    stderr_limit: RateLimit,
    /// Why the guest could not start: QEMU's first error line before the
    /// guest ran (or a refused QMP command).
    start_error: Option<String>,
}

impl Vm {
    fn new(channel: Channel, launched: Launched, params: &VmParams) -> Result<Vm, VmError> {
        let registry = launched.poll.registry();
        let watched = [
            (
                channel.sock.as_raw_fd(),
                PARENT,
                Interest::READABLE | Interest::WRITABLE,
            ),
            (launched.qmp.as_raw_fd(), QMP, Interest::READABLE),
            (launched.serial.as_raw_fd(), SERIAL, Interest::READABLE),
            (launched.pty.as_raw_fd(), PTY, Interest::READABLE),
            (launched.stderr.as_raw_fd(), STDERR, Interest::READABLE),
        ];
        for (fd, token, interest) in watched {
            registry
                .register(&mut SourceFd(&fd), token, interest)
                .map_err(|e| VmError::Create {
                    what: "mio registration",
                    err: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
                })?;
        }
        Ok(Vm {
            channel,
            poll: launched.poll,
            qemu: launched.qemu,
            qmp: Some(launched.qmp),
            qmp_lines: LineBuffer::new(QMP_LINE_MAX),
            qmp_broken: false,
            qmp_state: QmpState::Greeting,
            paused: false,
            console: Console::new(
                launched.serial,
                launched.pty,
                launched.pty_slave,
                launched.console_log,
                params.console_log_size,
                params.console_log_cap,
            ),
            stderr: Some(launched.stderr),
            stderr_lines: LineBuffer::new(STDERR_LINE_MAX),
            stderr_limit: RateLimit::new(STDERR_LINES_PER_SECOND, Duration::from_secs(1)),
            start_error: None,
        })
    }

    /// Relays until QEMU ends; true if it exited cleanly.
    fn run(&mut self) -> bool {
        let mut buf = vec![0u8; 16 * 1024];
        let mut events = Events::with_capacity(16);
        while self.qmp.is_some() {
            // Wake up when dropped stderr lines are due to be reported.
            let timeout = self.stderr_limit.due().map(|due| {
                due.saturating_duration_since(Instant::now()) + Duration::from_millis(1)
            });
            let polled = self.poll.poll(&mut events, timeout);
            if let Some(dropped) = self.stderr_limit.expire(Instant::now()) {
                log_dropped(dropped);
            }
            match polled {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log_warn!("waiting for events: {e}");
                    return self.kill_and_finish();
                }
            }
            for event in events.iter() {
                match event.token() {
                    PARENT => self.on_parent(),
                    QMP => self.on_qmp(&mut buf),
                    SERIAL => {
                        if self.console.on_guest(&mut buf) {
                            self.send(Message::VmConsoleLogFull);
                        }
                    }
                    PTY => self.console.on_pty(&mut buf),
                    STDERR => self.on_stderr(&mut buf),
                    _ => {}
                }
            }
        }
        self.finish()
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
                (Message::VmCommand { command }, None) => self.on_command(command),
                (other, _) => {
                    log_warn!("unexpected message {} from the parent", other.type_code().1)
                }
            }
        }
    }

    /// A command from the parent: sent to QMP with an id; the answer
    /// comes back in [`Vm::on_answer`].
    fn on_command(&mut self, command: VmCommand) {
        let Some(fd) = self.qmp.as_ref().map(|fd| fd.as_raw_fd()) else {
            return self.command_done(command, Some("QEMU is exiting".into()));
        };
        if self.qmp_state != QmpState::Running {
            return self.command_done(command, Some("the guest is not running yet".into()));
        }
        let mut lines = Vec::new();
        if command == VmCommand::Powerdown && self.paused {
            // A paused guest cannot see the power button.
            lines.push(qemu::qmp_command_with_id("cont", "resume"));
        }
        lines.push(qemu::qmp_command_with_id(
            vm_qmp_command(command),
            vm_command_id(command),
        ));
        for line in lines {
            if let Err(e) = write_all(fd, line.as_bytes()) {
                return self.command_done(command, Some(format!("writing to QMP: {e}")));
            }
        }
        log_debug!("QMP {}", vm_qmp_command(command));
    }

    fn command_done(&mut self, command: VmCommand, error: Option<String>) {
        if let Some(e) = &error {
            log_warn!("{}: {e}", vm_command_id(command));
        }
        self.send(Message::VmCommandDone { command, error });
    }

    /// QEMU answered a command sent with an id.
    fn on_answer(&mut self, id: &str, error: Option<String>) {
        if id == "resume" {
            match error {
                None => self.paused = false,
                Some(e) => log_warn!("QMP cont before the power button: {e}"),
            }
            return;
        }
        let Some(command) = [VmCommand::Pause, VmCommand::Unpause, VmCommand::Powerdown]
            .into_iter()
            .find(|c| vm_command_id(*c) == id)
        else {
            log_warn!("QMP answer for unknown id {id}");
            return;
        };
        if error.is_none() {
            match command {
                VmCommand::Pause => self.paused = true,
                VmCommand::Unpause => self.paused = false,
                VmCommand::Powerdown => {}
            }
        }
        self.command_done(command, error);
    }

    fn on_qmp(&mut self, buf: &mut [u8]) {
        while self.qmp_read(buf) {}
    }

    /// Reads QMP once and acts on its complete lines; false once there is
    /// nothing more to read now.
    fn qmp_read(&mut self, buf: &mut [u8]) -> bool {
        let Some(fd) = self.qmp.as_ref().map(|fd| fd.as_raw_fd()) else {
            return false;
        };
        let lines = match read_some(fd, buf) {
            Ok(None) => return false,
            Ok(Some(0)) | Err(_) => {
                // QEMU is exiting.
                self.qmp = None;
                return false;
            }
            Ok(Some(_)) if self.qmp_broken => return true,
            Ok(Some(n)) => self.qmp_lines.push(&buf[..n]),
        };
        for line in lines {
            if line.truncated {
                self.qmp_protocol_error(&format!("a line longer than {QMP_LINE_MAX} bytes"));
                return true;
            }
            match qemu::qmp_line(&mut self.qmp_state, line.text.trim()) {
                QmpReply::Send(command) => {
                    if let Err(e) = write_all(fd, qemu::qmp_command(command).as_bytes()) {
                        log_warn!("QMP {command}: {e}");
                    }
                }
                QmpReply::Running => {
                    log_info!("guest running");
                    self.send(Message::VmRunning {
                        pids: vec![self.qemu.as_raw() as u32],
                    });
                }
                QmpReply::Shutdown(reason) => {
                    log_info!("guest shutdown ({reason})");
                    self.send(Message::VmShutdown { reason });
                }
                QmpReply::Protocol(e) => {
                    self.qmp_protocol_error(&e);
                    return true;
                }
                QmpReply::Error(e) if self.qmp_state != QmpState::Running => {
                    log_warn!("QMP: {e}; stopping QEMU");
                    self.start_error
                        .get_or_insert(qemu::start_reason(&format!("QEMU: {e}")));
                    let _ = nix::sys::signal::kill(self.qemu, nix::sys::signal::Signal::SIGKILL);
                }
                QmpReply::Error(e) => log_warn!("QMP: {e}"),
                QmpReply::Answer { id, error } => self.on_answer(&id, error),
                QmpReply::Nothing => {}
            }
        }
        if self.qmp_lines.overlong() {
            self.qmp_protocol_error(&format!("a line longer than {QMP_LINE_MAX} bytes"));
        }
        true
    }

    /// QEMU broke the QMP protocol: it is misbehaving, so it is killed
    /// (the VM then ends as when QEMU dies) and QMP only read to its end.
    fn qmp_protocol_error(&mut self, what: &str) {
        log_warn!("QMP: {what} from QEMU; stopping QEMU");
        self.qmp_broken = true;
        self.qmp_lines = LineBuffer::new(QMP_LINE_MAX);
        let _ = nix::sys::signal::kill(self.qemu, nix::sys::signal::Signal::SIGKILL);
    }

    fn on_stderr(&mut self, buf: &mut [u8]) {
        while self.stderr_read(buf) {}
    }

    /// Reads QEMU's stderr once and logs its complete lines; false once
    /// there is nothing more to read now.
    fn stderr_read(&mut self, buf: &mut [u8]) -> bool {
        let Some(fd) = self.stderr.as_ref().map(|fd| fd.as_raw_fd()) else {
            return false;
        };
        let lines = match read_some(fd, buf) {
            Ok(None) => return false,
            Ok(Some(0)) | Err(_) => {
                self.stderr = None;
                self.stderr_lines.finish().into_iter().collect()
            }
            Ok(Some(n)) => self.stderr_lines.push(&buf[..n]),
        };
        let now = Instant::now();
        for line in lines {
            let text = line.text.trim_end();
            if text.is_empty() {
                continue;
            }
            if self.qmp_state != QmpState::Running && self.start_error.is_none() {
                self.start_error = qemu::qemu_error_reason(text);
            }
            let (dropped, admitted) = self.stderr_limit.admit(now);
            if let Some(dropped) = dropped {
                log_dropped(dropped);
            }
            if admitted {
                let more = if line.truncated { " [truncated]" } else { "" };
                log_warn!("qemu: {text}{more}");
            }
        }
        if self.stderr.is_none() {
            self.stderr_report_dropped();
        }
        true
    }

    /// Reports the stderr lines dropped and not reported yet.
    fn stderr_report_dropped(&mut self) {
        if let Some(dropped) = self.stderr_limit.flush() {
            log_dropped(dropped);
        }
    }

    /// Waits for any event until `deadline`; false once it has passed.
    fn wait_until(&mut self, deadline: Instant) -> bool {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let mut events = Events::with_capacity(16);
        let _ = self
            .poll
            .poll(&mut events, Some(left.min(Duration::from_millis(100))));
        true
    }

    fn kill_and_finish(&mut self) -> bool {
        let _ = nix::sys::signal::kill(self.qemu, nix::sys::signal::Signal::SIGKILL);
        self.finish()
    }

    /// QEMU closed QMP: say what it left on stderr, collect it, exit.
    fn finish(&mut self) -> bool {
        let mut buf = vec![0u8; 4096];
        // Its stderr closes when it is gone; read it to the end.
        let deadline = Instant::now() + Duration::from_secs(5);
        self.on_stderr(&mut buf);
        while self.stderr.is_some() && self.wait_until(deadline) {
            self.on_stderr(&mut buf);
        }
        self.stderr_report_dropped();
        let status = loop {
            match waitpid(self.qemu, None) {
                Err(Errno::EINTR) => continue,
                other => break other,
            }
        };
        let (clean, why) = match status {
            Ok(WaitStatus::Exited(_, 0)) => (true, "exited".to_string()),
            Ok(WaitStatus::Exited(_, code)) => (false, format!("exited with status {code}")),
            Ok(WaitStatus::Signaled(_, sig, _)) => {
                (false, format!("was killed by {}", sig.as_str()))
            }
            other => (false, format!("ended: {other:?}")),
        };
        log_debug!("QEMU {why}");
        // The guest never ran: the start failed, and this is why.
        let start_failed = (self.qmp_state != QmpState::Running).then(|| {
            self.start_error
                .take()
                .unwrap_or_else(|| qemu::start_reason(&format!("QEMU {why} before the guest ran")))
        });
        self.finish_report(start_failed, why);
        clean
    }

    /// Sends what is still queued for the parent, then why the start
    /// failed (if it did) and how QEMU ended: the parent reads them after
    /// it reaps us.
    fn finish_report(&mut self, start_failed: Option<String>, why: String) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while !matches!(self.channel.flush(), Ok(true) | Err(_)) && self.wait_until(deadline) {}
        let failed = start_failed.map(|reason| Message::VmStartFailed { reason });
        let why = format!("QEMU {why}");
        for message in failed.into_iter().chain([Message::VmGuestEnded { why }]) {
            if let Err(e) = imsg::send_blocking(self.channel.sock.as_fd(), Frame::new(message)) {
                log_warn!("telling the parent how QEMU ended: {e}");
            }
        }
    }
}

/// The QMP command for a parent's command.
fn vm_qmp_command(command: VmCommand) -> &'static str {
    match command {
        VmCommand::Pause => "stop",
        VmCommand::Unpause => "cont",
        VmCommand::Powerdown => "system_powerdown",
    }
}

/// The QMP id its answer carries (and the word for logs).
fn vm_command_id(command: VmCommand) -> &'static str {
    match command {
        VmCommand::Pause => "pause",
        VmCommand::Unpause => "unpause",
        VmCommand::Powerdown => "powerdown",
    }
}

fn log_dropped(dropped: u64) {
    log_warn!("qemu: ... {dropped} lines dropped");
}

/// One line out of a [`LineBuffer`], without its newline.
#[derive(Debug, PartialEq, Eq)]
struct Line {
    text: String,
    /// It was longer than the buffer's maximum: only its start is here.
    truncated: bool,
}

/// Cuts a byte stream into lines, holding at most `max` bytes of a line:
/// the rest of a longer one is dropped and the line marked truncated.
struct LineBuffer {
    buf: Vec<u8>,
    max: usize,
    /// The line being read is already longer than `max`.
    overlong: bool,
}

impl LineBuffer {
    fn new(max: usize) -> Self {
        LineBuffer {
            buf: Vec::new(),
            max,
            overlong: false,
        }
    }

    /// Adds `data`; returns the lines it completed.
    fn push(&mut self, data: &[u8]) -> Vec<Line> {
        let mut lines = Vec::new();
        for chunk in data.split_inclusive(|&b| b == b'\n') {
            let (body, complete) = match chunk.strip_suffix(b"\n") {
                Some(body) => (body, true),
                None => (chunk, false),
            };
            let room = self.max.saturating_sub(self.buf.len());
            if body.len() > room {
                self.overlong = true;
            }
            self.buf.extend_from_slice(&body[..body.len().min(room)]);
            if complete {
                lines.extend(self.take());
            }
        }
        lines
    }

    /// True while the unfinished line is longer than the maximum.
    fn overlong(&self) -> bool {
        self.overlong
    }

    /// At the end of the stream: the unfinished line, if any.
    fn finish(&mut self) -> Option<Line> {
        if self.buf.is_empty() && !self.overlong {
            return None;
        }
        self.take()
    }

    fn take(&mut self) -> Option<Line> {
        let line = Line {
            text: String::from_utf8_lossy(&self.buf).into_owned(),
            truncated: self.overlong,
        };
        self.buf.clear();
        self.overlong = false;
        Some(line)
    }
}

/// At most `limit` lines per `window`; the lines refused are counted and
/// reported once the window is over.
struct RateLimit {
    limit: u32,
    window: Duration,
    /// When the current window began (None: no line since the last one).
    start: Option<Instant>,
    used: u32,
    dropped: u64,
}

impl RateLimit {
    fn new(limit: u32, window: Duration) -> Self {
        RateLimit {
            limit,
            window,
            start: None,
            used: 0,
            dropped: 0,
        }
    }

    /// One more line at `now`: how many lines a window that just ended
    /// dropped (to report first), and whether this one may be logged.
    fn admit(&mut self, now: Instant) -> (Option<u64>, bool) {
        let dropped = self.expire(now);
        let start = *self.start.get_or_insert(now);
        debug_assert!(start <= now);
        if self.used < self.limit {
            self.used += 1;
            (dropped, true)
        } else {
            self.dropped += 1;
            (dropped, false)
        }
    }

    /// Ends the window if it is over at `now`; returns how many lines it
    /// dropped, if any.
    fn expire(&mut self, now: Instant) -> Option<u64> {
        match self.start {
            Some(start) if now >= start + self.window => {
                self.start = None;
                self.used = 0;
                self.flush()
            }
            _ => None,
        }
    }

    /// When the dropped lines are due to be reported (None: none dropped).
    fn due(&self) -> Option<Instant> {
        self.start
            .filter(|_| self.dropped > 0)
            .map(|start| start + self.window)
    }

    /// The lines dropped and not reported yet, if any (at the end).
    fn flush(&mut self) -> Option<u64> {
        Some(std::mem::take(&mut self.dropped)).filter(|&n| n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(text: &str, truncated: bool) -> Line {
        Line {
            text: text.into(),
            truncated,
        }
    }

    #[test]
    fn lines_split_across_reads_and_capped() {
        let mut lines = LineBuffer::new(8);
        assert_eq!(lines.push(b"ab"), vec![]);
        assert_eq!(
            lines.push(b"c\nde\n\nf"),
            vec![line("abc", false), line("de", false), line("", false)]
        );
        // A line past the cap keeps its first 8 bytes, across reads.
        assert!(!lines.overlong());
        assert_eq!(lines.push(b"1234567"), vec![]);
        assert!(!lines.overlong());
        assert_eq!(lines.push(b"9"), vec![]);
        assert!(lines.overlong());
        assert_eq!(lines.buf.len(), 8);
        assert_eq!(lines.push(&[b'x'; 100_000]), vec![]);
        assert_eq!(lines.buf.len(), 8, "the excess is not kept");
        assert_eq!(
            lines.push(b"yy\nok\n"),
            vec![line("f1234567", true), line("ok", false)]
        );
        assert!(!lines.overlong());
        // The end of the stream ends an unfinished line.
        assert_eq!(lines.push(b"tail"), vec![]);
        assert_eq!(lines.finish(), Some(line("tail", false)));
        assert_eq!(lines.finish(), None);
        assert_eq!(lines.push(&[b'z'; 20]), vec![]);
        assert_eq!(lines.finish(), Some(line("zzzzzzzz", true)));
    }

    #[test]
    fn rate_limit_drops_and_reports_once_per_window() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut limit = RateLimit::new(3, Duration::from_secs(1));
        assert_eq!(limit.due(), None);
        for ms in [0, 10, 20] {
            assert_eq!(limit.admit(at(ms)), (None, true));
        }
        assert_eq!(limit.due(), None, "nothing dropped yet");
        for ms in [30, 40, 999] {
            assert_eq!(limit.admit(at(ms)), (None, false));
        }
        assert_eq!(limit.due(), Some(at(1000)));
        assert_eq!(limit.expire(at(999)), None);
        // The next line after the window reports the drops and passes.
        assert_eq!(limit.admit(at(1500)), (Some(3), true));
        assert_eq!(limit.due(), None);
        for ms in [1501, 1502] {
            assert_eq!(limit.admit(at(ms)), (None, true));
        }
        assert_eq!(limit.admit(at(1503)), (None, false));
        // Or the timer does, once.
        assert_eq!(limit.expire(at(2500)), Some(1));
        assert_eq!(limit.expire(at(2600)), None);
        assert_eq!(limit.due(), None);
        // And the end reports what is left.
        for ms in [3000, 3001, 3002, 3003, 3004] {
            limit.admit(at(ms));
        }
        assert_eq!(limit.flush(), Some(2));
        assert_eq!(limit.flush(), None);
    }
}
