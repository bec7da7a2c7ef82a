//! Reading and checking a VM's configuration ([`VmConfig`], defined in
//! `capsid-vmm-api` so the runtime writes the same type the VMM reads):
//! everything that can be checked before touching KVM, so that a bad
//! configuration fails at once and leaves nothing behind.

use std::path::{Path, PathBuf};

pub use capsid_vmm_api::DEFAULT_CMDLINE;
pub use capsid_vmm_api::config::{
    DEFAULT_CID, DEFAULT_MEM_MIB, DEFAULT_VCPUS, DiskConfig, Irqchip, MacAddr, NetConfig,
    SerialConfig, SyntaxError, VmConfig, VsockConfig,
};

use crate::arch::layout::{IOAPIC_PINS, MAX_VCPUS, VIRTIO_IRQ_BASE};

/// Smallest and largest guest RAM accepted.
pub const MIN_MEM_MIB: u32 = 16;
pub(crate) const MAX_MEM_MIB: u32 = 1 << 20;
/// One interrupt pin each, above the legacy devices'.
pub(crate) const MAX_VIRTIO_DEVICES: usize = (IOAPIC_PINS - VIRTIO_IRQ_BASE) as usize;

/// A configuration the VMM cannot run, and what to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file cannot be read.
    #[error("cannot read config file {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The config file is not valid JSON for a `VmConfig`.
    #[error("config file {0} is not valid")]
    Parse(PathBuf, #[source] serde_json::Error),
    /// No kernel was given.
    #[error("no kernel given: pass --kernel PATH (a vmlinux or bzImage)")]
    NoKernel,
    /// A restore asks for something a restored VM cannot have.
    #[error("{0}")]
    Restore(&'static str),
    /// A file the VM needs is missing or unreadable.
    #[error("{what} {path} does not exist or cannot be read: {source}")]
    Missing {
        /// What it is (kernel, initrd, disk …).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why it cannot be opened.
        #[source]
        source: std::io::Error,
    },
    /// The vCPU count is out of range.
    #[error("vcpus = {0}: give 1 to {MAX_VCPUS}")]
    Vcpus(u8),
    /// The memory size is out of range.
    #[error("mem_mib = {0}: give {MIN_MEM_MIB} to {MAX_MEM_MIB}")]
    Memory(u32),
    /// The vsock CID is reserved.
    #[error("vsock cid = {0}: give 3 or more (0-2 are reserved)")]
    Cid(u32),
    /// A socket path is taken.
    #[error("socket {0} already exists: remove it or choose another path")]
    SocketExists(PathBuf),
    /// A socket's directory is missing.
    #[error("socket directory {0} does not exist")]
    SocketDir(PathBuf),
    /// Spare disk slots without an API socket to fill them.
    #[error("spare_disks = {0} needs an API socket to attach images through: give --api-uds PATH")]
    SpareWithoutApi(u8),
    /// More virtio devices than interrupt pins.
    #[error("too many devices: {0} virtio devices, at most {max}", max = IOAPIC_PINS - VIRTIO_IRQ_BASE)]
    TooManyDevices(usize),
    /// A network device's tap descriptor is not one the VMM inherited.
    #[error(
        "net tap_fd = {0}: pass a tap opened by the launcher, inherited as descriptor 3 or above"
    )]
    TapFd(i32),
    /// Two network devices name the same tap descriptor.
    #[error("net tap_fd = {0} is given twice: each network device needs a tap of its own")]
    TapFdTwice(i32),
    /// A network device's MAC address cannot be an interface's.
    #[error(
        "net mac = {0}: give a unicast address other than 00:00:00:00:00:00 (the first byte even, as 02:…)"
    )]
    Mac(MacAddr),
    /// A network device's MTU is out of range.
    #[error("net mtu = {0}: give {MIN_MTU} to {MAX_MTU}")]
    Mtu(u16),
    /// The command line is malformed.
    #[error(transparent)]
    Syntax(#[from] SyntaxError),
}

