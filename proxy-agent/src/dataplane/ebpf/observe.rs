//! What the datapath reports about itself, read from the pinned maps: the per-CPU
//! decision counters (summed), how full each map is, and the monitor's event stream.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd,
    path::Path,
    time::Duration,
};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuHashMap, RingBuf};
use proxy_common::{
    AffinityKey, AffinityValue, Backend4, Backend6, LocalRedirect4, MonitorConfig, MonitorEvent,
    MonitorEvent6, RevNat4, RevNat6, Service4Key, Service6Key, ServiceValue, SockRevNat4,
    SockRevNat4Key, SockRevNat6, SockRevNat6Key, Stats, StatsKey, MAP_AFFINITY4, MAP_BACKENDS4,
    MAP_BACKENDS6, MAP_EVENTS, MAP_LOCAL_REDIRECT4, MAP_MONITOR, MAP_REVNAT4, MAP_REVNAT6,
    MAP_SERVICES4, MAP_SERVICES6, MAP_SOCK_REVNAT4, MAP_SOCK_REVNAT6, MAP_STATS,
};

use super::EbpfError;
use crate::dataplane::system::monotonic_ns;

/// The decision counters, summed over CPUs.
pub fn read_stats(bpffs: &Path) -> Result<BTreeMap<StatsKey, Stats>, EbpfError> {
    let data = MapData::from_pin(bpffs.join(MAP_STATS))?;
    let map: PerCpuHashMap<_, StatsKey, Stats> =
        PerCpuHashMap::try_from(Map::PerCpuLruHashMap(data))?;
    let mut out = BTreeMap::new();
    for entry in &map {
        let (key, values) = entry?;
        let total = values.iter().fold(Stats::default(), |sum, v| Stats {
            count: sum.count + v.count,
            bytes: sum.bytes + v.bytes,
        });
        out.insert(key, total);
    }
    Ok(out)
}

/// Every entry of an LRU hash map pinned under `bpffs`.
///
/// # Errors
/// When the map is missing or is not an LRU hash map of these types.
pub fn lru_entries<K: aya::Pod, V: aya::Pod>(
    bpffs: &Path,
    name: &str,
) -> Result<Vec<(K, V)>, EbpfError> {
    let data = MapData::from_pin(bpffs.join(name))?;
    let map = HashMap::<MapData, K, V>::try_from(Map::LruHashMap(data))?;
    Ok(map.iter().filter_map(Result::ok).collect())
}

/// A socket the socket LB sent to `backend` in place of `frontend`, from either
/// family's per-socket map.
#[derive(Debug, Clone, Copy)]
pub struct SocketEntry {
    pub cookie: u64,
    pub backend: SocketAddr,
    pub frontend: SocketAddr,
    pub rev_nat_index: u32,
}

/// The IPv4 per-socket map's entries (`LB4_SK_REVNAT`).
///
/// # Errors
/// When the map cannot be read.
pub fn sockets4(bpffs: &Path) -> Result<Vec<SocketEntry>, EbpfError> {
    let at = |be: u32, port_be: u16| {
        SocketAddr::new(
            Ipv4Addr::from(be.to_ne_bytes()).into(),
            u16::from_be(port_be),
        )
    };
    let entries = lru_entries::<SockRevNat4Key, SockRevNat4>(bpffs, MAP_SOCK_REVNAT4)?;
    Ok(entries
        .into_iter()
        .map(|(key, value)| SocketEntry {
            cookie: key.cookie,
            backend: at(key.address_be, key.port_be),
            frontend: at(value.address_be, value.port_be),
            rev_nat_index: value.rev_nat_index,
        })
        .collect())
}

/// The IPv6 per-socket map's entries (`LB6_SK_REVNAT`).
///
/// # Errors
/// When the map cannot be read.
pub fn sockets6(bpffs: &Path) -> Result<Vec<SocketEntry>, EbpfError> {
    let at = |octets: [u8; 16], port_be: u16| {
        SocketAddr::new(Ipv6Addr::from(octets).into(), u16::from_be(port_be))
    };
    let entries = lru_entries::<SockRevNat6Key, SockRevNat6>(bpffs, MAP_SOCK_REVNAT6)?;
    Ok(entries
        .into_iter()
        .map(|(key, value)| SocketEntry {
            cookie: key.cookie,
            backend: at(key.address, key.port_be),
            frontend: at(value.address, value.port_be),
            rev_nat_index: value.rev_nat_index,
        })
        .collect())
}

/// One pinned map's occupancy.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MapFill {
    pub map: &'static str,
    pub entries: usize,
    pub capacity: u32,
}

