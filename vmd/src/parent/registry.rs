//! The VM registry (parent): every VM vmd knows, from vm.conf (and `vmctl
//! load`) or started by vmctl, with its id, state and owner, and the rules
//! of who may do what to it.
//!
//! vmids are claimed per (name, owner uid) and reused: a VM removed by a
//! reload and added again gets its old id back. States follow OpenBSD's
//! vmd: stopped, waiting (for a staggered start), running, paused,
//! stopping. A VM defined in a configuration file stays listed after it
//! stops; one started only by vmctl is removed when it ends.
//!
//! The VM backend is a trait object ([`Backend`], backend.rs; launch.rs
//! is the real one, the unit tests below use a fake) that the registry
//! calls at three functions and nowhere else: [`Registry::launch`],
//! [`Registry::backend_stop`] and [`Registry::backend_command`]. A start
//! is two-phase: the VM runs (state running) as soon as the backend took
//! it, and the parent reports what follows: [`Registry::launched`] (its
//! process and tty), [`Registry::guest_running`],
//! [`Registry::command_done`] (pause, unpause) and its end, or a launch
//! that failed, with [`Registry::ended`]. The parent's loop reaches the
//! backend only for its events, timers and reaped pids
//! ([`Registry::backend`]). Without a backend they fail with
//! [`BACKEND_MISSING`]: nothing pretends to run.
//!
//! A graceful stop presses the guest's power button and gives it the
//! VM's `shutdown timeout`; [`Registry::expire_stops`] forces the VMs
//! whose time is up. A guest that resets itself is started again (same
//! vmid, settings, tty and console log) unless a stop was asked for or
//! the start rate limit refuses it.
//!
//! Each change of a VM's life is also an [`Event`] for `vmctl events`,
//! made where the change happens here and taken by the parent
//! ([`Registry::take_events`]), which sends it to control.

use crate::log::{log_debug, log_info, log_warn};
use crate::parent::backend::{Backend, Incoming, Requester, VmEnded};
use common::config::{Config, Globals, Owner, SwitchConfig, VmConfig, DEFAULT_STAGGERED_DELAY};
use common::ctl::{Credentials, CtlError, ResetWhat, StartRequest, VmTarget};
use common::event::{EndReason, Event, EventKind};
use common::imsg::VmCommand;
use common::name::check_vm_name;
use common::size;
use common::status::{VmInfo, VmState};
use nix::errno::Errno;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

/// What start, stop, pause and unpause answer until the VM backend lands.
pub const BACKEND_MISSING: &str = "the VM backend is not built yet";
/// A VM started this many times in a row, each within START_RATE_WINDOW
/// of the last, is refused (VM_START_RATE_LIMIT).
const START_RATE_LIMIT: u32 = 3;
/// VM_START_RATE_SEC.
const START_RATE_WINDOW: Duration = Duration::from_secs(6);

/// The start rate window: START_RATE_WINDOW, or in a test build the
/// window a regress case sets, so that its guest's boot time (slow on a
/// busy machine) cannot decide whether the limit fires.
fn start_rate_window() -> Duration {
    #[cfg(feature = "test-triggers")]
    return crate::trigger::start_rate_window().unwrap_or(START_RATE_WINDOW);
    #[cfg(not(feature = "test-triggers"))]
    START_RATE_WINDOW
}

/// One VM vmd knows.
#[derive(Debug)]
pub struct Vm {
    pub vmid: u32,
    /// Its settings as configured (an instance's merged with its template's).
    pub config: VmConfig,
    /// The settings it runs with, while it runs (a reload leaves them be).
    pub running: Option<VmConfig>,
    /// Defined in a configuration file: listed even when stopped.
    pub from_config: bool,
    pub state: VmState,
    /// The VM process and its tty, while it runs.
    pub pid: Option<u32>,
    pub tty: Option<String>,
    /// Who started it, while it runs (may differ from the configured owner).
    pub started_by: Option<u32>,
    /// Whose credentials opened its files, while it runs (for a restart).
    requester: Option<Requester>,
    /// A graceful stop forces it at this time.
    stop_deadline: Option<Instant>,
    /// A graceful stop had to force it.
    timed_out: bool,
    last_start: Option<Instant>,
    fast_starts: u32,
    /// When it was launched, while it runs (for `stats`).
    pub started_at: Option<Instant>,
    /// vmd was asked to end it at once (`stop -f`, `reset`).
    forced: bool,
    /// Started by `vmctl receive` and not running yet: its first run is
    /// announced as `received`.
    received: bool,
}

impl Vm {
    fn new(vmid: u32, config: VmConfig, from_config: bool) -> Vm {
        Vm {
            vmid,
            config,
            running: None,
            from_config,
            state: VmState::Stopped,
            pid: None,
            tty: None,
            started_by: None,
            requester: None,
            stop_deadline: None,
            timed_out: false,
            last_start: None,
            fast_starts: 0,
            started_at: None,
            forced: false,
            received: false,
        }
    }

    fn name(&self) -> &str {
        &self.config.name
    }

    /// Whether `creds` may start, stop, pause, unpause or wait for it: root,
    /// the user who started it (while it runs) or else its configured
    /// owner, or a member of its owner group.
    pub fn permits(&self, creds: &Credentials) -> bool {
        if creds.is_root() {
            return true;
        }
        let user = match (self.state.is_active(), self.started_by) {
            (true, Some(uid)) => uid,
            _ => self.config.owner.uid,
        };
        user == creds.uid || self.config.owner.gid.is_some_and(|g| creds.in_group(g))
    }

    fn info(&self) -> VmInfo {
        let settings = self.running.as_ref().unwrap_or(&self.config);
        let active = self.state.is_active();
        VmInfo {
            id: self.vmid,
            name: self.config.name.clone(),
            state: self.state,
            pid: self.pid.filter(|_| active),
            vcpus: settings.vcpu_count(),
            max_memory: settings.memory_bytes(),
            // Filled in from the backend by Registry::status.
            cur_memory: None,
            tty: self.tty.clone().filter(|_| active),
            owner_uid: self
                .started_by
                .filter(|_| active)
                .unwrap_or(settings.owner.uid),
            owner_gid: settings.owner.gid,
        }
    }
}

/// What became of a VM whose process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// It rebooted and runs again: nobody waiting for it is told.
    Restarted,
    /// It has terminated; `timed_out`: a graceful stop had to force it.
    Terminated { timed_out: bool },
}

#[derive(Default)]
pub struct Registry {
    vms: Vec<Vm>,
    /// Every (name, owner uid) ever registered and its vmid.
    known: Vec<(String, u32, u32)>,
    last_vmid: u32,
    pub switches: Vec<SwitchConfig>,
    pub globals: Globals,
    /// The MACs vmd made up for each VM id's interfaces (those without
    /// `lladdr`), so a VM keeps them across its restarts.
    macs: Vec<(u32, Vec<[u8; 6]>)>,
    next_batch: Option<Instant>,
    /// What runs the VMs (None: nothing pretends to run).
    backend: Option<Box<dyn Backend>>,
    /// `vmctl receive`'s stream, for the launch of the VM it starts.
    incoming: Option<Incoming>,
    /// The host's MemTotal for the unit tests; `None` reads
    /// /proc/meminfo at each start.
    host_memory: Option<u64>,
    /// Lifecycle events not yet taken by the parent.
    events: Vec<Event>,
}

/// The least memory kept for the host itself: VMs get MemTotal less an
/// eighth of it, and less at least this.
const HOST_RESERVE_MIN: u64 = 512 << 20;

/// The host's MemTotal in bytes, from /proc/meminfo (procfs answers at
/// once: reading it never waits).
fn host_mem_total() -> Result<u64, String> {
    let text = std::fs::read_to_string("/proc/meminfo")
        .map_err(|e| format!("cannot read /proc/meminfo: {e}"))?;
    text.lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .map(|kb| kb.saturating_mul(1024))
        .ok_or_else(|| "no MemTotal in /proc/meminfo".to_string())
}

/// What the host allows all VMs together: MemTotal less a reserve of an
/// eighth of it, at least HOST_RESERVE_MIN.
fn host_allows(total: u64) -> u64 {
    total.saturating_sub((total / 8).max(HOST_RESERVE_MIN))
}

/// Two random bytes (a generated MAC's last two), from getrandom(2),
/// which does not wait once the system has booted.
fn random_pair() -> [u8; 2] {
    let mut bytes = [0u8; 2];
    // SAFETY: getrandom writes at most two bytes into the buffer we own.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), 2, 0) };
    if n != 2 {
        // Never expected; the time still differs from call to call.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        bytes = [(nanos >> 8) as u8, nanos as u8];
    }
    bytes
}

fn errno(e: Errno) -> CtlError {
    CtlError::errno(e)
}

/// `e` with the daemon's reason for it.
fn explained(e: Errno, why: impl Into<String>) -> CtlError {
    CtlError::explained(e, why)
}

impl Registry {
    #[cfg(test)]
    pub fn new() -> Registry {
        Registry::default()
    }

    pub fn with_backend(backend: Box<dyn Backend>) -> Registry {
        Registry {
            backend: Some(backend),
            ..Registry::default()
        }
    }

    /// The backend, for the parent's loop: its events, reaped pids and
    /// timers, and the daemon's end.
    pub fn backend(&mut self) -> Option<&mut (dyn Backend + 'static)> {
        self.backend.as_deref_mut()
    }

    pub fn backend_ref(&self) -> Option<&(dyn Backend + 'static)> {
        self.backend.as_deref()
    }

    fn find(&self, target: &VmTarget) -> Option<usize> {
        self.vms
            .iter()
            .position(|vm| target.matches(vm.vmid, vm.name()))
    }

    fn by_name(&self, name: &str) -> Option<usize> {
        self.vms.iter().position(|vm| vm.name() == name)
    }

    /// The vmid of (name, uid), the same one every time.
    fn claim_id(&mut self, name: &str, uid: u32) -> Result<u32, CtlError> {
        if let Some((_, _, id)) = self.known.iter().find(|(n, u, _)| n == name && *u == uid) {
            return Ok(*id);
        }
        let Some(id) = self.last_vmid.checked_add(1) else {
            log_warn!("too many vms");
            return Err(explained(Errno::ENOSPC, "too many vms"));
        };
        self.last_vmid = id;
        self.known.push((name.to_string(), uid, id));
        Ok(id)
    }

    // --- configuration ---

