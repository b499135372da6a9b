//! virtio-net (virtio 1.x, 5.1) over the tap the parent made and passed
//! (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, non-blocking): one receive and
//! one transmit queue, the MAC in the configuration space, frames with
//! the 12-byte virtio_net_hdr_v1 in front (TUNSETVNETHDRSZ), and the
//! receive offloads the guest accepts (GUEST_CSUM, GUEST_TSO4/6,
//! GUEST_ECN) handed to the tap with TUNSETOFFLOAD, so the kernel only
//! sends what the guest can take.
//!
//! Nothing is dropped inside the monitor: when the guest has no receive
//! buffer, the frame already read waits here and the tap is not read
//! again until the guest adds buffers (its RX notification calls
//! [`Net::process_queue`]`(RX)`); the tap's own queue is the only place
//! that drops. A frame larger than every buffer of a chain the guest
//! offers (possible only if it posts buffers too small for the features
//! it accepted) is the one exception, counted in `rx_too_big`. A
//! transmit the tap refuses with EAGAIN waits in the ring until
//! [`Net::on_tap_writable`].
//!
//! The event loop must watch the tap edge-triggered (as mio does): after
//! [`Net::on_tap_readable`] leaves frames in the tap for lack of buffers,
//! only the guest's RX notification resumes reading.

use super::chain::{Chain, Cursor};
use super::{ActivateError, Interrupt, Mem, VirtioDevice, TYPE_NET};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestAddress;

pub const RX: usize = 0;
pub const TX: usize = 1;
pub const QUEUE_SIZE: u16 = 256;
/// struct virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size,
/// csum_start, csum_offset, num_buffers.
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame either way: a 64 KiB GSO frame, its Ethernet and VLAN
/// headers, and the vnet header.
pub const MAX_FRAME: usize = 65536 + 18 + VNET_HDR_LEN;
/// Largest receive chain walked (Linux's big-packet buffers are about
/// 18 pages).
pub const MAX_RX_CHAIN_BYTES: u64 = 1 << 20;
/// The configuration space: mac, status, max_virtqueue_pairs.
pub const CONFIG_LEN: usize = 10;

/// The features offered besides VERSION_1 and indirect descriptors.
const OFFERED: u64 = (1 << VIRTIO_NET_F_MAC)
    | (1 << VIRTIO_NET_F_CSUM)
    | (1 << VIRTIO_NET_F_HOST_TSO4)
    | (1 << VIRTIO_NET_F_HOST_TSO6)
    | (1 << VIRTIO_NET_F_HOST_ECN)
    | (1 << VIRTIO_NET_F_GUEST_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_TSO4)
    | (1 << VIRTIO_NET_F_GUEST_TSO6)
    | (1 << VIRTIO_NET_F_GUEST_ECN);

struct Active {
    mem: Mem,
    interrupt: Arc<Interrupt>,
    rx: Queue,
    tx: Queue,
}

/// A virtio network device on a tap.
pub struct Net {
    tap: OwnedFd,
    config: [u8; CONFIG_LEN],
    acked: u64,
    active: Option<Active>,
    rx_frame: Vec<u8>,
    /// Bytes of `rx_frame` read from the tap and not yet delivered.
    rx_pending: Option<usize>,
    tx_frame: Vec<u8>,
    tx_blocked: bool,
    /// Frames no buffer of the guest could hold (see the module text).
    pub rx_too_big: u64,
    /// Chains the guest made that were returned unused.
    pub bad_chains: u64,
    /// Frames the tap refused (other than EAGAIN).
    pub tx_refused: u64,
}

/// TUNSETOFFLOAD flags for the receive features the guest accepted.
pub fn tap_offloads(acked: u64) -> u32 {
    let has = |bit: u32| acked & (1 << bit) != 0;
    let mut flags = 0;
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        flags |= libc::TUN_F_CSUM;
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            flags |= libc::TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            flags |= libc::TUN_F_TSO6;
        }
        if flags & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 && has(VIRTIO_NET_F_GUEST_ECN) {
            flags |= libc::TUN_F_TSO_ECN;
        }
    }
    flags
}

