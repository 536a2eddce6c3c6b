"""Real vLLM on a GPU: TTFT and engine start with KVFabric, against baselines run the same way.

Llama-3.1-8B-shaped model (dummy weights), bf16, 10,000-token prompts, ``max_tokens=1``, one
16k-token prefill chunk, GPU KV cache 2.5 GiB, vLLM's default compile and CUDA-graph mode.
Every engine is its own process (vLLM's default multiprocess mode). Phases:

  ours   no connector (cold TTFT, engine start) vs KVFabric with an agent holding a pinned pool:
         engine start, cold TTFT with an empty pool, warm TTFT in the same engine (prefix
         caching off: every hit must come from the agent) and after an engine restart; with
         ``--compare-whole`` also warm TTFT with whole (not layered) loads. The floor: vLLM's
         own TTFT when the prefix is in its GPU cache (no copy at all), and the agent's view of
         each warm request (lookup and copy times, from its /metrics). ``--compare-prefetch``
         also warm TTFT with ``prefetch_loads`` off (loads started by the worker at the step's
         start, not by the scheduler at allocation). Each warm set's timeline (median ms from
         the request's submission to each connector event, ``KVFABRIC_TRACE``) is recorded.
  nvme   KVFabric with an NVMe tier: warm TTFT from the pool, then after an agent restart (pinned
         pool new and empty, tier kept) from the tier, waiting for every block
         (``promote_wait_ms`` 10 s) and with the default wait (500 ms: what is not in the pool by
         then is recomputed); cold TTFT without a connector in the same run.
  cold   where the cold path's cost is: no connector (before and after), KVFabric (the agent
         copying saves with the copy engines only), and as ``--cold-variants`` picks: the agent's
         saves through its staging kernel, saves copied by the engine (``engine_saves``), saves
         off, loads off; fresh prompts for each engine; from each
         KVFabric engine's ``KVFABRIC_TRACE``, how much of a prompt's time the saves' reserve,
         copy and commit took up (``save_overlap_*``).
  peers  vLLM's native CPU offloading (prefix caching on; hits forced out of the GPU cache by
         other prompts) and PegaFlow (``pegaflow-llm-cu13``, prefix caching off), same prompts.

    python benchmarks/gpu_vllm.py ours --out DIR [--pool 64GiB]
    python benchmarks/gpu_vllm.py peers --out DIR
    python benchmarks/gpu_vllm.py nvme --out DIR [--pool 16GiB] [--nvme-dir DIR]

Each phase prints a table and writes ``DIR/<phase>.json``. Start times are measured with empty
compile caches per engine kind (vLLM's, Inductor's under TMPDIR and Triton's, so no kind
profits from another's compilation); restarts reuse their kind's caches, as a restarted pod on
the same node would.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from e2e.agent import AgentProcess, metric_value  # noqa: E402
from e2e.engine import EngineProcess  # noqa: E402

LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}
PROMPT_TOKENS = 10_000
BLOCK = 16
LLM_ARGS: dict[str, Any] = {
    "dtype": "bfloat16",
    "load_format": "dummy",
    "enforce_eager": False,
    "max_model_len": 16384,
    "max_num_batched_tokens": 16384,
    "skip_tokenizer_init": True,
    "enable_prefix_caching": False,
}
KV_CACHE_BYTES = int(2.5 * (1 << 30))
# INFO: the engine logs then say where start-up time went (weights, compile, graphs, KV).
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "PYTHONHASHSEED": "0", "VLLM_LOGGING_LEVEL": "INFO"}


def model_dir(root: Path) -> Path:
    d = root / "llama-3.1-8b-shape"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(LLAMA_8B))
    (d / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    return d


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, 120_000) for _ in range(PROMPT_TOKENS)] for _ in range(n)]


def summary(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)
    return {
        "n": len(ms),
        "mean_ms": round(statistics.fmean(ms), 1),
        "p50_ms": round(statistics.median(ms), 1),
        "p90_ms": round(ms[min(len(ms) - 1, int(0.9 * len(ms)))], 1),
        "min_ms": round(ms[0], 1),
        "max_ms": round(ms[-1], 1),
    }


class Bench:
    def __init__(self, out: Path, n_prompts: int) -> None:
        self.out = out
        self.tmp = out / "work"
        self.model = model_dir(self.tmp)
        self.warmup = prompts(2, seed=1)
        self.timed = prompts(n_prompts, seed=2)
        self.results: dict[str, Any] = {"device": gpu_name(), "date": time.strftime("%Y-%m-%d")}

    def engine(
        self, name: str, cache: str, *, connector: dict[str, Any] | None = None, **kw: Any
    ) -> EngineProcess:
        # Each engine kind its own compile caches: vLLM's, Inductor's (under TMPDIR) and Triton's.
        tmpdir = self.tmp / f"tmp-{cache}"
        tmpdir.mkdir(parents=True, exist_ok=True)
        env = {
            **ENGINE_ENV,
            "VLLM_CACHE_ROOT": str(self.tmp / f"cache-{cache}"),
            "TMPDIR": str(tmpdir),
            "TRITON_CACHE_DIR": str(tmpdir / "triton"),
        }
        env.update(kw.pop("env", {}))
        llm = {**LLM_ARGS, **kw.pop("llm", {})}
        e = EngineProcess(
            self.model,
            self.tmp,
            connector,
            log_name=name,
            kv_cache_bytes=KV_CACHE_BYTES,
            llm_args=llm,
            env=env,
            **kw,
        )
        print(f"[{name}] started in {e.start_seconds:.1f} s", flush=True)
        return e

    def ttft(self, e: EngineProcess, batch: list[list[int]]) -> list[float]:
        return [o.seconds for o in e.generate(batch, max_tokens=1)]

    def record(self, key: str, value: Any) -> None:
        self.results[key] = value
        print(f"{key}: {value}", flush=True)
        (self.out / "partial.json").write_text(json.dumps(self.results, indent=1))


def gpu_name() -> str:
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except OSError:
        return "unknown"


def close(e: EngineProcess) -> None:
    e.close()
    # vLLM's engine-core child can outlive its parent: make sure the GPU is free for the next.
    subprocess.run(["pkill", "-9", "-f", "VLLM::EngineCore"], check=False)
    deadline = time.monotonic() + 30
    while subprocess.run(["pgrep", "-f", "VLLM::EngineCore"], capture_output=True).returncode == 0:
        if time.monotonic() > deadline:
            raise RuntimeError("vLLM's engine core did not exit")
        time.sleep(0.1)


def wait_committed(agent: AgentProcess, blocks: int, timeout: float = 60) -> int:
    """Waits until the agent holds ``blocks`` committed blocks (background saves done)."""
    deadline = time.monotonic() + timeout
    while (committed := int(agent.stats()["committed_blocks"])) < blocks and time.monotonic() < deadline:
        time.sleep(0.05)
    return committed


def agent_times(agent: AgentProcess) -> dict[str, tuple[float, float]]:
    """(sum, count) of the agent's histograms: lookup and gpu_copy handling, load copies."""
    want = {
        'kvfabric_rpc_seconds_{}{{op="lookup"}}': "lookup",
        'kvfabric_rpc_seconds_{}{{op="gpu_copy"}}': "gpu_copy",
        "kvfabric_load_copy_seconds_{}": "load_copy",
    }
    lines = agent.metrics_text().splitlines()  # one scrape for all of them
    return {
        name: (metric_value(lines, pattern.format("sum")), metric_value(lines, pattern.format("count")))
        for pattern, name in want.items()
    }


