//! What a VM is made of: the one configuration type behind both the command
//! line and `--config FILE` (JSON, the same field names), and its checks.
//!
//! ```json
//! { "kernel": "/var/cache/capsid/kernel/…/vmlinux", "initrd": "initramfs.cpio",
//!   "cmdline": "console=ttyS0 reboot=k panic=-1 quiet", "vcpus": 2, "mem_mib": 256,
//!   "disks": [ { "path": "rootfs.erofs", "read_only": true } ],
//!   "vsock": { "uds": "/run/capsid/vm1.vsock", "cid": 3 },
//!   "serial": "file:/run/capsid/vm1.console" }
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::arch::layout::{IOAPIC_PINS, MAX_VCPUS, VIRTIO_IRQ_BASE};

/// The command line used when none is given: console on the serial port,
/// a reboot ends the VMM (`reboot=k` pulls the i8042 reset line), a panic
/// reboots at once, and the console stays quiet (it is slow to emulate).
pub use capsid_vmm_api::DEFAULT_CMDLINE;
pub const DEFAULT_VCPUS: u8 = 1;
pub const DEFAULT_MEM_MIB: u32 = 128;
/// Smallest and largest guest RAM accepted.
pub const MIN_MEM_MIB: u32 = 16;
pub const MAX_MEM_MIB: u32 = 1 << 20;
/// The guest CID when none is given (0-2 are reserved by vsock).
pub const DEFAULT_CID: u32 = 3;

/// A configuration the VMM cannot run, and what to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("config file {0} is not valid")]
    Parse(PathBuf, #[source] serde_json::Error),
    #[error("no kernel given: pass --kernel PATH (a vmlinux or bzImage)")]
    NoKernel,
    #[error("{what} {path} does not exist or cannot be read: {source}")]
    Missing {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("vcpus = {0}: give 1 to {MAX_VCPUS}")]
    Vcpus(u8),
    #[error("mem_mib = {0}: give {MIN_MEM_MIB} to {MAX_MEM_MIB}")]
    Memory(u32),
    #[error("vsock cid = {0}: give 3 or more (0-2 are reserved)")]
    Cid(u32),
    #[error("socket {0} already exists: remove it or choose another path")]
    SocketExists(PathBuf),
    #[error("socket directory {0} does not exist")]
    SocketDir(PathBuf),
    #[error("spare_disks = {0} needs an API socket to attach images through: give --api-uds PATH")]
    SpareWithoutApi(u8),
    #[error("too many devices: {0} virtio devices, at most {max}", max = IOAPIC_PINS - VIRTIO_IRQ_BASE)]
    TooManyDevices(usize),
    #[error("invalid --disk {0:?}: {1} (expected PATH[,ro][,id=ID])")]
    Disk(String, &'static str),
    #[error("invalid --serial {0:?}: expected stdout, none or file:PATH")]
    Serial(String),
}

/// Where the guest's serial console goes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum SerialConfig {
    #[default]
    Stdout,
    File(PathBuf),
    None,
}

impl FromStr for SerialConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "stdout" => Ok(Self::Stdout),
            "none" => Ok(Self::None),
            _ => match s.strip_prefix("file:") {
                Some(path) if !path.is_empty() => Ok(Self::File(path.into())),
                _ => Err(ConfigError::Serial(s.to_owned())),
            },
        }
    }
}

impl TryFrom<String> for SerialConfig {
    type Error = ConfigError;

    fn try_from(s: String) -> Result<Self, ConfigError> {
        s.parse()
    }
}

impl From<SerialConfig> for String {
    fn from(serial: SerialConfig) -> String {
        serial.to_string()
    }
}

impl fmt::Display for SerialConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Stdout => f.write_str("stdout"),
            Self::None => f.write_str("none"),
            Self::File(path) => write!(f, "file:{}", path.display()),
        }
    }
}

/// A virtio-blk disk backed by a raw file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    /// The serial the guest reads with VIRTIO_BLK_T_GET_ID (at most 20 bytes).
    #[serde(default)]
    pub id: Option<String>,
}

impl FromStr for DiskConfig {
    type Err = ConfigError;

