//! Guest networking, the parent's side: each VM's taps (tap.rs), the
//! switches' bridges, links configured over netlink (netlink.rs), and
//! the state file that lets a vmd started after a crash remove what its
//! predecessor made (state.rs).
//!
//! Nothing here waits. Every netlink step is a pending state: [`Net`]
//! keeps a queue of jobs (a switch to apply, a bridge to remove, a VM's
//! interfaces to configure) and runs them one request at a time; the
//! parent's loop hands it the socket's events ([`Net::handle_event`]).
//! The kernel answers a request as it is sent, so a queue costs nothing
//! and keeps the order: a bridge is there before a tap joins it.
//!
//! - A VM's taps are made at once when it starts ([`Net::vm_start`]) and
//!   held here for its whole life, across guest reboots (the restart
//!   finds them); the start goes on when [`Net::vm_status`] says they
//!   are configured (ifalias `vm<ID>-if<N>-<NAME>`, up unless `down`,
//!   the switch's bridge as master, a local interface's host address),
//!   and fails with the reason if a step failed. [`Net::vm_release`]
//!   closes them: a tap vanishes with its last descriptor, and with it
//!   everything set on it.
//! - Switches ([`Net::set_switches`]): a missing bridge is created and
//!   recorded; an existing one is used as it is. A bridge vmd created
//!   is deleted when its switch goes (reload, shutdown) only if it holds
//!   no port and no address that vmd did not add (IPv6 link-local
//!   addresses, which the kernel adds itself, do not count), and after
//!   a reload only once no running VM's tap is on it; an interface that
//!   existed before vmd is never deleted.

pub mod links;
pub mod netlink;
pub mod nft;
pub mod state;
pub mod tap;
#[cfg(test)]
pub(crate) mod testns;
pub mod vhost;

use crate::log::{log_debug, log_info, log_warn};
use common::config::{Globals, Interface, Ipv6Prefix, SwitchConfig, VmConfig};
use common::local::{
    local_addr4, local_addr6, LocalAddrError, Side, LOCAL_PREFIX6_LEN, LOCAL_PREFIX_LEN,
};
use links::{links_error, rdomain_table, rdomain_vrf_name, LinkRequest};
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use netlink::{Netlink, Reply, Request};
use nft::{Nft, NftOp, NftTicket};
use nix::errno::Errno;
use state::State;
use std::collections::VecDeque;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use tap::Tap;

/// How many of the taps it made a daemon remembers (a few bytes each).
const MADE_TAPS_KEPT: usize = 1 << 16;

/// A VM's interface as the parent made it.
struct VmTap {
    tap: Tap,
    /// The interface's index in the VM (vioN, ethN in the guest).
    index: usize,
    alias: String,
    switch: Option<String>,
    up: bool,
    /// A local interface: its host side's address, and with `local
    /// inet6` its IPv6 one.
    host_addr: Option<std::net::Ipv4Addr>,
    host_addr6: Option<std::net::Ipv6Addr>,
    /// `locked lladdr` (its own or its switch's): the only source MAC
    /// let through (nft.rs).
    locked: Option<[u8; 6]>,
    /// Its link group (the interface's `group`; its switch's is the
    /// bridge's: a Linux link has one).
    group: Option<u32>,
    /// The VRF of `rdomain N` it is enslaved to, on no switch (a port
    /// routes in its bridge's).
    rdomain: u32,
}

/// Where a VM's interfaces are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetStatus {
    /// Being configured.
    Pending,
    Ready,
    /// A step failed: why, for vmctl.
    Failed(String),
}

struct VmNet {
    id: u32,
    taps: Vec<VmTap>,
    status: NetStatus,
    /// The nftables run it waits for once its links are configured: its
    /// taps' locks (true), or the removal of a predecessor's table.
    nft_wait: Option<(NftTicket, bool)>,
}

/// The VRF device of `rdomain N` (links.rs): shared host-wide, created
/// if missing and then recorded in the state file.
struct Vrf {
    rdomain: u32,
    ifindex: Option<u32>,
    error: Option<String>,
}

struct Switch {
    name: String,
    bridge: String,
    up: bool,
    locked: bool,
    group: Option<String>,
    rdomain: u32,
    /// The bridge's index once it is known to exist.
    ifindex: Option<u32>,
    /// Why the bridge cannot be used.
    error: Option<String>,
}

/// A queued piece of work; `stage` is where it is.
#[derive(Debug, Clone)]
enum Job {
    /// Applies switch `name`'s settings to its bridge, creating it if it
    /// is missing.
    Switch { name: String, stage: u8 },
    /// Deletes bridge `name` (index `index`), or VRF device with `vrf`,
    /// which vmd created, unless it holds a port besides `ports` (vmd's
    /// taps) or an address.
    RemoveBridge {
        name: String,
        index: u32,
        ports: Vec<u32>,
        vrf: bool,
        stage: u8,
    },
    /// Makes the VRF device of `rdomain N` if it is missing, and sets it up.
    Vrf { rdomain: u32, stage: u8 },
    /// Configures VM `id`'s interface `tap` (a position in its taps).
    Vm { id: u32, tap: usize, stage: u8 },
    /// Puts a running VM's tap `tap` (an ifindex) back on bridge
    /// `bridge` (its switch was applied again: a bridge deleted by hand
    /// and made again has lost its ports).
    Attach { tap: u32, bridge: u32, stage: u8 },
}

/// What a job does next.
enum Next {
    Send(Job, Request),
    Done,
}

pub struct Net {
    nl: Option<Netlink>,
    /// Why there is no netlink socket.
    nl_error: String,
    token: Token,
    state_path: PathBuf,
    state: State,
    switches: Vec<Switch>,
    vms: Vec<VmNet>,
    /// The index of every tap this daemon made: a bridge's port that is
    /// one of them is vmd's (a VM's tap outlives its release while its
    /// QEMU exits).
    made_taps: Vec<u32>,
    jobs: VecDeque<Job>,
    /// The job whose request is in flight.
    current: Option<Job>,
    /// Bridges whose switch went from the configuration (switch name,
    /// bridge name): removed, if vmd made them, once no running VM's tap
    /// is on them.
    retired: Vec<(String, String)>,
    /// The daemon stops: remove the bridges once no VM holds a tap.
    stopping: bool,
    stop_queued: bool,
    /// VMs whose taps were closed, for the DHCP server to forget.
    released: Vec<u32>,
    /// `local inet6` without a prefix: this daemon's random ULA /48
    /// (fd00::/8 and 40 random bits, RFC 4193).
    ula: Ipv6Prefix,
    /// Runs nft for `locked lladdr`.
    nft: Nft,
    /// The removal of a predecessor's nftables table: VMs wait for it.
    nft_startup: Option<NftTicket>,
    /// The removal of this daemon's table at its end.
    nft_drop: Option<NftTicket>,
    /// Released VMs' locked taps, kept open (their names taken) until
    /// their chains are gone: on Linux >= 6.16 a chain outlives its tap
    /// and would filter the next tap of that name.
    unlocking: Vec<(NftTicket, Vec<VmTap>)>,
    vrfs: Vec<Vrf>,
}

