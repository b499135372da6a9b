use super::*;
use crate::parent::net::netlink::tests::ask;
use crate::parent::net::netlink::{Netlink, Reply, Request};
use crate::parent::net::testns::in_new_netns;
use netlink_packet_core::{NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use serde_json::Value;
use std::process::Command;

/// The bytes of `req` with sequence number `seq` (as nl_build makes them).
pub fn links_build(req: &LinkRequest, seq: u32) -> Vec<u8> {
    let (message, flags) = links_message(req);
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
    packet.finalize();
    let mut buf = vec![0; packet.header.length as usize];
    packet.serialize(&mut buf);
    buf
}

/// Sends `req` on a socket of its own and waits for the kernel's ACK or
/// error (tests only).
fn ask_link(req: &LinkRequest) -> Result<Result<(), Errno>, String> {
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(|e| e.to_string())?;
    socket.bind_auto().map_err(|e| e.to_string())?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(|e| e.to_string())?;
    let bytes = links_build(req, 7);
    socket.send(&bytes, 0).map_err(|e| format!("send: {e}"))?;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = socket
            .recv(&mut &mut buf[..], 0)
            .map_err(|e| format!("recv: {e}"))?;
        let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[..n])
            .map_err(|e| format!("answer: {e}"))?;
        if msg.header.sequence_number != 7 {
            continue;
        }
        if let NetlinkPayload::Error(e) = msg.payload {
            return Ok(match e.code {
                None => Ok(()),
                Some(code) => Err(Errno::from_raw(-code.get())),
            });
        }
    }
}

/// `ip -j -d link show dev NAME`: the link as iproute2 sees it.
fn ip_link(name: &str) -> Result<Value, String> {
    let out = Command::new("ip")
        .args(["-j", "-d", "link", "show", "dev", name])
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let links: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    Ok(links[0].clone())
}

#[test]
fn requests_are_well_formed() {
    let bytes = links_build(
        &LinkRequest::SetGroup {
            index: 4,
            group: 77,
        },
        9,
    );
    let buf = NetlinkBuffer::new_checked(&bytes[..]).expect("header");
    assert_eq!(buf.message_type(), libc::RTM_SETLINK);
    assert_eq!(buf.sequence_number(), 9);
    assert_ne!(buf.flags() & NLM_F_ACK, 0);
    let back = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes).expect("parse");
    let NetlinkPayload::InnerMessage(RouteNetlinkMessage::SetLink(link)) = back.payload else {
        panic!("not a link message");
    };
    assert_eq!(link.header.index, 4);
    assert_eq!(link.attributes, vec![LinkAttribute::Group(77)]);

    let vrf = LinkRequest::NewVrf {
        name: "rdomain5".into(),
        table: 1005,
    };
    let bytes = links_build(&vrf, 10);
    let buf = NetlinkBuffer::new_checked(&bytes[..]).expect("header");
    assert_eq!(buf.message_type(), libc::RTM_NEWLINK);
    assert_eq!(
        buf.flags() & (NLM_F_CREATE | NLM_F_EXCL),
        NLM_F_CREATE | NLM_F_EXCL
    );
    let back = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes).expect("parse");
    let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) = back.payload else {
        panic!("not a new link");
    };
    assert!(link
        .attributes
        .contains(&LinkAttribute::IfName("rdomain5".into())));
    assert!(link.attributes.contains(&LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Vrf),
        LinkInfo::Data(InfoData::Vrf(vec![InfoVrf::TableId(1005)])),
    ])));
}

#[test]
fn rdomains_tables_and_names() {
    assert_eq!(rdomain_table(0), Ok(None));
    assert_eq!(rdomain_table(1), Ok(Some(1001)));
    assert_eq!(rdomain_table(255), Ok(Some(1255)));
    assert!(rdomain_table(256).is_err());
    for n in 1..=RDOMAIN_MAX {
        let table = rdomain_table(n).expect("a table").expect("not the default");
        assert!(!RESERVED_TABLES.contains(&table));
    }
    assert_eq!(rdomain_vrf_name(5), "rdomain5");
    assert!(rdomain_vrf_name(RDOMAIN_MAX).len() < libc::IFNAMSIZ);
}

