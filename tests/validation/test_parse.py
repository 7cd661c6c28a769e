"""Strict parsing: every bad input is a DecodeError naming the field; a seeded mutation
fuzz shows nothing else escapes (bounded iterations)."""

from __future__ import annotations

import copy
import random

import msgpack
import pytest

from consensus.codec import DecodeError, canonical_pack
from consensus.prover import make_certificate_request, make_proof_set
from consensus.requests import MAX_REQUEST_BYTES, decode_request, parse_request
from consensus.validation import ValidationApp, decode_outcome

from .conftest import NOW


@pytest.fixture(scope="module")
def proofs_payload(cluster, mldsa):
    return make_proof_set("p-1", cluster.params, mldsa, NOW, storage=cluster.storage)


@pytest.fixture(scope="module")
def cert_payload(cluster, mldsa):
    return make_certificate_request("c-1", cluster.params, mldsa, NOW, storage=cluster.storage, common_name="a.example.com")


def _set(payload, path, value):
    out = copy.deepcopy(payload)
    node = out
    *parents, last = path.split(".")
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return out


_DELETE = object()

BAD_PROOFS = [
    ("request_id", _DELETE, "request_id", "missing"),
    ("request_id", "", "request_id", "outside"),
    ("request_id", "a" * 129, "request_id", "outside"),
    ("request_id", "has space", "request_id", "[A-Za-z0-9._:-]"),
    ("request_id", "x/../y", "request_id", "[A-Za-z0-9._:-]"),
    ("request_id", 7, "request_id", "expected a string"),
    ("extra", 1, "extra", "unknown"),
    ("proofs", [], "proofs", "expected a map"),
    ("proofs.work", _DELETE, "proofs.work", "missing"),
    ("proofs.work.nonce", "abc", "proofs.work.nonce", "expected bytes"),
    ("proofs.work.nonce", b"", "proofs.work.nonce", "outside"),
    ("proofs.work.challenge", b"\x00" * 33, "proofs.work.challenge", "outside"),
    ("proofs.work.difficulty_bits", 257, "proofs.work.difficulty_bits", "outside"),
    ("proofs.work.difficulty_bits", True, "proofs.work.difficulty_bits", "expected an integer"),
    ("proofs.stake.signature", b"\x00" * 8193, "proofs.stake.signature", "outside"),
    ("proofs.stake.amount", -1, "proofs.stake.amount", "outside"),
    ("proofs.stake.amount", 1.5, "proofs.stake.amount", "expected an integer"),
    ("proofs.stake.scheme", "x" * 33, "proofs.stake.scheme", "outside"),
    ("proofs.stake.public_key", None, "proofs.stake.public_key", "expected bytes"),
    ("proofs.stake.extra", b"", "proofs.stake.extra", "unknown"),
    ("proofs.time.timestamp_ms", "now", "proofs.time.timestamp_ms", "expected an integer"),
    ("proofs.time.timestamp_ms", 1 << 64, "proofs.time.timestamp_ms", "outside"),
    ("proofs.space.root", {"nested": [1, {"x": b""}]}, "proofs.space.root", "expected bytes"),
    ("proofs.space.sealed", b"\x00" * 200_001, "proofs.space.sealed", "outside"),
    ("proofs.space.chunk_size", 0, "proofs.space.chunk_size", "outside"),
    ("proofs.space.kem_ciphertext", _DELETE, "proofs.space.kem_ciphertext", "missing"),
]


@pytest.mark.parametrize(("path", "value", "field", "words"), BAD_PROOFS, ids=[f"{p}={str(v)[:12]}" for p, v, _, _ in BAD_PROOFS])
def test_bad_proofs_payload_names_the_field(proofs_payload, path, value, field, words):
    with pytest.raises(DecodeError) as err:
        parse_request("proofs", _set(proofs_payload, path, value))
    assert err.value.field == field
    assert words in err.value.message