fn set_offload(tap: &OwnedFd, flags: u32) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value and touches no
    // memory of ours; the descriptor is ours.
    let r = unsafe {
        libc::ioctl(
            tap.as_raw_fd(),
            libc::TUNSETOFFLOAD,
            libc::c_ulong::from(flags),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Net {
    /// A device on `tap` with the MAC `mac`: sets the tap's vnet header
    /// size, no offloads until the guest accepts some, non-blocking.
    pub fn new(tap: OwnedFd, mac: [u8; 6]) -> Result<Net, String> {
        let size: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads the int we own, on our descriptor.
        let r = unsafe { libc::ioctl(tap.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) };
        if r < 0 {
            return Err(format!(
                "tap: cannot set the vnet header size (was it made with IFF_VNET_HDR?): {}",
                io::Error::last_os_error()
            ));
        }
        set_offload(&tap, 0).map_err(|e| format!("tap: cannot set offloads: {e}"))?;
        let flags = nix::fcntl::fcntl(tap.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)
            .map_err(|e| format!("tap: F_GETFL: {e}"))?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(tap.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))
            .map_err(|e| format!("tap: cannot make it non-blocking: {e}"))?;
        let mut config = [0u8; CONFIG_LEN];
        config[0..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        Ok(Net {
            tap,
            config,
            acked: 0,
            active: None,
            rx_frame: vec![0; MAX_FRAME],
            rx_pending: None,
            tx_frame: vec![0; MAX_FRAME],
            tx_blocked: false,
            rx_too_big: 0,
            bad_chains: 0,
            tx_refused: 0,
        })
    }

    /// The tap, for the event loop to watch (readable, and writable while
    /// [`Net::tx_blocked`]).
    pub fn tap(&self) -> &OwnedFd {
        &self.tap
    }

    /// Whether a frame waits for a receive buffer (the tap is not read).
    pub fn rx_blocked(&self) -> bool {
        self.rx_pending.is_some()
    }

    /// Whether a transmit waits for the tap to be writable.
    pub fn tx_blocked(&self) -> bool {
        self.tx_blocked
    }

    /// The tap has frames: deliver them while the guest has buffers.
    pub fn on_tap_readable(&mut self) {
        self.receive();
    }

    /// The tap takes frames again: resume transmitting.
    pub fn on_tap_writable(&mut self) {
        if self.tx_blocked {
            self.tx_blocked = false;
            self.transmit();
        }
    }

    fn read_tap(&mut self) -> Option<usize> {
        match nix::unistd::read(self.tap.as_raw_fd(), &mut self.rx_frame) {
            Ok(n) if n > VNET_HDR_LEN => Some(n),
            Ok(_) => None,
            Err(nix::errno::Errno::EAGAIN) => None,
            Err(e) => {
                crate::log::log_warn!("virtio-net: reading the tap: {e}");
                None
            }
        }
    }

    fn receive(&mut self) {
        let Some(mut active) = self.active.take() else {
            return;
        };
        let mem = active.mem.clone();
        let mut used = false;
        loop {
            let len = match self.rx_pending.take() {
                Some(len) => len,
                None => match self.read_tap() {
                    Some(len) => len,
                    // Nothing read: try again, a zero-length read is no frame.
                    None => break,
                },
            };
            let Some(desc) = active.rx.pop_descriptor_chain(&mem) else {
                // No buffer: the frame waits here, the tap is not read.
                self.rx_pending = Some(len);
                break;
            };
            let head = desc.head_index();
            let table = GuestAddress(active.rx.desc_table());
            let chain = Chain::walk(&mem, table, active.rx.size(), head, MAX_RX_CHAIN_BYTES);
            let written = match chain {
                Ok(chain) if chain.readable.is_empty() => {
                    // num_buffers: the tap skips it; always 1 without
                    // MRG_RXBUF.
                    self.rx_frame[10..12].copy_from_slice(&1u16.to_le_bytes());
                    if chain.writable_len() < len as u64 {
                        self.rx_too_big += 1;
                        0
                    } else {
                        match Cursor::new(&chain.writable).write(&mem, &self.rx_frame[..len]) {
                            Ok(n) => n as u32,
                            Err(_) => {
                                self.bad_chains += 1;
                                0
                            }
                        }
                    }
                }
                _ => {
                    // A bad chain: the frame waits for the next one.
                    self.bad_chains += 1;
                    self.rx_pending = Some(len);
                    0
                }
            };
            used |= super::complete(&mut active.rx, &mem, head, written);
        }
        if used {
            super::notify(&mut active.rx, &mem, &active.interrupt);
        }
        self.active = Some(active);
    }

    fn transmit(&mut self) {
        let Some(mut active) = self.active.take() else {
            return;
        };
        let mem = active.mem.clone();
        let mut used = false;
        while !self.tx_blocked {
            let Some(desc) = active.tx.pop_descriptor_chain(&mem) else {
                break;
            };
            let head = desc.head_index();
            let table = GuestAddress(active.tx.desc_table());
            let chain = Chain::walk(&mem, table, active.tx.size(), head, MAX_FRAME as u64);
            let len = match chain {
                Ok(chain) => Cursor::new(&chain.readable)
                    .read(&mem, &mut self.tx_frame)
                    .unwrap_or(0),
                Err(_) => 0,
            };
            if len <= VNET_HDR_LEN {
                self.bad_chains += 1;
            } else {
                match nix::unistd::write(&self.tap, &self.tx_frame[..len]) {
                    Ok(_) => {}
                    Err(nix::errno::Errno::EAGAIN) => {
                        // Back into the ring until the tap is writable.
                        active.tx.go_to_previous_position();
                        self.tx_blocked = true;
                        break;
                    }
                    Err(_) => self.tx_refused += 1,
                }
            }
            used |= super::complete(&mut active.tx, &mem, head, 0);
        }
        if used {
            super::notify(&mut active.tx, &mem, &active.interrupt);
        }
        self.active = Some(active);
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        OFFERED | super::COMMON_FEATURES
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked = features & self.features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::block::read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The MAC is read-only (VIRTIO_NET_F_CTRL_MAC_ADDR not offered).
    }

    fn activate(
        &mut self,
        mem: Mem,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let got = queues.len();
        let Ok([rx, tx]) = <[Queue; 2]>::try_from(queues) else {
            return Err(ActivateError::Queues { got, want: 2 });
        };
        set_offload(&self.tap, tap_offloads(self.acked))
            .map_err(|e| ActivateError::Host(format!("tap: cannot set offloads: {e}")))?;
        self.active = Some(Active {
            mem,
            interrupt,
            rx,
            tx,
        });
        // Frames may have waited in the tap before the driver was ready.
        self.receive();
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn process_queue(&mut self, index: usize) {
        match index {
            RX => self.receive(),
            TX => self.transmit(),
            _ => {}
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked = 0;
        self.tx_blocked = false;
        // A frame read and not delivered stays for the next driver: it was
        // taken from the tap, and nothing is dropped inside the monitor.
    }
}
