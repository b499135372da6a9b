#!/usr/bin/env python3
"""regress/boot: every way to boot, instances and templates, and users'
files, against real guests under vmd (QEMU with TCG). As root.

The BIOS guests are built here: a raw disk whose boot sector prints a
marker through int 10h and halts, and an ISO9660 image with an El Torito
no-emulation boot record holding the same code. SeaBIOS's serial console
carries the marker to the VM's console (pty and console log). Markers are
random per case, so no case can see another's output.

Each case has its own vmd, staging directory and (where it needs one) its
own test user, and removes all of them at the end, even on failure
(regress/lib/vmdregress.py).
"""

import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib"))
import vmdregress  # noqa: E402
from vmdregress import Failure, Pty, TestUser, Vmd, case, wait_for  # noqa: E402

# SeaBIOS to a boot sector's marker: seconds under TCG, more on a loaded machine.
BIOS_TIMEOUT = 60
SECTOR = 2048


# --- the guests


def boot_sector(marker):
    """512 bytes of real-mode code: print `marker` through int 10h
    (teletype), then halt forever. Loaded at 0:7C00 (disk) or 07C0:0
    (El Torito): the message is addressed linearly with DS = 0."""
    code_len = 25
    message = 0x7C00 + code_len
    code = bytes([0x31, 0xC0,        # xor ax, ax
                  0x8E, 0xD8,        # mov ds, ax
                  0xBE]) + struct.pack("<H", message) + bytes([  # mov si, message
                  0xFC,              # cld
                  0xAC,              # next: lodsb
                  0x08, 0xC0,        # or al, al
                  0x74, 0x09,        # jz halt
                  0xB4, 0x0E,        # mov ah, 0eh (teletype)
                  0xBB, 0x07, 0x00,  # mov bx, 7
                  0xCD, 0x10,        # int 10h
                  0xEB, 0xF2,        # jmp next
                  0xF4,              # halt: hlt
                  0xEB, 0xFD])       # jmp halt
    assert len(code) == code_len
    sector = code + marker.encode() + b"\r\n\0"
    return sector.ljust(510, b"\0") + b"\x55\xaa"


def both16(v):
    return struct.pack("<H", v) + struct.pack(">H", v)


def both32(v):
    return struct.pack("<I", v) + struct.pack(">I", v)


def dir_record(lba, size, name):
    body = bytes([0]) + both32(lba) + both32(size) + bytes(7) + bytes([2, 0, 0]) + both16(1)
    body += bytes([len(name)]) + name
    if len(body) % 2 == 0:
        body += b"\0"
    return bytes([len(body) + 1]) + body


def iso_image(boot):
    """A minimal ISO9660 image: primary volume descriptor with an empty
    root directory, El Torito boot record, terminator, boot catalog
    (validation entry and a no-emulation default entry) and the boot
    image."""
    pvd, brvd, term, catalog, root, lpath, mpath, image = range(16, 24)
    total = 24
    iso = bytearray(total * SECTOR)

    def put(sector, data, offset=0):
        start = sector * SECTOR + offset
        iso[start:start + len(data)] = data

    root_dir = dir_record(root, SECTOR, b"\0") + dir_record(root, SECTOR, b"\1")
    put(root, root_dir)
    d = bytearray(SECTOR)
    d[0:7] = b"\x01CD001\x01"
    d[8:40] = b" " * 32
    d[40:72] = b"VMD_REGRESS_BOOT".ljust(32)
    d[80:88] = both32(total)
    d[120:124] = both16(1)
    d[124:128] = both16(1)
    d[128:132] = both16(SECTOR)
    d[132:140] = both32(10)
    d[140:144] = struct.pack("<I", lpath)
    d[148:152] = struct.pack(">I", mpath)
    record = dir_record(root, SECTOR, b"\0")
    d[156:156 + len(record)] = record
    for offset, n in ((190, 128), (318, 128), (446, 128), (574, 128), (702, 37), (739, 37), (776, 37)):
        d[offset:offset + n] = b" " * n
    for offset in (813, 830, 847, 864):
        d[offset:offset + 16] = b"0" * 16
    d[881] = 1
    put(pvd, d)
    b = bytearray(SECTOR)
    b[0:7] = b"\x00CD001\x01"
    b[7:30] = b"EL TORITO SPECIFICATION"
    b[0x47:0x4B] = struct.pack("<I", catalog)
    put(brvd, b)
    put(term, b"\xffCD001\x01")
    validation = bytearray(32)
    validation[0] = 1
    validation[0x1E:0x20] = b"\x55\xaa"
    checksum = -sum(struct.unpack("<16H", bytes(validation))) & 0xFFFF
    validation[0x1C:0x1E] = struct.pack("<H", checksum)
    default = bytearray(32)
    default[0] = 0x88  # bootable, no emulation, load segment 0 (07C0)
    default[6:8] = struct.pack("<H", 4)  # 4 virtual sectors: 2048 bytes
    default[8:12] = struct.pack("<I", image)
    put(catalog, bytes(validation + default))
    put(lpath, struct.pack("<BBIH", 1, 0, root, 1))
    put(mpath, struct.pack(">BBIH", 1, 0, root, 1))
    put(image, boot)
    return bytes(iso)


