//! The console relay of `vmctl console` and `vmctl start -c`, where
//! OpenBSD's vmctl runs cu(1).
//!
//! vmctl opens the VM's pty slave itself, so access follows the pty's
//! ownership: vmd gives it to the user who started the VM (and the VM's
//! owner group) and root may open it anyway. One console at a time: an
//! exclusive flock(2) on the slave we opened; locks belong to the open
//! file, so the VM process's own slave descriptor is not in the way and
//! a killed client's lock goes away with it (TIOCEXCL would not: root
//! ignores it and it outlives the client).
//!
//! The local terminal is raw while attached and restored on every way
//! out: `~.`, the VM ending (EOF or EIO on the pty), SIGINT, SIGTERM or
//! SIGHUP (blocked and read from a signalfd, so they end the loop
//! rather than the process), an I/O error, a panic (the guard's Drop).

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::termios::{self, SetArg, Termios};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use thiserror::Error;

/// Input for the guest waiting while the VM does not read it (a paused
/// VM); more is dropped.
const PENDING_MAX: usize = 64 * 1024;

const HELP: &str = "\r\n[vmctl console escapes, at the start of a line:]\r\n\
                    [~.  leave the console; the VM keeps running]\r\n\
                    [~?  this list]\r\n\
                    [~~  send a ~]\r\n";

#[derive(Debug, Error)]
pub enum ConsoleError {
    #[error("console is in use")]
    InUse,
    #[error("open {0}: {desc}", desc = .1.desc())]
    Open(String, Errno),
    #[error("lock {0}: {desc}", desc = .1.desc())]
    Lock(String, Errno),
    #[error("{0} is not a terminal")]
    NotATty(String),
    #[error("cannot catch signals: {0}")]
    Signals(Errno),
    #[error("cannot set the terminal to raw mode: {0}")]
    Raw(Errno),
    #[error("console: {0}")]
    Io(Errno),
}

/// How a session ended, when it ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// `~.`, or the end of a non-terminal standard input.
    Left,
    /// The pty closed: the VM stopped.
    VmStopped,
    /// SIGINT, SIGTERM or SIGHUP.
    Signal(Signal),
}

/// What one typed byte does, after cu(1)'s escapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    /// Nothing yet (a `~` at the start of a line).
    Held,
    Send(u8),
    /// A `~` that escaped nothing, and the byte after it.
    SendTilde(u8),
    Leave,
    Help,
}

/// Where an escape sequence the terminal sends is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sequence {
    None,
    /// After ESC.
    Esc,
    /// After ESC [ (CSI), until a final byte.
    Csi,
    /// After ESC O (SS3), one more byte.
    Ss3,
}

/// The escape state: `~` is special only at the start of a line. Escape
/// sequences pass through without ending a line's start: a guest's shell
/// asking where the cursor is (busybox ash sends ESC [6n with each
/// prompt) gets the terminal's answer on our input, and `~.` typed after
/// that prompt must still leave.
struct Escapes {
    line_start: bool,
    tilde: bool,
    sequence: Sequence,
}

impl Escapes {
    fn new() -> Escapes {
        Escapes {
            line_start: true,
            tilde: false,
            sequence: Sequence::None,
        }
    }

    fn key(&mut self, byte: u8) -> Key {
        match self.sequence {
            Sequence::None => {}
            Sequence::Esc => {
                self.sequence = match byte {
                    b'[' => Sequence::Csi,
                    b'O' => Sequence::Ss3,
                    _ => Sequence::None,
                };
                return Key::Send(byte);
            }
            Sequence::Csi => {
                if (0x40..=0x7e).contains(&byte) {
                    self.sequence = Sequence::None;
                }
                return Key::Send(byte);
            }
            Sequence::Ss3 => {
                self.sequence = Sequence::None;
                return Key::Send(byte);
            }
        }
        if byte == 0x1b && !self.tilde {
            self.sequence = Sequence::Esc;
            return Key::Send(byte);
        }
        if self.tilde {
            self.tilde = false;
            return match byte {
                b'.' => Key::Leave,
                b'?' => Key::Help,
                b'~' => {
                    self.line_start = false;
                    Key::Send(b'~')
                }
                other => {
                    self.line_start = matches!(other, b'\r' | b'\n');
                    Key::SendTilde(other)
                }
            };
        }
        if self.line_start && byte == b'~' {
            self.tilde = true;
            return Key::Held;
        }
        self.line_start = matches!(byte, b'\r' | b'\n');
        Key::Send(byte)
    }
}

