"""Proof of work: SHA-256(challenge || nonce) has enough leading zero bits, where the
challenge is derived from the request and holder (so work cannot be reused)."""

from __future__ import annotations

from consensus.proofs.binding import leading_zero_bits, work_challenge, work_hash
from consensus.proofs.params import ValidationParams
from consensus.proofs.reasons import Reason, reason
from consensus.requests import WorkProof


def check_work(proof: WorkProof, binding: tuple[str, str, bytes, bytes], params: ValidationParams) -> list[Reason]:
    expected = work_challenge(*binding)
    if proof.challenge != expected:
        return [reason("work.challenge_mismatch", "proofs.work.challenge is not the challenge derived from this request and holder")]
    needed = max(proof.difficulty_bits, params.work_difficulty_bits)
    got = leading_zero_bits(work_hash(expected, proof.nonce))
    if got < needed:
        return [reason("work.difficulty_not_met", f"hash has {got} leading zero bits, {needed} required")]
    return []
