"""Each proof: valid, and every failure reason (exactly that reason, nothing else)."""

from __future__ import annotations

import dataclasses

import pytest

from consensus.codec import DecodeError
from consensus.crypto import kem_scheme
from consensus.proofs.binding import leading_zero_bits, space_challenges, work_challenge
from consensus.proofs.params import ValidationParams
from consensus.proofs.reasons import CODES
from consensus.prover import FAULTS, HolderKeys, break_proof, make_certificate_request, make_proof_set
from consensus.validation import Outcome, ValidationState, decode_outcome, execute, parse_request, precheck

from .conftest import NOW


def run(cluster, payload, kind="proofs", state=None, agreed=NOW, params=None, kem_private=None) -> Outcome:
    params = params or cluster.params
    request = parse_request(kind, payload)
    pre = precheck(request, params, kem_private or cluster.kem_private)
    return execute(request, pre, state if state is not None else ValidationState(), agreed, params)


@pytest.mark.parametrize("scheme", ["FALCON-1024", "ML-DSA-87", "ML-DSA-65", "ML-DSA-44"])
def test_valid_proof_set_for_every_accepted_scheme(cluster, scheme):
    holder = HolderKeys.generate(scheme)
    out = run(cluster, make_proof_set("ok-1", cluster.params, holder, NOW, storage=cluster.storage))
    assert out.status == "Valid", out.reasons
    assert out.reasons == () and out.request_id == "ok-1" and out.kind == "proofs"
    assert decode_outcome(out.encode()) == out


def test_valid_certificate_request(cluster, falcon):
    payload = make_certificate_request("cert-1", cluster.params, falcon, NOW, storage=cluster.storage,
                                       common_name="api.example.com", san_entries=["api.example.com", "www.example.com", "2001:db8::1"])
    out = run(cluster, payload, "certificate")
    assert out.status == "Valid", out.reasons
    assert out.kind == "certificate"


FAULT_CASES = [(p, h, code) for p, hows in FAULTS.items() for h, code in hows.items()]


@pytest.mark.parametrize(("proof", "how", "code"), FAULT_CASES, ids=[f"{p}-{h}" for p, h, _ in FAULT_CASES])
def test_each_fault_yields_exactly_its_reason(cluster, mldsa, proof, how, code):
    if proof in ("csr", "policy"):
        payload = make_certificate_request("bad-1", cluster.params, mldsa, NOW, storage=cluster.storage,
                                           common_name="a.example.com", fault=(proof, how))
        out = run(cluster, payload, "certificate")
    else:
        out = run(cluster, make_proof_set("bad-1", cluster.params, mldsa, NOW, storage=cluster.storage, fault=(proof, how)))
    assert out.status == "Invalid"
    assert [r.code for r in out.reasons] == [code]
    assert out.reasons[0].proof == proof
    assert decode_outcome(out.encode()) == out


def test_every_documented_code_is_exercised_somewhere():
    """Guards the docs/CODES list against dead or untested codes (see the other tests)."""
    tested_elsewhere = {
        "request.malformed", "time.not_after_previous", "csr.malformed", "csr.invalid_dns_name", "csr.duplicate_san",
        "csr.unsupported_san", "csr.unsupported_key", "csr.weak_key", "policy.validity_too_short", "policy.too_many_san",
        "policy.cn_not_in_san", "policy.wildcard_not_allowed", "policy.ip_not_allowed",
    }
    from_faults = {code for hows in FAULTS.values() for code in hows.values()}
    assert set(CODES) == from_faults | tested_elsewhere


def test_sealed_to_another_cluster_key_fails_aead(cluster, mldsa):
    _pub, other_private = kem_scheme("ML-KEM-1024").generate()
    out = run(cluster, make_proof_set("k-1", cluster.params, mldsa, NOW, storage=cluster.storage), kem_private=other_private)
    assert [r.code for r in out.reasons] == ["space.aead_failed"]


def test_proofs_are_bound_to_the_request_id(cluster, mldsa):
    payload = make_proof_set("bind-1", cluster.params, mldsa, NOW, storage=cluster.storage)
    payload["request_id"] = "bind-2"
    codes = [r.code for r in run(cluster, payload).reasons]
    assert codes == ["work.challenge_mismatch", "stake.bad_signature", "space.aead_failed"]


