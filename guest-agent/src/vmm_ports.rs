//! Port-I/O doorbells of our VMM, written from user space after `iopl(3)`.
//!
//! Port I/O (not a vsock message) because it works before any device is up
//! and costs one exit. Under QEMU nothing decodes these ports, so the writes
//! are ignored.

use microvm_proto::abi::ports::{BOOT_TIMER_MAGIC, BOOT_TIMER_PORT, SHUTDOWN_CLEAN, SHUTDOWN_PORT};

/// Proof that this process may use `in`/`out`: only [`VmmPorts::acquire`]
/// makes one, after `iopl(3)` succeeded.
pub struct VmmPorts {
    _iopl_granted: (),
}

impl VmmPorts {
    /// Raises this process's I/O privilege level to 3. Fails without
    /// CAP_SYS_RAWIO, or on a kernel without CONFIG_X86_IOPL_IOPERM.
    #[cfg(target_arch = "x86_64")]
    pub fn acquire() -> std::io::Result<Self> {
        // SAFETY: iopl() only changes the I/O privilege level of this
        // process; it takes no pointers and touches no memory of ours.
        let rc = unsafe { libc::iopl(3) };
        if rc == 0 {
            Ok(Self { _iopl_granted: () })
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub fn acquire() -> std::io::Result<Self> {
        Err(std::io::ErrorKind::Unsupported.into())
    }

    pub fn signal_boot_done(&self) {
        self.outb(BOOT_TIMER_PORT, BOOT_TIMER_MAGIC);
    }

    pub fn signal_shutdown(&self) {
        self.outb(SHUTDOWN_PORT, SHUTDOWN_CLEAN);
    }

    #[cfg(target_arch = "x86_64")]
    fn outb(&self, port: u16, value: u8) {
        // SAFETY: `self` exists only after iopl(3) succeeded, so `out` from
        // ring 3 does not fault. The instruction reads and writes no memory
        // of this process; the ports are the VMM's doorbells (ignored where
        // no device decodes them).
        unsafe {
            std::arch::asm!(
                "out dx, al",
                in("dx") port,
                in("al") value,
                options(nomem, nostack, preserves_flags)
            );
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn outb(&self, _port: u16, _value: u8) {}
}
