//! The message protocol between vmd's processes (and, later, vmctl):
//! imsg-style frames over UNIX stream sockets.
//!
//! A frame is a fixed 20-byte header followed by a bincode payload:
//!
//! ```text
//! type u32 | payload length u32 | flags u16 | reserved u16 | peer id u32 | pid u32
//! ```
//!
//! All header fields are little-endian. `type` is [`Message::type_code`] of
//! the payload, `flags` has [`FLAG_FD`] when one file descriptor travels
//! with the frame (SCM_RIGHTS, attached to the frame's first byte), `peer
//! id` lets a process route a reply to the connection that asked, and `pid`
//! is the sender's process id. A frame is at most [`MAX_FRAME`] bytes.
//!
//! Anything a peer sends may be wrong: a malformed, truncated or oversized
//! frame is an [`ImsgError`], after which the owner closes that peer. Never
//! a panic.

use crate::ctl::{Credentials, CtlError, CtlRequest};
use crate::status::VmInfo;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::VecDeque;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use thiserror::Error;

use nix::errno::Errno;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

/// Size of the fixed header.
pub const HEADER_LEN: usize = 20;
/// Largest frame (header and payload) either side accepts.
pub const MAX_FRAME: usize = 64 * 1024;
/// Largest payload.
pub const MAX_PAYLOAD: usize = MAX_FRAME - HEADER_LEN;
/// Header flag: one file descriptor travels with this frame.
pub const FLAG_FD: u16 = 1;
/// Received descriptors not yet claimed by a frame; more is a broken peer.
pub const MAX_PENDING_FDS: usize = 16;
/// Bytes queued for a peer that does not read; more is a broken peer.
const MAX_QUEUED: usize = 1024 * 1024;

/// How bad a log line is. Lines at `Debug` appear only with `-v`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum LogLevel {
    Warn,
    Info,
    Debug,
}

/// Which child process a message concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    Control,
    Switch,
    /// One per running VM.
    Vm,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Control => "control",
            Role::Switch => "switch",
            Role::Vm => "vm",
        }
    }

    pub fn from_name(name: &str) -> Option<Role> {
        match name {
            "control" => Some(Role::Control),
            "switch" => Some(Role::Switch),
            "vm" => Some(Role::Vm),
            _ => None,
        }
    }
}

/// Every message any vmd process (or vmctl) sends. Add a variant here, and
/// its code and name in [`Message::type_code`], for each new request,
/// reply or event; the match there is exhaustive so the compiler asks.
///
/// Conventions for later variants: requests from vmctl carry the
/// requester's credentials as filled in by the control process (never as
/// claimed by the client); replies reuse the request's peer id so control
/// routes them to the connection that asked; a message that needs several
/// fds is sent as one frame per fd (as imsg does), the last one ending the
/// sequence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    // --- process plumbing (parent <-> children) ---
    /// child -> parent: privileges dropped, filter installed, loop running.
    Ready { role: Role },
    /// child -> parent: one log line for the parent to write.
    Log { level: LogLevel, text: String },
    /// parent -> child (later vmctl -> control -> parent): the verbosity
    /// (number of -v) from now on.
    SetVerbosity { level: u8 },
    /// child -> parent, from the SIGSYS handler: the seccomp filter refused
    /// this system call and the child is about to die of SIGSYS. `name`
    /// borrows a static string so the handler need not allocate.
    RefusedSyscall { nr: i64, name: Cow<'static, str> },

    // --- vmctl <-> control <-> parent (see ctl.rs) ---
    /// vmctl -> control: one command.
    Ctl(CtlRequest),
    /// control -> parent: a command and who sent it, read from the socket;
    /// the frame's peer id names the connection to answer.
    CtlForward {
        creds: Credentials,
        request: CtlRequest,
    },
    /// parent -> control -> vmctl: one VM of `status`.
    CtlVm(VmInfo),
    /// parent -> control -> vmctl: the end of the `status` list.
    CtlVmEnd,
    /// parent -> control -> vmctl: the outcome of start (once the guest
    /// runs, or why it could not start), stop, wait, pause or unpause of
    /// VM `vmid` (0 when no VM was found).
    CtlVmResult {
        vmid: u32,
        error: Option<CtlError>,
        /// The started VM's tty.
        tty: Option<String>,
    },
    /// parent -> control (peer id 0: for every waiter) -> vmctl: VM `vmid`
    /// has terminated; `timed_out`: a graceful stop was forced after the
    /// VM's `shutdown timeout`.
    CtlTerminated { vmid: u32, timed_out: bool },
    /// parent -> control -> vmctl: load, reload, reset or log done;
    /// `lines` are warnings to show (the VMs load skipped).
    CtlOk { lines: Vec<String> },
    /// parent -> control -> vmctl: a long command on VM `vmid` is under
    /// way (`note` says how far); the answer comes later.
    CtlProgress { vmid: u32, note: String },
    /// parent or control -> vmctl: the command failed with `errno` (0 when
    /// no error number applies); `lines` say why (load's errors).
    CtlFail { errno: i32, lines: Vec<String> },
    /// parent -> control (peer id 0) -> every listener it matches
    /// (`events`): a VM's lifecycle event.
    CtlEvent(crate::event::Event),
    /// control -> vmctl (`events`): `count` events were dropped here, the
    /// client having read too slowly.
    CtlEventsDropped { count: u64 },
    /// parent -> control -> vmctl: one VM of `stats` (`CtlVmEnd` ends
    /// the list).
    CtlStats(Box<crate::stats::VmStats>),

    // --- VM processes (parent <-> vm) ---
    /// parent -> vm, first thing: what to run. `fd_count` `VmFd` frames
    /// follow, one descriptor each.
    VmStart { params: Box<VmParams> },
    /// parent -> vm: one descriptor of the start sequence (with the fd).
    VmFd { kind: VmFdKind },
    /// vm -> parent: the guest runs. `pids`: the processes that run it
    /// besides the VM process, as the VM process says (the parent kills
    /// them with it if they run as the VM's uid, and shows their memory
    /// as the VM's).
    VmRunning { pids: Vec<u32> },
    /// vm -> parent: the console log reached its size cap; rotate it.
    VmConsoleLogFull,
    /// parent -> vm: the console log (with the fd) after a rotation
    /// request, and its size (0 for a fresh file).
    VmConsoleLog { size: u64 },
    /// vm -> parent: QEMU reported the guest's shutdown (QMP SHUTDOWN
    /// event: `guest-shutdown`, `guest-reset`, ...); the VM ends now.
    VmShutdown { reason: String },
    /// parent -> vm: a command for the guest (with the client's
    /// descriptor when it [`takes_fd`](VmCommand::takes_fd)).
    VmCommand { command: VmCommand },
    /// vm -> parent: a long command is under way (`note` says how far);
    /// its reply deadline starts again.
    VmCommandProgress { command: VmCommand, note: String },
    /// vm -> parent: a start from a stream (`vmctl receive`) is under way
    /// (`note` says how far); the start's deadline starts again.
    VmStartProgress { note: String },
    /// vm -> parent: the backend's answer to a `VmCommand`; `error` is
    /// QEMU's (or the VM process's) reason when it failed.
    VmCommandDone {
        command: VmCommand,
        error: Option<String>,
    },
    /// vm -> parent, last thing: how the processes that ran the guest
    /// ended, in words (`QEMU was killed by SIGKILL`).
    VmGuestEnded { why: String },
    /// vm -> parent, before it ends: the guest never ran, and why (QEMU's
    /// first error line, or the VM process's own error), for the vmctl
    /// waiting for the start.
    VmStartFailed { reason: String },
    /// parent -> vm: report the backend's counters.
    VmStatsQuery,
    /// vm -> parent: the answer to `VmStatsQuery`.
    VmStats(crate::stats::BackendStats),

    // --- the parent's file-opening helper (userfiles.rs) -> parent ---
    /// One file the helper opened as the requester (with the fd): what it
    /// is for the VM and the path it was opened by.
    UserFile { kind: VmFdKind, path: String },
    /// The helper is done: every file was sent, or it stopped at `refusal`.
    UserFilesDone { refusal: Option<FileRefusal> },

    // --- the parent's forked root helpers (parent/helper.rs) -> parent ---
    /// A piece of a helper's answer, after its `UserFile`s: together, in
    /// order, the bincode of a `Result<HelperAnswer, CtlError>` (what it
    /// found, or why it failed as vmctl is to be told), which can be
    /// larger than a frame (a configuration).
    HelperChunk { bytes: Vec<u8> },
    /// The helper's answer is complete.
    HelperEnd,

    // --- the switch's DHCP server on local interfaces (parent <-> switch) ---
    /// parent -> switch: serve BOOTP/DHCP for `lease` on the packet socket
    /// sent with the frame (bound to the interface, PACKET_AUXDATA on, a
    /// filter for IPv4 UDP to port 67). Sent again for every port when
    /// switch restarts.
    SwitchServe {
        port: crate::local::LocalPort,
        lease: crate::dhcp::Lease,
    },
    /// parent -> switch: stop serving `port` and close its socket.
    SwitchStop { port: crate::local::LocalPort },
    /// switch -> parent: `port`'s interface is gone (its socket read
    /// ENETDOWN); the switch closed the socket.
    SwitchPortGone { port: crate::local::LocalPort },
}

