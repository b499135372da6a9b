//! Virtio devices of the kvm backend: the virtio-mmio transport
//! ([`mmio`]), the descriptor chains a guest offers ([`chain`]), and one
//! file per device kind ([`block`], [`net`]), each behind the
//! [`VirtioDevice`] trait (as in Firecracker).
//!
//! Threads: a vCPU thread only touches the transport's registers (a
//! QueueNotify normally never reaches it: the monitor registers each
//! queue's [`mmio::MmioTransport::queue_events`] as an ioeventfd). The
//! I/O runs in an event loop (the monitor's or an I/O thread) that waits
//! on those EventFds (and a net device's tap) and calls
//! [`VirtioDevice::process_queue`] / [`net::Net::on_tap_readable`].
//! Devices signal the guest through an [`Interrupt`], whose EventFd the
//! monitor registers as an irqfd.
//!
//! A guest is hostile: every chain is validated before use
//! ([`chain::Chain::walk`]), every guest address goes through vm-memory's
//! checked accessors, and every buffer the monitor allocates for a guest
//! is bounded by a constant.

pub mod attach;
pub mod block;
pub mod chain;
pub mod mmio;
pub mod net;

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod testdriver;

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The guest's memory as devices see it.
pub type Mem = vm_memory::GuestMemoryMmap<()>;

/// Device ids (virtio 1.x, 5 Device Types).
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;

/// Feature bits every device offers: virtio 1.x only (no legacy), and
/// indirect descriptors.
pub const COMMON_FEATURES: u64 = (1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1)
    | (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC);

/// A device's line to the guest: the interrupt status the transport shows
/// (InterruptStatus) and the EventFd that raises the interrupt (an irqfd
/// the monitor registers with KVM on the device's GSI, edge-triggered).
/// Shared by the transport (vCPU side) and the device (I/O side).
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    event: EventFd,
}

impl Interrupt {
    pub fn new() -> io::Result<Arc<Interrupt>> {
        Ok(Arc::new(Interrupt {
            status: AtomicU32::new(0),
            event: EventFd::new(EFD_NONBLOCK)?,
        }))
    }

    /// The EventFd to register as the irqfd of the device's GSI.
    pub fn event(&self) -> &EventFd {
        &self.event
    }

    /// The device has put buffers in a used ring.
    pub fn signal_used_queue(&self) -> io::Result<()> {
        self.signal(VIRTIO_MMIO_INT_VRING)
    }

    /// The device's configuration space or status changed.
    pub fn signal_config_change(&self) -> io::Result<()> {
        self.signal(VIRTIO_MMIO_INT_CONFIG)
    }

    fn signal(&self, bit: u32) -> io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.event.write(1)
    }

    /// InterruptStatus.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: the driver has seen these bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver set up {got} queues, the device needs {want}")]
    Queues { got: usize, want: usize },
}

/// One kind of virtio device. The transport calls everything but
/// `process_queue` (and a device's own event methods), which the event
/// loop calls when a queue's notification EventFd fires.
pub trait VirtioDevice: Send {
    /// The virtio device id ([`TYPE_NET`], [`TYPE_BLOCK`]).
    fn device_type(&self) -> u32;

    /// The largest size of each queue (a power of two): the count is the
    /// number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// The feature bits the device offers.
    fn features(&self) -> u64;

    /// The features the driver accepted (a subset of [`Self::features`]),
    /// when it sets FEATURES_OK.
    fn set_acked_features(&mut self, features: u64);

    /// Reads the device configuration space at `offset`; bytes past its
    /// end read as zeros.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the configuration space; what is not writable is ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Starts the device with the queues the driver made ready (valid in
    /// `mem`, one per [`Self::queue_max_sizes`] entry).
    fn activate(
        &mut self,
        mem: Mem,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError>;

    /// Whether [`Self::activate`] succeeded since the last reset.
    fn is_activated(&self) -> bool;

    /// Handles what the guest put in queue `index` (called from the event
    /// loop when the queue's EventFd fires; does nothing before
    /// activation or for a queue the device does not have).
    fn process_queue(&mut self, index: usize);

    /// Back to the state before activation (the driver wrote 0 to Status):
    /// drops the queues and the memory; keeps the host side (image, tap).
    fn reset(&mut self);
}

/// Puts a chain in the used ring with the bytes written into it; false if
/// the guest's used ring cannot take it (the queue stays as it was). The
/// interrupt comes once per batch, from [`notify`].
pub(crate) fn complete(queue: &mut Queue, mem: &Mem, head: u16, len: u32) -> bool {
    use virtio_queue::QueueT;
    queue.add_used(mem, head, len).is_ok()
}

/// After a batch of [`complete`]s: the interrupt, if the driver wants one.
pub(crate) fn notify(queue: &mut Queue, mem: &Mem, interrupt: &Interrupt) {
    use virtio_queue::QueueT;
    if queue.needs_notification(mem).unwrap_or(true) {
        if let Err(e) = interrupt.signal_used_queue() {
            crate::log::log_warn!("virtio: cannot raise the interrupt: {e}");
        }
    }
}
