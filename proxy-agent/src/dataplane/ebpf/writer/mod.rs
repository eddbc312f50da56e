//! Applies a plan to the LB maps in Cilium's order (backends → slots → reverse NAT →
//! frontend with the new count → surplus slots → unused backends), so a program reading
//! the maps mid-update always finds a complete service, old or new. Frontends and their
//! scopes are written in `frontends.rs`.
mod frontends;
mod lookup;
use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, PoisonError},
};

use proxy_common::{ServiceValue, SCOPE_EXTERNAL, SERVICE_FLAG_AFFINITY};

use super::{
    dense::IdTable,
    ids::IdAllocator,
    index::{Index, SharedIndex},
    maglev,
    store::{BackendValue, MapStore, RevNatValue, SlotKey, SourceRange},
    EbpfError, Sizing,
};
use crate::model::{Backend, DesiredState, Frontend, FrontendKey, Plan, Protocol};

/// A backend as the maps identify it.
type BackendKey = (IpAddr, u16, u8);

/// One scope of a frontend as written: its slots' backend ids, slot-0 flags and
/// Maglev table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Scope {
    slots: Vec<u32>,
    flags: u8,
    maglev: u16,
}

#[derive(Debug, Clone, Default)]
struct ProgrammedFrontend {
    rev_nat: u32,
    /// Scope 0: the pod route (the socket LB's, and pods' per packet).
    pod: Scope,
    /// `SCOPE_EXTERNAL`: external clients' route where it differs.
    external: Option<Scope>,
    /// `sessionAffinity: ClientIP` timeout (seconds).
    affinity: Option<u32>,
    source_ranges: Vec<SourceRange>,
    /// Set when a write of this frontend failed part way: the maps may hold some of
    /// the old entries and some of the new. The scopes above then only say how many
    /// slots there may be (their ids are 0); these are the scopes whose references it
    /// holds, freed once it is written whole or removed.
    unsure: Option<Vec<Scope>>,
}

impl ProgrammedFrontend {
    /// The scopes whose references this frontend holds.
    fn held(&self) -> Vec<Scope> {
        self.unsure.clone().unwrap_or_else(|| {
            std::iter::once(self.pod.clone())
                .chain(self.external.clone())
                .collect()
        })
    }

    /// What a failed write of a frontend leaves: `old` as it was (if any), `taken` the
    /// scopes (external or not) acquired for the new version, `ranges` its new ranges.
    fn unsure_after(
        old: Option<&Self>,
        rev_nat: u32,
        taken: Vec<(bool, Scope)>,
        ranges: Vec<SourceRange>,
    ) -> Self {
        let longest = |external: bool| {
            let old = old.and_then(|o| {
                if external {
                    o.external.as_ref()
                } else {
                    Some(&o.pod)
                }
            });
            let lens = taken
                .iter()
                .filter(|(e, _)| *e == external)
                .map(|(_, s)| s.slots.len());
            old.map(|s| s.slots.len()).into_iter().chain(lens).max()
        };
        let placeholder = |len: usize| Scope {
            slots: vec![0; len],
            ..Scope::default()
        };
        let mut source_ranges: Vec<SourceRange> =
            old.map(|o| o.source_ranges.clone()).unwrap_or_default();
        source_ranges.extend(ranges);
        source_ranges.sort_unstable();
        source_ranges.dedup();
        let mut held = old.map(Self::held).unwrap_or_default();
        let (pod, external) = (longest(false).unwrap_or(0), longest(true));
        held.extend(taken.into_iter().map(|(_, scope)| scope));
        Self {
            rev_nat,
            pod: placeholder(pod),
            external: external.map(placeholder),
            affinity: None,
            source_ranges,
            unsure: Some(held),
        }
    }

    /// The slot-0 value of one of its scopes. Slot 0 has no backend: its id field
    /// carries the affinity timeout.
    fn front(&self, scope: &Scope) -> ServiceValue {
        ServiceValue {
            count: slot_number(scope.slots.len()),
            rev_nat_index: self.rev_nat,
            backend_id: self.affinity.unwrap_or(0),
            flags: scope.flags,
            maglev_table: scope.maglev,
            ..Default::default()
        }
    }
}