    /// Adds a configuration's VMs and switches (`load`); with `reload`,
    /// first removes every VM that is not running and takes the file's
    /// switches and global settings. VMs already known by name are left as
    /// they are, so running VMs keep the settings they started with.
    /// Returns a warning for each VM skipped (for `load`, also those whose
    /// name exists; a reload keeps running VMs as documented).
    pub fn apply(&mut self, config: &Config, reload: bool) -> Vec<String> {
        let mut skipped = Vec::new();
        if reload {
            self.vms.retain(|vm| vm.state.is_active());
            self.switches.clear();
            self.globals = config.globals.clone();
        }
        for vm in &config.vms {
            let parent = vm.instance_of.as_deref().and_then(|p| config.vm(p));
            if let Some(what) = parent.and_then(|p| vm.reuses_exclusive(&config.resolved_vm(p))) {
                skipped.push(format!(
                    "vm \"{}\" ({}): {what} cannot be reused; skipped",
                    vm.name, vm.source
                ));
                continue;
            }
            let resolved = config.resolved_vm(vm);
            if let Some(i) = self.by_name(&resolved.name) {
                let vm = &mut self.vms[i];
                if vm.state == VmState::Stopping && !vm.from_config {
                    // A VM reset (or started from vmctl) is ending: the
                    // configured one stays listed when it has.
                    log_debug!("vm {} takes the configuration once it ended", vm.vmid);
                    vm.config = resolved;
                    vm.from_config = true;
                    continue;
                }
                let why = if self.vms[i].state.is_active() {
                    "is running"
                } else {
                    "already exists"
                };
                log_debug!("vm {} skipped ({why})", resolved.name);
                if !reload {
                    skipped.push(format!(
                        "vm \"{name}\" ({}): skipped: vm {name} {why}",
                        resolved.source,
                        name = resolved.name
                    ));
                }
                continue;
            }
            let vmid = match self.claim_id(&resolved.name, resolved.owner.uid) {
                Ok(vmid) => vmid,
                Err(_) => continue,
            };
            let mut entry = Vm::new(vmid, resolved, true);
            if entry.config.enabled {
                entry.state = VmState::Waiting;
            }
            log_debug!("registered vm {} ({})", vmid, entry.name());
            self.vms.push(entry);
        }
        for sw in &config.switches {
            if !self.switches.iter().any(|s| s.name == sw.name) {
                self.switches.push(sw.clone());
            }
        }
        if let Some(backend) = self.backend.as_mut() {
            backend.set_switches(&self.switches, false);
        }
        self.next_batch = Some(Instant::now());
        skipped
    }

    /// `vmctl reset`: forgets VMs (terminating running ones) and/or
    /// switches.
    pub fn reset(&mut self, what: ResetWhat) {
        if matches!(what, ResetWhat::All | ResetWhat::Vms) {
            for i in 0..self.vms.len() {
                if self.vms[i].state.is_active() {
                    if let Err(e) = self.backend_stop(i, true) {
                        log_warn!("{}: cannot terminate: {}", self.vms[i].name(), e.describe());
                    }
                    // As for stop -f: a reboot under way is not restarted.
                    let vm = &mut self.vms[i];
                    vm.state = VmState::Stopping;
                    vm.stop_deadline = None;
                    vm.timed_out = false;
                    vm.forced = true;
                    let event =
                        Event::now(vm.vmid, vm.name(), EventKind::Stopping { forced: true });
                    self.events.push(event);
                }
            }
            // A VM being terminated stays listed (its id taken) until its
            // end is reported, then goes like a vmctl-only VM.
            self.vms.retain(|vm| vm.state.is_active());
            for vm in &mut self.vms {
                vm.from_config = false;
            }
            self.next_batch = None;
        }
        if matches!(what, ResetWhat::All | ResetWhat::Switches) {
            // Every switch's settings again (a bridge deleted by hand is
            // made again), as configured.
            if let Some(backend) = self.backend.as_mut() {
                backend.set_switches(&self.switches, true);
            }
        }
    }

    // --- events ---

