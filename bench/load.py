#!/usr/bin/env python3
"""Load generator: validate_proofs in-process, over STOQ to one node, and to a 4-node
cluster — side by side in one run, so the ratios are measured under the same noise.

    .venv/bin/python bench/load.py                      # everything, default sizes
    .venv/bin/python bench/load.py --requests 3000 --rate 1000 --concurrency 128

Phases:
  in-process   ValidationApp.execute_batch on the same precomputed requests (what a
               validator must do at least; the upper bound for one node)
  1 node       real consensus-server (n=1) over QUIC: closed loop at --concurrency for
               the saturation rate, then open loop at half of it for latency
  4 nodes      real 4-node cluster: closed loop, then open loop at --rate
CPU per request is read from /proc for the server processes; for the cluster,
"consensus + transport" CPU is total CPU minus n times the in-process validation CPU.
The last lines judge the single node's two goals from this run: over STOQ at least 50 %
of the in-process rate, and p99 under 20 ms at half of saturation.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cluster.launcher import LocalCluster  # noqa: E402
from cluster.manifest import Manifest, load_manifest  # noqa: E402
from consensus.proofs.params import ValidationParams  # noqa: E402
from transport.client import StoqClient  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    name: str
    requests: int
    seconds: float
    latencies_ms: list[float]
    cpu_s: float | None = None
    errors: int = 0
    batches: int = 0  # distinct consensus sequence numbers seen in the answers
    client_cpu_s: float | None = None  # the load generator's own CPU (it shares the machine)

    @property
    def mean_batch(self) -> float:
        return self.requests / self.batches if self.batches else float("nan")

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        data = sorted(self.latencies_ms)
        return data[min(len(data) - 1, int(q * len(data)))]

    def cpu_us_per_request(self) -> float | None:
        return None if self.cpu_s is None or not self.requests else self.cpu_s / self.requests * 1e6

    def client_cpu_us_per_request(self) -> float | None:
        return None if self.client_cpu_s is None or not self.requests else self.client_cpu_s / self.requests * 1e6


def _make_batch(args: tuple[dict[str, Any], str, int, int]) -> list[dict[str, Any]]:
    params_json, scheme, count, seed = args
    from cluster.workload import ProofFactory

    factory = ProofFactory(ValidationParams.from_json_dict(params_json), scheme=scheme, prefix=f"bench-{seed}")
    return [factory.proofs() for _ in range(count)]


def precompute(manifest: Manifest, count: int, scheme: str) -> list[dict[str, Any]]:
    started = time.perf_counter()
    chunks = [(manifest.validation, scheme, count // 4 + 1, seed) for seed in range(4)]
    with ProcessPoolExecutor(max_workers=2) as pool:
        payloads = [p for chunk in pool.map(_make_batch, chunks) for p in chunk][:count]
    print(f"  precomputed {len(payloads)} proof sets ({scheme} stake keys) in {time.perf_counter() - started:.1f}s", flush=True)
    # The proof sets live until the end: out of the collector's view, so the load
    # generator's own full collections (tens of ms) do not count as server latency.
    gc.collect()
    gc.freeze()
    return payloads


def process_cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except (OSError, IndexError, ValueError):
            pass
    return total / CLOCK_TICKS


def udp_receive_drops() -> int:
    """Datagrams the kernel dropped because a UDP socket's receive buffer was full (all
    sockets: the benchmark owns this machine's [::1] traffic while it runs)."""
    try:
        for line in Path("/proc/net/snmp6").read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == "Udp6RcvbufErrors":
                return int(value.strip())
    except OSError:
        pass
    return 0


async def consensus_summary(manifest: Manifest) -> str:
    """What the replicas went through: views, view changes, request timers, catch-up."""
    from collections import Counter

    from cluster.client import ClusterClient

    async with ClusterClient(manifest, timeout_s=10) as client:
        statuses = await client.status()
    views = sorted({s.get("view") for s in statuses if s.get("reachable")})
    counters: Counter[str] = Counter()
    for status in statuses:
        counters.update((status.get("replica") or {}).get("counters") or {})
    keys = ("view_changes_started", "request_timeouts", "fetch_batches", "out_of_window")
    return f"views {views}, " + ", ".join(f"{k} {counters[k]}" for k in keys)


def bench_in_process(manifest: Manifest, payloads: list[dict[str, Any]], batch: int) -> Result:
    from cluster.manifest import load_kem_private_key
    from consensus.requests import parse_request
    from consensus.validation import ValidationApp

    node_id = manifest.nodes[0].node_id
    encoded = [parse_request("proofs", p).encode() for p in payloads]
    pool = ThreadPoolExecutor(max_workers=2)
    app = ValidationApp(manifest.validation_params(), load_kem_private_key(manifest, node_id),
                        precheck_runner=lambda parts: list(pool.map(lambda part: part(), parts)))
    now = int(time.time() * 1000)
    cpu0, t0 = time.process_time(), time.perf_counter()
    latencies = []
    for seq, start in enumerate(range(0, len(encoded), batch), 1):
        b0 = time.perf_counter()
        out = app.execute_batch(seq, encoded[start:start + batch], now)
        latencies.append((time.perf_counter() - b0) * 1000)
        assert len(out) == len(encoded[start:start + batch])
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    pool.shutdown()
    return Result("in-process (execute_batch)", len(encoded), seconds, latencies, cpu)


