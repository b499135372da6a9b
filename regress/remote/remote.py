#!/usr/bin/env python3
"""regress/remote: `vmctl -H [user@]host` through a real sshd. As root.

Each case runs Debian's sshd (openssh-server; regress/setup installs it
without starting the system's) on 127.0.0.1:22 in a network namespace of
the case's own, with a host key, client keys and an ssh_config the case
made in a temp dir, and vmctl in that namespace with
`VMCTL_SSH="ssh -F CONFIG"`. The "remote host" is this machine: sshd's
sessions find the vmctl under test first on their PATH (sshd's SetEnv),
which the setup checks. vmd runs as in every suite (regress/lib), its
socket named to the remote vmctl with -s. Everything (sshd, vmd, VMs,
users, the namespace, the temp dir) goes at the end of each case, even on
failure.
"""

import os
import pty
import pwd
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib"))
import vmdregress  # noqa: E402
from vmdregress import (VMCTL, VMCTL_TIMEOUT, WAIT_TIMEOUT, BOOT_TIMEOUT, Failure, TestUser, Vmd, case,  # noqa: E402
                        expect, expect_equal, ticks, wait_for)

SSHD = "/usr/sbin/sshd"
HOST = "127.0.0.1"
DEMO_CMDLINE = "console=ttyS0 quiet vmd.mode=demo"
PROMPT = "vmd-guest:/# "


