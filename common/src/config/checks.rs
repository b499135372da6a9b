//! Checks of single vm.conf values. Each error's text is the message
//! vm.conf reports (OpenBSD's where OpenBSD has one).

use super::types::{Ipv4Prefix, Ipv6Prefix, Owner, UidRange, IF_NAMESIZE, MAX_MEMORY};
use crate::size;
use nix::unistd::{Group, User};
use std::net::{Ipv4Addr, Ipv6Addr};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ValueError {
    #[error("{0}")]
    Prefix(&'static str),
    #[error("failed to get user: {0}")]
    UnknownUser(String),
    #[error("failed to get group: {0}")]
    UnknownGroup(String),
    #[error("invalid uid range: {0}")]
    UidRangeSyntax(String),
    #[error("uid range {range} overlaps uid {uid} of user {user} in /etc/passwd")]
    UidRangePasswd {
        range: String,
        uid: u32,
        user: String,
    },
    #[error("uid range {range} overlaps the range {first}-{last} of {owner} in /etc/subuid")]
    UidRangeSubuid {
        range: String,
        owner: String,
        first: u32,
        last: u32,
    },
}

/// Why a memory size is refused; the text is the line vmd prints before
/// `failed to parse size: X`.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MemoryError {
    #[error("invalid memory size: {0}: {1}")]
    Invalid(String, &'static str),
    #[error("memory size must be at least 1MB")]
    TooSmall,
    #[error("memory size too large (limit is {})", size::format(MAX_MEMORY))]
    TooLarge,
}

/// A memory size in bytes rounded down to whole megabytes; the second
/// value is the `memory size rounded to ...` note when rounding changed it.
/// vmctl's `-m` follows the same rule.
pub fn memory_size(bytes: i64) -> Result<(u64, Option<String>), MemoryError> {
    if bytes < 1 << 20 {
        return Err(MemoryError::TooSmall);
    }
    let bytes = bytes as u64;
    if bytes > MAX_MEMORY {
        return Err(MemoryError::TooLarge);
    }
    let rounded = bytes & !((1 << 20) - 1);
    let note =
        (rounded != bytes).then(|| format!("memory size rounded to {}", size::format(rounded)));
    Ok((rounded, note))
}

/// `memory 1G` and the like: a scaled size, then [`memory_size`].
pub fn memory_size_str(text: &str) -> Result<(u64, Option<String>), MemoryError> {
    match size::parse(text) {
        Ok(bytes) => memory_size(i64::try_from(bytes).unwrap_or(i64::MAX)),
        Err(size::SizeError::Invalid) => {
            Err(MemoryError::Invalid(text.to_string(), "Invalid argument"))
        }
        Err(size::SizeError::Range) => {
            Err(MemoryError::Invalid(text.to_string(), "Result too large"))
        }
    }
}

/// strtonum(3) in [min, max], with its error strings.
fn strtonum(text: &str, min: i64, max: i64) -> Result<i64, &'static str> {
    let n: i64 = text.parse().map_err(|_| "invalid")?;
    if n < min {
        Err("too small")
    } else if n > max {
        Err("too large")
    } else {
        Ok(n)
    }
}

/// inet_net_pton(3) for IPv4: one to four dotted parts, missing ones zero.
fn parse_net4(text: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = text.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let mut octets = [0u8; 4];
    for (octet, part) in octets.iter_mut().zip(&parts) {
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *octet = part.parse().ok()?;
    }
    Some(Ipv4Addr::from(octets))
}

/// `local prefix A.B.C.D/N`: N from 1 to 16 (default 16), so vmd keeps
/// 16 bits for VM and interface numbers; no host bits set.
pub fn local_prefix4(text: &str) -> Result<Ipv4Prefix, ValueError> {
    let (addr, len) = match text.rsplit_once('/') {
        Some((addr, len)) => (addr, strtonum(len, 1, 16).map_err(ValueError::Prefix)?),
        None => (text, 16),
    };
    let addr = addr
        .parse::<Ipv4Addr>()
        .ok()
        .or_else(|| parse_net4(addr))
        .ok_or(ValueError::Prefix("invalid format"))?;
    let mask = u32::MAX << (32 - len);
    if u32::from(addr) & mask != u32::from(addr) {
        return Err(ValueError::Prefix("bad mask"));
    }
    Ok(Ipv4Prefix {
        addr,
        len: len as u8,
    })
}

/// `local inet6 prefix X/N`: N at most 64 (default 64); no host bits set.
pub fn local_prefix6(text: &str) -> Result<Ipv6Prefix, ValueError> {
    let (addr, len) = match text.rsplit_once('/') {
        Some((addr, len)) => (addr, strtonum(len, 0, 64).map_err(ValueError::Prefix)?),
        None => (text, 64),
    };
    let addr: Ipv6Addr = addr
        .parse()
        .map_err(|_| ValueError::Prefix("invalid format"))?;
    let mask = if len == 0 {
        0
    } else {
        u128::MAX << (128 - len)
    };
    if u128::from(addr) & mask != u128::from(addr) {
        return Err(ValueError::Prefix("bad mask"));
    }
    Ok(Ipv6Prefix {
        addr,
        len: len as u8,
    })
}

