//! Writing and removing one frontend: its pod scope, its external scope where external
//! clients' route differs, its source ranges and Maglev tables, each entry written
//! before anything points at it and removed after nothing does.
use ipnet::IpNet;
use proxy_common::{
    ServiceValue, SCOPE_EXTERNAL, SERVICE_FLAG_AFFINITY, SERVICE_FLAG_DROP_EMPTY,
    SERVICE_FLAG_EXTERNAL_MASQ, SERVICE_FLAG_EXTERNAL_SCOPE, SERVICE_FLAG_MASQ,
    SERVICE_FLAG_SOURCE_RANGES,
};

use super::{
    maglev::{self, Change},
    slot_number, MapStore, MapWriter, ProgrammedFrontend, RevNatValue, Scope, SlotKey, SourceRange,
};
use crate::{
    dataplane::ebpf::EbpfError,
    model::{EmptyVerdict, Frontend, FrontendKey, FrontendKind, Route},
};

/// What releasing the old version of a frontend frees, once the new one is written.
#[derive(Default)]
struct Released {
    backends: Vec<u32>,
    tables: Vec<u16>,
}

impl Released {
    fn scope(&mut self, scope: &Scope) {
        self.backends.extend(&scope.slots);
        self.tables.push(scope.maglev);
    }
}

impl<S: MapStore> MapWriter<S> {
    /// Writes one frontend. On failure the frontend is remembered as unsure (see
    /// [`ProgrammedFrontend::unsure`]): every reference taken so far is held, nothing
    /// the maps may point at is freed, and the next attempt rewrites it whole.
    pub(super) fn upsert(
        &mut self,
        key: &FrontendKey,
        frontend: &Frontend,
    ) -> Result<(), EbpfError> {
        let old = self.frontends.get(key).cloned();
        let mut rev_nat = old.as_ref().map(|o| o.rev_nat);
        let mut taken = Vec::new();
        let result = self.try_upsert(key, frontend, old.as_ref(), &mut rev_nat, &mut taken);
        if result.is_err() {
            if let Some(rev_nat) = rev_nat {
                let ranges = source_ranges(rev_nat, key.ip.is_ipv4(), &frontend.source_ranges);
                let record = ProgrammedFrontend::unsure_after(old.as_ref(), rev_nat, taken, ranges);
                self.frontends.insert(*key, record);
            }
        }
        result
    }

    fn try_upsert(
        &mut self,
        key: &FrontendKey,
        frontend: &Frontend,
        old: Option<&ProgrammedFrontend>,
        rev_nat: &mut Option<u32>,
        taken: &mut Vec<(bool, Scope)>,
    ) -> Result<(), EbpfError> {
        let unsure = old.is_some_and(|o| o.unsure.is_some());
        let rev_nat = if let Some(index) = *rev_nat {
            index
        } else {
            let index = self.new_revnat(key.ip, key.port)?;
            self.new_frontends.push((index, *key));
            *rev_nat = Some(index);
            index
        };
        let base = SlotKey::new(key.ip, key.port, key.protocol.number(), 0);
        let source_ranges = source_ranges(rev_nat, key.ip.is_ipv4(), &frontend.source_ranges);
        let (flags, external_flags) = route_flags(frontend, !source_ranges.is_empty());
        // Only the per-packet path (traffic from outside) balances by Maglev; a
        // ClusterIP is balanced at the socket.
        let maglev = frontend.kind != FrontendKind::ClusterIp;
        let mut new = ProgrammedFrontend {
            rev_nat,
            affinity: frontend.affinity_timeout,
            source_ranges,
            ..ProgrammedFrontend::default()
        };
        // An unsure frontend's ranges may not all be there: each is written again.
        let old_ranges = old
            .filter(|_| !unsure)
            .map(|o| o.source_ranges.as_slice())
            .unwrap_or_default();
        // Everything a new slot-0 entry points at is written before it: ranges, then
        // the external scope, then the pod scope.
        for range in new.source_ranges.iter().filter(|r| !old_ranges.contains(r)) {
            self.write().put_source_range(range)?;
        }
        if let Some(external_flags) = external_flags {
            let scope =
                self.acquire_scope(key, &frontend.external, external_flags, maglev, unsure)?;
            taken.push((true, scope.clone()));
            let scoped = base.with_scope(SCOPE_EXTERNAL);
            let old_external = old.and_then(|o| Some((o, o.external.as_ref()?)));
            self.write_scope(&scoped, &new, &scope, old_external)?;
            new.external = Some(scope);
        }
        let scope = self.acquire_scope(key, &frontend.pod, flags, maglev, unsure)?;
        taken.push((false, scope.clone()));
        self.write_scope(&base, &new, &scope, old.map(|o| (o, &o.pod)))?;
        new.pod = scope;
        let mut released = Released::default();
        if let Some(old) = old {
            if let (None, Some(old_external)) = (&new.external, &old.external) {
                self.delete_scope(SCOPE_EXTERNAL, &base, old_external.slots.len())?;
            }
            for range in old
                .source_ranges
                .iter()
                .filter(|r| !new.source_ranges.contains(r))
            {
                self.write().del_source_range(range)?;
            }
            for scope in old.held() {
                released.scope(&scope);
            }
        }
        // Nothing fails from here on: the old references go, the new record stays.
        self.release(released);
        self.frontends.insert(*key, new);
        Ok(())
    }

