#!/usr/bin/env python3
"""Live migration of the tiny guest, ours against QEMU, in one run.

For each case (512 MiB and 2 GiB, idle and dirty_mb=8) it alternates a migration by
`vmm` (two `vmm run` processes, `vmm migrate --json` over a unix socket) with one by
qemu-system-x86_64 -M microvm (two QEMU processes, QMP `migrate` over unix sockets,
bandwidth uncapped), ROUNDS times each, and prints the medians of total time, downtime and
bytes sent with ratios (ours / QEMU). It also draws bytes left per iteration (ours, from
`per_iteration`) beside QEMU's bytes remaining (polled from query-migrate) as an SVG.

Usage: scripts/bench-migrate.py [--rounds N] [--out DIR]   (needs a release build of vmm,
/dev/kvm and qemu-system-x86_64; scripts/bench-migrate.sh builds and installs).
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VMM = os.path.join(ROOT, "target", "release", "vmm")
CASES = [("512M", ""), ("2G", ""), ("512M", "dirty_mb=8"), ("2G", "dirty_mb=8")]


def wait_for(path, text, seconds):
    end = time.time() + seconds
    while time.time() < end:
        try:
            with open(path, errors="replace") as f:
                if text in f.read():
                    return True
        except FileNotFoundError:
            pass
        time.sleep(0.02)
    return False


def stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def settle(cmdline, out):
    """Lets the guest reach its steady state before migrating."""
    want = "verify ok" if cmdline else "tick 3"
    if not wait_for(out, want, 120):
        raise RuntimeError(f"the source never printed {want!r}: {out}")


def ours(work, memory, cmdline):
    for f in ("src.api", "dst.api", "mig.sock"):
        try:
            os.unlink(os.path.join(work, f))
        except FileNotFoundError:
            pass
    args = ["--memory", memory] + (["--cmdline", cmdline] if cmdline else [])
    src_out, dst_out = os.path.join(work, "src.out"), os.path.join(work, "dst.out")
    src = subprocess.Popen([VMM, "run", *args, "--api-socket", f"{work}/src.api"],
                           stdout=open(src_out, "w"), stderr=subprocess.STDOUT)
    dst = subprocess.Popen([VMM, "run", *args, "--api-socket", f"{work}/dst.api",
                            "--incoming", f"unix:{work}/mig.sock"],
                           stdout=open(dst_out, "w"), stderr=subprocess.STDOUT)
    try:
        settle(cmdline, src_out)
        r = subprocess.run([VMM, "migrate", "--api-socket", f"{work}/src.api",
                            "--to", f"unix:{work}/mig.sock", "--json"],
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"vmm migrate failed: {r.stderr.strip()}")
        j = json.loads(r.stdout.strip().splitlines()[-1])
        left = [it["remaining_bytes"] for it in j.get("per_iteration", [])]
        return j["total_ms"], j["downtime_ms"], j["transferred_bytes"], left
    finally:
        stop(src)
        stop(dst)


class Qmp:
    def __init__(self, path):
        end = time.time() + 10
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                if time.time() > end:
                    raise
                time.sleep(0.02)
        self.f = self.s.makefile("rw")
        self.f.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            msg = json.loads(self.f.readline())
            if "return" in msg or "error" in msg:
                return msg


def qemu(work, elf, memory, cmdline):
    base = ["qemu-system-x86_64", "-M", "microvm", "-enable-kvm", "-cpu",
            "host,-arch-capabilities", "-m", memory,
            "-display", "none", "-nodefaults", "-no-reboot", "-kernel", elf]
    if cmdline:
        base += ["-append", cmdline]
    for f in ("qsrc.qmp", "qdst.qmp", "qmig.sock"):
        try:
            os.unlink(os.path.join(work, f))
        except FileNotFoundError:
            pass
    src_out = os.path.join(work, "qsrc.out")
    src = subprocess.Popen(base + ["-serial", f"file:{src_out}", "-qmp",
                                   f"unix:{work}/qsrc.qmp,server=on,wait=off"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dst = subprocess.Popen(base + ["-serial", f"file:{work}/qdst.out", "-qmp",
                                   f"unix:{work}/qdst.qmp,server=on,wait=off",
                                   "-incoming", f"unix:{work}/qmig.sock"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        settle(cmdline, src_out)
        # The destination must be listening before the source connects.
        Qmp(f"{work}/qdst.qmp")
        end = time.time() + 10
        while not os.path.exists(f"{work}/qmig.sock") and time.time() < end:
            time.sleep(0.01)
        q = Qmp(f"{work}/qsrc.qmp")
        q.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
        q.cmd("migrate", uri=f"unix:{work}/qmig.sock")
        left = []
        end = time.time() + 300
        while time.time() < end:
            info = q.cmd("query-migrate")["return"]
            st = info.get("status")
            if "ram" in info:
                left.append(info["ram"]["remaining"])
            if st == "completed":
                return (info["total-time"], info.get("downtime", 0),
                        info["ram"]["transferred"], left)
            if st in ("failed", "cancelled"):
                raise RuntimeError(f"QEMU migration {st}: {info.get('error-desc', '')}")
            time.sleep(0.002)
        raise RuntimeError("QEMU migration did not complete in 300 s")
    finally:
        stop(src)
        stop(dst)


def svg(path, series):
    """One panel per case: bytes left per step, ours (blue) beside QEMU's (red)."""
    w, h, pad = 360, 220, 40
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w * 2}" '
             f'height="{h * 2}" font-family="sans-serif" font-size="11">']
    for i, (name, mine, theirs) in enumerate(series):
        ox, oy = (i % 2) * w, (i // 2) * h
        top = max([1] + mine + theirs)
        parts.append(f'<text x="{ox + pad}" y="{oy + 16}">{name}: bytes left per '
                     f'iteration (blue: vmm, red: QEMU samples); max {top} B</text>')
        parts.append(f'<rect x="{ox + pad}" y="{oy + 24}" width="{w - 2 * pad}" '
                     f'height="{h - 2 * pad}" fill="none" stroke="#888"/>')
        for data, colour in ((mine, "#1f5fbf"), (theirs, "#c0392b")):
            if not data:
                continue
            n = max(len(data) - 1, 1)
            pts = " ".join(
                f"{ox + pad + (w - 2 * pad) * k / n:.1f},"
                f"{oy + 24 + (h - 2 * pad) * (1 - v / top):.1f}"
                for k, v in enumerate(data))
            parts.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" '
                         f'stroke-width="2"/>')
    parts.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(parts))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "target", "bench-migrate"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    elf = os.path.join(a.out, "tiny.elf")
    subprocess.run([VMM, "tiny-kernel", elf], check=True)
    rows, series = [], []
    for memory, cmdline in CASES:
        name = f"{memory} {'idle' if not cmdline else cmdline}"
        mine, theirs = [], []
        for r in range(a.rounds):
            mine.append(ours(a.out, memory, cmdline))
            theirs.append(qemu(a.out, elf, memory, cmdline))
            print(f"{name} round {r + 1}: vmm {mine[-1][0]:.1f} ms "
                  f"(down {mine[-1][1]:.2f}), QEMU {theirs[-1][0]} ms "
                  f"(down {theirs[-1][1]})", flush=True)
        med = [statistics.median(x[k] for x in mine) for k in range(3)]
        qmed = [statistics.median(x[k] for x in theirs) for k in range(3)]
        rows.append((name, med, qmed))
        series.append((name, mine[-1][3], theirs[-1][3]))
    print()
    print(f"{'case':<18}{'total ms':>22}{'downtime ms':>24}{'bytes sent':>30}")
    print(f"{'':<18}{'vmm / QEMU (ratio)':>22}{'vmm / QEMU':>24}{'vmm / QEMU (ratio)':>30}")
    for name, m, q in rows:
        print(f"{name:<18}{m[0]:>8.1f} /{q[0]:>6} ({m[0] / max(q[0], 1e-9):.2f}x)"
              f"{m[1]:>12.2f} /{q[1]:>6}"
              f"{m[2]:>12} /{q[2]:>10} ({m[2] / max(q[2], 1):.2f}x)")
    pic = os.path.join(a.out, "bytes-left.svg")
    svg(pic, series)
    print(f"\npicture: {pic}")


if __name__ == "__main__":
    sys.exit(main())
