//! Pure model: snapshot of the cluster + this node → desired dataplane state, the plan
//! between two states, and the packet-flow oracle every backend is checked against.
//! No I/O; imports neither kube nor aya.
mod build;
mod diff;
pub mod endpoints;
pub mod explain;
pub mod flow;
mod node;
pub mod service;
pub mod slice;
pub mod snapshot;
mod tracker;
mod types;
pub mod validate;

pub use build::{
    build, object_key, service_frontends, ANNOTATION_TOPOLOGY_HINTS, ANNOTATION_TOPOLOGY_MODE,
    DEFAULT_AFFINITY_TIMEOUT, LABEL_SERVICE_NAME, LABEL_SERVICE_PROXY_NAME,
};
pub use diff::{diff, Plan};
pub use node::{DetectLocal, LocalTraffic, NodeInfo, LABEL_ZONE};
pub use snapshot::{Changes, ObjectKey, Snapshot};
pub use tracker::Tracker;
pub use types::{
    Backend, DesiredState, EmptyVerdict, Frontend, FrontendKey, FrontendKind, Protocol, Route,
    ServicePortName, SourceClass,
};
