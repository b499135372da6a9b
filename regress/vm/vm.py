#!/usr/bin/env python3
"""regress/vm: real guests under vmd (QEMU, TCG), checked from the outside.

Shared helpers live in regress/lib/vmdregress.py.

Runs as root. Boots the test guest (regress/guest/build: Debian's cloud
kernel and a busybox initramfs whose init prints `VMD-GUEST:` markers and
ticks). Each case starts its own vmd (-d) with its own temp dir, socket,
vm.conf and console log directory, and kills vmd and every QEMU it
started at the end, even on failure.
"""

import errno
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib"))
import vmdregress as t  # noqa: E402
from vmdregress import (BOOT_TIMEOUT, EMPTY_DIR, WAIT_TIMEOUT, Failure, Pty, TestUser, Vmd, case,  # noqa: E402
                        children_of, cmdline, expect, in_passwd, status_of, wait_for, with_vmd)


# --- cases


def boot(vmd):
    vmid, tty = vmd.start("boot1")
    pty = Pty(tty)
    try:
        pty.wait_for(r"^VMD-GUEST: ready$")
        pty.wait_for(r"^VMD-GUEST: tick 2$")
    finally:
        pty.close()
    log = wait_for("the markers in the console log",
                   lambda: "VMD-GUEST: tick 2" in vmd.console_log("boot1") and vmd.console_log("boot1"))
    for marker in ("VMD-GUEST: booted", "VMD-GUEST: ready", "VMD-GUEST: cmdline console=ttyS0 quiet"):
        if marker not in log:
            raise Failure(f"{marker!r} missing from the console log")
    st = os.stat(os.path.join(vmd.console_dir, "boot1.console"))
    if st.st_uid != 0 or st.st_mode & 0o077:
        raise Failure(f"console log owner {st.st_uid} mode {oct(st.st_mode)}: want root, 0600")
    row = vmd.status_row(vmid)
    vm_pid, qemu = vmd.vm_pids(vmid)
    want = {"VCPUS": "1", "MAXMEM": "256M", "TTY": tty.replace("/dev/", ""),
            "STATE": "running", "NAME": "boot1", "OWNER": "root"}
    for col, value in want.items():
        if row.get(col) != value:
            raise Failure(f"status {col} {row.get(col)!r}, want {value!r}: {row}")
    if "vmd: vm boot1" not in cmdline(vm_pid):
        raise Failure(f"status PID {vm_pid} is not the VM process: {cmdline(vm_pid)!r}")
    if not re.match(r"^\d+(\.\d)?[KMG]$", wait_for("CURMEM", lambda: (vmd.status_row(vmid) or {}).get("CURMEM", "-").strip("-") or None)):
        raise Failure(f"CURMEM not a size: {vmd.status_row(vmid)}")


def confined(vmd):
    vmid, _ = vmd.start("conf1")
    vm_pid, qemu = vmd.vm_pids(vmid)
    wait_for("the guest to run", lambda: "VMD-GUEST: ready" in vmd.console_log("conf1"), BOOT_TIMEOUT)
    for what, pid in (("VM process", vm_pid), ("QEMU", qemu)):
        st = status_of(pid)
        uids = st["Uid"].split()
        if "0" in uids or len(set(uids)) != 1:
            raise Failure(f"{what} uids {uids}")
        if in_passwd(int(uids[0])):
            raise Failure(f"{what} uid {uids[0]} is in /etc/passwd")
        for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            if int(st[cap], 16) != 0:
                raise Failure(f"{what} {cap} {st[cap]}")
        if st["NoNewPrivs"] != "1" or st["Seccomp"] != "2":
            raise Failure(f"{what} NoNewPrivs {st['NoNewPrivs']} Seccomp {st['Seccomp']}")
    # Every thread of the VM process runs under a filter (each thread role
    # has its own), not only the thread that installed the first one.
    tasks = os.listdir(f"/proc/{vm_pid}/task")
    if not tasks:
        raise Failure(f"VM process {vm_pid} has no threads in /proc")
    for tid in tasks:
        st = status_of(f"{vm_pid}/task/{tid}")
        if st is not None and (st["Seccomp"] != "2" or st["NoNewPrivs"] != "1"):
            raise Failure(f"VM process thread {tid}: Seccomp {st['Seccomp']} NoNewPrivs {st['NoNewPrivs']}")
    if os.readlink(f"/proc/{vm_pid}/root") != EMPTY_DIR:
        raise Failure(f"VM process root is {os.readlink(f'/proc/{vm_pid}/root')}")
    if status_of(qemu)["Uid"] != status_of(vm_pid)["Uid"]:
        raise Failure("QEMU and the VM process run as different uids")
    if os.getsid(qemu) != qemu:
        raise Failure("QEMU is not in a session of its own")
    if "kvm" in cmdline(qemu).split("-accel ")[1].split()[0]:
        raise Failure(f"accel tcg gave {cmdline(qemu)}")


