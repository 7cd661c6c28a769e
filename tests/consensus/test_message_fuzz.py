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


def _frame(kind: str, body: bytes) -> bytes:
    import msgpack
    return b"\x96" + msgpack.packb("hm/1") + msgpack.packb(kind) + msgpack.packb(CID) + msgpack.packb("node-1") + body + b"\xc4\x00"


def test_a_frame_of_nested_empty_containers_is_refused_by_its_element_count() -> None:
    """Bytes alone allow one container per byte: 60 MiB of nested empty arrays took 30 s
    and 4.4 GB to decode. The decoder now stops once all containers together hold more
    elements than any honest message can."""
    from consensus.messages import MAX_MESSAGE_ELEMENTS
    inner = b"\xdc\x10\x00" + b"\x90" * 4096  # an array of 4096 empty arrays
    count = MAX_MESSAGE_ELEMENTS // 4096 + 2
    body = b"\xdc" + count.to_bytes(2, "big") + inner * count
    try:
        decode(_frame("state", body))
    except DecodeError as exc:
        assert "too many elements" in str(exc), exc
    else:
        raise AssertionError("a frame of nested empty arrays decoded")


def test_the_largest_honest_reply_fits_the_element_budget() -> None:
    """A results reply stops adding batches past MAX_REPLY_ENTRIES, so it holds at most one
    more full batch: that must still decode (and is its own encoding)."""
    from consensus.messages import MAX_BATCH_REQUESTS, MAX_REPLY_ENTRIES
    c = Cluster(4)
    batches = (MAX_REPLY_ENTRIES + MAX_BATCH_REQUESTS) // MAX_BATCH_REQUESTS
    reply = ResultsReply(tuple(
        CertifiedResults(s + 1, 0, tuple((f"r{s}-{i}", bytes(32), b"") for i in range(MAX_BATCH_REQUESTS)),
                         tuple((f"node-{k}", b"s") for k in range(4)))
        for s in range(batches)))
    wire = encode(CID, "node-1", reply, c.keys[1].sign)
    assert len(decode(wire).payload.batches) == batches  # type: ignore[attr-defined]
