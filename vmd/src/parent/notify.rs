//! The service manager's notification protocol (sd_notify(3)), without
//! libsystemd: one datagram of `KEY=VALUE` lines to the socket
//! `$NOTIFY_SOCKET` names (a path, or an abstract address written with
//! a leading `@`). systemd's `Type=notify` units hear READY=1 once
//! control and switch run and the configuration is loaded, RELOADING=1
//! around a reload, STOPPING=1 and EXTEND_TIMEOUT_USEC at shutdown.
//!
//! The parent sends from its loop, so the socket is non-blocking: a
//! full queue drops the message (logged) rather than waiting. Without
//! `$NOTIFY_SOCKET` (no service manager, or not `Type=notify`) nothing
//! is sent.

use crate::log::{log_debug, log_warn};
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

pub struct Notify {
    sock: UnixDatagram,
    addr: SocketAddr,
    name: String,
}

impl Notify {
    /// The socket `$NOTIFY_SOCKET` names, if any. The variable is
    /// removed, so that children (control, switch, VM processes, QEMU)
    /// never see it. A name that cannot be used is logged.
    pub fn from_env() -> Option<Notify> {
        let name = std::env::var_os("NOTIFY_SOCKET")?;
        std::env::remove_var("NOTIFY_SOCKET");
        let name = name.to_string_lossy().into_owned();
        match notify_open(&name) {
            Ok((sock, addr)) => Some(Notify { sock, addr, name }),
            Err(e) => {
                log_warn!("NOTIFY_SOCKET {name}: {e}; the service manager is not told");
                None
            }
        }
    }

    /// Sends `text` (`KEY=VALUE` lines); a failure is logged, never waited
    /// for.
    pub fn send(&self, text: &str) {
        match self.sock.send_to_addr(text.as_bytes(), &self.addr) {
            Ok(_) => log_debug!("notified {}: {}", self.name, text.replace('\n', " ")),
            Err(e) => log_warn!("cannot notify the service manager at {}: {e}", self.name),
        }
    }
}

/// An unbound non-blocking datagram socket and the address `name` means
/// (`@x`: the abstract name `x`; else a path).
fn notify_open(name: &str) -> std::io::Result<(UnixDatagram, SocketAddr)> {
    use std::os::linux::net::SocketAddrExt;
    let addr = match name.strip_prefix('@') {
        Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name.as_bytes())?,
        None if name.starts_with('/') => SocketAddr::from_pathname(name)?,
        None => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "neither an absolute path nor an abstract @name",
            ))
        }
    };
    let sock = UnixDatagram::unbound()?;
    sock.set_nonblocking(true)?;
    Ok((sock, addr))
}

/// RELOADING=1 with the monotonic clock's time, as systemd wants it.
pub fn reloading_text() -> String {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec we own; CLOCK_MONOTONIC always exists.
    let usec = match unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) } {
        0 => now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1000,
        _ => 0,
    };
    format!("RELOADING=1\nMONOTONIC_USEC={usec}")
}

/// STOPPING=1, and how long the shutdown may still take from now.
pub fn stopping_text(left: Duration) -> String {
    format!(
        "STOPPING=1\nEXTEND_TIMEOUT_USEC={}",
        left.as_micros().min(u128::from(u64::MAX))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abstract_and_path_addresses_reach_their_listener() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("vmd-notify-test-{}", std::process::id());
        let listen_addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&listen_addr).unwrap();
        let (sock, addr) = notify_open(&format!("@{name}")).unwrap();
        sock.send_to_addr(b"READY=1", &addr).unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        assert!(notify_open("relative/path").is_err());
        assert!(stopping_text(Duration::from_secs(2)).ends_with("EXTEND_TIMEOUT_USEC=2000000"));
        assert!(reloading_text().starts_with("RELOADING=1\nMONOTONIC_USEC="));
    }
}
