//! vmctl's connection to vmd's control socket: one request out, frames
//! back, in the same imsg framing the daemon's processes use.

use common::ctl::CtlRequest;
use common::imsg::{self, Channel, Frame, Message};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

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

pub struct Client {
    channel: Channel,
    frames: VecDeque<Frame>,
}

impl Client {
    /// Connects, or says why not (`vmctl: connect: PATH: reason`).
    pub fn connect(path: &Path) -> Result<Client, String> {
        let stream = UnixStream::connect(path)
            .map_err(|e| format!("connect: {}: {}", path.display(), strerror(&e)))?;
        Ok(Client {
            channel: Channel::without_fds(OwnedFd::from(stream)),
            frames: VecDeque::new(),
        })
    }

    pub fn send(&mut self, request: CtlRequest) -> Result<(), String> {
        imsg::send_blocking(self.channel.sock.as_fd(), Frame::new(Message::Ctl(request)))
            .map_err(|e| format!("write error: {e}"))
    }

    /// The next message from vmd, waiting for it.
    pub fn receive(&mut self) -> Result<Message, String> {
        loop {
            if let Some(frame) = self.frames.pop_front() {
                return Ok(frame.message);
            }
            let mut fds = [PollFd::new(self.channel.sock.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(format!("poll: {e}")),
            }
            let (frames, eof) = self
                .channel
                .receive()
                .map_err(|e| format!("imsg_read error: {e}"))?;
            self.frames.extend(frames);
            if eof && self.frames.is_empty() {
                return Err("pipe closed".into());
            }
        }
    }
}

fn strerror(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => nix::errno::Errno::from_raw(code).desc().to_string(),
        None => e.to_string(),
    }
}
