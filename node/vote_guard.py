"""The vote guard: the highest (view, seq) this validator ever signed, in a small file
next to its store but outside it.

A store that goes back in time (``node.db`` restored from an old backup, its WAL lost,
replaced by an empty one) forgets votes the node already sent. Voting again for those
slots could contradict them: peers hold the old votes, and two signed votes for one
slot are equivocation. On start the node hands this bound to the replica, which
withholds the votes it may have cast until the cluster has moved past them
(``Replica.vote_floor``). The file is written after the store's commit and before the
sends of the same pass leave, so it never lags what a peer can hold.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

GUARD_FILE = "vote-guard.json"
MAX_GUARD_BYTES = 4096


class VoteGuardError(Exception):
    """The guard file is unreadable, damaged, or belongs to another node."""


class VoteGuard:
    def __init__(self, path: Path, *, owner: str, sync: bool = False) -> None:
        self.path = path
        self.owner = owner  # "<cluster id>/<node id>", as the store records it
        self.sync = sync  # fsync like the store does under --sync-commits
        self._written: tuple[int, int] | None = None

    def load(self) -> tuple[int, int] | None:
        """The bound on file, or None when there is no file (a new node, or one from
        before the guard existed)."""
        try:
            raw = self.path.read_bytes()[:MAX_GUARD_BYTES + 1]
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise VoteGuardError(f"cannot read the vote guard {self.path}: {exc}") from exc
        try:
            if len(raw) > MAX_GUARD_BYTES:
                raise ValueError(f"larger than {MAX_GUARD_BYTES} bytes")
            data = json.loads(raw)
            owner, view, seq = data["owner"], data["view"], data["seq"]
            if not (isinstance(owner, str) and type(view) is int and type(seq) is int and view >= 0 and seq >= 0):
                raise ValueError("owner must be a string, view and seq non-negative integers")
        except (ValueError, KeyError, TypeError) as exc:
            raise VoteGuardError(f"the vote guard {self.path} is damaged ({exc}); see docs/OPERATIONS.md, "
                                 "'Backups and a damaged store'") from exc
        if owner != self.owner:
            raise VoteGuardError(f"the vote guard {self.path} belongs to {owner} (cluster/node), not {self.owner}: "
                                 "give this node its own data directory")
        self._written = (view, seq)
        return self._written

    def raise_to(self, high: tuple[int, int]) -> None:
        """Record ``high`` unless the file already holds as much. Atomic: a crash leaves
        the old file or the new one, never a torn one."""
        old = self._written
        if old is not None and high[0] <= old[0] and high[1] <= old[1]:
            return
        bound = high if old is None else (max(high[0], old[0]), max(high[1], old[1]))
        data = json.dumps({"owner": self.owner, "view": bound[0], "seq": bound[1]}).encode()
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            if self.sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, self.path)
        if self.sync:
            directory = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        self._written = bound
