//! Per-source-address rate limiting of unauthenticated connections (brute force), and the
//! per-admin count of open jump sessions.
//!
//! Each new connection takes a token from its source address's bucket and gives it back
//! when it authenticates, so only connections that fail (bad keys, timeouts, scanners)
//! drain the bucket; sequential logins of a legitimate admin never do.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Most source addresses remembered. Past it, full buckets are forgotten first, then the
/// fullest (least drained) ones down to [`EVICT_TO`]: rotating source addresses (an IPv6
/// /64 holds 2^64) cannot grow the map, and the drained bucket of an address that keeps
/// failing is the last to go.
const MAX_TRACKED: usize = 65_536;
/// Size the map is brought back to when it is full, so eviction runs once per
/// `MAX_TRACKED - EVICT_TO` new addresses, not on each.
const EVICT_TO: usize = MAX_TRACKED * 3 / 4;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

#[derive(Debug)]
pub struct RateLimiter {
    burst: f64,
    refill: Duration,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl RateLimiter {
    pub fn new(burst: u32, refill: Duration) -> Self {
        Self {
            burst: f64::from(burst.max(1)),
            refill: refill.max(Duration::from_millis(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn refilled(&self, b: &mut Bucket, now: Instant) {
        let earned = now.duration_since(b.last).as_secs_f64() / self.refill.as_secs_f64();
        b.tokens = (b.tokens + earned).min(self.burst);
        b.last = now;
    }

    /// Takes a token for a new connection; false when the source is over its limit.
    pub fn try_take(&self, ip: IpAddr, now: Instant) -> bool {
        let Ok(mut map) = self.buckets.lock() else {
            return true;
        };
        if map.len() >= MAX_TRACKED && !map.contains_key(&ip) {
            self.evict(&mut map, now);
        }
        let b = map.entry(ip).or_insert(Bucket {
            tokens: self.burst,
            last: now,
        });
        self.refilled(b, now);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Tokens a bucket would hold at `now`.
    fn level(&self, b: &Bucket, now: Instant) -> f64 {
        let earned = now.duration_since(b.last).as_secs_f64() / self.refill.as_secs_f64();
        (b.tokens + earned).min(self.burst)
    }

    /// Forgets full buckets (they hold nothing a fresh one would not), then, if the map is
    /// still above [`EVICT_TO`], the fullest buckets, the oldest first among equals.
    fn evict(&self, map: &mut HashMap<IpAddr, Bucket>, now: Instant) {
        map.retain(|_, b| self.level(b, now) < self.burst);
        if map.len() <= EVICT_TO {
            return;
        }
        let mut order: Vec<(f64, Instant, IpAddr)> = map
            .iter()
            .map(|(ip, b)| (self.level(b, now), b.last, *ip))
            .collect();
        let excess = map.len() - EVICT_TO;
        // Fullest first; among equals, the least recently seen first.
        order.select_nth_unstable_by(excess - 1, |a, b| {
            b.0.total_cmp(&a.0).then_with(|| a.1.cmp(&b.1))
        });
        for (_, _, ip) in &order[..excess] {
            map.remove(ip);
        }
    }

    /// Source addresses currently remembered.
    pub fn tracked(&self) -> usize {
        self.buckets.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Gives back the token of a connection that authenticated.
    pub fn refund(&self, ip: IpAddr, now: Instant) {
        if let Ok(mut map) = self.buckets.lock() {
            if let Some(b) = map.get_mut(&ip) {
                self.refilled(b, now);
                b.tokens = (b.tokens + 1.0).min(self.burst);
            }
        }
    }
}

/// Open jump sessions per admin.
#[derive(Debug, Default)]
pub struct Sessions {
    open: Mutex<HashMap<String, usize>>,
}

/// Holds one session slot until dropped.
pub struct SessionSlot {
    sessions: Arc<Sessions>,
    admin: String,
}

impl Sessions {
    /// A slot for `admin`, or None when they already have `max` sessions open.
    pub fn acquire(self: &Arc<Self>, admin: &str, max: usize) -> Option<SessionSlot> {
        let mut map = self.open.lock().ok()?;
        let n = map.entry(admin.to_string()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(SessionSlot {
            sessions: self.clone(),
            admin: admin.to_string(),
        })
    }

    pub fn total(&self) -> usize {
        self.open.lock().map(|m| m.values().sum()).unwrap_or(0)
    }
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        if let Ok(mut map) = self.sessions.open.lock() {
            if let Some(n) = map.get_mut(&self.admin) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(&self.admin);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills_and_refunds() {
        let rl = RateLimiter::new(3, Duration::from_secs(10));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let t0 = Instant::now();
        assert!(rl.try_take(ip, t0));
        assert!(rl.try_take(ip, t0));
        assert!(rl.try_take(ip, t0));
        assert!(!rl.try_take(ip, t0));
        // Another source is unaffected.
        assert!(rl.try_take("192.0.2.2".parse().unwrap(), t0));
        // One token back after one refill period.
        assert!(rl.try_take(ip, t0 + Duration::from_secs(10)));
        assert!(!rl.try_take(ip, t0 + Duration::from_secs(10)));
        rl.refund(ip, t0 + Duration::from_secs(10));
        assert!(rl.try_take(ip, t0 + Duration::from_secs(10)));
    }

    /// Issue 16, point 8: a million rotating source addresses (one failed connection each,
    /// within one refill period, so no bucket is full again) keep the map at its cap, and an
    /// address that drained its bucket before the flood is still limited after it.
    #[test]
    fn rotating_sources_cannot_grow_the_map() {
        let rl = RateLimiter::new(3, Duration::from_secs(60));
        let t0 = Instant::now();
        let brute: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..3 {
            assert!(rl.try_take(brute, t0));
        }
        assert!(!rl.try_take(brute, t0));
        let mut most = 0;
        for i in 0..1_000_000u32 {
            let ip = IpAddr::V6(std::net::Ipv6Addr::from(
                (0x2001_0db8u128 << 96) | u128::from(i),
            ));
            let now = t0 + Duration::from_micros(u64::from(i));
            assert!(rl.try_take(ip, now), "a new source has its burst");
            most = most.max(rl.tracked());
        }
        assert!(most <= MAX_TRACKED, "map grew to {most}");
        assert!(rl.tracked() >= EVICT_TO);
        assert!(
            !rl.try_take(brute, t0 + Duration::from_secs(1)),
            "the drained bucket survived the flood"
        );
    }

    #[test]
    fn session_slots() {
        let s = Arc::new(Sessions::default());
        let a = s.acquire("alice", 2).unwrap();
        let _b = s.acquire("alice", 2).unwrap();
        assert!(s.acquire("alice", 2).is_none());
        assert!(s.acquire("bob", 2).is_some());
        drop(a);
        assert!(s.acquire("alice", 2).is_some());
    }
}
