"""A replica whose own state diverged (a silent fault) repairs itself: it cannot make its
own checkpoints stable, so it stops at the end of its window; the cluster's next stable
checkpoint is then beyond what it executed, and it installs that by state transfer."""

from __future__ import annotations

from consensus.actions import Evidence, StateTransferred
from tests.consensus.harness import Cluster


def _run(c: Cluster, count: int, prefix: str) -> None:
    for i in range(count):
        c.submit("node-0", f"{prefix}{i}", f"{prefix}-payload-{i}".encode())
        c.run(10)


def test_a_replica_whose_state_diverged_rolls_back_to_the_stable_checkpoint_and_rejoins() -> None:
    c = Cluster()
    _run(c, 2, "a")
    c.nodes["node-3"].app.chain = b"\xff" * 32  # a silent fault: its state no longer matches
    _run(c, 11, "b")  # checkpoints at 4, 8 and 12: node-3's digests differ
    c.run(2000)
    n3 = c.nodes["node-3"]
    assert n3.replica.status()["counters"].get("checkpoint_diverged", 0) >= 1
    assert n3.of(StateTransferred), "node-3 should have installed the cluster's checkpoint"
    _run(c, 5, "c")
    c.run(2000)
    states = {(c.nodes[i].app.count, c.nodes[i].app.chain) for i in c.ids}
    assert len(states) == 1, states
    stable = {c.nodes[i].replica.stable_checkpoint_seq for i in c.ids}
    assert stable == {16}, stable
    assert not [a for nid in c.ids for a in c.nodes[nid].of(Evidence)], "repair must not look like equivocation"
