"""A validator whose store went back in time (restored from a backup, WAL lost, started
empty) must not contradict the votes it cast before: given ``signed_bound`` (what it
signed, kept outside the store) it withholds them until the cluster has moved past."""

from __future__ import annotations

from consensus.actions import Send
from consensus.messages import PrePrepare, batch_digest, decode, encode_signed, preprepare_header_bytes
from consensus.replica import Replica, ReplicaConfig
from tests.consensus.harness import Cluster, CounterApp, Node

SIGNED_KINDS = ("pre-prepare", "prepare", "commit", "view-change", "new-view")


def _config() -> ReplicaConfig:
    return ReplicaConfig(cluster_id="test-cluster", checkpoint_interval=4, window=4, batch_max_requests=1)


def _restart(c: Cluster, node_id: str, durable: dict[str, bytes], bound: tuple[int, int] | None) -> Node:
    key = next(k for k in c.keys if k.node_id == node_id)
    app = CounterApp()
    replica = Replica(c.config, key, c.keyring, app, dict(durable), c.now, signed_bound=bound)
    node = c.nodes[node_id] = Node(replica, app, dict(durable))
    c.handle(node_id, replica.tick(c.now))  # what the constructor queued (re-sends)
    return node


def _sent(node: Node, kind: str) -> list:
    out = []
    for action in node.actions:
        if isinstance(action, Send):
            msg = decode(action.payload)
            if msg.kind == kind:
                out.append(msg.payload)
    return out


def _forged_preprepare(c: Cluster, seq: int, request_id: str) -> bytes:
    """The view-0 leader's signed pre-prepare of another batch at ``seq`` (it equivocates)."""
    leader = c.keys[0]
    agreed = c.now + 1
    requests = ((request_id, request_id.encode()),)
    digest = batch_digest(agreed, requests)
    signature = leader.sign(preprepare_header_bytes("test-cluster", 0, seq, agreed, digest))
    return encode_signed("test-cluster", leader.node_id, PrePrepare(0, seq, agreed, requests, digest), signature)


def test_an_emptied_store_withholds_the_prepare_it_may_have_cast_and_without_the_bound_it_would_equivocate() -> None:
    c = Cluster(4, _config())
    follower = c.ids[2]
    c.drop = lambda _s, _d, data: decode(data).kind == "commit"  # seq 1 prepares, never commits
    c.submit(c.ids[0], "a", b"a")
    c.run(50)
    before = c.nodes[follower]
    assert [p.seq for p in _sent(before, "prepare")] == [1]
    bound = before.replica.signed_high
    assert bound == (0, 1)

    for given, expect_prepare in ((None, True), (bound, False)):
        node = _restart(c, follower, {}, given)  # data directory emptied
        c.handle(follower, node.replica.receive(c.ids[0], _forged_preprepare(c, 1, "b"), c.now))
        prepares = [p for p in _sent(node, "prepare") if p.seq == 1]
        # Without the bound it signs a second prepare at (view 0, seq 1): equivocation.
        assert bool(prepares) is expect_prepare, (given, prepares)
    assert node.replica.vote_floor == (0, 1)
    assert node.replica.counters["votes_withheld"] >= 1
    assert node.replica.status()["vote_floor"] == {"view": 0, "seq": 1}


def test_a_store_restored_from_a_backup_votes_again_once_the_cluster_passed_the_floor() -> None:
    c = Cluster(4, _config())
    follower = c.ids[3]
    for i in range(3):
        c.submit(c.ids[0], f"a{i}", b"a%d" % i)
        c.run(50)
    backup = dict(c.nodes[follower].durable)  # taken here ...
    for i in range(3, 6):
        c.submit(c.ids[0], f"a{i}", b"a%d" % i)
        c.run(50)
    bound = c.nodes[follower].replica.signed_high
    assert bound[1] == 6

    node = _restart(c, follower, backup, bound)  # ... restored here: seqs 4-6 forgotten
    assert node.replica.vote_floor == bound
    for i in range(6, 16):
        c.submit(c.ids[0], f"a{i}", b"a%d" % i)
        c.run(100)
    c.run(3000)
    replica = node.replica
    assert all(replica.executed_seq(f"a{i}") is not None for i in range(16))
    assert replica.vote_floor is None and replica.counters["vote_floor_lifted"] == 1
    prepared = [p.seq for p in _sent(node, "prepare")]
    assert prepared and all(seq > bound[1] for seq in prepared), prepared  # votes again, never at or below


def test_a_normal_restart_sets_no_floor_but_an_older_view_does() -> None:
    c = Cluster(4, _config())
    follower = c.ids[1]
    c.submit(c.ids[0], "a", b"a")
    c.run(50)
    durable = c.nodes[follower].durable
    high = c.nodes[follower].replica.signed_high
    assert _restart(c, follower, durable, high).replica.vote_floor is None
    # It once asked for view 3 (a view-change its store no longer holds).
    assert _restart(c, follower, durable, (3, high[1])).replica.vote_floor == (3, high[1])


def test_an_amnesiac_sends_no_view_change_until_its_checkpoint_reaches_the_floor() -> None:
    c = Cluster(4, _config())
    leader, follower = c.ids[0], c.ids[2]
    c.submit(leader, "a", b"a")
    c.run(50)
    node = _restart(c, follower, {}, (0, 12))  # it once signed up to seq 12
    c.crash(leader)
    c.submit(c.ids[1], "b", b"b")
    c.run(8000)
    # Its view-change could omit prepared certificates it forgot: withheld. It counts as
    # faulty, so with the leader down too the other two cannot change view (2 < 2f+1).
    assert _sent(node, "view-change") == []
    assert [c.nodes[n].replica.view for n in c.ids[1:]] == [0, 0, 0]
    assert c.nodes[c.ids[1]].replica.in_view_change

    _restart(c, leader, c.nodes[leader].durable, c.nodes[leader].replica.signed_high)
    c.nodes[leader].up = True
    c.run(8000)
    assert [c.nodes[n].replica.view for n in c.ids] == [1, 1, 1, 1]
    for i in range(14):
        c.submit(c.ids[1], f"c{i}", b"c%d" % i)
        c.run(100)
    c.run(3000)
    assert node.replica.stable_checkpoint_seq >= 12 and node.replica.vote_floor is None
    assert all(node.replica.executed_seq(rid) is not None for rid in ["a", "b"] + [f"c{i}" for i in range(14)])


