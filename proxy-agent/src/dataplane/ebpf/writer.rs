//! Applies a plan to the LB maps in Cilium's order (backends → slots → reverse NAT →
//! frontend with the new count → surplus slots → unused backends), so a program reading
//! the maps mid-update always finds a complete service, old or new.
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, PoisonError},
};

use ipnet::IpNet;
use proxy_common::{
    Backend4, RevNat4, Service4Key, ServiceValue, SourceRange4, MAX_BACKENDS, MAX_REVNAT,
    SCOPE_EXTERNAL, SERVICE_FLAG_AFFINITY, SERVICE_FLAG_DROP_EMPTY, SERVICE_FLAG_EXTERNAL_MASQ,
    SERVICE_FLAG_EXTERNAL_SCOPE, SERVICE_FLAG_MASQ, SERVICE_FLAG_SOURCE_RANGES,
};
use tracing::debug;

use super::{
    ids::IdAllocator,
    index::{Index, SharedIndex},
    store::{MapStore, SourceRange},
    EbpfError,
};
use crate::model::{
    Backend, DesiredState, EmptyVerdict, Frontend, FrontendKey, Plan, Protocol, Route,
};

/// A backend as the maps identify it.
type BackendKey = (Ipv4Addr, u16, u8);

#[derive(Debug, Clone, Default)]
struct ProgrammedFrontend {
    rev_nat: u16,
    /// Scope 0: the pod route (the socket LB's, and pods' per packet).
    slots: Vec<u32>,
    flags: u8,
    /// `SCOPE_EXTERNAL`: external clients' route where it differs.
    external: Option<(Vec<u32>, u8)>,
    /// `sessionAffinity: ClientIP` timeout (seconds).
    affinity: Option<u32>,
    source_ranges: Vec<SourceRange>,
}

impl ProgrammedFrontend {
    /// The slot-0 value this frontend was written with, for a scope of `count` slots.
    fn front(&self, count: usize, flags: u8) -> ServiceValue {
        front(count, flags, self.rev_nat, self.affinity)
    }
}

/// A slot-0 value. It has no backend: its id field carries the affinity timeout.
fn front(count: usize, flags: u8, rev_nat: u16, affinity: Option<u32>) -> ServiceValue {
    ServiceValue {
        count: slot_number(count),
        rev_nat_index: rev_nat,
        backend_id: affinity.unwrap_or(0),
        flags,
        ..Default::default()
    }
}

/// The writer's memory of what it put in the maps.
pub struct MapWriter<S> {
    store: S,
    frontends: BTreeMap<FrontendKey, ProgrammedFrontend>,
    backend_ids: HashMap<BackendKey, u32>,
    backends: HashMap<u32, (Backend4, u32)>,
    backend_alloc: IdAllocator,
    revnat_alloc: IdAllocator,
    /// Map operations performed so far.
    writes: usize,
    /// Ids as readers outside the sync loop see them (metrics, debug endpoints).
    index: SharedIndex,
    /// Ids freed by the apply under way, whose counters go with them.
    freed_revnat: Vec<u16>,
    freed_backends: Vec<u32>,
    /// Ids given out by the apply under way.
    new_frontends: Vec<(u16, FrontendKey)>,
    new_backends: Vec<(u32, Backend)>,
}

impl<S: MapStore> MapWriter<S> {
    /// Takes over whatever the store already holds (a previous agent's state).
    pub fn restore(store: S) -> Result<Self, EbpfError> {
        let contents = store.read_all()?;
        let mut writer = Self {
            store,
            frontends: BTreeMap::new(),
            backend_ids: HashMap::new(),
            backends: HashMap::new(),
            backend_alloc: IdAllocator::new(MAX_BACKENDS),
            revnat_alloc: IdAllocator::new(MAX_REVNAT - 1),
            writes: 0,
            index: Arc::default(),
            freed_revnat: Vec::new(),
            freed_backends: Vec::new(),
            new_frontends: Vec::new(),
            new_backends: Vec::new(),
        };
        for (&id, backend) in &contents.backends {
            writer.backend_alloc.take(id);
            writer.backend_ids.insert(backend_key(*backend), id);
            writer.backends.insert(id, (*backend, 0));
        }
        for (key, value) in contents
            .services
            .iter()
            .filter(|(k, _)| k.backend_slot == 0 && k.scope == 0)
        {
            let Some(frontend_key) = frontend_key(key) else {
                continue;
            };
            let slots = writer.restore_slots(&contents.services, key, value.count);
            let external_key = Service4Key {
                scope: SCOPE_EXTERNAL,
                ..*key
            };
            let external = contents.services.get(&external_key).map(|external| {
                let slots = writer.restore_slots(&contents.services, &external_key, external.count);
                (slots, external.flags)
            });
            let rev_nat_be = value.rev_nat_index.to_be();
            let source_ranges = contents
                .source_ranges
                .iter()
                .filter(|(_, data)| data.rev_nat_index_be == rev_nat_be)
                .copied()
                .collect();
            writer.revnat_alloc.take(u32::from(value.rev_nat_index));
            writer.frontends.insert(
                frontend_key,
                ProgrammedFrontend {
                    rev_nat: value.rev_nat_index,
                    slots,
                    flags: value.flags,
                    external,
                    affinity: (value.flags & SERVICE_FLAG_AFFINITY != 0)
                        .then_some(value.backend_id),
                    source_ranges,
                },
            );
        }
        writer.publish();
        Ok(writer)
    }

