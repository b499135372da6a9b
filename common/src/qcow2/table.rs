//! An open qcow2 file: the L1 and L2 tables that map guest clusters to
//! host clusters, reading mapped data (plain or deflate-compressed), and
//! writing clusters. Backing files are the caller's business
//! ([`crate::image`]): an unallocated cluster is reported as such.

use super::header::{
    check_region, read_exact_at, Backing, Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, OFF_AUTOCLEAR,
    V3_HEADER_LEN,
};
use super::refcount::Refcounts;
use super::{corrupt, Error, Result, MAX_CLUSTER_BITS, MAX_L1_BYTES, MIN_CLUSTER_BITS};
use std::fs::File;
use std::os::unix::fs::FileExt;

/// Host offset bits of L1 and standard L2 entries (bits 9-55).
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Refcount of the cluster is exactly one: it may be written in place.
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
/// Version 3: the cluster reads as zeros.
const ZERO: u64 = 1;
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// How many L2 tables are kept in memory.
const L2_CACHE_TABLES: usize = 8;

/// Where a guest cluster's data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Not in this file: read the backing file, or zeros without one.
    Unallocated,
    /// Reads as zeros (version 3 zero cluster).
    Zero,
    /// At this host offset; `in_place` when its refcount is one and it may
    /// be overwritten directly.
    Data { host: u64, in_place: bool },
    /// Deflate-compressed; the raw L2 entry describes where.
    Compressed(u64),
}

/// What a new image looks like.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub size: u64,
    pub cluster_bits: u32,
    pub backing: Option<Backing>,
}

struct L2Table {
    offset: u64,
    entries: Vec<u64>,
}

pub struct Qcow2 {
    pub(super) file: File,
    pub(super) header: Header,
    pub(super) writable: bool,
    pub(super) cluster_size: u64,
    /// The file's length as far as we know it (we extend it ourselves).
    pub(super) file_len: u64,
    /// Where the next cluster is allocated: the end of the file, aligned.
    pub(super) file_end: u64,
    pub(super) refcounts: Option<Refcounts>,
    l1: Vec<u64>,
    l2_cache: Vec<L2Table>,
    l2_next_victim: usize,
    /// The last decompressed cluster, by its L2 entry.
    decompressed: Option<(u64, Vec<u8>)>,
}

impl Qcow2 {
    /// Opens an image from a file the caller already opened (read-write if
    /// `writable`). The header and L1 table are read and checked.
    pub fn open(file: File, writable: bool) -> Result<Qcow2> {
        let header = super::read_header(&file)?;
        if header.incompatible_features & INCOMPAT_CORRUPT != 0 {
            return Err(Error::MarkedCorrupt);
        }
        if writable {
            if header.incompatible_features & INCOMPAT_DIRTY != 0 {
                return Err(Error::Dirty);
            }
            if header.nb_snapshots > 0 {
                return Err(Error::Unsupported(
                    "writing to an image with internal snapshots".into(),
                ));
            }
        }
        let file_len = file.metadata()?.len();
        let cluster_size = header.cluster_size();
        let mut raw_l1 = vec![0u8; header.l1_size as usize * 8];
        read_exact_at(&file, &mut raw_l1, header.l1_table_offset)?;
        let l1 = raw_l1
            .chunks_exact(8)
            .map(|c| super::header::be64(c, 0))
            .collect();
        let mut q = Qcow2 {
            file,
            header,
            writable,
            cluster_size,
            file_len,
            file_end: file_len.next_multiple_of(cluster_size),
            refcounts: None,
            l1,
            l2_cache: Vec::new(),
            l2_next_victim: 0,
            decompressed: None,
        };
        if writable {
            q.refcounts = Some(Refcounts::load(&q)?);
            if q.header.version == 3 && q.header.autoclear_features != 0 {
                // Autoclear features (bitmaps) describe data we do not keep
                // up to date: clearing them is what the format asks.
                q.file.write_all_at(&0u64.to_be_bytes(), OFF_AUTOCLEAR)?;
                q.header.autoclear_features = 0;
            }
        }
        Ok(q)
    }

