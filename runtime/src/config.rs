//! The runtime's configuration: one TOML file with documented defaults
//! (`/etc/capsid/config.toml`, or the file `CAPSID_CONFIG` names), a few
//! environment overrides for the paths, and per-container `io.capsid.*`
//! annotations for the VM's size.
//!
//! ```text
//!  defaults ─▶ config file ─▶ CAPSID_KERNEL / CAPSID_AGENT_INITRAMFS / CAPSID_VMM
//!           ─▶ per container: linux.resources (CPU quota, memory limit)
//!           ─▶ io.capsid.vcpus / io.capsid.memory annotations
//! ```
//!
//! Annotations can only size the VM: a pod author must not be able to point
//! the runtime at another kernel or VMM binary on the host.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use oci_spec::runtime::Spec;
use serde::Deserialize;

/// Names the configuration file, instead of [`DEFAULT_CONFIG_PATH`].
pub const CONFIG_ENV: &str = "CAPSID_CONFIG";
/// The configuration file read when `CAPSID_CONFIG` is not set (absent: the
/// defaults).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/capsid/config.toml";
/// Annotations under this prefix are ours; an unknown one is an error.
pub const ANNOTATION_PREFIX: &str = "io.capsid.";
/// A container's vCPUs, overriding its CPU quota.
pub const ANNOTATION_VCPUS: &str = "io.capsid.vcpus";
/// A container's VM memory in MiB, overriding its memory limit.
pub const ANNOTATION_MEMORY: &str = "io.capsid.memory";
/// The container's writable layer on a scratch disk of this size
/// (`512M`, `10G`) instead of guest memory, as `capsid run --disk`.
pub const ANNOTATION_DISK: &str = "io.capsid.disk";

/// The most vCPUs one micro-VM may be given.
pub const MAX_VCPUS: u32 = 32;
/// The least memory (MiB) a micro-VM gets: the kernel and the agent.
pub const MIN_MEMORY_MIB: u32 = 32;
/// The most memory (MiB) a micro-VM may be given.
pub const MAX_MEMORY_MIB: u32 = 65536;
/// The most containers a pod's VM holds besides its sandbox container
/// (the VMM's interrupt lines bound its disks).
pub const MAX_POD_CONTAINERS: u8 = 16;
/// The most boots after a guest crash `boot_retries` may ask for.
pub const MAX_BOOT_RETRIES: u32 = 5;
/// The longest `kernel_params` (the whole command line has 2 KiB, and the
/// VMM adds its devices to it).
pub const MAX_KERNEL_PARAMS: usize = 1024;

/// What containerd's CRI (1.7 and later) passes on a pod's sandbox
/// container: the pod's summed limits, which size the pod's VM. This one:
/// the CPU quota (µs per period).
pub const CRI_SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
/// The pod's CPU period (µs).
pub const CRI_SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
/// The pod's memory limit (bytes).
pub const CRI_SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";

/// What is wrong with the configuration, a file it names, or an
/// annotation; each says which key to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read the configuration {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The file is not TOML of known keys.
    #[error("configuration {0}: {1}")]
    Parse(PathBuf, String),
    /// A key's value is out of range.
    #[error("configuration {path}: {key} = {value}: {reason}")]
    Value {
        /// The file.
        path: PathBuf,
        /// The key.
        key: &'static str,
        /// Its value.
        value: String,
        /// What is allowed.
        reason: String,
    },
    /// A file the configuration names is not there.
    #[error("{what} {path} does not exist: set {key} in the configuration or {env}{hint}")]
    Missing {
        /// What it is ("guest kernel").
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
        /// The key that names it.
        key: &'static str,
        /// The environment variable that names it.
        env: &'static str,
        /// How to make it, or empty.
        hint: &'static str,
    },
    /// An `io.capsid.*` or CRI annotation is unknown or out of range.
    #[error("annotation {key}={value:?}: {reason}")]
    Annotation {
        /// The annotation.
        key: String,
        /// Its value.
        value: String,
        /// What is allowed.
        reason: String,
    },
}

