"""validation_status on a node that executed a request but holds no result asks its
peers once, and peers answer from their own store only: two nodes in that state used to
ask each other without end (one client query: ~44,500 handler calls in 46 s)."""

from __future__ import annotations

import asyncio
import collections
import hashlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from consensus import merkle
from consensus.certificate import result_leaf
from consensus.keys import generate_node_key, keyring_of
from consensus.messages import result_vote_bytes
from consensus.validation import Outcome
from node.metrics import NodeMetrics
from node.repair import ResultRepair
from node.service import ServiceLimits, ValidationService
from node.store import StoredResult
from tests.transport.conftest import make_pki
from transport.client import StoqClient
from transport.server import HandlerRegistry, Limits, StoqServer

N = 4


async def _query(tmp_path: Path, holders: set[str],
                 client_auth: str = "none") -> tuple[dict[str, Any], collections.Counter[str]]:
    """Four real STOQ servers with real ValidationService/ResultRepair; every node has
    executed request r1 at seq 1; only ``holders`` store its certified result. One
    client asks node-2 (which does not hold it)."""
    pki = make_pki(tmp_path)
    keys = [generate_node_key(f"node-{i}", "Ed25519") for i in range(1, N + 1)]
    ring = keyring_of(keys)
    digest = hashlib.sha256(b"req").digest()
    result = Outcome("r1", "proofs", "Valid", (), 5, digest).encode()
    root = merkle.root([result_leaf("r1", result)])
    cert = {"cluster_id": "c", "seq": 1, "root": root, "size": 1, "index": 0, "path": [],
            "signatures": [[k.node_id, k.sign(result_vote_bytes("c", 1, root))] for k in keys[:3]]}
    certified = StoredResult("r1", digest, "Valid", result, cert, 3, N, 1, 0, "node-1")
    calls: collections.Counter[str] = collections.Counter()
    tls = {f"node-{i}": pki.tls(f"node-{i}", client_auth) for i in range(1, N + 1)}
    servers = [StoqServer("::1", 0, HandlerRegistry(), tls[f"node-{i}"], Limits()) for i in range(1, N + 1)]
    for server in servers:
        await server.start()
    entries = [SimpleNamespace(node_id=f"node-{i}", host="::1", port=s.address[1], server_name=f"node-{i}")
               for i, s in enumerate(servers, 1)]
    manifest = SimpleNamespace(keyring=lambda: ring, nodes=entries, cluster_id="c", n=N, ca_pem=pki.ca_pem)
    repairs = []
    for entry, server in zip(entries, servers):
        results = {"r1": certified} if entry.node_id in holders else {}
        store = SimpleNamespace(get_result=results.get, get_pending=lambda _rid: None)
        driver = SimpleNamespace(store=store, replica=SimpleNamespace(executed_seq=lambda _rid: 1, leader="node-1", view=0),
                                 adopt_result=lambda s, results=results: results.__setitem__(s.request_id, s))
        repair = ResultRepair(node_id=entry.node_id, manifest=manifest, store=store, adopt=driver.adopt_result,
                              client_tls=tls[entry.node_id])
        repairs.append(repair)
        service = ValidationService(node_id=entry.node_id, cluster_id="c", driver=driver, metrics=NodeMetrics(),
                                    limits=ServiceLimits(100, 5.0, 0.0), cache=None, fetch_certified=repair.fetch_certified)

        async def handler(payload: Any, ctx: Any, service: Any = service, node: str = entry.node_id) -> Any:
            calls[node] += 1
            return await service.validation_status(payload, ctx)

        server.registry.register("consensus/validation_status", handler)
    cert, key = pki.issue("operator", server=False)
    client = StoqClient("::1", entries[1].port, ca_pem=pki.ca_pem, server_name="node-2", timeout_s=20, retries=0,
                        client_cert_pem=cert, client_key_pem=key)
    try:
        answer = await client.call("consensus/validation_status", {"request_id": "r1"})
        await asyncio.sleep(1.0)  # anything still bouncing between nodes would show now
    finally:
        await client.close()
        for repair in repairs:
            await repair.stop()
        for server in servers:
            await server.stop(grace_s=0)
    return answer, calls


def test_nobody_holds_it_one_query_each_then_pending(tmp_path: Path) -> None:
    answer, calls = asyncio.run(_query(tmp_path, holders=set()))
    assert answer["status"] == "Pending"
    assert sum(calls.values()) == N, calls  # the client's, then one local query per peer


def test_a_peer_holds_it_fetched_checked_and_answered(tmp_path: Path) -> None:
    answer, calls = asyncio.run(_query(tmp_path, holders={"node-4"}))
    assert answer["status"] == "Valid" and answer["certificate"]["seq"] == 1
    assert sum(calls.values()) <= N, calls


def test_peers_that_require_client_certificates_are_asked_with_ours(tmp_path: Path) -> None:
    answer, _ = asyncio.run(_query(tmp_path, holders={"node-4"}, client_auth="required"))
    assert answer["status"] == "Valid" and answer["certificate"]["seq"] == 1
