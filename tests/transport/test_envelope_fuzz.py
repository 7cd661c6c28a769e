"""Seeded mutation fuzzing of the decoders: only ApiError(InvalidRequest) may escape."""

from __future__ import annotations

import random

import msgpack

from tests.fuzzing import mutate
from transport.envelope import ApiError, ErrorCode, Request, Response, decode_request, decode_response, encode_request, encode_response

SEEDS = [
    encode_request(Request(id="seed-1", path="consensus/validate_proofs",
                           payload={"proofs": [{"nonce": 7, "sig": b"\x01" * 40}], "n": -3, "f": 0.5},
                           metadata={"trace": "abc"})),
    encode_request(Request(id="x", path="p", payload=[[[[None]]]])),
    encode_response(Response.success("seed-1", {"status": "Valid", "votes": [b"a", b"b"]}, {"leader": "n1"})),
    encode_response(Response.failure("seed-2", ApiError(ErrorCode.Timeout, "late"))),
]
def test_mutation_fuzz_only_invalid_request_escapes() -> None:
    rng = random.Random(20261121)
    outcomes = {"ok": 0, "rejected": 0}
    for i in range(4000):
        data = mutate(rng, SEEDS[i % len(SEEDS)])
        for decode in (decode_request, decode_response):
            try:
                decode(data, max_bytes=4096)
                outcomes["ok"] += 1
            except ApiError as exc:
                assert exc.code in (ErrorCode.InvalidRequest, ErrorCode.SerializationError), exc
                assert ":" in exc.message  # names a field
                outcomes["rejected"] += 1
    # Both branches must actually be exercised, or the fuzzer is not fuzzing.
    assert outcomes["rejected"] > 1000 and outcomes["ok"] > 50, outcomes


def test_random_msgpack_values_never_crash_the_decoder() -> None:
    rng = random.Random(7)

    def value(depth: int) -> object:
        kind = rng.randrange(8 if depth < 6 else 5)
        if kind == 0:
            return rng.randint(-(2**63), 2**64 - 1)
        if kind == 1:
            return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(6)))
        if kind == 2:
            return bytes(rng.randrange(256) for _ in range(rng.randrange(6)))
        if kind == 3:
            return rng.choice([None, True, False, 1.5])
        if kind == 4:
            return rng.choice(["v", "id", "path", "payload", "metadata", "ok", "error", "request_id"])
        if kind == 5:
            return [value(depth + 1) for _ in range(rng.randrange(4))]
        return {str(value(depth + 1))[:10]: value(depth + 1) for _ in range(rng.randrange(5))}

    for _ in range(1500):
        envelope = {k: value(1) for k in rng.sample(["v", "id", "service", "path", "payload", "metadata"], 4)}
        if rng.random() < 0.5:
            envelope["v"] = 1
        data = msgpack.packb(envelope, use_bin_type=True)
        try:
            decode_request(data)
        except ApiError as exc:
            assert exc.code == ErrorCode.InvalidRequest
