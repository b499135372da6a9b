#!/usr/bin/env python3
"""`make bench-nested`: start to the test guest's first console line with
`accel kvm`, vmd against bare QEMU with the same arguments, inside the
nested KVM host of regress/nested (L1: real KVM, emulated by TCG here);
and vmd's own monitor (`backend kvm`) against vmd's QEMU backend (`accel
kvm`): start to the first console line, the memory the VM's processes
hold beyond the guest's own (RSS minus the guest RAM mapping's RSS), a
raw disk's sequential write and read with direct I/O (section 7) and the
guest's TCP throughput to L1 (section 8), both timed by the guest
(`vmd.bench`, regress/guest/README.md).

    regress/bench --nested [--quick]

Times are taken inside L1 (/proc/uptime, 10 ms steps), alternating vmd
and bare QEMU runs. As root. Writes target/bench/bench-nested-DATE.txt.
"""

import os
import re
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as c  # noqa: E402
from common import CannotRun, Row, log  # noqa: E402

sys.path.insert(0, os.path.join(c.REGRESS, "lib"))
sys.path.insert(0, os.path.join(c.REGRESS, "nested"))
sys.path.insert(0, os.path.join(c.REGRESS, "net"))
import l1 as L  # noqa: E402
import net  # noqa: E402

TIMEOUT = L.L2_BOOT_TIMEOUT
# Section 7: MiB written, then read, with direct I/O on a raw image in
# L1's /tmp (a tmpfs: the "disk" is L1's memory, the path is all virtio).
DISK_MIB = 256
DISK_IMAGE = "/tmp/bench-disk.img"
DISK_SECTION = "7 block in L1: virtio-blk on virtio-mmio | virtio-blk-pci, raw image (nested: ratios only)"
# Section 8: MiB the guest sends to a listener on the switch's bridge in L1.
NET_MIB = 8
NET_PORT = 5001
# The listener's fifos, its count and its pids in L1 (/tmp/bench-listen.*).
LISTENER = "/tmp/bench-listen"
GUEST_IP, HOST_IP = "10.0.0.1", "10.0.0.2"
NIC = ' interface { switch "sw" }\n'


def uptime_script(body):
    """A script that prints the seconds between `$t0` and `$t1` it sets."""
    return f"""
up() {{ cut -d' ' -f1 /proc/uptime; }}
count() {{ n=$(grep -c "$1" "$2" 2>/dev/null); echo "${{n:-0}}"; }}
deadline() {{ awk -v now="$(up)" -v t0="$t0" 'BEGIN {{ exit !(now - t0 > {TIMEOUT}) }}'; }}
{body}
echo "TIMES $t0 $t1"
"""


def elapsed(out):
    for line in out.splitlines():
        if line.startswith("TIMES "):
            _, t0, t1 = line.split()
            return float(t1) - float(t0)
    raise CannotRun(f"no times from L1: {out[-800:]}")


def run_vmd(l1, vmd, name, marker=c.MARKER):
    """vmctl start NAME in L1 until the guest prints `marker` (its first
    line unless told); seconds."""
    log_path = f"{vmd.console_dir}/{name}.console"
    q = shlex.quote
    out = l1.check(uptime_script(f"""
before=$(count {q(marker)} {q(log_path)})
t0=$(up)
vmctl -s {q(vmd.sock)} start {q(name)} >/tmp/bench-start.out 2>&1 &
while [ "$(count {q(marker)} {q(log_path)})" -le "$before" ]; do
    if deadline; then
        echo "no {marker!r} after {TIMEOUT}s"; cat /tmp/bench-start.out; tail -20 {q(log_path)}; exit 1
    fi
    sleep 0.02
done
t1=$(up)
wait $! || {{ echo "vmctl start failed"; cat /tmp/bench-start.out; exit 1; }}
"""), TIMEOUT + 60)
    return elapsed(out)


