//! Descriptor chains, validated before a device touches them.
//!
//! virtio-queue's own chain iterator ends silently on a bad descriptor
//! (a failed read, a nested indirect table), so a device could not tell a
//! broken chain from a short one. [`Chain::walk`] reads the descriptors
//! itself, through vm-memory's checked accessors, and refuses: an index
//! outside the table, more than [`MAX_DESCRIPTORS`] descriptors (which
//! also ends every loop), an indirect table inside an indirect table or
//! with NEXT set or of a bad length, a buffer not wholly inside guest
//! memory, a readable buffer after a writable one, and more bytes than
//! the device allows. The result is a small list of (address, length)
//! pairs; the device then reads and writes them with checked accessors.

use super::Mem;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

/// Most descriptors in one chain, indirect ones included. Linux's block
/// driver uses seg_max + 2 ([`super::block::SEG_MAX`]); its net driver at
/// most MAX_SKB_FRAGS + 2.
pub const MAX_DESCRIPTORS: usize = 256;

const DESC_SIZE: u64 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("descriptor index {0} outside its table")]
    Index(u16),
    #[error("chain longer than {MAX_DESCRIPTORS} descriptors (or a loop)")]
    TooLong,
    #[error("descriptor table or buffer outside guest memory")]
    Memory,
    #[error("bad indirect descriptor")]
    Indirect,
    #[error("readable descriptor after a writable one")]
    Order,
    #[error("chain carries more bytes than the device accepts")]
    TooLarge,
}

/// One buffer of a chain, inside guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A validated chain: its head (for the used ring), the buffers the
/// device reads, then those it writes.
#[derive(Debug, Default)]
pub struct Chain {
    pub head: u16,
    pub readable: Vec<Segment>,
    pub writable: Vec<Segment>,
}

impl Chain {
    /// Walks the chain starting at `head` in the descriptor table at
    /// `table` of `queue_size` entries; at most `max_bytes` in all.
    pub fn walk(
        mem: &Mem,
        table: GuestAddress,
        queue_size: u16,
        head: u16,
        max_bytes: u64,
    ) -> Result<Chain, ChainError> {
        let mut chain = Chain {
            head,
            ..Chain::default()
        };
        let mut table = table;
        let mut table_len = u32::from(queue_size);
        let mut index = head;
        let mut indirect = false;
        let mut count = 0usize;
        let mut total = 0u64;
        loop {
            if u32::from(index) >= table_len {
                return Err(ChainError::Index(index));
            }
            count += 1;
            if count > MAX_DESCRIPTORS {
                return Err(ChainError::TooLong);
            }
            let at = table
                .checked_add(u64::from(index) * DESC_SIZE)
                .ok_or(ChainError::Memory)?;
            let desc: Descriptor = mem.read_obj(at).map_err(|_| ChainError::Memory)?;
            let flags = u32::from(desc.flags());
            if flags & VRING_DESC_F_INDIRECT != 0 {
                // 2.7.5.3.1: one level only, not chained, whole entries.
                let len = u64::from(desc.len());
                if indirect
                    || flags & VRING_DESC_F_NEXT != 0
                    || len == 0
                    || len % DESC_SIZE != 0
                    || len / DESC_SIZE > u64::from(u16::MAX)
                {
                    return Err(ChainError::Indirect);
                }
                if !mem.check_range(desc.addr(), len as usize, Permissions::Read) {
                    return Err(ChainError::Memory);
                }
                indirect = true;
                table = desc.addr();
                table_len = (len / DESC_SIZE) as u32;
                index = 0;
                continue;
            }
            let segment = Segment {
                addr: desc.addr(),
                len: desc.len(),
            };
            let write = flags & VRING_DESC_F_WRITE != 0;
            let access = if write {
                Permissions::Write
            } else {
                Permissions::Read
            };
            if !mem.check_range(segment.addr, segment.len as usize, access) {
                return Err(ChainError::Memory);
            }
            total += u64::from(segment.len);
            if total > max_bytes {
                return Err(ChainError::TooLarge);
            }
            if write {
                chain.writable.push(segment);
            } else if chain.writable.is_empty() {
                chain.readable.push(segment);
            } else {
                return Err(ChainError::Order);
            }
            if flags & VRING_DESC_F_NEXT == 0 {
                return Ok(chain);
            }
            index = desc.next();
        }
    }

