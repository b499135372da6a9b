//! The virtio-mmio transport, virtio 1.x (4.2.2, register layout version
//! 2), modern devices only: what a vCPU's MMIO exit reads and writes in a
//! device's window.
//!
//! The monitor gives each device a [`MMIO_WINDOW`]-byte window and a GSI,
//! describes both in the DSDT (a `LNRO0005` device with Memory32Fixed
//! and an edge-triggered, active-high Interrupt: Debian's kernel ignores
//! `virtio_mmio.device=`), routes the window's exits to
//! [`MmioTransport::read`] / [`MmioTransport::write`] (offsets relative to
//! the window), registers [`MmioTransport::queue_events`]`[i]` as an
//! ioeventfd on window + [`QUEUE_NOTIFY`] with datamatch `i` (4 bytes),
//! and the [`super::Interrupt`]'s EventFd as the irqfd of the GSI. The
//! event loop waits on the same queue EventFds and calls the device's
//! `process_queue`. The DSDT entry of device N, in ASL:
//!
//! ```text
//! Device (VR0N) {
//!     Name (_HID, "LNRO0005")
//!     Name (_UID, N)
//!     Name (_CRS, ResourceTemplate () {
//!         Memory32Fixed (ReadWrite, <window base>, 0x1000)
//!         Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { <GSI> }
//!     })
//! }
//! ```
//!
//! On DRIVER_OK the transport writes every queue's EventFd once, so the
//! event loop (not the vCPU) runs each queue first; a vCPU thread only
//! ever writes EventFds (and logs a failed activation).
//!
//! Registers are 32-bit and aligned; any other access to them reads zeros
//! and writes nothing. The configuration space (from [`CONFIG`]) is the
//! device's, any width. Writes that the status does not allow (features
//! after FEATURES_OK, queue setup after DRIVER_OK or on a ready queue)
//! are ignored, as the specification lets a device do.

use super::{Interrupt, Mem, VirtioDevice};
use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Size of a device's window in guest physical memory (a page, as
/// Firecracker and QEMU's microvm use).
pub const MMIO_WINDOW: u64 = 0x1000;

/// "virt" in little-endian.
pub const MAGIC: u32 = 0x7472_6976;
/// Register layout version 2: virtio 1.x.
pub const VERSION: u32 = 2;
/// Our vendor id: "VMD" (any value is valid; Linux only prints it).
pub const VENDOR_ID: u32 = 0x0044_4d56;

pub const MAGIC_VALUE: u64 = 0x000;
pub const VERSION_REG: u64 = 0x004;
pub const DEVICE_ID: u64 = 0x008;
pub const VENDOR_ID_REG: u64 = 0x00c;
pub const DEVICE_FEATURES: u64 = 0x010;
pub const DEVICE_FEATURES_SEL: u64 = 0x014;
pub const DRIVER_FEATURES: u64 = 0x020;
pub const DRIVER_FEATURES_SEL: u64 = 0x024;
pub const QUEUE_SEL: u64 = 0x030;
pub const QUEUE_NUM_MAX: u64 = 0x034;
pub const QUEUE_NUM: u64 = 0x038;
pub const QUEUE_READY: u64 = 0x044;
pub const QUEUE_NOTIFY: u64 = 0x050;
pub const INTERRUPT_STATUS: u64 = 0x060;
pub const INTERRUPT_ACK: u64 = 0x064;
pub const STATUS: u64 = 0x070;
pub const QUEUE_DESC_LOW: u64 = 0x080;
pub const QUEUE_DESC_HIGH: u64 = 0x084;
pub const QUEUE_DRIVER_LOW: u64 = 0x090;
pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
pub const SHM_SEL: u64 = 0x0ac;
pub const SHM_LEN_LOW: u64 = 0x0b0;
pub const SHM_BASE_HIGH: u64 = 0x0bc;
pub const CONFIG_GENERATION: u64 = 0x0fc;
pub const CONFIG: u64 = 0x100;

