//! What `capsid run` runs: a root file system directory and a process,
//! from `--rootfs DIR` and the command line, or from `--image LAYOUT[:TAG]`
//! (unpacked once per manifest) with its config's Entrypoint, Cmd, Env,
//! WorkingDir and User under the command line's overrides, as docker does.

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use capsid_runtime::seccomp_profile::DEFAULT_CAPABILITIES;
use oci_spec::runtime::{Capability, LinuxCapabilitiesBuilder, Spec};

#[derive(Debug, PartialEq, Eq)]
pub struct Workload {
    pub rootfs: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: Option<String>,
    pub user: Option<(u32, u32)>,
}

/// `DIR` or `DIR:TAG`; a DIR whose own name has a colon wins.
pub fn parse_image_ref(text: &str) -> anyhow::Result<(PathBuf, Option<String>)> {
    if Path::new(text).is_dir() {
        return Ok((text.into(), None));
    }
    match text.rsplit_once(':') {
        Some((dir, tag)) if Path::new(dir).is_dir() && !tag.is_empty() && !tag.contains('/') => {
            Ok((dir.into(), Some(tag.to_owned())))
        }
        _ => bail!("--image {text}: not an OCI layout directory (DIR or DIR:TAG)"),
    }
}

/// The most of an image's /etc/passwd or /etc/group read.
const MAX_ACCOUNTS_FILE: u64 = 1 << 20;

/// `etc/NAME` in the image, if it is a plain file under a plain `etc`
/// directory: a symbolic link there would have capsid read a file of the
/// host's.
fn accounts_file(rootfs: &Path, name: &str) -> Option<String> {
    let etc = rootfs.join("etc");
    let file = etc.join(name);
    let plain = |path: &Path, dir: bool| {
        std::fs::symlink_metadata(path)
            .is_ok_and(|m| !m.file_type().is_symlink() && m.is_dir() == dir)
    };
    if !plain(&etc, true) || !plain(&file, false) {
        return None;
    }
    let mut text = String::new();
    std::fs::File::open(&file)
        .ok()?
        .take(MAX_ACCOUNTS_FILE)
        .read_to_string(&mut text)
        .ok()?;
    Some(text)
}

/// The fields of the `etc/NAME` line whose field `column` is `key`.
fn account(rootfs: &Path, name: &str, column: usize, key: &str) -> Option<Vec<String>> {
    let text = accounts_file(rootfs, name)?;
    text.lines()
        .map(|line| line.split(':').map(str::to_owned).collect::<Vec<_>>())
        .find(|fields| fields.len() >= 4 && fields[column] == key)
}

/// The home directory of `uid` in the image's /etc/passwd, else docker's
/// default: /root for root, / for anyone else.
fn home_of(rootfs: &Path, uid: u32) -> String {
    account(rootfs, "passwd", 2, &uid.to_string())
        .and_then(|fields| fields.get(5).filter(|home| home.starts_with('/')).cloned())
        .unwrap_or_else(|| if uid == 0 { "/root" } else { "/" }.to_owned())
}

/// Resolves a user name or number (and an optional group) the way the
/// image's /etc/passwd and /etc/group say.
fn resolve_user(rootfs: &Path, user: &str) -> anyhow::Result<(u32, u32)> {
    let (name, group) = match user.split_once(':') {
        Some((name, group)) => (name, Some(group)),
        None => (user, None),
    };
    let lookup = |file: &str, key: &str| -> Option<(u32, u32)> {
        let text = accounts_file(rootfs, file.trim_start_matches("etc/"))?;
        text.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.len() >= 4 && fields[0] == key)
                .then(|| Some((fields[2].parse().ok()?, fields[3].parse().unwrap_or(0))))
                .flatten()
        })
    };
    let (uid, mut gid) = match name.parse::<u32>() {
        Ok(uid) => (uid, lookup("etc/passwd", name).map_or(uid, |(_, g)| g)),
        Err(_) => lookup("etc/passwd", name)
            .with_context(|| format!("user {name:?} is not in the image's /etc/passwd"))?,
    };
    if let Some(group) = group {
        gid = match group.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => lookup("etc/group", group)
                .map(|(gid, _)| gid)
                .with_context(|| format!("group {group:?} is not in the image's /etc/group"))?,
        };
    }
    Ok((uid, gid))
}

/// The environment (appended), working directory and user the command line
/// (or the image) asks for, on an OCI process.
pub fn apply(
    process: &mut oci_spec::runtime::Process,
    env: &[String],
    cwd: Option<&str>,
    user: Option<(u32, u32)>,
) {
    let mut all = process.env().clone().unwrap_or_default();
    all.extend(env.iter().cloned());
    process.set_env(Some(all));
    if let Some(cwd) = cwd {
        process.set_cwd(cwd.into());
    }
    if let Some((uid, gid)) = user {
        let mut spec_user = process.user().clone();
        spec_user.set_uid(uid);
        spec_user.set_gid(gid);
        process.set_user(spec_user);
    }
}

