"""Adaptive batching: full batches whenever the window has room, partial batches only
while few batches are in flight (or once a request waited batch_max_wait_ms)."""

from __future__ import annotations

from consensus.actions import Send
from consensus.messages import PRE_PREPARE, decode
from consensus.replica import ReplicaConfig
from tests.consensus.harness import Cluster


def _config(**kw: int) -> ReplicaConfig:
    base = dict(checkpoint_interval=4, window=4, batch_max_requests=8, batch_max_delay_ms=5,
                max_partial_in_flight=1, batch_max_wait_ms=50)
    base.update(kw)
    return ReplicaConfig(cluster_id="test-cluster", **base)  # type: ignore[arg-type]


def _sent_pre_prepares(c: Cluster) -> list:  # type: ignore[type-arg]
    """The leader's pre-prepares, in the order it sent them (first send of each seq)."""
    out: dict[int, object] = {}
    for a in c.nodes["node-0"].of(Send):
        m = decode(a.payload)
        if m.kind == PRE_PREPARE:
            out.setdefault(m.payload.seq, m.payload)  # type: ignore[union-attr]
    return list(out.values())


def _proposals(c: Cluster) -> list[int]:
    """Sizes of the pre-prepares the leader has sent, in order."""
    return [len(p.requests) for p in _sent_pre_prepares(c)]


def _tick_leader(c: Cluster, ms: int) -> None:
    c.now += ms
    c.handle("node-0", c.nodes["node-0"].replica.tick(c.now))


def _queue_consistent(c: Cluster) -> None:
    for node in c.nodes.values():
        r = node.replica
        expected = [rid for rid in r._pending if rid not in r._in_flight and rid not in r._executed]
        assert list(r._unproposed()) == expected
        assert r._queue_bytes == sum(len(r._pending[x].request) + len(x) for x in expected)


def test_partial_batch_waits_while_one_is_in_flight_then_goes_when_it_executes() -> None:
    c = Cluster(config=_config())
    c.submit("node-0", "r0", b"x")
    assert _proposals(c) == []  # younger than batch_max_delay_ms
    _tick_leader(c, 5)
    assert _proposals(c) == [1]  # nothing in flight: partial batch goes
    for i in range(1, 6):
        c.submit("node-0", f"r{i}", b"x")
    _tick_leader(c, 10)
    assert _proposals(c) == [1]  # one batch in flight: the partial batch keeps growing
    assert c.nodes["node-0"].replica.status()["in_flight_batches"] == 1
    c.deliver_all()  # batch 1 commits and executes; a partial batch waits for the end of the burst
    assert _proposals(c) == [1]
    c.handle("node-0", c.nodes["node-0"].replica.propose(c.now))  # the driver's end-of-burst call
    assert _proposals(c) == [1, 5]
    assert _sent_pre_prepares(c)[1].agreed_time_ms == c.now  # no tick happened in between
    c.run(100)
    assert c.nodes["node-3"].app.count == 6
    _queue_consistent(c)


def test_full_batch_goes_even_with_batches_in_flight() -> None:
    c = Cluster(config=_config())
    c.submit("node-0", "p0", b"x")
    _tick_leader(c, 5)
    for i in range(8):
        c.submit("node-0", f"f{i}", b"y")
    assert _proposals(c) == [1, 8]  # full at once, although one batch is in flight
    c.submit("node-0", "late", b"z")
    _tick_leader(c, 10)
    assert _proposals(c) == [1, 8]  # partial waits: two batches in flight
    c.run(100)
    assert all(n.app.count == 10 for n in c.nodes.values())
    _queue_consistent(c)


def test_partial_batch_latency_is_bounded_when_execution_stalls() -> None:
    c = Cluster(config=_config())
    c.drop = lambda src, dst, data: True  # nothing commits
    c.submit("node-0", "a", b"x")
    _tick_leader(c, 5)
    c.submit("node-0", "b", b"x")
    _tick_leader(c, 40)
    assert _proposals(c) == [1]
    _tick_leader(c, 10)  # "b" waited batch_max_wait_ms
    assert _proposals(c) == [1, 1]


def test_more_partial_batches_in_flight_when_configured() -> None:
    c = Cluster(config=_config(max_partial_in_flight=2))
    c.submit("node-0", "a", b"x")
    _tick_leader(c, 5)
    c.submit("node-0", "b", b"x")
    _tick_leader(c, 5)
    c.submit("node-0", "c", b"x")
    _tick_leader(c, 5)
    assert _proposals(c) == [1, 1]  # the third waits for one of the two to execute


