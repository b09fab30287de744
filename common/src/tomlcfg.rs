//! Strict TOML configuration with every problem reported at once. serde stops at the first
//! unknown key or wrong type; this deserializes again and again, each time taking out the
//! offending key, until the file deserializes, so one run names every unknown key (with a
//! "did you mean" for a close one) and every value of the wrong type, each by its full key
//! path (`ssh.admins[1].keyz`), not a line number.

use serde::de::DeserializeOwned;
use serde_path_to_error::Segment;

/// Most problems gathered from one file before giving up (each costs one deserialization).
const MAX_PROBLEMS: usize = 100;

/// Hints for required keys: (key path with `[]` for any index, what to put there).
pub type Hints<'a> = &'a [(&'a str, &'a str)];

/// Parses `text` into `T` (a struct tree with `deny_unknown_fields`), or returns every
/// problem as "key.path: reason".
pub fn parse<T: DeserializeOwned>(text: &str, hints: Hints<'_>) -> Result<T, Vec<String>> {
    let mut value: toml::Value = match toml::from_str::<toml::Table>(text) {
        Ok(t) => toml::Value::Table(t),
        // Not TOML at all: nothing more can be read past the syntax error.
        Err(e) => return Err(vec![e.to_string().trim_end().to_string()]),
    };
    let mut problems: Vec<String> = Vec::new();
    // Keys taken out because they were wrong: their absence is not a further problem.
    let mut removed: Vec<String> = Vec::new();
    loop {
        let err = match serde_path_to_error::deserialize::<_, T>(value.clone()) {
            Ok(v) if problems.is_empty() => return Ok(v),
            Ok(_) => return Err(problems),
            Err(e) => e,
        };
        let mut segments: Vec<String> = err
            .path()
            .iter()
            .map(|s| match s {
                Segment::Map { key } => key.clone(),
                Segment::Seq { index } => format!("[{index}]"),
                Segment::Enum { variant } => variant.clone(),
                Segment::Unknown => "?".into(),
            })
            .collect();
        let message = err.into_inner().to_string();
        let (text, take_out) = if let Some((field, expected)) = unknown_field(&message) {
            // The path usually ends with the unknown key; where it stops at the table
            // holding it, the key is added.
            if segments.last() != Some(&field) {
                segments.push(field.clone());
            }
            let hint = closest(&field, &expected)
                .map(|k| format!(" (did you mean `{k}`?)"))
                .unwrap_or_default();
            let known = if expected.is_empty() || !hint.is_empty() {
                String::new()
            } else {
                format!("; known keys here: {}", expected.join(", "))
            };
            (format!("unknown key{hint}{known}"), true)
        } else if let Some(field) = missing_field(&message) {
            // The table lacks a key it needs: report it (unless it was taken out above as
            // wrong), then take the whole table out to read the rest of the file.
            let table = segments.clone();
            segments.push(field);
            let key = join(&segments);
            if !removed.contains(&key) {
                let hint = hints
                    .iter()
                    .find(|(k, _)| *k == generic(&key))
                    .map(|(_, h)| format!(": {h}"))
                    .unwrap_or_default();
                problems.push(format!("{key}: required key missing{hint}"));
            }
            if table.is_empty() || !remove(&mut value, &table) || problems.len() >= MAX_PROBLEMS {
                return Err(finish(problems));
            }
            removed.push(join(&table));
            continue;
        } else {
            (message, true)
        };
        let key = join(&segments);
        problems.push(format!("{key}: {text}"));
        if problems.len() >= MAX_PROBLEMS {
            return Err(finish(problems));
        }
        if !take_out || !remove(&mut value, &segments) {
            // An error we cannot point at: nothing more to learn safely.
            return Err(finish(problems));
        }
        removed.push(key);
    }
}

fn finish(mut problems: Vec<String>) -> Vec<String> {
    problems.dedup();
    problems
}

fn join(segments: &[String]) -> String {
    let mut out = String::new();
    for s in segments {
        if !out.is_empty() && !s.starts_with('[') {
            out.push('.');
        }
        out.push_str(s);
    }
    out
}

