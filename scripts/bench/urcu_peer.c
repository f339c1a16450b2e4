/*
 * urcu_peer.c — the liburcu (memb flavour) side of scripts/bench-rcu.sh.
 *
 * Measures the same four figures as rcu/benches/rcu_peers.rs, with the same loops, so
 * the two can be compared line by line:
 *   read   ns per rcu_read_lock + rcu_dereference + rcu_read_unlock, one thread;
 *   sync   synchronize_rcu latency (median, µs) with 0, 1 and 2 busy reader threads;
 *   callrcu call_rcu throughput, callbacks/s, including the final rcu_barrier;
 *   mix    two threads looking up random keys in a 16-node cds rculist, 1% of the
 *          operations replacing a node (mutex-serialized writer, call_rcu to free).
 * _LGPL_SOURCE inlines the read side, as liburcu intends for speed.
 *
 * Output: one line per figure, `RESULT <key> <value>`; the script parses those.
 * Usage: urcu_peer [rounds] [mix_ms] [only], `only` a comma-separated subset of
 * read,sync,callrcu,mix (default: all).
 */
#define _GNU_SOURCE
#define _LGPL_SOURCE
#define RCU_MEMB
#include <urcu.h>
#include <urcu/rculist.h>

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_ROUNDS 64
#define READ_ITERS 20000000UL
#define SYNC_PER_ROUND 100
#define CALLRCU_PER_ROUND 200000
#define MIX_NODES 16
#define MIX_THREADS 2

static int rounds = 7;
static int mix_ms = 300;
static const char *only = "";

/* True if the figure `what` was asked for. */
static int wanted(const char *what)
{
	size_t n = strlen(what);
	const char *p = only;
	if (!*only)
		return 1;
	while ((p = strstr(p, what)) != NULL) {
		if ((p == only || p[-1] == ',') && (p[n] == ',' || p[n] == 0))
			return 1;
		p += n;
	}
	return 0;
}

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

/* Keeps the compiler from dropping a value it cannot see used. */
#define SINK(x) __asm__ volatile("" : : "r"(x) : "memory")

static uint64_t xorshift(uint64_t *s)
{
	uint64_t x = *s;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	*s = x;
	return x;
}

/* ---- read side ---------------------------------------------------------------- */

struct cell {
	uint64_t value;
};
static struct cell *shared_cell;

static void bench_read(void)
{
	double ns[MAX_ROUNDS];
	for (int r = 0; r < rounds; r++) {
		double t0 = now_ns();
		for (unsigned long i = 0; i < READ_ITERS; i++) {
			rcu_read_lock();
			struct cell *c = rcu_dereference(shared_cell);
			SINK(c->value);
			rcu_read_unlock();
		}
		ns[r] = (now_ns() - t0) / READ_ITERS;
	}
	printf("RESULT read.ns.urcu %.3f\n", median(ns, rounds));
}

/* ---- synchronize with busy readers ----------------------------------------------- */

static volatile int readers_stop;
static int readers_running;

static void *busy_reader(void *arg)
{
	(void)arg;
	rcu_register_thread();
	uatomic_inc(&readers_running);
	while (!CMM_LOAD_SHARED(readers_stop)) {
		for (int i = 0; i < 1024; i++) {
			rcu_read_lock();
			struct cell *c = rcu_dereference(shared_cell);
			SINK(c->value);
			rcu_read_unlock();
		}
	}
	rcu_unregister_thread();
	return NULL;
}

static void bench_sync(int nreaders)
{
	static double us[MAX_ROUNDS * SYNC_PER_ROUND];
	pthread_t th[2];
	readers_stop = 0;
	for (int i = 0; i < nreaders; i++)
		pthread_create(&th[i], NULL, busy_reader, NULL);
	/* Time only grace periods that really have busy readers to wait for. */
	while (uatomic_read(&readers_running) < nreaders)
		caa_cpu_relax();
	int n = 0;
	for (int r = 0; r < rounds; r++) {
		for (int i = 0; i < SYNC_PER_ROUND; i++) {
			double t0 = now_ns();
			synchronize_rcu();
			us[n++] = (now_ns() - t0) / 1e3;
		}
	}
	CMM_STORE_SHARED(readers_stop, 1);
	for (int i = 0; i < nreaders; i++)
		pthread_join(th[i], NULL);
	readers_running = 0;
	printf("RESULT sync.us.%d.urcu %.3f\n", nreaders, median(us, n));
}

/* ---- call_rcu throughput --------------------------------------------------------- */

struct obj {
	uint64_t payload[4];
	struct rcu_head rcu;
};

static void free_obj(struct rcu_head *head)
{
	free(caa_container_of(head, struct obj, rcu));
}

