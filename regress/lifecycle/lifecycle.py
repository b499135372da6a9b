#!/usr/bin/env python3
"""regress/lifecycle: the life of a VM under vmd, with real guests (QEMU,
TCG): graceful stop and its timeout, stop -a, wait, pause and unpause,
guest reboots and the start rate limit, and recovery after QEMU or the
VM process is killed.

Runs as root. Each case starts its own vmd (regress/lib/vmdregress.py) with
its own temp dir, socket, vm.conf and console logs, and kills vmd and
every process it started at the end, even on failure. The guest's kernel
command line drives it (regress/guest/README.md): `VMD-GUEST: tick N`
once a second, `vmd.powerbutton=ignore`, `vmd.action=reboot-after-Ns`.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib"))
import vmdregress as t  # noqa: E402
from vmdregress import (TRIGGER_VMD, Failure, Pty, Vmd, build_triggers, case, expect,  # noqa: E402
                        fd_count, status_of, ticks, wait_for, with_vmd)

QUIET = "console=ttyS0 quiet"
# ign1's shutdown timeout: long enough for the case's commands to reach vmd
# while it waits, however loaded the machine.
SHUTDOWN_TIMEOUT = 15


def config_vm(name, cmdline=QUIET, extra=""):
    """A disabled vm.conf VM running the test guest."""
    return (f'vm "{name}" {{\n disable\n boot "{t.KERNEL}"\n initrd "{t.INITRD}"\n'
            f' cmdline "{cmdline}"\n memory 256M\n{extra}}}\n')


def start_config_vm(vmd, name):
    """vmctl start of a configured VM; returns (id, tty)."""
    out = expect(vmd.vmctl("start", name), 0, r"^vmctl: started vm \d+ successfully", f"start {name}")
    m = re.search(r"started vm (\d+) successfully, tty (\S+)", out)
    vmid = int(m.group(1))
    vmd.vm_pids(vmid)
    return vmid, m.group(2)


# --- cases


def pause_unpause(vmd):
    vmid, _ = vmd.start("pause1")
    vmd.wait_console("pause1", "VMD-GUEST: tick 2")
    expect(vmd.vmctl("pause", "pause1"), 0, rf"^vmctl: paused vm {vmid} successfully$", "pause")
    if vmd.state(vmid) != "paused":
        raise Failure(f"status after pause: {vmd.status_row(vmid)}")
    # What was on its way out when the vCPUs stopped may still arrive:
    # wait until the log is steady, then check that nothing comes.
    before = ticks(t.wait_steady("pause1's console log", lambda: vmd.console_log("pause1")))
    time.sleep(3)
    after = ticks(vmd.console_log("pause1"))
    if after != before:
        raise Failure(f"ticks while paused: {after[len(before):]}")
    expect(vmd.vmctl("pause", "pause1"), 1, r"^vmctl: pause vm command failed: vm pause1 is already paused$",
           "pause of a paused VM")
    expect(vmd.vmctl("unpause", str(vmid)), 0, rf"^vmctl: unpaused vm {vmid} successfully$", "unpause")
    if vmd.state(vmid) != "running":
        raise Failure(f"status after unpause: {vmd.status_row(vmid)}")
    wait_for("ticks to resume", lambda: len(ticks(vmd.console_log("pause1"))) >= len(after) + 2)
    # A paused VM can be stopped, gracefully too: its guest powers off.
    expect(vmd.vmctl("pause", "pause1"), 0, r"paused vm \d+ successfully", "second pause")
    expect(vmd.vmctl("stop", "-w", "pause1"), 0, rf"^stopping vm pause1: terminated vm {vmid}$",
           "stop -w of a paused VM")
    if "VMD-GUEST: power button, powering off" not in vmd.console_log("pause1"):
        raise Failure("the paused guest did not see its power button")


def stopped_vm_process(vmd):
    """A VM process that cannot answer (SIGSTOP): pause times out rather
    than hanging vmctl; after SIGCONT the VM process resumes its wait
    (restart_syscall is allowed) and carries out the pause."""
    vmid, _ = vmd.start("sigstop1")
    vm_pid, _ = vmd.vm_pids(vmid)
    vmd.wait_console("sigstop1", "VMD-GUEST: ready")
    os.kill(vm_pid, signal.SIGSTOP)
    try:
        expect(vmd.vmctl("pause", "sigstop1"), 1,
               r"^vmctl: pause vm command failed: Connection timed out$", "pause of a stopped VM process")
    finally:
        os.kill(vm_pid, signal.SIGCONT)
    wait_for("the late pause to be carried out", lambda: vmd.state(vmid) == "paused")
    if not status_of(vm_pid):
        raise Failure(f"the VM process died after SIGCONT: {vmd.log()[-500:]}")
    expect(vmd.vmctl("unpause", "sigstop1"), 0, rf"^vmctl: unpaused vm {vmid} successfully$", "unpause")


def graceful_stop_and_wait(vmd):
    vmid, _ = vmd.start("grace1")
    vm_pid, qemu = vmd.vm_pids(vmid)
    vmd.wait_console("grace1", "VMD-GUEST: ready")
    # A second client waits for the VM's end.
    waiter = vmd.vmctl_background("wait", "grace1")
    try:
        # control logs (vmd runs with -v) once the connection waits.
        wait_for("control to note the waiter",
                 lambda: re.search(rf"^control: connection \d+ waits for vm {vmid}$", vmd.log(), re.M))
        if waiter.poll() is not None:
            raise Failure(f"wait returned while the VM runs: {waiter.communicate()[0]!r}")
        expect(vmd.vmctl("stop", "-w", "grace1"), 0, rf"^stopping vm grace1: terminated vm {vmid}$",
               "stop -w")
        out, _ = waiter.communicate(timeout=t.WAIT_TIMEOUT)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    if waiter.returncode != 0 or not re.search(rf"^waiting for vm grace1: terminated vm {vmid}$", out, re.M):
        raise Failure(f"wait: exit {waiter.returncode}: {out!r}")
    log = vmd.console_log("grace1")
    if "VMD-GUEST: power button, powering off" not in log:
        raise Failure(f"the guest's power-off path did not run: {log[-300:]!r}")
    if status_of(vm_pid) or status_of(qemu):
        raise Failure("the VM process or QEMU outlived stop -w")
    # Started by vmctl only: gone once it ended.
    if vmd.status_row(vmid) is not None:
        raise Failure(f"a vmctl-started VM is still listed: {vmd.status_row(vmid)}")
    if "guest-shutdown" not in vmd.log():
        raise Failure("vmd did not log the guest's own shutdown")


def forced_after_timeout(vmd):
    vmid, _ = start_config_vm(vmd, "ign1")
    vmd.wait_console("ign1", "VMD-GUEST: ready")
    began = time.monotonic()
    stopper = vmd.vmctl_background("stop", "-w", "ign1")
    second = None
    try:
        wait_for("the VM to be stopping", lambda: vmd.state(vmid) == "stopping")
        expect(vmd.vmctl("stop", "ign1"), 1,
               r"^stopping vm ign1: vm ign1 is already stopping: -f forces it$",
               "a second stop without -f")
        # stop -w of a VM already stopping waits for that stop to end.
        second = vmd.vmctl_background("stop", "-w", "ign1")
        out, _ = stopper.communicate(timeout=SHUTDOWN_TIMEOUT + t.WAIT_TIMEOUT)
        second_out, _ = second.communicate(timeout=t.WAIT_TIMEOUT)
    finally:
        for p in (stopper, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    if second.returncode != 0 or not re.search(
            rf"^stopping vm ign1: forced to terminate vm {vmid} after the shutdown timeout$", second_out, re.M):
        raise Failure(f"a second stop -w: exit {second.returncode}: {second_out!r}")
    took = time.monotonic() - began
    if stopper.returncode != 0 or not re.search(
            rf"^stopping vm ign1: forced to terminate vm {vmid} after the shutdown timeout$", out, re.M):
        raise Failure(f"stop -w: exit {stopper.returncode}: {out!r}")
    if took < SHUTDOWN_TIMEOUT:
        raise Failure(f"forced after {took:.1f}s with a {SHUTDOWN_TIMEOUT}s shutdown timeout")
    if "VMD-GUEST: power button, ignored" not in vmd.console_log("ign1"):
        raise Failure("the guest never saw its power button")
    # Defined in vm.conf: listed as stopped.
    if vmd.state(vmid) != "stopped":
        raise Failure(f"after the forced stop: {vmd.status_row(vmid)}")
    if "did not shut down in time" not in vmd.log():
        raise Failure("vmd did not log the forced stop")


def stop_all(vmd):
    a, _ = vmd.start("all1")
    b, _ = vmd.start("all2")
    for name in ("all1", "all2"):
        vmd.wait_console(name, "VMD-GUEST: ready")
    out = expect(vmd.vmctl("stop", "-a", "-w"), 0,
                 rf"^stopping vm all1: terminated vm {a}$", "stop -a -w")
    if not re.search(rf"^stopping vm all2: terminated vm {b}$", out, re.M):
        raise Failure(f"stop -a -w did not stop all2: {out!r}")
    for name in ("all1", "all2"):
        if "VMD-GUEST: power button, powering off" not in vmd.console_log(name):
            raise Failure(f"{name} was not powered off by its guest")
    if any(row["STATE"] != "stopped" for row in vmd.status()):
        raise Failure(f"VMs left after stop -a: {vmd.status()}")


def stop_errors(vmd):
    expect(vmd.vmctl("stop", "nosuch"), 1, r"^stopping vm nosuch: vm not found$", "stop of an unknown VM")
    expect(vmd.vmctl("stop", "cfg1"), 1, r"^stopping vm cfg1: cannot stop vm that is not running$",
           "stop of a stopped VM")
    # Unlike OpenBSD (EINVAL): what wait waits for already holds.
    expect(vmd.vmctl("wait", "cfg1"), 0, r"^waiting for vm cfg1: vm cfg1 is not running$",
           "wait for a stopped VM")
    expect(vmd.vmctl("pause", "cfg1"), 1, r"^vmctl: pause vm command failed: vm cfg1 is not running$",
           "pause of a stopped VM")
    expect(vmd.vmctl("unpause", "nosuch"), 1, r"^vmctl: unpause vm command failed: vm not found$",
           "unpause of an unknown VM")


def reboot_same_tty(vmd):
    vmid, tty = vmd.start("boot1", cmdline=f"{QUIET} vmd.action=reboot-after-1s")
    first_pid = int(vmd.status_row(vmid)["PID"])
    pty = Pty(tty)
    try:
        pty.wait_for(r"^VMD-GUEST: action reboot now$")
        # The same pty, still open here, carries the next boot.
        pty.wait_for(r"^VMD-GUEST: action reboot now$[\s\S]*^VMD-GUEST: booted$")
    finally:
        pty.close()
    row = vmd.status_row(vmid)
    if not row or row["TTY"] != tty.replace("/dev/", "") or row["STATE"] != "running":
        raise Failure(f"after the reboot: {row}; want running on {tty}")
    if int(row["PID"]) == first_pid:
        raise Failure("the VM process did not change across the reboot")
    vmd.track(int(row["PID"]))
    if vmd.console_log("boot1").count("VMD-GUEST: booted") < 2:
        raise Failure("the console log does not hold both boots")
    if f"vm {vmid} rebooting" not in vmd.log():
        raise Failure("vmd did not log the reboot")
    expect(vmd.vmctl("stop", "-f", "boot1"), 0, r"forced to terminate", "stop -f")


def reboot_rate_limit(vmd):
    vmid, tty = vmd.start("loop1", cmdline=f"{QUIET} vmd.action=reboot-after-1s")

    def track():
        row = vmd.status_row(vmid)
        if row and row["PID"] != "-":
            vmd.track(int(row["PID"]))
        return "restarted too quickly" in vmd.log()
    # The test build's window (an hour) holds every boot, however slow:
    # the count below depends on vmd's rule, not on this machine's speed.
    wait_for("the start rate limit", track, 3 * t.BOOT_TIMEOUT)
    wait_for("the VM to end", lambda: vmd.status_row(vmid) is None)
    boots = vmd.console_log("loop1").count("VMD-GUEST: booted")
    if boots != 3:
        raise Failure(f"{boots} boots before the rate limit; want 3 (a start and two restarts)")
    if "not restarted after its reboot" not in vmd.log():
        raise Failure("vmd did not log that the reboot was not restarted")


def crash(which):
    """SIGKILL of QEMU or of the VM process, then a restart on the same disk."""
    def run():
        tmp = tempfile.mkdtemp(prefix="vmd-regress-disk-")
        disk = os.path.join(tmp, "crash.img")
        vmd = None
        try:
            subprocess.run(["qemu-img", "create", "-q", "-f", "raw", disk, "16M"], check=True)
            vmd = Vmd(conf_extra=config_vm("crash1", extra=f' disk "{disk}"\n'))
            parent = vmd.proc.pid
            baseline = t.wait_steady("the parent's descriptors", lambda: fd_count(parent))
            for attempt in (1, 2):
                vmid, _ = start_config_vm(vmd, "crash1")
                vm_pid, qemu = vmd.vm_pids(vmid)
                vmd.wait_console("crash1", "VMD-GUEST: disk vda 16777216 bytes rw")
                if attempt == 2:
                    break
                os.kill(qemu if which == "qemu" else vm_pid, signal.SIGKILL)
                wait_for("the VM to be stopped", lambda: vmd.state(vmid) == "stopped")
                wait_for("QEMU and the VM process to be gone",
                         lambda: not status_of(vm_pid) and not status_of(qemu))
                wait_for(f"the parent's fds back to {baseline}", lambda: fd_count(parent) == baseline)
                want = "QEMU was killed by SIGKILL" if which == "qemu" else "VM process was killed by SIGKILL"
                if want not in vmd.log():
                    raise Failure(f"vmd did not log {want!r}")
            expect(vmd.vmctl("stop", "-f", "crash1"), 0, r"forced to terminate", "stop -f after the restart")
            wait_for("the VM to be stopped", lambda: vmd.state(vmid) == "stopped")
            wait_for(f"the parent's fds back to {baseline}", lambda: fd_count(parent) == baseline)
        finally:
            if vmd:
                vmd.stop()
            shutil.rmtree(tmp, ignore_errors=True)
    return run


def non_owner():
    user = f"vmdlc{os.getpid()}"
    subprocess.run(["useradd", "-M", "-U", "-s", "/usr/sbin/nologin", user], check=True,
                   capture_output=True)
    vmd = None
    try:
        vmd = Vmd(conf_extra=f"socket owner :{user}\n")
        os.chmod(vmd.dir, 0o711)
        vmid, _ = vmd.start("own1")
        vmd.wait_console("own1", "VMD-GUEST: ready")
        expect(vmd.vmctl("status", user=user), 0, r"own1", "status as another user")
        expect(vmd.vmctl("stop", "own1", user=user), 1, r"^stopping vm own1: failed: Operation not permitted$",
               "stop as another user")
        expect(vmd.vmctl("stop", "-f", str(vmid), user=user), 1, r"failed: Operation not permitted$",
               "stop -f as another user")
        expect(vmd.vmctl("pause", "own1", user=user), 1,
               r"^vmctl: pause vm command failed: Operation not permitted$", "pause as another user")
        expect(vmd.vmctl("wait", "own1", user=user), 1,
               r"^waiting for vm own1: failed: Operation not permitted$", "wait as another user")
        # stop -a leaves alone what the user may not stop.
        expect(vmd.vmctl("stop", "-a", user=user), 0, r"^$", "stop -a as another user")
        if vmd.state(vmid) != "running":
            raise Failure(f"another user's commands changed the VM: {vmd.status_row(vmid)}")
    finally:
        if vmd:
            vmd.stop()
        subprocess.run(["userdel", user], capture_output=True)
        subprocess.run(["groupdel", user], capture_output=True)


def reset_vms(vmd):
    """`reset vms` terminates running VMs; each stays listed until its end
    is reported, then it is gone, and its name can start again at once."""
    cfg_id, _ = start_config_vm(vmd, "rst1")
    vmid, _ = vmd.start("rst2")
    pids = [pid for v in (cfg_id, vmid) for pid in vmd.vm_pids(v)]
    expect(vmd.vmctl("reset", "vms"), 0, r"^$", "reset vms")
    wait_for("the VMs' processes to end", lambda: not any(status_of(p) for p in pids))
    wait_for("status to list no VM", lambda: not vmd.status())
    vmd.start("rst2")


def main():
    if not t.prepare():
        return 1
    build_triggers()
    case("stop-errors", with_vmd(stop_errors, conf_extra=config_vm("cfg1")))
    case("pause-no-ticks-unpause-ticks-stop-paused", with_vmd(pause_unpause))
    case("graceful-stop-w-and-wait-from-second-client", with_vmd(graceful_stop_and_wait))
    case("ignored-power-button-forced-after-timeout",
         with_vmd(forced_after_timeout, conf_extra=config_vm(
             "ign1", f"{QUIET} vmd.powerbutton=ignore", f" shutdown timeout {SHUTDOWN_TIMEOUT}\n")))
    case("stop-all-two-vms", with_vmd(stop_all))
    case("guest-reboot-same-tty", with_vmd(reboot_same_tty))
    case("reboot-loop-hits-rate-limit", with_vmd(reboot_rate_limit, binary=TRIGGER_VMD,
                                                 env={"VMD_TEST_START_RATE_WINDOW": "3600"}))
    case("sigkill-qemu-restart-same-disk-fds-back", crash("qemu"))
    case("sigkill-vm-process-restart-same-disk-fds-back", crash("vm"))
    case("non-owner-cannot-stop-pause-wait", non_owner)
    case("stopped-vm-process-pause-times-out-then-resumes", with_vmd(stopped_vm_process))
    case("reset-vms-terminates-running-vms", with_vmd(reset_vms, conf_extra=config_vm("rst1")))
    return t.summary()


if __name__ == "__main__":
    sys.exit(main())
