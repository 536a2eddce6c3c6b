"""Real vLLM engines (CPU, float32, greedy) against a real agent, each engine its own process.

Every identity check has a control that shows it can fail: loading poisoned KV changes the
output, so equal outputs with hits really mean the right KV was loaded.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from e2e.agent import AgentProcess
from e2e.conftest import BLOCK, MAX_TOKENS, PROMPTS
from e2e.engine import EngineProcess

pytestmark = pytest.mark.vllm


def full_blocks(name: str) -> int:
    return len(PROMPTS[name]) // BLOCK


def usable_blocks(name: str) -> int:
    """Blocks a hit can cover: vLLM always computes at least the last prompt token."""
    return (len(PROMPTS[name]) - 1) // BLOCK


def fast_retry(agent: AgentProcess) -> dict[str, Any]:
    return {"socket_path": str(agent.socket_path), "backoff_initial_ms": 50, "backoff_max_ms": 200}


def start(
    engines: list[EngineProcess],
    model_dir: Path,
    tmp: Path,
    cfg: dict[str, Any] | None,
    name: str,
    **kw: Any,
) -> EngineProcess:
    e = EngineProcess(model_dir, tmp, cfg, log_name=name, **kw)
    engines.append(e)
    return e


def poison_pool(agent: AgentProcess) -> None:
    """Overwrites every byte the pool has handed out with noise."""
    used = agent.stats()["pool_used_bytes"]
    arena = 64 << 20
    with open(agent.pool_path, "r+b") as f:
        for offset in range(0, max(used, arena), 1 << 20):
            f.seek(offset)
            f.write(os.urandom(1 << 20))


@pytest.fixture
def agent(tmp_path: Path) -> Any:
    with AgentProcess(tmp_path / "agent", "1GiB") as a:
        yield a


def test_restart_reuses_prefix_and_output_is_identical(
    agent: AgentProcess,
    engines: list[EngineProcess],
    model_dir: Path,
    tmp_path: Path,
    baseline: dict[str, list[int]],
) -> None:
    cfg = fast_retry(agent)
    e1 = start(engines, model_dir, tmp_path, cfg, "engine1")
    (cold,) = e1.generate([PROMPTS["P"]], MAX_TOKENS)
    assert cold.cached_tokens == 0 and cold.tokens == baseline["P"]
    e1.close()
    assert agent.stats()["committed_blocks"] == full_blocks("P")

    e2 = start(engines, model_dir, tmp_path, cfg, "engine2")
    (warm,) = e2.generate([PROMPTS["P"]], MAX_TOKENS)
    stats = agent.stats()
    assert warm.cached_tokens >= 0.9 * full_blocks("P") * BLOCK
    assert stats["loaded_blocks"] >= 0.9 * full_blocks("P")
    assert stats["hit_blocks"] == usable_blocks("P")
    assert warm.tokens == baseline["P"]
    e2.close()

    # Control: the same hits served from a poisoned pool must change the output.
    poison_pool(agent)
    e3 = start(engines, model_dir, tmp_path, cfg, "engine3")
    (poisoned,) = e3.generate([PROMPTS["P"]], MAX_TOKENS)
    assert poisoned.cached_tokens == warm.cached_tokens
    assert poisoned.tokens != baseline["P"]


def test_two_live_engines_share_one_pool(
    agent: AgentProcess,
    engines: list[EngineProcess],
    model_dir: Path,
    tmp_path: Path,
    baseline: dict[str, list[int]],
) -> None:
    cfg = fast_retry(agent)
    a = start(engines, model_dir, tmp_path, cfg, "engineA")
    b = start(engines, model_dir, tmp_path, cfg, "engineB")
    assert agent.stats()["sessions"] == 4  # scheduler + worker of each engine
    (qa,) = a.generate([PROMPTS["Q"]], MAX_TOKENS)
    (qb,) = b.generate([PROMPTS["Q"]], MAX_TOKENS)
    assert qa.cached_tokens == 0
    assert qb.cached_tokens == usable_blocks("Q") * BLOCK
    assert qa.tokens == qb.tokens == baseline["Q"]
    # and the other way round
    (pb,) = b.generate([PROMPTS["P"]], MAX_TOKENS)
    (pa,) = a.generate([PROMPTS["P"]], MAX_TOKENS)
    assert pb.cached_tokens == 0 and pa.cached_tokens == usable_blocks("P") * BLOCK
    assert pa.tokens == pb.tokens == baseline["P"]


def test_partial_prefix_reuses_exactly_the_shared_full_blocks(
    agent: AgentProcess,
    engines: list[EngineProcess],
    model_dir: Path,
    tmp_path: Path,
    baseline: dict[str, list[int]],
) -> None:
    e = start(engines, model_dir, tmp_path, fast_retry(agent), "engine")
    r1, r2 = e.generate([PROMPTS["R1"], PROMPTS["R2"]], MAX_TOKENS)
    assert r1.cached_tokens == 0
    # R1 and R2 share 5 full blocks and 37 tokens of a sixth: exactly 5 blocks are reused.
    assert r2.cached_tokens == 5 * BLOCK
    assert r1.tokens == baseline["R1"] and r2.tokens == baseline["R2"]
    assert agent.stats()["loaded_blocks"] == 5


def _serve_until_hit(e: EngineProcess, name: str, tries: int = 40) -> int:
    """Serves ``name`` until it is a hit (the connector reconnects with backoff); bounded."""
    for _ in range(tries):
        (out,) = e.generate([PROMPTS[name]], 1)
        if out.cached_tokens:
            return out.cached_tokens
        time.sleep(0.1)
    return 0


def test_agent_faults_fall_back_to_recompute_and_hits_resume(
    engines: list[EngineProcess],
    model_dir: Path,
    tmp_path: Path,
    baseline: dict[str, list[int]],
) -> None:
    agent = AgentProcess(tmp_path / "agent", "1GiB")  # not started yet
    e = start(engines, model_dir, tmp_path, fast_retry(agent), "engine")
    try:
        # 1. no agent at all: serves, no hits
        outs = e.generate([PROMPTS["D0"], PROMPTS["D0"]], MAX_TOKENS)
        assert [o.tokens for o in outs] == [baseline["D0"]] * 2
        assert all(o.cached_tokens == 0 for o in outs)

        # 2. the agent appears: the same engine starts saving and hitting
        agent.start()
        assert _serve_until_hit(e, "D1") == usable_blocks("D1") * BLOCK

        # 3. agent paused (slow, not dead): requests still succeed, within the call deadline
        for name in ("D2", "D3"):
            e.generate([PROMPTS[name]], MAX_TOKENS)  # saved while the agent is healthy
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGSTOP)
        try:
            (slow,) = e.generate([PROMPTS["D2"]], MAX_TOKENS)
        finally:
            agent.proc.send_signal(signal.SIGCONT)
        assert slow.tokens == baseline["D2"]

        # 4. agent killed in the middle of a batch with hits: every request succeeds unchanged
        killer = threading.Timer(0.3, agent.kill)
        killer.start()
        names = ["D3", "D1", "D2", "D3", "D1", "D2"]
        outs = e.generate([PROMPTS[n] for n in names], MAX_TOKENS)
        killer.join()
        assert [o.tokens for o in outs] == [baseline[n] for n in names]
        assert agent.proc is not None and agent.proc.poll() is not None

        # 5. agent restarted: hits resume without restarting the engine
        agent.start()
        (fresh,) = e.generate([PROMPTS["D4"]], MAX_TOKENS)
        assert fresh.tokens == baseline["D4"]
        assert _serve_until_hit(e, "D4") == usable_blocks("D4") * BLOCK
        (again,) = e.generate([PROMPTS["D4"]], MAX_TOKENS)
        assert again.tokens == baseline["D4"]
    finally:
        agent.cleanup()


def test_pool_pressure_evicts_without_errors(
    engines: list[EngineProcess],
    model_dir: Path,
    tmp_path: Path,
    baseline: dict[str, list[int]],
) -> None:
    # 32 slots of 512 KiB; six 7-block prompts need 42.
    with AgentProcess(tmp_path / "agent", "16MiB", extra_args=["--arena-size", "4MiB"]) as agent:
        names = [f"E{i}" for i in range(6)]
        cfg = fast_retry(agent)
        e1 = start(engines, model_dir, tmp_path, cfg, "engine1")
        first = e1.generate([PROMPTS[n] for n in names], MAX_TOKENS)
        e1.close()
        stats = agent.stats()
        assert stats["evictions"] > 0
        assert stats["pool_used_bytes"] <= stats["pool_bytes"]
        e2 = start(engines, model_dir, tmp_path, cfg, "engine2")
        second = e2.generate([PROMPTS[n] for n in reversed(names)], MAX_TOKENS)
        assert [o.tokens for o in first] == [baseline[n] for n in names]
        assert [o.tokens for o in second] == [baseline[n] for n in reversed(names)]
        hits = [o.cached_tokens for o in second]
        assert hits[0] > 0  # the most recent prompt survived
        metrics = agent.metrics_text()
        for kind in ("internal", "bad_request", "namespace", "bad_frame"):
            assert f'kvfabric_errors_total{{kind="{kind}"}} 0.0' in metrics


def test_background_saves_free_blocks_after_saving_and_keep_outputs_identical(
    agent: AgentProcess,
    engines: list[EngineProcess],
    model_dir: Path,
    tmp_path: Path,
    baseline: dict[str, list[int]],
) -> None:
    """Saves after the step (the GPU default), here on the CPU: vLLM keeps each request's blocks
    until the worker reports its saves done. The KV cache holds 66 blocks and the engine serves
    twelve new 8-block prompts one after another, so blocks never given back would stall it
    at the ninth."""
    names = [f"E{i}" for i in range(6)] + [f"D{i}" for i in range(6)]
    cfg = {**fast_retry(agent), "background_saves": True}
    e1 = start(engines, model_dir, tmp_path, cfg, "engine1", kv_cache_bytes=33 << 20)
    first = e1.generate([PROMPTS[n] for n in names], MAX_TOKENS)
    assert [o.tokens for o in first] == [baseline[n] for n in names]
    e1.close()  # shutdown waits for the saves still queued
    assert agent.stats()["committed_blocks"] == sum(full_blocks(n) for n in names)
    assert "still running" not in e1.tail()

    e2 = start(engines, model_dir, tmp_path, cfg, "engine2")
    second = e2.generate([PROMPTS[n] for n in names], MAX_TOKENS)
    assert [o.tokens for o in second] == [baseline[n] for n in names]
    assert [o.cached_tokens for o in second] == [usable_blocks(n) * BLOCK for n in names]


def test_generated_blocks_are_saved_for_the_next_turn(
    agent: AgentProcess, engines: list[EngineProcess], model_dir: Path, tmp_path: Path
) -> None:
    """The next turn of a conversation repeats the answer in its prompt: blocks that generated
    tokens filled must be in the pool too, and loading them must not change the output."""
    cfg = fast_retry(agent)
    prompt = PROMPTS["Q"]  # 1,700 tokens: 13 full blocks
    e1 = start(engines, model_dir, tmp_path, cfg, "engine1")
    (answer,) = e1.generate([prompt], 300)  # KV of 1,999 tokens: 15 full blocks
    e1.close()
    assert agent.stats()["committed_blocks"] == 15

    turn = prompt + answer.tokens[:260]  # 1,960 tokens: a hit may cover 15 blocks
    e2 = start(engines, model_dir, tmp_path, cfg, "engine2")
    (warm,) = e2.generate([turn], MAX_TOKENS)
    assert warm.cached_tokens == 15 * BLOCK  # prompt-only saves would give 13
    cold_engine = start(engines, model_dir, tmp_path, None, "cold")
    (cold,) = cold_engine.generate([turn], MAX_TOKENS)
    assert cold.cached_tokens == 0 and warm.tokens == cold.tokens


def test_a_checkpoint_replaced_at_its_path_gets_no_hits_and_one_at_two_paths_shares(
    agent: AgentProcess,
    engines: list[EngineProcess],
    model_dir: Path,
    tmp_path: Path,
    baseline: dict[str, list[int]],
) -> None:
    """The KServe case: every model is mounted at one path. Model A fills the pool; A copied to
    another path shares its blocks; then other weights replace A at its path (same config,
    same tokenizer): no hits, and the output equals that model's own without the connector."""
    import shutil

    from e2e import tiny_model

    mount = tmp_path / "mnt" / "model"
    shutil.copytree(model_dir, mount)
    cfg = fast_retry(agent)
    (cold,) = start(engines, mount, tmp_path, cfg, "a-at-mount").generate([PROMPTS["P"]], MAX_TOKENS)
    assert cold.cached_tokens == 0 and cold.tokens == baseline["P"]
    engines[-1].close()

    elsewhere = tmp_path / "other-path"
    shutil.copytree(mount, elsewhere)
    (same,) = start(engines, elsewhere, tmp_path, cfg, "a-elsewhere").generate([PROMPTS["P"]], MAX_TOKENS)
    assert same.cached_tokens == usable_blocks("P") * BLOCK and same.tokens == baseline["P"]
    engines[-1].close()

    tiny_model.build_weights(mount, seed=99)  # a model update, in place
    (b_alone,) = start(engines, mount, tmp_path, None, "b-no-connector").generate([PROMPTS["P"]], MAX_TOKENS)
    engines[-1].close()
    assert b_alone.tokens != baseline["P"]  # the control: the two models really differ
    (b,) = start(engines, mount, tmp_path, cfg, "b-at-mount").generate([PROMPTS["P"]], MAX_TOKENS)
    assert b.cached_tokens == 0, "the new weights loaded the old model's KV"
    assert b.tokens == b_alone.tokens


