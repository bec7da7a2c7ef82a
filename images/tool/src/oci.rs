//! OCI image layouts → a root file system directory, for `capsid run --image`.
//!
//! ```text
//!  LAYOUT/index.json ─▶ the manifest for TAG (or the only one) ─▶ its config
//!   ─▶ each layer in order (tar, tar+gzip): entries unpacked, whiteouts applied
//!   ─▶ $CAPSID_CACHE/images/<manifest digest>/rootfs, renamed into place
//! ```
//!
//! The image may come from anywhere, so it is treated as hostile: every
//! blob's digest is checked against what names it, blob paths come only
//! from `sha256:<64 hex>` digests, entries are unpacked with `tar`'s
//! `unpack_in` (no `..`, no absolute paths, nothing through a symlink
//! outside the tree), and a whiteout only removes a path whose parents are
//! real directories inside the tree.

use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::path::{Component, Path, PathBuf};

use oci_spec::image::{Config, Descriptor, ImageConfiguration, ImageIndex, ImageManifest};
use sha2::{Digest, Sha256};

/// Why an OCI image layout could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The directory has no `index.json`.
    #[error(
        "{0} is not an OCI image layout (no index.json); `skopeo copy` or `ctr images export` make one"
    )]
    NotALayout(PathBuf),
    /// A file of the layout could not be read.
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] io::Error),
    /// An index, manifest or config is not the JSON it should be.
    #[error("{0} is not valid: {1}")]
    Json(PathBuf, String),
    /// The tag asked for is not in the layout.
    #[error("no image tagged {tag:?} in {layout} (it has: {have})")]
    NoSuchTag {
        /// The tag asked for.
        tag: String,
        /// The layout.
        layout: PathBuf,
        /// The tags it has.
        have: String,
    },
    /// No tag given, and the layout holds more than one image.
    #[error("{layout} holds {count} images; name one as {layout}:TAG")]
    Ambiguous {
        /// The layout.
        layout: PathBuf,
        /// How many images it holds.
        count: usize,
    },
    /// A digest that is not `sha256:` and 64 hex digits.
    #[error("unsupported digest {0:?} (only sha256)")]
    Digest(String),
    /// A blob whose content does not hash to its name.
    #[error("blob {digest} does not match its digest (got sha256:{actual})")]
    Corrupt {
        /// What it should hash to.
        digest: String,
        /// What it hashes to.
        actual: String,
    },
    /// A layer that is not a (gzipped) tar.
    #[error("layer {digest}: unsupported media type {media_type}")]
    MediaType {
        /// The layer.
        digest: String,
        /// Its media type.
        media_type: String,
    },
    /// A layer entry could not be unpacked (or was refused).
    #[error("layer {digest}: cannot unpack {entry}")]
    Unpack {
        /// The layer.
        digest: String,
        /// The entry's path.
        entry: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The cache could not be written.
    #[error("cannot write the unpacked image in {0}")]
    Write(PathBuf, #[source] io::Error),
}

/// An image unpacked into a directory, with what its config says to run.
#[derive(Debug)]
pub struct UnpackedImage {
    /// Its root file system, in the cache.
    pub rootfs: PathBuf,
    /// Its config (entrypoint, command, environment, user, working directory).
    pub config: Config,
    /// False when it came from the cache.
    pub unpacked: bool,
}

const REF_NAME: &str = "org.opencontainers.image.ref.name";
const CONTAINERD_NAME: &str = "io.containerd.image.name";

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, OciError> {
    let bytes = fs::read(path).map_err(|e| OciError::Read(path.into(), e))?;
    serde_json::from_slice(&bytes).map_err(|e| OciError::Json(path.into(), e.to_string()))
}

/// The hex of a `sha256:` digest, checked so it can name a file.
fn digest_hex(digest: &str) -> Result<&str, OciError> {
    digest
        .strip_prefix("sha256:")
        .filter(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| OciError::Digest(digest.to_owned()))
}

fn blob_path(layout: &Path, descriptor: &Descriptor) -> Result<PathBuf, OciError> {
    let digest = descriptor.digest().to_string();
    Ok(layout.join("blobs/sha256").join(digest_hex(&digest)?))
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buffer)?;
        self.hasher.update(&buffer[..n]);
        Ok(n)
    }
}

