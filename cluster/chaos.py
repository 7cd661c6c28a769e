"""Chaos for the compose cluster: faults, a recorded load, and a history checker.

Three parts, used by ``tests/docker`` and usable by hand (``python -m cluster.chaos``):

* :class:`ComposeCluster` runs ``compose.yaml`` under a unique project name and injects
  faults into *its own* containers only, through the Docker SDK: ``kill -9``/start,
  pause/unpause, network disconnect/connect (keeping the ``consensus`` alias), iptables
  partitions of one node from the others (both directions, or only what it sends) and random packet loss with
  the iptables ``statistic`` match (the kernel here has no ``netem``). On failure
  :meth:`ComposeCluster.collect_logs` writes every container's log, state and iptables
  rules into a folder.
* :class:`LoadRunner` sends a bounded number of four-proof requests and records each
  operation: when it was sent, whether and when the cluster acknowledged it, the final
  result and its certificate.
* :func:`check_history` asks every node for every request afterwards and checks the
  safety properties: every acknowledged request has exactly one final result, every
  certificate verifies against the manifest, no two verified results for one request
  differ, nothing acknowledged is lost.

Only the load and the checker talk the cluster's protocol (through ``ClusterClient``);
the fault helpers know nothing of consensus. ``docker`` (the SDK, a test extra) is
imported lazily so importing this module never needs it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import ipaddress
import json
import os
import subprocess
import tarfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILES = {4: ("compose.yaml",), 7: ("compose.yaml", "compose.f2.yaml")}
CHAIN_IN, CHAIN_OUT = "HM_CHAOS_IN", "HM_CHAOS_OUT"
STOQ_PORT = 9292


class ChaosError(RuntimeError):
    """A fault could not be injected or a wait ran out; the message says which and why."""


def compose_command() -> list[str]:
    """``docker-compose`` (v1) when present, else the ``docker compose`` v2 plugin."""
    override = os.environ.get("HYPERMESH_COMPOSE")
    if override:
        return override.split()
    for candidate in (["docker-compose"], ["docker", "compose"]):
        try:
            if subprocess.run([*candidate, "version"], capture_output=True, timeout=30).returncode == 0:
                return candidate
        except (OSError, subprocess.TimeoutExpired):
            continue
    raise ChaosError("neither docker-compose nor 'docker compose' is available")


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.5) -> Any:
    """Poll ``predicate`` until it returns something truthy; ChaosError after the deadline."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - reported if the deadline passes
            last_error = exc
        if time.monotonic() >= deadline:
            suffix = f" (last error: {last_error!r})" if last_error else ""
            raise ChaosError(f"timed out after {timeout_s:.0f}s waiting for {what}{suffix}")
        time.sleep(interval_s)


# ---------------------------------------------------------------------------------------
# the compose cluster and its faults
# ---------------------------------------------------------------------------------------


MAX_SLOT = 199


def slot_environment(slot: int) -> dict[str, str]:
    """Subnets and host ports of one compose project; distinct for every slot 0..199."""
    if not 0 <= slot <= MAX_SLOT:
        raise ValueError(f"slot must be in 0..{MAX_SLOT}, got {slot}")
    env = {
        "HYPERMESH_SUBNET6": f"fd42:4d48:{0x100 + slot:x}::/64",
        "HYPERMESH_SUBNET4": f"172.30.{56 + slot}.0/24",  # third octet 56..255
    }
    base = 20000 + slot * 20
    for i in range(1, 8):
        env[f"HYPERMESH_PORT_{i}"] = str(base + i)
        env[f"HYPERMESH_METRICS_PORT_{i}"] = str(base + 10 + i)
    return env


def docker_subnets() -> list[str]:
    """Every subnet a docker network on this host holds (the SDK is a test extra)."""
    import docker

    subnets = []
    for network in docker.from_env(timeout=30).networks.list():
        for config in (network.attrs.get("IPAM") or {}).get("Config") or []:
            if config.get("Subnet"):
                subnets.append(config["Subnet"])
    return subnets


