"""A node killed before its stop (a test run killed by a timeout, say) leaves the host changed:
its shims and containers keep running, and its mounts, the pods' veths, the bridge and the
kubepods cgroups stay. The next node to take the lock must remove all of it before anything is
measured, and then work: the machine ends as it was before the killed node started."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from e2e.agent import wait_until
from e2e.k8s_cluster import ControlPlane
from e2e.k8s_node import (
    Node,
    assert_machine_unchanged,
    build_images,
    machine_state,
    node_available,
    processes_under,
    stop_all,
)

pytestmark = [pytest.mark.kubelet, pytest.mark.timeout(900)]


def pod(name: str) -> str:
    """A pause container with a memory-backed volume: a sandbox netns, a veth, tmpfs mounts."""
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {
                "terminationGracePeriodSeconds": 1,
                "containers": [
                    {
                        "name": "pause",
                        "image": "kvfabric/pause:3.2",
                        "imagePullPolicy": "Never",
                        "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
                    }
                ],
                "volumes": [{"name": "scratch", "emptyDir": {"medium": "Memory"}}],
            },
        }
    )


def running(cp: ControlPlane, name: str) -> bool:
    out = cp.kubectl("get", "pod", name, "-o", "jsonpath={.status.phase}", check=False)
    return out.stdout.strip() == "Running"


def test_a_node_removes_what_a_killed_node_left_and_serves(tmp_path: Path) -> None:
    why = node_available()
    if why:
        pytest.skip(why)
    build_images()
    cp = ControlPlane(tmp_path / "cp", for_node=True)
    killed = Node(tmp_path / "killed", cp).claim()
    before = machine_state()
    node: Node | None = None
    try:
        cp.start()
        killed.start()
        cp.kubectl("apply", "-f", "-", input=pod("before-the-kill"))
        wait_until("the first pod running", lambda: running(cp, "before-the-kill"), 300, every=0.5)

        killed.kill()
        left = machine_state()
        # what the reclaim must undo (else this test shows nothing)
        assert set(left["mounts"]) - set(before["mounts"]), "the killed node left no mount"
        assert set(left["links"]) - set(before["links"]) >= {"kvfabric0"}
        assert processes_under(killed.dir), "the killed node's shims should outlive it"

        node = Node(tmp_path / "node", cp).claim()
        assert_machine_unchanged(before, "the reclaim")
        assert not processes_under(killed.dir)

        node.start()
        cp.kubectl("apply", "-f", "-", input=pod("after-the-reclaim"))
        wait_until(
            "a pod running on the node that reclaimed",
            lambda: running(cp, "after-the-reclaim"),
            300,
            every=0.5,
        )
    finally:
        stop_all(node, killed, cp)
    assert_machine_unchanged(before, "the nodes")
