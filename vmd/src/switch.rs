//! The switch process: network services for local interfaces, today the
//! BOOTP/DHCP server (common::dhcp decides; this file does the I/O).
//!
//! The parent opens one AF_PACKET socket per local interface (bound to
//! it, PACKET_AUXDATA on, a classic BPF filter for IPv4 UDP to port 67:
//! parent/dhcp.rs) and sends it with a `SwitchServe` and the interface's
//! lease; `SwitchStop` closes it. Each port's frames are answered through
//! the same socket. Frames that get no answer are dropped and counted; a
//! debug line per port says how many and the last reason, at most every
//! DROP_LOG_INTERVAL. A socket that reads ENETDOWN because its interface
//! is gone (the kernel unbound it) is closed and the parent told
//! (`SwitchPortGone`); one whose interface is only down is kept (the
//! kernel binds it again when the interface comes up). When switch dies the
//! parent starts it again and sends every socket again.
//!
//! Starts from a fresh exec (no inherited filter), drops to _vmd in the
//! empty chroot and adds [`SWITCH_SYSCALLS`] to
//! [`seccomp::CHILD_SYSCALLS`](crate::seccomp::CHILD_SYSCALLS).

use crate::log::{log_debug, log_warn};
use crate::packet;
use crate::proc;
use crate::seccomp::Allowed;
use common::config::format_lladdr;
use common::dhcp::{self, Lease};
use common::imsg::{Channel, Frame, Message, Role};
use common::local::LocalPort;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};
use std::io::ErrorKind;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const PARENT: Token = Token(0);
#[cfg(feature = "test-triggers")]
const TRIGGER: Token = Token(2);
/// Ports' tokens start here.
const FIRST_PORT: usize = 16;
/// At most one debug line about dropped frames per port this often.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// How often a port that is down is checked for having vanished.
const DOWN_CHECK: Duration = Duration::from_secs(1);
/// At most this many frames read from one port per event, so that a
/// flooding guest cannot starve the others (the socket stays readable:
/// mio's edge is re-armed by reregistering).
const FRAMES_PER_EVENT: usize = 64;

/// What switch adds to the children's filter.
pub const SWITCH_SYSCALLS: &[Allowed] = &[
    (
        libc::SYS_epoll_ctl,
        "add and remove the packet sockets the parent passes at any time",
    ),
    (
        libc::SYS_sendto,
        "send DHCP replies on a local interface's packet socket",
    ),
    (
        libc::SYS_getsockname,
        "after ENETDOWN, tell a vanished interface from one that is down",
    ),
];

/// One local interface served.
struct Port {
    port: LocalPort,
    fd: OwnedFd,
    lease: Lease,
    token: Token,
    answered: u64,
    dropped: u64,
    /// Drops since the last debug line, the last reason, and when that
    /// line was written.
    unlogged: u64,
    last_drop: Option<dhcp::Drop>,
    logged_at: Option<Instant>,
    /// It read ENETDOWN while still bound: down, or on its way out (the
    /// kernel reports the down before it unbinds a vanishing interface,
    /// and nothing after). Checked every DOWN_CHECK until a frame comes.
    down: bool,
}

impl Port {
    fn drop_frame(&mut self, why: dhcp::Drop) {
        self.dropped += 1;
        self.unlogged += 1;
        self.last_drop = Some(why);
        self.log_drops(false);
    }

    /// The debug line about dropped frames, if one is due (or `now`).
    fn log_drops(&mut self, now: bool) {
        let due = self
            .logged_at
            .is_none_or(|at| at.elapsed() >= DROP_LOG_INTERVAL);
        if self.unlogged == 0 || !(due || now) {
            return;
        }
        if let Some(why) = self.last_drop {
            log_debug!(
                "dhcp {}: dropped {} frame(s) ({} in all), last: {why}",
                self.port,
                self.unlogged,
                self.dropped
            );
        }
        self.unlogged = 0;
        self.logged_at = Some(Instant::now());
    }
}

struct Switch {
    channel: Channel,
    ports: Vec<Port>,
    next_token: usize,
}

pub fn switch_main(verbosity: u8) -> ExitCode {
    let start = match proc::child_start(Role::Switch, verbosity) {
        Ok(start) => start,
        Err(e) => {
            eprintln!("vmd: switch: {e}");
            return ExitCode::FAILURE;
        }
    };
    #[cfg(feature = "test-triggers")]
    let trigger = crate::trigger::Trigger::setup();
    let mut poll = match Poll::new() {
        Ok(poll) => poll,
        Err(e) => {
            log_warn!("cannot create the event loop: {e}");
            return ExitCode::FAILURE;
        }
    };
    let registered = poll.registry().register(
        &mut SourceFd(&start.channel.sock.as_raw_fd()),
        PARENT,
        Interest::READABLE,
    );
    #[cfg(feature = "test-triggers")]
    let registered = registered.and_then(|()| trigger.register(poll.registry(), TRIGGER));
    if let Err(e) = registered {
        log_warn!("cannot register with the event loop: {e}");
        return ExitCode::FAILURE;
    }

    if let Err(e) = proc::child_drop_to_vmd(Role::Switch, &start, SWITCH_SYSCALLS) {
        log_warn!("{e}");
        return ExitCode::FAILURE;
    }
    log_debug!("running");

    let mut switch = Switch {
        channel: start.channel,
        ports: Vec::new(),
        next_token: FIRST_PORT,
    };
    let mut events = Events::with_capacity(16);
    let mut buf = vec![0u8; dhcp::MAX_FRAME + 1];
    loop {
        let timeout = switch.ports.iter().any(|p| p.down).then_some(DOWN_CHECK);
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            log_warn!("event loop: {e}");
            return ExitCode::FAILURE;
        }
        for event in events.iter() {
            match event.token() {
                PARENT => {
                    for frame in proc::child_receive(&mut switch.channel) {
                        switch.dispatch_parent(poll.registry(), frame);
                    }
                }
                #[cfg(feature = "test-triggers")]
                TRIGGER => trigger.fire("switch"),
                token => switch.port_readable(poll.registry(), token, &mut buf),
            }
        }
        switch.check_down(poll.registry());
    }
}

