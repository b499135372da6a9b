"""The harness of the regress suites written in Python (regress/vm,
regress/lifecycle, regress/console, regress/boot, regress/privsep,
regress/control, regress/guest, regress/tour, regress/net, regress/send): case selection and
reporting, waiting, /proc inspection, setup, a test user of its own, a vmd
of its own per case (Vmd) and a guest's pty.

Each suite runs as `sh regress/SUITE/run [CASE...]`: with names (or shell
patterns) it runs only the cases they match; a name that matches nothing is
a failure. Each case prints `ok NAME (1.2s)`, `FAIL NAME (1.2s): why` or
`skip NAME: why`; the suite ends with `N passed, M failed`.

Waits are for events (a log line, a marker on the console, a process's
end), bounded generously so that a loaded machine only makes them slower;
a window or rate limit a case exercises is vmd's own (its log), or one the
test build sets (VMD_TEST_START_RATE_WINDOW), never how fast a guest boots.

Runs as root. The guest is regress/guest's (`build --print`). Each Vmd
has its own temp dir, socket, vm.conf and console log directory (and,
with netns=True, its own network namespace), and stop() kills vmd and
every VM process and QEMU it started and deletes the namespace, even
after a failure.
"""

import fnmatch
import json
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
# Bounds on waits for events: a TCG guest on a loaded machine is slow, and
# a bound only matters when the event never comes.
BOOT_TIMEOUT = 120
WAIT_TIMEOUT = 30
# Above vmctl's own bound on a start's answer (START_ANSWER_TIMEOUT, 120s),
# so vmctl's message is what a case sees.
VMCTL_TIMEOUT = 150

passed = 0
failed = 0
# The case names or shell patterns given to the suite (all cases when
# none; options such as `--all` are the suite's own), and the names the
# suite has.
SELECTED = [a for a in sys.argv[1:] if not a.startswith("--")]
known_cases = []
# Set by prepare().
KERNEL = INITRD = None


class Failure(Exception):
    pass


class Skip(Exception):
    """A case that cannot run here; it prints `skip NAME: why` and counts
    neither as passed nor as failed."""


def fail(name, why, took=None):
    """Counts and prints one failure: `FAIL NAME (1.2s): why`."""
    global failed
    failed += 1
    when = f" ({took:.1f}s)" if took is not None else ""
    print(f"FAIL {name}{when}: {why}", flush=True)


def selected(*names):
    """Whether any of `names` was asked for (every name is when the suite
    got none); notes them as the suite's."""
    known_cases.extend(n for n in names if n not in known_cases)
    return not SELECTED or any(fnmatch.fnmatchcase(n, p) for n in names for p in SELECTED)


def case(name, fn, always=False):
    """Runs one case, if selected (or `always`), and prints `ok NAME
    (1.2s)` or `FAIL NAME (1.2s): why`; whether it passed."""
    global passed
    if not selected(name) and not always:
        return False
    start = time.monotonic()
    try:
        fn()
    except Skip as e:
        print(f"skip {name}: {e}", flush=True)
    except Failure as e:
        fail(name, e, time.monotonic() - start)
    except Exception as e:  # a broken test is a failure, never a pass
        fail(name, f"{type(e).__name__}: {e}", time.monotonic() - start)
    else:
        passed += 1
        print(f"ok {name} ({time.monotonic() - start:.1f}s)", flush=True)
        return True
    return False


def summary():
    """Prints the suite's last line; returns the exit status. A name given
    on the command line that matched no case is a failure."""
    for pattern in SELECTED:
        # A suite split over files (regress/net) gives a pattern to each:
        # its run script judges one that matched nothing in any.
        if "--patterns-shared" in sys.argv and any(c in pattern for c in "*?["):
            continue
        if not any(fnmatch.fnmatchcase(n, pattern) for n in known_cases):
            fail(pattern, f"no such case; this suite has: {', '.join(known_cases)}")
    print(f"{passed} passed, {failed} failed", flush=True)
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


def expect(rc_out, rc, pattern, what):
    """Checks a vmctl result: exit status `rc` and `pattern` in its output."""
    got_rc, out = rc_out
    if got_rc != rc or not re.search(pattern, out, re.M):
        raise Failure(f"{what}: exit {got_rc}, output {out.strip()!r}; want exit {rc} and /{pattern}/")
    return out


def expect_equal(what, got, want):
    if got != want:
        raise Failure(f"{what}: got {got!r}, want {want!r}")


