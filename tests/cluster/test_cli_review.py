"""Defects a review of the ``hypermesh`` client CLI found, one section per finding:
shared addresses in ``cluster init``, ``--endpoint`` spelling, ``status`` blaming the
cluster for the client's own failures, ``--timeout`` values and exits, where ``proofs
make`` finds the manifest and which schemes it accepts, the missing-manifest hint,
unknown node ids, and what ``health`` checks.

The network is replaced at the ``StoqClient`` level (as in test_cli_friction.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack
import pytest

from cluster.cli import build_parser, main
from cluster.manifest import Manifest
from consensus.prover import HolderKeys
from transport.client import StoqClient
from transport.envelope import ApiError, ErrorCode, Response

from .test_cli_friction import FakeNodes, _check, _hang


def _failing(monkeypatch: pytest.MonkeyPatch, error: ApiError) -> None:
    """Every node fails the same way before answering (unreachable, TLS refused)."""
    async def call_full(_client: StoqClient, _path: str, _payload: Any = None, **_: Any) -> Response:
        raise error

    monkeypatch.setattr(StoqClient, "call_full", call_full)


# -- 1. cluster init --address-template --------------------------------------------------


@pytest.mark.parametrize("template, clash", [
    ("node-x", "node-1 and node-2 would both be at node-x"),  # no port: --base-port for every node
    ("[::1]:9700", "node-1 and node-2 would both be at [::1]:9700"),
])
def test_init_refuses_nodes_that_share_an_address(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], template: str, clash: str) -> None:
    out = tmp_path / "c"
    argv = ["cluster", "init", "--nodes", "4", "--out", str(out), "--address-template", template, "--base-port", "9700"]
    assert main(argv) == 2
    assert clash in capsys.readouterr().err
    assert not out.exists()


def test_init_accepts_one_port_on_distinct_hosts(tmp_path: Path) -> None:
    """compose's form: every node on its own host, one port."""
    argv = ["cluster", "init", "--nodes", "4", "--out", str(tmp_path / "c"), "--signing-scheme", "Ed25519",
            "--address-template", "node-{i}", "--base-port", "9700"]
    assert main(argv) == 0


def test_address_template_help_names_every_placeholder(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["cluster", "init", "--help"])
    out = capsys.readouterr().out
    assert all(field in out for field in ("{i}", "{id}", "{port}"))


# -- 2. --endpoint ---------------------------------------------------------------------


