//! virtio-blk (virtio 1.x, 5.2) over a raw or qcow2 image and its
//! backing chain, through `common::image` (the one place that reads and
//! writes guest data): the layers arrive already open, as the parent
//! opened them (the top read-write unless the disk is read-only, every
//! backing file read-only).
//!
//! Requests: read, write, flush (fdatasync), get-id, and discard on a
//! writable raw image (the qcow2 library cannot free clusters). A
//! read-only disk offers VIRTIO_BLK_F_RO and answers writes and discards
//! with VIRTIO_BLK_S_IOERR, as QEMU does. A request outside the disk, not
//! a whole number of sectors, or malformed gets IOERR; an unknown type
//! UNSUPP; a chain that cannot carry a status byte is returned unused.
//!
//! Data moves through one bounce buffer of [`BOUNCE_BYTES`]: what the
//! monitor allocates does not depend on what the guest asks.

use super::chain::{Chain, Cursor, Segment};
use super::{ActivateError, Interrupt, Mem, VirtioDevice, TYPE_BLOCK};
use common::image::{Image, Layer};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

pub const SECTOR: u64 = 512;
/// The one queue's size.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request (the driver adds the header and status).
pub const SEG_MAX: u32 = 126;
/// Bytes per segment.
pub const SIZE_MAX: u32 = 1 << 20;
/// Largest request: every segment full, plus header and status.
pub const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64 + 4096;
/// Discard ranges per request, and sectors per range.
pub const MAX_DISCARD_SEG: u32 = 32;
pub const MAX_DISCARD_SECTORS: u32 = u32::MAX / SECTOR as u32;
/// The bounce buffer between guest memory and the image.
pub const BOUNCE_BYTES: usize = 64 << 10;
/// The configuration space (struct virtio_blk_config up to
/// write_zeroes_may_unmap and its padding).
pub const CONFIG_LEN: usize = 60;

const HEADER_LEN: usize = 16;
const DISCARD_LEN: usize = 16;

/// A disk's counters since the VM started, as `vmctl stats` shows them:
/// requests answered VIRTIO_BLK_S_OK and their data bytes. Shared with
/// the monitor thread, which reads them while the I/O thread serves.
#[derive(Debug, Default)]
pub struct DiskCounters {
    read_bytes: AtomicU64,
    written_bytes: AtomicU64,
    read_ops: AtomicU64,
    write_ops: AtomicU64,
}

impl DiskCounters {
    pub fn stats(&self) -> common::stats::DiskStats {
        common::stats::DiskStats {
            read_bytes: self.read_bytes.load(Ordering::Relaxed),
            written_bytes: self.written_bytes.load(Ordering::Relaxed),
            read_ops: self.read_ops.load(Ordering::Relaxed),
            write_ops: self.write_ops.load(Ordering::Relaxed),
        }
    }

    fn count(&self, ops: &AtomicU64, bytes: &AtomicU64, n: u64) {
        ops.fetch_add(1, Ordering::Relaxed);
        bytes.fetch_add(n, Ordering::Relaxed);
    }
}

struct Active {
    mem: Mem,
    interrupt: Arc<Interrupt>,
    queue: Queue,
}

/// A virtio block device.
pub struct Block {
    image: Image,
    read_only: bool,
    discard: bool,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    config: [u8; CONFIG_LEN],
    acked: u64,
    active: Option<Active>,
    bounce: Vec<u8>,
    /// Host I/O errors so far (each is also logged, the first few).
    pub io_errors: u64,
    /// Requests answered VIRTIO_BLK_S_OK.
    pub served: u64,
    counters: Arc<DiskCounters>,
}

impl Block {
    /// A disk over `layers` (top first, as `common::image::open_chain`
    /// returns them); `read_only` if the top was opened read-only. `id`
    /// is what get-id answers (at most 20 bytes are used).
    pub fn new(layers: Vec<Layer>, read_only: bool, id: &str) -> Result<Block, String> {
        let image = Image::from_layers(layers, !read_only).map_err(|e| e.to_string())?;
        Ok(Block::from_image(image, read_only, id))
    }

