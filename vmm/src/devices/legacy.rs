//! The devices on I/O ports: the 8250 serial console, the i8042 (only as far as the reset line the kernel
//! pulls for `reboot=k`), and the boot marker.

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use vm_superio::{I8042Device, Serial, Trigger, serial::NoEvents};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;
use crate::arch::layout::BOOT_MARKER_VALUE;
use crate::exit::{ExitNotifier, ExitReason};

/// The offset of a one-byte access; the UART and the i8042 have only
/// byte-wide registers, so any other access reads as all ones and writes nothing.
fn byte_register(offset: u64, len: usize) -> Option<u8> {
    u8::try_from(offset).ok().filter(|_| len == 1)
}

/// An interrupt line: writing the eventfd raises the GSI it is registered at.
#[derive(Debug)]
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The 8250 UART on 0x3f8, writing what the guest prints to `out`.
pub struct SerialConsole {
    uart: Serial<IrqLine, NoEvents, Box<dyn Write + Send>>,
}

impl std::fmt::Debug for SerialConsole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SerialConsole")
    }
}

/// The UART's registers and unread input, as a snapshot keeps them
/// (`vm_superio::SerialState`, which has no serde).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialSnapshot {
    /// Divisor latch, low and high byte.
    pub baud_divisor: [u8; 2],
    /// IER, IIR, LCR, LSR, MCR, MSR and the scratch register.
    pub registers: [u8; 7],
    /// Bytes received and not yet read (at most the 64-byte FIFO).
    pub in_buffer: Vec<u8>,
}

impl SerialConsole {
    pub(crate) fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Serial::new(IrqLine(irq), out),
        }
    }

    /// A console in the state `snapshot` kept; an interrupt the UART had
    /// pending is raised again. More input than the FIFO holds is refused.
    pub(crate) fn restore(
        irq: EventFd,
        out: Box<dyn Write + Send>,
        snapshot: &SerialSnapshot,
    ) -> Result<Self, String> {
        let [ier, iir, lcr, lsr, mcr, msr, scratch] = snapshot.registers;
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: snapshot.baud_divisor[0],
            baud_divisor_high: snapshot.baud_divisor[1],
            interrupt_enable: ier,
            interrupt_identification: iir,
            line_control: lcr,
            line_status: lsr,
            modem_control: mcr,
            modem_status: msr,
            scratch,
            in_buffer: snapshot.in_buffer.clone(),
        };
        Serial::from_state(&state, IrqLine(irq), NoEvents, out)
            .map(|uart| Self { uart })
            .map_err(|e| format!("the serial console's state cannot be restored: {e}"))
    }

    /// The UART's state, for a snapshot.
    pub(crate) fn save(&self) -> SerialSnapshot {
        let state = self.uart.state();
        SerialSnapshot {
            baud_divisor: [state.baud_divisor_low, state.baud_divisor_high],
            registers: [
                state.interrupt_enable,
                state.interrupt_identification,
                state.line_control,
                state.line_status,
                state.modem_control,
                state.modem_status,
                state.scratch,
            ],
            in_buffer: state.in_buffer,
        }
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match byte_register(offset, data.len()) {
            Some(offset) => data[0] = self.uart.read(offset),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(offset) = byte_register(offset, data.len())
            && let Err(e) = self.uart.write(offset, data[0])
        {
            crate::guest_warn!("serial console: {e:?}");
        }
    }
}

/// What the i8042's reset line does: end the VM as a guest reset.
#[derive(Debug)]
pub struct ResetLine(pub Arc<ExitNotifier>);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.report(ExitReason::GuestShutdown);
        Ok(())
    }
}

/// The i8042 keyboard controller on ports 0x60-0x64. Linux resets the
/// machine by writing 0xfe to port 0x64 (`reboot=k`).
#[derive(Debug)]
pub struct I8042 {
    device: I8042Device<ResetLine>,
}

