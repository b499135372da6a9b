#!/usr/bin/env python3
"""regress/send: `vmctl send` and `vmctl receive` with real guests (QEMU,
TCG).

A ticking test guest (regress/guest, `VMD-GUEST: tick N` once a second)
sent to a file: vmctl says so, the VM is gone (its QEMU and VM process
too) and the file is a whole stream, checked here by a reader of the
format of its own (common/src/stream.rs: header with its SHA-256, chunks,
data length and trailing SHA-256) whose header names the VM's memory and
disk. A send whose reader goes away midway, and one to a terminal, leave
the VM running (its ticks go on); a user other than root is refused.
Received under a new name, from the file or straight through a pipe,
the guest counts on (no second `booted` marker) and its disk still holds
what it wrote. A stream cut short, one with a byte flipped in its
header, its middle or its last 200 bytes, random bytes and an empty
input are each refused with nothing left: no VM listed, no VM process
or QEMU, the disk not locked; so are whole streams (their checksums made
anew) from another QEMU version, for another machine type, memory size
or kernel size, each with a message that says which.

Runs as root. Each case starts its own vmd (regress/lib/vmdregress.py)
and kills vmd and every process it started at the end, even on failure.
"""

import hashlib
import os
import pty
import re
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib"))
import vmdregress as t  # noqa: E402
from vmdregress import VMCTL, Failure, TestUser, case, expect, ticks, wait_for, with_vmd  # noqa: E402

MAGIC = b"VMDSTRM\0"


def read_stream(data):
    """Checks a whole stream as common/src/stream.rs writes it; returns
    (header body, migration data length)."""
    if data[:8] != MAGIC:
        raise Failure(f"the stream starts with {data[:8]!r}, not vmd's magic")
    version, length = struct.unpack(">II", data[8:16])
    body = data[16:16 + length]
    if hashlib.sha256(data[:16 + length]).digest() != data[16 + length:48 + length]:
        raise Failure("the stream's header checksum does not match")
    if version != 1:
        raise Failure(f"stream format {version}, want 1")
    at, total = 48 + length, 0
    while True:
        (n,) = struct.unpack(">I", data[at:at + 4])
        if n == 0:
            break
        if n > 1 << 20:
            raise Failure(f"a chunk of {n} bytes")
        total += n
        at += 4 + n
    (said,) = struct.unpack(">Q", data[at + 4:at + 12])
    if said != total or hashlib.sha256(data[:at + 12]).digest() != data[at + 12:at + 44]:
        raise Failure(f"the stream's end does not check out (says {said}, counted {total})")
    if at + 44 != len(data):
        raise Failure(f"{len(data) - at - 44} bytes after the stream's end")
    return body, total


def rewrite(data, change):
    """The stream `data` with its header body changed by change(body),
    its checksum and trailing hash made anew (a foreign but whole stream)."""
    (length,) = struct.unpack(">I", data[12:16])
    body = change(data[16:16 + length])
    head = data[:8] + data[8:12] + struct.pack(">I", len(body)) + body
    head += hashlib.sha256(head).digest()
    rest = data[48 + length:-44]
    end = data[-44:-32]
    whole = head + rest + end
    return whole + hashlib.sha256(whole).digest()


def bincode_str(text):
    return struct.pack(">Q", len(text)) + text.encode()


def ticking(vmd, name, word=None):
    """A running test guest with a disk that has ticked twice (having
    written `word` at the start of its disk): (id, disk)."""
    disk = os.path.join(vmd.dir, f"{name}.img")
    with open(disk, "wb") as f:
        f.truncate(16 << 20)
    cmdline = "console=ttyS0 quiet" + (f" vmd.diskwrite=vda:{word}" if word else "")
    vmid, _ = vmd.start(name, "-d", disk, cmdline=cmdline)
    vmd.wait_console(name, "VMD-GUEST: tick 2")
    return vmid, disk


def ticks_go_on(vmd, name):
    seen = len(ticks(vmd.console_log(name)))
    wait_for(f"{name} to tick on", lambda: len(ticks(vmd.console_log(name))) >= seen + 2)


def gone(vmd, vmid, pids):
    wait_for(f"vm {vmid} to be gone", lambda: vmd.state(vmid) == "gone")
    wait_for("its processes to end", lambda: all(t.status_of(p) is None for p in pids))


# --- cases


