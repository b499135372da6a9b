#!/usr/bin/env python3
"""regress/net/policy.py: what vm.conf.5 promises of an interface's and a
switch's policy (issue 19): `locked lladdr`, `group`, `rdomain`.

Runs as root, like net.py, whose harness it uses: each case has its own
vmd in a network namespace of its own (net.net_case), checked to leave
nothing behind. Black box: vmctl, vm.conf, `ip -n NS -j -d link`, nft's
ruleset of the namespace (`ip netns exec NS nft -j list ruleset`), busybox's
ping from the namespace and the test guest's console (regress/guest:
`vmd.mac=`, `vmd.ip=`, `vmd.ping=`).

- locked lladdr: a guest that changes its MAC is cut off (the host's pings
  get no answer) and its chain's counter counts, while its neighbour on
  the same switch, also locked, answers and reaches the host; when the VM
  ends its chain is gone, and a VM that gets the same tap name and the
  same changed MAC, unlocked, answers (on Linux >= 6.16 a chain outlives
  its tap and would otherwise cut it off).
- group: a switch's bridge and a tap are in the iproute2 link groups
  vm.conf names (the namespace's own /etc/iproute2/group, which `ip netns
  exec` mounts for vmd and `ip -n` for the check).
- rdomain on a kernel without VRF: the start fails with vm.conf.5's
  message. The nested KVM host (regress/nested) runs the VRF itself.
"""

import json
import os
import re
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib"))
import net  # noqa: E402
import vmdregress as t  # noqa: E402
from vmdregress import Failure, Skip, case, expect, wait_for  # noqa: E402
from net import BRIDGE, NET_TIMEOUT, QUIET, TAG, net_case, switch_conf, vm  # noqa: E402

HOST = "10.0.0.254"
# The guest's changed MAC (locally administered, never vmd's fe:e1:bb:..).
CHANGED_MAC = "02:00:5e:00:00:0a"
# The tap name the locked VM and then its unlocked successor get.
SHARED_TAP = f"tl{TAG}"[:15]
# Tries of one ping each (1 s timeout) before a guest counts as cut off;
# the positive control is pinged in the same loop.
CUT_OFF_TRIES = 15


def conf_vm(name, cmdline, interface):
    return (f'vm "{name}" {{\n disable\n boot "{t.KERNEL}"\n initrd "{t.INITRD}"\n'
            f' cmdline "{QUIET} {cmdline}"\n memory 256M\n interface {interface}\n}}\n')


