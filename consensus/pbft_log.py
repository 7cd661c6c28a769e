"""The ordering log: one ``Slot`` per sequence number between the watermarks.

A slot remembers the pre-prepare it accepted (per view), the prepare and commit votes it
has seen (per view, so a late vote of an old view never counts towards a new one), and
the certificates it formed. Slots at or below the stable checkpoint are deleted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from consensus.messages import Batch, CommittedBatch, PreparedCert
from consensus.quorum import VoteSet


@dataclass(slots=True)
class Slot:
    seq: int
    view: int = -1  # view of the accepted pre-prepare (-1: none yet)
    digest: bytes | None = None
    agreed_time_ms: int = 0
    requests: Batch = ()
    leader_signature: bytes = b""  # the leader's signature over the accepted pre-prepare header
    # view -> (digest, header wire) of the first pre-prepare seen from that view's leader;
    # the header wire (requests stripped, see messages.preprepare_header_wire) is evidence
    preprepares: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    prepares: dict[int, VoteSet] = field(default_factory=dict)
    commits: dict[int, VoteSet] = field(default_factory=dict)
    sent_prepare: int = -1  # view of our last prepare
    sent_commit: int = -1
    prepared_cert: PreparedCert | None = None  # highest-view prepared certificate
    commit_cert: CommittedBatch | None = None
    retry_at_ms: int = 0  # when to re-send our own votes for this slot if still uncommitted
    retries: int = 0
    # digest -> (agreed time, requests) of the batches we endorsed here (pre-prepare or
    # prepare; the same ones are on disk), newest last, kept until the slot is truncated
    # (at most MAX_BODIES_PER_SLOT): a later new view may re-propose any batch we
    # prepared by its digest alone, and peers that lack it fetch it from us.
    bodies: dict[bytes, tuple[int, Batch]] = field(default_factory=dict)
    # (view, digest, holders) of a re-proposal whose body we do not hold yet
    awaiting: tuple[int, bytes, tuple[str, ...]] | None = None
    fetch_at_ms: int = 0  # when to ask the next holder for the awaited body
    bodies_served: dict[str, int] = field(default_factory=dict)  # peer -> bodies sent it in this view

    @property
    def has_batch(self) -> bool:
        return self.digest is not None

    @property
    def committed(self) -> bool:
        return self.commit_cert is not None

    def votes(self, table: dict[int, VoteSet], view: int) -> VoteSet:
        vs = table.get(view)
        if vs is None:
            vs = table[view] = VoteSet()
        return vs

    def reset_batch(self) -> None:
        """Forget an unprepared proposal of an old view (a new view re-decides it)."""
        self.view, self.digest, self.agreed_time_ms, self.requests = -1, None, 0, ()
        self.leader_signature = b""
        self.awaiting = None

    def body(self, digest: bytes) -> tuple[int, Batch] | None:
        if digest == self.digest:
            return self.agreed_time_ms, self.requests
        return self.bodies.get(digest)


@dataclass(slots=True)
class BatchResult:
    """What execution of one batch produced, kept until late votes stop mattering."""

    seq: int
    view: int
    request_ids: tuple[str, ...]
    request_digests: tuple[bytes, ...]
    results: tuple[bytes, ...]
    leaves: tuple[bytes, ...]
    root: bytes
    votes: dict[str, tuple[bytes, bytes, bytes]] = field(default_factory=dict)  # signer -> (root, sig, wire)
    certified_root: bytes | None = None
    final_count: int = 0
    final_at_ms: int = 0
    accused: set[str] = field(default_factory=set)
    retry_at_ms: int = 0  # when to re-broadcast our vote if still not final here
    retries: int = 0
    answered: dict[str, int] = field(default_factory=dict)  # peer -> votes re-sent to it
