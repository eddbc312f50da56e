//! The source's view of the cluster: every object the model and DNS read, keyed by
//! namespace/name, slimmed to the fields they read and held in persistent maps, so a
//! source publishes a new version in O(1) and a reader finds what changed between two
//! versions in time proportional to the change (shared subtrees are skipped).
use std::{collections::BTreeSet, sync::Arc};

use imbl::{OrdMap, OrdSet};
use k8s_openapi::{
    api::core::v1::{Node, NodeSpec, NodeStatus},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

pub use super::{service::slim_service, slice::slim_slice};
use super::{service::ServiceInfo, slice::Slice};

/// `namespace/name` (namespace empty for cluster-scoped objects).
pub type ObjectKey = (String, String);

/// The EndpointSlice annotation the EndpointSlice controller stamps with the time of
/// the change that triggered it (kube-proxy's network programming latency starts there).
pub const ANNOTATION_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    services: OrdMap<ObjectKey, Arc<ServiceInfo>>,
    endpoint_slices: OrdMap<ObjectKey, Arc<Slice>>,
    nodes: OrdMap<String, Arc<Node>>,
    /// (namespace, Service, slice name) of every slice with a service-name label.
    slice_index: OrdSet<(String, String, String)>,
}

/// What differs between two snapshots, as the model rebuilds it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Services whose object or whose slices changed (a Service and its slices are one
    /// unit), including Services that appeared or went away.
    pub services: BTreeSet<ObjectKey>,
    /// Whether any Node object changed.
    pub nodes: bool,
}

impl Changes {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && !self.nodes
    }
}

/// The Service a slice belongs to, by its service-name label.
#[must_use]
pub fn service_of(slice: &Slice) -> Option<&str> {
    slice.service.as_deref()
}

/// Metadata with only its name, namespace and the labels and annotations we read: a real
/// API server's `managedFields`, owner references and unrelated annotations
/// (`last-applied-configuration`) are most of an object's size.
fn slim_meta(meta: &mut ObjectMeta, labels: &[&str], annotations: &[&str]) {
    let keep = |map: Option<std::collections::BTreeMap<String, String>>, keys: &[&str]| {
        let kept: std::collections::BTreeMap<String, String> = map
            .into_iter()
            .flatten()
            .filter(|(k, _)| keys.contains(&k.as_str()))
            .collect();
        (!kept.is_empty()).then_some(kept)
    };
    *meta = ObjectMeta {
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        labels: keep(meta.labels.take(), labels),
        annotations: keep(meta.annotations.take(), annotations),
        deletion_timestamp: meta.deletion_timestamp.take(),
        ..ObjectMeta::default()
    };
}

/// A Node as the agent reads it: zone label, addresses, pod CIDRs, taints, deletion.
#[must_use]
pub fn slim_node(mut node: Node) -> Node {
    slim_meta(&mut node.metadata, &[super::node::LABEL_ZONE], &[]);
    node.spec = node.spec.map(|spec| NodeSpec {
        pod_cidr: spec.pod_cidr,
        pod_cidrs: spec.pod_cidrs,
        taints: spec.taints,
        ..NodeSpec::default()
    });
    node.status = node.status.map(|status| NodeStatus {
        addresses: status.addresses,
        ..NodeStatus::default()
    });
    node
}

impl Snapshot {
    #[must_use]
    pub fn services(&self) -> &OrdMap<ObjectKey, Arc<ServiceInfo>> {
        &self.services
    }

    #[must_use]
    pub fn endpoint_slices(&self) -> &OrdMap<ObjectKey, Arc<Slice>> {
        &self.endpoint_slices
    }

    #[must_use]
    pub fn nodes(&self) -> &OrdMap<String, Arc<Node>> {
        &self.nodes
    }

    /// Stores a Service under `key` (replacing any earlier version).
    pub fn put_service(&mut self, key: ObjectKey, service: Arc<ServiceInfo>) {
        self.services.insert(key, service);
    }

    pub fn remove_service(&mut self, key: &ObjectKey) -> Option<Arc<ServiceInfo>> {
        self.services.remove(key)
    }

