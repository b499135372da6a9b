//! Structured fuzzing of the qcow2 reader and writer: valid images (ours
//! and qemu-img's: version 2, version 3 with zero clusters, compressed)
//! get their header fields, L1 and L2 entries, refcount table and refcount
//! block entries and extensions mutated in ways a corrupt or hostile file
//! would (zero, all ones, off by one, unaligned, past the end, pointing at
//! other metadata, flipped flag bits, truncation). Each of thousands of
//! variants is opened, read, scanned and written; nothing may panic, and
//! no allocation may be large (a counting allocator watches).

mod support;

use common::disk::DiskFormat;
use common::image::Image;
use common::qcow2::read_header;
use std::alloc::{GlobalAlloc, Layout, System};
use std::fs::File;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use support::{qemu, Rng, TempDir};

/// Counts the largest single allocation and the peak of live bytes.
struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        // SAFETY: forwards the caller's valid layout to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: ptr was allocated by System with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        let live = LIVE.fetch_add(new_size, Ordering::Relaxed) + new_size;
        PEAK.fetch_max(live, Ordering::Relaxed);
        // SAFETY: ptr was allocated by System with this layout.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// No single allocation may exceed this (the largest legitimate one is a
/// 2 MiB cluster; the images here are far smaller than that).
const MAX_ALLOCATION: usize = 4 << 20;
const MAX_PEAK: usize = 64 << 20;
const MUTATIONS_PER_IMAGE: usize = 900;

/// A field of the file that can be mutated: where, how wide, and what.
#[derive(Clone, Debug)]
struct Field {
    offset: usize,
    width: usize,
    what: String,
}

fn be(b: &[u8], at: usize, width: usize) -> u64 {
    b.get(at..at + width)
        .map_or(0, |s| s.iter().fold(0, |v, &x| (v << 8) | u64::from(x)))
}

fn put(b: &mut [u8], at: usize, width: usize, value: u64) {
    if let Some(s) = b.get_mut(at..at + width) {
        s.copy_from_slice(&value.to_be_bytes()[8 - width..]);
    }
}

/// The mutable fields of a valid image, found with the test's own parsing
/// (not the library's).
fn fields(image: &[u8]) -> (Vec<Field>, Vec<u64>) {
    let f = |offset, width, what: &str| Field {
        offset,
        width,
        what: what.to_string(),
    };
    let mut out = vec![
        f(4, 4, "version"),
        f(8, 8, "backing_file_offset"),
        f(16, 4, "backing_file_size"),
        f(20, 4, "cluster_bits"),
        f(24, 8, "size"),
        f(32, 4, "crypt_method"),
        f(36, 4, "l1_size"),
        f(40, 8, "l1_table_offset"),
        f(48, 8, "refcount_table_offset"),
        f(56, 4, "refcount_table_clusters"),
        f(60, 4, "nb_snapshots"),
        f(64, 8, "snapshots_offset"),
    ];
    let version = be(image, 4, 4);
    let header_len = if version >= 3 {
        be(image, 100, 4) as usize
    } else {
        72
    };
    if version >= 3 {
        out.extend([
            f(72, 8, "incompatible_features"),
            f(80, 8, "compatible_features"),
            f(88, 8, "autoclear_features"),
            f(96, 4, "refcount_order"),
            f(100, 4, "header_length"),
            f(104, 1, "compression_type"),
        ]);
    }
    // Header extensions: their type and length words.
    let mut at = header_len;
    while at + 8 <= image.len().min(4096) {
        let kind = be(image, at, 4);
        out.push(f(at, 4, "extension type"));
        out.push(f(at + 4, 4, "extension length"));
        if kind == 0 {
            break;
        }
        at += 8 + (be(image, at + 4, 4) as usize).next_multiple_of(8);
    }
    let cs = 1usize << be(image, 20, 4);
    let mut metadata = vec![0, be(image, 40, 8), be(image, 48, 8)];
    let l1 = be(image, 40, 8) as usize;
    for i in 0..be(image, 36, 4) as usize {
        out.push(f(l1 + 8 * i, 8, "L1 entry"));
        let l2 = (be(image, l1 + 8 * i, 8) & 0x00ff_ffff_ffff_fe00) as usize;
        if l2 != 0 {
            metadata.push(l2 as u64);
            for j in (0..cs / 8).step_by(3) {
                if be(image, l2 + 8 * j, 8) != 0 || j % 30 == 0 {
                    out.push(f(l2 + 8 * j, 8, "L2 entry"));
                }
            }
        }
    }
    let reftable = be(image, 48, 8) as usize;
    for i in 0..(be(image, 56, 4) as usize * cs / 8).min(64) {
        let block = be(image, reftable + 8 * i, 8) as usize;
        if block == 0 && i > 2 {
            continue;
        }
        out.push(f(reftable + 8 * i, 8, "refcount table entry"));
        if block != 0 {
            metadata.push(block as u64);
            for j in (0..cs / 2).step_by(7) {
                out.push(f(block + 2 * j, 2, "refcount block entry"));
            }
        }
    }
    (out, metadata)
}

