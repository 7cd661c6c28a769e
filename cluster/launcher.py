"""Run a local N-node cluster as real ``consensus-server`` processes on ``[::1]``.

Used by ``hypermesh up`` and by the integration tests (which also kill -9 and restart
single nodes through it).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .bootstrap import InitOptions, init_cluster
from .manifest import Manifest, ManifestError, load_manifest


@dataclass(slots=True)
class NodeProcess:
    node_id: str
    host: str
    port: int
    metrics_port: int
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass(slots=True)
class LocalCluster:
    directory: Path
    manifest: Manifest
    nodes: dict[str, NodeProcess] = field(default_factory=dict)
    extra_args: dict[str, list[str]] = field(default_factory=dict)
    common_args: list[str] = field(default_factory=list)

    @classmethod
    def prepare(
        cls,
        directory: Path,
        *,
        nodes: int = 4,
        base_port: int = 9292,
        metrics_base_port: int = 9464,
        fresh: bool = False,
        init_overrides: tuple[tuple[str, object], ...] = (),
        signing_scheme: str = "ML-DSA-65",
        progress: Callable[[str], None] = lambda _m: None,
    ) -> LocalCluster:
        """Create the cluster's keys once (kept across runs), or load the existing ones."""
        directory = directory.resolve()
        manifest: Manifest | None = None
        if (directory / "manifest.json").exists() and not fresh:
            manifest = load_manifest(directory)
            if manifest.n != nodes or manifest.nodes[0].port != base_port:
                raise ManifestError(
                    f"{directory} holds a {manifest.n}-node cluster on port {manifest.nodes[0].port}; "
                    f"use --fresh to replace it with {nodes} nodes on {base_port}, or another --dir"
                )
            progress(f"using the existing cluster {manifest.cluster_id} in {directory}")
        if manifest is None:
            if fresh and directory.exists():
                import shutil

                shutil.rmtree(directory)
            manifest = init_cluster(
                directory,
                InitOptions(nodes=nodes, base_port=base_port, validation_overrides=init_overrides,
                            signing_scheme=signing_scheme),
                progress,
            )
        cluster = cls(directory, manifest)
        for index, entry in enumerate(manifest.nodes):
            cluster.nodes[entry.node_id] = NodeProcess(
                entry.node_id, entry.host, entry.port,
                metrics_base_port + index if metrics_base_port else 0,
                directory / "data" / entry.node_id, directory / "logs" / f"{entry.node_id}.log",
            )
        return cluster

    def command(self, node_id: str) -> list[str]:
        node = self.nodes[node_id]
        return [
            sys.executable, "-m", "node.main",
            "--cluster", str(self.directory),
            "--node-id", node_id,
            "--data-dir", str(node.data_dir),
            "--bind", node.host,
            "--port", str(node.port),
            "--metrics-bind", "::1",
            "--metrics-port", str(node.metrics_port),
            "--max-datagram-size", "9000",  # loopback: large datagrams cut per-packet cost (FACTS.md)
            *self.common_args,
            *self.extra_args.get(node_id, []),
        ]

    def busy_ports(self) -> list[str]:
        """The ports the nodes need that something already holds (this cluster running
        in another terminal, say): checked before starting, so the nodes do not die one
        by one with "Address already in use" while that other cluster answers our
        health checks."""
        busy = []
        for node in self.nodes.values():
            needs = [("STOQ (UDP)", socket.SOCK_DGRAM, node.host, node.port)]
            if node.metrics_port:
                needs.append(("metrics (TCP)", socket.SOCK_STREAM, "::1", node.metrics_port))
            for what, kind, host, port in needs:
                with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, kind) as probe:
                    if kind == socket.SOCK_STREAM:
                        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the metrics server does
                    try:
                        probe.bind((host, port))
                    except OSError as exc:
                        busy.append(f"{node.node_id}'s {what} port {port}: {exc.strerror}")
        return busy

    def start_node(self, node_id: str) -> None:
        node = self.nodes[node_id]
        if node.running:
            return
        node.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(node.log_path, "ab")
        log.write(f"\n==== starting {node_id} at {time.strftime('%H:%M:%S')} ====\n".encode())
        log.flush()
        node.process = subprocess.Popen(
            self.command(node_id), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=Path(__file__).resolve().parent.parent, env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        log.close()

    def start(self) -> None:
        for node_id in self.nodes:
            self.start_node(node_id)

    def kill_node(self, node_id: str) -> None:
        """``kill -9``: no chance to flush or say goodbye."""
        node = self.nodes[node_id]
        if node.process is not None and node.process.poll() is None:
            node.process.kill()
            node.process.wait(timeout=10)

    def stop_node(self, node_id: str, timeout_s: float = 10.0) -> int | None:
        node = self.nodes[node_id]
        if node.process is None:
            return None
        if node.process.poll() is None:
            node.process.send_signal(signal.SIGTERM)
            try:
                node.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait(timeout=5)
        return node.process.returncode

    def stop(self) -> None:
        for node_id in self.nodes:
            node = self.nodes[node_id]
            if node.running:
                node.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        deadline = time.monotonic() + 10
        for node_id in self.nodes:
            node = self.nodes[node_id]
            if node.process is None:
                continue
            try:
                node.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait(timeout=5)

    def log_tail(self, node_id: str, lines: int = 40) -> str:
        try:
            return "\n".join(self.nodes[node_id].log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def wait_healthy(
        self, node_ids: list[str] | None = None, timeout_s: float = 60.0, progress: Callable[[str], None] = lambda _m: None
    ) -> None:
        """Wait until every node answers ``consensus/health`` (and has not exited)."""
        from .client import ClusterClient

        pending = set(node_ids or self.nodes)
        deadline = time.monotonic() + timeout_s
        async with ClusterClient.from_manifest(self.manifest, timeout_s=2.0, retries=0) as client:
            while pending:
                for node_id in sorted(pending):
                    node = self.nodes[node_id]
                    if node.process is not None and node.process.poll() is not None:
                        raise RuntimeError(
                            f"{node_id} exited with code {node.process.returncode}; log {node.log_path}:\n"
                            + self.log_tail(node_id)
                        )
                    try:
                        health = await client.health(node_id)
                    except Exception:
                        continue
                    if health.get("status") == "healthy":
                        pending.discard(node_id)
                        progress(f"{node_id} is healthy on {self.manifest.node(node_id).endpoint}")
                if not pending:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"nodes not healthy after {timeout_s:.0f}s: {', '.join(sorted(pending))}")
                await asyncio.sleep(0.2)
