"""A Byzantine validator's view-changes may carry only certificates of its window."""

from __future__ import annotations

import dataclasses

from consensus.actions import Send
from consensus.messages import PreparedCert, ViewChange, decode, encode
from consensus.pbft_proofs import checkpoint_proof_digest, verify_prepared, verify_view_change
from consensus.replica import ReplicaConfig
from tests.consensus.harness import Cluster


def test_view_changes_with_certificates_outside_the_window_are_refused() -> None:
    c = Cluster(4, ReplicaConfig(cluster_id="test-cluster", checkpoint_interval=4, window=4, batch_max_requests=4))
    wires: dict[tuple[int, int, bytes], dict[str, bytes]] = {}
    batches: dict[tuple[int, int, bytes], tuple[int, tuple]] = {}
    handle = c.handle

    def collect(node_id: str, actions: list) -> None:  # what a Byzantine member overhears
        for action in actions:
            if isinstance(action, Send):
                m = decode(action.payload)
                if m.kind in ("prepare", "pre-prepare"):
                    p = m.payload
                    wires.setdefault((p.view, p.seq, p.digest), {}).setdefault(m.signer, action.payload)
                    if m.kind == "pre-prepare":
                        batches[(p.view, p.seq, p.digest)] = (p.agreed_time_ms, p.requests)
        handle(node_id, actions)

    c.handle = collect  # type: ignore[method-assign]
    for i in range(120):
        c.submit(c.ids[1], f"r{i}", bytes(200))
        if i % 16 == 15:
            c.run(30)
    c.run(1000)
    victim = c.nodes[c.ids[1]].replica
    window = victim.config.log_size
    certs = [PreparedCert(k[0], k[1], k[2], tuple(wires[k].values())[:3])
             for k in sorted(batches, key=lambda k: k[1]) if len(wires[k]) >= 3]
    assert len(certs) > window  # genuinely signed, but far more than one window
    byzantine = c.keys[3]
    old = encode("test-cluster", byzantine.node_id, ViewChange(victim.view + 1, 0, (), tuple(certs)), byzantine.sign)
    victim.receive(byzantine.node_id, old, c.now)
    assert victim._view_changes == {} and victim.counters["invalid_view_change"] == 1
    # The same sender with certificates inside its stated window is kept.
    recent = tuple(cert for cert in certs if cert.seq <= window)
    ok = encode("test-cluster", byzantine.node_id, ViewChange(victim.view + 1, 0, (), recent), byzantine.sign)
    victim.receive(byzantine.node_id, ok, c.now)
    assert byzantine.node_id in victim._view_changes.get(victim.view + 1, {})
    # A new-view applies the same rule to the view-changes inside it (the new leader's own
    # included): the check lives in verify_view_change, which both paths call.
    assert not verify_view_change(victim.keyring, "test-cluster", decode(old).payload, window)
    assert verify_view_change(victim.keyring, "test-cluster", decode(ok).payload, window)
    # A certificate padded with copies of its genuine wires buys no signature checks.
    padded = dataclasses.replace(recent[0], prepares=recent[0].prepares * 50)
    assert verify_prepared(victim.keyring, "test-cluster", recent[0])
    assert not verify_prepared(victim.keyring, "test-cluster", padded)


def test_a_checkpoint_proof_with_more_wires_than_validators_is_refused() -> None:
    c = Cluster(4, ReplicaConfig(cluster_id="test-cluster", checkpoint_interval=4, window=4, batch_max_requests=1))
    for i in range(4):
        c.submit(c.ids[0], f"r{i}", f"r{i}".encode())
    c.run(500)
    replica = c.nodes[c.ids[1]].replica
    assert replica.stable_checkpoint_seq == 4
    proof = replica._stable.proof
    assert checkpoint_proof_digest(replica.keyring, "test-cluster", 4, proof) is not None
    assert checkpoint_proof_digest(replica.keyring, "test-cluster", 4, proof * 10) is None
