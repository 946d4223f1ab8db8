//! The probe guest image: the entry stub (`boot.s`), the ring-3 glue that
//! fills the IDT and reports faults, the `mem*` symbols the compiler calls,
//! and the panic handler. The probe's logic is in the library.
#![no_std]
#![no_main]

use core::arch::global_asm;
use core::panic::PanicInfo;
use probe_guest::{say, shutdown};

global_asm!(include_str!("boot.s"), options(att_syntax));

// memcpy and friends: on the gnu target, compiler_builtins leaves them to
// libc, which a freestanding image does not link. `rep movsb` runs natively
// in ring 3 and is short.
global_asm!(
    r#"
    .text
    .globl memcpy
    .type memcpy, @function
memcpy:
    movq %rdi, %rax
    movq %rdx, %rcx
    rep movsb
    ret

    .globl memset
    .type memset, @function
memset:
    movq %rdi, %r9
    movl %esi, %eax
    movq %rdx, %rcx
    rep stosb
    movq %r9, %rax
    ret

    .globl memmove
    .type memmove, @function
memmove:
    movq %rdi, %rax
    movq %rdx, %rcx
    cmpq %rsi, %rdi
    jbe 2f
    leaq (%rsi,%rdx), %r8
    cmpq %r8, %rdi
    jae 2f
    leaq -1(%rdi,%rdx), %rdi
    leaq -1(%rsi,%rdx), %rsi
    std
    rep movsb
    cld
    ret
2:
    rep movsb
    ret

    .globl memcmp
    .type memcmp, @function
    .globl bcmp
    .type bcmp, @function
memcmp:
bcmp:
    xorl %eax, %eax
    testq %rdx, %rdx
    jz 4f
3:
    movzbl (%rdi), %eax
    movzbl (%rsi), %ecx
    subl %ecx, %eax
    jnz 4f
    incq %rdi
    incq %rsi
    decq %rdx
    jnz 3b
4:
    ret
"#,
    options(att_syntax)
);

const IDT_ENTRIES: usize = 32;
const KERNEL_CS: u16 = 0x08;

extern "C" {
    /// Zeroed at boot; filled here, from ring 3 (every page is USER).
    static mut probe_idt: [u8; IDT_ENTRIES * 16];
    static fault_stub_table: [u64; IDT_ENTRIES];
}

/// What `fault_common` in boot.s hands over.
#[repr(C)]
pub struct FaultFrame {
    vector: u64,
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

/// Called from `user_start` in boot.s with what the entry stub passed.
#[no_mangle]
extern "C" fn probe_main(kind: u64, info: u64) -> ! {
    install_idt();
    // SAFETY: this is the guest image, and the arguments come from the stub.
    unsafe { probe_guest::run(kind, info) }
}

/// Entered in ring 3 from `fault_common` after an exception.
#[no_mangle]
extern "C" fn probe_fault(frame: *const FaultFrame, cr2: u64) -> ! {
    // SAFETY: `fault_common` passes its kernel-stack frame, which is mapped
    // USER and not touched again (a second fault halts in ring 0).
    let f = unsafe { &*frame };
    say!(
        "FAULT vector={} error={:#x} rip={:#x} cs={:#x} rflags={:#x} rsp={:#x} cr2={:#x}",
        f.vector,
        f.error,
        f.rip,
        f.cs,
        f.rflags,
        f.rsp,
        cr2
    );
    say!("done status=1");
    shutdown(1)
}

/// The prebuilt libcore is compiled with unwinding, and without LTO (dev
/// builds) its objects still name this symbol. With `panic = "abort"` nothing
/// ever calls it.
#[no_mangle]
extern "C" fn rust_eh_personality() {}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    say!("PANIC {}", info);
    say!("done status=1");
    shutdown(1)
}

/// Interrupt gates for the exception vectors 0-31, to the fault stubs.
fn install_idt() {
    // SAFETY: a link-time constant table from boot.s, never written.
    let stubs = unsafe { fault_stub_table };
    for (vector, &handler) in stubs.iter().enumerate() {
        let gate = interrupt_gate(handler);
        for (i, byte) in gate.iter().enumerate() {
            // SAFETY: in bounds of the IDT; nothing else uses it until a
            // fault, and the CPU reads it only then.
            unsafe {
                (&raw mut probe_idt)
                    .cast::<u8>()
                    .add(vector * 16 + i)
                    .write_volatile(*byte)
            };
        }
    }
}

fn interrupt_gate(handler: u64) -> [u8; 16] {
    let mut gate = [0u8; 16];
    gate[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
    gate[2..4].copy_from_slice(&KERNEL_CS.to_le_bytes());
    // Present, DPL 0, 64-bit interrupt gate (IF cleared on entry), no IST.
    gate[5] = 0x8e;
    gate[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    gate[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
    gate
}
