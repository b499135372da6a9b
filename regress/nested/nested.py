#!/usr/bin/env python3
"""regress/nested: vmd on a real KVM host. This machine's /dev/kvm is not
hardware KVM (and CI's may be missing), so the suite boots a nested KVM
host, L1 (regress/nested/build, l1.py: Debian's cloud kernel under TCG
with `-cpu max`, which has AMD's SVM, and kvm_amd loaded), and runs the
release vmd and vmctl inside it, where `accel kvm` is the real thing: the
test guest (L2) runs under L1's KVM, under QEMU or under vmd's own monitor
(`backend kvm`). It also runs regress/net's cases
that matter most on another kernel (two guests pinging through a switch,
taps removed when a VM process, QEMU or vmd is killed) on L1's Debian
6.1 kernel.

    regress/nested/run [--all] [CASE...]

Without arguments it runs the short default set (DEFAULT below), with
--all every case, or the cases named. As root. One L1 serves every case;
each case starts its own vmd in L1 (own dir, socket, vm.conf, console
logs) and kills it and everything it started at the end, even on
failure. A failing case prints the tail of its VMs' consoles and of vmd's
log. Every wait is for an event, bounded generously: L1 runs under TCG on
a shared machine and L2 under L1's emulated SVM. L1, its vmd harness and
the setup are in l1.py, for other suites to reuse.
"""

import json
import os
import re
import signal
import sys
import time

NESTED_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(NESTED_DIR), "lib"))
sys.path.insert(0, NESTED_DIR)
sys.path.insert(0, os.path.join(os.path.dirname(NESTED_DIR), "net"))
import net  # noqa: E402
from vmdregress import Failure, case, expect, summary, ticks, wait_for  # noqa: E402
from l1 import (GUEST_CMDLINE, GUEST_INITRD, GUEST_KERNEL, L1, L2_BOOT_TIMEOUT,  # noqa: E402
                check_kvm_host, guest_vm_conf, in_l1, nested_build, setup)

# vm.conf's default `uid range` (vm.conf.5): the uids VMs run as.
UID_RANGE = (0x70000000, 0x70000000 + 2047)


def config_kvm_vm(name, cmdline=GUEST_CMDLINE, extra=""):
    """A disabled vm.conf VM running the test guest under vmd's own monitor
    (`backend kvm`), with `extra` vm.conf lines."""
    return guest_vm_conf(name, cmdline, extra, backend_kvm=True)


# The shutdown timeout of the guest that ignores its power button: short,
# so the case is quick; the guest has long been `ready` when it is pressed.
OWN_IGNORE_TIMEOUT = 10

KVM_CONF = (config_kvm_vm("l2own") + config_kvm_vm("l2own-reboot", f"{GUEST_CMDLINE} vmd.action=reboot-after-2s")
            + config_kvm_vm("l2own-off", f"{GUEST_CMDLINE} vmd.action=poweroff-after-2s")
            + config_kvm_vm("l2own-shell", "console=ttyS0 quiet vmd.mode=demo")
            + config_kvm_vm("l2own-stop") + config_kvm_vm("l2own-pause")
            + config_kvm_vm("l2own-smp", extra=" vcpu 2\n")
            + config_kvm_vm("l2own-ignore", f"{GUEST_CMDLINE} vmd.powerbutton=ignore",
                            f" shutdown timeout {OWN_IGNORE_TIMEOUT}\n"))


def start_own(vmd, name):
    """vmctl start of a backend kvm VM from vm.conf: (id, tty, VM process)."""
    vmd.names.append(name)
    rc, out = vmd.vmctl("start", name)
    m = re.search(r"^vmctl: started vm (\d+) successfully, tty (/dev/pts/\d+)$", out, re.M)
    if rc != 0 or not m:
        raise Failure(f"start {name}: exit {rc}: {out.strip()}")
    vmid, tty = int(m.group(1)), m.group(2)
    row = vmd.status_row(vmid)
    if not row or row["PID"] == "-":
        raise Failure(f"vm {vmid} has no PID in status: {row}")
    vmd.track(int(row["PID"]))
    return vmid, tty, int(row["PID"])


