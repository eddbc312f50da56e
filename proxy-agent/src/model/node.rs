//! The node a desired state is computed for, and the agent's view of addresses:
//! which sources are pods (kube-proxy's `--detect-local-mode`), which are the node
//! itself, where NodePorts are served.
use std::{fmt, net::IpAddr};

use ipnet::IpNet;

use super::{snapshot::Snapshot, types::SourceClass};

/// Node label carrying the zone (topology-aware routing).
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";

/// How traffic from this node's pods is told from the rest (kube-proxy's
/// `--detect-local-mode`; `ClusterCidr` uses [`NodeInfo::cluster_cidrs`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum DetectLocal {
    /// Sources in `--cluster-cidr`.
    #[default]
    ClusterCidr,
    /// Sources in the Node object's `spec.podCIDRs`, followed as they change.
    NodeCidr,
    /// Packets arriving on this bridge (`--pod-bridge-interface`).
    BridgeInterface(String),
    /// Packets arriving on interfaces named with this prefix (`--pod-interface-name-prefix`).
    InterfaceNamePrefix(String),
}

impl DetectLocal {
    /// kube-proxy's name of the mode.
    #[must_use]
    pub fn mode(&self) -> &'static str {
        match self {
            Self::ClusterCidr => "ClusterCIDR",
            Self::NodeCidr => "NodeCIDR",
            Self::BridgeInterface(_) => "BridgeInterface",
            Self::InterfaceNamePrefix(_) => "InterfaceNamePrefix",
        }
    }
}

/// What a dataplane matches to call a packet local pod traffic: the detection mode
/// resolved against the node (for `NodeCidr`, the pod CIDRs the Node has now).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalTraffic {
    /// Sources in these prefixes; none: no traffic is told to be a pod's.
    Sources(Vec<IpNet>),
    /// Packets that arrived on the interface of this name.
    Interface(String),
    /// Packets that arrived on an interface whose name starts with this.
    InterfacePrefix(String),
}

impl Default for LocalTraffic {
    fn default() -> Self {
        Self::Sources(Vec::new())
    }
}

impl From<Vec<IpNet>> for LocalTraffic {
    fn from(cidrs: Vec<IpNet>) -> Self {
        Self::Sources(cidrs)
    }
}

impl LocalTraffic {
    /// Whether anything is told to be local (kube-proxy's `IsImplemented`): without it,
    /// ClusterIP traffic is not masqueraded and pods are not short-circuited.
    #[must_use]
    pub fn detects(&self) -> bool {
        match self {
            Self::Sources(cidrs) => !cidrs.is_empty(),
            Self::Interface(name) | Self::InterfacePrefix(name) => !name.is_empty(),
        }
    }

    /// Whether an interface of this name is one local pod traffic arrives on.
    #[must_use]
    pub fn holds_interface(&self, interface: &str) -> bool {
        match self {
            Self::Sources(_) => false,
            Self::Interface(name) => interface == name,
            Self::InterfacePrefix(prefix) => {
                !prefix.is_empty() && interface.starts_with(prefix.as_str())
            }
        }
    }
}

impl fmt::Display for LocalTraffic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sources(cidrs) if cidrs.is_empty() => f.write_str("none"),
            Self::Sources(cidrs) => {
                let list: Vec<String> = cidrs.iter().map(ToString::to_string).collect();
                write!(f, "sources in {}", list.join(","))
            }
            Self::Interface(name) => write!(f, "arriving on {name}"),
            Self::InterfacePrefix(prefix) => write!(f, "arriving on {prefix}*"),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub zone: Option<String>,
    /// The node's own addresses (NodePorts are served on them).
    pub addresses: Vec<IpAddr>,
    /// `--cluster-cidr`: with `ClusterCidr` detection, sources in them are pods.
    pub cluster_cidrs: Vec<IpNet>,
    /// `--detect-local-mode` with its interface argument.
    pub detect_local: DetectLocal,
    /// The Node object's `spec.podCIDRs` (read with `NodeCidr` detection only).
    pub pod_cidrs: Vec<IpNet>,
    /// `--nodeport-addresses`: empty means every node address.
    pub nodeport_cidrs: Vec<IpNet>,
    /// `--nodeport-addresses primary`: the Node object's primary address per family.
    pub nodeport_primary: bool,
    /// The Node object's first InternalIP of each family (ExternalIP when it has none).
    pub primary_addresses: Vec<IpAddr>,
    /// `--masquerade-all`: every client of a ClusterIP is masqueraded.
    pub masquerade_all: bool,
}