impl Net {
    /// Opens the netlink socket (registered under `token`) and reads
    /// the state file of the daemon of `socket` in `state_dir`: what a
    /// predecessor left is removed first, before any switch or VM.
    /// nft's helpers are registered under `nft_token`.
    pub fn new(
        registry: &Registry,
        token: Token,
        nft_token: Token,
        socket: &Path,
        state_dir: &Path,
    ) -> Net {
        let (nl, nl_error) = match Netlink::open() {
            Ok(nl) => {
                match registry.register(&mut SourceFd(&nl.as_raw_fd()), token, Interest::READABLE) {
                    Ok(()) => (Some(nl), String::new()),
                    Err(e) => (None, e.to_string()),
                }
            }
            Err(e) => (None, e.to_string()),
        };
        if nl.is_none() {
            log_warn!("no netlink socket ({nl_error}): VMs with interfaces cannot start");
        }
        let state_path = state::state_path(state_dir, socket);
        let nft_registry = registry.try_clone().unwrap_or_else(|e| {
            log_warn!("cannot clone the event registry for nft: {e}");
            std::process::exit(1)
        });
        let nft = Nft::new(nft_registry, nft_token, &state_path, socket);
        let mut net = Net {
            nl,
            nl_error,
            token,
            state_path,
            state: State {
                socket: socket.display().to_string(),
                pid: std::process::id(),
                ..State::default()
            },
            switches: Vec::new(),
            vms: Vec::new(),
            made_taps: Vec::new(),
            retired: Vec::new(),
            jobs: VecDeque::new(),
            current: None,
            stopping: false,
            stop_queued: false,
            released: Vec::new(),
            ula: random_ula(),
            nft,
            nft_startup: None,
            nft_drop: None,
            unlocking: Vec::new(),
            vrfs: Vec::new(),
        };
        net.recover();
        net
    }

    /// Removes what the daemon that had our socket before left, as its
    /// state file lists it: its bridges (its taps vanished with it, and
    /// count as its own ports).
    fn recover(&mut self) {
        let old = match state::state_load(&self.state_path) {
            Ok(Some(old)) => old,
            Ok(None) => return,
            Err(e) => {
                log_warn!(
                    "{}: {e}; what an earlier vmd left is not removed",
                    self.state_path.display()
                );
                return;
            }
        };
        if !old.is_empty() {
            log_info!(
                "{}: removing what vmd (pid {}) left: {} tap(s), {} bridge(s)",
                self.state_path.display(),
                old.pid,
                old.taps.len(),
                old.bridges.len()
            );
        }
        let ports: Vec<u32> = old.taps.iter().map(|(_, index)| *index).collect();
        // Bridges first: one vmd enslaved to a VRF leaves it.
        let bridges = old.bridges.iter().map(|b| (b, false));
        for ((name, index), vrf) in bridges.chain(old.vrfs.iter().map(|v| (v, true))) {
            self.jobs.push_back(Job::RemoveBridge {
                name: name.clone(),
                index: *index,
                ports: ports.clone(),
                vrf,
                stage: 0,
            });
        }
        if old.nft {
            // Its chains would filter our taps of the same names.
            self.nft_startup = Some(self.nft.submit(vec![NftOp::DropTable]));
            self.state.nft = true;
        }
        self.state.bridges = old.bridges;
        self.state.vrfs = old.vrfs;
        self.save();
        self.run();
    }

    pub fn token(&self) -> Token {
        self.token
    }

    // --- switches ---

    /// The configured switches (after a load, a reload or `reset
    /// switches`): new ones and changed ones are applied, with `reapply`
    /// every one; the bridges vmd created for switches that went are
    /// removed (if nothing else uses them).
    pub fn set_switches(&mut self, switches: &[SwitchConfig], reapply: bool) {
        let wanted: Vec<&SwitchConfig> = switches.iter().filter(|s| s.enabled).collect();
        let (kept, gone): (Vec<Switch>, Vec<Switch>) = std::mem::take(&mut self.switches)
            .into_iter()
            .partition(|s| wanted.iter().any(|w| w.name == s.name));
        self.switches = kept;
        // A bridge a switch no longer names (the switch went, or names
        // another interface now) is retired; a switch naming it again
        // takes it back.
        let moved = self.switches.iter().filter(|s| {
            wanted
                .iter()
                .any(|w| w.name == s.name && w.interface != s.bridge)
        });
        let old: Vec<(String, String)> = (gone.iter().chain(moved))
            .map(|s| (s.name.clone(), s.bridge.clone()))
            .collect();
        self.retired.extend(old);
        self.retired
            .retain(|(_, bridge)| !wanted.iter().any(|w| w.interface == *bridge));
        self.remove_retired();
        for w in wanted {
            let wanted_sw = Switch {
                name: w.name.clone(),
                bridge: w.interface.clone(),
                up: w.up,
                locked: w.locked_lladdr,
                group: w.group.clone(),
                rdomain: w.rdomain.unwrap_or(0),
                ifindex: None,
                error: None,
            };
            let known = self.switches.iter_mut().find(|s| s.name == w.name);
            let changed = match known {
                Some(s)
                    if s.bridge == w.interface
                        && s.up == w.up
                        && s.group == wanted_sw.group
                        && s.rdomain == wanted_sw.rdomain =>
                {
                    s.locked = w.locked_lladdr;
                    reapply
                }
                Some(s) => {
                    *s = wanted_sw;
                    true
                }
                None => {
                    self.switches.push(wanted_sw);
                    true
                }
            };
            if changed {
                self.vrf_want(w.rdomain.unwrap_or(0));
                self.jobs.push_back(Job::Switch {
                    name: w.name.clone(),
                    stage: 0,
                });
            }
        }
        self.run();
    }

    // --- VMs ---

    /// Makes VM `id`'s taps (`vm`'s interfaces, their MACs already
    /// chosen) and queues their configuration; a restart after a reboot
    /// finds its taps still here. Err: a tap could not be made (none is
    /// kept).
    pub fn vm_start(&mut self, id: u32, vm: &VmConfig, globals: &Globals) -> Result<(), String> {
        if self.vms.iter().any(|v| v.id == id) {
            return Ok(());
        }
        let interfaces = vm.effective_interfaces();
        if interfaces.is_empty() {
            return Ok(());
        }
        if self.nl.is_none() {
            return Err(format!(
                "network interfaces need netlink, which failed: {}",
                self.nl_error
            ));
        }
        let mut taps = Vec::new();
        for (index, iface) in interfaces.iter().enumerate() {
            taps.push(self.vm_tap(id, &vm.name, index, iface, globals)?);
        }
        for t in &taps {
            log_info!(
                "vm {} (vm {id}): interface {} is {}{}",
                vm.name,
                t.index,
                t.tap.name,
                t.switch
                    .as_ref()
                    .map(|s| format!(" on switch \"{s}\""))
                    .unwrap_or_default()
            );
            self.state.taps.push((t.tap.name.clone(), t.tap.ifindex));
            self.made_taps.push(t.tap.ifindex);
            if self.made_taps.len() > MADE_TAPS_KEPT {
                self.made_taps.drain(..MADE_TAPS_KEPT / 2);
            }
        }
        self.save();
        for t in &taps {
            if t.switch.is_none() {
                self.vrf_want(t.rdomain);
            }
        }
        self.vms.push(VmNet {
            id,
            taps,
            status: NetStatus::Pending,
            nft_wait: None,
        });
        self.jobs.push_back(Job::Vm {
            id,
            tap: 0,
            stage: 0,
        });
        self.run();
        Ok(())
    }

