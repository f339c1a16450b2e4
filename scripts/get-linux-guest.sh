#!/usr/bin/env bash
# Builds the real Linux guest from Debian packages, without installing anything as root:
#
#   target/guest/vmlinuz            Debian's linux-image-cloud-amd64 bzImage
#   target/guest/vmlinux            its payload unpacked on the host (an ELF with a PVH note)
#   target/guest/initramfs.cpio.gz  busybox-static and a tiny /init that mounts proc, sys
#                                   and dev and runs a shell on the console (ttyS0)
#
# The .deb files are fetched with `apt-get download` into target/guest/cache (an
# `apt-get update` is tried once when the download fails) and unpacked with `dpkg-deb -x`.
# Idempotent: whatever already exists is kept (delete a file to rebuild it). Prints the
# three paths at the end. Needs apt-get, dpkg-deb, python3 and the payload's decompressor
# (zstd, xz, gzip, lz4 or bzip2, whichever Debian used).
set -euo pipefail
cd "$(dirname "$0")/.."

out="${GUEST_DIR:-target/guest}"
cache="$out/cache"
mkdir -p "$cache"
out="$(cd "$out" && pwd)"
cache="$out/cache"

log() { printf 'get-linux-guest: %s\n' "$*" >&2; }

# One build at a time (tests running in parallel may all ask for the guest).
exec 9>"$out/.lock"
flock 9

# download PACKAGE: the .deb of PACKAGE in the cache (downloaded once), its path on stdout.
download() {
  local pkg="$1" deb
  deb="$(find "$cache" -maxdepth 1 -name "${pkg}_*.deb" | head -n1)"
  if [ -z "$deb" ]; then
    log "downloading $pkg"
    if ! (cd "$cache" && apt-get download "$pkg" >/dev/null 2>&1); then
      log "apt-get download $pkg failed; running apt-get update once"
      apt-get update >/dev/null 2>&1 || log "apt-get update failed too"
      (cd "$cache" && apt-get download "$pkg" >/dev/null) || {
        log "cannot download $pkg"
        exit 1
      }
    fi
    deb="$(find "$cache" -maxdepth 1 -name "${pkg}_*.deb" | head -n1)"
  fi
  [ -n "$deb" ] || { log "no .deb for $pkg in $cache"; exit 1; }
  printf '%s\n' "$deb"
}

# The kernel: linux-image-cloud-amd64 is a metapackage depending on the versioned image.
if [ ! -s "$out/vmlinuz" ]; then
  meta="$(download linux-image-cloud-amd64)"
  image_pkg="$(dpkg-deb -f "$meta" Depends | tr ',' '\n' | sed 's/[ (].*//;s/^ *//' |
    grep -m1 '^linux-image-')" || { log "no linux-image dependency in $meta"; exit 1; }
  deb="$(download "$image_pkg")"
  rm -rf "$cache/kernel" && mkdir -p "$cache/kernel"
  dpkg-deb -x "$deb" "$cache/kernel"
  vmlinuz="$(find "$cache/kernel/boot" -name 'vmlinuz-*' | head -n1)"
  [ -n "$vmlinuz" ] || { log "no /boot/vmlinuz-* in $deb"; exit 1; }
  cp "$vmlinuz" "$out/vmlinuz.tmp" && mv "$out/vmlinuz.tmp" "$out/vmlinuz"
  rm -rf "$cache/kernel"
  log "kernel $image_pkg -> $out/vmlinuz"
fi

# vmlinux: the bzImage's compressed payload (boot protocol >= 2.08: payload_offset and
# payload_length in the setup header, relative to the protected-mode code after the
# setup sectors), decompressed by the tool its magic names. The kernel's build appends
# the uncompressed size (4 bytes) to the payload; it is not part of the compressed stream.
if [ ! -s "$out/vmlinux" ]; then
  python3 - "$out/vmlinuz" "$out/payload.tmp" <<'EOF' >"$out/payload.method"
import struct, sys
data = open(sys.argv[1], "rb").read()
if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
    sys.exit("not a bzImage (no HdrS setup header)")
version, = struct.unpack_from("<H", data, 0x206)
if version < 0x208:
    sys.exit("boot protocol %#x has no payload_offset" % version)
