"""``hypermesh``: create a cluster, run one locally, call it, and look inside it."""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import msgpack

DEFAULT_CLUSTER_DIR = os.environ.get("HYPERMESH_CLUSTER", ".cluster")


class CliError(Exception):
    """Bad input on the command line: printed as ``hypermesh: <message>``, exit 2."""


def _say(message: str) -> None:
    print(message, flush=True)


def to_json(value: Any) -> Any:
    """msgpack values -> JSON: bytes become ``"base64:..."`` strings."""
    if isinstance(value, bytes):
        return "base64:" + base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


def from_json(value: Any) -> Any:
    """The inverse of ``to_json``: ``"base64:..."`` strings become bytes."""
    if isinstance(value, str) and value.startswith("base64:"):
        try:
            return base64.b64decode(value[7:], validate=True)
        except binascii.Error as exc:
            raise CliError(f"{value[:40]!r} is not valid base64 after 'base64:' ({exc})") from None
    if isinstance(value, dict):
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def load_payload(text: str | None, file: str | None) -> Any:
    """The payload of ``--payload JSON`` or ``--payload-file FILE`` (msgpack or JSON)."""
    if text is not None and file is not None:
        raise CliError("give --payload or --payload-file, not both")
    if file is not None:
        data = sys.stdin.buffer.read() if file == "-" else read_file(file, "--payload-file")
        if file.endswith(".msgpack") or (data[:1] and data[:1] not in b"{[ \n\t\""):
            try:
                return msgpack.unpackb(data, raw=False)
            except (ValueError, msgpack.UnpackException) as exc:  # ExtraData is a ValueError
                raise CliError(f"--payload-file {file}: not a msgpack payload ({exc}); "
                               "give a .msgpack file from 'hypermesh proofs make --out' or JSON") from None
        return from_json(_parse_json(data, f"--payload-file {file}"))
    if text is not None:
        return from_json(_parse_json(text, "--payload"))
    return None


def read_file(path: str, flag: str) -> bytes:
    """A file named on the command line; a failure names the flag and the file."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"{flag} {path}: {exc.strerror or exc}") from None


def _parse_json(data: str | bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CliError(f"{what}: not valid JSON ({exc})") from None


def _endpoint(text: str) -> tuple[str, int]:
    """``--endpoint HOST:PORT`` (an argparse type). The port is required: the docs always
    give one, and a silent default hid '::1:9600' being read as a host."""
    from .manifest import ManifestError, parse_endpoint

    try:
        return parse_endpoint(text, default_port=None)
    except ManifestError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _timeout_seconds(text: str) -> float:
    """``--timeout SECONDS`` (an argparse type): 0, negative or endless would only give a
    confusing "ran out" (or never end), so they are usage errors."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text}: must be a number of seconds above 0, e.g. 30 or 0.5")
    return value


# ---------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------


