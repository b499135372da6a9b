//! A vCPU: its setup for the 64-bit Linux entry (CPUID with its APIC id,
//! boot MSRs, FPU, the local APIC's LINT0/LINT1, registers) and its
//! thread, which runs KVM_RUN and routes port and MMIO exits to the buses.
//!
//! The thread is created before the VM process drops its privileges and
//! waits; the drop (chroot, uid: the whole process) happens meanwhile, and
//! then the thread installs its own filter ([`vcpu_filter`]: KVM_RUN on
//! its own vCPU, writes to its devices' descriptors, little else) before
//! it runs the guest. It never inherits the monitor thread's filter, nor
//! the monitor thread its.

use super::boot;
use super::bus::Bus;
use super::devices::{ExitKind, GuestExit};
use super::pause::Pause;
use super::KvmError;
use crate::seccomp::{self, Allowed, MatchRule};
use kvm_bindings::{kvm_fpu, kvm_msr_entry, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use std::os::fd::{AsRawFd, RawFd};
use vm_memory::GuestAddress;

/// `KVM_RUN`: `_IO(0xae, 0x80)`.
pub const KVM_RUN: u64 = 0xae80;

/// How a vCPU's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuEnd {
    /// The guest reset (i8042, ACPI reset register, triple fault).
    Reset,
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// KVM or the guest failed; why.
    Failed(String),
}

impl From<ExitKind> for VcpuEnd {
    fn from(kind: ExitKind) -> VcpuEnd {
        match kind {
            ExitKind::Reset => VcpuEnd::Reset,
            ExitKind::PowerOff => VcpuEnd::PowerOff,
        }
    }
}

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// The MSRs a vCPU starts with (Firecracker's boot set).
pub fn boot_msrs() -> Vec<(u32, u64)> {
    vec![
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
}

/// KVM's supported CPUID for vCPU `apic_id`: its APIC id in leaves 1 and
/// 0xb, and the hypervisor bit.
pub fn vcpu_cpuid(supported: &CpuId, apic_id: u8) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx = (entry.ebx & 0x00ff_ffff) | ((apic_id as u32) << 24);
                entry.ecx |= 1 << 31;
            }
            0xb => entry.edx = apic_id as u32,
            _ => {}
        }
    }
    cpuid
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 4;
const APIC_MODE_EXTINT: u32 = 7;
const APIC_LVT_MASKED: u32 = 1 << 16;

fn lapic_reg(regs: &[std::os::raw::c_char], offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char], offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as std::os::raw::c_char;
    }
}

/// LINT0 as ExtINT, LINT1 as NMI (a PC's wiring). LINT0 starts masked:
/// Linux keeps it masked then and takes every interrupt from the IOAPIC;
/// it would otherwise enable ExtINT on the boot CPU, and on a
/// hardware-reduced platform it never programs the 8259 behind it.
pub fn lint_delivery(lvt: u32, mode: u32) -> u32 {
    (lvt & !0x700) | (mode << 8)
}

fn fail(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> KvmError {
    KvmError::os(what)
}

/// Sets vCPU `vcpu` (APIC id `apic_id`) up to enter `entry` in 64-bit
/// mode on the boot tables.
pub fn setup_vcpu(
    kvm: &Kvm,
    vcpu: &VcpuFd,
    apic_id: u8,
    entry: GuestAddress,
) -> Result<(), KvmError> {
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(fail("KVM_GET_SUPPORTED_CPUID"))?;
    vcpu.set_cpuid2(&vcpu_cpuid(&supported, apic_id))
        .map_err(fail("KVM_SET_CPUID2"))?;
    let entries: Vec<kvm_msr_entry> = boot_msrs()
        .into_iter()
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries)
        .map_err(|e| KvmError::Boot(format!("building the boot MSRs: {e:?}")))?;
    let set = vcpu.set_msrs(&msrs).map_err(fail("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(KvmError::Boot(format!(
            "KVM refused boot MSR {:#x}",
            entries[set].index
        )));
    }
    let sregs = vcpu.get_sregs().map_err(fail("KVM_GET_SREGS"))?;
    vcpu.set_sregs(&boot::long_mode_sregs(sregs))
        .map_err(fail("KVM_SET_SREGS"))?;
    vcpu.set_regs(&boot::entry_regs(entry))
        .map_err(fail("KVM_SET_REGS"))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(fail("KVM_SET_FPU"))?;
    let mut lapic = vcpu.get_lapic().map_err(fail("KVM_GET_LAPIC"))?;
    let lvt0 = lapic_reg(&lapic.regs, APIC_LVT0);
    set_lapic_reg(
        &mut lapic.regs,
        APIC_LVT0,
        lint_delivery(lvt0, APIC_MODE_EXTINT) | APIC_LVT_MASKED,
    );
    let lvt1 = lapic_reg(&lapic.regs, APIC_LVT1);
    set_lapic_reg(
        &mut lapic.regs,
        APIC_LVT1,
        lint_delivery(lvt1, APIC_MODE_NMI),
    );
    vcpu.set_lapic(&lapic).map_err(fail("KVM_SET_LAPIC"))?;
    Ok(())
}

/// Runs the vCPU until the guest resets, powers off or fails. Port and
/// MMIO exits go to `pio` and `mmio`; the devices' requests come through
/// `exit`.
#[cfg(test)]
pub fn vcpu_run(vcpu: &mut VcpuFd, pio: &Bus, mmio: &Bus, exit: &GuestExit) -> VcpuEnd {
    vcpu_run_pausable(vcpu, pio, mmio, exit, None)
}