def marker(tag):
    return f"VMD-BOOT-{tag}-{random.randrange(10**8):08d}"


def write_disk(path, mark, mode=0o644, owner=None):
    with open(path, "wb") as f:
        f.write(boot_sector(mark).ljust(1 << 20, b"\0"))
    finish(path, mode, owner)


def write_iso(path, mark, mode=0o644, owner=None):
    with open(path, "wb") as f:
        f.write(iso_image(boot_sector(mark)))
    finish(path, mode, owner)


def overlay_on(path, base, base_format, owner=None):
    """A qcow2 overlay at `path` on `base` (made by qemu-img, the
    independent tool), owned by `owner` if given."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", base_format, path],
                   check=True, capture_output=True)
    if owner:
        os.chown(path, owner.uid, owner.gid)


def vmctl_create(path, *args):
    """`vmctl create PATH ARGS` (no daemon involved), which must succeed."""
    p = subprocess.run([vmdregress.VMCTL, "create", path, *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise Failure(f"vmctl create {path} {' '.join(args)}: exit {p.returncode}: {p.stderr.strip()}")


def finish(path, mode, owner):
    os.chmod(path, mode)
    if owner:
        os.chown(path, owner.uid, owner.gid)


class Staging:
    """A directory every user may traverse, for a case's files."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="vmd-regress-boot-")
        os.chmod(self.dir, 0o755)

    def path(self, name):
        return os.path.join(self.dir, name)

    def remove(self):
        shutil.rmtree(self.dir, ignore_errors=True)


# --- helpers


def refused(vmd, args, want, user=None):
    """`vmctl start ARGS` (as the user named `user`) must fail and say
    `want`."""
    rc, out = vmd.vmctl("start", *args, user=user)
    if rc == 0 or want not in out:
        raise Failure(f"start {' '.join(args)}: exit {rc}, expected {want!r}: {out.strip()!r}")
    return out


def stop(vmd, name):
    vmd.vmctl("stop", "-f", name)


def qemu_args(vmd, vmid):
    _, qemu = vmd.vm_pids(vmid)
    return vmdregress.cmdline(qemu)


def row_of(vmd, name):
    for row in vmd.status():
        if row["NAME"] == name:
            return row
    return None


def maxmem(vmd, name):
    row = row_of(vmd, name)
    if not row:
        raise Failure(f"{name} is not in status")
    return row["MAXMEM"]


def with_case(fn, conf=None, user=False):
    """Runs fn(vmd, staging[, user]) with a vmd, a staging directory and,
    if asked, a test user who may use vmd's socket; `conf` makes the
    vm.conf text from (staging, user)."""
    def run():
        staging = Staging()
        test_user = TestUser("vmdboot") if user else None
        vmd = None
        try:
            extra = conf(staging, test_user) if conf else ""
            if test_user:
                extra = f"socket owner :{test_user.name}\n{extra}"
            vmd = Vmd(conf_extra=extra)
            if test_user:
                os.chmod(vmd.dir, 0o711)
                fn(vmd, staging, test_user)
            else:
                fn(vmd, staging)
        finally:
            if vmd:
                vmd.stop()
            if test_user:
                test_user.remove()
            staging.remove()
    return run


# --- cases