/// Applies one structured mutation; returns what it did.
fn mutate(image: &mut Vec<u8>, fields: &[Field], metadata: &[u64], rng: &mut Rng) -> String {
    if rng.below(20) == 0 {
        let cut = rng.below(image.len() as u64) as usize;
        image.truncate(cut);
        return format!("truncated to {cut}");
    }
    let field = &fields[rng.below(fields.len() as u64) as usize];
    let old = be(image, field.offset, field.width);
    let len = image.len() as u64;
    let cs = 1u64 << be(image, 20, 4).min(21);
    let bits = field.width as u32 * 8;
    let value = match rng.below(16) {
        0 => 0,
        1 => u64::MAX,
        2 => old.wrapping_add(1),
        3 => old.wrapping_sub(1),
        4 => old ^ (1 << rng.below(u64::from(bits))),
        5 => len,
        6 => len + cs,
        7 => old.wrapping_add(8),
        8 => metadata[rng.below(metadata.len() as u64) as usize],
        9 => metadata[rng.below(metadata.len() as u64) as usize] | (1 << 63),
        10 => old | (1 << 62),
        11 => old | 1,
        12 => 1 << 55,
        13 => rng.below(64),
        14 => old & 0x00ff_ffff_ffff_fe00,
        _ => rng.next(),
    };
    let value = if bits < 64 {
        value & ((1 << bits) - 1)
    } else {
        value
    };
    put(image, field.offset, field.width, value);
    format!(
        "{} at {} from {old:#x} to {value:#x}",
        field.what, field.offset
    )
}

/// Everything a user of the library does with an image: nothing may
/// panic; errors are expected. Returns whether everything succeeded.
fn exercise(path: &Path, writable: bool, rng: &mut Rng) -> bool {
    if let Ok(file) = File::open(path) {
        let _ = read_header(&file);
    }
    let Ok(mut image) = Image::open(path, DiskFormat::Qcow2, writable) else {
        return false;
    };
    let size = image.size();
    let span = size.min(1 << 20);
    let mut buf = vec![0u8; 64 << 10];
    if writable {
        for _ in 0..8 {
            let len = 1 + rng.below(6000) as usize;
            if span <= len as u64 {
                break;
            }
            let offset = rng.below(span - len as u64);
            rng.fill(&mut buf[..len]);
            if image.write_at(&buf[..len], offset).is_err() {
                return false;
            }
        }
    }
    let mut offset = 0;
    while offset < span {
        let n = (span - offset).min(buf.len() as u64);
        if image.read_at(&mut buf[..n as usize], offset).is_err() {
            return false;
        }
        offset += n;
    }
    let mut offset = 0;
    while offset < span {
        match image.extent(offset, span - offset) {
            Ok((_, run)) if run > 0 => offset += run,
            _ => return false,
        }
    }
    for _ in 0..4 {
        if size > 4096
            && image
                .read_at(&mut buf[..4096], rng.below(size - 4096))
                .is_err()
        {
            return false;
        }
    }
    true
}