async def closed_loop(manifest: Manifest, payloads: list[dict[str, Any]], concurrency: int, pids: list[int], name: str) -> Result:
    clients = [StoqClient(e.host, e.port, ca_pem=manifest.ca_pem, server_name=e.server_name, timeout_s=60,
                          max_datagram_size=9000) for e in manifest.nodes]
    queue = list(reversed(payloads))
    latencies: list[float] = []
    errors = 0
    seqs: set[int] = set()

    async def worker(index: int) -> None:
        nonlocal errors
        client = clients[index % len(clients)]
        while queue:
            payload = queue.pop()
            t = time.perf_counter()
            response = await client.call_full("consensus/validate_proofs", payload)
            if not response.ok or response.payload.get("status") not in ("Valid", "Invalid"):
                errors += 1
            else:
                seqs.add(response.payload["metrics"]["seq"])
            latencies.append((time.perf_counter() - t) * 1000)

    cpu0, own0, t0 = process_cpu_seconds(pids), time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    seconds, cpu, own = time.perf_counter() - t0, process_cpu_seconds(pids) - cpu0, time.process_time() - own0
    for client in clients:
        await client.close()
    return Result(name, len(payloads), seconds, latencies, cpu, errors, len(seqs), own)


async def open_loop(manifest: Manifest, payloads: list[dict[str, Any]], rate: float, pids: list[int], name: str) -> Result:
    """Requests start on schedule whatever the answers do (no coordinated omission):
    latency is measured from the scheduled start time."""
    clients = [StoqClient(e.host, e.port, ca_pem=manifest.ca_pem, server_name=e.server_name, timeout_s=60,
                          max_datagram_size=9000) for e in manifest.nodes]
    for client in clients:  # connect before the clock starts
        await client.call("consensus/health")
    latencies: list[float] = []
    errors = 0
    seqs: set[int] = set()
    interval = 1.0 / rate

    async def one(index: int, payload: dict[str, Any], scheduled: float) -> None:
        nonlocal errors
        try:
            response = await clients[index % len(clients)].call_full("consensus/validate_proofs", payload)
            if not response.ok or response.payload.get("status") not in ("Valid", "Invalid"):
                errors += 1
            else:
                seqs.add(response.payload["metrics"]["seq"])
        except Exception:
            errors += 1
        latencies.append((time.perf_counter() - scheduled) * 1000)

    tasks = []
    cpu0, own0, t0 = process_cpu_seconds(pids), time.process_time(), time.perf_counter()
    for index, payload in enumerate(payloads):
        scheduled = t0 + index * interval
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(index, payload, scheduled)))
    await asyncio.gather(*tasks)
    seconds, cpu, own = time.perf_counter() - t0, process_cpu_seconds(pids) - cpu0, time.process_time() - own0
    for client in clients:
        await client.close()
    return Result(name, len(payloads), seconds, latencies, cpu, errors, len(seqs), own)


def start_cluster(directory: Path, nodes: int, base_port: int, batch_size: int,
                  signing_scheme: str = "ML-DSA-65") -> LocalCluster:
    cluster = LocalCluster.prepare(directory, nodes=nodes, base_port=base_port, metrics_base_port=0,
                                   init_overrides=(("max_time_offset_ms", 3_600_000),), signing_scheme=signing_scheme)
    cluster.common_args = ["--log-level", "warn", "--max-validations", "100000", "--batch-size", str(batch_size)]
    cluster.start()
    asyncio.run(cluster.wait_healthy(timeout_s=60))
    return cluster


def single_node_goals(results: list[Result]) -> list[str]:
    """Issue #2's two speed goals, worked out from this run's phases (by their names)."""
    def phase(prefix: str) -> Result | None:
        return next((r for r in results if r.name.startswith(prefix)), None)

    inproc, closed, half = phase("in-process"), phase("1 node, closed loop"), phase("1 node, open loop")
    lines = []
    if inproc is not None and closed is not None and inproc.rate:
        ratio = closed.rate / inproc.rate
        lines.append(f"goal: 1 node over STOQ >= 50 % of the in-process rate: {closed.rate:,.0f} / {inproc.rate:,.0f} "
                     f"= {ratio:.0%} ({'met' if ratio >= 0.5 else 'not met'})")
    if half is not None and half.latencies_ms:
        p99 = half.pct(0.99)
        lines.append(f"goal: 1 node p99 < 20 ms at half of saturation: {p99:.1f} ms at {half.rate:,.0f}/s "
                     f"({'met' if p99 < 20 else 'not met'})")
    return lines


