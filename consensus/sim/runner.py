"""The simulator: N replicas, one process, one virtual clock, one seeded RNG.

Everything that could differ between two runs of a seed is drawn from a single
``random.Random(f"{scenario}:{seed}")`` in a fixed order, and events with equal times
are ordered by insertion, so a failing seed replays exactly. There is no real time and
no threads: a replica call runs to completion and its actions are carried out in order
before the next event, like a node's event loop.

Crashes keep only what the replica asked to ``Persist``. A "torn" crash stops in the
middle of an action list — the records and sends before the cut happened, the rest
did not — which is the worst moment the persist-before-send rule has to survive.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import random
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from consensus.actions import (
    Action, AlreadyExecuted, Committed, Evidence, Final, Persist, Rejected, Send, StateTransferred, ViewChanged,
)
from consensus.byzantine import ByzantineReplica
from consensus.keys import KeyRing, NodeKey, keyring_of
from consensus.messages import COMMIT, NEW_VIEW, PRE_PREPARE, PREPARE, VIEW_CHANGE, decode
from consensus.sim.app import HashChainApp, encode_request
from consensus.sim.invariants import History, Violation, check_history
from consensus.sim.network import CALM, Network
from consensus.sim.scenarios import Scenario

CLUSTER_ID = "hypermesh-sim"
SCHEME = "Ed25519"  # FACTS.md: 19/60 µs sign/verify, vs 692/130 for ML-DSA-65


@functools.lru_cache(maxsize=16)
def sim_key(node_id: str) -> NodeKey:
    """A fixed Ed25519 key per node id (the private key is a hash of the id): no key
    generation per seed, and the same keys in every replay."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    private = hashlib.sha256(f"hypermesh-sim-key/{node_id}".encode()).digest()
    public = ed25519.Ed25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()
    return NodeKey(node_id=node_id, scheme=SCHEME, private_key=private, public_key=public)


def sim_keyring(nodes: int) -> tuple[list[NodeKey], KeyRing]:
    keys = [sim_key(f"n{i}") for i in range(nodes)]
    return keys, keyring_of(keys)


class _MemoKeyRing:
    """The checker's view of the key ring: signature checks memoized. Verification is a
    pure function, and every Final of one batch carries the same signed root, so this
    removes most of the checker's cost without weakening it. Replicas never see it."""

    __slots__ = ("_ring", "_memo")

    def __init__(self, ring: KeyRing) -> None:
        self._ring = ring
        self._memo: dict[tuple[str, bytes, bytes], bool] = {}

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._ring

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ring, name)

    def verify(self, node_id: str, message: bytes, signature: bytes) -> bool:
        key = (node_id, message, signature)
        known = self._memo.get(key)
        if known is None:
            known = self._memo[key] = self._ring.verify(node_id, message, signature)
        return known


@dataclass(slots=True)
class Instance:
    """One running replica. Twins are two instances with the same ``node_id``."""

    name: str
    node_id: str
    key: NodeKey
    mode: str | None  # Byzantine mode, "twin", or None (honest)
    clock_offset_ms: int
    replica: Any = None
    app: HashChainApp | None = None
    durable: dict[str, bytes] = field(default_factory=dict)
    up: bool = True
    dead: bool = False  # raised an exception: stays down, reported
    stopped: bool = False  # crash-stop: never restarted
    incarnation: int = 0
    torn_crash_pending: bool = False
    # The node's vote guard: the highest (view, seq) it signed, kept outside its store.
    signed_bound: tuple[int, int] | None = None
    backup: dict[str, bytes] | None = None  # an old copy of its store (amnesia scenarios)
    amnesia_pending: bool = False  # restart from the backup, or empty, not from its store


@dataclass(slots=True)
class SimResult:
    scenario: str
    seed: int
    nodes: int
    violations: list[Violation]
    stats: dict[str, int]
    virtual_ms: int
    expect_liveness: bool
    all_final: bool
    replay: str
    history: History = field(repr=False, compare=False)
    twin_nodes: frozenset[str] = frozenset()
    byzantine_nodes: frozenset[str] = frozenset()

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def safety_violations(self) -> list[Violation]:
        return [v for v in self.violations if v.is_safety]


