//! Snapshot + node → desired state, following kube-proxy's choice of frontends and
//! endpoints. Pure: no I/O, no clock.
use std::{collections::BTreeSet, net::IpAddr};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::{
    snapshot::{NodeInfo, ObjectKey, Snapshot},
    types::{Backend, DesiredState, Frontend, FrontendKey, Protocol, ServicePortName},
};

/// Label joining an `EndpointSlice` to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Services carrying this label belong to another proxy (kube-proxy skips them too).
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";

/// Computes what `node` must program for the cluster in `snapshot`.
#[must_use]
pub fn build(snapshot: &Snapshot, _node: &NodeInfo) -> DesiredState {
    let mut state = DesiredState::default();
    for ((namespace, name), service) in &snapshot.services {
        if !is_proxied(service) {
            continue;
        }
        let slices = slices_of(snapshot, namespace, name);
        for ip in cluster_ips(service) {
            add_frontends(&mut state, (namespace, name), service, ip, &slices);
        }
    }
    state
}

fn is_proxied(service: &Service) -> bool {
    let labelled_away = service
        .metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME));
    let kind = service.spec.as_ref().and_then(|s| s.type_.as_deref());
    !labelled_away && kind != Some("ExternalName")
}

/// The Service's cluster IPs (`clusterIPs`, else `clusterIP`); none when headless.
fn cluster_ips(service: &Service) -> Vec<IpAddr> {
    let Some(spec) = &service.spec else {
        return Vec::new();
    };
    let listed = spec
        .cluster_ips
        .clone()
        .filter(|ips| !ips.is_empty())
        .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
        .unwrap_or_default();
    listed.iter().filter_map(|ip| ip.parse().ok()).collect()
}

fn slices_of<'a>(snapshot: &'a Snapshot, namespace: &str, name: &str) -> Vec<&'a EndpointSlice> {
    snapshot
        .endpoint_slices
        .iter()
        .filter(|((ns, _), slice)| {
            ns == namespace
                && slice
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(LABEL_SERVICE_NAME))
                    .is_some_and(|svc| svc == name)
        })
        .map(|(_, slice)| slice)
        .collect()
}

fn add_frontends(
    state: &mut DesiredState,
    (namespace, name): (&str, &str),
    service: &Service,
    ip: IpAddr,
    slices: &[&EndpointSlice],
) {
    let ports = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_deref())
        .unwrap_or_default();
    for port in ports {
        let (Some(protocol), Ok(number)) = (
            Protocol::from_k8s(port.protocol.as_deref()),
            u16::try_from(port.port),
        ) else {
            continue;
        };
        let port_name = port.name.clone().unwrap_or_default();
        let key = FrontendKey {
            ip,
            port: number,
            protocol,
        };
        let frontend = Frontend {
            service: ServicePortName {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                port: port_name.clone(),
            },
            backends: ready_backends(slices, &port_name, protocol, ip),
        };
        state.frontends.insert(key, frontend);
    }
}

/// Ready endpoints of the slices of the frontend's address family, with the target
/// port each slice gives the Service port's name. Sorted; duplicates across slices
/// counted once.
fn ready_backends(
    slices: &[&EndpointSlice],
    port_name: &str,
    protocol: Protocol,
    family: IpAddr,
) -> Vec<Backend> {
    let address_type = if family.is_ipv4() { "IPv4" } else { "IPv6" };
    let mut backends = BTreeSet::new();
    for slice in slices.iter().filter(|s| s.address_type == address_type) {
        let Some(target) = slice_port(slice, port_name, protocol) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            // kube-proxy: a missing `ready` condition means ready.
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            if !ready {
                continue;
            }
            backends.extend(
                endpoint
                    .addresses
                    .iter()
                    .filter_map(|a| a.parse::<IpAddr>().ok())
                    .filter(|a| a.is_ipv4() == family.is_ipv4())
                    .map(|ip| Backend { ip, port: target }),
            );
        }
    }
    backends.into_iter().collect()
}

/// The slice's port for a Service port name (`""` matches an unnamed port).
fn slice_port(slice: &EndpointSlice, port_name: &str, protocol: Protocol) -> Option<u16> {
    slice.ports.as_deref()?.iter().find_map(|p| {
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

/// The key a Kubernetes object is stored under.
#[must_use]
pub fn object_key(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectKey {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}
