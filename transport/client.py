"""StoqClient: pooled QUIC connections, session resumption with 0-RTT, safe retries.

A request is retried (same id) only when it may not have reached a handler: the
connection failed or closed, the stream was reset, or the server answered
TransportError. Timeouts and application errors are never retried here.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from dataclasses import dataclass
from typing import Any

from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicErrorCode
from aioquic.tls import SessionTicket
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .envelope import (
    DEFAULT_MAX_ENVELOPE_BYTES,
    DEFAULT_SERVICE,
    ApiError,
    ErrorCode,
    Request,
    Response,
    decode_response,
    encode_request,
)
from .quic import ALPN_API, CLOSE_UNAUTHORIZED, BoundedQuicConnection, CoalescingProtocol

log = logging.getLogger("transport.client")

STREAM_CANCELLED = 0x202


class _Retryable(Exception):
    """A failure before any handler could have acted; carries the error to report."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error


def termination_error(event: events.ConnectionTerminated) -> ApiError:
    """Map a QUIC close to an API error; Unauthorized ones are final, others retryable."""
    reason = event.reason_phrase or "no reason given"
    if event.frame_type is None and event.error_code == CLOSE_UNAUTHORIZED:
        return ApiError(ErrorCode.Unauthorized, f"connection rejected: {reason}")
    if event.frame_type is not None and 0x100 <= event.error_code <= 0x1FF:
        hint = ""
        if "issuer" in reason or "self-signed" in reason or "self signed" in reason:
            hint = " (the server's certificate is not from the CA this client trusts: another cluster's directory?)"
        return ApiError(ErrorCode.Unauthorized, f"TLS handshake failed: {reason}{hint}")
    if event.frame_type is not None and event.error_code == QuicErrorCode.CONNECTION_REFUSED:
        return ApiError(ErrorCode.TransportError, "connection refused by the server (overloaded or stopping)")
    return ApiError(ErrorCode.TransportError, f"connection closed (code {event.error_code:#x}): {reason}")


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _failure(error: ApiError) -> Exception:
    return _Retryable(error) if error.code == ErrorCode.TransportError else error


# Probe timeouts in a row with nothing acknowledged before a connection counts as lost.
# Each one doubles the wait: 6 is about 63 probe timeouts of time, 1.7 s on loopback
# (a server ACKs within its 25 ms max_ack_delay however long the request takes to run).
DEAD_AFTER_PROBES = 6


