"""docs/PROTOCOL.md's worked example must be what the code actually produces."""

from __future__ import annotations

from pathlib import Path

from transport.envelope import ApiError, ErrorCode, Request, Response, encode_request, encode_response
from transport.framing import FrameDecoder, encode_frames

DOC = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"


def _hexdump(data: bytes) -> str:
    lines = []
    for offset in range(0, len(data), 16):
        chunk = data[offset : offset + 16]
        hexes = " ".join(f"{b:02x}" for b in chunk)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{offset:04x}  {hexes:<47}  {text}".rstrip())
    return "\n".join(lines)


def test_worked_example_matches_the_encoder() -> None:
    doc = DOC.read_text()
    request = encode_request(Request(id="req-0001", path="consensus/health", payload={"verbose": True},
                                     metadata={"trace": "t1"}))
    response = encode_response(Response.success("req-0001", {"status": "ok"}, {"leader": "node-2"}))
    error = encode_response(Response.failure("req-0002", ApiError(ErrorCode.NotFound, "path: no handler for 'x'")))
    for data in (request, response, error):
        assert _hexdump(data) in doc
    assert request.hex() in doc and response.hex() in doc
    assert f"{len(request)} bytes" in doc and f"{len(response)} bytes" in doc and f"{len(error)} bytes" in doc
    frames = encode_frames([b"hi", b""])
    assert " ".join(f"{b:02x}" for b in frames) in doc
    assert FrameDecoder().feed(frames) == [b"hi", b""]


def test_every_error_code_is_documented() -> None:
    doc = DOC.read_text()
    for code in ErrorCode:
        assert f"| `{code}` |" in doc
