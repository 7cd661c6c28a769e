"""Result repair adopts a certified result from a peer, and one peer's odd answer
does not stop it from asking the others."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from consensus import merkle
from consensus.certificate import result_leaf
from consensus.keys import generate_node_key, keyring_of
from consensus.messages import result_vote_bytes
from consensus.validation import Outcome
from node.repair import ResultRepair
from node.store import PendingRequest, StoredResult


def test_a_malformed_answer_from_one_peer_does_not_stop_repair() -> None:
    keys = [generate_node_key(f"n{i}", "Ed25519") for i in range(4)]
    digest = hashlib.sha256(b"req").digest()
    result = Outcome("r1", "proofs", "Valid", (), 5, digest).encode()
    root = merkle.root([result_leaf("r1", result)])
    certificate = {"cluster_id": "c", "seq": 1, "root": root, "size": 1, "index": 0, "path": [],
                   "signatures": [[k.node_id, k.sign(result_vote_bytes("c", 1, root))] for k in keys[:3]]}
    nodes = [SimpleNamespace(node_id=k.node_id, host="::1", port=1, server_name=k.node_id) for k in keys]
    ring = keyring_of(keys)
    manifest = SimpleNamespace(keyring=lambda: ring, nodes=nodes, cluster_id="c", n=4, ca_pem=b"")
    pending = [PendingRequest("r1", digest, "proofs", b"")]
    store = SimpleNamespace(list_pending=lambda **kw: pending, get_pending=lambda rid: pending[0])
    adopted: list[StoredResult] = []

    class Peer:
        def __init__(self, node_id: str) -> None:
            self.node_id = node_id

        async def call(self, path: str, payload: Any) -> dict[str, Any]:
            # n1 answers first with a genuinely certified result but a nonsense view.
            view: Any = "x" if self.node_id == "n1" else 3
            return {"status": "Valid", "result": result, "certificate": certificate, "view": view, "leader": "n0"}

    repair = ResultRepair(node_id="n0", manifest=manifest, store=store, adopt=adopted.append)
    async def peer(entry: Any) -> Peer:
        return Peer(entry.node_id)

    repair._client = peer  # type: ignore[method-assign]
    assert asyncio.run(repair.repair_once()) == 1
    assert [(s.request_id, s.status, s.agreeing) for s in adopted] == [("r1", "Valid", 3)]


def test_a_renewed_client_certificate_replaces_the_clients_made_with_the_old_one(tmp_path: Path) -> None:
    """Peers that require client certificates must be shown the renewed one: repair's
    clients are made again once our certificate or key file changed."""
    from tests.transport.conftest import make_pki

    tls = make_pki(tmp_path).tls("n0", "none")
    entry = SimpleNamespace(node_id="n1", host="::1", port=1, server_name="n1")
    manifest = SimpleNamespace(keyring=lambda: keyring_of([generate_node_key("n0", "Ed25519")]), nodes=[entry],
                               cluster_id="c", n=1, ca_pem=b"")
    repair = ResultRepair(node_id="n0", manifest=manifest, store=SimpleNamespace(), adopt=lambda _s: None,
                          client_tls=tls)

    async def body() -> None:
        first = await repair._client(entry)
        assert await repair._client(entry) is first
        stat = os.stat(tls.cert_file)
        os.utime(tls.cert_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # renewed in place
        second = await repair._client(entry)
        assert second is not first and first._closed
        await repair.stop()

    asyncio.run(body())
