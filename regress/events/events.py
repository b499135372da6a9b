#!/usr/bin/env python3
"""regress/events: vmctl for scripts and dashboards, with real guests (QEMU,
TCG): `vmctl -j status` against the table, `vmctl stats` of a running
guest (CPU time, disk and network counters growing), `vmctl events` seen
by two listeners of different users, the events of a reboot and of each
way a VM ends, and a listener that never reads.

Runs as root. Each case starts its own vmd (regress/lib/vmdregress.py)
with its own temp dir, socket, vm.conf and console logs (and, for the
network, its own network namespace), and kills vmd and every process it
started at the end, even on failure. Listeners write to files in the
case's temp dir.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib"))
import vmdregress as t  # noqa: E402
from vmdregress import VMCTL, Listener, Failure, TestUser, Vmd, case, expect, wait_for, with_vmd  # noqa: E402

QUIET = "console=ttyS0 quiet"
UNITS = "BKMGTPE"


def fmt_scaled(n):
    """common::size::format (fmt_scaled(3)) in Python: `512M`, `1.5G`."""
    unit = 0
    while unit + 1 < len(UNITS) and n // 1024 >= 1 << (10 * unit):
        unit += 1
    factor = 1 << (10 * unit)
    number, tenths = n // factor, 0
    if unit:
        tenths = (10 * ((n % factor) >> (10 * (unit - 1))) + 512) // 1024
    if tenths >= 10:
        number, tenths = number + 1, 0
    if number == 0:
        return "0B"
    if unit == 0 or number >= 100:
        return f"{number}{UNITS[unit]}"
    return f"{number}.{tenths}{UNITS[unit]}"


def parse_scaled(text):
    """A table's size (`77.8M`) in bytes, roughly."""
    return int(float(text[:-1]) * (1 << (10 * UNITS.index(text[-1]))))


def json_lines(vmd, *args, **kw):
    """vmctl -j ARGS that must succeed: its objects, one a line."""
    rc, out, err = vmd.vmctl_streams("-j", *args, **kw)
    if rc != 0 or err:
        raise Failure(f"vmctl -j {' '.join(args)}: exit {rc}: {out!r} {err!r}")
    try:
        return [json.loads(line) for line in out.splitlines()]
    except ValueError as e:
        raise Failure(f"vmctl -j {' '.join(args)}: not JSON lines ({e}): {out!r}")


def stats_of(vmd, name):
    objs = json_lines(vmd, "stats", name)
    if len(objs) != 1 or objs[0]["name"] != name:
        raise Failure(f"stats {name}: {objs}")
    return objs[0]


# --- cases


