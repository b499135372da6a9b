//! The qcow2 header, its extensions and its feature bits.

use super::{corrupt, Error, Result, MAGIC, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};
use crate::disk::DiskFormat;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Fixed header lengths of version 2 and version 3 (with the compression
/// type byte and its padding, as we write it).
const V2_HEADER_LEN: u32 = 72;
const V3_MIN_HEADER_LEN: u32 = 104;
pub(super) const V3_HEADER_LEN: u32 = 112;

/// QEMU's limit on a backing file name.
const MAX_BACKING_NAME: u32 = 1023;
const MAX_SNAPSHOTS: u32 = 65536;

// Incompatible feature bits.
pub(super) const INCOMPAT_DIRTY: u64 = 1 << 0;
pub(super) const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;

// Header extension types.
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_NAMES: u32 = 0x6803_f857;

// Byte offsets of header fields we rewrite in place.
pub(super) const OFF_REFTABLE: u64 = 48;
pub(super) const OFF_AUTOCLEAR: u64 = 88;

/// A parsed, validated qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub backing: Option<Backing>,
}

/// The backing file an overlay names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backing {
    /// The name as stored: absolute, or relative to the overlay's directory.
    pub name: PathBuf,
    /// The format from the backing-format header extension, if present.
    pub format_extension: Option<DiskFormat>,
}

impl Backing {
    /// The backing file's format: from the backing-format extension, else
    /// from its name (`.qcow2` or raw); never from its content.
    pub fn format(&self) -> DiskFormat {
        match self.format_extension {
            Some(format) => format,
            None => DiskFormat::from_file_name(&self.name.to_string_lossy()),
        }
    }

    /// Where the backing file is, for an overlay at `overlay`: relative
    /// names resolve against the overlay's directory, as QEMU does.
    pub fn resolve(&self, overlay: &Path) -> PathBuf {
        if self.name.is_absolute() {
            return self.name.clone();
        }
        match overlay.parent() {
            Some(dir) => dir.join(&self.name),
            None => self.name.clone(),
        }
    }
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Parses and checks a header. `first` holds the file's first bytes (at
    /// least the first cluster, or the whole file if shorter); `file_len`
    /// is the file's length, against which every offset is checked.
    pub fn parse(first: &[u8], file_len: u64) -> Result<Header> {
        if first.len() < 4 || first[..4] != MAGIC {
            return Err(Error::BadMagic);
        }
        if first.len() < V2_HEADER_LEN as usize {
            return Err(Error::Truncated("header".into()));
        }
        let version = be32(first, 4);
        if version != 2 && version != 3 {
            return Err(Error::Version(version));
        }
        let cluster_bits = be32(first, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return corrupt(format!("cluster_bits {cluster_bits} out of range"));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            cluster_bits,
            size: be64(first, 24),
            l1_size: be32(first, 36),
            l1_table_offset: be64(first, 40),
            refcount_table_offset: be64(first, 48),
            refcount_table_clusters: be32(first, 56),
            nb_snapshots: be32(first, 60),
            snapshots_offset: be64(first, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            backing: None,
        };
        let mut compression_type = 0u8;
        if version == 3 {
            if first.len() < V3_MIN_HEADER_LEN as usize {
                return Err(Error::Truncated("version 3 header".into()));
            }
            h.incompatible_features = be64(first, 72);
            h.compatible_features = be64(first, 80);
            h.autoclear_features = be64(first, 88);
            h.refcount_order = be32(first, 96);
            h.header_length = be32(first, 100);
            if h.header_length < V3_MIN_HEADER_LEN || u64::from(h.header_length) > cluster_size {
                return corrupt(format!("header length {} out of range", h.header_length));
            }
            if h.header_length as usize > first.len() {
                return Err(Error::Truncated("version 3 header".into()));
            }
            if h.header_length > V3_MIN_HEADER_LEN {
                compression_type = first[104];
            }
        }
        let crypt_method = be32(first, 32);
        match crypt_method {
            0 => {}
            1 => return Err(Error::Unsupported("AES encryption".into())),
            2 => return Err(Error::Unsupported("LUKS encryption".into())),
            n => return corrupt(format!("unknown encryption method {n}")),
        }
        if h.refcount_order > 6 {
            return corrupt(format!("refcount order {} out of range", h.refcount_order));
        }
        let names = feature_names(first, &h, file_len)?;
        check_incompatible(h.incompatible_features, compression_type, &names)?;
        h.check_tables(file_len)?;
        h.backing = read_backing(first, &h, file_len)?;
        Ok(h)
    }

    /// Checks the sizes and offsets of the L1 table, the refcount table and
    /// the snapshot table against the file and QEMU's limits.
    fn check_tables(&self, file_len: u64) -> Result<()> {
        let cluster_size = self.cluster_size();
        // Each L1 entry maps an L2 table of cluster_size / 8 clusters.
        let l1_span = cluster_size * (cluster_size / 8);
        if self.size > (1u64 << 62) {
            return corrupt(format!("virtual size {} too large", self.size));
        }
        let l1_needed = self.size.div_ceil(l1_span);
        if u64::from(self.l1_size) < l1_needed {
            return corrupt(format!(
                "L1 table of {} entries too small for {} bytes",
                self.l1_size, self.size
            ));
        }
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > super::MAX_L1_BYTES {
            return corrupt(format!("L1 table of {} entries too large", self.l1_size));
        }
        if self.l1_size > 0 {
            check_region(
                "L1 table",
                self.l1_table_offset,
                l1_bytes,
                cluster_size,
                file_len,
            )?;
        }
        if self.refcount_table_clusters == 0 {
            return corrupt("empty refcount table");
        }
        let reftable_bytes = u64::from(self.refcount_table_clusters) * cluster_size;
        if reftable_bytes > super::MAX_REFTABLE_BYTES {
            return corrupt(format!(
                "refcount table of {} clusters too large",
                self.refcount_table_clusters
            ));
        }
        check_region(
            "refcount table",
            self.refcount_table_offset,
            reftable_bytes,
            cluster_size,
            file_len,
        )?;
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return corrupt(format!("{} snapshots is too many", self.nb_snapshots));
        }
        if self.nb_snapshots > 0 {
            // Snapshot entries are at least 40 bytes each.
            let bytes = u64::from(self.nb_snapshots) * 40;
            check_region("snapshot table", self.snapshots_offset, bytes, 8, file_len)?;
        }
        Ok(())
    }

