"""Building proof sets: for clients, tests and benchmarks (not used by validators).

Typical use::

    holder = HolderKeys.generate("FALCON-1024")
    storage = StorageCommitment.generate(params.min_space_bytes)   # reuse across many
    payload = make_proof_set("req-1", params, holder, now_ms, storage=storage)
    # send payload to consensus/validate_proofs

``fault=("space", "path")`` builds a deliberately broken proof whose only failure is the
one named (the stake signature is made over the broken values); ``FAULTS`` maps each
fault to the reason code a validator must report. ``break_proof`` tampers with an
already-built payload (no keys needed, so the stake signature may break too).
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
from dataclasses import dataclass
from typing import Any

from consensus.crypto import signature_scheme
from consensus.merkle import MerkleTree, leaf_hash
from consensus.proofs.binding import (
    holder_id,
    leading_zero_bits,
    space_challenges,
    stake_statement,
    subject_digest,
    work_challenge,
    work_hash,
)
from consensus.proofs.params import ValidationParams
from consensus.proofs.space import seal_answers

FAULTS: dict[str, dict[str, str]] = {
    "work": {"nonce": "work.difficulty_not_met", "challenge": "work.challenge_mismatch"},
    "stake": {"signature": "stake.bad_signature", "amount": "stake.below_minimum", "scheme": "stake.unsupported_scheme"},
    "time": {"future": "time.outside_offset", "past": "time.outside_offset"},
    "space": {
        "kem": "space.decapsulation_failed", "aead": "space.aead_failed", "path": "space.bad_path",
        "challenge": "space.wrong_challenge", "small": "space.too_small", "answers": "space.malformed_answers",
        "commitment": "space.bad_commitment",
    },
    "csr": {"signature": "csr.bad_signature", "name": "csr.name_mismatch", "san": "csr.san_mismatch"},
    "policy": {"validity": "policy.validity_too_long"},
}


def _flip(data: bytes, at: int = -1) -> bytes:
    b = bytearray(data)
    b[at] ^= 0x01
    return bytes(b)


@dataclass(frozen=True, slots=True)
class HolderKeys:
    scheme: str
    public_key: bytes
    private_key: bytes

    @classmethod
    def generate(cls, scheme: str = "FALCON-1024") -> HolderKeys:
        public, private = signature_scheme(scheme).generate()
        return cls(scheme, public, private)

    @property
    def holder_id(self) -> bytes:
        return holder_id(self.scheme, self.public_key)

    def sign(self, message: bytes) -> bytes:
        return signature_scheme(self.scheme).sign(self.private_key, message)

    def to_wire(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "public_key": self.public_key, "private_key": self.private_key}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> HolderKeys:
        return cls(str(data["scheme"]), bytes(data["public_key"]), bytes(data["private_key"]))


class StorageCommitment:
    """Chunks and their Merkle tree. Build once, answer many requests."""

    __slots__ = ("chunk_size", "total_bytes", "_data", "_tree", "root")

    def __init__(self, data: bytes, chunk_size: int = 1024) -> None:
        if not data or len(data) % chunk_size:
            raise ValueError("data must be a non-empty multiple of chunk_size")
        self.chunk_size = chunk_size
        self.total_bytes = len(data)
        self._data = data
        self._tree = MerkleTree([leaf_hash(data[i:i + chunk_size]) for i in range(0, len(data), chunk_size)])
        self.root = self._tree.root

    @classmethod
    def generate(cls, total_bytes: int = 1 << 20, chunk_size: int = 1024, seed: bytes = b"hypermesh-storage") -> StorageCommitment:
        """Deterministic filler content (SHAKE-256 of ``seed``): stands in for real data."""
        return cls(hashlib.shake_256(seed).digest(total_bytes), chunk_size)

    @property
    def leaves(self) -> int:
        return self._tree.size

    def chunk(self, index: int) -> bytes:
        return self._data[index * self.chunk_size:(index + 1) * self.chunk_size]

    def path(self, index: int) -> list[bytes]:
        return self._tree.path(index)


def _solve_work(challenge: bytes, bits: int, fail: bool = False) -> bytes:
    """Smallest 8-byte counter nonce meeting ``bits`` (or, with ``fail``, missing them)."""
    for counter in range(1 << 40):
        nonce = counter.to_bytes(8, "big")
        ok = leading_zero_bits(work_hash(challenge, nonce)) >= bits
        if ok != fail:
            return nonce
    raise RuntimeError("no nonce found")  # unreachable for bits <= 40


def _check_fault(fault: tuple[str, str] | None) -> None:
    if fault is not None and (fault[0] not in FAULTS or fault[1] not in FAULTS[fault[0]]):
        known = "; ".join(f"{p}: {', '.join(h)}" for p, h in FAULTS.items())
        raise ValueError(f"unknown fault {fault!r}; known: {known}")


def _build_proofs(
    kind: str, request_id: str, subject: list[Any], params: ValidationParams, holder: HolderKeys, timestamp_ms: int,
    storage: StorageCommitment | None, amount: int | None, fault: tuple[str, str] | None,
) -> dict[str, Any]:
    _check_fault(fault)
    if fault == ("stake", "scheme"):
        holder = HolderKeys.generate("Ed25519")  # a valid signature, in a scheme the cluster refuses
    if not params.kem_public_key:
        raise ValueError("params.kem_public_key is empty: the space proof must be sealed to the cluster key")
    if fault == ("space", "small"):
        storage = StorageCommitment.generate(max(params.min_space_bytes // 2 // 1024, 2) * 1024, 1024)
    elif storage is None:
        storage = StorageCommitment.generate(max(params.min_space_bytes, 2 * 1024), 1024)
    amount = params.min_stake if amount is None else amount
    if fault == ("stake", "amount"):
        amount = params.min_stake - 1
    if fault == ("time", "future"):
        # Still too far ahead when sent a while later (up to a minute, or the offset when
        # smaller), yet within the half de-duplication window (>= 2 offsets), past which a
        # request is refused as expired instead of answered Invalid.
        timestamp_ms += params.max_time_offset_ms + max(1000, min(params.max_time_offset_ms, 60_000))
    elif fault == ("time", "past"):
        timestamp_ms = max(0, timestamp_ms - params.max_time_offset_ms - 1000)
    total_bytes = storage.total_bytes + (1 if fault == ("space", "commitment") else 0)

    subject_hash = subject_digest(kind, subject)
    hid = holder.holder_id
    challenge = work_challenge(kind, request_id, subject_hash, hid)
    bits = params.work_difficulty_bits
    failing = fault == ("work", "nonce")
    nonce = _solve_work(challenge, max(bits, 1) if failing else bits, fail=failing)
    if fault == ("work", "challenge"):
        challenge = _flip(challenge)

    indices = space_challenges(request_id, hid, storage.root, storage.leaves, params.space_challenges)
    answers = [(i, storage.chunk(i), storage.path(i)) for i in indices]
    if fault == ("space", "path"):
        i, chunk, path = answers[0]
        answers[0] = (i, chunk, [_flip(path[0])] + path[1:])
    elif fault == ("space", "challenge"):
        j = (answers[0][0] + 1) % storage.leaves
        answers[0] = (j, storage.chunk(j), storage.path(j))
    elif fault == ("space", "answers"):
        answers = answers[:-1]
    kem_ct, sealed = seal_answers(params.kem_public_key, request_id, hid, storage.root, total_bytes, storage.chunk_size, answers)
    if fault == ("space", "kem"):
        kem_ct = kem_ct[:-1]
    elif fault == ("space", "aead"):
        sealed = _flip(sealed, 0)

    statement = stake_statement(kind, request_id, subject_hash, holder.scheme, holder.public_key, amount, timestamp_ms,
                                storage.root, total_bytes, storage.chunk_size)
    signature = holder.sign(statement)
    if fault == ("stake", "signature"):
        signature = _flip(signature, len(signature) // 2)
    return {
        "work": {"challenge": challenge, "nonce": nonce, "difficulty_bits": bits},
        "stake": {"scheme": holder.scheme, "public_key": holder.public_key, "amount": amount, "signature": signature},
        "time": {"timestamp_ms": timestamp_ms},
        "space": {"root": storage.root, "total_bytes": total_bytes, "chunk_size": storage.chunk_size,
                  "kem_ciphertext": kem_ct, "sealed": sealed},
    }


def make_proof_set(
    request_id: str, params: ValidationParams, holder: HolderKeys, timestamp_ms: int, *,
    storage: StorageCommitment | None = None, amount: int | None = None, fault: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """Payload for ``consensus/validate_proofs`` (kind "proofs")."""
    return {"request_id": request_id,
            "proofs": _build_proofs("proofs", request_id, [], params, holder, timestamp_ms, storage, amount, fault)}


# ---------------------------------------------------------------------------
# certificate requests
# ---------------------------------------------------------------------------


def make_csr(common_name: str, san_entries: list[str], key: Any = None) -> tuple[bytes, Any]:
    """(DER CSR, private key). Default key: EC P-256 (fast to make and to check)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import NameOID

    key = key or ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for name in san_entries:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    algorithm = None if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(Encoding.DER), key


