"""Replicas must agree byte for byte: same batches -> same outcomes and snapshots,
whatever the precheck runner (sequential or a thread pool)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import msgpack
import pytest

from consensus.prover import make_certificate_request, make_proof_set
from consensus.validation import ValidationApp, decode_outcome, parse_request

from .conftest import NOW


def _batches(cluster, mldsa, falcon):
    p, s = cluster.params, cluster.storage
    enc = lambda kind, payload: parse_request(kind, payload).encode()  # noqa: E731
    batch1 = [
        enc("proofs", make_proof_set("d-1", p, mldsa, NOW + 1, storage=s)),
        enc("proofs", make_proof_set("d-2", p, falcon, NOW + 2, storage=s, fault=("space", "path"))),
        b"\x81\xa1x\x01",  # a faulty leader's garbage
        enc("certificate", make_certificate_request("d-3", p, falcon, NOW + 3, storage=s, common_name="x.example.org")),
    ]
    batch2 = [
        enc("proofs", make_proof_set("d-4", p, mldsa, NOW + 1, storage=s)),  # replay of an older time
        enc("proofs", make_proof_set("d-5", p, mldsa, NOW + 9, storage=s)),
        b"\xc1",
    ]
    return batch1, batch2


def _run(app, batches):
    outs = [app.execute_batch(seq, batch, NOW + seq) for seq, batch in enumerate(batches, 1)]
    return outs, app.snapshot()


def test_two_fresh_apps_agree_byte_for_byte(cluster, mldsa, falcon):
    batches = _batches(cluster, mldsa, falcon)
    a = _run(ValidationApp(cluster.params, cluster.kem_private), batches)
    b = _run(ValidationApp(cluster.params, cluster.kem_private), batches)
    assert a == b
    statuses = [[decode_outcome(o).status for o in batch] for batch in a[0]]
    assert statuses == [["Valid", "Invalid", "Invalid", "Valid"], ["Invalid", "Valid", "Invalid"]]


def test_thread_pool_runner_gives_the_same_bytes(cluster, mldsa, falcon):
    batches = _batches(cluster, mldsa, falcon)
    with ThreadPoolExecutor(max_workers=4) as pool:
        runner = lambda parts: list(pool.map(lambda part: part(), parts))  # noqa: E731
        threaded = _run(ValidationApp(cluster.params, cluster.kem_private, precheck_runner=runner), batches)
    assert threaded == _run(ValidationApp(cluster.params, cluster.kem_private), batches)


def test_prefetched_prechecks_give_the_same_bytes_and_are_used(cluster, mldsa, falcon):
    batch1, batch2 = _batches(cluster, mldsa, falcon)
    submitted = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        def background(task):  # counts the background tasks, runs them on the pool
            submitted.append(task)
            return pool.submit(task)

        app = ValidationApp(cluster.params, cluster.kem_private,
                            precheck_runner=lambda parts: (_ for _ in ()).throw(AssertionError("ran inline")),
                            background=background)
        app.prefetch(batch1 + batch1[:1])  # a repeated request is checked once
        app.prefetch(batch2)
        assert len(submitted) == 2  # 4 + 3 requests: one task each (chunks of 8)
        assert app.request_time_ms(batch1[0]) == NOW + 1 and app.request_time_ms(b"\xc1") is None
        prefetched = _run(app, [batch1, batch2])
    assert prefetched == _run(ValidationApp(cluster.params, cluster.kem_private), [batch1, batch2])
    # Not prefetched (e.g. batches fetched during catch-up): the inline runner still serves.
    inline = ValidationApp(cluster.params, cluster.kem_private, background=lambda task: pytest.fail("no prefetch"))
    assert _run(inline, [batch1, batch2]) == prefetched


def test_prefetch_spreads_a_small_batch_over_every_worker_and_chunks_a_large_one(cluster):
    """At low load a batch of a few requests used to go to one worker while the other
    idled (chunks of 8): now a small batch is split evenly, a large one still goes in
    chunks of PREFETCH_CHUNK (fewer thread hand-offs)."""
    from consensus.validation import PREFETCH_CHUNK

    sizes: list[int] = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        def background(task):
            sizes.append(len(task.args[0]))  # the chunk of request bytes handed to _check_chunk
            return pool.submit(task)

        app = ValidationApp(cluster.params, cluster.kem_private, background=background, background_workers=2)
        garbage = [b"\x91" + i.to_bytes(4, "big") for i in range(40)]
        app.prefetch(garbage[:1])
        assert sizes == [1]
        sizes.clear()
        app.prefetch(garbage[1:6])  # 5 requests over 2 workers
        assert sizes == [3, 2]
        sizes.clear()
        app.prefetch(garbage[6:])  # 34 requests: chunks of PREFETCH_CHUNK
        assert sizes == [PREFETCH_CHUNK] * (34 // PREFETCH_CHUNK) + [34 % PREFETCH_CHUNK]
        assert all(app.request_time_ms(data) is None for data in garbage)  # each one checked (undecodable)


def test_prefetch_is_bounded(cluster, mldsa):
    from consensus.validation import MAX_PREFETCHED

    with ThreadPoolExecutor(max_workers=1) as pool:
        app = ValidationApp(cluster.params, cluster.kem_private, background=pool.submit)
        app.prefetch([b"\x91" + i.to_bytes(4, "big") for i in range(MAX_PREFETCHED + 50)])
        assert len(app._prefetched) == MAX_PREFETCHED


def test_restored_app_continues_identically(cluster, mldsa, falcon):
    batch1, batch2 = _batches(cluster, mldsa, falcon)
    a = ValidationApp(cluster.params, cluster.kem_private)
    a.execute_batch(1, batch1, NOW + 1)
    b = ValidationApp(cluster.params, cluster.kem_private)
    b.restore(a.snapshot())
    assert a.execute_batch(2, batch2, NOW + 2) == b.execute_batch(2, batch2, NOW + 2)
    assert a.snapshot() == b.snapshot()


def test_malformed_request_outcome(cluster):
    app = ValidationApp(cluster.params, cluster.kem_private)
    bad = msgpack.packb({"v": 1, "kind": "proofs", "payload": {"request_id": "x"}})
    outs = [decode_outcome(o) for o in app.execute_batch(1, [b"\xc1", bad], NOW)]
    assert [o.reasons[0].code for o in outs] == ["request.malformed", "request.malformed"]
    assert outs[0].reasons[0].message == "not a valid bounded msgpack request"
    assert outs[1].reasons[0].message == "proofs: missing field"
    assert outs[0].request_id == "" and outs[0].kind == "unknown" and outs[0].status == "Invalid"


def test_outcome_wire_form(cluster, mldsa):
    app = ValidationApp(cluster.params, cluster.kem_private)
    req = parse_request("proofs", make_proof_set("wire-1", cluster.params, mldsa, NOW, storage=cluster.storage))
    out = decode_outcome(app.execute_batch(1, [req.encode()], NOW)[0])
    wire = out.to_wire()
    assert wire["status"] == "Valid" and wire["request_digest"] == req.digest and wire["reasons"] == []
    assert set(wire) == {"request_id", "kind", "status", "reasons", "agreed_time_ms", "request_digest"}
