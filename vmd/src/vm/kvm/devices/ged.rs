//! The power button of a hardware-reduced platform: an ACPI Generic Event
//! Device (ACPI0013, ACPI 6, 5.6.9) and a PNP0C0C power button device.
//! A hardware-reduced FADT has no fixed power button, so the button is a
//! device in the DSDT ([`ged_aml`]) and the GED is how it is pressed:
//! [`Ged::press_power_button`] sets the button's bit in the GED's status
//! register and raises the GED's own interrupt ([`GED_GSI`], an irqfd);
//! Linux's GED driver then runs `_EVT`, which reads the status register
//! (reading clears it) and notifies the button device (0x80, "pressed"),
//! and Linux's `button` driver reports "Power Button" as with QEMU's.
//!
//! The status register is one I/O port ([`GED_PORT`]), beside the ACPI
//! sleep and reset registers (devices/power.rs); nothing of the GED is on
//! the MMIO bus.

use crate::vm::kvm::bus::BusDevice;
use acpi_tables::{aml, Aml};
use vmm_sys_util::eventfd::EventFd;

/// The GED's status register: one byte on this I/O port.
pub const GED_PORT: u64 = 0x610;
pub const GED_LEN: u64 = 1;
/// The GED's interrupt: a GSI of its own on the IOAPIC, edge-triggered,
/// active high (no ISA device uses 9 here; virtio-mmio takes 5 to 8).
pub const GED_GSI: u32 = 9;
/// The status register's bit for the power button.
pub const POWER_BUTTON: u8 = 1 << 0;

pub struct Ged {
    status: u8,
    irq: EventFd,
}

impl Ged {
    /// `irq` is an eventfd registered as the irqfd of [`GED_GSI`].
    pub fn new(irq: EventFd) -> Ged {
        Ged { status: 0, irq }
    }

    /// Presses the power button: the bit set, the interrupt raised.
    pub fn press_power_button(&mut self) -> std::io::Result<()> {
        self.status |= POWER_BUTTON;
        self.irq.write(1)
    }
}

impl BusDevice for Ged {
    /// The pending events; reading clears them.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 {
            if let Some(first) = data.first_mut() {
                *first = std::mem::take(&mut self.status);
            }
        }
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

/// The DSDT's part: the power button and the GED, in ASL
///
/// ```text
/// Device (\_SB.PWRB) { Name (_HID, EisaId ("PNP0C0C")) Name (_UID, 0) }
/// Device (\_SB.GED) {
///     Name (_HID, "ACPI0013")
///     Name (_UID, 0)
///     Name (_CRS, ResourceTemplate () {
///         Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { 9 } })
///     OperationRegion (GDST, SystemIO, 0x610, 1)
///     Field (GDST, ByteAcc, NoLock, WriteAsZeros) { GDAT, 8 }
///     Method (_EVT, 1, Serialized) {
///         Local0 = GDAT
///         If ((Local0 & 1) == 1) { Notify (\_SB.PWRB, 0x80) }
///     }
/// }
/// ```
pub fn ged_aml() -> Vec<u8> {
    let mut bytes = Vec::new();

    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let button_hid = aml::EISAName::new("PNP0C0C");
    let button_hid = aml::Name::new("_HID".into(), &button_hid);
    let button = aml::Device::new("_SB_.PWRB".into(), vec![&button_hid, &uid]);
    button.to_aml_bytes(&mut bytes);

    let irq = aml::Interrupt::new(true, true, false, false, GED_GSI);
    let resources = aml::ResourceTemplate::new(vec![&irq]);
    let port = GED_PORT as usize;
    let len = GED_LEN as usize;
    let region = aml::OpRegion::new("GDST".into(), aml::OpRegionSpace::SystemIO, &port, &len);
    let field = aml::Field::new(
        "GDST".into(),
        aml::FieldAccessType::Byte,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![aml::FieldEntry::Named(*b"GDAT", 8)],
    );
    let local0 = aml::Local(0);
    let gdat = aml::Path::new("GDAT");
    let read = aml::Store::new(&local0, &gdat);
    let bit = POWER_BUTTON;
    let masked = aml::And::new(&aml::ZERO, &local0, &bit);
    let pressed = aml::Equal::new(&masked, &bit);
    let button_path = aml::Path::new("\\_SB_.PWRB");
    let notify_value = 0x80u8;
    let notify = aml::Notify::new(&button_path, &notify_value);
    let on_button = aml::If::new(&pressed, vec![&notify]);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&read, &on_button]);
    let ged_hid = aml::Name::new("_HID".into(), &"ACPI0013");
    let crs = aml::Name::new("_CRS".into(), &resources);
    let ged = aml::Device::new(
        "_SB_.GED_".into(),
        vec![&ged_hid, &uid, &crs, &region, &field, &evt],
    );
    ged.to_aml_bytes(&mut bytes);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pressing_sets_the_bit_raises_the_irq_and_a_read_clears_it() {
        let irq = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).expect("eventfd");
        let mut ged = Ged::new(irq.try_clone().expect("clone"));
        let mut data = [0xffu8; 1];
        ged.read(0, &mut data);
        assert_eq!(data, [0]);
        assert!(irq.read().is_err(), "no interrupt before a press");
        ged.press_power_button().expect("press");
        assert_eq!(irq.read().expect("the interrupt"), 1);
        let mut wide = [0xffu8; 4];
        ged.read(0, &mut wide);
        assert_eq!(wide, [POWER_BUTTON, 0, 0, 0]);
        ged.read(0, &mut data);
        assert_eq!(data, [0], "a read clears the status");
    }

    #[test]
    fn the_aml_names_the_button_the_ged_and_its_gsi() {
        let aml = ged_aml();
        // PNP0C0C as an EISA id; ACPI0013 as a string.
        assert!(aml.windows(4).any(|w| w == [0x41, 0xd0, 0x0c, 0x0c]));
        assert!(aml.windows(9).any(|w| w == b"ACPI0013\0"));
        assert!(aml.windows(4).any(|w| w == b"_EVT"));
        // The extended interrupt descriptor: consumer, edge, high; GSI 9.
        assert!(aml
            .windows(9)
            .any(|w| w == [0x89, 6, 0, 0x03, 1, GED_GSI as u8, 0, 0, 0]));
    }
}