BAD_CERT = [
    ("common_name", "", "common_name", "outside"),
    ("common_name", "a\nb", "common_name", "control"),
    ("san_entries", "a.example.com", "san_entries", "expected a list"),
    ("san_entries", ["ok.example.com", 5], "san_entries.1", "expected a string"),
    ("san_entries", ["x.example.com"] * 1001, "san_entries", "limit"),
    ("validity_days", "90", "validity_days", "expected an integer"),
    ("csr", "not a pem", "csr", "PEM"),
    ("csr", "-----BEGIN CERTIFICATE REQUEST-----\n!!!!\n-----END CERTIFICATE REQUEST-----", "csr", "PEM"),
    ("csr", "-----BEGIN NEW CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----", "csr", "PEM"),
    ("csr", b"\x00" * 16385, "csr", "outside"),
    ("csr", 12, "csr", "expected bytes"),
]


@pytest.mark.parametrize(("path", "value", "field", "words"), BAD_CERT, ids=[f"{p}={str(v)[:12]}" for p, v, _, _ in BAD_CERT])
def test_bad_certificate_payload_names_the_field(cert_payload, path, value, field, words):
    with pytest.raises(DecodeError) as err:
        parse_request("certificate", _set(cert_payload, path, value))
    assert err.value.field == field
    assert words in err.value.message


def test_unknown_kind_and_non_map(proofs_payload):
    with pytest.raises(DecodeError) as err:
        parse_request("bogus", proofs_payload)
    assert err.value.field == "kind"
    with pytest.raises(DecodeError) as err:
        parse_request("proofs", [1, 2])
    assert err.value.field == "payload"
    with pytest.raises(DecodeError) as err:
        parse_request("proofs", {1: 2})
    assert err.value.field == "payload"


def test_pem_csr_is_normalized_to_der(cert_payload):
    import base64
    der = cert_payload["csr"]
    pem = "-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(der).decode() + "-----END CERTIFICATE REQUEST-----\n"
    a = parse_request("certificate", cert_payload)
    b = parse_request("certificate", {**cert_payload, "csr": pem})
    assert b.csr == der and a.encode() == b.encode() and a.digest == b.digest


def test_encode_decode_round_trip(proofs_payload, cert_payload):
    for kind, payload in (("proofs", proofs_payload), ("certificate", cert_payload)):
        request = parse_request(kind, payload)
        assert decode_request(request.encode()) == request
        assert decode_request(request.encode()).encode() == request.encode()


def test_decode_request_rejects_non_canonical_and_oversized(proofs_payload):
    request = parse_request("proofs", proofs_payload)
    unsorted = msgpack.packb({"payload": request.to_payload(), "v": 1, "kind": "proofs"}, use_bin_type=True)
    assert unsorted != request.encode()
    with pytest.raises(DecodeError) as err:
        decode_request(unsorted)
    assert err.value.field == "request" and "canonical" in err.value.message
    with pytest.raises(DecodeError) as err:
        decode_request(request.encode() + b"\x00")
    assert err.value.field == "request"
    with pytest.raises(DecodeError) as err:
        decode_request(b"\x00" * (MAX_REQUEST_BYTES + 1))
    assert "exceeds" in err.value.message
    with pytest.raises(DecodeError) as err:
        decode_request(canonical_pack({"v": 2, "kind": "proofs", "payload": {}}))
    assert err.value.field == "v"


def _mutate(rng: random.Random, value, depth=0):
    """Replace, drop or add something somewhere in a decoded payload."""
    junk = [None, True, -1, 0, 1 << 70, "", "x" * 300, b"", b"\xff" * 40, [], {}, [[[]]], {"a": {"b": 1}}, 1.5]
    if isinstance(value, dict) and value and depth < 6:
        key = rng.choice(sorted(value))
        roll = rng.random()
        if roll < 0.15:
            value.pop(key)
        elif roll < 0.25:
            value[rng.choice(["zz", "proofs", "v", "kind"])] = rng.choice(junk)
        else:
            value[key] = _mutate(rng, value[key], depth + 1)
        return value
    if isinstance(value, list) and value and depth < 6:
        i = rng.randrange(len(value))
        value[i] = _mutate(rng, value[i], depth + 1)
        return value
    if isinstance(value, bytes) and value and rng.random() < 0.5:
        b = bytearray(value)
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)
    return rng.choice(junk)


