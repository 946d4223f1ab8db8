//! The debug port: how a guest tells the VMM "I booted" and "stop me".
//!
//! Two I/O ports, chosen because nothing on a PC uses them:
//! - `BOOT_TIMER_PORT` (0x440): writing [`BOOT_TIMER_MAGIC`] records the boot
//!   time (the VMM logs the time since its own process started).
//! - `SHUTDOWN_PORT` (0x441): writing a byte asks for shutdown with that
//!   status. Linux guests without ACPI have no other way to power off.
//!
//! Port I/O (rather than MMIO) lets a root process in the guest reach it with
//! `iopl`/`ioperm` even when `/dev/mem` is compiled out.

use std::sync::Arc;
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

pub use microvm_abi::ports::{BOOT_TIMER_MAGIC, DEBUG_PORT_BASE, DEBUG_PORT_LEN};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DebugPortEvent {
    BootTimer,
    Shutdown { status: u8 },
}

/// Receives debug-port events on the vCPU thread that made the write.
pub type DebugPortSink = Arc<dyn Fn(DebugPortEvent) + Send + Sync>;

/// Forwards guest writes as events; the VMM decides what they mean.
pub struct DebugPort {
    events: DebugPortSink,
    boot_time_reported: bool,
}

impl DebugPort {
    pub fn new(events: DebugPortSink) -> Self {
        Self {
            events,
            boot_time_reported: false,
        }
    }

    fn handle_write(&mut self, offset: u64, data: &[u8]) {
        let [value] = data else { return };
        let event = match offset {
            0 if *value == BOOT_TIMER_MAGIC && !self.boot_time_reported => {
                // Only the first hit is the boot time; later ones are noise a
                // guest could use to flood the log.
                self.boot_time_reported = true;
                DebugPortEvent::BootTimer
            }
            1 => DebugPortEvent::Shutdown { status: *value },
            _ => return,
        };
        (self.events)(event);
    }
}

impl MutDevicePio for DebugPort {
    fn pio_read(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        self.handle_write(u64::from(offset), data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn boot_timer_fires_once_and_shutdown_carries_status() {
        let (tx, rx) = channel();
        let tx = std::sync::Mutex::new(tx);
        let mut port = DebugPort::new(Arc::new(move |e| tx.lock().unwrap().send(e).unwrap()));
        let base = PioAddress(DEBUG_PORT_BASE);
        port.pio_write(base, 0, &[BOOT_TIMER_MAGIC]);
        port.pio_write(base, 0, &[BOOT_TIMER_MAGIC]);
        port.pio_write(base, 0, &[7]);
        port.pio_write(base, 1, &[3]);
        port.pio_write(base, 1, &[1, 2]); // wrong width: ignored
        assert_eq!(rx.try_recv(), Ok(DebugPortEvent::BootTimer));
        assert_eq!(rx.try_recv(), Ok(DebugPortEvent::Shutdown { status: 3 }));
        assert!(rx.try_recv().is_err());
        let mut buf = [0xffu8; 4];
        port.pio_read(base, 0, &mut buf);
        assert_eq!(buf, [0; 4]);
    }
}
