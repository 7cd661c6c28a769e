"""Signature and KEM schemes behind one interface, with the backend chosen at start-up.

Backends, in order of preference:

* ``liboqs`` — liboqs-python, only when the liboqs shared library is already installed.
  We look for the library *before* importing ``oqs``: importing it without the library
  makes liboqs-python try to ``git clone`` and build liboqs (see FACTS.md), which hangs
  for seconds and fails on machines without network access.
* ``pyca+pqclean`` — from the package index: ``cryptography`` (ML-DSA, ML-KEM, Ed25519,
  all in OpenSSL) and ``pypqc`` (PQClean's FALCON-1024).

Keys and signatures are plain ``bytes`` everywhere else in the code base; the loaded-key
objects here only cache parsing, which matters for ML-DSA where loading costs as much as
verifying.
"""

from __future__ import annotations

import ctypes.util
import functools
import glob
import importlib.util
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa, mlkem

SIGNATURE_SCHEMES = ("ML-DSA-87", "ML-DSA-65", "ML-DSA-44", "FALCON-1024", "Ed25519")
KEM_SCHEMES = ("ML-KEM-1024",)


class CryptoError(ValueError):
    """A key, signature or ciphertext is malformed, or a scheme is unknown."""


class SignatureScheme(Protocol):
    name: str

    def generate(self) -> tuple[bytes, bytes]:
        """Return ``(public_key, private_key)`` as raw bytes."""

    def sign(self, private_key: bytes, message: bytes) -> bytes: ...

    def verify(self, public_key: bytes, message: bytes, signature: bytes) -> bool:
        """True when valid; False for a bad signature *or* a malformed key/signature."""


class KemScheme(Protocol):
    name: str

    def generate(self) -> tuple[bytes, bytes]: ...

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        """Return ``(ciphertext, shared_secret)``."""

    def decapsulate(self, private_key: bytes, ciphertext: bytes) -> bytes: ...


# ---------------------------------------------------------------------------
# pyca/cryptography + PQClean backend
# ---------------------------------------------------------------------------

_MLDSA = {
    "ML-DSA-87": (mldsa.MLDSA87PrivateKey, mldsa.MLDSA87PublicKey),
    "ML-DSA-65": (mldsa.MLDSA65PrivateKey, mldsa.MLDSA65PublicKey),
    "ML-DSA-44": (mldsa.MLDSA44PrivateKey, mldsa.MLDSA44PublicKey),
}


@dataclass(frozen=True, slots=True)
class _PycaSignature:
    """ML-DSA-* and Ed25519 from OpenSSL. Private keys are the 32-byte seeds."""

    name: str
    load_private: Callable[[bytes], object]
    load_public: Callable[[bytes], object]
    new_private: Callable[[], object]

    def generate(self) -> tuple[bytes, bytes]:
        key = self.new_private()
        return key.public_key().public_bytes_raw(), key.private_bytes_raw()  # type: ignore[attr-defined]

    def sign(self, private_key: bytes, message: bytes) -> bytes:
        return _cached_private(self.name, private_key).sign(message)

    def verify(self, public_key: bytes, message: bytes, signature: bytes) -> bool:
        try:
            _cached_public(self.name, public_key).verify(signature, message)
            return True
        except (InvalidSignature, CryptoError, ValueError, TypeError):
            return False


def _pyca_scheme(name: str) -> _PycaSignature:
    if name == "Ed25519":
        return _PycaSignature(
            name,
            ed25519.Ed25519PrivateKey.from_private_bytes,
            ed25519.Ed25519PublicKey.from_public_bytes,
            ed25519.Ed25519PrivateKey.generate,
        )
    private_cls, public_cls = _MLDSA[name]
    return _PycaSignature(
        name, private_cls.from_seed_bytes, public_cls.from_public_bytes, private_cls.generate
    )


@functools.lru_cache(maxsize=256)
def _cached_private(name: str, private_key: bytes) -> object:
    try:
        return _pyca_scheme(name).load_private(private_key)
    except (ValueError, TypeError) as exc:
        raise CryptoError(f"{name}: malformed private key: {exc}") from exc


@functools.lru_cache(maxsize=4096)
def _cached_public(name: str, public_key: bytes) -> object:
    try:
        return _pyca_scheme(name).load_public(public_key)
    except (ValueError, TypeError) as exc:
        raise CryptoError(f"{name}: malformed public key: {exc}") from exc