def run_bare(l1, argv):
    q = shlex.quote
    serial = "/tmp/bench-bare.serial"
    args = " ".join(q(a) for a in c.bare_argv(argv, L.GUEST_KERNEL, L.GUEST_INITRD, serial, "bare"))
    out = l1.check(uptime_script(f"""
rm -f {serial}
t0=$(up)
{args} >/tmp/bench-bare.out 2>&1 &
qemu=$!
while ! grep -q {q(c.MARKER)} {serial} 2>/dev/null; do
    if ! kill -0 $qemu 2>/dev/null || deadline; then echo "bare QEMU: no marker"; cat /tmp/bench-bare.out; exit 1; fi
    sleep 0.02
done
t1=$(up)
kill -9 $qemu; wait $qemu
"""), TIMEOUT + 60)
    return elapsed(out)


def overhead_mib(l1, vmd, name):
    """The memory VM `name`'s processes hold beyond what the guest
    touched, MiB: the RSS of the VM process (and of its QEMU, if any)
    minus the RSS of the guest's RAM, each process's largest mapping
    (256M here: nothing else of a VM process or QEMU comes near)."""
    row = next((r for r in vmd.status() if r.get("NAME") == name), None)
    if not row or row.get("PID", "-") == "-":
        raise CannotRun(f"{name} has no VM process in vmctl status: {row}")
    vm_pid = int(row["PID"])
    pids = [vm_pid] + [int(pid) for pid, st in vmd.processes().items() if st.get("PPid") == str(vm_pid)]
    total_kib = 0
    for pid in pids:
        # smaps: "Size:" then "Rss:" per mapping; the largest mapping's Rss
        # is the guest's, the rest the monitor's.
        out = l1.check(f"awk '/^Size:/ {{s=$2}} /^Rss:/ {{print s, $2}}' /proc/{pid}/smaps")
        maps = [tuple(int(x) for x in line.split()) for line in out.splitlines() if line.strip()]
        if not maps:
            raise CannotRun(f"no mappings in /proc/{pid}/smaps")
        guest = max(maps)
        total_kib += sum(rss for _, rss in maps) - guest[1]
    return total_kib / 1024


def qemu_argv(l1, vmd, name):
    """The arguments vmd gave the QEMU of VM `name` in L1."""
    rows = vmd.status()
    row = next((r for r in rows if r.get("NAME") == name), None)
    if not row:
        raise CannotRun(f"{name} not in vmctl status: {rows}")
    _, qemu = vmd.vm_pids(int(row["ID"]))
    argv = l1.check(f"tr '\\0' '\\n' </proc/{qemu}/cmdline").splitlines()
    if not argv or "kvm" not in argv:
        raise CannotRun(f"vmd's QEMU in L1 does not use KVM: {argv}")
    return argv


def guest_bench(l1, vmd, name, pattern, qemu_has=None):
    """Starts VM `name`, whose guest runs its `vmd.bench` before `ready`,
    and waits for `ready`; checks that vmd's QEMU has `qemu_has` in its
    arguments (if given: the device or netdev the row compares with), then
    stops every VM. The guest's bench lines matching `pattern` (a regex
    without groups), in order, as MB/s."""
    run_vmd(l1, vmd, name, c.READY)
    log_text = vmd.console_log(name)
    if qemu_has:
        argv = qemu_argv(l1, vmd, name)
        if not any(qemu_has in a for a in argv):
            raise CannotRun(f"vmd's QEMU for {name} has no {qemu_has!r}: {' '.join(argv)}")
        log(f"vmd's QEMU for {name}: {' '.join(argv)}")
    vmd.vmctl("stop", "-a", "-f", "-w")
    found = re.findall(rf"^VMD-GUEST: bench (?:{pattern}) (\d+) MiB ([0-9.]+) s\r?$", log_text, re.M)
    if not found:
        lines = [line for line in log_text.splitlines() if "VMD-GUEST: bench" in line or "VMD-GUEST: bad" in line]
        raise CannotRun(f"{name}: no bench line matching {pattern!r} on its console: "
                        f"{chr(10).join(lines) or log_text[-1500:]}")
    return [rate(int(mib), float(secs)) for mib, secs in found]


def rate(mib, secs):
    """MB/s (10^6 bytes a second) of `mib` MiB in `secs` seconds."""
    if secs <= 0:
        raise CannotRun(f"{mib} MiB in {secs}s: the guest's clock did not move")
    return mib * 1048576 / secs / 1e6


