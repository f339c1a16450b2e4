#!/usr/bin/env python3
"""Live migration of the tiny guest, ours against QEMU, in one run.

For each case (512 MiB and 2 GiB, idle and dirty_mb=8) it alternates a migration by
`vmm` (two `vmm run` processes, `vmm migrate --json` over a unix socket) with one by
qemu-system-x86_64 -M microvm (two QEMU processes, QMP `migrate` over unix sockets,
bandwidth uncapped), ROUNDS times each, and prints the medians of total time, downtime and
bytes sent with ratios (ours / QEMU). It also draws bytes left per iteration (ours, from
`per_iteration`) beside QEMU's bytes remaining (polled from query-migrate) as an SVG.

Usage: scripts/bench-migrate.py [--rounds N] [--out DIR] [--vmm PATH]
(needs a release build of vmm, or the one --vmm names, /dev/kvm and qemu-system-x86_64;
scripts/bench-migrate.sh builds and installs).
"""
import argparse
import json
import math
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
        # (ms since the migrate command, bytes still to send): all of RAM at the start,
        # then what each iteration left.
        t = j.get("setup_ms", 0.0)
        left = [(0.0, j.get("ram_bytes") or parse_size(memory))]
        for it in j.get("per_iteration", []):
            t += it["ms"]
            left.append((t, it["remaining_bytes"]))
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
        t0 = time.time()
        end = t0 + 300
        while time.time() < end:
            info = q.cmd("query-migrate")["return"]
            st = info.get("status")
            if "ram" in info:
                left.append(((time.time() - t0) * 1e3, info["ram"]["remaining"]))
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


def parse_size(text):
    """"512M" -> bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def svg(path, series):
    """One panel per case: bytes still to send (log scale) against ms since the migrate
    command, ours (blue: one point per iteration) beside QEMU's (red: query-migrate
    polled every ~2 ms), on the same axes."""
    w, h, left_pad, right_pad, top_pad, bottom_pad = 440, 250, 64, 16, 34, 40
    pw, ph = w - left_pad - right_pad, h - top_pad - bottom_pad
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w * 2}" '
             f'height="{h * 2 + 24}" font-family="sans-serif" font-size="11">',
             f'<rect width="{w * 2}" height="{h * 2 + 24}" fill="white"/>',
             f'<text x="{left_pad}" y="{h * 2 + 16}">blue: vmm (per iteration), '
             f'red: QEMU 7.2 microvm (query-migrate samples); y: bytes still to send, '
             f'log scale; x: ms since the migrate command</text>']
    for i, (name, mine, theirs) in enumerate(series):
        ox, oy = (i % 2) * w, (i // 2) * h
        x0, y0 = ox + left_pad, oy + top_pad
        top = max([4096] + [v for _, v in mine + theirs])
        span = max([1.0] + [t for t, _ in mine + theirs])
        lo, hi = 1.0, math.log10(top) + 0.1  # 10 B .. above the largest value
        def px(t, v):
            y = (math.log10(max(v, 10)) - lo) / (hi - lo)
            return x0 + pw * t / span, y0 + ph * (1 - y)
        parts.append(f'<text x="{x0}" y="{oy + 20}" font-weight="bold">{name}</text>')
        parts.append(f'<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" '
                     f'stroke="#888"/>')
        for e in range(1, int(hi) + 1):
            _, y = px(0, 10 ** e)
            if y0 <= y <= y0 + ph and e % 2 == 0:
                label = {2: "100 B", 4: "10 KB", 6: "1 MB", 8: "100 MB", 10: "10 GB"}[e]
                parts.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + pw}" y2="{y:.1f}" '
                             f'stroke="#ddd"/>')
                parts.append(f'<text x="{x0 - 4}" y="{y + 4:.1f}" text-anchor="end">'
                             f'{label}</text>')
        for k in range(5):
            t = span * k / 4
            x, _ = px(t, 10)
            parts.append(f'<text x="{x:.1f}" y="{y0 + ph + 16}" text-anchor="middle">'
                         f'{t:.0f} ms</text>')
        for data, colour in ((theirs, "#c0392b"), (mine, "#1f5fbf")):
            if not data:
                continue
            pts = " ".join("{:.1f},{:.1f}".format(*px(t, v)) for t, v in data)
            parts.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" '
                         f'stroke-width="2"/>')
            for t, v in data if colour == "#1f5fbf" else []:
                x, y = px(t, v)
                parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>')
    parts.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(parts))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "target", "bench-migrate"))
    ap.add_argument("--vmm", default=VMM,
                    help="the vmm binary to measure (default: the release build)")
    a = ap.parse_args()
    globals()["VMM"] = os.path.abspath(a.vmm)
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