    /// Deletes one frontend's entries, then frees what it held; if a delete fails, the
    /// frontend stays, unsure, for the next attempt.
    pub(super) fn remove(&mut self, key: &FrontendKey) -> Result<(), EbpfError> {
        let Some(old) = self.frontends.get(key).cloned() else {
            return Ok(());
        };
        if let Err(error) = self.delete_entries(key, &old) {
            self.mark_unsure(key);
            return Err(error);
        }
        self.frontends.remove(key);
        self.revnat_alloc.release(old.rev_nat);
        self.freed_revnat.push(old.rev_nat);
        let mut released = Released::default();
        for scope in old.held() {
            released.scope(&scope);
        }
        self.release(released);
        Ok(())
    }

    fn delete_entries(
        &mut self,
        key: &FrontendKey,
        old: &ProgrammedFrontend,
    ) -> Result<(), EbpfError> {
        let base = SlotKey::new(key.ip, key.port, key.protocol.number(), 0);
        self.delete_scope(0, &base, old.pod.slots.len())?;
        if let Some(external) = &old.external {
            self.delete_scope(SCOPE_EXTERNAL, &base, external.slots.len())?;
        }
        for range in &old.source_ranges {
            self.write().del_source_range(range)?;
        }
        self.write()
            .del_revnat(old.rev_nat, &RevNatValue::new(key.ip, key.port))
    }

    /// Tables before backends: a table never names a backend that is gone.
    /// The references always go; an entry whose delete fails is left in its map,
    /// unreferenced (its id is free and the next owner overwrites it), and counted.
    fn release(&mut self, released: Released) {
        for id in released.tables.into_iter().filter(|id| *id != 0) {
            if self.maglev.release(id) {
                if let Err(error) = self.write().del_maglev(id) {
                    self.left_behind(&error);
                }
            }
        }
        for id in released.backends {
            self.release_backend(id);
        }
    }

    /// A route's backends (written first where new, one reference each) and, for the
    /// per-packet path, its Maglev table (written first where new). `rewrite`: the
    /// entries may be missing (an unsure frontend's), so backends and tables that exist
    /// already are written again. On failure, what it took is given back (nothing
    /// points at it yet).
    fn acquire_scope(
        &mut self,
        key: &FrontendKey,
        route: &Route,
        flags: u8,
        maglev: bool,
        rewrite: bool,
    ) -> Result<Scope, EbpfError> {
        let limit = usize::from(u16::MAX);
        if route.backends.len() > limit {
            tracing::warn!(frontend = %key, backends = route.backends.len(), limit, "too many backends; extra ones ignored");
        }
        let mut scope = Scope {
            slots: Vec::with_capacity(route.backends.len().min(limit)),
            flags,
            maglev: 0,
        };
        let backends = &route.backends[..route.backends.len().min(limit)];
        let proto = key.protocol.number();
        if let Err(error) = self.fill_scope(&mut scope, backends, proto, maglev, rewrite) {
            let mut taken = Released::default();
            taken.scope(&scope);
            self.release(taken);
            return Err(error);
        }
        Ok(scope)
    }