/// What a forked helper of the parent did, besides the files it sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HelperAnswer {
    /// A VM's files are open and its disks locked; what its launch needs
    /// from the system's databases.
    Start {
        /// Hardware KVM, and the groups that gives the guest's process.
        kvm: bool,
        groups: Vec<u32>,
        /// Group `tty`, for the VM's pty.
        tty_gid: Option<u32>,
        /// The first uids of `uid range` that no user or group has and no
        /// VM held when the start was asked for.
        free_uids: Vec<u32>,
        /// The console log's size as opened.
        console_log_size: u64,
    },
    /// A console log was rotated and opened again: its size.
    ConsoleLog { size: u64 },
    /// A configuration file was read and parsed, with its warnings.
    Config {
        config: Box<crate::config::Config>,
        warnings: Vec<String>,
    },
    /// A removal of an ended VM's console log is done: a line for each
    /// file it left (in use, or it failed).
    Removed { kept: Vec<String> },
    /// A configuration file could not be read or has errors: each a line.
    ConfigRefused { lines: Vec<String> },
    /// The work was done and gives nothing back (a program it ran, such
    /// as nft applying a ruleset, succeeded).
    Done,
}

/// What the parent asks of a running guest. A command that
/// [`takes_fd`](VmCommand::takes_fd) travels with the descriptor the
/// client sent (vmctl -> control -> parent -> VM process, one frame each);
/// every other one travels without.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmCommand {
    /// QMP `stop`: the vCPUs stop.
    Pause,
    /// QMP `cont`.
    Unpause,
    /// QMP `system_powerdown` (the ACPI power button), after `cont` if
    /// the guest is paused.
    Powerdown,
    /// A test of the path itself (`CtlRequest::Probe`; refused by a vmd
    /// built without the `test-triggers` feature): the backend reports
    /// `steps` progress notes, writes `text` to the descriptor and is done.
    Probe { text: String, steps: u8 },
    /// `vmctl send`: the guest paused, its state written as a stream
    /// (common::stream) to the client's descriptor with `vm` in its
    /// header (the parent's view: paths, owner; the backend adds its own
    /// facts and the boot files' sizes), then the backend ends. Until the
    /// stream is whole any failure resumes the guest. Reports progress at
    /// least every few seconds while it runs.
    Send { vm: Box<crate::stream::StreamVm> },
}

impl VmCommand {
    /// The word for logs and answers.
    pub fn name(&self) -> &'static str {
        match self {
            VmCommand::Pause => "pause",
            VmCommand::Unpause => "unpause",
            VmCommand::Powerdown => "powerdown",
            VmCommand::Probe { .. } => "probe",
            VmCommand::Send { .. } => "send",
        }
    }

    /// Whether it comes with the client's descriptor (exactly one).
    pub fn takes_fd(&self) -> bool {
        matches!(self, VmCommand::Probe { .. } | VmCommand::Send { .. })
    }

    /// How long the parent waits for the VM process's answer, or for its
    /// next progress note ([`Message::VmCommandProgress`]), before it
    /// tells vmctl the command timed out: at most
    /// [`LONGEST_COMMAND_REPLY`]. A long command (a migration) reports
    /// progress rather than having a long deadline.
    pub fn reply_timeout(&self) -> std::time::Duration {
        match self {
            VmCommand::Pause
            | VmCommand::Unpause
            | VmCommand::Powerdown
            | VmCommand::Probe { .. }
            | VmCommand::Send { .. } => LONGEST_COMMAND_REPLY,
        }
    }
}

/// The longest [`VmCommand::reply_timeout`] (vmd checks its other bounds
/// against it at build time).
pub const LONGEST_COMMAND_REPLY: std::time::Duration = std::time::Duration::from_secs(10);

/// Why the file-opening helper could not open a requester's file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRefusal {
    /// The file the request named (a disk's top image for its chain).
    pub kind: VmFdKind,
    /// The file that failed (a backing file of a disk's chain, maybe).
    pub path: String,
    pub why: RefusalReason,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusalReason {
    /// The requester may not open it (EACCES or EPERM).
    PermissionDenied,
    /// It does not exist (ENOENT, ENOTDIR).
    Missing,
    /// Not a regular file (a directory, FIFO, device, socket).
    NotRegular,
    /// Anything else, in words (an unreadable qcow2 header, a loop).
    Other(String),
}

