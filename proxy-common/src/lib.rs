//! Map keys and values shared by the eBPF programs and the agent.
//!
//! Layout follows Cilium's `bpf/lib/lb.h`: a service is a set of entries in one hash map,
//! slot 0 being the frontend (holding the backend count) and slots 1..=count pointing at
//! backends by id; backends and reverse-NAT entries live in maps of their own. Fields
//! suffixed `_be` hold network byte order in memory (as the kernel hands them over).
#![no_std]

use core::mem::size_of;

/// IANA protocol numbers used in keys.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;

/// Capacity of the pinned maps. Hash maps are created without preallocation: they cost
/// the entries written, plus a 16-byte bucket per entry of capacity from the start
/// (the LB maps' defaults: 64 MiB across both families; `--bpf-lb-map-max` sizes them).
pub const MAX_SERVICE_ENTRIES: u32 = 1 << 20;
pub const MAX_BACKENDS: u32 = 1 << 19;
/// Frontends with a reverse-NAT index (the index is a `u32`; the map bounds it).
pub const MAX_REVNAT: u32 = 1 << 19;
pub const MAX_SOCK_REVNAT: u32 = 1 << 17;

/// `BPF_F_NO_PREALLOC`.
pub const MAP_NO_PREALLOC: u32 = 1;

/// The layout of the pinned maps' keys and values. A change of any shared struct
/// bumps it: an agent finding maps pinned by another layout (or by one before the
/// stamp) recreates them all instead of misreading them. Kept in `LB_LAYOUT`.
pub const LAYOUT_VERSION: u32 = 2;

/// Names of the pinned maps, as the eBPF object declares them.
pub const MAP_LAYOUT: &str = "LB_LAYOUT";
pub const MAP_SERVICES4: &str = "LB4_SERVICES";
pub const MAP_BACKENDS4: &str = "LB4_BACKENDS";
pub const MAP_REVNAT4: &str = "LB4_REVNAT";
pub const MAP_SOCK_REVNAT4: &str = "LB4_SK_REVNAT";
pub const MAP_LOCAL_REDIRECT4: &str = "LOCAL_REDIRECT4";
pub const MAP_STATS: &str = "LB_STATS";
pub const MAP_EVENTS: &str = "LB_EVENTS";
pub const MAP_MONITOR: &str = "LB_MONITOR";
pub const MAP_AFFINITY4: &str = "LB4_AFFINITY";
pub const MAP_CT4: &str = "LB4_CT";
pub const MAP_CLUSTER_CIDR4: &str = "CLUSTER_CIDR4";
pub const MAP_SOURCE_RANGES4: &str = "LB4_SOURCE_RANGES";
pub const MAP_MAGLEV4: &str = "LB4_MAGLEV";
pub const MAP_SERVICES6: &str = "LB6_SERVICES";
pub const MAP_BACKENDS6: &str = "LB6_BACKENDS";
pub const MAP_REVNAT6: &str = "LB6_REVNAT";
pub const MAP_SOCK_REVNAT6: &str = "LB6_SK_REVNAT";
pub const MAP_CT6: &str = "LB6_CT";
pub const MAP_CLUSTER_CIDR6: &str = "CLUSTER_CIDR6";
pub const MAP_SOURCE_RANGES6: &str = "LB6_SOURCE_RANGES";
pub const MAP_LOCAL_INTERFACES: &str = "LOCAL_INTERFACES";

/// Largest Maglev lookup table (a prime, Cilium's default); `--maglev-table-size` may
/// choose a smaller prime.
pub const MAGLEV_MAX: usize = 16381;
/// Maglev tables (one per distinct backend set of the per-packet path's frontends).
pub const MAX_MAGLEV_TABLES: u32 = 1 << 14;

/// Flows the per-packet programs translate (LRU: under pressure the coldest flow is
/// forgotten and re-chosen on its next packet, never a wedged map).
pub const MAX_CT: u32 = 1 << 18;
/// `--cluster-cidr` prefixes, and `loadBalancerSourceRanges` prefixes.
pub const MAX_CLUSTER_CIDRS: u32 = 256;
/// Interfaces whose traffic is a local pod's (`--detect-local-mode` BridgeInterface or
/// InterfaceNamePrefix), by ifindex: those the per-packet programs are attached to.
pub const MAX_LOCAL_INTERFACES: u32 = 256;
pub const MAX_SOURCE_RANGES: u32 = 1 << 14;

