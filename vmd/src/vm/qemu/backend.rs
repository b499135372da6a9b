//! The QEMU backend of the VM process: QEMU spawned paused before the
//! drop ([`prepare`]), then its QMP monitor and standard error read from
//! the VM process's loop.
//!
//! What QEMU writes is bounded: a QMP line longer than [`QMP_LINE_MAX`]
//! or not JSON is a protocol error that gets QEMU killed; its stderr
//! lines are cut at [`STDERR_LINE_MAX`] and logged at most
//! [`STDERR_LINES_PER_SECOND`] a second.

mod receive;
mod send;

use super::lines::{LineBuffer, RateLimit};
use super::*;
use crate::log::{log_debug, log_info, log_warn};
use crate::seccomp::{Allowed, ArgRule, RoleFilter};
use crate::vm::backend::ThreadRole;
use crate::vm::backend::{probe, Backend, BackendEvent, Ended, FIRST_BACKEND_TOKEN};
use crate::vm::console::{read_some, write_all};
use crate::vm::receive::{StreamIn, RECV_PIPE, RECV_STREAM};
use crate::vm::send::{SEND_CLIENT, SEND_PIPE};
use crate::vm::{set_nonblocking, sock_pair, StartFds, VmError};
use common::imsg::{VmCommand, VmParams};
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// What the VM process's main thread adds for QEMU.
pub const QEMU_SYSCALLS: &[Allowed] = &[
    (libc::SYS_wait4, "collect QEMU's exit status"),
    (
        libc::SYS_pipe2,
        "vmctl send: the pipe QEMU migrates into (its write end goes to QEMU with getfd)",
    ),
    (
        libc::SYS_shutdown,
        "vmctl send: end the stream (its reader sees EOF and answers)",
    ),
    (
        libc::SYS_recvfrom,
        "vmctl send: the reader's answer once it wrote the whole stream",
    ),
    (
        libc::SYS_flock,
        "vmctl receive: lock the disks once the stream is whole (as the parent does at a start)",
    ),
];

/// ... and with these arguments only.
pub const QEMU_ARG_RULES: &[ArgRule] = &[ArgRule {
    nr: libc::SYS_kill,
    arg: 1,
    values: &[libc::SIGKILL as u64],
    why: "kill QEMU (SIGKILL only) when the guest cannot be started or QMP breaks",
}];

/// The longest QMP line: QEMU's greeting, events and answers to our
/// commands are a few hundred bytes; a longer line is a protocol error.
const QMP_LINE_MAX: usize = 64 * 1024;
/// The longest line of QEMU's standard error logged; the rest of a
/// longer line is dropped.
const STDERR_LINE_MAX: usize = 1024;
/// Lines of QEMU's standard error logged per second; the others are
/// counted and reported in one line when the second is over.
const STDERR_LINES_PER_SECOND: u32 = 10;

const QMP: Token = Token(FIRST_BACKEND_TOKEN);
const STDERR: Token = Token(FIRST_BACKEND_TOKEN + 1);

pub struct QemuBackend {
    qemu: Pid,
    qmp: Option<OwnedFd>,
    qmp_lines: LineBuffer,
    /// QEMU broke the protocol and was killed: QMP is only read to its end.
    qmp_broken: bool,
    qmp_state: QmpState,
    /// QEMU confirmed a `stop` (and no `cont` since).
    paused: bool,
    /// Commands sent to QMP and not answered yet (their QMP id is their
    /// name).
    sent: Vec<VmCommand>,
    stderr: Option<OwnedFd>,
    stderr_lines: LineBuffer,
    stderr_limit: RateLimit,
    /// Why the guest could not start: QEMU's first error line before the
    /// guest ran (or a refused QMP command).
    start_error: Option<String>,
    events: Vec<BackendEvent>,
    /// Hardware KVM (`-cpu host`), else TCG (QEMU's default CPU).
    kvm: bool,
    /// The sizes of the boot files QEMU got (a stream's header pins them).
    boot_sizes: BootSizes,
    /// The loop's registry, for the descriptors of a send.
    registry: Option<Registry>,
    /// A `vmctl send` under way.
    sending: Option<send::SendJob>,
    /// A start from `vmctl receive`'s stream, until the guest may run.
    receiving: Option<receive::RecvJob>,
    /// The machine type of a start from a stream.
    incoming_machine: Option<String>,
}