class Sshd:
    """sshd -D on 127.0.0.1:22 in a network namespace of its own; clients
    authorized with `authorize(local_user, remote_user)`."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="vmd-remote-")
        os.chmod(self.dir, 0o755)
        self.netns = self.proc = None
        self.keys = os.path.join(self.dir, "authorized")
        self.ids = os.path.join(self.dir, "id")
        self.config = os.path.join(self.dir, "ssh_config")
        self.log_path = os.path.join(self.dir, "sshd.log")
        try:
            self.netns = vmdregress.netns_add()
            self.setup()
        except BaseException:
            self.stop()
            raise

    def setup(self):
        hostkey = os.path.join(self.dir, "hostkey")
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", hostkey])
        os.makedirs(self.keys, 0o755)
        os.makedirs(self.ids, 0o755)
        with open(os.path.join(self.dir, "known_hosts"), "w") as f:
            f.write(f"{HOST} {open(hostkey + '.pub').read()}")
        path = f"{os.path.dirname(VMCTL)}:/usr/bin:/bin"
        sshd_config = os.path.join(self.dir, "sshd_config")
        with open(sshd_config, "w") as f:
            f.write(f"ListenAddress {HOST}:22\nHostKey {hostkey}\nAuthorizedKeysFile {self.keys}/%u\n"
                    "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
                    "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile none\n"
                    f"SetEnv PATH={path}\n")
        with open(self.config, "w") as f:
            f.write(f"Host *\n\tIdentityFile {self.ids}/%u\n\tUserKnownHostsFile {self.dir}/known_hosts\n"
                    "\tGlobalKnownHostsFile /dev/null\n\tStrictHostKeyChecking yes\n\tBatchMode yes\n"
                    "\tConnectTimeout 30\n\tLogLevel ERROR\n")
        # sshd's privilege separation directory (the package makes it when
        # its service starts, which the test never does).
        os.makedirs("/run/sshd", 0o755, exist_ok=True)
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.netns, SSHD, "-D", "-e", "-f", sshd_config],
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        wait_for("sshd to listen", lambda: "Server listening" in self.log() or self.proc.poll() is not None)
        if self.proc.poll() is not None:
            raise Failure(f"sshd exited: {self.log()}")
        self.authorize("root", "root")
        rc, out, err = self.run_as(None, ["ssh", "-F", self.config, f"root@{HOST}", "command -v vmctl"])
        if rc != 0 or out.strip() != VMCTL:
            raise Failure(f"the remote vmctl is not the one under test: exit {rc}: {out.strip()!r} {err.strip()!r}")

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def authorize(self, local_user, remote_user):
        """A key of `local_user`'s (root's or a name's) that logs in as
        `remote_user`."""
        key = os.path.join(self.ids, local_user)
        if not os.path.exists(key):
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key])
            if local_user != "root":
                pw = pwd.getpwnam(local_user)
                os.chown(key, pw.pw_uid, pw.pw_gid)
        with open(os.path.join(self.keys, remote_user), "a") as f:
            f.write(open(key + ".pub").read())

    def run_as(self, user, argv, stdin=subprocess.DEVNULL, timeout=VMCTL_TIMEOUT, **kw):
        """ARGV in the namespace, as root or `user` (a name): (exit, out, err)."""
        prefix = ["ip", "netns", "exec", self.netns]
        if user is not None:
            pw = pwd.getpwnam(user)
            prefix += ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups"]
        p = subprocess.run([*prefix, *argv], stdin=stdin, capture_output=True, timeout=timeout,
                           env=self.env(), **kw)
        if "text" in kw:
            return p.returncode, p.stdout, p.stderr
        return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")

    def env(self):
        return {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": self.dir, "VMCTL_SSH": f"ssh -F {self.config}"}

    def vmctl_argv(self, vmd, remote_user, *args):
        return [VMCTL, "-H", f"{remote_user}@{HOST}", "-s", vmd.sock, *args]

    def vmctl(self, vmd, *args, user=None, remote_user="root"):
        """vmctl -H REMOTE_USER@127.0.0.1 -s SOCK ARGS, run as root or `user`:
        (exit status, stdout + stderr)."""
        rc, out, err = self.run_as(user, self.vmctl_argv(vmd, remote_user, *args))
        return rc, out + err

    def stop(self):
        try:
            if self.proc and self.proc.poll() is None:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            if self.netns:
                vmdregress.netns_delete(self.netns)


def run(argv):
    p = subprocess.run(argv, capture_output=True, text=True)
    if p.returncode != 0:
        raise Failure(f"{' '.join(argv)}: exit {p.returncode}: {p.stderr.strip()}")
    return p.stdout


def remote_case(fn, users=0, **kw):
    """A case with an sshd, a vmd (Vmd(**kw), or made by fn from the users
    when `kw` has `conf_for`) and `users` test users with a login shell."""
    conf_for = kw.pop("conf_for", None)

    def run_case():
        made = []
        sshd = vmd = None
        try:
            for _ in range(users):
                user = TestUser(shell="/bin/sh")
                made.append(user)
                # Not locked (sshd refuses a locked account's keys too).
                subprocess.run(["usermod", "-p", "*", user.name], check=True, capture_output=True)
            sshd = Sshd()
            vmd = Vmd(conf_extra=conf_for(made) if conf_for else "", dir_mode=0o755, **kw)
            fn(sshd, vmd, *made)
        finally:
            if vmd:
                vmd.stop()
            if sshd:
                sshd.stop()
            for user in made:
                user.remove()
    return run_case


# --- cases


def status_through_proxy(sshd, vmd):
    """The table through ssh is the table here; the peer is the ssh user."""
    vmd.start("st1")
    # CURMEM moves while the guest boots: every other column is the same.
    def table(rc_out):
        return rc_out[0], [re.sub(r"^(\s*(?:\S+\s+){4})\S+", r"\1*", line) for line in rc_out[1].splitlines()]
    expect_equal("status through -H", table(sshd.vmctl(vmd, "status")), table(vmd.vmctl("status")))
    rc, out = sshd.vmctl(vmd, "show", "st1")
    expect((rc, out), 0, r"^\s+1\s.*\sst1$", "show st1 through -H")
    rc, out = sshd.vmctl(vmd, "status", "nosuch")
    expect((rc, out), 1, r"vm not found", "status of a VM that does not exist")


def lifecycle_through_ssh(sshd, vmd):
    """start runs whole on the remote host (its paths are that host's; a
    command line with blanks and quotes survives the remote shell);
    pause, unpause, stop -w and wait go through the proxy."""
    cmdline = "console=ttyS0 quiet vmd.mode=test vmd.x='a b'"
    rc, out = sshd.vmctl(vmd, "start", "life1", "-b", vmdregress.KERNEL, "--initrd", vmdregress.INITRD,
                         "--cmdline", cmdline, "-m", "256M")
    m = expect((rc, out), 0, r"^vmctl: started vm (\d+) successfully, tty /dev/pts/\d+$", "remote start")
    vmid = int(re.search(r"started vm (\d+)", m).group(1))
    vmd.track(int(vmd.status_row(vmid)["PID"]))
    vmd.wait_console("life1", "VMD-GUEST: tick 1")
    if f"VMD-GUEST: cmdline {cmdline}" not in vmd.console_log("life1"):
        raise Failure(f"the guest's command line changed on the way: {vmd.console_log('life1')[:600]!r}")
    expect(sshd.vmctl(vmd, "pause", "life1"), 0, rf"^vmctl: paused vm {vmid} successfully$", "pause")
    expect_equal("state after pause", vmd.state(vmid), "paused")
    expect(sshd.vmctl(vmd, "unpause", "life1"), 0, rf"^vmctl: unpaused vm {vmid} successfully$", "unpause")
    before = max(ticks(vmd.console_log("life1")))
    wait_for("ticks after unpause", lambda: max(ticks(vmd.console_log("life1"))) > before, BOOT_TIMEOUT)
    waiter = subprocess.Popen(["ip", "netns", "exec", sshd.netns, *sshd.vmctl_argv(vmd, "root", "wait", "life1")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=sshd.env())
    try:
        registered = rf"connection \d+ waits for vm {vmid}"
        wait_for("the remote wait to reach vmd", lambda: re.search(registered, vmd.log()) or waiter.poll() is not None)
        expect(sshd.vmctl(vmd, "stop", "-w", "life1"), 0, rf"^stopping vm life1: terminated vm {vmid}$", "stop -w")
        out, _ = waiter.communicate(timeout=WAIT_TIMEOUT)
        expect((waiter.returncode, out), 0, rf"^waiting for vm life1: terminated vm {vmid}$", "the remote wait")
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()


def console_through_ssh(sshd, vmd):
    """console runs on the remote host under `ssh -t`, whose own escapes
    are off: ~. is vmctl's and leaves the console."""
    vmd.start("con1", cmdline=DEMO_CMDLINE)
    wait_for("con1's shell prompt", lambda: PROMPT in vmd.console_log("con1"), BOOT_TIMEOUT)
    pid, master = pty.fork()
    if pid == 0:
        os.execvpe("ip", ["ip", "netns", "exec", sshd.netns, *sshd.vmctl_argv(vmd, "root", "console", "con1")],
                   sshd.env())
    text = ""

    def read_until(regex, timeout=WAIT_TIMEOUT):
        nonlocal text
        deadline = time.monotonic() + timeout
        while not re.search(regex, text, re.M):
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failure(f"no {regex!r} from the remote console within {timeout}s: {text[-600:]!r}")
            if select.select([master], [], [], min(left, 0.5))[0]:
                try:
                    text += os.read(master, 4096).decode(errors="replace").replace("\r", "")
                except OSError:
                    raise Failure(f"the remote console closed before {regex!r}: {text[-600:]!r}")

    try:
        read_until(r"Connected to /dev/pts/\d+")
        os.write(master, b"echo hello-$((6*7))\r")
        read_until(r"^hello-42$", 60)
        os.write(master, b"\r~.")
        read_until(r"\[EOT\]")
        _, status = os.waitpid(pid, 0)
        expect_equal("the remote console's exit status", os.waitstatus_to_exitcode(status), 0)
        pid = None
    finally:
        if pid:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(master)