/// The default search path, as docker's when the image sets none.
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `entries` with one value per name, the last one given, in the order
/// the names first came (a later `-e PATH=…` replaces the image's PATH
/// rather than standing behind it, where getenv(3) would not see it).
fn merge_env(entries: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut merged: Vec<String> = Vec::new();
    for entry in entries {
        let name = entry
            .split_once('=')
            .map_or(entry.as_str(), |(name, _)| name);
        match merged
            .iter_mut()
            .find(|e| e.split_once('=').map_or(e.as_str(), |(n, _)| n) == name)
        {
            Some(slot) => *slot = entry.clone(),
            None => merged.push(entry.clone()),
        }
    }
    merged
}

/// The container `docker run` would make for `workload`, not the
/// `oci-spec` crate's example spec (hostname `youki`, three capabilities
/// with inheritable and ambient filled, `TERM` always, no `HOME`): the
/// hostname `id`, docker's 14 default capabilities with empty inheritable
/// and ambient sets, `PATH`, `HOSTNAME`, `TERM` only with a tty, the
/// image's and the command line's variables, and `HOME` from the image's
/// /etc/passwd unless given.
pub fn docker_spec(workload: &Workload, tty: bool, id: &str) -> anyhow::Result<Spec> {
    let mut spec = Spec::default();
    spec.set_hostname(Some(id.to_owned()));
    let mut process = spec.process().clone().unwrap_or_default();
    process.set_args(Some(workload.args.clone()));
    process.set_terminal(Some(tty));
    let mut env = vec![DEFAULT_PATH.to_owned(), format!("HOSTNAME={id}")];
    if tty {
        env.push("TERM=xterm".into());
    }
    env.extend(workload.env.iter().cloned());
    let mut env = merge_env(env);
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        let uid = workload.user.map_or(0, |(uid, _)| uid);
        env.push(format!("HOME={}", home_of(&workload.rootfs, uid)));
    }
    process.set_env(Some(env));
    let granted: HashSet<Capability> = DEFAULT_CAPABILITIES.into_iter().collect();
    process.set_capabilities(Some(
        LinuxCapabilitiesBuilder::default()
            .bounding(granted.clone())
            .effective(granted.clone())
            .permitted(granted)
            .inheritable(HashSet::new())
            .ambient(HashSet::new())
            .build()
            .context("the default capabilities")?,
    ));
    apply(&mut process, &[], workload.cwd.as_deref(), workload.user);
    spec.set_process(Some(process));
    Ok(spec)
}

pub struct Overrides<'a> {
    pub rootfs: Option<&'a Path>,
    pub image: Option<&'a str>,
    pub command: &'a [String],
    pub env: &'a [String],
    pub user: Option<(u32, u32)>,
}

/// A `--rootfs` that cannot be a container's root is refused before
/// anything boots: not a directory, empty, or an OCI image layout (which
/// `--image` takes).
pub fn check_rootfs(rootfs: &Path) -> anyhow::Result<()> {
    if !rootfs.is_dir() {
        bail!("--rootfs {}: not a directory", rootfs.display());
    }
    let mut entries = std::fs::read_dir(rootfs)
        .with_context(|| format!("--rootfs {}: cannot read it", rootfs.display()))?;
    if entries.next().is_none() {
        bail!(
            "--rootfs {}: an empty directory; give the container's root file system \
             (a directory with bin/, etc/, …)",
            rootfs.display()
        );
    }
    if rootfs.join("oci-layout").is_file() && rootfs.join("index.json").is_file() {
        bail!(
            "--rootfs {}: an OCI image layout, not a root file system; run it with \
             --image {}",
            rootfs.display(),
            rootfs.display()
        );
    }
    Ok(())
}

