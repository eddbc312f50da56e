//! Garbage collection of the per-packet flow maps (`LB4_CT`, `LB6_CT`): the LRU keeps
//! them from ever filling, but idle and closed flows would otherwise sit there until
//! pushed out, hiding live ones from `dump` and the fill metrics. A flow goes when it is
//! idle past its protocol's timeout, or 10 s after a FIN or RST; a reply entry goes with
//! its flow.
use std::{
    collections::HashSet,
    hash::Hash,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::Duration,
};

use aya::maps::{HashMap, Map, MapData};
use proxy_common::{
    Ct4Key, Ct4Value, Ct6Key, Ct6Value, CT_FLAG_CLOSING, CT_FORWARD, CT_REPLY, MAP_CT4, MAP_CT6,
    PROTO_TCP,
};
use tracing::{debug, warn};

use super::EbpfError;
use crate::dataplane::system::monotonic_ns;

/// How often the map is swept.
pub const INTERVAL: Duration = Duration::from_secs(10);
const SECOND: u64 = 1_000_000_000;
/// Cilium's defaults: established TCP 6 h, anything else 60 s, closing 10 s.
const TCP_IDLE_NS: u64 = 6 * 3600 * SECOND;
const OTHER_IDLE_NS: u64 = 60 * SECOND;
const CLOSING_NS: u64 = 10 * SECOND;

/// What the sweep reads of a flow map's entries, per family.
pub trait FlowKey: aya::Pod + Eq + Hash {
    type Value: aya::Pod;
    const MAP: &'static str;
    fn direction(&self) -> u8;
    fn proto(&self) -> u8;
    fn last_seen(value: &Self::Value) -> u64;
    fn flags(value: &Self::Value) -> u8;
    /// The reply entry a forward entry created.
    #[must_use]
    fn reply_of(&self, value: &Self::Value) -> Self;
    /// A forward entry's client, frontend and backend (address, port).
    fn endpoints(&self, value: &Self::Value) -> [(IpAddr, u16); 3];
}

impl FlowKey for Ct4Key {
    type Value = Ct4Value;
    const MAP: &'static str = MAP_CT4;
    fn direction(&self) -> u8 {
        self.direction
    }
    fn proto(&self) -> u8 {
        self.proto
    }
    fn last_seen(value: &Ct4Value) -> u64 {
        value.last_seen_ns
    }
    fn flags(value: &Ct4Value) -> u8 {
        value.flags
    }
    fn endpoints(&self, value: &Ct4Value) -> [(IpAddr, u16); 3] {
        let ip = |be: u32| IpAddr::V4(Ipv4Addr::from(be.to_ne_bytes()));
        [
            (ip(self.src_be), u16::from_be(self.sport_be)),
            (ip(self.dst_be), u16::from_be(self.dport_be)),
            (ip(value.nat_be), u16::from_be(value.nat_port_be)),
        ]
    }
    fn reply_of(&self, value: &Ct4Value) -> Self {
        Self {
            src_be: value.nat_be,
            dst_be: self.src_be,
            sport_be: value.nat_port_be,
            dport_be: self.sport_be,
            proto: self.proto,
            direction: CT_REPLY,
            pad: [0; 2],
        }
    }
}

impl FlowKey for Ct6Key {
    type Value = Ct6Value;
    const MAP: &'static str = MAP_CT6;
    fn direction(&self) -> u8 {
        self.direction
    }
    fn proto(&self) -> u8 {
        self.proto
    }
    fn last_seen(value: &Ct6Value) -> u64 {
        value.last_seen_ns
    }
    fn flags(value: &Ct6Value) -> u8 {
        value.flags
    }
    fn endpoints(&self, value: &Ct6Value) -> [(IpAddr, u16); 3] {
        let ip = |octets: [u8; 16]| IpAddr::V6(Ipv6Addr::from(octets));
        [
            (ip(self.src), u16::from_be(self.sport_be)),
            (ip(self.dst), u16::from_be(self.dport_be)),
            (ip(value.nat), u16::from_be(value.nat_port_be)),
        ]
    }
    fn reply_of(&self, value: &Ct6Value) -> Self {
        Self {
            src: value.nat,
            dst: self.src,
            sport_be: value.nat_port_be,
            dport_be: self.sport_be,
            proto: self.proto,
            direction: CT_REPLY,
            pad: [0; 2],
        }
    }
}

/// How long a forward entry has left at `now_ns` before a sweep removes it.
#[must_use]
pub fn remaining_ns<K: FlowKey>(key: &K, value: &K::Value, now_ns: u64) -> u64 {
    let idle = now_ns.saturating_sub(K::last_seen(value));
    let limit = if K::flags(value) & CT_FLAG_CLOSING != 0 {
        CLOSING_NS
    } else if key.proto() == PROTO_TCP {
        TCP_IDLE_NS
    } else {
        OTHER_IDLE_NS
    };
    limit.saturating_sub(idle)
}

/// Whether a forward entry has expired at `now_ns`.
fn expired<K: FlowKey>(key: &K, value: &K::Value, now_ns: u64) -> bool {
    remaining_ns(key, value, now_ns) == 0
}