    /// The backend ids in a restored frontend's slots, each taking a reference.
    fn restore_slots(
        &mut self,
        services: &BTreeMap<Service4Key, ServiceValue>,
        base: &Service4Key,
        count: u16,
    ) -> Vec<u32> {
        let slots: Vec<u32> = (1..=count)
            .filter_map(|slot| {
                let slot_key = Service4Key {
                    backend_slot: slot,
                    ..*base
                };
                services.get(&slot_key).map(|v| v.backend_id)
            })
            .collect();
        for id in &slots {
            if let Some((_, refs)) = self.backends.get_mut(id) {
                *refs += 1;
            }
        }
        slots
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
                .map(|(id, (backend, _))| {
                    let (ip, port, _) = backend_key(*backend);
                    (
                        *id,
                        Backend {
                            ip: ip.into(),
                            port,
                        },
                    )
                })
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
                let backends = programmed
                    .slots
                    .iter()
                    .filter_map(|id| self.backends.get(id))
                    .map(|(b, _)| Backend {
                        ip: IpAddr::V4(Ipv4Addr::from(b.address_be.to_ne_bytes())),
                        port: u16::from_be(b.port_be),
                    })
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

    /// Programs the plan; returns how many map operations it took.
    pub fn apply(&mut self, plan: &Plan) -> Result<usize, EbpfError> {
        let before = self.writes;
        let result = self.apply_all(plan);
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
            index.backends.extend(self.new_backends.drain(..));
        }
        if !revnat.is_empty() || !backends.is_empty() {
            // Counters of a freed id would be credited to its next owner.
            if let Err(error) = self.store.forget_stats(&revnat, &backends) {
                tracing::warn!(%error, "cannot remove the counters of removed frontends");
            }
        }
        result.map(|()| self.writes - before)
    }

    fn apply_all(&mut self, plan: &Plan) -> Result<(), EbpfError> {
        for key in &plan.remove {
            self.remove(key)?;
        }
        for (key, frontend) in &plan.upsert {
            if key.ip.is_ipv4() {
                self.upsert(key, frontend)?;
            } else {
                debug!(frontend = %key, "IPv6 frontends are not programmed by the eBPF dataplane yet");
            }
        }
        Ok(())
    }

    #[must_use]
    pub fn store(&self) -> &S {
        &self.store
    }

