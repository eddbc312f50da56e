//! Metrics read from the kernel at scrape time: the eBPF programs' per-CPU decision
//! counters (named through the writer's id index and the last programmed state), map
//! fill, and the conntrack table's size.
use std::{path::PathBuf, sync::Arc, sync::PoisonError};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
};
use proxy_common::{
    HOOK_CONNECT4, HOOK_CONNECT6, HOOK_GETPEERNAME4, HOOK_GETPEERNAME6, HOOK_RECVMSG4,
    HOOK_RECVMSG6, HOOK_SENDMSG4, HOOK_SENDMSG6, HOOK_TC_INGRESS, REASON_AFFINITY,
    REASON_BACKEND_GONE, REASON_BACKEND_MISSING, REASON_NO_ENDPOINTS, REASON_NO_LOCAL_ENDPOINTS,
    REASON_RESELECTED, REASON_SOURCE_RANGE, VERDICT_DROP, VERDICT_LOCAL_REDIRECT, VERDICT_NAT,
    VERDICT_REJECT, VERDICT_REVERSE_NAT,
};

use crate::{dataplane::ebpf, introspect::Live};

/// The eBPF dataplane's side of the scrape.
pub struct EbpfCounters {
    pub bpffs: PathBuf,
    pub index: ebpf::index::SharedIndex,
    pub live: Arc<Live>,
    /// Connected UDP sockets destroyed because their backend left.
    pub sockets_destroyed: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for EbpfCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EbpfCounters")
            .field("bpffs", &self.bpffs)
            .finish_non_exhaustive()
    }
}

#[must_use]
pub fn hook_name(hook: u8) -> &'static str {
    match hook {
        HOOK_CONNECT4 => "connect4",
        HOOK_SENDMSG4 => "sendmsg4",
        HOOK_RECVMSG4 => "recvmsg4",
        HOOK_GETPEERNAME4 => "getpeername4",
        HOOK_TC_INGRESS => "tc_ingress",
        HOOK_CONNECT6 => "connect6",
        HOOK_SENDMSG6 => "sendmsg6",
        HOOK_RECVMSG6 => "recvmsg6",
        HOOK_GETPEERNAME6 => "getpeername6",
        _ => "unknown",
    }
}

#[must_use]
pub fn verdict_name(verdict: u8) -> &'static str {
    match verdict {
        VERDICT_NAT => "nat",
        VERDICT_LOCAL_REDIRECT => "local_redirect",
        VERDICT_REJECT => "reject",
        VERDICT_REVERSE_NAT => "reverse_nat",
        VERDICT_DROP => "drop",
        _ => "unknown",
    }
}

#[must_use]
pub fn reason_name(reason: u8) -> &'static str {
    match reason {
        REASON_NO_ENDPOINTS => "no_endpoints",
        REASON_BACKEND_MISSING => "backend_missing",
        REASON_AFFINITY => "affinity",
        REASON_NO_LOCAL_ENDPOINTS => "no_local_endpoints",
        REASON_SOURCE_RANGE => "source_range",
        REASON_BACKEND_GONE => "backend_gone",
        REASON_RESELECTED => "reselected",
        _ => "",
    }
}

