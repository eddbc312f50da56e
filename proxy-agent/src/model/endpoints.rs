//! Which endpoints a Service port may use on this node, after kube-proxy's
//! `CategorizeEndpoints`: ready endpoints, else serving-and-terminating ones (KEP-1669),
//! zone hints when the Service opts in and every endpoint has them, and the node-local
//! subsets the Local traffic policies use.
use std::{collections::BTreeSet, net::IpAddr, sync::Arc};

use super::slice::Slice;

use super::{
    node::NodeInfo,
    types::{Backend, Protocol},
};

/// One endpoint address of a Service port, with what the policies look at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub backend: Backend,
    pub node: Option<String>,
    pub zone: Option<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// `hints.forZones`; empty when the endpoint has no hints.
    pub zone_hints: Vec<String>,
}

impl Candidate {
    fn is_local(&self, node: &NodeInfo) -> bool {
        self.node.as_deref() == Some(node.name.as_str())
    }

    fn is_serving_terminating(&self) -> bool {
        self.serving && self.terminating
    }
}

/// The Service-level settings endpoint choice depends on.
#[allow(
    clippy::struct_excessive_bools,
    reason = "mirrors kube-proxy's ServicePort predicates one to one"
)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policies {
    pub internal_local: bool,
    pub external_local: bool,
    pub externally_accessible: bool,
    /// `trafficDistribution: PreferClose` or the topology-mode `Auto` annotation.
    pub topology_opt_in: bool,
}

impl Policies {
    /// kube-proxy's `UsesClusterEndpoints`.
    #[must_use]
    pub fn uses_cluster_endpoints(&self) -> bool {
        !self.internal_local || (self.externally_accessible && !self.external_local)
    }

    /// kube-proxy's `UsesLocalEndpoints`.
    #[must_use]
    pub fn uses_local_endpoints(&self) -> bool {
        self.internal_local || (self.externally_accessible && self.external_local)
    }
}

/// The endpoint sets a Service port's routes are made of.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Categorized {
    /// Cluster-wide endpoints (empty when no policy uses them).
    pub cluster: Arc<[Backend]>,
    /// This node's endpoints (empty when no Local policy uses them).
    pub local: Arc<[Backend]>,
    /// Whether any usable endpoint exists anywhere: decides REJECT against DROP.
    pub has_any: bool,
    /// Whether zone hints narrowed the cluster set.
    pub topology: bool,
}

/// Endpoints of the slices of `family`, with the slice's port for the Service port's
/// name and protocol; an address listed twice (across slices) counts once.
#[must_use]
pub fn candidates(
    slices: &[&Slice],
    port_name: &str,
    protocol: Protocol,
    family: IpAddr,
) -> Vec<Candidate> {
    let address_type = if family.is_ipv4() { "IPv4" } else { "IPv6" };
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for slice in slices.iter().filter(|s| s.address_type == address_type) {
        let Some(port) = slice_port(slice, port_name, protocol) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            // kube-proxy: missing ready or serving means true; missing terminating false.
            let ready = endpoint.ready().unwrap_or(true);
            let serving = endpoint.serving().unwrap_or(ready);
            let terminating = endpoint.terminating().unwrap_or(false);
            let ip = endpoint.address;
            let backend = Backend { ip, port };
            if ip.is_ipv4() != family.is_ipv4() || !seen.insert(backend) {
                continue;
            }
            out.push(Candidate {
                backend,
                node: endpoint.node_name().map(str::to_owned),
                zone: endpoint.zone().map(str::to_owned),
                ready,
                serving,
                terminating,
                zone_hints: endpoint
                    .zone_hints()
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
            });
        }
    }
    out
}

/// The slice's port for a Service port name (`""` matches an unnamed port).
fn slice_port(slice: &Slice, port_name: &str, protocol: Protocol) -> Option<u16> {
    slice.ports.iter().find_map(|p| {
        let same_name = p.name.as_deref().unwrap_or_default() == port_name;
        let same_proto = Protocol::from_k8s(p.protocol.as_deref()) == Some(protocol);
        if same_name && same_proto {
            p.port
                .and_then(|n| u16::try_from(n).ok())
                .filter(|&n| n != 0)
        } else {
            None
        }
    })
}

/// kube-proxy's `canUseTopology`: every ready endpoint has hints, and some are for
/// this node's zone.
#[must_use]
pub fn can_use_topology(candidates: &[Candidate], policies: Policies, node: &NodeInfo) -> bool {
    let Some(zone) = node.zone.as_deref().filter(|_| policies.topology_opt_in) else {
        return false;
    };
    let ready: Vec<&Candidate> = candidates.iter().filter(|c| c.ready).collect();
    ready.iter().all(|c| !c.zone_hints.is_empty())
        && ready.iter().any(|c| c.zone_hints.iter().any(|z| z == zone))
}

fn sorted(iter: impl Iterator<Item = Backend>) -> Arc<[Backend]> {
    let set: BTreeSet<Backend> = iter.collect();
    set.into_iter().collect()
}

/// kube-proxy's `CategorizeEndpoints`.
#[must_use]
pub fn categorize(candidates: &[Candidate], policies: Policies, node: &NodeInfo) -> Categorized {
    let mut out = Categorized::default();
    if policies.uses_cluster_endpoints() {
        out.topology = can_use_topology(candidates, policies, node);
        let zone = node.zone.as_deref().unwrap_or_default();
        let in_zone = |c: &&Candidate| !out.topology || c.zone_hints.iter().any(|z| z == zone);
        out.cluster = sorted(
            candidates
                .iter()
                .filter(|c| c.ready)
                .filter(in_zone)
                .map(|c| c.backend),
        );
        if out.cluster.is_empty() {
            out.cluster = sorted(
                candidates
                    .iter()
                    .filter(|c| c.is_serving_terminating())
                    .map(|c| c.backend),
            );
        }
        out.has_any = !out.cluster.is_empty();
    }
    if !policies.uses_local_endpoints() {
        return out;
    }
    out.has_any |= candidates
        .iter()
        .any(|c| c.ready || c.is_serving_terminating());
    let local_ready = candidates.iter().any(|c| c.is_local(node) && c.ready);
    out.local = if local_ready {
        sorted(
            candidates
                .iter()
                .filter(|c| c.is_local(node) && c.ready)
                .map(|c| c.backend),
        )
    } else {
        sorted(
            candidates
                .iter()
                .filter(|c| c.is_local(node) && c.is_serving_terminating())
                .map(|c| c.backend),
        )
    };
    out
}
