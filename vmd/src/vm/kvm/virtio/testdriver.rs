//! Tests' guest: a virtio driver that sets a device up through the MMIO
//! registers as Linux's virtio_mmio and virtio_ring do (reset,
//! ACKNOWLEDGE, DRIVER, features, FEATURES_OK read back, each queue's
//! size and rings, QueueReady, DRIVER_OK), puts chains in the avail ring
//! and reads the used ring, in anonymous guest memory. It also plays the
//! monitor's event loop: a notification must arrive on the queue's
//! EventFd, which then runs the device's `process_queue`; an interrupt
//! must arrive on the Interrupt's EventFd with its status bit.

use super::mmio::{self, MmioTransport};
use super::{Mem, VirtioDevice};
use std::sync::{Arc, Mutex};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

/// Guest memory of the tests: 32 MiB from address 0.
pub const MEM_SIZE: usize = 32 << 20;
/// Where the driver's bump allocator starts (below: nothing).
const ALLOC_START: u64 = 0x1000;

pub struct Vq {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
    last_used: u16,
}

pub struct Driver {
    pub mem: Mem,
    pub transport: MmioTransport,
    pub device: Arc<Mutex<dyn VirtioDevice>>,
    pub queues: Vec<Vq>,
    pub features: u64,
    next: u64,
}

pub fn new_mem() -> Mem {
    Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("anonymous guest memory")
}

impl Driver {
    pub fn new(device: Arc<Mutex<dyn VirtioDevice>>) -> Driver {
        let mem = new_mem();
        let transport = MmioTransport::new(mem.clone(), device.clone()).expect("transport");
        Driver {
            mem,
            transport,
            device,
            queues: Vec::new(),
            features: 0,
            next: ALLOC_START,
        }
    }

