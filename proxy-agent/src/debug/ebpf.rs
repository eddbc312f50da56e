//! `dump` for the eBPF dataplane: the pinned LB maps, the per-CPU decision counters
//! and the socket LB's per-socket memory, read straight from bpffs.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use anyhow::{Context, Result};
use proxy_common::{
    AffinityKey, AffinityValue, Stats, StatsKey, MAP_AFFINITY4, SERVICE_FLAG_AFFINITY,
};

use super::{
    rows::{AffinityRow, BackendRow, FlowRow, ServiceRow},
    Names,
};
use crate::{
    dataplane::ebpf::{
        kernel::KernelMaps,
        observe,
        store::{BackendValue, MapContents, MapStore},
    },
    model::{Backend, FrontendKey, Protocol},
};

/// Everything the pinned maps hold.
pub struct State {
    maps: MapContents,
    stats: BTreeMap<StatsKey, Stats>,
    sockets: Vec<observe::SocketEntry>,
    affinity: Vec<(AffinityKey, AffinityValue)>,
    /// Where the per-packet flow maps are, read only by `flows` (they can hold far more
    /// entries than any other dump needs).
    bpffs: std::path::PathBuf,
}

/// Every entry of an LRU hash map pinned under `bpffs` (empty when it is missing).
pub(super) fn lru_entries<K: aya::Pod, V: aya::Pod>(bpffs: &Path, name: &str) -> Vec<(K, V)> {
    observe::lru_entries(bpffs, name).unwrap_or_default()
}

fn backend_name(backend: &BackendValue) -> String {
    let (ip, port, _) = backend.parts();
    Backend { ip, port }.to_string()
}

impl State {
    /// Reads the maps pinned under `bpffs`.
    ///
    /// # Errors
    /// When the maps are missing or unreadable.
    pub fn read(bpffs: &Path) -> Result<Self> {
        let maps = KernelMaps::from_pins(bpffs)
            .with_context(|| format!("opening the maps pinned under {}", bpffs.display()))?
            .read_all()?;
        let stats = observe::read_stats(bpffs).unwrap_or_default();
        Ok(Self {
            maps,
            stats,
            sockets: observe::sockets4(bpffs)
                .unwrap_or_default()
                .into_iter()
                .chain(observe::sockets6(bpffs).unwrap_or_default())
                .collect(),
            affinity: lru_entries(bpffs, MAP_AFFINITY4),
            bpffs: bpffs.to_owned(),
        })
    }

    /// Frontends by reverse-NAT index.
    #[must_use]
    pub fn indexed_frontends(&self) -> BTreeMap<u32, FrontendKey> {
        self.frontends()
            .into_iter()
            .map(|(index, (key, _))| (index, key))
            .collect()
    }

    /// Frontends by reverse-NAT index, with their backend count.
    fn frontends(&self) -> BTreeMap<u32, (FrontendKey, u16)> {
        self.maps
            .services
            .iter()
            .filter(|(k, _)| k.slot() == 0)
            .filter_map(|(k, v)| {
                let key = FrontendKey {
                    ip: k.ip(),
                    port: k.port(),
                    protocol: Protocol::from_number(k.proto())?,
                };
                Some((v.rev_nat_index, (key, v.count)))
            })
            .collect()
    }

    fn counted(&self, keep: impl Fn(&StatsKey) -> bool) -> u64 {
        self.stats
            .iter()
            .filter(|(k, _)| keep(k))
            .map(|(_, v)| v.count)
            .sum()
    }

    #[must_use]
    pub fn services(&self, names: &Names) -> Vec<ServiceRow> {
        self.frontends()
            .into_iter()
            .map(|(index, (key, count))| {
                let frontend = key.to_string();
                ServiceRow {
                    service: names.of(&frontend),
                    frontend,
                    backends: usize::from(count),
                    target: if count == 0 {
                        "reject (no endpoints)".to_owned()
                    } else {
                        "random backend".to_owned()
                    },
                    decisions: Some(
                        self.counted(|k| k.rev_nat_index == index && k.carries_backend()),
                    ),
                    rejects: Some(
                        self.counted(|k| k.rev_nat_index == index && !k.carries_backend()),
                    ),
                }
            })
            .collect()
    }