def bios_boots_a_disk(vmd, staging):
    mark = marker("DISK")
    disk = staging.path("disk.img")
    write_disk(disk, mark)
    vmid, tty = vmd.start_with("bdisk", "-d", disk, "-m", "64M")
    pty = Pty(tty)
    try:
        pty.wait_for(mark, BIOS_TIMEOUT)
    finally:
        pty.close()
    # The VM process writes each chunk to the pty, then to the log.
    vmd.wait_console("bdisk", mark)
    log = vmd.console_log("bdisk")
    if "SeaBIOS" not in log:
        raise Failure(f"console log lacks the BIOS or the marker: {log[-400:]!r}")
    args = qemu_args(vmd, vmid)
    if "-bios /proc/self/fd/" not in args or "etc/sercon-port" not in args or "-kernel" in args:
        raise Failure(f"QEMU is not booting SeaBIOS from a memfd: {args}")
    if maxmem(vmd, "bdisk") != "64.0M":
        raise Failure(f"MAXMEM {maxmem(vmd, 'bdisk')}, expected 64.0M")


def bios_boots_an_iso(vmd, staging):
    mark = marker("ISO")
    iso = staging.path("boot.iso")
    write_iso(iso, mark)
    vmid, _ = vmd.start_with("biso", "-r", iso, "-m", "64M")
    vmd.wait_console("biso", mark, BIOS_TIMEOUT)
    if "Booting from DVD/CD" not in vmd.console_log("biso"):
        raise Failure(f"not booted from the CD: {vmd.console_log('biso')[-400:]!r}")
    args = qemu_args(vmd, vmid)
    if "ide-cd,drive=cd0" not in args or "/dev/fdset/" not in args or iso in args:
        raise Failure(f"the CD-ROM is not passed as an fdset: {args}")


def gone(vmd, name):
    """Waits until the vmctl-started VM `name` has ended (it is no longer
    listed, so its disks are free again)."""
    wait_for(f"{name} to end", lambda: row_of(vmd, name) is None)


def qcow2_shapes(vmd, staging):
    # Every image shape a user makes with vmctl create, all holding the
    # base's boot sector: SeaBIOS reads it through QEMU's qcow2 chain and
    # prints the marker. The bottom layer is raw or (a converted image)
    # qcow2 without a backing file, QEMU's "backing": null.
    mark = marker("QCOW2")
    raw = staging.path("base.img")
    write_disk(raw, mark)
    on_raw, converted = staging.path("on-raw.qcow2"), staging.path("converted.qcow2")
    on_qcow2, three = staging.path("on-qcow2.qcow2"), staging.path("three.qcow2")
    back = staging.path("back.img")
    vmctl_create(on_raw, "-b", raw)
    vmctl_create(converted, "-i", raw)
    vmctl_create(on_qcow2, "-b", converted)
    vmctl_create(three, "-b", on_raw)
    vmctl_create(back, "-i", three)
    # (name, disk, its nodes without a backing file)
    shapes = (("qonraw", on_raw, 0), ("qconv", converted, 1), ("qonqcow", on_qcow2, 1),
              ("qthree", three, 0), ("qback", back, 0))
    for name, disk, nulls in shapes:
        vmid, _ = vmd.start_with(name, "-d", disk, "-m", "64M")
        args = qemu_args(vmd, vmid)
        vmd.wait_console(name, mark, BIOS_TIMEOUT)
        if args.count('"backing":null') != nulls:
            raise Failure(f"{name}: expected {nulls} node(s) with \"backing\":null: {args}")
        stop(vmd, name)
        gone(vmd, name)


def lone_qcow2_written_and_read_back(vmd, staging):
    # The "done when": vmctl create x.qcow2 -s 1G, then vmctl
    # start x -b KERNEL -d x.qcow2 (the test guest also needs its initrd).
    # The guest writes a word at the start of the disk; a second boot
    # reads it back, qemu-img finds the image consistent, and vmctl's
    # converter reads the word QEMU wrote.
    word = f"VMDWRITE{random.randrange(10**8):08d}"
    disk = staging.path("x.qcow2")
    vmctl_create(disk, "-s", "1G")
    kernel = ("-b", vmdregress.KERNEL, "--initrd", vmdregress.INITRD)
    vmd.start_with("x", *kernel, "--cmdline", f"console=ttyS0 quiet vmd.diskwrite=vda:{word}", "-d", disk)
    vmd.wait_console("x", f"VMD-GUEST: wrote vda {word}")
    vmd.wait_console("x", "VMD-GUEST: ready")
    if "VMD-GUEST: disk vda 1073741824 bytes rw" not in vmd.console_log("x"):
        raise Failure(f"the guest does not see a 1G disk: {vmd.console_log('x')[-600:]!r}")
    rc, out = vmd.vmctl("stop", "x", "-w")
    if rc != 0:
        raise Failure(f"stop x -w: exit {rc}: {out.strip()}")
    gone(vmd, "x")
    p = subprocess.run(["qemu-img", "check", "-f", "qcow2", disk], capture_output=True, text=True)
    if p.returncode != 0:
        raise Failure(f"qemu-img check after the guest wrote: {p.stdout}{p.stderr}")
    vmd.start_with("x2", *kernel, "--cmdline", "console=ttyS0 quiet", "-d", disk)
    vmd.wait_console("x2", f"VMD-GUEST: disk vda head {word}.")
    stop(vmd, "x2")
    gone(vmd, "x2")
    raw = staging.path("x.img")
    vmctl_create(raw, "-i", disk)
    with open(raw, "rb") as f:
        head = f.read(len(word) + 1)
    if head != word.encode() + b"\0":
        raise Failure(f"the converted image starts with {head!r}, not {word!r}")


