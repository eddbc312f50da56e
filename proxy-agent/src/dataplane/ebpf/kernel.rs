//! `MapStore` over the pinned kernel maps, each entry to its family's map; puts wait per
//! map and go to the kernel as batches (`batch.rs`) in dependency order, so a full sync
//! is a few dozen syscalls rather than three per Service.
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};

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
use crate::fault::{self, Point};

/// The LB maps of one family.
pub struct FamilyMaps<K, B, R> {
    services: HashMap<MapData, K, ServiceValue>,
    backends: HashMap<MapData, u32, B>,
    revnat: HashMap<MapData, u32, R>,
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

/// Puts not yet written, one buffer per map. What a slot names (its backend, its
/// reverse-NAT entry) is never written after it: buffers are written reverse NAT, then
/// backends, then services, each in the writer's order, which keeps slots before the
/// slot 0 that names them. A backend or reverse-NAT entry written earlier than the
/// writer asked is one nothing names yet (ids are fresh; freed ones were deleted by a
/// write that went at once, after what waited). Deletes, Maglev tables and source
/// ranges go at once, after what waits.
#[derive(Default)]
struct Pending {
    services4: Buffered<Service4Key, ServiceValue>,
    services6: Buffered<Service6Key, ServiceValue>,
    backends4: Buffered<u32, Backend4>,
    backends6: Buffered<u32, Backend6>,
    revnat4: Buffered<u32, RevNat4>,
    revnat6: Buffered<u32, RevNat6>,
    /// Puts waiting in all buffers.
    count: usize,
    /// A put among them the kernel is to refuse (an injected fault, `fault.rs`).
    faulted: bool,
}

/// Puts waiting before they are written (a bound on the buffers' memory: 16 384 puts are
/// about 400 KiB, and a few dozen syscalls for 660 000 entries).
const PENDING_MAX: usize = 16 * 1024;

/// The LB maps of both families, shared with the thread that writes full buffers.
struct LbMaps {
    v4: FamilyMaps<Service4Key, Backend4, RevNat4>,
    v6: FamilyMaps<Service6Key, Backend6, RevNat6>,
}

impl LbMaps {
    /// The maps, whoever held them last (a panic while writing leaves them usable).
    fn lock(lb: &Mutex<Self>) -> MutexGuard<'_, Self> {
        lb.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes `p` in dependency order, emptying it.
    fn write(&mut self, p: &mut Pending) -> Result<(), aya::maps::MapError> {
        p.count = 0;
        if std::mem::take(&mut p.faulted) {
            *p = Pending::default();
            return Err(aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_update_batch",
                io_error: fault::injected(Point::BpfMap),
            }));
        }
        p.revnat4
            .flush(&mut self.v4.revnat)
            .and_then(|()| p.revnat6.flush(&mut self.v6.revnat))
            .and_then(|()| p.backends4.flush(&mut self.v4.backends))
            .and_then(|()| p.backends6.flush(&mut self.v6.backends))
            .and_then(|()| p.services4.flush(&mut self.v4.services))
            .and_then(|()| p.services6.flush(&mut self.v6.services))
    }
}

/// A thread that writes full buffers while the writer fills the next: at 30 000
/// Services a full sync spends half a second in the kernel's hash-map inserts beside
/// the writer's own work. It lives while one apply hands it buffers; the first error
/// stops it, and what it had not written yet is dropped.
struct Flusher {
    send: mpsc::SyncSender<Pending>,
    done: std::thread::JoinHandle<Result<(), aya::maps::MapError>>,
}

pub struct KernelMaps {
    lb: Arc<Mutex<LbMaps>>,
    pending: Pending,
    flusher: Option<Flusher>,
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
            lb: Arc::new(Mutex::new(LbMaps {
                v4: FamilyMaps::new(v4)?,
                v6: FamilyMaps::new(v6)?,
            })),
            pending: Pending::default(),
            flusher: None,
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
    fn lb(&self) -> MutexGuard<'_, LbMaps> {
        LbMaps::lock(&self.lb)
    }

    /// The buffers, after one more put; full ones go to the flusher.
    fn stage(&mut self) -> Result<&mut Pending, EbpfError> {
        if self.pending.count >= PENDING_MAX {
            self.hand_off()?;
        }
        self.pending.count += 1;
        Ok(&mut self.pending)
    }

    /// Gives the full buffers to the flusher (started if need be; written here if it
    /// cannot be).
    fn hand_off(&mut self) -> Result<(), EbpfError> {
        let mut full = std::mem::take(&mut self.pending);
        if self.flusher.is_none() {
            let lb = self.lb.clone();
            // One buffer waits while one is written: memory stays bounded.
            let (send, receive) = mpsc::sync_channel::<Pending>(1);
            let spawned = std::thread::Builder::new()
                .name("bpf-write".to_owned())
                .spawn(move || {
                    for mut p in receive {
                        LbMaps::lock(&lb).write(&mut p)?;
                    }
                    Ok(())
                });
            match spawned {
                Ok(done) => self.flusher = Some(Flusher { send, done }),
                Err(_) => return Ok(self.lb().write(&mut full)?),
            }
        }
        let stopped = self
            .flusher
            .as_ref()
            .is_some_and(|f| f.send.send(full).is_err());
        if stopped {
            // It stopped at an error: that is the one to report.
            return self.join_flusher();
        }
        Ok(())
    }

    /// Waits for the flusher to write what it was given; its error, if any.
    fn join_flusher(&mut self) -> Result<(), EbpfError> {
        let Some(Flusher { send, done }) = self.flusher.take() else {
            return Ok(());
        };
        drop(send);
        match done.join() {
            Ok(result) => Ok(result?),
            Err(_) => Err(EbpfError::Io(
                "bpf-write thread".into(),
                std::io::Error::other("panicked while writing the maps"),
            )),
        }
    }

    /// Writes everything that waits, the flusher's buffers first. After a failure the
    /// rest are dropped, not written out of order (the writer then treats this apply's
    /// frontends as unsure and writes them again).
    fn write_pending(&mut self) -> Result<(), EbpfError> {
        if let Err(error) = self.join_flusher() {
            self.pending = Pending::default();
            return Err(error);
        }
        if self.pending.count == 0 {
            return Ok(());
        }
        let mut p = std::mem::take(&mut self.pending);
        Ok(self.lb().write(&mut p)?)
    }
}

