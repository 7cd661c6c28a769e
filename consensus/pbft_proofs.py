"""Checks of forwarded quorum proofs: checkpoint, prepared and committed certificates,
view-changes, and the deterministic re-proposal set of a new view.

Pure functions of (key ring, cluster id, wire bytes), so every replica — and the
simulator's invariant checkers — reach the same verdict on the same proof.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from consensus.keys import KeyRing
from consensus.messages import (
    CHECKPOINT, COMMIT, PRE_PREPARE, PREPARE, CommittedBatch, PreparedCert, ViewChange, batch_digest, decode, decode_verified,
)


def checkpoint_proof_digest(keyring: KeyRing, cluster_id: str, seq: int, wires: tuple[bytes, ...]) -> bytes | None:
    """The state digest that 2f+1 distinct validators signed for ``seq``, or None."""
    if len(wires) > keyring.n:
        return None  # honest proofs hold one wire per signer: more only buys signature checks
    votes: dict[bytes, set[str]] = {}
    for wire in wires:
        msg = decode_verified(wire, keyring, cluster_id, CHECKPOINT)
        if msg is None or msg.payload.seq != seq:  # type: ignore[union-attr]
            return None
        votes.setdefault(msg.payload.state_digest, set()).add(msg.signer)  # type: ignore[union-attr]
    for value in sorted(votes):
        if len(votes[value]) >= keyring.quorum:
            return value
    return None


def _quorum_of(keyring: KeyRing, cluster_id: str, kinds: tuple[str, ...], view: int, seq: int, digest: bytes,
               wires: tuple[bytes, ...]) -> bool:
    if len(wires) > keyring.n:
        return False  # honest certificates hold one wire per signer: more only buys signature checks
    signers: set[str] = set()
    for wire in wires:
        msg = decode_verified(wire, keyring, cluster_id, None)
        if msg is None or msg.kind not in kinds:
            return False
        p = msg.payload
        if (p.view, p.seq, p.digest) != (view, seq, digest):  # type: ignore[union-attr]
            return False
        signers.add(msg.signer)
    return len(signers) >= keyring.quorum


def verify_prepared(keyring: KeyRing, cluster_id: str, cert: PreparedCert) -> bool:
    """2f+1 distinct validators endorsed the batch at (view, seq). A view's leader signs
    no prepare: its signed pre-prepare header (requests stripped) stands for it. Counting
    any validator's signed pre-prepare as its prepare is safe: an honest validator signs
    at most one of the two for a slot, and a faulty one could sign a prepare anyway."""
    return _quorum_of(keyring, cluster_id, (PREPARE, PRE_PREPARE), cert.view, cert.seq, cert.digest, cert.prepares)


def verify_committed(keyring: KeyRing, cluster_id: str, batch: CommittedBatch) -> bool:
    """2f+1 distinct validators committed the batch at (view, seq). With a single
    validator (n = 1, quorum 1) a signed pre-prepare or prepare is the commit: it signs
    no separate commit message. (Its own pre-prepares are unsigned, since no peer reads
    them: this check is for certificates from peers, and a lone validator has none.)"""
    digest = batch_digest(batch.agreed_time_ms, batch.requests)
    kinds = (COMMIT, PREPARE, PRE_PREPARE) if keyring.n == 1 else (COMMIT,)
    return _quorum_of(keyring, cluster_id, kinds, batch.view, batch.seq, digest, batch.commits)


def verify_view_change(keyring: KeyRing, cluster_id: str, vc: ViewChange, log_size: int) -> bool:
    """Every claim in a view-change is backed by signatures of others, and it carries at
    most one certificate per seq of its sender's window ``(stable_seq, stable_seq +
    log_size]``: an honest replica holds no others, and old (genuinely signed) ones would
    only make every receiver hold and re-verify them. Shape first, signatures last."""
    seqs = {cert.seq for cert in vc.prepared}
    if len(seqs) != len(vc.prepared) or any(not vc.stable_seq < s <= vc.stable_seq + log_size for s in seqs):
        return False
    if any(cert.view >= vc.new_view for cert in vc.prepared):
        return False
    if vc.stable_seq > 0:
        if checkpoint_proof_digest(keyring, cluster_id, vc.stable_seq, vc.checkpoint_proof) is None:
            return False
    elif vc.checkpoint_proof:
        return False
    return all(verify_prepared(keyring, cluster_id, cert) for cert in vc.prepared)


# The empty "null" batch a new view puts where nothing was prepared: everyone holds it.
NULL_BATCH_DIGEST = batch_digest(0, ())


@dataclass(frozen=True, slots=True)
class Reproposal:
    """One batch a new view re-proposes, by digest, and who signed its certificate:
    the validators that are sure to hold its body (NULL_BATCH_DIGEST: no one needs to)."""

    seq: int
    digest: bytes
    holders: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class NewViewPlan:
    """What a new view starts from: the highest proven stable checkpoint and, for every
    seq above it up to the highest prepared one, the batch to re-propose (the one
    prepared in the highest view, or an empty "null" batch)."""

    stable_seq: int
    stable_digest: bytes | None
    checkpoint_proof: tuple[bytes, ...]
    batches: tuple[Reproposal, ...]

    @property
    def top(self) -> int:
        return self.batches[-1].seq if self.batches else self.stable_seq


def plan_new_view(keyring: KeyRing, cluster_id: str, vcs: list[ViewChange]) -> NewViewPlan:
    stable_seq, proof, stable_digest = 0, (), None
    for vc in vcs:
        if vc.stable_seq > stable_seq:
            stable_seq, proof = vc.stable_seq, vc.checkpoint_proof
    if stable_seq:
        stable_digest = checkpoint_proof_digest(keyring, cluster_id, stable_seq, proof)
    best: dict[int, PreparedCert] = {}
    for vc in vcs:
        for cert in vc.prepared:
            if cert.seq <= stable_seq:
                continue
            held = best.get(cert.seq)
            if held is None or cert.view > held.view:
                best[cert.seq] = cert
    top = max(best, default=stable_seq)
    batches = []
    for seq in range(stable_seq + 1, top + 1):
        cert = best.get(seq)
        if cert is None:
            batches.append(Reproposal(seq, NULL_BATCH_DIGEST, ()))
        else:
            batches.append(Reproposal(seq, cert.digest, _signers(cert.prepares)))
    return NewViewPlan(stable_seq, stable_digest, tuple(proof), tuple(batches))


def _signers(wires: tuple[bytes, ...]) -> tuple[str, ...]:
    """Signers of already verified vote wires, in order, each once."""
    return tuple(dict.fromkeys(decode(w).signer for w in wires))


def snapshot_digest(blob: bytes) -> bytes:
    """A checkpoint's state digest: SHA-256 of canonical_pack([app_snapshot, bookkeeping])."""
    return hashlib.sha256(blob).digest()
