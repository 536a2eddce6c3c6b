"""Whether this machine can run the GPU tests; they skip, with the reason, where it cannot."""

from __future__ import annotations

import importlib.util

import pytest


def require_gpu(*, vllm: bool = False) -> None:
    """Skips the calling test module (call it at import) unless torch sees a CUDA GPU and CuPy
    a device; with ``vllm``, unless torch sees a CUDA GPU and vLLM and CuPy are installed."""
    try:
        import torch

        have = torch.cuda.is_available()
        if have and not vllm:
            import cupy

            have = cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, or a CUDA runtime without a device
        have = False
    if vllm and not (have and importlib.util.find_spec("vllm") and importlib.util.find_spec("cupy")):
        pytest.skip("needs a CUDA GPU with vLLM and CuPy (see tests/README.md)", allow_module_level=True)
    if not have:
        pytest.skip("no CUDA GPU with torch and CuPy on this machine", allow_module_level=True)
