/*
 * The tiny guest's memory writer and verifier (dirty_mb=N on its command line).
 *
 * Round r writes every page of the area with a pattern derived from the page index and
 * the generation r (`rep stosq`, the fastest store an emulated guest has), then reads every
 * page back (`repe scasq`) and prints `verify ok round=r` or `verify FAIL page=P`. A page
 * that a live migration carried across stale or wrong shows up in the next verify pass.
 * The work is cut into slices of a few pages so that the main loop keeps printing ticks.
 */
#include "tiny.h"

#define PAGE_SIZE 4096UL
#define QWORDS_PER_PAGE (PAGE_SIZE / 8)
/* 16 pages (64 KiB) take a few ms at the 10-17 MiB/s an emulated `rep stos` reaches. */
#define SLICE_PAGES 16

static u64 area;       /* guest-physical (= virtual) start of the area */
static u64 pages;      /* its size in pages; 0 when off */
static u64 cursor;     /* next page of the current pass */
static u64 generation = 1;
static int verifying;  /* 0: write pass, 1: verify pass */
static u64 fail_page;  /* first bad page of this verify pass, or ~0 */
static u64 fail_found;
static u64 fail_want;

static u64 pattern(u64 page, u64 gen)
{
    return (0x7e57ULL << 48) | ((gen & 0xffff) << 32) | (page & 0xffffffff);
}

void dirty_setup(u64 base, u64 bytes)
{
    area = base;
    pages = bytes / PAGE_SIZE;
    fail_page = ~0UL;
}

int dirty_active(void)
{
    return pages != 0;
}

static void write_page(u64 page, u64 value)
{
    void *dst = (void *)(area + page * PAGE_SIZE);
    u64 count = QWORDS_PER_PAGE;
    __asm__ volatile("rep stosq" : "+D"(dst), "+c"(count) : "a"(value) : "memory");
}

/* Returns the number of qwords left when a mismatch stopped the scan (0 if none). */
static u64 check_page(u64 page, u64 value)
{
    const void *src = (const void *)(area + page * PAGE_SIZE);
    u64 count = QWORDS_PER_PAGE;
    u8 differs;
    __asm__ volatile("repe scasq\n\tsetne %2"
                     : "+D"(src), "+c"(count), "=q"(differs)
                     : "a"(value)
                     : "memory", "cc");
    return differs ? count + 1 : 0;
}

static void finish_pass(void)
{
    cursor = 0;
    if (!verifying) {
        verifying = 1;
        return;
    }
    if (fail_page == ~0UL) {
        puts("verify ok round=");
        put_dec(generation);
        puts("\n");
    } else {
        puts("verify FAIL page=");
        put_dec(fail_page);
        puts(" round=");
        put_dec(generation);
        puts(" found=");
        put_hex(fail_found);
        puts(" want=");
        put_hex(fail_want);
        puts("\n");
        fail_page = ~0UL;
    }
    verifying = 0;
    generation++;
}

void dirty_slice(void)
{
    u64 end = cursor + SLICE_PAGES;
    if (end > pages)
        end = pages;
    for (u64 p = cursor; p < end; p++) {
        u64 want = pattern(p, generation);
        if (!verifying) {
            write_page(p, want);
        } else if (fail_page == ~0UL) {
            u64 left = check_page(p, want);
            if (left) {
                fail_page = p;
                fail_want = want;
                fail_found = ((volatile u64 *)(area + p * PAGE_SIZE))[QWORDS_PER_PAGE - left];
            }
        }
    }
    cursor = end;
    if (cursor == pages)
        finish_pass();
}
