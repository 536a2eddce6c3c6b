"""Timestamps of a request's way through the connector, for benchmarks: with ``KVFABRIC_TRACE``
set to a file path, each :func:`mark` appends one JSON line (``CLOCK_MONOTONIC``, which every
process of the host shares, so the engine's front end, scheduler and workers line up). Off,
a mark costs one attribute test.
"""

from __future__ import annotations

import json
import os
import time

_PATH = os.environ.get("KVFABRIC_TRACE") or None


def mark(event: str, **fields: object) -> None:
    if _PATH is None:
        return
    line = json.dumps({"t": time.monotonic(), "pid": os.getpid(), "event": event, **fields})
    with open(_PATH, "a", encoding="utf-8") as f:
        f.write(line + "\n")
