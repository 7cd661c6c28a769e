"""PeerMesh: node-to-node links over mutually authenticated QUIC (ALPN stoq-peer/1).

Each node dials every other node and keeps ONE stream open on that connection, on
which it writes length-prefixed frames; inbound links terminate at the StoqServer,
which hands frames to ``PeerMesh.deliver`` named by the verified certificate. Sends
never block: frames queue per peer (bounded) and are written in one batch per loop
pass. Frames to a peer that is down are dropped and counted; consensus retransmits.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from cryptography import x509
from cryptography.x509.oid import NameOID

from .framing import DEFAULT_MAX_FRAME_BYTES, encode_frames
from .quic import ALPN_PEER, BoundedQuicConnection, CoalescingProtocol
from .tls import TlsConfig

log = logging.getLogger("transport.peers")

LinkState = Literal["connecting", "up", "down"]


RESTART_RELINK_MIN_AGE_S = 1.0  # see PeerMesh.peer_connected


@dataclass(slots=True, frozen=True)
class PeerAddress:
    host: str
    port: int
    server_name: str


@dataclass(slots=True)
class PeerStats:
    frames_sent: int = 0
    frames_received: int = 0
    frames_dropped: int = 0
    bytes_sent: int = 0
    connects: int = 0
    state: LinkState = "connecting"
    last_error: str = ""

    @property
    def connected(self) -> bool:
        return self.state == "up"


@dataclass(slots=True)
class MeshStats:
    peers: dict[str, PeerStats] = field(default_factory=dict)
    frames_from_unknown: int = 0
    relinks: int = 0  # outbound links replaced because the peer dialled us again (restarted)


class _PeerProtocol(CoalescingProtocol):
    owns_socket = True

    def __init__(self, quic: QuicConnection, wake: Callable[[], None]) -> None:
        super().__init__(quic)
        self.handshake: asyncio.Future[None] = self._loop.create_future()
        self.dead: str | None = None
        self._wake = wake

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.ConnectionTerminated):
            self._die(f"closed (code {event.error_code:#x}): {event.reason_phrase}")

    def _process_events(self) -> None:
        super()._process_events()
        # "Up" means the listener accepted our certificate. Our own handshake completes
        # before the listener has checked it; HANDSHAKE_DONE (handshake confirmed)
        # comes only after, and never from a listener that rejects us.
        if self._quic._handshake_confirmed and self.dead is None and not self.handshake.done():
            self.handshake.set_result(None)

    def connection_closing(self, event: events.ConnectionTerminated) -> None:
        self._die(f"closed (code {event.error_code:#x}): {event.reason_phrase}")

    def error_received(self, exc: Exception) -> None:
        self._die(f"network error: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self._die("socket closed")

    def _die(self, reason: str) -> None:
        first = self.dead is None
        if first:
            self.dead = reason
        if not self.handshake.done():
            self.handshake.set_exception(ConnectionError(reason))
            self.handshake.exception()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # Wake the link once, on the transition to dead: shutdown() and the later
        # connection_lost() come here again, and must not disturb the next attempt.
        if first:
            self._wake()

    def shutdown(self) -> None:
        if self.dead is None:
            self.close(reason_phrase="peer mesh stopping")
        self._die("stopped")
        if self._transport is not None:
            self._transport.close()


class _PeerLink:
    """Outbound link to one peer: connect, pump the queue, reconnect with backoff."""

    def __init__(self, mesh: PeerMesh, peer_id: str, address: PeerAddress) -> None:
        self.mesh = mesh
        self.peer_id = peer_id
        self.address = address
        self.stats = PeerStats()
        self.queue: deque[tuple[float, bytes]] = deque()
        self.queued_bytes = 0
        self.protocol: _PeerProtocol | None = None
        self.task: asyncio.Task[None] | None = None
        self.up_since = 0.0  # loop time the current connection came up
        self._waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def enqueue(self, data: bytes, now: float) -> None:
        stats = self.stats
        mesh = self.mesh
        if (stats.state == "down" or len(self.queue) >= mesh.max_queue
                or self.queued_bytes + len(data) > mesh.max_queue_bytes):
            stats.frames_dropped += 1  # consensus re-sends what matters; memory stays bounded
            return
        self.queued_bytes += len(data)
        self.queue.append((now + mesh.delay_ms / 1000.0, data))
        self.wake()

    async def _wait(self, timeout_s: float) -> bool:
        """Wait for a wake-up (send, close) or the timeout; True when woken."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        try:
            await asyncio.wait_for(waiter, timeout_s)
            return True
        except TimeoutError:
            return False
        finally:
            self._waiter = None

    async def run(self) -> None:
        mesh = self.mesh
        backoff = mesh.backoff_s
        while not mesh._stopping:
            try:
                protocol = await self._connect()
            except (ConnectionError, OSError, TimeoutError, ValueError) as exc:
                self._down(f"connect failed: {exc}")
            else:
                self.stats.state = "up"
                self.stats.connects += 1
                self.up_since = asyncio.get_running_loop().time()
                backoff = mesh.backoff_s
                log.info("%s: link to %s up", mesh.node_id, self.peer_id)
                try:
                    await self._pump(protocol)
                finally:
                    protocol.shutdown()
                    self.protocol = None
                self._down(protocol.dead or "closed")
            if mesh._stopping:
                return
            # A plain sleep: nothing may cut the backoff short (a late wake-up from the
            # dead connection would make it a busy redial); stop() cancels this task.
            await asyncio.sleep(backoff * (1 + random.random() * 0.5))
            backoff = min(backoff * 2, mesh.max_backoff_s)
            if self.stats.state == "down":
                self.stats.state = "connecting"

    def _down(self, reason: str) -> None:
        stats = self.stats
        if stats.state == "up":
            log.info("%s: link to %s down: %s", self.mesh.node_id, self.peer_id, reason)
        stats.state = "down"
        stats.last_error = reason
        stats.frames_dropped += len(self.queue)
        self.queue.clear()
        self.queued_bytes = 0

    async def _connect(self) -> _PeerProtocol:
        mesh = self.mesh
        loop = asyncio.get_running_loop()
        leaf, chain, key = mesh.tls.load()
        config = QuicConfiguration(
            is_client=True,
            alpn_protocols=[ALPN_PEER],
            server_name=self.address.server_name,
            cadata=mesh.tls.ca_pem,
            idle_timeout=mesh.idle_timeout_s,
            max_datagram_size=mesh.max_datagram_size,
            max_stream_data=4 << 20,
            max_data=16 << 20,
            certificate=leaf,
            certificate_chain=chain,
            private_key=key,
        )
        quic = BoundedQuicConnection(configuration=config)
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: _PeerProtocol(quic, self.wake), remote_addr=(self.address.host, self.address.port)
        )
        self.protocol = protocol
        protocol.connect(transport.get_extra_info("peername"))
        try:
            await asyncio.wait_for(asyncio.shield(protocol.handshake), mesh.connect_timeout_s)
            # The CA vouches for the name; make sure it is the node we meant to reach.
            cert: x509.Certificate | None = getattr(quic.tls, "_peer_certificate", None)
            names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME) if cert else []
            if not names or names[0].value != self.peer_id:
                raise ConnectionError(f"server certificate is not for {self.peer_id!r}")
        except BaseException:
            protocol.shutdown()
            self.protocol = None
            raise
        return protocol

    async def _pump(self, protocol: _PeerProtocol) -> None:
        mesh = self.mesh
        loop = asyncio.get_running_loop()
        quic = protocol._quic
        stream_id = quic.get_next_available_stream_id()
        queue = self.queue
        while protocol.dead is None and not mesh._stopping:
            if not queue:
                if not await self._wait(mesh.keepalive_s) and protocol.dead is None:
                    quic.send_ping(0)  # keeps NAT/idle timers from closing a quiet link
                    protocol.flush_soon()
                continue
            now = loop.time()
            if queue[0][0] > now:
                await self._wait(queue[0][0] - now)
                continue
            batch: list[bytes] = []
            while queue and queue[0][0] <= now:
                batch.append(queue.popleft()[1])
                self.queued_bytes -= len(batch[-1])
            data = encode_frames(batch)
            quic.send_stream_data(stream_id, data)
            self.stats.frames_sent += len(batch)
            self.stats.bytes_sent += len(data)
            protocol.flush_soon()
            # Let the flush (and acks) run before taking the next batch.
            await asyncio.sleep(0)
            while protocol.dead is None and _unacked(quic, stream_id) > mesh.max_unacked_bytes:
                await self._wait(0.005)  # back-pressure: the peer is slower than we are


