#!/usr/bin/env python3
"""regress/service: vmd as a system service, with real guests (QEMU, TCG).

- the unit (etc/vmd.service) passes `systemd-analyze verify` (PID 1 here
  is not systemd: the unit is not run); the init script starts, reloads
  and stops this tree's vmd;
- the notify protocol, heard on a NOTIFY_SOCKET datagram socket the test
  binds (an abstract `@` address): READY=1, then RELOADING=1 with
  MONOTONIC_USEC and READY=1 on SIGHUP, then STOPPING=1 with
  EXTEND_TIMEOUT_USEC on SIGTERM, in that order;
- the staggered start (`staggered start parallel 2 delay 2`) of three
  enabled VMs, a disabled one staying stopped; after a reload, a VM that
  cannot start is logged with its reason and the others still start;
  six VMs loaded with `vmctl load` start in batches of three, and SIGTERM
  presses all six power buttons before the first VM has ended;
- SIGTERM: every guest sees its power button, vmd exits 0, and no QEMU,
  tap, bridge or socket is left (vmd runs in a network namespace of the
  case's own, Vmd(netns=True)); a guest that ignores the button is forced
  at its `shutdown timeout`; a second SIGTERM forces at once;
- SIGKILL of vmd with VMs running, then a new vmd on the same socket: what
  the dead one left is removed and its VMs come up again;
- the Debian package (`pkg/deb/build`): it builds, lintian reports no
  error, and apt installs it, `vmd -n` passes, apt removes it (keeping
  the conffile /etc/vm.conf) and purges it; the _vmd user survives.
  Skipped where /usr/sbin/vmd or /etc/vm.conf already exist.

Each case has its own vmd, temp dir and socket (regress/lib/vmdregress.py),
and ends everything it started, even on failure.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib"))
import vmdregress as t  # noqa: E402
from vmdregress import (ROOT, VMD, Failure, Skip, Vmd, case, children_of, cmdline, expect,  # noqa: E402
                        status_of, wait_for)

QUIET = "console=ttyS0 quiet"
POWER_OFF = "VMD-GUEST: power button, powering off"
IGNORED = "VMD-GUEST: power button, ignored"
# A VM's `shutdown timeout` when its guest ignores the button: long
# enough to see vmd wait, short enough for a case.
IGNORE_TIMEOUT = 6


def config_vm(name, enabled=True, cmdline=QUIET, extra=""):
    disable = "" if enabled else " disable\n"
    return (f'vm "{name}" {{\n{disable} boot "{t.KERNEL}"\n'
            f' initrd "{t.INITRD}"\n cmdline "{cmdline}"\n memory 256M\n{extra}}}\n')


def qemus_of(vmd):
    """Every QEMU among the processes vmd's VMs run (by their session
    leader, the VM process: children of vmd)."""
    out = []
    for pid in children_of(vmd.proc.pid):
        out += [p for p in children_of(pid) if "qemu-system" in cmdline(p)]
    return out


def wait_exit(vmd, timeout):
    """Waits for vmd to exit; its exit status."""
    try:
        return vmd.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise Failure(f"vmd still runs {timeout}s later: {vmd.log()[-2000:]}")


# --- cases


def unit_verifies():
    """systemd-analyze verify on the unit (with this tree's vmd for
    /usr/sbin/vmd, which need not be installed); the init script parses."""
    if not shutil.which("systemd-analyze"):
        raise Failure("systemd-analyze is missing: run regress/setup")
    with tempfile.TemporaryDirectory(prefix="vmd-svc-unit-") as d:
        with open(os.path.join(ROOT, "etc", "vmd.service")) as f:
            unit = f.read()
        for want in ("Type=notify", "ExecStartPre=/usr/sbin/vmd -n", "ExecStart=/usr/sbin/vmd -d",
                     "ExecReload=/bin/kill -HUP $MAINPID", "KillMode=mixed", "Restart=on-failure",
                     "Wants=network-online.target", "After=network-online.target"):
            if want not in unit:
                raise Failure(f"etc/vmd.service lacks {want}")
        path = os.path.join(d, "vmd.service")
        with open(path, "w") as f:
            f.write(unit.replace("/usr/sbin/vmd", VMD))
        p = subprocess.run(["systemd-analyze", "verify", "--man=no", path], capture_output=True, text=True)
        # Lines about other units (this machine's own) are not the unit's.
        ours = [line for line in (p.stdout + p.stderr).splitlines() if "vmd.service" in line]
        if p.returncode != 0 or ours:
            raise Failure(f"systemd-analyze verify: exit {p.returncode}: {p.stdout}{p.stderr}")
    init = os.path.join(ROOT, "etc", "init.d", "vmd")
    expect((subprocess.run(["sh", "-n", init]).returncode, ""), 0, "", "sh -n etc/init.d/vmd")


def init_script():
    """etc/init.d/vmd start, status, reload, stop with this tree's vmd
    (DAEMON, PIDFILE, LOGFILE and VMD_OPTS pointed at a temp dir)."""
    d = tempfile.mkdtemp(prefix="vmd-svc-init-")
    try:
        sock, conf, log = (os.path.join(d, n) for n in ("vmd.sock", "vm.conf", "vmd.log"))
        with open(conf, "w") as f:
            f.write("accel tcg\n")
        with open(os.path.join(ROOT, "etc", "init.d", "vmd")) as f:
            script = f.read()
        for var, value in (("DAEMON", VMD), ("PIDFILE", os.path.join(d, "vmd.pid")), ("LOGFILE", log),
                           ("VMD_OPTS", f'"-f {conf} -s {sock}"')):
            script, n = re.subn(rf"^{var}=.*$", f"{var}={value}", script, flags=re.M)
            if n != 1:
                raise Failure(f"etc/init.d/vmd: no {var}= line")
        script = script.replace("/etc/default/vmd", os.path.join(d, "default"))
        init = os.path.join(d, "vmd.init")
        with open(init, "w") as f:
            f.write(script)

        def run(action, rc):
            p = subprocess.run(["sh", init, action], capture_output=True, text=True, timeout=60,
                               stdin=subprocess.DEVNULL)
            if p.returncode != rc:
                raise Failure(f"init script {action}: exit {p.returncode}, want {rc}: {p.stdout}{p.stderr}")
            return p.stdout

        def log_text():
            with open(log, errors="replace") as f:
                return f.read()

        try:
            run("start", 0)
            wait_for("vmd to listen", lambda: os.path.exists(log) and "control: listening" in log_text())
            pid = int(re.search(r"pid (\d+)", run("status", 0)).group(1))
            run("reload", 0)
            wait_for("the reload", lambda: "reloaded" in log_text())
            run("stop", 0)
            if status_of(pid) or os.path.exists(sock):
                raise Failure(f"vmd (pid {pid}) or its socket left after stop: {log_text()}")
            run("status", 3)
        finally:
            subprocess.run(["sh", init, "stop"], capture_output=True, timeout=60)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def notify_protocol():
    name = f"vmd-regress-notify-{os.getpid()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind("\0" + name)
    heard = []

    def hear(what):
        deadline = time.monotonic() + t.WAIT_TIMEOUT
        while time.monotonic() < deadline:
            listener.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                text = listener.recv(4096).decode()
            except socket.timeout:
                break
            heard.append(text)
            return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
        raise Failure(f"no notification ({what}); heard {heard}")

    try:
        vmd = Vmd(conf="", env={"NOTIFY_SOCKET": "@" + name})
        try:
            msg = hear("READY=1")
            expect_keys(msg, {"READY": "1"}, heard)
            for pid in vmd.ready():
                if b"NOTIFY_SOCKET" in open(f"/proc/{pid}/environ", "rb").read():
                    raise Failure(f"child {pid} inherited NOTIFY_SOCKET")
            vmd.proc.send_signal(signal.SIGHUP)
            msg = hear("RELOADING=1")
            expect_keys(msg, {"RELOADING": "1"}, heard)
            usec = int(msg.get("MONOTONIC_USEC", "0"))
            now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            if not 0 < usec <= now:
                raise Failure(f"MONOTONIC_USEC {usec} is not a past monotonic time (now {now})")
            expect_keys(hear("READY=1 after the reload"), {"READY": "1"}, heard)
            vmd.proc.send_signal(signal.SIGTERM)
            msg = hear("STOPPING=1")
            expect_keys(msg, {"STOPPING": "1"}, heard)
            if int(msg.get("EXTEND_TIMEOUT_USEC", "0")) <= 0:
                raise Failure(f"no EXTEND_TIMEOUT_USEC with STOPPING=1: {heard}")
            expect_equal_rc(wait_exit(vmd, 60), vmd)
        finally:
            vmd.stop()
    finally:
        listener.close()


def expect_keys(msg, want, heard):
    for k, v in want.items():
        if msg.get(k) != v:
            raise Failure(f"want {k}={v}, heard {heard}")


def expect_equal_rc(rc, vmd):
    if rc != 0:
        raise Failure(f"vmd exited {rc}: {vmd.log()[-2000:]}")


def staggered_start():
    conf_extra = ("staggered start parallel 2 delay 2\n"
                  + "".join(config_vm(n) for n in ("st1", "st2", "st3"))
                  + config_vm("st4", enabled=False))
    with Vmd(conf_extra) as vmd:
        seen = []

        def states():
            rows = {r["NAME"]: r["STATE"] for r in vmd.status()}
            snap = tuple(rows.get(n, "gone") for n in ("st1", "st2", "st3", "st4"))
            if not seen or seen[-1] != snap:
                seen.append(snap)
            return snap

        wait_for("three VMs running", lambda: states()[:3].count("running") == 3, t.BOOT_TIMEOUT)
        two = [i for i, s in enumerate(seen) if s[:3].count("running") == 2 and s[:3].count("waiting") == 1]
        three = [i for i, s in enumerate(seen) if s[:3].count("running") == 3]
        if not two or three[0] < two[0]:
            raise Failure(f"not two running and one waiting, then three: {seen}")
        if any(s[3] != "stopped" for s in seen):
            raise Failure(f"the disabled VM did not stay stopped: {seen}")
        if any(s[:3].count("running") > 2 and "waiting" in s[:3] for s in seen):
            raise Failure(f"more than `parallel 2` started in a batch: {seen}")
        for name in ("st1", "st2", "st3"):
            vmd.wait_console(name, "VMD-GUEST: ready")
        if vmd.console_log("st4"):
            raise Failure("the disabled VM has a console log")


def many_vms_load_and_shutdown():
    """`vmctl load` of six enabled VMs with `parallel 3 delay 1`: batches of
    three (never another count running), all six run; SIGTERM then presses
    every power button before any VM has ended (in parallel, not one after
    another), and vmd exits 0 with every guest powered off."""
    names = [f"mv{i}" for i in range(1, 7)]
    with Vmd("staggered start parallel 3 delay 1\n") as vmd:
        vmd.ready()
        more = os.path.join(vmd.dir, "more.conf")
        with open(more, "w") as f:
            f.write("".join(config_vm(n) for n in names))
        expect(vmd.vmctl("load", more), 0, "", "load")
        seen = []

        def running():
            rows = {r["NAME"]: r["STATE"] for r in vmd.status()}
            count = sum(rows.get(n) == "running" for n in names)
            if not seen or seen[-1] != count:
                seen.append(count)
            return count == len(names)

        wait_for("six VMs running", running, t.BOOT_TIMEOUT)
        if seen != [0, 3, 6] and seen != [3, 6]:
            raise Failure(f"running counts seen: {seen}; want batches of three")
        for name in names:
            vmd.wait_console(name, "VMD-GUEST: ready")
        vmd.proc.send_signal(signal.SIGTERM)
        expect_equal_rc(wait_exit(vmd, 120), vmd)
        log = vmd.log()
        asked = [m.start() for m in re.finditer(r"mv\d: vm \d+ requested to shut down", log)]
        ended = [m.start() for m in re.finditer(r"mv\d: vm \d+ terminated", log)]
        if len(asked) != 6 or len(ended) != 6 or max(asked) > min(ended):
            raise Failure(f"want six power buttons before the first end: {log[-3000:]}")
        for name in names:
            if POWER_OFF not in vmd.console_log(name):
                raise Failure(f"{name} did not see its power button")


def reload_failed_start():
    """A reload brings enabled VMs up; one whose kernel is missing is
    logged with its reason and the others start all the same."""
    with Vmd(config_vm("rl0", enabled=False)) as vmd:
        vmd.ready()
        conf_path = vmd.conf
        with open(conf_path) as f:
            base = f.read()
        bad = config_vm("rlbad").replace(t.KERNEL, "/nonexistent/vmlinuz")
        vmd.write_config(base + "staggered start parallel 1 delay 1\n" + bad
                         + config_vm("rl1") + config_vm("rl2"))
        expect(vmd.vmctl("reload"), 0, "", "reload")
        wait_for("rl1 and rl2 running",
                 lambda: [r["STATE"] for r in vmd.status() if r["NAME"] in ("rl1", "rl2")] == ["running"] * 2,
                 t.BOOT_TIMEOUT)
        log = vmd.log()
        if not re.search(r"rlbad.*/nonexistent/vmlinuz", log):
            raise Failure(f"no reason logged for rlbad: {log[-3000:]}")
        states = {r["NAME"]: r["STATE"] for r in vmd.status()}
        if states.get("rlbad") != "stopped" or states.get("rl0") != "stopped":
            raise Failure(f"rlbad and rl0 should be stopped: {states}")
        for name in ("rl1", "rl2"):
            vmd.wait_console(name, "VMD-GUEST: ready")


def sigterm_graceful():
    conf_extra = ('switch "up" {\n interface vmdsvcbr0\n}\n'
                  + config_vm("gs1", extra=' interface { switch "up" }\n')
                  + config_vm("gs2", extra=' interface { switch "up" }\n'))
    with Vmd(conf_extra, netns=True) as vmd:
        wait_for("gs1 and gs2 running",
                 lambda: [r["STATE"] for r in vmd.status()] == ["running"] * 2, t.BOOT_TIMEOUT)
        for name in ("gs1", "gs2"):
            vmd.wait_console(name, "VMD-GUEST: ready")
        links = sorted(vmd.links())
        if "vmdsvcbr0" not in links or len([n for n in links if n.startswith("tap")]) != 2:
            raise Failure(f"want the bridge and two taps in the namespace: {links}")
        qemus = qemus_of(vmd)
        if len(qemus) != 2:
            raise Failure(f"want two QEMUs, found {qemus}")
        pids = children_of(vmd.proc.pid) + qemus
        vmd.proc.send_signal(signal.SIGTERM)
        expect_equal_rc(wait_exit(vmd, 90), vmd)
        for name in ("gs1", "gs2"):
            if POWER_OFF not in vmd.console_log(name):
                raise Failure(f"{name} did not see its power button: {vmd.console_log(name)[-500:]}")
        left = [p for p in pids if status_of(p)]
        if left:
            raise Failure(f"processes left: {[(p, cmdline(p)) for p in left]}")
        if sorted(vmd.links()) != ["lo"]:
            raise Failure(f"links left in the namespace: {sorted(vmd.links())}")
        if os.path.exists(vmd.sock):
            raise Failure(f"{vmd.sock} is left")
        if "forcing it" in vmd.log():
            raise Failure(f"a guest was forced: {vmd.log()[-2000:]}")


def ignored_button_forced():
    conf_extra = (config_vm("ig1", cmdline=f"{QUIET} vmd.powerbutton=ignore",
                            extra=f" shutdown timeout {IGNORE_TIMEOUT}\n")
                  + config_vm("ig2"))
    with Vmd(conf_extra) as vmd:
        wait_for("ig1 and ig2 running", lambda: [r["STATE"] for r in vmd.status()] == ["running"] * 2,
                 t.BOOT_TIMEOUT)
        for name in ("ig1", "ig2"):
            vmd.wait_console(name, "VMD-GUEST: ready")
        qemus = qemus_of(vmd)
        vmd.proc.send_signal(signal.SIGTERM)
        # ig2 powers off at once; ig1 stays until its timeout.
        wait_for("ig2 to power off", lambda: POWER_OFF in vmd.console_log("ig2"))
        vmd.wait_console("ig1", IGNORED)
        expect_equal_rc(wait_exit(vmd, 90), vmd)
        log = vmd.log()
        if not re.search(r"ig1: vm \d+ did not shut down in time; forcing it", log):
            raise Failure(f"ig1 was not forced at its timeout: {log[-2000:]}")
        if re.search(r"ig2: vm \d+ did not shut down in time", log):
            raise Failure(f"ig2 was forced: {log[-2000:]}")
        if not re.search(rf"ig1: vm \d+ requested to shut down \(forced in {IGNORE_TIMEOUT}s\)", log):
            raise Failure(f"ig1's own shutdown timeout was not used: {log[-2000:]}")
        if any(status_of(p) for p in qemus):
            raise Failure("a QEMU is left")


def second_sigterm_forces():
    conf_extra = config_vm("fs1", cmdline=f"{QUIET} vmd.powerbutton=ignore", extra=" shutdown timeout 3600\n")
    with Vmd(conf_extra) as vmd:
        wait_for("fs1 running", lambda: [r["STATE"] for r in vmd.status()] == ["running"], t.BOOT_TIMEOUT)
        vmd.wait_console("fs1", "VMD-GUEST: ready")
        qemus = qemus_of(vmd)
        vmd.proc.send_signal(signal.SIGTERM)
        vmd.wait_console("fs1", IGNORED)
        if not vmd.alive():
            raise Failure("vmd exited before its VM's timeout")
        # Starts are refused while vmd shuts down.
        expect(vmd.vmctl("start", "fs1"), 1, "shutting down", "start during the shutdown")
        vmd.proc.send_signal(signal.SIGTERM)
        expect_equal_rc(wait_exit(vmd, 30), vmd)
        if "forced to stop" not in vmd.log():
            raise Failure(f"fs1 not forced: {vmd.log()[-2000:]}")
        if any(status_of(p) for p in qemus):
            raise Failure("a QEMU is left")


def sigkill_recovery():
    conf_extra = ('switch "up" {\n interface vmdsvcbr0\n}\n'
                  + config_vm("kr1", extra=' interface { switch "up" }\n'))
    with Vmd(conf_extra, netns=True) as vmd:
        wait_for("kr1 running", lambda: [r["STATE"] for r in vmd.status()] == ["running"], t.BOOT_TIMEOUT)
        vmd.wait_console("kr1", "VMD-GUEST: ready")
        old = children_of(vmd.proc.pid) + qemus_of(vmd)
        old_taps = [n for n in sorted(vmd.links()) if n.startswith("tap")]
        vmd.proc.kill()
        vmd.proc.wait()
        wait_for("the dead vmd's processes to end", lambda: not any(status_of(p) for p in old))
        if not os.path.exists(vmd.sock):
            raise Failure("the killed vmd's socket is gone already: nothing to recover")
        if "vmdsvcbr0" not in sorted(vmd.links()):
            raise Failure(f"the killed vmd's bridge is gone already: {sorted(vmd.links())}")
        with open(vmd.log_path, "a") as log:
            vmd.proc = subprocess.Popen(vmd.proc.args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                        start_new_session=True)
        wait_for("the new vmd to listen", lambda: vmd.log().count("control: listening") == 2)
        vmd.tracked.update(children_of(vmd.proc.pid))
        wait_for("its predecessor's leftovers to be removed",
                 lambda: re.search(r"removing what vmd \(pid \d+\) left: \d+ tap\(s\), 1 bridge\(s\)",
                                   vmd.log()))
        wait_for("kr1 running again", lambda: [r["STATE"] for r in vmd.status()] == ["running"],
                 t.BOOT_TIMEOUT)
        wait_for("kr1's second boot", lambda: vmd.console_log("kr1").count("VMD-GUEST: ready") == 2,
                 t.BOOT_TIMEOUT)
        vmd.track(int(vmd.status()[0]["PID"]))
        taps = [n for n in sorted(vmd.links()) if n.startswith("tap")]
        if len(taps) != 1 or "vmdsvcbr0" not in sorted(vmd.links()):
            raise Failure(f"want one tap (old ones: {old_taps}) and the bridge: {sorted(vmd.links())}")
        vmd.proc.send_signal(signal.SIGTERM)
        expect_equal_rc(wait_exit(vmd, 90), vmd)
        if sorted(vmd.links()) != ["lo"]:
            raise Failure(f"links left: {sorted(vmd.links())}")


def debian_package():
    for tool in ("dpkg-deb", "lintian"):
        if not shutil.which(tool):
            raise Failure(f"{tool} is missing: run regress/setup")
    if os.path.exists("/usr/sbin/vmd") or os.path.exists("/etc/vm.conf"):
        raise Skip("/usr/sbin/vmd or /etc/vm.conf exists on this machine: installing the package "
                   "would replace it")
    with tempfile.TemporaryDirectory(prefix="vmd-svc-deb-") as out:
        # The debug binaries (the package build strips them): the case does
        # not wait for a release build.
        p = subprocess.run(["sh", os.path.join(ROOT, "pkg", "deb", "build"), os.path.dirname(VMD), out],
                           capture_output=True, text=True)
        debs = [f for f in os.listdir(out) if f.endswith(".deb")]
        if p.returncode != 0 or len(debs) != 1:
            raise Failure(f"pkg/deb/build: exit {p.returncode}: {p.stdout}{p.stderr}")
        deb = os.path.join(out, debs[0])
        p = subprocess.run(["lintian", "--tag-display-limit", "0", deb], capture_output=True, text=True)
        errors = [line for line in p.stdout.splitlines() if line.startswith("E:")]
        if errors or p.returncode not in (0, 1) or (p.returncode == 1 and not p.stdout):
            raise Failure(f"lintian: exit {p.returncode}: {p.stdout}{p.stderr}")
        info = subprocess.run(["dpkg-deb", "-f", deb, "Depends"], capture_output=True, text=True).stdout
        for dep in ("qemu-system-x86", "qemu-utils", "seabios", "nftables", "iproute2"):
            if dep not in info:
                raise Failure(f"Depends lacks {dep}: {info}")
        apt = ["apt-get", "-y", "-qq", "-o", "DPkg::Lock::Timeout=300"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:
            p = subprocess.run([*apt, "install", deb], capture_output=True, text=True, env=env)
            if p.returncode != 0:
                raise Failure(f"apt-get install: exit {p.returncode}: {p.stdout}{p.stderr}")
            for path in ("/usr/sbin/vmd", "/usr/sbin/vmctl", "/lib/systemd/system/vmd.service",
                         "/etc/init.d/vmd", "/usr/share/man/man8/vmd.8.gz", "/etc/vm.conf",
                         "/var/lib/vmd/empty"):
                if not os.path.exists(path):
                    raise Failure(f"{path} not installed")
            p = subprocess.run(["/usr/sbin/vmd", "-n"], capture_output=True, text=True)
            expect((p.returncode, p.stdout + p.stderr), 0, "configuration OK", "vmd -n")
            p = subprocess.run([*apt, "remove", "vmd"], capture_output=True, text=True, env=env)
            if p.returncode != 0:
                raise Failure(f"apt-get remove: exit {p.returncode}: {p.stdout}{p.stderr}")
            if os.path.exists("/usr/sbin/vmd") or not os.path.exists("/etc/vm.conf"):
                raise Failure("after remove: /usr/sbin/vmd is left or the conffile /etc/vm.conf is gone")
            p = subprocess.run([*apt, "purge", "vmd"], capture_output=True, text=True, env=env)
            if p.returncode != 0:
                raise Failure(f"apt-get purge: exit {p.returncode}: {p.stdout}{p.stderr}")
            for path in ("/usr/sbin/vmd", "/etc/vm.conf", "/lib/systemd/system/vmd.service"):
                if os.path.exists(path):
                    raise Failure(f"{path} is left after the purge")
            if subprocess.run(["getent", "passwd", "_vmd"], capture_output=True).returncode != 0:
                raise Failure("the purge removed the user _vmd")
        finally:
            subprocess.run([*apt, "purge", "vmd"], capture_output=True, env=env)


def main():
    if not t.prepare():
        return 1
    case("unit-verifies-init-script-parses", unit_verifies)
    case("init-script-start-status-reload-stop", init_script)
    case("notify-ready-reloading-stopping", notify_protocol)
    case("staggered-start-two-then-three-disabled-stopped", staggered_start)
    case("reload-starts-vms-failed-start-logged-others-run", reload_failed_start)
    case("load-six-vms-batches-of-three-sigterm-all-at-once", many_vms_load_and_shutdown)
    case("sigterm-powers-down-exits-0-leaves-nothing", sigterm_graceful)
    case("sigterm-ignored-button-forced-at-timeout", ignored_button_forced)
    case("second-sigterm-forces-at-once", second_sigterm_forces)
    case("sigkill-then-new-vmd-removes-leftovers-starts-vms", sigkill_recovery)
    case("deb-builds-lintian-installs-removes", debian_package)
    return t.summary()


if __name__ == "__main__":
    sys.exit(main())