def send_receive_through_ssh(sshd, vmd):
    """`vmctl -H a send web | vmctl -H b receive web2` (both this host):
    the guest goes on counting under its new name without booting again;
    a send whose standard output here is a terminal is refused before
    anything crosses ssh, and the VM keeps running."""
    vmid, _ = vmd.start("mv1", cmdline="console=ttyS0 quiet vmd.mode=test")
    vmd.wait_console("mv1", "VMD-GUEST: tick 2")
    master, slave = pty.openpty()
    try:
        p = subprocess.run(["ip", "netns", "exec", sshd.netns, *sshd.vmctl_argv(vmd, "root", "send", "mv1")],
                           stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE, text=True,
                           env=sshd.env(), timeout=VMCTL_TIMEOUT)
    finally:
        os.close(master)
        os.close(slave)
    expect((p.returncode, p.stderr), 1, r"standard output is a terminal", "send -H to a terminal")
    expect_equal("mv1 after the refused send", vmd.state(vmid), "running")
    send = " ".join(sshd.vmctl_argv(vmd, "root", "send", "mv1"))
    receive = " ".join(sshd.vmctl_argv(vmd, "root", "receive", "mv2"))
    rc, out, err = sshd.run_as(None, ["sh", "-c", f"{send} | {receive}"])
    out = out + err
    expect((rc, out), 0, rf"sent vm {vmid} successfully", "send -H | receive -H")
    m = re.search(r"^vmctl: received vm (\d+) successfully, tty /dev/pts/\d+$", out, re.M)
    if not m:
        raise Failure(f"no `received vm N successfully` from receive -H: {out.strip()!r}")
    new_id = int(m.group(1))
    vmd.track(int(vmd.status_row(new_id)["PID"]))
    expect_equal("mv1 after it was sent", vmd.state(vmid), "gone")
    last = max(ticks(vmd.console_log("mv1")))
    wait_for("mv2 to tick on", lambda: ticks(vmd.console_log("mv2")), BOOT_TIMEOUT)
    log = vmd.console_log("mv2")
    if "VMD-GUEST: booted" in log or min(ticks(log)) <= last - 1:
        raise Failure(f"mv2 booted again instead of going on from tick {last}: {log[:600]!r}")


