//! The guest's ACPI tables, as Firecracker's: Debian's kernels ignore MP
//! tables, so CPUs and the interrupt controller come from the MADT, and
//! the platform is hardware-reduced (no PM timer, no fixed events, no
//! SCI). What a hardware-reduced platform still needs to power off and
//! reset is in the FADT: the sleep control and status registers and the
//! reset register (devices/power.rs traps them), and `_S5` in the DSDT.
//!
//! Tables sit in the reserved range below 1 MiB: the RSDP at
//! [`RSDP_ADDR`] (where a BIOS leaves it, and named in the zero page),
//! the others after it. Each is built and checksummed by acpi_tables and
//! written through vm-memory's checked accessors.

use super::boot::{ACPI_END, APIC_ADDR, IOAPIC_ADDR, RSDP_ADDR};
use super::devices::power::{
    RESET_REGISTER, RESET_VALUE, S5_SLEEP_TYPE, SLEEP_CONTROL, SLEEP_STATUS,
};
use super::devices::serial::{SERIAL_BASE, SERIAL_IRQ, SERIAL_LEN};
use super::KvmError;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const OEM_ID: [u8; 6] = *b"VMDKVM";
const OEM_REVISION: u32 = 1;

/// One table: where it goes and its bytes.
pub struct Table {
    pub addr: u64,
    pub bytes: Vec<u8>,
}

fn aml_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// The DSDT: `\_S5` (the power-off sleep type), COM1, the power
/// button with its Generic Event Device (devices/ged.rs) and `virtio`
/// virtio-mmio devices ([`super::virtio::attach::dsdt_entries`]). On a
/// hardware-reduced platform Linux gives the legacy serial port's IRQ 4
/// no interrupt; the PNP0501 device with its GSI is what its 8250 driver
/// then takes the port's interrupt from.
pub fn dsdt(virtio: usize) -> Vec<u8> {
    let s5_type = S5_SLEEP_TYPE;
    let package = aml::Package::new(vec![&s5_type, &aml::ZERO, &aml::ZERO, &aml::ZERO]);
    let mut body = aml_bytes(&aml::Name::new("_S5_".into(), &package));
    let hid = aml::EISAName::new("PNP0501");
    let irq = aml::Interrupt::new(true, true, false, false, SERIAL_IRQ);
    let ports = aml::IO::new(SERIAL_BASE as u16, SERIAL_BASE as u16, 1, SERIAL_LEN as u8);
    let resources = aml::ResourceTemplate::new(vec![&irq, &ports]);
    let hid_name = aml::Name::new("_HID".into(), &hid);
    let uid_name = aml::Name::new("_UID".into(), &aml::ZERO);
    let crs_name = aml::Name::new("_CRS".into(), &resources);
    let com1 = aml::Device::new("_SB_.COM1".into(), vec![&hid_name, &uid_name, &crs_name]);
    body.extend(aml_bytes(&com1));
    body.extend(super::devices::ged::ged_aml());
    body.extend(super::virtio::attach::dsdt_entries(virtio));
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"VMDDSDT ", OEM_REVISION);
    dsdt.append_slice(&body);
    dsdt.as_slice().to_vec()
}

fn port(addr: u64) -> GAS {
    GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, addr)
}

/// The FADT: hardware-reduced, the DSDT at `dsdt`, the sleep and reset
/// registers on their ports.
pub fn fadt(dsdt: u64) -> Vec<u8> {
    const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
    let mut fadt = FADTBuilder::new(OEM_ID, *b"VMDFACP ", OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .dsdt_64(dsdt);
    fadt.iapc_boot_arch = IAPC_VGA_NOT_PRESENT.into();
    fadt.sleep_control_reg = port(SLEEP_CONTROL);
    fadt.sleep_status_reg = port(SLEEP_STATUS);
    fadt.reset_reg = port(RESET_REGISTER);
    fadt.reset_value = RESET_VALUE;
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"VMDKVM\0\0").into();
    aml_bytes(&fadt.finalize())
}