/// `Service4Key::scope` of the entries external clients use when their route differs
/// from the one in scope 0 (an `externalTrafficPolicy: Local` frontend).
pub const SCOPE_EXTERNAL: u8 = 1;

/// Clients remembered by `sessionAffinity: ClientIP` (LRU: the coldest is forgotten).
pub const MAX_AFFINITY: u32 = 1 << 16;
/// `ServiceValue::flags` of a slot-0 entry: the Service has `sessionAffinity: ClientIP`,
/// and that entry's `backend_id` holds the timeout in seconds.
pub const SERVICE_FLAG_AFFINITY: u8 = 1;
/// Slot 0: clients taking this entry's route are masqueraded (per-packet path only).
pub const SERVICE_FLAG_MASQ: u8 = 2;
/// Slot 0: without backends, packets are dropped (a Local policy), not rejected.
pub const SERVICE_FLAG_DROP_EMPTY: u8 = 4;
/// Scope-0 slot 0: the frontend has `loadBalancerSourceRanges` in `LB4_SOURCE_RANGES`.
pub const SERVICE_FLAG_SOURCE_RANGES: u8 = 8;
/// Scope-0 slot 0: external clients use the `SCOPE_EXTERNAL` entries.
pub const SERVICE_FLAG_EXTERNAL_SCOPE: u8 = 16;
/// Scope-0 slot 0 without a scope-1 twin: external clients use these slots, masqueraded.
pub const SERVICE_FLAG_EXTERNAL_MASQ: u8 = 32;

/// Packet marks the per-packet programs set for the node's netfilter to act on
/// (kube-proxy's values): masquerade, and reject (TCP reset or ICMP unreachable).
pub const MARK_MASQ: u32 = 0x4000;
pub const MARK_REJECT: u32 = 0x10000;

/// Counter entries (per frontend, backend, hook and verdict); LRU, so a full map loses
/// the coldest counter rather than a count.
pub const MAX_STATS: u32 = 1 << 16;
/// Bytes of the monitor ring buffer (a power-of-two number of pages).
pub const EVENTS_BYTES: u32 = 1 << 18;

// Where a decision was taken (`StatsKey::hook`, `MonitorEvent::hook`).
pub const HOOK_CONNECT4: u8 = 1;
pub const HOOK_SENDMSG4: u8 = 2;
pub const HOOK_RECVMSG4: u8 = 3;
pub const HOOK_GETPEERNAME4: u8 = 4;
/// The per-packet program on the node's external interfaces (NodePort, external and
/// load-balancer IPs, ClusterIPs routed from outside).
pub const HOOK_TC_INGRESS: u8 = 5;
pub const HOOK_CONNECT6: u8 = 6;
pub const HOOK_SENDMSG6: u8 = 7;
pub const HOOK_RECVMSG6: u8 = 8;
pub const HOOK_GETPEERNAME6: u8 = 9;

// What was decided.
/// The destination became a backend.
pub const VERDICT_NAT: u8 = 1;
/// The destination became the node-local listener registered for it (the DNS cache).
pub const VERDICT_LOCAL_REDIRECT: u8 = 2;
/// The call failed with ECONNREFUSED; `reason` says why.
pub const VERDICT_REJECT: u8 = 3;
/// A backend peer was shown to the socket as the Service it asked for.
pub const VERDICT_REVERSE_NAT: u8 = 4;
/// The packet was dropped; `reason` says why.
pub const VERDICT_DROP: u8 = 5;

// Why a call was rejected.
/// The Service has no endpoints.
pub const REASON_NO_ENDPOINTS: u8 = 1;
/// The chosen slot or backend vanished, and again when chosen afresh (the agent was
/// rewriting the Service): the per-packet path drops (the client sends again), the
/// socket path refuses.
pub const REASON_BACKEND_MISSING: u8 = 2;
/// For `VERDICT_NAT`: the backend this client used last (`sessionAffinity`).
pub const REASON_AFFINITY: u8 = 3;
/// A Local traffic policy and no endpoint on this node.
pub const REASON_NO_LOCAL_ENDPOINTS: u8 = 4;
/// The source is outside the frontend's `loadBalancerSourceRanges`.
pub const REASON_SOURCE_RANGE: u8 = 5;
/// A TCP flow's backend is gone: the client gets a reset instead of silence.
pub const REASON_BACKEND_GONE: u8 = 6;
/// For `VERDICT_NAT`: a UDP flow whose backend is gone moved to a live one.
pub const REASON_RESELECTED: u8 = 7;

