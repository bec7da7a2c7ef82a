//! capsid's test bed: the machinery that lets end-to-end tests boot real
//! guests on any x86_64 Linux machine.
//!
//! - [`probe`] (asking `capsid-vmm --probe`) decides the mode: *native* when this
//!   machine's `/dev/kvm` runs guests on the CPU, *nested* otherwise.
//! - [`nested`] boots the nested test host (QEMU TCG + Debian's cloud kernel
//!   with `kvm-amd`) and runs a command inside it, reporting its output and
//!   exit code back; the `capsid-testbed` binary wraps both.
//! - [`microvm`], [`initramfs`], [`child`], [`scratch`], [`serial`] are the
//!   pieces tests use to boot guests and leave nothing behind.

pub mod child;
pub use capsid_images::initramfs;
pub mod microvm;
pub mod nested;
pub mod probe;
pub mod qemu;
pub mod scratch;
pub mod serial;

pub use scratch::ScratchDir;
