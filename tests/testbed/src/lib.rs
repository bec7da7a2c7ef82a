//! capsid's test bed: the machinery that lets the end-to-end tests, the
//! soak and the benchmark boot real guests on any x86_64 Linux machine.
//!
//! - [`probe`] (asking `capsid-vmm --probe`) decides the mode: *native* when
//!   this machine's `/dev/kvm` runs guests on the CPU, *nested* otherwise.
//! - [`nested`] boots the nested test host (QEMU TCG + Debian's cloud kernel
//!   with `kvm-amd`) and runs a command inside it, reporting its output and
//!   exit code back; the `capsid-testbed` binary wraps both.
//! - What runs there: [`artifacts`] (what the scripts built), [`vmm`]
//!   (capsid-vmm with its console and log in files), [`agent`] (a guest's
//!   agent driven over the protocol), [`containerd`] (a private containerd
//!   with our shim), [`microvm`] (QEMU's `microvm`, the peer), and
//!   [`retry`] (a guest that crashed at boot, booted again loudly).
//! - [`initramfs`], [`child`], [`scratch`], [`serial`], [`procfs`] are the
//!   pieces that boot guests, measure them and leave nothing behind.

#![warn(missing_docs)]

pub mod agent;
pub mod artifacts;
pub mod child;
pub use capsid_images::initramfs;
pub mod containerd;
pub mod microvm;
pub mod nested;
pub mod netns;
pub mod probe;
pub mod procfs;
pub mod qemu;
pub mod retry;
pub mod scratch;
pub mod serial;
pub mod vmm;

pub use artifacts::{artifact, initramfs_with_init};
pub use scratch::ScratchDir;
