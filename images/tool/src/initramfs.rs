//! Writes initramfs archives (uncompressed `newc` cpio, what the kernel
//! unpacks fastest) straight from host files, without a staging copy.
//!
//! [`Initramfs::add_program`] also adds the shared libraries a dynamically
//! linked program needs (as `ldd` resolves them), at the same paths, so host
//! binaries such as QEMU or a cargo test binary run unchanged inside.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Why an archive could not be written.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// The archive could not be written.
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] io::Error),
    /// A file to put in it could not be read.
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] io::Error),
    /// A file above newc's 4 GiB entry size.
    #[error("{0} is larger than a newc archive entry can hold")]
    TooLarge(PathBuf),
    /// `ldd` could not list a program's libraries.
    #[error("cannot resolve the shared libraries of {0}: {1}")]
    Libraries(PathBuf, String),
}

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// An archive being written.
#[derive(Debug)]
pub struct Initramfs {
    out: BufWriter<File>,
    path: PathBuf,
    next_ino: u32,
    entries: BTreeSet<String>,
}

impl Initramfs {
    /// Starts an archive at `path` (truncated).
    pub fn create(path: &Path) -> Result<Self, InitramfsError> {
        let file = File::create(path).map_err(|e| InitramfsError::Write(path.to_owned(), e))?;
        Ok(Self {
            out: BufWriter::new(file),
            path: path.to_owned(),
            next_ino: 1,
            entries: BTreeSet::new(),
        })
    }

    /// Adds a directory and its missing parents.
    pub fn dir(&mut self, dest: &str) -> Result<(), InitramfsError> {
        let name = entry_name(dest);
        if name.is_empty() || self.entries.contains(&name) {
            return Ok(());
        }
        if let Some((parent, _)) = name.rsplit_once('/') {
            self.dir(parent)?;
        }
        self.entry(&name, S_IFDIR | 0o755, (0, 0), &[])
    }

    /// Adds a file with the given contents.
    pub fn bytes(&mut self, dest: &str, contents: &[u8], mode: u32) -> Result<(), InitramfsError> {
        let name = self.parent_dirs(dest)?;
        self.entry(&name, S_IFREG | mode, (0, 0), contents)
    }

    /// Adds a host file (symlinks followed) at `dest`.
    pub fn file(&mut self, dest: &str, src: &Path) -> Result<(), InitramfsError> {
        let read_err = |e| InitramfsError::Read(src.to_owned(), e);
        let meta = fs::metadata(src).map_err(read_err)?;
        let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777;
        let contents = fs::read(src).map_err(read_err)?;
        let name = self.parent_dirs(dest)?;
        if self.entries.contains(&name) {
            return Ok(());
        }
        self.entry(&name, S_IFREG | mode, (0, 0), &contents)
    }

    /// Adds a host directory tree at the same path. A relative symlink that
    /// stays inside the tree stays a symlink (a busybox rootfs is hundreds
    /// of links to one binary); any other symlink is followed.
    pub fn tree(&mut self, src: &Path) -> Result<(), InitramfsError> {
        self.tree_within(src, src)
    }

    fn tree_within(&mut self, src: &Path, top: &Path) -> Result<(), InitramfsError> {
        let entries = fs::read_dir(src).map_err(|e| InitramfsError::Read(src.to_owned(), e))?;
        self.dir(&src.to_string_lossy())?;
        for entry in entries {
            let path = entry
                .map_err(|e| InitramfsError::Read(src.to_owned(), e))?
                .path();
            if let Ok(target) = fs::read_link(&path) {
                let inside = target.is_relative()
                    && path
                        .parent()
                        .map(|p| p.join(&target))
                        .and_then(|t| t.canonicalize().ok())
                        .zip(top.canonicalize().ok())
                        .is_some_and(|(t, top)| t.starts_with(top));
                if inside {
                    self.symlink(&path.to_string_lossy(), &target.to_string_lossy())?;
                    continue;
                }
            }
            if path.is_dir() {
                self.tree_within(&path, top)?;
            } else if path.exists() {
                self.file(&path.to_string_lossy(), &path)?;
            }
        }
        Ok(())
    }

    /// Adds a program at its own path, with every shared library it loads.
    pub fn add_program(&mut self, program: &Path) -> Result<(), InitramfsError> {
        self.add_program_as(&program.to_string_lossy(), program)
    }

    /// Adds a program at `dest`, with every shared library it loads at the
    /// library's own path.
    pub fn add_program_as(&mut self, dest: &str, program: &Path) -> Result<(), InitramfsError> {
        self.file(dest, program)?;
        for library in shared_libraries(program)? {
            self.file(&library.to_string_lossy(), &library)?;
        }
        Ok(())
    }

    /// Adds a host path: a program with its libraries, a plain file, or a tree.
    pub fn add_path(&mut self, path: &Path) -> Result<(), InitramfsError> {
        if path.is_dir() {
            self.tree(path)
        } else if is_elf(path)? {
            self.add_program(path)
        } else {
            self.file(&path.to_string_lossy(), path)
        }
    }

    /// Adds a symlink `dest` → `target` (and its parent directories).
    pub fn symlink(&mut self, dest: &str, target: &str) -> Result<(), InitramfsError> {
        let name = self.parent_dirs(dest)?;
        self.entry(&name, S_IFLNK | 0o777, (0, 0), target.as_bytes())
    }

