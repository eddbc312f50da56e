//! The pinned maps the agent writes and the programs read (layout in proxy-common).
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, RingBuf},
};
use proxy_common::{
    AffinityKey, AffinityValue, Backend4, Backend6, Ct4Key, Ct4Value, Ct6Key, Ct6Value,
    LocalRedirect4, MaglevTable, MonitorConfig, RevNat4, RevNat6, Service4Key, Service6Key,
    ServiceValue, SockRevNat4, SockRevNat4Key, SockRevNat6, SockRevNat6Key, SourceRange4,
    SourceRange6, Stats, StatsKey, EVENTS_BYTES, MAP_NO_PREALLOC, MAX_AFFINITY, MAX_BACKENDS,
    MAX_CLUSTER_CIDRS, MAX_CT, MAX_LOCAL_INTERFACES, MAX_LOCAL_REDIRECT, MAX_MAGLEV_TABLES,
    MAX_REVNAT, MAX_SERVICE_ENTRIES, MAX_SOCK_REVNAT, MAX_SOURCE_RANGES, MAX_STATS,
};

/// The layout the maps were made with (`LAYOUT_VERSION`), written by the agent.
#[map]
pub static LB_LAYOUT: Array<u32> = Array::pinned(1, 0);

#[map]
pub static LB4_SERVICES: HashMap<Service4Key, ServiceValue> =
    HashMap::pinned(MAX_SERVICE_ENTRIES, MAP_NO_PREALLOC);

#[map]
pub static LB4_BACKENDS: HashMap<u32, Backend4> = HashMap::pinned(MAX_BACKENDS, MAP_NO_PREALLOC);

#[map]
pub static LB4_REVNAT: HashMap<u32, RevNat4> = HashMap::pinned(MAX_REVNAT, MAP_NO_PREALLOC);

/// Per-socket memory of which backend replaced which frontend; LRU so a flood of
/// short-lived sockets can never fill it.
#[map]
pub static LB4_SK_REVNAT: LruHashMap<SockRevNat4Key, SockRevNat4> =
    LruHashMap::pinned(MAX_SOCK_REVNAT, 0);

/// Frontends served by a node-local listener while its heartbeat is fresh (the DNS
/// cache in front of kube-dns).
#[map]
pub static LOCAL_REDIRECT4: HashMap<Service4Key, LocalRedirect4> =
    HashMap::pinned(MAX_LOCAL_REDIRECT, MAP_NO_PREALLOC);

/// Decisions counted per frontend, backend, hook and verdict; per-CPU so counting
/// never bounces a cache line between CPUs.
#[map]
pub static LB_STATS: LruPerCpuHashMap<StatsKey, Stats> = LruPerCpuHashMap::pinned(MAX_STATS, 0);

/// Whether anybody is listening (see `MonitorConfig`).
#[map]
pub static LB_MONITOR: Array<MonitorConfig> = Array::pinned(1, 0);

/// Decisions streamed to `proxy-agent monitor` while it listens.
#[map]
pub static LB_EVENTS: RingBuf = RingBuf::pinned(EVENTS_BYTES, 0);

/// `sessionAffinity: ClientIP`: each client's last backend per frontend.
#[map]
pub static LB4_AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(MAX_AFFINITY, 0);

/// Flows translated per packet: forward entries by the client's 4-tuple, reply entries
/// by the backend's (see `Ct4Key`). LRU: the coldest flow is forgotten under pressure.
#[map]
pub static LB4_CT: LruHashMap<Ct4Key, Ct4Value> = LruHashMap::pinned(MAX_CT, 0);

/// `--cluster-cidr` (or the Node's pod CIDRs with NodeCIDR detection): sources inside
/// take the pod route, all others the external one.
#[map]
pub static CLUSTER_CIDR4: LpmTrie<u32, u8> = LpmTrie::pinned(MAX_CLUSTER_CIDRS, 0);

/// `loadBalancerSourceRanges` per frontend (see `SourceRange4`).
#[map]
pub static LB4_SOURCE_RANGES: LpmTrie<SourceRange4, u8> = LpmTrie::pinned(MAX_SOURCE_RANGES, 0);

/// Maglev lookup tables of the per-packet path (see `MaglevTable`); allocated per
/// table in use, never preallocated.
#[map]
pub static LB4_MAGLEV: HashMap<u16, MaglevTable> =
    HashMap::pinned(MAX_MAGLEV_TABLES, MAP_NO_PREALLOC);

/// IPv6 frontends, backends and reverse NAT: the same layout as their IPv4 twins, the
/// ids shared with them (one backend id space, one reverse-NAT index space).
#[map]
pub static LB6_SERVICES: HashMap<Service6Key, ServiceValue> =
    HashMap::pinned(MAX_SERVICE_ENTRIES, MAP_NO_PREALLOC);

#[map]
pub static LB6_BACKENDS: HashMap<u32, Backend6> = HashMap::pinned(MAX_BACKENDS, MAP_NO_PREALLOC);

#[map]
pub static LB6_REVNAT: HashMap<u32, RevNat6> = HashMap::pinned(MAX_REVNAT, MAP_NO_PREALLOC);

/// `LB4_SK_REVNAT` for sockets sent to IPv6 backends.
#[map]
pub static LB6_SK_REVNAT: LruHashMap<SockRevNat6Key, SockRevNat6> =
    LruHashMap::pinned(MAX_SOCK_REVNAT, 0);

/// `LB4_CT` for IPv6 flows.
#[map]
pub static LB6_CT: LruHashMap<Ct6Key, Ct6Value> = LruHashMap::pinned(MAX_CT, 0);

/// `--cluster-cidr`'s IPv6 prefixes.
#[map]
pub static CLUSTER_CIDR6: LpmTrie<[u8; 16], u8> = LpmTrie::pinned(MAX_CLUSTER_CIDRS, 0);

/// IPv6 `loadBalancerSourceRanges` per frontend (see `SourceRange6`).
#[map]
pub static LB6_SOURCE_RANGES: LpmTrie<SourceRange6, u8> = LpmTrie::pinned(MAX_SOURCE_RANGES, 0);

/// Interfaces local pods' traffic arrives on (interface-based local detection), by
/// ifindex: packets arriving there take the pod route.
#[map]
pub static LOCAL_INTERFACES: HashMap<u32, u8> = HashMap::pinned(MAX_LOCAL_INTERFACES, 0);
