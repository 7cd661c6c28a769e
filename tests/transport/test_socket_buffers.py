"""UDP buffers large enough for a burst of pre-prepares (see transport/quic.py)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from transport.quic import UDP_BUFFER_BYTES, enlarge_socket_buffers


def _kernel_cap(name: str) -> int:
    path = Path(f"/proc/sys/net/core/{name}")
    return int(path.read_text()) if path.exists() else UDP_BUFFER_BYTES


def test_udp_buffers_are_raised_up_to_the_kernel_cap() -> None:
    async def main() -> tuple[tuple[int, int], tuple[int, int]]:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=("::1", 0))
        try:
            sock = transport.get_extra_info("socket")
            before = (sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF), sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
            return before, enlarge_socket_buffers(transport)
        finally:
            transport.close()

    before, granted = asyncio.run(main())
    # Linux books twice the requested size, capped by rmem_max / wmem_max.
    want_rcv = 2 * min(UDP_BUFFER_BYTES, _kernel_cap("rmem_max"))
    want_snd = 2 * min(UDP_BUFFER_BYTES, _kernel_cap("wmem_max"))
    assert granted == (max(want_rcv, before[0]), max(want_snd, before[1]))


def test_client_connections_get_the_large_buffers() -> None:
    """Every protocol with its own socket (API client, peer link) is sized on creation."""
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    from transport.quic import CoalescingProtocol

    class OwnSocket(CoalescingProtocol):
        owns_socket = True

    async def main() -> int:
        loop = asyncio.get_running_loop()
        quic = QuicConnection(configuration=QuicConfiguration(is_client=True))
        transport, _ = await loop.create_datagram_endpoint(lambda: OwnSocket(quic), remote_addr=("::1", 9))
        try:
            return transport.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        finally:
            transport.close()

    assert asyncio.run(main()) == 2 * min(UDP_BUFFER_BYTES, _kernel_cap("rmem_max"))
