//! The guest's I/O port and MMIO buses: ranges of addresses, each routed
//! to one device. A vCPU's port or MMIO exit lands here
//! ([`Bus::read`], [`Bus::write`]); a device sees the offset into its
//! own range. An address no device claims reads as all ones and ignores
//! writes, as on a PC (Linux probes many ports it does not find).
//!
//! Devices are `Arc<Mutex<dyn BusDevice>>`: the vCPU thread calls them,
//! and the monitor thread may reach the same device (serial input). The
//! bus itself is fixed once the machine is built.

use std::sync::{Arc, Mutex};
use thiserror::Error;

/// A device on a bus. `offset` is from the start of the device's range;
/// `data` is as long as the guest's access (1, 2, 4 or 8 bytes). A
/// device must accept any offset and length inside its range: the guest
/// chooses them.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or overlaps another device")]
    Overlap { base: u64, len: u64 },
}

struct Range {
    base: u64,
    len: u64,
    device: SharedDevice,
}

/// Address ranges and their devices, sorted by base.
#[derive(Default)]
pub struct Bus {
    ranges: Vec<Range>,
}

impl Bus {
    pub fn new() -> Bus {
        Bus::default()
    }

    /// Attaches `device` at `base`, `len` addresses long.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let overlaps = |r: &Range| base < r.base + r.len && r.base < base.saturating_add(len);
        if end.is_none() || self.ranges.iter().any(overlaps) {
            return Err(BusError::Overlap { base, len });
        }
        let at = self.ranges.partition_point(|r| r.base < base);
        self.ranges.insert(at, Range { base, len, device });
        Ok(())
    }

    /// The device whose range holds all of `addr`..`addr + len`, and the
    /// offset into it.
    fn find(&self, addr: u64, len: usize) -> Option<(&SharedDevice, u64)> {
        let at = self.ranges.partition_point(|r| r.base <= addr);
        let range = self.ranges.get(at.checked_sub(1)?)?;
        let offset = addr - range.base;
        let last = offset.checked_add(len as u64)?;
        (last <= range.len).then_some((&range.device, offset))
    }

    /// A guest read; false (and all ones) where no device is.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((device, offset)) => {
                lock(device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// A guest write; false (ignored) where no device is.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((device, offset)) => {
                lock(device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device. A device that panicked while locked is still used:
/// its state is plain data, and the guest is better served by a device
/// in some state than by a monitor that stops.
pub fn lock<T: ?Sized>(device: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Remembers the last write, reads back its offset.
    struct Probe {
        last: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_and_refuses_overlaps() {
        let probe = Arc::new(Mutex::new(Probe { last: None }));
        let mut bus = Bus::new();
        bus.insert(0x3f8, 8, probe.clone()).expect("insert");
        assert!(bus.insert(0x3f0, 9, probe.clone()).is_err());
        assert!(bus.insert(0x3ff, 1, probe.clone()).is_err());
        assert!(bus.insert(0x3f8, 0, probe.clone()).is_err());
        assert!(bus.insert(u64::MAX, 2, probe.clone()).is_err());
        bus.insert(0x400, 1, probe.clone()).expect("adjacent");
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5]);
        assert!(bus.write(0x3f9, &[7, 8]));
        assert_eq!(lock(&probe).last, Some((1, vec![7, 8])));
        // Past the end of a range, or straddling it: nobody.
        let mut wide = [0u8; 4];
        assert!(!bus.read(0x3fe, &mut wide));
        assert_eq!(wide, [0xff; 4]);
        assert!(!bus.read(0x3f7, &mut data));
        assert!(!bus.write(u64::MAX, &[1]));
        assert!(!bus.read(u64::MAX - 1, &mut wide));
    }
}
