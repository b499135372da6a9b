//! `vmctl create`: make raw and qcow2 disk images without the daemon, as
//! the invoking user. A new image is empty, a qcow2 overlay on a base
//! image (-b), or a copy of another image and its backing chain (-i).
//! Every format comes from a `raw:`/`qcow2:` prefix or the `.qcow2`
//! extension, never from a file's content.

use crate::Global;
use common::disk::DiskFormat;
use common::getopt::{Getopt, Opt};
use common::image::{self, Image, ImageError};
use common::qcow2::{self, Backing};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use thiserror::Error;

pub const USAGE: &str = "disk [-b base | -i disk] [-s size]";

const MEGABYTE: u64 = 1 << 20;

#[derive(Debug, Error)]
enum CreateError {
    #[error("usage")]
    Usage,
    #[error("could not create {0}: missing size argument")]
    MissingSize(String),
    #[error("invalid disk size: {0}: {1}")]
    InvalidSize(String, common::size::SizeError),
    #[error("disk size must be at least 1MB")]
    SizeTooSmall,
    #[error("conflicting -b and -i arguments")]
    Conflicting,
    #[error("base images require qcow2 disk format")]
    BaseNeedsQcow2,
    #[error("failed to open base image file: {0}")]
    OpenBase(ImageError),
    #[error("base size does not match requested size")]
    BaseSizeMismatch,
    #[error("failed to open source image file: {0}")]
    OpenSource(ImageError),
    #[error("size cannot be smaller than input disk size")]
    SmallerThanInput,
    #[error("create imagefile operation failed: {}: {}", path.display(), qcow2::io_message(source))]
    CreateFile { path: PathBuf, source: io::Error },
    #[error("create imagefile operation failed: {0}")]
    Image(ImageError),
    #[error("failed to copy the source image: {0}")]
    Convert(ImageError),
}

/// What the command line asks for.
struct Request {
    disk: PathBuf,
    format: DiskFormat,
    size: Option<u64>,
    base: Option<String>,
    input: Option<String>,
}

