//! Hostile guests: a seeded generator (xorshift64*, stable Rust, no
//! cargo-fuzz) writes random descriptors, indirect tables, avail ring
//! entries and indexes, request headers, register and configuration
//! accesses and resets, and runs the devices on them, a million chains
//! per device. The test fails on any panic; guest memory is only reached
//! through vm-memory's checked accessors, so an out-of-bounds access
//! would be a panic or a fault too; the devices' buffers must keep their
//! size, and the process's peak memory must stay near where it was.
//! A failing seed is printed; `VIRTIO_FUZZ_SEED` replays it.

use super::block::{Block, BOUNCE_BYTES};
use super::mmio;
use super::net::{Net, MAX_FRAME};
use super::testdriver::{Driver, TempDir, MEM_SIZE};
use std::sync::{Arc, Mutex};
use vm_memory::{Bytes, GuestAddress};

/// Chains per device.
const CHAINS: u64 = 1_000_000;

/// Where the random buffers and indirect tables go: above the rings the
/// driver allocates at the bottom of guest memory.
const DATA_BASE: u64 = 1 << 20;
const DATA_SPAN: u64 = MEM_SIZE as u64 - DATA_BASE;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn addr(&mut self) -> u64 {
        match self.below(16) {
            0 => self.next(),
            1 => MEM_SIZE as u64 - self.below(64),
            2 => MEM_SIZE as u64 + self.below(4096),
            3 => self.below(DATA_BASE), // the rings themselves
            _ => DATA_BASE + self.below(DATA_SPAN),
        }
    }

    fn len(&mut self) -> u32 {
        match self.below(12) {
            0 => self.next() as u32,
            1 => 0,
            2 => self.below(1 << 21) as u32,
            3 => 1,
            4 => 16,
            // Whole sectors, as block requests need.
            5..=7 => 512 * (1 + self.below(16) as u32),
            _ => 1 + self.below(4096) as u32,
        }
    }
}

fn seed() -> u64 {
    std::env::var("VIRTIO_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        // xorshift never leaves 0.
        .filter(|&s: &u64| s != 0)
        .unwrap_or(0x005e_ed0f_da7a)
}

/// The process's peak resident memory, in KiB.
fn peak_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|v| v.parse().unwrap_or(0)))
        })
        .unwrap_or(0)
}

/// What a run did, to show it reached the devices' request handling.
#[derive(Debug, Default)]
struct Stats {
    chains: u64,
    used: u64,
    /// Used entries with a length: a block request answered with a
    /// status, a frame received.
    answered: u64,
    /// Rounds since the used ring last moved.
    idle: u64,
    inits: u64,
    register_writes: u64,
    config_accesses: u64,
}

fn activated(d: &Driver) -> bool {
    d.device.lock().unwrap().is_activated()
}

/// A driver set-up with random (valid) choices: features the device
/// offers (always VERSION_1), queue sizes a random power of two.
fn init(d: &mut Driver, rng: &mut Rng, stats: &mut Stats) {
    d.w32(mmio::STATUS, 0);
    d.reset_alloc();
    let accept = rng.next() | (1 << 32);
    let size = 1u16 << rng.below(9);
    d.init(accept, size);
    stats.inits += 1;
}

fn write_desc(d: &Driver, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let mut raw = [0u8; 16];
    raw[0..8].copy_from_slice(&addr.to_le_bytes());
    raw[8..12].copy_from_slice(&len.to_le_bytes());
    raw[12..14].copy_from_slice(&flags.to_le_bytes());
    raw[14..16].copy_from_slice(&next.to_le_bytes());
    let _ = d.mem.write_slice(&raw, GuestAddress(at));
}

fn random_flags(rng: &mut Rng) -> u16 {
    if rng.below(50) == 0 {
        rng.next() as u16
    } else {
        // NEXT, WRITE, rarely INDIRECT.
        let mut f = rng.below(4) as u16;
        if rng.below(12) == 0 {
            f |= 4;
        }
        f
    }
}

