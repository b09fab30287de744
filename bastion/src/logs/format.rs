//! The stored line format and the small pure helpers around it: RFC 3339 timestamps without
//! a date library in the hot path, host names made safe as path components, facility and
//! severity names, control-character escaping.
//!
//! One event is one line:
//!
//! ```text
//! 2026-11-27T03:53:41.123Z web1 sshd[812] auth.info Accepted publickey for root
//! ^ timestamp (UTC, ms)    ^host ^app      ^facility.severity ^message (rest of the line)
//! ```
//!
//! The first four fields never contain a space; the message is everything after the fourth
//! space. Control characters in the message (newline, carriage return, NUL, ESC, ...; tab
//! excepted) are written as `#` and three octal digits, the way rsyslog's
//! `EscapeControlCharactersOnReceive` does (`#012` is a newline), so one event is always one
//! line. Invalid UTF-8 is decoded lossily (U+FFFD).

use std::borrow::Cow;
use std::sync::Arc;

pub const FACILITIES: [&str; 24] = [
    "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron", "authpriv",
    "ftp", "ntp", "audit", "alert", "clock", "local0", "local1", "local2", "local3", "local4",
    "local5", "local6", "local7",
];
pub const SEVERITIES: [&str; 8] = [
    "emerg", "alert", "crit", "err", "warning", "notice", "info", "debug",
];

/// Default facility (user) and severity (notice) of a message without PRI, as rsyslog.
pub const DEFAULT_FACILITY: u8 = 1;
pub const DEFAULT_SEVERITY: u8 = 5;

/// Longest host name kept (a DNS name's maximum).
const MAX_HOST: usize = 253;
/// Longest app field kept (RFC 5424 APP-NAME is 48, PROCID 128).
const MAX_APP: usize = 180;

/// Days since 1970-01-01 to (year, month, day) (H. Hinnant's civil_from_days).
pub fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// (year, month, day) to days since 1970-01-01.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Milliseconds since the epoch, clamped to years 1970..=9999 so that formatting is total.
pub fn clamp_ms(ms: i64) -> i64 {
    ms.clamp(0, 253_402_300_799_999)
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The UTC day (days since the epoch) of a time in ms.
pub fn day_of(ms: i64) -> i64 {
    ms.div_euclid(86_400_000)
}

/// `YYYY-MM-DD` of a day number.
pub fn day_name(day: i64) -> String {
    let (y, m, d) = civil(day);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Day number of a `YYYY-MM-DD` string.
pub fn parse_day(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let y: i64 = s.get(0..4)?.parse().ok()?;
    let m: u32 = s.get(5..7)?.parse().ok()?;
    let d: u32 = s.get(8..10)?.parse().ok()?;
    ((1..=12).contains(&m) && (1..=31).contains(&d)).then(|| days_from_civil(y, m, d))
}

fn push2(out: &mut Vec<u8>, v: u32) {
    out.push(b'0' + (v / 10 % 10) as u8);
    out.push(b'0' + (v % 10) as u8);
}

/// Appends `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn push_ts(out: &mut Vec<u8>, ms: i64) {
    TsCache::default().push(out, ms);
}

/// The `YYYY-MM-DDTHH:MM:SS` part of the last second formatted: the events of a batch
/// mostly share their second, and the calendar arithmetic is then done once per second
/// rather than once per line.
#[derive(Debug, Clone)]
pub struct TsCache {
    sec: i64,
    prefix: [u8; 19],
}

impl Default for TsCache {
    fn default() -> Self {
        Self {
            sec: -1,
            prefix: [0; 19],
        }
    }
}

impl TsCache {
    /// Appends `YYYY-MM-DDTHH:MM:SS.mmmZ`.
    pub fn push(&mut self, out: &mut Vec<u8>, ms: i64) {
        let ms = clamp_ms(ms);
        let sec = ms.div_euclid(1000);
        if sec != self.sec {
            let mut p = Vec::with_capacity(19);
            let (y, mo, d) = civil(day_of(ms));
            let secs = (ms.rem_euclid(86_400_000) / 1000) as u32;
            let y = y as u32;
            push2(&mut p, y / 100);
            push2(&mut p, y % 100);
            p.push(b'-');
            push2(&mut p, mo);
            p.push(b'-');
            push2(&mut p, d);
            p.push(b'T');
            push2(&mut p, secs / 3600);
            p.push(b':');
            push2(&mut p, secs / 60 % 60);
            p.push(b':');
            push2(&mut p, secs % 60);
            self.prefix.copy_from_slice(&p);
            self.sec = sec;
        }
        let milli = ms.rem_euclid(1000) as u32;
        out.extend_from_slice(&self.prefix);
        out.extend_from_slice(&[
            b'.',
            b'0' + (milli / 100) as u8,
            b'0' + (milli / 10 % 10) as u8,
            b'0' + (milli % 10) as u8,
            b'Z',
        ]);
    }
}

pub fn ts_string(ms: i64) -> String {
    let mut v = Vec::with_capacity(24);
    push_ts(&mut v, ms);
    String::from_utf8_lossy(&v).into_owned()
}

/// Parses the timestamp this module writes (and any RFC 3339 time) to ms since the epoch.
pub fn parse_ts(s: &str) -> Option<i64> {
    if let Some(ms) = parse_own_ts(s.as_bytes()) {
        return Some(ms);
    }
    humantime::parse_rfc3339_weak(s)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as i64)
}

