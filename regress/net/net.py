#!/usr/bin/env python3
"""regress/net: guest networking under vmd (issue 18): taps made by the
parent, their MAC addresses and descriptions, switches on Linux bridges,
and what is left when VMs, QEMU or vmd end or crash.

Runs as root. Each case starts its own vmd in a network namespace of its
own (vmdregress's Vmd(netns=True): `ip netns exec vmdreg-PID-N vmd -d`),
so taps and bridges live and die there and no packet leaves it. Black
box: vmctl, vm.conf, `ip -n NS -j -d link`, `bridge -n NS fdb`, busybox's
ping from the namespace and the
test guest's console (regress/guest/README.md: `vmd.ip=ADDR/PREFIX`,
`vmd.ping=ADDR` -> `VMD-GUEST: ping ADDR ok`, `nic ethN MAC`).

What the cases take from vmd (vm.conf.5, vmctl.8): a tap per interface,
named `tap%d` by the kernel unless vm.conf names it, its ifalias
`vm<ID>-if<N>-<NAME>` (N from 0), up unless `down`, a port of its
switch's bridge; the guest's MAC the interface's `lladdr`, else
fe:e1:bb:dN:xx:xx with N = index + 1, the same when the VM starts again;
a switch's bridge created when missing (at startup and on `vmctl reset
switches`), up unless `down`, deleted at shutdown only if vmd made it
and it holds nothing vmd did not add; a vmd started after a SIGKILLed
one on the same socket removes the bridges its predecessor made and
nothing else; a start on an unknown or disabled switch fails with
vmctl.8's message. Local interfaces (issue 20): the host side of a `-L`
tap has 100.64.N.(2i+2)/31 and the guest's DHCP client gets the next
address, router and DNS the host side and the VM's name; local
interfaces come first; a VM started again gets the same address.

After every case: once vmd has ended (SIGTERM) the namespace holds only
lo and what the case made itself; then the namespace is deleted, and no
interface of the case's (its bridge names, its taps' descriptions) exists
in the machine's namespace or any named one.

regress/nested runs the cases that need no host tool with vmd inside the
nested KVM host (Debian's 6.1 kernel): the functions here take any Vmd
with start, vmctl, links, ip, ping, exists, signal, proc_status,
kill_daemon, restart, read_config and write_config.
"""

import json
import os
import re
import signal
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib"))
import vmdregress as t  # noqa: E402
from vmdregress import Failure, Vmd, case, expect, expect_equal, netns_list, wait_for  # noqa: E402

QUIET = "console=ttyS0 quiet"
# Names of this run's own: bridges (at most 15 characters) and VMs (in
# the taps' descriptions), so that a leftover anywhere is recognisably ours.
TAG = str(os.getpid())
BRIDGE = f"vbr{TAG}"
BRIDGE2 = f"vbs{TAG}"
BRIDGE3 = f"vbt{TAG}"
GENERATED_MAC = r"fe:e1:bb:d{}:[0-9a-f]{{2}}:[0-9a-f]{{2}}"
# Bound on waits for the network: a ping between two TCG guests, a
# bridge vmd creates off its loop.
NET_TIMEOUT = 60


# Every VM name the cases use (ours()).
OUR_VMS = set()


def vm(name):
    """A VM name of this run's own."""
    OUR_VMS.add(f"{name}{TAG}")
    return f"{name}{TAG}"


def switch_conf(name, bridge, extra=""):
    return f'switch "{name}" {{\n interface {bridge}\n{extra}}}\n'


# The vm.conf of most cases, and of reset-switches.
SW = switch_conf("sw", BRIDGE)
RESET_CONF = SW + switch_conf("down", BRIDGE2, " down\n")


def guest_cmdline(ip, ping=None):
    return f"{QUIET} vmd.ip={ip}" + (f" vmd.ping={ping}" if ping else "")


# --- what vmd made, seen from the namespace


def kind(link):
    return link.get("linkinfo", {}).get("info_kind")


def taps_of(vmd, name, vmid):
    """{index: link} of VM `name`'s taps, found by their description
    vm<ID>-if<N>-<NAME>."""
    found = {}
    for link in vmd.links().values():
        m = re.fullmatch(rf"vm{vmid}-if(\d+)-{re.escape(name)}", link.get("ifalias", ""))
        if m:
            found[int(m.group(1))] = link
    return found