impl NodeInfo {
    #[must_use]
    pub fn named(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            ..Self::default()
        }
    }

    /// Fills zone, addresses, primary addresses and (for `NodeCidr` detection) pod CIDRs
    /// from the Node object, when the snapshot has it.
    #[must_use]
    pub fn with_node_object(mut self, snapshot: &Snapshot) -> Self {
        let Some(node) = snapshot.nodes().get(&self.name) else {
            return self;
        };
        self.zone = node
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_ZONE))
            .cloned();
        let listed = node.status.as_ref().and_then(|s| s.addresses.as_ref());
        let mut internal = Vec::new();
        let mut external = Vec::new();
        for address in listed.into_iter().flatten() {
            let Ok(ip) = address.address.parse::<IpAddr>() else {
                continue;
            };
            match address.type_.as_str() {
                "InternalIP" => internal.push(ip),
                "ExternalIP" => external.push(ip),
                _ => continue,
            }
            if !self.addresses.contains(&ip) {
                self.addresses.push(ip);
            }
        }
        // kube-proxy's node IPs: the first InternalIP of each family, else ExternalIP.
        for v4 in [true, false] {
            let first = |list: &[IpAddr]| list.iter().copied().find(|ip| ip.is_ipv4() == v4);
            if let Some(ip) = first(&internal).or_else(|| first(&external)) {
                self.primary_addresses.push(ip);
            }
        }
        if self.detect_local == DetectLocal::NodeCidr {
            let spec = node.spec.as_ref();
            let listed = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
            let single = spec.and_then(|s| s.pod_cidr.clone());
            let texts = if listed.is_empty() {
                single.into_iter().collect()
            } else {
                listed
            };
            self.pod_cidrs = texts.iter().filter_map(|c| c.parse().ok()).collect();
        }
        self
    }

    /// What the dataplanes match as local pod traffic.
    #[must_use]
    pub fn local(&self) -> LocalTraffic {
        match &self.detect_local {
            DetectLocal::ClusterCidr => LocalTraffic::Sources(self.cluster_cidrs.clone()),
            DetectLocal::NodeCidr => LocalTraffic::Sources(self.pod_cidrs.clone()),
            DetectLocal::BridgeInterface(name) => LocalTraffic::Interface(name.clone()),
            DetectLocal::InterfaceNamePrefix(prefix) => {
                LocalTraffic::InterfacePrefix(prefix.clone())
            }
        }
    }

    /// Which route a packet from `source`, arriving on `interface` (`None`: sent by the
    /// node itself or not known), takes.
    #[must_use]
    pub fn classify(&self, source: IpAddr, interface: Option<&str>) -> SourceClass {
        if source.is_loopback() || self.addresses.contains(&source) {
            SourceClass::Node
        } else if self.is_local(source, interface) {
            SourceClass::Pod
        } else {
            SourceClass::External
        }
    }

    /// Whether pod traffic can be told from the rest (kube-proxy masquerades ClusterIP
    /// traffic from outside, and short-circuits pods, only when it can).
    #[must_use]
    pub fn detects_local(&self) -> bool {
        match &self.detect_local {
            DetectLocal::ClusterCidr => !self.cluster_cidrs.is_empty(),
            DetectLocal::NodeCidr => !self.pod_cidrs.is_empty(),
            DetectLocal::BridgeInterface(name) | DetectLocal::InterfaceNamePrefix(name) => {
                !name.is_empty()
            }
        }
    }

    /// [`LocalTraffic::matches`] without resolving the detection first.
    fn is_local(&self, source: IpAddr, interface: Option<&str>) -> bool {
        match (&self.detect_local, interface) {
            (DetectLocal::ClusterCidr, _) => self.cluster_cidrs.iter().any(|c| c.contains(&source)),
            (DetectLocal::NodeCidr, _) => self.pod_cidrs.iter().any(|c| c.contains(&source)),
            (DetectLocal::BridgeInterface(name), Some(i)) => i == name,
            (DetectLocal::InterfaceNamePrefix(prefix), Some(i)) => {
                !prefix.is_empty() && i.starts_with(prefix.as_str())
            }
            (_, None) => false,
        }
    }

    /// Addresses NodePorts are served on: the node's addresses within
    /// `--nodeport-addresses` (or its primary ones), never loopback (as kube-proxy's
    /// nftables mode).
    pub fn nodeport_addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.addresses.iter().copied().filter(|ip| {
            !ip.is_loopback()
                && if self.nodeport_primary {
                    self.primary_addresses.contains(ip)
                } else {
                    self.nodeport_cidrs.is_empty()
                        || self.nodeport_cidrs.iter().any(|c| c.contains(ip))
                }
        })
    }
}
