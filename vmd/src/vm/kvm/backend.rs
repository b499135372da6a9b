//! The `backend kvm` side of the VM process's seam: the machine built as
//! root ([`prepare`]), its vCPU thread started and waiting; after the
//! drop, [`Backend::resume`] lets the thread install its filter and run
//! the guest. The monitor thread (the VM process's loop) gives the guest
//! its console input and hears from the vCPU thread through an eventfd:
//! the guest runs, or it ended (reset, power-off, failure). A reset or a
//! power-off ends the VM process cleanly with the reason QEMU's backend
//! gives (`guest-reset`, `guest-shutdown`): the parent applies vmd's
//! restart rules.

use super::bus::Bus;
use super::devices::ged::Ged;
use super::devices::serial::Serial;
use super::devices::GuestExit;
use super::pause::{self, Pause};
use super::vcpu::{vcpu_filter, vcpu_raw_fd, vcpu_run_pausable, VcpuEnd};
use super::virtio::attach::{block_devices, net_devices, IoThread};
use super::virtio::block::DiskCounters;
use super::{KvmError, Machine};
use crate::log::{log_debug, log_info, log_warn};
use crate::seccomp::{Allowed, ArgRule, RoleFilter};
use crate::vm::backend::{probe, Backend, BackendEvent, Ended, ThreadRole, FIRST_BACKEND_TOKEN};
use crate::vm::console::read_some;
use crate::vm::kvm::bus::lock;
use crate::vm::{set_nonblocking, StartFds, VmError};
use common::imsg::{BackendParams, VmCommand, VmParams};
use kvm_ioctls::{Kvm, VmFd};
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// What the monitor thread adds to the VM process's calls.
pub const KVM_MAIN_SYSCALLS: &[Allowed] = &[(
    libc::SYS_futex,
    "take the serial port's lock to give it input; start and join the vCPU thread",
)];

/// The monitor thread's calls allowed with given arguments only.
pub const KVM_MAIN_ARG_RULES: &[ArgRule] = &[ArgRule {
    nr: libc::SYS_tgkill,
    arg: 2,
    values: &[pause::KICK_SIGNAL as u64],
    why: "kick a vCPU thread out of KVM_RUN to pause it (vm/kvm/pause.rs), with that signal only",
}];

/// Console input held while the guest's FIFO is full; beyond it the
/// console socket is left unread (the relay then drops what the pty
/// brings, as with a guest that does not read).
const INPUT_MAX: usize = 64 * 1024;

const VCPU: Token = Token(FIRST_BACKEND_TOKEN);
const SERIAL_IN: Token = Token(FIRST_BACKEND_TOKEN + 1);
const SERIAL_ROOM: Token = Token(FIRST_BACKEND_TOKEN + 2);

/// The vCPU thread's state, as the monitor thread reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum VcpuState {
    Waiting,
    Running,
    /// Parked by a pause (vm/kvm/pause.rs).
    Paused,
    Ended(VcpuEnd),
}

/// Shared by the vCPU threads and the monitor: each vCPU's state, the
/// eventfd that says one changed, the pause they all obey.
struct VcpuShared {
    states: Mutex<Vec<VcpuState>>,
    changed: EventFd,
    pause: Pause,
    /// Each vCPU thread's id, once it runs (0 before): what a pause kicks.
    tids: Vec<AtomicI32>,
}

impl VcpuShared {
    fn set(&self, index: usize, state: VcpuState) {
        if let Some(slot) = lock(&self.states).get_mut(index) {
            *slot = state;
        }
        let _ = self.changed.write(1);
    }

    /// What the machine is doing, from its vCPUs' states: the first
    /// vCPU's end ends it; it is paused when every vCPU is parked.
    fn machine_state(&self) -> VcpuState {
        let states = lock(&self.states);
        if let Some(end) = states.iter().find(|s| matches!(s, VcpuState::Ended(_))) {
            return end.clone();
        }
        if states.iter().all(|s| *s == VcpuState::Paused) {
            VcpuState::Paused
        } else if states.iter().all(|s| *s == VcpuState::Running) {
            VcpuState::Running
        } else {
            // Starting, or some parked and some not yet.
            VcpuState::Waiting
        }
    }
}

