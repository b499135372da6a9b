//! `vmctl events`: the lifecycle events of VMs as vmd reports them, and
//! the bounded queue the control process keeps for each listener.
//!
//! The parent makes an [`Event`] where a VM's state changes (registry)
//! and sends it to control (`Message::CtlEvent`, peer id 0); control
//! hands it to every listener whose target matches. A listener that does
//! not read keeps at most [`LISTENER_QUEUE`] events queued in control
//! (besides what its socket holds); the excess is dropped and counted,
//! and the count reaches it in order, where the gap is
//! ([`Queued::Dropped`], `Message::CtlEventsDropped`).

use crate::ctl::VmTarget;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Events control keeps for one listener beyond what its socket holds.
pub const LISTENER_QUEUE: usize = 128;

/// Why a VM ended, in words vmctl prints (`stopped powered-off`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EndReason {
    /// The guest shut itself down (or obeyed its power button).
    PoweredOff,
    /// vmd ended it: `stop -f`, or a graceful stop that ran out of time.
    Forced,
    /// The guest or its emulator failed (a guest panic, QEMU exiting with
    /// an error).
    Crashed,
    /// Its processes were killed from outside vmd (a signal).
    Killed,
    /// It never ran: its start failed.
    Failed,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::PoweredOff => "powered-off",
            EndReason::Forced => "forced",
            EndReason::Crashed => "crashed",
            EndReason::Killed => "killed",
            EndReason::Failed => "failed",
        }
    }
}

/// What happened to a VM. The word of each ([`EventKind::as_str`]) is
/// the contract vmctl.8 documents; add kinds, never rename one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// vmd launched it (its files are opened next; `running` follows).
    Started,
    /// Its guest runs (after a start or a restart).
    Running,
    Paused,
    Unpaused,
    /// The guest reset itself and vmd started it again.
    Restarted,
    /// A stop was asked for; `forced`: `stop -f` or a shutdown timeout.
    Stopping {
        forced: bool,
    },
    /// It has ended, and why.
    Stopped {
        why: EndReason,
    },
    /// `vmctl send` wrote its state out (emitted by the send feature).
    Sent,
    /// `vmctl receive` started it from a stream (emitted by the receive
    /// feature).
    Received,
    /// `vmctl load`: vmd read a configuration file (no VM: id 0).
    ConfigLoaded {
        path: String,
    },
    /// `vmctl reload` or SIGHUP: vmd read its configuration again.
    ConfigReloaded {
        path: String,
    },
}

impl EventKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            EventKind::Started => "started",
            EventKind::Running => "running",
            EventKind::Paused => "paused",
            EventKind::Unpaused => "unpaused",
            EventKind::Restarted => "restarted",
            EventKind::Stopping { .. } => "stopping",
            EventKind::Stopped { .. } => "stopped",
            EventKind::Sent => "sent",
            EventKind::Received => "received",
            EventKind::ConfigLoaded { .. } => "loaded",
            EventKind::ConfigReloaded { .. } => "reloaded",
        }
    }

    /// What the event says besides its word (`forced`, the reason, the
    /// file), if anything.
    pub fn detail(&self) -> Option<String> {
        match self {
            EventKind::Stopping { forced: true } => Some("forced".into()),
            EventKind::Stopped { why } => Some(why.as_str().into()),
            EventKind::ConfigLoaded { path } | EventKind::ConfigReloaded { path } => {
                Some(path.clone())
            }
            _ => None,
        }
    }
}

/// One event: when (seconds since the epoch, UTC), which VM (id 0 and
/// no name for the configuration's events), and what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Milliseconds since the epoch.
    pub time_ms: u64,
    pub vmid: u32,
    pub name: String,
    pub kind: EventKind,
}

impl Event {
    /// An event of VM `vmid` (`name`) now.
    pub fn now(vmid: u32, name: &str, kind: EventKind) -> Event {
        let time_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Event {
            time_ms,
            vmid,
            name: name.to_string(),
            kind,
        }
    }

    /// Whether a listener for `target` (None: every event) gets it: the
    /// configuration's events go to every listener.
    pub fn matches(&self, target: Option<&VmTarget>) -> bool {
        self.vmid == 0 || target.is_none_or(|t| t.matches(self.vmid, &self.name))
    }
}

/// An entry of a listener's queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Queued {
    Event(Event),
    /// This many events were dropped here.
    Dropped(u64),
}

/// The events waiting for one listener, at most `bound` of them; what
/// comes while it is full is counted where it was dropped.
#[derive(Debug)]
pub struct ListenerQueue {
    items: VecDeque<Queued>,
    events: usize,
    bound: usize,
}

impl ListenerQueue {
    pub fn new(bound: usize) -> ListenerQueue {
        ListenerQueue {
            items: VecDeque::new(),
            events: 0,
            bound,
        }
    }

    /// Queues `event`, or counts it dropped if `bound` events wait.
    /// Returns false when it was dropped.
    pub fn push(&mut self, event: Event) -> bool {
        if self.events < self.bound {
            self.events += 1;
            self.items.push_back(Queued::Event(event));
            return true;
        }
        match self.items.back_mut() {
            Some(Queued::Dropped(n)) => *n += 1,
            _ => self.items.push_back(Queued::Dropped(1)),
        }
        false
    }

    pub fn pop(&mut self) -> Option<Queued> {
        let item = self.items.pop_front()?;
        if matches!(item, Queued::Event(_)) {
            self.events -= 1;
        }
        Some(item)
    }

    /// Puts back what could not be sent after all.
    pub fn unpop(&mut self, item: Queued) {
        if matches!(item, Queued::Event(_)) {
            self.events += 1;
        }
        self.items.push_front(item);
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(vmid: u32) -> Event {
        Event {
            time_ms: 1,
            vmid,
            name: format!("vm{vmid}"),
            kind: EventKind::Paused,
        }
    }

    #[test]
    fn a_full_queue_counts_what_it_drops_where_the_gap_is() {
        let mut q = ListenerQueue::new(3);
        for id in 1..=5 {
            assert_eq!(q.push(ev(id)), id <= 3);
        }
        assert_eq!(q.pop(), Some(Queued::Event(ev(1))));
        // Room again: a new event goes after the gap's count.
        assert!(q.push(ev(6)));
        assert!(!q.push(ev(7)));
        let rest: Vec<Queued> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(
            rest,
            vec![
                Queued::Event(ev(2)),
                Queued::Event(ev(3)),
                Queued::Dropped(2),
                Queued::Event(ev(6)),
                Queued::Dropped(1),
            ]
        );
        assert!(q.is_empty());
        q.push(ev(8));
        let item = q.pop().expect("queued");
        q.unpop(item);
        assert_eq!(q.pop(), Some(Queued::Event(ev(8))));
    }

    #[test]
    fn listeners_get_their_vm_and_the_configuration() {
        let web = VmTarget::Name("vm3".into());
        assert!(ev(3).matches(Some(&web)));
        assert!(!ev(4).matches(Some(&web)));
        assert!(ev(4).matches(Some(&VmTarget::Id(4))));
        assert!(ev(4).matches(None));
        let load = Event::now(
            0,
            "",
            EventKind::ConfigLoaded {
                path: "/etc/vm.conf".into(),
            },
        );
        assert!(load.matches(Some(&web)));
        assert_eq!(load.kind.as_str(), "loaded");
        assert_eq!(load.kind.detail().as_deref(), Some("/etc/vm.conf"));
        let end = EventKind::Stopped {
            why: EndReason::PoweredOff,
        };
        assert_eq!(
            (end.as_str(), end.detail()),
            ("stopped", Some("powered-off".into()))
        );
    }
}
