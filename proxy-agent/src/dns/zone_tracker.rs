//! The zone kept current change by change: each Service's records are remembered, and
//! a change rewrites the names the changed Services contribute to, in the order a full
//! build would list them (Services in key order, each record once).
use std::collections::{BTreeSet, HashMap};

use hickory_proto::rr::{rdata::TXT, Name, RData};

use super::zone::{
    key, kube_dns_frontends_of, kube_dns_of, name, Builder, Zone, KUBE_DNS, SCHEMA_VERSION,
};
use crate::model::{ObjectKey, Snapshot};

pub struct ZoneTracker {
    domain: Name,
    svc: Name,
    svc_key: String,
    ttl: u32,
    /// Each Service's records.
    contributed: HashMap<ObjectKey, Vec<(String, RData)>>,
    /// The Services contributing to each name.
    owners: HashMap<String, BTreeSet<ObjectKey>>,
    records: imbl::HashMap<String, Vec<RData>>,
    empty: imbl::HashMap<String, usize>,
    kube_dns: Vec<std::net::SocketAddr>,
    kube_dns_frontends: Vec<(std::net::IpAddr, u16, u8)>,
}

impl ZoneTracker {
    /// The zone of every Service in `snapshot`.
    #[must_use]
    pub fn new(snapshot: &Snapshot, domain: &str, ttl: u32) -> Self {
        let domain = name(domain).unwrap_or_else(|| name("cluster.local").expect("valid"));
        let svc = Name::from_ascii("svc")
            .expect("valid")
            .append_domain(&domain)
            .expect("short");
        let mut tracker = Self {
            svc_key: key(&svc),
            domain,
            svc,
            ttl,
            contributed: HashMap::new(),
            owners: HashMap::new(),
            records: imbl::HashMap::new(),
            empty: imbl::HashMap::new(),
            kube_dns: kube_dns_of(snapshot),
            kube_dns_frontends: kube_dns_frontends_of(snapshot),
        };
        let version = format!("dns-version.{}", key(&tracker.domain));
        tracker.records.insert(
            version,
            vec![RData::TXT(TXT::new(vec![SCHEMA_VERSION.into()]))],
        );
        let all: BTreeSet<ObjectKey> = snapshot.services().keys().cloned().collect();
        tracker.update(snapshot, &all);
        tracker
    }

    /// Rewrites the records of `services` from `snapshot` (gone ones lose theirs).
    pub fn update(&mut self, snapshot: &Snapshot, services: &BTreeSet<ObjectKey>) {
        let mut touched = BTreeSet::new();
        for service in services {
            let mut builder = Builder {
                svc: self.svc_key.clone(),
                records: Vec::new(),
            };
            if let Some(object) = snapshot.services().get(service) {
                let slices = snapshot.slices_of(&service.0, &service.1);
                // A Service that cannot be named in DNS is skipped, not fatal.
                let _ = builder.service(object, &slices);
            }
            for (owner, _) in self.contributed.remove(service).unwrap_or_default() {
                if let Some(owners) = self.owners.get_mut(&owner) {
                    owners.remove(service);
                }
                touched.insert(owner);
            }
            for (owner, _) in &builder.records {
                self.owners
                    .entry(owner.clone())
                    .or_default()
                    .insert(service.clone());
                touched.insert(owner.clone());
            }
            if !builder.records.is_empty() {
                self.contributed.insert(service.clone(), builder.records);
            }
        }
        for owner in touched {
            self.rewrite(&owner);
        }
        let kube_dns = (KUBE_DNS.0.to_owned(), KUBE_DNS.1.to_owned());
        if services.contains(&kube_dns) {
            self.kube_dns = kube_dns_of(snapshot);
            self.kube_dns_frontends = kube_dns_frontends_of(snapshot);
        }
    }

    /// One name's records from its contributors, in key order, each once.
    fn rewrite(&mut self, owner: &str) {
        let mut list: Vec<RData> = Vec::new();
        let contributors = self.owners.get(owner).cloned().unwrap_or_default();
        for service in &contributors {
            let records = self.contributed.get(service).into_iter().flatten();
            for (_, data) in records.filter(|(o, _)| o == owner) {
                if !list.contains(data) {
                    list.push(data.clone());
                }
            }
        }
        if contributors.is_empty() {
            self.owners.remove(owner);
        }
        let had = self.records.contains_key(owner);
        if list.is_empty() {
            self.records.remove(owner);
        } else {
            self.records.insert(owner.to_owned(), list);
        }
        match (had, self.records.contains_key(owner)) {
            (false, true) => self.count_ancestors(owner, true),
            (true, false) => self.count_ancestors(owner, false),
            _ => {}
        }
    }

    /// The names between `owner` and `svc.<domain>` exist while any name below does.
    fn count_ancestors(&mut self, owner: &str, up: bool) {
        if !owner.ends_with(&self.svc_key) {
            return;
        }
        let mut rest = owner;
        while let Some((_, parent)) = rest.split_once('.') {
            if parent.len() < self.svc_key.len() {
                break;
            }
            let count = self.empty.get(parent).copied().unwrap_or(0);
            let count = if up {
                count + 1
            } else {
                count.saturating_sub(1)
            };
            if count == 0 {
                self.empty.remove(parent);
            } else {
                self.empty.insert(parent.to_owned(), count);
            }
            rest = parent;
        }
    }

    /// The zone as it stands (O(1): it shares the tracker's maps).
    #[must_use]
    pub fn zone(&self) -> Zone {
        Zone::from_parts(
            self.domain.clone(),
            self.svc.clone(),
            self.ttl,
            self.records.clone(),
            self.empty.clone(),
            self.kube_dns.clone(),
            self.kube_dns_frontends.clone(),
        )
    }
}