/// Frontends that may be redirected to a node-local listener (the DNS cache).
pub const MAX_LOCAL_REDIRECT: u32 = 64;
/// A redirect whose heartbeat is older than this is ignored: the listener is presumed
/// dead and the Service's own backends take the traffic again.
pub const LOCAL_REDIRECT_TTL_NS: u64 = 3_000_000_000;

/// Key of `LB4_SERVICES`: one entry per (frontend, slot).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Service4Key {
    pub address_be: u32,
    pub dport_be: u16,
    /// 0 for the frontend itself, 1..=count for its backend slots.
    pub backend_slot: u16,
    pub proto: u8,
    pub scope: u8,
    pub pad: [u8; 2],
}
const _: () = assert!(size_of::<Service4Key>() == 12);

/// Key of `LB6_SERVICES` (IPv6 frontends; same slot scheme).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Service6Key {
    pub address: [u8; 16],
    pub dport_be: u16,
    pub backend_slot: u16,
    pub proto: u8,
    pub scope: u8,
    pub pad: [u8; 2],
}
const _: () = assert!(size_of::<Service6Key>() == 24);

/// Value of a services map entry. In slot 0, `count` is the number of backend slots
/// and `backend_id` is unused; in slot N, `backend_id` names the backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    pub backend_id: u32,
    pub rev_nat_index: u32,
    pub count: u16,
    /// Slot 0: the `LB4_MAGLEV` table the per-packet path chooses backends from (0:
    /// none, choose at random).
    pub maglev_table: u16,
    pub flags: u8,
    pub pad: [u8; 3],
}
const _: () = assert!(size_of::<ServiceValue>() == 16);

/// Value of `LB4_BACKENDS`, keyed by backend id (`u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Backend4 {
    pub address_be: u32,
    pub port_be: u16,
    pub proto: u8,
    pub flags: u8,
}
const _: () = assert!(size_of::<Backend4>() == 8);

/// Value of `LB6_BACKENDS`, keyed by backend id (`u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Backend6 {
    pub address: [u8; 16],
    pub port_be: u16,
    pub proto: u8,
    pub flags: u8,
}
const _: () = assert!(size_of::<Backend6>() == 20);

/// Value of `LB4_REVNAT`, keyed by the service's `rev_nat_index` (`u32`): the frontend
/// address a reply must appear to come from.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNat4 {
    pub address_be: u32,
    pub port_be: u16,
    pub pad: u16,
}
const _: () = assert!(size_of::<RevNat4>() == 8);

/// Value of `LB6_REVNAT`, keyed by the service's `rev_nat_index` (one index space for
/// both families).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNat6 {
    pub address: [u8; 16],
    pub port_be: u16,
    pub pad: u16,
}
const _: () = assert!(size_of::<RevNat6>() == 20);

/// Key of `LB6_SK_REVNAT`: which IPv6 backend a given socket was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNat6Key {
    pub cookie: u64,
    pub address: [u8; 16],
    pub port_be: u16,
    pub pad: [u8; 6],
}
const _: () = assert!(size_of::<SockRevNat6Key>() == 32);

/// Value of `LB6_SK_REVNAT`: the IPv6 frontend the socket originally asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNat6 {
    pub address: [u8; 16],
    pub rev_nat_index: u32,
    pub port_be: u16,
    pub pad: u16,
}
const _: () = assert!(size_of::<SockRevNat6>() == 24);

/// Key of `LB4_SK_REVNAT`: which backend a given socket was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNat4Key {
    pub cookie: u64,
    pub address_be: u32,
    pub port_be: u16,
    pub pad: u16,
}
const _: () = assert!(size_of::<SockRevNat4Key>() == 16);

