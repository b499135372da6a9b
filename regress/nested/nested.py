#!/usr/bin/env python3
"""regress/nested: vmd on a real KVM host. This machine's /dev/kvm is not
hardware KVM (and CI's may be missing), so the suite boots a nested KVM
host, L1 (regress/nested/build, l1.py: Debian's cloud kernel under TCG
with `-cpu max`, which has AMD's SVM, and kvm_amd loaded), and runs the
release vmd and vmctl inside it, where `accel kvm` is the real thing: the
test guest (L2) runs under L1's KVM.

    regress/nested/run [--all] [CASE...]

Without arguments it runs the short default set (DEFAULT below), with
--all every case, or the cases named. As root. One L1 serves every case;
each case starts its own vmd in L1 (own dir, socket, vm.conf, console
logs) and kills it and everything it started at the end, even on
failure. A failing case prints the tail of its VMs' consoles and of vmd's
log. Every wait is for an event, bounded generously: L1 runs under TCG on
a shared machine and L2 under L1's emulated SVM.
"""

import os
import re
import shlex
import signal
import subprocess
import sys
import time

NESTED_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(NESTED_DIR), "lib"))
sys.path.insert(0, NESTED_DIR)
import vmdregress as t  # noqa: E402
from vmdregress import ROOT, Failure, case, fail, summary, wait_for  # noqa: E402
from l1 import L1  # noqa: E402

NESTED_BUILD = os.path.join(NESTED_DIR, "build")
# The test guest inside L1 (regress/nested/build puts it there).
GUEST_KERNEL = "/guest/vmlinuz"
GUEST_INITRD = "/guest/initramfs.gz"
GUEST_CMDLINE = "console=ttyS0 quiet"
# L2 boots under L1's KVM, which TCG emulates: ~15 s on an idle machine.
L2_BOOT_TIMEOUT = 300
# vmctl commands that wait for a guest (stop -w) get as long.
VMCTL_TIMEOUT = 300
# vm.conf's default `uid range` (vm.conf.5): the uids VMs run as.
UID_RANGE = (0x70000000, 0x70000000 + 2047)
# Modules L1 must have loaded besides kvm (kernel-dependent suites use them).
L1_MODULES = ["tun", "bridge", "vrf", "vhost_net", "nf_tables"]


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

    def __init__(self, l1, conf_extra=""):
        self.l1 = l1
        self.dir = l1.check("mktemp -d /tmp/vmd-regress-XXXXXX").strip()
        self.sock = f"{self.dir}/vmd.sock"
        self.log_path = f"{self.dir}/vmd.log"
        self.console_dir = f"{self.dir}/console"
        self.conf = f"{self.dir}/vm.conf"
        self.tracked = set()
        self.names = []
        conf = f'console log "{self.console_dir}"\n{conf_extra}'
        q = shlex.quote
        self.pid = int(l1.check(
            f"printf %s {q(conf)} >{q(self.conf)}\n"
            f"setsid vmd -d -v -f {q(self.conf)} -s {q(self.sock)} </dev/null >{q(self.log_path)} 2>&1 &\n"
            "echo $!").strip())
        self.tracked.add(self.pid)
        wait_for("vmd's control socket in L1",
                 lambda: l1.sh(f"test -S {q(self.sock)} || ! kill -0 {self.pid}")[0] == 0, 60)
        if not self.proc_status(self.pid):
            raise Failure(f"vmd exited at startup: {self.log()}")

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
        return "\n".join(parts)


def expect(rc_out, rc, pattern, what):
    """Checks a vmctl result: exit status `rc` and `pattern` in its output."""
    got_rc, out = rc_out
    if got_rc != rc or not re.search(pattern, out, re.M):
        raise Failure(f"{what}: exit {got_rc}, output {out.strip()!r}; want exit {rc} and /{pattern}/")
    return out


