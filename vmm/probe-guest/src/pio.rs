//! x86 port I/O. Ring 3 may use it because the entry stub sets RFLAGS.IOPL=3.
//! Every `out` is a VM exit (about 20 us on a PVM host), so callers keep them
//! few.

use core::arch::asm;

pub const SERIAL_THR: u16 = 0x3f8;
pub use microvm_abi::ports::BOOT_TIMER_MAGIC;
pub use microvm_abi::ports::{
    BOOT_TIMER_PORT as DEBUG_BOOT_TIMER, SHUTDOWN_PORT as DEBUG_SHUTDOWN,
};
pub const I8042_COMMAND: u16 = 0x64;
pub const I8042_RESET_CPU: u8 = 0xfe;

/// Writes one byte to an I/O port.
///
/// # Safety
/// The port's device must tolerate the write; the caller knows what it does.
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: `out` touches no memory; the caller vouches for the device.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags));
    }
}
