//! What a VM is made of: the configuration `capsid-vmm` takes as
//! `--config FILE` (JSON) or as flags (the same names), and the runtime
//! writes. `capsid-vmm` checks it against its machine's limits before it
//! touches KVM.
//!
//! ```json
//! { "kernel": "/var/cache/capsid/kernel/…/vmlinux", "initrd": "initramfs.cpio",
//!   "cmdline": "console=ttyS0 reboot=k panic=-1 quiet", "vcpus": 2, "mem_mib": 256,
//!   "disks": [ { "path": "rootfs.erofs", "read_only": true, "id": "rootfs" } ],
//!   "vsock": { "uds": "/run/capsid/vm1.vsock", "cid": 3 },
//!   "serial": "file:/run/capsid/vm1.console", "spare_disks": 0,
//!   "nets": [ { "tap_fd": 3, "mac": "02:00:0a:58:00:05", "mtu": 1500 } ] }
//! ```

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::DEFAULT_CMDLINE;

/// vCPUs when none are given.
pub const DEFAULT_VCPUS: u8 = 1;
/// Guest RAM in MiB when none is given.
pub const DEFAULT_MEM_MIB: u32 = 128;
/// The guest CID when none is given (0-2 are reserved by vsock).
pub const DEFAULT_CID: u32 = 3;
/// The longest disk id (a virtio-blk serial).
pub const MAX_DISK_ID: usize = 20;

/// A flag's text that does not parse, and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyntaxError {
    /// A `--disk` value, and what is wrong with it.
    Disk(String, &'static str),
    /// A `--serial` value.
    Serial(String),
    /// An `--irqchip` value.
    Irqchip(String),
    /// A `--net` value, and what is wrong with it.
    Net(String, &'static str),
    /// A MAC address.
    Mac(String),
}

impl fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Disk(text, why) => {
                write!(
                    f,
                    "invalid --disk {text:?}: {why} (expected PATH[,ro][,id=ID])"
                )
            }
            Self::Serial(text) => {
                write!(
                    f,
                    "invalid --serial {text:?}: expected stdout, none or file:PATH"
                )
            }
            Self::Irqchip(text) => {
                write!(f, "invalid --irqchip {text:?}: expected kernel or split")
            }
            Self::Net(text, why) => {
                write!(
                    f,
                    "invalid --net {text:?}: {why} (expected fd=N,mac=XX:XX:XX:XX:XX:XX[,mtu=N])"
                )
            }
            Self::Mac(text) => {
                write!(
                    f,
                    "invalid MAC address {text:?}: expected six hex bytes, as 02:00:00:00:00:01"
                )
            }
        }
    }
}

impl std::error::Error for SyntaxError {}

/// Where the guest's serial console goes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum SerialConfig {
    /// The VMM's stdout.
    #[default]
    Stdout,
    /// A file, kept within 1 MiB.
    File(PathBuf),
    /// Nowhere.
    None,
}

/// Where the interrupt controllers live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Irqchip {
    /// The default: all in KVM: PIC, IOAPIC, PIT and the LAPICs
    /// (Firecracker's choice).
    #[default]
    Kernel,
    /// The LAPICs in KVM, the IOAPIC in the VMM, no PIC and no PIT (Cloud
    /// Hypervisor's choice): the guest times with the TSC-deadline LAPIC
    /// timer and kvm-clock, never runs the kernel's PIT and IO-APIC timer
    /// checks, and every device interrupt is an MSI that KVM injects at
    /// once (an IOAPIC pin in KVM is injected from a kernel worker thread).
    /// docs/reliability.md says why it is not the default.
    Split,
}

impl FromStr for Irqchip {
    type Err = SyntaxError;

    fn from_str(s: &str) -> Result<Self, SyntaxError> {
        match s {
            "kernel" => Ok(Self::Kernel),
            "split" => Ok(Self::Split),
            _ => Err(SyntaxError::Irqchip(s.to_owned())),
        }
    }
}

impl FromStr for SerialConfig {
    type Err = SyntaxError;

    fn from_str(s: &str) -> Result<Self, SyntaxError> {
        match s {
            "stdout" => Ok(Self::Stdout),
            "none" => Ok(Self::None),
            _ => match s.strip_prefix("file:") {
                Some(path) if !path.is_empty() => Ok(Self::File(path.into())),
                _ => Err(SyntaxError::Serial(s.to_owned())),
            },
        }
    }
}

impl TryFrom<String> for SerialConfig {
    type Error = SyntaxError;

    fn try_from(s: String) -> Result<Self, SyntaxError> {
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
    /// The image, a raw file (the VMM opens it before it is confined).
    pub path: PathBuf,
    /// The guest cannot write it.
    #[serde(default)]
    pub read_only: bool,
    /// The serial the guest reads with VIRTIO_BLK_T_GET_ID (at most 20 bytes).
    #[serde(default)]
    pub id: Option<String>,
}

/// What a disk's path starts with when the image is a descriptor the
/// launcher passed (a file with no name): the number follows.
pub const INHERITED_FD: &str = "/proc/self/fd/";

impl DiskConfig {
    /// The descriptor the launcher passed for this disk, if its path names
    /// one ([`INHERITED_FD`]); kept open when the VMM closes what it
    /// inherited.
    pub fn inherited_fd(&self) -> Option<i32> {
        let fd = self.path.to_str()?.strip_prefix(INHERITED_FD)?;
        fd.parse().ok().filter(|fd| *fd > 2)
    }
}

impl FromStr for DiskConfig {
    type Err = SyntaxError;

