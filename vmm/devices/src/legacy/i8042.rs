//! A minimal i8042 keyboard controller.
//!
//! Hand-written rather than `vm_superio::I8042Device` because that device only
//! models the CPU-reset command; graceful shutdown needs to inject a
//! Ctrl-Alt-Del key sequence, which Linux's atkbd driver turns into SIGINT for
//! init (or a reboot).

use crate::interrupt::IrqTrigger;
use std::collections::VecDeque;
use std::sync::Arc;
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// Port 0x60..=0x64 is registered as one range; 0x61-0x63 read as zero.
pub const I8042_PORT_LEN: u16 = 5;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_RESET_CPU: u8 = 0xfe;

const SB_OUT_DATA_AVAIL: u8 = 0x01;
const SB_I8042_CMD_DATA: u8 = 0x08;
const SB_KBD_ENABLED: u8 = 0x10;

const CTR_KBD_INT_ENABLE: u8 = 0x01;

/// Set 1 scancodes (Linux enables the controller's set-2-to-set-1
/// translation): Ctrl, Alt, Del pressed, then Del, Alt, Ctrl released.
const CTRL_ALT_DEL: [u8; 8] = [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];
const BUFFER_LIMIT: usize = 16;

/// What the guest asked the VMM for through the i8042.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum I8042Event {
    Reset,
}

/// Receives i8042 events on the vCPU thread that made the access.
pub type I8042Sink = Arc<dyn Fn(I8042Event) + Send + Sync>;

pub struct I8042 {
    status: u8,
    control: u8,
    output_port: u8,
    pending_command: Option<u8>,
    buffer: VecDeque<u8>,
    kbd_irq: Arc<dyn IrqTrigger>,
    events: I8042Sink,
}

impl I8042 {
    pub fn new(kbd_irq: Arc<dyn IrqTrigger>, events: I8042Sink) -> Self {
        Self {
            status: SB_KBD_ENABLED,
            control: CTR_KBD_INT_ENABLE,
            output_port: 0x01,
            pending_command: None,
            buffer: VecDeque::new(),
            kbd_irq,
            events,
        }
    }

    /// Queues Ctrl-Alt-Del for the guest's keyboard driver.
    pub fn inject_ctrl_alt_del(&mut self) -> std::io::Result<()> {
        for code in CTRL_ALT_DEL {
            self.push(code);
        }
        self.raise_if_pending()
    }

    fn push(&mut self, byte: u8) {
        if self.buffer.len() < BUFFER_LIMIT {
            self.buffer.push_back(byte);
        }
    }

    fn raise_if_pending(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            self.status &= !SB_OUT_DATA_AVAIL;
            return Ok(());
        }
        self.status |= SB_OUT_DATA_AVAIL;
        if self.control & CTR_KBD_INT_ENABLE != 0 {
            self.kbd_irq.trigger()?;
        }
        Ok(())
    }

    fn read_port(&mut self, port: u16) -> u8 {
        match port {
            I8042_COMMAND_PORT => self.status,
            I8042_DATA_PORT => {
                let value = self.buffer.pop_front().unwrap_or(0);
                if let Err(e) = self.raise_if_pending() {
                    tracing::error!("i8042: failed to raise keyboard interrupt: {e}");
                }
                value
            }
            _ => 0,
        }
    }

    fn write_port(&mut self, port: u16, value: u8) {
        match port {
            I8042_COMMAND_PORT => {
                self.status |= SB_I8042_CMD_DATA;
                match value {
                    CMD_RESET_CPU => (self.events)(I8042Event::Reset),
                    CMD_READ_CTR => {
                        self.buffer.clear();
                        self.push(self.control);
                    }
                    CMD_READ_OUTP => {
                        self.buffer.clear();
                        self.push(self.output_port);
                    }
                    CMD_WRITE_CTR | CMD_WRITE_OUTP => self.pending_command = Some(value),
                    _ => {}
                }
            }
            I8042_DATA_PORT => {
                self.status &= !SB_I8042_CMD_DATA;
                match self.pending_command.take() {
                    Some(CMD_WRITE_CTR) => self.control = value,
                    Some(CMD_WRITE_OUTP) => self.output_port = value,
                    // Keyboard commands: acknowledge everything (0xfa), which
                    // is what atkbd needs to consider the keyboard present.
                    _ => {
                        self.buffer.clear();
                        self.push(0xfa);
                    }
                }
            }
            _ => {}
        }
        if let Err(e) = self.raise_if_pending() {
            tracing::error!("i8042: failed to raise keyboard interrupt: {e}");
        }
    }
}

impl MutDevicePio for I8042 {
    fn pio_read(&mut self, base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
        if let [byte] = data {
            *byte = self.read_port(base.0.wrapping_add(offset));
        }
    }

    fn pio_write(&mut self, base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let [byte] = data {
            self.write_port(base.0.wrapping_add(offset), *byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::test_utils::CountingTrigger;
    use std::sync::mpsc::channel;

    fn device() -> (
        I8042,
        Arc<CountingTrigger>,
        std::sync::mpsc::Receiver<I8042Event>,
    ) {
        let irq = Arc::new(CountingTrigger::default());
        let (tx, rx) = channel();
        let tx = std::sync::Mutex::new(tx);
        let sink: I8042Sink = Arc::new(move |e| tx.lock().unwrap().send(e).unwrap());
        (I8042::new(irq.clone(), sink), irq, rx)
    }

    const BASE: PioAddress = PioAddress(I8042_DATA_PORT);

    #[test]
    fn reset_command_becomes_an_event() {
        let (mut dev, _, rx) = device();
        dev.pio_write(BASE, 4, &[CMD_RESET_CPU]);
        assert_eq!(rx.try_recv(), Ok(I8042Event::Reset));
    }

    #[test]
    fn ctrl_alt_del_is_readable_and_interrupts() {
        let (mut dev, irq, _) = device();
        dev.inject_ctrl_alt_del().unwrap();
        assert!(irq.count() >= 1);
        let mut got = Vec::new();
        loop {
            let mut status = [0u8];
            dev.pio_read(BASE, 4, &mut status);
            if status[0] & SB_OUT_DATA_AVAIL == 0 {
                break;
            }
            let mut byte = [0u8];
            dev.pio_read(BASE, 0, &mut byte);
            got.push(byte[0]);
        }
        assert_eq!(got, CTRL_ALT_DEL);
    }

    #[test]
    fn control_register_round_trips_and_odd_widths_are_ignored() {
        let (mut dev, _, _) = device();
        dev.pio_write(BASE, 4, &[CMD_WRITE_CTR]);
        dev.pio_write(BASE, 0, &[0x45]);
        dev.pio_write(BASE, 4, &[CMD_READ_CTR]);
        let mut byte = [0u8];
        dev.pio_read(BASE, 0, &mut byte);
        assert_eq!(byte[0], 0x45);
        let mut wide = [0xffu8; 2];
        dev.pio_read(BASE, 0, &mut wide);
        assert_eq!(wide, [0, 0]);
        dev.pio_write(BASE, 4, &[CMD_RESET_CPU, 0]);
    }
}
