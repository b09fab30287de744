//! The answer cache: sharded LRU maps of (name, type) to an upstream outcome, bounded in
//! entries. Positive and negative answers live for their TTL clamped by configuration, failures
//! for at most `servfail_ttl`, and expired answers stay for `serve_stale` so they can be
//! served when every upstream is down (RFC 8767).

use std::hash::{BuildHasher, Hash};
use std::num::NonZeroUsize;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use lru::LruCache;
use tokio::time::Instant;

use super::metrics::metrics;

/// TTL given to an answer served stale (RFC 8767 section 4 suggests 30 s).
pub const STALE_TTL: u32 = 30;
/// How long after a failed refresh a stale answer is served without trying upstreams again
/// (RFC 8767's failure recheck timer).
pub const STALE_RETRY: Duration = Duration::from_secs(30);
/// Lifetime of a negative answer that came without an SOA (RFC 2308 says not to cache it; a
/// few seconds spare the upstream a storm of identical misses).
pub const NO_SOA_NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// Answers with a shorter TTL are not prefetched.
pub const PREFETCH_MIN_TTL: u32 = 10;
const SHARDS: usize = 16;

/// Caching bounds from configuration.
#[derive(Debug, Clone)]
pub struct Limits {
    pub min_ttl: Duration,
    pub max_ttl: Duration,
    pub negative_max_ttl: Duration,
    pub servfail_ttl: Duration,
    pub serve_stale: Duration,
}

/// A cache key: the lowercased question (hickory's `Name` compares and hashes
/// case-insensitively).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub name: Name,
    pub qtype: RecordType,
}

/// What an upstream said about a question.
#[derive(Debug, Clone)]
pub struct Entry {
    pub rcode: ResponseCode,
    pub answers: Vec<Record>,
    /// The SOA of a negative answer.
    pub authority: Vec<Record>,
    pub expires: Instant,
    /// The TTL it was stored with, in seconds.
    pub ttl: u32,
    /// Until when it may be served stale.
    pub stale_until: Instant,
    /// While served stale, upstreams are not asked again before this.
    pub retry_after: Option<Instant>,
}

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup {
    Fresh(Arc<Entry>),
    /// Expired but servable stale; `retry_due` says whether upstreams should be tried first.
    Stale {
        entry: Arc<Entry>,
        retry_due: bool,
    },
    Miss,
}

fn secs(d: Duration) -> u32 {
    d.as_secs().min(u32::MAX as u64) as u32
}

impl Entry {
    /// Remaining TTL in whole seconds at `now`, rounded up (0 once expired).
    pub fn ttl_at(&self, now: Instant) -> u32 {
        let left = self.expires.saturating_duration_since(now);
        secs(left + Duration::from_nanos(999_999_999))
    }

    /// Whether a hit should refresh it in the background: popular answers are renewed before
    /// they expire, so their clients never wait for an upstream (prefetch, as unbound does
    /// in the last tenth of the TTL).
    pub fn wants_prefetch(&self, now: Instant) -> bool {
        !self.is_failure()
            && self.ttl >= PREFETCH_MIN_TTL
            && self.expires.saturating_duration_since(now) * 10
                < Duration::from_secs(self.ttl.into())
    }

    pub fn is_failure(&self) -> bool {
        self.rcode == ResponseCode::ServFail
    }

    /// A failure, kept for `servfail_ttl` (RFC 9520), never served stale.
    pub fn servfail(l: &Limits, now: Instant) -> Self {
        Self {
            rcode: ResponseCode::ServFail,
            answers: Vec::new(),
            authority: Vec::new(),
            expires: now + l.servfail_ttl,
            ttl: secs(l.servfail_ttl),
            stale_until: now + l.servfail_ttl,
            retry_after: None,
        }
    }