/// Everything the configuration file may say; every key is optional.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The guest kernel (an uncompressed `vmlinux`, or a bzImage).
    pub kernel: PathBuf,
    /// The guest initramfs, with capsid-agent as `/init`.
    pub initramfs: PathBuf,
    /// The capsid-vmm binary; a bare name is looked up in PATH.
    pub vmm: PathBuf,
    /// vCPUs of a VM whose container sets no CPU quota.
    pub vcpus: u32,
    /// Memory (MiB) of a VM whose container sets no memory limit.
    pub memory_mib: u32,
    /// Added to a container's memory limit to size its VM: the guest kernel,
    /// the agent and the page cache of the rootfs.
    pub overhead_mib: u32,
    /// The shim's log level (error, warn, info, debug, trace).
    pub log_level: String,
    /// How long a booting VM's agent may take to answer (retries included).
    pub agent_timeout_secs: u64,
    /// How many times a guest that crashed before its agent answered is
    /// booted again, each time logged (docs/reliability.md); 0 to 5.
    pub boot_retries: u32,
    /// Appended to the guest kernel's command line (Kata's
    /// `kernel_params`), e.g. `sysctl.vm.panic_on_oom=2`; printable ASCII.
    pub kernel_params: String,
    /// Where each VM's scratch directory (vsock socket, VMM log) goes.
    pub run_dir: PathBuf,
    /// Where writable disks made for one VM go (`--disk`, the
    /// `io.capsid.disk` annotation, `--volume …:rw` copies): a directory
    /// on a disk-backed file system, never /run's tmpfs (that is host
    /// memory). Each disk is unlinked as soon as it is made: it lives as
    /// long as its VMM, and its blocks are taken when it is made.
    pub disk_dir: PathBuf,
    /// How many containers a pod's VM holds at once besides the sandbox
    /// (pause) container: the VM's spare disk slots for their rootfs images.
    pub pod_containers: u8,
    /// Confine each capsid-vmm: its own namespaces and root, an
    /// unprivileged user, no capabilities, rlimits, Landlock, a cgroup
    /// (docs/security.md). Needs root; `false` runs it unconfined.
    pub vmm_jail: bool,
    /// The user and group confined VMMs run as; absent, each VM gets one
    /// of its own (from 0x70000000 up).
    pub vmm_uid: Option<u32>,
    /// See `vmm_uid`.
    pub vmm_gid: Option<u32>,
    /// What a syscall outside a VMM thread's allowlist does: "kill", or
    /// "log" (allowed and logged by the kernel, to debug a filter), or
    /// "none" (no filters).
    pub vmm_seccomp: String,
    /// Where each VM's cgroup v2 goes (memory and process limits of its
    /// VMM); empty for none.
    pub cgroup_parent: PathBuf,
    /// The largest scratch disk (GiB) an `io.capsid.disk` annotation may
    /// ask for: its blocks are taken from `disk_dir`'s file system when
    /// the pod starts.
    pub max_disk_gib: u64,
    /// Start VMs from a template of their shape (a snapshot of a booted
    /// guest in `$CAPSID_CACHE/templates`, made the first time) instead
    /// of booting each; `false` boots every VM (`capsid run --cold` does
    /// for one).
    pub warm_start: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            kernel: "/usr/share/capsid/vmlinux".into(),
            initramfs: "/usr/share/capsid/capsid-initramfs.cpio".into(),
            vmm: "capsid-vmm".into(),
            vcpus: 1,
            memory_mib: 256,
            overhead_mib: 64,
            log_level: "info".into(),
            agent_timeout_secs: 180,
            boot_retries: 2,
            kernel_params: String::new(),
            run_dir: "/run/capsid".into(),
            disk_dir: "/var/lib/capsid/disks".into(),
            pod_containers: 8,
            vmm_jail: true,
            vmm_uid: None,
            vmm_gid: None,
            vmm_seccomp: "kill".into(),
            cgroup_parent: crate::confine::DEFAULT_CGROUP_PARENT.into(),
            max_disk_gib: 16,
            warm_start: true,
        }
    }
}

/// What a micro-VM boots, each found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootFiles {
    /// The capsid-vmm binary.
    pub vmm: PathBuf,
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The guest initramfs (the agent as `/init`).
    pub initramfs: PathBuf,
    /// Appended to the VMM's default kernel command line; may be empty.
    pub kernel_params: String,
}

/// The size of one micro-VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM, MiB.
    pub memory_mib: u32,
}