/// The smallest MTU an IPv4 interface takes, and the largest frame
/// payload virtio-net carries here (64 KiB less the Ethernet header).
pub const MIN_MTU: u16 = 68;
/// See [`MIN_MTU`].
pub const MAX_MTU: u16 = 65535 - 14;

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

/// Reads a JSON configuration file.
pub fn from_file(path: &Path) -> Result<VmConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_owned(), e))?;
    serde_json::from_str(&text).map_err(|e| ConfigError::Parse(path.to_owned(), e))
}

/// What the VMM checks of a configuration before it touches KVM.
pub trait Validate {
    /// Checks everything that can be checked before touching KVM, so that a
    /// bad configuration fails at once and leaves nothing behind.
    fn validate(&self) -> Result<(), ConfigError>;
}

impl Validate for VmConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        match &self.restore {
            None => {
                if self.kernel.as_os_str().is_empty() {
                    return Err(ConfigError::NoKernel);
                }
                readable("kernel", &self.kernel)?;
                if let Some(initrd) = &self.initrd {
                    readable("initrd", initrd)?;
                }
            }
            Some(_) if !self.disks.is_empty() => {
                return Err(ConfigError::Restore(
                    "a restored VM takes its images through spare slots (--spare-disks), not --disk",
                ));
            }
            Some(_) if !self.nets.is_empty() => {
                return Err(ConfigError::Restore(
                    "a restored VM cannot have network devices yet: boot it instead",
                ));
            }
            Some(_) if self.irqchip != Irqchip::Kernel => {
                return Err(ConfigError::Restore(
                    "snapshots are of VMs with the kernel irqchip: leave out --irqchip split",
                ));
            }
            Some(_) => {}
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
        for (i, net) in self.nets.iter().enumerate() {
            if net.tap_fd < 3 {
                return Err(ConfigError::TapFd(net.tap_fd));
            }
            if self.nets[..i].iter().any(|n| n.tap_fd == net.tap_fd) {
                return Err(ConfigError::TapFdTwice(net.tap_fd));
            }
            if net.mac.is_multicast() || net.mac.0 == [0; 6] {
                return Err(ConfigError::Mac(net.mac));
            }
            if let Some(mtu) = net.mtu.filter(|m| !(MIN_MTU..=MAX_MTU).contains(m)) {
                return Err(ConfigError::Mtu(mtu));
            }
        }
        let max = MAX_VIRTIO_DEVICES;
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
    fn only_a_descriptor_above_stdio_is_an_inherited_disk() {
        let fd = |path: &str| path.parse::<DiskConfig>().unwrap().inherited_fd();
        assert_eq!(fd("/proc/self/fd/4"), Some(4));
        assert_eq!(fd("/proc/self/fd/4,ro,id=scratch"), Some(4));
        for path in [
            "/proc/self/fd/2",
            "/proc/self/fd/x",
            "/proc/self/fd/",
            "/proc/self/fd/-3",
            "/img/root.erofs",
            "/proc/1/fd/4",
        ] {
            assert_eq!(fd(path), None, "{path}");
        }
    }

    #[test]
    fn disks_parse_with_their_flags() {
        let disk: DiskConfig = "/img/root.erofs,ro,id=root".parse().unwrap();
        assert_eq!(disk.path, PathBuf::from("/img/root.erofs"));
        assert!(disk.read_only);
        assert_eq!(disk.id.as_deref(), Some("root"));
        assert!(!"/a".parse::<DiskConfig>().unwrap().read_only);
        assert!(matches!(
            "".parse::<DiskConfig>(),
            Err(SyntaxError::Disk(..))
        ));
        assert!(matches!(
            "/a,rx".parse::<DiskConfig>(),
            Err(SyntaxError::Disk(..))
        ));
        let long = format!("/a,id={}", "x".repeat(21));
        assert!(long.parse::<DiskConfig>().is_err());
    }