/// `owner user`, `owner user:group`, `owner :group`, resolved now so
/// that a typo fails the configuration check.
pub fn owner(text: &str) -> Result<Owner, ValueError> {
    let (user, group) = match text.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (text, None),
    };
    let mut owner = Owner::default();
    if !user.is_empty() {
        let entry = User::from_name(user)
            .ok()
            .flatten()
            .ok_or_else(|| ValueError::UnknownUser(user.to_string()))?;
        owner.uid = entry.uid.as_raw();
        owner.user = Some(user.to_string());
    }
    if let Some(group) = group.filter(|g| !g.is_empty()) {
        let entry = Group::from_name(group)
            .ok()
            .flatten()
            .ok_or_else(|| ValueError::UnknownGroup(group.to_string()))?;
        owner.gid = Some(entry.gid.as_raw());
        owner.group = Some(group.to_string());
    }
    Ok(owner)
}

/// `owner N`: a numeric uid, named if /etc/passwd knows it.
pub fn owner_uid(uid: i64) -> Result<Owner, ValueError> {
    let uid = u32::try_from(uid).map_err(|_| ValueError::UnknownUser(uid.to_string()))?;
    let user = User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name);
    Ok(Owner {
        uid,
        user,
        gid: None,
        group: None,
    })
}

/// A Linux interface name: 1 to 15 bytes, no '/', ':' or white space,
/// not `.` or `..`. Returns false for an invalid name; length is checked
/// by the caller, which reports it differently.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

/// An interface group name (OpenBSD's rule): shorter than 16 bytes, not
/// ending in a digit, and (for Linux link groups) no white space.
pub fn valid_group(name: &str) -> bool {
    name.len() < IF_NAMESIZE
        && name.bytes().last().is_some_and(|b| !b.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_graphic())
}

/// ether_aton(3): six hex bytes of one or two digits separated by ':'.
pub fn lladdr(text: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        if part.is_empty() || part.len() > 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    Some(mac)
}

pub fn format_lladdr(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// `uid range FIRST-LAST` syntax: 1 <= FIRST <= LAST < 2^32-1.
pub fn uid_range_syntax(text: &str) -> Result<UidRange, ValueError> {
    let bad = || ValueError::UidRangeSyntax(text.to_string());
    let (first, last) = text.split_once('-').ok_or_else(bad)?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(first) || !digits(last) {
        return Err(bad());
    }
    let first: u32 = first.parse().map_err(|_| bad())?;
    let last: u32 = last.parse().map_err(|_| bad())?;
    // uid 0 is root and (uid_t)-1 means "no change" to setresuid(2).
    if first == 0 || first > last || last == u32::MAX {
        return Err(bad());
    }
    Ok(UidRange { first, last })
}

/// The range must not share a uid with an account in `passwd` (the text
/// of /etc/passwd) or a subordinate range in `subuid` (/etc/subuid): VM
/// processes would otherwise run as, or be signalable by, someone else.
pub fn uid_range_free(range: UidRange, passwd: &str, subuid: &str) -> Result<(), ValueError> {
    let shown = format!("{}-{}", range.first, range.last);
    let inside = |uid: u64| uid >= range.first as u64 && uid <= range.last as u64;
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if let (Some(user), Some(Ok(uid))) =
            (fields.first(), fields.get(2).map(|u| u.parse::<u64>()))
        {
            if inside(uid) {
                return Err(ValueError::UidRangePasswd {
                    range: shown,
                    uid: uid as u32,
                    user: user.to_string(),
                });
            }
        }
    }
    for line in subuid.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        let (Some(owner), Some(Ok(start)), Some(Ok(count))) = (
            fields.first(),
            fields.get(1).map(|s| s.parse::<u64>()),
            fields.get(2).map(|s| s.parse::<u64>()),
        ) else {
            continue;
        };
        if count == 0 {
            continue;
        }
        let end = start + count - 1;
        if start <= range.last as u64 && end >= range.first as u64 {
            return Err(ValueError::UidRangeSubuid {
                range: shown,
                owner: owner.to_string(),
                first: start as u32,
                last: end.min(u32::MAX as u64) as u32,
            });
        }
    }
    Ok(())
}

