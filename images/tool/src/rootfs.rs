//! A container rootfs directory as a block image for virtio-blk: erofs
//! (read-only, compact, fast to make; Debian's erofs-utils) or ext4 (`mkfs.ext4
//! -d`, when erofs-utils is missing or a writable disk is wanted).
//!
//! Images are cached under `<cache>/rootfs/<key>.<fs>`, where the key hashes
//! every entry's path, type, mode, owner, symlink target and contents (not
//! times, so a copy of the same tree hits the cache). Reading every file on
//! every run is what made a cached image slow to find, so
//! `<cache>/rootfs/index/` maps a tree's metadata (inodes, sizes, times) to
//! its key, and the contents are read only when that changed. The image is written
//! beside its final name and renamed into place, so a failed or interrupted
//! build leaves nothing that looks finished.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

/// Why a rootfs image could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// The rootfs given is not a directory.
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    /// Something under it could not be read.
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] io::Error),
    /// The cache could not be written.
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] io::Error),
    /// The image tool ran past its deadline and was killed.
    #[error(
        "{tool} ran for more than {}s and was stopped: is the directory on a \
         slow or hung file system? (the limit is {}s)",
        .after.as_secs(),
        .after.as_secs()
    )]
    TimedOut {
        /// The tool.
        tool: &'static str,
        /// Its deadline.
        after: std::time::Duration,
    },
    /// The host's file system has no room for a disk.
    #[error(
        "no room for a {} MiB disk in {} ({} MiB free there): free space, \
         ask for a smaller disk, or set disk_dir to a larger file system",
        .bytes >> 20,
        .dir.display(),
        .free >> 20
    )]
    NoRoom {
        /// Where the disk was to be.
        dir: PathBuf,
        /// Its size.
        bytes: u64,
        /// What is free there.
        free: u64,
    },
    /// The image tool is not installed.
    #[error("{tool} not found: install Debian's {package}")]
    Missing {
        /// The tool.
        tool: &'static str,
        /// The Debian package that has it.
        package: &'static str,
    },
    /// The image tool failed.
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        /// The tool.
        tool: &'static str,
        /// The Debian package that has it.
        package: &'static str,
        /// How it exited.
        status: String,
        /// What it said.
        stderr: String,
    },
}

/// An image's file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Read-only, compressed (mkfs.erofs).
    Erofs,
    /// Writable (mkfs.ext4).
    Ext4,
}

impl Format {
    /// Its name for mount(2) and the file name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Erofs => "erofs",
            Self::Ext4 => "ext4",
        }
    }
}

/// A built (or cached) image.
#[derive(Debug, Clone)]
pub struct RootfsImage {
    /// The image file, in the cache.
    pub path: PathBuf,
    /// Its file system.
    pub format: Format,
    /// The content key of the tree it was made from (its cache name).
    pub key: String,
    /// False when it came from the cache.
    pub built: bool,
}

/// The content key of a tree: stable across copies and times.
pub fn content_key(dir: &Path) -> Result<String, RootfsError> {
    let mut hasher = Sha256::new();
    hash_tree(dir, Path::new(""), &mut hasher)?;
    let digest = hasher.finalize();
    Ok(digest.iter().take(12).map(|b| format!("{b:02x}")).collect())
}

/// How long ago every entry of a tree must have changed for its metadata
/// to be trusted to name its content: a write within the file system's
/// timestamp granularity of the index being made could go unseen (git's
/// "racy" entries).
const SETTLED: Duration = Duration::from_secs(2);

/// A tree's content key, and what to record in the index once an image of
/// it is in the cache.
struct IndexedKey {
    key: String,
    /// The tree's metadata hash, when it was not indexed and is settled.
    unrecorded: Option<String>,
}