pub struct KvmBackend {
    /// Kept for the VM's life: the VM and its memory.
    _vm: VmFd,
    _mem: GuestMemoryMmap,
    serial: Arc<Mutex<Serial>>,
    ged: Arc<Mutex<Ged>>,
    /// The guest's end of the console socketpair, read for input.
    serial_in: OwnedFd,
    serial_room: EventFd,
    input: VecDeque<u8>,
    vcpu: Arc<VcpuShared>,
    /// Tell the vCPU threads to go; dropped unused, they give up.
    go: Vec<mpsc::Sender<()>>,
    threads: Vec<Option<JoinHandle<()>>>,
    /// The virtio devices' I/O thread (if any), told to go with the vCPUs.
    io: Option<IoThread>,
    /// Each disk's counters, in disk order (`vmctl stats`).
    disks: Vec<Arc<DiskCounters>>,
    running: bool,
    /// The vCPU is parked (a pause is done).
    paused: bool,
    /// A pause or unpause waiting for the vCPU to say it is done.
    pausing: Option<VmCommand>,
    end: Option<VcpuEnd>,
    killed: bool,
    events: Vec<BackendEvent>,
}

/// As root, before the drop: the machine, the kernel loaded, the vCPU
/// thread waiting. `serial` is the guest's end of the console socketpair.
pub fn prepare(
    params: &VmParams,
    fds: &mut StartFds,
    serial: OwnedFd,
) -> Result<KvmBackend, VmError> {
    let BackendParams::Kvm(settings) = &params.backend else {
        return Err(KvmError::Config("not a backend kvm VM".into()).into());
    };
    let missing = |what: &str| VmError::Receive(format!("no {what} descriptor"));
    let vcpus = u8::try_from(params.vcpus)
        .map_err(|_| KvmError::Config(format!("{} vCPUs is too many", params.vcpus)))?;
    let kvm_fd = fds.kvm.take().ok_or_else(|| missing("/dev/kvm"))?;
    // SAFETY: the parent opened /dev/kvm for us; Kvm owns it from here.
    let kvm = unsafe { Kvm::from_raw_fd(kvm_fd.into_raw_fd()) };
    let mut kernel = File::from(fds.kernel.take().ok_or_else(|| missing("kernel"))?);
    let mut initrd = fds.initrd.take().map(File::from);
    set_nonblocking(serial.as_raw_fd())?;
    let serial_in = serial
        .try_clone()
        .map_err(|e| KvmError::Config(format!("duplicating the console socket: {e}")))?;

    let mut machine = Machine::new(kvm, params.memory, serial)?;
    machine.add_aps(vcpus)?;
    let (io, disks) = attach_virtio_devices(&mut machine, params, fds)?;
    machine.boot_linux(
        &mut kernel,
        initrd.as_mut(),
        &settings.cmdline,
        params.memory,
    )?;
    drop((kernel, initrd));

    let changed = EventFd::new(EFD_NONBLOCK)
        .map_err(|e| KvmError::Config(format!("creating an eventfd: {e}")))?;
    let vcpu = Arc::new(VcpuShared {
        states: Mutex::new(vec![VcpuState::Waiting; vcpus as usize]),
        changed: changed
            .try_clone()
            .map_err(|e| KvmError::Config(format!("duplicating an eventfd: {e}")))?,
        pause: Pause::default(),
        tids: (0..vcpus).map(|_| AtomicI32::new(0)).collect(),
    });
    pause::install_kick_handler()
        .map_err(|e| KvmError::Config(format!("installing the pause signal's handler: {e}")))?;
    let mut write_fds = machine.write_fds.clone();
    write_fds.push(vcpu.changed.as_raw_fd());
    let Machine {
        vm,
        mem,
        pio,
        mmio,
        exit,
        serial: serial_dev,
        ged,
        serial_room,
        vcpu: boot_vcpu,
        aps,
        ..
    } = machine;
    let buses = Arc::new((pio, mmio));
    let mut go = Vec::new();
    let mut threads = Vec::new();
    for (index, fd) in std::iter::once(boot_vcpu).chain(aps).enumerate() {
        let (sender, thread) = spawn_vcpu(
            index,
            fd,
            &write_fds,
            vcpu.clone(),
            buses.clone(),
            exit.clone(),
        )?;
        go.push(sender);
        threads.push(Some(thread));
    }
    Ok(KvmBackend {
        _vm: vm,
        _mem: mem,
        serial: serial_dev,
        ged,
        serial_in,
        serial_room,
        input: VecDeque::new(),
        vcpu,
        go,
        io,
        disks,
        threads,
        running: false,
        paused: false,
        pausing: None,
        end: None,
        killed: false,
        events: Vec::new(),
    })
}

