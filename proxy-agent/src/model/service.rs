//! Services as the snapshot keeps them: what the model and DNS read, parsed once at
//! decode. The API type is about 1.2 KiB of mostly empty options before its strings and
//! lists (37 MiB at 30 000 Services); this one is a few hundred bytes.
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Service;

use super::{
    build::{
        ANNOTATION_TOPOLOGY_HINTS, ANNOTATION_TOPOLOGY_MODE, DEFAULT_AFFINITY_TIMEOUT,
        LABEL_SERVICE_PROXY_NAME,
    },
    endpoints::Policies,
    types::Protocol,
};

/// `spec.type`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ServiceType {
    #[default]
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalName,
}

/// One entry of `spec.ports`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortInfo {
    pub name: Option<String>,
    pub protocol: Protocol,
    pub port: u16,
    /// `nodePort`, when set and not zero.
    pub node_port: Option<u16>,
}

#[allow(
    clippy::struct_excessive_bools,
    reason = "independent fields of the Service spec, each read on its own"
)]
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    /// Whether the object has a spec at all (without one it asks for nothing).
    pub has_spec: bool,
    pub type_: ServiceType,
    /// Labelled `service.kubernetes.io/service-proxy-name`: another proxy's Service.
    pub other_proxy: bool,
    /// `clusterIPs`, else `clusterIP`, parsed; empty when headless or unset.
    pub cluster_ips: Vec<IpAddr>,
    /// `clusterIP: None`.
    pub headless: bool,
    pub ports: Vec<PortInfo>,
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip`, except those in `ipMode: Proxy` (the load
    /// balancer proxies to node ports itself, so the node must not capture its IP).
    pub load_balancer_ips: Vec<IpAddr>,
    /// `loadBalancerSourceRanges`.
    pub source_ranges: Vec<IpNet>,
    /// The timeout of `sessionAffinity: ClientIP`; `None` without affinity.
    pub affinity_timeout: Option<u32>,
    pub policies: Policies,
    /// `healthCheckNodePort`, where it applies (externally reachable, eTP Local).
    pub health_check_node_port: Option<u16>,
    pub publish_not_ready_addresses: bool,
    pub external_name: Option<String>,
}

impl ServiceInfo {
    /// Whether kube-proxy would program this Service at all (headless and ExternalName
    /// Services stay in the snapshot for DNS).
    #[must_use]
    pub fn is_proxied(&self) -> bool {
        self.has_spec && !self.other_proxy && self.type_ != ServiceType::ExternalName
    }
}

/// The entries that parse (addresses as given; ranges with blanks around them trimmed,
/// as kube-proxy does).
fn parsed<T: std::str::FromStr>(listed: Option<&Vec<String>>, trim: bool) -> Vec<T> {
    listed
        .into_iter()
        .flatten()
        .filter_map(|s| if trim { s.trim() } else { s }.parse().ok())
        .collect()
}

/// A Service (validated) as the model and DNS read it.
#[must_use]
pub fn slim_service(service: Service) -> ServiceInfo {
    let meta = service.metadata;
    let labels = meta.labels.unwrap_or_default();
    let annotations = meta.annotations.unwrap_or_default();
    let mut info = ServiceInfo {
        namespace: meta.namespace.unwrap_or_default(),
        name: meta.name.unwrap_or_default(),
        other_proxy: labels.contains_key(LABEL_SERVICE_PROXY_NAME),
        ..ServiceInfo::default()
    };
    let Some(spec) = service.spec else {
        return info;
    };
    info.has_spec = true;
    info.type_ = match spec.type_.as_deref() {
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        Some("ExternalName") => ServiceType::ExternalName,
        _ => ServiceType::ClusterIp,
    };
    let cluster_ips = spec
        .cluster_ips
        .clone()
        .filter(|ips| !ips.is_empty())
        .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]));
    info.cluster_ips = parsed(cluster_ips.as_ref(), false);
    info.headless = spec.cluster_ip.as_deref() == Some("None");
    info.ports = spec
        .ports
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some(PortInfo {
                protocol: Protocol::from_k8s(p.protocol.as_deref())?,
                port: u16::try_from(p.port).ok()?,
                node_port: p
                    .node_port
                    .and_then(|n| u16::try_from(n).ok())
                    .filter(|&n| n != 0),
                name: p.name,
            })
        })
        .collect();
    info.external_ips = parsed(spec.external_ips.as_ref(), false);
    info.source_ranges = parsed(spec.load_balancer_source_ranges.as_ref(), true);
    info.load_balancer_ips = service
        .status
        .and_then(|s| s.load_balancer)
        .and_then(|lb| lb.ingress)
        .into_iter()
        .flatten()
        .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
        .filter_map(|i| i.ip?.parse().ok())
        .collect();
    info.affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
    });
    let auto = |key| {
        matches!(
            annotations.get(key).map(String::as_str),
            Some("Auto" | "auto")
        )
    };
    info.policies = Policies {
        internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
        externally_accessible: matches!(
            info.type_,
            ServiceType::NodePort | ServiceType::LoadBalancer
        ) || spec
            .external_ips
            .as_ref()
            .is_some_and(|ips| !ips.is_empty()),
        topology_opt_in: matches!(
            spec.traffic_distribution.as_deref(),
            Some("PreferClose" | "PreferSameZone" | "PreferSameNode")
        ) || auto(ANNOTATION_TOPOLOGY_MODE)
            || auto(ANNOTATION_TOPOLOGY_HINTS),
    };
    info.health_check_node_port = spec
        .health_check_node_port
        .and_then(|p| u16::try_from(p).ok())
        .filter(|_| info.policies.externally_accessible && info.policies.external_local);
    info.publish_not_ready_addresses = spec.publish_not_ready_addresses == Some(true);
    info.external_name = spec.external_name;
    // Kept for the Service's life: collected vectors start with room for four.
    info.cluster_ips.shrink_to_fit();
    info.ports.shrink_to_fit();
    info.external_ips.shrink_to_fit();
    info.source_ranges.shrink_to_fit();
    info.load_balancer_ips.shrink_to_fit();
    info
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(yaml: &str) -> ServiceInfo {
        slim_service(serde_yaml::from_str(yaml).expect("yaml"))
    }

    #[test]
    fn reads_what_the_model_and_dns_use() {
        let info = service(
            r"
metadata:
  name: web
  namespace: shop
  annotations: {service.kubernetes.io/topology-mode: Auto}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, 'fd00::10']
  externalIPs: [192.0.2.1, bogus]
  externalTrafficPolicy: Local
  healthCheckNodePort: 31000
  sessionAffinity: ClientIP
  loadBalancerSourceRanges: [' 198.51.100.0/24 ']
  ports:
  - {name: http, port: 80, nodePort: 30080}
  - {name: dns, port: 53, protocol: UDP, nodePort: 0}
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.1}, {ip: 203.0.113.2, ipMode: Proxy}]
",
        );
        assert_eq!(
            (info.namespace.as_str(), info.name.as_str()),
            ("shop", "web")
        );
        assert!(info.is_proxied() && !info.headless);
        assert_eq!(info.cluster_ips.len(), 2);
        assert_eq!(info.external_ips, ["192.0.2.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            info.load_balancer_ips,
            ["203.0.113.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(info.source_ranges.len(), 1);
        assert_eq!(info.affinity_timeout, Some(DEFAULT_AFFINITY_TIMEOUT));
        assert_eq!(info.health_check_node_port, Some(31000));
        assert!(info.policies.topology_opt_in && info.policies.external_local);
        assert_eq!(info.ports[0].node_port, Some(30080));
        assert_eq!(info.ports[1].node_port, None);
        assert_eq!(info.ports[1].protocol, Protocol::Udp);
    }

    #[test]
    fn headless_external_name_and_other_proxies_are_not_proxied() {
        let headless = service("metadata: {name: h}\nspec: {clusterIP: None}");
        assert!(headless.headless && headless.cluster_ips.is_empty());
        let external =
            service("metadata: {name: e}\nspec: {type: ExternalName, externalName: a.example}");
        assert!(!external.is_proxied());
        assert_eq!(external.external_name.as_deref(), Some("a.example"));
        let other = service(
            "metadata: {name: o, labels: {service.kubernetes.io/service-proxy-name: x}}\nspec: {clusterIP: 10.96.0.1}",
        );
        assert!(!other.is_proxied());
        assert!(!service("metadata: {name: n}").is_proxied());
    }
}