setup_sects = data[0x1f1] or 4
offset, length = struct.unpack_from("<II", data, 0x248)
start = (setup_sects + 1) * 512 + offset
payload = data[start:start + length]
magics = [(b"\x28\xb5\x2f\xfd", "zstd"), (b"\xfd7zXZ\x00", "xz"), (b"\x1f\x8b", "gzip"),
          (b"\x02\x21\x4c\x18", "lz4"), (b"BZh", "bzip2"), (b"\x5d\x00\x00", "lzma")]
for magic, method in magics:
    if payload.startswith(magic):
        break
else:
    sys.exit("unknown payload compression (magic %s)" % payload[:6].hex())
open(sys.argv[2], "wb").write(payload[:-4])
print(method)
EOF
  method="$(cat "$out/payload.method")"
  case "$method" in
  zstd) tool=(zstd -dq -c) ;;
  xz) tool=(xz -dq -c) ;;
  gzip) tool=(gzip -dq -c) ;;
  lz4) tool=(lz4 -dq -c) ;;
  bzip2) tool=(bzip2 -dq -c) ;;
  lzma) tool=(xz --format=lzma -dq -c) ;;
  esac
  command -v "${tool[0]}" >/dev/null || { log "the payload is $method: install ${tool[0]}"; exit 1; }
  # Trailing padding after the stream makes some tools complain; the output is checked below.
  "${tool[@]}" "$out/payload.tmp" >"$out/vmlinux.tmp" 2>/dev/null || true
  rm -f "$out/payload.tmp" "$out/payload.method"
  if [ "$(head -c4 "$out/vmlinux.tmp" | od -An -tx1 | tr -d ' \n')" != "7f454c46" ]; then
    rm -f "$out/vmlinux.tmp"
    log "the $method payload of $out/vmlinuz did not unpack to an ELF"
    exit 1
  fi
  mv "$out/vmlinux.tmp" "$out/vmlinux"
  log "unpacked the $method payload -> $out/vmlinux"
fi

# initramfs: busybox-static, /init, and the device nodes the kernel wants before devtmpfs
# is mounted (written into the archive directly: no mknod, no root).
if [ ! -s "$out/initramfs.cpio.gz" ]; then
  deb="$(download busybox-static)"
  rm -rf "$cache/busybox" && mkdir -p "$cache/busybox"
  dpkg-deb -x "$deb" "$cache/busybox"
  python3 - "$cache/busybox/bin/busybox" "$out/initramfs.tmp" <<'EOF'
import gzip, sys, time

INIT = b"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "minivmm-init: $(uname -r) up $(cut -d' ' -f1 /proc/uptime)s"
exec setsid cttyhack /bin/sh -l
"""
PROFILE = b"export PS1='minivmm:\\w# '\n"

busybox = open(sys.argv[1], "rb").read()
now = int(time.time())
ino = [1000]
out = bytearray()

def entry(name, mode, data=b"", rdev=(0, 0), nlink=1):
    ino[0] += 1
    fields = [ino[0], mode, 0, 0, nlink, now, len(data), 0, 0, rdev[0], rdev[1],
              len(name) + 1, 0]
    out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0")
    out.extend(b"\0" * (-len(out) % 4))
    out.extend(data)
    out.extend(b"\0" * (-len(out) % 4))

for d in ["bin", "dev", "etc", "proc", "sys", "tmp", "root"]:
    entry(d, 0o040755, nlink=2)
entry("bin/busybox", 0o100755, busybox)
entry("bin/sh", 0o120777, b"busybox")
entry("init", 0o100755, INIT)
entry("etc/profile", 0o100644, PROFILE)
entry("dev/console", 0o020600, rdev=(5, 1))
entry("dev/ttyS0", 0o020660, rdev=(4, 64))
entry("dev/null", 0o020666, rdev=(1, 3))
entry("TRAILER!!!", 0)
out.extend(b"\0" * (-len(out) % 512))
with open(sys.argv[2], "wb") as f:
    f.write(gzip.compress(bytes(out), 9, mtime=0))
EOF
  mv "$out/initramfs.tmp" "$out/initramfs.cpio.gz"
  rm -rf "$cache/busybox"
  log "busybox initramfs -> $out/initramfs.cpio.gz"
fi

printf '%s\n' "$out/vmlinuz" "$out/vmlinux" "$out/initramfs.cpio.gz"