def replay_command(scenario: Scenario, seed: int, base: Scenario | None) -> str:
    from consensus.sim.scenarios import SCENARIOS

    parts = ["hypermesh simulate", f"--scenario {scenario.name}", f"--seed {seed}"]
    named = SCENARIOS.get(scenario.name)
    if named is not None and scenario.nodes != named.nodes:  # ``base`` may already be resized
        parts.append(f"--nodes {scenario.nodes}")
    if base is not None and scenario.byzantine != base.byzantine:
        parts.append("--byzantine " + " ".join(scenario.byzantine) if scenario.byzantine else "--byzantine none")
    return " ".join(parts)


class Simulation:
    """One seed of one scenario. ``run()`` returns the checked result."""

    def __init__(self, scenario: Scenario, seed: int, *, replay: str | None = None,
                 trace: Callable[[str], None] | None = None) -> None:
        from consensus.replica import ReplicaConfig  # late: the replica is another module's work

        self.scenario = scenario
        self.seed = seed
        self.rng = random.Random(f"{scenario.name}:{scenario.nodes}:{seed}")
        self.trace = trace
        self.replay = replay or replay_command(scenario, seed, None)
        self.keys, self.keyring = sim_keyring(scenario.nodes)
        self._checker_ring = _MemoKeyRing(self.keyring)
        self.config = ReplicaConfig(cluster_id=CLUSTER_ID, **dict(scenario.replica_config))
        self.network = Network(self.rng, scenario.faults)
        self.history = History(expect_liveness=scenario.expect_liveness)
        self.now = 0
        self.events: list[tuple[int, int, str, tuple[Any, ...]]] = []
        self._counter = 0
        self.instances: dict[str, Instance] = {}
        self.by_node: dict[str, list[Instance]] = {}
        self.requests: list[tuple[str, bytes]] = []
        self._retired: dict[str, list[list[Any]]] = {}  # app logs of crashed incarnations
        self.final_ids: set[str] = set()
        self._tried: dict[str, set[str]] = {}  # request id -> instances the client already asked
        self.stats: dict[str, int] = {k: 0 for k in (
            "submits", "duplicates", "retries", "deliveries", "crashes", "torn_crashes", "restarts", "partitions",
            "view_changes", "state_transfers", "already_executed", "rejected", "evidence", "finals", "amnesia")}
        self._build()

    # ------------------------------------------------------------------ setup

    def _build(self) -> None:
        s, rng = self.scenario, self.rng
        node_ids = [k.node_id for k in self.keys]
        # Byzantine and twin node ids are drawn at random: sometimes the first leader.
        faulty = rng.sample(node_ids, s.faulty)
        if s.faulty_first_leader and node_ids[0] not in faulty:
            faulty[-1] = node_ids[0]  # the key ring's first node leads view 0
        twin_ids = faulty[: s.twins]
        byz_modes = dict(zip(faulty[s.twins:], s.byzantine))
        honest_ids = [n for n in node_ids if n not in faulty]
        sides: dict[str, int | None] = {}
        if s.split_honest:
            shuffled = honest_ids[:]
            rng.shuffle(shuffled)
            for i, node in enumerate(shuffled):
                sides[node] = i % 2
        for key in self.keys:
            node = key.node_id
            names = [node, node + "'"] if node in twin_ids else [node]
            for side, name in enumerate(names):
                mode = "twin" if node in twin_ids else byz_modes.get(node)
                inst = Instance(name, node, key, mode, rng.randint(-s.clock_skew_ms, s.clock_skew_ms))
                self.instances[name] = inst
                self.by_node.setdefault(node, []).append(inst)
                if node in twin_ids:
                    sides[name] = side
                elif node in sides:
                    sides[name] = sides[node]
                self.history.node_of[name] = node
                if mode is None:
                    self.history.honest.add(name)
        self.network.sides = sides
        self._split: frozenset[str] | None = None
        self._collusion: dict[tuple[int, int], tuple[bytes, bytes]] | None = None
        if s.align_equivocation:
            # Colluders split the honest nodes the same way and share forged digests.
            half = [n for n in honest_ids if sides.get(n) == 1] or rng.sample(honest_ids, len(honest_ids) // 2)
            self._split = frozenset(half)
            self._collusion = {}
        for inst in self.instances.values():
            self._start(inst)
            self._push(rng.randint(0, s.tick_ms), "tick", (inst.name,))
        self._plan_workload()
        self._plan_faults()

    def _start(self, inst: Instance) -> None:
        from consensus.replica import Replica

        inst.app = HashChainApp()
        guarded = self.scenario.vote_guard and inst.mode is None and inst.incarnation > 0
        replica = Replica(self.config, inst.key, self.keyring, inst.app,
                          durable=dict(inst.durable) if inst.incarnation else None, now_ms=self._clock(inst),
                          signed_bound=inst.signed_bound if guarded else None)
        if inst.mode not in (None, "twin"):
            replica = ByzantineReplica(replica, inst.mode, inst.key, self.keyring,
                                       rng_seed=self.rng.randrange(2**32), split=self._split, collusion=self._collusion)
        inst.replica = replica
        inst.incarnation += 1

    def _plan_workload(self) -> None:
        s, rng = self.scenario, self.rng
        names = sorted(self.instances)
        stamped = dict(s.replica_config).get("dedup_window_ms", 0) > 0
        for i in range(s.requests):
            request_id = f"r{i}"
            at = rng.randint(0, s.submit_window_ms)
            request = encode_request(request_id, rng.randbytes(12), at if stamped else None)
            self.requests.append((request_id, request))
            self.history.submitted[request_id] = request
            self._push(at, "submit", (request_id, rng.choice(names), False))
            if s.late_resubmit_ms:
                self._push(at + s.late_resubmit_ms, "submit", (request_id, rng.choice(names), True))
            if rng.random() < s.duplicate_submit_rate:
                self._push(at + rng.randint(0, 100), "submit", (request_id, rng.choice(names), True))
            if s.client_retries:
                self._push(at + s.retry_ms, "retry", (request_id, s.retry_ms))

    def _plan_faults(self) -> None:
        s, rng = self.scenario, self.rng
        honest = sorted(self.history.honest)
        for _ in range(s.crashes):
            if not honest:
                break
            at = rng.randint(0, s.fault_ms - 1)
            down = rng.randint(30, 600)
            victim = rng.choice(honest)
            self._push(at, "crash", (victim, rng.random() < s.torn_crash_rate))
            self._push(min(at + down, s.fault_ms), "restart", (victim,))
        if s.crash_all:
            at = rng.randint(s.submit_window_ms // 3, s.fault_ms - 200)
            back = at + rng.randint(20, 150)
            for victim in honest:
                self._push(at, "crash", (victim, rng.random() < s.torn_crash_rate))
                self._push(back, "restart", (victim,))
        # One node at most: two forgetful validators of four are two faulty ones.
        forgetful = rng.choice(honest) if s.amnesia and honest else None
        for _ in range(s.amnesia):
            victim = forgetful
            backup_at = rng.randint(0, s.fault_ms // 2)
            crash_at = rng.randint(backup_at + 50, s.fault_ms - 1)
            self._push(backup_at, "backup", (victim,))
            self._push(crash_at, "amnesia", (victim,))
            self._push(min(crash_at + rng.randint(30, 600), s.fault_ms), "restart", (victim,))
        for victim in rng.sample(honest, min(s.down, len(honest))):
            self._push(rng.randint(0, s.fault_ms - 1), "stop", (victim,))
        names = sorted(self.instances)
        for _ in range(s.partitions):
            at = rng.randint(0, max(0, s.fault_ms - 100))
            group = frozenset(rng.sample(names, rng.randint(1, len(names) // 2)))
            self._push(at, "partition", (group,))
            self._push(min(at + rng.randint(100, 800), s.fault_ms), "unpartition", ())
        self._push(s.fault_ms, "heal", ())

    # ------------------------------------------------------------------ event loop

    def _push(self, at: int, kind: str, data: tuple[Any, ...]) -> None:
        self._counter += 1
        heapq.heappush(self.events, (at, self._counter, kind, data))

    def _clock(self, inst: Instance) -> int:
        return max(0, self.now + inst.clock_offset_ms)

    def run(self) -> SimResult:
        s = self.scenario
        deadline = s.fault_ms + s.recover_ms
        settle_until: int | None = None
        # Bounded: every event either is a tick (bounded by the deadline) or was caused
        # by one; the step cap is a guard against a replica that floods the network.
        max_steps = 2_000_000
        steps = 0
        while self.events and steps < max_steps:
            at, _, kind, data = heapq.heappop(self.events)
            if at > deadline:
                break
            if settle_until is not None and at > settle_until:
                break
            self.now = at
            steps += 1
            getattr(self, f"_on_{kind.replace('-', '_')}")(*data)
            if settle_until is None and self.now >= s.fault_ms and len(self.final_ids) == len(self.requests):
                # Everything is final: run a little longer so lagging replicas catch up
                # (more executions for the checker to compare), then stop.
                settle_until = self.now + 300
        if steps >= max_steps:
            self.history.exceptions.append(("<simulator>", f"step limit {max_steps} reached at {self.now} ms"))
        self._collect()
        violations = check_history(self.history, verify_certificate=self._verify_certificate, verify_evidence=self._verify_evidence)
        if steps >= max_steps:
            violations.append(Violation("liveness", f"simulation did not settle within {max_steps} events"))
        faulty = [i for i in self.instances.values() if i.mode is not None]
        return SimResult(s.name, self.seed, s.nodes, violations, self.stats, self.now, s.expect_liveness,
                         len(self.final_ids) == len(self.requests), self.replay, self.history,
                         frozenset(i.node_id for i in faulty if i.mode == "twin"),
                         frozenset(i.node_id for i in faulty if i.mode != "twin"))

    def _collect(self) -> None:
        """App logs are the ground truth for execution; gathered once at the end."""
        for name, logs in self._app_logs.items():
            for log in logs:
                self.history.executions[name].extend(log)
        for inst in self.instances.values():  # bounded de-dup at work (summed over live incarnations)
            counters = getattr(inst.replica, "counters", None) or {}
            for name in ("expired", "forgotten_request_ids", "view_changes_deferred"):
                self.stats[name] = self.stats.get(name, 0) + counters.get(name, 0)

    # ------------------------------------------------------------------ events

    def _on_tick(self, name: str) -> None:
        inst = self.instances[name]
        if inst.up:
            self._call(inst, lambda r: r.tick(self._clock(inst)))
        if not inst.dead:
            self._push(self.now + self.scenario.tick_ms, "tick", (name,))

    def _on_deliver(self, src: str, dst: str, payload: bytes) -> None:
        inst = self.instances[dst]
        if not inst.up or not self.network.connected(src, dst):
            return
        self.stats["deliveries"] += 1
        sender = self.instances[src].node_id
        self._call(inst, lambda r: r.receive(sender, payload, self._clock(inst)))

    def _on_submit(self, request_id: str, name: str, duplicate: bool) -> None:
        if request_id in self.final_ids and not duplicate:
            return
        inst = self.instances[name]
        self._tried.setdefault(request_id, set()).add(name)
        self.stats["duplicates" if duplicate else "submits"] += 1
        if not inst.up:
            self._refused(request_id, duplicate)  # connection refused
            return
        request = self.history.submitted[request_id]
        applied = self._call(inst, lambda r: r.submit(request_id, request, self._clock(inst)))
        if not inst.up and not any(isinstance(a, Persist) for a in applied):
            self._refused(request_id, duplicate)  # died before accepting it: connection reset

    def _refused(self, request_id: str, duplicate: bool) -> None:
        """The client sees a refused/reset connection and, even when it does not retry
        on timeouts, tries another node at once. A request a node *accepted* (persisted)
        is never re-sent in ``client_retries=False`` scenarios: it must not be lost."""
        if not self.scenario.client_retries and not duplicate:
            self._push(self.now + 1, "submit", (request_id, self._next_target(request_id), False))

    def _next_target(self, request_id: str) -> str:
        """Like a real client, a retry goes to a node not asked yet (then starts over):
        otherwise a client could keep asking the one silent node for ever."""
        tried = self._tried.get(request_id, set())
        fresh = [n for n in sorted(self.instances) if n not in tried]
        if not fresh:
            tried.clear()
            fresh = sorted(self.instances)
        return self.rng.choice(fresh)

    def _on_retry(self, request_id: str, backoff: int) -> None:
        if request_id in self.final_ids:
            return
        self.stats["retries"] += 1
        self._on_submit(request_id, self._next_target(request_id), False)
        backoff = min(backoff * 2, 4000)
        self._push(self.now + backoff, "retry", (request_id, backoff))

    def _on_crash(self, name: str, torn: bool) -> None:
        inst = self.instances[name]
        if not inst.up:
            return
        if torn:
            inst.torn_crash_pending = True  # crash inside its next action list
        else:
            self._crash(inst)

    def _on_backup(self, name: str) -> None:
        inst = self.instances[name]
        inst.backup = dict(inst.durable)

    def _on_amnesia(self, name: str) -> None:
        """Crash; the restart finds the store rolled back to the backup, or emptied."""
        inst = self.instances[name]
        if inst.up:
            self._crash(inst)
        inst.amnesia_pending = True

    def _on_stop(self, name: str) -> None:
        inst = self.instances[name]
        inst.stopped = True
        if inst.up:
            self._crash(inst)

    def _crash(self, inst: Instance) -> None:
        self.stats["crashes"] += 1
        self._note(f"crash {inst.name}")
        inst.up = False
        inst.torn_crash_pending = False
        self._retire_app(inst)
        inst.replica = None

    def _on_restart(self, name: str) -> None:
        inst = self.instances[name]
        if inst.torn_crash_pending:
            self._crash(inst)  # it got no event to tear: crash it cleanly now
        self._restart(inst)

    def _restart(self, inst: Instance) -> None:
        if inst.up or inst.dead or inst.stopped:
            return
        self.stats["restarts"] += 1
        inst.up = True
        if inst.amnesia_pending:
            inst.amnesia_pending = False
            self.stats["amnesia"] += 1
            inst.durable = dict(inst.backup) if inst.backup is not None and self.rng.random() < 0.5 else {}
            self._note(f"{inst.name}'s store went back in time: {len(inst.durable)} records left")
        self._note(f"restart {inst.name} with {len(inst.durable)} durable records")
        self._call(inst, lambda _r: self._start(inst) or [])

    def _note(self, text: str) -> None:
        if self.trace is not None:
            self.trace(f"{self.now:>7} ms  {text}")

    def _on_partition(self, group: frozenset[str]) -> None:
        self.stats["partitions"] += 1
        self._note(f"partition {sorted(group)} | rest")
        rest = frozenset(self.instances) - group
        self.network.partition = (group, rest)

    def _on_unpartition(self) -> None:
        self.network.partition = None

    def _on_heal(self) -> None:
        self.network.partition = None
        self.network.faults = CALM
        for inst in self.instances.values():
            if inst.torn_crash_pending:
                self._crash(inst)
        self._note("heal: network calm, partitions gone, crashed nodes restart")
        for inst in self.instances.values():
            self._restart(inst)

    # ------------------------------------------------------------------ actions

    @property
    def _app_logs(self) -> dict[str, list[list[Any]]]:
        logs: dict[str, list[list[Any]]] = {}
        for name, inst in self.instances.items():
            logs[name] = list(self._retired.get(name, []))
            if inst.app is not None:
                logs[name].append(inst.app.log)
        return logs

    def _retire_app(self, inst: Instance) -> None:
        if inst.app is not None:
            self._retired.setdefault(inst.name, []).append(inst.app.log)
            inst.app = None

    def _call(self, inst: Instance, call: Callable[[Any], list[Action] | None]) -> list[Action]:
        """Run one replica call and carry out its actions; returns the ones carried out."""
        try:
            actions = call(inst.replica) or []
        except Exception:  # an honest replica must never raise on any input
            self.history.exceptions.append((inst.name, f"at {self.now} ms: " + traceback.format_exc(limit=8)))
            self._note(f"{inst.name} raised; it stays down")
            inst.dead = True
            inst.up = False
            self._retire_app(inst)
            return []
        if inst.torn_crash_pending and actions:
            cut = self.rng.randint(0, len(actions))
            self.stats["torn_crashes"] += 1
            self._guard(inst, [a.payload for a in actions[:cut] if isinstance(a, Send)])
            self._apply(inst, actions[:cut])
            self._crash(inst)
            return actions[:cut]
        if inst.mode is None and inst.replica is not None:
            self._guard(inst, [], inst.replica.signed_high)
        self._apply(inst, actions)
        return actions

    def _guard(self, inst: Instance, sent: list[bytes], high: tuple[int, int] = (0, 0)) -> None:
        """The node's vote guard (node/vote_guard.py): written after the pass's records
        are durable and before its sends leave, so it covers every vote sent and never
        exceeds what the store holds. A torn crash here stops mid-list: the guard then
        covers the votes that did go out (each one's record precedes it in the list)."""
        if inst.mode is not None:
            return
        view, seq = high
        for payload in sent:
            msg = decode(payload)
            if msg.signer != inst.node_id:
                continue
            p = msg.payload
            if msg.kind in (PRE_PREPARE, PREPARE, COMMIT):
                view, seq = max(view, p.view), max(seq, p.seq)
            elif msg.kind == VIEW_CHANGE:
                view = max(view, p.new_view)
            elif msg.kind == NEW_VIEW:
                view = max(view, p.view)
        old = inst.signed_bound or (0, 0)
        inst.signed_bound = (max(view, old[0]), max(seq, old[1]))

    def _apply(self, inst: Instance, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self._send(inst, action)
            elif isinstance(action, Persist):
                for key, value in action.records:
                    if value is None:
                        inst.durable.pop(key, None)
                    else:
                        inst.durable[key] = value
            elif isinstance(action, Final):
                self.stats["finals"] += 1
                self.history.finals.append((inst.name, action))
                if (inst.name in self.history.honest and action.request_id in self.history.submitted
                        and action.request_id not in self.final_ids):
                    if self._verify_certificate(action.request_id, action.result, action.certificate)[0]:
                        self.final_ids.add(action.request_id)
            elif isinstance(action, Committed):
                self.history.committed.append((inst.name, action))
            elif isinstance(action, Evidence):
                self.stats["evidence"] += 1
                self.history.evidence.append((inst.name, action))
            elif isinstance(action, ViewChanged):
                self.stats["view_changes"] += 1
            elif isinstance(action, StateTransferred):
                self.stats["state_transfers"] += 1
            elif isinstance(action, AlreadyExecuted):
                self.stats["already_executed"] += 1
            elif isinstance(action, Rejected):
                self.stats["rejected"] += 1

    def _send(self, inst: Instance, send: Send) -> None:
        if send.to is None:
            targets = [t for t in self.instances.values() if t.node_id != inst.node_id]
        else:
            targets = self.by_node.get(send.to, [])
        for target in targets:
            for at in self.network.schedule(inst.name, target.name, self.now):
                self._push(at, "deliver", (inst.name, target.name, send.payload))

    # ------------------------------------------------------------------ verification

    def _verify_certificate(self, request_id: str, result: bytes, certificate: Any) -> tuple[bool, str]:
        from consensus.certificate import verify_result_certificate

        return verify_result_certificate(self._checker_ring, CLUSTER_ID, request_id, result, certificate)  # type: ignore[arg-type]

    def _verify_evidence(self, evidence: Evidence) -> bool:
        from consensus.evidence import verify_evidence

        return verify_evidence(self._checker_ring, evidence)  # type: ignore[arg-type]


def run_seed(scenario: Scenario, seed: int, *, base: Scenario | None = None,
             trace: Callable[[str], None] | None = None) -> SimResult:
    """Run and check one seed. ``base`` is the unmodified named scenario, so the replay
    command only spells out the overrides."""
    if base is not None and base.nodes != scenario.nodes:
        from consensus.sim.scenarios import scenario_for

        base = scenario_for(base.name, nodes=scenario.nodes)  # a size change alone is not a --byzantine override
    return Simulation(scenario, seed, replay=replay_command(scenario, seed, base), trace=trace).run()
