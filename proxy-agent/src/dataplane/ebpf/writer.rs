//! Applies a plan to the LB maps in Cilium's order (backends → slots → reverse NAT →
//! frontend with the new count → surplus slots → unused backends), so a program reading
//! the maps mid-update always finds a complete service, old or new.
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, PoisonError},
};

use proxy_common::{
    Backend4, RevNat4, Service4Key, ServiceValue, MAX_BACKENDS, MAX_REVNAT, SERVICE_FLAG_AFFINITY,
};
use tracing::debug;

use super::{
    ids::IdAllocator,
    index::{Index, SharedIndex},
    store::MapStore,
    EbpfError,
};
use crate::model::{Backend, DesiredState, Frontend, FrontendKey, Plan, Protocol};

/// A backend as the maps identify it.
type BackendKey = (Ipv4Addr, u16, u8);

#[derive(Debug, Clone)]
struct ProgrammedFrontend {
    rev_nat: u16,
    slots: Vec<u32>,
    /// `sessionAffinity: ClientIP` timeout (seconds).
    affinity: Option<u32>,
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
            .filter(|(k, _)| k.backend_slot == 0)
        {
            let Some(frontend_key) = frontend_key(key) else {
                continue;
            };
            let slots: Vec<u32> = (1..=value.count)
                .filter_map(|slot| {
                    let slot_key = Service4Key {
                        backend_slot: slot,
                        ..*key
                    };
                    contents.services.get(&slot_key).map(|v| v.backend_id)
                })
                .collect();
            for id in &slots {
                if let Some((_, refs)) = writer.backends.get_mut(id) {
                    *refs += 1;
                }
            }
            writer.revnat_alloc.take(u32::from(value.rev_nat_index));
            writer.frontends.insert(
                frontend_key,
                ProgrammedFrontend {
                    rev_nat: value.rev_nat_index,
                    slots,
                    affinity: (value.flags & SERVICE_FLAG_AFFINITY != 0)
                        .then_some(value.backend_id),
                },
            );
        }
        writer.publish();
        Ok(writer)
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
        let limit = usize::from(u16::MAX);
        if frontend.pod.backends.len() > limit {
            tracing::warn!(frontend = %key, backends = frontend.pod.backends.len(), limit, "too many backends; extra ones ignored");
        }
        let mut ids = Vec::with_capacity(frontend.pod.backends.len().min(limit));
        for backend in frontend.pod.backends.iter().take(limit) {
            ids.push(self.acquire_backend(backend, proto)?);
        }
        let old = self.frontends.get(key).cloned();
        let old_slots = old.as_ref().map(|o| o.slots.as_slice()).unwrap_or_default();
        let base = service_key(ip, key.port, proto, 0);
        let rev_nat = if let Some(o) = &old {
            o.rev_nat
        } else {
            let index = self.new_revnat(ip, key.port)?;
            self.new_frontends.push((index, *key));
            index
        };
        for (i, id) in ids.iter().enumerate() {
            if old_slots.get(i) != Some(id) {
                let slot = Service4Key {
                    backend_slot: slot_number(i + 1),
                    ..base
                };
                self.write().put_service(
                    &slot,
                    &ServiceValue {
                        backend_id: *id,
                        rev_nat_index: rev_nat,
                        ..Default::default()
                    },
                )?;
            }
        }
        let affinity = frontend.affinity_timeout;
        let old_affinity = old.as_ref().and_then(|o| o.affinity);
        if old.is_none() || old_slots.len() != ids.len() || old_affinity != affinity {
            let front = ServiceValue {
                count: slot_number(ids.len()),
                rev_nat_index: rev_nat,
                // Slot 0 has no backend: its id field carries the affinity timeout.
                backend_id: affinity.unwrap_or(0),
                flags: if affinity.is_some() {
                    SERVICE_FLAG_AFFINITY
                } else {
                    0
                },
                ..Default::default()
            };
            self.write().put_service(&base, &front)?;
        }
        for i in ids.len()..old_slots.len() {
            self.write().del_service(&Service4Key {
                backend_slot: slot_number(i + 1),
                ..base
            })?;
        }
        for &id in old_slots {
            self.release_backend(id)?;
        }
        self.frontends.insert(
            *key,
            ProgrammedFrontend {
                rev_nat,
                slots: ids,
                affinity,
            },
        );
        Ok(())
    }

    fn remove(&mut self, key: &FrontendKey) -> Result<(), EbpfError> {
        let (IpAddr::V4(ip), Some(old)) = (key.ip, self.frontends.remove(key)) else {
            return Ok(());
        };
        let base = service_key(ip, key.port, key.protocol.number(), 0);
        self.write().del_service(&base)?;
        for i in 0..old.slots.len() {
            self.write().del_service(&Service4Key {
                backend_slot: slot_number(i + 1),
                ..base
            })?;
        }
        self.write().del_revnat(old.rev_nat)?;
        self.revnat_alloc.release(u32::from(old.rev_nat));
        self.freed_revnat.push(old.rev_nat);
        for id in old.slots {
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
