"""Operator friction found in a walk-through of ``hypermesh``:

* ``call --timeout`` bounds the whole command, not each node's answer and each wait;
* every example of ``proofs make --help`` does what it says against a real cluster's keys;
* ``evidence --limit N`` is checked and reaches the node.

The network is replaced at the ``StoqClient`` level, so ``ClusterClient``'s own failover,
retries and waiting run as they do against a real cluster.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

from cluster.cli import build_parser, load_payload, main
from cluster.manifest import Manifest, load_kem_private_key
from cluster.proofs_cli import KEYGEN_EPILOG, MAKE_EPILOG
from cluster.workload import ProofFactory
from consensus.prover import FAULTS
from consensus.validation import ValidationState, execute, parse_request, precheck
from transport.client import StoqClient
from transport.envelope import ApiError, ErrorCode, Response

# (node_id, path, payload, timeout_s) -> the payload of an ok answer (or raises ApiError)
Answer = Callable[[str, str, Any, float], Awaitable[Any]]


class FakeNodes:
    """Every node of the manifest, answering through ``answer``; ``sent`` records
    ``(node_id, path, payload)`` of each call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, manifest: Manifest, answer: Answer) -> None:
        by_port = {entry.port: entry.node_id for entry in manifest.nodes}
        self.sent: list[tuple[str, str, Any]] = []
        fake = self

        async def call_full(client: StoqClient, path: str, payload: Any = None, *, timeout_s: float | None = None,
                            **_: Any) -> Response:
            node_id = by_port[client.port]
            fake.sent.append((node_id, path, payload))
            timeout = client.timeout_s if timeout_s is None else timeout_s
            return Response.success("", await answer(node_id, path, payload, timeout))

        monkeypatch.setattr(StoqClient, "call_full", call_full)


async def _hang(_node: str, _path: str, _payload: Any, timeout_s: float) -> Any:
    """A node that never answers: what StoqClient does when its timeout runs out."""
    await asyncio.sleep(timeout_s)
    raise ApiError(ErrorCode.Timeout, "request not answered in time")


# -- 1. --timeout bounds the whole command --------------------------------------------