def check_own_monitor(vmd, vm_pid):
    """The VM process runs the guest itself: no child (no QEMU), chrooted, a
    uid of vmd's range in all four, no capability in any set, no_new_privs, KVM's
    VM and vCPU descriptors, and `Seccomp: 2` on each of its threads (the
    monitor and vcpu0, each with its own filter)."""
    kids = [pid for pid, st in vmd.processes().items() if st.get("PPid") == str(vm_pid)]
    if kids:
        raise Failure(f"the VM process has children {kids}: backend kvm runs no QEMU")
    st = vmd.proc_status(vm_pid)
    uids = st["Uid"].split()
    if len(set(uids)) != 1 or not UID_RANGE[0] <= int(uids[0]) <= UID_RANGE[1]:
        raise Failure(f"the VM process's Uid {uids}; want one uid of vmd's range {UID_RANGE}")
    if set(st["Gid"].split()) != {uids[0]} or st["Groups"].split():
        raise Failure(f"the VM process's Gid {st['Gid']!r}, Groups {st['Groups']!r}")
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        if int(st[cap], 16) != 0:
            raise Failure(f"the VM process's {cap} is {st[cap]}")
    if st.get("NoNewPrivs") != "1":
        raise Failure(f"the VM process's NoNewPrivs is {st.get('NoNewPrivs')}")
    if vmd.l1.sh(f"readlink /proc/{vm_pid}/root")[1].strip() == "/":
        raise Failure("the VM process is not chrooted")
    fds = vmd.l1.sh(f"ls -l /proc/{vm_pid}/fd")[1]
    for want in ("anon_inode:kvm-vm", "anon_inode:kvm-vcpu:0"):
        if want not in fds:
            raise Failure(f"the VM process holds no {want}: {fds}")
    threads = vmd.l1.sh(f"grep -HE '^(Name|Uid|Cap(Prm|Eff|Bnd)|NoNewPrivs|Seccomp):' "
                        f"/proc/{vm_pid}/task/*/status")[1]
    fields = {}
    for task, key, value in re.findall(r"^\S+/task/(\d+)/status:(\w+):\s+(.*)$", threads, re.M):
        fields.setdefault(task, {})[key] = value.strip()
    if len(fields) != 2 or [f.get("Name") for f in fields.values()].count("vcpu0") != 1:
        raise Failure(f"want two threads, the monitor and vcpu0: {threads}")
    for task, f in fields.items():
        if (f.get("Seccomp") != "2" or f.get("NoNewPrivs") != "1" or f.get("Uid", "").split() != uids
                or any(int(f.get(cap, "1"), 16) for cap in ("CapPrm", "CapEff", "CapBnd"))):
            raise Failure(f"thread {task} ({f.get('Name')}) is not dropped and filtered: {f}")


def own_monitor_boots(vmd):
    """`backend kvm`: Debian's stock cloud kernel boots under vmd's own
    monitor (no QEMU) to its markers and ticks; the console reaches the
    console log, the pty and `vmctl console`; the VM process is dropped
    and filtered on every thread."""
    vmid, tty, vm_pid = start_own(vmd, "l2own")
    vmd.wait_console("l2own", "VMD-GUEST: tick 2")
    log = vmd.console_log("l2own")
    for want in ("VMD-GUEST: booted", "VMD-GUEST: cpus 1", "VMD-GUEST: ready"):
        if want not in log:
            raise Failure(f"no {want!r} on the console")
    if vmd.state(vmid) != "running":
        raise Failure(f"status: {vmd.status_row(vmid)}")
    check_own_monitor(vmd, vm_pid)
    # The pty carries the console: a reader of the slave sees ticks.
    out = vmd.l1.sh(f"timeout -s KILL 5 cat {tty}", 60)[1]
    if not re.search(r"VMD-GUEST: tick \d+", out):
        raise Failure(f"no tick on {tty} in 5 s: {out[-500:]!r}")
    # vmctl console, its input open for 4 s.
    rc, out = vmd.l1.sh(f"sleep 4 | timeout -s KILL 60 vmctl -s {vmd.sock} console l2own", 90)
    if rc != 0 or not re.search(r"VMD-GUEST: tick \d+", out):
        raise Failure(f"vmctl console: exit {rc}: {out[-500:]!r}")
    expect(vmd.vmctl("stop", "-f", "l2own"), 0, r"forced to terminate", "stop -f")
    wait_for("the VM process to go", lambda: vmd.proc_status(vm_pid) is None, 60)


def own_monitor_console_input(vmd):
    """Input typed on `vmctl console` reaches the guest's shell through the
    8250's FIFO and interrupt, and its answer comes back."""
    start_own(vmd, "l2own-shell")
    vmd.wait_console("l2own-shell", "VMD-GUEST: ready")
    rc, out = vmd.l1.sh("(sleep 5; echo 'echo sum-$((6*7))-done'; sleep 10) | "
                        f"timeout -s KILL 60 vmctl -s {vmd.sock} console l2own-shell", 120)
    if "sum-42-done" not in out:
        raise Failure(f"the guest's shell did not answer: exit {rc}: {out[-800:]!r}")
    expect(vmd.vmctl("stop", "-f", "l2own-shell"), 0, r"forced to terminate", "stop -f")


def own_monitor_reboot(vmd):
    """A guest reboot (`reboot -f`: the ACPI reset register) ends the VM
    process and vmd restarts the VM on the same tty; both boots are in the
    console log."""
    vmid, tty, first = start_own(vmd, "l2own-reboot")
    vmd.wait_console("l2own-reboot", "VMD-GUEST: action reboot now")
    wait_for("the second boot", lambda: vmd.console_log("l2own-reboot").count("VMD-GUEST: booted") >= 2,
             L2_BOOT_TIMEOUT)
    row = vmd.status_row(vmid)
    if not row or row["TTY"] != tty.replace("/dev/", "") or row["PID"] in ("-", str(first)):
        raise Failure(f"after the reboot: {row}; want running on {tty} in a new VM process")
    vmd.track(int(row["PID"]))
    if f"vm {vmid} rebooting" not in vmd.log():
        raise Failure("vmd did not log the reboot")
    expect(vmd.vmctl("stop", "-f", "l2own-reboot"), 0, r"forced to terminate", "stop -f")


