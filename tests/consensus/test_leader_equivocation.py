"""A leader that sends conflicting, properly signed pre-prepares to different replicas.

Each honest replica sees only one of the pre-prepares; the evidence comes from the
prepares, which carry the leader's signature over the header they prepare."""

from __future__ import annotations

import dataclasses

from consensus.actions import Evidence
from consensus.byzantine import ByzantineReplica
from consensus.codec import canonical_pack
from consensus.evidence import verify_evidence
from consensus.messages import (
    MAGIC, PRE_PREPARE, PREPARE, PrePrepare, Prepare, batch_digest, decode, encode, preprepare_header_bytes,
    preprepare_header_wire, verify,
)
from tests.consensus.harness import Cluster

CID = "test-cluster"
A_REQS = (("a", b"A"),)
B_REQS = (("b", b"B"),)


def _pp(c: Cluster, reqs: tuple[tuple[str, bytes], ...], view: int = 0, seq: int = 1, t: int = 5) -> bytes:
    return encode(CID, c.ids[view % 4], PrePrepare(view, seq, t, reqs, batch_digest(t, reqs)), c.keys[view % 4].sign)


def _evidence(c: Cluster, node: str) -> list[Evidence]:
    return c.nodes[node].of(Evidence)


def test_equivocating_leader_is_caught_by_honest_replicas_that_each_saw_one_pre_prepare() -> None:
    c = Cluster()
    leader = c.nodes["node-0"]
    leader.replica = ByzantineReplica(leader.replica, "equivocate", c.keys[0], c.keyring, split=frozenset({"node-3"}))
    seen: dict[str, set[bytes]] = {}

    def spy(src: str, dst: str, data: bytes) -> bool:
        m = decode(data)
        if m.kind == PRE_PREPARE:
            seen.setdefault(dst, set()).add(m.payload.digest)  # type: ignore[union-attr]
        return False

    c.drop = spy
    for i in range(3):
        c.submit("node-0", f"r{i}", b"payload-%d" % i)
    c.run(200)
    # every honest replica received exactly one version of each proposal ...
    assert all(len(d) == 1 for d in seen.values()) and set(seen) == {"node-1", "node-2", "node-3"}
    assert seen["node-3"] != seen["node-1"] == seen["node-2"]
    # ... and still every one of them holds transferable evidence against the leader
    for node in ("node-1", "node-2", "node-3"):
        ev = [e for e in _evidence(c, node) if e.accused == "node-0" and e.kind == "equivocation"]
        assert ev, node
        assert all(verify_evidence(c.keyring, e) for e in ev)
        assert c.nodes[node].replica.status()["penalties"]["node-0"] >= 1
        # compact: two headers, not two batches
        for e in ev:
            a, b = (decode(m) for m in e.messages)
            assert a.kind == b.kind == PRE_PREPARE and a.payload.requests == b.payload.requests == ()  # type: ignore[union-attr]
            assert a.payload.digest != b.payload.digest  # type: ignore[union-attr]
    # nobody accuses an honest replica
    for node in c.ids:
        assert all(e.accused == "node-0" for e in _evidence(c, node))


def _replica_with_evidence(c: Cluster, prepare_first: bool) -> Evidence:
    """node-1 accepts pre-prepare A; node-3 (which got B) prepares B with the leader's header."""
    pp_a, pp_b = _pp(c, A_REQS), _pp(c, B_REQS)
    b = decode(pp_b)
    prep_b = encode(CID, "node-3", Prepare(0, 1, b.payload.digest, 5, b.signature), c.keys[3].sign)  # type: ignore[union-attr]
    r1 = c.nodes["node-1"].replica
    if prepare_first:
        out = r1.receive("node-3", prep_b, 5) + r1.receive("node-0", pp_a, 5)
    else:
        out = r1.receive("node-0", pp_a, 5) + r1.receive("node-3", prep_b, 5)
    ev = [a for a in out if isinstance(a, Evidence)]
    assert len(ev) == 1 and ev[0].accused == "node-0" and (ev[0].seq, ev[0].view) == (1, 0)
    return ev[0]


def test_prepare_carrying_another_leader_header_is_evidence_in_either_order() -> None:
    for prepare_first in (False, True):
        c = Cluster()
        ev = _replica_with_evidence(c, prepare_first)
        assert verify_evidence(c.keyring, ev)