    fn vm_tap(
        &self,
        id: u32,
        name: &str,
        index: usize,
        iface: &Interface,
        globals: &Globals,
    ) -> Result<VmTap, String> {
        let switch = match &iface.switch {
            Some(sw) => match self.switches.iter().find(|s| s.name == *sw) {
                Some(s) => Some(s),
                None => return Err(format!("switch \"{sw}\" not found")),
            },
            None => None,
        };
        let rdomain = match (switch, iface.rdomain) {
            (Some(s), Some(r)) if r != s.rdomain => {
                return Err(format!(
                    "interface {index}: rdomain {r}, but switch \"{}\" is in rdomain {}: \
                     on Linux a bridge's port routes in its bridge's VRF \
                     (set rdomain on the switch)",
                    s.name, s.rdomain
                ))
            }
            (Some(_), _) => 0,
            (None, r) => r.unwrap_or(0),
        };
        rdomain_table(rdomain).map_err(|e| format!("interface {index}: {e}"))?;
        let locked = match (
            iface.locked || switch.is_some_and(|s| s.locked),
            iface.lladdr,
        ) {
            (false, _) => None,
            (true, Some(mac)) => Some(mac),
            (true, None) => {
                return Err(format!(
                    "interface {index}: locked lladdr without an address"
                ))
            }
        };
        let group = match &iface.group {
            Some(g) => Some(
                common::linkgroup::linkgroup_check(g)
                    .map_err(|e| format!("interface {index}: {e}"))?,
            ),
            None => None,
        };
        let local = |e: LocalAddrError| format!("local interface {index}: {e}");
        let prefix = globals.local_prefix;
        let (host_addr, host_addr6) = if iface.local {
            let addr6 = match (globals.local_inet6, globals.local_prefix6) {
                (false, _) => None,
                (true, prefix6) => Some(
                    local_addr6(
                        prefix,
                        prefix6.unwrap_or(self.ula),
                        id,
                        index as u32,
                        Side::Host,
                    )
                    .map_err(local)?,
                ),
            };
            let addr = local_addr4(prefix, id, index as u32, Side::Host).map_err(local)?;
            (Some(addr), addr6)
        } else {
            (None, None)
        };
        let wanted = iface
            .tap
            .as_deref()
            .filter(|t| *t != "tap")
            .unwrap_or(tap::TAP_TEMPLATE);
        let tap = tap::tap_open(wanted).map_err(|e| format!("interface {index}: {e}"))?;
        Ok(VmTap {
            alias: common::net::tap_description(id, index, name),
            tap,
            index,
            switch: iface.switch.clone(),
            up: iface.up,
            host_addr,
            host_addr6,
            locked,
            group,
            rdomain,
        })
    }

    /// Queues the making of rdomain `rdomain`'s VRF unless it is there
    /// or on its way (0: none; one that failed is tried again).
    fn vrf_want(&mut self, rdomain: u32) {
        if rdomain == 0 {
            return;
        }
        match self.vrfs.iter_mut().find(|v| v.rdomain == rdomain) {
            Some(Vrf {
                ifindex: Some(_), ..
            }) => return,
            Some(v) if v.error.is_some() => v.error = None,
            Some(_) => return,
            None => self.vrfs.push(Vrf {
                rdomain,
                ifindex: None,
                error: None,
            }),
        }
        self.jobs.push_back(Job::Vrf { rdomain, stage: 0 });
    }

    /// The VRF of `rdomain` to enslave a link to: its index, or why not.
    fn vrf_master(&self, rdomain: u32) -> Result<Option<u32>, String> {
        if rdomain == 0 {
            return Ok(None);
        }
        match self.vrfs.iter().find(|v| v.rdomain == rdomain) {
            Some(Vrf {
                ifindex: Some(i), ..
            }) => Ok(Some(*i)),
            Some(Vrf { error: Some(e), .. }) => Err(e.clone()),
            _ => Err(format!("VRF {} is not there", rdomain_vrf_name(rdomain))),
        }
    }

    /// Where VM `id`'s interfaces are; None if it has none.
    pub fn vm_status(&self, id: u32) -> Option<NetStatus> {
        self.vms
            .iter()
            .find(|v| v.id == id)
            .map(|v| v.status.clone())
    }

    /// A copy of each of VM `id`'s tap descriptors, by interface index,
    /// for its VM process (the parent keeps its own).
    pub fn vm_taps(&self, id: u32) -> Result<Vec<(u8, OwnedFd)>, String> {
        let Some(vm) = self.vms.iter().find(|v| v.id == id) else {
            return Ok(Vec::new());
        };
        vm.taps
            .iter()
            .map(|t| {
                t.tap
                    .fd
                    .try_clone()
                    .map(|fd| (t.index as u8, fd))
                    .map_err(|e| format!("{}: {e}", t.tap.name))
            })
            .collect()
    }

    /// VM `id`'s local interfaces: (index in the VM, the tap's ifindex).
    pub fn vm_tap_names(&self, id: u32) -> Vec<String> {
        self.vms
            .iter()
            .filter(|v| v.id == id)
            .flat_map(|v| v.taps.iter())
            .map(|t| t.tap.name.clone())
            .collect()
    }

    pub fn vm_local_taps(&self, id: u32) -> Vec<(usize, u32)> {
        self.vms
            .iter()
            .filter(|v| v.id == id)
            .flat_map(|v| v.taps.iter())
            .filter(|t| t.host_addr.is_some())
            .map(|t| (t.index, t.tap.ifindex))
            .collect()
    }

