//! Interface groups: vm.conf's `group NAME` (OpenBSD's interface groups)
//! are iproute2's link groups here, a number per link (IFLA_GROUP) that
//! `/etc/iproute2/group` names, as `ip link set DEV group NAME` reads it.
//! A name that file does not list is an error at config check.
//!
//! The file's syntax, as iproute2 reads it: `NUMBER NAME` per line, the
//! number decimal or `0x` hex (0 to 2^32-1), white space between,
//! optionally a `#` comment after; blank lines and lines starting with
//! `#` are skipped. A later line naming the same group wins (iproute2's
//! lookup finds the last one). Where iproute2 stops reading at a bad
//! line, we skip it and say where it is when a name is not found.

use std::path::Path;

/// Where the names are: the first of these that exists (iproute2 >= 6.5
/// falls back to its defaults in /usr/share; Debian 12's reads /etc only).
pub const LINKGROUP_FILES: [&str; 2] = ["/etc/iproute2/group", "/usr/share/iproute2/group"];

/// A group file, read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkGroups {
    /// The file they came from, for messages.
    pub file: String,
    /// (name, number), in the file's order.
    pub groups: Vec<(String, u32)>,
    /// The lines that could not be read: (line number, text).
    pub bad: Vec<(usize, String)>,
}

/// A number as iproute2 writes them: decimal, or hex after `0x`.
fn linkgroup_number(text: &str) -> Option<u32> {
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            u32::from_str_radix(hex, 16).ok()
        }
        Some(_) => None,
        None if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) => text.parse().ok(),
        None => None,
    }
}

/// Parses the text of group file `file` (the name only labels messages).
pub fn linkgroup_parse(file: &str, text: &str) -> LinkGroups {
    let mut read = LinkGroups {
        file: file.to_string(),
        ..LinkGroups::default()
    };
    for (index, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let mut words = trimmed.split_whitespace();
        let number = words.next().and_then(linkgroup_number);
        let name = words.next().filter(|n| !n.starts_with('#'));
        let rest_ok = words.next().is_none_or(|w| w.starts_with('#'));
        match (number, name, rest_ok) {
            (Some(number), Some(name), true) => read.groups.push((name.to_string(), number)),
            _ => read.bad.push((index + 1, line.to_string())),
        }
    }
    read
}

impl LinkGroups {
    /// The number of group `name` (the last line that names it).
    pub fn number(&self, name: &str) -> Option<u32> {
        self.groups
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|&(_, number)| number)
    }

    /// Group `name`'s number, or the error for vm.conf's line that uses
    /// it: what is missing from which file, and the file's bad lines.
    pub fn lookup(&self, name: &str) -> Result<u32, String> {
        if let Some(number) = self.number(name) {
            return Ok(number);
        }
        let mut why = format!(
            "unknown interface group {name}: {} does not name it (add a line \"NUMBER {name}\")",
            self.file
        );
        for (line, _) in self.bad.iter().take(3) {
            why.push_str(&format!("; {}:{line}: not \"NUMBER NAME\"", self.file));
        }
        Err(why)
    }
}

/// Reads this machine's group names (the first of [`LINKGROUP_FILES`]
/// that exists). Err: why none could be read.
pub fn linkgroup_read(files: &[&str]) -> Result<LinkGroups, String> {
    for file in files {
        match std::fs::read(Path::new(file)) {
            Ok(bytes) => return Ok(linkgroup_parse(file, &String::from_utf8_lossy(&bytes))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("cannot read {file}: {e}")),
        }
    }
    Err(format!(
        "no interface group names: none of {} exists (Debian's iproute2 package has it)",
        files.join(", ")
    ))
}

/// What the config check calls for a `group NAME`: its number on this
/// machine, or the one-line error to report at NAME's file:line.
pub fn linkgroup_check(name: &str) -> Result<u32, String> {
    linkgroup_read(&LINKGROUP_FILES)?.lookup(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "# device group names\n\
        0\tdefault\n\
        \n\
           # indented comment\n\
        10 vms   # the guests\n\
        0x1f\tlab\n\
        0XfFfFfFfF top\n\
        7 vms\n\
        web 12\n\
        12\n\
        4294967296 big\n\
        -1 minus\n\
        0x dmz\n\
        5 two names\n\
        6 ok #comment right after\n";

    #[test]
    fn names_numbers_comments_and_bad_lines() {
        let read = linkgroup_parse("/etc/iproute2/group", FILE);
        assert_eq!(
            read.groups,
            vec![
                ("default".to_string(), 0),
                ("vms".to_string(), 10),
                ("lab".to_string(), 0x1f),
                ("top".to_string(), u32::MAX),
                ("vms".to_string(), 7),
                ("ok".to_string(), 6),
            ]
        );
        let bad: Vec<usize> = read.bad.iter().map(|(line, _)| *line).collect();
        assert_eq!(bad, vec![9, 10, 11, 12, 13, 14]);
        assert_eq!(read.bad[0].1, "web 12");
        // The later line wins, as in iproute2.
        assert_eq!(read.number("vms"), Some(7));
        assert_eq!(read.number("default"), Some(0));
        assert_eq!(read.lookup("lab"), Ok(31));
        assert_eq!(read.number("web"), None);
        assert_eq!(read.number("#comment"), None);
    }

    #[test]
    fn an_unknown_name_says_where_to_add_it() {
        let read = linkgroup_parse("/etc/iproute2/group", FILE);
        let why = read.lookup("web").expect_err("web is not named");
        assert!(
            why.starts_with(
                "unknown interface group web: /etc/iproute2/group does not name it \
                 (add a line \"NUMBER web\")"
            ),
            "{why}"
        );
        assert!(
            why.contains("; /etc/iproute2/group:9: not \"NUMBER NAME\""),
            "{why}"
        );
        // At most three bad lines are listed.
        assert_eq!(why.matches("; /etc/iproute2/group:").count(), 3, "{why}");
        let clean = linkgroup_parse("g", "0 default\n");
        assert_eq!(
            clean.lookup("x"),
            Err("unknown interface group x: g does not name it (add a line \"NUMBER x\")".into())
        );
        assert_eq!(linkgroup_parse("g", "").groups, vec![]);
    }

    #[test]
    fn the_first_file_that_exists_is_read() {
        let dir = std::env::temp_dir().join(format!("linkgroup-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let second = dir.join("group");
        std::fs::write(&second, "3 lab\n").expect("write");
        let missing = dir.join("missing");
        let files = [
            missing.to_str().expect("utf-8"),
            second.to_str().expect("utf-8"),
        ];
        let read = linkgroup_read(&files);
        let none = linkgroup_read(&files[..1]);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(read.expect("read").lookup("lab"), Ok(3));
        let why = none.expect_err("a missing file read");
        assert!(why.contains("none of") && why.contains("iproute2"), "{why}");
        // This machine's own file (iproute2's) names group 0 `default`.
        assert_eq!(linkgroup_check("default"), Ok(0));
    }
}
