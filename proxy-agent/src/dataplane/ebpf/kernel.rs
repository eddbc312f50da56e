//! `MapStore` over the pinned kernel maps, each entry to its family's map; runs of puts
//! into one map go to the kernel as one batch (`batch.rs`), in the writer's order.
use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    HashMap, Map, MapData, PerCpuHashMap,
};
use proxy_common::{
    Backend4, Backend6, MaglevTable, RevNat4, RevNat6, Service4Key, Service6Key, ServiceValue,
    SourceRange4, SourceRange6, Stats, StatsKey,
};

use super::{
    batch::Buffered,
    store::{BackendValue, MapContents, MapStore, RevNatValue, SlotKey, SourceRange},
    EbpfError,
};

/// The LB maps of one family.
pub struct FamilyMaps<K, B, R> {
    services: HashMap<MapData, K, ServiceValue>,
    backends: HashMap<MapData, u32, B>,
    revnat: HashMap<MapData, u16, R>,
}

impl<K: aya::Pod, B: aya::Pod, R: aya::Pod> FamilyMaps<K, B, R> {
    /// The services, backends and reverse-NAT maps, in that order.
    pub fn new([services, backends, revnat]: [Map; 3]) -> Result<Self, EbpfError> {
        Ok(Self {
            services: HashMap::try_from(services)?,
            backends: HashMap::try_from(backends)?,
            revnat: HashMap::try_from(revnat)?,
        })
    }
}

/// Which map the waiting puts are for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Services4,
    Services6,
    Backends4,
    Backends6,
    RevNat4,
    RevNat6,
}

/// Puts not yet written. Only one map's buffer fills at a time, so the kernel sees the
/// writer's order (a backend before the slot naming it, slots before slot 0).
#[derive(Default)]
struct Pending {
    target: Option<Target>,
    services4: Buffered<Service4Key, ServiceValue>,
    services6: Buffered<Service6Key, ServiceValue>,
    backends4: Buffered<u32, Backend4>,
    backends6: Buffered<u32, Backend6>,
    revnat4: Buffered<u16, RevNat4>,
    revnat6: Buffered<u16, RevNat6>,
}

pub struct KernelMaps {
    v4: FamilyMaps<Service4Key, Backend4, RevNat4>,
    v6: FamilyMaps<Service6Key, Backend6, RevNat6>,
    pending: Pending,
    source_ranges: Option<LpmTrie<MapData, SourceRange4, u8>>,
    source_ranges6: Option<LpmTrie<MapData, SourceRange6, u8>>,
    maglev: Option<HashMap<MapData, u16, MaglevTable>>,
    stats: Option<PerCpuHashMap<MapData, StatsKey, Stats>>,
}