    /// The VMs whose taps were closed since the last call.
    pub fn take_released(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.released)
    }

    /// VM `id` has ended (not for a reboot): its taps are closed, so they
    /// vanish with everything set on them.
    pub fn vm_release(&mut self, id: u32) {
        let Some(index) = self.vms.iter().position(|v| v.id == id) else {
            return;
        };
        let vm = self.vms.remove(index);
        self.released.push(id);
        let names: Vec<&str> = vm.taps.iter().map(|t| t.tap.name.as_str()).collect();
        log_debug!("vm {id}: closing {}", names.join(", "));
        self.state
            .taps
            .retain(|(_, i)| !vm.taps.iter().any(|t| t.tap.ifindex == *i));
        let (locked, unlocked): (Vec<VmTap>, Vec<VmTap>) =
            vm.taps.into_iter().partition(|t| t.locked.is_some());
        drop(unlocked);
        if !locked.is_empty() {
            let ops = (locked.iter())
                .map(|t| NftOp::Unlock {
                    tap: t.tap.name.clone(),
                })
                .collect();
            self.unlocking.push((self.nft.submit(ops), locked));
            // Its run makes the table if it is missing: dropped at the end.
            self.state.nft = true;
        }
        self.save();
        self.remove_retired();
        self.after_vm_gone();
    }

    /// Queues the removal of the retired bridges no running VM uses: the
    /// taps of a switch that went stay on its bridge until their VMs end
    /// (a reload never cuts a running guest off); those of a switch that
    /// names another bridge now move there with it.
    fn remove_retired(&mut self) {
        let (vms, switches) = (&self.vms, &self.switches);
        let in_use = |switch: &str| {
            !switches.iter().any(|s| s.name == switch)
                && vms
                    .iter()
                    .any(|v| v.taps.iter().any(|t| t.switch.as_deref() == Some(switch)))
        };
        let (waiting, free): (Vec<_>, Vec<_>) = std::mem::take(&mut self.retired)
            .into_iter()
            .partition(|(switch, _)| in_use(switch));
        for (switch, bridge) in &waiting {
            log_debug!("switch {switch} went: bridge {bridge} stays while vms use it");
        }
        self.retired = waiting;
        for (_, bridge) in free {
            if let Some(&(_, index)) = self.state.bridges.iter().find(|(b, _)| *b == bridge) {
                self.jobs.push_back(Job::RemoveBridge {
                    name: bridge,
                    index,
                    ports: Vec::new(),
                    vrf: false,
                    stage: 0,
                });
            }
        }
        self.run();
    }

    // --- the daemon's end ---

    /// The daemon stops: once no VM holds a tap, the bridges vmd created
    /// are removed.
    pub fn stop(&mut self) {
        self.stopping = true;
        self.after_vm_gone();
    }

    fn after_vm_gone(&mut self) {
        if !self.stopping || self.stop_queued || !self.vms.is_empty() {
            return;
        }
        self.stop_queued = true;
        let jobs = self.stop_jobs();
        self.jobs.extend(jobs);
        if self.state.nft {
            self.nft_drop = Some(self.nft.submit(vec![NftOp::DropTable]));
        }
        self.run();
        self.save();
    }

    /// What the daemon's shutdown removes once its last VM has ended (its
    /// taps are gone with their descriptors): the bridges it made, then
    /// the VRFs it made (a bridge of ours leaves its VRF with it). Its
    /// nftables table, which outlives a tap, is dropped by nft (nft.rs);
    /// [`Net::is_idle`] holds the exit until the last one is done.
    fn stop_jobs(&self) -> Vec<Job> {
        let bridges = self.state.bridges.iter().map(|b| (b.clone(), false));
        let vrfs = self.state.vrfs.iter().map(|v| (v.clone(), true));
        bridges
            .chain(vrfs)
            .map(|((name, index), vrf)| Job::RemoveBridge {
                name,
                index,
                ports: Vec::new(),
                vrf,
                stage: 0,
            })
            .collect()
    }

    /// Nothing is queued or in flight (and, stopping, the bridges'
    /// removal has run).
    pub fn is_idle(&self) -> bool {
        self.current.is_none()
            && self.jobs.is_empty()
            && self.nft.is_idle()
            && self.unlocking.is_empty()
            && (!self.stopping || self.stop_queued || self.vms.is_empty())
    }

    // --- the loop ---

    /// The netlink socket is readable: the answer to the request in
    /// flight moves its job on.
    pub fn handle_event(&mut self) {
        let Some(nl) = self.nl.as_mut() else {
            return;
        };
        let reply = match nl.receive() {
            Ok(Some(reply)) => reply,
            Ok(None) => return,
            Err(e) => {
                log_warn!("{e}");
                Reply::Failed(Errno::EIO)
            }
        };
        if let Some(job) = self.current.take() {
            self.advance(job, Some(reply));
        }
        self.run();
    }

    /// Starts queued jobs while nothing is in flight.
    fn run(&mut self) {
        while self.current.is_none() {
            let Some(job) = self.jobs.pop_front() else {
                return;
            };
            self.advance(job, None);
        }
    }

    /// Moves `job` on with `reply` (None: it starts), sending its next
    /// request; a request that cannot be sent is answered by its error.
    fn advance(&mut self, job: Job, reply: Option<Reply>) {
        let mut next = self.step(job, reply);
        while let Next::Send(job, req) = next {
            let Some(nl) = self.nl.as_mut() else {
                next = self.step(job, Some(Reply::Failed(Errno::ENOTCONN)));
                continue;
            };
            match nl.send(&req) {
                Ok(()) => {
                    self.current = Some(job);
                    return;
                }
                Err(e) => next = self.step(job, Some(Reply::Failed(e))),
            }
        }
    }

    fn step(&mut self, job: Job, reply: Option<Reply>) -> Next {
        match job {
            Job::Switch { name, stage } => self.step_switch(name, stage, reply),
            Job::RemoveBridge {
                name,
                index,
                ports,
                vrf,
                stage,
            } => self.step_remove(name, index, ports, vrf, stage, reply),
            Job::Vrf { rdomain, stage } => self.step_vrf(rdomain, stage, reply),
            Job::Vm { id, tap, stage } => self.step_vm(id, tap, stage, reply),
            Job::Attach { tap, bridge, stage } => {
                let set = Request::SetLink {
                    index: tap,
                    alias: None,
                    up: None,
                    master: Some(bridge),
                };
                match (stage, reply) {
                    (0, None) => Next::Send(
                        Job::Attach {
                            tap,
                            bridge,
                            stage: 1,
                        },
                        set,
                    ),
                    (_, Some(Reply::Ack)) => Next::Done,
                    (_, other) => {
                        log_warn!("tap {tap}: cannot put it on bridge {bridge}: {other:?}");
                        Next::Done
                    }
                }
            }
        }
    }

    fn step_switch(&mut self, name: String, stage: u8, reply: Option<Reply>) -> Next {
        let Some(sw) = self.switches.iter().find(|s| s.name == name) else {
            return Next::Done;
        };
        let bridge = sw.bridge.clone();
        let up = sw.up;
        let (group, rdomain, ifindex) = (sw.group.clone(), sw.rdomain, sw.ifindex);
        let job = |stage| Job::Switch {
            name: name.clone(),
            stage,
        };
        let fail = |net: &mut Net, why: String| {
            log_warn!("switch \"{name}\": {why}");
            if let Some(sw) = net.switches.iter_mut().find(|s| s.name == name) {
                sw.error = Some(why);
                sw.ifindex = None;
            }
            Next::Done
        };
        match (stage, reply) {
            (0, None) => Next::Send(job(1), Request::LinkByName(bridge)),
            (1 | 4, Some(Reply::Link(link))) => {
                if link.kind.as_deref() != Some("bridge") {
                    return fail(self, format!("interface {bridge} is not a bridge"));
                }
                if stage == 4 {
                    log_info!("switch \"{name}\": created bridge {bridge}");
                    self.record_made(false, &bridge, link.index);
                }
                if let Some(sw) = self.switches.iter_mut().find(|s| s.name == name) {
                    sw.ifindex = Some(link.index);
                }
                Next::Send(job(3), set_up(link.index, up))
            }
            (1, Some(Reply::Failed(Errno::ENODEV))) => {
                Next::Send(job(2), Request::NewBridge(bridge))
            }
            // Made meanwhile by someone else: used as it is.
            (2, Some(Reply::Failed(Errno::EEXIST))) => {
                Next::Send(job(1), Request::LinkByName(bridge))
            }
            (2, Some(Reply::Ack)) => Next::Send(job(4), Request::LinkByName(bridge)),
            (3, Some(Reply::Ack)) if group.is_some() => {
                let group = group.unwrap_or_default();
                match common::linkgroup::linkgroup_check(&group) {
                    Ok(group) => {
                        let set = LinkRequest::SetGroup {
                            index: ifindex.unwrap_or_default(),
                            group,
                        };
                        Next::Send(job(5), Request::Link(set))
                    }
                    Err(e) => fail(self, format!("bridge {bridge}: {e}")),
                }
            }
            (3 | 5, Some(Reply::Ack)) if rdomain != 0 => match self.vrf_master(rdomain) {
                Ok(master) => {
                    let set = Request::SetLink {
                        index: ifindex.unwrap_or_default(),
                        alias: None,
                        up: None,
                        master,
                    };
                    Next::Send(job(6), set)
                }
                Err(e) => fail(self, format!("bridge {bridge}: {e}")),
            },
            (3 | 5 | 6, Some(Reply::Ack)) => {
                let mut bridge_index = None;
                if let Some(sw) = self.switches.iter_mut().find(|s| s.name == name) {
                    sw.error = None;
                    bridge_index = sw.ifindex;
                }
                // The running VMs' taps on this switch (again) on its bridge.
                let ports: Vec<u32> = (self.vms.iter())
                    .filter(|v| v.status == NetStatus::Ready)
                    .flat_map(|v| v.taps.iter())
                    .filter(|t| t.switch.as_deref() == Some(name.as_str()))
                    .map(|t| t.tap.ifindex)
                    .collect();
                if let Some(bridge) = bridge_index {
                    for tap in ports {
                        self.jobs.push_back(Job::Attach {
                            tap,
                            bridge,
                            stage: 0,
                        });
                    }
                }
                log_debug!(
                    "switch \"{name}\": bridge {bridge} {}",
                    if up { "up" } else { "down" }
                );
                Next::Done
            }
            (2, Some(Reply::Failed(e))) => {
                fail(self, format!("cannot create bridge {bridge}: {e}"))
            }
            (3, Some(Reply::Failed(e))) => fail(
                self,
                format!(
                    "cannot set bridge {bridge} {}: {e}",
                    if up { "up" } else { "down" }
                ),
            ),
            (5, Some(Reply::Failed(e))) => {
                let set = LinkRequest::SetGroup {
                    index: ifindex.unwrap_or_default(),
                    group: 0,
                };
                let group = group.unwrap_or_default();
                fail(
                    self,
                    format!("bridge {bridge}: group {group}: {}", links_error(&set, e)),
                )
            }
            (6, Some(Reply::Failed(e))) => fail(
                self,
                format!(
                    "cannot put bridge {bridge} in VRF {}: {e}",
                    rdomain_vrf_name(rdomain)
                ),
            ),
            (_, Some(Reply::Failed(e))) => fail(self, format!("bridge {bridge}: {e}")),
            (_, other) => fail(
                self,
                format!("bridge {bridge}: unexpected answer {other:?}"),
            ),
        }
    }

    fn step_remove(
        &mut self,
        name: String,
        index: u32,
        ports: Vec<u32>,
        vrf: bool,
        stage: u8,
        reply: Option<Reply>,
    ) -> Next {
        let job = |stage, ports: &Vec<u32>| Job::RemoveBridge {
            name: name.clone(),
            index,
            ports: ports.clone(),
            vrf,
            stage,
        };
        let (kind, what) = if vrf {
            ("vrf", "VRF")
        } else {
            ("bridge", "bridge")
        };
        let ours: Vec<u32> = (self.made_taps.iter().copied())
            .chain(ports.iter().copied())
            .collect();
        let next = match (stage, reply) {
            (0, None) => return Next::Send(job(1, &ports), Request::LinkByIndex(index)),
            (1, Some(Reply::Link(link))) => {
                if link.name == name && link.kind.as_deref() == Some(kind) {
                    return Next::Send(job(2, &ports), Request::Links);
                }
                log_debug!("{what} {name} (index {index}) is gone: nothing to remove");
                Next::Done
            }
            (1, Some(Reply::Failed(Errno::ENODEV))) => {
                log_debug!("{what} {name} (index {index}) is gone: nothing to remove");
                Next::Done
            }
            (2, Some(Reply::Links(links))) => {
                let foreign: Vec<&str> = links
                    .iter()
                    .filter(|l| l.master == Some(index) && !ours.contains(&l.index))
                    .map(|l| l.name.as_str())
                    .collect();
                if foreign.is_empty() {
                    return Next::Send(job(3, &ports), Request::Addresses);
                }
                log_info!(
                    "{what} {name} keeps ports vmd did not add ({}): not deleted",
                    foreign.join(", ")
                );
                Next::Done
            }
            (3, Some(Reply::Addresses(addrs))) => {
                let foreign: Vec<String> = addrs
                    .iter()
                    .filter(|(i, a)| *i == index && !is_link_local(a))
                    .map(|(_, a)| a.to_string())
                    .collect();
                if foreign.is_empty() {
                    return Next::Send(job(4, &ports), Request::DelLink(index));
                }
                log_info!(
                    "{what} {name} has addresses vmd did not add ({}): not deleted",
                    foreign.join(", ")
                );
                Next::Done
            }
            (4, Some(Reply::Ack | Reply::Failed(Errno::ENODEV))) => {
                log_info!("deleted {what} {name}, which vmd had created");
                Next::Done
            }
            (_, Some(Reply::Failed(e))) => {
                log_warn!("{what} {name}: cannot remove it: {e}");
                Next::Done
            }
            (_, other) => {
                log_warn!("{what} {name}: unexpected answer {other:?}");
                Next::Done
            }
        };
        // Removed, or left to whoever else uses it: no longer ours.
        let list = if vrf {
            &mut self.state.vrfs
        } else {
            &mut self.state.bridges
        };
        list.retain(|(b, i)| !(*b == name && *i == index));
        if vrf {
            self.vrfs.retain(|v| v.ifindex != Some(index));
        }
        for sw in self.switches.iter_mut().filter(|s| s.bridge == name) {
            sw.ifindex = None;
        }
        self.save();
        next
    }

    fn step_vm(&mut self, id: u32, tap: usize, stage: u8, reply: Option<Reply>) -> Next {
        let vrf_master = (self.vms.iter())
            .find(|v| v.id == id)
            .and_then(|v| v.taps.get(tap))
            .filter(|t| t.switch.is_none())
            .map(|t| self.vrf_master(t.rdomain));
        let Some(vm) = self.vms.iter_mut().find(|v| v.id == id) else {
            return Next::Done;
        };
        let Some(t) = vm.taps.get(tap) else {
            return self.vm_links_done(id);
        };
        let name = t.tap.name.clone();
        let job = |tap, stage| Job::Vm { id, tap, stage };
        let failed =
            |why: String| NetStatus::Failed(format!("interface {} ({name}): {why}", t.index));
        let status = match (stage, reply) {
            (0, None) => {
                let master = match &t.switch {
                    None => match vrf_master.unwrap_or(Ok(None)) {
                        Ok(m) => m,
                        Err(e) => {
                            vm.status = failed(format!("rdomain {}: {e}", t.rdomain));
                            return Next::Done;
                        }
                    },
                    Some(s) => match self.switches.iter().find(|sw| sw.name == *s) {
                        Some(Switch {
                            ifindex: Some(i), ..
                        }) => Some(*i),
                        Some(Switch { error: Some(e), .. }) => {
                            vm.status = failed(format!("switch \"{s}\": {e}"));
                            return Next::Done;
                        }
                        Some(sw) => {
                            vm.status = failed(format!(
                                "switch \"{s}\": bridge {} is not there",
                                sw.bridge
                            ));
                            return Next::Done;
                        }
                        None => {
                            vm.status = failed(format!("switch \"{s}\" not found"));
                            return Next::Done;
                        }
                    },
                };
                let set = Request::SetLink {
                    index: t.tap.ifindex,
                    alias: Some(t.alias.clone()),
                    up: Some(t.up),
                    master,
                };
                return Next::Send(job(tap, 1), set);
            }
            // Its host addresses, one request each: IPv4, then IPv6.
            (1, Some(Reply::Ack)) if t.group.is_some() => {
                let set = LinkRequest::SetGroup {
                    index: t.tap.ifindex,
                    group: t.group.unwrap_or_default(),
                };
                return Next::Send(job(tap, 4), Request::Link(set));
            }
            (1 | 2 | 4, Some(Reply::Ack)) => {
                let stage = if stage == 4 { 1 } else { stage };
                let addrs = [
                    t.host_addr.map(|a| (IpAddr::V4(a), LOCAL_PREFIX_LEN)),
                    t.host_addr6.map(|a| (IpAddr::V6(a), LOCAL_PREFIX6_LEN)),
                ];
                match addrs[stage as usize - 1..].iter().flatten().next() {
                    Some(&(addr, prefix_len)) => {
                        let next = if addr.is_ipv4() { 2 } else { 3 };
                        let add = Request::AddAddress {
                            index: t.tap.ifindex,
                            addr,
                            prefix_len,
                        };
                        return Next::Send(job(tap, next), add);
                    }
                    None => return self.step_vm(id, tap + 1, 0, None),
                }
            }
            (3, Some(Reply::Ack)) => return self.step_vm(id, tap + 1, 0, None),
            (1, Some(Reply::Failed(e))) => failed(format!("cannot configure it: {e}")),
            (4, Some(Reply::Failed(e))) => {
                let set = LinkRequest::SetGroup {
                    index: t.tap.ifindex,
                    group: t.group.unwrap_or_default(),
                };
                failed(links_error(&set, e))
            }
            (2 | 3, Some(Reply::Failed(e))) => {
                let addr = match stage {
                    2 => t.host_addr.map(|a| format!("{a}/{LOCAL_PREFIX_LEN}")),
                    _ => t.host_addr6.map(|a| format!("{a}/{LOCAL_PREFIX6_LEN}")),
                };
                failed(format!(
                    "cannot add address {}: {e}",
                    addr.unwrap_or_default()
                ))
            }
            (_, other) => failed(format!("unexpected answer {other:?}")),
        };
        vm.status = status;
        Next::Done
    }

    /// Writes the state file (removes it once the daemon stops with
    /// nothing left); a failure is logged: a crash would then leave
    /// what the file misses.
    /// VM `id`'s links are configured: its locks next, after a
    /// predecessor's table is gone (nft runs in order).
    fn vm_links_done(&mut self, id: u32) -> Next {
        let Some(vm) = self.vms.iter_mut().find(|v| v.id == id) else {
            return Next::Done;
        };
        let locks: Vec<NftOp> = (vm.taps.iter())
            .filter_map(|t| {
                t.locked.map(|mac| NftOp::Lock {
                    tap: t.tap.name.clone(),
                    mac,
                })
            })
            .collect();
        if !locks.is_empty() {
            vm.nft_wait = Some((self.nft.submit(locks), true));
            if !self.state.nft {
                self.state.nft = true;
                self.save();
            }
        } else if let Some(startup) = self.nft_startup {
            vm.nft_wait = Some((startup, false));
        } else {
            vm.status = NetStatus::Ready;
        }
        Next::Done
    }

    /// Makes rdomain `rdomain`'s VRF device (table 1000+N) if it is
    /// missing, and sets it up; one that exists is used as it is.
    fn step_vrf(&mut self, rdomain: u32, stage: u8, reply: Option<Reply>) -> Next {
        let name = rdomain_vrf_name(rdomain);
        let job = |stage| Job::Vrf { rdomain, stage };
        let table = match rdomain_table(rdomain) {
            Ok(Some(table)) => table,
            Ok(None) => return Next::Done,
            Err(e) => return self.vrf_failed(rdomain, e),
        };
        let new = LinkRequest::NewVrf {
            name: name.clone(),
            table,
        };
        match (stage, reply) {
            (0, None) => Next::Send(job(1), Request::LinkByName(name)),
            (1 | 4, Some(Reply::Link(link))) => {
                if link.kind.as_deref() != Some("vrf") {
                    let why = format!("interface {name} exists and is not a VRF");
                    return self.vrf_failed(rdomain, why);
                }
                if stage == 4 {
                    log_info!("rdomain {rdomain}: created VRF {name} (table {table})");
                    self.record_made(true, &name, link.index);
                }
                if let Some(v) = self.vrfs.iter_mut().find(|v| v.rdomain == rdomain) {
                    v.ifindex = Some(link.index);
                }
                Next::Send(job(3), set_up(link.index, true))
            }
            (1, Some(Reply::Failed(Errno::ENODEV))) => Next::Send(job(2), Request::Link(new)),
            (2, Some(Reply::Failed(Errno::EEXIST))) => {
                Next::Send(job(1), Request::LinkByName(name))
            }
            (2, Some(Reply::Ack)) => Next::Send(job(4), Request::LinkByName(name)),
            (2, Some(Reply::Failed(e))) => self.vrf_failed(rdomain, links_error(&new, e)),
            (3, Some(Reply::Ack)) => Next::Done,
            (_, Some(Reply::Failed(e))) => self.vrf_failed(rdomain, format!("VRF {name}: {e}")),
            (_, other) => {
                self.vrf_failed(rdomain, format!("VRF {name}: unexpected answer {other:?}"))
            }
        }
    }

    /// A bridge (or with `vrf` a VRF) vmd just made: in the state file,
    /// to be removed at the end or after a crash.
    fn record_made(&mut self, vrf: bool, name: &str, index: u32) {
        let list = if vrf {
            &mut self.state.vrfs
        } else {
            &mut self.state.bridges
        };
        list.retain(|(b, _)| b != name);
        list.push((name.to_string(), index));
        self.save();
    }

    fn vrf_failed(&mut self, rdomain: u32, why: String) -> Next {
        log_warn!("rdomain {rdomain}: {why}");
        if let Some(v) = self.vrfs.iter_mut().find(|v| v.rdomain == rdomain) {
            v.ifindex = None;
            v.error = Some(why);
        }
        Next::Done
    }

    /// nft's helper's socket is readable.
    pub fn nft_event(&mut self) {
        self.nft.handle_event();
        self.nft_settle();
    }

    /// Whether `pid` was nft's helper (reaped by the parent's loop).
    pub fn nft_reaped(&mut self, pid: nix::unistd::Pid) -> bool {
        let ours = self.nft.reaped(pid);
        self.nft_settle();
        ours
    }

    pub fn nft_deadline(&self) -> Option<std::time::Instant> {
        self.nft.next_deadline()
    }

    /// Times out an nft run that took too long.
    pub fn nft_tick(&mut self) {
        self.nft.tick();
        self.nft_settle();
    }

    /// What finished nft runs mean: VMs locked (or failed), released
    /// taps' chains gone (their taps close now), a table removed.
    fn nft_settle(&mut self) {
        for done in self.nft.take_done() {
            if self.nft_startup == Some(done.ticket) {
                self.nft_startup = None;
                match &done.result {
                    Ok(()) => self.state.nft = false,
                    Err(e) => log_warn!("removing what an earlier vmd left: {e}"),
                }
                self.save();
            }
            if self.nft_drop == Some(done.ticket) {
                self.nft_drop = None;
                match &done.result {
                    Ok(()) => self.state.nft = false,
                    Err(e) => log_warn!("{e}"),
                }
                self.save();
            }
            for vm in self.vms.iter_mut() {
                match vm.nft_wait {
                    Some((ticket, locks)) if ticket == done.ticket => {
                        vm.nft_wait = None;
                        vm.status = match (&done.result, locks) {
                            (Err(e), true) => NetStatus::Failed(format!("locked lladdr: {e}")),
                            _ => NetStatus::Ready,
                        };
                    }
                    _ => {}
                }
            }
            if let Some(i) = self.unlocking.iter().position(|(t, _)| *t == done.ticket) {
                let (_, taps) = self.unlocking.remove(i);
                if let Err(e) = &done.result {
                    let names: Vec<&str> = taps.iter().map(|t| t.tap.name.as_str()).collect();
                    log_warn!(
                        "cannot remove the locked lladdr chains of {}: {e}",
                        names.join(", ")
                    );
                }
            }
        }
        self.after_vm_gone();
    }

    fn save(&self) {
        if self.stopping && self.state.is_empty() && self.current.is_none() && self.jobs.is_empty()
        {
            state::state_remove(&self.state_path);
            return;
        }
        if let Err(e) = state::state_save(&self.state_path, &self.state) {
            log_warn!("cannot write {}: {e}", self.state_path.display());
        }
    }
}

