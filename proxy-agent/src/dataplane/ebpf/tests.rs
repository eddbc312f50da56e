//! Map writer: contents, restore, and the "never half-written" invariant checked after
//! every single map operation.
use std::net::{IpAddr, Ipv4Addr};

use proxy_common::ServiceValue;

use super::{
    store::{BackendValue, MapContents, MapStore, RevNatValue, SlotKey},
    EbpfError, MapWriter,
};
use crate::model::{diff, Backend, DesiredState, Frontend, FrontendKey, Protocol};

/// An in-memory store that checks, after every operation, what a packet could see.
#[derive(Default)]
pub(super) struct CheckedStore {
    pub(super) maps: MapContents,
    pub(super) ops: usize,
}

impl CheckedStore {
    fn check(&mut self) {
        self.ops += 1;
        for (key, value) in self.maps.services.iter().filter(|(k, _)| k.slot() == 0) {
            assert!(
                self.maps.revnat.contains_key(&value.rev_nat_index),
                "frontend without reverse NAT"
            );
            if value.maglev_table != 0 {
                let (_, ids) = self
                    .maps
                    .maglev
                    .get(&value.maglev_table)
                    .expect("frontend points at a missing Maglev table");
                assert!(
                    ids.iter().all(|id| self.maps.backends.contains_key(id)),
                    "Maglev table names a missing backend"
                );
            }
            if value.flags & proxy_common::SERVICE_FLAG_EXTERNAL_SCOPE != 0 {
                let external = key.with_scope(proxy_common::SCOPE_EXTERNAL);
                assert!(
                    self.maps.services.contains_key(&external),
                    "frontend {key:?} sends external clients to a missing scope"
                );
            }
            for slot in 1..=value.count {
                let slot_key = key.with_slot(slot);
                let Some(slot_value) = self.maps.services.get(&slot_key) else {
                    panic!(
                        "frontend {key:?} counts {} slots but slot {slot} is missing",
                        value.count
                    );
                };
                assert!(
                    self.maps.backends.contains_key(&slot_value.backend_id),
                    "slot points at a missing backend"
                );
            }
        }
    }
}

impl MapStore for CheckedStore {
    fn put_backend(&mut self, id: u32, backend: &BackendValue) -> Result<(), EbpfError> {
        self.maps.put_backend(id, backend)?;
        self.check();
        Ok(())
    }
    fn del_backend(&mut self, id: u32, backend: &BackendValue) -> Result<(), EbpfError> {
        self.maps.del_backend(id, backend)?;
        self.check();
        Ok(())
    }
    fn put_service(&mut self, key: &SlotKey, value: &ServiceValue) -> Result<(), EbpfError> {
        self.maps.put_service(key, value)?;
        self.check();
        Ok(())
    }
    fn del_service(&mut self, key: &SlotKey) -> Result<(), EbpfError> {
        self.maps.del_service(key)?;
        self.check();
        Ok(())
    }
    fn put_revnat(&mut self, index: u32, revnat: &RevNatValue) -> Result<(), EbpfError> {
        self.maps.put_revnat(index, revnat)?;
        self.check();
        Ok(())
    }
    fn put_source_range(&mut self, range: &super::store::SourceRange) -> Result<(), EbpfError> {
        self.maps.put_source_range(range)?;
        self.check();
        Ok(())
    }
    fn del_source_range(&mut self, range: &super::store::SourceRange) -> Result<(), EbpfError> {
        self.maps.del_source_range(range)?;
        self.check();
        Ok(())
    }
    fn put_maglev(&mut self, id: u16, table: &proxy_common::MaglevTable) -> Result<(), EbpfError> {
        self.maps.put_maglev(id, table)?;
        self.check();
        Ok(())
    }
    fn del_maglev(&mut self, id: u16) -> Result<(), EbpfError> {
        self.maps.del_maglev(id)?;
        self.check();
        Ok(())
    }
    fn del_revnat(&mut self, index: u32, revnat: &RevNatValue) -> Result<(), EbpfError> {
        self.maps.del_revnat(index, revnat)?;
        self.check();
        Ok(())
    }
    fn read_all(&self) -> Result<MapContents, EbpfError> {
        Ok(self.maps.clone())
    }
}

pub(super) fn key(last: u8, protocol: Protocol) -> FrontendKey {
    FrontendKey {
        ip: IpAddr::V4(Ipv4Addr::new(10, 96, 0, last)),
        port: 80,
        protocol,
    }
}

pub(super) fn state(frontends: &[(FrontendKey, &[u8])]) -> DesiredState {
    let mut state = DesiredState::default();
    for (key, pods) in frontends {
        let backends = pods
            .iter()
            .map(|&p| Backend {
                ip: IpAddr::V4(Ipv4Addr::new(10, 244, 0, p)),
                port: 8080,
            })
            .collect();
        state
            .frontends
            .insert(*key, Frontend::backends_only(backends).into());
    }
    state
}

