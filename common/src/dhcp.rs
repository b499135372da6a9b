//! The BOOTP/DHCP server of local interfaces, as a pure function: a
//! received Ethernet frame and the interface's [`Lease`] in, the reply
//! frame or the reason it is dropped out. The switch process reads frames
//! from a packet socket on the tap and writes the replies back; nothing
//! here does I/O. Ethernet, IPv4, UDP and BOOTP are decoded and encoded by
//! hand (a full DHCP crate would bring dozens of crates for this).
//!
//! The rules are OpenBSD vmd's dhcp.c. A request is answered only when
//! - it comes from the interface's own MAC to the broadcast MAC, as an
//!   unfragmented IPv4 UDP datagram from port 68 to port 67 whose IP and
//!   UDP checksums are right (a UDP checksum of 0 means none; a frame the
//!   kernel marked TP_STATUS_CSUMNOTREADY carries a partial checksum left
//!   to offload, which is not checked);
//! - it is a BOOTREQUEST for Ethernet (htype 1, hlen 6) with that MAC in
//!   chaddr, hops 0, ciaddr 0 (renewals and INFORMs are ignored: the lease
//!   never changes) and an empty file field.
//!
//! DISCOVER gets an OFFER; REQUEST gets an ACK, or a NAK when it asks for
//! another address; a request without a DHCP message type (plain BOOTP)
//! gets a BOOTREPLY. Other message types (DECLINE, RELEASE) and REQUESTs
//! naming another server are ignored. Replies carry the subnet mask (a
//! /31), the host side as router and DNS server, the lease time 0xffffffff
//! and the server identifier (DHCP only), the VM's name as host name (on
//! every reply: an extension, OpenBSD sends it only for `boot device
//! net`), and the file `auto_install` for a network boot. A NAK carries
//! only its type and the server identifier. Replies go to the client's MAC
//! and its new address, or to broadcast when the client sets the
//! broadcast flag and for a NAK (RFC 2131 4.1).
//!
//! Options: only the options field after the magic cookie is read; option
//! overload (52) is not followed, so the sname and file fields are never
//! parsed as options and nothing can point the parser back at itself
//! (no client we serve uses overload in a request; the file field must be
//! empty anyway). Each step of the parser consumes at least one byte of a
//! bounded slice, so it always ends; an option whose length runs past the
//! end of the packet, or a message type or requested address of the wrong
//! length, drops the request. A missing END option is tolerated.

use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use thiserror::Error;

/// UDP ports of BOOTP.
pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;
/// The fixed part of a BOOTP message, before the options.
const BOOTP_FIXED: usize = 236;
/// The smallest BOOTP message (RFC 951); replies are padded to it.
const BOOTP_MIN: usize = 300;
const ETHER_HDR: usize = 14;
const IP_HDR: usize = 20;
const UDP_HDR: usize = 8;
/// The largest frame accepted: a 1500-byte IP packet in Ethernet.
pub const MAX_FRAME: usize = ETHER_HDR + 1500;
const ETHERTYPE_IPV4: u16 = 0x0800;
const BROADCAST: [u8; 6] = [0xff; 6];
const MAGIC: [u8; 4] = [99, 130, 83, 99];
const BOOTREQUEST: u8 = 1;
const BOOTREPLY: u8 = 2;
const HTYPE_ETHER: u8 = 1;
const FLAG_BROADCAST: u16 = 0x8000;
/// The file name a network boot's lease carries, as in OpenBSD.
pub const NET_BOOT_FILE: &str = "auto_install";

// Option codes (RFC 2132).
const OPT_PAD: u8 = 0;
const OPT_SUBNET_MASK: u8 = 1;
const OPT_ROUTER: u8 = 3;
const OPT_DNS: u8 = 6;
const OPT_HOST_NAME: u8 = 12;
const OPT_REQUESTED_ADDR: u8 = 50;
const OPT_LEASE_TIME: u8 = 51;
const OPT_MESSAGE_TYPE: u8 = 53;
const OPT_SERVER_ID: u8 = 54;
const OPT_END: u8 = 255;

// DHCP message types.
const DHCPDISCOVER: u8 = 1;
const DHCPOFFER: u8 = 2;
const DHCPREQUEST: u8 = 3;
const DHCPACK: u8 = 5;
const DHCPNAK: u8 = 6;

