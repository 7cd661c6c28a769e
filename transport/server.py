"""StoqServer: the STOQ API endpoint (ALPN stoq/1) and inbound peer links (stoq-peer/1).

One UDP socket serves both. Client API: one request per bidirectional stream, answered
with one response and FIN. Peer links: length-prefixed frames handed to a hook, with the
sender named by its verified certificate, never by anything it claims.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any, cast

from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.packet import QuicPacketType, encode_quic_version_negotiation, pull_quic_header
from aioquic.tls import SessionTicket

from .envelope import (
    DEFAULT_MAX_ENVELOPE_BYTES,
    ApiError,
    ErrorCode,
    Response,
    decode_request,
    encode_response,
    peek_request_id,
)
from .framing import DEFAULT_MAX_FRAME_BYTES, FrameDecoder, FrameTooLarge
from .quic import (
    ALPN_API,
    ALPN_PEER,
    CLOSE_FRAME_TOO_LARGE,
    CLOSE_NO_ERROR,
    CLOSE_PROTOCOL_VIOLATION,
    CLOSE_SHUTTING_DOWN,
    CLOSE_UNAUTHORIZED,
    STREAM_TOO_LARGE,
    CoalescingProtocol,
    StoqQuicConnection,
    connection_refused_packet,
    drain,
    enlarge_socket_buffers,
    peer_certificates,
)
from .tls import CertificateError, TlsConfig, verify_client_chain

log = logging.getLogger("transport.server")

PeerFrameHandler = Callable[[str, bytes], None]


@dataclass(slots=True)
class CallContext:
    """What a handler knows about the call. ``response_metadata`` is sent back."""

    request_id: str
    service: str
    path: str
    metadata: dict[str, str]
    remote_address: tuple[Any, ...]
    alpn: str
    peer_identity: str | None
    response_metadata: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Any, CallContext], Awaitable[Any]]


class HandlerRegistry:
    """Handlers by path (e.g. ``consensus/health``)."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def register(self, path: str, handler: Handler) -> None:
        if path in self._handlers:
            raise ValueError(f"a handler for {path!r} is already registered")
        self._handlers[path] = handler

    def get(self, path: str) -> Handler | None:
        return self._handlers.get(path)

    def paths(self) -> list[str]:
        return sorted(self._handlers)


@dataclass(slots=True)
class Limits:
    max_envelope_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES
    max_streams_per_connection: int = 128
    request_timeout_s: float = 30.0
    max_connections: int = 1024
    idle_timeout_s: float = 60.0
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    # A connection whose handshake has not completed by then is closed: half-open
    # connections hold a slot of max_connections each.
    handshake_timeout_s: float = 10.0
    # Request bytes a connection may have in flight on unfinished streams, in all (one
    # stream alone may reach max_envelope_bytes; 128 of them would be 128 MiB).
    max_buffered_request_bytes: int = 4 * DEFAULT_MAX_ENVELOPE_BYTES
    # The same, for all connections together: 1,024 connections of 4 MiB each would be
    # 4 GiB that anyone able to open connections could make the server hold.
    max_total_buffered_request_bytes: int = 64 * DEFAULT_MAX_ENVELOPE_BYTES
    # Response bytes a connection's client has not acknowledged (it reads slowly or not
    # at all) past which its new requests are refused: a stream keeps its slot until
    # its response is read, so 128 unread responses of up to 1 MiB each were 128 MiB.
    max_unread_response_bytes: int = 4 * DEFAULT_MAX_ENVELOPE_BYTES
    # The same, for all connections together: 1,024 connections of 4 MiB each would be
    # 4 GiB of responses held for clients that do not read them.
    max_total_unread_response_bytes: int = 64 * DEFAULT_MAX_ENVELOPE_BYTES
    # 1200 is the QUIC minimum; on loopback 9000 cuts per-packet cost a lot (FACTS.md).
    max_datagram_size: int = 1200


