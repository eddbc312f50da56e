//! When and what to program: wait for the source's initial load, then follow each new
//! snapshot with the Services it changed (the model rebuilds those only, the plan holds
//! their frontends only) and apply the plan. A change after a quiet period is programmed
//! at once; within `--min-sync-period` of the last sync it waits, so a burst coalesces
//! (kube-proxy's bounded-frequency runner). A failed apply re-reads the kernel and
//! retries with backoff, or sooner with the next change. Runs on a thread of its own,
//! off the runtime serving DNS, health and metrics.
mod followers;

use std::{
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
    metrics::{Metrics, ReasonLabel},
    model::{self, DesiredState, LocalTraffic, NodeInfo, Snapshot, Tracker},
    source::SourceUpdate,
};

const RETRY_MIN: Duration = Duration::from_millis(100);
/// How soon a sync that left state to remove (see `Applied::tidy_later`) is followed by
/// one that removes it, when no change comes first.
const TIDY_AFTER: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// How often a periodic sync re-reads the kernel and repairs drift (kube-proxy's
/// `FullSyncPeriod`).
const FULL_SYNC_PERIOD: Duration = Duration::from_hours(1);

/// Everything the sync loop is handed.
pub struct Inputs {
    pub updates: watch::Receiver<SourceUpdate>,
    /// The node's own addresses (rtnetlink), joined with those its Node object lists.
    pub addresses: watch::Receiver<Vec<IpAddr>>,
    pub dataplane: Box<dyn Dataplane>,
    pub node: NodeInfo,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    pub live: Arc<Live>,
    pub min_sync_period: Duration,
    /// A sync runs at least this often, changes or not (`--sync-period`).
    pub sync_period: Duration,
    /// The runtime the health-check servers run on.
    pub runtime: tokio::runtime::Handle,
}

/// Runs the loop on a thread of its own; the future ends when the loop does.
pub async fn spawn(inputs: Inputs) -> std::io::Result<()> {
    let done = crate::background::spawn("sync", move || run(inputs))?;
    let _ = done.await;
    Ok(())
}

/// The model as of the last snapshot it followed.
struct Model {
    snapshot: Arc<Snapshot>,
    tracker: Tracker,
}

/// The desired state for `snapshot`: rebuilt for the Services that changed since the
/// model's last snapshot, whole at start or when the node itself changed.
fn follow(model: Option<Model>, snapshot: &Arc<Snapshot>, node: NodeInfo) -> (Model, bool) {
    match model {
        Some(mut model) if *model.tracker.node() == node => {
            let changes = model.snapshot.changes_to(snapshot);
            model.tracker.update(snapshot, &changes.services);
            model.snapshot = Arc::clone(snapshot);
            (model, false)
        }
        _ => {
            let tracker = Tracker::new(snapshot, node);
            (
                Model {
                    snapshot: Arc::clone(snapshot),
                    tracker,
                },
                true,
            )
        }
    }
}

/// What the loop remembers between syncs.
struct State {
    model: Option<Model>,
    /// What the kernel holds (`None`: read it back first).
    programmed: Option<DesiredState>,
    /// The named desired state last programmed, which the followers compare against.
    published: DesiredState,
    published_snapshot: Option<Arc<Snapshot>>,
    gauges: followers::Gauges,
    health_checks: HealthChecks,
    since: SystemTime,
    /// The last sync left state for a later one to remove.
    tidy_later: bool,
    /// The local-traffic detection the dataplane was last given.
    local: Option<LocalTraffic>,
}