impl Config {
    /// Reads the file `CAPSID_CONFIG` names (which must exist), else
    /// [`DEFAULT_CONFIG_PATH`] if it exists, else the defaults; then applies
    /// the environment's path overrides.
    pub fn load() -> Result<Self, ConfigError> {
        let mut config = match std::env::var_os(CONFIG_ENV) {
            Some(path) => Self::from_file(Path::new(&path))?,
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
                Self::from_file(Path::new(DEFAULT_CONFIG_PATH))?
            }
            None => Self::default(),
        };
        for (variable, field) in [
            ("CAPSID_KERNEL", &mut config.kernel),
            ("CAPSID_AGENT_INITRAMFS", &mut config.initramfs),
            ("CAPSID_VMM", &mut config.vmm),
            ("CAPSID_RUN_DIR", &mut config.run_dir),
            ("CAPSID_DISK_DIR", &mut config.disk_dir),
        ] {
            if let Some(value) = std::env::var_os(variable).filter(|v| !v.is_empty()) {
                *field = value.into();
            }
        }
        Ok(config)
    }

    /// Reads and checks the file at `path`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.into(), e))?;
        Self::parse(path, &text)
    }

    /// Parses and checks `text`, the contents of `path` (named in errors).
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text)
            .map_err(|e| ConfigError::Parse(path.into(), e.message().to_owned()))?;
        let bad = |key, value: String, reason: &str| ConfigError::Value {
            path: path.into(),
            key,
            value,
            reason: reason.into(),
        };
        if !(1..=MAX_VCPUS).contains(&config.vcpus) {
            return Err(bad("vcpus", config.vcpus.to_string(), "must be 1 to 32"));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&config.memory_mib) {
            return Err(bad(
                "memory_mib",
                config.memory_mib.to_string(),
                "must be 32 to 65536",
            ));
        }
        if config.overhead_mib > MAX_MEMORY_MIB {
            return Err(bad(
                "overhead_mib",
                config.overhead_mib.to_string(),
                "must be at most 65536",
            ));
        }
        if !["error", "warn", "info", "debug", "trace"].contains(&config.log_level.as_str()) {
            return Err(bad(
                "log_level",
                config.log_level.clone(),
                "must be error, warn, info, debug or trace",
            ));
        }
        if !(1..=MAX_POD_CONTAINERS).contains(&config.pod_containers) {
            return Err(bad(
                "pod_containers",
                config.pod_containers.to_string(),
                "must be 1 to 16",
            ));
        }
        if config.agent_timeout_secs == 0 {
            return Err(bad("agent_timeout_secs", "0".into(), "must be at least 1"));
        }
        if config.boot_retries > MAX_BOOT_RETRIES {
            return Err(bad(
                "boot_retries",
                config.boot_retries.to_string(),
                "must be 0 to 5",
            ));
        }
        let printable = |c: char| c.is_ascii_graphic() || c == ' ';
        if config.kernel_params.len() > MAX_KERNEL_PARAMS
            || !config.kernel_params.chars().all(printable)
        {
            return Err(bad(
                "kernel_params",
                format!("{:?}", config.kernel_params),
                "must be at most 1024 printable ASCII characters",
            ));
        }
        if !["kill", "log", "none"].contains(&config.vmm_seccomp.as_str()) {
            return Err(bad(
                "vmm_seccomp",
                config.vmm_seccomp.clone(),
                "must be kill, log or none",
            ));
        }
        for (key, id) in [("vmm_uid", config.vmm_uid), ("vmm_gid", config.vmm_gid)] {
            if id == Some(0) {
                return Err(bad(key, "0".into(), "the VMM must not run as root"));
            }
        }
        Ok(config)
    }

    /// How each VMM is confined.
    pub fn confinement(&self) -> crate::confine::Confinement {
        crate::confine::Confinement {
            jail: self.vmm_jail,
            uid: self.vmm_uid,
            gid: self.vmm_gid,
            seccomp: self.vmm_seccomp.clone(),
            cgroup_parent: (!self.cgroup_parent.as_os_str().is_empty())
                .then(|| self.cgroup_parent.clone()),
        }
    }

    /// `agent_timeout_secs` as a duration.
    pub fn agent_timeout(&self) -> Duration {
        Duration::from_secs(self.agent_timeout_secs)
    }

    /// How a VM of this configuration boots: within the agent's timeout,
    /// booted again `boot_retries` times after a guest crash.
    pub fn boot_policy<'a>(
        &self,
        io_timeout: Duration,
        interrupted: &'a dyn Fn() -> bool,
        on_retry: &'a dyn Fn(&str),
    ) -> crate::vm::BootPolicy<'a> {
        crate::vm::BootPolicy {
            wait: self.agent_timeout(),
            io_timeout,
            retries: self.boot_retries,
            interrupted,
            on_retry,
        }
    }

    /// The VMM binary: the configured path, or the bare name looked up
    /// beside the running binary and then in PATH.
    pub fn vmm_path(&self) -> Option<PathBuf> {
        if self.vmm.components().count() > 1 {
            return Some(self.vmm.clone());
        }
        let beside_me = std::env::current_exe()
            .ok()
            .and_then(|me| Some(me.parent()?.join(&self.vmm)))
            .filter(|p| p.is_file());
        beside_me.or_else(|| {
            std::env::var_os("PATH").and_then(|path| {
                std::env::split_paths(&path)
                    .map(|dir| dir.join(&self.vmm))
                    .find(|p| p.is_file())
            })
        })
    }

    /// The VMM, kernel and initramfs, each checked to exist; the error
    /// names the missing one and where to point at it.
    pub fn boot_files(&self) -> Result<BootFiles, ConfigError> {
        const BUILT_BY_DEMO: &str = " (`make demo` builds it)";
        let vmm = self.vmm_path().ok_or_else(|| ConfigError::Missing {
            what: "capsid-vmm (looked for beside this program and in PATH)",
            path: self.vmm.clone(),
            key: "vmm",
            env: "CAPSID_VMM",
            hint: " (`cargo build --release -p capsid-vmm` builds it)",
        })?;
        for (what, path, key, env, hint) in [
            (
                "guest kernel",
                &self.kernel,
                "kernel",
                "CAPSID_KERNEL",
                BUILT_BY_DEMO,
            ),
            (
                "guest initramfs",
                &self.initramfs,
                "initramfs",
                "CAPSID_AGENT_INITRAMFS",
                BUILT_BY_DEMO,
            ),
            ("capsid-vmm", &vmm, "vmm", "CAPSID_VMM", ""),
        ] {
            if !path.is_file() {
                return Err(ConfigError::Missing {
                    what,
                    path: path.clone(),
                    key,
                    env,
                    hint,
                });
            }
        }
        Ok(BootFiles {
            vmm,
            kernel: self.kernel.clone(),
            initramfs: self.initramfs.clone(),
            kernel_params: self.kernel_params.clone(),
        })
    }

    /// Sizes the VM for a container: its CPU quota (rounded up to whole
    /// vCPUs) and memory limit (plus the overhead), or for a pod's sandbox
    /// container the pod's limits CRI passes in annotations, else the
    /// defaults; then the `io.capsid.*` annotations, which win.
    pub fn size_for(&self, spec: &Spec) -> Result<VmSize, ConfigError> {
        let mut size = VmSize {
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
        };
        let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
        let no_annotations = HashMap::new();
        let annotations = spec.annotations().as_ref().unwrap_or(&no_annotations);
        let number = |key: &str| annotations.get(key).and_then(|v| v.parse::<i64>().ok());
        let cpu = resources.and_then(|r| r.cpu().as_ref());
        let quota = number(CRI_SANDBOX_CPU_QUOTA).or_else(|| cpu.and_then(|c| c.quota()));
        let period = number(CRI_SANDBOX_CPU_PERIOD)
            .and_then(|p| u64::try_from(p).ok())
            .or_else(|| cpu.and_then(|c| c.period()));
        if let (Some(quota), Some(period)) = (quota, period)
            && quota > 0
            && period > 0
        {
            let vcpus = quota.unsigned_abs().div_ceil(period);
            size.vcpus = u32::try_from(vcpus)
                .unwrap_or(MAX_VCPUS)
                .clamp(1, MAX_VCPUS);
        }
        if let Some(limit) = number(CRI_SANDBOX_MEMORY)
            .or_else(|| {
                resources
                    .and_then(|r| r.memory().as_ref())
                    .and_then(|m| m.limit())
            })
            .filter(|&l| l > 0)
        {
            let mib = limit.unsigned_abs().div_ceil(1 << 20) + u64::from(self.overhead_mib);
            size.memory_mib = u32::try_from(mib)
                .unwrap_or(MAX_MEMORY_MIB)
                .clamp(MIN_MEMORY_MIB, MAX_MEMORY_MIB);
        }
        for (key, value) in annotations {
            if !key.starts_with(ANNOTATION_PREFIX) {
                continue;
            }
            let bad = |reason: &str| ConfigError::Annotation {
                key: key.clone(),
                value: value.clone(),
                reason: reason.into(),
            };
            match key.as_str() {
                ANNOTATION_VCPUS => {
                    size.vcpus = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_VCPUS).contains(n))
                        .ok_or_else(|| bad("must be a number of vCPUs, 1 to 32"))?;
                }
                ANNOTATION_MEMORY => {
                    size.memory_mib = parse_size_mib(value).map_err(|e| bad(&e))?;
                }
                // Read by `disk_for`.
                ANNOTATION_DISK => {}
                _ => {
                    return Err(bad(&format!(
                        "unknown capsid annotation (known: {ANNOTATION_VCPUS}, {ANNOTATION_MEMORY}, {ANNOTATION_DISK})"
                    )));
                }
            }
        }
        Ok(size)
    }
}

