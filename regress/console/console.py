#!/usr/bin/env python3
"""regress/console: `vmctl console` and `vmctl start -c` against real guests
(the test guest in demo mode: a shell on ttyS0, prompt `vmd-guest:/# `),
QEMU with TCG. As root.

Every console client runs on a pty of its own (os.openpty), the way a
user's terminal would be: the test types into the master side and reads
what vmctl prints, and compares the client pty's termios before and after
a session. Each case has its own vmd (temp dir, socket, vm.conf, console
logs; regress/lib/vmdregress.py) and kills its vmd, VMs and clients at the
end, even on failure.
"""

import grp
import os
import pwd
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import termios
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib"))
import vmdregress  # noqa: E402
from vmdregress import VMCTL, VMCTL_TIMEOUT, WAIT_TIMEOUT, BOOT_TIMEOUT, Failure, TestUser, case, wait_for, with_vmd  # noqa: E402

DEMO_CMDLINE = "console=ttyS0 quiet vmd.mode=demo"
PROMPT = "vmd-guest:/# "
# Clients of the running case, killed at its end.
clients = []


class Client:
    """A vmctl process on a pty of its own."""

    def __init__(self, vmd, *args, user=None):
        self.master, self.slave = os.openpty()
        self.before = termios.tcgetattr(self.slave)
        extra = {}
        if user:
            pw = pwd.getpwnam(user)
            extra = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        self.proc = subprocess.Popen([VMCTL, "-s", vmd.sock, *args], stdin=self.slave, stdout=self.slave,
                                     stderr=self.slave, start_new_session=True, **extra)
        self.text = ""
        clients.append(self)

    def read_until(self, regex, timeout=WAIT_TIMEOUT):
        pattern = re.compile(regex, re.M)
        deadline = time.monotonic() + timeout
        while not pattern.search(self.text):
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failure(f"no {regex!r} from the console within {timeout}s; got {self.text[-600:]!r}")
            r, _, _ = select.select([self.master], [], [], min(left, 0.5))
            if r:
                try:
                    self.text += os.read(self.master, 4096).decode(errors="replace").replace("\r", "")
                except OSError:
                    pass
            elif self.proc.poll() is not None:
                self.drain()
                if not pattern.search(self.text):
                    raise Failure(f"vmctl exited {self.proc.returncode} before {regex!r}: {self.text[-600:]!r}")
        return pattern.search(self.text)

    def drain(self):
        while select.select([self.master], [], [], 0.1)[0]:
            try:
                data = os.read(self.master, 4096)
            except OSError:
                return
            if not data:
                return
            self.text += data.decode(errors="replace").replace("\r", "")

    def attached(self):
        """Waits until vmctl has made its terminal raw."""
        self.read_until(r"^Connected to /dev/pts/\d+")
        wait_for("the client's terminal to be raw",
                 lambda: not termios.tcgetattr(self.slave)[3] & termios.ICANON)

    def type(self, data):
        os.write(self.master, data.encode() if isinstance(data, str) else data)

    def converse(self, timeout=60):
        """Types a line the guest's shell answers and checks the answer
        within `timeout`."""
        token = f"{random.randrange(10**8):08d}"
        self.type(f"echo hello-$((6*7))-{token}\r")
        # The echo of the line shows $((6*7)); only the shell's answer has 42.
        self.read_until(rf"^hello-42-{token}$", timeout)

    def wait(self, timeout=WAIT_TIMEOUT):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise Failure(f"vmctl did not exit within {timeout}s: {self.text[-600:]!r}")

    def check_restored(self, how):
        after = termios.tcgetattr(self.slave)
        if after != self.before:
            raise Failure(f"terminal settings after {how} differ: before {self.before}, after {after}")

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass


def console_case(fn, **kw):
    def run(vmd):
        try:
            fn(vmd)
        finally:
            while clients:
                clients.pop().close()
    return with_vmd(run, **kw)


def demo_vm(vmd, name):
    """Starts a demo-mode guest and waits for its shell's prompt in the
    console log; returns (id, tty)."""
    vmid, tty = vmd.start(name, cmdline=DEMO_CMDLINE)
    wait_for(f"{name}'s shell prompt in the console log", lambda: PROMPT in vmd.console_log(name), BOOT_TIMEOUT)
    return vmid, tty


