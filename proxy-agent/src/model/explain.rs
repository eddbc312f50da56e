//! `trace`: the oracle's decision for one connection, with every endpoint of the matched
//! Service port and why it is eligible or excluded, in words.
use std::fmt;

use serde::Serialize;

use super::{
    build::uses_local_set,
    endpoints::{self, Candidate, Categorized, Policies, Topology},
    flow::{self, Outcome, Packet},
    node::NodeInfo,
    snapshot::Snapshot,
    types::{DesiredState, FrontendKind, Route, SourceClass},
};

/// One endpoint of the Service port and what became of it.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct EndpointNote {
    pub endpoint: String,
    pub node: Option<String>,
    pub zone: Option<String>,
    pub eligible: bool,
    /// Why it was left out (`None` when eligible).
    pub excluded_because: Option<String>,
}

/// A flow the live dataplane already holds for this client and frontend (filled in by
/// the running agent; an offline trace has none).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct FlowNote {
    /// Where the flow is kept: `conntrack` (netfilter) or `socket` (the socket LB's
    /// per-socket memory).
    pub table: String,
    /// The client side, when the table knows it.
    pub client: Option<String>,
    /// The backend the flow is pinned to.
    pub backend: String,
    /// Whether that backend is still one of the frontend's endpoints.
    pub live_backend: bool,
    /// Conntrack state and seconds left, or the socket cookie.
    pub detail: String,
}

/// Everything `trace` prints.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Trace {
    pub packet: String,
    pub node: String,
    pub client: SourceClass,
    pub frontend: Option<String>,
    pub kind: Option<FrontendKind>,
    pub service: Option<String>,
    pub policies: Vec<String>,
    pub endpoints: Vec<EndpointNote>,
    pub masquerade: bool,
    pub verdict: String,
    pub reason: String,
    pub selection: Option<String>,
    /// Which topology hints chose the cluster-wide endpoints, or why hints were passed
    /// over (`None`: the endpoints carry none).
    #[serde(default)]
    pub topology: Option<String>,
    #[serde(default)]
    pub flows: Vec<FlowNote>,
}

/// Explains `packet` on `node` against the state built from `snapshot`.
#[must_use]
pub fn trace(snapshot: &Snapshot, state: &DesiredState, node: &NodeInfo, packet: Packet) -> Trace {
    let decision = flow::decide(state, node, packet);
    let mut out = Trace {
        packet: format!(
            "{} -> {}",
            packet.source,
            super::FrontendKey {
                ip: packet.destination,
                port: packet.port,
                protocol: packet.protocol,
            }
        ),
        node: node.name.clone(),
        client: decision.class,
        frontend: None,
        kind: None,
        service: None,
        policies: Vec::new(),
        endpoints: Vec::new(),
        masquerade: false,
        verdict: decision.outcome.to_string(),
        reason: decision.reason.clone(),
        selection: None,
        topology: None,
        flows: Vec::new(),
    };
    let Some((key, frontend)) = decision.frontend else {
        return out;
    };
    out.frontend = Some(key.to_string());
    out.kind = Some(frontend.kind);
    out.service = Some(frontend.service.to_string());
    let route = frontend.route(decision.class);
    out.masquerade = match &decision.outcome {
        Outcome::Forward {
            masquerade,
            hairpin,
            ..
        } => *masquerade || *hairpin,
        _ => false,
    };
    out.selection = match &decision.outcome {
        Outcome::Forward { backends, affinity, .. } => Some(match affinity {
            Some(t) => format!("one of {} endpoint(s) at random for a new client, then the same one for {t} s (sessionAffinity ClientIP)", backends.len()),
            None => format!("one of {} endpoint(s) at random per connection", backends.len()),
        }),
        _ => None,
    };
    let ns_name = (
        frontend.service.namespace.clone(),
        frontend.service.name.clone(),
    );
    let Some(service) = snapshot.services().get(&ns_name) else {
        return out;
    };
    let policies = service.policies;
    out.policies = describe(policies, service.affinity_timeout.is_some());
    let slices = snapshot.slices_of(&ns_name.0, &ns_name.1);
    let candidates = endpoints::candidates(&slices, &frontend.service.port, key.protocol, key.ip);
    let sets = endpoints::categorize(&candidates, policies, node);
    out.topology = describe_topology(&sets, node);
    let local_route = uses_local_set(frontend.kind, decision.class, policies, &sets, node);
    out.endpoints = candidates
        .iter()
        .map(|c| note(c, route, &sets, local_route, frontend.kind, node))
        .collect();
    out
}

/// The hint that decided, in words: kube-proxy's topology mode and what it matched.
fn describe_topology(sets: &Categorized, node: &NodeInfo) -> Option<String> {
    let used = match sets.topology {
        Topology::SameNode => Some(format!(
            "PreferSameNode: endpoints hinted for node {}",
            node.name
        )),
        Topology::SameZone => Some(format!(
            "PreferSameZone: endpoints hinted for zone {}",
            node.zone.as_deref().unwrap_or_default()
        )),
        Topology::All => None,
    };
    match (used, &sets.passed_over) {
        (Some(used), Some(why)) => Some(format!("{used} ({why})")),
        (Some(used), None) => Some(used),
        (None, Some(why)) => Some(format!("hints passed over: {why}")),
        (None, None) => None,
    }
}