def make_certificate_request(
    request_id: str, params: ValidationParams, holder: HolderKeys, timestamp_ms: int, *,
    common_name: str, san_entries: list[str] | None = None, validity_days: int = 90, csr: bytes | None = None,
    csr_common_name: str | None = None, csr_san_entries: list[str] | None = None,
    storage: StorageCommitment | None = None, amount: int | None = None, fault: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """Payload for ``consensus/validate_certificate`` (kind "certificate"). Without ``csr``
    a fresh EC P-256 CSR is made for ``csr_common_name``/``csr_san_entries`` (default:
    the requested names). Faults "csr"/"policy" break the certificate part only."""
    _check_fault(fault)
    sans = [common_name] if san_entries is None else list(san_entries)
    if fault == ("policy", "validity"):
        validity_days = params.max_validity_days + 1
    if csr is None:
        csr_cn = csr_common_name or common_name
        csr_sans = list(csr_san_entries) if csr_san_entries is not None else list(sans)
        if fault == ("csr", "name"):
            csr_cn = "other-" + csr_cn
        if fault == ("csr", "san"):
            csr_sans = csr_sans + ["extra.invalid-san.example"]
        csr, _key = make_csr(csr_cn, csr_sans)
        if fault == ("csr", "signature"):
            csr = _flip(csr)  # last byte lies inside the signature value
    subject = [common_name, sans, validity_days, csr]
    proof_fault = fault if fault is not None and fault[0] not in ("csr", "policy") else None
    proofs = _build_proofs("certificate", request_id, subject, params, holder, timestamp_ms, storage, amount, proof_fault)
    return {"request_id": request_id, "common_name": common_name, "san_entries": sans,
            "validity_days": validity_days, "csr": csr, "proofs": proofs}


def break_proof(payload: dict[str, Any], proof: str, how: str = "") -> dict[str, Any]:
    """Tamper with a built payload (returns a copy). Without the holder's key the stake
    signature cannot be redone, so only unsigned parts are offered here:
    work (nonce|challenge), stake (signature), time (shift — also breaks the signature),
    space (kem|aead)."""
    out = copy.deepcopy(payload)
    p = out["proofs"]
    if proof == "work" and how in ("", "challenge"):
        p["work"]["challenge"] = _flip(p["work"]["challenge"])
    elif proof == "work" and how == "nonce":
        p["work"]["nonce"] = _solve_work(p["work"]["challenge"], max(p["work"]["difficulty_bits"], 1), fail=True)
    elif proof == "stake" and how in ("", "signature"):
        p["stake"]["signature"] = _flip(p["stake"]["signature"], len(p["stake"]["signature"]) // 2)
    elif proof == "time" and how in ("", "shift"):
        p["time"]["timestamp_ms"] += 1
    elif proof == "space" and how in ("", "aead"):
        p["space"]["sealed"] = _flip(p["space"]["sealed"], 0)
    elif proof == "space" and how == "kem":
        p["space"]["kem_ciphertext"] = p["space"]["kem_ciphertext"][:-1]
    else:
        raise ValueError(f"break_proof cannot do {proof}/{how!r}; use make_proof_set(fault=...) for {sorted(FAULTS)}")
    return out
