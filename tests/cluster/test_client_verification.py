"""The client never returns a result it cannot verify against the manifest."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest

from cluster.client import ClusterClient, UnverifiedResult
from cluster.manifest import Manifest
from cluster.workload import ProofFactory
from consensus.proofs.reasons import Reason
from consensus.requests import parse_request

from .replies import certificate_for, certified_reply

BAD_PATH = Reason("space", "space.bad_path", "answer 0 (chunk 5) does not verify against the root")


def test_a_properly_certified_result_verifies(manifest: Manifest) -> None:
    client = ClusterClient(manifest)
    reply = certified_reply(manifest, "req-1", request_digest=hashlib.sha256(b"req").digest())
    assert client.verify_result(reply, hashlib.sha256(b"req").digest()) is reply


def test_an_invalid_result_with_late_votes_verifies(manifest: Manifest) -> None:
    # 3 signed the certificate, the 4th vote came later: validator_nodes 4, confidence 1.0.
    reply = certified_reply(manifest, "req-1", status="Invalid", reasons=(BAD_PATH,), agreeing=4)
    assert reply["metrics"]["confidence_level"] == 1.0
    assert ClusterClient(manifest).verify_result(reply) is reply


@pytest.mark.parametrize("tamper", ["short", "forged-signature", "duplicate-signer", "unknown-signer", "flipped-status",
                                    "other-request", "wrong-path", "other-cluster", "overclaimed-count", "swapped-request"])
def test_every_kind_of_bad_certificate_is_refused(manifest: Manifest, tamper: str) -> None:
    client = ClusterClient(manifest)
    reply = certified_reply(manifest, "req-1", signers=2 if tamper == "short" else 3)
    cert = reply["certificate"]
    if tamper == "forged-signature":
        cert["signatures"][0][1] = bytes(64)
    elif tamper == "duplicate-signer":
        cert["signatures"][2] = cert["signatures"][0]
    elif tamper == "unknown-signer":
        cert["signatures"][0][0] = "node-99"
    elif tamper == "flipped-status":
        reply["status"] = "Invalid"  # readable field no longer matches the signed bytes
    elif tamper == "other-request":
        reply["request_id"] = "someone-else"
    elif tamper == "wrong-path":
        cert["index"] = 0
    elif tamper == "other-cluster":
        cert["cluster_id"] = "hm-other"
    elif tamper == "overclaimed-count":
        reply["metrics"]["validator_nodes"] = 2  # fewer than the certificate's own signers: inconsistent
    with pytest.raises(UnverifiedResult):
        if tamper == "swapped-request":
            client.verify_result(reply, hashlib.sha256(b"what the client really sent").digest())
        else:
            client.verify_result(reply)


def _set(reply: dict[str, Any], key: str, value: Any) -> None:
    if key.startswith("metrics."):
        reply["metrics"][key.removeprefix("metrics.")] = value
    else:
        reply[key] = value


@pytest.mark.parametrize("field, value", [
    ("reasons", [{"proof": "stake", "code": "stake.below_minimum", "message": "forged"}]),
    ("reasons", []),
    ("agreed_time_ms", 1),
    ("request_digest", b"\x99" * 32),
    ("kind", "certificate"),
    ("kind", None),
    ("metrics.total_validators", 99),
    ("metrics.validator_nodes", 99),  # more validators than the cluster has
    ("metrics.validator_nodes", True),  # True == 1 in Python; not a count
    ("metrics.confidence_level", 0.5),
    ("metrics.seq", 8),
])
def test_readable_fields_must_match_the_certified_result(manifest: Manifest, field: str, value: Any) -> None:
    reply = certified_reply(manifest, "req-A", status="Invalid", reasons=(BAD_PATH,))
    _set(reply, field, value)
    with pytest.raises(UnverifiedResult):
        ClusterClient(manifest).verify_result(reply)


def test_certified_bytes_that_are_no_outcome_are_refused(manifest: Manifest) -> None:
    reply = certified_reply(manifest, "req-1")
    reply["result"] = b"\xc1"  # not msgpack, yet properly certified
    reply["certificate"] = certificate_for(manifest, "req-1", b"\xc1")
    with pytest.raises(UnverifiedResult):
        ClusterClient(manifest).verify_result(reply)


def test_validation_status_refuses_a_certified_result_for_another_request(manifest: Manifest,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    client = ClusterClient(manifest)
    answers = {"req-MINE": certified_reply(manifest, "req-OTHER")}  # genuinely certified, wrong request

    async def fake_call_node(node_id: str, path: str, payload: Any = None, timeout_s: float | None = None,
                             *, deadline: float | None = None) -> Any:
        return answers[payload["request_id"]]

    monkeypatch.setattr(client, "call_node", fake_call_node)
    with pytest.raises(UnverifiedResult, match="req-OTHER"):
        asyncio.run(client.validation_status("req-MINE"))
    answers["req-MINE"] = certified_reply(manifest, "req-MINE")
    assert asyncio.run(client.validation_status("req-MINE"))["request_id"] == "req-MINE"


def test_the_result_cache_tells_different_requests_with_one_id_apart(manifest: Manifest,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    factory = ProofFactory(manifest.validation_params())
    first, second = factory.proofs("same-id"), factory.proofs("same-id")
    digests = [parse_request("proofs", p).digest for p in (first, second)]
    assert digests[0] != digests[1]
    client = ClusterClient(manifest, cache_results=True)
    sent: list[Any] = []

    async def fake_call(path: str, payload: Any = None, timeout_s: float | None = None,
                        *, deadline: float | None = None) -> Any:
        sent.append(payload)
        return certified_reply(manifest, payload["request_id"], request_digest=parse_request("proofs", payload).digest)

    monkeypatch.setattr(client, "call", fake_call)

    async def three_calls() -> list[dict[str, Any]]:
        return [await client.validate_proofs(p) for p in (first, second, first)]

    a, b, again = asyncio.run(three_calls())
    assert a["request_digest"] == digests[0] and b["request_digest"] == digests[1]
    assert again is a and len(sent) == 2  # the same request again still comes from the cache


def test_one_node_answering_a_forged_result_does_not_hide_the_others(manifest: Manifest,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    client = ClusterClient(manifest)
    forged = certified_reply(manifest, "req-1")
    forged["certificate"]["signatures"] = forged["certificate"]["signatures"][:1]  # short of a quorum
    answers = {"node-1": forged, "node-2": certified_reply(manifest, "req-1")}

    async def fake_call_node(node_id: str, path: str, payload: Any = None, timeout_s: float | None = None,
                             *, deadline: float | None = None) -> Any:
        return answers.get(node_id, {"request_id": "req-1", "status": "Pending"})

    monkeypatch.setattr(client, "call_node", fake_call_node)
    assert asyncio.run(client.validation_status("req-1"))["status"] == "Valid"
    answers["node-2"] = forged  # nobody else has a verifiable one: the forgery is reported
    answers["node-3"] = answers["node-4"] = forged
    with pytest.raises(UnverifiedResult):
        asyncio.run(client.validation_status("req-1"))
