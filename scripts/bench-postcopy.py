#!/usr/bin/env python3
"""Live migration over a shaped link: post-copy against pre-copy, ours against QEMU 7.2.

Two network namespaces joined by a veth pair shaped to RATE (default 40mbit, 5 MB/s) and
DELAY one way (default 20ms, so a 40 ms round trip), made by `scripts/netns-link.sh up`
with NETNS_PREFIX=mvmbench (--netns-prefix): the source runs in PREFIX-src (10.77.0.1),
the destination listens on tcp:10.77.0.2:PORT in PREFIX-dst. The guest is the built-in
tiny guest, 512M (--memory), dirtying 8 MiB continuously (--cmdline, default dirty_mb=8).
Eight cases, one migration at a time, alternated round-robin for ROUNDS rounds:

  vmm  pre-copy + auto-converge  vmm migrate --api-socket S --to tcp:10.77.0.2:PORT --json
  QEMU pre-copy + auto-converge  capability auto-converge on the source
  vmm  pre-copy                  ... --no-auto-converge (ends after 30 iterations anyway,
                                 pausing the guest for what is left)
  QEMU pre-copy                  no capability (at 5 MB/s against 8 MiB dirtied it may
                                 never converge: cut at --timeout, "did not converge")
  vmm  post-copy                 ... --postcopy (switches after the first pass); SKIPPED
                                 when `vmm migrate --help` has no --postcopy
  QEMU post-copy                 capability postcopy-ram on both sides (and
                                 postcopy-blocktime on the destination); after `migrate`,
                                 migrate-start-postcopy once query-migrate's
                                 ram.dirty-sync-count reaches 2 (the first pass ended)
  vmm  post-copy at once         ... --postcopy --postcopy-after 0 (switches before any page
                                 is sent: each page goes once, on demand or in the
                                 background)
  QEMU post-copy at once         as QEMU post-copy, migrate-start-postcopy at the first
                                 query-migrate that shows the migration active

Every process is started with `ip netns exec NS ...`. QEMU is qemu-system-x86_64 -M microvm
booting the same guest (`vmm tiny-kernel`), serial to a file, QMP on unix sockets (the
filesystem is shared by both namespaces); its destination is started with `-incoming
defer` and given `migrate-incoming tcp:10.77.0.2:PORT` once its capabilities are set (the
destination's postcopy-ram and postcopy-blocktime must be on before the stream comes);
the source gets max-bandwidth 10 GB/s (the link limits, not QEMU's 32 MiB/s default) and
downtime-limit 300 ms (ours' default). Each migration is cut at --timeout s (default 120)
and recorded as a failure row, never waited on forever. After each one the destination's
guest must print a `tick N` later than the source's last one within 10 s (and no `verify
FAIL`): the "guest" column. The consoles are also polled every 5 ms during the migration
for the "tick gap": wall time from the source's last `tick` line to the destination's first,
the pause the guest saw (plus ~100 ms, the tick period) measured the same way for both VMMs
(QEMU's own downtime stops when the source has written its last bytes, before they cross
the link; ours when the destination confirms its guest runs).

It prints each run, then the medians (of the runs that completed) of total ms, downtime ms,
post-copy blocktime ms and bytes sent per case, the ratios ours / QEMU per case, and our
post-copy total over our auto-converge total; the raw results (ours: `--json`'s object;
QEMU: the final query-migrate of both sides) go to target/bench-postcopy/results.json.

Usage: scripts/bench-postcopy.py [--rounds N] [--rate 40mbit] [--delay 20ms]
           [--memory 512M] [--cmdline dirty_mb=8] [--timeout 120] [--vmm PATH]
           [--cases ours-ac,qemu-ac,ours-pre,qemu-pre,ours-pc,qemu-pc] [--out DIR]
           [--netns-prefix mvmbench]
Needs root (network namespaces), /dev/kvm, qemu-system-x86_64 (scripts/setup.sh) and a
release vmm (default target/release/vmm; `scripts/bench-migrate.sh --shaped` builds it).
The namespaces are removed (`netns-link.sh down`) at the end, on failure and on Ctrl-C.
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
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VMM = os.path.join(ROOT, "target", "release", "vmm")
QEMU = "qemu-system-x86_64"
NETNS = os.path.join(ROOT, "scripts", "netns-link.sh")
SRC_ADDR, DST_ADDR = "10.77.0.1", "10.77.0.2"
PORT0 = 47000
BOOT_TIMEOUT = 60       # s for the source guest to reach its steady state (`verify ok`)
ALIVE_TIMEOUT = 10      # s for the destination guest to tick again
PROCS = []              # every process started, stopped in main's finally

# (key, who, mode, label)
CASES = [
    ("ours-ac", "vmm", "auto-converge", "vmm  pre-copy + auto-converge"),
    ("qemu-ac", "QEMU", "auto-converge", "QEMU pre-copy + auto-converge"),
    ("ours-pre", "vmm", "pre-copy", "vmm  pre-copy"),
    ("qemu-pre", "QEMU", "pre-copy", "QEMU pre-copy"),
    ("ours-pc", "vmm", "post-copy", "vmm  post-copy"),
    ("qemu-pc", "QEMU", "post-copy", "QEMU post-copy"),
    ("ours-pc0", "vmm", "post-copy-at-once", "vmm  post-copy at once"),
    ("qemu-pc0", "QEMU", "post-copy-at-once", "QEMU post-copy at once"),
]
MODES = ["auto-converge", "pre-copy", "post-copy", "post-copy-at-once"]
POSTCOPY = ("post-copy", "post-copy-at-once")


def log(msg):
    print(msg, flush=True)


def die(msg):
    print(f"bench-postcopy: {msg}", file=sys.stderr)
    sys.exit(2)


# ---- processes and files ----------------------------------------------------------------

def spawn(ns, args, out, err=None):
    """Starts ARGS in network namespace NS (`ip netns exec` execs it: the pid is ARGS')."""
    p = subprocess.Popen(["ip", "netns", "exec", ns, *args], stdin=subprocess.DEVNULL,
                         stdout=open(out, "w"),
                         stderr=open(err, "w") if err else subprocess.STDOUT,
                         start_new_session=True)
    PROCS.append(p)
    return p


def stop(proc):
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(3)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


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


def tail(path, n=4):
    lines = read(path).strip().splitlines()[-n:]
    return f"{os.path.basename(path)}: " + (" | ".join(lines) if lines else "(empty)")


def last_tick(text):
    """The last complete `tick N` line's N (a line still being written is not a tick)."""
    n = 0
    for line in text.split("\n")[:-1]:
        parts = line.strip().split()
        if len(parts) == 2 and parts[0] == "tick" and parts[1].isdigit():
            n = int(parts[1])
    return n


def wait_for(path, text, seconds, proc=None):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if text in read(path):
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def listening(pid, port):
    """Whether process PID's network namespace has a TCP socket listening on PORT
    (/proc/PID/net/tcp is the table of PID's namespace; no connection is made)."""
    try:
        with open(f"/proc/{pid}/net/tcp") as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port:
                    return True
    except (OSError, StopIteration, IndexError, ValueError):
        pass
    return False


def wait_listening(proc, port, seconds, who):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if listening(proc.pid, port):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{who}: the destination exited ({proc.returncode}) before "
                               f"listening on port {port}")
        time.sleep(0.02)
    raise RuntimeError(f"{who}: the destination is not listening on port {port} after "
                       f"{seconds} s")