/// [`content_key`], taken from the index in `index` when every entry's
/// metadata (inode, type, mode, owner, size, times) is what it was when the
/// key was last computed: a change to a file moves its ctime, which nobody
/// can set back. The contents are read otherwise.
fn indexed_key(dir: &Path, index: &Path, settled: SystemTime) -> Result<IndexedKey, RootfsError> {
    let mut hasher = Sha256::new();
    let meta = fs::symlink_metadata(dir).map_err(|e| RootfsError::Read(dir.to_owned(), e))?;
    hash_stat(&meta, &mut hasher);
    let mut newest = ctime(&meta);
    stat_tree(dir, Path::new(""), &mut hasher, &mut newest)?;
    let state: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut key = String::new();
    if File::open(index.join(&state))
        .and_then(|file| file.take(64).read_to_string(&mut key))
        .is_ok()
        && key.len() == 24
        && key.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Ok(IndexedKey {
            key,
            unrecorded: None,
        });
    }
    Ok(IndexedKey {
        key: content_key(dir)?,
        unrecorded: (newest < settled).then_some(state),
    })
}

impl IndexedKey {
    /// Records the key in `index`, if it should be. Best effort: a failure
    /// costs the next run a read of the tree.
    fn record(&self, index: &Path) {
        let Some(state) = &self.unrecorded else {
            return;
        };
        let partial = index.join(format!(".{state}.{}", std::process::id()));
        let written = crate::private_dir(index)
            .and_then(|()| fs::write(&partial, &self.key))
            .and_then(|()| fs::rename(&partial, index.join(state)));
        if written.is_err() {
            let _ = fs::remove_file(&partial);
        }
    }
}

fn ctime(meta: &fs::Metadata) -> SystemTime {
    let since_epoch = Duration::new(
        u64::try_from(meta.ctime()).unwrap_or(0),
        u32::try_from(meta.ctime_nsec()).unwrap_or(0),
    );
    // A time past what SystemTime holds is as recent as can be: never settled.
    SystemTime::UNIX_EPOCH
        .checked_add(since_epoch)
        .unwrap_or_else(SystemTime::now)
}

fn hash_stat(meta: &fs::Metadata, hasher: &mut Sha256) {
    for field in [
        meta.dev(),
        meta.ino(),
        u64::from(meta.mode()),
        u64::from(meta.uid()),
        u64::from(meta.gid()),
        meta.size(),
        meta.rdev(),
        meta.mtime().cast_unsigned(),
        meta.mtime_nsec().cast_unsigned(),
        meta.ctime().cast_unsigned(),
        meta.ctime_nsec().cast_unsigned(),
    ] {
        hasher.update(field.to_le_bytes());
    }
}

/// Hashes the metadata of every entry under `root/rel`; `newest` becomes
/// the latest ctime seen.
fn stat_tree(
    root: &Path,
    rel: &Path,
    hasher: &mut Sha256,
    newest: &mut SystemTime,
) -> Result<(), RootfsError> {
    walk_hashing(root, rel, hasher, &mut |hasher, _, meta| {
        hash_stat(meta, hasher);
        *newest = (*newest).max(ctime(meta));
        Ok(())
    })
}

/// Hashes every entry under `root/rel`: its mode and owner, and a file's
/// bytes, a link's target, a device's number.
fn hash_tree(root: &Path, rel: &Path, hasher: &mut Sha256) -> Result<(), RootfsError> {
    walk_hashing(root, rel, hasher, &mut |hasher, path, meta| {
        let kind = meta.file_type();
        hasher.update(meta.mode().to_le_bytes());
        hasher.update(meta.uid().to_le_bytes());
        hasher.update(meta.gid().to_le_bytes());
        if kind.is_symlink() {
            let target = fs::read_link(path).map_err(|e| RootfsError::Read(path.to_owned(), e))?;
            hasher.update(target.as_os_str().as_encoded_bytes());
        } else if kind.is_file() {
            hasher.update(meta.len().to_le_bytes());
            let mut file = File::open(path).map_err(|e| RootfsError::Read(path.to_owned(), e))?;
            let mut buffer = vec![0; 256 * 1024];
            loop {
                let n = file
                    .read(&mut buffer)
                    .map_err(|e| RootfsError::Read(path.to_owned(), e))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buffer[..n]);
            }
        } else if kind.is_block_device() || kind.is_char_device() {
            hasher.update(meta.rdev().to_le_bytes());
        }
        Ok(())
    })
}

