//! `capsid run --output GUEST_DIR:HOST_DIR`: a tar stream from a hostile
//! guest, unpacked with strict checks into a fresh directory beside
//! HOST_DIR that is renamed to HOST_DIR only when the whole stream was
//! accepted.
//!
//! ```text
//!  guest tar ─▶ each entry: a relative path of plain names (no `..`, not
//!   absolute), a directory, a regular file (no set-id bits) or a relative
//!   symbolic link that stays inside; never a hard link, a device or a fifo
//!   ─▶ written by its parent's descriptor, nothing followed (O_NOFOLLOW,
//!      O_EXCL) ─▶ every link resolved over the links the stream made:
//!      none leads outside ─▶ rename(partial, HOST_DIR)
//! ```
//!
//! A refused entry fails the whole output with its name and why; what was
//! unpacked is removed, and HOST_DIR never appears. Limits bound the
//! bytes and entries, so a guest cannot fill the host's disk.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{Mode, OFlags};

/// How much an output may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of file contents in all.
    pub bytes: u64,
    /// Entries of every kind.
    pub entries: u64,
}

impl Default for Limits {
    /// 1 GiB and 100,000 entries: a build's artefacts, not a disk image.
    fn default() -> Self {
        Self {
            bytes: 1 << 30,
            entries: 100_000,
        }
    }
}

/// Why an output was not unpacked.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// An entry the host does not accept.
    #[error("{entry:?}: refused: {why}")]
    Refused {
        /// Its path as the stream named it.
        entry: String,
        /// Why.
        why: String,
    },
    /// Over a limit.
    #[error("refused: more than {0}")]
    TooBig(String),
    /// Not a tar stream, or one that ended early.
    #[error("not a whole tar stream: {0}")]
    Malformed(String),
    /// The destination cannot take it.
    #[error("{0}")]
    Destination(String),
    /// Writing on the host failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// What was unpacked.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Unpacked {
    /// Regular files.
    pub files: u64,
    /// Directories.
    pub dirs: u64,
    /// Symbolic links.
    pub symlinks: u64,
    /// Bytes of file contents.
    pub bytes: u64,
}

/// Whether `dest` can receive an output: its directory exists, and it
/// does not, or is an empty directory. Checked before the run.
pub fn check_destination(dest: &Path) -> Result<(), OutputError> {
    let parent = parent_of(dest);
    if !parent.is_dir() {
        return Err(OutputError::Destination(format!(
            "{}: the directory {} does not exist",
            dest.display(),
            parent.display()
        )));
    }
    match std::fs::symlink_metadata(dest) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Ok(meta) if meta.is_dir() && is_empty_dir(dest) => Ok(()),
        Ok(_) => Err(OutputError::Destination(format!(
            "{} exists and is not an empty directory: give a new path (the output appears there whole, or not at all)",
            dest.display()
        ))),
        Err(e) => Err(OutputError::Destination(format!("{}: {e}", dest.display()))),
    }
}

fn is_empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_none())
}

fn parent_of(dest: &Path) -> &Path {
    match dest.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// Unpacks the tar stream `from` at `dest` (see the module's doc).
pub fn unpack(from: impl Read, dest: &Path, limits: Limits) -> Result<Unpacked, OutputError> {
    check_destination(dest)?;
    let name = dest
        .file_name()
        .ok_or_else(|| OutputError::Destination(format!("{}: no name", dest.display())))?;
    let mut partial_name = OsString::from(".");
    partial_name.push(name);
    partial_name.push(format!(".capsid-partial-{}", std::process::id()));
    let partial = parent_of(dest).join(partial_name);
    std::fs::create_dir(&partial).map_err(io_error(format!("mkdir {}", partial.display())))?;
    let result = unpack_into(from, &partial, limits).and_then(|unpacked| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755))
            .and_then(|()| std::fs::rename(&partial, dest))
            .map_err(io_error(format!("rename to {}", dest.display())))?;
        Ok(unpacked)
    });
    if result.is_err() {
        // Links are removed, never followed.
        let _ = std::fs::remove_dir_all(&partial);
    }
    result
}

fn io_error(what: String) -> impl FnOnce(io::Error) -> OutputError {
    move |source| OutputError::Io { what, source }
}

/// The plain names of an entry's path; a refusal for `..` or an absolute
/// path.
fn names(path: &Path, entry: &str) -> Result<Vec<OsString>, OutputError> {
    let refused = |why: &str| OutputError::Refused {
        entry: entry.to_owned(),
        why: why.to_owned(),
    };
    let mut out = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(name) => out.push(name.to_owned()),
            Component::CurDir => {}
            Component::ParentDir => return Err(refused("a `..` in its path")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(refused("an absolute path"));
            }
        }
    }
    Ok(out)
}

