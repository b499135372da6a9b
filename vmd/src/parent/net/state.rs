//! The state file: what this daemon made on the host (taps, bridges;
//! later nftables chains), so that a vmd started after a crash removes
//! what its predecessor left, and nothing else. One file per daemon,
//! named after its control socket (several daemons run side by side,
//! each with its own `-s`): `/run/vmd/<socket path, escaped>.state`.
//!
//! The file is rewritten whole after each change, through a temporary
//! file and a rename, so a reader sees the old or the new list. It lives
//! on /run, a tmpfs: a write of a few hundred bytes there is a memory
//! copy that never waits for a disk, so the parent writes it itself
//! rather than through a helper (and what it lists, taps and bridges, is
//! gone after a reboot as the file is, so nothing is fsynced).
//!
//! Its text, one entry per line (`#` comments; unknown lines are
//! skipped, so a newer vmd's file still reads):
//!
//! ```text
//! # vmd state for socket /var/run/vmd.sock
//! pid 1234
//! tap tap0 7
//! bridge br0 9
//! ```

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Where the state files live.
pub const STATE_DIR: &str = "/run/vmd";

/// What one daemon made: (name, ifindex) of each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    pub socket: String,
    pub pid: u32,
    pub taps: Vec<(String, u32)>,
    pub bridges: Vec<(String, u32)>,
    /// The VRF devices (rdomains) this daemon created.
    pub vrfs: Vec<(String, u32)>,
    /// Its nftables table (locked lladdr, nft.rs) may exist.
    pub nft: bool,
}

/// The state file of the daemon whose control socket is `socket` (an
/// absolute path): its path with `/` as `-` and any byte but letters,
/// digits, `.` and `_` as `%XX`, so two sockets never share a file; a
/// name too long for a file name is a hash of the path instead.
pub fn state_path(dir: &Path, socket: &Path) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    let bytes = socket.as_os_str().as_bytes();
    let bytes = bytes.strip_prefix(b"/").unwrap_or(bytes);
    let mut name = String::new();
    for &b in bytes {
        match b {
            b'/' => name.push('-'),
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'_' => name.push(b as char),
            _ => name.push_str(&format!("%{b:02X}")),
        }
    }
    if name.len() > 200 || name.is_empty() || name.starts_with('.') {
        // FNV-1a: stable across versions and runs.
        let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        name = format!("socket-{hash:016x}");
    }
    dir.join(format!("{name}.state"))
}

impl State {
    pub fn render(&self) -> String {
        let mut text = format!(
            "# vmd state for socket {}: what this daemon made\npid {}\n",
            self.socket.replace('\n', "?"),
            self.pid
        );
        for (name, index) in &self.taps {
            text.push_str(&format!("tap {name} {index}\n"));
        }
        for (name, index) in &self.bridges {
            text.push_str(&format!("bridge {name} {index}\n"));
        }
        for (name, index) in &self.vrfs {
            text.push_str(&format!("vrf {name} {index}\n"));
        }
        if self.nft {
            text.push_str("nft\n");
        }
        text
    }

    /// Reads a state file's text; lines it does not know are skipped.
    pub fn parse(text: &str) -> State {
        let mut state = State::default();
        for line in text.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            let entry = |words: &[&str]| -> Option<(String, u32)> {
                let name = words.get(1)?;
                let valid = !name.is_empty()
                    && name.len() < libc::IFNAMSIZ
                    && !name.contains('/')
                    && words.len() == 3;
                valid.then_some(((*name).to_string(), words.get(2)?.parse().ok()?))
            };
            match words.first().copied() {
                Some("pid") => state.pid = words.get(1).and_then(|p| p.parse().ok()).unwrap_or(0),
                Some("tap") => state.taps.extend(entry(&words)),
                Some("bridge") => state.bridges.extend(entry(&words)),
                Some("vrf") => state.vrfs.extend(entry(&words)),
                Some("nft") => state.nft = true,
                _ => {}
            }
        }
        state
    }

    pub fn is_empty(&self) -> bool {
        self.taps.is_empty() && self.bridges.is_empty() && self.vrfs.is_empty() && !self.nft
    }
}

/// The state file at `path`, if there is one (Ok(None): none).
pub fn state_load(path: &Path) -> std::io::Result<Option<State>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(State::parse(&text))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes `state` to `path` whole: a temporary file beside it, renamed
/// over it. The directory is made (root's, 0700) if missing.
pub fn state_save(path: &Path, state: &State) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    let tmp = PathBuf::from(tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    file.write_all(state.render().as_bytes())?;
    drop(file);
    std::fs::rename(&tmp, path)
}

/// Removes the state file (the daemon ends with nothing left).
pub fn state_remove(path: &Path) {
    let _ = std::fs::remove_file(path);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_paths_are_one_per_socket() {
        let dir = Path::new(STATE_DIR);
        assert_eq!(
            state_path(dir, Path::new("/var/run/vmd.sock")),
            Path::new("/run/vmd/var-run-vmd.sock.state")
        );
        // A dash in the path is not a slash.
        assert_ne!(
            state_path(dir, Path::new("/tmp/a-b/s")),
            state_path(dir, Path::new("/tmp/a/b/s"))
        );
        assert_eq!(
            state_path(dir, Path::new("/tmp/a-b/s")),
            Path::new("/run/vmd/tmp-a%2Db-s.state")
        );
        let long = format!("/tmp/{}", "x".repeat(300));
        let hashed = state_path(dir, Path::new(&long));
        assert!(hashed.to_string_lossy().starts_with("/run/vmd/socket-"));
        assert_eq!(hashed, state_path(dir, Path::new(&long)));
    }

    #[test]
    fn state_text_round_trips_and_skips_garbage() {
        let state = State {
            socket: "/var/run/vmd.sock".into(),
            pid: 42,
            taps: vec![("tap0".into(), 7), ("tap1".into(), 8)],
            bridges: vec![("br0".into(), 9)],
            vrfs: vec![("rdomain5".into(), 11)],
            nft: true,
        };
        let text = state.render();
        assert!(text.contains("\ntap tap0 7\n"));
        assert!(text.contains("\nbridge br0 9\n"));
        let back = State::parse(&text);
        assert_eq!(back.taps, state.taps);
        assert_eq!(back.bridges, state.bridges);
        assert_eq!((back.vrfs, back.nft), (state.vrfs, true));
        assert_eq!(back.pid, 42);
        let odd = State::parse("bridge\nbridge x\nbridge ../x 3\nbridge br1 nine\nchain x\nbridge br2 4 5\nbridge br3 5\n");
        assert_eq!(odd.bridges, vec![("br3".to_string(), 5)]);
    }

    #[test]
    fn state_is_saved_atomically() {
        let dir = std::env::temp_dir().join(format!("vmd-state-{}", std::process::id()));
        let path = state_path(&dir, Path::new("/tmp/s"));
        assert_eq!(state_load(&path).expect("load"), None);
        let state = State {
            socket: "/tmp/s".into(),
            pid: 1,
            taps: vec![("tap3".into(), 3)],
            ..State::default()
        };
        state_save(&path, &state).expect("save");
        assert_eq!(
            state_load(&path).expect("load").expect("some").taps,
            state.taps
        );
        assert!(!dir.join("tmp-s.state.new").exists());
        state_remove(&path);
        assert_eq!(state_load(&path).expect("load"), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
