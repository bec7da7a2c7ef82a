//! Thin typed wrappers over kvm-ioctls: the VM (memory slots, irqchip, PIT,
//! irqfds, ioeventfds) and the vCPUs (registers, CPUID, MSRs, the run loop).
//! Device logic does not live here.

pub mod vcpu;
pub mod vm;
