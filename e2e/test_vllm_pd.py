"""Prefill/decode disaggregation through the fabric, with real vLLM CPU servers on two "nodes"
(agents in network namespaces, one Valkey) and the project's P/D proxy in front: the prefill
engine on node A saves the prompt and promises its blocks in ``kv_transfer_params``; the decode
engine on node B waits for them (its agent pulls them from A), loads them, and answers exactly as
a single engine does. Node A killed mid-handoff: B waits out its deadline, recomputes, and the
request still succeeds, with the same output."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from e2e.agent import free_port, wait_until
from e2e.conftest import BLOCK, MAX_TOKENS, PROMPTS
from e2e.engine import REPO, engine_env
from e2e.netns import Fabric, require_netns
from e2e.test_openai_server import Server
from e2e.test_vllm import usable_blocks
from e2e.valkey import ValkeyProcess
from tests.integration.test_fabric import VALKEY_PORT, fabric_agent

pytestmark = [pytest.mark.vllm, pytest.mark.multihost]
FAST = {"KVFABRIC_BACKOFF_INITIAL_MS": "50", "KVFABRIC_BACKOFF_MAX_MS": "200"}


def _post(url: str, body: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return dict(json.loads(r.read()))


def _completion(model: str, prompt: list[int], **more: Any) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
        **more,
    }


class ProxyProcess:
    def __init__(self, tmp: Path, prefill: str, decode: str) -> None:
        self.port = free_port()
        self.log = open(tmp / "pd-proxy.log", "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kvfabric.connector.pd_proxy",
                "--prefill",
                prefill,
                "--decode",
                decode,
                "--port",
                str(self.port),
                "--prefill-timeout-s",
                "30",
            ],
            stdout=self.log,
            stderr=self.log,
            env=engine_env(tmp),
            cwd=REPO,
        )
        wait_until("the proxy", self._up, timeout=30, every=0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _up(self) -> bool:
        assert self.proc.poll() is None, "the proxy exited"
        try:
            return bool(self.stats())
        except OSError:
            return False

    def stats(self) -> dict[str, int]:
        with urllib.request.urlopen(self.url + "/stats", timeout=2) as r:
            return dict(json.loads(r.read()))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


def test_prefill_on_node_a_decode_on_node_b_equals_one_engine_and_survives_node_a_dying(
    model_dir: Path, tmp_path: Path, baseline: dict[str, list[int]]
) -> None:
    require_netns()
    model = str(model_dir)
    with (
        Fabric(2) as fabric,
        ValkeyProcess(tmp_path / "valkey", "0.0.0.0", VALKEY_PORT, fabric.prefix(fabric.hub)),
        fabric_agent(fabric, 0, tmp_path, pool_size="1GiB") as a,
        fabric_agent(fabric, 1, tmp_path, pool_size="1GiB") as b,
    ):
        prefill = Server(model_dir, tmp_path, a.socket_path, "prefill", env=FAST)
        decode = Server(
            model_dir, tmp_path, b.socket_path, "decode", env={**FAST, "KVFABRIC_HANDOFF_WAIT_MS": "4000"}
        )
        proxy = ProxyProcess(tmp_path, prefill.url, decode.url)
        try:
            # through the proxy: prefill on A, blocks pulled by B, decode on B
            out = _post(proxy.url + "/v1/completions", _completion(model, PROMPTS["P"]))
            assert out["choices"][0]["token_ids"] == baseline["P"]
            assert proxy.stats() == {"requests": 1, "prefill_failures": 0, "handoffs": 1}
            pulled = b.stats()["remote_pulled_blocks"]
            assert pulled == usable_blocks("P")  # every promised block came over the fabric
            assert decode.wait_metric("vllm:kvfabric_loaded_blocks_total", pulled) == pulled
            assert a.stats()["remote_served_blocks"] == pulled

            # node A dies between the phases: B was promised blocks nobody can send any more
            first = _post(
                prefill.url + "/v1/completions",
                _completion(model, PROMPTS["Q"], max_tokens=1, kv_transfer_params={"do_remote_decode": True}),
            )
            promise = first["kv_transfer_params"]
            assert promise["kvfabric"]["blocks"] == len(PROMPTS["Q"]) // BLOCK
            prefill.stop()
            a.kill()
            started = time.monotonic()
            late = _post(
                decode.url + "/v1/completions", _completion(model, PROMPTS["Q"], kv_transfer_params=promise)
            )
            waited = time.monotonic() - started
            assert late["choices"][0]["token_ids"] == baseline["Q"]  # recomputed, same output
            assert b.stats()["remote_pulled_blocks"] == pulled  # nothing more arrived
            assert b.stats()["remote_pull_failures"] >= 1
            assert 4.0 <= waited < 60  # the promise was waited for, to its deadline

            # and through the proxy, with node A gone: decoded without a handoff
            again = _post(proxy.url + "/v1/completions", _completion(model, PROMPTS["R1"]))
            assert again["choices"][0]["token_ids"] == baseline["R1"]
            assert proxy.stats()["prefill_failures"] == 1
        finally:
            proxy.stop()
            decode.stop()
            if prefill.proc.poll() is None:
                prefill.stop()
