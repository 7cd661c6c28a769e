"""The PBFT replica: a sans-I/O state machine (events in, actions out).

Shape (after Castro & Liskov, and indy-plenum's split into services):

* ordering — the leader batches requests into pre-prepares; 2f+1 prepares make a batch
  *prepared*, 2f+1 commits make it *committed*; batches execute strictly in seq order;
* results — after executing a batch every replica signs ONE result-vote over the Merkle
  root of the batch's results; 2f+1 equal roots make each result final;
* checkpoints — every ``checkpoint_interval`` batches; 2f+1 equal signed state digests
  make it stable, and the log below it is dropped;
* view change — request timers on followers, exponential back-off, view-changes carrying
  prepared certificates, a new-view that everyone re-derives and checks;
* state transfer — a replica that is behind fetches a checkpoint (checked against 2f+1
  signed checkpoints) and then committed batches (each with 2f+1 signed commits).

Everything here is deterministic. Time only arrives as ``now_ms``; dicts are iterated in
insertion order only where that order is itself a function of the inputs, and anything
signed or sent is ordered by seq or by key-ring order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from consensus import merkle
from consensus.actions import (
    Action, AlreadyExecuted, Application, Committed, Evidence, Final, Persist, Rejected, ResultCertificate, Send,
    StateTransferred, ViewChanged,
)
from consensus.certificate import result_leaf
from consensus.codec import DecodeError, canonical_pack, pack_trusted, unpack_bounded
from consensus.evidence import EQUIVOCATION, WRONG_RESULT
from consensus.keys import KeyRing, NodeKey
from consensus.messages import (
    BATCHES, BODY, CHECKPOINT, COMMIT, FETCH_BATCHES, FETCH_BODY, FETCH_RESULTS, FETCH_STATE, FETCH_VIEW, RESULTS,
    MAX_BATCH_BYTES, MAX_BATCHES_PER_REPLY, MAX_REPLY_ENTRIES, BodyReply, FetchBody,
    MAX_MESSAGE_BYTES, MAX_REQUEST_ID_CHARS, NEW_VIEW, PRE_PREPARE, PREPARE, REQUEST, RESULT_VOTE, SIGNED_KINDS,
    STATE, VIEW_CHANGE, Batch, BatchesReply, CheckpointVote, Commit, CommittedBatch, FetchBatches, FetchState,
    FetchView, Message, NewView, PreparedCert, PrePrepare, Prepare, RequestMsg, ResultVote, StateReply, ViewChange,
    CertifiedResults, FetchResults, ResultsReply, batch_digest, decode, decode_verified, encode, request_digest,
    encode_signed, preprepare_header_bytes, preprepare_header_wire, result_vote_bytes, verify,
)
from consensus.pbft_log import BatchResult, Slot
from consensus.pbft_proofs import (
    NULL_BATCH_DIGEST, NewViewPlan, Reproposal, checkpoint_proof_digest, plan_new_view, snapshot_digest,
    verify_committed, verify_view_change,
)
from consensus.quorum import VoteSet

MAX_PENDING_REQUESTS = 100_000
# Requests relayed by one peer that wait here at once, in bytes (and at most
# MAX_PENDING_REQUESTS / n of them): a Byzantine peer cannot fill our memory or the
# pending table with requests it relays (honest followers relay what their clients sent).
RELAYED_BYTES_PER_PEER = 64 << 20
VIEW_CHANGE_BACKOFF_CAP = 32  # the view-change timeout grows at most to 32x the base
MAX_VOTE_RETRIES = 5
LATE_VOTE_PROBES = 2  # times a final batch's vote goes to validators whose votes are missing
MAX_BODY_ANSWERS = 3  # fetch-body answers per peer, slot and view
MAX_BODIES_PER_SLOT = 4  # endorsed batches a slot keeps for re-proposals by digest
# Catch-up replies (batches, results) stop adding entries past this many bytes, so they
# stay well below MAX_MESSAGE_BYTES: 64 batches of 1 MiB would not fit in one message,
# and an oversized reply is never sent, so the asker would ask again forever.
MAX_REPLY_BYTES = MAX_MESSAGE_BYTES // 2
PROBE_INTERVAL_FACTOR = 10  # idle replicas ask a peer for news every 10 x request_timeout_ms
# A follower asks for a view change on a request timeout only if f other validators
# sent it something within the last 1.5 request timeouts (see _check_request_timers).
# Longer than one timeout: the re-sent request that tells a peer about a stalled request
# comes one timeout before that peer's own timer runs out, and it must count.
HEARD_WINDOW_NUM, HEARD_WINDOW_DEN = 3, 2
CUT_OFF_TELLINGS = 2  # see _Pending.tellings_owed
BEHIND_CLAIM_TTL_FACTOR = 20  # fetching while "behind" gives up after 20 fetch intervals without progress
# Signed wires that passed verification lately (at most this many, each at most this
# long): a peer re-sending or replaying the same bytes costs a look-up, not a signature
# check (~0.1-0.2 ms for ML-DSA-65), so replays cannot buy our CPU.
VERIFIED_CACHE_ENTRIES = 2048
VERIFIED_CACHE_MAX_WIRE = 16 << 10
MAX_VIEW_LEAP = 64  # messages for views further ahead are ignored (bounds memory)
RESULT_RETENTION_CHECKPOINTS = 2  # keep committed batches this many checkpoints for laggards
RESULT_RETENTION_BATCHES = 64  # keep certified batch results at least this long (late votes, fetch-results)
# What answers to one peer's fetch-* asks (state, batches, results, bodies, new-views) may
# cost us: a byte budget refilled at ANSWER_BYTES_PER_S up to ANSWER_BURST_BYTES. A
# catching-up peer gets a snapshot and a full reply at once and ~32 MiB/s after; a
# Byzantine one can no longer buy a gigabyte of replies with 150 tiny asks.
ANSWER_BYTES_PER_S = MAX_REPLY_BYTES
ANSWER_BURST_BYTES = MAX_MESSAGE_BYTES + MAX_REPLY_BYTES


@dataclass(frozen=True, slots=True)
class ReplicaConfig:
    """Cluster-wide settings; every replica must use the same values.

    ``window``: the leader keeps at most this many batches proposed but not yet executed
    (locally). The acceptance watermarks are ``(stable_seq, stable_seq + log_size]`` with
    ``log_size = max(2 * checkpoint_interval, window)``: followers accept pre-prepares that
    far ahead so the next checkpoint is always reachable.

    Batching (leader only, so it does not affect safety): a full batch is proposed
    whenever the window has room; a partial one once its oldest request waited
    ``batch_max_delay_ms`` and fewer than ``max_partial_in_flight`` batches are proposed
    but not executed, or once it waited ``batch_max_wait_ms``.
    """

    cluster_id: str
    batch_max_requests: int = 64
    batch_max_delay_ms: int = 5
    max_partial_in_flight: int = 2
    batch_max_wait_ms: int = 50
    window: int = 8
    checkpoint_interval: int = 16
    view_change_timeout_ms: int = 2000
    request_timeout_ms: int = 1000
    max_request_bytes: int = 256 * 1024
    max_clock_skew_ms: int = 30000
    # De-duplication window (0: remember every executed request id forever). Needs an
    # application with ``request_time_ms``: a request whose own timestamp is more than
    # half the window away from the agreed time is not executed ("expired"), so an id
    # whose batch executed a whole window ago can be forgotten at the next checkpoint
    # without any chance of executing the same request twice (docs/CONSENSUS.md).
    dedup_window_ms: int = 0

    @property
    def log_size(self) -> int:
        return max(2 * self.checkpoint_interval, self.window)


MAX_TIMER_EXTENSIONS = 8


@dataclass(slots=True)
class _Pending:
    request: bytes
    arrived_ms: int
    deadline_ms: int
    stage: int  # 0: forwarded to the leader; 1: broadcast to all (next expiry -> view change)
    local: bool  # submitted to this node (persisted until executed)
    extensions: int = 0  # timer restarts granted because the leader kept making progress
    origin: str = ""  # the peer that relayed it to us ("" when a client submitted it here)
    # Tellings to everybody still owed, while hearing from f others, before suspecting the
    # leader: 2 after one made while cut off (the first after a heal can still be lost,
    # e.g. on a link the peer is replacing), one less per telling made while connected.
    tellings_owed: int = 0
    told_by: set[str] = field(default_factory=set)  # followers that told everybody about it


@dataclass(slots=True)
class _CheckpointResend:
    """Our own vote for a checkpoint not stable yet (see _resend_checkpoint_votes)."""

    wire: bytes
    retry_at_ms: int
    retries: int = 0


@dataclass(slots=True)
class _Transfer:
    seq: int
    digest: bytes
    proof: tuple[bytes, ...]
    next_try_ms: int = 0
    tries: int = 0


@dataclass(slots=True)
class _Foreign:
    """Result votes for a batch this replica holds no results of (it skipped the batch
    by state transfer, or restored a checkpoint past it): see ``_on_foreign_vote``."""

    votes: dict[str, tuple[bytes, bytes, bytes]]  # signer -> (root, signature, wire)
    mine: bytes = b""  # our co-signed vote wire, once f+1 validators agreed on a root
    answered: dict[str, int] | None = None


@dataclass(slots=True)
class _Stable:
    seq: int = 0
    digest: bytes | None = None
    proof: tuple[bytes, ...] = ()
    blob: bytes | None = None  # canonical_pack([app_snapshot, bookkeeping]) for state transfer


def _key(kind: str, seq: int) -> str:
    return f"{kind}/{seq:016d}"


OWN_PREPREPARE_TAG = "own-pre-prepare/v1"


def _batch_key(seq: int, digest: bytes) -> str:
    return f"batch/{seq:016d}/{digest.hex()}"


def _header_wire(msg: Message) -> bytes:
    """The leader's signed header of a received pre-prepare (requests stripped)."""
    pp: PrePrepare = msg.payload  # type: ignore[assignment]
    return preprepare_header_wire(msg.cluster_id, msg.signer, pp.view, pp.seq, pp.agreed_time_ms, pp.digest, msg.signature)