def cmd_cluster_init(args: argparse.Namespace) -> int:
    from .bootstrap import InitOptions, init_cluster, parse_overrides

    options = InitOptions(
        nodes=args.nodes,
        address_template=args.address_template,
        base_port=args.base_port,
        signing_scheme=args.signing_scheme,
        # The shared name stays: clients using --endpoint check it (cluster/client.py).
        extra_dns=tuple(dict.fromkeys(("consensus", *(args.extra_dns or ())))),
        force=args.force,
        validation_overrides=parse_overrides(args.param or []),
    )
    manifest = init_cluster(Path(args.out), options, _say)
    _say(f"cluster {manifest.cluster_id}: {manifest.n} validators, tolerates f={manifest.f} faulty")
    for entry in manifest.nodes:
        _say(f"  {entry.node_id:<10} {entry.endpoint:<24} {entry.signing_scheme}")
    _say(f"start a node:  consensus-server --cluster {args.out} --node-id {manifest.nodes[0].node_id}")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from .bootstrap import parse_overrides
    from .launcher import LocalCluster

    cluster = LocalCluster.prepare(
        Path(args.dir), nodes=args.nodes, base_port=args.base_port, metrics_base_port=args.metrics_base_port,
        fresh=args.fresh, init_overrides=parse_overrides(args.param or []), progress=_say,
    )
    cluster.common_args = ["--log-level", args.log_level] + (["--cache"] if args.cache else [])
    stop = {"requested": False}

    def request_stop(signum: int, _frame: object) -> None:
        stop["requested"] = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    busy = cluster.busy_ports()
    if busy:
        shown = "; ".join(busy[:3]) + (f"; and {len(busy) - 3} more" if len(busy) > 3 else "")
        raise CliError(f"cannot start: {shown}. Is this cluster already running (hypermesh status "
                       f"--cluster {args.dir})? Stop it, or choose free ports with --base-port / --metrics-base-port")
    _say(f"starting {len(cluster.nodes)} consensus-server processes (logs in {cluster.directory / 'logs'})")
    cluster.start()
    try:
        asyncio.run(cluster.wait_healthy(timeout_s=args.timeout, progress=_say))
    except (TimeoutError, RuntimeError) as exc:
        _say(f"cluster did not become healthy: {exc}")
        cluster.stop()
        return 1
    except BaseException:  # anything else (an import error, Ctrl-C): leave no node running
        cluster.stop()
        raise
    _say("")
    _say(f"HyperMesh cluster {cluster.manifest.cluster_id} is up: n={cluster.manifest.n}, f={cluster.manifest.f}")
    _say(f"{'node':<10} {'pid':<8} {'STOQ endpoint (QUIC/UDP)':<26} {'metrics':<28} log")
    for node in cluster.nodes.values():
        metrics = f"http://[::1]:{node.metrics_port}/metrics" if node.metrics_port else "-"
        pid = node.process.pid if node.process is not None else "-"
        _say(f"{node.node_id:<10} {pid:<8} {cluster.manifest.node(node.node_id).endpoint:<26} {metrics:<28} "
             f"{node.log_path}")
    _say("")
    _say(f"try:  hypermesh status --cluster {args.dir}")
    _say(f"      hypermesh proofs make --manifest {args.dir}/manifest.json --out /tmp/p.msgpack && "
         f"hypermesh call consensus/validate_proofs --cluster {args.dir} --payload-file /tmp/p.msgpack")
    _say("Press Ctrl-C to stop the cluster.")
    supervisor = _Supervisor(cluster, restart=args.restart == "on-failure")
    try:
        while not stop["requested"]:
            supervisor.check(time.monotonic())
            time.sleep(0.2)
    finally:
        _say("stopping the cluster ...")
        cluster.stop()
        _say("stopped")
    return 0


class _Supervisor:
    """What ``hypermesh up`` does when a node exits on its own: restart one that failed
    (non-zero exit, kill -9; it recovers from its store and catches up), like compose's
    ``restart: on-failure`` — unless it keeps dying (RESTARTS_PER_MINUTE), or --restart
    no. A node stopped cleanly (exit 0) stays down. Either way the others keep serving:
    up to f nodes may be down."""

    RESTARTS_PER_MINUTE = 5

    def __init__(self, cluster: Any, restart: bool) -> None:
        self.cluster = cluster
        self.restart = restart
        self.restarts: dict[str, list[float]] = {}
        self.left_down: set[str] = set()

    def check(self, now: float) -> None:
        for node in self.cluster.nodes.values():
            if node.process is None or node.process.poll() is None or node.node_id in self.left_down:
                continue
            recent = [t for t in self.restarts.get(node.node_id, []) if now - t < 60]
            code = node.process.returncode
            exited = f"warning: {node.node_id} exited with code {code} (log {node.log_path})"
            failed = code != 0  # 0: it was stopped on purpose (SIGTERM/SIGINT to that node)
            if self.restart and failed and len(recent) < self.RESTARTS_PER_MINUTE:
                self.restarts[node.node_id] = [*recent, now]
                self.cluster.start_node(node.node_id)
                _say(f"{exited}; restarted it as pid {node.process.pid} ({len(recent) + 1} of at most "
                     f"{self.RESTARTS_PER_MINUTE} a minute)")
                continue
            self.left_down.add(node.node_id)
            why = ("--restart no" if not self.restart else "it keeps exiting" if failed else
                   "it was stopped cleanly, and --restart on-failure restarts only crashes; Ctrl-C and "
                   "run up again to bring it back")
            down, f = len(self.left_down), self.cluster.manifest.f
            if down <= f:
                _say(f"{exited}; left down ({why}); the other nodes keep serving ({down} down, the cluster "
                     f"tolerates {f})")
            else:
                _say(f"{exited}; left down ({why}). {down} nodes are down, more than the {f} the cluster "
                     "tolerates: no request can be ordered until enough of them are back (requests accepted "
                     "meanwhile stay Pending)")


