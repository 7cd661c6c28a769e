"""The vote guard file (node/vote_guard.py) and the driver's use of it: written before
any vote it covers leaves, read back on start to notice a store that went back in time."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from cluster.bootstrap import InitOptions, init_cluster
from cluster.manifest import Manifest, load_kem_private_key, load_node_key
from cluster.workload import ProofFactory
from consensus.messages import decode
from consensus.replica import ReplicaConfig
from consensus.requests import parse_request
from node.metrics import NodeMetrics
from node.runtime import ReplicaDriver
from node.store import Store
from node.vote_guard import VoteGuard, VoteGuardError


def test_the_file_only_grows_and_says_whose_it_is(tmp_path: Path) -> None:
    guard = VoteGuard(tmp_path / "vote-guard.json", owner="hm-1/node-2")
    assert guard.load() is None
    guard.raise_to((0, 5))
    guard.raise_to((2, 3))  # a higher view, a lower seq: both kept at their highest
    assert VoteGuard(guard.path, owner="hm-1/node-2").load() == (2, 5)
    before = guard.path.read_bytes()
    guard.raise_to((1, 4))
    assert guard.path.read_bytes() == before
    with pytest.raises(VoteGuardError, match=r"belongs to hm-1/node-2 \(cluster/node\), not hm-1/node-3"):
        VoteGuard(guard.path, owner="hm-1/node-3").load()


@pytest.mark.parametrize("content", [b"{", b'{"owner": "hm-1/node-2", "view": -1, "seq": 0}',
                                     b'{"owner": "hm-1/node-2", "view": 0}', b'{"owner": "hm-1/node-2", "view": true, "seq": 1}',
                                     b" " * 5000])
def test_a_damaged_file_is_refused_with_its_name(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "vote-guard.json"
    path.write_bytes(content)
    with pytest.raises(VoteGuardError, match="vote-guard.json is damaged"):
        VoteGuard(path, owner="hm-1/node-2").load()


def _driver(manifest: Manifest, tmp_path: Path, send, metrics: NodeMetrics | None = None) -> ReplicaDriver:  # type: ignore[no-untyped-def]
    return ReplicaDriver(
        replica_config=ReplicaConfig(cluster_id=manifest.cluster_id), key=load_node_key(manifest, "node-1"),
        keyring=manifest.keyring(), params=manifest.validation_params(),
        kem_private_key=load_kem_private_key(manifest, "node-1"), store=Store(tmp_path / "node.db"),
        metrics=metrics or NodeMetrics(), send=send,
        vote_guard=VoteGuard(tmp_path / "vote-guard.json", owner=f"{manifest.cluster_id}/node-1"),
    )


def test_a_pre_prepare_leaves_only_once_the_guard_covers_it_and_an_emptied_store_is_noticed(tmp_path: Path) -> None:
    manifest = init_cluster(tmp_path / "cluster", InitOptions(nodes=4, signing_scheme="Ed25519"))
    guarded_at_send: list[tuple[int, int, int]] = []  # (seq proposed, guard view, guard seq)

    def send(_to: str | None, payload: bytes) -> None:
        msg = decode(payload)
        if msg.kind == "pre-prepare":
            on_file = json.loads((tmp_path / "vote-guard.json").read_bytes())
            guarded_at_send.append((msg.payload.seq, on_file["view"], on_file["seq"]))

    async def propose_one() -> None:
        driver = _driver(manifest, tmp_path, send)  # node-1 leads view 0
        # Not before the first pass: the records the constructor queued are not committed yet.
        assert not (tmp_path / "vote-guard.json").exists()
        await driver.start()
        try:
            request = parse_request("proofs", ProofFactory(manifest.validation_params()).proofs("req-guard"))
            driver.submit(request.request_id, request.digest, "proofs", request.encode())
            deadline = asyncio.get_running_loop().time() + 10
            while not guarded_at_send and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
        finally:
            await driver.stop()
            driver.store.close()

    asyncio.run(propose_one())
    assert guarded_at_send and all(guard_seq >= seq for seq, _, guard_seq in guarded_at_send), guarded_at_send

    for suffix in ("", "-wal", "-shm"):  # the store goes; the guard stays
        (tmp_path / f"node.db{suffix}").unlink(missing_ok=True)
    metrics = NodeMetrics()
    driver = _driver(manifest, tmp_path, lambda _to, _payload: None, metrics)
    try:
        assert driver.replica.vote_floor == (0, guarded_at_send[-1][2])
        driver._update_gauges()
        assert metrics.vote_floor._value.get() == guarded_at_send[-1][2]
    finally:
        driver.store.close()
