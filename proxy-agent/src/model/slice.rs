//! EndpointSlices as the agent keeps them: only what the model and DNS read, in a
//! compact form (an API `Endpoint` is ~400 bytes of mostly empty options; this one is
//! ~70, with node and zone names shared), since endpoints are most of what an agent
//! holds at scale.
use std::{
    collections::HashSet,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use k8s_openapi::api::discovery::v1::{EndpointPort, EndpointSlice};

use super::{build::LABEL_SERVICE_NAME, snapshot::ANNOTATION_TRIGGER_TIME};

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Slice {
    pub name: String,
    pub namespace: String,
    /// The `kubernetes.io/service-name` label: the Service the slice belongs to.
    pub service: Option<String>,
    /// The EndpointSlice controller's last-change trigger time (RFC 3339), as given.
    pub trigger_time: Option<String>,
    /// `IPv4`, `IPv6` or `FQDN`.
    pub address_type: String,
    pub ports: Vec<EndpointPort>,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The first address (consumers may use only the first; kube-proxy does).
    pub address: IpAddr,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    pub hostname: Option<Box<str>>,
    pub node_name: Option<Arc<str>>,
    pub zone: Option<Arc<str>>,
    /// `hints.forZones` names.
    pub zone_hints: Box<[Arc<str>]>,
}

/// One shared copy of each node and zone name (a cluster has few, endpoints many).
fn interned(name: String) -> Arc<str> {
    static NAMES: Mutex<Option<HashSet<Arc<str>>>> = Mutex::new(None);
    let mut names = NAMES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let names = names.get_or_insert_with(HashSet::new);
    if let Some(name) = names.get(name.as_str()) {
        return name.clone();
    }
    let name: Arc<str> = Arc::from(name);
    // Bounded: past this, names are simply not shared.
    if names.len() < 65_536 {
        names.insert(name.clone());
    }
    name
}

/// The compact form of an API EndpointSlice (validated before: see `validate`).
/// Endpoints without a usable address are left out, as every reader skipped them.
#[must_use]
pub fn slim_slice(slice: EndpointSlice) -> Slice {
    let meta = slice.metadata;
    let mut endpoints: Vec<Endpoint> = slice
        .endpoints
        .into_iter()
        .filter_map(|e| {
            let address = e.addresses.iter().find_map(|a| a.parse().ok())?;
            let conditions = e.conditions.unwrap_or_default();
            let zone_hints = e
                .hints
                .and_then(|h| h.for_zones)
                .into_iter()
                .flatten()
                .map(|z| interned(z.name))
                .collect();
            Some(Endpoint {
                address,
                ready: conditions.ready,
                serving: conditions.serving,
                terminating: conditions.terminating,
                hostname: e.hostname.map(String::into_boxed_str),
                node_name: e.node_name.map(interned),
                zone: e.zone.map(interned),
                zone_hints,
            })
        })
        .collect();
    // Collected in place into the API endpoints' much larger buffer: give it back.
    endpoints.shrink_to_fit();
    Slice {
        name: meta.name.unwrap_or_default(),
        namespace: meta.namespace.unwrap_or_default(),
        service: meta.labels.and_then(|mut l| l.remove(LABEL_SERVICE_NAME)),
        trigger_time: meta
            .annotations
            .and_then(|mut a| a.remove(ANNOTATION_TRIGGER_TIME)),
        address_type: slice.address_type,
        ports: slice.ports.unwrap_or_default(),
        endpoints,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::{
        api::discovery::v1::{Endpoint as ApiEndpoint, EndpointConditions, EndpointSlice},
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    use super::slim_slice;

    #[test]
    fn keeps_what_readers_use_and_shares_node_names() {
        let endpoint = |address: &str| ApiEndpoint {
            addresses: vec![address.to_owned(), "10.0.0.99".to_owned()],
            conditions: Some(EndpointConditions {
                ready: Some(false),
                serving: Some(true),
                terminating: Some(true),
            }),
            node_name: Some("node-a".to_owned()),
            ..ApiEndpoint::default()
        };
        let slice = EndpointSlice {
            metadata: ObjectMeta {
                name: Some("web-1".into()),
                namespace: Some("default".into()),
                labels: Some(BTreeMap::from([(
                    "kubernetes.io/service-name".to_owned(),
                    "web".to_owned(),
                )])),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".into(),
            endpoints: vec![
                endpoint("10.0.0.1"),
                endpoint("not-an-ip"),
                endpoint("10.0.0.2"),
            ],
            ports: None,
        };
        let slim = slim_slice(slice);
        assert_eq!(slim.service.as_deref(), Some("web"));
        // The first usable address of each endpoint.
        let addresses: Vec<String> = slim
            .endpoints
            .iter()
            .map(|e| e.address.to_string())
            .collect();
        assert_eq!(addresses, ["10.0.0.1", "10.0.0.99", "10.0.0.2"]);
        let e = &slim.endpoints[0];
        assert_eq!(
            (e.ready, e.serving, e.terminating),
            (Some(false), Some(true), Some(true))
        );
        let (a, b) = (&slim.endpoints[0].node_name, &slim.endpoints[2].node_name);
        assert!(std::sync::Arc::ptr_eq(
            a.as_ref().unwrap(),
            b.as_ref().unwrap()
        ));
    }
}
