"""What one Byzantine peer can make an honest replica do: not censor requests, not
fetch forever, not burn CPU on an unsigned reply, not make it hold replayed history."""

from __future__ import annotations

from consensus.actions import Send, ViewChanged
from consensus.messages import (
    CertifiedResults, CheckpointVote, FetchResults, FetchState, Prepare, PrePrepare, RequestMsg, ResultsReply, batch_digest, decode, encode,
    encode_signed, preprepare_header_bytes,
)
from consensus import replica as replica_module
from consensus.replica import ReplicaConfig
from tests.consensus.harness import Cluster


class CountingRing:
    """A key ring that counts signature checks."""

    def __init__(self, ring: object) -> None:
        self.ring = ring
        self.checks = 0

    def verify(self, node: str, message: bytes, signature: bytes) -> bool:
        self.checks += 1
        return self.ring.verify(node, message, signature)  # type: ignore[attr-defined]

    def __contains__(self, node: object) -> bool:
        return node in self.ring  # type: ignore[operator]

    def __getattr__(self, name: str) -> object:
        return getattr(self.ring, name)


def test_requests_of_a_replaced_proposal_are_not_stuck_in_flight() -> None:
    """The leader (node-0) sends node-1 alone other, validly signed batches holding
    node-1's client requests; the cluster commits different batches at those seqs.
    After the next stable checkpoint node-1 must treat those requests as unordered, so
    as leader it proposes them."""
    c = Cluster(4)
    leader_key = next(k for k in c.keys if k.node_id == "node-0")
    r1 = c.nodes["node-1"].replica
    for round_ in range(6):
        seq = c.nodes["node-0"].replica._next_seq
        requests = ((f"x{round_}", b"client request"),)
        digest = batch_digest(c.now, requests)
        signature = leader_key.sign(preprepare_header_bytes("test-cluster", 0, seq, c.now, digest))
        wire = encode_signed("test-cluster", "node-0", PrePrepare(0, seq, c.now, requests, digest), signature)
        c.handle("node-1", r1.receive("node-0", wire, c.now))
        c.submit("node-0", f"ok{round_}", b"ok")
        c.run(2000)
    assert r1.stable_checkpoint_seq >= 4
    assert not [rid for rid, s in r1._in_flight.items() if s <= r1.stable_checkpoint_seq]
    c.submit("node-1", "x0", b"client request")  # the client retries at node-1
    c.crash("node-0")
    c.run(30_000)
    assert any(a.leader == "node-1" for a in c.nodes["node-1"].of(ViewChanged))
    assert "x0" in r1._executed


def test_one_peer_claiming_a_far_checkpoint_does_not_keep_a_replica_fetching() -> None:
    def fetches(inject: bool) -> tuple[int, int]:
        c = Cluster(4)
        c.submit("node-1", "a", b"a")
        c.run(2000)
        if inject:  # ONE signed checkpoint vote from node-3, far ahead
            key = next(k for k in c.keys if k.node_id == "node-3")
            wire = encode("test-cluster", "node-3", CheckpointVote(2**62, b"\x00" * 32), key.sign)
            c.handle("node-1", c.nodes["node-1"].replica.receive("node-3", wire, c.now))
        sent = {"n": 0}

        def count(src: str, dst: str, data: bytes) -> bool:
            sent["n"] += src == "node-1" and b"fetch-batches" in data[:40]
            return False

        c.drop = count
        c.run(120_000)  # two idle minutes
        return sent["n"], c.nodes["node-1"].replica._ahead_seq

    baseline, _ = fetches(False)
    injected, ahead = fetches(True)
    assert ahead < 2**62  # the unbacked claim expired
    assert injected <= baseline + 25  # was ~15x the baseline: every 500 ms, forever


