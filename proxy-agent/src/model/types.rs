//! The desired state: what every dataplane programs and DNS reads, keyed and sorted so
//! that renders and golden files are deterministic.
use std::{fmt, net::IpAddr, sync::Arc};

use ipnet::IpNet;

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

/// How traffic reached a frontend's address (kube-proxy's chain kinds).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, serde::Deserialize,
)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    ExternalIp,
    LoadBalancer,
}

impl fmt::Display for FrontendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ClusterIp => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::ExternalIp => "ExternalIP",
            Self::LoadBalancer => "LoadBalancer",
        })
    }
}

/// What a packet gets when its route has no endpoints: kube-proxy REJECTs for a Service
/// with no endpoints at all, and DROPs where a Local policy leaves none on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum EmptyVerdict {
    Reject,
    Drop,
}

/// The endpoints one class of client may reach through a frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// Sorted and unique.
    pub backends: Arc<[Backend]>,
    /// Source NAT to the node (kube-proxy's KUBE-MARK-MASQ) for this class of client.
    pub masquerade: bool,
    /// The verdict when `backends` is empty.
    pub when_empty: EmptyVerdict,
    /// Whether `backends` is this node's endpoints only (a Local traffic policy; kube-proxy's
    /// KUBE-SVL chain) rather than the cluster-wide set (KUBE-SVC).
    pub local: bool,
}

impl Route {
    #[must_use]
    pub fn new(
        backends: Arc<[Backend]>,
        masquerade: bool,
        when_empty: EmptyVerdict,
        local: bool,
    ) -> Self {
        Self {
            backends,
            masquerade,
            when_empty,
            local,
        }
    }
}

/// Who is sending: decides which route applies.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, serde::Deserialize,
)]
pub enum SourceClass {
    /// An address in `--cluster-cidr`.
    Pod,
    /// One of this node's own addresses (or loopback).
    Node,
    /// Anything else.
    External,
}

/// One programmed frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub service: ServicePortName,
    pub kind: FrontendKind,
    pub pod: Route,
    pub node: Route,
    pub external: Route,
    /// `sessionAffinity: ClientIP` timeout in seconds.
    pub affinity_timeout: Option<u32>,
    /// `loadBalancerSourceRanges` (load-balancer frontends only); empty means any source.
    pub source_ranges: Vec<IpNet>,
    /// `healthCheckNodePort` of an `externalTrafficPolicy: Local` Service.
    pub health_check_node_port: Option<u16>,
    /// Why topology hints the endpoints carry were passed over here (not programmed;
    /// the sync loop logs it once, as kube-proxy does).
    pub hints_passed_over: Option<std::sync::Arc<str>>,
}

impl Frontend {
    /// Its three routes: pods', the node's, external clients'.
    #[must_use]
    pub fn routes(&self) -> [&Route; 3] {
        [&self.pod, &self.node, &self.external]
    }

    /// The route a class of client takes.
    #[must_use]
    pub fn route(&self, class: SourceClass) -> &Route {
        match class {
            SourceClass::Pod => &self.pod,
            SourceClass::Node => &self.node,
            SourceClass::External => &self.external,
        }
    }

    /// Whether a dataplane must reprogram to go from `self` to `other` (names are not
    /// programmed, so they do not count).
    #[must_use]
    pub fn same_programming(&self, other: &Self) -> bool {
        self.kind == other.kind
            && self.pod == other.pod
            && self.node == other.node
            && self.external == other.external
            && self.affinity_timeout == other.affinity_timeout
            && self.source_ranges == other.source_ranges
            && self.health_check_node_port == other.health_check_node_port
    }

    /// The same frontend with every route going to `backends`, no masquerade, REJECT
    /// when empty: what a dataplane that keeps only backends (the socket LB maps)
    /// restores after a restart.
    /// A frontend the kernel holds in an unknown state (a write or delete of it
    /// failed part way): no desired frontend equals it, so the next plan writes it
    /// again if it is still wanted and removes it if not.
    #[must_use]
    pub fn unknown() -> Self {
        Self::backends_only(vec![Backend {
            ip: std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            port: 0,
        }])
    }

    #[must_use]
    pub fn backends_only(backends: Vec<Backend>) -> Self {
        let route = Route::new(backends.into(), false, EmptyVerdict::Reject, false);
        Self {
            service: ServicePortName::default(),
            kind: FrontendKind::ClusterIp,
            pod: route.clone(),
            node: route.clone(),
            external: route,
            affinity_timeout: None,
            source_ranges: Vec::new(),
            health_check_node_port: None,
            hints_passed_over: None,
        }
    }
}

/// Everything a dataplane must program on one node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    /// Persistent: a clone is O(1) and shares structure, so the programmed and the
    /// desired state diff in time proportional to what changed. Frontends are shared
    /// too: the map's nodes hold pointers (a node is allocated whole, 64 entries), and
    /// a plan or a copy takes a reference rather than a clone.
    pub frontends: imbl::OrdMap<FrontendKey, Arc<Frontend>>,
}

fn write_route(f: &mut fmt::Formatter<'_>, who: &str, route: &Route) -> fmt::Result {
    write!(f, "  {who:<8}")?;
    if route.masquerade {
        write!(f, " masquerade")?;
    }
    if route.backends.is_empty() {
        return writeln!(f, " {:?} (no endpoints)", route.when_empty);
    }
    for backend in route.backends.iter() {
        write!(f, " {backend}")?;
    }
    writeln!(f)
}

impl fmt::Display for DesiredState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (key, frontend) in &self.frontends {
            write!(f, "{key} {} {}", frontend.kind, frontend.service)?;
            if let Some(timeout) = frontend.affinity_timeout {
                write!(f, " affinity={timeout}s")?;
            }
            if !frontend.source_ranges.is_empty() {
                let ranges: Vec<String> = frontend
                    .source_ranges
                    .iter()
                    .map(ToString::to_string)
                    .collect();
                write!(f, " sourceRanges={}", ranges.join(","))?;
            }
            if let Some(port) = frontend.health_check_node_port {
                write!(f, " healthCheckNodePort={port}")?;
            }
            writeln!(f)?;
            if frontend.pod == frontend.node && frontend.node == frontend.external {
                write_route(f, "all", &frontend.pod)?;
            } else {
                write_route(f, "pod", &frontend.pod)?;
                write_route(f, "node", &frontend.node)?;
                write_route(f, "external", &frontend.external)?;
            }
        }
        Ok(())
    }
}