def own_namespaces(vmd):
    # A file in the host's /tmp that QEMU must not see.
    fd, marker = tempfile.mkstemp(prefix="vmd-regress-ns-", dir="/tmp")
    os.close(fd)
    try:
        vmid, _ = vmd.start("ns1")
        vm_pid, qemu = vmd.vm_pids(vmid)
        wait_for("the guest to run", lambda: "VMD-GUEST: ready" in vmd.console_log("ns1"), BOOT_TIMEOUT)
        for ns in ("net", "ipc", "mnt"):
            mine = os.readlink(f"/proc/{vm_pid}/ns/{ns}")
            theirs = os.readlink(f"/proc/{qemu}/ns/{ns}")
            if mine == theirs or theirs == os.readlink(f"/proc/self/ns/{ns}"):
                raise Failure(f"QEMU shares the {ns} namespace: {theirs}, VM process {mine}")
        with open(f"/proc/{qemu}/net/dev") as f:
            interfaces = [line.split(":")[0].strip() for line in f.readlines()[2:]]
        if interfaces != ["lo"]:
            raise Failure(f"QEMU's network namespace has {interfaces}, want only lo")
        with open(f"/proc/{qemu}/net/route") as f:
            routes = f.readlines()[1:]
        if routes:
            raise Failure(f"QEMU's network namespace has routes: {routes}")
        # From inside its network namespace nothing is reachable, not
        # even the loopback (down).
        probe = ("import socket, sys\n"
                 "for addr in (('192.0.2.1', 9), ('127.0.0.1', 9)):\n"
                 "    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
                 "    try:\n"
                 "        s.connect(addr)\n"
                 "    except OSError as e:\n"
                 "        print(addr[0], e.errno)\n"
                 "    else:\n"
                 "        print(addr[0], 'connected')\n")
        p = subprocess.run(["nsenter", f"--net=/proc/{qemu}/ns/net", "python3", "-c", probe],
                           capture_output=True, text=True, timeout=WAIT_TIMEOUT)
        want = f"192.0.2.1 {errno.ENETUNREACH}\n127.0.0.1 {errno.ENETUNREACH}\n"
        if p.returncode != 0 or p.stdout != want:
            raise Failure(f"AF_INET from QEMU's namespace: exit {p.returncode}: {p.stdout!r} {p.stderr.strip()}")
        # Empty tmpfs of its own on /tmp and /dev/shm, not seen by the host.
        with open(f"/proc/{qemu}/mountinfo") as f:
            mounts = {line.split()[4]: line.split(" - ")[1].split()[0] for line in f}
        for path in ("/tmp", "/dev/shm"):
            if mounts.get(path) != "tmpfs":
                raise Failure(f"QEMU's {path} is {mounts.get(path)!r}, want a tmpfs")
            left = os.listdir(f"/proc/{qemu}/root{path}")
            if left:
                raise Failure(f"QEMU's {path} is not empty: {left}")
        if not os.path.exists(marker):
            raise Failure("the host's /tmp changed")
        with open("/proc/self/mountinfo") as f:
            if any(line.split()[4] == "/tmp" and " - tmpfs " in line and "size=16384k" in line for line in f):
                raise Failure("QEMU's /tmp tmpfs reached the host's mount namespace")
    finally:
        os.unlink(marker)


def own_root(vmd):
    """QEMU's root is its own: /usr read-only, a few devices, its own
    processes only (hidepid, subset=pid), none of the host's /home, /etc,
    /root, /var or /run, and the guest still boots and writes its disk."""
    disk = os.path.join(vmd.dir, "root.img")
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    vmid, _ = vmd.start("root1", "-d", disk, cmdline="console=ttyS0 quiet vmd.diskwrite=vda:OWN-ROOT")
    other, _ = vmd.start("root2")
    vm_pid, qemu = vmd.vm_pids(vmid)
    _, other_qemu = vmd.vm_pids(other)
    wait_for("the guest to write its disk", lambda: "VMD-GUEST: disk vda head OWN-ROOT" in vmd.console_log("root1"),
             BOOT_TIMEOUT)
    with open(disk, "rb") as f:
        if f.read(8) != b"OWN-ROOT":
            raise Failure("the guest's write did not reach the disk image")
    root = f"/proc/{qemu}/root"
    top = sorted(os.listdir(root))
    want = {"dev", "etc", "proc", "tmp", "usr"}
    if not want <= set(top) or set(top) - want - {"bin", "sbin", "lib", "lib32", "lib64", "libx32"}:
        raise Failure(f"QEMU's / holds {top}")
    if os.listdir(f"{root}/etc") != ["ld.so.cache"]:
        raise Failure(f"QEMU's /etc holds {os.listdir(f'{root}/etc')}")
    devices = set(os.listdir(f"{root}/dev"))
    if devices != {"null", "zero", "full", "random", "urandom", "fd", "shm"}:
        raise Failure(f"QEMU's /dev holds {sorted(devices)}")
    with open(f"/proc/{qemu}/mountinfo") as f:
        mounts = {line.split()[4]: line.split()[5].split(",") for line in f}
    for path in ("/", "/usr"):
        if "ro" not in mounts.get(path, []):
            raise Failure(f"QEMU's {path} is mounted {mounts.get(path)}, want read-only")
    # What QEMU's uid sees from inside: its own process and nothing else
    # of /proc.
    uid, gid = status_of(qemu)["Uid"].split()[0], status_of(qemu)["Gid"].split()[0]
    seen = subprocess.run(["nsenter", "-t", str(qemu), "-m", "-r", "-w", "-S", uid, "-G", gid,
                           "/usr/bin/ls", "-a", "/proc"], capture_output=True, text=True, timeout=WAIT_TIMEOUT)
    if seen.returncode != 0:
        raise Failure(f"ls /proc as QEMU: exit {seen.returncode}: {seen.stderr.strip()}")
    pids = {int(e) for e in seen.stdout.split() if e.isdigit()}
    others = set(seen.stdout.split()) - {str(p) for p in pids} - {".", "..", "self", "thread-self"}
    # (ls itself runs as QEMU's uid, so it sees itself too.)
    if qemu not in pids or other_qemu in pids or vmd.proc.pid in pids or vm_pid in pids or len(pids) > 2:
        raise Failure(f"QEMU sees processes {sorted(pids)} (it is {qemu}; the other QEMU {other_qemu})")
    if others:
        raise Failure(f"QEMU's /proc holds {sorted(others)}")
    for path in ("/etc/shadow", "/home", "/root", "/var", "/run"):
        probe = subprocess.run(["nsenter", "-t", str(qemu), "-m", "-r", "-w", "-S", uid, "-G", gid,
                                "/usr/bin/stat", path], capture_output=True, text=True, timeout=WAIT_TIMEOUT)
        if probe.returncode == 0:
            raise Failure(f"QEMU sees {path}: {probe.stdout.strip()}")


