//! The DHCP decoder against a million mutated requests: real captured
//! requests (tests/dhcp/, from udhcpc, dhclient and dhcpcd) get bits
//! flipped, bytes set to edge values, option lengths bent, bytes inserted
//! and removed, tails cut and random tails added; most mutants get their
//! IP and UDP checksums recomputed so the mutation reaches the BOOTP and
//! option parsers. No mutant may panic, every answer must be a
//! well-formed reply of at most one Ethernet frame, and some mutants must
//! still be answered (so the loop does not only exercise the first check).
//! Seeded: every run sees the same packets.

mod support;

use common::dhcp::{decode_reply, dhcp_reply, fix_checksums, Lease, MAX_FRAME};
use std::net::Ipv4Addr;
use std::time::Instant;
use support::Rng;

const MUTANTS: u64 = 1_000_000;

fn mutate(rng: &mut Rng, frame: &mut Vec<u8>) {
    for _ in 0..=rng.below(4) {
        let len = frame.len().max(1) as u64;
        let at = rng.below(len) as usize;
        match rng.below(9) {
            0 | 1 => {
                if let Some(b) = frame.get_mut(at) {
                    *b ^= 1 << rng.below(8);
                }
            }
            2 => {
                const EDGES: [u8; 7] = [0, 1, 0x7f, 0x80, 0xfe, 0xff, 53];
                if let Some(b) = frame.get_mut(at) {
                    *b = EDGES[rng.below(EDGES.len() as u64) as usize];
                }
            }
            3 => {
                // Somewhere in the options (after 14+20+8+236+4 bytes):
                // a code, then a length that overruns or loops.
                let opt = 282 + rng.below(60) as usize;
                if opt + 1 < frame.len() {
                    frame[opt] = [52, 53, 50, 54, 12, 255, 0][rng.below(7) as usize];
                    frame[opt + 1] = rng.below(256) as u8;
                }
            }
            4 => frame.truncate(at),
            5 => {
                let n = rng.below(400) as usize;
                let mut tail = vec![0u8; n];
                rng.fill(&mut tail);
                frame.extend_from_slice(&tail);
            }
            6 => frame.insert(at.min(frame.len()), rng.below(256) as u8),
            7 => {
                if at < frame.len() {
                    frame.remove(at);
                }
            }
            _ => {
                // Random bytes over a stretch.
                let n = rng.below(32) as usize;
                for b in frame.iter_mut().skip(at).take(n) {
                    *b = rng.below(256) as u8;
                }
            }
        }
    }
    if rng.below(4) != 0 {
        fix_checksums(frame);
    }
}

#[test]
fn dhcp_fuzz_a_million_mutated_requests() {
    let seeds: Vec<Vec<u8>> = support::dhcp_vectors()
        .into_iter()
        .flat_map(|(_, frames)| frames)
        .collect();
    assert!(seeds.len() >= 6, "too few captured requests");
    let mut rng = Rng::new(0x5eed_d4c9);
    let start = Instant::now();
    let mut answered = 0u64;
    for n in 0..MUTANTS {
        let mut frame = seeds[(n % seeds.len() as u64) as usize].clone();
        let lease = Lease {
            guest_mac: frame[6..12].try_into().unwrap(),
            host_mac: [2, 0, 0, 0, 0, 1],
            guest: Ipv4Addr::new(192, 0, 2, 15 + (n % 3) as u8),
            host: Ipv4Addr::new(192, 0, 2, 1),
            host_name: "fuzz".into(),
            net_boot: n % 2 == 0,
        };
        mutate(&mut rng, &mut frame);
        if let Ok(out) = dhcp_reply(&frame, n % 5 == 0, &lease) {
            answered += 1;
            assert!(out.len() <= MAX_FRAME, "reply of {} bytes", out.len());
            assert!(
                decode_reply(&out).is_some(),
                "malformed reply to {frame:02x?}"
            );
        }
    }
    eprintln!(
        "dhcp fuzz: {MUTANTS} mutants, {answered} answered, {:.1?}",
        start.elapsed()
    );
    assert!(answered > MUTANTS / 100, "only {answered} mutants answered");
    assert!(answered < MUTANTS, "every mutant answered");
}