pub fn run(global: &Global, args: &[String]) -> ExitCode {
    let request = match create_parse(args) {
        Ok(request) => request,
        Err(CreateError::Usage) => return crate::command_usage("create"),
        Err(e @ CreateError::MissingSize(_)) => {
            errln!("{e}");
            return crate::command_usage("create");
        }
        Err(e) => {
            errln!("vmctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    match create_image(&request, global) {
        Ok(()) => {
            errln!("vmctl: {} imagefile created", request.format);
            ExitCode::SUCCESS
        }
        Err(e) => {
            errln!("vmctl: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Reads `disk [-b base | -i disk] [-s size]`; options may also come
/// before the disk, as in OpenBSD's newer vmctl.
fn create_parse(args: &[String]) -> Result<Request, CreateError> {
    let (leading, options) = match args.first() {
        Some(first) if !first.starts_with('-') => (Some(first.as_str()), &args[1..]),
        _ => (None, args),
    };
    let (mut size, mut base, mut input) = (None, None, None);
    let mut getopt = Getopt::new(options, "b:i:s:", &[]);
    for opt in getopt.by_ref() {
        match opt {
            Ok(Opt::Short('b', Some(path))) => base = Some(path),
            Ok(Opt::Short('i', Some(path))) => input = Some(path),
            Ok(Opt::Short('s', Some(text))) => size = Some(create_parse_size(&text)?),
            Ok(_) => return Err(CreateError::Usage),
            Err(e) => {
                errln!("vmctl: {e}");
                return Err(CreateError::Usage);
            }
        }
    }
    let disk = match (leading, getopt.operands()) {
        (Some(disk), []) => disk,
        (None, [disk]) => disk.as_str(),
        _ => return Err(CreateError::Usage),
    };
    let (format, path) = DiskFormat::split_prefixed(disk);
    if path.is_empty() {
        return Err(CreateError::Usage);
    }
    if base.is_some() && input.is_some() {
        return Err(CreateError::Conflicting);
    }
    if base.is_some() && format != DiskFormat::Qcow2 {
        return Err(CreateError::BaseNeedsQcow2);
    }
    if size.is_none() && base.is_none() && input.is_none() {
        return Err(CreateError::MissingSize(path.to_string()));
    }
    Ok(Request {
        disk: PathBuf::from(path),
        format,
        size,
        base,
        input,
    })
}

/// A size from scan_scaled units, rounded down to megabytes.
fn create_parse_size(text: &str) -> Result<u64, CreateError> {
    let bytes =
        common::size::parse(text).map_err(|e| CreateError::InvalidSize(text.to_string(), e))?;
    if bytes < MEGABYTE {
        return Err(CreateError::SizeTooSmall);
    }
    let rounded = bytes / MEGABYTE * MEGABYTE;
    if rounded != bytes {
        errln!(
            "vmctl: disk size rounded to {}",
            common::size::format(rounded)
        );
    }
    Ok(rounded)
}

fn create_image(request: &Request, global: &Global) -> Result<(), CreateError> {
    // Everything is checked before the new file exists.
    let mut source = None;
    let mut backing = None;
    let size = if let Some(base) = &request.base {
        let (format, path) = DiskFormat::split_prefixed(base);
        let base_image =
            Image::open(Path::new(path), format, false).map_err(CreateError::OpenBase)?;
        match request.size {
            Some(size) if size != base_image.size() => return Err(CreateError::BaseSizeMismatch),
            _ => {}
        }
        backing = Some(Backing {
            name: create_backing_name(&request.disk, Path::new(path)),
            format_extension: Some(format),
        });
        base_image.size()
    } else if let Some(input) = &request.input {
        let (format, path) = DiskFormat::split_prefixed(input);
        let src = Image::open(Path::new(path), format, false).map_err(CreateError::OpenSource)?;
        let wanted = request.size.unwrap_or(src.size());
        if wanted < src.size() {
            return Err(CreateError::SmallerThanInput);
        }
        let size = wanted.next_multiple_of(MEGABYTE);
        if size != wanted {
            errln!(
                "vmctl: destination size rounded to {} megabytes",
                size / MEGABYTE
            );
        }
        source = Some(src);
        size
    } else {
        request.size.unwrap_or(0)
    };

    let output = NewFile::create(&request.disk)?;
    let file = output
        .file
        .try_clone()
        .map_err(|e| CreateError::CreateFile {
            path: request.disk.clone(),
            source: e,
        })?;
    let cluster_bits = qcow2::DEFAULT_CLUSTER_BITS;
    let mut image = Image::create(
        &request.disk,
        file,
        request.format,
        size,
        cluster_bits,
        backing,
    )
    .map_err(CreateError::Image)?;
    if let Some(src) = source.as_mut() {
        let written = image::convert(src, &mut image).map_err(CreateError::Convert)?;
        if global.verbose > 0 {
            errln!(
                "vmctl: {written} bytes of data copied from {}",
                src.path().display()
            );
        }
    }
    image.flush().map_err(CreateError::Image)?;
    drop(image);
    if request.base.is_some() {
        // The overlay must lead back to its base the way a reader goes.
        Image::open(&request.disk, request.format, false).map_err(CreateError::Image)?;
    }
    output.keep();
    Ok(())
}

/// The backing name recorded in an overlay: readers resolve a relative
/// name against the overlay's directory, so a relative base stays relative
/// only when the overlay is in the current directory. A name with `.` or
/// `..` in it is recorded as the base's real path (relative to the current
/// directory when the overlay is there and the base below it), never as
/// `sub/../base`, which a symlinked `sub` would send elsewhere later.
fn create_backing_name(disk: &Path, base: &Path) -> PathBuf {
    use std::path::Component;
    let in_cwd = disk.parent().is_none_or(|dir| dir.as_os_str().is_empty());
    let plain = base
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::RootDir));
    if plain && (base.is_absolute() || in_cwd) {
        return base.components().collect();
    }
    let Ok(real) = std::fs::canonicalize(base) else {
        return std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf());
    };
    let cwd = std::env::current_dir().and_then(std::fs::canonicalize);
    match cwd.as_deref().map(|cwd| real.strip_prefix(cwd)) {
        Ok(Ok(relative)) if in_cwd => relative.to_path_buf(),
        _ => real,
    }
}

/// The new image file: created exclusively (never overwriting anything)
/// and removed again unless `keep` is called.
struct NewFile {
    path: PathBuf,
    file: File,
    keep: bool,
}

impl NewFile {
    fn create(path: &Path) -> Result<NewFile, CreateError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| CreateError::CreateFile {
                path: path.to_path_buf(),
                source: e,
            })?;
        Ok(NewFile {
            path: path.to_path_buf(),
            file,
            keep: false,
        })
    }

    fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn parses_disk_options_and_prefixes() {
        let r = create_parse(&args(&["disk.qcow2", "-s", "4.5G"])).unwrap();
        assert_eq!((r.format, r.size), (DiskFormat::Qcow2, Some(4608 << 20)));
        let r = create_parse(&args(&["-s", "1G", "raw:x.qcow2"])).unwrap();
        assert_eq!(
            (r.format, r.disk),
            (DiskFormat::Raw, PathBuf::from("x.qcow2"))
        );
        let r = create_parse(&args(&["qcow2:x.img", "-b", "base.img"])).unwrap();
        assert_eq!(
            (r.format, r.size, r.base.as_deref()),
            (DiskFormat::Qcow2, None, Some("base.img"))
        );
        // 1.5M is rounded down to 1M.
        assert_eq!(
            create_parse(&args(&["d", "-s", "1.5M"])).unwrap().size,
            Some(1 << 20)
        );
    }

    #[test]
    fn refuses_bad_requests() {
        let err = |words: &[&str]| create_parse(&args(words)).err().unwrap().to_string();
        assert_eq!(
            err(&["d.qcow2", "-b", "b", "-i", "i"]),
            "conflicting -b and -i arguments"
        );
        assert_eq!(
            err(&["d.img", "-b", "b"]),
            "base images require qcow2 disk format"
        );
        assert_eq!(
            err(&["d.img"]),
            "could not create d.img: missing size argument"
        );
        assert_eq!(
            err(&["d.img", "-s", "12X"]),
            "invalid disk size: 12X: invalid size"
        );
        assert_eq!(
            err(&["d.img", "-s", "1000K"]),
            "disk size must be at least 1MB"
        );
        assert_eq!(err(&["d.img", "e.img", "-s", "1G"]), "usage");
        assert_eq!(err(&[]), "usage");
    }

    #[test]
    fn backing_names_resolve_from_the_overlay() {
        let name = create_backing_name(Path::new("o.qcow2"), Path::new("b.qcow2"));
        assert_eq!(name, PathBuf::from("b.qcow2"));
        let name = create_backing_name(Path::new("dir/o.qcow2"), Path::new("/x/b.qcow2"));
        assert_eq!(name, PathBuf::from("/x/b.qcow2"));
        let name = create_backing_name(Path::new("dir/o.qcow2"), Path::new("b.qcow2"));
        assert!(name.is_absolute() && name.ends_with("b.qcow2"));
        // `.` and `..` never reach the overlay.
        let dir = std::env::temp_dir().join(format!("vmctl-backing-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("b.img"), b"").unwrap();
        let dotted = dir.join("sub/../b.img");
        let name = create_backing_name(Path::new("dir/o.qcow2"), &dotted);
        let name2 = create_backing_name(Path::new("dir/o.qcow2"), &dir.join("./b.img"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            name,
            std::fs::canonicalize(std::env::temp_dir())
                .unwrap()
                .join(format!("vmctl-backing-{}/b.img", std::process::id()))
        );
        assert_eq!(name2, dir.join("b.img"));
    }
}