fn count_keys<K: aya::Pod, V: aya::Pod>(map: Map) -> usize {
    HashMap::<MapData, K, V>::try_from(map).map_or(0, |m| m.keys().flatten().count())
}

/// How many entries each hash map holds against its capacity (a walk of the keys:
/// milliseconds per 10 000 entries, so for scrapes and `dump`, not the datapath).
#[must_use]
pub fn map_fill(bpffs: &Path) -> Vec<MapFill> {
    let mut out = Vec::new();
    for name in [
        MAP_SERVICES4,
        MAP_BACKENDS4,
        MAP_REVNAT4,
        MAP_SOCK_REVNAT4,
        MAP_SERVICES6,
        MAP_BACKENDS6,
        MAP_REVNAT6,
        MAP_SOCK_REVNAT6,
        MAP_LOCAL_REDIRECT4,
        MAP_AFFINITY4,
        MAP_STATS,
    ] {
        let Ok(data) = MapData::from_pin(bpffs.join(name)) else {
            continue;
        };
        let Ok(info) = data.info() else {
            continue;
        };
        let capacity = info.max_entries();
        let Ok(map) = Map::from_map_data(data) else {
            continue;
        };
        let entries = match name {
            MAP_SERVICES4 => count_keys::<Service4Key, ServiceValue>(map),
            MAP_BACKENDS4 => count_keys::<u32, Backend4>(map),
            MAP_REVNAT4 => count_keys::<u32, RevNat4>(map),
            MAP_SOCK_REVNAT4 => count_keys::<SockRevNat4Key, SockRevNat4>(map),
            MAP_SERVICES6 => count_keys::<Service6Key, ServiceValue>(map),
            MAP_BACKENDS6 => count_keys::<u32, Backend6>(map),
            MAP_REVNAT6 => count_keys::<u32, RevNat6>(map),
            MAP_SOCK_REVNAT6 => count_keys::<SockRevNat6Key, SockRevNat6>(map),
            MAP_LOCAL_REDIRECT4 => count_keys::<Service4Key, LocalRedirect4>(map),
            MAP_AFFINITY4 => count_keys::<AffinityKey, AffinityValue>(map),
            _ => PerCpuHashMap::<MapData, StatsKey, Stats>::try_from(map)
                .map_or(0, |m| m.keys().flatten().count()),
        };
        out.push(MapFill {
            map: name,
            entries,
            capacity,
        });
    }
    out
}

/// How long one refresh keeps the programs emitting: a monitor that dies stops
/// costing anything within this.
const LEASE: Duration = Duration::from_secs(3);

/// A live subscription to the programs' decisions.
pub struct Monitor {
    config: Array<MapData, MonitorConfig>,
    ring: RingBuf<MapData>,
    rev_nat_index: u32,
    renewed_ns: u64,
}

impl Monitor {
    /// Starts the stream: all frontends, or only the one with this reverse-NAT index.
    pub fn open(bpffs: &Path, rev_nat_index: Option<u32>) -> Result<Self, EbpfError> {
        let config = Array::try_from(Map::Array(MapData::from_pin(bpffs.join(MAP_MONITOR))?))?;
        let ring = RingBuf::try_from(Map::RingBuf(MapData::from_pin(bpffs.join(MAP_EVENTS))?))?;
        let mut monitor = Self {
            config,
            ring,
            rev_nat_index: rev_nat_index.unwrap_or(0),
            renewed_ns: 0,
        };
        monitor.renew()?;
        Ok(monitor)
    }

    fn renew(&mut self) -> Result<(), EbpfError> {
        let now = monotonic_ns();
        let lease = u64::try_from(LEASE.as_nanos()).unwrap_or(u64::MAX);
        self.config.set(
            0,
            MonitorConfig {
                expires_ns: now + lease,
                rev_nat_index: self.rev_nat_index,
                pad: 0,
            },
            0,
        )?;
        self.renewed_ns = now;
        Ok(())
    }