    /// The lifecycle events since the last call, oldest first.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    fn event(&mut self, index: usize, kind: EventKind) {
        let vm = &self.vms[index];
        self.events.push(Event::now(vm.vmid, vm.name(), kind));
    }

    /// An event of vmd itself (the configuration's: no VM).
    pub fn daemon_event(&mut self, kind: EventKind) {
        self.events.push(Event::now(0, "", kind));
    }

    /// The VMs `target` names (None: all), as `status` lists them.
    pub fn vms<'a>(&'a self, target: Option<&'a VmTarget>) -> impl Iterator<Item = &'a Vm> {
        let active = self.vms.iter().filter(|vm| vm.state.is_active());
        let rest = self.vms.iter().filter(|vm| !vm.state.is_active());
        active
            .chain(rest)
            .filter(move |vm| target.is_none_or(|t| t.matches(vm.vmid, vm.name())))
    }

    // --- status ---

    /// Every VM: running ones first, then the others, each in the order
    /// they were registered.
    pub fn status(&self) -> Vec<VmInfo> {
        let active = self.vms.iter().filter(|vm| vm.state.is_active());
        let rest = self.vms.iter().filter(|vm| !vm.state.is_active());
        active
            .chain(rest)
            .map(|vm| {
                let mut info = vm.info();
                if vm.state.is_active() {
                    // The guest processes' resident memory, not the relay's.
                    info.cur_memory = self
                        .backend
                        .as_ref()
                        .and_then(|b| b.info(vm.vmid))
                        .and_then(|run| run.cur_memory);
                }
                info
            })
            .collect()
    }

    // --- start ---

    /// `vmctl start`: an existing VM by name or id, a new instance of a
    /// template, or (root only) a brand-new VM.
    pub fn start(&mut self, req: &StartRequest, creds: &Credentials) -> Result<u32, CtlError> {
        // vmctl checks these too, but any client may write to the socket.
        if let Err(why) = req.vm.check_limits() {
            log_warn!("start request from uid {}: {why}", creds.uid);
            return Err(explained(Errno::EINVAL, why));
        }
        let index = match self.find(&req.target) {
            Some(i) => {
                self.check_permitted(i, creds)?;
                let vm = &self.vms[i];
                if vm.state.is_active() {
                    let why = match vm.state {
                        VmState::Stopping => format!("vm {} is still stopping", vm.name()),
                        _ => format!("vm {} is already running", vm.name()),
                    };
                    return Err(explained(Errno::EALREADY, why));
                }
                // As OpenBSD's vmd: a configured VM starts as configured,
                // only its boot image (and here boot device) may differ.
                if req.sets_more_than_boot() {
                    let why = format!(
                        "vm {} is defined in {}: only -b and -B may change it",
                        vm.name(),
                        config_file(&vm.config.source)
                    );
                    return Err(explained(Errno::EALREADY, why));
                }
                i
            }
            None => self.start_register(req, creds)?,
        };
        let mut settings = self.vms[index].config.clone();
        if let Some(boot) = &req.vm.boot {
            settings.boot = Some(boot.clone());
        }
        if let Some(device) = req.vm.boot_device {
            settings.boot_device = Some(device);
        }
        // What the requester named is opened with its rights, the rest
        // (root's configuration, a template's files) as root.
        let vm = &req.vm;
        let named = vm
            .boot
            .iter()
            .chain(&vm.initrd)
            .chain(&vm.cdrom)
            .chain(vm.disks.iter().map(|d| &d.path))
            .cloned()
            .collect();
        let requester = Requester {
            uid: creds.uid,
            gid: creds.gid,
            groups: creds.groups.clone(),
            named,
        };
        let result = self.start_vm(index, settings, creds.uid, &requester);
        if result.is_err() && !self.vms[index].from_config {
            self.vms.remove(index);
        }
        result
    }

    /// Registers a new VM for `start`, checking who may create it.
    fn start_register(
        &mut self,
        req: &StartRequest,
        creds: &Credentials,
    ) -> Result<usize, CtlError> {
        let VmTarget::Name(name) = &req.target else {
            return Err(CtlError::not_found());
        };
        // `start NAME` alone names a VM that should exist.
        if req.vm.instance_of.is_none() && req.vm.boot.is_none() && !req.sets_more_than_boot() {
            return Err(CtlError::not_found());
        }
        let mut vm = req.vm.clone();
        vm.name = name.clone();
        if let Some(template) = &req.vm.instance_of {
            vm = self.start_instance(vm, template, creds)?;
        } else if !creds.is_root() {
            log_warn!("{name}: uid {} may not create a new vm", creds.uid);
            let why =
                format!("vm {name} is not defined: only root may create a vm without -t template");
            return Err(explained(Errno::EPERM, why));
        } else {
            vm.owner = Owner::default();
        }
        if let Err(e) = check_vm_name(&vm.name) {
            log_warn!("{}: {e}", vm.name);
            return Err(explained(Errno::EINVAL, e.to_string()));
        }
        if vm.boot.is_none() && vm.disks.is_empty() && vm.cdrom.is_none() {
            log_warn!("{}: no kernel or disk/cdrom specified", vm.name);
            return Err(explained(
                Errno::EINVAL,
                "no kernel or disk/cdrom specified",
            ));
        }
        vm.enabled = true;
        vm.source = String::from("vmctl");
        let vmid = self.claim_id(&vm.name, vm.owner.uid)?;
        log_debug!("registered vm {vmid} ({})", vm.name);
        self.vms.push(Vm::new(vmid, vm, false));
        Ok(self.vms.len() - 1)
    }

    /// An instance of `template` (`vmctl start NAME -t PARENT`): it
    /// inherits the parent's settings but the exclusive ones (disks,
    /// lladdr, tap names). For a user other than root, the parent's `allow
    /// instance` says who may create one (else `invalid template`) and what
    /// it may change.
    fn start_instance(
        &self,
        mut vm: VmConfig,
        template: &str,
        creds: &Credentials,
    ) -> Result<VmConfig, CtlError> {
        let name = vm.name.clone();
        let Some(parent) = self.by_name(template).map(|i| &self.vms[i].config) else {
            log_warn!("vm \"{name}\": no template named \"{template}\"");
            return Err(CtlError::TemplateInvalid);
        };
        if self.by_name(&name).is_some() {
            return Err(explained(
                Errno::EALREADY,
                format!("vm {name} already exists"),
            ));
        }
        if !creds.is_root() {
            let allow = &parent.allow_instance;
            if !allow
                .owner
                .as_ref()
                .is_some_and(|o| owner_matches(o, creds))
            {
                log_warn!(
                    "vm \"{name}\": uid {} may not create instances of \"{template}\"",
                    creds.uid
                );
                return Err(CtlError::TemplateInvalid);
            }
            if let Some(what) = instance_forbidden_change(&vm, parent) {
                log_warn!("vm \"{name}\": no permission to set {what}");
                return Err(explained(
                    Errno::EPERM,
                    format!("the template {template} does not allow changing {what}"),
                ));
            }
        }
        if let Some(what) = vm.reuses_exclusive(parent) {
            log_warn!("vm \"{name}\": {what} cannot be reused");
            return Err(explained(
                Errno::EBUSY,
                format!("{what} of {template} cannot be reused"),
            ));
        }
        // Root's instance belongs to the parent's owner, a user's to it.
        vm.owner = Owner {
            uid: creds.uid,
            ..Owner::default()
        };
        Ok(vm.inherit_from(parent))
    }

    /// Refuses a start of VM `index` with `settings` by `uid` beyond what
    /// the host allows VMs (all of this daemon's running VMs' memory) or
    /// the limits of `uid` (vm.conf(5) LIMITS). The VM itself is not
    /// counted as running (a reboot starts it again).
    fn check_resources(&self, index: usize, settings: &VmConfig, uid: u32) -> Result<(), CtlError> {
        let me = &self.vms[index];
        let name = me.name();
        let others: Vec<&VmConfig> = self
            .vms
            .iter()
            .filter(|vm| vm.vmid != me.vmid)
            .filter_map(|vm| vm.running.as_ref())
            .collect();
        let memory = settings.memory_bytes();
        let running: u64 = others.iter().map(|vm| vm.memory_bytes()).sum();
        let total = match self.host_memory {
            Some(total) => total,
            None => host_mem_total().map_err(|why| explained(Errno::EIO, why))?,
        };
        let allowed = host_allows(total);
        if memory.saturating_add(running) > allowed {
            let why = format!(
                "vm {name}: {} of memory and {} running exceed what this host allows VMs ({} of {}; see vm.conf(5) LIMITS)",
                size::format(memory),
                size::format(running),
                size::format(allowed),
                size::format(total)
            );
            log_warn!("{why}");
            return Err(explained(Errno::ENOMEM, why));
        }
        let limits = self.globals.limits_for(uid);
        // What `uid` runs: the VMs it started, while they run.
        let theirs: Vec<&VmConfig> = self
            .vms
            .iter()
            .filter(|vm| vm.vmid != me.vmid && vm.started_by == Some(uid))
            .filter_map(|vm| vm.running.as_ref())
            .collect();
        let user = &limits.user;
        let used_memory: u64 = theirs.iter().map(|vm| vm.memory_bytes()).sum();
        let used_vcpus: u32 = theirs.iter().map(|vm| vm.vcpu_count()).sum();
        let refusal = if let Some(l) = limits.vms.filter(|l| theirs.len() >= l.value as usize) {
            Some(format!(
                "vm {name}: user {user} may run at most {} VMs ({})",
                l.value, l.from
            ))
        } else if let Some(l) = limits
            .memory
            .filter(|l| used_memory.saturating_add(memory) > l.value)
        {
            Some(format!(
                "vm {name}: user {user} may use at most {} of memory, {} running ({})",
                size::format(l.value),
                size::format(used_memory),
                l.from
            ))
        } else if let Some(l) = limits
            .vcpus
            .filter(|l| used_vcpus.saturating_add(settings.vcpu_count()) > l.value)
        {
            Some(format!(
                "vm {name}: user {user} may use at most {} vCPUs, {used_vcpus} running ({})",
                l.value, l.from
            ))
        } else {
            None
        };
        match refusal {
            Some(why) => {
                log_warn!("{why}");
                Err(explained(Errno::EPERM, why))
            }
            None => Ok(()),
        }
    }

    /// Applies the start rate limit, then launches: the VM runs from now
    /// on (its pid and tty come with [`Registry::launched`]; a launch
    /// that fails later ends it, [`Registry::ended`]).
    /// `uid` is who starts it (the VM's user while it runs, owner of its
    /// tty); `requester` whose credentials open its files.
    fn start_vm(
        &mut self,
        index: usize,
        settings: VmConfig,
        uid: u32,
        requester: &Requester,
    ) -> Result<u32, CtlError> {
        self.check_resources(index, &settings, uid)?;
        let now = Instant::now();
        let vm = &mut self.vms[index];
        if let Some(last) = vm.last_start {
            if now.duration_since(last) < start_rate_window() {
                vm.fast_starts += 1;
            } else {
                vm.fast_starts = 0;
            }
            if vm.fast_starts >= START_RATE_LIMIT {
                log_warn!("{}: vm {} restarted too quickly", vm.name(), vm.vmid);
                let why = format!("vm {} restarted too quickly: try again later", vm.name());
                return Err(explained(Errno::EPERM, why));
            }
        }
        vm.last_start = Some(now);
        vm.state = VmState::Stopped;
        let vmid = vm.vmid;
        let settings = match self.net_settings(vmid, settings) {
            Ok(settings) => settings,
            Err(e) => {
                log_warn!(
                    "{}: failed to start vm {vmid}: {}",
                    self.vms[index].name(),
                    e.describe()
                );
                return Err(e);
            }
        };
        match self.launch(vmid, &settings, uid, requester) {
            Ok(()) => {
                let vm = &mut self.vms[index];
                log_debug!("starting {} (vm {vmid})", vm.name());
                vm.state = VmState::Running;
                vm.pid = None;
                vm.started_by = Some(uid);
                vm.requester = Some(requester.clone());
                vm.stop_deadline = None;
                vm.timed_out = false;
                vm.forced = false;
                vm.started_at = Some(Instant::now());
                vm.running = Some(settings);
                self.event(index, EventKind::Started);
                Ok(vmid)
            }
            Err(e) => {
                log_warn!(
                    "{}: failed to start vm {vmid}: {}",
                    self.vms[index].name(),
                    e.describe()
                );
                Err(e)
            }
        }
    }

    /// VM `vmid` was launched: its VM process and tty.
    pub fn launched(&mut self, vmid: u32, pid: u32, tty: String) {
        if let Some(vm) = self.vms.iter_mut().find(|vm| vm.vmid == vmid) {
            log_debug!("{}: vm {vmid} launched (pid {pid}, tty {tty})", vm.name());
            vm.pid = Some(pid);
            vm.tty = Some(tty);
        }
    }

    /// VM `vmid`'s tty, once it was launched.
    pub fn tty(&self, vmid: u32) -> Option<String> {
        let vm = self.vms.iter().find(|vm| vm.vmid == vmid)?;
        vm.tty.clone()
    }

    /// VM `vmid`'s guest runs (its backend accepted its arguments and
    /// resumed it): its start, or its restart after a reboot, is done.
    pub fn guest_running(&mut self, vmid: u32) {
        if let Some(index) = self.vms.iter().position(|vm| vm.vmid == vmid) {
            let vm = &self.vms[index];
            let tty = vm.tty.as_deref().unwrap_or("-");
            log_info!("started {} (vm {vmid}) successfully, tty {tty}", vm.name());
            // A received guest's first run is its arrival.
            if std::mem::take(&mut self.vms[index].received) {
                self.event(index, EventKind::Received);
            }
            self.event(index, EventKind::Running);
        }
    }

    /// When the next staggered start batch is due, if any VM waits.
    pub fn next_batch(&self) -> Option<Instant> {
        self.next_batch
    }

    /// Starts the next `parallel` waiting VMs (staggered start) and
    /// schedules the batch after it.
    pub fn start_batch(&mut self) {
        self.next_batch = None;
        let (parallel, delay) = match self.globals.staggered_start {
            Some(s) => (s.parallel as usize, s.delay),
            None => (
                std::thread::available_parallelism().map_or(1, |n| n.get()),
                DEFAULT_STAGGERED_DELAY,
            ),
        };
        let mut started = 0;
        for index in 0..self.vms.len() {
            if self.vms[index].state != VmState::Waiting {
                continue;
            }
            if started == parallel.max(1) {
                self.next_batch = Some(Instant::now() + Duration::from_secs(delay.into()));
                return;
            }
            let settings = self.vms[index].config.clone();
            let owner = settings.owner.uid;
            // start_vm logs a failure; the VM stays listed as stopped and
            // takes no place in the batch. The configuration is root's:
            // its files are opened as root where root alone controls
            // them, else with the VM owner's rights.
            if self
                .start_vm(index, settings, owner, &Requester::root())
                .is_ok()
            {
                started += 1;
            }
        }
    }

    // --- stop, wait, pause, unpause ---

    /// The VM a stop, wait, pause or unpause names, if `creds` may act on
    /// it: permission is checked before the VM's state.
    fn find_permitted(&self, target: &VmTarget, creds: &Credentials) -> Result<usize, CtlError> {
        let index = self.find(target).ok_or_else(CtlError::not_found)?;
        self.check_permitted(index, creds)?;
        Ok(index)
    }

    /// EPERM, logged, unless `creds` may act on VM `index`.
    fn check_permitted(&self, index: usize, creds: &Credentials) -> Result<(), CtlError> {
        if self.vms[index].permits(creds) {
            return Ok(());
        }
        log_warn!(
            "{}: uid {} is not permitted",
            self.vms[index].name(),
            creds.uid
        );
        Err(errno(Errno::EPERM))
    }

    /// `vmctl stop`: asks the VM to shut down (or, with `force`, kills it).
    /// A VM already stopping needs `force`, unless the requester only
    /// `wait`s for the stop under way.
    pub fn stop(
        &mut self,
        target: &VmTarget,
        force: bool,
        wait: bool,
        creds: &Credentials,
    ) -> Result<u32, CtlError> {
        let index = self.find_permitted(target, creds)?;
        let vm = &self.vms[index];
        if vm.state == VmState::Stopping && !force {
            if wait {
                return Ok(vm.vmid);
            }
            let why = format!("vm {} is already stopping: -f forces it", vm.name());
            return Err(explained(Errno::EALREADY, why));
        }
        if !vm.state.is_active() {
            return Err(CtlError::StopInvalid);
        }
        self.backend_stop(index, force)?;
        let globals = &self.globals;
        let vm = &mut self.vms[index];
        vm.state = VmState::Stopping;
        vm.forced |= force;
        let event = Event::now(vm.vmid, vm.name(), EventKind::Stopping { forced: force });
        self.events.push(event);
        let vm = &mut self.vms[index];
        if force {
            vm.stop_deadline = None;
            log_info!("{}: vm {} forced to stop", vm.name(), vm.vmid);
        } else {
            let settings = vm.running.as_ref().unwrap_or(&vm.config);
            let timeout = settings.shutdown_timeout_or(globals);
            vm.stop_deadline = Some(Instant::now() + Duration::from_secs(timeout.into()));
            log_info!(
                "{}: vm {} requested to shut down (forced in {timeout}s)",
                vm.name(),
                vm.vmid
            );
        }
        Ok(vm.vmid)
    }

    /// The earliest time a graceful stop must be forced, if any.
    pub fn next_stop_deadline(&self) -> Option<Instant> {
        self.vms.iter().filter_map(|vm| vm.stop_deadline).min()
    }

    /// The latest time a graceful stop must be forced, if any.
    pub fn last_stop_deadline(&self) -> Option<Instant> {
        self.vms.iter().filter_map(|vm| vm.stop_deadline).max()
    }

    /// Forces every VM whose graceful stop has run out of time.
    pub fn expire_stops(&mut self) {
        let now = Instant::now();
        for index in 0..self.vms.len() {
            if self.vms[index].stop_deadline.is_none_or(|d| d > now) {
                continue;
            }
            let vm = &mut self.vms[index];
            vm.stop_deadline = None;
            vm.timed_out = true;
            log_warn!(
                "{}: vm {} did not shut down in time; forcing it",
                vm.name(),
                vm.vmid
            );
            self.event(index, EventKind::Stopping { forced: true });
            if let Err(e) = self.backend_stop(index, true) {
                log_warn!(
                    "{}: cannot force it: {}",
                    self.vms[index].name(),
                    e.describe()
                );
            }
        }
    }

    /// `vmctl wait`: may `creds` wait for this VM to end? One that is not
    /// running answers StopInvalid, which vmctl reports as done.
    pub fn wait(&self, target: &VmTarget, creds: &Credentials) -> Result<u32, CtlError> {
        let index = self.find_permitted(target, creds)?;
        if !self.vms[index].state.is_active() {
            return Err(CtlError::StopInvalid);
        }
        Ok(self.vms[index].vmid)
    }

    /// Why a pause or unpause cannot be done in the VM's state.
    fn pause_refusal(&self, index: usize, pause: bool) -> Option<CtlError> {
        let vm = &self.vms[index];
        let name = vm.name();
        let why = match (vm.state, pause) {
            (VmState::Running, true) | (VmState::Paused, false) => return None,
            (VmState::Paused, true) => format!("vm {name} is already paused"),
            (VmState::Running, false) => format!("vm {name} is not paused"),
            (VmState::Stopping, _) => format!("vm {name} is stopping"),
            (VmState::Stopped | VmState::Waiting, _) => format!("vm {name} is not running"),
        };
        Some(explained(Errno::EINVAL, why))
    }

    /// `vmctl pause`: asks the backend; [`Registry::command_done`] has
    /// the answer.
    pub fn pause(&mut self, target: &VmTarget, creds: &Credentials) -> Result<u32, CtlError> {
        let index = self.find_permitted(target, creds)?;
        if let Some(refusal) = self.pause_refusal(index, true) {
            return Err(refusal);
        }
        self.backend_command(index, VmCommand::Pause, None)?;
        Ok(self.vms[index].vmid)
    }

    /// `vmctl unpause`: as pause.
    pub fn unpause(&mut self, target: &VmTarget, creds: &Credentials) -> Result<u32, CtlError> {
        let index = self.find_permitted(target, creds)?;
        if let Some(refusal) = self.pause_refusal(index, false) {
            return Err(refusal);
        }
        self.backend_command(index, VmCommand::Unpause, None)?;
        Ok(self.vms[index].vmid)
    }

    /// A command with the client's descriptor (`vmctl` -> control ->
    /// here -> the VM process) for VM `target`, if it runs;
    /// [`Registry::command_done`] has the answer.
    pub fn command_with_fd(
        &mut self,
        target: &VmTarget,
        command: VmCommand,
        fd: OwnedFd,
        creds: &Credentials,
    ) -> Result<u32, CtlError> {
        let index = self.find_permitted(target, creds)?;
        if !matches!(self.vms[index].state, VmState::Running | VmState::Paused) {
            return Err(explained(
                Errno::EINVAL,
                format!("vm {} is not running", self.vms[index].name()),
            ));
        }
        self.backend_command(index, command, Some(fd))?;
        Ok(self.vms[index].vmid)
    }

    /// `vmctl receive`: starts the new VM `req` describes (from the
    /// stream's header, [`receive_request`]) from `incoming`. A name vmd
    /// knows is refused: a received VM is always a new one.
    pub fn receive(
        &mut self,
        req: &StartRequest,
        creds: &Credentials,
        incoming: Incoming,
    ) -> Result<u32, CtlError> {
        if let Some(index) = self.find(&req.target) {
            let why = format!(
                "vm {} exists: receive it under a new name",
                self.vms[index].name()
            );
            return Err(explained(Errno::EALREADY, why));
        }
        self.incoming = Some(incoming);
        let result = self.start(req, creds);
        self.incoming = None;
        if let Ok(vmid) = result {
            if let Some(vm) = self.vms.iter_mut().find(|vm| vm.vmid == vmid) {
                vm.received = true;
            }
        }
        result
    }

    /// `vmctl send` of VM `target`: the command for its VM process,
    /// whose stream header names the VM as it runs (paths, not contents).
    pub fn send_command(
        &self,
        target: &VmTarget,
        creds: &Credentials,
    ) -> Result<(u32, VmCommand), CtlError> {
        let vm = &self.vms[self.find_permitted(target, creds)?];
        let settings = vm.running.as_ref().unwrap_or(&vm.config);
        let command = VmCommand::Send {
            vm: Box::new(stream_vm(settings)),
        };
        Ok((vm.vmid, command))
    }

    /// The backend's answer to a pause or unpause of VM `vmid`: the VM's
    /// state follows what the guest did.
    pub fn command_done(
        &mut self,
        vmid: u32,
        command: VmCommand,
        error: Option<String>,
    ) -> Result<u32, CtlError> {
        let Some(index) = self.vms.iter().position(|vm| vm.vmid == vmid) else {
            return Err(CtlError::not_found());
        };
        let vm = &mut self.vms[index];
        let (word, state) = match command {
            VmCommand::Pause => ("paused", VmState::Paused),
            VmCommand::Unpause => ("unpaused", VmState::Running),
            VmCommand::Powerdown => {
                if let Some(e) = error {
                    log_warn!("{}: vm {vmid}: the power button failed: {e}", vm.name());
                }
                return Ok(vmid);
            }
            VmCommand::Send { .. } => {
                return match error {
                    Some(e) => {
                        log_warn!("{}: vm {vmid} not sent: {e}", vm.name());
                        Err(CtlError::Text(e))
                    }
                    None => {
                        log_info!("{}: sent vm {vmid} successfully", vm.name());
                        self.event(index, EventKind::Sent);
                        Ok(vmid)
                    }
                };
            }
            VmCommand::Probe { .. } => {
                return match error {
                    Some(e) => Err(CtlError::Text(e)),
                    None => Ok(vmid),
                };
            }
        };
        if let Some(e) = error {
            log_warn!("{}: vm {vmid} not {word}: {e}", vm.name());
            return Err(CtlError::Text(e));
        }
        // A stop that came in meanwhile wins.
        if matches!(vm.state, VmState::Running | VmState::Paused) {
            vm.state = state;
        }
        log_info!("{}: {word} vm {vmid} successfully", vm.name());
        let kind = match state {
            VmState::Paused => EventKind::Paused,
            _ => EventKind::Unpaused,
        };
        self.event(index, kind);
        Ok(vmid)
    }

    /// VM `vmid`'s process ended (launch.rs has released what it held). A
    /// guest reset starts it again, unless a stop was asked for or the
    /// rate limit refuses; otherwise it has terminated.
    pub fn ended(&mut self, ended: &VmEnded) -> Ended {
        let Some(index) = self.vms.iter().position(|vm| vm.vmid == ended.id) else {
            // Forgotten meanwhile (vmctl reset).
            if let Some(backend) = self.backend.as_mut() {
                backend.discard_parked(ended.id);
            }
            return Ended::Terminated { timed_out: false };
        };
        let vm = &self.vms[index];
        if let Some(e) = &ended.launch_error {
            log_warn!(
                "{}: failed to start vm {}: {}",
                vm.name(),
                vm.vmid,
                e.describe()
            );
        }
        let timed_out = vm.timed_out;
        let why = end_reason(vm.forced || timed_out, ended);
        let restart = match (&vm.running, vm.started_by, &vm.requester) {
            (Some(settings), Some(uid), Some(req))
                if ended.is_reboot() && vm.state != VmState::Stopping =>
            {
                Some((settings.clone(), uid, req.clone()))
            }
            _ => None,
        };
        let mut outcome = Ended::Terminated { timed_out };
        if let Some((settings, uid, requester)) = restart {
            log_info!("{}: vm {} rebooting", vm.name(), vm.vmid);
            if self.start_vm(index, settings, uid, &requester).is_ok() {
                outcome = Ended::Restarted;
                // start_vm said `started`: this start is a restart.
                if let Some(event) = self.events.last_mut() {
                    event.kind = EventKind::Restarted;
                }
            } else {
                log_warn!(
                    "{}: vm {} not restarted after its reboot",
                    self.vms[index].name(),
                    ended.id
                );
            }
        }
        if let Some(backend) = self.backend.as_mut() {
            backend.discard_parked(ended.id);
        }
        if outcome != Ended::Restarted {
            self.event(index, EventKind::Stopped { why });
            self.terminated(ended.id, ended.console_log.as_deref());
        }
        outcome
    }

    /// VM `vmid` has ended: a configured VM is listed as stopped, a
    /// vmctl-started one is removed, and with it its console log unless
    /// `console log DIR keep` (a configured VM's is kept: one per name in
    /// vm.conf).
    fn terminated(&mut self, vmid: u32, console_log: Option<&std::path::Path>) {
        let Some(index) = self.vms.iter().position(|vm| vm.vmid == vmid) else {
            return;
        };
        let vm = &mut self.vms[index];
        log_info!("{}: vm {vmid} terminated", vm.name());
        if !vm.from_config {
            self.vms.remove(index);
            let keep = self.globals.console_log_keep;
            if let (Some(path), Some(backend), false) = (console_log, self.backend.as_mut(), keep) {
                backend.remove_console_log(path);
            }
            return;
        }
        vm.state = VmState::Stopped;
        vm.pid = None;
        vm.tty = None;
        vm.started_by = None;
        vm.requester = None;
        vm.stop_deadline = None;
        vm.timed_out = false;
        vm.forced = false;
        vm.started_at = None;
        vm.running = None;
    }

    /// VM `vmid`'s settings with every interface it gets (`interfaces
    /// N` padded) and a MAC for each: its `lladdr`, else the one it had
    /// before, else a new one in OpenBSD's scheme; no two running VMs
    /// share one. Refuses a switch that is not configured (OpenBSD
    /// starts the VM unattached) or is disabled.
    fn net_settings(&mut self, vmid: u32, mut settings: VmConfig) -> Result<VmConfig, CtlError> {
        settings.interfaces = settings.effective_interfaces();
        crate::parent::launch::launch_check_switches(&settings, &self.switches)
            .map_err(|(e, why)| explained(e, why))?;
        let in_use: Vec<([u8; 6], String)> = self
            .vms
            .iter()
            .filter(|vm| vm.vmid != vmid)
            .filter_map(|vm| vm.running.as_ref())
            .flat_map(|r| {
                r.interfaces
                    .iter()
                    .filter_map(|i| i.lladdr)
                    .map(|mac| (mac, r.name.clone()))
            })
            .collect();
        let kept = self
            .macs
            .iter()
            .find(|(id, _)| *id == vmid)
            .map(|(_, macs)| macs.clone())
            .unwrap_or_default();
        let mut taken: Vec<[u8; 6]> = in_use.iter().map(|(mac, _)| *mac).collect();
        taken.extend(settings.interfaces.iter().filter_map(|i| i.lladdr));
        let mut made = Vec::new();
        for (index, iface) in settings.interfaces.iter_mut().enumerate() {
            if let Some(mac) = iface.lladdr {
                if let Some((_, other)) = in_use.iter().find(|(m, _)| *m == mac) {
                    let why = format!(
                        "lladdr {} is in use by vm {other}",
                        common::config::format_lladdr(&mac)
                    );
                    return Err(explained(Errno::EADDRINUSE, why));
                }
                made.push(mac);
                continue;
            }
            let mac = kept
                .get(index)
                .copied()
                .filter(|m| common::net::is_generated_for(m, index) && !taken.contains(m))
                .unwrap_or_else(|| loop {
                    let mac = common::net::generated_mac(index, random_pair());
                    if !taken.contains(&mac) {
                        break mac;
                    }
                });
            taken.push(mac);
            iface.lladdr = Some(mac);
            made.push(mac);
        }
        self.macs.retain(|(id, _)| *id != vmid);
        self.macs.push((vmid, made));
        Ok(settings)
    }

    // --- the VM backend's entry points ---

    /// Launches VM `vmid` with `settings` for user `uid`, opening its
    /// files as `requester`: its files, tty and process (launch.rs). The one
    /// place a VM is started; every check (permissions, names, templates,
    /// rate limit) is done before it is called.
    fn launch(
        &mut self,
        vmid: u32,
        settings: &VmConfig,
        uid: u32,
        requester: &Requester,
    ) -> Result<(), CtlError> {
        let Some(backend) = self.backend.as_mut() else {
            log_debug!("launch vm {vmid} ({}): no backend", settings.name);
            return Err(CtlError::Text(BACKEND_MISSING.into()));
        };
        if let Some(incoming) = self.incoming.take() {
            backend.set_incoming(vmid, incoming);
        }
        backend.start(vmid, settings, &self.globals, requester, uid)
    }

    /// Asks the running VM at `index` to shut down (its power button), or
    /// kills it (`force`).
    fn backend_stop(&mut self, index: usize, force: bool) -> Result<(), CtlError> {
        if !force {
            return self.backend_command(index, VmCommand::Powerdown, None);
        }
        let vmid = self.vms[index].vmid;
        let Some(backend) = self.backend.as_mut() else {
            log_debug!("stop vm {vmid} (force): no backend");
            return Err(CtlError::Text(BACKEND_MISSING.into()));
        };
        if backend.force_stop(vmid) {
            Ok(())
        } else {
            Err(CtlError::StopInvalid)
        }
    }

    /// Sends the running VM at `index` a command for its guest.
    fn backend_command(
        &mut self,
        index: usize,
        command: VmCommand,
        fd: Option<OwnedFd>,
    ) -> Result<(), CtlError> {
        let vmid = self.vms[index].vmid;
        let Some(backend) = self.backend.as_mut() else {
            log_debug!("{} vm {vmid}: no backend", command.name());
            return Err(CtlError::Text(BACKEND_MISSING.into()));
        };
        let powerdown = command == VmCommand::Powerdown;
        match (backend.command(vmid, command, fd), powerdown) {
            (true, _) => Ok(()),
            // The VM process is gone (its end is on the way).
            (false, true) => Err(CtlError::StopInvalid),
            (false, _) => Err(explained(
                Errno::EINVAL,
                format!("vm {} is not running", self.vms[index].name()),
            )),
        }
    }
}

