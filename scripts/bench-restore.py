#!/usr/bin/env python3
"""Snapshot and restore of the tiny guest, ours (two ways) against QEMU 7.2.

A 2 GiB tiny guest with `dirty_mb=64` runs until it has written and verified its 64 MiB
(`verify ok round=1` on its console), is paused right after a `tick` line and saved:

  vmm snapshot   vmm snapshot --api-socket A --to DIR        (DIR/state + sparse DIR/memory)
  vmm file:      vmm migrate --api-socket A --to file:PATH --json   (the full stream)
  QEMU           qemu-system-x86_64 -M microvm -m 2G -kernel tiny.elf -append dirty_mb=64,
                 QMP stop, migrate-set-parameters max-bandwidth=1 TiB/s,
                 migrate uri="exec:cat > FILE"

Each save is repeated ROUNDS times (ours alternating, the guest staying paused; QEMU, which
refuses to migrate twice from "postmigrate", is let run to its next tick and stopped again
between two), timed (wall ms of
the command, the figure the VMM reports, and the fsync of the result afterwards, which no VMM
does) and measured (apparent size, and allocated size = st_blocks*512, as `du --block-size=1`).

Then, ROUNDS times alternating, each restore with a cold page cache for the snapshot
(`sync; echo 3 > /proc/sys/vm/drop_caches`, then the binaries, their libraries and QEMU's
firmware are read back in so that only the snapshot comes from the disk; `fincore` checks
the snapshot files are not cached):

  --restore           vmm run --restore DIR --api-socket B
  --restore-prefault  vmm run --restore DIR --restore-prefault --api-socket B
  --incoming file:    vmm run --incoming file:PATH --memory 2G --cmdline dirty_mb=64 --api-socket B
  QEMU                qemu-system-x86_64 <the same machine> -incoming "exec:cat FILE" + QMP cont

measuring, from process start (just before exec): `ready` (the control socket says the guest
runs: QMP query-status, our `status`; a restore that arrives paused, as a paused guest's
stream does, is resumed by `cont` / `resume` as soon as it says so) and `first tick` (the
first `tick N` line on the serial console, N above the last tick before the pause), and the
bytes the restoring process (with its children: QEMU's `cat`) read, from /proc/PID/io:
read_bytes (block IO, so the snapshot directory must be on a disk filesystem, not tmpfs:
checked) and rchar, at the first tick and one second later. In round 1 each restored guest
must also print its next `verify ok` (no page came back wrong).
The guest ticks every 100 ms of PIT time: the pause is taken right after a tick so that
every restore waits about the same for its first one; `ready` has no such step.

Usage: scripts/bench-restore.py [--rounds N] [--vmm PATH] [--only both|ours|qemu]
                                [--work DIR] [--memory 2G] [--dirty-mb 64]
(--work: the snapshots go to a fresh directory made in it, removed at the end; it must be
on a disk filesystem, default /var/tmp.)
Needs root (drop_caches), /dev/kvm, qemu-system-x86_64 (7.2: the peer DESIGN.md measured)
and a vmm with `vmm snapshot` and `vmm run --restore` (default target/release/vmm).
`--only qemu` measures the peer alone (it needs only `vmm tiny-kernel`).
"""
import argparse
import glob
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
PROCS = []  # every process started, stopped in main's finally


def die(msg):
    print(f"bench-restore: {msg}", file=sys.stderr)
    sys.exit(2)


def stop(proc):
    if proc.poll() is None:
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


class Console:
    """A process whose stdout (the guest's serial console, and the VMM's messages) is read
    by a thread that stamps every line with time.monotonic() as it arrives."""

    def __init__(self, args, log, stderr=None):
        self.lines = []  # (monotonic, text)
        self.cv = threading.Condition()
        self.log = open(log, "w")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=stderr if stderr is not None else subprocess.STDOUT)
        PROCS.append(self.proc)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for raw in self.proc.stdout:
            t = time.monotonic()
            text = raw.decode(errors="replace").rstrip("\r\n")
            self.log.write(text + "\n")
            self.log.flush()
            with self.cv:
                self.lines.append((t, text))
                self.cv.notify_all()
        with self.cv:
            self.cv.notify_all()

    def wait(self, pred, seconds, start=0):
        """The first line from index `start` on for which pred(text) holds: (index, time,
        text), or None after `seconds` or once the process has exited."""
        end = time.monotonic() + seconds
        i = start
        with self.cv:
            while True:
                while i < len(self.lines):
                    if pred(self.lines[i][1]):
                        return i, self.lines[i][0], self.lines[i][1]
                    i += 1
                left = end - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self.thread.is_alive()):
                    return None
                self.cv.wait(min(left, 0.1))

    def tail(self, n=6):
        with self.cv:
            return " | ".join(t for _, t in self.lines[-n:]) or "(no output)"

    def close(self):
        stop(self.proc)
        self.thread.join(2)
        self.log.close()


