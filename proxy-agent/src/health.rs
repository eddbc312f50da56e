//! `/healthz` and `/livez` with kube-proxy's semantics: healthy once the first sync is
//! programmed, unhealthy when a pending change waits longer than `--healthz-stale-after`;
//! `/healthz` (not `/livez`) also fails while the node is being deleted or is tainted
//! for removal by the cluster autoscaler, so load balancers drain it first. A dataplane
//! that programs all but a few frontends, or whose last sync failed, is degraded: the
//! body says so (`failedFrontends`, `lastError`) and the status does not flap.
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use axum::{extract::State, http::StatusCode, routing::get, Json, Router};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};
use serde::Serialize;

/// kube-proxy's label on `kubeproxy_proxy_healthz_total` and `_livez_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: u16,
}

/// Answers given, by status code (exported as kube-proxy's healthz counters).
#[derive(Clone, Debug, Default)]
pub struct Answers {
    pub healthz: Family<CodeLabel, Counter>,
    pub livez: Family<CodeLabel, Counter>,
}

#[derive(Debug, Default)]
struct Inner {
    last_updated: Option<SystemTime>,
    source_generation: u64,
    programmed_generation: u64,
    pending_since: Option<Instant>,
    /// Deleted or tainted `ToBeDeletedByClusterAutoscaler`.
    node_leaving: bool,
    /// Frontends the last sync skipped.
    failed_frontends: usize,
    /// Why the last sync failed or skipped frontends (none once one succeeds whole).
    last_error: Option<String>,
}

/// The cluster autoscaler's taint on a node it is about to remove.
pub const TAINT_TO_BE_DELETED: &str = "ToBeDeletedByClusterAutoscaler";

