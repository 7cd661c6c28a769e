"""The shared primitives: Merkle trees, canonical codec, crypto backends."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from consensus import codec, crypto, merkle
from tests.fuzzing import mutate


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13, 64, 100])
def test_every_inclusion_path_verifies_and_nothing_else_does(size: int) -> None:
    rng = random.Random(size)
    leaves = [rng.randbytes(8) for _ in range(size)]
    root = merkle.root(leaves)
    tree = merkle.MerkleTree([merkle.leaf_hash(leaf) for leaf in leaves])
    assert tree.root == root
    for i, leaf in enumerate(leaves):
        path = merkle.inclusion_path(leaves, i)
        assert tree.path(i) == path
        assert merkle.verify_inclusion(leaf, i, size, path, root)
        assert not merkle.verify_inclusion(leaf + b"!", i, size, path, root)
        assert not merkle.verify_inclusion(leaf, i, size * 4, path, root)  # a tree of another shape
        if path:
            assert not merkle.verify_inclusion(leaf, i, size, path[:-1], root)
            assert not merkle.verify_inclusion(leaf, i, size, [bytes(32)] + path[1:], root)
    # An inner node is never accepted as a leaf (domain separation).
    if size >= 2:
        inner = merkle.node_hash(merkle.leaf_hash(leaves[0]), merkle.leaf_hash(leaves[1]))
        assert not merkle.verify_inclusion_of_hash(inner, 0, size, merkle.inclusion_path(leaves, 0)[1:], root)


def test_rfc9162_known_answer() -> None:
    # Two leaves: root = H(0x01 || H(0x00 || a) || H(0x00 || b)).
    import hashlib

    a, b = b"a", b"b"
    expected = hashlib.sha256(b"\x01" + hashlib.sha256(b"\x00a").digest() + hashlib.sha256(b"\x00b").digest()).digest()
    assert merkle.root([a, b]) == expected
    assert merkle.root([]) == hashlib.sha256(b"").digest()


def test_canonical_encoding_is_independent_of_key_order_and_refuses_floats() -> None:
    assert codec.canonical_pack({"b": 1, "a": [1, b"x"]}) == codec.canonical_pack({"a": [1, b"x"], "b": 1})
    assert codec.digest({"k": (1, 2)}) == codec.digest({"k": [1, 2]})
    with pytest.raises(TypeError):
        codec.canonical_pack({"x": 1.5})
    with pytest.raises(TypeError):
        codec.canonical_pack({1: "int key"})


@pytest.mark.parametrize("data, field_text", [
    (b"\x91" * 50 + b"\x01", "nested deeper"),
    (b"\xc1", "not valid msgpack"),
    (b"\x01\x02", "trailing bytes"),
    (b"\xd4\x01\x00", "not valid msgpack"),  # ext types are refused
    (b"\x81\x01\x02", "not valid msgpack"),  # non-str map keys are refused
    (b"\xdb\xff\xff\xff\xff", "not valid msgpack"),  # a str claiming 4 GiB
])
def test_bounded_decode_refuses_hostile_input(data: bytes, field_text: str) -> None:
    with pytest.raises(codec.DecodeError) as info:
        codec.unpack_bounded(data, max_size=1000, field="payload")
    assert info.value.field == "payload" and field_text in info.value.message


def test_bounded_decode_refuses_oversize_before_parsing() -> None:
    with pytest.raises(codec.DecodeError, match="exceeds the limit"):
        codec.unpack_bounded(b"\xc4\x05hello" * 100, max_size=100)


def test_codec_fuzz_only_raises_decode_error() -> None:
    rng = random.Random(7)
    seeds = [codec.canonical_pack(v) for v in ({"a": [1, 2, {"b": b"x"}]}, [1, "two", None, True], {"k": "v" * 40})]
    for _ in range(3000):
        data = mutate(rng, rng.choice(seeds))
        try:
            codec.unpack_bounded(data, max_size=4096)
        except codec.DecodeError:
            pass


@pytest.mark.parametrize("scheme", crypto.SIGNATURE_SCHEMES)
def test_every_signature_scheme_signs_and_rejects(scheme: str) -> None:
    impl = crypto.signature_scheme(scheme)
    public, private = impl.generate()
    signature = impl.sign(private, b"message")
    assert impl.verify(public, b"message", signature)
    assert not impl.verify(public, b"other message", signature)
    assert not impl.verify(public, b"message", signature[:-1] + bytes([signature[-1] ^ 1]))
    assert not impl.verify(b"short", b"message", signature)  # malformed key: False, not an exception


def test_kem_roundtrip_and_bad_ciphertext() -> None:
    kem = crypto.kem_scheme("ML-KEM-1024")
    public, private = kem.generate()
    ciphertext, shared = kem.encapsulate(public)
    assert kem.decapsulate(private, ciphertext) == shared
    with pytest.raises(crypto.CryptoError):
        kem.decapsulate(private, ciphertext[:-1])
    with pytest.raises(crypto.CryptoError):
        crypto.signature_scheme("RSA-512")


def test_backend_choice_never_triggers_the_liboqs_auto_install() -> None:
    """Without the liboqs library, importing our crypto must not import ``oqs`` (which
    would try to git-clone and build liboqs) and must report the index backend."""
    code = (
        "import sys, consensus.crypto as c; r = c.backend().report(); "
        "print(r['backend'], 'oqs' in sys.modules)"
    )
    env = dict(os.environ, OQS_INSTALL_PATH="/nonexistent")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[2], env=env)
    assert out.returncode == 0, out.stderr
    backend, imported = out.stdout.split()
    if crypto.liboqs_library_path() is None:
        assert (backend, imported) == ("pyca+pqclean", "False")
    else:
        assert backend == "liboqs"


def _reference_depth_ok(value: object, max_depth: int) -> bool:
    """The plain definition: no value of any kind sits deeper than ``max_depth``."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            return False
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
    return True