class _ClientProtocol(CoalescingProtocol):
    owns_socket = True

    def __init__(self, quic: QuicConnection, max_bytes: int) -> None:
        super().__init__(quic)
        self.handshake: asyncio.Future[events.HandshakeCompleted] = self._loop.create_future()
        self.dead: ApiError | None = None
        self.in_flight = 0
        self._max = max_bytes
        self._pending: dict[int, tuple[asyncio.Future[bytes], bytearray]] = {}
        self._cancel_when_open: set[int] = set()  # given up while waiting for stream credit

    def start_request(self, data: bytes) -> tuple[int, asyncio.Future[bytes]]:
        if self.dead is not None:
            raise _failure(self.dead)
        stream_id = self._quic.get_next_available_stream_id()
        self._quic.send_stream_data(stream_id, data, end_stream=True)
        future: asyncio.Future[bytes] = self._loop.create_future()
        future.add_done_callback(_retrieve)  # the caller may have given up already
        self._pending[stream_id] = (future, bytearray())
        self.flush_soon()
        return stream_id, future

    def cancel_request(self, stream_id: int) -> None:
        if self._pending.pop(stream_id, None) is None or self.dead is not None:
            return
        if self._waits_for_credit(stream_id):
            # aioquic would send STOP_SENDING/RESET_STREAM for a stream past the server's
            # stream limit, a STREAM_LIMIT_ERROR that closes the whole connection. Cancel
            # it once credit opens it (transmit), before its request bytes go out.
            self._cancel_when_open.add(stream_id)
            return
        self._stop(stream_id)

    def _waits_for_credit(self, stream_id: int) -> bool:
        stream = self._quic._streams.get(stream_id)  # aioquic keeps no public view of this
        return stream is not None and stream.is_blocked

    def _stop(self, stream_id: int) -> None:
        # Each on its own: our request side is usually finished already, and a refused
        # reset must not keep the server from being told to stop sending.
        for stop in (self._quic.stop_stream, self._quic.reset_stream):
            try:
                stop(stream_id, STREAM_CANCELLED)
            except (ValueError, AssertionError, RuntimeError):
                pass
        self.flush_soon()

    def transmit(self) -> None:
        if self._cancel_when_open:  # almost always empty: one test per transmit
            for stream_id in [s for s in self._cancel_when_open if not self._waits_for_credit(s)]:
                self._cancel_when_open.discard(stream_id)
                if stream_id in self._quic._streams:
                    self._stop(stream_id)  # a reset goes out instead of the request (aioquic)
        super().transmit()

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.HandshakeCompleted):
            if not self.handshake.done():
                self.handshake.set_result(event)
        elif isinstance(event, events.StreamDataReceived):
            entry = self._pending.get(event.stream_id)
            if entry is None:
                return
            future, buffer = entry
            buffer += event.data
            if len(buffer) > self._max:
                if not future.done():
                    future.set_exception(
                        ApiError(ErrorCode.SerializationError, f"response: exceeds the limit of {self._max} bytes")
                    )
                self.cancel_request(event.stream_id)
            elif event.end_stream:
                self._pending.pop(event.stream_id, None)
                if not future.done():
                    future.set_result(bytes(buffer))
        elif isinstance(event, events.StreamReset):
            entry = self._pending.pop(event.stream_id, None)
            if entry is not None and not entry[0].done():
                entry[0].set_exception(
                    _Retryable(ApiError(ErrorCode.TransportError, f"stream reset by the server (code {event.error_code:#x})"))
                )
        elif isinstance(event, events.ConnectionTerminated):
            self._fail(termination_error(event))

    def connection_closing(self, event: events.ConnectionTerminated) -> None:
        self._fail(termination_error(event))

    def _handle_timer(self) -> None:
        super()._handle_timer()
        # A server restarted on the same port drops the old connection's packets without a
        # word (no ICMP, and aioquic has no stateless reset), so each call on it would wait
        # for its timeout. Unacknowledged probes show it: give the connection up, and the
        # call's retry dials the new server.
        if self.dead is None and self._quic._loss._pto_count >= DEAD_AFTER_PROBES:
            self._quic.close(error_code=QuicErrorCode.NO_ERROR, reason_phrase="no answer to probes")
            self._fail(ApiError(ErrorCode.TransportError,
                                f"connection lost: the server acknowledged none of {DEAD_AFTER_PROBES} probes in a row "
                                "(restarted or unreachable)"))

    def error_received(self, exc: Exception) -> None:
        # Port unreachable and the like: fail fast instead of waiting for a timeout.
        self._fail(ApiError(ErrorCode.TransportError, f"network error: {exc}"))
        if self._transport is not None:
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ApiError(ErrorCode.TransportError, "socket closed"))

    def _fail(self, error: ApiError) -> None:
        if self.dead is None:
            self.dead = error
        failure = _failure(error)
        if not self.handshake.done():
            self.handshake.set_exception(failure)
            self.handshake.exception()  # mark retrieved: nobody may be waiting
        for future, _ in self._pending.values():
            if not future.done():
                future.set_exception(failure)
        self._pending.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


@dataclass(slots=True)
class ClientStats:
    connections_opened: int = 0
    sessions_resumed: int = 0
    early_data_accepted: int = 0
    retries: int = 0


