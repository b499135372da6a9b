//! Opening the files a start request names (parent side), with the
//! rights of whoever asked.
//!
//! The parent is root. A path a non-root user named (`-b`, `--initrd`,
//! `-d` and every backing file of its qcow2 chain, `-r`) is opened by a
//! short-lived helper the parent forks: it takes the requester's uid as
//! fsuid, gid as fsgid and its supplementary groups, opens each path and
//! passes the descriptors back over a socketpair (imsg frames,
//! SCM_RIGHTS). The kernel decides what the user may open, at the moment
//! of the open: there is no check-then-open race, and a symlink to a file
//! the user could not read itself gains nothing. Disks are opened
//! read-write, so a user boots only disks it could write.
//!
//! Every open is `O_NONBLOCK | O_NOCTTY` (a FIFO or a device cannot block
//! it or become a controlling terminal) and must give a regular file. The
//! parent waits at most [`OPEN_TIMEOUT`] for the helper, so an open that
//! hangs (a dead network file system) cannot stall it; the helper is then
//! killed and reaped by the parent's loop.
//!
//! Paths from root's own configuration, and every path root names, are
//! opened by the parent itself ([`userfiles_open_root`]); but a backing
//! file is opened as root only when named by a layer only root can write:
//! below a layer another user can write, the chain is opened by the helper
//! with that layer's owner's rights.

use crate::vmm::Requester;
use common::image::{self, ImageError};
use common::imsg::{self, Channel, FileRefusal, Frame, Message, RefusalReason, VmFdKind};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{ForkResult, Pid};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};
use thiserror::Error;

/// How long the parent waits for the helper to open everything.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// A file a VM needs: what it is for (a disk's top image, with its index
/// and format) and the path named for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    pub kind: VmFdKind,
    pub path: String,
}

/// A file opened for a VM; a disk gives one per file of its chain (layer
/// 0 the top, read-write; the rest read-only).
#[derive(Debug)]
pub struct Opened {
    pub kind: VmFdKind,
    pub path: String,
    pub file: File,
}

#[derive(Debug, Error)]
pub enum UserFilesError {
    #[error("{}", refusal_text(.0))]
    Refused(FileRefusal),
    #[error("opening files as uid {uid}: {why}")]
    Helper { uid: u32, why: String },
    #[error("opening files as uid {uid}: no answer within {}s (a file system does not respond?)", OPEN_TIMEOUT.as_secs())]
    Timeout { uid: u32 },
}

/// A refusal in words, naming the file.
pub fn refusal_text(r: &FileRefusal) -> String {
    match &r.why {
        RefusalReason::PermissionDenied => format!("{}: permission denied", r.path),
        RefusalReason::Missing => format!("{}: No such file or directory", r.path),
        RefusalReason::NotRegular => format!("{}: not a regular file", r.path),
        RefusalReason::Other(why) => why.clone(),
    }
}

/// Opens everything in `wants` as the process is (root, or the helper
/// with the requester's file system identity), stopping at the first
/// refusal.
pub fn userfiles_open(wants: &[Want]) -> Result<Vec<Opened>, FileRefusal> {
    let mut opened = Vec::new();
    for want in wants {
        match want.kind {
            VmFdKind::Disk {
                disk,
                format,
                writable,
                ..
            } => {
                let layers =
                    image::open_chain(Path::new(&want.path), format, writable, |p, _, w| {
                        open_file(p, w)
                    })
                    .map_err(|e| chain_refusal(want.kind, e))?;
                for (layer, l) in layers.into_iter().enumerate() {
                    opened.push(Opened {
                        kind: VmFdKind::Disk {
                            disk,
                            layer: layer as u8,
                            format: l.format,
                            writable: writable && layer == 0,
                        },
                        path: l.path.display().to_string(),
                        file: l.file,
                    });
                }
            }
            kind => {
                let file = open_file(Path::new(&want.path), false).map_err(|e| FileRefusal {
                    kind,
                    path: want.path.clone(),
                    why: io_reason(&e),
                })?;
                opened.push(Opened {
                    kind,
                    path: want.path.clone(),
                    file,
                });
            }
        }
    }
    Ok(opened)
}

