//! Helpers shared by the image tests: temp dirs, qemu-img, a small PRNG.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A unique directory, removed when dropped, even if the test panics.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("common-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs a qemu-utils program and returns its output; fails loudly when it
/// is missing or fails.
pub fn qemu(program: &str, args: &[&str], dir: &Path) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program} (install qemu-utils: regress/setup): {e}")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{program} {args:?} failed: {text}");
    text
}

pub fn check_clean(dir: &Path, image: &str) {
    let out = qemu("qemu-img", &["check", "-f", "qcow2", image], dir);
    assert!(out.contains("No errors were found"), "{image}: {out}");
}

pub fn compare(dir: &Path, a: &str, a_format: &str, b: &str, b_format: &str) {
    let out = qemu(
        "qemu-img",
        &["compare", "-f", a_format, "-F", b_format, a, b],
        dir,
    );
    assert!(out.contains("Images are identical"), "{a} vs {b}: {out}");
}

/// xorshift64*: a small seeded PRNG, so every run sees the same cases.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// The frames of a classic pcap file (as tcpdump -w writes them, either
/// byte order, Ethernet link type), for the DHCP tests' captured requests.
pub fn pcap_frames(data: &[u8]) -> Vec<Vec<u8>> {
    let magic = u32::from_le_bytes(data[0..4].try_into().unwrap());
    let swapped = match magic {
        0xa1b2_c3d4 => false,
        0xd4c3_b2a1 => true,
        _ => panic!("not a pcap file (magic {magic:#x})"),
    };
    let word = |at: usize| {
        let b: [u8; 4] = data[at..at + 4].try_into().unwrap();
        if swapped {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    };
    assert_eq!(word(20), 1, "pcap link type is not Ethernet");
    let mut frames = Vec::new();
    let mut at = 24;
    while at + 16 <= data.len() {
        let len = word(at + 8) as usize;
        assert_eq!(
            len,
            word(at + 12) as usize,
            "pcap frame truncated by the snap length"
        );
        frames.push(data[at + 16..at + 16 + len].to_vec());
        at += 16 + len;
    }
    assert_eq!(at, data.len(), "pcap file ends inside a frame");
    frames
}

/// The captured requests (regress/dhcp/capture-vectors): (client, frames).
pub fn dhcp_vectors() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    vec![
        ("udhcpc", pcap_frames(include_bytes!("../dhcp/udhcpc.pcap"))),
        (
            "dhclient",
            pcap_frames(include_bytes!("../dhcp/dhclient.pcap")),
        ),
        ("dhcpcd", pcap_frames(include_bytes!("../dhcp/dhcpcd.pcap"))),
    ]
}
