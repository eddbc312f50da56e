//! The node's own addresses, read over rtnetlink and followed as they change, so an
//! address added later serves NodePorts within a second (no Node object needed).
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_sys::protocols::NETLINK_ROUTE;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::{
    fault::{self, Point},
    netlink::{attrs, Netlink, NetlinkError, NLM_F_DUMP, NLM_F_REQUEST},
};

const RTM_NEWADDR: u16 = 20;
const RTM_GETADDR: u16 = 22;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;

/// Every address on the node's interfaces, loopback and IPv6 link-local left out,
/// sorted.
///
/// # Errors
/// When rtnetlink cannot be used.
pub fn local() -> Result<Vec<IpAddr>, NetlinkError> {
    let mut netlink = Netlink::open(NETLINK_ROUTE, 0)?;
    dump(&mut netlink)
}

fn dump(netlink: &mut Netlink) -> Result<Vec<IpAddr>, NetlinkError> {
    let mut found: Vec<IpAddr> = dump_with_interfaces(netlink)?
        .into_iter()
        .map(|(_, ip)| ip)
        .collect();
    found.sort_unstable();
    found.dedup();
    Ok(found)
}

/// Every address as [`local`] reports them, with the index of its interface.
///
/// # Errors
/// When rtnetlink cannot be used.
pub fn by_interface() -> Result<Vec<(u32, IpAddr)>, NetlinkError> {
    let mut netlink = Netlink::open(NETLINK_ROUTE, 0)?;
    dump_with_interfaces(&mut netlink)
}

fn dump_with_interfaces(netlink: &mut Netlink) -> Result<Vec<(u32, IpAddr)>, NetlinkError> {
    if fault::fails(Point::Rtnetlink) {
        return Err(NetlinkError::Socket(fault::injected(Point::Rtnetlink)));
    }
    // ifaddrmsg: any family, every interface.
    netlink.send(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, &[0; 8], &[])?;
    let mut found = Vec::new();
    netlink.receive(|kind, body| {
        if kind == RTM_NEWADDR {
            let index = body
                .get(4..8)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(u32::from_ne_bytes);
            found.extend(index.zip(parse(body)));
        }
    })?;
    found.retain(|(_, ip)| !ip.is_loopback() && !is_link_local(ip));
    Ok(found)
}

/// One `RTM_NEWADDR` body: `ifaddrmsg` then attributes; `IFA_LOCAL` is the interface's
/// own address on point-to-point links, else `IFA_ADDRESS`.
#[must_use]
pub fn parse(body: &[u8]) -> Option<IpAddr> {
    let attributes = attrs(body.get(8..)?);
    let raw = attributes
        .get(&IFA_LOCAL)
        .or_else(|| attributes.get(&IFA_ADDRESS))?;
    match raw.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(*raw).ok()?))),
        16 => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(*raw).ok()?))),
        _ => None,
    }
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => ip.is_link_local(),
        IpAddr::V6(ip) => ip.segments()[0] & 0xffc0 == 0xfe80,
    }
}

/// Reads the addresses now and follows them on a thread of its own: the returned
/// receiver changes whenever the set of addresses does.
///
/// # Errors
/// When rtnetlink cannot be used.
pub fn follow() -> Result<watch::Receiver<Vec<IpAddr>>, NetlinkError> {
    // Subscribe before the first dump, so no change falls between the two.
    let mut events = Netlink::open(NETLINK_ROUTE, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR)?;
    let mut requests = Netlink::open(NETLINK_ROUTE, 0)?;
    let (tx, rx) = watch::channel(dump(&mut requests)?);
    std::thread::Builder::new()
        .name("node-addresses".into())
        .spawn(move || loop {
            if let Err(error) = events.wait_event() {
                warn!(%error, "rtnetlink address events failed; re-reading");
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            match dump(&mut requests) {
                Ok(addresses) => {
                    tx.send_if_modified(|current| {
                        let changed = *current != addresses;
                        if changed {
                            debug!(?addresses, "node addresses changed");
                            *current = addresses;
                        }
                        changed
                    });
                }
                Err(error) => warn!(%error, "cannot read the node's addresses"),
            }
            if tx.is_closed() {
                return;
            }
        })
        .map_err(NetlinkError::Socket)?;
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::{local, parse};
    use crate::netlink::attr;

    #[test]
    fn point_to_point_links_report_the_local_address() {
        let mut body = vec![2, 32, 0, 0, 1, 0, 0, 0];
        body.extend(attr(1, &[10, 0, 0, 2]));
        body.extend(attr(2, &[10, 0, 0, 1]));
        assert_eq!(parse(&body), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(parse(&body[..8]), None);
        assert_eq!(parse(&body[..4]), None);
    }

    #[test]
    fn the_dump_leaves_loopback_out() {
        let found = local().expect("rtnetlink dump");
        assert!(found.iter().all(|ip| !ip.is_loopback()), "{found:?}");
    }
}