fn step(writer: &mut MapWriter<CheckedStore>, from: &DesiredState, to: &DesiredState) {
    writer.apply(&diff(from, to)).unwrap();
    assert_eq!(&writer.programmed(), to);
}

#[test]
fn every_intermediate_map_state_is_a_complete_service() {
    let a = key(1, Protocol::Tcp);
    let b = key(1, Protocol::Udp);
    let empty = DesiredState::default();
    let s1 = state(&[(a, &[1, 2, 3]), (b, &[1])]);
    let s2 = state(&[(a, &[3, 4]), (b, &[])]);
    let s3 = state(&[(a, &[5, 6, 7, 8])]);
    let mut writer = MapWriter::restore(CheckedStore::default()).unwrap();
    step(&mut writer, &empty, &s1);
    step(&mut writer, &s1, &s2);
    step(&mut writer, &s2, &s3);
    step(&mut writer, &s3, &empty);
    let left = &writer.store().maps;
    assert!(left.services.is_empty() && left.backends.is_empty() && left.revnat.is_empty());
}

#[test]
fn shared_backends_are_written_once_and_removed_with_their_last_user() {
    let a = key(1, Protocol::Tcp);
    let c = key(2, Protocol::Tcp);
    let mut writer = MapWriter::restore(CheckedStore::default()).unwrap();
    let both = state(&[(a, &[1, 2]), (c, &[2])]);
    step(&mut writer, &DesiredState::default(), &both);
    assert_eq!(writer.store().maps.backends.len(), 2);
    let only_c = state(&[(c, &[2])]);
    step(&mut writer, &both, &only_c);
    assert_eq!(writer.store().maps.backends.len(), 1);
}

#[test]
fn a_restarted_writer_keeps_ids_and_rewrites_nothing() {
    let a = key(1, Protocol::Tcp);
    let desired = state(&[(a, &[1, 2])]);
    let mut first = MapWriter::restore(CheckedStore::default()).unwrap();
    first
        .apply(&diff(&DesiredState::default(), &desired))
        .unwrap();
    let store = CheckedStore {
        maps: first.store().maps.clone(),
        ops: 0,
    };
    let mut second = MapWriter::restore(store).unwrap();
    assert_eq!(second.programmed(), desired);
    second.apply(&diff(&second.programmed(), &desired)).unwrap();
    assert_eq!(second.store().ops, 0);
    // A change after restart reuses the restored ids instead of colliding with them.
    let grown = state(&[(a, &[1, 2, 3]), (key(2, Protocol::Tcp), &[3])]);
    second.apply(&diff(&desired, &grown)).unwrap();
    assert_eq!(second.programmed(), grown);
    assert_eq!(second.store().maps.backends.len(), 3);
    assert_eq!(second.store().maps.revnat.len(), 2);
}

#[test]
fn affinity_lives_in_the_frontend_entry_and_survives_a_restart() {
    let a = key(1, Protocol::Tcp);
    let plain = state(&[(a, &[1, 2])]);
    let mut sticky = plain.clone();
    if let Some(frontend) = sticky.frontends.get_mut(&a).map(std::sync::Arc::make_mut) {
        frontend.affinity_timeout = Some(600);
    }
    let mut writer = MapWriter::restore(CheckedStore::default()).unwrap();
    step(&mut writer, &DesiredState::default(), &plain);
    let before = writer.store().ops;
    step(&mut writer, &plain, &sticky);
    // Only the frontend entry changes: flag on, timeout where slot 0 has no backend.
    assert_eq!(writer.store().ops - before, 1);
    let front = writer.store().maps.services.values().find(|v| v.count == 2);
    assert_eq!(
        front.map(|v| (v.flags, v.backend_id)),
        Some((proxy_common::SERVICE_FLAG_AFFINITY, 600))
    );
    let store = CheckedStore {
        maps: writer.store().maps.clone(),
        ops: 0,
    };
    let mut restarted = MapWriter::restore(store).unwrap();
    assert_eq!(restarted.programmed(), sticky);
    restarted
        .apply(&diff(&restarted.programmed(), &sticky))
        .unwrap();
    assert_eq!(restarted.store().ops, 0);
    step(&mut restarted, &sticky, &plain);
    let front = restarted
        .store()
        .maps
        .services
        .values()
        .find(|v| v.count == 2);
    assert_eq!(front.map(|v| (v.flags, v.backend_id)), Some((0, 0)));
}

