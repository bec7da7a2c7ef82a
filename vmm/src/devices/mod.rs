//! Devices: the port and MMIO buses, the legacy devices on ports (serial,
//! i8042, boot marker) and virtio over MMIO (block, vsock).

pub mod bus;
pub mod ioapic;
pub mod legacy;
pub mod virtio;
