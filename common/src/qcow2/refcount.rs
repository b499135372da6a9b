//! Refcounts: how many references each host cluster has. Loaded only
//! when an image is opened for writing. New clusters are allocated at the
//! end of the file; refcount blocks and a larger refcount table are
//! allocated as the file grows, so the counts stay exact.

use super::header::{check_region, read_exact_at, OFF_REFTABLE};
use super::table::Qcow2;
use super::{corrupt, Error, Result, MAX_REFTABLE_BYTES};
use std::os::unix::fs::FileExt;

/// Bits 0-8 of a refcount table entry are reserved.
const REFTABLE_RESERVED: u64 = 0x1ff;

pub(super) struct Refcounts {
    /// Offsets of the refcount blocks; 0 where none is allocated.
    table: Vec<u64>,
    /// The last refcount block used, by table index (written through).
    block: Option<(usize, Vec<u8>)>,
}

impl Refcounts {
    /// Reads and checks the refcount table of an open image.
    pub(super) fn load(q: &Qcow2) -> Result<Refcounts> {
        let h = &q.header;
        let cs = q.cluster_size;
        let mut raw = vec![0u8; (u64::from(h.refcount_table_clusters) * cs) as usize];
        read_exact_at(&q.file, &mut raw, h.refcount_table_offset)?;
        let mut table = Vec::with_capacity(raw.len() / 8);
        for (i, chunk) in raw.chunks_exact(8).enumerate() {
            let entry = super::header::be64(chunk, 0);
            if entry & REFTABLE_RESERVED != 0 {
                return corrupt(format!("refcount table entry {i} has reserved bits set"));
            }
            if entry != 0 {
                check_region("refcount block", entry, cs, cs, q.file_len)?;
                if entry < cs {
                    return corrupt("refcount block overlaps the header");
                }
            }
            table.push(entry);
        }
        Ok(Refcounts { table, block: None })
    }
}

impl Qcow2 {
    fn refcount_bits(&self) -> u64 {
        1 << self.header.refcount_order
    }

    fn refcounts_per_block(&self) -> u64 {
        self.cluster_size * 8 / self.refcount_bits()
    }

    fn refcounts(&mut self) -> Result<&mut Refcounts> {
        self.refcounts.as_mut().ok_or(Error::ReadOnly)
    }

    /// Allocates `n` clusters at the end of the file with refcount one and
    /// returns the offset of the first. The caller writes their content.
    pub(super) fn alloc_clusters(&mut self, n: u64) -> Result<u64> {
        let offset = self.file_end;
        self.file_end += n * self.cluster_size;
        for i in 0..n {
            self.set_refcount(offset / self.cluster_size + i, 1)?;
        }
        Ok(offset)
    }

    pub(super) fn decrement_refcount(&mut self, cluster: u64) -> Result<()> {
        match self.refcount(cluster)? {
            0 => corrupt(format!(
                "refcount of cluster at offset {} is already zero",
                cluster * self.cluster_size
            )),
            n => self.set_refcount(cluster, n - 1),
        }
    }

    pub(super) fn refcount(&mut self, cluster: u64) -> Result<u64> {
        let per_block = self.refcounts_per_block();
        let index = (cluster / per_block) as usize;
        let allocated = self.refcounts()?.table.get(index).is_some_and(|&o| o != 0);
        if !allocated {
            return Ok(0);
        }
        self.load_block(index)?;
        let bits = self.refcount_bits();
        let block = self.cached_block()?;
        Ok(get_entry(block, cluster % per_block, bits))
    }

    fn set_refcount(&mut self, cluster: u64, value: u64) -> Result<()> {
        let bits = self.refcount_bits();
        if bits < 64 && value >= 1 << bits {
            return corrupt(format!("refcount overflow for cluster {cluster}"));
        }
        let per_block = self.refcounts_per_block();
        let index = (cluster / per_block) as usize;
        if index >= self.refcounts()?.table.len() {
            self.grow_table(index)?;
        }
        if self.refcounts()?.table[index] == 0 {
            self.alloc_block(index)?;
        }
        self.load_block(index)?;
        let block_offset = self.refcounts()?.table[index];
        let i = cluster % per_block;
        let block = match &mut self.refcounts()?.block {
            Some((_, block)) => block,
            None => return corrupt("refcount block not loaded"),
        };
        set_entry(block, i, bits, value);
        // Write back the bytes that hold the entry.
        let (start, len) = if bits >= 8 {
            ((i * bits / 8) as usize, (bits / 8) as usize)
        } else {
            ((i * bits / 8) as usize, 1)
        };
        let bytes = block[start..start + len].to_vec();
        self.file
            .write_all_at(&bytes, block_offset + start as u64)?;
        Ok(())
    }

    fn cached_block(&mut self) -> Result<&[u8]> {
        match &self.refcounts()?.block {
            Some((_, block)) => Ok(block),
            None => corrupt("refcount block not loaded"),
        }
    }

