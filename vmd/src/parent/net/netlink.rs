//! The parent's NETLINK_ROUTE socket: non-blocking, registered in the
//! parent's mio loop, one request in flight at a time (the kernel
//! answers each at once; net/mod.rs runs its steps one after another).
//! Requests are built with netlink-packet-route ([`nl_build`], pure) and
//! answered by [`Reply`]: an ACK, the kernel's error, a link, or what a
//! dump listed.

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressHeaderFlags, AddressMessage};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use nix::errno::Errno;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, RawFd};

/// One request to the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// The link called this (answered by [`Reply::Link`] or ENODEV).
    LinkByName(String),
    /// The link with this index (answered by [`Reply::Link`] or ENODEV).
    LinkByIndex(u32),
    /// Changes a link: its alias (ifalias), up or down, its master.
    SetLink {
        index: u32,
        alias: Option<String>,
        up: Option<bool>,
        master: Option<u32>,
    },
    /// Creates a bridge of this name; EEXIST if the name is taken.
    NewBridge(String),
    DelLink(u32),
    /// Every link (a dump).
    Links,
    /// Every address (a dump).
    Addresses,
    /// An IPv4 or IPv6 address (IPv6 without duplicate address
    /// detection: the address is vmd's own, and usable at once).
    AddAddress {
        index: u32,
        addr: IpAddr,
        prefix_len: u8,
    },
    /// A link group or a VRF (links.rs).
    Link(super::links::LinkRequest),
}

impl Request {
    fn is_dump(&self) -> bool {
        matches!(self, Request::Links | Request::Addresses)
    }
}

/// What the kernel says of a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `bridge`, `tun`, ... (IFLA_INFO_KIND), None for a plain device.
    pub kind: Option<String>,
    pub master: Option<u32>,
    pub alias: Option<String>,
    pub up: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ack,
    Link(Link),
    Links(Vec<Link>),
    /// (link index, address) of every address.
    Addresses(Vec<(u32, IpAddr)>),
    /// The kernel refused the request.
    Failed(Errno),
}

/// The bytes of request `req` with sequence number `seq`.
pub fn nl_build(req: &Request, seq: u32) -> Vec<u8> {
    let mut flags = NLM_F_REQUEST;
    let message = match req {
        Request::LinkByName(name) => {
            let mut link = LinkMessage::default();
            link.attributes.push(LinkAttribute::IfName(name.clone()));
            RouteNetlinkMessage::GetLink(link)
        }
        Request::LinkByIndex(index) => {
            let mut link = LinkMessage::default();
            link.header.index = *index;
            RouteNetlinkMessage::GetLink(link)
        }
        Request::SetLink {
            index,
            alias,
            up,
            master,
        } => {
            flags |= NLM_F_ACK;
            let mut link = LinkMessage::default();
            link.header.index = *index;
            if let Some(up) = up {
                link.header.change_mask = LinkFlags::Up;
                link.header.flags = if *up {
                    LinkFlags::Up
                } else {
                    LinkFlags::empty()
                };
            }
            if let Some(alias) = alias {
                link.attributes.push(LinkAttribute::IfAlias(alias.clone()));
            }
            if let Some(master) = master {
                link.attributes.push(LinkAttribute::Controller(*master));
            }
            RouteNetlinkMessage::SetLink(link)
        }
        Request::NewBridge(name) => {
            flags |= NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
            let mut link = LinkMessage::default();
            link.attributes.push(LinkAttribute::IfName(name.clone()));
            link.attributes
                .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                    InfoKind::Bridge,
                )]));
            RouteNetlinkMessage::NewLink(link)
        }
        Request::DelLink(index) => {
            flags |= NLM_F_ACK;
            let mut link = LinkMessage::default();
            link.header.index = *index;
            RouteNetlinkMessage::DelLink(link)
        }
        Request::Links => {
            flags |= NLM_F_DUMP;
            RouteNetlinkMessage::GetLink(LinkMessage::default())
        }
        Request::Addresses => {
            flags |= NLM_F_DUMP;
            RouteNetlinkMessage::GetAddress(AddressMessage::default())
        }
        Request::AddAddress {
            index,
            addr,
            prefix_len,
        } => {
            flags |= NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
            let mut msg = AddressMessage::default();
            msg.header.prefix_len = *prefix_len;
            msg.header.index = *index;
            match addr {
                IpAddr::V4(_) => {
                    msg.header.family = AddressFamily::Inet;
                    msg.attributes.push(AddressAttribute::Local(*addr));
                }
                IpAddr::V6(_) => {
                    msg.header.family = AddressFamily::Inet6;
                    msg.header.flags = AddressHeaderFlags::Nodad;
                }
            }
            msg.attributes.push(AddressAttribute::Address(*addr));
            RouteNetlinkMessage::NewAddress(msg)
        }
        Request::Link(r) => {
            let (m, f) = super::links::links_message(r);
            flags = f;
            m
        }
    };
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
    packet.finalize();
    let mut buf = vec![0; packet.header.length as usize];
    packet.serialize(&mut buf);
    buf
}

