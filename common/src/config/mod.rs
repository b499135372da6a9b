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

pub use checks::{memory_size, memory_size_str, uid_range_free_here, MemoryError, ValueError};
pub use types::*;

use lexer::Lexer;
use parser::Parser;
use std::io;
use std::path::Path;

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

/// Reads and checks `path` with the `-D` macro definitions applied. A
/// missing file is an empty configuration unless `required`. On failure,
/// returns every diagnostic line (`FILE:LINE: message` and its companions).
pub fn load(
    path: &Path,
    defines: &[(String, String)],
    required: bool,
) -> Result<Loaded, Vec<String>> {
    let data = match std::fs::read(path) {
        Ok(data) => data,
        Err(e) if e.kind() == io::ErrorKind::NotFound && !required => {
            return Ok(Loaded {
                config: Config::default(),
                warnings: Vec::new(),
            });
        }
        Err(e) => {
            return Err(vec![format!(
                "failed to open {}: {}",
                path.display(),
                strerror(&e)
            )])
        }
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