def ticks(text):
    """The test guest's `VMD-GUEST: tick N` numbers in a console text."""
    return [int(n) for n in re.findall(r"^VMD-GUEST: tick (\d+)\r?$", text, re.M)]


# How often wait_for checks. regress/nested's l1.py sets it higher: each
# check there is a command L1 runs under TCG, and a flood of them keeps
# L1 (and the nested guest under it) busy for nothing.
POLL_INTERVAL = 0.05


def wait_for(what, check, timeout=WAIT_TIMEOUT):
    """Waits until check() is true (returns it); fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise Failure(f"timed out after {timeout}s waiting for {what}")
        time.sleep(POLL_INTERVAL)


def wait_steady(what, get, quiet=1.0, timeout=WAIT_TIMEOUT):
    """Waits until get() returns the same value for `quiet` seconds (what
    was under way has arrived, however slowly); returns that value."""
    deadline = time.monotonic() + timeout
    value, since = get(), time.monotonic()
    while time.monotonic() - since < quiet:
        if time.monotonic() > deadline:
            raise Failure(f"{what} still changed after {timeout}s")
        time.sleep(0.1)
        now = get()
        if now != value:
            value, since = now, time.monotonic()
    return value


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


def start_time(pid):
    """When process `pid` started (field 22 of /proc/PID/stat, in clock
    ticks since boot), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class Processes(set):
    """Pids a case tracks, each with its start time when it was added: pid
    numbers come round again (pid_max is 32768 here), and a pid that ended
    long ago may be another suite's process by the time the case ends."""

    def __init__(self):
        super().__init__()
        self.started = {}

    def add(self, pid):
        self.started.setdefault(pid, start_time(pid))
        super().add(pid)

    def update(self, pids):
        for pid in pids:
            self.add(pid)

    def same(self, pid):
        """Whether `pid` is still the process that was added."""
        return self.started.get(pid) is not None and start_time(pid) == self.started[pid]


def kill_pids(pids):
    """SIGKILLs each of `pids` that still runs (for a Processes, only the
    very processes that were added)."""
    for pid in pids:
        alive = pids.same(pid) if isinstance(pids, Processes) else status_of(pid)
        if alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def end_vmd(proc, pids=()):
    """Ends a vmd started with Popen (SIGTERM, a second SIGTERM after 2s
    that forces its VMs, SIGKILL 5s later), then SIGKILLs its children and
    `pids`, whatever happened."""
    pids = set(pids)
    if proc.poll() is None:
        pids.update(children_of(proc.pid))
        for wait in (2, 5):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                pass
        else:
            proc.kill()
            proc.wait()
    kill_pids(pids)


