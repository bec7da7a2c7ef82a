//! A directory of a container's root file system as a tar stream, for
//! `capsid run --output GUEST_DIR:HOST_DIR` (the host unpacks it with
//! strict checks: `capsid_images::output`).
//!
//! ```text
//!  Hello::Archive{container, path} ─▶ openat2(rootfs, path, RESOLVE_IN_ROOT)
//!   ─▶ Response::Ok ─▶ tar: each entry by its directory's fd, nothing
//!      followed (O_NOFOLLOW, AT_SYMLINK_NOFOLLOW) ─▶ EOF
//! ```
//!
//! The directory is the container's: its processes may have put symbolic
//! links anywhere in it. The start is resolved inside the container's root
//! and every entry below is opened relative to its parent's descriptor
//! without following a link, so nothing outside the container is read.
//! Entries are sent as they are (devices, fifos and set-id bits too); the
//! host decides what it accepts. Sockets, which tar cannot hold, are left
//! out.

use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};

/// Directories deeper than this are not descended into.
const MAX_DEPTH: usize = 256;

/// Why an archive could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The path is not an absolute path of plain components.
    #[error("{0:?}: not an absolute path in the container")]
    BadPath(String),
    /// No such directory in the container.
    #[error("no directory {0} in the container")]
    NotFound(String),
    /// Opening it failed otherwise.
    #[error("open {path} in the container: {source}")]
    Open {
        /// The path asked for.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// The directory `path` of the container whose root is `rootfs`, opened
/// without leaving that root.
pub fn open_in_root(rootfs: &Path, path: &str) -> Result<OwnedFd, ArchiveError> {
    if !path.starts_with('/') || path.contains('\0') || path.len() > 4096 {
        return Err(ArchiveError::BadPath(path.to_owned()));
    }
    let open_error = |source: rustix::io::Errno| ArchiveError::Open {
        path: path.to_owned(),
        source: source.into(),
    };
    let root = rustix::fs::open(
        rootfs,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(open_error)?;
    let relative = match path.trim_start_matches('/') {
        "" => ".",
        rest => rest,
    };
    rustix::fs::openat2(
        &root,
        relative,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|e| match e {
        rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR => {
            ArchiveError::NotFound(path.to_owned())
        }
        e => open_error(e),
    })
}

/// What was sent.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// Entries of every kind.
    pub entries: u64,
    /// Bytes of file contents.
    pub bytes: u64,
}

/// Writes the tree under `dir` to `out` as a tar stream (paths relative
/// to `dir`), then its end.
pub fn write_tar(dir: OwnedFd, out: impl Write) -> io::Result<Sent> {
    let mut builder = tar::Builder::new(io::BufWriter::with_capacity(64 * 1024, out));
    builder.mode(tar::HeaderMode::Complete);
    let mut sent = Sent::default();
    walk(&mut builder, &dir, &mut PathBuf::new(), 0, &mut sent)?;
    builder.into_inner()?.flush()?;
    Ok(sent)
}

fn walk<W: Write>(
    builder: &mut tar::Builder<W>,
    dir: &OwnedFd,
    prefix: &mut PathBuf,
    depth: usize,
    sent: &mut Sent,
) -> io::Result<()> {
    let mut names: Vec<std::ffi::CString> = rustix::fs::Dir::read_from(dir)?
        .filter_map(|entry| entry.ok().map(|e| e.file_name().to_owned()))
        .filter(|name| name.as_bytes() != b"." && name.as_bytes() != b"..")
        .collect();
    names.sort();
    for name in names {
        let stat = match rustix::fs::statat(dir, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            // Gone meanwhile.
            Err(rustix::io::Errno::NOENT) => continue,
            Err(e) => return Err(e.into()),
        };
        prefix.push(OsStr::from_bytes(name.as_bytes()));
        let result = entry(builder, dir, &name, &stat, prefix, depth, sent);
        prefix.pop();
        result?;
    }
    Ok(())
}

fn header(stat: &rustix::fs::Stat, kind: tar::EntryType) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(stat.st_mode & 0o7777);
    header.set_uid(u64::from(stat.st_uid));
    header.set_gid(u64::from(stat.st_gid));
    header.set_mtime(u64::try_from(stat.st_mtime).unwrap_or(0));
    header.set_size(0);
    header
}

