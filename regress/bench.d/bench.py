#!/usr/bin/env python3
"""`make bench`: vmd against what users would pick instead, side by side
in one run (regress/bench.d/README.md says how to read the table).

    regress/bench [--quick] [SECTION...]

Sections: qcow2 control start send (default: all). --quick takes one or two
runs per figure (for developing the bench, not for numbers). As root.

Everything that could touch the host's network runs in a network
namespace of its own: vmd, libvirtd and libvirt's QEMUs. libvirtd runs
without systemd with its own /etc/libvirt, /var/run/libvirt,
/var/lib/libvirt, /var/log/libvirt and /var/cache/libvirt (bind mounts
of the bench's temp dir, seen only in that namespace), so no network,
domain or cache it makes outlives the run. Domains are undefined,
libvirtd and vmd stopped, the namespace and temp dirs removed at the end,
on failure and on Ctrl-C too.
"""

import os
import pwd
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as c  # noqa: E402
from common import CannotRun, Row, log  # noqa: E402

sys.path.insert(0, os.path.join(c.REGRESS, "lib"))
import vmdregress  # noqa: E402

SECTIONS = ["qcow2", "control", "start", "send"]
# VMs defined on each side (vm.conf and libvirt); the "at once" rounds
# start all of them.
DEFINED = 10
MEMORY_MIB = 256
CMDLINE = "console=ttyS0 quiet"
BOOT_TIMEOUT = 300


class Plan:
    """How many runs each figure takes."""

    def __init__(self, quick):
        self.status_runs = 20 if quick else 200
        self.rss_samples = 3 if quick else 5
        self.clients = 8
        self.per_client = 5 if quick else 25
        self.rate_rounds = 1 if quick else 5
        self.single_pairs = 1 if quick else 7
        self.ten_rounds = 1 if quick else 4
        self.qcow2_runs = 1 if quick else 5
        self.send_runs = 1 if quick else 3


# --- the network namespace


class Netns:
    def __init__(self, cleanup):
        self.name = f"vmdbench{os.getpid()}"
        c.run(["ip", "netns", "add", self.name], "ip netns add")
        cleanup.push(f"ip netns del {self.name}", self.delete)

    def delete(self):
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)

    def argv(self, argv):
        return ["ip", "netns", "exec", self.name, *argv]


def host_links():
    return set(re.findall(r"^\d+: ([^:@]+)", c.run(["ip", "-o", "link", "show"]), re.M))


# --- vmd