def test_serving_like_load_keeps_every_output_identical(
    agent: AgentProcess, engines: list[EngineProcess], model_dir: Path, tmp_path: Path
) -> None:
    """18 requests at once with shared prefixes, one an exact multiple of the block size;
    chunked prefill (256-token steps), vLLM's own prefix cache on, a KV cache too small for all
    of them (preemption), two requests aborted mid-run. Cold and warm (a restarted engine) must
    give every finished request the output of the same batch without the connector, and the
    agent's books must balance once every engine is gone."""
    from e2e.conftest import tokens

    prefixes = [tokens(2 * BLOCK + 17, 300 + g) for g in range(6)]
    # Decoding 64 tokens crosses a block boundary: new blocks under a full cache (preemption).
    prompts = [prefixes[i % 6] + tokens(197 + BLOCK * (i % 3), 400 + i) for i in range(17)]
    prompts.append(tokens(5 * BLOCK, 499))  # an exact multiple of the block size
    llm = {"max_num_batched_tokens": 256, "disable_log_stats": False, "max_model_len": 2048}
    kw: dict[str, Any] = {"prefix_caching": True, "kv_cache_bytes": 10 << 20, "llm_args": llm}
    abort = [4, 11]

    def serve(name: str, cfg: dict[str, Any] | None) -> dict[str, Any]:
        e = start(engines, model_dir, tmp_path, cfg, name, **kw)
        result = e.serve(prompts, 64, abort=abort, abort_after=3)
        e.close()
        return result

    base = serve("batch-no-connector", None)
    finished = sorted(base["outputs"])
    assert set(finished) == set(range(len(prompts))) - set(abort)
    cfg = fast_retry(agent)
    cold = serve("batch-cold", cfg)
    warm = serve("batch-warm", cfg)
    for run in (cold, warm):
        assert sorted(run["outputs"]) == finished
        for i in finished:
            assert run["outputs"][i].tokens == base["outputs"][i].tokens, f"request {i}"
    assert base["preemptions"] > 0 or cold["preemptions"] > 0, (base["preemptions"], cold["preemptions"])
    assert sum(warm["outputs"][i].cached_tokens for i in finished) > sum(
        cold["outputs"][i].cached_tokens for i in finished
    )
    stats = agent.stats()
    assert stats["sessions"] == 0 and stats["leases_active"] == 0 and stats["blocks_reserved"] == 0
    assert stats["loaded_blocks"] > 0 and stats["loaded_blocks"] <= stats["hit_blocks"]
    block_bytes = stats["committed_bytes"] // max(1, stats["committed_blocks"])
    assert stats["pool_used_bytes"] == stats["blocks_committed"] * block_bytes


