//! Addresses of local interfaces (`local interface`, `vmctl start -L`):
//! one /31 per interface, taken from `local prefix` by the VM's id and the
//! interface's index, and, with `local inet6`, one /96 per interface.
//! The parent gives the host side to the tap; the switch process offers
//! the guest side over DHCP. Both call these functions, nothing else
//! computes them.
//!
//! The layout is OpenBSD vmd's (priv.c `vm_priv_addr`,
//! `vm_priv_addr6`): VM id N owns the /24 `prefix + N.0`; interface i
//! owns the /31 at `.(2i+2)`, the host (gateway) side even, the guest side
//! odd, so no address ends in `.0`. With the default 100.64.0.0/10, VM 1's
//! first interface is 100.64.1.2 (host) and 100.64.1.3 (guest).

use crate::config::{Ipv4Prefix, Ipv6Prefix};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// One local interface: its VM's id and its index among the VM's
/// interfaces. Names a DHCP port between the parent and the switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LocalPort {
    pub vmid: u32,
    pub index: u32,
}

impl fmt::Display for LocalPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vm {} interface {}", self.vmid, self.index)
    }
}

/// The netmask of every local interface's subnet (a /31).
pub const LOCAL_NETMASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 254);
/// Its prefix length.
pub const LOCAL_PREFIX_LEN: u8 = 31;
/// The prefix length of a local interface's IPv6 subnet.
pub const LOCAL_PREFIX6_LEN: u8 = 96;
/// Interfaces numbered from here on do not fit the /24 of their VM.
const MAX_INDEX: u32 = 0x7f;

/// Which end of a local interface's /31.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The tap on the host: the guest's router and DNS server.
    Host,
    /// The guest's interface: what the DHCP server offers.
    Guest,
}

/// Why a VM id and interface index have no address in a prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LocalAddrError {
    #[error("vm id {vmid} does not fit local prefix {prefix}/{len}")]
    VmIdTooLarge {
        vmid: u32,
        prefix: Ipv4Addr,
        len: u8,
    },
    #[error("interface index {0} is too large for a local address (at most 126)")]
    IndexTooLarge(u32),
}

/// The IPv4 address of one side of VM `vmid`'s local interface `index`
/// (0-based, the VM's interface number) in `prefix`.
pub fn local_addr4(
    prefix: Ipv4Prefix,
    vmid: u32,
    index: u32,
    side: Side,
) -> Result<Ipv4Addr, LocalAddrError> {
    if index >= MAX_INDEX {
        return Err(LocalAddrError::IndexTooLarge(index));
    }
    let too_large = LocalAddrError::VmIdTooLarge {
        vmid,
        prefix: prefix.addr,
        len: prefix.len,
    };
    let host_bits = 32 - u32::from(prefix.len.clamp(1, 32));
    // The VM's /24 must lie inside the prefix: vmid < 2^(host_bits - 8).
    if host_bits < 8 || u64::from(vmid) >= 1u64 << (host_bits - 8) {
        return Err(too_large);
    }
    let mut offset = (vmid << 8) | ((index + 1) * 2);
    if side == Side::Guest {
        offset += 1;
    }
    Ok(Ipv4Addr::from(u32::from(prefix.addr) | offset))
}