/// An IPv6 link-local address, which the kernel adds to an interface by
/// itself.
/// Sets link `index` up or down.
fn set_up(index: u32, up: bool) -> Request {
    Request::SetLink {
        index,
        alias: None,
        up: Some(up),
        master: None,
    }
}

fn is_link_local(addr: &IpAddr) -> bool {
    match addr {
        IpAddr::V6(a) => (a.segments()[0] & 0xffc0) == 0xfe80,
        IpAddr::V4(_) => false,
    }
}

/// A random unique local IPv6 prefix (RFC 4193): fd00::/8 and a 40-bit
/// random global id, a /48.
fn random_ula() -> Ipv6Prefix {
    let mut id = [0u8; 5];
    // SAFETY: getrandom writes at most five bytes into the buffer we own.
    if unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) } != id.len() as isize {
        // Never expected; the pid and time still differ between daemons.
        let seed = std::process::id() as u64
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
        id.copy_from_slice(&seed.to_le_bytes()[..5]);
    }
    let mut octets = [0u8; 16];
    octets[0] = 0xfd;
    octets[1..6].copy_from_slice(&id);
    Ipv6Prefix {
        addr: std::net::Ipv6Addr::from(octets),
        len: 48,
    }
}

#[cfg(test)]
mod tests {
    use super::netlink::tests::ask;
    use super::testns::in_new_netns;
    use super::*;
    use common::config::parse_str;
    use std::time::{Duration, Instant};

