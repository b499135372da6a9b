//! Link settings for `group` and `rdomain`, as netlink messages for the
//! queue in netlink.rs: a link's iproute2 group (IFLA_GROUP, see
//! common/src/linkgroup.rs for the names) and the VRF device that is
//! routing domain N.
//!
//! A Linux link has one group. A switch's group goes on its bridge; an
//! interface's on its tap, so for a tap on a switch the interface's own
//! group wins (the bridge keeps the switch's): `ip link show group NAME`
//! lists the bridge for the switch's and the taps for the interface's.
//!
//! `rdomain N` (OpenBSD's routing domains) is a VRF device here: its
//! routing table is [`VRF_TABLE_BASE`] + N, and the bridge (a switch's
//! rdomain) or the tap (an interface's, which overrides its switch's)
//! gets it as master. rdomain 0 is the default domain: the main table,
//! no VRF. Linux reserves tables 0 (unspec), 253 (default), 254 (main)
//! and 255 (local); the base keeps every rdomain's table (1001 to 1255)
//! clear of them and of the small numbers people use by hand. Kernels
//! without VRF (CONFIG_NET_VRF off, or the `vrf` module missing) answer
//! the creation with EOPNOTSUPP: [`links_error`] says so.

// Not called by Net yet (issue 19's building blocks): goes when it is.
#![allow(dead_code)]

use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVrf, LinkAttribute, LinkInfo, LinkMessage,
};
use netlink_packet_route::RouteNetlinkMessage;
use nix::errno::Errno;

/// rdomain N routes with table VRF_TABLE_BASE + N.
pub const VRF_TABLE_BASE: u32 = 1000;
/// Routing tables Linux keeps for itself.
pub const RESERVED_TABLES: [u32; 4] = [0, 253, 254, 255];
/// The highest rdomain (OpenBSD's RT_TABLEID_MAX, as vm.conf checks it).
pub const RDOMAIN_MAX: u32 = 255;

/// A link change netlink.rs's requests do not make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkRequest {
    /// Puts link `index` in iproute2 group `group` (0 is `default`).
    SetGroup { index: u32, group: u32 },
    /// Creates VRF device `name` for routing table `table`; EEXIST if
    /// the name is taken, EOPNOTSUPP without VRF in the kernel. A link
    /// joins it as it joins a bridge: its master set to the VRF's index.
    NewVrf { name: String, table: u32 },
}

/// rdomain `rdomain`'s routing table: None for 0 (the default domain,
/// no VRF).
pub fn rdomain_table(rdomain: u32) -> Result<Option<u32>, String> {
    if rdomain == 0 {
        return Ok(None);
    }
    if rdomain > RDOMAIN_MAX {
        return Err(format!("invalid rdomain {rdomain}: 0 to {RDOMAIN_MAX}"));
    }
    let table = VRF_TABLE_BASE + rdomain;
    if RESERVED_TABLES.contains(&table) {
        return Err(format!(
            "rdomain {rdomain}: routing table {table} is Linux's own"
        ));
    }
    Ok(Some(table))
}

/// The VRF device of rdomain `rdomain` (one per host, shared by the
/// switches and interfaces in that domain).
pub fn rdomain_vrf_name(rdomain: u32) -> String {
    format!("rdomain{rdomain}")
}

/// The route message of `req` and the flags it is sent with (for
/// netlink.rs's `nl_build`, which adds the header).
pub fn links_message(req: &LinkRequest) -> (RouteNetlinkMessage, u16) {
    let mut link = LinkMessage::default();
    match req {
        LinkRequest::SetGroup { index, group } => {
            link.header.index = *index;
            link.attributes.push(LinkAttribute::Group(*group));
            (
                RouteNetlinkMessage::SetLink(link),
                NLM_F_REQUEST | NLM_F_ACK,
            )
        }
        LinkRequest::NewVrf { name, table } => {
            link.attributes.push(LinkAttribute::IfName(name.clone()));
            link.attributes.push(LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Vrf),
                LinkInfo::Data(InfoData::Vrf(vec![InfoVrf::TableId(*table)])),
            ]));
            let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
            (RouteNetlinkMessage::NewLink(link), flags)
        }
    }
}

/// The one-line error when the kernel refused `req` with `errno`.
pub fn links_error(req: &LinkRequest, errno: Errno) -> String {
    match (req, errno) {
        (LinkRequest::NewVrf { name, table }, Errno::EOPNOTSUPP) => format!(
            "cannot create VRF {name} (table {table}): this kernel has no VRF support \
             (CONFIG_NET_VRF; try modprobe vrf): rdomain cannot be used here"
        ),
        (LinkRequest::NewVrf { name, .. }, Errno::EEXIST) => {
            format!("cannot create VRF {name}: an interface of that name exists")
        }
        (LinkRequest::NewVrf { name, table }, e) => {
            format!("cannot create VRF {name} (table {table}): {}", e.desc())
        }
        (LinkRequest::SetGroup { index, group }, e) => {
            format!("cannot put link {index} in group {group}: {}", e.desc())
        }
    }
}

#[cfg(test)]
mod tests;