def test_an_unsigned_results_reply_buys_at_most_one_check_per_validator() -> None:
    c = Cluster(4)
    c.submit("node-1", "r0", b"request")
    c.run(2000)
    r2 = c.nodes["node-2"].replica
    ring = r2.keyring = CountingRing(r2.keyring)  # type: ignore[assignment]
    r2._results.pop(1, None)  # as if node-2 skipped batch 1 and still wants its result
    r2._missing_results[1] = None
    entries = (("r0", b"\x00" * 32, b"result"),)
    repeated = CertifiedResults(1, 0, entries, tuple(("node-0", bytes(64)) for _ in range(4)))
    r2.receive("node-3", encode("test-cluster", "node-3", ResultsReply((repeated,))), c.now)
    assert ring.checks == 1  # node-0 once, not four times
    too_many = CertifiedResults(1, 0, entries, tuple((f"node-{i % 4}", bytes(64)) for i in range(1024)))
    r2.receive("node-3", encode("test-cluster", "node-3", ResultsReply((too_many,))), c.now)
    assert ring.checks == 1  # more signatures than validators: refused before any check


def test_genuine_but_unasked_results_are_not_kept() -> None:
    """A peer replaying certified results of batches long truncated (or never asked for)
    must not make a replica hold them: up to 64 batches per reply, until the next
    checkpoint (consensus review, seventh session)."""
    c = Cluster(4, ReplicaConfig(cluster_id="test-cluster", checkpoint_interval=4, window=4, batch_max_requests=1))
    c.submit("node-1", "r0", b"request-0")
    c.run(200)
    replies: list[bytes] = []
    handle = c.handle

    def keep_results(node_id: str, actions: list) -> None:
        replies.extend(a.payload for a in actions if isinstance(a, Send) and decode(a.payload).kind == "results")
        handle(node_id, actions)

    c.handle = keep_results  # type: ignore[method-assign]
    c.handle("node-1", c.nodes["node-1"].replica.receive("node-2", encode("test-cluster", "node-2", FetchResults(1, 1)), c.now))
    c.handle = handle  # type: ignore[method-assign]
    assert len(replies) == 1 and decode(replies[0]).payload.batches[0].seq == 1  # a genuine certificate
    for i in range(1, 80):
        c.submit("node-1", f"r{i}", f"request-{i}".encode())
        c.run(30)
    c.run(500)
    r0 = c.nodes["node-0"].replica
    assert r0._results_floor() >= 1 and 1 not in r0._results  # truncated: seq 1 is history
    r0.receive("node-1", replies[0], c.now)  # node-1 replays its old answer
    assert 1 not in r0._results and r0.counters.get("unsolicited_results") == 1


def test_catch_up_replies_stay_within_the_reply_budget(monkeypatch) -> None:
    """64 committed batches of 1 MiB do not fit in one 64 MiB message, and an oversized
    reply is never sent: a laggard asked again forever. Replies now stop at
    MAX_REPLY_BYTES (here shrunk to 50 KB, i.e. two of these 20 KB batches)."""
    monkeypatch.setattr(replica_module, "MAX_REPLY_BYTES", 50_000)
    c = Cluster(4, ReplicaConfig(cluster_id="test-cluster", checkpoint_interval=16, window=8, batch_max_requests=2))
    laggard = c.ids[3]
    c.crash(laggard)
    for i in range(0, 24, 2):
        c.submit(c.ids[0], f"r{i}", bytes([i]) * 10_000)
        c.submit(c.ids[0], f"r{i + 1}", bytes([i + 1]) * 10_000)
        c.run(20)
    c.run(500)
    top = c.nodes[c.ids[0]].replica.last_executed_seq
    assert top == 12  # 12 batches of two 10 KB requests
    replies: list[int] = []
    handle = c.handle

    def watch(node_id: str, actions: list) -> None:
        for a in actions:
            if isinstance(a, Send) and a.to == laggard and decode(a.payload).kind == "batches":
                replies.append(len(decode(a.payload).payload.batches))
        handle(node_id, actions)

    c.handle = watch  # type: ignore[method-assign]
    restarted = c.restart(laggard)
    for _ in range(100):
        if restarted.replica.last_executed_seq == top:
            break
        c.run(100)
    assert restarted.replica.last_executed_seq == top
    assert replies and max(replies) <= 3 and sum(replies) >= top, replies