def trace_path(b: Bench, label: str) -> Path:
    """Where the engine's connector (and the benchmark's front end) write their timestamps."""
    return b.out / f"trace-{label}.jsonl"


def trace_env(b: Bench, label: str) -> dict[str, str]:
    return {"KVFABRIC_TRACE": str(trace_path(b, label))}


def timeline(path: Path, requests: int) -> dict[str, float]:
    """Median ms from each of the last ``requests`` submissions to the first of each event
    after it (``layer_ready@1``: the first layer's copies ended, ``@N``: the last's)."""
    if not path.exists():
        return {}
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    starts = [i for i, ev in enumerate(events) if ev["event"] == "generate"][-requests:]
    offsets: dict[str, list[float]] = {}
    for n, i in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(events)
        seen: set[str] = set()
        for ev in events[i + 1 : end]:
            name = ev["event"] + (f"@{ev['layers']}" if ev["event"] == "layer_ready" else "")
            if name not in seen:
                seen.add(name)
                offsets.setdefault(name, []).append(1000 * (ev["t"] - events[i]["t"]))
    return {k: round(statistics.median(v), 2) for k, v in sorted(offsets.items(), key=lambda kv: min(kv[1]))}


def _intervals(events: list[dict[str, Any]], start: str, end: str) -> list[tuple[float, float]]:
    """``(start, end)`` times of each ``start`` mark paired with the next ``end`` mark."""
    out, opened = [], None
    for ev in events:
        if ev["event"] == start:
            opened = ev["t"]
        elif ev["event"] == end and opened is not None:
            out.append((opened, ev["t"]))
            opened = None
    return out