def test_time_proof_is_covered_by_the_stake_signature(cluster, mldsa):
    payload = make_proof_set("ts-1", cluster.params, mldsa, NOW, storage=cluster.storage)
    codes = [r.code for r in run(cluster, break_proof(payload, "time", "shift")).reasons]
    assert codes == ["stake.bad_signature"]


@pytest.mark.parametrize(("proof", "how", "code"), [
    ("work", "challenge", "work.challenge_mismatch"), ("work", "nonce", "work.difficulty_not_met"),
    ("stake", "signature", "stake.bad_signature"), ("space", "aead", "space.aead_failed"),
    ("space", "kem", "space.decapsulation_failed"),
])
def test_break_proof_on_built_payload(cluster, mldsa, proof, how, code):
    payload = make_proof_set("brk-1", cluster.params, mldsa, NOW, storage=cluster.storage)
    assert [r.code for r in run(cluster, break_proof(payload, proof, how)).reasons] == [code]
    assert run(cluster, payload).status == "Valid"  # break_proof copied, did not mutate


def test_work_uses_the_larger_of_declared_and_cluster_difficulty(cluster, mldsa):
    payload = make_proof_set("diff-1", cluster.params, mldsa, NOW, storage=cluster.storage)
    payload["proofs"]["work"]["difficulty_bits"] = 200  # declared above what the nonce meets
    assert [r.code for r in run(cluster, payload).reasons] == ["work.difficulty_not_met"]
    strict = dataclasses.replace(cluster.params, work_difficulty_bits=40)
    ok_payload = make_proof_set("diff-2", cluster.params, mldsa, NOW, storage=cluster.storage)
    assert [r.code for r in run(cluster, ok_payload, params=strict).reasons] == ["work.difficulty_not_met"]


def test_leading_zero_bits():
    assert leading_zero_bits(bytes(32)) == 256
    assert leading_zero_bits(b"\x80" + bytes(31)) == 0
    assert leading_zero_bits(b"\x00\x01" + bytes(30)) == 15


def test_derivations_are_pinned():
    """Known answers: a change to a byte layout breaks every deployed prover; bump the
    domain tag's version instead, and update docs/PROOFS.md."""
    assert work_challenge("proofs", "r", b"\x00" * 32, b"\x01" * 32).hex()[:16] == WORK_KAT
    assert space_challenges("r", b"\x01" * 32, b"\x02" * 32, 1000, 4) == SPACE_KAT


WORK_KAT = "709e1608151fff14"
SPACE_KAT = [400, 865, 118, 945]


def test_params_round_trip_and_strictness(cluster):
    p = cluster.params
    assert ValidationParams.from_wire(p.to_wire()) == p
    assert ValidationParams.from_json_dict(p.to_json_dict()) == p
    assert isinstance(p.to_json_dict()["kem_public_key"], str)
    assert ValidationParams.from_wire({}) == ValidationParams()
    with pytest.raises(DecodeError) as err:
        ValidationParams.from_wire({"min_stake": "lots"})
    assert err.value.field == "validation"
    with pytest.raises(DecodeError) as err:
        ValidationParams.from_wire({"surprise": 1})
    assert err.value.field == "validation.surprise"
    with pytest.raises(DecodeError) as err:
        ValidationParams.from_json_dict({"kem_public_key": "!!"})
    assert err.value.field == "validation.kem_public_key"
    assert p.digest() != ValidationParams().digest()


def test_docs_list_every_reason_code():
    from pathlib import Path
    text = (Path(__file__).resolve().parents[2] / "docs" / "PROOFS.md").read_text()
    missing = [code for code in CODES if f"`{code}`" not in text]
    assert missing == []


@pytest.mark.parametrize("offset_ms", [30_000, 3_600_000])
def test_a_future_time_proof_stays_outside_the_offset_while_it_is_sent(cluster, mldsa, offset_ms):
    # Made now and sent a moment later (the CLI writes a file, a person runs `call`):
    # it used to be only 1 s past the offset and came back Valid after a slow second.
    params = dataclasses.replace(cluster.params, max_time_offset_ms=offset_ms)
    payload = make_proof_set("future-1", params, mldsa, NOW, storage=cluster.storage, fault=("time", "future"))
    later = NOW + min(offset_ms, 60_000) - 1
    out = run(cluster, payload, agreed=later, params=params)
    assert [r.code for r in out.reasons] == ["time.outside_offset"]
    # ...and never so far ahead that a validator refuses it as expired instead of answering.
    assert payload["proofs"]["time"]["timestamp_ms"] - NOW <= 2 * offset_ms
