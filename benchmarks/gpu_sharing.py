"""N engines on one GPU host sharing one KVFabric agent, against each engine with vLLM's native
CPU offloading, against one PegaFlow server, and against no host tier (issue 16, item 5).

Workload: ``--system`` shared system prompts of ``--system-tokens`` tokens; every request is one
of them plus a unique suffix of ``--suffix-tokens`` tokens, greedy, ``--max-tokens`` tokens.
Each engine runs ``--requests`` requests, one at a time, every engine at once (its own thread
of the benchmark): engine ``e`` starts its walk over the system prompts at ``e * S / N``, so a
prefix one engine computed is soon asked for by the others. Every engine has vLLM's own prefix
cache on and a small GPU KV cache (``--gpu-kv``), which holds a few system prompts only: the
host tier serves the rest. A variant runs two rounds: round 1 on freshly started engines (an
empty tier), then every engine restarts (as after a rollout) and round 2 runs with new
suffixes. Per round: aggregate throughput (requests per second of the round's wall time), TTFT
over all requests, and the prompt tokens vLLM reported as cached.

    python benchmarks/gpu_sharing.py kvfabric|native|pegaflow|none --out DIR [--engines 4]
    python benchmarks/gpu_sharing.py kvfabric --smoke --out DIR   # CPU, tiny model: the plumbing
    python benchmarks/gpu_sharing.py kvfabric --agent-flag=--cuda-dma-loads --out DIR2  # loads too

One variant per run (each fits a device call); ``DIR/sharing-<variant>.json`` holds the rounds
and the ratios against ``none`` once that has run into the same DIR. The GPU shape is
Llama-3.2-1B (dummy weights, bf16, eager), or its 3B with ``--shape 3b`` (where a prefill costs
more against its load: give it ``--gpu-kv 1024``); each engine takes ``--gpu-share`` of the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.gpu_vllm import close, summary, wait_port  # noqa: E402
from e2e import tiny_model  # noqa: E402
from e2e.agent import AgentProcess  # noqa: E402
from e2e.engine import EngineProcess  # noqa: E402

LLAMA_1B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}
#: Llama-3.2-3B's shape: 112 KiB of KV per token against the 1B's 32 KiB, and about three times
#: the prefill work, so a host tier's load has more to save.
LLAMA_3B = {
    **LLAMA_1B,
    "hidden_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 24,
    "head_dim": 128,
}
SHAPES = {"1b": LLAMA_1B, "3b": LLAMA_3B}


class Workload:
    def __init__(self, args: argparse.Namespace) -> None:
        rng = random.Random(7)
        top = args.vocab - 1
        self.system = [[rng.randrange(3, top) for _ in range(args.system_tokens)] for _ in range(args.system)]
        self.args = args

    def requests(self, engine: int, round_: int) -> list[list[int]]:
        a = self.args
        rng = random.Random(1000 * round_ + engine)
        start = engine * a.system // a.engines
        return [
            self.system[(start + i) % a.system]
            + [rng.randrange(3, a.vocab - 1) for _ in range(a.suffix_tokens)]
            for i in range(a.requests)
        ]


def _model(out: Path, smoke: bool, shape: str) -> Path:
    if smoke:
        return tiny_model.build(out / "tiny")
    d = out / f"llama-3.2-{shape}-shape"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(SHAPES[shape]))
    (d / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    return d


def _llm_args(args: argparse.Namespace, extra: dict[str, Any]) -> dict[str, Any]:
    if args.smoke:
        return {"enable_prefix_caching": True, "max_model_len": 512, **extra}
    return {
        "dtype": "bfloat16",
        "load_format": "dummy",
        "enforce_eager": True,
        "max_model_len": 8192,
        "skip_tokenizer_init": True,
        "enable_prefix_caching": True,
        "gpu_memory_utilization": args.gpu_share,
        **extra,
    }


def _start(
    args: argparse.Namespace, model: Path, work: Path, name: str, **kw: Any
) -> tuple[list[EngineProcess], float]:
    """The variant's N engines, started at once (each gets its KV cache as a fixed byte count,
    so vLLM skips the free-memory profiling that concurrent starts would disturb)."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "PYTHONHASHSEED": "0"} if not args.smoke else {}

    def one(i: int) -> EngineProcess:
        return EngineProcess(
            model,
            work / f"{name}-{i}",
            kw.get("connector"),
            log_name=f"{name}-{i}",
            kv_cache_bytes=args.gpu_kv << 20,
            llm_args=_llm_args(args, kw.get("llm", {})),
            env=env,
            transfer=kw.get("transfer"),
        )

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.engines) as pool:
        futures = [pool.submit(one, i) for i in range(args.engines)]
    engines = [f.result() for f in futures if f.exception() is None]
    failed = [f.exception() for f in futures if f.exception() is not None]
    if failed:  # the ones that did start must not outlive the benchmark
        for e in engines:
            close(e)
        raise failed[0]  # type: ignore[misc]
    return engines, time.perf_counter() - t0


