//! Output on the 8250 UART at 0x3f8. The transmit register is written
//! without polling LSR: both our VMM and QEMU accept every THR write at once,
//! and each poll would cost another VM exit.

use core::fmt;

/// The serial console; a zero-sized handle because the port is global.
pub struct Serial;

impl Serial {
    pub fn write_bytes(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            write_byte(byte);
        }
    }
}

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.write_bytes(s.as_bytes());
        Ok(())
    }
}

#[cfg(not(test))]
fn write_byte(byte: u8) {
    // SAFETY: THR of the 8250 at 0x3f8; writing it only transmits a byte.
    unsafe { crate::pio::outb(crate::pio::SERIAL_THR, byte) };
}

#[cfg(test)]
fn write_byte(byte: u8) {
    // Host unit tests: the console is the test's stdout.
    std::print!("{}", char::from(byte));
}

/// Prints one `probe: ...` line on the serial console.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = core::fmt::Write::write_fmt(
            &mut $crate::serial::Serial,
            format_args!("probe: {}\n", format_args!($($arg)*)),
        );
    }};
}

/// Shows guest-controlled bytes as text: printable ASCII as is, the rest as `.`.
pub struct Printable<'a>(pub &'a [u8]);

impl fmt::Display for Printable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &byte in self.0 {
            let c = if (0x20..0x7f).contains(&byte) {
                char::from(byte)
            } else {
                '.'
            };
            fmt::Write::write_char(f, c)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_masks_control_and_high_bytes() {
        let text = std::format!("{}", Printable(b"ok\0\n\x7f\xffZ"));
        assert_eq!(text, "ok....Z");
    }
}
