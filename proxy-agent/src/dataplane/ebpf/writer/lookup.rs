//! Backend ids by address, port and protocol: a hash table of the ids alone, hashed by
//! the backend values the writer keeps anyway (a map holding each key as well took
//! 13 MiB at 300 000 backends; this takes 2.6).
use hashbrown::{DefaultHashBuilder, HashTable};
use std::hash::BuildHasher;

use super::BackendKey;
use crate::dataplane::ebpf::{dense::IdTable, store::BackendValue};

/// The backend values by id, with their reference counts: what the ids are looked up in.
pub type Values = IdTable<(BackendValue, u32)>;

#[derive(Default)]
pub struct BackendLookup {
    ids: HashTable<u32>,
    hasher: DefaultHashBuilder,
}

fn parts(values: &Values, id: u32) -> Option<BackendKey> {
    values.get(&id).map(|(value, _)| value.parts())
}

impl BackendLookup {
    /// The id of the backend `key` names.
    pub fn get(&self, key: &BackendKey, values: &Values) -> Option<u32> {
        self.ids
            .find(self.hasher.hash_one(key), |&id| {
                parts(values, id).as_ref() == Some(key)
            })
            .copied()
    }

    /// Adds `id`, whose value `values` holds already (as it holds every id here).
    pub fn insert(&mut self, id: u32, values: &Values) {
        let Some(key) = parts(values, id) else {
            return;
        };
        let hasher = &self.hasher;
        self.ids.insert_unique(hasher.hash_one(key), id, |&other| {
            parts(values, other).map_or(0, |key| hasher.hash_one(key))
        });
    }

    /// Removes `id`, which stood for `key`.
    pub fn remove(&mut self, key: &BackendKey, id: u32) {
        if let Ok(entry) = self.ids.find_entry(self.hasher.hash_one(key), |&x| x == id) {
            entry.remove();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use super::{BackendLookup, Values};
    use crate::dataplane::ebpf::store::BackendValue;

    fn ip(i: u32) -> IpAddr {
        if i.is_multiple_of(3) {
            IpAddr::V6(Ipv6Addr::from(u128::from(i)))
        } else {
            IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
        }
    }

    #[test]
    fn ids_are_found_by_their_values_through_growth_and_removal() {
        let (mut lookup, mut values) = (BackendLookup::default(), Values::default());
        for id in 1..=20_000 {
            values.insert(id, (BackendValue::new(ip(id), 8080, 6), 1));
            lookup.insert(id, &values);
        }
        for id in (1..=20_000).step_by(2) {
            let (value, _) = values.remove(&id).expect("stored");
            lookup.remove(&value.parts(), id);
        }
        for id in 1..=20_000 {
            let found = lookup.get(&(ip(id), 8080, 6), &values);
            assert_eq!(found, (id % 2 == 0).then_some(id), "backend {id}");
            // Another port or protocol is another backend.
            assert_eq!(lookup.get(&(ip(id), 8081, 6), &values), None);
            assert_eq!(lookup.get(&(ip(id), 8080, 17), &values), None);
        }
    }
}