def own_monitor_poweroff(vmd):
    """A guest power-off (`poweroff -f`: ACPI S5 on the FADT's sleep
    control register) ends the VM cleanly."""
    vmid, _, vm_pid = start_own(vmd, "l2own-off")
    vmd.wait_console("l2own-off", "VMD-GUEST: action poweroff now")
    wait_for("the VM to stop", lambda: vmd.state(vmid) == "stopped", L2_BOOT_TIMEOUT)
    wait_for("the VM process to go", lambda: vmd.proc_status(vm_pid) is None, 60)
    if "guest: guest-shutdown" not in vmd.log():
        raise Failure("vmd did not log the guest's power-off")


def own_monitor_power_button(vmd):
    """`stop -w` presses the power button (the GED's interrupt, _EVT's
    Notify of the PNP0C0C device): the guest's `button` driver reports it,
    its init powers off (ACPI S5) and the VM process ends cleanly."""
    vmid, _, vm_pid = start_own(vmd, "l2own-stop")
    vmd.wait_console("l2own-stop", "VMD-GUEST: ready")
    out = expect(vmd.vmctl("stop", "-w", "l2own-stop"), 0, rf"terminated vm {vmid}$", "stop -w")
    log = vmd.console_log("l2own-stop")
    if "VMD-GUEST: power button, powering off" not in log:
        raise Failure(f"the guest's power button path did not run: {log[-1500:]!r}")
    if "forced" in out:
        raise Failure(f"stop -w forced the guest: {out!r}")
    wait_for("the VM process to go", lambda: vmd.proc_status(vm_pid) is None, 60)
    if vmd.state(vmid) != "stopped":
        raise Failure(f"status after stop -w: {vmd.status_row(vmid)}")


def own_monitor_power_button_ignored(vmd):
    """A guest that ignores its power button is forced off at its shutdown
    timeout (not before), as with QEMU."""
    vmid, _, vm_pid = start_own(vmd, "l2own-ignore")
    vmd.wait_console("l2own-ignore", "VMD-GUEST: ready")
    began = time.monotonic()
    expect(vmd.vmctl("stop", "-w", "l2own-ignore"), 0,
           rf"forced to terminate vm {vmid} after the shutdown timeout$", "stop -w")
    took = time.monotonic() - began
    if took < OWN_IGNORE_TIMEOUT - 1:
        raise Failure(f"forced after {took:.1f}s, before the {OWN_IGNORE_TIMEOUT}s shutdown timeout")
    if "VMD-GUEST: power button, ignored" not in vmd.console_log("l2own-ignore"):
        raise Failure("the guest did not see its power button")
    wait_for("the VM process to go", lambda: vmd.proc_status(vm_pid) is None, 60)


def own_monitor_pause_unpause(vmd):
    """`backend kvm`: pause parks the vCPU (kicked out of KVM_RUN) and the
    ticks stop; unpause resumes them; a second pause is refused as with
    QEMU."""
    vmid, _, _ = start_own(vmd, "l2own-pause")
    pause_unpause(vmd, "l2own-pause", vmid)
    expect(vmd.vmctl("pause", "l2own-pause"), 0, rf"^vmctl: paused vm {vmid} successfully$", "pause")
    expect(vmd.vmctl("pause", "l2own-pause"), 1, r"already paused", "a second pause")
    expect(vmd.vmctl("unpause", "l2own-pause"), 0, rf"^vmctl: unpaused vm {vmid} successfully$", "unpause")
    expect(vmd.vmctl("unpause", "l2own-pause"), 1, r"is not paused", "a second unpause")
    expect(vmd.vmctl("stop", "-f", "l2own-pause"), 0, r"forced to terminate", "stop -f")


def own_monitor_two_vcpus(vmd):
    """`vcpu 2` under `backend kvm`: two vCPU threads (vcpu0, vcpu1), each
    with its KVM vCPU, and the guest brings both CPUs up (MADT, CPUID's
    APIC ids, INIT/SIPI through the in-kernel LAPIC); pause and unpause
    park and resume both."""
    vmid, _, vm_pid = start_own(vmd, "l2own-smp")
    vmd.wait_console("l2own-smp", "VMD-GUEST: ready")
    if "VMD-GUEST: cpus 2" not in vmd.console_log("l2own-smp"):
        raise Failure(f"the guest did not see two CPUs: {vmd.console_log('l2own-smp')[-1500:]!r}")
    names = vmd.l1.sh(f"cat /proc/{vm_pid}/task/*/comm")[1].split()
    if sorted(n for n in names if n.startswith("vcpu")) != ["vcpu0", "vcpu1"]:
        raise Failure(f"the VM process's threads are {names}; want vcpu0 and vcpu1")
    fds = vmd.l1.sh(f"ls -l /proc/{vm_pid}/fd")[1]
    for want in ("anon_inode:kvm-vcpu:0", "anon_inode:kvm-vcpu:1"):
        if want not in fds:
            raise Failure(f"the VM process holds no {want}: {fds}")
    pause_unpause(vmd, "l2own-smp", vmid)
    expect(vmd.vmctl("stop", "-f", "l2own-smp"), 0, r"forced to terminate", "stop -f")