    /// Adds a character device node `dest` (and its parent directories).
    pub fn char_device(
        &mut self,
        dest: &str,
        major: u32,
        minor: u32,
        mode: u32,
    ) -> Result<(), InitramfsError> {
        let name = self.parent_dirs(dest)?;
        self.entry(&name, S_IFCHR | mode, (major, minor), &[])
    }

    /// Writes the trailer and flushes the archive; returns its size in bytes.
    pub fn finish(self) -> Result<u64, InitramfsError> {
        let path = self.path;
        let werr = |e| InitramfsError::Write(path.clone(), e);
        let out = cpio::newc::trailer(self.out).map_err(werr)?;
        let file = out.into_inner().map_err(|e| werr(e.into_error()))?;
        file.sync_all().map_err(werr)?;
        Ok(file.metadata().map_err(werr)?.len())
    }

    fn parent_dirs(&mut self, dest: &str) -> Result<String, InitramfsError> {
        let name = entry_name(dest);
        if let Some((parent, _)) = name.rsplit_once('/') {
            self.dir(parent)?;
        }
        Ok(name)
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        rdev: (u32, u32),
        contents: &[u8],
    ) -> Result<(), InitramfsError> {
        let size =
            u32::try_from(contents.len()).map_err(|_| InitramfsError::TooLarge(name.into()))?;
        let builder = cpio::newc::Builder::new(name)
            .ino(self.next_ino)
            .mode(mode)
            .nlink(if mode & S_IFDIR != 0 { 2 } else { 1 })
            .rdev_major(rdev.0)
            .rdev_minor(rdev.1);
        self.next_ino += 1;
        let werr = |e| InitramfsError::Write(self.path.clone(), e);
        let mut writer = builder.write(&mut self.out, size);
        writer.write_all(contents).map_err(werr)?;
        writer.finish().map_err(werr)?;
        self.entries.insert(name.to_owned());
        Ok(())
    }
}

/// Archive entry names are relative: `/usr/bin/x` becomes `usr/bin/x`.
fn entry_name(dest: &str) -> String {
    dest.trim_matches('/').to_owned()
}

fn is_elf(path: &Path) -> Result<bool, InitramfsError> {
    let mut magic = [0u8; 4];
    let mut file = File::open(path).map_err(|e| InitramfsError::Read(path.to_owned(), e))?;
    Ok(file.read_exact(&mut magic).is_ok() && magic == *b"\x7fELF")
}

/// The shared libraries (and the dynamic loader) `program` needs, by absolute
/// path, as the host's dynamic loader resolves them. Empty for static programs.
pub fn shared_libraries(program: &Path) -> Result<Vec<PathBuf>, InitramfsError> {
    let output = Command::new("ldd")
        .arg(program)
        .output()
        .map_err(|e| InitramfsError::Libraries(program.to_owned(), e.to_string()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        // ldd says "not a dynamic executable" for static binaries.
        let stderr = String::from_utf8_lossy(&output.stderr);
        if stdout.contains("not a dynamic executable") || stderr.contains("not a dynamic") {
            return Ok(Vec::new());
        }
        return Err(InitramfsError::Libraries(
            program.to_owned(),
            stderr.trim().to_owned(),
        ));
    }
    parse_ldd(&stdout).map_err(|line| {
        InitramfsError::Libraries(program.to_owned(), format!("unresolved: {line}"))
    })
}

/// Extracts absolute library paths from `ldd` output; a `not found` line is an error.
fn parse_ldd(output: &str) -> Result<Vec<PathBuf>, String> {
    let mut libraries = Vec::new();
    for line in output.lines().map(str::trim) {
        if line.contains("not found") {
            return Err(line.to_owned());
        }
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; "linux-vdso.so.1 (0x...)" has no file.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.trim(),
            None => line,
        };
        let path = path.split(" (").next().unwrap_or("").trim();
        if path.starts_with('/') {
            libraries.push(PathBuf::from(path));
        }
    }
    Ok(libraries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_library_paths() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(out).unwrap(),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
    }

    #[test]
    fn missing_library_is_an_error() {
        assert!(parse_ldd("\tlibfoo.so => not found\n").is_err());
    }

    #[test]
    fn archive_round_trips_through_cpio_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.cpio");
        let mut archive = Initramfs::create(&path).unwrap();
        archive.bytes("/sbin/init", b"#!/bin/sh\n", 0o755).unwrap();
        archive.char_device("/dev/console", 5, 1, 0o600).unwrap();
        archive.symlink("/bin/sh", "busybox").unwrap();
        archive.finish().unwrap();

        let mut reader_input = File::open(&path).unwrap();
        let mut seen = Vec::new();
        loop {
            let reader = cpio::NewcReader::new(reader_input).unwrap();
            if reader.entry().is_trailer() {
                break;
            }
            let e = reader.entry();
            seen.push((e.name().to_owned(), e.mode(), e.rdev_major(), e.file_size()));
            reader_input = reader.finish().unwrap();
        }
        assert_eq!(
            seen,
            vec![
                ("sbin".into(), S_IFDIR | 0o755, 0, 0),
                ("sbin/init".into(), S_IFREG | 0o755, 0, 10),
                ("dev".into(), S_IFDIR | 0o755, 0, 0),
                ("dev/console".into(), S_IFCHR | 0o600, 5, 0),
                ("bin".into(), S_IFDIR | 0o755, 0, 0),
                ("bin/sh".into(), S_IFLNK | 0o777, 0, 7),
            ]
        );
    }
}