/// Opens `wants` with `req`'s file system identity in a helper process;
/// root's own requests are opened here directly.
pub fn userfiles_open_as(req: &Requester, wants: &[Want]) -> Result<Vec<Opened>, UserFilesError> {
    if wants.is_empty() {
        return Ok(Vec::new());
    }
    if req.uid == 0 {
        return userfiles_open(wants).map_err(UserFilesError::Refused);
    }
    let helper_err = |why: String| UserFilesError::Helper { uid: req.uid, why };
    let (mine, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| helper_err(format!("socketpair: {e}")))?;
    // SAFETY: the parent is single-threaded, so the child may allocate;
    // it only opens files, writes to its socket and _exits.
    match unsafe { nix::unistd::fork() } {
        Err(e) => Err(helper_err(format!("fork: {e}"))),
        Ok(ForkResult::Child) => {
            drop(mine);
            userfiles_helper(req, wants, theirs)
        }
        Ok(ForkResult::Parent { child }) => {
            drop(theirs);
            let result = userfiles_collect(Channel::new(mine), OPEN_TIMEOUT, req.uid);
            userfiles_end(child);
            result
        }
    }
}

/// Opens one file of root's (from vm.conf, a template, or named by root)
/// as root. A disk's backing file is followed as root only from a layer
/// that root alone can write (owned by root, without group or other write
/// permission), judged on the open descriptor whose header names it: any
/// other layer's backing name was written by its owner, so the rest of the
/// chain is opened by the helper with that owner's rights (an overlay
/// cannot make root hand /etc/shadow to a guest), and a root-owned layer
/// others may write is refused.
pub fn userfiles_open_root(want: &Want) -> Result<Vec<Opened>, UserFilesError> {
    let VmFdKind::Disk {
        disk,
        format,
        writable,
        ..
    } = want.kind
    else {
        return userfiles_open(std::slice::from_ref(want)).map_err(UserFilesError::Refused);
    };
    let mut opened: Vec<Opened> = Vec::new();
    // The owner of the layer opened last, if root is not its only writer.
    let mut written_by: Option<(u32, String)> = None;
    let mut rest: Option<(u32, Want)> = None;
    let chain = image::open_chain(
        Path::new(&want.path),
        format,
        writable,
        |path, format, w| {
            let layer = opened.len() as u8;
            if let Some((owner, _)) = written_by.take() {
                let kind = VmFdKind::Disk {
                    disk,
                    layer: 0,
                    format,
                    writable: false,
                };
                let path = path.display().to_string();
                rest = Some((owner, Want { kind, path }));
                return Err(io::Error::other(UNTRUSTED));
            }
            let file = open_file(path, w)?;
            let meta = file.metadata()?;
            if meta.uid() != 0 || meta.mode() & 0o022 != 0 {
                written_by = Some((meta.uid(), path.display().to_string()));
            }
            opened.push(Opened {
                kind: VmFdKind::Disk {
                    disk,
                    layer,
                    format,
                    writable: w,
                },
                path: path.display().to_string(),
                file: file.try_clone()?,
            });
            Ok(file)
        },
    );
    match (chain, rest) {
        (Ok(_), _) => Ok(opened),
        (Err(_), Some((owner, rest))) => {
            if owner == 0 {
                let layer = opened.last().map_or(String::new(), |o| o.path.clone());
                return Err(UserFilesError::Refused(FileRefusal {
                    kind: want.kind,
                    path: layer.clone(),
                    why: RefusalReason::Other(format!(
                        "{layer}: writable by users other than root: its backing file is not followed"
                    )),
                }));
            }
            let below = userfiles_open_as(&owner_identity(owner, &rest.path)?, &[rest])?;
            let offset = opened.len() as u8;
            opened.extend(below.into_iter().map(|mut o| {
                if let VmFdKind::Disk { layer, .. } = &mut o.kind {
                    *layer = layer.saturating_add(offset);
                }
                o
            }));
            Ok(opened)
        }
        (Err(e), None) => Err(UserFilesError::Refused(chain_refusal(want.kind, e))),
    }
}

