//! When to program: wait for the source's initial load, then turn every snapshot into a
//! plan against what the kernel holds and apply it; a failed apply re-reads the kernel
//! and retries with backoff.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::watch;
use tracing::{error, info, info_span};

use crate::{
    dataplane::Dataplane,
    health::Health,
    health_check::HealthChecks,
    introspect::{Live, Programmed},
    metrics::{Metrics, TrafficPolicyLabel},
    model::{self, DesiredState, NodeInfo, ObjectKey, Snapshot},
    source::SourceUpdate,
};

/// The EndpointSlice annotation the EndpointSlice controller stamps with the time of
/// the change that triggered it (kube-proxy's network programming latency starts there).
const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// Trigger times already accounted for, so each change is observed once, when the sync
/// that carries it lands.
struct TriggerTimes {
    seen: BTreeMap<ObjectKey, String>,
    /// Changes from before the agent started were programmed by somebody else.
    since: SystemTime,
}

impl TriggerTimes {
    fn new() -> Self {
        Self {
            seen: BTreeMap::new(),
            since: SystemTime::now(),
        }
    }

    /// Observes, for each slice whose trigger time is new, how long ago that was.
    fn programmed(&mut self, snapshot: &Snapshot, metrics: &Metrics) {
        let now = SystemTime::now();
        let mut seen = BTreeMap::new();
        for (key, slice) in &snapshot.endpoint_slices {
            let Some(stamp) = slice
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(TRIGGER_TIME))
            else {
                continue;
            };
            if self.seen.get(key) != Some(stamp) {
                if let Ok(at) = humantime::parse_rfc3339_weak(stamp) {
                    if at >= self.since {
                        let latency = now.duration_since(at).unwrap_or_default();
                        metrics.network_programming.observe(latency.as_secs_f64());
                    }
                }
            }
            seen.insert(key.clone(), stamp.clone());
        }
        self.seen = seen;
    }
}

/// Services with a Local traffic policy and no endpoints on this node, by policy
/// (kube-proxy's `internal` / `external` labels).
fn no_local_endpoints(desired: &DesiredState) -> (i64, i64) {
    let (mut internal, mut external) = (BTreeSet::new(), BTreeSet::new());
    for frontend in desired.frontends.values() {
        let service = (&frontend.service.namespace, &frontend.service.name);
        if frontend.pod.local && frontend.pod.backends.is_empty() {
            internal.insert(service);
        }
        if frontend.external.local && frontend.external.backends.is_empty() {
            external.insert(service);
        }
    }
    (gauge(internal.len()), gauge(external.len()))
}

const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// Runs until the source goes away; `addresses` are the node's own (rtnetlink), joined
/// with those its Node object lists.
pub async fn run(
    mut updates: watch::Receiver<SourceUpdate>,
    mut addresses: watch::Receiver<Vec<IpAddr>>,
    mut dataplane: Box<dyn Dataplane>,
    node: NodeInfo,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    live: Arc<Live>,
) {
    let mut programmed = None;
    let mut health_checks = HealthChecks::new(health.clone());
    let mut retry = RETRY_MIN;
    let mut triggers = TriggerTimes::new();
    loop {
        let update = updates.borrow_and_update().clone();
        health.source_changed(update.generation);
        if let Some(snapshot) = update.snapshot {
            let span = info_span!("sync", generation = update.generation).entered();
            let started = Instant::now();
            let current = match programmed.take() {
                Some(state) => Ok(state),
                None => dataplane.programmed().map(Arc::new),
            };
            health.node_changed(snapshot.nodes.get(&node.name));
            let mut node = node.clone();
            node.addresses.clone_from(&addresses.borrow_and_update());
            let node = node.with_node_object(&snapshot);
            let desired = model::build(&snapshot, &node);
            let result = current.and_then(|current| {
                let plan = model::diff(&current, &desired);
                dataplane
                    .apply(&plan, &desired)
                    .map(|applied| (plan, applied))
            });
            match result {
                Ok((plan, applied)) => {
                    let elapsed = started.elapsed().as_secs_f64();
                    info!(
                        frontends = desired.frontends.len(),
                        upserted = plan.upsert.len(),
                        removed = plan.remove.len(),
                        kernel_writes = applied.writes,
                        full = applied.full,
                        elapsed_ms = elapsed * 1000.0,
                        "synced"
                    );
                    metrics.sync_duration.observe(elapsed);
                    if applied.full {
                        metrics.sync_full_duration.observe(elapsed);
                    } else {
                        metrics.sync_partial_duration.observe(elapsed);
                    }
                    metrics.sync_last_timestamp.set(unix_seconds());
                    metrics
                        .programmed_frontends
                        .set(gauge(desired.frontends.len()));
                    let slots = desired
                        .frontends
                        .values()
                        .map(|f| f.pod.backends.len())
                        .sum();
                    metrics.programmed_backends.set(gauge(slots));
                    let (internal, external) = no_local_endpoints(&desired);
                    for (policy, value) in [("internal", internal), ("external", external)] {
                        metrics
                            .no_local_endpoints
                            .get_or_create(&TrafficPolicyLabel {
                                traffic_policy: policy,
                            })
                            .set(value);
                    }
                    triggers.programmed(&snapshot, &metrics);
                    health_checks.update(&desired);
                    let desired = Arc::new(desired);
                    live.set(Programmed {
                        snapshot: Arc::clone(&snapshot),
                        node: node.clone(),
                        desired: Arc::clone(&desired),
                    });
                    programmed = Some(desired);
                    health.programmed(update.generation);
                    retry = RETRY_MIN;
                }
                Err(error) => {
                    metrics.sync_errors.inc();
                    error!(%error, retry_in_ms = retry.as_millis(), "sync failed; will re-read the kernel state and retry");
                    drop(span);
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(RETRY_MAX);
                    continue;
                }
            }
        }
        tokio::select! {
            changed = updates.changed() => if changed.is_err() {
                return;
            },
            // A closed address channel disables this branch; the source still drives.
            Ok(()) = addresses.changed() => {}
        }
    }
}

fn unix_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