/// The local terminal's settings, put back when dropped.
struct RawTerminal {
    saved: Termios,
}

impl RawTerminal {
    /// Makes standard input raw, if it is a terminal.
    fn enter() -> Result<Option<RawTerminal>, ConsoleError> {
        let stdin = std::io::stdin();
        let saved = match termios::tcgetattr(stdin.as_fd()) {
            Ok(saved) => saved,
            Err(Errno::ENOTTY) => return Ok(None),
            Err(e) => return Err(ConsoleError::Raw(e)),
        };
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSADRAIN, &raw).map_err(ConsoleError::Raw)?;
        Ok(Some(RawTerminal { saved }))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSADRAIN, &self.saved);
    }
}

/// Opens `tty` (the VM's pty slave) and takes the console lock.
fn console_open(tty: &str) -> Result<OwnedFd, ConsoleError> {
    let raw = nix::fcntl::open(
        tty,
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| ConsoleError::Open(tty.to_string(), e))?;
    // SAFETY: open just returned this descriptor; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    if !nix::unistd::isatty(fd.as_raw_fd()).unwrap_or(false) {
        return Err(ConsoleError::NotATty(tty.to_string()));
    }
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(match Errno::last() {
            Errno::EWOULDBLOCK => ConsoleError::InUse,
            e => ConsoleError::Lock(tty.to_string(), e),
        });
    }
    Ok(fd)
}

/// Blocks the signals that end a session and returns a descriptor to
/// read them from.
fn console_signals() -> Result<SignalFd, ConsoleError> {
    let mut mask = SigSet::empty();
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        mask.add(sig);
    }
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&mask), None)
        .map_err(ConsoleError::Signals)?;
    SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(ConsoleError::Signals)
}

