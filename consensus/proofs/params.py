"""Cluster-wide validation parameters (the ``validation`` section of the manifest).

Every validator must hold byte-identical parameters: they are an input of the
deterministic validation function, so ``digest()`` belongs in the manifest checks.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import asdict, dataclass, fields
from typing import Any

from consensus.codec import DecodeError, digest

DEFAULT_STAKE_SCHEMES = ("FALCON-1024", "ML-DSA-87", "ML-DSA-65", "ML-DSA-44")
DEFAULT_CSR_KEY_TYPES = ("RSA", "EC", "Ed25519", "Ed448")
DEFAULT_EC_CURVES = ("secp256r1", "secp384r1", "secp521r1")

_BYTES_FIELDS = ("kem_public_key",)
_TUPLE_FIELDS = ("accepted_stake_schemes", "accepted_csr_key_types", "accepted_ec_curves")
_BOOL_FIELDS = ("require_cn_in_san", "allow_wildcards", "allow_ip_sans")


@dataclass(frozen=True, slots=True)
class ValidationParams:
    # stake
    min_stake: int = 1000
    accepted_stake_schemes: tuple[str, ...] = DEFAULT_STAKE_SCHEMES
    # work: leading zero bits of SHA-256(challenge || nonce); 12 keeps proving ~4 ms
    work_difficulty_bits: int = 12
    # time
    max_time_offset_ms: int = 30_000
    # space
    space_challenges: int = 8
    min_space_bytes: int = 1 << 20
    min_chunk_size: int = 256
    max_chunk_size: int = 4096
    kem_public_key: bytes = b""  # the cluster's ML-KEM-1024 public key
    # certificate policy (TrustChain requests)
    max_validity_days: int = 398
    max_san_entries: int = 100
    min_rsa_bits: int = 2048
    accepted_csr_key_types: tuple[str, ...] = DEFAULT_CSR_KEY_TYPES
    accepted_ec_curves: tuple[str, ...] = DEFAULT_EC_CURVES
    require_cn_in_san: bool = True
    allow_wildcards: bool = True
    allow_ip_sans: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _BYTES_FIELDS:
                ok = isinstance(value, bytes) and len(value) <= 4096
            elif f.name in _TUPLE_FIELDS:
                ok = isinstance(value, tuple) and len(value) <= 32 and all(isinstance(v, str) and 0 < len(v) <= 64 for v in value)
            elif f.name in _BOOL_FIELDS:
                ok = isinstance(value, bool)
            else:
                ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 62
            if not ok:
                raise ValueError(f"ValidationParams.{f.name}: invalid value {value!r}")
        if not 0 <= self.work_difficulty_bits <= 256:
            raise ValueError("ValidationParams.work_difficulty_bits must be in 0..256")
        if not 1 <= self.space_challenges <= 64:
            raise ValueError("ValidationParams.space_challenges must be in 1..64")
        if not 1 <= self.min_chunk_size <= self.max_chunk_size <= 65536:
            raise ValueError("ValidationParams: need 1 <= min_chunk_size <= max_chunk_size <= 65536")

    # -- wire forms -------------------------------------------------------------

    def to_wire(self) -> dict[str, Any]:
        """msgpack-ready: bytes stay bytes, tuples become lists."""
        out = asdict(self)
        for name in _TUPLE_FIELDS:
            out[name] = list(out[name])
        return out

    @classmethod
    def from_wire(cls, data: Any, field: str = "validation") -> ValidationParams:
        """Strict: unknown keys and wrong types raise DecodeError; absent keys take defaults."""
        if not isinstance(data, dict):
            raise DecodeError(field, f"expected a map, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                raise DecodeError(f"{field}.{key}", "unknown field")
            if key in _TUPLE_FIELDS:
                if not isinstance(value, (list, tuple)):
                    raise DecodeError(f"{field}.{key}", "expected a list of strings")
                value = tuple(value)
            elif key in _BYTES_FIELDS and isinstance(value, (bytearray, memoryview)):
                value = bytes(value)
            kwargs[key] = value
        try:
            return cls(**kwargs)
        except ValueError as exc:
            raise DecodeError(field, str(exc)) from None

    def to_json_dict(self) -> dict[str, Any]:
        """For JSON manifests: bytes fields base64 (standard alphabet, padded)."""
        out = self.to_wire()
        for name in _BYTES_FIELDS:
            out[name] = base64.b64encode(out[name]).decode("ascii")
        return out

    @classmethod
    def from_json_dict(cls, data: Any, field: str = "validation") -> ValidationParams:
        if not isinstance(data, dict):
            raise DecodeError(field, f"expected an object, got {type(data).__name__}")
        data = dict(data)
        for name in _BYTES_FIELDS:
            if name in data:
                if not isinstance(data[name], str):
                    raise DecodeError(f"{field}.{name}", "expected a base64 string")
                try:
                    data[name] = base64.b64decode(data[name], validate=True)
                except (binascii.Error, ValueError):
                    raise DecodeError(f"{field}.{name}", "not valid base64") from None
        return cls.from_wire(data, field)

    def digest(self) -> bytes:
        """What every validator must agree on (compare it at start-up)."""
        return digest(["hypermesh/validation-params/v1", self.to_wire()])
