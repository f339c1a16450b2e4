/*
 * The tiny guest kernel: prints `tiny: boot`, then `tick N` about every 100 ms, and with
 * dirty_mb=N on its command line keeps rewriting and verifying N MiB of its memory.
 *
 * Clock: PIT channel 0 at 20 Hz, IRQ 0 through the 8259 PIC (vector 0x20). Both our VMM
 * (in-kernel irqchip and PIT) and QEMU provide them, and the guest sleeps in `hlt` between
 * interrupts, so an idle guest costs its host almost nothing. Every guest instruction is
 * emulated on the machines this runs on (~1000x slower than native): boot does a few
 * hundred instructions and a few dozen port writes before the first line.
 *
 * Command line (hvm_start_info.cmdline_paddr), space-separated:
 *   dirty_mb=N     rewrite and verify N MiB from 4 MiB up (see dirty.c)
 *   exit_after=N   after tick N, reset through the i8042 (port 0x64, 0xfe), else by a
 *                  triple fault
 *   crash_after=N  after tick N, triple-fault (tests how a VMM reports a crashed guest)
 *   bench=1, chaos=N, echo=1  probes of the VMM (see probe.c)
 */
#include "tiny.h"

#define COM1 0x3f8
#define PIT_HZ 1193182UL
#define TIMER_HZ 20UL
#define JIFFIES_PER_TICK (TIMER_HZ / 10)
#define HVM_START_MAGIC 0x336ec578U
#define E820_RAM 1
#define DIRTY_BASE (4UL << 20)

/* The PVH boot structures (xen/include/public/arch-x86/hvm/start_info.h). */
struct hvm_start_info {
    u32 magic;
    u32 version;
    u32 flags;
    u32 nr_modules;
    u64 modlist_paddr;
    u64 cmdline_paddr;
    u64 rsdp_paddr;
    u64 memmap_paddr;
    u32 memmap_entries;
    u32 reserved;
};

struct hvm_memmap_entry {
    u64 addr;
    u64 size;
    u32 type;
    u32 reserved;
};

struct idt_gate {
    u16 offset_low;
    u16 selector;
    u8 ist;
    u8 type;
    u16 offset_mid;
    u32 offset_high;
    u32 zero;
};

struct __attribute__((packed)) idt_ptr {
    u16 limit;
    u64 base;
};

/* Incremented by timer_isr (entry.S) at TIMER_HZ. */
volatile u64 jiffies;

extern void timer_isr(void);
extern void ignore_isr(void);
extern void fault_isr(void);

static struct idt_gate idt[48];

/* The local APIC's registers (xAPIC MMIO; mapped uncached by entry.S). */
static volatile u32 *const lapic = (volatile u32 *)0xfee00000UL;

void puts(const char *s)
{
    for (; *s; s++) {
        while (!(inb(COM1 + 5) & 0x20)) /* LSR: transmit holding register empty */
            ;
        outb(COM1, (u8)*s);
    }
}

void put_dec(u64 v)
{
    char buf[21];
    int i = 20;
    buf[i] = 0;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    puts(&buf[i]);
}

void put_hex(u64 v)
{
    char buf[19];
    buf[0] = '0';
    buf[1] = 'x';
    for (int i = 0; i < 16; i++)
        buf[2 + i] = "0123456789abcdef"[(v >> (60 - 4 * i)) & 0xf];
    buf[18] = 0;
    puts(buf);
}

void fault_report(void)
{
    puts("tiny: CPU exception, halting\n");
}

static void set_gate(int vec, void (*handler)(void))
{
    u64 a = (u64)handler;
    idt[vec].offset_low = (u16)a;
    idt[vec].selector = 0x08;
    idt[vec].ist = 0;
    idt[vec].type = 0x8e; /* present, DPL 0, 64-bit interrupt gate */
    idt[vec].offset_mid = (u16)(a >> 16);
    idt[vec].offset_high = (u32)(a >> 32);
    idt[vec].zero = 0;
}

static void interrupts_setup(void)
{
    for (int v = 0; v < 32; v++)
        set_gate(v, fault_isr);
    set_gate(32, timer_isr);
    for (int v = 33; v < 48; v++)
        set_gate(v, ignore_isr);
    struct idt_ptr p = { sizeof(idt) - 1, (u64)idt };
    __asm__ volatile("lidt %0" : : "m"(p));

    /* Local APIC: software enabled (spurious vector 0x2f) with LINT0 as ExtINT, so the
     * 8259's interrupts reach the CPU whatever firmware (or none) ran before us. */
    lapic[0xf0 / 4] = 0x100 | 0x2f;
    lapic[0x350 / 4] = 0x700;
    lapic[0x360 / 4] = 0x400;

    /* 8259 pair: edge triggered, cascaded, vectors 0x20/0x28, only IRQ 0 unmasked. */
    outb(0x20, 0x11);
    outb(0xa0, 0x11);
    outb(0x21, 0x20);
    outb(0xa1, 0x28);
    outb(0x21, 0x04);
    outb(0xa1, 0x02);
    outb(0x21, 0x01);
    outb(0xa1, 0x01);
    outb(0x21, 0xfe);
    outb(0xa1, 0xff);

    /* PIT channel 0, mode 2 (rate generator), binary, lobyte then hibyte. */
    u16 divisor = (u16)((PIT_HZ + TIMER_HZ / 2) / TIMER_HZ);
    outb(0x43, 0x34);
    outb(0x40, (u8)divisor);
    outb(0x40, (u8)(divisor >> 8));
}