def json_status_matches_table(vmd):
    """Every VM's JSON object has what its table row shows: a running one,
    a paused one, and a configured one that is stopped."""
    run_id, _ = vmd.start("jrun")
    pause_id, _ = vmd.start("jpause", memory="192M")
    expect(vmd.vmctl("pause", "jpause"), 0, r"paused vm \d+ successfully", "pause")
    rows = {row["NAME"]: row for row in vmd.status()}
    objs = {o["name"]: o for o in json_lines(vmd, "status")}
    if set(rows) != set(objs) or set(rows) != {"jrun", "jpause", "jcfg"}:
        raise Failure(f"table {sorted(rows)}, JSON {sorted(objs)}")
    for name, row in rows.items():
        o = objs[name]
        active = o["state"] in ("running", "paused", "stopping")
        got = {
            "ID": str(o["id"]),
            "PID": str(o["pid"]) if active else "-",
            "VCPUS": str(o["vcpus"]),
            "MAXMEM": fmt_scaled(o["max_memory"]),
            "CURMEM": fmt_scaled(o["memory"]) if active else "-",
            "TTY": o["tty"].removeprefix("/dev/") if active else "-",
            "OWNER": o["owner"][:15],
            "STATE": o["state"],
            "NAME": o["name"],
        }
        # A running guest's resident memory moves between the two
        # requests: the same within 16M.
        if active and abs(parse_scaled(row["CURMEM"]) - o["memory"]) < 16 << 20:
            got["CURMEM"] = row["CURMEM"]
        if got != row:
            raise Failure(f"{name}: table row {row}, from JSON {got} ({o})")
        if not active and (o["pid"] is not None or o["memory"] is not None or o["tty"] is not None):
            raise Failure(f"stopped {name} has process fields: {o}")
        if o["uid"] != 0 or type(o["max_memory"]) is not int:
            raise Failure(f"{name}: uid or sizes: {o}")
    if (objs["jrun"]["state"], objs["jpause"]["state"], objs["jcfg"]["state"]) != ("running", "paused", "stopped"):
        raise Failure(f"states: {objs}")
    if objs["jpause"]["max_memory"] != 192 << 20 or objs["jrun"]["id"] != run_id or objs["jpause"]["id"] != pause_id:
        raise Failure(f"ids or memory: {objs}")
    # -r and an id filter as the table does; the table itself is unchanged.
    expect(vmd.vmctl("status"), 0, r"^   ID   PID VCPUS  MAXMEM  CURMEM     TTY        OWNER    STATE NAME$",
           "table header")
    if [o["name"] for o in json_lines(vmd, "status", "-r")] != ["jrun", "jpause"]:
        raise Failure(f"-j status -r: {json_lines(vmd, 'status', '-r')}")
    if [o["name"] for o in json_lines(vmd, "status", "jcfg")] != ["jcfg"]:
        raise Failure("-j status jcfg")
    rc, out, err = vmd.vmctl_streams("-j", "status", "nosuch")
    if (rc, out, err) != (1, "", "vmctl: vm not found\n"):
        raise Failure(f"-j status of an unknown VM: {(rc, out, err)}")