    /// `PATH[,ro][,id=ID]`
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let mut parts = s.split(',');
        let path = parts.next().filter(|p| !p.is_empty());
        let path = path.ok_or(ConfigError::Disk(s.to_owned(), "no path"))?;
        let mut disk = DiskConfig {
            path: path.into(),
            read_only: false,
            id: None,
        };
        for part in parts {
            match part.split_once('=') {
                None if part == "ro" => disk.read_only = true,
                None if part == "rw" => disk.read_only = false,
                Some(("id", id)) if id.len() <= 20 => disk.id = Some(id.to_owned()),
                Some(("id", _)) => {
                    return Err(ConfigError::Disk(
                        s.to_owned(),
                        "id is longer than 20 bytes",
                    ));
                }
                _ => return Err(ConfigError::Disk(s.to_owned(), "unknown option")),
            }
        }
        Ok(disk)
    }
}

/// virtio-vsock with its host side on a Unix socket (hybrid vsock).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The socket the host connects to (`CONNECT <port>`); guest
    /// connections to host port P go to `<uds>_P`.
    pub uds: PathBuf,
    #[serde(default = "default_cid")]
    pub cid: u32,
}

fn default_cid() -> u32 {
    DEFAULT_CID
}
fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_owned()
}
fn default_vcpus() -> u8 {
    DEFAULT_VCPUS
}
fn default_mem_mib() -> u32 {
    DEFAULT_MEM_MIB
}

/// Everything a VM is made of.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Empty in a file that leaves it to the command line; checked by [`VmConfig::validate`].
    #[serde(default)]
    pub kernel: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    #[serde(default = "default_mem_mib")]
    pub mem_mib: u32,
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    #[serde(default)]
    pub serial: SerialConfig,
    /// Empty read-only disk slots after `disks`, for images attached later
    /// through the API socket.
    #[serde(default)]
    pub spare_disks: u8,
    /// The API socket ([`crate::api`]); needed for `spare_disks`.
    #[serde(default)]
    pub api_uds: Option<PathBuf>,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            kernel: PathBuf::new(),
            initrd: None,
            cmdline: default_cmdline(),
            vcpus: DEFAULT_VCPUS,
            mem_mib: DEFAULT_MEM_MIB,
            disks: Vec::new(),
            vsock: None,
            serial: SerialConfig::Stdout,
            spare_disks: 0,
            api_uds: None,
        }
    }
}

fn readable(what: &'static str, path: &Path) -> Result<(), ConfigError> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|source| ConfigError::Missing {
            what,
            path: path.to_owned(),
            source,
        })
}

