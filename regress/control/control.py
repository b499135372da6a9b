#!/usr/bin/env python3
"""regress/control: the control socket, the VM registry and vmctl's control
commands, checked from the outside.

Runs as root. Creates its own users and groups (unique names, deleted at
the end even on failure); each case starts its own vmd (vmdregress.Vmd:
-d, its own socket, config and log in a temp dir) and kills it and its
children at the end. Non-root vmctl runs as its user with exactly the
groups a case wants, so a group held only as a supplementary group is
tested as such.

The raw-socket cases speak the frame format of common/src/imsg.rs: a
20-byte header (type, payload length, flags, reserved, peer id, pid; little
endian) and a bincode payload. The status request's bytes and the reply
type codes are pinned by the unit test raw_status_request_and_reply_codes.
Shared helpers live in regress/lib/vmdregress.py.
"""

import array
import grp
import os
import pwd
import random
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib"))
import vmdregress as t  # noqa: E402
from vmdregress import (TRIGGER_VMD, VMCTL, VMD, Failure, build_triggers, case, children_of,  # noqa: E402
                        end_vmd, expect_equal, wait_for)

HEADER = struct.Struct("<IIHHII")
# Message::Ctl(CtlRequest::Status) and the answers' type codes.
CTL_STATUS_FRAME = HEADER.pack(5, 2, 0, 0, 0, 0) + b"\x04\x00"
CTL_VM, CTL_VM_END, CTL_FAIL = 7, 8, 12
TABLE_HEAD = "   ID   PID VCPUS  MAXMEM  CURMEM     TTY        OWNER    STATE NAME\n"


# --- users and groups --------------------------------------------------------

TAG = "vc%05x" % (os.getpid() & 0xfffff)


class Accounts:
    """Two users and three groups with unique names, removed at the end."""

    def __init__(self):
        self.users = []
        self.groups = []

    def create(self):
        self.sock_group = self.group(TAG + "s")   # may open the socket
        self.vm_group = self.group(TAG + "g")     # owns a VM
        self.alice = self.user(TAG + "a")
        self.bob = self.user(TAG + "b")

    def group(self, name):
        subprocess.run(["groupadd", name], check=True, capture_output=True)
        self.groups.append(name)
        return grp.getgrnam(name).gr_gid

    def user(self, name):
        subprocess.run(["useradd", "-M", "-U", "-s", "/usr/sbin/nologin", name],
                       check=True, capture_output=True)
        self.users.append(name)
        return pwd.getpwnam(name)

    def remove(self):
        for name in self.users:
            subprocess.run(["userdel", name], capture_output=True)
        for name in self.groups:
            subprocess.run(["groupdel", name], capture_output=True)


ACCOUNTS = None


# --- vmd and vmctl -----------------------------------------------------------

def control_vmd(config, **kw):
    """The harness's vmd with exactly `config` as vm.conf, no -v, and a
    temp dir users may reach (its socket is what `socket owner` opens)."""
    return t.Vmd(conf=config, verbose=False, dir_mode=0o755, **kw)


def row(id_, pid, vcpus, maxmem, curmem, tty, owner, state, name):
    """One status row in OpenBSD's printf format, OWNER cut to 15 bytes."""
    return "%5s %5s %5s %7s %7s %7s %12s %8s %s\n" % (
        id_, pid, vcpus, maxmem, curmem, tty, owner[:15], state, name)


def socket_group_config(extra=""):
    return f"socket owner :{TAG}s\n{extra}"


# --- raw frames --------------------------------------------------------------

