"""Flow-control credit against a peer that sends data out of order and never fills the gap.

aioquic on its own doubles a stream's credit once the highest offset received passes
half of it, and zero-fills the receive buffer up to that offset. One byte just below
each new limit, repeated, made a node allocate gigabytes. The credit must slide over
the bytes delivered in order instead.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aioquic.asyncio import connect
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.rangeset import RangeSet

from transport.quic import ALPN_API, wait_until

from .conftest import Pki, run
from .test_api import HOST, _client, serving

STREAMS = 4
ROUNDS = 6  # enough for the old doubling rule to reach 64× its window (about 270 MiB in all)


def _queue_one_byte_at(quic: Any, stream_id: int, offset: int) -> None:
    """Make the client's aioquic send exactly one byte at ``offset`` of ``stream_id``
    (its public API only writes in order)."""
    sender = quic._get_or_create_stream_for_send(stream_id).sender
    sender._buffer = bytearray(b"x")
    sender._buffer_start, sender._buffer_stop = offset, offset + 1
    sender._pending = RangeSet()
    sender._pending.add(offset, offset + 1)
    sender._acked = RangeSet()
    sender.buffer_is_empty = False
    sender.highest_offset = max(sender.highest_offset, offset)


def _buffered(server_quic: Any) -> int:
    return sum(len(s.receiver._buffer) for s in server_quic._streams.values())


def test_bytes_far_ahead_of_a_gap_buy_no_credit_and_no_memory(pki: Pki) -> None:
    async def body() -> None:
        async with serving(pki.tls("node-1")) as server:
            endpoint = server._endpoint
            assert endpoint is not None
            config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN_API], server_name="node-1",
                                       cadata=pki.ca_pem)
            async with connect(HOST, server.port, configuration=config, wait_connected=True) as attacker:
                quic = attacker._quic
                first = quic.get_next_available_stream_id()
                stream_ids = [first + 4 * i for i in range(STREAMS)]
                sent = {sid: 0 for sid in stream_ids}
                assert await wait_until(lambda: len(endpoint.live()) == 1, 5.0)
                server_quic = next(iter(endpoint.live()))._quic
                stream_window = server_quic._configuration.max_stream_data
                connection_window = server_quic._configuration.max_data
                for _ in range(ROUNDS):
                    for sid in stream_ids:
                        stream = quic._streams.get(sid)
                        limit = stream.max_stream_data_remote if stream else quic._remote_max_stream_data_bidi_remote
                        room = quic._remote_max_data - sum(sent.values())
                        offset = min(limit, sent[sid] + room) - 1
                        if offset > sent[sid]:
                            _queue_one_byte_at(quic, sid, offset)
                            sent[sid] = offset + 1
                    quic._remote_max_data_used = sum(sent.values())
                    attacker.transmit()
                    # The server has read this round once it holds every stream's byte.
                    want = dict(sent)
                    assert await wait_until(lambda: all(
                        sid in server_quic._streams and server_quic._streams[sid].receiver.highest_offset >= want[sid]
                        for sid in stream_ids), 5.0)
                    await asyncio.sleep(0)  # let the server write its next MAX_DATA / MAX_STREAM_DATA
                    attacker.transmit()
                credits = [server_quic._streams[sid].max_stream_data_local for sid in stream_ids]
                assert credits == [stream_window] * STREAMS  # nothing was delivered in order
                assert server_quic._local_max_data.value == connection_window
                assert _buffered(server_quic) <= connection_window
        # the old rule: credits 2**ROUNDS times the window, hundreds of MiB zero-filled

    run(body(), timeout_s=60)


def test_credit_still_slides_for_requests_sent_in_order(pki: Pki) -> None:
    """Twelve 900 KiB requests on one connection, more than its 8 MiB window in all:
    the connection's credit must keep moving as the bytes are read."""

    async def body() -> None:
        async with serving(pki.tls("node-1")) as server, _client(pki, server.port, timeout_s=30) as client:
            blob = b"\x5a" * (900 << 10)
            for index in range(12):
                response = await client.call("echo", {"i": index, "blob": blob})
                assert response["payload"] == {"i": index, "blob": blob}
            replies = await asyncio.gather(*(client.call("echo", {"i": i, "blob": blob}) for i in range(3)))
            assert [r["payload"]["i"] for r in replies] == [0, 1, 2]

    run(body(), timeout_s=60)


def test_credit_still_slides_on_a_long_lived_peer_stream(pki: Pki) -> None:
    """A peer link is one stream for its whole life: 36 MiB of frames over it is nine
    times its 4 MiB stream window and more than twice its 16 MiB connection window."""
    from .test_peers import _all_connected, _cluster

    async def body() -> None:
        nodes = await _cluster(pki, 2)
        try:
            assert await _all_connected(nodes)
            sender, receiver = nodes
            frames = [bytes([i]) * (3 << 20) for i in range(12)]
            for frame in frames:
                sender.mesh.send(receiver.node_id, frame)  # type: ignore[union-attr]
            assert await wait_until(lambda: len(receiver.inbox) == len(frames), 30.0)
            assert [data for _sender, data in receiver.inbox] == frames
        finally:
            for node in nodes:
                await node.stop()

    run(body(), timeout_s=60)