def disk_run(l1, vmd, name, qemu_has=None):
    """Section 7: the guest's sequential write, then read, of DISK_MIB
    with direct I/O on its raw vda: (write MB/s, read MB/s)."""
    found = guest_bench(l1, vmd, name, "disk vda write|disk vda read", qemu_has)
    if len(found) != 2:
        raise CannotRun(f"{name}: want a write and a read line, got {len(found)}")
    return found


def net_run(l1, vmd, name, qemu_has=None):
    """Section 8: the guest sends NET_MIB with busybox nc to a listener on
    the switch's bridge in L1 (busybox nc, its stdin a fifo held open by a
    sleep: at EOF on stdin busybox nc would end the connection), which
    counts what it got; MB/s, as the guest timed it."""
    f = LISTENER
    l1.check(f"""
rm -f {f}.in {f}.out {f}.count {f}.pids
mkfifo {f}.in {f}.out
sleep 3600 >{f}.in </dev/null 2>/dev/null & echo $! >>{f}.pids
nc -l -p {NET_PORT} <{f}.in >{f}.out 2>/dev/null & echo $! >>{f}.pids
wc -c <{f}.out >{f}.count 2>/dev/null & echo $! >>{f}.pids
""")
    try:
        (mbs,) = guest_bench(l1, vmd, name, re.escape(f"net {HOST_IP}:{NET_PORT} send"), qemu_has)
        got = l1.check(f"""
i=0
while [ ! -s {f}.count ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
cat {f}.count
""").strip()
        if got != str(NET_MIB << 20):
            raise CannotRun(f"{name}: the listener in L1 got {got or 'nothing'} bytes, "
                            f"the guest sent {NET_MIB << 20}")
        return mbs
    finally:
        l1.sh(f"kill $(cat {f}.pids) 2>/dev/null; rm -f {f}.in {f}.out {f}.count {f}.pids")