class Vmd:
    """A vmd in the foreground (-d) with its own temp dir, socket, vm.conf
    and log, listening once constructed; a context manager.

    The vm.conf is `conf` as given, or (the default, for the suites that
    boot guests) `accel tcg`, a console log directory (with `log_size`)
    (kept after their VMs end unless `keep_logs` is false) and
    `conf_extra`. `binary` (VMD or TRIGGER_VMD), `verbose` (-v),
    `env` (added to the environment), `cwd` and `dir_mode` (of the temp
    dir: 0700, or 0755 for users who connect) as a case needs. With
    `netns=True`, vmd runs in a network namespace of its own (`ip netns
    exec vmdreg-PID-N vmd -d ...`, lo up; vmctl still reaches its socket
    in the file system), so its taps and bridges live and die there;
    stop() deletes the namespace. `netns="NAME"` runs it in the caller's
    namespace NAME, which the caller deletes. `before(vmd)` runs before vmd starts (to make
    what should exist before it, e.g. with vmd.ip())."""

    def __init__(self, conf_extra="", *, conf=None, log_size=None, keep_logs=True, binary=VMD,
                 verbose=True, env=None, cwd=None, dir_mode=0o700, netns=False, before=None):
        self.dir = tempfile.mkdtemp(prefix="vmd-regress-")
        os.chmod(self.dir, dir_mode)
        self.sock = os.path.join(self.dir, "vmd.sock")
        self.log_path = os.path.join(self.dir, "vmd.log")
        self.console_dir = os.path.join(self.dir, "console")
        self.conf = os.path.join(self.dir, "vm.conf")
        if conf is None:
            size = f" size {log_size}" if log_size else ""
            # The cases read the logs of VMs that ended: kept unless a
            # case checks their removal (keep_logs=False).
            keep = "console log keep\n" if keep_logs else ""
            conf = f'accel tcg\nconsole log "{self.console_dir}"{size}\n{keep}{conf_extra}'
        self.write_config(conf)
        # Processes to kill at the end: vmd's children and the VMs' (which
        # run in sessions of their own).
        self.tracked = Processes()
        self.proc = None
        self.netns = self.own_netns = None
        self.args = [binary, "-d", *(["-v"] if verbose else []), "-f", self.conf, "-s", self.sock]
        self.popen_kw = {"cwd": cwd, "env": {**os.environ, **(env or {})}}
        try:
            if netns is True:
                self.netns = self.own_netns = netns_add()
            elif netns:
                self.netns = netns
            if before:
                before(self)
            self.launch()
        except BaseException:
            self.stop()
            raise

    def launch(self):
        """Starts vmd (in its network namespace, if it has one) and waits
        until it listens; its log goes on after what earlier runs wrote."""
        args = ["ip", "netns", "exec", self.netns, *self.args] if self.netns else self.args
        with open(self.log_path, "a") as log:
            offset = log.tell()
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True, **self.popen_kw)
        wait_for("vmd to listen", lambda: "control: listening" in self.log()[offset:] or not self.alive())
        if not self.alive():
            raise Failure(f"vmd exited at startup: {self.log()[offset:]}")
        self.tracked.update(children_of(self.proc.pid))

    def restart(self):
        """Starts vmd again, on the same socket, vm.conf, log and network
        namespace, once the last one has ended (killed by the case)."""
        if self.alive():
            raise Failure("restart: vmd still runs")
        self.launch()

    def kill_daemon(self):
        """SIGKILL to vmd's parent alone, as a crash would; its children
        are left to notice."""
        self.tracked.update(children_of(self.proc.pid))
        self.proc.kill()
        self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def write_config(self, text):
        with open(self.conf, "w") as f:
            f.write(text)

    def read_config(self):
        with open(self.conf) as f:
            return f.read()

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def alive(self):
        return self.proc.poll() is None

    def check_alive(self):
        if not self.alive():
            raise Failure(f"vmd died: {self.log()[-2000:]}")

    def child(self, role):
        """The pid of the role's child (control, switch) once its filter
        is in place, or None."""
        for pid in children_of(self.proc.pid):
            st = status_of(pid)
            if st and cmdline(pid) == f"vmd: {role}" and st.get("Seccomp") == "2":
                self.tracked.add(pid)
                return pid
        return None

    def ready(self):
        """Waits for the control and switch children; their pids."""
        return [wait_for(f"the {r} child", lambda r=r: self.child(r)) for r in ("control", "switch")]

    def vmctl_streams(self, *args, user=None, groups=(), gid=None, env=None, cwd="/",
                      timeout=VMCTL_TIMEOUT):
        """Runs vmctl -s SOCK ARGS as root or as `user` (a name or a pwd
        entry) with primary group `gid` (default the user's) and exactly
        the supplementary `groups`: (exit status, stdout, stderr)."""
        kw = {}
        if user is not None:
            pw = pwd.getpwnam(user) if isinstance(user, str) else user
            kw = {"user": pw.pw_uid, "group": pw.pw_gid if gid is None else gid, "extra_groups": list(groups)}
        p = subprocess.run([VMCTL, "-s", self.sock, *args], stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=timeout, env=env, cwd=cwd, **kw)
        return p.returncode, p.stdout, p.stderr

    def vmctl(self, *args, **kw):
        """vmctl_streams, its output in one: (exit status, output)."""
        rc, out, err = self.vmctl_streams(*args, **kw)
        return rc, out + err

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

    def signal(self, pid, sig):
        """Sends `sig` to a process of this vmd's (local here; in L1 for
        regress/nested's L1Vmd)."""
        os.kill(pid, sig)

    def proc_status(self, pid):
        return status_of(pid)

    def ip(self, *args):
        """`ip ARGS` in vmd's network namespace (the machine's own without
        one); its output, or Failure with ip's error."""
        argv = ["ip", *(["-n", self.netns] if self.netns else []), *args]
        p = subprocess.run(argv, capture_output=True, text=True)
        if p.returncode != 0:
            raise Failure(f"{' '.join(argv)}: exit {p.returncode}: {p.stderr.strip()}")
        return p.stdout

    def exists(self, path):
        """Whether `path` exists where vmd runs (here; in L1 for L1Vmd)."""
        return os.path.exists(path)

    def ping(self, addr):
        """Whether `addr` answers one ping (1 s) from vmd's network
        namespace (busybox's ping: Debian has no other by default)."""
        argv = ["ip", "netns", "exec", self.netns] if self.netns else []
        return subprocess.run([*argv, "busybox", "ping", "-c", "1", "-W", "1", addr],
                              capture_output=True).returncode == 0

    def links(self):
        """{name: `ip -j -d link` entry} of every interface in vmd's
        network namespace: `ifalias`, `address`, `master`, `flags`,
        `linkinfo.info_kind` (tun, bridge, veth...)."""
        return {link["ifname"]: link for link in json.loads(self.ip("-j", "-d", "link", "show") or "[]")}

    def end(self):
        """Ends vmd (SIGTERM, a second SIGTERM after 2s that forces its
        VMs, SIGKILL to its process group 10s later) and kills every
        process it started, whatever happened; the network namespace stays
        (a case may look at what vmd left in it)."""
        if self.proc is None:
            return
        if self.alive():
            self.tracked.update(children_of(self.proc.pid))
            # The first SIGTERM powers the guests down, a second forces
            # them: a case's end does not wait for shutdown timeouts.
            for wait in (2, 10):
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        kill_pids(self.tracked)

    def stop(self):
        """end(), then removes the temp dir and the network namespace,
        whatever happened."""
        try:
            self.end()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            if self.own_netns:
                netns_delete(self.own_netns)