def uids_across_daemons():
    """Two daemons with one `uid range` never give two VMs one uid, and
    neither gives a VM a uid a process already runs as."""
    first = 1879050100
    # Five uids, one of them a running process's: four VMs fit.
    conf = f"uid range {first}-{first + 4}\n"
    squatter = subprocess.Popen(["setpriv", f"--reuid={first}", f"--regid={first}", "--clear-groups",
                                 "sleep", "600"])
    a = b = None
    try:
        a = t.Vmd(conf)
        b = t.Vmd(conf)
        uids = []
        for vmd, names in ((a, ("ua1", "ua2")), (b, ("ub1", "ub2"))):
            for name in names:
                vmid, _ = vmd.start(name)
                vm_pid, _ = vmd.vm_pids(vmid)
                uids.append(int(status_of(vm_pid)["Uid"].split()[0]))
        if len(set(uids)) != 4 or first in uids:
            raise Failure(f"two daemons gave uids {uids} (uid {first} is a running process's)")
        # The range is used up: the next start on either is refused.
        rc, out = b.vmctl("start", "ub3", "-b", t.KERNEL, "--initrd", t.INITRD, "-m", "256M")
        if rc == 0 or "no free uid" not in out:
            raise Failure(f"a fifth VM in a range of four: exit {rc}: {out.strip()}")
        # A VM of a's ends: its uid is free for b once its processes are gone.
        freed = uids[0]
        expect(a.vmctl("stop", "-f", "ua1"), 0, r"", "stop -f ua1")
        def b_gets_it():
            rc, out = b.vmctl("start", "ub3", "-b", t.KERNEL, "--initrd", t.INITRD, "-m", "256M")
            return rc == 0 and out
        wait_for("b to start a VM in a's freed uid", b_gets_it)
        row = next(r for r in b.status() if r["NAME"] == "ub3")
        got = int(status_of(int(b.vm_pids(int(row["ID"]))[0]))["Uid"].split()[0])
        if got != freed:
            raise Failure(f"ub3 runs as {got}, want the freed uid {freed}")
    finally:
        squatter.kill()
        squatter.wait()
        for vmd in (a, b):
            if vmd:
                vmd.stop()


def two_vms(vmd):
    a, _ = vmd.start("two1")
    b, _ = vmd.start("two2")
    uids = []
    for vmid in (a, b):
        vm_pid, qemu = vmd.vm_pids(vmid)
        uid = int(status_of(vm_pid)["Uid"].split()[0])
        if int(status_of(qemu)["Uid"].split()[0]) != uid:
            raise Failure(f"vm {vmid}: QEMU uid differs from its VM process")
        if uid == 0 or in_passwd(uid):
            raise Failure(f"vm {vmid} runs as uid {uid}")
        uids.append(uid)
    if uids[0] == uids[1]:
        raise Failure(f"both VMs run as uid {uids[0]}")
    for name in ("two1", "two2"):
        wait_for(f"{name} to boot", lambda: "VMD-GUEST: ready" in vmd.console_log(name), BOOT_TIMEOUT)


def stop_force_and_uid_reuse(vmd):
    vmid, tty = vmd.start("stop1")
    vm_pid, qemu = vmd.vm_pids(vmid)
    uid = status_of(vm_pid)["Uid"].split()[0]
    rc, out = vmd.vmctl("stop", "-f", str(vmid))
    if rc != 0 or not re.search(rf"^stopping vm.*: forced to terminate vm {vmid}$", out, re.M):
        raise Failure(f"stop -f: exit {rc}: {out.strip()}")
    wait_for("the VM process and QEMU to end", lambda: not status_of(vm_pid) and not status_of(qemu))
    row = vmd.status_row(vmid)
    if row is not None and row["STATE"] != "stopped":
        raise Failure(f"after stop -f: {row}")
    vmid2, _ = vmd.start("stop2")
    vm_pid2, _ = vmd.vm_pids(vmid2)
    uid2 = status_of(vm_pid2)["Uid"].split()[0]
    if uid2 != uid:
        raise Failure(f"the stopped VM's uid {uid} was not reused (got {uid2})")


