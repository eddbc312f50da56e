//! The `nodelocaldns` dummy interface, as node-cache creates: it carries the listen
//! addresses that are not on the node yet, so the listener can bind them. Kernels
//! without the dummy driver get the addresses on `lo`; either way each address is
//! tagged with the agent's address protocol, so `cleanup` finds exactly its own.
use std::net::{IpAddr, SocketAddr};

use netlink_sys::protocols::NETLINK_ROUTE;
use tracing::{info, warn};

use crate::{
    netlink::{
        attr, attrs, Netlink, NetlinkError, NLA_F_NESTED, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
    },
    source::addresses,
};

pub const INTERFACE: &str = "nodelocaldns";

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_GETADDR: u16 = 22;
const IFA_PROTO: u16 = 11;
/// `IFA_PROTO` value marking the agent's addresses.
const ADDRESS_PROTO: u8 = 99;
const EOPNOTSUPP: i32 = -95;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFF_UP: u32 = 1;
const IFA_F_NODAD: u8 = 0x02;
const ENODEV: i32 = -19;

/// `ifinfomsg` for interface `index` with `flags` changed in `change`.
fn ifinfo(index: i32, flags: u32, change: u32) -> Vec<u8> {
    let mut m = vec![0u8; 4];
    m.extend(index.to_ne_bytes());
    m.extend(flags.to_ne_bytes());
    m.extend(change.to_ne_bytes());
    m
}

fn name_attr(name: &str) -> Vec<u8> {
    attr(IFLA_IFNAME, format!("{name}\0").as_bytes())
}

fn index_of(netlink: &mut Netlink, name: &str) -> Result<i32, NetlinkError> {
    netlink.send(
        RTM_GETLINK,
        NLM_F_REQUEST | NLM_F_ACK,
        &ifinfo(0, 0, 0),
        &name_attr(name),
    )?;
    let mut index = None;
    netlink.receive(|kind, body| {
        if kind == RTM_NEWLINK {
            index = body
                .get(4..8)
                .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
        }
    })?;
    index.ok_or(NetlinkError::Malformed)
}

/// The dummy interface, up; `lo` when the kernel has no dummy driver.
fn interface(netlink: &mut Netlink) -> Result<i32, NetlinkError> {
    let kind = attr(IFLA_INFO_KIND, b"dummy");
    let attrs = [
        name_attr(INTERFACE),
        attr(IFLA_LINKINFO | NLA_F_NESTED, &kind),
    ]
    .concat();
    netlink.send(
        RTM_NEWLINK,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE,
        &ifinfo(0, 0, 0),
        &attrs,
    )?;
    match netlink.receive(|_, _| {}) {
        Err(NetlinkError::Kernel(EOPNOTSUPP)) => {
            warn!("this kernel has no dummy interface driver; DNS listen addresses go on lo");
            return index_of(netlink, "lo");
        }
        other => other?,
    }
    let index = index_of(netlink, INTERFACE)?;
    netlink.send(
        RTM_NEWLINK,
        NLM_F_REQUEST | NLM_F_ACK,
        &ifinfo(index, IFF_UP, IFF_UP),
        &[],
    )?;
    netlink.receive(|_, _| {})?;
    Ok(index)
}

/// `ifaddrmsg` and address attributes for a host address on interface `index`.
fn address_message(ip: IpAddr, index: i32) -> (Vec<u8>, Vec<u8>) {
    let (family, prefix, octets) = match ip {
        IpAddr::V4(v4) => (2u8, 32u8, v4.octets().to_vec()),
        IpAddr::V6(v6) => (10, 128, v6.octets().to_vec()),
    };
    let mut header = vec![family, prefix, IFA_F_NODAD, 0];
    header.extend(index.to_ne_bytes());
    let attrs = [
        attr(IFA_LOCAL, &octets),
        attr(IFA_ADDRESS, &octets),
        attr(IFA_PROTO, &[ADDRESS_PROTO]),
    ]
    .concat();
    (header, attrs)
}

/// Puts every listen address that is not local yet on the dummy interface (created and
/// brought up on first need).
///
/// # Errors
/// When rtnetlink refuses.
pub fn ensure(listen: &[SocketAddr]) -> Result<(), NetlinkError> {
    let local = addresses::local()?;
    let missing: Vec<IpAddr> = listen
        .iter()
        .map(SocketAddr::ip)
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified() && !local.contains(ip))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut netlink = Netlink::open(NETLINK_ROUTE, 0)?;
    let index = interface(&mut netlink)?;
    for ip in missing {
        let (header, attrs) = address_message(ip, index);
        netlink.send(
            RTM_NEWADDR,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
            &header,
            &attrs,
        )?;
        netlink.receive(|_, _| {})?;
        info!(%ip, "DNS listen address added");
    }
    Ok(())
}

/// Removes the dummy interface and every address the agent tagged; absent is fine.
///
/// # Errors
/// When rtnetlink refuses for another reason.
pub fn remove() -> Result<(), NetlinkError> {
    let mut netlink = Netlink::open(NETLINK_ROUTE, 0)?;
    netlink.send(
        RTM_DELLINK,
        NLM_F_REQUEST | NLM_F_ACK,
        &ifinfo(0, 0, 0),
        &name_attr(INTERFACE),
    )?;
    match netlink.receive(|_, _| {}) {
        Err(NetlinkError::Kernel(ENODEV)) => {}
        other => other?,
    }
    netlink.send(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, &[0; 8], &[])?;
    let mut ours = Vec::new();
    netlink.receive(|kind, body| {
        let Some(header) = body.get(..8) else {
            return;
        };
        let attributes = attrs(&body[8..]);
        if kind == RTM_NEWADDR && attributes.get(&IFA_PROTO) == Some(&&[ADDRESS_PROTO][..]) {
            ours.push((header.to_vec(), body[8..].to_vec()));
        }
    })?;
    for (header, attributes) in ours {
        netlink.send(RTM_DELADDR, NLM_F_REQUEST | NLM_F_ACK, &header, &attributes)?;
        netlink.receive(|_, _| {})?;
    }
    Ok(())
}

/// Removes one address the agent added (from whichever interface holds it).
///
/// # Errors
/// When rtnetlink refuses for another reason than "not there".
pub fn remove_address(ip: IpAddr) -> Result<(), NetlinkError> {
    let mut netlink = Netlink::open(NETLINK_ROUTE, 0)?;
    for name in [INTERFACE, "lo"] {
        let Ok(index) = index_of(&mut netlink, name) else {
            continue;
        };
        let (header, attrs) = address_message(ip, index);
        netlink.send(RTM_DELADDR, NLM_F_REQUEST | NLM_F_ACK, &header, &attrs)?;
        match netlink.receive(|_, _| {}) {
            Err(NetlinkError::Kernel(_)) | Ok(()) => {}
            Err(other) => return Err(other),
        }
    }
    Ok(())
}
