//! The 8250 serial console: vm-superio's UART with a capped output sink.

use crate::interrupt::IrqTrigger;
use crate::metrics::Counter;
use std::io::{self, Write};
use std::sync::Arc;
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_superio::{Serial, Trigger};

pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const SERIAL_PORT_LEN: u16 = 8;

/// Bridges our injected trigger to vm-superio's trait.
pub struct SerialIrq(pub Arc<dyn IrqTrigger>);

impl Trigger for SerialIrq {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

/// Where the console goes. Output past `limit` bytes is dropped and counted, so
/// a chatty or hostile guest cannot fill the host's disk.
pub struct SerialOutput {
    sink: Box<dyn Write + Send>,
    limit: u64,
    pub written: Arc<Counter>,
    pub dropped: Arc<Counter>,
}

impl SerialOutput {
    pub fn new(sink: Box<dyn Write + Send>, limit: u64) -> Self {
        Self {
            sink,
            limit,
            written: Arc::default(),
            dropped: Arc::default(),
        }
    }
}

impl Write for SerialOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = self.limit.saturating_sub(self.written.get());
        let take = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        if take > 0 {
            // A fifo whose reader went away must not stop the guest: count the
            // bytes as dropped instead of failing the UART write.
            match self.sink.write_all(&buf[..take]) {
                Ok(()) => self.written.add(take as u64),
                Err(_) => self.dropped.add(take as u64),
            }
        }
        self.dropped.add((buf.len() - take) as u64);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.sink.flush()
    }
}

pub struct SerialDevice {
    uart: Serial<SerialIrq, vm_superio::serial::NoEvents, SerialOutput>,
    pub written: Arc<Counter>,
    pub dropped: Arc<Counter>,
}

impl SerialDevice {
    pub fn new(irq: Arc<dyn IrqTrigger>, output: SerialOutput) -> Self {
        let written = output.written.clone();
        let dropped = output.dropped.clone();
        Self {
            uart: Serial::new(SerialIrq(irq), output),
            written,
            dropped,
        }
    }

    pub fn metrics(&self) -> serde_json::Value {
        serde_json::json!({
            "bytes_written": self.written.get(),
            "bytes_dropped": self.dropped.get(),
        })
    }
}

impl MutDevicePio for SerialDevice {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
        if let ([byte], Ok(offset)) = (data, u8::try_from(offset)) {
            *byte = self.uart.read(offset);
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let ([byte], Ok(offset)) = (data, u8::try_from(offset)) {
            if let Err(e) = self.uart.write(offset, *byte) {
                tracing::error!("serial: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::test_utils::CountingTrigger;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);
    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_is_capped_and_counted() {
        let buf = SharedBuf::default();
        let out = SerialOutput::new(Box::new(buf.clone()), 4);
        let mut dev = SerialDevice::new(Arc::new(CountingTrigger::default()), out);
        for byte in b"hello world" {
            dev.pio_write(PioAddress(COM1_PORT), 0, &[*byte]);
        }
        assert_eq!(&*buf.0.lock().unwrap(), b"hell");
        assert_eq!(dev.written.get(), 4);
        assert_eq!(dev.dropped.get(), 7);
    }

    #[test]
    fn odd_offsets_and_widths_never_panic() {
        let out = SerialOutput::new(Box::new(io::sink()), 1024);
        let mut dev = SerialDevice::new(Arc::new(CountingTrigger::default()), out);
        for offset in 0..16u16 {
            let mut wide = [0xffu8; 4];
            dev.pio_read(PioAddress(COM1_PORT), offset, &mut wide);
            assert_eq!(wide, [0; 4]);
            dev.pio_write(PioAddress(COM1_PORT), offset, &[1, 2]);
            let mut one = [0u8];
            dev.pio_read(PioAddress(COM1_PORT), offset, &mut one);
        }
    }
}