/// Value of `LB4_SK_REVNAT`: the frontend the socket originally asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNat4 {
    pub address_be: u32,
    pub rev_nat_index: u32,
    pub port_be: u16,
    pub pad: u16,
}
const _: () = assert!(size_of::<SockRevNat4>() == 12);

/// Value of `LOCAL_REDIRECT4`, keyed by a frontend's slot-0 `Service4Key`: the local
/// listener to use instead of the backends while `heartbeat_ns` (CLOCK_MONOTONIC, as
/// `bpf_ktime_get_ns`) is fresh.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LocalRedirect4 {
    pub address_be: u32,
    pub port_be: u16,
    pub pad: u16,
    pub heartbeat_ns: u64,
}
const _: () = assert!(size_of::<LocalRedirect4>() == 16);

/// Key of `LB_STATS` (a per-CPU map, so the datapath never shares a counter between
/// CPUs). For rejects, `backend_id` holds the reason instead.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StatsKey {
    pub rev_nat_index: u32,
    pub backend_id: u32,
    pub hook: u8,
    pub verdict: u8,
    pub pad: u16,
}
const _: () = assert!(size_of::<StatsKey>() == 12);

impl StatsKey {
    /// Whether `backend_id` names a backend (not a reject's or drop's reason).
    #[must_use]
    pub fn carries_backend(&self) -> bool {
        self.verdict != VERDICT_REJECT && self.verdict != VERDICT_DROP
    }
}

/// Value of `LB_STATS`: decisions taken (connections for `connect`, datagrams for
/// `sendmsg`), and bytes where a per-packet program knows them (0 at the socket).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Stats {
    pub count: u64,
    pub bytes: u64,
}
const _: () = assert!(size_of::<Stats>() == 16);

/// The only entry of `LB_MONITOR`: events are written to `LB_EVENTS` only while a
/// monitor keeps `expires_ns` (CLOCK_MONOTONIC) in the future, so nobody listening
/// costs one array read.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MonitorConfig {
    pub expires_ns: u64,
    /// Only this frontend's events (its reverse-NAT index), or 0 for all.
    pub rev_nat_index: u32,
    pub pad: u32,
}
const _: () = assert!(size_of::<MonitorConfig>() == 16);

/// One record of `LB_EVENTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MonitorEvent {
    pub timestamp_ns: u64,
    pub socket_cookie: u64,
    /// The Service address the socket asked for.
    pub frontend_be: u32,
    /// The backend (or local listener) it was sent to; 0 for rejects.
    pub backend_be: u32,
    pub frontend_port_be: u16,
    pub backend_port_be: u16,
    pub backend_id: u32,
    pub rev_nat_index: u32,
    pub hook: u8,
    pub verdict: u8,
    pub reason: u8,
    pub proto: u8,
    /// The calling process (thread group id).
    pub pid: u32,
    pub pad: u32,
}
const _: () = assert!(size_of::<MonitorEvent>() == 48);

/// A record of `LB_EVENTS` about an IPv6 frontend: the event (its IPv4 address fields
/// zero) and the addresses. Readers tell the two kinds apart by record length.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MonitorEvent6 {
    pub event: MonitorEvent,
    pub frontend: [u8; 16],
    pub backend: [u8; 16],
}
const _: () = assert!(size_of::<MonitorEvent6>() == 80);

/// Key of `LB4_AFFINITY`: a client of one frontend. At the socket the client is its
/// network namespace (its cookie): one per pod, and the node's own for host processes,
/// which is what kube-proxy's per-address affinity amounts to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityKey {
    pub client_cookie: u64,
    pub rev_nat_index: u32,
    pub pad: u32,
}
const _: () = assert!(size_of::<AffinityKey>() == 16);

/// Value of `LB4_AFFINITY`: the backend the client used last, and in which slot (a
/// slot that now names another backend means the Service changed: choose again).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub slot: u16,
    pub pad: u16,
}
const _: () = assert!(size_of::<AffinityValue>() == 16);

/// Value of `LB4_MAGLEV`, keyed by a table id (`u16`, non-zero): `size` entries of
/// backend ids, a flow going to `backend_ids[hash % size]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MaglevTable {
    pub size: u32,
    pub backend_ids: [u32; MAGLEV_MAX],
}
const _: () = assert!(size_of::<MaglevTable>() == 4 + 4 * MAGLEV_MAX);

