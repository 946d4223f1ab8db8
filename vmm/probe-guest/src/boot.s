/*
 * Ring-0 part of the probe guest: as few instructions as possible, because a
 * PVM host emulates every CPL0 instruction (about 1 us each) while CPL3 code
 * runs natively. Everything that can be data (GDT, TSS, page tables) is built
 * at link time; the IDT is filled in later from ring 3 (all pages are USER).
 *
 * Two ways in:
 *  - pvh_entry (Xen PVH note): 32-bit protected mode, paging off, EBX =
 *    hvm_start_info. 38 instructions to ring 3.
 *  - linux64_entry (ELF e_entry): 64-bit Linux boot protocol, long mode
 *    already on with the VMM's identity map, RSI = boot_params. 28
 *    instructions to ring 3. A fallback for a VMM that sets up long mode
 *    itself.
 * Both end in enter_ring3, which irets to user_start with IOPL=3, IF=0 and
 * passes (boot kind, boot info pointer) to probe_main.
 */

    .equ KERNEL_CS, 0x08
    .equ KERNEL_DS, 0x10
    .equ USER_CS, (0x18 | 3)
    .equ USER_DS, (0x20 | 3)
    .equ TSS_SEL, 0x28

/* CR4: PAE | OSFXSR | OSXMMEXCPT (ring 3 Rust code uses SSE); SMEP/SMAP off
 * because the ring-0 fault glue runs on USER pages. */
    .equ CR4_SET, 0x620
    .equ CR4_CLEAR, 0xffcfffff
/* CR0: PG | NE | MP | PE set, EM and TS clear. */
    .equ CR0_SET, 0x80000023
    .equ CR0_CLEAR, 0xfffffff3
    .equ MSR_EFER, 0xc0000080
    .equ EFER_LME, 0x100
/* IOPL=3 so ring 3 can use port I/O; IF=0: no interrupts, the probe polls. */
    .equ USER_RFLAGS, 0x3002

    .equ BOOT_KIND_PVH, 1
    .equ BOOT_KIND_LINUX64, 2
/* Must match HALT_MAGIC in src/probe.rs. */
    .equ HALT_MAGIC, 0x484c5421
/* Must match TRIPLE_FAULT_MAGIC in src/probe.rs. */
    .equ TRIPLE_FAULT_MAGIC, 0x54524950

/* ---------------------------------------------------------------------- */
/* Xen PVH note: XEN_ELFNOTE_PHYS32_ENTRY (18). The descriptor is 8 bytes
 * like Linux's (QEMU reads a size_t); its low 4 bytes are the 32-bit entry. */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .balign 4
    .quad pvh_entry

/* ---------------------------------------------------------------------- */
    .section .text.boot, "ax"
    .code32
    .globl pvh_entry
pvh_entry:
    movl %ebx, %esi
    lgdt gdt_ptr
    movl %cr4, %eax
    andl $CR4_CLEAR, %eax
    orl $CR4_SET, %eax
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $MSR_EFER, %ecx
    rdmsr
    orl $EFER_LME, %eax
    wrmsr
    movl %cr0, %eax
    andl $CR0_CLEAR, %eax
    orl $CR0_SET, %eax
    movl %eax, %cr0
    ljmpl $KERNEL_CS, $pvh_long_mode

    .code64
pvh_long_mode:
    movl $KERNEL_DS, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl $BOOT_KIND_PVH, %edi
    jmp enter_ring3

    .globl linux64_entry
linux64_entry:
    movl $pml4, %eax
    movq %rax, %cr3
    movq %cr4, %rax
    andl $CR4_CLEAR, %eax
    orl $CR4_SET, %eax
    movq %rax, %cr4
    movq %cr0, %rax
    andl $CR0_CLEAR, %eax
    orl $CR0_SET, %eax
    movq %rax, %cr0
    lgdt gdt_ptr
    movl $BOOT_KIND_LINUX64, %edi

/* rdi = boot kind, rsi = boot info pointer (both preserved into ring 3). */
enter_ring3:
    /* The TSS descriptor's base is split across the descriptor, which the
     * linker cannot express; 5 instructions here instead. */
    movl $tss, %eax
    movw %ax, gdt_tss + 2
    shrl $16, %eax
    movb %al, gdt_tss + 4
    movb %ah, gdt_tss + 7
    movl $TSS_SEL, %eax
    ltr %ax
    lidt idt_ptr
    movq $kernel_stack_top, %rsp
    pushq $USER_DS
    pushq $user_stack_top
    pushq $USER_RFLAGS
    pushq $USER_CS
    pushq $user_start
    iretq

/* ---------------------------------------------------------------------- */
/* Ring 3 from here on: native speed on a PVM host. */
user_start:
    movq %rdi, %r12
    movq %rsi, %r13
    movq $__bss_start, %rdi
    movq $__bss_end, %rcx
    subq %rdi, %rcx
    xorl %eax, %eax
    cld
    rep stosb
    movq %r12, %rdi
    movq %r13, %rsi
    call probe_main
2:
    jmp 2b

/* ---------------------------------------------------------------------- */
/* Exception stubs (ring 0, emulated; only run when something went wrong).
 * Each pushes a dummy error code if the CPU did not, then its vector. */
    .macro fault_stub vector, has_error
fault_stub_\vector:
    .if \has_error == 0
    pushq $0
    .endif
    pushq $\vector
    jmp fault_common
    .endm

    .irp v, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
    fault_stub \v, 0
    .endr
    .irp v, 8,10,11,12,13,14,17,21,29,30
    fault_stub \v, 1
    .endr

