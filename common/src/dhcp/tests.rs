use super::*;

const MAC: [u8; 6] = [0xfe, 0xe1, 0xbb, 0xd1, 0x00, 0x01];
const TAP_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];

fn lease() -> Lease {
    Lease {
        guest_mac: MAC,
        host_mac: TAP_MAC,
        guest: Ipv4Addr::new(100, 64, 1, 3),
        host: Ipv4Addr::new(100, 64, 1, 2),
        host_name: "web".into(),
        net_boot: false,
    }
}

fn discover() -> Vec<u8> {
    build_request(MAC, 0x1234_5678, Some(&[53, 1, 1, 255]))
}

fn reply(frame: &[u8]) -> Reply {
    let out = dhcp_reply(frame, false, &lease()).expect("an answer");
    decode_reply(&out).expect("a well-formed reply")
}

fn drop_reason(frame: &[u8]) -> Drop {
    dhcp_reply(frame, false, &lease()).expect_err("no answer")
}

#[test]
fn discover_gets_offer_with_every_option() {
    let r = reply(&discover());
    assert_eq!(r.message_type(), Some(DHCPOFFER));
    assert_eq!(r.xid, 0x1234_5678);
    assert_eq!(r.yiaddr, Ipv4Addr::new(100, 64, 1, 3));
    assert_eq!((r.src_mac, r.dst_mac), (TAP_MAC, MAC));
    assert_eq!(r.src, Ipv4Addr::new(100, 64, 1, 2));
    assert_eq!(r.dst, Ipv4Addr::new(100, 64, 1, 3));
    assert_eq!(r.option(OPT_SUBNET_MASK), Some(&[255, 255, 255, 254][..]));
    assert_eq!(r.option(OPT_ROUTER), Some(&[100, 64, 1, 2][..]));
    assert_eq!(r.option(OPT_DNS), Some(&[100, 64, 1, 2][..]));
    assert_eq!(r.option(OPT_SERVER_ID), Some(&[100, 64, 1, 2][..]));
    assert_eq!(r.option(OPT_LEASE_TIME), Some(&[0xff; 4][..]));
    assert_eq!(r.option(OPT_HOST_NAME), Some(&b"web"[..]));
    assert_eq!(r.file, "");
}

#[test]
fn request_gets_ack_or_nak() {
    let ack = reply(&build_request(
        MAC,
        7,
        Some(&[53, 1, 3, 50, 4, 100, 64, 1, 3, 54, 4, 100, 64, 1, 2, 255]),
    ));
    assert_eq!(ack.message_type(), Some(DHCPACK));
    assert_eq!(ack.yiaddr, Ipv4Addr::new(100, 64, 1, 3));
    // No requested address: the lease is what it is.
    assert_eq!(
        reply(&build_request(MAC, 7, Some(&[53, 1, 3, 255]))).message_type(),
        Some(DHCPACK)
    );
    let nak = reply(&build_request(
        MAC,
        7,
        Some(&[53, 1, 3, 50, 4, 192, 0, 2, 16, 255]),
    ));
    assert_eq!(nak.message_type(), Some(DHCPNAK));
    assert_eq!(nak.yiaddr, Ipv4Addr::UNSPECIFIED);
    assert_eq!((nak.dst, nak.dst_mac), (Ipv4Addr::BROADCAST, BROADCAST));
    assert_eq!(nak.option(OPT_SUBNET_MASK), None);
    assert_eq!(nak.option(OPT_SERVER_ID), Some(&[100, 64, 1, 2][..]));
    assert_eq!(
        drop_reason(&build_request(
            MAC,
            7,
            Some(&[53, 1, 3, 54, 4, 192, 0, 2, 1, 255])
        )),
        Drop::OtherServer
    );
    assert_eq!(
        drop_reason(&build_request(MAC, 7, Some(&[53, 1, 7, 255]))),
        Drop::MessageType(7)
    );
}

#[test]
fn plain_bootp_gets_bootreply() {
    let r = reply(&build_request(MAC, 9, None));
    assert_eq!(r.message_type(), None);
    assert_eq!(r.option(OPT_SERVER_ID), None);
    assert_eq!(r.option(OPT_LEASE_TIME), None);
    assert_eq!(r.option(OPT_ROUTER), Some(&[100, 64, 1, 2][..]));
    assert_eq!(r.yiaddr, Ipv4Addr::new(100, 64, 1, 3));
}

#[test]
fn net_boot_and_broadcast_flag() {
    let mut l = lease();
    l.net_boot = true;
    let mut frame = discover();
    // flags: broadcast
    frame[ETHER_HDR + IP_HDR + UDP_HDR + 10] = 0x80;
    fix_checksums(&mut frame);
    let r = decode_reply(&dhcp_reply(&frame, false, &l).unwrap()).unwrap();
    assert_eq!(r.file, NET_BOOT_FILE);
    assert_eq!((r.dst, r.dst_mac), (Ipv4Addr::BROADCAST, BROADCAST));
    l.host_name.clear();
    let r = decode_reply(&dhcp_reply(&discover(), false, &l).unwrap()).unwrap();
    assert_eq!(r.option(OPT_HOST_NAME), None);
}

