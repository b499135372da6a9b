#!/usr/bin/env python3
"""regress/tour: README.md's "A quick tour" works as written.

Runs the tour's commands against a vmd whose vm.conf is the README's, with
its paths moved into a temp dir and the test guest's kernel and initramfs
as the ramdisk: vmd -n, create (qcow2 -s 4.5G, an overlay, a copy with
-i), status, start web as its owner (a test user, in the group `socket
owner` names), the console's tty reachable by that user and the guest
seeing its 4.5G disk, load, reload and log verbose as root.

Runs as root; the user and group are its own, removed at the end, and the
vmd (regress/lib/vmdregress.py) is killed with everything it started.
"""

import grp
import os
import re
import struct
import subprocess
import sys
import shutil
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib"))
import vmdregress as t  # noqa: E402
from vmdregress import VMCTL, VMD, Failure, Vmd, case, expect_equal  # noqa: E402

WEB_DISK = "web.qcow2"
SIZE_4_5G = 4831838208


def run_as(user, args, cwd):
    """Runs a command as `user` (a TestUser) in `cwd`: (status, out+err)."""
    p = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=t.VMCTL_TIMEOUT,
                       user=user.uid, group=user.gid, extra_groups=user.groups)
    return p.returncode, p.stdout + p.stderr


class Owner(t.TestUser):
    """The tour's alice: a user, and a group of its own that `socket
    owner` names, so alice may talk to vmd."""

    def __init__(self):
        super().__init__(prefix="tour")
        self.group = f"{self.name}s"
        subprocess.run(["groupadd", self.group], check=True, capture_output=True)
        subprocess.run(["usermod", "-a", "-G", self.group, self.name], check=True, capture_output=True)
        self.groups = [grp.getgrnam(self.group).gr_gid]

    def remove(self):
        super().remove()
        subprocess.run(["groupdel", self.group], capture_output=True)


def qcow2_backing(path):
    with open(path, "rb") as f:
        header = f.read(24)
        if header[:4] != b"QFI\xfb":
            raise Failure(f"{path} is not a qcow2 image")
        offset, = struct.unpack(">Q", header[8:16])
        size, = struct.unpack(">I", header[16:20])
        f.seek(offset)
        return f.read(size).decode()


def test_tour():
    alice = Owner()
    home = tempfile.mkdtemp(prefix="vmd-tour-")
    # /var/lib/vmd: root's alone, so root opens web's disk there for alice.
    lib = tempfile.mkdtemp(prefix="vmd-tour-lib-")
    vmd = None
    try:
        os.chmod(home, 0o755)
        os.chmod(lib, 0o755)
        os.chown(home, alice.uid, alice.gid)
        # $ vmctl create ...: no daemon needed, as alice in her directory.
        for cmd, said in ((["create", "disk.qcow2", "-s", "4.5G"], "vmctl: qcow2 imagefile created\n"),
                          (["create", "overlay.qcow2", "-b", "disk.qcow2"], "vmctl: qcow2 imagefile created\n"),
                          (["create", "copy.img", "-i", "overlay.qcow2"], "vmctl: raw imagefile created\n")):
            expect_equal(f"vmctl {' '.join(cmd)}", run_as(alice, [VMCTL, *cmd], home), (0, said))
        expect_equal("overlay's base", qcow2_backing(os.path.join(home, "overlay.qcow2")), "disk.qcow2")
        st = os.stat(os.path.join(home, "copy.img"))
        expect_equal("copy.img: alice's, 4.5G", (st.st_uid, st.st_size), (alice.uid, SIZE_4_5G))

        # web's disk, and the README's vm.conf with its paths here.
        web_disk = os.path.join(lib, WEB_DISK)
        expect_equal(f"create {WEB_DISK}", subprocess.run([VMCTL, "create", web_disk, "-s", "4.5G"],
                                                   capture_output=True).returncode, 0)
        conf = f'''ramdisk = "{t.KERNEL}"
socket owner :{alice.group}

vm "web" {{
        disable
        memory 1G
        boot $ramdisk
        initrd "{t.INITRD}"
        cmdline "console=ttyS0"
        disk "{web_disk}"
        owner {alice.name}
}}

switch "uplink" {{
        interface br0
}}
'''
        conf_path = os.path.join(home, "vm.conf")
        with open(conf_path, "w") as f:
            f.write(conf)
        p = subprocess.run([VMD, "-n", "-f", conf_path], capture_output=True, text=True)
        expect_equal("vmd -n", (p.returncode, p.stderr), (0, "configuration OK\n"))

        vmd = Vmd(conf_extra=conf, netns=True)
        os.chmod(vmd.dir, 0o755)
        gid = alice.groups[0]
        t.wait_for("the socket's group", lambda: os.stat(vmd.sock).st_gid == gid)

        def vmctl_alice(*args):
            return run_as(alice, [VMCTL, "-s", vmd.sock, *args], "/")

        # $ vmctl status (as alice: socket owner lets her in).
        rc, out = vmctl_alice("status")
        want = ("   ID   PID VCPUS  MAXMEM  CURMEM     TTY        OWNER    STATE NAME\n"
                "%5s %5s %5s %7s %7s %7s %12s %8s %s\n" % (1, "-", 1, "1.0G", "-", "-", alice.name[:15],
                                                           "stopped", "web"))
        expect_equal("vmctl status as alice", (rc, out), (0, want))

        # $ vmctl start web (alice, the owner).
        rc, out = vmctl_alice("start", "web")
        m = re.fullmatch(r"vmctl: started vm 1 successfully, tty (/dev/pts/\d+)\n", out)
        if rc != 0 or not m:
            raise Failure(f"start web as alice: exit {rc}: {out!r}\n{vmd.log()[-2000:]}")
        tty = m.group(1)
        row = vmd.status_row(1)
        if row["PID"] != "-":
            vmd.track(int(row["PID"]))
        # The console: the pty is alice's, and the guest is up with its disk.
        expect_equal("owner of web's tty", os.stat(tty).st_uid, alice.uid)
        vmd.wait_console("web", "VMD-GUEST: ready")
        if f"VMD-GUEST: disk vda {SIZE_4_5G} bytes rw" not in vmd.console_log("web"):
            raise Failure(f"the guest did not see its 4.5G disk: {vmd.console_log('web')[-1500:]}")

        # # vmctl load /etc/vm.d/more.conf (here: next to vm.conf)
        more = os.path.join(home, "more.conf")
        with open(more, "w") as f:
            f.write(f'vm "db" {{\n disable\n boot "{t.KERNEL}"\n}}\n')
        expect_equal("vmctl load", vmd.vmctl("load", more), (0, ""))
        expect_equal("vmctl load again", vmd.vmctl("load", more),
               (0, f'vmctl: vm "db" ({more}:1): skipped: vm db already exists\n'))
        # # vmctl reload: web keeps running.
        expect_equal("vmctl reload", vmd.vmctl("reload"), (0, ""))
        expect_equal("web after reload", vmd.state(1), "running")
        # # vmctl log verbose
        expect_equal("vmctl log verbose", vmd.vmctl("log", "verbose"), (0, ""))
        t.wait_for("verbose logging", lambda: "control: verbosity now 2" in vmd.log())

        rc, out = vmctl_alice("stop", "web", "-w")
        expect_equal("alice stops web", (rc, out), (0, "stopping vm web: terminated vm 1\n"))
    finally:
        if vmd is not None:
            vmd.stop()
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(lib, ignore_errors=True)
        alice.remove()


def main():
    if not t.prepare():
        return 1
    case("tour", test_tour)
    return t.summary()


if __name__ == "__main__":
    sys.exit(main())
