//! vm.conf(5): the parser and the configuration it produces.
//!
//! Placeholder API contract; the parser fills it in.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Config {}

/// A parsed configuration and the warnings to print (each a full line).
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<String>,
}

/// Reads and checks `path` with the `-D` macro definitions applied. A
/// missing file is an empty configuration unless `required`. On failure,
/// returns every diagnostic line (`FILE:LINE: message` and its companions).
pub fn load(path: &Path, defines: &[(String, String)], required: bool) -> Result<Loaded, Vec<String>> {
    let _ = (path, defines, required);
    Ok(Loaded { config: Config::default(), warnings: Vec::new() })
}

impl fmt::Display for Config {
    fn fmt(&self, _f: &mut fmt::Formatter) -> fmt::Result {
        Ok(())
    }
}
