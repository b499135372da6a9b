#!/usr/bin/env python3
"""regress/privsep: vmd's process model, checked from the outside.

Runs as root. Each case starts its own vmd (vmdregress.Vmd: -d, its own
socket, its own log and an empty config in a temp dir), checks it through
/proc and ps, and kills it and its children at the end, even on failure. The refused-call
cases use a build with the `test-triggers` feature, made here into
target/test-triggers so target/debug never contains the triggers.
Shared helpers live in regress/lib/vmdregress.py.
"""

import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib"))
import vmdregress as t  # noqa: E402
from vmdregress import (TRIGGER_VMD, VMD, WAIT_TIMEOUT, Failure, Skip, build_triggers, case,  # noqa: E402
                        children_of, cmdline, kill_pids, status_of, wait_for)

ROLES = ("control", "switch")
# Signals the test-triggers build reads (src/trigger.rs).
TRIGGERS = {"execve": 1, "open": 2, "socket": 3, "ptrace": 4}
LOGGED_NAME = {"execve": "execve", "open": "openat", "socket": "socket", "ptrace": "ptrace"}


def plain_vmd(binary=VMD, cwd=None):
    """The harness's vmd with an empty config and no -v (debug lines are
    what runtime_verbosity turns on)."""
    return t.Vmd(conf="", binary=binary, verbose=False, cwd=cwd)


def check_child_dropped(role, pid, vmd_uid, vmd_gid):
    st = status_of(pid)
    if st is None:
        raise Failure(f"{role} (pid {pid}) is gone")
    if st["Uid"].split() != [str(vmd_uid)] * 4:
        raise Failure(f"{role} uids are {st['Uid']}, want {vmd_uid} four times")
    if st["Gid"].split() != [str(vmd_gid)] * 4:
        raise Failure(f"{role} gids are {st['Gid']}, want {vmd_gid} four times")
    if st["Groups"].split() not in ([str(vmd_gid)], []):
        raise Failure(f"{role} groups are {st['Groups']!r}")
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        if int(st[cap], 16) != 0:
            raise Failure(f"{role} {cap} is {st[cap]}")
    if st.get("Seccomp") != "2":
        raise Failure(f"{role} Seccomp is {st.get('Seccomp')}, want 2")
    if st.get("NoNewPrivs") != "1":
        raise Failure(f"{role} NoNewPrivs is {st.get('NoNewPrivs')}, want 1")
    root = os.readlink(f"/proc/{pid}/root")
    if root == "/":
        raise Failure(f"{role} is not chrooted")


def test_children_dropped():
    user = pwd.getpwnam("_vmd")
    with plain_vmd() as vmd:
        for role, pid in zip(ROLES, vmd.ready()):
            check_child_dropped(role, pid, user.pw_uid, user.pw_gid)
        parent = status_of(vmd.proc.pid)
        if parent["Uid"].split()[0] != "0":
            raise Failure("the parent is not root")


def test_ps_titles():
    with plain_vmd() as vmd:
        control, switch = vmd.ready()
        out = subprocess.run(["ps", "-eo", "user,pid,args"], capture_output=True, text=True, check=True).stdout
        lines = [l.split(None, 2) for l in out.splitlines() if "vmd:" in l]
        want = {vmd.proc.pid: ("root", "vmd: parent"), control: ("_vmd", "vmd: control"),
                switch: ("_vmd", "vmd: switch")}
        for pid, (user, args) in want.items():
            found = [l for l in lines if len(l) == 3 and l[1] == str(pid)]
            if not found:
                raise Failure(f"ps shows no 'vmd:' line for pid {pid}")
            if (found[0][0], found[0][2].strip()) != (user, args):
                raise Failure(f"ps shows {found[0]}, want {user} {args}")


def test_foreground_runs_in_root():
    """vmd -d, started in some directory, runs in / as vmd.8 says (and
    holds no directory it was started from)."""
    start_dir = tempfile.mkdtemp(prefix="vmd-privsep-cwd-")
    try:
        with plain_vmd(cwd=start_dir) as vmd:
            vmd.ready()
            cwd = os.readlink(f"/proc/{vmd.proc.pid}/cwd")
            if cwd != "/":
                raise Failure(f"vmd -d runs in {cwd}, want /")
    finally:
        shutil.rmtree(start_dir, ignore_errors=True)