/* The value of `key=` (a decimal number) on the command line, or `dflt`. */
static u64 cmdline_number(const char *cmdline, const char *key, u64 dflt)
{
    if (!cmdline)
        return dflt;
    for (const char *p = cmdline; *p; p++) {
        if (p != cmdline && p[-1] != ' ')
            continue;
        const char *k = key, *q = p;
        while (*k && *q == *k) {
            k++;
            q++;
        }
        if (*k)
            continue;
        u64 v = 0;
        while (*q >= '0' && *q <= '9')
            v = v * 10 + (u64)(*q++ - '0');
        return v;
    }
    return dflt;
}

/* End of the RAM entry of the memory map that holds `addr`, or 0. Also the RAM total. */
static u64 ram_end_from(const struct hvm_start_info *si, u64 addr, u64 *total)
{
    u64 end = 0;
    *total = 0;
    if (si->version < 1 || !si->memmap_paddr)
        return 0;
    const struct hvm_memmap_entry *e = (const void *)si->memmap_paddr;
    for (u32 i = 0; i < si->memmap_entries; i++) {
        if (e[i].type != E820_RAM)
            continue;
        *total += e[i].size;
        if (e[i].addr <= addr && addr < e[i].addr + e[i].size)
            end = e[i].addr + e[i].size;
    }
    return end;
}

static void dirty_init(const struct hvm_start_info *si, const char *cmdline)
{
    u64 mb = cmdline_number(cmdline, "dirty_mb=", 0);
    u64 total;
    u64 end = ram_end_from(si, DIRTY_BASE, &total);
    puts("tiny: memory ");
    put_dec(total >> 20);
    puts(" MiB\n");
    if (!mb)
        return;
    u64 bytes = mb << 20;
    if (end < DIRTY_BASE + bytes) {
        bytes = end > DIRTY_BASE ? (end - DIRTY_BASE) & ~0xfffffUL : 0;
        puts("tiny: dirty_mb too large for RAM, using ");
        put_dec(bytes >> 20);
        puts("\n");
    }
    dirty_setup(DIRTY_BASE, bytes);
    puts("tiny: dirtying ");
    put_dec(bytes >> 20);
    puts(" MiB\n");
}

/* A triple fault: an exception with an empty IDT. */
static void triple_fault(void)
{
    struct idt_ptr none = { 0, 0 };
    __asm__ volatile("lidt %0\n\tint3" : : "m"(none));
}

/* Resets the machine through the i8042; where there is none (QEMU's microvm), by a triple
 * fault, which QEMU -no-reboot also ends on. */
static void reset(void)
{
    puts("tiny: reset\n");
    outb(0x64, 0xfe);
    triple_fault();
}

void kmain(u32 start_info)
{
    puts("tiny: boot\n");

    const struct hvm_start_info *si = (const void *)(u64)start_info;
    const char *cmdline = 0;
    if (si->magic != HVM_START_MAGIC) {
        puts("tiny: bad hvm_start_info magic\n");
        si = 0;
    } else if (si->cmdline_paddr) {
        cmdline = (const char *)si->cmdline_paddr;
        puts("tiny: cmdline: ");
        puts(cmdline);
        puts("\n");
    }
    u64 exit_after = cmdline_number(cmdline, "exit_after=", 0);
    u64 crash_after = cmdline_number(cmdline, "crash_after=", 0);
    if (si)
        dirty_init(si, cmdline);
    u64 echo = cmdline_number(cmdline, "echo=", 0);
    u64 chaos = cmdline_number(cmdline, "chaos=", 0);

    interrupts_setup();
    __asm__ volatile("sti");
    if (cmdline_number(cmdline, "bench=", 0))
        bench_run();
    if (chaos) {
        u64 total = 0;
        u64 top = si ? ram_end_from(si, 1UL << 20, &total) : 0;
        chaos_run(chaos, top ? top : 0xc0000000UL);
    }

    u64 tick = 0;
    for (;;) {
        u64 now = jiffies / JIFFIES_PER_TICK;
        if (now != tick) {
            tick = now;
            puts("tick ");
            put_dec(tick);
            puts("\n");
            if (exit_after && tick >= exit_after) {
                reset();
            }
            if (crash_after && tick >= crash_after) {
                puts("tiny: triple fault\n");
                triple_fault();
            }
        }
        if (echo)
            echo_poll();
        if (dirty_active()) {
            dirty_slice();
            continue;
        }
        /* Sleep until the next interrupt; `sti; hlt` cannot miss one that fires between
         * the check and the hlt (sti takes effect after the next instruction). */
        __asm__ volatile("cli");
        if (jiffies / JIFFIES_PER_TICK == tick)
            __asm__ volatile("sti; hlt" : : : "memory");
        else
            __asm__ volatile("sti");
    }
}
