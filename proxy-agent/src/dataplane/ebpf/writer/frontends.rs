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
    pub(super) fn upsert(
        &mut self,
        key: &FrontendKey,
        frontend: &Frontend,
    ) -> Result<(), EbpfError> {
        let proto = key.protocol.number();
        let old = self.frontends.get(key).cloned();
        let rev_nat = if let Some(old) = &old {
            old.rev_nat
        } else {
            let index = self.new_revnat(key.ip, key.port)?;
            self.new_frontends.push((index, *key));
            index
        };
        let base = SlotKey::new(key.ip, key.port, proto, 0);
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
        let old_ranges = old
            .as_ref()
            .map(|o| o.source_ranges.as_slice())
            .unwrap_or_default();
        // Everything a new slot-0 entry points at is written before it: ranges, then
        // the external scope, then the pod scope.
        for range in new.source_ranges.iter().filter(|r| !old_ranges.contains(r)) {
            self.write().put_source_range(range)?;
        }
        let mut released = Released::default();
        if let Some(external_flags) = external_flags {
            let scope = self.acquire_scope(key, &frontend.external, external_flags, maglev)?;
            let scoped = base.with_scope(SCOPE_EXTERNAL);
            let old_external = old.as_ref().and_then(|o| Some((o, o.external.as_ref()?)));
            self.write_scope(&scoped, &new, &scope, old_external)?;
            if let Some((_, old_scope)) = old_external {
                released.scope(old_scope);
            }
            new.external = Some(scope);
        }
        let scope = self.acquire_scope(key, &frontend.pod, flags, maglev)?;
        let old_pod = old.as_ref().map(|o| (o, &o.pod));
        self.write_scope(&base, &new, &scope, old_pod)?;
        new.pod = scope;
        if let Some(old) = &old {
            released.scope(&old.pod);
            if let (None, Some(old_external)) = (&new.external, &old.external) {
                self.delete_scope(SCOPE_EXTERNAL, &base, old_external.slots.len())?;
                released.scope(old_external);
            }
            for range in old
                .source_ranges
                .iter()
                .filter(|r| !new.source_ranges.contains(r))
            {
                self.write().del_source_range(range)?;
            }
        }
        self.release(released)?;
        self.frontends.insert(*key, new);
        Ok(())
    }

    pub(super) fn remove(&mut self, key: &FrontendKey) -> Result<(), EbpfError> {
        let Some(old) = self.frontends.remove(key) else {
            return Ok(());
        };
        let base = SlotKey::new(key.ip, key.port, key.protocol.number(), 0);
        self.delete_scope(0, &base, old.pod.slots.len())?;
        let mut released = Released::default();
        released.scope(&old.pod);
        if let Some(external) = &old.external {
            self.delete_scope(SCOPE_EXTERNAL, &base, external.slots.len())?;
            released.scope(external);
        }
        for range in &old.source_ranges {
            self.write().del_source_range(range)?;
        }
        self.write()
            .del_revnat(old.rev_nat, &RevNatValue::new(key.ip, key.port))?;
        self.revnat_alloc.release(u32::from(old.rev_nat));
        self.freed_revnat.push(old.rev_nat);
        self.release(released)
    }

    /// Tables before backends: a table never names a backend that is gone.
    fn release(&mut self, released: Released) -> Result<(), EbpfError> {
        for id in released.tables.into_iter().filter(|id| *id != 0) {
            if self.maglev.release(id) {
                self.write().del_maglev(id)?;
            }
        }
        for id in released.backends {
            self.release_backend(id)?;
        }
        Ok(())
    }

    /// A route's backends (written first where new, one reference each) and, for the
    /// per-packet path, its Maglev table (written first where new).
    fn acquire_scope(
        &mut self,
        key: &FrontendKey,
        route: &Route,
        flags: u8,
        maglev: bool,
    ) -> Result<Scope, EbpfError> {
        let limit = usize::from(u16::MAX);
        if route.backends.len() > limit {
            tracing::warn!(frontend = %key, backends = route.backends.len(), limit, "too many backends; extra ones ignored");
        }
        let proto = key.protocol.number();
        let mut slots = Vec::with_capacity(route.backends.len().min(limit));
        for backend in route.backends.iter().take(limit) {
            slots.push(self.acquire_backend(backend, proto)?);
        }
        let table = if maglev && !slots.is_empty() {
            match self.maglev.acquire(&slots)? {
                Change::Reuse(id) => id,
                Change::Create(id) => {
                    let names: Vec<String> = route
                        .backends
                        .iter()
                        .take(limit)
                        .map(ToString::to_string)
                        .collect();
                    let table = maglev::kernel_table(&slots, &names, self.maglev.size);
                    self.write().put_maglev(id, &table)?;
                    id
                }
            }
        } else {
            0
        };
        Ok(Scope {
            slots,
            flags,
            maglev: table,
        })
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
        if old.map(|(f, s)| f.front(s)) != Some(front) {
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
fn source_ranges(rev_nat: u16, ipv4: bool, ranges: &[IpNet]) -> Vec<SourceRange> {
    let mut keys: Vec<SourceRange> = ranges
        .iter()
        .filter(|range| matches!(range, IpNet::V4(_)) == ipv4)
        .map(|range| SourceRange::new(rev_nat, range))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}