def config_kvm_with(name, lines, cmdline):
    """A disabled backend kvm VM with more vm.conf `lines` and the test
    guest's options `cmdline`."""
    return config_kvm_vm(name, f"{GUEST_CMDLINE} {cmdline}", lines)


def config_kvm_disks(name, disks, cmdline):
    """A disabled backend kvm VM with `disks` (paths in order: vda, vdb...)."""
    return config_kvm_with(name, "".join(f' disk "{d}"\n' for d in disks), cmdline)


def image_head(vmd, path, fmt):
    """The first 32 bytes of an image's guest view, read by qemu-img in L1."""
    raw = f"{vmd.dir}/head-{os.path.basename(path)}.raw"
    vmd.l1.check(f"qemu-img convert -f {fmt} -O raw {path} {raw}", 300)
    head = vmd.l1.check(f"head -c 32 {raw} | tr -c 'A-Za-z0-9._-' .")
    vmd.l1.check(f"rm -f {raw}")
    return head.strip()


def qemu_img_check(vmd, path):
    rc, out = vmd.l1.sh(f"qemu-img check {path}", 300)
    if rc != 0 or "No errors were found" not in out:
        raise Failure(f"qemu-img check {path}: exit {rc}: {out.strip()[-500:]}")


def run_to_poweroff(vmd, name):
    """Starts a backend kvm VM whose guest powers off, and waits for its end."""
    vmid, _, vm_pid = start_own(vmd, name)
    wait_for(f"{name} to power off", lambda: vmd.state(vmid) == "stopped", L2_BOOT_TIMEOUT)
    wait_for(f"{name}'s VM process to go", lambda: vmd.proc_status(vm_pid) is None, 60)
    return vmd.console_log(name)


def want_lines(name, log, *wants):
    for want in wants:
        if want not in log:
            tail = "\n".join(line for line in log.splitlines() if "VMD-GUEST: " in line and " tick " not in line)
            raise Failure(f"{name}: no {want!r} on the console: {tail[-1500:]}")


def own_monitor_disks(vmd):
    """`backend kvm` disks (virtio-blk on virtio-mmio): the guest writes a
    qcow2 base; then it sees a raw disk with what the test wrote and a qcow2
    overlay of that base, writes a marker to the overlay, which the host
    reads back from the image (`qemu-img check` clean, the base untouched);
    the data is there again after a reboot, in a new VM process."""
    d = vmd.dir
    vmd.l1.check(f"vmctl create -s 64M {d}/raw.img && vmctl create -s 64M {d}/base.qcow2 && "
                 f"printf RAW-MARK-1 | dd of={d}/raw.img conv=notrunc 2>/dev/null")
    off = "vmd.action=poweroff-after-2s"
    vmd.write_config(vmd.read_config()
                     + config_kvm_disks("l2base", [f"{d}/base.qcow2"], f"vmd.diskwrite=vda:BASE-MARK-2 {off}")
                     + config_kvm_disks("l2disks", [f"{d}/raw.img", f"{d}/overlay.qcow2"],
                                        f"vmd.diskwrite=vdb:OVL-MARK-3 {off}")
                     + config_kvm_disks("l2again", [f"{d}/raw.img", f"{d}/overlay.qcow2"],
                                        "vmd.action=reboot-after-2s")
                     + config_kvm_disks("l2dup", [f"{d}/raw.img"], ""))
    expect(vmd.vmctl("reload"), 0, r"", "reload")
    log = run_to_poweroff(vmd, "l2base")
    want_lines("l2base", log, "VMD-GUEST: disks vda", "VMD-GUEST: disk vda 67108864 bytes rw",
               "VMD-GUEST: wrote vda BASE-MARK-2", "VMD-GUEST: disk vda head BASE-MARK-2")
    qemu_img_check(vmd, f"{d}/base.qcow2")
    vmd.l1.check(f"vmctl create -b {d}/base.qcow2 {d}/overlay.qcow2")
    log = run_to_poweroff(vmd, "l2disks")
    want_lines("l2disks", log, "VMD-GUEST: disks vda vdb", "VMD-GUEST: disk vda head RAW-MARK-1",
               "VMD-GUEST: disk vdb 67108864 bytes rw", "VMD-GUEST: wrote vdb OVL-MARK-3",
               "VMD-GUEST: disk vdb head OVL-MARK-3")
    qemu_img_check(vmd, f"{d}/overlay.qcow2")
    qemu_img_check(vmd, f"{d}/base.qcow2")
    if not image_head(vmd, f"{d}/overlay.qcow2", "qcow2").startswith("OVL-MARK-3"):
        raise Failure(f"the overlay does not hold the guest's marker: {image_head(vmd, f'{d}/overlay.qcow2', 'qcow2')!r}")
    if not image_head(vmd, f"{d}/base.qcow2", "qcow2").startswith("BASE-MARK-2"):
        raise Failure("the guest's write to the overlay reached the base")
    # A reboot: the VM process ends and vmd starts another, which sees
    # the same data.
    vmid, _, vm_pid = start_own(vmd, "l2again")
    check_io_thread(vmd, vm_pid)
    # The first boot's lines are in the log too: count them.
    wait_for("the second boot to be ready", lambda: vmd.console_log("l2again").count("VMD-GUEST: ready") >= 2,
             2 * L2_BOOT_TIMEOUT)
    log = vmd.console_log("l2again")
    for want in ("VMD-GUEST: disk vda head RAW-MARK-1", "VMD-GUEST: disk vdb head OVL-MARK-3"):
        if log.count(want) < 2:
            raise Failure(f"l2again: {want!r} not in both boots")
    row = vmd.status_row(vmid)
    if row and row["PID"] != "-":
        vmd.track(int(row["PID"]))
    # The disks are locked as for QEMU: another VM cannot have one.
    expect(vmd.vmctl("start", "l2dup"), 1, rf"{re.escape(d)}/raw.img is in use by another VM",
           "start of a second VM on raw.img")
    # vmctl stats: the monitor's own disk counters (the guest read both
    # disks' heads, and its partition scan, in this boot).
    rc, out = vmd.vmctl("-j", "stats", "l2again")
    disks = json.loads(out).get("disks", []) if rc == 0 else None
    if not disks or len(disks) != 2 or not all(d["read_bytes"] > 0 and d["read_ops"] > 0 for d in disks):
        raise Failure(f"vmctl -j stats l2again: exit {rc}: want two disks with reads: {out.strip()[-800:]}")
    expect(vmd.vmctl("stop", "-f", "l2again"), 0, r"forced to terminate", "stop -f")