def settle(out, proc, who):
    """Lets the guest dirty its memory once (steady state) before migrating."""
    if not wait_for(out, "verify ok", BOOT_TIMEOUT, proc):
        raise RuntimeError(f"{who}: the source never printed 'verify ok': {tail(out)}")


def check_alive(src_out, dst_out, dst):
    """The guest goes on at the destination: a tick later than every tick the source
    printed, within ALIVE_TIMEOUT s, and no `verify FAIL`. Returns (ok, detail)."""
    before = last_tick(read(src_out))
    end = time.monotonic() + ALIVE_TIMEOUT
    while True:
        text = read(dst_out)
        if "verify FAIL" in text:
            return False, f"verify FAIL on the destination: {tail(dst_out)}"
        after = last_tick(text)
        if after > before:
            return True, f"tick {before} -> {after}"
        if dst.poll() is not None:
            return False, f"destination exited ({dst.returncode}): {tail(dst_out)}"
        if time.monotonic() > end:
            return False, f"no tick after {before} in {ALIVE_TIMEOUT} s: {tail(dst_out)}"
        time.sleep(0.05)


class TickWatch(threading.Thread):
    """Watches both consoles during a migration, every 5 ms, for when each `tick N` line
    first appeared: the wall time from the source's last tick to the destination's first
    is the pause the guest itself saw (plus the ~100 ms between two ticks), the same
    yardstick for both VMMs whatever each one calls its downtime."""

    def __init__(self, src_out, dst_out):
        super().__init__(daemon=True)
        self.paths = {"src": src_out, "dst": dst_out}
        self.seen = {"src": {}, "dst": {}}       # tick -> monotonic time first seen
        self.offset = {"src": 0, "dst": 0}
        self.partial = {"src": "", "dst": ""}
        self.halt = threading.Event()

    def poll(self):
        now = time.monotonic()
        for side, path in self.paths.items():
            try:
                with open(path, errors="replace") as f:
                    f.seek(self.offset[side])
                    data = f.read()
                    self.offset[side] = f.tell()
            except FileNotFoundError:
                continue
            lines = (self.partial[side] + data).split("\n")
            self.partial[side] = lines.pop()
            for line in lines:
                parts = line.strip().split()
                if len(parts) == 2 and parts[0] == "tick" and parts[1].isdigit():
                    self.seen[side].setdefault(int(parts[1]), now)

    def run(self):
        while not self.halt.is_set():
            self.poll()
            self.halt.wait(0.005)

    def finish(self):
        """Stops watching; returns (gap ms, source's last tick, destination's first)."""
        self.halt.set()
        self.join()
        self.poll()
        src, dst = self.seen["src"], self.seen["dst"]
        if not src or not dst:
            return None, None, None
        last = max(src)
        later = [t for t in dst if t > last]
        if not later:
            return None, last, None
        first = min(later)
        return (dst[first] - src[last]) * 1e3, last, first


