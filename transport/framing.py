"""Length-prefixed frames for node-to-node streams: 4-byte big-endian length + bytes."""

from __future__ import annotations

from collections.abc import Iterable

# As large as the largest consensus message (consensus/messages.py MAX_MESSAGE_BYTES): a
# view change carries the batches prepared since the last stable checkpoint, a state
# reply the replicated state. A peer link has one stream, so one frame is what a
# (validator) peer can make us buffer.
DEFAULT_MAX_FRAME_BYTES = 64 << 20
HEADER = 4


class FrameTooLarge(Exception):
    pass


def encode_frames(frames: Iterable[bytes]) -> bytes:
    """One buffer for many frames, so a batch becomes one stream write."""
    out = bytearray()
    for frame in frames:
        out += len(frame).to_bytes(HEADER, "big")
        out += frame
    return bytes(out)


class FrameDecoder:
    """Incremental decoder; raises FrameTooLarge as soon as a header announces too much."""

    __slots__ = ("_buffer", "_max")

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self._buffer = bytearray()
        self._max = max_frame_bytes

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        frames: list[bytes] = []
        offset = 0
        buf = self._buffer
        while len(buf) - offset >= HEADER:
            length = int.from_bytes(buf[offset : offset + HEADER], "big")
            if length > self._max:
                raise FrameTooLarge(f"frame of {length} bytes exceeds the limit of {self._max}")
            end = offset + HEADER + length
            if len(buf) < end:
                break
            frames.append(bytes(buf[offset + HEADER : end]))
            offset = end
        if offset:
            del buf[:offset]
        return frames

    @property
    def pending(self) -> int:
        return len(self._buffer)