#[test]
fn only_own_mac_to_broadcast() {
    let other = [0xfe, 0xe1, 0xbb, 0xd1, 0x00, 0x02];
    assert_eq!(
        drop_reason(&build_request(other, 1, Some(&[53, 1, 1, 255]))),
        Drop::ForeignMac
    );
    let mut f = discover();
    f[0..6].copy_from_slice(&TAP_MAC);
    assert_eq!(drop_reason(&f), Drop::NotBroadcast);
    // chaddr of another MAC from the right source.
    let mut f = discover();
    f[ETHER_HDR + IP_HDR + UDP_HDR + 33] ^= 1;
    fix_checksums(&mut f);
    assert_eq!(drop_reason(&f), Drop::NotRequest);
}

#[test]
fn checksums() {
    let mut f = discover();
    f[ETHER_HDR + 10] ^= 1;
    assert_eq!(drop_reason(&f), Drop::IpChecksum);
    let mut f = discover();
    let udp_sum = ETHER_HDR + IP_HDR + 6;
    f[udp_sum] ^= 1;
    assert_eq!(drop_reason(&f), Drop::UdpChecksum);
    // Left to offload: the caller says so, and it is answered.
    assert!(dhcp_reply(&f, true, &lease()).is_ok());
    // No UDP checksum at all.
    f[udp_sum..udp_sum + 2].copy_from_slice(&[0, 0]);
    assert!(dhcp_reply(&f, false, &lease()).is_ok());
}

#[test]
fn fixed_fields() {
    let bootp = ETHER_HDR + IP_HDR + UDP_HDR;
    for (at, why) in [
        (bootp + 3, Drop::Unsupported),           // hops
        (bootp + 12, Drop::Unsupported),          // ciaddr
        (bootp + 108, Drop::Unsupported),         // file
        (bootp, Drop::NotRequest),                // op
        (ETHER_HDR + 6, Drop::Fragment),          // flags/fragment offset
        (ETHER_HDR + 9, Drop::NotBootp),          // protocol
        (ETHER_HDR + IP_HDR + 1, Drop::NotBootp), // source port
    ] {
        let mut f = discover();
        f[at] ^= 0x21;
        fix_checksums(&mut f);
        assert_eq!(drop_reason(&f), why, "byte {at}");
    }
    let mut f = discover();
    f[12] = 0x86;
    assert_eq!(drop_reason(&f), Drop::NotIpv4);
    assert_eq!(drop_reason(&f[..100]), Drop::Size(100));
    let mut big = discover();
    big.resize(MAX_FRAME + 1, 0);
    assert_eq!(drop_reason(&big), Drop::Size(MAX_FRAME + 1));
    // Ethernet padding after the IP packet is fine.
    let mut f = discover();
    f.extend_from_slice(&[0; 20]);
    assert!(dhcp_reply(&f, false, &lease()).is_ok());
}

#[test]
fn hostile_options() {
    for options in [
        &[53, 1, 1, 12, 200, b'x'][..],       // length past the end
        &[53, 1, 1, 12][..],                  // length missing
        &[53, 2, 1, 1, 255][..],              // message type of two bytes
        &[53, 1, 3, 50, 3, 1, 2, 3, 255][..], // short requested address
        &[53, 1, 3, 54, 5, 1, 2, 3, 4, 5, 255][..],
    ] {
        // Leading pads keep the request over 300 bytes, so the bad option
        // stays at the very end of the packet.
        let mut padded = vec![0u8; 60];
        padded.extend_from_slice(options);
        let f = build_request(MAC, 1, Some(&padded));
        assert_eq!(drop_reason(&f), Drop::Options, "{options:?}");
    }
    // Option overload (52) is not followed: the message type is what the
    // options field says.
    let r = reply(&build_request(MAC, 1, Some(&[52, 1, 3, 53, 1, 1, 255])));
    assert_eq!(r.message_type(), Some(DHCPOFFER));
    // No END: the options end with the packet.
    let f = build_request(MAC, 1, Some(&[53, 1, 1]));
    assert!(dhcp_reply(&f, false, &lease()).is_ok());
    // Only pads.
    let r = reply(&build_request(MAC, 1, Some(&[0; 60])));
    assert_eq!(r.message_type(), None);
}

#[test]
fn long_host_name_fits() {
    let mut l = lease();
    l.host_name = "x".repeat(255);
    let r = decode_reply(&dhcp_reply(&discover(), false, &l).unwrap()).unwrap();
    assert_eq!(r.option(OPT_HOST_NAME).map(<[u8]>::len), Some(255));
    l.host_name = "x".repeat(256);
    let r = decode_reply(&dhcp_reply(&discover(), false, &l).unwrap()).unwrap();
    assert_eq!(r.option(OPT_HOST_NAME), None);
}
