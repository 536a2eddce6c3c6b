"""Exceptions of the connector side.

::

    KVFabricError
    ├── ConfigError          bad connector settings (names the key)
    └── AgentError           anything that went wrong talking to the agent
        ├── AgentUnavailable     no agent, connection lost, timed out, or breaker open
        └── AgentRejected        the agent answered with an ErrorReply (``code``)

Every ``AgentError`` is handled by falling back to recompute; none reaches vLLM.
"""

from __future__ import annotations


class KVFabricError(Exception):
    """Base of every KVFabric connector error."""


class ConfigError(KVFabricError, ValueError):
    """A connector setting is missing or invalid; the message names the key."""


class AgentError(KVFabricError):
    """Talking to the agent failed."""


class AgentUnavailable(AgentError):
    """The agent is absent, the connection broke, a call timed out, or the breaker is open."""


class AgentRejected(AgentError):
    """The agent answered a request with an error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
