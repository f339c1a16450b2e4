#!/usr/bin/env bash
# bench-boot.sh — process start to the tiny guest's `tiny: boot`, our `vmm` (release build)
# against qemu-system-x86_64 -M microvm (and -M pc with --with-pc) booting the same ELF,
# runs alternated, medians and ratios printed (tests/src/bin/bench-boot.rs does the work).
#
# Usage: scripts/bench-boot.sh [--runs N] [--with-pc]    (needs /dev/kvm)
# Exit status: 0 when ours is at most 0.5x QEMU microvm, 1 when not, 2 on a setup error.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo build --release --quiet -p vmm-core --bin vmm -p minivmm-tests --bin bench-boot
target_dir=${CARGO_TARGET_DIR:-target}
exec "$target_dir/release/bench-boot" --vmm "$target_dir/release/vmm" "$@"