def free_slot(preferred: int, in_use: Iterable[str] | None = None) -> int:
    """The first slot from ``preferred`` on (wrapping around) whose subnets overlap no
    existing docker network. A project left behind by an interrupted run keeps its
    network, and compose then refuses ours ("Pool overlaps with other one")."""
    taken = [ipaddress.ip_network(n, strict=False) for n in (docker_subnets() if in_use is None else in_use)]
    for offset in range(MAX_SLOT + 1):
        slot = (preferred + offset) % (MAX_SLOT + 1)
        env = slot_environment(slot)
        ours = [ipaddress.ip_network(env[k]) for k in ("HYPERMESH_SUBNET4", "HYPERMESH_SUBNET6")]
        if not any(a.version == b.version and a.overlaps(b) for a in ours for b in taken):  # type: ignore[arg-type]
            return slot
    raise ChaosError(f"every one of the {MAX_SLOT + 1} compose slots overlaps a docker network: "
                     "remove stale ones with 'docker network prune'")


@dataclass
class ComposeCluster:
    """One compose project: ``nodes`` validators, its own subnet, ports and volumes.

    ``slot`` (0..199) picks a distinct IPv6/IPv4 subnet and host port range so several
    projects never collide; the project name is unique per instance.
    """

    nodes: int = 4
    project: str = field(default_factory=lambda: f"hmchaos{uuid.uuid4().hex[:8]}")
    slot: int = 0  # 0..199
    node_args: str = ""
    byzantine: dict[str, str] = field(default_factory=dict)
    image: str = "hypermesh-consensus:latest"
    work_dir: Path = field(default_factory=lambda: ROOT / "ops" / ".build" / "chaos")

    def __post_init__(self) -> None:
        if self.nodes not in COMPOSE_FILES:
            raise ValueError(f"nodes must be one of {sorted(COMPOSE_FILES)}")
        slot_environment(self.slot)  # refuse a slot outside 0..199 before touching docker
        import docker  # the SDK is a test extra

        self.docker = docker.from_env(timeout=60)
        self.compose = compose_command()
        self.node_ids = [f"node-{i}" for i in range(1, self.nodes + 1)]
        self.cluster_dir = self.work_dir / self.project / "cluster"

    # -- compose -------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(slot_environment(self.slot))
        env.update({"HYPERMESH_IMAGE": self.image, "HYPERMESH_NODE_ARGS": self.node_args})
        for i in range(1, 8):
            env[f"HYPERMESH_BYZANTINE_NODE_{i}"] = self.byzantine.get(f"node-{i}", "")
        return env

    def compose_run(self, *args: str, timeout_s: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        files = [arg for name in COMPOSE_FILES[self.nodes] for arg in ("-f", str(ROOT / name))]
        cmd = [*self.compose, "-p", self.project, *files, *args]
        result = subprocess.run(cmd, cwd=ROOT, env=self.env(), capture_output=True, text=True, timeout=timeout_s)
        if check and result.returncode != 0:
            raise ChaosError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def up(self, timeout_s: float = 120) -> None:
        self.compose_run("up", "-d", "--no-build", timeout_s=timeout_s + 60)
        self.wait_healthy(self.node_ids, timeout_s)
        self.fetch_cluster_dir()

    def down(self) -> None:
        """Remove the project's containers, network and volumes (always safe to call)."""
        self.compose_run("down", "-v", "--remove-orphans", "-t", "5", timeout_s=180, check=False)

    def recreate(self, node_id: str, byzantine: str | None = None, timeout_s: float = 90) -> None:
        """Re-create one validator (e.g. to switch its --byzantine mode); keeps its data volume."""
        if byzantine is not None:
            self.byzantine[node_id] = byzantine
        self.compose_run("up", "-d", "--no-build", "--no-deps", "--force-recreate", node_id, timeout_s=timeout_s)
        self.wait_healthy([node_id], timeout_s)

    # -- containers ----------------------------------------------------------------------

    def containers(self, all_: bool = True) -> list[Any]:
        return self.docker.containers.list(all=all_, filters={"label": f"com.docker.compose.project={self.project}"})

    def container(self, node_id: str) -> Any:
        found = self.docker.containers.list(all=True, filters={"label": [
            f"com.docker.compose.project={self.project}", f"com.docker.compose.service={node_id}"]})
        if not found:
            raise ChaosError(f"no container for {node_id} in project {self.project}")
        return found[0]

    def network_name(self) -> str:
        return f"{self.project}_mesh"

    def addresses(self, node_id: str) -> tuple[str, str]:
        """(IPv6, IPv4) of a node on the cluster network."""
        c = self.container(node_id)
        c.reload()
        net = c.attrs["NetworkSettings"]["Networks"].get(self.network_name())
        if not net:
            raise ChaosError(f"{node_id} is not attached to {self.network_name()}")
        return net.get("GlobalIPv6Address") or "", net.get("IPAddress") or ""

    def health(self, node_id: str) -> str:
        c = self.container(node_id)
        c.reload()
        state = c.attrs["State"]
        if state.get("Status") != "running":
            return state.get("Status", "unknown")
        return (state.get("Health") or {}).get("Status", "running")

    def wait_healthy(self, node_ids: Iterable[str], timeout_s: float = 90) -> None:
        node_ids = list(node_ids)
        wait_until(lambda: all(self.health(n) == "healthy" for n in node_ids), timeout_s,
                   f"{', '.join(node_ids)} healthy in {self.project} "
                   f"(now: { {n: self.health(n) for n in node_ids} })")

    def fetch_cluster_dir(self) -> Path:
        """Copy /cluster (manifest, CA, client cert) out of the init container."""
        if (self.cluster_dir / "manifest.json").exists():
            return self.cluster_dir
        init = self.docker.containers.list(all=True, filters={"label": [
            f"com.docker.compose.project={self.project}", "com.docker.compose.service=init"]})
        if not init:
            raise ChaosError("the init container is gone; cannot read /cluster")
        stream, _ = init[0].get_archive("/cluster")
        data = io.BytesIO(b"".join(stream))
        target = self.cluster_dir.parent
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=data) as tar:
            tar.extractall(target, filter="data")
        return self.cluster_dir

    # -- faults --------------------------------------------------------------------------

    def kill(self, node_id: str) -> None:
        """kill -9: no shutdown path runs."""
        self.container(node_id).kill(signal="SIGKILL")

    def start(self, node_id: str) -> None:
        self.container(node_id).start()

    def restart(self, node_id: str, timeout_s: float = 10) -> None:
        self.container(node_id).restart(timeout=timeout_s)

    def pause(self, node_id: str) -> None:
        self.container(node_id).pause()

    def unpause(self, node_id: str) -> None:
        self.container(node_id).unpause()

    def disconnect(self, node_id: str) -> None:
        self.docker.networks.get(self.network_name()).disconnect(self.container(node_id), force=True)

    def connect(self, node_id: str) -> None:
        """Re-attach with both aliases: docker drops compose's aliases unless given again."""
        self.docker.networks.get(self.network_name()).connect(
            self.container(node_id), aliases=[node_id, "consensus"])

    def exec_root(self, node_id: str, cmd: Sequence[str] | str, check: bool = True) -> str:
        result = self.container(node_id).exec_run(cmd if isinstance(cmd, str) else list(cmd), user="root")
        output = result.output.decode(errors="replace") if result.output else ""
        if check and result.exit_code != 0:
            raise ChaosError(f"{node_id}: {cmd!r} exited {result.exit_code}: {output.strip()}")
        return output

    def _ensure_chains(self, node_id: str) -> None:
        """HM_CHAOS_IN/OUT hooked into INPUT/OUTPUT (v4 and v6), loopback exempt, so a
        heal is a flush and health checks inside the container keep working."""
        script = []
        for tool in ("iptables", "ip6tables"):
            for chain, hook, lo in ((CHAIN_IN, "INPUT", "-i"), (CHAIN_OUT, "OUTPUT", "-o")):
                script.append(
                    f"{tool} -N {chain} 2>/dev/null && {tool} -A {chain} {lo} lo -j RETURN; "
                    f"{tool} -C {hook} -j {chain} 2>/dev/null || {tool} -I {hook} 1 -j {chain}")
        self.exec_root(node_id, ["sh", "-ec", "; ".join(script)])

    def partition(self, node_id: str, from_nodes: Iterable[str] | None = None, one_way: bool = False) -> None:
        """Cut ``node_id`` off from the other validators, both directions, or with
        ``one_way`` only what it sends to them (it still hears them: a one-way link).
        Rules go into the isolated node *and* into each peer, so neither side can reach
        the other even if one side's rules were to be flushed by a restart. The host (the
        test client) still reaches every node."""
        peers = [n for n in (from_nodes or self.node_ids) if n != node_id]
        mine = self.addresses(node_id)
        self._ensure_chains(node_id)
        rules = []
        for peer in peers:
            v6, v4 = self.addresses(peer)
            rules += self._drop_rules(v6, v4, inbound=not one_way, outbound=True)
        self.exec_root(node_id, ["sh", "-ec", "; ".join(rules)])
        for peer in peers:
            self._ensure_chains(peer)
            self.exec_root(peer, ["sh", "-ec", "; ".join(
                self._drop_rules(*mine, inbound=True, outbound=not one_way))])

    @staticmethod
    def _drop_rules(v6: str, v4: str, *, inbound: bool, outbound: bool) -> list[str]:
        """DROP rules for packets from (``inbound``) and to (``outbound``) one address."""
        rules = []
        for tool, address in (("ip6tables", v6), ("iptables", v4)):
            if address and inbound:
                rules.append(f"{tool} -A {CHAIN_IN} -s {address} -j DROP")
            if address and outbound:
                rules.append(f"{tool} -A {CHAIN_OUT} -d {address} -j DROP")
        return rules

    def packet_loss(self, node_id: str, probability: float) -> None:
        """Drop a random share of the node's UDP packets, in and out (iptables statistic)."""
        if not 0.0 < probability < 1.0:
            raise ValueError("probability must be in (0, 1)")
        self._ensure_chains(node_id)
        rules = []
        for tool in ("iptables", "ip6tables"):
            for chain in (CHAIN_IN, CHAIN_OUT):
                rules.append(f"{tool} -A {chain} -p udp -m statistic --mode random "
                             f"--probability {probability:.4f} -j DROP")
        self.exec_root(node_id, ["sh", "-ec", "; ".join(rules)])

    def heal(self, node_ids: Iterable[str] | None = None) -> None:
        """Flush every chaos rule (partitions and loss) on the given (default: all) nodes."""
        for node_id in node_ids or self.node_ids:
            if self.health(node_id) in ("exited", "dead", "created"):
                continue
            self.exec_root(node_id, ["sh", "-c", "; ".join(
                f"{tool} -F {chain} 2>/dev/null; {tool} -A {chain} {lo} lo -j RETURN 2>/dev/null"
                for tool in ("iptables", "ip6tables") for chain, lo in ((CHAIN_IN, "-i"), (CHAIN_OUT, "-o")))],
                check=False)

    def chaos_rules(self, node_id: str) -> str:
        return self.exec_root(node_id, ["sh", "-c", "iptables -S; ip6tables -S"], check=False)

    # -- evidence for humans ---------------------------------------------------------------

    def collect_logs(self, dest: Path) -> Path:
        """Every container's log, state and chaos rules, plus ``compose ps``, into ``dest``."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        for c in self.containers():
            service = c.labels.get("com.docker.compose.service", c.name)
            try:
                (dest / f"{service}.log").write_bytes(c.logs(timestamps=True, stdout=True, stderr=True))
                c.reload()
                (dest / f"{service}.state.json").write_text(json.dumps(
                    {"name": c.name, "state": c.attrs.get("State"), "networks": c.attrs["NetworkSettings"]["Networks"]},
                    indent=2, default=str))
                if c.status == "running" and service.startswith("node-"):
                    (dest / f"{service}.iptables.txt").write_text(self.chaos_rules(service))
            except Exception as exc:  # noqa: BLE001 - collecting must not hide the failure
                (dest / f"{service}.error.txt").write_text(repr(exc))
        ps = self.compose_run("ps", check=False, timeout_s=60)
        (dest / "compose-ps.txt").write_text(ps.stdout + ps.stderr)
        return dest

    # -- protocol side ---------------------------------------------------------------------

    def client(self, only: Iterable[str] | None = None, **kwargs: Any) -> Any:
        """A ``ClusterClient`` that reaches every node (or just the ``only`` ones) at its
        container address (the host routes to the bridge network) while checking each
        node's own TLS name."""
        from cluster.client import ClusterClient
        from cluster.manifest import load_manifest

        manifest = load_manifest(self.fetch_cluster_dir())
        wanted = set(only) if only is not None else None
        entries = []
        for entry in manifest.nodes:
            if wanted is not None and entry.node_id not in wanted:
                continue
            v6, v4 = self.addresses(entry.node_id)
            entries.append(dataclasses.replace(entry, host=v6 or v4, port=STOQ_PORT))
        kwargs.setdefault("timeout_s", 10.0)
        return ClusterClient(manifest, endpoints=entries, **kwargs)