const UNTRUSTED: &str = "backing file named by a layer root does not alone control";

/// Whose rights a user's file is opened with: the uid, its primary group
/// and groups from the user database, or for a uid that has no entry the
/// overflow group and no others.
fn owner_identity(uid: u32, path: &str) -> Result<Requester, UserFilesError> {
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)).map_err(|e| {
        UserFilesError::Helper {
            uid,
            why: format!("cannot look up the owner: {e}"),
        }
    })?;
    let (gid, groups) = match user {
        Some(u) => {
            let name =
                std::ffi::CString::new(u.name.as_str()).map_err(|_| UserFilesError::Helper {
                    uid,
                    why: "a user name with a NUL byte".into(),
                })?;
            let groups =
                nix::unistd::getgrouplist(&name, u.gid).map_err(|e| UserFilesError::Helper {
                    uid,
                    why: format!("cannot look up the owner's groups: {e}"),
                })?;
            (u.gid.as_raw(), groups.iter().map(|g| g.as_raw()).collect())
        }
        None => (OVERFLOW_GID, Vec::new()),
    };
    Ok(Requester {
        uid,
        gid,
        groups,
        named: vec![path.to_string()],
    })
}

/// The group of ids the system does not know (nogroup).
const OVERFLOW_GID: u32 = 65534;

/// The helper: becomes the requester for file access, opens, sends every
/// descriptor and the outcome, exits. Never returns.
fn userfiles_helper(req: &Requester, wants: &[Want], sock: OwnedFd) -> ! {
    let groups: Vec<nix::unistd::Gid> = req
        .groups
        .iter()
        .map(|&g| nix::unistd::Gid::from_raw(g))
        .collect();
    // SAFETY: prctl, setfsgid and setfsuid take plain integers.
    let became = unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) == 0
            && nix::unistd::setgroups(&groups).is_ok()
            && {
                libc::setfsgid(req.gid);
                libc::setfsuid(req.uid);
                // Each returns the previous id: asking again tells whether
                // the change took.
                libc::setfsgid(req.gid) as u32 == req.gid
                    && libc::setfsuid(req.uid) as u32 == req.uid
            }
    };
    let outcome = if became {
        userfiles_open(wants)
    } else {
        Err(FileRefusal {
            kind: wants[0].kind,
            path: wants[0].path.clone(),
            why: RefusalReason::Other(format!(
                "cannot take on uid {} and gid {} to open files",
                req.uid, req.gid
            )),
        })
    };
    let sent = match outcome {
        Ok(opened) => opened
            .into_iter()
            .try_for_each(|o| {
                let mut frame = Frame::new(Message::UserFile {
                    kind: o.kind,
                    path: o.path,
                });
                frame.fd = Some(o.file.into());
                imsg::send_blocking(sock.as_fd(), frame)
            })
            .and_then(|()| {
                imsg::send_blocking(
                    sock.as_fd(),
                    Frame::new(Message::UserFilesDone { refusal: None }),
                )
            }),
        Err(refusal) => imsg::send_blocking(
            sock.as_fd(),
            Frame::new(Message::UserFilesDone {
                refusal: Some(refusal),
            }),
        ),
    };
    // SAFETY: _exit ends this process without running the parent's
    // destructors or atexit handlers (it is a fork of the parent).
    unsafe { libc::_exit(if sent.is_ok() { 0 } else { 1 }) }
}

