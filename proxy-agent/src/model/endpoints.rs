//! Which endpoints a Service port may use on this node, after kube-proxy's
//! `CategorizeEndpoints`: ready endpoints, else serving-and-terminating ones (KEP-1669),
//! narrowed by topology hints (node hints first, then zone hints, each only when every
//! ready endpoint carries one), and the node-local subsets the Local traffic policies use.
use std::{collections::BTreeSet, net::IpAddr, sync::Arc};

use super::slice::Slice;

use super::{
    node::{NodeInfo, LABEL_ZONE},
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
    /// `hints.forNodes` (trafficDistribution `PreferSameNode`).
    pub node_hints: Vec<String>,
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
    /// `trafficDistribution` (`PreferClose`, `PreferSameZone`, `PreferSameNode`) or the
    /// topology-mode `Auto` annotation: the EndpointSlice controller then writes hints.
    /// Shown by `trace`; the hints themselves decide, as in kube-proxy.
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
    /// Which hints narrowed the cluster set.
    pub topology: Topology,
    /// Why hints the endpoints carry were not used here (kube-proxy logs it).
    pub passed_over: Option<Arc<str>>,
}

/// kube-proxy's topology mode: which hints choose a Service port's cluster-wide endpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Topology {
    /// Every ready endpoint.
    #[default]
    All,
    /// Those hinted for this node's zone (`PreferSameZone`, formerly `PreferClose`).
    SameZone,
    /// Those hinted for this node (`PreferSameNode`).
    SameNode,
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
                node_hints: endpoint
                    .node_hints()
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

/// kube-proxy's `topologyModeFromHints`: node hints when every ready endpoint has one
/// and some are for this node; else zone hints, alike; else every endpoint. With why
/// hints that exist were passed over.
#[must_use]
pub fn topology_mode(candidates: &[Candidate], node: &NodeInfo) -> (Topology, Option<String>) {
    let ready: Vec<&Candidate> = candidates.iter().filter(|c| c.ready).collect();
    let zone = node.zone.as_deref();
    let mut passed_over = Vec::new();
    for (mode, hints, here, what) in [
        (
            Topology::SameNode,
            (|c: &Candidate| &c.node_hints) as fn(&Candidate) -> &Vec<String>,
            Some(node.name.as_str()),
            "node",
        ),
        (
            Topology::SameZone,
            |c: &Candidate| &c.zone_hints,
            zone,
            "zone",
        ),
    ] {
        let hinted = ready.iter().filter(|c| !hints(c).is_empty()).count();
        if hinted == 0 {
            continue;
        }
        if hinted < ready.len() {
            passed_over.push(format!(
                "{what} hints: {} of {} ready endpoints have none",
                ready.len() - hinted,
                ready.len()
            ));
            continue;
        }
        let Some(here) = here else {
            passed_over.push(format!(
                "{what} hints: node {} has no {LABEL_ZONE} label",
                node.name
            ));
            continue;
        };
        if ready.iter().any(|c| hints(c).iter().any(|h| h == here)) {
            let why = (!passed_over.is_empty()).then(|| passed_over.join("; "));
            return (mode, why);
        }
        passed_over.push(format!("{what} hints: none for {what} {here}"));
    }
    let why = (!passed_over.is_empty()).then(|| passed_over.join("; ") + "; using every endpoint");
    (Topology::All, why)
}

/// Whether `c` is in the cluster-wide set under `mode` (kube-proxy's `availableForTopology`).
fn available(c: &Candidate, mode: Topology, node: &NodeInfo) -> bool {
    match mode {
        Topology::All => true,
        Topology::SameZone => node
            .zone
            .as_deref()
            .is_some_and(|zone| c.zone_hints.iter().any(|z| z == zone)),
        Topology::SameNode => c.node_hints.contains(&node.name),
    }
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
        let (mode, why) = topology_mode(candidates, node);
        out.topology = mode;
        out.passed_over = why.map(Into::into);
        out.cluster = sorted(
            candidates
                .iter()
                .filter(|c| c.ready && available(c, mode, node))
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