def users_through_ssh(sshd, vmd, member, outsider):
    """vmd sees the ssh user: a member of the socket's group may use it and
    stop only its own VM; a user the socket refuses is refused remotely."""
    for user in (member, outsider):
        sshd.authorize(user.name, user.name)
    root_id, _ = vmd.start("rootvm")
    rc, out = sshd.vmctl(vmd, "status", user=member.name, remote_user=member.name)
    expect((rc, out), 0, r"\srootvm$", "status as a member")
    rc, out = sshd.vmctl(vmd, "stop", "rootvm", user=member.name, remote_user=member.name)
    expect((rc, out), 1, r"(?i)permission denied|not permitted|operation not", "a member stopping root's VM")
    expect_equal("rootvm after the member's stop", vmd.state(root_id), "running")
    rc, out = sshd.vmctl(vmd, "start", "own1", user=member.name, remote_user=member.name)
    m = expect((rc, out), 0, r"^vmctl: started vm (\d+) successfully", "a member starting its VM")
    own_id = int(re.search(r"started vm (\d+)", m).group(1))
    vmd.track(int(vmd.status_row(own_id)["PID"]))
    expect(sshd.vmctl(vmd, "stop", "-f", "own1", user=member.name, remote_user=member.name), 0,
           rf"forced to terminate vm {own_id}", "a member stopping its VM")
    rc, out = sshd.vmctl(vmd, "status", user=outsider.name, remote_user=outsider.name)
    expect((rc, out), 1, rf"connect: {re.escape(vmd.sock)}: Permission denied", "status as an outsider")
    # Logging in as root with the outsider's key is not possible either.
    rc, out = sshd.vmctl(vmd, "status", user=outsider.name, remote_user="root")
    expect((rc, out), 1, r"ssh to root@127\.0\.0\.1 failed", "the outsider as root")


def users_conf(users):
    member = users[0]
    return (f"socket owner :{member.name}\n"
            f'vm "own1" {{\n\tdisable\n\towner {member.name}\n\tmemory 256M\n\tboot "{vmdregress.KERNEL}"\n'
            f'\tinitrd "{vmdregress.INITRD}"\n\tcmdline "console=ttyS0 quiet"\n}}\n')


def failures(sshd, vmd):
    """ssh's own failures and the remote side's say which they are."""
    rc, out, err = sshd.run_as(None, [VMCTL, "-H", "root@127.0.0.2", "-s", vmd.sock, "status"])
    expect((rc, out + err), 1, r"^vmctl: ssh to root@127\.0\.0\.2 failed", "status through an unreachable host")
    rc, out, err = sshd.run_as(None, [VMCTL, "-H", "root@127.0.0.2", "-s", vmd.sock, "start", "x"])
    expect_equal("start through an unreachable host: ssh's exit status", rc, 255)
    rc, out, err = sshd.run_as(None, [VMCTL, "-H", "-oProxyCommand=touch /tmp/x", "status"])
    expect((rc, out + err), 1, r"invalid host", "a host that is an ssh option")
    rc, out, err = sshd.run_as(None, [VMCTL, "-H", f"root@{HOST}", "-s", "/nonexistent/vmd.sock", "status"])
    expect((rc, out + err), 1, r"connect: /nonexistent/vmd\.sock: No such file or directory",
           "a remote socket that does not exist")


def main():
    if not vmdregress.prepare():
        return 1
    if not os.path.exists(SSHD):
        vmdregress.fail("setup", f"{SSHD} is missing: run sh regress/setup (openssh-server)")
        return vmdregress.summary()
    case("status-through-proxy", remote_case(status_through_proxy))
    case("lifecycle-through-ssh", remote_case(lifecycle_through_ssh))
    case("console-through-ssh", remote_case(console_through_ssh))
    case("send-receive-through-ssh", remote_case(send_receive_through_ssh))
    case("users-through-ssh", remote_case(users_through_ssh, users=2, conf_for=users_conf))
    case("failures", remote_case(failures))
    return vmdregress.summary()


if __name__ == "__main__":
    sys.exit(main())