/// The kernel's, initrd's and BIOS's sizes, those QEMU got.
#[derive(Debug, Default, Clone, Copy)]
struct BootSizes {
    kernel: Option<u64>,
    initrd: Option<u64>,
    bios: Option<u64>,
}

/// A memfd's size (None if it cannot be read).
fn fd_size(fd: &OwnedFd) -> Option<u64> {
    nix::sys::stat::fstat(fd.as_raw_fd())
        .ok()
        .map(|st| st.st_size as u64)
}

/// As root, before the drop: copies the boot files into memfds and
/// starts QEMU paused (`-S`) with the disks, the CD-ROM, QMP and `serial`
/// (the guest's end of the console relay).
pub fn prepare(
    params: &VmParams,
    fds: &mut StartFds,
    serial: OwnedFd,
) -> Result<QemuBackend, VmError> {
    let missing = |what: &str| VmError::Receive(format!("no {what} descriptor"));
    let boot = match (fds.kernel.take(), fds.bios.take()) {
        (Some(kernel), _) => Boot::Kernel {
            kernel: to_memfd(BootFile::Kernel, kernel)?,
            initrd: fds
                .initrd
                .take()
                .map(|fd| to_memfd(BootFile::Initrd, fd))
                .transpose()?,
        },
        (None, Some(bios)) => Boot::Bios {
            bios: to_memfd(BootFile::Bios, bios)?,
            sercon: memfd_with("sercon-port", &SERCON_PORT)?,
        },
        (None, None) => return Err(missing("kernel or BIOS")),
    };
    let (qmp, qmp_qemu) = sock_pair("QMP socketpair")?;
    let (stderr, stderr_qemu) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|err| VmError::Create {
            what: "pipe for QEMU's stderr",
            err,
        })?;
    let files = QemuFiles {
        boot,
        disks: std::mem::take(&mut fds.disks),
        cdrom: fds.cdrom.take(),
        qmp: qmp_qemu,
        serial,
        taps: std::mem::take(&mut fds.taps),
        vhosts: std::mem::take(&mut fds.vhosts),
    };
    let mut args = qemu_args(params, &files);
    let boot_sizes = match &files.boot {
        Boot::Kernel { kernel, initrd } => BootSizes {
            kernel: fd_size(kernel),
            initrd: initrd.as_ref().and_then(fd_size),
            bios: None,
        },
        Boot::Bios { bios, .. } => BootSizes {
            bios: fd_size(bios),
            ..BootSizes::default()
        },
    };
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
    keep.extend(files.taps.iter().map(|(_, fd)| fd.as_raw_fd()));
    keep.extend(files.vhosts.iter().map(|(_, fd)| fd.as_raw_fd()));
    for fd in [qmp.as_raw_fd(), stderr.as_raw_fd()] {
        set_nonblocking(fd)?;
    }
    let receiving = match &params.incoming {
        None => None,
        Some(header) => {
            let job = receive_prepare(header, fds.stream.take(), &files.disks, boot_sizes)?;
            args.extend(receive::incoming_args(job.header()));
            Some(job)
        }
    };
    let qemu_pid = spawn(params, &args, &keep, &stderr_qemu)?;
    log_debug!("QEMU (pid {qemu_pid}): {}", args.join(" "));
    // QEMU holds its own copies now (and so the disks' locks).
    drop(files);
    drop(stderr_qemu);
    Ok(QemuBackend {
        qemu: qemu_pid,
        qmp: Some(qmp),
        qmp_lines: LineBuffer::new(QMP_LINE_MAX),
        qmp_broken: false,
        qmp_state: QmpState::Greeting,
        paused: false,
        sent: Vec::new(),
        stderr: Some(stderr),
        stderr_lines: LineBuffer::new(STDERR_LINE_MAX),
        stderr_limit: RateLimit::new(STDERR_LINES_PER_SECOND, Duration::from_secs(1)),
        start_error: None,
        events: Vec::new(),
        kvm: qemu_settings(params).kvm,
        boot_sizes,
        registry: None,
        sending: None,
        incoming_machine: receiving.as_ref().map(|job| job.header().machine.clone()),
        receiving,
    })
}