def tick_no(text):
    parts = text.split()
    if len(parts) == 2 and parts[0] == "tick" and parts[1].isdigit():
        return int(parts[1])
    return None


def connect(path, seconds, alive=lambda: True):
    end = time.monotonic() + seconds
    while True:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            return s
        except OSError:
            s.close()
            if time.monotonic() > end or not alive():
                raise RuntimeError(f"cannot connect to {path}")
            time.sleep(0.002)


class Api:
    """minivmm's control socket: one JSON object per line each way."""

    def __init__(self, path, seconds=10, alive=lambda: True):
        self.s = connect(path, seconds, alive)
        self.f = self.s.makefile("rw")

    def req(self, cmd, **args):
        self.f.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.f.flush()
        line = self.f.readline()
        if not line:
            raise RuntimeError(f"the control socket closed during {cmd}")
        return json.loads(line)

    def ok(self, cmd, **args):
        r = self.req(cmd, **args)
        if not r.get("ok"):
            raise RuntimeError(f"vmm {cmd}: {r.get('error', r)}")
        return r

    def close(self):
        self.s.close()


class Qmp:
    def __init__(self, path, seconds=10, alive=lambda: True):
        self.s = connect(path, seconds, alive)
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
        self.s.close()


# ---------------------------------------------------------------- sizes, caches, IO


def sizes(path):
    """(apparent bytes, allocated bytes) of a file or of every file under a directory."""
    files = [path] if os.path.isfile(path) else [
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    app = alloc = 0
    for f in files:
        st = os.stat(f)
        app += st.st_size
        alloc += st.st_blocks * 512
    return app, alloc


def du(path):
    r = subprocess.run(["du", "-s", "--block-size=1", path], capture_output=True, text=True)
    return int(r.stdout.split()[0]) if r.returncode == 0 else -1


def files_of(path):
    return [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)


def fsync_all(path):
    t0 = time.monotonic()
    for f in files_of(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return (time.monotonic() - t0) * 1e3


WARM = []  # files read back into the page cache after each drop


def warm_list(elf):
    out = [VMM, elf, "/bin/sh", "/bin/cat"]
    if shutil.which(QEMU):
        q = shutil.which(QEMU)
        out.append(q)
        for exe in (q, VMM, "/bin/sh", "/bin/cat"):
            r = subprocess.run(["ldd", exe], capture_output=True, text=True)
            for line in r.stdout.splitlines():
                for tok in line.split():
                    if tok.startswith("/") and os.path.isfile(tok):
                        out.append(tok)
        for d in ("/usr/share/qemu", "/usr/share/seabios", "/usr/lib/x86_64-linux-gnu/qemu"):
            out += [f for f in glob.glob(os.path.join(d, "**"), recursive=True)
                    if os.path.isfile(f)]
    return sorted(set(out))


def cold_cache(snapshot):
    """Drops the page cache, reads the programs back in, and checks that no page of the
    snapshot is cached."""
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    for path in WARM:
        try:
            with open(path, "rb") as f:
                while f.read(1 << 20):
                    pass
        except OSError:
            pass
    for path in files_of(snapshot):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if shutil.which("fincore"):
        r = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES",
                            *files_of(snapshot)], capture_output=True, text=True)
        cached = sum(int(x) for x in r.stdout.split() if x.isdigit())
        if cached:
            raise RuntimeError(f"{cached} bytes of {snapshot} still cached after the drop")


