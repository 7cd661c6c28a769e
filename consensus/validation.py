"""Validation as a deterministic function of (request, replicated state, agreed time).

Two phases, so the node can use its cores:

* **precheck** — stateless and pure (work, stake signature, space, CSR/policy). Exposed
  as independent callables (``precheck_parts``) the node may run on a thread pool; the
  crypto libraries release the GIL while verifying.
* **execute** — in consensus order, single-threaded: the stateful time check, then the
  verdict, and (only for a Valid request) advancing the holder's time head.

``ValidationApp`` plugs both into the replica's ``Application`` protocol.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from functools import partial
from dataclasses import dataclass
from typing import Any

from consensus.codec import DecodeError, canonical_pack, pack_trusted, unpack_bounded
from consensus.csr import check_csr, check_policy
from consensus.proofs.binding import request_binding
from consensus.proofs.params import ValidationParams
from consensus.proofs.reasons import CODES, Reason, ordered, reason
from consensus.proofs.space import check_space
from consensus.proofs.stake import check_stake
from consensus.proofs.timeproof import check_time
from consensus.proofs.work import check_work
from consensus.requests import (
    CertificateValidationRequest,
    FourProofValidationRequest,
    ValidationRequest,
    decode_request,
    parse_request,
)

__all__ = [
    "CertificateValidationRequest", "FourProofValidationRequest", "Outcome", "Precheck", "Reason",
    "ValidationApp", "ValidationParams", "ValidationRequest", "ValidationState", "combine_precheck",
    "decode_outcome", "decode_request", "execute", "execute_prechecked", "parse_request", "precheck", "precheck_parts",
]

VALID = "Valid"
INVALID = "Invalid"
MAX_OUTCOME_BYTES = 64 * 1024
MAX_STATE_BYTES = 256 * 1024 * 1024
TIME_HEAD_PRUNE_EVERY = 16  # sequence numbers between sweeps of stale time heads
MIN_DEDUP_WINDOW_MS = 10 * 60 * 1000


def dedup_window_ms(params: ValidationParams) -> int:
    """How long the cluster remembers executed request ids (``ReplicaConfig.dedup_window_ms``).
    Derived from the manifest so every validator uses the same value. Half of it bounds
    how far a request's timestamp may be from the agreed time and still be executed (as
    Valid, or Invalid with ``time.outside_offset``); farther requests are refused as
    expired. At least 4x the allowed time offset, and at least 10 minutes."""
    return max(MIN_DEDUP_WINDOW_MS, 4 * params.max_time_offset_ms)
PrecheckPart = Callable[[], list[Reason]]
PrecheckRunner = Callable[[list[PrecheckPart]], list[list[Reason]]]


# ---------------------------------------------------------------------------
# precheck (stateless, parallelizable)
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Precheck:
    """All that execution needs of a prechecked request. The precheck thread builds it,
    so the event loop neither hashes the request nor keeps its decoded form."""

    request_digest: bytes
    holder: bytes  # holder id (the time chain key)
    reasons: tuple[Reason, ...]
    request_id: str
    kind: str
    timestamp_ms: int  # the time proof's timestamp


def precheck_parts(request: ValidationRequest, params: ValidationParams, kem_private_key: bytes) -> list[PrecheckPart]:
    """Independent pure callables: work, stake, space, and for certificates policy+CSR.
    Order is fixed; combine their results with ``combine_precheck``."""
    binding = request_binding(request)
    proofs = request.proofs
    parts: list[PrecheckPart] = [
        lambda: check_work(proofs.work, binding, params),
        lambda: check_stake(proofs, binding, params),
        lambda: check_space(proofs.space, binding, params, kem_private_key),
    ]
    if isinstance(request, CertificateValidationRequest):
        parts.append(lambda: check_policy(request, params) + check_csr(request, params))
    return parts


def combine_precheck(request: ValidationRequest, results: Sequence[list[Reason]]) -> Precheck:
    return Precheck(
        request_digest=request.digest,
        holder=request_binding(request)[3],
        reasons=ordered([r for part in results for r in part]),
        request_id=request.request_id,
        kind=request.kind,
        timestamp_ms=request.proofs.time.timestamp_ms,
    )


def precheck(request: ValidationRequest, params: ValidationParams, kem_private_key: bytes) -> Precheck:
    return combine_precheck(request, [part() for part in precheck_parts(request, params, kem_private_key)])


# ---------------------------------------------------------------------------
# replicated state
# ---------------------------------------------------------------------------


class ValidationState:
    """Per-holder time head: the timestamp of the holder's last *accepted* time proof.
    Grows by one entry per distinct holder (32-byte id + integer)."""

    __slots__ = ("_heads",)

    def __init__(self, heads: dict[bytes, int] | None = None) -> None:
        self._heads: dict[bytes, int] = dict(heads or {})

    def last_time(self, holder: bytes) -> int | None:
        return self._heads.get(holder)

    def advance(self, holder: bytes, timestamp_ms: int) -> None:
        previous = self._heads.get(holder)
        if previous is not None and timestamp_ms <= previous:
            raise ValueError("time heads only move forward")  # execute() checks this first
        self._heads[holder] = timestamp_ms

    def __len__(self) -> int:
        return len(self._heads)

    def forget_before(self, cutoff_ms: int) -> int:
        """Drop heads older than ``cutoff_ms`` = agreed time - max offset: every time
        proof that passes the offset check is newer than such a head anyway, so the
        head no longer decides anything. Returns how many were dropped."""
        old = [h for h, ms in self._heads.items() if ms < cutoff_ms]
        for h in old:
            del self._heads[h]
        return len(old)

    def snapshot(self) -> bytes:
        """canonical_pack([1, [[holder, ms], ...]]) sorted by holder id (holders are
        distinct 32-byte strings and heads ints: execute() and from_snapshot check)."""
        return pack_trusted([1, sorted(self._heads.items())])

    def digest(self) -> bytes:
        return hashlib.sha256(self.snapshot()).digest()

    @classmethod
    def from_snapshot(cls, data: bytes) -> ValidationState:
        raw = unpack_bounded(data, max_size=MAX_STATE_BYTES, field="state", max_depth=3)
        if not (isinstance(raw, list) and len(raw) == 2 and raw[0] == 1 and isinstance(raw[1], list)):
            raise DecodeError("state", "expected [1, [[holder, ms], ...]]")
        heads: dict[bytes, int] = {}
        previous = b""
        for i, entry in enumerate(raw[1]):
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], bytes) and len(entry[0]) == 32
                    and isinstance(entry[1], int) and not isinstance(entry[1], bool) and 0 <= entry[1] < 1 << 63):
                raise DecodeError(f"state.{i}", "expected [32-byte holder, ms]")
            if entry[0] <= previous:
                raise DecodeError(f"state.{i}", "holders not strictly sorted")
            previous = entry[0]
            heads[entry[0]] = entry[1]
        return cls(heads)

    def restore(self, data: bytes) -> None:
        """Replace the contents in place (validated first, so a bad snapshot changes nothing)."""
        self._heads = ValidationState.from_snapshot(data)._heads


# ---------------------------------------------------------------------------
# outcome
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    request_id: str  # "" when the request bytes were undecodable
    kind: str  # "proofs" | "certificate" | "unknown"
    status: str  # "Valid" | "Invalid"
    reasons: tuple[Reason, ...]
    agreed_time_ms: int
    request_digest: bytes  # sha256 of the request encoding (of the raw bytes if undecodable)

    def encode(self) -> bytes:
        """canonical_pack([1, request_id, kind, status, [[proof, code, message]...], agreed_time_ms, request_digest])"""
        return canonical_pack([
            1, self.request_id, self.kind, self.status,
            [[r.proof, r.code, r.message] for r in self.reasons], self.agreed_time_ms, self.request_digest,
        ])

    def to_wire(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "kind": self.kind,
            "status": self.status,
            "reasons": [r.to_wire() for r in self.reasons],
            "agreed_time_ms": self.agreed_time_ms,
            "request_digest": self.request_digest,
        }


def decode_outcome(data: bytes) -> Outcome:
    raw = unpack_bounded(data, max_size=MAX_OUTCOME_BYTES, field="outcome", max_depth=3)
    if not (isinstance(raw, list) and len(raw) == 7 and type(raw[0]) is int and raw[0] == 1):  # True == 1
        raise DecodeError("outcome", "expected [1, request_id, kind, status, reasons, agreed_time_ms, request_digest]")
    _, request_id, kind, status, reasons, agreed, rdigest = raw
    if not isinstance(request_id, str) or len(request_id) > 128:
        raise DecodeError("outcome.request_id", "expected a string of at most 128 characters")
    if kind not in ("proofs", "certificate", "unknown"):
        raise DecodeError("outcome.kind", "unknown kind")
    if status not in (VALID, INVALID):
        raise DecodeError("outcome.status", "expected Valid or Invalid")
    if not isinstance(agreed, int) or isinstance(agreed, bool):
        raise DecodeError("outcome.agreed_time_ms", "expected an integer")
    if not isinstance(rdigest, bytes) or len(rdigest) != 32:
        raise DecodeError("outcome.request_digest", "expected 32 bytes")
    if not isinstance(reasons, list):
        raise DecodeError("outcome.reasons", "expected a list")
    parsed: list[Reason] = []
    for i, r in enumerate(reasons):
        if not (isinstance(r, list) and len(r) == 3 and all(isinstance(x, str) for x in r) and r[1] in CODES
                and r[0] == r[1].split(".", 1)[0]):
            raise DecodeError(f"outcome.reasons.{i}", "expected [proof, known code, message]")
        parsed.append(Reason(r[0], r[1], r[2]))
    if (status == VALID) == bool(parsed):
        raise DecodeError("outcome.status", "Valid exactly when there are no reasons")
    return Outcome(request_id, kind, status, tuple(parsed), agreed, rdigest)


# ---------------------------------------------------------------------------
# execute (stateful, in consensus order)
# ---------------------------------------------------------------------------


def execute(
    request: ValidationRequest, pre: Precheck, state: ValidationState, agreed_time_ms: int, params: ValidationParams
) -> Outcome:
    if pre.request_digest != request.digest or pre.request_id != request.request_id:
        raise ValueError("precheck belongs to another request")
    return execute_prechecked(pre, state, agreed_time_ms, params)


def execute_prechecked(pre: Precheck, state: ValidationState, agreed_time_ms: int, params: ValidationParams) -> Outcome:
    """``execute`` on what ``combine_precheck`` kept: the time check against the holder's
    head, the verdict, and (only for a Valid request) the head's advance."""
    time_reasons = check_time(pre.timestamp_ms, state.last_time(pre.holder), agreed_time_ms, params)
    reasons = ordered(list(pre.reasons) + time_reasons)
    if not reasons:
        state.advance(pre.holder, pre.timestamp_ms)
    return Outcome(pre.request_id, pre.kind, INVALID if reasons else VALID, reasons, agreed_time_ms, pre.request_digest)


