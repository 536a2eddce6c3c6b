"""Real vLLM engines with an agent whose pool is far smaller than the workload and whose NVMe
tier is not: hits come back from disk, across agent restarts, and a damaged tier changes nothing
but the hit count (a block that fails its checksum is recomputed, never loaded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from e2e.agent import AgentProcess
from e2e.conftest import BLOCK, MAX_TOKENS, PROMPTS
from e2e.engine import EngineProcess
from e2e.test_vllm import fast_retry, start, usable_blocks

pytestmark = pytest.mark.vllm

#: 12 prompts of 7 blocks of 512 KiB (42 MiB) against a pool of 32 slots (16 MiB).
NAMES = [f"D{i}" for i in range(6)] + [f"E{i}" for i in range(6)]


def _agent(tmp: Path, nvme: Path) -> AgentProcess:
    a = AgentProcess(
        tmp, "16MiB", extra_args=["--arena-size", "4MiB", "--nvme-path", str(nvme), "--nvme-size", "256MiB"]
    )
    a.start()
    a.wait_nvme()
    return a


def _damage_every_other_slot(nvme: Path) -> int:
    """Flips bytes in the payload of every other slot of every slab; returns slots damaged."""
    damaged = 0
    for slab in sorted(nvme.glob("*/*.slab")):
        slot_bytes = 4096 + 512 * 1024
        size = slab.stat().st_size
        with open(slab, "r+b") as f:
            for n, offset in enumerate(range(4096, size, slot_bytes)):
                if n % 2 == 0:
                    f.seek(offset + 4096 + 1000)
                    old = f.read(4096)
                    f.seek(offset + 4096 + 1000)
                    f.write(bytes(b ^ 0x5A for b in old))
                    damaged += 1
    return damaged


def test_nvme_tier_serves_hits_beyond_the_pool_across_restarts_and_damage(
    engines: list[EngineProcess], model_dir: Path, tmp_path: Path, baseline: dict[str, list[int]]
) -> None:
    nvme = tmp_path / "nvme"
    agent = _agent(tmp_path / "agent1", nvme)
    try:
        e1 = start(engines, model_dir, tmp_path, fast_retry(agent), "engine1")
        cold = e1.generate([PROMPTS[n] for n in NAMES], MAX_TOKENS)
        assert [o.tokens for o in cold] == [baseline[n] for n in NAMES]
        e1.close()
        agent.wait_nvme_written()
        s = agent.stats()
        assert s["evictions"] > 0 and s["nvme_blocks"] >= sum(usable_blocks(n) for n in NAMES)

        # 1. The pool lost most prompts to eviction; the tier has them all: every prompt is a
        #    whole hit, the early ones read back from disk.
        e2 = start(engines, model_dir, tmp_path, fast_retry(agent), "engine2")
        for n in NAMES:
            (out,) = e2.generate([PROMPTS[n]], MAX_TOKENS)
            assert out.tokens == baseline[n], n
            assert out.cached_tokens == usable_blocks(n) * BLOCK, n
        s = agent.stats()
        assert s["nvme_promoted_blocks"] >= usable_blocks("D0") and s["nvme_damaged_blocks"] == 0
        e2.close()
        assert agent.stop() == 0
    finally:
        agent.cleanup()

    # 2. Agent restarted: the pool is new and empty, the tier is not. The first request hits.
    agent = _agent(tmp_path / "agent2", nvme)
    try:
        assert agent.stats()["nvme_blocks"] >= sum(usable_blocks(n) for n in NAMES)
        e3 = start(engines, model_dir, tmp_path, fast_retry(agent), "engine3")
        (first,) = e3.generate([PROMPTS["D0"]], MAX_TOKENS)
        assert first.cached_tokens == usable_blocks("D0") * BLOCK
        assert first.tokens == baseline["D0"]
        assert agent.stats()["nvme_promoted_blocks"] == usable_blocks("D0")
        e3.close()
        assert agent.stop() == 0
    finally:
        agent.cleanup()

    # 3. The tier's files damaged between restarts: outputs still identical, damage counted.
    damaged = _damage_every_other_slot(nvme)
    assert damaged > 0
    agent = _agent(tmp_path / "agent3", nvme)
    try:
        e4 = start(engines, model_dir, tmp_path, fast_retry(agent), "engine4")
        outs = [e4.generate([PROMPTS[n]], MAX_TOKENS)[0] for n in NAMES]
        assert [o.tokens for o in outs] == [baseline[n] for n in NAMES]
        s = agent.stats()
        assert s["nvme_damaged_blocks"] > 0
        assert s["nvme_damaged_blocks"] + s["nvme_promoted_blocks"] <= s["nvme_blocks"] + damaged
        assert any(o.cached_tokens < usable_blocks(n) * BLOCK for o, n in zip(outs, NAMES, strict=True))
        e4.close()
    finally:
        agent.cleanup()