# ---------------------------------------------------------------------------------------
# load and history
# ---------------------------------------------------------------------------------------


@dataclass
class Operation:
    request_id: str
    sent_at: float
    acked_at: float | None = None
    ack_status: str | None = None
    acked_by: str | None = None
    final_at: float | None = None
    status: str | None = None
    result_digest: str | None = None
    certificate_ok: bool | None = None
    confidence: float | None = None
    validator_nodes: int | None = None
    leader: str | None = None
    attempts: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def acknowledged(self) -> bool:
        return self.acked_at is not None


def result_digest(payload: dict[str, Any]) -> str:
    result = payload.get("result")
    return hashlib.sha256(result if isinstance(result, bytes) else repr(result).encode()).hexdigest()


class LoadRunner:
    """A bounded four-proof load: ``total`` requests, at most ``concurrency`` in flight.

    Each request gets its own holder key (the time proof must be newer than the holder's
    last one) and is retried with the same request id until acknowledged or until
    ``ack_deadline_s`` passes (the cluster de-duplicates). Every step is recorded in
    ``operations``.
    """

    def __init__(self, client: Any, params: Any, *, total: int = 20, concurrency: int = 4,
                 ack_deadline_s: float = 60.0, final_deadline_s: float = 90.0, prefix: str | None = None,
                 holder_scheme: str = "ML-DSA-44") -> None:
        self.client = client
        self.params = params
        self.total = total
        self.concurrency = concurrency
        self.ack_deadline_s = ack_deadline_s
        self.final_deadline_s = final_deadline_s
        self.prefix = prefix or f"chaos-{uuid.uuid4().hex[:6]}"
        self.holder_scheme = holder_scheme
        self.operations: list[Operation] = []
        self.started = asyncio.Event()

    def _payload(self, request_id: str) -> dict[str, Any]:
        from consensus.prover import HolderKeys, make_proof_set

        holder = HolderKeys.generate(self.holder_scheme)
        return make_proof_set(request_id, self.params, holder, int(time.time() * 1000))

    async def _one(self, index: int) -> None:
        from transport.envelope import ApiError

        request_id = f"{self.prefix}-{index:04d}"
        payload = await asyncio.to_thread(self._payload, request_id)
        op = Operation(request_id=request_id, sent_at=time.time())
        self.operations.append(op)
        deadline = time.monotonic() + self.ack_deadline_s
        answer: Any = None
        while op.acked_at is None and time.monotonic() < deadline:
            op.attempts += 1
            try:
                answer = await self.client.call("consensus/validate_proofs", payload)
                op.acked_at, op.ack_status = time.time(), str(answer.get("status"))
                op.acked_by = self.client.leader
            except ApiError as exc:
                op.errors.append(f"{time.time():.3f} {exc.code}: {exc}")
                await asyncio.sleep(0.5)
            except Exception as exc:  # noqa: BLE001 - recorded; a load run does not crash
                op.errors.append(f"{time.time():.3f} {type(exc).__name__}: {exc}")
                await asyncio.sleep(0.5)
        if op.acked_at is None:
            return
        try:
            if answer.get("status") not in ("Valid", "Invalid", "Error"):
                answer = await self.client.wait_final(request_id, self.final_deadline_s)
            self.record_final(op, answer)
        except Exception as exc:  # noqa: BLE001
            op.errors.append(f"{time.time():.3f} final: {type(exc).__name__}: {exc}")

    def record_final(self, op: Operation, answer: dict[str, Any]) -> None:
        op.final_at, op.status = time.time(), answer.get("status")
        op.result_digest = result_digest(answer)
        op.leader = answer.get("leader")
        metrics = answer.get("metrics") or {}
        op.confidence, op.validator_nodes = metrics.get("confidence_level"), metrics.get("validator_nodes")
        try:
            self.client.verify_result(answer)
            op.certificate_ok = True
        except Exception as exc:  # noqa: BLE001
            op.certificate_ok = False
            op.errors.append(f"certificate: {exc}")

    async def run(self) -> list[Operation]:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(self.total):
            queue.put_nowait(i)

        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                self.started.set()
                await self._one(i)

        await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        return self.operations


