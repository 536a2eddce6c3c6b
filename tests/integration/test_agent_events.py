"""A real agent publishing KV events, read by a subscriber built on vLLM's own event classes:
stored and removed blocks per tier follow saves, evictions, NVMe write-behind and promotion; a
subscriber that joined late fills the gap by replay; a restarted agent clears its topic first.
And the prefix lookup API against the agent's actual hits."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e.agent import AgentProcess, free_port, wait_until
from e2e.kv_events import Subscriber
from kvfabric.connector import protocol as p
from kvfabric.connector.client import AgentClient
from kvfabric.connector.keys import chain_keys, request_seed

pytestmark = pytest.mark.integration
BLOCK_BYTES = 64 * 1024
TOKENS = 16
MODEL = "tiny-model"


def _agent(tmp: Path, nvme: Path, pub: int, replay: int) -> AgentProcess:
    return AgentProcess(
        tmp,
        "16MiB",  # 256 blocks: a few hundred saves evict the first ones
        extra_args=[
            "--arena-size",
            "1MiB",
            "--nvme-path",
            str(nvme),
            "--nvme-size",
            "64MiB",
            "--kv-events-endpoint",
            f"tcp://*:{pub}",
            "--kv-events-replay-endpoint",
            f"tcp://*:{replay}",
            "--node-name",
            "node-a",
        ],
    )


_CLIENTS: list[AgentClient] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _CLIENTS:
        _CLIENTS.pop().close()


def _client(agent: AgentProcess) -> AgentClient:
    client = AgentClient(str(agent.socket_path), "test")
    _CLIENTS.append(client)
    return client


class Engine:
    """What an engine's connector does: register (with its model), annotate, save."""

    def __init__(self, agent: AgentProcess, namespace: str = "ns") -> None:
        self.client = _client(agent)
        assert self.client.connect()
        assert self.client.supports(p.KV_EVENTS_FEATURE) and self.client.supports("routing")
        self.namespace = namespace
        self.client.call(
            p.RegisterNamespace(
                namespace=namespace,
                block_bytes=BLOCK_BYTES,
                block_tokens=TOKENS,
                model=MODEL,
                group=namespace,
            ),
            p.NamespaceReply,
        )

    def annotate(
        self, keys: list[bytes], hashes: list[int], tokens: list[int], parent: int | None = None
    ) -> int:
        reply = self.client.call(
            p.Annotate(
                namespace=self.namespace, keys=keys, hashes=hashes, token_ids=tokens, parent_hash=parent
            ),
            p.AnnotateReply,
        )
        return reply.announced

    def save(self, keys: list[bytes], parent: bytes | None = None) -> None:
        slots = self.client.reserve(self.namespace, keys, parent).slots
        assert -1 not in slots
        assert self.client.commit(self.namespace, keys, [], 0.0).committed == len(keys)

    def fill(self, prompts: int) -> None:
        """Saves what fits of other prompts, unannotated (the pool evicts older blocks for them)."""
        for i in range(prompts):
            keys = chain_keys(_prompt(100 + i, 100), TOKENS, request_seed(["", ""]))
            slots = self.client.reserve(self.namespace, keys, None).slots
            kept = [k for k, slot in zip(keys, slots, strict=True) if slot >= 0]
            self.client.commit(self.namespace, kept, [], 0.0)

    def hits(self, keys: list[bytes]) -> int:
        return self.client.lookup([self.namespace], keys, TOKENS).hits


def _prompt(seed: int, blocks: int) -> list[int]:
    rng = __import__("random").Random(seed)
    return [rng.randrange(1, 30000) for _ in range(blocks * TOKENS)]


