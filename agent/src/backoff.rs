//! Reconnection delays, shared by the session and the log shipper.

use std::time::Duration;

/// After a reset (a session that had registered was lost), this many delays stay at the
/// initial one before they double: a bastion restart costs a reconnecting agent at most about
/// one initial delay after the bastion is back, while the jitter still spreads the fleet
/// (issue 18: with doubling from the first failure, agents that tried while the bastion was
/// still starting came back seconds after it was ready).
const FAST_TRIES: u32 = 5;

/// Exponential backoff with jitter: each delay is drawn in [d/2, d], d doubling to `max`
/// (after a reset, the first few delays stay at the initial one).
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
    fast_left: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            current: initial,
            fast_left: 0,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let d = self.current;
        if self.fast_left > 0 {
            self.fast_left -= 1;
        } else {
            self.current = (self.current * 2).min(self.max);
        }
        let half = d / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    /// After a session that worked: back to the initial delay, held for a few tries.
    pub fn reset(&mut self) {
        self.current = self.initial;
        self.fast_left = FAST_TRIES;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_a_reset_the_first_tries_stay_short_then_double() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        b.reset();
        let d: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        for x in &d[..FAST_TRIES as usize + 1] {
            assert!(*x >= Duration::from_millis(500) && *x <= Duration::from_secs(1));
        }
        assert!(d[FAST_TRIES as usize + 1] >= Duration::from_secs(1));
        assert!(d[7] >= Duration::from_secs(2));
    }
}