def ticks(text):
    return [int(n) for n in re.findall(r"^VMD-GUEST: tick (\d+)\r?$", text, re.M)]


def config_vm(name):
    """A disabled vm.conf VM running the test guest (listed when stopped)."""
    return (f'vm "{name}" {{\n disable\n boot "{GUEST_KERNEL}"\n initrd "{GUEST_INITRD}"\n'
            f' cmdline "{GUEST_CMDLINE}"\n memory 256M\n}}\n')


def kvm_gid(l1):
    for line in l1.read("/etc/group").splitlines():
        fields = line.split(":")
        if fields[0] == "kvm":
            return fields[2]
    raise Failure("L1 has no kvm group")


def check_runs_on_kvm(vmd, qemu):
    """QEMU was told `-accel kvm` and opens /dev/kvm and KVM's VM and vCPU
    descriptors."""
    args = vmd.cmdline(qemu).split()
    accel = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "-accel"]
    if accel != ["kvm"]:
        raise Failure(f"QEMU's -accel is {accel}, want ['kvm']: {' '.join(args)}")
    wants = ("/dev/kvm", "anon_inode:kvm-vm", "anon_inode:kvm-vcpu:0")
    fds = ""

    def kvm_open():
        nonlocal fds
        fds = vmd.l1.sh(f"ls -l /proc/{qemu}/fd")[1]
        return all(w in fds for w in wants)
    try:
        # QEMU opens them while it starts up.
        wait_for("QEMU's KVM descriptors", kvm_open, 120)
    except Failure as e:
        raise Failure(f"{e}; want {wants} among: {fds}") from None


# --- cases


def guest_boots_on_kvm(vmd):
    """The test guest boots to `ready` under vmd's QEMU on L1's KVM."""
    vmid, _ = vmd.start("l2boot")
    _, qemu = vmd.vm_pids(vmid)
    check_runs_on_kvm(vmd, qemu)
    vmd.wait_console("l2boot", "VMD-GUEST: ready")
    log = vmd.console_log("l2boot")
    for want in ("VMD-GUEST: booted", "VMD-GUEST: cpus 1"):
        if want not in log:
            raise Failure(f"no {want!r} on the console")
    if vmd.state(vmid) != "running":
        raise Failure(f"status: {vmd.status_row(vmid)}")


def qemu_credentials(vmd):
    """QEMU runs as the VM's uid and gid, with the kvm group as its only
    supplementary group and no capability; /dev/kvm (root:kvm 0660) is
    open to it through that group alone."""
    vmid, _ = vmd.start("l2creds")
    vm_pid, qemu = vmd.vm_pids(vmid)
    check_runs_on_kvm(vmd, qemu)
    st = vmd.proc_status(qemu)
    if not st:
        raise Failure("QEMU is gone")
    uids, gids = st["Uid"].split(), st["Gid"].split()
    vm_uid = uids[0]
    if set(uids) != {vm_uid} or not UID_RANGE[0] <= int(vm_uid) <= UID_RANGE[1]:
        raise Failure(f"QEMU's Uid {uids}; want one uid of vmd's range {UID_RANGE} in all four")
    # The VM process drops to the same uid once QEMU runs.
    wait_for("the VM process to run as the VM's uid",
             lambda: (vmd.proc_status(vm_pid) or {}).get("Uid", "").split() == uids, 60)
    if set(gids) != {vm_uid}:
        raise Failure(f"QEMU's Gid {gids}; want the VM's gid {vm_uid} in all four")
    if st["Groups"].split() != [kvm_gid(vmd.l1)]:
        raise Failure(f"QEMU's Groups {st['Groups']!r}; want only kvm ({kvm_gid(vmd.l1)})")
    for cap in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        if int(st[cap], 16) != 0:
            raise Failure(f"QEMU's {cap} is {st[cap]}")
    if st.get("NoNewPrivs") != "1":
        raise Failure(f"QEMU's NoNewPrivs is {st.get('NoNewPrivs')}")
    dev = vmd.l1.check("stat -c '%a %U %G' /dev/kvm").split()
    if dev != ["660", "root", "kvm"]:
        raise Failure(f"/dev/kvm is {dev}; the test needs 660 root kvm")


