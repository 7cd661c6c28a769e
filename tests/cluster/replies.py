"""Certified replies exactly as a node sends them (built with the server's own
``result_payload``), so the client is tested against the real reply shape."""

from __future__ import annotations

from typing import Any

from cluster.manifest import Manifest, load_node_key
from consensus import merkle
from consensus.certificate import result_leaf
from consensus.messages import result_vote_bytes
from consensus.proofs.reasons import Reason
from consensus.validation import Outcome
from node.service import result_payload
from node.store import StoredResult

SEQ = 7
AGREED_TIME_MS = 1_700_000_000_000


def certificate_for(manifest: Manifest, request_id: str, result: bytes, signers: int = 3) -> dict[str, Any]:
    """A result certificate over ``result``: two results in one batch, signed by ``signers`` validators."""
    other = Outcome("someone-else", "proofs", "Valid", (), AGREED_TIME_MS, b"\x22" * 32).encode()
    leaves = [result_leaf("someone-else", other), result_leaf(request_id, result)]
    root = merkle.root(leaves)
    message = result_vote_bytes(manifest.cluster_id, SEQ, root)
    signatures = [[n.node_id, load_node_key(manifest, n.node_id).sign(message)] for n in manifest.nodes[:signers]]
    return {"cluster_id": manifest.cluster_id, "seq": SEQ, "root": root, "size": 2, "index": 1,
            "path": merkle.inclusion_path(leaves, 1), "signatures": signatures}


def certified_reply(manifest: Manifest, request_id: str, *, status: str = "Valid", signers: int = 3,
                    agreeing: int | None = None, request_digest: bytes = b"\x11" * 32,
                    reasons: tuple[Reason, ...] = ()) -> dict[str, Any]:
    """The ValidationResult a node returns; ``agreeing`` (default: the signers) is the vote count
    it reports, which may exceed the certificate's signers when late votes arrived."""
    result = Outcome(request_id, "proofs", status, reasons, AGREED_TIME_MS, request_digest).encode()
    certificate = certificate_for(manifest, request_id, result, signers)
    stored = StoredResult(request_id, request_digest, status, result, certificate,
                          agreeing if agreeing is not None else signers, manifest.n, SEQ, 0, manifest.nodes[0].node_id)
    return result_payload(stored)
