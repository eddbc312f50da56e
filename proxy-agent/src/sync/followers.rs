//! What follows each sync besides the kernel: trigger-time latency, the
//! no-local-endpoint and backend gauges, and the health-check servers, each updated
//! from the frontends that changed rather than from the whole cluster.
use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::SystemTime,
};

use imbl::ordmap::DiffItem;

use crate::{
    metrics::{Metrics, TrafficPolicyLabel},
    model::{DesiredState, Frontend, ServicePortName, Snapshot},
};

/// Observes, for each slice whose trigger time changed from `old` to `new`, how long
/// ago that was (kube-proxy's network programming latency). Changes from before the
/// agent started were programmed by somebody else.
pub fn trigger_times(old: &Snapshot, new: &Snapshot, since: SystemTime, metrics: &Metrics) {
    let stamp = |slice: &crate::model::slice::Slice| slice.trigger_time.clone();
    let now = SystemTime::now();
    for item in old.endpoint_slices().diff(new.endpoint_slices()) {
        let (before, after) = match item {
            DiffItem::Add(_, new) => (None, stamp(new)),
            DiffItem::Update { old, new } => (stamp(old.1), stamp(new.1)),
            DiffItem::Remove(..) => continue,
        };
        let Some(after) = after.filter(|a| before.as_ref() != Some(a)) else {
            continue;
        };
        if let Ok(at) = humantime::parse_rfc3339_weak(&after) {
            if at >= since {
                let latency = now.duration_since(at).unwrap_or_default();
                metrics.network_programming.observe(latency.as_secs_f64());
            }
        }
    }
}

/// Per Service, how many of its frontends have a Local route left empty, by policy; and
/// the topology hints passed over, said once per Service port and reason.
#[derive(Default)]
pub struct Gauges {
    no_local: BTreeMap<(String, String), (usize, usize)>,
    hints_said: HashMap<ServicePortName, Arc<str>>,
    frontends: usize,
    slots: usize,
}

impl Gauges {
    /// Says why a Service port's topology hints were passed over, once per reason (its
    /// frontends share it); forgets it when the hints are used again or a frontend of
    /// the port goes.
    fn say_hints(&mut self, frontend: &Frontend, up: bool) {
        let service = &frontend.service;
        match (&frontend.hints_passed_over, up) {
            (Some(why), true) => {
                if self.hints_said.get(service) != Some(why) {
                    tracing::info!(service = %service, reason = %why, "topology hints passed over");
                    self.hints_said.insert(service.clone(), Arc::clone(why));
                }
            }
            (None, true) => {
                self.hints_said.remove(service);
            }
            (_, false) => {}
        }
    }

    fn count(&mut self, frontend: &Frontend, up: bool) {
        self.say_hints(frontend, up);
        let key = (
            frontend.service.namespace.clone(),
            frontend.service.name.clone(),
        );
        let internal = usize::from(frontend.pod.local && frontend.pod.backends.is_empty());
        let external =
            usize::from(frontend.external.local && frontend.external.backends.is_empty());
        let slots = frontend.pod.backends.len();
        if up {
            self.frontends += 1;
            self.slots += slots;
        } else {
            self.frontends = self.frontends.saturating_sub(1);
            self.slots = self.slots.saturating_sub(slots);
        }
        if internal + external == 0 {
            return;
        }
        let entry = self.no_local.entry(key.clone()).or_default();
        if up {
            entry.0 += internal;
            entry.1 += external;
        } else {
            entry.0 = entry.0.saturating_sub(internal);
            entry.1 = entry.1.saturating_sub(external);
        }
        if *entry == (0, 0) {
            self.no_local.remove(&key);
        }
    }

    /// Follows the frontends that changed from `old` to `new` and sets the gauges;
    /// true when a health-check port was among them.
    pub fn follow(&mut self, old: &DesiredState, new: &DesiredState, metrics: &Metrics) -> bool {
        let mut health_checks = false;
        for item in old.frontends.diff(&new.frontends) {
            let (before, after) = match item {
                DiffItem::Add(_, f) => (None, Some(f)),
                DiffItem::Remove(_, f) => {
                    // A frontend gone: its port's note goes too (said again, once, if
                    // the port's other frontends still pass hints over).
                    self.hints_said.remove(&f.service);
                    (Some(f), None)
                }
                DiffItem::Update { old, new } => (Some(old.1), Some(new.1)),
            };
            for (frontend, up) in [(before, false), (after, true)] {
                if let Some(frontend) = frontend {
                    health_checks |= frontend.health_check_node_port.is_some();
                    self.count(frontend, up);
                }
            }
        }
        metrics.programmed_frontends.set(gauge(self.frontends));
        metrics.programmed_backends.set(gauge(self.slots));
        let internal = self.no_local.values().filter(|c| c.0 > 0).count();
        let external = self.no_local.values().filter(|c| c.1 > 0).count();
        for (policy, value) in [("internal", internal), ("external", external)] {
            metrics
                .no_local_endpoints
                .get_or_create(&TrafficPolicyLabel {
                    traffic_policy: policy,
                })
                .set(gauge(value));
        }
        health_checks
    }
}

pub fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