    /// Takes `backends` into `scope`, then its Maglev table; on failure `scope` holds
    /// what was taken so far.
    fn fill_scope(
        &mut self,
        scope: &mut Scope,
        backends: &[crate::model::Backend],
        proto: u8,
        maglev: bool,
        rewrite: bool,
    ) -> Result<(), EbpfError> {
        for backend in backends {
            scope
                .slots
                .push(self.acquire_backend(backend, proto, rewrite)?);
        }
        if maglev && !scope.slots.is_empty() {
            let change = match self.maglev.acquire(&scope.slots) {
                Ok(change) => change,
                // Past the tables' budget (16 384 distinct backend sets, 64 KiB each) the
                // frontend still serves, each node choosing at random, not skipped.
                Err(EbpfError::Exhausted(what)) => {
                    tracing::warn!(what, backends = scope.slots.len(), "no Maglev table left; this frontend's external clients get random backends");
                    return Ok(());
                }
                Err(error) => return Err(error),
            };
            let (Change::Reuse(id) | Change::Create(id)) = change;
            scope.maglev = id;
            if matches!(change, Change::Create(_)) || rewrite {
                let names: Vec<String> = backends.iter().map(ToString::to_string).collect();
                let table = maglev::kernel_table(&scope.slots, &names, self.maglev.size);
                self.write().put_maglev(id, &table)?;
            }
        }
        Ok(())
    }

    /// One scope of a frontend: changed slots, then slot 0 if it changed, then surplus
    /// slots; `old` is the frontend and scope as they were.
    fn write_scope(
        &mut self,
        base: &SlotKey,
        frontend: &ProgrammedFrontend,
        scope: &Scope,
        old: Option<(&ProgrammedFrontend, &Scope)>,
    ) -> Result<(), EbpfError> {
        let old_slots = old.map(|(_, s)| s.slots.as_slice()).unwrap_or_default();
        for (i, id) in scope.slots.iter().enumerate() {
            if old_slots.get(i) != Some(id) {
                let slot = base.with_slot(slot_number(i + 1));
                self.write().put_service(
                    &slot,
                    &ServiceValue {
                        backend_id: *id,
                        rev_nat_index: frontend.rev_nat,
                        ..Default::default()
                    },
                )?;
            }
        }
        let front = frontend.front(scope);
        if old.is_none_or(|(f, s)| f.unsure.is_some() || f.front(s) != front) {
            self.write().put_service(base, &front)?;
        }
        for i in scope.slots.len()..old_slots.len() {
            self.write()
                .del_service(&base.with_slot(slot_number(i + 1)))?;
        }
        Ok(())
    }

    /// Deletes slot 0 and `count` slots of one scope.
    fn delete_scope(&mut self, scope: u8, base: &SlotKey, count: usize) -> Result<(), EbpfError> {
        let scoped = base.with_scope(scope);
        self.write().del_service(&scoped)?;
        for i in 0..count {
            self.write()
                .del_service(&scoped.with_slot(slot_number(i + 1)))?;
        }
        Ok(())
    }
}

/// The slot-0 flags of the pod scope, and of the external scope where external clients
/// need one (their backends or empty verdict differ).
fn route_flags(frontend: &Frontend, has_source_ranges: bool) -> (u8, Option<u8>) {
    let of = |route: &Route| {
        let mut flags = 0;
        if frontend.affinity_timeout.is_some() {
            flags |= SERVICE_FLAG_AFFINITY;
        }
        if route.masquerade {
            flags |= SERVICE_FLAG_MASQ;
        }
        if route.when_empty == EmptyVerdict::Drop {
            flags |= SERVICE_FLAG_DROP_EMPTY;
        }
        flags
    };
    let external_differs = frontend.external.backends != frontend.pod.backends
        || frontend.external.when_empty != frontend.pod.when_empty;
    let mut flags = of(&frontend.pod);
    if has_source_ranges {
        flags |= SERVICE_FLAG_SOURCE_RANGES;
    }
    if external_differs {
        flags |= SERVICE_FLAG_EXTERNAL_SCOPE;
    } else if frontend.external.masquerade {
        flags |= SERVICE_FLAG_EXTERNAL_MASQ;
    }
    (flags, external_differs.then(|| of(&frontend.external)))
}

/// The `loadBalancerSourceRanges` of a frontend's family as source-range keys: as in
/// kube-proxy, a family without ranges of its own is not filtered.
fn source_ranges(rev_nat: u32, ipv4: bool, ranges: &[IpNet]) -> Vec<SourceRange> {
    let mut keys: Vec<SourceRange> = ranges
        .iter()
        .filter(|range| matches!(range, IpNet::V4(_)) == ipv4)
        .map(|range| SourceRange::new(rev_nat, range))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}