def boot_order_conf(staging, _user):
    return "\n".join([
        'vm "cfgdisk" {', "\tdisable", "\tmemory 64M", f'\tdisk "{staging.path("cfg.img")}"',
        f'\tcdrom "{staging.path("order.iso")}"', "\tboot device disk", "}", ""])


def boot_order(vmd, staging):
    disk_mark, cd_mark = marker("ORDER-DISK"), marker("ORDER-CD")
    iso = staging.path("order.iso")
    write_iso(iso, cd_mark)
    # One disk per VM: a disk is locked by the VM that writes it.
    expected = {}
    for name, flags, want in (("odefault", [], cd_mark), ("odisk", ["-B", "disk"], disk_mark),
                              ("ocdrom", ["-B", "cdrom"], cd_mark)):
        disk = staging.path(f"{name}.img")
        write_disk(disk, disk_mark)
        vmd.start_with(name, "-d", disk, "-r", iso, "-m", "64M", *flags)
        expected[name] = want
    write_disk(staging.path("cfg.img"), disk_mark)
    vmd.start_with("cfgdisk")
    expected["cfgdisk"] = disk_mark
    for name, want in expected.items():
        vmd.wait_console(name, want, BIOS_TIMEOUT)
        other = cd_mark if want == disk_mark else disk_mark
        if other in vmd.console_log(name):
            raise Failure(f"{name} booted both devices: {vmd.console_log(name)[-400:]!r}")
    # -B on a configured VM changes its next boot.
    stop(vmd, "cfgdisk")
    wait_for("cfgdisk to stop", lambda: row_of(vmd, "cfgdisk")["STATE"] == "stopped")
    os.unlink(os.path.join(vmd.console_dir, "cfgdisk.console"))
    vmd.start_with("cfgdisk", "-B", "cdrom")
    vmd.wait_console("cfgdisk", cd_mark, BIOS_TIMEOUT)


def refusals_conf(staging, _user):
    return "\n".join([
        'vm "nocd" {', "\tdisable", "\tmemory 64M", f'\tcdrom "{staging.path("missing.iso")}"', "}",
        'vm "dircd" {', "\tdisable", "\tmemory 64M", f'\tcdrom "{staging.dir}"', "}", ""])


def refusals(vmd, staging):
    disk = staging.path("disk.img")
    write_disk(disk, marker("NET"))
    out = refused(vmd, ["bnet", "-d", disk, "-B", "net"], "boot device net")
    if "needs a local interface" not in out:
        raise Failure(f"-B net without a local interface is not refused: {out!r}")
    refused(vmd, ["nocd"], "vmctl: could not find specified iso image")
    refused(vmd, ["dircd"], "vmctl: specified iso image is not a regular file")
    fifo = staging.path("fifo.iso")
    os.mkfifo(fifo)
    refused(vmd, ["fifocd", "-r", fifo, "-m", "64M"], "vmctl: specified iso image is not a regular file")
    # Nothing was left running or registered by the refusals.
    names = {row["NAME"] for row in vmd.status()}
    if names != {"nocd", "dircd"}:
        raise Failure(f"status after refusals: {names}")


def instances_conf(staging, user):
    k, i = vmdregress.KERNEL, vmdregress.INITRD
    return "\n".join([
        'vm "ktpl" {', "\tdisable", f'\tboot "{k}"', f'\tinitrd "{i}"', '\tcmdline "console=ttyS0 quiet"',
        "\tmemory 256M", f'\tdisk "{staging.path("tpl.img")}"',
        f"\tallow instance {{ memory, owner {user.name} }}", "}",
        'vm "ktpl" instance "kinst" {', "\tdisable", "\tmemory 320M", "}",
        'vm "closed" {', "\tdisable", f'\tboot "{k}"', "}", ""])