def test_blocks_found_in_vllms_own_prefix_cache_are_saved_when_the_agent_lacks_them(
    agent: AgentProcess,
    engines: list[EngineProcess],
    model_dir: Path,
    tmp_path: Path,
    baseline: dict[str, list[int]],
) -> None:
    """An engine computed a prompt, then its agent restarted (the pool is gone). The engine's
    own prefix cache still has the prompt: when it serves it again, the connector saves those
    blocks from vLLM's copy, so another engine gets hits (before, they were assumed saved)."""
    cfg = fast_retry(agent)
    e1 = start(engines, model_dir, tmp_path, cfg, "holder", prefix_caching=True)
    (first,) = e1.generate([PROMPTS["P"]], MAX_TOKENS)
    assert first.tokens == baseline["P"]
    agent.kill()
    agent.start()  # a new, empty pool
    deadline = time.monotonic() + 30
    again = None
    while time.monotonic() < deadline:  # until the engine's workers have reconnected and saved
        (again,) = e1.generate([PROMPTS["P"]], MAX_TOKENS)
        if agent.stats()["committed_blocks"] >= usable_blocks("P"):
            break
    assert again is not None and again.tokens == baseline["P"]
    assert again.cached_tokens >= usable_blocks("P") * BLOCK  # vLLM's own cache served it
    assert agent.stats()["committed_blocks"] >= usable_blocks("P")
    e1.close()
    e2 = start(engines, model_dir, tmp_path, cfg, "newcomer")
    (warm,) = e2.generate([PROMPTS["P"]], MAX_TOKENS)
    assert warm.cached_tokens == usable_blocks("P") * BLOCK and warm.tokens == baseline["P"]