/// The entries to delete: expired flows with their replies, and replies whose flow is
/// gone and that have been idle as long as a non-TCP flow may be.
#[must_use]
pub fn doomed<K: FlowKey>(entries: &[(K, K::Value)], now_ns: u64) -> Vec<K> {
    let mut out = Vec::new();
    let mut kept_replies = HashSet::new();
    for (key, value) in entries.iter().filter(|(k, _)| k.direction() == CT_FORWARD) {
        if expired(key, value, now_ns) {
            out.push(*key);
            out.push(key.reply_of(value));
        } else {
            kept_replies.insert(key.reply_of(value));
        }
    }
    for (key, value) in entries.iter().filter(|(k, _)| k.direction() == CT_REPLY) {
        let orphan_idle = now_ns.saturating_sub(K::last_seen(value)) >= OTHER_IDLE_NS;
        if !kept_replies.contains(key) && orphan_idle && !out.contains(key) {
            out.push(*key);
        }
    }
    out
}

/// One sweep of the pinned maps under `bpffs`; returns how many entries went.
///
/// # Errors
/// When a map cannot be opened or read.
pub fn sweep(bpffs: &std::path::Path, now_ns: u64) -> Result<usize, EbpfError> {
    Ok(sweep_map::<Ct4Key>(bpffs, now_ns)? + sweep_map::<Ct6Key>(bpffs, now_ns)?)
}

fn sweep_map<K: FlowKey>(bpffs: &std::path::Path, now_ns: u64) -> Result<usize, EbpfError> {
    let data = MapData::from_pin(bpffs.join(K::MAP))?;
    let mut map: HashMap<MapData, K, K::Value> = HashMap::try_from(Map::LruHashMap(data))?;
    let entries: Vec<(K, K::Value)> = map.iter().filter_map(Result::ok).collect();
    let doomed = doomed(&entries, now_ns);
    let mut removed = 0;
    for key in &doomed {
        // Gone already (evicted, or removed by the datapath) is as good.
        if map.remove(key).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

/// Sweeps every [`INTERVAL`] on a thread of its own, for as long as the map is pinned.
pub fn spawn(bpffs: PathBuf) {
    let spawned = std::thread::Builder::new()
        .name("flow-gc".into())
        .spawn(move || loop {
            std::thread::sleep(INTERVAL);
            match sweep(&bpffs, monotonic_ns()) {
                Ok(0) => {}
                Ok(removed) => debug!(removed, "expired flows removed"),
                Err(EbpfError::Map(error)) => {
                    debug!(%error, "flow map gone; garbage collection stops");
                    return;
                }
                Err(error) => warn!(%error, "cannot sweep the flow map"),
            }
        });
    if let Err(error) = spawned {
        warn!(%error, "cannot start flow garbage collection");
    }
}

#[cfg(test)]
mod tests {
    use super::{doomed, Ct4Key, Ct4Value, FlowKey, CT_FLAG_CLOSING, CT_FORWARD, CT_REPLY, SECOND};
    use proxy_common::{PROTO_TCP, PROTO_UDP};

    fn flow(sport: u16, proto: u8, last_seen_s: u64, flags: u8) -> [(Ct4Key, Ct4Value); 2] {
        let key = Ct4Key {
            src_be: 1,
            dst_be: 2,
            sport_be: sport,
            dport_be: 80,
            proto,
            direction: CT_FORWARD,
            pad: [0; 2],
        };
        let value = Ct4Value {
            last_seen_ns: last_seen_s * SECOND,
            nat_be: 3,
            nat_port_be: 8080,
            flags,
            ..Ct4Value::default()
        };
        let reply = key.reply_of(&value);
        [
            (key, value),
            (
                reply,
                Ct4Value {
                    last_seen_ns: value.last_seen_ns,
                    ..Ct4Value::default()
                },
            ),
        ]
    }

    #[test]
    fn idle_and_closed_flows_go_with_their_replies_live_ones_stay() {
        let now = 100_000;
        let live_tcp = flow(1, PROTO_TCP, now - 3600, 0);
        let closed_tcp = flow(2, PROTO_TCP, now - 11, CLOSING_FLAG);
        let idle_udp = flow(3, PROTO_UDP, now - 61, 0);
        let live_udp = flow(4, PROTO_UDP, now - 5, 0);
        let mut entries: Vec<_> = [live_tcp, closed_tcp, idle_udp, live_udp].concat();
        // A reply whose flow the LRU already evicted.
        let orphan = flow(5, PROTO_UDP, now - 120, 0)[1];
        entries.push(orphan);
        let gone = doomed(&entries, now * SECOND);
        for expected in [
            closed_tcp[0].0,
            closed_tcp[1].0,
            idle_udp[0].0,
            idle_udp[1].0,
            orphan.0,
        ] {
            assert!(gone.contains(&expected), "{expected:?} kept");
        }
        for kept in [live_tcp[0].0, live_tcp[1].0, live_udp[0].0, live_udp[1].0] {
            assert!(!gone.contains(&kept), "{kept:?} removed");
        }
        assert!(gone
            .iter()
            .all(|k| k.direction == CT_FORWARD || k.direction == CT_REPLY));
    }

    const CLOSING_FLAG: u8 = CT_FLAG_CLOSING;
}
