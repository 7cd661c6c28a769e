"""The client API of a validator: the STOQ handlers behind each path.

Paths (seed names kept): ``consensus/validate_certificate``, ``consensus/validate_proofs``,
``consensus/validation_status``, ``consensus/health``, ``consensus/evidence`` and
``cluster/status``. Payloads are documented in docs/API.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from opentelemetry import trace

from consensus.codec import DecodeError
from consensus.crypto import backend
from consensus.messages import request_digest as digest_of_request
from consensus.requests import REQUEST_ID_RE
from consensus.validation import decode_outcome, parse_request
from transport.envelope import DEFAULT_MAX_ENVELOPE_BYTES, ApiError, ErrorCode

from .cache import ResultCache
from .metrics import NodeMetrics
from .runtime import NodeStopping, NotAccepted, ReplicaDriver
from .tracing import trace_id_of
from .store import StoredResult

log = logging.getLogger("hypermesh.service")

VERSION = "0.1.0"
SERVICE_NAME = "hypermesh-consensus"
EVIDENCE_REPLY_BYTES = DEFAULT_MAX_ENVELOPE_BYTES // 2  # evidence messages per consensus/evidence reply


@dataclass(frozen=True, slots=True)
class ServiceLimits:
    max_validations: int = 100
    validation_timeout_s: float = 30.0
    vote_grace_s: float = 0.05


def result_payload(stored: StoredResult) -> dict[str, Any]:
    """The ValidationResult a client receives: the outcome, how many validators signed
    it, and the certificate that lets the client check all of that on its own."""
    try:
        outcome: dict[str, Any] = decode_outcome(stored.result).to_wire()
    except DecodeError as exc:
        # Certified bytes this node cannot read (a newer outcome version, or more than f
        # faulty validators): still an answer, with the certificate, never a crash.
        outcome = {"error": f"the certified outcome cannot be decoded by this node ({exc.field}: {exc.message})"}
    return {
        **outcome,
        "request_id": stored.request_id,
        "status": stored.status,
        "metrics": {
            "validator_nodes": stored.agreeing,
            "total_validators": stored.n,
            "confidence_level": round(stored.agreeing / stored.n, 6),
            "seq": stored.seq,
        },
        "leader": stored.leader,
        "view": stored.view,
        "result": stored.result,
        "certificate": stored.certificate,
    }


class ValidationService:
    def __init__(
        self,
        *,
        node_id: str,
        cluster_id: str,
        driver: ReplicaDriver,
        metrics: NodeMetrics,
        limits: ServiceLimits,
        cache: ResultCache | None,
        peer_stats: Any = None,
        tracer: Any = None,
        fetch_certified: Callable[[str, int], Awaitable[StoredResult | None]] | None = None,
    ) -> None:
        self.node_id = node_id
        self.cluster_id = cluster_id
        self.driver = driver
        self.metrics = metrics
        self.limits = limits
        self.cache = cache
        self.peer_stats = peer_stats
        self.tracer = tracer or trace.NoOpTracer()
        self.fetch_certified = fetch_certified  # ResultRepair.fetch_certified
        self._fetching: dict[str, asyncio.Future[StoredResult | None]] = {}
        self.started = time.time()
        self.in_flight = 0
        self._short_results = 0  # consecutive results whose grace ran out before all n votes came
        self._grace_probe = 0

    def handlers(self) -> dict[str, Any]:
        return {
            "consensus/validate_proofs": self.validate_proofs,
            "consensus/validate_certificate": self.validate_certificate,
            "consensus/validation_status": self.validation_status,
            "consensus/health": self.health,
            "consensus/evidence": self.evidence,
            "cluster/status": self.cluster_status,
        }

    def response_metadata(self) -> dict[str, str]:
        """Every reply names the current leader, so clients can go straight to it."""
        replica = self.driver.replica
        return {"leader": replica.leader, "view": str(replica.view), "node": self.node_id}

    # -- validation -------------------------------------------------------------------

    async def validate_proofs(self, payload: Any, ctx: Any) -> dict[str, Any]:
        return await self._validate("proofs", payload, ctx)

    async def validate_certificate(self, payload: Any, ctx: Any) -> dict[str, Any]:
        return await self._validate("certificate", payload, ctx)

    async def _validate(self, kind: str, payload: Any, ctx: Any) -> dict[str, Any]:
        with self.tracer.start_as_current_span(f"validate_{kind}") as span:
            trace_id = trace_id_of(span)
            if trace_id:
                ctx.response_metadata["trace_id"] = trace_id
            result = await self._validate_traced(kind, payload, span)
            span.set_attribute("hypermesh.status", str(result.get("status")))
            metrics = result.get("metrics") or {}
            if "seq" in metrics:
                span.set_attribute("hypermesh.seq", metrics["seq"])
                span.set_attribute("hypermesh.validator_nodes", metrics["validator_nodes"])
            return result

    async def _validate_traced(self, kind: str, payload: Any, span: Any) -> dict[str, Any]:
        try:
            request = parse_request(kind, payload)
        except DecodeError as exc:
            raise ApiError(ErrorCode.InvalidRequest, f"{exc.field}: {exc.message}") from None
        encoded = request.encode()
        request_digest = digest_of_request(encoded)  # remembered: the replica hashes these bytes again
        span.set_attribute("hypermesh.request_id", request.request_id)

        if self.cache is not None:
            cached = self.cache.get(request_digest)
            if cached is not None:
                self.metrics.cache_hits.inc()
                self.metrics.validations.labels(kind, str(cached.get("status"))).inc()
                span.set_attribute("hypermesh.cache_hit", True)
                return cached
            self.metrics.cache_misses.inc()

        stored = self.driver.store.get_result(request.request_id)
        if stored is not None:
            return self._finished(kind, stored, request_digest, started=None)

        if self.in_flight >= self.limits.max_validations:
            raise ApiError(
                ErrorCode.Overloaded,
                f"{self.limits.max_validations} validations already in flight on {self.node_id} "
                "(--max-validations); retry with backoff or use another node",
            )
        pending = self.driver.store.get_pending(request.request_id)
        if pending is not None and pending.request_digest != request_digest:
            raise ApiError(ErrorCode.InvalidRequest, "request_id: already used for a different request")

        started = time.perf_counter()
        self.in_flight += 1
        self.metrics.in_flight.inc()
        future = self.driver.submit(request.request_id, request_digest, kind, encoded)
        try:
            stored = await asyncio.wait_for(asyncio.shield(future), self.limits.validation_timeout_s)
        except (asyncio.TimeoutError, NodeStopping):  # --request-timeout, or this node is shutting down
            self.driver.forget_waiter(request.request_id, future)
            # Accepted and durable: the client can poll validation_status for the result.
            return self._pending_answer(request.request_id)
        except NotAccepted:
            raise ApiError(
                ErrorCode.TransportError,
                f"{self.node_id} could not store the request (its disk refused a write) and is stopping: "
                "it was not accepted; send it to another node",
            ) from None
        else:
            if stored.agreeing < stored.n and self._should_wait_for_votes():
                stored = await self.driver.wait_for_votes(stored, self.limits.vote_grace_s)
            # "Three answers in a row" short of votes: a complete answer breaks the run.
            self._short_results = 0 if stored.agreeing >= stored.n else self._short_results + 1
            # What the client is told, after the grace wait (the alert on it expects 1.0
            # from a healthy cluster).
            self.metrics.confidence.observe(stored.agreeing / stored.n)
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()
        return self._finished(kind, stored, request_digest, started)

    def _should_wait_for_votes(self) -> bool:
        """Wait for the last votes — unless the last few waits were in vain (a validator
        is down or partitioned): then only every 20th result probes whether it is back,
        so a dead validator does not add the grace period to every answer."""
        if self.limits.vote_grace_s <= 0:
            return False
        if self._short_results < 3:
            return True
        self._grace_probe += 1
        return self._grace_probe % 20 == 0

    def _finished(self, kind: str, stored: StoredResult, request_digest: bytes, started: float | None) -> dict[str, Any]:
        if stored.request_digest != request_digest:
            raise ApiError(ErrorCode.InvalidRequest, "request_id: already used for a different request")
        payload = result_payload(stored)
        if started is not None:  # ordered now, not a retry answered from the store
            self.metrics.latency.labels(kind).observe(time.perf_counter() - started)
        self.metrics.validations.labels(kind, stored.status).inc()
        if self.cache is not None:
            self.cache.put(request_digest, payload)
        return payload

    async def validation_status(self, payload: Any, ctx: Any) -> dict[str, Any]:
        if not isinstance(payload, dict) or not isinstance(payload.get("request_id"), str):
            raise ApiError(ErrorCode.InvalidRequest, "request_id: required, a string")
        request_id = payload["request_id"]
        # The syntax validate_* accepts: an id outside it was never accepted anywhere.
        if not REQUEST_ID_RE.fullmatch(request_id):
            raise ApiError(ErrorCode.InvalidRequest, "request_id: must be 1..128 characters of [A-Za-z0-9._:-]")
        stored = self.driver.store.get_result(request_id)
        if stored is not None:
            return result_payload(stored)
        if self.driver.store.get_pending(request_id) is not None:
            return self._pending_answer(request_id)  # accepted here, not final yet
        seq = self.driver.replica.executed_seq(request_id)
        if seq is not None:
            # Executed, no result here: a batch this node skipped (it caught up through a
            # snapshot), or one whose votes are still arriving. Ask the peers (never when
            # a peer asks us: two nodes in this state would ask each other without end).
            if payload.get("local") is True or self.fetch_certified is None:
                return self._pending_answer(request_id)
            fetched = await self._fetch_once(request_id, seq)
            if fetched is None:
                return self._pending_answer(request_id)
            self.driver.adopt_result(fetched)
            return result_payload(fetched)
        raise ApiError(ErrorCode.NotFound, f"request_id: no request {request_id!r} is known to {self.node_id}")

    async def _fetch_once(self, request_id: str, seq: int) -> StoredResult | None:
        """One fetch per request id at a time: concurrent askers share it."""
        running = self._fetching.get(request_id)
        if running is None:
            assert self.fetch_certified is not None
            running = self._fetching[request_id] = asyncio.ensure_future(self.fetch_certified(request_id, seq))
            running.add_done_callback(lambda _f: self._fetching.pop(request_id, None))
        return await asyncio.shield(running)

    def _pending_answer(self, request_id: str) -> dict[str, Any]:
        return {"request_id": request_id, "status": "Pending", "leader": self.driver.replica.leader}

    # -- health, status, evidence -----------------------------------------------------

    async def health(self, payload: Any, ctx: Any) -> dict[str, Any]:
        replica = self.driver.replica
        return {
            "status": "healthy",
            "service": SERVICE_NAME,
            "version": VERSION,
            "node_id": self.node_id,
            "cluster_id": self.cluster_id,
            "leader": replica.leader,
            "view": replica.view,
            "last_executed_seq": replica.last_executed_seq,
            "uptime_s": round(time.time() - self.started, 3),
            "crypto": backend().report(),
        }

    async def cluster_status(self, payload: Any, ctx: Any) -> dict[str, Any]:
        replica = self.driver.replica
        status = dict(replica.status())
        peers = self.peer_stats() if callable(self.peer_stats) else None
        return {
            "node_id": self.node_id,
            "cluster_id": self.cluster_id,
            "view": replica.view,
            "leader": replica.leader,
            "is_leader": replica.is_leader,
            "last_executed_seq": replica.last_executed_seq,
            "stable_checkpoint_seq": replica.stable_checkpoint_seq,
            "in_flight": self.in_flight,
            "results_stored": self.driver.store.count_results(),
            "evidence": self.driver.store.evidence_counts(),
            "cache": None if self.cache is None else {
                "entries": len(self.cache), "hits": self.cache.stats.hits, "misses": self.cache.stats.misses,
            },
            "peers": _plain(dataclasses.asdict(peers) if dataclasses.is_dataclass(peers) else peers),
            "replica": _plain(status),
        }

    async def evidence(self, payload: Any, ctx: Any) -> dict[str, Any]:
        accused = None
        limit = 100
        before_id: int | None = None
        if isinstance(payload, dict):
            if payload.get("accused") is not None:
                if not isinstance(payload["accused"], str):
                    raise ApiError(ErrorCode.InvalidRequest, "accused: must be a node id string")
                accused = payload["accused"]
            if payload.get("limit") is not None:
                if type(payload["limit"]) is not int or not 0 < payload["limit"] <= 1000:  # bool is an int
                    raise ApiError(ErrorCode.InvalidRequest, "limit: must be an integer 1..1000")
                limit = payload["limit"]
            if payload.get("before_id") is not None:
                if type(payload["before_id"]) is not int or payload["before_id"] < 1:
                    raise ApiError(ErrorCode.InvalidRequest, "before_id: must be a positive integer (an evidence id)")
                before_id = payload["before_id"]
        records = self.driver.store.list_evidence(accused, limit + 1, before_id)
        entries: list[dict[str, Any]] = []
        size = 0
        for r in records[:limit]:
            size += sum(map(len, r.messages)) + len(r.detail) + 256
            if entries and size > EVIDENCE_REPLY_BYTES:
                break  # the reply must fit one envelope: the caller pages on with before_id
            entries.append({
                "id": r.id, "accused": r.accused, "kind": r.kind, "seq": r.seq, "view": r.view,
                "messages": r.messages, "detail": r.detail, "recorded_at": r.recorded_at,
            })
        more = len(entries) < len(records)
        return {
            "node_id": self.node_id,
            "counts": self.driver.store.evidence_counts(),
            "evidence": entries,
            "next_before_id": entries[-1]["id"] if more else None,
        }


def _plain(value: Any) -> Any:
    """Status dicts may hold tuples or other containers msgpack would reject."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    return str(value)