/// What a VM process runs: everything but the descriptors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmParams {
    pub id: u32,
    pub name: String,
    /// Guest memory in bytes.
    pub memory: u64,
    pub vcpus: u32,
    /// The VM's own uid and gid (the VM process and the guest's
    /// processes run as them).
    pub uid: u32,
    pub gid: u32,
    /// The backend that runs the guest, and its own settings.
    pub backend: BackendParams,
    /// The console log's size cap and its size when sent.
    pub console_log_cap: u64,
    pub console_log_size: u64,
    /// The MAC address of each network interface, in order (a `Tap`
    /// descriptor each).
    pub macs: Vec<[u8; 6]>,
    /// `vmctl receive`: the stream's header bytes (common::stream); the
    /// VM starts from the stream (a `Stream` descriptor) instead of
    /// booting, and locks its disks itself once the stream is whole.
    pub incoming: Option<Vec<u8>>,
    /// How many `VmFd` frames follow.
    pub fd_count: u32,
}

/// The backend a VM process runs its guest with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackendParams {
    Qemu(QemuParams),
    /// vmd's own monitor on /dev/kvm (`backend kvm`).
    Kvm(KvmParams),
}

/// The settings of vmd's own monitor for one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvmParams {
    /// The kernel command line.
    pub cmdline: String,
}

/// QEMU's settings for one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuParams {
    /// The kernel command line.
    pub cmdline: String,
    /// What a VM without a kernel boots first (`boot device`, `-B`):
    /// `None` is the CD-ROM if it has one, then the first disk.
    pub boot_device: Option<crate::config::BootDevice>,
    /// Hardware KVM (else QEMU's TCG).
    pub kvm: bool,
    /// QEMU's supplementary groups (`kvm` with hardware KVM, else none).
    pub groups: Vec<u32>,
}

/// Which descriptor a `VmFd` frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmFdKind {
    Kernel,
    Initrd,
    /// The pty: the master the VM process relays on, and a slave it keeps
    /// open so the master never reads EIO.
    PtyMaster,
    PtySlave,
    ConsoleLog,
    /// One file of disk `disk`'s image chain, `layer` 0 the top; only the
    /// top of a writable disk is writable.
    Disk {
        disk: u8,
        layer: u8,
        format: crate::disk::DiskFormat,
        writable: bool,
    },
    /// The CD-ROM image (read-only).
    Cdrom,
    /// The BIOS image (SeaBIOS) of a VM that boots without a kernel.
    Bios,
    /// The tap of network interface `index` (the parent keeps its own
    /// copy for the VM's whole life).
    Tap {
        index: u8,
    },
    /// A /dev/vhost-net descriptor for interface `index`'s tap (hardware
    /// KVM only): QEMU moves its packets in the kernel.
    Vhost {
        index: u8,
    },
    /// `vmctl receive`: vmctl's socket with the stream after its header
    /// ([`VmParams::incoming`]).
    Stream,
    /// /dev/kvm, for a VM of `backend kvm` (its VM process creates the VM).
    Kvm,
}

impl Message {
    /// The header's type code and a name for logs. Codes are stable: add
    /// new ones at the end of their group.
    pub fn type_code(&self) -> (u32, &'static str) {
        match self {
            Message::Ready { .. } => (1, "READY"),
            Message::Log { .. } => (2, "LOG"),
            Message::SetVerbosity { .. } => (3, "SET_VERBOSITY"),
            Message::RefusedSyscall { .. } => (4, "REFUSED_SYSCALL"),
            Message::Ctl(_) => (5, "CTL"),
            Message::CtlForward { .. } => (6, "CTL_FORWARD"),
            Message::CtlVm(_) => (7, "CTL_VM"),
            Message::CtlVmEnd => (8, "CTL_VM_END"),
            Message::CtlVmResult { .. } => (9, "CTL_VM_RESULT"),
            Message::CtlTerminated { .. } => (10, "CTL_TERMINATED"),
            Message::CtlOk { .. } => (11, "CTL_OK"),
            Message::CtlFail { .. } => (12, "CTL_FAIL"),
            Message::CtlProgress { .. } => (13, "CTL_PROGRESS"),
            Message::CtlEvent(_) => (20, "CTL_EVENT"),
            Message::CtlEventsDropped { .. } => (21, "CTL_EVENTS_DROPPED"),
            Message::CtlStats(_) => (22, "CTL_STATS"),
            Message::VmStart { .. } => (100, "VM_START"),
            Message::VmFd { .. } => (101, "VM_FD"),
            Message::VmRunning { .. } => (102, "VM_RUNNING"),
            Message::VmConsoleLogFull => (103, "VM_CONSOLE_LOG_FULL"),
            Message::VmConsoleLog { .. } => (104, "VM_CONSOLE_LOG"),
            Message::VmShutdown { .. } => (105, "VM_SHUTDOWN"),
            Message::VmCommand { .. } => (106, "VM_COMMAND"),
            Message::VmCommandDone { .. } => (107, "VM_COMMAND_DONE"),
            Message::VmCommandProgress { .. } => (110, "VM_COMMAND_PROGRESS"),
            Message::VmStartProgress { .. } => (111, "VM_START_PROGRESS"),
            Message::VmGuestEnded { .. } => (108, "VM_GUEST_ENDED"),
            Message::VmStartFailed { .. } => (109, "VM_START_FAILED"),
            Message::VmStatsQuery => (120, "VM_STATS_QUERY"),
            Message::VmStats(_) => (121, "VM_STATS"),
            Message::UserFile { .. } => (200, "USER_FILE"),
            Message::UserFilesDone { .. } => (201, "USER_FILES_DONE"),
            Message::HelperChunk { .. } => (202, "HELPER_CHUNK"),
            Message::HelperEnd => (203, "HELPER_END"),
            Message::SwitchServe { .. } => (300, "SWITCH_SERVE"),
            Message::SwitchStop { .. } => (301, "SWITCH_STOP"),
            Message::SwitchPortGone { .. } => (302, "SWITCH_PORT_GONE"),
        }
    }
}

/// One decoded frame.
#[derive(Debug)]
pub struct Frame {
    pub message: Message,
    pub peer_id: u32,
    pub pid: u32,
    pub fd: Option<OwnedFd>,
}

impl Frame {
    pub fn new(message: Message) -> Frame {
        Frame {
            message,
            peer_id: 0,
            pid: std::process::id(),
            fd: None,
        }
    }
}