async def _with_client(args: argparse.Namespace, work: Any) -> Any:
    """``await work(client, deadline)``. --timeout bounds the whole command (connecting,
    other nodes, retries, waiting for a final result): ``deadline`` is passed down to
    every client call, and running out is reported as a Timeout naming --timeout."""
    from transport.envelope import ApiError, ErrorCode

    from .client import ClusterClient, DeadlineExceeded

    deadline = time.monotonic() + args.timeout
    async with ClusterClient.from_manifest(
        Path(args.cluster), endpoints=getattr(args, "endpoint", None), timeout_s=args.timeout,
        client_cert=client_certificate(Path(args.cluster), getattr(args, "client_cert", None)),
    ) as client:
        try:
            return await work(client, deadline)
        except DeadlineExceeded as exc:
            raise ApiError(ErrorCode.Timeout, f"--timeout {args.timeout:g}s ran out: {exc.detail}") from None


def client_certificate(cluster_dir: Path, chosen: str | None) -> tuple[bytes, bytes] | None:
    """The client certificate to present (nodes started with ``--client-auth required``
    refuse clients without one): ``--client-cert DIR`` if given, else the cluster
    directory's ``client/`` when it holds one (``hypermesh cluster init`` writes it)."""
    directory = Path(chosen) if chosen else cluster_dir / "client"
    cert, key = directory / "tls.pem", directory / "tls.key"
    if chosen is None and not (cert.exists() and key.exists()):
        return None
    return read_file(str(cert), "--client-cert"), read_file(str(key), "--client-cert")


VALIDATE_PATHS = ("consensus/validate_proofs", "consensus/validate_certificate")
STATUS_PATH = "consensus/validation_status"


def cmd_call(args: argparse.Namespace) -> int:
    from .client import FINAL_STATUSES, UnverifiedResult

    payload = load_payload(args.payload, args.payload_file)
    if args.path in VALIDATE_PATHS and payload is None:
        raise CliError(f"{args.path} needs a payload: --payload-file FILE (make one with 'hypermesh proofs make"
                       f"{' --kind certificate' if args.path.endswith('certificate') else ''}') or --payload JSON")
    request_id = payload.get("request_id") if isinstance(payload, dict) else None
    if args.path == STATUS_PATH and not isinstance(request_id, str):
        raise CliError('consensus/validation_status needs a payload {"request_id": "..."}')

    async def work(client: Any, deadline: float) -> tuple[Any, bool]:
        """The answer, and whether its certificate was verified."""
        if args.path in VALIDATE_PATHS:  # the client verifies the certificate or raises
            validate = client.validate_certificate if args.path.endswith("certificate") else client.validate_proofs
            # Wait for the final result as long as --timeout (the deadline) allows.
            return await validate(payload, args.timeout, args.node, deadline=deadline), True
        if args.path == STATUS_PATH:  # verified (or raises) exactly when the answer is final
            result = await client.validation_status(request_id, args.node, deadline=deadline)
            return result, isinstance(result, dict) and result.get("status") in FINAL_STATUSES
        if args.node:
            return await client.call_node(args.node, args.path, payload, deadline=deadline), False
        return await client.call(args.path, payload, deadline=deadline), False

    try:
        result, verified = asyncio.run(_with_client(args, work))
    except UnverifiedResult as exc:
        print(f"UNVERIFIED RESULT: {exc}", file=sys.stderr)
        return 3
    if args.raw:
        sys.stdout.buffer.write(msgpack.packb(result, use_bin_type=True))
    else:
        if isinstance(result, dict) and not args.full and "certificate" in result:
            # Say "verified" only for a certificate this client really checked.
            result = {k: v for k, v in result.items() if k not in ("result", "certificate")} | {
                "certificate": "verified" if verified else "not verified"
            }
        print(json.dumps(to_json(result), indent=2))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    rows = asyncio.run(_with_client(args, lambda c, deadline: c.status(deadline=deadline)))
    if args.json:
        print(json.dumps(to_json(rows), indent=2))
        _raise_if_timeout_ran_out(args, rows)
        return 0
    header = f"{'node':<10} {'endpoint':<22} {'health':<12} {'view':>5} {'leader':<10} {'last seq':>9} {'checkpoint':>10} {'results':>8} {'evidence':>8}"
    print(header)
    print("-" * len(header))
    errors: list[str] = []
    for row in rows:
        if not row.get("reachable"):
            error = str(row.get("error", ""))
            short = error if len(error) <= 60 else error[:59] + "…"
            print(f"{row['node_id']:<10} {row['endpoint']:<22} {'UNREACHABLE':<12} {short}")
            if short != error:
                errors.append(f"{row['node_id']}: {error}")  # whole, below the table
            continue
        evidence = sum((row.get("evidence") or {}).values())
        leader = row.get("leader", "?") + (" *" if row.get("is_leader") else "")
        target = (row.get("replica") or {}).get("view_change_target")
        view = f"{row.get('view', '?')}->{target}" if target else row.get("view", "?")
        floor = (row.get("replica") or {}).get("vote_floor")
        if floor:
            errors.append(f"{row['node_id']} withholds its votes: its store remembers less than it signed (restored "
                          f"from a backup, or emptied); it votes again once the stable checkpoint reaches "
                          f"{floor.get('seq')} in view {floor.get('view')} or later (docs/OPERATIONS.md, Backups)")
        health = "withholding" if floor else "healthy"
        print(
            f"{row['node_id']:<10} {row['endpoint']:<22} {health:<12} {view:>5} {leader:<10} "
            f"{row.get('last_executed_seq', '?'):>9} {row.get('stable_checkpoint_seq', '?'):>10} "
            f"{row.get('results_stored', '?'):>8} {evidence:>8}"
        )
    reachable = sum(1 for r in rows if r.get("reachable"))
    print(f"\n{reachable}/{len(rows)} nodes reachable  (* = this node believes it leads; view->t: in a view change to t)")
    for line in errors:
        print(line)
    from .manifest import load_manifest

    manifest = load_manifest(Path(args.cluster))
    if len(rows) == manifest.n:
        verdict = _quorum_verdict(rows, manifest.n, 2 * manifest.f + 1)
        if verdict:
            print(verdict)
    _raise_if_timeout_ran_out(args, rows)
    return 0 if reachable == len(rows) else 1


