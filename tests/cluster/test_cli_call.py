"""``hypermesh call`` / ``health`` / ``proofs make`` through ``cluster.cli.main``, with the
network replaced by a fake that records which route every call took."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

from cluster.cli import build_parser, load_payload, main
from cluster.client import ClusterClient
from cluster.manifest import Manifest
from cluster.workload import ProofFactory
from consensus.requests import parse_request

from .replies import certified_reply

Answer = Callable[[str, Any], Any]


class FakeCluster:
    """Stands in for every node: ``answer(path, payload)`` gives the reply, ``routes``
    records ``(node_id or "any", path)`` per call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, answer: Answer) -> None:
        self.answer = answer
        self.routes: list[tuple[str, str]] = []
        fake = self

        async def call(_client: Any, path: str, payload: Any = None, timeout_s: float | None = None,
                       *, deadline: float | None = None) -> Any:
            fake.routes.append(("any", path))
            return fake.answer(path, payload)

        async def call_node(_client: Any, node_id: str, path: str, payload: Any = None,
                            timeout_s: float | None = None, *, deadline: float | None = None) -> Any:
            fake.routes.append((node_id, path))
            return fake.answer(path, payload)

        monkeypatch.setattr(ClusterClient, "call", call)
        monkeypatch.setattr(ClusterClient, "call_node", call_node)


def _forged(manifest: Manifest) -> dict[str, Any]:
    reply = certified_reply(manifest, "req-1", signers=1)  # one signer, quorum is 3
    reply["certificate"]["signatures"][0][1] = bytes(64)  # and that signature is garbage
    return reply


STATUS = ["call", "consensus/validation_status", "--payload", '{"request_id": "req-1"}']


@pytest.mark.parametrize("bad", ["forged", "other-request"])
def test_call_validation_status_refuses_an_unverifiable_result(
        manifest: Manifest, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], bad: str) -> None:
    reply = _forged(manifest) if bad == "forged" else certified_reply(manifest, "req-OTHER")
    FakeCluster(monkeypatch, lambda _path, _payload: reply)
    assert main([*STATUS, "--cluster", str(manifest.directory)]) == 3
    captured = capsys.readouterr()
    assert "verified" not in captured.out and "UNVERIFIED RESULT" in captured.err