def main():
    quick = "--quick" in sys.argv[1:]
    pairs = 1 if quick else 5
    started = time.monotonic()
    title = f"make bench-nested: vmd against bare QEMU under KVM in the nested KVM host, {c.machine_line()}"
    l1 = L.setup()
    if not l1:
        print("regress/bench: cannot run: the nested KVM host did not come up (above)", file=sys.stderr)
        return 1
    vmd = None
    # Runs rotate over three VMs: vmd refuses a third start of one VM
    # within 6 s of the previous (its start rate limit).
    names = [f"bn{os.getpid()}v{i}" for i in range(3)]
    own = [f"bn{os.getpid()}k{i}" for i in range(3)]
    try:
        # Sections 7 and 8: a VM of each backend per run, each run's own.
        disks = [(f"bn{os.getpid()}dq{i}", f"bn{os.getpid()}dk{i}") for i in range(pairs)]
        nets = [(f"bn{os.getpid()}nq{i}", f"bn{os.getpid()}nk{i}") for i in range(pairs)]
        disk_cmdline = f"{L.GUEST_CMDLINE} vmd.bench=disk:vda:{DISK_MIB}"
        net_cmdline = f"{L.GUEST_CMDLINE} vmd.ip={GUEST_IP}/24 vmd.bench=net:{HOST_IP}:{NET_PORT}:{NET_MIB}"
        conf = ("accel kvm\n" + net.switch_conf("sw", net.BRIDGE)
                + "".join(L.guest_vm_conf(n, backend_kvm=n in own) for n in names + own)
                + "".join(L.guest_vm_conf(n, disk_cmdline, f' disk "{DISK_IMAGE}"\n', n == k)
                          for q, k in disks for n in (q, k))
                + "".join(L.guest_vm_conf(n, net_cmdline, NIC, n == k) for q, k in nets for n in (q, k)))
        # Written in full: neither side's first write pays for L1's tmpfs
        # allocating the image's pages.
        l1.check(f"dd if=/dev/zero of={DISK_IMAGE} bs=1M count={DISK_MIB} 2>&1", 600)
        try:
            vmd = L.L1Vmd(l1, conf)
            net.bridge_up(vmd, net.BRIDGE)
            vmd.ip("addr", "add", f"{HOST_IP}/24", "dev", net.BRIDGE)
        except L.Failure as e:
            raise CannotRun(f"vmd did not start in L1: {e}")
        ours, theirs = [], []
        own_start, qemu_start, own_mem, qemu_mem = [], [], [], []
        template = None
        for i in range(pairs):
            log(f"run {i + 1} of {pairs}: vmd")
            name = names[i % len(names)]
            ours.append(run_vmd(l1, vmd, name))
            qemu_start.append(ours[-1])
            qemu_mem.append(overhead_mib(l1, vmd, name))
            if template is None:
                template = qemu_argv(l1, vmd, name)
                log("vmd's QEMU in L1: " + " ".join(template))
            vmd.vmctl("stop", "-a", "-f", "-w")
            log(f"run {i + 1} of {pairs}: bare QEMU")
            theirs.append(run_bare(l1, template))
            log(f"run {i + 1} of {pairs}: vmd, backend kvm")
            name = own[i % len(own)]
            own_start.append(run_vmd(l1, vmd, name))
            own_mem.append(overhead_mib(l1, vmd, name))
            vmd.vmctl("stop", "-a", "-f", "-w")
        own_write, own_read, qemu_write, qemu_read, own_net, qemu_net = [], [], [], [], [], []
        for i, ((dq, dk), (nq, nk)) in enumerate(zip(disks, nets)):
            log(f"run {i + 1} of {pairs}: disk, backend qemu")
            w, r = disk_run(l1, vmd, dq, "virtio-blk-pci" if i == 0 else None)
            qemu_write.append(w)
            qemu_read.append(r)
            log(f"run {i + 1} of {pairs}: disk, backend kvm")
            w, r = disk_run(l1, vmd, dk)
            own_write.append(w)
            own_read.append(r)
            log(f"run {i + 1} of {pairs}: network, backend qemu")
            qemu_net.append(net_run(l1, vmd, nq, "vhost=on" if i == 0 else None))
            log(f"run {i + 1} of {pairs}: network, backend kvm")
            own_net.append(net_run(l1, vmd, nk))
    except (CannotRun, L.Failure) as e:
        print(f"regress/bench: cannot run: {e}", file=sys.stderr)
        return 1
    finally:
        if vmd:
            vmd.stop()
        l1.stop()
    rows = [Row("5 start to guest under KVM in L1 (first console line; L1 runs under TCG)",
                "one VM: vmctl start (accel kvm) | qemu-system-x86_64 -accel kvm", "s", ours, theirs),
            Row("6 vmd's own monitor against its QEMU backend in L1 (nested: ratios only)",
                "start to first console line: backend kvm | backend qemu, accel kvm", "s",
                own_start, qemu_start),
            Row("6 vmd's own monitor against its QEMU backend in L1 (nested: ratios only)",
                "memory beyond the guest's: VM process | VM process + QEMU", "MiB",
                own_mem, qemu_mem),
            Row(DISK_SECTION, f"sequential write, {DISK_MIB} MiB, dd bs=1M oflag=direct: "
                "backend kvm | backend qemu", "MB/s", own_write, qemu_write, better="higher"),
            Row(DISK_SECTION, f"sequential read, {DISK_MIB} MiB, dd bs=1M iflag=direct: "
                "backend kvm | backend qemu", "MB/s", own_read, qemu_read, better="higher"),
            Row("8 network in L1: virtio-net on virtio-mmio | virtio-net-pci with vhost-net (nested: ratios only)",
                f"guest to L1 over TCP, {NET_MIB} MiB, busybox nc: backend kvm | backend qemu", "MB/s",
                own_net, qemu_net, better="higher")]
    notes = [f"L1 booted in {l1.boot_seconds:.1f}s; times taken inside L1",
             "each cell: median (min-max); n = runs vmd/alternative; ratio = vmd's median / bare QEMU's",
             "sections 6-8: ratio = backend kvm's median / the QEMU backend's; L1 emulates all of it: ratios only",
             "sections 7-8: MB/s = 10^6 bytes a second, timed by the guest (/proc/uptime); "
             "above 1, backend kvm is faster"]
    if quick:
        notes.append("--quick: one run per side, not for comparison")
    notes.append(f"whole run: {time.monotonic() - started:.0f}s")
    text = c.render(title, notes, rows)
    print()
    print(text, end="")
    print(f"written to {c.save('bench-nested', text)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