/// What [`walk_hashing`] adds to the hash for one entry (its path on the
/// host and its metadata, not followed through a link).
type EntryHash<'a> = dyn FnMut(&mut Sha256, &Path, &fs::Metadata) -> Result<(), RootfsError> + 'a;

/// Walks the tree under `root/rel` in name order, feeding `hasher` each
/// entry's path relative to `root` and a NUL, what `entry` adds for it, a
/// directory's own entries, and a 0xff.
fn walk_hashing(
    root: &Path,
    rel: &Path,
    hasher: &mut Sha256,
    entry: &mut EntryHash<'_>,
) -> Result<(), RootfsError> {
    let dir = root.join(rel);
    let read = |e| RootfsError::Read(dir.clone(), e);
    let mut entries: Vec<_> = fs::read_dir(&dir)
        .map_err(read)?
        .collect::<Result<_, _>>()
        .map_err(read)?;
    entries.sort_by_key(|e| e.file_name());
    for found in entries {
        let path = found.path();
        let rel = rel.join(found.file_name());
        let meta = fs::symlink_metadata(&path).map_err(|e| RootfsError::Read(path.clone(), e))?;
        hasher.update(rel.as_os_str().as_encoded_bytes());
        hasher.update([0]);
        entry(hasher, &path, &meta)?;
        if meta.is_dir() {
            walk_hashing(root, &rel, hasher, entry)?;
        }
        hasher.update([0xff]);
    }
    Ok(())
}

fn tool_available(tool: &str) -> bool {
    Command::new(tool)
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success() || !o.stderr.is_empty())
}

/// The image of `dir` in `format` (None: erofs if mkfs.erofs is there, else
/// ext4), built once per content. A cached image is found without running
/// any tool (None: an erofs one first).
pub fn image(dir: &Path, format: Option<Format>, cache: &Path) -> Result<RootfsImage, RootfsError> {
    if !dir.is_dir() {
        return Err(RootfsError::NotADirectory(dir.to_owned()));
    }
    let cache = cache.join("rootfs");
    let index = cache.join("index");
    let indexed = indexed_key(dir, &index, SystemTime::now() - SETTLED)?;
    let key = indexed.key.clone();
    let cached = |format: Format| {
        let path = cache.join(format!("{key}.{}", format.name()));
        path.is_file().then(|| RootfsImage {
            path,
            format,
            key: key.clone(),
            built: false,
        })
    };
    let format = match format {
        Some(format) => format,
        None if cached(Format::Erofs).is_some() => Format::Erofs,
        None if tool_available("mkfs.erofs") => Format::Erofs,
        None => Format::Ext4,
    };
    if let Some(image) = cached(format) {
        indexed.record(&index);
        return Ok(image);
    }
    let path = cache.join(format!("{key}.{}", format.name()));
    crate::private_dir(&cache).map_err(|e| RootfsError::Write(cache.clone(), e))?;
    let partial = cache.join(format!(".{key}.{}.{}", format.name(), std::process::id()));
    let _ = fs::remove_file(&partial);
    let built = match format {
        Format::Erofs => make_erofs(dir, &partial),
        Format::Ext4 => make_ext4(dir, &partial),
    }
    .and_then(|()| pad_to_sectors(&partial));
    if let Err(e) = built {
        let _ = fs::remove_file(&partial);
        return Err(e);
    }
    fs::rename(&partial, &path).map_err(|e| RootfsError::Write(path.clone(), e))?;
    indexed.record(&index);
    Ok(RootfsImage {
        path,
        format,
        key,
        built: true,
    })
}

