"""Peer messages are untrusted bytes: a mutated wire of any kind is either refused
(``DecodeError``, counted as ``malformed`` or ``bad_signature``) or handled like any
other message. It never raises out of ``Replica.receive``."""

from __future__ import annotations

import random

from consensus.codec import DecodeError
from consensus.messages import (
    _KIND_OF, BatchesReply, BodyReply, CertifiedResults, CheckpointVote, Commit, CommittedBatch, FetchBatches,
    FetchBody, FetchResults, FetchState, FetchView, NewView, PreparedCert, PrePrepare, Prepare, RequestMsg,
    ResultsReply, ResultVote, StateReply, ViewChange, batch_digest, decode, encode,
)
from tests.consensus.harness import Cluster
from tests.fuzzing import mutate

CID = "test-cluster"


def _samples(c: Cluster) -> dict[type, bytes]:
    """One well-formed, correctly signed wire per message type, as node-1 would send it."""
    key = c.keys[1]
    requests = (("r1", b"payload-1"), ("r2", b"payload-2"))
    digest = batch_digest(5, requests)
    prepare = encode(CID, "node-1", Prepare(0, 1, digest, 5, b""), key.sign)
    cert = PreparedCert(0, 1, digest, (prepare,))
    vc = encode(CID, "node-1", ViewChange(1, 0, (), (cert,)), key.sign)
    payloads = [
        PrePrepare(0, 1, 5, requests, digest), Prepare(0, 1, digest, 5, b""), Commit(0, 1, digest),
        ResultVote(1, bytes(32)), CheckpointVote(4, bytes(32)), ViewChange(1, 0, (), (cert,)),
        NewView(1, (vc, vc)), RequestMsg("r1", b"payload-1"), FetchState(4), StateReply(4, b"\x92\x90\x90", (prepare,)),
        FetchBatches(1, 4), BatchesReply((CommittedBatch(0, 1, 5, requests, (prepare,)),)), FetchBody(1, digest),
        BodyReply(1, 5, requests), FetchView(1), FetchResults(1, 2),
        ResultsReply((CertifiedResults(1, 0, (("r1", bytes(32), b"ok"),), (("node-1", b"sig"),)),)),
    ]
    return {type(p): encode(CID, "node-1", p, key.sign) for p in payloads}


def test_every_message_kind_survives_mutation() -> None:
    c = Cluster(4)
    samples = _samples(c)
    assert set(samples) == set(_KIND_OF), "add a sample for every message type"
    for wire in samples.values():
        decode(wire)  # the samples themselves are well-formed
    replica = c.nodes["node-0"].replica
    rng = random.Random(11)
    outcomes = {"refused": 0, "decoded": 0}
    for cls, wire in sorted(samples.items(), key=lambda kv: kv[0].__name__):
        for _ in range(250):
            data = mutate(rng, wire)
            try:
                decode(data)
                outcomes["decoded"] += 1
            except DecodeError:
                outcomes["refused"] += 1
            replica.receive("node-1", data, 0)  # must not raise, whatever the bytes
    # Both paths were exercised: most mutations are refused, some still parse.
    assert outcomes["refused"] > 1000 and outcomes["decoded"] > 50, outcomes
