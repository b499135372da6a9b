//! The control process: owns the UNIX socket vmctl connects to.
//!
//! Starts as root from a fresh exec (no inherited filter), binds the
//! socket while still root (mode 0660, root:root; the parent applies
//! `socket owner` once we are ready), then drops to _vmd in the empty
//! chroot and adds the filter [`CONTROL_SYSCALLS`] on top of
//! [`seccomp::CHILD_SYSCALLS`].
//!
//! Each connection speaks imsg frames (`Message::Ctl`). Control reads the
//! peer's uid, gid and supplementary groups from the socket when it
//! accepts it (SO_PEERCRED, SO_PEERGROUPS), refuses root-only commands of
//! other users itself, and forwards the rest to the parent with those
//! credentials (`Message::CtlForward`, peer id = connection id). Replies
//! come back with the same peer id and go to that connection. A `wait`
//! (or `stop -w`) is held here until the parent reports the VM's end.
//!
//! Nobody blocks anybody: every socket is non-blocking, a connection has
//! at most one request at the parent at a time (later ones wait in its
//! queue, which is bounded), and a client that does not read its replies
//! is dropped once too much is queued for it.
//!
//! An `events` request is held here too: the connection becomes a
//! listener, and each event the parent reports (`CtlEvent`, peer id 0)
//! goes to every listener it matches. A listener that does not read gets
//! no more than its socket holds and [`LISTENER_QUEUE`] queued events;
//! the rest are dropped and counted, and it is told how many
//! (`CtlEventsDropped`) once it reads again. Nothing else waits for it.
//!
//! Descriptors: a client other than root sends none (a descriptor that
//! arrives anyway is closed at once, and so is the connection), so each
//! of their connections holds exactly one and the connection limits below
//! keep the table from filling: the last ROOT_RESERVED places stay root's
//! whatever other users send. Root's requests that take a descriptor
//! ([`CtlRequest::takes_fd`], all root's) carry one, which goes on to the
//! parent with the request (as OpenBSD's control.c forwards it); a root
//! connection holds at most one besides its own (a second one queued
//! closes it), and a descriptor with any other request is refused.

use crate::log::{log_debug, log_info, log_warn};
use crate::proc;
use crate::seccomp::Allowed;
use common::ctl::{Credentials, CtlRequest, VmTarget};
use common::event::{Event, ListenerQueue, Queued, LISTENER_QUEUE};
use common::imsg::{Channel, Frame, Message, Role};
use mio::net::UnixListener;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};
use nix::errno::Errno;
use std::collections::{HashMap, VecDeque};
use std::io::ErrorKind;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// What control's loop adds to every child's calls.
pub const CONTROL_SYSCALLS: &[Allowed] = &[
    (
        libc::SYS_accept4,
        "accept vmctl connections on the control socket",
    ),
    (
        libc::SYS_epoll_ctl,
        "register and drop vmctl connections with mio",
    ),
    (
        libc::SYS_getsockopt,
        "read a vmctl peer's credentials (SO_PEERCRED, SO_PEERGROUPS)",
    ),
];

const PARENT: Token = Token(0);
const LISTENER: Token = Token(1);
#[cfg(feature = "test-triggers")]
const TRIGGER: Token = Token(2);
/// Connection tokens are the connection id plus this.
const FIRST_CONN_TOKEN: usize = 16;
/// Requests a connection may queue behind the one at the parent; more is
/// a client that does not wait for answers, and it is dropped.
const MAX_QUEUED_REQUESTS: usize = 64;
/// Connections one user other than root may hold, so that no user can
/// take them all and lock root out.
const MAX_CONNS_PER_USER: usize = 256;
/// Connections only root may take.
const ROOT_RESERVED: usize = 16;
/// Open descriptors we aim for (RLIMIT_NOFILE, raised while root).
const WANTED_FILES: u64 = 4096;
/// Descriptors kept free for everything that is not a connection.
const RESERVED_FILES: u64 = 64;

/// Where a connection's current request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    /// At the parent; its answer ends it.
    Asked,
    /// At the parent, and a successful answer turns it into a wait.
    AskedToWait,
    /// Waiting for VM `vmid` to terminate.
    Waiting { vmid: u32 },
    /// Listening for events (`Conn::listener`) until the client closes.
    Listening,
}