/// One round of hostile chains on queue `q`: random descriptors (some in
/// an indirect table), a plausible request header at some buffers,
/// heads in the avail ring, the index moved, then the device runs.
fn chain_round(d: &mut Driver, rng: &mut Rng, q: usize, stats: &mut Stats) {
    let Some(vq) = d.queues.get(q) else {
        return;
    };
    let (size, desc, avail, used) = (vq.size, vq.desc, vq.avail, vq.used);
    let before: u16 = d.mem.read_obj(GuestAddress(used + 2)).unwrap_or(0);
    let well_formed = rng.below(3) == 0;
    let mut well_formed_head = 0u16;
    if well_formed {
        // A request as a driver makes it (header, whole sectors, status),
        // then sometimes one field of one descriptor garbled: the paths
        // behind the validation get their share of the rounds.
        let start = rng.below(u64::from(size)) as u16;
        well_formed_head = start;
        let kind = [0u32, 1, 1, 4, 8, 11][rng.below(6) as usize];
        let writes = kind == 0 || kind == 8;
        let mut parts = vec![(16u32, false)];
        for _ in 0..rng.below(4) {
            parts.push((512 * (1 + rng.below(8) as u32), writes));
        }
        if kind == 11 {
            parts.push((16, false));
        }
        parts.push((1, true));
        let header = DATA_BASE + rng.below(DATA_SPAN - (1 << 16)) / 16 * 16;
        let mut raw = [0u8; 16];
        raw[0..4].copy_from_slice(&kind.to_le_bytes());
        raw[8..16].copy_from_slice(&rng.below(600).to_le_bytes());
        let _ = d.mem.write_slice(&raw, GuestAddress(header));
        let mut addr = header;
        let count = parts.len() as u16;
        for (i, &(len, write)) in parts.iter().enumerate() {
            let index = start.wrapping_add(i as u16) % size;
            let mut flags = if write { 2 } else { 0 };
            if (i as u16) + 1 < count {
                flags |= 1;
            }
            let next = start.wrapping_add(i as u16 + 1) % size;
            write_desc(d, desc + 16 * u64::from(index), addr, len, flags, next);
            addr += u64::from(len);
        }
        if rng.below(3) == 0 {
            let index = start.wrapping_add(rng.below(u64::from(count)) as u16) % size;
            let field = desc + 16 * u64::from(index) + [0u64, 8, 12, 14][rng.below(4) as usize];
            let _ = d.mem.write_obj(rng.next() as u16, GuestAddress(field));
        }
    }
    for _ in 0..if well_formed { 0 } else { 1 + rng.below(8) } {
        let index = if rng.below(20) == 0 {
            rng.next() as u16
        } else {
            rng.below(u64::from(size)) as u16
        };
        let at = desc + 16 * u64::from(index % size);
        let mut addr = rng.addr();
        let mut len = rng.len();
        let mut flags = random_flags(rng);
        if flags & 4 != 0 && rng.below(2) == 0 {
            // An indirect table of random descriptors.
            let count = 1 + rng.below(40);
            let table = DATA_BASE + rng.below(DATA_SPAN - 16 * 64) / 16 * 16;
            for i in 0..count {
                let next = if rng.below(10) == 0 {
                    rng.next() as u16
                } else {
                    rng.below(count) as u16
                };
                let f = random_flags(rng);
                write_desc(d, table + 16 * i, rng.addr(), rng.len(), f, next);
            }
            addr = table;
            len = (16 * count) as u32;
            flags = 4;
        }
        if rng.below(3) == 0 {
            // A request header where a device will look for one: block
            // types, small sectors; for net it is just bytes.
            let kind = [0u32, 1, 4, 8, 11, 13, rng.next() as u32][rng.below(7) as usize];
            let sector = if rng.below(4) == 0 {
                rng.next()
            } else {
                rng.below(600)
            };
            let mut header = [0u8; 16];
            header[0..4].copy_from_slice(&kind.to_le_bytes());
            header[8..16].copy_from_slice(&sector.to_le_bytes());
            let _ = d.mem.write_slice(&header, GuestAddress(addr));
        }
        let next = if rng.below(10) == 0 {
            rng.next() as u16
        } else {
            rng.below(u64::from(size)) as u16
        };
        write_desc(d, at, addr, len, flags, next);
    }
    let mut idx: u16 = d.mem.read_obj(GuestAddress(avail + 2)).unwrap_or(0);
    let heads = if well_formed { 1 } else { 1 + rng.below(3) };
    for _ in 0..heads {
        let head = if well_formed {
            well_formed_head
        } else if rng.below(20) == 0 {
            rng.next() as u16
        } else {
            rng.below(u64::from(size)) as u16
        };
        let slot = avail + 4 + 2 * u64::from(idx % size);
        let _ = d.mem.write_obj(head, GuestAddress(slot));
        idx = idx.wrapping_add(1);
    }
    if rng.below(100) == 0 {
        idx = rng.next() as u16; // a wild index: the device must not loop
    }
    let _ = d.mem.write_obj(idx, GuestAddress(avail + 2));
    stats.chains += heads;
    if rng.below(2) == 0 {
        d.w32(mmio::QUEUE_NOTIFY, q as u32);
        let _ = d.transport.queue_events()[q].read();
    }
    d.device.lock().unwrap().process_queue(q);
    let after: u16 = d.mem.read_obj(GuestAddress(used + 2)).unwrap_or(0);
    let moved = after.wrapping_sub(before);
    stats.used += u64::from(moved);
    stats.idle = if moved == 0 { stats.idle + 1 } else { 0 };
    for i in 0..moved {
        let slot = before.wrapping_add(i) % size;
        let at = used + 4 + 8 * u64::from(slot) + 4;
        if d.mem.read_obj::<u32>(GuestAddress(at)).unwrap_or(0) > 0 {
            stats.answered += 1;
        }
    }
    // The driver takes its interrupts.
    let status = d.r32(mmio::INTERRUPT_STATUS);
    d.w32(mmio::INTERRUPT_ACK, status);
    let _ = d.transport.interrupt().event().read();
}

