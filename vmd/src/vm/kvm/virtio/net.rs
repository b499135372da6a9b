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
    /// TUNSETOFFLOAD flags for the driver just activated, set before the
    /// tap is next read or written.
    offload_pending: Option<u32>,
    /// Frames no buffer of the guest could hold (see the module text).
    pub rx_too_big: u64,
    /// Chains the guest made that were returned unused.
    pub bad_chains: u64,
    /// Frames the tap refused (other than EAGAIN).
    pub tx_refused: u64,
    /// Frames handed to the tap.
    pub tx_frames: u64,
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
            offload_pending: None,
            rx_too_big: 0,
            bad_chains: 0,
            tx_refused: 0,
            tx_frames: 0,
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

    /// The sizes of the receive and transmit buffers (tests: they never
    /// grow).
    #[cfg(test)]
    pub fn buffer_lens(&self) -> (usize, usize) {
        (self.rx_frame.len(), self.tx_frame.len())
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

    /// The next frame from the tap: its length, Some(0) for a frame with
    /// nothing after the vnet header (skipped), None when the tap is
    /// empty (or failed: logged).
    fn read_tap(&mut self) -> Option<usize> {
        match nix::unistd::read(self.tap.as_raw_fd(), &mut self.rx_frame) {
            Ok(n) if n > VNET_HDR_LEN => Some(n),
            Ok(_) => Some(0),
            Err(nix::errno::Errno::EAGAIN) => None,
            Err(e) => {
                crate::log::log_warn!("virtio-net: reading the tap: {e}");
                None
            }
        }
    }

    fn apply_offloads(&mut self) {
        if let Some(flags) = self.offload_pending.take() {
            if let Err(e) = set_offload(&self.tap, flags) {
                crate::log::log_warn!("virtio-net: tap: cannot set offloads {flags:#x}: {e}");
            }
        }
    }

    fn receive(&mut self) {
        let Some(mut active) = self.active.take() else {
            return;
        };
        self.apply_offloads();
        let mem = active.mem.clone();
        let mut used = false;
        loop {
            let len = match self.rx_pending.take() {
                Some(len) => len,
                None => match self.read_tap() {
                    // No frame to give; the next one may be.
                    Some(0) => continue,
                    Some(len) => len,
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
        self.apply_offloads();
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
                    Ok(_) => self.tx_frames += 1,
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
        // Applied by the event loop's first run (the notification every
        // queue gets on activation): no ioctl on the vCPU thread.
        self.offload_pending = Some(tap_offloads(self.acked));
        self.active = Some(Active {
            mem,
            interrupt,
            rx,
            tx,
        });
        // Frames that waited in the tap are read when the event loop runs
        // the RX queue: the transport notifies every queue on activation.
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
        self.offload_pending = None;
        // A frame read and not delivered stays for the next driver: it was
        // taken from the tap, and nothing is dropped inside the monitor.
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::parent::net::netlink::tests::ask;
    use crate::parent::net::netlink::{Netlink, Reply, Request};
    use crate::parent::net::nft::tests::packet_socket;
    use crate::parent::net::tap::tap_open;
    use crate::parent::net::testns::in_new_netns;
    use crate::vm::kvm::virtio::testdriver::Driver;
    use std::os::fd::AsFd;
    use std::sync::Mutex;

    const MAC: [u8; 6] = [0xfe, 0xe1, 0xba, 0xd0, 0x00, 0x01];
    /// IEEE 802 local experimental ethertype: nothing else sends it.
    const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
    const RX_BUF: u32 = 2048;
    const TAP: &str = "vtnet0";

    /// A legacy ethtool "get" (ETHTOOL_GTSO, ETHTOOL_GTXCSUM) on `name`:
    /// what the tap's features say of the offloads.
    fn ethtool_get(name: &str, cmd: u32) -> Result<u32, String> {
        let sock = nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Inet,
            nix::sys::socket::SockType::Datagram,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| format!("socket: {e}"))?;
        let mut value = [cmd, 0u32];
        // SAFETY: ifreq is plain data; all zeroes is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        req.ifr_ifru.ifru_data = value.as_mut_ptr() as *mut libc::c_char;
        // SAFETY: SIOCETHTOOL reads the ifreq and the ethtool_value it
        // points to, both ours and alive for the call, and writes the
        // value's data word.
        let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &mut req) };
        if r < 0 {
            return Err(format!(
                "SIOCETHTOOL {cmd:#x}: {}",
                io::Error::last_os_error()
            ));
        }
        Ok(value[1])
    }

    const ETHTOOL_GTXCSUM: u32 = 0x16;
    const ETHTOOL_GTSO: u32 = 0x1e;

    fn frame(dst: [u8; 6], src: [u8; 6], n: u8) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&ETHERTYPE);
        f.extend((0..200).map(|i: u16| (i as u8) ^ n));
        f
    }

    fn wait_readable(fd: &OwnedFd) -> Result<(), String> {
        let mut fds = [nix::poll::PollFd::new(
            fd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(10_000u16)) {
            Ok(1) => Ok(()),
            other => Err(format!("nothing to read within 10 s: {other:?}")),
        }
    }

    /// The next frame of ours the host side received from the guest.
    fn host_receive(pkt: &OwnedFd) -> Result<Vec<u8>, String> {
        loop {
            wait_readable(pkt)?;
            let mut buf = vec![0u8; 4096];
            // SAFETY: sockaddr_ll is plain data; zeroes are valid.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: recvfrom writes at most buf.len() bytes into buf and
            // at most len bytes into from, both ours.
            let n = unsafe {
                libc::recvfrom(
                    pkt.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                    &mut from as *mut libc::sockaddr_ll as *mut libc::sockaddr,
                    &mut len,
                )
            };
            if n < 0 {
                continue;
            }
            buf.truncate(n as usize);
            if from.sll_pkttype != libc::PACKET_OUTGOING && buf.get(12..14) == Some(&ETHERTYPE) {
                return Ok(buf);
            }
        }
    }

    fn host_send(pkt: &OwnedFd, frame: &[u8]) -> Result<(), String> {
        nix::unistd::write(pkt, frame)
            .map(drop)
            .map_err(|e| format!("send on the tap: {e}"))
    }

    /// A tap in the test's namespace, up, without IPv6 (whose router and
    /// listener solicitations would reach the guest), and a packet
    /// socket on it.
    pub(crate) fn tap_and_socket() -> Result<(OwnedFd, OwnedFd), String> {
        let tap = tap_open(TAP)?;
        let _ = std::fs::write(
            format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", tap.name),
            "1",
        );
        let mut nl = Netlink::open().map_err(|e| e.to_string())?;
        let up = Request::SetLink {
            index: tap.ifindex,
            alias: None,
            up: Some(true),
            master: None,
        };
        if ask(&mut nl, &up)? != Reply::Ack {
            return Err("cannot set the tap up".into());
        }
        let pkt = packet_socket(tap.ifindex)?;
        Ok((tap.fd, pkt))
    }

    fn post_rx(d: &mut Driver, count: usize) -> Vec<(u16, u64)> {
        (0..count)
            .map(|_| {
                let buf = d.alloc(u64::from(RX_BUF), 64);
                (d.add(RX, &[(buf, RX_BUF, true)]), buf)
            })
            .collect()
    }

    /// The next frame the guest received: checks the vnet header.
    fn guest_receive(d: &mut Driver, posted: &mut Vec<(u16, u64)>) -> Option<Vec<u8>> {
        let (id, len) = d.used(RX)?;
        let at = posted.iter().position(|&(h, _)| u32::from(h) == id)?;
        let (_, buf) = posted.remove(at);
        let data = d.read_mem(buf, len as usize);
        assert_eq!(&data[10..12], &[1, 0], "num_buffers");
        Some(data[VNET_HDR_LEN..].to_vec())
    }

    #[test]
    fn virtio_net_tx_rx_and_backpressure_on_a_tap() {
        in_new_netns(|| {
            let (tap, pkt) = tap_and_socket()?;
            let dev = Arc::new(Mutex::new(Net::new(tap, MAC)?));
            let mut d = Driver::new(dev.clone());
            d.init(u64::MAX, 256);
            assert_eq!(d.config(0, 6), MAC);
            assert_ne!(d.features & (1 << VIRTIO_NET_F_MAC), 0);

            // Guest to host: header and frame in separate buffers.
            let out = frame([0xff; 6], MAC, 1);
            let hdr = d.alloc(VNET_HDR_LEN as u64, 8);
            let buf = d.alloc(out.len() as u64, 8);
            d.write_mem(buf, &out);
            d.add(
                TX,
                &[
                    (hdr, VNET_HDR_LEN as u32, false),
                    (buf, out.len() as u32, false),
                ],
            );
            d.kick(TX);
            assert!(d.take_interrupt(), "no TX interrupt");
            assert!(d.used(TX).is_some(), "TX chain not returned");
            assert_eq!(host_receive(&pkt)?, out);

            // Host to guest.
            let mut posted = post_rx(&mut d, 1);
            d.kick(RX);
            let host = [0x02, 0, 0, 0, 0, 9];
            let first = frame(MAC, host, 2);
            host_send(&pkt, &first)?;
            wait_readable(dev.lock().unwrap().tap())?;
            dev.lock().unwrap().on_tap_readable();
            assert!(d.take_interrupt(), "no RX interrupt");
            assert_eq!(guest_receive(&mut d, &mut posted), Some(first));

            // No buffers: six frames wait (one read, five in the tap),
            // none dropped; each buffer the guest adds takes the next.
            let frames: Vec<Vec<u8>> = (10..16).map(|n| frame(MAC, host, n)).collect();
            for f in &frames {
                host_send(&pkt, f)?;
            }
            wait_readable(dev.lock().unwrap().tap())?;
            dev.lock().unwrap().on_tap_readable();
            assert!(dev.lock().unwrap().rx_blocked());
            dev.lock().unwrap().on_tap_readable();
            assert_eq!(d.used(RX), None);
            let mut got = Vec::new();
            for batch in [2, 1, 10] {
                posted.extend(post_rx(&mut d, batch));
                d.kick(RX);
                while let Some(f) = guest_receive(&mut d, &mut posted) {
                    got.push(f);
                }
            }
            // The host stack may still be handing the last ones to the tap.
            while got.len() < frames.len() {
                wait_readable(dev.lock().unwrap().tap())?;
                dev.lock().unwrap().on_tap_readable();
                while let Some(f) = guest_receive(&mut d, &mut posted) {
                    got.push(f);
                }
            }
            assert_eq!(got, frames, "every frame, in order");
            assert!(!dev.lock().unwrap().rx_blocked());
            assert_eq!(dev.lock().unwrap().rx_too_big, 0);
            assert_eq!(dev.lock().unwrap().bad_chains, 0);

            // A reset stops the device: a frame arriving now waits in the
            // tap (its readiness event comes and goes unused) and reaches
            // the next driver through the notification the transport
            // gives every queue on DRIVER_OK.
            d.w32(crate::vm::kvm::virtio::mmio::STATUS, 0);
            assert!(!dev.lock().unwrap().is_activated());
            let last = frame(MAC, host, 99);
            host_send(&pkt, &last)?;
            wait_readable(dev.lock().unwrap().tap())?;
            dev.lock().unwrap().on_tap_readable();
            d.reset_alloc();
            d.init(u64::MAX, 64);
            let mut posted = post_rx(&mut d, 4);
            d.transport.queue_events()[RX]
                .read()
                .map_err(|e| format!("no notification on activation: {e}"))?;
            dev.lock().unwrap().process_queue(RX);
            assert_eq!(guest_receive(&mut d, &mut posted), Some(last));

            // The offloads follow what each driver accepted.
            assert_eq!(ethtool_get(TAP, ETHTOOL_GTSO)?, 1);
            assert_eq!(ethtool_get(TAP, ETHTOOL_GTXCSUM)?, 1);
            d.w32(crate::vm::kvm::virtio::mmio::STATUS, 0);
            d.reset_alloc();
            let plain = !((1 << VIRTIO_NET_F_GUEST_CSUM)
                | (1 << VIRTIO_NET_F_GUEST_TSO4)
                | (1 << VIRTIO_NET_F_GUEST_TSO6));
            d.init(plain, 64);
            assert_eq!(d.features & (1 << VIRTIO_NET_F_GUEST_CSUM), 0);
            d.transport.queue_events()[RX]
                .read()
                .map_err(|e| e.to_string())?;
            dev.lock().unwrap().process_queue(RX);
            assert_eq!(ethtool_get(TAP, ETHTOOL_GTSO)?, 0);
            assert_eq!(ethtool_get(TAP, ETHTOOL_GTXCSUM)?, 0);
            Ok(())
        });
    }

    #[test]
    fn virtio_net_offloads_follow_the_guest_features() {
        let bit = |b: u32| 1u64 << b;
        assert_eq!(tap_offloads(0), 0);
        // TSO without checksum offload is meaningless: none.
        assert_eq!(tap_offloads(bit(VIRTIO_NET_F_GUEST_TSO4)), 0);
        assert_eq!(tap_offloads(bit(VIRTIO_NET_F_GUEST_CSUM)), libc::TUN_F_CSUM);
        let all = bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_GUEST_TSO4)
            | bit(VIRTIO_NET_F_GUEST_TSO6)
            | bit(VIRTIO_NET_F_GUEST_ECN);
        assert_eq!(
            tap_offloads(all),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN
        );
        // Host-side (transmit) features do not change what the tap sends.
        assert_eq!(tap_offloads(bit(VIRTIO_NET_F_HOST_TSO4)), 0);
    }

    #[test]
    fn virtio_net_refuses_a_tap_without_vnet_header() {
        // A pipe is no tap: TUNSETVNETHDRSZ fails, with a clear reason.
        let (r, _w) = nix::unistd::pipe().unwrap();
        let err = Net::new(r, MAC).err().expect("refused");
        assert!(err.contains("vnet header"), "{err}");
    }
}