/// What the server knows about one local interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The guest's MAC: the only source answered.
    pub guest_mac: [u8; 6],
    /// The MAC replies come from (the tap's own).
    pub host_mac: [u8; 6],
    /// The address offered (the guest side of the /31).
    pub guest: Ipv4Addr,
    /// The host side: server identifier, router and DNS server.
    pub host: Ipv4Addr,
    /// The VM's name, sent as host name (empty: none).
    pub host_name: String,
    /// `boot device net` / `-B net`: the lease carries `auto_install`.
    pub net_boot: bool,
}

/// Why a frame got no answer. Every variant but the ignored message types
/// means a frame a well-behaved client on this interface would not send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum Drop {
    #[error("frame of {0} bytes is too short or too long")]
    Size(usize),
    #[error("not to the broadcast address")]
    NotBroadcast,
    #[error("from another MAC")]
    ForeignMac,
    #[error("not IPv4 over Ethernet")]
    NotIpv4,
    #[error("bad IP header")]
    IpHeader,
    #[error("bad IP header checksum")]
    IpChecksum,
    #[error("IP fragment")]
    Fragment,
    #[error("not UDP from port 68 to port 67")]
    NotBootp,
    #[error("bad UDP length")]
    UdpLength,
    #[error("bad UDP checksum")]
    UdpChecksum,
    #[error("not a BOOTREQUEST for this interface's MAC")]
    NotRequest,
    #[error("relayed, renewing or naming a boot file (hops, ciaddr or file set)")]
    Unsupported,
    #[error("malformed options")]
    Options,
    #[error("DHCP message type {0} ignored")]
    MessageType(u8),
    #[error("request for another server")]
    OtherServer,
}

/// What the options of a request said.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct RequestOptions {
    message_type: Option<u8>,
    requested: Option<Ipv4Addr>,
    server_id: Option<Ipv4Addr>,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn ip_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

