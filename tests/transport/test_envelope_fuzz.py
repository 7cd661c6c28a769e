"""Seeded mutation fuzzing of the decoders: only ApiError(InvalidRequest) may escape."""

from __future__ import annotations

import random

import msgpack

from transport.envelope import ApiError, ErrorCode, Request, Response, decode_request, decode_response, encode_request, encode_response

SEEDS = [
    encode_request(Request(id="seed-1", path="consensus/validate_proofs",
                           payload={"proofs": [{"nonce": 7, "sig": b"\x01" * 40}], "n": -3, "f": 0.5},
                           metadata={"trace": "abc"})),
    encode_request(Request(id="x", path="p", payload=[[[[None]]]])),
    encode_response(Response.success("seed-1", {"status": "Valid", "votes": [b"a", b"b"]}, {"leader": "n1"})),
    encode_response(Response.failure("seed-2", ApiError(ErrorCode.Timeout, "late"))),
]
INTERESTING = [0x00, 0x7F, 0x80, 0x8F, 0x90, 0xC0, 0xC1, 0xC4, 0xC7, 0xC9, 0xCA, 0xD4, 0xD9, 0xDC, 0xDD,
               0xDE, 0xDF, 0xFF]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        pos = rng.randrange(len(buf)) if buf else 0
        if op == 0 and buf:
            buf[pos] = rng.randrange(256)
        elif op == 1 and buf:
            buf[pos] = rng.choice(INTERESTING)
        elif op == 2:
            buf.insert(pos, rng.randrange(256))
        elif op == 3 and buf:
            del buf[pos : pos + rng.randint(1, 8)]
        elif op == 4:
            buf = buf[: rng.randrange(len(buf) + 1)]
        else:
            buf += bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
    return bytes(buf)


def test_mutation_fuzz_only_invalid_request_escapes() -> None:
    rng = random.Random(20261121)
    outcomes = {"ok": 0, "rejected": 0}
    for i in range(4000):
        data = _mutate(rng, SEEDS[i % len(SEEDS)])
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
