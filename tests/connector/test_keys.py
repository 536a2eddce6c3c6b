import dataclasses
import os
import subprocess
import sys

import pytest

from kvfabric.connector.keys import KEY_BYTES, LayoutSpec, chain_keys, request_seed

SPEC = LayoutSpec(
    model="m",
    dtype="float32",
    kv_cache_dtype="auto",
    num_layers=4,
    num_kv_heads=2,
    head_size=64,
    block_size=128,
    tp_size=1,
    tp_rank=0,
    layout="cpu",
)


def test_chain_covers_only_full_blocks_and_is_deterministic() -> None:
    tokens = list(range(1000))
    keys = chain_keys(tokens, 128, request_seed())
    assert len(keys) == 7 and all(len(k) == KEY_BYTES for k in keys)
    assert keys == chain_keys(tokens, 128, request_seed())
    assert len(set(keys)) == 7


def test_key_depends_on_every_preceding_token() -> None:
    tokens = list(range(512))
    base = chain_keys(tokens, 128, request_seed())
    changed = tokens.copy()
    changed[5] += 1
    other = chain_keys(changed, 128, request_seed())
    assert all(a != b for a, b in zip(base, other, strict=True))
    tail = tokens.copy()
    tail[300] += 1
    other = chain_keys(tail, 128, request_seed())
    assert other[:2] == base[:2] and other[2] != base[2] and other[3] != base[3]


def test_extending_a_chain_matches_computing_it_whole() -> None:
    tokens = list(range(1024))
    whole = chain_keys(tokens, 128, request_seed())
    tail = chain_keys(tokens, 128, request_seed(), start_block=3, parent=whole[2])
    assert whole[3:] == tail
    with pytest.raises(ValueError):
        chain_keys(tokens, 128, request_seed(), start_block=3)


def test_salt_and_lora_separate_chains() -> None:
    tokens = list(range(256))
    plain = chain_keys(tokens, 128, request_seed(["", ""]))
    assert plain != chain_keys(tokens, 128, request_seed(["tenant-a", ""]))
    assert plain != chain_keys(tokens, 128, request_seed(["", "lora1"]))
    # length-prefixed parts: ("ab", "") and ("a", "b") must differ
    assert request_seed(["ab", ""]) != request_seed(["a", "b"])


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(LayoutSpec)])
def test_namespace_changes_with_every_layout_factor(field: str) -> None:
    value = getattr(SPEC, field)
    new = value + 1 if isinstance(value, int) else value + "x"
    assert dataclasses.replace(SPEC, **{field: new}).namespace() != SPEC.namespace()


def test_keys_do_not_depend_on_pythonhashseed() -> None:
    code = (
        "from kvfabric.connector.keys import *;"
        "print(chain_keys(list(range(300)),128,request_seed(['s']))[-1].hex(),"
        "LayoutSpec('m','f','a',1,1,1,1,1,0,'l').namespace())"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("0", "1", "random")
    }
    assert len(outs) == 1


def test_extending_a_chain_reads_only_the_new_blocks_and_equals_the_whole_chain() -> None:
    seed = request_seed(["salt"])
    tokens = list(range(1000, 1000 + 16 * 40 + 5))
    extras = {3: b"img", 20: b"img2"}
    whole = chain_keys(tokens, 16, seed, extras=extras)
    assert len(whole) == 40
    part = chain_keys(tokens, 16, seed, start_block=10, parent=whole[9], extras=extras, end_block=25)
    assert part == whole[10:25]
    assert chain_keys(tokens, 16, seed, start_block=40, parent=whole[39]) == []

    class Counting(list):  # records which tokens are read
        def __getitem__(self, item):  # type: ignore[no-untyped-def]
            self.read = item
            return super().__getitem__(item)

    counted = Counting(tokens)
    chain_keys(counted, 16, seed, start_block=39, parent=whole[38], end_block=40)
    assert counted.read == slice(39 * 16, 40 * 16)  # one block, not the context
