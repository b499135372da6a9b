//! The legacy devices of our monitor, one file each: the 8250 serial port
//! (the console, [`serial`]), the i8042's CPU reset line ([`i8042`]) and
//! the ACPI sleep and reset registers ([`power`]), the power button behind
//! a Generic Event Device ([`ged`]). Virtio devices live in
//! `vm/kvm/virtio/`.
//!
//! A device asks for the guest's end (a reset or a power-off) through
//! [`GuestExit`], which the vCPU loop looks at after every exit.

pub mod ged;
pub mod i8042;
pub mod power;
pub mod serial;

use std::sync::atomic::{AtomicU8, Ordering};

/// How the guest ends when it asks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// A reset (i8042 pulse, ACPI reset register, triple fault).
    Reset,
    /// A power-off (ACPI sleep state S5).
    PowerOff,
}

/// What the guest's devices asked for, shared by the devices and the vCPU
/// loop. The first request wins.
#[derive(Debug, Default)]
pub struct GuestExit(AtomicU8);

impl GuestExit {
    pub fn request(&self, kind: ExitKind) {
        let code = match kind {
            ExitKind::Reset => 1,
            ExitKind::PowerOff => 2,
        };
        let _ = self
            .0
            .compare_exchange(0, code, Ordering::SeqCst, Ordering::SeqCst);
    }

    pub fn requested(&self) -> Option<ExitKind> {
        match self.0.load(Ordering::SeqCst) {
            1 => Some(ExitKind::Reset),
            2 => Some(ExitKind::PowerOff),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_request_wins() {
        let exit = GuestExit::default();
        assert_eq!(exit.requested(), None);
        exit.request(ExitKind::PowerOff);
        exit.request(ExitKind::Reset);
        assert_eq!(exit.requested(), Some(ExitKind::PowerOff));
    }
}