def disk_in_use(vmd):
    disk = os.path.join(vmd.dir, "shared.img")
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", disk, "16M"], check=True)
    vmid, _ = vmd.start("disk1", "-d", disk)
    wait_for("disk1 to see its disk",
             lambda: "VMD-GUEST: disk vda 16777216 bytes rw" in vmd.console_log("disk1"), BOOT_TIMEOUT)
    rc, out = vmd.vmctl("start", "disk2", "-b", t.KERNEL, "-d", disk)
    if rc == 0 or "could not open disk image(s)" not in out:
        raise Failure(f"second VM on a writable disk in use: exit {rc}: {out.strip()}")
    rc, out = vmd.vmctl("stop", "-f", str(vmid))
    wait_for("disk1 to stop", lambda: (vmd.status_row(vmid) or {"STATE": "stopped"})["STATE"] == "stopped")
    # Freed: a new VM may have it.
    wait_for("the disk to be free", lambda: vmd.vmctl("start", "disk3", "-b", t.KERNEL, "--initrd", t.INITRD,
                                                       "-d", disk)[0] == 0)


def qcow2_chain(vmd):
    base = os.path.join(vmd.dir, "base.raw")
    top = os.path.join(vmd.dir, "top.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", base, "32M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", base, top], check=True)
    vmd.start("chain1", "-d", top)
    wait_for("the guest to see the overlay", lambda: "VMD-GUEST: disk vda 33554432 bytes rw" in vmd.console_log("chain1"),
             BOOT_TIMEOUT)
    # The base is locked shared: nobody may write to it now.
    rc, out = vmd.vmctl("start", "chain2", "-b", t.KERNEL, "-d", base)
    if rc == 0 or "in use" not in out:
        raise Failure(f"writable start on a base in use: exit {rc}: {out.strip()}")


def rotation(vmd):
    # Without `quiet` the kernel's boot messages pass the 2K cap at once.
    vmd.start("rot1", cmdline="console=ttyS0")
    wait_for("a rotated log", lambda: vmd.console_log("rot1", ".0"), BOOT_TIMEOUT)
    wait_for("the guest to be ready", lambda: "VMD-GUEST: ready" in vmd.console_log("rot1") + vmd.console_log("rot1", ".0"),
             BOOT_TIMEOUT)
    for suffix in ("", ".0"):
        size = os.path.getsize(os.path.join(vmd.console_dir, f"rot1.console{suffix}"))
        if size > 2048 + 64 * 1024:
            raise Failure(f"rot1.console{suffix} is {size} bytes with a 2K cap")
    extra = [f for f in os.listdir(vmd.console_dir) if f.startswith("rot1.console") and f not in ("rot1.console", "rot1.console.0")]
    if extra:
        raise Failure(f"more than one old copy: {extra}")


def bad_files(vmd):
    # vmctl resolves paths first (a missing one never reaches vmd); these
    # exist but cannot be used.
    directory = os.path.join(vmd.dir, "adir")
    os.mkdir(directory)
    not_qcow2 = os.path.join(vmd.dir, "fake.qcow2")
    with open(not_qcow2, "wb") as f:
        f.write(b"\0" * 65536)
    checks = [
        (("start", "k1", "-b", directory), "could not open kernel"),
        (("start", "k2", "-b", t.KERNEL, "--initrd", directory), "could not open initrd"),
        (("start", "k3", "-b", t.KERNEL, "-d", not_qcow2), "could not open disk image(s)"),
    ]
    for args, message in checks:
        rc, out = vmd.vmctl(*args)
        if rc == 0 or message not in out:
            raise Failure(f"vmctl {' '.join(args)}: exit {rc}: {out.strip()}; want {message!r}")


def oversized_boot_file(vmd):
    # A sparse 2G initrd: vmd refuses to load it into memory, naming it,
    # before any process starts.
    big = os.path.join(vmd.dir, "huge.initrd")
    with open(big, "wb") as f:
        f.truncate(2 << 30)
    rc, out = vmd.vmctl("start", "huge1", "-b", t.KERNEL, "--initrd", big)
    want = f"initrd {big} is larger than 1.0G, the most vmd loads"
    if rc == 0 or want not in out:
        raise Failure(f"start: exit {rc}, expected {want!r}: {out.strip()}")
    if vmd.status():
        raise Failure(f"the refused VM is listed: {vmd.status()}")