fn check(digest: &str, hasher: Sha256) -> Result<(), OciError> {
    let actual: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if digest_hex(digest)? == actual {
        Ok(())
    } else {
        Err(OciError::Corrupt {
            digest: digest.to_owned(),
            actual,
        })
    }
}

/// A small JSON blob, digest checked.
fn read_blob_json<T: serde::de::DeserializeOwned>(
    layout: &Path,
    descriptor: &Descriptor,
) -> Result<T, OciError> {
    let path = blob_path(layout, descriptor)?;
    let bytes = fs::read(&path).map_err(|e| OciError::Read(path.clone(), e))?;
    check(
        descriptor.digest().as_ref(),
        Sha256::new_with_prefix(&bytes),
    )?;
    serde_json::from_slice(&bytes).map_err(|e| OciError::Json(path, e.to_string()))
}

fn names(descriptor: &Descriptor) -> Vec<String> {
    let annotations = descriptor.annotations().clone().unwrap_or_default();
    [REF_NAME, CONTAINERD_NAME]
        .iter()
        .filter_map(|key| annotations.get(*key).cloned())
        .collect()
}

fn choose<'a>(
    layout: &Path,
    index: &'a ImageIndex,
    tag: Option<&str>,
) -> Result<&'a Descriptor, OciError> {
    let manifests = index.manifests();
    match tag {
        Some(tag) => manifests
            .iter()
            .find(|d| {
                names(d)
                    .iter()
                    .any(|n| n == tag || n.rsplit_once(':').is_some_and(|(_, t)| t == tag))
            })
            .ok_or_else(|| OciError::NoSuchTag {
                tag: tag.to_owned(),
                layout: layout.into(),
                have: manifests
                    .iter()
                    .flat_map(names)
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        None if manifests.len() == 1 => Ok(&manifests[0]),
        None => Err(OciError::Ambiguous {
            layout: layout.into(),
            count: manifests.len(),
        }),
    }
}

/// Unpacks the image `tag` (or the only one) of the layout at `layout`
/// into `cache/images/<manifest digest>/rootfs`, once per manifest.
pub fn unpack(layout: &Path, tag: Option<&str>, cache: &Path) -> Result<UnpackedImage, OciError> {
    let index_path = layout.join("index.json");
    if !index_path.is_file() {
        return Err(OciError::NotALayout(layout.into()));
    }
    let index: ImageIndex = read_json(&index_path)?;
    let descriptor = choose(layout, &index, tag)?;
    let manifest: ImageManifest = read_blob_json(layout, descriptor)?;
    let configuration: ImageConfiguration = read_blob_json(layout, manifest.config())?;
    let config = configuration.config().clone().unwrap_or_default();
    let digest = descriptor.digest().to_string();
    let home = cache.join("images").join(digest_hex(&digest)?);
    let rootfs = home.join("rootfs");
    if rootfs.is_dir() {
        return Ok(UnpackedImage {
            rootfs,
            config,
            unpacked: false,
        });
    }
    let write = |e| OciError::Write(home.clone(), e);
    // Unpacked layers keep their setuid bits and owners (the guest needs
    // them): only root may reach them on the host.
    crate::private_dir(&cache.join("images")).map_err(write)?;
    fs::create_dir_all(&home).map_err(write)?;
    let staging = home.join(format!(".unpacking-{}", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir(&staging).map_err(write)?;
    let result = manifest
        .layers()
        .iter()
        .try_for_each(|layer| apply_layer(layout, layer, &staging));
    if let Err(e) = result {
        let _ = fs::remove_dir_all(&staging);
        return Err(e);
    }
    if let Err(e) = fs::rename(&staging, &rootfs) {
        let _ = fs::remove_dir_all(&staging);
        // Another process unpacked the same image meanwhile: use that one.
        if !rootfs.is_dir() {
            return Err(write(e));
        }
    }
    Ok(UnpackedImage {
        rootfs,
        config,
        unpacked: true,
    })
}

fn apply_layer(layout: &Path, layer: &Descriptor, root: &Path) -> Result<(), OciError> {
    let digest = layer.digest().to_string();
    let media_type = layer.media_type().to_string();
    let path = blob_path(layout, layer)?;
    let file = File::open(&path).map_err(|e| OciError::Read(path.clone(), e))?;
    let mut hashing = Hashing {
        inner: BufReader::new(file),
        hasher: Sha256::new(),
    };
    let fail = |entry: &str, source| OciError::Unpack {
        digest: digest.clone(),
        entry: entry.to_owned(),
        source,
    };
    {
        let reader: Box<dyn Read + '_> = if media_type.ends_with("tar+gzip")
            || media_type.ends_with(".tar.gzip")
            || media_type.ends_with("tar.gzip")
        {
            Box::new(flate2::read::GzDecoder::new(&mut hashing))
        } else if media_type.ends_with(".tar") || media_type.ends_with("layer.v1.tar") {
            Box::new(&mut hashing)
        } else {
            return Err(OciError::MediaType { digest, media_type });
        };
        unpack_layer(reader, root).map_err(|(entry, source)| fail(&entry, source))?;
    }
    // Whatever the decompressor left unread still counts for the digest.
    io::copy(&mut hashing, &mut io::sink()).map_err(|e| OciError::Read(path, e))?;
    check(&digest, hashing.hasher)
}

/// Applies one layer's tar stream to `root`: entries unpacked with their
/// modes and owners, whiteouts applied, nothing written outside `root`
/// (`tar`'s `unpack_in` refuses `..`, absolute paths and links out; our
/// whiteouts and replacements resolve only real directories). On failure,
/// the entry it failed at and why.
pub fn unpack_layer<R: Read>(reader: R, root: &Path) -> Result<(), (String, io::Error)> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    let entries = archive
        .entries()
        .map_err(|e| ("the archive".to_owned(), e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| ("an entry".to_owned(), e))?;
        let name = entry
            .path()
            .map_err(|e| ("an entry's path".to_owned(), e))?
            .into_owned();
        let shown = name.display().to_string();
        if let Some(whiteout) = whiteout(&name) {
            apply_whiteout(root, &whiteout).map_err(|e| (shown, e))?;
            continue;
        }
        // A non-directory replacing a directory of a lower layer.
        if entry.header().entry_type() != tar::EntryType::Directory
            && let Some(target) = inside(root, &name)
            && fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir())
        {
            fs::remove_dir_all(&target).map_err(|e| (shown.clone(), e))?;
        }
        entry.unpack_in(root).map_err(|e| (shown, e))?;
    }
    Ok(())
}

enum Whiteout {
    /// `.wh..wh..opq`: the directory's lower contents are gone.
    Opaque(PathBuf),
    /// `.wh.NAME`: NAME is gone.
    Remove(PathBuf),
}

fn whiteout(name: &Path) -> Option<Whiteout> {
    let file = name.file_name()?.to_str()?;
    let parent = name.parent().unwrap_or(Path::new("")).to_owned();
    if file == ".wh..wh..opq" {
        Some(Whiteout::Opaque(parent))
    } else {
        file.strip_prefix(".wh.")
            .map(|gone| Whiteout::Remove(parent.join(gone)))
    }
}

/// `rel` under `root` if it has only normal components and every parent on
/// the way is a real directory (no symlink can take it outside).
fn inside(root: &Path, rel: &Path) -> Option<PathBuf> {
    let mut path = root.to_owned();
    let components: Vec<_> = rel
        .components()
        .filter(|c| *c != Component::CurDir)
        .collect();
    let (last, parents) = components.split_last()?;
    for component in parents {
        let Component::Normal(part) = component else {
            return None;
        };
        path.push(part);
        if !fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            return None;
        }
    }
    let Component::Normal(last) = last else {
        return None;
    };
    Some(path.join(last))
}

