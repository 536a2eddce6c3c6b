import numpy as np
import pytest
import torch

from kvfabric.connector.copier import BlockCopier, find_runs


def test_find_runs() -> None:
    dst = np.array([5, 6, 7, 1, 2, 9, 8, 7, 6, 7, 3])
    src = np.array([0, 1, 2, 3, 4, 10, 11, 12, 13, 14, 15])
    assert find_runs(dst, src) == [(5, 0, 3, 1), (1, 3, 2, 1), (9, 10, 4, -1), (7, 14, 1, 1), (3, 15, 1, 1)]
    assert find_runs(np.array([4]), np.array([9])) == [(4, 9, 1, 1)]
    assert find_runs(np.array([], dtype=np.int64), np.array([], dtype=np.int64)) == []


def _layers(num_blocks: int = 32, layers: int = 3) -> list[torch.Tensor]:
    return [torch.randn(num_blocks, 2, 16, 8) for _ in range(layers)]


@pytest.mark.parametrize("placement", ["ascending", "descending", "fragmented"])
def test_save_then_load_restores_every_byte(placement: str) -> None:
    src = _layers()
    copier = BlockCopier(src)
    assert copier.block_bytes == 3 * 2 * 16 * 8 * 4
    pool = torch.zeros(64 * copier.block_bytes + 100, dtype=torch.uint8)
    copier.attach(pool.numpy())
    rng = np.random.default_rng(0)
    blocks = {
        "ascending": np.arange(4, 16),
        "descending": np.arange(15, 3, -1),  # vLLM's free list order after a request ends
        "fragmented": rng.permutation(32)[:12],
    }[placement]
    slots = rng.permutation(64)[:12] if placement == "fragmented" else np.arange(20, 32)
    copier.save(blocks.tolist(), slots.tolist())
    # the slot holds layer 0's block, then layer 1's, then layer 2's
    s0 = pool.view(-1)[slots[0] * copier.block_bytes :][: src[0][0].numel() * 4]
    assert torch.equal(s0.view(torch.float32).view(2, 16, 8), src[0][blocks[0]])
    dst = [torch.full_like(t, float("nan")) for t in src]  # poisoned
    loader = BlockCopier(dst)
    loader.attach(pool.numpy())
    loader.load(blocks.tolist(), slots.tolist())
    for a, b in zip(src, dst, strict=True):
        assert torch.equal(a[blocks], b[blocks])
        untouched = np.setdiff1d(np.arange(32), blocks)
        assert torch.isnan(b[untouched]).all()


def test_rejects_out_of_range_and_unattached() -> None:
    copier = BlockCopier(_layers(4, 1))
    with pytest.raises(RuntimeError):
        copier.load([0], [0])
    copier.attach(np.zeros(2 * copier.block_bytes, dtype=np.uint8))
    with pytest.raises(ValueError):
        copier.load([0], [2])
    with pytest.raises(ValueError):
        copier.load([4], [0])
    with pytest.raises(ValueError):
        copier.load([0, 1], [0])
