//! What a log source pushed by the bastion may read: the agent's local `[config]
//! allow_log_sources` globs, matched against real paths (symbolic links resolved), when the
//! revision is applied and again for every file the source opens later. The bastion
//! proposes sources; this list decides.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path};

use glob::{MatchOptions, Pattern};

/// `*` and `?` never cross a `/`; `**` (a whole component) spans directories.
const OPTIONS: MatchOptions = MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

/// The local setting a refusal names.
pub const SETTING: &str = "[config] allow_log_sources";

/// Most files a pushed glob may match when it is checked at apply time.
const MAX_MATCHES: usize = 10_000;

/// Compiled `[config] allow_log_sources`.
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    patterns: Vec<Pattern>,
}

impl AllowList {
    /// Compiles the globs; every invalid one is reported (with its index).
    pub fn new(globs: &[String]) -> Result<Self, Vec<String>> {
        let mut patterns = Vec::new();
        let mut problems = Vec::new();
        for (i, g) in globs.iter().enumerate() {
            if !g.starts_with('/') || has_dot_component(g) {
                problems.push(format!(
                    "config.allow_log_sources[{i}]: {g:?} must be absolute, without . or .."
                ));
                continue;
            }
            match Pattern::new(g) {
                Ok(p) => patterns.push(p),
                Err(e) => problems.push(format!(
                    "config.allow_log_sources[{i}]: invalid glob {g:?}: {e}"
                )),
            }
        }
        if problems.is_empty() {
            Ok(Self { patterns })
        } else {
            Err(problems)
        }
    }

    /// Compiles globs already validated by the config loader (an invalid one allows nothing).
    pub fn from_valid(globs: &[String]) -> Self {
        Self {
            patterns: globs.iter().filter_map(|g| Pattern::new(g).ok()).collect(),
        }
    }

    /// Whether the real (canonical) path `real` may be read.
    pub fn allows(&self, real: &Path) -> bool {
        self.patterns
            .iter()
            .any(|p| p.matches_path_with(real, OPTIONS))
    }

    /// Whether the pushed glob, read as a path, lies under the list (a first, lexical check;
    /// every file it matches is checked again by its real path).
    fn allows_pattern(&self, pushed: &str) -> bool {
        self.patterns
            .iter()
            .any(|p| p.matches_with(pushed, OPTIONS))
    }
}

fn has_dot_component(p: &str) -> bool {
    Path::new(p)
        .components()
        .any(|c| matches!(c, Component::CurDir | Component::ParentDir))
        || p.split('/').any(|c| c == "." || c == "..")
}

/// Why the file at `path` (matched by a pushed source) may not be read, if it may not:
/// its real path is outside the list, or it has another name elsewhere (a hard link).
pub fn refuse_file(allow: &AllowList, path: &Path) -> Option<String> {
    let real = match path.canonicalize() {
        Ok(r) => r,
        Err(e) => return Some(format!("{}: cannot resolve: {e}", path.display())),
    };
    let nlink = std::fs::metadata(&real).map(|m| m.nlink()).unwrap_or(1);
    refuse_real(allow, path, &real, nlink)
}

/// [`refuse_file`] for a file already open: its real path is the one the kernel gives for
/// the descriptor, so a symbolic link swapped in after the check changes nothing.
pub fn refuse_open(allow: &AllowList, path: &Path, file: &File) -> Option<String> {
    let real = match std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())) {
        Ok(r) => r,
        Err(e) => {
            return Some(format!(
                "{}: cannot tell where the open file lives: {e}",
                path.display()
            ))
        }
    };
    let meta = match file.metadata() {
        Ok(m) => m,
        Err(e) => return Some(format!("{}: {e}", path.display())),
    };
    if !meta.is_file() {
        return Some(format!("{}: not a regular file", path.display()));
    }
    refuse_real(allow, path, &real, meta.nlink())
}

fn refuse_real(allow: &AllowList, path: &Path, real: &Path, nlink: u64) -> Option<String> {
    if !allow.allows(real) {
        let what = if real == path {
            path.display().to_string()
        } else {
            format!("{} resolves to {},", path.display(), real.display())
        };
        return Some(format!(
            "{what} outside the local {SETTING}: add a glob matching {} there to allow it",
            real.display()
        ));
    }
    // A hard link gives a file outside the list a name inside it (no symbolic link to see).
    if nlink > 1 {
        return Some(format!(
            "{} has {nlink} hard links: a pushed source reads only files with one name",
            path.display()
        ));
    }
    None
}

