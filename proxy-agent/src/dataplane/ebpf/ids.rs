//! Id allocation for backends and reverse-NAT entries: ids stay stable for as long as
//! they are used, are restored from the maps at start, and are reused once freed.
use std::collections::BTreeSet;

/// Allocator over `1..=max`: ids are first given out in rising order, so a freed id
/// is not reused (and flows pinned to it are not redirected) until the space has been
/// gone through once; after that, the smallest freed id. Both are O(log n): the free
/// ids are computed once, when the space is first gone through, and kept after.
#[derive(Debug)]
pub struct IdAllocator {
    max: u32,
    used: BTreeSet<u32>,
    next: u32,
    /// Free ids below `next`, once `next` has passed `max`.
    free: Option<BTreeSet<u32>>,
}

impl IdAllocator {
    #[must_use]
    pub fn new(max: u32) -> Self {
        Self {
            max,
            used: BTreeSet::new(),
            next: 1,
            free: None,
        }
    }

    /// Marks an id restored from the kernel as taken.
    pub fn take(&mut self, id: u32) {
        self.used.insert(id);
        self.next = self.next.max(id.saturating_add(1));
        if let Some(free) = &mut self.free {
            free.remove(&id);
        }
    }

    /// A free id, or `None` when all of `1..=max` are in use.
    pub fn allocate(&mut self) -> Option<u32> {
        let id = if self.next <= self.max {
            self.next
        } else {
            let (max, used) = (self.max, &self.used);
            let free = self
                .free
                .get_or_insert_with(|| (1..=max).filter(|id| !used.contains(id)).collect());
            free.pop_first()?
        };
        self.take(id);
        Some(id)
    }

    pub fn release(&mut self, id: u32) {
        if self.used.remove(&id) {
            if let Some(free) = &mut self.free {
                free.insert(id);
            }
        }
    }

    /// Ids in use.
    #[cfg(test)]
    #[must_use]
    pub fn len(&self) -> usize {
        self.used.len()
    }
}

#[cfg(test)]
mod tests {
    use super::IdAllocator;

    #[test]
    fn ids_are_unique_restored_and_reused_when_exhausted() {
        let mut ids = IdAllocator::new(3);
        ids.take(2);
        assert_eq!(ids.allocate(), Some(3));
        assert_eq!(ids.allocate(), Some(1));
        assert_eq!(ids.allocate(), None);
        ids.release(2);
        assert_eq!(ids.allocate(), Some(2));
        assert_eq!(ids.allocate(), None);
    }

    /// Once the space has been gone through, each allocation takes a freed id without
    /// walking the space again: 200 000 churned ids in a space of 1 048 576 would be
    /// ~10^11 steps for a scan from 1 per allocation.
    #[test]
    fn allocation_after_the_space_is_gone_through_does_not_scan_it() {
        let max = 1 << 20;
        let mut ids = IdAllocator::new(max);
        for _ in 0..max {
            assert!(ids.allocate().is_some());
        }
        assert_eq!(ids.allocate(), None);
        // The upper half is freed; the lower half stays in use (a scan from 1 would
        // step over it every time).
        for id in max / 2..=max {
            ids.release(id);
        }
        for round in 0..200_000u32 {
            let id = ids.allocate().expect("a freed id");
            assert!(id >= max / 2, "round {round}: {id} was never freed");
            ids.release(id);
        }
        assert_eq!(ids.len(), usize::try_from(max / 2 - 1).unwrap());
    }
}