@pytest.mark.parametrize("endpoint, says", [
    ("::1:9600", "[::1]:9600"),  # was host '::1:9600', port 9292
    ("localhost", "give the port too"),  # was port 9292, silently
    ("[::1]", "give the port too"),
])
def test_endpoint_needs_a_port_and_brackets_around_ipv6(
        endpoint: str, says: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as usage:
        build_parser().parse_args(["status", "--endpoint", endpoint])
    assert usage.value.code == 2
    err = capsys.readouterr().err
    assert "argument --endpoint" in err and says in err


def test_endpoint_with_port_parses() -> None:
    args = build_parser().parse_args(["call", "x", "--endpoint", "[::1]:9600", "--endpoint", "node-1:9292"])
    assert args.endpoint == [("::1", 9600), ("node-1", 9292)]


def test_transport_errors_name_the_address_that_failed(
        manifest: Manifest, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _failing(monkeypatch, ApiError(ErrorCode.TransportError, "handshake timed out"))
    cluster = ["--cluster", str(manifest.directory)]
    assert main(["call", "consensus/health", "--endpoint", "[::1]:9600", *cluster]) == 2
    assert capsys.readouterr().err.strip() == "hypermesh: error TransportError: [::1]:9600: handshake timed out"
    assert main(["call", "consensus/health", *cluster]) == 2
    assert f"node-1 at {manifest.node('node-1').endpoint}: handshake timed out" in capsys.readouterr().err


# -- 3. status: NO QUORUM only when nodes answered ----------------------------------------


def test_status_does_not_claim_no_quorum_when_its_own_timeout_ran_out(
        manifest: Manifest, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    FakeNodes(monkeypatch, manifest, _hang)
    assert main(["status", "--timeout", "0.2", "--cluster", str(manifest.directory)]) == 2  # as call does
    captured = capsys.readouterr()
    assert "NO QUORUM" not in captured.out
    assert "could not ask 4 of the 4 nodes (this client's --timeout ran out first" in captured.out
    assert captured.err.startswith("hypermesh: error Timeout: --timeout 0.2s ran out: no answer to cluster/status "
                                   "from node-1, node-2, node-3, node-4"), captured.err


def test_status_does_not_claim_no_quorum_when_tls_fails(
        manifest: Manifest, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _failing(monkeypatch, ApiError(ErrorCode.Unauthorized, "TLS handshake failed: unable to get local issuer"))
    assert main(["status", "--cluster", str(manifest.directory)]) == 1
    out = capsys.readouterr().out
    assert "NO QUORUM" not in out and "could not ask 4 of the 4 nodes (TLS refused" in out
    assert "UNREACHABLE  Unauthorized: TLS handshake failed" in out  # the row names the node once


def test_status_without_any_answer_does_not_claim_no_quorum(
        manifest: Manifest, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _failing(monkeypatch, ApiError(ErrorCode.TransportError, "network error: [Errno 111] Connection refused"))
    assert main(["status", "--cluster", str(manifest.directory)]) == 1
    out = capsys.readouterr().out
    assert "NO QUORUM" not in out and "no node answered: is the cluster running" in out


# -- 4. --timeout ----------------------------------------------------------------------


@pytest.mark.parametrize("command", [["call", "consensus/health"], ["status"], ["health"], ["evidence"], ["up"]])
@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_timeout_must_be_positive_seconds(
        command: list[str], value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as usage:
        build_parser().parse_args([*command, "--timeout", value])
    assert usage.value.code == 2
    err = capsys.readouterr().err
    assert "argument --timeout" in err and ("above 0" in err or "not a number" in err)


def test_evidence_and_health_report_a_timeout_that_ran_out(
        manifest: Manifest, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """evidence exits 2 like call and status; health, a probe, says unhealthy with exit 1."""
    FakeNodes(monkeypatch, manifest, _hang)
    cluster = ["--cluster", str(manifest.directory), "--timeout", "0.2"]
    assert main(["evidence", *cluster]) == 2
    assert capsys.readouterr().err.startswith("hypermesh: error Timeout: --timeout 0.2s ran out")
    assert main(["health", *cluster]) == 1
    assert capsys.readouterr().err.startswith("unhealthy: Timeout: --timeout 0.2s ran out")


# -- 6. and 7. proofs make: the manifest and its stake schemes ---------------------------


def _make(argv: list[str], out: Path) -> int:
    return main(["proofs", "make", "--request-id", "req-r", *argv, "--out", str(out)])


def test_proofs_make_uses_the_cluster_of_hypermesh_cluster(
        tmp_path: Path, manifest: Manifest, monkeypatch: pytest.MonkeyPatch) -> None:
    """With HYPERMESH_CLUSTER set, the proofs used to be sealed to a fresh key: Invalid, space.aead_failed."""
    monkeypatch.chdir(tmp_path)  # no .cluster here
    out = tmp_path / "p.msgpack"
    monkeypatch.setenv("HYPERMESH_CLUSTER", str(manifest.directory))
    assert _make(["--scheme", "ML-DSA-44"], out) == 0
    assert _check(manifest, "proofs", msgpack.unpackb(out.read_bytes(), raw=False)) == ("Valid", [])
    monkeypatch.delenv("HYPERMESH_CLUSTER")
    assert _make(["--scheme", "ML-DSA-44", "--cluster", str(manifest.directory)], out) == 0
    assert _check(manifest, "proofs", msgpack.unpackb(out.read_bytes(), raw=False)) == ("Valid", [])


def test_proofs_make_refuses_a_named_cluster_without_a_manifest(
        tmp_path: Path, manifest: Manifest, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HYPERMESH_CLUSTER", str(tmp_path / "nowhere"))
    assert _make([], tmp_path / "p.msgpack") == 2
    assert "no cluster manifest at" in capsys.readouterr().err
    both = ["--cluster", str(manifest.directory), "--manifest", str(manifest.directory / "manifest.json")]
    assert _make(both, tmp_path / "p.msgpack") == 2
    assert "not both" in capsys.readouterr().err


def test_proofs_make_refuses_a_stake_scheme_the_cluster_does_not_accept(
        tmp_path: Path, manifest: Manifest, capsys: pytest.CaptureFixture[str]) -> None:
    cluster = ["--cluster", str(manifest.directory)]
    assert _make(["--scheme", "Ed25519", *cluster], tmp_path / "p.msgpack") == 2
    err = capsys.readouterr().err
    assert "--scheme Ed25519" in err and "accepts stake signatures in FALCON-1024, ML-DSA-87, ML-DSA-65, ML-DSA-44" in err
    key = HolderKeys.generate("Ed25519")
    key_file = tmp_path / "holder.json"
    key_file.write_text(json.dumps({"scheme": key.scheme, "public_key": _b64(key.public_key),
                                    "private_key": _b64(key.private_key)}))
    assert _make(["--key", str(key_file), *cluster], tmp_path / "p.msgpack") == 2
    assert "(scheme Ed25519)" in capsys.readouterr().err
    assert not (tmp_path / "p.msgpack").exists()


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


# -- 8. no manifest --------------------------------------------------------------------


def test_missing_manifest_suggests_pointing_at_a_cluster_first(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--cluster", str(tmp_path / ".cluster")]) == 2
    err = capsys.readouterr().err
    assert err.index("--cluster DIR") < err.index("HYPERMESH_CLUSTER") < err.index("hypermesh cluster init"), err


# -- 9. unknown node ids ---------------------------------------------------------------


@pytest.mark.parametrize("argv, says", [
    (["call", "cluster/status", "--node", "node-9"], "known: node-1, node-2, node-3, node-4"),
    (["evidence", "--node", "node-9"], "known: node-1, node-2, node-3, node-4"),
    (["evidence", "--accused", "node-9"], "--accused: node 'node-9' is not in the manifest"),
])
def test_unknown_node_ids_are_errors_that_list_the_known_ones(
        manifest: Manifest, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        argv: list[str], says: str) -> None:
    fake = FakeNodes(monkeypatch, manifest, _hang)
    assert main([*argv, "--cluster", str(manifest.directory)]) == 2
    err = capsys.readouterr().err
    assert says in err and "node-4" in err
    assert fake.sent == []  # refused before asking any node


# -- 10. what health checks ------------------------------------------------------------


def test_health_help_says_which_node_it_checks(
        manifest: Manifest, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["health", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "exit 0 without --endpoint means some node is healthy, not all of them" in out

    async def answer(node_id: str, _path: str, _payload: Any, _timeout_s: float) -> Any:
        if node_id == "node-1":
            raise ApiError(ErrorCode.TransportError, "network error: [Errno 111] Connection refused")
        return {"node_id": node_id, "status": "healthy"}

    FakeNodes(monkeypatch, manifest, answer)
    assert main(["health", "--cluster", str(manifest.directory)]) == 0
    assert capsys.readouterr().out.strip() == "node-2: healthy"  # names the node that answered


def test_simulate_refuses_zero_seeds(capsys: pytest.CaptureFixture[str]) -> None:
    from cluster import simulate_cli

    with pytest.raises(SystemExit) as exited:
        simulate_cli.main(["--seeds", "0"])
    assert exited.value.code == 2
    assert "at least 1 seed" in capsys.readouterr().err
