"""A pooled connection to a server that died and came back on the same port.

The new process drops the old connection's packets without a word: no ICMP (the port
is open again) and no stateless reset. Before, each call on that connection waited for
its whole timeout (30 s by default) and the pool kept handing it out.
"""

from __future__ import annotations

import time

from transport.quic import wait_until

from .conftest import Pki, run
from .test_api import _client, serving


def _forget_every_connection(server: object) -> None:
    """What a restart does, seen from a client: the same port answers, but the process
    behind it knows none of the old connections and drops their packets."""
    endpoint = server._endpoint  # type: ignore[attr-defined]
    for protocol in endpoint.live():
        if protocol._timer is not None:
            protocol._timer.cancel()
            protocol._timer = None
    endpoint._protocols.clear()


def test_a_call_on_a_connection_to_a_restarted_server_redials_instead_of_timing_out(pki: Pki) -> None:
    async def body() -> None:
        async with serving(pki.tls("node-1")) as server:
            client = _client(pki, server.port, timeout_s=20)
            try:
                assert (await client.call("echo", 1))["payload"] == 1
                _forget_every_connection(server)
                started = time.monotonic()
                assert (await client.call("echo", 2))["payload"] == 2
                took = time.monotonic() - started
                assert took < 10, f"the call waited {took:.1f} s on the dead connection"
                assert client.stats.connections_opened == 2
                assert await wait_until(lambda: server.stats.connections_accepted == 2, 5.0)
            finally:
                await client.close()

    run(body(), timeout_s=60)