def result(case, rnd, **kw):
    key, who, mode, label = case
    r = {"case": key, "who": who, "mode": mode, "label": label, "round": rnd,
         "status": "failed", "total_ms": None, "downtime_ms": None, "blocktime_ms": None,
         "transferred_bytes": None, "tick_gap_ms": None, "guest_ok": None, "guest": None,
         "error": None}
    r.update(kw)
    return r


# ---- ours ---------------------------------------------------------------------------------

def vmm_has_postcopy():
    h = subprocess.run([VMM, "migrate", "--help"], capture_output=True, text=True)
    return "--postcopy" in h.stdout


def ours(a, work, case, rnd, port):
    key, _, mode, _ = case
    api_s, api_d = f"{work}/src.api", f"{work}/dst.api"
    src_out, dst_out = f"{work}/src.out", f"{work}/dst.out"
    unlink(api_s, api_d, src_out, dst_out)
    args = ["--memory", a.memory] + (["--cmdline", a.cmdline] if a.cmdline else [])
    uri = f"tcp:{DST_ADDR}:{port}"
    src = dst = watch = None
    try:
        src = spawn(a.src_ns, [VMM, "run", *args, "--api-socket", api_s], src_out,
                    f"{work}/src.err")
        dst = spawn(a.dst_ns, [VMM, "run", *args, "--api-socket", api_d, "--incoming", uri],
                    dst_out, f"{work}/dst.err")
        settle(src_out, src, "vmm")
        wait_listening(dst, port, 10, "vmm")
        extra = {"auto-converge": [], "pre-copy": ["--no-auto-converge"],
                 "post-copy": ["--postcopy"],
                 "post-copy-at-once": ["--postcopy", "--postcopy-after", "0"]}[mode]
        tick0 = last_tick(read(src_out))
        watch = TickWatch(src_out, dst_out)
        watch.start()
        t0 = time.monotonic()
        try:
            r = subprocess.run(["ip", "netns", "exec", a.src_ns, VMM, "migrate",
                                "--api-socket", api_s, "--to", uri, "--json", *extra],
                               stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               timeout=a.timeout)
        except subprocess.TimeoutExpired:
            return result(case, rnd, status="timeout", src_tick=tick0,
                          wall_ms=(time.monotonic() - t0) * 1e3,
                          error=f"vmm migrate did not end in {a.timeout} s")
        wall = (time.monotonic() - t0) * 1e3
        j = None
        for line in reversed(r.stdout.strip().splitlines()):
            try:
                j = json.loads(line)
                break
            except ValueError:
                continue
        if r.returncode != 0 or j is None or j.get("status", "completed") != "completed":
            err = (j or {}).get("error") or r.stderr.strip() or r.stdout.strip()
            return result(case, rnd, status="failed", src_tick=tick0, wall_ms=wall, raw=j,
                          error=f"vmm migrate exit {r.returncode}: {err}"[:500])
        ok, detail = check_alive(src_out, dst_out, dst)
        gap, _, _ = watch.finish()
        return result(case, rnd, status="ok", total_ms=float(j["total_ms"]),
                      downtime_ms=float(j["downtime_ms"]),
                      blocktime_ms=(float(j["postcopy_blocktime_ms"])
                                    if j.get("postcopy_blocktime_ms") is not None else None),
                      transferred_bytes=int(j["transferred_bytes"]),
                      iterations=j.get("iterations"),
                      throttle=j.get("cpu_throttle_percent"),
                      postcopy_requests=j.get("postcopy_requests"),
                      fault_p50_ms=j.get("postcopy_fault_p50_ms"),
                      fault_p99_ms=j.get("postcopy_fault_p99_ms"),
                      tick_gap_ms=gap, src_tick=tick0, wall_ms=wall, guest_ok=ok,
                      guest=detail, raw=j)
    except RuntimeError as e:
        return result(case, rnd, status="failed", error=str(e))
    finally:
        if watch is not None:
            watch.halt.set()
        stop(src)
        stop(dst)
        unlink(api_s, api_d)


