//! What the `capsid` CLI and `containerd-shim-capsid-v2` share: the
//! configuration ([`config`]), the bundle's spec for the guest ([`spec`]),
//! the sandbox lifecycle ([`sandbox`], [`container`]) over a guest agent
//! ([`agent`]) and a micro-VM ([`vm`]), what confines its VMM
//! ([`confine`]), and the taps its network devices serve ([`tap`]).

#![warn(missing_docs)]

pub mod agent;
pub mod config;
pub mod confine;
pub mod container;
#[cfg(any(test, feature = "fake"))]
pub mod fake;
pub mod hooks;
pub mod nat;
pub mod network;
pub mod sandbox;
pub mod scratch;
pub mod seccomp_profile;
pub mod spec;
pub mod tap;
pub mod template;
pub mod vm;

/// Rootfs and OCI images, for the runtime's callers.
pub use capsid_images as images;
/// The host↔agent protocol, for the runtime's callers (they reach the
/// agent only through the runtime).
pub use capsid_protocol as protocol;
/// The VMM's configuration, API and exit statuses.
pub use capsid_vmm_api as vmm_api;

pub use agent::Agent;
pub use config::{BootFiles, Config, ConfigError, VmSize};
pub use container::{Container, Exit, ProcState, Process, ProcessIo};
pub use sandbox::{BootRequest, ContainerRequest, Role, Sandbox, SandboxError, Teardown};
pub use vm::{
    BootPolicy, Disk, DiskFile, MicroVm, MicroVmError, VmSpec, boot_retries, rootfs_disk,
};
