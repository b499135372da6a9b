//! Opening the files a start request names, with the rights of whoever
//! asked.
//!
//! Everything here may wait (an open on a hung file system, a user
//! lookup), so none of it runs in the parent's loop: it runs in the
//! start's helper (helper.rs, launch.rs), a fork of the parent that stays
//! root. A path a non-root user named (`-b`, `--initrd`,
//! `-d` and every backing file of its qcow2 chain, `-r`) is opened by a
//! short-lived helper the start's helper forks: it becomes the requester entirely
//! (groups, real, effective and saved ids, every capability set empty,
//! killed with the parent) before its first open, opens each path and
//! passes the descriptors back over a socketpair (imsg frames,
//! SCM_RIGHTS). The kernel decides what the user may open, at the moment
//! of the open: there is no check-then-open race, and a symlink to a file
//! the user could not read itself gains nothing. Disks are opened
//! read-write, so a user boots only disks it could write.
//!
//! Every open is `O_NONBLOCK | O_NOCTTY` (a FIFO or a device cannot block
//! it or become a controlling terminal) and must give a regular file that
//! is not on a pseudo file system (procfs, sysfs...: the kernel's state,
//! readable without capabilities), for root too. The start's helper
//! waits at most until its deadline ([`OPEN_TIMEOUT`] from its start)
//! for the user's helper, so an open that hangs (a dead network file
//! system) ends with [`UserFilesError::Timeout`]; the user's helper is
//! then killed, and reaped by the start's helper or, once that has
//! ended, by the parent's loop (it is the subreaper).
//!
//! Paths from root's own configuration, and every path root names, are
//! opened as root ([`userfiles_open_root`]) only where root
//! alone controls every name on the path ([`walk_open`]); otherwise by
//! the helper with the VM owner's rights ([`Rights`]). A disk's backing
//! file is opened as root only when named by a layer only root can write:
//! below a layer another user can write, the chain is opened by the helper
//! with that layer's owner's rights.

use crate::parent::backend::Requester;
use crate::proc;
use common::config::Owner;
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
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use thiserror::Error;

/// How long a start's user helpers have, together, to open everything.
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
pub fn userfiles_open_as(
    req: &Requester,
    wants: &[Want],
    deadline: Instant,
) -> Result<Vec<Opened>, UserFilesError> {
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
    let parent = nix::unistd::getpid();
    // SAFETY: the parent is single-threaded, so the child may allocate;
    // it only opens files, writes to its socket and _exits.
    match unsafe { nix::unistd::fork() } {
        Err(e) => Err(helper_err(format!("fork: {e}"))),
        Ok(ForkResult::Child) => {
            drop(mine);
            userfiles_helper(req, wants, theirs, parent)
        }
        Ok(ForkResult::Parent { child }) => {
            drop(theirs);
            let result = userfiles_collect(Channel::new(mine), deadline, req.uid);
            userfiles_end(child);
            result
        }
    }
}

/// Whose rights open a configured path that root does not alone
/// control: the VM's owner's, or for a VM without an owner, the one user
/// who controls the path (else nobody's: refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rights {
    Owner(Requester),
    Ownerless,
}

/// The rights a VM's owner lends its configured paths: `owner joe` joe's
/// uid, primary group and groups; `owner :staff` staff's rights and no
/// user's (the overflow uid with that group); none for a VM root owns.
pub fn userfiles_owner_rights(owner: &Owner) -> Result<Rights, UserFilesError> {
    if owner.uid != 0 {
        return Ok(Rights::Owner(owner_identity(owner.uid, "")?));
    }
    match (&owner.user, owner.gid) {
        (None, Some(gid)) => Ok(Rights::Owner(Requester {
            uid: OVERFLOW_UID,
            gid,
            groups: vec![gid],
            named: Vec::new(),
        })),
        _ => Ok(Rights::Ownerless),
    }
}

