//! Pure rules of guest networking shared by vmd's processes: the MAC
//! addresses vmd gives interfaces that have no `lladdr` and the tap
//! description (local interfaces' addresses: local.rs).

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
}
