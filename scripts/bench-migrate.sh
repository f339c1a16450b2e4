#!/usr/bin/env bash
# Live migration of the tiny guest, vmm against qemu-system-x86_64 -M microvm, in one run.
#
#   scripts/bench-migrate.sh [ARGS]           # bench-migrate.py: over a local unix socket
#   scripts/bench-migrate.sh --shaped [ARGS]  # bench-postcopy.py: over a shaped link
#
# Without --shaped: 512 MiB and 2 GiB, idle and dirty_mb=8, alternating, medians of ROUNDS
# (default 3) of total time, downtime and bytes sent, printed as ratios (ours / QEMU), and
# an SVG of bytes left per iteration (target/bench-migrate/bytes-left.svg). See
# bench-migrate.py.
# With --shaped: a 512 MiB guest dirtying 8 MiB migrated between two network namespaces
# (scripts/netns-link.sh, default 40mbit and 20ms one way: --rate, --delay), pre-copy with
# and without auto-converge and post-copy, ours and QEMU's, alternating, medians of ROUNDS
# of total time, downtime, post-copy blocktime and bytes sent with ratios against QEMU,
# raw results in target/bench-postcopy/results.json. Needs root (namespaces). See
# bench-postcopy.py (its --help for the other ARGS).
# Needs /dev/kvm; installs qemu-system-x86 if missing (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -e /dev/kvm ] || { echo "SKIPPED: no /dev/kvm"; exit 0; }
shaped=0
args=()
for a in "$@"; do
  if [ "$a" = --shaped ]; then shaped=1; else args+=("$a"); fi
done
command -v qemu-system-x86_64 >/dev/null || scripts/setup.sh
cargo build --release --quiet -p vmm-core --bin vmm
if ((shaped)); then
  # The binary cargo just built, wherever CARGO_TARGET_DIR puts it.
  exec python3 scripts/bench-postcopy.py --rounds "${ROUNDS:-3}" \
    --vmm "${CARGO_TARGET_DIR:-target}/release/vmm" ${args[@]+"${args[@]}"}
fi
exec python3 scripts/bench-migrate.py --rounds "${ROUNDS:-3}" ${args[@]+"${args[@]}"}