async fn run(mut inputs: Inputs) {
    let mut state = State {
        model: None,
        programmed: None,
        published: DesiredState::default(),
        published_snapshot: None,
        gauges: followers::Gauges::default(),
        health_checks: HealthChecks::new(inputs.health.clone(), inputs.runtime.clone()),
        since: SystemTime::now(),
        tidy_later: false,
        local: None,
    };
    let mut retry = RETRY_MIN;
    let mut last_sync: Option<Instant> = None;
    let mut retry_at: Option<Instant> = None;
    let mut retrying = false;
    let mut last_full = Instant::now();
    loop {
        if !retrying {
            // A change after a quiet period goes at once; one soon after a sync waits
            // out the minimum period, gathering whatever else arrives meanwhile.
            if let Some(at) = last_sync.map(|t| t + inputs.min_sync_period) {
                tokio::time::sleep_until(at.into()).await;
            }
        }
        let update = inputs.updates.borrow_and_update().clone();
        inputs.health.source_changed(update.generation);
        retrying = false;
        if let Some(snapshot) = update.snapshot {
            last_sync = Some(Instant::now());
            if sync_once(&mut inputs, &mut state, &snapshot, update.generation).is_ok() {
                retry = RETRY_MIN;
                retry_at = None;
            } else {
                // What failed is tried again after the backoff, or with the next change
                // if that comes first: a key that keeps failing never holds up others'
                // changes (kube-proxy's retry is a floor, not a gate, the same way).
                retry_at = Some(Instant::now() + retry);
                retry = (retry * 2).min(RETRY_MAX);
            }
        }
        let tidy = std::mem::take(&mut state.tidy_later);
        tokio::select! {
            changed = inputs.updates.changed() => if changed.is_err() {
                return;
            },
            // A closed address channel disables this branch; the source still drives.
            Ok(()) = inputs.addresses.changed() => {}
            // What the last sync left to remove goes in one more, with or without news.
            () = tokio::time::sleep(TIDY_AFTER), if tidy => {}
            () = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now).into()),
                if retry_at.is_some() => retrying = true,
            // Nothing changed for a sync period: sync anyway, and once an hour from what
            // the kernel holds, so whatever changed it behind our back is put right.
            () = tokio::time::sleep_until(last_sync.map_or_else(Instant::now, |t| t + inputs.sync_period).into()),
                if last_sync.is_some() => {
                if last_full.elapsed() >= FULL_SYNC_PERIOD {
                    info!("periodic full sync: re-reading what the kernel holds");
                    state.programmed = None;
                    last_full = Instant::now();
                }
            }
        }
    }
}

fn sync_once(
    inputs: &mut Inputs,
    state: &mut State,
    snapshot: &Arc<Snapshot>,
    generation: u64,
) -> Result<(), ()> {
    let _span = info_span!("sync", generation).entered();
    let started = Instant::now();
    inputs
        .health
        .node_changed(snapshot.nodes().get(&inputs.node.name).map(AsRef::as_ref));
    let mut node = inputs.node.clone();
    node.addresses
        .clone_from(&inputs.addresses.borrow_and_update());
    let node = node.with_node_object(snapshot);
    let local_failed = follow_local(inputs, state, &node);
    let (model, full_build) = follow(state.model.take(), snapshot, node.clone());
    let desired = model.tracker.desired().clone();
    state.model = Some(model);
    let built = started.elapsed();
    let current = match state.programmed.take() {
        Some(programmed) => Ok(programmed),
        None => inputs.dataplane.programmed(),
    };
    let result = current.and_then(|current| {
        let plan = model::diff(&current, &desired);
        inputs
            .dataplane
            .apply(&plan, &desired)
            .map(|applied| (plan, applied))
    });
    let (plan, applied) = match result {
        Ok(done) => done,
        Err(error) => {
            count_error(inputs, error.reason(), 1);
            inputs
                .health
                .degraded(None, Some(format!("sync failed: {error}")));
            error!(%error, reason = error.reason(), "sync failed; will re-read the kernel state and retry");
            return Err(());
        }
    };
    let elapsed = started.elapsed().as_secs_f64();
    info!(
        frontends = desired.frontends.len(),
        upserted = plan.upsert.len(),
        removed = plan.remove.len(),
        failed = applied.failed.len(),
        kernel_writes = applied.writes,
        full = applied.full,
        full_build,
        build_ms = built.as_secs_f64() * 1000.0,
        elapsed_ms = elapsed * 1000.0,
        "synced"
    );
    let metrics = &inputs.metrics;
    metrics.sync_duration.observe(elapsed);
    if applied.full {
        metrics.sync_full_duration.observe(elapsed);
    } else {
        metrics.sync_partial_duration.observe(elapsed);
    }
    metrics.sync_last_timestamp.set(unix_seconds());
    if let Some(old) = &state.published_snapshot {
        followers::trigger_times(old, snapshot, state.since, metrics);
    }
    let touched_checks = state.gauges.follow(&state.published, &desired, metrics);
    let desired = Arc::new(desired);
    if touched_checks {
        state.health_checks.update(&desired);
    }
    inputs.live.set(Programmed {
        snapshot: Arc::clone(snapshot),
        node,
        desired: Arc::clone(&desired),
    });
    state.published = (*desired).clone();
    state.published_snapshot = Some(Arc::clone(snapshot));
    state.programmed = Some(programmed_after(&desired, &plan, &applied.failed));
    state.tidy_later = applied.tidy_later;
    inputs.health.programmed(generation);
    report_skipped(inputs, &applied);
    metrics
        .failed_frontends
        .set(i64::try_from(applied.failed.len()).unwrap_or(i64::MAX));
    if applied.failed.is_empty() && !local_failed {
        Ok(())
    } else {
        // The rest is programmed; the failed ones are tried again after the backoff.
        Err(())
    }
}

