"""When should a block go to the NVMe tier: when it is committed, or when the pool evicts it?

    python -m benchmarks.run tier_policy

A trace-driven model of the two tiers (LRU pool of ``pool`` blocks, LRU tier of ``tier``
blocks, promotion of tier hits into the pool), replayed with each policy on the same trace:
requests draw one of ``prefixes`` prompt prefixes (Zipf, s=1.1), each a chain of 8 to 64
blocks; an agent restart halfway through empties the pool. Reported: hit rate (blocks served
from either tier / blocks asked) over the whole trace, and over the 2,000 requests after the
restart. The model leaves out what only the real agent shows (disk bandwidth, queue limits):
it compares the policies, it does not predict a deployment's hit rate.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

Report = Callable[..., None]


class _Lru:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: OrderedDict[tuple[int, int], None] = OrderedDict()

    def hit(self, key: tuple[int, int]) -> bool:
        if key in self.items:
            self.items.move_to_end(key)
            return True
        return False

    def put(self, key: tuple[int, int]) -> list[tuple[int, int]]:
        """Inserts ``key``; returns what was evicted for it."""
        out = []
        if key in self.items:
            self.items.move_to_end(key)
            return out
        while len(self.items) >= self.capacity:
            out.append(self.items.popitem(last=False)[0])
        self.items[key] = None
        return out


def replay(
    policy: str, pool: int, tier: int, prefixes: int, requests: int, seed: int, window: int = 2000
) -> tuple[float, float]:
    """(hit rate over the trace, hit rate after the restart) of ``policy`` ("commit"/"evict")."""
    rng = random.Random(seed)
    lengths = [rng.randint(8, 64) for _ in range(prefixes)]
    weights = [1 / (i + 1) ** 1.1 for i in range(prefixes)]
    mem, disk = _Lru(pool), _Lru(tier)
    asked = served = asked_after = served_after = 0
    restart_at = requests // 2

    def to_pool(key: tuple[int, int]) -> None:
        for gone in mem.put(key):
            if policy == "evict":
                disk.put(gone)

    for r in range(requests):
        if r == restart_at:
            mem = _Lru(pool)  # the agent restarted: only the tier survives
        p = rng.choices(range(prefixes), weights)[0]
        chain = [(p, b) for b in range(lengths[p])]
        hits = 0
        for key in chain:
            if mem.hit(key):
                hits += 1
            elif disk.hit(key):
                to_pool(key)  # promoted
                hits += 1
            else:
                break
        for key in chain[hits:]:  # computed, then committed
            to_pool(key)
            if policy == "commit":
                disk.put(key)
        asked += len(chain)
        served += hits
        if restart_at <= r < restart_at + window:
            asked_after += len(chain)
            served_after += hits
    return served / asked, served_after / asked_after


def bench_policy(results: dict[str, Any], report: Report) -> None:
    print(
        "NVMe write policy (trace model): pool 2,000 blocks, 3,000 prefixes of 8-64 blocks (Zipf "
        "1.1), 40,000 requests, an agent restart halfway; tier 10x and 2x the pool"
    )
    for tier, label in ((20000, "10x"), (4000, "2x")):
        rates = {p: replay(p, 2000, tier, 3000, 40000, seed=5, window=200) for p in ("commit", "evict")}
        for policy, (whole, after) in rates.items():
            report(results, f"tier_policy_{label}_{policy}_hit_rate", whole, "")
            report(results, f"tier_policy_{label}_{policy}_hit_rate_200_after_restart", after, "")
        report(results, f"ratio_{label}_commit_over_evict", rates["commit"][0] / rates["evict"][0], "x")
