//! The guest's memory layout and the Linux boot protocol in 64-bit mode,
//! as Firecracker boots (Documentation/x86/boot.rst, "64-bit Boot
//! Protocol"): the bzImage's protected-mode kernel at 1 MiB (loaded by
//! linux-loader), the zero page (boot_params) at [`ZERO_PAGE`] with the
//! command line, initrd, e820 map and the RSDP's address, a GDT with flat
//! 64-bit code and data, identity page tables for the first GiB, and the
//! vCPU entering at the kernel's 64-bit entry (load address + 0x200) with
//! RSI pointing at the zero page.
//!
//! Every write goes through vm-memory's checked accessors: an address
//! outside guest memory is an error, never a write elsewhere.

use super::KvmError;
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::{BzImage, KernelLoader};
use std::fs::File;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

/// Start of the hole below 4 GiB for the IOAPIC, the local APICs and
/// devices' MMIO windows: RAM above it continues at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 1 << 32;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// Where KVM puts the TSS it needs for real mode (3 pages, inside the
/// gap, never RAM).
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;

/// The end of the low RAM the BIOS data area and EBDA would use: below
/// it RAM, up to 1 MiB reserved (ACPI tables live there).
pub const EBDA_START: u64 = 0x9fc00;
pub const HIMEM_START: u64 = 0x10_0000;
/// The ACPI tables: the RSDP where a BIOS puts it, the others after it.
pub const RSDP_ADDR: u64 = 0xe_0000;
pub const ACPI_END: u64 = HIMEM_START;

/// Where a CPU starts after a reset, and where Linux jumps to reboot
/// through the BIOS (`machine_real_restart`).
pub const RESET_VECTOR: u64 = 0xffff0;
/// What vmd puts there for lack of a BIOS, in 16-bit code: the ACPI reset
/// (`mov $0x602, %dx; mov $1, %al; out %al, (%dx)`), then `hlt; jmp .-1`.
/// Linux reboots that way on a hardware-reduced platform without EFI
/// unless told `reboot=k`: it ends as a reset here too.
pub const RESET_STUB: [u8; 9] = [0xba, 0x02, 0x06, 0xb0, 0x01, 0xee, 0xf4, 0xeb, 0xfd];

pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x520;
pub const ZERO_PAGE: u64 = 0x7000;
pub const BOOT_STACK: u64 = 0x8ff0;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPTE_ADDR: u64 = 0xa000;
pub const PDE_ADDR: u64 = 0xb000;
pub const CMDLINE_ADDR: u64 = 0x20000;
/// The longest command line vmd passes (vm.conf's own limit), with its NUL.
pub const CMDLINE_MAX: usize = 2048;

/// The smallest guest: the boot structures, the kernel at 1 MiB and room
/// for it to unpack.
pub const MEMORY_MIN: u64 = 32 << 20;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// The guest's RAM ranges for `memory` bytes: below the MMIO gap, and
/// the rest from 4 GiB.
pub fn ram_ranges(memory: u64) -> Vec<(GuestAddress, usize)> {
    let low = memory.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if memory > low {
        ranges.push((GuestAddress(MMIO_GAP_END), (memory - low) as usize));
    }
    ranges
}