def netns_add():
    """A network namespace of the caller's own, `vmdreg-PID-N`, with lo
    up; a stale one of that name (a dead run's pid) is replaced."""
    global netns_count
    netns_count += 1
    name = f"vmdreg-{os.getpid()}-{netns_count}"
    if name in netns_list():
        netns_delete(name)
    for argv in (["ip", "netns", "add", name], ["ip", "-n", name, "link", "set", "lo", "up"]):
        p = subprocess.run(argv, capture_output=True, text=True)
        if p.returncode != 0:
            netns_delete(name)
            raise Failure(f"{' '.join(argv)}: exit {p.returncode}: {p.stderr.strip()}")
    return name


def netns_list():
    """The names of the named network namespaces (`ip netns list`)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_delete(name):
    """Deletes a namespace (its interfaces go with it once no process is
    left in it: Vmd.end() killed them); Failure if it is still listed."""
    subprocess.run(["ip", "netns", "delete", name], capture_output=True)
    if name in netns_list():
        raise Failure(f"network namespace {name} still exists after ip netns delete")


netns_count = 0


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


class Listener:
    """`vmctl [-j] events ARGS` of `vmd` in the background (as `user`, if given),
    its output in a file; started once control logs that it listens."""

    def __init__(self, vmd, name, *args, user=None, json_out=True):
        self.path = os.path.join(vmd.dir, f"events-{name}.out")
        self.out = open(self.path, "w")
        kw = {}
        if user is not None:
            kw = {"user": user.uid, "group": user.gid, "extra_groups": []}
        before = len(re.findall(r"^control: connection \d+ listens for events$", vmd.log(), re.M))
        argv = [VMCTL, "-s", vmd.sock, *(["-j"] if json_out else []), "events", *args]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.out,
                                     stderr=subprocess.STDOUT, **kw)
        wait_for(f"listener {name} to be held by control",
                 lambda: len(re.findall(r"^control: connection \d+ listens for events$", vmd.log(),
                                        re.M)) > before or self.proc.poll() is not None)
        if self.proc.poll() is not None:
            raise Failure(f"vmctl events {args} ended at once: {self.text()!r}")

    def text(self):
        with open(self.path) as f:
            return f.read()

    def objects(self):
        text = self.text()
        try:
            return [json.loads(line) for line in text.splitlines() if line.endswith("}")]
        except ValueError as e:
            raise Failure(f"events: not JSON lines ({e}): {text!r}")

    def wait_event(self, vmid, event):
        return wait_for(f"event {event} of vm {vmid} at the listener",
                        lambda: any(o["id"] == vmid and o["event"] == event for o in self.objects()))

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.proc.kill()
        self.proc.wait()
        self.out.close()


class TestUser:
    """A user (and its group) of its own, removed at the end; with no
    login shell unless given one."""

    def __init__(self, prefix="vmdtest", shell="/usr/sbin/nologin"):
        self.name = f"{prefix}{os.getpid() % 10000}{random.randrange(1000):03d}"
        subprocess.run(["useradd", "--user-group", "--no-create-home", "--shell", shell,
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