def test_signed_high_covers_every_signed_message_through_a_view_change() -> None:
    c = Cluster(4, _config())
    seen: list[tuple[str, str, int, int]] = []
    handle = c.handle

    def check(node_id: str, actions: list) -> None:
        handle(node_id, actions)
        high = c.nodes[node_id].replica.signed_high
        for action in actions:
            if not isinstance(action, Send):
                continue
            msg = decode(action.payload)
            if msg.kind not in SIGNED_KINDS or msg.signer != node_id:
                continue
            p = msg.payload
            view = p.new_view if msg.kind == "view-change" else p.view
            seq = getattr(p, "seq", 0) if msg.kind in ("pre-prepare", "prepare", "commit") else 0
            seen.append((node_id, msg.kind, view, seq))
            assert view <= high[0] and seq <= high[1], (node_id, msg.kind, view, seq, high)

    c.handle = check  # type: ignore[method-assign]
    for i in range(5):
        c.submit(c.ids[0], f"a{i}", b"a%d" % i)
        c.run(50)
    c.crash(c.ids[0])
    c.submit(c.ids[1], "b", b"b")
    c.run(8000)
    kinds = {k for _, k, _, _ in seen}
    assert kinds == set(SIGNED_KINDS), kinds  # every kind was checked at least once


def test_a_leader_below_its_floor_proposes_nothing_and_arms_no_batch_timer() -> None:
    c = Cluster(4, _config())
    leader = c.ids[0]
    node = _restart(c, leader, {}, (0, 5))
    c.handle(leader, node.replica.submit("x", b"x", c.now))
    c.handle(leader, node.replica.propose(c.now + 100))
    assert _sent(node, "pre-prepare") == []
    assert node.replica.batch_deadline_ms() is None  # a driver would otherwise re-arm it at once, forever


def test_a_floor_lifted_during_a_view_change_sends_the_withheld_view_change() -> None:
    """The leader dies while an emptied follower still withholds its view-change; once
    state transfer lifts its floor, its view-change must go out: the other two live
    nodes need it for 2f+1 (review of the vote guard: it was never sent)."""
    c = Cluster(4, _config())
    leader, follower = c.ids[0], c.ids[3]
    for i in range(12):
        c.submit(leader, f"a{i}", b"a%d" % i)
        c.run(50)
    bound = c.nodes[follower].replica.signed_high
    c.crash(leader)
    node = _restart(c, follower, {}, bound)
    assert node.replica.vote_floor == bound
    for nid in c.ids[1:]:
        c.handle(nid, c.nodes[nid].replica.submit("b", b"b", c.now))
    c.run(30000)
    assert node.replica.vote_floor is None
    assert [v.new_view for v in _sent(node, "view-change")] == [1]
    assert [c.nodes[n].replica.view for n in c.ids[1:]] == [1, 1, 1]
    assert c.nodes[c.ids[1]].replica.executed_seq("b") is not None


def test_a_node_that_asked_for_a_view_alone_and_forgot_votes_in_no_earlier_view() -> None:
    """Cut off, it asked for view 1 alone (its view-change promised: no more votes in
    view 0), then lost its store. Floor (1, 1): no prepare or commit in view 0, however
    far the others order; once its checkpoint covers the floor seq it may ask for a new
    view again, and the cluster changes view when the leader dies."""
    c = Cluster(4, _config())
    leader, cut = c.ids[0], c.ids[3]
    c.submit(leader, "a0", b"a0")
    c.run(50)
    # Nothing it sends arrives, but it hears the others' traffic, and one follower told
    # it alone of a request the leader never got: it asks for view 1 alone.
    c.drop = lambda s, _d, _data: s == cut
    c.tell(c.ids[2], cut, "x", b"x")
    for i in range(300):
        if c.nodes[cut].replica.in_view_change:
            break
        c.submit(leader, f"busy{i}", b"b%d" % i)
        c.run(100)
    c.drop = lambda _s, d, _data: d == cut
    c.run(5000)
    bound = c.nodes[cut].replica.signed_high
    assert bound[0] == 1
    c.drop = lambda _s, _d, _data: False
    node = _restart(c, cut, {}, bound)
    for i in range(20):
        c.submit(leader, f"z{i}", b"z%d" % i)
        c.run(100)
    c.run(3000)
    assert [(p.view, p.seq) for p in _sent(node, "prepare") + _sent(node, "commit")] == []
    assert node.replica.stable_checkpoint_seq >= 20 and node.replica.vote_floor == bound
    for nid in c.ids[1:3]:  # they forget its old view-change: the new view needs a fresh one
        c.restart(nid)
        c.handle(nid, c.nodes[nid].replica.tick(c.now))
    c.run(3000)
    c.crash(leader)
    for nid in c.ids[1:]:
        c.handle(nid, c.nodes[nid].replica.submit("w", b"w", c.now))
    c.run(30000)
    assert [c.nodes[n].replica.view for n in c.ids[1:]] == [1, 1, 1]
    assert node.replica.vote_floor is None and c.nodes[c.ids[1]].replica.executed_seq("w") is not None