@dataclass
class HistoryReport:
    operations: list[Operation]
    per_node: dict[str, dict[str, dict[str, Any]]]
    problems: list[str]
    byzantine: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def acknowledged(self) -> list[Operation]:
        return [op for op in self.operations if op.acknowledged]

    def summary(self) -> str:
        acked = self.acknowledged
        final = [op for op in acked if op.status]
        lines = [f"{len(self.operations)} sent, {len(acked)} acknowledged, {len(final)} final at the client, "
                 f"{len(self.problems)} problem(s)"]
        lines += [f"  PROBLEM {p}" for p in self.problems[:40]]
        if len(self.problems) > 40:
            lines.append(f"  ... {len(self.problems) - 40} more")
        return "\n".join(lines)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            "summary": self.summary(), "problems": self.problems, "byzantine": list(self.byzantine),
            "operations": [dataclasses.asdict(op) for op in self.operations],
            "per_node": self.per_node,
        }, indent=2, default=str))


async def check_history(client: Any, operations: Sequence[Operation], node_ids: Sequence[str], *,
                        byzantine: Iterable[str] = (), converge_s: float = 60.0,
                        require_final_at_client: bool = True) -> HistoryReport:
    """Ask every node for every acknowledged request until honest nodes converge.

    Checked: (1) each acknowledged request is final on every honest node (nothing
    acknowledged is lost; a node that was down has caught up) within ``converge_s``;
    (2) every final answer carries a certificate that verifies against the manifest —
    from a Byzantine node an unverifiable answer is tolerated (the client rejects it);
    (3) all verified results for one request are the same bytes, across nodes and the
    client's own answer: exactly one final result; (4) with ``require_final_at_client``
    each acknowledged request also reached a verified final result at the client.
    """
    byzantine = tuple(byzantine)
    honest = [n for n in node_ids if n not in byzantine]
    acked = [op for op in operations if op.acknowledged]
    per_node: dict[str, dict[str, dict[str, Any]]] = {n: {} for n in node_ids}

    async def query(node_id: str, request_id: str) -> dict[str, Any]:
        try:
            answer = await client.call_node(node_id, "consensus/validation_status", {"request_id": request_id},
                                            timeout_s=5.0)
        except Exception as exc:  # noqa: BLE001 - an unreachable node is an observation
            code = getattr(exc, "code", None)
            label = "unknown-to-node" if str(code).endswith("NotFound") else "unreachable"
            return {"status": label, "error": f"{type(exc).__name__}: {exc}"}
        status = answer.get("status") if isinstance(answer, dict) else None
        entry: dict[str, Any] = {"status": status}
        if status in ("Valid", "Invalid", "Error"):
            entry["digest"] = result_digest(answer)
            try:
                client.verify_result(answer)
                entry["verified"] = True
            except Exception as exc:  # noqa: BLE001
                entry["verified"], entry["error"] = False, str(exc)
            metrics = answer.get("metrics") or {}
            entry["confidence"], entry["validator_nodes"] = metrics.get("confidence_level"), metrics.get("validator_nodes")
        return entry

    deadline = time.monotonic() + converge_s
    pending = {(n, op.request_id) for n in node_ids for op in acked}
    while pending:
        batch = sorted(pending)
        answers = await asyncio.gather(*(query(n, r) for n, r in batch))
        for (n, r), entry in zip(batch, answers):
            per_node[n][r] = entry
            if entry["status"] in ("Valid", "Invalid", "Error") or n in byzantine:
                pending.discard((n, r))
        if not pending or time.monotonic() >= deadline:
            break
        await asyncio.sleep(1.0)

    problems: list[str] = []
    for op in acked:
        verified: dict[str, set[str]] = {}
        if op.status is not None:
            if op.certificate_ok:
                verified.setdefault(op.result_digest or "", set()).add("client")
            else:
                problems.append(f"{op.request_id}: the client's final result did not verify ({op.errors[-1:]})")
        elif require_final_at_client:
            problems.append(f"{op.request_id}: acknowledged ({op.ack_status}) but no final result at the client "
                            f"({op.errors[-1:]})")
        for n in node_ids:
            entry = per_node[n].get(op.request_id, {"status": "not asked"})
            final = entry.get("status") in ("Valid", "Invalid", "Error")
            if n in honest and not final:
                problems.append(f"{op.request_id}: honest {n} has no final result ({entry})")
            if final and entry.get("verified"):
                verified.setdefault(entry["digest"], set()).add(n)
            elif final and n in honest:
                problems.append(f"{op.request_id}: honest {n} served a result whose certificate fails: {entry.get('error')}")
        if len(verified) > 1:
            problems.append(f"{op.request_id}: CONFLICTING verified final results: "
                            + "; ".join(f"{d[:12]} from {sorted(who)}" for d, who in verified.items()))
    return HistoryReport(list(operations), per_node, problems, byzantine)