impl Backend for QemuBackend {
    /// QEMU runs in its own process: the VM process has only its main
    /// thread.
    fn thread_filter(&self, role: ThreadRole) -> RoleFilter {
        match role {
            ThreadRole::Main => RoleFilter {
                syscalls: QEMU_SYSCALLS,
                with_args: QEMU_ARG_RULES,
            },
        }
    }

    /// Reads QMP from here on: the handshake ends with `cont`.
    fn resume(&mut self, registry: &Registry) -> std::io::Result<()> {
        for (fd, token) in [(self.qmp.as_ref(), QMP), (self.stderr.as_ref(), STDERR)] {
            if let Some(fd) = fd {
                registry.register(&mut SourceFd(&fd.as_raw_fd()), token, Interest::READABLE)?;
            }
        }
        Ok(())
    }

    fn keep_registry(&mut self, registry: Registry) {
        self.registry = Some(registry);
    }

    fn on_ready(&mut self, token: Token, buf: &mut [u8]) {
        match token {
            QMP => self.on_qmp(buf),
            STDERR => self.on_stderr(buf),
            SEND_PIPE | SEND_CLIENT => self.send_pump(),
            RECV_STREAM | RECV_PIPE => self.recv_pump(),
            _ => {}
        }
    }

    fn command(&mut self, command: VmCommand, fd: Option<OwnedFd>) {
        self.on_command(command, fd)
    }

    /// `query-blockstats`, answered in [`QmpReply::BlockStats`].
    fn query_disks(&mut self) -> bool {
        let Some(fd) = self.qmp.as_ref().map(|fd| fd.as_raw_fd()) else {
            return false;
        };
        if self.qmp_state != QmpState::Running || self.qmp_broken {
            return false;
        }
        let line = qmp_command_with_id("query-blockstats", BLOCKSTATS_ID);
        match write_all(fd, line.as_bytes()) {
            Ok(()) => true,
            Err(e) => {
                log_warn!("QMP query-blockstats: {e}");
                false
            }
        }
    }

    fn take_events(&mut self) -> Vec<BackendEvent> {
        std::mem::take(&mut self.events)
    }

    /// When dropped stderr lines are due to be reported, or a send's
    /// next note.
    fn timer(&self) -> Option<Instant> {
        let note = self.sending.as_ref().map(|job| job.next_note());
        let retry = self.receiving.as_ref().and_then(|job| job.timer());
        [self.stderr_limit.due(), note, retry]
            .into_iter()
            .flatten()
            .min()
    }

    fn on_timer(&mut self, now: Instant) {
        if let Some(dropped) = self.stderr_limit.expire(now) {
            log_dropped(dropped);
        }
        self.send_timer(now);
        self.recv_timer(now);
    }

    /// QEMU closed QMP: it is exiting.
    fn has_ended(&self) -> bool {
        self.qmp.is_none()
    }

    fn kill(&mut self) {
        let _ = nix::sys::signal::kill(self.qemu, nix::sys::signal::Signal::SIGKILL);
    }

    fn finish(&mut self, wait_until: &mut dyn FnMut(Instant) -> bool) -> Ended {
        QemuBackend::finish(self, wait_until)
    }
}

