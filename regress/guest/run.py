#!/usr/bin/env python3
"""regress/guest: the test guest boots directly under QEMU (TCG), without vmd.

Builds (or reuses) the cached guest with regress/guest/build, then boots it a
few times and checks: the boot markers and the ticks, the disks and NICs it
lists, DHCP on a user-mode NIC, static addresses and ping between two guests
on a unix stream socket, the ACPI power button (QMP system_powerdown)
powering it off or being ignored, the self-reboot and self-poweroff hooks,
and demo mode's shell with job control. Cases are checks on one boot each;
naming a check (`run CHECK...`) runs its boot's checks. Reports through
regress/lib/vmdregress.py: `ok NAME (1.2s)` / `FAIL NAME (1.2s): why`, then
`N passed, M failed`.
"""

import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

GUEST_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(GUEST_DIR), "lib"))
import vmdregress as t  # noqa: E402
from vmdregress import fail  # noqa: E402

BOOT_TIMEOUT = t.BOOT_TIMEOUT  # seconds to "ready"; about 2 s here under TCG
STEP_TIMEOUT = 60  # seconds for anything after "ready", on a loaded machine too

guests = []
tmpdir = tempfile.mkdtemp(prefix="vmd-regress-guest.")


def cleanup():
    for g in guests:
        g.kill()
    shutil.rmtree(tmpdir, ignore_errors=True)


atexit.register(cleanup)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
signal.signal(signal.SIGINT, lambda *_: sys.exit(1))


CheckFailed = t.Failure


class Guest:
    """One QEMU running the test guest: serial console on its stdin/stdout,
    QMP on a unix socket in tmpdir."""

    count = 0

    def __init__(self, kernel, initrd, append, extra_args=(), no_reboot=True):
        Guest.count += 1
        self.name = f"guest{Guest.count}"
        self.qmp_path = os.path.join(tmpdir, f"{self.name}.qmp")
        argv = [
            "qemu-system-x86_64", "-accel", "tcg", "-nodefaults",
            "-no-user-config", "-nographic", "-serial", "stdio", "-m", "256",
            "-kernel", kernel, "-initrd", initrd,
            "-append", f"console=ttyS0 quiet {append}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]
        if no_reboot:
            argv.append("-no-reboot")
        argv += list(extra_args)
        self.output = ""  # everything the serial port printed
        self.cond = threading.Condition()
        self.events = []  # QMP events, in order
        self.replies = []
        self.qmp = None
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        guests.append(self)
        threading.Thread(target=self._read_serial, daemon=True).start()
        self._qmp_connect()

    def _read_serial(self):
        while True:
            data = self.proc.stdout.read1(4096)
            if not data:
                break
            with self.cond:
                self.output += data.decode(errors="replace").replace("\r", "")
                self.cond.notify_all()

    def _qmp_connect(self):
        deadline = time.monotonic() + 10
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.qmp_path)
                break
            except OSError:
                s.close()
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise CheckFailed("QEMU did not open its QMP socket: "
                                      + self.stderr())
                time.sleep(0.05)
        self.qmp = s
        self.qmp_file = s.makefile("rb")
        threading.Thread(target=self._read_qmp, daemon=True).start()
        self.command("qmp_capabilities")

    def _read_qmp(self):
        for line in self.qmp_file:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            with self.cond:
                if "event" in msg:
                    self.events.append(msg)
                elif "return" in msg or "error" in msg:
                    self.replies.append(msg)
                self.cond.notify_all()

    def command(self, cmd):
        with self.cond:
            self.qmp.sendall(json.dumps({"execute": cmd}).encode() + b"\n")
            if not self.cond.wait_for(lambda: self.replies, STEP_TIMEOUT):
                raise CheckFailed(f"no QMP reply to {cmd}")
            reply = self.replies.pop(0)
        if "error" in reply:
            raise CheckFailed(f"QMP {cmd}: {reply['error']}")
        return reply["return"]

    def wait_for(self, regex, timeout=STEP_TIMEOUT, since=0):
        """The first match of regex in the serial output after offset since,
        waiting up to timeout seconds; raises CheckFailed otherwise."""
        pattern = re.compile(regex, re.M)
        with self.cond:
            m = None

            def found():
                nonlocal m
                m = pattern.search(self.output, since)
                return m is not None

            if not self.cond.wait_for(found, timeout):
                tail = self.output[-300:].replace("\n", " | ")
                raise CheckFailed(f"no /{regex}/ within {timeout}s; "
                                  f"console ends with: {tail}")
            return m

    def wait_event(self, name, timeout=STEP_TIMEOUT):
        with self.cond:
            def find():
                return next((e for e in self.events if e["event"] == name),
                            None)

            if not self.cond.wait_for(find, timeout):
                seen = [e["event"] for e in self.events]
                raise CheckFailed(f"no QMP {name} event within {timeout}s "
                                  f"(saw {seen})")
            return find()

    def wait_exit(self, timeout=STEP_TIMEOUT):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"QEMU still running after {timeout}s") from None

    def send(self, text):
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def stderr(self):
        if self.proc.poll() is None:
            return "(QEMU running)"
        return self.proc.stderr.read().decode(errors="replace").strip()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.qmp:
            self.qmp.close()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except OSError:
                pass