impl Config {
    /// The size of the scratch disk a container's writable layer goes on
    /// (the `io.capsid.disk` annotation), if it asks for one.
    pub fn disk_for(&self, spec: &Spec) -> Result<Option<u64>, ConfigError> {
        let Some(value) = spec
            .annotations()
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_DISK))
        else {
            return Ok(None);
        };
        let bad = |reason: &str| ConfigError::Annotation {
            key: ANNOTATION_DISK.into(),
            value: value.clone(),
            reason: reason.into(),
        };
        capsid_base::parse_size(value, capsid_base::BareUnit::Mib)
            .filter(|&bytes| (8 << 20..=self.max_disk_gib.saturating_mul(1 << 30)).contains(&bytes))
            .map(Some)
            .ok_or_else(|| {
                bad(&format!(
                    "must be a size from 8M to {}G (the configuration's max_disk_gib), like 10G",
                    self.max_disk_gib
                ))
            })
    }
}

/// Parses a memory size like `512M`, `1G`, `2GiB` or `256` (MiB) into MiB,
/// within [`MIN_MEMORY_MIB`]..=[`MAX_MEMORY_MIB`].
pub fn parse_size_mib(text: &str) -> Result<u32, String> {
    let text = text.trim();
    let bytes = capsid_base::parse_size(text, capsid_base::BareUnit::Mib)
        .ok_or_else(|| format!("{text:?} is not a size like 512M or 1G (K, M or G)"))?;
    u32::try_from(bytes >> 20)
        .ok()
        .filter(|m| (MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(m))
        .ok_or_else(|| format!("{text:?}: memory must be between 32M and 64G"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Spec {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn sizes_parse_or_say_why() {
        assert_eq!(parse_size_mib("512M"), Ok(512));
        assert_eq!(parse_size_mib("1G"), Ok(1024));
        assert_eq!(parse_size_mib("256"), Ok(256));
        assert_eq!(parse_size_mib("2GiB"), Ok(2048));
        assert!(parse_size_mib("8M").unwrap_err().contains("between"));
        assert!(parse_size_mib("1T").unwrap_err().contains("K, M or G"));
        assert!(parse_size_mib("99999999999999999G").is_err());
    }

    #[test]
    fn the_file_overrides_defaults_and_names_a_bad_key() {
        let path = Path::new("/etc/capsid/config.toml");
        let config = Config::parse(path, "vcpus = 2\nmemory_mib = 512\n").unwrap();
        assert_eq!((config.vcpus, config.memory_mib), (2, 512));
        assert_eq!(config.overhead_mib, Config::default().overhead_mib);
        let unknown = Config::parse(path, "vpcus = 2\n").unwrap_err().to_string();
        assert!(unknown.contains("vpcus"), "{unknown}");
        let range = Config::parse(path, "vcpus = 0\n").unwrap_err().to_string();
        assert!(range.contains("vcpus = 0"), "{range}");
        let level = Config::parse(path, "log_level = \"loud\"\n")
            .unwrap_err()
            .to_string();
        assert!(level.contains("log_level = loud"), "{level}");
        let kind = Config::parse(path, "memory_mib = \"lots\"\n")
            .unwrap_err()
            .to_string();
        assert!(kind.contains("config.toml"), "{kind}");
        let pods = Config::parse(path, "pod_containers = 40\n")
            .unwrap_err()
            .to_string();
        assert!(pods.contains("pod_containers = 40"), "{pods}");
        let params = Config::parse(path, "kernel_params = \"a\\nb\"\n")
            .unwrap_err()
            .to_string();
        assert!(params.contains("printable"), "{params}");
        let retries = Config::parse(path, "boot_retries = 9\n")
            .unwrap_err()
            .to_string();
        assert!(retries.contains("boot_retries = 9"), "{retries}");
    }

    #[test]
    fn boot_files_must_exist_and_the_error_says_where_to_set_them() {
        let config = Config {
            kernel: "/nonexistent/vmlinux".into(),
            vmm: "/bin/sh".into(),
            ..Config::default()
        };
        let error = config.boot_files().unwrap_err().to_string();
        assert!(
            error.contains("/nonexistent/vmlinux") && error.contains("CAPSID_KERNEL"),
            "{error}"
        );
    }

    #[test]
    fn the_vm_is_sized_from_resources_then_annotations() {
        let config = Config::default();
        let plain = spec(r#"{"ociVersion":"1.0.2"}"#);
        assert_eq!(
            config.size_for(&plain).unwrap(),
            VmSize {
                vcpus: 1,
                memory_mib: 256
            }
        );
        let limited = spec(
            r#"{"ociVersion":"1.0.2","linux":{"resources":{
                "cpu":{"quota":150000,"period":100000},
                "memory":{"limit":134217728}}}}"#,
        );
        assert_eq!(
            config.size_for(&limited).unwrap(),
            VmSize {
                vcpus: 2,
                memory_mib: 128 + 64
            }
        );
        let pod = spec(
            r#"{"ociVersion":"1.0.2","annotations":{
                "io.kubernetes.cri.sandbox-cpu-quota":"250000",
                "io.kubernetes.cri.sandbox-cpu-period":"100000",
                "io.kubernetes.cri.sandbox-memory":"536870912"}}"#,
        );
        assert_eq!(
            config.size_for(&pod).unwrap(),
            VmSize {
                vcpus: 3,
                memory_mib: 512 + 64
            }
        );
        let annotated = spec(
            r#"{"ociVersion":"1.0.2","annotations":{
                "io.capsid.vcpus":"4","io.capsid.memory":"1G","other.key":"x"}}"#,
        );
        assert_eq!(
            config.size_for(&annotated).unwrap(),
            VmSize {
                vcpus: 4,
                memory_mib: 1024
            }
        );
        let disk = spec(r#"{"ociVersion":"1.0.2","annotations":{"io.capsid.disk":"10G"}}"#);
        assert_eq!(config.disk_for(&disk).unwrap(), Some(10 << 30));
        assert!(config.size_for(&disk).is_ok(), "a known annotation");
        assert_eq!(
            config.disk_for(&spec(r#"{"ociVersion":"1.0.2"}"#)).unwrap(),
            None
        );
        for bad in ["lots", "1K", "5T", "0", "17G"] {
            let json =
                format!(r#"{{"ociVersion":"1.0.2","annotations":{{"io.capsid.disk":"{bad}"}}}}"#);
            assert!(config.disk_for(&spec(&json)).is_err(), "{bad}");
        }
        let bad = spec(r#"{"ociVersion":"1.0.2","annotations":{"io.capsid.vcpus":"lots"}}"#);
        let error = config.size_for(&bad).unwrap_err().to_string();
        assert!(
            error.contains("io.capsid.vcpus") && error.contains("lots"),
            "{error}"
        );
        let unknown = spec(r#"{"ociVersion":"1.0.2","annotations":{"io.capsid.kernel":"/x"}}"#);
        let error = config.size_for(&unknown).unwrap_err().to_string();
        assert!(error.contains("unknown capsid annotation"), "{error}");
    }
}
