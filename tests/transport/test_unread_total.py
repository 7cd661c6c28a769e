"""Unread responses of all connections together (Limits.max_total_unread_response_bytes)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol

from transport.client import StoqClient, _ClientProtocol
from transport.envelope import ErrorCode, Request, Response, decode_response, encode_request
from transport.quic import wait_until
from transport.server import CallContext, HandlerRegistry, Limits, StoqServer

from .conftest import Pki, run
from .test_api import _client, _registry, serving

BIG = 30_000  # payload bytes of one response of the "big" handler
TOTAL = 100_000  # the server-wide bound the tests use: 4 big responses cross it, 3 do not


def _limits() -> Limits:
    # Each connection alone stays far below its own bound: only the total can refuse.
    return Limits(max_unread_response_bytes=1_000_000, max_total_unread_response_bytes=TOTAL)


def _big_registry(handled: list[str]) -> HandlerRegistry:
    async def big(payload: Any, ctx: CallContext) -> bytes:
        handled.append(ctx.request_id)
        return b"x" * BIG

    return _registry(big=big)


async def _not_reading(client: StoqClient) -> _ClientProtocol:
    """The client's connection, once it stopped reading: it acknowledges nothing more,
    so what the server sends it stays in the server's send buffers."""
    assert (await client.call("echo", 0))["payload"] == 0  # handshake confirmed both ways
    protocol = await client._connection(5.0)
    assert protocol._transport is not None
    protocol._transport.pause_reading()  # datagrams wait in the socket buffer, none lost
    # Unacknowledged probes would make it give the connection up (client liveness),
    # which hands its bytes back before the test looks: a slow machine must not do that.
    protocol._handle_timer = partial(QuicConnectionProtocol._handle_timer, protocol)  # type: ignore[method-assign]
    return protocol


@dataclass(slots=True)
class _Scene:
    server: StoqServer
    readers: list[StoqClient]  # clients whose connections stopped reading ...
    slow: list[_ClientProtocol]  # ... these connections
    other: StoqClient  # a client that reads its responses


@asynccontextmanager
async def _scene(pki: Pki, readers: int, handled: list[str]) -> AsyncIterator[_Scene]:
    """A server with the tests' bounds, ``readers`` clients whose connections stopped
    reading, and one more client that reads; the clients are closed on the way out."""
    async with serving(pki.tls("node-1"), registry=_big_registry(handled), limits=_limits()) as server:
        clients = [_client(pki, server.port) for _ in range(readers)]
        other = _client(pki, server.port, retries=0)
        try:
            slow = [await _not_reading(client) for client in clients]
            yield _Scene(server, clients, slow, other)
        finally:
            for client in (*clients, other):
                await client.close()


def _read_again(protocol: _ClientProtocol) -> None:
    assert protocol._transport is not None
    protocol._transport.resume_reading()


def _start_big(protocol: _ClientProtocol, request_id: str) -> asyncio.Future[bytes]:
    return protocol.start_request(encode_request(Request(id=request_id, path="big")))[1]


async def _fill_under_bound(server: StoqServer, slow: list[_ClientProtocol], handled: list[str]) -> list[asyncio.Future[bytes]]:
    """3 big responses, alternately to the connections that do not read: 90 KB unread,
    under the 100 KB bound, so each is served."""
    answers: list[asyncio.Future[bytes]] = []
    for i in range(3):
        answers.append(_start_big(slow[i % len(slow)], f"r{i}"))
        assert await wait_until(lambda: len(handled) == i + 1, 10.0)
        assert await wait_until(lambda: server.unread_response_bytes > (i + 1) * BIG, 10.0)
    assert server.unread_response_bytes <= TOTAL
    return answers


def _assert_refused_by_total(response: Response, request_id: str) -> None:
    assert not response.ok and response.request_id == request_id
    assert response.error is not None and response.error.code == ErrorCode.Overloaded
    assert f"the server holds more than {TOTAL} bytes of responses its clients have not read" in response.error.message


def test_unread_responses_of_all_connections_are_bounded_together(pki: Pki) -> None:
    """1,024 connections each within max_unread_response_bytes could still make the server
    hold 4 GiB: past max_total_unread_response_bytes in all, a finished request on any
    connection (one that reads its responses too) is answered Overloaded unexecuted, and
    served again once the slow clients read."""
    handled: list[str] = []

    async def body() -> None:
        async with _scene(pki, 2, handled) as scene:
            server, slow, other = scene.server, scene.slow, scene.other
            answers = await _fill_under_bound(server, slow, handled)
            assert (await other.call("echo", 1))["payload"] == 1  # 90 KB unread: served
            answers.append(_start_big(slow[1], "r3"))  # still 90 KB when it arrives: served
            assert await wait_until(lambda: len(handled) == 4, 10.0)
            assert await wait_until(lambda: server.unread_response_bytes > TOTAL, 10.0)

            _assert_refused_by_total(await other.call_full("big", request_id="r4"), "r4")
            _assert_refused_by_total(await other.call_full("echo", 2, request_id="e2"), "e2")
            assert len(handled) == 4  # refused before any handler ran
            assert server.stats.errors.get(ErrorCode.Overloaded) == 2

            for protocol in slow:
                _read_again(protocol)
            results = [decode_response(await asyncio.wait_for(f, 15.0)) for f in answers]
            assert [(r.ok, r.request_id, len(r.payload)) for r in results] == [(True, f"r{i}", BIG) for i in range(4)]
            assert await wait_until(lambda: server.unread_response_bytes == 0, 15.0)
            assert (await other.call("echo", 3))["payload"] == 3  # read: served again
            assert len(await other.call("big")) == BIG

    run(body(), timeout_s=60.0)


def test_connections_that_close_unread_give_their_share_back(pki: Pki) -> None:
    """Clients that never read and then disconnect leave nothing counted: the total
    returns to 0 and requests are served again."""
    handled: list[str] = []

    async def body() -> None:
        async with _scene(pki, 3, handled) as scene:
            server, other = scene.server, scene.other
            await _fill_under_bound(server, scene.slow, handled)
            answers = [_start_big(scene.slow[0], "r3")]
            assert await wait_until(lambda: len(handled) == 4 and server.unread_response_bytes > TOTAL, 10.0)
            _assert_refused_by_total(await other.call_full("echo", 1, request_id="e1"), "e1")

            for client in scene.readers:
                await client.close()  # none of the 120 KB was read
            assert all(f.done() for f in answers)  # failed by the close, not left hanging
            assert await wait_until(lambda: server.unread_response_bytes == 0, 15.0)
            assert await wait_until(lambda: server.connection_count() == 1, 15.0)  # only `other` is left
            assert (await other.call("echo", 2))["payload"] == 2
            assert len(await other.call("big")) == BIG
            await other.close()
            assert await wait_until(lambda: server.connection_count() == 0, 15.0)
            assert server.unread_response_bytes == 0

    run(body(), timeout_s=60.0)
