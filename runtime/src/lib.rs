//! What the `capsid` CLI and `containerd-shim-capsid-v2` share: the
//! configuration ([`config`]), the bundle's spec for the guest ([`spec`]),
//! a micro-VM with its agent ([`vm`]), and what confines its VMM
//! ([`confine`]).

pub mod config;
pub mod confine;
pub mod scratch;
pub mod seccomp_profile;
pub mod spec;
pub mod vm;

pub use config::{BootFiles, Config, ConfigError, VmSize};
pub use vm::{BootPolicy, Disk, MicroVm, VmError, VmSpec, boot_retries, rootfs_disk};
