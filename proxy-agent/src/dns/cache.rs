//! The forwarder's cache: bounded (LRU), positive answers for their TTL capped at 30 s,
//! negative ones for the SOA minimum capped at 5 s, expired entries kept a while to be
//! served only when every upstream fails, popular entries flagged for prefetch.
use std::{
    num::NonZeroUsize,
    sync::Mutex,
    time::{Duration, Instant},
};

use hickory_proto::{
    op::ResponseCode,
    rr::{RData, Record, RecordType},
};
use lru::LruCache;

pub const MAX_TTL: Duration = Duration::from_secs(30);
pub const MAX_NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// How long after expiry an entry may still be served stale.
pub const STALE_FOR: Duration = Duration::from_hours(1);
/// TTL of a stale answer.
const STALE_TTL: u32 = 5;

/// Name (lower-cased, fully qualified) and type.
pub type Key = (String, RecordType);

/// What an upstream said, as cached.
#[derive(Clone, Debug, PartialEq)]
pub struct Answer {
    pub rcode: ResponseCode,
    pub answers: Vec<Record>,
    pub authority: Vec<Record>,
}

impl Answer {
    fn negative(&self) -> bool {
        self.rcode == ResponseCode::NXDomain || self.answers.is_empty()
    }

    /// How long it may be cached; `None` for answers that must not be.
    fn lifetime(&self) -> Option<Duration> {
        if !matches!(self.rcode, ResponseCode::NoError | ResponseCode::NXDomain) {
            return None;
        }
        let secs = if self.negative() {
            let soa = self.authority.iter().find_map(|r| match r.data() {
                RData::SOA(soa) => Some(soa.minimum().min(r.ttl())),
                _ => None,
            });
            Duration::from_secs(soa.map_or(0, u64::from)).min(MAX_NEGATIVE_TTL)
        } else {
            let min = self.answers.iter().map(Record::ttl).min().unwrap_or(0);
            Duration::from_secs(u64::from(min)).min(MAX_TTL)
        };
        (!secs.is_zero()).then_some(secs)
    }

    /// The answer as clients may keep it: TTLs capped like the cache's own lifetime.
    #[must_use]
    pub fn capped(self) -> Self {
        match self.lifetime() {
            Some(lifetime) => self.aged(u32::try_from(lifetime.as_secs()).unwrap_or(u32::MAX)),
            None => self,
        }
    }

    /// The answer with every TTL at most `ttl`.
    fn aged(&self, ttl: u32) -> Self {
        let cap = |records: &[Record]| {
            records
                .iter()
                .map(|r| {
                    let mut r = r.clone();
                    r.set_ttl(r.ttl().min(ttl));
                    r
                })
                .collect()
        };
        Self {
            rcode: self.rcode,
            answers: cap(&self.answers),
            authority: cap(&self.authority),
        }
    }
}

struct Entry {
    answer: Answer,
    stored: Instant,
    lifetime: Duration,
    hits: u32,
    prefetching: bool,
}

/// A lookup's outcome.
#[derive(Debug, PartialEq)]
pub enum Hit {
    /// Fresh; `prefetch` asks the caller to refresh it in the background.
    Fresh {
        answer: Answer,
        prefetch: bool,
    },
    /// Expired but servable if upstreams fail.
    Stale(Answer),
    Miss,
}

pub struct Cache {
    inner: Mutex<Inner>,
}

struct Inner {
    entries: LruCache<Key, Entry>,
    /// How many entries are negative, kept as entries come and go.
    negative: usize,
}

impl Inner {
    fn forget(&mut self, gone: Option<&Entry>) {
        if gone.is_some_and(|e| e.answer.negative()) {
            self.negative -= 1;
        }
    }
}

/// What an insert did to the cache's contents.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Inserted {
    pub stored: bool,
    pub evicted: bool,
}