def tree(pid):
    """pid and its live descendants."""
    kids = {}
    for st in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(st) as f:
                data = f.read()
            ppid = int(data.rsplit(")", 1)[1].split()[1])
            kids.setdefault(ppid, []).append(int(st.split("/")[2]))
        except (OSError, ValueError, IndexError):
            pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def proc_io(pid):
    """read_bytes and rchar of pid and its live descendants (children it already reaped
    are in its own counts)."""
    rb = rc = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/io") as f:
                kv = dict(l.split(": ") for l in f.read().splitlines())
            rb += int(kv["read_bytes"])
            rc += int(kv["rchar"])
        except (OSError, KeyError, ValueError):
            pass
    return rb, rc


# ---------------------------------------------------------------- the guests


def guest_args(memory, dirty):
    return ["--memory", memory, "--cmdline", f"dirty_mb={dirty}"]


def qemu_args(elf, memory, dirty, qmp):
    return [QEMU, "-M", "microvm", "-enable-kvm", "-cpu", "host,-arch-capabilities",
            "-m", memory, "-display", "none", "-nodefaults", "-no-reboot",
            "-kernel", elf, "-append", f"dirty_mb={dirty}", "-serial", "stdio",
            "-qmp", f"unix:{qmp},server=on,wait=off"]


def settle_and_pause(con, pause, who):
    """Waits for `verify ok round=1`, then pauses right after the next tick; returns the
    last tick number printed before the pause."""
    if con.wait(lambda t: "verify ok round=1" in t, 600) is None:
        raise RuntimeError(f"{who}: the guest never printed 'verify ok round=1': {con.tail()}")
    n = len(con.lines)
    hit = con.wait(lambda t: tick_no(t) is not None, 10, n)
    if hit is None:
        raise RuntimeError(f"{who}: no tick after 'verify ok round=1': {con.tail()}")
    pause()
    time.sleep(0.3)  # anything already in flight on the console
    ticks = [tick_no(t) for _, t in con.lines if tick_no(t) is not None]
    return ticks[-1]


def save_ours(work, memory, dirty, rounds, ways):
    """Boots our guest, pauses it and saves it `rounds` times each way; returns
    (last tick, {way: [(wall, reported, fsync, apparent, allocated, path)]})."""
    api_path = f"{work}/src.api"
    con = Console([VMM, "run", *guest_args(memory, dirty), "--api-socket", api_path],
                  f"{work}/vmm-src.console")

    def call(cmd):
        # A connection per request: the API drops clients silent for 10 s.
        api = Api(api_path, 30, lambda: con.proc.poll() is None)
        try:
            return api.ok(cmd)
        finally:
            api.close()

    try:
        last = settle_and_pause(con, lambda: call("pause"), "vmm")
        st = call("status")
        if st.get("state") != "paused":
            raise RuntimeError(f"vmm did not pause: {st}")
        out = {w: [] for w in ways}
        for r in range(rounds):
            for way in ways:
                if way == "snapshot":
                    path = f"{work}/snap.{r}"
                    cmd = [VMM, "snapshot", "--api-socket", api_path, "--to", path]
                else:
                    path = f"{work}/vmm.{r}.mig"
                    cmd = [VMM, "migrate", "--api-socket", api_path, "--to", f"file:{path}",
                           "--json"]
                t0 = time.monotonic()
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
                wall = (time.monotonic() - t0) * 1e3
                if res.returncode != 0:
                    raise RuntimeError(f"{' '.join(cmd[1:3])} failed ({res.returncode}): "
                                       f"{res.stderr.strip() or res.stdout.strip()}")
                reported = None
                if way == "file":
                    try:
                        reported = float(json.loads(
                            res.stdout.strip().splitlines()[-1])["total_ms"])
                    except (ValueError, KeyError, IndexError):
                        pass
                fs = fsync_all(path)
                app, alloc = sizes(path)
                out[way].append((wall, reported, fs, app, alloc, path))
                print(f"save round {r + 1}: vmm {way}: {wall:.1f} ms"
                      f"{f' (reports {reported:.1f})' if reported is not None else ''}, "
                      f"fsync {fs:.1f} ms, {app} B apparent, {alloc} B allocated "
                      f"(du {du(path)})", flush=True)
        return last, out
    finally:
        con.close()
        unlink(api_path)


