"""Node signing identities and the cluster's key ring.

The key ring is the manifest's list of validators *in manifest order*: that order is
what makes leader selection deterministic on every replica, so it is kept as a tuple
and never rebuilt from a dict or a set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from consensus.crypto import signature_scheme


@dataclass(frozen=True, slots=True)
class NodeKey:
    """This node's signing identity. ``private_key`` never leaves the process."""

    node_id: str
    scheme: str
    private_key: bytes = field(repr=False)
    public_key: bytes

    def sign(self, message: bytes) -> bytes:
        return signature_scheme(self.scheme).sign(self.private_key, message)


@dataclass(frozen=True, slots=True)
class KeyRing:
    """Every validator's public key, from the manifest. n = 3f+1 tolerates f faults."""

    members: tuple[tuple[str, str, bytes], ...]  # (node_id, scheme, public_key)
    _index: dict[str, tuple[str, bytes]] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        members = tuple((str(a), str(b), bytes(c)) for a, b, c in self.members)
        index: dict[str, tuple[str, bytes]] = {}
        for node_id, scheme, public in members:
            if node_id in index:
                raise ValueError(f"duplicate validator id {node_id!r} in key ring")
            signature_scheme(scheme)  # unknown scheme: fail at start-up, not at first vote
            index[node_id] = (scheme, public)
        if not members:
            raise ValueError("a key ring needs at least one validator")
        object.__setattr__(self, "members", members)
        object.__setattr__(self, "_index", index)

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(m[0] for m in self.members)

    @property
    def n(self) -> int:
        return len(self.members)

    @property
    def f(self) -> int:
        return (len(self.members) - 1) // 3

    @property
    def quorum(self) -> int:
        """2f+1: any two quorums share at least f+1 nodes, so at least one honest one."""
        return 2 * self.f + 1

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._index

    def index_of(self, node_id: str) -> int:
        return self.node_ids.index(node_id)

    def verify(self, node_id: str, message: bytes, signature: bytes) -> bool:
        entry = self._index.get(node_id)
        if entry is None or not isinstance(signature, bytes):
            return False
        scheme, public = entry
        return signature_scheme(scheme).verify(public, message, signature)


def generate_node_key(node_id: str, scheme: str = "ML-DSA-65") -> NodeKey:
    public, private = signature_scheme(scheme).generate()
    return NodeKey(node_id=node_id, scheme=scheme, private_key=private, public_key=public)


def keyring_of(keys: list[NodeKey] | tuple[NodeKey, ...]) -> KeyRing:
    """Convenience for tests and bootstrap: the ring of these keys, in this order."""
    return KeyRing(tuple((k.node_id, k.scheme, k.public_key) for k in keys))