def ruleset(vmd):
    """The namespace's nftables rules: [(chain, packets dropped)] of vmd's
    lock chains (its netdev table)."""
    p = subprocess.run(["ip", "netns", "exec", vmd.netns, "nft", "-j", "list", "ruleset"],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise Failure(f"nft list ruleset: {p.stderr.strip()}")
    found = []
    for item in json.loads(p.stdout or "{}").get("nftables", []):
        rule = item.get("rule")
        if rule and rule.get("family") == "netdev":
            packets = sum(e["counter"]["packets"] for e in rule.get("expr", []) if "counter" in e)
            found.append((rule["chain"], packets))
    chains = [(c["chain"]["name"], None) for c in json.loads(p.stdout or "{}").get("nftables", [])
              if "chain" in c and c["chain"].get("family") == "netdev"]
    return found + [c for c in chains if c[0] not in {f[0] for f in found}]


def counter(vmd, tap):
    for chain, packets in ruleset(vmd):
        if chain == f"lock-{tap}":
            return packets
    return None


def host_on_bridge(vmd):
    net.bridge_up(vmd, BRIDGE)
    vmd.ip("addr", "add", f"{HOST}/24", "dev", BRIDGE)


LOCKED = vm("lk")
NEIGHBOUR = vm("nb")
SUCCESSOR = vm("sc")
def lock_conf():
    return (switch_conf("sw", BRIDGE)
            + conf_vm(LOCKED, f"vmd.mac={CHANGED_MAC} vmd.ip=10.0.0.1/24",
                      f'{SHARED_TAP} {{ switch "sw", locked lladdr }}')
            + conf_vm(NEIGHBOUR, f"vmd.ip=10.0.0.2/24 vmd.ping={HOST}",
                      '{ switch "sw", locked lladdr }')
            + conf_vm(SUCCESSOR, f"vmd.mac={CHANGED_MAC} vmd.ip=10.0.0.3/24",
                      f'{SHARED_TAP} {{ switch "sw" }}'))


def locked_lladdr(vmd):
    host_on_bridge(vmd)
    locked_id, _ = vmd.start_with(LOCKED)
    neighbour_id, _ = vmd.start_with(NEIGHBOUR)
    neighbour_tap = net.tap(vmd, NEIGHBOUR, neighbour_id)["ifname"]
    net.expect_port(vmd, net.tap(vmd, LOCKED, locked_id), BRIDGE)
    if counter(vmd, SHARED_TAP) is None or counter(vmd, neighbour_tap) is None:
        raise Failure(f"no lock chain for {SHARED_TAP} and {neighbour_tap}: {ruleset(vmd)}")
    vmd.wait_console(LOCKED, f"VMD-GUEST: mac eth0 {CHANGED_MAC}")
    vmd.wait_console(LOCKED, "VMD-GUEST: ready")
    vmd.wait_console(NEIGHBOUR, f"VMD-GUEST: ping {HOST} ok")
    net.locked_off(vmd, "10.0.0.1", "10.0.0.2", CUT_OFF_TRIES)
    dropped = counter(vmd, SHARED_TAP)
    if not dropped:
        raise Failure(f"lock-{SHARED_TAP} dropped {dropped} packets: {ruleset(vmd)}")
    if counter(vmd, neighbour_tap) != 0:
        raise Failure(f"lock-{neighbour_tap} dropped the neighbour's frames: {ruleset(vmd)}")
    expect(vmd.vmctl("stop", "-w", LOCKED), 0, rf"^stopping vm {LOCKED}: terminated vm {locked_id}$",
           f"stop -w {LOCKED}")
    net.gone(vmd, f"chain lock-{SHARED_TAP}", lambda: counter(vmd, SHARED_TAP) is None)
    successor_id, _ = vmd.start_with(SUCCESSOR)
    if net.tap(vmd, SUCCESSOR, successor_id)["ifname"] != SHARED_TAP:
        raise Failure(f"{SUCCESSOR} did not get tap {SHARED_TAP}")
    vmd.wait_console(SUCCESSOR, f"VMD-GUEST: mac eth0 {CHANGED_MAC}")
    wait_for(f"{SUCCESSOR} (tap {SHARED_TAP}, unlocked) to answer the host",
             lambda: vmd.ping("10.0.0.3"), NET_TIMEOUT)
    # The host's address is the case's: vmd keeps a bridge holding one.
    vmd.ip("addr", "flush", "dev", BRIDGE)


# Group names of the namespace's own iproute2 file (no digit at the end).
GROUPS = {"vmdswgrp": 71, "vmdtapgrp": 72}
GROUPED = vm("gr")
def group_conf():
    return (switch_conf("sw", BRIDGE, " group vmdswgrp\n")
            + conf_vm(GROUPED, "", '{ switch "sw", group vmdtapgrp }'))


def etc_netns(vmd):
    return f"/etc/netns/{vmd.netns}"


def write_groups(vmd):
    """vmd's namespace gets an /etc/iproute2/group of its own (`ip netns
    exec` and `ip -n` mount /etc/netns/NS/iproute2 over /etc/iproute2)."""
    os.makedirs(f"{etc_netns(vmd)}/iproute2")
    with open(f"{etc_netns(vmd)}/iproute2/group", "w") as f:
        f.write("0\tdefault\n" + "".join(f"{n}\t{g}\n" for g, n in GROUPS.items()))


def groups(vmd):
    try:
        bridge = net.bridge_up(vmd, BRIDGE)
        vmid, _ = vmd.start_with(GROUPED)
        tap = net.tap(vmd, GROUPED, vmid)
        for link, group in ((bridge, "vmdswgrp"), (tap, "vmdtapgrp")):
            link = vmd.links()[link["ifname"]]
            if link.get("group") not in (group, str(GROUPS[group])):
                raise Failure(f"{link['ifname']} is in group {link.get('group')}, want {group}")
    finally:
        shutil.rmtree(etc_netns(vmd), ignore_errors=True)


RDOMAIN_ERROR = ("cannot create VRF rdomain5 (table 1005): this kernel has no VRF support "
                 "(CONFIG_NET_VRF; try modprobe vrf): rdomain cannot be used here")
ROUTED = vm("rd")
ROUTED_SW = vm("rs")
def rdomain_conf():
    return (switch_conf("vrfsw", BRIDGE, " rdomain 5\n")
            + conf_vm(ROUTED, "", "{ rdomain 5 }")
            + conf_vm(ROUTED_SW, "", '{ switch "vrfsw" }'))


def no_vrf_here(vmd):
    p = subprocess.run(["ip", "-n", vmd.netns, "link", "add", "vrfprobe", "type", "vrf", "table", "1099"],
                       capture_output=True, text=True)
    if p.returncode == 0:
        vmd.ip("link", "delete", "vrfprobe")
        raise Skip("this kernel has VRF support: regress/nested tests rdomain")


def rdomain_error(vmd):
    no_vrf_here(vmd)
    for name in (ROUTED, ROUTED_SW):
        rc, out = vmd.vmctl("start", name)
        if rc == 0 or RDOMAIN_ERROR not in out:
            raise Failure(f"start {name}: exit {rc}: {out.strip()}; want {RDOMAIN_ERROR!r}")
        if re.search(r"\brdomain5\b", " ".join(vmd.links())):
            raise Failure(f"a VRF was left: {net.describe(vmd.links())}")
    if any(net.kind(link) == "tun" for link in vmd.links().values()):
        raise Failure(f"a failed start left a tap: {net.describe(vmd.links())}")


def main():
    if not t.prepare():
        return 1
    if shutil.which("nft") is None:
        t.fail("setup", "nft (nftables) is missing: run sh regress/setup")
        return t.summary()
    case("locked-lladdr-cuts-off-a-changed-mac-only-until-the-vm-ends", net_case(locked_lladdr, lock_conf()))
    case("switch-and-interface-groups-in-ip-link", net_case(groups, group_conf(), before=write_groups))
    case("rdomain-without-vrf-fails-with-the-reason", net_case(rdomain_error, rdomain_conf()))
    return t.summary()


if __name__ == "__main__":
    sys.exit(main())
