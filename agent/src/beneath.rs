//! File operations beneath a directory opened once (an allowed directory of `[config]
//! allow_dirs`), that no symbolic link or swapped directory can redirect: every step is an
//! `openat`-style call on the descriptor of the directory above it, one path component at a
//! time, refusing symbolic links (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`
//! where the kernel has it, `O_NOFOLLOW` always); owner and mode are set on open
//! descriptors, never by path.
//!
//! What this cannot stop: a local user who may write in a directory below the allowed one
//! can rename a subdirectory we already hold open to elsewhere on the same filesystem; a
//! later write then lands in that directory, which that user can write to anyway (never a
//! directory the user could not write).

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use nix::errno::Errno;
use nix::fcntl::{openat, openat2, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstatat, mkdirat, Mode, SFlag};
use nix::unistd::{fsync, unlinkat, UnlinkatFlags};

/// A directory opened once; everything below is reached from its descriptor.
#[derive(Debug)]
pub struct Root {
    fd: OwnedFd,
    path: PathBuf,
}

/// A directory reached below a [`Root`] (its descriptor and, for messages, its path).
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    pub path: PathBuf,
}

/// An existing regular file, read through a descriptor that followed no link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Existing {
    pub content: Vec<u8>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Opens `name` (one component) in `dir` without following a symbolic link.
fn open_in(dir: &OwnedFd, name: &OsStr, flags: OFlag, mode: Mode) -> nix::Result<OwnedFd> {
    let flags = flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut how = OpenHow::new().flags(flags).resolve(
        ResolveFlag::RESOLVE_BENEATH
            | ResolveFlag::RESOLVE_NO_SYMLINKS
            | ResolveFlag::RESOLVE_NO_MAGICLINKS,
    );
    if flags.contains(OFlag::O_CREAT) {
        how = how.mode(mode);
    }
    match openat2(dir, name, how) {
        // No openat2 (kernel before 5.6, or a seccomp filter): one component with
        // O_NOFOLLOW is just as safe, openat2 is the belt to its braces.
        Err(Errno::ENOSYS) | Err(Errno::EPERM) => openat(dir, name, flags, mode),
        r => r,
    }
}

/// A clear reason for a failed step at `path`.
fn step_error(dir: &OwnedFd, name: &OsStr, path: &Path, e: Errno) -> anyhow::Error {
    let is_link = || {
        fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)
            .map(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK)
            .unwrap_or(false)
    };
    match e {
        Errno::ELOOP | Errno::EXDEV => {
            anyhow!("{} is a symbolic link: refused", path.display())
        }
        Errno::ENOTDIR if is_link() => {
            anyhow!("{} is a symbolic link: refused", path.display())
        }
        Errno::ENOTDIR => anyhow!("{} is not a directory", path.display()),
        e => anyhow!("{}: {}", path.display(), e.desc()),
    }
}

impl Root {
    /// Opens the allowed directory `path` (a local setting: its own path is trusted).
    pub fn open(path: &Path) -> Result<Self> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| anyhow!("allowed directory {}: {}", path.display(), e.desc()))?;
        Ok(Self {
            fd,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory `comps` below the root, walked one component at a time. Missing ones
    /// are created (0755, owner `uid`/`gid` set on the new directory's descriptor, each made
    /// durable in its parent) when `create`, and pushed on `created` (as components below
    /// the root); else a missing one is an error of kind `NotFound`.
    pub fn walk(
        &self,
        comps: &[OsString],
        create: bool,
        uid: Option<u32>,
        gid: Option<u32>,
        created: &mut Vec<Vec<OsString>>,
    ) -> Result<Dir> {
        let mut cur = self.fd.try_clone().context("duplicating a descriptor")?;
        let mut path = self.path.clone();
        for (i, name) in comps.iter().enumerate() {
            path.push(name);
            let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY;
            let next = match open_in(&cur, name, flags, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) if create => {
                    match mkdirat(&cur, name.as_os_str(), Mode::from_bits_truncate(0o755)) {
                        Ok(()) => {}
                        // Appeared meanwhile: opened below like any other (never followed).
                        Err(Errno::EEXIST) => {}
                        Err(e) => {
                            return Err(anyhow!(
                                "creating directory {}: {}",
                                path.display(),
                                e.desc()
                            ))
                        }
                    }
                    let fd = open_in(&cur, name, flags, Mode::empty())
                        .map_err(|e| step_error(&cur, name, &path, e))?;
                    let f = File::from(fd);
                    // Exactly 0755 whatever the umask, owner on the descriptor.
                    f.set_permissions(std::fs::Permissions::from_mode(0o755))?;
                    if uid.is_some() || gid.is_some() {
                        std::os::unix::fs::fchown(&f, uid, gid)
                            .with_context(|| format!("setting the owner of {}", path.display()))?;
                    }
                    fsync(&cur).with_context(|| format!("syncing {}", path.display()))?;
                    created.push(comps[..=i].to_vec());
                    OwnedFd::from(f)
                }
                Err(Errno::ENOENT) => {
                    return Err(anyhow::Error::new(std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("{} does not exist", path.display()),
                    )))
                }
                Err(e) => return Err(step_error(&cur, name, &path, e)),
            };
            cur = next;
        }
        Ok(Dir { fd: cur, path })
    }

    /// How many of `comps` are missing (a walk that creates nothing); symbolic links and
    /// non-directories on the way are errors.
    pub fn missing(&self, comps: &[OsString]) -> Result<usize> {
        let mut cur = self.fd.try_clone().context("duplicating a descriptor")?;
        let mut path = self.path.clone();
        for (i, name) in comps.iter().enumerate() {
            path.push(name);
            match open_in(
                &cur,
                name,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY,
                Mode::empty(),
            ) {
                Ok(fd) => cur = fd,
                Err(Errno::ENOENT) => return Ok(comps.len() - i),
                Err(e) => return Err(step_error(&cur, name, &path, e)),
            }
        }
        Ok(0)
    }

    /// Removes the directories of `created` (innermost last in the list) if empty,
    /// innermost first, each through its parent's descriptor.
    pub fn remove_dirs(&self, created: &[Vec<OsString>]) {
        for comps in created.iter().rev() {
            let Some((name, parent)) = comps.split_last() else {
                continue;
            };
            let Ok(dir) = self.walk(parent, false, None, None, &mut Vec::new()) else {
                continue;
            };
            if unlinkat(&dir.fd, name.as_os_str(), UnlinkatFlags::RemoveDir).is_ok() {
                let _ = fsync(&dir.fd);
            }
        }
    }
}

