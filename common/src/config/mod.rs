//! vm.conf(5): the parser and the configuration it produces.
//!
//! `load` reads a file (with its includes) and returns the configuration
//! and the warnings to print, or every diagnostic line in order. Lines
//! tied to a place read `FILE:LINE: message`; some errors are preceded by
//! a line that explains them, as in OpenBSD's vmd (`memory size must be at
//! least 1MB` before `FILE:4: failed to parse size: 1048575`).
//!
//! The check is of the file alone: kernels, disks and bridges need not
//! exist (vmd checks them when it starts a VM or a switch). Users and
//! groups are resolved here, so a typo fails `vmd -n`.

mod checks;
mod display;
mod lexer;
mod parser;
mod types;

pub use checks::{
    format_lladdr, lladdr as parse_lladdr, memory_size, memory_size_str, uid_range_free_here,
    MemoryError, ValueError,
};
pub use types::*;

use lexer::Lexer;
use parser::Parser;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use thiserror::Error;

/// The most a configuration file and everything it includes may hold, in
/// bytes. A vm.conf is a few kilobytes; the cap bounds what a wrong path
/// (`/dev/zero` is refused anyway, a huge log file is not) costs the
/// parent, which reads it in its event loop.
pub const MAX_CONFIG_FILE: u64 = 4 << 20;
/// The most files one configuration reads (itself and its includes), so
/// that files including each other twice over cannot keep the parent
/// reading for hours.
pub const MAX_CONFIG_FILES: usize = 1000;

/// A parsed configuration and the warnings to print (each a full line).
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<String>,
}

fn strerror(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => nix::errno::Errno::from_raw(code).desc().to_string(),
        None => e.to_string(),
    }
}

/// Why a configuration file could not be read.
#[derive(Debug, Error)]
pub enum ConfigFileError {
    #[error("{}", strerror(.0))]
    Io(#[from] io::Error),
    /// [`check_request_path`]'s refusal.
    #[error("{0}")]
    Path(String),
    #[error("a {0}, not a regular file")]
    NotRegular(&'static str),
    #[error("larger than {} MiB, the most a configuration file may have", MAX_CONFIG_FILE >> 20)]
    TooLarge,
}

impl ConfigFileError {
    /// `failed to open PATH: why` or `failed to read PATH: why`.
    pub fn line(&self, path: &Path) -> String {
        let verb = match self {
            ConfigFileError::Io(_) | ConfigFileError::Path(_) => "open",
            _ => "read",
        };
        format!("failed to {verb} {}: {self}", path.display())
    }
}

/// Reads a configuration file without ever waiting on it: opened
/// non-blocking and without taking a controlling terminal, it must be a
/// regular file (judged on the open descriptor, so a FIFO or a device
/// named by a path is refused before a read) of at most
/// [`MAX_CONFIG_FILE`] bytes, or /dev/null (the empty configuration).
pub fn read_config_file(path: &Path) -> Result<Vec<u8>, ConfigFileError> {
    check_request_path(path).map_err(ConfigFileError::Path)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    let kind = meta.file_type();
    if kind.is_char_device() && meta.rdev() == libc::makedev(1, 3) {
        return Ok(Vec::new());
    }
    if !kind.is_file() {
        return Err(ConfigFileError::NotRegular(if kind.is_dir() {
            "directory"
        } else if kind.is_fifo() {
            "FIFO"
        } else if kind.is_socket() {
            "socket"
        } else if kind.is_char_device() {
            "character device"
        } else if kind.is_block_device() {
            "block device"
        } else {
            "special file"
        }));
    }
    // The size fstat gives may be wrong (/proc) or change: read one byte
    // past the cap to tell.
    let mut data = Vec::new();
    file.take(MAX_CONFIG_FILE + 1).read_to_end(&mut data)?;
    if data.len() as u64 > MAX_CONFIG_FILE {
        return Err(ConfigFileError::TooLarge);
    }
    Ok(data)
}

/// Reads and checks `path` with the `-D` macro definitions applied. A
/// missing file is an empty configuration unless `required`. On failure,
/// returns every diagnostic line (`FILE:LINE: message` and its companions).
pub fn load(
    path: &Path,
    defines: &[(String, String)],
    required: bool,
) -> Result<Loaded, Vec<String>> {
    let data = match read_config_file(path) {
        Ok(data) => data,
        Err(ConfigFileError::Io(e)) if e.kind() == io::ErrorKind::NotFound && !required => {
            return Ok(Loaded {
                config: Config::default(),
                warnings: Vec::new(),
            });
        }
        Err(e) => return Err(vec![e.line(path)]),
    };
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    parse_source(
        path.display().to_string(),
        canonical.as_path(),
        data,
        defines,
    )
}

/// Parses `text` as a configuration file named `name` (includes are then
/// relative to the directory part of `name`).
pub fn parse_str(
    name: &str,
    text: &str,
    defines: &[(String, String)],
) -> Result<Loaded, Vec<String>> {
    parse_source(
        name.to_string(),
        Path::new(name),
        text.as_bytes().to_vec(),
        defines,
    )
}

fn parse_source(
    name: String,
    canonical: &Path,
    data: Vec<u8>,
    defines: &[(String, String)],
) -> Result<Loaded, Vec<String>> {
    let mut lex = Lexer::new(defines);
    lex.push(name, canonical.to_path_buf(), data);
    let mut parser = Parser::new(lex);
    parser.parse();
    let mut lines = std::mem::take(&mut parser.lex.diags);
    lines.extend(parser.lex.unused_macro_warnings());
    if parser.lex.errors > 0 {
        Err(lines)
    } else {
        Ok(Loaded {
            config: parser.config,
            warnings: lines,
        })
    }
}

#[cfg(test)]
mod tests;
