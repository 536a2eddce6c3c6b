"""A real vLLM engine in its own process, driven over stdin/stdout JSON lines.

Tests, the demo and the benchmarks start engines with :class:`EngineProcess`; each engine is a
separate OS process (as in production), so scheduler state, vLLM's own prefix cache and the
connector's sessions really die with it.

Child side: ``python -m e2e.engine`` reads ``{"op": "generate", ...}`` lines and answers one
JSON line each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONNECTOR_LINE = {
    "kv_connector": "KVFabricConnector",
    "kv_role": "kv_both",
    "kv_connector_module_path": "kvfabric.connector",
}


def engine_env(tmp: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a CPU vLLM engine: one process, caches and sockets under ``tmp``."""
    env = dict(os.environ)
    env.update(
        {
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_CACHE_ROOT": str(tmp / "vllm-cache"),
            "TMPDIR": str(tmp),
            "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "VLLM_LOGGING_LEVEL": "WARNING",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra or {})
    return env


@dataclass
class Output:
    tokens: list[int]
    cached_tokens: int
    seconds: float


class EngineProcess:
    """Parent-side handle. ``connector`` is the ``kv_connector_extra_config`` or None for none."""

    def __init__(
        self,
        model_dir: Path,
        tmp: Path,
        connector: dict[str, Any] | None,
        *,
        example_connector_dir: Path | None = None,
        prefix_caching: bool = False,
        env: dict[str, str] | None = None,
        log_name: str = "engine",
        kv_cache_bytes: int = 1 << 30,
        llm_args: dict[str, Any] | None = None,
        transfer: dict[str, Any] | None = None,
    ) -> None:
        """``llm_args`` override the CPU test defaults of ``LLM(...)``; ``transfer`` is a raw
        ``KVTransferConfig`` (another connector) and wins over ``connector``."""
        spec = {
            "model": str(model_dir),
            "connector": connector,
            "example_connector_dir": str(example_connector_dir) if example_connector_dir else None,
            "prefix_caching": prefix_caching,
            "kv_cache_bytes": kv_cache_bytes,
            "llm": llm_args or {},
            "transfer": transfer,
        }
        tmp.mkdir(parents=True, exist_ok=True)
        self.log_path = tmp / f"{log_name}.log"
        self._log = open(self.log_path, "ab")
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "e2e.engine", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=engine_env(tmp, env),
            cwd=REPO,
        )
        ready = self._read()
        assert ready.get("ready"), ready
        self.start_seconds = time.perf_counter() - started

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            raise RuntimeError(f"engine exited with {self.proc.returncode}; log tail:\n{self.tail()}")
        return dict(json.loads(line))

    def tail(self, n: int = 4000) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    def generate(
        self, prompts: list[list[int]], max_tokens: int = 16, cache_salt: str | None = None
    ) -> list[Output]:
        """Greedy generation, one prompt at a time (so ``seconds`` is that prompt's latency)."""
        assert self.proc.stdin is not None
        cmd = {"op": "generate", "prompts": prompts, "max_tokens": max_tokens, "cache_salt": cache_salt}
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return [Output(**o) for o in reply["outputs"]]

    def serve(
        self,
        prompts: list[list[int]],
        max_tokens: int = 16,
        abort: list[int] | None = None,
        abort_after: int = 0,
    ) -> dict[str, Any]:
        """All prompts at once, as a server's batch: vLLM schedules them together (chunked
        prefill, preemption under a small KV cache); the prompts ``abort`` lists are aborted
        after ``abort_after`` engine steps. Returns ``{"outputs": {index: Output}, "aborted":
        [...], "preemptions": n}`` for the requests that finished."""
        assert self.proc.stdin is not None
        cmd = {
            "op": "serve",
            "prompts": prompts,
            "max_tokens": max_tokens,
            "abort": abort or [],
            "abort_after": abort_after,
        }
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(reply["error"])
        reply["outputs"] = {int(k): Output(**o) for k, o in reply["outputs"].items()}
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(b'{"op": "exit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        self._log.close()

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _child(spec: dict[str, Any], out: Any) -> None:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    kwargs: dict[str, Any] = {}
    if spec.get("transfer"):
        kwargs["kv_transfer_config"] = KVTransferConfig(**spec["transfer"])
    elif spec["connector"] is not None:
        kwargs["kv_transfer_config"] = KVTransferConfig(
            **CONNECTOR_LINE, kv_connector_extra_config=spec["connector"]
        )
    elif spec.get("example_connector_dir"):
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="ExampleConnector",
            kv_role="kv_both",
            kv_connector_extra_config={"shared_storage_path": spec["example_connector_dir"]},
        )
    kwargs.update(
        dtype="float32",
        enforce_eager=True,
        max_model_len=8192,
        kv_cache_memory_bytes=spec["kv_cache_bytes"],
        enable_prefix_caching=spec["prefix_caching"],
        seed=0,
    )
    kwargs.update(spec.get("llm", {}))
    if isinstance(kwargs.get("kv_events_config"), dict):  # vLLM's own KV events, for comparison
        from vllm.config.kv_events import KVEventsConfig

        kwargs["kv_events_config"] = KVEventsConfig(**kwargs["kv_events_config"])
    llm = LLM(model=spec["model"], **kwargs)
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "exit":
            break
        try:
            params = SamplingParams(
                temperature=0.0,
                max_tokens=cmd["max_tokens"],
                ignore_eos=True,
                detokenize=not kwargs.get("skip_tokenizer_init", False),
            )
            if cmd["op"] == "serve":
                reply_: dict[str, Any] = _serve(llm, cmd, params)
                out.write(json.dumps(reply_) + "\n")
                out.flush()
                continue
            from kvfabric.connector.trace import mark

            results = []
            for ids in cmd["prompts"]:
                mark("generate")
                t0 = time.perf_counter()
                prompt = TokensPrompt(prompt_token_ids=ids)
                if cmd.get("cache_salt"):
                    prompt["cache_salt"] = cmd["cache_salt"]
                (res,) = llm.generate([prompt], params, use_tqdm=False)
                mark("generated")
                results.append(
                    {
                        "tokens": list(res.outputs[0].token_ids),
                        "cached_tokens": res.num_cached_tokens or 0,
                        "seconds": time.perf_counter() - t0,
                    }
                )
            reply: dict[str, Any] = {"outputs": results}
        except Exception as exc:  # report to the parent instead of dying silently
            reply = {"error": repr(exc)}
        out.write(json.dumps(reply) + "\n")
        out.flush()


def _serve(llm: Any, cmd: dict[str, Any], params: Any) -> dict[str, Any]:
    """A batch through the engine's own loop (what a server does), with aborts mid-run."""
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    for i, ids in enumerate(cmd["prompts"]):
        engine.add_request(str(i), TokensPrompt(prompt_token_ids=ids), params)
    done: dict[str, Any] = {}
    steps = 0
    aborted = [str(i) for i in cmd["abort"]]
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished and o.request_id not in aborted:
                done[o.request_id] = {
                    "tokens": list(o.outputs[0].token_ids),
                    "cached_tokens": o.num_cached_tokens or 0,
                    "seconds": 0.0,
                }
        steps += 1
        if steps == cmd["abort_after"] and aborted:
            engine.abort_request(aborted)
    preemptions = 0
    try:
        for m in llm.get_metrics():
            if m.name == "vllm:num_preemptions":
                preemptions = int(getattr(m, "value", 0))
    except Exception:  # metrics off or renamed: report none
        preemptions = -1
    return {"outputs": done, "aborted": [int(a) for a in aborted], "preemptions": preemptions, "steps": steps}


if __name__ == "__main__":
    # vLLM logs to stdout; keep the protocol on a private copy of it and send the rest to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    _child(json.loads(sys.argv[1]), proto)