def running(vmd, vmid):
    row = vmd.status_row(vmid)
    return row is not None and row["STATE"] == "running"


# --- cases


def attach_type_leave(vmd):
    vmid, tty = demo_vm(vmd, "con1")
    # Everything the guest printed before anyone attached is in the log.
    log = vmd.console_log("con1")
    for marker in ("VMD-GUEST: booted", "VMD-GUEST: mode demo", "VMD-GUEST: ready", "Welcome to vmd's test guest"):
        if marker not in log:
            raise Failure(f"{marker!r} not in the console log before attaching")
    c = Client(vmd, "console", "con1")
    c.attached()
    if not c.text.count(tty):
        raise Failure(f"connected to something else than {tty}: {c.text!r}")
    c.converse()
    # ~? lists the escapes and sends nothing; ~~ sends one ~.
    c.type("\r~?")
    c.read_until(r"~\.  leave the console")
    c.type("echo tilde~~x\r")
    c.read_until(r"^tilde~~x$")  # cu semantics apply at line starts only
    # At the start of a line ~~ sends one ~ (cat shows what arrived).
    # The shell prints the marker once it has left its line editor, so
    # what follows is cat's input.
    c.type("echo cat-$((1+1)); cat\r")
    c.read_until(r"^cat-2$")
    c.type("~~tilde-line\r")
    c.read_until(r"^~tilde-line$")
    if "~~tilde-line" in c.text:
        raise Failure(f"~~ sent two tildes: {c.text[-300:]!r}")
    c.type("\x04")
    c.converse()
    c.type("\r~.")
    rc = c.wait()
    if rc != 0:
        raise Failure(f"~. exit {rc}: {c.text[-300:]!r}")
    c.check_restored("~.")
    if not running(vmd, vmid):
        raise Failure(f"the VM does not run after ~.: {vmd.status_row(vmid)}")
    # By id as well, and the session's answer is in the log too.
    c2 = Client(vmd, "console", str(vmid))
    c2.attached()
    c2.converse()
    c2.type("\r~.")
    if c2.wait() != 0:
        raise Failure(f"console {vmid}: {c2.text[-300:]!r}")
    wait_for("the session in the console log", lambda: "hello-42-" in vmd.console_log("con1"))


def second_console_in_use(vmd):
    vmid, _ = demo_vm(vmd, "busy1")
    first = Client(vmd, "console", "busy1")
    first.attached()
    rc, out = vmd.vmctl("console", "busy1")
    if rc != 1 or out.strip() != "vmctl: console is in use":
        raise Failure(f"second console: exit {rc}: {out.strip()!r}")
    # Root is refused as well (no TIOCEXCL bypass), and the first still works.
    first.converse()
    first.type("\r~.")
    if first.wait() != 0:
        raise Failure(f"first console: {first.text[-300:]!r}")
    # Free again: with stdin /dev/null it attaches, reads EOF and leaves.
    rc, out = vmd.vmctl("console", "busy1")
    if rc != 0 or "in use" in out:
        raise Failure(f"console after the first left: exit {rc}: {out.strip()!r}")


def killed_client_does_not_block(vmd):
    demo_vm(vmd, "kill1")
    first = Client(vmd, "console", "kill1")
    first.attached()
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    second = Client(vmd, "console", "kill1")
    second.attached()
    second.converse()
    second.type("\r~.")
    if second.wait() != 0:
        raise Failure(f"console after a killed one: {second.text[-300:]!r}")


def terminal_restored_on_signals_and_vm_end(vmd):
    vmid, _ = demo_vm(vmd, "term1")
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        c = Client(vmd, "console", "term1")
        c.attached()
        c.proc.send_signal(sig)
        rc = c.wait()
        if rc != 1:
            raise Failure(f"console on {sig.name}: exit {rc}: {c.text[-300:]!r}")
        c.check_restored(sig.name)
        c.close()
    # Ctrl-C typed on the console is the guest's, not vmctl's.
    c = Client(vmd, "console", "term1")
    c.attached()
    # ^C once the job is the terminal's foreground (its shell prints the
    # marker, then becomes sleep): the answer within 60s shows it ended
    # the 600s sleep.
    c.type("sh -c 'echo sleeping-$((2+2)); exec sleep 600'\r")
    c.read_until(r"^sleeping-4$")
    c.type("\x03")
    c.converse(60)
    # The VM ending closes the pty: vmctl leaves and restores the terminal.
    rc, out = vmd.vmctl("stop", "-f", str(vmid))
    if rc != 0:
        raise Failure(f"stop -f: exit {rc}: {out.strip()}")
    rc = c.wait()
    c.drain()
    if rc != 0 or "the vm stopped" not in c.text:
        raise Failure(f"console when the VM ended: exit {rc}: {c.text[-300:]!r}")
    c.check_restored("the VM's end")