def _quorum_verdict(rows: list[dict[str, Any]], n: int, quorum: int) -> str | None:
    """NO QUORUM only when nodes answered and too few are up. A node this client could
    not ask (its --timeout ran out, TLS refused) says nothing about the cluster."""
    if sum(1 for r in rows if r.get("reachable")) >= quorum:
        return None
    unknown = [r for r in rows if not r.get("reachable") and r.get("client_side")]
    if unknown:
        why = "; ".join(sorted({_client_side_reason(r) for r in unknown}))
        return (f"cannot tell whether the cluster has a quorum: this client could not ask {len(unknown)} of the "
                f"{n} nodes ({why}): a problem on this client's side, which says nothing of whether they are up")
    if not any(r.get("reachable") for r in rows):
        return (f"no node answered: is the cluster running, and are these its addresses (--cluster, --endpoint)? "
                f"It needs {quorum} of its {n} validators to order requests")
    return (f"NO QUORUM: the cluster needs {quorum} of its {n} validators to order requests; "
            "requests accepted meanwhile stay Pending")


def _client_side_reason(row: dict[str, Any]) -> str:
    if row.get("error_code") == "Unauthorized":
        return "TLS refused: check that --cluster is this cluster's directory, with its ca.pem and client certificate"
    return "this client's --timeout ran out first: try a longer one"


def _raise_if_timeout_ran_out(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """Running out of --timeout exits 2 with error Timeout, as for call and evidence."""
    from transport.envelope import ApiError, ErrorCode

    late = [r["node_id"] for r in rows if r.get("deadline_passed")]
    if late:
        raise ApiError(ErrorCode.Timeout, f"--timeout {args.timeout:g}s ran out: no answer to cluster/status from "
                                          f"{', '.join(late)}")


def cmd_health(args: argparse.Namespace) -> int:
    async def work(client: Any, deadline: float) -> Any:
        return await client.call("consensus/health", deadline=deadline)

    try:
        health = asyncio.run(_with_client(args, work))
    except CliError:
        raise  # bad input, not an unhealthy node
    except Exception as exc:  # noqa: BLE001 - a health probe reports every failure the same way
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(to_json(health), indent=2) if args.verbose else f"{health.get('node_id')}: {health.get('status')}")
    return 0 if health.get("status") == "healthy" else 1


EVIDENCE_LIMIT_MAX = 1000  # consensus/evidence refuses more (node/service.py)