/// An `events` connection: the VMs it asked for and what waits for it.
struct Listener {
    target: Option<VmTarget>,
    queue: ListenerQueue,
    /// Events are being dropped (logged once per gap).
    dropping: bool,
}

struct Conn {
    channel: Channel,
    creds: Credentials,
    /// Requests waiting for the one at the parent, each with the
    /// descriptor its frame carried (at most one of them has one).
    queued: VecDeque<(CtlRequest, Option<OwnedFd>)>,
    pending: Option<Pending>,
    listener: Option<Listener>,
}

struct Control {
    poll: Poll,
    listener: UnixListener,
    /// accept failed for want of descriptors (EMFILE, ENFILE): connections
    /// wait in the backlog, and the next close accepts them.
    accept_stalled: bool,
    parent: Channel,
    conns: HashMap<u32, Conn>,
    next_id: u32,
    max_conns: usize,
    /// When a refused connection was last logged.
    refusal_logged: Option<Instant>,
}

pub fn control_main(verbosity: u8, socket: &Path) -> ExitCode {
    let start = match proc::child_start(Role::Control, verbosity) {
        Ok(start) => start,
        Err(e) => {
            eprintln!("vmd: control: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match control_bind(socket) {
        Ok(listener) => listener,
        Err(e) => {
            log_warn!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let max_conns = control_raise_file_limit();
    #[cfg(feature = "test-triggers")]
    let trigger = crate::trigger::Trigger::setup();
    let poll = match Poll::new() {
        Ok(poll) => poll,
        Err(e) => {
            log_warn!("cannot create the event loop: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut listener = UnixListener::from_std(listener);
    let registered = poll
        .registry()
        .register(
            &mut SourceFd(&start.channel.sock.as_raw_fd()),
            PARENT,
            Interest::READABLE | Interest::WRITABLE,
        )
        .and_then(|()| {
            poll.registry()
                .register(&mut listener, LISTENER, Interest::READABLE)
        });
    #[cfg(feature = "test-triggers")]
    let registered = registered.and_then(|()| trigger.register(poll.registry(), TRIGGER));
    if let Err(e) = registered {
        log_warn!("cannot register with the event loop: {e}");
        return ExitCode::FAILURE;
    }

    if let Err(e) = proc::child_drop_to_vmd(Role::Control, &start, CONTROL_SYSCALLS) {
        log_warn!("{e}");
        return ExitCode::FAILURE;
    }
    log_info!("listening on {}", socket.display());

    let mut control = Control {
        poll,
        listener,
        accept_stalled: false,
        parent: start.channel,
        conns: HashMap::new(),
        next_id: 1,
        max_conns,
        refusal_logged: None,
    };
    let mut events = Events::with_capacity(256);
    loop {
        if let Err(e) = control.poll.poll(&mut events, None) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            log_warn!("event loop: {e}");
            return ExitCode::FAILURE;
        }
        for event in events.iter() {
            match event.token() {
                PARENT => control.dispatch_parent(),
                LISTENER => control.accept(),
                #[cfg(feature = "test-triggers")]
                TRIGGER => trigger.fire("control"),
                Token(t) if t >= FIRST_CONN_TOKEN => {
                    control.dispatch_client((t - FIRST_CONN_TOKEN) as u32)
                }
                _ => {}
            }
        }
    }
}

impl Control {
    /// Reads the parent's frames: replies for connections, and everything
    /// every child handles (proc::child_receive exits if the parent is gone).
    fn dispatch_parent(&mut self) {
        if let Err(e) = self.parent.flush() {
            log_warn!("closing the channel to the parent: {e}");
            std::process::exit(1);
        }
        for frame in proc::child_receive(&mut self.parent) {
            self.dispatch_reply(frame);
        }
    }

    fn dispatch_reply(&mut self, frame: Frame) {
        let id = frame.peer_id;
        match frame.message {
            Message::CtlTerminated { vmid, timed_out } => {
                let waiters: Vec<u32> = self
                    .conns
                    .iter()
                    .filter(|(_, c)| c.pending == Some(Pending::Waiting { vmid }))
                    .map(|(id, _)| *id)
                    .collect();
                for id in waiters {
                    self.answer(id, Message::CtlTerminated { vmid, timed_out }, true);
                }
            }
            Message::CtlEvent(event) => self.deliver(event),
            Message::CtlVm(info) => self.answer(id, Message::CtlVm(info), false),
            m @ Message::CtlStats(_) => self.answer(id, m, false),
            m @ Message::CtlProgress { .. } => self.answer(id, m, false),
            Message::CtlVmResult { vmid, error, tty } => {
                let Some(conn) = self.conns.get_mut(&id) else {
                    return;
                };
                if conn.pending == Some(Pending::AskedToWait) && error.is_none() {
                    log_debug!("connection {id} waits for vm {vmid}");
                    conn.pending = Some(Pending::Waiting { vmid });
                    return;
                }
                self.answer(id, Message::CtlVmResult { vmid, error, tty }, true);
            }
            m @ (Message::CtlVmEnd | Message::CtlOk { .. } | Message::CtlFail { .. }) => {
                self.answer(id, m, true)
            }
            other => log_warn!("unexpected message {} from the parent", other.type_code().1),
        }
    }

    /// Sends `message` to connection `id` (gone already: dropped); `last`
    /// ends its current request, so the next queued one may go.
    fn answer(&mut self, id: u32, message: Message, last: bool) {
        let Some(conn) = self.conns.get_mut(&id) else {
            log_debug!("answer for closed connection {id} dropped");
            return;
        };
        if last {
            conn.pending = None;
        }
        if let Err(e) = conn.channel.send(Frame::new(message)) {
            self.close(id, &format!("sending: {e}"));
            return;
        }
        if last {
            self.pump(id);
        }
    }

    /// Queues `event` for every listener it matches and sends what their
    /// sockets take.
    fn deliver(&mut self, event: Event) {
        let ids: Vec<u32> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.listener
                    .as_ref()
                    .is_some_and(|l| event.matches(l.target.as_ref()))
            })
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let Some(listener) = self.conns.get_mut(&id).and_then(|c| c.listener.as_mut()) else {
                continue;
            };
            if !listener.queue.push(event.clone()) && !listener.dropping {
                listener.dropping = true;
                log_debug!("connection {id} does not read its events: dropping them");
            }
            self.drain_events(id);
        }
    }

    /// Sends listener `id` its queued events while its socket takes them
    /// whole (what it does not take waits in the queue, not in the
    /// channel, so the queue's bound holds).
    fn drain_events(&mut self, id: u32) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let Some(listener) = conn.listener.as_mut() else {
            return;
        };
        while conn.channel.writer.is_empty() {
            let Some(item) = listener.queue.pop() else {
                return;
            };
            let message = match item {
                Queued::Event(event) => Message::CtlEvent(event),
                Queued::Dropped(count) => {
                    listener.dropping = false;
                    log_debug!("connection {id} reads again; {count} events were dropped");
                    Message::CtlEventsDropped { count }
                }
            };
            if let Err(e) = conn.channel.send(Frame::new(message)) {
                self.close(id, &format!("sending: {e}"));
                return;
            }
        }
    }

    /// Accepts every pending connection.
    fn accept(&mut self) {
        self.accept_stalled = false;
        loop {
            let sock = match control_accept_one(&self.listener) {
                Ok(sock) => sock,
                Err(Errno::EAGAIN) => return,
                Err(Errno::EINTR | Errno::ECONNABORTED) => continue,
                Err(e @ (Errno::EMFILE | Errno::ENFILE)) => {
                    // The limits keep our table from filling (each
                    // connection holds one descriptor); should the
                    // system's fill, retry when a connection closes.
                    // Readiness is edge-triggered: it would not come back.
                    log_warn!("accept: {e}; connections wait until one closes");
                    self.accept_stalled = true;
                    return;
                }
                Err(e) => {
                    log_warn!("accept: {e}");
                    return;
                }
            };
            let creds = match control_peer_credentials(sock.as_fd()) {
                Ok(creds) => creds,
                Err(e) => {
                    log_warn!("cannot read a peer's credentials: {e}");
                    continue;
                }
            };
            if let Some(why) = self.refuse_connection(&creds) {
                // At most one line a second, however fast they come.
                if self
                    .refusal_logged
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
                {
                    log_warn!("refusing a connection from uid {}: {why}", creds.uid);
                    self.refusal_logged = Some(Instant::now());
                }
                continue;
            }
            let id = self.claim_id();
            let registered = self.poll.registry().register(
                &mut SourceFd(&sock.as_raw_fd()),
                Token(FIRST_CONN_TOKEN + id as usize),
                Interest::READABLE | Interest::WRITABLE,
            );
            if let Err(e) = registered {
                log_warn!("cannot register a connection: {e}");
                continue;
            }
            log_debug!(
                "connection {id} from pid {} uid {} gid {}",
                creds.pid,
                creds.uid,
                creds.gid
            );
            // Only root's requests take a descriptor.
            let fd_limit = usize::from(creds.is_root());
            self.conns.insert(
                id,
                Conn {
                    channel: Channel::with_fd_limit(sock, fd_limit),
                    creds,
                    queued: VecDeque::new(),
                    pending: None,
                    listener: None,
                },
            );
            // Frames may have arrived with the connection: edge-triggered
            // readiness will not report them again.
            self.dispatch_client(id);
        }
    }

    /// A connection id not in use (ids grow; 0 means "every waiter").
    fn claim_id(&mut self) -> u32 {
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1).max(1);
            if !self.conns.contains_key(&id) && (id as usize) < usize::MAX - FIRST_CONN_TOKEN {
                return id;
            }
        }
    }

    /// Reads what a client sent and sends what it has not taken yet.
    fn dispatch_client(&mut self, id: u32) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let result = conn.channel.flush().and_then(|_| conn.channel.receive());
        let (frames, eof) = match result {
            Ok(received) => received,
            Err(e) => {
                self.close(id, &e.to_string());
                return;
            }
        };
        for frame in frames {
            let Message::Ctl(request) = frame.message else {
                let what = frame.message.type_code().1;
                self.close(id, &format!("unexpected message {what}"));
                return;
            };
            let Some(conn) = self.conns.get_mut(&id) else {
                return;
            };
            if frame.fd.is_some() && conn.queued.iter().any(|(_, fd)| fd.is_some()) {
                self.close(id, "a second descriptor before the first was taken");
                return;
            }
            conn.queued.push_back((request, frame.fd));
            if conn.queued.len() > MAX_QUEUED_REQUESTS {
                self.close(id, "too many requests without reading answers");
                return;
            }
        }
        if eof {
            self.close(id, "closed by the client");
            return;
        }
        self.drain_events(id);
        self.pump(id);
    }

    /// Sends the connection's next request on, if none is at the parent.
    fn pump(&mut self, id: u32) {
        loop {
            let Some(conn) = self.conns.get_mut(&id) else {
                return;
            };
            if conn.pending.is_some() {
                return;
            }
            let Some((request, fd)) = conn.queued.pop_front() else {
                return;
            };
            let refusal = if !conn.creds.is_root() && !request.open_to_users() {
                log_warn!(
                    "denied {} from uid {}: only root may",
                    request.name(),
                    conn.creds.uid
                );
                Some((libc::EPERM, Vec::new()))
            } else {
                common::ctl::fd_refusal(&request, fd.is_some()).map(|why| {
                    log_debug!("connection {id}: {why}");
                    (libc::EINVAL, vec![why])
                })
            };
            if let Some((errno, lines)) = refusal {
                // (the descriptor, if any, is closed here)
                let fail = Message::CtlFail { errno, lines };
                if let Err(e) = conn.channel.send(Frame::new(fail)) {
                    self.close(id, &format!("sending: {e}"));
                    return;
                }
                continue;
            }
            if let CtlRequest::Events { target } = request {
                // Held here: the parent sends every event to control.
                log_debug!("connection {id} listens for events");
                conn.pending = Some(Pending::Listening);
                conn.listener = Some(Listener {
                    target,
                    queue: ListenerQueue::new(LISTENER_QUEUE),
                    dropping: false,
                });
                return;
            }
            let waits = matches!(
                request,
                CtlRequest::Wait { .. } | CtlRequest::Stop { wait: true, .. }
            );
            conn.pending = Some(if waits {
                Pending::AskedToWait
            } else {
                Pending::Asked
            });
            let forward = Frame {
                peer_id: id,
                fd,
                ..Frame::new(Message::CtlForward {
                    creds: conn.creds.clone(),
                    request,
                })
            };
            if let Err(e) = self.parent.send_whole(forward) {
                log_warn!("closing the channel to the parent: {e}");
                std::process::exit(1);
            }
        }
    }

    /// Why a new connection from `creds` is refused, if it is: the last
    /// ROOT_RESERVED places are root's, and a user other than root holds
    /// at most MAX_CONNS_PER_USER, so no users can lock root out.
    fn refuse_connection(&self, creds: &Credentials) -> Option<String> {
        let open = self.conns.len();
        if open >= self.max_conns {
            return Some(format!("{open} connections open"));
        }
        if creds.uid == 0 {
            return None;
        }
        if open + ROOT_RESERVED >= self.max_conns {
            return Some(format!("{open} connections open, the rest are root's"));
        }
        let mine = self
            .conns
            .values()
            .filter(|c| c.creds.uid == creds.uid)
            .count();
        (mine >= MAX_CONNS_PER_USER).then(|| format!("it has {mine} connections open"))
    }

    fn close(&mut self, id: u32, why: &str) {
        let Some(conn) = self.conns.remove(&id) else {
            return;
        };
        log_debug!("connection {id} closed: {why}");
        deregister(self.poll.registry(), &conn.channel);
        drop(conn);
        if self.accept_stalled {
            self.accept();
        }
    }
}