def _round(engines: list[EngineProcess], load: Workload, round_: int, max_tokens: int) -> dict[str, Any]:
    """Every engine runs its requests at once; the round ends with the slowest engine."""
    results: dict[int, list[Any]] = {}
    errors: list[BaseException] = []

    def run(i: int, e: EngineProcess) -> None:
        try:
            results[i] = e.generate(load.requests(i, round_), max_tokens)
        except BaseException as exc:  # reported below: a thread's exception would be lost
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, e)) for i, e in enumerate(engines)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    outs = [o for i in sorted(results) for o in results[i]]
    return {
        "requests": len(outs),
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(outs) / wall, 2),
        "ttft": summary([o.seconds for o in outs]),
        "cached_prompt_tokens": sum(o.cached_tokens for o in outs),
        "prompt_tokens": sum(len(p) for i in range(len(engines)) for p in load.requests(i, round_)),
    }


def _two_rounds(
    args: argparse.Namespace, model: Path, work: Path, load: Workload, name: str, **kw: Any
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    engines, started = _start(args, model, work, name, **kw)
    out["start_s"] = round(started, 1)
    try:
        out["round1"] = _round(engines, load, 1, args.max_tokens)
        print(f"[{name}] round 1: {out['round1']}", flush=True)
        if kw.get("settle"):
            kw["settle"]()
    finally:
        for e in engines:
            close(e)
    engines, started = _start(args, model, work, f"{name}-restart", **kw)
    out["restart_s"] = round(started, 1)
    try:
        out["round2"] = _round(engines, load, 2, args.max_tokens)
        print(f"[{name}] round 2 (after restarting every engine): {out['round2']}", flush=True)
    finally:
        for e in engines:
            close(e)
    return out


def variant_kvfabric(args: argparse.Namespace, model: Path, work: Path, load: Workload) -> dict[str, Any]:
    extra = ([] if args.smoke else ["--cuda"]) + args.agent_flag
    with AgentProcess(work / "agent", args.pool, extra_args=extra) as agent:
        cfg = {"socket_path": str(agent.socket_path), "timeout_ms": 10_000}

        def settle() -> None:  # the round's background saves end before the engines go
            deadline = time.monotonic() + 60
            last = -1
            while time.monotonic() < deadline:
                now = int(agent.stats()["committed_blocks"])
                if now == last:
                    return
                last = now
                time.sleep(0.5)

        out = _two_rounds(args, model, work, load, "kvfabric", connector=cfg, settle=settle)
        stats = agent.stats()
        out["agent"] = {
            k: stats[k] for k in ("loaded_blocks", "committed_blocks", "hit_blocks", "miss_blocks")
        }
        out["agent_prefetched_blocks"] = agent.metric('kvfabric_gpu_prefetched_blocks_total{result="queued"}')
    return out


def variant_native(args: argparse.Namespace, model: Path, work: Path, load: Workload) -> dict[str, Any]:
    native = {"kv_offloading_size": args.native_gib, "kv_offloading_backend": "native"}
    return _two_rounds(args, model, work, load, "native", llm=native)


def variant_pegaflow(args: argparse.Namespace, model: Path, work: Path, load: Workload) -> dict[str, Any]:
    log = open(work / "pegaflow-server.log", "ab")
    cmd = [sys.executable, "-m", "pegaflow._server", "--addr", "127.0.0.1:50055", "--devices", "0"]
    server = subprocess.Popen(
        [*cmd, "--pool-size", args.pega_pool],
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    try:
        wait_port("127.0.0.1", 50055, 600)
        transfer = {
            "kv_connector": "PegaKVConnector",
            "kv_connector_module_path": "pegaflow.connector",
            "kv_role": "kv_both",
        }
        # PegaFlow saves asynchronously and exposes no completion to wait on
        return _two_rounds(
            args, model, work, load, "pegaflow", transfer=transfer, settle=lambda: time.sleep(2)
        )
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)
        log.close()


VARIANTS = {
    "kvfabric": variant_kvfabric,
    "native": variant_native,
    "pegaflow": variant_pegaflow,
    "none": lambda args, model, work, load: _two_rounds(args, model, work, load, "none"),
}


def ratios(out: Path, variant: str, result: dict[str, Any]) -> dict[str, float]:
    """This variant's throughput and mean TTFT per round against ``none`` (same DIR)."""
    base_path = out / "sharing-none.json"
    if variant == "none" or not base_path.exists():
        return {}
    base = json.loads(base_path.read_text())
    r: dict[str, float] = {}
    for rnd in ("round1", "round2"):
        r[f"{rnd} throughput vs none"] = round(result[rnd]["requests_per_s"] / base[rnd]["requests_per_s"], 3)
        r[f"{rnd} mean TTFT vs none"] = round(
            result[rnd]["ttft"]["mean_ms"] / base[rnd]["ttft"]["mean_ms"], 3
        )
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variant", choices=sorted(VARIANTS))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="CPU engines, the tiny model, a small workload")
    ap.add_argument("--engines", type=int, default=4)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b", help="Llama-3.2 shape (dummy weights)")
    ap.add_argument("--system", type=int, default=16, help="shared system prompts")
    ap.add_argument("--system-tokens", type=int, default=3000)
    ap.add_argument("--suffix-tokens", type=int, default=200)
    ap.add_argument("--requests", type=int, default=24, help="requests per engine per round")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--gpu-kv", type=int, default=512, help="MiB of GPU KV cache per engine")
    ap.add_argument("--gpu-share", type=float, default=0.2, help="gpu_memory_utilization per engine")
    ap.add_argument("--pool", default="32GiB", help="the shared KVFabric agent's pool")
    ap.add_argument(
        "--agent-flag",
        action="append",
        default=[],
        help="an extra flag for the KVFabric agent (repeatable), e.g. --agent-flag=--cuda-dma-loads",
    )
    ap.add_argument("--native-gib", type=int, default=8, help="vLLM native offloading, per engine")
    ap.add_argument("--pega-pool", default="32gb", help="the shared PegaFlow server's pool")
    args = ap.parse_args()
    if args.smoke:  # what two CPU engines of the tiny model get through in a minute or two
        args.engines, args.system, args.system_tokens, args.suffix_tokens = 2, 4, 256, 32
        args.requests, args.max_tokens, args.gpu_kv, args.pool = 6, 2, 4, "256MiB"
        if args.variant not in ("kvfabric", "none"):
            ap.error("--smoke runs kvfabric and none only (the peers need a GPU)")
    args.vocab = tiny_model.CONFIG["vocab_size"] if args.smoke else SHAPES[args.shape]["vocab_size"]
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    work = args.out / f"work-{args.variant}"
    work.mkdir(parents=True, exist_ok=True)
    model = _model(args.out, args.smoke, args.shape)
    load = Workload(args)
    result = VARIANTS[args.variant](args, model, work, load)
    result["settings"] = {k: v for k, v in vars(args).items() if k != "out"}
    result["ratios"] = ratios(args.out, args.variant, result)
    (args.out / f"sharing-{args.variant}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("round1", "round2", "ratios")}, indent=1))
    mean = statistics.fmean([result["round1"]["ttft"]["mean_ms"], result["round2"]["ttft"]["mean_ms"]])
    print(f"{args.variant}: mean TTFT over both rounds {mean:.1f} ms")


if __name__ == "__main__":
    main()