/// The transport of one device.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: Mem,
    interrupt: Arc<Interrupt>,
    queue_events: Vec<EventFd>,
    queues: Vec<Queue>,
    device_type: u32,
    offered: u64,
    features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    queue_select: u32,
    status: u32,
    config_generation: u32,
    /// Failed activations (a guest can cause many: only the first few are
    /// logged).
    activate_failures: u64,
}

fn lock<'a>(
    device: &'a Mutex<dyn VirtioDevice + 'static>,
) -> std::sync::MutexGuard<'a, dyn VirtioDevice + 'static> {
    // A panic while holding the lock aborts (panic = "abort"); in tests
    // the state is still the device's own.
    device.lock().unwrap_or_else(PoisonError::into_inner)
}

impl MmioTransport {
    /// The transport of `device` in the guest memory `mem`: one
    /// notification EventFd per queue and the device's [`Interrupt`].
    pub fn new(mem: Mem, device: Arc<Mutex<dyn VirtioDevice>>) -> io::Result<MmioTransport> {
        let (device_type, offered, sizes) = {
            let d = lock(&device);
            (d.device_type(), d.features(), d.queue_max_sizes().to_vec())
        };
        let mut queues = Vec::with_capacity(sizes.len());
        let mut queue_events = Vec::with_capacity(sizes.len());
        for size in sizes {
            queues.push(Queue::new(size).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("queue size {size}: {e}"),
                )
            })?);
            queue_events.push(EventFd::new(EFD_NONBLOCK)?);
        }
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Interrupt::new()?,
            queue_events,
            queues,
            device_type,
            offered: offered | super::COMMON_FEATURES,
            features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            queue_select: 0,
            status: 0,
            config_generation: 0,
            activate_failures: 0,
        })
    }

    /// The device's interrupt (its EventFd is the irqfd).
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// One EventFd per queue: ioeventfds on QueueNotify, and what the
    /// event loop waits on.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// A read of `data.len()` bytes at `offset` in the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG {
            lock(&self.device).read_config(offset - CONFIG, data);
            return;
        }
        data.fill(0);
        if data.len() != 4 || !offset.is_multiple_of(4) {
            return;
        }
        let value = match offset {
            MAGIC_VALUE => MAGIC,
            VERSION_REG => VERSION,
            DEVICE_ID => self.device_type,
            VENDOR_ID_REG => VENDOR_ID,
            DEVICE_FEATURES => match self.features_select {
                0 => self.offered as u32,
                1 => (self.offered >> 32) as u32,
                _ => 0,
            },
            QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            QUEUE_READY => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.ready())),
            INTERRUPT_STATUS => self.interrupt.status(),
            STATUS => self.status,
            // No shared memory regions: their length reads as all ones.
            SHM_LEN_LOW..=SHM_BASE_HIGH => u32::MAX,
            CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// A write of `data` at `offset` in the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG {
            lock(&self.device).write_config(offset - CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        let value = u32::from_le_bytes(bytes);
        match offset {
            DEVICE_FEATURES_SEL => self.features_select = value,
            DRIVER_FEATURES_SEL => self.driver_features_select = value,
            DRIVER_FEATURES => self.set_driver_features(value),
            QUEUE_SEL => self.queue_select = value,
            QUEUE_NUM | QUEUE_READY | QUEUE_DESC_LOW..=QUEUE_DEVICE_HIGH => {
                self.set_queue(offset, value)
            }
            QUEUE_NOTIFY => {
                // Only without an ioeventfd (or in tests): the same path.
                if let Some(event) = self.queue_events.get(value as usize) {
                    let _ = event.write(1);
                }
            }
            INTERRUPT_ACK => self.interrupt.ack(value),
            STATUS => self.set_status(value),
            SHM_SEL => {}
            _ => {}
        }
    }

    fn set_driver_features(&mut self, value: u32) {
        let setting = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
        if self.status & (setting | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_FAILED) != setting
        {
            return;
        }
        match self.driver_features_select {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            _ => {}
        }
    }

    fn set_queue(&mut self, offset: u64, value: u32) {
        let setting = VIRTIO_CONFIG_S_FEATURES_OK;
        if self.status & (setting | VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED) != setting {
            return;
        }
        let Some(queue) = self.queue() else {
            return;
        };
        if offset == QUEUE_READY {
            queue.set_ready(value == 1);
            return;
        }
        if queue.ready() {
            return;
        }
        match offset {
            QUEUE_NUM => {
                // Anything but a power of two up to the maximum is ignored.
                if let Ok(size) = u16::try_from(value) {
                    let _ = queue.try_set_size(size);
                }
            }
            QUEUE_DESC_LOW => queue.set_desc_table_address(Some(value), None),
            QUEUE_DESC_HIGH => queue.set_desc_table_address(None, Some(value)),
            QUEUE_DRIVER_LOW => queue.set_avail_ring_address(Some(value), None),
            QUEUE_DRIVER_HIGH => queue.set_avail_ring_address(None, Some(value)),
            QUEUE_DEVICE_LOW => queue.set_used_ring_address(Some(value), None),
            QUEUE_DEVICE_HIGH => queue.set_used_ring_address(None, Some(value)),
            _ => {}
        }
    }

    /// Status writes (3.1.1): 0 resets; otherwise bits are only added, in
    /// the driver initialisation order. FEATURES_OK sticks only for a
    /// subset of the offered features with VERSION_1; DRIVER_OK starts
    /// the device, or sets DEVICE_NEEDS_RESET if its queues are unusable.
    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & self.status != self.status {
            return; // clearing bits other than by a reset
        }
        let added = value & !self.status;
        if added == VIRTIO_CONFIG_S_FAILED {
            self.status = value;
            return;
        }
        let step_ok = match added {
            VIRTIO_CONFIG_S_ACKNOWLEDGE => self.status == 0,
            VIRTIO_CONFIG_S_DRIVER => self.status == VIRTIO_CONFIG_S_ACKNOWLEDGE,
            VIRTIO_CONFIG_S_FEATURES_OK => {
                self.status == VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
            }
            VIRTIO_CONFIG_S_DRIVER_OK => {
                self.status
                    == VIRTIO_CONFIG_S_ACKNOWLEDGE
                        | VIRTIO_CONFIG_S_DRIVER
                        | VIRTIO_CONFIG_S_FEATURES_OK
            }
            _ => false,
        };
        if !step_ok {
            return;
        }
        match added {
            VIRTIO_CONFIG_S_FEATURES_OK => {
                let acked = self.driver_features;
                if acked & !self.offered != 0 || acked & (1 << VIRTIO_F_VERSION_1) == 0 {
                    return;
                }
                lock(&self.device).set_acked_features(acked);
                self.status = value;
            }
            VIRTIO_CONFIG_S_DRIVER_OK => {
                self.status = value;
                self.activate();
            }
            _ => self.status = value,
        }
    }

    fn activate(&mut self) {
        let usable = self
            .queues
            .iter()
            .all(|q| q.ready() && q.is_valid(&self.mem));
        // The device gets copies: the transport keeps answering
        // QueueNumMax and QueueReady, and resets its own on a reset.
        let copies: Result<Vec<Queue>, _> = self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()))
            .collect();
        let result = if !usable {
            Err("a queue is not ready or outside guest memory".to_string())
        } else {
            match copies {
                Ok(queues) => lock(&self.device)
                    .activate(self.mem.clone(), self.interrupt.clone(), queues)
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        };
        if result.is_ok() {
            // One notification on every queue: the event loop then runs
            // each queue once on its own thread (a net device reads the
            // frames that waited in its tap before the driver was ready;
            // the vCPU that wrote DRIVER_OK does no I/O).
            for event in &self.queue_events {
                let _ = event.write(1);
            }
        }
        if let Err(e) = result {
            self.activate_failures += 1;
            if self.activate_failures <= 3 {
                crate::log::log_warn!("virtio device {}: not started: {e}", self.device_type);
            }
            self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
            let _ = self.interrupt.signal_config_change();
        }
    }

    fn reset(&mut self) {
        lock(&self.device).reset();
        for queue in &mut self.queues {
            queue.reset();
        }
        self.features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.status = 0;
        self.interrupt.clear();
        // A notification of the old queues still pending is the event
        // loop's to consume (the vCPU thread only writes EventFds): it
        // reaches a device not activated, which ignores it, or the new
        // queues, where an extra look finds nothing or new work.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::kvm::virtio::block::Block;
    use crate::vm::kvm::virtio::testdriver::{Driver, TempDir};
    use common::disk::DiskFormat;
    use common::image::Image;
    use virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;

    const ACK_DRIVER: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
    const FEATURES_OK: u32 = ACK_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;

    fn block(dir: &TempDir) -> Arc<Mutex<Block>> {
        let path = dir.join("d.raw");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let image = Image::open(&path, DiskFormat::Raw, true).unwrap();
        Arc::new(Mutex::new(Block::from_image(image, false, "id")))
    }

    fn activated(d: &Driver) -> bool {
        d.device.lock().unwrap().is_activated()
    }

    #[test]
    fn virtio_mmio_identity_and_access_widths() {
        let dir = TempDir::new("mmio-id");
        let mut d = Driver::new(block(&dir));
        assert_eq!(d.r32(MAGIC_VALUE), MAGIC);
        assert_eq!(d.r32(VERSION_REG), 2);
        assert_eq!(d.r32(DEVICE_ID), crate::vm::kvm::virtio::TYPE_BLOCK);
        assert_eq!(d.r32(VENDOR_ID_REG), VENDOR_ID);
        assert_eq!(d.r32(SHM_LEN_LOW), u32::MAX);
        // Registers are 32-bit and aligned: anything else reads zeros.
        let mut two = [0xffu8; 2];
        d.transport.read(MAGIC_VALUE, &mut two);
        assert_eq!(two, [0, 0]);
        let mut four = [0xffu8; 4];
        d.transport.read(MAGIC_VALUE + 1, &mut four);
        assert_eq!(four, [0; 4]);
        let mut eight = [0xffu8; 8];
        d.transport.read(MAGIC_VALUE, &mut eight);
        assert_eq!(eight, [0; 8]);
        // A 2-byte status write does nothing.
        d.transport.write(STATUS, &[1, 0]);
        assert_eq!(d.r32(STATUS), 0);
        // Features: VERSION_1 always, none beyond the second word.
        assert_ne!(d.device_features() & (1 << VIRTIO_F_VERSION_1), 0);
        d.w32(DEVICE_FEATURES_SEL, 2);
        assert_eq!(d.r32(DEVICE_FEATURES), 0);
        // Configuration space: any width, zeros past its end.
        assert_eq!(d.config(0, 8), 2048u64.to_le_bytes());
        assert_eq!(d.config(1, 1), [8]);
        assert_eq!(d.config(0x1000 - CONFIG - 4, 4), [0; 4]);
        d.transport.write(CONFIG, &[1, 2, 3, 4]);
        assert_eq!(d.config(0, 8), 2048u64.to_le_bytes());
        // No queue past the device's: QueueNumMax 0, notify ignored.
        d.w32(QUEUE_SEL, 5);
        assert_eq!(d.r32(QUEUE_NUM_MAX), 0);
        d.w32(QUEUE_NOTIFY, 5);
        d.w32(QUEUE_NOTIFY, u32::MAX);
    }

    #[test]
    fn virtio_mmio_feature_negotiation_and_status_order() {
        let dir = TempDir::new("mmio-neg");
        let mut d = Driver::new(block(&dir));
        // Out of order: DRIVER before ACKNOWLEDGE, DRIVER_OK early.
        d.w32(STATUS, VIRTIO_CONFIG_S_DRIVER);
        assert_eq!(d.r32(STATUS), 0);
        d.w32(STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        d.w32(STATUS, ACK_DRIVER);
        d.w32(STATUS, ACK_DRIVER | VIRTIO_CONFIG_S_DRIVER_OK);
        assert_eq!(d.r32(STATUS), ACK_DRIVER);
        // Without VERSION_1 (a legacy driver): FEATURES_OK does not stick.
        d.w32(DRIVER_FEATURES_SEL, 0);
        d.w32(DRIVER_FEATURES, 1 << VIRTIO_BLK_F_FLUSH);
        d.w32(STATUS, FEATURES_OK);
        assert_eq!(d.r32(STATUS), ACK_DRIVER);
        // A feature the device does not offer: refused too.
        d.w32(DRIVER_FEATURES_SEL, 1);
        d.w32(DRIVER_FEATURES, 1 | (1 << 20));
        d.w32(STATUS, FEATURES_OK);
        assert_eq!(d.r32(STATUS), ACK_DRIVER);
        // A subset with VERSION_1: accepted.
        d.w32(DRIVER_FEATURES, 1);
        d.w32(STATUS, FEATURES_OK);
        assert_eq!(d.r32(STATUS), FEATURES_OK);
        // Clearing a bit other than by a reset is ignored.
        d.w32(STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        assert_eq!(d.r32(STATUS), FEATURES_OK);
        // Features are fixed after FEATURES_OK.
        d.w32(DRIVER_FEATURES_SEL, 0);
        d.w32(DRIVER_FEATURES, u32::MAX);
        // DRIVER_OK without ready queues: DEVICE_NEEDS_RESET and a
        // configuration interrupt; the device does not start.
        d.w32(STATUS, FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
        assert_eq!(
            d.r32(STATUS),
            FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_NEEDS_RESET
        );
        assert!(!activated(&d));
        assert!(d.transport.interrupt().event().read().is_ok());
        assert_eq!(d.r32(INTERRUPT_STATUS), 2);
        d.w32(INTERRUPT_ACK, 2);
        assert_eq!(d.r32(INTERRUPT_STATUS), 0);
        // FAILED may be set at any time.
        let s = d.r32(STATUS);
        d.w32(STATUS, s | VIRTIO_CONFIG_S_FAILED);
        assert_eq!(d.r32(STATUS), s | VIRTIO_CONFIG_S_FAILED);
        // A reset clears everything, and a driver starts over.
        d.w32(STATUS, 0);
        assert_eq!(d.r32(STATUS), 0);
        d.init(u64::MAX, 64);
        assert!(activated(&d));
    }

    #[test]
    fn virtio_mmio_queue_setup_rules_and_reset() {
        let dir = TempDir::new("mmio-q");
        let mut d = Driver::new(block(&dir));
        // Queue registers before FEATURES_OK are ignored.
        d.w32(QUEUE_SEL, 0);
        d.w32(QUEUE_READY, 1);
        assert_eq!(d.r32(QUEUE_READY), 0);
        d.w32(STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        d.w32(STATUS, ACK_DRIVER);
        d.w32(DRIVER_FEATURES_SEL, 1);
        d.w32(DRIVER_FEATURES, 1);
        d.w32(STATUS, FEATURES_OK);
        assert_eq!(d.r32(QUEUE_NUM_MAX), 256);
        // Rings outside guest memory: DRIVER_OK fails cleanly.
        d.w32(QUEUE_NUM, 100); // not a power of two: ignored
        d.w32(QUEUE_NUM, 512); // above the maximum: ignored
        d.w32(QUEUE_DESC_LOW, 0);
        d.w32(QUEUE_DESC_HIGH, 0x10);
        d.w32(QUEUE_DRIVER_LOW, 0x1000);
        d.w32(QUEUE_DEVICE_LOW, 0x2000);
        d.w32(QUEUE_READY, 1);
        // A ready queue's addresses cannot change.
        d.w32(QUEUE_DESC_HIGH, 0);
        d.w32(STATUS, FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
        assert_ne!(d.r32(STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert!(!activated(&d));
        // Reset: queues back to not ready, the device idle.
        d.w32(STATUS, 0);
        assert_eq!(d.r32(QUEUE_READY), 0);
        assert_eq!(d.r32(INTERRUPT_STATUS), 0);
        d.init(u64::MAX, 256);
        assert!(activated(&d));
        // After DRIVER_OK the queue cannot be changed either.
        d.w32(QUEUE_SEL, 0);
        d.w32(QUEUE_READY, 0);
        assert_eq!(d.r32(QUEUE_READY), 1);
        d.w32(STATUS, 0);
        assert!(!activated(&d));
        assert_eq!(d.r32(QUEUE_READY), 0);
    }
}