class _PqcleanFalcon:
    """FALCON-1024 from PQClean via ``pypqc`` (the only index wheel that has it)."""

    name = "FALCON-1024"
    public_key_size = 1793

    def __init__(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pypqc prints a patent notice on import
            from pqc.sign import falcon_1024

        self._impl = falcon_1024

    def generate(self) -> tuple[bytes, bytes]:
        public, private = self._impl.keypair()
        return bytes(public), bytes(private)

    def sign(self, private_key: bytes, message: bytes) -> bytes:
        return bytes(self._impl.sign(message, private_key))

    def verify(self, public_key: bytes, message: bytes, signature: bytes) -> bool:
        if len(public_key) != self.public_key_size or not 0 < len(signature) <= 1462:
            return False
        try:
            self._impl.verify(signature, message, public_key)
            return True
        except Exception:  # pypqc raises a bare ValueError/RuntimeError on mismatch
            return False


class _PycaMlKem1024:
    name = "ML-KEM-1024"
    public_key_size = 1568
    ciphertext_size = 1568

    def generate(self) -> tuple[bytes, bytes]:
        key = mlkem.MLKEM1024PrivateKey.generate()
        return key.public_key().public_bytes_raw(), key.private_bytes_raw()

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        try:
            public = mlkem.MLKEM1024PublicKey.from_public_bytes(public_key)
        except ValueError as exc:
            raise CryptoError(f"ML-KEM-1024: malformed public key: {exc}") from exc
        shared, ciphertext = public.encapsulate()
        return ciphertext, shared

    def decapsulate(self, private_key: bytes, ciphertext: bytes) -> bytes:
        if len(ciphertext) != self.ciphertext_size:
            raise CryptoError(
                f"ML-KEM-1024: ciphertext must be {self.ciphertext_size} bytes, got {len(ciphertext)}"
            )
        return _cached_kem_private(private_key).decapsulate(ciphertext)


@functools.lru_cache(maxsize=16)
def _cached_kem_private(private_key: bytes) -> mlkem.MLKEM1024PrivateKey:
    try:
        return mlkem.MLKEM1024PrivateKey.from_seed_bytes(private_key)
    except ValueError as exc:
        raise CryptoError(f"ML-KEM-1024: malformed private key: {exc}") from exc


# ---------------------------------------------------------------------------
# liboqs backend (only when the C library is really there)
# ---------------------------------------------------------------------------

_OQS_NAMES = {"FALCON-1024": "Falcon-1024", "ML-DSA-87": "ML-DSA-87", "ML-DSA-65": "ML-DSA-65",
              "ML-DSA-44": "ML-DSA-44", "ML-KEM-1024": "ML-KEM-1024"}


def liboqs_library_path() -> str | None:
    """Where the liboqs shared library is, without importing ``oqs`` (which would
    try to download and build it)."""
    found = ctypes.util.find_library("oqs")
    if found:
        return found
    roots = [os.environ.get("OQS_INSTALL_PATH", ""), os.path.expanduser("~/_oqs"), "/usr/local", "/usr"]
    for root in filter(None, roots):
        for pattern in ("lib/liboqs.so*", "lib64/liboqs.so*", "lib/*/liboqs.so*"):
            hits = glob.glob(os.path.join(root, pattern))
            if hits:
                return hits[0]
    return None


class _OqsSignature:
    def __init__(self, oqs_module: object, name: str) -> None:
        self._oqs = oqs_module
        self.name = name
        self._alg = _OQS_NAMES[name]

    def generate(self) -> tuple[bytes, bytes]:
        with self._oqs.Signature(self._alg) as signer:  # type: ignore[attr-defined]
            public = signer.generate_keypair()
            return bytes(public), bytes(signer.export_secret_key())

    def sign(self, private_key: bytes, message: bytes) -> bytes:
        with self._oqs.Signature(self._alg, private_key) as signer:  # type: ignore[attr-defined]
            return bytes(signer.sign(message))

    def verify(self, public_key: bytes, message: bytes, signature: bytes) -> bool:
        try:
            with self._oqs.Signature(self._alg) as verifier:  # type: ignore[attr-defined]
                return bool(verifier.verify(message, signature, public_key))
        except Exception:
            return False


# ---------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Backend:
    name: str
    signatures: dict[str, SignatureScheme]
    kems: dict[str, KemScheme]
    detail: str

    def report(self) -> dict[str, object]:
        """What ``consensus/health`` shows."""
        return {
            "backend": self.name,
            "detail": self.detail,
            "signature_schemes": sorted(self.signatures),
            "kem_schemes": sorted(self.kems),
        }


def _pyca_backend(detail: str) -> Backend:
    signatures: dict[str, SignatureScheme] = {n: _pyca_scheme(n) for n in ("ML-DSA-87", "ML-DSA-65", "ML-DSA-44", "Ed25519")}
    signatures["FALCON-1024"] = _PqcleanFalcon()
    return Backend("pyca+pqclean", signatures, {"ML-KEM-1024": _PycaMlKem1024()}, detail)


def _try_liboqs() -> Backend | None:
    path = liboqs_library_path()
    if path is None or importlib.util.find_spec("oqs") is None:
        return None
    try:
        import oqs  # noqa: PLC0415 - deliberate late import, guarded above
    except Exception:
        return None
    base = _pyca_backend("")
    signatures = dict(base.signatures)
    signatures["FALCON-1024"] = _OqsSignature(oqs, "FALCON-1024")
    for name in ("ML-DSA-87", "ML-DSA-65", "ML-DSA-44"):
        signatures[name] = _OqsSignature(oqs, name)
    # ML-KEM stays on OpenSSL: identical wire format, and it releases the GIL.
    return Backend("liboqs", signatures, base.kems, f"liboqs at {path}; ML-KEM and Ed25519 from OpenSSL")


@functools.lru_cache(maxsize=1)
def backend() -> Backend:
    """The process-wide backend. ``HYPERMESH_PQ_BACKEND=pyca`` forces the index backend."""
    if os.environ.get("HYPERMESH_PQ_BACKEND", "auto") != "pyca":
        chosen = _try_liboqs()
        if chosen is not None:
            return chosen
        detail = "liboqs shared library not found; using OpenSSL (ML-DSA, ML-KEM, Ed25519) and PQClean (FALCON-1024)"
    else:
        detail = "forced by HYPERMESH_PQ_BACKEND=pyca"
    return _pyca_backend(detail)


def signature_scheme(name: str) -> SignatureScheme:
    try:
        return backend().signatures[name]
    except KeyError:
        raise CryptoError(f"unknown signature scheme {name!r}; known: {', '.join(SIGNATURE_SCHEMES)}") from None


def kem_scheme(name: str = "ML-KEM-1024") -> KemScheme:
    try:
        return backend().kems[name]
    except KeyError:
        raise CryptoError(f"unknown KEM scheme {name!r}; known: {', '.join(KEM_SCHEMES)}") from None