/* Stack: vector, error, rip, cs, rflags, rsp, ss. Hands the frame to the
 * ring-3 reporter probe_fault(frame, cr2) on its own stack. A fault while
 * reporting (depth > 1) halts right here instead. */
fault_common:
    cmpq $6, (%rsp)
    jne 5f
    cmpl $HALT_MAGIC, %eax
    je halt_forever
    cmpl $TRIPLE_FAULT_MAGIC, %eax
    je triple_fault
5:
    incl fault_depth
    cmpl $1, fault_depth
    jne fault_halt
    movq %rsp, %rdi
    movq %cr2, %rsi
    pushq $USER_DS
    pushq $fault_stack_top - 8
    pushq $USER_RFLAGS
    pushq $USER_CS
    pushq $probe_fault
    iretq

/* A fault while reporting a fault: print vector, error and rip from ring 0
 * (slow, but this is the end anyway) and stop with status 2. */
fault_halt:
    movw $0x3f8, %dx
    movq $nested_fault_msg, %rsi
    movl $nested_fault_msg_len, %ecx
    rep outsb
    movq (%rsp), %rbx
    call print_hex64
    movq 8(%rsp), %rbx
    call print_hex64
    movq 16(%rsp), %rbx
    call print_hex64
    movb $10, %al
    outb %al, %dx
    movw $0x441, %dx
    movb $2, %al
    outb %al, %dx
    movb $0xfe, %al
    outb %al, $0x64
/* Ring 3 halts for good with `ud2` and EAX = HALT_MAGIC (software interrupts
 * from ring 3 raise #UD on a PVM host, so no DPL-3 gate). IF=0: nothing wakes
 * the vCPU. */
halt_forever:
    cli
    hlt
    jmp halt_forever

/* Ring 3 asks for a triple fault (to test the VMM's stop reason): with an
 * empty IDT, #UD cannot be delivered, nor can the #GP and #DF that follow. */
triple_fault:
    lidt null_idt_ptr
    ud2

/* Prints rbx as 16 hex digits and a space on port dx. */
print_hex64:
    movl $16, %ecx
3:
    rolq $4, %rbx
    movl %ebx, %eax
    andl $15, %eax
    movb hex_digits(%rax), %al
    outb %al, %dx
    loop 3b
    movb $32, %al
    outb %al, %dx
    ret

    .section .rodata.fault_stubs, "a"
hex_digits:
    .ascii "0123456789abcdef"
nested_fault_msg:
    .ascii "\nprobe: nested FAULT vector, error, rip: "
    .equ nested_fault_msg_len, . - nested_fault_msg
    .balign 8
    .globl fault_stub_table
fault_stub_table:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad fault_stub_\v
    .endr

/* ---------------------------------------------------------------------- */
    .section .data.pagetables, "aw"
    .balign 4096
/* Identity map of 0-4 GiB with 2 MiB pages, USER|RW|P everywhere (ring 3
 * reaches RAM, the MMIO window at 0xd0000000 and QEMU's at 0xfeb00000); the
 * top GiB is also PCD|PWT since it holds only MMIO. */
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x7
    .quad pd + 0x1000 + 0x7
    .quad pd + 0x2000 + 0x7
    .quad pd + 0x3000 + 0x7
    .fill 508, 8, 0
pd:
    .set page, 0
    .rept 1536
    .quad (page << 21) | 0x87
    .set page, page + 1
    .endr
    .rept 512
    .quad (page << 21) | 0x9f
    .set page, page + 1
    .endr

    .section .data.boot, "aw"
    .balign 16
gdt:
    .quad 0
    .quad 0x00af9a000000ffff    /* 0x08 kernel code, 64-bit */
    .quad 0x00cf92000000ffff    /* 0x10 kernel data */
    .quad 0x00affa000000ffff    /* 0x18 user code, 64-bit, DPL 3 */
    .quad 0x00cff2000000ffff    /* 0x20 user data, DPL 3 */
gdt_tss:                        /* 0x28 64-bit TSS, base filled at boot */
    .word tss_end - tss - 1
    .word 0
    .byte 0                     /* base 16..23 */
    .byte 0x89                  /* present, available 64-bit TSS */
    .byte 0                     /* limit 16..19, flags */
    .byte 0                     /* base 24..31 */
    .long 0
    .long 0
gdt_end:

    .balign 8
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt
idt_ptr:
    .word 32 * 16 - 1
    .quad probe_idt

null_idt_ptr:
    .word 0
    .quad 0

    .balign 16
tss:
    .long 0
    .quad kernel_stack_top      /* rsp0: where exceptions from ring 3 land */
    .fill 90, 1, 0
    .word io_bitmap - tss
/* Ports 0-0x7ff open to ring 3 (serial, i8042, debug port). IOPL=3 alone is
 * not enough on a PVM host: there ring-3 `out` still faults into KVM's
 * emulator, which reads back IOPL 0 and then consults this bitmap. */
io_bitmap:
    .fill 0x800 / 8, 1, 0
    .byte 0xff
tss_end:

    .section .bss.boot, "aw", @nobits
    .balign 4
    .globl fault_depth
fault_depth:
    .long 0
    .balign 4096
    .globl probe_idt
probe_idt:
    .skip 32 * 16

    .section .stack, "aw", @nobits
    .balign 16
kernel_stack:
    .skip 4096
kernel_stack_top:
fault_stack:
    .skip 16384
fault_stack_top:
user_stack:
    .skip 65536
user_stack_top:
