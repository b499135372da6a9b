//! Forked helpers: how the parent does what could wait. Opening a file
//! (a hung NFS server, a stopped FUSE daemon) or looking up a user or a
//! group (LDAP, sssd) can block for as long as someone else likes, so
//! the parent never does either in its loop: it forks a helper that
//! does the work as root (switching to users itself where the rules in
//! userfiles.rs say so), sends the descriptors and an answer back over a
//! socketpair, and exits. The helper's socket is one more descriptor in
//! the parent's mio loop and its deadline one more timer: whoever waits
//! for it (a start) is a pending request, never a wait.
//!
//! A helper is killed when its deadline passes or when what it works for
//! is given up (the VM is stopped, vmd ends), and dies with the parent;
//! the parent's loop reaps it like any child and hands its pid back here
//! ([`Helper::reaped`]), so a helper that died without an answer is
//! noticed even if its socket says nothing.

use crate::log;
use crate::parent::userfiles::{self, Opened};
use common::ctl::CtlError;
use common::imsg::{self, Channel, Frame, HelperAnswer, Message};
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::unistd::{ForkResult, Pid};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};
use thiserror::Error;

/// A helper's answer is sent in pieces of this size (a frame holds one).
const CHUNK: usize = 32 * 1024;
/// The largest answer read (a configuration file is at most 4 MiB).
const MAX_ANSWER: usize = 64 << 20;

fn answer_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_ANSWER>()
}

/// A helper's files and its answer.
pub type Answered = (Vec<Opened>, HelperAnswer);

/// What a helper's work gives: the files it opened, and its answer or
/// the error vmctl is to be told.
pub type Work = (Vec<Opened>, Result<HelperAnswer, CtlError>);

#[derive(Debug, Error)]
pub enum HelperError {
    #[error("cannot start a helper: {step}: {source}")]
    Spawn {
        step: &'static str,
        source: std::io::Error,
    },
    #[error("no answer within {secs}s (a file system or a name service does not respond?)")]
    Timeout { secs: u64 },
    #[error("the helper ended without an answer")]
    Silent,
    #[error("the helper's answer is garbled: {0}")]
    Garbled(String),
    /// The helper answered with an error for vmctl.
    #[error("{}", .0.describe())]
    Refused(CtlError),
}

impl HelperError {
    /// As vmctl is told: the helper's own error as it gave it.
    pub fn to_ctl(&self) -> CtlError {
        match self {
            HelperError::Refused(e) => e.clone(),
            other => CtlError::Text(other.to_string()),
        }
    }
}

/// A helper at work, as the parent sees it.
pub struct Helper {
    pid: Pid,
    token: Token,
    channel: Option<Channel>,
    deadline: Instant,
    timeout: Duration,
    files: Vec<Opened>,
    /// The answer's bincode so far, and whether it is complete.
    answer: Vec<u8>,
    ended: bool,
    /// Not reaped yet: its pid is still its own to signal.
    alive: bool,
}

