"""Proof of stake: an accepted post-quantum scheme, amount >= minimum, and a signature
over the stake statement (which also covers the time proof and the space commitment).
Signature verification is the single most expensive step of validation."""

from __future__ import annotations

from consensus.crypto import CryptoError, signature_scheme
from consensus.proofs.binding import stake_statement
from consensus.proofs.params import ValidationParams
from consensus.proofs.reasons import Reason, reason
from consensus.requests import ProofSet


def check_stake(proofs: ProofSet, binding: tuple[str, str, bytes, bytes], params: ValidationParams) -> list[Reason]:
    stake = proofs.stake
    out: list[Reason] = []
    if stake.amount < params.min_stake:
        out.append(reason("stake.below_minimum", f"amount {stake.amount} is below the minimum {params.min_stake}"))
    if stake.scheme not in params.accepted_stake_schemes:
        accepted = ", ".join(params.accepted_stake_schemes)
        out.append(reason("stake.unsupported_scheme", f"scheme {stake.scheme!r} is not accepted (accepted: {accepted})"))
        return out
    try:
        scheme = signature_scheme(stake.scheme)
    except CryptoError:
        out.append(reason("stake.unsupported_scheme", f"scheme {stake.scheme!r} is not available in this build"))
        return out
    kind, request_id, subject, _holder = binding
    message = stake_statement(
        kind, request_id, subject, stake.scheme, stake.public_key, stake.amount, proofs.time.timestamp_ms,
        proofs.space.root, proofs.space.total_bytes, proofs.space.chunk_size,
    )
    if not scheme.verify(stake.public_key, message, stake.signature):
        out.append(reason("stake.bad_signature", f"{stake.scheme} signature over the stake statement does not verify"))
    return out
