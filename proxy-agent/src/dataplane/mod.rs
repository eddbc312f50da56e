//! Dataplane backends: idempotent reconcilers that program a plan into the kernel.
pub mod conntrack;
pub mod ebpf;
pub mod nftables;
pub mod system;

use thiserror::Error;

use crate::model::{DesiredState, LocalTraffic, Plan};

#[derive(Debug, Error)]
pub enum DataplaneError {
    #[error(transparent)]
    Ebpf(#[from] ebpf::EbpfError),
    #[error(transparent)]
    Nftables(#[from] nftables::NftError),
}

impl DataplaneError {
    /// A short, stable name for metrics.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Ebpf(error) => error.reason(),
            Self::Nftables(error) => error.reason(),
        }
    }
}

/// What one `apply` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Kernel operations (map writes, nftables statements).
    pub writes: usize,
    /// Whether everything was rewritten rather than only what changed.
    pub full: bool,
    /// Frontends that could not be programmed: skipped (the others were), and left as
    /// they were for the next sync to try again.
    pub failed: Vec<crate::model::FrontendKey>,
    /// Why they failed: how many by reason (see [`DataplaneError::reason`]); also any
    /// failure besides frontends (the node's interfaces not followed), counted once.
    pub failure_reasons: std::collections::BTreeMap<&'static str, usize>,
    /// Whether this sync left state for a later one to remove (nftables' chains it
    /// flushed): the sync loop runs again shortly even if nothing changes.
    pub tidy_later: bool,
}

/// One backend as the sync loop sees it.
pub trait Dataplane: Send {
    /// What `--dataplane auto` picked, for logs, `/healthz` and metrics.
    fn name(&self) -> &'static str;
    /// What the kernel holds now; a restart or a failed sync starts from this.
    fn programmed(&mut self) -> Result<DesiredState, DataplaneError>;
    /// Follows how local pod traffic is told (`--detect-local-mode`, resolved against
    /// the node: it changes with the Node's pod CIDRs). The sync loop calls it before
    /// its first `apply` and whenever it changes; it takes effect from the next `apply`.
    fn set_local(&mut self, local: &LocalTraffic) -> Result<(), DataplaneError> {
        let _ = local;
        Ok(())
    }
    /// Programs the plan; on error the caller re-reads `programmed` and retries.
    /// `desired` is the whole state the plan leads to, for backends that compare whole
    /// renderings rather than frontends.
    fn apply(&mut self, plan: &Plan, desired: &DesiredState) -> Result<Applied, DataplaneError>;
    /// For the eBPF dataplane: what its map ids stand for (metrics name counters by it).
    fn ebpf_index(&self) -> Option<ebpf::index::SharedIndex> {
        None
    }
    /// For the eBPF dataplane: how many connected UDP sockets sent to removed backends
    /// it has destroyed.
    fn sockets_destroyed(&self) -> Option<std::sync::Arc<std::sync::atomic::AtomicU64>> {
        None
    }
}