fn link_of(msg: &LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        name: String::new(),
        kind: None,
        master: None,
        alias: None,
        up: msg.header.flags.contains(LinkFlags::Up),
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(name) => link.name = name.clone(),
            LinkAttribute::Controller(index) => link.master = Some(*index),
            LinkAttribute::IfAlias(alias) => link.alias = Some(alias.clone()),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(kind) = info {
                        link.kind = Some(kind.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    link
}

/// A request sent and the parts of its answer read so far.
struct InFlight {
    seq: u32,
    dump: bool,
    /// An address dump (its answer is Addresses even when empty).
    addresses_dump: bool,
    links: Vec<Link>,
    addresses: Vec<(u32, IpAddr)>,
    link: Option<Link>,
}

pub struct Netlink {
    socket: Socket,
    seq: u32,
    in_flight: Option<InFlight>,
    buf: Vec<u8>,
}

impl Netlink {
    /// A non-blocking NETLINK_ROUTE socket in our network namespace.
    pub fn open() -> std::io::Result<Netlink> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        socket.set_non_blocking(true)?;
        Ok(Netlink {
            socket,
            seq: 0,
            in_flight: None,
            buf: vec![0; 1 << 16],
        })
    }

    /// Sends `req`; its answer comes from [`Netlink::receive`]. The kernel
    /// handles a request as it is sent: nothing here waits.
    pub fn send(&mut self, req: &Request) -> Result<(), Errno> {
        self.seq = self.seq.wrapping_add(1).max(1);
        let bytes = nl_build(req, self.seq);
        match self.socket.send(&bytes, 0) {
            Ok(n) if n == bytes.len() => {}
            Ok(_) => return Err(Errno::EMSGSIZE),
            Err(e) => return Err(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))),
        }
        self.in_flight = Some(InFlight {
            seq: self.seq,
            dump: req.is_dump(),
            addresses_dump: matches!(req, Request::Addresses),
            links: Vec::new(),
            addresses: Vec::new(),
            link: None,
        });
        Ok(())
    }

    /// Reads what the kernel sent, without waiting: the answer to the
    /// request in flight once it is complete. Err: the socket failed or
    /// an answer could not be read (the request in flight is given up).
    pub fn receive(&mut self) -> Result<Option<Reply>, String> {
        loop {
            let n = match self.socket.recv(&mut &mut self.buf[..], libc::MSG_DONTWAIT) {
                Ok(0) => return Ok(None),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.in_flight = None;
                    return Err(format!("netlink: {e}"));
                }
            };
            let mut offset = 0;
            while offset < n {
                let msg = match NetlinkMessage::<RouteNetlinkMessage>::deserialize(
                    &self.buf[offset..n],
                ) {
                    Ok(msg) => msg,
                    Err(e) => {
                        self.in_flight = None;
                        return Err(format!("netlink: an answer cannot be read: {e}"));
                    }
                };
                let len = msg.header.length as usize;
                if let Some(reply) = self.take(msg) {
                    return Ok(Some(reply));
                }
                if len == 0 {
                    break;
                }
                offset += (len + 3) & !3;
            }
        }
    }

    /// One message of an answer: the whole answer once it is complete.
    fn take(&mut self, msg: NetlinkMessage<RouteNetlinkMessage>) -> Option<Reply> {
        let flight = self.in_flight.as_mut()?;
        if msg.header.sequence_number != flight.seq {
            return None;
        }
        let done = match msg.payload {
            NetlinkPayload::Error(e) => match e.code {
                None => Some(Reply::Ack),
                Some(code) => Some(Reply::Failed(Errno::from_raw(-code.get()))),
            },
            NetlinkPayload::Done(_) => Some(if flight.addresses_dump {
                Reply::Addresses(std::mem::take(&mut flight.addresses))
            } else {
                Reply::Links(std::mem::take(&mut flight.links))
            }),
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                if flight.dump {
                    flight.links.push(link_of(&link));
                    None
                } else {
                    flight.link = Some(link_of(&link));
                    flight.link.take().map(Reply::Link)
                }
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(addr)) => {
                let ip = addr.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                });
                if let Some(ip) = ip {
                    flight.addresses.push((addr.header.index, ip));
                }
                None
            }
            _ => None,
        };
        if done.is_some() {
            self.in_flight = None;
        }
        done
    }
}

impl AsRawFd for Netlink {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::parent::net::tap::{tap_open, TAP_TEMPLATE};
    use crate::parent::net::testns::in_new_netns;
    use netlink_packet_core::NetlinkBuffer;
    use std::net::Ipv4Addr;