def unbuilt_options(vmd):
    # Interfaces work (regress/net tests them in a network namespace of
    # their own); a switch vm.conf does not define, and -B net without a
    # local interface (whose lease would name auto_install), are refused.
    for opts, why in ((("-n", "sw"), 'switch "sw" not found: define it in vm.conf'),
                      (("-B", "net"), "boot device net needs a local interface")):
        rc, out = vmd.vmctl("start", "u1", "-b", t.KERNEL, *opts)
        if rc == 0 or why not in out:
            raise Failure(f"start {' '.join(opts)}: exit {rc}, expected {why!r}: {out.strip()}")
    if vmd.status():
        raise Failure(f"a refused VM is listed: {vmd.status()}")


def guest_poweroff_stops_the_vm(vmd):
    vmid, _ = vmd.start("off1", cmdline="console=ttyS0 quiet vmd.action=poweroff-after-1s")
    vm_pid, qemu = vmd.vm_pids(vmid)
    wait_for("the VM to stop after the guest powered off",
             lambda: not status_of(vm_pid) and not status_of(qemu), BOOT_TIMEOUT)
    wait_for("status to show it gone", lambda: (vmd.status_row(vmid) or {"STATE": "stopped"})["STATE"] == "stopped")


def started_once_the_guest_runs(vmd):
    # vmctl's "started" comes only after QEMU ran `cont`: CURMEM (QEMU's
    # resident memory) is known from that moment, and vmd logs the
    # success after the VM process said the guest runs.
    vmid, _ = vmd.start("run1")
    row = vmd.status_row(vmid)
    if not row or row["STATE"] != "running" or row["CURMEM"] == "-":
        raise Failure(f"right after the start: {row}")
    log = vmd.log()
    running = log.find("vm run1: guest running")
    started = log.find(f"started run1 (vm {vmid}) successfully")
    if running < 0 or started < running:
        raise Failure(f"the success is not logged after the guest runs:\n{log}")


def corrupt_qcow2(path, owner=None):
    """A qcow2 image from vmctl create with its `corrupt` incompatible
    feature bit set: vmd's reader accepts it (the bit concerns writers),
    QEMU refuses to open it for writing."""
    p = subprocess.run([t.VMCTL, "create", path, "-s", "16M"], capture_output=True, text=True)
    if p.returncode != 0:
        raise Failure(f"vmctl create {path}: {p.stderr.strip()}")
    with open(path, "r+b") as f:
        f.seek(72)
        f.write(struct.pack(">Q", 2))
    if owner:
        os.chown(path, owner.uid, owner.gid)
        os.chmod(path, 0o600)


# vmd's refusal of memory beyond what the host allows VMs (its sizes
# as common/src/size.rs formats them).
SIZE = r"\d+(\.\d)?[BKMGT]"
HOST_RULE = (rf"1\.0T of memory and {SIZE} running exceed what this host allows VMs "
             rf"\({SIZE} of {SIZE}; see vm\.conf\(5\) LIMITS\)$")


def start_failures(vmd, files, user=None, template=()):
    """Each start QEMU refuses fails with exit 1 and QEMU's reason on
    vmctl's stderr (which a user who cannot read vmd's log needs), never
    says `started`, attaches no console with -c, and leaves nothing
    listed."""
    kernel, initrd, disk = files
    boot = ("-b", kernel, "--initrd", initrd)
    qemu = (
        ("fdisk", (*boot, "-m", "256M", "-d", disk),
         "disk 1: qcow2: Image is corrupt; cannot be opened read/write"),
        ("fmem", (*boot, "-m", "1500K"), "initrd is too large"),
        ("finitrd", ("-b", initrd, "--initrd", initrd, "-m", "256M"),
         "linux kernel too old to load a ram disk"),
    )
    failures = [(name, args, rf"vm {name}: QEMU: {re.escape(reason)}") for name, args, reason in qemu]
    # More memory than the host has never reaches QEMU (vm.conf(5) LIMITS).
    failures += [(name, (*opt, *boot, "-m", "1T"), rf"vm {name}: {HOST_RULE}")
                 for name, opt in (("fhuge", ()), ("fconsole", ("-c",)))]
    for name, args, reason in failures:
        rc, out = vmd.vmctl("start", name, *template, *args, user=user)
        want = rf"^vmctl: start vm command failed: {reason}"
        if rc != 1 or not re.search(want, out, re.M) or "started" in out or "Connected" in out:
            raise Failure(f"start {name}: exit {rc}, want 1 and {reason!r}: {out.strip()!r}")
        if name in {row["NAME"] for row in vmd.status()}:
            raise Failure(f"{name} is still listed after its start failed: {vmd.status()}")


def start_failures_as_root(vmd):
    files = (t.KERNEL, t.INITRD, os.path.join(vmd.dir, "corrupt.qcow2"))
    corrupt_qcow2(files[2])
    start_failures(vmd, files)
    # A configured VM whose start fails stays listed, stopped.
    disk = os.path.join(vmd.dir, "cfg.qcow2")
    corrupt_qcow2(disk)
    conf = os.path.join(vmd.dir, "bad.conf")
    with open(conf, "w") as f:
        f.write(f'vm "cfgbad" {{\n\tdisable\n\tmemory 256M\n\tboot "{t.KERNEL}"\n'
                f'\tinitrd "{t.INITRD}"\n\tdisk "{disk}"\n}}\n')
    rc, out = vmd.vmctl("load", conf)
    if rc != 0:
        raise Failure(f"load {conf}: exit {rc}: {out.strip()}")
    rc, out = vmd.vmctl("start", "cfgbad")
    if rc != 1 or "vm cfgbad: QEMU: disk 1: qcow2: Image is corrupt" not in out:
        raise Failure(f"start cfgbad: exit {rc}: {out.strip()!r}")
    row = [r for r in vmd.status() if r["NAME"] == "cfgbad"]
    if not row or row[0]["STATE"] != "stopped":
        raise Failure(f"cfgbad after its failed start: {row}")


