//! The parent's side of the DHCP server on local interfaces: it opens one
//! AF_PACKET socket per local interface (bound to the interface,
//! PACKET_AUXDATA on so checksums left to offload can be recognised, a
//! classic BPF filter that keeps only IPv4 UDP to port 67), keeps it, and
//! hands a copy to the switch process with the interface's lease; when
//! switch is restarted every socket is sent again.
//!
//! The seam to the rest of the parent is [`LocalDhcp::serve`] and
//! [`LocalDhcp::stop`] (Parent::dhcp_serve and Parent::dhcp_stop in
//! mod.rs call them and send the frames to switch).

// Until the local taps call it (issue 20), only test builds serve
// (VMD_TEST_DHCP_SERVE, trigger.rs).
#![cfg_attr(not(feature = "test-triggers"), allow(dead_code))]

use common::config::Ipv4Prefix;
use common::dhcp::Lease;
use common::imsg::{Frame, Message};
use common::local::{local_addr4, LocalAddrError, LocalPort, Side};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum DhcpError {
    #[error("{port}: {source}")]
    Address {
        port: LocalPort,
        source: LocalAddrError,
    },
    #[error("{port}: cannot open a packet socket on interface index {ifindex}: {what}: {source}")]
    Socket {
        port: LocalPort,
        ifindex: u32,
        what: &'static str,
        source: io::Error,
    },
}

/// What a local interface's DHCP lease is made of (besides its addresses,
/// which come from `local prefix`).
pub struct LocalInterface<'a> {
    /// The interface (the tap) the guest's frames arrive on.
    pub ifindex: u32,
    pub vm_name: &'a str,
    pub vmid: u32,
    /// The interface's index among the VM's interfaces.
    pub index: u32,
    /// The guest's MAC.
    pub mac: [u8; 6],
    /// `boot device net` / `-B net`.
    pub net_boot: bool,
}

struct Served {
    port: LocalPort,
    fd: OwnedFd,
    lease: Lease,
}

/// Every local interface served, with its socket.
#[derive(Default)]
pub struct LocalDhcp {
    served: Vec<Served>,
}

impl LocalDhcp {
    /// Opens the interface's packet socket and keeps it; the frame to send
    /// to switch. An interface served already is served anew.
    pub fn serve(&mut self, prefix: Ipv4Prefix, nic: &LocalInterface) -> Result<Frame, DhcpError> {
        let port = LocalPort {
            vmid: nic.vmid,
            index: nic.index,
        };
        let addr = |side| {
            local_addr4(prefix, nic.vmid, nic.index, side)
                .map_err(|source| DhcpError::Address { port, source })
        };
        let (guest, host) = (addr(Side::Guest)?, addr(Side::Host)?);
        let socket_error = |what| {
            move |source| DhcpError::Socket {
                port,
                ifindex: nic.ifindex,
                what,
                source,
            }
        };
        let fd = dhcp_socket(nic.ifindex).map_err(|(what, e)| socket_error(what)(e))?;
        let host_mac = socket_mac(&fd).map_err(socket_error("getsockname"))?;
        let lease = Lease {
            guest_mac: nic.mac,
            host_mac,
            guest,
            host,
            host_name: nic.vm_name.to_string(),
            net_boot: nic.net_boot,
        };
        self.served.retain(|s| s.port != port);
        self.served.push(Served { port, fd, lease });
        let frame = self.frame(self.served.len() - 1);
        frame.map_err(socket_error("dup"))
    }

    /// Forgets the port and closes the parent's socket; the frame that
    /// tells switch to close its own, if the port was served.
    pub fn stop(&mut self, port: LocalPort) -> Option<Frame> {
        let before = self.served.len();
        self.served.retain(|s| s.port != port);
        (self.served.len() < before).then(|| Frame::new(Message::SwitchStop { port }))
    }

    /// Switch found the port's interface gone: forget it.
    pub fn gone(&mut self, port: LocalPort) {
        self.served.retain(|s| s.port != port);
    }

    /// Every port's frame, for a switch that (re)started.
    pub fn frames(&self) -> Vec<Frame> {
        (0..self.served.len())
            .filter_map(|i| match self.frame(i) {
                Ok(frame) => Some(frame),
                Err(e) => {
                    crate::log::log_warn!(
                        "dhcp {}: cannot pass its socket: {e}",
                        self.served[i].port
                    );
                    None
                }
            })
            .collect()
    }