/// Starts vCPU `index`'s thread (`vcpuN`), waiting for the go; then it
/// installs its own filter (KVM_RUN on its own vCPU) and runs the guest.
/// Spawned while root: the drop (chroot, uids) covers the whole process.
fn spawn_vcpu(
    index: usize,
    mut fd: kvm_ioctls::VcpuFd,
    write_fds: &[std::os::fd::RawFd],
    shared: Arc<VcpuShared>,
    buses: Arc<(Bus, Bus)>,
    exit: Arc<GuestExit>,
) -> Result<(mpsc::Sender<()>, JoinHandle<()>), KvmError> {
    let filter = vcpu_filter(vcpu_raw_fd(&fd), write_fds)
        .map_err(|e| KvmError::Config(format!("the vCPU filter: {e}")))?;
    let (go, wait) = mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name(format!("vcpu{index}"))
        .spawn(move || {
            // The monitor says go, or drops the sender: give up.
            if wait.recv().is_err() {
                return;
            }
            if let Some(tid) = shared.tids.get(index) {
                tid.store(pause::thread_id(), Ordering::SeqCst);
            }
            let end = match seccompiler::apply_filter(&filter) {
                Err(e) => VcpuEnd::Failed(format!("installing the vCPU filter: {e}")),
                Ok(()) => {
                    shared.set(index, VcpuState::Running);
                    let parked = |on: bool| {
                        let state = if on {
                            VcpuState::Paused
                        } else {
                            VcpuState::Running
                        };
                        shared.set(index, state)
                    };
                    let (pio, mmio) = &*buses;
                    pause::with_immediate_exit(&mut fd, |vcpu| {
                        let pause: (&Pause, &dyn Fn(bool)) = (&shared.pause, &parked);
                        vcpu_run_pausable(vcpu, pio, mmio, &exit, Some(pause))
                    })
                }
            };
            shared.set(index, VcpuState::Ended(end));
        })
        .map_err(|e| KvmError::Config(format!("starting the vCPU thread: {e}")))?;
    Ok((go, thread))
}

/// The disks' block devices (the parent opened every layer, as for
/// QEMU) and the interfaces' net devices (on the parent's taps; the
/// vhost-net descriptors, QEMU's, are closed) on the MMIO bus; their
/// I/O thread and the disks' counters.
fn attach_virtio_devices(
    machine: &mut Machine,
    params: &VmParams,
    fds: &mut StartFds,
) -> Result<(Option<IoThread>, Vec<Arc<DiskCounters>>), VmError> {
    fds.vhosts.clear();
    let blocks = block_devices(std::mem::take(&mut fds.disks))?;
    let counters = blocks.iter().map(|b| b.counters()).collect();
    let nets = net_devices(std::mem::take(&mut fds.taps), &params.macs)?;
    Ok((machine.attach_virtio_devices(blocks, nets)?, counters))
}

impl Backend for KvmBackend {
    fn thread_filter(&self, role: ThreadRole) -> RoleFilter {
        match role {
            ThreadRole::Main => RoleFilter {
                syscalls: KVM_MAIN_SYSCALLS,
                with_args: KVM_MAIN_ARG_RULES,
            },
        }
    }

    fn resume(&mut self, registry: &Registry) -> std::io::Result<()> {
        for (fd, token) in [
            (self.vcpu.changed.as_raw_fd(), VCPU),
            (self.serial_in.as_raw_fd(), SERIAL_IN),
            (self.serial_room.as_raw_fd(), SERIAL_ROOM),
        ] {
            registry.register(&mut SourceFd(&fd), token, Interest::READABLE)?;
        }
        if let Some(io) = &mut self.io {
            io.go();
        }
        for go in self.go.drain(..) {
            let _ = go.send(());
        }
        Ok(())
    }

    fn on_ready(&mut self, token: Token, buf: &mut [u8]) {
        match token {
            VCPU => self.on_vcpu(),
            SERIAL_IN => self.on_serial_in(buf),
            SERIAL_ROOM => {
                let _ = self.serial_room.read();
                self.feed();
                self.on_serial_in(buf);
            }
            _ => {}
        }
    }