    /// Creates a version 3 image in `file`, which must be empty and open
    /// for reading and writing, and opens it.
    pub fn create(file: File, options: &CreateOptions) -> Result<Qcow2> {
        let bits = options.cluster_bits;
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
            return Err(Error::Create(format!("cluster size 2^{bits} out of range")));
        }
        let cs = 1u64 << bits;
        let l1_span = cs * (cs / 8);
        let l1_size = options.size.div_ceil(l1_span);
        if l1_size * 8 > MAX_L1_BYTES || options.size > (1 << 62) {
            return Err(Error::Create(format!(
                "{} bytes is too large for {cs}-byte clusters",
                options.size
            )));
        }
        if let Some(b) = &options.backing {
            if b.name.as_os_str().len() > 1023 {
                return Err(Error::Create("backing file name too long".into()));
            }
        }
        // Layout: header, refcount table, refcount blocks, L1 table. The
        // refcount blocks cover all of these clusters.
        let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
        let per_block = cs * 8 / 16;
        let (mut table_clusters, mut blocks) = (1u64, 1u64);
        loop {
            let total = 1 + table_clusters + blocks + l1_clusters;
            let need_blocks = total.div_ceil(per_block);
            let need_table = (need_blocks * 8).div_ceil(cs);
            if need_blocks == blocks && need_table == table_clusters {
                break;
            }
            (blocks, table_clusters) = (need_blocks, need_table);
        }
        let table_offset = cs;
        let blocks_offset = table_offset + table_clusters * cs;
        let l1_offset = blocks_offset + blocks * cs;
        let total = 1 + table_clusters + blocks + l1_clusters;
        let header = Header {
            version: 3,
            cluster_bits: bits,
            size: options.size,
            l1_size: l1_size as u32,
            l1_table_offset: l1_offset,
            refcount_table_offset: table_offset,
            refcount_table_clusters: table_clusters as u32,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LEN,
            backing: options.backing.clone(),
        };
        let bytes = header.to_bytes();
        if bytes.len() as u64 > cs {
            return Err(Error::Create("header does not fit in one cluster".into()));
        }
        let mut table = vec![0u8; (table_clusters * cs) as usize];
        for i in 0..blocks {
            let at = (i * 8) as usize;
            table[at..at + 8].copy_from_slice(&(blocks_offset + i * cs).to_be_bytes());
        }
        let mut refblocks = vec![0u8; (blocks * cs) as usize];
        for cluster in 0..total {
            let at = (cluster * 2) as usize;
            refblocks[at..at + 2].copy_from_slice(&1u16.to_be_bytes());
        }
        file.write_all_at(&bytes, 0)?;
        file.write_all_at(&table, table_offset)?;
        file.write_all_at(&refblocks, blocks_offset)?;
        // The L1 table is all zeros: extending the file makes it so.
        file.set_len(l1_offset + l1_clusters * cs)?;
        Qcow2::open(file, true)
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn size(&self) -> u64 {
        self.header.size
    }

    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    pub fn backing(&self) -> Option<&Backing> {
        self.header.backing.as_ref()
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Writes everything to stable storage (fdatasync: data, tables and
    /// the file's length).
    pub fn flush(&self) -> Result<()> {
        Ok(self.file.sync_data()?)
    }

    fn l2_bits(&self) -> u32 {
        self.header.cluster_bits - 3
    }

    /// Splits a guest offset into L1 and L2 indexes.
    fn indexes(&self, offset: u64) -> (usize, usize) {
        let l1 = offset >> (self.header.cluster_bits + self.l2_bits());
        let l2 = (offset >> self.header.cluster_bits) & ((1 << self.l2_bits()) - 1);
        (l1 as usize, l2 as usize)
    }

    /// The L2 table offset an L1 entry names, checked; 0 if unallocated.
    fn l2_offset(&self, l1_index: usize) -> Result<u64> {
        let Some(&entry) = self.l1.get(l1_index) else {
            return corrupt(format!("L1 index {l1_index} beyond the L1 table"));
        };
        if entry & L1_RESERVED != 0 {
            return corrupt(format!("L1 entry {l1_index} has reserved bits set"));
        }
        let offset = entry & OFFSET_MASK;
        if offset == 0 {
            return Ok(0);
        }
        check_region(
            "L2 table",
            offset,
            self.cluster_size,
            self.cluster_size,
            self.file_len,
        )?;
        if offset < self.cluster_size {
            return corrupt("L2 table overlaps the header");
        }
        Ok(offset)
    }

    /// The cached L2 table at `offset`, read if needed.
    fn l2_table(&mut self, offset: u64) -> Result<usize> {
        if let Some(i) = self.l2_cache.iter().position(|t| t.offset == offset) {
            return Ok(i);
        }
        let mut raw = vec![0u8; self.cluster_size as usize];
        read_exact_at(&self.file, &mut raw, offset)?;
        let entries = raw
            .chunks_exact(8)
            .map(|c| super::header::be64(c, 0))
            .collect();
        let table = L2Table { offset, entries };
        if self.l2_cache.len() < L2_CACHE_TABLES {
            self.l2_cache.push(table);
            Ok(self.l2_cache.len() - 1)
        } else {
            let i = self.l2_next_victim;
            self.l2_next_victim = (i + 1) % L2_CACHE_TABLES;
            self.l2_cache[i] = table;
            Ok(i)
        }
    }

    /// The raw L2 entry for the guest cluster containing `offset`, or 0 if
    /// its L2 table is not allocated.
    fn l2_entry(&mut self, offset: u64) -> Result<u64> {
        let (l1_index, l2_index) = self.indexes(offset);
        let l2_offset = self.l2_offset(l1_index)?;
        if l2_offset == 0 {
            return Ok(0);
        }
        let t = self.l2_table(l2_offset)?;
        Ok(self.l2_cache[t].entries[l2_index])
    }

    /// Where the guest cluster containing `offset` is.
    pub fn map(&mut self, offset: u64) -> Result<Mapping> {
        if offset >= self.header.size {
            return corrupt(format!("guest offset {offset} beyond the virtual size"));
        }
        let entry = self.l2_entry(offset)?;
        self.decode_l2(entry)
    }

    fn decode_l2(&self, entry: u64) -> Result<Mapping> {
        if entry & COMPRESSED != 0 {
            self.compressed_extent(entry)?;
            return Ok(Mapping::Compressed(entry));
        }
        if entry & L2_RESERVED != 0 {
            return corrupt(format!("L2 entry {entry:#x} has reserved bits set"));
        }
        if entry & ZERO != 0 {
            if self.header.version < 3 {
                return corrupt("zero cluster in a version 2 image");
            }
            return Ok(Mapping::Zero);
        }
        let host = entry & OFFSET_MASK;
        if host == 0 {
            return Ok(Mapping::Unallocated);
        }
        if !host.is_multiple_of(self.cluster_size) {
            return corrupt(format!("data cluster at unaligned offset {host}"));
        }
        if host >= self.file_len {
            return corrupt(format!("data cluster at offset {host} past end of file"));
        }
        Ok(Mapping::Data {
            host,
            in_place: entry & COPIED != 0,
        })
    }

    /// The host offset and length of a compressed cluster's data.
    fn compressed_extent(&self, entry: u64) -> Result<(u64, u64)> {
        let x = 62 - (self.header.cluster_bits - 8);
        let offset = entry & ((1u64 << x) - 1);
        let sectors = ((entry >> x) & ((1u64 << (self.header.cluster_bits - 8)) - 1)) + 1;
        let len = sectors * 512 - (offset & 511);
        if offset < self.cluster_size || offset >= self.file_len {
            return corrupt(format!(
                "compressed cluster at offset {offset} outside the file"
            ));
        }
        // The last sectors may be missing at the end of the file.
        Ok((offset, len.min(self.file_len - offset)))
    }

    /// Reads `buf.len()` bytes at `in_cluster` within a cluster mapped as
    /// `mapping` (data, compressed or zero; not unallocated).
    pub fn read_mapped(&mut self, mapping: Mapping, in_cluster: u64, buf: &mut [u8]) -> Result<()> {
        if in_cluster + buf.len() as u64 > self.cluster_size {
            return corrupt("read crosses a cluster boundary");
        }
        match mapping {
            Mapping::Unallocated | Mapping::Zero => buf.fill(0),
            Mapping::Data { host, .. } => {
                let at = host + in_cluster;
                // Data clusters may end past the file's end: that reads as
                // zeros, as in QEMU.
                let present = self.file_len.saturating_sub(at).min(buf.len() as u64) as usize;
                read_exact_at(&self.file, &mut buf[..present], at)?;
                buf[present..].fill(0);
            }
            Mapping::Compressed(entry) => {
                let cluster = self.decompress(entry)?;
                let start = in_cluster as usize;
                buf.copy_from_slice(&cluster[start..start + buf.len()]);
            }
        }
        Ok(())
    }

    fn decompress(&mut self, entry: u64) -> Result<&[u8]> {
        if self.decompressed.as_ref().is_none_or(|(e, _)| *e != entry) {
            let (offset, len) = self.compressed_extent(entry)?;
            let mut input = vec![0u8; len as usize];
            read_exact_at(&self.file, &mut input, offset)?;
            let mut out = match self.decompressed.take() {
                Some((_, v)) => v,
                None => vec![0u8; self.cluster_size as usize],
            };
            inflate_cluster(&input, &mut out)?;
            self.decompressed = Some((entry, out));
        }
        match &self.decompressed {
            Some((_, data)) => Ok(data),
            None => corrupt("no decompressed cluster"),
        }
    }

    /// Writes `buf` at `in_cluster` within a cluster that is mapped in
    /// place (`Mapping::Data { in_place: true, .. }`).
    pub fn write_in_place(&mut self, host: u64, in_cluster: u64, buf: &[u8]) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        if in_cluster + buf.len() as u64 > self.cluster_size {
            return corrupt("write crosses a cluster boundary");
        }
        self.check_metadata_overlap(host)?;
        self.file.write_all_at(buf, host + in_cluster)?;
        if host + in_cluster + buf.len() as u64 > self.file_len {
            self.file_len = host + in_cluster + buf.len() as u64;
            self.file_end = self
                .file_end
                .max(self.file_len.next_multiple_of(self.cluster_size));
        }
        Ok(())
    }

    /// Stores a whole guest cluster (the one containing `offset`) in a
    /// newly allocated host cluster, allocating its L2 table if needed and
    /// releasing whatever the cluster was mapped to before.
    pub fn write_new_cluster(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        if data.len() as u64 != self.cluster_size || offset >= self.header.size {
            return corrupt("cluster write out of range");
        }
        let (l1_index, l2_index) = self.indexes(offset);
        let mut l2_offset = self.l2_offset(l1_index)?;
        if l2_offset != 0 && self.l1[l1_index] & COPIED == 0 {
            return Err(Error::Unsupported(
                "writing to an L2 table shared with a snapshot".into(),
            ));
        }
        if l2_offset != 0 {
            self.check_metadata_overlap(l2_offset)?;
        }
        let old = if l2_offset == 0 {
            0
        } else {
            self.l2_entry(offset)?
        };
        let old_mapping = self.decode_l2(old)?;

        let host = self.alloc_clusters(1)?;
        self.write_cluster_at(host, data)?;
        if l2_offset == 0 {
            l2_offset = self.alloc_clusters(1)?;
            self.write_cluster_at(l2_offset, &vec![0u8; self.cluster_size as usize])?;
            let entry = l2_offset | COPIED;
            let at = self.header.l1_table_offset + l1_index as u64 * 8;
            self.file.write_all_at(&entry.to_be_bytes(), at)?;
            self.l1[l1_index] = entry;
        }
        let t = self.l2_table(l2_offset)?;
        let entry = host | COPIED;
        self.l2_cache[t].entries[l2_index] = entry;
        self.file
            .write_all_at(&entry.to_be_bytes(), l2_offset + l2_index as u64 * 8)?;
        self.release(old, old_mapping)
    }

    /// Drops the reference an overwritten L2 entry held.
    fn release(&mut self, entry: u64, mapping: Mapping) -> Result<()> {
        match mapping {
            Mapping::Unallocated => Ok(()),
            Mapping::Zero | Mapping::Data { .. } => match entry & OFFSET_MASK {
                0 => Ok(()),
                host => self.decrement_refcount(host / self.cluster_size),
            },
            Mapping::Compressed(entry) => {
                if self.decompressed.as_ref().is_some_and(|(e, _)| *e == entry) {
                    self.decompressed = None;
                }
                let (offset, len) = self.compressed_extent(entry)?;
                let first = offset / self.cluster_size;
                let last = (offset + len.max(1) - 1) / self.cluster_size;
                for cluster in first..=last {
                    self.decrement_refcount(cluster)?;
                }
                Ok(())
            }
        }
    }

    pub(super) fn write_cluster_at(&mut self, host: u64, data: &[u8]) -> Result<()> {
        self.file.write_all_at(data, host)?;
        self.file_len = self.file_len.max(host + data.len() as u64);
        Ok(())
    }

    /// Refuses writes over the header, the L1 table or the refcount table,
    /// which a corrupt L1 or L2 entry could point at.
    fn check_metadata_overlap(&self, host: u64) -> Result<()> {
        let h = &self.header;
        let cs = self.cluster_size;
        let overlaps = |start: u64, len: u64| host < start + len && start < host + cs;
        if host < cs
            || overlaps(h.l1_table_offset, u64::from(h.l1_size) * 8)
            || overlaps(
                h.refcount_table_offset,
                u64::from(h.refcount_table_clusters) * cs,
            )
        {
            return corrupt(format!(
                "cluster at offset {host} overlaps the image's metadata"
            ));
        }
        Ok(())
    }
}

/// Inflates one compressed cluster (raw deflate, as QEMU writes it): the
/// output must fill the cluster exactly.
fn inflate_cluster(input: &[u8], out: &mut [u8]) -> Result<()> {
    use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
    use miniz_oxide::inflate::TINFLStatus;
    let mut state = Box::<DecompressorOxide>::default();
    let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
    let (status, _, written) = decompress(&mut state, input, out, 0, flags);
    match status {
        TINFLStatus::Done | TINFLStatus::HasMoreOutput if written == out.len() => Ok(()),
        _ => corrupt(format!(
            "compressed cluster does not inflate to a full cluster ({status:?})"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    struct TempFile(PathBuf);
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    fn temp(name: &str) -> (TempFile, File) {
        let path = std::env::temp_dir().join(format!("qcow2-table-{}-{name}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        (TempFile(path), file)
    }

    #[test]
    fn create_write_read_back() {
        let (_guard, file) = temp("rw");
        let opts = CreateOptions {
            size: 3 << 20,
            cluster_bits: 9,
            backing: None,
        };
        let mut q = Qcow2::create(file, &opts).unwrap();
        assert_eq!(q.map(0).unwrap(), Mapping::Unallocated);
        // Enough clusters to need several refcount blocks (256 per block).
        for i in 0..1000u64 {
            let data = vec![(i % 251) as u8 + 1; 512];
            q.write_new_cluster(i * 512, &data).unwrap();
        }
        let file = q.file.try_clone().unwrap();
        drop(q);
        let mut q = Qcow2::open(file, false).unwrap();
        let mut buf = [0u8; 512];
        for i in [0u64, 1, 255, 256, 999] {
            let m = q.map(i * 512).unwrap();
            assert!(matches!(m, Mapping::Data { in_place: true, .. }));
            q.read_mapped(m, 0, &mut buf).unwrap();
            assert!(buf.iter().all(|&b| b == (i % 251) as u8 + 1));
        }
        assert_eq!(q.map(1000 * 512).unwrap(), Mapping::Unallocated);
    }

    #[test]
    fn inflate_rejects_garbage_and_short_output() {
        let mut out = vec![0u8; 512];
        assert!(inflate_cluster(&[0xff; 20], &mut out).is_err());
        let short = miniz_oxide::deflate::compress_to_vec(&[7u8; 100], 6);
        assert!(inflate_cluster(&short, &mut out).is_err());
        let full = miniz_oxide::deflate::compress_to_vec(&[7u8; 512], 6);
        inflate_cluster(&full, &mut out).unwrap();
        assert!(out.iter().all(|&b| b == 7));
    }
}
