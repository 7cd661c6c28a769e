"""Seeded byte-level mutation shared by the fuzz tests of every untrusted decoder."""

from __future__ import annotations

import random

# msgpack type bytes worth planting: fixmap/fixarray/fixstr edges, nil, the never-used
# 0xC1, bin/ext/float/str/array/map headers with length fields, negative fixint
INTERESTING = [0x00, 0x7F, 0x80, 0x8F, 0x90, 0xC0, 0xC1, 0xC4, 0xC7, 0xC9, 0xCA, 0xD4, 0xD9, 0xDC, 0xDD,
               0xDE, 0xDF, 0xFF]


def mutate(rng: random.Random, data: bytes) -> bytes:
    """1-4 edits: overwrite, plant a type byte, insert, delete a run, truncate, append."""
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