def check(name, fn):
    """Runs one check of a boot the command line selected (the checks
    before it are its steps); a CheckFailed or any error is its FAIL."""
    return t.case(name, fn, always=True)


def expect(cond, why):
    if not cond:
        raise CheckFailed(why)


def raw_image(name, size):
    path = os.path.join(tmpdir, name)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def boot(guest_files, append, extra_args=(), no_reboot=True):
    kernel, initrd, _ = guest_files
    g = Guest(kernel, initrd, append, extra_args, no_reboot)
    try:
        g.wait_for(r"^VMD-GUEST: ready$", BOOT_TIMEOUT)
    except BaseException:
        g.kill()
        raise
    return g


# --- cases ---------------------------------------------------------------


def case_devices(files):
    """Test mode with two virtio disks (one read-only) and a virtio NIC on
    user-mode networking with DHCP, then the power button."""
    kversion = files[2]
    mac = "52:54:00:76:6d:64"
    disk0 = raw_image("disk0.img", 64 << 20)
    disk1 = raw_image("disk1.img", 32 << 20)
    # vdb's first bytes, which the guest shows; the word it writes on vda.
    head, word = "VMDHEAD-ro_1", "VMDWROTE.1"
    with open(disk1, "r+b") as f:
        f.write(head.encode() + b"\1\2")
    g = None
    state = {}

    def booted():
        nonlocal g
        t0 = time.monotonic()
        g = boot(files, f"vmd.net=dhcp vmd.check=devices vmd.diskwrite=vda:{word}", [
            "-drive", f"file={disk0},format=raw,if=virtio",
            "-drive", f"file={disk1},format=raw,if=virtio,readonly=on",
            "-netdev", "user,id=net0",
            "-device", f"virtio-net-pci,netdev=net0,mac={mac}",
        ])
        state["boot_secs"] = time.monotonic() - t0
        for line in ["booted", f"kernel {re.escape(kversion)}", "mode test",
                     r"cmdline console=ttyS0 .*vmd\.check=devices.*",
                     "powerbutton poweroff", "cpus 1", r"memory \d+ kB"]:
            g.wait_for(f"^VMD-GUEST: {line}$", 1)

    def ticks():
        # Seen late (a loaded machine), tick 1 may come just before the
        # next ticks; 5 ticks apart, a second a tick still shows.
        m1 = g.wait_for(r"^VMD-GUEST: tick 1$")
        t1 = time.monotonic()
        g.wait_for(r"^VMD-GUEST: tick 2$", since=m1.end())
        g.wait_for(r"^VMD-GUEST: tick 6$", since=m1.end())
        expect(time.monotonic() - t1 > 2,
               "ticks 1 to 6 came faster than once a second")

    def disks():
        g.wait_for(r"^VMD-GUEST: disks vda vdb$", 1)
        g.wait_for(rf"^VMD-GUEST: disk vda {64 << 20} bytes rw$", 1)
        g.wait_for(rf"^VMD-GUEST: disk vdb {32 << 20} bytes ro$", 1)
        g.wait_for(rf"^VMD-GUEST: wrote vda {re.escape(word)}$", 1)
        g.wait_for(rf"^VMD-GUEST: disk vda head {re.escape(word)}\.{{{32 - len(word)}}}$", 1)
        g.wait_for(rf"^VMD-GUEST: disk vdb head {re.escape(head)}\.{{{32 - len(head)}}}$", 1)

    def nics():
        g.wait_for(r"^VMD-GUEST: nics eth0$", 1)
        g.wait_for(rf"^VMD-GUEST: nic eth0 {mac}$", 1)

    def dhcp():
        g.wait_for(r"^VMD-GUEST: dhcp eth0 10\.0\.2\.15/24 router 10\.0\.2\.2$",
                   1)
        g.wait_for(r"^VMD-GUEST: dhcp eth0 dns 10\.0\.2\.3 hostname none$", 1)

    def powerbutton():
        g.command("system_powerdown")
        g.wait_for(r"^VMD-GUEST: power button, powering off$")
        status = g.wait_exit()
        event = g.wait_event("SHUTDOWN")
        expect(event["data"].get("reason") == "guest-shutdown",
               f"SHUTDOWN reason {event['data']} is not guest-shutdown")
        expect(status == 0, f"QEMU exited with status {status}")
        with open(disk0, "rb") as f:
            start = f.read(len(word) + 1)
        expect(start == word.encode() + b"\0", f"vda starts with {start!r} after the guest wrote {word!r}")

    if not t.selected("boot-markers", "ticks", "disks", "nics", "dhcp", "powerbutton"):
        return
    try:
        if not check("boot-markers", booted):
            for name in ["ticks", "disks", "nics", "dhcp", "powerbutton"]:
                fail(name, "the guest did not boot")
            return
        print(f"# booted to ready in {state['boot_secs']:.1f}s", flush=True)
        check("ticks", ticks)
        check("disks", disks)
        check("nics", nics)
        check("dhcp", dhcp)
        check("powerbutton", powerbutton)
    finally:
        if g:
            g.kill()