impl Dir {
    fn child(&self, name: &OsStr) -> PathBuf {
        self.path.join(name)
    }

    /// The regular file `name` of this directory, if it exists, read up to `max` bytes
    /// (a larger one is an error). A symbolic link or anything but a regular file is an
    /// error; a FIFO cannot block the open.
    pub fn read_existing(&self, name: &OsStr, max: u64) -> Result<Option<Existing>> {
        let path = self.child(name);
        let fd = match open_in(
            &self.fd,
            name,
            OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(None),
            Err(e) => return Err(step_error(&self.fd, name, &path, e)),
        };
        let mut f = File::from(fd);
        let m = f.metadata()?;
        if !m.is_file() {
            return Err(anyhow!(
                "{} exists and is not a regular file",
                path.display()
            ));
        }
        if m.len() > max {
            return Err(anyhow!(
                "{}: the existing file is larger than {max} bytes: not managed",
                path.display()
            ));
        }
        let mut content = Vec::with_capacity(m.len() as usize);
        (&mut f).take(max + 1).read_to_end(&mut content)?;
        if content.len() as u64 > max {
            return Err(anyhow!(
                "{}: the existing file grew past {max} bytes: not managed",
                path.display()
            ));
        }
        Ok(Some(Existing {
            content,
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
        }))
    }