/// How long making one image may take: a 1 GiB tree takes well under a
/// minute; a tool that runs longer is stuck on its input.
const TOOL_BOUND: std::time::Duration = std::time::Duration::from_secs(600);

fn run(
    tool: &'static str,
    package: &'static str,
    command: &mut Command,
) -> Result<(), RootfsError> {
    run_within(tool, package, command, TOOL_BOUND)
}

/// Runs `command` to its end, or kills it after `bound`.
fn run_within(
    tool: &'static str,
    package: &'static str,
    command: &mut Command,
    bound: std::time::Duration,
) -> Result<(), RootfsError> {
    let started = std::time::Instant::now();
    let mut child = command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => RootfsError::Missing { tool, package },
            _ => RootfsError::Tool {
                tool,
                package,
                status: "not started".into(),
                stderr: e.to_string(),
            },
        })?;
    let mut stderr = child.stderr.take();
    // At most 64 KiB of what it says; the rest is read and dropped.
    let reader = std::thread::spawn(move || {
        let mut kept = Vec::new();
        if let Some(stderr) = stderr.as_mut() {
            let _ = stderr.take(64 << 10).read_to_end(&mut kept);
            let _ = io::copy(stderr, &mut io::sink());
        }
        kept
    });
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() < bound => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Ok(None) | Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(RootfsError::TimedOut { tool, after: bound });
            }
        }
    };
    let stderr = reader.join().unwrap_or_default();
    if status.success() {
        return Ok(());
    }
    Err(RootfsError::Tool {
        tool,
        package,
        status: status.to_string(),
        stderr: String::from_utf8_lossy(&stderr).trim().to_owned(),
    })
}

fn make_erofs(dir: &Path, out: &Path) -> Result<(), RootfsError> {
    run(
        "mkfs.erofs",
        "erofs-utils",
        Command::new("mkfs.erofs")
            .args([
                "--quiet",
                "-T0",
                "-U",
                "00000000-0000-0000-0000-000000000000",
            ])
            .arg(out)
            .arg(dir),
    )
}

/// Size of the tree plus room for metadata and some writes.
fn ext4_size_mib(dir: &Path) -> u64 {
    fn walk(dir: &Path) -> u64 {
        fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| match e.metadata() {
                Ok(m) if m.is_dir() => 4096 + walk(&e.path()),
                Ok(m) => m.len() + 4096,
                Err(_) => 0,
            })
            .sum()
    }
    ((walk(dir) * 3 / 2) >> 20) + 16
}

fn make_ext4(dir: &Path, out: &Path) -> Result<(), RootfsError> {
    run(
        "mkfs.ext4",
        "e2fsprogs",
        Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-O",
                "^has_journal",
                "-U",
                "clear",
                "-E",
                "hash_seed=00000000-0000-0000-0000-000000000000",
            ])
            .env("E2FSPROGS_FAKE_TIME", "0")
            .arg("-d")
            .arg(dir)
            .arg(out)
            .arg(format!("{}M", ext4_size_mib(dir))),
    )
}

/// A sparse file of `bytes` (rounded up to whole MiB) at `out` holding an
/// empty ext4 file system: a container's writable layer (`capsid run
/// --disk`), which the guest fills and the host never mounts. Sparse, and
/// without a journal: it lives as long as one run.
pub fn scratch_disk(out: &Path, bytes: u64) -> Result<(), RootfsError> {
    let mib = bytes.div_ceil(1 << 20).max(8);
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .map_err(|e| RootfsError::Write(out.to_owned(), e))?;
    file.set_len(mib << 20)
        .map_err(|e| RootfsError::Write(out.to_owned(), e))?;
    drop(file);
    make_scratch_fs(out)
}