def instances(vmd, staging, user):
    write_disk(staging.path("tpl.img"), marker("TPL"))
    own = staging.path("own.img")
    write_disk(own, marker("OWN"), owner=user)
    # vm.conf's instance inherits the template and sets its own memory.
    if maxmem(vmd, "kinst") != "320M":
        raise Failure(f"kinst MAXMEM {maxmem(vmd, 'kinst')}, expected 320M")
    # A user allowed `memory` runs an instance with more; the guest sees it.
    vmid, _ = vmd.start_with("big", "-t", "ktpl", "-m", "384M", user=user.name)
    if maxmem(vmd, "big") != "384M":
        raise Failure(f"instance MAXMEM {maxmem(vmd, 'big')}, expected 384M")
    row = vmd.status_row(vmid)
    if row["OWNER"] != user.name:
        raise Failure(f"instance owner {row['OWNER']}, expected {user.name}")
    vmd.wait_console("big", "VMD-GUEST: ready")
    m = vmdregress.re.search(r"VMD-GUEST: memory (\d+) kB", vmd.console_log("big"))
    if not m or int(m.group(1)) <= 256 * 1024:
        raise Failure(f"the guest does not see more than 256M: {m and m.group(0)}")
    stop(vmd, "big")
    # Not allowed `disk`; a template that allows no instances; none at all.
    refused(vmd, ["withdisk", "-t", "ktpl", "-d", own],
            "vmctl: start vm command failed: the template ktpl does not allow changing disks", user=user.name)
    refused(vmd, ["nope", "-t", "closed"], "vmctl: invalid template", user=user.name)
    refused(vmd, ["nope", "-t", "nosuchvm"], "vmctl: invalid template", user=user.name)
    # Root may change anything but not reuse the template's disk.
    refused(vmd, ["reuse", "-t", "ktpl", "-d", staging.path("tpl.img")],
            f"vmctl: start vm command failed: disk {staging.path('tpl.img')} of ktpl cannot be reused")


def files_conf(staging, user):
    return "\n".join([
        'vm "btpl" {', "\tdisable", "\tmemory 64M",
        f"\tallow instance {{ boot, cdrom, disk, memory, owner {user.name} }}", "}", ""])


