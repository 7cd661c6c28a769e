"""``hypermesh up`` (the README's run command) as a user runs it: a real process that
starts a 4-node cluster, keeps serving when a node dies, and stops on Ctrl-C."""

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


def test_up_survives_a_dead_node_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    base = free_udp_ports(4)
    directory = tmp_path / "cluster"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "up", "--dir", str(directory), "--base-port", str(base),
         "--metrics-base-port", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    out = _Lines(proc)
    try:
        out.wait_for("Press Ctrl-C", 120)
        nodes = _children(proc.pid)
        assert sorted(nodes) == ["node-1", "node-2", "node-3", "node-4"]
        os.kill(nodes["node-1"], signal.SIGKILL)
        out.wait_for("warning: node-1 exited with code -9", 30)

        async def healthy_others() -> bool:
            async with ClusterClient.from_manifest(directory, timeout_s=5) as client:
                for node_id in ("node-2", "node-3", "node-4"):
                    health = await client.call_node(node_id, "consensus/health")
                    if health.get("status") != "healthy":
                        return False
            return True

        asyncio.run(wait_until(healthy_others, 30, "the three surviving nodes to answer healthy"))
        assert proc.poll() is None, "hypermesh up exited when one node died"
        assert sum("warning: node-1 exited" in line for line in out.lines) == 1  # reported once
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    out.wait_for("stopped", 5)
    assert code == 0, "".join(out.lines)
    assert "Traceback" not in "".join(out.lines)
    assert _children(proc.pid) == {}
