#!/usr/bin/env python3
"""Local live migration (hand the guest's RAM over, copy no page), ours against QEMU 7.2.

For each RAM size (512M, 2G, 8G; --sizes) the tiny guest runs with `dirty_mb=8` (it rewrites
8 MiB in a loop) and ROUNDS times, alternately:

  ours   two `vmm run --memory-backend memfd` processes; `vmm migrate --local --json` over a
         unix socket passes the memory fds (SCM_RIGHTS) instead of the pages:
           vmm run --memory-backend memfd --memory S --cmdline dirty_mb=8 --api-socket A
           vmm run --memory-backend memfd --memory S --incoming unix:M --api-socket B
           vmm migrate --api-socket A --to unix:M --local --json
  QEMU   two qemu-system-x86_64 -M microvm processes on one shared RAM file, the
         `x-ignore-shared` capability on both sides, so that RAM is not sent:
           qemu-system-x86_64 -M microvm,memory-backend=mem -m S \\
               -object memory-backend-file,id=mem,size=S,mem-path=/dev/shm/F,share=on ...
           (destination: the same plus -incoming defer)
           QMP, destination: migrate-set-capabilities x-ignore-shared=on,
                             migrate-incoming uri=unix:M
           QMP, source:      migrate-set-capabilities x-ignore-shared=on,
                             migrate-set-parameters max-bandwidth=1 TiB/s, migrate uri=unix:M
         and total-time, downtime and ram.transferred are read from query-migrate.

Why a file and not memory-backend-memfd for QEMU: QEMU 7.2 cannot hand a memfd to another
process (fd passing for migration, cpr-transfer, came in QEMU 10.0), so two QEMUs started with
`memory-backend-memfd` get two different memfds: with x-ignore-shared the migration
"completes" having sent ~33 KB, and the destination's guest runs on zeroed RAM and dies.
x-ignore-shared is meant for RAM both processes map: a file on tmpfs (/dev/shm) with
share=on. Before measuring, the script checks once that QEMU really skips RAM (ram.transferred
under 1 MiB, ram.total excludes the shared block) and every round checks that the guest goes
on on the destination (a later tick, no `verify FAIL`), for both VMMs.

It prints per round and then, per size, the median (min-max) of total ms, downtime ms, bytes
sent and the end-to-end wall ms (migrate command issued to completion seen), and ours / QEMU.

Usage: scripts/bench-local.py [--rounds N] [--sizes 512M,2G,8G] [--vmm PATH]
                              [--only both|ours|qemu] [--work DIR]
Needs /dev/kvm, qemu-system-x86_64 (7.2 is what DESIGN.md's peers were measured with) and a
vmm with `migrate --local` (default target/release/vmm; `cargo build --release -p vmm-core
--bin vmm`). `--only qemu` measures the peer alone (no vmm feature needed beyond
`vmm tiny-kernel`). Memory: memfd/tmpfs pages are allocated only when written, so even 8G
costs the guest's ~12 MiB, not 8 GiB.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VMM = os.path.join(ROOT, "target", "release", "vmm")
QEMU = "qemu-system-x86_64"
DIRTY = "dirty_mb=8"
PROCS = []  # every process started, stopped in main's finally


def die(msg):
    print(f"bench-local: {msg}", file=sys.stderr)
    sys.exit(2)


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


def spawn(args, out):
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=open(out, "w"),
                         stderr=subprocess.STDOUT)
    PROCS.append(p)
    return p


def unlink(*paths):
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def tail(path, n=5):
    lines = read(path).strip().splitlines()[-n:]
    return f"{path}: " + (" | ".join(lines) if lines else "(empty)")


def last_tick(text):
    ticks = [int(l.split()[1]) for l in text.splitlines()
             if l.startswith("tick ") and len(l.split()) > 1 and l.split()[1].isdigit()]
    return ticks[-1] if ticks else 0


def check_moved(src_out, dst_out, dst, who):
    """The guest goes on at the destination: a tick later than the source's last one, no
    `verify FAIL`, the destination process alive."""
    before = last_tick(read(src_out))
    end = time.time() + 20
    while time.time() < end:
        text = read(dst_out)
        if "verify FAIL" in text:
            raise RuntimeError(f"{who}: the guest found bad memory after the migration: "
                               f"{tail(dst_out)}")
        if last_tick(text) > before:
            return
        if dst.poll() is not None:
            raise RuntimeError(f"{who}: the destination exited ({dst.returncode}) before "
                               f"the guest ticked again: {tail(dst_out)}")
        time.sleep(0.02)
    raise RuntimeError(f"{who}: no tick after {before} on the destination in 20 s: {tail(dst_out)}")


def settle(out):
    """Lets the guest dirty its 8 MiB once (steady state) before migrating."""
    if not wait_for(out, "verify ok", 180):
        raise RuntimeError(f"the source never printed 'verify ok': {tail(out)}")


def ours(work, memory):
    api_s, api_d, sock = f"{work}/src.api", f"{work}/dst.api", f"{work}/mig.sock"
    src_out, dst_out = f"{work}/src.out", f"{work}/dst.out"
    unlink(api_s, api_d, sock, src_out, dst_out)
    src = spawn([VMM, "run", "--memory-backend", "memfd", "--memory", memory,
                 "--cmdline", DIRTY, "--api-socket", api_s], src_out)
    dst = spawn([VMM, "run", "--memory-backend", "memfd", "--memory", memory,
                 "--incoming", f"unix:{sock}", "--api-socket", api_d], dst_out)
    try:
        settle(src_out)
        t0 = time.monotonic()
        r = subprocess.run([VMM, "migrate", "--api-socket", api_s, "--to", f"unix:{sock}",
                            "--local", "--json"], capture_output=True, text=True, timeout=300)
        wall = (time.monotonic() - t0) * 1e3
        if r.returncode != 0:
            raise RuntimeError(f"vmm migrate --local failed ({r.returncode}): "
                               f"{r.stderr.strip()}")
        j = json.loads(r.stdout.strip().splitlines()[-1])
        if j.get("status") not in ("completed", None):
            raise RuntimeError(f"vmm migrate --local: status {j.get('status')}: {r.stdout}")
        check_moved(src_out, dst_out, dst, "vmm")
        return (float(j["total_ms"]), float(j["downtime_ms"]), int(j["transferred_bytes"]),
                wall, j.get("setup_ms", "?"))
    finally:
        stop(src)
        stop(dst)
        unlink(api_s, api_d, sock)


class Qmp:
    def __init__(self, path):
        end = time.time() + 10
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                self.s.close()
                if time.time() > end:
                    raise
                time.sleep(0.01)
        self.f = self.s.makefile("rw")
        self.f.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            line = self.f.readline()
            if not line:
                raise RuntimeError(f"QMP connection closed during {name}")
            msg = json.loads(line)
            if "return" in msg or "error" in msg:
                return msg

    def ok(self, name, **args):
        msg = self.cmd(name, **args)
        if "error" in msg:
            raise RuntimeError(f"QMP {name}: {msg['error'].get('desc')}")
        return msg["return"]

    def close(self):
        self.s.close()


IGNORE_SHARED = [{"capability": "x-ignore-shared", "state": True}]


def qemu_args(elf, memory, ram_file, serial, qmp):
    return [QEMU, "-M", "microvm,memory-backend=mem", "-enable-kvm",
            "-cpu", "host,-arch-capabilities", "-m", memory,
            "-object", f"memory-backend-file,id=mem,size={memory},mem-path={ram_file},share=on",
            "-display", "none", "-nodefaults", "-no-reboot", "-kernel", elf, "-append", DIRTY,
            "-serial", f"file:{serial}", "-qmp", f"unix:{qmp},server=on,wait=off"]


def qemu(work, elf, memory, first_check=False):
    qs, qd, sock = f"{work}/qsrc.qmp", f"{work}/qdst.qmp", f"{work}/qmig.sock"
    src_out, dst_out = f"{work}/qsrc.out", f"{work}/qdst.out"
    ram_file = f"/dev/shm/minivmm-bench-local-{os.getpid()}"
    unlink(qs, qd, sock, src_out, dst_out, ram_file)
    src = spawn(qemu_args(elf, memory, ram_file, src_out, qs), f"{work}/qsrc.err")
    dst = None
    conns = []
    try:
        settle(src_out)
        dst = spawn(qemu_args(elf, memory, ram_file, dst_out, qd) + ["-incoming", "defer"],
                    f"{work}/qdst.err")
        d = Qmp(qd)
        conns.append(d)
        d.ok("migrate-set-capabilities", capabilities=IGNORE_SHARED)
        d.ok("migrate-incoming", uri=f"unix:{sock}")
        s = Qmp(qs)
        conns.append(s)
        s.ok("migrate-set-capabilities", capabilities=IGNORE_SHARED)
        s.ok("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
        t0 = time.monotonic()
        s.ok("migrate", uri=f"unix:{sock}")
        end = t0 + 300
        while time.monotonic() < end:
            info = s.ok("query-migrate")
            st = info.get("status")
            if st == "completed":
                wall = (time.monotonic() - t0) * 1e3
                break
            if st in ("failed", "cancelled"):
                raise RuntimeError(f"QEMU migration {st}: {info.get('error-desc', '')}")
            time.sleep(0.002)
        else:
            raise RuntimeError("QEMU migration did not complete in 300 s")
        ram = info["ram"]
        if first_check:
            print(f"check: QEMU {memory} with x-ignore-shared sent {ram['transferred']} bytes "
                  f"(ram total {ram['total']} bytes of non-shared RAM, {ram['normal']} normal "
                  f"pages, {ram['duplicate']} zero pages) in {info['total-time']} ms",
                  flush=True)
            if ram["transferred"] >= 1 << 20:
                raise RuntimeError(f"QEMU did not skip the shared RAM: "
                                   f"{ram['transferred']} bytes sent")
        check_moved(src_out, dst_out, dst, "QEMU")
        return (float(info["total-time"]), float(info.get("downtime", 0)),
                int(ram["transferred"]), wall, info.get("setup-time", "?"))
    finally:
        for c in conns:
            c.close()
        stop(src)
        if dst is not None:
            stop(dst)
        unlink(qs, qd, sock, ram_file)


def parse_size(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def med(xs):
    return statistics.median(xs), min(xs), max(xs)


def fmt(triple, prec):
    m, lo, hi = triple
    if prec == 0:
        return f"{m:.0f} ({lo:.0f}-{hi:.0f})"
    return f"{m:.{prec}f} ({lo:.{prec}f}-{hi:.{prec}f})"


def ratio(a, b):
    return f"{a / b:.2f}x" if b else ("-" if not a else "inf")


def preflight(only):
    if not os.path.exists("/dev/kvm"):
        die("/dev/kvm is missing")
    if not os.access(VMM, os.X_OK):
        die(f"no vmm binary at {VMM} (cargo build --release -p vmm-core --bin vmm, "
            f"or --vmm PATH)")
    if only in ("both", "qemu"):
        if shutil.which(QEMU) is None:
            die(f"{QEMU} is not installed (the peer; apt-get install qemu-system-x86, "
                f"or --only ours)")
        v = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout
        print(f"peer: {v.splitlines()[0] if v else QEMU}")
        if "version 7.2" not in v:
            print("warning: not QEMU 7.2, the version DESIGN.md's peer figures are from",
                  file=sys.stderr)
    if only in ("both", "ours"):
        h = subprocess.run([VMM, "migrate", "--help"], capture_output=True, text=True)
        if "--local" not in h.stdout:
            die(f"{VMM} has no `vmm migrate --local` yet (local migration that passes the "
                f"memory fds is still to land); rebuild once it has, or run --only qemu")
        h = subprocess.run([VMM, "run", "--help"], capture_output=True, text=True)
        if "memfd" not in h.stdout:
            die(f"{VMM} has no `vmm run --memory-backend memfd`")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sizes", default="512M,2G,8G", help="comma-separated RAM sizes")
    ap.add_argument("--vmm", default=VMM, help="the vmm binary (default: the release build)")
    ap.add_argument("--only", choices=("both", "ours", "qemu"), default="both")
    ap.add_argument("--work", default=None,
                    help="where to make the scratch directory for sockets and consoles "
                         "(removed at the end; default: the system's temporary directory)")
    a = ap.parse_args()
    globals()["VMM"] = os.path.abspath(a.vmm)
    sizes = [s.strip().upper() for s in a.sizes.split(",") if s.strip()]
    for s in sizes:
        parse_size(s)
    preflight(a.only)
    # SIGTERM, SIGHUP and SIGINT (even when started in the background, where it is ignored)
    # run the finally blocks too.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda n, f: sys.exit(128 + n))
    work = tempfile.mkdtemp(prefix="bench-local.", dir=a.work)
    try:
        elf = os.path.join(work, "tiny.elf")
        subprocess.run([VMM, "tiny-kernel", elf], check=True)
        rows = []
        checked = False
        for memory in sizes:
            mine, theirs = [], []
            for r in range(a.rounds):
                line = f"{memory} {DIRTY} round {r + 1}:"
                if a.only in ("both", "ours"):
                    mine.append(ours(work, memory))
                    m = mine[-1]
                    line += (f" vmm {m[0]:.1f} ms (setup {m[4]}, down {m[1]:.2f}, "
                             f"{m[2]} B, wall {m[3]:.1f})")
                if a.only in ("both", "qemu"):
                    theirs.append(qemu(work, elf, memory, first_check=not checked))
                    checked = True
                    q = theirs[-1]
                    line += (f" QEMU {q[0]:.0f} ms (setup {q[4]}, down {q[1]:.0f}, "
                             f"{q[2]} B, wall {q[3]:.1f})")
                print(line, flush=True)
            rows.append((memory, mine, theirs))
        print()
        print(f"median (min-max) of {a.rounds} rounds, tiny guest {DIRTY}; ours: vmm migrate "
              f"--local (memfd fds over SCM_RIGHTS); QEMU: microvm, shared /dev/shm file, "
              f"x-ignore-shared")
        cols = ("total ms", "downtime ms", "bytes sent", "wall ms")
        prec = (1, 2, 0, 1)
        print(f"{'size':<6}{'who':<6}" + "".join(f"{c:>26}" for c in cols))
        for memory, mine, theirs in rows:
            stats = {}
            for who, data in (("vmm", mine), ("QEMU", theirs)):
                if not data:
                    continue
                stats[who] = [med([x[k] for x in data]) for k in range(4)]
                print(f"{memory:<6}{who:<6}" +
                      "".join(f"{fmt(stats[who][k], prec[k]):>26}" for k in range(4)))
            if len(stats) == 2:
                print(f"{memory:<6}{'ratio':<6}" +
                      "".join(f"{ratio(stats['vmm'][k][0], stats['QEMU'][k][0]):>26}"
                              for k in range(4)))
        print("(ratio = ours / QEMU, of the medians; QEMU reports whole ms)")
    finally:
        for p in PROCS:
            stop(p)
        unlink(f"/dev/shm/minivmm-bench-local-{os.getpid()}")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as e:
        print(f"bench-local: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("bench-local: interrupted (processes stopped, scratch files removed)",
              file=sys.stderr)
        sys.exit(130)
