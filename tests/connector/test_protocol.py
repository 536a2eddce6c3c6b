import msgspec
import pytest

from kvfabric.connector import protocol as p


def _body(frame: bytes) -> bytes:
    (n,) = p.HEADER.unpack(frame[:4])
    assert n == len(frame) - 4
    return frame[4:]


def test_requests_round_trip() -> None:
    for req in [
        p.Hello(protocol_version=1, client="x"),
        p.RegisterNamespace(namespace="n", block_bytes=4096, block_tokens=16),
        p.OpenPool(writable=False),
        p.Lookup(namespaces=["n"], keys=[b"k" * 16], block_tokens=16, lease_id="l"),
        p.Reserve(namespace="n", keys=[b"a" * 16], parent=None),
        p.Commit(namespace="n", keys=[b"a" * 16], abort=[], copy_seconds=0.1),
        p.Release(lease_ids=["l#0"], loaded_blocks=1),
        p.Stats(),
        p.GpuPrefetch(loads=[p.PrefetchLoad(token=b"t" * 16, block_ids=[3, 4], slots=[9, 1])], event_set=1),
    ]:
        assert p.request_decoder.decode(_body(p.encode(req))) == req


def test_replies_round_trip() -> None:
    for rep in [
        p.LookupReply(hits=2, pool_id="x", slots=[[1, 2]]),
        p.ReleaseReply(held=[True, False]),
        p.GpuPrefetchReply(queued=[True, False]),
        p.ErrorReply(code="bad_frame", message="m"),
    ]:
        assert p.reply_decoder.decode(_body(p.encode(rep))) == rep


@pytest.mark.parametrize(
    "raw",
    [
        {"op": "nope"},
        {"op": "lookup", "namespaces": [], "keys": [], "block_tokens": 16},
        {"op": "lookup", "namespaces": ["n"], "keys": [b""], "block_tokens": 16},
        {"op": "reserve", "namespace": "n", "keys": [b"x" * 65]},
        {"op": "register_namespace", "namespace": "n", "block_bytes": 0, "block_tokens": 1},
        {"op": "stats", "surprise": 1},
        {"op": "release", "lease_ids": ["a"], "loaded_blocks": -1},
        # a guessable token, an event set that cannot exist, an unknown field in a load
        {"op": "gpu_prefetch", "loads": [{"token": b"t", "block_ids": [1], "slots": [1]}]},
        {"op": "gpu_prefetch", "loads": [], "event_set": p.EVENT_SETS},
        {"op": "gpu_prefetch", "loads": [{"token": b"t" * 16, "block_ids": [], "slots": [], "kv_id": 1}]},
        {"op": "gpu_copy", "kv_id": 1, "to_pool": False, "block_ids": [], "slots": [], "event_set": -1},
    ],
)
def test_invalid_requests_are_rejected(raw: dict[str, object]) -> None:
    with pytest.raises(msgspec.ValidationError):
        p.request_decoder.decode(msgspec.msgpack.encode(raw))


class _OldRegisterGpuKV(msgspec.Struct, tag_field="op", tag="register_gpu_kv", forbid_unknown_fields=True):
    """RegisterGpuKV as an agent older than layered loads declares it."""

    namespace: str
    device_uuid: str
    layout: str
    num_blocks: int
    plane_bytes: int
    handles: list[bytes]
    offsets: list[int]
    byte_order: str = ""


def _registration(events: list[bytes]) -> p.RegisterGpuKV:
    return p.RegisterGpuKV(
        namespace="n",
        device_uuid="GPU-1",
        layout="kv_planes",
        num_blocks=4,
        plane_bytes=64,
        handles=[b"h" * 64],
        offsets=[0],
        layer_events=events,
    )


def test_an_older_agent_accepts_a_request_that_uses_nothing_new() -> None:
    old = msgspec.msgpack.Decoder(_OldRegisterGpuKV)
    assert old.decode(_body(p.encode(_registration([])))).handles == [b"h" * 64]
    with pytest.raises(msgspec.ValidationError, match="layer_events"):
        old.decode(_body(p.encode(_registration([b"e" * 64]))))
    # the layered flag likewise travels only when set
    assert "layered" not in msgspec.msgpack.decode(_body(p.encode(p.GpuCopy(1, False, [1], [2]))))


def test_features_of_an_older_agent_decode_as_none() -> None:
    old_hello = {
        "kind": "hello",
        "session_id": 1,
        "agent_id": "a",
        "pool_id": "p",
        "pool_path": "/dev/shm/x",
        "pool_bytes": 1,
        "protocol_version": 1,
    }
    assert p.reply_decoder.decode(msgspec.msgpack.encode(old_hello)).features == []
    features = ["layered_loads", "from_the_future"]
    newer = {**old_hello, "features": features, "surprise": 1}
    assert p.reply_decoder.decode(msgspec.msgpack.encode(newer)).features == features
