//! kube-proxy's own rulesets for the bench's baselines, written from the same desired
//! state the agent programs: `iptables` (its iptables mode's `iptables-restore` input)
//! and `nftables` (its nftables mode's `nft -f` transactions). Both read the state as
//! kube-proxy's proxiers see it, one entry per Service port and protocol ([`ports`]).
pub mod iptables;
pub mod nftables;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::IpNet;
use proxy_agent::model::{
    Backend, DesiredState, EmptyVerdict, FrontendKind, Protocol, ServicePortName,
};

/// One Service port as kube-proxy's proxiers hold it (`servicePortInfo` with its
/// categorized endpoints).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServicePort {
    pub cluster_ip: Option<IpAddr>,
    pub port: u16,
    pub external_ips: BTreeSet<IpAddr>,
    pub lb_ips: BTreeSet<IpAddr>,
    pub node_port: Option<u16>,
    /// The endpoints of the Cluster traffic policy, in kube-proxy's order.
    pub cluster_endpoints: Vec<Backend>,
    /// This node's endpoints, for a Local traffic policy.
    pub local_endpoints: Vec<Backend>,
    pub internal_local: bool,
    pub external_local: bool,
    /// Whether any endpoint can serve anywhere (kube-proxy's `hasEndpoints`).
    pub has_endpoints: bool,
    pub affinity_timeout: Option<u32>,
    pub source_ranges: Vec<IpNet>,
    /// `healthCheckNodePort` (a load balancer with a Local external policy).
    pub health_check_node_port: Option<u16>,
}

impl ServicePort {
    /// Reachable from outside the cluster: a NodePort, external or load-balancer IP.
    #[must_use]
    pub fn externally_accessible(&self) -> bool {
        self.node_port.is_some() || !self.external_ips.is_empty() || !self.lb_ips.is_empty()
    }

    /// Every endpoint a chain is written for (cluster and local, once each).
    #[must_use]
    pub fn reachable_endpoints(&self) -> Vec<Backend> {
        let mut all = Vec::new();
        if !self.internal_local || !self.external_local {
            all.extend(self.cluster_endpoints.iter().copied());
        }
        if self.internal_local || self.external_local {
            for backend in &self.local_endpoints {
                if !all.contains(backend) {
                    all.push(*backend);
                }
            }
        }
        sorted(all)
    }
}

/// Which of a Service port's chains kube-proxy writes and where its traffic may go, as
/// both of its proxiers decide them after `CategorizeEndpoints`.
#[expect(
    clippy::struct_excessive_bools,
    reason = "the proxiers' own flags, one each"
)]
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// `usesClusterPolicyChain` / `usesLocalPolicyChain`.
    pub uses_cluster: bool,
    pub uses_local: bool,
    /// `usesExternalTrafficChain`.
    pub uses_external: bool,
    /// `hasInternalEndpoints` / `hasExternalEndpoints`.
    pub has_internal: bool,
    pub has_external: bool,
}

impl ServicePort {
    /// The proxiers' chain and traffic decisions for this port.
    #[must_use]
    pub fn policy(&self) -> Policy {
        let accessible = self.externally_accessible();
        let local_ok = self.has_endpoints && !self.local_endpoints.is_empty();
        let has = |local: bool| if local { local_ok } else { self.has_endpoints };
        Policy {
            uses_cluster: !self.cluster_endpoints.is_empty()
                && (!self.internal_local || (accessible && !self.external_local)),
            uses_local: !self.local_endpoints.is_empty()
                && (self.internal_local || (accessible && self.external_local)),
            uses_external: self.has_endpoints && accessible,
            has_internal: has(self.internal_local),
            has_external: has(self.external_local),
        }
    }
}

/// The Services (namespace, name) whose ports differ between two syncs' views, gone
/// ones included: what kube-proxy's change trackers report as updated.
#[must_use]
pub fn changed_services(
    last: &BTreeMap<PortKey, ServicePort>,
    now: &BTreeMap<PortKey, ServicePort>,
) -> BTreeSet<(String, String)> {
    let differ = now
        .iter()
        .filter(|(key, port)| last.get(*key) != Some(*port))
        .map(|(key, _)| key);
    let gone = last.keys().filter(|key| !now.contains_key(*key));
    differ
        .chain(gone)
        .map(|(name, _)| service_of(name))
        .collect()
}

/// A Service port's Service: (namespace, name).
#[must_use]
pub fn service_of(name: &ServicePortName) -> (String, String) {
    (name.namespace.clone(), name.name.clone())
}

/// A Service port's key: its name and protocol.
pub type PortKey = (ServicePortName, Protocol);

/// kube-proxy orders endpoints by their `ip:port` text.
fn sorted(mut backends: Vec<Backend>) -> Vec<Backend> {
    backends.sort_by_key(ToString::to_string);
    backends.dedup();
    backends
}

/// The IPv4 Service ports of a desired state (kube-proxy runs a proxier per family).
#[must_use]
pub fn ports(desired: &DesiredState) -> BTreeMap<PortKey, ServicePort> {
    let mut ports: BTreeMap<PortKey, ServicePort> = BTreeMap::new();
    for (key, frontend) in &desired.frontends {
        if !key.ip.is_ipv4() {
            continue;
        }
        let entry = ports
            .entry((frontend.service.clone(), key.protocol))
            .or_default();
        let (route, local) = if frontend.kind == FrontendKind::ClusterIp {
            entry.cluster_ip = Some(key.ip);
            entry.port = key.port;
            entry.internal_local = frontend.pod.local;
            entry.affinity_timeout = frontend.affinity_timeout;
            (&frontend.pod, frontend.pod.local)
        } else {
            match frontend.kind {
                FrontendKind::NodePort => entry.node_port = Some(key.port),
                FrontendKind::ExternalIp => {
                    entry.external_ips.insert(key.ip);
                }
                _ => {
                    entry.lb_ips.insert(key.ip);
                    entry.source_ranges.clone_from(&frontend.source_ranges);
                }
            }
            entry.external_local = frontend.external.local;
            entry.health_check_node_port = frontend.health_check_node_port;
            (&frontend.external, frontend.external.local)
        };
        let backends = route.backends.iter().copied().collect();
        if local {
            entry.local_endpoints = sorted(backends);
        } else if entry.cluster_endpoints.is_empty() {
            entry.cluster_endpoints = sorted(backends);
        }
        // A Local policy's drop verdict says endpoints exist elsewhere.
        entry.has_endpoints |=
            !route.backends.is_empty() || (local && route.when_empty == EmptyVerdict::Drop);
    }
    ports
}
