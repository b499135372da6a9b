//! Disk images, raw or qcow2, with their backing chains: the one place
//! that reads and writes guest data, used by `vmctl create` and later by
//! our own block device.
//!
//! Opening a chain goes file by file: the caller's `open` function opens
//! each file (the daemon's parent opens users' files with their
//! credentials), the header is read from the open file, and the next
//! file's name and format come from that header. Formats come from what
//! the user declared or the backing-format extension, never from content;
//! a file whose content disagrees with its declared format is refused.

use crate::disk::DiskFormat;
use crate::qcow2::{self, Mapping, Qcow2};
use nix::unistd::{lseek, Whence};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Longest backing chain followed, the top image included.
pub const MAX_CHAIN_DEPTH: usize = 16;

#[derive(Debug, Error)]
pub enum ImageError {
    #[error("{}: {}", path.display(), qcow2::io_message(source))]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: {source}", path.display())]
    Qcow2 { path: PathBuf, source: qcow2::Error },
    #[error("{}: declared raw but has a qcow2 header; name it qcow2:{} to use it as qcow2", path.display(), path.display())]
    RawWithQcow2Header { path: PathBuf },
    #[error("{}: backing chain deeper than {MAX_CHAIN_DEPTH} images", path.display())]
    ChainTooDeep { path: PathBuf },
    #[error("{}: backing chain loops back to {}", path.display(), to.display())]
    ChainLoop { path: PathBuf, to: PathBuf },
    #[error("{}: {len} bytes at offset {offset} are outside the {size}-byte image", path.display())]
    OutOfRange {
        path: PathBuf,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("{}: raw image larger than the {size}-byte output", path.display())]
    TooSmall { path: PathBuf, size: u64 },
    #[error("{}: discard needs a raw image", path.display())]
    NoDiscard { path: PathBuf },
}

pub type Result<T> = std::result::Result<T, ImageError>;

/// One file of a chain, opened, with its declared format.
#[derive(Debug)]
pub struct Layer {
    pub path: PathBuf,
    pub format: DiskFormat,
    pub file: File,
}

/// Opens the chain that starts at `path` in `format`: the top file
/// read-write if `writable`, every backing file read-only. `open` opens
/// one file (path, writable). Relative backing names resolve against the
/// directory of the file that names them. The result lists the top first.
pub fn open_chain<F>(
    path: &Path,
    format: DiskFormat,
    writable: bool,
    mut open: F,
) -> Result<Vec<Layer>>
where
    F: FnMut(&Path, DiskFormat, bool) -> io::Result<File>,
{
    let mut layers: Vec<Layer> = Vec::new();
    let mut seen: Vec<(u64, u64)> = Vec::new();
    let mut next = Some((path.to_path_buf(), format));
    while let Some((path, format)) = next.take() {
        if layers.len() == MAX_CHAIN_DEPTH {
            return Err(ImageError::ChainTooDeep {
                path: layers[0].path.clone(),
            });
        }
        let file = open(&path, format, layers.is_empty() && writable).map_err(|source| {
            ImageError::Io {
                path: path.clone(),
                source,
            }
        })?;
        let meta = file.metadata().map_err(|source| ImageError::Io {
            path: path.clone(),
            source,
        })?;
        let id = (meta.dev(), meta.ino());
        if let Some(i) = seen.iter().position(|s| *s == id) {
            return Err(ImageError::ChainLoop {
                path,
                to: layers[i].path.clone(),
            });
        }
        seen.push(id);
        match format {
            DiskFormat::Raw => {
                if qcow2::has_magic(&file).map_err(|source| ImageError::Qcow2 {
                    path: path.clone(),
                    source,
                })? {
                    return Err(ImageError::RawWithQcow2Header { path });
                }
            }
            DiskFormat::Qcow2 => {
                let header = qcow2::read_header(&file).map_err(|source| ImageError::Qcow2 {
                    path: path.clone(),
                    source,
                })?;
                next = header.backing.map(|b| (b.resolve(&path), b.format()));
            }
        }
        layers.push(Layer { path, format, file });
    }
    Ok(layers)
}

