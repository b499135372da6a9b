//! The ACPI registers a hardware-reduced platform powers off and resets
//! with (ACPI 6, 4.8.3.7 and 4.8.3.6): the FADT names the sleep control
//! and status registers and the reset register on these I/O ports. The
//! guest enters S5 (power-off) by writing SLP_EN with the SLP_TYP of the
//! DSDT's `_S5` package ([`S5_SLEEP_TYPE`]) to the sleep control register,
//! and resets by writing [`RESET_VALUE`] to the reset register. Without
//! them Linux's `poweroff` would halt the CPU forever.

use super::{ExitKind, GuestExit};
use crate::vm::kvm::bus::BusDevice;
use std::sync::Arc;

/// The registers' ports: sleep control, sleep status, reset.
pub const POWER_BASE: u64 = 0x600;
pub const POWER_LEN: u64 = 3;
pub const SLEEP_CONTROL: u64 = POWER_BASE;
pub const SLEEP_STATUS: u64 = POWER_BASE + 1;
pub const RESET_REGISTER: u64 = POWER_BASE + 2;
/// What the guest writes to the reset register to reset.
pub const RESET_VALUE: u8 = 1;
/// SLP_TYP of S5 in the DSDT's `_S5` package.
pub const S5_SLEEP_TYPE: u8 = 5;

const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;
const SLP_EN: u8 = 1 << 5;

pub struct Power {
    exit: Arc<GuestExit>,
}

impl Power {
    pub fn new(exit: Arc<GuestExit>) -> Power {
        Power { exit }
    }
}

impl BusDevice for Power {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset + POWER_BASE {
            SLEEP_CONTROL
                if value & SLP_EN != 0
                    && (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == S5_SLEEP_TYPE =>
            {
                self.exit.request(ExitKind::PowerOff)
            }
            // Writing WAK_STS clears it: there is nothing to keep.
            SLEEP_STATUS => {}
            RESET_REGISTER if value == RESET_VALUE => self.exit.request(ExitKind::Reset),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(offset: u64, value: u8) -> Option<ExitKind> {
        let exit = Arc::new(GuestExit::default());
        Power::new(exit.clone()).write(offset, &[value]);
        exit.requested()
    }

    #[test]
    fn s5_with_slp_en_powers_off_and_the_reset_value_resets() {
        // What Linux writes for _S5 (5) with SLP_EN.
        assert_eq!(write(0, (5 << 2) | (1 << 5)), Some(ExitKind::PowerOff));
        // Another sleep state, or S5 without SLP_EN: nothing.
        assert_eq!(write(0, (3 << 2) | (1 << 5)), None);
        assert_eq!(write(0, 5 << 2), None);
        assert_eq!(write(1, 0x80), None);
        assert_eq!(write(2, RESET_VALUE), Some(ExitKind::Reset));
        assert_eq!(write(2, 0), None);
        let exit = Arc::new(GuestExit::default());
        Power::new(exit.clone()).write(0, &[]);
        assert_eq!(exit.requested(), None);
    }
}
