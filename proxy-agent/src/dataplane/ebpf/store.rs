//! The LB maps the agent writes as a key/value store: in memory (render, tests) or the
//! pinned kernel maps (`kernel.rs`), behind one trait so both take the same write sequence.
use std::collections::{BTreeMap, BTreeSet};

use proxy_common::{MaglevTable, ServiceValue};

pub use super::entries::{BackendValue, RevNatValue, SlotKey, SourceRange};
use super::EbpfError;

pub trait MapStore {
    fn put_backend(&mut self, id: u32, backend: &BackendValue) -> Result<(), EbpfError>;
    /// Deletes a backend (`backend` is the value it holds: it names the family's map).
    fn del_backend(&mut self, id: u32, backend: &BackendValue) -> Result<(), EbpfError>;
    fn put_service(&mut self, key: &SlotKey, value: &ServiceValue) -> Result<(), EbpfError>;
    fn del_service(&mut self, key: &SlotKey) -> Result<(), EbpfError>;
    fn put_revnat(&mut self, index: u32, revnat: &RevNatValue) -> Result<(), EbpfError>;
    fn del_revnat(&mut self, index: u32, revnat: &RevNatValue) -> Result<(), EbpfError>;
    /// A `loadBalancerSourceRanges` prefix.
    fn put_source_range(&mut self, range: &SourceRange) -> Result<(), EbpfError>;
    fn del_source_range(&mut self, range: &SourceRange) -> Result<(), EbpfError>;
    /// A Maglev table, replaced whole.
    fn put_maglev(&mut self, id: u16, table: &MaglevTable) -> Result<(), EbpfError>;
    fn del_maglev(&mut self, id: u16) -> Result<(), EbpfError>;
    /// Writes what the store has held back (batched puts); the writer calls it at the
    /// end of every plan.
    fn flush(&mut self) -> Result<(), EbpfError> {
        Ok(())
    }
    /// Everything the maps hold now, for restoring ids after a restart.
    fn read_all(&self) -> Result<MapContents, EbpfError>;
    /// Drops the datapath counters of freed reverse-NAT indexes and backend ids.
    fn forget_stats(&mut self, _revnat: &[u32], _backends: &[u32]) -> Result<(), EbpfError> {
        Ok(())
    }
}

/// A copy of the maps' content; also the in-memory store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    pub services: BTreeMap<SlotKey, ServiceValue>,
    pub backends: BTreeMap<u32, BackendValue>,
    pub revnat: BTreeMap<u32, RevNatValue>,
    pub source_ranges: BTreeSet<SourceRange>,
    /// Maglev tables: their size and the backend ids they hold (sorted, unique).
    pub maglev: BTreeMap<u16, (u32, Vec<u32>)>,
}

/// The size and sorted distinct backend ids of a Maglev table.
#[must_use]
pub fn maglev_summary(table: &MaglevTable) -> (u32, Vec<u32>) {
    let size = usize::try_from(table.size)
        .unwrap_or(0)
        .min(table.backend_ids.len());
    let mut ids = table.backend_ids[..size].to_vec();
    ids.sort_unstable();
    ids.dedup();
    (table.size, ids)
}

impl MapStore for MapContents {
    fn put_backend(&mut self, id: u32, backend: &BackendValue) -> Result<(), EbpfError> {
        self.backends.insert(id, *backend);
        Ok(())
    }
    fn del_backend(&mut self, id: u32, _backend: &BackendValue) -> Result<(), EbpfError> {
        self.backends.remove(&id);
        Ok(())
    }
    fn put_service(&mut self, key: &SlotKey, value: &ServiceValue) -> Result<(), EbpfError> {
        self.services.insert(*key, *value);
        Ok(())
    }
    fn del_service(&mut self, key: &SlotKey) -> Result<(), EbpfError> {
        self.services.remove(key);
        Ok(())
    }
    fn put_revnat(&mut self, index: u32, revnat: &RevNatValue) -> Result<(), EbpfError> {
        self.revnat.insert(index, *revnat);
        Ok(())
    }
    fn del_revnat(&mut self, index: u32, _revnat: &RevNatValue) -> Result<(), EbpfError> {
        self.revnat.remove(&index);
        Ok(())
    }
    fn put_source_range(&mut self, range: &SourceRange) -> Result<(), EbpfError> {
        self.source_ranges.insert(*range);
        Ok(())
    }
    fn del_source_range(&mut self, range: &SourceRange) -> Result<(), EbpfError> {
        self.source_ranges.remove(range);
        Ok(())
    }
    fn put_maglev(&mut self, id: u16, table: &MaglevTable) -> Result<(), EbpfError> {
        self.maglev.insert(id, maglev_summary(table));
        Ok(())
    }
    fn del_maglev(&mut self, id: u16) -> Result<(), EbpfError> {
        self.maglev.remove(&id);
        Ok(())
    }
    fn read_all(&self) -> Result<MapContents, EbpfError> {
        Ok(self.clone())
    }
}