#[test]
fn external_clients_get_their_own_scope_only_where_their_route_differs() {
    use crate::model::{EmptyVerdict, Route};
    use proxy_common::{
        SCOPE_EXTERNAL, SERVICE_FLAG_DROP_EMPTY, SERVICE_FLAG_EXTERNAL_MASQ,
        SERVICE_FLAG_EXTERNAL_SCOPE, SERVICE_FLAG_SOURCE_RANGES,
    };
    let a = key(1, Protocol::Tcp);
    let cluster = state(&[(a, &[1, 2])]);
    let mut local = cluster.clone();
    let frontend = local
        .frontends
        .get_mut(&a)
        .map(std::sync::Arc::make_mut)
        .unwrap();
    let only_first: Vec<Backend> = frontend.pod.backends[..1].to_vec();
    frontend.external = Route::new(only_first.into(), false, EmptyVerdict::Drop, true);
    frontend.source_ranges = vec!["10.0.0.0/8".parse().unwrap()];
    let mut writer = MapWriter::restore(CheckedStore::default()).unwrap();
    writer
        .apply(&diff(&DesiredState::default(), &local))
        .unwrap();
    let maps = &writer.store().maps;
    let scope0 = maps
        .services
        .iter()
        .find(|(k, _)| k.slot() == 0 && k.scope() == 0);
    let scope1 = maps
        .services
        .iter()
        .find(|(k, _)| k.slot() == 0 && k.scope() == SCOPE_EXTERNAL);
    assert_eq!(
        scope0.map(|(_, v)| (v.count, v.flags)),
        Some((2, SERVICE_FLAG_EXTERNAL_SCOPE | SERVICE_FLAG_SOURCE_RANGES))
    );
    assert_eq!(
        scope1.map(|(_, v)| (v.count, v.flags)),
        Some((1, SERVICE_FLAG_DROP_EMPTY))
    );
    assert_eq!(maps.source_ranges.len(), 1);
    assert_eq!(
        maps.source_ranges
            .first()
            .map(super::store::SourceRange::range),
        Some("10.0.0.0/8".to_owned())
    );

    // A restarted writer finds both scopes and the ranges, and rewrites nothing.
    let store = CheckedStore {
        maps: maps.clone(),
        ops: 0,
    };
    let mut restarted = MapWriter::restore(store).unwrap();
    restarted
        .apply(&diff(&restarted.programmed(), &local))
        .unwrap();
    assert_eq!(restarted.store().ops, 0);

    // Back to a Cluster policy with masquerade: one scope, flagged.
    let mut masqueraded = cluster.clone();
    masqueraded
        .frontends
        .get_mut(&a)
        .map(std::sync::Arc::make_mut)
        .unwrap()
        .external
        .masquerade = true;
    restarted.apply(&diff(&local, &masqueraded)).unwrap();
    let maps = &restarted.store().maps;
    assert!(maps.services.keys().all(|k| k.scope() == 0));
    assert!(maps.source_ranges.is_empty());
    let flags = maps
        .services
        .iter()
        .find(|(k, _)| k.slot() == 0)
        .map(|(_, v)| v.flags);
    assert_eq!(flags, Some(SERVICE_FLAG_EXTERNAL_MASQ));
    restarted
        .apply(&diff(&masqueraded, &DesiredState::default()))
        .unwrap();
    let left = &restarted.store().maps;
    assert!(left.services.is_empty() && left.backends.is_empty() && left.revnat.is_empty());
}

#[test]
fn ipv6_frontends_share_the_id_spaces_and_survive_a_restart() {
    let v6 = FrontendKey {
        ip: "fd00:10:96::1".parse().unwrap(),
        port: 80,
        protocol: Protocol::Tcp,
    };
    let v4 = key(1, Protocol::Tcp);
    let mut desired = state(&[(v4, &[1, 2])]);
    let backends = ["fd00:10:244:1::2", "fd00:10:244:2::2"]
        .iter()
        .map(|ip| Backend {
            ip: ip.parse().unwrap(),
            port: 8080,
        })
        .collect();
    desired
        .frontends
        .insert(v6, Frontend::backends_only(backends).into());
    let mut first = MapWriter::restore(CheckedStore::default()).unwrap();
    step(&mut first, &DesiredState::default(), &desired);
    let maps = &first.store().maps;
    let families = |v4: bool| {
        maps.services
            .keys()
            .filter(|k| k.ip().is_ipv4() == v4)
            .count()
    };
    // Slot 0 and two slots each; four backends and two reverse-NAT indexes, no id
    // given twice.
    assert_eq!((families(true), families(false)), (3, 3));
    assert_eq!((maps.backends.len(), maps.revnat.len()), (4, 2));
    let store = CheckedStore {
        maps: maps.clone(),
        ops: 0,
    };
    let mut second = MapWriter::restore(store).unwrap();
    assert_eq!(second.programmed(), desired);
    second.apply(&diff(&second.programmed(), &desired)).unwrap();
    assert_eq!(second.store().ops, 0);
    step(&mut second, &desired, &DesiredState::default());
    assert!(second.store().maps.services.is_empty() && second.store().maps.backends.is_empty());
}