fn register_access(d: &mut Driver, rng: &mut Rng, stats: &mut Stats) {
    const REGS: [u64; 20] = [
        mmio::DEVICE_FEATURES_SEL,
        mmio::DRIVER_FEATURES,
        mmio::DRIVER_FEATURES_SEL,
        mmio::QUEUE_SEL,
        mmio::QUEUE_NUM,
        mmio::QUEUE_READY,
        mmio::QUEUE_NOTIFY,
        mmio::INTERRUPT_ACK,
        mmio::STATUS,
        mmio::STATUS,
        mmio::QUEUE_DESC_LOW,
        mmio::QUEUE_DESC_HIGH,
        mmio::QUEUE_DRIVER_LOW,
        mmio::QUEUE_DRIVER_HIGH,
        mmio::QUEUE_DEVICE_LOW,
        mmio::QUEUE_DEVICE_HIGH,
        mmio::SHM_SEL,
        mmio::CONFIG_GENERATION,
        mmio::MAGIC_VALUE,
        mmio::INTERRUPT_STATUS,
    ];
    let offset = if rng.below(4) == 0 {
        rng.below(mmio::MMIO_WINDOW + 64)
    } else {
        REGS[rng.below(REGS.len() as u64) as usize]
    };
    let width = [4usize, 4, 4, 1, 2, 8][rng.below(6) as usize];
    let value = match rng.below(4) {
        0 => rng.next(),
        1 => rng.below(16),
        2 => 1 << rng.below(64),
        _ => rng.below(0x100),
    };
    let bytes = value.to_le_bytes();
    if rng.below(2) == 0 {
        d.transport.write(offset, &bytes[..width]);
        stats.register_writes += 1;
    } else {
        let mut b = [0u8; 8];
        d.transport.read(offset, &mut b[..width]);
    }
}

fn config_access(d: &mut Driver, rng: &mut Rng, stats: &mut Stats) {
    let offset = mmio::CONFIG
        + if rng.below(8) == 0 {
            rng.next() >> 1
        } else {
            rng.below(0x80)
        };
    let width = 1 + rng.below(8) as usize;
    let mut b = [0u8; 8];
    if rng.below(2) == 0 {
        d.transport.read(offset, &mut b[..width]);
    } else {
        let v = rng.next().to_le_bytes();
        d.transport.write(offset, &v[..width]);
    }
    stats.config_accesses += 1;
}

/// Drives `d` until `chains` chains went in; `extra` runs the device's
/// own events (a net device's tap) now and then.
fn run<F>(d: &mut Driver, rng: &mut Rng, chains: u64, mut extra: F) -> Stats
where
    F: FnMut(&mut Driver, &mut Rng),
{
    let mut stats = Stats::default();
    init(d, rng, &mut stats);
    while stats.chains < chains {
        // A driver starts over when the device stopped (a reset, a wild
        // avail index the device refuses to follow), and now and then.
        if !activated(d) || stats.idle > 64 || rng.below(2000) == 0 {
            init(d, rng, &mut stats);
            stats.idle = 0;
        }
        match rng.below(100) {
            0..=2 => register_access(d, rng, &mut stats),
            3..=5 => config_access(d, rng, &mut stats),
            6 => {
                // Scribbles over the rings (flags, used_event, used ring).
                let at = rng.below(DATA_BASE);
                let _ = d.mem.write_obj(rng.next(), GuestAddress(at));
            }
            7 => extra(d, rng),
            _ => {
                let q = rng.below(d.queues.len().max(1) as u64 + 1) as usize;
                chain_round(d, rng, q, &mut stats);
            }
        }
    }
    stats
}

fn check_stats(what: &str, stats: &Stats, seed: u64, chains: u64, min_answered: u64) {
    eprintln!("{what} fuzz (seed {seed}): {stats:?}");
    // Many chains made it to the used ring: the requests were handled,
    // not only refused at the door.
    assert!(
        stats.used > chains / 4 && stats.answered > min_answered,
        "{what}: too few chains reached the device: {stats:?}"
    );
}