/// An empty ext4 without a journal on the file or device at `path`.
fn make_scratch_fs(path: &Path) -> Result<(), RootfsError> {
    run(
        "mkfs.ext4",
        "e2fsprogs",
        Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-O",
                "^has_journal",
                "-E",
                "lazy_itable_init=1,nodiscard",
                "-m",
                "0",
            ])
            .arg(path),
    )
}

/// A writable disk of `bytes` with no name on the host: a file made in
/// `dir` (a directory on a disk-backed file system, made 0700 if need
/// be) and unlinked at once, so it lives exactly as long as a descriptor
/// of it — the VMM's — also after a `kill -9` of everyone. Its blocks are
/// allocated up front where the file system can (fallocate), so the guest
/// filling it meets ENOSPC in its own file system and never fills the
/// host's; a disk the host has no room for is refused, naming what is
/// free. `bytes` is rounded up to whole 512-byte sectors.
pub fn anonymous_disk(dir: &Path, bytes: u64) -> Result<File, RootfsError> {
    let bytes = bytes.div_ceil(512).max(1) * 512;
    crate::private_dir(dir).map_err(|e| RootfsError::Write(dir.to_owned(), e))?;
    let mut random = [0u8; 8];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut random))
        .map_err(|e| RootfsError::Read("/dev/urandom".into(), e))?;
    let name = dir.join(format!(".disk-{}", hex(&random)));
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&name)
        .map_err(|e| RootfsError::Write(name.clone(), e))?;
    fs::remove_file(&name).map_err(|e| RootfsError::Write(name.clone(), e))?;
    match rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, bytes) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::NOSPC | rustix::io::Errno::FBIG) => Err(RootfsError::NoRoom {
            dir: dir.to_owned(),
            bytes,
            free: rustix::fs::fstatvfs(&file)
                .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
                .unwrap_or(0),
        }),
        // A file system that cannot allocate ahead (ramfs): sparse.
        Err(rustix::io::Errno::OPNOTSUPP) => {
            file.set_len(bytes)
                .map_err(|e| RootfsError::Write(dir.to_owned(), e))?;
            Ok(file)
        }
        Err(e) => Err(RootfsError::Write(dir.to_owned(), e.into())),
    }
}

/// [`scratch_disk`] as an [`anonymous_disk`] in `dir`: a container's
/// writable layer for one run.
pub fn anonymous_scratch_disk(dir: &Path, bytes: u64) -> Result<File, RootfsError> {
    let mib = bytes.div_ceil(1 << 20).max(8);
    let file = anonymous_disk(dir, mib << 20)?;
    make_scratch_fs(&fd_path(&file))?;
    Ok(file)
}

/// An [`anonymous_disk`] in `dir` holding a copy of the image at `image`
/// (a writable copy the guest may change; the image stays as it was).
pub fn anonymous_copy(dir: &Path, image: &Path) -> Result<File, RootfsError> {
    let mut source = File::open(image).map_err(|e| RootfsError::Read(image.to_owned(), e))?;
    let len = source
        .metadata()
        .map_err(|e| RootfsError::Read(image.to_owned(), e))?
        .len();
    let mut file = anonymous_disk(dir, len)?;
    io::copy(&mut source, &mut file).map_err(|e| RootfsError::Write(dir.to_owned(), e))?;
    Ok(file)
}

/// A path that opens `file` again, for a child process (a tool) of ours.
fn fd_path(file: &File) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        file.as_raw_fd()
    ))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// virtio-blk disks are whole 512-byte sectors.
