"""The nested KVM host ("L1") of regress/nested, for the suites that run
cases inside it: boots regress/nested/build's initramfs under
`qemu-system-x86_64 -accel tcg -cpu max` (TCG emulates AMD's SVM, so L1
loads kvm_amd and has a real /dev/kvm), and runs shell commands in it over
its second serial port (protocol: regress/nested/init).

    l1 = setup()                         # builds, boots, checks; or None
    rc, out = l1.sh("cat /proc/cpuinfo")
    l1.check("...")                      # raises Failure unless exit 0
    l1.console()                         # L1's own console (ttyS0) so far
    case(NAME, in_l1(l1, fn, conf))      # fn(vmd): an L1Vmd of its own
    l1.stop()

Every wait is bounded; when L1 stops answering, every later command
fails at once with the reason.
"""

import base64
import ctypes
import json
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import vmdregress as t
from vmdregress import ROOT, Failure, fail, wait_for

NESTED_DIR = os.path.dirname(os.path.abspath(__file__))
NESTED_BUILD = os.path.join(NESTED_DIR, "build")
# The test guest inside L1 (regress/nested/build puts it there).
GUEST_KERNEL = "/guest/vmlinuz"
GUEST_INITRD = "/guest/initramfs.gz"
GUEST_CMDLINE = "console=ttyS0 quiet"


def guest_vm_conf(name, cmdline=GUEST_CMDLINE, extra="", backend_kvm=False):
    """A disabled vm.conf VM running the test guest (256M; listed when
    stopped), under vmd's own monitor if `backend_kvm`, with `extra`
    vm.conf lines."""
    backend = " backend kvm\n" if backend_kvm else ""
    return (f'vm "{name}" {{\n disable\n boot "{GUEST_KERNEL}"\n initrd "{GUEST_INITRD}"\n'
            f' cmdline "{cmdline}"\n memory 256M\n{backend}{extra}}}\n')


# L2 boots under L1's KVM, which TCG emulates: ~15 s on an idle machine.
L2_BOOT_TIMEOUT = 300
# vmctl commands that wait for a guest (stop -w) get as long.
VMCTL_TIMEOUT = 300
# Modules L1 must have loaded besides kvm (kernel-dependent suites use them).
L1_MODULES = ["tun", "bridge", "veth", "vrf", "vhost_net", "nf_tables"]

# TCG L1 is slow and this machine is shared: generous bounds. A plain
# command (no vmctl, which has its own) answers within seconds even under
# load; one that takes two minutes means L1 itself hangs (TCG running
# nested KVM does, about once in ten suite runs), and nested.py retries
# the case in a new L1 the sooner.
L1_BOOT_TIMEOUT = 300
COMMAND_TIMEOUT = 120
# A wait's checks, half a second apart (see vmdregress.POLL_INTERVAL).
t.POLL_INTERVAL = 0.5


