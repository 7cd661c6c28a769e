"""Vote collection with the only rule that matters: count DISTINCT KNOWN validators.

A vote set is keyed by the value voted for (a digest or root). Insertion order is
kept (dicts are ordered) but every output that is signed, hashed or sent is re-sorted
into key-ring order, so two replicas with the same votes produce the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from consensus.keys import KeyRing


@dataclass(slots=True)
class VoteSet:
    """Votes for one slot: ``value -> {signer: wire}``, and each signer's first value."""

    by_value: dict[bytes, dict[str, bytes]] = field(default_factory=dict)
    first: dict[str, bytes] = field(default_factory=dict)

    def add(self, signer: str, value: bytes, wire: bytes) -> bytes | None:
        """Record a vote. Returns the signer's earlier *different* wire when the signer
        already voted another value here (equivocation), else None."""
        previous = self.first.get(signer)
        if previous is not None and previous != value:
            return self.by_value[previous][signer]
        self.first.setdefault(signer, value)
        self.by_value.setdefault(value, {}).setdefault(signer, wire)
        return None

    def count(self, value: bytes) -> int:
        return len(self.by_value.get(value, {}))

    def wires(self, value: bytes, keyring: KeyRing) -> tuple[bytes, ...]:
        votes = self.by_value.get(value, {})
        return tuple(votes[n] for n in keyring.node_ids if n in votes)

    def signers(self, value: bytes, keyring: KeyRing) -> tuple[str, ...]:
        votes = self.by_value.get(value, {})
        return tuple(n for n in keyring.node_ids if n in votes)

    def reached(self, keyring: KeyRing) -> bytes | None:
        """The value with a 2f+1 quorum, if any (at most one with honest majority)."""
        for value in sorted(self.by_value):
            if len(self.by_value[value]) >= keyring.quorum:
                return value
        return None


def quorum(keyring: KeyRing) -> int:
    return keyring.quorum


def weak_quorum(keyring: KeyRing) -> int:
    """f+1: at least one honest validator among them."""
    return keyring.f + 1
