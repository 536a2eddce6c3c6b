"""How the connector describes an engine's KV tensors to the agent (layout, sizes, byte order).

Pure shape and stride logic: CPU tensors stand in for CUDA ones (same strides)."""

from __future__ import annotations

import pytest
import torch

from kvfabric.connector.cuda_kv import detect_layout, kernel_blocks_per_block

NB, BS, H, D = 10, 16, 8, 128


def test_kv_planes_two_planes_of_blocks() -> None:
    t = torch.empty(2, NB, BS, H, D, dtype=torch.bfloat16)
    layout, nb, plane, _ = detect_layout(t)
    assert (layout, nb, plane) == ("kv_planes", NB, BS * H * D * 2)


@pytest.mark.parametrize("order", ["NHD", "HND"])
def test_packed_kv_of_vllm_026_is_one_chunk_per_block(order: str) -> None:
    """vLLM >= 0.26: logical [NB, H, BS, 2D]; NHD stores it [NB, BS, H, 2D] (a permuted view)."""
    if order == "NHD":
        t = torch.empty(NB, BS, H, 2 * D, dtype=torch.bfloat16).permute(0, 2, 1, 3)
        assert not t.is_contiguous()
    else:
        t = torch.empty(NB, H, BS, 2 * D, dtype=torch.bfloat16)
    layout, nb, chunk, _ = detect_layout(t)
    assert (layout, nb, chunk) == ("block_chunk", NB, BS * H * 2 * D * 2)


def test_memory_orders_differ_in_byte_order() -> None:
    nhd = torch.empty(NB, BS, H, 2 * D).permute(0, 2, 1, 3)
    hnd = torch.empty(NB, H, BS, 2 * D)
    assert detect_layout(nhd)[3] != detect_layout(hnd)[3]
    assert detect_layout(hnd)[3] == detect_layout(torch.empty(NB, H, BS, 2 * D))[3]


def test_mla_and_blocks_first() -> None:
    assert detect_layout(torch.empty(NB, BS, 576, dtype=torch.float16))[:3] == (
        "block_chunk",
        NB,
        BS * 576 * 2,
    )
    assert detect_layout(torch.empty(NB, 2, BS, H, D))[:3] == ("block_chunk", NB, 2 * BS * H * D * 4)


@pytest.mark.parametrize(
    "tensor",
    [
        torch.empty(NB, H, BS, 2 * D)[:, :, :, :D],  # K half only: gaps
        torch.empty(NB, 2, BS, H, D).transpose(0, 1),  # planes interleaved per block
        torch.empty(2 * NB, H, BS, D)[::2],  # every other block
    ],
)
def test_tensors_with_gaps_or_foreign_orders_are_refused(tensor: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        detect_layout(tensor)


@pytest.mark.parametrize(
    "make",
    [
        lambda nb: torch.empty(2, nb, BS // 2, H, D, dtype=torch.bfloat16),  # kv planes
        lambda nb: torch.empty(nb, BS // 2, H, 2 * D, dtype=torch.bfloat16).permute(0, 2, 1, 3),  # 0.26 NHD
        lambda nb: torch.empty(nb, 2, BS // 2, H, D, dtype=torch.bfloat16),  # blocks first
    ],
)
def test_a_block_split_for_the_attention_kernel_is_addressed_as_its_rows(make: object) -> None:
    """vLLM block ``b`` split in two kernel blocks lives in rows ``2b`` and ``2b+1``: the agent's
    block ``b`` must start at row ``2b`` and cover both (H1 of the connector review)."""
    t = make(2 * NB)  # type: ignore[operator]
    assert kernel_blocks_per_block(t, NB) == 2
    layout, nb, block_bytes, order = detect_layout(t, kernel_blocks=2)
    unsplit_layout, rows, row_bytes, _ = detect_layout(t)
    assert (layout, nb, block_bytes) == (unsplit_layout, NB, 2 * row_bytes) and rows == 2 * NB
    plane = t[0] if layout == "kv_planes" else t
    for b in (1, 7):  # block b's bytes begin where row 2b begins, and end where row 2b+2 begins
        assert plane[2 * b].data_ptr() - plane.data_ptr() == b * block_bytes
    # its own layout for the agent: an engine whose blocks are not split never shares them
    assert order != detect_layout(make(NB))[3]  # type: ignore[operator]
    with pytest.raises(ValueError, match="evenly"):
        kernel_blocks_per_block(t, NB + 1)
    with pytest.raises(ValueError, match="whole number"):
        detect_layout(make(2 * NB + 1), kernel_blocks=2)  # type: ignore[operator]
