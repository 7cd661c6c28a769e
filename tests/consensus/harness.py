"""A tiny deterministic in-process network for driving Replica objects in tests.

FIFO delivery, a virtual clock, and hooks to drop, crash or tamper. No threads, no
randomness: a failing test replays identically.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from consensus.actions import (
    AlreadyExecuted, Committed, Evidence, Final, Persist, Rejected, Send, StateTransferred, ViewChanged,
)
from consensus.codec import canonical_pack, unpack_bounded
from consensus.keys import KeyRing, NodeKey, generate_node_key, keyring_of
from consensus.messages import RequestMsg, encode
from consensus.replica import Replica, ReplicaConfig


class CounterApp:
    """Deterministic app: result = [count, sha256(request), agreed_time]; state = count + chain hash."""

    def __init__(self) -> None:
        self.count = 0
        self.chain = b"\x00" * 32
        self.executed: list[tuple[int, bytes]] = []

    def execute_batch(self, seq: int, requests: list[bytes], agreed_time_ms: int) -> list[bytes]:
        out = []
        for req in requests:
            self.count += 1
            self.chain = hashlib.sha256(self.chain + req).digest()
            self.executed.append((seq, req))
            out.append(canonical_pack([self.count, hashlib.sha256(req).digest(), agreed_time_ms]))
        return out

    def snapshot(self) -> bytes:
        return canonical_pack([self.count, self.chain])

    def restore(self, snapshot: bytes) -> None:
        self.count, self.chain = unpack_bounded(snapshot, max_size=1024)
        self.executed = []


@dataclass
class Node:
    replica: Replica
    app: CounterApp
    durable: dict[str, bytes] = field(default_factory=dict)
    actions: list = field(default_factory=list)
    up: bool = True

    def of(self, cls: type) -> list:
        return [a for a in self.actions if isinstance(a, cls)]


class Cluster:
    def __init__(self, n: int = 4, config: ReplicaConfig | None = None, scheme: str = "Ed25519") -> None:
        self.config = config or ReplicaConfig(cluster_id="test-cluster", checkpoint_interval=4, window=4)
        self.keys: list[NodeKey] = [generate_node_key(f"node-{i}", scheme) for i in range(n)]
        self.keyring: KeyRing = keyring_of(self.keys)
        self.now = 0
        self.queue: deque[tuple[str, str, bytes]] = deque()  # (src, dst, data)
        self.drop: Callable[[str, str, bytes], bool] = lambda src, dst, data: False
        self.tamper: Callable[[str, str, bytes], bytes] | None = None
        self.nodes: dict[str, Node] = {}
        for k in self.keys:
            app = CounterApp()
            self.nodes[k.node_id] = Node(Replica(self.config, k, self.keyring, app, None, self.now), app)

    @property
    def ids(self) -> list[str]:
        return [k.node_id for k in self.keys]

    def handle(self, node_id: str, actions: list) -> None:
        node = self.nodes[node_id]
        for a in actions:
            node.actions.append(a)
            if isinstance(a, Persist):
                for k, v in a.records:
                    if v is None:
                        node.durable.pop(k, None)
                    else:
                        node.durable[k] = v
            elif isinstance(a, Send):
                targets = [a.to] if a.to is not None else [i for i in self.ids if i != node_id]
                for t in targets:
                    self.queue.append((node_id, t, a.payload))

    def submit(self, node_id: str, request_id: str, request: bytes) -> list:
        acts = self.nodes[node_id].replica.submit(request_id, request, self.now)
        self.handle(node_id, acts)
        return acts

    def deliver_all(self, limit: int = 100_000) -> None:
        steps = 0
        while self.queue and steps < limit:
            src, dst, data = self.queue.popleft()
            steps += 1
            node = self.nodes[dst]
            if not node.up or not self.nodes[src].up or self.drop(src, dst, data):
                continue
            if self.tamper is not None:
                data = self.tamper(src, dst, data)
            self.handle(dst, node.replica.receive(src, data, self.now))

    def tell(self, src: str, dst: str, request_id: str, request: bytes) -> None:
        """``src`` tells ``dst`` alone of a request (its tellings to the others lost)."""
        key = next(k for k in self.keys if k.node_id == src)
        wire = encode(self.config.cluster_id, src, RequestMsg(request_id, request), key.sign)
        self.handle(dst, self.nodes[dst].replica.receive(src, wire, self.now))

    def run(self, ms: int, step: int = 10) -> None:
        end = self.now + ms
        self.deliver_all()
        while self.now < end:
            self.now += step
            for nid, node in self.nodes.items():
                if node.up:
                    self.handle(nid, node.replica.tick(self.now))
            self.deliver_all()

    def crash(self, node_id: str) -> None:
        self.nodes[node_id].up = False

    def restart(self, node_id: str) -> Node:
        old = self.nodes[node_id]
        key = next(k for k in self.keys if k.node_id == node_id)
        app = CounterApp()
        node = Node(Replica(self.config, key, self.keyring, app, dict(old.durable), self.now), app, dict(old.durable))
        self.nodes[node_id] = node
        return node

    def finals(self, node_id: str) -> dict[str, Final]:
        out: dict[str, Final] = {}
        for a in self.nodes[node_id].of(Final):
            if a.request_id not in out or a.agreeing > out[a.request_id].agreeing:
                out[a.request_id] = a
        return out

    def committed_ids(self, node_id: str) -> list[str]:
        return [rid for c in self.nodes[node_id].of(Committed) for rid in c.request_ids]


__all__ = ["AlreadyExecuted", "Cluster", "CounterApp", "Evidence", "Final", "Rejected", "StateTransferred", "ViewChanged"]
