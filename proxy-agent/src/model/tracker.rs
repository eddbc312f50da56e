//! The desired state kept current change by change (kube-proxy's change trackers,
//! Cilium's per-object reconciliation): a change to some Services rebuilds the frontends
//! of those Services only. Two Services claiming one frontend key resolve as a full
//! build does, the last Service in key order winning; the others wait in `contested`
//! and take over when the winner lets go. Pure, like the rest of the model.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use super::{
    build::service_frontends,
    node::NodeInfo,
    snapshot::{ObjectKey, Snapshot},
    types::{DesiredState, Frontend, FrontendKey},
};

#[derive(Clone, Debug)]
pub struct Tracker {
    node: NodeInfo,
    desired: DesiredState,
    /// The frontend keys each Service asked for.
    by_service: HashMap<ObjectKey, Vec<FrontendKey>>,
    /// Frontends a later Service in key order took over, by their own Service.
    contested: BTreeMap<FrontendKey, BTreeMap<ObjectKey, Arc<Frontend>>>,
}

/// Whether `frontend` is `owner`'s (the Service it was built from).
fn owned_by(frontend: &Frontend, owner: &ObjectKey) -> bool {
    frontend.service.namespace == owner.0 && frontend.service.name == owner.1
}

fn owner_of(frontend: &Frontend) -> ObjectKey {
    (
        frontend.service.namespace.clone(),
        frontend.service.name.clone(),
    )
}

impl Tracker {
    /// The full build: every Service of `snapshot`, for `node`.
    #[must_use]
    pub fn new(snapshot: &Snapshot, node: NodeInfo) -> Self {
        let mut tracker = Self {
            node,
            desired: DesiredState::default(),
            by_service: HashMap::new(),
            contested: BTreeMap::new(),
        };
        for key in snapshot.services().keys() {
            tracker.rebuild(snapshot, key);
        }
        tracker
    }

    #[must_use]
    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    #[must_use]
    pub fn node(&self) -> &NodeInfo {
        &self.node
    }

    /// Rebuilds the frontends of `services` from `snapshot` (Services gone from it lose
    /// theirs).
    pub fn update(&mut self, snapshot: &Snapshot, services: &BTreeSet<ObjectKey>) {
        for key in services {
            self.rebuild(snapshot, key);
        }
    }

    fn rebuild(&mut self, snapshot: &Snapshot, service: &ObjectKey) {
        let frontends = service_frontends(snapshot, service, &self.node);
        for key in self.by_service.remove(service).unwrap_or_default() {
            self.withdraw(service, &key);
        }
        if frontends.is_empty() {
            return;
        }
        let keys = frontends.iter().map(|(k, _)| *k).collect();
        for (key, frontend) in frontends {
            self.place(service, key, frontend);
        }
        self.by_service.insert(service.clone(), keys);
    }

    fn place(&mut self, owner: &ObjectKey, key: FrontendKey, frontend: Arc<Frontend>) {
        let holder = self
            .desired
            .frontends
            .get(&key)
            .filter(|current| !owned_by(current, owner))
            .map(|current| owner_of(current));
        match holder {
            Some(holder) if holder > *owner => {
                self.contested
                    .entry(key)
                    .or_default()
                    .insert(owner.clone(), frontend);
            }
            Some(holder) => {
                if let Some(previous) = self.desired.frontends.insert(key, frontend) {
                    self.contested
                        .entry(key)
                        .or_default()
                        .insert(holder, previous);
                }
            }
            None => {
                self.desired.frontends.insert(key, frontend);
            }
        }
    }

    fn withdraw(&mut self, owner: &ObjectKey, key: &FrontendKey) {
        if let Some(waiting) = self.contested.get_mut(key) {
            if waiting.remove(owner).is_some() {
                if waiting.is_empty() {
                    self.contested.remove(key);
                }
                return;
            }
        }
        if !self
            .desired
            .frontends
            .get(key)
            .is_some_and(|f| owned_by(f, owner))
        {
            return;
        }
        self.desired.frontends.remove(key);
        let next = self.contested.get_mut(key).and_then(BTreeMap::pop_last);
        if let Some((_, frontend)) = next {
            self.desired.frontends.insert(*key, frontend);
        }
        if self.contested.get(key).is_some_and(BTreeMap::is_empty) {
            self.contested.remove(key);
        }
    }
}
