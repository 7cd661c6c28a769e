"""The client's stream bookkeeping when a caller gives up: a late (or oversized) answer
must find nothing to complete, instead of raising inside the QUIC event handler."""

from __future__ import annotations

import asyncio

import pytest
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from transport.client import StoqClient, _ClientProtocol


def _protocol() -> _ClientProtocol:
    quic = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=["stoq/1"], server_name="n"))
    return _ClientProtocol(quic, max_bytes=1000)


def test_an_oversized_answer_to_a_cancelled_request_is_ignored() -> None:
    async def body() -> None:
        protocol = _protocol()
        stream_id, future = protocol.start_request(b"x")
        future.cancel()
        protocol.quic_event_received(events.StreamDataReceived(data=b"y" * 2000, end_stream=False, stream_id=stream_id))
        assert stream_id not in protocol._pending

    asyncio.run(body())


def test_a_cancelled_caller_forgets_its_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body() -> None:
        protocol = _protocol()
        protocol.handshake.set_result(None)  # type: ignore[arg-type]
        client = StoqClient("::1", 9, ca_pem=None, server_name="n")

        async def connection(_timeout_s: float) -> _ClientProtocol:
            return protocol

        monkeypatch.setattr(client, "_connection", connection)
        call = asyncio.ensure_future(client._attempt(b"request", asyncio.get_running_loop().time() + 30))
        for _ in range(10):  # let it send and wait for the answer
            await asyncio.sleep(0)
        assert len(protocol._pending) == 1 and protocol.in_flight == 1
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert protocol._pending == {} and protocol.in_flight == 0

    asyncio.run(body())
