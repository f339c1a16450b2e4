#!/usr/bin/env bash
# bench-rcu.sh — our userspace RCU (the rcu crate) against liburcu-memb, crossbeam-epoch,
# arc-swap and std's RwLock, in one run, on one table, with the issue's targets checked;
# and our QSBR readers' read side against liburcu-qsbr's.
#
# Builds the C harnesses scripts/bench/urcu_peer.c and urcu_qsbr_peer.c against Debian's
# liburcu-dev (installed here if missing) and the Rust bench rcu/benches/rcu_peers.rs,
# then runs them
# alternately PASSES times (the machine is shared and has 2 CPUs: alternating gives both
# the same conditions) and reports, per figure, the median over passes of each pass's
# median over ROUNDS rounds. Both binaries print `RESULT <key> <value>` lines.
#
# Environment: PASSES (default 3), ROUNDS (default 5), MIX_MS (default 300 ms per mix
# round), CARGO_TARGET_DIR (default target). A full run takes about a minute.
# Exit status: 0 when every target is met, 1 when one is missed, 2 on a setup error.
set -euo pipefail
cd "$(dirname "$0")/.."

PASSES=${PASSES:-3}
ROUNDS=${ROUNDS:-5}
MIX_MS=${MIX_MS:-300}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
OUT="$CARGO_TARGET_DIR/bench-rcu"
mkdir -p "$OUT"

for v in PASSES ROUNDS MIX_MS; do
  if ! [[ ${!v} =~ ^[1-9][0-9]*$ ]]; then
    echo "bench-rcu: $v=${!v} is not a positive integer" >&2
    exit 2
  fi
done

# liburcu-dev: install once (apt-get update only if the plain install fails).
if ! dpkg -s liburcu-dev >/dev/null 2>&1; then
  echo "==> installing liburcu-dev"
  if ! apt-get install -y liburcu-dev >"$OUT/apt.log" 2>&1; then
    apt-get update >>"$OUT/apt.log" 2>&1
    apt-get install -y liburcu-dev >>"$OUT/apt.log" 2>&1 || {
      echo "bench-rcu: cannot install liburcu-dev (see $OUT/apt.log)" >&2
      exit 2
    }
  fi
fi
URCU_VERSION=$(dpkg-query -W -f '${Version}' liburcu-dev)

echo "==> building the C harness (liburcu-memb $URCU_VERSION, _LGPL_SOURCE inlined read side)"
gcc -O2 -Wall -Wextra -o "$OUT/urcu_peer" scripts/bench/urcu_peer.c -lurcu-memb -lpthread
gcc -O2 -Wall -Wextra -o "$OUT/urcu_qsbr_peer" scripts/bench/urcu_qsbr_peer.c -lurcu-qsbr -lpthread

