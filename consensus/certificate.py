"""Result certificates: what a client checks so it need not trust the node it asked.

Verification (also spelled out in docs/CONSENSUS.md for other languages):

1. ``leaf = canonical_pack([request_id, sha256(result)])`` must be included at
   ``index`` in a tree of ``size`` leaves with root ``root`` (RFC 9162 inclusion path).
2. ``msg = canonical_pack(["hypermesh/result-vote/v1", cluster_id, seq, root])``.
3. Every ``(node_id, signature)`` pair names a distinct validator of the manifest and
   verifies over ``msg`` with that validator's key; there are at least 2f+1 of them.
"""

from __future__ import annotations

import hashlib
from typing import Any

from consensus import merkle
from consensus.actions import ResultCertificate
from consensus.codec import DecodeError, canonical_pack
from consensus.keys import KeyRing
from consensus.messages import MAX_NODE_ID_CHARS, MAX_SIGNATURE_BYTES, result_vote_bytes

MAX_CERT_SIGNATURES = 1024
MAX_PATH = 64


def result_leaf(request_id: str, result: bytes) -> bytes:
    return canonical_pack([request_id, hashlib.sha256(result).digest()])


def batch_root(leaves: list[bytes]) -> bytes:
    return merkle.root(leaves)


def result_certificate_from_wire(data: Any) -> ResultCertificate:
    """Typed, bounded parse of ``ResultCertificate.to_wire()`` output (e.g. from msgpack).
    Raises ``DecodeError`` naming the field."""
    if isinstance(data, ResultCertificate):
        return data
    if not isinstance(data, dict):
        raise DecodeError("certificate", "expected a map")
    expected = {"cluster_id", "seq", "root", "size", "index", "path", "signatures"}
    missing = sorted(expected - set(data))
    if missing:
        raise DecodeError(f"certificate.{missing[0]}", "missing")

    def integer(name: str, lo: int) -> int:
        v = data[name]
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= 2**62:
            raise DecodeError(f"certificate.{name}", f"expected an integer >= {lo}")
        return v

    cluster_id = data["cluster_id"]
    if not isinstance(cluster_id, str) or not 0 < len(cluster_id) <= 256:
        raise DecodeError("certificate.cluster_id", "expected a non-empty string")
    root = data["root"]
    if not isinstance(root, (bytes, bytearray)) or len(root) != 32:
        raise DecodeError("certificate.root", "expected 32 bytes")
    path = data["path"]
    if not isinstance(path, (list, tuple)) or len(path) > MAX_PATH:
        raise DecodeError("certificate.path", f"expected an array of at most {MAX_PATH}")
    for i, p in enumerate(path):
        if not isinstance(p, (bytes, bytearray)) or len(p) != 32:
            raise DecodeError(f"certificate.path[{i}]", "expected 32 bytes")
    sigs = data["signatures"]
    if not isinstance(sigs, (list, tuple)) or len(sigs) > MAX_CERT_SIGNATURES:
        raise DecodeError("certificate.signatures", f"expected an array of at most {MAX_CERT_SIGNATURES}")
    pairs: list[tuple[str, bytes]] = []
    for i, pair in enumerate(sigs):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise DecodeError(f"certificate.signatures[{i}]", "expected [node_id, signature]")
        node, sig = pair
        if not isinstance(node, str) or not 0 < len(node) <= MAX_NODE_ID_CHARS:
            raise DecodeError(f"certificate.signatures[{i}].node_id", "expected a node id")
        if not isinstance(sig, (bytes, bytearray)) or not 0 < len(sig) <= MAX_SIGNATURE_BYTES:
            raise DecodeError(f"certificate.signatures[{i}].signature", "expected signature bytes")
        pairs.append((node, bytes(sig)))
    return ResultCertificate(
        cluster_id=cluster_id, seq=integer("seq", 1), root=bytes(root), size=integer("size", 1),
        index=integer("index", 0), path=tuple(bytes(p) for p in path), signatures=tuple(pairs),
    )


def verify_result_certificate(
    keyring: KeyRing, cluster_id: str, request_id: str, result: bytes, cert: ResultCertificate | dict[str, Any]
) -> tuple[bool, str]:
    """(True, "") when the certificate proves ``result`` is the cluster's final answer for
    ``request_id``; otherwise (False, reason)."""
    try:
        c = result_certificate_from_wire(cert)
    except DecodeError as exc:
        return False, f"malformed certificate: {exc}"
    if c.cluster_id != cluster_id:
        return False, f"certificate is for cluster {c.cluster_id!r}, not {cluster_id!r}"
    if not c.index < c.size:
        return False, "leaf index outside the tree"
    if not merkle.verify_inclusion(result_leaf(request_id, result), c.index, c.size, c.path, c.root):
        return False, "result is not included under the signed root"
    message = result_vote_bytes(cluster_id, c.seq, c.root)
    seen: set[str] = set()
    for node, sig in c.signatures:
        if node in seen:
            return False, f"duplicate signer {node!r}"
        seen.add(node)
        if node not in keyring:
            return False, f"unknown signer {node!r}"
        if not keyring.verify(node, message, sig):
            return False, f"bad signature from {node!r}"
    if len(seen) < keyring.quorum:
        return False, f"{len(seen)} signatures, need {keyring.quorum} (2f+1 of n={keyring.n})"
    return True, ""
