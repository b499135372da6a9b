//! The `vmctl send` / `vmctl receive` stream: a header that pins what the
//! receiving side must match, the backend's migration data in
//! length-prefixed chunks, and a trailing hash over everything.
//!
//! QEMU's own migration stream does not protect itself (a cut tail or
//! flipped RAM bytes still "complete" and run a corrupt guest), so this
//! framing must:
//!
//! ```text
//! header   magic "VMDSTRM\0" | format u32 | length u32 | body | SHA-256
//!          (body: the bincode of StreamHeader, at most HEADER_MAX bytes;
//!           the SHA-256 covers magic, format, length and body)
//! chunks   length u32 (1..=CHUNK_MAX) | that many bytes of migration data
//! end      0u32 | data bytes in all u64 | SHA-256 of everything before it
//! ```
//!
//! Integers are big-endian. The envelope of the header (magic, format,
//! length, body, checksum) stays the same in every format, so a newer
//! stream is told apart from a corrupt one. One hash (SHA-256, the `sha2`
//! crate, pure Rust, SHA-NI where the CPU has it) serves the header's
//! checksum and the trailing hash. No compression: QEMU sends zero pages
//! as a few bytes already (an idle 256 MiB guest is a 96 MB stream in
//! 0.3 s; zstd level 1 made it 41 MB but took 0.43 s); whoever sends it
//! over a slow link compresses the pipe (`vmctl send web | zstd | ssh ...`).

use crate::disk::DiskFormat;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

pub const MAGIC: [u8; 8] = *b"VMDSTRM\0";
/// The format this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The largest header body.
pub const HEADER_MAX: usize = 64 * 1024;
/// The largest chunk of migration data.
pub const CHUNK_MAX: usize = 1 << 20;
/// What vmctl answers on the socket once it has written the whole
/// stream (the sender resumes the guest without it).
pub const ACK: u8 = b'k';
const HASH_LEN: usize = 32;
/// magic, format, length.
const PREFIX_LEN: usize = 16;
/// end marker, data total, hash.
const TRAILER_LEN: usize = 4 + 8 + HASH_LEN;

/// What the receiving side must match: the backend and how it runs the
/// guest, and the VM's parameters as the sender ran it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamHeader {
    /// `qemu`.
    pub backend: String,
    /// QEMU's version (`7.2.19`).
    pub qemu_version: String,
    /// The versioned machine type (`pc-i440fx-7.2`), never an alias.
    pub machine: String,
    /// The CPU model QEMU was given (`host`), or its default (`qemu64`).
    pub cpu: String,
    /// `kvm` or `tcg`.
    pub accel: String,
    pub vm: StreamVm,
}