/// `ssh.admins[1].keys` as `ssh.admins[].keys`, to look hints up.
fn generic(key: &str) -> String {
    let mut out = String::new();
    let mut in_index = false;
    for c in key.chars() {
        match c {
            '[' => {
                in_index = true;
                out.push('[');
            }
            ']' => {
                in_index = false;
                out.push(']');
            }
            _ if in_index => {}
            _ => out.push(c),
        }
    }
    out
}

/// serde's "unknown field `x`, expected one of `a`, `b`" (or "expected `a`", or "there are no
/// fields"): the field and the expected ones.
fn unknown_field(message: &str) -> Option<(String, Vec<String>)> {
    let rest = message.strip_prefix("unknown field `")?;
    let (field, rest) = rest.split_once('`')?;
    let expected = rest
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    Some((field.to_string(), expected))
}

/// serde's "missing field `x`".
fn missing_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("missing field `")?;
    Some(rest.split_once('`')?.0.to_string())
}

/// The expected key closest to a misspelt one, if close enough to be a typo, else one that
/// the field extends or shortens by whole `_` words (`allow_networks` -> `allow`,
/// `audit` -> `audit_log`).
fn closest(field: &str, expected: &[String]) -> Option<String> {
    let typo = expected
        .iter()
        .map(|k| (strsim::damerau_levenshtein(field, k), k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4) && *d < k.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k.clone());
    typo.or_else(|| {
        let word_prefix = |long: &str, short: &str| {
            long.strip_prefix(short)
                .is_some_and(|rest| rest.starts_with('_'))
        };
        expected
            .iter()
            .filter(|k| word_prefix(field, k) || word_prefix(k, field))
            .min_by_key(|k| k.len().abs_diff(field.len()))
            .cloned()
    })
}

/// `deserialize_with` for a list that may be written as its single element:
/// `listen = "0.0.0.0:22"` is `listen = ["0.0.0.0:22"]`.
pub fn one_or_many<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    struct V<T>(std::marker::PhantomData<T>);
    impl<'de, T: serde::Deserialize<'de>> serde::de::Visitor<'de> for V<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a string or a list of strings")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Vec<T>, E> {
            T::deserialize(serde::de::value::StrDeserializer::<E>::new(v)).map(|t| vec![t])
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
            while let Some(t) = seq.next_element()? {
                out.push(t);
            }
            Ok(out)
        }
    }
    d.deserialize_any(V(std::marker::PhantomData))
}

/// Takes out the value at `segments`; false when the path does not lead to a value.
fn remove(value: &mut toml::Value, segments: &[String]) -> bool {
    let Some((last, parents)) = segments.split_last() else {
        return false;
    };
    let mut cur = value;
    for s in parents {
        cur = match (s.strip_prefix('[').and_then(|i| i.strip_suffix(']')), cur) {
            (Some(i), toml::Value::Array(a)) => {
                match i.parse::<usize>().ok().and_then(|i| a.get_mut(i)) {
                    Some(v) => v,
                    None => return false,
                }
            }
            (None, toml::Value::Table(t)) => match t.get_mut(s) {
                Some(v) => v,
                None => return false,
            },
            _ => return false,
        };
    }
    match (
        last.strip_prefix('[').and_then(|i| i.strip_suffix(']')),
        cur,
    ) {
        (Some(i), toml::Value::Array(a)) => match i.parse::<usize>() {
            Ok(i) if i < a.len() => {
                a.remove(i);
                true
            }
            _ => false,
        },
        (None, toml::Value::Table(t)) => t.remove(last).is_some(),
        _ => false,
    }
}