/// The apply-time check of one pushed source glob: lexically under the list, and every file
/// it matches now allowed by its real path. Err: the reason for the NACK.
pub fn check_pushed(allow: &AllowList, pushed: &str) -> Result<(), String> {
    if !pushed.starts_with('/') || has_dot_component(pushed) {
        return Err(format!(
            "a pushed log source must be an absolute path without . or ..: {pushed:?}"
        ));
    }
    if !allow.allows_pattern(pushed) {
        return Err(format!(
            "outside the local {SETTING} (by default nothing pushed is read): add a glob covering {pushed} there to allow it"
        ));
    }
    let matches =
        glob::glob_with(pushed, OPTIONS).map_err(|e| format!("invalid glob {pushed:?}: {e}"))?;
    for p in matches.flatten().take(MAX_MATCHES) {
        if !std::fs::metadata(&p).is_ok_and(|m| m.is_file()) {
            continue;
        }
        if let Some(why) = refuse_file(allow, &p) {
            return Err(why);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(globs: &[&str]) -> AllowList {
        AllowList::new(&globs.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn globs_do_not_cross_directories_and_star_star_does() {
        let l = list(&["/var/log/app/*.log", "/srv/logs/**/*.log"]);
        assert!(l.allows(Path::new("/var/log/app/a.log")));
        assert!(!l.allows(Path::new("/var/log/app/sub/a.log")));
        assert!(!l.allows(Path::new("/var/log/app/../../../etc/shadow")));
        assert!(l.allows(Path::new("/srv/logs/a/b/c.log")));
        assert!(l.allows(Path::new("/srv/logs/c.log")));
        assert!(!l.allows(Path::new("/etc/shadow")));
        assert!(l.allows_pattern("/var/log/app/*.log"));
        assert!(l.allows_pattern("/var/log/app/web-*.log"));
        assert!(!l.allows_pattern("/var/log/app/**/*.log"));
        assert!(!l.allows_pattern("/var/log/*"));
        assert!(AllowList::new(&["relative/*".into()]).is_err());
        assert!(AllowList::new(&["/var/log/../etc/*".into()]).is_err());
        // Nothing by default.
        assert!(!AllowList::default().allows(Path::new("/var/log/syslog")));
    }

    #[test]
    fn pushed_sources_are_checked_by_their_real_paths() {
        let d = tempfile::tempdir().unwrap();
        let logs = d.path().join("logs");
        let secret = d.path().join("secret");
        std::fs::create_dir_all(&logs).unwrap();
        std::fs::create_dir_all(&secret).unwrap();
        std::fs::write(secret.join("shadow"), "root:x").unwrap();
        std::fs::write(logs.join("a.log"), "ok\n").unwrap();
        let allow = list(&[&format!("{}/*.log", logs.display())]);
        let glob = format!("{}/*.log", logs.display());
        check_pushed(&allow, &glob).unwrap();
        // Not under the list at all.
        let e = check_pushed(&allow, &secret.join("shadow").display().to_string()).unwrap_err();
        assert!(
            e.contains("allow_log_sources") && e.contains("shadow"),
            "{e}"
        );
        // A symbolic link inside the allowed directory, leading out.
        std::os::unix::fs::symlink(secret.join("shadow"), logs.join("b.log")).unwrap();
        let e = check_pushed(&allow, &glob).unwrap_err();
        assert!(e.contains("resolves to") && e.contains("shadow"), "{e}");
        std::fs::remove_file(logs.join("b.log")).unwrap();
        // A hard link.
        std::fs::hard_link(secret.join("shadow"), logs.join("c.log")).unwrap();
        let e = check_pushed(&allow, &glob).unwrap_err();
        assert!(e.contains("hard links"), "{e}");
        std::fs::remove_file(logs.join("c.log")).unwrap();
        // An open file is judged by where it really is.
        let f = File::open(secret.join("shadow")).unwrap();
        assert!(refuse_open(&allow, &logs.join("x.log"), &f).is_some());
        let f = File::open(logs.join("a.log")).unwrap();
        assert!(refuse_open(&allow, &logs.join("a.log"), &f).is_none());
        // Dot components are refused outright.
        assert!(check_pushed(&allow, &format!("{}/../secret/shadow", logs.display())).is_err());
    }
}
