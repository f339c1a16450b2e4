/*
 * Optional behaviours of the tiny guest that test the VMM rather than migration:
 *
 *   bench=1   measure the guest's speed: count a three-instruction loop for 200 ms of PIT
 *             time and print `tiny: speed N kIPS` (thousands of guest instructions per
 *             second), so tests can tell a guest CPU that is too slow before they wait
 *   chaos=N   N rounds of garbage: reads and writes of random ports (all but the PIC, PIT,
 *             i8042 and COM1, which keep the guest alive), random bytes to COM1's
 *             transmitter, reads and writes of random addresses in the MMIO hole and above
 *             RAM; then `tiny: chaos done`
 *   echo=1    read COM1's receiver on every wake-up and print each line received as
 *             `tiny: input <line>`
 */
#include "tiny.h"

#define COM1 0x3f8

extern volatile u64 jiffies;

static u64 rng_state = 0x9e3779b97f4a7c15UL;

static u64 rng(void)
{
    u64 x = rng_state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    rng_state = x;
    return x;
}

void bench_run(void)
{
    u64 start = jiffies;
    while (jiffies == start) /* align to a PIT edge */
        __asm__ volatile("pause");
    start = jiffies;
    u64 n = 0;
    u64 until = start + 4; /* 4 jiffies at 20 Hz: 200 ms */
    __asm__ volatile("1: incq %0\n\t"
                     "cmpq %1, jiffies(%%rip)\n\t"
                     "jb 1b"
                     : "+r"(n)
                     : "r"(until)
                     : "memory", "cc");
    puts("tiny: speed ");
    put_dec(n * 3 * 5 / 1000); /* 3 instructions a loop, 5 windows a second, in k */
    puts(" kIPS\n");
}

static int port_is_vital(u16 port)
{
    return port == 0x20 || port == 0x21 || port == 0xa0 || port == 0xa1 || /* PICs */
           (port >= 0x40 && port <= 0x43) ||                              /* PIT */
           port == 0x60 || port == 0x64 ||                                /* i8042 */
           (port >= COM1 && port < COM1 + 8);                             /* console */
}

static volatile u8 *mmio_address(u64 r, u64 ram_top)
{
    /* Half the time the 32-bit MMIO hole below the IOAPIC, else just above RAM. */
    if (r & 1)
        return (volatile u8 *)(0xc0000000UL + ((r >> 1) % 0x3ec00000UL));
    return (volatile u8 *)(ram_top + ((r >> 1) % 0x1000000UL));
}

void chaos_run(u64 rounds, u64 ram_top)
{
    u64 sink = 0;
    rng_state ^= jiffies * 0x2545f4914f6cdd1dUL;
    for (u64 i = 0; i < rounds; i++) {
        u64 r = rng();
        u16 port = (u16)r;
        if (!port_is_vital(port)) {
            sink += inb(port);
            outb(port, (u8)(r >> 16));
        }
        outb(COM1, (u8)(r >> 24)); /* garbage on the serial line */
        if (ram_top < 0xc0000000UL) {
            volatile u8 *p = mmio_address(r >> 32, ram_top);
            sink += *p;
            *p = (u8)(r >> 8);
            volatile u32 *q = (volatile u32 *)((u64)p & ~3UL);
            sink += *q;
            *q = (u32)r;
        }
    }
    puts("\ntiny: chaos done ");
    put_dec(sink & 0xff);
    puts("\n");
}

static char line[80];
static u64 line_len;

void echo_poll(void)
{
    while (inb(COM1 + 5) & 1) { /* LSR: data ready */
        char c = (char)inb(COM1);
        if (c == '\r' || c == '\n' || line_len == sizeof(line) - 1) {
            line[line_len] = 0;
            if (line_len) {
                puts("tiny: input ");
                puts(line);
                puts("\n");
            }
            line_len = 0;
        } else {
            line[line_len++] = c;
        }
    }
}
