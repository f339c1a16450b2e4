#!/usr/bin/env bash
# Runs every test of the workspace, the way CI does: vmm-core's layering, format, lint and
# docs, the whole test suite (unit, integration, KVM, short torture runs), the rcu crate's
# data-structure and API tests under Miri, then the loom models of the rcu crate.
# Idempotent; needs cargo (cargo-nextest is used when present), what scripts/setup.sh
# installs (gcc/binutils for the tiny guest, qemu-system-x86 for the side-by-side boot, the
# Linux guest) and the nightly toolchain's miri component (added when missing, see
# scripts/miri.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "setup (scripts/setup.sh)"
scripts/setup.sh

step "vmm-core's rooms: no arrow upward (scripts/check-layers.sh, then its self-test)"
scripts/check-layers.sh
scripts/check-layers.sh --self-test

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "cargo doc -D warnings (every intra-doc link resolves)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --document-private-items --quiet

step "test suite"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
  # nextest does not run doctests.
  cargo test --workspace --doc --quiet
else
  # Without nextest, tests of one binary share a process: some (thread registration
  # counts, the call_rcu batch lock) observe process-wide RCU state, so run them one by one.
  cargo test --workspace --no-fail-fast -- --test-threads=1
fi

step "miri (rcu data structures and API, fence mode; Stacked and Tree Borrows)"
scripts/miri.sh

step "loom models (rcu)"
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target-loom \
  cargo test -p rcu --release --test loom --test loom_qsbr --quiet -- --test-threads=2

echo
echo "all tests passed"
