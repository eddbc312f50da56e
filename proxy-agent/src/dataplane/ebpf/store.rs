//! The LB maps the agent writes as a key/value store: in memory (render, tests) or the
//! pinned kernel maps (`kernel.rs`), behind one trait so both take the same write sequence.
use std::collections::{BTreeMap, BTreeSet};

use proxy_common::{Backend4, MaglevTable, RevNat4, Service4Key, ServiceValue, SourceRange4};

use super::EbpfError;

pub trait MapStore {
    fn put_backend(&mut self, id: u32, backend: &Backend4) -> Result<(), EbpfError>;
    fn del_backend(&mut self, id: u32) -> Result<(), EbpfError>;
    fn put_service(&mut self, key: &Service4Key, value: &ServiceValue) -> Result<(), EbpfError>;
    fn del_service(&mut self, key: &Service4Key) -> Result<(), EbpfError>;
    fn put_revnat(&mut self, index: u16, revnat: &RevNat4) -> Result<(), EbpfError>;
    fn del_revnat(&mut self, index: u16) -> Result<(), EbpfError>;
    /// A `loadBalancerSourceRanges` prefix (`prefix_len` counts the key's first 32 bits).
    fn put_source_range(&mut self, range: &SourceRange) -> Result<(), EbpfError>;
    fn del_source_range(&mut self, range: &SourceRange) -> Result<(), EbpfError>;
    /// A Maglev table, replaced whole.
    fn put_maglev(&mut self, id: u16, table: &MaglevTable) -> Result<(), EbpfError>;
    fn del_maglev(&mut self, id: u16) -> Result<(), EbpfError>;
    /// Everything the maps hold now, for restoring ids after a restart.
    fn read_all(&self) -> Result<MapContents, EbpfError>;
    /// Drops the datapath counters of freed reverse-NAT indexes and backend ids.
    fn forget_stats(&mut self, _revnat: &[u16], _backends: &[u32]) -> Result<(), EbpfError> {
        Ok(())
    }
}

/// An `LB4_SOURCE_RANGES` key: (prefix length, data).
pub type SourceRange = (u32, SourceRange4);

/// A copy of the maps' content; also the in-memory store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    pub services: BTreeMap<Service4Key, ServiceValue>,
    pub backends: BTreeMap<u32, Backend4>,
    pub revnat: BTreeMap<u16, RevNat4>,
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
    fn put_backend(&mut self, id: u32, backend: &Backend4) -> Result<(), EbpfError> {
        self.backends.insert(id, *backend);
        Ok(())
    }
    fn del_backend(&mut self, id: u32) -> Result<(), EbpfError> {
        self.backends.remove(&id);
        Ok(())
    }
    fn put_service(&mut self, key: &Service4Key, value: &ServiceValue) -> Result<(), EbpfError> {
        self.services.insert(*key, *value);
        Ok(())
    }
    fn del_service(&mut self, key: &Service4Key) -> Result<(), EbpfError> {
        self.services.remove(key);
        Ok(())
    }
    fn put_revnat(&mut self, index: u16, revnat: &RevNat4) -> Result<(), EbpfError> {
        self.revnat.insert(index, *revnat);
        Ok(())
    }
    fn del_revnat(&mut self, index: u16) -> Result<(), EbpfError> {
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
