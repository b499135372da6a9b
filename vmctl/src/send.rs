//! `vmctl send ID` and `vmctl receive NAME`.
//!
//! send: as OpenBSD's vmctl does, vmctl hands vmd one end of
//! a socketpair of its own and copies what comes out of the other end to
//! its standard output itself, so no privileged process touches the
//! user's file or terminal. The VM process writes the stream
//! (common::stream) into it and shuts it down when it is whole; vmctl
//! then answers one byte ([`common::stream::ACK`]) once it has written
//! everything out, and only then does vmd terminate the VM. Without that
//! answer (vmctl could not write: a full disk, a reader gone) vmd resumes
//! the guest. Progress (bytes, rate, phase) goes to standard error when
//! it is a terminal.
//!
//! receive: vmctl reads the stream's header from its standard input and
//! checks it (common::stream) before it asks vmd for anything, sends it
//! with one end of a socketpair, and copies the rest of its input into
//! the other end. vmd checks the header again, starts the VM paused from
//! the stream and lets it run once the stream's hash checks out; the
//! answer is a start's.

use crate::client::Client;
use crate::vms::{fail, one_vmid, parse_vmid};
use crate::Global;
use common::ctl::{CtlRequest, VmTarget, ANSWER_TIMEOUT};
use common::imsg::Message;
use common::stream::{Decoder, Item};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use std::io::IsTerminal;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// How often the progress line is redrawn.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Why send may not write to this standard output: a terminal (here or,
/// with `-H`, before the stream crosses ssh).
pub fn stdout_refusal() -> Option<&'static str> {
    std::io::stdout()
        .is_terminal()
        .then_some("send: standard output is a terminal: redirect it to a file or a pipe")
}

pub fn send(global: &Global, args: &[String]) -> ExitCode {
    let target = match one_vmid("send", args) {
        Ok(target) => target,
        Err(code) => return code,
    };
    // vmd refuses anyone else (control drops a user's connection that
    // carries a descriptor): say so plainly.
    if !nix::unistd::geteuid().is_root() {
        return fail("send vm command failed: Operation not permitted (send is root's)");
    }
    let stdout = std::io::stdout();
    if let Some(refusal) = stdout_refusal() {
        return fail(refusal);
    }
    let (ours, theirs) = match socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    ) {
        Ok(pair) => pair,
        Err(e) => return fail(&format!("send: socketpair: {}", e.desc())),
    };
    let mut client = match Client::connect(global) {
        Ok(client) => client,
        Err(e) => return fail(&e),
    };
    if let Err(e) = client.send_with_fd(CtlRequest::Send { target }, theirs) {
        return fail(&e);
    }
    let mut copy = Copy {
        stream: Some(ours),
        out: stdout.lock(),
        bytes: 0,
        failed: None,
        progress: nix::unistd::isatty(std::io::stderr().as_raw_fd())
            .unwrap_or(false)
            .then(Progress::new),
    };
    let result = copy.run(&mut client);
    if let Some(progress) = copy.progress.as_mut() {
        progress.clear();
    }
    match (result, copy.failed) {
        (Ok(vmid), None) => {
            errln!("vmctl: sent vm {vmid} successfully");
            ExitCode::SUCCESS
        }
        (Ok(_), Some(why)) => fail(&format!("send: {why}")),
        (Err(e), Some(why)) => fail(&format!("send: {why}; vmd: {e}")),
        (Err(e), None) => fail(&format!("send vm command failed: {e}")),
    }
}

struct Copy<W: Write> {
    /// Our end of the socketpair, until the stream ends or we fail.
    stream: Option<OwnedFd>,
    out: W,
    bytes: u64,
    /// Why vmctl could not write the stream out.
    failed: Option<String>,
    progress: Option<Progress>,
}

impl<W: Write> Copy<W> {
    /// Copies until vmd answers (and the stream has ended): the VM's id,
    /// or vmd's reason.
    fn run(&mut self, client: &mut Client) -> Result<u32, String> {
        let mut buf = vec![0u8; 256 * 1024];
        let mut answer: Option<Result<u32, String>> = None;
        let mut heard = Instant::now();
        loop {
            if let Some(result) = &answer {
                if result.is_err() || self.stream.is_none() {
                    return result.clone();
                }
            }
            if heard.elapsed() > ANSWER_TIMEOUT {
                return Err(format!(
                    "vmd said nothing for {}s; see vmd's log",
                    ANSWER_TIMEOUT.as_secs()
                ));
            }
            let other = self.stream.as_ref().map(|s| (s.as_fd(), PollFlags::POLLIN));
            let (client_ready, stream_ready) = wait_ready(client, other)?;
            if stream_ready {
                heard = Instant::now();
                self.copy_some(&mut buf);
            }
            if client_ready {
                heard = Instant::now();
                for message in client.receive_ready()? {
                    if let Some(result) = answer_of(message, &mut self.progress) {
                        answer = Some(result.map(|(vmid, _)| vmid));
                    }
                }
            }
            if let Some(p) = self.progress.as_mut() {
                p.show(self.bytes);
            }
        }
    }

