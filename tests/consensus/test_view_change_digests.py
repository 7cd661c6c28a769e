"""View-changes carry prepared certificates by digest, not whole batches: their size does
not grow with the batches in the window (with 8 MiB batches a new-view used to exceed
the 64 MiB message limit, so no view change could complete). A replica that lacks a
re-proposed batch fetches its body from the certificate's signers."""

from __future__ import annotations

from consensus.actions import Send
from consensus.messages import (
    BodyReply, FetchBody, PrePrepare, batch_digest, decode, encode, encode_signed, preprepare_header_bytes,
)
from consensus.replica import ReplicaConfig
from tests.consensus.harness import Cluster, ViewChanged

BIG = 200_000  # bytes per request: 4 per batch, ~800 KB per batch


def _sent(c: Cluster, kinds: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """Wrap the cluster's action handler to record (sender, wire) of the given kinds."""
    seen: list[tuple[str, bytes]] = []
    handle = c.handle

    def watch(node_id: str, actions: list) -> None:
        for action in actions:
            if isinstance(action, Send) and decode(action.payload).kind in kinds:
                seen.append((node_id, action.payload))
        handle(node_id, actions)

    c.handle = watch  # type: ignore[method-assign]
    return seen


def _run_until(c: Cluster, done, rounds: int = 300, step_ms: int = 100) -> None:
    for _ in range(rounds):
        if done():
            return
        c.run(step_ms)
    assert done(), "condition not reached within the virtual deadline"


def test_a_view_change_stays_small_however_large_the_prepared_batches() -> None:
    c = Cluster(4, ReplicaConfig(cluster_id="test-cluster", checkpoint_interval=4, window=4, batch_max_requests=4))
    old_leader = c.ids[0]
    blocking = {"commits": True}
    c.drop = lambda _s, _d, data: blocking["commits"] and decode(data).kind == "commit"
    view_changes = _sent(c, ("view-change", "new-view"))
    for i in range(8):
        c.submit(old_leader, f"big{i}", bytes([i]) * BIG)
    c.run(100)
    follower = c.nodes[c.ids[2]].replica
    prepared = [s for s, slot in follower._slots.items() if slot.prepared_cert is not None]
    assert prepared == [1, 2]  # 8 requests of 200 KB, prepared but not committed
    blocking["commits"] = False
    c.crash(old_leader)
    c.submit(c.ids[2], "small", b"small")  # its timer expiring starts the view change
    _run_until(c, lambda: all(c.nodes[n].replica.executed_seq("small") is not None for n in c.ids[1:]))

    assert view_changes, "no view-change was sent"
    largest = max(len(wire) for _, wire in view_changes)
    assert largest < 64 * 1024, f"a view-change message of {largest} bytes carries the batches"
    for n in c.ids[1:]:
        replica = c.nodes[n].replica
        assert replica.view == 1
        assert [replica.executed_seq(f"big{i}") for i in range(8)] == [1] * 4 + [2] * 4


def test_a_replica_that_missed_a_batch_fetches_it_by_digest_and_a_forged_body_is_refused() -> None:
    c = Cluster(4, ReplicaConfig(cluster_id="test-cluster", checkpoint_interval=4, window=4, batch_max_requests=2))
    old_leader, late = c.ids[0], c.ids[3]
    blocking = {"view0": True}
    # In view 0, node-3 never sees the pre-prepare and nothing commits: the batch is
    # prepared by node-0 (its pre-prepare), node-1 and node-2.
    c.drop = lambda _s, d, data: blocking["view0"] and (
        decode(data).kind == "commit" or (d == late and decode(data).kind == "pre-prepare"))
    for i in range(2):
        c.submit(old_leader, f"a{i}", f"a{i}".encode())
    c.run(100)
    assert c.nodes[c.ids[1]].replica._slots[1].prepared_cert is not None
    assert not c.nodes[late].replica._slots[1].has_batch

    forged = {"count": 0}

    def forge_first_body(src: str, dst: str, data: bytes) -> bytes:
        m = decode(data)
        if dst == late and m.kind == "body" and forged["count"] == 0:
            forged["count"] += 1
            body: BodyReply = m.payload  # type: ignore[assignment]
            wrong = tuple((rid, req + b"!") for rid, req in body.requests)
            return encode("test-cluster", src, BodyReply(body.seq, body.agreed_time_ms, wrong))
        return data

    c.tamper = forge_first_body
    fetches = _sent(c, ("fetch-body",))
    blocking["view0"] = False
    c.crash(old_leader)
    c.submit(c.ids[2], "p", b"p")
    # With node-0 down, view 1 needs node-3's prepare: it must obtain the batch first.
    _run_until(c, lambda: bool(c.nodes[late].of(ViewChanged)) and c.nodes[late].replica.executed_seq("a1") is not None)

    assert any(sender == late for sender, _ in fetches)
    assert forged["count"] == 1 and c.nodes[late].replica.counters.get("invalid_body") == 1
    for n in c.ids[1:]:
        assert c.nodes[n].replica.executed_seq("a0") == 1 and c.nodes[n].replica.executed_seq("a1") == 1
    assert c.nodes[late].app.executed[:2] == [(1, b"a0"), (1, b"a1")]


def test_a_batch_is_persisted_with_the_prepare_that_endorses_it() -> None:
    """A validator whose prepare counts in someone's certificate must hold the batch
    after a crash too: the new view may name it by digest only."""
    c = Cluster(4, ReplicaConfig(cluster_id="test-cluster", checkpoint_interval=4, window=4, batch_max_requests=1))
    quiet = c.ids[2]
    # node-2 receives the pre-prepare but no prepares: it votes, yet never prepares.
    c.drop = lambda _s, d, data: d == quiet and decode(data).kind in ("prepare", "commit")
    c.submit(c.ids[0], "x", b"x")
    c.run(50)
    slot = c.nodes[quiet].replica._slots[1]
    assert slot.sent_prepare == 0 and slot.prepared_cert is None
    assert any(k.startswith("batch/0000000000000001/") for k in c.nodes[quiet].durable)
    restarted = c.restart(quiet)
    assert slot.digest in restarted.replica._slots[1].bodies


def test_a_peer_gets_a_body_at_most_three_times_per_slot() -> None:
    c = Cluster(4, ReplicaConfig(cluster_id="test-cluster", checkpoint_interval=4, window=4, batch_max_requests=1))
    c.drop = lambda _s, _d, data: decode(data).kind == "commit"  # keep slot 1 uncommitted, in the log
    c.submit(c.ids[0], "x", b"x" * 1000)
    c.run(50)
    holder = c.nodes[c.ids[1]].replica
    digest = holder._slots[1].digest
    assert digest is not None
    ask = encode("test-cluster", c.ids[2], FetchBody(1, digest))
    answers = [a for _ in range(5) for a in holder.receive(c.ids[2], ask, c.now) if isinstance(a, Send)]
    assert len(answers) == 3 and all(decode(a.payload).kind == "body" for a in answers)
    other = encode("test-cluster", c.ids[3], FetchBody(1, digest))
    assert any(isinstance(a, Send) for a in holder.receive(c.ids[3], other, c.now))  # per peer


def _batch_missed_by_node3(c: Cluster, lose_bodies: dict[str, bool]) -> None:
    """View 0: node-3 never sees the pre-prepare of seq 1 and nothing commits; then node-0
    crashes, so view 1 needs node-3's prepare for a batch it must fetch. ``body`` replies
    to node-3 are lost while ``lose_bodies["on"]``."""
    late = c.ids[3]
    state = {"view0": True}

    def drop(_s: str, d: str, data: bytes) -> bool:
        kind = decode(data).kind
        if state["view0"] and (kind == "commit" or (d == late and kind == "pre-prepare")):
            return True
        return lose_bodies["on"] and d == late and kind == "body"

    c.drop = drop
    for i in range(2):
        c.submit(c.ids[0], f"a{i}", f"a{i}".encode())
    c.run(100)
    state["view0"] = False
    c.crash(c.ids[0])
    c.submit(c.ids[2], "p", b"p")


def test_lost_body_answers_do_not_starve_a_replica_after_the_network_heals() -> None:
    """Each peer gets 3 answers per slot and view: answers lost in one view must not use
    up the holders for good (review of b184fa4: the cluster stayed stuck for 2 minutes)."""
    c = Cluster(4, ReplicaConfig(cluster_id="test-cluster", checkpoint_interval=4, window=4, batch_max_requests=2))
    lossy = {"on": True}
    _batch_missed_by_node3(c, lossy)
    c.run(6000)  # 24 asks, every answer lost
    assert c.nodes[c.ids[3]].replica.executed_seq("a1") is None
    lossy["on"] = False
    _run_until(c, lambda: all(c.nodes[n].replica.executed_seq("p") is not None for n in c.ids[1:]), rounds=1200)


def test_a_leader_cannot_propose_over_its_new_views_re_proposals() -> None:
    """While node-3 waits for a re-proposed batch its slot is empty; a pre-prepare of the
    new leader for that seq must still be refused (it would make node-3 sign a prepare
    against the new-view, and then refuse the planned batch in that view)."""
    c = Cluster(4, ReplicaConfig(cluster_id="test-cluster", checkpoint_interval=4, window=4, batch_max_requests=2))
    _batch_missed_by_node3(c, {"on": True})
    late = c.nodes[c.ids[3]].replica
    _run_until(c, lambda: late.view == 1 and not late.in_view_change)
    assert late._slots[1].awaiting is not None
    requests = (("evil", b"evil"),)
    digest = batch_digest(c.now, requests)
    signature = c.keys[1].sign(preprepare_header_bytes("test-cluster", 1, 1, c.now, digest))
    rogue = encode_signed("test-cluster", c.ids[1], PrePrepare(1, 1, c.now, requests, digest), signature)
    sent = [decode(a.payload) for a in late.receive(c.ids[1], rogue, c.now) if isinstance(a, Send)]
    assert not [m for m in sent if m.kind == "prepare"]
    assert late.counters.get("preprepare_in_reproposed_range") == 1 and late._slots[1].awaiting is not None


def test_a_slot_keeps_at_most_four_endorsed_batches_besides_its_current_and_prepared_ones() -> None:
    c = Cluster(4, ReplicaConfig(cluster_id="test-cluster", checkpoint_interval=4, window=4, batch_max_requests=1))
    replica = c.nodes[c.ids[1]].replica
    slot = replica._slot(1)
    bodies = [(i, ((f"r{i}", bytes([i])),)) for i in range(7)]
    for agreed, requests in bodies:
        replica._keep_body(slot, batch_digest(agreed, requests), (agreed, requests))
    assert list(slot.bodies) == [batch_digest(a, r) for a, r in bodies[-4:]]  # the newest four