    /// The cacheable part of an upstream response (NOERROR or NXDOMAIN).
    pub fn from_response(msg: Message, l: &Limits, now: Instant) -> Self {
        let rcode = msg.metadata.response_code;
        let soa = msg
            .authorities
            .into_iter()
            .find(|r| matches!(r.data, RData::SOA(_)));
        let answers = msg.answers;
        let positive = rcode == ResponseCode::NoError && !answers.is_empty();
        let ttl = if positive {
            let min = answers.iter().map(|r| r.ttl).min().unwrap_or(0);
            Duration::from_secs(min.into()).clamp(l.min_ttl, l.max_ttl.max(l.min_ttl))
        } else {
            match &soa {
                Some(r) => {
                    let m = match &r.data {
                        RData::SOA(s) => s.minimum.min(r.ttl),
                        _ => r.ttl,
                    };
                    Duration::from_secs(m.into())
                        .max(l.min_ttl)
                        .min(l.negative_max_ttl)
                }
                None => NO_SOA_NEGATIVE_TTL.min(l.negative_max_ttl),
            }
        };
        let t = secs(ttl);
        let fix = |mut r: Record| {
            r.ttl = t;
            r
        };
        Self {
            rcode,
            answers: answers.into_iter().map(fix).collect(),
            authority: soa.into_iter().map(fix).collect(),
            expires: now + ttl,
            ttl: t,
            stale_until: now + ttl + l.serve_stale,
            retry_after: None,
        }
    }
}

/// The cache.
pub struct Cache {
    shards: Vec<Mutex<LruCache<Key, Arc<Entry>>>>,
    hasher: std::collections::hash_map::RandomState,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache").finish_non_exhaustive()
    }
}