def user_template_vmd(user):
    """A vmd whose socket `user` may use, with a template "tpl" from which
    it may start instances with its own boot files and disks."""
    conf = (f"socket owner :{user.name}\n"
            f'vm "tpl" {{\n\tdisable\n\tmemory 256M\n'
            f"\tallow instance {{ boot, disk, memory, owner {user.name} }}\n}}\n")
    vmd = Vmd(conf_extra=conf)
    os.chmod(vmd.dir, 0o711)
    return vmd


def start_failures_as_a_user():
    user = TestUser("vmdstart")
    vmd = None
    try:
        vmd = user_template_vmd(user)
        # The user's own copies of the guest and a broken disk of its own.
        files = os.path.join(vmd.dir, "files")
        os.mkdir(files)
        os.chmod(files, 0o755)
        kernel, initrd = os.path.join(files, "vmlinuz"), os.path.join(files, "initrd.gz")
        for src, dst in ((t.KERNEL, kernel), (t.INITRD, initrd)):
            shutil.copyfile(src, dst)
            os.chown(dst, user.uid, user.gid)
        disk = os.path.join(files, "corrupt.qcow2")
        corrupt_qcow2(disk, owner=user)
        start_failures(vmd, (kernel, initrd, disk), user=user.name, template=("-t", "tpl"))
    finally:
        if vmd:
            vmd.stop()
        user.remove()


def limits_hold_for_a_user():
    """vm.conf(5) LIMITS: memory beyond what the host allows VMs is
    refused with what was asked, what runs and what the host allows;
    a user's `limit user` holds (VMs, then memory after a reload) while
    root goes past it; an ended instance's console log is removed."""
    user = TestUser("vmdlimit")
    vmd = None
    try:
        template = (f'socket owner :{user.name}\n'
                    f'vm "tpl" {{\n\tdisable\n\tmemory 256M\n\tboot "{t.KERNEL}"\n\tinitrd "{t.INITRD}"\n'
                    f'\tcmdline "console=ttyS0 quiet"\n'
                    f"\tallow instance {{ memory, owner {user.name} }}\n}}\n")
        limit = f'limit user "{user.name}" {{ vms 1 }}\n'
        vmd = Vmd(conf_extra=limit + template, keep_logs=False, dir_mode=0o711)
        with open("/proc/meminfo") as f:
            total_kb = int(re.search(r"^MemTotal:\s+(\d+) kB$", f.read(), re.M).group(1))
        # A little more than the host has: refused by vmd, as root too.
        asked_g = total_kb // (1 << 20) + 1
        rc, out = vmd.vmctl("start", "big", "-t", "tpl", "-m", f"{asked_g}G")
        want = (rf"^vmctl: start vm command failed: vm big: {asked_g}\.0G of memory and 0B running exceed "
                rf"what this host allows VMs \({SIZE} of {SIZE}; see vm\.conf\(5\) LIMITS\)$")
        if rc != 1 or not re.search(want, out, re.M):
            raise Failure(f"start big: exit {rc}, want 1 and {want!r}: {out.strip()!r}")
        if "big" in {row["NAME"] for row in vmd.status()}:
            raise Failure(f"big is listed after its refusal: {vmd.status()}")
        # The user's one VM runs; a second is refused by its limit.
        vmd.start_with("u1", "-t", "tpl", user=user.name)
        rc, out = vmd.vmctl("start", "u2", "-t", "tpl", user=user.name)
        want = f'vmctl: start vm command failed: vm u2: user {user.name} may run at most 1 VMs (vm.conf: limit user "{user.name}")'
        if rc != 1 or want not in out:
            raise Failure(f"start u2 as {user.name}: exit {rc}, want 1 and {want!r}: {out.strip()!r}")
        # A reload: two VMs but 384M in all; u1 runs 256M.
        vmd.write_config(f'accel tcg\nconsole log "{vmd.console_dir}"\n'
                         f'limit user "{user.name}" {{ vms 2, memory 384M }}\n{template}')
        rc, out = vmd.vmctl("reload")
        if rc != 0:
            raise Failure(f"reload: exit {rc}: {out.strip()}")
        rc, out = vmd.vmctl("start", "u2", "-t", "tpl", user=user.name)
        want = (f"vm u2: user {user.name} may use at most 384M of memory, 256M running "
                f'(vm.conf: limit user "{user.name}")')
        if rc != 1 or want not in out:
            raise Failure(f"start u2 after the reload: exit {rc}, want 1 and {want!r}: {out.strip()!r}")
        # Root is not limited by the user's VMs.
        vmd.start_with("r1", "-t", "tpl")
        # The user's instance ends: it leaves the list, and its console
        # log goes with it; root's runs on with its own.
        log = os.path.join(vmd.console_dir, "u1.console")
        if not os.path.exists(log):
            raise Failure(f"{log} missing while u1 runs")
        rc, out = vmd.vmctl("stop", "-f", "u1", user=user.name)
        if rc != 0:
            raise Failure(f"stop -f u1: exit {rc}: {out.strip()}")
        wait_for("u1 to be gone", lambda: "u1" not in {r["NAME"] for r in vmd.status()})
        wait_for("u1's console log to be removed", lambda: not os.path.exists(log))
        if not os.path.exists(os.path.join(vmd.console_dir, "r1.console")):
            raise Failure("r1's console log is gone while r1 runs")
    finally:
        if vmd:
            vmd.stop()
        user.remove()


