""" "Nodes" as network namespaces joined by veth links to one bridge-less hub namespace.

Each node gets its own namespace and address (10.231.<n>.2) on a veth whose other end sits in a
hub namespace (10.231.<n>.1), which routes between the nodes; services every node reaches
(Valkey) run in the hub. Everything is created with the test's pid in its names and removed by
:meth:`Fabric.close` (deleting a namespace deletes its veth ends). Nothing touches the host's
own namespace, routes or firewall, and no address leaves the machine. The first ``ip netns add``
on a machine also makes ``/run/netns`` (a directory bind-mounted on itself); the last close
removes both again where they were not there before.

Links can be cut (``ip link set down``) and a node's sending throttled (``tc tbf``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from e2e.agent import AgentProcess

#: The port each node's agent serves its peers on (every node has its own address).
FABRIC_PORT = 7450
#: Where iproute2 keeps named namespaces (a mount point it makes itself on first use).
NETNS_DIR = Path("/run/netns")
#: ``(directory existed, was a mount point)`` before this process's first Fabric.
_HOST_NETNS: tuple[bool, bool] | None = None


def mount_points() -> list[str]:
    """The host's mount points from its mount table, sorted (a point mounted twice is listed twice)."""
    with open("/proc/self/mountinfo") as f:
        return sorted(line.split()[4] for line in f)


def netns_dir_state() -> tuple[bool, bool]:
    """Whether :data:`NETNS_DIR` exists and whether it is a mount point (``os.path.ismount`` misses
    a bind mount on the same filesystem: read the mount table)."""
    return NETNS_DIR.is_dir(), str(NETNS_DIR) in mount_points()


def _restore_netns_dir() -> None:
    """Undoes what the first ``ip netns add`` made, once no named namespace is left in it."""
    if _HOST_NETNS is None or not NETNS_DIR.is_dir() or any(NETNS_DIR.iterdir()):
        return
    existed, mounted = _HOST_NETNS
    if not mounted:
        while netns_dir_state()[1]:  # iproute2 may have stacked more than one bind mount
            if subprocess.run(["umount", str(NETNS_DIR)], capture_output=True).returncode != 0:
                return
    if not existed:
        NETNS_DIR.rmdir()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def netns_available() -> str | None:
    """Why network namespaces cannot be made here (None: they can)."""
    if shutil.which("ip") is None:
        return "no iproute2 'ip' command"
    if os.geteuid() != 0:
        return "network namespaces need root"
    return None


def require_netns() -> None:
    why = netns_available()
    if why is not None:
        pytest.skip(f"multihost tests: {why}")


@dataclass
class Node:
    name: str  # its namespace
    address: str
    link: str  # the hub's end of its veth (cut there)
    dev: str  # the node's own end (what it sends is throttled there)


class Fabric:
    def __init__(self, nodes: int) -> None:
        global _HOST_NETNS
        if _HOST_NETNS is None:
            _HOST_NETNS = netns_dir_state()
        tag = f"{os.getpid() % 100000}"
        self.hub = f"kvf{tag}h"
        self.nodes: list[Node] = []
        self._made: list[str] = []
        try:
            _ip("netns", "add", self.hub)
            self._made.append(self.hub)
            # One L2 segment (a bridge in the hub): UCX's TCP transport takes only peers it sees
            # as reachable from an interface's own subnet.
            self.exec_in(self.hub, "ip", "link", "set", "lo", "up")
            self.exec_in(self.hub, "ip", "link", "add", "br0", "type", "bridge")
            self.exec_in(self.hub, "ip", "addr", "add", f"{self.hub_address}/24", "dev", "br0")
            self.exec_in(self.hub, "ip", "link", "set", "br0", "up")
            for n in range(nodes):
                ns, hub_end, node_end = f"kvf{tag}n{n}", f"kvf{tag}h{n}", f"kvf{tag}v{n}"
                _ip("netns", "add", ns)
                self._made.append(ns)
                _ip(
                    "link",
                    "add",
                    hub_end,
                    "netns",
                    self.hub,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    node_end,
                    "netns",
                    ns,
                )
                self.exec_in(self.hub, "ip", "link", "set", hub_end, "master", "br0")
                self.exec_in(self.hub, "ip", "link", "set", hub_end, "up")
                self.exec_in(ns, "ip", "link", "set", "lo", "up")
                self.exec_in(ns, "ip", "addr", "add", f"10.231.0.{n + 2}/24", "dev", node_end)
                self.exec_in(ns, "ip", "link", "set", node_end, "up")
                self.nodes.append(Node(ns, f"10.231.0.{n + 2}", hub_end, node_end))
        except BaseException:
            self.close()
            raise

    @property
    def hub_address(self) -> str:
        return "10.231.0.1"

    def prefix(self, ns: str) -> list[str]:
        """The command prefix that runs a program in namespace ``ns``."""
        return ["ip", "netns", "exec", ns]

    def agent(
        self, n: int, tmp: Path, valkey_port: int, pool_size: str, extra: list[str] | None = None
    ) -> AgentProcess:
        """An agent on node ``n`` with the fabric on: the hub's Valkey, its node's address."""
        from e2e.agent import AgentProcess

        node = self.nodes[n]
        return AgentProcess(
            tmp / f"agent{n}",
            pool_size,
            prefix=self.prefix(node.name),
            extra_args=[
                "--fabric-valkey", f"valkey://{self.hub_address}:{valkey_port}/0",
                "--fabric-listen", f"{node.address}:{FABRIC_PORT}",
                *(extra or []),
            ],
        )  # fmt: skip

    def exec_in(self, ns: str, *argv: str) -> None:
        subprocess.run([*self.prefix(ns), *argv], check=True, capture_output=True)

    def cut(self, node: Node) -> None:
        self.exec_in(self.hub, "ip", "link", "set", node.link, "down")

    def restore(self, node: Node) -> None:
        self.exec_in(self.hub, "ip", "link", "set", node.link, "up")

    def throttle(self, node: Node, rate: str) -> None:
        """Caps what ``node`` sends (e.g. ``"8mbit"``): a slow uplink, its other traffic untouched."""
        self.exec_in(
            node.name,
            "tc",
            "qdisc",
            "replace",
            "dev",
            node.dev,
            "root",
            "tbf",
            "rate",
            rate,
            "burst",
            "32kbit",
            "latency",
            "400ms",
        )

    def close(self) -> None:
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made.clear()
        _restore_netns_dir()

    def __enter__(self) -> Fabric:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