def report(results: list[Result], validation_cpu_us: float, nodes: int) -> None:
    print()
    print("| phase | requests | throughput (req/s) | p50 (ms) | p99 (ms) | server CPU/request (µs) "
          "| load-generator CPU/request (µs) | mean batch | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        cpu, own = r.cpu_us_per_request(), r.client_cpu_us_per_request()
        print(f"| {r.name} | {r.requests} | {r.rate:,.0f} | {r.pct(0.5):.1f} | {r.pct(0.99):.1f} | "
              f"{'-' if cpu is None else f'{cpu:,.0f}'} | {'-' if own is None else f'{own:,.0f}'} | "
              f"{'-' if not r.batches else f'{r.mean_batch:.1f}'} | {r.errors} |")
    print()
    print(f"validation CPU per request (in-process, one validator): {validation_cpu_us:,.0f} µs")
    for line in single_node_goals(results):
        print(line)
    cluster_runs = [r for r in results if r.name.startswith(f"{nodes} nodes") and r.cpu_us_per_request()]
    for r in cluster_runs:
        total = r.cpu_us_per_request() or 0.0
        overhead = total - nodes * validation_cpu_us
        print(f"{r.name}: total {total:,.0f} µs/request across {nodes} nodes; consensus + transport "
              f"≈ {overhead:,.0f} µs = {overhead / (nodes * validation_cpu_us):.0%} of validation CPU")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="requests per phase (default 2000)")
    parser.add_argument("--concurrency", type=int, default=64, help="closed-loop requests in flight (default 64)")
    parser.add_argument("--rate", type=float, default=1000.0, help="open-loop rate for the cluster (default 1000/s)")
    parser.add_argument("--nodes", type=int, default=4, help="cluster size (default 4)")
    parser.add_argument("--batch-size", type=int, default=64, help="consensus batch size (default 64)")
    parser.add_argument("--scheme", default="ML-DSA-44", help="stake signature scheme of the proofs (default ML-DSA-44)")
    parser.add_argument("--signing-scheme", default="ML-DSA-65",
                        help="the validators' consensus signing scheme (default ML-DSA-65; Ed25519 is the fast classical one)")
    parser.add_argument("--base-port", type=int, default=29292, help="first UDP port to use on [::1]")
    parser.add_argument("--skip-cluster", action="store_true", help="only in-process and single node")
    args = parser.parse_args()

    results: list[Result] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="hm-bench-") as tmp:
        print(f"single node on [::1]:{args.base_port}", flush=True)
        single = start_cluster(Path(tmp) / "single", 1, args.base_port, args.batch_size, args.signing_scheme)
        try:
            manifest = load_manifest(single.directory)
            payloads = precompute(manifest, args.requests * 3, args.scheme)
            inproc = bench_in_process(manifest, payloads[: args.requests], args.batch_size)
            results.append(inproc)
            pids = [n.process.pid for n in single.nodes.values() if n.process]
            sat = asyncio.run(closed_loop(manifest, payloads[args.requests: 2 * args.requests], args.concurrency, pids,
                                          f"1 node, closed loop ×{args.concurrency}"))
            results.append(sat)
            half = max(10.0, sat.rate / 2)
            results.append(asyncio.run(open_loop(manifest, payloads[2 * args.requests:], half, pids,
                                                 f"1 node, open loop {half:,.0f}/s (half of saturation)")))
        finally:
            single.stop()
        validation_cpu_us = inproc.cpu_us_per_request() or 0.0
        if not args.skip_cluster:
            print(f"{args.nodes}-node cluster on [::1]:{args.base_port + 10}..", flush=True)
            cluster = start_cluster(Path(tmp) / "cluster", args.nodes, args.base_port + 10, args.batch_size,
                                    args.signing_scheme)
            try:
                manifest = load_manifest(cluster.directory)
                payloads = precompute(manifest, args.requests * 2, args.scheme)
                pids = [n.process.pid for n in cluster.nodes.values() if n.process]
                for phase in ("closed", "open"):
                    drops = udp_receive_drops()
                    if phase == "closed":
                        result = asyncio.run(closed_loop(manifest, payloads[: args.requests], args.concurrency, pids,
                                                         f"{args.nodes} nodes, closed loop ×{args.concurrency}"))
                    else:
                        result = asyncio.run(open_loop(manifest, payloads[args.requests:], args.rate, pids,
                                                       f"{args.nodes} nodes, open loop {args.rate:,.0f}/s"))
                    results.append(result)
                    notes.append(f"{result.name}: {asyncio.run(consensus_summary(manifest))} (cumulative); "
                                 f"UDP receive-buffer drops {(udp_receive_drops() - drops) / result.requests:.2f}/request")
            finally:
                cluster.stop()
    report(results, validation_cpu_us, args.nodes)
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