def test_fetch_answers_to_one_peer_are_bounded_by_a_byte_budget(monkeypatch) -> None:
    """150 tiny fetch-state asks bought 150 snapshots (a gigabyte in a review). Answers to
    one peer now draw on a byte budget that refills at ANSWER_BYTES_PER_S (here shrunk
    to about one snapshot per second, with a burst of about ten)."""
    c = Cluster(4)
    for i in range(5):
        c.submit("node-0", f"r{i}", b"request")
        c.run(500)
    r0 = c.nodes["node-0"].replica
    assert r0.stable_checkpoint_seq >= 4
    snapshot = len(r0._wire(FetchState(0))) + len(r0._stable.blob or b"") + sum(map(len, r0._stable.proof))
    monkeypatch.setattr(replica_module, "ANSWER_BURST_BYTES", 10 * snapshot)
    monkeypatch.setattr(replica_module, "ANSWER_BYTES_PER_S", snapshot)
    key = next(k for k in c.keys if k.node_id == "node-3")
    ask = encode("test-cluster", "node-3", FetchState(0), key.sign)

    def answers(asks: int) -> int:
        sent = [a for _ in range(asks) for a in r0.receive("node-3", ask, c.now)
                if isinstance(a, Send) and a.to == "node-3"]
        return len(sent)

    burst = answers(150)
    assert 8 <= burst <= 12, burst
    c.now += 5_000
    assert 3 <= answers(150) <= 7
    assert r0.counters["answers_limited"] >= 150 * 2 - burst - 7
    # Another peer's budget is its own.
    other = encode("test-cluster", "node-2", FetchState(0), next(k for k in c.keys if k.node_id == "node-2").sign)
    assert any(isinstance(a, Send) for a in r0.receive("node-2", other, c.now))


def test_requests_one_peer_relays_are_held_within_its_quota(monkeypatch) -> None:
    """Relayed requests had no quota: one peer could fill the pending table and memory
    (100,000 requests of 256 KiB). Now each peer's relayed requests that wait here are
    bounded in bytes (shrunk here to 10 of these requests), and execution frees them."""
    c = Cluster(4)
    request = b"r" * 1000
    monkeypatch.setattr(replica_module, "RELAYED_BYTES_PER_PEER", 10 * len(request))
    r1 = c.nodes["node-1"].replica  # a follower: keeps relayed requests pending until executed
    key3 = next(k for k in c.keys if k.node_id == "node-3")
    key2 = next(k for k in c.keys if k.node_id == "node-2")
    c.drop = lambda src, dst, data: True  # nothing moves: what node-1 holds stays pending
    for i in range(30):
        r1.receive("node-3", encode("test-cluster", "node-3", RequestMsg(f"x{i}", request), key3.sign), c.now)
    assert sum(p.origin == "node-3" for p in r1._pending.values()) == 10
    assert r1.counters["relayed_over_quota"] == 20
    # Another peer's quota is its own.
    r1.receive("node-2", encode("test-cluster", "node-2", RequestMsg("y0", request), key2.sign), c.now)
    assert "y0" in r1._pending
    # Once the cluster orders them, the quota is free again.
    c.drop = lambda src, dst, data: False
    for i in range(10):
        c.submit("node-0", f"x{i}", request)
    c.run(3000)
    assert not any(p.origin == "node-3" for p in r1._pending.values())
    assert r1._relayed["node-3"] == [0, 0]
    r1.receive("node-3", encode("test-cluster", "node-3", RequestMsg("x-late", request), key3.sign), c.now)
    assert "x-late" in r1._pending


def test_a_replayed_signed_message_is_not_verified_again() -> None:
    """A peer re-sending the same signed prepare a thousand times made us check its
    signature a thousand times. Recently verified wires are now remembered; a wire that
    differs in one byte is still checked (and refused)."""
    c = Cluster(4)
    c.submit("node-0", "r0", b"request")
    c.run(2000)
    r1 = c.nodes["node-1"].replica
    ring = r1.keyring = CountingRing(r1.keyring)  # type: ignore[assignment]
    key2 = next(k for k in c.keys if k.node_id == "node-2")
    seq = r1.last_executed_seq + 5
    wire = encode("test-cluster", "node-2", Prepare(0, seq, b"\x01" * 32, c.now, b""), key2.sign)
    for _ in range(1000):
        r1.receive("node-2", wire, c.now)
    assert ring.checks == 1
    assert r1.counters["verified_before"] == 999
    forged = wire[:-1] + bytes([wire[-1] ^ 1])
    r1.receive("node-2", forged, c.now)
    assert ring.checks == 2 and r1.counters["bad_signature"] == 1
