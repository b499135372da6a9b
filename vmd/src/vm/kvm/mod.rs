//! `backend kvm`: our own monitor on /dev/kvm, inside the VM process, no
//! QEMU. A Firecracker-sized machine: 1 to 64 vCPUs, guest memory through
//! vm-memory, the Linux 64-bit boot protocol ([`boot`]), ACPI tables
//! ([`acpi`]), the in-kernel irqchip and PIT, and legacy devices on the
//! port bus ([`bus`], [`devices`]): the 8250 console, the i8042's reset
//! line, the ACPI sleep and reset registers. Virtio devices (`virtio/`)
//! attach to the MMIO bus.
//!
//! The parent opens /dev/kvm and passes it; the VM process, still root,
//! creates the VM, maps and fills its memory, creates the vCPU and its
//! thread ([`prepare`]), then drops (chroot, the VM's uid, no
//! capabilities) and installs its monitor thread's filter
//! ([`KVM_MAIN_SYSCALLS`] on top of the VM process's); the vCPU thread
//! installs its own ([`vcpu::vcpu_filter`]) before the guest runs
//! ([`backend`]).
//!
//! What it cannot do yet is refused at start ([`unsupported`]), never
//! ignored.

pub mod acpi;
mod backend;
pub mod boot;
pub mod bus;
pub mod devices;
pub mod pause;
#[cfg(test)]
mod tests;
pub mod vcpu;
// The virtio device layer (some accessors only its tests call).
#[allow(dead_code)]
pub mod virtio;

pub use backend::prepare;
#[cfg(test)]
pub use backend::{KVM_MAIN_ARG_RULES, KVM_MAIN_SYSCALLS};

