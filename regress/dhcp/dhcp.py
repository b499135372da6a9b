#!/usr/bin/env python3
"""regress/dhcp: the switch process's BOOTP/DHCP server, served for real
to real DHCP clients: busybox udhcpc, ISC dhclient and dhcpcd.

Until local interfaces have taps, a test build of vmd (the
`test-triggers` feature, target/test-triggers) serves an existing
interface as it will serve a local tap: VMD_TEST_DHCP_SERVE names one end
of a veth pair and the VM's name, id, interface index and MAC
(vmd/src/trigger.rs). Each case makes network namespaces of its own (vmd
runs in one with its end of the pair, each client in another with the
other end), and removes them at the end, even on failure.

The leases are checked against the layout of vmctl(8) LOCAL INTERFACES,
computed here independently: VM id N, interface i: the host side
100.64.0.0 + N*256 + 2i+2 (router and DNS server), the guest side one
more, mask 255.255.255.254, host name the VM's name.

regress/dhcp/capture-vectors (not a case) records the clients' requests
that common/tests/dhcp_*.rs replay.
"""

import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib"))
import vmdregress as t  # noqa: E402
from vmdregress import (TRIGGER_VMD, WAIT_TIMEOUT, Failure, Skip, build_triggers, case,  # noqa: E402
                        wait_for)

CLIENTS = {"udhcpc": "busybox", "dhclient": "dhclient", "dhcpcd": "dhcpcd"}
# The script every client runs on a lease: one line per lease, the same
# fields whatever the client calls them (udhcpc: $1 and short names;
# dhclient and dhcpcd: $reason and new_*).
LEASE_SCRIPT = """#!/bin/sh
case "${1:-}${reason:-}" in
bound | BOUND | REBOOT)
	echo "ip=${ip:-$new_ip_address} mask=${subnet:-$new_subnet_mask}" \\
		"router=${router:-$new_routers} dns=${dns:-$new_domain_name_servers}" \\
		"host=${hostname:-$new_host_name} file=${boot_file:-$new_filename}" >>"$0.out"
	;;
esac
exit 0
"""
counter = 0


def expected(vmid, index, name, file=""):
    base = int(ipaddress.IPv4Address("100.64.0.0"))
    host = ipaddress.IPv4Address(base + vmid * 256 + 2 * index + 2)
    return {"ip": str(host + 1), "mask": "255.255.255.254", "router": str(host),
            "dns": str(host), "host": name, "file": file}


def ns_run(ns, *args, **kw):
    return subprocess.run(["ip", "netns", "exec", ns, *args], capture_output=True, text=True, **kw)