async def run_load_with(client: Any, params: Any, during: Callable[[], Any] | None = None, *,
                        total: int = 20, concurrency: int = 4, fault_after: int = 3,
                        **runner_kwargs: Any) -> LoadRunner:
    """Run a load and call ``during()`` (in a thread: it may block on docker) once
    ``fault_after`` requests were acknowledged. Returns the finished runner."""
    runner = LoadRunner(client, params, total=total, concurrency=concurrency, **runner_kwargs)
    task = asyncio.create_task(runner.run())
    if during is not None:
        deadline = time.monotonic() + 120
        while sum(op.acknowledged for op in runner.operations) < fault_after and not task.done():
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        await asyncio.to_thread(during)
    await task
    return runner


def validation_params(cluster_dir: Path) -> Any:
    from cluster.manifest import load_manifest
    from consensus.validation import ValidationParams

    return ValidationParams.from_json_dict(load_manifest(cluster_dir).validation)


def _main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Start a compose cluster under a unique project, run a small "
                                     "load, check the history, and tear it down (logs kept on failure).")
    parser.add_argument("--nodes", type=int, default=4, choices=sorted(COMPOSE_FILES))
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--keep", action="store_true", help="leave the cluster running")
    options = parser.parse_args()
    cluster = ComposeCluster(nodes=options.nodes)
    ok = False
    try:
        cluster.up()
        client = cluster.client()
        params = validation_params(cluster.cluster_dir)

        async def go() -> HistoryReport:
            try:
                runner = await run_load_with(client, params, total=options.requests)
                return await check_history(client, runner.operations, cluster.node_ids)
            finally:
                await client.close()

        report = asyncio.run(go())
        print(report.summary())
        ok = report.ok
        return 0 if ok else 1
    finally:
        if not ok:
            print(f"logs: {cluster.collect_logs(cluster.work_dir / cluster.project / 'logs')}")
        if not options.keep:
            cluster.down()


if __name__ == "__main__":
    raise SystemExit(_main())