    fn upsert(&mut self, key: &FrontendKey, frontend: &Frontend) -> Result<(), EbpfError> {
        let IpAddr::V4(ip) = key.ip else {
            return Ok(());
        };
        let proto = key.protocol.number();
        let old = self.frontends.get(key).cloned().unwrap_or_default();
        let is_new = !self.frontends.contains_key(key);
        let rev_nat = if is_new {
            let index = self.new_revnat(ip, key.port)?;
            self.new_frontends.push((index, *key));
            index
        } else {
            old.rev_nat
        };
        let base = service_key(ip, key.port, proto, 0);
        let affinity = frontend.affinity_timeout;
        let source_ranges = source_ranges(rev_nat, &frontend.source_ranges);
        let (flags, external_flags) = route_flags(frontend, !source_ranges.is_empty());
        // Everything a new slot-0 entry points at is written before it: ranges, then
        // the external scope, then the pod scope.
        for range in source_ranges
            .iter()
            .filter(|r| !old.source_ranges.contains(r))
        {
            self.write().put_source_range(range)?;
        }
        let mut released = Vec::new();
        let external = if let Some(external_flags) = external_flags {
            let ids = self.acquire_all(key, &frontend.external, proto)?;
            let old_external = old
                .external
                .as_ref()
                .map(|(s, f)| (s.as_slice(), old.front(s.len(), *f)));
            let scoped = Service4Key {
                scope: SCOPE_EXTERNAL,
                ..base
            };
            let front = front(ids.len(), external_flags, rev_nat, affinity);
            self.write_route(&scoped, &ids, old_external, &front)?;
            released.extend(old.external.iter().flat_map(|(s, _)| s.iter().copied()));
            Some((ids, external_flags))
        } else {
            None
        };
        let ids = self.acquire_all(key, &frontend.pod, proto)?;
        let old_pod =
            (!is_new).then(|| (old.slots.as_slice(), old.front(old.slots.len(), old.flags)));
        self.write_route(
            &base,
            &ids,
            old_pod,
            &front(ids.len(), flags, rev_nat, affinity),
        )?;
        released.extend(old.slots.iter().copied());
        if external.is_none() {
            if let Some((old_external, _)) = &old.external {
                self.delete_route(SCOPE_EXTERNAL, &base, old_external.len())?;
                released.extend(old_external.iter().copied());
            }
        }
        for range in old
            .source_ranges
            .iter()
            .filter(|r| !source_ranges.contains(r))
        {
            self.write().del_source_range(range)?;
        }
        for id in released {
            self.release_backend(id)?;
        }
        self.frontends.insert(
            *key,
            ProgrammedFrontend {
                rev_nat,
                slots: ids,
                flags,
                external,
                affinity,
                source_ranges,
            },
        );
        Ok(())
    }

    /// The ids of a route's backends (written first where new), one reference each.
    fn acquire_all(
        &mut self,
        key: &FrontendKey,
        route: &Route,
        proto: u8,
    ) -> Result<Vec<u32>, EbpfError> {
        let limit = usize::from(u16::MAX);
        if route.backends.len() > limit {
            tracing::warn!(frontend = %key, backends = route.backends.len(), limit, "too many backends; extra ones ignored");
        }
        let mut ids = Vec::with_capacity(route.backends.len().min(limit));
        for backend in route.backends.iter().take(limit) {
            ids.push(self.acquire_backend(backend, proto)?);
        }
        Ok(ids)
    }

    /// One scope of a frontend: changed slots, then slot 0 if it changed, then surplus
    /// slots; `old` is what the scope held (slots, slot-0 value).
    fn write_route(
        &mut self,
        base: &Service4Key,
        ids: &[u32],
        old: Option<(&[u32], ServiceValue)>,
        front: &ServiceValue,
    ) -> Result<(), EbpfError> {
        let old_slots = old.map(|(s, _)| s).unwrap_or_default();
        for (i, id) in ids.iter().enumerate() {
            if old_slots.get(i) != Some(id) {
                let slot = Service4Key {
                    backend_slot: slot_number(i + 1),
                    ..*base
                };
                self.write().put_service(
                    &slot,
                    &ServiceValue {
                        backend_id: *id,
                        rev_nat_index: front.rev_nat_index,
                        ..Default::default()
                    },
                )?;
            }
        }
        if old.map(|(_, value)| value) != Some(*front) {
            self.write().put_service(base, front)?;
        }
        for i in ids.len()..old_slots.len() {
            self.write().del_service(&Service4Key {
                backend_slot: slot_number(i + 1),
                ..*base
            })?;
        }
        Ok(())
    }

    /// Deletes slot 0 and `count` slots of one scope.
    fn delete_route(
        &mut self,
        scope: u8,
        base: &Service4Key,
        count: usize,
    ) -> Result<(), EbpfError> {
        let scoped = Service4Key { scope, ..*base };
        self.write().del_service(&scoped)?;
        for i in 0..count {
            self.write().del_service(&Service4Key {
                backend_slot: slot_number(i + 1),
                ..scoped
            })?;
        }
        Ok(())
    }

