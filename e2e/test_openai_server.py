"""The OpenAI-compatible server with the README's ``--kv-transfer-config`` line, restarted warm."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from e2e.agent import AgentProcess, free_port
from e2e.conftest import PROMPTS
from e2e.engine import CONNECTOR_LINE, engine_env

pytestmark = pytest.mark.vllm

# The README's line, verbatim.
README_LINE = (
    '{"kv_connector":"KVFabricConnector","kv_role":"kv_both","kv_connector_module_path":"kvfabric.connector"}'
)


def test_readme_line_is_the_one_the_harness_uses() -> None:
    assert json.loads(README_LINE) == CONNECTOR_LINE
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert README_LINE in readme


class Server:
    def __init__(
        self, model_dir: Path, tmp: Path, socket_path: Path, name: str, env: dict[str, str] | None = None
    ) -> None:
        """``env``: more ``KVFABRIC_*`` settings of the connector."""
        self.port = free_port()
        self.log = open(tmp / f"{name}.log", "ab")
        env = engine_env(tmp, {"KVFABRIC_SOCKET_PATH": str(socket_path), **(env or {})})
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # the server as users run it: engine in a child
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                str(model_dir),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dtype",
                "float32",
                "--max-model-len",
                "8192",
                "--enforce-eager",
                "--kv-cache-memory-bytes",
                str(1 << 30),
                "--kv-transfer-config",
                README_LINE,
            ],
            stdout=self.log,
            stderr=self.log,
            env=env,
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (tmp / f"{name}.log").read_text()[-4000:]
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError("server did not become healthy")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def complete(self, model: str, prompt: list[int]) -> dict[str, Any]:
        body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}).encode()
        req = urllib.request.Request(self.url + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return dict(json.loads(r.read()))

    def metric(self, name: str) -> float | None:
        """The value of counter ``name`` on the server's /metrics (None if not exported)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        m = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M)
        return float(m.group(1)) if m else None

    def external_hits(self) -> float:
        hits = self.metric("vllm:external_prefix_cache_hits_total")
        assert hits is not None, "vllm:external_prefix_cache_hits_total not exported"
        return hits

    def wait_metric(self, name: str, at_least: float, timeout: float = 30) -> float:
        """Polls until counter ``name`` reaches ``at_least`` (connector stats arrive per step)."""
        deadline = time.monotonic() + timeout
        while (value := self.metric(name) or 0.0) < at_least and time.monotonic() < deadline:
            time.sleep(0.2)
        return value

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def test_openai_server_restart_reports_external_hits(model_dir: Path, tmp_path: Path) -> None:
    with AgentProcess(tmp_path / "agent", "1GiB") as agent:
        first = Server(model_dir, tmp_path, agent.socket_path, "server1")
        try:
            cold = first.complete(str(model_dir), PROMPTS["P"])
            assert first.external_hits() == 0
            full = len(PROMPTS["P"]) // 128
            # The connector's own counters, in vLLM's metrics.
            assert first.wait_metric("vllm:kvfabric_saved_blocks_total", full) == full
            assert first.metric("vllm:kvfabric_loaded_blocks_total") == 0
        finally:
            first.stop()
        assert agent.stats()["committed_blocks"] > 0
        second = Server(model_dir, tmp_path, agent.socket_path, "server2")
        try:
            warm = second.complete(str(model_dir), PROMPTS["P"])
            assert second.external_hits() >= 0.9 * (len(PROMPTS["P"]) // 128) * 128
            usable = (len(PROMPTS["P"]) - 1) // 128
            assert second.wait_metric("vllm:kvfabric_loaded_blocks_total", usable) == usable
            assert second.metric("vllm:kvfabric_load_errors_total") == 0
        finally:
            second.stop()
        assert warm["choices"][0]["text"] == cold["choices"][0]["text"]
        assert agent.stats()["loaded_blocks"] > 0
