//! The reading side of `vmctl receive`, the same for every backend:
//! vmctl's socket carries the stream after its header (which came with
//! the start, [`common::imsg::VmParams::incoming`]); each chunk's data
//! goes into a pipe the backend reads its migration from, and the end's
//! hash is checked before the guest may run.
//!
//! It never blocks the VM process's loop and holds at most one chunk: the
//! socket is not read while the pipe has not taken the last one, so a
//! slow backend slows vmctl instead of filling memory.

use super::backend::FIRST_BACKEND_TOKEN;
use super::console::read_some;
use super::send::write_some;
use common::stream::{Decoder, Item, StreamError, StreamHeader};
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use std::os::fd::{AsRawFd, OwnedFd};

/// vmctl's socket and the pipe to the backend.
pub const RECV_STREAM: Token = Token(FIRST_BACKEND_TOKEN + 10);
pub const RECV_PIPE: Token = Token(FIRST_BACKEND_TOKEN + 11);

const READ_MAX: usize = 256 * 1024;

/// Where a stream stands after [`StreamIn::pump`].
#[derive(Debug, PartialEq, Eq)]
pub enum Fed {
    /// More to come: wait for events.
    Working,
    /// The end came and its hash checks out; the pipe is closed (the
    /// backend sees the end of its migration data).
    Whole,
}

pub struct StreamIn {
    stream: Option<OwnedFd>,
    pipe: Option<OwnedFd>,
    decoder: Decoder,
    pending: Vec<u8>,
    written: usize,
    buf: Vec<u8>,
    whole: bool,
    /// Migration data given to the backend.
    pub bytes: u64,
}

impl StreamIn {
    /// The stream that starts with `header` (its bytes, as the parent
    /// checked them) and goes on in `stream`: its header, or why not.
    pub fn new(header: &[u8], stream: OwnedFd) -> Result<(StreamIn, StreamHeader), StreamError> {
        let mut decoder = Decoder::new();
        decoder.push(header);
        let header = match decoder.next_item()? {
            Some(Item::Header(header)) => *header,
            _ => return Err(StreamError::Truncated("in its header")),
        };
        let stream_in = StreamIn {
            stream: Some(stream),
            pipe: None,
            decoder,
            pending: Vec::new(),
            written: 0,
            buf: vec![0; READ_MAX],
            whole: false,
            bytes: 0,
        };
        Ok((stream_in, header))
    }

    /// The backend reads its migration from `pipe`'s other end: data
    /// flows from here on.
    pub fn attach_pipe(&mut self, pipe: OwnedFd, registry: &Registry) -> Result<(), String> {
        let (Some(stream), true) = (self.stream.as_ref(), self.pipe.is_none()) else {
            return Err("the stream is not open".into());
        };
        registry
            .register(
                &mut SourceFd(&stream.as_raw_fd()),
                RECV_STREAM,
                Interest::READABLE,
            )
            .and_then(|()| {
                registry.register(
                    &mut SourceFd(&pipe.as_raw_fd()),
                    RECV_PIPE,
                    Interest::WRITABLE,
                )
            })
            .map_err(|e| format!("cannot watch the stream: {e}"))?;
        self.pipe = Some(pipe);
        Ok(())
    }

    /// Moves what it can; an error says what is wrong with the stream.
    pub fn pump(&mut self) -> Result<Fed, String> {
        if self.whole {
            return Ok(Fed::Whole);
        }
        let Some(pipe) = self.pipe.as_ref() else {
            return Ok(Fed::Working);
        };
        loop {
            if self.written < self.pending.len() {
                match write_some(pipe, &self.pending[self.written..]) {
                    Ok(Some(n)) => {
                        self.written += n;
                        continue;
                    }
                    Ok(None) => return Ok(Fed::Working),
                    Err(e) => {
                        return Err(format!(
                            "QEMU stopped reading the stream ({}); see vmd's log",
                            e.desc()
                        ))
                    }
                }
            }
            self.pending.clear();
            self.written = 0;
            match self.decoder.next_item().map_err(|e| e.to_string())? {
                Some(Item::Data(data)) => {
                    self.bytes += data.len() as u64;
                    self.pending = data;
                    continue;
                }
                Some(Item::End) => {
                    // The backend sees the end of its data; the rest of
                    // the socket is not read.
                    self.pipe = None;
                    self.stream = None;
                    self.whole = true;
                    return Ok(Fed::Whole);
                }
                Some(Item::Header(_)) => return Err("the stream has a second header".into()),
                None => {}
            }
            let Some(stream) = self.stream.as_ref() else {
                return Ok(Fed::Working);
            };
            match read_some(stream.as_raw_fd(), &mut self.buf) {
                Ok(None) => return Ok(Fed::Working),
                Ok(Some(0)) => {
                    self.stream = None;
                    self.decoder.finish().map_err(|e| e.to_string())?;
                    return Err("the stream ended early".into());
                }
                Ok(Some(n)) => self.decoder.push(&self.buf[..n]),
                Err(e) => return Err(format!("reading the stream: {}", e.desc())),
            }
        }
    }
}