    fn remove(&mut self, key: &FrontendKey) -> Result<(), EbpfError> {
        let (IpAddr::V4(ip), Some(old)) = (key.ip, self.frontends.remove(key)) else {
            return Ok(());
        };
        let base = service_key(ip, key.port, key.protocol.number(), 0);
        self.delete_route(0, &base, old.slots.len())?;
        if let Some((external, _)) = &old.external {
            self.delete_route(SCOPE_EXTERNAL, &base, external.len())?;
        }
        for range in &old.source_ranges {
            self.write().del_source_range(range)?;
        }
        self.write().del_revnat(old.rev_nat)?;
        self.revnat_alloc.release(u32::from(old.rev_nat));
        self.freed_revnat.push(old.rev_nat);
        let external = old.external.into_iter().flat_map(|(slots, _)| slots);
        for id in old.slots.into_iter().chain(external) {
            self.release_backend(id)?;
        }
        Ok(())
    }

    fn new_revnat(&mut self, ip: Ipv4Addr, port: u16) -> Result<u16, EbpfError> {
        let index = self
            .revnat_alloc
            .allocate()
            .and_then(|i| u16::try_from(i).ok())
            .ok_or(EbpfError::Exhausted("reverse NAT"))?;
        let value = RevNat4 {
            address_be: u32::from_ne_bytes(ip.octets()),
            port_be: port.to_be(),
            pad: 0,
        };
        self.write().put_revnat(index, &value)?;
        Ok(index)
    }

    /// The id of a backend, writing it first if it is new; takes a reference.
    fn acquire_backend(&mut self, backend: &Backend, proto: u8) -> Result<u32, EbpfError> {
        let IpAddr::V4(ip) = backend.ip else {
            return Err(EbpfError::Family(backend.to_string()));
        };
        let key = (ip, backend.port, proto);
        if let Some(&id) = self.backend_ids.get(&key) {
            if let Some((_, refs)) = self.backends.get_mut(&id) {
                *refs += 1;
            }
            return Ok(id);
        }
        let id = self
            .backend_alloc
            .allocate()
            .ok_or(EbpfError::Exhausted("backend"))?;
        let value = Backend4 {
            address_be: u32::from_ne_bytes(ip.octets()),
            port_be: backend.port.to_be(),
            proto,
            flags: 0,
        };
        self.write().put_backend(id, &value)?;
        self.new_backends.push((id, *backend));
        self.backend_ids.insert(key, id);
        self.backends.insert(id, (value, 1));
        Ok(id)
    }

    /// Drops a reference; the backend entry goes once no slot points at it.
    fn release_backend(&mut self, id: u32) -> Result<(), EbpfError> {
        let Some((backend, refs)) = self.backends.get_mut(&id) else {
            return Ok(());
        };
        *refs = refs.saturating_sub(1);
        if *refs == 0 {
            let key = backend_key(*backend);
            self.backends.remove(&id);
            self.backend_ids.remove(&key);
            self.backend_alloc.release(id);
            self.freed_backends.push(id);
            self.write().del_backend(id)?;
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

/// The IPv4 `loadBalancerSourceRanges` of a frontend as `LB4_SOURCE_RANGES` keys.
fn source_ranges(rev_nat: u16, ranges: &[IpNet]) -> Vec<SourceRange> {
    let mut keys: Vec<SourceRange> = ranges
        .iter()
        .filter_map(|range| match range {
            IpNet::V4(net) => Some((
                32 + u32::from(net.prefix_len()),
                SourceRange4 {
                    rev_nat_index_be: rev_nat.to_be(),
                    pad: 0,
                    address_be: u32::from_ne_bytes(net.network().octets()),
                },
            )),
            IpNet::V6(_) => None,
        })
        .collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

fn slot_number(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

fn service_key(ip: Ipv4Addr, port: u16, proto: u8, slot: u16) -> Service4Key {
    Service4Key {
        address_be: u32::from_ne_bytes(ip.octets()),
        dport_be: port.to_be(),
        backend_slot: slot,
        proto,
        scope: 0,
        pad: [0; 2],
    }
}

fn backend_key(b: Backend4) -> BackendKey {
    (
        Ipv4Addr::from(b.address_be.to_ne_bytes()),
        u16::from_be(b.port_be),
        b.proto,
    )
}

fn frontend_key(key: &Service4Key) -> Option<FrontendKey> {
    Some(FrontendKey {
        ip: IpAddr::V4(Ipv4Addr::from(key.address_be.to_ne_bytes())),
        port: u16::from_be(key.dport_be),
        protocol: Protocol::from_number(key.proto)?,
    })
}