    #[test]
    fn nets_parse_and_a_bad_one_is_named() {
        let net: NetConfig = "fd=5,mac=02:00:0a:58:00:05,mtu=1450".parse().unwrap();
        assert_eq!(net.tap_fd, 5);
        assert_eq!(net.mac, MacAddr([2, 0, 0x0a, 0x58, 0, 5]));
        assert_eq!(net.mac.to_string(), "02:00:0a:58:00:05");
        assert_eq!(net.mtu, Some(1450));
        for (text, why) in [
            ("mac=02:00:00:00:00:01", "no fd"),
            ("fd=3", "no mac"),
            ("fd=x,mac=02:00:00:00:00:01", "fd is not a number"),
            (
                "fd=3,mac=02:00:00:00:00:01,mtu=70000",
                "mtu is not a number",
            ),
            ("fd=3,mac=02:00:00:00:00:01,tap=eth0", "unknown option"),
        ] {
            let e = text.parse::<NetConfig>().unwrap_err().to_string();
            assert!(
                e.contains(why) && e.contains("expected fd=N"),
                "{text}: {e}"
            );
        }
        for mac in [
            "02:00:00:00:00",
            "02:00:00:00:00:01:02",
            "2:00:00:00:00:01",
            "0g:00:00:00:00:01",
        ] {
            let e = format!("fd=3,mac={mac}").parse::<NetConfig>().unwrap_err();
            assert_eq!(e, SyntaxError::Mac(mac.to_owned()));
        }
        let config: VmConfig = serde_json::from_str(
            r#"{"kernel": "/k", "nets": [{"tap_fd": 3, "mac": "02:00:00:00:00:01"}]}"#,
        )
        .unwrap();
        assert_eq!(config.nets[0].mtu, None);
        assert_eq!(config.virtio_devices(), 1);
    }

    #[test]
    fn a_net_with_a_bad_fd_mac_or_mtu_is_refused_before_kvm() {
        let kernel = tempfile::NamedTempFile::new().unwrap();
        let net = |text: &str| text.parse::<NetConfig>().unwrap();
        let with = |nets: Vec<NetConfig>| VmConfig {
            kernel: kernel.path().to_owned(),
            nets,
            ..VmConfig::default()
        };
        assert!(
            with(vec![net("fd=3,mac=02:00:00:00:00:01,mtu=9000")])
                .validate()
                .is_ok()
        );
        for (nets, want) in [
            (vec![net("fd=2,mac=02:00:00:00:00:01")], "tap_fd = 2"),
            (
                vec![
                    net("fd=3,mac=02:00:00:00:00:01"),
                    net("fd=3,mac=02:00:00:00:00:02"),
                ],
                "given twice",
            ),
            (vec![net("fd=3,mac=01:00:5e:00:00:01")], "unicast"),
            (vec![net("fd=3,mac=00:00:00:00:00:00")], "unicast"),
            (vec![net("fd=3,mac=02:00:00:00:00:01,mtu=60")], "mtu = 60"),
        ] {
            let e = with(nets).validate().unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
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
    fn the_irqchip_is_the_kernels_unless_split_is_asked_for() {
        assert_eq!("kernel".parse::<Irqchip>().unwrap(), Irqchip::Kernel);
        assert_eq!("split".parse::<Irqchip>().unwrap(), Irqchip::Split);
        let bad = "userspace".parse::<Irqchip>().unwrap_err();
        assert!(
            bad.to_string().contains("expected kernel or split"),
            "{bad}"
        );
        let config: VmConfig = serde_json::from_str(r#"{"kernel": "/k"}"#).unwrap();
        assert_eq!(config.irqchip, Irqchip::Kernel);
        assert_eq!(VmConfig::default().irqchip, Irqchip::Kernel);
        let config: VmConfig =
            serde_json::from_str(r#"{"kernel": "/k", "irqchip": "split"}"#).unwrap();
        assert_eq!(config.irqchip, Irqchip::Split);
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
