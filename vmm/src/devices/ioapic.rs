//! The IOAPIC in the VMM, for the split irqchip (`irqchip = "split"`):
//! KVM keeps the LAPICs, this device keeps the 24 redirection entries, and
//! there is no PIC and no PIT at all (Cloud Hypervisor's arrangement; the
//! guest times with the TSC-deadline LAPIC timer and kvm-clock).
//!
//! Devices still raise their interrupt by writing an eventfd registered
//! with KVM at GSI = pin (`KVM_IRQFD`); what turns a GSI into an interrupt
//! is KVM's routing table, which this device rewrites whenever the guest
//! programs an entry: every unmasked pin becomes an MSI route to the LAPIC
//! and vector its entry names, and a masked pin has no route (its edges are
//! dropped, as a real IOAPIC drops edges on a masked pin).
//!
//! ```text
//!  device ─eventfd─▶ KVM irqfd (GSI = pin) ─route─▶ MSI ─▶ LAPIC ─▶ vCPU
//!                                              ▲
//!  guest ─MMIO 0xfec0_0000─▶ Ioapic (IOREGSEL/IOWIN) ─KVM_SET_GSI_ROUTING
//! ```
//!
//! Every pin is edge-triggered (the MP table declares ISA interrupts, which
//! are): a guest that programs an entry level-triggered still gets edges,
//! and the VMM says so once. Register parsing is pure; installing routes
//! goes through [`MsiRouter`], so it is unit-tested without KVM.

use super::bus::BusDevice;
use crate::arch::layout::IOAPIC_PINS;

/// Offset of IOREGSEL, which selects the register IOWIN reaches.
const IOREGSEL: u64 = 0x00;
/// Offset of IOWIN, the selected register's window.
const IOWIN: u64 = 0x10;
/// The MMIO window the device answers in.
pub const IOAPIC_SIZE: u64 = 0x1000;

const REG_ID: u8 = 0x00;
const REG_VERSION: u8 = 0x01;
const REG_ARBITRATION: u8 = 0x02;
/// The redirection table: two registers (low, high dword) per pin.
const REG_TABLE: u8 = 0x10;

/// Version 0x11 (the 82093AA's; it has no EOI register) and the highest
/// entry's index, as the MP table says.
const VERSION: u32 = 0x11 | ((IOAPIC_PINS - 1) << 16);

const ENTRY_VECTOR: u64 = 0xff;
const ENTRY_DELIVERY_MODE_SHIFT: u32 = 8;
const ENTRY_DEST_MODE_SHIFT: u32 = 11;
/// Delivery status and remote IRR: the IOAPIC's own, not the guest's to write.
const ENTRY_READ_ONLY: u64 = (1 << 12) | (1 << 14);
const ENTRY_LEVEL: u64 = 1 << 15;
const ENTRY_MASKED: u64 = 1 << 16;
const ENTRY_DEST_SHIFT: u32 = 56;

/// Where MSIs are written: the LAPICs' window.
const MSI_ADDRESS_BASE: u32 = 0xfee0_0000;
const MSI_DEST_SHIFT: u32 = 12;
const MSI_DEST_MODE_SHIFT: u32 = 2;
const MSI_DELIVERY_MODE_SHIFT: u32 = 8;

/// An MSI: where it is written and what (the interrupt it raises).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Msi {
    /// The address's low dword (`0xfee0_0000` | destination | mode).
    pub address: u32,
    /// The data: vector and delivery mode.
    pub data: u32,
}

/// Installs the routes from GSIs to MSIs (all of them at once, replacing
/// the previous set): `KVM_SET_GSI_ROUTING` on the VM.
pub trait MsiRouter: Send {
    /// Replaces the routing table with `routes` (GSI, MSI).
    fn set_routes(&self, routes: &[(u32, Msi)]) -> std::io::Result<()>;
}

impl<T: MsiRouter + Sync> MsiRouter for std::sync::Arc<T> {
    fn set_routes(&self, routes: &[(u32, Msi)]) -> std::io::Result<()> {
        T::set_routes(self, routes)
    }
}

/// The IOAPIC's registers and the routes they imply.
pub struct Ioapic {
    id: u32,
    select: u8,
    entries: [u64; IOAPIC_PINS as usize],
    /// The routes installed last, so an unchanged table is not re-sent.
    installed: Vec<(u32, Msi)>,
    router: Box<dyn MsiRouter>,
}

impl std::fmt::Debug for Ioapic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ioapic")
            .field("id", &self.id)
            .field("installed", &self.installed)
            .finish_non_exhaustive()
    }
}

impl Ioapic {
    /// An IOAPIC at reset (every pin masked, no route) with ID `id`.
    pub fn new(id: u8, router: Box<dyn MsiRouter>) -> Self {
        Self {
            id: u32::from(id) << 24,
            select: 0,
            entries: [ENTRY_MASKED; IOAPIC_PINS as usize],
            installed: Vec::new(),
            router,
        }
    }