    pub fn r32(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn w32(&mut self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }

    pub fn config(&mut self, offset: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.transport.read(mmio::CONFIG + offset, &mut b);
        b
    }

    pub fn device_features(&mut self) -> u64 {
        self.w32(mmio::DEVICE_FEATURES_SEL, 0);
        let low = self.r32(mmio::DEVICE_FEATURES);
        self.w32(mmio::DEVICE_FEATURES_SEL, 1);
        let high = self.r32(mmio::DEVICE_FEATURES);
        u64::from(low) | (u64::from(high) << 32)
    }

    /// Forgets every allocation (before a new driver set-up).
    pub fn reset_alloc(&mut self) {
        self.next = ALLOC_START;
    }

    /// Bump allocation in guest memory, zeroed.
    pub fn alloc(&mut self, len: u64, align: u64) -> u64 {
        let at = self.next.div_ceil(align) * align;
        self.next = at + len;
        assert!(self.next <= MEM_SIZE as u64, "test guest memory exhausted");
        self.mem
            .write_slice(&vec![0u8; len as usize], GuestAddress(at))
            .expect("zero");
        at
    }

    /// Linux's virtio_mmio probe and virtio_dev_probe: features are
    /// what the device offers and `accept` allows; panics if the device
    /// refuses FEATURES_OK. Queues of at most `queue_size`.
    pub fn init(&mut self, accept: u64, queue_size: u16) {
        assert_eq!(self.r32(mmio::MAGIC_VALUE), mmio::MAGIC);
        assert_eq!(self.r32(mmio::VERSION_REG), 2);
        assert_ne!(self.r32(mmio::DEVICE_ID), 0);
        self.w32(mmio::STATUS, 0);
        assert_eq!(self.r32(mmio::STATUS), 0);
        self.w32(mmio::STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        self.w32(
            mmio::STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        let features = self.device_features() & accept;
        self.w32(mmio::DRIVER_FEATURES_SEL, 0);
        self.w32(mmio::DRIVER_FEATURES, features as u32);
        self.w32(mmio::DRIVER_FEATURES_SEL, 1);
        self.w32(mmio::DRIVER_FEATURES, (features >> 32) as u32);
        let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        self.w32(mmio::STATUS, s);
        assert_eq!(self.r32(mmio::STATUS), s, "device refused FEATURES_OK");
        self.features = features;
        self.queues.clear();
        let count = self.device_queue_count();
        for i in 0..count {
            self.w32(mmio::QUEUE_SEL, i);
            assert_eq!(self.r32(mmio::QUEUE_READY), 0);
            let max = self.r32(mmio::QUEUE_NUM_MAX) as u16;
            assert!(max > 0);
            let size = max.min(queue_size);
            self.w32(mmio::QUEUE_NUM, u32::from(size));
            let desc = self.alloc(16 * u64::from(size), 16);
            let avail = self.alloc(6 + 2 * u64::from(size), 2);
            let used = self.alloc(6 + 8 * u64::from(size), 4);
            self.w32(mmio::QUEUE_DESC_LOW, desc as u32);
            self.w32(mmio::QUEUE_DESC_HIGH, (desc >> 32) as u32);
            self.w32(mmio::QUEUE_DRIVER_LOW, avail as u32);
            self.w32(mmio::QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
            self.w32(mmio::QUEUE_DEVICE_LOW, used as u32);
            self.w32(mmio::QUEUE_DEVICE_HIGH, (used >> 32) as u32);
            self.w32(mmio::QUEUE_READY, 1);
            assert_eq!(self.r32(mmio::QUEUE_READY), 1);
            self.queues.push(Vq {
                size,
                desc,
                avail,
                used,
                next_desc: 0,
                avail_idx: 0,
                last_used: 0,
            });
        }
        self.w32(mmio::STATUS, s | VIRTIO_CONFIG_S_DRIVER_OK);
        assert_eq!(self.r32(mmio::STATUS), s | VIRTIO_CONFIG_S_DRIVER_OK);
        assert!(
            self.device.lock().unwrap().is_activated(),
            "device not activated"
        );
    }

    fn device_queue_count(&mut self) -> u32 {
        (0..16)
            .take_while(|&i| {
                self.w32(mmio::QUEUE_SEL, i);
                self.r32(mmio::QUEUE_NUM_MAX) != 0
            })
            .count() as u32
    }

    /// Puts a chain of (address, length, device-writable) buffers in
    /// queue `q`'s avail ring (without notifying); returns its head.
    pub fn add(&mut self, q: usize, buffers: &[(u64, u32, bool)]) -> u16 {
        let vq = &mut self.queues[q];
        let head = vq.next_desc;
        let mut index = head;
        for (i, &(addr, len, write)) in buffers.iter().enumerate() {
            let next = (index + 1) % vq.size;
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            if i + 1 < buffers.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            self.mem
                .write_slice(&raw, GuestAddress(vq.desc + 16 * u64::from(index)))
                .unwrap();
            index = next;
        }
        vq.next_desc = index;
        let slot = vq.avail + 4 + 2 * u64::from(vq.avail_idx % vq.size);
        self.mem
            .write_obj(head.to_le(), GuestAddress(slot))
            .unwrap();
        vq.avail_idx = vq.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(vq.avail_idx.to_le(), GuestAddress(vq.avail + 2))
            .unwrap();
        head
    }

    /// QueueNotify as the guest writes it; checks that it reached the
    /// queue's EventFd, and runs the device as the event loop would.
    pub fn kick(&mut self, q: usize) {
        self.w32(mmio::QUEUE_NOTIFY, q as u32);
        let count = self.transport.queue_events()[q]
            .read()
            .expect("the notification reached the queue's EventFd");
        assert!(count >= 1);
        self.device.lock().unwrap().process_queue(q);
    }

    /// The next used element of queue `q` (id, len), if any.
    pub fn used(&mut self, q: usize) -> Option<(u32, u32)> {
        let vq = &mut self.queues[q];
        let idx: u16 = self.mem.read_obj(GuestAddress(vq.used + 2)).unwrap();
        if idx == vq.last_used {
            return None;
        }
        let at = vq.used + 4 + 8 * u64::from(vq.last_used % vq.size);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        vq.last_used = vq.last_used.wrapping_add(1);
        Some((id, len))
    }

    /// Takes the interrupt as Linux's vm_interrupt does: the irqfd fired,
    /// InterruptStatus has the used-ring bit, the driver acks it.
    pub fn take_interrupt(&mut self) -> bool {
        let fired = self.transport.interrupt().event().read().is_ok();
        let status = self.r32(mmio::INTERRUPT_STATUS);
        self.w32(mmio::INTERRUPT_ACK, status);
        fired && status & 1 != 0
    }

    pub fn read_mem(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        b
    }

    pub fn write_mem(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }
}

/// A directory of the test's own, removed when dropped (even when the
/// test fails).
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "vmd-virtio-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("temp dir");
        TempDir(path)
    }

    pub fn join(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs a command the test needs (qemu-img, qemu-io); fails the test
/// with its output if it cannot run or fails.
/// `qemu-img create` of a qcow2 overlay `top` over the qcow2 `base.qcow2`
/// beside it (named relative, as vmctl create -b writes it).
pub fn qcow2_overlay(top: &str) {
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            top,
        ],
    );
}

pub fn run(program: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (install qemu-utils): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{program} {args:?} failed: {text}");
    text
}
