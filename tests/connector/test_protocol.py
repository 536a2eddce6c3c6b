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
        p.RegisterNamespace(namespace="n", block_bytes=10, block_tokens=16),
        p.Lookup(namespaces=["n"], keys=[b"k" * 16], block_tokens=16, lease_id="l"),
        p.Reserve(namespace="n", keys=[b"a" * 16], parent=None),
        p.Commit(namespace="n", keys=[b"a" * 16], abort=[], copy_seconds=0.1),
        p.Release(lease_ids=["l#0"], loaded_blocks=1),
        p.Stats(),
    ]:
        assert p.request_decoder.decode(_body(p.encode(req))) == req


def test_replies_round_trip() -> None:
    for rep in [
        p.LookupReply(hits=2, pool_id="x", slots=[[1, 2]]),
        p.ReleaseReply(held=[True, False]),
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
    ],
)
def test_invalid_requests_are_rejected(raw: dict[str, object]) -> None:
    with pytest.raises(msgspec.ValidationError):
        p.request_decoder.decode(msgspec.msgpack.encode(raw))
