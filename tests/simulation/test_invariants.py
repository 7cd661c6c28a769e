"""The checker itself must be able to fail: hand-made histories with one planted bug each."""

from __future__ import annotations

import hashlib

import pytest

from consensus.actions import Evidence, Final, ResultCertificate
from consensus.sim.app import HashChainApp, encode_request
from consensus.sim.invariants import History, check_history


def _history(*, honest: tuple[str, ...] = ("n0", "n1", "n2"), requests: int = 3) -> History:
    history = History()
    history.honest = set(honest)
    history.node_of = {name: name for name in (*honest, "n3")}
    for i in range(requests):
        history.submitted[f"r{i}"] = encode_request(f"r{i}", bytes([i]))
    return history


def _run(app: HashChainApp, seq: int, *request_ids: str, history: History, time_ms: int = 0) -> None:
    app.execute_batch(seq, [history.submitted[r] for r in request_ids], time_ms)


def _honest_runs(history: History, batches: list[tuple[str, ...]]) -> dict[str, HashChainApp]:
    apps = {name: HashChainApp() for name in sorted(history.honest)}
    for name, app in apps.items():
        for seq, batch in enumerate(batches, start=1):
            _run(app, seq, *batch, history=history)
        history.executions[name].extend(app.log)
    return apps


def _certificate() -> ResultCertificate:
    return ResultCertificate("c", 1, b"\0" * 32, 1, 0, (), ())


def _final(request_id: str, result: bytes) -> Final:
    return Final(request_id, b"", result, _certificate(), 3, 4, "n0", 0)


def _kinds(history: History, **kwargs: object) -> list[str]:
    return sorted({v.kind for v in check_history(history, **kwargs)})  # type: ignore[arg-type]


def test_consistent_history_has_no_violation() -> None:
    history = _history()
    apps = _honest_runs(history, [("r0", "r1"), ("r2",)])
    history.finals.append(("n0", _final("r0", apps["n0"].log[0].results[0])))
    history.expect_liveness = False
    assert check_history(history) == []


def test_conflicting_batches_at_one_seq_are_an_agreement_violation() -> None:
    history = _history()
    _honest_runs(history, [("r0", "r1")])
    rogue = HashChainApp()
    _run(rogue, 1, "r1", "r0", history=history)  # same requests, other order, same seq
    history.executions["n2"] = list(rogue.log)
    kinds = _kinds(history)
    assert "agreement" in kinds and "total-order" in kinds


def test_a_byzantine_instance_is_not_held_to_agreement() -> None:
    history = _history(honest=("n0", "n1"))
    _honest_runs(history, [("r0", "r1")])
    rogue = HashChainApp()
    _run(rogue, 1, "r1", history=history)
    history.executions["n3"] = list(rogue.log)  # n3 is not honest
    assert check_history(history) == []


def test_unsubmitted_request_is_a_validity_violation() -> None:
    history = _history()
    app = HashChainApp()
    app.execute_batch(1, [encode_request("invented", b"x")], 0)
    history.executions["n0"] = list(app.log)
    assert _kinds(history) == ["validity"]


def test_request_executed_at_two_seqs_is_an_exactly_once_violation() -> None:
    history = _history(honest=("n0",))
    app = HashChainApp()
    _run(app, 1, "r0", history=history)
    _run(app, 2, "r0", history=history)
    history.executions["n0"] = list(app.log)
    assert _kinds(history) == ["exactly-once"]


def test_re_execution_of_the_same_seq_after_restart_is_allowed() -> None:
    history = _history(honest=("n0",))
    before, after = HashChainApp(), HashChainApp()
    for app in (before, after):
        _run(app, 1, "r0", "r1", history=history)
    history.executions["n0"] = [*before.log, *after.log]
    assert check_history(history) == []


def test_conflicting_finals_and_wrong_results_are_reported() -> None:
    history = _history()
    apps = _honest_runs(history, [("r0",)])
    good = apps["n0"].log[0].results[0]
    history.finals.append(("n0", _final("r0", good)))
    history.finals.append(("n1", _final("r0", hashlib.sha256(b"other").digest())))
    kinds = _kinds(history)
    assert "final-conflict" in kinds and "results" in kinds


def test_final_with_a_bad_certificate_from_an_honest_node_is_reported() -> None:
    history = _history()
    _honest_runs(history, [("r0",)])
    history.finals.append(("n0", _final("r0", b"whatever")))
    kinds = _kinds(history, verify_certificate=lambda rid, result, cert: (False, "bad signature"))
    assert kinds == ["final-certificate"]


def test_liveness_requires_every_request_final() -> None:
    history = _history()
    apps = _honest_runs(history, [("r0", "r1", "r2")])
    history.expect_liveness = True
    history.finals.append(("n0", _final("r0", apps["n0"].log[0].results[0])))
    violations = check_history(history)
    assert [v.kind for v in violations] == ["liveness"] and "2 of 3" in violations[0].detail


def test_valid_evidence_against_an_honest_node_is_reported() -> None:
    history = _history()
    history.evidence.append(("n0", Evidence("n1", "equivocation", 1, 0, (b"a", b"b"))))
    assert _kinds(history, verify_evidence=lambda e: True) == ["evidence"]
    assert _kinds(history, verify_evidence=lambda e: False) == []


def test_exception_in_an_honest_replica_is_reported() -> None:
    history = _history()
    history.exceptions.append(("n1", "Traceback ..."))
    history.exceptions.append(("n3", "Traceback ..."))  # Byzantine: ignored
    violations = check_history(history)
    assert [v.kind for v in violations] == ["exception"] and "n1" in violations[0].detail


@pytest.mark.parametrize("bad", [b"", b"\x92\x01", encode_request("r9", b"")])
def test_app_round_trips_and_rejects_bad_snapshots(bad: bytes) -> None:
    app = HashChainApp()
    app.execute_batch(1, [encode_request("r0", b"x")], 5)
    copy = HashChainApp()
    copy.restore(app.snapshot())
    assert copy.snapshot() == app.snapshot()
    with pytest.raises(ValueError):
        copy.restore(bad)