def die_with_parent():
    """In the child before exec: SIGKILL when the suite dies, however it
    dies, so no L1 outlives it."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)


class L1:
    def __init__(self, kernel, initrd, memory="2G", append=""):
        self.dir = tempfile.mkdtemp(prefix="vmd-regress-nested-")
        self.console_path = os.path.join(self.dir, "console.log")
        self.dead = None
        self.seq = 0
        self.buf = b""
        ours, theirs = socket.socketpair()
        self.sock = ours
        argv = [
            "qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", memory, "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", kernel, "-initrd", initrd,
            "-append", f"console=ttyS0 panic=-1 {append}".strip(),
            "-chardev", f"file,id=console,path={self.console_path}", "-serial", "chardev:console",
            "-chardev", f"socket,id=commands,fd={theirs.fileno()}", "-serial", "chardev:commands",
            # QEMU's monitor: what L1's CPU does when L1 stops answering.
            "-monitor", f"unix:{self.dir}/monitor.sock,server=on,wait=off",
        ]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, pass_fds=[theirs.fileno()],
                                     start_new_session=True, preexec_fn=die_with_parent)
        theirs.close()

    @classmethod
    def boot(cls, kernel, initrd, **kw):
        """Boots L1 and waits until it answers; stops it on failure."""
        l1 = cls(kernel, initrd, **kw)
        try:
            l1._read_until(re.compile(rb"^NESTED-L1 ready\r?\n", re.M), L1_BOOT_TIMEOUT, "L1's boot")
        except Failure:
            l1.stop()
            raise
        l1.boot_seconds = time.monotonic() - l1.started
        return l1

    def console(self):
        """What L1 printed on its console (ttyS0) so far."""
        try:
            with open(self.console_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def _gone(self, why):
        self.dead = why
        raise Failure(why)

    def _read_until(self, pattern, timeout, what):
        """Reads the command channel until `pattern` matches; returns the
        match and drops what it covers from the buffer."""
        deadline = time.monotonic() + timeout
        while True:
            m = pattern.search(self.buf)
            if m:
                self.buf = self.buf[m.end():]
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                self._gone(f"L1 gave no answer within {timeout}s for {what}; "
                           f"its console ends: {self.console()[-1500:]}\n"
                           f"its CPU (QEMU's monitor): {self.cpu_state()}")
            r, _, _ = select.select([self.sock], [], [], min(left, 1.0))
            if r:
                data = self.sock.recv(65536)
                if not data:
                    self._gone(f"L1's QEMU closed the command channel during {what}: "
                               f"{self._qemu_output()} console: {self.console()[-1500:]}")
                self.buf += data
            elif self.proc.poll() is not None:
                self._gone(f"L1's QEMU exited ({self.proc.returncode}) during {what}: "
                           f"{self._qemu_output()} console: {self.console()[-1500:]}")

    def hmp(self, command, timeout=10):
        """A command of L1's QEMU monitor: its answer."""
        with socket.socket(socket.AF_UNIX) as mon:
            mon.settimeout(timeout)
            mon.connect(os.path.join(self.dir, "monitor.sock"))
            got = b""
            for send in (None, command):
                if send:
                    mon.sendall(send.encode() + b"\n")
                    got = b""
                while not got.endswith(b"(qemu) "):
                    data = mon.recv(65536)
                    if not data:
                        break
                    got += data
        text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", got.decode(errors="replace"))
        return text.replace("(qemu) ", "").strip()

    def cpu_state(self):
        """L1's vCPU as QEMU sees it: halted or running, its registers and
        the code at RIP (an L1 that does not answer: is it halted with
        interrupts off, in a nested guest, spinning?)."""
        try:
            text = "\n".join(self.hmp(c) for c in ("info cpus", "info registers", "x/6i $pc"))
        except OSError as e:
            return f"(no answer: {e})"
        # Without the FPU and vector registers and the monitor's echo.
        return "\n".join(line for line in text.splitlines()
                         if not re.match(r"(FPR|YMM|XMM|FCW)|.*x/6i", line))

    def _qemu_output(self):
        if self.proc.poll() is None:
            return ""
        return self.proc.stdout.read().decode(errors="replace").strip()

    def sh(self, script, timeout=COMMAND_TIMEOUT):
        """Runs `script` with sh in L1: (exit status, output)."""
        if self.dead:
            raise Failure(f"L1 is gone: {self.dead}")
        self.seq += 1
        line = f"{self.seq} {base64.b64encode(script.encode()).decode()}\n"
        try:
            self.sock.sendall(line.encode())
        except OSError as e:
            self.proc.poll()
            self._gone(f"L1's command channel broke ({e}) before {script[:80]!r}; QEMU "
                       f"{'exited ' + str(self.proc.returncode) if self.proc.returncode is not None else 'runs'}: "
                       f"{self._qemu_output()} console: {self.console()[-1500:]}")
        self._read_until(re.compile(rb"^NESTED-L1 begin %d\r?\n" % self.seq, re.M), timeout,
                         f"command {script[:80]!r}")
        m = self._read_until(re.compile(rb"^NESTED-L1 end %d (\d+)\r?\n" % self.seq, re.M), timeout,
                             f"command {script[:80]!r}")
        # Everything before the end line is the base64 of the output.
        body = m.string[:m.start()]
        out = base64.b64decode(b"".join(body.split())).decode(errors="replace")
        return int(m.group(1)), out

    def check(self, script, timeout=COMMAND_TIMEOUT):
        """sh() that must exit 0; returns the output."""
        rc, out = self.sh(script, timeout)
        if rc != 0:
            raise Failure(f"in L1: {script.strip()!r}: exit {rc}: {out.strip()}")
        return out

    def read(self, path):
        """A file of L1's, or "" if it does not exist."""
        rc, out = self.sh(f"cat {shlex.quote(path)} 2>/dev/null")
        return out if rc == 0 else ""

    def stop(self):
        """Powers L1 off (SIGKILL: nothing in it outlives it)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def tail(text, lines=20):
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def parse_status(text):
    """/proc/PID/status text as a dict, or None if empty or a zombie."""
    fields = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
    if not fields or fields.get("State", "").startswith(("Z", "X")):
        return None
    return fields


class L1Vmd(t.Vmd):
    """vmdregress.Vmd's vmd, inside L1: the same status parsing, starts and
    console waits, with vmctl, files and processes reached through L1."""

    def __init__(self, l1, conf_extra="", before=None):
        self.l1 = l1
        self.dir = l1.check("mktemp -d /tmp/vmd-regress-XXXXXX").strip()
        self.sock = f"{self.dir}/vmd.sock"
        self.log_path = f"{self.dir}/vmd.log"
        self.console_dir = f"{self.dir}/console"
        self.conf = f"{self.dir}/vm.conf"
        self.tracked = set()
        self.names = []
        self.pid = None
        # vmd runs in L1's own network namespace: L1 is the suite's alone.
        self.netns = None
        try:
            # Kept: the cases read the logs of VMs that ended.
            self.write_config(f'console log "{self.console_dir}"\nconsole log keep\n{conf_extra}')
            if before:
                before(self)
            self.launch()
        except Failure:
            self.stop()
            raise

    def launch(self):
        """Starts vmd in L1 and waits until it listens (its log goes on
        after what earlier runs wrote; a killed one's socket file stays)."""
        q = shlex.quote
        offset = len(self.log())
        self.pid = int(self.l1.check(
            f"setsid vmd -d -v -f {q(self.conf)} -s {q(self.sock)} </dev/null >>{q(self.log_path)} 2>&1 &\n"
            "echo $!").strip())
        self.tracked.add(self.pid)
        wait_for("vmd to listen in L1", lambda: "control: listening" in self.log()[offset:] or not self.alive(), 60)
        if not self.alive():
            raise Failure(f"vmd exited at startup: {self.log()[offset:]}")

    def write_config(self, text):
        q = shlex.quote
        self.l1.check(f"printf %s {q(text)} >{q(self.conf)}")

    def read_config(self):
        return self.l1.read(self.conf)

    # --- what vmdregress.Vmd does locally, through L1

    def log(self):
        return self.l1.read(self.log_path)

    def vmctl(self, *args, user=None, timeout=VMCTL_TIMEOUT):
        """vmctl in L1, killed after `timeout` seconds there (a hung vmctl
        fails its case, not the whole L1)."""
        if user:
            raise Failure("L1 has no users to run vmctl as")
        argv = ["timeout", "-s", "KILL", str(timeout), "vmctl", "-s", self.sock, *args]
        rc, out = self.l1.sh(" ".join(shlex.quote(a) for a in argv), timeout + 60)
        if rc == 128 + 9:
            raise Failure(f"vmctl {' '.join(args)} still ran after {timeout}s in L1")
        return rc, out

    def ip(self, *args):
        """iproute2's ip in L1 (regress/nested/build copies it in; by its
        path, as L1's busybox sh would run its own applet for `ip`)."""
        return self.l1.check(" ".join(shlex.quote(a) for a in ["/sbin/ip", *args]))

    def exists(self, path):
        return self.l1.sh(f"test -e {shlex.quote(path)}")[0] == 0

    def ping(self, addr):
        return self.l1.sh(f"ping -c 1 -W 1 {shlex.quote(addr)}")[0] == 0

    def signal(self, pid, sig):
        self.l1.check(f"kill -{signal.Signals(sig).name[3:]} {pid}")

    def alive(self):
        return self.proc_status(self.pid) is not None

    def kill_daemon(self):
        """SIGKILL to vmd's parent alone, as a crash would."""
        self.signal(self.pid, signal.SIGKILL)
        wait_for("vmd to die of its SIGKILL", lambda: not self.alive(), 60)

    def start(self, name, *extra, cmdline=GUEST_CMDLINE, memory="256M"):
        self.names.append(name)
        return self.start_with(name, "-b", GUEST_KERNEL, "--initrd", GUEST_INITRD, "--cmdline", cmdline,
                               "-m", memory, *extra)

    def track(self, vm_pid):
        self.tracked.add(vm_pid)

    def console_log(self, name, suffix=""):
        return self.l1.read(f"{self.console_dir}/{name}.console{suffix}")

    def wait_console(self, name, text, timeout=L2_BOOT_TIMEOUT):
        if name not in self.names:
            self.names.append(name)
        super().wait_console(name, text, timeout)

    def proc_status(self, pid):
        return parse_status(self.l1.read(f"/proc/{pid}/status"))

    def cmdline(self, pid):
        return self.l1.sh(f"tr '\\0' ' ' </proc/{pid}/cmdline")[1].strip()

    def processes(self):
        """{pid: its /proc/PID/status fields Name, State, PPid, Uid} for every
        process in L1 (one grep: a fork per process is slow under TCG)."""
        out = self.l1.sh("grep -hE '^(Name|State|Pid|PPid|Uid):' /proc/[0-9]*/status 2>/dev/null")[1]
        procs = {}
        for record in out.split("Name:\t")[1:]:
            st = parse_status("Name:\t" + record)
            if st and "Pid" in st:
                procs[int(st["Pid"])] = st
        return procs

    def vm_pids(self, vmid):
        """(VM process pid, QEMU pid) once QEMU runs."""
        row = self.status_row(vmid)
        if not row or row["PID"] == "-":
            raise Failure(f"vm {vmid} has no PID in status: {row}")
        vm_pid = int(row["PID"])
        self.track(vm_pid)

        def qemu():
            return [pid for pid, st in self.processes().items()
                    if st.get("PPid") == str(vm_pid) and st.get("Name", "").startswith("qemu-system")]
        found = wait_for(f"QEMU of vm {vmid}", qemu, 60)
        self.track(found[0])
        return vm_pid, found[0]

    def stop(self):
        """SIGTERM to vmd (SIGKILL after 30 s), then SIGKILL to everything it
        started and to any QEMU left in L1; removes its dir. Nothing to do
        once L1 is gone."""
        if self.l1.dead:
            return
        if self.pid is None:
            self.l1.sh(f"rm -rf {shlex.quote(self.dir)}")
            return
        pids = " ".join(str(p) for p in sorted(self.tracked))
        self.l1.sh(f"""
            kill -TERM {self.pid} 2>/dev/null
            i=0
            while kill -0 {self.pid} 2>/dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
            kill -KILL -{self.pid} {pids} $(pidof qemu-system-x86_64) 2>/dev/null
            rm -rf {shlex.quote(self.dir)}
        """, 120)

    def diagnostics(self):
        """The tails of its VMs' consoles and of its log."""
        parts = []
        for name in self.names:
            parts.append(f"--- console of {name}, last lines:\n{tail(self.console_log(name))}")
        parts.append(f"--- vmd.log, last lines:\n{tail(self.log(), 30)}")
        # What a stuck guest's threads do (a vCPU spinning or asleep, the
        # virtio I/O thread), and KVM's own counters twice, 2 s apart:
        # exits and injections that do not move mean no guest progress.
        parts.append("--- VM processes' threads (state, utime, stime, wchan) and KVM's counters:\n" + self.l1.sh(
            "for p in $(grep -l '^vmd: vm ' /proc/[0-9]*/cmdline | cut -d/ -f3); do "
            "echo \"$p $(tr '\\0' ' ' </proc/$p/cmdline)\"; "
            "for t in /proc/$p/task/*; do echo \"  $(cat $t/comm) $(cut -d' ' -f3,14,15 $t/stat) $(cat $t/wchan)\"; done; done; "
            "k=/sys/kernel/debug/kvm; for i in 1 2; do echo \"kvm: $(for s in exits halt_exits halt_wakeup "
            "irq_injections io_exits mmio_exits irq_exits; do printf '%s=%s ' $s $(cat $k/$s 2>/dev/null); done)\"; "
            "[ $i = 1 ] && sleep 2; done")[1])
        return "\n".join(parts)


def in_l1(l1, fn, conf, before=None):
    """A case with its own vmd in L1 (`before(vmd)` runs before vmd starts);
    a failure carries the tails of the VMs' consoles and of vmd's log."""
    def run():
        vmd = L1Vmd(l1, conf, before)
        try:
            fn(vmd)
        except Exception as e:
            why = str(e) if isinstance(e, Failure) else f"{type(e).__name__}: {e}"
            try:
                why += "\n" + vmd.diagnostics()
            except Failure as d:
                why += f"\n(no diagnostics: {d})"
            raise Failure(why) from e
        finally:
            vmd.stop()
    return run


def check_kvm_host(l1):
    """L1 is a KVM host: SVM (or VMX) visible, kvm_amd (or kvm_intel) and
    the other modules loaded, /dev/kvm KVM's device for group kvm."""
    flags = l1.check("grep -m1 '^flags' /proc/cpuinfo").split()
    if "svm" not in flags and "vmx" not in flags:
        raise Failure(f"L1's CPU has neither svm nor vmx: {' '.join(flags)}")
    loaded = l1.check("ls /sys/module").split()
    vendor = [m for m in ("kvm_amd", "kvm_intel") if m in loaded]
    missing = [m for m in ["kvm"] + L1_MODULES if m not in loaded]
    if not vendor or missing:
        raise Failure(f"modules missing in L1: {missing + ([] if vendor else ['kvm_amd|kvm_intel'])}; "
                      f"its console: {tail(l1.console(), 30)}")
    dev = l1.check("stat -c '%F %t:%T %a %G' /dev/kvm").split()
    if dev[-3:] != ["a:e8", "660", "kvm"]:
        raise Failure(f"/dev/kvm in L1 is {dev}; want KVM's device (10:232) 660 group kvm")
    return vendor[0]


def nested_build():
    """L1's kernel and initramfs, built (or cached) by regress/nested/build."""
    p = subprocess.run([NESTED_BUILD, "--print"], capture_output=True, text=True)
    m = re.search(r"KERNEL=(\S+) INITRD=(\S+)", p.stdout)
    if p.returncode != 0 or not m:
        raise Failure(f"{NESTED_BUILD} failed: {p.stderr.strip()}")
    return m.group(1), m.group(2)


UNIT_TESTS = os.path.join(ROOT, "target", "release", "vmd-unit-tests")


def unit_tests_build():
    """vmd's unit tests, built in release mode and copied to UNIT_TESTS
    (their own name has a hash), for L1: its kernel has what this
    machine's lacks."""
    p = subprocess.run(["cargo", "test", "-q", "--release", "-p", "vmd", "--no-run",
                        "--message-format=json"], cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        raise Failure(f"cargo test --release --no-run failed: {tail(p.stderr)}")
    built = []
    for line in p.stdout.splitlines():
        try:
            m = json.loads(line)
        except ValueError:
            continue
        target = m.get("target", {})
        if (m.get("reason") == "compiler-artifact" and m.get("executable")
                and m.get("profile", {}).get("test") and target.get("name") == "vmd"
                and target.get("kind") == ["bin"]):
            built.append(m["executable"])
    if len(built) != 1:
        raise Failure(f"want one unit-test binary of vmd, cargo built {built}")
    tmp = f"{UNIT_TESTS}.tmp"
    shutil.copy2(built[0], tmp)
    os.replace(tmp, UNIT_TESTS)


def setup():
    """What a suite in L1 needs: root, QEMU, the release vmd and vmctl
    (built), L1 built and booted, and a KVM host. The running L1 (stop it
    with l1.stop()), or None after printing `FAIL setup: why`. SIGTERM and
    SIGINT exit through the caller's `finally`."""
    def failed(why):
        fail("setup", why)
        return None

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _: sys.exit(128 + signum))
    if os.geteuid() != 0:
        return failed("the suite runs as root")
    if not os.path.exists("/usr/bin/qemu-system-x86_64"):
        return failed("/usr/bin/qemu-system-x86_64 is missing: run sh regress/setup")
    p = subprocess.run(["cargo", "build", "-q", "--release", "-p", "vmd", "-p", "vmctl"], cwd=ROOT,
                       capture_output=True, text=True)
    if p.returncode != 0:
        return failed(f"cargo build --release failed: {tail(p.stderr)}")
    try:
        unit_tests_build()
        kernel, initrd = nested_build()
    except Failure as e:
        return failed(str(e))
    try:
        l1 = L1.boot(kernel, initrd)
    except Failure as e:
        return failed(f"L1 did not boot: {e}")
    try:
        vendor = check_kvm_host(l1)
    except Failure as e:
        l1.stop()
        return failed(f"L1 is no KVM host, so nothing here can run: {e}")
    print(f"# L1 booted in {l1.boot_seconds:.1f}s; {vendor} loaded, /dev/kvm for group kvm", flush=True)
    return l1