def start_c_attaches(vmd):
    c = Client(vmd, "start", "sc1", "-c", "-b", vmdregress.KERNEL, "--initrd", vmdregress.INITRD,
               "--cmdline", DEMO_CMDLINE, "-m", "256M")
    m = c.read_until(r"^vmctl: started vm (\d+) successfully, tty (/dev/pts/\d+)$")
    vmid = int(m.group(1))
    row = vmd.status_row(vmid)
    if row:
        vmd.track(int(row["PID"]))
    c.attached()
    c.read_until(re.escape(PROMPT), BOOT_TIMEOUT)
    c.converse()
    c.type("\r~.")
    if c.wait() != 0:
        raise Failure(f"start -c then ~.: {c.text[-300:]!r}")
    c.check_restored("start -c")
    if not running(vmd, vmid):
        raise Failure(f"the VM does not run after ~.: {vmd.status_row(vmid)}")


def not_found(vmd):
    rc, out = vmd.vmctl("console", "off1")
    if rc != 1 or out.strip() != "vmctl: console not found":
        raise Failure(f"console of a stopped VM: exit {rc}: {out.strip()!r}")
    rc, out = vmd.vmctl("console", "nosuchvm")
    if rc != 1 or out.strip() != "vmctl: console not found":
        raise Failure(f"console of an unknown VM: exit {rc}: {out.strip()!r}")
    missing = os.path.join(vmd.dir, "missing.sock")
    p = subprocess.run([VMCTL, "-s", missing, "console", "1"], capture_output=True, text=True, timeout=WAIT_TIMEOUT)
    if p.returncode != 1 or p.stderr.strip() != f"vmctl: connect: {missing}: No such file or directory":
        raise Failure(f"console without vmd: exit {p.returncode}: {p.stderr.strip()!r}")
    rc, out = vmd.vmctl("console")
    if rc != 1 or "usage:" not in out:
        raise Failure(f"console without an id: exit {rc}: {out.strip()!r}")


def owner_may_attach_others_not():
    user = TestUser("vmdcon")
    try:
        conf = "\n".join([
            f"socket owner :{user.name}",
            'vm "own1" {', "\tdisable", '\tboot "@K"', '\tinitrd "@I"', f'\tcmdline "{DEMO_CMDLINE}"',
            "\tmemory 256M", f"\towner {user.name}", "}",
            'vm "grp1" {', "\tdisable", '\tboot "@K"', '\tinitrd "@I"', f'\tcmdline "{DEMO_CMDLINE}"',
            "\tmemory 256M", f"\towner :{user.name}", "}", ""])
        with_vmd_user(user, conf)
    finally:
        user.remove()