KVM_NET_CONF = ("accel kvm\n" + net.SW + config_kvm_with("l2kloc", " local interface\n", "vmd.net=dhcp")
                + config_kvm_with("l2ka", ' interface { switch "sw" }\n', "vmd.ip=10.0.0.1/24 vmd.ping=10.0.0.2")
                + config_kvm_with("l2kb", ' interface { switch "sw" }\n', "vmd.ip=10.0.0.2/24 vmd.ping=10.0.0.1"))


def own_monitor_local_lease(vmd):
    """`backend kvm` interfaces (virtio-net on the parent's tap): on a local
    interface the guest's udhcpc gets its lease from vmd and the host
    pings the guest."""
    vmid, _, vm_pid = start_own(vmd, "l2kloc")
    net.expect_lease(vmd, "l2kloc", vmid, "eth0", 0)
    check_io_thread(vmd, vm_pid)
    expect(vmd.vmctl("stop", "-f", "l2kloc"), 0, r"forced to terminate", "stop -f")


def own_monitor_two_guests_ping(vmd):
    """Two `backend kvm` guests on one switch ping each other through the
    bridge; their taps are ports of it."""
    net.bridge_up(vmd, net.BRIDGE)
    started = [(name, start_own(vmd, name)[0]) for name in ("l2ka", "l2kb")]
    for name, other in (("l2ka", "10.0.0.2"), ("l2kb", "10.0.0.1")):
        vmd.wait_console(name, f"VMD-GUEST: ping {other} ok")
    for name, vmid in started:
        net.expect_port(vmd, net.tap(vmd, name, vmid), net.BRIDGE)
    for name, _ in started:
        expect(vmd.vmctl("stop", "-f", name), 0, r"forced to terminate", "stop -f")


# The locked guest's changed MAC (locally administered, not vmd's) and
# the host's address on the bridge.
KVM_LOCK_MAC = "02:00:5e:00:00:0b"
KVM_LOCK_HOST = "10.0.0.254"
KVM_LOCK_CONF = ("accel kvm\n" + net.SW
                 + config_kvm_with("l2klock", ' interface { switch "sw", locked lladdr }\n',
                                   f"vmd.mac={KVM_LOCK_MAC} vmd.ip=10.0.0.1/24")
                 + config_kvm_with("l2knb", ' interface { switch "sw", locked lladdr }\n',
                                   f"vmd.ip=10.0.0.2/24 vmd.ping={KVM_LOCK_HOST}"))


def lock_drops(vmd, tap):
    """Packets vmd's lock chain of `tap` dropped (nft in L1), None without
    the chain."""
    out = vmd.l1.sh("nft -j list ruleset")[1]
    for item in json.loads(out or "{}").get("nftables", []):
        rule = item.get("rule")
        if rule and rule.get("family") == "netdev" and rule.get("chain") == f"lock-{tap}":
            return sum(e["counter"]["packets"] for e in rule.get("expr", []) if "counter" in e)
    return None


