#!/usr/bin/env python3
"""Drives a VMM through QMP with PyPI's qemu.qmp (QMPClient), the same steps whichever VMM
it is: `vmm` (minivmm) or `qemu-system-x86_64`. That the one script passes against both is
the point: the protocol is QEMU's, not our reading of it.

Steps, each checked: the greeting; commands refused before qmp_capabilities; query-status;
stop and cont with their STOP and RESUME events; bad input (an unknown command, a wrong
argument type, a missing argument) answered with QMP's errors while the VMM runs on; a
migration to a sink that never answers, cancelled with migrate_cancel; a live
migration between two processes (the destination started with `-incoming defer` and told
where to listen by migrate-incoming), watched by query-migrate and the MIGRATION events; a RAM
hotplug on the destination (`x-ram-add` where the VMM has it, QEMU's object-add + device_add
pc-dimm otherwise), seen in query-memory-devices; system_reset, with its RESET event and the
guest booting again; quit, with its SHUTDOWN event.

Usage: drive.py vmm PATH_TO_VMM WORKDIR   |   drive.py qemu PATH_TO_QEMU WORKDIR TINY_ELF
Prints one line per step, and `qmp drive ok: KIND` at the end; exits non-zero on the first
step that does not hold.
"""
import asyncio
import os
import subprocess
import sys
import time

from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.protocol import ConnectError

HOTPLUG_SIZE = 64 << 20
# The tiny guest keeps rewriting 1 MiB: a migration capped at 20 KB/s stays active.
GUEST_CMDLINE = "dirty_mb=1"


def fail(why):
    print(f"FAIL: {why}", flush=True)
    sys.exit(1)


def check(cond, why):
    if not cond:
        fail(why)


def step(what):
    print(f"ok: {what}", flush=True)


