#!/usr/bin/env bash
# Installs what the test suite needs beyond cargo: gcc and binutils (the tiny guest is
# built from source by vmm-core's build.rs), qemu-system-x86 (the tiny guest is also
# booted under QEMU) and PyPI's qemu.qmp (the QMP tests' client); then builds the Linux
# guest (scripts/get-linux-guest.sh: Debian's kernel and busybox, no root install). Idempotent: installs only what is missing, needs
# root (or sudo) then.
set -euo pipefail

missing=()
command -v gcc >/dev/null 2>&1 || missing+=(gcc)
command -v ld >/dev/null 2>&1 || missing+=(binutils)
command -v qemu-system-x86_64 >/dev/null 2>&1 || missing+=(qemu-system-x86)
# Debian's bzImage payload (lz4 today; zstd or xz on other kernels) and the cpio writer.
command -v lz4 >/dev/null 2>&1 || missing+=(lz4)
command -v zstd >/dev/null 2>&1 || missing+=(zstd)
command -v xz >/dev/null 2>&1 || missing+=(xz-utils)
command -v python3 >/dev/null 2>&1 || missing+=(python3)

sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  "${sudo[@]}" apt-get update
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y "${missing[@]}"
fi

# PyPI's qemu.qmp (QMPClient): the QMP tests drive vmm and QEMU with it.
if ! python3 -c 'import qemu.qmp' 2>/dev/null; then
  echo "installing: qemu.qmp (PyPI)"
  command -v pip3 >/dev/null 2>&1 || python3 -m ensurepip --upgrade >/dev/null 2>&1 || {
    "${sudo[@]}" apt-get update && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y python3-pip
  }
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore 'qemu.qmp==0.0.6' \
    || python3 -m pip install --quiet --break-system-packages 'qemu.qmp==0.0.6'
fi

"$(dirname "$0")/get-linux-guest.sh" >/dev/null
