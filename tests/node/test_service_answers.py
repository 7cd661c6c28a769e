"""The service's answer path with a real Store and ReplicaDriver plumbing and a stub
replica: what the client is told, what the metrics and the audit table record."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import node.service as service_module
from transport.envelope import ApiError, ErrorCode
from consensus.actions import Final, ResultCertificate
from consensus.validation import Outcome
from node.metrics import NodeMetrics
from node.runtime import NotAccepted, ReplicaDriver, SteadyClock
from node.service import ServiceLimits, ValidationService, wrap_handler
from node.store import Store


class _Request:
    def __init__(self, request_id: str) -> None:
        self.request_id = request_id

    def encode(self) -> bytes:
        return b"req:" + self.request_id.encode()


class _Replica:
    leader, view = "node-1", 0
    executed: dict[str, int] = {}

    def executed_seq(self, request_id: str) -> int | None:
        return self.executed.get(request_id)

    def submit(self, request_id: str, request: bytes, now: int) -> list[Any]:
        return []

    def propose(self, now: int) -> list[Any]:
        return []

    def set_wall_offset(self, offset_ms: int) -> None:
        pass

    def batch_deadline_ms(self) -> None:
        return None


class _Span:
    def set_attribute(self, *args: Any) -> None:
        pass


class _Ctx:
    peer_identity = None
    remote_address = ("::1", 53211, 0, 0)

    def __init__(self) -> None:
        self.response_metadata: dict[str, Any] = {}


def _driver(store: Store, metrics: NodeMetrics) -> ReplicaDriver:
    """The driver's answer plumbing without its replica, thread pool or tick task."""
    driver = ReplicaDriver.__new__(ReplicaDriver)
    driver.store, driver.metrics, driver.replica, driver.n = store, metrics, _Replica(), 4
    driver._send = lambda to, payload: None
    driver._waiters, driver._vote_events = {}, {}
    driver._out_pending, driver._out_records, driver._out_sends, driver._out_finals, driver._out_answers = [], [], [], [], []
    driver._flush_scheduled, driver._batch_timer, driver._batch_timer_at = False, None, None
    driver.failed, driver.on_fatal = None, None
    driver._clock, driver._wall_offset_ms, driver._guard = SteadyClock(), 0, None
    return driver


def _final(request_id: str, agreeing: int, seq: int, late: bool = False) -> Final:
    digest = hashlib.sha256(b"req:" + request_id.encode()).digest()
    result = Outcome(request_id, "proofs", "Valid", (), 1, digest).encode()
    signatures = tuple((f"node-{i}", b"s") for i in range(1, agreeing + 1))
    certificate = ResultCertificate("c", seq, b"r" * 32, 1, 0, (), signatures)
    return Final(request_id, digest, result, certificate, agreeing, 4, "node-1", 0, late)


@pytest.fixture
def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ValidationService]:
    monkeypatch.setattr(service_module, "parse_request", lambda kind, payload: _Request(payload["request_id"]))
    store = Store(tmp_path / "node.db", background_checkpoints=False)
    metrics = NodeMetrics()
    yield ValidationService(node_id="node-1", cluster_id="c", driver=_driver(store, metrics), metrics=metrics,
                            limits=ServiceLimits(100, 5.0, 5.0), cache=None)
    store.close()


async def _until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)


def _sample(service: ValidationService, name: str, labels: dict[str, str] | None = None) -> float:
    return service.metrics.registry.get_sample_value(name, labels or {}) or 0.0


def test_late_vote_reaches_the_answer_and_the_confidence_metric(service: ValidationService) -> None:
    async def run() -> dict[str, Any]:
        driver = service.driver
        task = asyncio.create_task(service._validate_traced("proofs", {"request_id": "a"}, _Span()))
        await _until(lambda: "a" in driver._waiters)
        driver._apply([_final("a", 3, seq=1)])  # the 2f+1 quorum
        await _until(lambda: "a" in driver._vote_events)  # the service waits for the last vote
        driver._apply([_final("a", 4, seq=1, late=True)])
        return await task

    answer = asyncio.run(run())
    assert answer["metrics"]["validator_nodes"] == 4 and answer["metrics"]["confidence_level"] == 1.0
    assert _sample(service, "hypermesh_result_confidence_count") == 1
    assert _sample(service, "hypermesh_result_confidence_sum") == 1.0  # not the quorum's 0.75


def test_only_consecutive_short_answers_stop_the_grace_wait(service: ValidationService) -> None:
    service.limits = ServiceLimits(100, 5.0, 0.001)  # short answers run out of grace at once

    async def answer(request_id: str, agreeing: int, seq: int) -> None:
        task = asyncio.create_task(service._validate_traced("proofs", {"request_id": request_id}, _Span()))
        await _until(lambda: request_id in service.driver._waiters)
        service.driver._apply([_final(request_id, agreeing, seq)])
        await task

    async def run() -> list[int]:
        runs = []
        for i, agreeing in enumerate([3, 4, 3, 4, 3, 3]):
            await answer(f"c{i}", agreeing, seq=10 + i)
            runs.append(service._short_results)
        return runs

    assert asyncio.run(run()) == [1, 0, 1, 0, 1, 2]
    assert service._should_wait_for_votes()  # two in a row: still waiting


