//! Logging for every vmd process.
//!
//! The parent writes lines to stderr (`-d`), to syslog when /dev/log
//! exists, or else appends them to /var/log/vmd/vmd.log. Children are
//! chrooted and cannot reach any of those: they send each line to the
//! parent as a `Log` message on their socket, and the parent writes it
//! prefixed with the child's role. The verbosity (number of `-v`) decides
//! whether debug lines are written; the parent passes it to its children
//! and can change it at run time with a `SetVerbosity` message.

use common::imsg::{self, Frame, LogLevel, Message};
use std::ffi::CString;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{BorrowedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

pub const LOG_FILE: &str = "/var/log/vmd/vmd.log";
pub const SYSLOG_SOCKET: &str = "/dev/log";

enum Sink {
    Stderr,
    Syslog,
    File(File),
    /// A child: the socket to the parent (a raw fd: it lives as long as
    /// the process, on the fixed descriptor `proc::CHILD_FD`).
    Parent(RawFd),
}

static SINK: Mutex<Sink> = Mutex::new(Sink::Stderr);
static VERBOSITY: AtomicU8 = AtomicU8::new(0);

pub fn set_verbosity(level: u8) {
    VERBOSITY.store(level, Ordering::Relaxed);
}

pub fn verbosity() -> u8 {
    VERBOSITY.load(Ordering::Relaxed)
}

fn set_sink(sink: Sink) {
    match SINK.lock() {
        Ok(mut guard) => *guard = sink,
        Err(poisoned) => *poisoned.into_inner() = sink,
    }
}

/// Parent with `-d`: lines go to stderr.
pub fn init_stderr() {
    set_sink(Sink::Stderr);
}

/// Parent, daemonized, /dev/log present: lines go to syslog (daemon facility).
pub fn init_syslog() {
    static IDENT: &std::ffi::CStr = c"vmd";
    // SAFETY: IDENT is a static NUL-terminated string, as openlog keeps
    // the pointer.
    unsafe {
        libc::openlog(
            IDENT.as_ptr(),
            libc::LOG_PID | libc::LOG_NDELAY,
            libc::LOG_DAEMON,
        )
    };
    set_sink(Sink::Syslog);
}

/// Parent, daemonized, no syslog: lines are appended to `path` (root
/// only), its directory created if missing.
pub fn init_file(path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)?;
    set_sink(Sink::File(file));
    Ok(())
}

/// A child: lines go to the parent over `fd`.
pub fn init_child(fd: RawFd) {
    set_sink(Sink::Parent(fd));
}

/// Logs `args` at `level` if the verbosity lets it through.
pub fn log(level: LogLevel, args: fmt::Arguments) {
    if level == LogLevel::Debug && verbosity() == 0 {
        return;
    }
    write_line(level, &args.to_string());
}

/// Writes one line as it is (the parent uses this for its children's
/// lines, already filtered by the child's verbosity).
pub fn write_line(level: LogLevel, text: &str) {
    let text = sanitize(text);
    let mut guard = match SINK.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    };
    match &mut *guard {
        Sink::Stderr => {
            let _ = writeln!(std::io::stderr(), "{text}");
        }
        Sink::Syslog => {
            let priority = match level {
                LogLevel::Warn => libc::LOG_WARNING,
                LogLevel::Info => libc::LOG_INFO,
                LogLevel::Debug => libc::LOG_DEBUG,
            };
            if let Ok(line) = CString::new(text) {
                // SAFETY: a constant "%s" format with one NUL-terminated
                // string argument.
                unsafe { libc::syslog(priority, c"%s".as_ptr(), line.as_ptr()) };
            }
        }
        Sink::File(file) => {
            let _ = writeln!(file, "{} vmd[{}]: {text}", timestamp(), std::process::id());
        }
        Sink::Parent(fd) => {
            // SAFETY: the fd is CHILD_FD, open for the whole life of a child.
            let sock = unsafe { BorrowedFd::borrow_raw(*fd) };
            let frame = Frame::new(Message::Log { level, text });
            if imsg::send_blocking(sock, frame).is_err() {
                // The parent is gone; nobody is left to read the line.
            }
        }
    }
}

/// Replaces control characters so a line stays one line.
pub fn sanitize(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Local time in syslog's format, "Nov 21 08:04:14".
fn timestamp() -> String {
    // SAFETY: time(NULL), localtime_r and strftime write only into the
    // local variables given, whose sizes are passed.
    unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&now, &mut tm).is_null() {
            return String::from("-");
        }
        let mut buf = [0u8; 32];
        let n = libc::strftime(
            buf.as_mut_ptr().cast(),
            buf.len(),
            c"%b %e %H:%M:%S".as_ptr(),
            &tm,
        );
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

macro_rules! log_warn {
    ($($arg:tt)*) => { $crate::log::log(common::imsg::LogLevel::Warn, format_args!($($arg)*)) };
}
macro_rules! log_info {
    ($($arg:tt)*) => { $crate::log::log(common::imsg::LogLevel::Info, format_args!($($arg)*)) };
}
macro_rules! log_debug {
    ($($arg:tt)*) => { $crate::log::log(common::imsg::LogLevel::Debug, format_args!($($arg)*)) };
}
pub(crate) use {log_debug, log_info, log_warn};
