//! DNS metrics under CoreDNS's names, so node-local-dns dashboards keep working.
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub proto: &'static str,
    pub family: &'static str,
    #[prometheus(flatten)]
    pub kind: TypeLabel,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    pub r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RcodeLabel {
    pub rcode: &'static str,
}

/// Shared handles; registered once with the agent's registry.
#[derive(Clone)]
pub struct DnsMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub responses: Family<RcodeLabel, Counter>,
    pub cache_hits: Family<TypeLabel, Counter>,
    pub cache_misses: Counter,
    pub cache_entries: Family<TypeLabel, Gauge>,
    pub cache_prefetch: Counter,
    pub cache_served_stale: Counter,
    pub cache_evictions: Counter,
    pub forward_requests: Counter,
    pub forward_duration: Histogram,
    pub dropped: Counter,
}

impl DnsMetrics {
    #[must_use]
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            responses: Family::default(),
            cache_hits: Family::default(),
            cache_misses: Counter::default(),
            cache_entries: Family::default(),
            cache_prefetch: Counter::default(),
            cache_served_stale: Counter::default(),
            cache_evictions: Counter::default(),
            forward_requests: Counter::default(),
            forward_duration: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.000_25, 2.0, 16),
            ),
            dropped: Counter::default(),
        };
        let c = registry;
        c.register(
            "coredns_dns_requests",
            "DNS queries received",
            m.requests.clone(),
        );
        c.register(
            "coredns_dns_responses",
            "DNS responses sent, by rcode",
            m.responses.clone(),
        );
        c.register(
            "coredns_cache_hits",
            "Cache hits, by type (success, denial)",
            m.cache_hits.clone(),
        );
        c.register(
            "coredns_cache_misses",
            "Cache misses",
            m.cache_misses.clone(),
        );
        c.register(
            "coredns_cache_entries",
            "Entries in the cache, by type",
            m.cache_entries.clone(),
        );
        c.register(
            "coredns_cache_prefetch",
            "Entries refreshed before they expired",
            m.cache_prefetch.clone(),
        );
        c.register(
            "coredns_cache_served_stale",
            "Expired answers served while upstreams failed",
            m.cache_served_stale.clone(),
        );
        c.register(
            "coredns_cache_evictions",
            "Entries evicted to keep the cache bounded",
            m.cache_evictions.clone(),
        );
        c.register(
            "coredns_forward_requests",
            "Queries sent upstream",
            m.forward_requests.clone(),
        );
        c.register(
            "coredns_forward_request_duration_seconds",
            "Upstream round-trip time",
            m.forward_duration.clone(),
        );
        c.register(
            "proxyagent_dns_dropped",
            "Malformed or unanswerable packets dropped",
            m.dropped.clone(),
        );
        m
    }
}
