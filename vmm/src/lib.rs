//! capsid-vmm: the micro-VM monitor.
//!
//! One process runs one VM. [`builder::build`] assembles it in boot order
//! (guest memory, VM and irqchip, vCPUs, devices, kernel, boot parameters) and
//! [`vmm::Vmm::run`] runs it until the guest resets, crashes, or the process is
//! signalled. The guest is hostile: everything that reads guest memory does so
//! through checked `vm-memory` accessors, and every device validates what the
//! guest hands it before acting on it.
//!
//! What `main.rs`, `tests/` and the fuzz targets use is public and
//! documented; the rest is `pub(crate)`.

#![warn(missing_docs)]

pub mod api;
pub mod arch;
pub mod builder;
pub mod config;
pub mod devices;
pub mod exit;
pub mod jail;
pub mod logging;
pub mod memory;
pub mod probe;
pub mod seccomp;
pub mod snapshot;
pub mod vmm;
pub mod vstate;

pub use builder::{BuildError, build};
pub use config::{ConfigError, DiskConfig, SerialConfig, VmConfig, VsockConfig};
pub use vmm::{ExitReason, Vmm};