impl Helper {
    /// Forks a helper that runs `work` and sends its outcome; its socket
    /// is registered in `registry` under `token`, and it has `timeout`.
    pub fn spawn(
        registry: &Registry,
        token: Token,
        timeout: Duration,
        work: impl FnOnce() -> Work,
    ) -> Result<Helper, HelperError> {
        let (mine, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| HelperError::Spawn {
            step: "socketpair",
            source: e.into(),
        })?;
        let parent = nix::unistd::getpid();
        // SAFETY: the parent is single-threaded, so the child may allocate;
        // it does its work, writes to its socket and _exits.
        match unsafe { nix::unistd::fork() } {
            Err(e) => Err(HelperError::Spawn {
                step: "fork",
                source: e.into(),
            }),
            Ok(ForkResult::Child) => {
                drop(mine);
                // The log file's or syslog's descriptor is closed next.
                log::init_stderr();
                userfiles::helper_close_inherited(theirs.as_raw_fd());
                // SAFETY: prctl with integer arguments.
                let orphan = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) }
                    != 0
                    || nix::unistd::getppid() != parent;
                let sent = !orphan && {
                    let (files, outcome) = work();
                    userfiles::send_opened(theirs.as_fd(), files)
                        .and_then(|()| {
                            let bytes = bincode::serde::encode_to_vec(&outcome, answer_config())
                                .map_err(|e| imsg::ImsgError::Encode(e.to_string()))?;
                            for chunk in bytes.chunks(CHUNK) {
                                let bytes = chunk.to_vec();
                                let frame = Frame::new(Message::HelperChunk { bytes });
                                imsg::send_blocking(theirs.as_fd(), frame)?;
                            }
                            imsg::send_blocking(theirs.as_fd(), Frame::new(Message::HelperEnd))
                        })
                        .is_ok()
                };
                // SAFETY: _exit ends this fork without running the
                // parent's destructors or atexit handlers.
                unsafe { libc::_exit(if sent { 0 } else { 1 }) }
            }
            Ok(ForkResult::Parent { child }) => {
                drop(theirs);
                let channel = Channel::new(mine);
                let registered = registry.register(
                    &mut SourceFd(&channel.sock.as_raw_fd()),
                    token,
                    Interest::READABLE,
                );
                if let Err(source) = registered {
                    let _ = kill(child, Signal::SIGKILL);
                    return Err(HelperError::Spawn {
                        step: "registering its socket",
                        source,
                    });
                }
                Ok(Helper {
                    pid: child,
                    token,
                    channel: Some(channel),
                    deadline: Instant::now() + timeout,
                    timeout,
                    files: Vec::new(),
                    answer: Vec::new(),
                    ended: false,
                    alive: true,
                })
            }
        }
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    pub fn token(&self) -> Token {
        self.token
    }

    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Reads what the helper sent: its outcome once it answered (or its
    /// socket failed), else None (more is to come).
    pub fn read(&mut self, registry: &Registry) -> Option<Result<Answered, HelperError>> {
        let channel = self.channel.as_mut()?;
        let (frames, eof) = match channel.receive() {
            Ok(received) => received,
            Err(e) => return Some(self.finish(registry, Err(HelperError::Garbled(e.to_string())))),
        };
        for frame in frames {
            match (frame.message, frame.fd) {
                (Message::UserFile { kind, path }, Some(fd)) => self.files.push(Opened {
                    kind,
                    path,
                    file: File::from(fd),
                }),
                (Message::HelperChunk { bytes }, None)
                    if self.answer.len() + bytes.len() <= MAX_ANSWER =>
                {
                    self.answer.extend(bytes)
                }
                (Message::HelperEnd, None) => self.ended = true,
                (other, _) => {
                    let why = format!("unexpected {}", other.type_code().1);
                    return Some(self.finish(registry, Err(HelperError::Garbled(why))));
                }
            }
        }
        if self.ended {
            let decoded: Result<(Result<HelperAnswer, CtlError>, usize), _> =
                bincode::serde::decode_from_slice(&self.answer, answer_config());
            let outcome = match decoded {
                Ok((Ok(answer), _)) => Ok((std::mem::take(&mut self.files), answer)),
                Ok((Err(e), _)) => Err(HelperError::Refused(e)),
                Err(e) => Err(HelperError::Garbled(e.to_string())),
            };
            return Some(self.finish(registry, outcome));
        }
        if eof {
            return Some(self.finish(registry, Err(HelperError::Silent)));
        }
        None
    }

    /// The helper was reaped: what it sent before it ended, or Silent.
    pub fn reaped(&mut self, registry: &Registry) -> Result<Answered, HelperError> {
        self.alive = false;
        self.read(registry)
            .unwrap_or_else(|| self.finish(registry, Err(HelperError::Silent)))
    }

    /// Its deadline passed: it is killed (and reaped by the loop).
    pub fn expire(&mut self, registry: &Registry) -> HelperError {
        let secs = self.timeout.as_secs();
        match self.finish(registry, Err(HelperError::Timeout { secs })) {
            Err(e) => e,
            Ok(_) => HelperError::Silent,
        }
    }

    /// Gives the helper up: killed, its socket closed.
    pub fn cancel(&mut self, registry: &Registry) {
        let _ = self.finish(registry, Err(HelperError::Silent));
    }

    fn finish(
        &mut self,
        registry: &Registry,
        outcome: Result<Answered, HelperError>,
    ) -> Result<Answered, HelperError> {
        // Done or not, it has nothing more to do: the loop reaps it.
        if self.alive {
            let _ = kill(self.pid, Signal::SIGKILL);
        }
        if let Some(channel) = self.channel.take() {
            let _ = registry.deregister(&mut SourceFd(&channel.sock.as_raw_fd()));
        }
        self.files.clear();
        outcome
    }
}