    fn read_register(&self) -> u32 {
        match self.select {
            REG_ID => self.id,
            REG_VERSION => VERSION,
            REG_ARBITRATION => self.id,
            reg => match table_index(reg) {
                Some((pin, high)) => {
                    let entry = self.entries[pin];
                    dword(if high { entry >> 32 } else { entry })
                }
                None => 0,
            },
        }
    }

    fn write_register(&mut self, value: u32) {
        match self.select {
            REG_ID => self.id = value & 0x0f00_0000,
            reg => {
                let Some((pin, high)) = table_index(reg) else {
                    return;
                };
                let entry = &mut self.entries[pin];
                let value = u64::from(value);
                *entry = if high {
                    (*entry & 0xffff_ffff) | (value << 32)
                } else {
                    let kept = *entry & (0xffff_ffff_0000_0000 | ENTRY_READ_ONLY);
                    kept | (value & !ENTRY_READ_ONLY)
                };
                if !high && *entry & (ENTRY_LEVEL | ENTRY_MASKED) == ENTRY_LEVEL {
                    crate::guest_warn!(
                        "IOAPIC pin {pin} programmed level-triggered; it is delivered as edges"
                    );
                }
                self.install();
            }
        }
    }

    /// The routes the entries imply: one MSI per unmasked pin.
    fn routes(&self) -> Vec<(u32, Msi)> {
        (0..IOAPIC_PINS)
            .zip(self.entries)
            .filter(|(_, entry)| entry & ENTRY_MASKED == 0)
            .map(|(pin, entry)| (pin, msi(entry)))
            .collect()
    }

    fn install(&mut self) {
        let routes = self.routes();
        if routes == self.installed {
            return;
        }
        match self.router.set_routes(&routes) {
            Ok(()) => self.installed = routes,
            Err(e) => crate::guest_warn!("cannot install the IOAPIC's interrupt routes: {e}"),
        }
    }
}

/// The pin and half (high dword?) that register `reg` of the table holds.
fn table_index(reg: u8) -> Option<(usize, bool)> {
    let offset = usize::from(reg.checked_sub(REG_TABLE)?);
    let pin = offset / 2;
    (pin < IOAPIC_PINS as usize).then_some((pin, offset % 2 == 1))
}

/// The MSI a redirection entry sends: its vector, delivery mode,
/// destination and destination mode; always an edge.
fn msi(entry: u64) -> Msi {
    let dest = dword((entry >> ENTRY_DEST_SHIFT) & 0xff);
    let dest_mode = dword((entry >> ENTRY_DEST_MODE_SHIFT) & 1);
    let delivery_mode = dword((entry >> ENTRY_DELIVERY_MODE_SHIFT) & 0b111);
    Msi {
        address: MSI_ADDRESS_BASE | (dest << MSI_DEST_SHIFT) | (dest_mode << MSI_DEST_MODE_SHIFT),
        data: dword(entry & ENTRY_VECTOR) | (delivery_mode << MSI_DELIVERY_MODE_SHIFT),
    }
}

/// The low 32 bits (the callers have masked or shifted what they need).
fn dword(value: u64) -> u32 {
    u32::try_from(value & 0xffff_ffff).unwrap_or(u32::MAX)
}

