//! qcow2 images, versions 2 and 3, as QEMU documents them in
//! docs/interop/qcow2.txt.
//!
//! The reader trusts nothing in the file: every offset, size and count is
//! checked against the file's length and fixed limits before it is used, so
//! a corrupt or hostile image gives an [`Error`], never a panic or a huge
//! allocation. Writing allocates clusters at the end of the file and keeps
//! the refcounts exact, so `qemu-img check` finds nothing to repair.
//!
//! Two users: the daemon's parent reads a header from a file it has already
//! opened ([`read_header`]) to learn the backing file's name and format and
//! open that itself; [`crate::image`] reads and writes guest data through a
//! whole chain.

mod header;
mod refcount;
mod table;

pub use header::{has_magic, read_header, Backing, Header};
pub use table::{CreateOptions, Mapping, Qcow2};

use std::io;
use thiserror::Error;

/// The first four bytes of every qcow2 file.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";

/// Smallest and largest cluster sizes QEMU accepts (512 bytes to 2 MiB).
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;

/// The cluster size of images we create unless told otherwise (64 KiB).
pub const DEFAULT_CLUSTER_BITS: u32 = 16;

/// Limits on tables read into memory (QEMU's own limits): 32 MiB of L1
/// table and 8 MiB of refcount table.
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;

#[derive(Debug, Error)]
pub enum Error {
    #[error("{}", io_message(.0))]
    Io(#[from] io::Error),
    #[error("not a qcow2 image (bad magic)")]
    BadMagic,
    #[error("truncated qcow2 image: {0}")]
    Truncated(String),
    #[error("unsupported qcow2 version {0}")]
    Version(u32),
    #[error("unsupported qcow2 feature: {0}")]
    Unsupported(String),
    #[error("corrupt qcow2 image: {0}")]
    Corrupt(String),
    #[error("qcow2 image is marked dirty; repair it with qemu-img check -r all")]
    Dirty,
    #[error("qcow2 image is marked corrupt; repair it with qemu-img check -r all")]
    MarkedCorrupt,
    #[error("unsupported backing file format {0:?}")]
    BackingFormat(String),
    #[error("image opened read-only")]
    ReadOnly,
    #[error("{0}")]
    Create(String),
}

pub type Result<T> = std::result::Result<T, Error>;

fn corrupt<T>(what: impl Into<String>) -> Result<T> {
    Err(Error::Corrupt(what.into()))
}

/// An I/O error as strerror(3) words it, without Rust's "(os error N)".
pub fn io_message(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => nix::errno::Errno::from_raw(code).desc().to_string(),
        None => e.to_string(),
    }
}