/// Opens one configured file (from vm.conf, a template, or named by
/// root). Root opens a path itself only where root alone controls every
/// directory on it, judged on descriptors as it walks ([`walk_open`]);
/// at the first directory others can change, the path is handed to the
/// helper with `rights` (or the directory owner's, or refused: see
/// [`Rights`]). A disk's backing file is then followed as root only from
/// a layer that root alone can write (owned by root, without group or
/// other write permission), judged on the open descriptor whose header
/// names it, and only by the same walk: any other layer's backing name
/// was written by its owner, so the rest of the chain is opened by the
/// helper with that owner's rights (an overlay cannot make root hand
/// /etc/shadow to a guest), and a root-owned layer others may write is
/// refused.
pub fn userfiles_open_root(
    want: &Want,
    rights: &Rights,
    deadline: Instant,
) -> Result<Vec<Opened>, UserFilesError> {
    let VmFdKind::Disk {
        disk,
        format,
        writable,
        ..
    } = want.kind
    else {
        return match walk_open(Path::new(&want.path), false) {
            Ok(Walked::Root(file)) => Ok(vec![Opened {
                kind: want.kind,
                path: want.path.clone(),
                file,
            }]),
            Ok(Walked::Hole(hole)) => {
                let who = hole_rights(want, &hole, rights)?;
                userfiles_open_as(&who, std::slice::from_ref(want), deadline)
            }
            Err(e) => Err(UserFilesError::Refused(FileRefusal {
                kind: want.kind,
                path: want.path.clone(),
                why: io_reason(&e),
            })),
        };
    };
    let mut opened: Vec<Opened> = Vec::new();
    // The owner of the layer opened last, if root is not its only writer.
    let mut written_by: Option<u32> = None;
    // Where root stopped: who opens the rest, and from which path.
    let mut rest: Option<(Handover, Want)> = None;
    let chain = image::open_chain(
        Path::new(&want.path),
        format,
        writable,
        |path, format, w| {
            let layer = opened.len() as u8;
            let stop = |rest: &mut Option<(Handover, Want)>, to| {
                let kind = VmFdKind::Disk {
                    disk,
                    layer: 0,
                    format,
                    writable: w,
                };
                let path = path.display().to_string();
                *rest = Some((to, Want { kind, path }));
                FileError::Untrusted.into()
            };
            if let Some(owner) = written_by.take() {
                return Err(stop(&mut rest, Handover::LayerOwner(owner)));
            }
            let file = match walk_open(path, w)? {
                Walked::Root(file) => file,
                Walked::Hole(hole) => return Err(stop(&mut rest, Handover::Hole(hole))),
            };
            let meta = file.metadata()?;
            if meta.uid() != 0 || meta.mode() & 0o022 != 0 {
                written_by = Some(meta.uid());
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
    let (to, rest) = match (chain, rest) {
        (Ok(_), _) => return Ok(opened),
        (Err(_), Some(rest)) => rest,
        (Err(e), None) => return Err(UserFilesError::Refused(chain_refusal(want.kind, e))),
    };
    let who = match to {
        Handover::LayerOwner(0) => {
            let layer = opened.last().map_or(String::new(), |o| o.path.clone());
            return Err(UserFilesError::Refused(FileRefusal {
                kind: want.kind,
                path: layer.clone(),
                why: RefusalReason::Other(format!(
                    "{layer}: writable by users other than root: its backing file is not followed"
                )),
            }));
        }
        Handover::LayerOwner(owner) => owner_identity(owner, &rest.path)?,
        Handover::Hole(hole) => hole_rights(&rest, &hole, rights)?,
    };
    let below = userfiles_open_as(&who, &[rest], deadline)?;
    let offset = opened.len() as u8;
    opened.extend(below.into_iter().map(|mut o| {
        if let VmFdKind::Disk { layer, .. } = &mut o.kind {
            *layer = layer.saturating_add(offset);
        }
        o
    }));
    Ok(opened)
}

/// Who opens the rest of a disk chain root stopped following.
enum Handover {
    /// The owner of the layer that names it (root: refused).
    LayerOwner(u32),
    /// The path runs through a directory root does not alone control.
    Hole(Hole),
}

/// Whose rights open `want`, whose path runs through `hole`: the VM
/// owner's; for a VM without an owner, the one user who controls the
/// directory; where no single user does (a group or everyone may write
/// it), nobody's: refused.
fn hole_rights(want: &Want, hole: &Hole, rights: &Rights) -> Result<Requester, UserFilesError> {
    match (rights, &hole.writer) {
        (Rights::Owner(owner), _) => Ok(owner.clone()),
        (Rights::Ownerless, Writer::User(uid)) => owner_identity(*uid, &want.path),
        (Rights::Ownerless, Writer::Many(_)) => {
            let why = format!(
                "{}: root does not open it for a VM without an owner (give the VM an owner, or keep the file where only root can change it)",
                hole.describe()
            );
            Err(UserFilesError::Refused(FileRefusal {
                kind: want.kind,
                path: want.path.clone(),
                why: RefusalReason::Other(match want.kind {
                    VmFdKind::Disk { .. } => format!("{}: {why}", want.path),
                    _ => why,
                }),
            }))
        }
    }
}

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

/// The user and group of ids the system does not know (nobody, nogroup).
const OVERFLOW_UID: u32 = 65534;
const OVERFLOW_GID: u32 = 65534;

/// Sends each opened file to the parent: a UserFile frame with its
/// descriptor (a helper's answer, before its outcome).
pub fn send_opened(sock: BorrowedFd, opened: Vec<Opened>) -> Result<(), imsg::ImsgError> {
    opened.into_iter().try_for_each(|o| {
        let mut frame = Frame::new(Message::UserFile {
            kind: o.kind,
            path: o.path,
        });
        frame.fd = Some(o.file.into());
        imsg::send_blocking(sock, frame)
    })
}

/// The helper: becomes the requester entirely, opens, sends every
/// descriptor and the outcome, exits. Never returns.
fn userfiles_helper(req: &Requester, wants: &[Want], sock: OwnedFd, parent: Pid) -> ! {
    helper_close_inherited(sock.as_raw_fd());
    let outcome = match helper_become(req, parent) {
        Ok(()) => userfiles_open(wants),
        Err(why) => Err(FileRefusal {
            kind: wants[0].kind,
            path: wants[0].path.clone(),
            why: RefusalReason::Other(format!(
                "cannot take on uid {} and gid {} to open files: {why}",
                req.uid, req.gid
            )),
        }),
    };
    let sent = match outcome {
        Ok(opened) => send_opened(sock.as_fd(), opened).and_then(|()| {
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
    deadline: Instant,
    uid: u32,
) -> Result<Vec<Opened>, UserFilesError> {
    let helper_err = |why: String| UserFilesError::Helper { uid, why };
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

/// Makes the helper the requester, before its first open: no capability
/// left in any set (not CAP_SYS_PTRACE, which passes /proc/PID/cwd of a
/// root process, nor CAP_DAC_READ_SEARCH), real, effective, saved and
/// file system ids and groups the requester's, killed with the parent.
fn helper_become(req: &Requester, parent: Pid) -> Result<(), proc::ProcError> {
    let id = proc::Identity {
        uid: nix::unistd::Uid::from_raw(req.uid),
        gid: nix::unistd::Gid::from_raw(req.gid),
        groups: req
            .groups
            .iter()
            .map(|&g| nix::unistd::Gid::from_raw(g))
            .collect(),
    };
    proc::clear_capability_inheritance()?;
    proc::take_identity(&id, parent)?;
    // Whatever /proc/sys/fs/suid_dumpable says: the user may signal its
    // helper, never trace it or read its memory (a copy of the parent's).
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(proc::ProcError::Step {
            step: "PR_SET_DUMPABLE".into(),
            err: Errno::last(),
        });
    }
    Ok(())
}

/// Closes every descriptor the helper inherited from the parent (control
/// connections, other VMs' channels and disks) but stdio and `keep`, its
/// socket: the process the user may signal holds nothing of root's.
pub fn helper_close_inherited(keep: i32) {
    let keep = keep as libc::c_uint;
    // SAFETY: close_range only closes descriptors of this process, which
    // owns no Rust object for any of them past this point but `keep`.
    unsafe {
        if keep > 3 {
            libc::close_range(3, keep - 1, 0);
        }
        libc::close_range(keep + 1, libc::c_uint::MAX, 0);
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
        .custom_flags(OPEN_FLAGS)
        .open(path)?;
    file_checked(file)
}

const OPEN_FLAGS: i32 = libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;

/// Keeps a just-opened file only if it is a regular file on a real file
/// system, then makes its I/O blocking again for the guest (O_NONBLOCK only
/// guarded the open).
fn file_checked(file: File) -> io::Result<File> {
    if !file.metadata()?.is_file() {
        return Err(FileError::NotRegular.into());
    }
    // Magic numbers are 32 bits wide (f_type is signed on 32-bit systems).
    let fs = nix::sys::statfs::fstatfs(&file)?.filesystem_type().0 as u32;
    if let Some((_, name)) = PSEUDO_FILE_SYSTEMS.iter().find(|(magic, _)| *magic == fs) {
        return Err(FileError::PseudoFileSystem(name).into());
    }
    nix::fcntl::fcntl(
        file.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
    )?;
    Ok(file)
}

/// File systems whose "files" are the kernel's or another process's
/// state, readable without any capability (/proc/kallsyms, /proc/PID/maps
/// of a fork of the parent, sysfs attributes): never a VM's disk, kernel,
/// initrd or iso, whoever names them. From linux/magic.h.
const PSEUDO_FILE_SYSTEMS: &[(u32, &str)] = &[
    (0x9fa0, "procfs"),
    (0x6265_6572, "sysfs"),
    (0x6462_6720, "debugfs"),
    (0x7472_6163, "tracefs"),
    (0x7363_6673, "securityfs"),
    (0x0027_e0eb, "cgroup"),
    (0x6367_7270, "cgroup2"),
    (0xcafe_4a11, "bpf"),
    (0x6265_6570, "configfs"),
    (0x1cd1, "devpts"),
    (0x6165_676c, "pstore"),
    (0xde5e_81e4, "efivarfs"),
    (0xf97c_ff8c, "selinuxfs"),
    (0x4341_5d53, "smackfs"),
    (0x6e73_6673, "nsfs"),
    (0x4249_4e4d, "binfmt_misc"),
    (0x6573_5543, "fusectl"),
    (0x1980_0202, "mqueue"),
    (0x6c6f_6f70, "binderfs"),
    (0x0904_1934, "anon_inodefs"),
];

/// FUSE_SUPER_MAGIC (linux/magic.h).
const FUSE_MAGIC: u32 = 0x6573_5546;

/// At most this many symbolic links are followed in one walk, as the
/// kernel does.
const WALK_MAX_LINKS: usize = 40;

/// Who besides root can change what a name in a directory refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Writer {
    /// This user alone.
    User(u32),
    /// More than one user (a group, or everyone); the words say who.
    Many(String),
}

/// The first directory on a path whose entries someone other than root
/// can change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hole {
    pub dir: PathBuf,
    pub writer: Writer,
}

impl Hole {
    fn describe(&self) -> String {
        match &self.writer {
            Writer::User(uid) => format!("{} is controlled by uid {uid}", self.dir.display()),
            Writer::Many(who) => format!("{} is writable by {who}", self.dir.display()),
        }
    }
}

/// What walking a path as root found.
#[derive(Debug)]
pub enum Walked {
    /// Root alone controls every directory on the way: the file, opened.
    Root(File),
    /// Someone else controls a directory on the way; nothing was opened.
    Hole(Hole),
}

/// Opens `path` as root only if root alone can change what it names: it
/// walks the path one name at a time from `/` with O_PATH|O_NOFOLLOW,
/// judging each name on the descriptors of its directory and of itself
/// ([`entry_writer`]) and stopping at the first that someone else could
/// replace. Symbolic links (placed by root) are read and their targets
/// walked the same way; `..` goes back to the directory the walk came
/// from (as the kernel would). Nothing on a FUSE file system is root's.
/// The file is then opened from its directory's descriptor with
/// O_NOFOLLOW and must be the one judged.
pub fn walk_open(path: &Path, writable: bool) -> io::Result<Walked> {
    use nix::fcntl::{openat, readlinkat, OFlag};
    use nix::sys::stat::{fstat, FileStat, Mode, SFlag};
    use std::ffi::OsString;
    use std::os::fd::FromRawFd;

    fn names(path: &Path) -> Vec<OsString> {
        use std::path::Component;
        path.components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n.to_os_string()),
                Component::ParentDir => Some(OsString::from("..")),
                _ => None,
            })
            .collect()
    }
    let at = |dir: &OwnedFd, name: &std::ffi::OsStr, flags: OFlag| -> io::Result<OwnedFd> {
        let fd = openat(Some(dir.as_raw_fd()), name, flags, Mode::empty())?;
        // SAFETY: openat just returned this descriptor, owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    };
    let stat = |fd: &OwnedFd| -> io::Result<FileStat> { Ok(fstat(fd.as_raw_fd())?) };
    let lookup = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;

    let path = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    };
    let root = File::open("/")?.into();
    let root_stat = stat(&root)?;
    // The directories walked down (the last one is where the walk is).
    let mut dirs: Vec<(OwnedFd, FileStat, PathBuf)> = vec![(root, root_stat, PathBuf::from("/"))];
    let mut pending: std::collections::VecDeque<OsString> = names(&path).into();
    let mut links = 0;
    while let Some(name) = pending.pop_front() {
        if name == ".." {
            if dirs.len() > 1 {
                dirs.pop();
            }
            continue;
        }
        let (dir, dir_stat, dir_path) = dirs.last().expect("the walk keeps /");
        let entry = at(dir, &name, lookup)?;
        let entry_stat = stat(&entry)?;
        if let Some(writer) = entry_writer(dir_stat, &entry_stat) {
            return Ok(Walked::Hole(Hole {
                dir: dir_path.clone(),
                writer,
            }));
        }
        // A FUSE file system shows whatever owners and links the process
        // serving it likes (a user may mount one on a directory it owns).
        if nix::sys::statfs::fstatfs(&entry)?.filesystem_type().0 as u32 == FUSE_MAGIC {
            return Ok(Walked::Hole(Hole {
                dir: dir_path.join(&name),
                writer: Writer::Many("whoever serves its FUSE file system".into()),
            }));
        }
        let kind = SFlag::from_bits_truncate(entry_stat.st_mode & SFlag::S_IFMT.bits());
        if kind == SFlag::S_IFLNK {
            links += 1;
            if links > WALK_MAX_LINKS {
                return Err(Errno::ELOOP.into());
            }
            let target = PathBuf::from(readlinkat(Some(entry.as_raw_fd()), "")?);
            if target.is_absolute() {
                dirs.truncate(1);
            }
            for n in names(&target).into_iter().rev() {
                pending.push_front(n);
            }
        } else if !pending.is_empty() {
            if kind != SFlag::S_IFDIR {
                return Err(Errno::ENOTDIR.into());
            }
            let dir_path = dir_path.join(&name);
            dirs.push((entry, entry_stat, dir_path));
        } else {
            let mode = if writable {
                OFlag::O_RDWR
            } else {
                OFlag::O_RDONLY
            };
            let flags = mode | OFlag::O_NOFOLLOW | OFlag::from_bits_truncate(OPEN_FLAGS);
            let file = File::from(at(dir, &name, flags)?);
            let meta = file.metadata()?;
            if (meta.dev(), meta.ino()) != (entry_stat.st_dev, entry_stat.st_ino) {
                return Err(FileError::Replaced.into());
            }
            return file_checked(file).map(Walked::Root);
        }
    }
    // The path ends at a directory (`/`, or `..`).
    Err(Errno::EISDIR.into())
}

/// Who besides root can replace the entry `entry` of directory `dir`
/// (None: root alone). A directory without group or other write
/// permission is its owner's. In a sticky directory others may write
/// (/tmp), only the directory's owner and the entry's can remove or
/// rename an entry: a root entry of a root sticky directory is root's
/// alone, unless it is a file with other hard links (someone may have
/// linked it there). Any other directory others can write belongs to no
/// single user.
pub fn entry_writer(
    dir: &nix::sys::stat::FileStat,
    entry: &nix::sys::stat::FileStat,
) -> Option<Writer> {
    let mode = dir.st_mode;
    if mode & 0o022 == 0 {
        return (dir.st_uid != 0).then_some(Writer::User(dir.st_uid));
    }
    let who = if mode & 0o002 != 0 {
        "every user".to_string()
    } else {
        format!("group {}", dir.st_gid)
    };
    if mode & libc::S_ISVTX == 0 {
        return Some(Writer::Many(who));
    }
    let linked = entry.st_mode & libc::S_IFMT != libc::S_IFDIR && entry.st_nlink > 1;
    match (dir.st_uid, entry.st_uid) {
        (0, 0) if !linked => None,
        (0, 0) => Some(Writer::Many(format!(
            "{who} (sticky), and the root file in it has other hard links"
        ))),
        (0, user) | (user, 0) => Some(Writer::User(user)),
        (owner, user) if owner == user => Some(Writer::User(user)),
        (owner, user) => Some(Writer::Many(format!(
            "{who} (sticky, uid {owner}'s, and the entry uid {user}'s)"
        ))),
    }
}

/// What refuses a file that opened: carried inside the io::Error that
/// the image chain's opener must return, and told apart by type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum FileError {
    #[error("not a regular file")]
    NotRegular,
    #[error("on {0}, a pseudo file system: not a file for a VM")]
    PseudoFileSystem(&'static str),
    #[error("replaced while it was opened")]
    Replaced,
    /// Root stops following a disk's chain here: someone else's rights
    /// open the rest.
    #[error("backing file named by a layer root does not alone control")]
    Untrusted,
}

impl From<FileError> for io::Error {
    fn from(e: FileError) -> io::Error {
        io::Error::other(e)
    }
}

/// The [`FileError`] inside `e`, if that is what it carries.
fn file_error(e: &io::Error) -> Option<FileError> {
    e.get_ref()?.downcast_ref::<FileError>().copied()
}

fn io_reason(e: &io::Error) -> RefusalReason {
    match e.raw_os_error().map(Errno::from_raw) {
        Some(Errno::EACCES | Errno::EPERM) => RefusalReason::PermissionDenied,
        Some(Errno::ENOENT | Errno::ENOTDIR) => RefusalReason::Missing,
        Some(Errno::EISDIR | Errno::ENXIO) => RefusalReason::NotRegular,
        None if file_error(e) == Some(FileError::NotRegular) => RefusalReason::NotRegular,
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

    fn soon() -> Instant {
        Instant::now() + OPEN_TIMEOUT
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
        let got =
            userfiles_open_as(&nobody, &[disk(0, &open, DiskFormat::Raw)], soon()).expect("open");
        assert_eq!(got.len(), 1);
        match userfiles_open_as(&nobody, &[disk(0, &closed, DiskFormat::Raw)], soon()) {
            Err(UserFilesError::Refused(r)) => {
                assert_eq!(r.why, RefusalReason::PermissionDenied);
                assert_eq!(r.path, closed.display().to_string());
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        // Root itself opens it.
        assert!(userfiles_open_as(
            &Requester::root(),
            &[disk(0, &closed, DiskFormat::Raw)],
            soon()
        )
        .is_ok());
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
        let result = userfiles_collect(
            Channel::new(mine),
            Instant::now() + Duration::from_millis(200),
            1000,
        );
        assert!(matches!(result, Err(UserFilesError::Timeout { uid: 1000 })));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    fn is_root() -> bool {
        if nix::unistd::geteuid().is_root() {
            return true;
        }
        eprintln!("skipped: needs root (to own files as other users)");
        false
    }

    fn chown(path: &Path, uid: u32) {
        std::os::unix::fs::lchown(path, Some(uid), Some(uid)).expect("chown");
    }

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .expect("chmod");
    }

    fn hole(path: &Path) -> Hole {
        match walk_open(path, false) {
            Ok(Walked::Hole(h)) => h,
            other => panic!("{}: expected a hole, got {other:?}", path.display()),
        }
    }

    fn opens_as_root(path: &Path) -> String {
        match walk_open(path, false) {
            Ok(Walked::Root(mut f)) => {
                let mut text = String::new();
                f.read_to_string(&mut text).expect("read");
                text
            }
            other => panic!("{}: expected root's open, got {other:?}", path.display()),
        }
    }

    #[test]
    fn the_walk_opens_what_root_alone_controls() {
        if !is_root() {
            return;
        }
        // A root 0755 directory in sticky /tmp, as the regress suites keep
        // their files: root's.
        let d = dir("walk-root");
        chmod(&d, 0o755);
        std::fs::create_dir_all(d.join("a/b")).expect("mkdir");
        std::fs::write(d.join("a/secret"), b"secret").expect("write");
        assert_eq!(opens_as_root(&d.join("a/secret")), "secret");
        // `..` goes back up the way the walk came, and so does a symlink
        // root placed in a directory only root can write.
        assert_eq!(opens_as_root(&d.join("a/b/../secret")), "secret");
        std::os::unix::fs::symlink("../secret", d.join("a/b/rel")).expect("symlink");
        std::os::unix::fs::symlink(d.join("a"), d.join("abs")).expect("symlink");
        assert_eq!(opens_as_root(&d.join("a/b/rel")), "secret");
        assert_eq!(opens_as_root(&d.join("abs/b/../secret")), "secret");
        // A directory, a symlink loop, a missing file: errors, not holes.
        assert!(walk_open(&d.join("a/b/.."), false).is_err());
        std::os::unix::fs::symlink("loop", d.join("loop")).expect("symlink");
        assert_eq!(
            walk_open(&d.join("loop"), false)
                .expect_err("loop")
                .raw_os_error(),
            Some(libc::ELOOP)
        );
        assert_eq!(
            walk_open(&d.join("a/none"), false)
                .expect_err("none")
                .raw_os_error(),
            Some(libc::ENOENT)
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn the_walk_stops_where_someone_else_could_change_the_path() {
        if !is_root() {
            return;
        }
        let nobody = OVERFLOW_UID;
        let d = dir("walk-holes");
        chmod(&d, 0o755);
        let secret = d.join("secret");
        std::fs::write(&secret, b"secret").expect("write");
        chmod(&secret, 0o600);
        // The owner's symlink swap: a user's directory is the user's,
        // whatever it holds.
        let user_dir = d.join("user");
        std::fs::create_dir(&user_dir).expect("mkdir");
        chown(&user_dir, nobody);
        std::os::unix::fs::symlink(&secret, user_dir.join("disk.img")).expect("symlink");
        chown(&user_dir.join("disk.img"), nobody);
        assert_eq!(
            hole(&user_dir.join("disk.img")),
            Hole {
                dir: user_dir.clone(),
                writer: Writer::User(nobody)
            }
        );
        // Root's symlink into the user's directory: the same hole.
        std::os::unix::fs::symlink(user_dir.join("disk.img"), d.join("via")).expect("symlink");
        assert_eq!(hole(&d.join("via")).dir, user_dir);
        // Through `..` of the user's directory: the user could have made
        // `x` a symlink anywhere.
        std::fs::create_dir(user_dir.join("x")).expect("mkdir");
        assert_eq!(hole(&user_dir.join("x/../../secret")).dir, user_dir);
        // A sticky directory every user may write: root's entries are
        // root's, a user's entry is that user's, a root file someone
        // may have hard-linked there belongs to nobody in particular.
        let sticky = d.join("sticky");
        std::fs::create_dir(&sticky).expect("mkdir");
        chmod(&sticky, 0o1777);
        std::fs::write(sticky.join("root.img"), b"root").expect("write");
        assert_eq!(opens_as_root(&sticky.join("root.img")), "root");
        std::fs::write(sticky.join("user.img"), b"user").expect("write");
        chown(&sticky.join("user.img"), nobody);
        assert_eq!(hole(&sticky.join("user.img")).writer, Writer::User(nobody));
        std::fs::hard_link(&secret, sticky.join("linked")).expect("link");
        assert!(matches!(
            hole(&sticky.join("linked")).writer,
            Writer::Many(_)
        ));
        // A group-writable directory root owns: no single user.
        let shared = d.join("shared");
        std::fs::create_dir(&shared).expect("mkdir");
        chmod(&shared, 0o775);
        std::fs::write(shared.join("disk.img"), b"disk").expect("write");
        assert_eq!(
            hole(&shared.join("disk.img")),
            Hole {
                dir: shared.clone(),
                writer: Writer::Many("group 0".into())
            }
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_configured_path_through_a_hole_is_opened_with_the_owner_rights() {
        if !is_root() {
            return;
        }
        let d = dir("rights");
        chmod(&d, 0o755);
        let secret = d.join("secret.img");
        std::fs::write(&secret, vec![0u8; 4096]).expect("write");
        chmod(&secret, 0o600);
        let user_dir = d.join("user");
        std::fs::create_dir(&user_dir).expect("mkdir");
        chown(&user_dir, OVERFLOW_UID);
        let own = user_dir.join("own.img");
        std::fs::write(&own, vec![0u8; 4096]).expect("write");
        chown(&own, OVERFLOW_UID);
        chmod(&own, 0o600);
        let link = user_dir.join("link.img");
        std::os::unix::fs::symlink(&secret, &link).expect("symlink");
        let nobody = Rights::Owner(owner_identity(OVERFLOW_UID, "").expect("nobody"));
        for rights in [&nobody, &Rights::Ownerless] {
            assert_eq!(
                userfiles_open_root(&disk(0, &own, DiskFormat::Raw), rights, soon())
                    .expect("own")
                    .len(),
                1
            );
            match userfiles_open_root(&disk(0, &link, DiskFormat::Raw), rights, soon()) {
                Err(UserFilesError::Refused(r)) => {
                    assert_eq!(r.why, RefusalReason::PermissionDenied)
                }
                other => panic!("the symlink swap passed: {other:?}"),
            }
        }
        // No single user controls a group-writable directory: refused
        // for a VM without an owner, the owner's rights for the others.
        chmod(&user_dir, 0o775);
        chown(&user_dir, 0);
        match userfiles_open_root(&disk(0, &own, DiskFormat::Raw), &Rights::Ownerless, soon()) {
            Err(UserFilesError::Refused(r)) => match r.why {
                RefusalReason::Other(why) => {
                    assert!(why.contains("is writable by group"), "{why}");
                    assert!(why.contains("without an owner"), "{why}");
                }
                other => panic!("unexpected refusal {other:?}"),
            },
            other => panic!("a shared directory passed: {other:?}"),
        }
        assert!(userfiles_open_root(&disk(0, &own, DiskFormat::Raw), &nobody, soon()).is_ok());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn pseudo_file_systems_are_refused_to_root_too() {
        for path in ["/proc/self/status", "/proc/kallsyms", "/sys/kernel/notes"] {
            if !Path::new(path).exists() {
                continue;
            }
            let want = Want {
                kind: VmFdKind::Initrd,
                path: path.into(),
            };
            let refused = userfiles_open(std::slice::from_ref(&want)).expect_err(path);
            assert!(
                matches!(&refused.why, RefusalReason::Other(w) if w.contains("pseudo file system")),
                "{path}: {refused:?}"
            );
            match userfiles_open_root(&want, &Rights::Ownerless, soon()) {
                Err(UserFilesError::Refused(r)) => {
                    assert!(matches!(r.why, RefusalReason::Other(_)), "{path}: {r:?}")
                }
                other => panic!("{path}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_helper_keeps_no_capability() {
        if !is_root() {
            return;
        }
        // A root process whose working directory is reachable only
        // through its /proc magic link (its parent is 0700): with
        // CAP_SYS_PTRACE the helper would pass, as the user it may not.
        let d = dir("ptrace");
        chmod(&d, 0o700);
        let inside = d.join("inside");
        std::fs::create_dir(&inside).expect("mkdir");
        chmod(&inside, 0o755);
        std::fs::write(inside.join("file"), vec![0u8; 4096]).expect("write");
        // Writable by all: only the way there stands in the way.
        chmod(&inside.join("file"), 0o666);
        let mut sleeper = std::process::Command::new("sleep")
            .arg("60")
            .current_dir(&inside)
            .spawn()
            .expect("sleep");
        let via_proc = format!("/proc/{}/cwd/file", sleeper.id());
        let nobody = owner_identity(OVERFLOW_UID, "").expect("nobody");
        let want = disk(0, Path::new(&via_proc), DiskFormat::Raw);
        // Root itself gets there.
        assert!(userfiles_open(std::slice::from_ref(&want)).is_ok());
        let result = userfiles_open_as(&nobody, &[want], soon());
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        match result {
            Err(UserFilesError::Refused(r)) => assert_eq!(r.why, RefusalReason::PermissionDenied),
            other => panic!("the helper reached {via_proc}: {other:?}"),
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn the_helper_becomes_the_user_entirely() {
        if !is_root() {
            return;
        }
        let want = "Uid:\t65534\t65534\t65534\t65534\nGid:\t65534\t65534\t65534\t65534\n\
                    Groups:\t65534 \nCapInh:\t0000000000000000\nCapPrm:\t0000000000000000\n\
                    CapEff:\t0000000000000000\nCapBnd:\t0000000000000000\nCapAmb:\t0000000000000000\n";
        let nobody = Requester {
            uid: OVERFLOW_UID,
            gid: OVERFLOW_GID,
            groups: vec![OVERFLOW_GID],
            named: Vec::new(),
        };
        let parent = nix::unistd::getpid();
        // SAFETY: the child only changes its ids, reads a file and _exits.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            ForkResult::Child => {
                let ok = helper_become(&nobody, parent).is_ok()
                    // SAFETY: prctl with integer arguments.
                    && unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) } == 0
                    && std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
                        let ids: String = status
                            .lines()
                            .filter(|l| {
                                ["Uid:", "Gid:", "Groups:", "Cap"]
                                    .iter()
                                    .any(|p| l.starts_with(p))
                            })
                            .map(|l| format!("{l}\n"))
                            .collect();
                        ids == want
                    });
                // SAFETY: ends the forked test process at once.
                unsafe { libc::_exit(if ok { 0 } else { 1 }) }
            }
            ForkResult::Parent { child } => {
                assert_eq!(
                    waitpid(child, None).expect("wait"),
                    WaitStatus::Exited(child, 0),
                    "the helper kept an id or a capability of root's"
                );
            }
        }
        // And what it opens from /proc is refused: its own status too.
        let want = Want {
            kind: VmFdKind::Initrd,
            path: "/proc/self/status".into(),
        };
        match userfiles_open_as(&nobody, &[want], soon()) {
            Err(UserFilesError::Refused(r)) => assert!(
                matches!(&r.why, RefusalReason::Other(w) if w.contains("procfs")),
                "{r:?}"
            ),
            other => panic!("the helper opened /proc/self/status: {other:?}"),
        }
    }
}