fn unpack_into(from: impl Read, root: &Path, limits: Limits) -> Result<Unpacked, OutputError> {
    let root = rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| OutputError::Io {
        what: format!("open {}", root.display()),
        source: e.into(),
    })?;
    let mut archive = tar::Archive::new(from);
    let mut unpacked = Unpacked::default();
    let mut entries = 0u64;
    // Every link the stream made: path → target.
    let mut links: HashMap<Vec<OsString>, PathBuf> = HashMap::new();
    let malformed = |e: io::Error| OutputError::Malformed(e.to_string());
    for entry in archive.entries().map_err(malformed)? {
        let mut entry = entry.map_err(malformed)?;
        entries += 1;
        if entries > limits.entries {
            return Err(OutputError::TooBig(format!("{} entries", limits.entries)));
        }
        let path = entry.path().map_err(malformed)?.into_owned();
        let shown = path.display().to_string();
        let refused = |why: String| OutputError::Refused {
            entry: shown.clone(),
            why,
        };
        let names = names(&path, &shown)?;
        let Some((name, parents)) = names.split_last() else {
            // The directory itself (".").
            continue;
        };
        let header = entry.header();
        let kind = header.entry_type();
        let mode = header.mode().map_err(malformed)?;
        if mode & 0o6000 != 0 {
            return Err(refused(format!(
                "set-user-id or set-group-id bits ({mode:o})"
            )));
        }
        let parent = open_parents(&root, parents, &shown)?;
        let exists = |e: rustix::io::Errno| {
            if e == rustix::io::Errno::EXIST {
                refused("given twice, or under a link".into())
            } else {
                OutputError::Io {
                    what: format!("write {shown}"),
                    source: e.into(),
                }
            }
        };
        match kind {
            tar::EntryType::Directory => {
                match rustix::fs::mkdirat(&parent, name.as_os_str(), Mode::from_raw_mode(0o755)) {
                    Ok(()) => unpacked.dirs += 1,
                    // Made before as a parent: fine if it is a directory.
                    Err(rustix::io::Errno::EXIST) => {
                        open_dir(&parent, name).map_err(|_| refused("given twice".into()))?;
                    }
                    Err(e) => return Err(exists(e)),
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.size();
                if unpacked.bytes.saturating_add(size) > limits.bytes {
                    return Err(OutputError::TooBig(format!(
                        "{} bytes (at {shown:?})",
                        limits.bytes
                    )));
                }
                let file = rustix::fs::openat(
                    &parent,
                    name.as_os_str(),
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(mode & 0o777),
                )
                .map_err(exists)?;
                let mut file = std::fs::File::from(file);
                let copied = io::copy(&mut (&mut entry).take(size), &mut file)
                    .map_err(|e| OutputError::Malformed(format!("{shown:?}: {e}")))?;
                if copied != size {
                    return Err(OutputError::Malformed(format!(
                        "{shown:?}: {copied} of {size} bytes"
                    )));
                }
                unpacked.files += 1;
                unpacked.bytes += size;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(malformed)?
                    .ok_or_else(|| refused("a link without a target".into()))?
                    .into_owned();
                check_link(parents, &target).map_err(refused)?;
                rustix::fs::symlinkat(target.as_os_str(), &parent, name.as_os_str())
                    .map_err(exists)?;
                links.insert(names.clone(), target);
                unpacked.symlinks += 1;
            }
            tar::EntryType::Link => {
                return Err(refused(
                    "a hard link (capsid's agent never sends one)".into(),
                ));
            }
            tar::EntryType::Char => return Err(refused("a character device".into())),
            tar::EntryType::Block => return Err(refused("a block device".into())),
            tar::EntryType::Fifo => return Err(refused("a fifo".into())),
            other => return Err(refused(format!("an entry of type {other:?}"))),
        }
    }
    // Each link by itself stays inside; through one another they must too.
    for (at, target) in &links {
        resolve(&links, &at[..at.len() - 1], target, 0).map_err(|why| OutputError::Refused {
            entry: join(at),
            why,
        })?;
    }
    Ok(unpacked)
}

