"""A 4-node cluster of real processes on [::1]: load, leader crash, restart, recovery."""

from __future__ import annotations

import asyncio
import random
import re
import sqlite3
from typing import Any

import pytest

from cluster.client import ClusterClient

from .conftest import RunningCluster, wait_until

pytestmark = pytest.mark.integration


async def submit_all(running: RunningCluster, payloads: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """Send each request to a random node (followers forward to the leader)."""
    rng = random.Random(seed)
    clients = {e.node_id: ClusterClient(running.manifest, endpoints=[e], timeout_s=30) for e in running.manifest.nodes}
    try:
        async def one(payload: dict[str, Any]) -> dict[str, Any]:
            client = clients[rng.choice(sorted(clients))]
            return await client.validate_proofs(payload, wait_s=60)

        return list(await asyncio.gather(*(one(p) for p in payloads)))
    finally:
        for client in clients.values():
            await client.close()


async def results_on_every_node(running: RunningCluster, request_ids: list[str], nodes: list[str],
                                timeout_s: float = 30) -> None:
    """Every node stores the same certified result for every request. A node may still be
    fetching a result it learnt of late (it answers Pending): wait for it, bounded."""
    async with running.client() as client:
        for request_id in request_ids:
            seen = set()
            for node_id in nodes:
                answer: dict[str, Any] = {}

                async def final(node_id: str = node_id, request_id: str = request_id) -> bool:
                    answer.update(await client.validation_status(request_id, node_id=node_id))  # verifies the certificate
                    return answer["status"] != "Pending"

                await wait_until(final, timeout_s, f"{node_id} to hold the result of {request_id}")
                seen.add((answer["status"], answer["result"], answer["metrics"]["seq"]))
            assert len(seen) == 1, f"{request_id}: nodes disagree: {seen}"


def test_four_nodes_agree_under_concurrent_load(make_cluster) -> None:  # type: ignore[no-untyped-def]
    running = make_cluster(4)
    factory = running.factory
    payloads = [factory.proofs() for _ in range(30)] + [factory.proofs(fault=("stake", "signature")) for _ in range(5)]

    results = asyncio.run(submit_all(running, payloads, seed=1))
    by_id = {r["request_id"]: r for r in results}
    assert len(by_id) == len(payloads)
    for payload in payloads[:30]:
        result = by_id[payload["request_id"]]
        assert result["status"] == "Valid"
        assert result["metrics"]["validator_nodes"] >= 3 and result["metrics"]["total_validators"] == 4
    for payload in payloads[30:]:
        assert by_id[payload["request_id"]]["status"] == "Invalid"
    # Batching: 35 concurrent requests need fewer consensus rounds than requests.
    assert len({r["metrics"]["seq"] for r in results}) < len(payloads)
    asyncio.run(results_on_every_node(running, list(by_id)[:10], [e.node_id for e in running.manifest.nodes]))

    # A retried request is answered from the ordered result, not executed twice.
    async def retry() -> None:
        async with running.client() as client:
            again = await client.validate_proofs(payloads[0])
            assert again["result"] == by_id[payloads[0]["request_id"]]["result"]
            assert again["metrics"]["seq"] == by_id[payloads[0]["request_id"]]["metrics"]["seq"]

    asyncio.run(retry())


def test_leader_kill_9_then_new_view_and_catch_up(make_cluster) -> None:  # type: ignore[no-untyped-def]
    running = make_cluster(4, common_args=["--view-change-timeout-ms", "1000", "--checkpoint-interval", "4"])
    factory = running.factory
    first = asyncio.run(submit_all(running, [factory.proofs() for _ in range(10)], seed=2))
    assert all(r["status"] == "Valid" for r in first)
    old_leader = first[0]["leader"]

    running.cluster.kill_node(old_leader)
    survivors = [e.node_id for e in running.manifest.nodes if e.node_id != old_leader]

    async def survivors_only() -> list[dict[str, Any]]:
        entries = [e for e in running.manifest.nodes if e.node_id != old_leader]
        rng = random.Random(3)
        clients = [ClusterClient(running.manifest, endpoints=[e], timeout_s=40) for e in entries]
        try:
            return list(await asyncio.gather(*(
                rng.choice(clients).validate_proofs(factory.proofs(), wait_s=90) for _ in range(20)
            )))
        finally:
            for c in clients:
                await c.close()

    second = asyncio.run(survivors_only())
    assert all(r["status"] == "Valid" for r in second)
    assert {r["leader"] for r in second} - {old_leader}, "a new leader should have been chosen"
    asyncio.run(results_on_every_node(running, [r["request_id"] for r in second[:5]], survivors))

    # Exactly once: no two requests share a (seq, index) slot, and ids are unique.
    slots = [(r["metrics"]["seq"], r["certificate"]["index"]) for r in first + second]
    assert len(slots) == len(set(slots))

    running.cluster.start_node(old_leader)

    async def caught_up() -> bool:
        async with running.client() as client:
            statuses = await client.status()
            seqs = {s["node_id"]: s.get("last_executed_seq", -1) for s in statuses if s.get("reachable")}
            return old_leader in seqs and seqs[old_leader] >= max(seqs[n] for n in survivors)

    asyncio.run(wait_until(caught_up, 60, f"{old_leader} to catch up after restart"))
    asyncio.run(results_on_every_node(running, [r["request_id"] for r in second[-3:]], [old_leader, survivors[0]]))


def test_accepted_request_survives_a_crash_before_quorum(make_cluster) -> None:  # type: ignore[no-untyped-def]
    """node-1 accepts a request while no quorum exists, is killed -9, and after the
    cluster comes back the request is still ordered: nothing acknowledged is lost."""
    running = make_cluster(4, common_args=["--request-timeout", "2"])
    for node_id in ("node-3", "node-4"):
        running.cluster.stop_node(node_id)
    payload = running.factory.proofs()

    async def accept() -> dict[str, Any]:
        async with ClusterClient(running.manifest, endpoints=[running.manifest.nodes[0]], timeout_s=20) as client:
            return await client.call_node("node-1", "consensus/validate_proofs", payload)

    accepted = asyncio.run(accept())
    assert accepted["status"] == "Pending"
    running.cluster.kill_node("node-1")
    running.cluster.kill_node("node-2")
    running.start()

    async def final() -> dict[str, Any]:
        async with running.client() as client:
            return await client.wait_final(payload["request_id"], timeout_s=60)

    result = asyncio.run(final())
    assert result["status"] == "Valid"


def test_a_node_that_missed_a_final_result_fetches_it_from_peers(make_cluster) -> None:  # type: ignore[no-untyped-def]
    """node-4 accepted a request but was away when it became final (simulated by
    rewriting its database while it is stopped): after restart it must not say Pending
    for ever — it adopts the certified result from a peer, after checking it."""
    import sqlite3

    running = make_cluster(4)
    payload = running.factory.proofs()
    first = asyncio.run(submit_all(running, [payload], seed=5))[0]
    request_id = payload["request_id"]
    running.cluster.stop_node("node-4")
    db = sqlite3.connect(running.cluster.nodes["node-4"].data_dir / "node.db")
    with db:
        db.execute("DELETE FROM results WHERE request_id = ?", (request_id,))
        db.execute("INSERT INTO pending VALUES (?, ?, 'proofs', x'', 0)", (request_id, first["request_digest"]))
    db.close()
    running.cluster.start_node("node-4")
    asyncio.run(running.cluster.wait_healthy(["node-4"], timeout_s=60))

    async def repaired() -> bool:
        async with running.client() as client:
            status = await client.validation_status(request_id, node_id="node-4")  # verified by the client too
            return status["status"] == "Valid" and status["result"] == first["result"]

    asyncio.run(wait_until(repaired, 60, "node-4 to adopt the certified result"))


def test_healthy_cluster_reports_every_agreeing_validator(make_cluster) -> None:  # type: ignore[no-untyped-def]
    """The answer waits (up to --vote-grace-ms) for the votes past the 2f+1 quorum, so a
    healthy cluster reports confidence 1.0 with all four signers, through any node."""
    running = make_cluster(4, common_args=["--vote-grace-ms", "10000"])

    async def calls() -> list[dict[str, Any]]:
        results = []
        for endpoint in running.manifest.nodes:
            async with running.client(endpoints=[endpoint]) as client:
                results.append(await client.validate_proofs(running.factory.proofs(), wait_s=30))
        return results

    for result in asyncio.run(calls()):
        assert result["status"] == "Valid"
        assert result["metrics"]["validator_nodes"] == 4, (result["leader"], result["metrics"])
        assert result["metrics"]["confidence_level"] == 1.0


def test_a_node_that_caught_up_by_state_transfer_answers_for_requests_it_skipped(make_cluster) -> None:  # type: ignore[no-untyped-def]
    """node-4 is down while 100 batches execute: it comes back through a snapshot, and
    the first batches' results are older than what peers keep in memory (64 batches),
    so the replicas' own result fetch cannot get them. It knew those requests were
    executed but held no result, and answered Pending for them forever; now it fetches
    the certified result from a peer's store, checks it and keeps it."""
    running = make_cluster(4, common_args=["--checkpoint-interval", "16"])
    running.cluster.stop_node("node-4")

    async def load() -> list[str]:
        ids = []
        async with running.client() as client:
            for _ in range(100):  # one at a time: one batch each
                payload = running.factory.proofs()
                await client.validate_proofs(payload, wait_s=30)
                ids.append(payload["request_id"])
        return ids

    ids = asyncio.run(load())
    running.cluster.start_node("node-4")
    asyncio.run(running.cluster.wait_healthy(["node-4"], timeout_s=60))

    async def caught_up() -> bool:
        async with running.client() as client:
            health = await client.call_node("node-4", "consensus/health")
        return health["last_executed_seq"] >= 100

    asyncio.run(wait_until(caught_up, 60, "node-4 to catch up"))
    assert "state transfer" in running.cluster.log_tail("node-4", 200)

    async def status_of_first() -> dict[str, Any]:
        async with running.client() as client:
            return await client.validation_status(ids[0], node_id="node-4")  # verified by the client

    status = asyncio.run(status_of_first())
    assert status["status"] == "Valid", status
    with sqlite3.connect(running.cluster.nodes["node-4"].data_dir / "node.db") as db:  # kept, not fetched again
        assert db.execute("SELECT COUNT(*) FROM results WHERE request_id = ?", (ids[0],)).fetchone()[0] == 1


def test_a_validator_restored_from_an_old_backup_withholds_its_votes_then_rejoins(make_cluster) -> None:  # type: ignore[no-untyped-def]
    """node-3's node.db is replaced by a backup taken 14 batches earlier. Its vote guard
    (vote-guard.json, kept) says it signed more than the store remembers: it must not
    vote on those slots again (it could contradict itself), the other three carry on, and
    once their stable checkpoint passes what it had signed it votes again. No evidence
    against it anywhere."""
    running = make_cluster(4, common_args=["--checkpoint-interval", "4"])
    node3 = running.cluster.nodes["node-3"]

    async def load(count: int) -> list[str]:
        ids = []
        async with running.client() as client:
            for _ in range(count):  # one at a time: one batch each
                payload = running.factory.proofs()
                answer = await client.validate_proofs(payload, wait_s=30)
                assert answer["status"] == "Valid", answer
                ids.append(payload["request_id"])
        return ids

    async def replica_status(node_id: str) -> dict[str, Any]:
        async with running.client() as client:
            return (await client.call_node(node_id, "cluster/status"))["replica"]

    ids = asyncio.run(load(5))
    backup = node3.data_dir.parent / "node-3-backup.db"
    with sqlite3.connect(node3.data_dir / "node.db") as live, sqlite3.connect(backup) as copy:
        live.backup(copy)
    ids += asyncio.run(load(14))  # seq 19: the next checkpoint (20) needs more load
    signed = asyncio.run(replica_status("node-3"))
    running.cluster.stop_node("node-3")
    for suffix in ("", "-wal", "-shm"):
        (node3.data_dir / f"node.db{suffix}").unlink(missing_ok=True)
    backup.rename(node3.data_dir / "node.db")
    assert (node3.data_dir / "vote-guard.json").exists()

    running.cluster.start_node("node-3")
    asyncio.run(running.cluster.wait_healthy(["node-3"], timeout_s=60))
    restarted = asyncio.run(replica_status("node-3"))
    assert restarted["counters"].get("vote_floor_set") == 1, restarted
    found = re.search(r"once signed votes up to view (\d+), seq (\d+)", running.cluster.log_tail("node-3", 200))
    assert found is not None
    floor = {"view": int(found.group(1)), "seq": int(found.group(2))}
    assert floor["seq"] >= signed["last_executed_seq"], (floor, signed)
    assert restarted["vote_floor"] in (floor, None)  # None only if it caught up past it already

    ids += asyncio.run(load(floor["seq"] + 8 - len(ids)))  # the others go on, past the floor

    async def lifted() -> bool:
        status = await replica_status("node-3")
        return status["vote_floor"] is None and status["stable_checkpoint_seq"] >= floor["seq"]

    asyncio.run(wait_until(lifted, 60, "node-3 to vote again"))
    asyncio.run(results_on_every_node(running, ids[-3:], ["node-1", "node-2", "node-3", "node-4"]))

    async def evidence_anywhere() -> list[Any]:
        async with running.client() as client:
            return [e for n in ("node-1", "node-2", "node-4") for e in (await client.evidence(node_id=n))["evidence"]]

    assert asyncio.run(evidence_anywhere()) == []