    /// A disk over an image already built.
    pub fn from_image(image: Image, read_only: bool, id: &str) -> Block {
        let discard = !read_only && image.format() == common::disk::DiskFormat::Raw;
        let mut ident = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        for (dst, src) in ident.iter_mut().zip(id.bytes()) {
            *dst = src;
        }
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&(image.size() / SECTOR).to_le_bytes());
        config[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config[34..36].copy_from_slice(&1u16.to_le_bytes()); // num_queues
        if discard {
            config[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
            config[40..44].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
            config[44..48].copy_from_slice(&1u32.to_le_bytes());
        }
        Block {
            image,
            read_only,
            discard,
            id: ident,
            config,
            acked: 0,
            active: None,
            bounce: vec![0; BOUNCE_BYTES],
            io_errors: 0,
            served: 0,
            counters: Arc::default(),
        }
    }

    /// The counters `vmctl stats` reads (the monitor keeps a clone).
    pub fn counters(&self) -> Arc<DiskCounters> {
        self.counters.clone()
    }

    /// The image (tests read it back; the monitor may report its path).
    pub fn image(&self) -> &Image {
        &self.image
    }

    /// The bounce buffer's size (tests: it never grows).
    #[cfg(test)]
    pub fn bounce_len(&self) -> usize {
        self.bounce.len()
    }

    fn host_error(&mut self, what: &str, e: impl std::fmt::Display) -> u8 {
        self.io_errors += 1;
        if self.io_errors <= 10 {
            crate::log::log_warn!("virtio-blk: {what}: {e}");
        }
        VIRTIO_BLK_S_IOERR as u8
    }

    /// Runs one validated request; returns the bytes written into the
    /// chain's writable part (status included), or None if it has no
    /// room for a status byte.
    fn request(&mut self, mem: &Mem, chain: &Chain) -> Option<u32> {
        let (data_in, status_at) = split_status(&chain.writable)?;
        let mut readable = Cursor::new(&chain.readable);
        let mut header = [0u8; HEADER_LEN];
        let (status, written) = if readable.read(mem, &mut header).ok()? != HEADER_LEN {
            (VIRTIO_BLK_S_IOERR as u8, 0)
        } else {
            let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
            let mut sector = [0u8; 8];
            sector.copy_from_slice(&header[8..16]);
            let sector = u64::from_le_bytes(sector);
            let c = self.counters.clone();
            match kind {
                VIRTIO_BLK_T_IN => {
                    let (status, n) = self.read(mem, sector, &data_in);
                    if status == VIRTIO_BLK_S_OK as u8 {
                        c.count(&c.read_ops, &c.read_bytes, n.into());
                    }
                    (status, n)
                }
                VIRTIO_BLK_T_OUT => {
                    let n = readable.remaining();
                    let status = self.write(mem, sector, &mut readable);
                    if status == VIRTIO_BLK_S_OK as u8 {
                        c.count(&c.write_ops, &c.written_bytes, n);
                    }
                    (status, 0)
                }
                VIRTIO_BLK_T_FLUSH => (self.flush(), 0),
                VIRTIO_BLK_T_GET_ID => self.get_id(mem, &data_in),
                VIRTIO_BLK_T_DISCARD => (self.discard(mem, &mut readable), 0),
                _ => (VIRTIO_BLK_S_UNSUPP as u8, 0),
            }
        };
        mem.write_obj(status, status_at).ok()?;
        if status == VIRTIO_BLK_S_OK as u8 {
            self.served += 1;
        }
        Some(written + 1)
    }

    /// The byte range of `len` bytes at `sector`, if inside the disk and
    /// whole sectors.
    fn range(&self, sector: u64, len: u64) -> Option<u64> {
        let offset = sector.checked_mul(SECTOR)?;
        let end = offset.checked_add(len)?;
        (len.is_multiple_of(SECTOR) && end <= self.image.size()).then_some(offset)
    }

    fn read(&mut self, mem: &Mem, sector: u64, data: &[Segment]) -> (u8, u32) {
        let len: u64 = data.iter().map(|s| u64::from(s.len)).sum();
        let Some(mut offset) = self.range(sector, len) else {
            return (VIRTIO_BLK_S_IOERR as u8, 0);
        };
        let mut out = Cursor::new(data);
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(BOUNCE_BYTES as u64) as usize;
            let mut buf = std::mem::take(&mut self.bounce);
            let result = self.image.read_at(&mut buf[..n], offset);
            let copied = result.as_ref().ok().map(|_| out.write(mem, &buf[..n]));
            self.bounce = buf;
            match (result, copied) {
                (Err(e), _) => return (self.host_error("read", e), done as u32),
                (Ok(()), Some(Ok(c))) if c == n => {}
                _ => return (VIRTIO_BLK_S_IOERR as u8, done as u32),
            }
            done += n as u64;
            offset += n as u64;
        }
        // len <= MAX_REQUEST_BYTES < 4 GiB.
        (VIRTIO_BLK_S_OK as u8, done as u32)
    }