fn join(names: &[OsString]) -> String {
    names
        .iter()
        .map(|n| n.to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

fn open_dir(dir: &OwnedFd, name: &OsStr) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// The directory `parents` under `root`, made where missing, never through
/// a link or a file.
fn open_parents(root: &OwnedFd, parents: &[OsString], shown: &str) -> Result<OwnedFd, OutputError> {
    let mut dir = rustix::io::dup(root).map_err(|e| OutputError::Io {
        what: "dup".into(),
        source: e.into(),
    })?;
    for name in parents {
        let next = match open_dir(&dir, name) {
            Ok(next) => next,
            Err(rustix::io::Errno::NOENT) => {
                rustix::fs::mkdirat(&dir, name.as_os_str(), Mode::from_raw_mode(0o755))
                    .and_then(|()| open_dir(&dir, name))
                    .map_err(|e| OutputError::Io {
                        what: format!("mkdir for {shown}"),
                        source: e.into(),
                    })?
            }
            Err(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR) => {
                return Err(OutputError::Refused {
                    entry: shown.to_owned(),
                    why: format!(
                        "{} is a link or a file, not a directory",
                        name.to_string_lossy()
                    ),
                });
            }
            Err(e) => {
                return Err(OutputError::Io {
                    what: format!("open the directory of {shown}"),
                    source: e.into(),
                });
            }
        };
        dir = next;
    }
    Ok(dir)
}

/// A link at depth `parents.len()` to `target`: relative, and staying
/// inside by its own words.
fn check_link(parents: &[OsString], target: &Path) -> Result<(), String> {
    if target.as_os_str().is_empty() {
        return Err("a link to nothing".into());
    }
    let mut depth = parents.len();
    for component in target.components() {
        match component {
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!(
                    "a link to the absolute path {}, outside",
                    target.display()
                ));
            }
            Component::ParentDir => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| format!("a link to {}, outside the output", target.display()))?;
            }
            Component::CurDir => {}
            Component::Normal(_) => depth += 1,
        }
    }
    Ok(())
}

/// Links followed within links: how deep before it is a loop.
const MAX_HOPS: usize = 40;