def audit_caller(peer_identity: str | None, remote_address: tuple[Any, ...] | None) -> str | None:
    """Who made a call, for the audit table's ``peer`` column: the common name of the
    client certificate the connection presented (or resumed a session with), else the
    address it came from: ``[::1]:53211``, ``192.0.2.7:5000`` (an IPv4 client of a
    dual-stack socket, ``::ffff:192.0.2.7``, is written as IPv4)."""
    if peer_identity is not None:
        return peer_identity
    if not remote_address or len(remote_address) < 2:
        return None
    host, port = str(remote_address[0]), remote_address[1]
    if host.startswith("::ffff:") and "." in host:  # the kernel's form of a mapped IPv4 address
        host = host[len("::ffff:"):]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def wrap_handler(service: ValidationService, path: str, handler: Any) -> Any:
    """Around every handler: name the leader in the reply metadata, count errors by
    code, and write the audit row."""

    async def wrapped(payload: Any, ctx: Any) -> Any:
        request_id = payload.get("request_id") if isinstance(payload, dict) else None
        request_id = request_id if isinstance(request_id, str) and len(request_id) <= 128 else None

        def audit(outcome: str) -> None:
            caller = audit_caller(ctx.peer_identity, ctx.remote_address)
            service.driver.store.audit(caller, path, request_id, outcome)

        try:
            result = await handler(payload, ctx)
        except ApiError as exc:
            service.metrics.errors.labels(str(exc.code)).inc()
            audit(f"error:{exc.code}")
            raise
        except Exception:  # a bug: the transport logs it and answers HandlerError
            service.metrics.errors.labels(str(ErrorCode.HandlerError)).inc()
            audit(f"error:{ErrorCode.HandlerError}")
            raise
        finally:
            ctx.response_metadata.update(service.response_metadata())
        if path.startswith("consensus/validate"):
            status = result.get("status") if isinstance(result, dict) else None
            audit(f"ok:{status}")
        return result

    return wrapped
