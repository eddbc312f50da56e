//! EndpointSlices as the agent keeps them: only what the model and DNS read, in a
//! compact form (an API `Endpoint` is ~400 bytes of mostly empty options; this one is
//! 40: the address, the three conditions in one byte, one shared copy of each node and
//! zone pair, and the rarely set hostname and zone hints behind one pointer), since
//! endpoints are most of what an agent holds at scale.
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
    /// `IPv4`, `IPv6` or `FQDN` (validated before).
    pub address_type: &'static str,
    pub ports: Vec<EndpointPort>,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The first address (consumers may use only the first; kube-proxy does).
    pub address: IpAddr,
    /// `ready`, `serving`, `terminating`: two bits each (0 absent, 1 false, 2 true).
    conditions: u8,
    /// Its node and zone: a cluster has few distinct pairs, endpoints many.
    locality: Option<Arc<Locality>>,
    extra: Option<Box<Extra>>,
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct Locality {
    node: Option<Box<str>>,
    zone: Option<Box<str>>,
}

/// What few endpoints carry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Extra {
    hostname: Option<Box<str>>,
    /// `hints.forZones` names.
    zone_hints: Box<[Arc<str>]>,
    /// `hints.forNodes` names.
    node_hints: Box<[Arc<str>]>,
}

/// The API's endpoint fields the agent reads, to build an [`Endpoint`] from.
#[derive(Debug, Clone, Default)]
pub struct EndpointParts {
    pub address: Option<IpAddr>,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    pub hostname: Option<String>,
    pub node_name: Option<String>,
    pub zone: Option<String>,
    pub zone_hints: Vec<String>,
    pub node_hints: Vec<String>,
}

fn condition_bits(value: Option<bool>, shift: u8) -> u8 {
    let bits = match value {
        None => 0,
        Some(false) => 1,
        Some(true) => 2,
    };
    bits << shift
}

impl Endpoint {
    /// The compact form of `parts`; `None` without an address.
    #[must_use]
    pub fn new(parts: EndpointParts) -> Option<Self> {
        let locality = (parts.node_name.is_some() || parts.zone.is_some()).then(|| {
            interned_locality(Locality {
                node: parts.node_name.map(String::into_boxed_str),
                zone: parts.zone.map(String::into_boxed_str),
            })
        });
        let hinted = !parts.zone_hints.is_empty() || !parts.node_hints.is_empty();
        let extra = (parts.hostname.is_some() || hinted).then(|| {
            Box::new(Extra {
                hostname: parts.hostname.map(String::into_boxed_str),
                zone_hints: parts.zone_hints.into_iter().map(interned).collect(),
                node_hints: parts.node_hints.into_iter().map(interned).collect(),
            })
        });
        Some(Self {
            address: parts.address?,
            conditions: condition_bits(parts.ready, 0)
                | condition_bits(parts.serving, 2)
                | condition_bits(parts.terminating, 4),
            locality,
            extra,
        })
    }

    fn condition(&self, shift: u8) -> Option<bool> {
        match (self.conditions >> shift) & 3 {
            1 => Some(false),
            2 => Some(true),
            _ => None,
        }
    }

    #[must_use]
    pub fn ready(&self) -> Option<bool> {
        self.condition(0)
    }

    #[must_use]
    pub fn serving(&self) -> Option<bool> {
        self.condition(2)
    }

    #[must_use]
    pub fn terminating(&self) -> Option<bool> {
        self.condition(4)
    }

    #[must_use]
    pub fn node_name(&self) -> Option<&str> {
        self.locality.as_ref()?.node.as_deref()
    }

    #[must_use]
    pub fn zone(&self) -> Option<&str> {
        self.locality.as_ref()?.zone.as_deref()
    }

    #[must_use]
    pub fn hostname(&self) -> Option<&str> {
        self.extra.as_ref()?.hostname.as_deref()
    }

    #[must_use]
    pub fn zone_hints(&self) -> &[Arc<str>] {
        self.extra.as_ref().map_or(&[], |e| &e.zone_hints)
    }

    #[must_use]
    pub fn node_hints(&self) -> &[Arc<str>] {
        self.extra.as_ref().map_or(&[], |e| &e.node_hints)
    }
}

/// One shared copy of each distinct value (a cluster has few node and zone names,
/// endpoints many), bounded: past 65 536 values new ones are simply not shared.
struct Interner<T: ?Sized>(Mutex<Option<HashSet<Arc<T>>>>);

impl<T: ?Sized + Eq + std::hash::Hash> Interner<T> {
    const fn new() -> Self {
        Self(Mutex::new(None))
    }

    fn share<Q>(&self, value: Q) -> Arc<T>
    where
        Q: std::borrow::Borrow<T> + Into<Arc<T>>,
    {
        let mut set = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let set = set.get_or_insert_with(HashSet::new);
        if let Some(shared) = set.get(value.borrow()) {
            return shared.clone();
        }
        let shared: Arc<T> = value.into();
        if set.len() < 65_536 {
            set.insert(shared.clone());
        }
        shared
    }
}

/// One shared copy of each node and zone pair.
fn interned_locality(locality: Locality) -> Arc<Locality> {
    static PAIRS: Interner<Locality> = Interner::new();
    PAIRS.share(locality)
}

/// One shared copy of each zone name.
fn interned(name: String) -> Arc<str> {
    static NAMES: Interner<str> = Interner::new();
    NAMES.share(name)
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
            let conditions = e.conditions.unwrap_or_default();
            Endpoint::new(EndpointParts {
                address: e.addresses.iter().find_map(|a| a.parse().ok()),
                ready: conditions.ready,
                serving: conditions.serving,
                terminating: conditions.terminating,
                hostname: e.hostname,
                node_name: e.node_name,
                zone: e.zone,
                zone_hints: e
                    .hints
                    .as_ref()
                    .and_then(|h| h.for_zones.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|z| z.name.clone())
                    .collect(),
                node_hints: e
                    .hints
                    .and_then(|h| h.for_nodes)
                    .into_iter()
                    .flatten()
                    .map(|n| n.name)
                    .collect(),
            })
        })
        .collect();
    // Collected in place into the API endpoints' much larger buffer: give it back.
    endpoints.shrink_to_fit();
    // A list parsed as text grows its arrays by doubling: one port holds room for four.
    let mut ports = slice.ports.unwrap_or_default();
    ports.shrink_to_fit();
    Slice {
        name: meta.name.unwrap_or_default(),
        namespace: meta.namespace.unwrap_or_default(),
        service: meta.labels.and_then(|mut l| l.remove(LABEL_SERVICE_NAME)),
        trigger_time: meta
            .annotations
            .and_then(|mut a| a.remove(ANNOTATION_TRIGGER_TIME)),
        address_type: match slice.address_type.as_str() {
            "IPv4" => "IPv4",
            "IPv6" => "IPv6",
            _ => "FQDN",
        },
        ports,
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
            (e.ready(), e.serving(), e.terminating()),
            (Some(false), Some(true), Some(true))
        );
        assert_eq!(
            (e.node_name(), e.zone(), e.hostname()),
            (Some("node-a"), None, None)
        );
        let (a, b) = (&slim.endpoints[0].locality, &slim.endpoints[2].locality);
        assert!(std::sync::Arc::ptr_eq(
            a.as_ref().unwrap(),
            b.as_ref().unwrap()
        ));
        assert_eq!(std::mem::size_of::<super::Endpoint>(), 40);
    }
}
