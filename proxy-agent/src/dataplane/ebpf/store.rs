//! The LB maps the agent writes as a key/value store: in memory (render, tests) or the
//! pinned kernel maps (`kernel.rs`), behind one trait so both take the same write sequence.
use std::collections::{BTreeMap, BTreeSet};

use proxy_common::{Backend4, RevNat4, Service4Key, ServiceValue, SourceRange4};

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
    fn read_all(&self) -> Result<MapContents, EbpfError> {
        Ok(self.clone())
    }
}