class OurVmd:
    """The release vmd in the namespace with DEFINED disabled VMs, through
    vmdregress.Vmd (its constructor, .sock, .stop(), .log(),
    .console_log())."""

    def __init__(self, work, netns, kernel, initrd, cleanup):
        self.names = [f"b{os.getpid()}v{i}" for i in range(DEFINED)]
        conf = "".join(
            f'vm "{n}" {{\n  disable\n  memory {MEMORY_MIB}M\n  boot "{kernel}"\n'
            f'  initrd "{initrd}"\n  cmdline "{CMDLINE}"\n}}\n' for n in self.names)
        pidfile = os.path.join(work, "vmd.pid")
        # vmd in the namespace: `ip netns exec` execs it, so the pid the
        # wrapper writes is vmd's parent's.
        self.wrapper = os.path.join(work, "vmd-in-netns")
        with open(self.wrapper, "w") as f:
            f.write(f'#!/bin/sh\necho $$ >{pidfile}\nexec {" ".join(netns.argv([c.VMD]))} "$@"\n')
        os.chmod(self.wrapper, 0o755)
        try:
            self.vmd = vmdregress.Vmd(conf_extra=conf, binary=self.wrapper)
        except vmdregress.Failure as e:
            raise CannotRun(f"vmd did not start: {e}")
        cleanup.push("stop vmd", self.stop)
        self.sock = self.vmd.sock
        self.pid = int(c.read_file(pidfile).strip() or 0)
        c.wait_for("vmd's control and switch processes", lambda: len(self.daemon_pids()) == 3, 30)

    def vmctl_argv(self, *args):
        return [c.VMCTL, "-s", self.sock, *args]

    def vmctl(self, *args, timeout=120):
        return c.run(self.vmctl_argv(*args), "vmctl " + " ".join(args), timeout)

    def status(self):
        """{name: VM process pid or None} from vmctl status."""
        p = subprocess.run(self.vmctl_argv("status"), capture_output=True, text=True, timeout=60)
        lines = p.stdout.splitlines()
        if not lines or lines[0].split()[:1] != ["ID"]:
            raise CannotRun(f"vmctl status: exit {p.returncode}: {p.stdout}{p.stderr}")
        header = lines[0].split()
        rows = [dict(zip(header, line.split())) for line in lines[1:]]
        return {r["NAME"]: (int(r["PID"]) if r["PID"] != "-" else None) for r in rows}

    def daemon_pids(self):
        """vmd's parent, control and switch processes."""
        if not c.alive(self.pid):
            raise CannotRun(f"vmd ({self.pid}) is gone: {self.vmd.log()[-1500:]}")
        kids = [p for p in c.children_of(self.pid)
                if (c.cmdline(p)[:1] or [""])[0].startswith(("vmd: control", "vmd: switch"))]
        return [self.pid] + kids

    def daemon_rss(self):
        return sum(c.rss_kib(p) for p in self.daemon_pids())

    def daemon_pss(self):
        return sum(c.pss_kib(p) for p in self.daemon_pids())

    def vm_and_qemu(self, name):
        pid = self.status().get(name)
        if not pid:
            raise CannotRun(f"vm {name} has no VM process in vmctl status")
        qemu = c.wait_for(f"QEMU of {name}", lambda: [q for q in c.children_of(pid)
                                                    if "qemu-system" in " ".join(c.cmdline(q))], 30)
        return pid, qemu[0]

    def console(self, name):
        return c.Console(lambda: self.vmd.console_log(name))

    def diagnose(self):
        """vmctl status and the tail of vmd's log, for a failure."""
        try:
            status = subprocess.run(self.vmctl_argv("status"), capture_output=True, text=True, timeout=30).stdout
        except subprocess.TimeoutExpired:
            status = "(vmctl status hung)"
        return f"--- vmctl status:\n{status}--- vmd's log, last lines:\n" + "\n".join(
            self.vmd.log().splitlines()[-30:])

    def stop_all(self):
        """Forces every VM off and waits until their processes are gone."""
        pids = [p for p in self.status().values() if p]
        if pids:
            self.vmctl("stop", "-a", "-f", "-w")
            c.wait_for("the VM processes to exit", lambda: not any(c.alive(p) for p in pids), 60)

    def stop(self):
        pids = []
        try:
            pids = [p for p in self.status().values() if p]
            for p in pids:
                pids += c.children_of(p)
        except Exception:
            pass
        self.vmd.stop()
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


# --- libvirt