def test_control_socket():
    with plain_vmd() as vmd:
        vmd.ready()
        st = os.stat(vmd.sock)
        if not stat.S_ISSOCK(st.st_mode) or stat.S_IMODE(st.st_mode) != 0o660:
            raise Failure(f"socket mode is {oct(st.st_mode)}, want a socket with 0660")
        if (st.st_uid, st.st_gid) != (0, 0):
            raise Failure(f"socket owner is {st.st_uid}:{st.st_gid}, want root:root")
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(WAIT_TIMEOUT)
            s.connect(vmd.sock)
            # Garbage closes this connection (regress/control tests the rest).
            s.sendall(b"\xff" * 20)
            if s.recv(16) != b"":
                raise Failure("control did not close the connection")
        if not vmd.alive():
            raise Failure("vmd died after a connection")


def test_second_vmd_refused():
    with plain_vmd() as first:
        first.ready()
        second = subprocess.run([VMD, "-d", "-f", "/dev/null", "-s", first.sock],
                                capture_output=True, text=True, timeout=WAIT_TIMEOUT)
        if second.returncode == 0 or "in use" not in second.stderr:
            raise Failure(f"second vmd on the same socket: status {second.returncode}, {second.stderr!r}")
        if not os.path.exists(first.sock) or not first.alive():
            raise Failure("the second vmd disturbed the first")


def test_control_restarted():
    with plain_vmd() as vmd:
        control, switch = vmd.ready()
        os.kill(control, signal.SIGKILL)
        new = wait_for("a new control", lambda: (p := vmd.child("control")) != control and p)
        check_child_dropped("control", new, pwd.getpwnam("_vmd").pw_uid, pwd.getpwnam("_vmd").pw_gid)
        if f"control (pid {control}) was killed by SIGKILL; restarting it" not in vmd.log():
            raise Failure("the parent did not log the death and restart")
        if vmd.child("switch") != switch or not vmd.alive():
            raise Failure("switch or parent changed")
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(vmd.sock)


def test_control_crash_loop_backs_off():
    # The 11th death within a minute delays the restart instead of ending
    # vmd (and its VMs).
    with plain_vmd() as vmd:
        control, switch = vmd.ready()
        for _ in range(11):
            os.kill(control, signal.SIGKILL)
            # The last restart comes after the 10s back-off.
            control = wait_for("a new control", lambda: (p := vmd.child("control")) not in (control, None) and p,
                               timeout=10 + WAIT_TIMEOUT)
        if "restarted 10 times in 60s, restarting it in 10s" not in vmd.log():
            raise Failure(f"no back-off logged: {vmd.log()[-400:]}")
        if not vmd.alive() or vmd.child("switch") != switch:
            raise Failure("the parent or switch did not survive the crash loop")
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(vmd.sock)


def test_parent_sigkill():
    with plain_vmd() as vmd:
        pids = vmd.ready()
        vmd.proc.kill()
        vmd.proc.wait()
        # PR_SET_PDEATHSIG: the kernel kills them with the parent; the
        # bound only allows for a loaded machine.
        wait_for("every child to die with the parent", lambda: all(status_of(p) is None for p in pids))


def test_sigterm_shutdown():
    for sig in (signal.SIGTERM, signal.SIGINT):
        with plain_vmd() as vmd:
            pids = vmd.ready()
            vmd.proc.send_signal(sig)
            code = vmd.proc.wait(WAIT_TIMEOUT)
            if code != 0:
                raise Failure(f"vmd exited {code} after {sig.name}, want 0")
            wait_for("every child to die", lambda: all(status_of(p) is None for p in pids))
            if os.path.exists(vmd.sock):
                raise Failure(f"the socket was left behind after {sig.name}")
            if "terminating" not in vmd.log():
                raise Failure("no 'terminating' line in the log")


def test_refused_syscalls():
    for role in ROLES:
        for call, n in TRIGGERS.items():
            case(f"refused_{call}_{role}", lambda role=role, call=call, n=n: refused_one(role, call, n))


def refused_one(role, call, n):
    with plain_vmd(TRIGGER_VMD) as vmd:
        vmd.ready()
        pid = vmd.child(role)
        os.kill(pid, signal.SIGRTMIN + n)
        name = LOGGED_NAME[call]
        wait_for(f"a log line naming {name}",
                 lambda: re.search(rf"^{role}: refused system call {name} \(\d+\)$", vmd.log(), re.M))
        wait_for("the parent's note of the death",
                 lambda: f"{role} (pid {pid}) was killed by a refused system call (SIGSYS); restarting it"
                 in vmd.log())
        if "was allowed to call" in vmd.log():
            raise Failure(f"the filter let {call} through")
        wait_for(f"a new {role}", lambda: (p := vmd.child(role)) not in (None, pid))
        if not vmd.alive():
            raise Failure("the daemon died")