/// The VM's parameters as the sender's vmd ran it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamVm {
    /// The name it had (the receiver names it anew).
    pub name: String,
    /// Guest memory in bytes.
    pub memory: u64,
    pub vcpus: u32,
    /// Disks by path and format, in order: the stream does not hold them.
    pub disks: Vec<StreamDisk>,
    pub cdrom: Option<String>,
    pub interfaces: Vec<StreamInterface>,
    /// Kernel (or BIOS when `kernel` is None) and initrd, by path and size.
    pub kernel: Option<StreamFile>,
    pub initrd: Option<StreamFile>,
    pub bios: Option<StreamFile>,
    pub cmdline: Option<String>,
    /// `disk`, `cdrom` or `net` when set.
    pub boot_device: Option<String>,
    /// The owner's uid, and group if any.
    pub owner_uid: u32,
    pub owner_gid: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamDisk {
    pub path: String,
    pub format: DiskFormat,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamInterface {
    /// The guest's MAC (its device state names it too).
    pub lladdr: [u8; 6],
    pub switch: Option<String>,
    pub local: bool,
    pub locked: bool,
}

/// A boot file: the receiver's must be the same size (QEMU's ROM sizes
/// are in its state).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamFile {
    pub path: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StreamError {
    #[error("the stream is empty")]
    Empty,
    #[error("not a vmd stream (its first bytes are not vmd's magic)")]
    NotAStream,
    #[error("the stream is truncated ({0})")]
    Truncated(&'static str),
    #[error("the stream's header is corrupt (its length {0} is over {HEADER_MAX})")]
    HeaderLength(usize),
    #[error("the stream's header is corrupt (its checksum does not match)")]
    HeaderChecksum,
    #[error("the stream is format {0}, newer than this vmd's format {FORMAT_VERSION}")]
    NewerFormat(u32),
    #[error("the stream is format {0}, which this vmd does not read (format {FORMAT_VERSION})")]
    UnknownFormat(u32),
    #[error("the stream's header cannot be decoded: {0}")]
    HeaderDecode(String),
    #[error("the stream is corrupt (a chunk of {0} bytes, at most {CHUNK_MAX})")]
    ChunkLength(usize),
    #[error("the stream is corrupt (it says {said} bytes of state, {counted} came)")]
    DataLength { said: u64, counted: u64 },
    #[error("the stream is corrupt (its trailing hash does not match)")]
    Hash,
    #[error("the stream has bytes after its end")]
    TrailingBytes,
}

fn header_config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_big_endian()
        .with_fixed_int_encoding()
        .with_limit::<HEADER_MAX>()
}

/// Writes a stream: [`Encoder::new`] gives the header's bytes, then
/// [`Encoder::chunk`] each piece of migration data, [`Encoder::finish`]
/// the end.
pub struct Encoder {
    hasher: Sha256,
    total: u64,
}

impl Encoder {
    pub fn new(header: &StreamHeader) -> Result<(Encoder, Vec<u8>), StreamError> {
        let body = bincode::serde::encode_to_vec(header, header_config())
            .map_err(|e| StreamError::HeaderDecode(e.to_string()))?;
        if body.len() > HEADER_MAX {
            return Err(StreamError::HeaderLength(body.len()));
        }
        let mut out = Vec::with_capacity(PREFIX_LEN + body.len() + HASH_LEN);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        let checksum = Sha256::digest(&out);
        out.extend_from_slice(&checksum);
        let mut hasher = Sha256::new();
        hasher.update(&out);
        Ok((Encoder { hasher, total: 0 }, out))
    }

    /// Appends `data` to `out` as chunks of at most [`CHUNK_MAX`].
    pub fn chunk(&mut self, data: &[u8], out: &mut Vec<u8>) {
        for piece in data.chunks(CHUNK_MAX) {
            let start = out.len();
            out.extend_from_slice(&(piece.len() as u32).to_be_bytes());
            out.extend_from_slice(piece);
            self.hasher.update(&out[start..]);
            self.total += piece.len() as u64;
        }
    }

    /// The end marker, the data's length and the trailing hash.
    pub fn finish(mut self) -> Vec<u8> {
        let mut out = Vec::with_capacity(TRAILER_LEN);
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(&self.total.to_be_bytes());
        self.hasher.update(&out);
        out.extend_from_slice(&self.hasher.finalize());
        out
    }
}

/// What a [`Decoder`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Item {
    /// The header, its checksum good: comes first, before any data.
    Header(Box<StreamHeader>),
    /// Migration data, to be fed to the backend (the guest must not run
    /// before [`Item::End`]).
    Data(Vec<u8>),
    /// The end, its hash good: the stream is whole.
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Header,
    Chunks,
    Done,
}

/// Reads a stream pushed to it in pieces of any size.
pub struct Decoder {
    buf: Vec<u8>,
    state: State,
    hasher: Sha256,
    total: u64,
    /// Bytes pushed in all.
    seen: u64,
}