def test_call_timeout_bounds_every_node_together(
        manifest: Manifest, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """No node answers. Each used to get the whole --timeout in turn (4 nodes: 4 x 1 s)."""
    fake = FakeNodes(monkeypatch, manifest, _hang)
    started = time.monotonic()
    assert main(["call", "consensus/health", "--timeout", "1", "--cluster", str(manifest.directory)]) == 2
    took = time.monotonic() - started
    err = capsys.readouterr().err
    assert took < 3.0, f"--timeout 1 took {took:.1f} s"  # was 4 x 1 s; generous for a loaded machine
    assert err.startswith("hypermesh: error Timeout: --timeout 1s ran out: no answer to consensus/health"), err
    assert fake.sent[0][0] == "node-1"


def test_call_timeout_includes_waiting_for_the_final_result(
        tmp_path: Path, manifest: Manifest, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The request is accepted late and never becomes final. Waiting for the result used
    to get its own --timeout on top of the time the request took (1.9 s + up to 2 s)."""
    payload = ProofFactory(manifest.validation_params()).proofs("req-slow")
    path = tmp_path / "p.msgpack"
    path.write_bytes(msgpack.packb(payload, use_bin_type=True))

    async def answer(_node: str, endpoint: str, sent: Any, _timeout_s: float) -> Any:
        if endpoint == "consensus/validate_proofs":
            await asyncio.sleep(1.9)
        return {"request_id": sent["request_id"], "status": "Pending"}

    FakeNodes(monkeypatch, manifest, answer)
    argv = ["call", "consensus/validate_proofs", "--payload-file", str(path), "--timeout", "2"]
    started = time.monotonic()
    assert main([*argv, "--cluster", str(manifest.directory)]) == 2
    took = time.monotonic() - started
    err = capsys.readouterr().err
    assert took < 3.3, f"--timeout 2 took {took:.1f} s"  # was 1.9 s + 2 s
    assert err.startswith("hypermesh: error Timeout: --timeout 2s ran out: req-slow accepted but not final"), err
    assert "consensus/validation_status" in err  # and how to ask later


def test_a_library_deadline_bounds_the_whole_call(manifest: Manifest, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the CLI builds on: a deadline passed down, past it DeadlineExceeded, a Timeout."""
    from cluster.client import ClusterClient, DeadlineExceeded

    FakeNodes(monkeypatch, manifest, _hang)

    async def body() -> None:
        async with ClusterClient(manifest, timeout_s=30) as client:
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded) as info:
                await client.call("consensus/health", deadline=started + 0.5)
            assert time.monotonic() - started < 5.0  # was 30 s per node
            assert isinstance(info.value, ApiError) and info.value.code == ErrorCode.Timeout

    asyncio.run(body())


@pytest.mark.parametrize("command, bounds", [
    ("call", "connecting, trying other nodes, retries and waiting for a final result; when it runs out the "
             "command exits 2 with error Timeout"),
    ("status", "connecting to every node and its answer; when it runs out the command exits 2 with error Timeout"),
    ("evidence", "connecting, trying other nodes and retries; when it runs out the command exits 2"),
    ("health", "connecting, trying other nodes and retries; when it runs out the node counts as unhealthy: exit 1"),
])
def test_timeout_help_says_it_bounds_the_whole_command(
        command: str, bounds: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Each command's own words: only call waits for a final result (the shared text said
    "(call) waiting for a final result" on status, health and evidence too)."""
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"bound on the whole command: {bounds}" in out
    assert ("final result" in out) == (command == "call")


# -- 2. the examples of proofs make --help ---------------------------------------------


def _examples(epilog: str) -> list[list[str]]:
    """The ``hypermesh ...`` command lines of a help epilog (continuations joined,
    comments dropped), as argument lists; ``> FILE`` stays as the last two items."""
    text = epilog.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in text.splitlines() if line.strip().startswith("hypermesh ")]


def _check(manifest: Manifest, kind: str, payload: Any) -> tuple[str, list[str]]:
    """What a validator of ``manifest``'s cluster answers: status and reason codes."""
    params = manifest.validation_params()
    request = parse_request(kind, payload)
    pre = precheck(request, params, load_kem_private_key(manifest, "node-1"))
    outcome = execute(request, pre, ValidationState(), int(time.time() * 1000), params)
    return outcome.status, [r.code for r in outcome.reasons]


def _run_make(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[Any, str, Any]:
    """Run ``hypermesh proofs make ...`` as the shell would (``> FILE`` included): its
    parsed arguments, the file it wrote and the payload in it."""
    redirect = argv[argv.index(">") + 1] if ">" in argv else None
    argv = argv[:argv.index(">")] if redirect else argv
    args = build_parser().parse_args(argv[1:])
    assert main(argv[1:]) == 0, capsys.readouterr().err
    written = args.out
    if written is None:  # JSON on stdout: kept with `> FILE`, or only shown
        written = redirect or "stdout.json"
        Path(written).write_text(capsys.readouterr().out)
    return args, written, load_payload(None, written)  # as `hypermesh call --payload-file` reads it


def test_every_proofs_make_example_does_what_it_says(
        tmp_path: Path, manifest: Manifest, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Run each example verbatim in a directory whose .cluster is a real cluster; a
    validator holding that cluster's keys must answer Valid, or exactly the reason of
    --broken (the walk-through got space.aead_failed: no --manifest, so the space proof
    was sealed to a key no cluster holds)."""
    (tmp_path / ".cluster").symlink_to(manifest.directory)
    monkeypatch.chdir(tmp_path)
    made: dict[str, str] = {}  # file -> kind of request in it
    examples = _examples(MAKE_EPILOG) + _examples(KEYGEN_EPILOG)
    assert any("--broken" in argv for argv in examples)
    for argv in examples:
        assert argv[0] == "hypermesh"
        if argv[1:3] == ["proofs", "keygen"]:
            assert main(argv[1:]) == 0
        elif argv[1:3] == ["proofs", "make"]:
            args, written, payload = _run_make(argv, capsys)
            expected = ("Invalid", [FAULTS[args.broken[0]][args.broken[1]]]) if args.broken else ("Valid", [])
            assert _check(manifest, args.kind, payload) == expected, shlex.join(argv)
            made[written] = args.kind
        else:  # hypermesh call: sends a payload an example above made, to the right endpoint
            args = build_parser().parse_args(argv[1:])
            assert args.payload_file in made, shlex.join(argv)
            assert args.path == f"consensus/validate_{made[args.payload_file]}", shlex.join(argv)


@pytest.mark.parametrize("fault", [f"{p}:{h}" for p, hows in FAULTS.items() for h in hows])
def test_every_listed_broken_variant_gives_its_reason(
        fault: str, tmp_path: Path, manifest: Manifest, capsys: pytest.CaptureFixture[str]) -> None:
    """The --broken list of the same help: with the cluster's manifest, exactly that reason."""
    proof, _, how = fault.partition(":")
    code = FAULTS[proof][how]
    assert f"  {fault:<18} -> {code}" in MAKE_EPILOG
    kind = "certificate" if proof in ("csr", "policy") else "proofs"
    out = tmp_path / "p.msgpack"
    argv = ["proofs", "make", "--kind", kind, "--scheme", "ML-DSA-44", "--broken", fault,
            "--manifest", str(manifest.directory / "manifest.json"), "--out", str(out)]
    argv += ["--common-name", "api.example.com"] if kind == "certificate" else []
    assert main(argv) == 0
    assert _check(manifest, kind, msgpack.unpackb(out.read_bytes(), raw=False)) == ("Invalid", [code])


def test_broken_without_a_manifest_warns_what_a_cluster_will_answer(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # No manifest anywhere: not in a .cluster of the working directory (after
    # 'dev.py up' the checkout has one), nor in HYPERMESH_CLUSTER.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYPERMESH_CLUSTER", raising=False)
    out = tmp_path / "p.msgpack"
    assert main(["proofs", "make", "--scheme", "ML-DSA-44", "--broken", "space:path", "--out", str(out)]) == 0
    assert "space.aead_failed as well as, or instead of, space.bad_path" in capsys.readouterr().err


# -- 3. evidence --limit ---------------------------------------------------------------


def _evidence_answer(sent: list[Any]) -> Answer:
    async def answer(node_id: str, _path: str, payload: Any, _timeout_s: float) -> Any:
        sent.append(payload)
        return {"node_id": node_id, "counts": {}, "evidence": [], "next_before_id": None}
    return answer


def test_evidence_limit_reaches_the_node(
        manifest: Manifest, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    payloads: list[Any] = []
    fake = FakeNodes(monkeypatch, manifest, _evidence_answer(payloads))
    cluster = ["--cluster", str(manifest.directory)]
    assert main(["evidence", "--limit", "7", *cluster]) == 0
    assert json.loads(capsys.readouterr().out)["evidence"] == []
    assert main(["evidence", "--node", "node-2", "--accused", "node-3", "--limit", "1000", *cluster]) == 0
    assert main(["evidence", *cluster]) == 0
    assert payloads == [{"limit": 7}, {"accused": "node-3", "limit": 1000}, {}]
    assert fake.sent[1][:2] == ("node-2", "consensus/evidence")


@pytest.mark.parametrize("value", ["0", "-3", "1.5", "ten", "1001"])
def test_evidence_limit_must_be_a_positive_integer(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as usage:
        build_parser().parse_args(["evidence", "--limit", value])
    assert usage.value.code == 2
    err = capsys.readouterr().err
    assert "argument --limit" in err and "positive integer, 1..1000" in err


def test_evidence_help_shows_limit(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["evidence", "--help"])
    out = capsys.readouterr().out
    assert "--limit N" in out and "hypermesh evidence --limit 10" in out
