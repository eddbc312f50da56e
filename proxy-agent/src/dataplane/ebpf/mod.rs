//! eBPF dataplane: socket-level load balancing programs, per-packet programs for
//! traffic from outside the node, and the maps they read.
mod batch;
pub mod dense;
mod entries;
#[cfg(test)]
mod fault_tests;
pub mod flows;
mod ids;
pub mod index;
pub mod kernel;
pub mod kernel_log;
pub mod loader;
mod local;
pub mod maglev;
pub mod nodeport;
pub mod observe;
pub mod render;
pub mod store;
pub mod terminate;
#[cfg(test)]
mod tests;
pub mod unserved;
mod writer;

use std::path::{Path, PathBuf};

use thiserror::Error;

pub use writer::MapWriter;

use crate::model::{DesiredState, LocalTraffic, Plan};

#[derive(Debug, Error)]
pub enum EbpfError {
    #[error("this binary was built without the eBPF object; build it with `cargo xtask build`")]
    NoObject,
    #[error("loading the eBPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program failed: {0}")]
    Program(#[from] aya::programs::ProgramError),
    #[error("link is not a bpf_link: {0}")]
    Link(#[from] aya::programs::links::LinkError),
    #[error("pinning a link failed: {0}")]
    Pin(#[from] aya::pin::PinError),
    #[error("eBPF map operation failed: {0}")]
    Map(#[from] aya::maps::MapError),
    #[error("the eBPF object has no program {0}")]
    MissingProgram(String),
    #[error("the eBPF object has no map {0}")]
    MissingMap(String),
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
    #[error("no free {0} id left")]
    Exhausted(&'static str),
    #[error("cannot list the node's interfaces: {0}")]
    Interfaces(#[source] crate::source::addresses::AddressError),
    #[error("loading the netfilter table for masquerade and reject failed: {0}")]
    Netfilter(#[source] crate::dataplane::nftables::NftError),
}

/// How large the eBPF dataplane's maps and tables are.
#[derive(Clone, Copy, Debug)]
pub struct Sizing {
    /// Entries of each Maglev table (a prime).
    pub maglev_table_size: u32,
    /// Entries of each family's service map (`--bpf-lb-map-max`): a slot per frontend
    /// and one per backend of it. The backend maps hold half as many, and the
    /// reverse-NAT maps as many (one id per frontend: 524 287 by default, for 100 000
    /// Services each a ClusterIP and a NodePort on 3 node addresses).
    pub lb_map_max: u32,
}

impl Default for Sizing {
    fn default() -> Self {
        Self {
            maglev_table_size: maglev::DEFAULT_SIZE,
            lb_map_max: proxy_common::MAX_SERVICE_ENTRIES,
        }
    }
}

impl Sizing {
    /// The smallest `--bpf-lb-map-max`: room for a frontend or so in every map.
    pub const MIN_LB_MAP: u32 = 16;

    /// Entries of each family's backend map.
    #[must_use]
    pub fn backends(&self) -> u32 {
        self.lb_map_max / 2
    }

    /// Entries of each family's reverse-NAT map.
    #[must_use]
    pub fn revnat(&self) -> u32 {
        self.lb_map_max / 2
    }
}

impl EbpfError {
    /// A short, stable name for metrics.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Exhausted(_) => "ids_exhausted",
            Self::Map(_) => "bpf_map",
            Self::Interfaces(_) => "interfaces",
            Self::Netfilter(_) => "netfilter",
            Self::Io(..) => "io",
            _ => "bpf_load",
        }
    }
}

/// The eBPF dataplane as the sync loop drives it.
pub struct EbpfDataplane {
    writer: MapWriter<kernel::KernelMaps>,
    /// What the maps held at start, until the first sync asks for it.
    restored: Option<DesiredState>,
    packets: Option<nodeport::PacketPrograms>,
    terminator: terminate::Terminator,
}

impl EbpfDataplane {
    /// Loads and attaches the programs and takes over the state pinned by a previous run.
    /// With `local` `None`, only the socket programs attach: nothing touches this
    /// network namespace's interfaces or netfilter (the bench, in-process).
    pub fn start(
        bpffs: &Path,
        cgroup_root: &Path,
        local: Option<&LocalTraffic>,
        sizing: Sizing,
    ) -> Result<Self, EbpfError> {
        let (maps, ebpf) = loader::load(bpffs, cgroup_root, sizing)?;
        let writer = MapWriter::restore_with(maps, sizing)?;
        // What the maps hold, read once: it fills the drop sets here and is the first
        // sync's `programmed()`.
        let restored = local.map(|_| writer.programmed());
        let packets = local
            .zip(restored.as_ref())
            .map(|(local, state)| {
                let unserved = unserved::Unserved::of(state);
                nodeport::PacketPrograms::start(ebpf, bpffs.to_owned(), local, unserved)
            })
            .transpose()?;
        if packets.is_some() {
            flows::spawn(bpffs.to_owned());
        }
        Ok(Self {
            writer,
            restored,
            packets,
            terminator: terminate::Terminator::spawn(bpffs.to_owned()),
        })
    }
}

impl super::Dataplane for EbpfDataplane {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn set_local(&mut self, local: &LocalTraffic) -> Result<(), super::DataplaneError> {
        if let Some(packets) = &mut self.packets {
            packets.set_local(local)?;
        }
        Ok(())
    }

    fn programmed(&mut self) -> Result<DesiredState, super::DataplaneError> {
        // Nothing is written between start and the first sync: what start read stands.
        Ok(self
            .restored
            .take()
            .unwrap_or_else(|| self.writer.programmed()))
    }

    fn apply(
        &mut self,
        plan: &Plan,
        _desired: &DesiredState,
    ) -> Result<super::Applied, super::DataplaneError> {
        // Node addresses come and go with interfaces; each sync follows them. A failure
        // there leaves the programs where they are and does not hold up the maps.
        let mut unfollowed = None;
        if let Some(packets) = &mut self.packets {
            if let Err(error) = packets.refresh() {
                tracing::warn!(%error, "cannot follow the node's interfaces; per-packet programs left as they are");
                unfollowed = Some(error.reason());
            }
        }
        // Once the maps change, what start read no longer stands.
        self.restored = None;
        // Pods' traffic to a frontend left without a local endpoint is dropped by the
        // netfilter table: its element goes in before the maps let such a connection
        // through untranslated, and comes out after they translate it again.
        let steps = self
            .packets
            .as_mut()
            .map(|packets| packets.follow(plan))
            .unwrap_or_default();
        let mut unloaded = Vec::new();
        if let Some(packets) = &mut self.packets {
            unloaded = packets.load_steps(&steps.added, &[]);
        }
        let mut written = self.writer.apply(plan)?;
        if let Some(packets) = &mut self.packets {
            unloaded.extend(packets.load_steps(&[], &steps.removed));
        }
        // Counted, not retried: the next address change or sync follows them again.
        if let Some(reason) = unfollowed {
            *written.reasons.entry(reason).or_default() += 1;
        }
        if !unloaded.is_empty() {
            *written.reasons.entry("netfilter").or_default() += unloaded.len();
            written.failed.extend(unloaded);
            written.failed.sort_unstable();
            written.failed.dedup();
        }
        // The plan's `before` is what the maps held (after a restart, what a previous
        // agent left there), so a backend removed while we were down counts too.
        let removed = terminate::removed_pairs(plan);
        if !removed.is_empty() {
            self.terminator.request(removed);
        }
        Ok(super::Applied {
            writes: written.writes,
            failed: written.failed,
            failure_reasons: written.reasons,
            full: false,
            tidy_later: false,
        })
    }

    fn ebpf_index(&self) -> Option<index::SharedIndex> {
        Some(self.writer.index())
    }

    fn sockets_destroyed(&self) -> Option<std::sync::Arc<std::sync::atomic::AtomicU64>> {
        Some(self.terminator.destroyed())
    }
}
