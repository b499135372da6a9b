#!/usr/bin/env python3
"""`make bench-nested`: start to the test guest's first console line with
`accel kvm`, vmd against bare QEMU with the same arguments, inside the
nested KVM host of regress/nested (L1: real KVM, emulated by TCG here);
and vmd's own monitor (`backend kvm`) against vmd's QEMU backend (`accel
kvm`): start to the first console line, and the memory the VM's processes
hold beyond the guest's own (RSS minus the guest RAM mapping's RSS).

    regress/bench --nested [--quick]

Times are taken inside L1 (/proc/uptime, 10 ms steps), alternating vmd
and bare QEMU runs. As root. Writes target/bench/bench-nested-DATE.txt.
"""

import os
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as c  # noqa: E402
from common import CannotRun, Row, log  # noqa: E402

sys.path.insert(0, os.path.join(c.REGRESS, "lib"))
sys.path.insert(0, os.path.join(c.REGRESS, "nested"))
import l1 as L  # noqa: E402

TIMEOUT = L.L2_BOOT_TIMEOUT


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


def run_vmd(l1, vmd, name):
    """vmctl start NAME in L1 until the guest's first marker; seconds."""
    log_path = f"{vmd.console_dir}/{name}.console"
    q = shlex.quote
    out = l1.check(uptime_script(f"""
before=$(count {q(c.MARKER)} {q(log_path)})
t0=$(up)
vmctl -s {q(vmd.sock)} start {q(name)} >/tmp/bench-start.out 2>&1 &
while [ "$(count {q(c.MARKER)} {q(log_path)})" -le "$before" ]; do
    if deadline; then echo "no marker after {TIMEOUT}s"; cat /tmp/bench-start.out; exit 1; fi
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
        conf = "accel kvm\n" + "".join(
            f'vm "{n}" {{\n  disable\n  memory 256M\n  boot "{L.GUEST_KERNEL}"\n'
            f'  initrd "{L.GUEST_INITRD}"\n  cmdline "{L.GUEST_CMDLINE}"\n'
            f'{"  backend kvm" + chr(10) if n in own else ""}}}\n' for n in names + own)
        try:
            vmd = L.L1Vmd(l1, conf)
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
                own_mem, qemu_mem)]
    notes = [f"L1 booted in {l1.boot_seconds:.1f}s; times taken inside L1",
             "each cell: median (min-max); n = runs vmd/alternative; ratio = vmd's median / bare QEMU's",
             "section 6: ratio = backend kvm's median / the QEMU backend's; L1 emulates all of it: ratios only"]
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
