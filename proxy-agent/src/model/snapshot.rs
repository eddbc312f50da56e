//! The source's view of the cluster: every object the model reads, keyed by
//! namespace/name. Sources fill it; the model only reads it.
use std::collections::BTreeMap;

use k8s_openapi::api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice};

/// `namespace/name` (namespace empty for cluster-scoped objects).
pub type ObjectKey = (String, String);

#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub services: BTreeMap<ObjectKey, Service>,
    pub endpoint_slices: BTreeMap<ObjectKey, EndpointSlice>,
    pub nodes: BTreeMap<String, Node>,
}