def test_call_validation_status_says_verified_after_checking(
        manifest: Manifest, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeCluster(monkeypatch, lambda _path, _payload: certified_reply(manifest, "req-1"))
    assert main([*STATUS, "--cluster", str(manifest.directory)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["certificate"] == "verified" and printed["request_id"] == "req-1"
    assert fake.routes == [("node-1", "consensus/validation_status")]  # final at once: no one else asked


def test_call_validation_status_asks_the_other_nodes_before_saying_not_found(
        manifest: Manifest, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A node that is behind (or was down) does not know the request yet: its NotFound
    or Pending is not the cluster's answer."""
    from transport.envelope import ApiError, ErrorCode

    answers: dict[str, Any] = {"node-1": ApiError(ErrorCode.NotFound, "no request 'req-1' is known to node-1"),
                               "node-2": {"request_id": "req-1", "status": "Pending", "leader": "node-1"},
                               "node-3": certified_reply(manifest, "req-1")}
    asked: list[str] = []

    async def call_node(_client: Any, node_id: str, path: str, payload: Any = None, timeout_s: float | None = None,
                        *, deadline: float | None = None) -> Any:
        asked.append(node_id)
        answer = answers.get(node_id, ApiError(ErrorCode.NotFound, "unknown"))
        if isinstance(answer, ApiError):
            raise answer
        return answer

    monkeypatch.setattr(ClusterClient, "call_node", call_node)
    assert main([*STATUS, "--cluster", str(manifest.directory)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["status"] == "Valid" and printed["certificate"] == "verified"
    assert asked == ["node-1", "node-2", "node-3"]

    answers["node-3"] = ApiError(ErrorCode.NotFound, "unknown")
    asked.clear()
    assert main([*STATUS, "--cluster", str(manifest.directory)]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "Pending"  # one node knows it: not NotFound
    assert asked == ["node-1", "node-2", "node-3", "node-4"]

    answers["node-2"] = ApiError(ErrorCode.NotFound, "unknown")
    assert main([*STATUS, "--cluster", str(manifest.directory)]) != 0
    assert "NotFound" in capsys.readouterr().err


def test_call_validation_status_needs_a_request_id(
        manifest: Manifest, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeCluster(monkeypatch, lambda _path, _payload: certified_reply(manifest, "req-1"))
    assert main(["call", "consensus/validation_status", "--payload", "{}", "--cluster", str(manifest.directory)]) == 2
    assert "request_id" in capsys.readouterr().err and fake.routes == []


def test_other_paths_never_claim_a_verified_certificate(
        manifest: Manifest, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    FakeCluster(monkeypatch, lambda _path, _payload: _forged(manifest))
    assert main(["call", "cluster/status", "--node", "node-2", "--cluster", str(manifest.directory)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["certificate"] == "not verified"


def _payload_file(tmp_path: Path, manifest: Manifest) -> tuple[Path, bytes]:
    payload = ProofFactory(manifest.validation_params()).proofs("req-node")
    path = tmp_path / "p.msgpack"
    path.write_bytes(msgpack.packb(payload, use_bin_type=True))
    return path, parse_request("proofs", payload).digest


def test_call_validate_with_node_asks_only_that_node(
        tmp_path: Path, manifest: Manifest, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    path, digest = _payload_file(tmp_path, manifest)

    def answer(endpoint: str, payload: Any) -> Any:
        if endpoint == "consensus/validate_proofs":  # not final yet: the client must poll the same node
            return {"request_id": payload["request_id"], "status": "Pending"}
        return certified_reply(manifest, payload["request_id"], request_digest=digest)

    fake = FakeCluster(monkeypatch, answer)
    argv = ["call", "consensus/validate_proofs", "--node", "node-3", "--payload-file", str(path)]
    assert main([*argv, "--cluster", str(manifest.directory)]) == 0
    assert json.loads(capsys.readouterr().out)["certificate"] == "verified"
    assert fake.routes == [("node-3", "consensus/validate_proofs"), ("node-3", "consensus/validation_status")]


def test_call_validation_status_with_node_asks_only_that_node(
        manifest: Manifest, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeCluster(monkeypatch, lambda _path, _payload: certified_reply(manifest, "req-1"))
    assert main([*STATUS, "--node", "node-4", "--cluster", str(manifest.directory)]) == 0
    assert fake.routes == [("node-4", "consensus/validation_status")]


def test_health_help_states_the_real_default_timeout(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["health", "--help"])
    assert exit_info.value.code == 0
    assert "(default 5)" in capsys.readouterr().out
    assert build_parser().parse_args(["health"]).timeout == 5.0
    assert build_parser().parse_args(["status"]).timeout == 30.0


def test_proofs_make_json_is_what_call_payload_file_reads(
        tmp_path: Path, manifest: Manifest, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["proofs", "make", "--request-id", "pipe-1", "--scheme", "ML-DSA-44",
            "--manifest", str(manifest.directory / "manifest.json")]
    assert main(argv) == 0
    path = tmp_path / "p.json"
    path.write_text(capsys.readouterr().out)
    payload = load_payload(None, str(path))
    request = parse_request("proofs", payload)  # raises if bytes fields came through as text
    assert request.request_id == "pipe-1"

    fake = FakeCluster(monkeypatch, lambda _p, sent: certified_reply(
        manifest, sent["request_id"], request_digest=parse_request("proofs", sent).digest))
    argv = ["call", "consensus/validate_proofs", "--payload-file", str(path), "--cluster", str(manifest.directory)]
    assert main(argv) == 0
    assert fake.routes == [("any", "consensus/validate_proofs")]
    assert json.loads(capsys.readouterr().out)["certificate"] == "verified"


def test_proofs_make_help_documents_the_json_bytes_form(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["proofs", "make", "--help"])
    assert '"base64:' in capsys.readouterr().out


@pytest.mark.parametrize("argv, says", [
    (["--payload-file", "missing.json"], "--payload-file missing.json: No such file"),
    (["--payload", "{bad"], "--payload: not valid JSON"),
    (["--payload", '"base64:!!"'], "is not valid base64"),
    (["--payload-file", "{ca}"], "not a msgpack payload"),
])
def test_call_bad_payloads_are_named_not_tracebacks(
        manifest: Manifest, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        argv: list[str], says: str) -> None:
    fake = FakeCluster(monkeypatch, lambda _path, _payload: pytest.fail("nothing may be sent"))
    argv = [a.replace("{ca}", str(manifest.directory / "ca.pem")) for a in argv]
    assert main(["call", "consensus/validate_proofs", *argv, "--cluster", str(manifest.directory)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hypermesh: ") and says in err and "Traceback" not in err
    assert fake.routes == []


def test_cluster_errors_of_any_command_are_one_line(
        manifest: Manifest, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from transport.envelope import ApiError, ErrorCode

    def refuse(_path: str, _payload: Any) -> Any:
        raise ApiError(ErrorCode.TransportError, "network error: connection refused")

    FakeCluster(monkeypatch, refuse)
    assert main(["evidence", "--node", "node-1", "--cluster", str(manifest.directory)]) == 2
    assert capsys.readouterr().err == "hypermesh: error TransportError: network error: connection refused\n"


def test_client_certificate_comes_from_the_cluster_directory_or_the_flag(
        manifest: Manifest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Nodes run with --client-auth required refuse a client without a certificate: the
    CLI presents the one 'cluster init' wrote, or the one --client-cert names."""
    presented: list[tuple[bytes, bytes] | None] = []
    real_init = ClusterClient.__init__

    def spy(self: ClusterClient, *args: Any, **kwargs: Any) -> None:
        presented.append(kwargs.get("client_cert"))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(ClusterClient, "__init__", spy)
    FakeCluster(monkeypatch, lambda _path, _payload: {"status": "healthy", "node_id": "node-1"})
    directory = manifest.directory
    assert main(["health", "--cluster", str(directory)]) == 0
    own = ((directory / "client" / "tls.pem").read_bytes(), (directory / "client" / "tls.key").read_bytes())
    assert presented[-1] == own

    other = tmp_path / "other"
    other.mkdir()
    (other / "tls.pem").write_bytes(b"cert")
    (other / "tls.key").write_bytes(b"key")
    assert main(["health", "--cluster", str(directory), "--client-cert", str(other)]) == 0
    assert presented[-1] == (b"cert", b"key")

    assert main(["health", "--cluster", str(directory), "--client-cert", str(tmp_path / "none")]) == 2
    assert "--client-cert" in capsys.readouterr().err


def test_status_shows_a_view_change_and_a_lost_quorum(
        manifest: Manifest, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [
        {"node_id": "node-1", "endpoint": "[::1]:1", "reachable": True, "view": 1, "leader": "node-2",
         "replica": {"view_change_target": 10}, "last_executed_seq": 7, "stable_checkpoint_seq": 0},
        {"node_id": "node-2", "endpoint": "[::1]:2", "reachable": True, "view": 2, "leader": "node-3",
         "replica": {"view_change_target": None}, "last_executed_seq": 9, "stable_checkpoint_seq": 0},
        {"node_id": "node-3", "endpoint": "[::1]:3", "reachable": False, "error": "TransportError: down"},
        {"node_id": "node-4", "endpoint": "[::1]:4", "reachable": False, "error": "TransportError: down"},
    ]

    async def status(_client: Any, *, deadline: float | None = None) -> list[dict[str, Any]]:
        return rows

    monkeypatch.setattr(ClusterClient, "status", status)
    assert main(["status", "--cluster", str(manifest.directory)]) == 1
    out = capsys.readouterr().out
    assert " 1->10 " in out and "NO QUORUM: the cluster needs 3 of its 4 validators" in out
    rows[2] = dict(rows[1], node_id="node-3")
    assert main(["status", "--cluster", str(manifest.directory)]) == 1  # one still unreachable
    assert "NO QUORUM" not in capsys.readouterr().out


def test_cli_mistakes_get_one_line_and_exit_2(manifest: Manifest, capsys: pytest.CaptureFixture[str]) -> None:
    import subprocess
    import sys

    cluster = str(manifest.directory)
    assert main(["call", "consensus/validate_proofs", "--cluster", cluster]) == 2
    assert "needs a payload" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["proofs", "make", "--request-id", "bad id!", "--manifest", f"{cluster}/manifest.json"])
    assert usage.value.code == 2 and "[A-Za-z0-9._:-]" in capsys.readouterr().err
    # Run as `python -m cluster.cli` too: an error raised in another module of the
    # package was once not caught there (two copies of CliError) and printed a traceback.
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "proofs", "make", "--kind", "certificate",
                          "--manifest", f"{cluster}/manifest.json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "hypermesh: --kind certificate needs --common-name" in out.stderr


def test_a_certificate_request_sent_to_validate_proofs_gets_a_hint(manifest: Manifest) -> None:
    from transport.envelope import ApiError

    payload = ProofFactory(manifest.validation_params()).certificate()
    with pytest.raises(ApiError, match="send it to consensus/validate_certificate"):
        asyncio.run(ClusterClient(manifest).validate_proofs(payload))


def test_status_prints_a_long_error_whole_below_the_table(
        manifest: Manifest, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    error = ("TransportError: TLS handshake with node-2 failed: certificate verify failed: unable to get local "
             "issuer certificate (is --cluster the directory of this cluster's CA?)")

    async def status(_client: Any, *, deadline: float | None = None) -> list[dict[str, Any]]:
        return [{"node_id": "node-1", "endpoint": "[::1]:9292", "reachable": True, "view": 0, "leader": "node-1",
                 "is_leader": True, "last_executed_seq": 3, "stable_checkpoint_seq": 0, "results_stored": 3},
                {"node_id": "node-2", "endpoint": "[::1]:9293", "reachable": False, "error": error}]

    monkeypatch.setattr(ClusterClient, "status", status)
    assert main(["status", "--cluster", str(manifest.directory)]) == 1
    out = capsys.readouterr().out
    table, _, notes = out.partition("nodes reachable")
    assert "UNREACHABLE" in table and error not in table and error[:40] in table
    assert f"node-2: {error}" in notes


def test_status_names_a_node_that_withholds_its_votes(
        manifest: Manifest, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def row(entry: Any, floor: dict[str, int] | None) -> dict[str, Any]:
        return {"node_id": entry.node_id, "endpoint": entry.endpoint, "reachable": True, "view": 0, "leader": "node-1",
                "last_executed_seq": 30, "stable_checkpoint_seq": 16, "results_stored": 30, "evidence": {},
                "replica": {"view_change_target": None, "vote_floor": floor}}

    async def status(_client: Any, *, deadline: float | None = None) -> list[dict[str, Any]]:
        return [row(e, {"view": 0, "seq": 24} if e.node_id == "node-3" else None) for e in manifest.nodes]

    monkeypatch.setattr(ClusterClient, "status", status)
    assert main(["status", "--cluster", str(manifest.directory)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("node-") and " withholds " not in line}
    assert "withholding" in lines["node-3"] and "healthy" in lines["node-2"]
    assert "node-3 withholds its votes" in out and "reaches 24" in out
