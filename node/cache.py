"""``--cache``: a TTL cache of final results keyed by request digest.

A hit answers an identical request (same canonical bytes, so the same request id and
proofs) without a consensus round. Entries are final, certified results, so serving
one again is always correct; the TTL only bounds memory and staleness of metadata
such as the late-vote count. Bounded in entries as well as in time.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class ResultCache:
    def __init__(self, ttl_s: float, max_entries: int, clock: Callable[[], float]) -> None:
        if ttl_s <= 0 or max_entries <= 0:
            raise ValueError("cache ttl and size must be positive")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[bytes, tuple[float, Any]] = OrderedDict()
        self.stats = CacheStats()

    def get(self, key: bytes) -> Any | None:
        entry = self._entries.get(key)
        if entry is None or entry[0] <= self._clock():
            if entry is not None:
                del self._entries[key]
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return entry[1]

    def put(self, key: bytes, value: Any) -> None:
        self._entries[key] = (self._clock() + self.ttl_s, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self.stats.evictions += 1

    def __len__(self) -> int:
        return len(self._entries)
