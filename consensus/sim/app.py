"""A deterministic application for the simulator: a hash chain over executed requests.

Why a hash chain: the state after seq s is a digest of *every* request executed before
it, in order, so two replicas whose states match at a seq provably executed the same
history (total order), and a result (which depends on the state) differs as soon as
histories differ. Snapshot/restore are trivial, so checkpoints and state transfer are
exercised for real.

The app also keeps an *execution log* that is not part of its state: the simulator reads
it to check exactly-once and agreement without trusting the replica's own reports.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from consensus.codec import canonical_pack, unpack_bounded

GENESIS = hashlib.sha256(b"hypermesh-sim-genesis").digest()


def encode_request(request_id: str, body: bytes, stamp_ms: int | None = None) -> bytes:
    """The bytes the client submits: the id travels inside, so the app can log it; with
    ``stamp_ms`` the request also carries a timestamp (de-dup expiry scenarios)."""
    value: dict[str, object] = {"id": request_id, "body": body}
    if stamp_ms is not None:
        value["t"] = stamp_ms
    return canonical_pack(value)


def request_id_of(request: bytes) -> str:
    """The id inside a simulator request, or ``"?"`` for bytes the client never made
    (a Byzantine leader could order anything; validity flags those)."""
    try:
        value = unpack_bounded(request, max_size=1 << 20, field="request")
    except ValueError:
        return "?"
    if isinstance(value, dict) and isinstance(value.get("id"), str):
        return value["id"]
    return "?"


@dataclass(frozen=True, slots=True)
class Execution:
    """One batch executed by one app instance (one incarnation of one replica)."""

    seq: int
    agreed_time_ms: int
    requests: tuple[bytes, ...]
    results: tuple[bytes, ...]
    state_before: bytes
    state_after: bytes

    @property
    def batch_digest(self) -> bytes:
        return hashlib.sha256(canonical_pack([self.seq, self.agreed_time_ms, list(self.requests)])).digest()


@dataclass(slots=True)
class HashChainApp:
    """``state = H(state || seq || time || request)``; ``result = H("result" || state || request)``."""

    state: bytes = GENESIS
    executed: int = 0
    log: list[Execution] = field(default_factory=list)
    restores: list[bytes] = field(default_factory=list)

    def execute_batch(self, seq: int, requests: list[bytes], agreed_time_ms: int) -> list[bytes]:
        before = self.state
        results: list[bytes] = []
        for request in requests:
            results.append(hashlib.sha256(b"result" + self.state + request).digest())
            self.state = hashlib.sha256(
                self.state + seq.to_bytes(8, "big") + agreed_time_ms.to_bytes(8, "big", signed=True) + request
            ).digest()
            self.executed += 1
        self.log.append(Execution(seq, agreed_time_ms, tuple(requests), tuple(results), before, self.state))
        return results

    def request_time_ms(self, request: bytes) -> int | None:
        try:
            value = unpack_bounded(request, max_size=1 << 20, field="request")
        except ValueError:
            return None
        stamp = value.get("t") if isinstance(value, dict) else None
        return stamp if type(stamp) is int else None

    def snapshot(self) -> bytes:
        return canonical_pack([self.state, self.executed])

    def restore(self, snapshot: bytes) -> None:
        value = unpack_bounded(snapshot, max_size=1024, field="snapshot")
        if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], bytes) and isinstance(value[1], int)):
            raise ValueError("not a hash-chain snapshot")
        self.state, self.executed = value[0], value[1]
        self.restores.append(snapshot)