def _random_value(rng: random.Random, depth: int) -> object:
    kind = rng.randrange(6 if depth < 6 else 3)
    if kind == 0:
        return rng.randrange(100)
    if kind == 1:
        return rng.randbytes(rng.randrange(3))
    if kind == 2:
        return None
    if kind in (3, 4):
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {f"k{i}": _random_value(rng, depth + 1) for i in range(rng.randrange(4))}


def test_check_depth_agrees_with_the_plain_definition() -> None:
    rng = random.Random(7)
    refused = accepted = 0
    for _ in range(3000):
        value, max_depth = _random_value(rng, 0), rng.randrange(5)
        try:
            codec.check_depth(value, max_depth)
            ok = True
        except codec.DecodeError:
            ok = False
        assert ok == _reference_depth_ok(value, max_depth), (value, max_depth)
        refused, accepted = refused + (not ok), accepted + ok
    assert refused > 100 and accepted > 100  # both outcomes were exercised


def test_canonical_fast_path_keeps_the_encoding() -> None:
    value = {"b": [1, b"x", "s", None, True, (2, [3, {"z": 1, "a": -5}])], "a": {"y": [], "x": b""}}
    expected = bytes.fromhex("82a16182a178c400a17990a1629601c40178a173c0c392029203"
                             "82a161fba17a01")
    assert codec.canonical_pack(value) == expected


def test_unsigned_kinds_must_carry_an_empty_signature() -> None:
    """messages.py: unsigned kinds "carry an empty signature"; junk there is refused,
    not carried along (up to 8 KiB per forwarded request)."""
    from consensus.messages import MAGIC, FetchView, decode, encode

    wire = encode("c", "node-1", FetchView(3))
    assert decode(wire).payload == FetchView(3)
    magic, kind, cluster_id, signer, body, _ = codec.unpack_bounded(wire, max_size=1 << 16)
    assert magic == MAGIC
    padded = codec.canonical_pack([magic, kind, cluster_id, signer, body, b"\x00" * 8192])
    with pytest.raises(codec.DecodeError) as err:
        decode(padded)
    assert err.value.field == "message.signature"