impl QemuBackend {
    /// A command from the parent: sent to QMP with an id; the answer
    /// comes back in [`QemuBackend::on_answer`].
    fn on_command(&mut self, command: VmCommand, client_fd: Option<OwnedFd>) {
        let Some(fd) = self.qmp.as_ref().map(|fd| fd.as_raw_fd()) else {
            return self.command_done(command, Some("QEMU is exiting".into()));
        };
        if self.qmp_state != QmpState::Running {
            return self.command_done(command, Some("the guest is not running yet".into()));
        }
        let qmp = match &command {
            VmCommand::Pause => "stop",
            VmCommand::Unpause => "cont",
            VmCommand::Powerdown => "system_powerdown",
            VmCommand::Probe { text, steps } => {
                let events = probe(&command, text, *steps, client_fd);
                return self.events.extend(events);
            }
            VmCommand::Send { .. } => return self.send_start(command, client_fd),
        };
        let mut lines = Vec::new();
        if command == VmCommand::Powerdown && self.paused {
            // A paused guest cannot see the power button.
            lines.push(qmp_command_with_id("cont", "resume"));
        }
        lines.push(qmp_command_with_id(qmp, command.name()));
        for line in lines {
            if let Err(e) = write_all(fd, line.as_bytes()) {
                return self.command_done(command, Some(format!("writing to QMP: {e}")));
            }
        }
        log_debug!("QMP {qmp}");
        self.sent.push(command);
    }

    fn command_done(&mut self, command: VmCommand, error: Option<String>) {
        if let Some(e) = &error {
            log_warn!("{}: {e}", command.name());
        }
        self.events
            .push(BackendEvent::CommandDone { command, error });
    }

