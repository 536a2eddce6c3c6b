"""Model identity for block keys: what the model computes, not where it lives.

KServe and most Kubernetes setups mount every model at the same path, so the path string cannot
name a model: a checkpoint replaced at that path would load the old model's KV. The identity is
a digest of

- the checkpoint's content: every weight file's size, every safetensors header (tensor names,
  dtypes, shapes and offsets) and sampled bytes spread over each file's data (a few MiB read
  whatever the checkpoint's size), or, for a model vLLM loads with generated (``dummy``) weights,
  the load format itself;
- the effective model config (the checkpoint's ``config.json`` after vLLM's ``hf_overrides``:
  quantization method and its config, rope scaling, sliding window, attention sinks...), and the
  settings of vLLM's own that change KV bytes (quantization, KV-cache dtype and its scales).

One checkpoint at two paths is one identity; two checkpoints at one path never are. A user can
force an identity (a model vLLM streams from elsewhere) with the connector's ``model_id``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Bytes read at each sample point, and sample points per weight file.
SAMPLE_BYTES = 64 << 10
SAMPLES_PER_FILE = 16
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_MAX_HEADER = 100 << 20  # safetensors caps its JSON header at 100 MB


def _safetensors_header(f: Any, size: int) -> tuple[bytes, int]:
    """(JSON header, offset where the data starts) of a safetensors file, or (b"", 0)."""
    head = f.read(8)
    if len(head) < 8:
        return b"", 0
    (n,) = struct.unpack("<Q", head)
    if n > min(_MAX_HEADER, size - 8):
        return b"", 0
    return f.read(n), 8 + n


def file_fingerprint(path: Path, h: Any) -> None:
    """Feeds one weight file's identity into ``h``: size, header, sampled bytes."""
    size = path.stat().st_size
    h.update(path.name.encode() + b"\0" + size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        start = 0
        if path.suffix == ".safetensors":
            header, start = _safetensors_header(f, size)
            h.update(hashlib.blake2b(header, digest_size=16).digest())
        span = max(0, size - start - SAMPLE_BYTES)
        for i in range(SAMPLES_PER_FILE):
            f.seek(start + (span * i) // max(1, SAMPLES_PER_FILE - 1))
            h.update(f.read(SAMPLE_BYTES))


def checkpoint_fingerprint(directory: Path) -> str | None:
    """Digest of the weight files under ``directory`` (None when it holds none)."""
    files = sorted(p for p in directory.rglob("*") if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
    if not files:
        return None
    h = hashlib.blake2b(digest_size=16, person=b"kvfabric-ckpt")
    for path in files:
        h.update(str(path.relative_to(directory)).encode() + b"\0")
        file_fingerprint(path, h)
    return h.hexdigest()


def _local_dir(model: str, revision: str | None) -> Path | None:
    """The directory vLLM loads ``model`` from: the path itself, or the hub cache's snapshot."""
    if os.path.isdir(model):
        return Path(model)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, revision=revision, local_files_only=True))
    except Exception:  # not a hub id, not cached, no huggingface_hub: no local files
        return None


#: Config entries that name where a model came from, not what it computes (at any depth: a
#: vision-language config nests its text model's config, ``_name_or_path`` included).
_PROVENANCE = frozenset({"_name_or_path", "name_or_path", "_commit_hash", "transformers_version"})


def _canonical(value: Any) -> Any:
    """JSON-able form of configs (objects become their dicts, unknown leaves their repr), without
    provenance entries."""
    if isinstance(value, dict):
        return {
            str(k): _canonical(v)
            for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))
            if str(k) not in _PROVENANCE
        }
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return _canonical(to_dict())
    if callable(value):  # e.g. an hf_overrides function: its name, not its address
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}"
    # Every process (scheduler, each worker) must compute the same identity: no addresses.
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))


def config_digest(parts: Iterable[tuple[str, Any]]) -> str:
    canonical = json.dumps({k: _canonical(v) for k, v in parts}, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(canonical.encode(), digest_size=16).hexdigest()


def model_identity(vllm_config: Any, model_id: str | None = None) -> str:
    """The ``model`` of every :class:`~kvfabric.connector.keys.LayoutSpec` of this engine."""
    model = vllm_config.model_config
    cache = vllm_config.cache_config
    load = getattr(vllm_config, "load_config", None)
    load_format = str(getattr(load, "load_format", "auto"))
    config = config_digest(
        [
            ("hf_config", model.hf_config),
            ("hf_overrides", getattr(model, "hf_overrides", None)),
            ("quantization", getattr(model, "quantization", None)),
            ("kv_cache_dtype", str(cache.cache_dtype)),
            ("calculate_kv_scales", getattr(cache, "calculate_kv_scales", None)),
        ]
    )
    if model_id:
        return f"id:{model_id}|config:{config}"
    if load_format == "dummy":  # generated weights (seeded by vLLM): the files do not matter
        return f"dummy:{model.model}|config:{config}"
    directory = _local_dir(str(model.model), getattr(model, "revision", None))
    weights = checkpoint_fingerprint(directory) if directory is not None else None
    if weights is None:
        log.warning(
            "no local weight files to fingerprint; the model is identified by its name and revision "
            "(set the connector's model_id to name it explicitly)",
            extra={"model": str(model.model)},
        )
        return f"name:{model.model}@{getattr(model, 'revision', None) or ''}|config:{config}"
    return f"weights:{weights}|config:{config}"
