//! Maglev consistent hashing (Eisenbud et al., NSDI 2016) for the per-packet path: each
//! backend set gets a lookup table of a prime size in which every backend owns an equal
//! share of entries, chosen by hashes of its address alone, so every node builds the
//! same table and removing one of N backends moves only about 1/N of the flows.
use std::collections::HashMap;

use proxy_common::{MaglevTable, MAGLEV_MAX, MAX_MAGLEV_TABLES};

use super::{ids::IdAllocator, EbpfError};

/// Cilium's default table size.
pub const DEFAULT_SIZE: u32 = 16381;

/// Whether `size` can be a table size: a prime no larger than the kernel's table.
#[must_use]
pub fn valid_size(size: u32) -> bool {
    usize::try_from(size).is_ok_and(|s| s <= MAGLEV_MAX)
        && size >= 3
        && (2..size)
            .take_while(|d| d * d <= size)
            .all(|d| !size.is_multiple_of(d))
}

/// FNV-1a over `bytes` from `seed`: stable across nodes, builds and restarts.
fn hash(bytes: &[u8], seed: u64) -> u64 {
    bytes.iter().fold(seed, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The lookup table: for each of `size` entries, the index of its backend in `names`.
/// Empty without backends.
#[must_use]
pub fn populate(names: &[String], size: u32) -> Vec<usize> {
    let m = u64::from(size);
    if names.is_empty() || m < 2 {
        return Vec::new();
    }
    let preferences: Vec<(u64, u64)> = names
        .iter()
        .map(|name| {
            let offset = hash(name.as_bytes(), 0xcbf2_9ce4_8422_2325) % m;
            let skip = hash(name.as_bytes(), 0x6c62_272e_07bb_0142) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; names.len()];
    let mut entries: Vec<Option<usize>> = vec![None; usize::try_from(size).unwrap_or(0)];
    let mut filled = 0;
    'fill: loop {
        for (i, (offset, skip)) in preferences.iter().enumerate() {
            // A prime size makes each backend's sequence a permutation of all entries.
            let mut slot = (offset + next[i] * skip) % m;
            while entries[usize::try_from(slot).unwrap_or(0)].is_some() {
                next[i] += 1;
                slot = (offset + next[i] * skip) % m;
            }
            entries[usize::try_from(slot).unwrap_or(0)] = Some(i);
            next[i] += 1;
            filled += 1;
            if filled == entries.len() {
                break 'fill;
            }
        }
    }
    entries.into_iter().map(|e| e.unwrap_or(0)).collect()
}

/// The kernel's form of a table over backends `ids` named `names`.
#[must_use]
#[allow(
    clippy::large_stack_arrays,
    reason = "64 KiB built once per new backend set, well within any thread's stack"
)]
pub fn kernel_table(ids: &[u32], names: &[String], size: u32) -> Box<MaglevTable> {
    let mut table = Box::new(MaglevTable {
        size,
        backend_ids: [0; MAGLEV_MAX],
    });
    for (entry, index) in table.backend_ids.iter_mut().zip(populate(names, size)) {
        *entry = ids[index];
    }
    table
}

/// Which tables exist, for which backend sets, and how many frontend scopes use each:
/// frontends with the same backends (a NodePort on every node address, its external
/// and load-balancer IPs) share one.
#[derive(Debug)]
pub struct Tables {
    pub size: u32,
    ids: IdAllocator,
    by_set: HashMap<Vec<u32>, u16>,
    users: HashMap<u16, (Vec<u32>, usize)>,
}

/// What the writer must do for a table.
pub enum Change {
    /// Write this table under this id.
    Create(u16),
    /// The table exists; nothing to write.
    Reuse(u16),
}

impl Tables {
    #[must_use]
    pub fn new(size: u32) -> Self {
        Self::with_limit(size, MAX_MAGLEV_TABLES)
    }

    /// At most `limit` tables (the map's size; smaller in tests).
    #[must_use]
    pub fn with_limit(size: u32, limit: u32) -> Self {
        Self {
            size,
            ids: IdAllocator::new(limit.min(MAX_MAGLEV_TABLES)),
            by_set: HashMap::new(),
            users: HashMap::new(),
        }
    }

    /// A table found in the maps at start (of `size` entries over the backend `set`).
    pub fn restore(&mut self, id: u16, size: u32, set: Vec<u32>) {
        self.ids.take(u32::from(id));
        if size == self.size {
            self.by_set.insert(set.clone(), id);
        }
        self.users.insert(id, (set, 0));
    }

    /// One more user of a restored table.
    pub fn restored_user(&mut self, id: u16) {
        if let Some((_, refs)) = self.users.get_mut(&id) {
            *refs += 1;
        }
    }

    /// Restored tables nobody uses (a previous agent died between writes).
    #[must_use]
    pub fn unused(&self) -> Vec<u16> {
        self.users
            .iter()
            .filter(|(_, (_, refs))| *refs == 0)
            .map(|(id, _)| *id)
            .collect()
    }

    /// A reference to the table over `ids` (in any order), created if new.
    pub fn acquire(&mut self, ids: &[u32]) -> Result<Change, EbpfError> {
        let mut set = ids.to_vec();
        set.sort_unstable();
        set.dedup();
        if let Some(&id) = self.by_set.get(&set) {
            if let Some((_, refs)) = self.users.get_mut(&id) {
                *refs += 1;
            }
            return Ok(Change::Reuse(id));
        }
        let id = self
            .ids
            .allocate()
            .and_then(|id| u16::try_from(id).ok())
            .ok_or(EbpfError::Exhausted("Maglev table"))?;
        self.by_set.insert(set.clone(), id);
        self.users.insert(id, (set, 1));
        Ok(Change::Create(id))
    }

    /// Drops a reference; true when the table is no longer used (delete it).
    pub fn release(&mut self, id: u16) -> bool {
        let Some((set, refs)) = self.users.get_mut(&id) else {
            return false;
        };
        *refs = refs.saturating_sub(1);
        if *refs > 0 {
            return false;
        }
        let set = set.clone();
        self.users.remove(&id);
        if self.by_set.get(&set) == Some(&id) {
            self.by_set.remove(&set);
        }
        self.ids.release(u32::from(id));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::{populate, valid_size};

    fn names(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.244.{}.{}:8080", i / 200, i % 200 + 2))
            .collect()
    }

    #[test]
    fn sizes_must_be_prime() {
        assert!(valid_size(16381) && valid_size(251) && valid_size(4093));
        assert!(!valid_size(16384) && !valid_size(1) && !valid_size(32749));
    }

    #[test]
    fn every_backend_gets_an_equal_share() {
        let table = populate(&names(10), 16381);
        let mut counts = [0usize; 10];
        for i in table {
            counts[i] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(max - min <= 1, "shares differ: {counts:?}");
    }

    #[test]
    fn removing_one_of_ten_backends_moves_only_its_flows() {
        let before = names(10);
        let after: Vec<String> = before
            .iter()
            .filter(|n| **n != before[3])
            .cloned()
            .collect();
        let (old, new) = (populate(&before, 16381), populate(&after, 16381));
        let moved = old
            .iter()
            .zip(&new)
            .filter(|(o, n)| **o != 3 && before[**o] != after[**n])
            .count();
        // Entries of the removed backend (1/10) must move; Maglev moves few others.
        assert!(
            moved * 50 < old.len(),
            "{moved} entries of surviving backends moved"
        );
    }
}