/// The writer's memory of what it put in the maps.
pub struct MapWriter<S> {
    store: S,
    frontends: BTreeMap<FrontendKey, ProgrammedFrontend>,
    backend_ids: lookup::BackendLookup,
    /// Each backend id's value and how many slots point at it.
    backends: IdTable<(BackendValue, u32)>,
    backend_alloc: IdAllocator,
    revnat_alloc: IdAllocator,
    /// Map operations performed so far.
    writes: usize,
    /// Ids as readers outside the sync loop see them (metrics, debug endpoints).
    index: SharedIndex,
    /// Ids freed by the apply under way, whose counters go with them.
    freed_revnat: Vec<u32>,
    freed_backends: Vec<u32>,
    /// Ids given out by the apply under way.
    new_frontends: Vec<(u32, FrontendKey)>,
    new_backends: Vec<u32>,
    /// Maglev tables of the per-packet path.
    maglev: maglev::Tables,
    /// After a failed apply: the next one writes each frontend through to the kernel
    /// before the next, so a failure belongs to the frontend that caused it (batched
    /// writes report theirs later, for the whole batch).
    isolate: bool,
    /// Unreferenced entries whose delete failed, left in their maps.
    left_behind: usize,
}

/// What one apply did.
#[derive(Debug, Default)]
pub struct Written {
    /// Map operations.
    pub writes: usize,
    /// Frontends that could not be written (skipped; the next apply tries them again).
    pub failed: Vec<FrontendKey>,
    /// How many of them failed, by reason ([`EbpfError::reason`]).
    pub reasons: std::collections::BTreeMap<&'static str, usize>,
}

impl<S: MapStore> MapWriter<S> {
    /// Takes over whatever the store already holds (a previous agent's state), with
    /// Maglev tables of the default size.
    pub fn restore(store: S) -> Result<Self, EbpfError> {
        Self::restore_with(store, Sizing::default())
    }

    /// [`Self::restore`] with ids for maps of `sizing`, and Maglev tables of its size
    /// (tables of another size are rebuilt as their frontends are next written).
    pub fn restore_with(store: S, sizing: Sizing) -> Result<Self, EbpfError> {
        let contents = store.read_all()?;
        let mut writer = Self {
            store,
            frontends: BTreeMap::new(),
            backend_ids: lookup::BackendLookup::default(),
            backends: IdTable::default(),
            backend_alloc: IdAllocator::new(sizing.backends()),
            // Index 0 means none.
            revnat_alloc: IdAllocator::new(sizing.revnat() - 1),
            writes: 0,
            index: Arc::default(),
            freed_revnat: Vec::new(),
            freed_backends: Vec::new(),
            new_frontends: Vec::new(),
            new_backends: Vec::new(),
            maglev: maglev::Tables::new(sizing.maglev_table_size),
            isolate: false,
            left_behind: 0,
        };
        for (&id, (size, set)) in &contents.maglev {
            writer.maglev.restore(id, *size, set.clone());
        }
        for (&id, backend) in &contents.backends {
            writer.backend_alloc.take(id);
            writer.backends.insert(id, (*backend, 0));
            writer.backend_ids.insert(id, &writer.backends);
        }
        for (key, value) in contents
            .services
            .iter()
            .filter(|(k, _)| k.slot() == 0 && k.scope() == 0)
        {
            let Some(frontend_key) = frontend_key(key) else {
                continue;
            };
            let pod = writer.restore_scope(&contents.services, key, value);
            let external_key = key.with_scope(SCOPE_EXTERNAL);
            let external = contents
                .services
                .get(&external_key)
                .map(|external| writer.restore_scope(&contents.services, &external_key, external));
            let source_ranges = contents
                .source_ranges
                .iter()
                .filter(|range| range.rev_nat_index() == value.rev_nat_index)
                .copied()
                .collect();
            writer.revnat_alloc.take(value.rev_nat_index);
            writer.frontends.insert(
                frontend_key,
                ProgrammedFrontend {
                    rev_nat: value.rev_nat_index,
                    pod,
                    external,
                    affinity: (value.flags & SERVICE_FLAG_AFFINITY != 0)
                        .then_some(value.backend_id),
                    source_ranges,
                    unsure: None,
                },
            );
        }
        writer.publish();
        Ok(writer)
    }

    /// A restored frontend scope; its backends and Maglev table take a reference.
    fn restore_scope(
        &mut self,
        services: &BTreeMap<SlotKey, ServiceValue>,
        base: &SlotKey,
        front: &ServiceValue,
    ) -> Scope {
        let slots: Vec<u32> = (1..=front.count)
            .filter_map(|slot| services.get(&base.with_slot(slot)).map(|v| v.backend_id))
            .collect();
        for id in &slots {
            if let Some((_, refs)) = self.backends.get_mut(id) {
                *refs += 1;
            }
        }
        if front.maglev_table != 0 {
            self.maglev.restored_user(front.maglev_table);
        }
        Scope {
            slots,
            flags: front.flags,
            maglev: front.maglev_table,
        }
    }

