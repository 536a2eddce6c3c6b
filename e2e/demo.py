"""``make demo``: an agent, a tiny model served cold, the engine restarted, the same prompt warm.

Prints cold vs warm time-to-first-token and the hit rate, and writes ``demo-out/ttft.png``.
"""

from __future__ import annotations

import random
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from e2e import tiny_model  # noqa: E402
from e2e.agent import AgentProcess  # noqa: E402
from e2e.engine import EngineProcess  # noqa: E402

OUT = REPO / "demo-out"
PROMPT_TOKENS = 4000
REPEATS = 3


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir()
    print("building a tiny random Llama model ...", flush=True)
    model = tiny_model.build(OUT / "model")
    rng = random.Random(7)
    vocab = tiny_model.CONFIG["vocab_size"]
    prompts = [[rng.randrange(3, vocab) for _ in range(PROMPT_TOKENS)] for _ in range(REPEATS)]
    warmup = [rng.randrange(3, vocab) for _ in range(300)]

    with AgentProcess(OUT / "agent", "1GiB") as agent:
        print(f"agent up: pool 1 GiB, socket {agent.socket_path}, metrics {agent.url}/metrics", flush=True)
        cfg = {"socket_path": str(agent.socket_path)}
        print("engine 1: serving prompts cold ...", flush=True)
        with EngineProcess(model, OUT, cfg, log_name="engine1") as e:
            e.generate([warmup], 1)
            cold = e.generate(prompts, 1)
        print("engine 1 exited; engine 2 starting (a restart) ...", flush=True)
        with EngineProcess(model, OUT, cfg, log_name="engine2") as e:
            e.generate([warmup[::-1]], 1)
            warm = e.generate(prompts, 1)
        stats = agent.stats()

    cold_ms = sorted(o.seconds * 1000 for o in cold)[len(cold) // 2]
    warm_ms = sorted(o.seconds * 1000 for o in warm)[len(warm) // 2]
    hit_rate = sum(o.cached_tokens for o in warm) / (PROMPT_TOKENS * REPEATS)
    rows = [
        ("cold TTFT (engine 1), median ms", f"{cold_ms:.1f}"),
        ("warm TTFT after restart (engine 2), median ms", f"{warm_ms:.1f}"),
        ("warm / cold", f"{warm_ms / cold_ms:.3f}x"),
        ("prompt tokens served from the agent", f"{hit_rate:.1%}"),
        ("blocks saved / loaded by the agent", f"{stats['committed_blocks']} / {stats['loaded_blocks']}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\nKVFabric demo: {PROMPT_TOKENS}-token prompts x{REPEATS}, tiny Llama on the CPU (float32)")
    print("-" * (width + 14))
    for k, v in rows:
        print(f"{k:<{width}}  {v:>10}")
    print("-" * (width + 14))
    _chart(cold_ms, warm_ms)


def _chart(cold_ms: float, warm_ms: float) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(["cold", "warm after restart"], [cold_ms, warm_ms], color=["#b0b0b0", "#2a7ab0"])
    ax.set_ylabel("TTFT (ms)")
    ax.set_ylim(0, max(cold_ms, warm_ms) * 1.2)
    ax.set_title(f"KVFabric: {PROMPT_TOKENS}-token prompt, engine restarted")
    for i, v in enumerate([cold_ms, warm_ms]):
        ax.text(i, v, f"{v:.0f} ms", ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(OUT / "ttft.png", dpi=120)
    print(f"chart: {OUT / 'ttft.png'}")


if __name__ == "__main__":
    main()
