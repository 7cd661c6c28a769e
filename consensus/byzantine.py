"""Byzantine behaviours: wrap an honest ``Replica`` and twist what it sends.

Used by the simulator and by the real node (``consensus-server --byzantine MODE``), so
the same attack is tried in one process under a seeded network and in a real cluster
over QUIC. The wrapper runs an *honest* replica inside and only transforms its output
(and, for a few modes, looks at its input): that keeps every attack small, and keeps
its messages well-formed enough that honest replicas must reason about them instead of
dropping them at decode.

Forged messages are encoded and signed with ``consensus.messages`` and the node's real
key — an equivocation must be *provable* (two validly signed, conflicting messages),
otherwise it is just a bad signature.

Modes (``BYZANTINE_MODES``):

* ``silent`` — sends nothing (crash-like, but it keeps receiving and answering clients).
* ``equivocate`` — as leader sends one pre-prepare to half of the peers and a conflicting
  one to the other half; prepares and commits go out with the honest digest to one half
  and a conflicting digest to the other (a digest seen in a conflicting pre-prepare when
  there is one, so colluding equivocators back both sides). All properly signed.
* ``wrong-result`` — result votes signed over a wrong Merkle root.
* ``bad-signature`` — every signed message goes out with a corrupted signature.
* ``replay`` — also re-sends old signed messages (its own and other nodes'), so peers
  see stale views, old sequence numbers and duplicates.
* ``slow`` — holds every outgoing message for ``slow_ms`` before sending (released by
  any later call, typically ``tick``).
* ``garble`` — mutates outgoing bytes at random (flipped bytes, truncation, junk
  appended): every decoder on the receiving side must stay bounded and never raise, and
  no corrupted vote, proof, state or batch may be accepted. Forwarded client requests
  are left alone: they are unauthenticated client input by design (a Byzantine node can
  submit any request as a client), so mutating them tests nothing about the protocol.
"""

from __future__ import annotations

import hashlib
import random
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Iterable

from consensus.actions import Action, Send
from consensus.codec import DecodeError, canonical_pack
from consensus.keys import KeyRing, NodeKey
from consensus.messages import (
    COMMIT, MAGIC, PRE_PREPARE, PREPARE, REQUEST, RESULT_VOTE, SIGNED_KINDS, Commit, Message, PrePrepare, Prepare,
    ResultVote, batch_digest, decode, encode,
)

BYZANTINE_MODES: tuple[str, ...] = ("silent", "equivocate", "wrong-result", "bad-signature", "replay", "slow", "garble")

DEFAULT_SLOW_MS = 300
REPLAY_ARCHIVE = 256  # old messages kept to replay; bounded so a long run stays small
REPLAY_PER_CALL = 2
MAX_SLOTS_REMEMBERED = 1024  # per-slot memory of a long-running Byzantine node stays bounded


@dataclass(slots=True)
class _Held:
    due_ms: int
    send: Send