def own_monitor_locked_lladdr(vmd):
    """`locked lladdr` under `backend kvm`: the host side enforces it as
    for QEMU (vmd's nftables chain on the tap): a guest that changes its
    MAC is cut off from the host, its locked neighbour with its own MAC
    answers."""
    net.bridge_up(vmd, net.BRIDGE)
    vmd.ip("addr", "add", f"{KVM_LOCK_HOST}/24", "dev", net.BRIDGE)
    try:
        locked_id = start_own(vmd, "l2klock")[0]
        start_own(vmd, "l2knb")
        locked_tap = net.tap(vmd, "l2klock", locked_id)["ifname"]
        vmd.wait_console("l2klock", f"VMD-GUEST: mac eth0 {KVM_LOCK_MAC}")
        vmd.wait_console("l2klock", "VMD-GUEST: ready")
        vmd.wait_console("l2knb", f"VMD-GUEST: ping {KVM_LOCK_HOST} ok")
        net.locked_off(vmd, "10.0.0.1", "10.0.0.2", 10)
        if not lock_drops(vmd, locked_tap):
            raise Failure(f"lock-{locked_tap} dropped nothing: {vmd.l1.sh('nft list ruleset')[1][-1500:]}")
        for name in ("l2klock", "l2knb"):
            expect(vmd.vmctl("stop", "-f", name), 0, r"forced to terminate", "stop -f")
    finally:
        # vmd keeps a bridge that holds an address it did not give.
        vmd.ip("addr", "flush", "dev", net.BRIDGE)


def check_io_thread(vmd, vm_pid):
    """The VM process's virtio I/O thread runs under a filter of its own."""
    threads = vmd.l1.sh(f"grep -HE '^(Name|Seccomp):' /proc/{vm_pid}/task/*/status")[1]
    names = re.findall(r"Name:\s+(\S+)", threads)
    if "virtio-io" not in names or len(re.findall(r"Seccomp:\s+2", threads)) != len(names):
        raise Failure(f"want a filtered virtio-io thread beside the monitor and vcpu0: {threads}")


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