    /// Sets the mode and owner of the existing regular file `name`, on its descriptor.
    pub fn set_attrs(
        &self,
        name: &OsStr,
        mode: u32,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Result<()> {
        let path = self.child(name);
        let fd = open_in(
            &self.fd,
            name,
            OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY,
            Mode::empty(),
        )
        .map_err(|e| step_error(&self.fd, name, &path, e))?;
        let f = File::from(fd);
        if !f.metadata()?.is_file() {
            return Err(anyhow!("{} is not a regular file", path.display()));
        }
        if uid.is_some() || gid.is_some() {
            std::os::unix::fs::fchown(&f, uid, gid)
                .with_context(|| format!("setting the owner of {}", path.display()))?;
        }
        // After the owner: a change of owner clears setuid and setgid bits.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        Ok(())
    }

    /// Atomic write of `name`: a temporary file created here (`O_CREAT | O_EXCL |
    /// O_NOFOLLOW`), content, owner and mode on its descriptor, fsync, rename within this
    /// directory, fsync of the directory.
    pub fn write_file(
        &self,
        name: &OsStr,
        data: &[u8],
        mode: u32,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Result<()> {
        let mut tmp = OsString::from(".");
        tmp.push(name);
        tmp.push(format!(".bastide-{}", std::process::id()));
        let tmp_path = self.child(&tmp);
        // A stale temporary file (crash): unlinkat removes a planted link itself, never
        // its target.
        let _ = unlinkat(&self.fd, tmp.as_os_str(), UnlinkatFlags::NoRemoveDir);
        let result = (|| -> Result<()> {
            let fd = open_in(
                &self.fd,
                &tmp,
                OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
                Mode::from_bits_truncate(0o600),
            )
            .map_err(|e| anyhow!("creating {}: {}", tmp_path.display(), e.desc()))?;
            let mut f = File::from(fd);
            f.write_all(data)?;
            if uid.is_some() || gid.is_some() {
                std::os::unix::fs::fchown(&f, uid, gid).context("setting owner")?;
            }
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
            f.sync_all()?;
            Ok(())
        })();
        if let Err(e) = result {
            let _ = unlinkat(&self.fd, tmp.as_os_str(), UnlinkatFlags::NoRemoveDir);
            return Err(e);
        }
        if let Err(e) = nix::fcntl::renameat(&self.fd, tmp.as_os_str(), &self.fd, name) {
            let _ = unlinkat(&self.fd, tmp.as_os_str(), UnlinkatFlags::NoRemoveDir);
            return Err(anyhow!(
                "renaming to {}: {}",
                self.child(name).display(),
                e.desc()
            ));
        }
        fsync(&self.fd).with_context(|| format!("syncing {}", self.path.display()))
    }

    /// Removes the file `name` (a link itself, never its target) and syncs the directory.
    pub fn remove_file(&self, name: &OsStr) -> Result<()> {
        unlinkat(&self.fd, name, UnlinkatFlags::NoRemoveDir)
            .map_err(|e| anyhow!("removing {}: {}", self.child(name).display(), e.desc()))?;
        fsync(&self.fd).with_context(|| format!("syncing {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comps(s: &str) -> Vec<OsString> {
        s.split('/').map(OsString::from).collect()
    }

    #[test]
    fn a_symlink_in_the_middle_or_at_the_end_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let root_path = d.path().join("etc");
        let outside = d.path().join("outside");
        std::fs::create_dir_all(root_path.join("app")).unwrap();
        std::fs::create_dir_all(outside.join("sub")).unwrap();
        std::os::unix::fs::symlink(&outside, root_path.join("app/link")).unwrap();
        std::fs::write(outside.join("secret"), "s").unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), root_path.join("app/final")).unwrap();
        let root = Root::open(&root_path).unwrap();
        // In the middle: walking, creating below it, counting what is missing.
        for create in [false, true] {
            let e = root
                .walk(&comps("app/link/sub"), create, None, None, &mut Vec::new())
                .unwrap_err();
            assert!(format!("{e:#}").contains("symbolic link"), "{e:#}");
        }
        assert!(root.missing(&comps("app/link/new")).is_err());
        // At the end: neither read nor have its mode changed; a write replaces the link
        // itself, never its target.
        let app = root
            .walk(&comps("app"), false, None, None, &mut Vec::new())
            .unwrap();
        let e = app.read_existing(OsStr::new("final"), 1 << 20).unwrap_err();
        assert!(format!("{e:#}").contains("symbolic link"), "{e:#}");
        assert!(app
            .set_attrs(OsStr::new("final"), 0o777, None, None)
            .is_err());
        app.write_file(OsStr::new("final"), b"new", 0o640, None, None)
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(outside.join("secret")).unwrap(),
            "s"
        );
        assert!(std::fs::symlink_metadata(root_path.join("app/final"))
            .unwrap()
            .is_file());
        // A planted temporary name is removed, not followed.
        let tmp = format!(".x.bastide-{}", std::process::id());
        std::os::unix::fs::symlink(outside.join("planted"), root_path.join("app").join(&tmp))
            .unwrap();
        app.write_file(OsStr::new("x"), b"x", 0o600, None, None)
            .unwrap();
        assert!(!outside.join("planted").exists());
        assert_eq!(std::fs::read_dir(outside.join("sub")).unwrap().count(), 0);
    }

    #[test]
    fn missing_directories_are_created_and_removed_through_descriptors() {
        let d = tempfile::tempdir().unwrap();
        let root = Root::open(d.path()).unwrap();
        assert_eq!(root.missing(&comps("a/b/c")).unwrap(), 3);
        let mut created = Vec::new();
        let dir = root
            .walk(&comps("a/b/c"), true, None, None, &mut created)
            .unwrap();
        assert_eq!(created.len(), 3);
        assert_eq!(dir.path, d.path().join("a/b/c"));
        dir.write_file(OsStr::new("f"), b"x", 0o640, None, None)
            .unwrap();
        let m = std::fs::metadata(d.path().join("a/b")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o755);
        dir.remove_file(OsStr::new("f")).unwrap();
        root.remove_dirs(&created);
        assert!(!d.path().join("a").exists());
        // A regular file in the way.
        std::fs::write(d.path().join("plain"), "x").unwrap();
        let e = root
            .walk(&comps("plain/x"), true, None, None, &mut Vec::new())
            .unwrap_err();
        assert!(format!("{e:#}").contains("not a directory"), "{e:#}");
    }
}