/// The Internet checksum's one's complement sum of `data`, added to `sum`.
fn ones_sum(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The UDP pseudo header's sum.
fn pseudo_sum(src: Ipv4Addr, dst: Ipv4Addr, udp_len: usize) -> u32 {
    let sum = ones_sum(0, &src.octets());
    let sum = ones_sum(sum, &dst.octets());
    sum + 17 + udp_len as u32
}

/// The answer to `frame` received on the interface of `lease`, or why
/// there is none. `csum_not_ready`: the kernel said the UDP checksum was
/// left to offload (TP_STATUS_CSUMNOTREADY), so it is not checked.
pub fn dhcp_reply(frame: &[u8], csum_not_ready: bool, lease: &Lease) -> Result<Vec<u8>, Drop> {
    if frame.len() < ETHER_HDR + IP_HDR + UDP_HDR + BOOTP_FIXED || frame.len() > MAX_FRAME {
        return Err(Drop::Size(frame.len()));
    }
    if frame[0..6] != BROADCAST {
        return Err(Drop::NotBroadcast);
    }
    if frame[6..12] != lease.guest_mac {
        return Err(Drop::ForeignMac);
    }
    if be16(frame, 12) != ETHERTYPE_IPV4 {
        return Err(Drop::NotIpv4);
    }
    let ip = &frame[ETHER_HDR..];
    if ip[0] >> 4 != 4 {
        return Err(Drop::NotIpv4);
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(be16(ip, 2));
    // Ethernet may pad a frame: the IP total length decides, but it must
    // fit in what arrived and hold the headers.
    if ihl < IP_HDR || total > ip.len() || total < ihl + UDP_HDR {
        return Err(Drop::IpHeader);
    }
    if fold(ones_sum(0, &ip[..ihl])) != 0xffff {
        return Err(Drop::IpChecksum);
    }
    if be16(ip, 6) & 0x3fff != 0 {
        return Err(Drop::Fragment);
    }
    if ip[9] != 17 {
        return Err(Drop::NotBootp);
    }
    let (src, dst) = (ip_at(ip, 12), ip_at(ip, 16));
    let udp = &ip[ihl..total];
    if be16(udp, 0) != CLIENT_PORT || be16(udp, 2) != SERVER_PORT {
        return Err(Drop::NotBootp);
    }
    let udp_len = usize::from(be16(udp, 4));
    if udp_len != udp.len() {
        return Err(Drop::UdpLength);
    }
    if be16(udp, 6) != 0
        && !csum_not_ready
        && fold(ones_sum(pseudo_sum(src, dst, udp_len), udp)) != 0xffff
    {
        return Err(Drop::UdpChecksum);
    }
    let bootp = &udp[UDP_HDR..];
    if bootp.len() < BOOTP_FIXED {
        return Err(Drop::UdpLength);
    }
    if bootp[0] != BOOTREQUEST
        || bootp[1] != HTYPE_ETHER
        || bootp[2] != 6
        || bootp[28..34] != lease.guest_mac
    {
        return Err(Drop::NotRequest);
    }
    if bootp[3] != 0 || bootp[12..16] != [0; 4] || bootp[108] != 0 {
        return Err(Drop::Unsupported);
    }
    let options = parse_options(&bootp[BOOTP_FIXED..])?;
    let reply_type = match options.message_type {
        None => None,
        Some(DHCPDISCOVER) => Some(DHCPOFFER),
        Some(DHCPREQUEST) => {
            if options.server_id.is_some_and(|id| id != lease.host) {
                return Err(Drop::OtherServer);
            }
            match options.requested {
                Some(addr) if addr != lease.guest => Some(DHCPNAK),
                _ => Some(DHCPACK),
            }
        }
        Some(other) => return Err(Drop::MessageType(other)),
    };
    Ok(build_reply(bootp, reply_type, lease))
}

/// Reads the options field (after the fixed part). No cookie, or too
/// little room for one option after it: a plain BOOTP request.
fn parse_options(area: &[u8]) -> Result<RequestOptions, Drop> {
    let mut found = RequestOptions::default();
    if area.len() < MAGIC.len() + 3 || area[..4] != MAGIC {
        return Ok(found);
    }
    let mut rest = &area[4..];
    while let Some((&code, tail)) = rest.split_first() {
        match code {
            OPT_END => break,
            OPT_PAD => {
                rest = tail;
                continue;
            }
            _ => {}
        }
        let (&len, tail) = tail.split_first().ok_or(Drop::Options)?;
        let len = usize::from(len);
        if tail.len() < len {
            return Err(Drop::Options);
        }
        let (value, tail) = tail.split_at(len);
        rest = tail;
        match code {
            OPT_MESSAGE_TYPE => match value {
                [t] => {
                    found.message_type.get_or_insert(*t);
                }
                _ => return Err(Drop::Options),
            },
            OPT_REQUESTED_ADDR => match value {
                [a, b, c, d] => {
                    found.requested.get_or_insert(Ipv4Addr::new(*a, *b, *c, *d));
                }
                _ => return Err(Drop::Options),
            },
            OPT_SERVER_ID => match value {
                [a, b, c, d] => {
                    found.server_id.get_or_insert(Ipv4Addr::new(*a, *b, *c, *d));
                }
                _ => return Err(Drop::Options),
            },
            _ => {}
        }
    }
    Ok(found)
}

fn put_option(out: &mut Vec<u8>, code: u8, value: &[u8]) {
    out.push(code);
    out.push(value.len() as u8);
    out.extend_from_slice(value);
}

/// The reply frame to a valid request whose BOOTP part is `req`.
/// `reply_type` None: a BOOTREPLY without DHCP options.
fn build_reply(req: &[u8], reply_type: Option<u8>, lease: &Lease) -> Vec<u8> {
    let nak = reply_type == Some(DHCPNAK);
    let flags = be16(req, 10);
    let broadcast = nak || flags & FLAG_BROADCAST != 0;

    let mut bootp = vec![0u8; BOOTP_FIXED];
    bootp[0] = BOOTREPLY;
    bootp[1] = HTYPE_ETHER;
    bootp[2] = 6;
    bootp[4..8].copy_from_slice(&req[4..8]); // xid
    bootp[10..12].copy_from_slice(&flags.to_be_bytes());
    if !nak {
        bootp[16..20].copy_from_slice(&lease.guest.octets()); // yiaddr
        bootp[20..24].copy_from_slice(&lease.host.octets()); // siaddr
    }
    bootp[24..28].copy_from_slice(&req[24..28]); // giaddr
    bootp[28..34].copy_from_slice(&lease.guest_mac); // chaddr
    if lease.net_boot && !nak {
        bootp[108..108 + NET_BOOT_FILE.len()].copy_from_slice(NET_BOOT_FILE.as_bytes());
    }
    bootp.extend_from_slice(&MAGIC);
    if let Some(t) = reply_type {
        put_option(&mut bootp, OPT_MESSAGE_TYPE, &[t]);
        if !nak {
            put_option(&mut bootp, OPT_LEASE_TIME, &u32::MAX.to_be_bytes());
        }
        put_option(&mut bootp, OPT_SERVER_ID, &lease.host.octets());
    }
    if !nak {
        put_option(
            &mut bootp,
            OPT_SUBNET_MASK,
            &crate::local::LOCAL_NETMASK.octets(),
        );
        put_option(&mut bootp, OPT_ROUTER, &lease.host.octets());
        put_option(&mut bootp, OPT_DNS, &lease.host.octets());
        let name = lease.host_name.as_bytes();
        if !name.is_empty() && name.len() <= usize::from(u8::MAX) {
            put_option(&mut bootp, OPT_HOST_NAME, name);
        }
    }
    bootp.push(OPT_END);
    if bootp.len() < BOOTP_MIN {
        bootp.resize(BOOTP_MIN, OPT_PAD);
    }

    let (dst_mac, dst_ip) = if broadcast {
        (BROADCAST, Ipv4Addr::BROADCAST)
    } else {
        (lease.guest_mac, lease.guest)
    };
    let ends = Ends {
        macs: (lease.host_mac, dst_mac),
        ips: (lease.host, dst_ip),
        ports: (SERVER_PORT, CLIENT_PORT),
    };
    // TOS low delay, as BOOTP servers send.
    encode_udp(&ends, 0x10, &bootp)
}

/// The two ends of a datagram: (source, destination) each.
struct Ends {
    macs: ([u8; 6], [u8; 6]),
    ips: (Ipv4Addr, Ipv4Addr),
    ports: (u16, u16),
}

/// An Ethernet frame holding an IPv4 UDP datagram of `payload`, with its
/// checksums.
fn encode_udp(ends: &Ends, tos: u8, payload: &[u8]) -> Vec<u8> {
    let udp_len = UDP_HDR + payload.len();
    let ip_len = IP_HDR + udp_len;
    let mut frame = Vec::with_capacity(ETHER_HDR + ip_len);
    frame.extend_from_slice(&ends.macs.1);
    frame.extend_from_slice(&ends.macs.0);
    frame.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    frame.extend_from_slice(&[0x45, tos]); // IPv4, 20-byte header
    frame.extend_from_slice(&(ip_len as u16).to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 0, 64, 17, 0, 0]); // id, frag, ttl, UDP
    frame.extend_from_slice(&ends.ips.0.octets());
    frame.extend_from_slice(&ends.ips.1.octets());
    let ip_sum = !fold(ones_sum(0, &frame[ETHER_HDR..]));
    frame[ETHER_HDR + 10..ETHER_HDR + 12].copy_from_slice(&ip_sum.to_be_bytes());
    let udp_start = frame.len();
    frame.extend_from_slice(&ends.ports.0.to_be_bytes());
    frame.extend_from_slice(&ends.ports.1.to_be_bytes());
    frame.extend_from_slice(&(udp_len as u16).to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(payload);
    let sum = !fold(ones_sum(
        pseudo_sum(ends.ips.0, ends.ips.1, udp_len),
        &frame[udp_start..],
    ));
    // 0 would mean "no checksum".
    let sum = if sum == 0 { 0xffff } else { sum };
    frame[udp_start + 6..udp_start + 8].copy_from_slice(&sum.to_be_bytes());
    frame
}

/// A decoded reply, for tests and debug logs: what a client would read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub xid: u32,
    pub yiaddr: Ipv4Addr,
    pub file: String,
    /// Every option, in order, as (code, value).
    pub options: Vec<(u8, Vec<u8>)>,
}

impl Reply {
    pub fn option(&self, code: u8) -> Option<&[u8]> {
        self.options
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, v)| v.as_slice())
    }

    pub fn message_type(&self) -> Option<u8> {
        self.option(OPT_MESSAGE_TYPE)
            .and_then(|v| v.first().copied())
    }
}

