//! The writing side of `vmctl send`, the same for every backend: the
//! backend's migration data, read from a pipe, framed as a stream
//! (common::stream) into the client's socket (vmctl's end of a
//! socketpair; the parent made it non-blocking).
//!
//! It never blocks the VM process's loop and holds at most one read of
//! the pipe: while the client has not taken what was framed, the pipe is
//! not read, so a slow reader slows the backend's migration instead of
//! filling memory. Both descriptors are registered edge-triggered; each
//! [`StreamOut::pump`] goes on until one of them would block, so an edge
//! always follows.

use super::backend::FIRST_BACKEND_TOKEN;
use super::console::read_some;
use common::stream::{Encoder, StreamHeader};
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use nix::errno::Errno;
use nix::sys::socket::MsgFlags;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

/// The pipe from the backend and the client's socket (tokens after the
/// backend's first few).
pub const SEND_PIPE: Token = Token(FIRST_BACKEND_TOKEN + 8);
pub const SEND_CLIENT: Token = Token(FIRST_BACKEND_TOKEN + 9);

/// The most read from the pipe at once (a pipe holds 64 KiB).
const READ_MAX: usize = 256 * 1024;

/// Where a stream stands after [`StreamOut::pump`].
#[derive(Debug, PartialEq, Eq)]
pub enum Pumped {
    /// More to come (or to write): wait for events.
    Working,
    /// The backend closed the pipe and everything read is written.
    PipeEnded,
    /// The end (after [`StreamOut::finish`]) is written: the stream is
    /// whole.
    Whole,
}

pub struct StreamOut {
    client: OwnedFd,
    pipe: Option<OwnedFd>,
    encoder: Option<Encoder>,
    out: Vec<u8>,
    written: usize,
    buf: Vec<u8>,
    /// Migration data read from the pipe.
    pub bytes: u64,
    /// Stream bytes the client took.
    pub sent: u64,
}

impl StreamOut {
    /// The stream to `client` starts with `header`'s bytes.
    pub fn new(
        client: OwnedFd,
        header: &StreamHeader,
        registry: &Registry,
    ) -> Result<StreamOut, String> {
        let (encoder, out) =
            Encoder::new(header).map_err(|e| format!("cannot write the header: {e}"))?;
        registry
            .register(
                &mut SourceFd(&client.as_raw_fd()),
                SEND_CLIENT,
                Interest::WRITABLE | Interest::READABLE,
            )
            .map_err(|e| format!("cannot watch the client's descriptor: {e}"))?;
        Ok(StreamOut {
            client,
            pipe: None,
            encoder: Some(encoder),
            out,
            written: 0,
            buf: vec![0; READ_MAX],
            bytes: 0,
            sent: 0,
        })
    }

    /// The backend writes its migration data into `pipe`'s other end.
    pub fn attach_pipe(&mut self, pipe: OwnedFd, registry: &Registry) -> Result<(), String> {
        registry
            .register(
                &mut SourceFd(&pipe.as_raw_fd()),
                SEND_PIPE,
                Interest::READABLE,
            )
            .map_err(|e| format!("cannot watch the migration pipe: {e}"))?;
        self.pipe = Some(pipe);
        Ok(())
    }

    /// Moves what it can; an error says what failed.
    pub fn pump(&mut self) -> Result<Pumped, String> {
        loop {
            if self.written < self.out.len() {
                match write_some(&self.client, &self.out[self.written..]) {
                    Ok(Some(n)) => {
                        self.written += n;
                        self.sent += n as u64;
                        continue;
                    }
                    Ok(None) => return Ok(Pumped::Working),
                    Err(e) => return Err(format!("the reader went away ({})", e.desc())),
                }
            }
            self.out.clear();
            self.written = 0;
            let Some(pipe) = &self.pipe else {
                return Ok(match self.encoder {
                    Some(_) => Pumped::PipeEnded,
                    None => Pumped::Whole,
                });
            };
            match read_some(pipe.as_raw_fd(), &mut self.buf) {
                Ok(None) => return Ok(Pumped::Working),
                Ok(Some(0)) => self.pipe = None,
                Ok(Some(n)) => {
                    if let Some(encoder) = self.encoder.as_mut() {
                        encoder.chunk(&self.buf[..n], &mut self.out);
                    }
                    self.bytes += n as u64;
                }
                Err(e) => return Err(format!("reading the migration data: {}", e.desc())),
            }
        }
    }

    /// The migration data is all there: the end goes out next.
    pub fn finish(&mut self) {
        if let Some(encoder) = self.encoder.take() {
            self.out.extend(encoder.finish());
        }
    }

    /// The stream is whole: the client reads its end (EOF) and answers
    /// with one byte once it has written all of it where it goes.
    pub fn end_write(&self) -> Result<(), String> {
        nix::sys::socket::shutdown(self.client.as_raw_fd(), nix::sys::socket::Shutdown::Write)
            .map_err(|e| format!("ending the stream: {}", e.desc()))
    }