def with_vmd_user(user, conf):
    """Runs owner_case with copies of the guest's files the user may read."""
    staging = tempfile.mkdtemp(prefix="vmd-regress-console-files-")
    try:
        os.chmod(staging, 0o755)
        kernel = os.path.join(staging, "vmlinuz")
        initrd = os.path.join(staging, "initramfs.gz")
        shutil.copy(vmdregress.KERNEL, kernel)
        shutil.copy(vmdregress.INITRD, initrd)
        for f in (kernel, initrd):
            os.chmod(f, 0o644)
        conf = conf.replace("@K", kernel).replace("@I", initrd)
        console_case(lambda vmd: owner_case(vmd, user), conf_extra=conf)()
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def owner_case(vmd, user):
    os.chmod(vmd.dir, 0o711)
    # A VM root started: its pty is root's, the user may not open it.
    vmid, tty = demo_vm(vmd, "root1")
    tty_gid = grp.getgrnam("tty").gr_gid
    st = os.stat(tty)
    if (st.st_uid, st.st_gid, st.st_mode & 0o777) != (0, tty_gid, 0o620):
        raise Failure(f"root's VM: {tty} {st.st_uid}:{st.st_gid} mode {oct(st.st_mode & 0o777)}, "
                      f"want 0:{tty_gid} 0620")
    c = Client(vmd, "console", "root1", user=user.name)
    rc = c.wait()
    c.drain()
    if rc != 1 or not re.search(rf"^vmctl: open {tty}: Permission denied$", c.text, re.M):
        raise Failure(f"non-owner console: exit {rc}: {c.text.strip()!r}")
    # The owner starts its VM: the pty is the owner's, 0620.
    p = subprocess.run([VMCTL, "-s", vmd.sock, "start", "own1"], capture_output=True, text=True, timeout=VMCTL_TIMEOUT,
                       user=user.uid, group=user.gid, extra_groups=[])
    m = re.search(r"started vm (\d+) successfully, tty (/dev/pts/\d+)", p.stderr)
    if p.returncode != 0 or not m:
        raise Failure(f"owner's start: exit {p.returncode}: {p.stderr.strip()}")
    own_id, own_tty = int(m.group(1)), m.group(2)
    vmd.track(int(vmd.status_row(own_id)["PID"]))
    st = os.stat(own_tty)
    if (st.st_uid, st.st_gid, st.st_mode & 0o777) != (user.uid, tty_gid, 0o620):
        raise Failure(f"owner's VM: {own_tty} {st.st_uid}:{st.st_gid} mode {oct(st.st_mode & 0o777)}, "
                      f"want {user.uid}:{tty_gid} 0620")
    wait_for("own1's prompt", lambda: PROMPT in vmd.console_log("own1"), BOOT_TIMEOUT)
    c = Client(vmd, "console", "own1", user=user.name)
    c.attached()
    c.converse()
    c.type("\r~.")
    if c.wait() != 0:
        raise Failure(f"owner's console: {c.text[-300:]!r}")
    c.check_restored("the owner's session")
    # The owner group: root starts it, the pty is root's and the group's, 0660.
    rc, out = vmd.vmctl("start", "grp1")
    m = re.search(r"started vm (\d+) successfully, tty (/dev/pts/\d+)", out)
    if rc != 0 or not m:
        raise Failure(f"start grp1: exit {rc}: {out.strip()}")
    grp_id, grp_tty = int(m.group(1)), m.group(2)
    vmd.track(int(vmd.status_row(grp_id)["PID"]))
    held = os.open(grp_tty, os.O_RDWR | os.O_NOCTTY)
    try:
        st = os.fstat(held)
        if (st.st_uid, st.st_gid, st.st_mode & 0o777) != (0, user.gid, 0o660):
            raise Failure(f"grp1: {grp_tty} {st.st_uid}:{st.st_gid} {oct(st.st_mode & 0o777)}, "
                          f"want 0:{user.gid} 0660")
        # When the VM ends its pty goes back to root, 0600.
        rc, out = vmd.vmctl("stop", "-f", "grp1")
        wait_for("grp1 to stop", lambda: not running(vmd, grp_id))
        wait_for("grp1's pty to go back to root",
                 lambda: (os.fstat(held).st_gid, os.fstat(held).st_mode & 0o777) == (0, 0o600))
    finally:
        os.close(held)


def main():
    if not vmdregress.prepare():
        return 1
    disabled = (f'vm "off1" {{\n\tdisable\n\tboot "{vmdregress.KERNEL}"\n}}\n')
    case("attach-type-leave", console_case(attach_type_leave))
    case("second-console-in-use", console_case(second_console_in_use))
    case("killed-client-does-not-block", console_case(killed_client_does_not_block))
    case("terminal-restored-on-signals-and-vm-end", console_case(terminal_restored_on_signals_and_vm_end))
    case("start-c-attaches", console_case(start_c_attaches))
    case("console-not-found-and-usage", console_case(not_found, conf_extra=disabled))
    case("owner-may-attach-others-not", owner_may_attach_others_not)
    return vmdregress.summary()


if __name__ == "__main__":
    sys.exit(main())
