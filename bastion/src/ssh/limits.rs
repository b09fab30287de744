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

/// Source addresses remembered before full buckets are forgotten.
const MAX_TRACKED: usize = 65_536;

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
        if map.len() >= MAX_TRACKED {
            map.retain(|_, b| {
                let earned = now.duration_since(b.last).as_secs_f64() / self.refill.as_secs_f64();
                b.tokens + earned < self.burst
            });
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