    /// Stores a slice under `key`, keeping the Service → slices index current.
    pub fn put_slice(&mut self, key: ObjectKey, slice: Arc<Slice>) {
        let service = service_of(&slice).map(str::to_owned);
        if let Some(old) = self.endpoint_slices.insert(key.clone(), slice) {
            self.unindex(&key, &old);
        }
        if let Some(service) = service {
            self.slice_index.insert((key.0, service, key.1));
        }
    }

    pub fn remove_slice(&mut self, key: &ObjectKey) -> Option<Arc<Slice>> {
        let old = self.endpoint_slices.remove(key)?;
        self.unindex(key, &old);
        Some(old)
    }

    fn unindex(&mut self, key: &ObjectKey, slice: &Slice) {
        if let Some(service) = service_of(slice) {
            self.slice_index
                .remove(&(key.0.clone(), service.to_owned(), key.1.clone()));
        }
    }

    pub fn put_node(&mut self, name: String, node: Arc<Node>) {
        self.nodes.insert(name, node);
    }

    pub fn remove_node(&mut self, name: &str) -> Option<Arc<Node>> {
        self.nodes.remove(name)
    }

    /// The slices of one Service, joined by the service-name label, in key order.
    #[must_use]
    pub fn slices_of(&self, namespace: &str, service: &str) -> Vec<&Slice> {
        let from = (namespace.to_owned(), service.to_owned(), String::new());
        self.slice_index
            .range(from..)
            .take_while(|(ns, svc, _)| ns == namespace && svc == service)
            .filter_map(|(ns, _, name)| {
                self.endpoint_slices
                    .get(&(ns.clone(), name.clone()))
                    .map(AsRef::as_ref)
            })
            .collect()
    }

    /// What changed from `self` to `newer`, in time proportional to the change when
    /// `newer` was derived from `self`.
    #[must_use]
    pub fn changes_to(&self, newer: &Self) -> Changes {
        let mut out = Changes::default();
        for item in self.services.diff(&newer.services) {
            out.services.insert(diff_key(&item).clone());
        }
        for item in self.endpoint_slices.diff(&newer.endpoint_slices) {
            let (key, old, new): (&ObjectKey, Option<&Arc<Slice>>, _) = match item {
                imbl::ordmap::DiffItem::Add(k, v) => (k, None, Some(v)),
                imbl::ordmap::DiffItem::Remove(k, v) => (k, Some(v), None),
                imbl::ordmap::DiffItem::Update { old, new } => (old.0, Some(old.1), Some(new.1)),
            };
            for slice in [old, new].into_iter().flatten() {
                if let Some(service) = service_of(slice) {
                    out.services.insert((key.0.clone(), service.to_owned()));
                }
            }
        }
        out.nodes = self.nodes.diff(&newer.nodes).next().is_some();
        out
    }
}

fn diff_key<'a, K, V>(item: &imbl::ordmap::DiffItem<'a, 'a, K, V>) -> &'a K {
    match item {
        imbl::ordmap::DiffItem::Add(k, _) | imbl::ordmap::DiffItem::Remove(k, _) => k,
        imbl::ordmap::DiffItem::Update { old, .. } => old.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(name: &str, service: &str) -> Arc<Slice> {
        Arc::new(Slice {
            name: name.into(),
            namespace: "ns".into(),
            service: Some(service.into()),
            address_type: "IPv4",
            ..Slice::default()
        })
    }

    #[test]
    fn a_slice_moving_between_services_changes_both_and_the_index_follows() {
        let mut old = Snapshot::default();
        old.put_slice(("ns".into(), "x".into()), slice("x", "a"));
        old.put_slice(("ns".into(), "y".into()), slice("y", "b"));
        let mut new = old.clone();
        new.put_slice(("ns".into(), "x".into()), slice("x", "b"));
        let changes = old.changes_to(&new);
        let names: Vec<&str> = changes.services.iter().map(|k| k.1.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert!(new.slices_of("ns", "a").is_empty());
        assert_eq!(new.slices_of("ns", "b").len(), 2);
        assert_eq!(old.slices_of("ns", "a").len(), 1);
        assert!(new.changes_to(&new).is_empty());
    }
}