def users_files(vmd, staging, user):
    mark = marker("USER")
    own = staging.path("own.img")
    write_disk(own, mark, mode=0o600, owner=user)
    root_only = staging.path("root-only.img")
    write_disk(root_only, marker("ROOT"), mode=0o600)
    read_only = staging.path("read-only.img")
    write_disk(read_only, marker("RO"), mode=0o644)
    base = staging.path("base.img")
    write_disk(base, marker("BASE"), mode=0o600)
    overlay = staging.path("overlay.qcow2")
    overlay_on(overlay, base, "raw", owner=user)
    link = staging.path("link.img")
    os.symlink(root_only, link)
    os.lchown(link, user.uid, user.gid)
    iso = staging.path("root-only.iso")
    write_iso(iso, marker("ROOTISO"), mode=0o600)
    kernel, initrd = staging.path("vmlinuz"), staging.path("initrd.gz")
    for src, dst, mode in ((vmdregress.KERNEL, kernel, 0o600), (vmdregress.INITRD, initrd, 0o600)):
        shutil.copyfile(src, dst)
        finish(dst, mode, user)
    root_kernel = staging.path("root-vmlinuz")
    shutil.copyfile(vmdregress.KERNEL, root_kernel)
    os.chmod(root_kernel, 0o600)

    # What the user may read (and write) boots.
    vmd.start_with("uown", "-t", "btpl", "-d", own, user=user.name)
    vmd.wait_console("uown", mark, BIOS_TIMEOUT)
    stop(vmd, "uown")
    vmd.start_with("ukern", "-t", "btpl", "-b", kernel, "--initrd", initrd, "--cmdline",
                   "console=ttyS0 quiet", "-m", "256M", user=user.name)
    vmd.wait_console("ukern", "VMD-GUEST: booted")
    stop(vmd, "ukern")
    # What it may not is refused, naming the file.
    for name, args, path in (("uroot", ["-d", root_only], root_only),
                             ("uro", ["-d", read_only], read_only),
                             ("uqcow", ["-d", overlay], base),
                             ("ulink", ["-d", link], root_only),
                             ("uiso", ["-r", iso], iso),
                             ("ukroot", ["-b", root_kernel], root_kernel)):
        refused(vmd, [name, "-t", "btpl", *args], f"{path}: permission denied", user=user.name)
    # Root opens its own files itself, but an image another user owns
    # names its backing files itself: it and its chain are opened with
    # its owner's rights, even for root, so the user's overlay cannot
    # make root hand the root-only base to a guest.
    root_overlay = staging.path("root-overlay.qcow2")
    overlay_on(root_overlay, base, "raw")
    vmd.start_with("rootq", "-t", "btpl", "-d", root_overlay)
    stop(vmd, "rootq")
    refused(vmd, ["rootu", "-t", "btpl", "-d", overlay], f"{base}: permission denied")
    # The same a layer further down: root's overlay on the user's qcow2,
    # whose own backing file is the root-only base.
    user_mid = staging.path("user-mid.qcow2")
    overlay_on(user_mid, base, "raw", owner=user)
    root_top = staging.path("root-top.qcow2")
    overlay_on(root_top, user_mid, "qcow2")
    refused(vmd, ["rootm", "-t", "btpl", "-d", root_top], f"{base}: permission denied")
    # Root's overlay on a user's qcow2 whose backing file that user may
    # read boots: the layers below are the user's, opened as the user.
    user_base = staging.path("user-base.qcow2")
    overlay_on(user_base, own, "raw", owner=user)
    root_top2 = staging.path("root-top2.qcow2")
    overlay_on(root_top2, user_base, "qcow2")
    vmd.start_with("rootok", "-t", "btpl", "-d", root_top2)
    vmd.wait_console("rootok", mark, BIOS_TIMEOUT)
    stop(vmd, "rootok")
    # A root-owned layer others may write names nothing root follows.
    os.chmod(root_overlay, 0o666)
    refused(vmd, ["rootw", "-t", "btpl", "-d", root_overlay],
            f"{root_overlay}: writable by users other than root: its backing file is not followed")
    if "permission denied" not in vmd.log():
        raise Failure("vmd did not log the refusals")


def as_user(user, *argv):
    """Runs argv as `user` (its own uid and group, no others)."""
    subprocess.run(argv, check=True, capture_output=True, user=user.uid, group=user.gid, extra_groups=[])


def user_dir(staging, user):
    """A directory of the user's own in the staging directory."""
    d = staging.path(f"home-{user.name}")
    if not os.path.isdir(d):
        os.mkdir(d, 0o755)
        os.chown(d, user.uid, user.gid)
    return d


def root_secret(staging, mark):
    """A bootable disk printing `mark`, mode 0600 in a root 0700
    directory: what no user may read."""
    d = staging.path("root-only")
    os.makedirs(d, 0o700, exist_ok=True)
    os.chmod(d, 0o700)
    secret = os.path.join(d, "secret.img")
    write_disk(secret, mark, mode=0o600)
    return secret


def wait_stopped(vmd, name):
    wait_for(f"{name} to stop", lambda: row_of(vmd, name)["STATE"] == "stopped")


def refused_quietly(vmd, name, want, secret_mark, user=None):
    """Starting configured VM `name` (as `user`) fails saying `want`, and
    no console ever showed the secret disk's marker."""
    refused(vmd, [name], want, user=user and user.name)
    if secret_mark in vmd.console_log(name):
        raise Failure(f"{name} booted the secret disk")


def swap_conf(staging, user):
    home = user_dir(staging, user)
    return "\n".join([
        'vm "swap" {', "\tdisable", "\tmemory 64M", f'\tdisk "{home}/disk.img"', f"\towner {user.name}", "}",
        'vm "rootmade" {', "\tdisable", "\tmemory 64M", f'\tdisk "{home}/rootmade.img"', f"\towner {user.name}",
        "}",
        'vm "chain" {', "\tdisable", "\tmemory 64M", f'\tdisk "{staging.path("root-only")}/top.qcow2"',
        f"\towner {user.name}", "}",
        'vm "chainroot" {', "\tdisable", "\tmemory 64M",
        f'\tdisk "{staging.path("root-only")}/top2.qcow2"', "}", ""])


