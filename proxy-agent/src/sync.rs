//! When to program: wait for the source's initial load, then turn every snapshot into a
//! plan against what the kernel holds and apply it; a failed apply re-reads the kernel
//! and retries with backoff.
use std::{net::IpAddr, sync::Arc, time::Duration, time::Instant};

use tokio::sync::watch;
use tracing::{error, info, info_span};

use crate::{
    dataplane::Dataplane,
    health::Health,
    health_check::HealthChecks,
    introspect::{Live, Programmed},
    metrics::Metrics,
    model::{self, NodeInfo},
    source::SourceUpdate,
};

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
