//! The QMP conversation with QEMU.

use crate::log::log_warn;

/// The QMP conversation: negotiate, then `cont`, then events and the
/// answers to commands the VM process sends with an `id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QmpState {
    /// Waiting for QEMU's greeting.
    Greeting,
    /// `qmp_capabilities` sent.
    Capabilities,
    /// `cont` sent.
    Cont,
    /// The guest runs.
    Running,
}

/// What one line from QMP means to the VM process.
#[derive(Debug, PartialEq, Eq)]
pub enum QmpReply {
    /// Send this command next.
    Send(&'static str),
    /// The guest now runs.
    Running,
    /// The guest shut down (reason as QEMU names it); QEMU exits.
    Shutdown(String),
    /// A command failed.
    Error(String),
    /// QEMU broke the protocol (a line that is not JSON).
    Protocol(String),
    /// QEMU answered `query-blockstats` ([`BLOCKSTATS_ID`]): each
    /// disk's counters, in disk order.
    BlockStats(Vec<common::stats::DiskStats>),
    /// QEMU answered the command sent with this id (`error` None: done,
    /// with `value`, its `return`).
    Answer {
        id: String,
        error: Option<String>,
        value: serde_json::Value,
    },
    /// A MIGRATION event (with the `events` capability): its status.
    Migration(String),
    Nothing,
}

/// Advances the conversation by one JSON line from QEMU.
pub fn qmp_line(state: &mut QmpState, line: &str) -> QmpReply {
    let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
        let start: String = line.chars().take(80).collect();
        return QmpReply::Protocol(format!("a line that is not JSON ({start:?})"));
    };
    if let Some(event) = msg.get("event").and_then(|e| e.as_str()) {
        if event == "SHUTDOWN" {
            let reason = msg
                .pointer("/data/reason")
                .and_then(|r| r.as_str())
                .unwrap_or("unknown");
            return QmpReply::Shutdown(reason.to_string());
        }
        if event == "MIGRATION" {
            let status = msg.pointer("/data/status").and_then(|s| s.as_str());
            return QmpReply::Migration(status.unwrap_or("unknown").to_string());
        }
        return QmpReply::Nothing;
    }
    let error = msg.get("error").map(|error| {
        error
            .get("desc")
            .and_then(|d| d.as_str())
            .unwrap_or("unknown error")
            .to_string()
    });
    if let Some(id) = msg.get("id").and_then(|id| id.as_str()) {
        if id == BLOCKSTATS_ID {
            if let Some(e) = error {
                log_warn!("QMP query-blockstats: {e}");
            }
            return QmpReply::BlockStats(msg.get("return").map_or(Vec::new(), blockstats));
        }
        return QmpReply::Answer {
            id: id.to_string(),
            error,
            value: msg.get("return").cloned().unwrap_or_default(),
        };
    }
    if let Some(error) = error {
        return QmpReply::Error(error);
    }
    match *state {
        QmpState::Greeting if msg.get("QMP").is_some() => {
            *state = QmpState::Capabilities;
            QmpReply::Send("qmp_capabilities")
        }
        QmpState::Capabilities if msg.get("return").is_some() => {
            *state = QmpState::Cont;
            QmpReply::Send("cont")
        }
        QmpState::Cont if msg.get("return").is_some() => {
            *state = QmpState::Running;
            QmpReply::Running
        }
        _ => QmpReply::Nothing,
    }
}

/// The id `query-blockstats` is sent with.
pub const BLOCKSTATS_ID: &str = "query-blockstats";

/// The counters of disks `vd0`, `vd1`, ... (the virtio-blk devices
/// args.rs names) in a `query-blockstats` answer; the CD-ROM and
/// anything else are left out, and so is a disk without counters.
pub fn blockstats(answer: &serde_json::Value) -> Vec<common::stats::DiskStats> {
    let mut disks: Vec<(u32, common::stats::DiskStats)> = answer
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .filter_map(|entry| {
            let qdev = entry.get("qdev")?.as_str()?;
            let id = qdev
                .strip_prefix("/machine/peripheral/")?
                .split('/')
                .next()?;
            let index: u32 = id.strip_prefix("vd")?.parse().ok()?;
            let stats = entry.get("stats")?;
            let field = |name: &str| stats.get(name).and_then(|v| v.as_u64()).unwrap_or(0);
            Some((
                index,
                common::stats::DiskStats {
                    read_bytes: field("rd_bytes"),
                    written_bytes: field("wr_bytes"),
                    read_ops: field("rd_operations"),
                    write_ops: field("wr_operations"),
                },
            ))
        })
        .collect();
    disks.sort_by_key(|(index, _)| *index);
    disks.into_iter().map(|(_, stats)| stats).collect()
}

/// A QMP command as one line.
pub fn qmp_command(name: &str) -> String {
    format!("{{\"execute\": \"{name}\"}}\n")
}

/// A QMP command whose answer carries `id` (a plain word).
pub fn qmp_command_with_id(name: &str, id: &str) -> String {
    format!("{{\"execute\": \"{name}\", \"id\": \"{id}\"}}\n")
}

/// A QMP command with arguments (a JSON object) whose answer carries `id`.
pub fn qmp_command_with_args(name: &str, args: serde_json::Value, id: &str) -> String {
    let command = serde_json::json!({"execute": name, "arguments": args, "id": id});
    format!("{command}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::stats::DiskStats;

    #[test]
    fn blockstats_are_the_disks_in_order_without_the_cdrom() {
        let mut state = QmpState::Running;
        let line = r#"{"return": [
            {"device": "", "qdev": "/machine/peripheral/vd1/virtio-backend", "node-name": "disk1-0",
             "stats": {"rd_bytes": 10, "wr_bytes": 20, "rd_operations": 1, "wr_operations": 2}},
            {"device": "", "qdev": "/machine/peripheral/cd0", "stats": {"rd_bytes": 99}},
            {"device": "", "qdev": "/machine/peripheral/vd0/virtio-backend",
             "stats": {"rd_bytes": 4096, "wr_bytes": 0, "rd_operations": 8, "wr_operations": 0}}
        ], "id": "query-blockstats"}"#;
        let disks = vec![
            DiskStats {
                read_bytes: 4096,
                written_bytes: 0,
                read_ops: 8,
                write_ops: 0,
            },
            DiskStats {
                read_bytes: 10,
                written_bytes: 20,
                read_ops: 1,
                write_ops: 2,
            },
        ];
        assert_eq!(qmp_line(&mut state, line), QmpReply::BlockStats(disks));
        let refused =
            r#"{"error": {"class": "GenericError", "desc": "no"}, "id": "query-blockstats"}"#;
        assert_eq!(
            qmp_line(&mut state, refused),
            QmpReply::BlockStats(Vec::new())
        );
    }
}