impl MapStore for KernelMaps {
    fn flush(&mut self) -> Result<(), EbpfError> {
        self.write_pending()
    }
    fn put_backend(&mut self, id: u32, backend: &BackendValue) -> Result<(), EbpfError> {
        match backend {
            BackendValue::V4(b) => self.stage()?.backends4.push(id, *b),
            BackendValue::V6(b) => self.stage()?.backends6.push(id, *b),
        }
        Ok(())
    }
    fn del_backend(&mut self, id: u32, backend: &BackendValue) -> Result<(), EbpfError> {
        self.write_pending()?;
        match backend {
            BackendValue::V4(_) => ignore_missing(self.lb().v4.backends.remove(&id)),
            BackendValue::V6(_) => ignore_missing(self.lb().v6.backends.remove(&id)),
        }
    }
    fn put_service(&mut self, key: &SlotKey, value: &ServiceValue) -> Result<(), EbpfError> {
        if fault::fails_for(Point::BpfMap, key.ip()) {
            self.pending.faulted = true;
        }
        match key {
            SlotKey::V4(k) => self.stage()?.services4.push(*k, *value),
            SlotKey::V6(k) => self.stage()?.services6.push(*k, *value),
        }
        Ok(())
    }
    fn del_service(&mut self, key: &SlotKey) -> Result<(), EbpfError> {
        self.write_pending()?;
        match key {
            SlotKey::V4(k) => ignore_missing(self.lb().v4.services.remove(k)),
            SlotKey::V6(k) => ignore_missing(self.lb().v6.services.remove(k)),
        }
    }
    fn put_revnat(&mut self, index: u32, revnat: &RevNatValue) -> Result<(), EbpfError> {
        match revnat {
            RevNatValue::V4(r) => self.stage()?.revnat4.push(index, *r),
            RevNatValue::V6(r) => self.stage()?.revnat6.push(index, *r),
        }
        Ok(())
    }
    fn del_revnat(&mut self, index: u32, revnat: &RevNatValue) -> Result<(), EbpfError> {
        self.write_pending()?;
        match revnat {
            RevNatValue::V4(_) => ignore_missing(self.lb().v4.revnat.remove(&index)),
            RevNatValue::V6(_) => ignore_missing(self.lb().v6.revnat.remove(&index)),
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
    fn forget_stats(&mut self, revnat: &[u32], backends: &[u32]) -> Result<(), EbpfError> {
        self.write_pending()?;
        let Some(stats) = &mut self.stats else {
            return Ok(());
        };
        let revnat: std::collections::HashSet<u32> = revnat.iter().copied().collect();
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
        let lb = self.lb();
        Ok(MapContents {
            services: (lb.v4.services.iter())
                .map(|e| e.map(|(k, v)| (SlotKey::V4(k), v)))
                .chain((lb.v6.services.iter()).map(|e| e.map(|(k, v)| (SlotKey::V6(k), v))))
                .collect::<Result<_, _>>()?,
            backends: (lb.v4.backends.iter())
                .map(|e| e.map(|(id, b)| (id, BackendValue::V4(b))))
                .chain((lb.v6.backends.iter()).map(|e| e.map(|(id, b)| (id, BackendValue::V6(b)))))
                .collect::<Result<_, _>>()?,
            revnat: (lb.v4.revnat.iter())
                .map(|e| e.map(|(i, r)| (i, RevNatValue::V4(r))))
                .chain((lb.v6.revnat.iter()).map(|e| e.map(|(i, r)| (i, RevNatValue::V6(r)))))
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
