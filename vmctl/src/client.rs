//! vmctl's connection to vmd's control socket: one request out, frames
//! back, in the same imsg framing the daemon's processes use.
//!
//! vmctl never waits without bound unless the user asked to wait (`wait`,
//! `stop -w`): each answer must come within the request's
//! [`CtlRequest::answer_timeout`], and vmd must take the connection
//! within [`ANSWER_TIMEOUT`].

use crate::remote::Tunnel;
use crate::Global;
use common::ctl::{CtlRequest, ANSWER_TIMEOUT};
use common::imsg::{self, Channel, Frame, Message};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, UnixAddr};
use nix::sys::time::TimeVal;
use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where vmd listens unless `-s` or `VMD_SOCKET` says otherwise.
pub const DEFAULT_SOCKET: &str = "/var/run/vmd.sock";

/// The socket to use: `-s PATH`, else `$VMD_SOCKET`, else the default.
pub fn socket_path(option: Option<&str>) -> PathBuf {
    match option {
        Some(path) => PathBuf::from(path),
        None => match std::env::var_os("VMD_SOCKET") {
            Some(path) if !path.is_empty() => PathBuf::from(path),
            _ => PathBuf::from(DEFAULT_SOCKET),
        },
    }
}

/// Test hook, for the regress suites only: `VMCTL_TEST_ANSWER_TIMEOUT=N`
/// shortens every bound to N seconds (it never lengthens one), so a test
/// of a vmd that does not answer need not wait a minute.
const TEST_TIMEOUT_VARIABLE: &str = "VMCTL_TEST_ANSWER_TIMEOUT";

/// `bound`, or the test hook's shorter one (at least a second: a zero
/// SO_SNDTIMEO would mean no bound at all).
fn client_bound(bound: Duration) -> Duration {
    std::env::var(TEST_TIMEOUT_VARIABLE)
        .ok()
        .and_then(|secs| secs.parse::<u64>().ok())
        .map_or(bound, |secs| bound.min(Duration::from_secs(secs.max(1))))
}

pub struct Client {
    channel: Channel,
    frames: VecDeque<Frame>,
    socket: PathBuf,
    /// How long the next answer may take; None: as long as it takes.
    patience: Option<Duration>,
    /// The ssh connection to another host's vmd (`-H`).
    tunnel: Option<Tunnel>,
}

/// Connects to the control socket at `path`, or says why not. Each write
/// is bounded, so a vmd that does not take the connection ends the wait.
pub fn connect_socket(path: &Path) -> Result<OwnedFd, String> {
    let bound = client_bound(ANSWER_TIMEOUT);
    let refused = |e: Errno| {
        let why = match e {
            // SO_SNDTIMEO ran out: connect waited in a full backlog.
            Errno::EAGAIN => format!(
                "vmd did not take the connection within {}s; see vmd's log",
                bound.as_secs()
            ),
            e => e.desc().to_string(),
        };
        format!("connect: {}: {why}", path.display())
    };
    let sock = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(refused)?;
    // Bounds connect (and later writes) on a UNIX socket.
    let timeval = TimeVal::new(bound.as_secs() as _, bound.subsec_micros() as _);
    socket::setsockopt(&sock, sockopt::SendTimeout, &timeval).map_err(refused)?;
    let addr = UnixAddr::new(path).map_err(refused)?;
    loop {
        match socket::connect(sock.as_raw_fd(), &addr) {
            Ok(()) => return Ok(sock),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(refused(e)),
        }
    }
}

impl Client {
    /// Connects to vmd: its socket here, or through `ssh HOST vmctl
    /// proxy` with `-H HOST`; or says why not (`vmctl: connect: PATH:
    /// reason`). A vmd that does not take the connection in time is a
    /// reason too.
    pub fn connect(global: &Global) -> Result<Client, String> {
        let (sock, tunnel, socket) = match &global.remote {
            Some(host) => {
                let (sock, tunnel) = Tunnel::open(global, host)?;
                let socket = global.remote_socket.as_deref().unwrap_or(DEFAULT_SOCKET);
                (
                    sock,
                    Some(tunnel),
                    PathBuf::from(format!("{host}:{socket}")),
                )
            }
            None => (connect_socket(&global.socket)?, None, global.socket.clone()),
        };
        Ok(Client {
            channel: Channel::without_fds(sock),
            frames: VecDeque::new(),
            socket,
            patience: Some(client_bound(ANSWER_TIMEOUT)),
            tunnel,
        })
    }

    /// Sends `request`; its answers may take as long as it allows.
    pub fn send(&mut self, request: CtlRequest) -> Result<(), String> {
        self.patience = request.answer_timeout().map(client_bound);
        let sent =
            imsg::send_blocking(self.channel.sock.as_fd(), Frame::new(Message::Ctl(request)));
        match (sent, &mut self.tunnel) {
            (Ok(()), _) => Ok(()),
            (Err(_), Some(tunnel)) => Err(tunnel.closed()),
            (Err(e), None) => Err(format!("write error: {e}")),
        }
    }

    /// Sends `request` with a descriptor (control passes root's on).
    pub fn send_with_fd(
        &mut self,
        request: CtlRequest,
        fd: std::os::fd::OwnedFd,
    ) -> Result<(), String> {
        self.patience = request.answer_timeout().map(client_bound);
        let frame = Frame {
            fd: Some(fd),
            ..Frame::new(Message::Ctl(request))
        };
        imsg::send_blocking(self.channel.sock.as_fd(), frame)
            .map_err(|e| format!("write error: {e}"))
    }

    /// The connection, for a caller that polls it with other descriptors.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.channel.sock.as_fd()
    }

    /// What vmd has sent that can be read now, without waiting; an error
    /// when vmd closed the connection with nothing more to read.
    pub fn receive_ready(&mut self) -> Result<Vec<Message>, String> {
        self.read_frames()?;
        Ok(self.frames.drain(..).map(|f| f.message).collect())
    }

    /// Reads the frames available now; an error when vmd closed the
    /// connection and none is left.
    fn read_frames(&mut self) -> Result<(), String> {
        let (frames, eof) = match self.channel.receive() {
            Ok(read) => read,
            // ssh went with our request unread (ECONNRESET): its end
            // says more than the socket's.
            Err(_) if self.tunnel.is_some() => (Vec::new(), true),
            Err(e) => return Err(format!("imsg_read error: {e}")),
        };
        self.frames.extend(frames);
        if eof && self.frames.is_empty() {
            return Err(match &mut self.tunnel {
                Some(tunnel) => tunnel.closed(),
                None => "pipe closed".into(),
            });
        }
        Ok(())
    }

    /// The next message from vmd, waiting for it as long as the request
    /// allows.
    pub fn receive(&mut self) -> Result<Message, String> {
        let deadline = self.patience.map(|p| (p, Instant::now() + p));
        loop {
            if let Some(frame) = self.frames.pop_front() {
                return Ok(frame.message);
            }
            let timeout = match deadline {
                None => PollTimeout::NONE,
                Some((patience, at)) => {
                    let left = at.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(format!(
                            "vmd did not answer within {}s on {}; see vmd's log",
                            patience.as_secs(),
                            self.socket.display()
                        ));
                    }
                    // Rounded up, so the deadline has passed when poll ends.
                    let ms = left.as_millis().saturating_add(1);
                    PollTimeout::try_from(ms.min(i32::MAX as u128) as i32)
                        .unwrap_or(PollTimeout::MAX)
                }
            };
            let mut fds = [PollFd::new(self.channel.sock.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, timeout) {
                Ok(0) => continue,
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(format!("poll: {e}")),
            }
            self.read_frames()?;
        }
    }
}
