//! Batching for the registry's hot paths during a reconnection storm (issue 18): a group
//! commit, so that many registrations share one transaction and one fsync, and a throttle
//! that folds many snapshot rebuilds into one while keeping the first one immediate.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Group commit: every caller queues its item and waits until a commit that holds it has
/// finished; whoever finds no commit running writes everything queued so far in one call
/// (one transaction). While that commit runs, the next callers queue up for the next one,
/// so the batch size follows the load: one item when calls are rare, hundreds in a storm.
/// Each caller returns only after the commit of its own item, with that commit's result.
pub struct GroupCommit<T> {
    queue: Mutex<Queue<T>>,
    done: Condvar,
}

struct Queue<T> {
    pending: Vec<T>,
    /// Tickets handed out, and the last one whose commit has finished.
    issued: u64,
    finished: u64,
    writing: bool,
    /// Recent failed commits: (first ticket, last ticket, error).
    failed: VecDeque<(u64, u64, String)>,
}

impl<T> Default for GroupCommit<T> {
    fn default() -> Self {
        Self {
            queue: Mutex::new(Queue {
                pending: Vec::new(),
                issued: 0,
                finished: 0,
                writing: false,
                failed: VecDeque::new(),
            }),
            done: Condvar::new(),
        }
    }
}

impl<T> GroupCommit<T> {
    /// Queues `item` and returns once it is committed (`Ok`) or its commit failed (the
    /// error, shared by every item of that commit). `write` commits a batch; it runs on the
    /// thread of whichever caller leads that batch. Blocking.
    pub fn submit(
        &self,
        item: T,
        write: impl FnOnce(&[T]) -> Result<(), String>,
    ) -> Result<(), String> {
        let mut q = lock(&self.queue);
        q.issued += 1;
        let ticket = q.issued;
        q.pending.push(item);
        let mut write = Some(write);
        loop {
            if q.finished >= ticket {
                return match q
                    .failed
                    .iter()
                    .find(|(a, b, _)| (*a..=*b).contains(&ticket))
                {
                    Some((_, _, e)) => Err(e.clone()),
                    None => Ok(()),
                };
            }
            if !q.writing {
                // Lead the next commit: everything queued since the last one.
                q.writing = true;
                let batch = std::mem::take(&mut q.pending);
                let (first, last) = (q.finished + 1, q.issued);
                drop(q);
                let r = match write.take() {
                    Some(w) => w(&batch),
                    None => Err("internal: group commit led twice".into()),
                };
                q = lock(&self.queue);
                q.writing = false;
                q.finished = last;
                if let Err(e) = r {
                    q.failed.push_back((first, last, e));
                    while q.failed.len() > 16 {
                        q.failed.pop_front();
                    }
                }
                self.done.notify_all();
                continue;
            }
            q = self.done.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Throttle for a costly rebuild (the registry's snapshot: O(agents), and every subscriber
/// rebuilds from it). A request is served at once when the last rebuild is older than a few
/// times its own cost; otherwise it is folded into one deferred rebuild run by a worker
/// thread. So a lone change is published at once, and a storm of changes costs a bounded
/// share of a core instead of one full rebuild per change (quadratic in the fleet).
/// Events ride with the requests: they are handed out with the rebuild that includes them,
/// so a subscriber never hears of a change before the snapshot shows it.
pub struct Throttle<E> {
    state: Mutex<ThrottleState<E>>,
    wake: Condvar,
}

struct ThrottleState<E> {
    pending: bool,
    events: Vec<E>,
    last: Option<Instant>,
    cost: Duration,
}

/// Rebuilds cheaper than this are never deferred (small fleets behave as before).
const CHEAP: Duration = Duration::from_millis(1);
/// A deferred rebuild waits this many times the last rebuild's cost after it...
const SPACING: u32 = 4;
/// ...and never longer than this.
const MAX_DELAY: Duration = Duration::from_millis(250);

impl<E> Default for Throttle<E> {
    fn default() -> Self {
        Self {
            state: Mutex::new(ThrottleState {
                pending: false,
                events: Vec::new(),
                last: None,
                cost: Duration::ZERO,
            }),
            wake: Condvar::new(),
        }
    }
}

impl<E> Throttle<E> {
    fn spacing(cost: Duration) -> Duration {
        if cost < CHEAP {
            Duration::ZERO
        } else {
            (cost * SPACING).min(MAX_DELAY)
        }
    }

    /// Asks for a rebuild carrying `event`. `Some(events)`: rebuild now, then hand these
    /// out; `None`: the worker will (see [`Throttle::run_worker`]).
    pub fn request(&self, event: Option<E>) -> Option<Vec<E>> {
        let mut s = lock(&self.state);
        let now = Instant::now();
        let due = s
            .last
            .is_none_or(|t| now.duration_since(t) >= Self::spacing(s.cost));
        if !s.pending && due {
            s.last = Some(now);
            return Some(event.into_iter().collect());
        }
        s.events.extend(event);
        s.pending = true;
        self.wake.notify_one();
        None
    }

    /// Records how long a rebuild took (it sets the spacing of the next ones).
    pub fn cost(&self, took: Duration) {
        lock(&self.state).cost = took;
    }

    /// Runs deferred rebuilds until `alive` says the owner is gone (checked every second
    /// while idle): `rebuild` gets the events gathered since the last one.
    pub fn run_worker(&self, alive: impl Fn() -> bool, mut rebuild: impl FnMut(Vec<E>)) {
        loop {
            let mut s = lock(&self.state);
            if !s.pending {
                let (g, t) = self
                    .wake
                    .wait_timeout(s, Duration::from_secs(1))
                    .unwrap_or_else(|e| e.into_inner());
                s = g;
                if t.timed_out() && !s.pending {
                    drop(s);
                    if !alive() {
                        return;
                    }
                    continue;
                }
                if !s.pending {
                    continue;
                }
            }
            let now = Instant::now();
            let at = s.last.map_or(now, |t| t + Self::spacing(s.cost)).max(now);
            if at > now {
                drop(s);
                std::thread::sleep(at - now);
                continue;
            }
            s.pending = false;
            s.last = Some(now);
            let events = std::mem::take(&mut s.events);
            drop(s);
            rebuild(events);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn group_commit_batches_concurrent_items_and_returns_each_its_result() {
        let gc = Arc::new(GroupCommit::<u32>::default());
        let batches = Arc::new(Mutex::new(Vec::new()));
        let threads: Vec<_> = (0..64)
            .map(|i| {
                let gc = gc.clone();
                let batches = batches.clone();
                std::thread::spawn(move || {
                    gc.submit(i, |b| {
                        std::thread::sleep(Duration::from_millis(5));
                        batches.lock().unwrap().push(b.to_vec());
                        if b.contains(&13) {
                            Err("boom".into())
                        } else {
                            Ok(())
                        }
                    })
                })
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let batches = batches.lock().unwrap();
        let mut all: Vec<u32> = batches.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..64).collect::<Vec<_>>(), "each item committed once");
        assert!(batches.len() < 64, "concurrent items shared commits");
        let failed: Vec<u32> = batches.iter().find(|b| b.contains(&13)).unwrap().clone();
        for (i, r) in results.iter().enumerate() {
            assert_eq!(r.is_err(), failed.contains(&(i as u32)), "item {i}: {r:?}");
        }
    }

    #[test]
    fn throttle_serves_a_lone_request_at_once_and_folds_a_burst() {
        let t = Arc::new(Throttle::<u32>::default());
        assert_eq!(t.request(Some(1)), Some(vec![1]));
        t.cost(Duration::from_millis(20));
        // Within 4 x 20 ms of the last rebuild: deferred, events gathered.
        assert_eq!(t.request(Some(2)), None);
        assert_eq!(t.request(Some(3)), None);
        let got = Arc::new(Mutex::new(Vec::new()));
        let (t2, got2) = (t.clone(), got.clone());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let w = std::thread::spawn(move || {
            t2.run_worker(
                || !stop2.load(std::sync::atomic::Ordering::Relaxed),
                |ev| got2.lock().unwrap().push(ev),
            )
        });
        let start = Instant::now();
        while got.lock().unwrap().is_empty() && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            *got.lock().unwrap(),
            vec![vec![2, 3]],
            "one rebuild for the burst"
        );
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        w.join().unwrap();
        // Cheap rebuilds are never deferred.
        let t = Throttle::<u32>::default();
        t.cost(Duration::from_micros(100));
        assert!(t.request(Some(1)).is_some());
        assert!(t.request(Some(2)).is_some());
    }
}