fn apply_whiteout(root: &Path, whiteout: &Whiteout) -> io::Result<()> {
    match whiteout {
        Whiteout::Remove(rel) => {
            if let Some(target) = inside(root, rel) {
                match fs::symlink_metadata(&target) {
                    Ok(m) if m.is_dir() => fs::remove_dir_all(&target)?,
                    Ok(_) => fs::remove_file(&target)?,
                    Err(_) => {}
                }
            }
        }
        Whiteout::Opaque(rel) => {
            let dir = if rel.as_os_str().is_empty() {
                Some(root.to_owned())
            } else {
                inside(root, rel).filter(|d| fs::symlink_metadata(d).is_ok_and(|m| m.is_dir()))
            };
            if let Some(dir) = dir {
                for entry in fs::read_dir(&dir)? {
                    let entry = entry?;
                    if entry.file_type()?.is_dir() {
                        fs::remove_dir_all(entry.path())?;
                    } else {
                        fs::remove_file(entry.path())?;
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Writes a layout with one image of the given layers (each a list of
    /// (path, contents or None for a directory, symlink target)).
    struct Layout {
        dir: tempfile::TempDir,
        layers: Vec<serde_json::Value>,
    }

    impl Layout {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            fs::create_dir_all(dir.path().join("blobs/sha256")).unwrap();
            Self {
                dir,
                layers: Vec::new(),
            }
        }

        fn blob(&self, bytes: &[u8]) -> String {
            let hex: String = Sha256::digest(bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            fs::write(self.dir.path().join("blobs/sha256").join(&hex), bytes).unwrap();
            format!("sha256:{hex}")
        }

        fn layer(&mut self, build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) {
            let mut builder = tar::Builder::new(Vec::new());
            build(&mut builder);
            let tar = builder.into_inner().unwrap();
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&tar).unwrap();
            let bytes = gz.finish().unwrap();
            let digest = self.blob(&bytes);
            self.layers.push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": digest, "size": bytes.len()}));
        }

        fn finish(&self, tag: &str) -> &Path {
            let config = serde_json::to_vec(&serde_json::json!({
                "architecture": "amd64", "os": "linux",
                "config": {"Cmd": ["sh"], "User": "1000:1000", "Env": ["A=1"]},
                "rootfs": {"type": "layers", "diff_ids": []}}))
            .unwrap();
            let config_digest = self.blob(&config);
            let manifest = serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": config_digest, "size": config.len()},
                "layers": self.layers}))
            .unwrap();
            let manifest_digest = self.blob(&manifest);
            fs::write(
                self.dir.path().join("index.json"),
                serde_json::to_vec(&serde_json::json!({
                    "schemaVersion": 2,
                    "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                                   "digest": manifest_digest, "size": manifest.len(),
                                   "annotations": {REF_NAME: tag}}]}))
                .unwrap(),
            )
            .unwrap();
            self.dir.path()
        }
    }

    /// A root-owned header of `kind` with `mode` and `size`, time 0.
    fn header(kind: tar::EntryType, mode: u32, size: usize) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_size(size as u64);
        header.set_mode(mode);
        header.set_entry_type(kind);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header
    }

    fn file(builder: &mut tar::Builder<Vec<u8>>, path: &str, contents: &[u8]) {
        let mut header = header(tar::EntryType::Regular, 0o644, contents.len());
        builder.append_data(&mut header, path, contents).unwrap();
    }

    fn dir(builder: &mut tar::Builder<Vec<u8>>, path: &str) {
        let mut header = header(tar::EntryType::Directory, 0o755, 0);
        builder.append_data(&mut header, path, &[][..]).unwrap();
    }

    fn symlink(builder: &mut tar::Builder<Vec<u8>>, path: &str, target: &str) {
        let mut header = header(tar::EntryType::Symlink, 0o777, 0);
        builder.append_link(&mut header, path, target).unwrap();
    }

    #[test]
    fn layers_apply_in_order_with_whiteouts_and_the_result_is_cached() {
        let mut layout = Layout::new();
        layout.layer(|b| {
            dir(b, "etc");
            file(b, "etc/keep", b"lower");
            file(b, "etc/gone", b"lower");
            dir(b, "var");
            file(b, "var/old", b"lower");
        });
        layout.layer(|b| {
            file(b, "etc/.wh.gone", b"");
            dir(b, "var");
            file(b, "var/.wh..wh..opq", b"");
            file(b, "var/new", b"upper");
            file(b, "etc/keep", b"upper");
        });
        let path = layout.finish("v1");
        let cache = tempfile::tempdir().unwrap();
        let image = unpack(path, Some("v1"), cache.path()).unwrap();
        assert!(image.unpacked);
        let root = &image.rootfs;
        assert_eq!(fs::read(root.join("etc/keep")).unwrap(), b"upper");
        assert!(!root.join("etc/gone").exists());
        assert!(!root.join("var/old").exists());
        assert_eq!(fs::read(root.join("var/new")).unwrap(), b"upper");
        assert_eq!(image.config.user().as_deref(), Some("1000:1000"));
        assert!(!unpack(path, None, cache.path()).unwrap().unpacked);
        let error = unpack(path, Some("v2"), cache.path())
            .unwrap_err()
            .to_string();
        assert!(error.contains("v2") && error.contains("v1"), "{error}");
    }

    #[test]
    fn setuid_programs_stay_for_the_guest_but_out_of_reach_on_the_host() {
        // Before the fix the cache was world-readable: a setuid-root program
        // of any image could be run by any host user from the cache.
        use std::os::unix::fs::PermissionsExt;
        let mut layout = Layout::new();
        layout.layer(|b| {
            dir(b, "bin");
            let mut h = header(tar::EntryType::Regular, 0o4755, 4);
            b.append_data(&mut h, "bin/su", &b"\x7fELF"[..]).unwrap();
        });
        let path = layout.finish("v1");
        let cache = tempfile::tempdir().unwrap();
        // A cache directory made wide by an older version is closed too.
        fs::create_dir(cache.path().join("images")).unwrap();
        fs::set_permissions(
            cache.path().join("images"),
            fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let image = unpack(path, Some("v1"), cache.path()).unwrap();
        let su = fs::metadata(image.rootfs.join("bin/su")).unwrap();
        assert_eq!(
            su.permissions().mode() & 0o7777,
            0o4755,
            "kept for the guest"
        );
        let images = fs::metadata(cache.path().join("images")).unwrap();
        assert_eq!(images.permissions().mode() & 0o777, 0o700);
    }

    #[test]
    fn a_hostile_layer_cannot_reach_outside_the_tree() {
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("victim"), b"host file").unwrap();
        let mut layout = Layout::new();
        let target = outside.path().to_str().unwrap().to_owned();
        layout.layer(|b| symlink(b, "escape", &target));
        layout.layer(|b| {
            // Through the symlink: a whiteout and a file.
            file(b, "escape/.wh.victim", b"");
        });
        let path = layout.finish("bad");
        let cache = tempfile::tempdir().unwrap();
        let _ = unpack(path, None, cache.path());
        assert_eq!(
            fs::read(outside.path().join("victim")).unwrap(),
            b"host file"
        );

        let mut layout = Layout::new();
        layout.layer(|b| symlink(b, "escape", &target));
        layout.layer(|b| file(b, "escape/planted", b"x"));
        let path = layout.finish("bad");
        let _ = unpack(path, None, cache.path());
        assert!(!outside.path().join("planted").exists());
    }

    #[test]
    fn a_corrupt_blob_is_refused() {
        let mut layout = Layout::new();
        layout.layer(|b| file(b, "f", b"data"));
        let path = layout.finish("v1");
        // Flip the layer's bytes.
        let blobs = path.join("blobs/sha256");
        let layer = layout.layers[0]["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:");
        let mut bytes = fs::read(blobs.join(layer)).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(blobs.join(layer), bytes).unwrap();
        let cache = tempfile::tempdir().unwrap();
        assert!(unpack(path, None, cache.path()).is_err());
        assert!(
            !cache
                .path()
                .join("images")
                .read_dir()
                .unwrap()
                .flatten()
                .any(|e| { e.path().join("rootfs").exists() })
        );
    }
}