/// What a stream's header says of a VM running with `settings`: what
/// the receiving side must have (the backend adds its own facts and the
/// boot files' sizes).
fn stream_vm(settings: &VmConfig) -> common::stream::StreamVm {
    use common::stream::{StreamDisk, StreamFile, StreamInterface, StreamVm};
    let file = |path: &Option<String>| {
        path.as_ref().map(|path| StreamFile {
            path: path.clone(),
            size: 0,
        })
    };
    let kernel = file(&settings.boot);
    StreamVm {
        name: settings.name.clone(),
        memory: settings.memory_bytes(),
        vcpus: settings.vcpu_count(),
        disks: settings
            .disks
            .iter()
            .map(|d| StreamDisk {
                path: d.path.clone(),
                format: d.format,
            })
            .collect(),
        cdrom: settings.cdrom.clone(),
        interfaces: settings
            .effective_interfaces()
            .iter()
            .map(|i| StreamInterface {
                lladdr: i.lladdr.unwrap_or_default(),
                switch: i.switch.clone(),
                local: i.local,
                locked: i.locked,
            })
            .collect(),
        bios: kernel.is_none().then(|| StreamFile {
            path: crate::parent::launch::BIOS_PATH.to_string(),
            size: 0,
        }),
        kernel,
        initrd: file(&settings.initrd),
        cmdline: settings.cmdline.clone(),
        boot_device: settings.boot_device.map(|d| d.keyword().to_string()),
        owner_uid: settings.owner.uid,
        owner_gid: settings.owner.gid,
    }
}