    #[must_use]
    pub fn backends(&self, names: &Names) -> Vec<BackendRow> {
        let mut users: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
        for (k, v) in self.maps.services.iter().filter(|(k, _)| k.slot() > 0) {
            let frontend = Protocol::from_number(k.proto()).map(|protocol| FrontendKey {
                ip: k.ip(),
                port: k.port(),
                protocol,
            });
            if let Some(frontend) = frontend {
                let name = names.of(&frontend.to_string());
                let label = if name == "-" {
                    frontend.to_string()
                } else {
                    name
                };
                users.entry(v.backend_id).or_default().insert(label);
            }
        }
        self.maps
            .backends
            .iter()
            .map(|(id, b)| BackendRow {
                backend: backend_name(b),
                id: id.to_string(),
                services: users
                    .get(id)
                    .map(|s| s.iter().cloned().collect())
                    .unwrap_or_default(),
                decisions: Some(self.counted(|k| k.backend_id == *id && k.carries_backend())),
            })
            .collect()
    }

    /// Sockets the socket LB sent to a backend, and flows the per-packet programs
    /// translated (the eBPF dataplane's flow tables).
    #[must_use]
    pub fn flows(&self, names: &Names) -> Vec<FlowRow> {
        let frontends = self.frontends();
        let mut rows: Vec<FlowRow> = self
            .sockets
            .iter()
            .map(|socket| {
                let frontend = frontends
                    .get(&socket.rev_nat_index)
                    .map_or_else(|| socket.frontend.to_string(), |(k, _)| k.to_string());
                FlowRow {
                    table: "socket",
                    protocol: frontends
                        .get(&socket.rev_nat_index)
                        .map_or_else(|| "-".to_owned(), |(k, _)| k.protocol.to_string()),
                    client: None,
                    service: names.of(&frontend),
                    frontend,
                    backend: socket.backend.to_string(),
                    state: None,
                    expires_in: None,
                    socket_cookie: Some(socket.cookie),
                }
            })
            .collect();
        rows.sort_by(|a, b| (&a.frontend, a.socket_cookie).cmp(&(&b.frontend, b.socket_cookie)));
        let now = crate::dataplane::system::monotonic_ns();
        let mut packets: Vec<FlowRow> = super::packet_flows::read(&self.bpffs, now)
            .iter()
            .map(|f| f.row(names))
            .collect();
        packets.sort_by(|a, b| (&a.frontend, &a.client).cmp(&(&b.frontend, &b.client)));
        rows.extend(packets);
        rows
    }

    /// Clients `sessionAffinity` remembers, with the time left before they are
    /// balanced afresh.
    #[must_use]
    pub fn affinity(&self, names: &Names) -> Vec<AffinityRow> {
        let now = crate::dataplane::system::monotonic_ns();
        let timeouts: BTreeMap<u32, u64> = self
            .maps
            .services
            .iter()
            .filter(|(k, v)| k.slot() == 0 && v.flags & SERVICE_FLAG_AFFINITY != 0)
            .map(|(_, v)| (v.rev_nat_index, u64::from(v.backend_id)))
            .collect();
        let frontends = self.indexed_frontends();
        self.affinity
            .iter()
            .filter_map(|(key, value)| {
                let timeout = *timeouts.get(&key.rev_nat_index)?;
                let idle = now.saturating_sub(value.last_used_ns) / 1_000_000_000;
                let frontend = frontends.get(&key.rev_nat_index)?.to_string();
                let backend = self
                    .maps
                    .backends
                    .get(&value.backend_id)
                    .map_or_else(|| format!("backend {}", value.backend_id), backend_name);
                Some(AffinityRow {
                    service: names.of(&frontend),
                    client: format!("netns cookie {}", key.client_cookie),
                    backend,
                    expires_in: timeout.checked_sub(idle),
                })
            })
            .filter(|row| row.expires_in.is_some())
            .collect()
    }
}