class Libvirt:
    """libvirtd (system mode, no systemd) in the namespace, with its own
    state dirs and DEFINED TCG domains of the test guest."""

    STATE = {"etc": "/etc/libvirt", "run": "/var/run/libvirt", "lib": "/var/lib/libvirt",
             "log": "/var/log/libvirt", "cache": "/var/cache/libvirt"}

    def __init__(self, work, netns, kernel, initrd, cleanup):
        self.dir = os.path.join(work, "libvirt")
        self.names = [f"b{os.getpid()}d{i}" for i in range(DEFINED)]
        self.consoles = os.path.join(self.dir, "console")
        os.makedirs(self.consoles)
        os.chmod(self.dir, 0o755)
        binds = []
        for sub, target in self.STATE.items():
            os.makedirs(os.path.join(self.dir, sub))
            # The mount points exist on the host (empty) only so the bind
            # mounts in the namespace have somewhere to go.
            os.makedirs(target, exist_ok=True)
            binds.append((os.path.join(self.dir, sub), target))
        # Debian's libvirt-daemon-system puts libvirt-qemu in group kvm for
        # /dev/kvm. Without access to it, libvirt deems its cached QEMU
        # capabilities stale at every define and probes QEMU again (~40 s
        # here). The domains run under TCG all the same (type 'qemu').
        kvm = os.path.join(self.dir, "kvm")
        if os.path.exists("/dev/kvm"):
            st = os.stat("/dev/kvm")
            os.mknod(kvm, 0o660 | 0o020000, st.st_rdev)
            shutil.chown(kvm, "root", "libvirt-qemu")
            os.chmod(kvm, 0o660)
            binds.append((kvm, "/dev/kvm"))
        # The guest's files, copied: libvirt relabels (chowns) what its
        # domains use.
        self.kernel = shutil.copy(kernel, os.path.join(self.dir, "vmlinuz"))
        self.initrd = shutil.copy(initrd, os.path.join(self.dir, "initrd"))
        with open(os.path.join(self.dir, "etc", "qemu.conf"), "w") as f:
            # Console files written by libvirtd itself, not by virtlogd
            # (which systemd would start).
            f.write('stdio_handler = "file"\n')
        self.conf = os.path.join(self.dir, "libvirtd.conf")
        with open(self.conf, "w") as f:
            f.write('log_outputs = "3:stderr"\n')
        self.sock = os.path.join(self.dir, "run", "libvirt-sock")
        script = " && ".join(f"mount --bind {src} {dst}" for src, dst in binds)
        script += f" && exec {c.which('libvirtd')} -f {self.conf}"
        self.log_path = os.path.join(self.dir, "libvirtd.log")
        with open(self.log_path, "w") as logf:
            self.proc = subprocess.Popen(netns.argv(["sh", "-c", script]), stdin=subprocess.DEVNULL,
                                         stdout=logf, stderr=logf, start_new_session=True,
                                         preexec_fn=c.die_with_parent)
        cleanup.push("stop libvirtd", self.stop)
        c.wait_for("libvirtd's socket", lambda: os.path.exists(self.sock) or self.proc.poll() is not None, 60)
        if self.proc.poll() is not None:
            raise CannotRun(f"libvirtd exited ({self.proc.returncode}): {c.read_file(self.log_path)[-1500:]}")
        c.wait_for("libvirtd to exec", lambda: (c.proc_status(self.proc.pid) or {}).get("Name") == "libvirtd", 30)
        self.pid = self.proc.pid
        self.virsh("version")
        self.defined = []
        t0 = time.monotonic()
        for name in self.names:
            xml = os.path.join(self.dir, f"{name}.xml")
            with open(xml, "w") as f:
                f.write(self.domain_xml(name))
            self.virsh("define", xml, timeout=300)
            self.defined.append(name)
        self.define_seconds = time.monotonic() - t0

    def domain_xml(self, name):
        return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{MEMORY_MIB}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{self.kernel}</kernel><initrd>{self.initrd}</initrd><cmdline>{CMDLINE}</cmdline></os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='file'><source path='{self.console_path(name)}'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""

    def console_path(self, name):
        return os.path.join(self.consoles, f"{name}.log")

    def console(self, name):
        return c.Console(lambda: c.read_file(self.console_path(name)))

    def virsh_argv(self, *args):
        return [c.which("virsh"), "-c", f"qemu:///system?socket={self.sock}", *args]

    def virsh(self, *args, timeout=120):
        return c.run(self.virsh_argv(*args), "virsh " + " ".join(args), timeout)

    def rss(self):
        if not c.alive(self.pid):
            raise CannotRun(f"libvirtd is gone: {c.read_file(self.log_path)[-1500:]}")
        return c.rss_kib(self.pid)

    def pss(self):
        self.rss()
        return c.pss_kib(self.pid)

    def qemu_pids(self):
        """The running domains' QEMUs (libvirt's NAME.pid files)."""
        pids = []
        for name in self.names:
            try:
                pids.append(int(c.read_file(os.path.join(self.dir, "run", "qemu", f"{name}.pid")).strip()))
            except ValueError:
                pass
        return [p for p in pids if c.alive(p)]

    def virsh_each(self, verb, names):
        """`virsh VERB NAME` for each of names at once, errors ignored (a
        domain that is not running cannot be destroyed)."""
        procs = [subprocess.Popen(self.virsh_argv(verb, n), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL) for n in names]
        for p in procs:
            try:
                p.wait(120)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def destroy_all(self):
        self.virsh_each("destroy", self.names)
        c.wait_for("libvirt's QEMUs to exit", lambda: not self.qemu_pids(), 60)

    def stop(self):
        leftover = []
        if self.proc.poll() is None:
            leftover = self.qemu_pids()
            self.virsh_each("destroy", self.defined)
            self.virsh_each("undefine", self.defined)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for p in leftover:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


# --- bare QEMU