def send_to_file(vmd):
    vmid, disk = ticking(vmd, "send1")
    pids = vmd.vm_pids(vmid)
    path = os.path.join(vmd.dir, "send1.vm")
    with open(path, "wb") as out:
        p = subprocess.run([VMCTL, "-s", vmd.sock, "send", "send1"], stdout=out, stderr=subprocess.PIPE,
                           text=True, timeout=t.VMCTL_TIMEOUT)
    expect((p.returncode, p.stderr), 0, rf"^vmctl: sent vm {vmid} successfully$", "send to a file")
    gone(vmd, vmid, pids)
    with open(path, "rb") as f:
        body, total = read_stream(f.read())
    if total < 1 << 20:
        raise Failure(f"only {total} bytes of state")
    # The header names the VM's memory (256M, big-endian u64) and disk.
    if struct.pack(">Q", 256 << 20) not in body or disk.encode() not in body:
        raise Failure(f"the header lacks the VM's memory or disk: {body!r}")
    if not re.search(rb"pc-i440fx-\d+\.\d+", body):
        raise Failure(f"the header names no versioned machine type: {body!r}")
    if f"sent vm {vmid} successfully" not in vmd.log():
        raise Failure("vmd's log does not say the VM was sent")


def reader_dies(vmd):
    vmid, _ = ticking(vmd, "send2")
    # head takes 64 KiB and exits: vmctl's stdout breaks midway.
    p = subprocess.run(["bash", "-c", f"set -o pipefail; {VMCTL} -s {vmd.sock} send send2 | head -c 65536 >/dev/null"],
                       capture_output=True, text=True, timeout=t.VMCTL_TIMEOUT)
    expect((p.returncode, p.stderr), 1, r"^vmctl: send: writing the stream: .*[Bb]roken pipe.*the vm runs again",
           "send into a reader that goes away")
    wait_for("vm send2 to be running", lambda: vmd.state(vmid) == "running")
    ticks_go_on(vmd, "send2")


def to_terminal(vmd):
    vmid, _ = ticking(vmd, "send3")
    master, slave = pty.openpty()
    try:
        p = subprocess.run([VMCTL, "-s", vmd.sock, "send", "send3"], stdout=slave, stderr=subprocess.PIPE,
                           text=True, timeout=t.VMCTL_TIMEOUT)
    finally:
        os.close(slave)
        os.close(master)
    expect((p.returncode, p.stderr), 1, r"^vmctl: send: standard output is a terminal", "send to a terminal")
    if vmd.state(vmid) != "running":
        raise Failure(f"after a refused send: {vmd.status_row(vmid)}")
    if "send:" in vmd.log():
        raise Failure("the refused send reached vmd")
    ticks_go_on(vmd, "send3")


def not_root(vmd, user):
    vmid, _ = ticking(vmd, "send4")
    rc, out = vmd.vmctl("send", "send4", user=user.name)
    expect((rc, out), 1, r"^vmctl: send vm command failed: Operation not permitted", "send by a user")
    rc, out = vmd.vmctl("receive", "recv4", user=user.name)
    expect((rc, out), 1, r"^vmctl: receive vm command failed: Operation not permitted", "receive by a user")
    if vmd.state(vmid) != "running":
        raise Failure(f"after a user's send: {vmd.status_row(vmid)}")


def send_file(vmd, name, word=None):
    """A ticking guest sent to a file: (id, disk, stream path)."""
    vmid, disk = ticking(vmd, name, word)
    pids = vmd.vm_pids(vmid)
    path = os.path.join(vmd.dir, f"{name}.vm")
    with open(path, "wb") as out:
        p = subprocess.run([VMCTL, "-s", vmd.sock, "send", name], stdout=out, stderr=subprocess.PIPE,
                           text=True, timeout=t.VMCTL_TIMEOUT)
    expect((p.returncode, p.stderr), 0, rf"^vmctl: sent vm {vmid} successfully$", f"send {name}")
    gone(vmd, vmid, pids)
    return vmid, disk, path


def receive_from(vmd, name, path):
    """vmctl receive NAME < path: (exit status, output)."""
    with open(path, "rb") as f:
        p = subprocess.run([VMCTL, "-s", vmd.sock, "receive", name], stdin=f, capture_output=True,
                           timeout=t.VMCTL_TIMEOUT)
    return p.returncode, (p.stdout + p.stderr).decode(errors="replace")


def counts_on(vmd, sent, received):
    """`received` goes on counting where `sent` stopped, without booting."""
    last = max(ticks(vmd.console_log(sent)))
    wait_for(f"{received} to tick", lambda: len(ticks(vmd.console_log(received))) >= 2)
    log = vmd.console_log(received)
    first = ticks(log)[0]
    if "VMD-GUEST: booted" in log:
        raise Failure(f"{received} booted again: {log[:500]!r}")
    if not last < first <= last + 3:
        raise Failure(f"{received} counts from {first}; {sent} stopped at {last}")


