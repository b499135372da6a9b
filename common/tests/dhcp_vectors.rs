//! The DHCP server's decision on real requests captured from busybox
//! udhcpc, ISC dhclient and dhcpcd (regress/dhcp/capture-vectors; the
//! capture's server was busybox udhcpd on 192.0.2.1).

mod support;

use common::dhcp::{decode_reply, dhcp_reply, Drop, Lease};
use std::net::Ipv4Addr;

const OFFER: u8 = 2;
const ACK: u8 = 5;
const NAK: u8 = 6;

/// The interface of the capture's client: its MAC and the address the
/// capture's server gave it.
fn lease_of(frame: &[u8], guest: Ipv4Addr) -> Lease {
    Lease {
        guest_mac: frame[6..12].try_into().unwrap(),
        host_mac: [2, 0, 0, 0, 0, 1],
        guest,
        host: Ipv4Addr::new(192, 0, 2, 1),
        host_name: "vm1".into(),
        net_boot: false,
    }
}

fn answers(frames: &[Vec<u8>], lease: &Lease) -> Vec<Result<u8, Drop>> {
    frames
        .iter()
        .map(|f| {
            dhcp_reply(f, false, lease).map(|out| {
                let r = decode_reply(&out).expect("a well-formed reply");
                let t = r.message_type().expect("a DHCP reply");
                if t != NAK {
                    assert_eq!(r.yiaddr, lease.guest);
                    assert_eq!(r.option(12), Some(&b"vm1"[..]));
                    assert_eq!(r.option(1), Some(&[255, 255, 255, 254][..]));
                }
                t
            })
        })
        .collect()
}

#[test]
fn captured_requests_get_offers_and_acks() {
    for (client, frames, leased, expected) in [
        ("udhcpc", 0, [192, 0, 2, 15], &[OFFER, ACK][..]),
        (
            "dhclient",
            1,
            [192, 0, 2, 16],
            &[OFFER, ACK, OFFER, ACK, OFFER][..],
        ),
        ("dhcpcd", 2, [192, 0, 2, 17], &[OFFER, ACK][..]),
    ] {
        let vectors = support::dhcp_vectors();
        let (name, frames) = &vectors[frames];
        assert_eq!(*name, client);
        let lease = lease_of(&frames[0], Ipv4Addr::from(leased));
        let got: Vec<u8> = answers(frames, &lease)
            .into_iter()
            .map(|a| a.unwrap_or_else(|e| panic!("{client}: dropped: {e}")))
            .collect();
        assert_eq!(got, expected, "{client}");
    }
}

#[test]
fn captured_requests_for_another_address_get_nak() {
    for (client, frames) in support::dhcp_vectors() {
        let lease = lease_of(&frames[0], Ipv4Addr::new(100, 64, 1, 3));
        for (frame, answer) in frames.iter().zip(answers(&frames, &lease)) {
            // Every REQUEST in the captures names its address.
            let is_request = frame.windows(3).any(|w| w == [53, 1, 3]);
            if is_request {
                assert_eq!(answer, Ok(NAK), "{client}");
            } else {
                assert_eq!(answer, Ok(OFFER), "{client}");
            }
        }
    }
}

#[test]
fn captured_requests_from_another_mac_are_dropped() {
    for (client, frames) in support::dhcp_vectors() {
        let mut lease = lease_of(&frames[0], Ipv4Addr::new(100, 64, 1, 3));
        lease.guest_mac[5] ^= 0xff;
        for answer in answers(&frames, &lease) {
            assert_eq!(answer, Err(Drop::ForeignMac), "{client}");
        }
    }
}
