"""Prometheus metrics of one validator, on their own registry (so tests can run several
nodes in one process) and served over HTTP by ``start_metrics_server``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class NodeMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.validations = Counter("hypermesh_validations", "Client validations answered with a final result, by status (including retries answered from the store or the --cache)", ["kind", "status"], registry=r)
        self.latency = Histogram("hypermesh_validation_latency_seconds", "Time from client request to final result", ["kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("hypermesh_validations_in_flight", "Client validations waiting for a final result", registry=r)
        self.cache_hits = Counter("hypermesh_cache_hits", "Result cache hits", registry=r)
        self.cache_misses = Counter("hypermesh_cache_misses", "Result cache misses", registry=r)
        self.errors = Counter("hypermesh_errors", "Error responses, by error code", ["code"], registry=r)
        self.view = Gauge("hypermesh_consensus_view", "Current consensus view", registry=r)
        self.is_leader = Gauge("hypermesh_consensus_is_leader", "1 when this node leads the current view", registry=r)
        self.last_executed = Gauge("hypermesh_consensus_last_executed_seq", "Last executed batch sequence number", registry=r)
        self.stable_checkpoint = Gauge("hypermesh_consensus_stable_checkpoint_seq", "Last stable checkpoint", registry=r)
        self.vote_floor = Gauge(
            "hypermesh_consensus_vote_floor_seq",
            "0, or the seq up to which this node withholds its votes: its store remembers less than it signed "
            "(restored from a backup, or emptied) until the stable checkpoint passes it", registry=r)
        self.clock_steps = Counter("hypermesh_wall_clock_steps", "Steps of the wall clock (over 1 s) seen by the node; its timers are unaffected", registry=r)
        self.batches = Counter("hypermesh_consensus_batches", "Batches committed and executed", registry=r)
        self.batch_size = Histogram("hypermesh_consensus_batch_size", "Requests per committed batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.view_change_target = Gauge(
            "hypermesh_consensus_view_change_target",
            "The view this node is trying to move to; 0 when it is not in a view change. Non-zero for long "
            "while the others work in a lower view: this node sits out until they reach it", registry=r)
        self.view_changes = Counter("hypermesh_consensus_view_changes", "View changes installed", registry=r)
        self.state_transfers = Counter("hypermesh_consensus_state_transfers", "Checkpoints installed by state transfer", registry=r)
        self.evidence = Counter("hypermesh_byzantine_evidence", "Byzantine evidence recorded, by accused node and kind", ["accused", "kind"], registry=r)
        self.confidence = Histogram("hypermesh_result_confidence", "confidence_level of the results this node answered to clients (after the vote-grace wait)", buckets=(0.25, 0.5, 0.67, 0.75, 0.8, 0.9, 1.0), registry=r)
        self.loop_lag = Histogram("hypermesh_event_loop_lag_seconds", "How late the node's event loop woke for its periodic tick: time it spent busy or blocked while timers were due (a stall delays every client and peer)", buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0), registry=r)
        self.peer_links_up = Gauge("hypermesh_peer_links_up", "Outbound links to other validators that are up", registry=r)
        self.peer_links_needed = Gauge(
            "hypermesh_peer_links_needed",
            "Peers this node must reach to form a quorum with itself (2f); fewer up: nothing is ordered through it",
            registry=r)
        self.peer_frames_in = Counter("hypermesh_peer_frames_received", "Consensus frames received from peers", registry=r)


def start_metrics_server(metrics: NodeMetrics, bind: str, port: int) -> None:
    """Serve ``/metrics`` over HTTP (prometheus-client's threaded server)."""
    start_http_server(port, addr=bind, registry=metrics.registry)
