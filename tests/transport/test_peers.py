"""PeerMesh over real mTLS QUIC on [::1]: frames both ways, restart recovery, rejection."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from transport.peers import PeerAddress, PeerMesh, _PeerLink, _PeerProtocol
from transport.quic import wait_until
from transport.server import HandlerRegistry, Limits, StoqServer
from transport.tls import TlsConfig

from .conftest import Pki, run, unused_udp_port

HOST = "::1"


@dataclass
class Node:
    node_id: str
    tls: TlsConfig
    port: int = 0
    server: StoqServer | None = None
    mesh: PeerMesh | None = None
    inbox: list[tuple[str, bytes]] = field(default_factory=list)

    def on_message(self, sender: str, data: bytes) -> None:
        self.inbox.append((sender, data))

    async def start_server(self, limits: Limits | None = None, members: set[str] | None = None) -> None:
        self.server = StoqServer(HOST, self.port, HandlerRegistry(), self.tls, limits,
                                 peer_frame_handler=lambda sender, data: self._deliver(sender, data),
                                 peer_connected=lambda sender, again: self.mesh.peer_connected(sender, again) if self.mesh else None,
                                 peer_members=members)
        await self.server.start()
        self.port = self.server.port

    def _deliver(self, sender: str, data: bytes) -> None:
        assert self.mesh is not None
        self.mesh.deliver(sender, data)

    async def start_mesh(self, peers: dict[str, PeerAddress], **kwargs: object) -> None:
        self.mesh = PeerMesh(self.node_id, peers, self.tls, self.on_message, **kwargs)  # type: ignore[arg-type]
        await self.mesh.start()

    async def stop(self) -> None:
        if self.mesh is not None:
            await self.mesh.stop()
        if self.server is not None:
            await self.server.stop(grace_s=0.5)

    def got(self, sender: str, data: bytes) -> bool:
        return (sender, data) in self.inbox


def _addresses(nodes: list[Node]) -> dict[str, PeerAddress]:
    return {n.node_id: PeerAddress(HOST, n.port, n.node_id) for n in nodes}


async def _cluster(pki: Pki, count: int, **mesh_kwargs: object) -> list[Node]:
    nodes = [Node(f"node-{i}", pki.tls(f"node-{i}")) for i in range(count)]
    for node in nodes:
        await node.start_server()
    peers = _addresses(nodes)
    for node in nodes:
        await node.start_mesh(peers, backoff_s=0.02, max_backoff_s=0.2, **mesh_kwargs)
    return nodes


async def _all_connected(nodes: list[Node], timeout_s: float = 10.0) -> bool:
    def ready() -> bool:
        return all(n.mesh is not None and len(n.mesh.connected_peers()) == len(nodes) - 1 for n in nodes)

    return await wait_until(ready, timeout_s)


def test_mesh_exchanges_frames_both_ways_and_recovers_after_restart(pki: Pki) -> None:
    async def body() -> None:
        nodes = await _cluster(pki, 4)
        try:
            assert await _all_connected(nodes)
            for node in nodes:
                assert node.mesh is not None
                node.mesh.broadcast(f"hello from {node.node_id}".encode())
                for seq in range(50):  # many frames: they must arrive whole and in order
                    node.mesh.broadcast(node.node_id.encode() + seq.to_bytes(2, "big"))

            def everyone_heard_everyone() -> bool:
                return all(
                    dst.got(src.node_id, f"hello from {src.node_id}".encode())
                    for src in nodes for dst in nodes if src is not dst
                )

            assert await wait_until(everyone_heard_everyone, 10.0)
            for dst in nodes:
                for src in nodes:
                    if src is dst:
                        continue
                    seqs = [d for s, d in dst.inbox if s == src.node_id and d.startswith(src.node_id.encode())]
                    assert seqs == [src.node_id.encode() + i.to_bytes(2, "big") for i in range(50)]
            stats = nodes[0].mesh.stats()  # type: ignore[union-attr]
            assert stats.peers["node-1"].frames_sent == 51 and stats.peers["node-1"].frames_received == 51

            # Restart node-3 (server and mesh, same port); the others must reconnect.
            victim = nodes[3]
            await victim.stop()
            assert await wait_until(lambda: "node-3" not in nodes[0].mesh.connected_peers(), 10.0)  # type: ignore[union-attr]
            nodes[0].mesh.send("node-3", b"lost while down")  # type: ignore[union-attr]
            victim.inbox.clear()
            await victim.start_server()
            await victim.start_mesh(_addresses(nodes), backoff_s=0.02, max_backoff_s=0.2)
            assert await _all_connected(nodes)
            for node in nodes:
                node.mesh.broadcast(b"after restart " + node.node_id.encode())  # type: ignore[union-attr]

            def all_after_restart() -> bool:
                return all(
                    dst.got(src.node_id, b"after restart " + src.node_id.encode())
                    for src in nodes for dst in nodes if src is not dst
                )

            assert await wait_until(all_after_restart, 10.0)
            assert not victim.got("node-0", b"lost while down")
            assert nodes[0].mesh.stats().peers["node-3"].connects >= 2  # type: ignore[union-attr]
        finally:
            for node in nodes:
                await node.stop()

    run(body(), timeout_s=30)


def test_send_to_a_down_peer_drops_and_counts(pki: Pki) -> None:
    async def body() -> None:
        nodes = [Node("node-0", pki.tls("node-0")), Node("node-1", pki.tls("node-1"))]
        await nodes[0].start_server()
        # node-1 has a port nobody listens on.
        peers = {"node-0": PeerAddress(HOST, nodes[0].port, "node-0"), "node-1": PeerAddress(HOST, 9, "node-1")}
        await nodes[0].start_mesh(peers, backoff_s=0.05, max_backoff_s=0.1)
        mesh = nodes[0].mesh
        assert mesh is not None
        try:
            assert await wait_until(lambda: mesh.stats().peers["node-1"].state == "down", 5.0)
            before = mesh.stats().peers["node-1"].frames_dropped
            for _ in range(10):
                mesh.send("node-1", b"x")
            assert mesh.stats().peers["node-1"].frames_dropped >= before + 1
            assert mesh.connected_peers() == set()
        finally:
            await nodes[0].stop()

    run(body())


def test_the_send_queue_to_a_peer_is_bounded_in_bytes(pki: Pki) -> None:
    """A frame count alone let 150 replies of 8 MiB wait for one slow peer: the queue now
    also stops at max_queue_bytes, and frees its bytes as frames go out."""
    async def body() -> None:
        nodes = await _cluster(pki, 2, max_queue_bytes=1_000_000)
        try:
            assert await _all_connected(nodes)
            sender = nodes[0].mesh
            assert sender is not None
            link = sender._links["node-1"]
            sender.delay_ms = 300  # frames wait in the queue for 300 ms
            frames = [bytes([i]) * 100_000 for i in range(30)]
            for frame in frames:
                sender.send("node-1", frame)
            assert link.queued_bytes <= 1_000_000
            assert sender.stats().peers["node-1"].frames_dropped == 20
            assert await wait_until(lambda: sum(s == "node-0" for s, _ in nodes[1].inbox) == 10, 5.0)
            assert link.queued_bytes == 0
            sender.send("node-1", b"after")
            assert await wait_until(lambda: nodes[1].got("node-0", b"after"), 5.0)
        finally:
            for node in nodes:
                await node.stop()

    run(body())


def test_peer_with_certificate_from_another_ca_is_rejected(pki: Pki, other_pki: Pki) -> None:
    async def body() -> None:
        honest = Node("node-0", pki.tls("node-0"))
        await honest.start_server()
        # The rogue trusts the real CA for the server, but its own cert is from another CA.
        rogue_tls = other_pki.tls("node-1")
        rogue_tls.ca_pem = pki.ca_pem
        rogue = Node("node-1", rogue_tls)
        peers = {"node-0": PeerAddress(HOST, honest.port, "node-0"), "node-1": PeerAddress(HOST, 9, "node-1")}
        await honest.start_mesh(peers)
        await rogue.start_mesh(peers, backoff_s=0.05, max_backoff_s=0.1)
        try:
            assert honest.server is not None and rogue.mesh is not None
            assert await wait_until(lambda: honest.server.stats.connections_rejected_auth >= 2, 10.0)  # type: ignore[union-attr]
            rogue.mesh.send("node-0", b"forged")
            assert "node-0" not in rogue.mesh.connected_peers()
            assert honest.inbox == []
        finally:
            await rogue.stop()
            await honest.stop()

    run(body())


def test_sender_is_the_certificate_name_and_unknown_names_are_dropped(pki: Pki) -> None:
    async def body() -> None:
        honest = Node("node-0", pki.tls("node-0"))
        await honest.start_server()
        # A valid cluster certificate whose name is not a member ("outsider").
        outsider = Node("outsider", pki.tls("outsider"))
        peers = {"node-0": PeerAddress(HOST, honest.port, "node-0"), "node-1": PeerAddress(HOST, 9, "node-1")}
        await honest.start_mesh(peers)
        await outsider.start_mesh({"node-0": peers["node-0"]})
        try:
            assert outsider.mesh is not None and honest.mesh is not None
            assert await wait_until(lambda: "node-0" in outsider.mesh.connected_peers(), 5.0)  # type: ignore[union-attr]
            outsider.mesh.send("node-0", b"I am node-1, honest")
            assert await wait_until(lambda: honest.mesh.stats().frames_from_unknown == 1, 5.0)  # type: ignore[union-attr]
            assert honest.inbox == []
        finally:
            await outsider.stop()
            await honest.stop()

    run(body())


def test_delay_ms_delays_outgoing_frames(pki: Pki) -> None:
    async def body() -> None:
        nodes = await _cluster(pki, 2)
        try:
            assert await _all_connected(nodes)
            sender = nodes[0].mesh
            assert sender is not None
            loop = asyncio.get_running_loop()
            start = loop.time()
            sender.send("node-1", b"fast")
            assert await wait_until(lambda: nodes[1].got("node-0", b"fast"), 5.0)
            fast = loop.time() - start
            sender.delay_ms = 150
            start = loop.time()
            sender.send("node-1", b"slow")
            assert await wait_until(lambda: nodes[1].got("node-0", b"slow"), 5.0)
            slow = loop.time() - start
            assert slow >= 0.15 and slow > fast
        finally:
            for node in nodes:
                await node.stop()

    run(body())


def test_oversized_frame_closes_the_link(pki: Pki) -> None:
    async def body() -> None:
        receiver = Node("node-1", pki.tls("node-1"))
        await receiver.start_server(Limits(max_frame_bytes=1024))
        sender = Node("node-0", pki.tls("node-0"))
        peers = {"node-0": PeerAddress(HOST, 9, "node-0"), "node-1": PeerAddress(HOST, receiver.port, "node-1")}
        await receiver.start_mesh(peers)
        await sender.start_mesh(peers, backoff_s=0.05, max_backoff_s=0.1)
        try:
            mesh = sender.mesh
            assert mesh is not None
            assert await wait_until(lambda: "node-1" in mesh.connected_peers(), 5.0)
            mesh.send("node-1", b"small")
            assert await wait_until(lambda: receiver.got("node-0", b"small"), 5.0)
            mesh.send("node-1", b"x" * 4096)
            assert await wait_until(lambda: mesh.stats().peers["node-1"].connects >= 2, 5.0)  # closed, redialled
            assert "frame of 4096 bytes exceeds" in mesh.stats().peers["node-1"].last_error
            assert not any(len(d) == 4096 for _, d in receiver.inbox)
        finally:
            await sender.stop()
            await receiver.stop()

    run(body())


def test_a_peer_that_dials_again_gets_a_fresh_link_from_us(pki: Pki) -> None:
    """A restarted peer dials us; our old link to it may talk to the dead process until
    the idle timeout. We replace a link older than relink_after_s, not a young one."""
    async def body() -> None:
        nodes = await _cluster(pki, 2, relink_after_s=2.0)
        a, b = nodes
        try:
            assert await _all_connected(nodes)
            link_to_b = a.mesh._links["node-1"]  # type: ignore[union-attr]
            assert await wait_until(lambda: asyncio.get_running_loop().time() - link_to_b.up_since > 2.1, 5.0)

            def redial_from_b() -> None:  # what a restarted node-1 does: dial node-0 anew
                b.mesh._links["node-0"].protocol.shutdown()  # type: ignore[union-attr]

            redial_from_b()
            assert await wait_until(lambda: a.mesh.stats().relinks == 1  # type: ignore[union-attr]
                                    and a.mesh.stats().peers["node-1"].connects == 2, 10.0)  # type: ignore[union-attr]
            assert await _all_connected(nodes)
            # Our new link is young: B dialling again right away does not replace it again.
            assert await wait_until(lambda: b.mesh.stats().peers["node-0"].connects == 2, 10.0)  # type: ignore[union-attr]
            redial_from_b()
            assert await wait_until(lambda: b.mesh.stats().peers["node-0"].connects == 3, 10.0)  # type: ignore[union-attr]
            assert a.mesh.stats().relinks == 1  # type: ignore[union-attr]
            a.mesh.send("node-1", b"still flows")  # type: ignore[union-attr]
            b.mesh.send("node-0", b"both ways")  # type: ignore[union-attr]
            assert await wait_until(lambda: b.got("node-0", b"still flows") and a.got("node-1", b"both ways"), 10.0)
        finally:
            for node in nodes:
                await node.stop()

    run(body(), timeout_s=30)


def test_a_peer_restarted_twice_in_quick_succession_gets_a_fresh_link_at_once(pki: Pki) -> None:
    """A killed process sends no close, so its link to us stays open. When a new process
    with its name dials us while that link is open, it restarted: our link to it is
    replaced even if it is younger than relink_after_s (a node killed twice within 5 s
    left its peers talking to the dead process until the 30 s idle timeout)."""
    async def body() -> None:
        nodes = await _cluster(pki, 2, relink_after_s=60.0)  # the age rule alone would never relink
        a, b = nodes
        again = Node("node-1", pki.tls("node-1"))  # a new process for node-1, old one still "running"
        try:
            assert await _all_connected(nodes)
            link_to_b = a.mesh._links["node-1"]  # type: ignore[union-attr]
            # Past the 1 s floor for restart signals, far below relink_after_s.
            assert await wait_until(lambda: asyncio.get_running_loop().time() - link_to_b.up_since > 1.2, 5.0)
            await again.start_mesh({"node-0": PeerAddress(HOST, a.port, "node-0")}, backoff_s=0.02, max_backoff_s=0.2)
            # (The "old" process is still alive here and re-dials too, which a real dead
            # one would not: count at least one relink, not exactly one.)
            assert await wait_until(lambda: a.mesh.stats().relinks >= 1  # type: ignore[union-attr]
                                    and a.mesh.stats().peers["node-1"].connects >= 2, 10.0)  # type: ignore[union-attr]
        finally:
            await again.stop()
            for node in nodes:
                await node.stop()

    run(body(), timeout_s=30)


def test_a_dead_peer_is_redialled_with_exponential_backoff(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    """PROTOCOL.md §4: 50 ms doubling to 2 s. A failed dial's own close must not end the
    backoff early (it once did: a peer on a closed port was redialled every ~2 ms)."""
    dials: list[float] = []
    real_connect = _PeerLink._connect

    async def counting_connect(self: _PeerLink) -> _PeerProtocol:
        dials.append(asyncio.get_running_loop().time())
        return await real_connect(self)

    monkeypatch.setattr(_PeerLink, "_connect", counting_connect)

    async def body() -> None:
        node = Node("node-0", pki.tls("node-0"))
        # A closed loopback port: each dial fails at once (ICMP port unreachable).
        peers = {"node-1": PeerAddress(HOST, unused_udp_port(HOST), "node-1")}
        await node.start_mesh(peers, backoff_s=0.05, max_backoff_s=2.0)
        try:
            assert await wait_until(lambda: len(dials) >= 5, 5.0), dials
            assert "connect failed" in node.mesh.stats().peers["node-1"].last_error  # type: ignore[union-attr]
            gaps = [b - a for a, b in zip(dials, dials[1:5])]
            for gap, nominal in zip(gaps, (0.05, 0.1, 0.2, 0.4)):
                assert gap >= nominal - 0.005, gaps  # jitter only lengthens a wait
            # Over a 1.5 s window the schedule gives ~5 dials; a busy redial gives hundreds.
            loop = asyncio.get_running_loop()
            assert await wait_until(lambda: loop.time() >= dials[0] + 1.5, 5.0)
            assert len([t for t in dials if t <= dials[0] + 1.5]) <= 10, len(dials)
        finally:
            await node.stop()

    run(body())



def test_a_cluster_certificate_that_names_no_validator_cannot_open_a_peer_link(pki: Pki) -> None:
    """The cluster CA also signs the client certificate: with the member list, the link is
    refused at the handshake instead of being kept open to drop its frames."""
    async def body() -> None:
        honest = Node("node-0", pki.tls("node-0"))
        await honest.start_server(members={"node-1"})
        outsider = Node("hypermesh-client", pki.tls("hypermesh-client"))
        peers = {"node-0": PeerAddress(HOST, honest.port, "node-0"), "node-1": PeerAddress(HOST, 9, "node-1")}
        await honest.start_mesh(peers)
        await outsider.start_mesh({"node-0": peers["node-0"]}, backoff_s=0.05, max_backoff_s=0.1)
        try:
            assert honest.server is not None and outsider.mesh is not None
            assert await wait_until(lambda: honest.server.stats.connections_rejected_auth >= 2, 10.0)  # type: ignore[union-attr]
            assert "node-0" not in outsider.mesh.connected_peers()
            outsider.mesh.send("node-0", b"let me in")
            assert honest.inbox == [] and honest.mesh is not None and honest.mesh.stats().frames_from_unknown == 0
        finally:
            await outsider.stop()
            await honest.stop()

    run(body())


def test_a_second_stream_on_a_peer_link_closes_it(pki: Pki) -> None:
    """Each stream of a link would buffer up to a whole frame: a peer gets one."""
    async def body() -> None:
        nodes = await _cluster(pki, 2)
        try:
            assert await _all_connected(nodes)
            sender, receiver = nodes[0], nodes[1]
            assert sender.mesh is not None
            sender.mesh.send("node-1", b"first")
            assert await wait_until(lambda: receiver.got("node-0", b"first"), 5.0)
            protocol = sender.mesh._links["node-1"].protocol
            assert protocol is not None
            quic = protocol._quic
            quic.send_stream_data(quic.get_next_available_stream_id(), b"\x00\x00\x00\x05extra")
            protocol.flush_soon()
            assert await wait_until(lambda: sender.mesh.stats().peers["node-1"].connects >= 2, 5.0)  # type: ignore[union-attr]
            assert "one stream" in sender.mesh.stats().peers["node-1"].last_error
            assert not receiver.got("node-0", b"extra")
            sender.mesh.send("node-1", b"after")  # the redialled link works
            assert await wait_until(lambda: receiver.got("node-0", b"after"), 5.0)
        finally:
            for node in nodes:
                await node.stop()

    run(body())