def save_qemu(work, elf, memory, dirty, rounds):
    qmp = f"{work}/qsrc.qmp"
    con = Console(qemu_args(elf, memory, dirty, qmp), f"{work}/qemu-src.console",
                  stderr=open(f"{work}/qemu-src.err", "w"))
    q = None
    try:
        q = Qmp(qmp, 30, lambda: con.proc.poll() is None)
        last = settle_and_pause(con, lambda: q.ok("stop"), "QEMU")
        q.ok("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
        out = []
        for r in range(rounds):
            if r:
                # QEMU refuses a second migrate from "postmigrate" ("Can't migrate the vm
                # that was paused due to previous migration"): run on to the next tick and
                # stop again.
                n = len(con.lines)
                q.ok("cont")
                if con.wait(lambda t: tick_no(t) is not None, 10, n) is None:
                    raise RuntimeError(f"QEMU: no tick after cont: {con.tail()}")
                q.ok("stop")
            path = f"{work}/qemu.{r}.mig"
            t0 = time.monotonic()
            q.ok("migrate", uri=f"exec:cat > {path}")
            end = t0 + 600
            while True:
                info = q.ok("query-migrate")
                if info.get("status") == "completed":
                    break
                if info.get("status") in ("failed", "cancelled"):
                    raise RuntimeError(f"QEMU migrate to a file: {info.get('status')}: "
                                       f"{info.get('error-desc', '')}")
                if time.monotonic() > end:
                    raise RuntimeError("QEMU migrate to a file did not complete in 600 s")
                time.sleep(0.002)
            wall = (time.monotonic() - t0) * 1e3
            fs = fsync_all(path)
            app, alloc = sizes(path)
            out.append((wall, float(info["total-time"]), fs, app, alloc, path))
            print(f"save round {r + 1}: QEMU exec:cat: {wall:.1f} ms (reports "
                  f"{info['total-time']}), fsync {fs:.1f} ms, {app} B apparent, {alloc} B "
                  f"allocated (du {du(path)}); ram transferred {info['ram']['transferred']}, "
                  f"{info['ram']['normal']} normal + {info['ram']['duplicate']} zero pages",
                  flush=True)
        return last, out
    finally:
        if q is not None:
            q.close()
        con.close()
        unlink(qmp)


def make_ready(kind, ctl, con):
    """Polls the restoring process's control socket until the guest runs, resuming it if it
    came back paused; returns (connection, ms since the process started, resumed?)."""
    alive = lambda: con.proc.poll() is None
    resumed = False
    end = time.monotonic() + 120
    if kind == "QEMU":
        c = Qmp(ctl, 60, alive)
        while True:
            st = c.ok("query-status")["status"]
            if st == "running":
                break
            if st in ("paused", "postmigrate", "prelaunch"):
                c.ok("cont")
                resumed = True
                break
            if st != "inmigrate" or time.monotonic() > end:
                raise RuntimeError(f"QEMU restore: status {st}")
            time.sleep(0.002)
    else:
        c = Api(ctl, 60, alive)
        while True:
            st = c.ok("status").get("state")
            if st == "running":
                break
            if st == "paused":
                c.ok("resume")
                resumed = True
                break
            if time.monotonic() > end:
                raise RuntimeError(f"state {st} after 120 s")
            time.sleep(0.002)
    return c, (time.monotonic() - con.t0) * 1e3, resumed


def restore(kind, work, elf, memory, dirty, snap, last_tick, verify):
    """One restore from a cold cache: (ready ms, first tick ms, read_bytes and rchar at the
    first tick, read_bytes and rchar 1 s later, resumed?)."""
    ctl = f"{work}/restore.ctl"
    unlink(ctl)
    if kind == "QEMU":
        args = qemu_args(elf, memory, dirty, ctl) + ["-incoming", f"exec:cat {snap}"]
    elif kind == "--incoming file:":
        args = [VMM, "run", "--incoming", f"file:{snap}", *guest_args(memory, dirty),
                "--api-socket", ctl]
    else:
        args = [VMM, "run", "--restore", snap, "--api-socket", ctl]
        if kind == "--restore-prefault":
            args.insert(4, "--restore-prefault")
    cold_cache(snap)
    log = f"{work}/restore.console"
    con = Console(args, log, stderr=open(f"{work}/restore.err", "w") if kind == "QEMU"
                  else None)
    t0 = con.t0
    c = None
    try:
        try:
            c, ready, resumed = make_ready(kind, ctl, con)
        except (RuntimeError, OSError, ValueError) as e:
            time.sleep(0.2)
            raise RuntimeError(f"{kind}: {e}; exit status {con.proc.poll()}; console: "
                               f"{con.tail()}") from None
        hit = con.wait(lambda t: tick_no(t) is not None or "verify FAIL" in t, 60)
        if hit is None:
            raise RuntimeError(f"{kind}: no tick within 60 s of the restore: {con.tail()}")
        io1 = proc_io(con.proc.pid)
        _, t_tick, text = hit
        if "verify FAIL" in text or tick_no(text) <= last_tick:
            raise RuntimeError(f"{kind}: first line {text!r} after a pause at tick "
                               f"{last_tick}")
        time.sleep(1.0)
        io2 = proc_io(con.proc.pid)
        if verify:
            v = con.wait(lambda t: "verify " in t, 120, hit[0])
            if v is None or "verify ok" not in v[2]:
                raise RuntimeError(f"{kind}: the restored guest did not verify its memory: "
                                   f"{con.tail()}")
        if con.proc.poll() is not None:
            raise RuntimeError(f"{kind}: the restored VMM exited ({con.proc.returncode}): "
                               f"{con.tail()}")
        return ready, (t_tick - t0) * 1e3, io1[0], io1[1], io2[0], io2[1], resumed
    finally:
        if c is not None:
            c.close()
        con.close()
        unlink(ctl)


# ---------------------------------------------------------------- main


def med(xs):
    xs = [x for x in xs if x is not None]
    return (statistics.median(xs), min(xs), max(xs)) if xs else None


def fmt(t, prec=1, scale=1.0):
    if t is None:
        return "-"
    m, lo, hi = (x / scale for x in t)
    return f"{m:.{prec}f} ({lo:.{prec}f}-{hi:.{prec}f})"


def ratio(a, b):
    if a is None or b is None:
        return "-"
    return f"{a[0] / b[0]:.2f}x" if b[0] else "-"


def fstype(path):
    r = subprocess.run(["df", "--output=fstype", path], capture_output=True, text=True)
    return r.stdout.split()[-1] if r.returncode == 0 else "?"


def preflight(only):
    if not os.path.exists("/dev/kvm"):
        die("/dev/kvm is missing")
    if not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        die("cannot write /proc/sys/vm/drop_caches (run as root)")
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
        h = subprocess.run([VMM, "snapshot", "--help"], capture_output=True, text=True)
        if h.returncode != 0 or "--to" not in h.stdout:
            die(f"{VMM} has no `vmm snapshot` yet (snapshot to a directory is still to "
                f"land); rebuild once it has, or run --only qemu")
        h = subprocess.run([VMM, "run", "--help"], capture_output=True, text=True)
        if "--restore" not in h.stdout or "--restore-prefault" not in h.stdout:
            die(f"{VMM} has no `vmm run --restore DIR [--restore-prefault]` yet; rebuild "
                f"once it has, or run --only qemu")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--vmm", default=VMM, help="the vmm binary (default: the release build)")
    ap.add_argument("--only", choices=("both", "ours", "qemu"), default="both")
    ap.add_argument("--work", default="/var/tmp",
                    help="where to make the scratch directory for the snapshots (removed at "
                         "the end); on a disk filesystem, not tmpfs (default /var/tmp)")
    ap.add_argument("--memory", default="2G")
    ap.add_argument("--dirty-mb", type=int, default=64)
    a = ap.parse_args()
    globals()["VMM"] = os.path.abspath(a.vmm)
    preflight(a.only)
    # SIGTERM, SIGHUP and SIGINT (even when started in the background, where it is ignored)
    # run the finally blocks too.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda n, f: sys.exit(128 + n))
    work = tempfile.mkdtemp(prefix="bench-restore.", dir=a.work)
    try:
        fs = fstype(work)
        print(f"snapshots in {work} ({fs})")
        if fs in ("tmpfs", "ramfs", "hugetlbfs", "devtmpfs"):
            raise RuntimeError(f"{work} is on {fs}: read_bytes would not count its reads; "
                               f"give --work a directory on a disk filesystem")
        elf = os.path.join(work, "tiny.elf")
        subprocess.run([VMM, "tiny-kernel", elf], check=True)
        WARM.extend(warm_list(elf))
        ours_on = a.only in ("both", "ours")
        qemu_on = a.only in ("both", "qemu")

        # Saves.
        saves = {}
        if ours_on:
            last_ours, got = save_ours(work, a.memory, a.dirty_mb, a.rounds,
                                       ["snapshot", "file"])
            saves["vmm snapshot DIR"] = got["snapshot"]
            saves["vmm migrate file:"] = got["file"]
        if qemu_on:
            last_qemu, saves["QEMU exec:cat"] = save_qemu(work, elf, a.memory, a.dirty_mb,
                                                          a.rounds)
        # Keep the first of each for the restores; drop the others.
        for rows in saves.values():
            for row in rows[1:]:
                p = row[5]
                shutil.rmtree(p) if os.path.isdir(p) else unlink(p)

        # Restores.
        kinds = []
        if ours_on:
            snap_dir, snap_file = saves["vmm snapshot DIR"][0][5], saves["vmm migrate file:"][0][5]
            kinds += [("--restore", snap_dir, last_ours),
                      ("--restore-prefault", snap_dir, last_ours),
                      ("--incoming file:", snap_file, last_ours)]
        if qemu_on:
            kinds.append(("QEMU", saves["QEMU exec:cat"][0][5], last_qemu))
        res = {k: [] for k, _, _ in kinds}
        for r in range(a.rounds):
            for kind, snap, last in kinds:
                row = restore(kind, work, elf, a.memory, a.dirty_mb, snap, last,
                              verify=(r == 0))
                res[kind].append(row)
                print(f"restore round {r + 1}: {kind}: ready {row[0]:.1f} ms, first tick "
                      f"{row[1]:.1f} ms, read_bytes {row[2]} (rchar {row[3]}), 1 s later "
                      f"{row[4]} (rchar {row[5]}){', resumed' if row[6] else ''}"
                      f"{', verify ok' if r == 0 else ''}", flush=True)

        # Tables.
        print()
        print(f"save: {a.memory} tiny guest, dirty_mb={a.dirty_mb}, paused; median (min-max) "
              f"of {a.rounds}")
        print(f"{'way':<20}{'wall ms':>24}{'reported ms':>24}{'fsync ms':>22}"
              f"{'apparent MiB':>14}{'allocated MiB':>15}")
        for way, rows in saves.items():
            print(f"{way:<20}{fmt(med([x[0] for x in rows])):>24}"
                  f"{fmt(med([x[1] for x in rows])):>24}{fmt(med([x[2] for x in rows])):>22}"
                  f"{rows[0][3] / 2**20:>14.1f}{rows[0][4] / 2**20:>15.1f}")
        print()
        print(f"restore: cold page cache for the snapshot; median (min-max) of {a.rounds}; "
              f"MiB read from the disk (read_bytes) at the first tick and 1 s later")
        print(f"{'restore':<20}{'ready ms':>22}{'first tick ms':>24}{'read MiB':>20}"
              f"{'read MiB +1s':>20}{'rchar MiB':>12}")
        stat = {}
        for kind, rows in res.items():
            stat[kind] = [med([x[k] for x in rows]) for k in range(6)]
            s = stat[kind]
            print(f"{kind:<20}{fmt(s[0]):>22}{fmt(s[1]):>24}{fmt(s[2], 1, 2**20):>20}"
                  f"{fmt(s[4], 1, 2**20):>20}{s[3][0] / 2**20:>12.1f}")
        for base in ("QEMU", "--incoming file:"):
            if base not in stat or len(stat) < 2:
                continue
            print(f"ratios to {base} (medians): ready / first tick / read_bytes at the "
                  f"first tick / +1 s")
            for kind in stat:
                if kind == base:
                    continue
                s, b = stat[kind], stat[base]
                print(f"  {kind:<20}{ratio(s[0], b[0]):>9}{ratio(s[1], b[1]):>9}"
                      f"{ratio(s[2], b[2]):>9}{ratio(s[4], b[4]):>9}")
        if qemu_on and ours_on:
            print("(QEMU's first tick and ready include its `cont`; ours the `resume` if "
                  "the restored guest came back paused: see 'resumed' above)")
    finally:
        for p in PROCS:
            stop(p)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as e:
        print(f"bench-restore: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("bench-restore: interrupted (processes stopped, scratch files removed)",
              file=sys.stderr)
        sys.exit(130)