# ---- QEMU ---------------------------------------------------------------------------------

class Qmp:
    def __init__(self, path, proc):
        end = time.monotonic() + 15
        while True:
            self.s = socket.socket(socket.AF_UNIX)
            try:
                self.s.connect(path)
                break
            except OSError:
                self.s.close()
                if proc.poll() is not None:
                    raise RuntimeError(f"QEMU exited ({proc.returncode}) before its QMP "
                                       f"socket {path} answered")
                if time.monotonic() > end:
                    raise RuntimeError(f"no QMP on {path} after 15 s")
                time.sleep(0.02)
        self.s.settimeout(30)
        self.f = self.s.makefile("rw")
        self.f.readline()
        self.ok("qmp_capabilities")

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
        try:
            self.s.close()
        except OSError:
            pass


def caps(**kw):
    return [{"capability": k.replace("_", "-"), "state": v} for k, v in kw.items()]


def qemu_args(a, elf, serial, qmp):
    args = [QEMU, "-M", "microvm", "-enable-kvm", "-cpu", "host,-arch-capabilities",
            "-m", a.memory, "-display", "none", "-nodefaults", "-no-reboot",
            "-kernel", elf, "-serial", f"file:{serial}",
            "-qmp", f"unix:{qmp},server=on,wait=off"]
    return args + (["-append", a.cmdline] if a.cmdline else [])


