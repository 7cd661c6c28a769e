"""Proof of space: a Merkle commitment over fixed-size chunks, and answers (chunk +
RFC 9162 inclusion path) to challenges derived from (request, holder, root), sealed to
the cluster's ML-KEM-1024 key: KEM -> HKDF-SHA256 -> AES-256-GCM.

Sealing keeps the sampled chunks confidential between holder and cluster and proves the
answers were made for this cluster (a sealed box only opens with its private key).
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from consensus.codec import DecodeError, unpack_bounded
from consensus.crypto import CryptoError, kem_scheme
from consensus.merkle import verify_inclusion
from consensus.proofs.binding import AEAD_NONCE, space_aad, space_challenges, space_key, space_plaintext
from consensus.proofs.params import ValidationParams
from consensus.proofs.reasons import Reason, reason
from consensus.requests import SpaceProof

MAX_LEAVES = 1 << 40


def commitment_problem(proof: SpaceProof, params: ValidationParams) -> str | None:
    """Why (root, total_bytes, chunk_size) cannot be a commitment, or None."""
    size = proof.chunk_size
    if size & (size - 1) or not params.min_chunk_size <= size <= params.max_chunk_size:
        return f"chunk_size {size} must be a power of two in {params.min_chunk_size}..{params.max_chunk_size}"
    if proof.total_bytes % size:
        return f"total_bytes {proof.total_bytes} is not a multiple of chunk_size {size}"
    if proof.total_bytes // size > MAX_LEAVES:
        return f"more than {MAX_LEAVES} chunks"
    return None


def seal_answers(
    kem_public_key: bytes, request_id: str, holder: bytes, proof_root: bytes, total_bytes: int, chunk_size: int,
    answers: list[tuple[int, bytes, list[bytes]]],
) -> tuple[bytes, bytes]:
    """Prover side: (kem_ciphertext, sealed)."""
    ciphertext, shared = kem_scheme("ML-KEM-1024").encapsulate(kem_public_key)
    key = space_key(shared, request_id, holder, proof_root)
    aad = space_aad(request_id, holder, proof_root, total_bytes, chunk_size)
    return ciphertext, AESGCM(key).encrypt(AEAD_NONCE, space_plaintext(answers), aad)


def check_space(
    proof: SpaceProof, binding: tuple[str, str, bytes, bytes], params: ValidationParams, kem_private_key: bytes
) -> list[Reason]:
    _kind, request_id, _subject, holder = binding
    problem = commitment_problem(proof, params)
    if problem is not None:
        return [reason("space.bad_commitment", problem)]
    out: list[Reason] = []
    if proof.total_bytes < params.min_space_bytes:
        out.append(reason("space.too_small", f"total_bytes {proof.total_bytes} is below the minimum {params.min_space_bytes}"))
    try:
        shared = kem_scheme("ML-KEM-1024").decapsulate(kem_private_key, proof.kem_ciphertext)
    except (CryptoError, ValueError):
        return out + [reason("space.decapsulation_failed", f"kem_ciphertext of {len(proof.kem_ciphertext)} bytes does not decapsulate with the cluster key")]
    key = space_key(shared, request_id, holder, proof.root)
    aad = space_aad(request_id, holder, proof.root, proof.total_bytes, proof.chunk_size)
    try:
        plaintext = AESGCM(key).decrypt(AEAD_NONCE, proof.sealed, aad)
    except InvalidTag:
        return out + [reason("space.aead_failed", "sealed answers do not open for this cluster key, request and commitment")]
    return out + _check_answers(plaintext, proof, request_id, holder, params)


def _check_answers(plaintext: bytes, proof: SpaceProof, request_id: str, holder: bytes, params: ValidationParams) -> list[Reason]:
    leaves = proof.total_bytes // proof.chunk_size
    expected = space_challenges(request_id, holder, proof.root, leaves, params.space_challenges)
    try:
        answers = unpack_bounded(plaintext, max_size=len(plaintext), field="sealed", max_depth=2)
    except DecodeError:
        return [reason("space.malformed_answers", "opened answers are not msgpack")]
    if not isinstance(answers, list) or len(answers) != len(expected):
        return [reason("space.malformed_answers", f"expected a list of {len(expected)} answers")]
    out: dict[str, Reason] = {}  # first failure per code, in answer order
    for number, (answer, index) in enumerate(zip(answers, expected)):
        if not (
            isinstance(answer, list) and len(answer) == 3 and isinstance(answer[0], int)
            and isinstance(answer[1], bytes) and isinstance(answer[2], bytes)
            and len(answer[2]) % 32 == 0 and len(answer[2]) <= 64 * 32
        ):
            out.setdefault("m", reason("space.malformed_answers", f"answer {number} is not [index, chunk, siblings]"))
            continue
        got_index, chunk, siblings = answer
        if got_index != index:
            out.setdefault("c", reason("space.wrong_challenge", f"answer {number} is for chunk {got_index}, challenge was chunk {index}"))
            continue
        if len(chunk) != proof.chunk_size:
            out.setdefault("m", reason("space.malformed_answers", f"answer {number} chunk has {len(chunk)} bytes, not {proof.chunk_size}"))
            continue
        path = [siblings[k:k + 32] for k in range(0, len(siblings), 32)]
        if not verify_inclusion(chunk, index, leaves, path, proof.root):
            out.setdefault("p", reason("space.bad_path", f"answer {number} (chunk {index}) does not verify against the root"))
    return list(out.values())