pub fn resolve(overrides: &Overrides<'_>, cache: &Path) -> anyhow::Result<Workload> {
    match (overrides.rootfs, overrides.image) {
        (Some(rootfs), None) => {
            check_rootfs(rootfs)?;
            if overrides.command.is_empty() {
                bail!("no command: `capsid run --rootfs DIR -- CMD...`");
            }
            Ok(Workload {
                rootfs: rootfs.into(),
                args: overrides.command.to_vec(),
                env: overrides.env.to_vec(),
                cwd: None,
                user: overrides.user,
            })
        }
        (None, Some(image)) => {
            let (layout, tag) = parse_image_ref(image)?;
            let progress = crate::attach::Progress::start("unpacking the image");
            let unpacked = capsid_runtime::images::oci::unpack(&layout, tag.as_deref(), cache)
                .with_context(|| format!("cannot use the image {image}"))?;
            drop(progress);
            if unpacked.unpacked {
                eprintln!("capsid: unpacked {image} (cached for next time)");
            }
            let config = &unpacked.config;
            let mut args = config.entrypoint().clone().unwrap_or_default();
            if overrides.command.is_empty() {
                args.extend(config.cmd().clone().unwrap_or_default());
            } else {
                args.extend(overrides.command.iter().cloned());
            }
            if args.is_empty() {
                bail!("the image {image} names no command (Entrypoint, Cmd): give one after --");
            }
            let mut env = config.env().clone().unwrap_or_default();
            env.extend(overrides.env.iter().cloned());
            let user = match (overrides.user, config.user().as_deref()) {
                (Some(user), _) => Some(user),
                (None, Some(user)) if !user.is_empty() => {
                    Some(resolve_user(&unpacked.rootfs, user)?)
                }
                _ => None,
            };
            Ok(Workload {
                rootfs: unpacked.rootfs,
                args,
                env,
                cwd: config.working_dir().clone().filter(|d| !d.is_empty()),
                user,
            })
        }
        _ => bail!("give one of --rootfs DIR or --image OCI-LAYOUT[:TAG]"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_resolve_through_the_images_files() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        std::fs::write(
            root.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\ncapsid:x:1000:1000::/home:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(root.path().join("etc/group"), "root:x:0:\nextra:x:2000:\n").unwrap();
        assert_eq!(resolve_user(root.path(), "capsid").unwrap(), (1000, 1000));
        assert_eq!(
            resolve_user(root.path(), "1000:2000").unwrap(),
            (1000, 2000)
        );
        assert_eq!(
            resolve_user(root.path(), "capsid:extra").unwrap(),
            (1000, 2000)
        );
        assert_eq!(resolve_user(root.path(), "4242").unwrap(), (4242, 4242));
        assert!(
            resolve_user(root.path(), "nobody")
                .unwrap_err()
                .to_string()
                .contains("passwd")
        );
    }

    #[test]
    fn a_container_gets_dockers_defaults_not_the_example_specs() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        std::fs::write(
            root.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\ncapsid:x:1000:1000::/home/capsid:/bin/sh\n",
        )
        .unwrap();
        let workload = |user, env: &[&str]| Workload {
            rootfs: root.path().into(),
            args: vec!["id".into()],
            env: env.iter().map(|e| (*e).to_owned()).collect(),
            cwd: None,
            user,
        };
        let spec = docker_spec(&workload(None, &[]), false, "0123456789ab").unwrap();
        assert_eq!(spec.hostname().as_deref(), Some("0123456789ab"));
        let process = spec.process().as_ref().unwrap();
        assert_eq!(
            process.env().as_ref().unwrap(),
            &[DEFAULT_PATH, "HOSTNAME=0123456789ab", "HOME=/root"],
            "no TERM without a tty"
        );
        let caps = process.capabilities().as_ref().unwrap();
        assert_eq!(caps.bounding().as_ref().unwrap().len(), 14);
        assert!(
            caps.effective()
                .as_ref()
                .unwrap()
                .contains(&Capability::Chown)
        );
        assert_eq!(caps.permitted(), caps.bounding());
        assert!(caps.inheritable().as_ref().unwrap().is_empty());
        assert!(caps.ambient().as_ref().unwrap().is_empty());

        let spec = docker_spec(
            &workload(Some((1000, 1000)), &["PATH=/opt/bin", "A=1", "A=2"]),
            true,
            "id",
        )
        .unwrap();
        let env = spec.process().as_ref().unwrap().env().clone().unwrap();
        assert_eq!(
            env,
            [
                "PATH=/opt/bin",
                "HOSTNAME=id",
                "TERM=xterm",
                "A=2",
                "HOME=/home/capsid"
            ]
        );
        let spec = docker_spec(&workload(Some((4242, 4242)), &["HOME=/h"]), false, "id").unwrap();
        let env = spec.process().as_ref().unwrap().env().clone().unwrap();
        assert_eq!(env.last().map(String::as_str), Some("HOME=/h"));
        assert_eq!(home_of(root.path(), 4242), "/");
    }

    #[test]
    fn the_images_accounts_are_not_read_through_a_symbolic_link() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        let outside = root.path().join("host-passwd");
        std::fs::write(&outside, "root:x:0:0::/secret:/bin/sh\n").unwrap();
        std::os::unix::fs::symlink(&outside, root.path().join("etc/passwd")).unwrap();
        assert_eq!(home_of(root.path(), 0), "/root");
        assert!(resolve_user(root.path(), "root").is_err());
    }

    #[test]
    fn a_rootfs_that_cannot_be_one_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let empty = check_rootfs(dir.path()).unwrap_err().to_string();
        assert!(empty.contains("an empty directory"), "{empty}");
        std::fs::write(dir.path().join("oci-layout"), "{}").unwrap();
        std::fs::write(dir.path().join("index.json"), "{}").unwrap();
        let layout = check_rootfs(dir.path()).unwrap_err().to_string();
        assert!(layout.contains("--image"), "{layout}");
        let file = dir.path().join("index.json");
        assert!(
            check_rootfs(&file)
                .unwrap_err()
                .to_string()
                .contains("not a directory")
        );
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("bin")).unwrap();
        assert!(check_rootfs(root.path()).is_ok());
    }

    #[test]
    fn image_references_split_at_the_tag() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_str().unwrap();
        assert_eq!(parse_image_ref(path).unwrap(), (PathBuf::from(path), None));
        assert_eq!(
            parse_image_ref(&format!("{path}:v1")).unwrap(),
            (PathBuf::from(path), Some("v1".into()))
        );
        assert!(parse_image_ref("/no/such/layout:v1").is_err());
    }
}
