"""Real ``consensus-server`` processes on [::1], real QUIC, real SQLite files."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.client import ClusterClient
from cluster.launcher import LocalCluster
from cluster.workload import ProofFactory

pytestmark = pytest.mark.integration


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def free_udp_ports(count: int) -> int:
    """A base port such that base..base+count-1 are all free UDP ports on [::1].

    Chosen BELOW the kernel's ephemeral range: a node that is killed and restarted must
    get its port back, and a port in the ephemeral range can meanwhile be handed to any
    client socket (the survivors' reconnect attempts, the test's clients) — the restart
    then fails with "Address already in use"."""
    lo, _ = _ephemeral_range()
    top = min(lo, 65000) - count
    rng = random.Random()  # only picks where to start looking; any free run will do
    for _ in range(200):
        base = rng.randrange(10000, max(top, 10001))
        sockets = []
        try:
            for port in range(base, base + count):
                s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
                sockets.append(s)
                s.bind(("::1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no run of free UDP ports found on [::1]")


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
        probe.bind(("::1", 0))
        return probe.getsockname()[1]


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        try:
            if await predicate():
                return
        except Exception as exc:  # noqa: BLE001 - a node that is still starting answers with errors
            last_error = exc
        if time.monotonic() > deadline:
            why = f" (last error: {last_error!r})" if last_error is not None else ""
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}{why}")
        await asyncio.sleep(0.1)


class RunningCluster:
    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.manifest = cluster.manifest
        self.factory = ProofFactory(cluster.manifest.validation_params())

    def client(self, **kwargs: Any) -> ClusterClient:
        kwargs.setdefault("timeout_s", 20.0)
        return ClusterClient(self.manifest, **kwargs)

    def start(self, timeout_s: float = 60.0) -> None:
        self.cluster.start()
        asyncio.run(self.cluster.wait_healthy(timeout_s=timeout_s))

    def diagnostics(self) -> str:
        return "\n\n".join(f"--- {n} ---\n{self.cluster.log_tail(n, 30)}" for n in self.cluster.nodes)


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., RunningCluster]]:
    """Start a local cluster; always stopped, and its logs printed if the test failed."""
    started: list[RunningCluster] = []

    def make(nodes: int = 4, extra_args: dict[str, list[str]] | None = None,
             common_args: list[str] | None = None, start: bool = True) -> RunningCluster:
        cluster = LocalCluster.prepare(
            tmp_path / f"cluster{len(started)}", nodes=nodes, base_port=free_udp_ports(nodes), metrics_base_port=0
        )
        cluster.common_args = ["--vote-grace-ms", "50", *(common_args or [])]
        cluster.extra_args = extra_args or {}
        running = RunningCluster(cluster)
        started.append(running)
        if start:
            running.start()
        return running

    yield make
    for running in started:
        running.cluster.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        make = item.funcargs.get("make_cluster") if hasattr(item, "funcargs") else None
        # Node logs are the first thing a person needs when a cluster test fails.
        cells = getattr(make, "__closure__", None) or ()
        for cell in cells:
            value = cell.cell_contents
            if isinstance(value, list):
                for running in value:
                    if isinstance(running, RunningCluster):
                        report.sections.append(("cluster logs", running.diagnostics()))