impl Cache {
    pub fn new(entries: usize) -> Self {
        let per = NonZeroUsize::new(entries.div_ceil(SHARDS).max(1)).unwrap_or(NonZeroUsize::MIN);
        Self {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(LruCache::new(per)))
                .collect(),
            hasher: Default::default(),
        }
    }

    fn shard(&self, k: &Key) -> std::sync::MutexGuard<'_, LruCache<Key, Arc<Entry>>> {
        let i = (self.hasher.hash_one(k) as usize) % SHARDS;
        // A panic while holding a shard cannot leave an LRU map half-updated in a way we rely
        // on, so a poisoned lock is still used.
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, k: &Key, now: Instant) -> Lookup {
        let mut s = self.shard(k);
        let Some(e) = s.get(k) else {
            return Lookup::Miss;
        };
        if e.expires > now {
            return Lookup::Fresh(e.clone());
        }
        if e.stale_until > now && !e.is_failure() {
            return Lookup::Stale {
                entry: e.clone(),
                retry_due: e.retry_after.is_none_or(|t| t <= now),
            };
        }
        s.pop(k);
        metrics().cache_entries.fetch_sub(1, Ordering::Relaxed);
        Lookup::Miss
    }

    /// Stores an entry; a failure never replaces an answer that can still be served stale.
    pub fn insert(&self, k: Key, e: Arc<Entry>, now: Instant) {
        let mut s = self.shard(&k);
        if e.is_failure() {
            if let Some(old) = s.peek(&k) {
                if !old.is_failure() && old.stale_until > now {
                    return;
                }
            }
        }
        let had = s.contains(&k);
        let evicted = s.push(k, e);
        let evicted_other = evicted.is_some() && !had;
        if !had && !evicted_other {
            metrics().cache_entries.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{MessageType, OpCode};
    use hickory_proto::rr::rdata::{A, SOA};

    fn limits() -> Limits {
        Limits {
            min_ttl: Duration::from_secs(2),
            max_ttl: Duration::from_secs(100),
            negative_max_ttl: Duration::from_secs(50),
            servfail_ttl: Duration::from_secs(5),
            serve_stale: Duration::from_secs(60),
        }
    }

    fn key(n: &str) -> Key {
        Key {
            name: Name::from_ascii(n).unwrap(),
            qtype: RecordType::A,
        }
    }

    fn answer(ttl: u32) -> Message {
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        m.add_answer(Record::from_rdata(
            Name::from_ascii("x.org.").unwrap(),
            ttl,
            RData::A(A::new(10, 0, 0, 1)),
        ));
        m
    }

    fn nxdomain(soa_ttl: u32, minimum: u32) -> Message {
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        m.metadata.response_code = ResponseCode::NXDomain;
        let n = Name::from_ascii("org.").unwrap();
        m.add_authority(Record::from_rdata(
            n.clone(),
            soa_ttl,
            RData::SOA(SOA::new(n.clone(), n, 1, 1, 1, 1, minimum)),
        ));
        m
    }

    #[tokio::test(start_paused = true)]
    async fn ttl_is_clamped_and_counts_down() {
        let l = limits();
        let c = Cache::new(100);
        let now = Instant::now();
        c.insert(
            key("x.org."),
            Arc::new(Entry::from_response(answer(1000), &l, now)),
            now,
        );
        c.insert(
            key("y.org."),
            Arc::new(Entry::from_response(answer(0), &l, now)),
            now,
        );
        let Lookup::Fresh(e) = c.get(&key("X.ORG."), now) else {
            panic!()
        };
        assert_eq!(e.ttl_at(now), 100, "max_ttl caps");
        assert_eq!(e.answers[0].ttl, 100);
        tokio::time::advance(Duration::from_secs(1)).await;
        let Lookup::Fresh(y) = c.get(&key("y.org."), Instant::now()) else {
            panic!("min_ttl keeps a TTL-0 answer 2s")
        };
        assert_eq!(y.ttl_at(Instant::now()), 1);
        tokio::time::advance(Duration::from_secs(39)).await;
        let Lookup::Fresh(e) = c.get(&key("x.org."), Instant::now()) else {
            panic!()
        };
        assert_eq!(e.ttl_at(Instant::now()), 60);
        assert!(!e.wants_prefetch(Instant::now()));
        tokio::time::advance(Duration::from_secs(51)).await;
        assert!(e.wants_prefetch(Instant::now()), "last tenth of the TTL");
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(matches!(
            c.get(&key("x.org."), Instant::now()),
            Lookup::Stale {
                retry_due: true,
                ..
            }
        ));
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(matches!(
            c.get(&key("x.org."), Instant::now()),
            Lookup::Miss
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn negative_answers_live_for_the_soa_minimum() {
        let l = limits();
        let now = Instant::now();
        let e = Entry::from_response(nxdomain(300, 10), &l, now);
        assert_eq!(e.ttl_at(now), 10);
        assert_eq!(
            e.authority.len(),
            1,
            "the SOA is kept for the negative answer"
        );
        assert_eq!(e.authority[0].ttl, 10);
        let e = Entry::from_response(nxdomain(3600, 3600), &l, now);
        assert_eq!(e.ttl_at(now), 50, "negative_max_ttl caps");
        let mut bare = nxdomain(1, 1);
        bare.authorities.clear();
        let e = Entry::from_response(bare, &l, now);
        assert_eq!(e.ttl_at(now), 5, "no SOA: cached briefly, not 0 s");
        // NODATA is negative too.
        let mut nodata = nxdomain(300, 7);
        nodata.metadata.response_code = ResponseCode::NoError;
        assert_eq!(Entry::from_response(nodata, &l, now).ttl_at(now), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn servfail_is_brief_and_never_hides_a_stale_answer() {
        let l = limits();
        let c = Cache::new(100);
        let now = Instant::now();
        c.insert(key("f.org."), Arc::new(Entry::servfail(&l, now)), now);
        assert!(matches!(c.get(&key("f.org."), now), Lookup::Fresh(_)));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(matches!(
            c.get(&key("f.org."), Instant::now()),
            Lookup::Miss
        ));

        c.insert(
            key("s.org."),
            Arc::new(Entry::from_response(answer(5), &l, now)),
            now,
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        let now = Instant::now();
        c.insert(key("s.org."), Arc::new(Entry::servfail(&l, now)), now);
        assert!(matches!(c.get(&key("s.org."), now), Lookup::Stale { .. }));
    }

    #[test]
    fn bounded_in_entries() {
        let l = limits();
        let c = Cache::new(32);
        let now = Instant::now();
        for i in 0..1000 {
            let e = Arc::new(Entry::from_response(answer(60), &l, now));
            c.insert(key(&format!("n{i}.org.")), e, now);
        }
        assert!(c.len() <= 32, "{}", c.len());
    }
}