/// The e820 map of `memory` bytes of RAM: (address, size, type).
pub fn e820_map(memory: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for (start, len) in ram_ranges(memory) {
        let end = start.raw_value() + len as u64;
        let start = start.raw_value().max(HIMEM_START);
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

/// The guest's memory, mapped (anonymous, private).
pub fn guest_memory(memory: u64) -> Result<GuestMemoryMmap, KvmError> {
    if memory < MEMORY_MIN {
        return Err(KvmError::Config(format!(
            "backend kvm needs at least {} of memory",
            common::size::format(MEMORY_MIN)
        )));
    }
    GuestMemoryMmap::from_ranges(&ram_ranges(memory))
        .map_err(|e| KvmError::Memory(format!("mapping guest memory: {e}")))
}

/// Where the kernel was loaded and what the zero page starts from.
pub struct Kernel {
    pub entry: GuestAddress,
    pub header: setup_header,
}

/// Loads a bzImage; refuses one without a 64-bit entry point (boot
/// protocol 2.12 and XLF_KERNEL_64).
pub fn load_kernel(mem: &GuestMemoryMmap, kernel: &mut File) -> Result<Kernel, KvmError> {
    const XLF_KERNEL_64: u16 = 1;
    const ENTRY_64: u64 = 0x200;
    let loaded = BzImage::load(mem, None, kernel, Some(GuestAddress(HIMEM_START)))
        .map_err(|e| KvmError::Boot(format!("the kernel is not a bzImage vmd can load: {e}")))?;
    let header = loaded
        .setup_header
        .ok_or_else(|| KvmError::Boot("the kernel has no setup header".into()))?;
    if header.version < 0x020c || header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(KvmError::Boot(
            "the kernel has no 64-bit entry point (boot protocol 2.12 or later)".into(),
        ));
    }
    let entry = loaded
        .kernel_load
        .checked_add(ENTRY_64)
        .ok_or_else(|| KvmError::Boot("the kernel's entry point is out of range".into()))?;
    Ok(Kernel { entry, header })
}

/// Loads the initrd as high in low memory as the kernel allows, page
/// aligned; its address and size.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    header: &setup_header,
    memory: u64,
    initrd: &mut File,
) -> Result<(u64, u64), KvmError> {
    let size = initrd
        .metadata()
        .map_err(|e| KvmError::Boot(format!("reading the initrd: {e}")))?
        .len();
    let limit = memory
        .min(MMIO_GAP_START)
        .min(header.initrd_addr_max as u64 + 1);
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= HIMEM_START + 16 * (1 << 20))
        .ok_or_else(|| KvmError::Boot("the initrd does not fit in the guest's memory".into()))?;
    mem.read_exact_volatile_from(GuestAddress(addr), initrd, size as usize)
        .map_err(|e| KvmError::Boot(format!("loading the initrd: {e}")))?;
    Ok((addr, size))
}

/// The zero page for `header` (the kernel's), the command line
/// `cmdline`, the initrd and `memory` bytes of RAM. Refuses a command
/// line longer than the kernel takes.
pub fn boot_params(
    header: &setup_header,
    cmdline: &str,
    initrd: Option<(u64, u64)>,
    memory: u64,
) -> Result<boot_params, KvmError> {
    // Before boot protocol 2.06 the limit was 255.
    let limit = match header.cmdline_size {
        0 => 255,
        size => size as usize,
    };
    if cmdline.len() >= CMDLINE_MAX || cmdline.len() > limit || cmdline.contains('\0') {
        return Err(KvmError::Boot(format!(
            "the kernel command line is longer than the kernel takes ({limit} bytes) or holds a NUL"
        )));
    }
    const LOADER_UNDEFINED: u8 = 0xff;
    const BOOT_FLAG: u16 = 0xaa55;
    const HDR_MAGIC: u32 = 0x5372_6448;
    let mut params = boot_params {
        hdr: *header,
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_UNDEFINED;
    params.hdr.boot_flag = BOOT_FLAG;
    params.hdr.header = HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline.len() as u32;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = RSDP_ADDR;
    let map = e820_map(memory);
    if map.len() > params.e820_table.len() {
        return Err(KvmError::Boot("too many e820 entries".into()));
    }
    for (entry, (addr, size, kind)) in params.e820_table.iter_mut().zip(&map) {
        entry.addr = *addr;
        entry.size = *size;
        entry.r#type = *kind;
    }
    params.e820_entries = map.len() as u8;
    Ok(params)
}

/// Writes the command line (NUL-terminated) and the zero page
/// [`boot_params`] made for it.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    params: &boot_params,
    cmdline: &str,
) -> Result<(), KvmError> {
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .and_then(|()| mem.write_obj(*params, GuestAddress(ZERO_PAGE)))
        .map_err(|e| KvmError::Boot(format!("writing the zero page: {e}")))
}

