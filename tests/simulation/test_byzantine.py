"""Each Byzantine mode transforms an honest replica's output as documented, and forged
messages are validly signed (so equivocation is provable evidence)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from consensus.actions import Action, Evidence, Persist, Send
from consensus.byzantine import BYZANTINE_MODES, ByzantineReplica, wrap
from consensus.evidence import verify_evidence
from consensus.messages import (
    COMMIT, PRE_PREPARE, PREPARE, RESULT_VOTE, Commit, PrePrepare, Prepare, ResultVote, batch_digest, decode, encode,
    verify,
)
from consensus.sim.runner import sim_keyring

CID = "byz-test"
KEYS, RING = sim_keyring(4)
ME = KEYS[0]
REQUESTS = (("a", b"1"), ("b", b"2"))


@dataclass
class FakeReplica:
    """Returns whatever actions the test queued; records what it was fed."""

    queued: list[list[Action]] = field(default_factory=list)
    received: list[bytes] = field(default_factory=list)
    node_id: str = ME.node_id
    view: int = 0

    def _next(self) -> list[Action]:
        return self.queued.pop(0) if self.queued else []

    def submit(self, request_id: str, request: bytes, now_ms: int) -> list[Action]:
        return self._next()

    def receive(self, sender: str, data: bytes, now_ms: int) -> list[Action]:
        self.received.append(data)
        return self._next()

    def tick(self, now_ms: int) -> list[Action]:
        return self._next()

    def status(self) -> dict[str, object]:
        return {"view": self.view}


def _wire(body: object, key=ME) -> bytes:  # type: ignore[no-untyped-def]
    return encode(CID, key.node_id, body, key.sign)


def _pre_prepare() -> bytes:
    return _wire(PrePrepare(0, 1, 100, REQUESTS, batch_digest(100, REQUESTS)))


def _byz(mode: str, *actions: Action, **options: object) -> tuple[ByzantineReplica, list[Action]]:
    inner = FakeReplica(queued=[list(actions)])
    byz = ByzantineReplica(inner, mode, ME, RING, rng_seed=1, **options)  # type: ignore[arg-type]
    return byz, byz.tick(0)


def test_modes_are_known_and_unknown_is_refused() -> None:
    assert set(BYZANTINE_MODES) >= {"silent", "equivocate", "wrong-result", "bad-signature", "replay", "slow"}
    with pytest.raises(ValueError):
        ByzantineReplica(FakeReplica(), "polite", ME, RING)
    inner = FakeReplica()
    assert wrap(inner, None, ME, RING) is inner


def test_silent_sends_nothing_but_keeps_persisting() -> None:
    persist = Persist((("k", b"v"),))
    byz, out = _byz("silent", persist, Send(_pre_prepare()))
    assert out == [persist]
    assert byz.status()["byzantine"] == "silent" and byz.view == 0  # properties pass through


def test_equivocating_leader_sends_conflicting_signed_pre_prepares() -> None:
    _, out = _byz("equivocate", Send(_pre_prepare()))
    sends = [a for a in out if isinstance(a, Send)]
    assert sorted(s.to for s in sends) == ["n1", "n2", "n3"]  # broadcast expanded per peer
    messages = [decode(s.payload) for s in sends]
    assert all(m.kind == PRE_PREPARE and verify(m, RING, CID) for m in messages)
    digests = {m.payload.digest for m in messages}  # type: ignore[union-attr]
    assert len(digests) == 2
    for m in messages:  # each forged proposal is internally consistent
        assert m.payload.digest == batch_digest(m.payload.agreed_time_ms, m.payload.requests)  # type: ignore[union-attr]
    a, b = (next(s.payload for s in sends if decode(s.payload).payload.digest == d) for d in digests)  # type: ignore[union-attr]
    assert verify_evidence(RING, Evidence(ME.node_id, "equivocation", 1, 0, (a, b)))


@pytest.mark.parametrize("kind", [PREPARE, COMMIT])
def test_equivocating_follower_votes_two_digests(kind: str) -> None:
    digest = batch_digest(100, REQUESTS)
    body = Prepare(0, 1, digest) if kind == PREPARE else Commit(0, 1, digest)
    _, out = _byz("equivocate", Send(_wire(body)), split=frozenset({"n2"}))
    by_peer = {s.to: decode(s.payload) for s in out if isinstance(s, Send)}
    assert by_peer["n1"].payload.digest == digest and by_peer["n3"].payload.digest == digest  # type: ignore[union-attr]
    assert by_peer["n2"].payload.digest != digest and verify(by_peer["n2"], RING, CID)  # type: ignore[union-attr]


def test_equivocating_follower_backs_a_conflicting_proposal_it_saw() -> None:
    other = (("b", b"2"), ("a", b"1"))
    seen = _wire(PrePrepare(0, 1, 100, other, batch_digest(100, other)), key=KEYS[1])
    inner = FakeReplica(queued=[[], [Send(_wire(Prepare(0, 1, batch_digest(100, REQUESTS))))]])
    byz = ByzantineReplica(inner, "equivocate", ME, RING, rng_seed=1, split=frozenset({"n3"}))
    byz.receive("n1", seen, 0)
    out = byz.tick(1)
    to_n3 = next(decode(s.payload) for s in out if isinstance(s, Send) and s.to == "n3")
    assert to_n3.payload.digest == batch_digest(100, other)  # type: ignore[union-attr]


def test_wrong_result_signs_another_root() -> None:
    root = bytes(32)
    _, out = _byz("wrong-result", Send(_wire(ResultVote(3, root))))
    (send,) = out
    msg = decode(send.payload)  # type: ignore[union-attr]
    assert msg.kind == RESULT_VOTE and msg.payload.root != root and verify(msg, RING, CID)  # type: ignore[union-attr]


def test_bad_signature_corrupts_signed_messages_only() -> None:
    unsigned = encode(CID, ME.node_id, __import__("consensus.messages", fromlist=["RequestMsg"]).RequestMsg("r", b"x"))
    _, out = _byz("bad-signature", Send(_pre_prepare()), Send(unsigned, "n1"))
    signed, plain = out
    msg = decode(signed.payload)  # type: ignore[union-attr]
    assert msg.kind == PRE_PREPARE and not verify(msg, RING, CID)
    assert plain == Send(unsigned, "n1")


def test_slow_holds_messages_until_due() -> None:
    inner = FakeReplica(queued=[[Send(_pre_prepare())]])
    byz = ByzantineReplica(inner, "slow", ME, RING, slow_ms=100)
    assert byz.tick(0) == []
    assert byz.tick(99) == []
    assert byz.tick(100) == [Send(_pre_prepare())]


def test_replay_resends_old_signed_messages() -> None:
    old = _pre_prepare()
    inner = FakeReplica(queued=[[Send(old)]] + [[] for _ in range(20)])
    byz = ByzantineReplica(inner, "replay", ME, RING, rng_seed=3)
    assert Send(old) in byz.tick(0)
    replays = [a for t in range(1, 21) for a in byz.tick(t)]
    assert replays and all(isinstance(a, Send) and a.payload == old for a in replays)


def test_garble_changes_the_bytes_deterministically() -> None:
    wires = [Send(_pre_prepare(), "n1") for _ in range(8)]
    first = _byz("garble", *wires)[1]
    assert all(isinstance(a, Send) and a.payload != _pre_prepare() for a in first)
    assert first == _byz("garble", *wires)[1]  # same rng_seed, same garbage


def test_undecodable_payloads_pass_through() -> None:
    _, out = _byz("equivocate", Send(b"\xc1garbage", "n1"))
    assert out == [Send(b"\xc1garbage", "n1")]
