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
        }
    }

    /// The image (tests read it back; the monitor may report its path).
    pub fn image(&self) -> &Image {
        &self.image
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
            match kind {
                VIRTIO_BLK_T_IN => self.read(mem, sector, &data_in),
                VIRTIO_BLK_T_OUT => (self.write(mem, sector, &mut readable), 0),
                VIRTIO_BLK_T_FLUSH => (self.flush(), 0),
                VIRTIO_BLK_T_GET_ID => self.get_id(mem, &data_in),
                VIRTIO_BLK_T_DISCARD => (self.discard(mem, &mut readable), 0),
                _ => (VIRTIO_BLK_S_UNSUPP as u8, 0),
            }
        };
        mem.write_obj(status, status_at).ok()?;
        Some(written + 1)
    }

    /// The byte range of `len` bytes at `sector`, if inside the disk and
    /// whole sectors.
    fn range(&self, sector: u64, len: u64) -> Option<u64> {
        let offset = sector.checked_mul(SECTOR)?;
        let end = offset.checked_add(len)?;
        (len % SECTOR == 0 && end <= self.image.size()).then_some(offset)
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
            || len % DISCARD_LEN as u64 != 0
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