impl Switch {
    fn dispatch_parent(&mut self, registry: &Registry, frame: Frame) {
        match frame.message {
            Message::SwitchServe { port, lease } => {
                let Some(fd) = frame.fd else {
                    log_warn!("dhcp {port}: the parent sent no socket");
                    return;
                };
                self.serve(registry, port, fd, lease);
            }
            Message::SwitchStop { port } => {
                if let Some(i) = self.ports.iter().position(|p| p.port == port) {
                    self.close(registry, i);
                }
            }
            other => log_warn!("unexpected message {} from the parent", other.type_code().1),
        }
    }

    fn serve(&mut self, registry: &Registry, port: LocalPort, fd: OwnedFd, lease: Lease) {
        // A port served again (the parent's view wins) replaces the old one.
        if let Some(i) = self.ports.iter().position(|p| p.port == port) {
            self.close(registry, i);
        }
        let token = Token(self.next_token);
        self.next_token += 1;
        if let Err(e) = registry.register(&mut SourceFd(&fd.as_raw_fd()), token, Interest::READABLE)
        {
            log_warn!("dhcp {port}: cannot watch its socket: {e}");
            return;
        }
        log_debug!(
            "dhcp {port}: serving {} for {}",
            lease.guest,
            format_lladdr(&lease.guest_mac)
        );
        // Frames queued before (switch restarting) make the socket
        // readable at once: registering reports them.
        self.ports.push(Port {
            port,
            fd,
            lease,
            token,
            answered: 0,
            dropped: 0,
            unlogged: 0,
            last_drop: None,
            logged_at: None,
            down: false,
        });
    }

    fn close(&mut self, registry: &Registry, index: usize) {
        let mut p = self.ports.remove(index);
        p.log_drops(true);
        let _ = registry.deregister(&mut SourceFd(&p.fd.as_raw_fd()));
        log_debug!(
            "dhcp {}: stopped ({} answered, {} dropped)",
            p.port,
            p.answered,
            p.dropped
        );
    }

    /// The port's interface vanished: close it and tell the parent.
    fn gone(&mut self, registry: &Registry, index: usize) {
        let port = self.ports[index].port;
        log_debug!("dhcp {port}: the interface is gone");
        self.close(registry, index);
        if let Err(e) = self
            .channel
            .send_whole(Frame::new(Message::SwitchPortGone { port }))
        {
            log_warn!("cannot tell the parent that {port} is gone: {e}");
        }
    }

    /// Closes the ports that were down and whose interface is now gone.
    fn check_down(&mut self, registry: &Registry) {
        while let Some(index) = self
            .ports
            .iter()
            .position(|p| p.down && packet::interface_gone(&p.fd))
        {
            self.gone(registry, index);
        }
    }

    fn port_readable(&mut self, registry: &Registry, token: Token, buf: &mut [u8]) {
        let Some(index) = self.ports.iter().position(|p| p.token == token) else {
            return;
        };
        let p = &mut self.ports[index];
        match port_drain(p, buf) {
            Drained::All => {}
            Drained::Gone => self.gone(registry, index),
            // Edge-triggered: re-arming reports the frames still queued.
            Drained::More => {
                let fd = p.fd.as_raw_fd();
                if let Err(e) = registry.reregister(&mut SourceFd(&fd), token, Interest::READABLE) {
                    log_warn!("dhcp {}: cannot watch its socket: {e}", p.port);
                }
            }
        }
    }
}

enum Drained {
    All,
    /// FRAMES_PER_EVENT were read; there may be more.
    More,
    /// The interface is gone (ENETDOWN).
    Gone,
}

/// Reads and answers up to FRAMES_PER_EVENT frames.
fn port_drain(p: &mut Port, buf: &mut [u8]) -> Drained {
    for _ in 0..FRAMES_PER_EVENT {
        let received = match packet::recv(&p.fd, buf) {
            Ok(Some(received)) => {
                p.down = false;
                received
            }
            Ok(None) => return Drained::All,
            Err(e) if e.raw_os_error() == Some(libc::ENETDOWN) => {
                if packet::interface_gone(&p.fd) {
                    return Drained::Gone;
                }
                // Down (served again once it is up), or vanishing.
                log_debug!("dhcp {}: the interface is down", p.port);
                p.down = true;
                continue;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                log_warn!("dhcp {}: reading its socket: {e}", p.port);
                return Drained::All;
            }
        };
        if received.outgoing {
            continue;
        }
        let frame = &buf[..received.len.min(buf.len())];
        let reply = if received.len > dhcp::MAX_FRAME {
            Err(dhcp::Drop::Size(received.len))
        } else {
            dhcp::dhcp_reply(frame, received.csum_not_ready, &p.lease)
        };
        match reply {
            Ok(reply) => match packet::send(&p.fd, &reply) {
                Ok(()) => p.answered += 1,
                Err(e)
                    if e.raw_os_error() == Some(libc::ENETDOWN)
                        && packet::interface_gone(&p.fd) =>
                {
                    return Drained::Gone
                }
                Err(e) => log_debug!("dhcp {}: reply not sent: {e}", p.port),
            },
            Err(why) => p.drop_frame(why),
        }
    }
    Drained::More
}
