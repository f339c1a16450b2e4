#!/usr/bin/env bash
# Live migration of the tiny guest, vmm against qemu-system-x86_64 -M microvm, in one run:
# 512 MiB and 2 GiB, idle and dirty_mb=8, alternating, medians of ROUNDS (default 3) of
# total time, downtime and bytes sent, printed as ratios (ours / QEMU), and an SVG of
# bytes left per iteration (target/bench-migrate/bytes-left.svg). See bench-migrate.py.
# Needs /dev/kvm; installs qemu-system-x86 if missing (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -e /dev/kvm ] || { echo "SKIPPED: no /dev/kvm"; exit 0; }
command -v qemu-system-x86_64 >/dev/null || scripts/setup.sh
cargo build --release --quiet -p vmm-core --bin vmm
exec python3 scripts/bench-migrate.py --rounds "${ROUNDS:-3}" "$@"
