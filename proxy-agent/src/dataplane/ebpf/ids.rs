//! Id allocation for backends and reverse-NAT entries: ids stay stable for as long as
//! they are used, are restored from the maps at start, and are reused once freed.
use std::collections::BTreeSet;

/// Smallest-free-first allocator over `1..=max`.
#[derive(Debug)]
pub struct IdAllocator {
    max: u32,
    used: BTreeSet<u32>,
    next: u32,
}

impl IdAllocator {
    #[must_use]
    pub fn new(max: u32) -> Self {
        Self {
            max,
            used: BTreeSet::new(),
            next: 1,
        }
    }

    /// Marks an id restored from the kernel as taken.
    pub fn take(&mut self, id: u32) {
        self.used.insert(id);
        self.next = self.next.max(id.saturating_add(1));
    }

    /// A free id, or `None` when all of `1..=max` are in use.
    pub fn allocate(&mut self) -> Option<u32> {
        let id = if self.next <= self.max {
            self.next
        } else {
            (1..=self.max).find(|id| !self.used.contains(id))?
        };
        self.take(id);
        Some(id)
    }

    pub fn release(&mut self, id: u32) {
        self.used.remove(&id);
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
}
