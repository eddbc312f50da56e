//! Sources fill a snapshot of the cluster and signal each change; the snapshot, not
//! the event stream, is the truth.
pub mod addresses;
pub mod kube;
pub mod manifests;
pub mod parse;

use std::{path::PathBuf, sync::Arc};

use thiserror::Error;

use crate::model::Snapshot;

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
    #[error("Kubernetes API client: {0}")]
    Kube(String),
    #[error("cannot watch manifests directory: {0}")]
    Watch(#[source] notify::Error),
}
