#!/usr/bin/env bash
# A live migration between two local processes: boots the tiny guest (512 MiB, dirtying
# 8 MiB in a loop) in a source VMM, starts a destination with --incoming, moves the guest
# over a unix socket with `vmm migrate`, shows its ticks going on at the destination,
# then cleans up. Usage: scripts/demo-migrate.sh [--json]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p vmm-core
vmm=target/release/vmm
d=$(mktemp -d /tmp/minivmm-demo.XXXXXX)
args=(--memory 512M --cmdline dirty_mb=8 --serial "stdio")
src=""; dst=""
cleanup() {
    [ -n "$src" ] && kill "$src" 2>/dev/null || true
    [ -n "$dst" ] && kill "$dst" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$d"
}
trap cleanup EXIT
"$vmm" run "${args[@]}" --api-socket "$d/src.api" </dev/null >"$d/src.out" 2>&1 & src=$!
"$vmm" run "${args[@]}" --api-socket "$d/dst.api" --incoming "unix:$d/mig.sock" </dev/null >"$d/dst.out" 2>&1 & dst=$!
for _ in $(seq 300); do grep -q "verify ok" "$d/src.out" && break; sleep 0.2; done
echo "== source (pid $src):"; grep -E "tick|verify" "$d/src.out" | tail -n 3
echo "== vmm migrate --to unix:$d/mig.sock ${1:-}"
"$vmm" migrate --api-socket "$d/src.api" --to "unix:$d/mig.sock" ${1:+"$1"}
wait "$src" && echo "== source exited with status 0"; src=""
sleep 2
echo "== destination (pid $dst), after the move:"; grep -E "tick|verify" "$d/dst.out" | head -n 6
"$vmm" status --api-socket "$d/dst.api" | grep '"state"'