    /// The header as we write it for a new version 3 image, with the
    /// backing-format extension and the backing name after it.
    pub(super) fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(512);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&self.version.to_be_bytes());
        let backing_name = self
            .backing
            .as_ref()
            .map(|bk| bk.name.as_os_str().as_bytes());
        // Filled in below once the extensions' length is known.
        b.extend_from_slice(&0u64.to_be_bytes());
        b.extend_from_slice(&(backing_name.map_or(0, |n| n.len()) as u32).to_be_bytes());
        b.extend_from_slice(&self.cluster_bits.to_be_bytes());
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes()); // crypt_method
        b.extend_from_slice(&self.l1_size.to_be_bytes());
        b.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        b.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        b.extend_from_slice(&self.incompatible_features.to_be_bytes());
        b.extend_from_slice(&self.compatible_features.to_be_bytes());
        b.extend_from_slice(&self.autoclear_features.to_be_bytes());
        b.extend_from_slice(&self.refcount_order.to_be_bytes());
        b.extend_from_slice(&self.header_length.to_be_bytes());
        b.resize(self.header_length as usize, 0); // compression type 0: deflate
        if let Some(backing) = &self.backing {
            let format = backing.format().to_string();
            push_extension(&mut b, EXT_BACKING_FORMAT, format.as_bytes());
        }
        push_extension(&mut b, EXT_END, &[]);
        if let Some(name) = backing_name {
            let offset = b.len() as u64;
            b[8..16].copy_from_slice(&offset.to_be_bytes());
            b.extend_from_slice(name);
        }
        b
    }
}

/// Reads and checks the header of an image that is already open (the
/// caller opened it, so nothing can swap the file in between). The backing
/// file is only named in the result: the caller resolves and opens it.
pub fn read_header(file: &File) -> Result<Header> {
    let file_len = file.metadata()?.len();
    // The header, its extensions and the backing name all live in the
    // first cluster, which is at most 2 MiB.
    let want = file_len.min(1 << MAX_CLUSTER_BITS) as usize;
    let mut first = vec![0u8; want.min(V3_HEADER_LEN as usize)];
    read_exact_at(file, &mut first, 0)?;
    if first.len() >= 24 && first[..4] == MAGIC {
        let cluster_bits = be32(&first, 20);
        if (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            first = vec![0u8; want.min(1 << cluster_bits)];
            read_exact_at(file, &mut first, 0)?;
        }
    }
    Header::parse(&first, file_len)
}

