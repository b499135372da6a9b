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

use crate::packet;
use common::config::Ipv4Prefix;
use common::dhcp::Lease;
use common::imsg::{Frame, Message};
use common::local::{local_addr4, LocalAddrError, LocalPort, Side};
use std::io;
use std::os::fd::OwnedFd;
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
        let fd = packet::open_dhcp(nic.ifindex).map_err(|(what, e)| socket_error(what)(e))?;
        let host_mac = packet::mac(&fd).map_err(socket_error("getsockname"))?;
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

    /// Forgets VM `vmid`'s ports and closes the parent's sockets; the
    /// frames that tell switch to close its own.
    pub fn stop_vm(&mut self, vmid: u32) -> Vec<Frame> {
        let (gone, kept) = std::mem::take(&mut self.served)
            .into_iter()
            .partition(|s| s.port.vmid == vmid);
        self.served = kept;
        gone.into_iter()
            .map(|s: Served| Frame::new(Message::SwitchStop { port: s.port }))
            .collect()
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
