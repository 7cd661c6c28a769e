"""Client API over real QUIC on [::1]: round trips, errors, limits, pooling, resumption."""

from __future__ import annotations

import asyncio
import time
import gc
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography import x509

from transport.client import StoqClient
from transport.envelope import ApiError, ErrorCode, Response
from transport.quic import ALPN_API, wait_until
from transport.server import CallContext, HandlerRegistry, Limits, SessionTicketStore, StoqServer, _ServerProtocol
from transport.tls import TlsConfig

from .conftest import Pki, run, unused_udp_port

HOST = "::1"


def _registry(**extra: Any) -> HandlerRegistry:
    registry = HandlerRegistry()

    async def echo(payload: Any, ctx: CallContext) -> Any:
        ctx.response_metadata["leader"] = "node-1"
        return {"payload": payload, "id": ctx.request_id, "alpn": ctx.alpn, "who": ctx.peer_identity,
                "meta": ctx.metadata, "remote": ctx.remote_address[0]}

    async def boom(payload: Any, ctx: CallContext) -> Any:
        raise RuntimeError("secret internal detail")

    async def limited(payload: Any, ctx: CallContext) -> Any:
        raise ApiError(ErrorCode.RateLimited, "slow down")

    registry.register("echo", echo)
    registry.register("boom", boom)
    registry.register("limited", limited)
    for path, handler in extra.items():
        registry.register(path, handler)
    return registry


@asynccontextmanager
async def serving(tls: TlsConfig, registry: HandlerRegistry | None = None, limits: Limits | None = None,
                  port: int = 0, tickets: SessionTicketStore | None = None) -> AsyncIterator[StoqServer]:
    server = StoqServer(HOST, port, registry or _registry(), tls, limits, ticket_store=tickets)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace_s=1.0)


def _client(pki: Pki, port: int, **kwargs: Any) -> StoqClient:
    return StoqClient(HOST, port, ca_pem=pki.ca_pem, server_name="node-1", **kwargs)


def test_round_trip(pki: Pki) -> None:
    async def body() -> None:
        async with serving(pki.tls("node-1")) as server, _client(pki, server.port) as client:
            payload = {"bytes": b"\x00\xff", "list": [1, -2, None, True, 1.25], "text": "héllo"}
            response = await client.call_full("echo", payload, metadata={"trace": "abc"}, request_id="req-42")
            assert response.ok and response.request_id == "req-42"
            assert response.payload["payload"] == payload
            assert response.payload["id"] == "req-42"
            assert response.payload["alpn"] == ALPN_API
            assert response.payload["who"] is None
            assert response.payload["meta"] == {"trace": "abc"}
            assert response.payload["remote"] == "::1"
            assert response.metadata == {"leader": "node-1"}
            assert client.last_response_metadata == {"leader": "node-1"}
            assert (await client.call("echo", 5))["payload"] == 5

    run(body())


