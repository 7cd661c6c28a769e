"""One ``consensus-server`` with no cluster directory: the README's single-node mode."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from cluster.client import ClusterClient
from cluster.manifest import load_manifest
from cluster.workload import ProofFactory, expected_reason
from transport.envelope import ApiError, ErrorCode

from .conftest import free_tcp_port, free_udp_ports, wait_until

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def start_server(data_dir: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    log = open(data_dir.parent / f"server-{port}.log", "ab")
    metrics = [] if "--metrics-port" in extra else ["--metrics-port", "0"]
    return subprocess.Popen(
        [sys.executable, "-m", "node.main", "--data-dir", str(data_dir), "--bind", "::1", "--port", str(port),
         *metrics, *extra],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
    )


async def healthy(cluster_dir: Path) -> bool:
    async with ClusterClient.from_manifest(cluster_dir, timeout_s=2.0, retries=0) as client:
        return (await client.health())["status"] == "healthy"


@pytest.fixture
def server(tmp_path: Path):  # type: ignore[no-untyped-def]
    port = free_udp_ports(1)
    data_dir = tmp_path / "data"
    spans = tmp_path / "spans.jsonl"
    metrics_port = free_tcp_port()
    procs = [start_server(data_dir, port, "--cache", "--trace", str(spans), "--metrics-bind", "::1",
                          "--metrics-port", str(metrics_port))]
    cluster_dir = data_dir / "cluster"

    async def ready() -> bool:
        return (cluster_dir / "manifest.json").exists() and await healthy(cluster_dir)

    asyncio.run(wait_until(ready, 30, "the single node to become healthy"))
    yield {"port": port, "data_dir": data_dir, "cluster_dir": cluster_dir, "procs": procs, "spans": spans,
           "metrics_port": metrics_port}
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=15)


def test_single_node_validates_every_kind_of_request(server) -> None:  # type: ignore[no-untyped-def]
    manifest = load_manifest(server["cluster_dir"])
    factory = ProofFactory(manifest.validation_params())
    faults = [("work", "nonce"), ("stake", "signature"), ("time", "future"), ("space", "path")]

    async def run() -> None:
        async with ClusterClient(manifest, timeout_s=20) as client:
            health = await client.health()
            assert health["node_id"] == "hypermesh-consensus-1"
            assert health["crypto"]["backend"] in ("pyca+pqclean", "liboqs")

            valid_payload = factory.proofs()
            valid = await client.validate_proofs(valid_payload)
            assert valid["status"] == "Valid" and valid["reasons"] == []
            assert valid["metrics"]["confidence_level"] == 1.0 and valid["metrics"]["validator_nodes"] == 1

            for fault in faults:
                result = await client.validate_proofs(factory.proofs(fault=fault))
                assert result["status"] == "Invalid", fault
                assert [r["code"] for r in result["reasons"]] == [expected_reason(fault)]

            cert = await client.validate_certificate(factory.certificate("api.example.com"))
            assert cert["status"] == "Valid"
            bad_cert = await client.validate_certificate(factory.certificate(fault=("csr", "name")))
            assert bad_cert["status"] == "Invalid"
            assert "csr.name_mismatch" in [r["code"] for r in bad_cert["reasons"]]

            status = await client.validation_status(valid["request_id"])
            assert status["status"] == "Valid" and status["result"] == valid["result"]

            with pytest.raises(ApiError) as missing:
                await client.validation_status("no-such-request")
            assert missing.value.code == ErrorCode.NotFound

            with pytest.raises(ApiError) as bad:
                await client.call("consensus/validate_proofs", {"request_id": "x", "proofs": {"work": 7}})
            assert bad.value.code == ErrorCode.InvalidRequest and "proofs" in bad.value.message

            # A time proof older than half the de-dup window (5 min here) is refused as
            # expired, not executed, and not left Pending.
            stale = factory.proofs(timestamp_ms=int(time.time() * 1000) - 6 * 60 * 1000)
            with pytest.raises(ApiError) as expired:
                await client.validate_proofs(stale)
            assert expired.value.code == ErrorCode.InvalidRequest and "expired" in expired.value.message
            with pytest.raises(ApiError) as gone:
                await client.validation_status(stale["request_id"])
            assert gone.value.code == ErrorCode.NotFound, gone.value

            with pytest.raises(ApiError) as unknown:
                await client.call("consensus/nothing_here", {})
            assert unknown.value.code == ErrorCode.NotFound

            # --trace: one OpenTelemetry span per validation, carrying the request id and outcome.
            async def span_written() -> bool:
                text = server["spans"].read_text() if server["spans"].exists() else ""
                return valid["request_id"] in text and '"hypermesh.status": "Valid"' in text

            await wait_until(span_written, 10, "the validation span in the --trace file")

            # The same request again is a cache hit (--cache), answered with the same result.
            again = await client.call("consensus/validate_proofs", valid_payload)
            assert again["result"] == valid["result"]

    asyncio.run(run())

    # Prometheus: validations by status, cache hits and misses, errors by code.
    text = urllib.request.urlopen(f"http://[::1]:{server['metrics_port']}/metrics", timeout=10).read().decode()
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("hypermesh_")}
    assert samples['hypermesh_validations_total{kind="proofs",status="Valid"}'] >= 1
    assert samples['hypermesh_validations_total{kind="proofs",status="Invalid"}'] == len(faults)
    assert samples["hypermesh_cache_hits_total"] >= 1 and samples["hypermesh_cache_misses_total"] >= 1
    assert samples['hypermesh_errors_total{code="InvalidRequest"}'] >= 1
    assert samples['hypermesh_errors_total{code="NotFound"}'] >= 1
    assert samples['hypermesh_validation_latency_seconds_count{kind="proofs"}'] >= 1
    assert samples["hypermesh_event_loop_lag_seconds_count"] >= 1  # the tick observes it
    assert samples["hypermesh_peer_links_needed"] == 0 and samples["hypermesh_peer_links_up"] == 0  # n = 1, f = 0
    # Every metric an alert uses exists (a renamed metric would silence its alert).
    def family(name: str) -> str:
        return re.sub(r"_(total|bucket|count|sum)$", "", name)

    families = {family(line.split()[2]) for line in text.splitlines() if line.startswith("# TYPE ")}
    used = {family(name) for name in re.findall(r"\bhypermesh_[a-z_]+", (ROOT / "ops" / "alerts.yml").read_text())}
    assert used and used <= families, sorted(used - families)


def test_results_survive_kill_9_and_restart(server) -> None:  # type: ignore[no-untyped-def]
    manifest = load_manifest(server["cluster_dir"])
    factory = ProofFactory(manifest.validation_params())

    async def validate(count: int) -> list[dict]:
        async with ClusterClient(manifest, timeout_s=20) as client:
            return [await client.validate_proofs(factory.proofs()) for _ in range(count)]

    before = asyncio.run(validate(5))
    proc = server["procs"][0]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)

    server["procs"].append(start_server(server["data_dir"], server["port"]))
    asyncio.run(wait_until(lambda: healthy(server["cluster_dir"]), 30, "the restarted node"))

    async def check() -> None:
        async with ClusterClient(manifest, timeout_s=20) as client:
            for result in before:
                again = await client.validation_status(result["request_id"])
                assert again["status"] == result["status"] and again["result"] == result["result"]
            # The node keeps ordering new requests after the restart, with later sequence numbers.
            fresh = await client.validate_proofs(factory.proofs())
            assert fresh["status"] == "Valid"
            assert fresh["metrics"]["seq"] > max(r["metrics"]["seq"] for r in before)

    asyncio.run(check())


def test_overload_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    """With --max-validations 1 and a quorum that cannot be reached, the second
    concurrent validation is refused with Overloaded instead of being queued."""
    from cluster.bootstrap import InitOptions, init_cluster

    base = free_udp_ports(4)
    manifest = init_cluster(tmp_path / "c", InitOptions(nodes=4, base_port=base))
    # Only node-1 runs: nothing can reach a quorum, so validations stay in flight.
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.main", "--cluster", str(manifest.directory), "--node-id", "node-1",
         "--data-dir", str(tmp_path / "d"), "--bind", "::1", "--port", str(base), "--metrics-port", "0",
         "--max-validations", "1", "--request-timeout", "5"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
    )
    factory = ProofFactory(manifest.validation_params())

    async def run() -> None:
        async with ClusterClient(manifest, endpoints=[manifest.nodes[0]], timeout_s=10, retries=0) as client:
            await wait_until(lambda: client.call_node("node-1", "consensus/health"), 30, "node-1")
            first = asyncio.ensure_future(client.call_node("node-1", "consensus/validate_proofs", factory.proofs()))

            async def in_flight() -> bool:
                status = await client.call_node("node-1", "cluster/status")
                return status["in_flight"] == 1

            await wait_until(in_flight, 10, "the first validation to be in flight")
            with pytest.raises(ApiError) as refused:
                await client.call_node("node-1", "consensus/validate_proofs", factory.proofs())
            assert refused.value.code == ErrorCode.Overloaded
            assert "--max-validations" in refused.value.message
            pending = await first
            assert pending["status"] == "Pending"  # accepted, answered after --request-timeout

    try:
        asyncio.run(run())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)


def test_command_line_help_and_version() -> None:
    for argv, must_contain in (
        (["-m", "node.main", "--help"], "--max-validations"),
        (["-m", "node.main", "-V"], "consensus-server 0.1.0"),
        (["-m", "cluster.cli", "--help"], "cluster"),
        (["-m", "cluster.cli", "cluster", "init", "--help"], "--address-template"),
        (["-m", "cluster.cli", "up", "--help"], "Ctrl-C"),
    ):
        out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert out.returncode == 0, out.stderr
        assert must_contain in out.stdout, (argv, out.stdout)

    bad = subprocess.run([sys.executable, "-m", "node.main", "--max-validations", "0"], capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    assert bad.returncode != 0 and "--max-validations" in bad.stderr
    started = time.monotonic()
    no_cluster = subprocess.run(
        [sys.executable, "-m", "node.main", "--cluster", "/nonexistent/cluster", "--node-id", "node-1"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )
    assert no_cluster.returncode == 2 and "hypermesh cluster init" in no_cluster.stderr
    assert time.monotonic() - started < 60


def test_cluster_node_listens_on_its_manifest_port_by_default(tmp_path: Path) -> None:
    """``consensus-server --cluster DIR --node-id node-2`` with no --port must listen where
    the manifest says node-2 is, since that is where peers and clients dial it."""
    from cluster.bootstrap import InitOptions, init_cluster

    base = free_udp_ports(4)
    cluster_dir = tmp_path / "cluster"
    init_cluster(cluster_dir, InitOptions(nodes=4, base_port=base, address_template="[::1]:{port}"), lambda m: None)
    log = open(tmp_path / "node-2.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.main", "--cluster", str(cluster_dir), "--node-id", "node-2", "--bind", "::1",
         "--data-dir", str(tmp_path / "data"), "--metrics-port", "0"],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
    )
    try:
        async def node_2_health() -> bool:
            async with ClusterClient.from_manifest(cluster_dir, timeout_s=2.0, retries=0) as client:
                return bool((await client.health("node-2"))["node_id"] == "node-2")

        asyncio.run(wait_until(node_2_health, timeout_s=30, what="node-2 healthy on its manifest port"))
        assert load_manifest(cluster_dir).node("node-2").port == base + 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_sigterm_answers_a_waiting_validation_pending_then_exits_cleanly(tmp_path: Path) -> None:
    """Graceful shutdown with a validation that cannot become final (no quorum): after
    --shutdown-grace the client is answered Pending (the request is durable) rather than
    cut off, and the process exits 0."""
    from cluster.bootstrap import InitOptions, init_cluster

    base = free_udp_ports(4)
    manifest = init_cluster(tmp_path / "c", InitOptions(nodes=4, base_port=base))
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.main", "--cluster", str(manifest.directory), "--node-id", "node-1",
         "--data-dir", str(tmp_path / "d"), "--bind", "::1", "--port", str(base), "--metrics-port", "0",
         "--shutdown-grace", "0.5"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    factory = ProofFactory(manifest.validation_params())

    async def run() -> dict[str, Any]:
        async with ClusterClient(manifest, endpoints=[manifest.nodes[0]], timeout_s=20, retries=0) as client:
            await wait_until(lambda: client.call_node("node-1", "consensus/health"), 30, "node-1")
            waiting = asyncio.ensure_future(client.call_node("node-1", "consensus/validate_proofs", factory.proofs()))

            async def in_flight() -> bool:
                return (await client.call_node("node-1", "cluster/status"))["in_flight"] == 1

            await wait_until(in_flight, 10, "the validation to be in flight")
            proc.send_signal(signal.SIGTERM)
            return await asyncio.wait_for(waiting, 15)

    try:
        answer = asyncio.run(run())
        assert answer["status"] == "Pending"
        assert proc.wait(timeout=15) == 0
        assert "answered Pending" in (proc.stderr.read() if proc.stderr else "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_a_busy_port_is_named_in_the_start_up_error(tmp_path: Path) -> None:
    import socket

    port = free_udp_ports(1)
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as taken:
        taken.bind(("::1", port))
        out = subprocess.run(
            [sys.executable, "-m", "node.main", "--data-dir", str(tmp_path / "n"), "--bind", "::1", "--port", str(port)],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )
    assert out.returncode == 2
    assert f"cannot start: [Errno 98] STOQ port (UDP) [::1]:{port}: Address already in use" in out.stderr, out.stderr
