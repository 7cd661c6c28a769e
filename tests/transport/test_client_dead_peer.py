"""A server that dies (kill -9: no CONNECTION_CLOSE, its socket just goes) while the
client holds a connection to it.

The next send gets ECONNREFUSED, and the client gives the connection up and closes its
UDP transport. It used to go on writing the rest of the batch to the closed transport,
and asyncio logged "socket.send() raised exception." for each of those datagrams.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from transport.envelope import ApiError, ErrorCode
from transport.server import StoqServer

from .conftest import Pki, run
from .test_api import _client, serving
from .test_client_liveness import _forget_every_connection

MAX_DATAGRAM = 1200  # the client's default max_datagram_size


def _kill(server: StoqServer) -> None:
    """What kill -9 does, seen from a client: the port closes without a word."""
    endpoint = server._endpoint
    assert endpoint is not None and endpoint.transport is not None
    dead = list(endpoint.live())
    _forget_every_connection(server)
    for protocol in dead:
        # A dead process sends nothing more: a send already scheduled for this loop pass
        # would otherwise re-arm the connection's timer, which then writes to the closed
        # socket and logs the very noise this test looks for on the client's side.
        protocol.transmit = lambda: None  # type: ignore[method-assign]
    endpoint.transport.close()
    server._endpoint = None  # nothing left for stop() to close


def test_a_dead_server_leaves_no_socket_send_noise(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        async with serving(pki.tls("node-1")) as server:
            client = _client(pki, server.port, timeout_s=5, retries=0)
            try:
                # Grow the congestion window: the pacer then lets one transmit send a
                # batch of up to 16 datagrams, and only a batch of 7 or more shows the bug.
                for _ in range(5):
                    await client.call("echo", b"z" * 500_000)
                protocol = client._slots[0]
                assert protocol is not None
                assert protocol._quic._loss.congestion_window // 4 >= 8 * MAX_DATAGRAM
                _kill(server)
                with caplog.at_level(logging.WARNING, logger="asyncio"):
                    with pytest.raises(ApiError) as info:
                        await client.call("echo", b"x" * 50_000)
                    await asyncio.sleep(0.5)  # a timer left armed on the dead connection would fire here
                assert info.value.code == ErrorCode.TransportError
                assert protocol.dead is not None and protocol._timer is None
                noise = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
                assert noise == [], noise
            finally:
                await client.close()

    run(body(), timeout_s=60)