/// `Ct4Key::direction`: the client's packets (keyed as they arrive), and the backend's
/// replies (keyed as they leave, after the kernel undid any masquerade).
pub const CT_FORWARD: u8 = 0;
pub const CT_REPLY: u8 = 1;

/// Key of `LB4_CT`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ct4Key {
    pub src_be: u32,
    pub dst_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub direction: u8,
    pub pad: [u8; 2],
}
const _: () = assert!(size_of::<Ct4Key>() == 16);

/// `Ct4Value::flags`: the flow is masqueraded; a FIN or RST was seen.
pub const CT_FLAG_MASQ: u8 = 1;
pub const CT_FLAG_CLOSING: u8 = 2;

/// Value of `LB4_CT`. Forward entries hold the backend (and its id, to notice it
/// leaving); reply entries hold the frontend the replies must come from.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ct4Value {
    /// CLOCK_MONOTONIC of the last packet.
    pub last_seen_ns: u64,
    pub nat_be: u32,
    pub rev_nat_index: u32,
    pub backend_id: u32,
    pub nat_port_be: u16,
    pub flags: u8,
    pub pad: u8,
}
const _: () = assert!(size_of::<Ct4Value>() == 24);

/// Data of an `LB4_SOURCE_RANGES` LPM key: the frontend, then the allowed prefix (the
/// trie's prefix length counts the 32 bits before `address_be` too).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRange4 {
    pub rev_nat_index_be: u32,
    pub address_be: u32,
}
const _: () = assert!(size_of::<SourceRange4>() == 8);

/// Key of `LB6_CT` (as `Ct4Key`); its value is a `Ct6Value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ct6Key {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub direction: u8,
    pub pad: [u8; 2],
}
const _: () = assert!(size_of::<Ct6Key>() == 40);

/// Value of `LB6_CT` (as `Ct4Value`, with an IPv6 address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ct6Value {
    pub last_seen_ns: u64,
    pub nat: [u8; 16],
    pub rev_nat_index: u32,
    pub backend_id: u32,
    pub nat_port_be: u16,
    pub flags: u8,
    pub pad: [u8; 5],
}
const _: () = assert!(size_of::<Ct6Value>() == 40);

/// Data of an `LB6_SOURCE_RANGES` LPM key (as `SourceRange4`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRange6 {
    pub rev_nat_index_be: u32,
    pub address: [u8; 16],
}
const _: () = assert!(size_of::<SourceRange6>() == 20);

#[cfg(feature = "user")]
mod user {
    #![allow(
        unsafe_code,
        reason = "aya::Pod is an unsafe marker trait for plain-data types"
    )]
    // SAFETY (all impls): repr(C) structs of integers with explicit padding fields, so
    // every byte pattern is valid and there are no implicit padding bytes.
    unsafe impl aya::Pod for super::Service4Key {}
    unsafe impl aya::Pod for super::Service6Key {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::Backend4 {}
    unsafe impl aya::Pod for super::Backend6 {}
    unsafe impl aya::Pod for super::RevNat4 {}
    unsafe impl aya::Pod for super::RevNat6 {}
    unsafe impl aya::Pod for super::SockRevNat6Key {}
    unsafe impl aya::Pod for super::SockRevNat6 {}
    unsafe impl aya::Pod for super::MonitorEvent6 {}
    unsafe impl aya::Pod for super::SockRevNat4Key {}
    unsafe impl aya::Pod for super::SockRevNat4 {}
    unsafe impl aya::Pod for super::LocalRedirect4 {}
    unsafe impl aya::Pod for super::StatsKey {}
    unsafe impl aya::Pod for super::Stats {}
    unsafe impl aya::Pod for super::MonitorConfig {}
    unsafe impl aya::Pod for super::MonitorEvent {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::AffinityValue {}
    unsafe impl aya::Pod for super::Ct4Key {}
    unsafe impl aya::Pod for super::Ct4Value {}
    unsafe impl aya::Pod for super::SourceRange4 {}
    unsafe impl aya::Pod for super::MaglevTable {}
    unsafe impl aya::Pod for super::Ct6Key {}
    unsafe impl aya::Pod for super::Ct6Value {}
    unsafe impl aya::Pod for super::SourceRange6 {}
}