impl Default for Decoder {
    fn default() -> Decoder {
        Decoder::new()
    }
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder {
            buf: Vec::new(),
            state: State::Header,
            hasher: Sha256::new(),
            total: 0,
            seen: 0,
        }
    }

    /// The bytes taken so far (after [`Item::Header`]: the header's).
    pub fn consumed(&self) -> u64 {
        self.seen - self.buf.len() as u64
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.seen += bytes.len() as u64;
        self.buf.extend_from_slice(bytes);
    }

    /// The next item, or None until more bytes come.
    pub fn next_item(&mut self) -> Result<Option<Item>, StreamError> {
        match self.state {
            State::Header => self.header(),
            State::Chunks => self.chunk(),
            State::Done if self.buf.is_empty() => Ok(None),
            State::Done => Err(StreamError::TrailingBytes),
        }
    }

    /// The input ended: Ok only if the stream was whole.
    pub fn finish(&self) -> Result<(), StreamError> {
        match self.state {
            State::Header if self.seen == 0 => Err(StreamError::Empty),
            State::Header => Err(StreamError::Truncated("in its header")),
            State::Chunks => Err(StreamError::Truncated("before its end")),
            State::Done if self.buf.is_empty() => Ok(()),
            State::Done => Err(StreamError::TrailingBytes),
        }
    }

    /// Consumes `n` bytes into the hash.
    fn take(&mut self, n: usize) -> Vec<u8> {
        let rest = self.buf.split_off(n);
        let taken = std::mem::replace(&mut self.buf, rest);
        self.hasher.update(&taken);
        taken
    }

    fn header(&mut self) -> Result<Option<Item>, StreamError> {
        let have = self.buf.len().min(MAGIC.len());
        if self.buf[..have] != MAGIC[..have] {
            return Err(StreamError::NotAStream);
        }
        if self.buf.len() < PREFIX_LEN {
            return Ok(None);
        }
        let version = be_u32(&self.buf[8..12]);
        let length = be_u32(&self.buf[12..16]) as usize;
        if length > HEADER_MAX {
            return Err(StreamError::HeaderLength(length));
        }
        let whole = PREFIX_LEN + length + HASH_LEN;
        if self.buf.len() < whole {
            return Ok(None);
        }
        let checked = &self.buf[..PREFIX_LEN + length];
        if Sha256::digest(checked)[..] != self.buf[PREFIX_LEN + length..whole] {
            return Err(StreamError::HeaderChecksum);
        }
        if version > FORMAT_VERSION {
            return Err(StreamError::NewerFormat(version));
        }
        if version != FORMAT_VERSION {
            return Err(StreamError::UnknownFormat(version));
        }
        let bytes = self.take(whole);
        let body = &bytes[PREFIX_LEN..PREFIX_LEN + length];
        let (header, used): (StreamHeader, usize) =
            bincode::serde::decode_from_slice(body, header_config())
                .map_err(|e| StreamError::HeaderDecode(e.to_string()))?;
        if used != body.len() {
            return Err(StreamError::HeaderDecode("bytes after its fields".into()));
        }
        self.state = State::Chunks;
        Ok(Some(Item::Header(Box::new(header))))
    }

    fn chunk(&mut self) -> Result<Option<Item>, StreamError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let length = be_u32(&self.buf[..4]) as usize;
        if length > CHUNK_MAX {
            return Err(StreamError::ChunkLength(length));
        }
        if length > 0 {
            if self.buf.len() < 4 + length {
                return Ok(None);
            }
            let mut bytes = self.take(4 + length);
            bytes.drain(..4);
            self.total += length as u64;
            return Ok(Some(Item::Data(bytes)));
        }
        if self.buf.len() < TRAILER_LEN {
            return Ok(None);
        }
        let end = self.take(12);
        let said = u64::from_be_bytes(end[4..12].try_into().unwrap_or_default());
        let hash = std::mem::take(&mut self.hasher).finalize();
        let given = self.buf.split_off(HASH_LEN);
        let trailer = std::mem::replace(&mut self.buf, given);
        if hash[..] != trailer[..] {
            return Err(StreamError::Hash);
        }
        if said != self.total {
            return Err(StreamError::DataLength {
                said,
                counted: self.total,
            });
        }
        self.state = State::Done;
        Ok(Some(Item::End))
    }
}