type Labels = Vec<(&'static str, String)>;
type Rows = Vec<(Labels, ConstCounter)>;

fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: &[(Labels, M)],
) -> Result<(), std::fmt::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in rows {
        value.encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

impl EbpfCounters {
    /// Decisions, rejects and drops.
    fn decisions(&self) -> (Rows, Rows, Rows) {
        let Ok(stats) = ebpf::observe::read_stats(&self.bpffs) else {
            return (Vec::new(), Vec::new(), Vec::new());
        };
        // Held, not copied: the loop below does no I/O, and a copy of every id at
        // 10 000 Services per scrape would cost more than the brief wait of a sync.
        let index = self.index.read().unwrap_or_else(PoisonError::into_inner);
        let programmed = self.live.get();
        let (mut decisions, mut rejects, mut drops) = (Vec::new(), Vec::new(), Vec::new());
        for (key, value) in stats {
            let Some(frontend) = index.frontends.get(&key.rev_nat_index) else {
                continue;
            };
            let service = programmed
                .as_ref()
                .and_then(|p| p.desired.frontends.get(frontend))
                .map(|f| f.service.to_string())
                .unwrap_or_default();
            let mut labels = vec![
                ("service", service),
                ("frontend", frontend.to_string()),
                ("hook", hook_name(key.hook).to_owned()),
            ];
            if key.verdict == VERDICT_REJECT || key.verdict == VERDICT_DROP {
                let reason = u8::try_from(key.backend_id).unwrap_or(0);
                labels.push(("reason", reason_name(reason).to_owned()));
                let rows = if key.verdict == VERDICT_DROP {
                    &mut drops
                } else {
                    &mut rejects
                };
                rows.push((labels, ConstCounter::new(value.count)));
            } else {
                let backend = match key.verdict {
                    VERDICT_LOCAL_REDIRECT => "node-local".to_owned(),
                    _ => index
                        .backends
                        .get(&key.backend_id)
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                };
                labels.push(("backend", backend));
                labels.push(("verdict", verdict_name(key.verdict).to_owned()));
                decisions.push((labels, ConstCounter::new(value.count)));
            }
        }
        (decisions, rejects, drops)
    }
}

impl Collector for EbpfCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (decisions, rejects, drops) = self.decisions();
        family(
            &mut encoder,
            "proxyagent_datapath_decisions",
            "Connections (connect4), datagrams (sendmsg4) and flows from outside the node (tc_ingress) sent to each backend",
            MetricType::Counter,
            &decisions,
        )?;
        family(
            &mut encoder,
            "proxyagent_datapath_rejects",
            "Connections, datagrams and packets to a Service refused, by reason",
            MetricType::Counter,
            &rejects,
        )?;
        family(
            &mut encoder,
            "proxyagent_datapath_drops",
            "Packets from outside the node dropped by the per-packet program, by reason",
            MetricType::Counter,
            &drops,
        )?;
        let destroyed = self
            .sockets_destroyed
            .load(std::sync::atomic::Ordering::Relaxed);
        ConstCounter::new(destroyed).encode(encoder.encode_descriptor(
            "proxyagent_udp_sockets_destroyed",
            "Connected UDP sockets destroyed because the backend the socket LB sent them to left its Service",
            None,
            MetricType::Counter,
        )?)?;
        let fill = ebpf::observe::map_fill(&self.bpffs);
        let entries: Vec<_> = fill
            .iter()
            .map(|f| {
                let n = i64::try_from(f.entries).unwrap_or(i64::MAX);
                (vec![("map", f.map.to_owned())], ConstGauge::new(n))
            })
            .collect();
        family(
            &mut encoder,
            "proxyagent_bpf_map_entries",
            "Entries in each pinned eBPF map",
            MetricType::Gauge,
            &entries,
        )?;
        let ratios: Vec<_> = fill
            .iter()
            .map(|f| {
                let entries = u32::try_from(f.entries).unwrap_or(u32::MAX);
                let ratio = f64::from(entries) / f64::from(f.capacity.max(1));
                (vec![("map", f.map.to_owned())], ConstGauge::new(ratio))
            })
            .collect();
        family(
            &mut encoder,
            "proxyagent_bpf_map_fill_ratio",
            "Entries in each pinned eBPF map over its capacity",
            MetricType::Gauge,
            &ratios,
        )
    }
}

/// The node's connection-tracking table (both dataplanes: the nftables DNAT lives in
/// it, and so does anything else on the node).
#[derive(Debug)]
pub struct ConntrackSize;

fn read_number(path: &str) -> Option<i64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

impl Collector for ConntrackSize {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (Some(count), Some(max)) = (
            read_number("/proc/sys/net/netfilter/nf_conntrack_count"),
            read_number("/proc/sys/net/netfilter/nf_conntrack_max"),
        ) else {
            return Ok(());
        };
        family(
            &mut encoder,
            "proxyagent_conntrack_entries",
            "Entries in the node's conntrack table",
            MetricType::Gauge,
            &[(Vec::new(), ConstGauge::new(count))],
        )?;
        family(
            &mut encoder,
            "proxyagent_conntrack_max",
            "Capacity of the node's conntrack table (nf_conntrack_max)",
            MetricType::Gauge,
            &[(Vec::new(), ConstGauge::new(max))],
        )
    }
}

/// The nftables dataplane's verdict counters (named counters in our Service tables,
/// summed over every table of both families): refusals and drops by reason.
#[derive(Debug)]
pub struct NftablesVerdicts;

impl NftablesVerdicts {
    fn read() -> std::collections::BTreeMap<String, u64> {
        let mut totals = std::collections::BTreeMap::new();
        for family in ["ip", "ip6"] {
            // No table of a family (yet) is no count, not an error worth a log per scrape.
            let Ok(counters) = crate::dataplane::nftables::listing::counters(family) else {
                continue;
            };
            for (name, packets) in counters {
                *totals.entry(name).or_insert(0) += packets;
            }
        }
        totals
    }
}

impl Collector for NftablesVerdicts {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use crate::dataplane::nftables::table::{
            COUNTER_DROP_NO_LOCAL_ENDPOINTS, COUNTER_DROP_SOURCE_RANGE, COUNTER_REJECT_NO_ENDPOINTS,
        };
        let totals = Self::read();
        let row = |counter: &str, reason: &str| {
            totals
                .get(counter)
                .map(|n| (vec![("reason", reason.to_owned())], ConstCounter::new(*n)))
        };
        let rejects: Vec<_> = row(COUNTER_REJECT_NO_ENDPOINTS, "no_endpoints")
            .into_iter()
            .collect();
        family(
            &mut encoder,
            "proxyagent_datapath_rejects",
            "Packets to a Service refused by the nftables rules, by reason",
            MetricType::Counter,
            &rejects,
        )?;
        let drops: Vec<_> = [
            row(COUNTER_DROP_NO_LOCAL_ENDPOINTS, "no_local_endpoints"),
            row(COUNTER_DROP_SOURCE_RANGE, "source_range"),
        ]
        .into_iter()
        .flatten()
        .collect();
        family(
            &mut encoder,
            "proxyagent_datapath_drops",
            "Packets to a Service dropped by the nftables rules, by reason",
            MetricType::Counter,
            &drops,
        )
    }
}
