"""Follower request timers: a busy leader is not a faulty one, a censoring one is."""

from __future__ import annotations

import pytest

from consensus.messages import CheckpointVote, decode, encode
from consensus.replica import BEHIND_CLAIM_TTL_FACTOR, MAX_TIMER_EXTENSIONS, ReplicaConfig

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
    c.run(20 * TIMEOUT)
    # node-2 told the others of it when its extensions ran out; they timed the leader
    # too and asked for a new view, node-2 joined them, and the new leader ordered it.
    assert all(c.nodes[i].replica.counters.get("request_timeouts", 0) >= 1 for i in ("node-1", "node-3"))
    assert c.nodes["node-2"].replica.view >= 1
    assert "censored" in c.committed_ids("node-2")


def _cut_off(c: Cluster, node: str) -> None:
    c.drop = lambda src, dst, data: node in (src, dst)


def test_a_cut_off_follower_does_not_leave_the_view_alone_and_votes_again_after_the_heal() -> None:
    c = Cluster(config=ReplicaConfig(cluster_id="test-cluster", checkpoint_interval=4, window=4,
                                     request_timeout_ms=TIMEOUT, view_change_timeout_ms=10 * TIMEOUT))
    c.submit("node-0", "before", b"x")
    c.run(5 * TIMEOUT)
    _cut_off(c, "node-3")
    c.submit("node-3", "stranded", b"payload")  # its client keeps talking to it
    c.run(10 * TIMEOUT)
    cut = c.nodes["node-3"].replica
    assert cut.counters.get("view_changes_deferred", 0) >= 1
    assert cut.counters.get("view_changes_started", 0) == 0
    assert cut.status()["in_view_change"] is False and cut.view == 0
    c.drop = lambda src, dst, data: False  # heal
    c.run(5 * TIMEOUT)
    assert "stranded" in c.committed_ids("node-3"), "re-sent after the heal, the leader orders it"
    assert all(n.replica.view == 0 for n in c.nodes.values()), "no view change: the leader was fine"
    # node-3 takes part again: the next batch is final with all four votes.
    c.submit("node-1", "after", b"y")
    c.run(5 * TIMEOUT)
    assert c.finals("node-1")["after"].agreeing == 4


