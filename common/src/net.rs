//! Pure rules of guest networking shared by vmd's processes: the MAC
//! addresses vmd gives interfaces that have no `lladdr`, the tap
//! description, and the addresses of local interfaces.

use crate::config::Ipv4Prefix;
use std::net::Ipv4Addr;

/// OpenBSD's scheme (config.c): fe:e1:bb:dN:xx:xx, N = the interface's
/// index + 1, the last two bytes random.
pub fn generated_mac(index: usize, random: [u8; 2]) -> [u8; 6] {
    [
        0xfe,
        0xe1,
        0xbb,
        0xd0 | ((index as u8 + 1) & 0x0f),
        random[0],
        random[1],
    ]
}

/// Whether `mac` is one [`generated_mac`] makes for interface `index`.
pub fn is_generated_for(mac: &[u8; 6], index: usize) -> bool {
    mac[..4] == generated_mac(index, [0, 0])[..4]
}

/// The tap's description (its ifalias on Linux): `vm<ID>-if<N>-<NAME>`,
/// as OpenBSD's vmd describes its taps; cut to what IFALIASZ holds.
pub fn tap_description(vmid: u32, index: usize, name: &str) -> String {
    let mut text = format!("vm{vmid}-if{index}-{name}");
    text.truncate(255);
    text
}

/// The host side of local interface `index` of VM `vmid`: one /31 per
/// interface from `local prefix`, `prefix + vmid * 256 + 2 * index + 2`
/// (100.64.N.2 for the first interface of VM N); the guest's is the
/// next address. None when `vmid` or `index` does not fit in the prefix.
pub fn local_host_addr(prefix: &Ipv4Prefix, vmid: u32, index: usize) -> Option<Ipv4Addr> {
    let host_bits = 32u32.checked_sub(u32::from(prefix.len))?;
    if host_bits < 9 || index >= 127 {
        return None;
    }
    // vmid occupies the bits above the last byte that the prefix leaves.
    if u64::from(vmid) >= 1u64 << (host_bits - 8) {
        return None;
    }
    let base = u32::from(prefix.addr) & !((1u64 << host_bits) - 1) as u32;
    Some(Ipv4Addr::from(base | (vmid << 8) | (2 * index as u32 + 2)))
}

/// The guest side of local interface `index` of VM `vmid` (what the
/// DHCP server offers): the host side's address + 1.
pub fn local_guest_addr(prefix: &Ipv4Prefix, vmid: u32, index: usize) -> Option<Ipv4Addr> {
    local_host_addr(prefix, vmid, index).map(|a| Ipv4Addr::from(u32::from(a) + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_follow_openbsds_scheme() {
        assert_eq!(
            generated_mac(0, [0x12, 0x34]),
            [0xfe, 0xe1, 0xbb, 0xd1, 0x12, 0x34]
        );
        assert_eq!(generated_mac(3, [0, 0])[3], 0xd4);
        assert!(is_generated_for(&generated_mac(2, [9, 9]), 2));
        assert!(!is_generated_for(&generated_mac(2, [9, 9]), 1));
    }

    #[test]
    fn tap_description_is_openbsds() {
        assert_eq!(tap_description(3, 0, "web"), "vm3-if0-web");
        assert_eq!(tap_description(12, 3, "a.b-c"), "vm12-if3-a.b-c");
    }

    #[test]
    fn local_addresses_are_a_31_per_interface() {
        let p = Ipv4Prefix {
            addr: Ipv4Addr::new(100, 64, 0, 0),
            len: 10,
        };
        // vmctl(8): 100.64.N.2 and .3 for the first, .4 and .5 next.
        assert_eq!(
            local_host_addr(&p, 1, 0),
            Some(Ipv4Addr::new(100, 64, 1, 2))
        );
        assert_eq!(
            local_guest_addr(&p, 1, 0),
            Some(Ipv4Addr::new(100, 64, 1, 3))
        );
        assert_eq!(
            local_host_addr(&p, 1, 1),
            Some(Ipv4Addr::new(100, 64, 1, 4))
        );
        assert_eq!(
            local_host_addr(&p, 300, 0),
            Some(Ipv4Addr::new(100, 65, 44, 2))
        );
        // A /10 leaves 14 bits for the VM id.
        assert!(local_host_addr(&p, (1 << 14) - 1, 0).is_some());
        assert_eq!(local_host_addr(&p, 1 << 14, 0), None);
        let small = Ipv4Prefix {
            addr: Ipv4Addr::new(10, 1, 2, 3),
            len: 16,
        };
        assert_eq!(
            local_host_addr(&small, 5, 0),
            Some(Ipv4Addr::new(10, 1, 5, 2))
        );
        assert_eq!(local_host_addr(&small, 256, 0), None);
    }
}
