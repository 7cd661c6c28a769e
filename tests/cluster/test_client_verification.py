"""The client never returns a result it cannot verify against the manifest."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from cluster.bootstrap import InitOptions, init_cluster
from cluster.client import ClusterClient, UnverifiedResult
from cluster.manifest import Manifest, load_node_key
from consensus import merkle
from consensus.certificate import result_leaf
from consensus.messages import result_vote_bytes
from consensus.validation import Outcome


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return init_cluster(tmp_path_factory.mktemp("c") / "cluster", InitOptions(nodes=4, signing_scheme="Ed25519"))


def certified(manifest: Manifest, request_id: str, status: str = "Valid", signers: int = 3,
              request_digest: bytes = b"\x11" * 32) -> dict[str, Any]:
    """A reply as a node sends it: two results in one batch, signed by ``signers`` validators."""
    result = Outcome(request_id, "proofs", status, (), 1_700_000_000_000, request_digest).encode()
    other = Outcome("someone-else", "proofs", "Valid", (), 1_700_000_000_000, b"\x22" * 32).encode()
    leaves = [result_leaf("someone-else", other), result_leaf(request_id, result)]
    root = merkle.root(leaves)
    message = result_vote_bytes(manifest.cluster_id, 7, root)
    signatures = [[n.node_id, load_node_key(manifest, n.node_id).sign(message)] for n in manifest.nodes[:signers]]
    return {
        "request_id": request_id, "status": status, "result": result,
        "metrics": {"validator_nodes": signers, "total_validators": 4, "confidence_level": signers / 4, "seq": 7},
        "certificate": {"cluster_id": manifest.cluster_id, "seq": 7, "root": root, "size": 2, "index": 1,
                        "path": merkle.inclusion_path(leaves, 1), "signatures": signatures},
    }


def test_a_properly_certified_result_verifies(manifest: Manifest) -> None:
    client = ClusterClient(manifest)
    reply = certified(manifest, "req-1", request_digest=hashlib.sha256(b"req").digest())
    assert client.verify_result(reply, hashlib.sha256(b"req").digest()) is reply


@pytest.mark.parametrize("tamper", ["short", "forged-signature", "duplicate-signer", "unknown-signer", "flipped-status",
                                    "other-request", "wrong-path", "other-cluster", "overclaimed-count", "swapped-request"])
def test_every_kind_of_bad_certificate_is_refused(manifest: Manifest, tamper: str) -> None:
    client = ClusterClient(manifest)
    reply = certified(manifest, "req-1", signers=2 if tamper == "short" else 3)
    cert = reply["certificate"]
    if tamper == "forged-signature":
        cert["signatures"][0][1] = bytes(64)
    elif tamper == "duplicate-signer":
        cert["signatures"][2] = cert["signatures"][0]
    elif tamper == "unknown-signer":
        cert["signatures"][0][0] = "node-99"
    elif tamper == "flipped-status":
        reply["status"] = "Invalid"  # readable field no longer matches the signed bytes
    elif tamper == "other-request":
        reply["request_id"] = "someone-else"
    elif tamper == "wrong-path":
        cert["index"] = 0
    elif tamper == "other-cluster":
        cert["cluster_id"] = "hm-other"
    elif tamper == "overclaimed-count":
        reply["metrics"]["validator_nodes"] = 2  # fewer than the certificate's own signers: inconsistent
    with pytest.raises(UnverifiedResult):
        if tamper == "swapped-request":
            client.verify_result(reply, hashlib.sha256(b"what the client really sent").digest())
        else:
            client.verify_result(reply)
