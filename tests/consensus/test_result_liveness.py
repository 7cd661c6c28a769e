"""Liveness of result certificates when the executors' votes never met (power cut).

Regression for simulator seeds power-cut 30042 / 30177: replicas executed a batch and
signed its result root, a power cut hit before 2f+1 votes met, and after the restart the
replicas that came back through a checkpoint snapshot held no results and no vote for
those seqs — so fewer than 2f+1 votes could ever exist and the requests never became final.
"""

from __future__ import annotations

from consensus.actions import Final, StateTransferred
from consensus.certificate import verify_result_certificate
from consensus.messages import RESULT_VOTE, decode
from tests.consensus.harness import Cluster


def _is_result_vote(data: bytes) -> bool:
    return decode(data).kind == RESULT_VOTE


def _run_requests(c: Cluster, count: int, at: str = "node-0", prefix: str = "r") -> list[str]:
    ids = []
    for i in range(count):
        rid = f"{prefix}{i}"
        c.submit(at, rid, f"{prefix}-payload-{i}".encode())
        c.run(10)
        ids.append(rid)
    return ids


def _final_anywhere(c: Cluster, rid: str, among: list[str]) -> bool:
    for nid in among:
        f = c.finals(nid).get(rid)
        if f is not None:
            ok, why = verify_result_certificate(c.keyring, "test-cluster", rid, f.result, f.certificate)
            assert ok, why
            return True
    return False


def test_results_not_final_at_a_power_cut_become_final_after_restart() -> None:
    """Every executor restores from a checkpoint past the batches: their un-final results
    (and own votes) must survive on disk, or no vote for them ever exists again."""
    c = Cluster()
    c.drop = lambda src, dst, data: "node-2" in (src, dst) or _is_result_vote(data)
    ids = _run_requests(c, 8)
    for nid in ("node-0", "node-1", "node-3"):
        assert c.nodes[nid].replica.stable_checkpoint_seq == 8, c.nodes[nid].replica.status()
        assert not c.nodes[nid].of(Final)
    # power cut: everybody restarts from what it persisted
    c.queue.clear()
    for nid in c.ids:
        c.restart(nid)
    c.drop = lambda src, dst, data: False
    c.run(3000)
    missing = [rid for rid in ids if not _final_anywhere(c, rid, ["node-0", "node-1", "node-3"])]
    assert not missing, missing
    # and once final, the records are gone again
    for nid in ("node-0", "node-1", "node-3"):
        assert not [k for k in c.nodes[nid].durable if k.startswith("result/")], nid


def test_replica_that_skipped_batches_cosigns_f_plus_one_matching_result_votes() -> None:
    """Only f+1 = 2 replicas (node-1, node-3) hold votes for the batches; node-0 is down
    and node-2 skipped them by state transfer. node-2 co-signs the root that f+1
    validators signed (one of them is honest, so the root is right), which completes
    2f+1 at the executors, and then fetches the certified results itself."""
    c = Cluster()
    c.drop = lambda src, dst, data: "node-2" in (src, dst) or _is_result_vote(data)
    ids = _run_requests(c, 8)
    assert c.nodes["node-1"].replica.stable_checkpoint_seq == 8
    c.crash("node-0")
    c.queue.clear()
    c.restart("node-1")
    c.restart("node-3")
    c.drop = lambda src, dst, data: False
    _run_requests(c, 2, at="node-1", prefix="s")  # node-2 learns it is behind (after a view change)
    c.run(8000)
    n2 = c.nodes["node-2"]
    assert n2.of(StateTransferred), n2.replica.status()
    assert n2.replica.counters.get("result_cosigned", 0) > 0, n2.replica.status()
    for nid in ("node-1", "node-3", "node-2"):
        finals = c.finals(nid)
        missing = [rid for rid in ids if rid not in finals]
        assert not missing, (nid, missing)
        for rid in ids:
            ok, why = verify_result_certificate(c.keyring, "test-cluster", rid, finals[rid].result, finals[rid].certificate)
            assert ok, why


def test_a_single_vote_is_never_cosigned() -> None:
    """f matching votes (here one) may all be Byzantine: a skipped replica must not sign."""
    c = Cluster()
    c.drop = lambda src, dst, data: "node-2" in (src, dst) or _is_result_vote(data)
    _run_requests(c, 8)
    c.crash("node-0")
    c.crash("node-3")
    c.queue.clear()
    c.restart("node-1")
    c.drop = lambda src, dst, data: False
    c.run(4000)
    for nid in ("node-1", "node-2"):
        assert c.nodes[nid].replica.counters.get("result_cosigned", 0) == 0
        assert not c.nodes[nid].of(Final)


def test_a_node_that_never_hears_the_result_votes_fetches_the_certified_results() -> None:
    """node-3 executes every batch but every result vote sent *to* it is lost (as after
    a restart, while its peers' links to it were stale). The others become final and
    stop re-sending; node-3 must still become final, from certified results it asks for,
    with a certificate that verifies."""
    c = Cluster()
    c.drop = lambda src, dst, data: dst == "node-3" and _is_result_vote(data)
    ids = _run_requests(c, 4)
    c.run(200)
    assert all(_final_anywhere(c, rid, ["node-0"]) for rid in ids)
    assert not c.finals("node-3"), "the votes to node-3 were supposed to be lost"
    c.run(20_000)  # result-vote retries back off, then node-3 fetches certified results
    missing = [rid for rid in ids if not _final_anywhere(c, rid, ["node-3"])]
    assert not missing, (missing, c.nodes["node-3"].replica.status())
    executed = c.committed_ids("node-3")
    assert all(rid in executed for rid in ids)  # it executed them itself, it did not skip them


def test_a_result_vote_lost_after_the_batch_was_final_is_recovered() -> None:
    """node-1 -> node-0 drops every message while the first batch runs (node-1's link to
    node-0 not up yet, as right after start-up). node-0 is final with 3 votes and node-1
    with 4, so neither re-sent anything: node-0 reported confidence 3/4 for good, and the
    integration test of a healthy cluster (confidence 1.0) failed now and then."""
    c = Cluster(4)
    link = {"down": True}
    c.drop = lambda s, d, _data: link["down"] and s == "node-1" and d == "node-0"
    c.submit("node-0", "r0", b"payload")
    c.run(50)
    assert c.finals("node-0")["r0"].agreeing == 3 and c.finals("node-1")["r0"].agreeing == 4
    link["down"] = False
    c.run(3000)
    assert c.finals("node-0")["r0"].agreeing == 4