    /// The ids as the maps use them, kept current by every apply.
    #[must_use]
    pub fn index(&self) -> SharedIndex {
        Arc::clone(&self.index)
    }

    /// Rebuilds the shared index from the writer's memory (at start only: applies
    /// update it by their changes).
    fn publish(&self) {
        let index = Index {
            frontends: self
                .frontends
                .iter()
                .map(|(key, programmed)| (programmed.rev_nat, *key))
                .collect(),
            backends: self
                .backends
                .iter()
                .map(|(id, (value, _))| (id, backend_of(value)))
                .collect(),
        };
        *self.index.write().unwrap_or_else(PoisonError::into_inner) = index;
    }

    /// The state the maps hold, without names (the kernel keeps none).
    #[must_use]
    pub fn programmed(&self) -> DesiredState {
        let frontends = self
            .frontends
            .iter()
            .map(|(key, programmed)| {
                if programmed.unsure.is_some() {
                    // Matches no desired frontend: the next plan writes or removes it.
                    return (*key, Frontend::unknown());
                }
                let backends = programmed
                    .pod
                    .slots
                    .iter()
                    .filter_map(|id| self.backends.get(id))
                    .map(|(value, _)| backend_of(value))
                    .collect();
                let mut frontend = Frontend::backends_only(backends);
                frontend.affinity_timeout = programmed.affinity;
                (*key, frontend)
            })
            .collect();
        DesiredState { frontends }
    }

    /// The store, counting one more map operation.
    fn write(&mut self) -> &mut S {
        self.writes += 1;
        &mut self.store
    }

    /// Programs the plan. A frontend that cannot be written is skipped and named in
    /// [`Written::failed`], the others written; the error is for a failure that cannot
    /// be pinned on one frontend (a batch of writes), after which every frontend this
    /// apply wrote is unsure and the next apply goes one frontend at a time.
    pub fn apply(&mut self, plan: &Plan) -> Result<Written, EbpfError> {
        let before = self.writes;
        let mut touched = Vec::new();
        let result = self.apply_all(plan, &mut touched);
        // What waits is written even after a failure: those entries succeeded as far as
        // the writer's bookkeeping goes.
        let flushed = self.store.flush();
        let result = result.and_then(|failed| flushed.map(|()| failed));
        if result.is_err() {
            self.isolate = true;
            for key in &touched {
                self.mark_unsure(key);
            }
        }
        let revnat = std::mem::take(&mut self.freed_revnat);
        let backends = std::mem::take(&mut self.freed_backends);
        if self.writes != before {
            let mut index = self.index.write().unwrap_or_else(PoisonError::into_inner);
            for index_id in &revnat {
                index.frontends.remove(index_id);
            }
            for id in &backends {
                index.backends.remove(id);
            }
            index.frontends.extend(self.new_frontends.drain(..));
            // An id given out and freed again in this apply is not named.
            let named = self
                .new_backends
                .drain(..)
                .filter_map(|id| Some((id, backend_of(&self.backends.get(&id)?.0))));
            index.backends.extend(named);
        }
        if !revnat.is_empty() || !backends.is_empty() {
            // Counters of a freed id would be credited to its next owner.
            if let Err(error) = self.store.forget_stats(&revnat, &backends) {
                tracing::warn!(%error, "cannot remove the counters of removed frontends");
            }
        }
        let failures = result?;
        let mut reasons = std::collections::BTreeMap::new();
        for (_, reason) in &failures {
            *reasons.entry(*reason).or_insert(0) += 1;
        }
        let failed: Vec<FrontendKey> = failures.into_iter().map(|(key, _)| key).collect();
        if failed.is_empty() {
            self.isolate = false;
        }
        Ok(Written {
            writes: self.writes - before,
            failed,
            reasons,
        })
    }

