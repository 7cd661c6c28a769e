"""Connection slots against datagrams that are not (or never become) connections."""

from __future__ import annotations

import os
import socket

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from transport.quic import ALPN_API, wait_until
from transport.server import Limits

from .conftest import Pki, run
from .test_api import HOST, _client, serving


def _junk_initial() -> bytes:
    """1,200 bytes with a long-header Initial's shape: version 1, random connection ids,
    and a payload that cannot decrypt."""
    header = b"\xc3\x00\x00\x00\x01" + b"\x08" + os.urandom(8) + b"\x08" + os.urandom(8) + b"\x00"
    rest = 1200 - len(header) - 2
    return header + (0x4000 | rest).to_bytes(2, "big") + os.urandom(rest)


def _client_first_flight(port: int) -> list[bytes]:
    """A real client's first datagrams (a valid Initial), never followed by the rest."""
    quic = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=[ALPN_API], server_name="node-1"))
    quic.connect((HOST, port), now=0.0)
    return [data for data, _addr in quic.datagrams_to_send(now=0.0)]


def test_junk_shaped_like_initials_takes_no_connection_slot(pki: Pki) -> None:
    async def body() -> None:
        async with serving(pki.tls("node-1"), limits=Limits(max_connections=4)) as server:
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
                for _ in range(50):
                    sock.sendto(_junk_initial(), (HOST, server.port))
                assert await wait_until(lambda: server.stats.initials_dropped == 50, 5.0)
            assert server.stats.connections_accepted == 0
            client = _client(pki, server.port)
            try:
                assert (await client.call("echo", {"x": 1}))["payload"] == {"x": 1}
            finally:
                await client.close()
            assert server.stats.connections_accepted == 1 and server.stats.connections_refused == 0

    run(body())


def test_a_connection_that_never_completes_its_handshake_is_closed(pki: Pki) -> None:
    async def body() -> None:
        async with serving(pki.tls("node-1"), limits=Limits(handshake_timeout_s=0.3)) as server:
            endpoint = server._endpoint
            assert endpoint is not None
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
                for datagram in _client_first_flight(server.port):
                    sock.sendto(datagram, (HOST, server.port))
                assert await wait_until(lambda: server.stats.connections_accepted == 1, 5.0)
                assert len(endpoint.live()) == 1  # a valid Initial: it holds a slot ...
                assert await wait_until(lambda: server.stats.handshakes_timed_out == 1, 5.0)
                assert await wait_until(lambda: len(endpoint.live()) == 0, 5.0)  # ... until the deadline
            client = _client(pki, server.port)  # completed handshakes are not affected
            try:
                assert (await client.call("echo", 7))["payload"] == 7
                assert await wait_until(lambda: server.stats.connections_accepted == 2, 5.0)
            finally:
                await client.close()
            assert server.stats.handshakes_timed_out == 1

    run(body())


def test_unfinished_requests_on_one_connection_are_bounded_in_all(pki: Pki) -> None:
    """Each unfinished stream may hold up to a whole envelope; many of them together may
    not exceed max_buffered_request_bytes: the stream that crosses it is answered
    Overloaded, and the connection goes on working."""
    import asyncio

    import msgpack

    from transport.envelope import decode_response

    async def body() -> None:
        async with serving(pki.tls("node-1"), limits=Limits(max_buffered_request_bytes=3000)) as server:
            client = _client(pki, server.port)
            try:
                assert (await client.call("echo", 1))["payload"] == 1
                protocol = await client._connection(5.0)
                quic = protocol._quic
                answers: dict[int, asyncio.Future[bytes]] = {}
                for _ in range(4):  # 4 x 1,000 bytes, none finished
                    stream_id = quic.get_next_available_stream_id()
                    answers[stream_id] = asyncio.get_running_loop().create_future()
                    protocol._pending[stream_id] = (answers[stream_id], bytearray())
                    quic.send_stream_data(stream_id, msgpack.packb({"v": 1})[:1] + b"x" * 999, end_stream=False)
                    protocol.flush_soon()
                    await asyncio.sleep(0.05)
                done, _ = await asyncio.wait(list(answers.values()), timeout=5.0, return_when=asyncio.FIRST_COMPLETED)
                assert [answers[s].done() for s in sorted(answers)] == [False, False, False, True]  # crossed 3,000
                error = decode_response(done.pop().result()).error
                assert error is not None and error.code == "Overloaded" and "unfinished" in error.message
                assert (await client.call("echo", 2))["payload"] == 2  # the connection still works
            finally:
                await client.close()

    run(body())