    fn command(&mut self, command: VmCommand, fd: Option<OwnedFd>) {
        let error = match &command {
            VmCommand::Probe { text, steps } => {
                let events = probe(&command, text, *steps, fd);
                return self.events.extend(events);
            }
            VmCommand::Pause | VmCommand::Unpause => match self.pause(&command) {
                Ok(()) => return,
                Err(e) => e,
            },
            VmCommand::Powerdown => match self.power_button() {
                Ok(()) => return self.command_done(command, None),
                Err(e) => e,
            },
            VmCommand::Send { .. } => "backend kvm cannot send a VM yet".to_string(),
        };
        self.command_done(command, Some(error));
    }

    /// The disks' counters, answered at once: the I/O thread keeps them
    /// in atomics.
    fn query_disks(&mut self) -> bool {
        let disks = self.disks.iter().map(|d| d.stats()).collect();
        self.events.push(BackendEvent::Disks(disks));
        true
    }

    fn take_events(&mut self) -> Vec<BackendEvent> {
        std::mem::take(&mut self.events)
    }

    fn timer(&self) -> Option<Instant> {
        None
    }

    fn on_timer(&mut self, _now: Instant) {}

    fn has_ended(&self) -> bool {
        self.end.is_some() || self.killed
    }

    /// The process exits right after: a vCPU in KVM_RUN goes with it.
    fn kill(&mut self) {
        self.killed = true;
        // A thread still waiting gives up.
        self.go.clear();
    }

    fn finish(&mut self, _wait_until: &mut dyn FnMut(Instant) -> bool) -> Ended {
        if self.end.is_some() {
            // The vCPUs that ended; the others go with the process.
            let states = lock(&self.vcpu.states).clone();
            for (thread, state) in self.threads.iter_mut().zip(states) {
                if matches!(state, VcpuState::Ended(_)) {
                    if let Some(thread) = thread.take() {
                        let _ = thread.join();
                    }
                }
            }
        }
        let (clean, why) = match &self.end {
            Some(VcpuEnd::Reset) => (true, "the guest reset".to_string()),
            Some(VcpuEnd::PowerOff) => (true, "the guest powered off".to_string()),
            Some(VcpuEnd::Failed(why)) => (false, format!("the vCPU failed: {why}")),
            None => (false, "the monitor was stopped".to_string()),
        };
        log_debug!("backend kvm: {why}");
        Ended {
            clean,
            start_failed: (!self.running).then(|| crate::vm::start_reason(&why)),
            why,
        }
    }
}

impl KvmBackend {
    fn command_done(&mut self, command: VmCommand, error: Option<String>) {
        if let Some(e) = &error {
            log_warn!("{}: {e}", command.name());
        }
        self.events
            .push(BackendEvent::CommandDone { command, error });
    }

    /// Asks the vCPU to park (kicked out of KVM_RUN) or to go on; the
    /// answer comes when it has ([`KvmBackend::on_vcpu`]).
    fn pause(&mut self, command: &VmCommand) -> Result<(), String> {
        let pause = *command == VmCommand::Pause;
        if !self.running || self.end.is_some() {
            return Err("the guest is not running".into());
        }
        if self.pausing.is_some() {
            return Err("a pause or unpause is under way".into());
        }
        match (self.paused, pause) {
            (true, true) => return Err("the guest is already paused".into()),
            (false, false) => return Err("the guest is not paused".into()),
            _ => {}
        }
        self.vcpu.pause.ask(pause);
        if pause {
            let pid = std::process::id() as libc::pid_t;
            for (index, tid) in self.vcpu.tids.iter().enumerate() {
                if let Err(e) = pause::kick(pid, tid.load(Ordering::SeqCst)) {
                    self.vcpu.pause.ask(false);
                    return Err(format!("kicking vCPU {index}'s thread: {e}"));
                }
            }
        }
        self.pausing = Some(command.clone());
        Ok(())
    }