echo "==> building rcu/benches/rcu_peers.rs"
RUST_BIN=$(cargo bench -p rcu --bench rcu_peers --no-run --message-format=json 2>"$OUT/cargo.log" |
  python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") \
            and m["target"]["name"] == "rcu_peers":
        print(m["executable"])
') || true
if [[ -z $RUST_BIN || ! -x $RUST_BIN ]]; then
  echo "bench-rcu: cargo did not build the rcu_peers bench:" >&2
  tail -20 "$OUT/cargo.log" >&2
  exit 2
fi

read -r LOAD1 _ </proc/loadavg
echo "==> $PASSES passes x $ROUNDS rounds (mix rounds ${MIX_MS} ms); $(nproc) CPUs; load average $LOAD1 before start"
RESULTS="$OUT/results.txt"
: >"$RESULTS"
for pass in $(seq 1 "$PASSES"); do
  echo "    pass $pass/$PASSES: liburcu"
  "$OUT/urcu_peer" "$ROUNDS" "$MIX_MS" | sed "s/^/$pass /" >>"$RESULTS"
  "$OUT/urcu_qsbr_peer" "$ROUNDS" | sed "s/^/$pass /" >>"$RESULTS"
  echo "    pass $pass/$PASSES: rust (ours, crossbeam-epoch, arc-swap, RwLock)"
  RCU_BENCH_ROUNDS=$ROUNDS RCU_BENCH_MIX_MS=$MIX_MS "$RUST_BIN" | sed "s/^/$pass /" >>"$RESULTS"
done
read -r LOAD2 _ </proc/loadavg

python3 - "$RESULTS" "$LOAD1" "$LOAD2" "$(nproc)" <<'EOF'
import statistics, sys
from collections import defaultdict

path, load1, load2, ncpu = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
vals = defaultdict(list)
for line in open(path):
    f = line.split()
    if len(f) == 4 and f[1] == "RESULT":
        try:
            vals[f[2]].append(float(f[3]))
        except ValueError:
            print(f"bench-rcu: ignoring a malformed result line: {line.strip()!r}")
    elif len(f) >= 2 and f[1] == "INFO":
        info = " ".join(f[2:])
        if info.startswith("barrier_mode") and f[0] == "1":
            print("    " + info)
fig = {k: statistics.median(v) for k, v in vals.items()}
spread = {k: (min(v), max(v)) for k, v in vals.items()}

PEERS = [("urcu", "liburcu-memb"), ("crossbeam", "crossbeam-epoch"),
         ("arcswap", "arc-swap"), ("rwlock", "RwLock")]
# (label, key prefix, unit, scale, lower is better)
ROWS = [
    ("read section, 1 thread", "read.ns", "ns", 1, True),
    ("synchronize, 0 busy readers", "sync.us.0", "us", 1, True),
    ("synchronize, 1 busy reader", "sync.us.1", "us", 1, True),
    ("synchronize, 2 busy readers", "sync.us.2", "us", 1, True),
    ("call_rcu + drain", "callrcu.per_s", "M cb/s", 1e-6, False),
    ("read-mostly list mix, 2 thr", "mix.mops", "M ops/s", 1, False),
    ("QSBR read (vs liburcu-qsbr)", "qsbr.read.ns", "ns", 1, True),
    ("QSBR read + quiescent state", "qsbr.readqs.ns", "ns", 1, True),
]

def cell(v):
    if v is None:
        return "-"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"

print()
head = f"{'figure':<30}{'unit':<9}{'ours':>9}"
for _, name in PEERS:
    head += f"{name:>24}"
print(head)
print("-" * len(head))
for label, prefix, unit, scale, lower in ROWS:
    ours = fig.get(prefix + ".ours")
    line = f"{label:<30}{unit:<9}{cell(ours * scale if ours is not None else None):>9}"
    for key, _ in PEERS:
        v = fig.get(f"{prefix}.{key}")
        if v is None:
            line += f"{'-':>24}"
            continue
        ratio = f" ({ours / v:.2f}x)" if ours is not None and v > 0 else ""
        line += f"{cell(v * scale) + ratio:>24}"
    print(line)
print("(x) = ours / peer: below 1 is better for ns and us, above 1 for throughput.")
print("The QSBR rows' liburcu column is liburcu-qsbr (urcu_qsbr_peer.c).")
print("spread (min..max over passes) of the contested figures:")
for k in ("read.ns.ours", "read.ns.urcu", "sync.us.1.ours", "sync.us.1.urcu",
          "mix.mops.ours", "mix.mops.urcu", "qsbr.read.ns.ours", "qsbr.read.ns.urcu"):
    if k in spread:
        lo, hi = spread[k]
        print(f"    {k:<18} {lo:.3g} .. {hi:.3g}")

print()
missed = 0
def target(text, ok):
    global missed
    if ok is None:
        print(f"NOT MEASURED  {text}")
        missed += 1
        return
    print(f"{'MET   ' if ok else 'MISSED'}  {text}")
    missed += 0 if ok else 1

g = fig.get
r_ours, r_urcu, r_cb = g("read.ns.ours"), g("read.ns.urcu"), g("read.ns.crossbeam")
m_ours, m_urcu = g("mix.mops.ours"), g("mix.mops.urcu")
have = lambda *xs: all(x is not None for x in xs)
target(f"read side no slower than liburcu-memb ({cell(r_ours)} <= {cell(r_urcu)} ns)",
       r_ours <= r_urcu if have(r_ours, r_urcu) else None)
target(f"read side at most half of crossbeam-epoch pin+load ({cell(r_ours)} <= {cell(r_cb and r_cb / 2)} ns)",
       r_ours <= r_cb / 2 if have(r_ours, r_cb) else None)
target(f"read-mostly mix at least liburcu-memb ({cell(m_ours)} >= {cell(m_urcu)} M ops/s)",
       m_ours >= m_urcu if have(m_ours, m_urcu) else None)
if max(load1, load2) > 0.5:
    print(f"note: the load average was {load1:.2f} / {load2:.2f} (before / after) on {ncpu} CPUs:"
          " other processes shared the CPUs, so busy readers did not always run in parallel"
          " with the grace period (synchronize figures then drop to the no-IPI cost).")
sys.exit(1 if missed else 0)
EOF