/// The valid images the mutations start from.
fn seeds(d: &TempDir) -> Vec<(&'static str, Vec<u8>)> {
    let dir = &d.0;
    // Ours: 512-byte clusters, scattered data, several L2 tables and
    // refcount blocks.
    let ours = d.path("ours.qcow2");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&ours);
    let mut image =
        Image::create(&ours, file.unwrap(), DiskFormat::Qcow2, 1 << 20, 9, None).unwrap();
    let mut rng = Rng::new(7);
    let mut data = vec![0u8; 1500];
    for _ in 0..60 {
        rng.fill(&mut data);
        image.write_at(&data, rng.below((1 << 20) - 1500)).unwrap();
    }
    drop(image);

    qemu(
        "qemu-img",
        &["create", "-q", "-f", "raw", "in.raw", "1M"],
        dir,
    );
    for (pattern, at) in [(1, "0"), (2, "200k"), (3, "700k")] {
        let cmd = format!("write -P {pattern} {at} 40k");
        qemu("qemu-io", &["-f", "raw", "-c", &cmd, "in.raw"], dir);
    }
    let convert = |opts: &[&str], out: &str| {
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        args.extend_from_slice(opts);
        args.extend_from_slice(&["in.raw", out]);
        qemu("qemu-img", &args, dir);
    };
    convert(&["-o", "compat=0.10,cluster_size=4096"], "v2.qcow2");
    convert(&["-c", "-o", "cluster_size=4096"], "compressed.qcow2");
    convert(&["-o", "cluster_size=4096"], "zero.qcow2");
    qemu(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -z 200k 8k", "zero.qcow2"],
        dir,
    );
    ["ours.qcow2", "v2.qcow2", "compressed.qcow2", "zero.qcow2"]
        .into_iter()
        .map(|name| (name, std::fs::read(d.path(name)).unwrap()))
        .collect()
}

#[test]
fn mutated_images_never_panic() {
    let d = TempDir::new("fuzz");
    let seeds = seeds(&d);
    let target = d.path("mutant.qcow2");
    // A fixed seed, so every run sees the same cases; QCOW2_FUZZ_SEED
    // explores others.
    let seed = std::env::var("QCOW2_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok());
    let mut rng = Rng::new(seed.unwrap_or(0x5eed));
    let (mut count, mut clean) = (0, 0);
    for (name, original) in &seeds {
        let (fields, metadata) = fields(original);
        assert!(fields.len() > 30, "{name}: too few fields found");
        for i in 0..MUTATIONS_PER_IMAGE {
            let mut image = original.clone();
            let rounds = 1 + rng.below(3);
            let what: Vec<String> = (0..rounds)
                .map(|_| mutate(&mut image, &fields, &metadata, &mut rng))
                .collect();
            std::fs::write(&target, &image).unwrap();
            let writable = i % 2 == 1;
            let seed = rng.next();
            let result = catch_unwind(AssertUnwindSafe(|| {
                exercise(&target, writable, &mut Rng::new(seed))
            }));
            match result {
                Ok(true) => clean += 1,
                Ok(false) => {}
                Err(_) => panic!("{name} mutation {i} ({what:?}, writable {writable}) panicked"),
            }
            let largest = LARGEST.load(Ordering::Relaxed);
            assert!(
                largest <= MAX_ALLOCATION,
                "{name} mutation {i} ({what:?}): allocation of {largest} bytes"
            );
            count += 1;
        }
    }
    let peak = PEAK.load(Ordering::Relaxed);
    assert!(peak <= MAX_PEAK, "peak of {peak} live bytes");
    assert!(count >= 3000, "only {count} variants");
    // Both outcomes must be common, or the mutations miss the point.
    eprintln!("{count} variants, {clean} without errors");
    assert!(
        clean > count / 20 && clean < count * 4 / 5,
        "{clean} of {count} without errors"
    );
}