    /// Bytes the device may write.
    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|s| u64::from(s.len)).sum()
    }

    /// Bytes the device may read.
    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|s| u64::from(s.len)).sum()
    }
}

/// A cursor over a list of segments: copies between them and host
/// buffers, in order, each copy through vm-memory's checked accessors.
pub struct Cursor<'a> {
    segments: &'a [Segment],
    index: usize,
    offset: u32,
}

impl<'a> Cursor<'a> {
    pub fn new(segments: &'a [Segment]) -> Cursor<'a> {
        Cursor {
            segments,
            index: 0,
            offset: 0,
        }
    }

    /// Bytes left.
    pub fn remaining(&self) -> u64 {
        let mut left: u64 = self
            .segments
            .iter()
            .skip(self.index)
            .map(|s| u64::from(s.len))
            .sum();
        left -= u64::from(self.offset).min(left);
        left
    }

    /// Fills `buf` from guest memory; returns how many bytes it copied
    /// (less than `buf.len()` at the end of the segments).
    pub fn read(&mut self, mem: &Mem, buf: &mut [u8]) -> Result<usize, ChainError> {
        self.each(buf.len(), |addr, range| {
            mem.read_slice(&mut buf[range], addr)
                .map_err(|_| ChainError::Memory)
        })
    }

    /// Copies `buf` into guest memory; returns how many bytes it copied.
    pub fn write(&mut self, mem: &Mem, buf: &[u8]) -> Result<usize, ChainError> {
        self.each(buf.len(), |addr, range| {
            mem.write_slice(&buf[range], addr)
                .map_err(|_| ChainError::Memory)
        })
    }

    fn each<F>(&mut self, want: usize, mut copy: F) -> Result<usize, ChainError>
    where
        F: FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), ChainError>,
    {
        let mut done = 0usize;
        while done < want {
            let Some(segment) = self.segments.get(self.index) else {
                break;
            };
            let left = (segment.len - self.offset) as usize;
            if left == 0 {
                self.index += 1;
                self.offset = 0;
                continue;
            }
            let n = left.min(want - done);
            let addr = segment
                .addr
                .checked_add(u64::from(self.offset))
                .ok_or(ChainError::Memory)?;
            copy(addr, done..done + n)?;
            done += n;
            self.offset += n as u32;
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::kvm::virtio::testdriver::{new_mem, MEM_SIZE};

    const TABLE: u64 = 0x1000;
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

    fn put(mem: &Mem, table: u64, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = Descriptor::new(addr, len, flags, next);
        mem.write_obj(d, GuestAddress(table + 16 * u64::from(index)))
            .unwrap();
    }

    fn walk(mem: &Mem, head: u16) -> Result<Chain, ChainError> {
        Chain::walk(mem, GuestAddress(TABLE), 16, head, 1 << 20)
    }

    #[test]
    fn virtio_chain_direct_and_indirect() {
        let mem = new_mem();
        put(&mem, TABLE, 0, 0x10000, 16, NEXT, 3);
        put(&mem, TABLE, 3, 0x20000, 512, NEXT | WRITE, 5);
        put(&mem, TABLE, 5, 0x30000, 1, WRITE, 0);
        let c = walk(&mem, 0).unwrap();
        assert_eq!(c.head, 0);
        assert_eq!(c.readable.len(), 1);
        assert_eq!(c.writable.len(), 2);
        assert_eq!((c.readable_len(), c.writable_len()), (16, 513));
        // An indirect table of two descriptors.
        let ind = 0x8000;
        put(&mem, ind, 0, 0x11000, 100, NEXT, 1);
        put(&mem, ind, 1, 0x12000, 200, WRITE, 0);
        put(&mem, TABLE, 7, ind, 32, INDIRECT, 0);
        let c = walk(&mem, 7).unwrap();
        assert_eq!((c.readable_len(), c.writable_len()), (100, 200));
    }

    #[test]
    fn virtio_chain_refuses_what_a_hostile_guest_makes() {
        let mem = new_mem();
        // A loop: 0 -> 1 -> 0.
        put(&mem, TABLE, 0, 0x10000, 1, NEXT, 1);
        put(&mem, TABLE, 1, 0x10000, 1, NEXT, 0);
        assert_eq!(walk(&mem, 0).unwrap_err(), ChainError::TooLong);
        // A self loop.
        put(&mem, TABLE, 2, 0x10000, 1, NEXT, 2);
        assert_eq!(walk(&mem, 2).unwrap_err(), ChainError::TooLong);
        // Next outside the table; a head outside it.
        put(&mem, TABLE, 3, 0x10000, 1, NEXT, 16);
        assert_eq!(walk(&mem, 3).unwrap_err(), ChainError::Index(16));
        assert_eq!(walk(&mem, 400).unwrap_err(), ChainError::Index(400));
        // A buffer past the end of guest memory, or wrapping around.
        put(&mem, TABLE, 4, MEM_SIZE as u64 - 10, 11, 0, 0);
        assert_eq!(walk(&mem, 4).unwrap_err(), ChainError::Memory);
        put(&mem, TABLE, 4, u64::MAX - 5, 100, 0, 0);
        assert_eq!(walk(&mem, 4).unwrap_err(), ChainError::Memory);
        put(&mem, TABLE, 4, MEM_SIZE as u64 - 10, 10, 0, 0);
        assert!(walk(&mem, 4).is_ok());
        // A readable buffer after a writable one.
        put(&mem, TABLE, 5, 0x10000, 1, WRITE | NEXT, 6);
        put(&mem, TABLE, 6, 0x10000, 1, 0, 0);
        assert_eq!(walk(&mem, 5).unwrap_err(), ChainError::Order);
        // More bytes than the device takes.
        put(&mem, TABLE, 7, 0x10000, (1 << 20) + 1, 0, 0);
        assert_eq!(walk(&mem, 7).unwrap_err(), ChainError::TooLarge);
        // Indirect tables: nested, chained, of a bad size, outside memory,
        // looping inside.
        let ind = 0x8000;
        put(&mem, ind, 0, ind, 16, INDIRECT, 0);
        put(&mem, TABLE, 8, ind, 16, INDIRECT, 0);
        assert_eq!(walk(&mem, 8).unwrap_err(), ChainError::Indirect);
        put(&mem, ind, 0, 0x10000, 1, 0, 0);
        put(&mem, TABLE, 8, ind, 16, INDIRECT | NEXT, 9);
        assert_eq!(walk(&mem, 8).unwrap_err(), ChainError::Indirect);
        put(&mem, TABLE, 8, ind, 24, INDIRECT, 0);
        assert_eq!(walk(&mem, 8).unwrap_err(), ChainError::Indirect);
        put(&mem, TABLE, 8, ind, 0, INDIRECT, 0);
        assert_eq!(walk(&mem, 8).unwrap_err(), ChainError::Indirect);
        put(&mem, TABLE, 8, MEM_SIZE as u64 - 16, 32, INDIRECT, 0);
        assert_eq!(walk(&mem, 8).unwrap_err(), ChainError::Memory);
        put(&mem, ind, 0, 0x10000, 1, NEXT, 0);
        put(&mem, TABLE, 8, ind, 0xfff0, INDIRECT, 0);
        assert_eq!(walk(&mem, 8).unwrap_err(), ChainError::TooLong);
        // A descriptor table outside guest memory.
        let far = Chain::walk(&mem, GuestAddress(u64::MAX - 20), 16, 1, 100);
        assert_eq!(far.unwrap_err(), ChainError::Memory);
    }

    #[test]
    fn virtio_chain_cursor_copies_across_segments() {
        let mem = new_mem();
        let segs = [
            Segment {
                addr: GuestAddress(0x1000),
                len: 3,
            },
            Segment {
                addr: GuestAddress(0x2000),
                len: 0,
            },
            Segment {
                addr: GuestAddress(0x3000),
                len: 5,
            },
        ];
        let mut c = Cursor::new(&segs);
        assert_eq!(c.remaining(), 8);
        assert_eq!(c.write(&mem, &[1, 2, 3, 4]).unwrap(), 4);
        assert_eq!(c.remaining(), 4);
        assert_eq!(c.write(&mem, &[5, 6, 7, 8, 9, 10]).unwrap(), 4);
        assert_eq!(c.remaining(), 0);
        let mut back = [0u8; 8];
        assert_eq!(Cursor::new(&segs).read(&mem, &mut back).unwrap(), 8);
        assert_eq!(back, [1, 2, 3, 4, 5, 6, 7, 8]);
    }
}
