//! `vmctl -j`: what status, stats and events print for programs, one
//! JSON object per line (per VM, per event). The field names are the
//! contract vmctl.8 documents: add fields, never rename one. Sizes are
//! bytes, times seconds (with milliseconds), states and events words.

use common::event::{Event, EventKind};
use common::stats::VmStats;
use common::status::{owner_name, VmInfo};
use serde_json::{json, Value};

/// Milliseconds as seconds.
fn seconds(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

/// One row of `status`.
pub fn status(vm: &VmInfo) -> Value {
    let active = vm.state.is_active();
    json!({
        "id": vm.id,
        "name": vm.name,
        "state": vm.state.as_str(),
        "pid": vm.pid.filter(|_| active),
        "vcpus": vm.vcpus,
        "max_memory": vm.max_memory,
        "memory": vm.cur_memory.filter(|_| active),
        "tty": vm.tty.as_deref().filter(|_| active),
        "owner": owner_name(vm.owner_uid, vm.owner_gid),
        "uid": vm.owner_uid,
        "gid": vm.owner_gid,
    })
}

/// One VM of `stats`; `cpu_use`: percent of one CPU over the last
/// interval (see [`crate::stats`]).
pub fn stats(vm: &VmStats, cpu_use: Option<f64>) -> Value {
    let backend = vm.backend.as_ref();
    let disks: Vec<Value> = backend
        .map(|b| b.disks.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|d| {
            json!({
                "read_bytes": d.read_bytes,
                "written_bytes": d.written_bytes,
                "read_ops": d.read_ops,
                "write_ops": d.write_ops,
            })
        })
        .collect();
    let interfaces: Vec<Value> = vm
        .nics
        .iter()
        .map(|n| {
            json!({
                "tap": n.tap,
                "rx_bytes": n.rx_bytes,
                "rx_packets": n.rx_packets,
                "rx_dropped": n.rx_dropped,
                "tx_bytes": n.tx_bytes,
                "tx_packets": n.tx_packets,
                "tx_dropped": n.tx_dropped,
            })
        })
        .collect();
    json!({
        "id": vm.id,
        "name": vm.name,
        "state": vm.state.as_str(),
        "uptime": vm.uptime_ms.map(seconds),
        "cpu_time": vm.cpu_time_ms.map(seconds),
        "cpu_use": cpu_use.map(|p| (p * 10.0).round() / 10.0),
        "memory": vm.memory,
        "disks": disks,
        "interfaces": interfaces,
        "console_log_size": backend.map(|b| b.console_log_size),
    })
}

/// One event: `time`, `id`, `name`, `event`, and what the kind adds
/// (`reason` of `stopped`, `forced` of `stopping`, `path` of `loaded`
/// and `reloaded`).
pub fn event(event: &Event) -> Value {
    let mut object = json!({
        "time": seconds(event.time_ms),
        "id": event.vmid,
        "name": event.name,
        "event": event.kind.as_str(),
    });
    match &event.kind {
        EventKind::Stopping { forced } => object["forced"] = json!(forced),
        EventKind::Stopped { why } => object["reason"] = json!(why.as_str()),
        EventKind::ConfigLoaded { path } | EventKind::ConfigReloaded { path } => {
            object["path"] = json!(path)
        }
        _ => {}
    }
    object
}

/// The notice that `count` events were dropped (vmctl read too slowly).
pub fn dropped(time_ms: u64, count: u64) -> Value {
    json!({
        "time": seconds(time_ms),
        "id": 0,
        "name": "",
        "event": "dropped",
        "count": count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::event::EndReason;
    use common::stats::{BackendStats, DiskStats, NicStats};
    use common::status::VmState;

    #[test]
    fn status_fields() {
        let vm = VmInfo {
            id: 3,
            name: "web".into(),
            state: VmState::Running,
            pid: Some(4242),
            vcpus: 2,
            max_memory: 512 << 20,
            cur_memory: Some(100 << 20),
            tty: Some("/dev/pts/3".into()),
            owner_uid: 0,
            owner_gid: None,
        };
        assert_eq!(
            status(&vm).to_string(),
            r#"{"gid":null,"id":3,"max_memory":536870912,"memory":104857600,"name":"web","owner":"root","pid":4242,"state":"running","tty":"/dev/pts/3","uid":0,"vcpus":2}"#
        );
        let stopped = VmInfo {
            state: VmState::Stopped,
            ..vm
        };
        let row = status(&stopped);
        assert_eq!(row["state"], "stopped");
        assert!(row["pid"].is_null() && row["memory"].is_null() && row["tty"].is_null());
    }

    #[test]
    fn stats_fields() {
        let vm = VmStats {
            id: 1,
            name: "a".into(),
            state: VmState::Running,
            uptime_ms: Some(61_500),
            cpu_time_ms: Some(2_250),
            memory: Some(1 << 20),
            backend: Some(BackendStats {
                disks: vec![DiskStats {
                    read_bytes: 4096,
                    written_bytes: 512,
                    read_ops: 2,
                    write_ops: 1,
                }],
                console_log_size: 77,
            }),
            nics: vec![NicStats {
                tap: "tap0".into(),
                rx_bytes: 10,
                rx_packets: 1,
                rx_dropped: 0,
                tx_bytes: 20,
                tx_packets: 2,
                tx_dropped: 3,
            }],
        };
        assert_eq!(
            stats(&vm, Some(12.345)).to_string(),
            concat!(
                r#"{"console_log_size":77,"cpu_time":2.25,"cpu_use":12.3,"#,
                r#""disks":[{"read_bytes":4096,"read_ops":2,"write_ops":1,"written_bytes":512}],"#,
                r#""id":1,"interfaces":[{"rx_bytes":10,"rx_dropped":0,"rx_packets":1,"tap":"tap0","#,
                r#""tx_bytes":20,"tx_dropped":3,"tx_packets":2}],"memory":1048576,"name":"a","#,
                r#""state":"running","uptime":61.5}"#
            )
        );
        let stopped = VmStats {
            id: 2,
            name: "b".into(),
            state: VmState::Stopped,
            uptime_ms: None,
            cpu_time_ms: None,
            memory: None,
            backend: None,
            nics: Vec::new(),
        };
        let row = stats(&stopped, None);
        assert!(row["uptime"].is_null() && row["console_log_size"].is_null());
        assert_eq!(row["disks"], json!([]));
    }

    #[test]
    fn event_fields() {
        let stopped = Event {
            time_ms: 1_700_000_000_250,
            vmid: 3,
            name: "web".into(),
            kind: EventKind::Stopped {
                why: EndReason::Killed,
            },
        };
        assert_eq!(
            event(&stopped).to_string(),
            r#"{"event":"stopped","id":3,"name":"web","reason":"killed","time":1700000000.25}"#
        );
        let stopping = Event {
            kind: EventKind::Stopping { forced: false },
            ..stopped.clone()
        };
        assert_eq!(event(&stopping)["forced"], false);
        assert_eq!(
            dropped(1000, 44).to_string(),
            r#"{"count":44,"event":"dropped","id":0,"name":"","time":1.0}"#
        );
    }
}