    /// The frontends that failed, when each failure is known to be its own.
    fn apply_all(
        &mut self,
        plan: &Plan,
        touched: &mut Vec<FrontendKey>,
    ) -> Result<Vec<(FrontendKey, &'static str)>, EbpfError> {
        for id in self.maglev.unused() {
            if self.maglev.release(id) {
                if let Err(error) = self.write().del_maglev(id) {
                    self.left_behind(&error);
                }
            }
        }
        let mut failed = Vec::new();
        let steps = plan.remove.iter().map(|key| (key, None)).chain(
            plan.upsert
                .iter()
                .map(|(key, frontend)| (key, Some(frontend))),
        );
        for (key, frontend) in steps {
            let result = match frontend {
                None => self.remove(key),
                Some(frontend) => self.upsert(key, frontend),
            };
            let result = result.and_then(|()| {
                if self.isolate {
                    self.store.flush()
                } else {
                    Ok(())
                }
            });
            match result {
                Ok(()) => touched.push(*key),
                // Batched: the failed write may be an earlier frontend's (running out
                // of ids is always this one's own).
                Err(error) if !self.isolate && !matches!(error, EbpfError::Exhausted(_)) => {
                    return Err(error)
                }
                Err(error) => {
                    tracing::warn!(frontend = %key, %error, "cannot program this frontend; skipped, and tried again at the next sync");
                    // The flush may have failed after its own writes went in.
                    self.mark_unsure(key);
                    failed.push((*key, error.reason()));
                }
            }
        }
        Ok(failed)
    }

    /// Marks a frontend whose entries may not all have reached the kernel as unsure
    /// (see [`ProgrammedFrontend::unsure`]), keeping the references it holds.
    fn mark_unsure(&mut self, key: &FrontendKey) {
        if let Some(record) = self.frontends.get(key).filter(|r| r.unsure.is_none()) {
            let unsure = ProgrammedFrontend::unsure_after(
                Some(record),
                record.rev_nat,
                Vec::new(),
                Vec::new(),
            );
            self.frontends.insert(*key, unsure);
        }
    }

    /// An unreferenced entry that could not be deleted.
    fn left_behind(&mut self, error: &EbpfError) {
        self.left_behind += 1;
        tracing::warn!(%error, left_behind = self.left_behind, "cannot delete an unused map entry; left in place");
    }

    /// Allows at most `limit` Maglev tables (a fresh writer's; for tests).
    #[cfg(test)]
    pub(crate) fn limit_maglev_tables(&mut self, limit: u32) {
        self.maglev = maglev::Tables::with_limit(self.maglev.size, limit);
    }

    #[must_use]
    pub fn store(&self) -> &S {
        &self.store
    }

    #[cfg(test)]
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    fn new_revnat(&mut self, ip: IpAddr, port: u16) -> Result<u32, EbpfError> {
        let index = self
            .revnat_alloc
            .allocate()
            .ok_or(EbpfError::Exhausted("reverse NAT"))?;
        if let Err(error) = self.write().put_revnat(index, &RevNatValue::new(ip, port)) {
            self.revnat_alloc.release(index);
            return Err(error);
        }
        Ok(index)
    }

    /// The id of a backend, writing it first if it is new (or `rewrite`); takes a
    /// reference.
    fn acquire_backend(
        &mut self,
        backend: &Backend,
        proto: u8,
        rewrite: bool,
    ) -> Result<u32, EbpfError> {
        let key = (backend.ip, backend.port, proto);
        if let Some(id) = self.backend_ids.get(&key, &self.backends) {
            if rewrite {
                let value = BackendValue::new(backend.ip, backend.port, proto);
                self.write().put_backend(id, &value)?;
            }
            if let Some((_, refs)) = self.backends.get_mut(&id) {
                *refs += 1;
            }
            return Ok(id);
        }
        let id = self
            .backend_alloc
            .allocate()
            .ok_or(EbpfError::Exhausted("backend"))?;
        let value = BackendValue::new(backend.ip, backend.port, proto);
        if let Err(error) = self.write().put_backend(id, &value) {
            self.backend_alloc.release(id);
            return Err(error);
        }
        self.new_backends.push(id);
        self.backends.insert(id, (value, 1));
        self.backend_ids.insert(id, &self.backends);
        Ok(id)
    }

    /// Drops a reference; the backend entry goes once no slot points at it.
    fn release_backend(&mut self, id: u32) {
        let Some((backend, refs)) = self.backends.get_mut(&id) else {
            return;
        };
        *refs = refs.saturating_sub(1);
        if *refs == 0 {
            let backend = *backend;
            let key = backend.parts();
            self.backends.remove(&id);
            self.backend_ids.remove(&key, id);
            self.backend_alloc.release(id);
            self.freed_backends.push(id);
            if let Err(error) = self.write().del_backend(id, &backend) {
                self.left_behind(&error);
            }
        }
    }
}

/// The backend a map value names (its protocol aside).
fn backend_of(value: &BackendValue) -> Backend {
    let (ip, port, _) = value.parts();
    Backend { ip, port }
}

fn slot_number(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

fn frontend_key(key: &SlotKey) -> Option<FrontendKey> {
    Some(FrontendKey {
        ip: key.ip(),
        port: key.port(),
        protocol: Protocol::from_number(key.proto())?,
    })
}
