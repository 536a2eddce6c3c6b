from __future__ import annotations

import gc
import random
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from e2e import tiny_model  # noqa: E402
from e2e.engine import EngineProcess  # noqa: E402

BLOCK = 128  # vLLM's CPU block size


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, tiny_model.CONFIG["vocab_size"]) for _ in range(n)]


SHARED = tokens(5 * BLOCK + 37, 50)  # 5 full blocks plus part of a sixth
PROMPTS: dict[str, list[int]] = {
    "P": tokens(1600, 1),
    "Q": tokens(1700, 2),
    "R1": SHARED + tokens(600, 51),
    "R2": SHARED + tokens(600, 52),
    **{f"D{i}": tokens(900, 60 + i) for i in range(6)},
    **{f"E{i}": tokens(1000, 70 + i) for i in range(6)},
}
MAX_TOKENS = 16


@pytest.fixture(scope="session", autouse=True)
def _collect_third_party_sockets() -> Iterator[None]:
    """kopf (aiohttp) and the kubernetes client leave sockets for the garbage collector. Collect
    them here, with ResourceWarning ignored, rather than at pytest's exit where "warnings are
    errors" turns each into a failure of the whole run. Our own code closes what it opens (the
    agent, connector and harness tests run with ResourceWarning as an error)."""
    yield
    collect_leftover_sockets()


def collect_leftover_sockets() -> None:
    """Garbage-collects with ResourceWarning ignored (third-party sockets; see above)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        for _ in range(3):
            gc.collect()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model.build(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="session")
def baseline(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[int]]:
    """Greedy outputs of every prompt from an engine without any connector or prefix cache."""
    with EngineProcess(model_dir, tmp_path_factory.mktemp("baseline"), None, log_name="baseline") as e:
        outs = e.generate(list(PROMPTS.values()), MAX_TOKENS)
    return {name: o.tokens for name, o in zip(PROMPTS, outs, strict=True)}


@pytest.fixture
def engines(tmp_path: Path, model_dir: Path) -> Iterator[list[EngineProcess]]:
    """Engines started by a test; all are closed (and their logs kept) when it ends."""
    started: list[EngineProcess] = []
    yield started
    for e in started:
        e.close()