def case_ignore(files):
    """vmd.powerbutton=ignore and no devices at all."""
    g = None

    def booted():
        nonlocal g
        g = boot(files, "vmd.powerbutton=ignore")
        g.wait_for(r"^VMD-GUEST: powerbutton ignore$", 1)
        g.wait_for(r"^VMD-GUEST: disks none$", 1)
        g.wait_for(r"^VMD-GUEST: nics none$", 1)

    def ignored():
        g.command("system_powerdown")
        m = g.wait_for(r"^VMD-GUEST: power button, ignored$")
        tick = g.wait_for(r"^VMD-GUEST: tick (\d+)$", since=m.end())
        n = int(tick.group(1))
        g.wait_for(rf"^VMD-GUEST: tick {n + 1}$", since=tick.end())
        expect(g.proc.poll() is None, "QEMU exited")
        expect(not any(e["event"] == "SHUTDOWN" for e in g.events),
               "QEMU reported a SHUTDOWN")

    if not t.selected("no-devices", "powerbutton-ignore"):
        return
    try:
        if check("no-devices", booted):
            check("powerbutton-ignore", ignored)
        else:
            fail("powerbutton-ignore", "the guest did not boot")
    finally:
        if g:
            g.kill()


def case_ping(files):
    """vmd.ip and vmd.ping: two guests joined by a unix stream socket
    (QEMU's `-netdev stream`, no host network), each with a static address
    (eth0 implied, and named), ping each other."""
    sock = os.path.join(tmpdir, "ping.sock")
    a = b = None

    def run():
        nonlocal a, b
        # The server side first: its socket exists before the client connects.
        a = Guest(files[0], files[1], "vmd.ip=10.0.0.1/24 vmd.ping=10.0.0.2", [
            "-netdev", f"stream,id=n0,server=on,addr.type=unix,addr.path={sock}",
            "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:00:00:01"])
        wait_for_file(sock)
        b = Guest(files[0], files[1], "vmd.ip=eth0:10.0.0.2/24 vmd.ping=10.0.0.1", [
            "-netdev", f"stream,id=n0,server=off,addr.type=unix,addr.path={sock}",
            "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:00:00:02"])
        for g, mine, other in ((a, "10.0.0.1", "10.0.0.2"), (b, "10.0.0.2", "10.0.0.1")):
            g.wait_for(rf"^VMD-GUEST: ip eth0 {re.escape(mine)}/24$", BOOT_TIMEOUT)
            g.wait_for(rf"^VMD-GUEST: ping {re.escape(other)} ok$", BOOT_TIMEOUT)

    if not t.selected("static-ip-ping"):
        return
    try:
        check("static-ip-ping", run)
    finally:
        for g in (a, b):
            if g:
                g.kill()


def wait_for_file(path, timeout=STEP_TIMEOUT):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise CheckFailed(f"{path} did not appear within {timeout}s")
        time.sleep(0.05)


