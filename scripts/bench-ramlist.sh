#!/usr/bin/env bash
# Runs the ramlist benchmarks and prints their summaries (ratios at the end of each):
#  - ram_lookup: ram_addr -> host lookups/s, RamList (RCU) vs vm-memory GuestMemoryAtomic
#    (arc-swap), 1 and 2 threads, while a block is hot-added/removed every millisecond;
#  - dirty_sync: KVM dirty-log sync + bitmap walk for 1 and 4 GiB, ns per page, ours vs a
#    plain GET-and-test-every-bit baseline (needs /dev/kvm; prints SKIPPED without it);
#  - pagemap: the "pages ever written" scan of a 2 GiB block from /proc/self/pagemap
#    (untouched, and with every 64th page written; median of 20) against reading every
#    page of an untouched 2 GiB block. Target: untouched well under 100 ms (DESIGN.md: ~5).
# Extra arguments go to criterion (e.g. a filter such as `uniform`).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
for bench in ram_lookup dirty_sync; do
    echo "=== ramlist bench: $bench"
    cargo bench -p ramlist --bench "$bench" -- "$@" 2>&1 |
        grep -vE '^(Benchmarking|Found|  [0-9]+ \(|Warming|Collecting|Analyzing)' || true
done
echo "=== ramlist bench: pagemap"
cargo test --release -p ramlist --test pagemap --quiet -- --ignored --nocapture pagemap_timing 2>&1 |
    grep -E '^pagemap' || true