fn pad_to_sectors(path: &Path) -> Result<(), RootfsError> {
    let file = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| RootfsError::Write(path.to_owned(), e))?;
    let len = file
        .metadata()
        .map_err(|e| RootfsError::Write(path.to_owned(), e))?
        .len();
    file.set_len(len.div_ceil(512) * 512)
        .map_err(|e| RootfsError::Write(path.to_owned(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_anonymous_disk_leaves_no_name_holds_its_blocks_and_is_refused_without_room() {
        let dir = tempfile::tempdir().unwrap();
        let disks = dir.path().join("disks");
        let disk = anonymous_disk(&disks, 1000).unwrap();
        let meta = disk.metadata().unwrap();
        assert_eq!(meta.len(), 1024, "whole sectors");
        assert_eq!(meta.nlink(), 0, "unlinked");
        assert_eq!(fs::read_dir(&disks).unwrap().count(), 0);
        assert_eq!(
            fs::metadata(&disks).unwrap().mode() & 0o777,
            0o700,
            "private"
        );
        // More than any disk has: refused, naming the directory.
        let e = anonymous_disk(&disks, 1 << 60).unwrap_err();
        let text = e.to_string();
        assert!(
            matches!(e, RootfsError::NoRoom { .. })
                && text.contains("disks")
                && text.contains("free"),
            "{text}"
        );
        assert_eq!(fs::read_dir(&disks).unwrap().count(), 0);
    }

    #[test]
    fn an_anonymous_scratch_disk_is_ext4_and_a_copy_is_byte_for_byte() {
        if !tool_available("mkfs.ext4") {
            eprintln!("skipped: no mkfs.ext4");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut disk = anonymous_scratch_disk(dir.path(), 10 << 20).unwrap();
        assert_eq!(disk.metadata().unwrap().len(), 10 << 20);
        let mut superblock = [0u8; 2048];
        io::Read::read_exact(&mut disk, &mut superblock).unwrap();
        assert_eq!(&superblock[1024 + 0x38..1024 + 0x3a], &[0x53, 0xef]);
        let image = dir.path().join("image");
        let bytes: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
        fs::write(&image, &bytes).unwrap();
        let copy = anonymous_copy(&dir.path().join("d"), &image).unwrap();
        use std::os::unix::fs::FileExt;
        let mut back = vec![0u8; 4096];
        copy.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, bytes);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2, "image and d");
    }

    #[test]
    fn a_scratch_disk_is_sparse_ext4_of_whole_mib() {
        if !tool_available("mkfs.ext4") {
            eprintln!("skipped: no mkfs.ext4");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("scratch.ext4");
        scratch_disk(&disk, 1 << 30).unwrap();
        let meta = fs::metadata(&disk).unwrap();
        assert_eq!(meta.len(), 1 << 30);
        use std::os::unix::fs::MetadataExt;
        assert!(
            meta.blocks() * 512 < 64 << 20,
            "not sparse: {} blocks",
            meta.blocks()
        );
        let mut superblock = [0u8; 2048];
        io::Read::read_exact(&mut fs::File::open(&disk).unwrap(), &mut superblock).unwrap();
        assert_eq!(
            &superblock[1024 + 0x38..1024 + 0x3a],
            &[0x53, 0xef],
            "ext4 magic"
        );
        assert!(
            scratch_disk(&disk, 1 << 20).is_err(),
            "an existing file is not replaced"
        );
    }

    #[test]
    fn a_tool_that_hangs_is_stopped_at_the_bound_with_a_clear_error() {
        let started = std::time::Instant::now();
        let err = run_within(
            "mkfs.erofs",
            "erofs-utils",
            Command::new("sleep").arg("30"),
            std::time::Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        assert!(matches!(err, RootfsError::TimedOut { .. }), "{err}");
        assert!(err.to_string().contains("was stopped"), "{err}");
    }

    #[test]
    fn a_tool_that_fails_is_quoted() {
        let err = run_within(
            "mkfs.erofs",
            "erofs-utils",
            Command::new("sh").args(["-c", "echo no space left >&2; exit 3"]),
            std::time::Duration::from_secs(30),
        )
        .unwrap_err();
        assert!(err.to_string().contains("no space left"), "{err}");
        assert!(!err.to_string().contains("install"), "{err}");
        let err = run_within(
            "mkfs.erofs",
            "erofs-utils",
            &mut Command::new("/nonexistent/mkfs.erofs"),
            std::time::Duration::from_secs(30),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "mkfs.erofs not found: install Debian's erofs-utils"
        );
    }

    fn tree(root: &Path) {
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::write(root.join("bin/tool"), b"#!/bin/sh\necho hi\n").unwrap();
        std::os::unix::fs::symlink("tool", root.join("bin/link")).unwrap();
    }

    #[test]
    fn the_key_follows_content_not_times() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        tree(a.path());
        tree(b.path());
        assert_eq!(
            content_key(a.path()).unwrap(),
            content_key(b.path()).unwrap()
        );
        fs::write(b.path().join("bin/tool"), b"#!/bin/sh\necho ho\n").unwrap();
        assert_ne!(
            content_key(a.path()).unwrap(),
            content_key(b.path()).unwrap()
        );
    }

    #[test]
    fn the_index_gives_the_key_until_anything_in_the_tree_changes() {
        let dir = tempfile::tempdir().unwrap();
        let index = tempfile::tempdir().unwrap();
        let index = index.path().join("index");
        tree(dir.path());
        let later = SystemTime::now() + Duration::from_secs(3600);
        let key = content_key(dir.path()).unwrap();
        let indexed = |settled| {
            let indexed = indexed_key(dir.path(), &index, settled).unwrap();
            indexed.record(&index);
            indexed.key
        };
        // A tree changed just now is not indexed: a write could go unseen.
        assert_eq!(indexed(SystemTime::now() - SETTLED), key);
        assert!(!index.exists());
        // Settled: indexed, and the index is what answers.
        assert_eq!(indexed(later), key);
        let entries: Vec<_> = fs::read_dir(&index).unwrap().flatten().collect();
        assert_eq!(entries.len(), 1);
        fs::write(entries[0].path(), "0123456789abcdef01234567").unwrap();
        assert_eq!(indexed(later), "0123456789abcdef01234567");
        // A change of content moves the metadata (its ctime, past the
        // coarse clock's tick): the contents are read.
        std::thread::sleep(Duration::from_millis(50));
        fs::write(dir.path().join("bin/tool"), b"#!/bin/sh\necho ho\n").unwrap();
        let changed = content_key(dir.path()).unwrap();
        assert_ne!(changed, key);
        assert_eq!(indexed(later), changed);
        // So does a new entry, and a damaged index entry is not believed.
        fs::write(dir.path().join("bin/new"), b"x").unwrap();
        assert_eq!(indexed(later), content_key(dir.path()).unwrap());
        for entry in fs::read_dir(&index).unwrap().flatten() {
            fs::write(entry.path(), "not a key").unwrap();
        }
        assert_eq!(indexed(later), content_key(dir.path()).unwrap());
    }

    #[test]
    fn an_image_is_built_once_and_reused() {
        let src = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        tree(src.path());
        for format in [Format::Erofs, Format::Ext4] {
            let tool = match format {
                Format::Erofs => "mkfs.erofs",
                Format::Ext4 => "mkfs.ext4",
            };
            if !tool_available(tool) {
                eprintln!("SKIPPED {tool}: not installed");
                continue;
            }
            let first = image(src.path(), Some(format), cache.path()).unwrap();
            assert!(first.built);
            assert_eq!(fs::metadata(&first.path).unwrap().len() % 512, 0);
            let again = image(src.path(), Some(format), cache.path()).unwrap();
            assert!(!again.built);
            assert_eq!(first.path, again.path);
        }
        // Nothing half-made is left beside the images.
        let leftovers: Vec<_> = fs::read_dir(cache.path().join("rootfs"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn a_missing_directory_is_named() {
        let cache = tempfile::tempdir().unwrap();
        let err = image(Path::new("/no/such/dir"), None, cache.path()).unwrap_err();
        assert!(err.to_string().contains("/no/such/dir"), "{err}");
    }
}
