//! Map writes that fail on demand: one frontend that cannot be written is skipped and
//! retried, the others are written, and no failure leaks a reference or frees an entry
//! the maps still point at (the "never half-written" checks run after every write).
use std::net::IpAddr;

use proxy_common::{MaglevTable, ServiceValue};

use super::{
    store::{BackendValue, MapContents, MapStore, RevNatValue, SlotKey, SourceRange},
    tests::{key, state, CheckedStore},
    EbpfError, MapWriter, Sizing,
};
use crate::model::{diff, DesiredState, Protocol};

/// A store whose service-map writes (`puts`) and deletes (`deletes`) of one address
/// fail, as many times as those counters say.
#[derive(Default)]
struct FaultyStore {
    inner: CheckedStore,
    fail_ip: Option<IpAddr>,
    puts: usize,
    deletes: usize,
}

fn refused() -> EbpfError {
    EbpfError::Io(
        "services map".into(),
        std::io::Error::from_raw_os_error(nix::libc::E2BIG),
    )
}

impl MapStore for FaultyStore {
    fn put_backend(&mut self, id: u32, backend: &BackendValue) -> Result<(), EbpfError> {
        self.inner.put_backend(id, backend)
    }
    fn del_backend(&mut self, id: u32, backend: &BackendValue) -> Result<(), EbpfError> {
        self.inner.del_backend(id, backend)
    }
    fn put_service(&mut self, key: &SlotKey, value: &ServiceValue) -> Result<(), EbpfError> {
        if Some(key.ip()) == self.fail_ip && self.puts > 0 {
            self.puts -= 1;
            return Err(refused());
        }
        self.inner.put_service(key, value)
    }
    fn del_service(&mut self, key: &SlotKey) -> Result<(), EbpfError> {
        if Some(key.ip()) == self.fail_ip && self.deletes > 0 {
            self.deletes -= 1;
            return Err(refused());
        }
        self.inner.del_service(key)
    }
    fn put_revnat(&mut self, index: u32, revnat: &RevNatValue) -> Result<(), EbpfError> {
        self.inner.put_revnat(index, revnat)
    }
    fn del_revnat(&mut self, index: u32, revnat: &RevNatValue) -> Result<(), EbpfError> {
        self.inner.del_revnat(index, revnat)
    }
    fn put_source_range(&mut self, range: &SourceRange) -> Result<(), EbpfError> {
        self.inner.put_source_range(range)
    }
    fn del_source_range(&mut self, range: &SourceRange) -> Result<(), EbpfError> {
        self.inner.del_source_range(range)
    }
    fn put_maglev(&mut self, id: u16, table: &MaglevTable) -> Result<(), EbpfError> {
        self.inner.put_maglev(id, table)
    }
    fn del_maglev(&mut self, id: u16) -> Result<(), EbpfError> {
        self.inner.del_maglev(id)
    }
    fn read_all(&self) -> Result<MapContents, EbpfError> {
        self.inner.read_all()
    }
}

fn maps(writer: &MapWriter<FaultyStore>) -> &MapContents {
    &writer.store().inner.maps
}

/// Backends, reverse-NAT entries and slots the maps hold beyond what `desired` needs.
fn assert_holds_exactly(writer: &MapWriter<FaultyStore>, desired: &DesiredState) {
    let maps = maps(writer);
    let slots: usize = desired
        .frontends
        .values()
        .map(|f| f.pod.backends.len() + 1)
        .sum();
    assert_eq!(maps.services.len(), slots, "service slots");
    assert_eq!(maps.revnat.len(), desired.frontends.len(), "reverse NAT");
    let mut backends: Vec<_> = desired
        .frontends
        .values()
        .flat_map(|f| f.pod.backends.iter().copied())
        .collect();
    backends.sort_unstable();
    backends.dedup();
    assert_eq!(maps.backends.len(), backends.len(), "backends");
}

#[test]
fn a_frontend_that_cannot_be_written_does_not_hold_up_the_others() {
    let (a, bad, c) = (
        key(1, Protocol::Tcp),
        key(2, Protocol::Tcp),
        key(3, Protocol::Tcp),
    );
    let store = FaultyStore {
        fail_ip: Some(bad.ip),
        puts: usize::MAX,
        ..FaultyStore::default()
    };
    let mut writer = MapWriter::restore(store).unwrap();
    let desired = state(&[(a, &[1, 2]), (bad, &[2, 3]), (c, &[4])]);
    let mut programmed = writer.programmed();
    // A batched apply cannot say whose write failed; the next goes one at a time and can.
    let mut failed = None;
    for _ in 0..2 {
        if let Ok(written) = writer.apply(&diff(&programmed, &desired)) {
            failed = Some(written.failed);
            break;
        }
        programmed = writer.programmed();
    }
    assert_eq!(failed, Some(vec![bad]), "only the bad frontend fails");
    let got = writer.programmed();
    assert_eq!(got.frontends.get(&a), desired.frontends.get(&a));
    assert_eq!(got.frontends.get(&c), desired.frontends.get(&c));
    assert_ne!(
        got.frontends.get(&bad),
        desired.frontends.get(&bad),
        "tried again"
    );
    // It keeps failing at every retry, and the others stay.
    for _ in 0..5 {
        let written = writer.apply(&diff(&writer.programmed(), &desired)).unwrap();
        assert_eq!(written.failed, vec![bad]);
    }
    // Once the kernel takes it, it is written whole and nothing was leaked.
    writer.store_mut().puts = 0;
    let written = writer.apply(&diff(&writer.programmed(), &desired)).unwrap();
    assert!(written.failed.is_empty());
    assert_eq!(writer.programmed(), desired);
    assert_holds_exactly(&writer, &desired);
    // Removed, every backend and id it took goes with it.
    let left = state(&[(a, &[1, 2])]);
    writer.apply(&diff(&desired, &left)).unwrap();
    assert_holds_exactly(&writer, &left);
}

