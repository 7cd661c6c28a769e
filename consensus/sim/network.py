"""The simulated network: per-message delay, loss, duplication, reordering, partitions.

Every decision draws from the simulation's one seeded ``random.Random``, in a fixed
order, so a seed replays byte-for-byte. Reordering is not a separate knob for most
messages — independent random delays already reorder — but ``reorder_rate`` adds a
long extra delay to a few messages so that very old messages arrive late, which is what
exposes stale-view and old-sequence handling.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class LinkFaults:
    """How hostile the network is. The all-zero default except delay is a calm LAN."""

    min_delay_ms: int = 1
    max_delay_ms: int = 8
    drop_rate: float = 0.0
    duplicate_rate: float = 0.0
    reorder_rate: float = 0.0
    reorder_extra_ms: int = 200


CALM = LinkFaults()


@dataclass(slots=True)
class Network:
    """Routing between simulated *instances* (an instance is one running replica; twins
    are two instances sharing a node id).

    ``sides`` puts an instance on side 0 or 1 (or ``None``: both). It models Twins:
    an instance only talks to instances on its own side or to side-less ones, so each
    twin can be shown to a different part of the cluster. ``partition`` is a list of
    groups of instances; while it is set, messages only flow inside a group.
    """

    rng: random.Random
    faults: LinkFaults = CALM
    sides: dict[str, int | None] = field(default_factory=dict)
    partition: tuple[frozenset[str], ...] | None = None
    sent: int = 0
    dropped: int = 0
    duplicated: int = 0

    def connected(self, a: str, b: str) -> bool:
        side_a, side_b = self.sides.get(a), self.sides.get(b)
        if side_a is not None and side_b is not None and side_a != side_b:
            return False
        if self.partition is not None:
            return any(a in group and b in group for group in self.partition)
        return True

    def schedule(self, sender: str, receiver: str, now_ms: int) -> list[int]:
        """Delivery times for one message from ``sender`` to ``receiver`` (empty: lost).
        The caller checks ``connected`` again at delivery, so a partition that starts
        while a message is in flight still cuts it."""
        self.sent += 1
        if not self.connected(sender, receiver):
            self.dropped += 1
            return []
        faults = self.faults
        if faults.drop_rate and self.rng.random() < faults.drop_rate:
            self.dropped += 1
            return []
        copies = 1
        if faults.duplicate_rate and self.rng.random() < faults.duplicate_rate:
            copies = 2
            self.duplicated += 1
        times = []
        for _ in range(copies):
            delay = self.rng.randint(faults.min_delay_ms, faults.max_delay_ms)
            if faults.reorder_rate and self.rng.random() < faults.reorder_rate:
                delay += self.rng.randint(1, faults.reorder_extra_ms)
            times.append(now_ms + delay)
        return times