fn deregister(registry: &Registry, channel: &Channel) {
    let _ = registry.deregister(&mut SourceFd(&channel.sock.as_raw_fd()));
}

/// accept4 with the flags set at once (mio's accept needs fcntl, which
/// the filter refuses).
fn control_accept_one(listener: &UnixListener) -> Result<OwnedFd, Errno> {
    // SAFETY: accept4 on our listening socket; no peer address wanted.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
        )
    };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: accept4 just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The peer's pid, uid and gid (SO_PEERCRED) and supplementary groups
/// (SO_PEERGROUPS), as the kernel recorded them at connect time.
fn control_peer_credentials(sock: BorrowedFd) -> Result<Credentials, Errno> {
    let cred = nix::sys::socket::getsockopt(&sock, nix::sys::socket::sockopt::PeerCredentials)?;
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: the kernel writes at most `len` bytes into `groups`,
        // which is that long, and sets `len` to what it wrote (or, on
        // ERANGE, to what it needs).
        let rc = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let count = len as usize / std::mem::size_of::<libc::gid_t>();
        match rc {
            0 => {
                groups.truncate(count);
                break;
            }
            _ if Errno::last() == Errno::ERANGE && count > groups.len() => {
                groups.resize(count, 0);
            }
            _ => return Err(Errno::last()),
        }
    }
    Ok(Credentials {
        pid: cred.pid(),
        uid: cred.uid(),
        gid: cred.gid(),
        groups,
    })
}