fn parse_own_ts(b: &[u8]) -> Option<i64> {
    if b.len() != 24 || b[10] != b'T' || b[23] != b'Z' || b[19] != b'.' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let mut v = 0i64;
        for &c in b.get(r)? {
            if !c.is_ascii_digit() {
                return None;
            }
            v = v * 10 + i64::from(c - b'0');
        }
        Some(v)
    };
    let day = parse_day(std::str::from_utf8(b.get(0..10)?).ok()?)?;
    let (h, mi, s, ms) = (num(11..13)?, num(14..16)?, num(17..19)?, num(20..23)?);
    Some(day * 86_400_000 + ((h * 60 + mi) * 60 + s) * 1000 + ms)
}

/// A host name safe as one path component: `[a-z0-9._-]`, everything else becomes `_`, no
/// leading dot (so never `.`, `..` or a hidden name), never empty, at most 253 bytes.
pub fn sanitize_host(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(MAX_HOST)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let dots = out.bytes().take_while(|&b| b == b'.').count();
    if dots > 0 {
        out.replace_range(0..dots, &"_".repeat(dots));
    }
    if out.is_empty() {
        out.push_str("unknown");
    }
    out
}

/// The app field: printable ASCII without spaces, `-` when empty.
pub fn push_app(out: &mut Vec<u8>, app: &str) {
    let start = out.len();
    for c in app.chars().take(MAX_APP) {
        out.push(if c.is_ascii_graphic() { c as u8 } else { b'_' });
    }
    if out.len() == start {
        out.push(b'-');
    }
}

/// A byte written as `#ooo`: C0 controls but tab, and DEL.
fn is_control(b: u8) -> bool {
    (b < 0x20 && b != b'\t') || b == 0x7f
}

/// Whether `bytes` hold a byte to escape; eight bytes at a time (this scan ran on every
/// stored byte and was the top of the bastion's profile under agent load).
fn has_control(bytes: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let mut a = [0u8; 8];
        a.copy_from_slice(w);
        let x = u64::from_le_bytes(a);
        // Some byte below 0x20, or some byte equal to 0x7f (exact tests for n <= 0x80).
        let below = x.wrapping_sub(ONES * 0x20) & !x & HIGH;
        let y = x ^ (ONES * 0x7f);
        let del = y.wrapping_sub(ONES) & !y & HIGH;
        if (below | del) != 0 && w.iter().any(|&b| is_control(b)) {
            return true;
        }
    }
    words.remainder().iter().any(|&b| is_control(b))
}

/// Appends the message with control characters escaped as `#ooo`; returns whether it was
/// valid UTF-8.
pub fn push_message(out: &mut Vec<u8>, msg: &[u8]) -> bool {
    let (text, valid) = match std::str::from_utf8(msg) {
        Ok(s) => (Cow::Borrowed(s), true),
        Err(_) => (String::from_utf8_lossy(msg), false),
    };
    let bytes = text.as_bytes();
    if !has_control(bytes) {
        out.extend_from_slice(bytes);
        return valid;
    }
    for &b in bytes {
        if is_control(b) {
            out.push(b'#');
            out.push(b'0' + (b >> 6));
            out.push(b'0' + ((b >> 3) & 7));
            out.push(b'0' + (b & 7));
        } else {
            out.push(b);
        }
    }
    valid
}

/// Appends one complete line (with its `\n`); returns whether the message was valid UTF-8.
pub fn push_line(
    out: &mut Vec<u8>,
    ts_ms: i64,
    host: &str,
    app: &str,
    facility: u8,
    severity: u8,
    msg: &[u8],
) -> bool {
    push_line_with(
        out,
        &mut TsCache::default(),
        ts_ms,
        host,
        app,
        facility,
        severity,
        msg,
    )
}

/// `push_line` with a timestamp cache kept across the lines of a batch.
#[allow(clippy::too_many_arguments)]
pub fn push_line_with(
    out: &mut Vec<u8>,
    ts: &mut TsCache,
    ts_ms: i64,
    host: &str,
    app: &str,
    facility: u8,
    severity: u8,
    msg: &[u8],
) -> bool {
    ts.push(out, ts_ms);
    out.push(b' ');
    out.extend_from_slice(host.as_bytes());
    out.push(b' ');
    push_app(out, app);
    out.push(b' ');
    out.extend_from_slice(
        FACILITIES
            .get(usize::from(facility))
            .unwrap_or(&"user")
            .as_bytes(),
    );
    out.push(b'.');
    out.extend_from_slice(
        SEVERITIES
            .get(usize::from(severity))
            .unwrap_or(&"notice")
            .as_bytes(),
    );
    out.push(b' ');
    let valid = push_message(out, msg);
    out.push(b'\n');
    valid
}