    /// The client's answer after [`StreamOut::end_write`]: Some(true) it
    /// has written the whole stream, Some(false) it failed to (it closed
    /// without a word), None not yet.
    pub fn acknowledged(&self) -> Option<bool> {
        let mut byte = [0u8; 1];
        loop {
            match nix::sys::socket::recv(self.client.as_raw_fd(), &mut byte, MsgFlags::MSG_DONTWAIT)
            {
                Ok(n) => return Some(n == 1 && byte[0] == common::stream::ACK),
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return None,
                Err(_) => return Some(false),
            }
        }
    }

    /// Whether the client closed its end (it never writes to us): asked
    /// while no data flows, when a write would not tell.
    pub fn reader_gone(&self) -> bool {
        let mut byte = [0u8; 1];
        let mut iov = [std::io::IoSliceMut::new(&mut byte)];
        let peeked = nix::sys::socket::recvmsg::<()>(
            self.client.as_raw_fd(),
            &mut iov,
            None,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        );
        matches!(peeked, Ok(msg) if msg.bytes == 0)
            || matches!(peeked, Err(e) if e != Errno::EAGAIN && e != Errno::EINTR)
    }
}

/// Writes what the non-blocking `fd` takes now (None: nothing).
pub(super) fn write_some(fd: &OwnedFd, data: &[u8]) -> Result<Option<usize>, Errno> {
    let fd: BorrowedFd = std::os::fd::AsFd::as_fd(fd);
    loop {
        match nix::unistd::write(fd, data) {
            Ok(n) => return Ok(Some(n)),
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::stream::{Decoder, Item, StreamVm};
    use mio::{Events, Poll};
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    use std::io::{Read, Write};

    fn header() -> StreamHeader {
        StreamHeader {
            backend: "qemu".into(),
            qemu_version: "7.2.0".into(),
            machine: "pc-i440fx-7.2".into(),
            cpu: "qemu64".into(),
            accel: "tcg".into(),
            vm: StreamVm::default(),
        }
    }

    fn nonblocking_pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        )
        .unwrap()
    }

    /// A slow reader on a small socket: every byte of a 3 MiB migration
    /// arrives framed, and the loop never blocks.
    #[test]
    fn a_stream_through_a_slow_reader_arrives_whole() {
        let (client, reader) = nonblocking_pair();
        let (pipe_r, pipe_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC)
                .unwrap();
        let payload: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 253) as u8).collect();
        let writer_data = payload.clone();
        let writer = std::thread::spawn(move || {
            crate::vm::set_nonblocking(pipe_w.as_raw_fd()).unwrap();
            let mut file = std::fs::File::from(pipe_w);
            let mut rest = &writer_data[..];
            while !rest.is_empty() {
                match file.write(rest) {
                    Ok(n) => rest = &rest[n..],
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(1)),
                }
            }
        });
        let mut poll = Poll::new().unwrap();
        let mut out = StreamOut::new(client, &header(), poll.registry()).unwrap();
        out.attach_pipe(pipe_r, poll.registry()).unwrap();
        let reader_thread = std::thread::spawn(move || {
            let mut file = std::fs::File::from(reader);
            let mut all = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                match file.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => all.extend_from_slice(&buf[..n]),
                    Err(_) => std::thread::sleep(std::time::Duration::from_micros(200)),
                }
            }
            all
        });
        let mut events = Events::with_capacity(8);
        loop {
            match out.pump().unwrap() {
                Pumped::PipeEnded => out.finish(),
                Pumped::Whole => break,
                Pumped::Working => {
                    poll.poll(&mut events, Some(std::time::Duration::from_secs(5)))
                        .unwrap();
                }
            }
        }
        assert!(!out.reader_gone());
        drop(out);
        writer.join().unwrap();
        let bytes = reader_thread.join().unwrap();
        let mut decoder = Decoder::new();
        decoder.push(&bytes);
        let mut data = Vec::new();
        let mut items = 0;
        while let Some(item) = decoder.next_item().unwrap() {
            items += 1;
            if let Item::Data(d) = item {
                data.extend(d)
            }
        }
        decoder.finish().unwrap();
        assert!(items > 3);
        assert_eq!(data, payload);
    }

    #[test]
    fn a_closed_reader_is_an_error_and_is_seen_while_idle() {
        let (client, reader) = nonblocking_pair();
        let poll = Poll::new().unwrap();
        let mut out = StreamOut::new(client, &header(), poll.registry()).unwrap();
        assert!(!out.reader_gone());
        drop(reader);
        assert!(out.reader_gone());
        let e = out.pump().unwrap_err();
        assert!(e.starts_with("the reader went away"), "{e}");
    }
}