/// Raises the open-files limit (while still root) so many clients fit,
/// and returns how many connections to allow.
fn control_raise_file_limit() -> usize {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((1024, 1024));
    let wanted = WANTED_FILES.min(hard).max(soft);
    let limit = match setrlimit(Resource::RLIMIT_NOFILE, wanted, hard) {
        Ok(()) => wanted,
        Err(e) => {
            log_warn!("cannot raise the open files limit to {wanted}: {e}");
            soft
        }
    };
    limit.saturating_sub(RESERVED_FILES).max(16) as usize
}

/// Binds the control socket (as root): refuses a socket another vmd
/// answers on, replaces a stale one, and sets mode 0660, owner root:root.
fn control_bind(path: &Path) -> Result<std::os::unix::net::UnixListener, String> {
    let name = path.display();
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(format!(
                "{name} exists and is not a socket; remove it or choose another path with -s"
            ));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(format!("{name} is in use: is another vmd running?"));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove stale socket {name}: {e}"))?;
    }
    // Nobody may connect before the mode is set: bind with a umask that
    // leaves the socket 0600 (root only) until then.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = std::os::unix::net::UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound.map_err(|e| format!("cannot bind {name}: {e}"))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("{name}: {e}"))?;
    std::os::unix::fs::chown(path, Some(0), Some(0)).map_err(|e| format!("chown {name}: {e}"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| format!("chmod {name}: {e}"))?;
    Ok(listener)
}