def save_overlap(path: Path, requests: int) -> dict[str, float]:
    """Where the saves ran against the last ``requests`` prompts (median ms per prompt): how
    much of each prompt's time, from its submission to its output, a save's reserve, copy and
    commit took up (mostly the previous prompt's save), and from the end of a prompt's forward
    pass on the GPU to the start of its save's copy."""
    if not path.exists():
        return {}
    events = sorted(
        (json.loads(line) for line in path.read_text().splitlines() if line.strip()), key=lambda ev: ev["t"]
    )
    prompts = _intervals(events, "generate", "generated")[-requests:]
    phases = {
        "reserve": _intervals(events, "save_reserve", "save_copy"),
        "copy": _intervals(events, "save_copy", "save_copied"),
        "commit": _intervals(events, "save_copied", "save_committed"),
    }

    def overlap(window: tuple[float, float], spans: list[tuple[float, float]]) -> float:
        return sum(max(0.0, min(window[1], b) - max(window[0], a)) for a, b in spans)

    result = {
        f"{name}_during_prompt_ms": round(1000 * statistics.median(overlap(w, spans) for w in prompts), 2)
        for name, spans in phases.items()
        if prompts and spans
    }
    ended = [ev["t"] for ev in events if ev["event"] == "forward_ended"]
    lags = [c0 - max(t for t in ended if t <= c0) for c0, _ in phases["copy"] if any(t <= c0 for t in ended)]
    if lags:
        result["forward_end_to_copy_ms"] = round(1000 * statistics.median(lags), 2)
    if phases["copy"]:
        result["copy_ms"] = round(1000 * statistics.median(b - a for a, b in phases["copy"]), 2)
    return result


def warm(b: Bench, agent: AgentProcess, e: EngineProcess, label: str) -> None:
    """Warm TTFT of the timed prompts, how many of their blocks the agent loaded, and per
    request what the agent saw: its gpu_copy handling (a layered load's reply comes once the
    copies are queued) and the engine's whole copy time as reported at lease release."""
    expected = (PROMPT_TOKENS - 1) // BLOCK * len(b.timed)
    before = agent.stats()["loaded_blocks"]
    ttfts, per_request = [], []
    for prompt in b.timed:
        t0 = agent_times(agent)
        ttfts += b.ttft(e, [prompt])
        t1 = agent_times(agent)
        per_request.append(
            {k: round(1000 * (t1[k][0] - t0[k][0]) / max(1.0, t1[k][1] - t0[k][1]), 2) for k in t1}
            | {"ttft": round(1000 * ttfts[-1], 1)}
        )
    b.record(f"warm_{label}", summary(ttfts))
    b.record(f"loaded_blocks_{label}", f"{agent.stats()['loaded_blocks'] - before} of {expected}")
    b.record(f"per_request_ms_{label}", per_request)
    b.record(f"timeline_ms_{label}", timeline(trace_path(b, label), len(b.timed)))