def test_events_follow_saves_evictions_the_nvme_tier_and_promotion_and_a_late_subscriber_replays(
    tmp_path: Path,
) -> None:
    pub, replay = free_port(), free_port()
    nvme = tmp_path / "nvme"
    tokens = _prompt(1, 4)
    keys = chain_keys(tokens, TOKENS, request_seed(["", ""]))
    hashes = [1000 + i for i in range(4)]
    with _agent(tmp_path / "a", nvme, pub, replay) as a:
        a.wait_nvme()
        e = Engine(a)
        # annotated before the save (as the scheduler does): announced when committed
        assert e.annotate(keys, hashes, tokens) == 0
        e.save(keys)
        wait_until("written", lambda: a.stats()["nvme_written_blocks"] == 4, timeout=15)
        # the subscriber joins now, and hears of the next block: the batches before it reach it
        # through the replay endpoint (the second subscriber below checks replay alone)
        with Subscriber(f"tcp://127.0.0.1:{pub}", f"tcp://127.0.0.1:{replay}") as s:
            s.poll(0.5)  # connected (PUB drops what is sent before a subscriber is)
            tail_tokens = _prompt(2, 1)
            tail = chain_keys(tokens + tail_tokens, TOKENS, request_seed(["", ""]))[4:]
            e.save(tail, keys[-1])
            # annotated after its commit: announced at once
            assert e.annotate(tail, [2000], tail_tokens, parent=hashes[-1]) == 1
            s.until("the tail, and the saves before it", lambda seen: 2000 in seen.held["CPU"], 10)
            assert s.seen.held["CPU"] == {*hashes, 2000} and s.seen.held["STORAGE"] >= set(hashes)
            assert s.seen.cleared == 1 and s.seen.topics == {f"kv@node-a@{MODEL}"}
            assert [s.seen.tokens[h] for h in hashes] == [
                tokens[i * TOKENS : (i + 1) * TOKENS] for i in range(4)
            ]
            assert [s.seen.parents[h] for h in [*hashes, 2000]] == [None, *hashes]
            keys = [*keys, *tail]
            hashes = [*hashes, 2000]
            wait_until("the tail written", lambda: a.stats()["nvme_written_blocks"] == 5, timeout=15)
            s.until("all on disk", lambda seen: seen.held["STORAGE"] == set(hashes))
            # another engine's unannotated saves fill the pool: ours leave memory, not the disk
            Engine(a, "ns2").fill(6)
            assert e.hits(keys) == 0
            s.until("evicted from memory", lambda seen: not seen.held["CPU"])
            assert s.seen.held["STORAGE"] == set(hashes)
            # promotion from NVMe: in memory again
            e.client.lookup([e.namespace], keys, TOKENS, promote=True)
            wait_until("promoted", lambda: e.hits(keys) == 5, timeout=15)
            s.until("promoted", lambda seen: seen.held["CPU"] == set(hashes))
            held_cpu = set(s.seen.held["CPU"])
            # a second subscriber, from replay alone, ends with the same view
            with Subscriber(f"tcp://127.0.0.1:{pub}", f"tcp://127.0.0.1:{replay}") as late:
                late.replay(0)
                assert (
                    late.seen.held["CPU"] == held_cpu and late.seen.held["STORAGE"] == s.seen.held["STORAGE"]
                )
            stats = a.stats()
            assert stats["kv_events_replays"] >= 1 and stats["kv_events_known_blocks"] == 5
            metrics = a.metrics_text()
            assert "kvfabric_kv_events_known_blocks 5.0" in metrics
            removed = stats["kv_events_removed_events"]
            assert f'kvfabric_kv_events_total{{kind="removed"}} {removed}.0' in metrics
    # restarted: its topic starts with AllBlocksCleared once the model registers again
    with (
        _agent(tmp_path / "b", nvme, pub, replay) as b,
        Subscriber(f"tcp://127.0.0.1:{pub}", f"tcp://127.0.0.1:{replay}") as s2,
    ):
        b.wait_nvme()
        e = Engine(b)
        s2.until("cleared after the restart", lambda seen: seen.cleared == 1, 10)
        assert not any(s2.seen.held.values())
        # The disk kept the blocks but not their router names (they are not persisted): an
        # engine that names them again (its scheduler does on a lookup that promotes them)
        # makes them known in the tier that holds them, and in memory once promoted.
        first4 = keys[:4]
        assert e.client.lookup([e.namespace], first4, TOKENS, promote=True).promoting == 4
        assert e.annotate(first4, hashes[:4], tokens) == 4
        s2.until("known on disk again", lambda seen: seen.held["STORAGE"] >= set(hashes[:4]))
        wait_until("promoted", lambda: e.hits(first4) == 4, timeout=15)
        s2.until("and in memory", lambda seen: seen.held["CPU"] == set(hashes[:4]))


