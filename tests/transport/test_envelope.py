"""Envelope codec: good round trips and every kind of bad input naming its field."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from transport.envelope import (
    PROTOCOL_VERSION,
    ApiError,
    ErrorCode,
    Request,
    Response,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)


def _raw(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "v": 1, "id": "req-1", "service": "hypermesh", "path": "consensus/health", "payload": {"a": 1},
        "metadata": {"trace": "t"},
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not _DROP}


_DROP = object()


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _expect_invalid(data: bytes, starts_with: str, **kwargs: Any) -> ApiError:
    with pytest.raises(ApiError) as info:
        decode_request(data, **kwargs)
    assert info.value.code == ErrorCode.InvalidRequest
    assert info.value.message.startswith(starts_with), info.value.message
    return info.value


def test_request_round_trip() -> None:
    request = Request(id="abc", path="consensus/validate_proofs", payload={"x": [1, b"\x00", None, 1.5]},
                      metadata={"k": "v"})
    decoded = decode_request(encode_request(request))
    assert decoded == request


def test_request_fields_are_packed_in_documented_order() -> None:
    data = encode_request(Request(id="a", path="p"))
    keys = list(msgpack.unpackb(data, raw=False).keys())
    assert keys == ["v", "id", "service", "path", "payload", "metadata"]


def test_response_round_trip_ok_and_error() -> None:
    ok = Response.success("r1", {"status": "Valid"}, {"leader": "node-2"})
    assert decode_response(encode_response(ok)) == ok
    failed = decode_response(encode_response(Response.failure("r2", ApiError(ErrorCode.NotFound, "no such path"))))
    assert not failed.ok and failed.error is not None
    assert failed.error.code == ErrorCode.NotFound and failed.error.message == "no such path"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"id": ""}, "id: must be a string of 1..128 characters"),
        ({"id": "x" * 129}, "id: must be a string of 1..128 characters"),
        ({"id": 5}, "id: must be a string"),
        ({"id": _DROP}, "id: missing"),
        ({"service": "s" * 65}, "service: must be a string of 0..64"),
        ({"service": 1}, "service:"),
        ({"path": ""}, "path: must be a string of 1..128"),
        ({"path": "p" * 129}, "path:"),
        ({"path": b"bytes"}, "path:"),
        ({"path": _DROP}, "path: missing"),
        ({"metadata": [1]}, "metadata: must be a map"),
        ({"metadata": {"k": 1}}, "metadata.k: must be a string"),
        ({"metadata": {"k": "v" * 257}}, "metadata.k:"),
        ({"metadata": {f"k{i}": "v" for i in range(33)}}, "metadata: at most 32 entries"),
        ({"metadata": {b"k": "v"}}, "metadata: keys must be strings"),
        ({"v": "1"}, "v: must be an integer"),
        ({"v": True}, "v: must be an integer"),
        ({"v": _DROP}, "v: missing"),
        ({"extra": 1}, "envelope: unknown field 'extra'"),
    ],
)
def test_bad_fields_name_the_field(overrides: dict[str, Any], field: str) -> None:
    _expect_invalid(_pack(_raw(**overrides)), field)


def test_unknown_version_is_reported_with_both_versions() -> None:
    error = _expect_invalid(_pack(_raw(v=7)), "v:")
    assert error.message == f"v: unsupported protocol version 7 (this server speaks {PROTOCOL_VERSION})"


def test_version_is_checked_before_unknown_fields() -> None:
    # A newer envelope may add fields: the client must learn the version is the problem.
    error = _expect_invalid(_pack({"v": 2, "id": "r", "path": "p", "trace_ctx": {}}), "v:")
    assert error.message == f"v: unsupported protocol version 2 (this server speaks {PROTOCOL_VERSION})"
    _expect_invalid(_pack({"id": "r", "path": "p", "extra": 1}), "v: missing")
    with pytest.raises(ApiError) as info:
        decode_response(_pack({"v": 2, "request_id": "r", "ok": True, "trace_ctx": {}}))
    assert info.value.message.startswith("v: unsupported protocol version 2"), info.value.message


def test_truncated_envelope() -> None:
    data = _pack(_raw())
    for cut in (1, len(data) // 2, len(data) - 1):
        _expect_invalid(data[:cut], "envelope: not valid msgpack")


def test_empty_and_non_map() -> None:
    _expect_invalid(b"", "envelope: empty")
    _expect_invalid(_pack([1, 2, 3]), "envelope: must be a msgpack map")


def test_trailing_bytes() -> None:
    _expect_invalid(_pack(_raw()) + b"\xc0", "envelope: trailing bytes")


def test_oversized_envelope() -> None:
    data = _pack(_raw(payload=b"x" * 2000))
    _expect_invalid(data, "envelope: ", max_bytes=1000)
    assert decode_request(data, max_bytes=len(data)).payload == b"x" * 2000


def test_deeply_nested_payload() -> None:
    payload: Any = 1
    for _ in range(40):
        payload = [payload]
    _expect_invalid(_pack(_raw(payload=payload)), "payload: nested deeper than 32")
    shallow: Any = 1
    for _ in range(30):
        shallow = {"k": shallow}
    assert decode_request(_pack(_raw(payload=shallow))).payload == shallow


def test_extension_types_are_refused() -> None:
    ext = msgpack.packb(_raw(payload=msgpack.ExtType(5, b"abc")), use_bin_type=True)
    _expect_invalid(ext, "envelope: msgpack extension type 5")
    ts = msgpack.packb(_raw(payload=msgpack.Timestamp(1, 0)), use_bin_type=True)
    _expect_invalid(ts, "payload: values of type Timestamp are not allowed")


def test_non_string_map_keys_are_refused() -> None:
    data = msgpack.packb({**_raw(), "payload": {1: "int key"}}, use_bin_type=True, strict_types=False)
    _expect_invalid(data, "envelope: not valid msgpack")


def test_length_bomb_does_not_allocate() -> None:
    # An array header announcing 2**32-1 items in a 10-byte message.
    bomb = b"\x86\xa1v\x01\xa2id\xa1x\xa7payload\xdd\xff\xff\xff\xff"
    _expect_invalid(bomb, "envelope: not valid msgpack")


def test_encode_request_validates_fields() -> None:
    with pytest.raises(ApiError) as info:
        encode_request(Request(id="", path="p"))
    assert info.value.code == ErrorCode.InvalidRequest and info.value.message.startswith("id:")


def test_encode_response_refuses_unencodable_payload() -> None:
    with pytest.raises(ApiError) as info:
        encode_response(Response.success("r", object()))
    assert info.value.code == ErrorCode.SerializationError


@pytest.mark.parametrize(
    ("envelope", "field"),
    [
        ({"v": 1, "request_id": "r", "ok": "yes"}, "ok: must be a boolean"),
        ({"v": 1, "request_id": "r", "ok": True, "error": {"code": "NotFound", "message": ""}}, "error: must be nil"),
        ({"v": 1, "request_id": "r", "ok": False, "error": None}, "error: must be a map"),
        ({"v": 1, "request_id": "r", "ok": False, "error": {"code": 3, "message": ""}}, "error.code:"),
        ({"v": 1, "request_id": 7, "ok": True}, "request_id:"),
        ({"v": 2, "request_id": "r", "ok": True}, "v: unsupported protocol version 2"),
    ],
)
def test_bad_responses_name_the_field(envelope: dict[str, Any], field: str) -> None:
    with pytest.raises(ApiError) as info:
        decode_response(_pack(envelope))
    assert info.value.code == ErrorCode.InvalidRequest
    assert info.value.message.startswith(field), info.value.message


def test_unknown_error_code_from_newer_server_is_kept_visible() -> None:
    data = _pack({"v": 1, "request_id": "r", "ok": False, "error": {"code": "Teapot", "message": "short"}})
    response = decode_response(data)
    assert response.error is not None and response.error.code == ErrorCode.HandlerError
    assert response.error.message == "[Teapot] short"


def test_payload_element_counts_are_bounded() -> None:
    """1 MiB of tiny elements is a million objects to build and walk on the event loop: a
    request's payload may hold 4,096 elements per array or map, 65,536 in all."""
    _expect_invalid(_pack(_raw(payload=[0] * 4097)), "envelope: not valid msgpack")
    _expect_invalid(_pack(_raw(payload={f"k{i}": 0 for i in range(4097)})), "envelope: not valid msgpack")
    _expect_invalid(_pack(_raw(payload=[[{}] * 4096] * 17)), "payload: more than 65536 values in all")
    wide = [[0] * 4096] * 15  # 61,455 values: within the bounds
    assert decode_request(_pack(_raw(payload=wide))).payload == wide
    # Responses (from the server the client chose to trust) may carry longer lists.
    big = _pack({"v": 1, "request_id": "r", "ok": True, "payload": [0] * 5000, "error": None, "metadata": {}})
    assert len(decode_response(big).payload) == 5000


@pytest.mark.parametrize(("data", "reason"), [
    (b"\xc1", "a byte that starts no msgpack value"),
    (b"\x81\x01\x02", "map keys must be strings"),
    (b"\xdb\xff\xff\xff\xff", "truncated: the data ends inside a value"),
    (b"\x91" * 5000, "nested too deeply"),
])
def test_undecodable_envelopes_are_explained_in_protocol_words(data: bytes, reason: str) -> None:
    _expect_invalid(data, f"envelope: not valid msgpack ({reason})")


def test_the_id_of_an_undecodable_request_is_found_without_building_the_rest() -> None:
    from transport.envelope import peek_request_id

    assert peek_request_id(msgpack.packb({"v": 1, "id": "req-1", "path": "x"})) == "req-1"
    # behind 1 MiB of nested empty maps that the bounded decoder refuses: still found
    assert peek_request_id(msgpack.packb({"v": 1, "payload": [[{}] * 4096] * 250, "id": "req-2"})) == "req-2"
    for no_id in (msgpack.packb({"v": 1, "id": 5}), msgpack.packb({"id": "x" * 1000}), msgpack.packb([1, 2]),
                  b"\xff\x00", b"", msgpack.packb({"v": 1})):
        assert peek_request_id(no_id) == ""