def test_seeded_mutation_fuzz_only_decode_errors_escape(cluster, proofs_payload, cert_payload):
    """Whatever parses must also precheck and execute without raising (Invalid, not a crash)."""
    rng = random.Random(20261121)
    app = ValidationApp(cluster.params, cluster.kem_private)
    outcomes = {"ok": 0, "error": 0}
    bases = [("proofs", proofs_payload), ("certificate", cert_payload)]
    for _ in range(400):
        kind, base = rng.choice(bases)
        payload = _mutate(rng, copy.deepcopy(base))
        try:
            request = parse_request(kind, payload)
            assert decode_request(request.encode()) == request
            assert decode_outcome(app.execute_batch(1, [request.encode()], NOW)[0]).request_id == request.request_id
            outcomes["ok"] += 1
        except DecodeError as exc:
            assert exc.field
            outcomes["error"] += 1
    # Byte-level mutations of canonical encodings through decode_request.
    encodings = [parse_request(kind, base).encode() for kind, base in bases]
    for _ in range(400):
        data = bytearray(rng.choice(encodings))
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            pos = rng.randrange(len(data))
            if op < 0.6:
                data[pos] = rng.randrange(256)
            elif op < 0.8:
                del data[pos:pos + rng.randint(1, 64)]
            else:
                data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        try:
            decode_request(bytes(data))
            outcomes["ok"] += 1
        except DecodeError:
            outcomes["error"] += 1
        assert len(app.execute_batch(2, [bytes(data)], NOW)) == 1  # never raises
    assert outcomes["error"] > 100 and outcomes["ok"] > 0


def test_pem_without_end_line_is_refused_in_linear_time() -> None:
    """A BEGIN line and a run of whitespace with no END line: the former regex took
    ~30 s for 4,000 spaces (cubic backtracking; `re` holds the GIL, so the node's event
    loop stood still). Run in a child process with a generous deadline, so a regression
    fails instead of hanging the suite."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "from consensus.codec import DecodeError\n"
        "from consensus.requests import _csr\n"
        "try:\n"
        "    _csr('-----BEGIN CERTIFICATE REQUEST-----' + ' ' * 23000 + '\\nAAAA')\n"
        "except DecodeError as exc:\n"
        "    print(exc.message)\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert "PEM" in done.stdout, done.stderr


def test_bytes_with_an_extension_type_are_refused() -> None:
    from consensus.codec import unpack_bounded

    for data in (b"\xc7\x00\x05", msgpack.packb([1, msgpack.ExtType(5, b"")]),
                 msgpack.packb({"v": 1, "kind": "proofs", "payload": msgpack.ExtType(1, b"")})):
        with pytest.raises(DecodeError) as err:
            unpack_bounded(data, max_size=100)
        assert "extension type" in err.value.message  # not let through when empty (max_ext_len=0)
    with pytest.raises(DecodeError):
        decode_request(msgpack.packb({"v": 1, "kind": "proofs", "payload": msgpack.ExtType(1, b"")}))


def test_decode_errors_name_the_request_and_outcome_versions_are_integers() -> None:
    for data in (msgpack.packb([1, 2]), msgpack.packb({b"v": 1})):
        with pytest.raises(DecodeError) as err:
            decode_request(data)
        assert err.value.field == "request"  # the request itself, not its payload
    good = msgpack.packb([1, "r", "proofs", "Valid", [], 5, b"\x00" * 32])
    assert decode_outcome(good).request_id == "r"
    with pytest.raises(DecodeError):
        decode_outcome(msgpack.packb([True, "r", "proofs", "Valid", [], 5, b"\x00" * 32]))