/// A socket is made at `path`: nothing may be there, its directory must.
fn socket_path_free(path: &Path) -> Result<(), ConfigError> {
    if path.symlink_metadata().is_ok() {
        return Err(ConfigError::SocketExists(path.to_owned()));
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir.filter(|d| !d.is_dir()) {
        return Err(ConfigError::SocketDir(dir.to_owned()));
    }
    Ok(())
}

impl VmConfig {
    /// Reads a JSON configuration file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_owned(), e))?;
        serde_json::from_str(&text).map_err(|e| ConfigError::Parse(path.to_owned(), e))
    }

    /// How many virtio devices this VM has.
    pub fn virtio_devices(&self) -> usize {
        self.disks.len() + usize::from(self.spare_disks) + usize::from(self.vsock.is_some())
    }

    /// Checks everything that can be checked before touching KVM, so that a
    /// bad configuration fails at once and leaves nothing behind.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.kernel.as_os_str().is_empty() {
            return Err(ConfigError::NoKernel);
        }
        readable("kernel", &self.kernel)?;
        if let Some(initrd) = &self.initrd {
            readable("initrd", initrd)?;
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_mib) {
            return Err(ConfigError::Memory(self.mem_mib));
        }
        for disk in &self.disks {
            readable("disk", &disk.path)?;
        }
        if self.spare_disks > 0 && self.api_uds.is_none() {
            return Err(ConfigError::SpareWithoutApi(self.spare_disks));
        }
        if let Some(api) = &self.api_uds {
            socket_path_free(api)?;
        }
        if let Some(vsock) = &self.vsock {
            if vsock.cid < 3 || vsock.cid == u32::MAX {
                return Err(ConfigError::Cid(vsock.cid));
            }
            socket_path_free(&vsock.uds)?;
            if self.api_uds.as_ref() == Some(&vsock.uds) {
                return Err(ConfigError::SocketExists(vsock.uds.clone()));
            }
        }
        let max = usize::try_from(IOAPIC_PINS - VIRTIO_IRQ_BASE).unwrap_or(0);
        if self.virtio_devices() > max {
            return Err(ConfigError::TooManyDevices(self.virtio_devices()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_parse_with_their_flags() {
        let disk: DiskConfig = "/img/root.erofs,ro,id=root".parse().unwrap();
        assert_eq!(disk.path, PathBuf::from("/img/root.erofs"));
        assert!(disk.read_only);
        assert_eq!(disk.id.as_deref(), Some("root"));
        assert!(!"/a".parse::<DiskConfig>().unwrap().read_only);
        assert!(matches!(
            "".parse::<DiskConfig>(),
            Err(ConfigError::Disk(..))
        ));
        assert!(matches!(
            "/a,rx".parse::<DiskConfig>(),
            Err(ConfigError::Disk(..))
        ));
        let long = format!("/a,id={}", "x".repeat(21));
        assert!(long.parse::<DiskConfig>().is_err());
    }

    #[test]
    fn serial_targets_round_trip() {
        for text in ["stdout", "none", "file:/tmp/console.log"] {
            let serial: SerialConfig = text.parse().unwrap();
            assert_eq!(serial.to_string(), text);
        }
        assert!("file:".parse::<SerialConfig>().is_err());
        assert!("tty".parse::<SerialConfig>().is_err());
    }

    #[test]
    fn a_config_file_uses_the_same_names_and_rejects_unknown_ones() {
        let config: VmConfig = serde_json::from_str(
            r#"{"kernel": "/k", "vcpus": 2, "disks": [{"path": "/d", "read_only": true}],
                "vsock": {"uds": "/tmp/v.sock"}, "serial": "none"}"#,
        )
        .unwrap();
        assert_eq!(config.vcpus, 2);
        assert_eq!(config.mem_mib, DEFAULT_MEM_MIB);
        assert_eq!(config.vsock.unwrap().cid, DEFAULT_CID);
        assert_eq!(config.serial, SerialConfig::None);
        assert!(serde_json::from_str::<VmConfig>(r#"{"kernel": "/k", "memory": 5}"#).is_err());
    }

    #[test]
    fn validation_names_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, b"x").unwrap();
        let ok = VmConfig {
            kernel: kernel.clone(),
            ..VmConfig::default()
        };
        ok.validate().unwrap();
        assert!(matches!(
            VmConfig::default().validate(),
            Err(ConfigError::NoKernel)
        ));
        let missing = VmConfig {
            kernel: dir.path().join("nope"),
            ..VmConfig::default()
        };
        let err = missing.validate().unwrap_err().to_string();
        assert!(err.contains("kernel") && err.contains("nope"), "{err}");
        let bad = |config: VmConfig| config.validate().unwrap_err();
        assert!(matches!(
            bad(VmConfig {
                vcpus: 0,
                ..ok.clone()
            }),
            ConfigError::Vcpus(0)
        ));
        assert!(matches!(
            bad(VmConfig {
                mem_mib: 1,
                ..ok.clone()
            }),
            ConfigError::Memory(1)
        ));
        let vsock = |uds: PathBuf, cid| Some(VsockConfig { uds, cid });
        let taken = VmConfig {
            vsock: vsock(kernel.clone(), 3),
            ..ok.clone()
        };
        assert!(matches!(bad(taken), ConfigError::SocketExists(_)));
        let reserved = VmConfig {
            vsock: vsock(dir.path().join("v"), 2),
            ..ok.clone()
        };
        assert!(matches!(bad(reserved), ConfigError::Cid(2)));
        let disk = DiskConfig {
            path: kernel.clone(),
            read_only: true,
            id: None,
        };
        let disks = vec![disk; 20];
        assert!(matches!(
            bad(VmConfig {
                disks,
                ..ok.clone()
            }),
            ConfigError::TooManyDevices(20)
        ));
        assert!(matches!(
            bad(VmConfig {
                spare_disks: 2,
                ..ok.clone()
            }),
            ConfigError::SpareWithoutApi(2)
        ));
        assert!(matches!(
            bad(VmConfig {
                spare_disks: 30,
                api_uds: Some(dir.path().join("api")),
                ..ok.clone()
            }),
            ConfigError::TooManyDevices(30)
        ));
        let same = VmConfig {
            vsock: vsock(dir.path().join("s"), 3),
            api_uds: Some(dir.path().join("s")),
            ..ok
        };
        assert!(matches!(bad(same), ConfigError::SocketExists(_)));
    }
}