static void bench_callrcu(void)
{
	double rate[MAX_ROUNDS];
	for (int r = 0; r < rounds; r++) {
		double t0 = now_ns();
		for (int i = 0; i < CALLRCU_PER_ROUND; i++) {
			struct obj *o = malloc(sizeof(*o));
			o->payload[0] = i;
			call_rcu(&o->rcu, free_obj);
		}
		rcu_barrier();
		rate[r] = CALLRCU_PER_ROUND / ((now_ns() - t0) / 1e9);
	}
	printf("RESULT callrcu.per_s.urcu %.0f\n", median(rate, rounds));
}

/* ---- read-mostly list mix -------------------------------------------------------- */

struct node {
	uint64_t key;
	uint64_t value;
	struct cds_list_head link;
	struct rcu_head rcu;
};

static CDS_LIST_HEAD(mix_list);
static pthread_mutex_t mix_writer = PTHREAD_MUTEX_INITIALIZER;
static volatile int mix_stop;

static void free_node(struct rcu_head *head)
{
	free(caa_container_of(head, struct node, rcu));
}

static void replace_node(uint64_t key)
{
	struct node *old;
	pthread_mutex_lock(&mix_writer);
	cds_list_for_each_entry(old, &mix_list, link) {
		if (old->key == key) {
			struct node *n = malloc(sizeof(*n));
			n->key = key;
			n->value = old->value + 1;
			cds_list_replace_rcu(&old->link, &n->link);
			call_rcu(&old->rcu, free_node);
			break;
		}
	}
	pthread_mutex_unlock(&mix_writer);
}

struct mix_arg {
	uint64_t seed;
	uint64_t ops;
};

static void *mix_thread(void *p)
{
	struct mix_arg *a = p;
	uint64_t s = a->seed, ops = 0;
	rcu_register_thread();
	while (!CMM_LOAD_SHARED(mix_stop)) {
		for (int i = 0; i < 256; i++) {
			uint64_t x = xorshift(&s);
			uint64_t key = (x >> 8) % MIX_NODES;
			if ((x >> 32) % 100 == 0) {
				replace_node(key);
			} else {
				struct node *n;
				rcu_read_lock();
				cds_list_for_each_entry_rcu(n, &mix_list, link) {
					if (n->key == key) {
						SINK(n->value);
						break;
					}
				}
				rcu_read_unlock();
			}
		}
		ops += 256;
	}
	rcu_unregister_thread();
	a->ops = ops;
	return NULL;
}

static void bench_mix(void)
{
	double mops[MAX_ROUNDS];
	for (uint64_t k = 0; k < MIX_NODES; k++) {
		struct node *n = malloc(sizeof(*n));
		n->key = k;
		n->value = 0;
		cds_list_add_tail_rcu(&n->link, &mix_list);
	}
	for (int r = 0; r < rounds; r++) {
		pthread_t th[MIX_THREADS];
		struct mix_arg args[MIX_THREADS];
		mix_stop = 0;
		double t0 = now_ns();
		for (int i = 0; i < MIX_THREADS; i++) {
			args[i].seed = 0x9e3779b97f4a7c15ULL * (uint64_t)(r * MIX_THREADS + i + 1);
			pthread_create(&th[i], NULL, mix_thread, &args[i]);
		}
		struct timespec d = { mix_ms / 1000, (long)(mix_ms % 1000) * 1000000L };
		nanosleep(&d, NULL);
		CMM_STORE_SHARED(mix_stop, 1);
		uint64_t ops = 0;
		for (int i = 0; i < MIX_THREADS; i++) {
			pthread_join(th[i], NULL);
			ops += args[i].ops;
		}
		mops[r] = ops / ((now_ns() - t0) / 1e9) / 1e6;
		rcu_barrier();
	}
	printf("RESULT mix.mops.urcu %.2f\n", median(mops, rounds));
}

int main(int argc, char **argv)
{
	if (argc > 1)
		rounds = atoi(argv[1]);
	if (argc > 2)
		mix_ms = atoi(argv[2]);
	if (argc > 3)
		only = argv[3];
	if (rounds < 1 || rounds > MAX_ROUNDS || mix_ms < 1) {
		fprintf(stderr, "usage: %s [rounds 1..%d] [mix_ms >= 1]\n", argv[0], MAX_ROUNDS);
		return 2;
	}
	shared_cell = malloc(sizeof(*shared_cell));
	shared_cell->value = 42;
	/* The main thread stays registered (idle) throughout, as it does in the Rust
	 * binary, whose threads cannot unregister before they exit. */
	rcu_register_thread();
	if (wanted("read"))
		bench_read();
	fflush(stdout);
	for (int n = 0; n <= 2 && wanted("sync"); n++) {
		bench_sync(n);
		fflush(stdout);
	}
	if (wanted("callrcu"))
		bench_callrcu();
	fflush(stdout);
	if (wanted("mix"))
		bench_mix();
	rcu_unregister_thread();
	return 0;
}