def qemu(a, work, elf, case, rnd, port):
    key, _, mode, _ = case
    qs, qd = f"{work}/qsrc.qmp", f"{work}/qdst.qmp"
    src_out, dst_out = f"{work}/qsrc.out", f"{work}/qdst.out"
    unlink(qs, qd, src_out, dst_out)
    uri = f"tcp:{DST_ADDR}:{port}"
    src = dst = watch = None
    conns = []
    try:
        src = spawn(a.src_ns, qemu_args(a, elf, src_out, qs), f"{work}/qsrc.err")
        dst = spawn(a.dst_ns, qemu_args(a, elf, dst_out, qd) + ["-incoming", "defer"],
                    f"{work}/qdst.err")
        settle(src_out, src, "QEMU")
        d = Qmp(qd, dst)
        conns.append(d)
        if mode in POSTCOPY:
            d.ok("migrate-set-capabilities",
                 capabilities=caps(postcopy_ram=True, postcopy_blocktime=True))
        d.ok("migrate-incoming", uri=uri)
        wait_listening(dst, port, 10, "QEMU")
        s = Qmp(qs, src)
        conns.append(s)
        if mode == "auto-converge":
            s.ok("migrate-set-capabilities", capabilities=caps(auto_converge=True))
        elif mode in POSTCOPY:
            s.ok("migrate-set-capabilities", capabilities=caps(postcopy_ram=True))
        s.ok("migrate-set-parameters", **{"max-bandwidth": 10 << 30, "downtime-limit": 300})
        tick0 = last_tick(read(src_out))
        watch = TickWatch(src_out, dst_out)
        watch.start()
        t0 = time.monotonic()
        s.ok("migrate", uri=uri)
        switched = None
        info = {}
        while True:
            info = s.ok("query-migrate")
            st = info.get("status")
            if st == "completed":
                break
            if st in ("failed", "cancelled"):
                return result(case, rnd, status="failed", src_tick=tick0, raw={"src": info},
                              error=f"QEMU migration {st}: {info.get('error-desc', '')}")
            # After the first pass (dirty-sync-count 2), or at once (the first chance).
            first_pass = 2 if mode == "post-copy" else 0
            if (mode in POSTCOPY and switched is None and st == "active"
                    and info.get("ram", {}).get("dirty-sync-count", 0) >= first_pass):
                m = s.cmd("migrate-start-postcopy")
                switched = (time.monotonic() - t0) * 1e3
                if "error" in m:
                    return result(case, rnd, status="failed", src_tick=tick0,
                                  raw={"src": info},
                                  error=f"migrate-start-postcopy: {m['error'].get('desc')}")
            if time.monotonic() - t0 > a.timeout:
                wall = (time.monotonic() - t0) * 1e3
                if st == "active":
                    # Still iterating in pre-copy: it never got within the downtime limit.
                    s.cmd("migrate_cancel")
                    return result(case, rnd, status="did-not-converge", src_tick=tick0,
                                  wall_ms=wall, raw={"src": info},
                                  iterations=info.get("ram", {}).get("dirty-sync-count"),
                                  throttle=info.get("cpu-throttle-percentage"),
                                  transferred_bytes_at_cut=info.get("ram", {}).get(
                                      "transferred"),
                                  error=f"still pre-copying after {a.timeout} s "
                                        f"({info.get('ram', {}).get('dirty-sync-count')} "
                                        f"passes)")
                return result(case, rnd, status="timeout", src_tick=tick0, wall_ms=wall,
                              raw={"src": info},
                              error=f"QEMU migration {st} after {a.timeout} s")
            time.sleep(0.02)
        wall = (time.monotonic() - t0) * 1e3
        dinfo = {}
        if mode in POSTCOPY:
            # The destination finishes after the source has sent its last page; its
            # query-migrate has postcopy-blocktime once it reports completed.
            end = time.monotonic() + 10
            while time.monotonic() < end:
                dinfo = d.ok("query-migrate")
                if dinfo.get("status") in ("completed", "failed"):
                    break
                time.sleep(0.05)
        ok, detail = check_alive(src_out, dst_out, dst)
        gap, _, _ = watch.finish()
        ram = info.get("ram", {})
        bt = dinfo.get("postcopy-blocktime")
        # QEMU 7.2 sometimes reports a post-copy downtime of hours (a start time left
        # unset): a downtime longer than the whole migration is no measure, left out.
        qdown = float(info.get("downtime", 0))
        if qdown > float(info["total-time"]):
            log(f"  (QEMU reported a downtime of {qdown:.0f} ms, longer than the migration: "
                "left out)")
            qdown = None
        return result(case, rnd, status="ok", total_ms=float(info["total-time"]),
                      downtime_ms=qdown,
                      blocktime_ms=float(bt) if bt is not None else None,
                      transferred_bytes=int(ram.get("transferred", 0)),
                      iterations=ram.get("dirty-sync-count"),
                      throttle=info.get("cpu-throttle-percentage"),
                      postcopy_requests=ram.get("postcopy-requests") if mode in POSTCOPY
                      else None,
                      switched_ms=switched, tick_gap_ms=gap, src_tick=tick0, wall_ms=wall,
                      guest_ok=ok,
                      guest=detail, raw={"src": info, "dst": dinfo})
    except (RuntimeError, OSError, ValueError) as e:
        return result(case, rnd, status="failed", error=f"{type(e).__name__}: {e}"
                      if not isinstance(e, RuntimeError) else str(e))
    finally:
        if watch is not None:
            watch.halt.set()
        for c in conns:
            c.close()
        stop(src)
        stop(dst)
        unlink(qs, qd)


# ---- the link -----------------------------------------------------------------------------

def netns(a, *args):
    env = dict(os.environ, NETNS_PREFIX=a.netns_prefix, NETNS_OWNER_PID=str(os.getpid()))
    return subprocess.run([NETNS, *args], env=env, capture_output=True, text=True,
                          check=False)


# ---- the report ---------------------------------------------------------------------------

def median(runs, field):
    xs = [r[field] for r in runs if r["status"] == "ok" and r.get(field) is not None]
    return statistics.median(xs) if xs else None