/// The header of a stream whose first bytes are `bytes`, exactly its
/// header (what vmctl read and vmd checks again).
pub fn decode_header(bytes: &[u8]) -> Result<StreamHeader, StreamError> {
    let mut decoder = Decoder::new();
    decoder.push(bytes);
    match decoder.next_item()? {
        Some(Item::Header(header)) if decoder.buf.is_empty() => Ok(*header),
        Some(_) => Err(StreamError::HeaderDecode("bytes after it".into())),
        None => decoder.finish().map(|()| unreachable_header()),
    }
}

/// [`Decoder::finish`] before a header is always an error.
fn unreachable_header() -> StreamHeader {
    StreamHeader {
        backend: String::new(),
        qemu_version: String::new(),
        machine: String::new(),
        cpu: String::new(),
        accel: String::new(),
        vm: StreamVm::default(),
    }
}

fn be_u32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> StreamHeader {
        StreamHeader {
            backend: "qemu".into(),
            qemu_version: "7.2.19".into(),
            machine: "pc-i440fx-7.2".into(),
            cpu: "qemu64".into(),
            accel: "tcg".into(),
            vm: StreamVm {
                name: "web".into(),
                memory: 256 << 20,
                vcpus: 1,
                disks: vec![StreamDisk {
                    path: "/var/lib/vmd/web.qcow2".into(),
                    format: DiskFormat::Qcow2,
                }],
                interfaces: vec![StreamInterface {
                    lladdr: [0xfe, 0xe1, 0xba, 0xd0, 0, 1],
                    switch: Some("uplink".into()),
                    local: false,
                    locked: true,
                }],
                kernel: Some(StreamFile {
                    path: "/boot/vmlinuz".into(),
                    size: 1234,
                }),
                owner_uid: 1000,
                ..StreamVm::default()
            },
        }
    }

    /// A stream of `data` in pieces of `piece` bytes.
    fn stream(data: &[u8], piece: usize) -> Vec<u8> {
        let (mut encoder, mut out) = Encoder::new(&header()).unwrap();
        for part in data.chunks(piece) {
            encoder.chunk(part, &mut out);
        }
        out.extend(encoder.finish());
        out
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// Decodes `bytes` pushed `step` at a time: the header, the data, or
    /// the first error.
    fn decode(bytes: &[u8], step: usize) -> Result<(StreamHeader, Vec<u8>), StreamError> {
        let mut decoder = Decoder::new();
        let (mut header, mut data, mut ended) = (None, Vec::new(), false);
        for part in bytes.chunks(step.max(1)) {
            decoder.push(part);
            while let Some(item) = decoder.next_item()? {
                match item {
                    Item::Header(h) => header = Some(*h),
                    Item::Data(d) => {
                        assert!(header.is_some() && !ended);
                        data.extend(d)
                    }
                    Item::End => ended = true,
                }
            }
        }
        decoder.finish()?;
        assert!(ended);
        Ok((header.unwrap(), data))
    }

    #[test]
    fn round_trip_in_any_pieces() {
        let payload = data(CHUNK_MAX * 2 + 12345);
        let bytes = stream(&payload, 70_000);
        for step in [1usize, 3, 4096, 1 << 20, bytes.len()] {
            if step == 1 && bytes.len() > 100_000 {
                // byte by byte only on a small one (quadratic buffer)
                let small = stream(&payload[..5000], 700);
                let (h, d) = decode(&small, 1).unwrap();
                assert_eq!((h, d), (header(), payload[..5000].to_vec()));
                continue;
            }
            let (h, d) = decode(&bytes, step).unwrap();
            assert_eq!(h, header());
            assert_eq!(d, payload);
        }
        // no data at all is a whole stream too
        assert_eq!(decode(&stream(&[], 1), 10).unwrap().1, Vec::<u8>::new());
    }

    #[test]
    fn empty_and_foreign_input() {
        assert_eq!(decode(&[], 1), Err(StreamError::Empty));
        let random: Vec<u8> = data(10_000).iter().map(|b| b ^ 0x5a).collect();
        assert_eq!(decode(&random, 4096), Err(StreamError::NotAStream));
        assert_eq!(
            decode(b"VMD", 4096),
            Err(StreamError::Truncated("in its header"))
        );
    }

    #[test]
    fn every_cut_is_truncated() {
        let bytes = stream(&data(10_000), 3000);
        let header_len = Encoder::new(&header()).unwrap().1.len();
        for cut in [
            1,
            10,
            header_len - 1,
            header_len,
            header_len + 5,
            bytes.len() - 200,
            bytes.len() - 1,
        ] {
            let e = decode(&bytes[..cut], 512).unwrap_err();
            assert!(matches!(e, StreamError::Truncated(_)), "cut at {cut}: {e}");
        }
    }

    #[test]
    fn a_flipped_byte_anywhere_is_caught() {
        let bytes = stream(&data(3000), 1000);
        let header_len = Encoder::new(&header()).unwrap().1.len();
        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x01;
            let e = decode(&bad, 4096).expect_err("a flipped byte must not decode");
            let expected = match at {
                0..=7 => matches!(e, StreamError::NotAStream),
                _ if at < header_len => matches!(
                    e,
                    StreamError::HeaderChecksum
                        | StreamError::HeaderLength(_)
                        | StreamError::Truncated(_)
                ),
                // a length prefix: too long, or the stream reads wrong
                _ => matches!(
                    e,
                    StreamError::Hash
                        | StreamError::ChunkLength(_)
                        | StreamError::Truncated(_)
                        | StreamError::DataLength { .. }
                        | StreamError::TrailingBytes
                ),
            };
            assert!(expected, "byte {at} flipped: {e}");
        }
    }

    #[test]
    fn data_and_last_bytes_corruption_is_a_hash_mismatch() {
        let bytes = stream(&data(20_000), 5000);
        for at in [bytes.len() / 2, bytes.len() - 200, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x40;
            assert_eq!(decode(&bad, 4096), Err(StreamError::Hash), "at {at}");
        }
    }

    #[test]
    fn newer_and_unknown_formats_and_oversized_parts() {
        let mut newer = stream(&data(100), 100);
        let header_len = Encoder::new(&header()).unwrap().1.len();
        newer[8..12].copy_from_slice(&2u32.to_be_bytes());
        let sum = Sha256::digest(&newer[..header_len - HASH_LEN]);
        newer[header_len - HASH_LEN..header_len].copy_from_slice(&sum);
        assert_eq!(decode(&newer, 4096), Err(StreamError::NewerFormat(2)));
        newer[8..12].copy_from_slice(&0u32.to_be_bytes());
        let sum = Sha256::digest(&newer[..header_len - HASH_LEN]);
        newer[header_len - HASH_LEN..header_len].copy_from_slice(&sum);
        assert_eq!(decode(&newer, 4096), Err(StreamError::UnknownFormat(0)));

        let mut long = MAGIC.to_vec();
        long.extend(FORMAT_VERSION.to_be_bytes());
        long.extend(((HEADER_MAX + 1) as u32).to_be_bytes());
        assert_eq!(
            decode(&long, 4096),
            Err(StreamError::HeaderLength(HEADER_MAX + 1))
        );

        let (_, mut big) = Encoder::new(&header()).unwrap();
        big.extend(((CHUNK_MAX + 1) as u32).to_be_bytes());
        assert_eq!(
            decode(&big, 4096),
            Err(StreamError::ChunkLength(CHUNK_MAX + 1))
        );
    }

    #[test]
    fn bytes_after_the_end_are_refused() {
        let mut bytes = stream(&data(100), 100);
        bytes.push(0);
        assert_eq!(decode(&bytes, 4096), Err(StreamError::TrailingBytes));
    }

    #[test]
    fn errors_say_which() {
        assert_eq!(
            StreamError::NewerFormat(2).to_string(),
            "the stream is format 2, newer than this vmd's format 1"
        );
        assert_eq!(
            StreamError::Hash.to_string(),
            "the stream is corrupt (its trailing hash does not match)"
        );
    }
}
