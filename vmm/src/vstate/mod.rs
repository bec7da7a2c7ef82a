//! Thin typed wrappers over kvm-ioctls: the VM (memory slots, irqchip, PIT,
//! irqfds, ioeventfds) and the vCPUs (registers, CPUID, MSRs, the run loop),
//! and their state saved for a snapshot and put back (`snapshot`).
//! Device logic does not live here.

pub mod snapshot;
pub mod vcpu;
pub mod vm;
