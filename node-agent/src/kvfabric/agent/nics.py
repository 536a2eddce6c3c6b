"""The node's RDMA NICs: what the kernel lists, and a self-test for a first real cluster.

Discovery reads what the RDMA core exposes in sysfs (``/sys/class/infiniband``: devices, ports,
state, link layer, GIDs, NUMA node), the same data ``pyverbs`` queries through ibverbs, without
needing the Python bindings of the node's rdma-core (Debian's ``python3-pyverbs`` matches its
rdma-core; PyPI's does not import there). The agent reports it in ``/stats`` and picks ``tcp``
for its transfers when no port is active.

No machine of this project's workplace has an RDMA device (nor soft-RoCE), so only the "no
device" path runs here. On a cluster with NICs, run::

    python -m kvfabric.agent.nics --self-test

It lists the devices and, when a port is active, moves 64 MiB between two NIXL agents of this
process over UCX's RDMA transports (``UCX_TLS=rc,ud``) and checks the bytes: exit 0 when that
works, 1 when it fails, 2 when there is no active RDMA port (the fabric then uses TCP).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

SYSFS = Path("/sys/class/infiniband")


@dataclass(frozen=True)
class RdmaPort:
    port: int
    state: str  # e.g. "ACTIVE", "DOWN"
    link_layer: str  # "InfiniBand" or "Ethernet" (RoCE)
    rate: str  # e.g. "200 Gb/sec (4X HDR)"
    gid: str  # the first non-zero GID ("" when none)


@dataclass(frozen=True)
class RdmaDevice:
    name: str
    numa_node: int  # -1: unknown
    ports: list[RdmaPort] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return any(p.state == "ACTIVE" for p in self.ports)


def _read(path: Path, default: str = "") -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return default


def discover(root: Path = SYSFS) -> list[RdmaDevice]:
    """The RDMA devices under ``root`` (sysfs), sorted by name; empty when there are none."""
    if not root.is_dir():
        return []
    devices = []
    for dev in sorted(p for p in root.iterdir() if p.is_dir()):
        ports = []
        for port_dir in sorted(
            (dev / "ports").glob("*"), key=lambda p: int(p.name) if p.name.isdigit() else 0
        ):
            if not port_dir.name.isdigit():
                continue
            gids = sorted((port_dir / "gids").glob("*"), key=lambda p: int(p.name) if p.name.isdigit() else 0)
            gid = next((g for g in (_read(p) for p in gids) if g and set(g) - {"0", ":"}), "")
            state = _read(port_dir / "state")  # "4: ACTIVE"
            ports.append(
                RdmaPort(
                    port=int(port_dir.name),
                    state=state.split(":", 1)[-1].strip() if state else "UNKNOWN",
                    link_layer=_read(port_dir / "link_layer"),
                    rate=_read(port_dir / "rate"),
                    gid=gid,
                )
            )
        numa = _read(dev / "device" / "numa_node", "-1")
        devices.append(RdmaDevice(dev.name, int(numa) if numa.lstrip("-").isdigit() else -1, ports))
    return devices


def nearest(devices: list[RdmaDevice], numa_node: int) -> RdmaDevice | None:
    """The active device on ``numa_node`` (a GPU's), else any active one, else None."""
    active = [d for d in devices if d.active]
    return next((d for d in active if d.numa_node == numa_node), active[0] if active else None)


def numa_node_of(cpus: set[int], root: Path = Path("/sys/devices/system/node")) -> int:
    """The NUMA node holding most of ``cpus`` (the CPUs this agent runs on), -1 when unknown."""
    best, most = -1, 0
    for node in sorted(root.glob("node[0-9]*")):
        listed: set[int] = set()
        for part in _read(node / "cpulist").split(","):
            lo, _, hi = part.partition("-")
            if lo.isdigit():
                listed.update(range(int(lo), int(hi or lo) + 1))
        if len(listed & cpus) > most:
            best, most = int(node.name[4:]), len(listed & cpus)
    return best


def ucx_net_devices(devices: list[RdmaDevice], numa_node: int) -> str:
    """``UCX_NET_DEVICES`` for RDMA transfers: the active ports of the device nearest
    ``numa_node`` (e.g. ``mlx5_0:1``), so UCX does not pick a NIC across the socket
    interconnect; "" when no port is active."""
    dev = nearest(devices, numa_node)
    if dev is None:
        return ""
    return ",".join(f"{dev.name}:{p.port}" for p in dev.ports if p.state == "ACTIVE")


def summary(devices: list[RdmaDevice]) -> dict[str, int | str]:
    """What ``/stats`` says about the NICs."""
    return {
        "rdma_devices": len(devices),
        "rdma_active_ports": sum(p.state == "ACTIVE" for d in devices for p in d.ports),
        "rdma_names": ",".join(d.name for d in devices),
    }


def self_test(devices: list[RdmaDevice], size: int = 64 << 20) -> int:
    """Moves ``size`` bytes between two NIXL agents over RDMA and checks them (see module doc)."""
    if not any(d.active for d in devices):
        print("no active RDMA port: the fabric uses TCP (UCX_TLS=tcp)")
        return 2
    import ctypes
    import mmap

    os.environ["UCX_TLS"] = os.environ.get("KVFABRIC_SELF_TEST_UCX_TLS", "rc,ud")
    from kvfabric.agent.transport import NixlTransport

    src, dst = mmap.mmap(-1, size), mmap.mmap(-1, size)
    src[:] = os.urandom(size)

    def addr(m: mmap.mmap) -> int:
        return ctypes.addressof(ctypes.c_char.from_buffer(m))

    a = NixlTransport("kvfabric-self-test-a", [(addr(src), size)])
    b = NixlTransport("kvfabric-self-test-b", [(addr(dst), size)])
    block = 2 << 20
    starts = list(range(0, size, block))
    try:
        t = time.perf_counter()
        a.write(
            b.name,
            b.local_info(),
            [addr(src) + s for s in starts],
            [addr(dst) + s for s in starts],
            block,
            time.monotonic() + 30,
        )
        seconds = time.perf_counter() - t
    except Exception as exc:
        print(f"RDMA write failed: {exc}")
        return 1
    finally:
        a.close()
        b.close()
    if src[:] != dst[:]:
        print("RDMA write completed but the bytes differ")
        return 1
    print(
        f"RDMA write of {size >> 20} MiB verified: {size / seconds / 1e9:.2f} GB/s "
        f"(UCX_TLS={os.environ['UCX_TLS']})"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kvfabric.agent.nics", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--self-test", action="store_true", help="move bytes over RDMA between two NIXL agents"
    )
    args = parser.parse_args(argv)
    devices = discover()
    print(json.dumps([asdict(d) for d in devices], indent=1))
    return self_test(devices) if args.self_test else 0


if __name__ == "__main__":
    sys.exit(main())