/// [`uid_range_free`] against this machine's /etc/passwd and /etc/subuid
/// (a missing file has no entries). The daemon should check the effective
/// range, the default included, the same way at startup.
pub fn uid_range_free_here(range: UidRange) -> Result<(), ValueError> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let subuid = std::fs::read_to_string("/etc/subuid").unwrap_or_default();
    uid_range_free(range, &passwd, &subuid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(memory_size(1 << 20), Ok((1 << 20, None)));
        assert_eq!(memory_size((1 << 20) - 1), Err(MemoryError::TooSmall));
        assert_eq!(memory_size(-5), Err(MemoryError::TooSmall));
        assert_eq!(
            memory_size_str("1048575K"),
            Ok((1023 << 20, Some("memory size rounded to 1023M".to_string())))
        );
        assert_eq!(memory_size_str("1.5G"), Ok((3 << 29, None)));
        assert_eq!(
            memory_size_str("2T").unwrap_err().to_string(),
            "memory size too large (limit is 1.0T)"
        );
        assert_eq!(
            memory_size_str("12X").unwrap_err().to_string(),
            "invalid memory size: 12X: Invalid argument"
        );
        assert_eq!(
            memory_size_str("16E").unwrap_err().to_string(),
            "invalid memory size: 16E: Result too large"
        );
    }

    #[test]
    fn local_prefixes() {
        let p = local_prefix4("100.64.0.0/10").unwrap();
        assert_eq!((p.addr, p.len), (Ipv4Addr::new(100, 64, 0, 0), 10));
        assert_eq!(
            local_prefix4("10/8").unwrap().addr,
            Ipv4Addr::new(10, 0, 0, 0)
        );
        assert_eq!(local_prefix4("10.1.0.0").unwrap().len, 16);
        assert_eq!(
            local_prefix4("10.0.0.0/24"),
            Err(ValueError::Prefix("too large"))
        );
        assert_eq!(
            local_prefix4("10.0.0.0/0"),
            Err(ValueError::Prefix("too small"))
        );
        assert_eq!(
            local_prefix4("10.0.0.0/x"),
            Err(ValueError::Prefix("invalid"))
        );
        assert_eq!(
            local_prefix4("10.1.0.0/8"),
            Err(ValueError::Prefix("bad mask"))
        );
        assert_eq!(
            local_prefix4("ten/8"),
            Err(ValueError::Prefix("invalid format"))
        );
        assert_eq!(local_prefix6("fd00:1::/48").unwrap().len, 48);
        assert_eq!(
            local_prefix6("fd00::/96"),
            Err(ValueError::Prefix("too large"))
        );
        assert_eq!(
            local_prefix6("fd00::1/64"),
            Err(ValueError::Prefix("bad mask"))
        );
        assert_eq!(
            local_prefix6("10.0.0.0/8"),
            Err(ValueError::Prefix("invalid format"))
        );
    }

    #[test]
    fn owners_resolve_now() {
        let root = owner("root:root").unwrap();
        assert_eq!((root.uid, root.gid), (0, Some(0)));
        let group_only = owner(":root").unwrap();
        assert_eq!(
            (group_only.uid, group_only.user, group_only.gid),
            (0, None, Some(0))
        );
        assert_eq!(
            owner("no_such_user_x"),
            Err(ValueError::UnknownUser("no_such_user_x".into()))
        );
        assert_eq!(
            owner("root:no_such_group_x"),
            Err(ValueError::UnknownGroup("no_such_group_x".into()))
        );
        assert_eq!(owner_uid(0).unwrap().user.as_deref(), Some("root"));
    }

    #[test]
    fn names_and_addresses() {
        assert!(valid_ifname("tap0") && valid_ifname("br-lan"));
        assert!(
            !valid_ifname("a/b")
                && !valid_ifname("a b")
                && !valid_ifname("..")
                && !valid_ifname("")
        );
        assert!(
            valid_group("vms")
                && !valid_group("vm1")
                && !valid_group("")
                && !valid_group(&"g".repeat(16))
        );
        assert_eq!(
            lladdr("fe:e1:ba:d0:0:1"),
            Some([0xfe, 0xe1, 0xba, 0xd0, 0, 1])
        );
        assert_eq!(lladdr("fe:e1:ba:d0:00"), None);
        assert_eq!(lladdr("fe:e1:ba:d0:00:100"), None);
        assert_eq!(
            format_lladdr(&[0xfe, 0xe1, 0xba, 0xd0, 0, 1]),
            "fe:e1:ba:d0:00:01"
        );
    }

    #[test]
    fn uid_ranges() {
        assert_eq!(
            uid_range_syntax("1000-2000"),
            Ok(UidRange {
                first: 1000,
                last: 2000
            })
        );
        for bad in ["0-10", "20-10", "10", "a-b", "1-4294967295", "-5"] {
            assert!(uid_range_syntax(bad).is_err(), "{bad}");
        }
        let passwd = "root:x:0:0::/root:/bin/sh\njoe:x:1500:1500::/home/joe:/bin/sh\n";
        let subuid = "joe:100000:65536\n";
        let range = |a, b| UidRange { first: a, last: b };
        assert!(uid_range_free(range(2000, 3000), passwd, subuid).is_ok());
        assert_eq!(
            uid_range_free(range(1000, 2000), passwd, subuid)
                .unwrap_err()
                .to_string(),
            "uid range 1000-2000 overlaps uid 1500 of user joe in /etc/passwd"
        );
        assert_eq!(
            uid_range_free(range(165535, 170000), passwd, subuid)
                .unwrap_err()
                .to_string(),
            "uid range 165535-170000 overlaps the range 100000-165535 of joe in /etc/subuid"
        );
        assert!(uid_range_free(range(165536, 170000), passwd, subuid).is_ok());
    }
}
