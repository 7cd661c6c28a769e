"""What a `Replica` asks its driver to do. The replica never does I/O itself.

The driver (the node process, or the simulator) feeds events in — ``submit``,
``receive``, ``tick`` — and carries out the returned actions **in order**. Order
matters for one rule only: every ``Persist`` must be durable before any ``Send`` that
follows it in the same list (a replica must never contradict a vote it already sent,
even after a crash).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class Application(Protocol):
    """The replicated state machine the replica orders requests for. Deterministic:
    the same batches in the same order give byte-identical results and snapshots."""

    def execute_batch(self, seq: int, requests: list[bytes], agreed_time_ms: int) -> list[bytes]:
        """Execute encoded requests in order; return one encoded result per request."""

    def snapshot(self) -> bytes:
        """Canonical encoding of the whole application state (for checkpoints)."""

    def restore(self, snapshot: bytes) -> None:
        """Replace the state by a snapshot received through verified state transfer."""

    # Optional: ``request_time_ms(request: bytes) -> int | None``, the timestamp a request
    # carries (None: it has none). With it and ``ReplicaConfig.dedup_window_ms`` the
    # replica expires stale requests and forgets old request ids (bounded de-dup table).
    # Optional: ``prefetch(requests: list[bytes]) -> None``, called when a batch is accepted
    # for a future sequence number; it may start pure work early, never touch the state.


@dataclass(frozen=True, slots=True)
class Send:
    """Deliver ``payload`` to one node (``to``) or to every other node (``to is None``)."""

    payload: bytes
    to: str | None = None


@dataclass(frozen=True, slots=True)
class Persist:
    """Durable key/value records the replica needs to recover after a crash.
    ``value is None`` deletes the key. Written atomically, before later sends."""

    records: tuple[tuple[str, bytes | None], ...]


@dataclass(frozen=True, slots=True)
class ResultCertificate:
    """Proof, checkable by any client with the manifest, that 2f+1 validators signed the
    Merkle root over a batch's results, and that one result is in that batch."""

    cluster_id: str
    seq: int
    root: bytes
    size: int
    index: int
    path: tuple[bytes, ...]
    signatures: tuple[tuple[str, bytes], ...]  # (node_id, signature), distinct node ids

    def to_wire(self) -> dict[str, object]:
        return {
            "cluster_id": self.cluster_id,
            "seq": self.seq,
            "root": self.root,
            "size": self.size,
            "index": self.index,
            "path": list(self.path),
            "signatures": [[node, sig] for node, sig in self.signatures],
        }


@dataclass(frozen=True, slots=True)
class Final:
    """A request's result is final (2f+1 matching signed result votes).

    ``agreeing`` counts validators whose signed root matched when this was emitted;
    ``confidence_level = agreeing / n``. Emitted once per request at finality and again
    (``late=True``) when later votes change the count.
    """

    request_id: str
    request_digest: bytes
    result: bytes
    certificate: ResultCertificate
    agreeing: int
    n: int
    leader: str
    view: int
    late: bool = False


@dataclass(frozen=True, slots=True)
class AlreadyExecuted:
    """A request id that was already ordered was submitted again (client retry): the
    driver answers it from its stored result instead of executing it twice."""

    request_id: str
    seq: int


@dataclass(frozen=True, slots=True)
class Rejected:
    """A submitted request cannot be ordered (malformed, too large, window full)."""

    request_id: str
    code: str  # an error code of the transport: InvalidRequest, Overloaded, ...
    message: str


@dataclass(frozen=True, slots=True)
class ViewChanged:
    view: int
    leader: str


@dataclass(frozen=True, slots=True)
class Evidence:
    """Signed proof that ``accused`` misbehaved. ``messages`` are the signed messages,
    as received, that together prove it; anyone with the manifest can re-check them."""

    accused: str
    kind: str  # equivocation | wrong-result | bad-signature | ...
    seq: int
    view: int
    messages: tuple[bytes, ...] = field(default_factory=tuple)
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Committed:
    """A batch was committed and executed locally (for metrics, status and tests)."""

    seq: int
    view: int
    request_ids: tuple[str, ...]
    agreed_time_ms: int


@dataclass(frozen=True, slots=True)
class StateTransferred:
    """The replica replaced its state by a verified checkpoint from peers."""

    seq: int
    state_digest: bytes


Action = Send | Persist | Final | AlreadyExecuted | Rejected | ViewChanged | Evidence | Committed | StateTransferred
