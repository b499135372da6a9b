//! Disk image formats. A format comes from what the user wrote (vm.conf
//! `format`, a `raw:`/`qcow2:` prefix, or the `.qcow2` extension), never
//! from the file's content, which a guest controls.

use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    /// `raw` or `qcow2`, as vm.conf's `format` names them.
    pub fn from_keyword(word: &str) -> Option<DiskFormat> {
        match word {
            "raw" => Some(DiskFormat::Raw),
            "qcow2" => Some(DiskFormat::Qcow2),
            _ => None,
        }
    }

    /// The format a file name implies: `.qcow2` is qcow2, anything else raw.
    pub fn from_file_name(path: &str) -> DiskFormat {
        if path.ends_with(".qcow2") {
            DiskFormat::Qcow2
        } else {
            DiskFormat::Raw
        }
    }

    /// Splits an optional `raw:` or `qcow2:` prefix off a path given to
    /// vmctl; without one, the format comes from the file name.
    pub fn split_prefixed(arg: &str) -> (DiskFormat, &str) {
        if let Some(path) = arg.strip_prefix("raw:") {
            (DiskFormat::Raw, path)
        } else if let Some(path) = arg.strip_prefix("qcow2:") {
            (DiskFormat::Qcow2, path)
        } else {
            (DiskFormat::from_file_name(arg), arg)
        }
    }
}

impl fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_from_names_and_prefixes() {
        assert_eq!(DiskFormat::from_file_name("a.qcow2"), DiskFormat::Qcow2);
        assert_eq!(DiskFormat::from_file_name("a.img"), DiskFormat::Raw);
        assert_eq!(
            DiskFormat::split_prefixed("qcow2:a.img"),
            (DiskFormat::Qcow2, "a.img")
        );
        assert_eq!(
            DiskFormat::split_prefixed("raw:a.qcow2"),
            (DiskFormat::Raw, "a.qcow2")
        );
        assert_eq!(
            DiskFormat::split_prefixed("b.qcow2"),
            (DiskFormat::Qcow2, "b.qcow2")
        );
        assert_eq!(DiskFormat::from_keyword("rotten"), None);
    }
}