/// The MADT: a local APIC per vCPU (APIC id = index), the IOAPIC, and
/// the serial port's IRQ on its pin.
pub fn madt(vcpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        *b"VMDAPIC ",
        OEM_REVISION,
        LocalInterruptController::Address(APIC_ADDR),
    );
    madt.add_structure(IoApic::new(0, IOAPIC_ADDR, 0));
    for cpu in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    let mut bytes = aml_bytes(&madt);
    // On a hardware-reduced platform Linux maps no ISA IRQ to an IOAPIC
    // pin by itself (its legacy PIC has none): say that the serial
    // port's IRQ 4 is pin 4, edge-triggered, active high (as ISA's).
    bytes.extend_from_slice(&interrupt_override(SERIAL_IRQ as u8, SERIAL_IRQ));
    let len = bytes.len() as u32;
    bytes[4..8].copy_from_slice(&len.to_le_bytes());
    bytes[9] = 0;
    bytes[9] = 0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)));
    bytes
}

/// A MADT Interrupt Source Override (type 2): ISA IRQ `source` is GSI
/// `gsi`, with the ISA bus's polarity and trigger mode.
fn interrupt_override(source: u8, gsi: u32) -> [u8; 10] {
    let mut entry = [0u8; 10];
    entry[0] = 2;
    entry[1] = 10;
    entry[3] = source;
    entry[4..8].copy_from_slice(&gsi.to_le_bytes());
    entry
}

/// Every table of a machine with `vcpus` vCPUs and `virtio` virtio
/// devices, placed.
pub fn tables(vcpus: u8, virtio: usize) -> Result<Vec<Table>, KvmError> {
    let align = |addr: u64| (addr + 15) & !15;
    let mut next = align(RSDP_ADDR + Rsdp::len() as u64);
    let mut place = |bytes: Vec<u8>| {
        let table = Table { addr: next, bytes };
        next = align(next + table.bytes.len() as u64);
        table
    };
    let dsdt = place(dsdt(virtio));
    let fadt = place(fadt(dsdt.addr));
    let madt = place(madt(vcpus));
    let mut xsdt = XSDT::new(OEM_ID, *b"VMDXSDT ", OEM_REVISION);
    xsdt.add_entry(fadt.addr);
    xsdt.add_entry(madt.addr);
    let xsdt = place(aml_bytes(&xsdt));
    let rsdp = Table {
        addr: RSDP_ADDR,
        bytes: aml_bytes(&Rsdp::new(OEM_ID, xsdt.addr)),
    };
    let all = vec![rsdp, xsdt, fadt, madt, dsdt];
    if all.iter().any(|t| t.addr + t.bytes.len() as u64 > ACPI_END) {
        return Err(KvmError::Boot(
            "the ACPI tables do not fit below 1 MiB".into(),
        ));
    }
    Ok(all)
}