def malformed_outcome(data: bytes, error: DecodeError, agreed_time_ms: int) -> Outcome:
    """What every replica answers for request bytes that do not decode (a faulty leader).
    The message must not depend on library versions, so msgpack's own text is dropped."""
    message = "not a valid bounded msgpack request" if error.field == "request" else f"{error.field}: {error.message}"
    return Outcome("", "unknown", INVALID, (reason("request.malformed", message),), agreed_time_ms, hashlib.sha256(data).digest())


def _sequential(parts: list[PrecheckPart]) -> list[list[Reason]]:
    return [part() for part in parts]


Decoded = ValidationRequest | DecodeError
Checked = Precheck | DecodeError  # a prechecked request, or why its bytes do not decode
BackgroundSubmit = Callable[[Callable[[], list[Checked]]], "Future[list[Checked]]"]
PREFETCH_CHUNK = 8  # at most this many requests per background task: fewer thread hand-offs than one per request
MAX_PREFETCHED = 1024  # bounded: batches that never execute (a view change) age out


def _decode(data: bytes) -> Decoded:
    try:
        return decode_request(data)
    except DecodeError as exc:
        return exc


def _check_chunk(requests: list[bytes], params: ValidationParams, kem_private_key: bytes) -> list[Checked]:
    """Pure: decode and precheck, with no access to the replicated state."""
    out: list[Checked] = []
    for data in requests:
        item = _decode(data)
        out.append(item if isinstance(item, DecodeError) else precheck(item, params, kem_private_key))
    return out