impl Cache {
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        let capacity = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        Self {
            inner: Mutex::new(Inner {
                entries: LruCache::new(capacity),
                negative: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Looks `key` up at `now`.
    pub fn get(&self, key: &Key, now: Instant) -> Hit {
        let mut inner = self.lock();
        let Some(entry) = inner.entries.get_mut(key) else {
            return Hit::Miss;
        };
        let age = now.saturating_duration_since(entry.stored);
        if age < entry.lifetime {
            entry.hits += 1;
            let remaining = entry.lifetime.saturating_sub(age);
            // Popular and in the last tenth of its life: refresh before clients miss.
            let prefetch =
                entry.hits >= 2 && remaining * 10 <= entry.lifetime && !entry.prefetching;
            entry.prefetching |= prefetch;
            let ttl = u32::try_from(remaining.as_secs().max(1)).unwrap_or(u32::MAX);
            return Hit::Fresh {
                answer: entry.answer.aged(ttl),
                prefetch,
            };
        }
        if age < entry.lifetime + STALE_FOR {
            return Hit::Stale(entry.answer.aged(STALE_TTL));
        }
        let gone = inner.entries.pop(key);
        inner.forget(gone.as_ref());
        Hit::Miss
    }

    /// Stores an upstream answer if it may be cached.
    pub fn insert(&self, key: &Key, answer: Answer, now: Instant) -> Inserted {
        let Some(lifetime) = answer.lifetime() else {
            return Inserted::default();
        };
        let entry = Entry {
            answer,
            stored: now,
            lifetime,
            hits: 0,
            prefetching: false,
        };
        let mut inner = self.lock();
        if entry.answer.negative() {
            inner.negative += 1;
        }
        let replaced = inner.entries.push(key.clone(), entry);
        let evicted = replaced.as_ref().is_some_and(|(old, _)| old != key);
        inner.forget(replaced.as_ref().map(|(_, e)| e));
        Inserted {
            stored: true,
            evicted,
        }
    }

    /// Entries by kind: (positive, negative).
    pub fn counts(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.entries.len() - inner.negative, inner.negative)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use hickory_proto::{
        op::ResponseCode,
        rr::{
            rdata::{A, SOA},
            Name, RData, Record, RecordType,
        },
    };

    use super::{Answer, Cache, Hit, Inserted, STALE_FOR};

    fn positive(ttl: u32) -> Answer {
        let name = Name::from_ascii("example.org.").unwrap();
        Answer {
            rcode: ResponseCode::NoError,
            answers: vec![Record::from_rdata(
                name,
                ttl,
                RData::A(A::new(192, 0, 2, 1)),
            )],
            authority: vec![],
        }
    }

    fn key(name: &str) -> (String, RecordType) {
        (name.to_owned(), RecordType::A)
    }

    #[test]
    fn positive_ttl_is_capped_at_30_s_and_counts_down() {
        let cache = Cache::new(10);
        let t0 = Instant::now();
        cache.insert(&key("a."), positive(300), t0);
        let Hit::Fresh { answer, .. } = cache.get(&key("a."), t0 + Duration::from_secs(10)) else {
            panic!("not fresh")
        };
        assert_eq!(answer.answers[0].ttl(), 20);
        assert!(matches!(
            cache.get(&key("a."), t0 + Duration::from_secs(31)),
            Hit::Stale(_)
        ));
        assert_eq!(
            cache.get(&key("a."), t0 + Duration::from_secs(31) + STALE_FOR),
            Hit::Miss
        );
    }

    #[test]
    fn negative_answers_live_for_the_soa_minimum_capped_at_5_s() {
        let cache = Cache::new(10);
        let t0 = Instant::now();
        let zone = Name::from_ascii("example.org.").unwrap();
        let soa = SOA::new(zone.clone(), zone.clone(), 1, 1, 1, 1, 60);
        let answer = Answer {
            rcode: ResponseCode::NXDomain,
            answers: vec![],
            authority: vec![Record::from_rdata(zone, 3600, RData::SOA(soa))],
        };
        cache.insert(&key("nx."), answer, t0);
        assert!(matches!(
            cache.get(&key("nx."), t0 + Duration::from_secs(4)),
            Hit::Fresh { .. }
        ));
        assert!(matches!(
            cache.get(&key("nx."), t0 + Duration::from_secs(5)),
            Hit::Stale(_)
        ));
        assert_eq!(cache.counts(), (0, 1));
    }

    #[test]
    fn failures_and_zero_ttls_are_not_cached_and_the_size_is_bounded() {
        let cache = Cache::new(2);
        let t0 = Instant::now();
        let mut failed = positive(30);
        failed.rcode = ResponseCode::ServFail;
        assert_eq!(cache.insert(&key("f."), failed, t0), Inserted::default());
        assert!(!cache.insert(&key("z."), positive(0), t0).stored);
        cache.insert(&key("a."), positive(30), t0);
        cache.insert(&key("b."), positive(30), t0);
        assert!(cache.insert(&key("c."), positive(30), t0).evicted);
        assert_eq!(cache.get(&key("a."), t0), Hit::Miss);
        assert_eq!(cache.counts(), (2, 0));
    }

    #[test]
    fn popular_entries_near_expiry_are_prefetched_once() {
        let cache = Cache::new(10);
        let t0 = Instant::now();
        cache.insert(&key("p."), positive(30), t0);
        let prefetch = |secs| match cache.get(&key("p."), t0 + Duration::from_secs(secs)) {
            Hit::Fresh { prefetch, .. } => prefetch,
            other => panic!("{other:?}"),
        };
        assert!(!prefetch(1));
        assert!(!prefetch(10));
        assert!(prefetch(28));
        assert!(!prefetch(29));
    }
}