impl I8042 {
    pub(crate) fn new(exit: Arc<ExitNotifier>) -> Self {
        Self {
            device: I8042Device::new(ResetLine(exit)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match byte_register(offset, data.len()) {
            Some(offset) => data[0] = self.device.read(offset),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(offset) = byte_register(offset, data.len()) {
            let _ = self.device.write(offset, data[0]);
        }
    }
}

/// Wall and CPU time of this process when the guest wrote the marker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootTime {
    pub(crate) wall_us: u64,
    pub(crate) cpu_us: u64,
}

/// CPU time this process has used so far (all threads), in microseconds.
pub fn process_cpu_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs * 1_000_000 + nanos / 1000
}

/// The boot-time marker: the guest writes [`BOOT_MARKER_VALUE`] to the
/// marker port when it is up; the first write is logged with the time since
/// the VMM process started. Later writes are counted, not logged.
#[derive(Debug)]
pub struct BootMarker {
    started: Instant,
    first: Option<BootTime>,
    repeats: u64,
}

impl BootMarker {
    pub(crate) fn new(started: Instant) -> Self {
        Self {
            started,
            first: None,
            repeats: 0,
        }
    }

    #[cfg(test)]
    fn first(&self) -> Option<BootTime> {
        self.first
    }
}

impl BusDevice for BootMarker {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data.first() != Some(&BOOT_MARKER_VALUE) {
            return;
        }
        if self.first.is_some() {
            self.repeats += 1;
            return;
        }
        let time = BootTime {
            wall_us: u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX),
            cpu_us: process_cpu_us(),
        };
        self.first = Some(time);
        tracing::info!(
            wall_us = time.wall_us,
            cpu_us = time.cpu_us,
            "guest boot marker"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_marker_is_recorded_and_other_values_are_ignored() {
        let mut marker = BootMarker::new(Instant::now());
        marker.write(0, &[1]);
        assert_eq!(marker.first(), None);
        marker.write(0, &[BOOT_MARKER_VALUE]);
        let first = marker.first().unwrap();
        marker.write(0, &[BOOT_MARKER_VALUE]);
        assert_eq!(marker.first(), Some(first));
        assert_eq!(marker.repeats, 1);
    }

    #[test]
    fn a_reset_through_the_i8042_ends_the_vm_as_a_guest_shutdown() {
        let exit = Arc::new(ExitNotifier::new().unwrap());
        let mut i8042 = I8042::new(Arc::clone(&exit));
        // Port 0x64 is offset 4; 0xfe pulses the reset line.
        i8042.write(4, &[0xfe]);
        assert_eq!(exit.reason(), Some(ExitReason::GuestShutdown));
    }

    #[test]
    fn a_serial_console_restored_from_its_state_has_the_guests_settings() {
        let irq = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut uart = SerialConsole::new(irq(), Box::new(std::io::sink()));
        uart.write(3, &[0x83]); // LCR: 8 bits, divisor latch open
        uart.write(0, &[0x01]); // divisor 1: 115200 baud
        uart.write(3, &[0x03]);
        uart.write(1, &[0x02]); // IER: THR empty interrupt
        uart.write(7, &[0x5a]);
        let saved = uart.save();
        assert_eq!(saved.baud_divisor, [1, 0]);

        let line = irq();
        let mut restored =
            SerialConsole::restore(line.try_clone().unwrap(), Box::new(std::io::sink()), &saved)
                .unwrap();
        assert_eq!(restored.save(), saved);
        let mut scratch = [0];
        restored.read(7, &mut scratch);
        assert_eq!(scratch, [0x5a]);
        assert_eq!(
            line.read().unwrap(),
            1,
            "the pending THR interrupt is raised again"
        );

        let flooded = SerialSnapshot {
            in_buffer: vec![0; 65],
            ..saved
        };
        assert!(SerialConsole::restore(irq(), Box::new(std::io::sink()), &flooded).is_err());
    }

    #[test]
    fn serial_output_reaches_the_writer() {
        #[derive(Clone, Default)]
        struct Shared(Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let out = Shared::default();
        let mut serial = SerialConsole::new(EventFd::new(0).unwrap(), Box::new(out.clone()));
        for byte in b"hi\n" {
            serial.write(0, &[*byte]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
    }
}
