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
//! Then it relays the console: guest output (the serial socketpair) goes
//! to the pty without blocking (dropped while nobody drains it) and all
//! of it to the console log; pty input goes to the guest. At the log's
//! size cap it asks the parent to rotate the file and send a fresh one.
//! The parent's [`VmCommand`]s become QMP commands (`stop`, `cont`,
//! `system_powerdown`) whose answers go back as `VmCommandDone`.
//! It ends when QEMU does (QMP closes): it tells the parent how QEMU
//! ended (`VmQemuEnded`) and exits 0 if QEMU exited cleanly, else 1.

pub mod qemu;

use crate::log::{log_debug, log_info, log_warn};
use crate::proc::{self, ChildStart, Identity, CHILD_FD};
use crate::seccomp::{self, Allowed};
use common::imsg::{self, Channel, Frame, Message, Role, VmCommand, VmFdKind, VmParams};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{Gid, Pid, Uid};
use qemu::{Boot, DiskLayer, QemuFiles, QmpReply, QmpState};
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
    (libc::SYS_poll, "wait for the console, QMP and the parent"),
    (
        libc::SYS_ppoll,
        "wait for the console, QMP and the parent (newer libc)",
    ),
    (libc::SYS_wait4, "collect QEMU's exit status"),
    (libc::SYS_kill, "kill QEMU when the guest cannot be started"),
];

/// How long the parent has to send the start sequence.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Console output written past the log's cap while the parent rotates it;
/// beyond this, output is left out of the log until the fresh file comes.
const LOG_SLACK: u64 = 64 * 1024;

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
    match vm_run(start, params, fds) {
        Ok(true) => std::process::exit(0),
        Ok(false) => std::process::exit(1),
        Err(e) => {
            log_warn!("{e}");
            std::process::exit(1)
        }
    }
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