/// [`one_or_many`] for an optional list (`#[serde(default, deserialize_with = ...)]`).
pub fn some_one_or_many<'de, D, T>(d: D) -> Result<Option<Vec<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    one_or_many(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Root {
        project: String,
        #[serde(default)]
        port: u16,
        #[serde(default)]
        ssh: Option<Ssh>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Ssh {
        audit_log: String,
        #[serde(default)]
        admins: Vec<Admin>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Admin {
        name: String,
        #[serde(default)]
        keys: Vec<String>,
    }

    #[test]
    fn every_unknown_key_and_wrong_type_at_once_with_paths() {
        let text = r#"
project = "p"
port = "twenty-two"
prot = 1
[ssh]
audit_log = "/x"
[[ssh.admins]]
name = "a"
[[ssh.admins]]
name = "b"
keyz = ["k"]
"#;
        let errs = parse::<Root>(text, &[]).unwrap_err();
        assert_eq!(errs.len(), 3, "{errs:#?}");
        assert!(
            errs.iter().any(|e| e.starts_with("port: invalid type")),
            "{errs:#?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.starts_with("prot: unknown key (did you mean `port`?)")),
            "{errs:#?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.starts_with("ssh.admins[1].keyz: unknown key (did you mean `keys`?)")),
            "{errs:#?}"
        );
    }

    #[test]
    fn a_missing_required_key_says_what_to_put_there() {
        let errs = parse::<Root>(
            "project = \"p\"\n[ssh]\n",
            &[(
                "ssh.audit_log",
                "the file where every jump is recorded, e.g. \"/var/log/bastide/ssh-audit.jsonl\"",
            )],
        )
        .unwrap_err();
        assert_eq!(
            errs,
            vec!["ssh.audit_log: required key missing: the file where every jump is recorded, e.g. \"/var/log/bastide/ssh-audit.jsonl\"".to_string()]
        );
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Listener {
        #[serde(deserialize_with = "one_or_many")]
        listen: Vec<std::net::SocketAddr>,
        #[serde(default)]
        #[allow(dead_code)]
        allow: Vec<String>,
    }

    #[test]
    fn one_or_many_takes_a_string_or_a_list() {
        let one = parse::<Listener>("listen = \"127.0.0.1:22\"\n", &[]).unwrap();
        assert_eq!(one.listen, vec!["127.0.0.1:22".parse().unwrap()]);
        let two = parse::<Listener>("listen = [\"127.0.0.1:22\", \"[::1]:2222\"]\n", &[]).unwrap();
        assert_eq!(
            two.listen,
            vec![
                "127.0.0.1:22".parse::<std::net::SocketAddr>().unwrap(),
                "[::1]:2222".parse().unwrap()
            ]
        );
        let none = parse::<Listener>("listen = []\n", &[]).unwrap();
        assert!(none.listen.is_empty());
        let errs = parse::<Listener>("listen = \"nope\"\n", &[]).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert!(
            errs[0].starts_with("listen: invalid socket address"),
            "{errs:#?}"
        );
        let errs = parse::<Listener>("listen = [\"127.0.0.1:1\", \"nope\"]\n", &[]).unwrap_err();
        assert!(
            errs[0].starts_with("listen[1]: invalid socket address"),
            "{errs:#?}"
        );
        let errs = parse::<Listener>("listen = 22\n", &[]).unwrap_err();
        assert!(
            errs[0].starts_with("listen: invalid type: integer `22`, expected a string or a list"),
            "{errs:#?}"
        );
    }

    #[test]
    fn a_renamed_key_gets_a_did_you_mean_by_whole_words() {
        let errs =
            parse::<Listener>("listen = \"127.0.0.1:1\"\nallow_networks = []\n", &[]).unwrap_err();
        assert_eq!(
            errs,
            vec!["allow_networks: unknown key (did you mean `allow`?)".to_string()]
        );
        let errs = parse::<Listener>("listen_addr = \"127.0.0.1:1\"\n", &[]).unwrap_err();
        assert!(
            errs[0].starts_with("listen_addr: unknown key (did you mean `listen`?)"),
            "{errs:#?}"
        );
    }

    #[test]
    fn a_good_file_parses_and_a_syntax_error_is_one_problem() {
        let r = parse::<Root>("project = \"p\"\nport = 2\n", &[]).unwrap();
        assert_eq!(r.port, 2);
        let errs = parse::<Root>("project = \n", &[]).unwrap_err();
        assert_eq!(errs.len(), 1);
    }
}