/// Opens a file the ordinary way, for `open_chain` in a program that runs
/// as the user who named the files.
pub fn open_file(path: &Path, writable: bool) -> io::Result<File> {
    OpenOptions::new().read(true).write(writable).open(path)
}

enum Body {
    Raw(File),
    Qcow2(Box<Qcow2>),
}

/// An open image and, below it, its backing image.
pub struct Image {
    path: PathBuf,
    body: Body,
    size: u64,
    backing: Option<Box<Image>>,
}

/// What a range of an image holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// Possibly non-zero data: read it.
    Data,
    /// Reads as zeros without being stored (a hole or a zero cluster).
    Zero,
}

impl Image {
    /// Opens an image and its chain with ordinary opens.
    pub fn open(path: &Path, format: DiskFormat, writable: bool) -> Result<Image> {
        Image::from_layers(
            open_chain(path, format, writable, |p, _, w| open_file(p, w))?,
            writable,
        )
    }

    /// Builds an image from the layers `open_chain` returned.
    pub fn from_layers(layers: Vec<Layer>, writable: bool) -> Result<Image> {
        let mut below: Option<Box<Image>> = None;
        let count = layers.len();
        for (i, layer) in layers.into_iter().enumerate().rev() {
            let top = i == 0 && writable;
            let Layer { path, format, file } = layer;
            let (body, size) = match format {
                DiskFormat::Raw => {
                    let size = file
                        .metadata()
                        .map_err(|source| ImageError::Io {
                            path: path.clone(),
                            source,
                        })?
                        .len();
                    (Body::Raw(file), size)
                }
                DiskFormat::Qcow2 => {
                    let q = Qcow2::open(file, top).map_err(|source| ImageError::Qcow2 {
                        path: path.clone(),
                        source,
                    })?;
                    let size = q.size();
                    (Body::Qcow2(Box::new(q)), size)
                }
            };
            // A raw file never has a backing file; open_chain stops there.
            let backing = if i + 1 < count { below.take() } else { None };
            below = Some(Box::new(Image {
                path,
                body,
                size,
                backing,
            }));
        }
        below.map(|b| *b).ok_or_else(|| ImageError::Io {
            path: PathBuf::new(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "empty chain"),
        })
    }

    /// Creates a new image in `file` (empty, open read-write) at `path`.
    /// A qcow2 image may name a backing file (its name as it should be
    /// recorded, and its format).
    pub fn create(
        path: &Path,
        file: File,
        format: DiskFormat,
        size: u64,
        cluster_bits: u32,
        backing: Option<qcow2::Backing>,
    ) -> Result<Image> {
        let body = match format {
            DiskFormat::Raw => {
                file.set_len(size).map_err(|source| ImageError::Io {
                    path: path.into(),
                    source,
                })?;
                Body::Raw(file)
            }
            DiskFormat::Qcow2 => {
                let options = qcow2::CreateOptions {
                    size,
                    cluster_bits,
                    backing,
                };
                Body::Qcow2(Box::new(Qcow2::create(file, &options).map_err(
                    |source| ImageError::Qcow2 {
                        path: path.into(),
                        source,
                    },
                )?))
            }
        };
        Ok(Image {
            path: path.into(),
            body,
            size,
            backing: None,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn format(&self) -> DiskFormat {
        match self.body {
            Body::Raw(_) => DiskFormat::Raw,
            Body::Qcow2(_) => DiskFormat::Qcow2,
        }
    }

    pub fn backing(&self) -> Option<&Image> {
        self.backing.as_deref()
    }

    /// The allocation unit: a qcow2 cluster, or 64 KiB for raw files.
    pub fn cluster_size(&self) -> u64 {
        match &self.body {
            Body::Raw(_) => 64 << 10,
            Body::Qcow2(q) => q.cluster_size(),
        }
    }

    fn io_err(&self, source: io::Error) -> ImageError {
        ImageError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn q_err(&self, source: qcow2::Error) -> ImageError {
        ImageError::Qcow2 {
            path: self.path.clone(),
            source,
        }
    }

    fn check_range(&self, offset: u64, len: usize) -> Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(ImageError::OutOfRange {
                path: self.path.clone(),
                offset,
                len: len as u64,
                size: self.size,
            }),
        }
    }

    /// Reads guest data at `offset`, through the backing chain.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len())?;
        if let Body::Raw(file) = &self.body {
            return file.read_exact_at(buf, offset).map_err(|e| self.io_err(e));
        }
        let cs = self.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let in_cluster = at % cs;
            let n = ((cs - in_cluster) as usize).min(buf.len() - done);
            let piece = &mut buf[done..done + n];
            let Body::Qcow2(q) = &mut self.body else {
                unreachable!()
            };
            let mapping = q.map(at).map_err(|e| ImageError::Qcow2 {
                path: self.path.clone(),
                source: e,
            })?;
            match mapping {
                Mapping::Unallocated => self.read_backing(piece, at)?,
                m => q
                    .read_mapped(m, in_cluster, piece)
                    .map_err(|e| ImageError::Qcow2 {
                        path: self.path.clone(),
                        source: e,
                    })?,
            }
            done += n;
        }
        Ok(())
    }