/// Reads the helper's answer: every file, then the outcome, within
/// `timeout`.
fn userfiles_collect(
    mut channel: Channel,
    timeout: Duration,
    uid: u32,
) -> Result<Vec<Opened>, UserFilesError> {
    let helper_err = |why: String| UserFilesError::Helper { uid, why };
    let deadline = Instant::now() + timeout;
    let mut opened = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(UserFilesError::Timeout { uid });
        }
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        let mut pfd = [PollFd::new(channel.sock.as_fd(), PollFlags::POLLIN)];
        match nix::poll::poll(
            &mut pfd,
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(helper_err(format!("poll: {e}"))),
        }
        let (frames, eof) = channel.receive().map_err(|e| helper_err(e.to_string()))?;
        for frame in frames {
            match (frame.message, frame.fd) {
                (Message::UserFile { kind, path }, Some(fd)) => opened.push(Opened {
                    kind,
                    path,
                    file: File::from(fd),
                }),
                (Message::UserFilesDone { refusal: None }, None) => return Ok(opened),
                (Message::UserFilesDone { refusal: Some(r) }, None) => {
                    return Err(UserFilesError::Refused(r))
                }
                (other, _) => {
                    return Err(helper_err(format!(
                        "unexpected {} from the helper",
                        other.type_code().1
                    )))
                }
            }
        }
        if eof {
            return Err(helper_err("the helper ended without an answer".into()));
        }
    }
}

/// Kills the helper (done or not) and reaps it if it is gone at once;
/// one stuck in an open is reaped later by the parent's loop.
fn userfiles_end(child: Pid) {
    let _ = kill(child, Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(2)),
            _ => return,
        }
    }
}

/// Opens one file for a VM: never blocking (a FIFO or a device), never
/// becoming a controlling terminal, and only a regular file.
fn open_file(path: &Path, writable: bool) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::other(NOT_REGULAR));
    }
    // Back to blocking I/O for QEMU (O_NONBLOCK only guarded the open).
    nix::fcntl::fcntl(
        file.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
    )?;
    Ok(file)
}

const NOT_REGULAR: &str = "not a regular file";

fn io_reason(e: &io::Error) -> RefusalReason {
    match e.raw_os_error().map(Errno::from_raw) {
        Some(Errno::EACCES | Errno::EPERM) => RefusalReason::PermissionDenied,
        Some(Errno::ENOENT | Errno::ENOTDIR) => RefusalReason::Missing,
        Some(Errno::EISDIR | Errno::ENXIO) => RefusalReason::NotRegular,
        None if e.to_string() == NOT_REGULAR => RefusalReason::NotRegular,
        _ => RefusalReason::Other(common::qcow2::io_message(e)),
    }
}