def test_error_codes(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        async with serving(pki.tls("node-1")) as server, _client(pki, server.port) as client:
            with pytest.raises(ApiError) as info:
                await client.call("no/such/path")
            assert info.value.code == ErrorCode.NotFound and "no/such/path" in info.value.message
            with caplog.at_level(logging.ERROR, logger="transport.server"):
                with pytest.raises(ApiError) as info:
                    await client.call("boom")
            assert info.value.code == ErrorCode.HandlerError
            assert "secret" not in info.value.message  # never leak internals to the client
            assert "secret internal detail" in caplog.text  # but log them in full
            with pytest.raises(ApiError) as info:
                await client.call("limited")
            assert (info.value.code, info.value.message) == (ErrorCode.RateLimited, "slow down")
            assert server.stats.errors == {"NotFound": 1, "HandlerError": 1, "RateLimited": 1}

    run(body())


def test_handler_timeout(pki: Pki) -> None:
    async def body() -> None:
        never = asyncio.Event()

        async def stuck(payload: Any, ctx: CallContext) -> Any:
            await never.wait()

        limits = Limits(request_timeout_s=0.2)
        async with serving(pki.tls("node-1"), _registry(stuck=stuck), limits) as server:
            async with _client(pki, server.port) as client:
                with pytest.raises(ApiError) as info:
                    await client.call("stuck")
                assert info.value.code == ErrorCode.Timeout
                assert client.stats.retries == 0  # a timeout is not retried

    run(body())


def test_client_timeout_is_not_retried(pki: Pki) -> None:
    async def body() -> None:
        calls = 0
        never = asyncio.Event()

        async def stuck(payload: Any, ctx: CallContext) -> Any:
            nonlocal calls
            calls += 1
            await never.wait()

        async with serving(pki.tls("node-1"), _registry(stuck=stuck)) as server:
            async with _client(pki, server.port, timeout_s=0.3) as client:
                with pytest.raises(ApiError) as info:
                    await client.call("stuck")
                assert info.value.code == ErrorCode.Timeout
                assert calls == 1
                never.set()

    run(body())


def test_oversized_request_rejected_and_connection_survives(pki: Pki) -> None:
    async def body() -> None:
        limits = Limits(max_envelope_bytes=4096)
        async with serving(pki.tls("node-1"), limits=limits) as server:
            async with _client(pki, server.port, max_envelope_bytes=1 << 20) as client:
                with pytest.raises(ApiError) as info:
                    await client.call("echo", b"x" * 200_000)
                assert info.value.code == ErrorCode.InvalidRequest
                assert info.value.message == "envelope: request exceeds the limit of 4096 bytes"
                assert (await client.call("echo", b"y" * 1000))["payload"] == b"y" * 1000
                assert client.stats.connections_opened == 1

    run(body())


def test_bytes_in_flight_after_an_oversized_refusal_are_not_executed(pki: Pki) -> None:
    """PROTOCOL.md §2.1: past max_envelope_bytes the server stops reading. Bytes the
    client had already sent on that stream (here a whole envelope and the FIN) must not
    reach a handler, and answering must raise nothing in a server task."""
    async def body() -> None:
        import msgpack

        errors: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
        ran: list[Any] = []

        async def record(payload: Any, ctx: CallContext) -> Any:
            ran.append(payload)
            return "ok"

        limits = Limits(max_envelope_bytes=100_000)
        async with serving(pki.tls("node-1"), _registry(record=record), limits) as server:
            async with _client(pki, server.port, max_datagram_size=1200) as client:
                protocol = await client._connection(5.0)
                quic = protocol._quic
                stream_id = quic.get_next_available_stream_id()
                refused: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
                protocol._pending[stream_id] = (refused, bytearray())
                # Just under the limit; wait until acknowledged so that what follows is
                # sent at once, each write in its own packet (own STREAM frame).
                quic.send_stream_data(stream_id, b"\xc0" * 99_990)
                protocol.transmit()
                sender = quic._streams[stream_id].sender
                assert await wait_until(lambda: sender._buffer_start == 99_990, 5.0)
                quic.send_stream_data(stream_id, b"\xc0" * 20)  # crosses the limit
                protocol.transmit()
                tail = msgpack.packb({"v": 1, "id": "tail", "path": "record", "payload": "tail"})
                quic.send_stream_data(stream_id, tail, end_stream=True)  # in flight before the refusal
                protocol.transmit()
                response = client._decode(await asyncio.wait_for(refused, 5.0), "")
                assert response.error is not None and response.error.code == ErrorCode.InvalidRequest
                # A later request on the same connection is handled after the tail arrived.
                _, probe = protocol.start_request(msgpack.packb({"v": 1, "id": "probe", "path": "record",
                                                                 "payload": "probe"}))
                assert client._decode(await asyncio.wait_for(probe, 5.0), "probe").payload == "ok"
                assert ran == ["probe"]
                assert server.stats.requests == 1
                assert server.stats.errors == {ErrorCode.InvalidRequest: 1}
                # The refused stream ended (FIN): the connection no longer remembers it.
                assert server._endpoint is not None
                assert all(not p._refused for p in server._endpoint.live())
        gc.collect()  # an unretrieved task exception is reported when the task is freed
        assert errors == []

    run(body())


def test_answer_on_a_stream_the_client_stopped_is_dropped_quietly() -> None:
    """aioquic raises RuntimeError for a write after STOP_SENDING reset the stream."""
    def refuse(stream_id: int, data: bytes, end_stream: bool) -> None:
        raise RuntimeError("Cannot send data after the stream was reset")

    protocol = object.__new__(_ServerProtocol)
    protocol._closed_flag = False
    protocol._streams = {}
    protocol._server = SimpleNamespace(limits=Limits())  # type: ignore[assignment]
    protocol._quic = SimpleNamespace(send_stream_data=refuse)  # type: ignore[assignment]
    flushed: list[bool] = []
    protocol.flush_soon = lambda: flushed.append(True)  # type: ignore[method-assign]
    protocol._send_response(0, Response.success("r", "late"))  # must not raise
    assert flushed == []


def test_invalid_envelope_on_the_wire_names_the_field(pki: Pki) -> None:
    async def body() -> None:
        async with serving(pki.tls("node-1")) as server, _client(pki, server.port) as client:
            # Bypass the client's own validation to put a bad envelope on the wire.
            import msgpack

            protocol = await client._connection(5.0)
            bad = msgpack.packb({"v": 1, "id": "r-1", "path": 7})
            _, future = protocol.start_request(bad)
            response = client._decode(await asyncio.wait_for(future, 5.0), "r-1")
            assert not response.ok and response.request_id == "r-1"
            assert response.error is not None and response.error.code == ErrorCode.InvalidRequest
            assert response.error.message.startswith("path: must be a string")
            _, future = protocol.start_request(msgpack.packb({"v": 9, "id": "r-2", "path": "echo"}))
            response = client._decode(await asyncio.wait_for(future, 5.0), "r-2")
            assert response.error is not None
            assert response.error.message == "v: unsupported protocol version 9 (this server speaks 1)"

    run(body())


def test_concurrent_calls_share_one_connection_within_stream_credit(pki: Pki) -> None:
    async def body() -> None:
        active = peak = 0

        async def slow_echo(payload: Any, ctx: CallContext) -> Any:
            nonlocal active, peak
            active += 1
            peak = max(peak, active)
            await asyncio.sleep(0)  # let other requests in, so credit is what limits them
            await asyncio.sleep(0.002)
            active -= 1
            return payload

        limits = Limits(max_streams_per_connection=16)
        async with serving(pki.tls("node-1"), _registry(slow=slow_echo), limits) as server:
            async with _client(pki, server.port) as client:
                results = await asyncio.gather(*(client.call("slow", i) for i in range(300)))
                assert results == list(range(300))
                assert client.stats.connections_opened == 1
                assert server.stats.connections_accepted == 1
                assert 1 < peak <= 16, peak

    run(body(), timeout_s=30)


def test_reconnect_after_restart_resumes_session_with_0rtt(pki: Pki) -> None:
    async def body() -> None:
        tls = pki.tls("node-1")
        tickets = SessionTicketStore()
        async with serving(tls, tickets=tickets) as server:
            port = server.port
            client = _client(pki, port)
            await client.call("echo", 1)
            assert client.stats.sessions_resumed == 0
            assert await wait_until(lambda: client.session_ticket is not None, 5.0)
        # Same port, same ticket store (what a node restart keeps in memory).
        async with serving(tls, port=port, tickets=tickets) as server:
            assert (await client.call("echo", 2))["payload"] == 2
            assert client.stats.connections_opened == 2
            assert client.stats.sessions_resumed == 1
            assert client.stats.early_data_accepted == 1
            assert server.stats.sessions_resumed == 1
        # A server that lost its tickets: full handshake, the call still succeeds.
        async with serving(tls, port=port, tickets=SessionTicketStore()) as server:
            assert (await client.call("echo", 3))["payload"] == 3
            assert client.stats.connections_opened == 3
            assert client.stats.sessions_resumed == 1
            assert server.stats.sessions_resumed == 0
        await client.close()

    run(body())



def test_unreachable_server_gives_transport_error_after_retries(pki: Pki) -> None:
    async def body() -> None:
        async with _client(pki, unused_udp_port(HOST), retries=2, backoff_s=0.01, timeout_s=5) as client:
            with pytest.raises(ApiError) as info:
                await client.call("echo", 1)
            assert info.value.code == ErrorCode.TransportError
            assert client.stats.retries == 2

    run(body())


def test_graceful_stop_finishes_in_flight_then_refuses(pki: Pki) -> None:
    async def body() -> None:
        started = asyncio.Event()
        release = asyncio.Event()

        async def work(payload: Any, ctx: CallContext) -> Any:
            started.set()
            await release.wait()
            return "done"

        server = StoqServer(HOST, 0, _registry(work=work), pki.tls("node-1"))
        await server.start()
        client = _client(pki, server.port, retries=0)
        call = asyncio.ensure_future(client.call("work"))
        await asyncio.wait_for(started.wait(), 5)
        stopping = asyncio.ensure_future(server.stop(grace_s=5))
        await asyncio.sleep(0)
        release.set()
        assert await call == "done"
        await stopping
        with pytest.raises(ApiError) as info:
            await client.call("echo", 1)
        assert info.value.code == ErrorCode.TransportError
        await client.close()

    run(body())


def test_max_connections_refuses_extra_connections(pki: Pki) -> None:
    async def body() -> None:
        async with serving(pki.tls("node-1"), limits=Limits(max_connections=1)) as server:
            async with _client(pki, server.port) as first, _client(pki, server.port, retries=0) as second:
                await first.call("echo", 1)
                with pytest.raises(ApiError) as info:
                    await second.call("echo", 1)
                assert info.value.code == ErrorCode.TransportError
                assert "refused" in info.value.message
                assert server.stats.connections_refused >= 1

    run(body())


def test_certificate_rotation_applies_to_new_connections(pki: Pki) -> None:
    async def body() -> None:
        tls = pki.tls("node-1")

        async def served_serial(port: int) -> int:
            async with _client(pki, port) as client:
                await client.call("echo", 1)
                protocol = client._slots[0]
                assert protocol is not None
                cert: x509.Certificate = protocol._quic.tls._peer_certificate
                return cert.serial_number

        async with serving(tls) as server:
            before = await served_serial(server.port)
            new_cert, new_key = pki.issue("node-1")
            # Key first, then cert; bump mtimes so a coarse clock still sees a change.
            with open(tls.key_file, "wb") as handle:
                handle.write(new_key)
            with open(tls.cert_file, "wb") as handle:
                handle.write(new_cert)
            for path in (tls.cert_file, tls.key_file):
                stat = os.stat(path)
                os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
            after = await served_serial(server.port)
            assert after != before
            assert after == x509.load_pem_x509_certificate(new_cert).serial_number

    run(body())


def test_unencodable_result_is_a_serialization_error(pki: Pki) -> None:
    async def body() -> None:
        async def weird(payload: Any, ctx: CallContext) -> Any:
            return {"not msgpack": object()}

        async def huge(payload: Any, ctx: CallContext) -> Any:
            return b"z" * 10_000

        limits = Limits(max_envelope_bytes=4096)
        async with serving(pki.tls("node-1"), _registry(weird=weird, huge=huge), limits) as server:
            async with _client(pki, server.port) as client:
                for path in ("weird", "huge"):
                    with pytest.raises(ApiError) as info:
                        await client.call(path)
                    assert info.value.code == ErrorCode.SerializationError, path
                assert (await client.call("echo", 1))["payload"] == 1

    run(body())


def test_client_tells_the_server_to_stop_an_oversized_response() -> None:
    """PROTOCOL §2.1: a client that gives up SHOULD send STOP_SENDING (and RESET_STREAM)
    0x202. The oversized-response path used to forget the stream before cancelling it."""
    from aioquic.quic import events

    from transport.client import STREAM_CANCELLED, _ClientProtocol

    async def run() -> tuple[BaseException | None, list[tuple[str, int, int]]]:
        protocol = object.__new__(_ClientProtocol)
        frames: list[tuple[str, int, int]] = []
        protocol._quic = SimpleNamespace(
            stop_stream=lambda stream, code: frames.append(("STOP_SENDING", stream, code)),
            reset_stream=lambda stream, code: frames.append(("RESET_STREAM", stream, code)),
            _streams={0: SimpleNamespace(is_blocked=False)},
        )
        protocol.dead, protocol._max, protocol.flush_soon = None, 10, lambda: None
        future = asyncio.get_running_loop().create_future()
        protocol._pending = {0: (future, bytearray())}
        protocol.quic_event_received(events.StreamDataReceived(data=b"x" * 11, end_stream=False, stream_id=0))
        return future.exception(), frames

    error, frames = asyncio.run(run())
    assert isinstance(error, ApiError) and error.code == ErrorCode.SerializationError
    assert ("STOP_SENDING", 0, STREAM_CANCELLED) in frames and ("RESET_STREAM", 0, STREAM_CANCELLED) in frames


def test_handlers_still_running_when_the_grace_expires_may_answer_before_the_close(pki: Pki) -> None:
    """The node's shutdown: past --shutdown-grace, on_grace_expired lets waiting
    handlers answer (the node says Pending) instead of having their streams cancelled."""
    async def body() -> None:
        started = asyncio.Event()
        release = asyncio.Event()
        expired: list[float] = []

        async def work(payload: Any, ctx: CallContext) -> Any:
            started.set()
            await release.wait()
            return "answered at shutdown"

        def on_grace_expired() -> None:
            expired.append(time.monotonic())
            release.set()

        server = StoqServer(HOST, 0, _registry(work=work), pki.tls("node-1"))
        await server.start()
        client = _client(pki, server.port, retries=0)
        call = asyncio.ensure_future(client.call("work"))
        await asyncio.wait_for(started.wait(), 5)
        began = time.monotonic()
        await server.stop(grace_s=0.2, on_grace_expired=on_grace_expired)
        assert len(expired) == 1 and expired[0] - began >= 0.2
        assert await asyncio.wait_for(call, 5) == "answered at shutdown"
        await client.close()

    run(body())


def test_a_call_that_times_out_behind_the_stream_limit_leaves_the_connection_up(pki: Pki) -> None:
    """The third call's stream waits for stream credit (limit 2); cancelling it must not
    reach the server as a frame for a stream it never allowed (STREAM_LIMIT_ERROR would
    close the connection under the two calls in flight)."""
    async def body() -> None:
        gate = asyncio.Event()
        started = 0

        async def held(payload: Any, ctx: CallContext) -> Any:
            nonlocal started
            started += 1
            await gate.wait()
            return payload

        limits = Limits(max_streams_per_connection=2)
        async with serving(pki.tls("node-1"), _registry(held=held), limits) as server:
            async with _client(pki, server.port, retries=0) as client:
                first = [asyncio.create_task(client.call("held", i, timeout_s=15)) for i in range(2)]
                assert await wait_until(lambda: started == 2, 5.0)
                with pytest.raises(ApiError) as waited:
                    await client.call("held", 2, timeout_s=0.3)
                assert waited.value.code == ErrorCode.Timeout
                await asyncio.sleep(0.2)  # a close caused by the cancel would arrive now
                gate.set()
                assert await asyncio.gather(*first) == [0, 1]
                assert (await client.call("echo", 3))["payload"] == 3
                assert client.stats.connections_opened == 1
                assert started == 2  # the abandoned request never ran

    run(body(), timeout_s=30)