    /// Reads from the backing image; past its end (or without one), zeros.
    fn read_backing(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        let Some(backing) = self.backing.as_deref_mut() else {
            buf.fill(0);
            return Ok(());
        };
        let present = backing.size.saturating_sub(offset).min(buf.len() as u64) as usize;
        if present > 0 {
            backing.read_at(&mut buf[..present], offset)?;
        }
        buf[present..].fill(0);
        Ok(())
    }

    /// Writes guest data at `offset` to the top image; the backing images
    /// are never written.
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len())?;
        if let Body::Raw(file) = &self.body {
            return file.write_all_at(buf, offset).map_err(|e| self.io_err(e));
        }
        let cs = self.cluster_size();
        let mut done = 0usize;
        let mut cluster = Vec::new();
        while done < buf.len() {
            let at = offset + done as u64;
            let in_cluster = at % cs;
            let n = ((cs - in_cluster) as usize).min(buf.len() - done);
            let piece = &buf[done..done + n];
            let Body::Qcow2(q) = &mut self.body else {
                unreachable!()
            };
            let mapping = q.map(at).map_err(|e| ImageError::Qcow2 {
                path: self.path.clone(),
                source: e,
            })?;
            if let Mapping::Data {
                host,
                in_place: true,
            } = mapping
            {
                q.write_in_place(host, in_cluster, piece)
                    .map_err(|e| self.q_err(e))?;
            } else {
                // A new cluster: the old content around the written piece.
                cluster.resize(cs as usize, 0);
                let start = at - in_cluster;
                if n as u64 != cs {
                    let valid = (self.size - start).min(cs) as usize;
                    self.read_at(&mut cluster[..valid], start)?;
                    cluster[valid..].fill(0);
                }
                cluster[in_cluster as usize..in_cluster as usize + n].copy_from_slice(piece);
                let Body::Qcow2(q) = &mut self.body else {
                    unreachable!()
                };
                q.write_new_cluster(start, &cluster)
                    .map_err(|e| ImageError::Qcow2 {
                        path: self.path.clone(),
                        source: e,
                    })?;
            }
            done += n;
        }
        Ok(())
    }

    /// What the `len` bytes at `offset` hold, as far as the metadata tells
    /// without reading data: returns the kind of the first run and its
    /// length (at most `len`).
    pub fn extent(&mut self, offset: u64, len: u64) -> Result<(Extent, u64)> {
        self.check_range(offset, len as usize)?;
        if len == 0 {
            return Ok((Extent::Zero, 0));
        }
        match &mut self.body {
            Body::Raw(file) => raw_extent(file, offset, len).map_err(|e| self.io_err(e)),
            Body::Qcow2(_) => self.qcow2_extent(offset, len),
        }
    }

    fn qcow2_extent(&mut self, offset: u64, len: u64) -> Result<(Extent, u64)> {
        let cs = self.cluster_size();
        let end = offset + len;
        let mut at = offset;
        let mut kind = None;
        while at < end {
            let n = (cs - at % cs).min(end - at);
            let Body::Qcow2(q) = &mut self.body else {
                unreachable!()
            };
            let mapping = q.map(at).map_err(|e| ImageError::Qcow2 {
                path: self.path.clone(),
                source: e,
            })?;
            let (this, run) = match mapping {
                Mapping::Zero => (Extent::Zero, n),
                Mapping::Data { .. } | Mapping::Compressed(_) => (Extent::Data, n),
                Mapping::Unallocated => match self.backing.as_deref_mut() {
                    Some(b) if at < b.size => b.extent(at, n.min(b.size - at))?,
                    _ => (Extent::Zero, n),
                },
            };
            match kind {
                None => kind = Some(this),
                Some(k) if k != this => break,
                Some(_) => {}
            }
            at += run;
            if run < n {
                break;
            }
        }
        Ok((kind.unwrap_or(Extent::Zero), at - offset))
    }

    /// Writes everything to stable storage (fdatasync: the data and what
    /// reading it back needs, such as the file's length).
    pub fn flush(&self) -> Result<()> {
        match &self.body {
            Body::Raw(file) => file.sync_data().map_err(|e| self.io_err(e)),
            Body::Qcow2(q) => q.flush().map_err(|e| self.q_err(e)),
        }
    }

    /// Frees `len` bytes at `offset` of a raw image (they read as zeros
    /// afterwards); qcow2 images cannot free clusters yet.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        let size = usize::try_from(len).map_err(|_| ImageError::OutOfRange {
            path: self.path.clone(),
            offset,
            len,
            size: self.size,
        })?;
        self.check_range(offset, size)?;
        let Body::Raw(file) = &self.body else {
            return Err(ImageError::NoDiscard {
                path: self.path.clone(),
            });
        };
        if len == 0 {
            return Ok(());
        }
        let flags = nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
            | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE;
        // Both fit in i64: check_range bounded them by the file's size.
        use std::os::fd::AsRawFd;
        nix::fcntl::fallocate(file.as_raw_fd(), flags, offset as i64, len as i64)
            .map_err(|e| self.io_err(e.into()))
    }
}