def track_received(vmd, out):
    m = re.search(r"^vmctl: received vm (\d+) successfully, tty /dev/pts/\d+$", out, re.M)
    vmid = int(m.group(1))
    vmd.vm_pids(vmid)
    return vmid


def receive_file(vmd):
    _, disk, path = send_file(vmd, "move1", word="MOVED-1")
    out = expect(receive_from(vmd, "moved1", path), 0, r"^vmctl: received vm \d+ successfully, tty ",
                 "receive from the file")
    vmid = track_received(vmd, out)
    counts_on(vmd, "move1", "moved1")
    if vmd.state(vmid) != "running":
        raise Failure(f"the received vm: {vmd.status_row(vmid)}")
    with open(disk, "rb") as f:
        if not f.read(32).startswith(b"MOVED-1"):
            raise Failure("the disk lost what the guest wrote")
    # The name is taken now: a second receive under it is refused.
    expect(receive_from(vmd, "moved1", path), 1, r"^vmctl: receive vm command failed: vm moved1 exists",
           "receive under a name in use")


def through_pipe(vmd):
    """send | receive; a `vmctl events` listener sees pipe1 sent, then
    piped1 received and running."""
    vmid, _ = ticking(vmd, "pipe1")
    pids = vmd.vm_pids(vmid)
    listener = t.Listener(vmd, "pipe", json_out=False)
    try:
        piped(vmd, vmid, pids)
        wait_for("piped1 running at the listener", lambda: re.search(r" piped1 running$", listener.text(), re.M))
        lines = [line.split(" ", 2)[2] for line in listener.text().splitlines() if line.count(" ") >= 2]
    finally:
        listener.close()
    want = ["pipe1 sent", "piped1 received", "piped1 running"]
    found = [lines.index(w) if w in lines else None for w in want]
    if None in found or found != sorted(found):
        raise Failure(f"want {want} in this order among the events: {lines}")


def piped(vmd, vmid, pids):
    p = subprocess.run(["bash", "-c", f"set -o pipefail; {VMCTL} -s {vmd.sock} send pipe1 | "
                        f"{VMCTL} -s {vmd.sock} receive piped1"],
                       capture_output=True, text=True, timeout=t.VMCTL_TIMEOUT)
    out = expect((p.returncode, p.stderr), 0, r"^vmctl: received vm \d+ successfully", "send | receive")
    expect((p.returncode, p.stderr), 0, rf"^vmctl: sent vm {vmid} successfully$", "send | receive")
    gone(vmd, vmid, pids)
    track_received(vmd, out)
    counts_on(vmd, "pipe1", "piped1")


def nothing_left(vmd, name, disk):
    if any(row["NAME"] == name for row in vmd.status()):
        raise Failure(f"{name} is listed: {vmd.status()}")
    procs = [p for p in t.children_of(vmd.proc.pid) if t.cmdline(p) == f"vmd: vm {name}"]
    wait_for(f"{name}'s VM process to end", lambda: all(t.status_of(p) is None for p in procs))
    qemus = subprocess.run(["pgrep", "-f", f"qemu-system.*-name {name} "], capture_output=True, text=True)
    if qemus.stdout.strip():
        raise Failure(f"QEMU of {name} still runs: {qemus.stdout}")
    if subprocess.run(["flock", "-n", "-x", disk, "true"]).returncode != 0:
        raise Failure(f"{disk} is still locked")