    /// Runs the loop until `net` has nothing in flight (tests only).
    fn settle(poll: &mut mio::Poll, net: &mut Net) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut events = mio::Events::with_capacity(8);
        while net.current.is_some() {
            if Instant::now() > deadline {
                return Err("netlink did not answer".into());
            }
            poll.poll(&mut events, Some(Duration::from_millis(100)))
                .map_err(|e| e.to_string())?;
            net.handle_event();
        }
        Ok(())
    }

    fn link(nl: &mut Netlink, name: &str) -> Result<Option<netlink::Link>, String> {
        match ask(nl, &Request::LinkByName(name.into()))? {
            Reply::Link(link) => Ok(Some(link)),
            Reply::Failed(Errno::ENODEV) => Ok(None),
            other => Err(format!("{name}: {other:?}")),
        }
    }

    #[test]
    fn switches_vms_and_recovery_in_a_netns() {
        in_new_netns(|| {
            let dir = std::env::temp_dir().join(format!("vmd-net-{}", std::process::id()));
            let socket = Path::new("/tmp/vmd-net-test.sock");
            let text = "switch \"sw\" { interface brt0 }\n\
                switch \"pre\" { interface brpre }\n\
                vm \"a\" { interface { switch \"sw\" }\n local interface\n interface vmtap9 { down } }\n";
            let config = parse_str("t.conf", text, &[])
                .map_err(|e| format!("{e:?}"))?
                .config;
            let mut check = Netlink::open().map_err(|e| e.to_string())?;
            // A bridge that exists before vmd, with a port of its own.
            assert_eq!(
                ask(&mut check, &Request::NewBridge("brpre".into()))?,
                Reply::Ack
            );
            let pre = link(&mut check, "brpre")?.ok_or("no brpre")?;
            let own = tap::tap_open("own0")?;
            let set = Request::SetLink {
                index: own.ifindex,
                alias: None,
                up: None,
                master: Some(pre.index),
            };
            assert_eq!(ask(&mut check, &set)?, Reply::Ack);

            let mut poll = mio::Poll::new().map_err(|e| e.to_string())?;
            let mut net = Net::new(poll.registry(), Token(1), Token(3), socket, &dir);
            net.set_switches(&config.switches, false);
            settle(&mut poll, &mut net)?;
            let bridge = link(&mut check, "brt0")?.ok_or("brt0 not made")?;
            assert!(bridge.up);
            let mut vm = config.vms[0].clone();
            for (i, iface) in vm.interfaces.iter_mut().enumerate() {
                iface.lladdr = Some(common::net::generated_mac(i, [1, 2]));
            }
            let globals = common::config::Globals {
                local_inet6: true,
                local_prefix6: Some(common::config::Ipv6Prefix {
                    addr: "fd00:1:2::".parse().map_err(|_| "ip")?,
                    len: 64,
                }),
                ..Default::default()
            };
            net.vm_start(7, &vm, &globals)?;
            settle(&mut poll, &mut net)?;
            assert_eq!(net.vm_status(7), Some(NetStatus::Ready));
            let Reply::Links(links) = ask(&mut check, &Request::Links)? else {
                return Err("no links".into());
            };
            let by_alias = |alias: &str| {
                links
                    .iter()
                    .find(|l| l.alias.as_deref() == Some(alias))
                    .cloned()
            };
            let if0 = by_alias("vm7-if0-a").ok_or("no vm7-if0-a")?;
            assert_eq!(
                (if0.name.as_str(), if0.master, if0.up),
                ("tap0", Some(bridge.index), true)
            );
            let if1 = by_alias("vm7-if1-a").ok_or("no vm7-if1-a")?;
            assert_eq!((if1.name.as_str(), if1.master), ("tap1", None));
            let if2 = by_alias("vm7-if2-a").ok_or("no vm7-if2-a")?;
            assert_eq!((if2.name.as_str(), if2.up), ("vmtap9", false));
            let Reply::Addresses(addrs) = ask(&mut check, &Request::Addresses)? else {
                return Err("no addresses".into());
            };
            assert!(addrs.contains(&(if1.index, "100.64.7.4".parse().map_err(|_| "ip")?)));
            // local inet6: the prefix with the guest's IPv4 address in
            // bytes 8 to 11, the host ::1 of a /96.
            let v6 = "fd00:1:2:0:6440:705::1".parse().map_err(|_| "ip")?;
            assert!(addrs.contains(&(if1.index, v6)), "{addrs:?}");
            assert_eq!(net.vm_taps(7)?.len(), 3);
            let saved = state::state_load(&net.state_path)
                .map_err(|e| e.to_string())?
                .ok_or("no state")?;
            assert_eq!(saved.taps.len(), 3);
            assert_eq!(saved.bridges, vec![("brt0".to_string(), bridge.index)]);
            // A tap name in use is refused, and nothing of the VM is kept.
            let mut clash = vm.clone();
            clash.interfaces[0].tap = Some("own0".into());
            let refused = net.vm_start(8, &clash, &globals);
            assert_eq!(
                refused,
                Err("interface 0: interface own0 exists already".to_string())
            );
            assert_eq!(net.vm_status(8), None);

            // vmd crashes: its taps die with it; the next one removes the
            // bridge it made and leaves the one that existed before.
            let Net { nl, .. } = net;
            drop(nl);
            let mut net = Net::new(poll.registry(), Token(2), Token(4), socket, &dir);
            settle(&mut poll, &mut net)?;
            assert_eq!(link(&mut check, "brt0")?, None);
            assert!(link(&mut check, "brpre")?.is_some());
            // Its switches again: brt0 is made, brpre used as it is.
            net.set_switches(&config.switches, false);
            settle(&mut poll, &mut net)?;
            assert!(link(&mut check, "brt0")?.is_some());
            // Deleted by hand, made again by `reset switches`.
            let brt0 = link(&mut check, "brt0")?.ok_or("brt0")?;
            assert_eq!(ask(&mut check, &Request::DelLink(brt0.index))?, Reply::Ack);
            net.set_switches(&config.switches, true);
            settle(&mut poll, &mut net)?;
            assert!(link(&mut check, "brt0")?.is_some());
            // A clean stop removes brt0 and the state file, not brpre.
            net.stop();
            settle(&mut poll, &mut net)?;
            assert!(net.is_idle());
            assert_eq!(link(&mut check, "brt0")?, None);
            assert!(link(&mut check, "brpre")?.is_some());
            assert!(!net.state_path.exists());
            let _ = std::fs::remove_dir_all(&dir);
            Ok(())
        });
    }

    /// Plays the parent's loop until `done(net)`: netlink (token 1), nft's
    /// helper (token 3), its deadline and reaping its pid.
    fn settle_all(
        poll: &mut mio::Poll,
        net: &mut Net,
        done: impl Fn(&Net) -> bool,
    ) -> Result<(), String> {
        use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut events = mio::Events::with_capacity(8);
        while !done(net) {
            if Instant::now() > deadline {
                return Err("netlink or nft did not finish within 60s".into());
            }
            poll.poll(&mut events, Some(Duration::from_millis(100)))
                .map_err(|e| e.to_string())?;
            for e in events.iter() {
                match e.token() {
                    Token(1) => net.handle_event(),
                    Token(3) => net.nft_event(),
                    _ => {}
                }
            }
            net.nft_tick();
            if let Some(pid) = net.nft.pid() {
                if let Ok(status) = waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                    if status != WaitStatus::StillAlive {
                        net.nft_reaped(pid);
                    }
                }
            }
        }
        Ok(())
    }

    fn nft_json(args: &[&str]) -> Option<String> {
        let out = std::process::Command::new(nft::NFT_PROGRAM)
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    #[test]
    fn locks_groups_and_rdomains_in_a_netns() {
        in_new_netns(|| {
            let dir = std::env::temp_dir().join(format!("vmd-net-lock-{}", std::process::id()));
            let socket = Path::new("/tmp/vmd-net-lock-test.sock");
            let text = "switch \"sw\" { interface brl0\n locked lladdr\n group default }\n\
                vm \"a\" { interface { switch \"sw\" }\n interface { locked lladdr, group default } }\n\
                vm \"b\" { interface { rdomain 5 } }\n\
                vm \"c\" { interface { switch \"sw\", rdomain 6 } }\n";
            let config = parse_str("t.conf", text, &[])
                .map_err(|e| format!("{e:?}"))?
                .config;
            let mut poll = mio::Poll::new().map_err(|e| e.to_string())?;
            let mut net = Net::new(poll.registry(), Token(1), Token(3), socket, &dir);
            net.set_switches(&config.switches, false);
            settle_all(&mut poll, &mut net, |n| n.is_idle())?;
            let globals = Globals::default();
            let with_macs = |vm: &VmConfig| {
                let mut vm = vm.clone();
                for (i, iface) in vm.interfaces.iter_mut().enumerate() {
                    iface.lladdr = Some(common::net::generated_mac(i, [3, 4]));
                }
                vm
            };
            let a = with_macs(&config.vms[0]);
            net.vm_start(7, &a, &globals)?;
            settle_all(&mut poll, &mut net, |n| {
                n.vm_status(7) != Some(NetStatus::Pending)
            })?;
            assert_eq!(net.vm_status(7), Some(NetStatus::Ready));
            let taps: Vec<String> = net.vms[0].taps.iter().map(|t| t.tap.name.clone()).collect();
            let table = net.nft.table().to_string();
            for tap in &taps {
                let chain = nft_json(&[
                    "-j",
                    "list",
                    "chain",
                    "netdev",
                    &table,
                    &format!("lock-{tap}"),
                ])
                .ok_or(format!("no chain lock-{tap}"))?;
                let mac = if tap == &taps[0] {
                    "fe:e1:bb:d1:03:04"
                } else {
                    "fe:e1:bb:d2:03:04"
                };
                assert!(chain.contains(mac), "{chain}");
            }
            assert!(
                state::state_load(&net.state_path)
                    .map_err(|e| e.to_string())?
                    .ok_or("no state")?
                    .nft
            );
            // An interface's rdomain other than its switch's is refused at once.
            let refused = net.vm_start(9, &with_macs(&config.vms[2]), &globals);
            assert!(
                refused
                    .as_ref()
                    .is_err_and(|e| e.contains("rdomain 6, but switch \"sw\" is in rdomain 0")),
                "{refused:?}"
            );
            // rdomain 5: a VRF with table 1005, or this kernel's reason.
            net.vm_start(8, &with_macs(&config.vms[1]), &globals)?;
            settle_all(&mut poll, &mut net, |n| {
                n.vm_status(8) != Some(NetStatus::Pending)
            })?;
            let mut check = Netlink::open().map_err(|e| e.to_string())?;
            match net.vm_status(8) {
                Some(NetStatus::Ready) => {
                    let vrf = link(&mut check, "rdomain5")?.ok_or("no rdomain5")?;
                    assert_eq!(vrf.kind.as_deref(), Some("vrf"));
                    let tap = net.vms[1].taps[0].tap.ifindex;
                    let Reply::Link(tap) = ask(&mut check, &Request::LinkByIndex(tap))? else {
                        return Err("no tap".into());
                    };
                    assert_eq!(tap.master, Some(vrf.index));
                }
                other => {
                    let why = links_error(
                        &LinkRequest::NewVrf {
                            name: "rdomain5".into(),
                            table: 1005,
                        },
                        Errno::EOPNOTSUPP,
                    );
                    assert!(
                        matches!(&other, Some(NetStatus::Failed(e)) if e.contains(&why)),
                        "{other:?}"
                    );
                }
            }
            net.vm_release(8);
            net.vm_release(7);
            settle_all(&mut poll, &mut net, |n| n.is_idle())?;
            for tap in &taps {
                let chain = nft_json(&["list", "chain", "netdev", &table, &format!("lock-{tap}")]);
                assert_eq!(chain, None, "lock-{tap} outlived its VM");
            }
            net.stop();
            settle_all(&mut poll, &mut net, |n| n.is_idle())?;
            assert_eq!(nft_json(&["list", "table", "netdev", &table]), None);
            assert_eq!(link(&mut check, "rdomain5")?, None);
            assert!(!net.state_path.exists());
            // A crash with a locked VM: its successor drops the table
            // before its VMs go on (on Linux >= 6.16 the chains outlive
            // the taps).
            let mut net = Net::new(poll.registry(), Token(1), Token(3), socket, &dir);
            net.set_switches(&config.switches, false);
            net.vm_start(10, &a, &globals)?;
            settle_all(&mut poll, &mut net, |n| {
                n.vm_status(10) != Some(NetStatus::Pending)
            })?;
            assert_eq!(net.vm_status(10), Some(NetStatus::Ready));
            assert!(nft_json(&["list", "table", "netdev", &table]).is_some());
            drop(net);
            let mut net = Net::new(poll.registry(), Token(1), Token(3), socket, &dir);
            assert!(net.nft_startup.is_some());
            settle_all(&mut poll, &mut net, |n| n.is_idle())?;
            assert_eq!(nft_json(&["list", "table", "netdev", &table]), None);
            net.stop();
            settle_all(&mut poll, &mut net, |n| n.is_idle())?;
            assert!(!net.state_path.exists());
            let _ = std::fs::remove_dir_all(&dir);
            Ok(())
        });
    }
}