def start(kind, binary, work, name, elf, incoming=None):
    """Starts one VMM with its QMP socket at WORK/NAME.qmp; returns (process, socket)."""
    qmp = os.path.join(work, f"{name}.qmp")
    serial = os.path.join(work, f"{name}.serial")
    for f in (qmp,):
        if os.path.exists(f):
            os.unlink(f)
    if kind == "vmm":
        cmd = [binary, "run", "--memory", "128M", "--cmdline", GUEST_CMDLINE,
               "--serial", f"file:{serial}", "--qmp", f"unix:{qmp}"]
        if incoming:
            cmd += ["--incoming", incoming]
    else:
        # -M pc: microvm has no pc-dimm to hot-plug.
        cmd = [binary, "-M", "pc", "-enable-kvm", "-cpu", "host,-arch-capabilities",
               "-m", "128M,slots=2,maxmem=1G", "-display", "none", "-nodefaults",
               "-kernel", elf, "-append", GUEST_CMDLINE, "-serial", f"file:{serial}",
               "-qmp", f"unix:{qmp},server=on,wait=off"]
        if incoming:
            cmd += ["-incoming", incoming]
    log = open(os.path.join(work, f"{name}.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 20
    while not os.path.exists(qmp):
        if proc.poll() is not None:
            fail(f"{name} exited with {proc.returncode} before its QMP socket appeared")
        if time.time() > deadline:
            fail(f"{name}: no QMP socket {qmp} after 20 s")
        time.sleep(0.02)
    return proc, qmp


async def connect(name, path):
    client = QMPClient(name)
    for _ in range(100):
        try:
            await client.connect(path)
            return client
        except ConnectError:
            await asyncio.sleep(0.05)
    fail(f"cannot connect to {path}")


async def next_event(listener, names, timeout=30):
    """The next event whose name is in NAMES (others are skipped)."""
    async def wait():
        async for ev in listener:
            if ev["event"] in names:
                return ev
    try:
        return await asyncio.wait_for(wait(), timeout)
    except asyncio.TimeoutError:
        fail(f"no {names} event within {timeout} s")


async def refused(client, cmd, args, want_class):
    try:
        await client.execute(cmd, args)
    except ExecuteError as e:
        check(e.error_class == want_class, f"{cmd} {args}: class {e.error_class}, not {want_class}")
        return e.error.error.desc
    fail(f"{cmd} {args} was accepted")


async def raw_before_negotiation(path):
    """A client that speaks before reading the greeting: the greeting still comes first,
    and a command before qmp_capabilities is refused with CommandNotFound."""
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(b'{"execute":"query-status","id":1}')
    await writer.drain()
    greeting = await asyncio.wait_for(reader.readline(), 10)
    check(b'"QMP"' in greeting, f"first line is not the greeting: {greeting!r}")
    answer = await asyncio.wait_for(reader.readline(), 10)
    check(b'"CommandNotFound"' in answer, f"a command before negotiation: {answer!r}")
    writer.close()


async def main(kind, binary, work, elf):
    os.makedirs(work, exist_ok=True)
    mig = os.path.join(work, "mig.sock")
    if os.path.exists(mig):
        os.unlink(mig)
    src, src_qmp = start(kind, binary, work, "src", elf)
    # The guest booted (QEMU's -M pc goes through its firmware first, seconds here).
    deadline = time.time() + 60
    src_serial = os.path.join(work, "src.serial")
    while not (os.path.exists(src_serial) and "tiny: boot" in open(src_serial, errors="replace").read()):
        if time.time() > deadline:
            fail("the source guest never printed `tiny: boot`")
        time.sleep(0.05)
    dst, dst_qmp = start(kind, binary, work, "dst", elf, incoming="defer")
    try:
        await raw_before_negotiation(src_qmp)
        step("a client that speaks first gets the greeting first, then CommandNotFound")

        s = await connect("src", src_qmp)
        check("QMP" in s.greeting._raw and "version" in s.greeting.QMP._raw,
              f"greeting: {s.greeting}")
        step(f"greeting {s.greeting.QMP._raw['version']}")
        commands = {c["name"] for c in await s.execute("query-commands")}
        for needed in ("query-status", "stop", "cont", "quit", "query-migrate", "migrate",
                       "migrate_cancel", "migrate-set-parameters",
                       "migrate-set-capabilities", "query-memory-devices"):
            check(needed in commands, f"query-commands lacks {needed}")
        st = await s.execute("query-status")
        check(st["status"] == "running" and st["running"] is True, f"query-status: {st}")
        step("query-status: running")

        with s.listener() as events:
            await s.execute("stop")
            await next_event(events, {"STOP"})
            st = await s.execute("query-status")
            check(st["status"] == "paused" and not st["running"], f"after stop: {st}")
            await s.execute("cont")
            await next_event(events, {"RESUME"})
            st = await s.execute("query-status")
            check(st["running"], f"after cont: {st}")
        step("stop/cont with STOP and RESUME events")

        desc = await refused(s, "no-such-command", {}, "CommandNotFound")
        await refused(s, "migrate", {"uri": 5}, "GenericError")
        await refused(s, "migrate", {}, "GenericError")
        await refused(s, "migrate-set-parameters", {"downtime-limit": "soon"}, "GenericError")
        st = await s.execute("query-status")
        check(st["running"], f"after bad input: {st}")
        step(f"bad input refused ({desc}) and the VMM runs on")

        d = await connect("dst", dst_qmp)
        st = await d.execute("query-status")
        check(st["status"] == "inmigrate", f"destination before the stream: {st}")
        await refused(d, "migrate-incoming", {}, "GenericError")
        await d.execute("migrate-set-capabilities",
                        {"capabilities": [{"capability": "events", "state": True}]})
        await d.execute("migrate-incoming", {"uri": f"unix:{mig}"})
        deadline = time.time() + 10
        while not os.path.exists(mig):
            check(time.time() < deadline, f"migrate-incoming: nothing listens on {mig}")
            await asyncio.sleep(0.02)
        await refused(d, "migrate-incoming", {"uri": f"unix:{mig}.2"}, "GenericError")
        step("destination: inmigrate (-incoming defer), then migrate-incoming")

        await s.execute("migrate-set-capabilities",
                        {"capabilities": [{"capability": "auto-converge", "state": True},
                                          {"capability": "events", "state": True}]})
        await s.execute("migrate-set-parameters", {"downtime-limit": 300})

        # A migration to a sink that never answers, slowed to 20 KB/s and with a downtime
        # limit no pass meets (it stays active), cancelled.
        sink_path = os.path.join(work, "sink.sock")
        if os.path.exists(sink_path):
            os.unlink(sink_path)

        async def swallow(reader, writer):
            while await reader.read(65536):
                pass
            writer.close()
        sink = await asyncio.start_unix_server(swallow, path=sink_path)
        await s.execute("migrate-set-parameters", {"max-bandwidth": 20000, "downtime-limit": 1})
        with s.listener() as events:
            await s.execute("migrate", {"uri": f"unix:{sink_path}"})
            while (await next_event(events, {"MIGRATION"}))["data"]["status"] != "active":
                pass
            await s.execute("migrate_cancel")
            while True:
                status = (await next_event(events, {"MIGRATION"}))["data"]["status"]
                if status in ("cancelled", "completed", "failed"):
                    break
            check(status == "cancelled", f"after migrate_cancel: MIGRATION {status}")
        info = await s.execute("query-migrate")
        check(info.get("status") == "cancelled", f"query-migrate after the cancel: {info}")
        st = await s.execute("query-status")
        check(st["running"], f"after the cancel: {st}")
        sink.close()
        # QEMU's default cap (128 MiB/s) again, and the downtime limit.
        await s.execute("migrate-set-parameters",
                        {"max-bandwidth": 134217728, "downtime-limit": 300})
        step("migrate_cancel: MIGRATION cancelled, the guest runs on")
        seen = []
        with s.listener() as events, d.listener() as dst_events:
            await s.execute("migrate", {"uri": f"unix:{mig}"})
            while True:
                ev = await next_event(events, {"MIGRATION"}, timeout=60)
                seen.append(ev["data"]["status"])
                if seen[-1] in ("completed", "failed", "cancelled"):
                    break
            check(seen[-1] == "completed", f"MIGRATION statuses: {seen}")
            info = await s.execute("query-migrate")
            check(info.get("status") == "completed", f"query-migrate: {info}")
            for field in ("total-time", "downtime", "setup-time"):
                check(isinstance(info.get(field), int), f"query-migrate lacks {field}: {info}")
            ram = info.get("ram", {})
            for field in ("transferred", "remaining", "total", "duplicate", "normal",
                          "dirty-pages-rate", "mbps", "dirty-sync-count"):
                check(field in ram, f"query-migrate ram lacks {field}: {info}")
            check(ram["total"] > 0, f"query-migrate ram: {ram}")
            dst_seen = []
            while not dst_seen or dst_seen[-1] not in ("completed", "failed"):
                ev = await next_event(dst_events, {"MIGRATION"}, timeout=30)
                dst_seen.append(ev["data"]["status"])
            check(dst_seen[-1] == "completed", f"destination MIGRATION statuses: {dst_seen}")
            step(f"destination: MIGRATION {dst_seen}")
            step(f"migration: MIGRATION {seen}; query-migrate total-time "
                 f"{info['total-time']} ms, downtime {info['downtime']} ms, "
                 f"{ram['transferred']} bytes")
            # The destination runs the guest.
            deadline = time.time() + 30
            while True:
                st = await d.execute("query-status")
                if st["running"]:
                    break
                check(time.time() < deadline, f"destination never ran: {st}")
                await asyncio.sleep(0.05)
            step(f"destination: {st['status']}")
        # The source: QEMU stays in postmigrate until told; minivmm's ends by itself.
        try:
            st = await s.execute("query-status")
            check(st["status"] == "postmigrate", f"source after the migration: {st}")
            step("source: postmigrate")
            await s.execute("quit")
        except (EOFError, ConnectionError, ExecuteError) as e:
            step(f"source ended by itself ({type(e).__name__})")
        try:
            await s.disconnect()
        except (EOFError, ConnectionError):
            pass

        if "x-ram-add" in commands:
            await d.execute("x-ram-add", {"id": "extra", "size": HOTPLUG_SIZE})
        else:
            await d.execute("object-add", {"qom-type": "memory-backend-ram",
                                           "id": "mem-extra", "size": HOTPLUG_SIZE})
            await d.execute("device_add", {"driver": "pc-dimm", "id": "extra",
                                           "memdev": "mem-extra"})
        devices = await d.execute("query-memory-devices")
        found = [x for x in devices if x["data"].get("id") == "extra"]
        check(len(found) == 1 and found[0]["data"]["size"] == HOTPLUG_SIZE,
              f"query-memory-devices: {devices}")
        step(f"hotplug: {found[0]['type']} extra of {HOTPLUG_SIZE} bytes at "
             f"{found[0]['data']['addr']:#x}")

        serial = os.path.join(work, "dst.serial")
        before = open(serial, errors="replace").read().count("tiny: boot")
        with d.listener() as events:
            await d.execute("system_reset")
            ev = await next_event(events, {"RESET"}, timeout=10)
        deadline = time.time() + 60
        while open(serial, errors="replace").read().count("tiny: boot") <= before:
            check(time.time() < deadline, "no `tiny: boot` after system_reset")
            await asyncio.sleep(0.05)
        st = await d.execute("query-status")
        check(st["running"], f"after system_reset: {st}")
        step(f"system_reset: RESET {ev['data']}, the guest booted again")

        with d.listener() as events:
            await d.execute("quit")
            ev = await next_event(events, {"SHUTDOWN"}, timeout=10)
            check(ev["data"]["guest"] is False, f"SHUTDOWN: {ev}")
        step(f"quit: SHUTDOWN {ev['data']}")
        try:
            await d.disconnect()
        except (EOFError, ConnectionError):
            pass
        for name, proc in (("source", src), ("destination", dst)):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                fail(f"the {name} did not exit")
            check(proc.returncode == 0, f"the {name} exited with {proc.returncode}")
        print(f"qmp drive ok: {kind}", flush=True)
    finally:
        for proc in (src, dst):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[1] not in ("vmm", "qemu"):
        print(__doc__)
        sys.exit(2)
    kind, binary, work = sys.argv[1:4]
    elf = sys.argv[4] if len(sys.argv) > 4 else None
    if kind == "qemu" and not elf:
        fail("qemu needs the tiny guest's ELF (vmm tiny-kernel PATH)")
    asyncio.run(main(kind, binary, work, elf))