# vmd's VM_START_TIMEOUT (common/src/ctl.rs).
START_TIMEOUT = 40


def vm_process_of(vmd, name):
    """The pid of VM `name`'s process (a child of vmd), if it exists."""
    for pid in children_of(vmd.proc.pid):
        argv = cmdline(pid)
        if f"vmd: vm {name}" in argv or ("-P vm" in argv and f"-N {name}" in argv):
            return pid
    return None


def start_timeout_stops_the_vm(vmd):
    # A VM process frozen before its guest runs (SIGSTOP as soon as it
    # exists): the start is answered with a time-out after START_TIMEOUT
    # seconds, the VM is stopped and not listed. The freeze must come
    # before QEMU's `cont`; if the guest already ran, try again.
    for attempt in range(5):
        name = f"slow{attempt}"
        client = vmd.vmctl_background("start", name, "-b", t.KERNEL, "--initrd", t.INITRD, "-m", "256M")
        vm_pid = None
        while vm_pid is None and client.poll() is None:
            vm_pid = vm_process_of(vmd, name)
        if vm_pid is not None:
            os.kill(vm_pid, signal.SIGSTOP)
            vmd.tracked.add(vm_pid)
        out, _ = client.communicate(timeout=START_TIMEOUT + 30)
        if "started" in out:
            vmd.vmctl("stop", "-f", name)
            continue
        want = rf"^vmctl: start vm command failed: vm \d+ did not start within {START_TIMEOUT} seconds; it was stopped$"
        if client.returncode != 1 or not re.search(want, out, re.M):
            raise Failure(f"start {name}: exit {client.returncode}: {out.strip()!r}")
        wait_for(f"{name} to be gone", lambda: name not in {r["NAME"] for r in vmd.status()})
        if status_of(vm_pid):
            raise Failure(f"the VM process {vm_pid} still exists")
        return
    raise Failure("the guest ran before its VM process could be frozen, 5 times")


# vmd's OPEN_TIMEOUT (vmd/src/parent/userfiles.rs): how long a user's
# file-opening helper has.
OPEN_TIMEOUT = 10


def descendants_of(pid):
    """Every process under `pid` (its children, theirs...)."""
    found, todo = [], [pid]
    while todo:
        kids = children_of(todo.pop())
        found += kids
        todo += kids
    return found


def hung_in_fuse_open(vmd, uid):
    """A process under vmd running as `uid` that waits for a FUSE answer
    (the user's file-opening helper, stuck in its open), or None."""
    for pid in descendants_of(vmd.proc.pid):
        st = status_of(pid)
        if not st or st["Uid"].split()[0] != str(uid):
            continue
        try:
            with open(f"/proc/{pid}/wchan") as f:
                if f.read().strip() == "request_wait_answer":
                    return pid
        except OSError:
            pass
    return None


