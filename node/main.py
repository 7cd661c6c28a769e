"""``consensus-server``: one HyperMesh validator process."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

from consensus.byzantine import BYZANTINE_MODES

VERSION = "0.1.0"
DEFAULT_NODE_ID = "hypermesh-consensus-1"
DEFAULT_PORT = 9292
LOG_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
              "warning": logging.WARNING, "error": logging.ERROR}

log = logging.getLogger("hypermesh")

EXIT_STORE_FAILED = 1  # stopped after a failed store write (fail-stop); Python also exits 1 on a crash
EXIT_REFUSED = 2  # refused to start: bad flags (argparse's own status), keys, data dir, trace file, ports
MAX_UDP_PAYLOAD = 65527  # 65535 minus the UDP header; aioquic refuses less than 1200
SAME_ON_EVERY_NODE = "must be the same on every node of the cluster"


class StartupError(Exception):
    """A reason not to start, for which no more specific error exists (exit status 2)."""


def bounded(kind: type[int] | type[float], lo: float, hi: float | None = None, *,
            above: bool = False) -> Callable[[str], Any]:
    """An argparse ``type``: a ``kind`` in lo..hi (``above``: greater than lo). argparse
    reports a refused value as "argument --flag: must be ..." and exits 2."""
    noun = "an integer" if kind is int else "a number"
    allowed = f"{noun} {lo}..{hi}" if hi is not None else f"{noun} {'>' if above else '>='} {lo}"

    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < lo or (above and value == lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {allowed}, not {text!r}")
        return value

    return convert


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="consensus-server",
        description="HyperMesh Consensus validator: serves the STOQ API (QUIC over IPv6, TLS 1.3) and takes part "
        "in PBFT consensus with the other validators of its cluster.",
        epilog="Examples:\n"
        "  consensus-server                                   # single node on [::]:9292, keys in ./data/<node-id>/cluster\n"
        "  consensus-server --port 9292 --cache               # with the result cache\n"
        "  consensus-server --cluster .cluster --node-id node-1 --data-dir data/node-1\n"
        "\n"
        "Without --cluster the server creates (once) a one-validator cluster in DATA_DIR/cluster; clients use\n"
        "DATA_DIR/cluster/ca.pem to trust it. A multi-node cluster is created with 'hypermesh cluster init'.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-b", "--bind", default="::", metavar="ADDRESS", help="IPv6 bind address (default ::)")
    parser.add_argument("-p", "--port", type=bounded(int, 0, 65535), default=None,
                        help="STOQ listen port, UDP (default 9292; with --cluster, this node's port in the manifest)")
    parser.add_argument("-n", "--node-id", default=None, metavar="ID",
                        help=f"node identifier; must be in the manifest with --cluster (default {DEFAULT_NODE_ID})")
    parser.add_argument("-l", "--log-level", default="info", choices=("trace", "debug", "info", "warn", "error"),
                        help="log level (default info)")
    parser.add_argument("--max-validations", type=bounded(int, 1), default=100, metavar="NUM",
                        help="maximum concurrent validations; more are refused with Overloaded (default 100)")
    parser.add_argument("--cache", action="store_true", help="enable validation result caching")
    parser.add_argument("--cache-ttl", type=bounded(float, 0, above=True), default=600.0, metavar="SECONDS",
                        help="result cache TTL (default 600)")
    parser.add_argument("--cache-size", type=bounded(int, 1), default=100_000, metavar="ENTRIES",
                        help="result cache size (default 100000)")
    parser.add_argument("--cluster", metavar="DIR", help="cluster directory from 'hypermesh cluster init'")
    parser.add_argument("--data-dir", metavar="DIR", help="where the node keeps its database (default ./data/<node-id>)")
    parser.add_argument("--metrics-bind", default=None, metavar="ADDRESS", help="Prometheus bind address (default: --bind)")
    parser.add_argument("--metrics-port", type=bounded(int, 0, 65535), default=9464,
                        help="Prometheus /metrics port, TCP; 0 disables (default 9464)")
    parser.add_argument("--client-auth", default="none", choices=("none", "optional", "required"),
                        help="mutual TLS for clients: require a certificate from the cluster CA (default none)")
    parser.add_argument("--request-timeout", type=bounded(float, 0, above=True), default=30.0,
                        metavar="SECONDS",
                        help="answer Pending after this long; the client polls validation_status (default 30)")
    parser.add_argument("--vote-grace-ms", type=bounded(float, 0), default=50.0, metavar="MS",
                        help="after 2f+1 votes, wait up to this long for the other validators' votes so "
                        "confidence_level counts them; skipped while a validator keeps missing it (default 50)")
    parser.add_argument("--shutdown-grace", type=bounded(float, 0, 3600), default=5.0, metavar="SECONDS",
                        help="on SIGINT/SIGTERM, let in-flight validations finish this long; those still "
                        "waiting are then answered Pending (they are durable; poll validation_status) (default 5)")
    parser.add_argument("--sync-commits", action="store_true",
                        help="fsync every database commit and the vote guard (survives power loss, ~0.3 ms per batch); "
                        "without it a power cut can make a validator forget votes it sent (docs/OPERATIONS.md, Backups)")
    # ReplicaConfig is cluster-wide: these three must not differ between nodes (OPERATIONS.md §10).
    parser.add_argument("--batch-size", type=bounded(int, 1), default=64,
                        help=f"maximum requests per consensus batch; {SAME_ON_EVERY_NODE}: followers drop "
                        "a leader's batch larger than their own limit (default 64)")
    parser.add_argument("--batch-delay-ms", type=bounded(int, 0), default=5,
                        help="close a partial batch after this long; only the leader uses it, so nodes may "
                        "differ (default 5)")
    parser.add_argument("--checkpoint-interval", type=bounded(int, 1), default=16,
                        help=f"batches between checkpoints; {SAME_ON_EVERY_NODE}: a checkpoint is stable only "
                        "when 2f+1 nodes take it at the same sequence number (default 16)")
    parser.add_argument("--view-change-timeout-ms", type=bounded(int, 1), default=2000,
                        help=f"first view-change timeout; {SAME_ON_EVERY_NODE}: nodes that differ give up "
                        "on a leader at different times (default 2000)")
    parser.add_argument("--max-datagram-size", type=bounded(int, 1200, MAX_UDP_PAYLOAD), default=1200,
                        metavar="BYTES",
                        help="largest QUIC datagram sent, 1200..65527; 1200 is safe anywhere, 9000 is much faster "
                        "on loopback; nodes may differ (default 1200)")
    parser.add_argument("--trace", default="off", metavar="off|stderr|FILE",
                        help="OpenTelemetry spans of every validation: off, stderr, or a file of JSON lines (default off)")
    parser.add_argument("--peer-delay-ms", type=bounded(float, 0), default=0.0,
                        help="chaos testing: delay every outgoing peer frame")
    parser.add_argument("--byzantine", default=None, metavar="MODE", choices=BYZANTINE_MODES,
                        help=f"TEST ONLY: make this node misbehave on purpose ({', '.join(BYZANTINE_MODES)})")
    parser.add_argument("-V", "--version", action="version", version=f"consensus-server {VERSION}")
    return parser


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=LOG_LEVELS[level],
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("quic").setLevel(logging.WARNING)


def _single_node_cluster(data_dir: Path, node_id: str, port: int) -> Path:
    """Create (once) a one-validator cluster so a lone node runs the same code path."""
    from cluster.bootstrap import InitOptions, init_cluster

    directory = data_dir / "cluster"
    if not (directory / "manifest.json").exists():
        log.info("No --cluster given: creating a single-node cluster in %s", directory)
        init_cluster(directory, InitOptions(nodes=1, base_port=port, names=(node_id,), address_template="[::1]:{port}"), lambda m: log.info("  %s", m))
    return directory


async def serve(args: argparse.Namespace) -> int:
    from cluster.manifest import load_kem_private_key, load_manifest, load_node_key
    from consensus.replica import ReplicaConfig
    from consensus.validation import dedup_window_ms
    from transport.peers import PeerAddress, PeerMesh
    from transport.server import HandlerRegistry, Limits, StoqServer
    from transport.tls import TlsConfig

    from .cache import ResultCache
    from .metrics import NodeMetrics, start_metrics_server
    from .repair import ResultRepair
    from .runtime import ReplicaDriver
    from .service import ServiceLimits, ValidationService, wrap_handler
    from .store import Store, lock_data_dir
    from .vote_guard import GUARD_FILE, VoteGuard
    from .tracing import make_tracer

    node_id = args.node_id or DEFAULT_NODE_ID  # main() insists on --node-id with --cluster
    data_dir = Path(args.data_dir or Path("data") / node_id)
    cluster_dir = Path(args.cluster) if args.cluster else _single_node_cluster(data_dir, node_id, args.port or DEFAULT_PORT)
    manifest = load_manifest(cluster_dir)
    entry = manifest.node(node_id)  # a clear error if the id is not in the manifest
    # Peers and clients dial the manifest's address, so that is where to listen unless told otherwise.
    port = args.port if args.port is not None else (entry.port if args.cluster else DEFAULT_PORT)
    if port != entry.port:  # also a single node whose DATA_DIR/cluster was made with another --port
        log.warning("listening on port %d, but the manifest gives %s port %d: peers and clients will dial %d "
                    "(fine behind a port mapping, as in compose.yaml)", port, node_id, entry.port, entry.port)

    log.info("Starting HyperMesh Consensus Server v%s", VERSION)
    log.info("Configuration:")
    log.info("  Node ID: %s", node_id)
    log.info("  Cluster: %s (n=%d, f=%d) from %s", manifest.cluster_id, manifest.n, manifest.f, cluster_dir)
    log.info("  Bind address: [%s]:%d", args.bind, port)
    log.info("  Max concurrent validations: %d", args.max_validations)
    log.info("  Cache enabled: %s", "true" if args.cache else "false")
    log.info("  Data directory: %s", data_dir)
    if args.byzantine:
        for _ in range(3):
            log.warning("!!! BYZANTINE MODE %r: this node WILL MISBEHAVE on purpose (test only) !!!", args.byzantine)

    log.info("Initializing consensus engine...")
    data_lock = lock_data_dir(data_dir)  # held until the process exits
    store = Store(data_dir / "node.db", sync_commits=args.sync_commits, owner=f"{manifest.cluster_id}/{node_id}")
    metrics = NodeMetrics()
    node_dir = manifest.node_dir(node_id)
    tls = TlsConfig(node_dir / "tls.pem", node_dir / "tls.key", ca_pem=manifest.ca_pem, client_auth=args.client_auth)
    peers = {
        e.node_id: PeerAddress(e.host, e.port, e.server_name) for e in manifest.nodes if e.node_id != node_id
    }
    mesh_holder: dict[str, Any] = {}

    def send(to: str | None, payload: bytes) -> None:
        mesh = mesh_holder.get("mesh")
        if mesh is None:
            return
        if to is None:
            mesh.broadcast(payload)
        else:
            mesh.send(to, payload)

    replica_config = ReplicaConfig(
        cluster_id=manifest.cluster_id,
        batch_max_requests=args.batch_size,
        batch_max_delay_ms=args.batch_delay_ms,
        checkpoint_interval=args.checkpoint_interval,
        view_change_timeout_ms=args.view_change_timeout_ms,
        dedup_window_ms=dedup_window_ms(manifest.validation_params()),
    )
    driver = ReplicaDriver(
        replica_config=replica_config,
        key=load_node_key(manifest, node_id),
        keyring=manifest.keyring(),
        params=manifest.validation_params(),
        kem_private_key=load_kem_private_key(manifest, node_id),
        store=store,
        metrics=metrics,
        send=send,
        byzantine=args.byzantine,
        vote_guard=VoteGuard(data_dir / GUARD_FILE, owner=f"{manifest.cluster_id}/{node_id}", sync=args.sync_commits)
        if manifest.n > 1 else None,
    )

    log.info("Creating validation service...")
    try:
        tracer, tracer_provider = make_tracer(node_id, manifest.cluster_id, args.trace, VERSION)
    except OSError as exc:
        raise StartupError(f"--trace {args.trace}: {exc.strerror or exc}") from None
    cache = ResultCache(args.cache_ttl, args.cache_size, time.monotonic) if args.cache else None
    mesh = PeerMesh(
        node_id, peers, tls, driver.on_peer_message, delay_ms=args.peer_delay_ms, max_datagram_size=args.max_datagram_size
    )
    repair = ResultRepair(node_id=node_id, manifest=manifest, store=store, adopt=driver.adopt_result,
                          client_tls=tls)
    service = ValidationService(
        node_id=node_id, cluster_id=manifest.cluster_id, driver=driver, metrics=metrics,
        limits=ServiceLimits(args.max_validations, args.request_timeout, args.vote_grace_ms / 1000), cache=cache, peer_stats=mesh.stats,
        tracer=tracer, fetch_certified=repair.fetch_certified,
    )
    registry = HandlerRegistry()
    for path, handler in service.handlers().items():
        registry.register(path, wrap_handler(service, path, handler))

    try:
        tls.load()  # here, so a missing or damaged file is named as such, not as a port error
    except (OSError, ValueError) as exc:
        raise StartupError(f"the TLS certificate and key of {node_id} in {node_dir} cannot be used: {exc}") from None
    log.info("Starting STOQ API server...")
    server = StoqServer(
        args.bind, port, registry, tls,
        Limits(request_timeout_s=args.request_timeout + 5, max_datagram_size=args.max_datagram_size),
        peer_frame_handler=mesh.deliver,
        peer_connected=mesh.peer_connected,
        peer_members=peers.keys(),
    )
    try:
        await server.start()
    except OSError as exc:
        raise OSError(exc.errno, f"STOQ port (UDP) [{args.bind}]:{port}: {exc.strerror}") from None
    mesh_holder["mesh"] = mesh
    await mesh.start()
    metrics.peer_links_up.set_function(lambda: len(mesh.connected_peers()))
    metrics.peer_links_needed.set(2 * manifest.f)
    await driver.start()
    repair.start()
    if args.metrics_port:
        try:
            start_metrics_server(metrics, args.metrics_bind or args.bind, args.metrics_port)
        except OSError as exc:
            raise OSError(exc.errno, f"metrics port (TCP) [{args.metrics_bind or args.bind}]:{args.metrics_port}: "
                          f"{exc.strerror}") from None
        log.info("Prometheus metrics on [%s]:%d/metrics", args.metrics_bind or args.bind, args.metrics_port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    driver.on_fatal = lambda exc: stop.set()
    # Everything built so far (modules, keys, the recovered state) lives as long as the
    # process: move it out of the collector's view. Full collections then scan only
    # what serving allocates, instead of pausing the event loop for 25-40 ms each
    # (measured at 350 requests/s: 4 such pauses per 1,500 requests, the whole p99).
    gc.collect()
    gc.freeze()
    args.serving = True  # from here on an OSError is a crash (exit 1, restarted), not a refusal to start
    log.info("HyperMesh Consensus Server is ready")
    log.info("Accepting validation requests on port %d", server.port)
    log.info("Press Ctrl-C to stop")
    await stop.wait()

    log.info("Shutting down: no new requests, finishing those in flight ...")
    def release_waiting() -> None:
        released = driver.release_waiters()
        if released:
            log.warning("%d validations not final after --shutdown-grace %.1fs were answered Pending",
                        released, args.shutdown_grace)

    await server.stop(grace_s=args.shutdown_grace, on_grace_expired=release_waiting)
    await repair.stop()
    await mesh.stop()
    await driver.stop()
    store.close()
    data_lock.close()
    if tracer_provider is not None:
        tracer_provider.shutdown()
    if driver.failed is not None:
        log.error("stopped after a failed write to the store: %s", driver.failed)
        return EXIT_STORE_FAILED
    log.info("Stopped cleanly")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # out-of-range values: an error naming the flag, exit 2
    if args.cluster and not args.node_id:
        parser.error("--node-id is required with --cluster (one of the manifest's node ids)")
    configure_logging(args.log_level)
    from cluster.manifest import ManifestError
    from node.store import StoreError
    from node.vote_guard import VoteGuardError

    try:
        return asyncio.run(serve(args))
    except (ManifestError, StoreError, VoteGuardError, StartupError) as exc:
        log.error("%s", exc)
        return EXIT_REFUSED
    except OSError as exc:  # data directory unusable or in use, a port taken or not ours to bind
        if getattr(args, "serving", False):
            log.exception("stopped by an unexpected error: %s", exc)
            return EXIT_STORE_FAILED
        log.error("cannot start: %s", exc)
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
