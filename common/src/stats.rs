//! `vmctl stats`: the figures vmd reports for each VM.
//!
//! The parent fills in what it knows itself (state, uptime, the CPU time
//! and resident memory of the guest's processes from /proc, the taps'
//! counters from /proc/net/dev) and asks the VM process for what only
//! its backend knows ([`BackendStats`]: disk counters from QMP
//! `query-blockstats`, or our monitor's own; the console log's size).

use crate::status::VmState;
use serde::{Deserialize, Serialize};

/// One disk's counters since the VM started, in the VM's disk order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskStats {
    pub read_bytes: u64,
    pub written_bytes: u64,
    pub read_ops: u64,
    pub write_ops: u64,
}

/// One interface's counters, as the guest sees them: `rx` what reached
/// the guest (its tap transmitted it), `tx` what the guest sent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicStats {
    /// The tap on the host.
    pub tap: String,
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_dropped: u64,
}

/// What the VM process's backend reports (vm -> parent).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStats {
    pub disks: Vec<DiskStats>,
    /// Bytes in the console log now (since its last rotation).
    pub console_log_size: u64,
}

/// One VM's figures (parent -> control -> vmctl). What a stopped VM has
/// not is None or empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStats {
    pub id: u32,
    pub name: String,
    pub state: VmState,
    /// Since vmd launched it (a restart after a reboot starts again).
    pub uptime_ms: Option<u64>,
    /// CPU time the guest's processes used (vCPUs and device emulation).
    pub cpu_time_ms: Option<u64>,
    /// Resident memory of the guest's processes.
    pub memory: Option<u64>,
    /// None when the VM process did not answer in time.
    pub backend: Option<BackendStats>,
    pub nics: Vec<NicStats>,
}

/// The counters of every interface in `/proc/net/dev` text: (name, rx
/// bytes, rx packets, rx drops, tx bytes, tx packets, tx drops) as the
/// host sees them.
pub fn parse_net_dev(text: &str) -> Vec<(String, [u64; 6])> {
    text.lines()
        .filter_map(|line| {
            let (name, rest) = line.split_once(':')?;
            let fields: Vec<u64> = rest
                .split_whitespace()
                .map(|f| f.parse().ok())
                .collect::<Option<Vec<u64>>>()?;
            if fields.len() < 16 {
                return None;
            }
            // rx: bytes packets errs drop fifo frame compressed multicast;
            // tx: bytes packets errs drop ...
            Some((
                name.trim().to_string(),
                [
                    fields[0], fields[1], fields[3], fields[8], fields[9], fields[11],
                ],
            ))
        })
        .collect()
}

/// A tap's host counters turned to the guest's view: what the tap
/// received the guest sent.
pub fn nic_from_tap(tap: &str, host: [u64; 6]) -> NicStats {
    let [rx_bytes, rx_packets, rx_dropped, tx_bytes, tx_packets, tx_dropped] = host;
    NicStats {
        tap: tap.to_string(),
        rx_bytes: tx_bytes,
        rx_packets: tx_packets,
        rx_dropped: tx_dropped,
        tx_bytes: rx_bytes,
        tx_packets: rx_packets,
        tx_dropped: rx_dropped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_dev_counters_turn_to_the_guests_view() {
        let text = "Inter-|   Receive                                                |  Transmit\n \
             face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
             lo:     100       2    0    0    0     0          0         0      100       2    0    0    0     0       0          0\n\
             vm1-if0:  4000  30    1    5    0     0          0         0     9000      60    0    7    0     0       0          0\n";
        let all = parse_net_dev(text);
        assert_eq!(all.len(), 2);
        let (name, host) = &all[1];
        assert_eq!(name, "vm1-if0");
        let nic = nic_from_tap(name, *host);
        assert_eq!(
            nic,
            NicStats {
                tap: "vm1-if0".into(),
                rx_bytes: 9000,
                rx_packets: 60,
                rx_dropped: 7,
                tx_bytes: 4000,
                tx_packets: 30,
                tx_dropped: 5,
            }
        );
    }
}