fn describe(policies: Policies, affinity: bool) -> Vec<String> {
    let mut out = Vec::new();
    if policies.internal_local {
        out.push("internalTrafficPolicy=Local".to_owned());
    }
    if policies.externally_accessible {
        let etp = if policies.external_local {
            "Local"
        } else {
            "Cluster"
        };
        out.push(format!("externalTrafficPolicy={etp}"));
    }
    if policies.topology_opt_in {
        out.push("topology hints requested".to_owned());
    }
    if affinity {
        out.push("sessionAffinity=ClientIP".to_owned());
    }
    out
}

fn note(
    c: &Candidate,
    route: &Route,
    sets: &Categorized,
    local_route: bool,
    kind: FrontendKind,
    node: &NodeInfo,
) -> EndpointNote {
    let eligible = route.backends.contains(&c.backend);
    let excluded_because = (!eligible).then(|| exclusion(c, sets, local_route, kind, node));
    EndpointNote {
        endpoint: c.backend.to_string(),
        node: c.node.clone(),
        zone: c.zone.clone(),
        eligible,
        excluded_because,
    }
}

/// The first rule, in kube-proxy's order, that leaves `c` out.
fn exclusion(
    c: &Candidate,
    sets: &Categorized,
    local_route: bool,
    kind: FrontendKind,
    node: &NodeInfo,
) -> String {
    if c.terminating && !c.serving {
        return "terminating and no longer serving".to_owned();
    }
    if !(c.ready || c.serving && c.terminating) {
        return "not ready".to_owned();
    }
    if !c.ready {
        return "terminating; ready endpoints exist, so terminating ones are not used".to_owned();
    }
    if local_route && c.node.as_deref() != Some(node.name.as_str()) {
        let policy = if kind == FrontendKind::ClusterIp {
            "internalTrafficPolicy"
        } else {
            "externalTrafficPolicy"
        };
        let on = c.node.as_deref().unwrap_or("no node");
        return format!("on {on}, not {}, and {policy} is Local", node.name);
    }
    match sets.topology {
        Topology::SameNode => {
            return format!(
                "hinted for node(s) {}, not {} (PreferSameNode)",
                c.node_hints.join(","),
                node.name
            );
        }
        Topology::SameZone => {
            let zone = node.zone.as_deref().unwrap_or("?");
            return format!(
                "hinted for zone(s) {}, this node is in {zone} (PreferSameZone)",
                c.zone_hints.join(",")
            );
        }
        Topology::All => {}
    }
    "not in the endpoint set this client's route uses".to_owned()
}

impl fmt::Display for Trace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "packet     {} on {} (client: {:?})",
            self.packet, self.node, self.client
        )?;
        let Some(frontend) = &self.frontend else {
            writeln!(f, "frontend   none")?;
            writeln!(f, "verdict    {}: {}", self.verdict, self.reason)?;
            return Ok(());
        };
        let kind = self.kind.map(|k| k.to_string()).unwrap_or_default();
        writeln!(
            f,
            "frontend   {frontend} {kind} {}",
            self.service.as_deref().unwrap_or_default()
        )?;
        if !self.policies.is_empty() {
            writeln!(f, "policies   {}", self.policies.join(", "))?;
        }
        if let Some(topology) = &self.topology {
            writeln!(f, "topology   {topology}")?;
        }
        writeln!(f, "endpoints")?;
        if self.endpoints.is_empty() {
            writeln!(f, "  (none in any EndpointSlice)")?;
        }
        for e in &self.endpoints {
            let place = format!(
                "{} {}",
                e.node.as_deref().unwrap_or("-"),
                e.zone.as_deref().unwrap_or("-")
            );
            match &e.excluded_because {
                None => writeln!(f, "  {:<28} {place:<16} eligible", e.endpoint)?,
                Some(why) => writeln!(f, "  {:<28} {place:<16} excluded: {why}", e.endpoint)?,
            }
        }
        writeln!(
            f,
            "masquerade {}",
            if self.masquerade {
                "yes (source NAT to the node)"
            } else {
                "no (client address kept)"
            }
        )?;
        writeln!(f, "verdict    {}: {}", self.verdict, self.reason)?;
        if let Some(selection) = &self.selection {
            writeln!(f, "choice     {selection}")?;
        }
        if !self.flows.is_empty() {
            writeln!(f, "flows")?;
        }
        for flow in &self.flows {
            let gone = if flow.live_backend {
                ""
            } else {
                " (no longer an endpoint)"
            };
            writeln!(
                f,
                "  {:<9} {:<22} -> {}{gone}  {}",
                flow.table,
                flow.client.as_deref().unwrap_or("-"),
                flow.backend,
                flow.detail
            )?;
        }
        Ok(())
    }
}
