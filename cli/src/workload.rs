//! What `capsid run` runs: a root file system directory and a process,
//! from `--rootfs DIR` and the command line, or from `--image LAYOUT[:TAG]`
//! (unpacked once per manifest) with its config's Entrypoint, Cmd, Env,
//! WorkingDir and User under the command line's overrides, as docker does.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

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

/// Resolves a user name or number (and an optional group) the way the
/// image's /etc/passwd and /etc/group say.
fn resolve_user(rootfs: &Path, user: &str) -> anyhow::Result<(u32, u32)> {
    let (name, group) = match user.split_once(':') {
        Some((name, group)) => (name, Some(group)),
        None => (user, None),
    };
    let lookup = |file: &str, key: &str| -> Option<(u32, u32)> {
        let text = std::fs::read_to_string(rootfs.join(file)).ok()?;
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

pub struct Overrides<'a> {
    pub rootfs: Option<&'a Path>,
    pub image: Option<&'a str>,
    pub command: &'a [String],
    pub env: &'a [String],
    pub user: Option<(u32, u32)>,
}

pub fn resolve(overrides: &Overrides<'_>, cache: &Path) -> anyhow::Result<Workload> {
    match (overrides.rootfs, overrides.image) {
        (Some(rootfs), None) => {
            if !rootfs.is_dir() {
                bail!("--rootfs {}: not a directory", rootfs.display());
            }
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