    /// Reads what the stream has and writes it out; at its end, flushes
    /// and answers vmd.
    fn copy_some(&mut self, buf: &mut [u8]) {
        let Some(stream) = &self.stream else {
            return;
        };
        let n = match nix::unistd::read(stream.as_raw_fd(), buf) {
            Ok(n) => n,
            Err(Errno::EINTR | Errno::EAGAIN) => return,
            Err(e) => {
                self.failed = Some(format!("reading from vmd: {}", e.desc()));
                self.stream = None;
                return;
            }
        };
        let written = if n == 0 {
            self.out.flush()
        } else {
            self.out.write_all(&buf[..n])
        };
        if let Err(e) = written {
            // Closing our end tells vmd: it resumes the guest.
            self.failed = Some(format!("writing the stream: {e}"));
            self.stream = None;
            return;
        }
        self.bytes += n as u64;
        if n == 0 {
            // Unanswered (vmd is gone, or never sent), vmd's answer says
            // what became of the VM.
            let _ = nix::unistd::write(stream, &[common::stream::ACK]);
            self.stream = None;
        }
    }
}

/// Waits up to a second for vmd's connection and `other` (polled for
/// its flags): whether each is ready.
fn wait_ready(
    client: &Client,
    other: Option<(std::os::fd::BorrowedFd, PollFlags)>,
) -> Result<(bool, bool), String> {
    let mut fds = vec![PollFd::new(client.fd(), PollFlags::POLLIN)];
    fds.extend(other.map(|(fd, flags)| PollFd::new(fd, flags)));
    match poll(&mut fds, PollTimeout::from(1000u16)) {
        Ok(_) | Err(Errno::EINTR) => {}
        Err(e) => return Err(format!("poll: {}", e.desc())),
    }
    let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
    Ok((ready(&fds[0]), fds.get(1).is_some_and(ready)))
}

/// vmd's answer in `message` (the VM's id and tty, or why it failed);
/// None for a progress note, whose phase goes to `progress`.
fn answer_of(
    message: Message,
    progress: &mut Option<Progress>,
) -> Option<Result<(u32, String), String>> {
    Some(match message {
        Message::CtlProgress { note, .. } => {
            if let Some(p) = progress.as_mut() {
                p.phase = note.split(':').next().unwrap_or("").to_string();
            }
            return None;
        }
        Message::CtlVmResult {
            error: None,
            vmid,
            tty,
        } => Ok((vmid, tty.unwrap_or_default())),
        Message::CtlVmResult {
            error: Some(error), ..
        } => Err(error.describe()),
        Message::CtlFail { errno, lines } if lines.is_empty() => {
            Err(Errno::from_raw(errno).desc().to_string())
        }
        Message::CtlFail { lines, .. } => Err(lines.join("; ")),
        _ => Err("unexpected response received from vmd".into()),
    })
}

/// The progress line on a terminal: bytes, rate, phase.
struct Progress {
    started: Instant,
    shown: Option<Instant>,
    phase: String,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            started: Instant::now(),
            shown: None,
            phase: "starting".into(),
        }
    }

    fn show(&mut self, bytes: u64) {
        let now = Instant::now();
        if self.shown.is_some_and(|t| now - t < PROGRESS_EVERY) {
            return;
        }
        self.shown = Some(now);
        let secs = (now - self.started).as_secs_f64().max(0.001);
        let mib = bytes as f64 / (1 << 20) as f64;
        err!(
            "\r{}: {mib:.1} MiB, {:.1} MiB/s\x1b[K",
            self.phase,
            mib / secs
        );
    }

    fn clear(&mut self) {
        if self.shown.is_some() {
            err!("\r\x1b[K");
        }
    }
}