/// [`vcpu_run`], parked between two KVM_RUNs while `pause` asks
/// (vm/kvm/pause.rs), telling `parked(true)` then `parked(false)`.
pub fn vcpu_run_pausable(
    vcpu: &mut VcpuFd,
    pio: &Bus,
    mmio: &Bus,
    exit: &GuestExit,
    pause: Option<(&Pause, &dyn Fn(bool))>,
) -> VcpuEnd {
    loop {
        if let Some((pause, parked)) = pause {
            pause.park_while_asked(vcpu, parked);
        }
        match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                pio.read(port as u64, data);
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                pio.write(port as u64, data);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                mmio.read(addr, data);
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                mmio.write(addr, data);
            }
            // A triple fault: a PC resets.
            Ok(VcpuExit::Shutdown) => return VcpuEnd::Reset,
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => return VcpuEnd::PowerOff,
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => return VcpuEnd::Reset,
                other => return VcpuEnd::Failed(format!("KVM system event {other}")),
            },
            Ok(VcpuExit::Hlt) => {
                return VcpuEnd::Failed("the vCPU halted outside the in-kernel irqchip".into())
            }
            Ok(VcpuExit::Intr) => {}
            Ok(VcpuExit::FailEntry(reason, _)) => {
                return VcpuEnd::Failed(format!(
                    "KVM could not enter the guest (hardware reason {reason:#x})"
                ))
            }
            Ok(VcpuExit::InternalError) => {
                return VcpuEnd::Failed("KVM internal error (emulation failed)".into())
            }
            Ok(other) => return VcpuEnd::Failed(format!("unexpected vCPU exit {other:?}")),
            Err(e) if matches!(e.errno(), libc::EINTR | libc::EAGAIN) => {}
            Err(e) => return VcpuEnd::Failed(format!("KVM_RUN: {e}")),
        }
        if let Some(kind) = exit.requested() {
            return kind.into();
        }
    }
}

/// What every thread of the monitor's own (the vCPUs, the virtio I/O
/// thread) calls with any arguments: the memory allocator and the
/// thread's exit.
pub const THREAD_SYSCALLS: &[Allowed] = &[
    (libc::SYS_futex, "take a device's lock, wait for the start"),
    (libc::SYS_mmap, "memory allocator: large blocks"),
    (libc::SYS_munmap, "memory allocator, and the thread's exit"),
    (libc::SYS_mremap, "memory allocator: grow large blocks"),
    (libc::SYS_brk, "memory allocator: heap"),
    (libc::SYS_madvise, "memory allocator, and the thread's exit"),
    (libc::SYS_rt_sigprocmask, "the thread's exit"),
    (
        libc::SYS_sigaltstack,
        "the thread's exit drops its signal stack",
    ),
    (libc::SYS_exit, "the thread's exit"),
    (libc::SYS_exit_group, "a panic's exit"),
];

/// What a vCPU thread calls with any arguments beyond
/// [`THREAD_SYSCALLS`], and why.
pub const VCPU_SYSCALLS: &[Allowed] = &[
    (
        libc::SYS_poll,
        "wait a bounded time for room in the console socket",
    ),
    (
        libc::SYS_ppoll,
        "wait a bounded time for room in the console socket (newer libc)",
    ),
    (libc::SYS_close, "the thread's exit closes its vCPU"),
    (
        libc::SYS_rt_sigreturn,
        "return from the pause kick's handler (vm/kvm/pause.rs)",
    ),
];

/// The vCPU thread's filter: [`VCPU_SYSCALLS`], KVM_RUN on `vcpu_fd`
/// only, write only to `write_fds` (console output, interrupt and device
/// eventfds), sendmsg only to the parent (the SIGSYS handler's report).
pub fn vcpu_filter(vcpu_fd: RawFd, write_fds: &[RawFd]) -> Result<seccompiler::BpfProgram, String> {
    let mut rules = vec![
        MatchRule {
            nr: libc::SYS_ioctl,
            args: vec![(0, vcpu_fd as u64), (1, KVM_RUN)],
            why: "KVM_RUN on its own vCPU",
        },
        MatchRule {
            nr: libc::SYS_sendmsg,
            args: vec![(0, crate::proc::CHILD_FD as u64)],
            why: "the SIGSYS handler reports a refused call to the parent",
        },
    ];
    rules.extend(write_fds.iter().map(|&fd| MatchRule {
        nr: libc::SYS_write,
        args: vec![(0, fd as u64)],
        why: "console output, interrupts and device notifications",
    }));
    seccomp::compile_matching(&[THREAD_SYSCALLS, VCPU_SYSCALLS], &[], &rules)
        .map_err(|e| e.to_string())
}

/// The descriptor of a vCPU, for its filter.
pub fn vcpu_raw_fd(vcpu: &VcpuFd) -> RawFd {
    vcpu.as_raw_fd()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lint0_is_extint_and_lint1_nmi() {
        assert_eq!(lint_delivery(0x0001_0700, APIC_MODE_NMI), 0x0001_0400);
        assert_eq!(lint_delivery(0, APIC_MODE_EXTINT), 0x700);
        let mut regs = [0 as std::os::raw::c_char; 1024];
        set_lapic_reg(&mut regs, APIC_LVT0, 0x1234_5678);
        assert_eq!(lapic_reg(&regs, APIC_LVT0), 0x1234_5678);
    }

    #[test]
    fn the_vcpu_filter_compiles_with_its_reasons() {
        assert!(vcpu_filter(10, &[11, 12]).is_ok());
        assert!(VCPU_SYSCALLS.iter().all(|(_, why)| !why.is_empty()));
    }

    #[test]
    fn boot_msrs_turn_mtrrs_on_write_back() {
        let msrs = boot_msrs();
        assert!(msrs.contains(&(MSR_MTRR_DEF_TYPE, (1 << 11) | 6)));
        assert!(msrs.contains(&(MSR_IA32_MISC_ENABLE, 1)));
    }
}
