//! The control process: owns the UNIX socket vmctl connects to.
//!
//! Starts as root from a fresh exec (no inherited filter), binds the
//! socket while still root (mode 0660, root:root), then drops to _vmd in
//! the empty chroot and adds the filter [`CONTROL_SYSCALLS`] on top of
//! [`seccomp::CHILD_SYSCALLS`]. For now it accepts connections and closes
//! them: the commands come with the next piece of work.

use crate::log::{log_debug, log_info, log_warn};
use crate::proc;
use crate::seccomp::{self, Allowed};
use common::imsg::{Message, Role};
use mio::net::UnixListener;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::errno::Errno;
use std::io::ErrorKind;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;

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
];

const PARENT: Token = Token(0);
const LISTENER: Token = Token(1);
#[cfg(feature = "test-triggers")]
const TRIGGER: Token = Token(2);

pub fn control_main(verbosity: u8, socket: &Path) -> ExitCode {
    let mut start = match proc::child_start(Role::Control, verbosity) {
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
            Interest::READABLE,
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

    #[cfg(feature = "test-triggers")]
    let lists: &[&[Allowed]] = &[
        seccomp::CHILD_SYSCALLS,
        CONTROL_SYSCALLS,
        crate::trigger::SYSCALLS,
    ];
    #[cfg(not(feature = "test-triggers"))]
    let lists: &[&[Allowed]] = &[seccomp::CHILD_SYSCALLS, CONTROL_SYSCALLS];
    if let Err(e) = proc::child_drop_to_vmd(Role::Control, &start, lists) {
        log_warn!("{e}");
        return ExitCode::FAILURE;
    }
    log_info!("listening on {}", socket.display());

    let mut poll = poll;
    let mut events = Events::with_capacity(64);
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            log_warn!("event loop: {e}");
            return ExitCode::FAILURE;
        }
        for event in events.iter() {
            match event.token() {
                PARENT => {
                    for frame in proc::child_receive(&mut start.channel) {
                        control_dispatch_parent(frame.message);
                    }
                }
                LISTENER => control_accept(&listener),
                #[cfg(feature = "test-triggers")]
                TRIGGER => trigger.fire("control"),
                _ => {}
            }
        }
    }
}

fn control_dispatch_parent(message: Message) {
    log_warn!(
        "unexpected message {} from the parent",
        message.type_code().1
    );
}

/// Accepts every pending connection; none has anything to ask yet.
fn control_accept(listener: &UnixListener) {
    loop {
        match control_accept_one(listener) {
            Ok(conn) => {
                log_debug!("connection closed: no commands yet");
                drop(conn);
            }
            Err(Errno::EAGAIN) => return,
            Err(Errno::EINTR | Errno::ECONNABORTED) => continue,
            Err(e) => {
                log_warn!("accept: {e}");
                return;
            }
        }
    }
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
    let listener = std::os::unix::net::UnixListener::bind(path)
        .map_err(|e| format!("cannot bind {name}: {e}"))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("{name}: {e}"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| format!("chmod {name}: {e}"))?;
    std::os::unix::fs::chown(path, Some(0), Some(0)).map_err(|e| format!("chown {name}: {e}"))?;
    Ok(listener)
}