def tap(vmd, name, vmid, index=0):
    """VM `name`'s tap number `index`, checked: a tap, up."""
    taps = taps_of(vmd, name, vmid)
    if index not in taps:
        raise Failure(f"no interface described vm{vmid}-if{index}-{name}; "
                      f"interfaces: {describe(vmd.links())}")
    link = taps[index]
    info = link.get("linkinfo", {}).get("info_data", {})
    if kind(link) != "tun" or info.get("type") != "tap":
        raise Failure(f"{link['ifname']} is no tap: {link.get('linkinfo')}")
    if "UP" not in link["flags"]:
        raise Failure(f"tap {link['ifname']} is not up: {link['flags']}")
    return link


def describe(links):
    return ", ".join(f"{n} ({kind(link) or '-'}{' master ' + link['master'] if 'master' in link else ''}"
                     f"{' ' + repr(link['ifalias']) if 'ifalias' in link else ''})"
                     for n, link in sorted(links.items()))


def bridge_up(vmd, bridge, up=True, timeout=NET_TIMEOUT):
    """Waits for `bridge` to exist as a bridge, up (or down); its link."""
    def check():
        link = vmd.links().get(bridge)
        return link if link and kind(link) == "bridge" and ("UP" in link["flags"]) == up else None
    try:
        return wait_for(f"bridge {bridge} ({'up' if up else 'down'})", check, timeout)
    except Failure as e:
        raise Failure(f"{e}; interfaces: {describe(vmd.links())}") from None


def expect_port(vmd, link, bridge):
    if link.get("master") != bridge:
        raise Failure(f"{link['ifname']} ({link.get('ifalias')}) is a port of "
                      f"{link.get('master', 'no bridge')}, want {bridge}")


def gone(vmd, what, check, timeout=NET_TIMEOUT):
    try:
        wait_for(what, check, timeout)
    except Failure as e:
        raise Failure(f"{e}; interfaces: {describe(vmd.links())}") from None


def guest_mac(vmd, name, nic="eth0"):
    m = re.search(rf"^VMD-GUEST: nic {nic} (\S+)\r?$", vmd.console_log(name), re.M)
    if not m:
        raise Failure(f"no `nic {nic}` line on {name}'s console")
    return m.group(1)