def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise Failure(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def raw_status(s):
    """Sends one status request on `s`; returns the number of VMs listed."""
    s.sendall(CTL_STATUS_FRAME)
    count = 0
    while True:
        typ, length, flags, _, _, _ = HEADER.unpack(recv_exact(s, HEADER.size))
        recv_exact(s, length)
        if typ == CTL_VM:
            count += 1
        elif typ == CTL_VM_END:
            return count
        else:
            raise Failure(f"unexpected frame type {typ}")


def connect(vmd, timeout=t.WAIT_TIMEOUT):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(vmd.sock)
    return s


def closed_by_daemon(s):
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


# --- cases -------------------------------------------------------------------

THREE_VMS = """staggered start parallel 1 delay 3600
vm "one" { boot "/k" }
vm "two" { boot "/k" }
vm "three" { disable
  boot "/k"
  memory 1536M
}
"""


def test_status_layout():
    a, g = ACCOUNTS.alice.pw_name, TAG + "g"
    conf = THREE_VMS + f"""vm "mine" {{ disable
  boot "/k"
  memory 4G
  owner {a}
}}
vm "ours" {{ disable
  boot "/k"
  owner {a}:{g}
}}
vm "grp" {{ disable
  boot "/k"
  owner :{g}
}}
"""
    with control_vmd(conf) as vmd:
        # "one" is the first staggered batch: its start fails (no /k)
        # and it is stopped; "two" still waits for the next batch.
        wait_for("the first batch", lambda: "one: failed to start vm 1" in vmd.log())
        code, out, err = vmd.vmctl_streams("status")
        want = (TABLE_HEAD +
                "    1     -     1    512M       -       -         root  stopped one\n"
                "    2     -     1    512M       -       -         root  waiting two\n"
                "    3     -     1    1.5G       -       -         root  stopped three\n" +
                row(4, "-", 1, "4.0G", "-", "-", a, "stopped", "mine") +
                row(5, "-", 1, "512M", "-", "-", f"{a}:{g}", "stopped", "ours") +
                row(6, "-", 1, "512M", "-", "-", f"root:{g}", "stopped", "grp"))
        expect_equal("status output", out, want)
        expect_equal("status exit code", code, 0)
        expect_equal("status stderr", err, "")
        if len(f"{a}:{g}") > 15 and f"{a}:{g}" in out:
            raise Failure("OWNER was not cut to 15 bytes")
        expect_equal("show = status", vmd.vmctl_streams("show")[1], want)
        expect_equal("status two", vmd.vmctl_streams("status", "two")[1], TABLE_HEAD + want.splitlines(True)[2])
        expect_equal("status 3", vmd.vmctl_streams("status", "3")[1], TABLE_HEAD + want.splitlines(True)[3])
        expect_equal("status -r (nothing runs)", vmd.vmctl_streams("status", "-r"), (1, TABLE_HEAD, ""))
        expect_equal("status of an unknown vm", vmd.vmctl_streams("status", "nope"), (1, "", "vmctl: vm not found\n"))
        expect_equal("status of an unknown id", vmd.vmctl_streams("status", "42"), (1, "", "vmctl: vm not found\n"))
        code, _, err = vmd.vmctl_streams("status", "-x")
        expect_equal("status -x", (code, err), (1, "usage:\tvmctl [-v] status [-r] [id]\n"))


def test_socket_mode_and_owner():
    with control_vmd(socket_group_config()) as vmd:
        gid = grp.getgrnam(TAG + "s").gr_gid
        st = wait_for("the socket's group", lambda: (s := os.stat(vmd.sock)).st_gid == gid and s)
        if not stat.S_ISSOCK(st.st_mode) or stat.S_IMODE(st.st_mode) != 0o660 or st.st_uid != 0:
            raise Failure(f"socket mode {oct(st.st_mode)} owner {st.st_uid}:{st.st_gid}")
        # Not in the group: cannot connect at all.
        code, _, err = vmd.vmctl_streams("status", user=ACCOUNTS.alice)
        expect_equal("outsider", (code, err), (1, f"vmctl: connect: {vmd.sock}: Permission denied\n"))


def perm_config():
    a, g = ACCOUNTS.alice.pw_name, TAG + "g"
    return socket_group_config(f"""vm "va" {{ disable
  boot "/k"
  owner {a}
}}
vm "vg" {{ disable
  boot "/k"
  owner :{g}
}}
vm "vr" {{ disable
  boot "/k"
}}
vm "tmpl" {{ disable
  boot "/k"
  allow instance {{ owner {a}
    memory
  }}
}}
""")


def test_non_root_permissions():
    alice, bob = ACCOUNTS.alice, ACCOUNTS.bob
    sock_gid, vm_gid = ACCOUNTS.sock_group, ACCOUNTS.vm_group
    with control_vmd(perm_config()) as vmd:
        gid = grp.getgrnam(TAG + "s").gr_gid
        wait_for("the socket's group", lambda: os.stat(vmd.sock).st_gid == gid)

        def as_alice(*args):
            return vmd.vmctl_streams(*args, user=alice, groups=[sock_gid])

        def as_bob(*args, extra=()):
            return vmd.vmctl_streams(*args, user=bob, groups=[sock_gid, *extra])

        code, out, _ = as_alice("status")
        names = [line.split()[-1] for line in out.splitlines()[1:]]
        expect_equal("alice sees every vm", (code, names), (0, ["va", "vg", "vr", "tmpl"]))
        eperm = "vmctl: command failed: Operation not permitted\n"
        for cmd in (["reload"], ["load", "/dev/null"], ["reset"], ["reset", "vms"],
                    ["log", "verbose"]):
            expect_equal(f"alice {' '.join(cmd)}", as_alice(*cmd), (1, "", eperm))
        # Permission is checked before the state: EPERM for others' VMs,
        # "not running" for one's own.
        expect_equal("alice stop vr", as_alice("stop", "vr"),
               (1, "", "stopping vm vr: failed: Operation not permitted\n"))
        expect_equal("alice stop va", as_alice("stop", "va"),
               (1, "", "stopping vm va: cannot stop vm that is not running\n"))
        expect_equal("alice stop vg (not in the group)", as_alice("stop", "vg"),
               (1, "", "stopping vm vg: failed: Operation not permitted\n"))
        expect_equal("alice wait vr", as_alice("wait", "vr"),
               (1, "", "waiting for vm vr: failed: Operation not permitted\n"))
        expect_equal("alice pause vr", as_alice("pause", "vr"),
               (1, "", "vmctl: pause vm command failed: Operation not permitted\n"))
        expect_equal("alice pause va", as_alice("pause", "va"),
               (1, "", "vmctl: pause vm command failed: vm va is not running\n"))
        expect_equal("alice unpause 1", as_alice("unpause", "1"),
               (1, "", "vmctl: unpause vm command failed: vm va is not running\n"))
        # bob holds the VM's group only as a supplementary group.
        expect_equal("bob stop vg with the group", as_bob("stop", "vg", extra=[vm_gid]),
               (1, "", "stopping vm vg: cannot stop vm that is not running\n"))
        expect_equal("bob pause vg with the group", as_bob("pause", "vg", extra=[vm_gid]),
               (1, "", "vmctl: pause vm command failed: vm vg is not running\n"))
        expect_equal("bob stop vg without it", as_bob("stop", "vg"),
               (1, "", "stopping vm vg: failed: Operation not permitted\n"))
        expect_equal("bob stop va", as_bob("stop", "va", extra=[vm_gid]),
               (1, "", "stopping vm va: failed: Operation not permitted\n"))
        # The primary group counts too (SO_PEERCRED's gid).
        code, _, err = vmd.vmctl_streams("stop", "vg", user=bob, gid=vm_gid, groups=[sock_gid])
        expect_equal("bob with the group as primary", err, "stopping vm vg: cannot stop vm that is not running\n")
        # start: own VMs reach the backend (which finds no /k), others'
        # are refused.
        no_backend = "vmctl: start vm command failed: could not open kernel /k: No such file or directory\n"
        expect_equal("alice start va", as_alice("start", "va"), (1, "", no_backend))
        refusal = f"vr: uid {alice.pw_uid} is not permitted"
        refusals = vmd.log().count(refusal)
        expect_equal("alice start vr", as_alice("start", "vr"),
               (1, "", "vmctl: start vm command failed: Operation not permitted\n"))
        # Logged as refused stops are (the attempt on another's VM).
        wait_for("the refused start in the log", lambda: vmd.log().count(refusal) == refusals + 1)
        expect_equal("bob start vg", as_bob("start", "vg", extra=[vm_gid]), (1, "", no_backend))
        # Only root creates brand-new VMs; instances as `allow instance` says.
        expect_equal("alice new vm", as_alice("start", "fresh", "-b", "/dev/null"),
               (1, "", "vmctl: start vm command failed: vm fresh is not defined: "
                       "only root may create a vm without -t template\n"))
        expect_equal("alice unknown vm, nothing to create it", as_alice("start", "gamma"),
               (1, "", "vmctl: start vm command failed: vm not found\n"))
        expect_equal("alice instance", as_alice("start", "inst1", "-t", "tmpl", "-m", "1G"), (1, "", no_backend))
        expect_equal("alice instance with a disk", as_alice("start", "inst2", "-t", "tmpl", "-d", "/dev/null"),
               (1, "", "vmctl: start vm command failed: the template tmpl does not allow changing disks\n"))
        expect_equal("bob instance (not allowed: an invalid template for him)", as_bob("start", "inst3", "-t", "tmpl"),
               (1, "", "vmctl: invalid template\n"))
        expect_equal("bad template", vmd.vmctl_streams("start", "inst4", "-t", "nope"), (1, "", "vmctl: invalid template\n"))
        expect_equal("root new vm", vmd.vmctl_streams("start", "fresh", "-b", "/dev/null", "-B", "net"),
               (1, "", "vmctl: start vm command failed: boot device net needs a local interface "
                       "(-L or `local interface`), whose DHCP lease names auto_install\n"))
        # Failed starts of new VMs leave nothing behind.
        code, out, _ = vmd.vmctl_streams("status")
        expect_equal("vms after failed starts", [l.split()[-1] for l in out.splitlines()[1:]],
               ["va", "vg", "vr", "tmpl"])
        if "denied reload from uid" not in vmd.log():
            raise Failure("control did not log the refusal")
        vmd.check_alive()


def test_unknown_vm():
    with control_vmd(THREE_VMS) as vmd:
        expect_equal("stop", vmd.vmctl_streams("stop", "nope"), (1, "", "stopping vm nope: vm not found\n"))
        expect_equal("stop by id", vmd.vmctl_streams("stop", "42"), (1, "", "stopping vm: vm not found\n"))
        expect_equal("wait", vmd.vmctl_streams("wait", "nope"), (1, "", "waiting for vm nope: vm not found\n"))
        expect_equal("pause", vmd.vmctl_streams("pause", "nope"),
               (1, "", "vmctl: pause vm command failed: vm not found\n"))
        expect_equal("start by id", vmd.vmctl_streams("start", "42"),
               (1, "", "vmctl: start vm command failed: vm not found\n"))
        expect_equal("start by name", vmd.vmctl_streams("start", "gamma"),
               (1, "", "vmctl: start vm command failed: vm not found\n"))
        expect_equal("stop -a (nothing runs)", vmd.vmctl_streams("stop", "-a"), (0, "", ""))


def test_start_rate_limit():
    # The test build's start window (an hour) holds the four starts
    # however slowly vmctl runs: the refusal depends on vmd's count alone.
    with control_vmd(THREE_VMS, binary=TRIGGER_VMD, env={"VMD_TEST_START_RATE_WINDOW": "3600"}) as vmd:
        no_backend = (1, "", "vmctl: start vm command failed: could not open kernel /k: No such file or directory\n")
        for i in range(3):
            expect_equal(f"start {i + 1}", vmd.vmctl_streams("start", "three"), no_backend)
        expect_equal("start 4", vmd.vmctl_streams("start", "three"),
               (1, "", "vmctl: start vm command failed: vm three restarted too quickly: try again later\n"))
        if "three: vm 3 restarted too quickly" not in vmd.log():
            raise Failure("no rate limit line in the log")


def test_vmctl_command_line():
    with control_vmd(THREE_VMS) as vmd:
        code, _, err = vmd.vmctl_streams("sta")
        if code != 1 or not err.startswith("ambiguous argument: sta\nusage:\tvmctl [-jv] [-H [user@]host] [-s socket] command [arg ...]\n"):
            raise Failure(f"sta: {code} {err!r}")
        code, _, err = vmd.vmctl_streams("frobnicate")
        if code != 1 or not err.startswith("unknown argument: frobnicate\nusage:\tvmctl"):
            raise Failure(f"frobnicate: {code} {err!r}")
        expect_equal("prefix stat", vmd.vmctl_streams("stat")[0], 0)
        expect_equal("log bogus", vmd.vmctl_streams("log", "bogus"), (1, "", "usage:\tvmctl [-v] log brief | verbose\n"))
        expect_equal("log alone", vmd.vmctl_streams("log"), (1, "", "usage:\tvmctl [-v] log brief | verbose\n"))
        expect_equal("reset bogus", vmd.vmctl_streams("reset", "x"), (1, "", "usage:\tvmctl [-v] reset [all | switches | vms]\n"))
        expect_equal("stop usage", vmd.vmctl_streams("stop"), (1, "", "usage:\tvmctl [-v] stop [id | -a] [-fw]\n"))
        expect_equal("stop id and -a", vmd.vmctl_streams("stop", "one", "-a"), (1, "", "vmctl: invalid id: one\n"))
        expect_equal("console", vmd.vmctl_streams("console", "one"), (1, "", "vmctl: console not found\n"))
        expect_equal("send", vmd.vmctl_streams("send", "one"),
                     (1, "", "vmctl: send vm command failed: vm one is not running\n"))
        expect_equal("receive", vmd.vmctl_streams("receive", "x"), (1, "", "vmctl: receive: the stream is empty\n"))
        expect_equal("receive by id", vmd.vmctl_streams("receive", "3"), (1, "", "vmctl: invalid vm name: 3\n"))
        expect_equal("invalid name", vmd.vmctl_streams("start", "b@d", "-b", "/dev/null"),
               (1, "", "vmctl: invalid VM name\n"))
        expect_equal("start warnings", vmd.vmctl_streams("start", "x", "-r", "/dev/null"),
               (1, "", "vmctl: starting without disks\nvmctl: starting without network interfaces\n"
                       "vmctl: specified iso image is not a regular file\n"))
        expect_equal("missing disk", vmd.vmctl_streams("start", "x", "-d", "/nonexistent/d.img"),
               (1, "", "vmctl: invalid disk path: No such file or directory\n"))
        expect_equal("no socket", subprocess.run([VMCTL, "-s", "/nonexistent/s", "status"],
                                           capture_output=True, text=True).stderr,
               "vmctl: connect: /nonexistent/s: No such file or directory\n")
        env = dict(os.environ, VMD_SOCKET=vmd.sock)
        out = subprocess.run([VMCTL, "status"], capture_output=True, text=True, env=env)
        expect_equal("VMD_SOCKET", (out.returncode, out.stdout.splitlines()[0] + "\n"), (0, TABLE_HEAD))
        expect_equal("log verbose", vmd.vmctl_streams("log", "verbose"), (0, "", ""))
        wait_for("verbose logging", lambda: "control: verbosity now 2" in vmd.log())
        expect_equal("log brief", vmd.vmctl_streams("log", "b"), (0, "", ""))


def vm_names(vmd):
    out = vmd.vmctl_streams("status")[1]
    return [(int(l.split()[0]), l.split()[-1], l.split()[-2]) for l in out.splitlines()[1:]]


def test_load_bad_file_changes_nothing():
    with control_vmd(THREE_VMS) as vmd:
        before = vmd.vmctl_streams("status")
        bad = os.path.join(vmd.dir, "bad.conf")
        with open(bad, "w") as f:
            f.write('vm "x1" { boot "/k" }\nvm "x2" { memory 1048575 }\nvm "x3" { nifs 5 }\n')
        code, out, err = vmd.vmctl_streams("load", "bad.conf", cwd=vmd.dir)
        want = (f"memory size must be at least 1MB\n{bad}:2: failed to parse size: 1048575\n"
                f"{bad}:3: syntax error\nvmctl: command failed\n")
        expect_equal("load of a bad file", (code, out, err), (1, "", want))
        expect_equal("status after", vmd.vmctl_streams("status"), before)
        expect_equal("missing file", vmd.vmctl_streams("load", "/nonexistent.conf"),
               (1, "", "failed to open /nonexistent.conf: No such file or directory\nvmctl: command failed\n"))
        good = os.path.join(vmd.dir, "good.conf")
        with open(good, "w") as f:
            f.write('vm "x1" { disable\n boot "/k" }\nvm "one" { disable\n boot "/k"\n memory 2G }\n')
        # "one" exists: load keeps it and says so.
        expect_equal("load a good file (relative path)", vmd.vmctl_streams("load", "good.conf", cwd=vmd.dir),
               (0, "", f'vmctl: vm "one" ({good}:3): skipped: vm one already exists\n'))
        # The load runs the next staggered batch: "two" tries to start (its
        # files are opened off the loop, so it is listed first, as running,
        # until its start fails): wait for that to end.
        wait_for("the batch's start to end", lambda: all(s != "running" for _, _, s in vm_names(vmd)))
        names = vm_names(vmd)
        expect_equal("after load", [n for _, n, _ in names], ["one", "two", "three", "x1"])
        if "2.0G" in vmd.vmctl_streams("status", "one")[1]:
            raise Failure("load replaced an existing vm")


def test_load_never_waits_on_a_file():
    """The attack: `vmctl load FIFO` left the parent blocked in open until
    something wrote to the FIFO, and every client hung; `load /dev/zero`
    would read without end. Now each is refused at once with the file's
    name while another client's status answers."""
    with control_vmd(THREE_VMS) as vmd:
        fifo = os.path.join(vmd.dir, "fifo.conf")
        os.mkfifo(fifo)
        big = os.path.join(vmd.dir, "big.conf")
        with open(big, "w") as f:
            f.truncate(4 * 1024 * 1024 + 1)
        load = subprocess.Popen([VMCTL, "-s", vmd.sock, "load", fifo], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            expect_equal("status beside the load", vmd.vmctl_streams("status")[0], 0)
            out, err = load.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            raise Failure("vmctl load FIFO still waits after 60s")
        finally:
            if load.poll() is None:
                load.kill()
                load.communicate()
        expect_equal("load FIFO", (load.returncode, out, err),
               (1, "", f"failed to read {fifo}: a FIFO, not a regular file\nvmctl: command failed\n"))
        expect_equal("load /dev/zero", vmd.vmctl_streams("load", "/dev/zero"),
               (1, "", "failed to read /dev/zero: a character device, not a regular file\n"
                       "vmctl: command failed\n"))
        expect_equal("load of an oversized file", vmd.vmctl_streams("load", big),
               (1, "", f"failed to read {big}: larger than 4 MiB, the most a configuration file may have\n"
                       "vmctl: command failed\n"))
        expect_equal("vms unchanged", [n for _, n, _ in vm_names(vmd)], ["one", "two", "three"])
        vmd.check_alive()


def test_reload_and_sighup():
    with control_vmd(THREE_VMS) as vmd:
        wait_for("the first batch", lambda: "one: failed to start vm 1" in vmd.log())
        vmd.write_config('vm "three" { disable\n boot "/k" }\nvm "four" { disable\n boot "/k" }\n')
        vmd.proc.send_signal(signal.SIGHUP)
        wait_for("the reload", lambda: "reloaded " in vmd.log())
        expect_equal("after SIGHUP", vm_names(vmd), [(3, "three", "stopped"), (4, "four", "stopped")])
        # Ids are kept per name and owner: "one" comes back as 1.
        vmd.write_config('vm "one" { disable\n boot "/k" }\nvm "four" { disable\n boot "/k" }\n'
                         'vm "five" { disable\n boot "/k" }\n')
        expect_equal("vmctl reload", vmd.vmctl_streams("reload"), (0, "", ""))
        expect_equal("after reload", vm_names(vmd), [(1, "one", "stopped"), (4, "four", "stopped"), (5, "five", "stopped")])
        # A broken file changes nothing.
        vmd.write_config('vm "six" { frob }\n')
        code, _, err = vmd.vmctl_streams("reload")
        if code != 1 or not err.endswith("syntax error\nvmctl: command failed\n"):
            raise Failure(f"reload of a broken file: {code} {err!r}")
        vmd.proc.send_signal(signal.SIGHUP)
        wait_for("the failed reload", lambda: "reload failed; nothing changed" in vmd.log())
        expect_equal("after broken reloads", [n for _, n, _ in vm_names(vmd)], ["one", "four", "five"])
        vmd.check_alive()


def test_reset():
    with control_vmd(THREE_VMS) as vmd:
        expect_equal("reset switches", vmd.vmctl_streams("reset", "switches"), (0, "", ""))
        expect_equal("vms kept", len(vm_names(vmd)), 3)
        expect_equal("reset vms", vmd.vmctl_streams("reset", "vms"), (0, "", ""))
        expect_equal("status after reset", vmd.vmctl_streams("status"), (1, TABLE_HEAD, ""))
        expect_equal("reset", vmd.vmctl_streams("reset"), (0, "", ""))


def test_bad_frames():
    with control_vmd(THREE_VMS) as vmd:
        random.seed(5)
        kinds = {
            "garbage": bytes(random.randrange(256) for _ in range(300)),
            "oversized": HEADER.pack(5, 10 * 1024 * 1024, 0, 0, 0, 0),
            "bad flags": HEADER.pack(5, 2, 0x80, 0, 0, 0) + b"\x04\x00",
            "wrong type": HEADER.pack(6, 2, 0, 0, 0, 0) + b"\x04\x00",
            "undecodable": HEADER.pack(5, 4, 0, 0, 0, 0) + b"\xff\xff\xff\xff",
            "a reply from a client": HEADER.pack(11, 1, 0, 0, 0, 0) + b"\x0a",
            # CtlForward { creds: uid 0, request: Reload }: claimed
            # credentials are never taken from a client.
            "forged credentials": HEADER.pack(6, 6, 0, 0, 0, 0) + b"\x05\x00\x00\x00\x00\x07",
        }
        for what, data in kinds.items():
            with connect(vmd) as s:
                s.sendall(data)
                if not closed_by_daemon(s):
                    raise Failure(f"{what}: the connection stayed open")
            expect_equal(f"status after {what}", vmd.vmctl_streams("status")[0], 0)
        # Truncated: half a frame, then close; half a header, then close.
        for cut in (HEADER.size // 2, len(CTL_STATUS_FRAME) - 1):
            with connect(vmd) as s:
                s.sendall(CTL_STATUS_FRAME[:cut])
            expect_equal(f"status after a frame cut at {cut}", vmd.vmctl_streams("status")[0], 0)
        # A request whose asker leaves before the answer.
        for _ in range(20):
            with connect(vmd) as s:
                s.sendall(CTL_STATUS_FRAME)
        # Silent clients and a half frame held open while others are served.
        silent = [connect(vmd) for _ in range(5)]
        half = connect(vmd)
        half.sendall(CTL_STATUS_FRAME[:7])
        try:
            for _ in range(5):
                expect_equal("status beside silent clients", vmd.vmctl_streams("status")[0], 0)
            with connect(vmd) as s:
                expect_equal("raw status", raw_status(s), 3)
        finally:
            for s in silent + [half]:
                s.close()
        vmd.check_alive()
        if "control (pid" in vmd.log() and "restarting" in vmd.log():
            raise Failure("control was restarted")


def test_load_50x1000():
    with control_vmd(THREE_VMS) as vmd:
        half = connect(vmd)
        half.sendall(CTL_STATUS_FRAME[:13])
        errors = []
        done = [0]
        lock = threading.Lock()

        def client(n):
            try:
                with connect(vmd, timeout=60) as s:
                    for _ in range(1000):
                        got = raw_status(s)
                        if got != 3:
                            raise Failure(f"listed {got} vms")
                        with lock:
                            done[0] += 1
            except Exception as e:
                with lock:
                    errors.append(f"client {n}: {type(e).__name__}: {e}")

        start = time.monotonic()
        threads = [threading.Thread(target=client, args=(n,)) for n in range(50)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        elapsed = time.monotonic() - start
        half.close()
        if errors:
            raise Failure(f"{len(errors)} errors, first: {errors[0]}")
        expect_equal("requests answered", done[0], 50 * 1000)
        vmd.check_alive()
        print(f"# 50 clients x 1000 status requests in {elapsed:.1f}s")
        # And 50 concurrent vmctl processes.
        procs = [subprocess.Popen([VMCTL, "-s", vmd.sock, "status"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE) for _ in range(50)]
        bad = [p for p in procs if p.wait(60) != 0]
        for p in procs:
            p.stdout.close()
            p.stderr.close()
        expect_equal("failed vmctl processes", len(bad), 0)


def test_many_connections():
    with control_vmd(THREE_VMS) as vmd:
        conns = [connect(vmd) for _ in range(300)]
        try:
            for s in conns[::37]:
                expect_equal("status on one of many", raw_status(s), 3)
            expect_equal("vmctl beside 300 connections", vmd.vmctl_streams("status")[0], 0)
        finally:
            for s in conns:
                s.close()


def test_per_user_connection_limit():
    """One user other than root holds at most 256 connections; root is
    still served."""
    alice = ACCOUNTS.alice
    with control_vmd(socket_group_config(THREE_VMS)) as vmd:
        verdict_r, verdict_w = os.pipe()
        release_r, release_w = os.pipe()
        child = os.fork()
        if child == 0:
            try:
                os.close(verdict_r)
                os.close(release_w)
                os.setgroups([ACCOUNTS.sock_group])
                os.setgid(alice.pw_gid)
                os.setuid(alice.pw_uid)
                conns = [connect(vmd) for _ in range(257)]
                served = raw_status(conns[0]) == 3
                os.write(verdict_w, b"1" if served and closed_by_daemon(conns[256]) else b"0")
                os.read(release_r, 1)  # hold them until root has been served
            finally:
                os._exit(0)
        os.close(verdict_w)
        os.close(release_r)
        try:
            # Empty when the child failed before it could say.
            got = os.read(verdict_r, 1)
            expect_equal("alice's first 256 served, the 257th closed", got, b"1")
            expect_equal("root's vmctl beside alice's connections", vmd.vmctl_streams("status")[0], 0)
            if f"refusing a connection from uid {alice.pw_uid}: it has 256 connections open" not in vmd.log():
                raise Failure("the refusal was not logged")
        finally:
            os.close(release_w)
            os.close(verdict_r)
            os.waitpid(child, 0)


# --- issue 13: messages that say what is wrong -------------------------------

def test_messages_say_why():
    """A new user's mistakes, each answered with its reason instead of a
    bare errno (or two messages)."""
    with control_vmd('vm "beta" { disable\n boot "/k" }\n') as vmd:
        expect_equal("options for a configured vm", vmd.vmctl_streams("start", "beta", "-m", "1G"),
               (1, "", f"vmctl: start vm command failed: vm beta is defined in {vmd.conf}: "
                       "only -b and -B may change it\n"))
        expect_equal("memory beyond the limit", vmd.vmctl_streams("start", "big", "-m", "2T", "-b", "/dev/null"),
               (1, "", "vmctl: start vm command failed: memory size out of range: 2.0T (from 1M to 1.0T)\n"))
        if "memory size out of range" not in vmd.log():
            raise Failure("vmd did not log the refused memory size")
        expect_equal("unreadable memory size", vmd.vmctl_streams("start", "big", "-m", "1Q", "-b", "/dev/null"),
               (1, "", "vmctl: invalid memory size: 1Q: invalid size\n"))
        expect_equal("memory below 1M", vmd.vmctl_streams("start", "big", "-m", "1K", "-b", "/dev/null"),
               (1, "", "vmctl: invalid memory size: 1K: must be at least one megabyte\n"))
        long_name = "n" * 70
        for cmd in (["start", long_name], ["stop", long_name], ["status", long_name],
                    ["pause", long_name]):
            expect_equal(f"{cmd[0]} of a 70-byte name", vmd.vmctl_streams(*cmd), (1, "", "vmctl: vm name too long\n"))
        disk = os.path.join(vmd.dir, "raw.img")
        with open(disk, "wb") as f:
            f.truncate(1 << 20)
        expect_equal("one disk given twice", vmd.vmctl_streams("start", "two", "-b", "/dev/null", "-d", disk, "-d", disk),
               (1, "", f"vmctl: disk {disk} is given twice\n"))
        # wait: the condition waited for already holds (OpenBSD: EINVAL).
        expect_equal("wait for a stopped vm", vmd.vmctl_streams("wait", "beta"),
               (0, "", "waiting for vm beta: vm beta is not running\n"))
        expect_equal("wait for a stopped vm by id", vmd.vmctl_streams("wait", "1"),
               (0, "", "waiting for vm: vm 1 is not running\n"))
        # A new VM whose start fails keeps its id for the next try.
        refused = ("vmctl: start vm command failed: boot device net needs a local interface "
                   "(-L or `local interface`), whose DHCP lease names auto_install\n")
        for _ in range(2):
            expect_equal("failing ad hoc start",
                         vmd.vmctl_streams("start", "adhoc", "-b", "/dev/null", "-B", "net"), (1, "", refused))
        expect_equal("another ad hoc start",
                     vmd.vmctl_streams("start", "other", "-b", "/dev/null", "-B", "net"), (1, "", refused))
        log = vmd.log()
        ids = [line.split("failed to start vm ")[1].split(":")[0]
               for line in log.splitlines() if "failed to start vm" in line]
        expect_equal("ids of the failed starts (adhoc, adhoc, other)", ids, ["2", "2", "3"])
        vmd.check_alive()


def test_help_and_usage():
    """--help and COMMAND -h are no mistakes; log needs its word."""
    p = subprocess.run([VMCTL, "--help"], capture_output=True, text=True)
    if p.returncode != 0 or not p.stdout.startswith("usage:\tvmctl [-jv] [-H [user@]host] [-s socket] command [arg ...]\n") \
            or "\tvmctl wait id\n" not in p.stdout or p.stderr:
        raise Failure(f"vmctl --help: {p.returncode} {p.stdout!r} {p.stderr!r}")
    p = subprocess.run([VMCTL, "-s", "/nonexistent/s", "-h"], capture_output=True, text=True)
    expect_equal("vmctl -s S -h", (p.returncode, p.stdout.splitlines()[:1], p.stderr),
           (0, ["usage:\tvmctl [-jv] [-H [user@]host] [-s socket] command [arg ...]"], ""))
    for cmd, line in (("stop", "usage:\tvmctl [-v] stop [id | -a] [-fw]\n"),
                      ("log", "usage:\tvmctl [-v] log brief | verbose\n"),
                      ("stat", "usage:\tvmctl [-v] status [-r] [id]\n")):
        for flag in ("-h", "--help"):
            p = subprocess.run([VMCTL, "-s", "/nonexistent/s", cmd, flag], capture_output=True, text=True)
            expect_equal(f"vmctl {cmd} {flag}", (p.returncode, p.stdout, p.stderr), (0, line, ""))
    p = subprocess.run([VMCTL, "-s", "/nonexistent/s", "log"], capture_output=True, text=True)
    expect_equal("vmctl log alone", (p.returncode, p.stdout, p.stderr),
           (1, "", "usage:\tvmctl [-v] log brief | verbose\n"))


def qcow2_backing_name(path):
    """The backing file name a qcow2 header records (offset 8, size 16)."""
    with open(path, "rb") as f:
        header = f.read(24)
        offset, = struct.unpack(">Q", header[8:16])
        size, = struct.unpack(">I", header[16:20])
        f.seek(offset)
        return f.read(size).decode()


def test_create_records_normalized_backing():
    """`vmctl create -b sub/../base.img` records base.img, not the detour."""
    d = tempfile.mkdtemp(prefix="vmd-control-create-")
    try:
        os.mkdir(os.path.join(d, "sub"))
        real = os.path.realpath(d)

        def create(*args):
            p = subprocess.run([VMCTL, "create", *args], capture_output=True, text=True, cwd=d)
            if p.returncode != 0:
                raise Failure(f"vmctl create {' '.join(args)}: {p.stderr.strip()}")

        create("base.img", "-s", "16M")
        create("ov.qcow2", "-b", "sub/../base.img")
        expect_equal("overlay in the cwd", qcow2_backing_name(os.path.join(d, "ov.qcow2")), "base.img")
        create("ov2.qcow2", "-b", "./base.img")
        expect_equal("./base.img", qcow2_backing_name(os.path.join(d, "ov2.qcow2")), "base.img")
        create("sub/ov3.qcow2", "-b", "sub/../base.img")
        expect_equal("overlay elsewhere", qcow2_backing_name(os.path.join(d, "sub", "ov3.qcow2")),
               os.path.join(real, "base.img"))
        create("plain.qcow2", "-b", "base.img")
        expect_equal("a plain name stays as given", qcow2_backing_name(os.path.join(d, "plain.qcow2")), "base.img")
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --- issue 13: one vmd per socket --------------------------------------------

def run_vmd_on(sock, conf_text, d):
    """Runs another vmd -d on `sock` and returns it once it exited or
    listens: (Popen, log path)."""
    conf = os.path.join(d, "second.conf")
    with open(conf, "w") as f:
        f.write(conf_text)
    log_path = os.path.join(d, "second.log")
    log = open(log_path, "w")
    proc = subprocess.Popen([VMD, "-d", "-f", conf, "-s", sock], stdin=subprocess.DEVNULL,
                            stdout=log, stderr=log, start_new_session=True)
    log.close()
    return proc, log_path


def read(path):
    with open(path, errors="replace") as f:
        return f.read()


def test_one_vmd_per_socket():
    """A second vmd on a socket in use says who has it and starts nothing;
    vmds on different sockets run side by side; a dead vmd's lock and
    socket do not stop the next one; a planted lock file is refused."""
    first_conf = 'staggered start parallel 1 delay 3600\nvm "busy" { boot "/k" }\n'
    with control_vmd(first_conf) as vmd, control_vmd(first_conf) as beside:
        wait_for("the first batch", lambda: "busy: failed to start vm 1" in vmd.log())
        proc, log_path = run_vmd_on(vmd.sock, 'vm "intruder" { boot "/k" }\n', vmd.dir)
        try:
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                end_vmd(proc, children_of(proc.pid))
        out = read(log_path)
        expect_equal("second vmd", (proc.returncode, out),
               (1, f"vmd: socket {vmd.sock} is in use by another vmd (pid {vmd.proc.pid})\n"))
        vmd.check_alive()
        if not stat.S_ISSOCK(os.lstat(vmd.sock).st_mode):
            raise Failure("the first vmd's socket is gone")
        expect_equal("the first vmd still answers", [l.split()[-1] for l in vmd.vmctl_streams("status")[1].splitlines()[1:]],
               ["busy"])
        # Different sockets: side by side.
        expect_equal("the vmd beside it answers", beside.vmctl_streams("status")[0], 0)
        beside.check_alive()

        # A program other than vmd answering on a socket: not replaced.
        other_sock = os.path.join(vmd.dir, "other.sock")
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(other_sock)
        listener.listen(1)
        try:
            proc, log_path = run_vmd_on(other_sock, "", vmd.dir)
            proc.wait(timeout=30)
        finally:
            listener.close()
        expect_equal("vmd on another program's socket", (proc.returncode, read(log_path)),
               (1, f"vmd: socket {other_sock} is in use by another process; "
                   "stop it or choose another path with -s\n"))

        # A lock file planted as a symbolic link is never followed.
        planted = os.path.join(vmd.dir, "planted.sock")
        target = os.path.join(vmd.dir, "precious")
        with open(target, "w") as f:
            f.write("keep me\n")
        os.symlink(target, planted + ".lock")
        proc, log_path = run_vmd_on(planted, "", vmd.dir)
        proc.wait(timeout=30)
        expect_equal("planted symlink", (proc.returncode, read(log_path)),
               (1, f"vmd: {planted}.lock is a symbolic link; remove it or choose another socket path with -s\n"))
        expect_equal("the link's target", read(target), "keep me\n")

        # A lock file others may open (and so hold): refused.
        opened = os.path.join(vmd.dir, "opened.sock")
        with open(opened + ".lock", "w"):
            pass
        os.chmod(opened + ".lock", 0o644)
        proc, log_path = run_vmd_on(opened, "", vmd.dir)
        proc.wait(timeout=30)
        expect_equal("lock file open to others", (proc.returncode, read(log_path)),
               (1, f"vmd: {opened}.lock is open to other users (mode 0600 expected); "
                   "remove it or choose another socket path with -s\n"))

    # A vmd killed outright leaves its socket and lock file: the next
    # one on that socket starts.
    with control_vmd("") as vmd:
        sock, d = vmd.sock, vmd.dir
        os.killpg(vmd.proc.pid, signal.SIGKILL)
        vmd.proc.wait()

        def nobody_answers():
            try:
                connect(vmd, timeout=1).close()
                return False
            except OSError:
                return True
        wait_for("nobody to answer on the socket", nobody_answers)
        expect_equal("left behind", (os.path.exists(sock), os.path.exists(sock + ".lock")), (True, True))
        proc, log_path = run_vmd_on(sock, "", d)
        try:
            wait_for("the next vmd to listen", lambda: "control: listening" in read(log_path)
                     or proc.poll() is not None)
            if proc.poll() is not None:
                raise Failure(f"the next vmd exited: {read(log_path)}")
            with open(sock + ".lock") as f:
                expect_equal("the pid in the lock file", f.read(), f"{proc.pid}\n")
            expect_equal("the lock file's mode", stat.S_IMODE(os.stat(sock + ".lock").st_mode), 0o600)
        finally:
            end_vmd(proc, children_of(proc.pid))
def control_pid(vmd):
    """The pid of vmd's control child."""
    return wait_for("the control child", lambda: next(
        (p for p in children_of(vmd.proc.pid) if t.cmdline(p) == "vmd: control"), None))


def send_with_fds(s, data, fds):
    """Sends `data` with `fds` as SCM_RIGHTS in one sendmsg."""
    s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


def test_descriptor_flood():
    """The attack: an unprivileged user's connections send frames with 64
    descriptors each, more than control's receive buffer holds (the
    kernel installs some, truncates the rest). Control must close what
    arrived and the connection; root's status answers at once, and
    control's and the parent's descriptor counts return to baseline.
    Then the user holds its 256 connections, half of which sent a
    descriptor (refused and closed): each of the others costs control
    exactly one descriptor, and root is still served."""
    alice = ACCOUNTS.alice
    with control_vmd(socket_group_config(THREE_VMS)) as vmd:
        gid = grp.getgrnam(TAG + "s").gr_gid
        wait_for("the socket's group", lambda: os.stat(vmd.sock).st_gid == gid)
        control = control_pid(vmd)
        expect_equal("status before", vmd.vmctl_streams("status")[0], 0)
        base_control, base_parent = t.fd_count(control), t.fd_count(vmd.proc.pid)
        verdict_r, verdict_w = os.pipe()
        release_r, release_w = os.pipe()
        child = os.fork()
        if child == 0:
            try:
                os.close(verdict_r)
                os.close(release_w)
                os.setgroups([ACCOUNTS.sock_group])
                os.setgid(alice.pw_gid)
                os.setuid(alice.pw_uid)
                payload = [os.open("/dev/null", os.O_RDONLY) for _ in range(64)]
                closed = 0
                # 16 leaked per frame before: 1,300 connections filled
                # control's table of 4,096.
                for i in range(1500):
                    with connect(vmd) as s:
                        send_with_fds(s, CTL_STATUS_FRAME if i % 2 else b"x", payload)
                        closed += closed_by_daemon(s)
                held = []
                for i in range(256):
                    s = connect(vmd)
                    if i % 2:
                        send_with_fds(s, CTL_STATUS_FRAME[:7], payload[:1])
                    else:
                        s.sendall(CTL_STATUS_FRAME[:7])
                    held.append(s)
                closed += sum(closed_by_daemon(s) for s in held[1::2])
                os.write(verdict_w, b"%d\n" % closed)
                os.read(release_r, 1)  # hold them until root has looked
            except Exception as e:
                os.write(verdict_w, f"{type(e).__name__}: {e}\n".encode())
            finally:
                os._exit(0)
        os.close(verdict_w)
        os.close(release_r)
        try:
            got = b""
            while not got.endswith(b"\n"):
                chunk = os.read(verdict_r, 16)
                if not chunk:
                    raise Failure(f"the flooding user failed before it said; got {got!r}")
                got += chunk
            if not got.strip().isdigit():
                raise Failure(f"the flooding user failed: {got.decode(errors='replace').strip()}")
            expect_equal("connections with descriptors closed by control", int(got), 1500 + 128)
            wait_for("one descriptor per held connection",
                     lambda: t.fd_count(control) == base_control + 128, timeout=30)
            start = time.monotonic()
            code, out, err = vmd.vmctl_streams("status")
            expect_equal("root's status beside the flood", (code, len(out.splitlines())), (0, 4))
            if time.monotonic() - start > 10:
                raise Failure(f"root's status took {time.monotonic() - start:.1f}s")
        finally:
            os.close(release_w)
            os.close(verdict_r)
            os.waitpid(child, 0)
        wait_for("control's descriptors back at baseline",
                 lambda: t.fd_count(control) == base_control, timeout=30)
        expect_equal("the parent's descriptors", t.fd_count(vmd.proc.pid), base_parent)
        if "refused" in vmd.log() or "restarting" in vmd.log():
            raise Failure(f"unexpected lines in the log: {vmd.log()[-1000:]}")
        vmd.check_alive()
        expect_equal("control is the same process", control_pid(vmd), control)


def test_status_into_a_closed_pipe_or_a_full_disk():
    """`vmctl status | head` and stdout on /dev/full: no panic. A reader
    that went away ends vmctl quietly; a full disk says so; exit 1."""
    with control_vmd(THREE_VMS) as vmd:
        r, w = os.pipe()
        os.close(r)  # closed before vmctl writes: EPIPE for sure
        try:
            p = subprocess.run([VMCTL, "-s", vmd.sock, "status"], stdout=w, stderr=subprocess.PIPE,
                               text=True, timeout=30)
        finally:
            os.close(w)
        expect_equal("status into a closed pipe", (p.returncode, p.stderr), (1, ""))
        p = subprocess.run(f"'{VMCTL}' -s '{vmd.sock}' status | head -0", shell=True,
                           capture_output=True, text=True, timeout=30)
        expect_equal("status | head -0", (p.returncode, p.stdout, p.stderr), (0, "", ""))
        with open("/dev/full", "w") as full:
            p = subprocess.run([VMCTL, "-s", vmd.sock, "status"], stdout=full, stderr=subprocess.PIPE,
                               text=True, timeout=30)
        expect_equal("status > /dev/full", (p.returncode, p.stderr),
               (1, "vmctl: stdout: No space left on device\n"))
        vmd.check_alive()


class SilentVmd:
    """A socket that stands for a vmd that does not answer: it accepts
    connections and never writes (or, with `accept=False`, never accepts,
    its backlog of one filled)."""

    def __init__(self, accept=True):
        self.dir = tempfile.mkdtemp(prefix="vmd-silent-")
        self.sock = os.path.join(self.dir, "vmd.sock")
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(self.sock)
        self.server.listen(0)
        self.held = []
        if accept:
            threading.Thread(target=self.accept, daemon=True).start()
        else:
            filler = socket.socket(socket.AF_UNIX)
            filler.connect(self.sock)
            self.held.append(filler)

    def accept(self):
        while True:
            try:
                self.held.append(self.server.accept()[0])
            except OSError:
                return

    def close(self):
        self.server.close()
        for s in self.held:
            s.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# The test hook that shortens vmctl's bound (client.rs); the real bound is
# ANSWER_TIMEOUT, 60s (START_ANSWER_TIMEOUT, 120s, for a start).
HOOK = "VMCTL_TEST_ANSWER_TIMEOUT"


def test_vmctl_gives_up_on_a_silent_vmd():
    env = dict(os.environ, **{HOOK: "2"})
    silent = SilentVmd()
    try:
        for args in (["status"], ["start", "x"], ["pause", "x"], ["load", "/dev/null"]):
            p = subprocess.run([VMCTL, "-s", silent.sock, *args], capture_output=True, text=True,
                               env=env, timeout=60)
            expect_equal(f"vmctl {' '.join(args)} against a silent vmd", (p.returncode, p.stdout, p.stderr),
                   (1, "", f"vmctl: vmd did not answer within 2s on {silent.sock}; see vmd's log\n"))
        # Waiting is what the user asked for: no bound.
        for args in (["wait", "x"], ["stop", "x", "-w"]):
            p = subprocess.Popen([VMCTL, "-s", silent.sock, *args], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=dict(os.environ, **{HOOK: "1"}))
            try:
                p.wait(5)
                raise Failure(f"vmctl {' '.join(args)} gave up: {p.returncode} {p.stderr.read()!r}")
            except subprocess.TimeoutExpired:
                pass
            finally:
                p.kill()
                p.communicate()
    finally:
        silent.close()
    full = SilentVmd(accept=False)
    try:
        p = subprocess.run([VMCTL, "-s", full.sock, "status"], capture_output=True, text=True,
                           env=env, timeout=60)
        expect_equal("vmctl against a vmd that does not accept", (p.returncode, p.stderr),
               (1, f"vmctl: connect: {full.sock}: vmd did not take the connection within 2s; see vmd's log\n"))
    finally:
        full.close()


def test_too_long_paths_refused_by_vmctl_as_by_vmd():
    long_path = "/" + "a" * 5000
    why = "path too long: 5001 bytes, at most 4095"
    with control_vmd(THREE_VMS) as vmd:
        for opt, what in (("-d", "disk"), ("-b", "boot image"), ("-r", "iso image"), ("--initrd", "initrd")):
            expect_equal(f"start {opt} with a long path", vmd.vmctl_streams("start", "x", "-m", "1G", opt, long_path),
                   (1, "", f"vmctl: invalid {what} path: {why}\n"))
        by_vmd = subprocess.run([VMD, "-n", "-f", long_path], capture_output=True, text=True)
        expect_equal("vmd -n -f with a long path", (by_vmd.returncode, by_vmd.stderr),
               (1, f"failed to open {long_path}: {why}\n"))
        expect_equal("load with a long path", vmd.vmctl_streams("load", long_path), (1, "", "vmctl: " + by_vmd.stderr))
        vmd.check_alive()


def main():
    global ACCOUNTS
    if not t.prepare(guest=False):
        return 1
    build_triggers()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(1))
    try:
        ACCOUNTS = Accounts()
        ACCOUNTS.create()
        case("status_layout", test_status_layout)
        case("per_user_connection_limit", test_per_user_connection_limit)
        case("socket_mode_and_owner", test_socket_mode_and_owner)
        case("non_root_permissions", test_non_root_permissions)
        case("unknown_vm", test_unknown_vm)
        case("start_rate_limit", test_start_rate_limit)
        case("vmctl_command_line", test_vmctl_command_line)
        case("load_bad_file_changes_nothing", test_load_bad_file_changes_nothing)
        case("load_never_waits_on_a_file", test_load_never_waits_on_a_file)
        case("reload_and_sighup", test_reload_and_sighup)
        case("reset", test_reset)
        case("bad_frames", test_bad_frames)
        case("load_50x1000", test_load_50x1000)
        case("many_connections", test_many_connections)
        case("messages_say_why", test_messages_say_why)
        case("help_and_usage", test_help_and_usage)
        case("create_records_normalized_backing", test_create_records_normalized_backing)
        case("one_vmd_per_socket", test_one_vmd_per_socket)
        case("descriptor_flood", test_descriptor_flood)
        case("status_into_a_closed_pipe_or_a_full_disk", test_status_into_a_closed_pipe_or_a_full_disk)
        case("vmctl_gives_up_on_a_silent_vmd", test_vmctl_gives_up_on_a_silent_vmd)
        case("too_long_paths_refused_by_vmctl_as_by_vmd", test_too_long_paths_refused_by_vmctl_as_by_vmd)
    except Exception as e:
        t.fail("control", f"{type(e).__name__}: {e}")
    finally:
        if ACCOUNTS is not None:
            ACCOUNTS.remove()
    return t.summary()


if __name__ == "__main__":
    sys.exit(main())