/// Starts QEMU, drops, lets the guest run and relays until QEMU ends.
fn vm_run(start: ChildStart, params: VmParams, fds: StartFds) -> Result<bool, VmError> {
    let missing = |what: &str| VmError::Receive(format!("no {what} descriptor"));
    let boot = match (fds.kernel, fds.bios) {
        (Some(kernel), _) => Boot::Kernel {
            kernel: qemu::to_memfd("kernel", kernel)?,
            initrd: fds
                .initrd
                .map(|fd| qemu::to_memfd("initrd", fd))
                .transpose()?,
        },
        (None, Some(bios)) => Boot::Bios {
            bios: qemu::to_memfd("bios", bios)?,
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
    let args = qemu::qemu_args(&params, &files);
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
    let qemu_pid = qemu::spawn(&params, &args, &keep, &stderr_qemu)?;
    log_debug!("QEMU (pid {qemu_pid}): {}", args.join(" "));
    // QEMU holds its own copies now (and so the disks' locks).
    drop(files);
    drop(stderr_qemu);

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

    let mut vm = Vm {
        channel: start.channel,
        qemu: qemu_pid,
        qmp: Some(qmp),
        qmp_buf: Vec::new(),
        qmp_state: QmpState::Greeting,
        paused: false,
        serial: Some(serial),
        pty,
        _pty_slave: pty_slave,
        stderr: Some(stderr),
        stderr_buf: Vec::new(),
        log: ConsoleLog {
            fd: log_fd,
            size: params.console_log_size,
            cap: params.console_log_cap,
            asked: false,
            failed: false,
        },
    };
    Ok(vm.run())
}

/// The console log as the VM process writes it.
struct ConsoleLog {
    fd: OwnedFd,
    size: u64,
    cap: u64,
    /// Rotation asked for, fresh file not yet received.
    asked: bool,
    /// A write failed (said once).
    failed: bool,
}

impl ConsoleLog {
    /// Appends `data`; returns true when the parent should now be asked to
    /// rotate.
    fn write(&mut self, data: &[u8]) -> bool {
        if self.size >= self.cap + LOG_SLACK {
            return false;
        }
        match write_all(self.fd.as_raw_fd(), data) {
            Ok(()) => self.size += data.len() as u64,
            Err(e) if !self.failed => {
                self.failed = true;
                log_warn!("writing the console log: {e}");
            }
            Err(_) => {}
        }
        if self.size >= self.cap && !self.asked {
            self.asked = true;
            return true;
        }
        false
    }

    fn replace(&mut self, fd: OwnedFd, size: u64) {
        self.fd = fd;
        self.size = size;
        self.asked = false;
        self.failed = false;
    }
}

fn write_all(fd: RawFd, mut data: &[u8]) -> Result<(), Errno> {
    while !data.is_empty() {
        match nix::unistd::write(
            // SAFETY: fd is open for the duration of this call (owned by
            // the caller).
            unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
            data,
        ) {
            Ok(0) => return Err(Errno::EIO),
            Ok(n) => data = &data[n..],
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes what fits without blocking; the rest is dropped.
fn write_some(fd: RawFd, mut data: &[u8]) {
    while !data.is_empty() {
        // SAFETY: as in write_all.
        match nix::unistd::write(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }, data) {
            Ok(0) => return,
            Ok(n) => data = &data[n..],
            Err(Errno::EINTR) => continue,
            Err(_) => return,
        }
    }
}

/// Reads once; Ok(None) when nothing is there now, Ok(Some(0)) at EOF.
fn read_some(fd: RawFd, buf: &mut [u8]) -> Result<Option<usize>, Errno> {
    loop {
        match nix::unistd::read(fd, buf) {
            Ok(n) => return Ok(Some(n)),
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

struct Vm {
    channel: Channel,
    qemu: Pid,
    qmp: Option<OwnedFd>,
    qmp_buf: Vec<u8>,
    qmp_state: QmpState,
    /// QEMU confirmed a `stop` (and no `cont` since).
    paused: bool,
    serial: Option<OwnedFd>,
    pty: OwnedFd,
    /// Kept open so the master never reads EIO when no one is attached.
    _pty_slave: OwnedFd,
    stderr: Option<OwnedFd>,
    stderr_buf: Vec<u8>,
    log: ConsoleLog,
}

impl Vm {
    /// Relays until QEMU ends; true if it exited cleanly.
    fn run(&mut self) -> bool {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let Some(qmp) = self.qmp.as_ref().map(|fd| fd.as_raw_fd()) else {
                return self.finish();
            };
            let serial = self.serial.as_ref().map(|fd| fd.as_raw_fd());
            let stderr = self.stderr.as_ref().map(|fd| fd.as_raw_fd());
            let parent = self.channel.sock.as_raw_fd();
            let mut parent_flags = PollFlags::POLLIN;
            if !self.channel.writer.is_empty() {
                parent_flags |= PollFlags::POLLOUT;
            }
            let watched: Vec<(RawFd, PollFlags)> = [
                Some((parent, parent_flags)),
                Some((qmp, PollFlags::POLLIN)),
                serial.map(|fd| (fd, PollFlags::POLLIN)),
                Some((self.pty.as_raw_fd(), PollFlags::POLLIN)),
                stderr.map(|fd| (fd, PollFlags::POLLIN)),
            ]
            .into_iter()
            .flatten()
            .collect();
            let ready = {
                // SAFETY: every descriptor polled is owned by self and
                // stays open for this call.
                let mut pfds: Vec<PollFd> = watched
                    .iter()
                    .map(|(fd, flags)| {
                        PollFd::new(unsafe { std::os::fd::BorrowedFd::borrow_raw(*fd) }, *flags)
                    })
                    .collect();
                match nix::poll::poll(&mut pfds, PollTimeout::NONE) {
                    Ok(_) => {}
                    Err(Errno::EINTR) => continue,
                    Err(e) => {
                        log_warn!("poll: {e}");
                        return self.kill_and_finish();
                    }
                }
                pfds.iter()
                    .zip(&watched)
                    .filter(|(p, _)| p.revents().is_some_and(|r| !r.is_empty()))
                    .map(|(_, (fd, _))| *fd)
                    .collect::<Vec<RawFd>>()
            };
            for fd in ready {
                if fd == parent {
                    self.on_parent();
                } else if fd == qmp {
                    self.on_qmp(&mut buf);
                } else if Some(fd) == serial {
                    self.on_guest(&mut buf);
                } else if fd == self.pty.as_raw_fd() {
                    self.on_pty(&mut buf);
                } else if Some(fd) == stderr {
                    self.on_stderr(&mut buf);
                }
            }
        }
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
                    self.log.replace(fd, size);
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
        let Some(fd) = self.qmp.as_ref().map(|fd| fd.as_raw_fd()) else {
            return;
        };
        match read_some(fd, buf) {
            Ok(None) => return,
            Ok(Some(0)) | Err(_) => {
                // QEMU is exiting.
                self.qmp = None;
                return;
            }
            Ok(Some(n)) => self.qmp_buf.extend_from_slice(&buf[..n]),
        }
        while let Some(end) = self.qmp_buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.qmp_buf.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            match qemu::qmp_line(&mut self.qmp_state, line.trim()) {
                QmpReply::Send(command) => {
                    if let Err(e) = write_all(fd, qemu::qmp_command(command).as_bytes()) {
                        log_warn!("QMP {command}: {e}");
                    }
                }
                QmpReply::Running => {
                    log_info!("guest running");
                    self.send(Message::VmRunning {
                        qemu_pid: self.qemu.as_raw() as u32,
                    });
                }
                QmpReply::Shutdown(reason) => {
                    log_info!("guest shutdown ({reason})");
                    self.send(Message::VmShutdown { reason });
                }
                QmpReply::Error(e) if self.qmp_state != QmpState::Running => {
                    log_warn!("QMP: {e}; stopping QEMU");
                    let _ = nix::sys::signal::kill(self.qemu, nix::sys::signal::Signal::SIGKILL);
                }
                QmpReply::Error(e) => log_warn!("QMP: {e}"),
                QmpReply::Answer { id, error } => self.on_answer(&id, error),
                QmpReply::Nothing => {}
            }
        }
    }

    fn on_guest(&mut self, buf: &mut [u8]) {
        let Some(fd) = self.serial.as_ref().map(|fd| fd.as_raw_fd()) else {
            return;
        };
        match read_some(fd, buf) {
            Ok(None) => {}
            Ok(Some(0)) | Err(_) => self.serial = None,
            Ok(Some(n)) => {
                write_some(self.pty.as_raw_fd(), &buf[..n]);
                if self.log.write(&buf[..n]) {
                    self.send(Message::VmConsoleLogFull);
                }
            }
        }
    }

    fn on_pty(&mut self, buf: &mut [u8]) {
        match read_some(self.pty.as_raw_fd(), buf) {
            Ok(Some(n)) if n > 0 => {
                if let Some(serial) = &self.serial {
                    write_some(serial.as_raw_fd(), &buf[..n]);
                }
            }
            _ => {}
        }
    }

    fn on_stderr(&mut self, buf: &mut [u8]) {
        let Some(fd) = self.stderr.as_ref().map(|fd| fd.as_raw_fd()) else {
            return;
        };
        match read_some(fd, buf) {
            Ok(None) => {}
            Ok(Some(0)) | Err(_) => {
                self.stderr = None;
                self.stderr_buf.push(b'\n');
            }
            Ok(Some(n)) => self.stderr_buf.extend_from_slice(&buf[..n]),
        }
        while let Some(end) = self.stderr_buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.stderr_buf.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end();
            if !line.is_empty() {
                log_warn!("qemu: {line}");
            }
        }
    }

    fn kill_and_finish(&mut self) -> bool {
        let _ = nix::sys::signal::kill(self.qemu, nix::sys::signal::Signal::SIGKILL);
        self.finish()
    }

    /// QEMU closed QMP: say what it left on stderr, collect it, exit.
    fn finish(&mut self) -> bool {
        let mut buf = vec![0u8; 4096];
        // Its stderr closes when it is gone; read it to the end.
        while let Some(fd) = self.stderr.as_ref().map(|fd| fd.as_raw_fd()) {
            // SAFETY: fd is owned by self.stderr, open during the call.
            if !wait_readable(
                unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
                Duration::from_secs(5),
            ) {
                break;
            }
            self.on_stderr(&mut buf);
        }
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
        self.finish_report(why);
        clean
    }

    /// Sends what is still queued for the parent, then how QEMU ended:
    /// the parent reads both after it reaps us.
    fn finish_report(&mut self, why: String) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while !matches!(self.channel.flush(), Ok(true) | Err(_)) && Instant::now() < deadline {
            let mut pfd = [PollFd::new(self.channel.sock.as_fd(), PollFlags::POLLOUT)];
            let _ = nix::poll::poll(&mut pfd, PollTimeout::from(100u8));
        }
        let frame = Frame::new(Message::VmQemuEnded { why });
        if let Err(e) = imsg::send_blocking(self.channel.sock.as_fd(), frame) {
            log_warn!("telling the parent how QEMU ended: {e}");
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
