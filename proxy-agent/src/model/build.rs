//! Snapshot + node → desired state, following kube-proxy's choice of frontends, endpoint
//! sets and masquerading per class of client. Pure: no I/O, no clock.
use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use ipnet::IpNet;

use super::{
    endpoints::{self, Categorized, Policies},
    node::NodeInfo,
    service::{PortInfo, ServiceInfo},
    snapshot::{ObjectKey, Snapshot},
    types::{
        DesiredState, EmptyVerdict, Frontend, FrontendKey, FrontendKind, Route, ServicePortName,
        SourceClass,
    },
};

/// Label joining an `EndpointSlice` to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Services carrying this label belong to another proxy (kube-proxy skips them too).
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Opt-in to zone hints before `trafficDistribution` existed.
pub const ANNOTATION_TOPOLOGY_MODE: &str = "service.kubernetes.io/topology-mode";
pub const ANNOTATION_TOPOLOGY_HINTS: &str = "service.kubernetes.io/topology-aware-hints";
/// `sessionAffinityConfig.clientIP.timeoutSeconds` when unset (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

/// Computes what `node` must program for the cluster in `snapshot` (the full rebuild;
/// [`super::tracker::Tracker`] keeps it current change by change).
#[must_use]
pub fn build(snapshot: &Snapshot, node: &NodeInfo) -> DesiredState {
    super::tracker::Tracker::new(snapshot, node.clone())
        .desired()
        .clone()
}

/// The frontends one Service asks `node` to program, each key once (a key listed twice
/// keeps its last version, as a full build's inserts do).
#[must_use]
pub fn service_frontends(
    snapshot: &Snapshot,
    key: &ObjectKey,
    node: &NodeInfo,
) -> Vec<(FrontendKey, Arc<Frontend>)> {
    let mut state = BTreeMap::new();
    let Some(service) = snapshot.services().get(key).filter(|s| s.is_proxied()) else {
        return Vec::new();
    };
    let (namespace, name) = key;
    let slices = snapshot.slices_of(namespace, name);
    for &ip in &service.cluster_ips {
        for port in &service.ports {
            let ctx = PortContext {
                service,
                port,
                family: ip,
                node,
            };
            ctx.add_frontends(&mut state, ip, &slices);
        }
    }
    state.into_iter().collect()
}

/// One Service port of one IP family, on one node.
struct PortContext<'a> {
    service: &'a ServiceInfo,
    port: &'a PortInfo,
    family: IpAddr,
    node: &'a NodeInfo,
}

impl PortContext<'_> {
    fn add_frontends(
        &self,
        state: &mut BTreeMap<FrontendKey, Arc<Frontend>>,
        cluster_ip: IpAddr,
        slices: &[&super::slice::Slice],
    ) {
        let (protocol, port) = (self.port.protocol, self.port.port);
        let port_name = self.port.name.clone().unwrap_or_default();
        let candidates = endpoints::candidates(slices, &port_name, protocol, self.family);
        let sets = endpoints::categorize(&candidates, self.service.policies, self.node);
        let mut add = |ip: IpAddr, port: u16, kind: FrontendKind| {
            let key = FrontendKey { ip, port, protocol };
            state.insert(key, Arc::new(self.frontend(kind, &port_name, &sets)));
        };
        add(cluster_ip, port, FrontendKind::ClusterIp);
        if let Some(node_port) = self.port.node_port {
            for address in self
                .node
                .nodeport_addresses()
                .filter(|a| a.is_ipv4() == self.family.is_ipv4())
            {
                add(address, node_port, FrontendKind::NodePort);
            }
        }
        for ip in self.external_ips() {
            add(ip, port, FrontendKind::ExternalIp);
        }
        for ip in self.load_balancer_ips() {
            add(ip, port, FrontendKind::LoadBalancer);
        }
    }

    fn same_family(&self, ip: &IpAddr) -> bool {
        ip.is_ipv4() == self.family.is_ipv4()
    }

    fn external_ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.service
            .external_ips
            .iter()
            .copied()
            .filter(|ip| self.same_family(ip))
    }

    fn load_balancer_ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.service
            .load_balancer_ips
            .iter()
            .copied()
            .filter(|ip| self.same_family(ip))
    }

    fn frontend(&self, kind: FrontendKind, port_name: &str, sets: &Categorized) -> Frontend {
        let pod = self.route(kind, SourceClass::Pod, sets);
        let node = self.route(kind, SourceClass::Node, sets);
        let external = self.route(kind, SourceClass::External, sets);
        let source_ranges = if kind == FrontendKind::LoadBalancer {
            self.source_ranges()
        } else {
            Vec::new()
        };
        Frontend {
            service: ServicePortName {
                namespace: self.service.namespace.clone(),
                name: self.service.name.clone(),
                port: port_name.to_owned(),
            },
            kind,
            pod,
            node,
            external,
            affinity_timeout: self.service.affinity_timeout,
            source_ranges,
            health_check_node_port: self.service.health_check_node_port,
            hints_passed_over: sets.passed_over.clone(),
        }
    }

    fn source_ranges(&self) -> Vec<IpNet> {
        self.service
            .source_ranges
            .iter()
            .copied()
            .filter(|r| r.addr().is_ipv4() == self.family.is_ipv4())
            .collect()
    }

    fn verdict(local_policy: bool, sets: &Categorized) -> EmptyVerdict {
        if local_policy && sets.has_any {
            EmptyVerdict::Drop
        } else {
            EmptyVerdict::Reject
        }
    }

    /// The route one class of client takes (kube-proxy's KUBE-SVC / KUBE-SVL / KUBE-EXT).
    fn route(&self, kind: FrontendKind, class: SourceClass, sets: &Categorized) -> Route {
        let policies = self.service.policies;
        let local = uses_local_set(kind, class, policies, sets, self.node);
        let backends = if local {
            Arc::clone(&sets.local)
        } else {
            Arc::clone(&sets.cluster)
        };
        let masquerade = match kind {
            // Traffic to a ClusterIP from outside the pods (when they can be told), or
            // all of it with --masquerade-all.
            FrontendKind::ClusterIp => {
                self.node.masquerade_all || (class != SourceClass::Pod && self.node.detects_local())
            }
            // externalTrafficPolicy Cluster masquerades everyone; Local keeps client
            // addresses, but the node's own traffic sent to every endpoint is masqueraded.
            _ => !policies.external_local || (class == SourceClass::Node && !local),
        };
        Route::new(backends, masquerade, Self::verdict(local, sets), local)
    }
}

/// Whether a class of client is served from this node's endpoints only. ClusterIP
/// follows `internalTrafficPolicy`; the external kinds follow `externalTrafficPolicy`,
/// except that with `Local` pods and the node itself are short-circuited to every
/// endpoint when the Service uses cluster-wide endpoints at all.
pub(super) fn uses_local_set(
    kind: FrontendKind,
    class: SourceClass,
    policies: Policies,
    sets: &Categorized,
    node: &NodeInfo,
) -> bool {
    if kind == FrontendKind::ClusterIp {
        return policies.internal_local;
    }
    if !policies.external_local {
        return false;
    }
    let short_circuit = !sets.cluster.is_empty() && policies.uses_cluster_endpoints();
    match class {
        SourceClass::External => true,
        SourceClass::Pod => !(short_circuit && node.detects_local()),
        SourceClass::Node => !short_circuit,
    }
}

/// The key a Kubernetes object is stored under.
#[must_use]
pub fn object_key(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectKey {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}