def broken_streams(vmd):
    _, disk, path = send_file(vmd, "good1")
    with open(path, "rb") as f:
        good = f.read()

    def flipped(at):
        data = bytearray(good)
        data[at] ^= 0x20
        return bytes(data)

    variants = [
        ("cut", good[:len(good) // 2], r"truncated|ended early"),
        ("cut200", good[:-200], r"truncated|ended early"),
        ("header", flipped(40), r"header is corrupt"),
        ("middle", flipped(len(good) // 2), r"corrupt|QEMU|load"),
        ("tail", flipped(len(good) - 100), r"trailing hash does not match"),
        ("random", os.urandom(1 << 20), r"not a vmd stream"),
        ("empty", b"", r"the stream is empty"),
    ]
    for tag, data, why in variants:
        bad = os.path.join(vmd.dir, f"{tag}.vm")
        with open(bad, "wb") as f:
            f.write(data)
        name = f"bad-{tag}"
        expect(receive_from(vmd, name, bad), 1, rf"^vmctl: receive.*({why})", f"receive of the {tag} stream")
        nothing_left(vmd, name, disk)
    # What is left is whole: the good stream still starts the guest.
    out = expect(receive_from(vmd, "good2", path), 0, r"received vm \d+ successfully", "receive after all")
    track_received(vmd, out)
    counts_on(vmd, "good1", "good2")


def incompatible_streams(vmd):
    _, disk, path = send_file(vmd, "orig1")
    with open(path, "rb") as f:
        good = f.read()
    read_stream(good)
    (length,) = struct.unpack(">I", good[12:16])
    body = good[16:16 + length]
    version = re.search(rb"\d+\.\d+\.\d+", body).group().decode()
    machine = re.search(rb"pc-i440fx-\d+\.\d+", body).group().decode()
    kernel_at = body.index(t.KERNEL.encode()) + len(t.KERNEL)
    (kernel_size,) = struct.unpack(">Q", body[kernel_at:kernel_at + 8])
    variants = [
        ("qemu", lambda b: b.replace(bincode_str(version), bincode_str("1.2.3"), 1),
         rf"the stream is from QEMU 1\.2\.3, this host runs QEMU {re.escape(version)}"),
        ("machine", lambda b: b.replace(bincode_str(machine), bincode_str("pc-i440fx-0.1"), 1),
         r"pc-i440fx-0\.1"),
        ("memory", lambda b: b.replace(struct.pack(">Q", 256 << 20), struct.pack(">Q", 320 << 20), 1),
         r"QEMU|load|[Ll]ength|mismatch"),
        ("kernel", lambda b: b[:kernel_at] + struct.pack(">Q", kernel_size + 1) + b[kernel_at + 8:],
         rf"the kernel {re.escape(t.KERNEL)} is {kernel_size} bytes, the sender's was {kernel_size + 1}"),
    ]
    for tag, change, why in variants:
        data = rewrite(good, change)
        read_stream(data)
        other = os.path.join(vmd.dir, f"{tag}.vm")
        with open(other, "wb") as f:
            f.write(data)
        name = f"other-{tag}"
        expect(receive_from(vmd, name, other), 1, rf"^vmctl: receive vm command failed: .*({why})",
               f"receive of a stream with another {tag}")
        nothing_left(vmd, name, disk)


# Longer than a start's 40 s deadline (common/src/ctl.rs VM_START_TIMEOUT).
SLOW_SECONDS = 50


def slow_stream(vmd):
    """A stream that trickles in for longer than a start may take (as
    over a slow ssh link): the receive goes on while data comes."""
    _, _, path = send_file(vmd, "slow1")
    size = os.path.getsize(path)
    feeder = (f"import sys, time\nf = open({path!r}, 'rb')\nstep = {size // (SLOW_SECONDS * 10) + 1}\n"
              "while True:\n    b = f.read(step)\n    if not b: break\n"
              "    sys.stdout.buffer.write(b); sys.stdout.buffer.flush(); time.sleep(0.1)\n")
    started = time.monotonic()
    p = subprocess.run(["bash", "-c", f"set -o pipefail; python3 -c \"$FEED\" | {VMCTL} -s {vmd.sock} receive slowed1"],
                       env={**os.environ, "FEED": feeder}, capture_output=True, text=True,
                       timeout=t.VMCTL_TIMEOUT + SLOW_SECONDS)
    out = expect((p.returncode, p.stderr), 0, r"^vmctl: received vm \d+ successfully", "a slow receive")
    if time.monotonic() - started < 45:
        raise Failure(f"the stream came in {time.monotonic() - started:.0f}s, not slowly")
    track_received(vmd, out)
    counts_on(vmd, "slow1", "slowed1")


def main():
    if not t.prepare():
        return 1
    case("send-to-file", with_vmd(send_to_file))
    case("send-reader-dies-vm-runs", with_vmd(reader_dies))
    case("send-to-terminal-refused", with_vmd(to_terminal))
    case("receive-from-file-counts-on", with_vmd(receive_file))
    case("send-pipe-receive", with_vmd(through_pipe))
    case("receive-broken-streams-leave-nothing", with_vmd(broken_streams))
    case("receive-incompatible-streams-refused", with_vmd(incompatible_streams))
    case("receive-slow-stream-past-the-start-deadline", with_vmd(slow_stream))
    if t.selected("send-receive-by-user-refused"):
        user = TestUser("vmdsend")
        try:
            case("send-receive-by-user-refused", with_vmd(lambda vmd: not_root(vmd, user), dir_mode=0o755,
                                                  conf_extra=f"socket owner :{user.name}\n"))
        finally:
            user.remove()
    return t.summary()


if __name__ == "__main__":
    sys.exit(main())
