//! The node a desired state is computed for, and the agent's view of addresses:
//! which sources are pods, which are the node itself, where NodePorts are served.
use std::net::IpAddr;

use ipnet::IpNet;

use super::{snapshot::Snapshot, types::SourceClass};

/// Node label carrying the zone (topology-aware routing).
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub zone: Option<String>,
    /// The node's own addresses (NodePorts are served on them).
    pub addresses: Vec<IpAddr>,
    /// `--cluster-cidr`: sources in them are pods.
    pub cluster_cidrs: Vec<IpNet>,
    /// `--nodeport-addresses`: empty means every node address.
    pub nodeport_cidrs: Vec<IpNet>,
}

impl NodeInfo {
    #[must_use]
    pub fn named(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            ..Self::default()
        }
    }

    /// Fills zone and addresses from the Node object, when the snapshot has it.
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
        for address in listed.into_iter().flatten() {
            let ip = matches!(address.type_.as_str(), "InternalIP" | "ExternalIP")
                .then(|| address.address.parse::<IpAddr>().ok())
                .flatten();
            if let Some(ip) = ip.filter(|ip| !self.addresses.contains(ip)) {
                self.addresses.push(ip);
            }
        }
        self
    }

    /// Which route a packet from `source` takes.
    #[must_use]
    pub fn classify(&self, source: IpAddr) -> SourceClass {
        if source.is_loopback() || self.addresses.contains(&source) {
            SourceClass::Node
        } else if self.cluster_cidrs.iter().any(|c| c.contains(&source)) {
            SourceClass::Pod
        } else {
            SourceClass::External
        }
    }

    /// Whether ClusterIP traffic can be told apart as coming from outside the cluster
    /// (kube-proxy masquerades it only when it knows the cluster CIDR).
    #[must_use]
    pub fn knows_cluster_cidr(&self) -> bool {
        !self.cluster_cidrs.is_empty()
    }

    /// Addresses NodePorts are served on: the node's addresses within
    /// `--nodeport-addresses`, never loopback (as kube-proxy's nftables mode).
    pub fn nodeport_addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.addresses.iter().copied().filter(|ip| {
            !ip.is_loopback()
                && (self.nodeport_cidrs.is_empty()
                    || self.nodeport_cidrs.iter().any(|c| c.contains(ip)))
        })
    }
}
