"""Real vLLM CPU engines with an agent that publishes KV events and answers prefix lookups:
the agent names blocks exactly as vLLM's own KV events do (same block hashes, same token ids,
compared with the engine's native publisher), and the lookup API's answers equal the hits a new
engine then gets, for prompts with full, partial and no overlap."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from e2e.agent import AgentProcess, free_port
from e2e.conftest import BLOCK, MAX_TOKENS, PROMPTS, tokens
from e2e.engine import EngineProcess
from e2e.kv_events import Subscriber
from e2e.test_vllm import fast_retry, usable_blocks

pytestmark = pytest.mark.vllm


def _lookup(agent: AgentProcess, model: str, prompt: list[int], cache_salt: str = "") -> dict[str, Any]:
    body = json.dumps({"model": model, "token_ids": prompt, "cache_salt": cache_salt}).encode()
    req = urllib.request.Request(
        agent.url + "/v1/lookup", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return dict(json.loads(r.read()))


def _all(held: dict[str, set[Any]]) -> set[Any]:
    return set().union(*held.values())


def test_agent_events_name_blocks_as_vllm_does_and_lookups_predict_hits(
    model_dir: Path, tmp_path: Path, baseline: dict[str, list[int]]
) -> None:
    pub, replay, native = free_port(), free_port(), free_port()
    events = [
        "--kv-events-endpoint",
        f"tcp://*:{pub}",
        "--kv-events-replay-endpoint",
        f"tcp://127.0.0.1:{replay}",
    ]
    model = str(model_dir)  # the served model name vLLM gives it
    with (
        AgentProcess(tmp_path / "agent", "2GiB", extra_args=[*events, "--node-name", "node-1"]) as agent,
        Subscriber(f"tcp://127.0.0.1:{pub}", f"tcp://127.0.0.1:{replay}") as ours,
        Subscriber(f"tcp://127.0.0.1:{native}") as theirs,
    ):
        with EngineProcess(
            model_dir,
            tmp_path,
            fast_retry(agent),
            prefix_caching=True,
            log_name="cold",
            llm_args={
                "kv_events_config": {
                    "enable_kv_cache_events": True,
                    "publisher": "zmq",
                    "endpoint": f"tcp://*:{native}",  # vLLM binds only wildcard endpoints
                }
            },
        ) as cold:
            theirs.poll(0.5)
            ours.poll(0.5)
            (out,) = cold.generate([PROMPTS["P"]], MAX_TOKENS)
            assert out.tokens == baseline["P"]
            (salted,) = cold.generate([PROMPTS["R1"]], MAX_TOKENS, cache_salt="tenant-7")
            assert salted.tokens == baseline["R1"]
            saved = sum(
                (len(PROMPTS[n]) + MAX_TOKENS - 1) // BLOCK for n in ("P", "R1")
            )  # and generated ones
            least = usable_blocks("P") + usable_blocks("R1")
            ours.until("the saves", lambda seen: len(seen.held["CPU"]) >= least, 30)
            theirs.until("vLLM's own", lambda seen: len(_all(seen.held)) >= saved, 30)
        assert ours.seen.topics == {f"kv@node-1@{model}"} and ours.seen.cleared == 1
        mine = ours.seen.held["CPU"]
        assert least <= len(mine) <= saved
        # the same names as vLLM's native publisher: hashes, tokens, chain
        assert mine <= _all(theirs.seen.held)
        for h in mine:
            assert ours.seen.tokens[h] == theirs.seen.tokens[h]
            assert ours.seen.parents[h] == theirs.seen.parents[h]
            assert ours.seen.extra[h] == theirs.seen.extra[h]
        assert sorted(len(t) for t in ours.seen.tokens.values()) == [BLOCK] * len(mine)
        # the salted prompt's first block carries its cache_salt, as vLLM's own event does
        assert sum(ours.seen.extra[h] == ("tenant-7",) for h in mine) == 1

        # lookups predict what a new engine finds
        partial = PROMPTS["P"][: 5 * BLOCK] + tokens(700, 99)
        cases = {"full": PROMPTS["P"], "partial": partial, "none": PROMPTS["Q"]}
        predicted = {name: _lookup(agent, model, prompt)["nodes"][0] for name, prompt in cases.items()}
        salted_lookup = _lookup(agent, model, PROMPTS["R1"], cache_salt="tenant-7")["nodes"][0]
        assert salted_lookup["tokens"] >= usable_blocks("R1") * BLOCK  # under its salt only
        assert _lookup(agent, model, PROMPTS["R1"])["nodes"][0]["tokens"] == 0
        assert predicted["full"]["tokens"] == (len(PROMPTS["P"]) + MAX_TOKENS - 1) // BLOCK * BLOCK
        assert predicted["partial"]["tokens"] == 5 * BLOCK and predicted["none"]["tokens"] == 0
        with EngineProcess(model_dir, tmp_path, fast_retry(agent), log_name="warm") as warm:
            outs = warm.generate(list(cases.values()), MAX_TOKENS)
        for (name, prompt), o, node in zip(cases.items(), outs, predicted.values(), strict=True):
            usable = (len(prompt) - 1) // BLOCK * BLOCK
            assert o.cached_tokens == min(node["tokens"], usable), name
            assert node["tiers"]["memory"] == node["tokens"]
        assert outs[0].tokens == baseline["P"] and outs[2].tokens == baseline["Q"]
