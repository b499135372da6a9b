"""What regress/bench.d's drivers share: timing, statistics, process
memory, a cleanup stack that runs on any exit (Ctrl-C and SIGTERM
included), and the table `make bench` prints and saves.

A benchmark never fails on a figure: `CannotRun` is raised only when a
measurement cannot be taken, and the driver then says why and exits 1.
"""

import ctypes
import datetime
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REGRESS = os.path.dirname(HERE)
ROOT = os.path.dirname(REGRESS)
RELEASE = os.path.join(ROOT, "target", "release")
VMD = os.path.join(RELEASE, "vmd")
VMCTL = os.path.join(RELEASE, "vmctl")
RESULTS_DIR = os.path.join(ROOT, "target", "bench")
GUEST_BUILD = os.path.join(REGRESS, "guest", "build")
# The test guest's first console line (regress/guest/README.md) and the
# one after which it is fully up.
MARKER = "VMD-GUEST: booted"
READY = "VMD-GUEST: ready"


class CannotRun(Exception):
    """A benchmark that cannot run here (not a slow figure)."""


def log(msg):
    print(f"# {msg}", flush=True)


# --- cleanup on every exit


class Cleanup:
    """Callables run in reverse order at exit, however the driver ends
    (an exception, Ctrl-C, SIGTERM, SIGHUP); a failing one is reported and
    the others still run."""

    def __init__(self):
        self.steps = []
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda signum, _: sys.exit(128 + signum))

    def push(self, what, fn):
        self.steps.append((what, fn))

    def run(self):
        # A second Ctrl-C must not cut the cleanup short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        while self.steps:
            what, fn = self.steps.pop()
            try:
                fn()
            except Exception as e:  # keep cleaning up
                print(f"regress/bench: cleanup ({what}) failed: {type(e).__name__}: {e}", file=sys.stderr)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def die_with_parent():
    """preexec_fn: SIGKILL when the bench dies, however it dies."""
    ctypes.CDLL(None, use_errno=True).prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL


# --- running things


def run(argv, what=None, timeout=120, **kw):
    """Runs argv that must succeed; returns its stdout."""
    try:
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired:
        raise CannotRun(f"{what or argv[0]}: still running after {timeout}s: {' '.join(argv)}")
    if p.returncode != 0:
        raise CannotRun(f"{what or argv[0]}: exit {p.returncode}: {' '.join(argv)}: {(p.stdout + p.stderr).strip()}")
    return p.stdout


_null = None


def spawn_time(argv):
    """Wall time in seconds of one whole process (posix_spawn to exit),
    its output discarded; it must exit 0 (if not, it runs once more to
    say why)."""
    global _null
    if _null is None:
        _null = os.open(os.devnull, os.O_WRONLY)
    t0 = time.perf_counter()
    pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=[(os.POSIX_SPAWN_DUP2, _null, 1),
                                                                   (os.POSIX_SPAWN_DUP2, _null, 2)])
    _, status = os.waitpid(pid, 0)
    elapsed = time.perf_counter() - t0
    if status != 0:
        run(argv)
        raise CannotRun(f"{' '.join(argv)} failed (wait status {status}), then succeeded")
    return elapsed


def which(name):
    for d in os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin").split(":") + ["/usr/sbin", "/sbin"]:
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    return None


def guest_files():
    """(KERNEL, INITRD) of the test guest (regress/guest/build --print)."""
    p = subprocess.run([GUEST_BUILD, "--print"], capture_output=True, text=True)
    m = re.search(r"KERNEL=(\S+) INITRD=(\S+)", p.stdout)
    if p.returncode != 0 or not m:
        raise CannotRun(f"{GUEST_BUILD} failed: {p.stderr.strip()[-800:]}")
    return m.group(1), m.group(2)


# --- processes and their memory