def fnum(x, prec=1):
    if x is None:
        return "-"
    return f"{x:.{prec}f}" if prec else f"{x:.0f}"


def fratio(a, b):
    if a is None or b is None:
        return "-"
    return f"{a / b:.2f}x" if b else "inf"


def report(a, runs, has_postcopy):
    rows = {}
    for key, who, mode, label in CASES:
        mine = [r for r in runs if r["case"] == key]
        if not mine:
            continue
        rows[key] = {
            "label": label, "runs": len(mine),
            "ok": sum(r["status"] == "ok" for r in mine),
            "skipped": all(r["status"] == "skipped" for r in mine),
            "statuses": sorted({r["status"] for r in mine}),
            "guest_ok": sum(bool(r.get("guest_ok")) for r in mine),
            "total_ms": median(mine, "total_ms"),
            "downtime_ms": median(mine, "downtime_ms"),
            "blocktime_ms": median(mine, "blocktime_ms"),
            "transferred_bytes": median(mine, "transferred_bytes"),
            "tick_gap_ms": median(mine, "tick_gap_ms"),
            "iterations": median(mine, "iterations"),
            "postcopy_requests": median(mine, "postcopy_requests"),
            "fault_p50_ms": median(mine, "fault_p50_ms"),
            "fault_p99_ms": median(mine, "fault_p99_ms"),
        }
    log("")
    log(f"link {a.rate}, {a.delay} one way; tiny guest {a.memory} {a.cmdline or 'idle'}; "
        f"medians of the completed runs of {a.rounds} round(s); cut at {a.timeout} s")
    head = (f"{'case':<31}{'done':>6}{'total ms':>11}{'downtime ms':>13}{'blocktime ms':>14}"
            f"{'bytes sent':>13}{'tick gap ms':>13}{'passes':>8}  guest")
    log(head)
    log("-" * len(head))
    for key, *_ in CASES:
        if key not in rows:
            continue
        w = rows[key]
        line = f"{w['label']:<31}{str(w['ok']) + '/' + str(w['runs']):>6}"
        if w["skipped"]:
            log(line + "  SKIPPED: vmm has no --postcopy yet")
            continue
        if not w["ok"]:
            why = ", ".join(s.replace("-", " ") for s in w["statuses"])
            log(line + f"  {why} (cut at {a.timeout} s)" if "did-not-converge" in
                w["statuses"] or "timeout" in w["statuses"] else line + f"  {why}")
            continue
        log(line + f"{fnum(w['total_ms']):>11}{fnum(w['downtime_ms']):>13}"
            f"{fnum(w['blocktime_ms']):>14}{fnum(w['transferred_bytes'], 0):>13}"
            f"{fnum(w['tick_gap_ms'], 0):>13}{fnum(w['iterations'], 0):>8}  {w['guest_ok']}/{w['runs']} ok"
            + (f"  ({', '.join(s for s in w['statuses'] if s != 'ok')} in the rest)"
               if w["ok"] < w["runs"] else ""))
    pcs = []
    for key, who in (("ours-pc", "vmm"), ("qemu-pc", "QEMU"), ("ours-pc0", "vmm"),
                     ("qemu-pc0", "QEMU")):
        w = rows.get(key)
        if w and w["ok"]:
            at_once = " at once" if key.endswith("0") else ""
            extra = (f"{who} post-copy{at_once}: {fnum(w['postcopy_requests'], 0)} "
                     f"page requests")
            if w["fault_p50_ms"] is not None or w["fault_p99_ms"] is not None:
                extra += (f", fault latency p50 {fnum(w['fault_p50_ms'], 2)} ms, "
                          f"p99 {fnum(w['fault_p99_ms'], 2)} ms")
            pcs.append(extra)
    for p in pcs:
        log(p)
    log("(tick gap: wall time from the source console's last `tick` line to the destination's "
        "first, polled every 5 ms;\n ~100 ms of it is the time between two ticks, the rest the "
        "pause the guest saw. passes: vmm's iterations,\n the final stage included; QEMU's "
        "ram.dirty-sync-count. downtime: each VMM's own figure; ours ends when the\n "
        "destination confirms its guest runs, QEMU's when the source has written its last "
        "bytes into the socket)")
    log("")
    log(f"{'vmm / QEMU (medians)':<31}{'total':>11}{'downtime':>13}{'blocktime':>14}"
        f"{'bytes':>13}{'tick gap':>13}")
    ratios = {}
    for mode in MODES:
        o = rows.get({"auto-converge": "ours-ac", "pre-copy": "ours-pre",
                      "post-copy": "ours-pc", "post-copy-at-once": "ours-pc0"}[mode])
        q = rows.get({"auto-converge": "qemu-ac", "pre-copy": "qemu-pre",
                      "post-copy": "qemu-pc", "post-copy-at-once": "qemu-pc0"}[mode])
        if not o or not q:
            continue
        label = {"auto-converge": "pre-copy + auto-converge", "pre-copy": "pre-copy",
                 "post-copy": "post-copy", "post-copy-at-once": "post-copy at once"}[mode]
        if o["skipped"]:
            log(f"{label:<31}  - (vmm SKIPPED)")
            continue
        if not o["ok"] or not q["ok"]:
            who = " and ".join(n for n, w in (("vmm", o), ("QEMU", q)) if not w["ok"])
            log(f"{label:<31}  - ({who} did not complete)")
            continue
        ratios[mode] = {f: (o[f] / q[f] if o[f] is not None and q[f] else None)
                        for f in ("total_ms", "downtime_ms", "blocktime_ms",
                                  "transferred_bytes", "tick_gap_ms")}
        log(f"{label:<31}{fratio(o['total_ms'], q['total_ms']):>11}"
            f"{fratio(o['downtime_ms'], q['downtime_ms']):>13}"
            f"{fratio(o['blocktime_ms'], q['blocktime_ms']):>14}"
            f"{fratio(o['transferred_bytes'], q['transferred_bytes']):>13}"
            f"{fratio(o['tick_gap_ms'], q['tick_gap_ms']):>13}")
    for who, pc, ac in (("vmm", "ours-pc", "ours-ac"), ("QEMU", "qemu-pc", "qemu-ac"),
                        ("vmm at once", "ours-pc0", "ours-ac"),
                        ("QEMU at once", "qemu-pc0", "qemu-ac")):
        p, c = rows.get(pc), rows.get(ac)
        if p and c and p["ok"] and c["ok"]:
            ratios[f"{who} post-copy / auto-converge total"] = p["total_ms"] / c["total_ms"]
            log(f"{who} post-copy total / {who} auto-converge total: "
                f"{fratio(p['total_ms'], c['total_ms'])}")
        elif who.startswith("vmm"):
            log("vmm post-copy total / vmm auto-converge total: - "
                + ("(vmm has no --postcopy yet)" if not has_postcopy else "(not completed)"))
    return rows, ratios


