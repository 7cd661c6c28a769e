"""Every refusal of ``consensus-server`` to start exits 2 with one log line saying why
(docs/OPERATIONS.md, exit status), so a supervisor can tell it from a failed store
write (1) and not restart it in a loop (ops/hypermesh-consensus.service)."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.bootstrap import InitOptions, init_cluster
from node.store import lock_data_dir

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A UDP port this test holds: whatever else goes wrong, no server gets to listen."""
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as taken:
        taken.bind(("::1", 0))
        yield taken.getsockname()[1]


def refusal(port: int, *args: str) -> str:
    """Run consensus-server, expect exit status 2, return its ERROR line(s)."""
    out = subprocess.run(
        [sys.executable, "-m", "node.main", "--bind", "::1", "--port", str(port), "--metrics-port", "0", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    errors = [line for line in out.stderr.splitlines() if " ERROR " in line]
    assert out.returncode == 2, out.stderr
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr
    return errors[0]


def test_a_port_in_use_exits_2(tmp_path: Path, busy_port: int) -> None:
    line = refusal(busy_port, "--data-dir", str(tmp_path / "d"))
    assert f"cannot start: [Errno 98] STOQ port (UDP) [::1]:{busy_port}: Address already in use" in line


def test_a_data_directory_in_use_exits_2(tmp_path: Path, busy_port: int) -> None:
    held = lock_data_dir(tmp_path / "d")  # as a running node holds it
    try:
        line = refusal(busy_port, "--data-dir", str(tmp_path / "d"))
    finally:
        held.close()
    assert f"data directory {tmp_path / 'd'} is in use by another consensus-server" in line


def test_an_unusable_data_directory_exits_2(tmp_path: Path, busy_port: int) -> None:
    cluster = init_cluster(tmp_path / "c", InitOptions(nodes=1, base_port=busy_port))
    (tmp_path / "file").write_text("not a directory")
    line = refusal(busy_port, "--cluster", str(cluster.directory), "--node-id", "node-1",
                   "--data-dir", str(tmp_path / "file"))
    assert "cannot start: [Errno 17] File exists" in line


def test_an_unwritable_trace_file_exits_2(tmp_path: Path, busy_port: int) -> None:
    spans = tmp_path / "missing" / "spans.jsonl"
    line = refusal(busy_port, "--data-dir", str(tmp_path / "d"), "--trace", str(spans))
    assert line.endswith(f"--trace {spans}: No such file or directory")


def test_a_damaged_tls_key_exits_2_naming_the_files(tmp_path: Path, busy_port: int) -> None:
    cluster = init_cluster(tmp_path / "c", InitOptions(nodes=1, base_port=busy_port))
    (cluster.node_dir("node-1") / "tls.key").write_text("not a key")
    line = refusal(busy_port, "--cluster", str(cluster.directory), "--node-id", "node-1",
                   "--data-dir", str(tmp_path / "d"))
    assert f"the TLS certificate and key of node-1 in {cluster.node_dir('node-1')} cannot be used" in line


def test_an_unknown_node_id_and_a_bad_flag_exit_2(tmp_path: Path, busy_port: int) -> None:
    cluster = init_cluster(tmp_path / "c", InitOptions(nodes=1, base_port=busy_port))
    line = refusal(busy_port, "--cluster", str(cluster.directory), "--node-id", "node-9",
                   "--data-dir", str(tmp_path / "d"))
    assert "node 'node-9' is not in the manifest" in line
    out = subprocess.run(
        [sys.executable, "-m", "node.main", "--bind", "::1", "--port", str(busy_port), "--metrics-port", "0",
         "--data-dir", str(tmp_path / "d"), "--batch-size", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2 and "argument --batch-size: must be an integer >= 1, not '0'" in out.stderr