    fn frame(&self, index: usize) -> io::Result<Frame> {
        let s = &self.served[index];
        Ok(Frame {
            fd: Some(s.fd.try_clone()?),
            ..Frame::new(Message::SwitchServe {
                port: s.port,
                lease: s.lease.clone(),
            })
        })
    }
}

/// Classic BPF: accept IPv4 UDP to port 67 (first fragments only: the
/// port is in the first), drop the rest in the kernel. Offsets are in the
/// Ethernet frame; a jump skips that many instructions.
fn dhcp_filter() -> [libc::sock_filter; 11] {
    const fn op(code: u32, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
        libc::sock_filter {
            code: code as u16,
            jt,
            jf,
            k,
        }
    }
    use libc::{
        BPF_ABS, BPF_B, BPF_H, BPF_IND, BPF_JEQ, BPF_JMP, BPF_JSET, BPF_K, BPF_LD, BPF_LDX,
        BPF_MSH, BPF_RET,
    };
    [
        /* 0 */ op(BPF_LD | BPF_H | BPF_ABS, 0, 0, 12), // ethertype
        /* 1 */ op(BPF_JMP | BPF_JEQ | BPF_K, 0, 8, 0x0800), // IPv4, else 10
        /* 2 */ op(BPF_LD | BPF_B | BPF_ABS, 0, 0, 23), // IP protocol
        /* 3 */ op(BPF_JMP | BPF_JEQ | BPF_K, 0, 6, 17), // UDP, else 10
        /* 4 */ op(BPF_LD | BPF_H | BPF_ABS, 0, 0, 20), // fragment offset
        /* 5 */ op(BPF_JMP | BPF_JSET | BPF_K, 4, 0, 0x1fff), // not first: 10
        /* 6 */ op(BPF_LDX | BPF_B | BPF_MSH, 0, 0, 14), // X = IP header length
        /* 7 */ op(BPF_LD | BPF_H | BPF_IND, 0, 0, 16), // UDP destination port
        /* 8 */ op(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, 67), // port 67, else 10
        /* 9 */ op(BPF_RET | BPF_K, 0, 0, 0x0004_0000), // accept (256 KiB)
        /* 10 */ op(BPF_RET | BPF_K, 0, 0, 0), // drop
    ]
}

/// Opens the packet socket: no protocol until the filter is attached, so
/// no frame gets in unfiltered; then bound to IPv4 on `ifindex`.
fn dhcp_socket(ifindex: u32) -> Result<OwnedFd, (&'static str, io::Error)> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if raw < 0 {
        return Err(("socket", io::Error::last_os_error()));
    }
    // SAFETY: raw is a descriptor we just opened and own alone.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut program = dhcp_filter();
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    setsockopt(&fd, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &fprog)
        .map_err(|e| ("SO_ATTACH_FILTER", e))?;
    let one: libc::c_int = 1;
    setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_AUXDATA, &one)
        .map_err(|e| ("PACKET_AUXDATA", e))?;
    // SAFETY: plain-data structure, all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = (libc::ETH_P_IP as u16).to_be();
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: binds our socket to an address structure of the given size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc != 0 {
        return Err(("bind", io::Error::last_os_error()));
    }
    Ok(fd)
}

fn setsockopt<T>(fd: &OwnedFd, level: i32, name: i32, value: &T) -> io::Result<()> {
    // SAFETY: passes a live value of its own size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The MAC of the interface a packet socket is bound to (what replies
/// come from).
fn socket_mac(fd: &OwnedFd) -> io::Result<[u8; 6]> {
    // SAFETY: plain-data structure, all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
    // SAFETY: getsockname writes at most `len` bytes into addr.
    let rc = unsafe {
        libc::getsockname(
            fd.as_raw_fd(),
            (&mut addr as *mut libc::sockaddr_ll).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if addr.sll_halen != 6 {
        return Err(io::Error::other(format!(
            "not an Ethernet interface (address length {})",
            addr.sll_halen
        )));
    }
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&addr.sll_addr[..6]);
    Ok(mac)
}
