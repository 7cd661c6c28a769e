"""Consensus messages: typed bodies, the wire envelope, and signing bytes.

Wire form of every peer message (canonical msgpack array)::

    ["hm/1", kind, cluster_id, signer, body, signature]

``body`` is a fixed-order array per kind (below). For signed kinds the signature is over
``canonical_pack(["hypermesh/<kind>/v1", cluster_id, *fields])`` where ``fields`` is the
body — except for ``pre-prepare``, whose signature covers only its header
``[view, seq, agreed_time_ms, digest]`` (the digest binds the requests through
``batch_digest``). So the leader never hashes a ~1 MB batch into a signature, and its
signed header is small enough for every prepare to carry it: a replica that sees a
prepare with another digest than the pre-prepare it accepted then holds two
leader-signed headers for one slot — transferable evidence of equivocation. For
``result-vote`` the signed bytes are exactly ``["hypermesh/result-vote/v1", cluster_id, seq, root]``.

Unsigned kinds (``request``, ``fetch-*``, ``state``, ``batches``, ``results``, ``body``)
carry an empty signature: they are authenticated by the transport and their *content* is
verified (forwarded requests are just client input; state and batches carry their own
quorum proofs; a body must hash to the digest that was asked for).
Signing them would cost a signature per request, which FACTS.md rules out.

Nested proofs (prepares inside a prepared certificate, checkpoints inside a checkpoint
proof, view-changes inside a new-view, commits inside a committed batch) are carried as
their complete wire bytes and verified one by one.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from consensus.codec import DecodeError, canonical_pack, unpack_bounded

MAGIC = "hm/1"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_REQUEST_ID_CHARS = 256
MAX_BATCH_BYTES = 8 * 1024 * 1024
MAX_BATCH_REQUESTS = 4096
MAX_NODE_ID_CHARS = 128
MAX_SIGNATURE_BYTES = 8192
MAX_PROOF_ITEMS = 1024
MAX_BATCHES_PER_REPLY = 64
# Requests (or results) one fetch reply carries at most, past its first batch: with the
# element budget below this bounds what any honest message holds, so a hostile frame
# cannot make the decoder build millions of containers.
MAX_REPLY_ENTRIES = 16 * MAX_BATCH_REQUESTS
MAX_MESSAGE_ELEMENTS = 8 * MAX_REPLY_ENTRIES + 8 * MAX_BATCH_REQUESTS

PRE_PREPARE = "pre-prepare"
PREPARE = "prepare"
COMMIT = "commit"
RESULT_VOTE = "result-vote"
CHECKPOINT = "checkpoint"
VIEW_CHANGE = "view-change"
NEW_VIEW = "new-view"
REQUEST = "request"
FETCH_STATE = "fetch-state"
STATE = "state"
FETCH_BATCHES = "fetch-batches"
BATCHES = "batches"
FETCH_VIEW = "fetch-view"
FETCH_RESULTS = "fetch-results"
RESULTS = "results"
FETCH_BODY = "fetch-body"
BODY = "body"

SIGNED_KINDS = (PRE_PREPARE, PREPARE, COMMIT, RESULT_VOTE, CHECKPOINT, VIEW_CHANGE, NEW_VIEW)
UNSIGNED_KINDS = (REQUEST, FETCH_STATE, STATE, FETCH_BATCHES, BATCHES, FETCH_VIEW, FETCH_RESULTS, RESULTS, FETCH_BODY,
                  BODY)

Batch = tuple[tuple[str, bytes], ...]  # (request_id, request bytes), in proposal order


# --------------------------------------------------------------------------- bodies


@dataclass(frozen=True, slots=True)
class PrePrepare:
    view: int
    seq: int
    agreed_time_ms: int
    requests: Batch
    digest: bytes

    def body(self) -> list[Any]:
        return [self.view, self.seq, self.agreed_time_ms, [[r, q] for r, q in self.requests], self.digest]

    def header(self) -> list[Any]:
        """What the leader signs: the requests are bound through ``digest``."""
        return [self.view, self.seq, self.agreed_time_ms, self.digest]


@dataclass(frozen=True, slots=True)
class Prepare:
    """A vote for (view, seq, digest). It also carries the leader's signature over the
    pre-prepare header it prepares (``agreed_time_ms`` completes that header); empty for
    batches re-proposed by a new-view (the new-view itself is the leader's proposal)."""

    view: int
    seq: int
    digest: bytes
    agreed_time_ms: int = 0
    leader_signature: bytes = b""

    def body(self) -> list[Any]:
        return [self.view, self.seq, self.digest, self.agreed_time_ms, self.leader_signature]


@dataclass(frozen=True, slots=True)
class Commit:
    view: int
    seq: int
    digest: bytes

    def body(self) -> list[Any]:
        return [self.view, self.seq, self.digest]


@dataclass(frozen=True, slots=True)
class ResultVote:
    seq: int
    root: bytes

    def body(self) -> list[Any]:
        return [self.seq, self.root]


@dataclass(frozen=True, slots=True)
class CheckpointVote:
    seq: int
    state_digest: bytes

    def body(self) -> list[Any]:
        return [self.seq, self.state_digest]


@dataclass(frozen=True, slots=True)
class PreparedCert:
    """2f+1 distinct validators prepared the batch with ``digest`` in ``view`` (their
    prepare wires). The batch itself is not carried: its digest is what the prepares
    signed, and a replica that lacks the body fetches it (``fetch-body``), so a
    view-change stays small however large the window's batches are."""

    view: int
    seq: int
    digest: bytes
    prepares: tuple[bytes, ...]

    def body(self) -> list[Any]:
        return [self.view, self.seq, self.digest, list(self.prepares)]


@dataclass(frozen=True, slots=True)
class CommittedBatch:
    """A batch with 2f+1 distinct commit wires for its digest: proof it was committed."""

    view: int
    seq: int
    agreed_time_ms: int
    requests: Batch
    commits: tuple[bytes, ...]

    def body(self) -> list[Any]:
        return [self.view, self.seq, self.agreed_time_ms, [[r, q] for r, q in self.requests], list(self.commits)]


@dataclass(frozen=True, slots=True)
class ViewChange:
    new_view: int
    stable_seq: int
    checkpoint_proof: tuple[bytes, ...]  # 2f+1 checkpoint wires for stable_seq (empty at 0)
    prepared: tuple[PreparedCert, ...]  # for seqs above stable_seq, ascending

    def body(self) -> list[Any]:
        return [self.new_view, self.stable_seq, list(self.checkpoint_proof), [p.body() for p in self.prepared]]


@dataclass(frozen=True, slots=True)
class NewView:
    view: int
    view_changes: tuple[bytes, ...]  # 2f+1 view-change wires for ``view``

    def body(self) -> list[Any]:
        return [self.view, list(self.view_changes)]


@dataclass(frozen=True, slots=True)
class RequestMsg:
    request_id: str
    request: bytes

    def body(self) -> list[Any]:
        return [self.request_id, self.request]


@dataclass(frozen=True, slots=True)
class FetchState:
    seq: int

    def body(self) -> list[Any]:
        return [self.seq]


@dataclass(frozen=True, slots=True)
class StateReply:
    seq: int
    snapshot: bytes  # canonical_pack([app_snapshot, bookkeeping])
    checkpoint_proof: tuple[bytes, ...]

    def body(self) -> list[Any]:
        return [self.seq, self.snapshot, list(self.checkpoint_proof)]


@dataclass(frozen=True, slots=True)
class FetchBatches:
    from_seq: int
    to_seq: int

    def body(self) -> list[Any]:
        return [self.from_seq, self.to_seq]


@dataclass(frozen=True, slots=True)
class BatchesReply:
    batches: tuple[CommittedBatch, ...]

    def body(self) -> list[Any]:
        return [[b.body() for b in self.batches]]


@dataclass(frozen=True, slots=True)
class FetchBody:
    """Ask for the batch a new view re-proposes at ``seq`` by its digest."""

    seq: int
    digest: bytes

    def body(self) -> list[Any]:
        return [self.seq, self.digest]


@dataclass(frozen=True, slots=True)
class BodyReply:
    """A batch's bytes; the asker checks them against the digest it asked for."""

    seq: int
    agreed_time_ms: int
    requests: Batch

    def body(self) -> list[Any]:
        return [self.seq, self.agreed_time_ms, [[r, q] for r, q in self.requests]]


@dataclass(frozen=True, slots=True)
class FetchView:
    view: int

    def body(self) -> list[Any]:
        return [self.view]


@dataclass(frozen=True, slots=True)
class FetchResults:
    from_seq: int
    to_seq: int

    def body(self) -> list[Any]:
        return [self.from_seq, self.to_seq]


@dataclass(frozen=True, slots=True)
class CertifiedResults:
    """One batch's results with the 2f+1 result-vote signatures over their Merkle root:
    lets a replica that skipped the batch (state transfer) still answer its clients."""

    seq: int
    view: int
    entries: tuple[tuple[str, bytes, bytes], ...]  # (request_id, sha256(request), result)
    signatures: tuple[tuple[str, bytes], ...]

    def body(self) -> list[Any]:
        return [self.seq, self.view, [list(e) for e in self.entries], [list(x) for x in self.signatures]]


@dataclass(frozen=True, slots=True)
class ResultsReply:
    batches: tuple[CertifiedResults, ...]

    def body(self) -> list[Any]:
        return [[b.body() for b in self.batches]]


Body = (PrePrepare | Prepare | Commit | ResultVote | CheckpointVote | ViewChange | NewView | RequestMsg
        | FetchState | StateReply | FetchBatches | BatchesReply | FetchView | FetchResults | ResultsReply | FetchBody
        | BodyReply)

_KIND_OF: dict[type, str] = {
    PrePrepare: PRE_PREPARE, Prepare: PREPARE, Commit: COMMIT, ResultVote: RESULT_VOTE,
    CheckpointVote: CHECKPOINT, ViewChange: VIEW_CHANGE, NewView: NEW_VIEW, RequestMsg: REQUEST,
    FetchState: FETCH_STATE, StateReply: STATE, FetchBatches: FETCH_BATCHES, BatchesReply: BATCHES,
    FetchView: FETCH_VIEW, FetchResults: FETCH_RESULTS, ResultsReply: RESULTS, FetchBody: FETCH_BODY, BodyReply: BODY,
}


# --------------------------------------------------------------------------- digests


class _DigestMemo:
    """SHA-256 of request bytes, remembered per bytes value. One request is hashed where
    the node takes it in, for the batch digest and for the result vote: on the event
    loop, 10 µs per 16 KB request each time. A dict keyed by the bytes costs one
    (cached) ``hash()`` of the object instead. Bounded by the bytes it keeps alive;
    the oldest go first. A pure function's memo: the digest never depends on it. Meant
    for one thread (the event loop); another thread's call can only miss or evict."""

    def __init__(self, max_bytes: int) -> None:
        self._digests: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes = 0
        self._max_bytes = max_bytes

    def __call__(self, data: bytes) -> bytes:
        digest = self._digests.get(data)
        if digest is None:
            digest = hashlib.sha256(data).digest()
            if len(data) <= self._max_bytes:
                self._digests[data] = digest
                self._bytes += len(data)
                while self._bytes > self._max_bytes and self._digests:
                    old, _ = self._digests.popitem(last=False)
                    self._bytes -= len(old)
        return digest


request_digest = _DigestMemo(max_bytes=32 * 1024 * 1024)


def batch_digest(agreed_time_ms: int, requests: Batch) -> bytes:
    """What prepares and commits agree on. The view is left out on purpose: a batch
    re-proposed in a later view keeps its digest, so old and new votes compare."""
    return hashlib.sha256(
        canonical_pack(["hypermesh/batch/v1", agreed_time_ms, [[r, request_digest(q)] for r, q in requests]])
    ).digest()


def signing_bytes(kind: str, cluster_id: str, body: list[Any]) -> bytes:
    return canonical_pack([f"hypermesh/{kind}/v1", cluster_id, *body])


def signed_fields(payload: Any) -> list[Any]:
    """The fields a signature covers: the body, or a pre-prepare's header."""
    return payload.header() if isinstance(payload, PrePrepare) else payload.body()


def preprepare_header_bytes(cluster_id: str, view: int, seq: int, agreed_time_ms: int, digest: bytes) -> bytes:
    """Exactly what a leader signs for a pre-prepare."""
    return signing_bytes(PRE_PREPARE, cluster_id, [view, seq, agreed_time_ms, digest])


def preprepare_header_wire(cluster_id: str, leader: str, view: int, seq: int, agreed_time_ms: int, digest: bytes,
                           signature: bytes) -> bytes:
    """A pre-prepare with its requests stripped: the leader's signed header alone, a
    well-formed and validly signed wire message (its digest does not match its empty
    request list unless the batch was empty, so no replica accepts it as a proposal).
    This is the compact form used in equivocation evidence."""
    return canonical_pack([MAGIC, PRE_PREPARE, cluster_id, leader, [view, seq, agreed_time_ms, [], digest], signature])


def result_vote_bytes(cluster_id: str, seq: int, root: bytes) -> bytes:
    return signing_bytes(RESULT_VOTE, cluster_id, [seq, root])


# --------------------------------------------------------------------------- envelope


@dataclass(frozen=True, slots=True)
class Message:
    """A decoded wire message. ``raw`` is kept so it can be forwarded as proof."""

    kind: str
    cluster_id: str
    signer: str
    payload: Body
    signature: bytes
    raw: bytes

    def signed_bytes(self) -> bytes:
        return signing_bytes(self.kind, self.cluster_id, signed_fields(self.payload))


def encode(cluster_id: str, signer: str, payload: Body, sign: Any = None) -> bytes:
    """Wire bytes; ``sign`` (bytes -> bytes) is required for signed kinds."""
    kind = _KIND_OF[type(payload)]
    signature = b""
    if kind in SIGNED_KINDS:
        signature = sign(signing_bytes(kind, cluster_id, signed_fields(payload)))
    return canonical_pack([MAGIC, kind, cluster_id, signer, payload.body(), signature])


def encode_signed(cluster_id: str, signer: str, payload: Body, signature: bytes) -> bytes:
    """Wire bytes with a signature made elsewhere (e.g. a pre-prepare header signed first)."""
    return canonical_pack([MAGIC, _KIND_OF[type(payload)], cluster_id, signer, payload.body(), signature])


def decode(data: bytes, max_size: int = MAX_MESSAGE_BYTES) -> Message:
    """Bounded decode into a typed message. Raises ``DecodeError`` naming the field.
    Does not check the signature (that needs the key ring): see ``verify``."""
    # No generic depth walk: the typed parsers below check every element at its fixed
    # place and refuse anything else at once (the C unpacker bounds recursion itself).
    value = unpack_bounded(data, max_size=max_size, field="message", max_depth=None, max_container=MAX_BATCH_REQUESTS,
                           max_elements=MAX_MESSAGE_ELEMENTS)
    if not isinstance(value, list) or len(value) != 6:
        raise DecodeError("message", "expected a 6-element array")
    magic, kind, cluster_id, signer, body, signature = value
    if magic != MAGIC:
        raise DecodeError("message.magic", f"expected {MAGIC!r}")
    parser = _PARSERS.get(kind) if isinstance(kind, str) else None
    if parser is None:
        raise DecodeError("message.kind", f"unknown kind {kind!r}")
    _str(cluster_id, "message.cluster_id", 256)
    _str(signer, "message.signer", MAX_NODE_ID_CHARS)
    _bytes(signature, "message.signature", MAX_SIGNATURE_BYTES)
    if kind in UNSIGNED_KINDS and signature:
        raise DecodeError("message.signature", f"must be empty: {kind} is not a signed kind")
    if not isinstance(body, list):
        raise DecodeError(f"{kind}.body", "expected an array")
    payload = parser(body, kind)
    return Message(kind, cluster_id, signer, payload, signature, bytes(data))


def verify(message: Message, keyring: Any, cluster_id: str) -> bool:
    """Signature by ``message.signer`` (a known validator) over this cluster's bytes."""
    if message.cluster_id != cluster_id or message.signer not in keyring:
        return False
    if message.kind not in SIGNED_KINDS:
        return True
    return keyring.verify(message.signer, message.signed_bytes(), message.signature)


def decode_verified(data: Any, keyring: Any, cluster_id: str | None, kind: str | None) -> Message | None:
    """Decode a nested proof and check its kind and signature; None when anything fails.
    ``kind=None`` accepts any kind; ``cluster_id=None`` checks the signature over the
    message's own cluster id (evidence compares cluster ids across messages itself)."""
    if not isinstance(data, bytes):
        return None
    try:
        msg = decode(data)
    except DecodeError:
        return None
    if kind is not None and msg.kind != kind:
        return None
    if not verify(msg, keyring, msg.cluster_id if cluster_id is None else cluster_id):
        return None
    return msg


# --------------------------------------------------------------------------- field checks


def _int(v: Any, field: str, lo: int = 0, hi: int = 2**62) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise DecodeError(field, f"expected an integer in [{lo}, {hi}]")
    return v


def _bytes(v: Any, field: str, max_len: int, exact: int | None = None) -> bytes:
    if not isinstance(v, bytes) or len(v) > max_len or (exact is not None and len(v) != exact):
        raise DecodeError(field, f"expected bytes ({exact if exact is not None else '<= ' + str(max_len)})")
    return v


def _str(v: Any, field: str, max_len: int) -> str:
    if not isinstance(v, str) or not v or len(v) > max_len:
        raise DecodeError(field, f"expected a non-empty string of at most {max_len} characters")
    return v


def _list(v: Any, field: str, max_len: int, exact: int | None = None) -> list[Any]:
    if not isinstance(v, list) or len(v) > max_len or (exact is not None and len(v) != exact):
        raise DecodeError(field, f"expected an array of {exact if exact is not None else 'at most ' + str(max_len)}")
    return v


def _batch(v: Any, field: str) -> Batch:
    items = _list(v, field, MAX_BATCH_REQUESTS)
    out: list[tuple[str, bytes]] = []
    total = 0
    seen: set[str] = set()
    for i, item in enumerate(items):
        pair = _list(item, f"{field}[{i}]", 2, exact=2)
        rid = _str(pair[0], f"{field}[{i}].request_id", MAX_REQUEST_ID_CHARS)
        req = _bytes(pair[1], f"{field}[{i}].request", MAX_BATCH_BYTES)
        if rid in seen:
            raise DecodeError(f"{field}[{i}].request_id", "duplicate request id in one batch")
        seen.add(rid)
        total += len(req) + len(rid)
        if total > MAX_BATCH_BYTES:
            raise DecodeError(field, f"batch larger than {MAX_BATCH_BYTES} bytes")
        out.append((rid, req))
    return tuple(out)


def _wires(v: Any, field: str) -> tuple[bytes, ...]:
    items = _list(v, field, MAX_PROOF_ITEMS)
    return tuple(_bytes(x, f"{field}[{i}]", MAX_MESSAGE_BYTES) for i, x in enumerate(items))


def _view_seq_digest(b: list[Any], k: str) -> tuple[int, int, bytes]:
    _list(b, k, 3, exact=3)
    return _int(b[0], f"{k}.view"), _int(b[1], f"{k}.seq", 1), _bytes(b[2], f"{k}.digest", 32, exact=32)


def _p_prepare(b: list[Any], k: str) -> Prepare:
    _list(b, k, 5, exact=5)
    return Prepare(_int(b[0], f"{k}.view"), _int(b[1], f"{k}.seq", 1), _bytes(b[2], f"{k}.digest", 32, exact=32),
                   _int(b[3], f"{k}.agreed_time_ms"), _bytes(b[4], f"{k}.leader_signature", MAX_SIGNATURE_BYTES))


def _prepared(b: Any, k: str) -> PreparedCert:
    b = _list(b, k, 4, exact=4)
    return PreparedCert(_int(b[0], f"{k}.view"), _int(b[1], f"{k}.seq", 1), _bytes(b[2], f"{k}.digest", 32, exact=32),
                        _wires(b[3], f"{k}.prepares"))


def _committed(b: Any, k: str) -> CommittedBatch:
    b = _list(b, k, 5, exact=5)
    return CommittedBatch(_int(b[0], f"{k}.view"), _int(b[1], f"{k}.seq", 1), _int(b[2], f"{k}.agreed_time_ms"),
                          _batch(b[3], f"{k}.requests"), _wires(b[4], f"{k}.commits"))


def _p_preprepare(b: list[Any], k: str) -> PrePrepare:
    _list(b, k, 5, exact=5)
    return PrePrepare(_int(b[0], f"{k}.view"), _int(b[1], f"{k}.seq", 1), _int(b[2], f"{k}.agreed_time_ms"),
                      _batch(b[3], f"{k}.requests"), _bytes(b[4], f"{k}.digest", 32, exact=32))


def _p_viewchange(b: list[Any], k: str) -> ViewChange:
    _list(b, k, 4, exact=4)
    prepared = tuple(_prepared(p, f"{k}.prepared[{i}]") for i, p in enumerate(_list(b[3], f"{k}.prepared", MAX_PROOF_ITEMS)))
    return ViewChange(_int(b[0], f"{k}.new_view", 1), _int(b[1], f"{k}.stable_seq"), _wires(b[2], f"{k}.checkpoint_proof"), prepared)


def _certified(b: Any, k: str) -> CertifiedResults:
    b = _list(b, k, 4, exact=4)
    entries = []
    total = 0
    for i, e in enumerate(_list(b[2], f"{k}.entries", MAX_BATCH_REQUESTS)):
        e = _list(e, f"{k}.entries[{i}]", 3, exact=3)
        entry = (_str(e[0], f"{k}.entries[{i}].request_id", MAX_REQUEST_ID_CHARS),
                 _bytes(e[1], f"{k}.entries[{i}].request_digest", 32, exact=32),
                 _bytes(e[2], f"{k}.entries[{i}].result", MAX_BATCH_BYTES))
        total += len(entry[2])
        if total > MAX_BATCH_BYTES:
            raise DecodeError(f"{k}.entries", "results larger than the batch limit")
        entries.append(entry)
    sigs = []
    for i, x in enumerate(_list(b[3], f"{k}.signatures", MAX_PROOF_ITEMS)):
        x = _list(x, f"{k}.signatures[{i}]", 2, exact=2)
        sigs.append((_str(x[0], f"{k}.signatures[{i}].node_id", MAX_NODE_ID_CHARS),
                     _bytes(x[1], f"{k}.signatures[{i}].signature", MAX_SIGNATURE_BYTES)))
    return CertifiedResults(_int(b[0], f"{k}.seq", 1), _int(b[1], f"{k}.view"), tuple(entries), tuple(sigs))


_PARSERS: dict[str, Any] = {
    PRE_PREPARE: _p_preprepare,
    PREPARE: _p_prepare,
    COMMIT: lambda b, k: Commit(*_view_seq_digest(b, k)),
    RESULT_VOTE: lambda b, k: ResultVote(_int(_list(b, k, 2, exact=2)[0], f"{k}.seq", 1), _bytes(b[1], f"{k}.root", 32, exact=32)),
    CHECKPOINT: lambda b, k: CheckpointVote(_int(_list(b, k, 2, exact=2)[0], f"{k}.seq", 1), _bytes(b[1], f"{k}.state_digest", 32, exact=32)),
    VIEW_CHANGE: _p_viewchange,
    NEW_VIEW: lambda b, k: NewView(_int(_list(b, k, 2, exact=2)[0], f"{k}.view", 1), _wires(b[1], f"{k}.view_changes")),
    REQUEST: lambda b, k: RequestMsg(_str(_list(b, k, 2, exact=2)[0], f"{k}.request_id", MAX_REQUEST_ID_CHARS), _bytes(b[1], f"{k}.request", MAX_BATCH_BYTES)),
    FETCH_STATE: lambda b, k: FetchState(_int(_list(b, k, 1, exact=1)[0], f"{k}.seq")),
    STATE: lambda b, k: StateReply(_int(_list(b, k, 3, exact=3)[0], f"{k}.seq", 1), _bytes(b[1], f"{k}.snapshot", MAX_MESSAGE_BYTES), _wires(b[2], f"{k}.checkpoint_proof")),
    FETCH_BATCHES: lambda b, k: FetchBatches(_int(_list(b, k, 2, exact=2)[0], f"{k}.from_seq", 1), _int(b[1], f"{k}.to_seq", 1)),
    BATCHES: lambda b, k: BatchesReply(tuple(_committed(x, f"{k}.batches[{i}]") for i, x in enumerate(_list(_list(b, k, 1, exact=1)[0], f"{k}.batches", MAX_BATCHES_PER_REPLY)))),
    FETCH_VIEW: lambda b, k: FetchView(_int(_list(b, k, 1, exact=1)[0], f"{k}.view")),
    FETCH_RESULTS: lambda b, k: FetchResults(_int(_list(b, k, 2, exact=2)[0], f"{k}.from_seq", 1), _int(b[1], f"{k}.to_seq", 1)),
    RESULTS: lambda b, k: ResultsReply(tuple(_certified(x, f"{k}.batches[{i}]") for i, x in enumerate(_list(_list(b, k, 1, exact=1)[0], f"{k}.batches", MAX_BATCHES_PER_REPLY)))),
    FETCH_BODY: lambda b, k: FetchBody(_int(_list(b, k, 2, exact=2)[0], f"{k}.seq", 1), _bytes(b[1], f"{k}.digest", 32, exact=32)),
    BODY: lambda b, k: BodyReply(_int(_list(b, k, 3, exact=3)[0], f"{k}.seq", 1), _int(b[1], f"{k}.agreed_time_ms"), _batch(b[2], f"{k}.requests")),
}