    fn load_block(&mut self, index: usize) -> Result<()> {
        if matches!(self.refcounts()?.block, Some((i, _)) if i == index) {
            return Ok(());
        }
        let offset = self.refcounts()?.table[index];
        let mut block = match self.refcounts()?.block.take() {
            Some((_, v)) => v,
            None => vec![0u8; self.cluster_size as usize],
        };
        read_exact_at(&self.file, &mut block, offset)?;
        self.refcounts()?.block = Some((index, block));
        Ok(())
    }

    /// Allocates refcount block `index` at the end of the file; the block
    /// counts its own cluster (in itself or in another block).
    fn alloc_block(&mut self, index: usize) -> Result<()> {
        let offset = self.file_end;
        self.file_end += self.cluster_size;
        self.write_cluster_at(offset, &vec![0u8; self.cluster_size as usize])?;
        let table_offset = self.header.refcount_table_offset;
        self.file
            .write_all_at(&offset.to_be_bytes(), table_offset + index as u64 * 8)?;
        self.refcounts()?.table[index] = offset;
        self.set_refcount(offset / self.cluster_size, 1)
    }

    /// Moves the refcount table to a larger one at the end of the file that
    /// has an entry `index`, and frees the old one.
    fn grow_table(&mut self, index: usize) -> Result<()> {
        let cs = self.cluster_size;
        let per_cluster = cs / 8;
        let per_block = self.refcounts_per_block();
        let old_offset = self.header.refcount_table_offset;
        let old_clusters = u64::from(self.header.refcount_table_clusters);
        let new_offset = self.file_end;
        let mut clusters = (old_clusters * 2).max(1);
        loop {
            // Room for the blocks that will count the new table itself.
            let end = new_offset / cs + clusters + 2;
            let entries = (index as u64 + 1).max(end.div_ceil(per_block) + 1);
            if clusters * per_cluster >= entries {
                break;
            }
            clusters = entries.div_ceil(per_cluster);
        }
        if clusters * cs > MAX_REFTABLE_BYTES {
            return Err(Error::Unsupported(format!(
                "refcount table larger than {MAX_REFTABLE_BYTES} bytes"
            )));
        }
        self.file_end += clusters * cs;
        let mut table = std::mem::take(&mut self.refcounts()?.table);
        table.resize((clusters * per_cluster) as usize, 0);
        let mut raw = Vec::with_capacity(table.len() * 8);
        for entry in &table {
            raw.extend_from_slice(&entry.to_be_bytes());
        }
        self.write_cluster_at(new_offset, &raw)?;
        self.file.sync_data()?;
        let mut field = [0u8; 12];
        field[..8].copy_from_slice(&new_offset.to_be_bytes());
        field[8..].copy_from_slice(&(clusters as u32).to_be_bytes());
        self.file.write_all_at(&field, OFF_REFTABLE)?;
        self.header.refcount_table_offset = new_offset;
        self.header.refcount_table_clusters = clusters as u32;
        self.refcounts()?.table = table;
        for c in 0..clusters {
            self.set_refcount(new_offset / cs + c, 1)?;
        }
        for c in 0..old_clusters {
            self.decrement_refcount(old_offset / cs + c)?;
        }
        check_region(
            "refcount table",
            new_offset,
            clusters * cs,
            cs,
            self.file_len,
        )
    }
}

/// Reads entry `i` of `bits` bits from a refcount block (big-endian; below
/// 8 bits, packed from the least significant bit as QEMU does).
fn get_entry(block: &[u8], i: u64, bits: u64) -> u64 {
    if bits >= 8 {
        let bytes = (bits / 8) as usize;
        let start = i as usize * bytes;
        block[start..start + bytes]
            .iter()
            .fold(0u64, |v, &b| (v << 8) | u64::from(b))
    } else {
        let byte = block[(i * bits / 8) as usize];
        let shift = (i * bits) % 8;
        (u64::from(byte) >> shift) & ((1 << bits) - 1)
    }
}

fn set_entry(block: &mut [u8], i: u64, bits: u64, value: u64) {
    if bits >= 8 {
        let bytes = (bits / 8) as usize;
        let start = i as usize * bytes;
        let be = value.to_be_bytes();
        block[start..start + bytes].copy_from_slice(&be[8 - bytes..]);
    } else {
        let at = (i * bits / 8) as usize;
        let shift = (i * bits) % 8;
        let mask = (((1u64 << bits) - 1) << shift) as u8;
        block[at] = (block[at] & !mask) | (((value << shift) as u8) & mask);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_of_every_width() {
        for order in 0..=6u32 {
            let bits = 1u64 << order;
            let mut block = vec![0u8; 64];
            let n = 64 * 8 / bits;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1 << bits) - 1
            };
            for i in 0..n {
                set_entry(&mut block, i, bits, (i * 7) & max);
            }
            for i in 0..n {
                assert_eq!(
                    get_entry(&block, i, bits),
                    (i * 7) & max,
                    "order {order} entry {i}"
                );
            }
        }
        // 16-bit entries are big-endian, as qcow2 version 2 has them.
        let mut block = vec![0u8; 4];
        set_entry(&mut block, 1, 16, 0x0102);
        assert_eq!(block, [0, 0, 1, 2]);
    }
}