/// A stored line split into its fields.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Parsed<'a> {
    pub ts: &'a str,
    pub host: &'a str,
    pub app: &'a str,
    pub facility: &'a str,
    pub severity: &'a str,
    pub message: &'a str,
}

/// Splits a stored line (without its newline).
pub fn parse_line(line: &str) -> Option<Parsed<'_>> {
    let mut it = line.splitn(5, ' ');
    let ts = it.next()?;
    let host = it.next()?;
    let app = it.next()?;
    let prio = it.next()?;
    let message = it.next().unwrap_or("");
    let (facility, severity) = prio.split_once('.')?;
    Some(Parsed {
        ts,
        host,
        app,
        facility,
        severity,
        message,
    })
}

/// Numeric PRI of the names in a stored line.
pub fn pri_of(facility: &str, severity: &str) -> u32 {
    let f = FACILITIES
        .iter()
        .position(|&x| x == facility)
        .unwrap_or(usize::from(DEFAULT_FACILITY));
    let s = SEVERITIES
        .iter()
        .position(|&x| x == severity)
        .unwrap_or(usize::from(DEFAULT_SEVERITY));
    (f * 8 + s) as u32
}

/// Lines for one host and one day, already formatted.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub host: Arc<str>,
    pub day: i64,
    pub data: Vec<u8>,
    pub lines: u32,
}

impl Chunk {
    pub fn rel_path(&self) -> String {
        format!("{}/{}.log", self.host, day_name(self.day))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_round_trip() {
        for day in [-1000i64, 0, 1, 59, 365, 10_957, 20_000, 2_932_896] {
            let (y, m, d) = civil(day);
            assert_eq!(days_from_civil(y, m, d), day);
        }
        assert_eq!(day_name(0), "1970-01-01");
        assert_eq!(day_name(19_782), "2024-02-29");
        assert_eq!(parse_day("2024-02-29"), Some(19_782));
        assert_eq!(parse_day("2024-13-01"), None);
        let ms = 1_709_164_800_123 + 3_723_000;
        let s = ts_string(ms);
        assert_eq!(s, "2024-02-29T01:02:03.123Z");
        assert_eq!(parse_ts(&s), Some(ms));
        assert_eq!(parse_ts("2024-02-29T01:02:03Z"), Some(ms - 123));
    }

    #[test]
    fn cached_timestamps_and_control_scan() {
        let mut c = TsCache::default();
        for ms in [
            0i64,
            999,
            1000,
            1_709_164_800_123,
            1_709_164_800_999,
            1_709_164_801_000,
            1_709_164_799_999,
            -5,
            i64::MAX,
        ] {
            let mut a = Vec::new();
            c.push(&mut a, ms);
            let mut b = Vec::new();
            TsCache::default().push(&mut b, ms);
            assert_eq!(a, b, "{ms}");
            assert_eq!(
                parse_ts(std::str::from_utf8(&a).unwrap()),
                Some(clamp_ms(ms))
            );
        }
        // Every byte value at every position of a word and of the tail.
        for len in [1usize, 7, 8, 9, 16, 23] {
            for pos in 0..len {
                for b in 0..=255u8 {
                    let mut v = vec![b'a'; len];
                    v[pos] = b;
                    assert_eq!(has_control(&v), is_control(b), "{len} {pos} {b}");
                }
            }
        }
        assert!(!has_control(
            b"tab\there and high bytes \xc3\xa9\xff\x80 and ~ plain"
        ));
    }

    #[test]
    fn hosts_never_escape() {
        for bad in [
            "../../etc",
            "..",
            ".",
            "/etc/passwd",
            ".state",
            "a/../../b",
            "",
        ] {
            let h = sanitize_host(bad);
            assert!(!h.contains('/'), "{h}");
            assert!(!h.starts_with('.'), "{h}");
            assert!(!h.is_empty());
            let p = std::path::Path::new("/store").join(&h);
            assert_eq!(p.parent(), Some(std::path::Path::new("/store")), "{h}");
        }
        assert_eq!(sanitize_host("Web-1.Example.org"), "web-1.example.org");
        assert_eq!(sanitize_host("../../etc"), "___.._etc");
    }

    #[test]
    fn one_event_one_line() {
        let mut out = Vec::new();
        let valid = push_line(
            &mut out,
            0,
            "h",
            "my app",
            4,
            6,
            b"first\nsecond\r\x1b[0m\ttab \xff",
        );
        assert!(!valid);
        let s = String::from_utf8(out).unwrap();
        assert_eq!(
            s,
            "1970-01-01T00:00:00.000Z h my_app auth.info first#012second#015#033[0m\ttab \u{fffd}\n"
        );
        let p = parse_line(s.trim_end()).unwrap();
        assert_eq!(p.host, "h");
        assert_eq!(p.severity, "info");
        assert_eq!(pri_of(p.facility, p.severity), 38);
        assert!(p.message.starts_with("first#012"));
        let mut out = Vec::new();
        push_line(&mut out, 0, "h", "", 99, 99, b"");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "1970-01-01T00:00:00.000Z h - user.notice \n"
        );
    }
}