def test_unproposed_queue_stays_exact_across_a_view_change() -> None:
    c = Cluster(config=_config())
    # pre-prepares arrive (the requests are in flight everywhere) but nothing prepares
    c.drop = lambda src, dst, data: decode(data).kind in ("prepare", "commit")
    for i in range(12):
        c.submit("node-1", f"v{i}", b"payload-%d" % i)
        c.run(10)
    assert len(c.nodes["node-1"].replica._in_flight) >= 8
    c.crash("node-0")

    def view_0_votes(src: str, dst: str, data: bytes) -> bool:
        m = decode(data)
        return m.kind in ("prepare", "commit") and m.payload.view == 0  # type: ignore[union-attr]

    c.drop = view_0_votes  # view 0 never prepares: the new view voids its proposals
    for _ in range(600):
        c.run(10)
        _queue_consistent(c)
    # the void proposals' requests went back to the new leader's queue and were proposed again
    reproposed = {rid for a in c.nodes["node-1"].of(Send) for m in [decode(a.payload)]
                  if m.kind == PRE_PREPARE and m.payload.view >= 1 for rid, _ in m.payload.requests}  # type: ignore[union-attr]
    assert {f"v{i}" for i in range(8)} <= reproposed
    for nid in ("node-1", "node-2", "node-3"):
        assert c.nodes[nid].replica.view >= 1
        assert c.nodes[nid].app.count == 12


def test_requests_of_one_burst_share_a_batch() -> None:
    """Requests that arrive together (one event-loop pass at the node) are not split
    into one tiny batch each: submit only proposes full batches, ``propose`` closes the
    partial batch once the burst has been taken in."""
    c = Cluster(config=_config())
    c.now += 50  # every request below is "old enough" by batch_max_delay_ms from the start
    leader = c.nodes["node-0"].replica
    for i in range(5):
        c.handle("node-0", leader.submit(f"b{i}", b"x", c.now - 20))
    assert _proposals(c) == []
    c.handle("node-0", leader.propose(c.now))
    assert _proposals(c) == [5]
    c.run(100)
    assert c.nodes["node-2"].app.count == 5


def test_batch_deadline_says_when_propose_will_send_the_partial_batch() -> None:
    """The driver arms a timer for ``batch_deadline_ms``: proposing just before it sends
    nothing, proposing at it sends the batch; with a batch in flight the deadline moves
    out to ``batch_max_wait_ms``; followers and an empty queue have no deadline."""
    c = Cluster(config=_config())
    leader = c.nodes["node-0"].replica
    assert leader.batch_deadline_ms() is None  # nothing waiting
    start = c.now
    c.submit("node-0", "a", b"x")
    assert leader.batch_deadline_ms() == start + 5
    assert c.nodes["node-1"].replica.batch_deadline_ms() is None  # not the leader
    c.handle("node-0", leader.propose(start + 4))
    assert _proposals(c) == []
    c.handle("node-0", leader.propose(start + 5))
    assert _proposals(c) == [1]
    assert leader.batch_deadline_ms() is None  # the queue is empty again
    c.now = start + 7
    c.submit("node-0", "b", b"x")  # one batch in flight (max_partial_in_flight=1)
    assert leader.batch_deadline_ms() == start + 7 + 50
    c.handle("node-0", leader.propose(start + 7 + 49))
    assert _proposals(c) == [1]
    c.handle("node-0", leader.propose(start + 7 + 50))
    assert _proposals(c) == [1, 1]


def test_batch_deadline_and_propose_agree_when_the_wait_bound_is_below_the_delay() -> None:
    """With batch_max_wait_ms < batch_max_delay_ms a partial batch behind one in flight
    goes out after the delay (both bounds hold); the timer deadline must say the same,
    or the driver's timer fires, sends nothing and re-arms in a busy loop."""
    c = Cluster(config=_config(batch_max_delay_ms=20, batch_max_wait_ms=10))
    c.drop = lambda src, dst, data: True  # nothing commits: the first batch stays in flight
    leader = c.nodes["node-0"].replica
    start = c.now
    c.submit("node-0", "a", b"x")
    c.handle("node-0", leader.propose(start + 20))
    assert _proposals(c) == [1]
    c.now = start + 21
    c.submit("node-0", "b", b"x")
    deadline = leader.batch_deadline_ms()
    assert deadline == start + 21 + 20
    c.handle("node-0", leader.propose(deadline - 1))
    assert _proposals(c) == [1]
    c.handle("node-0", leader.propose(deadline))
    assert _proposals(c) == [1, 1]
