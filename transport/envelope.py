"""STOQ request/response envelopes: msgpack maps with bounded, field-checked decoding.

Every decode failure becomes ``ApiError(InvalidRequest, "<field>: <why>")`` so that a
client always learns which field was wrong. See docs/PROTOCOL.md for the wire format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import msgpack

PROTOCOL_VERSION = 1
DEFAULT_MAX_ENVELOPE_BYTES = 1 << 20
MAX_DEPTH = 32
# A request's payload: at most this many elements in one array or map, and in all. A
# legitimate one holds a few dozen (1,000 SAN entries at most); without a bound, 1 MiB of
# empty maps decodes to a million objects that take the event loop a second to check.
MAX_REQUEST_CONTAINER_ITEMS = 4096
MAX_REQUEST_VALUES = 65_536
MAX_ID_CHARS = 128
MAX_SERVICE_CHARS = 64
MAX_PATH_CHARS = 128
MAX_METADATA_ENTRIES = 32
MAX_METADATA_CHARS = 256
MAX_ERROR_MESSAGE_CHARS = 4096
DEFAULT_SERVICE = "hypermesh"

REQUEST_FIELDS = ("v", "id", "service", "path", "payload", "metadata")
RESPONSE_FIELDS = ("v", "request_id", "ok", "payload", "error", "metadata")


class ErrorCode(StrEnum):
    NotFound = "NotFound"
    InvalidRequest = "InvalidRequest"
    HandlerError = "HandlerError"
    SerializationError = "SerializationError"
    TransportError = "TransportError"
    Unauthorized = "Unauthorized"
    RateLimited = "RateLimited"
    Overloaded = "Overloaded"
    Timeout = "Timeout"


class ApiError(Exception):
    """An error with a wire code; raised by handlers and by the client."""

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        self.code = ErrorCode(code)
        self.message = message
        super().__init__(f"{self.code}: {message}")


@dataclass(slots=True)
class Request:
    id: str
    path: str
    payload: Any = None
    service: str = DEFAULT_SERVICE
    metadata: dict[str, str] = field(default_factory=dict)
    v: int = PROTOCOL_VERSION


@dataclass(slots=True)
class Response:
    request_id: str
    ok: bool
    payload: Any = None
    error: ApiError | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    v: int = PROTOCOL_VERSION

    @classmethod
    def success(cls, request_id: str, payload: Any, metadata: dict[str, str] | None = None) -> Response:
        return cls(request_id=request_id, ok=True, payload=payload, metadata=metadata or {})

    @classmethod
    def failure(cls, request_id: str, error: ApiError, metadata: dict[str, str] | None = None) -> Response:
        return cls(request_id=request_id, ok=False, error=error, metadata=metadata or {})


def _invalid(field_name: str, message: str) -> ApiError:
    return ApiError(ErrorCode.InvalidRequest, f"{field_name}: {message}")


class _ExtRefused(Exception):
    pass


def _refuse_ext(code: int, data: bytes) -> Any:
    raise _ExtRefused(code)


def _unpack(data: bytes | bytearray | memoryview, max_bytes: int, what: str, max_items: int | None = None) -> Any:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _invalid(what, f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise _invalid(what, f"{len(data)} bytes exceeds the limit of {max_bytes}")
    if len(data) == 0:
        raise _invalid(what, "empty")
    try:
        # Container lengths are bounded by the input size (msgpack default), so a short
        # message cannot announce a huge array; timestamps (ext -1) are refused below.
        value = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_refuse_ext,
            timestamp=0,
            max_array_len=max_items or len(data),
            max_map_len=max_items or len(data),
        )
    except msgpack.ExtraData:
        raise _invalid(what, "trailing bytes after the envelope") from None
    except _ExtRefused as exc:
        raise _invalid(what, f"msgpack extension type {exc.args[0]} is not allowed") from None
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        raise _invalid(what, f"not valid msgpack ({_why_not_msgpack(exc)})") from None
    return value


def _why_not_msgpack(exc: BaseException) -> str:
    """msgpack's exceptions in the words of PROTOCOL.md, not Python's."""
    text = str(exc)
    if isinstance(exc, (msgpack.StackError, RecursionError)):
        return "nested too deeply"
    if isinstance(exc, msgpack.FormatError):
        return "a byte that starts no msgpack value"
    if "map key" in text:
        return "map keys must be strings"
    if "incomplete input" in text or isinstance(exc, msgpack.OutOfData):
        return "truncated: the data ends inside a value"
    if "exceeds max_" in text:
        return "a container with more elements than the input could hold or the limit allows"
    return f"{type(exc).__name__}: {text[:120]}"


def _check_tree(value: Any, field_name: str, max_values: int | None = None) -> None:
    """Reject nesting deeper than MAX_DEPTH, more than ``max_values`` elements in all,
    and any non-plain type (e.g. Timestamp).

    Iterative so a hostile document cannot exhaust the Python stack."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    budget = max_values
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth >= MAX_DEPTH:
                raise _invalid(field_name, f"nested deeper than {MAX_DEPTH} levels")
            if budget is not None:
                budget -= len(item)
                if budget < 0:
                    raise _invalid(field_name, f"more than {max_values} values in all")
            stack.extend((sub, depth + 1) for sub in (item.values() if isinstance(item, dict) else item))
        elif item is None or isinstance(item, (bool, int, float, str, bytes)):
            continue
        else:
            raise _invalid(field_name, f"values of type {type(item).__name__} are not allowed")