/// Shared between the sync loop (writer) and the HTTP server (reader).
#[derive(Debug)]
pub struct Health {
    dataplane: &'static str,
    stale_after: Duration,
    inner: Mutex<Inner>,
    pub answers: Answers,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body {
    last_updated: String,
    current_time: String,
    dataplane: &'static str,
    source_generation: u64,
    programmed_generation: u64,
    node_eligible: bool,
    failed_frontends: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error: Option<String>,
}

impl Health {
    #[must_use]
    pub fn new(dataplane: &'static str, stale_after: Duration) -> Self {
        Self {
            dataplane,
            stale_after,
            inner: Mutex::default(),
            answers: Answers::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The source delivered `generation`.
    pub fn source_changed(&self, generation: u64) {
        let mut inner = self.lock();
        if generation > inner.source_generation {
            inner.source_generation = generation;
            inner.pending_since.get_or_insert_with(Instant::now);
        }
    }

    /// The kernel now reflects `generation`.
    pub fn programmed(&self, generation: u64) {
        let mut inner = self.lock();
        inner.programmed_generation = generation;
        inner.last_updated = Some(SystemTime::now());
        if generation >= inner.source_generation {
            inner.pending_since = None;
        }
    }

    /// What the last sync left undone: `failed` frontends skipped, and why (`None`:
    /// nothing). A whole sync that failed keeps the previous count.
    pub fn degraded(&self, failed: Option<usize>, error: Option<String>) {
        let mut inner = self.lock();
        if let Some(failed) = failed {
            inner.failed_frontends = failed;
        }
        inner.last_error = error;
    }

    /// Follows this node's Node object (absent: eligible).
    pub fn node_changed(&self, node: Option<&k8s_openapi::api::core::v1::Node>) {
        let leaving = node.is_some_and(|n| {
            n.metadata.deletion_timestamp.is_some()
                || n.spec
                    .as_ref()
                    .and_then(|s| s.taints.as_ref())
                    .is_some_and(|t| t.iter().any(|t| t.key == TAINT_TO_BE_DELETED))
        });
        self.lock().node_leaving = leaving;
    }

    /// Whether `/healthz` would answer 200 now.
    #[must_use]
    pub fn is_healthy(&self) -> bool {
        self.status().0 == StatusCode::OK
    }

    /// `/healthz`: programmed, fresh, and the node is staying.
    fn status(&self) -> (StatusCode, Body) {
        let (code, body) = self.liveness();
        if body.node_eligible {
            (code, body)
        } else {
            (StatusCode::SERVICE_UNAVAILABLE, body)
        }
    }

    /// `/livez`: programmed and fresh, whatever the node's fate.
    fn liveness(&self) -> (StatusCode, Body) {
        let inner = self.lock();
        let stale = inner
            .pending_since
            .is_some_and(|t| t.elapsed() > self.stale_after);
        let healthy = inner.last_updated.is_some() && !stale;
        let body = Body {
            last_updated: inner.last_updated.map(rfc3339).unwrap_or_default(),
            current_time: rfc3339(SystemTime::now()),
            dataplane: self.dataplane,
            source_generation: inner.source_generation,
            programmed_generation: inner.programmed_generation,
            node_eligible: !inner.node_leaving,
            failed_frontends: inner.failed_frontends,
            last_error: inner.last_error.clone(),
        };
        let code = if healthy {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        (code, body)
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

async fn healthz(State(health): State<Arc<Health>>) -> (StatusCode, Json<Body>) {
    let (code, body) = health.status();
    health
        .answers
        .healthz
        .get_or_create(&CodeLabel {
            code: code.as_u16(),
        })
        .inc();
    (code, Json(body))
}

async fn livez(State(health): State<Arc<Health>>) -> (StatusCode, Json<Body>) {
    let (code, body) = health.liveness();
    health
        .answers
        .livez
        .get_or_create(&CodeLabel {
            code: code.as_u16(),
        })
        .inc();
    (code, Json(body))
}

/// Serves until the process exits.
pub async fn serve(addr: SocketAddr, health: Arc<Health>) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .with_state(health);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_only_after_first_sync_and_until_a_change_waits_too_long() {
        let health = Health::new("ebpf", Duration::from_millis(20));
        health.source_changed(1);
        assert_eq!(health.status().0, StatusCode::SERVICE_UNAVAILABLE);
        health.programmed(1);
        assert_eq!(health.status().0, StatusCode::OK);
        health.source_changed(2);
        assert_eq!(health.status().0, StatusCode::OK);
        std::thread::sleep(Duration::from_millis(30));
        let (code, body) = health.status();
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!((body.source_generation, body.programmed_generation), (2, 1));
        health.programmed(2);
        assert_eq!(health.status().0, StatusCode::OK);
    }

    #[test]
    fn skipped_frontends_show_in_the_body_without_failing_healthz() {
        let health = Health::new("ebpf", Duration::from_mins(1));
        health.source_changed(1);
        health.programmed(1);
        health.degraded(
            Some(2),
            Some("2 frontends skipped (ids_exhausted 2)".into()),
        );
        let (code, body) = health.status();
        assert_eq!(code, StatusCode::OK);
        let json = serde_json::to_value(&body).unwrap();
        assert_eq!(json["failedFrontends"], 2);
        assert_eq!(json["lastError"], "2 frontends skipped (ids_exhausted 2)");
        // A whole sync failing keeps the count and says why; the status stays.
        health.degraded(None, Some("sync failed: nft rejected the ruleset".into()));
        let (code, body) = health.status();
        assert_eq!((code, body.failed_frontends), (StatusCode::OK, 2));
        health.degraded(Some(0), None);
        let json = serde_json::to_value(health.status().1).unwrap();
        assert_eq!(json["failedFrontends"], 0);
        assert!(json.get("lastError").is_none());
    }

    #[test]
    fn a_leaving_node_fails_healthz_but_not_livez() {
        let health = Health::new("nftables", Duration::from_mins(1));
        health.source_changed(1);
        health.programmed(1);
        let mut node: k8s_openapi::api::core::v1::Node =
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "node1"},
                "spec": {"taints": [{"key": TAINT_TO_BE_DELETED, "effect": "NoSchedule"}]}
            }))
            .unwrap();
        health.node_changed(Some(&node));
        assert_eq!(health.status().0, StatusCode::SERVICE_UNAVAILABLE);
        assert!(!health.status().1.node_eligible);
        assert_eq!(health.liveness().0, StatusCode::OK);
        node.spec = None;
        health.node_changed(Some(&node));
        assert_eq!(health.status().0, StatusCode::OK);
        node.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        health.node_changed(Some(&node));
        assert_eq!(health.status().0, StatusCode::SERVICE_UNAVAILABLE);
        health.node_changed(None);
        assert_eq!(health.status().0, StatusCode::OK);
    }
}