#[test]
fn virtio_fuzz_block_hostile_guest() {
    let seed = seed();
    let dir = TempDir::new("fuzz");
    let path = dir.join("d.raw");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(256 << 10)
        .unwrap();
    let image = common::image::Image::open(&path, common::disk::DiskFormat::Raw, true).unwrap();
    let dev = Arc::new(Mutex::new(Block::from_image(image, false, "fuzz")));
    let mut d = Driver::new(dev.clone());
    let mut rng = Rng(seed);
    let peak = peak_kib();
    let stats = run(&mut d, &mut rng, CHAINS, |_, _| {});
    check_stats("virtio-blk", &stats, seed, CHAINS, CHAINS / 50);
    let served = dev.lock().unwrap().served;
    eprintln!("virtio-blk fuzz: {served} requests served");
    assert!(served > CHAINS / 50, "too few requests served: {served}");
    // Nothing grew with what the guest asked.
    assert!(peak_kib() < peak + (256 << 10), "peak memory grew");
    assert_eq!(dev.lock().unwrap().bounce_len(), BOUNCE_BYTES);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 256 << 10);
}

#[test]
fn virtio_fuzz_net_hostile_guest() {
    crate::parent::net::testns::in_new_netns(|| {
        let seed = seed().rotate_left(8);
        let (tap, pkt) = super::net::tests::tap_and_socket()?;
        let dev = Arc::new(Mutex::new(Net::new(tap, [2, 0, 0, 0, 0, 1])?));
        let mut d = Driver::new(dev.clone());
        let mut rng = Rng(seed);
        let peak = peak_kib();
        let mut sent = 0u64;
        let net = dev.clone();
        let stats = run(&mut d, &mut rng, CHAINS, |_, rng| {
            // Frames from the host side, of random sizes and content.
            if rng.below(2) == 0 {
                let len = 14 + rng.below(1500) as usize;
                let frame: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                if nix::unistd::write(&pkt, &frame).is_ok() {
                    sent += 1;
                }
            }
            let mut n = net.lock().unwrap();
            n.on_tap_readable();
            n.on_tap_writable();
        });
        // Received frames: about one in two the host sent.
        check_stats("virtio-net", &stats, seed, CHAINS, sent / 4);
        let n = dev.lock().unwrap();
        eprintln!(
            "virtio-net fuzz: {sent} frames sent, {} transmitted",
            n.tx_frames
        );
        assert!(n.tx_frames > CHAINS / 100, "too few frames transmitted");
        assert_eq!(n.buffer_lens(), (MAX_FRAME, MAX_FRAME));
        assert!(peak_kib() < peak + (256 << 10), "peak memory grew");
        Ok(())
    });
}

/// The same guest against a qcow2 overlay of a qcow2 base: hostile
/// writes allocate clusters, and the image stays one `qemu-img check`
/// finds clean.
#[test]
fn virtio_fuzz_block_qcow2_stays_consistent() {
    use super::testdriver::run as command;
    let seed = seed().rotate_left(16);
    let dir = TempDir::new("fuzz-qcow2");
    let (base, top) = (dir.join("base.qcow2"), dir.join("top.qcow2"));
    let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
    command("qemu-img", &["create", "-q", "-f", "qcow2", b, "320K"]);
    command("qemu-io", &["-f", "qcow2", "-c", "write -P 0x5a 0 128K", b]);
    command(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            t,
        ],
    );
    let layers =
        common::image::open_chain(&top, common::disk::DiskFormat::Qcow2, true, |p, _, w| {
            common::image::open_file(p, w)
        })
        .unwrap();
    let created = std::fs::metadata(&top).unwrap().len();
    let dev = Arc::new(Mutex::new(Block::new(layers, false, "fuzz").unwrap()));
    let mut d = Driver::new(dev.clone());
    let mut rng = Rng(seed);
    let chains = CHAINS / 5;
    let stats = run(&mut d, &mut rng, chains, |_, _| {});
    check_stats("virtio-blk qcow2", &stats, seed, chains, chains / 50);
    let served = dev.lock().unwrap().served;
    eprintln!("virtio-blk qcow2 fuzz: {served} requests served");
    assert!(served > chains / 50, "too few requests served: {served}");
    assert_eq!(dev.lock().unwrap().io_errors, 0);
    let grown = std::fs::metadata(&top).unwrap().len();
    assert!(grown > created, "no cluster was written ({created} bytes)");
    drop(d);
    drop(dev);
    for image in [t, b] {
        let out = command("qemu-img", &["check", image]);
        assert!(out.contains("No errors were found"), "{image}: {out}");
    }
}
