//! One uid per VM across every vmd on the host: a VM's uid is held by an
//! exclusive lock on `/run/vmd/uids/<uid>` for as long as anything may
//! run as it (the VM process, QEMU, and guest processes still exiting
//! after it ended). Another daemon with the same `uid range` skips a uid
//! whose lock it cannot take; a daemon that dies drops its locks with its
//! descriptors. Everything else a daemon keeps is its own, keyed by its
//! socket.
//!
//! The parent takes and drops these locks itself: /run is a tmpfs, and
//! `flock(LOCK_NB)` never waits.

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Where the locks live (root's alone: 0700).
pub const UID_LOCK_DIR: &str = "/run/vmd/uids";

/// The uids this daemon holds, each with its lock.
pub struct UidLocks {
    dir: PathBuf,
    held: BTreeMap<u32, Flock<File>>,
}

impl UidLocks {
    pub fn new(dir: &Path) -> UidLocks {
        UidLocks {
            dir: dir.to_path_buf(),
            held: BTreeMap::new(),
        }
    }

    /// Takes `uid` for a VM of ours: Ok(false) when another daemon holds
    /// it; Err when the lock cannot be made at all.
    pub fn take(&mut self, uid: u32) -> Result<bool, String> {
        if self.held.contains_key(&uid) {
            return Ok(true);
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| format!("cannot make {}: {e}", self.dir.display()))?;
        let path = self.dir.join(uid.to_string());
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => {
                self.held.insert(uid, lock);
                Ok(true)
            }
            Err((_, Errno::EWOULDBLOCK)) => Ok(false),
            Err((_, e)) => Err(format!("cannot lock {}: {e}", path.display())),
        }
    }

    /// Keeps the locks of `in_use` only: the others' uids are free again.
    /// The lock files stay (another daemon may be about to lock one).
    pub fn keep_only(&mut self, in_use: &[u32]) {
        self.held.retain(|uid, _| in_use.contains(uid));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uid_is_one_daemons_until_it_lets_go() {
        let dir = std::env::temp_dir().join(format!("vmd-uidlock-{}", std::process::id()));
        let mut a = UidLocks::new(&dir);
        let mut b = UidLocks::new(&dir);
        assert_eq!(a.take(7000), Ok(true));
        assert_eq!(a.take(7000), Ok(true), "a uid it holds is its own");
        // flock locks belong to open file descriptions: b's open is
        // another, as another daemon's would be.
        assert_eq!(b.take(7000), Ok(false));
        assert_eq!(b.take(7001), Ok(true));
        a.keep_only(&[]);
        assert_eq!(b.take(7000), Ok(true));
        assert_eq!(a.take(7000), Ok(false));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
