/*
 * The tiny guest's entry: the Xen PVH note, the 32-bit PVH entry, the switch to long mode
 * and the interrupt stubs.
 *
 * A PVH loader (our VMM, QEMU's -kernel) enters at pvh_start in 32-bit protected mode with
 * flat segments, paging off and %ebx holding the physical address of hvm_start_info. The
 * GDTR it leaves is undefined, so we load our own GDT, enable PAE with page tables built
 * by the assembler (identity map of the first 4 GiB in 2 MiB pages: no instructions spent
 * filling them, which matters when every guest instruction is emulated), set EFER.LME,
 * turn paging on and far-jump into 64-bit code, which calls kmain(start_info).
 */

#define XEN_ELFNOTE_PHYS32_ENTRY 18
#define MSR_EFER 0xc0000080

    .section .note.Xen, "a", @note
    .balign 4
    .long 4                         /* namesz: "Xen\0" */
    .long 4                         /* descsz: a 32-bit physical entry address */
    .long XEN_ELFNOTE_PHYS32_ENTRY
    .asciz "Xen"
    .long pvh_start

    .section .text.entry, "ax"
    .code32
    .globl pvh_start
pvh_start:
    cli
    cld
    movl %ebx, %esi                 /* hvm_start_info, kept for kmain */
    lgdt gdt_ptr
    movl $pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $0x20, %eax                 /* CR4.PAE */
    movl %eax, %cr4
    movl $MSR_EFER, %ecx
    rdmsr
    orl $0x100, %eax                /* EFER.LME */
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax           /* CR0.PG | CR0.PE */
    movl %eax, %cr0
    ljmp $0x08, $long_mode

    .code64
long_mode:
    movl $0x10, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    leaq stack_top(%rip), %rsp
    movl %esi, %edi
    call kmain
halt_forever:
    cli
    hlt
    jmp halt_forever

/* IRQ 0 (PIT channel 0) through the 8259, remapped to vector 0x20. */
    .globl timer_isr
timer_isr:
    pushq %rax
    incq jiffies(%rip)
    movb $0x20, %al                 /* non-specific EOI to the master PIC */
    outb %al, $0x20
    popq %rax
    iretq

/* Any other PIC vector (spurious IRQ 7/15, or a line we never unmask). */
    .globl ignore_isr
ignore_isr:
    iretq

/* CPU exceptions: report once and stop (the guest is broken; the host sees it idle). */
    .globl fault_isr
fault_isr:
    andq $-16, %rsp
    call fault_report
    jmp halt_forever

    .section .rodata
    .balign 8
gdt:
    .quad 0                         /* null */
    .quad 0x00af9a000000ffff        /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff        /* 0x10: flat data */
gdt_end:
gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt

/* Identity map of 0..4 GiB: PML4[0] -> PDPT, PDPT[0..3] -> four page directories of
 * 2 MiB pages (present, writable, PS; PCD|PWT for the local APIC's page). */
    .section .data.pagetables, "aw"
    .balign 4096
pml4:
    .quad pdpt + 0x3
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x0003
    .quad pd + 0x1003
    .quad pd + 0x2003
    .quad pd + 0x3003
    .fill 508, 8, 0
pd:
    .set page, 0
    .rept 2048
    .if page == 0x7f7                /* 0xfee00000: the local APIC, uncached */
    .quad (page << 21) | 0x9b
    .else
    .quad (page << 21) | 0x83
    .endif
    .set page, page + 1
    .endr

    .section .bss
    .balign 16
stack:
    .skip 16384
stack_top:

    .section .note.GNU-stack, "", @progbits