#[test]
fn a_link_gets_a_group_in_a_netns() {
    in_new_netns(|| {
        let mut nl = Netlink::open().map_err(|e| e.to_string())?;
        assert_eq!(ask(&mut nl, &Request::NewBridge("br0".into()))?, Reply::Ack);
        let Reply::Link(bridge) = ask(&mut nl, &Request::LinkByName("br0".into()))? else {
            return Err("no bridge".into());
        };
        assert_eq!(ip_link("br0")?["group"], "default");
        let set = LinkRequest::SetGroup {
            index: bridge.index,
            group: 77,
        };
        assert_eq!(ask_link(&set)?, Ok(()));
        assert_eq!(ip_link("br0")?["group"], "77");
        let none = LinkRequest::SetGroup {
            index: 9999,
            group: 77,
        };
        assert_eq!(ask_link(&none)?, Err(Errno::ENODEV));
        assert_eq!(
            links_error(&none, Errno::ENODEV),
            "cannot put link 9999 in group 77: No such device"
        );
        Ok(())
    });
}

/// Where the kernel has VRF (the nested host), a bridge joins rdomain
/// 5's VRF with table 1005; where it has not (this machine's), the
/// creation fails and says why, as `ip link add` does.
#[test]
fn a_vrf_or_the_reason_there_is_none() {
    in_new_netns(|| {
        let mut nl = Netlink::open().map_err(|e| e.to_string())?;
        let table = rdomain_table(5)?.ok_or("no table")?;
        let vrf = LinkRequest::NewVrf {
            name: rdomain_vrf_name(5),
            table,
        };
        // iproute2 is the judge of whether this kernel has VRF.
        let probe = Command::new("ip")
            .args(["link", "add", "vrfprobe", "type", "vrf", "table", "1099"])
            .output()
            .map_err(|e| format!("ip: {e}"))?;
        let has_vrf = probe.status.success();
        if has_vrf {
            let _ = Command::new("ip")
                .args(["link", "del", "vrfprobe"])
                .status();
        }
        match ask_link(&vrf)? {
            Ok(()) => {
                assert!(has_vrf, "vmd made a VRF where ip could not");
                let made = ip_link("rdomain5")?;
                assert_eq!(made["linkinfo"]["info_kind"], "vrf");
                assert_eq!(made["linkinfo"]["info_data"]["table"], 1005);
                assert_eq!(ask_link(&vrf)?, Err(Errno::EEXIST));
                let Reply::Link(v) = ask(&mut nl, &Request::LinkByName("rdomain5".into()))? else {
                    return Err("no vrf".into());
                };
                assert_eq!(ask(&mut nl, &Request::NewBridge("br0".into()))?, Reply::Ack);
                let Reply::Link(bridge) = ask(&mut nl, &Request::LinkByName("br0".into()))? else {
                    return Err("no bridge".into());
                };
                let join = Request::SetLink {
                    index: bridge.index,
                    alias: None,
                    up: Some(true),
                    master: Some(v.index),
                };
                assert_eq!(ask(&mut nl, &join)?, Reply::Ack);
                assert_eq!(ip_link("br0")?["master"], "rdomain5");
            }
            Err(e) => {
                assert!(!has_vrf, "ip made a VRF where vmd could not: {e}");
                assert_eq!(e, Errno::EOPNOTSUPP, "not the no-VRF answer");
                let why = links_error(&vrf, e);
                assert_eq!(
                    why,
                    "cannot create VRF rdomain5 (table 1005): this kernel has no VRF support \
                     (CONFIG_NET_VRF; try modprobe vrf): rdomain cannot be used here"
                );
            }
        }
        Ok(())
    });
}
