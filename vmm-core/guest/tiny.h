/*
 * Shared declarations of the tiny guest: port I/O, the serial console and the memory
 * writer/verifier. Freestanding C: no libc, no SSE (-mgeneral-regs-only), no red zone.
 */
#ifndef TINY_H
#define TINY_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

static inline void outb(u16 port, u8 v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

/* Serial console (16550 at 0x3f8). */
void puts(const char *s);
void put_dec(u64 v);
void put_hex(u64 v);

/* The memory writer/verifier behind dirty_mb=N. */
void dirty_setup(u64 base, u64 bytes);
int dirty_active(void);
void dirty_slice(void);

/* Optional probes (probe.c): bench=1, chaos=N, echo=1. */
void bench_run(void);
void chaos_run(u64 rounds, u64 ram_top);
void echo_poll(void);

#endif
