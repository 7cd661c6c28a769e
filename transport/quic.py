"""aioquic glue shared by the server, the client and the peer mesh.

Two things aioquic does not offer publicly live here: asking a client for its
certificate (``StoqQuicConnection``) and reading what it sent (``peer_certificates``).
The protocol base class sends at most once per event-loop pass (FACTS.md: calling
``transmit()`` after every stream write is what makes default aioquic slow).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.buffer import Buffer
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE
from aioquic.quic.connection import TRANSPORT_CLOSE_FRAME_CAPACITY, Limit, QuicConnection
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import QuicErrorCode, QuicFrameType, QuicPacketType
from aioquic.quic.packet_builder import QuicPacketBuilder
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

ALPN_API = "stoq/1"
ALPN_PEER = "stoq-peer/1"

# Application close codes (QUIC CONNECTION_CLOSE type 0x1d); see docs/PROTOCOL.md.
CLOSE_NO_ERROR = 0x0
CLOSE_UNAUTHORIZED = 0x101
CLOSE_FRAME_TOO_LARGE = 0x102
CLOSE_SHUTTING_DOWN = 0x103
CLOSE_PROTOCOL_VIOLATION = 0x104
# Stream error code used with RESET_STREAM / STOP_SENDING for an oversized request.
STREAM_TOO_LARGE = 0x201

# UDP socket buffers. Linux defaults to ~208 KiB: one batch of pre-prepares (hundreds of
# KB in 9000-byte datagrams) overflows it whenever the receiver is not scheduled for a
# few ms, and every dropped datagram costs a retransmission plus a congestion-window cut.
# The kernel caps the request at net.core.rmem_max / wmem_max (docs/OPERATIONS.md).
UDP_BUFFER_BYTES = 8 << 20

log = logging.getLogger("hypermesh.transport")


def enlarge_socket_buffers(transport: asyncio.BaseTransport, size: int = UDP_BUFFER_BYTES) -> tuple[int, int]:
    """Ask for ``size``-byte receive and send buffers; returns what the kernel granted
    (Linux reports twice the usable size) so callers and tests can see the effect."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return (0, 0)
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, size)
        except OSError as exc:  # a sandbox may refuse; the defaults still work, only slower
            log.debug("cannot set UDP buffer option %d to %d: %s", option, size, exc)
    granted = (sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF), sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
    if granted[0] < size:
        log.debug("UDP receive buffer is %d bytes (asked %d): raise net.core.rmem_max for bursty peers", granted[0], size)
    return granted


class _UnlessResumed:
    """Truthy until the handshake resumes a session. A resumed (PSK) handshake must not
    wait for a client certificate (RFC 8446 4.3.2); a full one must ask for one, also
    when aioquic refuses the ticket the client offered (expired, other cipher suite)
    after the server looked it up. aioquic reads the flag after deciding."""

    __slots__ = ("_tls",)

    def __init__(self, tls: Any) -> None:
        self._tls = tls

    def __bool__(self) -> bool:
        return not self._tls.session_resumed


class BoundedQuicConnection(QuicConnection):
    """QuicConnection whose flow-control credit slides over the bytes delivered in order.

    aioquic doubles a stream's credit once the highest offset *received* passes half of
    it, and the connection's once half of its credit is used, whether or not the bytes
    before that offset ever came. A peer that sends one byte just below each new limit
    and never fills the gap makes aioquic zero-fill ever larger buffers: 40 one-byte
    frames grew a node by 1.5 GB. Here credit reaches at most one window (the configured
    ``max_stream_data`` / ``max_data``) past what was delivered in order, so out-of-order
    data can never hold more than that window per stream and per connection."""

    def _write_stream_limits(self, builder: QuicPacketBuilder, space: Any, stream: Any) -> None:
        receiver = stream.receiver
        window = self._configuration.max_stream_data
        delivered = receiver.starting_offset()
        if stream.max_stream_data_local and stream.max_stream_data_local - delivered < window // 2:
            stream.max_stream_data_local = delivered + window
        if stream.max_stream_data_local_sent == stream.max_stream_data_local:
            return  # nothing to announce: the usual case, for every stream on every packet
        highest, receiver.highest_offset = receiver.highest_offset, 0  # keeps aioquic's doubling rule out
        try:
            super()._write_stream_limits(builder, space, stream)
        finally:
            receiver.highest_offset = highest

    def _write_connection_limits(self, builder: QuicPacketBuilder, space: Any) -> None:
        credit = self._local_max_data
        window = self._configuration.max_data
        if credit.value - credit.used < window // 2:  # cheap test first: delivered <= used
            undelivered = sum(s.receiver.highest_offset - s.receiver.starting_offset() for s in self._streams.values())
            delivered = credit.used - undelivered
            if credit.value - delivered < window // 2:
                credit.value = delivered + window
        used, credit.used = credit.used, 0  # keeps aioquic's doubling rule out
        try:
            super()._write_connection_limits(builder, space)
        finally:
            credit.used = used