    /// Presses the guest's power button (devices/ged.rs): what the guest
    /// does then is its own; the parent forces it at the shutdown
    /// timeout, as with QEMU's `system_powerdown`.
    fn power_button(&mut self) -> Result<(), String> {
        if !self.running {
            return Err("the guest is not running yet".into());
        }
        if self.paused || self.pausing.is_some() {
            // A parked guest cannot see its power button: it goes on, as
            // QEMU's backend does.
            self.vcpu.pause.ask(false);
            if let Some(pausing) = self.pausing.take() {
                let error = "the power button unpaused the guest".to_string();
                self.command_done(pausing, Some(error));
            }
        }
        lock(&self.ged)
            .press_power_button()
            .map_err(|e| format!("raising the power button's interrupt: {e}"))?;
        log_debug!("power button pressed");
        Ok(())
    }

    fn on_vcpu(&mut self) {
        let _ = self.vcpu.changed.read();
        let state = self.vcpu.machine_state();
        match state {
            VcpuState::Waiting => {}
            VcpuState::Running => {
                self.on_running();
                self.on_paused(false);
            }
            VcpuState::Paused => self.on_paused(true),
            VcpuState::Ended(end) => {
                let reason = match &end {
                    VcpuEnd::Reset => Some("guest-reset"),
                    VcpuEnd::PowerOff => Some("guest-shutdown"),
                    VcpuEnd::Failed(why) => {
                        log_warn!("the vCPU failed: {why}");
                        None
                    }
                };
                if let Some(reason) = reason {
                    // It ran even if the monitor had not heard yet.
                    self.on_running();
                    log_info!("guest shutdown ({reason})");
                    self.events.push(BackendEvent::Shutdown {
                        reason: reason.to_string(),
                    });
                }
                self.end = Some(end);
            }
        }
    }

    /// The vCPU parked (`paused`) or went on: a pause or unpause waiting
    /// for it is done.
    fn on_paused(&mut self, paused: bool) {
        if self.paused != paused {
            self.paused = paused;
            log_info!("guest {}", if paused { "paused" } else { "unpaused" });
        }
        let want = if paused {
            VmCommand::Pause
        } else {
            VmCommand::Unpause
        };
        if self.pausing.as_ref() == Some(&want) {
            self.pausing = None;
            self.command_done(want, None);
        }
    }

    fn on_running(&mut self) {
        if !self.running {
            self.running = true;
            log_info!("guest running");
            self.events.push(BackendEvent::Running {
                pids: vec![std::process::id()],
            });
        }
    }

    /// Reads console input while there is room to hold it.
    fn on_serial_in(&mut self, buf: &mut [u8]) {
        while self.input.len() < INPUT_MAX {
            let room = buf.len().min(INPUT_MAX - self.input.len());
            match read_some(self.serial_in.as_raw_fd(), &mut buf[..room]) {
                Ok(Some(n)) if n > 0 => {
                    self.input.extend(&buf[..n]);
                    self.feed();
                }
                _ => break,
            }
        }
    }

    /// Gives the guest what its FIFO takes.
    fn feed(&mut self) {
        if self.input.is_empty() {
            return;
        }
        let mut serial = lock(&self.serial);
        let (head, _) = self.input.as_slices();
        let taken = serial.enqueue(head);
        drop(serial);
        self.input.drain(..taken);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(states: Vec<VcpuState>) -> VcpuShared {
        VcpuShared {
            tids: states.iter().map(|_| AtomicI32::new(0)).collect(),
            states: Mutex::new(states),
            changed: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            pause: Pause::default(),
        }
    }

    /// The machine runs when every vCPU does, is paused when every vCPU
    /// is parked, and ends with its first vCPU's end.
    #[test]
    fn the_machine_state_follows_all_its_vcpus() {
        use VcpuState::*;
        let machine = shared(vec![Waiting, Waiting]);
        assert_eq!(machine.machine_state(), Waiting);
        machine.set(0, Running);
        assert_eq!(machine.machine_state(), Waiting);
        machine.set(1, Running);
        assert_eq!(machine.machine_state(), Running);
        assert_eq!(machine.changed.read().expect("told"), 2);
        machine.set(1, Paused);
        assert_eq!(machine.machine_state(), Waiting, "half parked");
        machine.set(0, Paused);
        assert_eq!(machine.machine_state(), Paused);
        machine.set(0, Running);
        assert_eq!(machine.machine_state(), Waiting, "half going on");
        machine.set(1, Ended(VcpuEnd::PowerOff));
        assert_eq!(machine.machine_state(), Ended(VcpuEnd::PowerOff));
        machine.set(7, Running);
        assert_eq!(machine.machine_state(), Ended(VcpuEnd::PowerOff));
    }
}