class Replica:
    """One validator's PBFT state machine. See docs/CONSENSUS.md."""

    def __init__(self, config: ReplicaConfig, key: NodeKey, keyring: KeyRing, app: Application,
                 durable: Mapping[str, bytes] | None = None, now_ms: int = 0,
                 signed_bound: tuple[int, int] | None = None) -> None:
        """``signed_bound`` = (view, seq): the highest this validator ever signed, as kept
        outside its store (the node's vote guard, see ``signed_high``). If ``durable``
        remembers less, the store went back in time and the replica withholds the votes
        it may have cast before (see ``vote_floor``)."""
        if key.node_id not in keyring:
            raise ValueError(f"node {key.node_id!r} is not in the key ring")
        self.config = config
        self.key = key
        self.keyring = keyring
        self.app = app
        self._cid = config.cluster_id
        self._now = now_ms
        self._out: list[Action] = []

        self._view = 0
        self._in_view_change = False
        self._vc_target = 0
        self._vc_attempts = 0
        self._vc_deadline = 0
        self._vc_quorum_at: int | None = None  # when 2f+1 first asked for _vc_target
        self._view_changes: dict[int, dict[str, Message]] = {}
        self._new_view_wire: bytes | None = None
        self._sent_new_view: set[int] = set()
        self._higher_view_seen: dict[int, set[str]] = {}
        self._next_fetch_view_ms = 0
        self._helped: dict[str, int] = {}
        self._answer_budget: dict[str, tuple[int, int]] = {}  # peer -> (bytes left, when refilled)
        self._verified: dict[bytes, None] = {}  # recently verified signed wires, oldest first
        self._wall_offset_ms = 0  # wall clock minus now_ms (see set_wall_offset)
        self._vc_answered: dict[str, int] = {}  # peer -> when we last answered its view-change
        self._heard: dict[str, int] = {}  # peer -> when a message from it last passed our checks
        self._signed_view = 0  # highest view of any order vote, view-change or new-view we signed
        self._signed_seq = 0  # highest seq of any order vote we signed (at least the stable checkpoint)
        self._vote_floor: tuple[int, int] | None = None  # see vote_floor

        self._slots: dict[int, Slot] = {}
        self._stable = _Stable()
        self._checkpoint_votes: dict[int, VoteSet] = {}
        self._own_checkpoints: dict[int, tuple[bytes, bytes]] = {}  # seq -> (digest, blob)
        self._checkpoint_resends: dict[int, _CheckpointResend] = {}  # until that seq is stable
        self._last_executed = 0
        self._last_progress_ms = now_ms  # when this replica last executed a batch
        self._last_time_ms = 0
        self._executed: dict[str, int] = {}
        self._executed_time: dict[int, int] = {}  # seq -> agreed time, for seqs in _executed
        # Optional application hooks (consensus/actions.py), looked up once. Expiry needs
        # both a window and the request's own time.
        self._app_prefetch: Callable[[list[bytes]], None] | None = getattr(app, "prefetch", None)
        self._request_time: Callable[[bytes], int | None] | None = (
            getattr(app, "request_time_ms", None) if config.dedup_window_ms > 0 else None)
        self._in_flight: dict[str, int] = {}
        self._pending: dict[str, _Pending] = {}
        self._relayed: dict[str, list[int]] = {}  # peer -> [pending requests it relayed, their bytes]
        self._next_seq = 1
        self._queue: dict[str, None] = {}  # unproposed pending ids, arrival order (see _unproposed)
        self._queue_bytes = 0
        self._queue_dirty = False
        self._proposing = False
        self._results: dict[int, BatchResult] = {}
        self._early_votes: dict[int, dict[str, tuple[bytes, bytes, bytes]]] = {}
        self._foreign: dict[int, _Foreign] = {}  # seq -> votes on results we do not hold
        self._plan_top = 0  # the highest seq the current view's new-view re-proposed (0: none)
        self._missing_results: dict[int, None] = {}  # skipped seqs whose results we still want
        self._results_fetch_at = 0
        self._results_fetch_tries = 0
        self._persisted_results: set[int] = set()  # seqs with a durable result/<seq> record
        self._transfer: _Transfer | None = None
        self._probes_left = 0
        self._last_probe_ms = now_ms
        self._retained: dict[int, CommittedBatch] = {}  # truncated but still served to laggards
        self._ahead_seq = 0
        self._behind_since_ms = now_ms  # when f+1 validators last claimed that we are behind
        self._claimants: set[str] = set()  # validators that claimed it since
        self._last_progress_ms = now_ms
        self._next_fetch_ms = 0
        self._peer_cursor = 0
        # (kind, seq) -> (view, digest, wire); the wire of a recovered own pre-prepare whose
        # batch record is gone is None (never re-sent, still never contradicted).
        self._own_votes: dict[tuple[str, int], tuple[int, bytes, bytes | None]] = {}
        self._persisted: dict[str, set[int]] = {"vote": set(), "prepared": set(), "committed": set()}
        # A batch's request bytes are persisted once per (seq, digest), in batch/<seq>/<digest>;
        # the pre-prepare vote and the prepared/committed certificates refer to them.
        self._persisted_batches: dict[int, set[bytes]] = {}

        self.counters: dict[str, int] = {}
        self.penalties: dict[str, int] = {n: 0 for n in keyring.node_ids}
        self._evidence_seen: set[tuple[str, str, int, int]] = set()

        if durable:
            self._recover(durable, signed_bound)
            self._probes_left = 2 * keyring.n
            self._last_probe_ms = now_ms - 10**9  # first probe on the first tick
        elif signed_bound is not None:
            self._set_vote_floor(signed_bound)  # an emptied store: catch up from peers at once
            self._probes_left = 2 * keyring.n
            self._last_probe_ms = now_ms - 10**9

    # ------------------------------------------------------------------ properties

    @property
    def node_id(self) -> str:
        return self.key.node_id

    @property
    def view(self) -> int:
        return self._view

    @property
    def leader(self) -> str:
        return self._leader_of(self._view)

    @property
    def is_leader(self) -> bool:
        return self.leader == self.node_id and not self._in_view_change

    @property
    def last_executed_seq(self) -> int:
        return self._last_executed

    @property
    def stable_checkpoint_seq(self) -> int:
        return self._stable.seq

    @property
    def in_view_change(self) -> bool:
        return self._in_view_change

    @property
    def view_change_target(self) -> int | None:
        """The view this replica asked for, while it is in a view change."""
        return self._vc_target if self._in_view_change else None

    @property
    def _lone(self) -> bool:
        """A one-validator cluster: no peer ever reads this replica's order votes."""
        return self.keyring.n == 1

    @property
    def signed_high(self) -> tuple[int, int]:
        """(view, seq) at or above everything this replica signed that a peer could hold
        against it: pre-prepares, prepares, commits (view and seq), view-changes and
        new-views (view). A driver keeps it outside the store, durable before the sends
        of the same pass leave, and passes it back as ``signed_bound`` on restart."""
        return self._signed_view, max(self._signed_seq, self._stable.seq)

    @property
    def vote_floor(self) -> tuple[int, int] | None:
        """(view, seq) while the store remembers less than this replica signed: it may
        have voted for other batches at those slots before, so it casts no order vote at
        a seq <= floor seq in a view <= floor view, no view-change until its stable
        checkpoint reaches the floor seq (one would omit forgotten prepared
        certificates), and no new-view for a view <= floor view. Lifted once the stable
        checkpoint reaches the floor seq in a view >= the floor view. Meanwhile it still
        executes what the others commit, and counts as one of the f faulty validators."""
        return self._vote_floor

    def executed_seq(self, request_id: str) -> int | None:
        """The batch that executed this request, if this replica knows it was executed
        (itself, or through a snapshot whose results it may still be fetching)."""
        return self._executed.get(request_id)

    def status(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "view": self._view,
            "leader": self.leader,
            "is_leader": self.is_leader,
            "in_view_change": self._in_view_change,
            "view_change_target": self.view_change_target,
            "last_executed_seq": self._last_executed,
            "stable_checkpoint_seq": self._stable.seq,
            "low_watermark": self._stable.seq,
            "high_watermark": self._stable.seq + self.config.log_size,
            "pending_requests": len(self._pending),
            "in_flight_batches": sum(1 for s in self._slots.values() if s.has_batch and s.seq > self._last_executed),
            "executed_requests": len(self._executed),
            "state_transfer": None if self._transfer is None else {"seq": self._transfer.seq, "tries": self._transfer.tries},
            "vote_floor": None if self._vote_floor is None else {"view": self._vote_floor[0], "seq": self._vote_floor[1]},
            "n": self.keyring.n,
            "f": self.keyring.f,
            "counters": dict(sorted(self.counters.items())),
            "penalties": dict(self.penalties),
        }

    def _leader_of(self, view: int) -> str:
        """Round robin over the key ring in manifest order. Validators with evidence are
        NOT skipped: evidence is local knowledge until it is itself ordered, and a leader
        choice that differs between replicas would stall view changes."""
        ids = self.keyring.node_ids
        return ids[view % len(ids)]

    # ------------------------------------------------------------------ driver API

    def submit(self, request_id: str, request: bytes, now_ms: int) -> list[Action]:
        self._now = now_ms
        if not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_REQUEST_ID_CHARS:
            self._out.append(Rejected(str(request_id)[:MAX_REQUEST_ID_CHARS], "InvalidRequest",
                                      f"request_id must be a non-empty string of at most {MAX_REQUEST_ID_CHARS} characters"))
            return self._flush()
        if not isinstance(request, bytes) or len(request) > self.config.max_request_bytes:
            self._out.append(Rejected(request_id, "InvalidRequest",
                                      f"request must be bytes of at most {self.config.max_request_bytes}"))
            return self._flush()
        seq = self._executed.get(request_id)
        if seq is not None:
            self._out.append(AlreadyExecuted(request_id, seq))
            return self._flush()
        if request_id in self._pending:
            return self._flush()
        if len(self._pending) >= MAX_PENDING_REQUESTS:
            self._out.append(Rejected(request_id, "Overloaded", "too many pending requests"))
            return self._flush()
        self._out.append(Persist(((f"pending/{request_id}", request),)))
        self._pending[request_id] = _Pending(request, now_ms, now_ms + self.config.request_timeout_ms, 0, True)
        self._enqueue(request_id)
        if self._in_view_change:
            # No leader to forward to: tell everyone, so whichever view the others are
            # in orders it (we may be alone in this view change).
            self._pending[request_id].stage = 1
            self._send(RequestMsg(request_id, request))
        elif self.is_leader:
            self._propose(now_ms, partial=False)
        else:
            self._send(RequestMsg(request_id, request), self.leader)
        return self._flush()

    def receive(self, sender: str, data: bytes, now_ms: int) -> list[Action]:
        self._now = now_ms
        if sender not in self.keyring or sender == self.node_id:
            self._count("unknown_sender")
            return self._flush()
        try:
            msg = decode(data)
        except DecodeError:
            self._count("malformed")
            return self._flush()
        if msg.cluster_id != self._cid:
            self._count("wrong_cluster")
            return self._flush()
        # A new-view is a self-contained proof and may be relayed (answer to fetch-view).
        if msg.signer != sender and msg.kind != NEW_VIEW:
            self._count("signer_mismatch")
            return self._flush()
        if msg.kind in SIGNED_KINDS and not self._signature_holds(msg):
            self._count("bad_signature")
            self._count(f"bad_signature_from/{sender}")
            return self._flush()
        self._heard[sender] = now_ms
        handler = self._handlers().get(msg.kind)
        if handler is not None:
            handler(msg, sender)
        return self._flush()

    def set_wall_offset(self, offset_ms: int) -> None:
        """Timers run on the ``now_ms`` each call passes; agreed times are wall-clock
        times (time proofs are checked against them). A driver that passes a steady
        clock, so that a stepped wall clock neither stalls timers nor fires them early,
        says here how far the wall clock is from it. 0 (the default): ``now_ms`` is the
        wall clock."""
        self._wall_offset_ms = offset_ms

    def _signature_holds(self, msg: Message) -> bool:
        """``verify``, skipped for signed bytes that passed it lately (VERIFIED_CACHE_*)."""
        raw = msg.raw
        cacheable = len(raw) <= VERIFIED_CACHE_MAX_WIRE  # hashing a large pre-prepare: ~0.3 ms per MiB
        if cacheable and raw in self._verified:
            self._count("verified_before")
            return True
        if not verify(msg, self.keyring, self._cid):
            return False
        if cacheable:
            self._verified[raw] = None
            if len(self._verified) > VERIFIED_CACHE_ENTRIES:
                del self._verified[next(iter(self._verified))]
        return True

    def propose(self, now_ms: int) -> list[Action]:
        """Close a due partial batch now. ``submit``/``receive`` only ever propose full
        batches, so that every request arriving in one burst of events lands in the same
        batch; a driver calls this once after each burst (the node: once per event-loop
        pass). ``tick`` does it too, so drivers that never call it lose nothing but latency."""
        self._now = now_ms
        if self.is_leader:
            self._propose(now_ms)
        return self._flush()

    def batch_deadline_ms(self) -> int | None:
        """When the waiting partial batch becomes due (``propose`` would send it), or
        None: not the leader, nothing waiting, or a full window. A driver arms a timer
        for it, so a batch goes out when due rather than at the next coarse ``tick``."""
        if not self.is_leader or self._transfer is not None:
            return None
        if self._withheld(self._view, self._next_seq):
            return None  # nothing goes out below the vote floor: no timer to spin on
        if self._window_full():
            return None  # execution moves the window; the driver proposes after each pass
        waiting = self._unproposed()
        if not waiting:
            return None
        return self._partial_due_ms(self._pending[next(iter(waiting))].arrived_ms)

    def _window_full(self) -> bool:
        cfg = self.config
        return self._next_seq > min(self._last_executed + cfg.window, self._stable.seq + cfg.log_size)

    def _partial_due_ms(self, oldest_arrived_ms: int) -> int:
        """When a partial batch may go out: ``batch_max_delay_ms`` after its oldest
        request arrived while fewer than ``max_partial_in_flight`` batches are proposed
        but not executed, else (also) ``batch_max_wait_ms`` after it. The one rule for
        ``_propose_loop`` and for the driver's timer (``batch_deadline_ms``)."""
        cfg = self.config
        in_progress = self._next_seq - 1 - self._last_executed
        if in_progress < cfg.max_partial_in_flight:
            return oldest_arrived_ms + cfg.batch_max_delay_ms
        return oldest_arrived_ms + max(cfg.batch_max_delay_ms, cfg.batch_max_wait_ms)

    def tick(self, now_ms: int) -> list[Action]:
        self._now = now_ms
        if self.is_leader:
            self._propose(now_ms)
        self._check_request_timers(now_ms)
        if self._in_view_change and now_ms >= self._vc_deadline:
            self._view_change_timer_expired()
        if self.keyring.n > 1:  # a lone validator has no one to catch up from or re-send to
            self._maybe_fetch(now_ms)
            self._retry_result_votes(now_ms)
            self._fetch_missing_results(now_ms)
            self._fetch_missing_bodies(now_ms)
            self._retransmit_votes(now_ms)
            self._resend_checkpoint_votes(now_ms)
        return self._flush()

    # ------------------------------------------------------------------ plumbing

    def _flush(self) -> list[Action]:
        out, self._out = self._out, []
        return out

    def _count(self, name: str, by: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + by

    def _handlers(self) -> dict[str, Any]:
        return {
            PRE_PREPARE: self._on_preprepare, PREPARE: self._on_prepare, COMMIT: self._on_commit,
            RESULT_VOTE: self._on_result_vote, CHECKPOINT: self._on_checkpoint, VIEW_CHANGE: self._on_view_change,
            NEW_VIEW: self._on_new_view, REQUEST: self._on_request, FETCH_STATE: self._on_fetch_state,
            STATE: self._on_state, FETCH_BATCHES: self._on_fetch_batches, BATCHES: self._on_batches,
            FETCH_VIEW: self._on_fetch_view, FETCH_RESULTS: self._on_fetch_results, RESULTS: self._on_results,
            FETCH_BODY: self._on_fetch_body, BODY: self._on_body,
        }

    def _wire(self, payload: Any) -> bytes:
        return encode(self._cid, self.node_id, payload, self.key.sign)

    def _send(self, payload: Any, to: str | None = None) -> bytes:
        wire = self._wire(payload)
        self._out.append(Send(wire, to))
        return wire

    def _may_answer(self, peer: str) -> bool:
        """Whether ``peer``'s fetch budget allows another answer (see ANSWER_BYTES_PER_S).
        An answer is charged after it is built (``_answer``), so the budget may go below
        zero by one reply; nothing more goes out until it refills above zero."""
        left, at = self._answer_budget.get(peer, (ANSWER_BURST_BYTES, self._now))
        refill = max(0, self._now - at) * ANSWER_BYTES_PER_S // 1000
        left = min(ANSWER_BURST_BYTES, left + refill)
        self._answer_budget[peer] = (left, max(at, self._now))
        if left <= 0:
            self._count("answers_limited")
            return False
        return True

    def _answer(self, answer: Any, peer: str) -> None:
        """Send an answer to a fetch (a payload, or signed bytes kept from before) and
        charge it to the peer's budget; call after ``_may_answer``."""
        wire = answer if isinstance(answer, bytes) else self._wire(answer)
        self._out.append(Send(wire, peer))
        left, at = self._answer_budget[peer]
        self._answer_budget[peer] = (left - len(wire), at)

    def _peers(self) -> tuple[str, ...]:
        return tuple(n for n in self.keyring.node_ids if n != self.node_id)

    def _next_peer(self, among: tuple[str, ...] | None = None) -> str:
        peers = tuple(p for p in (among or self._peers()) if p != self.node_id) or self._peers()
        self._peer_cursor += 1
        return peers[self._peer_cursor % len(peers)]

    def _slot(self, seq: int) -> Slot:
        slot = self._slots.get(seq)
        if slot is None:
            slot = self._slots[seq] = Slot(seq)
        return slot

    def _in_window(self, seq: int) -> bool:
        return self._stable.seq < seq <= self._stable.seq + self.config.log_size

    def _note_ahead(self, seq: int, sender: str | None = None) -> None:
        """A message for ``seq`` says we may be behind. ``sender`` None: a quorum proof
        says so. The claim's lifetime (see _maybe_fetch) starts afresh only once f+1
        validators claimed (so at least one honest one): one Byzantine peer repeating
        made-up seqs cannot keep us fetching."""
        if seq > self._ahead_seq:
            self._ahead_seq = seq
        if seq <= self._last_executed:
            return
        if sender is not None:
            self._claimants.add(sender)
        if sender is None or len(self._claimants) > self.keyring.f:
            self._behind_since_ms = self._now
            self._claimants.clear()

    # ------------------------------------------------------------------ requests

    def _on_request(self, msg: Message, sender: str) -> None:
        p: RequestMsg = msg.payload  # type: ignore[assignment]
        if len(p.request) > self.config.max_request_bytes:
            self._count("request_too_large")
            return
        if p.request_id in self._executed:
            return
        pending = self._pending.get(p.request_id)
        if pending is None:
            if len(self._pending) >= MAX_PENDING_REQUESTS:
                self._count("pending_overflow")
                return
            used = self._relayed.setdefault(sender, [0, 0])
            if used[0] >= MAX_PENDING_REQUESTS // self.keyring.n or used[1] + len(p.request) > RELAYED_BYTES_PER_PEER:
                self._count("relayed_over_quota")
                return
            used[0] += 1
            used[1] += len(p.request)
            # A relayed request starts our own timer: if the leader does not order it we
            # vote to replace the leader (PBFT's defence against a censoring primary).
            self._pending[p.request_id] = _Pending(p.request, self._now, self._now + self.config.request_timeout_ms, 1, False,
                                                   origin=sender)
            self._enqueue(p.request_id)
            if not self._in_view_change and not self.is_leader and sender != self.leader:
                self._send(RequestMsg(p.request_id, p.request), self.leader)
            pending = self._pending[p.request_id]
        if sender != self.leader and sender not in pending.told_by:
            pending.told_by.add(sender)  # it times the leader on this request too
            if (len(pending.told_by) == self.keyring.f and pending.stage == 1 and not self._in_view_change
                    and pending.origin in ("", self.leader)):
                # The evidence a request only we had told about waits for (see
                # _check_request_timers): look again at the next tick, not a timeout later.
                pending.deadline_ms = min(pending.deadline_ms, self._now)
        if self.is_leader:
            self._propose(self._now, partial=False)

    def _drop_pending(self, rid: str) -> _Pending | None:
        """Forget a pending request (executed, expired or covered by a checkpoint) and
        give its bytes back to the quota of the peer that relayed it."""
        pending = self._pending.pop(rid, None)
        if pending is not None and pending.origin:
            used = self._relayed[pending.origin]
            used[0] -= 1
            used[1] -= len(pending.request)
        return pending

    def _check_request_timers(self, now: int) -> None:
        if self.is_leader:
            return
        suspect = deferred = False
        timeout = self.config.request_timeout_ms
        # Executing batches, or behind others that are (back from a partition, our
        # requests may sit in the batches we still fetch): either way, not stalled.
        behind = self._ahead_seq > self._last_executed or self._transfer is not None
        leader_progressing = (now - self._last_progress_ms < timeout or behind) and not self._in_view_change
        connected: bool | None = None  # _heard_from_enough(now), worked out once if needed
        for rid, p in self._pending.items():
            if rid in self._executed or now < p.deadline_ms:
                continue
            if leader_progressing and p.extensions < MAX_TIMER_EXTENSIONS:
                # Batches keep executing: the leader is busy, not faulty. Under overload,
                # suspecting it would trade a queue for a view change storm. A leader that
                # orders others' requests but censors this one runs out of extensions.
                p.extensions += 1
                p.deadline_ms = now + timeout
                continue
            if connected is None:
                connected = self._heard_from_enough(now)
            if p.stage == 1 and not self._in_view_change:
                # Suspect only with evidence that f others time the leader on this
                # request too (f+1 askers: enough for the join rule). Either f followers
                # told us of it, or one did (everybody got that telling) and we hear f
                # others. A request that only we told about is never enough: on a
                # one-way link we hear the others while our tellings never reach them.
                told_us = p.origin not in ("", self.leader)
                if (told_us and connected and not p.tellings_owed) or len(p.told_by) >= self.keyring.f:
                    suspect = True
                    continue
                deferred = True
            # Tell everybody and wait another timeout: the first time, so the others
            # time the leader too; again while we are in a view change, or when we were
            # cut off at the last telling (see below). Hearing no one may also mean an
            # idle cluster: then the others' tellings reach us meanwhile, and the view
            # change comes one timeout later than it would have.
            p.stage = 1
            p.deadline_ms = now + timeout
            p.tellings_owed = max(0, p.tellings_owed - 1) if connected else CUT_OFF_TELLINGS
            self._send(RequestMsg(rid, p.request))
        if suspect:
            self._count("request_timeouts")
            self._start_view_change(self._view + 1)
        elif deferred:
            # No sign that f others time the leader on it: we were cut off (hearing
            # fewer than f others) now or at the last telling, or the others may never
            # have got our tellings (a one-way link). At most f validators could ask
            # with us, too few for the join rule to pull the rest along. After the
            # links come back we would sit in a view change alone, voting in no view,
            # until the others changed view for a reason of their own (Raft's pre-vote
            # reasoning). Stay in the view and keep telling everyone: once the links
            # are back the leader orders the requests.
            self._count("view_changes_deferred")

    def _heard_from_enough(self, now: int) -> bool:
        """Whether f other followers sent us a message that passed our checks lately:
        with us, f+1 could then ask for the view, enough for the join rule. The leader
        does not count: it never asks to replace itself."""
        since = now - self.config.request_timeout_ms * HEARD_WINDOW_NUM // HEARD_WINDOW_DEN
        leader = self.leader
        return sum(1 for peer, at in self._heard.items() if at >= since and peer != leader) >= self.keyring.f

    # ------------------------------------------------------------------ ordering: leader

    # The unproposed queue: pending request ids that are neither in flight nor executed,
    # in pending (arrival) order, with their total size. Kept incrementally so proposing
    # is O(batch), not O(pending); rebuilt (rarely: view change, state transfer) when
    # in-flight ids are released without being executed.

    def _enqueue(self, rid: str) -> None:
        if rid not in self._queue and rid not in self._in_flight and rid not in self._executed:
            self._queue[rid] = None
            self._queue_bytes += len(self._pending[rid].request) + len(rid)

    def _dequeue(self, rid: str) -> None:
        if rid in self._queue:
            del self._queue[rid]
            self._queue_bytes -= len(self._pending[rid].request) + len(rid)

    def _unproposed(self) -> dict[str, None]:
        if self._queue_dirty:
            self._queue_dirty = False
            self._queue = {rid: None for rid in self._pending if rid not in self._in_flight and rid not in self._executed}
            self._queue_bytes = sum(len(self._pending[rid].request) + len(rid) for rid in self._queue)
        return self._queue

    def _release_in_flight(self, rid: str, seq: int) -> None:
        """A proposal was dropped (view change): its requests may be proposed again."""
        if self._in_flight.get(rid) == seq:
            del self._in_flight[rid]
            self._queue_dirty = True

    def _propose(self, now: int, partial: bool = True) -> None:
        """Adaptive batching. A full batch goes out whenever the window has room. A
        partial one only once its oldest request waited ``batch_max_delay_ms`` AND fewer
        than ``max_partial_in_flight`` batches are proposed but not executed — so under
        load batches grow while earlier ones execute, instead of many tiny batches that
        each cost ~3 signatures per node — or once that request waited
        ``batch_max_wait_ms`` (latency bound, e.g. while execution stalls)."""
        if self._proposing:
            return  # re-entered through execution (n = 1): the outer loop carries on
        self._proposing = True
        try:
            self._propose_loop(now, partial)
        finally:
            self._proposing = False

    def _propose_loop(self, now: int, partial: bool) -> None:
        cfg = self.config
        while self.is_leader:
            if self._window_full():
                return
            if self._transfer is not None:
                return
            waiting = self._unproposed()
            if not waiting:
                return
            full = len(waiting) >= cfg.batch_max_requests or self._queue_bytes >= MAX_BATCH_BYTES
            if not full and (not partial or now < self._partial_due_ms(self._pending[next(iter(waiting))].arrived_ms)):
                return
            batch: list[tuple[str, bytes]] = []
            size = 0
            for rid in waiting:
                if len(batch) >= cfg.batch_max_requests:
                    break
                req = self._pending[rid].request
                if batch and size + len(req) + len(rid) > MAX_BATCH_BYTES:
                    break
                batch.append((rid, req))
                size += len(req) + len(rid)
            seq = self._next_seq
            if self._withheld(self._view, seq):
                return  # we may have proposed another batch here before the store forgot it
            prev = self._slots.get(seq - 1)
            if seq - 1 > self._last_executed and (prev is None or not prev.has_batch):
                # A new view re-proposed seq-1 and its body is still on its way: its agreed
                # time is unknown. Followers that hold it refuse an earlier time here, so
                # a guess could leave this batch short of a quorum for good.
                return
            # The floor followers check (_on_preprepare): an empty batch sets no time.
            prev_time = prev.agreed_time_ms if prev is not None and prev.requests else self._last_time_ms
            agreed = max(prev_time + 1, now + self._wall_offset_ms)
            requests = tuple(batch)
            pp = PrePrepare(self._view, seq, agreed, requests, batch_digest(agreed, requests))
            if not self._may_vote(PRE_PREPARE, seq, self._view, pp.digest):
                self._next_seq += 1
                continue
            # Start the prechecks before signing: the signature (~1 ms, GIL released)
            # then overlaps with them instead of delaying them.
            self._prefetch(requests)
            # Sign the small header only: the digest binds the requests (FACTS.md: the
            # ML-DSA cost grows with the bytes signed; batches can be ~1 MB). A lone
            # validator signs none: no peer reads its order vote, and the result vote
            # clients check is signed, so it signs once per batch (DESIGN.md), not twice.
            signature = b"" if self._lone else self.key.sign(
                preprepare_header_bytes(self._cid, self._view, seq, agreed, pp.digest))
            wire = encode_signed(self._cid, self.node_id, pp, signature)
            self._record_vote(PRE_PREPARE, seq, self._view, pp.digest, wire, (agreed, requests), signature)
            self._out.append(Send(wire))
            self._next_seq += 1
            self._accept_batch(seq, self._view, agreed, requests, pp.digest, signature)

    # ------------------------------------------------------------------ ordering: votes

    def _may_vote(self, kind: str, seq: int, view: int, digest: bytes) -> bool:
        """Never sign two different values for one (kind, view, seq) — even across a crash,
        and even after the store forgot (the vote floor)."""
        own = self._own_votes.get((kind, seq))
        if own is not None and own[0] == view:
            if own[1] != digest:
                self._count("refused_equivocation")
                return False
            return True  # the very vote we cast: re-sending its bytes is always safe
        if self._withheld(view, seq):
            self._count("votes_withheld")
            return False
        return True

    # ------------------------------------------------------------------ vote floor

    def _set_vote_floor(self, bound: tuple[int, int]) -> None:
        """The store remembers less than ``bound`` (see ``vote_floor``)."""
        self._vote_floor = bound
        self._signed_view = max(self._signed_view, bound[0])
        self._signed_seq = max(self._signed_seq, bound[1])
        self._count("vote_floor_set")
        self._maybe_lift_floor()

    def _withheld(self, view: int, seq: int) -> bool:
        """An order vote we may have cast, or promised not to cast, before the store
        forgot: any slot at or below the floor seq in a view up to the floor view, and
        every slot of an earlier view (our view-change for the floor view promised to
        take part in none of them any more)."""
        floor = self._vote_floor
        return floor is not None and (view < floor[0] or (view == floor[0] and seq <= floor[1]))

    def _may_sign_view_change(self, target: int) -> bool:
        """Below the floor seq a view-change would omit prepared certificates we forgot;
        from there on the stable checkpoint covers every slot we could have voted on."""
        floor = self._vote_floor
        return floor is None or self._stable.seq >= floor[1]

    def _maybe_lift_floor(self) -> None:
        floor = self._vote_floor
        if floor is not None and self._stable.seq >= floor[1] and self._view >= floor[0]:
            self._vote_floor = None
            self._count("vote_floor_lifted")

    def _note_signed(self, view: int, seq: int = 0) -> None:
        if view > self._signed_view:
            self._signed_view = view
        if seq > self._signed_seq:
            self._signed_seq = seq

    def _record_vote(self, kind: str, seq: int, view: int, digest: bytes, wire: bytes,
                     body: tuple[int, Batch] | None = None, header_signature: bytes | None = None) -> None:
        """``body`` = (agreed time, requests) of the batch voted for: persisted with the
        vote, so after a crash we still hold every batch we endorsed (a new view may
        re-propose it by digest, and peers fetch it from its endorsers). Our own
        pre-prepare is stored as a small record (``header_signature``) next to the
        batch's bytes and rebuilt on recovery (its wire is a deterministic encoding)."""
        self._own_votes[(kind, seq)] = (view, digest, wire)
        self._note_signed(view, seq)
        self._persisted["vote"].add(seq)
        records = []
        if body is not None:
            self._keep_body(self._slot(seq), digest, body)
            records = self._batch_records(seq, digest, body[0], body[1])
        if header_signature is None:
            records.append((f"vote/{kind}/{seq:016d}", wire))
        else:
            assert body is not None
            records.append((f"vote/{kind}/{seq:016d}",
                            canonical_pack([OWN_PREPREPARE_TAG, view, body[0], digest, header_signature])))
        self._out.append(Persist(tuple(records)))

    def _keep_body(self, slot: Slot, digest: bytes, body: tuple[int, Batch]) -> None:
        """Remember a batch we endorsed (see Slot.bodies), newest last. Past
        MAX_BODIES_PER_SLOT the oldest goes, never the slot's current batch nor its
        prepared certificate's: a Byzantine leader gets us to endorse one batch per view
        it leads, and views can rotate for long without a checkpoint."""
        slot.bodies.pop(digest, None)
        slot.bodies[digest] = body
        keep = {slot.digest, slot.prepared_cert.digest if slot.prepared_cert is not None else None, digest}
        for old in [d for d in slot.bodies if d not in keep][: max(0, len(slot.bodies) - MAX_BODIES_PER_SLOT)]:
            del slot.bodies[old]

    def _batch_records(self, seq: int, digest: bytes, agreed: int, requests: Batch) -> list[tuple[str, bytes | None]]:
        """The batch's bytes, unless already persisted: put first in the same ``Persist``
        as the record that refers to it, so no crash can keep the reference alone."""
        known = self._persisted_batches.setdefault(seq, set())
        if digest in known:
            return []
        known.add(digest)
        return [(_batch_key(seq, digest), canonical_pack([agreed, [[r, q] for r, q in requests]]))]

    def _certificate_record(self, kind: str, view: int, seq: int, agreed: int, requests: Batch, digest: bytes,
                            wires: tuple[bytes, ...]) -> Persist:
        """prepared/<seq> or committed/<seq> = [view, seq, agreed, batch digest, vote wires]."""
        records = self._batch_records(seq, digest, agreed, requests)
        records.append((_key(kind, seq), canonical_pack([view, seq, agreed, digest, list(wires)])))
        self._persisted[kind].add(seq)
        return Persist(tuple(records))

    def _vote(self, kind: str, seq: int, view: int, digest: bytes) -> bool:
        if not self._may_vote(kind, seq, view, digest):
            return False
        own = self._own_votes.get((kind, seq))
        if own is not None and own[0] == view:
            wire = own[2]  # already signed (e.g. before a restart): resend the same bytes
            self._out.append(Send(wire))
        else:
            body = None
            if kind == PREPARE:
                slot = self._slot(seq)
                signed = slot.view == view and slot.digest == digest
                payload: Any = Prepare(view, seq, digest, slot.agreed_time_ms if signed else 0,
                                       slot.leader_signature if signed else b"")
                body = slot.body(digest)
            else:
                payload = Commit(view, seq, digest)
            wire = self._wire(payload)
            self._record_vote(kind, seq, view, digest, wire, body)
            self._out.append(Send(wire))
        slot = self._slot(seq)
        table = slot.prepares if kind == PREPARE else slot.commits
        slot.votes(table, view).add(self.node_id, digest, wire)
        return True

    def _place_batch(self, slot: Slot, view: int, digest: bytes, agreed: int, requests: Batch,
                     leader_signature: bytes) -> None:
        """Put a (possibly re-)proposed batch into its slot: the requests of a batch it
        replaces become proposable again, the re-send back-off starts afresh in the new
        view, and the new batch's requests are in flight."""
        if slot.view != view:
            if slot.has_batch:
                for rid, _ in slot.requests:
                    self._release_in_flight(rid, slot.seq)
            slot.retries, slot.retry_at_ms = 0, 0
        slot.view, slot.digest, slot.agreed_time_ms, slot.requests = view, digest, agreed, requests
        slot.leader_signature = leader_signature
        slot.awaiting = None
        if slot.seq > self._last_executed:
            for rid, _ in requests:
                self._in_flight[rid] = slot.seq
                self._dequeue(rid)
            self._prefetch(requests)

    def _accept_batch(self, seq: int, view: int, agreed: int, requests: Batch, digest: bytes, leader_signature: bytes) -> None:
        slot = self._slot(seq)
        self._place_batch(slot, view, digest, agreed, requests, leader_signature)
        leader = self._leader_of(view)
        # Classic PBFT: the leader's signed pre-prepare is its prepare, so it signs no
        # separate one (re-proposals of a new view carry no header: everyone prepares).
        # A lone validator's own pre-prepare is its prepare unsigned (see _propose_loop).
        counted = bool(leader_signature) or self._lone
        if counted:
            self._count_leader_prepare(slot, view, leader, leader_signature)
        if (leader != self.node_id or not counted) and slot.sent_prepare < view \
                and self._vote(PREPARE, seq, view, digest):
            slot.sent_prepare = view
        self._check_prepared(slot)

    def _count_leader_prepare(self, slot: Slot, view: int, leader: str, leader_signature: bytes) -> None:
        """Count the accepted pre-prepare's signed header as the leader's prepare (its
        wire then stands for the leader in the prepared certificate)."""
        assert slot.digest is not None
        header = preprepare_header_wire(self._cid, leader, view, slot.seq, slot.agreed_time_ms, slot.digest,
                                        leader_signature)
        if slot.votes(slot.prepares, view).add(leader, slot.digest, header) is not None:
            # The leader also sent a prepare for another batch. Evidence pairs messages of
            # one kind: the header it carries was compared in _check_leader_headers.
            self._count("leader_prepare_conflict")

    def _on_preprepare(self, msg: Message, sender: str) -> None:
        pp: PrePrepare = msg.payload  # type: ignore[assignment]
        cfg = self.config
        slot_known = self._slots.get(pp.seq)
        if slot_known is not None and sender == self._leader_of(pp.view):
            first = slot_known.preprepares.get(pp.view)
            if first is not None and first[0] != pp.digest:
                self._evidence(sender, EQUIVOCATION, pp.seq, pp.view, (first[1], _header_wire(msg)),
                               "two pre-prepares for one slot")
                return
        if pp.view != self._view or self._in_view_change:
            self._note_higher_view(pp.view, sender)
            self._help_stale(pp.view, sender)
            self._count("stale_or_future_view")
            return
        if sender != self.leader:
            self._count("not_leader")
            return
        if not self._in_window(pp.seq):
            if pp.seq > self._stable.seq:
                self._note_ahead(pp.seq, sender)
            self._count("out_of_window")
            return
        if batch_digest(pp.agreed_time_ms, pp.requests) != pp.digest:
            self._count("bad_digest")
            return
        if len(pp.requests) > cfg.batch_max_requests or any(len(q) > cfg.max_request_bytes for _, q in pp.requests):
            self._count("batch_too_large")
            return
        slot = self._slot(pp.seq)
        if pp.view not in slot.preprepares:
            slot.preprepares[pp.view] = (pp.digest, _header_wire(msg))
            # Prepares may have overtaken the pre-prepare: do they carry another header?
            self._check_leader_headers(slot, pp.view)
        if pp.seq <= self._last_executed or (slot.has_batch and slot.view == pp.view):
            return
        if pp.seq <= self._plan_top:
            # The new-view decided this seq (its batch may still be on its way to us:
            # Slot.awaiting); a pre-prepare there is the leader overriding its own plan.
            self._count("preprepare_in_reproposed_range")
            return
        prev = self._slots.get(pp.seq - 1)
        prev_time = prev.agreed_time_ms if prev is not None and prev.has_batch and prev.requests else self._last_time_ms
        if pp.agreed_time_ms < prev_time or abs(pp.agreed_time_ms - (self._now + self._wall_offset_ms)) > cfg.max_clock_skew_ms:
            self._count("bad_time")
            return
        self._accept_batch(pp.seq, pp.view, pp.agreed_time_ms, pp.requests, pp.digest, msg.signature)

    def _on_prepare(self, msg: Message, sender: str) -> None:
        self._on_order_vote(msg, sender, PREPARE)

    def _on_commit(self, msg: Message, sender: str) -> None:
        self._on_order_vote(msg, sender, COMMIT)

    def _on_order_vote(self, msg: Message, sender: str, kind: str) -> None:
        p = msg.payload
        if p.seq <= self._stable.seq:  # type: ignore[union-attr]
            return
        if not self._in_window(p.seq):  # type: ignore[union-attr]
            self._note_ahead(p.seq, sender)  # type: ignore[union-attr]
            self._count("out_of_window")
            return
        if p.view > self._view:  # type: ignore[union-attr]
            self._note_higher_view(p.view, sender)  # type: ignore[union-attr]
        self._help_stale(p.view, sender)  # type: ignore[union-attr]
        if not self._view - 1 <= p.view <= self._view + MAX_VIEW_LEAP:  # type: ignore[union-attr]
            return
        slot = self._slot(p.seq)  # type: ignore[union-attr]
        table = slot.prepares if kind == PREPARE else slot.commits
        votes = slot.votes(table, p.view)  # type: ignore[union-attr]
        first_from_sender = sender not in votes.first
        earlier = votes.add(sender, p.digest, msg.raw)  # type: ignore[union-attr]
        if earlier is not None and kind == PREPARE and sender == self._leader_of(p.view) \
                and decode(earlier).kind == PRE_PREPARE:  # type: ignore[union-attr]
            # The leader's pre-prepare counts as its prepare; a prepare of it for another
            # batch is evidence through the header it carries (one kind per evidence).
            self._count("leader_prepare_conflict")
            self._check_leader_header(slot, p)  # type: ignore[arg-type]
            return
        if earlier is not None:
            self._evidence(sender, EQUIVOCATION, p.seq, p.view, (earlier, msg.raw), f"two {kind}s for one slot")  # type: ignore[union-attr]
            return
        if kind == PREPARE and first_from_sender:
            self._check_leader_header(slot, p)  # type: ignore[arg-type]
        self._note_ahead(p.seq, sender)  # type: ignore[union-attr]
        if kind == PREPARE:
            self._check_prepared(slot)
        else:
            self._check_committed(slot)

    def _check_leader_header(self, slot: Slot, p: Prepare) -> bool:
        """A prepare carries the leader's signed header of the pre-prepare it prepares.
        If its digest differs from the pre-prepare we saw for that (view, seq), and the
        leader's signature holds, the leader signed two headers for one slot: evidence.
        Costs one verification, and only when the digests differ."""
        held = slot.preprepares.get(p.view)
        if held is None or held[0] == p.digest or not p.leader_signature:
            return False
        leader = self._leader_of(p.view)
        if (leader, EQUIVOCATION, slot.seq, p.view) in self._evidence_seen:
            return True
        header = preprepare_header_bytes(self._cid, p.view, slot.seq, p.agreed_time_ms, p.digest)
        if not self.keyring.verify(leader, header, p.leader_signature):
            self._count("bad_leader_signature")
            return False
        other = preprepare_header_wire(self._cid, leader, p.view, slot.seq, p.agreed_time_ms, p.digest, p.leader_signature)
        self._evidence(leader, EQUIVOCATION, slot.seq, p.view, (held[1], other),
                       "leader signed two pre-prepare headers for one slot (one carried by a prepare)")
        return True

    def _check_leader_headers(self, slot: Slot, view: int) -> None:
        votes = slot.prepares.get(view)
        held = slot.preprepares.get(view)
        if votes is None or held is None:
            return
        for digest, wires in list(votes.by_value.items()):
            if digest == held[0]:
                continue
            for wire in wires.values():
                try:
                    p = decode(wire).payload
                except DecodeError:
                    continue
                if isinstance(p, Prepare) and self._check_leader_header(slot, p):
                    return

    def _check_prepared(self, slot: Slot) -> None:
        if not slot.has_batch or slot.view != self._view or self._in_view_change:
            return
        votes = slot.prepares.get(slot.view)
        if votes is None or votes.count(slot.digest) < self.keyring.quorum:  # type: ignore[arg-type]
            return
        if slot.prepared_cert is None or slot.prepared_cert.view < slot.view:
            slot.prepared_cert = PreparedCert(slot.view, slot.seq, slot.digest,  # type: ignore[arg-type]
                                              votes.wires(slot.digest, self.keyring))  # type: ignore[arg-type]
            cert = slot.prepared_cert
            self._out.append(self._certificate_record("prepared", cert.view, cert.seq, slot.agreed_time_ms, slot.requests,
                                                      cert.digest, cert.prepares))
        if slot.sent_commit < slot.view:
            if self.keyring.n == 1:
                # A lone validator's signed order vote is already a quorum of commits (1
                # of 1): a commit would be a second signature that no peer ever reads.
                own = slot.prepared_cert.prepares[0]
                slot.votes(slot.commits, slot.view).add(self.node_id, slot.digest, own)  # type: ignore[arg-type]
                slot.sent_commit = slot.view
            elif self._vote(COMMIT, slot.seq, slot.view, slot.digest):  # type: ignore[arg-type]
                slot.sent_commit = slot.view
        self._check_committed(slot)

    def _check_committed(self, slot: Slot) -> None:
        if slot.committed or not slot.has_batch:
            return
        if slot.prepared_cert is None or slot.prepared_cert.view != slot.view:
            return
        votes = slot.commits.get(slot.view)
        if votes is None or votes.count(slot.digest) < self.keyring.quorum:  # type: ignore[arg-type]
            return
        cert = CommittedBatch(slot.view, slot.seq, slot.agreed_time_ms, slot.requests,
                              votes.wires(slot.digest, self.keyring))  # type: ignore[arg-type]
        self._mark_committed(slot, cert)
        self._execute_ready()

    def _mark_committed(self, slot: Slot, cert: CommittedBatch) -> None:
        slot.commit_cert = cert
        if slot.seq > self._last_executed:
            assert slot.digest is not None  # both callers set the slot to the certificate's batch
            self._out.append(self._certificate_record("committed", cert.view, cert.seq, cert.agreed_time_ms,
                                                      cert.requests, slot.digest, cert.commits))

    # ------------------------------------------------------------------ execution

    def _execute_ready(self) -> None:
        executed = False
        while True:
            slot = self._slots.get(self._last_executed + 1)
            if slot is None or slot.commit_cert is None:
                break
            cert = slot.commit_cert
            self._execute(cert.seq, cert.view, cert.agreed_time_ms, cert.requests)
            executed = True
        if executed and self.is_leader:
            # The window moved: full batches go out now; a partial one at the end of the
            # driver's burst of events (propose) or the next tick.
            self._propose(self._now, partial=False)

    def _prefetch(self, requests: Batch) -> None:
        """Optional app hook: start pure, stateless work early (validation.py)."""
        if self._app_prefetch is not None:
            self._app_prefetch([q for _, q in requests])

    def _execute(self, seq: int, view: int, agreed: int, requests: Batch) -> None:
        # Batches that arrive committed (catch-up) were never accepted: prefetch here, in
        # one go, before the expiry checks below ask for request times one by one.
        self._prefetch(requests)
        effective = max(agreed, self._last_time_ms)
        fresh: list[tuple[str, bytes]] = []
        expired: list[str] = []
        seen: set[str] = set()
        for rid, req in requests:
            if rid in self._executed or rid in seen:
                continue  # duplicates (across or within batches) are skipped everywhere alike
            seen.add(rid)
            if self._expired(req, effective):
                expired.append(rid)
            else:
                fresh.append((rid, req))
        results: list[bytes] = []
        if fresh:
            results = list(self.app.execute_batch(seq, [q for _, q in fresh], effective))
            if len(results) != len(fresh):
                raise RuntimeError(f"application returned {len(results)} results for {len(fresh)} requests")
            self._last_time_ms = effective
            self._executed_time[seq] = effective
        deletes: list[tuple[str, bytes | None]] = []
        for rid, _ in requests:
            self._in_flight.pop(rid, None)
        for rid, _ in fresh:
            if rid in self._queue:
                self._dequeue(rid)
            self._executed[rid] = seq
            pending = self._drop_pending(rid)
            if pending is not None and pending.local:
                deletes.append((f"pending/{rid}", None))
        for rid in expired:
            self._count("expired")
            if rid in self._queue:
                self._dequeue(rid)
            pending = self._drop_pending(rid)
            if pending is not None and pending.local:
                deletes.append((f"pending/{rid}", None))
                self._out.append(Rejected(rid, "InvalidRequest", (
                    f"request expired: its timestamp is more than {self.config.dedup_window_ms // 2} ms "
                    f"from the agreed time {effective}; send a new request with a fresh time proof")))
        self._last_executed = seq
        self._last_progress_ms = self._now
        if deletes:
            self._out.append(Persist(tuple(deletes)))
        self._out.append(Committed(seq, view, tuple(r for r, _ in fresh), effective))
        if fresh:
            self._make_result_vote(seq, view, fresh, results)
        if seq % self.config.checkpoint_interval == 0:
            self._forget_old_requests(effective)
            self._make_checkpoint(seq)

    def _expired(self, request: bytes, agreed_ms: int) -> bool:
        if self._request_time is None:
            return False
        stamp = self._request_time(request)
        return stamp is not None and abs(stamp - agreed_ms) > self.config.dedup_window_ms // 2

    def _forget_old_requests(self, agreed_ms: int) -> None:
        """At a checkpoint (the same point on every replica): forget request ids whose
        batch executed more than a window ago. Such a request carries a timestamp at most
        half a window after that batch's time, so if it comes again it has expired."""
        if self._request_time is None:
            return
        cutoff = agreed_ms - self.config.dedup_window_ms
        old = {s for s, t in self._executed_time.items() if t < cutoff}
        if not old:
            return
        before = len(self._executed)
        self._executed = {rid: s for rid, s in self._executed.items() if s not in old}
        for s in old:
            del self._executed_time[s]
        self._count("forgotten_request_ids", before - len(self._executed))

    # ------------------------------------------------------------------ results

    def _make_result_vote(self, seq: int, view: int, fresh: list[tuple[str, bytes]], results: list[bytes]) -> None:
        leaves = tuple(result_leaf(rid, res) for (rid, _), res in zip(fresh, results))
        root = merkle.root(list(leaves))
        br = BatchResult(seq, view, tuple(r for r, _ in fresh), tuple(request_digest(q) for _, q in fresh),
                         tuple(results), leaves, root)
        br.retry_at_ms = self._now + self._retry_delay()
        self._results[seq] = br
        wire = self._wire(ResultVote(seq, root))
        sig = decode(wire).signature
        self._out.append(Send(wire))
        br.votes[self.node_id] = (root, sig, wire)
        for signer, vote in self._early_votes.pop(seq, {}).items():
            br.votes.setdefault(signer, vote)
        self._check_final(br)

    def _on_result_vote(self, msg: Message, sender: str) -> None:
        p: ResultVote = msg.payload  # type: ignore[assignment]
        vote = (p.root, msg.signature, msg.raw)
        br = self._results.get(p.seq)
        if br is None:
            if p.seq > self._last_executed and p.seq <= self._last_executed + 2 * self.config.log_size:
                self._early_votes.setdefault(p.seq, {}).setdefault(sender, vote)
            elif self._results_floor() < p.seq <= self._last_executed:
                self._on_foreign_vote(p.seq, sender, vote)
            return
        held = br.votes.get(sender)
        if held is not None:
            if held[2] == msg.raw:
                # The sender re-broadcasts because it is not final yet: it may have
                # missed our vote. Answer it (a few times at most).
                self._answer_vote(br, sender)
                return
            if held[0] != p.root and held[2]:
                self._evidence(sender, EQUIVOCATION, p.seq, 0, (held[2], msg.raw), "two result-votes for one batch")
            return
        br.votes[sender] = vote
        if br.final_count > 0 and self._now - br.final_at_ms >= self._retry_delay():
            # A vote long after we were final: the sender is catching up and has
            # probably missed the votes we all sent back then.
            self._answer_vote(br, sender)
        self._check_final(br)

    def _results_floor(self) -> int:
        """Results of seqs at or below this are no longer kept (nor co-signed)."""
        return self._stable.seq - max(RESULT_RETENTION_BATCHES, RESULT_RETENTION_CHECKPOINTS * self.config.checkpoint_interval)

    def _on_foreign_vote(self, seq: int, sender: str, vote: tuple[bytes, bytes, bytes]) -> None:
        """A result vote for a batch we executed only through a snapshot (state transfer,
        or a restart from a checkpoint past it), so we hold neither its results nor a vote.

        If the replicas that did execute it were cut off before their votes met (a power
        cut), fewer than 2f+1 of them may ever vote, and the results could never become
        final. So once f+1 distinct validators signed one root — at least one of them is
        honest and executed the batch deterministically, so that root is THE root — we
        co-sign it and broadcast our vote, which lets the executors reach 2f+1. We sign at
        most one root per seq. Then we fetch the certified results to answer our clients."""
        fv = self._foreign.get(seq)
        if fv is None:
            fv = self._foreign[seq] = _Foreign({})
        held = fv.votes.get(sender)
        if held is not None:
            if held[2] == vote[2]:
                # A re-broadcast: the sender is not final yet and may have missed our vote.
                if fv.mine:
                    answered = fv.answered if fv.answered is not None else {}
                    fv.answered = answered
                    if answered.get(sender, 0) < MAX_VOTE_RETRIES:
                        answered[sender] = answered.get(sender, 0) + 1
                        self._out.append(Send(fv.mine, sender))
            elif held[0] != vote[0]:
                self._evidence(sender, EQUIVOCATION, seq, 0, (held[2], vote[2]), "two result-votes for one batch")
            return
        fv.votes[sender] = vote
        counts: dict[bytes, int] = {}
        for root, _, _ in fv.votes.values():
            counts[root] = counts.get(root, 0) + 1
        if not fv.mine:
            agreed = [r for r in sorted(counts) if counts[r] >= self.keyring.f + 1]
            if not agreed:
                return
            root = agreed[0]
            wire = self._wire(ResultVote(seq, root))
            fv.mine = wire
            fv.votes[self.node_id] = (root, decode(wire).signature, wire)
            self._count("result_cosigned")
            self._out.append(Send(wire))
            counts[root] += 1
        mine_root = fv.votes[self.node_id][0]
        if counts.get(mine_root, 0) >= self.keyring.quorum and seq not in self._missing_results:
            # Certified now (or soon, at the executors): fetch the results themselves.
            self._missing_results[seq] = None
            self._results_fetch_tries = 0
            self._results_fetch_at = min(self._results_fetch_at, self._now)

    def _fetch_missing_results(self, now: int) -> None:
        """Ask peers (round robin, bounded) for certified results of batches we skipped."""
        if not self._missing_results or now < self._results_fetch_at:
            return
        floor = self._results_floor()
        for s in list(self._missing_results):
            br = self._results.get(s)
            if s <= floor or (br is not None and br.final_count > 0):
                del self._missing_results[s]
        if not self._missing_results or self._results_fetch_tries >= 3 * self.keyring.n:
            self._missing_results.clear()
            return
        self._results_fetch_tries += 1
        self._results_fetch_at = now + self._retry_delay()
        first = min(self._missing_results)
        last = min(max(self._missing_results), first + MAX_BATCHES_PER_REPLY - 1)
        self._send(FetchResults(first, last), self._next_peer())

    def _answer_vote(self, br: BatchResult, peer: str) -> None:
        mine = br.votes.get(self.node_id)
        sent = br.answered.get(peer, 0)
        if mine is not None and mine[2] and sent < MAX_VOTE_RETRIES:
            br.answered[peer] = sent + 1
            self._out.append(Send(mine[2], peer))

    def _retransmit_votes(self, now: int) -> None:
        """Messages get lost (or were sent before the links were up, right after a
        restart). For slots of this view that stay uncommitted, re-send our own
        pre-prepare/prepare/commit — the same signed bytes, so never an equivocation —
        with exponential back-off. Receivers ignore exact duplicates."""
        if self._in_view_change:
            return
        for seq, slot in self._slots.items():
            if slot.committed or not slot.has_batch or slot.view != self._view or now < slot.retry_at_ms:
                continue
            if slot.retry_at_ms == 0:
                slot.retry_at_ms = now + self._retry_delay()
                continue
            slot.retries += 1
            slot.retry_at_ms = now + self._backoff_ms(slot.retries)
            for kind in (PRE_PREPARE, PREPARE, COMMIT):
                own = self._own_votes.get((kind, seq))
                if own is not None and own[0] == self._view and own[2] is not None:
                    self._out.append(Send(own[2]))

    def _resend_checkpoint_votes(self, now: int) -> None:
        """A checkpoint vote is sent once. Were the votes for one seq lost (a link being
        replaced), fewer than 2f+1 would ever meet, no later checkpoint could become
        stable either, the window would fill, and no leader of this view or any later
        one could propose again. So our own vote for every checkpoint not stable yet is
        re-sent (the same signed bytes) with back-off; receivers ignore duplicates."""
        for resend in self._checkpoint_resends.values():
            if now < resend.retry_at_ms:
                continue
            resend.retries += 1
            resend.retry_at_ms = now + self._backoff_ms(resend.retries + 1)
            self._count("checkpoint_votes_resent")
            self._out.append(Send(resend.wire))

    def _retry_delay(self) -> int:
        return max(self.config.request_timeout_ms // 4, 20)

    def _backoff_ms(self, retries: int) -> int:
        """The wait before the next re-send of our own votes: doubling, at most 64 x."""
        return self._retry_delay() * (2 ** min(retries, 6))

    def _retry_result_votes(self, now: int) -> None:
        """Votes can be lost: while a batch is not final here, re-send our own vote
        (identical bytes) with back-off; peers answer with theirs. Once final, a vote
        still missing a while later was probably lost too (a peer's link to us was not
        up yet, and a peer final at its end re-sends nothing): our vote goes to just
        those validators, at most LATE_VOTE_PROBES times, and they answer with theirs,
        so confidence_level counts every validator that agreed."""
        for seq, br in self._results.items():
            if br.retries >= MAX_VOTE_RETRIES or now < br.retry_at_ms:
                continue
            mine = br.votes.get(self.node_id)
            if mine is None:
                continue
            if br.final_count > 0:
                if len(br.votes) >= self.keyring.n or br.retries >= LATE_VOTE_PROBES or not mine[2]:
                    continue  # every vote is in, or we asked enough: nothing to do each tick
                missing = [n for n in self.keyring.node_ids if n not in br.votes]
                if missing:
                    br.retries += 1
                    br.retry_at_ms = now + self._retry_delay() * (2 ** br.retries)
                    self._out.extend(Send(mine[2], n) for n in missing)
                continue
            br.retries += 1
            br.retry_at_ms = now + self._retry_delay() * (2 ** br.retries)
            self._out.append(Send(mine[2]))
            if br.retries >= 2 and seq not in self._missing_results:
                # Peers' votes were probably sent while we could not hear them (we were
                # down, or just restarted and their links to us were stale); they do not
                # re-send votes for batches final at their end. Ask for the certified
                # results as well (merged into ours in _on_results).
                self._missing_results[seq] = None
                self._results_fetch_tries = 0
                self._results_fetch_at = min(self._results_fetch_at, now)

    def _check_final(self, br: BatchResult) -> None:
        counts: dict[bytes, int] = {}
        for root, _, _ in br.votes.values():
            counts[root] = counts.get(root, 0) + 1
        if br.certified_root is None:
            for root in sorted(counts):
                if counts[root] >= self.keyring.quorum:
                    br.certified_root = root
            if br.certified_root is not None and br.certified_root != br.root:
                self._count("local_result_diverged")
        if br.certified_root is not None:
            self._accuse_wrong_results(br)
        agreeing = counts.get(br.root, 0)
        if br.certified_root != br.root or agreeing <= br.final_count:
            return
        late = br.final_count > 0
        if not late:
            br.final_at_ms = self._now
            if br.seq in self._persisted_results:
                self._persisted_results.discard(br.seq)
                self._out.append(Persist(((_key("result", br.seq), None),)))
        br.final_count = agreeing
        sigs = tuple((n, br.votes[n][1]) for n in self.keyring.node_ids if n in br.votes and br.votes[n][0] == br.root)
        leader = self._leader_of(br.view)
        tree = merkle.MerkleTree([merkle.leaf_hash(leaf) for leaf in br.leaves])  # every path in O(n log n)
        for i, rid in enumerate(br.request_ids):
            cert = ResultCertificate(self._cid, br.seq, br.root, len(br.leaves), i, tuple(tree.path(i)), sigs)
            self._out.append(Final(rid, br.request_digests[i], br.results[i], cert, agreeing, self.keyring.n,
                                   leader, br.view, late))

    def _accuse_wrong_results(self, br: BatchResult) -> None:
        root = br.certified_root
        for signer in self.keyring.node_ids:
            vote = br.votes.get(signer)
            if vote is None or vote[0] == root or signer in br.accused:
                continue
            br.accused.add(signer)
            backing = tuple(br.votes[n][2] for n in self.keyring.node_ids
                            if n in br.votes and br.votes[n][0] == root and n != signer)
            if len(backing) >= self.keyring.quorum:
                self._evidence(signer, WRONG_RESULT, br.seq, br.view, (vote[2], *backing), "result root contradicts the certified root")

    # ------------------------------------------------------------------ evidence

    def _evidence(self, accused: str, kind: str, seq: int, view: int, messages: tuple[bytes, ...], detail: str) -> None:
        key = (accused, kind, seq, view)
        if key in self._evidence_seen:
            return
        self._evidence_seen.add(key)
        self.penalties[accused] = self.penalties.get(accused, 0) + 1
        self._count("evidence")
        self._out.append(Evidence(accused, kind, seq, view, messages, detail))

    # ------------------------------------------------------------------ checkpoints

    def _bookkeeping(self) -> list[Any]:
        return [self._last_executed, self._last_time_ms, sorted(self._executed.items()), sorted(self._executed_time.items())]

    def _make_checkpoint(self, seq: int) -> None:
        # Every replica must produce the same bytes: pack_trusted is canonical_pack for
        # these shapes (bytes snapshot, ints, sorted [str, int] / [int, int] pairs).
        blob = pack_trusted([self.app.snapshot(), self._bookkeeping()])
        digest = snapshot_digest(blob)
        self._own_checkpoints[seq] = (digest, blob)
        wire = self._wire(CheckpointVote(seq, digest))
        self._out.append(Send(wire))
        self._checkpoint_resends[seq] = _CheckpointResend(wire, self._now + self._backoff_ms(1))
        self._checkpoint_votes.setdefault(seq, VoteSet()).add(self.node_id, digest, wire)
        self._check_stable(seq)

    def _on_checkpoint(self, msg: Message, sender: str) -> None:
        p: CheckpointVote = msg.payload  # type: ignore[assignment]
        if p.seq <= self._stable.seq:
            return
        if p.seq > self._stable.seq + 4 * self.config.log_size and p.seq > self._last_executed + 4 * self.config.log_size:
            # far ahead: keep only a bounded number of future checkpoint sets
            if len(self._checkpoint_votes) > 64:
                return
        earlier = self._checkpoint_votes.setdefault(p.seq, VoteSet()).add(sender, p.state_digest, msg.raw)
        if earlier is not None:
            self._evidence(sender, EQUIVOCATION, p.seq, 0, (earlier, msg.raw), "two checkpoint digests for one seq")
            return
        self._note_ahead(p.seq, sender)
        self._check_stable(p.seq)

    def _check_stable(self, seq: int) -> None:
        votes = self._checkpoint_votes.get(seq)
        if votes is None or seq <= self._stable.seq:
            return
        digest = votes.reached(self.keyring)
        if digest is None:
            return
        proof = votes.wires(digest, self.keyring)
        own = self._own_checkpoints.get(seq)
        if own is not None and own[0] == digest:
            self._stabilize(seq, digest, proof, own[1])
        elif own is not None or self._last_executed >= seq:
            self._count("checkpoint_diverged")
            self._begin_transfer(seq, digest, proof)
        else:
            # Just behind: _maybe_fetch asks peers for the committed batches (peers keep
            # them for a while after truncation), so we re-execute and can vote on the
            # results; peers answer with a snapshot only when they no longer have them.
            self._note_ahead(seq)  # a stable checkpoint: 2f+1 said so

    def _stabilize(self, seq: int, digest: bytes, proof: tuple[bytes, ...], blob: bytes) -> None:
        if seq <= self._stable.seq:
            return
        self._stable = _Stable(seq, digest, proof, blob)
        records: list[tuple[str, bytes | None]] = [("checkpoint", canonical_pack([seq, digest, blob, list(proof)]))]
        for kind, seqs in self._persisted.items():
            for s in sorted(x for x in seqs if x <= seq):
                seqs.discard(s)
                if kind == "vote":
                    for k in (PRE_PREPARE, PREPARE, COMMIT):
                        if (k, s) in self._own_votes:
                            records.append((f"vote/{k}/{s:016d}", None))
                else:
                    records.append((_key(kind, s), None))
        for s in sorted(x for x in self._persisted_batches if x <= seq):
            records += [(_batch_key(s, d), None) for d in sorted(self._persisted_batches.pop(s))]
        keep_results_from = seq - max(RESULT_RETENTION_BATCHES, RESULT_RETENTION_CHECKPOINTS * self.config.checkpoint_interval)
        # Results of batches this checkpoint covers that are not final yet: after a
        # restart from this checkpoint they could not be recomputed, and without our
        # vote they might never reach 2f+1 (power cut). Keep them, and our vote, on disk
        # until they are final here — normally they already are, so this costs nothing.
        for s in sorted(self._results):
            br = self._results[s]
            if s <= keep_results_from:
                if s in self._persisted_results:
                    self._persisted_results.discard(s)
                    records.append((_key("result", s), None))
            elif s <= seq and br.final_count == 0 and s not in self._persisted_results:
                mine = br.votes.get(self.node_id)
                if mine is not None and mine[2]:
                    self._persisted_results.add(s)
                    entries = [[r, d, res] for r, d, res in zip(br.request_ids, br.request_digests, br.results)]
                    records.append((_key("result", s), canonical_pack([br.view, entries, mine[2]])))
        self._out.append(Persist(tuple(records)))
        keep_from = seq - RESULT_RETENTION_CHECKPOINTS * self.config.checkpoint_interval
        for s in [s for s in self._slots if s <= seq]:
            cert = self._slots.pop(s).commit_cert
            if cert is not None and s > keep_from:
                self._retained[s] = cert
        for s in [s for s in self._retained if s <= keep_from]:
            del self._retained[s]
        for k in [k for k in self._own_votes if k[1] <= seq]:
            del self._own_votes[k]
        for s in [s for s in self._checkpoint_votes if s <= seq]:
            del self._checkpoint_votes[s]
        for s in [s for s in self._own_checkpoints if s <= seq]:
            del self._own_checkpoints[s]
        for s in [s for s in self._checkpoint_resends if s <= seq]:
            del self._checkpoint_resends[s]
        for s in [s for s in self._results if s <= keep_results_from]:
            del self._results[s]
        for s in [s for s in self._foreign if s <= keep_results_from]:
            del self._foreign[s]
        for s in [s for s in self._early_votes if s <= self._last_executed]:
            del self._early_votes[s]
        # A request still "in flight" in a batch at or below the checkpoint was not in
        # the batch that executed there (its proposal was replaced, e.g. by fetched
        # batches): it may be proposed again, or no leader would ever order it here.
        stale = [rid for rid, s in self._in_flight.items() if s <= seq]
        for rid in stale:
            del self._in_flight[rid]
        if stale:
            self._queue_dirty = True
        self._evidence_seen = {key for key in self._evidence_seen if key[2] > seq}
        if self._next_seq <= seq:
            self._next_seq = seq + 1
        self._maybe_lift_floor()

    # ------------------------------------------------------------------ state transfer

    def _begin_transfer(self, seq: int, digest: bytes, proof: tuple[bytes, ...]) -> None:
        if self._transfer is not None and self._transfer.seq >= seq:
            return
        self._transfer = _Transfer(seq, digest, proof, next_try_ms=self._now)
        self._try_transfer()

    def _try_transfer(self) -> None:
        t = self._transfer
        if t is None or self._now < t.next_try_ms:
            return
        signers = []
        for w in t.proof:
            try:
                signers.append(decode(w).signer)
            except DecodeError:
                pass
        t.tries += 1
        t.next_try_ms = self._now + max(self.config.request_timeout_ms // 2, 50)
        self._send(FetchState(t.seq), self._next_peer(tuple(signers)))

    def _on_fetch_state(self, msg: Message, sender: str) -> None:
        p: FetchState = msg.payload  # type: ignore[assignment]
        if self._stable.blob is not None and self._stable.seq >= p.seq and self._may_answer(sender):
            self._answer(StateReply(self._stable.seq, self._stable.blob, self._stable.proof), sender)

    def _on_state(self, msg: Message, sender: str) -> None:
        p: StateReply = msg.payload  # type: ignore[assignment]
        if p.seq <= self._last_executed or p.seq <= self._stable.seq:
            return
        skipped_from = self._last_executed + 1
        digest = checkpoint_proof_digest(self.keyring, self._cid, p.seq, p.checkpoint_proof)
        if digest is None or snapshot_digest(p.snapshot) != digest:
            self._count("invalid_state")
            return
        try:
            app_snapshot, bookkeeping = self._parse_blob(p.snapshot)
        except DecodeError:
            self._count("invalid_state")
            return
        self._install_snapshot(p.seq, digest, p.checkpoint_proof, p.snapshot, app_snapshot, bookkeeping)
        self._out.append(StateTransferred(p.seq, digest))
        self._send(FetchBatches(p.seq + 1, p.seq + MAX_BATCHES_PER_REPLY), sender)
        # We skipped executing (skipped_from..p.seq]: fetch their certified results so
        # clients asking this node still get answers.
        first = max(skipped_from, p.seq - MAX_BATCHES_PER_REPLY + 1)
        self._send(FetchResults(first, p.seq), sender)
        # That peer may not hold them certified (e.g. after a power cut the executors'
        # votes never met): keep asking others, who answer with their votes at least.
        for s in range(first, p.seq + 1):
            if s not in self._results:
                self._missing_results[s] = None
        self._results_fetch_tries = 0
        self._results_fetch_at = self._now + self._retry_delay()
        self._execute_ready()

    @staticmethod
    def _parse_blob(blob: bytes) -> tuple[bytes, list[Any]]:
        value = unpack_bounded(blob, max_size=MAX_MESSAGE_BYTES, field="snapshot")
        if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], bytes)):
            raise DecodeError("snapshot", "expected [app_snapshot, bookkeeping]")
        book = value[1]
        if not (isinstance(book, list) and len(book) == 4 and all(isinstance(x, int) for x in book[:2])
                and isinstance(book[2], list) and isinstance(book[3], list)):
            raise DecodeError("snapshot.bookkeeping", "expected [seq, time, executed, executed_times]")
        for item in book[2]:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], int)):
                raise DecodeError("snapshot.bookkeeping.executed", "expected [request_id, seq] pairs")
        for item in book[3]:
            if not (isinstance(item, list) and len(item) == 2 and all(type(x) is int for x in item)):
                raise DecodeError("snapshot.bookkeeping.executed_times", "expected [seq, agreed_time_ms] pairs")
        return value[0], book

    def _install_snapshot(self, seq: int, digest: bytes, proof: tuple[bytes, ...], blob: bytes,
                          app_snapshot: bytes, book: list[Any]) -> None:
        self.app.restore(app_snapshot)
        self._last_executed = seq
        self._last_time_ms = book[1]
        self._executed = {rid: s for rid, s in book[2]}
        self._executed_time = {s: t for s, t in book[3]}
        self._last_progress_ms = self._now
        for rid in [r for r in self._pending if r in self._executed]:
            pending = self._drop_pending(rid)
            if pending is not None and pending.local:
                self._out.append(Persist(((f"pending/{rid}", None),)))
        for rid in [r for r, s in self._in_flight.items() if s <= seq]:
            del self._in_flight[rid]
        self._queue_dirty = True
        if self._transfer is not None and self._transfer.seq <= seq:
            self._transfer = None
        self._stabilize(seq, digest, proof, blob)

    def _on_fetch_batches(self, msg: Message, sender: str) -> None:
        p: FetchBatches = msg.payload  # type: ignore[assignment]
        if not self._may_answer(sender):
            return
        start = p.from_seq
        out: list[CommittedBatch] = []
        size = entries = 0
        for seq in range(start, min(p.to_seq, start + MAX_BATCHES_PER_REPLY - 1) + 1):
            slot = self._slots.get(seq)
            cert = slot.commit_cert if slot is not None else self._retained.get(seq)
            if cert is None:
                break
            size += sum(len(r) + len(q) for r, q in cert.requests) + sum(len(w) for w in cert.commits)
            entries += len(cert.requests)
            if out and (size > MAX_REPLY_BYTES or entries > MAX_REPLY_ENTRIES):
                break  # the asker asks again from where this reply ends
            out.append(cert)
        if not out and start <= self._stable.seq and self._stable.blob is not None:
            # We no longer hold those batches: hand over the checkpoint instead.
            self._answer(StateReply(self._stable.seq, self._stable.blob, self._stable.proof), sender)
        if out:
            self._answer(BatchesReply(tuple(out)), sender)

    def _on_batches(self, msg: Message, sender: str) -> None:
        p: BatchesReply = msg.payload  # type: ignore[assignment]
        for b in p.batches:
            if b.seq != self._last_executed + 1 and (b.seq <= self._last_executed or not self._in_window(b.seq)):
                continue
            slot = self._slot(b.seq)
            if slot.committed:
                continue
            if not verify_committed(self.keyring, self._cid, b):
                self._count("invalid_commit_certificate")
                return
            digest = batch_digest(b.agreed_time_ms, b.requests)
            if not slot.has_batch or slot.digest != digest:
                slot.view, slot.digest, slot.agreed_time_ms, slot.requests = b.view, digest, b.agreed_time_ms, b.requests
            slot.awaiting = None
            self._mark_committed(slot, b)
        before = self._last_executed
        self._execute_ready()
        if p.batches and self._last_executed > before and self._last_executed == p.batches[-1].seq:
            # The whole reply executed: the sender may hold more than fit in one reply
            # (MAX_REPLY_BYTES), and in an idle cluster nobody else tells us so.
            self._send(FetchBatches(self._last_executed + 1, self._last_executed + MAX_BATCHES_PER_REPLY), sender)

    def _on_fetch_results(self, msg: Message, sender: str) -> None:
        p: FetchResults = msg.payload  # type: ignore[assignment]
        if not self._may_answer(sender):
            return
        out: list[CertifiedResults] = []
        size = entries = 0
        for seq in range(p.from_seq, min(p.to_seq, p.from_seq + MAX_BATCHES_PER_REPLY - 1) + 1):
            if out and (size > MAX_REPLY_BYTES or entries > MAX_REPLY_ENTRIES):
                break  # the asker asks again for what is still missing
            br = self._results.get(seq)
            if br is None or br.final_count == 0:
                # Not certified here: the asker may be missing our vote for it (it skipped
                # the batch and collects votes to co-sign, see _on_foreign_vote).
                if br is not None:
                    self._answer_vote(br, sender)
                else:
                    fv = self._foreign.get(seq)
                    if fv is not None and fv.mine:
                        self._answer(fv.mine, sender)
                continue
            sigs = tuple((n, br.votes[n][1]) for n in self.keyring.node_ids if n in br.votes and br.votes[n][0] == br.root)
            out.append(CertifiedResults(seq, br.view, tuple(zip(br.request_ids, br.request_digests, br.results)), sigs))
            size += sum(len(r) + 32 + len(res) for r, res in zip(br.request_ids, br.results)) + sum(len(x) for _, x in sigs)
            entries += len(br.request_ids)
        if out:
            self._answer(ResultsReply(tuple(out)), sender)

    def _on_results(self, msg: Message, sender: str) -> None:
        p: ResultsReply = msg.payload  # type: ignore[assignment]
        floor = self._results_floor()
        for b in p.batches:
            own = self._results.get(b.seq)
            if (own is not None and own.final_count > 0) or b.seq > self._last_executed or not b.entries:
                continue
            if b.seq <= floor or (own is None and b.seq not in self._missing_results):
                # Only what we asked for: replayed history would be held (and verified)
                # until the next checkpoint, up to 64 batches per reply.
                self._count("unsolicited_results")
                continue
            if any(self._executed.get(rid) != b.seq for rid, _, _ in b.entries):
                self._count("invalid_results")
                continue
            leaves = [result_leaf(rid, res) for rid, _, res in b.entries]
            root = merkle.root(leaves)
            message = result_vote_bytes(self._cid, b.seq, root)
            valid: dict[str, tuple[bytes, bytes, bytes]] = {}
            if len(b.signatures) > self.keyring.n:
                self._count("invalid_results")
                continue
            tried: set[str] = set()
            for node, sig in b.signatures:
                # Each signer is checked once: an unsigned reply must not buy many
                # signature verifications with repeated entries.
                if node in tried or node not in self.keyring:
                    continue
                tried.add(node)
                if self.keyring.verify(node, message, sig):
                    valid[node] = (root, sig, b"")
            if len(valid) < self.keyring.quorum:
                self._count("invalid_results")
                continue
            if own is not None:
                # We executed it too but never saw 2f+1 votes: the certified signatures
                # count as votes for the same root (ours must be that root).
                if own.root != root:
                    self._count("local_result_diverged")
                    continue
                for node, vote in valid.items():
                    own.votes.setdefault(node, vote)
                own.certified_root = root
                self._check_final(own)
                continue
            br = BatchResult(b.seq, b.view, tuple(e[0] for e in b.entries), tuple(e[1] for e in b.entries),
                             tuple(e[2] for e in b.entries), tuple(leaves), root, votes=valid)
            br.certified_root = root
            br.accused.update(self.keyring.node_ids)  # we hold no signed wires to accuse anyone with
            fv = self._foreign.pop(b.seq, None)
            if fv is not None and fv.mine and fv.votes[self.node_id][0] == root:
                br.votes[self.node_id] = fv.votes[self.node_id]
            self._results[b.seq] = br
            self._check_final(br)

    def _maybe_fetch(self, now: int) -> None:
        delay = max(self.config.request_timeout_ms // 2, 50)
        if self._transfer is not None:
            self._try_transfer()
            return
        if self._ahead_seq <= self._last_executed:
            # Idle cluster: nobody tells us we are behind (e.g. just restarted), so
            # probe one peer now and then — after recovery quickly, later rarely.
            probe_every = delay if self._probes_left > 0 else PROBE_INTERVAL_FACTOR * self.config.request_timeout_ms
            if now - self._last_probe_ms >= probe_every:
                self._last_probe_ms = now
                self._probes_left = max(0, self._probes_left - 1)
                peer = self._next_peer()
                self._send(FetchBatches(self._last_executed + 1, self._last_executed + MAX_BATCHES_PER_REPLY), peer)
                self._send(FetchView(self._view + 1), peer)
            return
        if now - self._last_progress_ms < delay or now < self._next_fetch_ms:
            return
        if now - max(self._last_progress_ms, self._behind_since_ms) > BEHIND_CLAIM_TTL_FACTOR * delay:
            # A peer said we are behind (a seq past our log), yet fetching has brought
            # nothing for a long while: a claim no one backs up. Back to the idle probe,
            # which finds out again if we really are behind. Timed from the claim, not
            # from our last progress: back from a long partition, the first claims must
            # be fetched, not expired at once.
            self._ahead_seq = self._last_executed
            self._claimants.clear()
            self._count("behind_claim_expired")
            return
        self._next_fetch_ms = now + delay
        self._count("fetch_batches")
        self._send(FetchBatches(self._last_executed + 1, self._last_executed + MAX_BATCHES_PER_REPLY), self._next_peer())
        if self._ahead_seq > self._stable.seq + self.config.log_size:
            # Someone is past our window: we may be a whole view behind as well.
            self._maybe_fetch_view(now, force=True)

    # ------------------------------------------------------------------ view change

    def _note_higher_view(self, view: int, sender: str) -> None:
        if view <= self._view or view > self._view + MAX_VIEW_LEAP or len(self._higher_view_seen) > 64:
            return
        seen = self._higher_view_seen.setdefault(view, set())
        seen.add(sender)
        if len(seen) >= self.keyring.f + 1:
            self._maybe_fetch_view(self._now)

    def _maybe_fetch_view(self, now: int, force: bool = False) -> None:
        if now < self._next_fetch_view_ms:
            return
        self._next_fetch_view_ms = now + max(self.config.request_timeout_ms // 2, 50)
        target = max(self._higher_view_seen, default=self._view + 1)
        candidates = tuple(sorted(self._higher_view_seen.get(target, set()))) or self._peers()
        self._send(FetchView(target), self._next_peer(candidates))

    def _help_stale(self, view: int, sender: str) -> None:
        """A peer still votes in an older view (e.g. it restarted): hand it the signed
        new-view of ours, rate-limited per peer, so it can verify and catch up."""
        if view >= self._view or self._new_view_wire is None or self._in_view_change:
            return
        last = self._helped.get(sender)
        if last is not None and self._now - last < max(self.config.request_timeout_ms // 2, 50):
            return
        self._helped[sender] = self._now
        self._out.append(Send(self._new_view_wire, sender))

    def _on_fetch_view(self, msg: Message, sender: str) -> None:
        p: FetchView = msg.payload  # type: ignore[assignment]
        if (self._new_view_wire is not None and self._view >= p.view and not self._in_view_change
                and self._may_answer(sender)):
            self._answer(self._new_view_wire, sender)

    def _start_view_change(self, target: int) -> None:
        if target <= self._view or (self._in_view_change and target <= self._vc_target):
            return
        self._in_view_change = True
        self._vc_target = target
        self._vc_attempts += 1
        factor = min(2 ** (self._vc_attempts - 1), VIEW_CHANGE_BACKOFF_CAP)
        self._vc_deadline = self._now + self.config.view_change_timeout_ms * factor
        self._vc_quorum_at = None
        self._count("view_changes_started")
        self._out.append(Persist((("view", canonical_pack([self._view, target])),)))
        own = self._sign_view_change(target)
        if own is not None:
            self._out.append(Send(own.raw))
        asked = self._view_changes.setdefault(target, {})
        if len(asked) >= self.keyring.quorum:
            self._vc_quorum_at = self._now
        self._try_new_view(target)

    def _sign_view_change(self, target: int) -> Message | None:
        """Our view-change for ``target``, now counted as asked; None while the vote
        floor withholds it (it would omit prepared certificates the store forgot)."""
        if not self._may_sign_view_change(target):
            self._count("votes_withheld")
            return None
        own = decode(self._wire(self._view_change(target)))
        self._view_changes.setdefault(target, {})[self.node_id] = own
        self._note_signed(target)
        return own

    def _view_change(self, target: int) -> ViewChange:
        """Our view-change for ``target``: stable checkpoint and every prepared certificate above it."""
        prepared = tuple(self._slots[s].prepared_cert for s in sorted(self._slots)
                         if s > self._stable.seq and self._slots[s].prepared_cert is not None)
        return ViewChange(target, self._stable.seq, self._stable.proof, prepared)  # type: ignore[arg-type]

    def _view_change_timer_expired(self) -> None:
        """PBFT's rule: move on to the next view only once 2f+1 validators asked for this
        one and its leader still sent no new-view. Without that quorum, ask again (our
        view-change may have been lost on a broken link): a replica cut off from the others
        then waits at view+1, the view they come to next, instead of racing ahead to views
        they never reach and staying out of the cluster until they do."""
        asked = self._view_changes.get(self._vc_target, {})
        wait = self.config.view_change_timeout_ms * min(2 ** (self._vc_attempts - 1), VIEW_CHANGE_BACKOFF_CAP)
        if self._vc_quorum_at is not None and self._now >= self._vc_quorum_at + wait:
            self._start_view_change(self._vc_target + 1)
            return
        # Re-sent even with a quorum in hand: the new leader may have missed ours.
        self._vc_deadline = self._now + wait if self._vc_quorum_at is None else self._vc_quorum_at + wait
        own = asked.get(self.node_id)
        if own is not None:
            self._count("view_changes_resent")
            self._out.append(Send(own.raw))
        elif (own := self._sign_view_change(self._vc_target)) is not None:
            self._out.append(Send(own.raw))  # withheld by the vote floor until now
            if self._vc_quorum_at is None and len(asked) >= self.keyring.quorum:
                self._vc_quorum_at = self._now
            self._try_new_view(self._vc_target)

    def _on_view_change(self, msg: Message, sender: str) -> None:
        vc: ViewChange = msg.payload  # type: ignore[assignment]
        if vc.new_view <= self._view:
            self._help_stale(vc.new_view - 1, sender)  # it asks for a view we installed
            return
        if vc.new_view > self._view + MAX_VIEW_LEAP:
            return
        if sender in self._view_changes.get(vc.new_view, {}):
            self._answer_view_change(vc.new_view, sender)  # asked again: ours may be lost
            return
        if not verify_view_change(self.keyring, self._cid, vc, self.config.log_size):
            self._count("invalid_view_change")
            return
        asked = self._view_changes.setdefault(vc.new_view, {})
        asked[sender] = msg
        self._answer_view_change(vc.new_view, sender)
        if self._in_view_change and vc.new_view == self._vc_target and len(asked) == self.keyring.quorum:
            self._vc_quorum_at = self._now  # PBFT's timer for the new leader starts now
        # Join rule: f+1 validators want a higher view, so at least one honest one does.
        current = self._vc_target if self._in_view_change else self._view
        wanting = sorted(v for v in self._view_changes if v > current)
        voters: set[str] = set()
        for v in wanting:
            voters.update(self._view_changes[v])
        if len(voters - {self.node_id}) >= self.keyring.f + 1 and wanting:
            self._start_view_change(wanting[0])
        self._try_new_view(vc.new_view)
        # drop view-change sets for views we have left behind
        for v in [v for v in self._view_changes if v <= self._view]:
            del self._view_changes[v]

    def _answer_view_change(self, view: int, sender: str) -> None:
        """The sender asks for a view we saw a quorum for and left behind: it may have lost
        our view-change for it and, short of a quorum, could never time out of that view.
        Hand it ours, at most once per view-change timeout per peer (a small message must
        not buy a large answer at will). Ours is re-signed if a restart lost it: we took
        part in no view since, so it carries what the lost one did."""
        if not (self._in_view_change and view < self._vc_target):
            return
        last = self._vc_answered.get(sender)
        if last is not None and self._now - last < self.config.view_change_timeout_ms:
            return
        self._vc_answered[sender] = self._now
        own = self._view_changes.setdefault(view, {}).get(self.node_id)
        if own is None and (own := self._sign_view_change(view)) is None:
            return
        self._count("view_changes_answered")
        self._out.append(Send(own.raw, sender))

    def _try_new_view(self, view: int) -> None:
        if self._leader_of(view) != self.node_id or view in self._sent_new_view:
            return
        if self._vote_floor is not None and view <= self._vote_floor[0]:
            return  # we may have sent another new-view for it before the store forgot
        if not (self._in_view_change and self._vc_target == view):
            return
        vcs = self._view_changes.get(view, {})
        if len(vcs) < self.keyring.quorum:
            return
        chosen = [vcs[n].raw for n in self.keyring.node_ids if n in vcs][: self.keyring.quorum]
        if self.node_id in vcs and vcs[self.node_id].raw not in chosen:
            chosen[-1] = vcs[self.node_id].raw
        self._sent_new_view.add(view)
        self._note_signed(view)
        wire = self._wire(NewView(view, tuple(chosen)))
        self._out.append(Persist((("newview", wire),)))
        self._out.append(Send(wire))
        self._install_view(view, [decode(w).payload for w in chosen], wire)  # type: ignore[misc]

    def _on_new_view(self, msg: Message, sender: str) -> None:
        nv: NewView = msg.payload  # type: ignore[assignment]
        # Only forward: once we asked for view t we never go back to a lower one (our
        # view-change promised not to take part in earlier views).
        floor = self._vc_target if self._in_view_change else self._view + 1
        if nv.view < floor:
            return
        if msg.signer != self._leader_of(nv.view):
            self._count("not_leader")
            return
        vcs: list[ViewChange] = []
        signers: set[str] = set()
        for w in nv.view_changes:
            m = decode_verified(w, self.keyring, self._cid, VIEW_CHANGE)
            if m is None or m.payload.new_view != nv.view or m.signer in signers:  # type: ignore[union-attr]
                self._count("invalid_new_view")
                return
            if not verify_view_change(self.keyring, self._cid, m.payload, self.config.log_size):  # type: ignore[arg-type]
                self._count("invalid_new_view")
                return
            signers.add(m.signer)
            vcs.append(m.payload)  # type: ignore[arg-type]
        if len(signers) < self.keyring.quorum:
            self._count("invalid_new_view")
            return
        self._out.append(Persist((("newview", msg.raw),)))
        self._install_view(nv.view, vcs, msg.raw)

    def _install_view(self, view: int, vcs: list[ViewChange], wire: bytes) -> None:
        plan = plan_new_view(self.keyring, self._cid, vcs)
        self._view = view
        self._in_view_change = False
        self._vc_target = view
        self._vc_attempts = 0
        self._new_view_wire = wire
        self._maybe_lift_floor()
        for v in [v for v in self._view_changes if v <= view]:
            del self._view_changes[v]
        for v in [v for v in self._higher_view_seen if v <= view]:
            del self._higher_view_seen[v]
        self._out.append(Persist((("view", canonical_pack([view, view])),)))
        self._out.append(ViewChanged(view, self.leader))
        if plan.stable_seq > self._stable.seq and plan.stable_digest is not None:
            own = self._own_checkpoints.get(plan.stable_seq)
            if own is not None and own[0] == plan.stable_digest:
                self._stabilize(plan.stable_seq, plan.stable_digest, plan.checkpoint_proof, own[1])
            elif self._last_executed < plan.stable_seq or own is not None:
                self._begin_transfer(plan.stable_seq, plan.stable_digest, plan.checkpoint_proof)
        self._plan_top = plan.top
        for slot in self._slots.values():
            slot.bodies_served.clear()  # answers lost in earlier views must not starve anyone
        # Unprepared proposals of older views above the re-proposed range are void.
        for s, slot in sorted(self._slots.items()):
            if s > plan.top and not slot.committed and slot.view < view:
                for rid, _ in slot.requests:
                    self._release_in_flight(rid, s)
                slot.reset_batch()
        self._place_reproposals(plan, view)
        self._next_seq = max(plan.top, self._stable.seq, self._last_executed) + 1
        # Pending requests: start their timers afresh and hand them to the new leader.
        for rid, p in self._pending.items():
            p.stage = 1
            p.deadline_ms = self._now + self.config.request_timeout_ms
            p.tellings_owed = 0  # a new view: told afresh, to a leader we just heard from
            if not self.is_leader and rid not in self._in_flight:
                self._send(RequestMsg(rid, p.request), self.leader)
        if self.is_leader:
            self._propose(self._now)

    def _place_reproposals(self, plan: NewViewPlan, view: int) -> None:
        """The new-view's batches count as pre-prepared in ``view``: place and prepare
        each above the stable checkpoint (also those we executed: that helps the others
        re-commit them)."""
        for r in plan.batches:
            if r.seq > self._stable.seq:
                self._accept_reproposed(self._slot(r.seq), view, r)

    def _accept_reproposed(self, slot: Slot, view: int, r: Reproposal) -> None:
        body = (0, ()) if r.digest == NULL_BATCH_DIGEST else slot.body(r.digest)
        if body is None:
            self._await_body(slot, view, r)
            return
        # Proposed by the new-view, not by a signed header: no leader signature.
        self._place_batch(slot, view, r.digest, body[0], body[1], b"")
        if slot.sent_prepare < view and self._vote(PREPARE, slot.seq, view, r.digest):
            slot.sent_prepare = view
        self._check_prepared(slot)

    def _await_body(self, slot: Slot, view: int, r: Reproposal) -> None:
        """The new view re-proposes a batch we never held: fetch it by digest from the
        signers of its prepared certificate (f+1 of them are honest and keep every batch
        they prepared, see Slot.bodies). We prepare it once it arrives."""
        if slot.committed:
            return  # a certified batch cannot be re-proposed as another one (safety)
        for rid, _ in slot.requests:
            self._release_in_flight(rid, slot.seq)
        slot.reset_batch()
        slot.awaiting = (view, r.digest, r.holders)
        self._ask_for_body(slot)

    def _ask_for_body(self, slot: Slot) -> None:
        assert slot.awaiting is not None
        _, digest, holders = slot.awaiting
        self._send(FetchBody(slot.seq, digest), self._next_peer(holders))
        slot.fetch_at_ms = self._now + self._retry_delay()

    def _fetch_missing_bodies(self, now: int) -> None:
        for slot in self._slots.values():
            if slot.awaiting is not None and now >= slot.fetch_at_ms:
                self._ask_for_body(slot)

    def _on_fetch_body(self, msg: Message, sender: str) -> None:
        p: FetchBody = msg.payload  # type: ignore[assignment]
        slot = self._slots.get(p.seq)
        if slot is None:
            return  # below our stable checkpoint: the asker catches up by fetch-batches/state
        served = slot.bodies_served.get(sender, 0)
        body = slot.body(p.digest)
        if body is None or served >= MAX_BODY_ANSWERS or not self._may_answer(sender):
            return  # a few answers per peer and slot: a 40-byte ask must not buy 8 MiB each time
        slot.bodies_served[sender] = served + 1
        self._answer(BodyReply(p.seq, body[0], body[1]), sender)

    def _on_body(self, msg: Message, sender: str) -> None:
        p: BodyReply = msg.payload  # type: ignore[assignment]
        slot = self._slots.get(p.seq)
        if slot is None or slot.awaiting is None:
            return
        view, digest, holders = slot.awaiting
        if batch_digest(p.agreed_time_ms, p.requests) != digest:
            self._count("invalid_body")
            return
        slot.awaiting = None
        self._keep_body(slot, digest, (p.agreed_time_ms, p.requests))
        if view == self._view and not self._in_view_change:
            self._accept_reproposed(slot, view, Reproposal(p.seq, digest, holders))

    # ------------------------------------------------------------------ crash recovery

    def _replay_new_view(self, wire: bytes) -> None:
        """After a restart in a view that a new-view installed: its re-proposals are this
        view's batches at their sequence numbers again. Without them a restarted leader
        proposed fresh batches there, and a restarted follower prepared them: two
        batches could commit at one sequence number (consensus review, seventh session)."""
        nv: NewView = decode(wire).payload  # type: ignore[assignment]
        plan = plan_new_view(self.keyring, self._cid, [decode(w).payload for w in nv.view_changes])  # type: ignore[misc]
        self._plan_top = plan.top
        self._place_reproposals(plan, self._view)
        self._next_seq = max(self._next_seq, plan.top + 1)

    def _recover_result(self, seq: int, value: bytes) -> None:
        """A batch result that was not final when its checkpoint became stable (see
        ``_stabilize``): reload it with our own vote and broadcast that vote again."""
        if seq <= self._results_floor() or seq > self._stable.seq or seq in self._results:
            self._out.append(Persist(((_key("result", seq), None),)))
            return
        view, entries, wire = unpack_bounded(value, max_size=MAX_MESSAGE_BYTES, field="durable.result")
        leaves = tuple(result_leaf(rid, res) for rid, _, res in entries)
        root = merkle.root(list(leaves))
        mine = decode(wire)
        if not isinstance(mine.payload, ResultVote) or mine.payload.root != root or mine.payload.seq != seq:
            raise DecodeError("durable.result", "own vote does not match the stored results")
        br = BatchResult(seq, view, tuple(e[0] for e in entries), tuple(e[1] for e in entries),
                         tuple(e[2] for e in entries), leaves, root)
        br.votes[self.node_id] = (root, mine.signature, wire)
        br.retry_at_ms = self._now + self._retry_delay()
        self._results[seq] = br
        self._persisted_results.add(seq)
        self._out.append(Send(wire))

    def _recover_batches(self, durable: Mapping[str, bytes]) -> dict[tuple[int, bytes], tuple[int, Batch]]:
        """batch/<seq>/<digest> records: checked against their digest; those at or below
        the stable checkpoint (left by a crash before truncation) are deleted."""
        batches: dict[tuple[int, bytes], tuple[int, Batch]] = {}
        stale: list[tuple[str, bytes | None]] = []
        for k, value in durable.items():
            if not k.startswith("batch/") or value is None:
                continue
            _, s, hexdigest = k.split("/")
            seq, digest = int(s), bytes.fromhex(hexdigest)
            if seq <= self._stable.seq:
                stale.append((k, None))
                continue
            agreed, requests = unpack_bounded(value, max_size=MAX_MESSAGE_BYTES, field="durable.batch")
            batch: Batch = tuple((r, q) for r, q in requests)
            if batch_digest(agreed, batch) != digest:
                self._count("durable_batch_corrupt")
                stale.append((k, None))
                continue
            batches[(seq, digest)] = (agreed, batch)
            self._persisted_batches.setdefault(seq, set()).add(digest)
        if stale:
            self._out.append(Persist(tuple(stale)))
        return batches

    def _recover_own_preprepare(self, seq: int, value: bytes, batches: Mapping[tuple[int, bytes], tuple[int, Batch]],
                                ) -> tuple[int, bytes, bytes | None]:
        """(view, digest, wire) of our own pre-prepare, the wire rebuilt byte for byte from
        the header signature and the batch (None if the batch is gone: we still refuse to
        propose anything else for that slot, we just cannot re-send it)."""
        tag, view, agreed, digest, signature = unpack_bounded(value, max_size=MAX_MESSAGE_BYTES, field="durable.pre-prepare")
        if tag != OWN_PREPREPARE_TAG:
            raise DecodeError("durable.pre-prepare", f"unknown record format {tag!r}")
        batch = batches.get((seq, digest))
        if batch is None:
            return view, digest, None
        return view, digest, encode_signed(self._cid, self.node_id, PrePrepare(view, seq, agreed, batch[1], digest), signature)

    def _recover(self, durable: Mapping[str, bytes], signed_bound: tuple[int, int] | None) -> None:
        """Rebuild from Persist records: stable checkpoint, committed batches above it
        (re-executed), own votes (never contradicted), prepared certificates, the view.
        Then compare what they say we signed with ``signed_bound`` (see ``vote_floor``)
        before anything is signed or sent again."""
        view_rec = durable.get("view")
        vc_target = 0
        if view_rec is not None:
            value = unpack_bounded(view_rec, max_size=1024, field="durable.view")
            self._view, vc_target = int(value[0]), int(value[1])
        nv = durable.get("newview")
        if nv is not None:
            try:
                m = decode(nv)
                if m.payload.view == self._view:  # type: ignore[union-attr]
                    self._new_view_wire = nv
            except DecodeError:
                pass
        cp = durable.get("checkpoint")
        if cp is not None:
            seq, digest, blob, proof = unpack_bounded(cp, max_size=MAX_MESSAGE_BYTES, field="durable.checkpoint")
            # The same checks as a snapshot from a peer: a changed byte would alter time heads
            # (which requests are Valid) without anyone noticing.
            if snapshot_digest(blob) != digest or checkpoint_proof_digest(self.keyring, self._cid, seq, tuple(proof)) != digest:
                raise DecodeError("durable.checkpoint", "the stored checkpoint does not match its digest and signatures")
            app_snapshot, book = self._parse_blob(blob)
            self._install_snapshot(seq, digest, tuple(proof), blob, app_snapshot, book)
            self._out.clear()  # nothing new to persist: it came from disk
        batches = self._recover_batches(durable)
        for (seq, digest), body in batches.items():
            self._slot(seq).bodies[digest] = body
        for k in sorted(durable):
            value = durable[k]
            if value is None:
                continue
            if k.startswith("vote/"):
                _, kind, s = k.split("/")
                seq = int(s)
                if seq <= self._stable.seq:
                    continue
                self._persisted["vote"].add(seq)
                slot = self._slot(seq)
                if kind == PRE_PREPARE:
                    view, digest, wire = self._recover_own_preprepare(seq, value, batches)
                    self._own_votes[(kind, seq)] = (view, digest, wire)  # type: ignore[assignment]
                    if view == self._view:
                        self._next_seq = max(self._next_seq, seq + 1)
                    continue
                m = decode(value)
                p = m.payload
                self._own_votes[(kind, seq)] = (p.view, p.digest, value)  # type: ignore[union-attr]
                if kind == PREPARE:
                    slot.votes(slot.prepares, p.view).add(self.node_id, p.digest, value)  # type: ignore[union-attr]
                elif kind == COMMIT:
                    slot.votes(slot.commits, p.view).add(self.node_id, p.digest, value)  # type: ignore[union-attr]
            elif k.startswith(("prepared/", "committed/")):
                kind, s = k.split("/")
                seq = int(s)
                if seq <= self._stable.seq:
                    continue
                view, cert_seq, agreed, digest, wires = unpack_bounded(value, max_size=MAX_MESSAGE_BYTES, field=f"durable.{kind}")
                batch = batches.get((seq, digest))
                if batch is None or cert_seq != seq or batch[0] != agreed:
                    self._count("durable_batch_missing")  # cannot happen with ordered persists; be safe: forget it
                    self._out.append(Persist(((k, None),)))
                    continue
                self._persisted[kind].add(seq)
                slot = self._slot(seq)
                if kind == "prepared":
                    slot.prepared_cert = PreparedCert(view, seq, digest, tuple(wires))
                else:
                    cert = CommittedBatch(view, seq, agreed, batch[1], tuple(wires))
                    slot.view, slot.digest = cert.view, digest
                    slot.agreed_time_ms, slot.requests, slot.commit_cert = cert.agreed_time_ms, cert.requests, cert
            elif k.startswith("result/"):
                self._recover_result(int(k.split("/")[1]), value)
            elif k.startswith("pending/"):
                rid = k[len("pending/"):]
                if rid in self._executed:
                    self._out.append(Persist(((k, None),)))
                    continue
                self._pending[rid] = _Pending(value, self._now, self._now + self.config.request_timeout_ms, 0, True)
                self._queue_dirty = True  # in-flight ids are only known after recovery
        self._note_signed(max(self._view, vc_target))
        for (kind, seq), (view, _, _) in self._own_votes.items():
            self._note_signed(view, seq)
            slot = self._slot(seq)
            if kind == PREPARE:
                slot.sent_prepare = max(slot.sent_prepare, view)
            elif kind == COMMIT:
                slot.sent_commit = max(slot.sent_commit, view)
        if signed_bound is not None:
            view_high, seq_high = self.signed_high
            if signed_bound[0] > view_high or signed_bound[1] > seq_high:
                self._set_vote_floor(signed_bound)
        self._next_seq = max(self._next_seq, self._stable.seq + 1)
        if self._new_view_wire is not None:
            self._replay_new_view(self._new_view_wire)
        self._execute_ready()
        # A leader that crashed mid-proposal re-sends the very same pre-prepares.
        for (kind, seq), (view, digest, wire) in sorted(self._own_votes.items(), key=lambda kv: kv[0][1]):
            if kind == PRE_PREPARE and view == self._view and seq > self._last_executed and wire is not None:
                pp = decode(wire).payload
                self._out.append(Send(wire))
                self._accept_batch(seq, view, pp.agreed_time_ms, pp.requests, digest, decode(wire).signature)  # type: ignore[union-attr]
            elif kind in (PREPARE, COMMIT) and view == self._view and seq > self._last_executed:
                self._out.append(Send(wire))  # identical bytes: peers that missed them can count them
        self._next_seq = max(self._next_seq, self._last_executed + 1)
        if vc_target > self._view:
            # We had asked to leave this view before the crash: keep that promise.
            self._start_view_change(vc_target)
            return
        # Forward surviving pending requests once we know who leads.
        for rid, p in self._pending.items():
            if rid not in self._executed and self.leader != self.node_id:
                self._send(RequestMsg(rid, p.request), self.leader)
