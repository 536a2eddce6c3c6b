"""Describes a GPU engine's KV tensors for the agent: layout, sizes and CUDA IPC handles.

The agent copies blocks itself (see the agent's ``gpu`` module); the engine only exports its
tensors once per session, at ``register_kv_caches`` and after every reconnect.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvfabric.connector import protocol as p


@dataclass(frozen=True)
class CudaKV:
    device_uuid: str
    layout: str
    num_blocks: int
    plane_bytes: int
    handles: tuple[bytes, ...]
    offsets: tuple[int, ...]

    def request(self, namespace: str) -> p.RegisterGpuKV:
        return p.RegisterGpuKV(
            namespace=namespace,
            device_uuid=self.device_uuid,
            layout=self.layout,
            num_blocks=self.num_blocks,
            plane_bytes=self.plane_bytes,
            handles=list(self.handles),
            offsets=list(self.offsets),
        )


def detect_layout(t: torch.Tensor) -> tuple[str, int, int]:
    """(layout, num_blocks, plane_bytes) of one layer's KV tensor."""
    if t.dim() == 5 and t.shape[0] == 2:
        return "kv_planes", t.shape[1], t[0, 0].nbytes
    if t.dim() == 5 and t.shape[1] == 2:
        return "blocks_first", t.shape[0], t[0, 0].nbytes
    if t.dim() == 3:
        return "mla", t.shape[0], t[0].nbytes
    raise ValueError(f"unsupported KV tensor shape {tuple(t.shape)}")


def describe(kv_caches: dict[str, torch.Tensor]) -> CudaKV:
    layers = list(kv_caches.values())
    first = layers[0]
    layout, num_blocks, plane = detect_layout(first)
    handles, offsets = [], []
    for name, t in kv_caches.items():
        if (
            detect_layout(t) != (layout, num_blocks, plane)
            or not t.is_contiguous()
            or t.device != first.device
        ):
            raise ValueError(f"KV layer {name} differs from the first layer in layout, size or device")
        _dev, handle, _size, storage_offset, *_ = t.untyped_storage()._share_cuda_()
        handles.append(bytes(handle))
        offsets.append(int(storage_offset) + t.storage_offset() * t.element_size())
    uuid = str(torch.cuda.get_device_properties(first.device).uuid)
    return CudaKV(uuid, layout, num_blocks, plane, tuple(handles), tuple(offsets))