    /// `PATH[,ro][,id=ID]`
    fn from_str(s: &str) -> Result<Self, SyntaxError> {
        let mut parts = s.split(',');
        let path = parts.next().filter(|p| !p.is_empty());
        let path = path.ok_or(SyntaxError::Disk(s.to_owned(), "no path"))?;
        let mut disk = DiskConfig {
            path: path.into(),
            read_only: false,
            id: None,
        };
        for part in parts {
            match part.split_once('=') {
                None if part == "ro" => disk.read_only = true,
                None if part == "rw" => disk.read_only = false,
                Some(("id", id)) if id.len() <= MAX_DISK_ID => disk.id = Some(id.to_owned()),
                Some(("id", _)) => {
                    return Err(SyntaxError::Disk(
                        s.to_owned(),
                        "id is longer than 20 bytes",
                    ));
                }
                _ => return Err(SyntaxError::Disk(s.to_owned(), "unknown option")),
            }
        }
        Ok(disk)
    }
}

/// An Ethernet MAC address, written `02:00:00:00:00:01`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A multicast (or broadcast) address, which no interface may have.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 != 0
    }
}

impl FromStr for MacAddr {
    type Err = SyntaxError;

    fn from_str(s: &str) -> Result<Self, SyntaxError> {
        let bad = || SyntaxError::Mac(s.to_owned());
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut mac {
            let part = parts.next().filter(|p| p.len() == 2).ok_or_else(bad)?;
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        match parts.next() {
            None => Ok(Self(mac)),
            Some(_) => Err(bad()),
        }
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl TryFrom<String> for MacAddr {
    type Error = SyntaxError;

    fn try_from(s: String) -> Result<Self, SyntaxError> {
        s.parse()
    }
}

impl From<MacAddr> for String {
    fn from(mac: MacAddr) -> String {
        mac.to_string()
    }
}

/// A virtio-net device whose other end is a tap the launcher opened and
/// passed down (the VMM opens no network device itself, and runs in a
/// network namespace of its own).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The tap's descriptor in the VMM, inherited from its launcher: a tap
    /// opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`.
    pub tap_fd: i32,
    /// The guest's MAC address.
    pub mac: MacAddr,
    /// The MTU the guest is told (`VIRTIO_NET_F_MTU`); none leaves it to
    /// the guest (1500).
    #[serde(default)]
    pub mtu: Option<u16>,
}

impl FromStr for NetConfig {
    type Err = SyntaxError;

    /// `fd=N,mac=XX:XX:XX:XX:XX:XX[,mtu=N]`
    fn from_str(s: &str) -> Result<Self, SyntaxError> {
        let bad = |why| SyntaxError::Net(s.to_owned(), why);
        let (mut fd, mut mac, mut mtu) = (None, None, None);
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("fd", n)) => fd = Some(n.parse().map_err(|_| bad("fd is not a number"))?),
                Some(("mac", m)) => mac = Some(m.parse()?),
                Some(("mtu", n)) => {
                    mtu = Some(
                        n.parse()
                            .map_err(|_| bad("mtu is not a number up to 65535"))?,
                    )
                }
                _ => return Err(bad("unknown option")),
            }
        }
        Ok(NetConfig {
            tap_fd: fd.ok_or_else(|| bad("no fd"))?,
            mac: mac.ok_or_else(|| bad("no mac"))?,
            mtu,
        })
    }
}

/// virtio-vsock with its host side on a Unix socket (hybrid vsock).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The socket the host connects to (`CONNECT <port>`); guest
    /// connections to host port P go to `<uds>_P`.
    pub uds: PathBuf,
    /// The guest's context id.
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
    /// Empty in a file that leaves it to the command line; checked by the VMM's
    /// `Validate`.
    #[serde(default)]
    pub kernel: PathBuf,
    /// The initramfs loaded next to the kernel.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// The kernel command line ([`DEFAULT_CMDLINE`] when none is given).
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    /// vCPUs, 1 to 32.
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Guest RAM in MiB.
    #[serde(default = "default_mem_mib")]
    pub mem_mib: u32,
    /// virtio-blk disks, `/dev/vda` first.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// virtio-vsock, when the VM has it.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// Where the guest's serial console goes.
    #[serde(default)]
    pub serial: SerialConfig,
    /// Empty read-only disk slots after `disks`, for images attached later
    /// through the API socket.
    #[serde(default)]
    pub spare_disks: u8,
    /// The API socket ([`crate::ApiRequest`]); needed for `spare_disks`.
    #[serde(default)]
    pub api_uds: Option<PathBuf>,
    /// Where the interrupt controllers live.
    #[serde(default)]
    pub irqchip: Irqchip,
    /// virtio-net devices, `eth0` first.
    #[serde(default)]
    pub nets: Vec<NetConfig>,
    /// A snapshot directory to restore instead of booting `kernel`: the VM
    /// carries on where the snapshot left it, with the snapshot's vCPUs and
    /// memory; its images come through spare slots.
    #[serde(default)]
    pub restore: Option<PathBuf>,
}

impl VmConfig {
    /// How many virtio devices this VM has.
    pub fn virtio_devices(&self) -> usize {
        self.disks.len()
            + usize::from(self.spare_disks)
            + usize::from(self.vsock.is_some())
            + self.nets.len()
    }
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
            irqchip: Irqchip::Kernel,
            nets: Vec::new(),
            restore: None,
        }
    }
}
