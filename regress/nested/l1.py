"""The nested KVM host ("L1") of regress/nested, for the suites that run
cases inside it: boots regress/nested/build's initramfs under
`qemu-system-x86_64 -accel tcg -cpu max` (TCG emulates AMD's SVM, so L1
loads kvm_amd and has a real /dev/kvm), and runs shell commands in it over
its second serial port (protocol: regress/nested/init).

    l1 = L1.boot(kernel, initrd)        # waits until L1 answers
    rc, out = l1.sh("cat /proc/cpuinfo")
    l1.check("...")                      # raises Failure unless exit 0
    l1.console()                         # L1's own console (ttyS0) so far
    l1.stop()

Every wait is bounded; when L1 stops answering, every later command
fails at once with the reason.
"""

import base64
import ctypes
import os
import re
import select
import shlex
import shutil
import socket
import subprocess
import tempfile
import time

from vmdregress import Failure

# TCG L1 is slow and this machine is shared: generous bounds.
L1_BOOT_TIMEOUT = 300
COMMAND_TIMEOUT = 300


def die_with_parent():
    """In the child before exec: SIGKILL when the suite dies, however it
    dies, so no L1 outlives it."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)


class L1:
    def __init__(self, kernel, initrd, memory="2G", append=""):
        self.dir = tempfile.mkdtemp(prefix="vmd-regress-nested-")
        self.console_path = os.path.join(self.dir, "console.log")
        self.dead = None
        self.seq = 0
        self.buf = b""
        ours, theirs = socket.socketpair()
        self.sock = ours
        argv = [
            "qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", memory, "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", kernel, "-initrd", initrd,
            "-append", f"console=ttyS0 panic=-1 {append}".strip(),
            "-chardev", f"file,id=console,path={self.console_path}", "-serial", "chardev:console",
            "-chardev", f"socket,id=commands,fd={theirs.fileno()}", "-serial", "chardev:commands",
        ]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, pass_fds=[theirs.fileno()],
                                     start_new_session=True, preexec_fn=die_with_parent)
        theirs.close()

    @classmethod
    def boot(cls, kernel, initrd, **kw):
        """Boots L1 and waits until it answers; stops it on failure."""
        l1 = cls(kernel, initrd, **kw)
        try:
            l1._read_until(re.compile(rb"^NESTED-L1 ready\r?\n", re.M), L1_BOOT_TIMEOUT, "L1's boot")
        except Failure:
            l1.stop()
            raise
        l1.boot_seconds = time.monotonic() - l1.started
        return l1

    def console(self):
        """What L1 printed on its console (ttyS0) so far."""
        try:
            with open(self.console_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def _gone(self, why):
        self.dead = why
        raise Failure(why)

    def _read_until(self, pattern, timeout, what):
        """Reads the command channel until `pattern` matches; returns the
        match and drops what it covers from the buffer."""
        deadline = time.monotonic() + timeout
        while True:
            m = pattern.search(self.buf)
            if m:
                self.buf = self.buf[m.end():]
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                self._gone(f"L1 gave no answer within {timeout}s for {what}; "
                           f"its console ends: {self.console()[-1500:]}")
            r, _, _ = select.select([self.sock], [], [], min(left, 1.0))
            if r:
                data = self.sock.recv(65536)
                if not data:
                    self._gone(f"L1's QEMU closed the command channel during {what}: "
                               f"{self._qemu_output()} console: {self.console()[-1500:]}")
                self.buf += data
            elif self.proc.poll() is not None:
                self._gone(f"L1's QEMU exited ({self.proc.returncode}) during {what}: "
                           f"{self._qemu_output()} console: {self.console()[-1500:]}")

    def _qemu_output(self):
        if self.proc.poll() is None:
            return ""
        return self.proc.stdout.read().decode(errors="replace").strip()

    def sh(self, script, timeout=COMMAND_TIMEOUT):
        """Runs `script` with sh in L1: (exit status, output)."""
        if self.dead:
            raise Failure(f"L1 is gone: {self.dead}")
        self.seq += 1
        line = f"{self.seq} {base64.b64encode(script.encode()).decode()}\n"
        self.sock.sendall(line.encode())
        self._read_until(re.compile(rb"^NESTED-L1 begin %d\r?\n" % self.seq, re.M), timeout,
                         f"command {script[:80]!r}")
        m = self._read_until(re.compile(rb"^NESTED-L1 end %d (\d+)\r?\n" % self.seq, re.M), timeout,
                             f"command {script[:80]!r}")
        # Everything before the end line is the base64 of the output.
        body = m.string[:m.start()]
        out = base64.b64decode(b"".join(body.split())).decode(errors="replace")
        return int(m.group(1)), out

    def check(self, script, timeout=COMMAND_TIMEOUT):
        """sh() that must exit 0; returns the output."""
        rc, out = self.sh(script, timeout)
        if rc != 0:
            raise Failure(f"in L1: {script.strip()!r}: exit {rc}: {out.strip()}")
        return out

    def read(self, path):
        """A file of L1's, or "" if it does not exist."""
        rc, out = self.sh(f"cat {shlex.quote(path)} 2>/dev/null")
        return out if rc == 0 else ""

    def stop(self):
        """Powers L1 off (SIGKILL: nothing in it outlives it)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)