    /// Sends `req` and waits for its answer (tests only: the parent never
    /// waits).
    pub fn ask(nl: &mut Netlink, req: &Request) -> Result<Reply, String> {
        nl.send(req).map_err(|e| format!("send {req:?}: {e}"))?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Some(reply) = nl.receive()? {
                return Ok(reply);
            }
            if std::time::Instant::now() > deadline {
                return Err(format!("no answer to {req:?}"));
            }
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(nl.as_raw_fd()) };
            let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
            let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16));
        }
    }

    #[test]
    fn an_empty_address_dump_is_addresses() {
        // A new namespace's lo is down: no address at all (a VRF has none
        // either, and its removal asks for them).
        in_new_netns(|| {
            let mut nl = Netlink::open().map_err(|e| e.to_string())?;
            assert_eq!(
                ask(&mut nl, &Request::Addresses)?,
                Reply::Addresses(Vec::new())
            );
            Ok(())
        });
    }

    #[test]
    fn requests_are_well_formed() {
        let bytes = nl_build(
            &Request::SetLink {
                index: 7,
                alias: Some("vm1-if0-web".into()),
                up: Some(true),
                master: Some(3),
            },
            42,
        );
        let buf = NetlinkBuffer::new_checked(&bytes[..]).expect("header");
        assert_eq!(buf.length() as usize, bytes.len());
        assert_eq!(buf.sequence_number(), 42);
        assert_eq!(buf.message_type(), libc::RTM_SETLINK);
        assert_ne!(buf.flags() & NLM_F_ACK, 0);
        let back = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes).expect("parse");
        let NetlinkPayload::InnerMessage(RouteNetlinkMessage::SetLink(link)) = back.payload else {
            panic!("not a link message");
        };
        assert_eq!(link.header.index, 7);
        assert!(link.header.flags.contains(LinkFlags::Up));
        assert!(link
            .attributes
            .contains(&LinkAttribute::IfAlias("vm1-if0-web".into())));
        assert!(link.attributes.contains(&LinkAttribute::Controller(3)));
        let bridge = nl_build(&Request::NewBridge("br9".into()), 1);
        let buf = NetlinkBuffer::new_checked(&bridge[..]).expect("header");
        assert_eq!(buf.message_type(), libc::RTM_NEWLINK);
        assert_eq!(
            buf.flags() & (NLM_F_CREATE | NLM_F_EXCL),
            NLM_F_CREATE | NLM_F_EXCL
        );
        let dump = nl_build(&Request::Links, 2);
        let buf = NetlinkBuffer::new_checked(&dump[..]).expect("header");
        assert_eq!(buf.flags() & NLM_F_DUMP, NLM_F_DUMP);
    }

    #[test]
    fn bridges_taps_aliases_and_addresses_in_a_netns() {
        in_new_netns(|| {
            let mut nl = Netlink::open().map_err(|e| e.to_string())?;
            assert_eq!(
                ask(&mut nl, &Request::LinkByName("br0".into()))?,
                Reply::Failed(Errno::ENODEV)
            );
            assert_eq!(ask(&mut nl, &Request::NewBridge("br0".into()))?, Reply::Ack);
            assert_eq!(
                ask(&mut nl, &Request::NewBridge("br0".into()))?,
                Reply::Failed(Errno::EEXIST)
            );
            let Reply::Link(bridge) = ask(&mut nl, &Request::LinkByName("br0".into()))? else {
                return Err("no bridge".into());
            };
            assert_eq!(bridge.kind.as_deref(), Some("bridge"));
            let tap = tap_open(TAP_TEMPLATE)?;
            let set = Request::SetLink {
                index: tap.ifindex,
                alias: Some("vm1-if0-a".into()),
                up: Some(true),
                master: Some(bridge.index),
            };
            assert_eq!(ask(&mut nl, &set)?, Reply::Ack);
            let Reply::Links(links) = ask(&mut nl, &Request::Links)? else {
                return Err("no links".into());
            };
            let port = links
                .iter()
                .find(|l| l.index == tap.ifindex)
                .ok_or("tap not listed")?;
            assert_eq!(port.master, Some(bridge.index));
            assert_eq!(port.kind.as_deref(), Some("tun"));
            assert_eq!(port.alias.as_deref(), Some("vm1-if0-a"));
            assert!(port.up);
            let addr = Request::AddAddress {
                index: tap.ifindex,
                addr: IpAddr::V4(Ipv4Addr::new(100, 64, 1, 2)),
                prefix_len: 31,
            };
            assert_eq!(ask(&mut nl, &addr)?, Reply::Ack);
            let Reply::Addresses(addrs) = ask(&mut nl, &Request::Addresses)? else {
                return Err("no addresses".into());
            };
            assert!(addrs.contains(&(tap.ifindex, IpAddr::V4(Ipv4Addr::new(100, 64, 1, 2)))));
            assert_eq!(
                ask(
                    &mut nl,
                    &Request::SetLink {
                        index: 9999,
                        alias: None,
                        up: Some(true),
                        master: None
                    }
                )?,
                Reply::Failed(Errno::ENODEV)
            );
            assert_eq!(ask(&mut nl, &Request::DelLink(bridge.index))?, Reply::Ack);
            assert_eq!(
                ask(&mut nl, &Request::LinkByIndex(bridge.index))?,
                Reply::Failed(Errno::ENODEV)
            );
            Ok(())
        });
    }
}