def _check_str(value: Any, field_name: str, lo: int, hi: int) -> str:
    if not isinstance(value, str) or not lo <= len(value) <= hi:
        raise _invalid(field_name, f"must be a string of {lo}..{hi} characters")
    return value


def _check_version(value: Any) -> int:
    if type(value) is not int:
        raise _invalid("v", "must be an integer protocol version")
    if value != PROTOCOL_VERSION:
        raise _invalid("v", f"unsupported protocol version {value} (this server speaks {PROTOCOL_VERSION})")
    return value


def _check_metadata(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _invalid("metadata", "must be a map of string to string")
    if len(value) > MAX_METADATA_ENTRIES:
        raise _invalid("metadata", f"at most {MAX_METADATA_ENTRIES} entries")
    for key, item in value.items():
        if not isinstance(key, str) or not 1 <= len(key) <= MAX_METADATA_CHARS:
            raise _invalid("metadata", f"keys must be strings of 1..{MAX_METADATA_CHARS} characters")
        if not isinstance(item, str) or len(item) > MAX_METADATA_CHARS:
            raise _invalid(f"metadata.{key}", f"must be a string of 0..{MAX_METADATA_CHARS} characters")
    return value


def _check_map(value: Any, allowed: tuple[str, ...], required: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _invalid("envelope", f"must be a msgpack map, got {type(value).__name__}")
    # Version first: a future envelope shape must report the version, not a field.
    if "v" not in value:
        raise _invalid("v", "missing")
    _check_version(value["v"])
    for key in value:
        if not isinstance(key, str) or key not in allowed:
            raise _invalid("envelope", f"unknown field {key!r}")
    for name in required:
        if name not in value:
            raise _invalid(name, "missing")
    return value


def _pack(value: Any, max_bytes: int, what: str) -> bytes:
    try:
        data = msgpack.packb(value, use_bin_type=True, datetime=False)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ApiError(ErrorCode.SerializationError, f"{what}: cannot encode ({str(exc)[:120]})") from None
    if len(data) > max_bytes:
        raise ApiError(ErrorCode.SerializationError, f"{what}: {len(data)} bytes exceeds the limit of {max_bytes}")
    return data


def decode_request(data: bytes | bytearray | memoryview, *, max_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES) -> Request:
    value = _check_map(_unpack(data, max_bytes, "envelope", MAX_REQUEST_CONTAINER_ITEMS), REQUEST_FIELDS, ("id", "path"))
    request_id = _check_str(value["id"], "id", 1, MAX_ID_CHARS)
    service = _check_str(value.get("service", DEFAULT_SERVICE), "service", 0, MAX_SERVICE_CHARS)
    path = _check_str(value["path"], "path", 1, MAX_PATH_CHARS)
    metadata = _check_metadata(value.get("metadata"))
    payload = value.get("payload")
    _check_tree(payload, "payload", MAX_REQUEST_VALUES)
    return Request(id=request_id, path=path, payload=payload, service=service, metadata=metadata)


def encode_request(request: Request, *, max_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES) -> bytes:
    """Validate with the same rules the server applies, then pack in field order."""
    _check_version(request.v)
    _check_str(request.id, "id", 1, MAX_ID_CHARS)
    _check_str(request.service, "service", 0, MAX_SERVICE_CHARS)
    _check_str(request.path, "path", 1, MAX_PATH_CHARS)
    _check_metadata(request.metadata)
    envelope = {
        "v": request.v,
        "id": request.id,
        "service": request.service,
        "path": request.path,
        "payload": request.payload,
        "metadata": request.metadata,
    }
    return _pack(envelope, max_bytes, "request")


def encode_response(response: Response, *, max_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES) -> bytes:
    """Raises ApiError(SerializationError) when the payload cannot be encoded or is too big."""
    error = None
    if response.error is not None:
        error = {"code": str(response.error.code), "message": response.error.message[:MAX_ERROR_MESSAGE_CHARS]}
    envelope = {
        "v": response.v,
        "request_id": response.request_id,
        "ok": response.ok,
        "payload": response.payload,
        "error": error,
        "metadata": response.metadata,
    }
    return _pack(envelope, max_bytes, "response")


def decode_response(data: bytes | bytearray | memoryview, *, max_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES) -> Response:
    value = _check_map(_unpack(data, max_bytes, "envelope"), RESPONSE_FIELDS, ("request_id", "ok"))
    # Empty request_id: the server could not read the id of a malformed request.
    request_id = _check_str(value["request_id"], "request_id", 0, MAX_ID_CHARS)
    ok = value["ok"]
    if not isinstance(ok, bool):
        raise _invalid("ok", "must be a boolean")
    metadata = _check_metadata(value.get("metadata"))
    payload = value.get("payload")
    _check_tree(payload, "payload")
    raw_error = value.get("error")
    error: ApiError | None = None
    if ok:
        if raw_error is not None:
            raise _invalid("error", "must be nil when ok is true")
    else:
        if not isinstance(raw_error, dict) or set(raw_error) != {"code", "message"}:
            raise _invalid("error", "must be a map {code, message} when ok is false")
        code = _check_str(raw_error["code"], "error.code", 1, 64)
        message = _check_str(raw_error["message"], "error.message", 0, MAX_ERROR_MESSAGE_CHARS)
        if code in ErrorCode.__members__:
            error = ApiError(ErrorCode(code), message)
        else:
            # A newer server's code: keep it visible instead of failing the decode.
            error = ApiError(ErrorCode.HandlerError, f"[{code}] {message}")
    return Response(request_id=request_id, ok=ok, payload=payload, error=error, metadata=metadata)


def peek_request_id(data: bytes) -> str:
    """Best effort id of a request that failed to decode, so the error can echo it.
    Reads the top-level map's keys and skips the other values without building them:
    decoding a hostile request a second time, unbounded, cost 100 ms per MiB."""
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(data), max_str_len=MAX_ID_CHARS * 4,
                                max_bin_len=0, max_array_len=0, max_map_len=0, max_ext_len=0)
    unpacker.feed(data)
    try:
        for _ in range(min(unpacker.read_map_header(), 16)):  # an envelope has a handful of fields
            key = unpacker.unpack()
            if key != "id":
                unpacker.skip()
                continue
            rid = unpacker.unpack()
            return rid if isinstance(rid, str) and 1 <= len(rid) <= MAX_ID_CHARS else ""
    except Exception:  # noqa: BLE001 - any garbage simply has no id
        pass
    return ""