/// Data or hole at `offset` in a raw file, from SEEK_DATA and SEEK_HOLE.
fn raw_extent(file: &File, offset: u64, len: u64) -> io::Result<(Extent, u64)> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let end = offset + len;
    let to_off =
        |o: u64| i64::try_from(o).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    match lseek(fd, to_off(offset)?, Whence::SeekData) {
        Ok(data) if data as u64 > offset => Ok((Extent::Zero, (data as u64).min(end) - offset)),
        Ok(_) => match lseek(fd, to_off(offset)?, Whence::SeekHole) {
            Ok(hole) => Ok((Extent::Data, (hole as u64).clamp(offset + 1, end) - offset)),
            Err(_) => Ok((Extent::Data, len)),
        },
        // No data after offset: the rest of the file is a hole.
        Err(nix::errno::Errno::ENXIO) => Ok((Extent::Zero, len)),
        // The file system cannot tell: treat it as data.
        Err(_) => Ok((Extent::Data, len)),
    }
}

/// Copies every non-zero part of `src` into `dst` (no smaller than `src`),
/// which must read as zeros where it is not written: holes stay holes and
/// zero clusters are not written. Returns the bytes written.
pub fn convert(src: &mut Image, dst: &mut Image) -> Result<u64> {
    if dst.size() < src.size() {
        return Err(ImageError::TooSmall {
            path: src.path.clone(),
            size: dst.size(),
        });
    }
    let chunk = dst.cluster_size().max(64 << 10);
    let mut buf = vec![0u8; chunk as usize];
    let mut written = 0;
    let mut offset = 0;
    while offset < src.size() {
        let len = (chunk - offset % chunk).min(src.size() - offset);
        if chunk_has_data(src, offset, len)? {
            let piece = &mut buf[..len as usize];
            src.read_at(piece, offset)?;
            if piece.iter().any(|&b| b != 0) {
                dst.write_at(piece, offset)?;
                written += len;
            }
        }
        offset += len;
    }
    Ok(written)
}