# ---- main ---------------------------------------------------------------------------------

def preflight(a, keys):
    if not os.path.exists("/dev/kvm"):
        log("SKIPPED: no /dev/kvm")
        sys.exit(0)
    if not os.access(VMM, os.X_OK):
        die(f"no vmm binary at {VMM} (cargo build --release -p vmm-core --bin vmm, "
            f"or --vmm PATH; scripts/bench-migrate.sh --shaped builds it)")
    if shutil.which("ip") is None:
        log("SKIPPED: no network namespaces (no ip command)")
        sys.exit(0)
    if any(k.startswith("qemu") for k in keys):
        if shutil.which(QEMU) is None:
            die(f"{QEMU} is not installed (scripts/setup.sh installs qemu-system-x86)")
        v = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout
        first = v.splitlines()[0] if v else QEMU
        log(f"peer: {first}")
        if "version 7.2" not in v:
            print("warning: not QEMU 7.2, the version DESIGN.md's peer figures are from",
                  file=sys.stderr)
        return first
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate", default="40mbit", help="link rate, tc units (default 40mbit)")
    ap.add_argument("--delay", default="20ms", help="one-way delay (default 20ms)")
    ap.add_argument("--memory", default="512M", help="guest RAM (default 512M)")
    ap.add_argument("--cmdline", default="dirty_mb=8", help="tiny guest command line")
    ap.add_argument("--timeout", type=float, default=120,
                    help="seconds before a migration is cut and recorded as failed")
    ap.add_argument("--vmm", default=VMM, help="the vmm binary (default: the release build)")
    ap.add_argument("--cases", default=",".join(c[0] for c in CASES),
                    help="comma-separated subset of " + ",".join(c[0] for c in CASES))
    ap.add_argument("--out", default=os.path.join(ROOT, "target", "bench-postcopy"),
                    help="where results.json goes")
    ap.add_argument("--netns-prefix", default="mvmbench")
    a = ap.parse_args()
    if a.rounds < 1:
        die("--rounds must be at least 1")
    globals()["VMM"] = os.path.abspath(a.vmm)
    keys = [k.strip() for k in a.cases.split(",") if k.strip()]
    for k in keys:
        if k not in [c[0] for c in CASES]:
            die(f"unknown case {k!r} (cases: {', '.join(c[0] for c in CASES)})")
    cases = [c for c in CASES if c[0] in keys]
    a.src_ns, a.dst_ns = f"{a.netns_prefix}-src", f"{a.netns_prefix}-dst"
    peer = preflight(a, keys)
    has_postcopy = vmm_has_postcopy()
    # SIGTERM, SIGHUP and SIGINT (even when started in the background, where it is ignored)
    # run the finally blocks too.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda n, f: sys.exit(128 + n))
    work = None
    link_up = False
    runs = []
    try:
        work = tempfile.mkdtemp(prefix="bench-postcopy.")
        elf = os.path.join(work, "tiny.elf")
        subprocess.run([VMM, "tiny-kernel", elf], check=True, stdout=subprocess.DEVNULL)
        link_up = True  # `up` removes what it made if it fails; `down` is harmless anyway
        r = netns(a, "up", a.rate, a.delay)
        if r.returncode == 77:
            log("SKIPPED: no network namespaces")
            sys.stderr.write(r.stderr)
            return 0
        if r.returncode != 0:
            raise RuntimeError(f"netns-link.sh up failed: {r.stderr.strip() or r.stdout}")
        log(r.stdout.strip())
        port = PORT0
        for rnd in range(1, a.rounds + 1):
            for case in cases:
                key, who, mode, label = case
                port += 1
                if key in ("ours-pc", "ours-pc0") and not has_postcopy:
                    log(f"round {rnd} {label}: SKIPPED: vmm has no --postcopy yet")
                    runs.append(result(case, rnd, status="skipped",
                                       error="vmm has no --postcopy yet"))
                    continue
                if who == "vmm":
                    res = ours(a, work, case, rnd, port)
                else:
                    res = qemu(a, work, elf, case, rnd, port)
                runs.append(res)
                if res["status"] == "ok":
                    line = (f"round {rnd} {label}: {res['total_ms']:.1f} ms, down "
                            f"{fnum(res['downtime_ms'])} ms, {res['transferred_bytes']} B, "
                            f"{res.get('iterations')} passes")
                    if res.get("throttle"):
                        line += f", throttle {res['throttle']}%"
                    if res["tick_gap_ms"] is not None:
                        line += f", tick gap {res['tick_gap_ms']:.0f} ms"
                    if res["blocktime_ms"] is not None:
                        line += f", blocktime {res['blocktime_ms']:.1f} ms"
                    if res.get("postcopy_requests") is not None:
                        line += f", {res['postcopy_requests']} page requests"
                    line += f"; guest {'ok' if res['guest_ok'] else 'NOT OK'} ({res['guest']})"
                else:
                    line = f"round {rnd} {label}: {res['status'].upper()}: {res['error']}"
                log(line)
        rows, ratios = report(a, runs, has_postcopy)
        os.makedirs(a.out, exist_ok=True)
        path = os.path.join(a.out, "results.json")
        with open(path, "w") as f:
            json.dump({"rate": a.rate, "delay_one_way": a.delay, "memory": a.memory,
                       "cmdline": a.cmdline, "rounds": a.rounds, "timeout_s": a.timeout,
                       "vmm": VMM, "vmm_has_postcopy": has_postcopy, "peer": peer,
                       "runs": runs, "medians": rows, "ratios": ratios}, f, indent=1)
        log(f"\nraw results: {path}")
        return 0
    finally:
        # Cleanup is not to be cut short by a second Ctrl-C.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        for p in PROCS:
            stop(p)
        if link_up:
            r = netns(a, "down")
            if r.returncode != 0:
                print(f"bench-postcopy: netns-link.sh down failed: {r.stderr.strip()}",
                      file=sys.stderr)
        if work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as e:
        print(f"bench-postcopy: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("bench-postcopy: interrupted (processes stopped, namespaces and scratch files "
              "removed)", file=sys.stderr)
        sys.exit(130)
