"""n = 1: a lone validator runs the same protocol, minus the signatures no peer reads
(its pre-prepares and commits): it signs its result votes only."""

from __future__ import annotations

from typing import Any

from consensus.actions import Final, Send
from consensus.codec import unpack_bounded
from consensus.certificate import verify_result_certificate
from consensus.messages import PRE_PREPARE, CommittedBatch, batch_digest, decode
from consensus.pbft_proofs import verify_committed
from consensus.replica import ReplicaConfig
from tests.consensus.harness import Cluster


class CountingKey:
    """The node's key, counting what it signs."""

    def __init__(self, key: Any) -> None:
        self._key, self.signed = key, 0

    def sign(self, message: bytes) -> bytes:
        self.signed += 1
        return self._key.sign(message)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._key, name)


def _committed(durable: dict[str, bytes], seq: int) -> CommittedBatch:
    view, cert_seq, agreed, digest, wires = unpack_bounded(durable[f"committed/{seq:016d}"], max_size=1 << 20)
    batch_key = next(k for k in durable if k.startswith(f"batch/{seq:016d}/"))
    _, requests = unpack_bounded(durable[batch_key], max_size=1 << 20)
    return CommittedBatch(view, cert_seq, agreed, tuple((r, q) for r, q in requests), tuple(wires))


def test_lone_validator_signs_once_per_batch_and_its_results_certify() -> None:
    """Its result vote, which clients check, is signed; its order vote (the pre-prepare,
    which no peer reads) is not: one ML-DSA signature per batch, as DESIGN.md asks."""
    c = Cluster(1, ReplicaConfig(cluster_id="test-cluster", checkpoint_interval=64, window=4))
    node = c.nodes["node-0"]
    key = CountingKey(node.replica.key)
    node.replica.key = key  # type: ignore[assignment]
    for i in range(3):
        c.submit("node-0", f"r{i}", b"request-%d" % i)
        c.now += 10
        c.handle("node-0", node.replica.propose(c.now))
    finals = {f.request_id: f for f in node.of(Final)}
    assert set(finals) == {"r0", "r1", "r2"}
    assert key.signed == 3  # per batch: the result vote only
    for rid, final in finals.items():
        assert verify_result_certificate(c.keyring, "test-cluster", rid, final.result, final.certificate) == (True, "")
    assert not [k for k in node.durable if k.startswith(("vote/commit/", "vote/prepare/"))]
    for seq in (1, 2, 3):
        cert = _committed(node.durable, seq)
        (order_vote,) = cert.commits  # its own pre-prepare header stands for the quorum of 1
        header = decode(order_vote)
        assert (header.kind, header.signer, header.signature) == (PRE_PREPARE, "node-0", b"")
        assert header.payload.digest == batch_digest(cert.agreed_time_ms, cert.requests)  # type: ignore[union-attr]

    restarted = c.restart("node-0")  # recovers from the durable records alone
    assert restarted.replica.last_executed_seq == 3
    c.submit("node-0", "r3", b"request-3")
    c.now += 10
    c.handle("node-0", restarted.replica.propose(c.now))
    finals = {f.request_id: f for f in restarted.of(Final)}  # recovery re-announces r0..r2
    assert finals["r3"].certificate.seq == 4
    assert verify_result_certificate(c.keyring, "test-cluster", "r3", finals["r3"].result, finals["r3"].certificate)[0]


def test_a_pre_prepare_is_no_commit_in_a_real_cluster() -> None:
    """With n = 4 only commit messages make a commit certificate."""
    c = Cluster(4, ReplicaConfig(cluster_id="test-cluster", checkpoint_interval=64, window=4))
    c.submit("node-0", "r0", b"request")
    c.run(100)
    durable = c.nodes["node-1"].durable
    cert = _committed(durable, 1)
    assert verify_committed(c.keyring, "test-cluster", cert)
    prepared = unpack_bounded(durable[f"prepared/{1:016d}"], max_size=1 << 20)[4]  # pre-prepare header + prepares
    assert not verify_committed(c.keyring, "test-cluster", CommittedBatch(
        cert.view, cert.seq, cert.agreed_time_ms, cert.requests, tuple(prepared)))


def test_idle_lone_validator_ticks_without_fetching_from_peers_it_does_not_have() -> None:
    """The idle probe for a newer state used to pick a peer modulo zero peers."""
    c = Cluster(1, ReplicaConfig(cluster_id="test-cluster"))
    node = c.nodes["node-0"]
    for _ in range(6000):  # ten minutes of 100 ms ticks
        c.now += 100
        c.handle("node-0", node.replica.tick(c.now))
    assert not [a for a in node.actions if isinstance(a, Send)]
    c.submit("node-0", "r0", b"request")
    c.now += 10
    c.handle("node-0", node.replica.tick(c.now))
    assert [f.request_id for f in node.of(Final)] == ["r0"]


def test_the_leader_starts_a_batchs_prechecks_before_signing_its_pre_prepare() -> None:
    """The pre-prepare signature (~1 ms, GIL released) then overlaps with the prechecks
    running on other threads, instead of delaying their start. (n = 4: a lone
    validator signs no pre-prepare.)"""
    c = Cluster(4, ReplicaConfig(cluster_id="test-cluster", checkpoint_interval=64, window=4))
    node = c.nodes["node-0"]
    replica = node.replica
    assert replica.is_leader
    events: list[str] = []
    key = replica.key

    class OrderKey(CountingKey):
        def sign(self, message: bytes) -> bytes:
            events.append("sign")
            return key.sign(message)

    replica.key = OrderKey(key)  # type: ignore[assignment]
    replica._app_prefetch = lambda requests: events.append(f"prefetch {sorted(requests)}")
    c.submit("node-0", "r0", b"request-0")
    c.now += 10
    c.handle("node-0", replica.propose(c.now))
    assert events[:2] == ["prefetch [b'request-0']", "sign"]
    c.run(100)
    assert {f.request_id for f in node.of(Final)} == {"r0"}
