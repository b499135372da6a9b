"""Shared helpers of the regress suites written in Python (regress/vm,
regress/lifecycle, regress/console, regress/boot, regress/privsep,
regress/control): case reporting, waiting, /proc inspection, setup, a test
user of its own; and, for the suites that boot real guests, a vmd of its
own per case and a guest's pty.

Runs as root. The guest is regress/guest's (`build --print`). Each Vmd
has its own temp dir, socket, vm.conf and console log directory, and
stop() kills vmd and every VM process and QEMU it started, even after a
failure.
"""

import os
import pwd
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VMD = os.path.join(ROOT, "target", "debug", "vmd")
VMCTL = os.path.join(ROOT, "target", "debug", "vmctl")
# vmd with the `test-triggers` feature (vmd/src/trigger.rs), built apart so
# target/debug never holds the triggers.
TRIGGER_DIR = os.path.join(ROOT, "target", "test-triggers")
TRIGGER_VMD = os.path.join(TRIGGER_DIR, "debug", "vmd")
GUEST_BUILD = os.environ.get("VMD_GUEST_BUILD", os.path.join(ROOT, "regress", "guest", "build"))
EMPTY_DIR = "/var/lib/vmd/empty"
BOOT_TIMEOUT = 60

passed = 0
failed = 0
# Set by prepare().
KERNEL = INITRD = None


class Failure(Exception):
    pass


class Skip(Exception):
    """A case that cannot run here; it prints `skip NAME: why` and counts
    neither as passed nor as failed."""


def fail(name, why):
    """Counts and prints one failure: `FAIL NAME: why`."""
    global failed
    failed += 1
    print(f"FAIL {name}: {why}")
    sys.stdout.flush()


def case(name, fn):
    """Runs one case and prints `ok NAME` or `FAIL NAME: why`."""
    global passed
    try:
        fn()
    except Skip as e:
        print(f"skip {name}: {e}")
        sys.stdout.flush()
    except Failure as e:
        fail(name, e)
    except Exception as e:  # a broken test is a failure, never a pass
        fail(name, f"{type(e).__name__}: {e}")
    else:
        passed += 1
        print(f"ok {name}")
        sys.stdout.flush()


def summary():
    """Prints the suite's last line; returns the exit status."""
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


def prepare(guest=True):
    """Checks and builds what every case needs: root, the user _vmd, the
    debug vmd and vmctl; with `guest`, also QEMU and the test guest (sets
    KERNEL and INITRD). False (after printing `FAIL setup: why` and the
    summary) when it cannot."""
    global KERNEL, INITRD

    def setup_failed(why):
        fail("setup", why)
        summary()
        return False

    if os.geteuid() != 0:
        return setup_failed("the suite runs as root")
    try:
        pwd.getpwnam("_vmd")
    except KeyError:
        return setup_failed("user _vmd missing: run sh regress/setup --user-only")
    if not (os.path.exists(VMD) and os.path.exists(VMCTL)):
        subprocess.run(["cargo", "build", "-q", "-p", "vmd", "-p", "vmctl"], cwd=ROOT, check=True)
    if not guest:
        return True
    if not shutil.which("qemu-system-x86_64"):
        return setup_failed("qemu-system-x86_64 is missing; run regress/setup")
    p = subprocess.run([GUEST_BUILD, "--print"], capture_output=True, text=True)
    m = re.search(r"KERNEL=(\S+) INITRD=(\S+)", p.stdout)
    if p.returncode != 0 or not m:
        return setup_failed(f"{GUEST_BUILD} failed: {p.stderr.strip()}")
    KERNEL, INITRD = m.group(1), m.group(2)
    return True