def test_a_handler_crash_is_counted_and_audited(service: ValidationService) -> None:
    async def crash(payload: Any, ctx: Any) -> Any:
        raise KeyError("a bug")

    handler = wrap_handler(service, "consensus/validate_proofs", crash)
    with pytest.raises(KeyError):
        asyncio.run(handler({"request_id": "e"}, _Ctx()))
    assert _sample(service, "hypermesh_errors_total", {"code": "HandlerError"}) == 1
    service.driver.store.flush_audit()
    rows = service.driver.store._db.execute("SELECT outcome FROM audit WHERE request_id = 'e'").fetchall()
    assert rows == [("error:HandlerError",)]


def test_the_stored_request_digest_is_the_certified_one(service: ValidationService) -> None:
    """A result fetched from a peer carries its request digest unsigned; the node keeps
    the digest inside the certified outcome, so the genuine request is still answered."""
    wrong = _final("g", 4, seq=20)
    wrong = Final(wrong.request_id, b"\xee" * 32, wrong.result, wrong.certificate, 4, 4, "node-1", 0, False)

    async def run() -> dict[str, Any]:
        task = asyncio.create_task(service._validate_traced("proofs", {"request_id": "g"}, _Span()))
        await _until(lambda: "g" in service.driver._waiters)
        service.driver._apply([wrong])
        return await task

    assert asyncio.run(run())["status"] == "Valid"  # not InvalidRequest "already used for a different request"
    stored = service.driver.store.get_result("g")
    assert stored is not None and stored.request_digest == hashlib.sha256(b"req:g").digest()