def test_pack_trusted_writes_the_canonical_bytes_of_checkpoint_shapes() -> None:
    """Checkpoints pack their (large) state with pack_trusted; every replica must get
    the bytes canonical_pack defines, including tuples from sorted(dict.items())."""
    rng = random.Random(7)
    for _ in range(50):
        heads = {rng.randbytes(32): rng.randrange(1 << 62) for _ in range(rng.randrange(0, 40))}
        executed = {f"req-{rng.randrange(1 << 40)}": rng.randrange(1 << 20) for _ in range(rng.randrange(0, 40))}
        times = {rng.randrange(1 << 20): rng.randrange(-(1 << 62), 1 << 62) for _ in range(rng.randrange(0, 10))}
        value = [codec.pack_trusted([1, sorted(heads.items())]), [rng.randrange(1 << 30), 0, sorted(executed.items()),
                                                                  sorted(times.items())]]
        expected = codec.canonical_pack([codec.canonical_pack([1, [[h, heads[h]] for h in sorted(heads)]]),
                                         [value[1][0], 0, [[r, executed[r]] for r in sorted(executed)],
                                          [[s, times[s]] for s in sorted(times)]]])
        assert codec.pack_trusted(value) == expected


def test_bounded_decode_pauses_the_gc_and_restores_its_state() -> None:
    import gc

    assert gc.isenabled()
    assert codec.unpackb_without_gc(codec.canonical_pack([[1], [2]])) == [[1], [2]]
    assert gc.isenabled()
    gc.disable()
    try:
        codec.unpackb_without_gc(b"\x90")
        assert not gc.isenabled()  # it was off: left off
    finally:
        gc.enable()
    with pytest.raises(codec.DecodeError):
        codec.unpack_bounded(b"\xc1", max_size=10)
    assert gc.isenabled()  # also after a failure


def test_wire_messages_bound_each_array_and_fail_on_the_first_misplaced_element() -> None:
    """A peer's frame of megabytes of tiny arrays: every array is capped at a batch's
    request count, and the typed parser refuses the first element out of place."""
    from consensus.messages import MAGIC, MAX_BATCH_REQUESTS, decode

    too_wide = codec.canonical_pack([MAGIC, "pre-prepare", "c", "n", [1, 1, 0, [[]] * (MAX_BATCH_REQUESTS + 1), b""], b""])
    with pytest.raises(codec.DecodeError, match="max_array_len"):
        decode(too_wide)
    misplaced = codec.canonical_pack([MAGIC, "pre-prepare", "c", "n", [1, 1, 0, [[[]] * 4000] * 50, b"\x00" * 32], b""])
    with pytest.raises(codec.DecodeError) as info:
        decode(misplaced)
    assert info.value.field == "pre-prepare.requests[0]"


def test_request_digest_memo_is_sha256_and_keeps_at_most_its_bytes() -> None:
    import hashlib

    from consensus.messages import _DigestMemo

    memo = _DigestMemo(max_bytes=100)
    blobs = [bytes([i]) * 40 for i in range(5)]
    for blob in blobs:
        assert memo(blob) == hashlib.sha256(blob).digest()
    # 5 x 40 bytes seen, at most 100 kept: the two newest
    assert list(memo._digests) == blobs[3:] and memo._bytes == 80
    assert memo(bytes(blobs[4])) == hashlib.sha256(blobs[4]).digest()  # an equal copy hits
    assert memo(b"x" * 101) == hashlib.sha256(b"x" * 101).digest()  # too large to keep: hashed, not kept
    assert memo._bytes == 80 and b"x" * 101 not in memo._digests