def pause_unpause(vmd):
    """Pause stops the guest's ticks for at least three tick intervals (as
    measured just before, so a slow machine only widens the window);
    unpause brings them back."""
    vmid, _ = vmd.start("l2pause")
    vmd.vm_pids(vmid)
    vmd.wait_console("l2pause", "VMD-GUEST: tick 2")
    first = time.monotonic()
    vmd.wait_console("l2pause", "VMD-GUEST: tick 3")
    interval = time.monotonic() - first
    expect(vmd.vmctl("pause", "l2pause"), 0, rf"^vmctl: paused vm {vmid} successfully$", "pause")
    if vmd.state(vmid) != "paused":
        raise Failure(f"status after pause: {vmd.status_row(vmid)}")
    # A tick already on its way out when the vCPU stopped may still arrive.
    before = ticks(vmd.console_log("l2pause"))
    time.sleep(max(3.0, 3 * interval))
    after = ticks(vmd.console_log("l2pause"))
    if len(after) > len(before) + 1:
        raise Failure(f"ticks while paused: {after[len(before):]} (interval {interval:.1f}s)")
    expect(vmd.vmctl("unpause", "l2pause"), 0, rf"^vmctl: unpaused vm {vmid} successfully$", "unpause")
    if vmd.state(vmid) != "running":
        raise Failure(f"status after unpause: {vmd.status_row(vmid)}")
    wait_for("ticks to resume", lambda: len(ticks(vmd.console_log("l2pause"))) >= len(after) + 2,
             L2_BOOT_TIMEOUT)


def graceful_stop(vmd):
    """stop -w presses the power button; the guest powers off; QEMU and the
    VM process are gone and the vmctl-started VM is no longer listed."""
    vmid, _ = vmd.start("l2stop")
    vm_pid, qemu = vmd.vm_pids(vmid)
    vmd.wait_console("l2stop", "VMD-GUEST: ready")
    expect(vmd.vmctl("stop", "-w", "l2stop"), 0, rf"^stopping vm l2stop: terminated vm {vmid}$", "stop -w")
    if "VMD-GUEST: power button, powering off" not in vmd.console_log("l2stop"):
        raise Failure("the guest's power-off path did not run")
    if vmd.proc_status(vm_pid) or vmd.proc_status(qemu):
        raise Failure("the VM process or QEMU outlived stop -w")
    if vmd.status_row(vmid) is not None:
        raise Failure(f"a vmctl-started VM is still listed: {vmd.status_row(vmid)}")


def killed_vm_process(vmd):
    """SIGKILL of the VM process mid-run: QEMU dies with it, nothing of the
    VM's uid is left, /dev/kvm is free and the VM shows stopped."""
    out = expect(vmd.vmctl("start", "l2kill"), 0, r"^vmctl: started vm \d+ successfully", "start l2kill")
    vmid = int(re.search(r"started vm (\d+)", out).group(1))
    vmd.names.append("l2kill")
    vm_pid, qemu = vmd.vm_pids(vmid)
    vm_uid = vmd.proc_status(qemu)["Uid"].split()[0]
    vmd.wait_console("l2kill", "VMD-GUEST: tick 1")
    vmd.l1.check(f"kill -KILL {vm_pid}")
    wait_for("the VM to show stopped", lambda: vmd.state(vmid) == "stopped", 60)

    def leftovers():
        return {pid: st["Name"] for pid, st in vmd.processes().items()
                if st["Uid"].split()[0] == vm_uid or st["Name"].startswith("qemu-system")}
    wait_for("QEMU and every process of the VM's uid to be gone", lambda: not leftovers(), 60)
    holders = vmd.l1.sh("ls -l /proc/[0-9]*/fd 2>/dev/null | grep -c /dev/kvm")[1].strip()
    if holders != "0":
        raise Failure(f"{holders} descriptors of /dev/kvm still open")
    if "VM process was killed by SIGKILL" not in vmd.log():
        raise Failure("vmd did not log the VM process's death")