    fn write(&mut self, mem: &Mem, sector: u64, data: &mut Cursor) -> u8 {
        if self.read_only {
            return VIRTIO_BLK_S_IOERR as u8;
        }
        let len = data.remaining();
        let Some(mut offset) = self.range(sector, len) else {
            return VIRTIO_BLK_S_IOERR as u8;
        };
        let mut left = len;
        while left > 0 {
            let n = left.min(BOUNCE_BYTES as u64) as usize;
            let mut buf = std::mem::take(&mut self.bounce);
            let got = data.read(mem, &mut buf[..n]);
            let result = match got {
                Ok(c) if c == n => Some(self.image.write_at(&buf[..n], offset)),
                _ => None,
            };
            self.bounce = buf;
            match result {
                Some(Ok(())) => {}
                Some(Err(e)) => return self.host_error("write", e),
                None => return VIRTIO_BLK_S_IOERR as u8,
            }
            left -= n as u64;
            offset += n as u64;
        }
        VIRTIO_BLK_S_OK as u8
    }

    fn flush(&mut self) -> u8 {
        match self.image.flush() {
            Ok(()) => VIRTIO_BLK_S_OK as u8,
            Err(e) => self.host_error("flush", e),
        }
    }

    fn get_id(&mut self, mem: &Mem, data: &[Segment]) -> (u8, u32) {
        let mut out = Cursor::new(data);
        let n = (out.remaining() as usize).min(self.id.len());
        match out.write(mem, &self.id[..n]) {
            Ok(c) => (VIRTIO_BLK_S_OK as u8, c as u32),
            Err(_) => (VIRTIO_BLK_S_IOERR as u8, 0),
        }
    }

    fn discard(&mut self, mem: &Mem, data: &mut Cursor) -> u8 {
        if self.read_only {
            return VIRTIO_BLK_S_IOERR as u8;
        }
        if !self.discard {
            return VIRTIO_BLK_S_UNSUPP as u8;
        }
        let len = data.remaining();
        if len == 0
            || !len.is_multiple_of(DISCARD_LEN as u64)
            || len / DISCARD_LEN as u64 > MAX_DISCARD_SEG as u64
        {
            return VIRTIO_BLK_S_IOERR as u8;
        }
        for _ in 0..len / DISCARD_LEN as u64 {
            let mut seg = [0u8; DISCARD_LEN];
            if data.read(mem, &mut seg) != Ok(DISCARD_LEN) {
                return VIRTIO_BLK_S_IOERR as u8;
            }
            let mut sector = [0u8; 8];
            sector.copy_from_slice(&seg[0..8]);
            let sector = u64::from_le_bytes(sector);
            let sectors = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
            let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
            if flags != 0 {
                return VIRTIO_BLK_S_UNSUPP as u8;
            }
            let bytes = u64::from(sectors) * SECTOR;
            let Some(offset) = self.range(sector, bytes) else {
                return VIRTIO_BLK_S_IOERR as u8;
            };
            if let Err(e) = self.image.discard(offset, bytes) {
                return self.host_error("discard", e);
            }
        }
        VIRTIO_BLK_S_OK as u8
    }
}

