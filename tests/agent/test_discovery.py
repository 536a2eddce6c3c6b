"""Pool membership from EndpointSlices (pure: what a list of slices admits)."""

from kvfabric.agent.discovery import members


def test_members_are_the_ready_endpoints_on_the_fabric_port_of_every_slice() -> None:
    slices = [
        {
            "ports": [{"name": "metrics", "port": 9400}, {"name": "fabric", "port": 7450}],
            "endpoints": [
                {"addresses": ["10.0.0.1"], "conditions": {"ready": True}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": False}},  # not ready: no peer
                {"addresses": ["10.0.0.3"]},  # ready unset means ready (v1beta1 semantics)
            ],
        },
        {"ports": [{"name": "fabric", "port": 7451}], "endpoints": [{"addresses": ["10.0.1.1"]}]},
        {"ports": [{"name": "metrics", "port": 9400}], "endpoints": [{"addresses": ["10.0.2.1"]}]},
        {"ports": None, "endpoints": None},  # a slice with nothing in it yet
    ]
    assert members(slices, "fabric") == {"10.0.0.1:7450", "10.0.0.3:7450", "10.0.1.1:7451"}
    assert members([], "fabric") == frozenset()
