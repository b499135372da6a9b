//! One vmd per control socket: the daemon holds an flock(2) on
//! `SOCKET.lock` for as long as it runs, taken before it starts anything
//! (VMs, children), so a second vmd given the same socket stops at once
//! and says who has it. Daemons with different sockets run side by side.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum LockError {
    #[error("socket {socket} is in use by another vmd (pid {pid})")]
    HeldBy { socket: String, pid: String },
    #[error("socket {0} is in use by another process; stop it or choose another path with -s")]
    Answering(String),
    #[error("{path} {why}; remove it or choose another socket path with -s")]
    BadLockFile { path: String, why: String },
    #[error("{path}: {err}")]
    Io { path: String, err: std::io::Error },
}

/// The lock file that belongs to `socket`.
pub fn lock_path(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// The held lock: dropping it (or exiting) releases it.
pub struct SocketLock {
    file: File,
}

impl SocketLock {
    /// Takes the lock for `socket`, or says which vmd holds it; then
    /// refuses a socket that something else still answers on.
    pub fn take(socket: &Path) -> Result<SocketLock, LockError> {
        let path = lock_path(socket);
        let name = path.display().to_string();
        let io = |err| LockError::Io {
            path: name.clone(),
            err,
        };
        // No symlink followed; the file must be root's own, not a link
        // someone made to a file whose contents we would overwrite, and
        // root's alone: flock needs no write access, so a user who could
        // open it could hold the lock and keep vmd from starting.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|err| match err.raw_os_error() {
                Some(libc::ELOOP) => LockError::BadLockFile {
                    path: name.clone(),
                    why: "is a symbolic link".into(),
                },
                _ => io(err),
            })?;
        let meta = file.metadata().map_err(io)?;
        let why = if !meta.file_type().is_file() {
            Some("is not a regular file")
        } else if meta.uid() != 0 {
            Some("is not owned by root")
        } else if meta.nlink() != 1 {
            Some("has other links")
        } else if meta.mode() & 0o077 != 0 {
            Some("is open to other users (mode 0600 expected)")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(LockError::BadLockFile {
                path: name,
                why: why.into(),
            });
        }
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(io(err));
            }
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            return Err(LockError::HeldBy {
                socket: socket.display().to_string(),
                pid: if pid.is_empty() { "unknown" } else { pid }.to_string(),
            });
        }
        // Held by no vmd, yet answering: not ours to replace.
        if UnixStream::connect(socket).is_ok() {
            return Err(LockError::Answering(socket.display().to_string()));
        }
        Ok(SocketLock { file })
    }

    /// Records the daemon's pid (after it detached) for the message a
    /// second vmd prints.
    pub fn record_pid(&mut self) -> std::io::Result<()> {
        self.file.set_len(0)?;
        self.file.seek(SeekFrom::Start(0))?;
        writeln!(self.file, "{}", std::process::id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_path_appends() {
        assert_eq!(
            lock_path(Path::new("/run/vmd.sock")),
            PathBuf::from("/run/vmd.sock.lock")
        );
    }

    #[test]
    fn second_taker_is_told_the_pid() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("SKIP second_taker_is_told_the_pid: the lock file must be root's");
            return;
        }
        let dir = std::env::temp_dir().join(format!("vmd-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("s.sock");
        let mut first = SocketLock::take(&socket).unwrap();
        first.record_pid().unwrap();
        let second = SocketLock::take(&socket).err().unwrap().to_string();
        let other = SocketLock::take(&dir.join("t.sock"));
        drop(first);
        let again = SocketLock::take(&socket);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            second,
            format!(
                "socket {} is in use by another vmd (pid {})",
                socket.display(),
                std::process::id()
            )
        );
        assert!(other.is_ok(), "another socket has its own lock");
        assert!(again.is_ok(), "released on drop");
    }
}
