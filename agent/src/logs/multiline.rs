//! Multiline joining: a line matching the start pattern opens an event, other lines are
//! appended to it (Java stack traces). Pure state machine with an explicit clock so the
//! flush timeout is tested without sleeping.

use std::time::{Duration, Instant};

use regex::bytes::Regex;

/// A complete event: the joined message and the file offset just after its last line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    pub message: Vec<u8>,
    pub end_offset: u64,
    /// The event reached `max_bytes` and lost its tail.
    pub truncated: bool,
}

pub struct Joiner {
    start: Option<Regex>,
    timeout: Duration,
    max_bytes: usize,
    pending: Option<(Joined, Instant)>,
}

impl Joiner {
    /// `start` None: every line is its own event.
    pub fn new(start: Option<Regex>, timeout: Duration, max_bytes: usize) -> Self {
        Self {
            start,
            timeout,
            max_bytes,
            pending: None,
        }
    }

    /// Feeds one line (without its newline); returns the event it completes, if any.
    pub fn push(
        &mut self,
        line: &[u8],
        truncated: bool,
        end_offset: u64,
        now: Instant,
    ) -> Option<Joined> {
        let Some(re) = &self.start else {
            return Some(Joined {
                message: line.to_vec(),
                end_offset,
                truncated,
            });
        };
        if !re.is_match(line) {
            if let Some((p, at)) = self.pending.as_mut() {
                if p.message.len() + 1 + line.len() > self.max_bytes {
                    let room = self.max_bytes.saturating_sub(p.message.len() + 1);
                    if room > 0 {
                        p.message.push(b'\n');
                        p.message.extend_from_slice(&line[..room.min(line.len())]);
                    }
                    p.truncated = true;
                } else {
                    p.message.push(b'\n');
                    p.message.extend_from_slice(line);
                }
                p.truncated |= truncated;
                p.end_offset = end_offset;
                *at = now;
                return None;
            }
            // A continuation with nothing before it (start of file): its own event.
        }
        let prev = self.pending.take().map(|(p, _)| p);
        self.pending = Some((
            Joined {
                message: line.to_vec(),
                end_offset,
                truncated,
            },
            now,
        ));
        prev
    }

    /// The pending event once no line came for the timeout.
    pub fn flush_due(&mut self, now: Instant) -> Option<Joined> {
        match &self.pending {
            Some((_, at)) if now.duration_since(*at) >= self.timeout => {
                self.pending.take().map(|(p, _)| p)
            }
            _ => None,
        }
    }

    /// The pending event, unconditionally (end of a rotated file, truncation).
    pub fn flush(&mut self) -> Option<Joined> {
        self.pending.take().map(|(p, _)| p)
    }

    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn java() -> Joiner {
        Joiner::new(
            Some(Regex::new(r"^\d{4}-\d{2}-\d{2} ").unwrap()),
            Duration::from_secs(1),
            1 << 16,
        )
    }

    #[test]
    fn java_stack_trace_is_one_event() {
        let t0 = Instant::now();
        let mut j = java();
        let lines = [
            "2026-11-27 10:00:00 ERROR boom",
            "java.lang.IllegalStateException: bad",
            "\tat com.example.Foo.bar(Foo.java:42)",
            "\tat com.example.Main.main(Main.java:7)",
            "Caused by: java.io.IOException: disk",
            "\t... 2 more",
            "2026-11-27 10:00:01 INFO next",
        ];
        let mut out = Vec::new();
        let mut off = 0;
        for l in lines {
            off += l.len() as u64 + 1;
            out.extend(j.push(l.as_bytes(), false, off, t0));
        }
        assert_eq!(out.len(), 1);
        let msg = String::from_utf8(out[0].message.clone()).unwrap();
        assert_eq!(msg, lines[..6].join("\n"));
        // The checkpoint position is the end of the trace's last line, not beyond.
        assert_eq!(
            out[0].end_offset,
            lines[..6].iter().map(|l| l.len() as u64 + 1).sum::<u64>()
        );
        // The last event is held until the timeout.
        assert!(j.flush_due(t0 + Duration::from_millis(999)).is_none());
        let last = j.flush_due(t0 + Duration::from_secs(1)).unwrap();
        assert_eq!(last.message, lines[6].as_bytes());
        assert!(!j.has_pending());
    }

    #[test]
    fn continuation_resets_the_timeout_and_caps_size() {
        let t0 = Instant::now();
        let mut j = Joiner::new(
            Some(Regex::new(r"^\S").unwrap()),
            Duration::from_secs(1),
            16,
        );
        assert!(j.push(b"start", false, 6, t0).is_none());
        assert!(j
            .push(b"  more", false, 13, t0 + Duration::from_millis(900))
            .is_none());
        assert!(j.flush_due(t0 + Duration::from_millis(1500)).is_none());
        assert!(j
            .push(
                b"  and a long tail",
                false,
                31,
                t0 + Duration::from_millis(1600)
            )
            .is_none());
        let e = j.flush_due(t0 + Duration::from_secs(3)).unwrap();
        assert_eq!(e.message.len(), 16);
        assert!(e.truncated);
        assert_eq!(e.end_offset, 31);
    }

    #[test]
    fn without_pattern_every_line_is_an_event() {
        let mut j = Joiner::new(None, Duration::from_secs(1), 100);
        let e = j.push(b"  indented", false, 11, Instant::now()).unwrap();
        assert_eq!(e.message, b"  indented");
    }
}