def _evidence_limit(text: str) -> int:
    """``evidence --limit`` (an argparse type): a limit the node would refuse is a usage error here."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give a positive integer, "
                                         f"1..{EVIDENCE_LIMIT_MAX}") from None
    if not 1 <= value <= EVIDENCE_LIMIT_MAX:
        raise argparse.ArgumentTypeError(f"{value}: must be a positive integer, 1..{EVIDENCE_LIMIT_MAX}")
    return value


def cmd_evidence(args: argparse.Namespace) -> int:
    from .manifest import ManifestError

    async def work(client: Any, deadline: float) -> Any:
        if args.accused is not None:
            try:
                client.manifest.node(args.accused)  # a node would answer an unknown id with nothing
            except ManifestError as exc:
                raise CliError(f"--accused: {exc}") from None
        return await client.evidence(args.node, args.accused, args.limit, deadline=deadline)

    result = asyncio.run(_with_client(args, work))
    print(json.dumps(to_json(result), indent=2))
    return 0


# ---------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------


def _client_options(parser: argparse.ArgumentParser, bounds: str, timeout_s: float = 30.0,
                    ran_out: str = "the command exits 2 with error Timeout") -> None:
    """--cluster, --endpoint, --timeout, --client-cert; ``bounds`` says what --timeout covers
    for this command, ``ran_out`` what happens when it runs out."""
    parser.add_argument("--cluster", default=DEFAULT_CLUSTER_DIR, metavar="DIR",
                        help=f"cluster directory with manifest.json and ca.pem (default: {DEFAULT_CLUSTER_DIR}, or $HYPERMESH_CLUSTER)")
    parser.add_argument("--endpoint", action="append", metavar="HOST:PORT", type=_endpoint,
                        help="connect here instead of the manifest's addresses (repeatable); the port is required, "
                        "an IPv6 address goes in brackets: [::1]:9292, node-1:9292")
    parser.add_argument("--timeout", type=_timeout_seconds, default=timeout_s, metavar="SECONDS",
                        help=f"bound on the whole command: {bounds}; when it runs out {ran_out} "
                        f"(default {timeout_s:g})")
    parser.add_argument("--client-cert", metavar="DIR",
                        help="directory with tls.pem and tls.key to present to nodes that require client "
                        "certificates (default: the cluster directory's client/, when present)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hypermesh",
        description="HyperMesh Consensus: a Byzantine-fault-tolerant validation cluster. "
        "Create a cluster's keys, run a local cluster, validate requests, inspect nodes.",
        epilog="Quick start:\n"
        "  hypermesh up                                  # 4 local nodes on [::1]:9292-9295\n"
        "  hypermesh status                              # view, leader, progress of every node\n"
        "  hypermesh proofs make --manifest .cluster/manifest.json --out p.msgpack\n"
        "  hypermesh call consensus/validate_proofs --payload-file p.msgpack\n"
        "Every command has --help.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from node.main import VERSION

    parser.add_argument("-V", "--version", action="version", version=f"hypermesh {VERSION}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    cluster = sub.add_parser("cluster", help="create and manage a cluster's keys and manifest",
                             description="Cluster key material. 'cluster init' creates the CA, node certificates, "
                             "signing keys, the cluster ML-KEM key and manifest.json in one directory.")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", required=True, metavar="SUBCOMMAND")
    init = cluster_sub.add_parser(
        "init", help="create the CA, node certificates, signing keys, the cluster KEM key and the manifest",
        description="Create everything a new cluster needs in one directory. Nodes and clients load it; "
        "keep ca.key and nodes/*/ private.",
        epilog="Examples:\n"
        "  hypermesh cluster init --nodes 4 --out .cluster\n"
        "  hypermesh cluster init --nodes 7 --out /cluster --address-template 'node-{i}:9292'\n"
        "  hypermesh cluster init --nodes 4 --out c --param min_stake=5000 --signing-scheme Ed25519",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    init.add_argument("--nodes", type=int, default=4, help="number of validators n; n = 3f+1 tolerates f faults (default 4)")
    init.add_argument("--out", required=True, metavar="DIR", help="directory to create (refuses to overwrite without --force)")
    init.add_argument("--address-template", default="[::1]:{port}", metavar="TEMPLATE",
                      help="each node's HOST:PORT (IPv6 in brackets); {i} is the node number (1..n), {id} the "
                      "node id (node-{i}), {port} is base-port+i-1; without a port every node gets --base-port, so "
                      "each needs its own host. No two nodes may share a host:port (default '[::1]:{port}')")
    init.add_argument("--base-port", type=int, default=9292, help="first port for {port} (default 9292)")
    init.add_argument("--signing-scheme", default="ML-DSA-65",
                      choices=("ML-DSA-87", "ML-DSA-65", "ML-DSA-44", "FALCON-1024", "Ed25519"),
                      help="consensus signing scheme of the nodes (default ML-DSA-65, post-quantum; Ed25519 is ~20x faster to sign)")
    init.add_argument("--extra-dns", action="append", metavar="NAME",
                      help="extra DNS name in every node certificate (repeatable); 'consensus', the shared name that "
                      "clients using --endpoint check, is always included")
    init.add_argument("--param", action="append", metavar="NAME=VALUE",
                      help="override a validation parameter (repeatable): an integer, true/false, or a JSON list, "
                      "e.g. min_stake=5000, allow_wildcards=false, accepted_ec_curves='[\"secp384r1\"]'")
    init.add_argument("--force", action="store_true", help="replace an existing cluster's keys")
    init.set_defaults(func=cmd_cluster_init)

    up = sub.add_parser(
        "up", help="run a local N-node cluster on [::1] until Ctrl-C",
        description="Start N consensus-server processes on [::1], wait until every node is healthy, print the "
        "endpoints, and stop them cleanly on Ctrl-C. Keys are created once in --dir and reused.",
        epilog="Examples:\n  hypermesh up\n  hypermesh up --nodes 7 --dir .cluster7 --base-port 9392 --metrics-base-port 9564\n"
        "  hypermesh up --restart no      # a node you kill -9 stays down (watch the others carry on)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    up.add_argument("--nodes", type=int, default=4, help="validators to run (default 4, f=1)")
    up.add_argument("--dir", default=DEFAULT_CLUSTER_DIR, help=f"cluster directory (default {DEFAULT_CLUSTER_DIR})")
    up.add_argument("--base-port", type=int, default=9292, help="STOQ port of node-1; node-i uses base+i-1 (default 9292)")
    up.add_argument("--metrics-base-port", type=int, default=9464, help="Prometheus port of node-1; 0 disables (default 9464)")
    up.add_argument("--fresh", action="store_true", help="delete the cluster directory (keys and data) first")
    up.add_argument("--cache", action="store_true", help="enable each node's result cache")
    up.add_argument("--param", action="append", metavar="NAME=VALUE",
                    help="validation parameter for a new cluster (repeatable; see 'cluster init --help')")
    up.add_argument("--log-level", default="info", choices=("trace", "debug", "info", "warn", "error"),
                    help="every node's log level (default info); logs go to DIR/logs/<node-id>.log")
    up.add_argument("--timeout", type=_timeout_seconds, default=60.0,
                    help="seconds to wait for the nodes to become healthy (default 60)")
    up.add_argument("--restart", choices=("on-failure", "no"), default="on-failure",
                    help="a node that fails (crash, kill -9: a non-zero exit) is started again and catches up "
                    "from its store, at most 5 times a minute (default on-failure); one stopped cleanly (kill -TERM "
                    "of that node: exit 0) stays down; 'no' leaves every exited node down")
    up.set_defaults(func=cmd_up)

    call = sub.add_parser(
        "call", help="call an endpoint on the cluster and print the answer as JSON",
        description="Send one request. For validate_* and a final validation_status the result certificate is "
        "verified against the manifest before anything is printed (exit 3 when it does not verify); other paths "
        "print 'certificate': 'not verified'. Bytes are shown as 'base64:...' strings and may be given the same "
        "way, as 'hypermesh proofs make' writes them.",
        epilog="Examples:\n"
        "  hypermesh call consensus/health\n"
        "  hypermesh call consensus/validate_proofs --payload-file p.msgpack\n"
        "  hypermesh call consensus/validation_status --payload '{\"request_id\": \"req-1\"}'\n"
        "  hypermesh call cluster/status --node node-2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    call.add_argument("path", help="endpoint path, e.g. consensus/validate_proofs")
    call.add_argument("--payload", metavar="JSON", help="payload as JSON")
    call.add_argument("--payload-file", metavar="FILE", help="payload file: .msgpack, or JSON ('-' reads stdin)")
    call.add_argument("--node", metavar="ID", help="ask this node only (no failover), also while waiting for a result")
    call.add_argument("--full", action="store_true", help="also print the certified result bytes and certificate")
    call.add_argument("--raw", action="store_true", help="write the answer as msgpack to stdout")
    _client_options(call, "connecting, trying other nodes, retries and waiting for a final result")
    call.set_defaults(func=cmd_call)

    status = sub.add_parser("status", help="a table of nodes: health, view, leader, last committed sequence, evidence",
                            description="Ask every node of the manifest for cluster/status and print one row per "
                            "node: health, view, the leader it follows, last executed sequence, stable checkpoint, "
                            "results stored and evidence recorded. Exit 1 when a node is unreachable.",
                            epilog="Example: hypermesh status --cluster .cluster")
    status.add_argument("--json", action="store_true", help="print every node's cluster/status as JSON")
    _client_options(status, "connecting to every node and its answer")
    status.set_defaults(func=cmd_status)

    health = sub.add_parser("health", help="exit 0 when a node answers consensus/health healthy (for health checks)",
                            description="Call consensus/health and exit 0 if the answer is 'healthy', 1 otherwise "
                            "(unreachable, unhealthy, timed out); print which node answered. One node is checked: "
                            "with one --endpoint, the node there; otherwise the first node of the manifest (or of "
                            "the --endpoint list) that answers, the next one tried when a node cannot be reached. So "
                            "exit 0 without --endpoint means some node is healthy, not all of them ('hypermesh "
                            "status' shows every node). Meant for container health checks: give the container's "
                            "own node as --endpoint.",
                            epilog="Example: hypermesh health --cluster /cluster --endpoint [::1]:9292")
    health.add_argument("-v", "--verbose", action="store_true", help="print the whole health document")
    _client_options(health, "connecting, trying other nodes and retries", timeout_s=5.0,  # a probe must answer fast
                    ran_out="the node counts as unhealthy: exit 1")
    health.set_defaults(func=cmd_health)

    evidence = sub.add_parser("evidence", help="Byzantine evidence a node has recorded (signed, re-checkable)",
                              description="Print consensus/evidence as JSON: each entry names the accused node, the "
                              "kind (e.g. equivocation) and the signed messages that prove it, so anyone holding the "
                              "manifest can check it again. Entries come newest first.",
                              epilog="Examples:\n"
                              "  hypermesh evidence --node node-1 --accused node-3\n"
                              f"  hypermesh evidence --limit 10      # the 10 newest entries (default 100, at most "
                              f"{EVIDENCE_LIMIT_MAX})\n"
                              "When older entries remain, 'next_before_id' is set; ask for them with\n"
                              "  hypermesh call consensus/evidence --node ID --payload '{\"before_id\": N, \"limit\": 10}'",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    evidence.add_argument("--node", metavar="ID", help="ask this node (default: any)")
    evidence.add_argument("--accused", metavar="ID", help="only evidence against this node")
    evidence.add_argument("--limit", type=_evidence_limit, metavar="N",
                          help=f"at most N entries, newest first (1..{EVIDENCE_LIMIT_MAX}; default: the node's, 100)")
    _client_options(evidence, "connecting, trying other nodes and retries")
    evidence.set_defaults(func=cmd_evidence)

    for module_name in ("cluster.proofs_cli", "cluster.simulate_cli"):
        try:
            module = __import__(module_name, fromlist=["add_commands"])
        except ImportError as exc:  # pragma: no cover - only while a module is missing
            print(f"hypermesh: {module_name} unavailable: {exc}", file=sys.stderr)
            continue
        module.add_commands(sub)
    return parser


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command; bad input and cluster errors become one line on stderr."""
    from transport.envelope import ApiError

    from .manifest import ManifestError

    try:
        return int(args.func(args) or 0)
    except (ManifestError, CliError) as exc:
        print(f"hypermesh: {exc}", file=sys.stderr)
        return 2
    except ApiError as exc:  # the cluster answered with an error (or could not be reached)
        print(f"hypermesh: error {exc.code}: {exc.message}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file the command writes or reads
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"hypermesh: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def main(argv: list[str] | None = None) -> int:
    # aioquic logs a failed handshake itself ("[cid] Error: 298, ..."); the command
    # reports it once, as an error with a hint.
    logging.getLogger("quic").setLevel(logging.CRITICAL)
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    # `python -m cluster.cli`: run the imported module, not this __main__ copy, so the
    # CliError that cluster.proofs_cli raises is the one run_command catches.
    from cluster.cli import main as imported_main

    sys.exit(imported_main())
