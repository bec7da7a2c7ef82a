//! x86_64: the guest physical layout, CPUID, boot registers, the MP table and
//! kernel loading. Pure functions over guest memory and KVM structures; the
//! ioctls that apply them live in [`crate::vstate`].

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