def stats_grow(vmd):
    """A running guest's CPU time grows; after it read and wrote its disk
    its disk counters show it; after the host pings it over its local
    interface its tap's counters grow both ways. A stopped VM shows its
    state only."""
    disk = os.path.join(vmd.dir, "disk.img")
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    vmid, _ = vmd.start("st1", "-d", disk, "-L", cmdline=f"{QUIET} vmd.net=dhcp vmd.diskwrite=vda:STATS-WORD")
    first = stats_of(vmd, "st1")
    vmd.wait_console("st1", "VMD-GUEST: disk vda head STATS-WORD")
    vmd.wait_console("st1", "VMD-GUEST: dhcp eth0 bootfile ")
    vmd.wait_console("st1", "VMD-GUEST: tick 2")
    mid = stats_of(vmd, "st1")
    for o in (first, mid):
        if o["state"] != "running" or o["id"] != vmid or not o["memory"] or len(o["interfaces"]) != 1:
            raise Failure(f"stats: {o}")
    if not mid["cpu_time"] > first["cpu_time"] or not mid["uptime"] > first["uptime"]:
        raise Failure(f"CPU time or uptime did not grow: {first} then {mid}")
    if not 0 < mid["cpu_use"] <= 100 * os.cpu_count() + 1:
        raise Failure(f"cpu_use: {mid}")
    [d] = mid["disks"]
    if d["read_bytes"] < 32 or d["read_ops"] < 1 or d["written_bytes"] < len("STATS-WORD") or d["write_ops"] < 1:
        raise Failure(f"the disk's counters after the guest read and wrote it: {d}")
    if not mid["console_log_size"] or mid["console_log_size"] < len("VMD-GUEST: tick 2"):
        raise Failure(f"console log size: {mid}")
    # The host side of the local interface pings the guest.
    guest = f"100.64.{vmid}.3"
    wait_for(f"{guest} to answer the host's ping", lambda: vmd.ping(guest), 60)
    for _ in range(3):
        vmd.ping(guest)
    last = stats_of(vmd, "st1")
    a, b = mid["interfaces"][0], last["interfaces"][0]
    if not b["tap"] or b["tap"] != a["tap"] or b["tap"] not in vmd.links():
        raise Failure(f"tap name: {b} (links {sorted(vmd.links())})")
    for key in ("rx_bytes", "rx_packets", "tx_bytes", "tx_packets"):
        if not b[key] > a[key]:
            raise Failure(f"{key} did not grow after the pings: {a} then {b}")
    # The human form, and -w: a second refresh comes.
    rc, out = vmd.vmctl("stats", "st1")
    if rc != 0 or not re.search(rf"^vm {vmid} st1: running, up \d+:\d\d:\d\d$", out, re.M) \
            or not re.search(r"^  disk 0   read \S+ \(\d+ ops\), written \S+ \(\d+ ops\)$", out, re.M) \
            or not re.search(r"^  net 0    \S+: in \S+ \(\d+ packets, \d+ dropped\), out ", out, re.M):
        raise Failure(f"stats st1: exit {rc}: {out!r}")
    watch = subprocess.Popen([VMCTL, "-s", vmd.sock, "-j", "stats", "-w", "1", "st1"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        samples = [json.loads(watch.stdout.readline()) for _ in range(2)]
    finally:
        watch.kill()
        watch.wait()
    if [s["name"] for s in samples] != ["st1", "st1"] or not samples[1]["cpu_time"] >= samples[0]["cpu_time"]:
        raise Failure(f"stats -w 1: {samples}")
    expect(vmd.vmctl("stop", "-w", "st1"), 0, rf"terminated vm {vmid}", "stop -w")
    rc, out, err = vmd.vmctl_streams("-j", "stats", "st1")
    if (rc, out, err) != (1, "", "vmctl: vm not found\n"):
        raise Failure(f"stats of an ended vmctl VM: {(rc, out, err)}")
    [cfg] = json_lines(vmd, "stats")
    if cfg["name"] != "scfg" or cfg["state"] != "stopped" or cfg["uptime"] is not None \
            or cfg["disks"] or cfg["interfaces"] or cfg["console_log_size"] is not None:
        raise Failure(f"a stopped VM's stats: {cfg}")


def stats_of_a_stuck_vm_process(vmd):
    """A VM process that cannot answer (SIGSTOP) gets its VM's figures
    sent without its backend's after vmd's bound (10 s), while another
    request is answered at once; after SIGCONT they come again."""
    vmid, _ = vmd.start("stuck1")
    vm_pid, _ = vmd.vm_pids(vmid)
    vmd.wait_console("stuck1", "VMD-GUEST: ready")
    os.kill(vm_pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        slow = subprocess.Popen([VMCTL, "-s", vmd.sock, "-j", "stats", "stuck1"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        rc, out = vmd.vmctl("status", timeout=30)
        if rc != 0 or "stuck1" not in out or time.monotonic() - started > 8:
            raise Failure(f"status while stats waits: {rc} {out!r}")
        out, _ = slow.communicate(timeout=60)
        took = time.monotonic() - started
        [o] = [json.loads(line) for line in out.splitlines()]
        if slow.returncode != 0 or o["state"] != "running" or o["cpu_time"] is None \
                or o["console_log_size"] is not None or o["disks"] != [] or not 9 <= took < 30:
            raise Failure(f"stats of a stuck VM process after {took:.1f}s: exit {slow.returncode}: {out!r}")
    finally:
        os.kill(vm_pid, signal.SIGCONT)
    # It answers again (a late answer serves the next request waiting).
    wait_for("the VM process's counters again", lambda: stats_of(vmd, "stuck1")["console_log_size"] is not None)


def two_listeners_see_the_life_in_order(vmd, user):
    """Root's listener of every event and another user's listener of one
    VM, both started before it, see its start, pause, unpause and stop in
    order; `events -1` ends after the first event. The other user sees
    the VM's stats too."""
    everything = Listener(vmd, "root")
    theirs = Listener(vmd, "user", "ev1", user=user)
    once = Listener(vmd, "once", "-1", "ev1", json_out=False)
    try:
        vmid, _ = vmd.start("ev1")
        other, _ = vmd.start("ev2")
        vmd.wait_console("ev1", "VMD-GUEST: ready")
        # The other user sees ev1's figures as it sees it in status.
        [seen] = json_lines(vmd, "stats", "ev1", user=user.name)
        if seen["state"] != "running" or seen["cpu_time"] is None or seen["console_log_size"] is None:
            raise Failure(f"{user.name}'s stats of ev1: {seen}")
        expect(vmd.vmctl("pause", "ev1"), 0, r"paused vm \d+ successfully", "pause")
        expect(vmd.vmctl("unpause", "ev1"), 0, r"unpaused vm \d+ successfully", "unpause")
        expect(vmd.vmctl("stop", "-w", "ev1"), 0, rf"terminated vm {vmid}", "stop -w")
        expect(vmd.vmctl("stop", "-f", "ev2"), 0, r"ev2", "stop -f")
        for listener in (everything, theirs):
            listener.wait_event(vmid, "stopped")
        everything.wait_event(other, "stopped")
        want = ["started", "running", "paused", "unpaused", "stopping", "stopped"]
        for who, listener in (("root", everything), (user.name, theirs)):
            mine = [o for o in listener.objects() if o["id"] == vmid]
            if [o["event"] for o in mine] != want or any(o["name"] != "ev1" for o in mine):
                raise Failure(f"{who}'s listener saw {mine}")
            if mine[-1].get("reason") != "powered-off" or mine[-2].get("forced") is not False:
                raise Failure(f"{who}: stopping or stopped: {mine[-2:]}")
            times = [o["time"] for o in mine]
            if times != sorted(times) or abs(times[0] - time.time()) > 600:
                raise Failure(f"{who}: times {times}")
        if any(o["id"] == other for o in theirs.objects()):
            raise Failure(f"the listener of ev1 saw ev2: {theirs.objects()}")
        ev2 = [(o["event"], o.get("reason"), o.get("forced")) for o in everything.objects() if o["id"] == other]
        if ev2[-2:] != [("stopping", None, True), ("stopped", "forced", None)]:
            raise Failure(f"ev2's end: {ev2}")
        once.proc.wait(timeout=t.WAIT_TIMEOUT)
        if once.proc.returncode != 0 or not re.fullmatch(
                rf"\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{{3}}Z {vmid} ev1 started\n", once.text()):
            raise Failure(f"events -1: exit {once.proc.returncode}: {once.text()!r}")
        # A reload is every listener's.
        expect(vmd.vmctl("reload"), 0, r"^$", "reload")
        for listener in (everything, theirs):
            wait_for("the reload at the listeners",
                     lambda listener=listener: any(o["event"] == "reloaded" and o["path"] == vmd.conf
                                                   and o["id"] == 0 for o in listener.objects()))
    finally:
        for listener in (everything, theirs, once):
            listener.close()


def restarts_and_ends(vmd):
    """A guest that reboots is `restarted` and `running` again; `stop -f`
    ends it `forced`; a VM process killed from outside ends it `killed`;
    a guest that powers itself off ends `powered-off`."""
    listener = Listener(vmd, "ends")
    try:
        vmid, _ = vmd.start("rb1", cmdline=f"{QUIET} vmd.action=reboot-after-1s")
        wait_for("the restart", lambda: [o["event"] for o in listener.objects() if o["id"] == vmid][:4]
                 == ["started", "running", "restarted", "running"])
        expect(vmd.vmctl("stop", "-f", "rb1"), 0, r"rb1", "stop -f")
        listener.wait_event(vmid, "stopped")
        vmid, _ = vmd.start("kill1")
        vm_pid, _ = vmd.vm_pids(vmid)
        vmd.wait_console("kill1", "VMD-GUEST: ready")
        os.kill(vm_pid, signal.SIGKILL)
        listener.wait_event(vmid, "stopped")
        off, _ = vmd.start("off1", cmdline=f"{QUIET} vmd.action=poweroff-after-1s")
        listener.wait_event(off, "stopped")
        ends = [(o["name"], o["event"], o.get("reason", o.get("forced"))) for o in listener.objects()
                if o["event"] in ("stopping", "stopped")]
        want = [("rb1", "stopping", True), ("rb1", "stopped", "forced"), ("kill1", "stopped", "killed"),
                ("off1", "stopped", "powered-off")]
        if ends != want:
            raise Failure(f"the ends seen: {ends}, want {want}")
    finally:
        listener.close()


def listeners(vmd_kw):
    def run():
        user = TestUser("vmdev")
        try:
            vmd = Vmd(f"socket owner :{user.name}\n", dir_mode=0o755, **vmd_kw)
            try:
                two_listeners_see_the_life_in_order(vmd, user)
            finally:
                vmd.stop()
        finally:
            user.remove()
    return run


def slow_listener(vmd):
    """A listener that never reads (stopped) does not hold vmd up: status
    is answered while its events pile up; once it reads again it gets what
    fit, then how many were dropped, then the events after: nothing is lost
    uncounted."""
    listener = Listener(vmd, "slow")
    sent = 0
    try:
        os.kill(listener.proc.pid, signal.SIGSTOP)
        dropping = "does not read its events: dropping them"
        deadline = time.monotonic() + 300
        while dropping not in vmd.log():
            if sent >= 3000 or time.monotonic() > deadline:
                raise Failure(f"no dropping after {sent} reloads: {vmd.log()[-1000:]}")
            expect(vmd.vmctl("reload"), 0, r"^$", "reload")
            sent += 1
        # A few more, dropped too; status is answered meanwhile.
        for _ in range(5):
            expect(vmd.vmctl("reload"), 0, r"^$", "reload")
            sent += 1
        rc, out = vmd.vmctl("status", timeout=30)
        if rc not in (0, 1) or not out.startswith("   ID"):
            raise Failure(f"status while a listener is stuck: {rc} {out!r}")
        os.kill(listener.proc.pid, signal.SIGCONT)
        wait_for("the dropped notice", lambda: any(o["event"] == "dropped" for o in listener.objects()))
        expect(vmd.vmctl("reload"), 0, r"^$", "reload after")
        sent += 1
        wait_for("all events read", lambda: sum(
            1 if o["event"] == "reloaded" else o.get("count", 0) for o in listener.objects()) >= sent)
        objs = listener.objects()
        words = [o["event"] for o in objs]
        dropped = [o for o in objs if o["event"] == "dropped"]
        got = words.count("reloaded")
        if len(dropped) != 1 or got + dropped[0]["count"] != sent or words[-1] != "reloaded" \
                or words.index("dropped") != len(words) - 2:
            raise Failure(f"{sent} reloads: {got} events, notices {dropped}; last words {words[-5:]}")
        print(f"# {sent} reloads: {got} events read, {dropped[0]['count']} dropped", flush=True)
        if not dropped[0]["count"] >= 5:
            raise Failure(f"dropped count {dropped}")
        vmd.check_alive()
    finally:
        listener.close()


def main():
    if not t.prepare():
        return 1
    case("json-status-matches-table", with_vmd(json_status_matches_table, conf_extra=(
        f'vm "jcfg" {{\n disable\n boot "{t.KERNEL}"\n memory 128M\n owner root:root\n}}\n')))
    case("stats-cpu-disk-network-grow", with_vmd(stats_grow, netns=True, conf_extra=(
        f'vm "scfg" {{\n disable\n boot "{t.KERNEL}"\n}}\n')))
    case("stats-of-a-stuck-vm-process-come-without-its-counters", with_vmd(stats_of_a_stuck_vm_process))
    case("two-users-listeners-see-start-pause-unpause-stop", listeners({}))
    case("restarted-forced-killed-powered-off", with_vmd(restarts_and_ends))
    case("slow-listener-told-dropped-status-answered", with_vmd(slow_listener))
    return t.summary()


if __name__ == "__main__":
    sys.exit(main())