class StoqClient:
    """Client for one STOQ server address. Use ``async with`` or call ``close()``."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ca_pem: bytes,
        server_name: str,
        client_cert_pem: bytes | None = None,
        client_key_pem: bytes | None = None,
        timeout_s: float = 10.0,
        retries: int = 3,
        backoff_s: float = 0.1,
        max_envelope_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES,
        pool_size: int = 1,
        connect_timeout_s: float = 5.0,
        idle_timeout_s: float = 60.0,
        max_datagram_size: int = 1200,
        alpn: str = ALPN_API,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_envelope_bytes = max_envelope_bytes
        self.connect_timeout_s = connect_timeout_s
        self.stats = ClientStats()
        self.last_response_metadata: dict[str, str] = {}
        self.session_ticket: SessionTicket | None = None
        self._ca_pem = ca_pem
        self._server_name = server_name
        self._alpn = alpn
        self._idle_timeout_s = idle_timeout_s
        self._max_datagram_size = max_datagram_size
        self._cert: list[x509.Certificate] | None = None
        self._key: Any = None
        if (client_cert_pem is None) != (client_key_pem is None):
            raise ValueError("client_cert_pem and client_key_pem go together")
        if client_cert_pem is not None and client_key_pem is not None:
            self._cert = x509.load_pem_x509_certificates(client_cert_pem)
            self._key = serialization.load_pem_private_key(client_key_pem, password=None)
        self._slots: list[_ClientProtocol | None] = [None] * max(1, pool_size)
        self._connecting: list[asyncio.Future[_ClientProtocol] | None] = [None] * len(self._slots)
        self._next = 0
        self._closed = False

    async def __aenter__(self) -> StoqClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        for index, protocol in enumerate(self._slots):
            if protocol is not None:
                self._drop(protocol, graceful=True)
            self._slots[index] = None

    # public calls
    async def call(
        self, path: str, payload: Any = None, *, service: str = DEFAULT_SERVICE,
        metadata: dict[str, str] | None = None, timeout_s: float | None = None,
    ) -> Any:
        """The payload of an ok response; raises ApiError otherwise."""
        response = await self.call_full(path, payload, service=service, metadata=metadata, timeout_s=timeout_s)
        if not response.ok:
            assert response.error is not None
            raise response.error
        return response.payload

    async def call_full(
        self, path: str, payload: Any = None, *, service: str = DEFAULT_SERVICE,
        metadata: dict[str, str] | None = None, timeout_s: float | None = None,
        request_id: str | None = None,
    ) -> Response:
        """The whole response (ok or not); raises ApiError only for transport problems."""
        if self._closed:
            raise ApiError(ErrorCode.TransportError, "client is closed")
        request = Request(id=request_id or uuid.uuid4().hex, path=path, payload=payload,
                          service=service, metadata=dict(metadata or {}))
        data = encode_request(request, max_bytes=self.max_envelope_bytes)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.timeout_s if timeout_s is None else timeout_s)
        delay = self.backoff_s
        attempt = 0
        while True:
            try:
                raw = await self._attempt(data, deadline)
                response = self._decode(raw, request.id)
                if not response.ok and response.error is not None and response.error.code == ErrorCode.TransportError:
                    raise _Retryable(response.error)
                break
            except _Retryable as exc:
                attempt += 1
                wait = delay * (1 + random.random() * 0.25)
                if attempt > self.retries or loop.time() + wait >= deadline:
                    raise exc.error from None
                self.stats.retries += 1
                log.debug("retrying %s after %s (attempt %d)", request.id, exc.error, attempt)
                await asyncio.sleep(wait)
                delay *= 2
        self.last_response_metadata = response.metadata
        return response

    def _decode(self, raw: bytes, request_id: str) -> Response:
        try:
            response = decode_response(raw, max_bytes=self.max_envelope_bytes)
        except ApiError as exc:
            raise ApiError(ErrorCode.SerializationError, f"response {exc.message}") from None
        if response.request_id not in ("", request_id):
            raise ApiError(ErrorCode.SerializationError, "response: request_id does not match the request")
        return response

    async def _attempt(self, data: bytes, deadline: float) -> bytes:
        loop = asyncio.get_running_loop()
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise ApiError(ErrorCode.Timeout, "request not answered in time")
        protocol = await self._connection(min(remaining, self.connect_timeout_s))
        stream_id, future = protocol.start_request(data)
        protocol.in_flight += 1
        try:
            if not protocol.handshake.done():
                # With a ticket the request already left as 0-RTT; still bound the handshake.
                try:
                    await asyncio.wait_for(asyncio.shield(protocol.handshake),
                                           min(deadline - loop.time(), self.connect_timeout_s))
                except TimeoutError:
                    self._drop(protocol)
                    raise _Retryable(ApiError(ErrorCode.TransportError, "handshake timed out")) from None
            try:
                return await asyncio.wait_for(future, max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise ApiError(ErrorCode.Timeout, "request not answered in time") from None
        finally:
            protocol.in_flight -= 1
            if not future.done() or future.cancelled():
                # Timed out, or the caller was cancelled: forget the stream and tell the
                # server, so a late answer finds no future to complete.
                protocol.cancel_request(stream_id)

    async def _connection(self, timeout_s: float) -> _ClientProtocol:
        index = self._next % len(self._slots)
        self._next += 1
        protocol = self._slots[index]
        if protocol is not None and protocol.dead is None:
            return protocol
        if protocol is not None:
            self._drop(protocol)
            self._slots[index] = None
        pending = self._connecting[index]
        if pending is None:
            pending = self._connecting[index] = asyncio.ensure_future(self._open())
            pending.add_done_callback(lambda f, i=index: self._opened(i, f))
        try:
            return await asyncio.wait_for(asyncio.shield(pending), timeout_s)
        except TimeoutError:
            raise _Retryable(ApiError(ErrorCode.TransportError, "connect timed out")) from None

    def _opened(self, index: int, future: asyncio.Future[_ClientProtocol]) -> None:
        self._connecting[index] = None
        if future.cancelled() or future.exception() is not None:
            return
        protocol = future.result()
        if self._closed:
            self._drop(protocol)
        else:
            self._slots[index] = protocol

    async def _open(self) -> _ClientProtocol:
        loop = asyncio.get_running_loop()
        config = QuicConfiguration(
            is_client=True,
            alpn_protocols=[self._alpn],
            server_name=self._server_name,
            cadata=self._ca_pem,
            idle_timeout=self._idle_timeout_s,
            max_datagram_size=self._max_datagram_size,
            max_stream_data=self.max_envelope_bytes + 65536,
        )
        if self._cert is not None:
            config.certificate = self._cert[0]
            config.certificate_chain = self._cert[1:]
            config.private_key = self._key
        ticket = self.session_ticket
        if ticket is not None and ticket.is_valid:
            config.session_ticket = ticket
            self.session_ticket = None  # the server accepts each ticket once
        quic = BoundedQuicConnection(configuration=config, session_ticket_handler=self._ticket_received)
        try:
            transport, protocol = await loop.create_datagram_endpoint(
                lambda: _ClientProtocol(quic, self.max_envelope_bytes), remote_addr=(self.host, self.port)
            )
        except OSError as exc:
            raise _Retryable(ApiError(ErrorCode.TransportError, f"cannot reach {self.host}:{self.port}: {exc}")) from None
        protocol.connect(transport.get_extra_info("peername"))
        protocol.handshake.add_done_callback(self._handshake_done)
        self.stats.connections_opened += 1
        return protocol

    def _handshake_done(self, future: asyncio.Future[events.HandshakeCompleted]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        event = future.result()
        if event.session_resumed:
            self.stats.sessions_resumed += 1
        if event.early_data_accepted:
            self.stats.early_data_accepted += 1

    def _ticket_received(self, ticket: SessionTicket) -> None:
        self.session_ticket = ticket

    def _drop(self, protocol: _ClientProtocol, graceful: bool = False) -> None:
        if protocol.dead is None:
            protocol.close(reason_phrase="client closing" if graceful else "abandoned")
        protocol._fail(ApiError(ErrorCode.TransportError, "connection closed by the client"))
        if protocol._transport is not None:
            protocol._transport.close()