def _unacked(quic: QuicConnection, stream_id: int) -> int:
    stream = quic._streams.get(stream_id)
    if stream is None:
        return 0
    return len(getattr(stream.sender, "_buffer", b""))


class PeerMesh:
    """Frames to and from the other validators. ``deliver`` is the StoqServer hook."""

    def __init__(
        self,
        node_id: str,
        peers: dict[str, PeerAddress],
        tls: TlsConfig,
        on_message: Callable[[str, bytes], None],
        delay_ms: float = 0.0,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        max_queue: int = 10_000,
        max_queue_bytes: int = 128 << 20,
        max_unacked_bytes: int = 16 << 20,
        max_datagram_size: int = 1200,
        idle_timeout_s: float = 30.0,
        keepalive_s: float = 5.0,
        connect_timeout_s: float = 5.0,
        backoff_s: float = 0.05,
        max_backoff_s: float = 2.0,
        relink_after_s: float = 5.0,
    ) -> None:
        if tls.ca_pem is None:
            raise ValueError("PeerMesh needs the cluster CA (tls.ca_pem)")
        self.node_id = node_id
        self.tls = tls
        self.on_message = on_message
        self.delay_ms = delay_ms
        self.max_frame_bytes = max_frame_bytes
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes
        self.max_unacked_bytes = max_unacked_bytes
        self.max_datagram_size = max_datagram_size
        self.idle_timeout_s = idle_timeout_s
        self.keepalive_s = keepalive_s
        self.connect_timeout_s = connect_timeout_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.relink_after_s = relink_after_s
        self._links = {pid: _PeerLink(self, pid, addr) for pid, addr in peers.items() if pid != node_id}
        self._stats = MeshStats(peers={pid: link.stats for pid, link in self._links.items()})
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        for link in self._links.values():
            link.task = asyncio.ensure_future(link.run())

    async def stop(self) -> None:
        self._stopping = True
        tasks = []
        for link in self._links.values():
            link.wake()
            if link.protocol is not None:
                link.protocol.shutdown()
            if link.task is not None:
                link.task.cancel()
                tasks.append(link.task)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def send(self, node_id: str, data: bytes) -> None:
        """Queue one frame for ``node_id``; never blocks, never raises for a down peer."""
        if len(data) > self.max_frame_bytes:
            raise ValueError(f"frame of {len(data)} bytes exceeds the limit of {self.max_frame_bytes}")
        link = self._links.get(node_id)
        if link is None:
            raise KeyError(f"unknown peer {node_id!r}")
        assert self._loop is not None, "start() the mesh first"
        link.enqueue(data, self._loop.time())

    def broadcast(self, data: bytes) -> None:
        for node_id in self._links:
            self.send(node_id, data)

    def peer_connected(self, sender: str, again: bool = False) -> None:
        """StoqServer hook: ``sender`` (verified certificate CN) opened a new link to us;
        ``again``: while its previous link to us still looked open.

        A peer that dials us again has usually restarted; our own link to it may still
        look up, but it talks to the old process: a container that was killed does not
        answer with an ICMP error, and a restarted one drops the unknown connection's
        packets, so that link stays silent until the QUIC idle timeout (30 s) — 30 s in
        which nothing we send reaches the peer. Replace our link when the peer dialled
        ``again`` (its old link to us never closed: the old process died) and our link
        is at least RESTART_RELINK_MIN_AGE_S old, or when it is older than ``relink_after_s``. A younger one, after the peer's old link
        had closed, was made for the same incarnation (both sides dial each other at
        start-up), which also rules out a reconnect ping-pong."""
        link = self._links.get(sender)
        if link is None or link.protocol is None or link.stats.state != "up" or self._loop is None:
            return
        age = self._loop.time() - link.up_since
        # Even a restart signal waits RESTART_RELINK_MIN_AGE_S: while close frames get
        # lost, a peer re-dialling over and over must not make us re-dial as often.
        if age < (RESTART_RELINK_MIN_AGE_S if again else self.relink_after_s):
            return
        log.info("%s: %s dialled us again (restarted?): replacing our link to it", self.node_id, sender)
        self._stats.relinks += 1
        link.protocol.shutdown()

    def deliver(self, sender: str, data: bytes) -> None:
        """Inbound frame from the StoqServer; ``sender`` is the verified certificate CN."""
        link = self._links.get(sender)
        if link is None:
            self._stats.frames_from_unknown += 1
            log.warning("%s: dropping a frame from unknown peer %r", self.node_id, sender)
            return
        link.stats.frames_received += 1
        self.on_message(sender, data)

    def stats(self) -> MeshStats:
        return self._stats

    def connected_peers(self) -> set[str]:
        return {pid for pid, link in self._links.items() if link.stats.state == "up"}

    def peer_ids(self) -> list[str]:
        return list(self._links)