@dataclass(slots=True)
class ByzantineReplica:
    """Same ``submit``/``receive``/``tick`` API and properties as ``Replica``.

    ``split`` optionally fixes which peers form the "other half" for equivocation; by
    default it is drawn from ``rng_seed``. ``collusion`` is a dict shared by colluding
    equivocators (the simulator's f+1 attack; real attackers could share it out of
    band): the leader publishes ``(view, seq) -> (digest for the first half, digest for
    the split half)`` and the others vote along it, so both halves can reach a quorum.
    """

    replica: Any
    mode: str
    key: NodeKey
    keyring: KeyRing
    rng_seed: int = 0
    split: frozenset[str] | None = None
    slow_ms: int = DEFAULT_SLOW_MS
    collusion: dict[tuple[int, int], tuple[bytes, bytes]] | None = None
    rng: random.Random = field(init=False)
    forged: int = field(default=0, init=False)
    _other_half: frozenset[str] = field(init=False)
    _peers: tuple[str, ...] = field(init=False)
    _seen_digests: dict[tuple[int, int], list[bytes]] = field(default_factory=dict, init=False)
    _forged_digest: dict[tuple[int, int], bytes] = field(default_factory=dict, init=False)
    _archive: deque[bytes] = field(default_factory=lambda: deque(maxlen=REPLAY_ARCHIVE), init=False)
    _held: deque[_Held] = field(default_factory=deque, init=False)

    def __post_init__(self) -> None:
        if self.mode not in BYZANTINE_MODES:
            raise ValueError(f"unknown Byzantine mode {self.mode!r}; known: {', '.join(BYZANTINE_MODES)}")
        self.rng = random.Random(self.rng_seed)  # own instance: never the global RNG
        self._peers = tuple(n for n in self.keyring.node_ids if n != self.key.node_id)
        if self.split is not None:
            self._other_half = frozenset(self.split) & frozenset(self._peers)
        else:
            shuffled = list(self._peers)
            self.rng.shuffle(shuffled)
            self._other_half = frozenset(shuffled[: len(shuffled) // 2])

    # ------------------------------------------------------------------ replica API

    def submit(self, request_id: str, request: bytes, now_ms: int) -> list[Action]:
        return self._outgoing(self.replica.submit(request_id, request, now_ms), now_ms)

    def receive(self, sender: str, data: bytes, now_ms: int) -> list[Action]:
        if self.mode in ("equivocate", "replay"):
            self._observe(data)
        return self._outgoing(self.replica.receive(sender, data, now_ms), now_ms)

    def tick(self, now_ms: int) -> list[Action]:
        return self._outgoing(self.replica.tick(now_ms), now_ms)

    def propose(self, now_ms: int) -> list[Action]:
        return self._outgoing(self.replica.propose(now_ms), now_ms)

    @property
    def node_id(self) -> str:
        return self.replica.node_id

    @property
    def view(self) -> int:
        return self.replica.view

    @property
    def leader(self) -> str:
        return self.replica.leader

    @property
    def last_executed_seq(self) -> int:
        return self.replica.last_executed_seq

    @property
    def stable_checkpoint_seq(self) -> int:
        return self.replica.stable_checkpoint_seq

    @property
    def is_leader(self) -> bool:
        return self.replica.is_leader

    def status(self) -> dict[str, Any]:
        status = dict(self.replica.status())
        status["byzantine"] = self.mode
        return status

    def __getattr__(self, name: str) -> Any:
        # Anything else the node or a test reads (metrics, config) comes from the
        # honest replica inside. Only reached for names the dataclass does not have.
        if name == "replica":  # not set yet (copy/pickle): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.replica, name)

    # ------------------------------------------------------------------ transforms

    def _outgoing(self, actions: list[Action], now_ms: int) -> list[Action]:
        out: list[Action] = []
        if self.mode == "slow":
            out.extend(self._release(now_ms))
        for action in actions:
            if not isinstance(action, Send):
                out.append(action)  # Persist, Final, ... stay honest and in order
                continue
            out.extend(self._transform(action, now_ms))
        if self.mode == "replay":
            out.extend(self._replays())
        return out

    def _transform(self, send: Send, now_ms: int) -> Iterable[Send]:
        mode = self.mode
        if mode == "silent":
            return ()
        if mode == "slow":
            self._held.append(_Held(now_ms + self.slow_ms, send))
            return ()
        msg = self._decode(send.payload)
        if mode == "garble":
            if msg is not None and msg.kind == REQUEST:
                return (send,)
            return (replace(send, payload=self._garble(send.payload)),)
        if msg is None:
            return (send,)
        if mode == "replay":
            if msg.kind in SIGNED_KINDS:
                self._archive.append(send.payload)
            return (send,)
        if mode == "bad-signature":
            if msg.kind not in SIGNED_KINDS:
                return (send,)
            return (replace(send, payload=_with_signature(msg, _corrupt(msg.signature))),)
        if mode == "wrong-result":
            if msg.kind != RESULT_VOTE:
                return (send,)
            vote: ResultVote = msg.payload  # type: ignore[assignment]
            wrong = hashlib.sha256(b"hypermesh-byzantine-wrong-root" + vote.root).digest()
            self.forged += 1
            return (replace(send, payload=self._sign(msg, ResultVote(vote.seq, wrong))),)
        return self._equivocate(send, msg)

    def _equivocate(self, send: Send, msg: Message) -> list[Send]:
        if msg.kind not in (PRE_PREPARE, PREPARE, COMMIT):
            return [send]
        payload = msg.payload
        slot = (payload.view, payload.seq)  # type: ignore[union-attr]
        targets = self._peers if send.to is None else (send.to,)
        if msg.kind == PRE_PREPARE:
            conflicting = self._conflicting_pre_prepare(payload)  # type: ignore[arg-type]
            _remember(self._forged_digest, slot, conflicting.digest)
            if self.collusion is not None:
                _remember(self.collusion, slot, (payload.digest, conflicting.digest))  # type: ignore[union-attr]
            other = self._sign(msg, conflicting)
        elif self.collusion is not None and slot in self.collusion:
            return self._colluding_votes(send, msg, slot, targets)
        else:
            alternative = self._alternative_digest(slot, payload.digest)  # type: ignore[union-attr]
            body = Prepare(slot[0], slot[1], alternative) if msg.kind == PREPARE else Commit(slot[0], slot[1], alternative)
            other = self._sign(msg, body)
        self.forged += 1
        return [Send(other if peer in self._other_half else send.payload, peer) for peer in targets]

    def _colluding_votes(self, send: Send, msg: Message, slot: tuple[int, int], targets: Iterable[str]) -> list[Send]:
        """Vote for the leader's first-half digest to the first half and for its forged
        digest to the split half, whatever this replica itself accepted."""
        wires: dict[bytes, bytes] = {msg.payload.digest: send.payload}  # type: ignore[union-attr]
        out = []
        for peer in targets:
            digest = self.collusion[slot][1 if peer in self._other_half else 0]  # type: ignore[index]
            if digest not in wires:
                body = Prepare(slot[0], slot[1], digest) if msg.kind == PREPARE else Commit(slot[0], slot[1], digest)
                wires[digest] = self._sign(msg, body)
                self.forged += 1
            out.append(Send(wires[digest], peer))
        return out

    def _conflicting_pre_prepare(self, pp: PrePrepare) -> PrePrepare:
        """Same requests (so the forgery is valid input, not an invented request), in
        another order when possible, else one millisecond later: a different digest."""
        if len(pp.requests) >= 2:
            requests = tuple(reversed(pp.requests))
            when = pp.agreed_time_ms
        else:
            requests = pp.requests
            when = pp.agreed_time_ms + 1
        return PrePrepare(pp.view, pp.seq, when, requests, batch_digest(when, requests))

    def _alternative_digest(self, slot: tuple[int, int], honest: bytes) -> bytes:
        forged = self._forged_digest.get(slot)
        if forged is not None and forged != honest:
            return forged
        for digest in self._seen_digests.get(slot, ()):
            if digest != honest:
                return digest  # back the other side of a split (colluding with a leader/twin)
        return hashlib.sha256(b"hypermesh-byzantine-equivocation" + honest).digest()

    def _observe(self, data: bytes) -> None:
        msg = self._decode(data)
        if msg is None or msg.kind not in SIGNED_KINDS:
            return
        if self.mode == "replay":
            self._archive.append(data)
            return
        if msg.kind == PRE_PREPARE and msg.signer != self.key.node_id:
            pp: PrePrepare = msg.payload  # type: ignore[assignment]
            seen = self._seen_digests.get((pp.view, pp.seq))
            if seen is None:
                seen = []
                _remember(self._seen_digests, (pp.view, pp.seq), seen)
            if pp.digest not in seen and len(seen) < 4:
                seen.append(pp.digest)

    def _replays(self) -> list[Send]:
        if not self._archive:
            return []
        out = []
        for _ in range(REPLAY_PER_CALL):
            if self.rng.random() < 0.5:
                old = self._archive[self.rng.randrange(len(self._archive))]
                peer = self.rng.choice(self._peers) if self._peers else None
                out.append(Send(old, peer))
        return out

    def _garble(self, data: bytes) -> bytes:
        choice = self.rng.randrange(4)
        if choice == 0 or not data:
            return data + self.rng.randbytes(self.rng.randint(1, 16))
        if choice == 1:
            return data[: self.rng.randrange(len(data))]
        mutated = bytearray(data)
        for _ in range(self.rng.randint(1, 4)):
            mutated[self.rng.randrange(len(mutated))] = self.rng.randrange(256)
        return bytes(mutated)

    def _release(self, now_ms: int) -> list[Send]:
        out = []
        while self._held and self._held[0].due_ms <= now_ms:
            out.append(self._held.popleft().send)
        return out

    # ------------------------------------------------------------------ encoding

    def _decode(self, data: bytes) -> Message | None:
        try:
            return decode(data)
        except (DecodeError, ValueError, TypeError):
            return None

    def _sign(self, msg: Message, body: Any) -> bytes:
        return encode(msg.cluster_id, self.key.node_id, body, self.key.sign)


def _remember(table: dict[Any, Any], key: Any, value: Any) -> None:
    """Insert, dropping the oldest entry beyond ``MAX_SLOTS_REMEMBERED``."""
    table[key] = value
    if len(table) > MAX_SLOTS_REMEMBERED:
        table.pop(next(iter(table)))


def _corrupt(signature: bytes) -> bytes:
    if not signature:
        return b"\x00" * 64
    return bytes([signature[0] ^ 0x01]) + signature[1:]


def _with_signature(msg: Message, signature: bytes) -> bytes:
    """The same message with another signature, through the one canonical encoder."""
    return canonical_pack([MAGIC, msg.kind, msg.cluster_id, msg.signer, msg.payload.body(), signature])


def wrap(replica: Any, mode: str | None, key: NodeKey, keyring: KeyRing, rng_seed: int = 0, **options: Any) -> Any:
    """``replica`` itself for ``mode=None``, else the Byzantine wrapper (what the node calls)."""
    if mode is None:
        return replica
    return ByzantineReplica(replica, mode, key, keyring, rng_seed, **options)


__all__ = ["BYZANTINE_MODES", "ByzantineReplica", "wrap"]