def owner_symlink_swap(vmd, staging, user):
    home = user_dir(staging, user)
    secret_mark = marker("SECRET")
    secret = root_secret(staging, secret_mark)
    # The owner's own disk, in its own directory, boots with its rights.
    mark = marker("SWAP")
    disk = os.path.join(home, "disk.img")
    write_disk(disk, mark, mode=0o600, owner=user)
    vmd.start_with("swap", user=user.name)
    vmd.wait_console("swap", mark, BIOS_TIMEOUT)
    stop(vmd, "swap")
    wait_stopped(vmd, "swap")
    # The owner swaps it for a symlink to root's secret disk: whoever
    # starts the VM, the path is opened with the owner's rights.
    os.unlink(os.path.join(vmd.console_dir, "swap.console"))
    as_user(user, "rm", disk)
    as_user(user, "ln", "-s", secret, disk)
    refused_quietly(vmd, "swap", f"{disk}: permission denied", secret_mark, user=user)
    refused_quietly(vmd, "swap", f"{disk}: permission denied", secret_mark)
    # A file root made in the owner's directory is not the owner's to
    # open either (another VM: each refusal counts toward the start rate
    # limit).
    rootmade = os.path.join(home, "rootmade.img")
    write_disk(rootmade, marker("ROOTINHOME"), mode=0o600)
    refused(vmd, ["rootmade"], f"{rootmade}: permission denied", user=user.name)
    if "permission denied" not in vmd.log():
        raise Failure("vmd did not log the refusals")


def backing_swap(vmd, staging, user):
    """Root's qcow2 in a root-only directory whose backing file lies in
    the owner's directory, which the owner swaps for a symlink."""
    home = user_dir(staging, user)
    secret_mark = marker("SECRET")
    secret = root_secret(staging, secret_mark)
    mark = marker("BACKING")
    base = os.path.join(home, "base.img")
    write_disk(base, mark, mode=0o644, owner=user)
    for top in ("top.qcow2", "top2.qcow2"):
        overlay_on(os.path.join(os.path.dirname(secret), top), base, "raw")
    vmd.start_with("chain", user=user.name)
    vmd.wait_console("chain", mark, BIOS_TIMEOUT)
    stop(vmd, "chain")
    wait_stopped(vmd, "chain")
    os.unlink(os.path.join(vmd.console_dir, "chain.console"))
    as_user(user, "rm", base)
    as_user(user, "ln", "-s", secret, base)
    refused_quietly(vmd, "chain", f"{base}: permission denied", secret_mark, user=user)
    # Without an owner, the directory's owner's rights: no better.
    refused_quietly(vmd, "chainroot", f"{base}: permission denied", secret_mark)


def proc_conf(staging, user):
    return "\n".join([
        'vm "ptpl" {', "\tdisable", "\tmemory 64M",
        f"\tallow instance {{ boot, disk, memory, owner {user.name} }}", "}", ""])


def proc_magic_links(vmd, staging, user):
    """A root process's /proc/PID/cwd link into a directory under a root
    0700 one as a user's backing file, and /proc/kallsyms as its initrd."""
    secret_mark = marker("SECRET")
    hidden = os.path.join(os.path.dirname(root_secret(staging, secret_mark)), "inside")
    os.mkdir(hidden, 0o755)
    write_disk(os.path.join(hidden, "open.img"), secret_mark, mode=0o644)
    sleeper = subprocess.Popen(["sleep", "300"], cwd=hidden)
    try:
        via_proc = f"/proc/{sleeper.pid}/cwd/open.img"
        overlay = os.path.join(user_dir(staging, user), "proc.qcow2")
        overlay_on(overlay, via_proc, "raw", owner=user)
        refused(vmd, ["pcwd", "-t", "ptpl", "-d", overlay], f"{via_proc}: permission denied", user=user.name)
        if secret_mark in vmd.console_log("pcwd"):
            raise Failure("the guest read the file behind /proc/PID/cwd")
    finally:
        sleeper.kill()
        sleeper.wait()
    kernel = os.path.join(user_dir(staging, user), "vmlinuz")
    shutil.copyfile(vmdregress.KERNEL, kernel)
    finish(kernel, 0o600, user)
    out = refused(vmd, ["pkall", "-t", "ptpl", "-b", kernel, "--initrd", "/proc/kallsyms", "-m", "256M"],
                  "could not open initrd /proc/kallsyms", user=user.name)
    if "pseudo file system" not in out:
        raise Failure(f"/proc/kallsyms is not refused as a pseudo file system: {out.strip()!r}")
    # Root's own requests too.
    refused(vmd, ["pkroot", "-b", kernel, "--initrd", "/proc/kallsyms", "-m", "256M"], "pseudo file system")


