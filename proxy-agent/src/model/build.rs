//! Snapshot + node → desired state, following kube-proxy's choice of frontends, endpoint
//! sets and masquerading per class of client. Pure: no I/O, no clock.
use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec, ServiceStatus};

use super::{
    endpoints::{self, Categorized, Policies},
    node::NodeInfo,
    snapshot::{ObjectKey, Snapshot},
    types::{
        DesiredState, EmptyVerdict, Frontend, FrontendKey, FrontendKind, Protocol, Route,
        ServicePortName, SourceClass,
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
) -> Vec<(FrontendKey, Frontend)> {
    let mut state = BTreeMap::new();
    let Some(service) = snapshot.services().get(key) else {
        return Vec::new();
    };
    let Some(spec) = service.spec.as_ref().filter(|_| is_proxied(service)) else {
        return Vec::new();
    };
    let (namespace, name) = key;
    let slices = snapshot.slices_of(namespace, name);
    let policies = policies_of(service, spec);
    for ip in cluster_ips(spec) {
        for port in spec.ports.iter().flatten() {
            let ctx = PortContext {
                service: (namespace, name),
                spec,
                status: service.status.as_ref(),
                port,
                policies,
                family: ip,
                node,
            };
            ctx.add_frontends(&mut state, ip, &slices);
        }
    }
    state.into_iter().collect()
}

/// Whether kube-proxy would program this Service at all (headless and ExternalName
/// Services stay in the snapshot for DNS).
#[must_use]
pub fn is_proxied(service: &Service) -> bool {
    let labelled_away = service
        .metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME));
    let kind = service.spec.as_ref().and_then(|s| s.type_.as_deref());
    !labelled_away && kind != Some("ExternalName")
}

/// The Service's cluster IPs (`clusterIPs`, else `clusterIP`); none when headless.
fn cluster_ips(spec: &ServiceSpec) -> Vec<IpAddr> {
    let listed = spec
        .cluster_ips
        .clone()
        .filter(|ips| !ips.is_empty())
        .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
        .unwrap_or_default();
    listed.iter().filter_map(|ip| ip.parse().ok()).collect()
}

/// The Service-level settings endpoint choice depends on.
pub(super) fn policies_of(service: &Service, spec: &ServiceSpec) -> Policies {
    let annotations = service.metadata.annotations.as_ref();
    let annotation = |key| annotations.and_then(|a| a.get(key)).map(String::as_str);
    let auto = |value: Option<&str>| matches!(value, Some("Auto" | "auto"));
    Policies {
        internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
        externally_accessible: matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"))
            || spec
                .external_ips
                .as_ref()
                .is_some_and(|ips| !ips.is_empty()),
        topology_opt_in: spec.traffic_distribution.as_deref() == Some("PreferClose")
            || auto(annotation(ANNOTATION_TOPOLOGY_MODE))
            || auto(annotation(ANNOTATION_TOPOLOGY_HINTS)),
    }
}

/// One Service port of one IP family, on one node.
struct PortContext<'a> {
    service: (&'a str, &'a str),
    spec: &'a ServiceSpec,
    status: Option<&'a ServiceStatus>,
    port: &'a ServicePort,
    policies: Policies,
    family: IpAddr,
    node: &'a NodeInfo,
}

impl PortContext<'_> {
    fn add_frontends(
        &self,
        state: &mut BTreeMap<FrontendKey, Frontend>,
        cluster_ip: IpAddr,
        slices: &[&super::slice::Slice],
    ) {
        let (Some(protocol), Ok(port)) = (
            Protocol::from_k8s(self.port.protocol.as_deref()),
            u16::try_from(self.port.port),
        ) else {
            return;
        };
        let port_name = self.port.name.clone().unwrap_or_default();
        let candidates = endpoints::candidates(slices, &port_name, protocol, self.family);
        let sets = endpoints::categorize(&candidates, self.policies, self.node);
        let mut add = |ip: IpAddr, port: u16, kind: FrontendKind| {
            let key = FrontendKey { ip, port, protocol };
            state.insert(key, self.frontend(kind, &port_name, &sets));
        };
        add(cluster_ip, port, FrontendKind::ClusterIp);
        if let Some(node_port) = self
            .port
            .node_port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|&p| p != 0)
        {
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

    fn external_ips(&self) -> Vec<IpAddr> {
        let listed = self.spec.external_ips.iter().flatten();
        listed
            .filter_map(|ip| ip.parse().ok())
            .filter(|ip| self.same_family(ip))
            .collect()
    }

    /// `status.loadBalancer.ingress[].ip`, except those in `ipMode: Proxy` (the load
    /// balancer proxies to node ports itself, so the node must not capture its IP).
    fn load_balancer_ips(&self) -> Vec<IpAddr> {
        let ingress = self
            .status
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        ingress
            .into_iter()
            .flatten()
            .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
            .filter_map(|i| i.ip.as_deref()?.parse().ok())
            .filter(|ip| self.same_family(ip))
            .collect()
    }

    fn frontend(&self, kind: FrontendKind, port_name: &str, sets: &Categorized) -> Frontend {
        let pod = self.route(kind, SourceClass::Pod, sets);
        let node = self.route(kind, SourceClass::Node, sets);
        let external = self.route(kind, SourceClass::External, sets);
        let affinity_timeout =
            (self.spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
                self.spec
                    .session_affinity_config
                    .as_ref()
                    .and_then(|c| c.client_ip.as_ref())
                    .and_then(|c| c.timeout_seconds)
                    .and_then(|t| u32::try_from(t).ok())
                    .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
            });
        let source_ranges = if kind == FrontendKind::LoadBalancer {
            self.source_ranges()
        } else {
            Vec::new()
        };
        Frontend {
            service: ServicePortName {
                namespace: self.service.0.to_owned(),
                name: self.service.1.to_owned(),
                port: port_name.to_owned(),
            },
            kind,
            pod,
            node,
            external,
            affinity_timeout,
            source_ranges,
            health_check_node_port: self
                .spec
                .health_check_node_port
                .and_then(|p| u16::try_from(p).ok())
                .filter(|_| self.policies.externally_accessible && self.policies.external_local),
        }
    }

    fn source_ranges(&self) -> Vec<IpNet> {
        let listed = self.spec.load_balancer_source_ranges.iter().flatten();
        listed
            .filter_map(|r| r.trim().parse::<IpNet>().ok())
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
        let local = uses_local_set(kind, class, self.policies, sets, self.node);
        let backends = if local {
            Arc::clone(&sets.local)
        } else {
            Arc::clone(&sets.cluster)
        };
        let masquerade = match kind {
            // Traffic to a ClusterIP from outside the cluster CIDR (when it is known).
            FrontendKind::ClusterIp => class != SourceClass::Pod && self.node.knows_cluster_cidr(),
            // externalTrafficPolicy Cluster masquerades everyone; Local keeps client
            // addresses, but the node's own traffic sent to every endpoint is masqueraded.
            _ => !self.policies.external_local || (class == SourceClass::Node && !local),
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
        SourceClass::Pod => !(short_circuit && node.knows_cluster_cidr()),
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