/// Decodes a reply frame [`dhcp_reply`] built, checking its checksums;
/// None if it is not one.
pub fn decode_reply(frame: &[u8]) -> Option<Reply> {
    let ip = frame.get(ETHER_HDR..)?;
    let udp = ip.get(IP_HDR..)?;
    if frame.get(12..14)? != ETHERTYPE_IPV4.to_be_bytes()
        || fold(ones_sum(0, ip.get(..IP_HDR)?)) != 0xffff
        || usize::from(be16(ip, 2)) != ip.len()
        || usize::from(be16(udp, 4)) != udp.len()
    {
        return None;
    }
    let (src, dst) = (ip_at(ip, 12), ip_at(ip, 16));
    if fold(ones_sum(pseudo_sum(src, dst, udp.len()), udp)) != 0xffff {
        return None;
    }
    let bootp = udp.get(UDP_HDR..)?;
    if bootp.get(BOOTP_FIXED..BOOTP_FIXED + 4)? != MAGIC || bootp[0] != BOOTREPLY {
        return None;
    }
    let file = bootp[108..236].split(|b| *b == 0).next()?;
    let mut options = Vec::new();
    let mut rest = &bootp[BOOTP_FIXED + 4..];
    while let Some((&code, tail)) = rest.split_first() {
        if code == OPT_END {
            break;
        }
        if code == OPT_PAD {
            rest = tail;
            continue;
        }
        let len = usize::from(*tail.first()?);
        options.push((code, tail.get(1..1 + len)?.to_vec()));
        rest = &tail[1 + len..];
    }
    Some(Reply {
        dst_mac: frame[0..6].try_into().ok()?,
        src_mac: frame[6..12].try_into().ok()?,
        src,
        dst,
        xid: u32::from_be_bytes(bootp[4..8].try_into().ok()?),
        yiaddr: ip_at(bootp, 16),
        file: String::from_utf8_lossy(file).into_owned(),
        options,
    })
}