    /// QEMU answered a command sent with an id.
    fn on_answer(&mut self, id: &str, error: Option<String>, value: serde_json::Value) {
        if let Some(step) = id.strip_prefix(send::ID_PREFIX) {
            return self.send_answer(step, error, value);
        }
        if let Some(step) = id.strip_prefix(receive::ID_PREFIX) {
            return self.recv_answer(step, error, value);
        }
        if id == "resume" {
            match error {
                None => self.paused = false,
                Some(e) => log_warn!("QMP cont before the power button: {e}"),
            }
            return;
        }
        let Some(index) = self.sent.iter().position(|c| c.name() == id) else {
            log_warn!("QMP answer for unknown id {id}");
            return;
        };
        let command = self.sent.remove(index);
        if error.is_none() {
            match command {
                VmCommand::Pause => self.paused = true,
                VmCommand::Unpause => self.paused = false,
                VmCommand::Powerdown | VmCommand::Probe { .. } | VmCommand::Send { .. } => {}
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
                self.send_abandon();
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
            match qmp_line(&mut self.qmp_state, line.text.trim()) {
                QmpReply::Send("cont") if self.recv_begin() => {}
                QmpReply::Send(command) => {
                    if let Err(e) = write_all(fd, qmp_command(command).as_bytes()) {
                        log_warn!("QMP {command}: {e}");
                    }
                }
                QmpReply::Running => {
                    log_info!("guest running");
                    self.events.push(BackendEvent::Running {
                        pids: vec![self.qemu.as_raw() as u32],
                    });
                }
                QmpReply::Shutdown(reason) => {
                    log_info!("guest shutdown ({reason})");
                    self.events.push(BackendEvent::Shutdown { reason });
                }
                QmpReply::Protocol(e) => {
                    self.qmp_protocol_error(&e);
                    return true;
                }
                QmpReply::Error(e) if self.qmp_state != QmpState::Running => {
                    log_warn!("QMP: {e}; stopping QEMU");
                    self.start_error
                        .get_or_insert(start_reason(&format!("QEMU: {e}")));
                    let _ = nix::sys::signal::kill(self.qemu, nix::sys::signal::Signal::SIGKILL);
                }
                QmpReply::Error(e) => log_warn!("QMP: {e}"),
                QmpReply::Answer { id, error, value } => self.on_answer(&id, error, value),
                QmpReply::Migration(status) => {
                    self.recv_migration(status.clone());
                    self.send_migration(status);
                }
                QmpReply::BlockStats(disks) => self.events.push(BackendEvent::Disks(disks)),
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
                self.start_error = qemu_error_reason(text);
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

    /// QEMU closed QMP: say what it left on stderr, collect it.
    fn finish(&mut self, wait_until: &mut dyn FnMut(Instant) -> bool) -> Ended {
        let mut buf = vec![0u8; 4096];
        // Its stderr closes when it is gone; read it to the end.
        let deadline = Instant::now() + Duration::from_secs(5);
        self.on_stderr(&mut buf);
        while self.stderr.is_some() && wait_until(deadline) {
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
            let reason = self
                .start_error
                .take()
                .unwrap_or_else(|| start_reason(&format!("QEMU {why} before the guest ran")));
            // QEMU does not say which machine type it refused.
            match &self.incoming_machine {
                Some(machine) if reason.contains("machine type") => {
                    format!("{reason} (the stream's machine type is {machine})")
                }
                _ => reason,
            }
        });
        Ended {
            clean,
            why: format!("QEMU {why}"),
            start_failed,
        }
    }
}

/// Which end of a migration pipe QEMU gets.
enum PipeEnd {
    /// It writes (send).
    Write,
    /// It reads (receive).
    Read,
}

/// A migration pipe (non-blocking, close-on-exec) with QEMU's `end` of it
/// handed over on `qmp` with `getfd` as `name` (QMP id `id`): our end.
fn hand_pipe(qmp: RawFd, end: PipeEnd, name: &str, id: &str) -> Result<OwnedFd, String> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let flags = nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK;
    let (read, write) =
        nix::unistd::pipe2(flags).map_err(|e| format!("cannot create the migration pipe: {e}"))?;
    let (theirs, ours) = match end {
        PipeEnd::Write => (write, read),
        PipeEnd::Read => (read, write),
    };
    let line = qmp_command_with_args("getfd", serde_json::json!({"fdname": name}), id);
    let fds = [theirs.as_raw_fd()];
    let iov = [std::io::IoSlice::new(line.as_bytes())];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    // QMP takes a line this short whole: it reads us always. Our copy of
    // QEMU's end closes on return: QEMU holds its own.
    match sendmsg::<()>(qmp, &iov, &cmsg, MsgFlags::empty(), None) {
        Ok(n) if n == line.len() => Ok(ours),
        Ok(_) => Err("getfd: QMP took part of the line".to_string()),
        Err(e) => Err(format!("handing QEMU the migration pipe: {e}")),
    }
}

impl QemuBackend {
    /// Writes QMP lines (a send's or a receive's commands).
    fn qmp_write(&self, lines: &[String]) -> Result<(), String> {
        let fd = self.qmp.as_ref().map(|fd| fd.as_raw_fd());
        let fd = fd.ok_or_else(|| "QEMU is exiting".to_string())?;
        lines.iter().try_for_each(|line| {
            write_all(fd, line.as_bytes()).map_err(|e| format!("writing to QMP: {e}"))
        })
    }
}

/// A start from a stream: its header checked against what this VM
/// process got, the stream's socket non-blocking, copies of the disks'
/// descriptors to lock them later.
fn receive_prepare(
    header: &[u8],
    stream: Option<OwnedFd>,
    disks: &[DiskLayer],
    sizes: BootSizes,
) -> Result<receive::RecvJob, VmError> {
    let refused = |why: String| VmError::Receive(why);
    let stream = stream.ok_or_else(|| refused("no stream descriptor".into()))?;
    set_nonblocking(stream.as_raw_fd())?;
    let (stream, header) = StreamIn::new(header, stream).map_err(|e| refused(e.to_string()))?;
    let got = [
        ("kernel", sizes.kernel),
        ("initrd", sizes.initrd),
        ("BIOS", sizes.bios),
    ];
    receive::check_boot_sizes(&header, got).map_err(refused)?;
    let copies = disks
        .iter()
        .map(|layer| layer.fd.try_clone().map(|fd| (fd, layer.writable)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| refused(format!("cannot keep the disks' descriptors: {e}")))?;
    Ok(receive::RecvJob::new(header, stream, copies))
}

fn log_dropped(dropped: u64) {
    log_warn!("qemu: ... {dropped} lines dropped");
}
