"""Validation requests: strict parsing of client payloads and canonical encoding.

``parse_request`` is the only way in — client payloads (``parse_request``) and request
bytes ordered by the leader (``decode_request``) go through the same strict checks, and
``decode_request`` additionally requires the bytes to be the canonical encoding, so one
request has exactly one digest.

Encoding: ``canonical_pack({"v": 1, "kind": kind, "payload": <normalized payload>})`` —
the normalized payload is the client schema with the CSR always as DER bytes and
``san_entries`` as a list (see docs/PROOFS.md).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from consensus.codec import DecodeError, canonical_pack, unpack_bounded

MAX_REQUEST_BYTES = 256 * 1024
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
KINDS = ("proofs", "certificate")
_U63 = (1 << 63) - 1


# ---------------------------------------------------------------------------
# proof records (shapes only; meaning is checked in consensus/proofs/)
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkProof:
    challenge: bytes  # 32 bytes, must equal the derived challenge
    nonce: bytes  # 1..64 bytes
    difficulty_bits: int  # declared; the check uses max(declared, cluster minimum)

    def to_wire(self) -> dict[str, Any]:
        return {"challenge": self.challenge, "nonce": self.nonce, "difficulty_bits": self.difficulty_bits}


@dataclass(frozen=True, slots=True)
class StakeProof:
    scheme: str
    public_key: bytes
    amount: int
    signature: bytes  # over binding.stake_statement(...), covers the time proof too

    def to_wire(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "public_key": self.public_key, "amount": self.amount, "signature": self.signature}


@dataclass(frozen=True, slots=True)
class TimeProof:
    timestamp_ms: int

    def to_wire(self) -> dict[str, Any]:
        return {"timestamp_ms": self.timestamp_ms}


@dataclass(frozen=True, slots=True)
class SpaceProof:
    root: bytes  # RFC 9162 root over the chunks
    total_bytes: int
    chunk_size: int
    kem_ciphertext: bytes  # ML-KEM-1024 encapsulation to the cluster key
    sealed: bytes  # AES-256-GCM(answers), tag appended

    def to_wire(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "total_bytes": self.total_bytes,
            "chunk_size": self.chunk_size,
            "kem_ciphertext": self.kem_ciphertext,
            "sealed": self.sealed,
        }


@dataclass(frozen=True, slots=True)
class ProofSet:
    work: WorkProof
    stake: StakeProof
    time: TimeProof
    space: SpaceProof

    def to_wire(self) -> dict[str, Any]:
        return {"work": self.work.to_wire(), "stake": self.stake.to_wire(), "time": self.time.to_wire(), "space": self.space.to_wire()}


# ---------------------------------------------------------------------------
# requests
# ---------------------------------------------------------------------------


class _Encoded:
    """Shared behaviour; subclasses fill ``_encoded`` in __post_init__."""

    __slots__ = ()

    def encode(self) -> bytes:
        return self._encoded  # type: ignore[attr-defined]

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self._encoded).digest()  # type: ignore[attr-defined]

    def _fill(self) -> None:
        data = canonical_pack({"v": 1, "kind": self.kind, "payload": self.to_payload()})  # type: ignore[attr-defined]
        object.__setattr__(self, "_encoded", data)


@dataclass(frozen=True, slots=True)
class FourProofValidationRequest(_Encoded):
    request_id: str
    proofs: ProofSet
    _encoded: bytes = field(init=False, repr=False, compare=False)
    kind: ClassVar[str] = "proofs"

    def __post_init__(self) -> None:
        self._fill()

    def subject(self) -> list[Any]:
        """What the request asks about, beyond the proofs: nothing for a bare proof set."""
        return []

    def to_payload(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "proofs": self.proofs.to_wire()}


@dataclass(frozen=True, slots=True)
class CertificateValidationRequest(_Encoded):
    request_id: str
    common_name: str
    san_entries: tuple[str, ...]
    validity_days: int
    csr: bytes  # PKCS#10, DER
    proofs: ProofSet
    _encoded: bytes = field(init=False, repr=False, compare=False)
    kind: ClassVar[str] = "certificate"

    def __post_init__(self) -> None:
        self._fill()

    def subject(self) -> list[Any]:
        return [self.common_name, list(self.san_entries), self.validity_days, self.csr]

    def to_payload(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "common_name": self.common_name,
            "san_entries": list(self.san_entries),
            "validity_days": self.validity_days,
            "csr": self.csr,
            "proofs": self.proofs.to_wire(),
        }


ValidationRequest = FourProofValidationRequest | CertificateValidationRequest


# ---------------------------------------------------------------------------
# strict field readers
# ---------------------------------------------------------------------------


def _map(value: Any, path: str, required: tuple[str, ...], top: str = "payload") -> dict[str, Any]:
    """``path`` "" is the top level, named ``top`` in errors (a client's payload, or the
    encoded request itself); its fields are named without a prefix."""
    if not isinstance(value, dict):
        raise DecodeError(path or top, f"expected a map, got {type(value).__name__}")
    prefix = f"{path}." if path else ""
    for key in value:
        if not isinstance(key, str):
            raise DecodeError(path or top, "map keys must be strings")
        if key not in required:
            raise DecodeError(prefix + key, "unknown field")
    for key in required:
        if key not in value:
            raise DecodeError(prefix + key, "missing field")
    return value


def _bytes(value: Any, path: str, lo: int, hi: int) -> bytes:
    if isinstance(value, (bytearray, memoryview)):
        value = bytes(value)
    if not isinstance(value, bytes):
        raise DecodeError(path, f"expected bytes, got {type(value).__name__}")
    if not lo <= len(value) <= hi:
        raise DecodeError(path, f"length {len(value)} outside {lo}..{hi}")
    return value


def _int(value: Any, path: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise DecodeError(path, f"expected an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise DecodeError(path, f"value {value} outside {lo}..{hi}")
    return value


def _str(value: Any, path: str, lo: int, hi: int) -> str:
    if not isinstance(value, str):
        raise DecodeError(path, f"expected a string, got {type(value).__name__}")
    if not lo <= len(value) <= hi:
        raise DecodeError(path, f"length {len(value)} outside {lo}..{hi}")
    if not value.isprintable():
        raise DecodeError(path, "control characters are not allowed")
    return value


def _request_id(value: Any) -> str:
    rid = _str(value, "request_id", 1, 128)
    if not REQUEST_ID_RE.fullmatch(rid):
        raise DecodeError("request_id", "must be 1..128 characters of [A-Za-z0-9._:-]")
    return rid


def _proofs(value: Any) -> ProofSet:
    m = _map(value, "proofs", ("work", "stake", "time", "space"))
    w = _map(m["work"], "proofs.work", ("challenge", "nonce", "difficulty_bits"))
    s = _map(m["stake"], "proofs.stake", ("scheme", "public_key", "amount", "signature"))
    t = _map(m["time"], "proofs.time", ("timestamp_ms",))
    p = _map(m["space"], "proofs.space", ("root", "total_bytes", "chunk_size", "kem_ciphertext", "sealed"))
    return ProofSet(
        work=WorkProof(
            challenge=_bytes(w["challenge"], "proofs.work.challenge", 32, 32),
            nonce=_bytes(w["nonce"], "proofs.work.nonce", 1, 64),
            difficulty_bits=_int(w["difficulty_bits"], "proofs.work.difficulty_bits", 0, 256),
        ),
        stake=StakeProof(
            scheme=_str(s["scheme"], "proofs.stake.scheme", 1, 32),
            public_key=_bytes(s["public_key"], "proofs.stake.public_key", 1, 4096),
            amount=_int(s["amount"], "proofs.stake.amount", 0, _U63),
            signature=_bytes(s["signature"], "proofs.stake.signature", 1, 8192),
        ),
        time=TimeProof(timestamp_ms=_int(t["timestamp_ms"], "proofs.time.timestamp_ms", 0, _U63)),
        space=SpaceProof(
            root=_bytes(p["root"], "proofs.space.root", 32, 32),
            total_bytes=_int(p["total_bytes"], "proofs.space.total_bytes", 1, 1 << 62),
            chunk_size=_int(p["chunk_size"], "proofs.space.chunk_size", 1, 65536),
            kem_ciphertext=_bytes(p["kem_ciphertext"], "proofs.space.kem_ciphertext", 1, 2048),
            sealed=_bytes(p["sealed"], "proofs.space.sealed", 16, 200_000),
        ),
    )


_PEM_LABELS = ("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST")
# Linear: one character class over the body, no overlapping whitespace runs (the
# former single regex backtracked cubically on a BEGIN line followed by spaces).
_PEM_BODY_RE = re.compile(r"[A-Za-z0-9+/=\s]+")


def _pem_body(text: str) -> str | None:
    """The base64 body of exactly one PEM CSR block (BEGIN and END with the same label)."""
    text = text.strip()
    for label in _PEM_LABELS:
        begin, end = f"-----BEGIN {label}-----", f"-----END {label}-----"
        if text.startswith(begin) and text.endswith(end):
            body = text[len(begin):-len(end)]
            return body if _PEM_BODY_RE.fullmatch(body) else None
    return None


def _csr(value: Any) -> bytes:
    """DER bytes as they are; a PEM string is unwrapped to DER (so encodings are canonical).
    Whether the DER is a valid CSR is a validation reason (csr.malformed), not a decode error."""
    if isinstance(value, str):
        if len(value) > 24_000:
            raise DecodeError("csr", "PEM longer than 24000 characters")
        body = _pem_body(value)
        if body is None:
            raise DecodeError("csr", "expected DER bytes or one PEM 'CERTIFICATE REQUEST' block")
        try:
            der = base64.b64decode("".join(body.split()), validate=True)
        except (binascii.Error, ValueError):
            raise DecodeError("csr", "PEM body is not valid base64") from None
        return _bytes(der, "csr", 1, 16384)
    return _bytes(value, "csr", 1, 16384)


def _san_entries(value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise DecodeError("san_entries", f"expected a list, got {type(value).__name__}")
    if len(value) > 1000:
        raise DecodeError("san_entries", f"{len(value)} entries exceeds the limit of 1000")
    return tuple(_str(v, f"san_entries.{i}", 1, 253) for i, v in enumerate(value))


def parse_request(kind: str, payload: Any) -> ValidationRequest:
    """Client payload (decoded msgpack map) -> request. Raises DecodeError naming the field."""
    if kind == "proofs":
        m = _map(payload, "", ("request_id", "proofs"))
        return FourProofValidationRequest(request_id=_request_id(m["request_id"]), proofs=_proofs(m["proofs"]))
    if kind == "certificate":
        m = _map(payload, "", ("request_id", "common_name", "san_entries", "validity_days", "csr", "proofs"))
        return CertificateValidationRequest(
            request_id=_request_id(m["request_id"]),
            common_name=_str(m["common_name"], "common_name", 1, 253),
            san_entries=_san_entries(m["san_entries"]),
            validity_days=_int(m["validity_days"], "validity_days", -(1 << 31), 1 << 31),
            csr=_csr(m["csr"]),
            proofs=_proofs(m["proofs"]),
        )
    raise DecodeError("kind", f"unknown request kind {kind!r}; expected one of {', '.join(KINDS)}")


def decode_request(data: bytes) -> ValidationRequest:
    """Bytes from a peer (the leader's batch) -> request; bounded, strict and canonical."""
    raw = unpack_bounded(data, max_size=MAX_REQUEST_BYTES, field="request")
    m = _map(raw, "", ("v", "kind", "payload"), top="request")
    if m["v"] != 1 or isinstance(m["v"], bool):
        raise DecodeError("v", "unsupported request encoding version")
    kind = _str(m["kind"], "kind", 1, 16)
    request = parse_request(kind, m["payload"])
    if request.encode() != bytes(data):
        raise DecodeError("request", "not the canonical encoding")
    return request