class Net:
    """vmd's network namespace and, for each client, a namespace of its
    own on the other end of a veth pair; a vmd (test build, -v) serving
    the pairs' vmd ends. A context manager: everything goes at the end."""

    def __init__(self):
        global counter
        counter += 1
        self.tag = f"{os.getpid() % 100000}x{counter}"
        self.dir = tempfile.mkdtemp(prefix="vmd-dhcp-")
        self.vmd_ns = f"vmdd{self.tag}"
        self.namespaces = []
        self.served = []
        self.vmd = None
        self.add_ns(self.vmd_ns)

    def add_ns(self, ns):
        subprocess.run(["ip", "netns", "add", ns], check=True)
        self.namespaces.append(ns)
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)

    def link(self, mac, served_mac=None, vm=("web", 1, 0), net_boot=False):
        """A client namespace whose interface has `mac`, its peer served as
        interface `vm` = (name, id, index) with `served_mac` (default
        `mac`); returns (client namespace, its interface name)."""
        n = len(self.served)
        self.here = f"dh{self.tag}n{n}"
        ns, here, there = f"vmdc{self.tag}n{n}", f"dh{self.tag}n{n}", f"dc{self.tag}n{n}"
        self.add_ns(ns)
        subprocess.run(["ip", "-n", self.vmd_ns, "link", "add", here, "type", "veth",
                        "peer", "name", there, "netns", ns], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", there, "address", mac], check=True)
        subprocess.run(["ip", "-n", self.vmd_ns, "link", "set", here, "up"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", there, "up"], check=True)
        name, vmid, index = vm
        spec = f"{here},{name},{vmid},{index},{served_mac or mac}" + (",net" if net_boot else "")
        self.served.append(spec)
        return ns, there

    def start(self):
        """vmd in its namespace, serving every link; waits until switch
        serves them all."""
        self.vmd = t.Vmd(conf="", binary=TRIGGER_VMD, netns=self.vmd_ns,
                         env={"VMD_TEST_DHCP_SERVE": ";".join(self.served)})
        self.vmd.ready()
        self.wait_serving(len(self.served))
        return self.vmd

    def wait_serving(self, count):
        wait_for(f"switch to serve {count} interfaces",
                 lambda: len(re.findall(r"switch: dhcp vm \d+ interface \d+: serving", self.vmd.log())) >= count)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.vmd:
            self.vmd.stop()
        for ns in self.namespaces:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            t.kill_pids(int(p) for p in pids)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def script(self, name):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(LEASE_SCRIPT)
        os.chmod(path, 0o755)
        return path


def need(client):
    if not shutil.which(CLIENTS[client]):
        raise Skip(f"{CLIENTS[client]} is missing: run sh regress/setup (it installs busybox, "
                   "isc-dhcp-client and dhcpcd-base)")


def leases(script):
    """The leases the client's script recorded, as dicts."""
    try:
        with open(script + ".out") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    return [dict(field.split("=", 1) for field in line.split()) for line in lines]


def udhcpc(net, ns, ifname, tries=5):
    """busybox udhcpc until it has a lease or gives up; its leases."""
    need("udhcpc")
    script = net.script(f"udhcpc-{ifname}")
    p = ns_run(ns, "busybox", "udhcpc", "-i", ifname, "-f", "-q", "-n", "-t", str(tries), "-T", "2",
               "-s", script, timeout=WAIT_TIMEOUT + 4 * tries)
    return leases(script), p.stdout + p.stderr


def dhclient(net, ns, ifname):
    """ISC dhclient in the foreground until its script saw a lease."""
    need("dhclient")
    script = net.script(f"dhclient-{ifname}")
    conf = os.path.join(net.dir, "dhclient.conf")
    with open(conf, "w") as f:
        f.write("request subnet-mask, routers, domain-name-servers, host-name;\n")
    args = ["ip", "netns", "exec", ns, "dhclient", "-d", "-1", "-v", "-cf", conf, "-sf", script,
            "-lf", os.path.join(net.dir, f"{ifname}.leases"), "-pf", os.path.join(net.dir, f"{ifname}.pid"),
            ifname]
    log = os.path.join(net.dir, "dhclient.log")
    with open(log, "w") as out:
        p = subprocess.Popen(args, stdout=out, stderr=out, start_new_session=True)
    try:
        wait_for("dhclient's lease", lambda: leases(script) or p.poll() is not None)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    with open(log) as f:
        return leases(script), f.read()


def dhcpcd(net, ns, ifname):
    """dhcpcd in one-shot mode (IPv4, no link-local fallback); its leases.
    Removes the lease file it keeps under /var/lib/dhcpcd for this
    interface (the name is the case's own)."""
    need("dhcpcd")
    script = net.script(f"dhcpcd-{ifname}")
    conf = os.path.join(net.dir, "dhcpcd.conf")
    with open(conf, "w") as f:
        f.write("option subnet_mask, routers, domain_name_servers, host_name\nnoipv4ll\n")
    try:
        p = ns_run(ns, "dhcpcd", "-f", conf, "-1", "-4", "-B", "-t", str(WAIT_TIMEOUT), "-c", script, ifname,
                   timeout=WAIT_TIMEOUT + 10)
    finally:
        for suffix in (".lease", "-4.lease"):
            try:
                os.remove(f"/var/lib/dhcpcd/{ifname}{suffix}")
            except FileNotFoundError:
                pass
    return leases(script), p.stdout + p.stderr


def check_lease(client, got, want, output, vmd):
    if not got:
        raise Failure(f"{client} got no lease: {output[-1500:]}\nvmd: {vmd.log()[-1500:]}")
    if got[-1] != want:
        raise Failure(f"{client} got {got[-1]}, want {want}")


def case_client(client, vm, mac):
    def run():
        need(client)
        name, vmid, index = vm
        with Net() as net:
            ns, ifname = net.link(mac, vm=vm)
            vmd = net.start()
            got, output = {"udhcpc": udhcpc, "dhclient": dhclient, "dhcpcd": dhcpcd}[client](net, ns, ifname)
            check_lease(client, got, expected(vmid, index, name), output, vmd)
    return run


def case_net_boot():
    with Net() as net:
        ns, ifname = net.link("fe:e1:bb:d1:00:07", vm=("installer", 7, 0), net_boot=True)
        vmd = net.start()
        got, output = udhcpc(net, ns, ifname)
        check_lease("udhcpc", got, expected(7, 0, "installer", "auto_install"), output, vmd)


def case_other_mac():
    with Net() as net:
        ns, ifname = net.link("fe:e1:bb:d1:00:99", served_mac="fe:e1:bb:d1:00:01")
        vmd = net.start()
        got, output = udhcpc(net, ns, ifname, tries=3)
        if got:
            raise Failure(f"a client with another MAC got {got}")
        if "no lease" not in output:
            raise Failure(f"udhcpc did not report that it got no lease: {output}")
        wait_for("the drop's debug line",
                 lambda: re.search(r"switch: dhcp vm 1 interface 0: dropped \d+ frame.*from another MAC", vmd.log()))


def case_switch_restart():
    with Net() as net:
        ns, ifname = net.link("fe:e1:bb:d1:00:01")
        vmd = net.start()
        want = expected(1, 0, "web")
        got, output = udhcpc(net, ns, ifname)
        check_lease("udhcpc", got, want, output, vmd)
        old = vmd.child("switch")
        os.kill(old, signal.SIGKILL)
        new = wait_for("a new switch", lambda: (lambda p: p if p and p != old else None)(vmd.child("switch")))
        wait_for("the new switch to serve again",
                 lambda: vmd.log().count("switch: dhcp vm 1 interface 0: serving") >= 2)
        got, output = udhcpc(net, ns, ifname)
        if len(got) != 2:
            raise Failure(f"after switch (pid {old}) was killed, pid {new} gave no lease: {output}\n{vmd.log()}")
        check_lease("udhcpc", got, want, output, vmd)


def case_interface_down_and_gone():
    with Net() as net:
        ns, ifname = net.link("fe:e1:bb:d1:00:01")
        vmd = net.start()
        want = expected(1, 0, "web")
        # Down and up again: the socket is kept and serves.
        for state in ("down", "up"):
            subprocess.run(["ip", "-n", net.vmd_ns, "link", "set", net.here, state], check=True)
        got, output = udhcpc(net, ns, ifname)
        check_lease("udhcpc", got, want, output, vmd)
        if "interface is gone" in vmd.log():
            raise Failure(f"an interface set down and up was taken for gone: {vmd.log()}")
        # Gone: switch closes the socket and tells the parent.
        subprocess.run(["ip", "-n", net.vmd_ns, "link", "del", net.here], check=True)
        wait_for("switch to drop the socket", lambda: "switch: dhcp vm 1 interface 0: the interface is gone" in vmd.log())
        wait_for("the parent to forget it", lambda: "\ndhcp vm 1 interface 0: its interface is gone" in vmd.log())
        # A restarted switch is not sent the dead socket.
        old = vmd.child("switch")
        os.kill(old, signal.SIGKILL)
        wait_for("a new switch", lambda: (lambda p: p if p and p != old else None)(vmd.child("switch")))
        wait_for("the new switch to run", lambda: vmd.log().count("switch: running") >= 2)
        if vmd.log().count("switch: dhcp vm 1 interface 0: serving") != 1:
            raise Failure(f"the restarted switch was sent the vanished interface: {vmd.log()}")


# A client that sends its request through the kernel's UDP stack (not a
# raw socket, as the DHCP clients do): on a veth the checksum is left to
# offload, so switch sees TP_STATUS_CSUMNOTREADY and a partial checksum.
# The broadcast flag brings the OFFER back to 255.255.255.255, where this
# socket, bound to the interface and port 68, reads it (the kernel checks
# the reply's UDP checksum on the way in).
UDP_CLIENT = r'''
import socket, struct, sys
ifname, mac = sys.argv[1], bytes.fromhex(sys.argv[2].replace(":", ""))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
s.bind(("0.0.0.0", 68))
s.settimeout(2)
bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, 0x5eed, 0, 0x8000, bytes(4), bytes(4),
                    bytes(4), bytes(4), mac, bytes(64), bytes(128))
request = bootp + bytes([99, 130, 83, 99, 53, 1, 1, 255]) + bytes(52)
for _ in range(10):
    s.sendto(request, ("255.255.255.255", 67))
    try:
        reply, _ = s.recvfrom(2048)
    except socket.timeout:
        continue
    if reply[4:8] == request[4:8]:
        print("yiaddr=" + socket.inet_ntoa(reply[16:20]))
        sys.exit(0)
sys.exit("no offer")
'''


def case_offloaded_checksum():
    with Net() as net:
        mac = "fe:e1:bb:d1:00:01"
        ns, ifname = net.link(mac)
        vmd = net.start()
        p = ns_run(ns, sys.executable, "-c", UDP_CLIENT, ifname, mac, timeout=WAIT_TIMEOUT + 30)
        if p.returncode != 0 or "yiaddr=100.64.1.3" not in p.stdout:
            raise Failure(f"no offer for a request with its checksum left to offload: "
                          f"{p.stdout}{p.stderr}\n{vmd.log()[-1500:]}")


def main():
    if not t.prepare(guest=False):
        return 1
    build_triggers()
    case("udhcpc gets its lease", case_client("udhcpc", ("web", 1, 0), "fe:e1:bb:d1:00:01"))
    # A VM's second interface: the next /31.
    case("dhclient gets its lease", case_client("dhclient", ("db", 2, 1), "fe:e1:bb:d2:00:02"))
    # A VM id above 255 spills into the next /16 of 100.64.0.0/10.
    case("dhcpcd gets its lease", case_client("dhcpcd", ("mail", 300, 0), "fe:e1:bb:d1:01:2c"))
    case("net boot lease names auto_install", case_net_boot)
    case("a client with another MAC gets no answer", case_other_mac)
    case("a killed switch is restarted and serves again", case_switch_restart)
    case("a request whose checksum was left to offload is answered", case_offloaded_checksum)
    case("an interface down and up is served, a vanished one dropped", case_interface_down_and_gone)
    return t.summary()


if __name__ == "__main__":
    sys.exit(main())