def fdb_port(vmd, bridge, mac):
    """The port of `bridge` on which the bridge learned `mac`, or None."""
    p = subprocess.run(["bridge", "-n", vmd.netns, "-j", "fdb", "show", "br", bridge],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise Failure(f"bridge fdb show br {bridge}: {p.stderr.strip()}")
    for entry in json.loads(p.stdout or "[]"):
        if entry.get("mac") == mac and entry.get("state") != "permanent" and entry.get("ifname") != bridge:
            return entry.get("ifname")
    return None


def locked_off(vmd, locked, neighbour, tries):
    """A `locked lladdr` check: the host pings the guest that changed its
    MAC (`locked`) and its locked neighbour with its own MAC, in turns,
    `tries` times each; the neighbour must answer, the other never."""
    answered = {locked: 0, neighbour: 0}
    for _ in range(tries):
        for addr in answered:
            answered[addr] += vmd.ping(addr)
    if answered[neighbour] == 0:
        raise Failure("the locked neighbour with its own MAC did not answer the host")
    if answered[locked]:
        raise Failure(f"the guest that changed its MAC answered {answered[locked]} ping(s)")


def ping_pair(vmd, names, switch):
    """Starts two guests on `switch`, 10.0.0.1 and 10.0.0.2, each pinging
    the other; waits for both pings to answer. [(name, id)]."""
    a, b = names
    started = [(a, vmd.start(a, "-n", switch, cmdline=guest_cmdline("10.0.0.1/24", "10.0.0.2"))[0]),
               (b, vmd.start(b, "-n", switch, cmdline=guest_cmdline("10.0.0.2/24", "10.0.0.1"))[0])]
    for name, other in ((a, "10.0.0.2"), (b, "10.0.0.1")):
        vmd.wait_console(name, f"VMD-GUEST: ping {other} ok")
    return started


# --- cases (each gets a Vmd of its own)


def two_guests_ping(vmd):
    """Two guests on one switch ping each other through the bridge vmd
    created; both taps are up and ports of it."""
    bridge_up(vmd, BRIDGE)
    started = ping_pair(vmd, (vm("pa"), vm("pb")), "sw")
    for name, vmid in started:
        expect_port(vmd, tap(vmd, name, vmid), BRIDGE)


def taps_ifalias_mac(vmd):
    """A vm.conf VM with a named tap and an lladdr, and a vmctl VM with a
    generated MAC: each tap carries vm<ID>-if0-<NAME>, is up and a port of
    the bridge; each guest sees its MAC, and the bridge learns that MAC on
    that tap once the guests ping each other."""
    lla, gen = vm("lla"), vm("gen")
    bridge_up(vmd, BRIDGE)
    lla_id, _ = vmd.start_with(lla)
    gen_id, _ = vmd.start(gen, "-n", "sw", cmdline=guest_cmdline("10.0.0.2/24", "10.0.0.1"))
    for name, other in ((lla, "10.0.0.2"), (gen, "10.0.0.1")):
        vmd.wait_console(name, f"VMD-GUEST: ping {other} ok")

    lla_tap, gen_tap = tap(vmd, lla, lla_id), tap(vmd, gen, gen_id)
    expect_equal(f"{lla}'s tap (vm.conf: interface tap7)", lla_tap["ifname"], "tap7")
    if not re.fullmatch(r"tap\d+", gen_tap["ifname"]):
        raise Failure(f"{gen}'s tap is {gen_tap['ifname']}, want tap%d")
    for link in (lla_tap, gen_tap):
        expect_port(vmd, link, BRIDGE)
    expect_equal(f"{lla}'s MAC (lladdr)", guest_mac(vmd, lla), "52:54:00:12:34:56")
    mac = guest_mac(vmd, gen)
    if not re.fullmatch(GENERATED_MAC.format(1), mac):
        raise Failure(f"{gen}'s generated MAC is {mac}, want fe:e1:bb:d1:xx:xx")
    for name, link in ((lla, lla_tap), (gen, gen_tap)):
        mac = guest_mac(vmd, name)
        port = wait_for(f"the bridge to learn {mac}", lambda: fdb_port(vmd, BRIDGE, mac))
        expect_equal(f"the port where {BRIDGE} learned {name}'s {mac}", port, link["ifname"])
        if link["address"] == mac:
            raise Failure(f"tap {link['ifname']} has the guest's own MAC {mac}")


def two_nics(vmd):
    """`-i 2`: the guest has eth0 and eth1 with fe:e1:bb:d1:.. and
    fe:e1:bb:d2:..; two taps described if0 and if1, on no bridge."""
    name = vm("nic2")
    vmid, _ = vmd.start(name, "-i", "2")
    vmd.wait_console(name, "VMD-GUEST: ready")
    if not re.search(r"^VMD-GUEST: nics eth0 eth1\r?$", vmd.console_log(name), re.M):
        raise Failure(f"the guest lists {re.findall(r'VMD-GUEST: nics .*', vmd.console_log(name))}, "
                      "want eth0 eth1")
    for index in (0, 1):
        mac = guest_mac(vmd, name, f"eth{index}")
        if not re.fullmatch(GENERATED_MAC.format(index + 1), mac):
            raise Failure(f"eth{index}'s MAC is {mac}, want fe:e1:bb:d{index + 1}:xx:xx")
        link = tap(vmd, name, vmid, index)
        if "master" in link:
            raise Failure(f"{link['ifname']} is on {link['master']} without a switch")
    if len(taps_of(vmd, name, vmid)) != 2:
        raise Failure(f"taps of {name}: {describe(vmd.links())}")


def stable_macs_and_down(vmd):
    """A vm.conf VM with two interfaces, the second `down`: its tap exists
    but is not up (and on no bridge); stopped and started again, the guest
    has the same generated MACs."""
    name = vm("st")

    def boot(n):
        vmid, _ = vmd.start_with(name)
        # The console log goes on across starts: wait for this boot's lines.
        wait_for(f"boot {n} of {name} to list its NICs",
                 lambda: len(re.findall(r"^VMD-GUEST: ready", vmd.console_log(name), re.M)) >= n, t.BOOT_TIMEOUT)
        return vmid

    vmid = boot(1)
    expect_port(vmd, tap(vmd, name, vmid, 0), BRIDGE)
    down = taps_of(vmd, name, vmid).get(1)
    if not down or "UP" in down["flags"] or "master" in down:
        raise Failure(f"{name}'s interface 1 (down, no switch): {describe(vmd.links())}")
    expect(vmd.vmctl("stop", "-w", name), 0, rf"^stopping vm {name}: terminated vm {vmid}$", f"stop -w {name}")
    gone(vmd, f"{name}'s taps to vanish", lambda: not taps_of(vmd, name, vmid))
    vmid = boot(2)
    macs = re.findall(r"^VMD-GUEST: nic (eth\d) (\S+)\r?$", vmd.console_log(name), re.M)
    if len(macs) != 4 or macs[:2] != macs[2:]:
        raise Failure(f"{name}'s NICs in its two boots: {macs}; want the same two twice")
    for nic, mac in macs[:2]:
        if not re.fullmatch(GENERATED_MAC.format(int(nic[3:]) + 1), mac):
            raise Failure(f"{name}'s {nic} has {mac}, want fe:e1:bb:d{int(nic[3:]) + 1}:xx:xx")
    tap(vmd, name, vmid, 0)


def tap_cleanup(which):
    """SIGKILL of one VM's process or QEMU removes its tap and nothing
    else (the other VM's stays on the bridge); SIGKILL of vmd removes both
    (the taps die with the last descriptor: vmd's and QEMU's)."""
    def run(vmd):
        bridge_up(vmd, BRIDGE)
        vms = []
        for name in (vm("ka"), vm("kb")):
            vmid, _ = vmd.start(name, "-n", "sw")
            vms.append((name, vmid, tap(vmd, name, vmid)["ifname"]))
        (a, a_id, a_tap), (b, b_id, b_tap) = vms
        if which == "vmd":
            vm_pids = [p for _, vmid, _ in vms for p in vmd.vm_pids(vmid)]
            vmd.kill_daemon()
            gone(vmd, "both taps to vanish after vmd's SIGKILL",
                 lambda: not ({a_tap, b_tap} & set(vmd.links())))
            wait_for("the VM processes and QEMUs to end",
                     lambda: not any(vmd.proc_status(p) for p in vm_pids), NET_TIMEOUT)
            return
        vm_pid, qemu = vmd.vm_pids(a_id)
        vmd.signal(vm_pid if which == "vm" else qemu, signal.SIGKILL)
        gone(vmd, f"{a}'s tap {a_tap} to vanish", lambda: a_tap not in vmd.links())
        wait_for(f"{a} to end", lambda: vmd.state(a_id) in ("stopped", "gone"), NET_TIMEOUT)
        expect_port(vmd, tap(vmd, b, b_id), BRIDGE)
        if taps_of(vmd, a, a_id):
            raise Failure(f"{a} still has taps: {describe(vmd.links())}")
    return run


def then_restart(fn):
    """fn(vmd), which SIGKILLs vmd; then vmd again on the same socket and
    vm.conf: it removes what its predecessor's state file lists and ends
    normally, so the case leaves nothing, not even that file."""
    def run(vmd):
        fn(vmd)
        vmd.restart()
    return run


def restart_after_sigkill(vmd):
    """vmd SIGKILLed leaves the bridge it made (nobody can remove it then);
    a vmd started again on the same socket, its vm.conf without any
    switch, removes that bridge and nothing else: not a bridge that
    existed before (configured as a switch, with a port of its own) nor
    one vmd never knew."""
    bridge_up(vmd, BRIDGE)
    bridge_up(vmd, BRIDGE2)
    for name, switch in ((vm("ra"), "sw"), (vm("rb"), "keep")):
        vmid, _ = vmd.start(name, "-n", switch)
        tap(vmd, name, vmid)
    vmd.kill_daemon()
    gone(vmd, "the taps to vanish after vmd's SIGKILL",
         lambda: not [link for link in vmd.links().values() if kind(link) == "tun"])
    if BRIDGE not in vmd.links():
        raise Failure(f"{BRIDGE} vanished while vmd was dead: {describe(vmd.links())}")
    if not vmd.exists(state_file(vmd.sock)):
        raise Failure(f"no state file {state_file(vmd.sock)} after vmd's SIGKILL")
    vmd.write_config(re.sub(r'switch "[^"]*" \{[^}]*\}\n', "", vmd.read_config()))
    vmd.restart()
    gone(vmd, f"the restarted vmd to remove {BRIDGE}, which its predecessor made",
         lambda: BRIDGE not in vmd.links())
    links = vmd.links()
    for name in (BRIDGE2, BRIDGE3):
        if kind(links.get(name, {})) != "bridge":
            raise Failure(f"{name}, which vmd did not make, is gone: {describe(links)}")
    expect_port(vmd, links.get(f"vp{TAG}", {"ifname": f"vp{TAG}"}), BRIDGE2)


RESTART_CONF = SW + switch_conf("keep", BRIDGE2)
RESTART_KEEP = (BRIDGE2, BRIDGE3, f"vp{TAG}", f"vp{TAG}p")


def make_bridge_with_port(vmd, bridge, veth):
    """A bridge of the test's own, up, with one end of a veth pair as its
    port (this kernel has no dummy interfaces)."""
    vmd.ip("link", "add", bridge, "type", "bridge")
    vmd.ip("link", "add", veth, "type", "veth", "peer", "name", veth + "p")
    vmd.ip("link", "set", veth, "master", bridge)
    vmd.ip("link", "set", bridge, "up")


def before_restart(vmd):
    make_bridge_with_port(vmd, BRIDGE2, f"vp{TAG}")
    vmd.ip("link", "add", BRIDGE3, "type", "bridge")


def reset_switches(vmd):
    """Both bridges (one up, one `down`) deleted by hand come back with
    their settings from `vmctl reset switches`; a VM started then joins."""
    bridge_up(vmd, BRIDGE)
    bridge_up(vmd, BRIDGE2, up=False)
    for bridge in (BRIDGE, BRIDGE2):
        vmd.ip("link", "delete", bridge)
    expect(vmd.vmctl("reset", "switches"), 0, r"^$", "reset switches")
    bridge_up(vmd, BRIDGE)
    bridge_up(vmd, BRIDGE2, up=False)
    name = vm("rs")
    vmid, _ = vmd.start(name, "-n", "sw")
    expect_port(vmd, tap(vmd, name, vmid), BRIDGE)


def reload_keeps_used_bridge(vmd):
    """A reload that drops a switch leaves its bridge to the running
    guests on it (their taps stay its ports, they keep pinging each
    other) and removes it once they end; a bridge no VM used goes at
    once."""
    bridge_up(vmd, BRIDGE)
    bridge_up(vmd, BRIDGE2)
    started = ping_pair(vmd, (vm("ra"), vm("rb")), "sw")
    vmd.write_config(vmd.read_config().replace(SW + switch_conf("idle", BRIDGE2), ""))
    expect(vmd.vmctl("reload"), 0, r"^$", "reload")
    gone(vmd, f"{BRIDGE2}, which no VM used, to go", lambda: BRIDGE2 not in vmd.links())
    for name, vmid in started:
        expect_port(vmd, tap(vmd, name, vmid), BRIDGE)
    # Traffic still crosses the old bridge: it learns a MAC anew.
    mac = guest_mac(vmd, started[1][0])
    subprocess.run(["bridge", "-n", vmd.netns, "fdb", "flush", "dev", BRIDGE], capture_output=True)
    wait_for(f"{BRIDGE} to learn {mac} again", lambda: fdb_port(vmd, BRIDGE, mac), NET_TIMEOUT)
    for name, vmid in started:
        expect(vmd.vmctl("stop", "-f", name), 0, r"forced to terminate", f"stop {name}")
    gone(vmd, f"{BRIDGE} to go with its last guest", lambda: BRIDGE not in vmd.links())


def reload_moves_switch(vmd):
    """A reload that points a switch at another bridge moves its running
    guests' taps there, and the old bridge, which vmd made, goes."""
    bridge_up(vmd, BRIDGE)
    name = vm("mv")
    vmid, _ = vmd.start(name, "-n", "sw")
    expect_port(vmd, tap(vmd, name, vmid), BRIDGE)
    vmd.write_config(vmd.read_config().replace(SW, switch_conf("sw", BRIDGE3)))
    expect(vmd.vmctl("reload"), 0, r"^$", "reload")
    bridge_up(vmd, BRIDGE3)
    wait_for(f"the tap to move to {BRIDGE3}",
             lambda: tap(vmd, name, vmid).get("master") == BRIDGE3, NET_TIMEOUT)
    gone(vmd, f"{BRIDGE}, which nothing uses now, to go", lambda: BRIDGE not in vmd.links())


def before_survivors(vmd):
    make_bridge_with_port(vmd, BRIDGE, f"vp{TAG}")


def survivors(vmd):
    """At vmd's exit: the bridge that existed before it (with a port of
    its own) stays, without vmd's tap; a bridge vmd made stays if the test
    added a port to it, and goes if it holds only what vmd added."""
    bridge_up(vmd, BRIDGE2)
    bridge_up(vmd, BRIDGE3)
    vmd.ip("link", "add", f"vq{TAG}", "type", "veth", "peer", "name", f"vq{TAG}p")
    vmd.ip("link", "set", f"vq{TAG}", "master", BRIDGE2)
    for name, switch, bridge in ((vm("sa"), "pre", BRIDGE), (vm("sb"), "made2", BRIDGE3)):
        vmid, _ = vmd.start(name, "-n", switch)
        expect_port(vmd, tap(vmd, name, vmid), bridge)


SURVIVORS_CONF = switch_conf("pre", BRIDGE) + switch_conf("made", BRIDGE2) + switch_conf("made2", BRIDGE3)
SURVIVORS_KEEP = (BRIDGE, BRIDGE2, f"vp{TAG}", f"vp{TAG}p", f"vq{TAG}", f"vq{TAG}p")


def survivors_after_exit(vmd, links):
    """After vmd's exit (the namespace holds only lo and what the case
    made: BRIDGE3 and the taps are gone): both bridges are still bridges
    with their ports."""
    for bridge, port in ((BRIDGE, f"vp{TAG}"), (BRIDGE2, f"vq{TAG}")):
        if kind(links.get(bridge, {})) != "bridge":
            raise Failure(f"{bridge} did not survive vmd's exit: {describe(links)}")
        expect_port(vmd, links.get(port, {"ifname": port}), bridge)


# --- local interfaces (issue 20): vmd's own DHCP server on the tap


def local_pair(vmid, index):
    """(host side, guest side) of local interface `index` of VM `vmid`
    with the default `local prefix` (vmctl.8 LOCAL INTERFACES; ids below
    256)."""
    return f"100.64.{vmid}.{2 * index + 2}", f"100.64.{vmid}.{2 * index + 3}"


def expect_lease(vmd, name, vmid, nic, index, bootfile="none"):
    """The guest's udhcpc got the guest side of local interface `index`
    on `nic`, a /31 with router and DNS the host side and the VM's name;
    the tap has the host side; the host pings the guest. The lease's
    boot file is `bootfile` (`none`; auto_install with -B net)."""
    host, guest = local_pair(vmid, index)
    vmd.wait_console(name, f"VMD-GUEST: dhcp {nic} bootfile ")
    log = vmd.console_log(name)
    for want in (f"dhcp {nic} {guest}/31 router {host}", f"dhcp {nic} dns {host} hostname {name}",
                 f"dhcp {nic} bootfile {bootfile}"):
        if not re.search(rf"^VMD-GUEST: {re.escape(want)}\r?$", log, re.M):
            got = re.findall(r"VMD-GUEST: dhcp .*", log)
            raise Failure(f"{name} has no `{want}` line; its DHCP lines: {got}")
    link = tap(vmd, name, vmid, index)
    addrs = json.loads(vmd.ip("-j", "addr", "show", "dev", link["ifname"]))
    have = [f"{a['local']}/{a['prefixlen']}" for entry in addrs for a in entry.get("addr_info", [])
            if a.get("family") == "inet"]
    if have != [f"{host}/31"]:
        raise Failure(f"{link['ifname']} has {have}, want [{host}/31]")
    wait_for(f"{guest} to answer the host's ping", lambda: vmd.ping(guest), NET_TIMEOUT)


def local_lease(vmd):
    """-L: the guest's DHCP client gets 100.64.N.3/31, router and DNS
    100.64.N.2 and its own name, with nothing configured on the host."""
    name = vm("loc")
    vmid, _ = vmd.start(name, "-L", cmdline=f"{QUIET} vmd.net=dhcp")
    expect_lease(vmd, name, vmid, "eth0", 0)


def net_boot_lease(vmd):
    """-B net: the VM boots its kernel and its local interface's lease
    names auto_install (OpenBSD's simulated network boot)."""
    name = vm("nbt")
    vmid, _ = vmd.start(name, "-L", "-B", "net", cmdline=f"{QUIET} vmd.net=dhcp")
    expect_lease(vmd, name, vmid, "eth0", 0, bootfile="auto_install")


def two_local(vmd):
    """-L -L: the second local interface gets the next pair."""
    name = vm("loc2")
    vmid, _ = vmd.start(name, "-L", "-L", cmdline=f"{QUIET} vmd.net=dhcp")
    expect_lease(vmd, name, vmid, "eth0", 0)
    expect_lease(vmd, name, vmid, "eth1", 1)


def local_first(vmd):
    """-i 2 -L: the local interface comes first, as eth0."""
    name = vm("loci")
    vmid, _ = vmd.start(name, "-i", "2", "-L", cmdline=f"{QUIET} vmd.net=dhcp:eth0")
    expect_lease(vmd, name, vmid, "eth0", 0)


def local_same_address(vmd):
    """A vm.conf VM with a local interface, stopped and started again,
    gets the same address."""
    name = vm("locs")
    leases = []
    for n in (1, 2):
        vmid, _ = vmd.start_with(name)
        wait_for(f"boot {n} of {name} to get its lease",
                 lambda: len(re.findall(r"^VMD-GUEST: dhcp eth0 dns ", vmd.console_log(name), re.M)) >= n,
                 t.BOOT_TIMEOUT)
        expect_lease(vmd, name, vmid, "eth0", 0)
        leases.append(re.findall(r"^VMD-GUEST: dhcp eth0 (\S+) router", vmd.console_log(name), re.M)[-1])
        if n == 1:
            expect(vmd.vmctl("stop", "-w", name), 0, rf"^stopping vm {name}: terminated vm {vmid}$",
                   f"stop -w {name}")
    if leases[0] != leases[1]:
        raise Failure(f"{name}'s leases: {leases}; want the same address twice")


def unknown_switch(vmd):
    """`-n nosuch` and `-n off` (a disabled switch) refuse the start with
    vmctl.8's messages; no VM runs, no tap is left."""
    name = vm("unk")
    for switch, why in (("nosuch", 'switch "nosuch" not found: define it in vm.conf'),
                        ("off", 'switch "off" is disabled')):
        expect(vmd.vmctl("start", name, "-b", t.KERNEL, "--initrd", t.INITRD, "--cmdline", QUIET,
                         "-m", "256M", "-n", switch),
               1, rf"^vmctl: start vm command failed: {re.escape(why)}$", f"start on switch {switch}")
        if [row for row in vmd.status() if row["NAME"] == name and row["STATE"] != "stopped"]:
            raise Failure(f"status after the refused start: {vmd.status()}")
        taps = [link["ifname"] for link in vmd.links().values() if kind(link) == "tun"]
        if taps:
            raise Failure(f"taps after the refused start: {describe(vmd.links())}")


# --- the leftovers check around every case


def ours(link):
    """Whether an interface is one this run's cases made or had vmd make:
    a bridge or veth of its names, or a tap described for one of its VMs."""
    names = {BRIDGE, BRIDGE2, BRIDGE3} | {f"{p}{TAG}{q}" for p in ("vp", "vq") for q in ("", "p")}
    m = re.fullmatch(r"vm\d+-if\d+-(.+)", link.get("ifalias", ""))
    return link["ifname"] in names or bool(m and m.group(1) in OUR_VMS)


def everywhere():
    """Every interface of this run's in the machine's namespace and in
    every named one: [(namespace, name)]."""
    found = []
    for ns in [None, *netns_list()]:
        argv = ["ip", *(["-n", ns] if ns else []), "-j", "-d", "link", "show"]
        p = subprocess.run(argv, capture_output=True, text=True)
        if p.returncode == 0:
            found += [(ns or "(the machine's)", link["ifname"]) for link in json.loads(p.stdout or "[]")
                      if ours(link)]
    return found


def state_file(sock):
    """vmd.8's state file of the vmd of socket `sock`: /run/vmd/ and the
    socket's path with `/` as `-` and other bytes but letters, digits, `.`
    and `_` as %XX, then `.state`."""
    name = "".join("-" if c == "/" else c if c.isascii() and (c.isalnum() or c in "._") else
                   "".join(f"%{b:02X}" for b in c.encode()) for c in sock.lstrip("/"))
    return f"/run/vmd/{name}.state"


def net_case(fn, conf="", before=None, keep=(), after_exit=None):
    """fn(vmd) with a vmd of its own in a namespace of its own (vm.conf:
    `conf` after the usual lines); `before(vmd)` runs in the namespace
    before vmd starts. If vmd still runs at the end it is stopped with
    SIGTERM, must exit 0 by itself, and the namespace must then hold only
    lo and `keep` (what the case made), its state file be gone; then
    `after_exit(vmd, links)`. Then the namespace must be gone, and nothing of this run's
    left anywhere."""
    def run():
        vmd = Vmd(conf_extra=conf, netns=True, before=before)
        try:
            fn(vmd)
            if vmd.alive():
                vmd.end()
                if vmd.proc.returncode != 0:
                    raise Failure(f"vmd did not exit by itself with 0 after SIGTERM ({vmd.proc.returncode}): "
                                  f"{vmd.log()[-2000:]}")
                links = vmd.links()
                left = {n: link for n, link in links.items() if n != "lo" and n not in keep}
                if left:
                    raise Failure(f"left in the namespace after vmd's exit: {describe(left)}")
                if vmd.exists(state_file(vmd.sock)):
                    raise Failure(f"vmd's state file {state_file(vmd.sock)} outlived it")
                if after_exit:
                    after_exit(vmd, links)
        finally:
            ns = vmd.netns
            vmd.stop()
        if ns in netns_list():
            raise Failure(f"the namespace {ns} still exists")
        left = everywhere()
        if left:
            raise Failure(f"left after the case: {left}")
    return run


def main():
    if not t.prepare():
        return 1
    for tool in ("ip", "bridge"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode != 0:
            t.fail("setup", f"{tool} (iproute2) is missing: run sh regress/setup")
            return t.summary()
    sw = SW
    case("two-guests-on-a-switch-ping", net_case(two_guests_ping, sw))
    lla = (f'vm "{vm("lla")}" {{\n disable\n boot "{t.KERNEL}"\n initrd "{t.INITRD}"\n'
           f' cmdline "{guest_cmdline("10.0.0.1/24", "10.0.0.2")}"\n memory 256M\n'
           f' interface tap7 {{ switch "sw" lladdr 52:54:00:12:34:56 }}\n}}\n')
    case("taps-ifalias-mac-bridge-ports", net_case(taps_ifalias_mac, sw + lla))
    case("two-nics-i-2", net_case(two_nics))
    st = (f'vm "{vm("st")}" {{\n disable\n boot "{t.KERNEL}"\n initrd "{t.INITRD}"\n'
          f' cmdline "{QUIET}"\n memory 256M\n interface {{ switch "sw" }}\n interface {{ down }}\n}}\n')
    case("generated-macs-stable-across-restarts-down-tap", net_case(stable_macs_and_down, sw + st))
    case("sigkill-vm-process-removes-its-tap", net_case(tap_cleanup("vm"), sw))
    case("sigkill-qemu-removes-its-tap", net_case(tap_cleanup("qemu"), sw))
    case("sigkill-vmd-removes-taps", net_case(then_restart(tap_cleanup("vmd")), sw))
    case("restart-after-sigkill-removes-predecessors-bridge-only",
         net_case(restart_after_sigkill, RESTART_CONF, before=before_restart, keep=RESTART_KEEP))
    case("reset-switches-recreates-deleted-bridges",
         net_case(reset_switches, RESET_CONF))
    case("reload-keeps-a-used-bridge-until-its-vms-end",
         net_case(reload_keeps_used_bridge, sw + switch_conf("idle", BRIDGE2)))
    case("reload-moves-a-switch-to-another-bridge", net_case(reload_moves_switch, sw))
    case("preexisting-bridge-and-foreign-port-survive-exit",
         net_case(survivors, SURVIVORS_CONF, before=before_survivors, keep=SURVIVORS_KEEP,
                  after_exit=survivors_after_exit))
    case("unknown-or-disabled-switch-refused",
         net_case(unknown_switch, sw + switch_conf("off", BRIDGE2, " disable\n")))
    case("local-interface-dhcp-lease-host-pings", net_case(local_lease))
    case("net-boot-lease-names-auto-install", net_case(net_boot_lease))
    case("two-local-interfaces-next-pair", net_case(two_local))
    case("i-2-L-local-interface-is-eth0", net_case(local_first))
    locs = (f'vm "{vm("locs")}" {{\n disable\n boot "{t.KERNEL}"\n initrd "{t.INITRD}"\n'
            f' cmdline "{QUIET} vmd.net=dhcp"\n memory 256M\n local interface\n}}\n')
    case("local-interface-same-address-after-restart", net_case(local_same_address, locs))
    return t.summary()


if __name__ == "__main__":
    sys.exit(main())