@pytest.mark.parametrize(("n", "submitters", "within"), [
    (4, ("node-3",), 2), (4, ("node-1", "node-2", "node-3"), 2),
    (7, ("node-6",), 3), (7, ("node-1", "node-2", "node-3", "node-4", "node-5", "node-6"), 2),
])
def test_followers_that_hear_each_other_still_replace_a_dead_leader_in_an_idle_cluster(
        n: int, submitters: tuple[str, ...], within: int) -> None:
    # Nothing else happens in the cluster, so at first nobody has heard from anybody.
    # Without the cut-off guard it takes 2 T; with it at most one timeout more: at f = 2
    # one relayer is not enough to hear from, the others' own tellings are (3 T).
    c = Cluster(n=n, config=ReplicaConfig(cluster_id="test-cluster", checkpoint_interval=4, window=4,
                                          request_timeout_ms=TIMEOUT, view_change_timeout_ms=10 * TIMEOUT))
    c.crash("node-0")
    for node in submitters:
        c.submit(node, "orphan", b"payload")
    c.run(within * TIMEOUT + TIMEOUT // 2)
    assert all(c.nodes[i].replica.view == 1 for i in c.ids[1:])
    assert "orphan" in c.committed_ids(submitters[0])


def test_a_follower_that_hears_only_the_leader_does_not_ask_to_replace_it() -> None:
    # Partition {leader, node-3} | {node-1, node-2}: the leader never asks to replace
    # itself, so hearing it does not make node-3's view-change one the others would join.
    c = Cluster(config=ReplicaConfig(cluster_id="test-cluster", checkpoint_interval=4, window=4,
                                     request_timeout_ms=TIMEOUT, view_change_timeout_ms=10 * TIMEOUT))
    c.submit("node-0", "before", b"x")
    c.run(5 * TIMEOUT)
    side = {"node-0", "node-3"}
    c.drop = lambda src, dst, data: (src in side) != (dst in side)
    c.submit("node-3", "stranded", b"p")
    c.run(10 * TIMEOUT)
    r3 = c.nodes["node-3"].replica
    assert r3.counters.get("view_changes_started", 0) == 0 and r3.counters.get("view_changes_deferred", 0) >= 1


def test_one_peer_repeating_made_up_seqs_cannot_keep_a_replica_fetching() -> None:
    """A claim that we are behind is fetched for a bounded time; only f+1 claimants
    start that time afresh, so one Byzantine peer gets nothing past the first expiry."""
    c = Cluster(config=ReplicaConfig(cluster_id="test-cluster", checkpoint_interval=4, window=4,
                                     request_timeout_ms=TIMEOUT, view_change_timeout_ms=10 * TIMEOUT))
    c.submit("node-0", "a", b"x")
    c.run(60 * TIMEOUT)  # then idle: the last progress is long past
    liar, r1 = c.keys[3], c.nodes["node-1"].replica
    before = r1.counters.get("fetch_batches", 0)
    seq = 1000
    for _ in range(200):
        if r1._ahead_seq <= r1.last_executed_seq:  # expired: claim again
            seq += 1
            wire = encode("test-cluster", "node-3", CheckpointVote(seq, b"\x11" * 32), liar.sign)
            c.handle("node-1", r1.receive("node-3", wire, c.now))
        c.run(TIMEOUT)
    assert r1.counters.get("fetch_batches", 0) - before <= 2 * BEHIND_CLAIM_TTL_FACTOR
    assert r1.counters.get("behind_claim_expired", 0) >= 10


def test_back_from_a_long_partition_a_follower_fetches_what_it_missed_at_once() -> None:
    # Longer than the behind-claim lifetime (20 fetch intervals of T/2): the claims that
    # come after the heal used to expire at once, as if timed from the last progress,
    # and it caught up only through the idle probe (every 10 T).
    c = Cluster(config=ReplicaConfig(cluster_id="test-cluster", checkpoint_interval=4, window=4,
                                     request_timeout_ms=TIMEOUT, view_change_timeout_ms=10 * TIMEOUT))
    cut = "node-3"
    _cut_off(c, cut)
    for i in range(60):
        c.submit("node-0", f"during-{i}", b"x")
        c.run(TIMEOUT // 2)
    c.drop = lambda src, dst, data: False
    c.run(3 * TIMEOUT)  # the idle probe is timed from the start: it is far off now
    target = c.nodes["node-0"].replica.last_executed_seq
    healed_at = c.now
    i = 0
    while c.nodes[cut].replica.last_executed_seq < target and c.now < healed_at + 40 * TIMEOUT:
        c.submit("node-0", f"after-{i}", b"y")
        i += 1
        c.run(TIMEOUT // 4)
    assert c.nodes[cut].replica.last_executed_seq >= target
    assert c.now - healed_at <= 3 * TIMEOUT, f"caught up {c.now - healed_at} ms after the heal"
    assert c.nodes[cut].replica.view == 0 and not c.nodes[cut].replica.in_view_change


def test_back_from_a_partition_a_follower_still_catching_up_does_not_suspect_the_leader() -> None:
    # Seen with real containers: the heal reached the followers first, the cut-off one
    # re-sent its request and heard them (so it was "connected"), but it had batches to
    # fetch before it could execute its request, and asked alone for view 1. A follower
    # that knows it is behind treats the leader as making progress (bounded extensions).
    c = Cluster(config=ReplicaConfig(cluster_id="test-cluster", checkpoint_interval=4, window=4,
                                     request_timeout_ms=TIMEOUT, view_change_timeout_ms=10 * TIMEOUT))
    cut = "node-3"
    _cut_off(c, cut)
    c.submit(cut, "stranded", b"payload")
    for i in range(20):
        c.submit("node-0", f"during-{i}", b"x")
        c.run(TIMEOUT // 2)
    healed_at = c.now
    # Healed, but catching up is slow: nothing it asks for comes back for 4 timeouts.
    c.drop = lambda src, dst, data: dst == cut and c.now < healed_at + 4 * TIMEOUT and decode(data).kind in (
        "batches", "state", "body", "results", "new-view")
    for i in range(20):
        c.submit("node-0", f"after-{i}", b"y")
        c.run(TIMEOUT // 2)
    r3 = c.nodes[cut].replica
    assert r3.counters.get("view_changes_started", 0) == 0 and not r3.in_view_change
    assert "stranded" in c.committed_ids(cut) and r3.view == 0


def test_the_first_telling_after_a_heal_may_be_lost_without_a_lone_view_change() -> None:
    # Seen with real containers: right after the heal the peers re-dialled, and the
    # request sent on the link being replaced was lost, while the peers were already heard.
    c = Cluster(config=ReplicaConfig(cluster_id="test-cluster", checkpoint_interval=4, window=4,
                                     request_timeout_ms=TIMEOUT, view_change_timeout_ms=10 * TIMEOUT))
    cut = "node-3"
    c.submit("node-0", "before", b"x")
    c.run(TIMEOUT)
    _cut_off(c, cut)
    c.submit(cut, "stranded", b"payload")
    c.run(5 * TIMEOUT)
    lost: list[str] = []

    def first_telling_lost(src: str, dst: str, data: bytes) -> bool:
        if src == cut and decode(data).kind == "request" and len(lost) < 3:  # one copy per peer
            lost.append(dst)
            return True
        return False

    c.drop = first_telling_lost
    r3 = c.nodes[cut].replica
    for _ in range(8):  # the idle followers are heard (a signed message each, as any traffic)
        for key in c.keys[1:3]:
            wire = encode("test-cluster", key.node_id, CheckpointVote(1, b"\x22" * 32), key.sign)
            c.handle(cut, r3.receive(key.node_id, wire, c.now))
        c.run(TIMEOUT // 2)
    assert len(lost) == 3
    assert r3.counters.get("view_changes_started", 0) == 0 and not r3.in_view_change
    assert "stranded" in c.committed_ids(cut)


def test_a_follower_on_a_one_way_link_does_not_leave_the_view_alone() -> None:
    # node-3 hears everybody, but nothing it sends arrives (a one-way link): it used to
    # count as connected, asked alone for view 1 and sat in that view change after the heal.
    c = Cluster(config=ReplicaConfig(cluster_id="test-cluster", checkpoint_interval=4, window=4,
                                     request_timeout_ms=TIMEOUT, view_change_timeout_ms=10 * TIMEOUT))
    c.submit("node-0", "before", b"x")
    c.run(2 * TIMEOUT)
    mute = "node-3"
    c.drop = lambda src, dst, data: src == mute
    c.submit(mute, "stranded", b"payload")
    for i in range(20):  # the others stay busy, so node-3 keeps hearing all of them
        c.submit("node-1", f"during-{i}", b"x")
        c.run(TIMEOUT // 2)
    r3 = c.nodes[mute].replica
    assert r3.counters.get("view_changes_deferred", 0) >= 1
    assert r3.counters.get("view_changes_started", 0) == 0 and not r3.in_view_change
    c.drop = lambda src, dst, data: False  # heal
    c.run(5 * TIMEOUT)
    assert "stranded" in c.committed_ids(mute)
    assert all(n.replica.view == 0 for n in c.nodes.values()), "no view change: the leader was fine"
    c.submit("node-1", "after", b"y")
    c.run(5 * TIMEOUT)
    assert c.finals("node-1")["after"].agreeing == 4, "node-3 votes again"


def test_a_teller_asks_as_soon_as_f_others_told_it_of_its_request() -> None:
    # node-3 told everybody of its request; the copy to node-2 was lost, so only node-1
    # asks when its timer runs out, and re-tells from its view change. That telling is
    # the evidence node-3 waited for: it asks at once, not a request timeout later.
    c = _censoring_cluster()
    censor = c.drop
    lost: list[int] = []

    def drop(src: str, dst: str, data: bytes) -> bool:
        if src == "node-3" and dst == "node-2" and not lost and decode(data).kind == "request":
            lost.append(c.now)
            return True
        return censor(src, dst, data)

    c.drop = drop
    c.submit("node-3", "censored", b"payload")
    i = 0
    while c.now < 40 * TIMEOUT and not all(n.replica.view >= 1 for n in c.nodes.values()):
        c.submit("node-0", f"busy-{i}", b"work")
        i += 1
        c.run(20)
    assert lost, "the scenario needs the lost copy"
    # node-1's timer: told at lost[0], then MAX_TIMER_EXTENSIONS + 1 timeouts (busy leader).
    asked_at = lost[0] + (MAX_TIMER_EXTENSIONS + 1) * TIMEOUT
    assert c.now <= asked_at + TIMEOUT // 2, f"all in view 1 at {c.now} ms; node-1 asked at {asked_at} ms"
    c.run(TIMEOUT)
    assert "censored" in c.committed_ids("node-3")