def test_own_prepare_carries_the_leader_header_signature() -> None:
    c = Cluster()
    pp_a = _pp(c, A_REQS)
    out = c.nodes["node-1"].replica.receive("node-0", pp_a, 5)
    prepares = [decode(a.payload) for a in out if hasattr(a, "payload") and decode(a.payload).kind == PREPARE]
    assert len(prepares) == 1
    p = prepares[0].payload
    assert isinstance(p, Prepare) and p.agreed_time_ms == 5 and p.leader_signature == decode(pp_a).signature
    assert c.keyring.verify("node-0", preprepare_header_bytes(CID, 0, 1, 5, p.digest), p.leader_signature)


def test_pre_prepare_signature_covers_the_header_only() -> None:
    c = Cluster()
    m = decode(_pp(c, A_REQS))
    assert m.signed_bytes() == preprepare_header_bytes(CID, 0, 1, 5, batch_digest(5, A_REQS))
    # the stripped header is itself a validly signed message ...
    header = decode(preprepare_header_wire(CID, "node-0", 0, 1, 5, m.payload.digest, m.signature))  # type: ignore[union-attr]
    assert verify(header, c.keyring, CID)
    # ... but never a proposal: its (empty) requests do not match the digest
    r1 = c.nodes["node-1"].replica
    r1.receive("node-0", header.raw, 5)
    assert r1.status()["counters"]["bad_digest"] == 1
    # requests swapped under a valid header signature: rejected by the digest check
    forged = canonical_pack([MAGIC, PRE_PREPARE, CID, "node-0", [0, 1, 5, [list(r) for r in B_REQS], m.payload.digest], m.signature])  # type: ignore[union-attr]
    r1.receive("node-0", forged, 5)
    assert r1.status()["counters"]["bad_digest"] == 2


def test_tampered_or_mismatched_leader_headers_are_rejected() -> None:
    c = Cluster()
    ev = _replica_with_evidence(c, prepare_first=False)
    assert verify_evidence(c.keyring, ev)
    a, b = ev.messages
    mb = decode(b)
    pb = mb.payload
    sig = mb.signature

    def header(view: int = 0, seq: int = 1, t: int = 5, digest: bytes = pb.digest, s: bytes = sig, who: str = "node-0") -> bytes:  # type: ignore[union-attr]
        return preprepare_header_wire(CID, who, view, seq, t, digest, s)

    bad = [
        header(t=6),  # agreed time changed under the signature
        header(digest=bytes(32)),  # digest changed
        header(s=sig[:-1] + bytes([sig[-1] ^ 1])),  # signature flipped
        header(who="node-1"),  # attributed to someone else
        header(seq=2),  # another slot: not a conflict (and not signed)
    ]
    for tampered in bad:
        assert not verify_evidence(c.keyring, dataclasses.replace(ev, messages=(a, tampered)))
    # a validly signed header for another slot is not a conflict either
    other_slot = decode(_pp(c, B_REQS, seq=2))
    assert not verify_evidence(c.keyring, dataclasses.replace(ev, messages=(a, header(seq=2, s=other_slot.signature))))
    assert not verify_evidence(c.keyring, dataclasses.replace(ev, messages=(a, a)))  # same digest
    assert not verify_evidence(c.keyring, dataclasses.replace(ev, accused="node-1"))
    assert not verify_evidence(c.keyring, dataclasses.replace(ev, view=1))
    assert not verify_evidence(c.keyring, dataclasses.replace(ev, seq=2))
    # a non-leader's two signed "headers" for view 0 are not leader equivocation
    n1 = [encode(CID, "node-1", PrePrepare(0, 1, 5, r, batch_digest(5, r)), c.keys[1].sign) for r in (A_REQS, B_REQS)]
    assert not verify_evidence(c.keyring, Evidence("node-1", "equivocation", 1, 0, tuple(n1)))


def test_bad_leader_signature_in_a_prepare_is_not_evidence() -> None:
    c = Cluster()
    pp_a, pp_b = _pp(c, A_REQS), _pp(c, B_REQS)
    b = decode(pp_b)
    wrong = b.signature[:-1] + bytes([b.signature[-1] ^ 1])
    prep_b = encode(CID, "node-3", Prepare(0, 1, b.payload.digest, 5, wrong), c.keys[3].sign)  # type: ignore[union-attr]
    r1 = c.nodes["node-1"].replica
    out = r1.receive("node-0", pp_a, 5) + r1.receive("node-3", prep_b, 5)
    assert not any(isinstance(a, Evidence) for a in out)
    assert r1.status()["counters"]["bad_leader_signature"] == 1
    assert r1.status()["penalties"]["node-0"] == 0