/// The writable segments without the last byte, and that byte's address
/// (the status); None if there is no writable byte.
fn split_status(writable: &[Segment]) -> Option<(Vec<Segment>, GuestAddress)> {
    let last = writable.iter().rposition(|s| s.len > 0)?;
    let mut data = writable[..=last].to_vec();
    let segment = &mut data[last];
    segment.len -= 1;
    let status_at = segment.addr.0.checked_add(u64::from(segment.len))?;
    Some((data, GuestAddress(status_at)))
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f =
            (1 << VIRTIO_BLK_F_SEG_MAX) | (1 << VIRTIO_BLK_F_SIZE_MAX) | (1 << VIRTIO_BLK_F_FLUSH);
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        if self.discard {
            f |= 1 << VIRTIO_BLK_F_DISCARD;
        }
        f | super::COMMON_FEATURES
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked = features & self.features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Nothing is writable: writeback (CONFIG_WCE) is not offered.
    }

    fn activate(
        &mut self,
        mem: Mem,
        interrupt: Arc<Interrupt>,
        mut queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        if queues.len() != 1 {
            return Err(ActivateError::Queues {
                got: queues.len(),
                want: 1,
            });
        }
        let queue = queues.remove(0);
        self.active = Some(Active {
            mem,
            interrupt,
            queue,
        });
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn process_queue(&mut self, index: usize) {
        if index != 0 {
            return;
        }
        let Some(mut active) = self.active.take() else {
            return;
        };
        let mut used = false;
        let mem = active.mem.clone();
        while let Some(desc) = active.queue.pop_descriptor_chain(&mem) {
            let head = desc.head_index();
            let table = GuestAddress(active.queue.desc_table());
            let len = match Chain::walk(&mem, table, active.queue.size(), head, MAX_REQUEST_BYTES) {
                Ok(chain) => self.request(&mem, &chain).unwrap_or(0),
                Err(_) => 0,
            };
            used |= super::complete(&mut active.queue, &mem, head, len);
        }
        if used {
            super::notify(&mut active.queue, &mem, &active.interrupt);
        }
        self.active = Some(active);
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked = 0;
    }
}