/// Writes the tables into guest memory.
pub fn write_tables(mem: &GuestMemoryMmap, vcpus: u8, virtio: usize) -> Result<(), KvmError> {
    for table in tables(vcpus, virtio)? {
        mem.write_slice(&table.bytes, GuestAddress(table.addr))
            .map_err(|e| KvmError::Boot(format!("writing the ACPI tables: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn u32_at(bytes: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
    }

    fn u64_at(bytes: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
    }

    #[test]
    fn every_table_checksums_to_zero_and_links_to_the_next() {
        let tables = tables(2, 0).expect("tables");
        let rsdp = &tables[0].bytes;
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(rsdp), 0);
        let by_addr = |addr: u64| {
            tables
                .iter()
                .find(|t| t.addr == addr)
                .unwrap_or_else(|| panic!("no table at {addr:#x}"))
        };
        let xsdt = by_addr(u64_at(rsdp, 24));
        assert_eq!(&xsdt.bytes[..4], b"XSDT");
        for table in &tables[1..] {
            assert_eq!(u32_at(&table.bytes, 4) as usize, table.bytes.len());
            assert_eq!(sum(&table.bytes), 0, "{:?}", &table.bytes[..4]);
        }
        let fadt = by_addr(u64_at(&xsdt.bytes, 36));
        assert_eq!(&fadt.bytes[..4], b"FACP");
        let madt = by_addr(u64_at(&xsdt.bytes, 44));
        assert_eq!(&madt.bytes[..4], b"APIC");
        // FADT: hardware-reduced, X_DSDT (offset 140) is the DSDT.
        assert_ne!(u32_at(&fadt.bytes, 112) & (1 << 20), 0);
        assert_eq!(&by_addr(u64_at(&fadt.bytes, 140)).bytes[..4], b"DSDT");
        // Sleep control register (offset 244): I/O port 0x600.
        assert_eq!(fadt.bytes[244], 1);
        assert_eq!(u64_at(&fadt.bytes, 248), SLEEP_CONTROL);
        // Reset register (offset 116) and value (128).
        assert_eq!(u64_at(&fadt.bytes, 120), RESET_REGISTER);
        assert_eq!(fadt.bytes[128], RESET_VALUE);
        // MADT: the IOAPIC and one local APIC per vCPU (type 0, 8 bytes).
        let entries = &madt.bytes[44..];
        assert_eq!((entries[0], entries[1]), (1, 12));
        assert_eq!(u32_at(entries, 4), IOAPIC_ADDR);
        assert_eq!(&entries[12..14], &[0, 8]);
        assert_eq!(&entries[20..22], &[0, 8]);
        assert_eq!(entries[23], 1, "second CPU's APIC id");
        // ISA IRQ 4 is GSI 4.
        assert_eq!(&entries[28..32], &[2, 10, 0, 4]);
        assert_eq!(u32_at(entries, 32), 4);
        assert_eq!(entries.len(), 12 + 2 * 8 + 10);
        assert!(tables
            .iter()
            .all(|t| t.addr + t.bytes.len() as u64 <= ACPI_END));
    }

    #[test]
    fn the_dsdt_names_s5_and_com1() {
        let dsdt = dsdt(0);
        let body = &dsdt[36..];
        // NameOp "_S5_" PackageOp
        assert_eq!(&body[..6], &[0x08, b'_', b'S', b'5', b'_', 0x12]);
        assert!(body.windows(2).any(|w| w == [0x0a, S5_SLEEP_TYPE]));
        assert!(body.windows(4).any(|w| w == b"COM1"));
        // PNP0501 as an EISA id, and the IO descriptor 0x3f8, 8 ports.
        assert!(body.windows(4).any(|w| w == [0x41, 0xd0, 0x05, 0x01]));
        assert!(body
            .windows(8)
            .any(|w| w == [0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8]));
    }

    /// `iasl -d` (Debian's acpica-tools) disassembles every table without
    /// an error.
    #[test]
    fn iasl_disassembles_every_table() {
        let iasl = std::path::Path::new("/usr/bin/iasl");
        assert!(
            iasl.exists(),
            "iasl is missing: install acpica-tools (regress/setup does)"
        );
        let dir = std::env::temp_dir().join(format!("vmd-acpi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        for table in tables(2, 2).expect("tables").iter().skip(1) {
            let name = String::from_utf8_lossy(&table.bytes[..4]).to_lowercase();
            let path = dir.join(format!("{name}.dat"));
            std::fs::write(&path, &table.bytes).expect("write");
            let out = std::process::Command::new(iasl)
                .arg("-d")
                .arg(&path)
                .current_dir(&dir)
                .output()
                .expect("run iasl");
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "iasl -d {name}: {text}");
            assert!(!text.contains("Error"), "iasl -d {name}: {text}");
            let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl"))).expect("dsl");
            assert!(
                !dsl.contains("Checksum mismatch") && !dsl.contains("Incorrect checksum"),
                "{dsl}"
            );
            if name == "dsdt" {
                // Two virtio-mmio devices, their windows and GSIs 5 and 6.
                assert_eq!(dsl.matches("\"LNRO0005\"").count(), 2, "{dsl}");
                assert!(dsl.contains("0xD0001000"), "{dsl}");
                assert!(dsl.contains("0x00000006"), "{dsl}");
                // The power button and its GED (devices/ged.rs), whole.
                for want in [
                    "PNP0C0C",
                    "\"ACPI0013\"",
                    "SystemIO, 0x0610, One",
                    "Method (_EVT, 1, Serialized)",
                    "Notify (\\_SB.PWRB, 0x80)",
                ] {
                    assert!(dsl.contains(want), "no {want} in the DSDT: {dsl}");
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