/// A GDT entry from its flags, base and limit (the CPU's format).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0xffff)
}

/// The KVM segment GDT entry `entry` at index `index` describes.
pub fn segment(entry: u64, index: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = bit(55);
    let present = bit(47);
    kvm_segment {
        base,
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        padding: 0,
        unusable: if present == 1 { 0 } else { 1 },
    }
}

/// The boot GDT: null, 64-bit code, data, TSS.
pub const BOOT_GDT: [u64; 4] = [
    0,
    // Present, code, long mode, 4 KiB granularity.
    gdt_entry(0xa09b, 0, 0xfffff),
    // Present, data, 32-bit, 4 KiB granularity.
    gdt_entry(0xc093, 0, 0xfffff),
    // Present, busy 64-bit TSS.
    gdt_entry(0x808b, 0, 0xfffff),
];

const CR0_PE: u64 = 1;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Writes the GDT, an empty IDT, the reset vector's stub and identity
/// page tables mapping the first GiB with 2 MiB pages.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), KvmError> {
    let wrote = (|| {
        for (i, entry) in BOOT_GDT.iter().enumerate() {
            mem.write_obj(*entry, GuestAddress(GDT_ADDR + 8 * i as u64))?;
        }
        mem.write_obj(0u64, GuestAddress(IDT_ADDR))?;
        mem.write_slice(&RESET_STUB, GuestAddress(RESET_VECTOR))?;
        mem.write_obj(PDPTE_ADDR | 0x3, GuestAddress(PML4_ADDR))?;
        mem.write_obj(PDE_ADDR | 0x3, GuestAddress(PDPTE_ADDR))?;
        for i in 0..512u64 {
            // Present, writable, 2 MiB page.
            mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_ADDR + i * 8))?;
        }
        Ok::<(), vm_memory::GuestMemoryError>(())
    })();
    wrote.map_err(|e| KvmError::Boot(format!("writing the boot page tables: {e}")))
}

/// The special registers of a vCPU entering 64-bit mode on the boot
/// tables, from the vCPU's own (`sregs`).
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment(BOOT_GDT[1], 1);
    let data = segment(BOOT_GDT[2], 2);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(BOOT_GDT[3], 3);
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= CR4_PAE;
    sregs.cr0 |= CR0_PE | CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// The general registers at the kernel's 64-bit entry.
