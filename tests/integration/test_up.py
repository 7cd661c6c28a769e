"""``hypermesh up`` (the README's run command) as a user runs it: a real process that
starts a 4-node cluster, restarts a node that dies (or, with --restart no, keeps serving
without it), leaves down a node stopped on purpose, and stops on Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from cluster.client import ClusterClient
from cluster.manifest import load_manifest
from cluster.workload import ProofFactory
from tests.integration.conftest import free_udp_ports, wait_until

ROOT = Path(__file__).resolve().parents[2]


class _Lines:
    """Collects a process's stdout lines on a thread, so waits can have deadlines."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(text in line for line in self.lines):
            assert time.monotonic() < deadline, f"no {text!r} within {timeout_s}s; output:\n{''.join(self.lines)}"
            time.sleep(0.1)


def _children(pid: int) -> dict[str, int]:
    """node id -> pid of the consensus-server processes the launcher started."""
    out: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"--node-id" in args:
            out[args[args.index(b"--node-id") + 1].decode()] = int(entry.name)
    return out


def _start_up(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[str], _Lines, Path]:
    base = free_udp_ports(4)
    directory = tmp_path / "cluster"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "up", "--dir", str(directory), "--base-port", str(base),
         "--metrics-base-port", "0", *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    out = _Lines(proc)
    out.wait_for("Press Ctrl-C", 120)
    return proc, out, directory


def _ctrl_c(proc: subprocess.Popen[str], out: _Lines) -> None:
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=60)
    out.wait_for("stopped", 5)
    assert code == 0, "".join(out.lines)
    assert "Traceback" not in "".join(out.lines)
    assert _children(proc.pid) == {}


async def _healthy(directory: Path, node_ids: tuple[str, ...]) -> bool:
    async with ClusterClient.from_manifest(directory, timeout_s=5) as client:
        for node_id in node_ids:
            if (await client.call_node(node_id, "consensus/health")).get("status") != "healthy":
                return False
    return True


def test_up_restarts_a_killed_leader_which_catches_up(tmp_path: Path) -> None:
    proc, out, directory = _start_up(tmp_path)
    try:
        first = _children(proc.pid)
        assert sorted(first) == ["node-1", "node-2", "node-3", "node-4"]
        os.kill(first["node-1"], signal.SIGKILL)  # node-1 leads view 0
        out.wait_for("warning: node-1 exited with code -9", 30)
        out.wait_for("(1 of at most 5 a minute)", 5)
        factory = ProofFactory(load_manifest(directory).validation_params())

        async def call_then_converge() -> None:
            async with ClusterClient.from_manifest(directory, timeout_s=30) as client:
                answer = await client.validate_proofs(factory.proofs(), wait_s=60)
                assert answer["status"] == "Valid", answer
            await wait_until(lambda: _healthy(directory, ("node-1",)), 60, "the restarted node-1")

            async def caught_up() -> bool:
                async with ClusterClient.from_manifest(directory, timeout_s=5) as client:
                    seqs = [(await client.call_node(n, "consensus/health"))["last_executed_seq"]
                            for n in ("node-1", "node-2", "node-3", "node-4")]
                return min(seqs) >= 1 and len(set(seqs)) == 1

            await wait_until(caught_up, 60, "node-1 to catch up with the others")

        asyncio.run(call_then_converge())
        assert _children(proc.pid)["node-1"] != first["node-1"]  # a new process
        assert proc.poll() is None
        os.kill(first["node-3"], signal.SIGTERM)  # stopped on purpose: on-failure leaves it down
        out.wait_for("warning: node-3 exited with code 0", 30)
        out.wait_for("left down (it was stopped cleanly", 5)
        assert "node-3" not in _children(proc.pid)
    finally:
        _ctrl_c(proc, out)


def test_up_with_restart_no_leaves_a_dead_node_down_and_keeps_serving(tmp_path: Path) -> None:
    proc, out, directory = _start_up(tmp_path, "--restart", "no")
    try:
        os.kill(_children(proc.pid)["node-2"], signal.SIGKILL)
        out.wait_for("warning: node-2 exited with code -9", 30)
        out.wait_for("left down (--restart no)", 5)
        asyncio.run(wait_until(lambda: _healthy(directory, ("node-1", "node-3", "node-4")), 30,
                               "the three surviving nodes to answer healthy"))
        assert proc.poll() is None, "hypermesh up exited when one node died"
        assert "node-2" not in _children(proc.pid)
        assert sum("node-2 exited" in line for line in out.lines) == 1  # reported once
    finally:
        _ctrl_c(proc, out)


def test_up_refuses_to_start_over_ports_in_use(tmp_path: Path) -> None:
    """A second `up` (or anything else) on the ports: a clear refusal before any node
    starts, instead of nodes dying one by one while the other cluster answers."""
    import socket

    base = free_udp_ports(4)
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as taken:
        taken.bind(("::1", base + 2))
        out = subprocess.run(
            [sys.executable, "-m", "cluster.cli", "up", "--dir", str(tmp_path / "c"), "--base-port", str(base),
             "--metrics-base-port", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120,
        )
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"node-3's STOQ (UDP) port {base + 2}: Address already in use" in out.stderr
    assert "starting 4 consensus-server" not in out.stdout
