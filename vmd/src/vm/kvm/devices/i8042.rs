//! The i8042 keyboard controller, only as far as a guest resets the
//! machine through it (`reboot=k`: command 0xfe on port 0x64): vm-superio's
//! device, on ports 0x60-0x64. There is no keyboard; without a PNP entry
//! in the DSDT Linux's i8042 driver finds no controller and leaves it.

use super::{ExitKind, GuestExit};
use crate::vm::kvm::bus::BusDevice;
use std::sync::Arc;
use vm_superio::{I8042Device, Trigger};

/// The controller's ports: data at 0x60, command/status at 0x64.
pub const I8042_BASE: u64 = 0x60;
pub const I8042_LEN: u64 = 5;

/// The CPU reset line: asks the vCPU loop for a reset.
pub struct ResetLine(Arc<GuestExit>);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(ExitKind::Reset);
        Ok(())
    }
}

pub struct I8042(I8042Device<ResetLine>);

impl I8042 {
    pub fn new(exit: Arc<GuestExit>) -> I8042 {
        I8042(I8042Device::new(ResetLine(exit)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(offset)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.0.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&value), Ok(offset)) = (data.first(), u8::try_from(offset)) {
            let Ok(()) = self.0.write(offset, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_0xfe_on_0x64_resets_and_nothing_else_does() {
        let exit = Arc::new(GuestExit::default());
        let mut dev = I8042::new(exit.clone());
        let mut status = [0xffu8];
        dev.read(4, &mut status);
        // Input buffer empty: Linux's kb_wait goes on to the command.
        assert_eq!(status[0] & 2, 0);
        dev.write(0, &[0xfe]);
        dev.write(4, &[0xd1]);
        dev.write(4, &[]);
        assert_eq!(exit.requested(), None);
        dev.write(4, &[0xfe]);
        assert_eq!(exit.requested(), Some(ExitKind::Reset));
    }
}
