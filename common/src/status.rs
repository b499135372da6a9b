//! The VM list that `vmctl status` prints, in OpenBSD's columns.

use crate::size;
use nix::unistd::{Gid, Group, Uid, User};
use serde::{Deserialize, Serialize};
use std::fmt::Write;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Stopped,
    Running,
    Stopping,
    Waiting,
    Paused,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Stopped => "stopped",
            VmState::Running => "running",
            VmState::Stopping => "stopping",
            VmState::Waiting => "waiting",
            VmState::Paused => "paused",
        }
    }

    /// Whether the VM has a process (and so a PID, memory use and tty).
    pub fn is_active(self) -> bool {
        matches!(self, VmState::Running | VmState::Stopping | VmState::Paused)
    }
}

/// One row of `vmctl status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub id: u32,
    pub name: String,
    pub state: VmState,
    /// The VM process, while the VM runs.
    pub pid: Option<u32>,
    pub vcpus: u32,
    pub max_memory: u64,
    /// Resident memory of the guest, while the VM runs.
    pub cur_memory: Option<u64>,
    /// The pty's path, e.g. `/dev/pts/3`, while the VM runs.
    pub tty: Option<String>,
    pub owner_uid: u32,
    pub owner_gid: Option<u32>,
}

pub const HEADER_FORMAT: [&str; 9] = [
    "ID", "PID", "VCPUS", "MAXMEM", "CURMEM", "TTY", "OWNER", "STATE", "NAME",
];

fn row(out: &mut String, cols: [&str; 9]) {
    let [id, pid, vcpus, max, cur, tty, owner, state, name] = cols;
    let _ = writeln!(
        out,
        "{id:>5} {pid:>5} {vcpus:>5} {max:>7} {cur:>7} {tty:>7} {owner:>12} {state:>8} {name}"
    );
}

/// `user[:group]`, by name where the host knows the ids.
pub fn owner_name(uid: u32, gid: Option<u32>) -> String {
    let user = match User::from_uid(Uid::from_raw(uid)) {
        Ok(Some(u)) => u.name,
        _ => uid.to_string(),
    };
    match gid {
        None => user,
        Some(gid) => match Group::from_gid(Gid::from_raw(gid)) {
            Ok(Some(g)) => format!("{user}:{}", g.name),
            _ => format!("{user}:{gid}"),
        },
    }
}

/// The OWNER column: `user[:group]` cut to 15 bytes, as OpenBSD's
/// 16-byte buffer cuts it.
fn owner_column(uid: u32, gid: Option<u32>) -> String {
    let mut owner = owner_name(uid, gid);
    let mut end = owner.len().min(OWNER_MAX);
    while !owner.is_char_boundary(end) {
        end -= 1;
    }
    owner.truncate(end);
    owner
}

const OWNER_MAX: usize = 15;

/// The TTY column: the pty's name below /dev (`pts/3`), a deliberate
/// difference from OpenBSD's bare name.
fn tty_column(tty: &str) -> &str {
    tty.strip_prefix("/dev/").unwrap_or(tty)
}

/// The whole table, header first.
pub fn format_table(vms: &[VmInfo]) -> String {
    let mut out = String::new();
    row(&mut out, HEADER_FORMAT);
    for vm in vms {
        let id = vm.id.to_string();
        let vcpus = vm.vcpus.to_string();
        let max = size::format(vm.max_memory);
        let owner = owner_column(vm.owner_uid, vm.owner_gid);
        let active = vm.state.is_active();
        let pid = vm
            .pid
            .filter(|_| active)
            .map_or("-".to_string(), |p| p.to_string());
        let cur = vm
            .cur_memory
            .filter(|_| active)
            .map_or("-".to_string(), size::format);
        let tty = vm.tty.as_deref().filter(|_| active).map_or("-", tty_column);
        row(
            &mut out,
            [
                &id,
                &pid,
                &vcpus,
                &max,
                &cur,
                tty,
                &owner,
                vm.state.as_str(),
                &vm.name,
            ],
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_matches_openbsd_columns() {
        let vms = [
            VmInfo {
                id: 1,
                name: "web".into(),
                state: VmState::Running,
                pid: Some(4242),
                vcpus: 1,
                max_memory: 512 << 20,
                cur_memory: Some(100 << 20),
                tty: Some("/dev/pts/3".into()),
                owner_uid: 0,
                owner_gid: None,
            },
            VmInfo {
                id: 12,
                name: "long".into(),
                state: VmState::Paused,
                pid: Some(77),
                vcpus: 1,
                max_memory: 3 << 29,
                cur_memory: Some(1 << 20),
                tty: Some("/dev/pts/12".into()),
                owner_uid: 4_000_000_000,
                owner_gid: Some(4_000_000_001),
            },
            VmInfo {
                id: 2,
                name: "db".into(),
                state: VmState::Stopped,
                pid: None,
                vcpus: 2,
                max_memory: 1 << 30,
                cur_memory: None,
                tty: None,
                owner_uid: 0,
                owner_gid: Some(0),
            },
        ];
        assert_eq!(
            format_table(&vms),
            "   ID   PID VCPUS  MAXMEM  CURMEM     TTY        OWNER    STATE NAME\n\
             \x20   1  4242     1    512M    100M   pts/3         root  running web\n\
             \x20  12    77     1    1.5G    1.0M  pts/12 4000000000:4000   paused long\n\
             \x20   2     -     2    1.0G       -       -    root:root  stopped db\n"
        );
    }
}