#[test]
fn a_write_failing_part_way_leaks_nothing_and_frees_nothing_in_use() {
    let f = key(1, Protocol::Tcp);
    let mut writer = MapWriter::restore(FaultyStore {
        fail_ip: Some(f.ip),
        ..FaultyStore::default()
    })
    .unwrap();
    let before = state(&[(f, &[1, 2, 3])]);
    writer
        .apply(&diff(&DesiredState::default(), &before))
        .unwrap();
    // The new version's second slot write fails, every time for a while: the maps
    // hold a mix of old and new slots.
    let after = state(&[(f, &[4, 5, 6, 7])]);
    for attempt in 0..4 {
        writer.store_mut().puts = 1;
        let _ = writer.apply(&diff(&writer.programmed(), &after));
        assert!(
            maps(&writer).backends.len() <= 7,
            "attempt {attempt}: backends leaked"
        );
    }
    writer.store_mut().puts = 0;
    let written = writer.apply(&diff(&writer.programmed(), &after)).unwrap();
    assert!(written.failed.is_empty());
    assert_eq!(writer.programmed(), after);
    assert_holds_exactly(&writer, &after);
    // The references the failed attempts took are gone too.
    writer
        .apply(&diff(&after, &DesiredState::default()))
        .unwrap();
    assert_holds_exactly(&writer, &DesiredState::default());
}

#[test]
fn a_removal_that_fails_keeps_the_frontend_whole_until_it_succeeds() {
    let (f, g) = (key(1, Protocol::Tcp), key(2, Protocol::Tcp));
    let mut writer = MapWriter::restore(FaultyStore {
        fail_ip: Some(f.ip),
        ..FaultyStore::default()
    })
    .unwrap();
    let both = state(&[(f, &[1, 2]), (g, &[2, 3])]);
    writer
        .apply(&diff(&DesiredState::default(), &both))
        .unwrap();
    let only_g = state(&[(g, &[2, 3])]);
    writer.store_mut().deletes = 1;
    let mut programmed = writer.programmed();
    let mut failed = Vec::new();
    for _ in 0..2 {
        if let Ok(written) = writer.apply(&diff(&programmed, &only_g)) {
            failed = written.failed;
            break;
        }
        programmed = writer.programmed();
    }
    // Either the delete failed in this apply (then it is named) or it was retried.
    let written = writer.apply(&diff(&writer.programmed(), &only_g)).unwrap();
    assert!(
        written.failed.is_empty(),
        "{failed:?} then {:?}",
        written.failed
    );
    assert_eq!(writer.programmed(), only_g);
    assert_holds_exactly(&writer, &only_g);
}

#[test]
fn running_out_of_ids_skips_the_frontends_that_need_new_ones() {
    // Maps of 64 slots: 31 reverse-NAT ids (index 0 is none).
    let sizing = Sizing {
        lb_map_max: 64,
        ..Sizing::default()
    };
    let mut writer = MapWriter::restore_with(MapContents::default(), sizing).unwrap();
    // More frontends than reverse-NAT ids.
    let limit = usize::try_from(sizing.revnat() - 1).unwrap();
    let mut desired = DesiredState::default();
    for i in 0..=limit {
        let octets = u32::try_from(i).unwrap().to_be_bytes();
        let key = crate::model::FrontendKey {
            ip: IpAddr::from([10, octets[1], octets[2], octets[3]]),
            port: 80,
            protocol: Protocol::Tcp,
        };
        desired.frontends.insert(
            key,
            crate::model::Frontend::backends_only(Vec::new()).into(),
        );
    }
    let written = writer
        .apply(&diff(&DesiredState::default(), &desired))
        .unwrap();
    assert_eq!(written.failed.len(), desired.frontends.len() - limit);
    // Named for `proxyagent_sync_errors_total{reason}`.
    assert_eq!(
        written.reasons,
        [("ids_exhausted", desired.frontends.len() - limit)].into()
    );
    assert_eq!(writer.store().revnat.len(), limit);
}

#[test]
fn past_the_maglev_tables_a_frontend_chooses_at_random_instead_of_being_skipped() {
    let mut writer = MapWriter::restore(MapContents::default()).unwrap();
    writer.limit_maglev_tables(2);
    // Three NodePort frontends with distinct backend sets: three tables wanted.
    let keys = [1, 2, 3].map(|i| key(i, Protocol::Tcp));
    let mut desired = state(&[(keys[0], &[1]), (keys[1], &[2]), (keys[2], &[3])]);
    for key in &keys {
        if let Some(frontend) = desired.frontends.get_mut(key) {
            std::sync::Arc::make_mut(frontend).kind = crate::model::FrontendKind::NodePort;
        }
    }
    let written = writer
        .apply(&diff(&DesiredState::default(), &desired))
        .unwrap();
    assert!(written.failed.is_empty(), "{written:?}");
    let store = writer.store();
    assert_eq!(store.maglev.len(), 2);
    let fronts: Vec<&ServiceValue> = store
        .services
        .iter()
        .filter(|(k, _)| k.slot() == 0)
        .map(|(_, v)| v)
        .collect();
    assert_eq!(fronts.len(), 3);
    assert_eq!(fronts.iter().filter(|v| v.maglev_table == 0).count(), 1);
    assert!(fronts.iter().all(|v| v.count == 1));
}