class BareQemus:
    def __init__(self, work, cleanup):
        self.dir = os.path.join(work, "bare")
        os.makedirs(self.dir)
        self.procs = []
        self.n = 0
        cleanup.push("kill the bare QEMUs", self.kill_all)

    def start(self, argv_for):
        """Starts one QEMU with argv_for(serial path, name); returns
        (Popen, Console)."""
        self.n += 1
        name = f"b{os.getpid()}q{self.n}"
        serial = os.path.join(self.dir, f"{name}.serial")
        p = subprocess.Popen(argv_for(serial, name), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, preexec_fn=c.die_with_parent)
        self.procs.append(p)
        return p, c.Console(lambda: c.read_file(serial))

    def kill_all(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        self.procs = []


# --- the sections


def section_qcow2(plan, work):
    """vmctl create against qemu-img on the same input."""
    d = os.path.join(work, "qcow2")
    os.makedirs(d)
    src = os.path.join(d, "in.img")
    # 1 GiB raw, half of it data in 1 MiB pieces, half holes.
    with open(src, "wb") as f:
        f.truncate(1 << 30)
        for i in range(512):
            f.seek(2 * i << 20)
            f.write(os.urandom(1 << 20))
        os.fsync(f.fileno())
    qemu_img = c.which("qemu-img")
    if not qemu_img:
        raise CannotRun("qemu-img missing: run sh regress/setup")
    p = lambda name: os.path.join(d, name)  # noqa: E731
    cases = [
        ("raw -> qcow2, 512 MiB of data in 1 GiB",
         lambda: [c.VMCTL, "create", p("v.qcow2"), "-i", src],
         lambda: [qemu_img, "convert", "-t", "writeback", "-O", "qcow2", src, p("q.qcow2")], ["v.qcow2", "q.qcow2"]),
        ("qcow2 -> raw, the same data",
         lambda: [c.VMCTL, "create", p("v.img"), "-i", p("q-in.qcow2")],
         lambda: [qemu_img, "convert", "-t", "writeback", "-O", "raw", p("q-in.qcow2"), p("q.img")], ["v.img", "q.img"]),
        ("empty 4.5G qcow2 | qemu-img create",
         lambda: [c.VMCTL, "create", p("e.qcow2"), "-s", "4.5G"],
         lambda: [qemu_img, "create", "-q", "-f", "qcow2", p("qe.qcow2"), "4.5G"], ["e.qcow2", "qe.qcow2"]),
        ("overlay on a qcow2 base | qemu-img create -b",
         lambda: [c.VMCTL, "create", p("o.qcow2"), "-b", p("q-in.qcow2")],
         lambda: [qemu_img, "create", "-q", "-f", "qcow2", "-b", p("q-in.qcow2"), "-F", "qcow2", p("qo.qcow2")],
         ["o.qcow2", "qo.qcow2"]),
    ]
    # One qcow2 input for both sides of the second case, written by
    # qemu-img (the reference).
    c.run([qemu_img, "convert", "-O", "qcow2", src, p("q-in.qcow2")], "qemu-img convert")
    rows = []
    for what, ours_argv, theirs_argv, outputs in cases:
        ours, theirs = [], []
        for _ in range(plan.qcow2_runs):
            for side, argv, output in ((ours, ours_argv, outputs[0]), (theirs, theirs_argv, outputs[1])):
                if os.path.exists(p(output)):
                    os.unlink(p(output))
                c.run(["sync"])
                side.append(c.spawn_time(argv()) * 1000)
        rows.append(Row("4 qcow2: vmctl create | qemu-img (both flush to disk: convert -t writeback)",
                        f"{what}" + ("" if "|" in what else " | qemu-img convert"), "ms", ours, theirs))
    # Our outputs must hold the data (qemu-img is the judge): a wrong
    # result is not a figure.
    c.run([qemu_img, "compare", "-q", src, p("v.qcow2")], "qemu-img compare (vmctl's raw -> qcow2)")
    c.run([qemu_img, "compare", "-q", src, p("v.img")], "qemu-img compare (vmctl's qcow2 -> raw)")
    shutil.rmtree(d)
    return rows


def section_control(plan, vmd, lv):
    S = f"1 control plane ({DEFINED} VMs defined on each side)"
    rows = []
    ours, theirs, true = [], [], []
    ours_argv, theirs_argv = vmd.vmctl_argv("status"), lv.virsh_argv("list", "--all")
    out = c.run(theirs_argv)
    if sum(n in out for n in lv.names) != DEFINED:
        raise CannotRun(f"virsh list --all lacks the {DEFINED} domains: {out}")
    if len([n for n in vmd.status() if n in vmd.names]) != DEFINED:
        raise CannotRun(f"vmctl status lacks the {DEFINED} VMs")
    for _ in range(plan.status_runs):
        ours.append(c.spawn_time(ours_argv) * 1000)
        theirs.append(c.spawn_time(theirs_argv) * 1000)
        true.append(c.spawn_time(["/bin/true"]) * 1000)
    rows.append(Row(S, "vmctl status | virsh list --all, whole process", "ms", ours, theirs))
    base = statistics.median(true)

    ours, theirs, ours_pss, theirs_pss = [], [], [], []
    for _ in range(plan.rss_samples):
        ours.append(vmd.daemon_rss() / 1024)
        theirs.append(lv.rss() / 1024)
        ours_pss.append(vmd.daemon_pss() / 1024)
        theirs_pss.append(lv.pss() / 1024)
        time.sleep(0.2)
    rows.append(Row(S, "daemon RSS, idle: parent+control+switch | libvirtd", "MiB", ours, theirs))
    # RSS counts the pages vmd's three processes share three times.
    rows.append(Row(S, "daemon PSS, idle: parent+control+switch | libvirtd", "MiB", ours_pss, theirs_pss))

    def rate(argv):
        errors = []

        def client():
            try:
                for _ in range(plan.per_client):
                    c.spawn_time(argv)
            except Exception as e:
                errors.append(e)
        threads = [threading.Thread(target=client) for _ in range(plan.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        if errors:
            raise CannotRun(f"a concurrent client failed: {errors[0]}")
        return plan.clients * plan.per_client / wall

    ours, theirs = [], []
    for _ in range(plan.rate_rounds):
        ours.append(rate(ours_argv))
        theirs.append(rate(theirs_argv))
    rows.append(Row(S, f"requests/s, {plan.clients} concurrent clients: status | list --all", "req/s",
                    ours, theirs, better="higher"))
    return rows, base


class Side:
    """One way of starting guests, for the start rows: `start(names)`
    returns (processes, consoles), the consoles watched from before the
    start; `stop()` ends every guest it started."""

    def __init__(self, label, start, stop, may_exit, diagnose=lambda: ""):
        self.label, self.start, self.stop = label, start, stop
        self.may_exit, self.diagnose = may_exit, diagnose

    def time_to(self, names, what):
        """Seconds from the start of `names` until every guest printed
        its first console line (the processes and consoles returned too)."""
        t0 = time.perf_counter()
        procs, consoles = self.start(names)
        times = c.wait_markers(consoles, c.MARKER, t0, BOOT_TIMEOUT, procs, f"{self.label}, {what}",
                               self.diagnose, self.may_exit)
        for p in procs if self.may_exit else ():
            if p.wait(120) != 0:
                raise CannotRun(f"{' '.join(p.args)}: exit {p.returncode}: {p.stdout.read().strip()}")
        return max(times), consoles


def spawn_each(argv_of, names):
    return [subprocess.Popen(argv_of(n), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for n in names]


def section_start(plan, vmd, lv, work, kernel, initrd, cleanup):
    """Start to the first console line: vmd against bare QEMU (with vmd's
    own QEMU arguments) and against libvirt, one VM and DEFINED at once,
    the sides alternating; while DEFINED guests are up, the VM process
    beside its QEMU and the daemons' growth."""
    bare = BareQemus(work, cleanup)
    template = []

    def vmd_start(names):
        consoles = [vmd.console(n) for n in names]
        return spawn_each(lambda n: vmd.vmctl_argv("start", n), names), consoles

    def bare_start(names):
        started = [bare.start(lambda serial, qname: c.bare_argv(template, kernel, initrd, serial, qname))
                   for _ in names]
        return [p for p, _ in started], [con for _, con in started]

    def libvirt_start(names):
        consoles = [lv.console(n) for n in names]
        return spawn_each(lambda n: lv.virsh_argv("start", n), names), consoles

    ours = Side("vmctl start", vmd_start, vmd.stop_all, True, vmd.diagnose)
    sides = [Side("bare QEMU", bare_start, bare.kill_all, False),
             Side("virsh start", libvirt_start, lv.destroy_all, True,
                  lambda: "--- libvirtd's log:\n" + c.read_file(lv.log_path)[-1500:])]

    S2 = "2 start to guest (TCG; to the guest's first console line)"
    one = {s.label: [] for s in [ours] + sides}
    for i in range(plan.single_pairs):
        # A different VM each time: vmd refuses a third start of one VM
        # within 6 s of the previous (its start rate limit).
        t, _ = ours.time_to([vmd.names[i % DEFINED]], f"one VM, run {i + 1}")
        one[ours.label].append(t)
        if not template:
            _, qemu = vmd.vm_and_qemu(vmd.names[i % DEFINED])
            template[:] = c.cmdline(qemu)
            log("vmd's QEMU: " + " ".join(template))
            log("bare QEMU:  " + " ".join(c.bare_argv(template, kernel, initrd, "SERIAL", "NAME")))
        ours.stop()
        for side in sides:
            t, _ = side.time_to([lv.names[i % DEFINED]], f"one VM, run {i + 1}")
            one[side.label].append(t)
            side.stop()

    ten = {s.label: [] for s in [ours] + sides}
    vm_rss, vm_pss, qemu_rss, qemu_pss, vm_total_rss, vm_total_pss = [], [], [], [], [], []
    lv_qemu_rss, lv_qemu_pss, vmd_growth, lv_growth = [], [], [], []
    for i in range(plan.ten_rounds):
        idle = vmd.daemon_rss()
        t, consoles = ours.time_to(vmd.names, f"{DEFINED} VMs, round {i + 1}")
        ten[ours.label].append(t)
        c.wait_markers(consoles, c.READY, 0, BOOT_TIMEOUT, what=f"{DEFINED} vmd guests up, round {i + 1}",
                       diagnose=vmd.diagnose)
        vmd_growth.append((vmd.daemon_rss() - idle) / DEFINED)
        for n in vmd.names:
            vm, qemu = vmd.vm_and_qemu(n)
            vm_rss.append(c.rss_kib(vm) / 1024)
            vm_pss.append(c.pss_kib(vm) / 1024)
            qemu_rss.append(c.rss_kib(qemu) / 1024)
            qemu_pss.append(c.pss_kib(qemu) / 1024)
            vm_total_rss.append(vm_rss[-1] + qemu_rss[-1])
            vm_total_pss.append(vm_pss[-1] + qemu_pss[-1])
        ours.stop()
        for side in sides:
            idle = lv.rss()
            t, consoles = side.time_to(lv.names if side.label == "virsh start" else vmd.names,
                                       f"{DEFINED} VMs, round {i + 1}")
            ten[side.label].append(t)
            if side.label == "virsh start":
                c.wait_markers(consoles, c.READY, 0, BOOT_TIMEOUT, what=f"{DEFINED} libvirt guests up, round {i + 1}",
                               diagnose=side.diagnose)
                lv_growth.append((lv.rss() - idle) / DEFINED)
                for q in lv.qemu_pids():
                    lv_qemu_rss.append(c.rss_kib(q) / 1024)
                    lv_qemu_pss.append(c.pss_kib(q) / 1024)
            side.stop()

    rows = []
    for side, alt in zip(sides, ["qemu-system-x86_64", "virsh start"]):
        rows.append(Row(S2, f"one VM: vmctl start | {alt}", "s", one[ours.label], one[side.label]))
    for side, alt in zip(sides, [f"{DEFINED} bare QEMUs", f"{DEFINED} virsh start"]):
        rows.append(Row(S2, f"{DEFINED} at once, until all booted: vmctl start | {alt}", "s",
                        ten[ours.label], ten[side.label]))
    S3 = f"3 overhead per VM ({DEFINED} guests up)"
    rows.append(Row(S3, "VM process RSS | its QEMU's RSS", "MiB", vm_rss, qemu_rss))
    rows.append(Row(S3, "VM process PSS | its QEMU's PSS", "MiB", vm_pss, qemu_pss))
    rows.append(Row(S3, "per guest RSS: VM process + QEMU | libvirt's QEMU", "MiB", vm_total_rss, lv_qemu_rss))
    rows.append(Row(S3, "per guest PSS: VM process + QEMU | libvirt's QEMU", "MiB", vm_total_pss, lv_qemu_pss))
    rows.append(Row(S3, "daemon RSS growth per running guest: vmd | libvirtd", "KiB", vmd_growth, lv_growth))
    return rows


SEND = "6 send/receive (TCG, 256 MiB guest): vmctl | cat (a file, or a pipe, of the same size)"
# Random data in the guest's memory for the second kind of guest (MiB).
FILL_MIB = 160


def send_guest(vmd, name, kernel, initrd, extra=""):
    """A test guest started with vmctl that has ticked twice."""
    vmd.vmctl("start", name, "-b", kernel, "--initrd", initrd, "--cmdline", CMDLINE + extra,
              "-m", f"{MEMORY_MIB}M")
    console = vmd.console(name)
    c.wait_for(f"{name} to tick", lambda: console.has("VMD-GUEST: tick 2"), BOOT_TIMEOUT)


def timed(shell, what):
    """Seconds a shell command line takes; it must succeed."""
    t0 = time.monotonic()
    p = subprocess.run(["bash", "-c", f"set -o pipefail; {shell}"], capture_output=True, text=True,
                       timeout=BOOT_TIMEOUT)
    if p.returncode != 0:
        raise CannotRun(f"{what}: exit {p.returncode}: {p.stderr.strip()}")
    return time.monotonic() - t0


def last_tick_time(read, stop):
    """Polls a console log until stop() is true: when its last tick came."""
    seen, at = None, None
    while not stop():
        ticks = vmdregress.ticks(read())
        if ticks and ticks[-1] != seen:
            seen, at = ticks[-1], time.monotonic()
        time.sleep(0.01)
    return at


def section_send(plan, vmd, work, kernel, initrd):
    """vmctl send to a file and receive from it, for an idle guest and one
    whose memory is full of random data, against cat of the same bytes;
    send | receive through a pipe against cat | cat; and the guest's
    downtime (last tick before to first tick after)."""
    vmctl = " ".join(vmd.vmctl_argv())
    rows, sizes = [], {}
    for kind, extra in (("idle", ""), (f"{FILL_MIB} MiB random", f" vmd.fill={FILL_MIB}")):
        size, send_s, recv_s, cat_s = [], [], [], []
        for i in range(plan.send_runs):
            name = f"s{os.getpid()}{kind[0]}{i}"
            send_guest(vmd, name, kernel, initrd, extra)
            path, copy = os.path.join(work, f"{name}.vm"), os.path.join(work, "copy.vm")
            send_s.append(timed(f"{vmctl} send {name} >{path}", f"send {name}"))
            size.append(os.path.getsize(path) / (1 << 20))
            cat_s.append(timed(f"cat {path} >{copy}", "cat"))
            recv_s.append(timed(f"{vmctl} receive r{name} <{path}", f"receive r{name}"))
            vmd.vmctl("stop", "-f", "-w", f"r{name}")
            os.unlink(path)
            os.unlink(copy)
        sizes[kind] = statistics.median(size)
        rows.append(Row(SEND, f"{kind}: stream size | guest memory", "MiB", size, [MEMORY_MIB] * len(size)))
        rows.append(Row(SEND, f"{kind}: send to a file | cat of the stream to a file", "s", send_s, cat_s))
        rows.append(Row(SEND, f"{kind}: receive from the file, to running | cat", "s", recv_s, cat_s))
    rate, cat_rate, down = [], [], []
    mib = sizes["idle"]
    blob = os.path.join(work, "blob")
    with open(blob, "wb") as f:
        f.write(os.urandom(int(mib * (1 << 20))))
    for i in range(plan.send_runs):
        name = f"p{os.getpid()}i{i}"
        send_guest(vmd, name, kernel, initrd)
        done = threading.Event()
        last = {}
        watch = threading.Thread(target=lambda: last.update(
            at=last_tick_time(lambda: vmd.vmd.console_log(name), done.is_set)))
        watch.start()
        try:
            secs = timed(f"{vmctl} send {name} | {vmctl} receive r{name}", f"send {name} | receive")
        finally:
            done.set()
            watch.join()
        console = vmd.console(f"r{name}")
        c.wait_for(f"r{name} to tick", lambda: vmdregress.ticks(console.tail(5)), 60, interval=0.01)
        down.append(time.monotonic() - last["at"])
        rate.append(mib / secs)
        cat_rate.append(mib / timed(f"cat {blob} | cat >/dev/null", "cat | cat"))
        vmd.vmctl("stop", "-f", "-w", f"r{name}")
    os.unlink(blob)
    rows.append(Row(SEND, "idle: send | receive, the whole move | cat | cat (MiB of stream a second)", "MiB/s",
                    rate, cat_rate, better="higher"))
    rows.append(Row(SEND, "idle: guest downtime, last tick before to first after (ticks 1 s apart)", "s",
                    down, []))
    return rows


def check_ready():
    """What the bench needs, or CannotRun saying what to do."""
    if os.geteuid() != 0:
        raise CannotRun("the bench runs as root")
    for b in (c.VMD, c.VMCTL):
        if not os.access(b, os.X_OK):
            raise CannotRun(f"{b} missing: run make bench (it builds the release binaries)")
    for tool in ("qemu-system-x86_64", "qemu-img", "libvirtd", "virsh", "ip"):
        if not c.which(tool):
            raise CannotRun(f"{tool} missing: run sh regress/setup --bench")
    for user in ("_vmd", "libvirt-qemu"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            raise CannotRun(f"user {user} missing: run sh regress/setup --bench")


def main():
    args = sys.argv[1:]
    quick = "--quick" in args
    sections = [a for a in args if a != "--quick"] or SECTIONS
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        print(f"usage: regress/bench [--quick] [{' | '.join(SECTIONS)}]...", file=sys.stderr)
        return 2
    plan = Plan(quick)
    cleanup = c.Cleanup()
    started = time.monotonic()
    work = tempfile.mkdtemp(prefix="vmd-bench-")
    os.chmod(work, 0o755)
    cleanup.push(f"rm -rf {work}", lambda: shutil.rmtree(work, ignore_errors=True))
    links_before = None
    rows, notes = [], []
    try:
        check_ready()
        title = f"make bench: vmd against the alternatives, {c.machine_line()}"
        links_before = host_links()
        if "qcow2" in sections:
            log("qcow2: vmctl create against qemu-img")
            rows += section_qcow2(plan, work)
        if any(s in sections for s in ("control", "start", "send")):
            kernel, initrd = c.guest_files()
            netns = Netns(cleanup)
            log(f"vmd in network namespace {netns.name}")
            vmd = OurVmd(work, netns, kernel, initrd, cleanup)
            if "control" in sections or "start" in sections:
                log(f"libvirtd in {netns.name}: defining {DEFINED} domains")
                lv = Libvirt(work, netns, kernel, initrd, cleanup)
                version = c.run(lv.virsh_argv("version")).strip().splitlines()
                notes.append(f"libvirt: {'; '.join(v.strip() for v in version if v.strip())}; "
                             f"{DEFINED} domains defined in {lv.define_seconds:.1f}s")
            if "control" in sections:
                log("control plane: vmctl against virsh, idle daemons")
                control_rows, base = section_control(plan, vmd, lv)
                notes.append(f"starting any process (/bin/true) takes {base:.2f} ms here")
                rows = control_rows + rows
            if "start" in sections:
                log("start to guest: vmd, bare QEMU and libvirt, alternating")
                rows += section_start(plan, vmd, lv, work, kernel, initrd, cleanup)
            if "send" in sections:
                log("send and receive: to a file and through a pipe, against cat")
                rows += section_send(plan, vmd, work, kernel, initrd)
    except CannotRun as e:
        print(f"regress/bench: cannot run: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("regress/bench: interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        cleanup.run()
        if links_before is not None:
            new = {link for link in host_links() - links_before if link.startswith("virbr")}
            if new:
                print(f"regress/bench: the host gained {sorted(new)} during the run", file=sys.stderr)
    rows.sort(key=lambda r: r.section)
    notes.append("each cell: median (min-max; 10th-90th percentile beyond 10 runs); n = runs vmd/alternative; "
                 "ratio = vmd's median / the alternative's (below 1: vmd takes less; for req/s above 1 is better)")
    if quick:
        notes.append("--quick: one or two runs per figure, not for comparison")
    notes.append(f"whole run: {time.monotonic() - started:.0f}s")
    text = c.render(title, notes, rows)
    print()
    print(text, end="")
    path = c.save("bench", text)
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
