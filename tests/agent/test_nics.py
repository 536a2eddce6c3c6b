"""RDMA discovery from sysfs: a fake tree in the kernel's layout (no machine here has a device),
and the self-test's answer on this machine (none: the fabric uses TCP)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvfabric.agent import nics


def _port(dev: Path, n: int, state: str, layer: str, gids: list[str]) -> None:
    port = dev / "ports" / str(n)
    (port / "gids").mkdir(parents=True)
    (port / "state").write_text(f"{state}\n")
    (port / "link_layer").write_text(f"{layer}\n")
    (port / "rate").write_text("200 Gb/sec (4X HDR)\n")
    for i, gid in enumerate(gids):
        (port / "gids" / str(i)).write_text(gid + "\n")


def test_devices_ports_gids_and_numa_come_from_sysfs(tmp_path: Path) -> None:
    zero = "0000:0000:0000:0000:0000:0000:0000:0000"
    for name, numa in (("mlx5_0", "0"), ("mlx5_1", "1")):
        dev = tmp_path / name
        (dev / "device").mkdir(parents=True)
        (dev / "device" / "numa_node").write_text(numa + "\n")
    _port(
        tmp_path / "mlx5_0", 1, "4: ACTIVE", "InfiniBand", [zero, "fe80:0000:0000:0000:b859:9f03:00d4:1b2e"]
    )
    _port(tmp_path / "mlx5_1", 1, "1: DOWN", "Ethernet", [zero])
    found = nics.discover(tmp_path)
    assert [(d.name, d.numa_node, d.active) for d in found] == [("mlx5_0", 0, True), ("mlx5_1", 1, False)]
    assert found[0].ports[0].gid.startswith("fe80:") and found[1].ports[0].gid == ""
    assert found[1].ports[0].link_layer == "Ethernet" and found[1].ports[0].state == "DOWN"
    assert nics.nearest(found, 1) is found[0]  # the only active one, though on the other node
    assert nics.summary(found) == {"rdma_devices": 2, "rdma_active_ports": 1, "rdma_names": "mlx5_0,mlx5_1"}


def test_no_sysfs_tree_means_no_devices(tmp_path: Path) -> None:
    assert nics.discover(tmp_path / "absent") == []
    assert nics.nearest([], 0) is None


@pytest.mark.skipif(
    nics.SYSFS.exists() and any(d.active for d in nics.discover()), reason="this host has RDMA"
)
def test_the_self_test_says_tcp_where_there_is_no_rdma_port() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kvfabric.agent.nics", "--self-test"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "fabric uses TCP" in out.stdout


def test_ucx_uses_the_active_ports_of_the_nic_nearest_the_agents_cpus(tmp_path: Path) -> None:
    sysfs, nodes = tmp_path / "ib", tmp_path / "node"
    for name, numa, state in (
        ("mlx5_0", "0", "4: ACTIVE"),
        ("mlx5_1", "1", "4: ACTIVE"),
        ("mlx5_2", "1", "1: DOWN"),
    ):
        dev = sysfs / name
        (dev / "device").mkdir(parents=True)
        (dev / "device" / "numa_node").write_text(numa + "\n")
        _port(dev, 1, state, "InfiniBand", [])
    _port(sysfs / "mlx5_1", 2, "4: ACTIVE", "InfiniBand", [])
    for node, cpus in (("node0", "0-15,32-47"), ("node1", "16-31,48-63")):
        (nodes / node).mkdir(parents=True)
        (nodes / node / "cpulist").write_text(cpus + "\n")
    found = nics.discover(sysfs)
    assert nics.numa_node_of({20, 21, 50}, nodes) == 1
    assert nics.numa_node_of({0, 1, 20}, nodes) == 0  # most of them
    assert nics.numa_node_of({200}, nodes) == -1
    assert nics.ucx_net_devices(found, 1) == "mlx5_1:1,mlx5_1:2"
    assert nics.ucx_net_devices(found, 0) == "mlx5_0:1"
    assert nics.ucx_net_devices(found, -1) == "mlx5_0:1"  # unknown node: any active one
    assert nics.ucx_net_devices([], 0) == ""