/// Whether a file starts with the qcow2 magic: used only to refuse a file
/// declared raw whose content claims otherwise, never to pick a format.
pub fn has_magic(file: &File) -> Result<bool> {
    let mut magic = [0u8; 4];
    match file.read_exact_at(&mut magic, 0) {
        Ok(()) => Ok(magic == MAGIC),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e.into()),
    }
}

pub(super) fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> Result<()> {
    file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::Truncated(format!(
                "{} bytes at offset {offset} past end of file",
                buf.len()
            ))
        } else {
            Error::Io(e)
        }
    })
}

/// Checks that `len` bytes at `offset` are aligned and inside the file.
pub(super) fn check_region(
    what: &str,
    offset: u64,
    len: u64,
    align: u64,
    file_len: u64,
) -> Result<()> {
    if !offset.is_multiple_of(align) {
        return corrupt(format!("{what} at unaligned offset {offset}"));
    }
    match offset.checked_add(len) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(Error::Truncated(format!(
            "{what} of {len} bytes at offset {offset} past end of file ({file_len} bytes)"
        ))),
    }
}

fn push_extension(b: &mut Vec<u8>, kind: u32, data: &[u8]) {
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b.resize(b.len().next_multiple_of(8), 0);
}

/// Refuses every incompatible feature this code does not implement, by
/// name. The dirty and corrupt bits are checked when opening for writing.
fn check_incompatible(bits: u64, compression_type: u8, names: &[(u8, String)]) -> Result<()> {
    if bits & INCOMPAT_DATA_FILE != 0 {
        return Err(Error::Unsupported("external data file".into()));
    }
    if bits & INCOMPAT_EXTL2 != 0 {
        return Err(Error::Unsupported(
            "extended L2 entries (subclusters)".into(),
        ));
    }
    if bits & INCOMPAT_COMPRESSION != 0 || compression_type != 0 {
        return Err(match compression_type {
            1 => Error::Unsupported("zstd compression".into()),
            0 => Error::Unsupported("compression type bit without a compression type".into()),
            n => Error::Unsupported(format!("compression type {n}")),
        });
    }
    let known = INCOMPAT_DIRTY | INCOMPAT_CORRUPT;
    let unknown = bits & !known;
    if unknown != 0 {
        let bit = unknown.trailing_zeros() as u8;
        let name = names.iter().find(|(b, _)| *b == bit).map_or_else(
            || format!("incompatible feature bit {bit}"),
            |(_, n)| n.clone(),
        );
        return Err(Error::Unsupported(name));
    }
    Ok(())
}

/// The header extensions: (type, data) pairs between the fixed header and
/// the backing file name (or the end of the first cluster).
fn extensions<'a>(first: &'a [u8], h: &Header, file_len: u64) -> Result<Vec<(u32, &'a [u8])>> {
    let mut end = (first.len() as u64).min(h.cluster_size()).min(file_len);
    if let Some(offset) = backing_offset(first) {
        end = end.min(offset);
    }
    let mut at = u64::from(h.header_length);
    let mut found = Vec::new();
    // Version 2 images may have extensions too; a zero type ends the list.
    while at + 8 <= end {
        let kind = be32(first, at as usize);
        let len = u64::from(be32(first, at as usize + 4));
        if kind == EXT_END {
            return Ok(found);
        }
        let data_end = at + 8 + len;
        if data_end > end {
            return corrupt(format!("header extension {kind:#x} runs past the header"));
        }
        found.push((kind, &first[at as usize + 8..data_end as usize]));
        at = data_end.next_multiple_of(8);
    }
    Ok(found)
}

fn backing_offset(first: &[u8]) -> Option<u64> {
    let size = be32(first, 16);
    (size > 0).then(|| be64(first, 8))
}

fn feature_names(first: &[u8], h: &Header, file_len: u64) -> Result<Vec<(u8, String)>> {
    let mut names = Vec::new();
    for (kind, data) in extensions(first, h, file_len)? {
        if kind != EXT_FEATURE_NAMES {
            continue;
        }
        for entry in data.chunks_exact(48) {
            if entry[0] != 0 {
                continue; // only incompatible features are refused by name
            }
            let name = &entry[2..];
            let len = name.iter().position(|&c| c == 0).unwrap_or(name.len());
            names.push((entry[1], String::from_utf8_lossy(&name[..len]).into_owned()));
        }
    }
    Ok(names)
}