def test_annotations_are_checked_and_are_refused_for_other_tenants_namespaces(tmp_path: Path) -> None:
    pub = free_port()
    with AgentProcess(
        tmp_path,
        "16MiB",
        extra_args=["--arena-size", "1MiB", "--kv-events-endpoint", f"tcp://*:{pub}"],
    ) as a:
        e = Engine(a)
        keys = [b"k" * 16]
        with pytest.raises(Exception, match="token ids per key"):
            e.annotate(keys, [1], [1, 2, 3])  # one block is 16 tokens
        # a long one is handled in slices, checked whole first
        many = [bytes([i % 256, i // 256]) * 8 for i in range(600)]
        with pytest.raises(Exception, match="token ids per key"):
            e.annotate(many, list(range(600)), [0] * (600 * TOKENS - 1))
        assert e.annotate(many, list(range(600)), [0] * (600 * TOKENS)) == 0  # none committed yet
        e.save(many[:100])
        assert e.annotate(many, list(range(600)), [0] * (600 * TOKENS)) == 0  # known already
        assert a.stats()["kv_events_pending_blocks"] == 500
        e2 = Engine(a)
        with pytest.raises(Exception, match="not registered"):
            e2.client.call(
                p.Annotate(
                    namespace="nope", keys=many, hashes=list(range(600)), token_ids=[0] * 600 * TOKENS
                ),
                p.AnnotateReply,
            )
        with pytest.raises(Exception, match="not registered"):
            e2.client.call(
                p.Annotate(namespace="nope", keys=keys, hashes=[1], token_ids=[0] * TOKENS), p.AnnotateReply
            )


def _lookup(agent: AgentProcess, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        agent.url + "/v1/lookup", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_prefix_lookup_api_matches_actual_hits_for_full_partial_and_no_overlap(tmp_path: Path) -> None:
    nvme = tmp_path / "nvme"
    with AgentProcess(
        tmp_path,
        "16MiB",
        extra_args=[
            "--arena-size",
            "1MiB",
            "--nvme-path",
            str(nvme),
            "--nvme-size",
            "64MiB",
            "--node-name",
            "n1",
        ],
    ) as a:
        a.wait_nvme()
        e = Engine.__new__(Engine)
        e.client = _client(a)
        assert e.client.connect()
        e.namespace = "ns"
        e.client.call(
            p.RegisterNamespace(
                namespace="ns", block_bytes=BLOCK_BYTES, block_tokens=TOKENS, model=MODEL, group="ns"
            ),
            p.NamespaceReply,
        )
        salt = "tenant-a"
        full = _prompt(7, 6)
        keys = chain_keys(full, TOKENS, request_seed([salt, ""]))
        e.save(keys[:4])
        partial = full[: 2 * TOKENS] + _prompt(8, 4)
        cases = {"full": full, "partial": partial, "none": _prompt(9, 6)}
        for name, prompt in cases.items():
            status, reply = _lookup(a, {"model": MODEL, "token_ids": prompt, "cache_salt": salt})
            assert status == 200, reply
            (node,) = reply["nodes"]
            actual = e.hits(chain_keys(prompt, TOKENS, request_seed([salt, ""])))
            assert node["tokens"] == node["tiers"]["memory"] == actual * TOKENS, name
            assert node["node"] == "n1" and reply["block_size"] == TOKENS
        assert [
            _lookup(a, {"model": MODEL, "token_ids": p, "cache_salt": salt})[1]["nodes"][0]["tokens"]
            for p in cases.values()
        ] == [64, 32, 0]
        # another salt is another key chain: nothing
        assert _lookup(a, {"model": MODEL, "token_ids": full})[1]["nodes"][0]["tokens"] == 0
        # NVMe: once written and evicted from memory, the tokens are in the nvme tier only
        wait_until("written", lambda: a.stats()["nvme_written_blocks"] == 4, timeout=15)
        other = Engine.__new__(Engine)
        other.client, other.namespace = e.client, "ns2"
        e.client.register_namespace("ns2", BLOCK_BYTES, TOKENS)
        other.fill(6)
        assert e.hits(keys) == 0
        (node,) = _lookup(a, {"model": MODEL, "token_ids": full, "cache_salt": salt})[1]["nodes"]
        assert node["tiers"] == {"memory": 0, "nvme": 64} and node["tokens"] == 64
        # clear errors
        status, reply = _lookup(a, {"model": "other", "token_ids": full})
        assert status == 404 and MODEL in reply["error"]
        assert _lookup(a, {"model": MODEL})[0] == 422  # neither token ids nor text
        status, reply = _lookup(a, {"model": MODEL, "token_ids": full, "scope": "pool"})
        assert status == 400 and "fabric" in reply["error"]
        assert os.path.exists(nvme)


def test_an_agent_connects_to_a_subscriber_that_binds(tmp_path: Path) -> None:
    """llm-d's indexer binds its SUB socket and publishers connect to it (vLLM's rule: an
    endpoint without a wildcard is connected to)."""
    port = free_port()
    with (
        Subscriber(f"tcp://127.0.0.1:{port}", bind=True) as s,
        AgentProcess(
            tmp_path,
            "16MiB",
            extra_args=["--arena-size", "1MiB", "--kv-events-endpoint", f"tcp://127.0.0.1:{port}"],
        ) as a,
    ):
        assert a.stats()["kv_events_endpoint"] == f"tcp://127.0.0.1:{port}"
        # a slow joiner: registrations until the first batch gets through the new connection
        n = 0

        def registered() -> bool:
            nonlocal n
            n += 1
            Engine(a, f"ns{n}").client.call(
                p.RegisterNamespace(
                    namespace=f"m{n}", block_bytes=BLOCK_BYTES, block_tokens=TOKENS, model=f"model-{n}"
                ),
                p.NamespaceReply,
            )
            s.poll(0.3)
            return s.seen.cleared > 0

        wait_until("an event through the agent's connection", registered, timeout=15, every=0)
        assert any(t.startswith("kv@") and "@model-" in t for t in s.seen.topics)