    /// The events that arrive within `wait` (at least one, unless none came).
    pub fn next_batch(&mut self, wait: Duration) -> Result<Vec<Event>, EbpfError> {
        if monotonic_ns().saturating_sub(self.renewed_ns) >= 1_000_000_000 {
            self.renew()?;
        }
        let mut events = self.drain();
        if events.is_empty() {
            let timeout =
                nix::poll::PollTimeout::try_from(wait).unwrap_or(nix::poll::PollTimeout::MAX);
            let mut fds = [nix::poll::PollFd::new(
                self.ring.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            // EINTR and friends only mean "look again".
            let _ = nix::poll::poll(&mut fds, timeout);
            events = self.drain();
        }
        Ok(events)
    }

    fn drain(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        while let Some(item) = self.ring.next() {
            if let Some(event) = decode(&item) {
                events.push(event);
            }
        }
        events
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        // Back to costing one array read per decision.
        let _ = self.config.set(0, MonitorConfig::default(), 0);
    }
}

/// A decision as streamed: the record, and its frontend and backend addresses (IPv4
/// in the record itself, IPv6 appended to it: `MonitorEvent6`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub record: MonitorEvent,
    pub frontend: IpAddr,
    pub backend: IpAddr,
}

/// An event from its bytes (the programs' `repr(C)` layout, host byte order for the
/// integers, network order where the field says `_be`).
#[must_use]
pub fn decode(bytes: &[u8]) -> Option<Event> {
    let record = decode_record(bytes)?;
    let v6 = |at: usize| -> Option<IpAddr> {
        let octets: [u8; 16] = bytes.get(at..at + 16)?.try_into().ok()?;
        Some(Ipv6Addr::from(octets).into())
    };
    if bytes.len() >= size_of::<MonitorEvent6>() {
        let base = size_of::<MonitorEvent>();
        return Some(Event {
            record,
            frontend: v6(base)?,
            backend: v6(base + 16)?,
        });
    }
    Some(Event {
        record,
        frontend: Ipv4Addr::from(record.frontend_be.to_ne_bytes()).into(),
        backend: Ipv4Addr::from(record.backend_be.to_ne_bytes()).into(),
    })
}

fn decode_record(bytes: &[u8]) -> Option<MonitorEvent> {
    if bytes.len() < size_of::<MonitorEvent>() {
        return None;
    }
    let u64_at = |at: usize| u64::from_ne_bytes(bytes[at..at + 8].try_into().unwrap_or_default());
    let u32_at = |at: usize| u32::from_ne_bytes(bytes[at..at + 4].try_into().unwrap_or_default());
    let u16_at = |at: usize| u16::from_ne_bytes(bytes[at..at + 2].try_into().unwrap_or_default());
    Some(MonitorEvent {
        timestamp_ns: u64_at(0),
        socket_cookie: u64_at(8),
        frontend_be: u32_at(16),
        backend_be: u32_at(20),
        frontend_port_be: u16_at(24),
        backend_port_be: u16_at(26),
        backend_id: u32_at(28),
        rev_nat_index: u32_at(32),
        hook: bytes[36],
        verdict: bytes[37],
        reason: bytes[38],
        proto: bytes[39],
        pid: u32_at(40),
        pad: 0,
    })
}

#[cfg(test)]
mod tests {
    use proxy_common::MonitorEvent;

    #[test]
    fn decodes_the_programs_layout() {
        let event = MonitorEvent {
            timestamp_ns: 1,
            socket_cookie: 2,
            frontend_be: 3,
            backend_be: 4,
            frontend_port_be: 5,
            backend_port_be: 6,
            backend_id: 7,
            rev_nat_index: 8,
            hook: 9,
            verdict: 10,
            reason: 11,
            proto: 12,
            pid: 13,
            pad: 0,
        };
        let mut bytes = Vec::new();
        bytes.extend(1u64.to_ne_bytes());
        bytes.extend(2u64.to_ne_bytes());
        bytes.extend(3u32.to_ne_bytes());
        bytes.extend(4u32.to_ne_bytes());
        bytes.extend(5u16.to_ne_bytes());
        bytes.extend(6u16.to_ne_bytes());
        bytes.extend(7u32.to_ne_bytes());
        bytes.extend(8u32.to_ne_bytes());
        bytes.extend([9, 10, 11, 12]);
        bytes.extend(13u32.to_ne_bytes());
        bytes.extend(0u32.to_ne_bytes());
        let decoded = super::decode(&bytes).expect("an IPv4 record");
        assert_eq!(decoded.record, event);
        assert_eq!(decoded.frontend.to_string(), "3.0.0.0");
        assert_eq!(super::decode(&bytes[..47]), None);
        let v6: Vec<u8> = (1..=32).collect();
        bytes.extend(&v6);
        let decoded = super::decode(&bytes).expect("an IPv6 record");
        assert_eq!(decoded.record, event);
        assert_eq!(
            decoded.frontend.to_string(),
            "102:304:506:708:90a:b0c:d0e:f10"
        );
        assert_eq!(
            decoded.backend.to_string(),
            "1112:1314:1516:1718:191a:1b1c:1d1e:1f20"
        );
    }
}