def case_action(files, action, no_reboot, name):
    """vmd.action=ACTION-after-1s: QEMU reports the guest's own reset or
    power-off."""
    g = None

    def run():
        nonlocal g
        g = boot(files, f"vmd.action={action}-after-1s", no_reboot=no_reboot)
        g.wait_for(rf"^VMD-GUEST: action {action} in 1s$", 1)
        g.wait_for(rf"^VMD-GUEST: action {action} now$")
        if action == "poweroff":
            event = g.wait_event("SHUTDOWN")
            expect(event["data"].get("reason") == "guest-shutdown",
                   f"SHUTDOWN {event['data']}, not guest-shutdown")
            expect(g.wait_exit() == 0, "QEMU exit status not 0")
        elif no_reboot:
            event = g.wait_event("SHUTDOWN")
            expect(event["data"].get("reason") == "guest-reset",
                   f"SHUTDOWN {event['data']}, not guest-reset")
            expect(g.wait_exit() == 0, "QEMU exit status not 0")
        else:
            event = g.wait_event("RESET")
            expect(event["data"].get("reason") == "guest-reset",
                   f"RESET {event['data']}, not guest-reset")
            m = g.wait_for(r"^VMD-GUEST: action reboot now$")
            g.wait_for(r"^VMD-GUEST: booted$", BOOT_TIMEOUT, since=m.end())
            expect(g.proc.poll() is None, "QEMU exited instead of rebooting")

    if not t.selected(name):
        return
    try:
        check(name, run)
    finally:
        if g:
            g.kill()


def case_demo(files):
    """Demo mode: a shell on ttyS0 with job control, powered off by the
    power button."""
    g = None

    def shell():
        nonlocal g
        g = boot(files, "vmd.mode=demo")
        m = g.wait_for(r"Welcome to vmd's test guest")
        # ash may follow its prompt with a cursor position query.
        m = g.wait_for(r"vmd-guest:/# (\x1b\[6n)?$", since=m.end())
        g.send("echo sum=$((6 * 7))\r")
        m = g.wait_for(r"^sum=42$", since=m.end())
        # Ctrl-C must interrupt the foreground job, or "after" waits 600 s.
        # The job prints the marker once it is the terminal's foreground,
        # then becomes sleep.
        g.send("sh -c 'echo sleeping=$((2 * 2)); exec sleep 600'\r")
        m = g.wait_for(r"^sleeping=4$", since=m.end())
        g.send("\x03")
        g.send("echo after=$((1 + 1))\r")
        g.wait_for(r"^after=2$", STEP_TIMEOUT, since=m.end())

    def powerbutton():
        g.command("system_powerdown")
        g.wait_for(r"VMD-GUEST: power button, powering off")
        g.wait_exit()
        g.wait_event("SHUTDOWN")

    if not t.selected("demo-shell", "demo-powerbutton"):
        return
    try:
        if check("demo-shell", shell):
            check("demo-powerbutton", powerbutton)
        else:
            fail("demo-powerbutton", "no demo shell")
    finally:
        if g:
            g.kill()


def build_guest():
    """(kernel, initrd, kernel version) from regress/guest/build."""
    p = subprocess.run([os.path.join(GUEST_DIR, "build"), "--print"],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise CheckFailed(f"build failed: {p.stderr.strip()}")
    fields = dict(f.split("=", 1) for f in p.stdout.split())
    for key in ("KERNEL", "INITRD"):
        path = fields.get(key, "")
        expect(os.path.getsize(path) > 0 if os.path.exists(path) else False,
               f"build printed no usable {key}: {p.stdout!r}")
    return fields["KERNEL"], fields["INITRD"], fields["KVERSION"]


def main():
    start = time.monotonic()
    files = []

    def build():
        if os.geteuid() != 0:
            raise CheckFailed("must run as root (the guest build uses apt-get)")
        if not shutil.which("qemu-system-x86_64"):
            raise CheckFailed("qemu-system-x86_64 is missing: run regress/setup")
        files.extend(build_guest())

    # Every other check needs the guest.
    if check("build", build):
        case_devices(files)
        case_ignore(files)
        case_ping(files)
        case_action(files, "poweroff", True, "action-poweroff")
        case_action(files, "reboot", True, "action-reboot-no-reboot")
        case_action(files, "reboot", False, "action-reboot")
        case_demo(files)
    print(f"# {time.monotonic() - start:.0f}s", flush=True)
    return t.summary()


if __name__ == "__main__":
    sys.exit(main())