def wait_for(what, check, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise Failure(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def status_of(pid):
    """/proc/PID/status as a dict, or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except (FileNotFoundError, ProcessLookupError):
        return None
    if fields.get("State", "").startswith(("Z", "X")):
        return None
    return fields


def children_of(pid):
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = status_of(entry)
            if st and st.get("PPid") == str(pid):
                out.append(int(entry))
    return out


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def in_passwd(uid):
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def kill_pids(pids):
    """SIGKILLs each of `pids` that still runs."""
    for pid in pids:
        if status_of(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def end_vmd(proc, pids=()):
    """Ends a vmd started with Popen (SIGTERM, SIGKILL after 5s), then
    SIGKILLs its children and `pids`, whatever happened."""
    pids = set(pids)
    if proc.poll() is None:
        pids.update(children_of(proc.pid))
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    kill_pids(pids)


class Vmd:
    """A vmd in the foreground with its own dir, socket, config, logs."""

    def __init__(self, conf_extra="", log_size=None, binary=VMD, env=None):
        self.dir = tempfile.mkdtemp(prefix="vmd-regress-")
        self.sock = os.path.join(self.dir, "vmd.sock")
        self.log_path = os.path.join(self.dir, "vmd.log")
        self.console_dir = os.path.join(self.dir, "console")
        size = f" size {log_size}" if log_size else ""
        self.conf = os.path.join(self.dir, "vm.conf")
        with open(self.conf, "w") as f:
            f.write(f'accel tcg\nconsole log "{self.console_dir}"{size}\n{conf_extra}')
        self.tracked = set()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [binary, "-d", "-v", "-f", self.conf, "-s", self.sock],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                env={**os.environ, **(env or {})})
        wait_for("the control socket", lambda: os.path.exists(self.sock) or self.proc.poll() is not None)
        if self.proc.poll() is not None:
            raise Failure(f"vmd exited at startup: {self.log()}")

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def vmctl(self, *args, user=None, timeout=30):
        """Runs vmctl (as `user`, a name, if given): (exit status, output)."""
        kw = {}
        if user:
            pw = pwd.getpwnam(user)
            kw = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        p = subprocess.run([VMCTL, "-s", self.sock, *args], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=timeout, **kw)
        return p.returncode, p.stdout + p.stderr

    def vmctl_background(self, *args):
        """Starts vmctl without waiting for it (a Popen, output on pipes)."""
        return subprocess.Popen([VMCTL, "-s", self.sock, *args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    def start(self, name, *extra, cmdline="console=ttyS0 quiet", memory="256M"):
        """vmctl start with the test guest; returns (id, tty)."""
        return self.start_with(name, "-b", KERNEL, "--initrd", INITRD, "--cmdline", cmdline, "-m", memory, *extra)

    def start_with(self, name, *args, user=None):
        """vmctl start NAME ARGS (as `user`, if given) that must succeed;
        returns (id, tty) and tracks the VM's processes."""
        rc, out = self.vmctl("start", name, *args, user=user)
        m = re.search(r"^vmctl: started vm (\d+) successfully, tty (/dev/pts/\d+)$", out, re.M)
        if rc != 0 or not m:
            raise Failure(f"start {name}: exit {rc}: {out.strip()}\n{self.log()}")
        vmid, tty = int(m.group(1)), m.group(2)
        row = self.status_row(vmid)
        if row and row["PID"] != "-":
            self.track(int(row["PID"]))
        return vmid, tty

    def track(self, vm_pid):
        self.tracked.add(vm_pid)
        for child in children_of(vm_pid):
            self.tracked.add(child)

    def status(self):
        rc, out = self.vmctl("status")
        lines = out.splitlines()
        # Exit 1 with only the header: no VM listed.
        if not lines or not lines[0].split()[:1] == ["ID"] or (rc != 0 and len(lines) > 1):
            raise Failure(f"status: exit {rc}: {out}")
        header = lines[0].split()
        return [dict(zip(header, line.split())) for line in lines[1:]]

    def status_row(self, vmid):
        for row in self.status():
            if row["ID"] == str(vmid):
                return row
        return None

    def state(self, vmid):
        """The VM's STATE column; `gone` when it is not listed."""
        row = self.status_row(vmid)
        return row["STATE"] if row else "gone"

    def vm_pids(self, vmid):
        """(VM process pid, QEMU pid) once QEMU runs."""
        row = self.status_row(vmid)
        if not row or row["PID"] == "-":
            raise Failure(f"vm {vmid} has no PID in status: {row}")
        vm_pid = int(row["PID"])
        qemu = wait_for(f"QEMU of vm {vmid}",
                        lambda: [p for p in children_of(vm_pid) if "qemu-system" in cmdline(p)])
        self.track(vm_pid)
        return vm_pid, qemu[0]

    def console_log(self, name, suffix=""):
        try:
            with open(os.path.join(self.console_dir, f"{name}.console{suffix}"), errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def wait_console(self, name, text, timeout=BOOT_TIMEOUT):
        """Waits until `text` is in the VM's console log."""
        wait_for(f"{text!r} in {name}'s console log", lambda: text in self.console_log(name), timeout)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        # VM processes and QEMUs are in sessions of their own: kill the
        # ones this vmd started by pid.
        kill_pids(self.tracked)
        shutil.rmtree(self.dir, ignore_errors=True)


def build_triggers():
    """Builds vmd with the test-triggers feature into TRIGGER_DIR (on every
    run, so it matches the source)."""
    subprocess.run(["cargo", "build", "-q", "-p", "vmd", "--features", "test-triggers",
                    "--target-dir", TRIGGER_DIR], cwd=ROOT, check=True)


def with_vmd(fn, **kw):
    def run():
        vmd = Vmd(**kw)
        try:
            fn(vmd)
        finally:
            vmd.stop()
    return run


class TestUser:
    """A user (and its group) of its own, removed at the end."""

    def __init__(self, prefix="vmdtest"):
        self.name = f"{prefix}{os.getpid() % 10000}{random.randrange(1000):03d}"
        subprocess.run(["useradd", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        self.name], check=True, capture_output=True)
        pw = pwd.getpwnam(self.name)
        self.uid, self.gid = pw.pw_uid, pw.pw_gid

    def remove(self):
        subprocess.run(["userdel", self.name], capture_output=True)
        subprocess.run(["groupdel", self.name], capture_output=True)


class Pty:
    """Reads a VM's console from its pty."""

    def __init__(self, path):
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
        self.text = ""

    def wait_for(self, regex, timeout=BOOT_TIMEOUT):
        pattern = re.compile(regex, re.M)
        deadline = time.monotonic() + timeout
        while not pattern.search(self.text):
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failure(f"no {regex!r} on the pty within {timeout}s; got {self.text[-500:]!r}")
            r, _, _ = select.select([self.fd], [], [], left)
            if r:
                self.text += os.read(self.fd, 4096).decode(errors="replace").replace("\r", "")
        return pattern.search(self.text)

    def close(self):
        os.close(self.fd)
