"""Model identity from checkpoint content (pure: files on disk, a stand-in vLLM config)."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest

from kvfabric.connector.identity import checkpoint_fingerprint, model_identity


def write_safetensors(path: Path, payload: bytes, name: str = "w") -> None:
    header = (
        f'{{"{name}":{{"dtype":"U8","shape":[{len(payload)}],"data_offsets":[0,{len(payload)}]}}}}'.encode()
    )
    path.write_bytes(struct.pack("<Q", len(header)) + header + payload)


def vllm_config(model: Path | str, hf: dict | None = None, load_format: str = "auto") -> SimpleNamespace:
    return SimpleNamespace(
        model_config=SimpleNamespace(
            model=str(model),
            revision=None,
            hf_config=hf or {"hidden_size": 8},
            hf_overrides=None,
            quantization=None,
        ),
        cache_config=SimpleNamespace(cache_dtype="auto", calculate_kv_scales=False),
        load_config=SimpleNamespace(load_format=load_format),
    )


def test_one_checkpoint_at_two_paths_is_one_model_and_two_at_one_path_are_two(tmp_path: Path) -> None:
    a = tmp_path / "mnt" / "model"
    a.mkdir(parents=True)
    write_safetensors(a / "model.safetensors", bytes(range(256)) * 4096)
    nested = {"text_config": {"hidden_size": 8, "_name_or_path": str(a)}, "_name_or_path": str(a)}
    first = model_identity(vllm_config(a, nested))
    b = tmp_path / "elsewhere"
    shutil.copytree(a, b)
    moved = {"text_config": {"hidden_size": 8, "_name_or_path": str(b)}, "_name_or_path": str(b)}
    assert model_identity(vllm_config(b, moved)) == first  # paths at any depth do not count
    # Replaced in place (a model update at the same mount): same size, other bytes.
    write_safetensors(a / "model.safetensors", bytes(range(255, -1, -1)) * 4096)
    assert model_identity(vllm_config(a, nested)) != first
    # Same bytes, another tensor name (header): another model.
    write_safetensors(b / "model.safetensors", bytes(range(256)) * 4096, name="v")
    assert checkpoint_fingerprint(b) != checkpoint_fingerprint(tmp_path / "mnt" / "model")


def test_config_that_changes_kv_is_part_of_the_identity(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "model.safetensors", b"x" * 1000)
    base = model_identity(vllm_config(tmp_path, {"hidden_size": 8}))
    rope = model_identity(vllm_config(tmp_path, {"hidden_size": 8, "rope_scaling": {"factor": 4.0}}))
    quant = model_identity(
        vllm_config(tmp_path, {"hidden_size": 8, "quantization_config": {"quant_method": "fp8"}})
    )
    assert len({base, rope, quant}) == 3
    cfg = vllm_config(tmp_path)
    cfg.cache_config.cache_dtype = "fp8_e4m3"
    assert model_identity(cfg) != base


def test_forced_and_fallback_identities(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_safetensors(tmp_path / "model.safetensors", b"x" * 1000)
    assert model_identity(vllm_config(tmp_path), "team/llama@v3").startswith("id:team/llama@v3|")
    assert model_identity(vllm_config(tmp_path, load_format="dummy")).startswith("dummy:")
    assert model_identity(vllm_config("org/not-cached-anywhere")).startswith("name:org/not-cached-anywhere@")
    assert "no local weight files" in caplog.text


def test_large_checkpoints_are_sampled_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1 GiB sparse shard: the fingerprint reads about 1 MiB of it, not the whole file."""
    from kvfabric.connector import identity

    shard = tmp_path / "model-00001-of-00001.safetensors"
    write_safetensors(shard, b"")
    with open(shard, "r+b") as f:
        f.truncate(1 << 30)
    read = [0]

    class Counting:
        def __init__(self, *args: object) -> None:
            self.f = open(*args)

        def __enter__(self) -> Counting:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

        def read(self, n: int) -> bytes:
            data = self.f.read(n)
            read[0] += len(data)
            return data

        def seek(self, pos: int) -> int:
            return self.f.seek(pos)

    monkeypatch.setattr(identity, "open", Counting, raising=False)
    assert checkpoint_fingerprint(tmp_path) is not None
    assert read[0] <= identity.SAMPLES_PER_FILE * identity.SAMPLE_BYTES + 4096


def test_setups_the_connector_cannot_serve_are_named() -> None:
    from kvfabric.connector.layout import unsupported_setup

    def cfg(**parallel: int) -> SimpleNamespace:
        return SimpleNamespace(parallel_config=SimpleNamespace(**parallel))

    assert unsupported_setup(cfg(pipeline_parallel_size=1), None) is None
    assert "pipeline" in (unsupported_setup(cfg(pipeline_parallel_size=2), None) or "")
    assert "context" in (unsupported_setup(cfg(decode_context_parallel_size=2), None) or "")
    two_groups = SimpleNamespace(kv_cache_groups=[object(), object()])
    assert "KV-cache groups" in (unsupported_setup(cfg(), two_groups) or "")
    assert unsupported_setup(cfg(), SimpleNamespace(kv_cache_groups=[object()])) is None


def test_identity_is_the_same_in_every_process(tmp_path: Path) -> None:
    """The scheduler and every worker compute it separately: nothing process-specific (an
    ``hf_overrides`` function's address, an object's default repr) may enter it."""
    write_safetensors(tmp_path / "model.safetensors", b"x" * 1000)

    def overrides(cfg: object) -> object:
        return cfg

    class Opaque:
        pass

    cfg = vllm_config(tmp_path, {"hidden_size": 8, "extra": Opaque()})
    cfg.model_config.hf_overrides = overrides
    first = model_identity(cfg)
    # Other objects of the same kind (as another process has them, at other addresses).
    cfg.model_config.hf_config = {"hidden_size": 8, "extra": Opaque()}
    cfg.model_config.hf_overrides = lambda c: c
    cfg.model_config.hf_overrides.__qualname__ = overrides.__qualname__
    assert model_identity(cfg) == first