pub fn entry_regs(entry: GuestAddress) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry.raw_value(),
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: ZERO_PAGE,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_are_the_cpus_format() {
        // As the CPU manuals lay them out.
        assert_eq!(BOOT_GDT[1], 0x00af_9b00_0000_ffff);
        assert_eq!(BOOT_GDT[2], 0x00cf_9300_0000_ffff);
        assert_eq!(BOOT_GDT[3], 0x008f_8b00_0000_ffff);
        let code = segment(BOOT_GDT[1], 1);
        assert_eq!((code.selector, code.l, code.db, code.present), (8, 1, 0, 1));
        assert_eq!(
            (code.type_, code.s, code.g, code.limit),
            (0xb, 1, 1, 0xffff_ffff)
        );
        let data = segment(BOOT_GDT[2], 2);
        assert_eq!((data.selector, data.l, data.db, data.type_), (16, 0, 1, 3));
        assert_eq!(segment(0, 0).unusable, 1);
        assert_eq!(
            segment(gdt_entry(0x93, 0x1234_5678, 0xabcde), 1).base,
            0x1234_5678
        );
    }

    #[test]
    fn e820_has_low_ram_a_reserved_hole_and_ram_around_the_gap() {
        assert_eq!(
            e820_map(256 << 20),
            [
                (0, 0x9fc00, 1),
                (0x9fc00, 0x60400, 2),
                (0x10_0000, (256 << 20) - 0x10_0000, 1)
            ]
        );
        let big = 4u64 << 30;
        let map = e820_map(big);
        assert_eq!(map[2], (0x10_0000, MMIO_GAP_START - 0x10_0000, 1));
        assert_eq!(map[3], (1 << 32, big - MMIO_GAP_START, 1));
        let ram: u64 = map.iter().filter(|e| e.2 == 1).map(|e| e.1).sum();
        assert_eq!(ram, big - (HIMEM_START - EBDA_START));
        assert_eq!(ram_ranges(big).len(), 2);
        assert_eq!(ram_ranges(1 << 30), [(GuestAddress(0), 1 << 30)]);
    }

    #[test]
    fn the_zero_page_says_what_linux_needs() {
        let header = setup_header {
            version: 0x20f,
            cmdline_size: 2047,
            ..Default::default()
        };
        let params = boot_params(&header, "console=ttyS0", Some((0x200_0000, 4096)), 64 << 20)
            .expect("params");
        let hdr = params.hdr;
        assert_eq!(hdr.type_of_loader, 0xff);
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!({ hdr.cmdline_size }, 13);
        assert_eq!(
            ({ hdr.ramdisk_image }, { hdr.ramdisk_size }),
            (0x200_0000, 4096)
        );
        assert_eq!({ params.acpi_rsdp_addr }, RSDP_ADDR);
        assert_eq!(params.e820_entries, 3);
        let last = params.e820_table[2];
        assert_eq!(
            ({ last.addr }, { last.size }, { last.r#type }),
            (HIMEM_START, (64 << 20) - HIMEM_START, 1)
        );

        let mem = guest_memory(MEMORY_MIN).expect("memory");
        write_boot_params(&mem, &params, "console=ttyS0").expect("write");
        let mut line = [0u8; 14];
        mem.read_slice(&mut line, GuestAddress(CMDLINE_ADDR))
            .expect("read");
        assert_eq!(&line, b"console=ttyS0\0");
        let back: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE)).expect("read");
        assert_eq!({ back.hdr.boot_flag }, 0xaa55);
        let long = "x".repeat(CMDLINE_MAX);
        assert!(boot_params(&header, &long, None, 64 << 20).is_err());
        assert!(boot_params(&header, "a\0b", None, 64 << 20).is_err());
        let old = setup_header::default();
        assert!(boot_params(&old, &"x".repeat(256), None, 64 << 20).is_err());
        assert!(guest_memory(MEMORY_MIN - 1).is_err());
    }

    #[test]
    fn page_tables_map_the_first_gib_one_to_one() {
        let mem = guest_memory(MEMORY_MIN).expect("memory");
        write_boot_tables(&mem).expect("tables");
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).expect("pml4");
        assert_eq!(pml4, PDPTE_ADDR | 3);
        let pdpte: u64 = mem.read_obj(GuestAddress(PDPTE_ADDR)).expect("pdpte");
        assert_eq!(pdpte, PDE_ADDR | 3);
        // Walk a few virtual addresses: each maps to itself.
        for va in [0u64, 0x10_0000, 0x1234_5678, (1 << 30) - 1] {
            let pde: u64 = mem
                .read_obj(GuestAddress(PDE_ADDR + ((va >> 21) & 511) * 8))
                .expect("pde");
            assert_eq!(pde & 0x83, 0x83, "present, writable, large");
            assert_eq!((pde & !0xfff) | (va & 0x1f_ffff), va);
        }
        let sregs = long_mode_sregs(kvm_sregs::default());
        assert_eq!(sregs.cr3, PML4_ADDR);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        let mut stub = [0u8; 9];
        mem.read_slice(&mut stub, GuestAddress(RESET_VECTOR))
            .expect("stub");
        assert_eq!(stub, RESET_STUB);
        assert!(RESET_VECTOR + RESET_STUB.len() as u64 <= HIMEM_START);
        let gdt: u64 = mem.read_obj(GuestAddress(GDT_ADDR + 8)).expect("gdt");
        assert_eq!(gdt, BOOT_GDT[1]);
        // Past the end of guest memory: an error, not a write elsewhere.
        assert!(mem.write_obj(0u64, GuestAddress(MEMORY_MIN - 4)).is_err());
    }
}