/// The IPv6 address of one side of a local interface, with `local inet6`:
/// `prefix6` with the guest's IPv4 address in bytes 8 to 11, and 1 (host)
/// or 2 (guest) in the last byte, in a /96 ([`LOCAL_PREFIX6_LEN`]). The
/// guest's address is not offered by vmd (no router advertisements), as
/// in OpenBSD.
pub fn local_addr6(
    prefix: Ipv4Prefix,
    prefix6: Ipv6Prefix,
    vmid: u32,
    index: u32,
    side: Side,
) -> Result<Ipv6Addr, LocalAddrError> {
    let guest = local_addr4(prefix, vmid, index, Side::Guest)?;
    let mut octets = prefix6.addr.octets();
    octets[8..12].copy_from_slice(&guest.octets());
    octets[15] = match side {
        Side::Host => 1,
        Side::Guest => 2,
    };
    Ok(Ipv6Addr::from(octets))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Globals;

    fn local_prefix4(text: &str) -> Option<Ipv4Prefix> {
        let (addr, len) = text.split_once('/')?;
        Some(Ipv4Prefix {
            addr: addr.parse().ok()?,
            len: len.parse().ok()?,
        })
    }

    fn local_prefix6(text: &str) -> Option<Ipv6Prefix> {
        let (addr, len) = text.split_once('/')?;
        Some(Ipv6Prefix {
            addr: addr.parse().ok()?,
            len: len.parse().ok()?,
        })
    }

    fn default_prefix() -> Ipv4Prefix {
        Globals::default().local_prefix
    }

    #[test]
    fn digest_examples() {
        // The behaviour digest: host 100.64.N.(2i+2), guest 100.64.N.(2i+3).
        let p = default_prefix();
        let a = |vmid, i, side| local_addr4(p, vmid, i, side).unwrap();
        assert_eq!(a(1, 0, Side::Host), Ipv4Addr::new(100, 64, 1, 2));
        assert_eq!(a(1, 0, Side::Guest), Ipv4Addr::new(100, 64, 1, 3));
        assert_eq!(a(1, 1, Side::Host), Ipv4Addr::new(100, 64, 1, 4));
        assert_eq!(a(1, 1, Side::Guest), Ipv4Addr::new(100, 64, 1, 5));
        assert_eq!(a(7, 3, Side::Host), Ipv4Addr::new(100, 64, 7, 8));
        assert_eq!(a(7, 3, Side::Guest), Ipv4Addr::new(100, 64, 7, 9));
        assert_eq!(a(255, 0, Side::Guest), Ipv4Addr::new(100, 64, 255, 3));
        // A /10 leaves 14 bits above the /24: VM 256 is 100.65.0.x.
        assert_eq!(a(256, 0, Side::Host), Ipv4Addr::new(100, 65, 0, 2));
        assert_eq!(a(0x3fff, 126 - 1, Side::Guest).octets()[3], 253);
        assert_eq!(a(0x3fff, 0, Side::Host), Ipv4Addr::new(100, 127, 255, 2));
    }

    #[test]
    fn other_prefixes_and_limits() {
        let p = local_prefix4("10.0.0.0/16").unwrap();
        assert_eq!(
            local_addr4(p, 3, 0, Side::Host).unwrap(),
            Ipv4Addr::new(10, 0, 3, 2)
        );
        assert!(matches!(
            local_addr4(p, 256, 0, Side::Host),
            Err(LocalAddrError::VmIdTooLarge { vmid: 256, .. })
        ));
        assert_eq!(
            local_addr4(p, 1, 127, Side::Host),
            Err(LocalAddrError::IndexTooLarge(127))
        );
        assert!(local_addr4(default_prefix(), 0x4000, 0, Side::Host).is_err());
        // The host side and guest side share one /31.
        for i in 0..4 {
            let h = u32::from(local_addr4(p, 9, i, Side::Host).unwrap());
            let g = u32::from(local_addr4(p, 9, i, Side::Guest).unwrap());
            assert_eq!(h & 0xffff_fffe, g & 0xffff_fffe);
            assert_eq!(h % 2, 0);
        }
    }

    #[test]
    fn inet6_as_openbsd() {
        let p6 = local_prefix6("fd00:1234:5678:9abc::/64").unwrap();
        let p = default_prefix();
        assert_eq!(
            local_addr6(p, p6, 1, 0, Side::Host).unwrap(),
            "fd00:1234:5678:9abc:6440:103:0:1"
                .parse::<Ipv6Addr>()
                .unwrap()
        );
        assert_eq!(
            local_addr6(p, p6, 1, 0, Side::Guest).unwrap(),
            "fd00:1234:5678:9abc:6440:103:0:2"
                .parse::<Ipv6Addr>()
                .unwrap()
        );
        assert_eq!(
            local_addr6(p, p6, 2, 1, Side::Host).unwrap(),
            "fd00:1234:5678:9abc:6440:205:0:1"
                .parse::<Ipv6Addr>()
                .unwrap()
        );
        assert!(local_addr6(p, p6, 1, 200, Side::Host).is_err());
    }
}