fn chunk_has_data(image: &mut Image, offset: u64, len: u64) -> Result<bool> {
    let mut at = offset;
    while at < offset + len {
        let (kind, run) = image.extent(at, offset + len - at)?;
        if kind == Extent::Data {
            return Ok(true);
        }
        at += run.max(1);
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory removed when dropped, even if the test fails.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let path = std::env::temp_dir().join(format!("image-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir(&path).unwrap();
            TempDir(path)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn new_file(path: &Path) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .unwrap()
    }

    fn backing(name: &str, format: DiskFormat) -> Option<qcow2::Backing> {
        Some(qcow2::Backing {
            name: name.into(),
            format_extension: Some(format),
        })
    }

    #[test]
    fn overlay_reads_through_and_writes_on_top() {
        let dir = TempDir::new("overlay");
        let base_path = dir.0.join("base.img");
        let mut base = Image::create(
            &base_path,
            new_file(&base_path),
            DiskFormat::Raw,
            1 << 20,
            16,
            None,
        )
        .unwrap();
        base.write_at(&[0xaa; 1000], 5000).unwrap();
        drop(base);
        let top_path = dir.0.join("top.qcow2");
        let top_file = new_file(&top_path);
        let b = backing("base.img", DiskFormat::Raw);
        drop(Image::create(&top_path, top_file, DiskFormat::Qcow2, 1 << 20, 12, b).unwrap());

        let mut top = Image::open(&top_path, DiskFormat::Qcow2, true).unwrap();
        assert_eq!(top.backing().map(|b| b.format()), Some(DiskFormat::Raw));
        // A partial write into an unallocated cluster keeps the base's data.
        top.write_at(&[0x55; 10], 5100).unwrap();
        let mut buf = vec![0u8; 1000];
        top.read_at(&mut buf, 5000).unwrap();
        assert!(buf[..100].iter().all(|&b| b == 0xaa));
        assert!(buf[100..110].iter().all(|&b| b == 0x55));
        assert!(buf[110..].iter().all(|&b| b == 0xaa));
        assert_eq!(top.extent(0, 4096).unwrap(), (Extent::Zero, 4096));
        assert_eq!(top.extent(4096, 8192).unwrap().0, Extent::Data);
        assert!(matches!(
            top.read_at(&mut buf, (1 << 20) - 10),
            Err(ImageError::OutOfRange { .. })
        ));

        // The base is untouched.
        let mut base = Image::open(&base_path, DiskFormat::Raw, false).unwrap();
        base.read_at(&mut buf, 5000).unwrap();
        assert!(buf.iter().all(|&b| b == 0xaa));
    }

    #[test]
    fn refuses_loops_depth_and_disagreeing_formats() {
        let dir = TempDir::new("chain");
        let a = dir.0.join("a.qcow2");
        let b = dir.0.join("b.qcow2");
        let fa = new_file(&a);
        drop(
            Image::create(
                &a,
                fa,
                DiskFormat::Qcow2,
                1 << 20,
                16,
                backing("b.qcow2", DiskFormat::Qcow2),
            )
            .unwrap(),
        );
        let fb = new_file(&b);
        drop(
            Image::create(
                &b,
                fb,
                DiskFormat::Qcow2,
                1 << 20,
                16,
                backing("a.qcow2", DiskFormat::Qcow2),
            )
            .unwrap(),
        );
        let err = Image::open(&a, DiskFormat::Qcow2, false).err().unwrap();
        assert!(matches!(err, ImageError::ChainLoop { .. }), "{err}");

        let mut prev: Option<String> = None;
        for i in 0..=MAX_CHAIN_DEPTH {
            let p = dir.0.join(format!("d{i}.qcow2"));
            let f = new_file(&p);
            let bk = prev.as_deref().and_then(|n| backing(n, DiskFormat::Qcow2));
            drop(Image::create(&p, f, DiskFormat::Qcow2, 1 << 20, 16, bk).unwrap());
            prev = Some(format!("d{i}.qcow2"));
        }
        let top = dir.0.join(format!("d{MAX_CHAIN_DEPTH}.qcow2"));
        let err = Image::open(&top, DiskFormat::Qcow2, false).err().unwrap();
        assert!(matches!(err, ImageError::ChainTooDeep { .. }), "{err}");
        let ok = dir.0.join(format!("d{}.qcow2", MAX_CHAIN_DEPTH - 1));
        assert!(Image::open(&ok, DiskFormat::Qcow2, false).is_ok());

        let err = Image::open(&a, DiskFormat::Raw, false).err().unwrap();
        assert!(
            matches!(err, ImageError::RawWithQcow2Header { .. }),
            "{err}"
        );
        let raw = dir.0.join("r.img");
        std::fs::write(&raw, [1u8; 4096]).unwrap();
        let err = Image::open(&raw, DiskFormat::Qcow2, false).err().unwrap();
        assert!(err.to_string().contains("bad magic"), "{err}");
    }

    #[test]
    fn convert_keeps_holes() {
        let dir = TempDir::new("convert");
        let src_path = dir.0.join("src.img");
        let mut src = Image::create(
            &src_path,
            new_file(&src_path),
            DiskFormat::Raw,
            8 << 20,
            16,
            None,
        )
        .unwrap();
        src.write_at(&[3u8; 70000], 1 << 20).unwrap();
        src.write_at(&[0u8; 65536], 4 << 20).unwrap(); // allocated but zero
        let dst_path = dir.0.join("dst.qcow2");
        let mut dst = Image::create(
            &dst_path,
            new_file(&dst_path),
            DiskFormat::Qcow2,
            8 << 20,
            16,
            None,
        )
        .unwrap();
        let written = convert(&mut src, &mut dst).unwrap();
        assert_eq!(written, 2 * 65536);
        let mut buf = vec![0u8; 70000];
        dst.read_at(&mut buf, 1 << 20).unwrap();
        assert!(buf.iter().all(|&b| b == 3));
        assert_eq!(dst.extent(4 << 20, 65536).unwrap(), (Extent::Zero, 65536));
    }

    #[test]
    fn discard_frees_raw_ranges_and_is_refused_on_qcow2() {
        use std::os::unix::fs::MetadataExt;
        let dir = TempDir::new("discard");
        let raw_path = dir.0.join("d.raw");
        let mut raw = Image::create(
            &raw_path,
            new_file(&raw_path),
            DiskFormat::Raw,
            1 << 20,
            16,
            None,
        )
        .unwrap();
        raw.write_at(&[0x77; 256 << 10], 0).unwrap();
        raw.flush().unwrap();
        let before = std::fs::metadata(&raw_path).unwrap().blocks();
        raw.discard(64 << 10, 128 << 10).unwrap();
        raw.discard(0, 0).unwrap();
        let mut back = vec![0u8; 256 << 10];
        raw.read_at(&mut back, 0).unwrap();
        assert!(back[..64 << 10].iter().all(|&b| b == 0x77));
        assert!(back[64 << 10..192 << 10].iter().all(|&b| b == 0));
        assert!(back[192 << 10..].iter().all(|&b| b == 0x77));
        assert!(std::fs::metadata(&raw_path).unwrap().blocks() < before);
        assert_eq!(std::fs::metadata(&raw_path).unwrap().len(), 1 << 20);
        assert!(matches!(
            raw.discard(1 << 20, 512),
            Err(ImageError::OutOfRange { .. })
        ));
        let q_path = dir.0.join("d.qcow2");
        let mut q = Image::create(
            &q_path,
            new_file(&q_path),
            DiskFormat::Qcow2,
            1 << 20,
            16,
            None,
        )
        .unwrap();
        assert!(matches!(
            q.discard(0, 512),
            Err(ImageError::NoDiscard { .. })
        ));
    }
}