impl BusDevice for Ioapic {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (IOREGSEL, 4) => u32::from(self.select),
            (IOWIN, 4) => self.read_register(),
            // Only dword accesses to the two registers are defined.
            _ => u32::MAX,
        };
        let bytes = value.to_le_bytes();
        let len = data.len().min(4);
        data[..len].copy_from_slice(&bytes[..len]);
        data[len..].fill(0xff);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let value = u32::from_le_bytes(bytes);
        match offset {
            IOREGSEL => self.select = u8::try_from(value & 0xff).unwrap_or(0),
            IOWIN => self.write_register(value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    type Routes = Vec<(u32, Msi)>;

    /// Keeps every table it is given; fails when told to.
    #[derive(Clone, Default)]
    struct Tables(Arc<Mutex<Vec<Routes>>>, Arc<Mutex<bool>>);

    impl MsiRouter for Tables {
        fn set_routes(&self, routes: &[(u32, Msi)]) -> std::io::Result<()> {
            if *self.1.lock().unwrap() {
                return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
            }
            self.0.lock().unwrap().push(routes.to_vec());
            Ok(())
        }
    }

    fn write_reg(ioapic: &mut Ioapic, reg: u8, value: u32) {
        ioapic.write(IOREGSEL, &u32::from(reg).to_le_bytes());
        ioapic.write(IOWIN, &value.to_le_bytes());
    }

    fn read_reg(ioapic: &mut Ioapic, reg: u8) -> u32 {
        ioapic.write(IOREGSEL, &u32::from(reg).to_le_bytes());
        let mut data = [0; 4];
        ioapic.read(IOWIN, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn it_says_what_it_is_and_starts_with_every_pin_masked() {
        let tables = Tables::default();
        let mut ioapic = Ioapic::new(2, Box::new(tables.clone()));
        assert_eq!(read_reg(&mut ioapic, REG_ID), 2 << 24);
        assert_eq!(read_reg(&mut ioapic, REG_VERSION), 0x0017_0011);
        for pin in 0..24 {
            assert_eq!(read_reg(&mut ioapic, REG_TABLE + 2 * pin), 1 << 16);
        }
        assert!(
            tables.0.lock().unwrap().is_empty(),
            "no route before the guest asks"
        );
    }

    #[test]
    fn an_unmasked_entry_becomes_an_msi_route_and_masking_it_removes_the_route() {
        let tables = Tables::default();
        let mut ioapic = Ioapic::new(2, Box::new(tables.clone()));
        // Pin 4 (the serial port): vector 0x24, fixed delivery, physical
        // destination APIC 1, edge, unmasked. Linux writes the high half first.
        write_reg(&mut ioapic, REG_TABLE + 9, 1 << 24);
        write_reg(&mut ioapic, REG_TABLE + 8, 0x24);
        let serial = Msi {
            address: 0xfee0_1000,
            data: 0x24,
        };
        assert_eq!(tables.0.lock().unwrap().last().unwrap(), &[(4, serial)]);
        assert_eq!(read_reg(&mut ioapic, REG_TABLE + 8), 0x24);
        assert_eq!(read_reg(&mut ioapic, REG_TABLE + 9), 1 << 24);

        // Pin 5 in logical mode, lowest priority, to CPUs 0b11.
        write_reg(&mut ioapic, REG_TABLE + 11, 0b11 << 24);
        write_reg(&mut ioapic, REG_TABLE + 10, 0x31 | (1 << 8) | (1 << 11));
        let logical = Msi {
            address: 0xfee0_3004,
            data: 0x131,
        };
        assert_eq!(
            tables.0.lock().unwrap().last().unwrap(),
            &[(4, serial), (5, logical)]
        );

        // Masked again: its route goes; an unchanged table is not re-sent.
        write_reg(&mut ioapic, REG_TABLE + 8, 0x24 | (1 << 16));
        assert_eq!(tables.0.lock().unwrap().last().unwrap(), &[(5, logical)]);
        let sent = tables.0.lock().unwrap().len();
        write_reg(&mut ioapic, REG_TABLE + 8, 0x24 | (1 << 16));
        assert_eq!(tables.0.lock().unwrap().len(), sent);
    }

    #[test]
    fn hostile_accesses_change_nothing_they_should_not() {
        let tables = Tables::default();
        let mut ioapic = Ioapic::new(2, Box::new(tables.clone()));
        // The read-only bits of an entry, the version, registers past the
        // table and odd-sized or misplaced accesses.
        write_reg(&mut ioapic, REG_TABLE, (1 << 12) | (1 << 14) | (1 << 16));
        assert_eq!(read_reg(&mut ioapic, REG_TABLE), 1 << 16);
        write_reg(&mut ioapic, REG_VERSION, 0);
        assert_eq!(read_reg(&mut ioapic, REG_VERSION), VERSION);
        write_reg(&mut ioapic, REG_TABLE + 48, 0x55);
        write_reg(&mut ioapic, 0xff, 0x55);
        assert_eq!(read_reg(&mut ioapic, REG_TABLE + 48), 0);
        assert_eq!(read_reg(&mut ioapic, 0xff), 0);
        ioapic.write(IOWIN, &[0x20, 0]);
        ioapic.write(0x8, &[0; 4]);
        ioapic.write(0xffff, &[0; 8]);
        let mut wide = [0u8; 8];
        ioapic.read(IOWIN, &mut wide);
        assert_eq!(wide, [0xff; 8]);
        let mut empty = [0u8; 0];
        ioapic.read(IOWIN, &mut empty);
        assert!(tables.0.lock().unwrap().is_empty());
        // The ID keeps only its four bits.
        write_reg(&mut ioapic, REG_ID, 0xffff_ffff);
        assert_eq!(read_reg(&mut ioapic, REG_ID), 0x0f00_0000);
    }

    #[test]
    fn a_route_kvm_refused_is_tried_again_on_the_next_write() {
        let tables = Tables::default();
        let mut ioapic = Ioapic::new(2, Box::new(tables.clone()));
        *tables.1.lock().unwrap() = true;
        write_reg(&mut ioapic, REG_TABLE + 8, 0x24);
        assert!(tables.0.lock().unwrap().is_empty());
        *tables.1.lock().unwrap() = false;
        write_reg(&mut ioapic, REG_TABLE + 9, 0);
        assert_eq!(tables.0.lock().unwrap().len(), 1);
    }
}