# (name, function, vm.conf lines); every case runs with its own vmd.
CASES = [
    ("accel-kvm-guest-boots-on-kvm", guest_boots_on_kvm, "accel kvm\n"),
    ("accel-auto-picks-kvm-guest-boots", guest_boots_on_kvm, "accel auto\n"),
    ("qemu-vm-uid-kvm-group-no-caps", qemu_credentials, "accel kvm\n"),
    ("pause-unpause-on-kvm", pause_unpause, "accel kvm\n"),
    ("graceful-stop-w-on-kvm", graceful_stop, "accel kvm\n"),
    ("sigkill-vm-process-leaves-nothing", killed_vm_process, "accel kvm\n" + config_vm("l2kill")),
]
# What `make test` runs (regress/run); `make regress-nested` runs all.
DEFAULT = [name for name, _, _ in CASES]


def in_l1(l1, fn, conf):
    """A case with its own vmd in L1; a failure carries the tails of the
    VMs' consoles and of vmd's log."""
    def run():
        vmd = L1Vmd(l1, conf)
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


def check_l1(l1):
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


def main():
    args = sys.argv[1:]
    names = [n for n, _, _ in CASES]
    if "--all" in args:
        wanted = names
    elif args:
        unknown = [a for a in args if a not in names]
        if unknown:
            print(f"usage: run [--all] [CASE...]; unknown {unknown}; cases: {' '.join(names)}", file=sys.stderr)
            return 2
        wanted = args
    else:
        wanted = DEFAULT

    def setup_failed(why):
        fail("setup", why)
        return summary()

    # SIGTERM or SIGINT (regress/run stopped): through the finally below,
    # which stops L1.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _: sys.exit(128 + signum))
    if os.geteuid() != 0:
        return setup_failed("the suite runs as root")
    if not os.path.exists("/usr/bin/qemu-system-x86_64"):
        return setup_failed("/usr/bin/qemu-system-x86_64 is missing: run sh regress/setup")
    began = time.monotonic()
    p = subprocess.run(["cargo", "build", "-q", "--release", "-p", "vmd", "-p", "vmctl"], cwd=ROOT,
                       capture_output=True, text=True)
    if p.returncode != 0:
        return setup_failed(f"cargo build --release failed: {tail(p.stderr)}")
    p = subprocess.run([NESTED_BUILD, "--print"], capture_output=True, text=True)
    m = re.search(r"KERNEL=(\S+) INITRD=(\S+)", p.stdout)
    if p.returncode != 0 or not m:
        return setup_failed(f"{NESTED_BUILD} failed: {p.stderr.strip()}")
    try:
        l1 = L1.boot(m.group(1), m.group(2))
    except Failure as e:
        return setup_failed(f"L1 did not boot: {e}")
    times = [f"L1 boot {l1.boot_seconds:.1f}s"]
    try:
        try:
            vendor = check_l1(l1)
        except Failure as e:
            return setup_failed(f"L1 is no KVM host, so nothing here can run: {e}")
        print(f"nested: L1 booted in {l1.boot_seconds:.1f}s; {vendor} loaded, /dev/kvm for group kvm",
              flush=True)
        for name, fn, conf in CASES:
            if name in wanted:
                start = time.monotonic()
                case(name, in_l1(l1, fn, conf))
                times.append(f"{name} {time.monotonic() - start:.1f}s")
    finally:
        l1.stop()
    times.append(f"total {time.monotonic() - began:.1f}s")
    print(f"nested: times: {', '.join(times)}")
    return summary()


if __name__ == "__main__":
    sys.exit(main())