#[allow(clippy::too_many_arguments)]
fn entry<W: Write>(
    builder: &mut tar::Builder<W>,
    dir: &OwnedFd,
    name: &std::ffi::CStr,
    stat: &rustix::fs::Stat,
    path: &mut PathBuf,
    depth: usize,
    sent: &mut Sent,
) -> io::Result<()> {
    let kind = FileType::from_raw_mode(stat.st_mode);
    let empty: &[u8] = &[];
    match kind {
        FileType::Directory => {
            let mut header = header(stat, tar::EntryType::Directory);
            builder.append_data(&mut header, &*path, empty)?;
            sent.entries += 1;
            if depth < MAX_DEPTH {
                let sub = rustix::fs::openat(
                    dir,
                    name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )?;
                walk(builder, &sub, path, depth + 1, sent)?;
            }
        }
        FileType::RegularFile => {
            let file = rustix::fs::openat(
                dir,
                name,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NOCTTY | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            let size = u64::try_from(stat.st_size).unwrap_or(0);
            let mut header = header(stat, tar::EntryType::Regular);
            header.set_size(size);
            // Exactly `size` bytes, zeros after a file that shrank.
            let data = std::fs::File::from(file)
                .take(size)
                .chain(io::repeat(0))
                .take(size);
            builder.append_data(&mut header, &*path, data)?;
            sent.entries += 1;
            sent.bytes += size;
        }
        FileType::Symlink => {
            let target = rustix::fs::readlinkat(dir, name, Vec::new())?;
            let target = OsStr::from_bytes(target.as_bytes());
            let mut header = header(stat, tar::EntryType::Symlink);
            builder.append_link(&mut header, &*path, target)?;
            sent.entries += 1;
        }
        FileType::CharacterDevice | FileType::BlockDevice | FileType::Fifo => {
            let kind = match kind {
                FileType::CharacterDevice => tar::EntryType::Char,
                FileType::BlockDevice => tar::EntryType::Block,
                _ => tar::EntryType::Fifo,
            };
            let mut header = header(stat, kind);
            let device = stat.st_rdev;
            header.set_device_major(rustix::fs::major(device))?;
            header.set_device_minor(rustix::fs::minor(device))?;
            builder.append_data(&mut header, &*path, empty)?;
            sent.entries += 1;
        }
        // A socket (or anything else tar cannot hold).
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(tar: &[u8]) -> Vec<(String, tar::EntryType, String)> {
        let mut archive = tar::Archive::new(tar);
        archive
            .entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let path = e.path().unwrap().display().to_string();
                let kind = e.header().entry_type();
                let mut body = String::new();
                match e.link_name().unwrap() {
                    Some(target) => body = format!("-> {}", target.display()),
                    None => {
                        e.read_to_string(&mut body).unwrap();
                    }
                }
                (path, kind, body)
            })
            .collect()
    }

    #[test]
    fn a_tree_is_sent_as_it_is_and_links_are_not_followed() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("work/out");
        std::fs::create_dir_all(out.join("sub")).unwrap();
        std::fs::write(out.join("a.txt"), "alpha").unwrap();
        std::fs::write(out.join("sub/b.txt"), "beta").unwrap();
        std::fs::write(root.path().join("secret"), "agent's").unwrap();
        // A link out of the container and one out of the directory: sent
        // as links, never read through.
        std::os::unix::fs::symlink("/etc/hostname", out.join("host")).unwrap();
        std::os::unix::fs::symlink("../../secret", out.join("up")).unwrap();
        let dir = open_in_root(root.path(), "/work/out").unwrap();
        let mut tar = Vec::new();
        let sent = write_tar(dir, &mut tar).unwrap();
        assert_eq!(
            sent,
            Sent {
                entries: 5,
                bytes: 9
            }
        );
        let entries = listing(&tar);
        assert_eq!(
            entries,
            [
                ("a.txt".into(), tar::EntryType::Regular, "alpha".into()),
                (
                    "host".into(),
                    tar::EntryType::Symlink,
                    "-> /etc/hostname".into()
                ),
                ("sub".into(), tar::EntryType::Directory, String::new()),
                ("sub/b.txt".into(), tar::EntryType::Regular, "beta".into()),
                (
                    "up".into(),
                    tar::EntryType::Symlink,
                    "-> ../../secret".into()
                ),
            ]
        );
    }

    #[test]
    fn the_start_is_resolved_inside_the_containers_root() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("private"), "x").unwrap();
        // The container points its output at the agent's own files.
        std::os::unix::fs::symlink(outside.path(), root.path().join("out")).unwrap();
        assert!(matches!(
            open_in_root(root.path(), "/out"),
            Err(ArchiveError::NotFound(_))
        ));
        std::os::unix::fs::symlink("/../../..", root.path().join("up")).unwrap();
        let dir = open_in_root(root.path(), "/up").unwrap();
        let mut tar = Vec::new();
        write_tar(dir, &mut tar).unwrap();
        let names: Vec<String> = listing(&tar).into_iter().map(|(p, ..)| p).collect();
        assert_eq!(names, ["out", "up"], "`..` stops at the container's root");
        for bad in ["relative", "/a\0b", ""] {
            assert!(matches!(
                open_in_root(root.path(), bad),
                Err(ArchiveError::BadPath(_))
            ));
        }
    }
}
