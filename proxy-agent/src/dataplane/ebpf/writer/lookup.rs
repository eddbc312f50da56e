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
