"""Follower request timers: a busy leader is not a faulty one, a censoring one is."""

from __future__ import annotations

from consensus.messages import decode
from consensus.replica import MAX_TIMER_EXTENSIONS, ReplicaConfig

from .harness import Cluster

TIMEOUT = 100


def _censoring_cluster() -> Cluster:
    c = Cluster(config=ReplicaConfig(cluster_id="test-cluster", checkpoint_interval=4, window=4,
                                     request_timeout_ms=TIMEOUT, view_change_timeout_ms=10_000))

    # The leader (node-0) never sees request "censored", however it is sent.
    def drop(src: str, dst: str, data: bytes) -> bool:
        if dst != "node-0":
            return False
        msg = decode(data)
        return msg.kind == "request" and msg.payload.request_id == "censored"

    c.drop = drop
    return c


def _keep_leader_busy(c: Cluster, until_ms: int, every_ms: int = 20) -> None:
    """Other clients' requests keep arriving and executing: the leader makes progress."""
    i = 0
    while c.now < until_ms:
        c.submit("node-0", f"busy-{c.now}-{i}", b"work")
        i += 1
        c.run(every_ms)


def test_a_leader_that_keeps_executing_is_not_suspected_for_a_while() -> None:
    c = _censoring_cluster()
    c.submit("node-2", "censored", b"payload")
    _keep_leader_busy(c, 4 * TIMEOUT)
    assert all(n.replica.view == 0 for n in c.nodes.values()), "a busy leader must not be replaced"
    assert c.nodes["node-2"].replica.counters.get("request_timeouts", 0) == 0


def test_a_leader_that_censors_one_request_is_replaced_eventually() -> None:
    c = _censoring_cluster()
    c.submit("node-2", "censored", b"payload")
    _keep_leader_busy(c, (MAX_TIMER_EXTENSIONS + 4) * TIMEOUT)
    assert c.nodes["node-2"].replica.counters.get("request_timeouts", 0) >= 1
    c.run(20 * TIMEOUT)
    # The other followers joined (they also hold the broadcast request), so the view moved
    # and the censored request was finally ordered by the new leader.
    assert c.nodes["node-2"].replica.view >= 1
    assert "censored" in c.committed_ids("node-2")