def hung_file_system_stalls_only_its_start():
    # A user names a disk on a FUSE file system whose daemon is stopped
    # (bindfs, SIGSTOPped after a stat cached the file's attributes, so
    # that only an open hangs). Only that start waits: while its helper
    # hangs in open(), other clients' `vmctl status` is answered, and
    # the start fails with the helper's time-out when its deadline passes.
    # Then root loads a vm.conf from there: the same.
    if not shutil.which("bindfs"):
        raise t.Skip("bindfs is not installed (regress/setup installs it)")
    user = TestUser("vmdhang")
    vmd = bindfs = mnt = None
    try:
        vmd = user_template_vmd(user)
        files, src, mnt = (os.path.join(vmd.dir, d) for d in ("files", "src", "mnt"))
        for d in (files, src, mnt):
            os.mkdir(d)
            os.chmod(d, 0o755)
        kernel, initrd = os.path.join(files, "vmlinuz"), os.path.join(files, "initrd.gz")
        for path, copy in ((t.KERNEL, kernel), (t.INITRD, initrd)):
            shutil.copyfile(path, copy)
            os.chown(copy, user.uid, user.gid)
        with open(os.path.join(src, "disk.img"), "wb") as f:
            f.truncate(1 << 20)
        os.chown(os.path.join(src, "disk.img"), user.uid, user.gid)
        with open(os.path.join(src, "more.conf"), "w") as f:
            f.write('vm "more" {\n\tdisable\n\tmemory 256M\n}\n')
        bindfs = subprocess.Popen(["bindfs", "-f", "-o", "allow_other", src, mnt],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        wait_for("the bindfs mount", lambda: os.path.ismount(mnt) or bindfs.poll() is not None)
        if bindfs.poll() is not None:
            raise Failure(f"bindfs exited with {bindfs.returncode}")
        disk, conf = os.path.join(mnt, "disk.img"), os.path.join(mnt, "more.conf")
        os.stat(disk)
        os.stat(conf)
        os.kill(bindfs.pid, signal.SIGSTOP)
        client = subprocess.Popen([t.VMCTL, "-s", vmd.sock, "start", "stuck", "-t", "tpl", "-b", kernel,
                                   "--initrd", initrd, "-d", disk],
                                  user=user.uid, group=user.gid, extra_groups=[],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        helper = wait_for("the user's helper to hang in its open",
                          lambda: hung_in_fuse_open(vmd, user.uid) or client.poll() is not None, 20)
        if client.poll() is not None:
            raise Failure(f"the start ended before its open hung: {client.communicate()[0].strip()!r}")
        # Other clients, while that start waits: answered, and before it.
        for _ in range(3):
            rc, out = vmd.vmctl("status", timeout=OPEN_TIMEOUT / 2)
            if rc != 0 or "stuck" not in out:
                raise Failure(f"status while a start hangs: exit {rc}: {out.strip()!r}")
            if client.poll() is not None:
                raise Failure("status was answered only once the hung start was")
        if status_of(helper) is None:
            raise Failure(f"the helper {helper} is gone before its deadline")
        out, _ = client.communicate(timeout=OPEN_TIMEOUT + 60)
        want = rf"opening files as uid {user.uid}: no answer within {OPEN_TIMEOUT}s"
        if client.returncode != 1 or not re.search(want, out):
            raise Failure(f"the hung start: exit {client.returncode}: {out.strip()!r}")
        wait_for("the helper to be gone", lambda: status_of(helper) is None)
        rc, out = vmd.vmctl("status")
        if rc != 0 or "stuck" in out:
            raise Failure(f"status after the hung start: exit {rc}: {out.strip()!r}")
        load = vmd.vmctl_background("load", conf)
        wait_for("the load's helper to hang in its open",
                 lambda: hung_in_fuse_open(vmd, 0) or load.poll() is not None, 20)
        if load.poll() is not None:
            raise Failure(f"the load ended before its open hung: {load.communicate()[0].strip()!r}")
        rc, out = vmd.vmctl("status", timeout=OPEN_TIMEOUT / 2)
        if rc != 0 or load.poll() is not None:
            raise Failure(f"status while a load hangs: exit {rc}: {out.strip()!r}, load done: {load.poll()}")
        out, _ = load.communicate(timeout=OPEN_TIMEOUT + 60)
        want = rf"reading {re.escape(conf)}: no answer within {OPEN_TIMEOUT}s"
        if load.returncode != 1 or not re.search(want, out):
            raise Failure(f"the hung load: exit {load.returncode}: {out.strip()!r}")
    finally:
        if bindfs:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(bindfs.pid, sig)
                except ProcessLookupError:
                    pass
            bindfs.wait()
        if mnt:
            subprocess.run(["umount", "-l", mnt], capture_output=True)
        if vmd:
            vmd.stop()
        user.remove()


def main():
    if not t.prepare():
        return 1

    case("boot-markers-reach-pty-and-log", with_vmd(boot))
    case("vm-process-and-qemu-confined", with_vmd(confined))
    case("qemu-in-namespaces-of-its-own", with_vmd(own_namespaces))
    case("qemu-sees-a-root-of-its-own", with_vmd(own_root))
    case("two-vms-two-uids", with_vmd(two_vms))
    case("two-daemons-one-uid-range-never-share-a-uid", uids_across_daemons)
    case("stop-force-and-uid-reuse", with_vmd(stop_force_and_uid_reuse))
    case("writable-disk-in-use-refused", with_vmd(disk_in_use))
    case("qcow2-chain-and-shared-base-lock", with_vmd(qcow2_chain))
    case("console-log-rotates", with_vmd(rotation, log_size="2K"))
    case("missing-files-refused", with_vmd(bad_files))
    case("oversized-boot-file-refused", with_vmd(oversized_boot_file))
    case("unbuilt-options-refused", with_vmd(unbuilt_options))
    case("guest-poweroff-stops-vm", with_vmd(guest_poweroff_stops_the_vm))
    case("start-answered-once-the-guest-runs", with_vmd(started_once_the_guest_runs))
    case("start-refused-by-qemu-says-why-exit-1", with_vmd(start_failures_as_root))
    case("start-refused-by-qemu-says-why-to-a-user", start_failures_as_a_user)
    case("start-not-running-in-time-times-out-and-stops", with_vmd(start_timeout_stops_the_vm))
    case("hung-file-system-stalls-only-its-start", hung_file_system_stalls_only_its_start)
    case("limits-of-the-host-and-of-a-user", limits_hold_for_a_user)
    return t.summary()


if __name__ == "__main__":
    sys.exit(main())