/// `vmctl receive NAME`: the start of a new VM NAME as the stream's
/// `header` (its bytes, checked here again) describes it, or why not.
pub fn receive_request(name: &str, header: &[u8]) -> Result<StartRequest, CtlError> {
    use common::config::{Accel, Disk, Interface, Owner};
    let header = common::stream::decode_header(header)
        .map_err(|e| explained(Errno::EINVAL, e.to_string()))?;
    if header.backend != "qemu" {
        let why = format!(
            "the stream is from backend {}, which this vmd does not run",
            header.backend
        );
        return Err(explained(Errno::EINVAL, why));
    }
    check_vm_name(name).map_err(|e| explained(Errno::EINVAL, e.to_string()))?;
    let accel = match header.accel.as_str() {
        "kvm" => Accel::Kvm,
        "tcg" => Accel::Tcg,
        other => {
            let why = format!("the stream's guest ran with accel {other}, which vmd does not know");
            return Err(explained(Errno::EINVAL, why));
        }
    };
    let sent = header.vm;
    let mut vm = VmConfig::new(name);
    vm.memory = Some(sent.memory);
    vm.vcpus = Some(sent.vcpus);
    vm.accel = Some(accel);
    vm.disks = sent
        .disks
        .into_iter()
        .map(|d| Disk {
            path: d.path,
            format: d.format,
        })
        .collect();
    vm.interfaces = sent
        .interfaces
        .into_iter()
        .map(|i| Interface {
            lladdr: Some(i.lladdr),
            switch: i.switch,
            local: i.local,
            locked: i.locked,
            ..Interface::default()
        })
        .collect();
    vm.cdrom = sent.cdrom;
    vm.boot = sent.kernel.map(|f| f.path);
    vm.initrd = sent.initrd.map(|f| f.path);
    vm.cmdline = sent.cmdline;
    vm.boot_device = sent.boot_device.and_then(|word| {
        use common::config::BootDevice;
        [BootDevice::Cdrom, BootDevice::Disk, BootDevice::Net]
            .into_iter()
            .find(|d| d.keyword() == word)
    });
    vm.owner = Owner {
        uid: sent.owner_uid,
        gid: sent.owner_gid,
        ..Owner::default()
    };
    vm.check_limits()
        .map_err(|why| explained(Errno::EINVAL, format!("the stream's vm: {why}")))?;
    Ok(StartRequest {
        target: VmTarget::Name(name.to_string()),
        vm,
    })
}

/// The file a VM's `source` (`FILE:LINE`) names, for messages.
/// Why a VM ended, for its `stopped` event: `forced` if vmd ended it at
/// once (asked to, or after its shutdown timeout).
fn end_reason(forced: bool, ended: &VmEnded) -> EndReason {
    if ended.launch_error.is_some() || ended.start_failure.is_some() {
        return EndReason::Failed;
    }
    if forced {
        return EndReason::Forced;
    }
    match ended.guest_reason.as_deref() {
        Some("guest-panic") => EndReason::Crashed,
        Some(_) => EndReason::PoweredOff,
        // No word from the guest: its processes were killed (launch.rs
        // and the VM process say `killed by SIGNAL`), or they failed.
        None if ended.why.contains("killed by") && !ended.why.contains("SIGSYS") => {
            EndReason::Killed
        }
        None => EndReason::Crashed,
    }
}

fn config_file(source: &str) -> &str {
    match source.rsplit_once(':') {
        Some((file, line)) if line.bytes().all(|b| b.is_ascii_digit()) => file,
        _ => source,
    }
}

/// What an instance sets that its parent's `allow instance` does not let
/// a user change, if anything: every field a request carries is looked
/// at, and what `allow instance` cannot permit may only repeat the
/// parent's value.
fn instance_forbidden_change(vm: &VmConfig, parent: &VmConfig) -> Option<&'static str> {
    let allow = &parent.allow_instance;
    // Every field, so that a new one is decided on here.
    let VmConfig {
        // The request's own: its name, where it came from, its parent.
        name: _,
        source: _,
        instance_of: _,
        // An instance is started now either way.
        enabled: _,
        // Set by start_instance to the requester.
        owner: _,
        boot,
        boot_device,
        cdrom,
        disks,
        interfaces,
        interface_count,
        memory,
        allow_instance,
        initrd,
        cmdline,
        vcpus,
        backend,
        accel,
        shutdown_timeout,
    } = vm;
    let changes = [
        (
            memory.is_some_and(|m| m != parent.memory_bytes()),
            allow.memory,
            "memory",
        ),
        (
            vcpus.is_some_and(|n| n != parent.vcpu_count()),
            false,
            "cpus",
        ),
        (!disks.is_empty(), allow.disk, "disks"),
        (
            !interfaces.is_empty()
                || interface_count.is_some_and(|n| n != parent.interface_total()),
            allow.interface,
            "interfaces",
        ),
        (
            boot.is_some() || boot_device.is_some() || initrd.is_some() || cmdline.is_some(),
            allow.boot,
            "boot image",
        ),
        (cdrom.is_some(), allow.cdrom, "cdrom"),
        (!allow_instance.is_empty(), false, "instance permissions"),
        (
            backend.is_some_and(|b| Some(b) != parent.backend),
            false,
            "backend",
        ),
        (
            accel.is_some_and(|a| Some(a) != parent.accel),
            false,
            "accel",
        ),
        (
            shutdown_timeout.is_some_and(|t| Some(t) != parent.shutdown_timeout),
            false,
            "shutdown timeout",
        ),
    ];
    changes
        .into_iter()
        .find(|(changed, allowed, _)| *changed && !*allowed)
        .map(|(_, _, what)| what)
}

