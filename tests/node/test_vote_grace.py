"""When to wait for the votes beyond the first 2f+1."""

from __future__ import annotations

from node.service import ServiceLimits, ValidationService


def _service(grace_s: float = 0.05) -> ValidationService:
    return ValidationService(node_id="node-1", cluster_id="c", driver=None, metrics=None,  # type: ignore[arg-type]
                             limits=ServiceLimits(vote_grace_s=grace_s), cache=None)


def test_waits_while_the_last_votes_keep_arriving() -> None:
    service = _service()
    assert all(service._should_wait_for_votes() for _ in range(50))


def test_stops_waiting_for_a_validator_that_keeps_missing_and_probes_now_and_then() -> None:
    service = _service()
    service._short_results = 3  # three answers in a row ran out of grace
    decisions = [service._should_wait_for_votes() for _ in range(100)]
    assert decisions.count(True) == 5  # every 20th answer probes whether it is back
    service._short_results = 0  # a probe saw all n votes again
    assert service._should_wait_for_votes()


def test_grace_zero_never_waits() -> None:
    assert not _service(0.0)._should_wait_for_votes()
