"""A real one-validator ReplicaDriver whose peer sends fail: the rest of each pass
(final results, answers) must still happen."""

from __future__ import annotations

import asyncio
from pathlib import Path

from cluster.bootstrap import InitOptions, init_cluster
from cluster.manifest import load_kem_private_key, load_node_key
from cluster.workload import ProofFactory
from consensus.replica import ReplicaConfig
from consensus.requests import parse_request
from node.metrics import NodeMetrics
from node.runtime import ReplicaDriver
from node.store import Store


def test_a_message_the_mesh_refuses_does_not_drop_the_rest_of_the_pass(tmp_path: Path) -> None:
    manifest = init_cluster(tmp_path / "cluster", InitOptions(nodes=1, signing_scheme="Ed25519"))
    refused: list[int] = []

    def send(_to: str | None, payload: bytes) -> None:
        refused.append(len(payload))
        raise ValueError(f"frame of {len(payload)} bytes exceeds the limit of 0")

    async def body() -> None:
        store = Store(tmp_path / "node.db")
        driver = ReplicaDriver(
            replica_config=ReplicaConfig(cluster_id=manifest.cluster_id), key=load_node_key(manifest, "node-1"),
            keyring=manifest.keyring(), params=manifest.validation_params(),
            kem_private_key=load_kem_private_key(manifest, "node-1"), store=store, metrics=NodeMetrics(), send=send,
        )
        await driver.start()
        try:
            payload = ProofFactory(manifest.validation_params()).proofs("req-send")
            request = parse_request("proofs", payload)
            future = driver.submit(request.request_id, request.digest, "proofs", request.encode())
            result = await asyncio.wait_for(future, 30)
            assert result.request_id == "req-send" and result.status == "Valid"
        finally:
            await driver.stop()
            store.close()

    asyncio.run(body())
    assert refused  # the pre-prepare and the result vote were offered to the mesh, and refused


def test_the_evidence_metric_exists_at_zero_for_every_validator(tmp_path: Path) -> None:
    """``increase(hypermesh_byzantine_evidence_total[5m])`` cannot see a series that
    appears with its first offence already counted: every validator's series starts at 0."""
    manifest = init_cluster(tmp_path / "cluster", InitOptions(nodes=4, signing_scheme="Ed25519"))
    store = Store(tmp_path / "node.db")
    metrics = NodeMetrics()
    try:
        ReplicaDriver(
            replica_config=ReplicaConfig(cluster_id=manifest.cluster_id), key=load_node_key(manifest, "node-1"),
            keyring=manifest.keyring(), params=manifest.validation_params(),
            kem_private_key=load_kem_private_key(manifest, "node-1"), store=store, metrics=metrics,
            send=lambda to, payload: None,
        )
        for node_id in manifest.keyring().node_ids:
            for kind in ("equivocation", "wrong-result"):
                labels = {"accused": node_id, "kind": kind}
                assert metrics.registry.get_sample_value("hypermesh_byzantine_evidence_total", labels) == 0.0, labels
    finally:
        store.close()


def test_a_stepped_wall_clock_moves_agreed_times_but_not_timers(tmp_path: Path, monkeypatch) -> None:
    """A wall clock stepped back an hour (NTP, an operator) stalled every replica timer
    for that hour, and a step forward fired them all at once. The driver's timers now run
    on a steady clock; agreed times follow the wall clock, and the step is counted."""
    import time as time_module

    from node.runtime import SteadyClock

    manifest = init_cluster(tmp_path / "cluster", InitOptions(nodes=1, signing_scheme="Ed25519"))
    clock = SteadyClock()
    before = clock.now_ms()
    real_time_ns, real_time = time_module.time_ns, time_module.time
    hour_ns = 3_600 * 10**9
    monkeypatch.setattr(time_module, "time_ns", lambda: real_time_ns() - hour_ns)
    monkeypatch.setattr(time_module, "time", lambda: real_time() - 3_600)
    after = clock.now_ms()
    assert 0 <= after - before < 60_000  # the steady clock did not step back
    assert abs(clock.wall_offset_ms(after) + 3_600_000) < 60_000

    async def body() -> None:
        store = Store(tmp_path / "node.db")
        metrics = NodeMetrics()
        driver = ReplicaDriver(
            replica_config=ReplicaConfig(cluster_id=manifest.cluster_id), key=load_node_key(manifest, "node-1"),
            keyring=manifest.keyring(), params=manifest.validation_params(),
            kem_private_key=load_kem_private_key(manifest, "node-1"), store=store, metrics=metrics,
            send=lambda to, payload: None,
        )
        await driver.start()
        try:
            # The driver started an hour "ago" by the wall clock; now it is stepped forward.
            monkeypatch.setattr(time_module, "time_ns", real_time_ns)
            monkeypatch.setattr(time_module, "time", real_time)
            payload = ProofFactory(manifest.validation_params()).proofs("req-step")
            request = parse_request("proofs", payload)
            result = await asyncio.wait_for(driver.submit(request.request_id, request.digest, "proofs", request.encode()), 30)
            assert result.status == "Valid"  # proofs made at the new wall time check against it
            assert metrics.registry.get_sample_value("hypermesh_wall_clock_steps_total") == 1.0
            assert abs(driver._wall_offset_ms - 3_600_000) < 60_000
        finally:
            await driver.stop()
            store.close()

    asyncio.run(body())
