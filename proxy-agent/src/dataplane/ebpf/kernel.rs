//! `MapStore` over the pinned kernel maps.
use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    HashMap, Map, MapData, PerCpuHashMap,
};
use proxy_common::{
    Backend4, MaglevTable, RevNat4, Service4Key, ServiceValue, SourceRange4, Stats, StatsKey,
};

use super::{
    store::{MapContents, MapStore, SourceRange},
    EbpfError,
};

pub struct KernelMaps {
    services: HashMap<MapData, Service4Key, ServiceValue>,
    backends: HashMap<MapData, u32, Backend4>,
    revnat: HashMap<MapData, u16, RevNat4>,
    source_ranges: Option<LpmTrie<MapData, SourceRange4, u8>>,
    maglev: Option<HashMap<MapData, u16, MaglevTable>>,
    stats: Option<PerCpuHashMap<MapData, StatsKey, Stats>>,
}

impl KernelMaps {
    pub fn new(
        services: Map,
        backends: Map,
        revnat: Map,
        source_ranges: Option<Map>,
        maglev: Option<Map>,
        stats: Option<Map>,
    ) -> Result<Self, EbpfError> {
        Ok(Self {
            services: HashMap::try_from(services)?,
            backends: HashMap::try_from(backends)?,
            revnat: HashMap::try_from(revnat)?,
            source_ranges: source_ranges.map(LpmTrie::try_from).transpose()?,
            maglev: maglev.map(HashMap::try_from).transpose()?,
            stats: stats.map(PerCpuHashMap::try_from).transpose()?,
        })
    }

    /// Opens the maps a running (or exited) agent pinned, for `dump` and tests.
    pub fn from_pins(dir: &std::path::Path) -> Result<Self, EbpfError> {
        let open = |name: &str| -> Result<Map, EbpfError> {
            let data = MapData::from_pin(dir.join(name))?;
            Ok(Map::HashMap(data))
        };
        let stats = MapData::from_pin(dir.join(proxy_common::MAP_STATS))
            .ok()
            .map(Map::PerCpuLruHashMap);
        let source_ranges = MapData::from_pin(dir.join(proxy_common::MAP_SOURCE_RANGES4))
            .ok()
            .map(Map::LpmTrie);
        let maglev = open(proxy_common::MAP_MAGLEV4).ok();
        Self::new(
            open(proxy_common::MAP_SERVICES4)?,
            open(proxy_common::MAP_BACKENDS4)?,
            open(proxy_common::MAP_REVNAT4)?,
            source_ranges,
            maglev,
            stats,
        )
    }
}

/// A missing key on delete is not an error: the goal (no entry) holds.
fn ignore_missing(result: Result<(), aya::maps::MapError>) -> Result<(), EbpfError> {
    match result {
        Err(aya::maps::MapError::KeyNotFound) | Ok(()) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

impl MapStore for KernelMaps {
    fn put_backend(&mut self, id: u32, backend: &Backend4) -> Result<(), EbpfError> {
        Ok(self.backends.insert(id, backend, 0)?)
    }
    fn del_backend(&mut self, id: u32) -> Result<(), EbpfError> {
        ignore_missing(self.backends.remove(&id))
    }
    fn put_service(&mut self, key: &Service4Key, value: &ServiceValue) -> Result<(), EbpfError> {
        Ok(self.services.insert(key, value, 0)?)
    }
    fn del_service(&mut self, key: &Service4Key) -> Result<(), EbpfError> {
        ignore_missing(self.services.remove(key))
    }
    fn put_revnat(&mut self, index: u16, revnat: &RevNat4) -> Result<(), EbpfError> {
        Ok(self.revnat.insert(index, revnat, 0)?)
    }
    fn del_revnat(&mut self, index: u16) -> Result<(), EbpfError> {
        ignore_missing(self.revnat.remove(&index))
    }
    fn put_source_range(&mut self, range: &SourceRange) -> Result<(), EbpfError> {
        match &mut self.source_ranges {
            Some(trie) => Ok(trie.insert(&Key::new(range.0, range.1), 1, 0)?),
            None => Ok(()),
        }
    }
    fn del_source_range(&mut self, range: &SourceRange) -> Result<(), EbpfError> {
        match &mut self.source_ranges {
            Some(trie) => ignore_missing(trie.remove(&Key::new(range.0, range.1))),
            None => Ok(()),
        }
    }
    fn put_maglev(&mut self, id: u16, table: &MaglevTable) -> Result<(), EbpfError> {
        match &mut self.maglev {
            Some(map) => Ok(map.insert(id, table, 0)?),
            None => Ok(()),
        }
    }
    fn del_maglev(&mut self, id: u16) -> Result<(), EbpfError> {
        match &mut self.maglev {
            Some(map) => ignore_missing(map.remove(&id)),
            None => Ok(()),
        }
    }
    fn forget_stats(&mut self, revnat: &[u16], backends: &[u32]) -> Result<(), EbpfError> {
        let Some(stats) = &mut self.stats else {
            return Ok(());
        };
        let revnat: std::collections::HashSet<u16> = revnat.iter().copied().collect();
        let backends: std::collections::HashSet<u32> = backends.iter().copied().collect();
        let doomed: Vec<StatsKey> = stats
            .keys()
            .filter_map(Result::ok)
            .filter(|key| {
                revnat.contains(&key.rev_nat_index)
                    || (key.carries_backend() && backends.contains(&key.backend_id))
            })
            .collect();
        for key in &doomed {
            ignore_missing(stats.remove(key))?;
        }
        Ok(())
    }

    fn read_all(&self) -> Result<MapContents, EbpfError> {
        Ok(MapContents {
            services: self.services.iter().collect::<Result<_, _>>()?,
            backends: self.backends.iter().collect::<Result<_, _>>()?,
            revnat: self.revnat.iter().collect::<Result<_, _>>()?,
            source_ranges: match &self.source_ranges {
                Some(trie) => trie
                    .keys()
                    .map(|key| key.map(|k| (k.prefix_len(), k.data())))
                    .collect::<Result<_, _>>()?,
                None => std::collections::BTreeSet::new(),
            },
            maglev: match &self.maglev {
                Some(map) => map
                    .iter()
                    .map(|entry| {
                        entry.map(|(id, table)| (id, super::store::maglev_summary(&table)))
                    })
                    .collect::<Result<_, _>>()?,
                None => std::collections::BTreeMap::new(),
            },
        })
    }
}
