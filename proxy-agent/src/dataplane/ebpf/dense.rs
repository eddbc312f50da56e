//! Values by backend id in a vector indexed by the id: ids are small and dense (given
//! out from 1 upwards and reused), so at 300 000 backends this holds a value per id in
//! about a third of a hash map's memory (no hash, no control bytes, no half-empty
//! table after doubling).
use std::fmt;

#[derive(Clone, PartialEq, Eq)]
pub struct IdTable<T> {
    slots: Vec<Option<T>>,
    len: usize,
}

impl<T> Default for IdTable<T> {
    fn default() -> Self {
        Self {
            slots: Vec::new(),
            len: 0,
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for IdTable<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

fn index(id: u32) -> usize {
    usize::try_from(id).unwrap_or(usize::MAX)
}

impl<T> IdTable<T> {
    #[must_use]
    pub fn get(&self, id: &u32) -> Option<&T> {
        self.slots.get(index(*id))?.as_ref()
    }

    pub fn get_mut(&mut self, id: &u32) -> Option<&mut T> {
        self.slots.get_mut(index(*id))?.as_mut()
    }

    #[must_use]
    pub fn contains_key(&self, id: &u32) -> bool {
        self.get(id).is_some()
    }

    /// Holds `value` for `id`, returning what it held before.
    pub fn insert(&mut self, id: u32, value: T) -> Option<T> {
        let at = index(id);
        if at >= self.slots.len() {
            // Grows by an eighth (at least 1024 slots) rather than doubling: the table
            // is as large as the highest id, which moves up one at a time.
            let want = at + 1;
            let more = (want - self.slots.len())
                .max(self.slots.len() / 8)
                .max(1024);
            self.slots.reserve_exact(more);
            self.slots.resize_with(want, || None);
        }
        let old = self.slots[at].replace(value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    pub fn remove(&mut self, id: &u32) -> Option<T> {
        let old = self.slots.get_mut(index(*id))?.take();
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `(id, value)` in rising id order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &T)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, v)| Some((u32::try_from(i).ok()?, v.as_ref()?)))
    }
}

impl<T> Extend<(u32, T)> for IdTable<T> {
    fn extend<I: IntoIterator<Item = (u32, T)>>(&mut self, items: I) {
        for (id, value) in items {
            self.insert(id, value);
        }
    }
}

impl<T> FromIterator<(u32, T)> for IdTable<T> {
    fn from_iter<I: IntoIterator<Item = (u32, T)>>(items: I) -> Self {
        let mut table = Self::default();
        table.extend(items);
        table
    }
}

#[cfg(test)]
mod tests {
    use super::IdTable;

    #[test]
    fn behaves_as_a_map_by_id() {
        let mut table = IdTable::default();
        assert_eq!(table.insert(5, 'a'), None);
        assert_eq!(table.insert(1, 'b'), None);
        assert_eq!(table.insert(5, 'c'), Some('a'));
        assert_eq!(
            (table.len(), table.get(&5), table.get(&2)),
            (2, Some(&'c'), None)
        );
        assert_eq!(table.get(&70_000), None);
        *table.get_mut(&1).expect("1") = 'd';
        assert_eq!(table.iter().collect::<Vec<_>>(), [(1, &'d'), (5, &'c')]);
        assert_eq!(table.remove(&5), Some('c'));
        assert_eq!(table.remove(&5), None);
        assert_eq!(table.remove(&9_999), None);
        assert!(!table.contains_key(&5) && table.contains_key(&1) && table.len() == 1);
    }
}
