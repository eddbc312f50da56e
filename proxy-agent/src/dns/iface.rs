//! The `nodelocaldns` dummy interface, as node-cache creates: it carries the listen
//! addresses that are not on the node yet, so the listener can bind them. Kernels
//! without the dummy driver get the addresses on `lo`; either way each address is
//! tagged with the agent's address protocol, so `cleanup` finds exactly its own.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use futures::TryStreamExt;
use netlink_packet_route::address::{
    AddressAttribute, AddressHeaderFlags, AddressMessage, AddressProtocol,
};
use rtnetlink::{AddressMessageBuilder, Handle, LinkDummy, LinkUnspec};
use tracing::{info, warn};

use crate::source::addresses::{self, AddressError};

pub const INTERFACE: &str = "nodelocaldns";

/// `IFA_PROTO` value marking the agent's addresses.
const ADDRESS_PROTO: u8 = 99;

/// The errno an rtnetlink refusal carries.
fn errno(error: &rtnetlink::Error) -> Option<i32> {
    match error {
        rtnetlink::Error::NetlinkError(message) => Some(message.raw_code().abs()),
        _ => None,
    }
}

/// The index of interface `name`, `None` when there is none.
async fn index_of(handle: &Handle, name: &str) -> Result<Option<u32>, AddressError> {
    let found = handle
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await;
    match found {
        Ok(link) => Ok(link.map(|l| l.header.index)),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(AddressError::Rtnetlink(e)),
    }
}

/// The dummy interface, up; `lo` when the kernel has no dummy driver.
async fn interface(handle: &Handle) -> Result<u32, AddressError> {
    let added = handle
        .link()
        .add(LinkDummy::new(INTERFACE).up().build())
        .execute()
        .await;
    let name = match added {
        Err(e) if errno(&e) == Some(libc::EOPNOTSUPP) => {
            warn!("this kernel has no dummy interface driver; DNS listen addresses go on lo");
            "lo"
        }
        Ok(()) => INTERFACE,
        Err(e) if errno(&e) == Some(libc::EEXIST) => INTERFACE,
        Err(e) => return Err(AddressError::Rtnetlink(e)),
    };
    let index = index_of(handle, name).await?.ok_or_else(|| {
        AddressError::Socket(std::io::Error::other(format!("no interface {name}")))
    })?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(AddressError::Rtnetlink)?;
    Ok(index)
}

/// The message for a host address on interface `index`, tagged as the agent's.
fn address_message(handle: &Handle, ip: IpAddr, index: u32) -> rtnetlink::AddressAddRequest {
    let prefix = if ip.is_ipv4() { 32 } else { 128 };
    let mut request = handle.address().add(index, ip, prefix).replace();
    let message = request.message_mut();
    message.header.flags |= AddressHeaderFlags::Nodad;
    message
        .attributes
        .push(AddressAttribute::Protocol(AddressProtocol::from(
            ADDRESS_PROTO,
        )));
    request
}

fn is_ours(message: &AddressMessage) -> bool {
    message
        .attributes
        .iter()
        .any(|a| *a == AddressAttribute::Protocol(AddressProtocol::from(ADDRESS_PROTO)))
}

/// Puts every listen address that is not local yet on the dummy interface (created and
/// brought up on first need).
///
/// # Errors
/// When rtnetlink refuses.
pub async fn ensure(listen: &[SocketAddr]) -> Result<(), AddressError> {
    let handle = addresses::handle()?;
    let local = addresses::local(&handle).await?;
    let missing: Vec<IpAddr> = listen
        .iter()
        .map(SocketAddr::ip)
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified() && !local.contains(ip))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let index = interface(&handle).await?;
    for ip in missing {
        address_message(&handle, ip, index)
            .execute()
            .await
            .map_err(AddressError::Rtnetlink)?;
        info!(%ip, "DNS listen address added");
    }
    Ok(())
}

/// Removes the dummy interface and every address the agent tagged; absent is fine.
///
/// # Errors
/// When rtnetlink refuses for another reason.
pub async fn remove() -> Result<(), AddressError> {
    let handle = addresses::handle()?;
    if let Some(index) = index_of(&handle, INTERFACE).await? {
        match handle.link().del(index).execute().await {
            Err(e) if errno(&e) != Some(libc::ENODEV) => return Err(AddressError::Rtnetlink(e)),
            _ => {}
        }
    }
    let ours: Vec<AddressMessage> = handle
        .address()
        .get()
        .execute()
        .try_filter(|message| std::future::ready(is_ours(message)))
        .try_collect()
        .await
        .map_err(AddressError::Rtnetlink)?;
    for message in ours {
        match handle.address().del(message).execute().await {
            Err(e) if errno(&e) != Some(libc::EADDRNOTAVAIL) => {
                return Err(AddressError::Rtnetlink(e))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Removes one address the agent added (from whichever interface holds it).
///
/// # Errors
/// When rtnetlink refuses for another reason than "not there".
pub async fn remove_address(ip: IpAddr) -> Result<(), AddressError> {
    let handle = addresses::handle()?;
    for name in [INTERFACE, "lo"] {
        let Some(index) = index_of(&handle, name).await? else {
            continue;
        };
        let message = match ip {
            IpAddr::V4(v4) => AddressMessageBuilder::<Ipv4Addr>::new()
                .index(index)
                .address(v4, 32)
                .build(),
            IpAddr::V6(v6) => AddressMessageBuilder::<Ipv6Addr>::new()
                .index(index)
                .address(v6, 128)
                .build(),
        };
        // Absent from this interface is the expected answer for one of the two.
        if let Err(e) = handle.address().del(message).execute().await {
            if errno(&e).is_none() {
                return Err(AddressError::Rtnetlink(e));
            }
        }
    }
    Ok(())
}
