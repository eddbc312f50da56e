//! Map entries of either family as the writer handles them: one enum per kind, which
//! the kernel store sends to its family's map (ids are shared across families: one
//! backend id space, one reverse-NAT index space).
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use proxy_common::{
    Backend4, Backend6, RevNat4, RevNat6, Service4Key, Service6Key, SourceRange4, SourceRange6,
};

/// A services-map key: `LB4_SERVICES` or `LB6_SERVICES`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SlotKey {
    V4(Service4Key),
    V6(Service6Key),
}

impl SlotKey {
    /// Slot `slot` of a frontend in scope 0.
    #[must_use]
    pub fn new(ip: IpAddr, port: u16, proto: u8, slot: u16) -> Self {
        match ip {
            IpAddr::V4(ip) => Self::V4(Service4Key {
                address_be: u32::from_ne_bytes(ip.octets()),
                dport_be: port.to_be(),
                backend_slot: slot,
                proto,
                scope: 0,
                pad: [0; 2],
            }),
            IpAddr::V6(ip) => Self::V6(Service6Key {
                address: ip.octets(),
                dport_be: port.to_be(),
                backend_slot: slot,
                proto,
                scope: 0,
                pad: [0; 2],
            }),
        }
    }
    #[must_use]
    pub fn ip(&self) -> IpAddr {
        match self {
            Self::V4(k) => Ipv4Addr::from(k.address_be.to_ne_bytes()).into(),
            Self::V6(k) => Ipv6Addr::from(k.address).into(),
        }
    }
    #[must_use]
    pub fn port(&self) -> u16 {
        u16::from_be(match self {
            Self::V4(k) => k.dport_be,
            Self::V6(k) => k.dport_be,
        })
    }
    #[must_use]
    pub fn proto(&self) -> u8 {
        match self {
            Self::V4(k) => k.proto,
            Self::V6(k) => k.proto,
        }
    }
    #[must_use]
    pub fn slot(&self) -> u16 {
        match self {
            Self::V4(k) => k.backend_slot,
            Self::V6(k) => k.backend_slot,
        }
    }
    #[must_use]
    pub fn scope(&self) -> u8 {
        match self {
            Self::V4(k) => k.scope,
            Self::V6(k) => k.scope,
        }
    }
    #[must_use]
    pub fn with_slot(mut self, slot: u16) -> Self {
        match &mut self {
            Self::V4(k) => k.backend_slot = slot,
            Self::V6(k) => k.backend_slot = slot,
        }
        self
    }
    #[must_use]
    pub fn with_scope(mut self, scope: u8) -> Self {
        match &mut self {
            Self::V4(k) => k.scope = scope,
            Self::V6(k) => k.scope = scope,
        }
        self
    }
}

/// A backends-map value: `LB4_BACKENDS` or `LB6_BACKENDS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendValue {
    V4(Backend4),
    V6(Backend6),
}

impl BackendValue {
    #[must_use]
    pub fn new(ip: IpAddr, port: u16, proto: u8) -> Self {
        match ip {
            IpAddr::V4(ip) => Self::V4(Backend4 {
                address_be: u32::from_ne_bytes(ip.octets()),
                port_be: port.to_be(),
                proto,
                flags: 0,
            }),
            IpAddr::V6(ip) => Self::V6(Backend6 {
                address: ip.octets(),
                port_be: port.to_be(),
                proto,
                flags: 0,
            }),
        }
    }
    /// Address, port and protocol: how the writer tells backends apart.
    #[must_use]
    pub fn parts(&self) -> (IpAddr, u16, u8) {
        match self {
            Self::V4(b) => (
                Ipv4Addr::from(b.address_be.to_ne_bytes()).into(),
                u16::from_be(b.port_be),
                b.proto,
            ),
            Self::V6(b) => (
                Ipv6Addr::from(b.address).into(),
                u16::from_be(b.port_be),
                b.proto,
            ),
        }
    }
}

/// A reverse-NAT value: `LB4_REVNAT` or `LB6_REVNAT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RevNatValue {
    V4(RevNat4),
    V6(RevNat6),
}

impl RevNatValue {
    #[must_use]
    pub fn new(ip: IpAddr, port: u16) -> Self {
        match ip {
            IpAddr::V4(ip) => Self::V4(RevNat4 {
                address_be: u32::from_ne_bytes(ip.octets()),
                port_be: port.to_be(),
                pad: 0,
            }),
            IpAddr::V6(ip) => Self::V6(RevNat6 {
                address: ip.octets(),
                port_be: port.to_be(),
                pad: 0,
            }),
        }
    }
    #[must_use]
    pub fn parts(&self) -> (IpAddr, u16) {
        match self {
            Self::V4(r) => (
                Ipv4Addr::from(r.address_be.to_ne_bytes()).into(),
                u16::from_be(r.port_be),
            ),
            Self::V6(r) => (Ipv6Addr::from(r.address).into(), u16::from_be(r.port_be)),
        }
    }
}

/// A `loadBalancerSourceRanges` key: `LB4_SOURCE_RANGES` or `LB6_SOURCE_RANGES`, with
/// the trie's prefix length (which counts the 32 bits before the address too).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SourceRange {
    V4(u32, SourceRange4),
    V6(u32, SourceRange6),
}

impl SourceRange {
    #[must_use]
    pub fn new(rev_nat: u32, net: &IpNet) -> Self {
        let len = 32 + u32::from(net.prefix_len());
        match net {
            IpNet::V4(net) => Self::V4(
                len,
                SourceRange4 {
                    rev_nat_index_be: rev_nat.to_be(),
                    address_be: u32::from_ne_bytes(net.network().octets()),
                },
            ),
            IpNet::V6(net) => Self::V6(
                len,
                SourceRange6 {
                    rev_nat_index_be: rev_nat.to_be(),
                    address: net.network().octets(),
                },
            ),
        }
    }
    #[must_use]
    pub fn rev_nat_index(&self) -> u32 {
        u32::from_be(match self {
            Self::V4(_, data) => data.rev_nat_index_be,
            Self::V6(_, data) => data.rev_nat_index_be,
        })
    }
    /// The allowed prefix.
    #[must_use]
    pub fn range(&self) -> String {
        match self {
            Self::V4(len, data) => format!(
                "{}/{}",
                Ipv4Addr::from(data.address_be.to_ne_bytes()),
                len.saturating_sub(32)
            ),
            Self::V6(len, data) => {
                format!(
                    "{}/{}",
                    Ipv6Addr::from(data.address),
                    len.saturating_sub(32)
                )
            }
        }
    }
}
