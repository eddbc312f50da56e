//! Sources fill a snapshot of the cluster and signal each change; the snapshot, not
//! the event stream, is the truth.
pub mod addresses;
pub mod kube;
pub mod manifests;
pub mod parse;
pub mod rate;
pub mod wire;

use std::{path::PathBuf, sync::Arc};

use thiserror::Error;

use crate::model::{ObjectKey, Snapshot};

use self::parse::{Kind, Object};

/// What a source publishes: `snapshot` is `None` until the initial load is complete,
/// and `generation` increases with every change delivered.
#[derive(Clone, Debug, Default)]
pub struct SourceUpdate {
    pub generation: u64,
    pub snapshot: Option<Arc<Snapshot>>,
}

#[derive(Debug, Error)]
pub enum SourceError {
    #[error("cannot read manifests directory {0}: {1}")]
    ReadDir(PathBuf, #[source] std::io::Error),
    #[error("kubeconfig: {0}")]
    Kubeconfig(#[source] ::kube::config::KubeconfigError),
    #[error("no Kubernetes client configuration (in-cluster or ~/.kube/config): {0}")]
    InferConfig(#[source] ::kube::config::InferConfigError),
    #[error("Kubernetes API client: {0}")]
    Kube(#[source] ::kube::Error),
    #[error("cannot start the source's thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("the source's thread ended before its client was made")]
    ThreadEnded,
    #[error("cannot watch manifests directory: {0}")]
    Watch(#[source] notify::Error),
}

/// The version of an object `snapshot` holds, if any.
#[must_use]
pub fn stored(snapshot: &Snapshot, kind: Kind, key: &ObjectKey) -> Option<Object> {
    match kind {
        Kind::Service => snapshot.services().get(key).cloned().map(Object::Service),
        Kind::EndpointSlice => snapshot
            .endpoint_slices()
            .get(key)
            .cloned()
            .map(Object::EndpointSlice),
        Kind::Node => snapshot.nodes().get(&key.1).cloned().map(Object::Node),
    }
}

/// Makes `snapshot` hold `object` for `key` (`None`: nothing). Unless an equal object is
/// there already, which keeps the snapshots' shared structure; true when it changed.
pub fn store(snapshot: &mut Snapshot, kind: Kind, key: &ObjectKey, object: Option<Object>) -> bool {
    if stored(snapshot, kind, key) == object {
        return false;
    }
    match object {
        Some(Object::Service(o)) => snapshot.put_service(key.clone(), o),
        Some(Object::EndpointSlice(o)) => snapshot.put_slice(key.clone(), o),
        Some(Object::Node(o)) => snapshot.put_node(key.1.clone(), o),
        None => match kind {
            Kind::Service => drop(snapshot.remove_service(key)),
            Kind::EndpointSlice => drop(snapshot.remove_slice(key)),
            Kind::Node => drop(snapshot.remove_node(&key.1)),
        },
    }
    true
}