def proc_status(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except (FileNotFoundError, ProcessLookupError):
        return None


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            data = f.read().rstrip(b"\0")
        return [a.decode(errors="replace") for a in data.split(b"\0")] if data else []
    except OSError:
        return []


def children_of(pid):
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = proc_status(entry)
            if st and st.get("PPid") == str(pid):
                out.append(int(entry))
    return out


def alive(pid):
    st = proc_status(pid)
    return bool(st) and not st.get("State", "").startswith(("Z", "X"))


def rss_kib(pid):
    st = proc_status(pid)
    if not st or "VmRSS" not in st:
        raise CannotRun(f"process {pid} is gone (no VmRSS)")
    return int(st["VmRSS"].split()[0])


def pss_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    raise CannotRun(f"process {pid} is gone (no smaps_rollup)")


def wait_for(what, check, timeout, interval=0.05):
    deadline = time.monotonic() + timeout
    while True:
        r = check()
        if r:
            return r
        if time.monotonic() > deadline:
            raise CannotRun(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Console:
    """Watches a growing console file (or any text source) for a marker
    written after the point it was created at."""

    def __init__(self, read):
        self.read = read
        self.offset = len(read())

    def has(self, text):
        data = self.read()
        if len(data) < self.offset:  # rotated or truncated
            self.offset = 0
        return text in data[self.offset:]

    def tail(self, lines=15):
        """The last lines written since the watch began (all if it was
        truncated)."""
        data = self.read()
        data = data[self.offset:] if len(data) >= self.offset else data
        return "\n".join(data.rstrip("\n").splitlines()[-lines:]) or f"(nothing; {len(data)} bytes in all)"


def wait_markers(consoles, text, t0, timeout, procs=(), what="", diagnose=lambda: "", may_exit=False):
    """Polls every console (10 ms) until each shows `text`; returns the
    seconds from t0 at which each did. `procs` (Popen) must not exit,
    except with status 0 if `may_exit`. `what` names the run and
    `diagnose()` adds to a failure."""
    seen = {}
    deadline = time.monotonic() + timeout
    while len(seen) < len(consoles):
        for i, c in enumerate(consoles):
            if i not in seen and c.has(text):
                seen[i] = time.perf_counter() - t0
        if len(seen) == len(consoles):
            break
        for p in procs:
            if p.poll() is not None and not (may_exit and p.returncode == 0):
                raise CannotRun(f"{what}: {' '.join(p.args)} exited ({p.returncode}) before {text!r}: "
                                f"{(p.stdout.read() if p.stdout else '')[-800:]}")
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- console {i}, last lines:\n{c.tail()}"
                              for i, c in enumerate(consoles) if i not in seen)
            raise CannotRun(f"{what}: {len(consoles) - len(seen)} of {len(consoles)} consoles lacked {text!r} "
                            f"after {timeout}s\n{tails}\n{diagnose()}")
        time.sleep(0.01)
    return [seen[i] for i in range(len(consoles))]


def read_file(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


# --- bare QEMU


def bare_argv(vmd_qemu_argv, kernel, initrd, serial, name):
    """The arguments vmd gave QEMU, for a QEMU the bench starts itself: the
    descriptors vmd passes become the files they hold (kernel, initrd; the
    serial port goes to a file), and QMP and -S (vmd's handshake, then
    `cont`) are left out, as a user typing the command would."""
    out = [vmd_qemu_argv[0]]
    args = vmd_qemu_argv[1:]
    i = 0
    while i < len(args):
        a = args[i]
        v = args[i + 1] if i + 1 < len(args) else None
        if a == "-S":
            i += 1
            continue
        if a == "-chardev" and v and "id=qmp" in v.split(","):
            i += 2
            continue
        if a == "-mon" and v and "chardev=qmp" in v.split(","):
            i += 2
            continue
        if a == "-chardev" and v and "id=serial0" in v.split(","):
            out += [a, f"file,id=serial0,path={serial}"]
        elif a == "-name":
            out += [a, name]
        elif a == "-kernel":
            out += [a, kernel]
        elif a == "-initrd":
            out += [a, initrd]
        elif a.startswith("-") and v is not None and not v.startswith("-"):
            out += [a, v]
        else:
            out.append(a)
            i += 1
            continue
        i += 2
    bad = [a for a in out if "fd=" in a or "/proc/self/fd" in a]
    if bad:
        raise CannotRun(f"cannot repeat vmd's QEMU arguments by hand: {bad} (update bare_argv)")
    return out


# --- the table


class Row:
    """One line of the table: our samples, the alternative's, in `unit`.
    `better` is "lower" (times, memory) or "higher" (rates)."""

    def __init__(self, section, what, unit, ours, theirs, better="lower"):
        self.section, self.what, self.unit = section, what, unit
        self.ours, self.theirs, self.better = list(ours), list(theirs), better


def fmt_num(x):
    if x == 0:
        return "0"
    a = abs(x)
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def summary(samples):
    """'median (low-high)' of samples: min-max for up to 10 samples, the
    10th-90th percentiles beyond."""
    if not samples:
        return "-"
    med = statistics.median(samples)
    if len(samples) == 1:
        return fmt_num(med)
    if len(samples) <= 10:
        lo, hi = min(samples), max(samples)
    else:
        q = statistics.quantiles(samples, n=10)
        lo, hi = q[0], q[-1]
    return f"{fmt_num(med)} ({fmt_num(lo)}-{fmt_num(hi)})"


def ratio(row):
    if not row.ours or not row.theirs:
        return "-"
    theirs = statistics.median(row.theirs)
    if theirs == 0:
        return "-"
    return f"{statistics.median(row.ours) / theirs:.2f}"


def render(title, notes, rows):
    """The table as text."""
    header = ("what (vmd | alternative)", "unit", "vmd", "alternative", "ratio", "n")
    lines = []
    body = []
    section = None
    for r in rows:
        if r.section != section:
            section = r.section
            body.append((section,))
        body.append(("  " + r.what, r.unit, summary(r.ours), summary(r.theirs), ratio(r),
                     f"{len(r.ours)}/{len(r.theirs)}"))
    widths = [max(len(c[i]) for c in [header] + [b for b in body if len(b) > 1]) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if i in (0, 1) else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    lines.append(title)
    lines.extend(notes)
    lines.append("")
    lines.append(line(header))
    lines.append("-" * len(line(header)))
    for b in body:
        lines.append(b[0] if len(b) == 1 else line(b))
    return "\n".join(lines) + "\n"


def machine_line():
    try:
        qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                              text=True).stdout.split("\n")[0]
    except OSError:
        qemu = "no qemu-system-x86_64"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()
    return (f"{now}, {platform.node()}, {os.cpu_count()} CPUs, load {load[0]:.1f} at the start, "
            f"{qemu.strip()}")


def save(name, text):
    """Writes the table to target/bench/NAME-DATE.txt; returns the path."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(RESULTS_DIR, f"{name}-{stamp}.txt")
    with open(path, "w") as f:
        f.write(text)
    return path
