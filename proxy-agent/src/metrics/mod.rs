//! Prometheus metrics, under kube-proxy's names where one exists so existing dashboards
//! keep working, plus the agent's own (`proxyagent_*`).
pub mod datapath;

use std::{net::SocketAddr, sync::Arc};

use axum::{extract::State, http::header, routing::get, Router};

use crate::introspect::{self, Live};
use prometheus_client::{
    collector::Collector,
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DataplaneLabel {
    dataplane: String,
}

/// kube-proxy's label on the no-local-endpoints gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficPolicyLabel {
    pub traffic_policy: &'static str,
}

/// Why a sync, or one frontend in it, could not be programmed
/// (`proxyagent_sync_errors_total{reason}`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// Every metric the agent exports; cheap to clone (shared handles).
pub struct Metrics {
    registry: Registry,
    pub sync_duration: Histogram,
    pub sync_full_duration: Histogram,
    pub sync_partial_duration: Histogram,
    pub sync_last_timestamp: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub sync_errors: Family<ReasonLabel, Counter>,
    pub failed_frontends: Gauge,
    pub programmed_frontends: Gauge,
    pub programmed_backends: Gauge,
    pub network_programming: Histogram,
    pub no_local_endpoints: Family<TrafficPolicyLabel, Gauge>,
    pub dns: crate::dns::metrics::DnsMetrics,
}

/// kube-proxy's buckets for network programming latency: 0.25 s to 5 min.
fn programming_histogram() -> Histogram {
    let mut buckets = vec![0.25, 0.5];
    buckets.extend((1..60).map(f64::from));
    buckets.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    buckets.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    buckets.sort_by(f64::total_cmp);
    buckets.dedup();
    Histogram::new(buckets)
}

/// kube-proxy's buckets for sync durations: 1 ms doubling to ~16 s.
fn sync_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 15,
    ))
}

impl Metrics {
    /// `answers` are the health servers' counters; `collectors` read the kernel at
    /// scrape time.
    #[must_use]
    pub fn new(
        dataplane: &str,
        answers: &crate::health::Answers,
        collectors: Vec<Box<dyn Collector>>,
    ) -> Self {
        let mut registry = Registry::default();
        let sync_duration = sync_histogram();
        registry.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            sync_duration.clone(),
        );
        let sync_full_duration = sync_histogram();
        registry.register(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            sync_full_duration.clone(),
        );
        let sync_partial_duration = sync_histogram();
        registry.register(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            sync_partial_duration.clone(),
        );
        let sync_last_timestamp = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            sync_last_timestamp.clone(),
        );
        let sync_errors = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "proxyagent_sync_errors",
            "Failures to program the dataplane, by reason: a whole sync, or one frontend skipped in it",
            sync_errors.clone(),
        );
        let failed_frontends = Gauge::default();
        registry.register(
            "proxyagent_sync_failed_frontends",
            "Frontends the last sync could not program (skipped, tried again at the next)",
            failed_frontends.clone(),
        );
        let programmed_frontends = Gauge::default();
        registry.register(
            "proxyagent_programmed_frontends",
            "Service frontends (IP, port, protocol) the dataplane holds",
            programmed_frontends.clone(),
        );
        let programmed_backends = Gauge::default();
        registry.register(
            "proxyagent_programmed_backends",
            "Backend slots across all programmed frontends",
            programmed_backends.clone(),
        );
        let info = Family::<DataplaneLabel, Gauge>::default();
        info.get_or_create(&DataplaneLabel {
            dataplane: dataplane.to_owned(),
        })
        .set(1);
        registry.register(
            "proxyagent_dataplane_info",
            "The dataplane this agent programs",
            info,
        );
        let network_programming = programming_histogram();
        registry.register(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            network_programming.clone(),
        );
        let no_local_endpoints = Family::<TrafficPolicyLabel, Gauge>::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            no_local_endpoints.clone(),
        );
        registry.register(
            "kubeproxy_proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            answers.healthz.clone(),
        );
        registry.register(
            "kubeproxy_proxy_livez",
            "Cumulative proxy livez HTTP status",
            answers.livez.clone(),
        );
        for collector in collectors {
            registry.register_collector(collector);
        }
        let dns = crate::dns::metrics::DnsMetrics::register(&mut registry);
        Self {
            registry,
            sync_duration,
            sync_full_duration,
            sync_partial_duration,
            sync_last_timestamp,
            sync_errors,
            failed_frontends,
            programmed_frontends,
            programmed_backends,
            network_programming,
            no_local_endpoints,
            dns,
        }
    }

    /// The registry in Prometheus text format.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

async fn metrics(
    State(metrics): State<Arc<Metrics>>,
) -> ([(header::HeaderName, &'static str); 1], String) {
    // The datapath collectors read BPF maps and run `nft`: off the runtime that also
    // answers DNS and `/healthz`.
    let text = tokio::task::spawn_blocking(move || metrics.render())
        .await
        .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
}

/// Serves `/metrics` (and `/debug/trace` from the live state) until the process exits.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    live: Arc<Live>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(self::metrics))
        .with_state(metrics)
        .merge(
            Router::new()
                .route("/debug/trace", get(introspect::trace))
                .route("/debug/frontends", get(introspect::frontends))
                .with_state(live),
        );
    #[cfg(feature = "fault-hooks")]
    let app = app.merge(crate::fault::routes());
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::{Metrics, ReasonLabel};

    #[test]
    fn exports_kube_proxy_names_and_the_dataplane() {
        let metrics = Metrics::new("ebpf", &crate::health::Answers::default(), Vec::new());
        metrics.sync_duration.observe(0.002);
        metrics.programmed_frontends.set(3);
        metrics
            .sync_errors
            .get_or_create(&ReasonLabel {
                reason: "ids_exhausted",
            })
            .inc_by(2);
        let text = metrics.render();
        for want in [
            "kubeproxy_sync_proxy_rules_duration_seconds_count 1",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count 0",
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_count 0",
            "proxyagent_dataplane_info{dataplane=\"ebpf\"} 1",
            "proxyagent_programmed_frontends 3",
            "proxyagent_sync_errors_total{reason=\"ids_exhausted\"} 2",
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"0.25\"} 0",
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"300.0\"} 0",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }
}