/// Writes all of `data` to a blocking descriptor (the local terminal).
pub fn write_all(fd: BorrowedFd, mut data: &[u8]) -> Result<(), Errno> {
    while !data.is_empty() {
        match nix::unistd::write(fd, data) {
            Ok(n) => data = &data[n..],
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Attaches the terminal to the VM's console at `tty` until the user
/// leaves, the VM stops or a signal comes.
pub fn console_attach(tty: &str) -> Result<Ended, ConsoleError> {
    let pty = console_open(tty)?;
    let signals = console_signals()?;
    errln!("Connected to {tty} (~. to leave, ~? for help)");
    let raw = RawTerminal::enter()?;
    let ended = console_relay(&pty, &signals);
    drop(raw);
    if matches!(ended, Ok(Ended::Left)) {
        errln!("\n[EOT]");
    }
    ended
}

/// The relay loop: standard input to the pty (minus the escapes), the
/// pty to standard output.
fn console_relay(pty: &OwnedFd, signals: &SignalFd) -> Result<Ended, ConsoleError> {
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    let mut escapes = Escapes::new();
    let mut to_guest: Vec<u8> = Vec::new();
    let mut stdin_open = true;
    let mut buf = [0u8; 4096];
    loop {
        if !stdin_open && to_guest.is_empty() {
            return Ok(Ended::Left);
        }
        let pty_events = if to_guest.is_empty() {
            PollFlags::POLLIN
        } else {
            PollFlags::POLLIN | PollFlags::POLLOUT
        };
        let stdin_events = if stdin_open {
            PollFlags::POLLIN
        } else {
            PollFlags::empty()
        };
        let mut fds = [
            PollFd::new(signals.as_fd(), PollFlags::POLLIN),
            PollFd::new(pty.as_fd(), pty_events),
            PollFd::new(stdin.as_fd(), stdin_events),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(ConsoleError::Io(e)),
        }
        let ready = |i: usize| fds[i].revents().unwrap_or(PollFlags::empty());
        let (sig_ready, pty_ready, stdin_ready) = (ready(0), ready(1), ready(2));

        if !sig_ready.is_empty() {
            if let Ok(Some(info)) = signals.read_signal() {
                let sig = Signal::try_from(info.ssi_signo as i32).unwrap_or(Signal::SIGTERM);
                return Ok(Ended::Signal(sig));
            }
        }
        if pty_ready.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
            match nix::unistd::read(pty.as_raw_fd(), &mut buf) {
                Ok(0) | Err(Errno::EIO) => return Ok(Ended::VmStopped),
                Ok(n) => write_all(stdout.as_fd(), &buf[..n]).map_err(ConsoleError::Io)?,
                Err(Errno::EAGAIN) | Err(Errno::EINTR) => {
                    if pty_ready.contains(PollFlags::POLLHUP) {
                        return Ok(Ended::VmStopped);
                    }
                }
                Err(e) => return Err(ConsoleError::Io(e)),
            }
        }
        if pty_ready.contains(PollFlags::POLLOUT) && !to_guest.is_empty() {
            match nix::unistd::write(pty.as_fd(), &to_guest) {
                Ok(n) => {
                    to_guest.drain(..n);
                }
                Err(Errno::EAGAIN) | Err(Errno::EINTR) => {}
                Err(Errno::EIO) => return Ok(Ended::VmStopped),
                Err(e) => return Err(ConsoleError::Io(e)),
            }
        }
        if stdin_ready.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
            let n = match nix::unistd::read(stdin.as_raw_fd(), &mut buf) {
                Ok(n) => n,
                Err(Errno::EAGAIN) | Err(Errno::EINTR) => continue,
                Err(e) => return Err(ConsoleError::Io(e)),
            };
            if n == 0 {
                stdin_open = false;
                continue;
            }
            for &byte in &buf[..n] {
                let send: &[u8] = match escapes.key(byte) {
                    Key::Held => &[],
                    Key::Send(b) => &[b],
                    Key::SendTilde(b) => &[b'~', b],
                    Key::Leave => return Ok(Ended::Left),
                    Key::Help => {
                        write_all(stdout.as_fd(), HELP.as_bytes()).map_err(ConsoleError::Io)?;
                        &[]
                    }
                };
                if to_guest.len() + send.len() <= PENDING_MAX {
                    to_guest.extend_from_slice(send);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(input: &[u8]) -> Vec<Key> {
        let mut escapes = Escapes::new();
        input.iter().map(|&b| escapes.key(b)).collect()
    }

    #[test]
    fn escapes_only_at_the_start_of_a_line() {
        assert_eq!(keys(b"~."), [Key::Held, Key::Leave]);
        assert_eq!(
            keys(b"a~."),
            [Key::Send(b'a'), Key::Send(b'~'), Key::Send(b'.')]
        );
        assert_eq!(
            keys(b"a\r~."),
            [Key::Send(b'a'), Key::Send(b'\r'), Key::Held, Key::Leave]
        );
        assert_eq!(keys(b"\n~?"), [Key::Send(b'\n'), Key::Held, Key::Help]);
    }

    #[test]
    fn tilde_tilde_sends_one_and_others_pass_through() {
        assert_eq!(keys(b"~~."), [Key::Held, Key::Send(b'~'), Key::Send(b'.')]);
        assert_eq!(
            keys(b"~x~."),
            [
                Key::Held,
                Key::SendTilde(b'x'),
                Key::Send(b'~'),
                Key::Send(b'.')
            ]
        );
        // After ~? the line still starts there.
        assert_eq!(keys(b"~?~."), [Key::Held, Key::Help, Key::Held, Key::Leave]);
    }

    #[test]
    fn terminal_replies_do_not_end_a_line_start() {
        // A cursor position report after the prompt, then ~.
        let input = b"\r\x1b[30;14R~.";
        let got = keys(input);
        assert_eq!(got[got.len() - 2..], [Key::Held, Key::Leave]);
        // An arrow key in application mode (ESC O A) as well.
        assert_eq!(keys(b"\x1bOA~.")[3..], [Key::Held, Key::Leave]);
        // Typed text still does.
        assert_eq!(keys(b"x\x1b[A~.")[4..], [Key::Send(b'~'), Key::Send(b'.')]);
    }
}