#[derive(Debug, Error)]
pub enum ImsgError {
    #[error("frame of {0} bytes is larger than the maximum of {MAX_FRAME}")]
    Oversized(usize),
    #[error("frame header has unknown flags {0:#x}")]
    BadFlags(u32),
    #[error("frame payload does not decode: {0}")]
    Decode(String),
    #[error("frame type {header} does not match its payload ({payload})")]
    TypeMismatch { header: u32, payload: &'static str },
    #[error("frame payload has {0} trailing bytes")]
    TrailingBytes(usize),
    #[error("frame announces a file descriptor that did not arrive")]
    MissingFd,
    #[error("peer sent more than {0} file descriptors without frames for them")]
    TooManyFds(usize),
    #[error("peer sent more file descriptors with one message than fit (control message truncated); a frame carries one")]
    FdsTruncated,
    #[error("peer sent {0} file descriptors with one message; a frame carries one")]
    ExtraFds(usize),
    #[error("peer sent a file descriptor; this channel takes none")]
    FdRefused,
    #[error("message does not encode: {0}")]
    Encode(String),
    #[error("peer does not read: more than {MAX_QUEUED} bytes queued")]
    PeerStalled,
    #[error("socket error: {0}")]
    Io(#[from] Errno),
}

fn bincode_config() -> impl bincode::config::Config {
    // The limit bounds every length prefix inside a payload, so a hostile
    // length cannot make the decoder allocate more than a frame's worth.
    bincode::config::standard().with_limit::<MAX_PAYLOAD>()
}

/// Encodes `message` as a frame into `buf` without allocating (the SIGSYS
/// handler uses this). Returns the frame's length.
pub fn encode_frame_into(
    message: &Message,
    peer_id: u32,
    pid: u32,
    with_fd: bool,
    buf: &mut [u8],
) -> Result<usize, ImsgError> {
    if buf.len() < HEADER_LEN {
        return Err(ImsgError::Encode(
            "buffer smaller than a frame header".into(),
        ));
    }
    let limit = buf.len().min(MAX_FRAME);
    let len =
        bincode::serde::encode_into_slice(message, &mut buf[HEADER_LEN..limit], bincode_config())
            .map_err(|e| ImsgError::Encode(e.to_string()))?;
    let (code, _) = message.type_code();
    let flags: u16 = if with_fd { FLAG_FD } else { 0 };
    buf[0..4].copy_from_slice(&code.to_le_bytes());
    buf[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    buf[8..10].copy_from_slice(&flags.to_le_bytes());
    buf[10..12].copy_from_slice(&0u16.to_le_bytes());
    buf[12..16].copy_from_slice(&peer_id.to_le_bytes());
    buf[16..20].copy_from_slice(&pid.to_le_bytes());
    Ok(HEADER_LEN + len)
}

/// Encodes a frame into a new buffer.
pub fn encode_frame(
    message: &Message,
    peer_id: u32,
    pid: u32,
    with_fd: bool,
) -> Result<Vec<u8>, ImsgError> {
    let mut buf = vec![0u8; MAX_FRAME];
    let len = encode_frame_into(message, peer_id, pid, with_fd, &mut buf).map_err(|e| match e {
        ImsgError::Encode(_) => ImsgError::Encode(format!(
            "{} is larger than {MAX_FRAME} bytes",
            message.type_code().1
        )),
        other => other,
    })?;
    buf.truncate(len);
    Ok(buf)
}

/// The decoded header of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub type_code: u32,
    pub payload_len: usize,
    pub has_fd: bool,
    pub peer_id: u32,
    pub pid: u32,
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

/// Decodes a header from its 20 bytes; rejects oversized frames and
/// unknown flags.
pub fn decode_header(buf: &[u8; HEADER_LEN]) -> Result<Header, ImsgError> {
    let payload_len = u32_at(buf, 4) as usize;
    if payload_len > MAX_PAYLOAD {
        return Err(ImsgError::Oversized(payload_len.saturating_add(HEADER_LEN)));
    }
    let flags = u32::from(u16::from_le_bytes([buf[8], buf[9]]));
    let reserved = u32::from(u16::from_le_bytes([buf[10], buf[11]]));
    if flags & !u32::from(FLAG_FD) != 0 || reserved != 0 {
        return Err(ImsgError::BadFlags(flags | reserved << 16));
    }
    Ok(Header {
        type_code: u32_at(buf, 0),
        payload_len,
        has_fd: flags & u32::from(FLAG_FD) != 0,
        peer_id: u32_at(buf, 12),
        pid: u32_at(buf, 16),
    })
}

/// Decodes a payload and checks it against its header.
pub fn decode_payload(header: &Header, payload: &[u8]) -> Result<Message, ImsgError> {
    let (message, used): (Message, usize) =
        bincode::serde::decode_from_slice(payload, bincode_config())
            .map_err(|e| ImsgError::Decode(e.to_string()))?;
    if used != payload.len() {
        return Err(ImsgError::TrailingBytes(payload.len() - used));
    }
    let (code, name) = message.type_code();
    if code != header.type_code {
        return Err(ImsgError::TypeMismatch {
            header: header.type_code,
            payload: name,
        });
    }
    Ok(message)
}

/// Incoming side of a channel: bytes and descriptors received so far, cut
/// into frames.
pub struct Reader {
    buf: Vec<u8>,
    fds: VecDeque<OwnedFd>,
    /// How many received descriptors may wait for their frames: 0 for a
    /// peer that never sends any (a vmctl client, vmd to vmctl).
    fd_limit: usize,
}

impl Default for Reader {
    fn default() -> Reader {
        Reader {
            buf: Vec::new(),
            fds: VecDeque::new(),
            fd_limit: MAX_PENDING_FDS,
        }
    }
}

/// What one read from the socket gave.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadStatus {
    /// Some bytes arrived; call [`Reader::next_frame`] until it says None.
    Data,
    /// Nothing more for now.
    WouldBlock,
    /// The peer closed its end.
    Eof,
}

impl Reader {
    pub fn new() -> Reader {
        Reader::default()
    }

    /// A reader for a peer that sends no descriptors: one that arrives
    /// anyway is closed and the read fails.
    pub fn without_fds() -> Reader {
        Reader::with_fd_limit(0)
    }

    /// A reader that keeps at most `limit` descriptors waiting for their
    /// frames; one more is closed and the read fails.
    pub fn with_fd_limit(limit: usize) -> Reader {
        Reader {
            fd_limit: limit,
            ..Reader::default()
        }
    }

    /// Reads once from `sock` without blocking (MSG_DONTWAIT), keeping any
    /// descriptor that arrives for the frame it belongs to. A read that
    /// brings more than one descriptor, or more than this peer may send,
    /// is an error; every descriptor it brought is closed by then.
    pub fn read_some(&mut self, sock: BorrowedFd) -> Result<ReadStatus, ImsgError> {
        let mut chunk = [0u8; 16 * 1024];
        let received = loop {
            match imsg_recv(sock, &mut chunk) {
                Ok(received) => break received,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Ok(ReadStatus::WouldBlock),
                Err(e) => return Err(ImsgError::Io(e)),
            }
        };
        // Dropping `received.fds` on the way out closes them.
        if received.truncated {
            return Err(ImsgError::FdsTruncated);
        }
        if received.fds.len() > 1 {
            return Err(ImsgError::ExtraFds(received.fds.len()));
        }
        if !received.fds.is_empty() && self.fd_limit == 0 {
            return Err(ImsgError::FdRefused);
        }
        self.fds.extend(received.fds);
        if self.fds.len() > self.fd_limit {
            return Err(ImsgError::TooManyFds(self.fd_limit));
        }
        if received.bytes == 0 {
            return Ok(ReadStatus::Eof);
        }
        self.buf.extend_from_slice(&chunk[..received.bytes]);
        Ok(ReadStatus::Data)
    }

    /// Adds bytes as if they had been read (tests and fuzzing).
    pub fn push_bytes(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, if one is buffered.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ImsgError> {
        let Some(head) = self.buf.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let header = decode_header(head)?;
        let end = HEADER_LEN + header.payload_len;
        if self.buf.len() < end {
            return Ok(None);
        }
        let message = decode_payload(&header, &self.buf[HEADER_LEN..end])?;
        let fd = if header.has_fd {
            Some(self.fds.pop_front().ok_or(ImsgError::MissingFd)?)
        } else {
            None
        };
        self.buf.drain(..end);
        Ok(Some(Frame {
            message,
            peer_id: header.peer_id,
            pid: header.pid,
            fd,
        }))
    }

    /// True when a frame has begun but not fully arrived (at EOF, the peer
    /// truncated it).
    pub fn has_partial_frame(&self) -> bool {
        !self.buf.is_empty()
    }
}

/// What one recvmsg(2) brought.
struct Received {
    bytes: usize,
    /// Every SCM_RIGHTS descriptor the kernel installed, owned.
    fds: Vec<OwnedFd>,
    /// MSG_CTRUNC: the peer sent more descriptors than the control buffer
    /// holds (the kernel closed those that did not fit).
    truncated: bool,
}

/// Room for the control data of one descriptor: the most a frame carries,
/// and the most one read returns from a peer that sends them as
/// [`Writer`] does (the kernel ends a read after the data a descriptor
/// came with).
const CONTROL_LEN: usize =
    // SAFETY: CMSG_SPACE only computes a size.
    unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;

/// One recvmsg(2) (MSG_DONTWAIT, MSG_CMSG_CLOEXEC) into `buf`. Walks the
/// control data itself, so that descriptors the kernel installed are
/// owned even when it was truncated (nix's `cmsgs()` then returns an
/// error and they would leak).
fn imsg_recv(sock: BorrowedFd, buf: &mut [u8]) -> Result<Received, Errno> {
    // u64 words: cmsghdr's alignment.
    let mut control = [0u64; CONTROL_LEN.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: a zeroed msghdr is valid (no name, no buffers yet).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = CONTROL_LEN as _;
    // SAFETY: `msg` points at `iov` (over `buf`) and `control`, which
    // outlive the call and are as long as it says.
    let n = unsafe {
        libc::recvmsg(
            sock.as_raw_fd(),
            &mut msg,
            libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
        )
    };
    if n < 0 {
        return Err(Errno::last());
    }
    let mut fds = Vec::new();
    let control_end = control.as_ptr() as usize + CONTROL_LEN;
    // SAFETY: CMSG_FIRSTHDR and CMSG_NXTHDR stay within msg_controllen,
    // which the kernel set to what it wrote into `control`; each header's
    // data is read only up to the end of `control`. Every SCM_RIGHTS
    // descriptor is one the kernel has just installed for us and nothing
    // else owns.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let header = std::ptr::read_unaligned(cmsg);
            if header.cmsg_level == libc::SOL_SOCKET && header.cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let len = (header.cmsg_len as usize)
                    .saturating_sub(libc::CMSG_LEN(0) as usize)
                    .min(control_end.saturating_sub(data as usize));
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(Received {
        bytes: n as usize,
        fds,
        truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

struct Pending {
    bytes: Vec<u8>,
    sent: usize,
    fd: Option<OwnedFd>,
}

/// Outgoing side of a channel: frames queued until the socket takes them.
#[derive(Default)]
pub struct Writer {
    queue: VecDeque<Pending>,
    queued_bytes: usize,
}

impl Writer {
    pub fn new() -> Writer {
        Writer::default()
    }

    /// Queues a frame; its fd (if any) is closed here once sent.
    pub fn push(&mut self, frame: Frame) -> Result<(), ImsgError> {
        let bytes = encode_frame(&frame.message, frame.peer_id, frame.pid, frame.fd.is_some())?;
        if self.queued_bytes + bytes.len() > MAX_QUEUED {
            return Err(ImsgError::PeerStalled);
        }
        self.queued_bytes += bytes.len();
        self.queue.push_back(Pending {
            bytes,
            sent: 0,
            fd: frame.fd,
        });
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Sends what the socket takes without blocking. Returns true when
    /// everything queued has been sent.
    pub fn flush(&mut self, sock: BorrowedFd) -> Result<bool, ImsgError> {
        self.flush_with(sock, MsgFlags::MSG_DONTWAIT)
    }

    /// Sends everything queued, waiting for the socket (which must be in
    /// blocking mode) to take it.
    pub fn flush_blocking(&mut self, sock: BorrowedFd) -> Result<(), ImsgError> {
        self.flush_with(sock, MsgFlags::empty()).map(|_| ())
    }

    fn flush_with(&mut self, sock: BorrowedFd, flags: MsgFlags) -> Result<bool, ImsgError> {
        while let Some(front) = self.queue.front_mut() {
            match send_part(sock, front, flags) {
                Ok(()) => {}
                Err(ImsgError::Io(Errno::EAGAIN)) => return Ok(false),
                Err(e) => return Err(e),
            }
            if front.sent == front.bytes.len() {
                self.queued_bytes -= front.bytes.len();
                self.queue.pop_front();
            }
        }
        Ok(true)
    }
}

/// Sends the next part of `p` (its fd along with its first byte).
fn send_part(sock: BorrowedFd, p: &mut Pending, flags: MsgFlags) -> Result<(), ImsgError> {
    let iov = [IoSlice::new(&p.bytes[p.sent..])];
    let raw_fds: Vec<RawFd> = p.fd.iter().map(|fd| fd.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&raw_fds)];
    let cmsgs: &[ControlMessage] = if p.sent == 0 && !raw_fds.is_empty() {
        &rights
    } else {
        &[]
    };
    match sendmsg::<()>(
        sock.as_raw_fd(),
        &iov,
        cmsgs,
        flags | MsgFlags::MSG_NOSIGNAL,
        None,
    ) {
        Ok(n) => {
            p.sent += n;
            if n > 0 {
                // The peer has its copy; ours is no longer needed.
                p.fd = None;
            }
            Ok(())
        }
        Err(Errno::EINTR) => Ok(()),
        Err(e) => Err(ImsgError::Io(e)),
    }
}

/// Sends one frame and waits until the socket has taken all of it, so the
/// stream is back at a frame boundary when this returns. Children use this
/// towards the parent, which always reads.
pub fn send_blocking(sock: BorrowedFd, frame: Frame) -> Result<(), ImsgError> {
    let bytes = encode_frame(&frame.message, frame.peer_id, frame.pid, frame.fd.is_some())?;
    let mut p = Pending {
        bytes,
        sent: 0,
        fd: frame.fd,
    };
    while p.sent < p.bytes.len() {
        send_part(sock, &mut p, MsgFlags::empty())?;
    }
    Ok(())
}

/// A socket with both halves, for event loops.
pub struct Channel {
    pub sock: OwnedFd,
    pub reader: Reader,
    pub writer: Writer,
}

impl Channel {
    pub fn new(sock: OwnedFd) -> Channel {
        Channel {
            sock,
            reader: Reader::new(),
            writer: Writer::new(),
        }
    }

    /// A channel whose peer sends no descriptors (see
    /// [`Reader::without_fds`]).
    pub fn without_fds(sock: OwnedFd) -> Channel {
        Channel::with_fd_limit(sock, 0)
    }

    /// A channel whose peer may have at most `limit` descriptors in
    /// flight (see [`Reader::with_fd_limit`]).
    pub fn with_fd_limit(sock: OwnedFd, limit: usize) -> Channel {
        Channel {
            reader: Reader::with_fd_limit(limit),
            ..Channel::new(sock)
        }
    }

    /// Reads everything available and returns the complete frames, and
    /// whether the peer has closed its end. A frame cut short by EOF is an
    /// error.
    pub fn receive(&mut self) -> Result<(Vec<Frame>, bool), ImsgError> {
        let mut frames = Vec::new();
        loop {
            let status = self.reader.read_some(self.sock.as_fd())?;
            while let Some(frame) = self.reader.next_frame()? {
                frames.push(frame);
            }
            match status {
                ReadStatus::Data => continue,
                ReadStatus::WouldBlock => return Ok((frames, false)),
                ReadStatus::Eof if self.reader.has_partial_frame() => {
                    return Err(ImsgError::Decode(
                        "peer closed in the middle of a frame".into(),
                    ))
                }
                ReadStatus::Eof => return Ok((frames, true)),
            }
        }
    }

    pub fn send(&mut self, frame: Frame) -> Result<bool, ImsgError> {
        self.writer.push(frame)?;
        self.writer.flush(self.sock.as_fd())
    }

    pub fn flush(&mut self) -> Result<bool, ImsgError> {
        self.writer.flush(self.sock.as_fd())
    }

    /// Sends `frame`, and anything queued before it, and waits until the
    /// (blocking) socket has taken all of it. Children send this way to
    /// the parent: their log lines and SIGSYS reports go straight to the
    /// same socket and must start at a frame boundary.
    pub fn send_whole(&mut self, frame: Frame) -> Result<(), ImsgError> {
        self.writer.push(frame)?;
        self.writer.flush_blocking(self.sock.as_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    use std::io::{Read, Seek, Write};

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair")
    }

    fn samples() -> Vec<Message> {
        vec![
            Message::Ready {
                role: Role::Control,
            },
            Message::Ready { role: Role::Switch },
            Message::Log {
                level: LogLevel::Warn,
                text: "disk full: /var/lib/x".into(),
            },
            Message::Log {
                level: LogLevel::Debug,
                text: String::new(),
            },
            Message::SetVerbosity { level: 2 },
            Message::RefusedSyscall {
                nr: 59,
                name: Cow::Borrowed("execve"),
            },
            Message::Ctl(CtlRequest::Status),
            Message::Ctl(CtlRequest::Stop {
                target: crate::ctl::VmTarget::Name("web".into()),
                force: true,
                wait: false,
            }),
            Message::CtlForward {
                creds: Credentials {
                    pid: 7,
                    uid: 1000,
                    gid: 1000,
                    groups: vec![27],
                },
                request: CtlRequest::Load {
                    path: "/etc/vm.conf".into(),
                },
            },
            Message::CtlVmEnd,
            Message::CtlVmResult {
                vmid: 3,
                error: Some(CtlError::Errno(1)),
                tty: None,
            },
            Message::CtlTerminated {
                vmid: 3,
                timed_out: true,
            },
            Message::VmCommand {
                command: VmCommand::Powerdown,
            },
            Message::VmCommand {
                command: VmCommand::Send {
                    vm: Box::new(crate::stream::StreamVm {
                        name: "web".into(),
                        memory: 1 << 30,
                        ..Default::default()
                    }),
                },
            },
            Message::VmStartProgress {
                note: "receiving: 12 bytes".into(),
            },
            Message::Ctl(crate::ctl::CtlRequest::Receive {
                name: "copy".into(),
                header: vec![1, 2, 3],
            }),
            Message::VmCommandDone {
                command: VmCommand::Pause,
                error: Some("not running".into()),
            },
            Message::VmGuestEnded {
                why: "QEMU was killed by SIGKILL".into(),
            },
            Message::VmRunning { pids: vec![4242] },
            Message::CtlOk {
                lines: vec!["vm \"a\" (x.conf:1): skipped: vm a already exists".into()],
            },
            Message::VmStartFailed {
                reason: "qemu: initrd is too large".into(),
            },
            // A fixed time: samples() is called twice and compared.
            Message::CtlEvent(crate::event::Event {
                time_ms: 1_795_000_000_000,
                vmid: 3,
                name: "web".into(),
                kind: crate::event::EventKind::Stopped {
                    why: crate::event::EndReason::Forced,
                },
            }),
            Message::CtlEventsDropped { count: 44 },
            Message::CtlStats(Box::new(crate::stats::VmStats {
                id: 3,
                name: "web".into(),
                state: crate::status::VmState::Running,
                uptime_ms: Some(1500),
                cpu_time_ms: Some(700),
                memory: Some(100 << 20),
                backend: Some(crate::stats::BackendStats {
                    disks: vec![crate::stats::DiskStats::default()],
                    console_log_size: 12,
                }),
                nics: vec![crate::stats::NicStats::default()],
            })),
            Message::VmStatsQuery,
            Message::VmStats(crate::stats::BackendStats::default()),
            Message::CtlFail {
                errno: 0,
                lines: vec!["x.conf:1: syntax error".into()],
            },
            Message::UserFile {
                kind: VmFdKind::Cdrom,
                path: "/home/u/x.iso".into(),
            },
            Message::UserFilesDone { refusal: None },
            Message::HelperChunk {
                bytes: vec![1, 2, 3],
            },
            Message::HelperEnd,
            Message::SwitchServe {
                port: crate::local::LocalPort { vmid: 2, index: 1 },
                lease: crate::dhcp::Lease {
                    guest_mac: [0xfe, 0xe1, 0xbb, 0xd2, 0, 2],
                    host_mac: [2, 0, 0, 0, 0, 1],
                    guest: std::net::Ipv4Addr::new(100, 64, 2, 5),
                    host: std::net::Ipv4Addr::new(100, 64, 2, 4),
                    host_name: "web".into(),
                    net_boot: true,
                },
            },
            Message::SwitchStop {
                port: crate::local::LocalPort { vmid: 2, index: 1 },
            },
            Message::SwitchPortGone {
                port: crate::local::LocalPort { vmid: 2, index: 0 },
            },
            Message::UserFilesDone {
                refusal: Some(FileRefusal {
                    kind: VmFdKind::Disk {
                        disk: 0,
                        layer: 0,
                        format: crate::disk::DiskFormat::Qcow2,
                        writable: true,
                    },
                    path: "/home/u/base.img".into(),
                    why: RefusalReason::PermissionDenied,
                }),
            },
        ]
    }

    /// regress/control sends `status` and reads answers as raw bytes; if
    /// this changes, change CTL_STATUS_FRAME and the type codes there too.
    #[test]
    fn raw_status_request_and_reply_codes() {
        let bytes = encode_frame(&Message::Ctl(CtlRequest::Status), 0, 0, false).unwrap();
        assert_eq!(&bytes[..8], &[5, 0, 0, 0, 2, 0, 0, 0]);
        assert_eq!(&bytes[HEADER_LEN..], &[4, 0]);
        let forged = Message::CtlForward {
            creds: Credentials::default(),
            request: CtlRequest::Reload,
        };
        let bytes = encode_frame(&forged, 0, 0, false).unwrap();
        assert_eq!(&bytes[..8], &[6, 0, 0, 0, 6, 0, 0, 0]);
        assert_eq!(&bytes[HEADER_LEN..], &[5, 0, 0, 0, 0, 7]);
        assert_eq!(Message::CtlVm(sample_info()).type_code().0, 7);
        assert_eq!(Message::CtlVmEnd.type_code().0, 8);
        assert_eq!(
            Message::CtlFail {
                errno: 1,
                lines: vec![]
            }
            .type_code()
            .0,
            12
        );
    }

    fn sample_info() -> VmInfo {
        VmInfo {
            id: 1,
            name: "a".into(),
            state: crate::status::VmState::Stopped,
            pid: None,
            vcpus: 1,
            max_memory: 1 << 29,
            cur_memory: None,
            tty: None,
            owner_uid: 0,
            owner_gid: None,
        }
    }

    #[test]
    fn round_trip_every_sample_over_a_socket() {
        let (a, b) = pair();
        let mut sender = Channel::new(a);
        let mut receiver = Channel::new(b);
        for (i, m) in samples().into_iter().enumerate() {
            let frame = Frame {
                message: m,
                peer_id: i as u32,
                pid: 4242,
                fd: None,
            };
            assert!(sender.send(frame).unwrap());
        }
        let (frames, eof) = receiver.receive().unwrap();
        assert!(!eof);
        assert_eq!(frames.len(), samples().len());
        for (i, (f, m)) in frames.iter().zip(samples()).enumerate() {
            assert_eq!(f.message, m);
            assert_eq!(f.peer_id, i as u32);
            assert_eq!(f.pid, 4242);
            assert!(f.fd.is_none());
        }
        drop(sender);
        let (frames, eof) = receiver.receive().unwrap();
        assert!(frames.is_empty() && eof);
    }

    #[test]
    fn header_carries_type_and_length() {
        let m = Message::SetVerbosity { level: 3 };
        let bytes = encode_frame(&m, 7, 99, false).unwrap();
        let header = decode_header(bytes.first_chunk().unwrap()).unwrap();
        assert_eq!(header.type_code, 3);
        assert_eq!(header.payload_len, bytes.len() - HEADER_LEN);
        assert_eq!((header.peer_id, header.pid, header.has_fd), (7, 99, false));
    }

    #[test]
    fn fd_travels_with_its_frame() {
        let (a, b) = pair();
        let mut file = tempfile_with(b"passed along");
        let mut sender = Channel::new(a);
        let mut receiver = Channel::new(b);
        sender
            .send(Frame::new(Message::SetVerbosity { level: 1 }))
            .unwrap();
        let frame = Frame {
            fd: Some(OwnedFd::from(file.try_clone().unwrap())),
            ..Frame::new(Message::Ready { role: Role::Switch })
        };
        sender.send(frame).unwrap();
        sender
            .send(Frame::new(Message::SetVerbosity { level: 0 }))
            .unwrap();
        let (mut frames, _) = receiver.receive().unwrap();
        assert_eq!(frames.len(), 3);
        assert!(frames[0].fd.is_none() && frames[2].fd.is_none());
        let fd = frames[1].fd.take().expect("fd with the second frame");
        let mut received = std::fs::File::from(fd);
        let mut text = String::new();
        received.rewind().unwrap();
        received.read_to_string(&mut text).unwrap();
        assert_eq!(text, "passed along");
        // Same open file: writes through one show through the other.
        file.write_all(b"!").unwrap();
        assert_eq!(received.metadata().unwrap().len(), 13);
    }

    /// Sends `count` copies of a pipe's write end with one byte and one
    /// sendmsg (as a hostile peer would), closes every copy of ours, and
    /// returns the read end: it reads EOF once the receiver has closed
    /// every copy it got, and would block while one is left open.
    fn send_pipe_copies(sock: &OwnedFd, count: usize) -> OwnedFd {
        let (read_end, write_end) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .unwrap();
        let raw = vec![write_end.as_raw_fd(); count];
        let rights = [ControlMessage::ScmRights(&raw)];
        sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(&[0])],
            &rights,
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        read_end
    }

    fn all_copies_closed(read_end: &OwnedFd) -> bool {
        let mut byte = [0u8; 1];
        matches!(nix::unistd::read(read_end.as_raw_fd(), &mut byte), Ok(0))
    }

    #[test]
    fn truncated_descriptors_are_closed_and_the_peer_refused() {
        let (a, b) = pair();
        let read_end = send_pipe_copies(&a, 64);
        let mut receiver = Channel::new(b);
        assert!(matches!(receiver.receive(), Err(ImsgError::FdsTruncated)));
        assert!(all_copies_closed(&read_end), "a descriptor leaked");
    }

    #[test]
    fn two_descriptors_with_one_message_are_closed_and_refused() {
        let (a, b) = pair();
        let read_end = send_pipe_copies(&a, 2);
        let mut receiver = Channel::new(b);
        assert!(matches!(receiver.receive(), Err(ImsgError::ExtraFds(2))));
        assert!(all_copies_closed(&read_end), "a descriptor leaked");
    }

    #[test]
    fn a_channel_without_fds_closes_one_and_refuses_it() {
        let (a, b) = pair();
        let read_end = send_pipe_copies(&a, 1);
        let mut receiver = Channel::without_fds(b);
        assert!(matches!(receiver.receive(), Err(ImsgError::FdRefused)));
        assert!(all_copies_closed(&read_end), "a descriptor leaked");
    }

    #[test]
    fn descriptors_without_frames_are_bounded() {
        let (a, b) = pair();
        let mut receiver = Channel::new(b);
        let mut ends = Vec::new();
        for _ in 0..=MAX_PENDING_FDS {
            ends.push(send_pipe_copies(&a, 1));
        }
        // One read per descriptor: the 17th is one too many.
        assert!(matches!(
            receiver.receive(),
            Err(ImsgError::TooManyFds(MAX_PENDING_FDS))
        ));
        drop(receiver);
        assert!(ends.iter().all(all_copies_closed), "a descriptor leaked");
    }

    #[test]
    fn consecutive_frames_with_fds_arrive_one_per_read() {
        let (a, b) = pair();
        let mut sender = Channel::new(a);
        let mut receiver = Channel::new(b);
        for level in 0..8 {
            let frame = Frame {
                fd: Some(OwnedFd::from(tempfile_with(b"x"))),
                ..Frame::new(Message::SetVerbosity { level })
            };
            sender.send(frame).unwrap();
        }
        let (frames, _) = receiver.receive().unwrap();
        assert_eq!(frames.len(), 8);
        assert!(frames.iter().all(|f| f.fd.is_some()));
    }

    fn tempfile_with(content: &[u8]) -> std::fs::File {
        let dir = std::env::temp_dir();
        let path = dir.join(format!(
            "imsg-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f.write_all(content).unwrap();
        f
    }

    #[test]
    fn frame_split_across_reads_is_reassembled() {
        let bytes = encode_frame(
            &Message::Log {
                level: LogLevel::Info,
                text: "x".repeat(300),
            },
            0,
            1,
            false,
        )
        .unwrap();
        let mut r = Reader::new();
        for b in &bytes[..bytes.len() - 1] {
            r.push_bytes(&[*b]);
            assert!(r.next_frame().unwrap().is_none());
        }
        r.push_bytes(&bytes[bytes.len() - 1..]);
        assert!(r.next_frame().unwrap().is_some());
        assert!(!r.has_partial_frame());
    }

    #[test]
    fn large_frames_pass_through_a_full_socket() {
        let (a, b) = pair();
        let mut sender = Channel::new(a);
        let mut receiver = Channel::new(b);
        let text = "y".repeat(MAX_PAYLOAD - 16);
        let mut sent_all = true;
        for _ in 0..12 {
            sent_all = sender
                .send(Frame::new(Message::Log {
                    level: LogLevel::Info,
                    text: text.clone(),
                }))
                .unwrap();
        }
        assert!(!sent_all, "socket buffer should have filled");
        let mut got = 0;
        while got < 12 {
            let (frames, eof) = receiver.receive().unwrap();
            assert!(!eof);
            for f in frames {
                assert_eq!(
                    f.message,
                    Message::Log {
                        level: LogLevel::Info,
                        text: text.clone()
                    }
                );
                got += 1;
            }
            sender.flush().unwrap();
        }
    }

    #[test]
    fn oversized_message_is_refused_on_encode() {
        let m = Message::Log {
            level: LogLevel::Info,
            text: "z".repeat(MAX_FRAME),
        };
        assert!(matches!(
            encode_frame(&m, 0, 0, false),
            Err(ImsgError::Encode(_))
        ));
    }

    #[test]
    fn oversized_header_is_refused_before_the_payload_arrives() {
        let mut bytes = encode_frame(&Message::SetVerbosity { level: 1 }, 0, 0, false).unwrap();
        bytes[4..8].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        let mut r = Reader::new();
        r.push_bytes(&bytes[..HEADER_LEN]);
        assert!(matches!(r.next_frame(), Err(ImsgError::Oversized(_))));
    }

    #[test]
    fn mismatched_type_unknown_flags_and_missing_fd_are_errors() {
        let good = encode_frame(&Message::SetVerbosity { level: 1 }, 0, 0, false).unwrap();
        let mut wrong_type = good.clone();
        wrong_type[0] = 2;
        let mut flags = good.clone();
        flags[9] = 0x80;
        let mut fd_flag = good.clone();
        fd_flag[8] = 1;
        let mut trailing = good.clone();
        trailing[4] += 1;
        trailing.push(0);
        for (bytes, what) in [
            (wrong_type, "type"),
            (flags, "flags"),
            (fd_flag, "fd"),
            (trailing, "trailing"),
        ] {
            let mut r = Reader::new();
            r.push_bytes(&bytes);
            assert!(r.next_frame().is_err(), "{what} accepted");
        }
    }

    #[test]
    fn truncated_frame_at_eof_is_an_error() {
        let (a, b) = pair();
        let bytes = encode_frame(&Message::SetVerbosity { level: 1 }, 0, 0, false).unwrap();
        nix::unistd::write(&a, &bytes[..bytes.len() - 1]).unwrap();
        drop(a);
        let mut receiver = Channel::new(b);
        assert!(receiver.receive().is_err());
    }

    /// A small deterministic generator (xorshift), so failures reproduce.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Feeds the decoder random bytes and mutated valid frames: it must
    /// return frames or errors, never panic, never allocate without bound.
    #[test]
    fn fuzz_decoder_with_random_and_mutated_frames() {
        let mut rng = Rng(0x9e3779b97f4a7c15);
        let valid: Vec<Vec<u8>> = samples()
            .iter()
            .map(|m| encode_frame(m, 1, 2, false).unwrap())
            .collect();
        let (mut decoded, mut rejected) = (0, 0);
        for round in 0..200_000 {
            let mut bytes = if round % 4 == 0 {
                let len = rng.below(64);
                (0..len).map(|_| rng.next() as u8).collect()
            } else {
                valid[rng.below(valid.len())].clone()
            };
            if round % 4 != 0 {
                for _ in 0..=rng.below(4) {
                    match rng.below(4) {
                        0 if !bytes.is_empty() => {
                            let i = rng.below(bytes.len());
                            bytes[i] = rng.next() as u8;
                        }
                        1 if !bytes.is_empty() => {
                            let i = rng.below(bytes.len());
                            bytes.truncate(i);
                        }
                        2 => {
                            let i = rng.below(bytes.len() + 1);
                            bytes.insert(i, rng.next() as u8);
                        }
                        _ => {
                            // Aim at the header's length field and the
                            // payload's length prefixes.
                            let i = rng.below(bytes.len().min(HEADER_LEN + 8) + 1);
                            if i < bytes.len() {
                                bytes[i] = 0xff;
                            }
                        }
                    }
                }
            }
            let mut r = Reader::new();
            r.push_bytes(&bytes);
            loop {
                match r.next_frame() {
                    Ok(Some(_)) => decoded += 1,
                    Ok(None) => break,
                    Err(_) => {
                        rejected += 1;
                        break;
                    }
                }
            }
        }
        assert!(
            decoded > 1000 && rejected > 1000,
            "decoded {decoded}, rejected {rejected}"
        );
    }
}