def phase_ours(
    b: Bench, pool: str, compare_whole: bool, compare_prefetch: bool = False, floor: bool = True
) -> None:
    t0 = time.perf_counter()
    agent = AgentProcess(b.tmp / "agent", pool, extra_args=["--cuda"]).start(timeout=600)
    b.record("agent_ready_s", round(time.perf_counter() - t0, 1))
    try:
        cfg = {"socket_path": str(agent.socket_path), "timeout_ms": 10_000}
        e = b.engine("kvfabric", "kvfabric", connector=cfg, env=trace_env(b, "same_engine"))
        b.record("start_kvfabric_s", round(e.start_seconds, 1))
        b.ttft(e, b.warmup)
        b.record("cold_kvfabric", summary(b.ttft(e, b.timed)))
        saved = (len(b.warmup) + len(b.timed)) * (PROMPT_TOKENS // BLOCK)
        b.record("committed_blocks", f"{wait_committed(agent, saved)} of {saved}")
        warm(b, agent, e, "same_engine")
        close(e)

        e = b.engine("kvfabric-restart", "kvfabric", connector=cfg, env=trace_env(b, "after_restart"))
        b.record("restart_kvfabric_s", round(e.start_seconds, 1))
        b.ttft(e, b.warmup)
        warm(b, agent, e, "after_restart")
        close(e)

        if compare_prefetch:  # the same, with loads started by the worker at the step's start
            off = {**cfg, "prefetch_loads": False}
            e = b.engine("kvfabric-no-prefetch", "kvfabric", connector=off, env=trace_env(b, "no_prefetch"))
            b.ttft(e, b.warmup)
            warm(b, agent, e, "no_prefetch")
            close(e)

        if compare_whole:  # the same, with each load done before the forward pass starts
            e = b.engine("kvfabric-whole", "kvfabric", connector={**cfg, "layered_loads": False})
            b.ttft(e, b.warmup)
            warm(b, agent, e, "whole_loads")
            close(e)
        b.record("agent_stats", {k: v for k, v in agent.stats().items() if isinstance(v, int | float)})
    finally:
        agent.cleanup()

    e = b.engine("none", "none")
    b.record("start_none_s", round(e.start_seconds, 1))
    b.ttft(e, b.warmup)
    b.record("cold_none", summary(b.ttft(e, b.timed)))
    close(e)
    if floor:
        # Restarted with prefix caching on, for the floor: each prompt once cold, then again
        # with its prefix in vLLM's GPU cache (nothing to copy; the same 16 tokens computed).
        e = b.engine("none-restart", "none", llm={"enable_prefix_caching": True})
        b.record("restart_none_s", round(e.start_seconds, 1))
        b.ttft(e, b.warmup)
        hits = []
        for prompt in b.timed:
            b.ttft(e, [prompt])
            hits += b.ttft(e, [prompt])
        b.record("floor_gpu_prefix_hit", summary(hits))
        close(e)

    r = b.results
    restart = {}
    if floor:
        restart["restart_kvfabric/restart_none (warm compile caches)"] = round(
            r["restart_kvfabric_s"] / r["restart_none_s"], 2
        )
    b.record(
        "ratios",
        {
            "cold_kvfabric/cold_none (mean)": round(
                r["cold_kvfabric"]["mean_ms"] / r["cold_none"]["mean_ms"], 3
            ),
            "start_kvfabric/start_none (empty compile caches)": round(
                r["start_kvfabric_s"] / r["start_none_s"], 2
            ),
            **restart,
            "warm_after_restart p90/p50": round(
                r["warm_after_restart"]["p90_ms"] / r["warm_after_restart"]["p50_ms"], 2
            ),
            "warm_same_engine p90/p50": round(
                r["warm_same_engine"]["p90_ms"] / r["warm_same_engine"]["p50_ms"], 2
            ),
        },
    )


#: name: (connector settings, agent flags) of a KVFabric variant the cold phase may add.
COLD_VARIANTS: dict[str, tuple[dict[str, Any], list[str]]] = {
    # the agent's saves through its staging kernel (before DMA-only saves were its default)
    "kvfabric_staged_saves": ({}, ["--no-cuda-dma-saves"]),
    "kvfabric_engine_saves": ({"engine_saves": True}, []),  # the engine copies from its context
    "kvfabric_no_save": ({"save": False}, []),  # lookups only
    "kvfabric_no_load": ({"load": False}, []),  # saves only
}


def phase_cold(b: Bench, pool: str, extra: list[str]) -> None:
    """Where the cold path's cost is: TTFT of prompts no tier holds, without a connector (before
    and after, for drift), with KVFabric and with the ``extra`` variants of it
    (:data:`COLD_VARIANTS`; one with agent flags of its own gets an agent of its own). Each
    engine gets prompts of its own (a pool holding the previous engine's prompts would turn
    them into hits); who copied each engine's saves is counted from the agent's gpu_copy calls
    (the engine's own copies make none)."""
    agents: dict[tuple[str, ...], AgentProcess] = {}

    def agent_with(flags: list[str]) -> AgentProcess:
        if tuple(flags) not in agents:
            where = b.tmp / f"agent-cold-{len(agents)}"
            agents[tuple(flags)] = AgentProcess(where, pool, extra_args=["--cuda", *flags]).start(timeout=600)
        return agents[tuple(flags)]

    variants: list[tuple[str, dict[str, Any] | None, list[str]]] = [
        ("none", None, []),
        ("kvfabric", {}, []),
        *[(name, *COLD_VARIANTS[name]) for name in extra],
        ("none_again", None, []),
    ]
    try:
        agent_with([])
        for i, (label, overrides, flags) in enumerate(variants):
            agent = agent_with(flags) if overrides is not None else None
            connector = None
            if agent is not None:
                connector = {"socket_path": str(agent.socket_path), "timeout_ms": 10_000, **(overrides or {})}
            env = trace_env(b, f"cold-{label}") if connector else {}
            e = b.engine(label, "kvfabric" if connector else "none", connector=connector, env=env)
            b.ttft(e, b.warmup)
            if agent is not None:
                before = agent_times(agent)["gpu_copy"][1], agent.stats()["committed_blocks"]
            b.record(f"cold_{label}", summary(b.ttft(e, prompts(len(b.timed), seed=100 + i))))
            close(e)  # its background saves end first
            if agent is not None:
                calls = agent_times(agent)["gpu_copy"][1] - before[0]
                saved = agent.stats()["committed_blocks"] - before[1]
                b.record(f"saves_{label}", f"{saved} blocks committed, {calls:.0f} agent gpu_copy calls")
                b.record(f"save_overlap_{label}", save_overlap(trace_path(b, f"cold-{label}"), len(b.timed)))
    finally:
        for a in agents.values():
            a.cleanup()
    r = b.results
    base = (r["cold_none"]["mean_ms"] + r["cold_none_again"]["mean_ms"]) / 2
    b.record("ratios_to_none", {k: round(r[f"cold_{k}"]["mean_ms"] / base, 3) for k, *_ in variants})


def phase_nvme(b: Bench, pool: str, nvme_dir: Path) -> None:
    flags = [
        "--cuda",
        "--nvme-path",
        str(nvme_dir),
        "--nvme-size",
        "48GiB",
        "--nvme-read-deadline-ms",
        "10000",
    ]

    def agent(name: str) -> AgentProcess:
        a = AgentProcess(b.tmp / name, pool, extra_args=flags).start(timeout=600)
        a.wait_nvme(timeout=600)
        return a

    a = agent("agent-nvme-1")
    try:
        cfg = {"socket_path": str(a.socket_path), "timeout_ms": 10_000}
        e = b.engine("kvfabric-nvme", "kvfabric", connector=cfg)
        b.ttft(e, b.warmup)
        b.record("cold_kvfabric", summary(b.ttft(e, b.timed)))
        saved = (len(b.warmup) + len(b.timed)) * (PROMPT_TOKENS // BLOCK)
        b.record("committed_blocks", f"{wait_committed(a, saved)} of {saved}")
        t0 = time.perf_counter()
        a.wait_nvme_written(timeout=600)
        b.record("nvme_write_behind_drain_s", round(time.perf_counter() - t0, 1))
        warm(b, a, e, "pool")
        close(e)
    finally:
        a.cleanup()
    for label, wait_ms in (("nvme_full_wait", 10_000), ("nvme_default_wait", 500)):
        a = agent(f"agent-{label}")  # pool lost, tier kept
        try:
            cfg = {"socket_path": str(a.socket_path), "timeout_ms": 10_000, "promote_wait_ms": wait_ms}
            e = b.engine(f"kvfabric-{label}", "kvfabric", connector=cfg)
            b.ttft(e, b.warmup)
            warm(b, a, e, label)
            s = a.stats()
            b.record(
                f"tier_{label}",
                {k: s[k] for k in ("nvme_promoted_blocks", "nvme_damaged_blocks", "nvme_reads_skipped_late")},
            )
            close(e)
        finally:
            a.cleanup()
    e = b.engine("none", "none")
    b.ttft(e, b.warmup)
    b.record("cold_none", summary(b.ttft(e, b.timed)))
    close(e)
    r = b.results
    b.record(
        "ratios",
        {
            f"warm_{k}/cold_none (mean)": round(r[f"warm_{k}"]["mean_ms"] / r["cold_none"]["mean_ms"], 3)
            for k in ("pool", "nvme_full_wait", "nvme_default_wait")
        },
    )


def engine_timings(work: Path, out: Path) -> None:
    """The lines of each engine log that say where start-up time went."""
    keys = (
        "took",
        "seconds",
        "pinned",
        "registered",
        "not reachable",
        "Graph capturing",
        "torch.compile",
        "init engine",
        "KV cache",
        "Error",
        "failed",
    )
    with open(out / "engine-timings.txt", "w") as f:
        for log in sorted([*work.glob("*.log"), *work.glob("agent/*.log")]):
            f.write(f"== {log.name}\n")
            for line in log.read_text(errors="replace").splitlines():
                if any(k in line for k in keys) and "it/s" not in line:
                    f.write(line[-300:] + "\n")


def wait_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{host}:{port} not listening after {timeout}s")


def phase_peers(b: Bench, pega_pool: str) -> None:
    # vLLM's native CPU offloading: prefix caching must be on; 8 GiB holds ~6 prompts, the GPU
    # ~2, so after the timed prompts ran cold, prompts 2..5 come back from host memory.
    native = {"kv_offloading_size": 8, "kv_offloading_backend": "native", "enable_prefix_caching": True}
    e = b.engine("native", "native", llm=native)
    b.record("start_native8_s", round(e.start_seconds, 1))
    b.ttft(e, b.warmup)
    b.record("cold_native", summary(b.ttft(e, b.timed)))
    b.record("warm_native", summary(b.ttft(e, b.timed[2:6])))
    close(e)

    try:
        import pegaflow  # noqa: F401
    except ImportError:
        b.record("pegaflow", "not installed")
        return
    server_log = open(b.tmp / "pegaflow-server.log", "ab")
    t0 = time.perf_counter()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pegaflow._server",
            "--addr",
            "127.0.0.1:50055",
            "--devices",
            "0",
            "--pool-size",
            pega_pool,
            "--http-addr",
            "127.0.0.1:9091",
            "--enable-prometheus",
        ],
        stdout=server_log,
        stderr=server_log,
        start_new_session=True,  # the wrapper execs a binary: signal the whole group
    )
    try:
        wait_port("127.0.0.1", 50055, 600)
        b.record("pegaflow_ready_s", round(time.perf_counter() - t0, 1))
        transfer = {
            "kv_connector": "PegaKVConnector",
            "kv_connector_module_path": "pegaflow.connector",
            "kv_role": "kv_both",
        }
        e = b.engine("pegaflow", "pegaflow", transfer=transfer)
        b.record("start_pegaflow_s", round(e.start_seconds, 1))
        b.ttft(e, b.warmup)
        b.record("cold_pegaflow", summary(b.ttft(e, b.timed)))
        time.sleep(2)  # PegaFlow saves asynchronously and exposes no completion to wait on
        b.record("warm_pegaflow_same_engine", summary(b.ttft(e, b.timed)))
        close(e)
        e = b.engine("pegaflow-restart", "pegaflow", transfer=transfer)
        b.ttft(e, b.warmup)
        b.record("warm_pegaflow_after_restart", summary(b.ttft(e, b.timed)))
        close(e)
        with urllib.request.urlopen("http://127.0.0.1:9091/metrics", timeout=5) as r:
            (b.out / "pegaflow-metrics.txt").write_bytes(r.read())
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        server_log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["ours", "peers", "nvme", "cold"])
    ap.add_argument(
        "--nvme-dir", type=Path, default=None, help="nvme: the tier's directory (default: under --out)"
    )
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--pool", default="64GiB", help="KVFabric agent pool size")
    ap.add_argument("--pega-pool", default="16gb", help="PegaFlow server pool size (its 'gb' is GiB)")
    ap.add_argument("--prompts", type=int, default=8, help="timed prompts per measurement")
    ap.add_argument(
        "--runner",
        choices=["v1", "v2"],
        help="vLLM's model runner (default: vLLM's choice, V2 for dense models in 0.26); only V1 "
        "gives connectors cross-layer blocks",
    )
    ap.add_argument(
        "--compare-prefetch",
        action="store_true",
        help="ours: also a restarted engine with prefetch_loads off (loads started by the worker)",
    )
    ap.add_argument(
        "--no-floor",
        action="store_true",
        help="ours: skip the floor (a restarted engine without connector, prefixes in its GPU cache)",
    )
    ap.add_argument(
        "--compare-whole",
        action="store_true",
        help="ours: also a restarted engine with layered_loads off (whole loads before the forward)",
    )
    ap.add_argument(
        "--cold-variants",
        default="kvfabric_staged_saves",
        help=f"cold: KVFabric variants besides the default, comma-separated, of {', '.join(COLD_VARIANTS)}",
    )
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    if args.runner:
        ENGINE_ENV["VLLM_USE_V2_MODEL_RUNNER"] = "1" if args.runner == "v2" else "0"
    b = Bench(args.out, args.prompts)
    b.results["runner"] = args.runner or "vLLM default"
    try:
        if args.phase == "ours":
            phase_ours(b, args.pool, args.compare_whole, args.compare_prefetch, floor=not args.no_floor)
        elif args.phase == "nvme":
            phase_nvme(b, args.pool, args.nvme_dir or args.out / "nvme")
        elif args.phase == "cold":
            phase_cold(b, args.pool, [v for v in args.cold_variants.split(",") if v])
        else:
            phase_peers(b, args.pega_pool)
    finally:
        (args.out / f"{args.phase}.json").write_text(json.dumps(b.results, indent=1))
        engine_timings(b.tmp, args.out)
    print(json.dumps(b.results, indent=1))


if __name__ == "__main__":
    main()
