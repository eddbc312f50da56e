//! The node's own addresses over rtnetlink: followed as they change (async, on the
//! runtime), so an address added later serves NodePorts within a second with no Node
//! object needed, and read once by threads that program the node's interfaces.
use std::{io, net::IpAddr, time::Duration};

use futures::{StreamExt, TryStreamExt};
use netlink_packet_route::{
    address::{AddressAttribute, AddressMessage},
    link::{LinkAttribute, LinkMessage},
    RouteNetlinkMessage,
};
use netlink_sys::protocols::NETLINK_ROUTE;
use rtnetlink::{Handle, MulticastGroup};
use thiserror::Error;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::{
    fault::{self, Point},
    netlink::{is_link_local, Netlink, NetlinkError},
};

#[derive(Debug, Error)]
pub enum AddressError {
    #[error("rtnetlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("rtnetlink: {0}")]
    Rtnetlink(#[source] rtnetlink::Error),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

/// The address an `RTM_NEWADDR` message gives the node: `IFA_LOCAL` (the interface's own
/// on point-to-point links), else `IFA_ADDRESS`.
#[must_use]
pub fn address_of(message: &AddressMessage) -> Option<IpAddr> {
    let find = |local: bool| {
        message.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(ip) if local => Some(*ip),
            AddressAttribute::Address(ip) if !local => Some(*ip),
            _ => None,
        })
    };
    find(true).or_else(|| find(false))
}

/// Whether an address serves traffic from outside: loopback and link-local do not.
fn serves(ip: &IpAddr) -> bool {
    !ip.is_loopback() && !is_link_local(ip)
}

/// Every address as [`follow`] reports them, with the name of its interface, read now
/// in the calling thread's network namespace (blocking).
///
/// # Errors
/// When rtnetlink cannot be used.
pub fn by_interface() -> Result<Vec<(String, IpAddr)>, AddressError> {
    if fault::fails(Point::Rtnetlink) {
        return Err(AddressError::Socket(fault::injected(Point::Rtnetlink)));
    }
    let mut netlink = Netlink::open(NETLINK_ROUTE)?;
    let links = netlink.dump_map(
        &RouteNetlinkMessage::GetLink(LinkMessage::default()),
        |reply| match reply {
            RouteNetlinkMessage::NewLink(link) => Some((link.header.index, name_of(&link)?)),
            _ => None,
        },
    )?;
    let addresses = netlink.dump_map(
        &RouteNetlinkMessage::GetAddress(AddressMessage::default()),
        |reply| match reply {
            RouteNetlinkMessage::NewAddress(address) => {
                Some((address.header.index, address_of(&address)?))
            }
            _ => None,
        },
    )?;
    Ok(addresses
        .into_iter()
        .filter(|(_, ip)| serves(ip))
        .filter_map(|(index, ip)| {
            let name = links.iter().find(|(i, _)| *i == index)?.1.clone();
            Some((name, ip))
        })
        .collect())
}

fn name_of(link: &LinkMessage) -> Option<String> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.clone()),
        _ => None,
    })
}

/// Every address on the node's interfaces, loopback and link-local left out, sorted.
///
/// # Errors
/// When rtnetlink refuses the dump.
pub async fn local(handle: &Handle) -> Result<Vec<IpAddr>, AddressError> {
    if fault::fails(Point::Rtnetlink) {
        return Err(AddressError::Socket(fault::injected(Point::Rtnetlink)));
    }
    let mut found: Vec<IpAddr> = handle
        .address()
        .get()
        .execute()
        .map_err(AddressError::Rtnetlink)
        .try_filter_map(|message| async move { Ok(address_of(&message).filter(serves)) })
        .try_collect()
        .await?;
    found.sort_unstable();
    found.dedup();
    Ok(found)
}

/// The multicast messages an rtnetlink connection receives.
type Events = futures::channel::mpsc::UnboundedReceiver<(
    netlink_packet_core::NetlinkMessage<RouteNetlinkMessage>,
    netlink_sys::SocketAddr,
)>;

/// An rtnetlink connection driven on the runtime, optionally subscribed to the address
/// groups: its handle, and the events when subscribed.
fn connect(subscribe: bool) -> Result<(Handle, Events), AddressError> {
    let groups: &[MulticastGroup] = if subscribe {
        &[MulticastGroup::Ipv4Ifaddr, MulticastGroup::Ipv6Ifaddr]
    } else {
        &[]
    };
    let (connection, handle, events) =
        rtnetlink::new_multicast_connection(groups).map_err(AddressError::Socket)?;
    tokio::spawn(connection);
    Ok((handle, events))
}

/// An rtnetlink handle for requests, its connection driven on the runtime.
///
/// # Errors
/// When rtnetlink cannot be used.
pub fn handle() -> Result<Handle, AddressError> {
    connect(false).map(|(handle, _)| handle)
}

/// Reads the addresses now and follows them on the runtime: the returned receiver
/// changes whenever the set of addresses does. Each burst of events is answered with
/// one fresh dump, so a dump the kernel interrupted is followed by another.
///
/// # Errors
/// When rtnetlink cannot be used.
pub async fn follow() -> Result<watch::Receiver<Vec<IpAddr>>, AddressError> {
    // Subscribed before the first dump, so no change falls between the two.
    let (handle, mut events) = connect(true)?;
    let (tx, rx) = watch::channel(local(&handle).await?);
    tokio::spawn(async move {
        let mut handle = handle;
        loop {
            if events.next().await.is_none() {
                warn!("rtnetlink address events ended; subscribing again");
                tokio::time::sleep(Duration::from_millis(200)).await;
                match connect(true) {
                    Ok((fresh, fresh_events)) => (handle, events) = (fresh, fresh_events),
                    Err(error) => {
                        warn!(%error, "cannot subscribe to address events");
                        continue;
                    }
                }
            }
            // What else arrived meanwhile is covered by the same dump.
            while events.try_recv().is_ok() {}
            match local(&handle).await {
                Ok(addresses) => {
                    tx.send_if_modified(|current| {
                        let changed = *current != addresses;
                        if changed {
                            debug!(?addresses, "node addresses changed");
                            current.clone_from(&addresses);
                        }
                        changed
                    });
                }
                Err(error) => warn!(%error, "cannot read the node's addresses"),
            }
            if tx.is_closed() {
                return;
            }
        }
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use netlink_packet_route::address::{AddressAttribute, AddressMessage};

    use super::{address_of, by_interface};

    #[test]
    fn point_to_point_links_report_the_local_address() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let mut message = AddressMessage::default();
        message.attributes = vec![
            AddressAttribute::Address(ip("10.0.0.2")),
            AddressAttribute::Local(ip("10.0.0.1")),
        ];
        assert_eq!(address_of(&message), Some(ip("10.0.0.1")));
        message.attributes.remove(1);
        assert_eq!(address_of(&message), Some(ip("10.0.0.2")));
        assert_eq!(address_of(&AddressMessage::default()), None);
    }

    #[test]
    fn the_dump_names_interfaces_and_leaves_loopback_out() {
        let found = by_interface().expect("rtnetlink dump");
        assert!(found.iter().all(|(_, ip)| !ip.is_loopback()), "{found:?}");
        assert!(found.iter().all(|(name, _)| !name.is_empty()), "{found:?}");
    }
}
