"""KVFabric's vLLM connector, block keys, wire protocol and agent client.

``KVFabricConnector`` is resolved lazily so the agent can import the protocol and key modules
without importing vLLM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvfabric.connector.vllm_connector import KVFabricConnector

__all__ = ["KVFabricConnector"]


def __getattr__(name: str) -> Any:
    if name == "KVFabricConnector":
        from kvfabric.connector.vllm_connector import KVFabricConnector

        return KVFabricConnector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