fn read_backing(first: &[u8], h: &Header, file_len: u64) -> Result<Option<Backing>> {
    let Some(offset) = backing_offset(first) else {
        return Ok(None);
    };
    let size = be32(first, 16);
    if size > MAX_BACKING_NAME {
        return corrupt(format!("backing file name of {size} bytes too long"));
    }
    let end = offset.checked_add(u64::from(size));
    let limit = (first.len() as u64).min(h.cluster_size());
    match end {
        Some(end) if offset >= u64::from(h.header_length) && end <= limit && end <= file_len => {}
        _ => {
            return corrupt(format!(
                "backing file name at offset {offset} outside the header"
            ))
        }
    }
    let name = &first[offset as usize..(offset + u64::from(size)) as usize];
    if name.contains(&0) {
        return corrupt("backing file name contains a NUL byte");
    }
    let mut format_extension = None;
    for (kind, data) in extensions(first, h, file_len)? {
        if kind == EXT_BACKING_FORMAT {
            let text = String::from_utf8_lossy(data);
            let text = text.trim_end_matches('\0');
            format_extension = Some(
                DiskFormat::from_keyword(text)
                    .ok_or_else(|| Error::BackingFormat(text.chars().take(64).collect()))?,
            );
        }
    }
    Ok(Some(Backing {
        name: PathBuf::from(OsStr::from_bytes(name)),
        format_extension,
    }))
}

pub(super) fn be32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(x)
}

pub(super) fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(backing: Option<Backing>) -> Header {
        Header {
            version: 3,
            cluster_bits: 16,
            size: 1 << 30,
            l1_size: 2,
            l1_table_offset: 3 << 16,
            refcount_table_offset: 1 << 16,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LEN,
            backing,
        }
    }

    fn first_cluster(h: &Header) -> Vec<u8> {
        let mut b = h.to_bytes();
        b.resize(1 << 16, 0);
        b
    }

    #[test]
    fn round_trip_with_backing() {
        let backing = Backing {
            name: "base.img".into(),
            format_extension: Some(DiskFormat::Raw),
        };
        let h = sample(Some(backing.clone()));
        let parsed = Header::parse(&first_cluster(&h), 4 << 16).unwrap();
        assert_eq!(parsed, h);
        assert_eq!(backing.format(), DiskFormat::Raw);
        assert_eq!(
            backing.resolve(Path::new("/vm/top.qcow2")),
            Path::new("/vm/base.img")
        );
        let abs = Backing {
            name: "/b/x.qcow2".into(),
            format_extension: None,
        };
        assert_eq!(abs.format(), DiskFormat::Qcow2);
        assert_eq!(
            abs.resolve(Path::new("/vm/top.qcow2")),
            Path::new("/b/x.qcow2")
        );
    }

    #[test]
    fn refuses_features_by_name() {
        let mut b = first_cluster(&sample(None));
        b[72 + 7] = INCOMPAT_DATA_FILE as u8;
        assert!(Header::parse(&b, 4 << 16)
            .unwrap_err()
            .to_string()
            .contains("external data"));
        b[72 + 7] = INCOMPAT_EXTL2 as u8;
        assert!(Header::parse(&b, 4 << 16)
            .unwrap_err()
            .to_string()
            .contains("extended L2"));
        b[72 + 7] = INCOMPAT_COMPRESSION as u8;
        b[104] = 1;
        assert!(Header::parse(&b, 4 << 16)
            .unwrap_err()
            .to_string()
            .contains("zstd"));
        b[104] = 0;
        b[72 + 7] = 0;
        b[72] = 0x80;
        assert!(Header::parse(&b, 4 << 16)
            .unwrap_err()
            .to_string()
            .contains("bit 63"));
    }

    #[test]
    fn refuses_bad_headers() {
        let good = first_cluster(&sample(None));
        assert!(matches!(Header::parse(&good[..3], 3), Err(Error::BadMagic)));
        assert!(matches!(
            Header::parse(&good[..50], 50),
            Err(Error::Truncated(_))
        ));
        let mut b = good.clone();
        b[7] = 4;
        assert!(matches!(Header::parse(&b, 4 << 16), Err(Error::Version(4))));
        let mut b = good.clone();
        b[23] = 30;
        assert!(matches!(Header::parse(&b, 4 << 16), Err(Error::Corrupt(_))));
        // L1 table past the end of the file.
        assert!(matches!(
            Header::parse(&good, 3 << 16),
            Err(Error::Truncated(_))
        ));
        // Absurd L1 size.
        let mut b = good.clone();
        b[36..40].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(Header::parse(&b, 4 << 16), Err(Error::Corrupt(_))));
    }
}