@dataclass(slots=True)
class _Ticket:
    ticket: SessionTicket
    alpn: str | None
    identity: str | None


class SessionTicketStore:
    """Session tickets the server issued, bound to the ALPN and verified identity of the
    connection that got them (a resumed handshake carries no certificate).

    Tickets are single-use. Share one store across a restart to keep resumption."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self._entries: OrderedDict[bytes, _Ticket] = OrderedDict()
        self._max = max_entries

    def add(self, ticket: SessionTicket, alpn: str | None, identity: str | None) -> None:
        self._entries[ticket.ticket] = _Ticket(ticket, alpn, identity)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def take(self, ticket_id: bytes) -> _Ticket | None:
        return self._entries.pop(ticket_id, None)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(slots=True)
class ServerStats:
    connections_accepted: int = 0
    connections_refused: int = 0
    connections_rejected_auth: int = 0
    initials_dropped: int = 0  # first datagrams of would-be connections that did not decrypt
    handshakes_timed_out: int = 0
    sessions_resumed: int = 0
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    peer_frames: int = 0


class _ServerProtocol(CoalescingProtocol):
    def __init__(self, quic: StoqQuicConnection, server: StoqServer, addr: tuple[Any, ...]) -> None:
        super().__init__(quic)
        self._server = server
        self._addr = addr
        self._authorized = False
        self._closed_flag = False
        self._identity: str | None = None
        self._resumed: _Ticket | None = None
        self._issued: list[SessionTicket] = []
        self._held: list[events.QuicEvent] = []
        self._streams: dict[int, bytearray] = {}  # request bytes received so far, until FIN
        self._buffered = 0  # bytes in self._streams, also counted in the server's total
        # Unacknowledged response bytes as last counted, also in the server's total; None
        # once the connection gave its share back (it is gone or the server stopped).
        self._unread: int | None = 0
        # Streams refused as oversized before their FIN: the rest of their bytes is
        # ignored. An id leaves at FIN or reset; until then aioquic holds the stream
        # open, so stream credit (max_streams_per_connection) bounds this set.
        self._refused: set[int] = set()
        self._decoders: dict[int, FrameDecoder] = {}
        self._handshake_deadline = self._loop.call_later(server.limits.handshake_timeout_s, self._handshake_expired)

    def accepted_a_packet(self) -> bool:
        """Whether any packet of this connection decrypted (aioquic learns the peer's
        connection id from the first one). Random bytes shaped like an Initial do not."""
        return self._quic._peer_cid.sequence_number is not None

    def discard(self) -> None:
        """Drop a connection that never existed for the peer: no packet is sent."""
        self._handshake_deadline.cancel()
        for handle in (self._transmit_task, self._timer):
            if handle is not None:
                handle.cancel()
        self._transmit_task = self._timer = None

    def _handshake_expired(self) -> None:
        if not self._authorized and not self._closed_flag:
            self._server.stats.handshakes_timed_out += 1
            log.info("closing a connection from %s: no handshake within %.0f s", self._addr,
                     self._server.limits.handshake_timeout_s)
            self.close(error_code=CLOSE_UNAUTHORIZED, reason_phrase="handshake not completed in time")

    # session tickets (called synchronously by aioquic's TLS engine)
    def fetch_ticket(self, ticket_id: bytes) -> SessionTicket | None:
        entry = self._server.tickets.take(ticket_id)
        if entry is None or entry.alpn != self._quic.tls.alpn_negotiated:
            return None
        if entry.identity is None and self._server._cert_required(entry.alpn):
            return None  # force a full handshake, which asks for a certificate
        # Used only if aioquic accepts the ticket (_authorize checks session_resumed);
        # the client-certificate request then lapses by itself (quic._UnlessResumed).
        self._resumed = entry
        return entry.ticket

    def ticket_issued(self, ticket: SessionTicket) -> None:
        # Stored only once the connection is authorized, bound to its identity.
        self._issued.append(ticket)

    def connection_closing(self, event: Any) -> None:
        # Closed by either side (aioquic reports ConnectionTerminated only after the
        # draining period): a redial from now on is not a sign of a restart.
        self._forget_peer_link()

    def _forget_peer_link(self) -> None:
        if self._identity is not None and self._server._peer_inbound.get(self._identity) is self:
            del self._server._peer_inbound[self._identity]

    @property
    def alpn(self) -> str:
        return self._quic.tls.alpn_negotiated or ""

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.HandshakeCompleted):
            self._handshake_deadline.cancel()
            self._authorize()
            return
        if isinstance(event, events.ConnectionTerminated):
            self._handshake_deadline.cancel()
            self._closed_flag = True
            self._forget_peer_link()
            self._unbuffer(self._buffered)
            self._release_unread()
            self._streams.clear()
            self._refused.clear()
            self._decoders.clear()
            return
        if not self._authorized:
            # Early (0-RTT) data waits for the handshake: a replayed flight never
            # completes one, so nothing it carries is executed.
            if isinstance(event, (events.StreamDataReceived, events.StreamReset)):
                self._held.append(event)
            return
        self._dispatch(event)

    def _dispatch(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            if self.alpn == ALPN_PEER:
                self._peer_data(event)
            else:
                self._api_data(event)
        elif isinstance(event, events.StreamReset):
            self._unbuffer(len(self._streams.pop(event.stream_id, b"")))
            self._refused.discard(event.stream_id)
            self._decoders.pop(event.stream_id, None)

    def _reject(self, reason: str) -> None:
        self._server.stats.connections_rejected_auth += 1
        log.warning("rejecting connection from %s: %s", self._addr, reason)
        self._held.clear()
        self.close(error_code=CLOSE_UNAUTHORIZED, reason_phrase=reason[:200])

    def _authorize(self) -> None:
        server = self._server
        alpn = self._quic.tls.alpn_negotiated
        if self._resumed is not None and self._quic.tls.session_resumed:
            identity = self._resumed.identity
            server.stats.sessions_resumed += 1
        else:
            identity = None
            presented = peer_certificates(self._quic)
            if presented is not None:
                if server.tls.ca_pem is None:
                    return self._reject("client certificate presented but no cluster CA is configured")
                try:
                    identity = verify_client_chain(presented[0], presented[1], server.tls.ca_pem)
                except CertificateError as exc:
                    return self._reject(str(exc))
        if identity is None and server._cert_required(alpn):
            return self._reject("a client certificate signed by the cluster CA is required")
        if alpn == ALPN_PEER and server.peer_frame_handler is None:
            return self._reject("this server does not accept peer connections")
        if alpn == ALPN_PEER and server.peer_members is not None and identity not in server.peer_members:
            # Any certificate of the cluster CA verifies (the client one too): only
            # validators may open a link that buffers whole consensus frames.
            return self._reject(f"{identity!r} is not a validator of this cluster")
        self._identity = identity
        self._authorized = True
        if alpn == ALPN_PEER and identity is not None:
            # A validator dialling us while its previous link to us still looks open has
            # restarted (a killed process sends no close): that old link is dead.
            old = server._peer_inbound.get(identity)
            again = old is not None and old is not self
            server._peer_inbound[identity] = self
            if again:
                old.close(error_code=CLOSE_NO_ERROR, reason_phrase="replaced by a new link from the same validator")
            if server.peer_connected is not None:
                try:
                    server.peer_connected(identity, again)
                except Exception:  # noqa: BLE001 - a consumer bug must not refuse the link
                    log.exception("peer_connected hook failed")
        for ticket in self._issued:
            server.tickets.add(ticket, alpn, identity)
        self._issued.clear()
        held, self._held = self._held, []
        for event in held:
            self._dispatch(event)

    # peer links
    def _peer_data(self, event: events.StreamDataReceived) -> None:
        decoder = self._decoders.get(event.stream_id)
        if decoder is None:
            if self._decoders:
                # A peer sends every frame on its link's one stream (docs/PROTOCOL.md §4);
                # more streams would each buffer up to a whole frame.
                log.warning("peer %s opened a second stream on its link: closing it", self._identity)
                self.close(error_code=CLOSE_PROTOCOL_VIOLATION, reason_phrase="peer links use one stream")
                return
            decoder = self._decoders[event.stream_id] = FrameDecoder(self._server.limits.max_frame_bytes)
        try:
            frames = decoder.feed(event.data)
        except FrameTooLarge as exc:
            log.warning("peer %s sent an oversized frame: %s", self._identity, exc)
            self.close(error_code=CLOSE_FRAME_TOO_LARGE, reason_phrase=str(exc))
            return
        handler = self._server.peer_frame_handler
        assert handler is not None and self._identity is not None
        for frame in frames:
            self._server.stats.peer_frames += 1
            try:
                handler(self._identity, frame)
            except Exception:  # noqa: BLE001 - a consumer bug must not kill the link
                log.exception("peer frame handler failed")

    # client API
    def _api_data(self, event: events.StreamDataReceived) -> None:
        stream_id = event.stream_id
        if stream_id in self._refused:
            # Already answered: bytes that were in flight are never executed.
            if event.end_stream:
                self._refused.discard(stream_id)
            return
        buffer = self._streams.setdefault(stream_id, bytearray())
        buffer += event.data
        self._buffered += len(event.data)
        self._server.buffered_request_bytes += len(event.data)
        limits = self._server.limits
        limit = limits.max_envelope_bytes
        error: ApiError | None = None
        if len(buffer) > limit:
            error = ApiError(ErrorCode.InvalidRequest, f"envelope: request exceeds the limit of {limit} bytes")
        elif not event.end_stream and event.data and self._buffered > limits.max_buffered_request_bytes:
            error = ApiError(ErrorCode.Overloaded, f"more than {limits.max_buffered_request_bytes} bytes of unfinished "
                             "requests on this connection; send each request whole before starting many more")
        elif not event.end_stream and event.data and \
                self._server.buffered_request_bytes > limits.max_total_buffered_request_bytes:
            error = ApiError(ErrorCode.Overloaded, "the server holds too many unfinished requests of all its "
                             "clients; try again shortly, or another node")
        elif event.end_stream and (unread := self._recount_unread()) > limits.max_unread_response_bytes:
            error = ApiError(ErrorCode.Overloaded, f"{unread} bytes of responses on this connection are not read "
                             "yet; read them before sending more requests")
        elif event.end_stream and self._server.unread_response_bytes > limits.max_total_unread_response_bytes:
            error = ApiError(ErrorCode.Overloaded, f"the server holds more than {limits.max_total_unread_response_bytes}"
                             " bytes of responses its clients have not read yet; try again shortly, or another node")
        if event.end_stream or error is not None:
            del self._streams[stream_id]
            self._unbuffer(len(buffer))
        if error is None:
            if event.end_stream:
                self._server._spawn(self._handle(stream_id, bytes(buffer)))
            return
        self._server._count(error.code)
        if event.end_stream:  # a whole request, refused unexecuted: answered by its id
            self._send_response(stream_id, Response.failure(peek_request_id(bytes(buffer)), error))
            return
        # Answer, and tell the client to stop sending the rest.
        self._refused.add(stream_id)
        self._send_response(stream_id, Response.failure("", error))
        try:
            self._quic.stop_stream(stream_id, STREAM_TOO_LARGE)
        except ValueError:
            pass

    def _recount_unread(self) -> int:
        """Bytes sent on this connection's streams and not acknowledged by the client yet;
        brings this connection's share of the server's total up to date."""
        if not self._unread:
            # Only _send_response adds to a stream's send buffer, and it counts what it adds.
            return 0
        unread = sum(len(stream.sender._buffer) for stream in self._quic._streams.values())
        self._server.unread_response_bytes += unread - self._unread
        self._unread = unread
        return unread

    def _release_unread(self) -> None:
        if self._unread is not None:
            self._server.unread_response_bytes -= self._unread
            self._unread = None

    def transmit(self) -> None:
        super().transmit()
        # Send buffers shrink only as acknowledgements are processed (received datagrams)
        # or finished streams are discarded (datagrams_to_send): each is followed by a
        # transmit, so one recount here per loop pass keeps the server's total right
        # without walking every connection's streams on every request.
        self._recount_unread()

    def _unbuffer(self, size: int) -> None:
        self._buffered -= size
        self._server.buffered_request_bytes -= size

    async def _handle(self, stream_id: int, data: bytes) -> None:
        response = await self._server._answer(data, self)
        self._send_response(stream_id, response)

    def _send_response(self, stream_id: int, response: Response) -> None:
        if self._closed_flag:
            return
        limit = self._server.limits.max_envelope_bytes
        try:
            data = encode_response(response, max_bytes=limit)
        except ApiError as exc:
            self._server._count(exc.code)
            data = encode_response(Response.failure(response.request_id, exc), max_bytes=limit)
        try:
            self._quic.send_stream_data(stream_id, data, end_stream=True)
        except (ValueError, AssertionError, RuntimeError):
            # The client stopped the stream meanwhile (aioquic: RuntimeError after a
            # STOP_SENDING reset, ValueError once the stream is discarded).
            return
        if self._unread is not None:
            self._unread += len(data)
            self._server.unread_response_bytes += len(data)
        self.flush_soon()


class _Endpoint:
    """The UDP socket: routes datagrams to connections by connection id."""

    def __init__(self, server: StoqServer) -> None:
        self._server = server
        self._protocols: dict[bytes, _ServerProtocol] = {}
        self.transport: asyncio.DatagramTransport | None = None
        self.accepting = True
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        enlarge_socket_buffers(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def error_received(self, exc: Exception) -> None:
        pass

    def live(self) -> set[_ServerProtocol]:
        return set(self._protocols.values())

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self._route(data, addr)
        for more, more_addr in drain(self.transport):
            self._route(more, more_addr)

    def _route(self, data: bytes, addr: tuple[Any, ...]) -> None:
        server = self._server
        buf = Buffer(data=data)
        try:
            header = pull_quic_header(buf, host_cid_length=8)
        except ValueError:
            return
        assert self.transport is not None
        supported = server._base_config.supported_versions
        if (
            header.packet_type != QuicPacketType.VERSION_NEGOTIATION
            and header.version is not None
            and header.version not in supported
        ):
            self.transport.sendto(
                encode_quic_version_negotiation(
                    source_cid=header.destination_cid, destination_cid=header.source_cid,
                    supported_versions=supported,
                ),
                addr,
            )
            return
        protocol = self._protocols.get(header.destination_cid)
        if protocol is None:
            if header.packet_type != QuicPacketType.INITIAL or len(data) < 1200:
                return
            if not self.accepting or len(self.live()) >= server.limits.max_connections:
                server.stats.connections_refused += 1
                self.transport.sendto(
                    connection_refused_packet(header.version, header.destination_cid, header.source_cid), addr
                )
                return
            protocol = self._accept(header.destination_cid, addr)
            if protocol is None:
                return
            protocol.datagram_received(data, addr)
            if not protocol.accepted_a_packet():
                # Anyone can send 1,200 random bytes shaped like an Initial: keeping
                # such a "connection" until it idles out would let junk fill every slot.
                protocol.discard()
                self._forget(protocol)
                server.stats.initials_dropped += 1
                return
            server.stats.connections_accepted += 1
            return
        protocol.datagram_received(data, addr)

    def _accept(self, original_cid: bytes, addr: tuple[Any, ...]) -> _ServerProtocol | None:
        server = self._server
        try:
            configuration = server._configuration()
        except (OSError, ValueError) as exc:
            log.error("cannot load TLS certificate/key: %s", exc)
            return None
        holder: list[_ServerProtocol] = []
        quic = StoqQuicConnection(
            configuration=configuration,
            original_destination_connection_id=original_cid,
            session_ticket_fetcher=lambda tid: holder[0].fetch_ticket(tid),
            session_ticket_handler=lambda ticket: holder[0].ticket_issued(ticket),
            request_client_cert=server._wants_client_cert,
            max_streams_bidi=server.limits.max_streams_per_connection,
        )
        protocol = _ServerProtocol(quic, server, addr)
        holder.append(protocol)
        protocol.connection_made(self.transport)  # type: ignore[arg-type]
        protocol._connection_id_issued_handler = lambda cid: self._protocols.__setitem__(cid, protocol)
        protocol._connection_id_retired_handler = lambda cid: self._protocols.pop(cid, None)
        protocol._connection_terminated_handler = lambda: self._forget(protocol)
        self._protocols[original_cid] = protocol
        self._protocols[quic.host_cid] = protocol
        return protocol

    def _forget(self, protocol: _ServerProtocol) -> None:
        for cid, proto in list(self._protocols.items()):
            if proto is protocol:
                del self._protocols[cid]


class StoqServer:
    """QUIC server for the STOQ client API and (with ``peer_frame_handler``) peer links."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: HandlerRegistry,
        tls: TlsConfig,
        limits: Limits | None = None,
        *,
        peer_frame_handler: PeerFrameHandler | None = None,
        peer_connected: Callable[[str, bool], None] | None = None,
        peer_members: Collection[str] | None = None,
        ticket_store: SessionTicketStore | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.registry = registry
        self.tls = tls
        self.limits = limits or Limits()
        self.peer_frame_handler = peer_frame_handler
        # called with (the peer's name, whether it replaced an open link of that peer)
        # when a peer link is accepted
        self.peer_connected = peer_connected
        self._peer_inbound: dict[str, _ServerProtocol] = {}  # validator -> its live inbound link
        # Certificate names allowed to open peer links (None: any the cluster CA signed).
        self.peer_members = frozenset(peer_members) if peer_members is not None else None
        self.tickets = ticket_store if ticket_store is not None else SessionTicketStore()
        self.stats = ServerStats()
        self.buffered_request_bytes = 0  # unfinished request bytes of all connections
        self.unread_response_bytes = 0  # unacknowledged response bytes of all connections
        self._endpoint: _Endpoint | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        alpns = [ALPN_API] + ([ALPN_PEER] if peer_frame_handler is not None else [])
        self._base_config = QuicConfiguration(is_client=False, alpn_protocols=alpns)

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) actually bound; use port 0 to get an ephemeral one."""
        assert self._endpoint is not None and self._endpoint.transport is not None
        sockname = self._endpoint.transport.get_extra_info("sockname")
        return sockname[0], sockname[1]

    def connection_count(self) -> int:
        return len(self._endpoint.live()) if self._endpoint else 0

    async def start(self) -> None:
        self.tls.load()  # fail fast on unreadable files
        loop = asyncio.get_running_loop()
        endpoint = _Endpoint(self)
        await loop.create_datagram_endpoint(lambda: endpoint, local_addr=(self.host, self.port))  # type: ignore[arg-type, return-value]
        self._endpoint = endpoint
        self.port = self.address[1]
        log.info("STOQ server listening on [%s]:%d", self.host, self.port)

    async def stop(self, grace_s: float = 5.0, on_grace_expired: Callable[[], None] | None = None) -> None:
        """Refuse new connections, let in-flight requests finish (up to grace), close.
        When the grace runs out, ``on_grace_expired`` may make the handlers still
        running answer at once (the node: "Pending", the request is durable); what is
        still running a second later is cancelled."""
        endpoint = self._endpoint
        if endpoint is None:
            return
        endpoint.accepting = False
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
            if pending and on_grace_expired is not None:
                on_grace_expired()
                _, pending = await asyncio.wait(pending, timeout=1.0)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        for protocol in endpoint.live():
            protocol.close(error_code=CLOSE_SHUTTING_DOWN, reason_phrase="server shutting down")
            protocol._release_unread()  # its ConnectionTerminated will not come: no timer
            if protocol._timer is not None:  # the socket is about to go away
                protocol._timer.cancel()
                protocol._timer = None
        endpoint._protocols.clear()
        if endpoint.transport is not None:
            endpoint.transport.close()
            # The socket is released on a later loop pass; a restart needs the port.
            await asyncio.wait_for(asyncio.shield(endpoint.closed), 5.0)
        self._endpoint = None

    def reload_tls(self) -> None:
        """Re-read the certificate and key now (they are also re-read on mtime change)."""
        self.tls.reload()
        self.tls.load()

    # internals used by the protocol classes
    def _cert_required(self, alpn: str | None) -> bool:
        return alpn == ALPN_PEER or self.tls.client_auth == "required"

    def _wants_client_cert(self, alpn: str | None) -> bool:
        return alpn == ALPN_PEER or self.tls.client_auth != "none"

    def _configuration(self) -> QuicConfiguration:
        leaf, chain, key = self.tls.load()
        limits = self.limits
        return QuicConfiguration(
            is_client=False,
            alpn_protocols=self._base_config.alpn_protocols,
            idle_timeout=limits.idle_timeout_s,
            max_datagram_size=limits.max_datagram_size,
            # A window a bit above the envelope limit lets us see (and refuse) excess.
            max_stream_data=limits.max_envelope_bytes + 65536,
            max_data=max(4 * limits.max_envelope_bytes, 8 << 20),
            certificate=leaf,
            certificate_chain=chain,
            private_key=key,
        )

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _count(self, code: ErrorCode) -> None:
        self.stats.errors[code] = self.stats.errors.get(code, 0) + 1

    async def _answer(self, data: bytes, protocol: _ServerProtocol) -> Response:
        self.stats.requests += 1
        limits = self.limits
        try:
            request = decode_request(data, max_bytes=limits.max_envelope_bytes)
        except ApiError as exc:
            self._count(exc.code)
            return Response.failure(peek_request_id(data), exc)
        if self._endpoint is None or not self._endpoint.accepting:
            # Retryable: the client reconnects (elsewhere or after the restart).
            self._count(ErrorCode.TransportError)
            return Response.failure(request.id, ApiError(ErrorCode.TransportError, "server is shutting down"))
        ctx = CallContext(
            request_id=request.id,
            service=request.service,
            path=request.path,
            metadata=request.metadata,
            remote_address=protocol._addr,
            alpn=protocol.alpn,
            peer_identity=protocol._identity,
        )
        handler = self.registry.get(request.path)
        if handler is None:
            self._count(ErrorCode.NotFound)
            return Response.failure(request.id, ApiError(ErrorCode.NotFound, f"path: no handler for {request.path!r}"))
        started = time.perf_counter()
        try:
            payload = await asyncio.wait_for(handler(request.payload, ctx), limits.request_timeout_s)
        except ApiError as exc:
            self._count(exc.code)
            return Response.failure(request.id, exc, ctx.response_metadata)
        except TimeoutError:
            self._count(ErrorCode.Timeout)
            return Response.failure(
                request.id,
                ApiError(ErrorCode.Timeout, f"request not answered within {limits.request_timeout_s:g} s"),
                ctx.response_metadata,
            )
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - reported generically, logged in full
            log.exception("handler for %s failed (request %s, %.1f ms)", request.path, request.id,
                          (time.perf_counter() - started) * 1000)
            self._count(ErrorCode.HandlerError)
            return Response.failure(
                request.id, ApiError(ErrorCode.HandlerError, "internal error while handling the request"),
                ctx.response_metadata,
            )
        return Response.success(request.id, payload, ctx.response_metadata)
