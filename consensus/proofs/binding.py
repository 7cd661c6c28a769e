"""Every byte string that the four proofs hash, sign or encrypt, in one place.

Prover and verifier both call these, so the layouts documented in docs/PROOFS.md
cannot drift between them. Each layout is ``canonical_pack`` of a fixed-order array
whose first element is a versioned domain tag (no value can be reinterpreted as
another proof's input).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from consensus.codec import canonical_pack

if TYPE_CHECKING:
    from consensus.requests import ValidationRequest

AEAD_NONCE = bytes(12)  # the AES key is fresh per KEM encapsulation, so a fixed nonce is safe


def _h(parts: list[Any]) -> bytes:
    return hashlib.sha256(canonical_pack(parts)).digest()


def holder_id(scheme: str, public_key: bytes) -> bytes:
    """The holder *is* its stake key: time heads are kept per holder id, and only the
    key's owner can sign a time proof, so nobody can advance another holder's chain."""
    return _h(["hypermesh/holder/v1", scheme, public_key])


def subject_digest(kind: str, subject: list[Any]) -> bytes:
    """[] for a proof set; [common_name, san_entries, validity_days, csr_der] for a certificate."""
    return _h(["hypermesh/subject/v1", kind, subject])


def request_binding(request: ValidationRequest) -> tuple[str, str, bytes, bytes]:
    """(kind, request_id, subject digest, holder id) — what every proof is bound to."""
    stake = request.proofs.stake
    return (
        request.kind,
        request.request_id,
        subject_digest(request.kind, request.subject()),
        holder_id(stake.scheme, stake.public_key),
    )


def work_challenge(kind: str, request_id: str, subject: bytes, holder: bytes) -> bytes:
    return _h(["hypermesh/work/v1", kind, request_id, subject, holder])


def work_hash(challenge: bytes, nonce: bytes) -> bytes:
    return hashlib.sha256(challenge + nonce).digest()


def leading_zero_bits(value: bytes) -> int:
    as_int = int.from_bytes(value, "big")
    return len(value) * 8 - as_int.bit_length()


def stake_statement(
    kind: str,
    request_id: str,
    subject: bytes,
    scheme: str,
    public_key: bytes,
    amount: int,
    timestamp_ms: int,
    space_root: bytes,
    total_bytes: int,
    chunk_size: int,
) -> bytes:
    """The one message the holder signs. It covers the stake, the *time proof* and the
    storage commitment, so a single signature verification (the dominant cost) serves
    stake and time. The work nonce and the sealed space answers are not signed: each
    is bound to the request by its own derivation (challenge / AEAD associated data)."""
    return canonical_pack(
        ["hypermesh/stake/v1", kind, request_id, subject, scheme, public_key, amount, timestamp_ms,
         space_root, total_bytes, chunk_size]
    )


def space_challenges(request_id: str, holder: bytes, root: bytes, leaves: int, count: int) -> list[int]:
    """Chunk indices the prover must answer. seed = SHA-256(canonical binding); index i =
    first 8 bytes of SHA-256(seed || u32be(i)), big-endian, mod the leaf count (bias
    below 2^-23 for any allowed tree). Duplicates are allowed."""
    seed = _h(["hypermesh/space/v1/challenge", request_id, holder, root, leaves])
    return [
        int.from_bytes(hashlib.sha256(seed + i.to_bytes(4, "big")).digest()[:8], "big") % leaves
        for i in range(count)
    ]


def space_key(shared_secret: bytes, request_id: str, holder: bytes, root: bytes) -> bytes:
    """AES-256 key = HKDF-SHA256(ikm = ML-KEM shared secret, salt = none, info = binding)."""
    info = canonical_pack(["hypermesh/space/v1/seal", request_id, holder, root])
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared_secret)


def space_aad(request_id: str, holder: bytes, root: bytes, total_bytes: int, chunk_size: int) -> bytes:
    return canonical_pack(["hypermesh/space/v1/aad", request_id, holder, root, total_bytes, chunk_size])


def space_plaintext(answers: list[tuple[int, bytes, list[bytes]]]) -> bytes:
    """[[index, chunk, siblings], ...] in challenge order; ``siblings`` is the inclusion
    path (leaf to root) as one byte string of 32-byte hashes (flat: cheap to decode)."""
    return canonical_pack([[index, chunk, b"".join(path)] for index, chunk, path in answers])
