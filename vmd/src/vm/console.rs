//! The console relay of the VM process, the same for every backend: guest
//! output (the serial socketpair) goes to the pty without blocking
//! (dropped while nobody drains it) and all of it to the console log; pty
//! input goes to the guest. At the log's size cap it says so, and the VM
//! process asks the parent to rotate the file and send a fresh one
//! ([`Console::replace_log`]).
//!
//! Every descriptor is non-blocking and read until it would block: the
//! VM process's loop (mio) reports readiness edge-triggered.

use crate::log::log_warn;
use nix::errno::Errno;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

/// Console output written past the log's cap while the parent rotates it;
/// beyond this, output is left out of the log until the fresh file comes.
const LOG_SLACK: u64 = 64 * 1024;

/// The console log as the VM process writes it.
struct ConsoleLog {
    fd: OwnedFd,
    size: u64,
    cap: u64,
    /// Rotation asked for, fresh file not yet received.
    asked: bool,
    /// A write failed (said once).
    failed: bool,
}

impl ConsoleLog {
    /// Appends `data`; returns true when the parent should now be asked to
    /// rotate.
    fn write(&mut self, data: &[u8]) -> bool {
        if self.size >= self.cap + LOG_SLACK {
            return false;
        }
        match write_all(self.fd.as_raw_fd(), data) {
            Ok(()) => self.size += data.len() as u64,
            Err(e) if !self.failed => {
                self.failed = true;
                log_warn!("writing the console log: {e}");
            }
            Err(_) => {}
        }
        if self.size >= self.cap && !self.asked {
            self.asked = true;
            return true;
        }
        false
    }
}

/// The guest's serial line, the pty users attach to and the console log.
pub struct Console {
    /// The VM process's end of the guest's serial line; None once the
    /// backend closed it.
    serial: Option<OwnedFd>,
    pty: OwnedFd,
    /// Kept open so the master never reads EIO when no one is attached.
    _pty_slave: OwnedFd,
    log: ConsoleLog,
}

impl Console {
    /// `log_size` is the log's current size, `log_cap` the size at which
    /// it is rotated.
    pub fn new(
        serial: OwnedFd,
        pty: OwnedFd,
        pty_slave: OwnedFd,
        log: OwnedFd,
        log_size: u64,
        log_cap: u64,
    ) -> Console {
        Console {
            serial: Some(serial),
            pty,
            _pty_slave: pty_slave,
            log: ConsoleLog {
                fd: log,
                size: log_size,
                cap: log_cap,
                asked: false,
                failed: false,
            },
        }
    }

    fn serial_fd(&self) -> Option<RawFd> {
        self.serial.as_ref().map(|fd| fd.as_raw_fd())
    }

    /// Relays what the guest wrote; true when the log reached its cap and
    /// the parent should be asked to rotate it.
    pub fn on_guest(&mut self, buf: &mut [u8]) -> bool {
        let mut rotate = false;
        while let Some(fd) = self.serial_fd() {
            match read_some(fd, buf) {
                Ok(None) => break,
                Ok(Some(0)) | Err(_) => self.serial = None,
                Ok(Some(n)) => {
                    write_some(self.pty.as_raw_fd(), &buf[..n]);
                    rotate |= self.log.write(&buf[..n]);
                }
            }
        }
        rotate
    }

    /// Relays what a user typed on the pty to the guest.
    pub fn on_pty(&mut self, buf: &mut [u8]) {
        while let Ok(Some(n)) = read_some(self.pty.as_raw_fd(), buf) {
            if n == 0 {
                break;
            }
            if let Some(serial) = &self.serial {
                write_some(serial.as_raw_fd(), &buf[..n]);
            }
        }
    }

    /// Bytes in the console log (since its last rotation).
    pub fn log_size(&self) -> u64 {
        self.log.size
    }

    /// The parent rotated the log: `fd` is the fresh file, `size` long.
    pub fn replace_log(&mut self, fd: OwnedFd, size: u64) {
        self.log.fd = fd;
        self.log.size = size;
        self.log.asked = false;
        self.log.failed = false;
    }
}

/// Writes all of `data`, waiting for a blocking `fd`.
pub fn write_all(fd: RawFd, mut data: &[u8]) -> Result<(), Errno> {
    while !data.is_empty() {
        // SAFETY: fd is open for the duration of this call (owned by
        // the caller).
        match nix::unistd::write(unsafe { BorrowedFd::borrow_raw(fd) }, data) {
            Ok(0) => return Err(Errno::EIO),
            Ok(n) => data = &data[n..],
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes what fits without blocking; the rest is dropped.
fn write_some(fd: RawFd, mut data: &[u8]) {
    while !data.is_empty() {
        // SAFETY: as in write_all.
        match nix::unistd::write(unsafe { BorrowedFd::borrow_raw(fd) }, data) {
            Ok(0) => return,
            Ok(n) => data = &data[n..],
            Err(Errno::EINTR) => continue,
            Err(_) => return,
        }
    }
}

/// Reads once; Ok(None) when nothing is there now, Ok(Some(0)) at EOF.
pub fn read_some(fd: RawFd, buf: &mut [u8]) -> Result<Option<usize>, Errno> {
    loop {
        match nix::unistd::read(fd, buf) {
            Ok(n) => return Ok(Some(n)),
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}
