//! The desired state: what every dataplane programs and DNS reads, keyed and sorted so
//! that renders and golden files are deterministic.
use std::{collections::BTreeMap, fmt, net::IpAddr};

use serde::Serialize;

/// L4 protocols a Service port may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Protocol {
    /// Parses a Kubernetes protocol name; absent means TCP.
    #[must_use]
    pub fn from_k8s(name: Option<&str>) -> Option<Self> {
        match name.unwrap_or("TCP") {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }

    /// IANA protocol number.
    #[must_use]
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => proxy_common::PROTO_TCP,
            Self::Udp => proxy_common::PROTO_UDP,
            Self::Sctp => proxy_common::PROTO_SCTP,
        }
    }

    #[must_use]
    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            proxy_common::PROTO_TCP => Some(Self::Tcp),
            proxy_common::PROTO_UDP => Some(Self::Udp),
            proxy_common::PROTO_SCTP => Some(Self::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        })
    }
}

/// Where a packet is addressed: one per (Service IP, port, protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendKey {
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}/{}", self.port, self.protocol),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}/{}", self.port, self.protocol),
        }
    }
}

/// A pod address and port traffic may be sent to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Backend {
    pub ip: IpAddr,
    pub port: u16,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}", self.port),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}", self.port),
        }
    }
}

/// `namespace/name:port` of the Service port a frontend serves (kube-proxy's
/// `ServicePortName`). Empty when restored from the kernel, which does not keep names.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    pub port: String,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port.is_empty() {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

/// One programmed frontend: its Service and its backends, sorted and unique.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frontend {
    pub service: ServicePortName,
    pub backends: Vec<Backend>,
}

/// Everything a dataplane must program on one node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub frontends: BTreeMap<FrontendKey, Frontend>,
}

impl fmt::Display for DesiredState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (key, frontend) in &self.frontends {
            writeln!(f, "{key} {}", frontend.service)?;
            if frontend.backends.is_empty() {
                writeln!(f, "  (no backends: reject)")?;
            }
            for backend in &frontend.backends {
                writeln!(f, "  -> {backend}")?;
            }
        }
        Ok(())
    }
}