use bus::Bus;
use common::config::VmConfig;
use devices::ged::{Ged, GED_GSI, GED_LEN, GED_PORT};
use devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use devices::power::{Power, POWER_BASE, POWER_LEN};
use devices::serial::{Output, Serial, SERIAL_BASE, SERIAL_IRQ, SERIAL_LEN};
use devices::GuestExit;
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use nix::errno::Errno;
use std::fs::File;
use std::os::fd::{OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use thiserror::Error;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[derive(Debug, Error)]
pub enum KvmError {
    #[error("/dev/kvm: {what}: {}", err.desc())]
    Kvm { what: &'static str, err: Errno },
    #[error("{0}")]
    Memory(String),
    #[error("{0}")]
    Boot(String),
    #[error("{0}")]
    Config(String),
}

impl KvmError {
    /// A failed KVM ioctl (or eventfd), named.
    pub fn os(what: &'static str) -> impl Fn(vmm_sys_util::errno::Error) -> KvmError {
        move |e| KvmError::Kvm {
            what,
            err: Errno::from_raw(e.errno()),
        }
    }
}

/// What `backend kvm` cannot run yet, in words for vmctl and `vmd -n`;
/// None when it runs `vm`.
pub fn unsupported(vm: &VmConfig) -> Option<String> {
    let max = virtio::attach::MAX_VIRTIO_DEVICES;
    let what = if vm.boot.is_none() {
        "a BIOS or CD-ROM boot (it boots a Linux kernel, `boot`)".into()
    } else if vm.cdrom.is_some() {
        "a CD-ROM".into()
    } else if vm.disks.len() + vm.effective_interfaces().len() > max {
        format!("more than {max} disks and network interfaces together")
    } else {
        return None;
    };
    Some(format!("backend kvm does not support {what} yet"))
}

/// The most vCPUs backend kvm runs: vm.conf's bound (APIC ids are one
/// byte in the MADT and CPUID).
pub const VCPU_MAX: u8 = 64;

fn io_error(what: &'static str) -> impl Fn(std::io::Error) -> KvmError {
    move |e| KvmError::Kvm {
        what,
        err: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
    }
}

/// Masks every line of KVM's 8259 PICs, as a PC's firmware leaves them.
/// A hardware-reduced guest never programs them (Linux bypasses the
/// legacy PIC there), and KVM raises each ISA interrupt on the PIC as
/// well as on the IOAPIC: unmasked, the PIC would hand the vCPU the same
/// interrupt again as an ExtINT with a vector the guest never set up.
fn mask_pic(vm: &VmFd) -> Result<(), KvmError> {
    for chip_id in [
        kvm_bindings::KVM_IRQCHIP_PIC_MASTER,
        kvm_bindings::KVM_IRQCHIP_PIC_SLAVE,
    ] {
        let mut chip = kvm_bindings::kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip)
            .map_err(KvmError::os("KVM_GET_IRQCHIP"))?;
        chip.chip.pic.imr = 0xff;
        vm.set_irqchip(&chip)
            .map_err(KvmError::os("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}

/// A VM on /dev/kvm with its memory, buses and devices, and its vCPU.
pub struct Machine {
    pub kvm: Kvm,
    pub vm: VmFd,
    pub mem: GuestMemoryMmap,
    pub pio: Bus,
    pub mmio: Bus,
    pub exit: Arc<GuestExit>,
    pub serial: Arc<Mutex<Serial>>,
    /// The power button's Generic Event Device.
    pub ged: Arc<Mutex<Ged>>,
    /// Written when the guest has drained the serial input FIFO.
    pub serial_room: EventFd,
    /// What the vCPU thread writes to (its filter allows only these).
    pub write_fds: Vec<RawFd>,
    pub vcpu: VcpuFd,
    /// How many virtio devices are on the MMIO bus (for the DSDT).
    pub virtio_devices: usize,
    /// vCPUs 1 and up, the application processors ([`Machine::add_aps`]):
    /// they wait for the boot vCPU's INIT and SIPI (the in-kernel LAPIC).
    pub aps: Vec<VcpuFd>,
    /// Kept open: the irqfd and the serial's wake-up are these eventfds'
    /// other ends.
    _keep: Vec<EventFd>,
}

impl Machine {
    /// A VM with `memory` bytes of RAM (empty), the in-kernel irqchip and
    /// PIT, the legacy devices (the serial port writing to
    /// `serial_output`, non-blocking) and one vCPU, not set up yet.
    pub fn new(kvm: Kvm, memory: u64, serial_output: OwnedFd) -> Result<Machine, KvmError> {
        const KVM_API_VERSION: i32 = 12;
        if kvm.get_api_version() != KVM_API_VERSION {
            return Err(KvmError::Config(format!(
                "/dev/kvm speaks API version {}, not {KVM_API_VERSION}",
                kvm.get_api_version()
            )));
        }
        let vm = kvm.create_vm().map_err(KvmError::os("KVM_CREATE_VM"))?;
        vm.set_tss_address(boot::KVM_TSS_ADDR)
            .map_err(KvmError::os("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip()
            .map_err(KvmError::os("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit)
            .map_err(KvmError::os("KVM_CREATE_PIT2"))?;
        mask_pic(&vm)?;
        let mem = boot::guest_memory(memory)?;
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| KvmError::Memory(format!("guest memory: {e}")))?;
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: the region is mapped by `mem`, which the machine
            // keeps for as long as the VM exists (the VM process's life).
            unsafe { vm.set_user_memory_region(region) }
                .map_err(KvmError::os("KVM_SET_USER_MEMORY_REGION"))?;
        }

        let eventfd = || EventFd::new(EFD_NONBLOCK).map_err(io_error("eventfd"));
        let exit = Arc::new(GuestExit::default());
        let serial_irq = eventfd()?;
        vm.register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(KvmError::os("KVM_IRQFD"))?;
        let serial_room = eventfd()?;
        let clone = |fd: &EventFd| fd.try_clone().map_err(io_error("eventfd"));
        let serial = Serial::new(
            clone(&serial_irq)?,
            clone(&serial_room)?,
            Output::new(serial_output),
        );
        // The descriptors the vCPU writes to are the device's own.
        let write_fds = serial.write_fds();
        let serial = Arc::new(Mutex::new(serial));
        let mut pio = Bus::new();
        let attach = |bus: &mut Bus, base, len, dev| {
            bus.insert(base, len, dev)
                .map_err(|e| KvmError::Config(e.to_string()))
        };
        attach(&mut pio, SERIAL_BASE, SERIAL_LEN, serial.clone())?;
        attach(
            &mut pio,
            I8042_BASE,
            I8042_LEN,
            Arc::new(Mutex::new(I8042::new(exit.clone()))),
        )?;
        attach(
            &mut pio,
            POWER_BASE,
            POWER_LEN,
            Arc::new(Mutex::new(Power::new(exit.clone()))),
        )?;
        let ged_irq = eventfd()?;
        vm.register_irqfd(&ged_irq, GED_GSI)
            .map_err(KvmError::os("KVM_IRQFD"))?;
        let ged = Arc::new(Mutex::new(Ged::new(clone(&ged_irq)?)));
        attach(&mut pio, GED_PORT, GED_LEN, ged.clone())?;
        let vcpu = vm.create_vcpu(0).map_err(KvmError::os("KVM_CREATE_VCPU"))?;
        Ok(Machine {
            kvm,
            vm,
            mem,
            pio,
            mmio: Bus::new(),
            exit,
            serial,
            ged,
            serial_room,
            write_fds,
            vcpu,
            virtio_devices: 0,
            aps: Vec::new(),
            _keep: vec![serial_irq, ged_irq],
        })
    }

    /// Creates vCPUs 1 to `vcpus - 1`, before [`Machine::boot_linux`].
    pub fn add_aps(&mut self, vcpus: u8) -> Result<(), KvmError> {
        if vcpus == 0 || vcpus > VCPU_MAX {
            return Err(KvmError::Config(format!(
                "backend kvm runs 1 to {VCPU_MAX} vCPUs, not {vcpus}"
            )));
        }
        for id in self.aps.len() as u8 + 1..vcpus {
            let ap = self
                .vm
                .create_vcpu(id as u64)
                .map_err(KvmError::os("KVM_CREATE_VCPU"))?;
            self.aps.push(ap);
        }
        Ok(())
    }

    /// Loads a Linux bzImage, its initrd and command line, the boot
    /// tables and ACPI, and sets the vCPU up at the kernel's 64-bit entry.
    pub fn boot_linux(
        &mut self,
        kernel: &mut File,
        initrd: Option<&mut File>,
        cmdline: &str,
        memory: u64,
    ) -> Result<(), KvmError> {
        let loaded = boot::load_kernel(&self.mem, kernel)?;
        let initrd = initrd
            .map(|f| boot::load_initrd(&self.mem, &loaded.header, memory, f))
            .transpose()?;
        let params = boot::boot_params(&loaded.header, cmdline, initrd, memory)?;
        boot::write_boot_params(&self.mem, &params, cmdline)?;
        boot::write_boot_tables(&self.mem)?;
        acpi::write_tables(&self.mem, 1 + self.aps.len() as u8, self.virtio_devices)?;
        // The application processors get the same setup (their CPUID
        // with their own APIC id above all); the boot vCPU's INIT and
        // SIPI reset the rest when Linux brings them up.
        for (index, ap) in self.aps.iter().enumerate() {
            vcpu::setup_vcpu(&self.kvm, ap, index as u8 + 1, loaded.entry)?;
        }
        vcpu::setup_vcpu(&self.kvm, &self.vcpu, 0, loaded.entry)
    }

    /// Puts `blocks`, then `nets` on the MMIO bus at
    /// their windows and GSIs ([`virtio::attach`]), before
    /// [`Self::boot_linux`] describes them in the DSDT; returns the I/O
    /// thread, started and waiting for its go (none without devices).
    pub fn attach_virtio_devices(
        &mut self,
        blocks: Vec<virtio::block::Block>,
        nets: Vec<virtio::net::Net>,
    ) -> Result<Option<virtio::attach::IoThread>, KvmError> {
        let count = blocks.len() + nets.len();
        if count == 0 {
            return Ok(None);
        }
        let (work, write_fds) =
            virtio::attach::attach(&self.vm, &self.mem, &mut self.mmio, blocks, nets)?;
        self.write_fds.extend(write_fds);
        self.virtio_devices = count;
        virtio::attach::IoThread::spawn(work).map(Some)
    }
}
