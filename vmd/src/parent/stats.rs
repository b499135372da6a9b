//! `vmctl stats` (parent): the figures of the VMs a request names, as
//! `status` shows them to whoever asks. What the parent knows it fills
//! in at once (state, uptime, resident memory, CPU time, taps); the
//! backend's counters (disks, console log) come from each running VM's
//! process ([`Backend::query_stats`](crate::parent::backend::Backend)),
//! and the answer goes out once every VM process has answered or
//! [`STATS_TIMEOUT`] has passed (a VM that did not answer then has no
//! backend figures). Nothing waits: a pending request is a state of the
//! loop.

use crate::parent::registry::Registry;
use common::ctl::VmTarget;
use common::imsg::{Frame, Message};
use common::stats::{BackendStats, VmStats};
use mio::Token;
use std::time::{Duration, Instant};

/// How long a `stats` request waits for the VM processes: as long as a
/// pause may take (vmctl waits longer, which vmd asserts).
pub const STATS_TIMEOUT: Duration = common::imsg::LONGEST_COMMAND_REPLY;

/// A `stats` request waiting for VM processes' answers.
pub struct PendingStats {
    pub token: Token,
    pub peer: u32,
    stats: Vec<VmStats>,
    /// VMs asked and not yet answered.
    waiting: Vec<u32>,
    pub deadline: Instant,
}

impl PendingStats {
    /// The figures of the VMs `target` names (None: all), and the VM
    /// processes asked for the rest.
    pub fn begin(
        registry: &mut Registry,
        target: Option<&VmTarget>,
        token: Token,
        peer: u32,
    ) -> PendingStats {
        let now = Instant::now();
        let mut stats: Vec<VmStats> = registry
            .vms(target)
            .map(|vm| VmStats {
                id: vm.vmid,
                name: vm.config.name.clone(),
                state: vm.state,
                uptime_ms: vm
                    .started_at
                    .filter(|_| vm.state.is_active())
                    .map(|t| now.duration_since(t).as_millis() as u64),
                cpu_time_ms: None,
                memory: None,
                backend: None,
                nics: Vec::new(),
            })
            .collect();
        let mut waiting = Vec::new();
        if let Some(backend) = registry.backend() {
            for vm in stats.iter_mut().filter(|vm| vm.state.is_active()) {
                vm.memory = backend.info(vm.id).and_then(|run| run.cur_memory);
                if let Some(usage) = backend.usage(vm.id) {
                    vm.cpu_time_ms = usage.cpu_time_ms;
                    vm.nics = usage.nics;
                }
                if backend.query_stats(vm.id) {
                    waiting.push(vm.id);
                }
            }
        }
        PendingStats {
            token,
            peer,
            stats,
            waiting,
            deadline: now + STATS_TIMEOUT,
        }
    }

    /// Whether this request waits for VM `id`'s process.
    pub fn waits_for(&self, id: u32) -> bool {
        self.waiting.contains(&id)
    }

    /// VM `id`'s process answered (the oldest request waiting for it
    /// takes the answer: a VM process answers in order).
    pub fn answered(&mut self, id: u32, backend: &BackendStats) {
        let Some(at) = self.waiting.iter().position(|&w| w == id) else {
            return;
        };
        self.waiting.remove(at);
        if let Some(vm) = self.stats.iter_mut().find(|vm| vm.id == id) {
            vm.backend = Some(backend.clone());
        }
    }

    /// VM `id`'s process ended before it answered: its figures go out
    /// without the backend's.
    pub fn forget(&mut self, id: u32) {
        self.waiting.retain(|&w| w != id);
    }

    /// Every VM process asked has answered (or ended).
    pub fn is_complete(&self) -> bool {
        self.waiting.is_empty()
    }

    /// The answer: one `CtlStats` per VM, then `CtlVmEnd`.
    pub fn frames(self) -> Vec<Frame> {
        let peer = self.peer;
        self.stats
            .into_iter()
            .map(|vm| Message::CtlStats(Box::new(vm)))
            .chain(std::iter::once(Message::CtlVmEnd))
            .map(|message| Frame {
                peer_id: peer,
                ..Frame::new(message)
            })
            .collect()
    }
}