/// Whether `creds` is the user of `owner`, or in its group.
fn owner_matches(owner: &Owner, creds: &Credentials) -> bool {
    let user = (owner.user.is_some() || owner.uid != 0) && owner.uid == creds.uid;
    user || owner.gid.is_some_and(|g| creds.in_group(g))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parent::backend::RunInfo;
    use common::config::parse_str;
    use std::cell::RefCell;
    use std::rc::Rc;

    fn user(uid: u32, gid: u32, groups: &[u32]) -> Credentials {
        Credentials {
            pid: 1,
            uid,
            gid,
            groups: groups.to_vec(),
        }
    }

    fn registry(text: &str) -> Registry {
        let loaded = parse_str("test.conf", text, &[]).expect("config parses");
        let mut r = Registry::new();
        r.host_memory = Some(64 << 30);
        r.apply(&loaded.config, true);
        r
    }

    /// What the fake backend was asked, and how it answers.
    #[derive(Default)]
    struct FakeState {
        /// Each start: the VM's id, its settings, whose rights open its
        /// files and who owns its tty.
        starts: Vec<(u32, VmConfig, Requester, u32)>,
        running: Vec<u32>,
        force_stops: Vec<u32>,
        commands: Vec<(u32, VmCommand)>,
        /// What the next starts are refused with.
        refuse: Option<CtlError>,
        /// The console logs it was asked to remove.
        removed_logs: Vec<std::path::PathBuf>,
    }

    /// A backend that runs nothing: it records what it is asked; the
    /// tests play the events a real one reports (launched, running,
    /// ended) on the registry.
    struct Fake(Rc<RefCell<FakeState>>);

    impl Backend for Fake {
        fn start(
            &mut self,
            id: u32,
            vm: &VmConfig,
            _globals: &Globals,
            requester: &Requester,
            tty_owner: u32,
        ) -> Result<(), CtlError> {
            let mut state = self.0.borrow_mut();
            if let Some(e) = state.refuse.clone() {
                return Err(e);
            }
            state
                .starts
                .push((id, vm.clone(), requester.clone(), tty_owner));
            state.running.push(id);
            Ok(())
        }
        fn force_stop(&mut self, id: u32) -> bool {
            let mut state = self.0.borrow_mut();
            state.force_stops.push(id);
            state.running.contains(&id)
        }
        fn command(&mut self, id: u32, command: VmCommand, _fd: Option<OwnedFd>) -> bool {
            let mut state = self.0.borrow_mut();
            state.commands.push((id, command));
            state.running.contains(&id)
        }
        fn discard_parked(&mut self, _id: u32) {}
        fn remove_console_log(&mut self, path: &std::path::Path) {
            self.0.borrow_mut().removed_logs.push(path.to_path_buf());
        }
        fn info(&self, id: u32) -> Option<RunInfo> {
            self.0.borrow().running.contains(&id).then(|| RunInfo {
                pid: 1000 + id,
                tty: format!("/dev/pts/{id}"),
                cur_memory: Some(42 << 20),
            })
        }
        fn owns_token(&self, _token: mio::Token) -> bool {
            false
        }
        fn handle_event(&mut self, _token: mio::Token) {}
        fn reaped(&mut self, _pid: nix::unistd::Pid, _status: nix::sys::wait::WaitStatus) {}
        fn next_deadline(&self) -> Option<Instant> {
            None
        }
        fn tick(&mut self) {}
        fn settle(&mut self) {}
        fn is_ending(&self) -> bool {
            false
        }
        fn take_events(&mut self) -> Vec<crate::parent::backend::VmEvent> {
            Vec::new()
        }
        fn is_empty(&self) -> bool {
            self.0.borrow().running.is_empty()
        }
        fn stop_all(&mut self) {}
        fn kill_all(&mut self) {}
    }

    fn with_fake(text: &str) -> (Registry, Rc<RefCell<FakeState>>) {
        let state = Rc::new(RefCell::new(FakeState::default()));
        let loaded = parse_str("test.conf", text, &[]).expect("config parses");
        let mut r = Registry::with_backend(Box::new(Fake(state.clone())));
        r.host_memory = Some(64 << 30);
        r.apply(&loaded.config, true);
        (r, state)
    }

    /// VM `id`'s process ended: `reason` is the guest's own shutdown
    /// (`guest-reset` for a reboot), None when it was killed.
    fn end(state: &Rc<RefCell<FakeState>>, id: u32, reason: Option<&str>) -> VmEnded {
        state.borrow_mut().running.retain(|&r| r != id);
        VmEnded {
            id,
            name: String::new(),
            why: "VM process exited".into(),
            guest_reason: reason.map(String::from),
            start_failure: None,
            launch_error: None,
            console_log: Some(format!("/logs/{id}.console").into()),
        }
    }

    fn start_req(name: &str) -> StartRequest {
        StartRequest {
            target: VmTarget::Name(name.into()),
            vm: VmConfig::new(""),
        }
    }

    fn state_of(r: &Registry, vmid: u32) -> VmState {
        r.status()
            .into_iter()
            .find(|i| i.id == vmid)
            .map_or(VmState::Stopped, |i| i.state)
    }

    #[test]
    fn macs_are_kept_per_vm_and_never_shared() {
        let text = "switch \"sw\" { interface br0 }\n\
            switch \"off\" { interface br1\n disable }\n\
            vm \"a\" { disable\n boot \"/k\"\n interfaces 2\n interface { switch \"sw\" } }\n\
            vm \"b\" { disable\n boot \"/k\"\n interface { lladdr fe:e1:bb:d1:00:01 } }\n\
            vm \"c\" { disable\n boot \"/k\"\n interface { lladdr fe:e1:bb:d1:00:01 } }\n\
            vm \"d\" { disable\n boot \"/k\"\n interface { switch \"nosuch\" } }\n\
            vm \"e\" { disable\n boot \"/k\"\n interface { switch \"off\" } }\n";
        let (mut r, state) = with_fake(text);
        let root = user(0, 0, &[]);
        let a = r.start(&start_req("a"), &root).expect("a starts");
        let macs = |state: &Rc<RefCell<FakeState>>| -> Vec<[u8; 6]> {
            let state = state.borrow();
            let vm = &state.starts.last().expect("a start").1;
            vm.interfaces
                .iter()
                .map(|i| i.lladdr.expect("a MAC"))
                .collect()
        };
        let first = macs(&state);
        // `interfaces 2` pads; each gets OpenBSD's fe:e1:bb:dN.
        assert_eq!(first.len(), 2);
        assert!(common::net::is_generated_for(&first[0], 0));
        assert!(common::net::is_generated_for(&first[1], 1));
        assert_ne!(first[0], first[1]);
        // A reboot restarts it with the same MACs; so does a new start.
        r.ended(&end(&state, a, Some("guest-reset")));
        assert_eq!(macs(&state), first);
        r.ended(&end(&state, a, None));
        r.start(&start_req("a"), &root).expect("a starts again");
        assert_eq!(macs(&state), first);
        // A configured lladdr is used, but not by two running VMs.
        r.start(&start_req("b"), &root).expect("b starts");
        assert_eq!(macs(&state), [[0xfe, 0xe1, 0xbb, 0xd1, 0, 1]]);
        let taken = r.start(&start_req("c"), &root).unwrap_err();
        assert_eq!(
            taken.describe(),
            "lladdr fe:e1:bb:d1:00:01 is in use by vm b"
        );
        // Unknown and disabled switches refuse the start.
        let unknown = r.start(&start_req("d"), &root).unwrap_err();
        assert_eq!(
            unknown.describe(),
            "switch \"nosuch\" not found: define it in vm.conf"
        );
        let off = r.start(&start_req("e"), &root).unwrap_err();
        assert_eq!(off.describe(), "switch \"off\" is disabled");
    }

    #[test]
    fn ids_are_reused_per_name_and_owner() {
        let text = "vm \"a\" { disable\n boot \"/k\" }\nvm \"b\" { disable\n boot \"/k\" }\n";
        let mut r = registry(text);
        let ids: Vec<u32> = r.status().iter().map(|i| i.id).collect();
        assert_eq!(ids, [1, 2]);
        let loaded = parse_str(
            "test.conf",
            "vm \"c\" { disable\n boot \"/k\" }\nvm \"a\" { disable\n boot \"/k\" }\n",
            &[],
        )
        .unwrap();
        r.apply(&loaded.config, true);
        let got: Vec<(u32, String)> = r.status().into_iter().map(|i| (i.id, i.name)).collect();
        assert_eq!(got, [(3, "c".to_string()), (1, "a".to_string())]);
    }

    #[test]
    fn permissions_by_owner_user_and_group() {
        let r = registry("vm \"a\" { disable\n boot \"/k\"\n owner :daemon }\n");
        let vm = &r.vms[0];
        assert!(vm.permits(&user(0, 0, &[])));
        assert!(!vm.permits(&user(1000, 1000, &[])));
        assert!(vm.permits(&user(1000, 1000, &[1])));
        assert!(vm.permits(&user(1000, 1, &[])));
    }

    #[test]
    fn stop_checks_permission_before_state() {
        let mut r = registry("vm \"a\" { disable\n boot \"/k\"\n owner :daemon }\n");
        let target = VmTarget::Name("a".into());
        assert_eq!(
            r.stop(&target, false, false, &user(1000, 1000, &[])),
            Err(errno(Errno::EPERM))
        );
        assert_eq!(
            r.stop(&target, false, false, &user(1000, 1000, &[1])),
            Err(CtlError::StopInvalid)
        );
        assert_eq!(
            r.stop(&VmTarget::Id(9), false, false, &user(0, 0, &[])),
            Err(CtlError::not_found())
        );
    }

    #[test]
    fn pause_answers_and_stop_states() {
        let mut r = registry("vm \"a\" { disable\n boot \"/k\" }\n");
        let root = user(0, 0, &[]);
        let target = VmTarget::Name("a".into());
        // Without a backend nothing pretends to pause or stop.
        r.vms[0].state = VmState::Running;
        assert_eq!(
            r.pause(&target, &root),
            Err(CtlError::Text(BACKEND_MISSING.into()))
        );
        assert_eq!(
            r.stop(&target, false, false, &root),
            Err(CtlError::Text(BACKEND_MISSING.into()))
        );
        // The backend's answers decide the state.
        assert_eq!(
            r.command_done(1, VmCommand::Pause, Some("no".into())),
            Err(CtlError::Text("no".into()))
        );
        assert_eq!(r.vms[0].state, VmState::Running);
        assert_eq!(r.command_done(1, VmCommand::Pause, None), Ok(1));
        assert_eq!(r.vms[0].state, VmState::Paused);
        assert_eq!(
            r.pause(&target, &root),
            Err(explained(Errno::EINVAL, "vm a is already paused"))
        );
        assert_eq!(r.command_done(1, VmCommand::Unpause, None), Ok(1));
        assert_eq!(r.vms[0].state, VmState::Running);
        // A stop under way: a second one needs -f; a late answer to a
        // pause does not undo it.
        r.vms[0].state = VmState::Stopping;
        assert_eq!(
            r.stop(&target, false, false, &root)
                .map_err(|e| e.errno_code()),
            Err(Some(libc::EALREADY))
        );
        // stop -w of a VM already stopping waits for that stop.
        assert_eq!(r.stop(&target, false, true, &root), Ok(1));
        assert_eq!(r.command_done(1, VmCommand::Pause, None), Ok(1));
        assert_eq!(r.vms[0].state, VmState::Stopping);
        assert_eq!(r.wait(&target, &root), Ok(1));
    }

    #[test]
    fn start_rules_and_rate_limit() {
        let mut r = registry("vm \"a\" { disable\n boot \"/k\" }\n");
        let root = user(0, 0, &[]);
        let req = |name: &str| StartRequest {
            target: VmTarget::Name(name.into()),
            vm: VmConfig::new(""),
        };
        for _ in 0..3 {
            assert_eq!(
                r.start(&req("a"), &root).err(),
                Some(CtlError::Text(BACKEND_MISSING.into()))
            );
        }
        let code = |r: Result<u32, CtlError>| r.err().and_then(|e| e.errno_code());
        assert_eq!(code(r.start(&req("a"), &root)), Some(libc::EPERM));
        // Only root creates brand-new VMs; a failed one is not kept, and
        // keeps its id for the next try.
        let mut new = req("fresh");
        new.vm.boot = Some("/k".into());
        assert_eq!(
            code(r.start(&new, &user(1000, 1000, &[]))),
            Some(libc::EPERM)
        );
        for _ in 0..2 {
            assert_eq!(
                r.start(&new, &root).err(),
                Some(CtlError::Text(BACKEND_MISSING.into()))
            );
            assert_eq!(r.claim_id("fresh", 0), Ok(2));
        }
        assert_eq!(r.status().len(), 1);
        // A name or id that matches nothing, with nothing to create it.
        assert_eq!(
            r.start(&req("gamma"), &root).err(),
            Some(CtlError::not_found())
        );
        let by_id = StartRequest {
            target: VmTarget::Id(99),
            vm: VmConfig::new(""),
        };
        assert_eq!(r.start(&by_id, &root).err(), Some(CtlError::not_found()));
        // A configured VM keeps its settings: words, not a bare EALREADY.
        let mut more = req("a");
        more.vm.memory = Some(1 << 30);
        let refused = r.start(&more, &root).unwrap_err();
        assert_eq!(refused.errno_code(), Some(libc::EALREADY));
        assert!(
            refused.describe().contains("only -b and -B may change it"),
            "{}",
            refused.describe()
        );
        let mut inst = req("i1");
        inst.vm.instance_of = Some("nope".into());
        assert_eq!(r.start(&inst, &root).err(), Some(CtlError::TemplateInvalid));
    }

    const TEMPLATE: &str = r#"vm "tpl" {
	disable
	boot "/k"
	memory 256M
	disk "/tpl.img"
	interface tap7 { lladdr fe:e1:bb:d1:00:01 }
	owner root
	allow instance { memory
		owner alice-not-a-user-here }
}
"#;

    fn template_registry(allow_owner: &str) -> Registry {
        let text = TEMPLATE.replace("alice-not-a-user-here", allow_owner);
        registry(&text)
    }

    fn instance(name: &str) -> VmConfig {
        let mut vm = VmConfig::new(name);
        vm.instance_of = Some("tpl".into());
        vm
    }

    #[test]
    fn instances_inherit_all_but_exclusive_settings() {
        let r = template_registry(":daemon");
        let root = user(0, 0, &[]);
        let mut vm = instance("i1");
        vm.memory = Some(1 << 30);
        let got = r.start_instance(vm, "tpl", &root).expect("root's instance");
        assert_eq!(got.boot.as_deref(), Some("/k"));
        assert_eq!(got.memory, Some(1 << 30));
        assert!(got.disks.is_empty());
        assert_eq!(got.interfaces.len(), 1);
        assert_eq!(
            (got.interfaces[0].tap.as_ref(), got.interfaces[0].lladdr),
            (None, None)
        );
        // Reusing the parent's disk is refused, root or not.
        let mut vm = instance("i2");
        vm.disks.push(common::config::Disk {
            path: "/tpl.img".into(),
            format: common::disk::DiskFormat::Raw,
        });
        assert_eq!(
            r.start_instance(vm, "tpl", &root)
                .err()
                .and_then(|e| e.errno_code()),
            Some(libc::EBUSY)
        );
        assert_eq!(
            r.start_instance(instance("i3"), "nope", &root).err(),
            Some(CtlError::TemplateInvalid)
        );
    }

    #[test]
    fn users_change_only_what_allow_instance_permits() {
        let r = template_registry(":daemon");
        // Group daemon (1) may create instances; others get `invalid template`.
        let member = user(1000, 1000, &[1]);
        let other = user(1001, 1001, &[]);
        assert_eq!(
            r.start_instance(instance("u1"), "tpl", &other).err(),
            Some(CtlError::TemplateInvalid)
        );
        let mut vm = instance("u1");
        vm.memory = Some(512 << 20);
        let got = r
            .start_instance(vm, "tpl", &member)
            .expect("memory is allowed");
        assert_eq!((got.memory, got.owner.uid), (Some(512 << 20), 1000));
        let mut vm = instance("u2");
        vm.disks.push(common::config::Disk {
            path: "/home/u/own.img".into(),
            format: common::disk::DiskFormat::Raw,
        });
        assert_eq!(
            r.start_instance(vm, "tpl", &member)
                .err()
                .and_then(|e| e.errno_code()),
            Some(libc::EPERM)
        );
        for change in [
            |vm: &mut VmConfig| vm.vcpus = Some(2),
            |vm: &mut VmConfig| vm.cdrom = Some("/x.iso".into()),
            |vm: &mut VmConfig| vm.boot = Some("/home/u/k".into()),
            |vm: &mut VmConfig| vm.boot_device = Some(common::config::BootDevice::Disk),
            // What only a raw request carries (the attack review's).
            |vm: &mut VmConfig| vm.accel = Some(common::config::Accel::Kvm),
            |vm: &mut VmConfig| vm.shutdown_timeout = Some(86400),
            |vm: &mut VmConfig| vm.backend = Some(common::config::Backend::Kvm),
            |vm: &mut VmConfig| vm.allow_instance.memory = true,
            // An interface's settings at the parent's count of interfaces.
            |vm: &mut VmConfig| {
                vm.interfaces.push(common::config::Interface {
                    switch: Some("uplink".into()),
                    ..Default::default()
                })
            },
        ] {
            let mut vm = instance("u3");
            change(&mut vm);
            assert_eq!(
                r.start_instance(vm, "tpl", &member)
                    .err()
                    .and_then(|e| e.errno_code()),
                Some(libc::EPERM)
            );
        }
        // Asking for what the parent has is no change.
        let mut vm = instance("u4");
        vm.vcpus = Some(1);
        assert!(r.start_instance(vm, "tpl", &member).is_ok());
    }

    #[test]
    fn config_instance_reusing_its_parents_disk_is_skipped() {
        let text = format!(
            "{TEMPLATE}vm \"tpl\" instance \"ok\" {{\n\tdisable\n}}\nvm \"tpl\" instance \"bad\" {{\n\tdisable\n\tdisk \"/tpl.img\"\n}}\n"
        )
        .replace("alice-not-a-user-here", "root");
        let r = registry(&text);
        let names: Vec<String> = r.status().into_iter().map(|i| i.name).collect();
        assert_eq!(names, ["tpl", "ok"]);
    }

    const VM_A: &str = "vm \"a\" { disable\n boot \"/k\" }\n";

    #[test]
    fn a_start_is_launched_then_runs() {
        let (mut r, fake) = with_fake(VM_A);
        let root = user(0, 0, &[]);
        assert_eq!(r.start(&start_req("a"), &root), Ok(1));
        // Running from the start on: a second start is refused.
        assert_eq!(state_of(&r, 1), VmState::Running);
        assert_eq!(r.status()[0].pid, None);
        assert_eq!(
            r.start(&start_req("a"), &root).map_err(|e| e.errno_code()),
            Err(Some(libc::EALREADY))
        );
        let (id, settings, requester, tty_owner) = fake.borrow().starts[0].clone();
        assert_eq!(
            (id, settings.boot.as_deref(), requester.uid, tty_owner),
            (1, Some("/k"), 0, 0)
        );
        r.launched(1, 4242, "/dev/pts/9".into());
        r.guest_running(1);
        let info = &r.status()[0];
        assert_eq!(info.pid, Some(4242));
        assert_eq!(info.tty.as_deref(), Some("/dev/pts/9"));
        assert_eq!(info.cur_memory, Some(42 << 20));
        assert_eq!(r.tty(1).as_deref(), Some("/dev/pts/9"));
    }

    #[test]
    fn a_guest_reset_restarts_it_as_it_was_started() {
        let (mut r, fake) = with_fake(VM_A);
        let mut req = start_req("a");
        req.vm.boot = Some("/other".into());
        assert_eq!(r.start(&req, &user(0, 0, &[])), Ok(1));
        r.launched(1, 4242, "/dev/pts/9".into());
        let outcome = r.ended(&end(&fake, 1, Some("guest-reset")));
        assert_eq!(outcome, Ended::Restarted);
        assert_eq!(state_of(&r, 1), VmState::Running);
        let starts = fake.borrow().starts.clone();
        assert_eq!(starts.len(), 2);
        // The same settings (-b kept), requester and tty owner.
        assert_eq!(starts[1].1.boot.as_deref(), Some("/other"));
        assert_eq!(starts[1].2, starts[0].2);
        assert_eq!(starts[1].3, starts[0].3);
        // Its tty stays listed while it relaunches.
        assert_eq!(r.tty(1).as_deref(), Some("/dev/pts/9"));
        // The guest's own power-off ends it.
        assert_eq!(
            r.ended(&end(&fake, 1, Some("guest-shutdown"))),
            Ended::Terminated { timed_out: false }
        );
        assert_eq!(state_of(&r, 1), VmState::Stopped);
        assert_eq!(fake.borrow().starts.len(), 2);
    }

    #[test]
    fn each_change_of_a_vms_life_is_an_event_with_why_it_ended() {
        let (mut r, fake) = with_fake(VM_A);
        let root = user(0, 0, &[]);
        let words = |r: &mut Registry| -> Vec<String> {
            r.take_events()
                .into_iter()
                .map(|e| match e.kind.detail() {
                    Some(d) => format!("{} {} {d}", e.vmid, e.kind.as_str()),
                    None => format!("{} {}", e.vmid, e.kind.as_str()),
                })
                .collect()
        };
        assert_eq!(r.start(&start_req("a"), &root), Ok(1));
        r.launched(1, 4242, "/dev/pts/9".into());
        r.guest_running(1);
        assert_eq!(r.pause(&VmTarget::Id(1), &root), Ok(1));
        assert_eq!(r.command_done(1, VmCommand::Pause, None), Ok(1));
        assert_eq!(r.unpause(&VmTarget::Id(1), &root), Ok(1));
        assert_eq!(r.command_done(1, VmCommand::Unpause, None), Ok(1));
        r.ended(&end(&fake, 1, Some("guest-reset")));
        r.guest_running(1);
        assert_eq!(r.stop(&VmTarget::Id(1), false, false, &root), Ok(1));
        r.ended(&end(&fake, 1, Some("guest-shutdown")));
        assert_eq!(
            words(&mut r),
            [
                "1 started",
                "1 running",
                "1 paused",
                "1 unpaused",
                "1 restarted",
                "1 running",
                "1 stopping",
                "1 stopped powered-off"
            ]
        );
        // Forced, killed from outside, crashed, and a start that failed.
        let ended = |reason: Option<&str>, why: &str, failure: Option<&str>| VmEnded {
            why: why.into(),
            start_failure: failure.map(String::from),
            ..end(&fake, 1, reason)
        };
        let exited = "VM process exited";
        let killed = "VM process exited, QEMU was killed by SIGKILL";
        let sigsys = "VM process was killed by a refused system call (SIGSYS)";
        let cases = [
            (true, ended(None, killed, None), EndReason::Forced),
            (
                true,
                ended(Some("guest-shutdown"), exited, None),
                EndReason::Forced,
            ),
            (false, ended(None, killed, None), EndReason::Killed),
            (false, ended(None, sigsys, None), EndReason::Crashed),
            (
                false,
                ended(Some("guest-panic"), exited, None),
                EndReason::Crashed,
            ),
            (
                false,
                ended(None, exited, Some("no kernel")),
                EndReason::Failed,
            ),
        ];
        for (forced, ended, want) in cases {
            assert_eq!(end_reason(forced, &ended), want, "{ended:?}");
        }
    }

    #[test]
    fn a_reboot_loop_hits_the_start_rate_limit() {
        let (mut r, fake) = with_fake(VM_A);
        assert_eq!(r.start(&start_req("a"), &user(0, 0, &[])), Ok(1));
        let mut outcomes = Vec::new();
        for _ in 0..START_RATE_LIMIT {
            outcomes.push(r.ended(&end(&fake, 1, Some("guest-reset"))));
        }
        // The first start and START_RATE_LIMIT - 1 quick restarts run;
        // the next restart is refused and the VM has terminated.
        let restarted = START_RATE_LIMIT as usize - 1;
        assert!(outcomes[..restarted].iter().all(|o| *o == Ended::Restarted));
        assert_eq!(outcomes[restarted], Ended::Terminated { timed_out: false });
        assert_eq!(fake.borrow().starts.len(), START_RATE_LIMIT as usize);
        assert_eq!(state_of(&r, 1), VmState::Stopped);
    }

    #[test]
    fn a_graceful_stop_is_forced_when_its_time_is_up() {
        let (mut r, fake) = with_fake(VM_A);
        let root = user(0, 0, &[]);
        r.start(&start_req("a"), &root).expect("start");
        r.launched(1, 4242, "/dev/pts/9".into());
        let target = VmTarget::Name("a".into());
        assert_eq!(r.stop(&target, false, false, &root), Ok(1));
        assert_eq!(fake.borrow().commands, [(1, VmCommand::Powerdown)]);
        assert_eq!(state_of(&r, 1), VmState::Stopping);
        let due = r.next_stop_deadline().expect("a stop deadline");
        assert!(due > Instant::now());
        // Not yet due: nothing is forced.
        r.expire_stops();
        assert!(fake.borrow().force_stops.is_empty());
        r.vms[0].stop_deadline = Some(Instant::now());
        r.expire_stops();
        assert_eq!(fake.borrow().force_stops, [1]);
        assert_eq!(r.next_stop_deadline(), None);
        // A reset under way is not restarted once a stop was asked for.
        assert_eq!(
            r.ended(&end(&fake, 1, Some("guest-reset"))),
            Ended::Terminated { timed_out: true }
        );
        assert_eq!(state_of(&r, 1), VmState::Stopped);
        assert_eq!(fake.borrow().starts.len(), 1);
    }

    #[test]
    fn a_crashed_vm_ends_and_starts_again() {
        let (mut r, fake) = with_fake(VM_A);
        let root = user(0, 0, &[]);
        r.start(&start_req("a"), &root).expect("start");
        r.launched(1, 4242, "/dev/pts/9".into());
        // Killed from outside: no guest reason, not restarted.
        assert_eq!(
            r.ended(&end(&fake, 1, None)),
            Ended::Terminated { timed_out: false }
        );
        let info = &r.status()[0];
        assert_eq!(
            (info.state, info.pid, info.tty.clone()),
            (VmState::Stopped, None, None)
        );
        assert_eq!(r.start(&start_req("a"), &root), Ok(1));
        assert_eq!(fake.borrow().starts.len(), 2);
        // stop -f while it is still being launched.
        let target = VmTarget::Name("a".into());
        assert_eq!(r.stop(&target, true, false, &root), Ok(1));
        assert_eq!(fake.borrow().force_stops, [1]);
        assert_eq!(
            r.ended(&end(&fake, 1, None)),
            Ended::Terminated { timed_out: false }
        );
    }

    #[test]
    fn a_failed_launch_ends_the_start() {
        let (mut r, fake) = with_fake(VM_A);
        let root = user(0, 0, &[]);
        // Refused at once: a vmctl-only VM is not kept.
        fake.borrow_mut().refuse = Some(CtlError::BiosMissing);
        let mut fresh = start_req("fresh");
        fresh.vm.disks.push(common::config::Disk {
            path: "/d.img".into(),
            format: common::disk::DiskFormat::Raw,
        });
        assert_eq!(r.start(&fresh, &root), Err(CtlError::BiosMissing));
        assert_eq!(r.status().len(), 1);
        // Refused once its files were looked at: it ends with the reason.
        fake.borrow_mut().refuse = None;
        let vmid = r.start(&fresh, &root).expect("start");
        let mut ended = end(&fake, vmid, None);
        ended.launch_error = Some(CtlError::BiosMissing);
        assert_eq!(r.ended(&ended), Ended::Terminated { timed_out: false });
        assert_eq!(r.status().len(), 1);
        // A configured VM stays listed, stopped.
        r.start(&start_req("a"), &root).expect("start a");
        let mut ended = end(&fake, 1, None);
        ended.launch_error = Some(CtlError::Text("no".into()));
        r.ended(&ended);
        assert_eq!(state_of(&r, 1), VmState::Stopped);
    }

    #[test]
    fn reset_terminates_running_vms_through_the_backend() {
        let (mut r, fake) = with_fake(VM_A);
        r.start(&start_req("a"), &user(0, 0, &[])).expect("start");
        r.reset(ResetWhat::Vms);
        assert_eq!(fake.borrow().force_stops, [1]);
        // Listed, stopping, until its end; then forgotten.
        assert_eq!(state_of(&r, 1), VmState::Stopping);
        r.ended(&end(&fake, 1, Some("guest-reset")));
        assert!(r.status().is_empty());
        assert_eq!(fake.borrow().starts.len(), 1);
    }

    /// A start of `name` as an instance of tpl with `memory` and `vcpus`.
    fn instance_req(name: &str, memory: u64, vcpus: u32) -> StartRequest {
        let mut req = start_req(name);
        req.vm = instance(name);
        req.vm.memory = Some(memory);
        req.vm.vcpus = Some(vcpus);
        req
    }

    #[test]
    fn memory_beyond_what_the_host_allows_is_refused() {
        let (mut r, state) = with_fake(&TEMPLATE.replace("alice-not-a-user-here", "root"));
        // MemTotal 8G: VMs get 7G (an eighth kept), 512M kept at least.
        r.host_memory = Some(8 << 30);
        assert_eq!(host_allows(8 << 30), 7 << 30);
        assert_eq!(host_allows(2 << 30), (2 << 30) - (512 << 20));
        let root = user(0, 0, &[]);
        let first = r
            .start(&instance_req("big", 4 << 30, 1), &root)
            .expect("4G fits");
        let refused = r
            .start(&instance_req("more", 4 << 30, 1), &root)
            .expect_err("4G more does not");
        assert_eq!(refused.errno_code(), Some(libc::ENOMEM));
        assert_eq!(
            refused.describe().lines().last(),
            Some("vm more: 4.0G of memory and 4.0G running exceed what this host allows VMs (7.0G of 8.0G; see vm.conf(5) LIMITS)"),
            "{}",
            refused.describe()
        );
        let refused = r
            .start(&instance_req("huge", 1 << 40, 1), &root)
            .expect_err("1T does not");
        assert!(
            refused.describe().contains("1.0T of memory"),
            "{}",
            refused.describe()
        );
        // Once the first has ended, 4G fits again; a reboot of a VM does
        // not count the VM twice.
        let ended = end(&state, first, None);
        r.ended(&ended);
        let again = r
            .start(&instance_req("more", 4 << 30, 1), &root)
            .expect("fits now");
        assert_eq!(
            r.start(&instance_req("small", 2 << 30, 1), &root)
                .map(|_| ()),
            Ok(())
        );
        let ended = end(&state, again, Some("guest-reset"));
        assert_eq!(r.ended(&ended), Ended::Restarted);
    }

    #[test]
    fn per_user_limits_hold_and_reload_changes_them() {
        let text = TEMPLATE.replace("alice-not-a-user-here", ":daemon");
        let text = format!("{text}vm \"v6\" {{\n disable\n boot \"/k\"\n vcpu 6\n owner 1000\n}}\nvm \"v3\" {{\n disable\n boot \"/k\"\n vcpu 3\n owner 1000\n}}\n");
        let (mut r, state) = with_fake(&format!("limit user \"daemon\" {{ vms 2 }}\n{text}"));
        let root = user(0, 0, &[]);
        let daemon = user(1, 1, &[1]);
        let other = user(1000, 1000, &[1]);
        let a = r
            .start(&instance_req("a", 1 << 30, 1), &daemon)
            .expect("first");
        r.start(&instance_req("b", 1 << 30, 1), &daemon)
            .expect("second");
        let refused = r
            .start(&instance_req("c", 1 << 30, 1), &daemon)
            .expect_err("third");
        assert_eq!(
            refused.describe().lines().last(),
            Some("vm c: user daemon may run at most 2 VMs (vm.conf: limit user \"daemon\")"),
            "{}",
            refused.describe()
        );
        assert_eq!(refused.errno_code(), Some(libc::EPERM));
        // Refused, c is not registered; root is not limited by daemon's
        // VMs nor by limits of its own.
        assert!(r.status().iter().all(|i| i.name != "c"));
        for i in 0..6 {
            r.start(&instance_req(&format!("r{i}"), 1 << 30, 4), &root)
                .expect("root has no limit");
        }
        // Another user: the defaults (8G, 8 vCPUs, 4 VMs).
        let refused = r
            .start(&instance_req("o1", 9 << 30, 1), &other)
            .expect_err("9G");
        assert_eq!(
            refused.describe().lines().last(),
            Some("vm o1: user uid 1000 may use at most 8.0G of memory, 0B running (the default for users; see vm.conf(5) LIMITS)"),
            "{}",
            refused.describe()
        );
        r.start(&instance_req("o1", 1 << 30, 1), &other)
            .expect("1G");
        r.start(&start_req("v6"), &other).expect("7 vCPUs");
        let refused = r.start(&start_req("v3"), &other).expect_err("10 vCPUs");
        assert!(
            refused
                .describe()
                .contains("vm v3: user uid 1000 may use at most 8 vCPUs, 7 running"),
            "{}",
            refused.describe()
        );
        // When a VM of daemon's ends, it may start another.
        let ended = end(&state, a, None);
        r.ended(&ended);
        r.start(&instance_req("c", 1 << 30, 1), &daemon)
            .expect("after an end");
        // A reload applies new limits to later starts.
        let tighter = parse_str(
            "test.conf",
            &format!("limit users {{ memory 1G }}\n{text}"),
            &[],
        )
        .expect("config parses");
        r.apply(&tighter.config, true);
        let refused = r
            .start(&instance_req("o2", 1 << 30, 1), &other)
            .expect_err("over the reloaded limit");
        assert!(
            refused
                .describe()
                .contains("may use at most 1.0G of memory, 1.5G running (vm.conf: limit users)"),
            "{}",
            refused.describe()
        );
        // daemon has no block of its own any more: limit users and the
        // default of 4 VMs.
        let refused = r
            .start(&instance_req("d", 1 << 30, 1), &daemon)
            .expect_err("daemon runs 2G");
        assert!(
            refused.describe().contains("(vm.conf: limit users)"),
            "{}",
            refused.describe()
        );
    }

    #[test]
    fn an_ended_vmctl_vm_takes_its_console_log_along() {
        let (mut r, state) = with_fake(&TEMPLATE.replace("alice-not-a-user-here", "root"));
        let root = user(0, 0, &[]);
        let conf = parse_str("test.conf", "vm \"c\" {\n disable\n boot \"/k\"\n}\n", &[])
            .expect("config parses");
        r.apply(&conf.config, false);
        let inst = r
            .start(&instance_req("i", 1 << 30, 1), &root)
            .expect("instance");
        let configured = r.start(&start_req("c"), &root).expect("configured vm");
        // A reboot keeps it.
        let rebooted = end(&state, inst, Some("guest-reset"));
        assert_eq!(r.ended(&rebooted), Ended::Restarted);
        assert!(state.borrow().removed_logs.is_empty());
        r.ended(&end(&state, configured, None));
        assert!(state.borrow().removed_logs.is_empty());
        r.ended(&end(&state, inst, None));
        assert_eq!(
            state.borrow().removed_logs,
            vec![std::path::PathBuf::from(format!("/logs/{inst}.console"))]
        );
        // `console log DIR keep` keeps them.
        r.globals.console_log_keep = true;
        let kept = r
            .start(&instance_req("k", 1 << 30, 1), &root)
            .expect("instance");
        r.ended(&end(&state, kept, None));
        assert_eq!(state.borrow().removed_logs.len(), 1);
    }

    /// A stream's header names the VM as it runs; receive starts a new
    /// VM with the same settings under its new name, and refuses a
    /// corrupt header, a foreign backend and a name in use.
    #[test]
    fn a_received_vm_is_the_sent_one_under_a_new_name() {
        use common::stream::{Encoder, StreamHeader};
        let r = registry(
            "vm \"web\" {\n disable\n memory 300M\n boot \"/k\"\n initrd \"/i\"\n \
             disk \"/d.qcow2\"\n interface { lladdr fe:e1:ba:d0:00:07 switch \"up\" }\n owner 1000\n}\n",
        );
        let vm = r.vms[0].config.clone();
        let header = |backend: &str| StreamHeader {
            backend: backend.into(),
            qemu_version: "7.2.19".into(),
            machine: "pc-i440fx-7.2".into(),
            cpu: "qemu64".into(),
            accel: "tcg".into(),
            vm: stream_vm(&vm),
        };
        let bytes = |h: &StreamHeader| Encoder::new(h).expect("encodes").1;
        let req = receive_request("copy", &bytes(&header("qemu"))).expect("a good header");
        assert_eq!(req.target, VmTarget::Name("copy".into()));
        assert_eq!(req.vm.name, "copy");
        assert_eq!(req.vm.memory, Some(300 << 20));
        assert_eq!(req.vm.boot.as_deref(), Some("/k"));
        assert_eq!(req.vm.initrd.as_deref(), Some("/i"));
        assert_eq!(req.vm.disks, vm.disks);
        assert_eq!(
            req.vm.interfaces[0].lladdr,
            Some([0xfe, 0xe1, 0xba, 0xd0, 0, 7])
        );
        assert_eq!(req.vm.interfaces[0].switch.as_deref(), Some("up"));
        assert_eq!(req.vm.owner.uid, 1000);
        assert_eq!(req.vm.accel, Some(common::config::Accel::Tcg));

        let mut corrupt = bytes(&header("qemu"));
        corrupt[20] ^= 1;
        let why = |e: CtlError| e.describe();
        assert_eq!(
            why(receive_request("copy", &corrupt).unwrap_err()),
            "the stream's header is corrupt (its checksum does not match)"
        );
        assert_eq!(
            why(receive_request("copy", &bytes(&header("kvm-own"))).unwrap_err()),
            "the stream is from backend kvm-own, which this vmd does not run"
        );
        assert!(receive_request("-bad", &bytes(&header("qemu"))).is_err());

        let mut r = r;
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        drop(b);
        let incoming = Incoming {
            header: bytes(&header("qemu")),
            fd: a.into(),
        };
        let mut taken = receive_request("web", &incoming.header).expect("header");
        taken.target = VmTarget::Name("web".into());
        let root = user(0, 0, &[]);
        assert_eq!(
            why(r.receive(&taken, &root, incoming).unwrap_err()),
            "vm web exists: receive it under a new name"
        );
    }
}