def test_a_failed_store_write_stops_the_node_before_anything_is_sent(service: ValidationService,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail-stop: the replica believes its records are on disk; when they are not, the
    node must not send, answer or write anything more, and its main shuts it down."""
    import contextlib
    import sqlite3

    driver = service.driver
    fatal: list[BaseException] = []
    driver.on_fatal = fatal.append
    sent: list[bytes] = []
    driver._send = lambda to, payload: sent.append(payload)
    attempts = {"n": 0}

    @contextlib.contextmanager
    def broken() -> Iterator[None]:
        attempts["n"] += 1
        raise sqlite3.OperationalError("disk I/O error")
        yield  # pragma: no cover

    monkeypatch.setattr(driver.store, "transaction", broken)

    async def run() -> asyncio.Future[Any]:
        future = driver.submit("f", b"\x01" * 32, "proofs", b"req:f")
        driver._out_sends.append((None, b"a vote that depends on the write"))
        driver._flush()
        driver._apply([_final("f", 4, seq=30)])  # later events: nothing more is written
        driver._flush()
        return future

    future = asyncio.run(run())
    assert [type(e) for e in fatal] == [sqlite3.OperationalError] and driver.failed is fatal[0]
    assert attempts["n"] == 1 and sent == []
    assert isinstance(future.exception(), NotAccepted)  # never saved: not a "Pending" promise


def test_a_request_the_store_never_saved_is_refused_not_answered_pending(service: ValidationService,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """"Pending" promises that the request is on disk and will be finished. When the disk
    refused the write, the client must send the request elsewhere instead."""
    import contextlib
    import sqlite3

    driver = service.driver
    driver.on_fatal = lambda exc: None

    @contextlib.contextmanager
    def broken() -> Iterator[None]:
        raise sqlite3.OperationalError("database or disk is full")
        yield  # pragma: no cover

    monkeypatch.setattr(driver.store, "transaction", broken)

    async def ask(request_id: str) -> ApiError:
        with pytest.raises(ApiError) as caught:
            await asyncio.wait_for(service._validate_traced("proofs", {"request_id": request_id}, _Span()), 5)
        return caught.value

    async def run() -> list[ApiError]:
        return [await ask("unsaved"), await ask("after-the-failure")]

    for error in asyncio.run(run()):
        assert error.code == ErrorCode.TransportError
        assert "could not store the request" in error.message and "send it to another node" in error.message
    assert driver._waiters == {} and service.in_flight == 0


def test_a_stored_result_this_node_cannot_decode_is_answered_not_crashed(service: ValidationService) -> None:
    """A certified outcome in a format this node cannot read (status "Error" in the
    store) is served with its certificate and an explanation, so validation_status and
    retries answer instead of failing with HandlerError."""
    final = _final("u", 4, seq=40)
    final = Final("u", final.request_digest, b"\xc1 not msgpack", final.certificate, 4, 4, "node-1", 0, False)
    service.driver.store.put_results([ReplicaDriver._to_stored(final)])

    answer = asyncio.run(service.validation_status({"request_id": "u"}, _Ctx()))
    assert answer["status"] == "Error" and "cannot be decoded" in answer["error"]
    assert answer["result"] == b"\xc1 not msgpack" and answer["certificate"] == final.certificate.to_wire()
    assert answer["metrics"]["validator_nodes"] == 4


def test_status_of_a_request_executed_through_a_snapshot_is_pending_not_unknown(service: ValidationService) -> None:
    """A node that caught up by state transfer knows a request was executed before its
    certified result arrives from peers: it says Pending, and NotFound only for ids no
    one ordered."""
    service.driver.replica.executed = {"x": 7}
    answer = asyncio.run(service.validation_status({"request_id": "x"}, _Ctx()))
    assert answer["status"] == "Pending" and answer["request_id"] == "x"
    with pytest.raises(Exception, match="NotFound"):
        asyncio.run(service.validation_status({"request_id": "never"}, _Ctx()))


@pytest.mark.parametrize("request_id", ["bad id!", "", "x" * 129, "caf\u00e9", "a\nb"])
def test_status_of_a_malformed_request_id_is_invalid_request_not_not_found(
        service: ValidationService, request_id: str) -> None:
    """An id validate_* would refuse was never accepted by any node: say what is wrong
    with it (the field and the rule) instead of "not known to node-1"."""
    with pytest.raises(ApiError) as refused:
        asyncio.run(service.validation_status({"request_id": request_id}, _Ctx()))
    assert refused.value.code == ErrorCode.InvalidRequest
    assert refused.value.message == "request_id: must be 1..128 characters of [A-Za-z0-9._:-]"


def test_retries_answered_from_the_store_count_as_answered_validations(service: ValidationService) -> None:
    async def run() -> None:
        task = asyncio.create_task(service._validate_traced("proofs", {"request_id": "r"}, _Span()))
        await _until(lambda: "r" in service.driver._waiters)
        service.driver._apply([_final("r", 4, seq=50)])
        await task
        await service._validate_traced("proofs", {"request_id": "r"}, _Span())  # the client retries

    asyncio.run(run())
    labels = {"kind": "proofs", "status": "Valid"}
    assert _sample(service, "hypermesh_validations_total", labels) == 2
    assert _sample(service, "hypermesh_validation_latency_seconds_count", {"kind": "proofs"}) == 1


def test_a_validation_waiting_at_shutdown_is_answered_pending(service: ValidationService) -> None:
    async def run() -> tuple[dict[str, Any], int]:
        task = asyncio.create_task(service._validate_traced("proofs", {"request_id": "s"}, _Span()))
        await _until(lambda: "s" in service.driver._waiters and service.driver._waiters["s"][0].durable)
        released = service.driver.release_waiters()
        return await asyncio.wait_for(task, 5), released

    answer, released = asyncio.run(run())
    assert released == 1 and answer["status"] == "Pending" and answer["request_id"] == "s"
    assert service.driver._waiters == {} and service.in_flight == 0


def test_the_evidence_limit_must_be_a_real_integer(service: ValidationService) -> None:
    async def ask(limit: Any) -> Any:
        return await service.evidence({"limit": limit}, _Ctx())

    assert asyncio.run(ask(5))["evidence"] == []
    for bad in (True, 0, 1001, "5", 2.0):
        with pytest.raises(ApiError, match="limit: must be an integer 1..1000"):
            asyncio.run(ask(bad))


def test_an_evidence_reply_fits_one_envelope_and_pages_on(service: ValidationService) -> None:
    """1000 rows of 14 KB of signed messages made a reply far past the 1 MiB envelope
    limit: the caller got a SerializationError instead of evidence. A reply now stops at
    EVIDENCE_REPLY_BYTES and names where to continue."""
    from transport.envelope import Response, encode_response
    store = service.driver.store
    for seq in range(200):
        assert store.add_evidence("node-3", "wrong-result", seq, 0, [bytes([seq % 256]) * 14_000], "")

    def ask(payload: dict[str, Any]) -> dict[str, Any]:
        return asyncio.run(service.evidence(payload, _Ctx()))

    seen: list[int] = []
    payload: dict[str, Any] = {"limit": 1000}
    for _ in range(10):
        reply = ask(payload)
        encode_response(Response.success("e", reply))  # raises past the envelope limit
        seen += [e["id"] for e in reply["evidence"]]
        if reply["next_before_id"] is None:
            break
        payload = {"limit": 1000, "before_id": reply["next_before_id"]}
    assert len(seen) == len(set(seen)) == 200 and seen == sorted(seen, reverse=True)
    assert len(ask({"limit": 5})["evidence"]) == 5 and ask({"limit": 5})["next_before_id"] is not None
    with pytest.raises(ApiError, match="before_id: must be a positive integer"):
        ask({"before_id": True})