/// Hands the dataplane the node's local-traffic detection when it changed (with
/// `NodeCIDR`, as the Node's pod CIDRs do). A failure is counted and retried with the
/// sync; the rest of the sync goes on.
fn follow_local(inputs: &mut Inputs, state: &mut State, node: &NodeInfo) -> bool {
    let local = node.local();
    if state.local.as_ref() == Some(&local) {
        return false;
    }
    match inputs.dataplane.set_local(&local) {
        Ok(()) => {
            info!(mode = node.detect_local.mode(), %local, "local traffic detection");
            state.local = Some(local);
            false
        }
        Err(error) => {
            count_error(inputs, error.reason(), 1);
            error!(%error, %local, "cannot program local traffic detection; will retry");
            true
        }
    }
}

/// The frontends a sync skipped, by reason: counted, and said in `/healthz`'s body
/// (cleared once a sync skips none).
fn report_skipped(inputs: &Inputs, applied: &crate::dataplane::Applied) {
    let summary = (!applied.failed.is_empty()).then(|| {
        let reasons: Vec<String> = applied
            .failure_reasons
            .iter()
            .map(|(reason, n)| format!("{reason} {n}"))
            .collect();
        format!(
            "{} frontends skipped ({}); tried again after the backoff",
            applied.failed.len(),
            reasons.join(", ")
        )
    });
    inputs.health.degraded(Some(applied.failed.len()), summary);
    for (reason, n) in &applied.failure_reasons {
        count_error(inputs, reason, *n);
    }
}

/// `proxyagent_sync_errors_total{reason}` goes up by `n`.
fn count_error(inputs: &Inputs, reason: &'static str, n: usize) {
    inputs
        .metrics
        .sync_errors
        .get_or_create(&ReasonLabel { reason })
        .inc_by(u64::try_from(n).unwrap_or(u64::MAX));
}

/// What the kernel holds after a plan towards `desired` in which `failed` frontends
/// could not be written: those read as unknown, so the next plan writes them again
/// while they are wanted and removes them once they are not.
fn programmed_after(
    desired: &DesiredState,
    plan: &model::Plan,
    failed: &[model::FrontendKey],
) -> DesiredState {
    let mut programmed = desired.clone();
    for key in failed {
        // Unknown rather than absent: a failed upsert may hold ids and entries, which
        // the next plan must remove if the frontend is no longer wanted by then.
        if desired.frontends.contains_key(key) || plan.before.contains_key(key) {
            programmed
                .frontends
                .insert(*key, model::Frontend::unknown().into());
        }
    }
    programmed
}

fn unix_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::programmed_after;
    use crate::model::{diff, Backend, DesiredState, Frontend, FrontendKey, Protocol};

    fn key(last: u8) -> FrontendKey {
        FrontendKey {
            ip: IpAddr::V4(Ipv4Addr::new(10, 96, 0, last)),
            port: 80,
            protocol: Protocol::Tcp,
        }
    }

    fn frontend(pod: u8) -> Frontend {
        Frontend::backends_only(vec![Backend {
            ip: IpAddr::V4(Ipv4Addr::new(10, 244, 0, pod)),
            port: 8080,
        }])
    }

    /// The next plan holds exactly the frontends that failed: an upsert that failed is
    /// upserted again (or removed, once no longer wanted), a removal that failed is
    /// removed again, and the rest is left.
    #[test]
    fn the_next_plan_retries_only_what_failed() {
        let mut before = DesiredState::default();
        for (k, pod) in [(1, 1), (2, 2), (3, 3)] {
            before.frontends.insert(key(k), frontend(pod).into());
        }
        let mut desired = before.clone();
        desired.frontends.insert(key(1), frontend(9).into());
        desired.frontends.insert(key(2), frontend(9).into());
        desired.frontends.remove(&key(3));
        let plan = diff(&before, &desired);
        let programmed = programmed_after(&desired, &plan, &[key(2), key(3)]);
        let retry = diff(&programmed, &desired);
        assert_eq!(
            retry.upsert.keys().copied().collect::<Vec<_>>(),
            vec![key(2)]
        );
        assert_eq!(retry.remove, vec![key(3)]);
        // An upsert that failed and is no longer wanted is removed: whatever it took
        // (ids, slots) is given back.
        desired.frontends.remove(&key(2));
        let dropped = diff(&programmed, &desired);
        assert!(dropped.upsert.is_empty());
        assert_eq!(dropped.remove, vec![key(2), key(3)]);
    }
}