class StoqQuicConnection(BoundedQuicConnection):
    """QuicConnection that can request a client certificate (RFC 8446 4.3.2).

    aioquic's TLS server only sends CertificateRequest when the private
    ``tls._request_client_certificate`` flag is set. It is decided per ALPN right
    after ALPN negotiation, which happens before the server writes its flight."""

    def __init__(self, *args: Any, request_client_cert: Callable[[str | None], bool] | None = None,
                 max_streams_bidi: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._request_client_cert = request_client_cert
        if max_streams_bidi is not None:
            # The peer may keep at most this many requests open; closing one grants one.
            # Replace the Limit objects: their "sent" must match what we advertise.
            self._local_max_streams_bidi = Limit(QuicFrameType.MAX_STREAMS_BIDI, "max_streams_bidi", max_streams_bidi)
            self._local_max_streams_uni = Limit(QuicFrameType.MAX_STREAMS_UNI, "max_streams_uni", 0)

    def _alpn_handler(self, alpn_protocol: str) -> None:
        super()._alpn_handler(alpn_protocol)
        if self._request_client_cert is not None and self._request_client_cert(alpn_protocol):
            self.tls._request_client_certificate = _UnlessResumed(self.tls)


def peer_certificates(quic: QuicConnection) -> tuple[bytes, list[bytes]] | None:
    """(leaf DER, intermediate DERs) the peer presented in this handshake, or None."""
    leaf: x509.Certificate | None = getattr(quic.tls, "_peer_certificate", None)
    if leaf is None:
        return None
    chain: list[x509.Certificate] = getattr(quic.tls, "_peer_certificate_chain", [])
    return leaf.public_bytes(Encoding.DER), [c.public_bytes(Encoding.DER) for c in chain]


def connection_refused_packet(version: int, source_cid: bytes, destination_cid: bytes) -> bytes:
    """An Initial CONNECTION_CLOSE(CONNECTION_REFUSED), for refusing without state."""
    crypto = CryptoPair()
    crypto.setup_initial(cid=source_cid, is_client=False, version=version)
    builder = QuicPacketBuilder(
        host_cid=source_cid, is_client=False, max_datagram_size=SMALLEST_MAX_DATAGRAM_SIZE,
        peer_cid=destination_cid, version=version,
    )
    builder.start_packet(QuicPacketType.INITIAL, crypto)
    buf: Buffer = builder.start_frame(QuicFrameType.TRANSPORT_CLOSE, capacity=TRANSPORT_CLOSE_FRAME_CAPACITY)
    buf.push_uint_var(QuicErrorCode.CONNECTION_REFUSED)
    buf.push_uint_var(QuicFrameType.PADDING)
    buf.push_uint_var(0)
    datagrams, _ = builder.flush()
    return datagrams[0]


class CoalescingProtocol(QuicConnectionProtocol):
    """Sends once per loop pass: writes and received datagrams only schedule a flush."""

    # Only a protocol with its own (connected) socket may drain it; server connections
    # share one socket, which the server endpoint drains and routes.
    owns_socket = False

    def __init__(self, quic: QuicConnection, stream_handler: Any = None) -> None:
        super().__init__(quic, stream_handler)
        self._close_reported = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.owns_socket:  # the server's shared socket is sized by the server endpoint
            enlarge_socket_buffers(transport)
        super().connection_made(transport)  # type: ignore[arg-type]

    def _process_events(self) -> None:
        super()._process_events()
        # aioquic reports ConnectionTerminated only after the 3*PTO draining period;
        # a closing connection is useless to us as soon as the close is known.
        event = self._quic._close_event
        if event is not None and not self._close_reported:
            self._close_reported = True
            self.connection_closing(event)

    def connection_closing(self, event: Any) -> None:
        """The connection is closing (locally or by the peer); subclasses react."""

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        now = self._loop.time()
        self._quic.receive_datagram(data, addr, now=now)  # type: ignore[arg-type]
        if self.owns_socket:
            for more, more_addr in drain(self._transport):
                self._quic.receive_datagram(more, more_addr, now=now)
        self._process_events()
        self._transmit_soon()

    def flush_soon(self) -> None:
        self._transmit_soon()

    def transmit(self) -> None:
        if not self.owns_socket:
            super().transmit()
            return
        # A connected socket: send without an address so ICMP errors come back to us.
        self._transmit_task = None
        if self._transport is None or self._transport.is_closing():
            return
        transport = self._transport
        for data, _addr in self._quic.datagrams_to_send(now=self._loop.time()):
            transport.sendto(data)
            if transport.is_closing():
                # A send failed (ECONNREFUSED: the peer is gone) and error_received gave
                # the connection up: writing the rest of the batch would make asyncio log
                # "socket.send() raised exception." once per datagram. No timer either.
                return
        timer_at = self._quic.get_timer()
        if self._timer is not None and self._timer_at != timer_at:
            self._timer.cancel()
            self._timer = None
        if self._timer is None and timer_at is not None:
            self._timer = self._loop.call_at(timer_at, self._handle_timer)
        self._timer_at = timer_at

    def error_received(self, exc: Exception) -> None:
        # ICMP errors on a connected UDP socket (e.g. port unreachable); subclasses act.
        pass


DRAIN_BATCH = 64


def drain(transport: Any, limit: int = DRAIN_BATCH) -> list[tuple[bytes, Any]]:
    """Datagrams already queued on the socket.

    asyncio hands over one datagram per loop pass; reading the rest now lets one
    ``transmit()`` answer (and acknowledge) the whole batch. Uses the selector
    transport's socket, and quietly does nothing where that is unavailable."""
    sock = getattr(transport, "_sock", None)
    if sock is None:
        return []
    out: list[tuple[bytes, Any]] = []
    for _ in range(limit):
        try:
            out.append(sock.recvfrom(65536))
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            break  # e.g. ECONNREFUSED; asyncio reports it on its next read
    return out


async def wait_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.01) -> bool:
    """Poll a condition with a deadline (used where no event exists to await)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(interval_s)
    return True
