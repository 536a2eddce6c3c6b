"""The multihost tests' "nodes" leave the host as they found it: the namespaces go, and so do the
``/run/netns`` directory and the bind mount that the first ``ip netns add`` makes on a machine."""

from __future__ import annotations

import subprocess

import pytest

from e2e.netns import Fabric, mount_points, netns_dir_state, require_netns

pytestmark = pytest.mark.multihost


def _named_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return sorted(line.split()[0] for line in out.splitlines() if line.strip())


def test_a_fabric_leaves_no_namespace_directory_or_mount_behind() -> None:
    require_netns()
    before = (netns_dir_state(), mount_points(), _named_namespaces())
    with Fabric(2) as f:
        assert netns_dir_state() == (True, True)  # iproute2 made (or reused) its mount point
        assert {f.hub, *(n.name for n in f.nodes)} <= set(_named_namespaces())
    assert (netns_dir_state(), mount_points(), _named_namespaces()) == before