async def _unfinished(protocol: object, size: int) -> "object":
    """Open a request stream and send ``size`` bytes of it without finishing it; the
    future gets the server's answer if it sends one."""
    import asyncio

    import msgpack

    quic = protocol._quic  # type: ignore[attr-defined]
    stream_id = quic.get_next_available_stream_id()
    answer = asyncio.get_running_loop().create_future()
    protocol._pending[stream_id] = (answer, bytearray())  # type: ignore[attr-defined]
    quic.send_stream_data(stream_id, msgpack.packb({"v": 1})[:1] + b"x" * (size - 1), end_stream=False)
    protocol.flush_soon()  # type: ignore[attr-defined]
    return answer


def test_unfinished_requests_of_all_connections_are_bounded_together(pki: Pki) -> None:
    """1,024 connections each within their own bound could still make the server hold
    4 GiB: unfinished request bytes of all connections together stop at
    max_total_buffered_request_bytes, and a closed connection gives its bytes back."""
    from transport.envelope import decode_response

    async def body() -> None:
        limits = Limits(max_buffered_request_bytes=10_000, max_total_buffered_request_bytes=3000)
        async with serving(pki.tls("node-1"), limits=limits) as server:
            first, second = _client(pki, server.port), _client(pki, server.port)
            try:
                a = await first._connection(5.0)
                b = await second._connection(5.0)
                held = [await _unfinished(a, 1000), await _unfinished(a, 1000)]
                assert await wait_until(lambda: server.buffered_request_bytes == 2000, 5.0)
                held.append(await _unfinished(b, 1000))
                assert await wait_until(lambda: server.buffered_request_bytes == 3000, 5.0)
                crossing = await _unfinished(b, 1000)
                assert await wait_until(crossing.done, 5.0)  # type: ignore[attr-defined]
                error = decode_response(crossing.result()).error  # type: ignore[attr-defined]
                assert error is not None and error.code == "Overloaded" and "all its clients" in error.message
                assert not any(f.done() for f in held)  # type: ignore[attr-defined]
                await first.close()  # its 2,000 bytes are given back
                assert await wait_until(lambda: server.buffered_request_bytes == 1000, 5.0)
                assert (await second.call("echo", 3))["payload"] == 3
            finally:
                await first.close()
                await second.close()

    run(body())


def test_a_client_that_does_not_read_its_responses_gets_no_more_work_done(pki: Pki) -> None:
    """A stream keeps its slot until the client has its whole response, so a client that
    never acknowledges made the server hold 128 responses per connection. Past
    max_unread_response_bytes of unread responses, new requests are refused at once."""
    import asyncio

    import msgpack

    from transport.envelope import decode_response

    from .test_api import _registry

    handled: list[int] = []

    async def big(payload: object, ctx: object) -> bytes:
        handled.append(1)
        return b"x" * 30_000

    async def body() -> None:
        limits = Limits(max_unread_response_bytes=100_000)
        async with serving(pki.tls("node-1"), registry=_registry(big=big), limits=limits) as server:
            client = _client(pki, server.port)
            try:
                assert (await client.call("echo", 1))["payload"] == 1  # handshake confirmed both ways
                protocol = await client._connection(5.0)
                protocol.datagram_received = lambda data, addr: None  # type: ignore[method-assign]  # deaf: acks nothing
                futures = []
                for i in range(10):
                    request = msgpack.packb({"v": 1, "id": f"r{i}", "path": "big", "payload": None})
                    futures.append(protocol.start_request(request)[1])
                    assert await wait_until(lambda: len(handled) + server.stats.errors.get("Overloaded", 0) == i + 1, 5.0)
                assert len(handled) == 4  # 4 x 30 KB unread: 120 KB > 100 KB
                assert server.stats.errors.get("Overloaded", 0) == 6
                del protocol.datagram_received  # hears again: everything arrives
                answers = [decode_response(await asyncio.wait_for(f, 10.0)) for f in futures]
                assert [a.ok for a in answers] == [True] * 4 + [False] * 6
                assert answers[4].error is not None and "not read yet" in answers[4].error.message
                assert answers[4].request_id == "r4"
                assert (await client.call("echo", 5))["payload"] == 5  # read: served again
            finally:
                await client.close()

    run(body())