impl KernelMaps {
    pub fn new(
        v4: [Map; 3],
        v6: [Map; 3],
        source_ranges: [Option<Map>; 2],
        maglev: Option<Map>,
        stats: Option<Map>,
    ) -> Result<Self, EbpfError> {
        let [v4_ranges, v6_ranges] = source_ranges;
        Ok(Self {
            v4: FamilyMaps::new(v4)?,
            v6: FamilyMaps::new(v6)?,
            pending: Pending::default(),
            source_ranges: v4_ranges.map(LpmTrie::try_from).transpose()?,
            source_ranges6: v6_ranges.map(LpmTrie::try_from).transpose()?,
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
        let trie = |name: &str| MapData::from_pin(dir.join(name)).ok().map(Map::LpmTrie);
        let source_ranges = [
            trie(proxy_common::MAP_SOURCE_RANGES4),
            trie(proxy_common::MAP_SOURCE_RANGES6),
        ];
        let maglev = open(proxy_common::MAP_MAGLEV4).ok();
        Self::new(
            [
                open(proxy_common::MAP_SERVICES4)?,
                open(proxy_common::MAP_BACKENDS4)?,
                open(proxy_common::MAP_REVNAT4)?,
            ],
            [
                open(proxy_common::MAP_SERVICES6)?,
                open(proxy_common::MAP_BACKENDS6)?,
                open(proxy_common::MAP_REVNAT6)?,
            ],
            source_ranges,
            maglev,
            stats,
        )
    }
}

/// A missing key on delete is not an error: the goal (no entry) holds. (aya reports
/// it as the syscall's ENOENT.)
fn ignore_missing(result: Result<(), aya::maps::MapError>) -> Result<(), EbpfError> {
    match result {
        Err(aya::maps::MapError::KeyNotFound) | Ok(()) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(nix::libc::ENOENT) =>
        {
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

impl KernelMaps {
    /// Makes `target` the map puts wait for, writing another map's waiting puts first.
    fn stage(&mut self, target: Target) -> Result<&mut Pending, EbpfError> {
        if self.pending.target != Some(target) {
            self.write_pending()?;
            self.pending.target = Some(target);
        }
        Ok(&mut self.pending)
    }

    fn write_pending(&mut self) -> Result<(), EbpfError> {
        let p = &mut self.pending;
        match p.target.take() {
            None => Ok(()),
            Some(Target::Services4) => Ok(p.services4.flush(&mut self.v4.services)?),
            Some(Target::Services6) => Ok(p.services6.flush(&mut self.v6.services)?),
            Some(Target::Backends4) => Ok(p.backends4.flush(&mut self.v4.backends)?),
            Some(Target::Backends6) => Ok(p.backends6.flush(&mut self.v6.backends)?),
            Some(Target::RevNat4) => Ok(p.revnat4.flush(&mut self.v4.revnat)?),
            Some(Target::RevNat6) => Ok(p.revnat6.flush(&mut self.v6.revnat)?),
        }
    }
}

impl MapStore for KernelMaps {
    fn flush(&mut self) -> Result<(), EbpfError> {
        self.write_pending()
    }
    fn put_backend(&mut self, id: u32, backend: &BackendValue) -> Result<(), EbpfError> {
        match backend {
            BackendValue::V4(b) => self.stage(Target::Backends4)?.backends4.push(id, *b),
            BackendValue::V6(b) => self.stage(Target::Backends6)?.backends6.push(id, *b),
        }
        Ok(())
    }
    fn del_backend(&mut self, id: u32, backend: &BackendValue) -> Result<(), EbpfError> {
        self.write_pending()?;
        match backend {
            BackendValue::V4(_) => ignore_missing(self.v4.backends.remove(&id)),
            BackendValue::V6(_) => ignore_missing(self.v6.backends.remove(&id)),
        }
    }
    fn put_service(&mut self, key: &SlotKey, value: &ServiceValue) -> Result<(), EbpfError> {
        match key {
            SlotKey::V4(k) => self.stage(Target::Services4)?.services4.push(*k, *value),
            SlotKey::V6(k) => self.stage(Target::Services6)?.services6.push(*k, *value),
        }
        Ok(())
    }
    fn del_service(&mut self, key: &SlotKey) -> Result<(), EbpfError> {
        self.write_pending()?;
        match key {
            SlotKey::V4(k) => ignore_missing(self.v4.services.remove(k)),
            SlotKey::V6(k) => ignore_missing(self.v6.services.remove(k)),
        }
    }
    fn put_revnat(&mut self, index: u16, revnat: &RevNatValue) -> Result<(), EbpfError> {
        match revnat {
            RevNatValue::V4(r) => self.stage(Target::RevNat4)?.revnat4.push(index, *r),
            RevNatValue::V6(r) => self.stage(Target::RevNat6)?.revnat6.push(index, *r),
        }
        Ok(())
    }
    fn del_revnat(&mut self, index: u16, revnat: &RevNatValue) -> Result<(), EbpfError> {
        self.write_pending()?;
        match revnat {
            RevNatValue::V4(_) => ignore_missing(self.v4.revnat.remove(&index)),
            RevNatValue::V6(_) => ignore_missing(self.v6.revnat.remove(&index)),
        }
    }
    fn put_source_range(&mut self, range: &SourceRange) -> Result<(), EbpfError> {
        self.write_pending()?;
        match (range, &mut self.source_ranges, &mut self.source_ranges6) {
            (SourceRange::V4(len, data), Some(trie), _) => {
                Ok(trie.insert(&Key::new(*len, *data), 1, 0)?)
            }
            (SourceRange::V6(len, data), _, Some(trie)) => {
                Ok(trie.insert(&Key::new(*len, *data), 1, 0)?)
            }
            _ => Ok(()),
        }
    }
    fn del_source_range(&mut self, range: &SourceRange) -> Result<(), EbpfError> {
        self.write_pending()?;
        match (range, &mut self.source_ranges, &mut self.source_ranges6) {
            (SourceRange::V4(len, data), Some(trie), _) => {
                ignore_missing(trie.remove(&Key::new(*len, *data)))
            }
            (SourceRange::V6(len, data), _, Some(trie)) => {
                ignore_missing(trie.remove(&Key::new(*len, *data)))
            }
            _ => Ok(()),
        }
    }
    fn put_maglev(&mut self, id: u16, table: &MaglevTable) -> Result<(), EbpfError> {
        self.write_pending()?;
        match &mut self.maglev {
            Some(map) => Ok(map.insert(id, table, 0)?),
            None => Ok(()),
        }
    }
    fn del_maglev(&mut self, id: u16) -> Result<(), EbpfError> {
        self.write_pending()?;
        match &mut self.maglev {
            Some(map) => ignore_missing(map.remove(&id)),
            None => Ok(()),
        }
    }
    fn forget_stats(&mut self, revnat: &[u16], backends: &[u32]) -> Result<(), EbpfError> {
        self.write_pending()?;
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
            services: (self.v4.services.iter())
                .map(|e| e.map(|(k, v)| (SlotKey::V4(k), v)))
                .chain((self.v6.services.iter()).map(|e| e.map(|(k, v)| (SlotKey::V6(k), v))))
                .collect::<Result<_, _>>()?,
            backends: (self.v4.backends.iter())
                .map(|e| e.map(|(id, b)| (id, BackendValue::V4(b))))
                .chain(
                    (self.v6.backends.iter()).map(|e| e.map(|(id, b)| (id, BackendValue::V6(b)))),
                )
                .collect::<Result<_, _>>()?,
            revnat: (self.v4.revnat.iter())
                .map(|e| e.map(|(i, r)| (i, RevNatValue::V4(r))))
                .chain((self.v6.revnat.iter()).map(|e| e.map(|(i, r)| (i, RevNatValue::V6(r)))))
                .collect::<Result<_, _>>()?,
            source_ranges: (self.source_ranges.iter())
                .flat_map(LpmTrie::keys)
                .map(|key| key.map(|k| SourceRange::V4(k.prefix_len(), k.data())))
                .chain(
                    (self.source_ranges6.iter())
                        .flat_map(LpmTrie::keys)
                        .map(|key| key.map(|k| SourceRange::V6(k.prefix_len(), k.data()))),
                )
                .collect::<Result<_, _>>()?,
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