def test_runtime_verbosity():
    with plain_vmd(TRIGGER_VMD) as vmd:
        vmd.ready()
        if "verbosity now" in vmd.log():
            raise Failure("debug lines before -v")
        os.kill(vmd.proc.pid, signal.SIGUSR1)
        for role in ROLES:
            wait_for(f"{role} at verbosity 1", lambda role=role: f"{role}: verbosity now 1" in vmd.log())
        # A child started from now on gets the new level too.
        control = vmd.child("control")
        os.kill(control, signal.SIGKILL)
        wait_for("the new control's debug line", lambda: re.search(r"control \(pid \d+\) ready", vmd.log()))


def test_debug_build_has_no_triggers():
    with open(VMD, "rb") as f:
        if b"was allowed to call" in f.read():
            raise Failure(f"{VMD} contains the test triggers")


def test_not_root_refused():
    nobody = ["setpriv", "--reuid=_vmd", "--regid=_vmd", "--clear-groups", "--"]
    out = subprocess.run(nobody + [VMD, "-d", "-f", "/dev/null", "-s", "/tmp/never.sock"],
                         capture_output=True, text=True, timeout=WAIT_TIMEOUT)
    if out.returncode == 0 or "need root privileges" not in out.stderr:
        raise Failure(f"non-root vmd: status {out.returncode}, {out.stderr!r}")
    out = subprocess.run(nobody + [VMD, "-n", "-f", "/dev/null"], capture_output=True, text=True, timeout=WAIT_TIMEOUT)
    if out.returncode != 0 or "configuration OK" not in out.stderr:
        raise Failure(f"non-root vmd -n: status {out.returncode}, {out.stderr!r}")


def test_daemonize():
    if os.path.exists("/dev/log"):
        raise Skip("/dev/log exists, so vmd logs to syslog, which this test cannot read")
    tmp = tempfile.mkdtemp(prefix="vmd-privsep-")
    sock = os.path.join(tmp, "vmd.sock")
    logfile = "/var/log/vmd/vmd.log"
    daemon_pid = None
    try:
        out = subprocess.run([VMD, "-f", "/dev/null", "-s", sock], capture_output=True, text=True, timeout=WAIT_TIMEOUT)
        if out.returncode != 0:
            raise Failure(f"vmd exited {out.returncode}: {out.stderr!r}")
        if f"logging to {logfile}" not in out.stderr:
            raise Failure(f"vmd did not say where it logs: {out.stderr!r}")
        pattern = re.compile(rf"vmd\[(\d+)\]: control: listening on {re.escape(sock)}$", re.M)

        def started():
            with open(logfile, errors="replace") as f:
                m = pattern.search(f.read())
            return m and int(m.group(1))
        daemon_pid = wait_for(f"the daemon's lines in {logfile}", started)
        st = status_of(daemon_pid)
        if st is None or cmdline(daemon_pid) != "vmd: parent":
            raise Failure(f"pid {daemon_pid} is not a running 'vmd: parent'")
        if st["PPid"] == str(os.getpid()):
            raise Failure("vmd did not detach")
        if os.readlink(f"/proc/{daemon_pid}/cwd") != "/":
            raise Failure(f"the daemon runs in {os.readlink(f'/proc/{daemon_pid}/cwd')}, want /")
        if not all(wait_for(f"{r}", lambda r=r: [p for p in children_of(daemon_pid) if cmdline(p) == f"vmd: {r}"])
                   for r in ROLES):
            raise Failure("children missing")
        os.kill(daemon_pid, signal.SIGTERM)
        wait_for("the daemon to exit", lambda: status_of(daemon_pid) is None)
        with open(logfile, errors="replace") as f:
            if f"vmd[{daemon_pid}]: terminating" not in f.read():
                raise Failure("no 'terminating' line in the log file")
        daemon_pid = None
    finally:
        if daemon_pid is not None:
            kill_pids([daemon_pid] + children_of(daemon_pid))
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    if not t.prepare(guest=False):
        return 1
    build_triggers()
    case("children_dropped", test_children_dropped)
    case("ps_titles", test_ps_titles)
    case("foreground_runs_in_root", test_foreground_runs_in_root)
    case("control_socket", test_control_socket)
    case("second_vmd_refused", test_second_vmd_refused)
    case("control_restarted", test_control_restarted)
    case("control_crash_loop_backs_off", test_control_crash_loop_backs_off)
    case("parent_sigkill", test_parent_sigkill)
    case("sigterm_sigint_shutdown", test_sigterm_shutdown)
    test_refused_syscalls()
    case("runtime_verbosity", test_runtime_verbosity)
    case("debug_build_has_no_triggers", test_debug_build_has_no_triggers)
    case("not_root_refused", test_not_root_refused)
    case("daemonize", test_daemonize)
    return t.summary()


if __name__ == "__main__":
    sys.exit(main())
