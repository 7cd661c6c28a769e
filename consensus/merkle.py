"""RFC 9162 (Certificate Transparency v2) Merkle trees: roots, inclusion paths, checks.

Used twice: a validator signs one root over a whole batch's results (one signature per
batch instead of per request), and space proofs answer challenges with inclusion paths
into a storage commitment. Leaves and inner nodes are hashed with different prefixes so
that an inner node can never be passed off as a leaf.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(size: int) -> int:
    """Largest power of two strictly below ``size`` (size >= 2)."""
    return 1 << ((size - 1).bit_length() - 1)


def root_of_hashes(hashes: Sequence[bytes]) -> bytes:
    """Root over already-hashed leaves (``leaf_hash`` outputs)."""
    if not hashes:
        return EMPTY_ROOT
    level = list(hashes)
    # Bottom-up pairing gives the same root as RFC 9162's recursive split: an odd
    # node at the end of a level is carried up unchanged.
    while len(level) > 1:
        paired = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


def root(leaves: Sequence[bytes]) -> bytes:
    return root_of_hashes([leaf_hash(leaf) for leaf in leaves])


def inclusion_path(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """Audit path for ``leaves[index]``, ordered from the leaf up to the root."""
    if not 0 <= index < len(leaves):
        raise IndexError(f"leaf index {index} outside a tree of {len(leaves)}")
    return _path(index, [leaf_hash(leaf) for leaf in leaves])


def inclusion_path_of_hashes(hashes: Sequence[bytes], index: int) -> list[bytes]:
    if not 0 <= index < len(hashes):
        raise IndexError(f"leaf index {index} outside a tree of {len(hashes)}")
    return _path(index, list(hashes))


def _path(index: int, hashes: list[bytes]) -> list[bytes]:
    if len(hashes) == 1:
        return []
    k = _split(len(hashes))
    if index < k:
        return _path(index, hashes[:k]) + [root_of_hashes(hashes[k:])]
    return _path(index - k, hashes[k:]) + [root_of_hashes(hashes[:k])]


def verify_inclusion(leaf: bytes, index: int, size: int, path: Sequence[bytes], expected_root: bytes) -> bool:
    """RFC 9162 section 2.1.3.2, for a raw leaf."""
    return verify_inclusion_of_hash(leaf_hash(leaf), index, size, path, expected_root)


def verify_inclusion_of_hash(
    hashed_leaf: bytes, index: int, size: int, path: Sequence[bytes], expected_root: bytes
) -> bool:
    if not (isinstance(index, int) and isinstance(size, int)) or not 0 <= index < size or len(path) > 64:
        return False
    sha256 = hashlib.sha256  # hot loop: space proofs check ~10 levels x 8 answers per request
    fn, sn, current = index, size - 1, hashed_leaf
    for sibling in path:
        if sn == 0 or type(sibling) is not bytes or len(sibling) != 32:
            return False
        if fn & 1 or fn == sn:
            current = sha256(b"\x01" + sibling + current).digest()
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            current = sha256(b"\x01" + current + sibling).digest()
        fn >>= 1
        sn >>= 1
    return sn == 0 and current == expected_root


class MerkleTree:
    """All levels of a tree, kept so that any inclusion path costs O(log n).

    Building bottom-up and carrying an odd last node up unchanged yields exactly the
    RFC 9162 tree, so these paths verify with ``verify_inclusion``.
    """

    __slots__ = ("levels",)

    def __init__(self, hashes: Sequence[bytes]) -> None:
        if not hashes:
            raise ValueError("a Merkle tree needs at least one leaf")
        self.levels: list[list[bytes]] = [list(hashes)]
        while len(self.levels[-1]) > 1:
            level = self.levels[-1]
            paired = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
            if len(level) % 2:
                paired.append(level[-1])
            self.levels.append(paired)

    @property
    def root(self) -> bytes:
        return self.levels[-1][0]

    @property
    def size(self) -> int:
        return len(self.levels[0])

    def path(self, index: int) -> list[bytes]:
        if not 0 <= index < self.size:
            raise IndexError(f"leaf index {index} outside a tree of {self.size}")
        path = []
        for level in self.levels[:-1]:
            sibling = index ^ 1
            if sibling < len(level):
                path.append(level[sibling])
            index //= 2
        return path
