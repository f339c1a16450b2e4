/*
 * urcu_qsbr_peer.c — the liburcu-qsbr side of scripts/bench-rcu.sh, against the QSBR
 * read side of rcu/benches/rcu_peers.rs (`qsbr` figures), with the same loops:
 *   qsbr.read    ns per rcu_read_lock + rcu_dereference + rcu_read_unlock of a registered
 *                qsbr thread (lock and unlock are empty in this flavour), one thread;
 *   qsbr.readqs  the same plus rcu_quiescent_state() after every read.
 * _LGPL_SOURCE inlines the read side, as liburcu intends for speed.
 *
 * Output: `RESULT <key> <value>` lines. Usage: urcu_qsbr_peer [rounds].
 */
#define _GNU_SOURCE
#define _LGPL_SOURCE
#include <urcu-qsbr.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define MAX_ROUNDS 64
#define READ_ITERS 20000000UL

struct cell {
	uint64_t value;
};
static struct cell *shared_cell;

/* Keeps the compiler from dropping a value it cannot see used. */
#define SINK(x) __asm__ volatile("" : : "r"(x) : "memory")

static double now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

static double median(double *v, int n)
{
	qsort(v, n, sizeof(*v), cmp_double);
	return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

int main(int argc, char **argv)
{
	int rounds = argc > 1 ? atoi(argv[1]) : 7;
	if (rounds < 1 || rounds > MAX_ROUNDS) {
		fprintf(stderr, "usage: %s [rounds 1..%d]\n", argv[0], MAX_ROUNDS);
		return 2;
	}
	shared_cell = malloc(sizeof(*shared_cell));
	if (!shared_cell)
		return 2;
	shared_cell->value = 42;
	rcu_register_thread();
	double read[MAX_ROUNDS], readqs[MAX_ROUNDS];
	for (int r = 0; r < rounds; r++) {
		double t0 = now_ns();
		for (unsigned long i = 0; i < READ_ITERS; i++) {
			rcu_read_lock();
			struct cell *c = rcu_dereference(shared_cell);
			SINK(c->value);
			rcu_read_unlock();
		}
		read[r] = (now_ns() - t0) / READ_ITERS;
		t0 = now_ns();
		for (unsigned long i = 0; i < READ_ITERS; i++) {
			rcu_read_lock();
			struct cell *c = rcu_dereference(shared_cell);
			SINK(c->value);
			rcu_read_unlock();
			rcu_quiescent_state();
		}
		readqs[r] = (now_ns() - t0) / READ_ITERS;
	}
	rcu_unregister_thread();
	printf("RESULT qsbr.read.ns.urcu %.3f\n", median(read, rounds));
	printf("RESULT qsbr.readqs.ns.urcu %.3f\n", median(readqs, rounds));
	free(shared_cell);
	return 0;
}