/// Copies the configuration space bytes at `offset` into `data`; what
/// lies beyond it reads as zeros.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = (config.len() - start).min(data.len());
    data[..n].copy_from_slice(&config[start..start + n]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::kvm::virtio::testdriver::{qcow2_overlay, run, Driver, TempDir};
    use common::disk::DiskFormat;
    use common::image::{open_chain, open_file};
    use std::path::Path;
    use std::sync::Mutex;

    const ALL: u64 = u64::MAX;

    fn device(path: &Path, format: DiskFormat, read_only: bool) -> Arc<Mutex<Block>> {
        let layers = open_chain(path, format, !read_only, |p, _, w| open_file(p, w)).unwrap();
        Arc::new(Mutex::new(
            Block::new(layers, read_only, "vmd-disk-0").unwrap(),
        ))
    }

    fn driver(dev: &Arc<Mutex<Block>>) -> Driver {
        let mut d = Driver::new(dev.clone());
        d.init(ALL, 128);
        d
    }

    /// One request as Linux's virtio_blk builds it: header, data buffers
    /// (`data`: bytes to write, or `in_len` bytes to read), status.
    /// Returns the status, the used length and what was read.
    fn request(
        d: &mut Driver,
        kind: u32,
        sector: u64,
        data: &[u8],
        in_len: usize,
    ) -> (u8, u32, Vec<u8>) {
        let header = d.alloc(16, 16);
        let mut raw = [0u8; 16];
        raw[0..4].copy_from_slice(&kind.to_le_bytes());
        raw[8..16].copy_from_slice(&sector.to_le_bytes());
        d.write_mem(header, &raw);
        let mut chain = vec![(header, 16u32, false)];
        // Data in 4 KiB segments, as pages.
        let len = data.len().max(in_len);
        let buf = d.alloc(len.max(1) as u64, 4096);
        if !data.is_empty() {
            d.write_mem(buf, data);
        }
        for off in (0..len).step_by(4096) {
            let n = (len - off).min(4096) as u32;
            chain.push((buf + off as u64, n, in_len > 0));
        }
        let status = d.alloc(1, 1);
        d.write_mem(status, &[0xff]);
        chain.push((status, 1, true));
        let head = d.add(0, &chain);
        d.kick(0);
        assert!(d.take_interrupt(), "no interrupt for the request");
        let (id, used_len) = d.used(0).expect("request completed");
        assert_eq!(id, u32::from(head));
        (d.read_mem(status, 1)[0], used_len, d.read_mem(buf, in_len))
    }

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| seed.wrapping_add((i / 512) as u8) ^ (i as u8))
            .collect()
    }

    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

    #[test]
    fn virtio_blk_raw_read_write_flush_id_discard() {
        let dir = TempDir::new("raw");
        let path = dir.join("disk.raw");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(4 << 20)
            .unwrap();
        let dev = device(&path, DiskFormat::Raw, false);
        let mut d = driver(&dev);
        let features = d.features;
        assert_ne!(features & (1 << VIRTIO_BLK_F_FLUSH), 0);
        assert_ne!(features & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(features & (1 << VIRTIO_BLK_F_RO), 0);
        // capacity in sectors, seg_max, discard limits.
        assert_eq!(d.config(0, 8), (8192u64).to_le_bytes());
        assert_eq!(d.config(12, 4), SEG_MAX.to_le_bytes());
        assert_eq!(d.config(40, 4), MAX_DISCARD_SEG.to_le_bytes());

        let data = pattern(7, 3 * 4096 + 512);
        let (s, len, _) = request(&mut d, VIRTIO_BLK_T_OUT, 9, &data, 0);
        assert_eq!((s, len), (OK, 1));
        let (s, len, back) = request(&mut d, VIRTIO_BLK_T_IN, 9, &[], data.len());
        assert_eq!((s, len as usize), (OK, data.len() + 1));
        assert_eq!(back, data);
        let (s, _, _) = request(&mut d, VIRTIO_BLK_T_FLUSH, 0, &[], 0);
        assert_eq!(s, OK);
        let (s, len, id) = request(&mut d, VIRTIO_BLK_T_GET_ID, 0, &[], 20);
        assert_eq!((s, len), (OK, 21));
        assert_eq!(&id[..10], b"vmd-disk-0");
        assert!(id[10..].iter().all(|&b| b == 0));
        // vmctl stats: the read and the write, with their data bytes;
        // flush and get-id count as neither.
        let stats = dev.lock().unwrap().counters().stats();
        let n = data.len() as u64;
        assert_eq!(
            (
                stats.read_ops,
                stats.read_bytes,
                stats.write_ops,
                stats.written_bytes
            ),
            (1, n, 1, n)
        );

        // What the device wrote is in the file, as qemu-io reads it.
        let file = std::fs::read(&path).unwrap();
        assert_eq!(&file[9 * 512..9 * 512 + data.len()], &data[..]);
        let p = path.to_str().unwrap();
        run("qemu-io", &["-f", "raw", "-c", "read -P 0 0 4608", p]);

        // Out of range, partial sectors, unknown types.
        let (s, _, _) = request(&mut d, VIRTIO_BLK_T_IN, 8192, &[], 512);
        assert_eq!(s, IOERR);
        let (s, _, _) = request(&mut d, VIRTIO_BLK_T_IN, 8191, &[], 1024);
        assert_eq!(s, IOERR);
        let (s, _, _) = request(&mut d, VIRTIO_BLK_T_OUT, 0, &[1; 100], 0);
        assert_eq!(s, IOERR);
        let (s, _, _) = request(&mut d, VIRTIO_BLK_T_IN, u64::MAX, &[], 512);
        assert_eq!(s, IOERR);
        let (s, _, _) = request(&mut d, 99, 0, &[], 0);
        assert_eq!(s, UNSUPP);

        // Discard: sectors 9.. read as zeros, the blocks are freed.
        let mut seg = [0u8; 16];
        seg[0..8].copy_from_slice(&8u64.to_le_bytes());
        seg[8..12].copy_from_slice(&256u32.to_le_bytes());
        let blocks_before = std::fs::metadata(&path).map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.blocks()
        });
        let (s, _, _) = request(&mut d, VIRTIO_BLK_T_DISCARD, 0, &seg, 0);
        assert_eq!(s, OK);
        let (s, _, back) = request(&mut d, VIRTIO_BLK_T_IN, 9, &[], data.len());
        assert_eq!(s, OK);
        assert!(back.iter().all(|&b| b == 0));
        let blocks_after = std::fs::metadata(&path).map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.blocks()
        });
        assert!(blocks_after.unwrap() < blocks_before.unwrap());
        // A discard with flags, or past the end, is refused.
        seg[12] = 1;
        assert_eq!(request(&mut d, VIRTIO_BLK_T_DISCARD, 0, &seg, 0).0, UNSUPP);
        seg[12] = 0;
        seg[0..8].copy_from_slice(&8190u64.to_le_bytes());
        assert_eq!(request(&mut d, VIRTIO_BLK_T_DISCARD, 0, &seg, 0).0, IOERR);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 << 20);
        assert_eq!(dev.lock().unwrap().io_errors, 0);
    }

    #[test]
    fn virtio_blk_read_only_refuses_writes() {
        let dir = TempDir::new("ro");
        let path = dir.join("disk.raw");
        std::fs::write(&path, pattern(3, 1 << 20)).unwrap();
        let dev = device(&path, DiskFormat::Raw, true);
        let mut d = driver(&dev);
        assert_ne!(d.features & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(d.features & (1 << VIRTIO_BLK_F_DISCARD), 0);
        let (s, _, back) = request(&mut d, VIRTIO_BLK_T_IN, 0, &[], 8192);
        assert_eq!(s, OK);
        assert_eq!(back, pattern(3, 8192));
        let (s, _, _) = request(&mut d, VIRTIO_BLK_T_OUT, 0, &[0; 512], 0);
        assert_eq!(s, IOERR);
        let seg = [0u8; 16];
        assert_eq!(request(&mut d, VIRTIO_BLK_T_DISCARD, 0, &seg, 0).0, IOERR);
        assert_eq!(request(&mut d, VIRTIO_BLK_T_FLUSH, 0, &[], 0).0, OK);
        assert_eq!(std::fs::read(&path).unwrap(), pattern(3, 1 << 20));

        // A read-only qcow2 overlay over that raw file: reads go through,
        // writes are refused, the files stay as they were.
        let top = dir.join("top.qcow2");
        let t = top.to_str().unwrap();
        run(
            "qemu-img",
            &[
                "create", "-q", "-f", "qcow2", "-b", "disk.raw", "-F", "raw", t,
            ],
        );
        let before = std::fs::read(&top).unwrap();
        let dev = device(&top, DiskFormat::Qcow2, true);
        let mut d = driver(&dev);
        assert_ne!(d.features & (1 << VIRTIO_BLK_F_RO), 0);
        let (s, _, back) = request(&mut d, VIRTIO_BLK_T_IN, 16, &[], 4096);
        assert_eq!(s, OK);
        assert_eq!(back, pattern(3, 16 * 512 + 4096)[16 * 512..]);
        assert_eq!(request(&mut d, VIRTIO_BLK_T_OUT, 0, &[9; 512], 0).0, IOERR);
        drop(d);
        drop(dev);
        assert_eq!(std::fs::read(&top).unwrap(), before);
        assert_eq!(std::fs::read(&path).unwrap(), pattern(3, 1 << 20));
    }

    /// The monitor's arrangement with real threads: an I/O thread waits
    /// (epoll) on the queue's notification EventFd and runs the device;
    /// the "vCPU" (this thread) writes QueueNotify and waits for the
    /// interrupt's EventFd, then reads the used ring.
    #[test]
    fn virtio_blk_driven_from_an_io_thread() {
        use mio::unix::SourceFd;
        use mio::{Events, Interest, Poll, Token};
        use std::os::fd::AsRawFd;
        let dir = TempDir::new("thread");
        let path = dir.join("disk.raw");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let dev = device(&path, DiskFormat::Raw, false);
        let mut d = driver(&dev);
        let notify = d.transport.queue_events()[0].try_clone().unwrap();
        let stop = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        let stop_io = stop.try_clone().unwrap();
        let io_dev = dev.clone();
        let io = std::thread::spawn(move || {
            let mut poll = Poll::new().unwrap();
            let fd = notify.as_raw_fd();
            poll.registry()
                .register(&mut SourceFd(&fd), Token(0), Interest::READABLE)
                .unwrap();
            let sfd = stop_io.as_raw_fd();
            poll.registry()
                .register(&mut SourceFd(&sfd), Token(1), Interest::READABLE)
                .unwrap();
            let mut events = Events::with_capacity(4);
            loop {
                poll.poll(&mut events, None).unwrap();
                for e in events.iter() {
                    if e.token() == Token(1) {
                        return;
                    }
                    while notify.read().is_ok() {
                        io_dev.lock().unwrap().process_queue(0);
                    }
                }
            }
        });
        let irq = d.transport.interrupt().event().as_raw_fd();
        for round in 0..50u64 {
            // Eight writes at once, then eight reads of them back.
            for kind in [VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_IN] {
                let mut pending = Vec::new();
                for i in 0..8u64 {
                    let sector = (round * 8 + i) % 2048;
                    let header = d.alloc(16, 16);
                    let mut raw = [0u8; 16];
                    raw[0..4].copy_from_slice(&kind.to_le_bytes());
                    raw[8..16].copy_from_slice(&sector.to_le_bytes());
                    d.write_mem(header, &raw);
                    let buf = d.alloc(512, 512);
                    if kind == VIRTIO_BLK_T_OUT {
                        d.write_mem(buf, &[(round * 8 + i) as u8; 512]);
                    }
                    let status = d.alloc(1, 1);
                    let write = kind == VIRTIO_BLK_T_IN;
                    let head = d.add(
                        0,
                        &[(header, 16, false), (buf, 512, write), (status, 1, true)],
                    );
                    pending.push((head, buf, status, (round * 8 + i) as u8));
                }
                d.w32(crate::vm::kvm::virtio::mmio::QUEUE_NOTIFY, 0);
                let mut done = 0;
                while done < pending.len() {
                    // SAFETY: the transport owns this EventFd for the
                    // whole test.
                    let bfd = unsafe { std::os::fd::BorrowedFd::borrow_raw(irq) };
                    let mut fds = [nix::poll::PollFd::new(bfd, nix::poll::PollFlags::POLLIN)];
                    let n = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(10_000u16));
                    assert_eq!(n, Ok(1), "no interrupt within 10 s");
                    // As Linux: a late edge may find the status acked
                    // already (a spurious interrupt), so no assertion.
                    d.take_interrupt();
                    while d.used(0).is_some() {
                        done += 1;
                    }
                }
                for (_, buf, status, value) in pending {
                    assert_eq!(d.read_mem(status, 1)[0], OK);
                    if kind == VIRTIO_BLK_T_IN {
                        assert_eq!(d.read_mem(buf, 512), vec![value; 512]);
                    }
                }
            }
        }
        stop.write(1).unwrap();
        io.join().unwrap();
    }

    #[test]
    fn virtio_blk_qcow2_overlay_over_qcow2_base() {
        let dir = TempDir::new("qcow2");
        let base = dir.join("base.qcow2");
        let top = dir.join("top.qcow2");
        let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
        run("qemu-img", &["create", "-q", "-f", "qcow2", b, "16M"]);
        run("qemu-io", &["-f", "qcow2", "-c", "write -P 0x11 0 2M", b]);
        qcow2_overlay(t);
        let dev = device(&top, DiskFormat::Qcow2, false);
        let mut d = driver(&dev);
        assert_eq!(d.features & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(d.config(0, 8), (32768u64).to_le_bytes());
        // The base shows through.
        let (s, _, back) = request(&mut d, VIRTIO_BLK_T_IN, 100, &[], 8192);
        assert_eq!(s, OK);
        assert!(back.iter().all(|&b| b == 0x11));
        // Writes inside a base cluster (a partial one: the rest comes
        // from the base), across clusters, and past the base's data.
        let a = vec![0x22u8; 8192];
        assert_eq!(request(&mut d, VIRTIO_BLK_T_OUT, 101, &a, 0).0, OK);
        let big = vec![0x33u8; 200 * 1024];
        assert_eq!(request(&mut d, VIRTIO_BLK_T_OUT, 4000, &big, 0).0, OK);
        let c = vec![0x44u8; 4096];
        assert_eq!(request(&mut d, VIRTIO_BLK_T_OUT, 20000, &c, 0).0, OK);
        assert_eq!(request(&mut d, VIRTIO_BLK_T_FLUSH, 0, &[], 0).0, OK);
        let (s, _, back) = request(&mut d, VIRTIO_BLK_T_IN, 100, &[], 512 * 18);
        assert_eq!(s, OK);
        assert!(back[..512].iter().all(|&b| b == 0x11));
        assert!(back[512..512 * 17].iter().all(|&b| b == 0x22));
        assert!(back[512 * 17..].iter().all(|&b| b == 0x11));
        // Discard is refused on qcow2.
        assert_eq!(
            request(&mut d, VIRTIO_BLK_T_DISCARD, 0, &[0; 16], 0).0,
            UNSUPP
        );
        drop(d);
        drop(dev);

        // QEMU agrees: the image is clean and holds what was written; the
        // base is untouched.
        let check = run("qemu-img", &["check", t]);
        assert!(check.contains("No errors were found"), "{check}");
        let check = run("qemu-img", &["check", b]);
        assert!(check.contains("No errors were found"), "{check}");
        for cmd in [
            "read -P 0x11 0 51200",
            "read -P 0x22 51712 8192",
            "read -P 0x11 59904 1988096",
            "read -P 0x33 2048000 204800",
            "read -P 0x44 10240000 4096",
            "read -P 0 10244096 4096",
        ] {
            let out = run("qemu-io", &["-f", "qcow2", "-c", cmd, t]);
            assert!(!out.contains("Pattern verification failed"), "{cmd}: {out}");
        }
        let out = run("qemu-io", &["-f", "qcow2", "-c", "read -P 0x11 0 2M", b]);
        assert!(!out.contains("Pattern verification failed"), "{out}");
        let out = run("qemu-io", &["-f", "qcow2", "-c", "read -P 0 2M 14M", b]);
        assert!(!out.contains("Pattern verification failed"), "{out}");
    }
}