/// Builds a request frame as a client would send it (tests, and the
/// integration test's sanity checks): `options` after the cookie, or a
/// plain BOOTP request when None.
pub fn build_request(mac: [u8; 6], xid: u32, options: Option<&[u8]>) -> Vec<u8> {
    let mut bootp = vec![0u8; BOOTP_FIXED];
    bootp[0] = BOOTREQUEST;
    bootp[1] = HTYPE_ETHER;
    bootp[2] = 6;
    bootp[4..8].copy_from_slice(&xid.to_be_bytes());
    bootp[28..34].copy_from_slice(&mac);
    if let Some(options) = options {
        bootp.extend_from_slice(&MAGIC);
        bootp.extend_from_slice(options);
    }
    if bootp.len() < BOOTP_MIN {
        bootp.resize(BOOTP_MIN, 0);
    }
    let ends = Ends {
        macs: (mac, BROADCAST),
        ips: (Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST),
        ports: (CLIENT_PORT, SERVER_PORT),
    };
    encode_udp(&ends, 0, &bootp)
}

/// Recomputes a request frame's IP and UDP checksums after a test changed
/// it (so the change reaches the checks after them); leaves frames too
/// short to hold the headers alone.
pub fn fix_checksums(frame: &mut [u8]) {
    if frame.len() < ETHER_HDR + IP_HDR + UDP_HDR {
        return;
    }
    let ihl = usize::from(frame[ETHER_HDR] & 0x0f) * 4;
    if ihl < IP_HDR || frame.len() < ETHER_HDR + ihl + UDP_HDR {
        return;
    }
    let ip = ETHER_HDR;
    frame[ip + 10..ip + 12].copy_from_slice(&[0, 0]);
    let sum = !fold(ones_sum(0, &frame[ip..ip + ihl]));
    frame[ip + 10..ip + 12].copy_from_slice(&sum.to_be_bytes());
    let total = usize::from(be16(frame, ip + 2)).min(frame.len() - ip);
    if total < ihl + UDP_HDR {
        return;
    }
    let (src, dst) = (ip_at(frame, ip + 12), ip_at(frame, ip + 16));
    let udp = ip + ihl;
    frame[udp + 6..udp + 8].copy_from_slice(&[0, 0]);
    let len = total - ihl;
    let sum = !fold(ones_sum(pseudo_sum(src, dst, len), &frame[udp..ip + total]));
    frame[udp + 6..udp + 8].copy_from_slice(&sum.to_be_bytes());
}

#[cfg(test)]
mod tests;