pub fn receive(global: &Global, args: &[String]) -> ExitCode {
    let name = match args {
        [word] => match parse_vmid(word) {
            Ok(VmTarget::Name(name)) => name,
            Ok(VmTarget::Id(_)) => return fail(&format!("invalid vm name: {word}")),
            Err(e) => return fail(&e),
        },
        _ => return crate::command_usage("receive"),
    };
    if !nix::unistd::geteuid().is_root() {
        return fail("receive vm command failed: Operation not permitted (receive is root's)");
    }
    let mut stdin = std::io::stdin().lock();
    let (header, rest) = match read_header(&mut stdin) {
        Ok(read) => read,
        Err(e) => return fail(&format!("receive: {e}")),
    };
    let (ours, theirs) = match socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    ) {
        Ok(pair) => pair,
        Err(e) => return fail(&format!("receive: socketpair: {}", e.desc())),
    };
    let mut client = match Client::connect(global) {
        Ok(client) => client,
        Err(e) => return fail(&e),
    };
    if let Err(e) = client.send_with_fd(CtlRequest::Receive { name, header }, theirs) {
        return fail(&e);
    }
    let mut feed = Feed {
        stream: Some(ours),
        pending: rest,
        written: 0,
        input_open: true,
        bytes: 0,
        progress: nix::unistd::isatty(std::io::stderr().as_raw_fd())
            .unwrap_or(false)
            .then(Progress::new),
    };
    let result = feed.run(&mut client, &mut stdin);
    if let Some(progress) = feed.progress.as_mut() {
        progress.clear();
    }
    match result {
        Ok((vmid, tty)) => {
            errln!("vmctl: received vm {vmid} successfully, tty {tty}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("receive vm command failed: {e}")),
    }
}

/// Reads the stream's header from `input` and checks it: its bytes, and
/// what came after them.
fn read_header(input: &mut impl std::io::Read) -> Result<(Vec<u8>, Vec<u8>), String> {
    let mut decoder = Decoder::new();
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if let Some(Item::Header(_)) = decoder.next_item().map_err(|e| e.to_string())? {
            let length = decoder.consumed() as usize;
            let rest = raw.split_off(length);
            return Ok((raw, rest));
        }
        let n = match input.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("reading standard input: {e}")),
        };
        if n == 0 {
            decoder.finish().map_err(|e| e.to_string())?;
            return Err("the stream ended in its header".into());
        }
        raw.extend_from_slice(&buf[..n]);
        decoder.push(&buf[..n]);
    }
}

/// Copies the rest of the stream from standard input into vmd's socket.
struct Feed {
    stream: Option<OwnedFd>,
    pending: Vec<u8>,
    written: usize,
    input_open: bool,
    bytes: u64,
    progress: Option<Progress>,
}

impl Feed {
    /// Until vmd answers: the VM's id and tty, or vmd's reason.
    fn run(
        &mut self,
        client: &mut Client,
        input: &mut impl std::io::Read,
    ) -> Result<(u32, String), String> {
        let mut buf = vec![0u8; 256 * 1024];
        let mut heard = Instant::now();
        loop {
            if heard.elapsed() > common::ctl::START_ANSWER_TIMEOUT {
                return Err(format!(
                    "vmd did not answer within {}s; see vmd's log",
                    common::ctl::START_ANSWER_TIMEOUT.as_secs()
                ));
            }
            let want_input =
                self.stream.is_some() && self.input_open && self.written >= self.pending.len();
            let stdin = std::io::stdin();
            let other = if want_input {
                Some((stdin.as_fd(), PollFlags::POLLIN))
            } else {
                let unwritten = self.written < self.pending.len();
                let stream = self.stream.as_ref().filter(|_| unwritten);
                stream.map(|s| (s.as_fd(), PollFlags::POLLOUT))
            };
            let (client_ready, other_ready) = wait_ready(client, other)?;
            if other_ready && want_input {
                match input.read(&mut buf) {
                    Ok(0) => {
                        self.input_open = false;
                        if let Some(stream) = &self.stream {
                            let _ = nix::sys::socket::shutdown(
                                stream.as_raw_fd(),
                                nix::sys::socket::Shutdown::Write,
                            );
                        }
                    }
                    Ok(n) => {
                        self.pending = buf[..n].to_vec();
                        self.written = 0;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("reading standard input: {e}")),
                }
            }
            self.write_some();
            if client_ready {
                heard = Instant::now();
                for message in client.receive_ready()? {
                    if let Some(result) = answer_of(message, &mut self.progress) {
                        return result;
                    }
                }
            }
            if let Some(p) = self.progress.as_mut() {
                p.show(self.bytes);
            }
        }
    }

    /// Writes what the socket takes; a closed socket ends the copy (vmd's
    /// answer says why).
    fn write_some(&mut self) {
        let Some(stream) = &self.stream else {
            return;
        };
        while self.written < self.pending.len() {
            match nix::unistd::write(stream, &self.pending[self.written..]) {
                Ok(n) => {
                    self.written += n;
                    self.bytes += n as u64;
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return,
                Err(_) => {
                    self.stream = None;
                    return;
                }
            }
        }
    }
}
