"""A leader that restarts in a view a new-view installed keeps that view's re-proposals:
it must never propose another batch at a sequence number the new-view re-proposed (with
a torn crash of a follower and one Byzantine replica, that committed two batches at one
sequence number: consensus review, seventh session)."""

from __future__ import annotations

from consensus.actions import Send
from consensus.messages import decode
from consensus.replica import ReplicaConfig
from tests.consensus.harness import Cluster, ViewChanged


def test_a_restarted_new_leader_proposes_only_above_the_new_views_re_proposals() -> None:
    c = Cluster(4, ReplicaConfig(cluster_id="test-cluster", checkpoint_interval=4, window=4, batch_max_requests=1))
    old_leader, new_leader, follower = c.ids[0], c.ids[1], c.ids[2]
    blocking = {"commits": True}
    # Batches prepare but never commit in view 0; the new leader gets no forwarded requests.
    c.drop = lambda _s, d, data: (blocking["commits"] and decode(data).kind == "commit") or (
        d == new_leader and decode(data).kind == "request")
    for i in range(2):
        c.submit(old_leader, f"a{i}", f"a{i}".encode())
    c.run(100)
    prepared = sorted(s for s, slot in c.nodes[follower].replica._slots.items() if slot.prepared_cert)
    assert prepared == [1, 2]
    c.crash(old_leader)
    c.submit(follower, "p", b"p")  # its timer expires: view change to view 1
    for _ in range(200):
        if c.nodes[follower].of(ViewChanged):
            break
        c.run(100)
    assert c.nodes[new_leader].replica.view == 1  # the new-view re-proposed seqs 1 and 2

    c.crash(new_leader)
    restarted = c.restart(new_leader)
    proposals: list[tuple[int, str]] = []
    handle = c.handle

    def watch(node_id: str, actions: list) -> None:
        if node_id == new_leader:
            for action in actions:
                if isinstance(action, Send) and decode(action.payload).kind == "pre-prepare":
                    pp = decode(action.payload).payload
                    proposals.append((pp.seq, [r for r, _ in pp.requests][0] if pp.requests else ""))
        handle(node_id, actions)

    c.handle = watch  # type: ignore[method-assign]
    c.submit(new_leader, "q", b"q")
    c.run(50)
    assert proposals and all(seq > 2 for seq, _ in proposals), proposals
    assert restarted.replica._slots[1].view == 1 and restarted.replica._slots[1].has_batch

    blocking["commits"] = False
    c.run(20000)
    executed = {n: c.nodes[n].replica.executed_seq("q") for n in c.ids[1:]}
    assert len(set(executed.values())) == 1 and None not in executed.values(), executed
    assert all(c.nodes[n].replica.executed_seq("a0") == 1 for n in c.ids[1:])
