"""Describes a GPU engine's KV tensors for the agent: layout, sizes and CUDA IPC handles.

The agent copies blocks itself (see the agent's ``gpu`` module); the engine only exports its
tensors once per session, at ``register_kv_caches`` and after every reconnect.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec
import torch

from kvfabric.connector import protocol as p
from kvfabric.connector.layout import Route


@dataclass(frozen=True)
class CudaKV:
    device_uuid: str
    layout: str
    num_blocks: int
    plane_bytes: int
    handles: tuple[bytes, ...]
    offsets: tuple[int, ...]
    byte_order: str = ""
    # Layered loads: sets of one interprocess event per layer, each in ``handles`` order
    # (empty: none).
    events: tuple[torch.cuda.Event, ...] = ()
    event_handles: tuple[bytes, ...] = field(default=(), repr=False)

    def event_set(self, k: int) -> tuple[torch.cuda.Event, ...]:
        """Set ``k`` of the layer events."""
        n = len(self.handles)
        return self.events[k * n : (k + 1) * n]

    def request(
        self,
        namespace: str,
        with_events: bool = True,
        route: Route | None = None,
        event_sets: int = 1,
        prefetch_token: bytes = b"",
    ) -> p.RegisterGpuKV:
        """The registration; ``with_events`` False leaves the layer events out (an agent that
        does not list ``layered_loads`` would refuse them); ``route``: for agents listing
        ``routing`` only; ``event_sets`` above 1 and ``prefetch_token``: for agents listing
        ``prefetch`` only."""
        registration = p.RegisterGpuKV(
            namespace=namespace,
            device_uuid=self.device_uuid,
            layout=self.layout,
            num_blocks=self.num_blocks,
            plane_bytes=self.plane_bytes,
            handles=list(self.handles),
            offsets=list(self.offsets),
            byte_order=self.byte_order,
            layer_events=list(self.event_handles[: event_sets * len(self.handles)]) if with_events else [],
            prefetch_token=prefetch_token if with_events else b"",
        )
        if route is None:
            return registration
        return msgspec.structs.replace(
            registration, model=route.model, group=route.group, block_tokens=route.block_tokens
        )


def _gap_free(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill one range without gaps, in whatever dim order."""
    expected = 1
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape, strict=True) if n > 1):
        if stride != expected:
            return False
        expected *= size
    return True


def byte_order(block: torch.Tensor) -> str:
    """One block's dims as ``size@dim``, outermost first: equal strings, equal byte order."""
    dims = sorted(range(block.dim()), key=lambda d: -block.stride(d))
    return ",".join(f"{block.shape[d]}@{d}" for d in dims if block.shape[d] > 1)


def detect_layout(t: torch.Tensor, kernel_blocks: int = 1) -> tuple[str, int, int, str]:
    """(layout, num_blocks, plane_bytes, byte_order) of one layer's KV tensor.

    ``[2, NB, ...]`` is two planes of blocks; any other tensor whose dim 0 is the block and
    whose blocks are gap-free chunks (``[NB, 2, ...]``, MLA ``[NB, BS, D]``, vLLM >= 0.26's
    ``[NB, H, BS, 2D]`` stored NHD or HND) is one chunk per block.

    ``kernel_blocks``: the attention kernel's blocks per vLLM block (vLLM splits a block the
    kernel cannot take, e.g. FlashInfer's 64 for ``--block-size 128``, into consecutive rows
    ``b * k .. b * k + k - 1``): those rows are one block here, so that block ``b`` of vLLM's
    block table addresses all of them and nothing else.
    """
    if not _gap_free(t):
        raise ValueError(f"KV tensor of shape {tuple(t.shape)} has gaps between its elements")
    if t.dim() == 5 and t.shape[0] == 2 and t.stride(0) == t[0].numel():
        plane = t[0]
        if plane.stride(0) == plane[0].numel() and _gap_free(plane[0]):
            return ("kv_planes", *_blocks(plane, kernel_blocks))
    if t.dim() >= 2 and t.stride(0) == t[0].numel() and _gap_free(t[0]):
        return ("block_chunk", *_blocks(t, kernel_blocks))
    raise ValueError(f"unsupported KV tensor shape {tuple(t.shape)} with strides {t.stride()}")


def _blocks(rows: torch.Tensor, k: int) -> tuple[int, int, str]:
    """(blocks, bytes per block, byte order) of a tensor whose dim 0 holds ``k`` rows per block."""
    if k < 1 or rows.shape[0] % k:
        raise ValueError(f"{rows.shape[0]} kernel blocks are not a whole number of blocks of {k}")
    block = rows.unflatten(0, (rows.shape[0] // k, k))[0] if k > 1 else rows[0]
    return rows.shape[0] // k, block.nbytes, byte_order(block)


def kernel_blocks_per_block(t: torch.Tensor, num_blocks: int) -> int:
    """How many rows of ``t`` make one of vLLM's ``num_blocks`` blocks (1 unless vLLM split its
    blocks for the attention kernel); raises ValueError when they do not divide evenly."""
    rows = detect_layout(t)[1]
    if num_blocks <= 0 or rows % num_blocks:
        raise ValueError(f"KV tensor of {rows} blocks does not split vLLM's {num_blocks} blocks evenly")
    return rows // num_blocks


def describe(
    kv_caches: dict[str, torch.Tensor], layer_events: bool = False, kernel_blocks: int = 1
) -> CudaKV:
    """The tensors' layout and IPC handles; with ``layer_events``, :data:`~p.EVENT_SETS` sets of
    one interprocess event per layer too, for the agent to record after that layer's part of a
    load. ``kernel_blocks``: see :func:`detect_layout`."""
    layers = list(kv_caches.values())
    first = layers[0]
    layout, num_blocks, plane, order = detect_layout(first, kernel_blocks)
    handles, offsets = [], []
    for name, t in kv_caches.items():
        if detect_layout(t, kernel_blocks) != (layout, num_blocks, plane, order) or t.device != first.device:
            raise ValueError(f"KV layer {name} differs from the first layer in layout, size or device")
        _dev, handle, _size, storage_offset, *_ = t.untyped_storage()._share_cuda_()
        handles.append(bytes(handle))
        offsets.append(int(storage_offset) + t.storage_offset() * t.element_size())
    uuid = str(torch.cuda.get_device_properties(first.device).uuid)
    events: list[torch.cuda.Event] = []
    if layer_events:
        with torch.cuda.device(first.device):
            events = [torch.cuda.Event(interprocess=True) for _ in range(p.EVENT_SETS * len(layers))]
    return CudaKV(
        uuid,
        layout,
        num_blocks,
        plane,
        tuple(handles),
        tuple(offsets),
        order,
        tuple(events),
        tuple(bytes(e.ipc_handle()) for e in events),
    )
