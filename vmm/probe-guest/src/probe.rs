//! The probe's steps, in order: hello and boot timer, boot info, device
//! discovery, vsock, blk, verdict and shutdown.
//!
//! Command-line switches: `probe.quick=1` stops right after the boot timer
//! (start-up benchmark); `probe.idle=1` halts instead of shutting down at the
//! end (memory benchmark of an idle VM); `probe.exit=reboot` and
//! `probe.exit=triple-fault` end the run with an i8042 reset or a triple
//! fault instead of the shutdown port (tests of the VMM's stop reasons).

use crate::bootinfo::{self, BootKind};
use crate::cmdline;
use crate::pio::{self, outb};
use crate::say;
use crate::serial::Printable;
use crate::virtio::mmio::{Identity, Mmio};
use crate::virtio::{blk, vsock};

/// Our VMM's fixed virtio-mmio window, scanned when the command line names
/// no devices.
pub const MMIO_WINDOW_BASE: u64 = 0xd000_0000;
pub const MMIO_SLOT_SIZE: u64 = 0x1000;
pub const MMIO_SLOTS: u64 = 16;
const MAX_DEVICES: usize = 16;
const CMDLINE_SHOWN: usize = 240;
/// A virtio-mmio window must at least reach the 64-bit config field.
const MIN_WINDOW: u64 = 0x108;

#[derive(Debug, Clone, Copy)]
struct Found {
    base: u64,
    id: Identity,
}

/// Runs every step and shuts the VM down with the verdict.
///
/// # Safety
/// Only for the guest image: `kind` and `info` must be what the entry stub
/// passed, with the 0-4 GiB identity map it set up.
pub unsafe fn run(kind: u64, info: u64) -> ! {
    say!("hello");
    // SAFETY: the debug port's boot-timer register only records a timestamp.
    unsafe { outb(pio::DEBUG_BOOT_TIMER, pio::BOOT_TIMER_MAGIC) };
    // SAFETY: the entry stub passed the loader's pointer; 0-4 GiB is mapped.
    let boot = unsafe { bootinfo::parse(BootKind::from_raw(kind), info) };
    let idle = cmdline::has_param(boot.cmdline, b"probe.idle=1");
    if cmdline::has_param(boot.cmdline, b"probe.exit=reboot") {
        say!("rebooting");
        // SAFETY: the i8042 reset command exists to end the VM.
        unsafe { outb(pio::I8042_COMMAND, pio::I8042_RESET_CPU) };
        halt_forever();
    }
    if cmdline::has_param(boot.cmdline, b"probe.exit=triple-fault") {
        say!("triple faulting");
        triple_fault();
    }
    if cmdline::has_param(boot.cmdline, b"probe.quick=1") {
        finish(0, idle);
    }
    say!("boot {} ram={}MiB", boot.kind.name(), boot.ram_bytes >> 20);
    if let Some(problem) = boot.problem {
        say!("boot info problem: {}", problem);
    }
    let shown = &boot.cmdline[..boot.cmdline.len().min(CMDLINE_SHOWN)];
    say!("cmdline {}", Printable(shown));

    let devices = discover(boot.cmdline);
    let mut failed = false;
    let first = |id: u32| devices.iter().flatten().find(|d| d.id.device_id == id);
    match first(vsock::DEVICE_ID) {
        Some(found) => failed |= step("vsock", found, vsock::run),
        None => say!("vsock absent"),
    }
    match first(blk::DEVICE_ID) {
        Some(found) => failed |= step("blk", found, blk::run),
        None => say!("blk absent"),
    }
    finish(u8::from(failed), idle)
}

/// Reports the verdict and shuts down, or with `probe.idle=1` stays up,
/// halted, so a benchmark can measure an idle VM.
fn finish(status: u8, idle: bool) -> ! {
    if idle {
        say!("idle status={}", status);
        halt_forever();
    }
    say!("done status={}", status);
    shutdown(status)
}

/// Runs one device's test; prints `FAIL <reason>` and returns true on failure.
fn step(name: &str, found: &Found, test: impl FnOnce(&Mmio) -> crate::fail::Result<()>) -> bool {
    if found.id.version != 2 {
        say!(
            "{} FAIL legacy virtio-mmio version {}",
            name,
            found.id.version
        );
        return true;
    }
    // SAFETY: `discover` saw the virtio magic at this base.
    let mmio = unsafe { Mmio::new(found.base) };
    match test(&mmio) {
        Ok(()) => false,
        Err(fail) => {
            mmio.fail();
            say!("{} FAIL {}", name, fail);
            true
        }
    }
}

/// Devices from `virtio_mmio.device=` entries, or else from our VMM's fixed
/// window.
fn discover(cmdline: &[u8]) -> [Option<Found>; MAX_DEVICES] {
    let mut found = [None; MAX_DEVICES];
    let mut count = 0;
    let mut named = 0;
    let mut add = |base: u64| {
        // SAFETY: either the loader named this window as virtio-mmio, or it
        // is a slot of our VMM's window, where empty slots read as zero.
        let mmio = unsafe { Mmio::new(base) };
        if let Some(id) = mmio.identify() {
            say!(
                "virtio-mmio {:#x} id={} version={}",
                base,
                id.device_id,
                id.version
            );
            if count < MAX_DEVICES {
                found[count] = Some(Found { base, id });
                count += 1;
            }
        }
    };
    for param in cmdline::virtio_mmio_devices(cmdline) {
        named += 1;
        if param.size >= MIN_WINDOW
            && param
                .base
                .checked_add(param.size)
                .is_some_and(|end| end <= 1 << 32)
        {
            add(param.base);
        } else {
            say!(
                "virtio-mmio entry {:#x} size {:#x} ignored",
                param.base,
                param.size
            );
        }
    }
    if named == 0 {
        for slot in 0..MMIO_SLOTS {
            add(MMIO_WINDOW_BASE + slot * MMIO_SLOT_SIZE);
        }
    }
    found
}

/// Asks the VMM to stop with `status`, falls back to an i8042 reset (QEMU
/// without isa-debug-exit), and halts for good.
pub fn shutdown(status: u8) -> ! {
    // SAFETY: the debug port's shutdown register and the i8042 command port
    // exist to end the VM; nothing in the guest needs to survive.
    unsafe {
        outb(pio::DEBUG_SHUTDOWN, status);
        outb(pio::I8042_COMMAND, pio::I8042_RESET_CPU);
    }
    halt_forever()
}

/// Tells boot.s's #UD handler that a `ud2` is a request for a triple fault.
pub const TRIPLE_FAULT_MAGIC: u32 = 0x5452_4950;

fn triple_fault() -> ! {
    loop {
        // SAFETY: the #UD handler recognises the magic and never returns.
        unsafe { core::arch::asm!("ud2", in("eax") TRIPLE_FAULT_MAGIC, options(nomem, nostack)) };
    }
}

/// Tells boot.s's #UD handler that a `ud2` is a request to halt.
pub const HALT_MAGIC: u32 = 0x484c_5421;

/// Halts the vCPU for good (IF=0, so nothing wakes it up). `hlt` needs ring
/// 0, and ring 3 cannot use `int n` on a PVM host, so: `ud2` with EAX =
/// `HALT_MAGIC`, which the #UD path in boot.s turns into a `hlt` loop.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: the #UD handler recognises the magic and never returns.
        unsafe { core::arch::asm!("ud2", in("eax") HALT_MAGIC, options(nomem, nostack)) };
    }
}
