//! Pure model: snapshot of the cluster + this node → desired dataplane state, and the
//! plan between two states. No I/O; imports neither kube nor aya.
mod build;
mod diff;
mod snapshot;
mod types;
pub mod validate;

pub use build::{build, object_key, LABEL_SERVICE_NAME, LABEL_SERVICE_PROXY_NAME};
pub use diff::{diff, Plan};
pub use snapshot::{NodeInfo, ObjectKey, Snapshot};
pub use types::{Backend, DesiredState, Frontend, FrontendKey, Protocol, ServicePortName};