/// A disk chain's failure: the file that failed and why.
fn chain_refusal(kind: VmFdKind, e: ImageError) -> FileRefusal {
    match e {
        ImageError::Io { path, source } => {
            let why = match io_reason(&source) {
                RefusalReason::Other(_) => RefusalReason::Other(
                    ImageError::Io {
                        path: path.clone(),
                        source,
                    }
                    .to_string(),
                ),
                why => why,
            };
            FileRefusal {
                kind,
                path: path.display().to_string(),
                why,
            }
        }
        other => FileRefusal {
            kind,
            path: String::new(),
            why: RefusalReason::Other(other.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::disk::DiskFormat;
    use std::io::Read;

    fn dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("vmd-userfiles-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("dir");
        d
    }

    fn disk(index: u8, path: &Path, format: DiskFormat) -> Want {
        Want {
            kind: VmFdKind::Disk {
                disk: index,
                layer: 0,
                format,
                writable: true,
            },
            path: path.display().to_string(),
        }
    }

    #[test]
    fn opens_regular_files_and_refuses_the_rest() {
        let d = dir("kinds");
        let kernel = d.join("k");
        std::fs::write(&kernel, b"kernel").expect("write");
        let fifo = d.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("fifo");
        let want = |kind, path: &Path| Want {
            kind,
            path: path.display().to_string(),
        };
        let mut got = userfiles_open(&[want(VmFdKind::Kernel, &kernel)]).expect("kernel");
        let mut text = String::new();
        got[0].file.read_to_string(&mut text).expect("read");
        assert_eq!(text, "kernel");
        // A FIFO neither blocks the open nor passes.
        let refused = userfiles_open(&[want(VmFdKind::Cdrom, &fifo)]).expect_err("fifo");
        assert_eq!(refused.why, RefusalReason::NotRegular);
        assert_eq!(refused.kind, VmFdKind::Cdrom);
        let refused = userfiles_open(&[want(VmFdKind::Cdrom, &d)]).expect_err("dir");
        assert_eq!(refused.why, RefusalReason::NotRegular);
        let refused =
            userfiles_open(&[want(VmFdKind::Initrd, &d.join("none"))]).expect_err("missing");
        assert_eq!(refused.why, RefusalReason::Missing);
        assert_eq!(
            refusal_text(&FileRefusal {
                kind: VmFdKind::Kernel,
                path: "/x".into(),
                why: RefusalReason::PermissionDenied
            }),
            "/x: permission denied"
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_disk_gives_its_whole_chain() {
        let d = dir("chain");
        let base = d.join("base.img");
        std::fs::write(&base, vec![0u8; 1 << 16]).expect("base");
        let top = d.join("top.qcow2");
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&top)
            .expect("create overlay");
        let backing = common::qcow2::Backing {
            name: base.clone(),
            format_extension: Some(DiskFormat::Raw),
        };
        let image = image::Image::create(&top, file, DiskFormat::Qcow2, 1 << 16, 16, Some(backing))
            .expect("overlay");
        image.flush().expect("flush");
        drop(image);
        let got = userfiles_open(&[disk(1, &top, DiskFormat::Qcow2)]).expect("chain");
        let kinds: Vec<VmFdKind> = got.iter().map(|o| o.kind).collect();
        assert_eq!(
            kinds,
            [
                VmFdKind::Disk {
                    disk: 1,
                    layer: 0,
                    format: DiskFormat::Qcow2,
                    writable: true
                },
                VmFdKind::Disk {
                    disk: 1,
                    layer: 1,
                    format: DiskFormat::Raw,
                    writable: false
                }
            ]
        );
        std::fs::remove_file(&base).expect("rm base");
        let refused = userfiles_open(&[disk(1, &top, DiskFormat::Qcow2)]).expect_err("no base");
        assert_eq!(
            (refused.path.as_str(), refused.why),
            (base.to_str().unwrap(), RefusalReason::Missing)
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn the_helper_opens_as_the_requester() {
        // Runs as root in `make test`; as another user it cannot switch.
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let d = dir("helper");
        std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        let open = d.join("open.img");
        let closed = d.join("closed.img");
        for (p, mode) in [(&open, 0o666), (&closed, 0o600)] {
            std::fs::write(p, vec![0u8; 4096]).expect("write");
            std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(mode))
                .expect("chmod");
        }
        let nobody = Requester {
            uid: 65534,
            gid: 65534,
            groups: Vec::new(),
            named: Vec::new(),
        };
        let got = userfiles_open_as(&nobody, &[disk(0, &open, DiskFormat::Raw)]).expect("open");
        assert_eq!(got.len(), 1);
        match userfiles_open_as(&nobody, &[disk(0, &closed, DiskFormat::Raw)]) {
            Err(UserFilesError::Refused(r)) => {
                assert_eq!(r.why, RefusalReason::PermissionDenied);
                assert_eq!(r.path, closed.display().to_string());
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        // Root itself opens it.
        assert!(
            userfiles_open_as(&Requester::root(), &[disk(0, &closed, DiskFormat::Raw)]).is_ok()
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_silent_helper_times_out() {
        let (mine, _theirs) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair");
        let started = Instant::now();
        let result = userfiles_collect(Channel::new(mine), Duration::from_millis(200), 1000);
        assert!(matches!(result, Err(UserFilesError::Timeout { uid: 1000 })));
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