/// Resolves `target`, seen from the directory `from`, over the stream's
/// `links`: an error if it ever goes above the output's root.
fn resolve(
    links: &HashMap<Vec<OsString>, PathBuf>,
    from: &[OsString],
    target: &Path,
    hops: usize,
) -> Result<Vec<OsString>, String> {
    if hops > MAX_HOPS {
        return Err("links that loop".into());
    }
    let mut at = from.to_vec();
    for component in target.components() {
        match component {
            Component::Normal(name) => {
                at.push(name.to_owned());
                if let Some(next) = links.get(&at) {
                    at.pop();
                    at = resolve(links, &at, next, hops + 1)?;
                }
            }
            Component::ParentDir => {
                if at.pop().is_none() {
                    return Err(format!(
                        "a link to {} that leads outside the output through other links",
                        target.display()
                    ));
                }
            }
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!("a link to the absolute path {}", target.display()));
            }
        }
    }
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry: path, type, mode, contents or target.
    type Entry<'a> = (&'a str, tar::EntryType, u32, &'a str);

    /// A tar stream of `entries`.
    fn tar_of(entries: &[Entry<'_>]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for &(path, kind, mode, body) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(kind);
            header.set_mode(mode);
            // Raw names: the builder would refuse `..` and absolute paths.
            let name = header.as_old_mut().name.as_mut();
            name[..path.len()].copy_from_slice(path.as_bytes());
            match kind {
                tar::EntryType::Symlink | tar::EntryType::Link => {
                    header.set_link_name(body).unwrap();
                    header.set_size(0);
                    header.set_cksum();
                    builder.append(&header, io::empty()).unwrap();
                }
                _ => {
                    header.set_size(body.len() as u64);
                    header.set_cksum();
                    builder.append(&header, body.as_bytes()).unwrap();
                }
            }
        }
        builder.into_inner().unwrap()
    }

    use tar::EntryType::{Block, Char, Directory, Fifo, Link, Regular, Symlink};

    fn unpack_in(dir: &Path, tar: &[u8]) -> Result<Unpacked, OutputError> {
        unpack(tar, &dir.join("out"), Limits::default())
    }

    /// Everything under `dir`, for checking that nothing was left.
    fn tree(dir: &Path) -> Vec<String> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            found.push(entry.file_name().to_string_lossy().into_owned());
        }
        found.sort();
        found
    }

    #[test]
    fn a_good_output_appears_whole() {
        let dir = tempfile::tempdir().unwrap();
        let tar = tar_of(&[
            ("bin", Directory, 0o755, ""),
            ("bin/tool", Regular, 0o755, "#!/bin/sh\n"),
            ("report.txt", Regular, 0o644, "ok"),
            ("deep/er/file", Regular, 0o600, "x"),
            ("latest", Symlink, 0o777, "bin/tool"),
            ("deep/er/up", Symlink, 0o777, "../../report.txt"),
        ]);
        let unpacked = unpack_in(dir.path(), &tar).unwrap();
        assert_eq!(
            unpacked,
            Unpacked {
                files: 3,
                dirs: 1,
                symlinks: 2,
                bytes: 13
            }
        );
        let out = dir.path().join("out");
        assert_eq!(
            std::fs::read_to_string(out.join("latest")).unwrap(),
            "#!/bin/sh\n"
        );
        assert_eq!(
            std::fs::read_to_string(out.join("deep/er/up")).unwrap(),
            "ok"
        );
        assert_eq!(tree(dir.path()), ["out"], "no partial directory left");
    }

    #[test]
    fn hostile_entries_are_refused_by_name_and_nothing_is_left() {
        let cases: &[(&[Entry<'_>], &str)] = &[
            (&[("../escape", Regular, 0o644, "x")], "`..`"),
            (&[("a/../../escape", Regular, 0o644, "x")], "`..`"),
            (&[("/etc/passwd", Regular, 0o644, "x")], "absolute path"),
            (&[("out", Symlink, 0o777, "/etc/shadow")], "absolute path"),
            (
                &[("a/out", Symlink, 0o777, "../../x")],
                "outside the output",
            ),
            (&[("hard", Link, 0o644, "/etc/passwd")], "hard link"),
            (&[("tty", Char, 0o666, "")], "character device"),
            (&[("sda", Block, 0o660, "")], "block device"),
            (&[("pipe", Fifo, 0o644, "")], "fifo"),
            (&[("su", Regular, 0o4755, "x")], "set-user-id"),
            (
                &[("sg", Regular, 0o2755, "x")],
                "set-user-id or set-group-id",
            ),
            (
                &[("f", Regular, 0o644, "a"), ("f", Regular, 0o644, "b")],
                "given twice",
            ),
            // A link that points inside, then a write through it.
            (
                &[
                    ("d", Directory, 0o755, ""),
                    ("l", Symlink, 0o777, "d"),
                    ("l/f", Regular, 0o644, "x"),
                ],
                "a link or a file",
            ),
            // Each inside by its own words; outside through each other.
            (
                &[("s", Symlink, 0o777, "."), ("t", Symlink, 0o777, "s/../x")],
                "through other links",
            ),
            (
                &[("a", Symlink, 0o777, "b"), ("b", Symlink, 0o777, "a")],
                "loop",
            ),
        ];
        for (entries, want) in cases {
            let dir = tempfile::tempdir().unwrap();
            let e = unpack_in(dir.path(), &tar_of(entries)).unwrap_err();
            assert!(
                matches!(e, OutputError::Refused { .. }) && e.to_string().contains(want),
                "{entries:?}: {e}"
            );
            assert_eq!(tree(dir.path()), Vec::<String>::new(), "{entries:?}");
        }
    }

    #[test]
    fn limits_bound_bytes_and_entries() {
        let dir = tempfile::tempdir().unwrap();
        let tar = tar_of(&[("a", Regular, 0o644, "12345"), ("b", Regular, 0o644, "678")]);
        let small = Limits {
            bytes: 6,
            entries: 10,
        };
        let e = unpack(&tar[..], &dir.path().join("out"), small).unwrap_err();
        assert!(e.to_string().contains("more than 6 bytes"), "{e}");
        let few = Limits {
            bytes: 100,
            entries: 1,
        };
        let e = unpack(&tar[..], &dir.path().join("out"), few).unwrap_err();
        assert!(e.to_string().contains("more than 1 entries"), "{e}");
        assert_eq!(tree(dir.path()), Vec::<String>::new());
        // Cut short: not a whole stream.
        let e = unpack_in(dir.path(), &tar[..700]).unwrap_err();
        assert!(matches!(e, OutputError::Malformed(_)), "{e}");
        assert_eq!(tree(dir.path()), Vec::<String>::new());
    }

    #[test]
    fn the_destination_must_be_new_or_an_empty_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(check_destination(&dir.path().join("new")).is_ok());
        std::fs::create_dir(dir.path().join("empty")).unwrap();
        assert!(check_destination(&dir.path().join("empty")).is_ok());
        let tar = tar_of(&[("f", Regular, 0o644, "x")]);
        unpack(&tar[..], &dir.path().join("empty"), Limits::default()).unwrap();
        let e = check_destination(&dir.path().join("empty")).unwrap_err();
        assert!(e.to_string().contains("not an empty directory"), "{e}");
        let e = check_destination(&dir.path().join("no/such/out")).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
    }
}
