"""The stateful time proof: offset window, strictly increasing per holder, replay and
reordering rejected, and the head only moves for a fully valid request."""

from __future__ import annotations

import pytest

from consensus.codec import DecodeError
from consensus.prover import make_proof_set
from consensus.validation import ValidationApp, ValidationState, decode_outcome, execute, parse_request, precheck

from .conftest import NOW


def _request(cluster, holder, rid, ts, **kw):
    return parse_request("proofs", make_proof_set(rid, cluster.params, holder, ts, storage=cluster.storage, **kw))


def _exec(cluster, req, state, agreed=NOW):
    return execute(req, precheck(req, cluster.params, cluster.kem_private), state, agreed, cluster.params)


def test_chain_accepts_increasing_and_rejects_replay_and_reorder(cluster, mldsa):
    state = ValidationState()
    first, second, third = (_request(cluster, mldsa, f"t-{i}", NOW + i) for i in (10, 20, 30))
    assert _exec(cluster, first, state).status == "Valid"
    assert _exec(cluster, third, state).status == "Valid"
    late = _exec(cluster, second, state)  # reordered: older than the head
    assert [r.code for r in late.reasons] == ["time.not_after_previous"]
    replay = _exec(cluster, third, state)  # same request again
    assert [r.code for r in replay.reasons] == ["time.not_after_previous"]
    assert state.last_time(mldsa.holder_id) == NOW + 30


def test_equal_timestamp_is_not_after(cluster, mldsa):
    state = ValidationState()
    assert _exec(cluster, _request(cluster, mldsa, "eq-1", NOW), state).status == "Valid"
    out = _exec(cluster, _request(cluster, mldsa, "eq-2", NOW), state)
    assert [r.code for r in out.reasons] == ["time.not_after_previous"]


def test_holders_have_independent_chains(cluster, mldsa, falcon):
    state = ValidationState()
    assert _exec(cluster, _request(cluster, mldsa, "h-1", NOW + 5), state).status == "Valid"
    assert _exec(cluster, _request(cluster, falcon, "h-2", NOW + 1), state).status == "Valid"
    assert len(state) == 2


@pytest.mark.parametrize("offset", [-30_001, 30_001])
def test_offset_window_edges(cluster, mldsa, offset):
    assert _exec(cluster, _request(cluster, mldsa, "w-1", NOW + offset), ValidationState()).reasons[0].code == "time.outside_offset"
    assert _exec(cluster, _request(cluster, mldsa, "w-2", NOW + offset - (1 if offset > 0 else -1)), ValidationState()).status == "Valid"


def test_invalid_request_does_not_advance_the_head(cluster, mldsa):
    """Otherwise a bad proof could burn the holder's chain (or skip it forward)."""
    state = ValidationState()
    bad = _request(cluster, mldsa, "inv-1", NOW + 100, fault=("space", "path"))
    assert _exec(cluster, bad, state).status == "Invalid"
    assert state.last_time(mldsa.holder_id) is None
    assert _exec(cluster, _request(cluster, mldsa, "inv-2", NOW + 50), state).status == "Valid"


def test_within_batch_order_decides(cluster, mldsa):
    early = _request(cluster, mldsa, "b-1", NOW + 1).encode()
    later = _request(cluster, mldsa, "b-2", NOW + 2).encode()
    app = ValidationApp(cluster.params, cluster.kem_private)
    statuses = [decode_outcome(o).status for o in app.execute_batch(1, [later, early], NOW)]
    assert statuses == ["Valid", "Invalid"]
    app2 = ValidationApp(cluster.params, cluster.kem_private)
    assert [decode_outcome(o).status for o in app2.execute_batch(1, [early, later], NOW)] == ["Valid", "Valid"]


def test_state_snapshot_restore_digest(cluster, mldsa, falcon):
    state = ValidationState()
    _exec(cluster, _request(cluster, falcon, "s-1", NOW + 1), state)
    _exec(cluster, _request(cluster, mldsa, "s-2", NOW + 2), state)
    copy = ValidationState.from_snapshot(state.snapshot())
    assert copy.snapshot() == state.snapshot() and copy.digest() == state.digest()
    other = ValidationState()
    other.restore(state.snapshot())
    assert other.last_time(mldsa.holder_id) == NOW + 2
    # Insertion order must not matter.
    reverse = ValidationState({mldsa.holder_id: NOW + 2, falcon.holder_id: NOW + 1})
    assert reverse.snapshot() == state.snapshot()


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x92\x01\x90\x00", b"\x92\x02\x90",
                                  b"\x92\x01\x91\x92\xc4\x01x\x01"])
def test_restore_rejects_bad_snapshots_and_keeps_state(data):
    state = ValidationState({b"\x01" * 32: 5})
    with pytest.raises(DecodeError):
        state.restore(data)
    assert state.last_time(b"\x01" * 32) == 5


def test_restore_rejects_unsorted_holders():
    good = ValidationState({b"\x01" * 32: 1, b"\x02" * 32: 2}).snapshot()
    from consensus.codec import canonical_pack
    bad = canonical_pack([1, [[b"\x02" * 32, 2], [b"\x01" * 32, 1]]])
    assert bad != good
    with pytest.raises(DecodeError):
        ValidationState.from_snapshot(bad)


def test_stale_heads_are_forgotten_only_when_they_cannot_decide_anything(cluster, mldsa, falcon):
    state = ValidationState()
    assert _exec(cluster, _request(cluster, mldsa, "old-1", NOW), state).status == "Valid"
    assert _exec(cluster, _request(cluster, falcon, "new-1", NOW + 20_000), state).status == "Valid"
    later = NOW + 40_000  # mldsa's head is now older than agreed time - max offset (30 s)
    assert state.forget_before(later - cluster.params.max_time_offset_ms) == 1
    assert state.last_time(mldsa.holder_id) is None and state.last_time(falcon.holder_id) == NOW + 20_000
    # Any proof that passes the offset check is newer than the forgotten head anyway.
    assert _exec(cluster, _request(cluster, mldsa, "old-2", later - 30_000), state, agreed=later).status == "Valid"
    # The kept head still decides.
    again = _exec(cluster, _request(cluster, falcon, "new-2", NOW + 20_000), state, agreed=later)
    assert [r.code for r in again.reasons] == ["time.not_after_previous"]


def test_app_sweeps_stale_heads_on_a_fixed_schedule_and_reads_request_times(cluster, mldsa, falcon):
    from consensus.validation import TIME_HEAD_PRUNE_EVERY

    app = ValidationApp(cluster.params, cluster.kem_private)
    first = _request(cluster, mldsa, "sweep-1", NOW).encode()
    assert app.request_time_ms(first) == NOW and app.request_time_ms(b"\xc1") is None
    assert decode_outcome(app.execute_batch(1, [first], NOW)[0]).status == "Valid"
    later = NOW + 60_000
    second = _request(cluster, falcon, "sweep-2", later).encode()
    app.execute_batch(TIME_HEAD_PRUNE_EVERY + 1, [second], later)  # not a sweep point
    assert len(app.state) == 2
    third = _request(cluster, falcon, "sweep-3", later + 1).encode()
    app.execute_batch(2 * TIME_HEAD_PRUNE_EVERY, [third], later + 1)
    assert len(app.state) == 1 and app.state.last_time(falcon.holder_id) == later + 1