class ValidationApp:
    """The replicated application: ``execute_batch`` / ``snapshot`` / ``restore``.

    ``prefetch`` decodes and prechecks requests ahead of execution and keeps the results
    until ``execute_batch`` (or ``request_time_ms``) takes them. With ``background`` (a
    thread pool's ``submit``) that work runs there, as soon as the replica accepts a
    batch, so execution (in order, on the node's event loop) mostly finds it done and the
    loop keeps reading the network instead of stalling while a large batch is verified.
    Without it, prefetching runs inline. ``background_workers`` is how many threads
    serve ``background``: a small batch is split among them.
    """

    def __init__(self, params: ValidationParams, kem_private_key: bytes, precheck_runner: PrecheckRunner | None = None,
                 background: BackgroundSubmit | None = None, background_workers: int = 1) -> None:
        self.params = params
        self.state = ValidationState()
        self._kem_private_key = kem_private_key
        self._run = precheck_runner or _sequential
        self._background = background
        self._background_workers = max(1, background_workers)
        self._prefetched: dict[bytes, tuple[Future[list[Checked]], int]] = {}  # insertion order = age

    def prefetch(self, requests: list[bytes]) -> None:
        todo = [data for data in dict.fromkeys(requests) if data not in self._prefetched]
        # Up to PREFETCH_CHUNK requests per task, but a small batch is still spread over
        # every worker: at low load its checks then take half the time, not all of it
        # on one thread while the other idles.
        size = min(PREFETCH_CHUNK, -(-len(todo) // self._background_workers)) if todo else 1
        for i in range(0, len(todo), size):
            chunk = todo[i:i + size]
            task = partial(_check_chunk, chunk, self.params, self._kem_private_key)
            if self._background is not None:
                future = self._background(task)
            else:
                future = Future()
                future.set_result(task())
            for j, data in enumerate(chunk):
                self._prefetched[data] = (future, j)
        while len(self._prefetched) > MAX_PREFETCHED:
            del self._prefetched[next(iter(self._prefetched))]

    def _prefetched_result(self, data: bytes, *, take: bool) -> Checked | None:
        entry = self._prefetched.pop(data, None) if take else self._prefetched.get(data)
        if entry is None:
            return None
        future, index = entry
        return future.result()[index]

    def request_time_ms(self, data: bytes) -> int | None:
        """The time proof's timestamp (None for undecodable bytes, which never expire).
        The request is prefetched if it was not: execution needs that work anyway."""
        checked = self._prefetched_result(data, take=False)
        if checked is None:
            self.prefetch([data])
            checked = self._prefetched_result(data, take=False)
        assert checked is not None
        return None if isinstance(checked, DecodeError) else checked.timestamp_ms

    def execute_batch(self, seq: int, requests: list[bytes], agreed_time_ms: int) -> list[bytes]:
        if seq % TIME_HEAD_PRUNE_EVERY == 0:
            self.state.forget_before(agreed_time_ms - self.params.max_time_offset_ms)
        checked = [self._prefetched_result(data, take=True) for data in requests]
        # What was not prefetched: one flat list of parts, so the runner can use every core.
        parts: list[PrecheckPart] = []
        pending: list[tuple[int, Decoded, int, int]] = []
        for i, (data, done) in enumerate(zip(requests, checked)):
            if done is None:
                item = _decode(data)
                start = len(parts)
                if not isinstance(item, DecodeError):
                    parts += precheck_parts(item, self.params, self._kem_private_key)
                pending.append((i, item, start, len(parts)))
        if pending:
            results = self._run(parts)
            if len(results) != len(parts):
                raise RuntimeError("precheck runner returned a different number of results")
            for i, item, start, end in pending:
                checked[i] = item if isinstance(item, DecodeError) else combine_precheck(item, results[start:end])
        out: list[bytes] = []
        for data, done in zip(requests, checked):
            assert done is not None
            if isinstance(done, DecodeError):
                out.append(malformed_outcome(data, done, agreed_time_ms).encode())
            else:
                out.append(execute_prechecked(done, self.state, agreed_time_ms, self.params).encode())
        return out

    def snapshot(self) -> bytes:
        return self.state.snapshot()

    def restore(self, snapshot: bytes) -> None:
        self.state.restore(snapshot)