def pause_unpause(vmd, name="l2pause", vmid=None):
    """Pause stops the guest's ticks for at least three tick intervals (as
    measured just before, so a slow machine only widens the window);
    unpause brings them back."""
    if vmid is None:
        vmid, _ = vmd.start(name)
        vmd.vm_pids(vmid)
    vmd.wait_console(name, "VMD-GUEST: tick 2")
    first = time.monotonic()
    vmd.wait_console(name, "VMD-GUEST: tick 3")
    interval = time.monotonic() - first
    expect(vmd.vmctl("pause", name), 0, rf"^vmctl: paused vm {vmid} successfully$", "pause")
    if vmd.state(vmid) != "paused":
        raise Failure(f"status after pause: {vmd.status_row(vmid)}")
    # A tick already on its way out when the vCPU stopped may still arrive.
    before = ticks(vmd.console_log(name))
    time.sleep(max(3.0, 3 * interval))
    after = ticks(vmd.console_log(name))
    if len(after) > len(before) + 1:
        raise Failure(f"ticks while paused: {after[len(before):]} (interval {interval:.1f}s)")
    expect(vmd.vmctl("unpause", name), 0, rf"^vmctl: unpaused vm {vmid} successfully$", "unpause")
    if vmd.state(vmid) != "running":
        raise Failure(f"status after unpause: {vmd.status_row(vmid)}")
    wait_for("ticks to resume", lambda: len(ticks(vmd.console_log(name))) >= len(after) + 2,
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
    VM's uid is left, /dev/kvm is free, the VM shows stopped and vmd's
    parent holds no descriptor of it any more."""
    fd_count = f"ls /proc/{vmd.pid}/fd | wc -l"
    baseline = vmd.l1.check(fd_count).strip()
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
    wait_for(f"vmd's parent back to {baseline} descriptors",
             lambda: vmd.l1.check(fd_count).strip() == baseline, 60)
    if "VM process was killed by SIGKILL" not in vmd.log():
        raise Failure("vmd did not log the VM process's death")


def net_unit_tests(vmd):
    """vmd's unit tests of what this machine's kernel lacks, on L1's
    Debian 6.1 kernel: rdomain's VRF device with its table and a bridge in
    it, vhost-net descriptors, locked-lladdr chains on a kernel before
    6.16 (a chain goes with its device there). Each test makes its own
    network namespace."""
    l1 = vmd.l1
    # L1 has what the tests must take the with-it branch for.
    l1.check("ip link add vrfcheck type vrf table 1099 && ip link del vrfcheck")
    l1.check("test -c /dev/vhost-net")
    filters = "parent::net::links parent::net::vhost parent::net::nft parent::net::tests"
    out = l1.check(f"/usr/libexec/vmd-unit-tests --test-threads=1 {filters} 2>&1", timeout=600)
    passed = [int(n) for n in re.findall(r"test result: ok\. (\d+) passed; 0 failed", out)]
    if len(passed) != 1:
        raise Failure(f"no clean test result: {out[-2000:]}")
    if passed[0] < 10:
        raise Failure(f"only {passed[0]} tests ran: {out[-2000:]}")
    for name in ("a_vrf_or_the_reason_there_is_none", "the_device_opens_or_says_why",
                 "a_locked_tap_drops_and_counts_foreign_frames",
                 "locks_groups_and_rdomains_in_a_netns"):
        # Ran (its log lines may come between the name and its `ok`); the
        # result line above says no test failed.
        if not re.search(rf"^test \S*::{name} \.\.\. ", out, re.M):
            raise Failure(f"{name} did not run: {out[-2000:]}")


def net_case(fn, keep=(), after_exit=None):
    """A regress/net case in L1 (Debian's 6.1 kernel and its bridge and tun
    modules), vmd in L1's own network namespace. Then vmd must exit by
    itself on SIGTERM and leave L1 with no interface but lo and `keep`
    (what the case made) and no state file, then `after_exit(vmd, links)`. Whatever is left
    is removed for the next case."""
    def run(vmd):
        try:
            fn(vmd)
        finally:
            # On failure too: the next case in this L1 starts clean.
            if vmd.alive():
                vmd.signal(vmd.pid, signal.SIGTERM)
                wait_for("vmd to exit after SIGTERM", lambda: not vmd.alive(), 60)
            links = vmd.links()
            for name in links:
                if name != "lo" and name not in keep and name in vmd.links():
                    vmd.ip("link", "delete", name)
        left = {n: link for n, link in links.items() if n != "lo" and n not in keep}
        try:
            if left:
                raise Failure(f"left in L1 after vmd's exit: {net.describe(left)}")
            if vmd.exists(net.state_file(vmd.sock)):
                raise Failure(f"vmd's state file {net.state_file(vmd.sock)} outlived it in L1")
            if after_exit:
                after_exit(vmd, links)
        finally:
            for name in keep:
                if name in vmd.links():
                    vmd.ip("link", "delete", name)
    return run


NET_CONF = "accel kvm\n" + net.SW
VRF_CONF = "accel kvm\n" + net.switch_conf("sw", net.BRIDGE, " rdomain 5\n")


def vrf_vhost_ping(vmd):
    """A switch with `rdomain 5`: its bridge is a port of VRF rdomain5,
    table 1005, which vmd made (and removes at its exit: net_case checks
    L1 is left empty); two guests on it ping each other, and under KVM
    each QEMU holds a /dev/vhost-net descriptor and has vhost=on on its
    -netdev."""
    net.bridge_up(vmd, net.BRIDGE)
    started = net.ping_pair(vmd, (net.vm("va"), net.vm("vb")), "sw")
    links = vmd.links()
    vrf = links.get("rdomain5")
    if not vrf or net.kind(vrf) != "vrf":
        raise Failure(f"no VRF rdomain5: {net.describe(links)}")
    table = vrf.get("linkinfo", {}).get("info_data", {}).get("table")
    if table != 1005:
        raise Failure(f"rdomain5's table is {table}, want 1005")
    if links[net.BRIDGE].get("master") != "rdomain5":
        raise Failure(f"{net.BRIDGE} is a port of {links[net.BRIDGE].get('master')}, want rdomain5")
    for name, vmid in started:
        _, qemu = vmd.vm_pids(vmid)
        args = vmd.cmdline(qemu)
        if not re.search(r"-netdev tap,id=net0,fd=\d+,vhost=on,vhostfd=\d+", args):
            raise Failure(f"{name}'s QEMU has no vhost-net: {args}")
        fds = vmd.l1.sh(f"ls -l /proc/{qemu}/fd")[1]
        if "/dev/vhost-net" not in fds:
            raise Failure(f"{name}'s QEMU holds no /dev/vhost-net: {fds}")

# (name, function, vm.conf lines[, what runs in L1 before vmd starts]);
# every case runs with its own vmd.
CASES = [
    ("accel-kvm-guest-boots-on-kvm", guest_boots_on_kvm, "accel kvm\n"),
    ("accel-auto-picks-kvm-guest-boots", guest_boots_on_kvm, "accel auto\n"),
    ("qemu-vm-uid-kvm-group-no-caps", qemu_credentials, "accel kvm\n"),
    ("pause-unpause-on-kvm", pause_unpause, "accel kvm\n"),
    ("graceful-stop-w-on-kvm", graceful_stop, "accel kvm\n"),
    ("sigkill-vm-process-leaves-nothing", killed_vm_process, "accel kvm\n" + guest_vm_conf("l2kill")),
    ("own-monitor-stock-kernel-boots-console-pty-privsep", own_monitor_boots, KVM_CONF),
    ("own-monitor-console-input-reaches-the-shell", own_monitor_console_input, KVM_CONF),
    ("own-monitor-guest-reboot-restarts-on-same-tty", own_monitor_reboot, KVM_CONF),
    ("own-monitor-guest-poweroff-ends-the-vm", own_monitor_poweroff, KVM_CONF),
    ("own-monitor-stop-w-power-button-powers-off", own_monitor_power_button, KVM_CONF),
    ("own-monitor-ignored-power-button-forced-at-timeout", own_monitor_power_button_ignored, KVM_CONF),
    ("own-monitor-pause-stops-ticks-unpause-resumes", own_monitor_pause_unpause, KVM_CONF),
    ("own-monitor-vcpu-2-guest-sees-two-cpus", own_monitor_two_vcpus, KVM_CONF),
    ("own-monitor-raw-and-qcow2-disks-survive-reboot", own_monitor_disks, ""),
    ("own-monitor-net-local-interface-dhcp-lease-host-pings", net_case(own_monitor_local_lease),
     KVM_NET_CONF),
    ("own-monitor-net-two-guests-on-a-switch-ping", net_case(own_monitor_two_guests_ping), KVM_NET_CONF),
    ("own-monitor-net-locked-lladdr-cuts-off-a-changed-mac", net_case(own_monitor_locked_lladdr), KVM_LOCK_CONF),
    ("net-two-guests-on-a-switch-ping", net_case(net.two_guests_ping), NET_CONF),
    ("net-rdomain-vrf-vhost-net-two-guests-ping", net_case(vrf_vhost_ping), VRF_CONF),
    ("net-sigkill-vm-process-removes-its-tap", net_case(net.tap_cleanup("vm")), NET_CONF),
    ("net-sigkill-qemu-removes-its-tap", net_case(net.tap_cleanup("qemu")), NET_CONF),
    ("net-sigkill-vmd-removes-taps", net_case(net.then_restart(net.tap_cleanup("vmd"))), NET_CONF),
    ("net-two-nics-i-2", net_case(net.two_nics), "accel kvm\n"),
    ("net-reset-switches-recreates-deleted-bridges", net_case(net.reset_switches),
     "accel kvm\n" + net.RESET_CONF),
    ("net-local-interface-dhcp-lease-host-pings", net_case(net.local_lease), "accel kvm\n"),
    ("net-restart-after-sigkill-removes-predecessors-bridge-only",
     net_case(net.restart_after_sigkill, keep=net.RESTART_KEEP), "accel kvm\n" + net.RESTART_CONF,
     net.before_restart),
    ("net-preexisting-bridge-and-foreign-port-survive-exit",
     net_case(net.survivors, keep=net.SURVIVORS_KEEP, after_exit=net.survivors_after_exit),
     "accel kvm\n" + net.SURVIVORS_CONF, net.before_survivors),
    ("net-unit-tests-vrf-vhost-nft-on-6.1", net_unit_tests, ""),
]
# What `make test` runs (regress/run): every case but these regress/net
# cases, to keep the suite near 3 minutes (the QEMU variant of the tap
# cleanup takes the same path as the VM process's); slow cases added later
# go to --all only too (`make regress-nested`).
ALL_ONLY = [name for name, _, _, *_ in CASES
            if name.startswith("net-") and name not in ("net-two-guests-on-a-switch-ping",
                                                        "net-sigkill-vm-process-removes-its-tap",
                                                        "net-sigkill-vmd-removes-taps",
                                                        "net-rdomain-vrf-vhost-net-two-guests-ping",
                                                        "net-unit-tests-vrf-vhost-nft-on-6.1")]
DEFAULT = [name for name, _, _, *_ in CASES if name not in ALL_ONLY]


def main():
    args = sys.argv[1:]
    names = [n for n, _, _, *_ in CASES]
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

    began = time.monotonic()
    l1 = setup()
    if not l1:
        return summary()
    times = [f"L1 boot {l1.boot_seconds:.1f}s"]
    hosts = [l1]

    def in_a_live_l1(name, fn, conf, before=None):
        """The case in L1; if L1 itself stops answering (TCG running nested
        KVM hung once in about ten runs, all of L1 with it), the case runs
        once more in a new L1, saying so. Any other failure stands."""
        def run():
            try:
                in_l1(hosts[-1], fn, conf, before)()
            except Failure as e:
                if not hosts[-1].dead:
                    raise
                print(f"# L1 stopped answering during {name}; a new L1 runs it again: "
                      f"{str(e).splitlines()[0][:300]}", flush=True)
                hosts[-1].stop()
                hosts.append(L1.boot(*nested_build()))
                check_kvm_host(hosts[-1])
                in_l1(hosts[-1], fn, conf, before)()
        return run
    try:
        for name, fn, conf, *before in CASES:
            if name in wanted:
                start = time.monotonic()
                case(name, in_a_live_l1(name, fn, conf, *before))
                times.append(f"{name} {time.monotonic() - start:.1f}s")
    finally:
        hosts[-1].stop()
    times.append(f"total {time.monotonic() - began:.1f}s")
    print(f"# times: {', '.join(times)}")
    return summary()


if __name__ == "__main__":
    sys.exit(main())