def good_conf(staging, user):
    return "\n".join([
        'vm "varlib" {', "\tdisable", "\tmemory 64M", f'\tdisk "{staging.path("varlib")}/alice.img"',
        f"\towner {user.name}", "}",
        'vm "grp" {', "\tdisable", "\tmemory 64M", f'\tdisk "{user_dir(staging, user)}/grp.img"',
        f"\towner :{user.name}", "}",
        'vm "shared" {', "\tdisable", "\tmemory 64M", f'\tdisk "{staging.path("shared")}/disk.img"', "}", ""])


def good_paths(vmd, staging, user):
    # A disk root made for the owner under a directory only root can
    # write (as /var/lib/vmd), the owner unable to reach it itself: root's.
    varlib = staging.path("varlib")
    os.mkdir(varlib, 0o700)
    mark = marker("VARLIB")
    write_disk(os.path.join(varlib, "alice.img"), mark, mode=0o600, owner=user)
    vmd.start_with("varlib", user=user.name)
    vmd.wait_console("varlib", mark, BIOS_TIMEOUT)
    stop(vmd, "varlib")
    # `owner :group`: the group's rights, and no user's: a disk the group
    # may write boots, one only its user may read does not.
    grp = os.path.join(user_dir(staging, user), "grp.img")
    mark = marker("GROUP")
    write_disk(grp, mark, mode=0o660)
    os.chown(grp, 0, user.gid)
    vmd.start_with("grp")
    vmd.wait_console("grp", mark, BIOS_TIMEOUT)
    stop(vmd, "grp")
    wait_stopped(vmd, "grp")
    os.chmod(grp, 0o600)
    os.chown(grp, user.uid, user.gid)
    refused(vmd, ["grp"], f"{grp}: permission denied")
    # No single user controls a directory a group may write: a VM
    # without an owner refuses it.
    shared = staging.path("shared")
    os.mkdir(shared)
    os.chmod(shared, 0o775)
    write_disk(os.path.join(shared, "disk.img"), marker("SHARED"))
    refused(vmd, ["shared"], f"{shared} is writable by group 0: root does not open it for a VM without an owner")


def main():
    if not vmdregress.prepare():
        return 1
    if not os.path.exists("/usr/share/seabios/bios.bin"):
        print("FAIL setup: /usr/share/seabios/bios.bin is missing; run regress/setup")
        print("0 passed, 1 failed")
        return 1
    case("bios boots a disk's boot sector; its int 10h output reaches pty and log",
         with_case(bios_boots_a_disk))
    case("bios boots an El Torito iso given with -r", with_case(bios_boots_an_iso))
    case("boot order: cdrom first, -B disk, -B cdrom, vm.conf boot device",
         with_case(boot_order, boot_order_conf))
    case("-B net without a local interface, missing and non-regular iso images are refused", with_case(refusals, refusals_conf))
    case("qcow2 images boot: on raw, converted (-i), on a converted qcow2, three layers, raw from qcow2",
         with_case(qcow2_shapes))
    case("a lone qcow2 from vmctl create -s 1G boots; what the guest writes a second boot reads back",
         with_case(lone_qcow2_written_and_read_back))
    case("instances: inherit, more memory when allowed, disk not, invalid template, disk reuse",
         with_case(instances, instances_conf, user=True))
    case("users' files: own disk and kernel boot; unreadable disk, backing file, symlink, iso, kernel refused;"
         " a user's image is opened with its owner's rights even for root",
         with_case(users_files, files_conf, user=True))
    case("an owner swaps its configured disk for a symlink to a root-only disk: refused, as the owner",
         with_case(owner_symlink_swap, swap_conf, user=True))
    case("an owner swaps the backing file root's qcow2 names in its directory for a symlink: refused",
         with_case(backing_swap, swap_conf, user=True))
    case("/proc magic links: a root process's cwd as a user's backing file, /proc/kallsyms as initrd: refused",
         with_case(proc_magic_links, proc_conf, user=True))
    case("root's disk for an owner under a root-only directory boots; owner :group opens with the group's"
         " rights; a group-writable directory is refused to a VM without an owner",
         with_case(good_paths, good_conf, user=True))
    return vmdregress.summary()


if __name__ == "__main__":
    sys.exit(main())
