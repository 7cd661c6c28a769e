"""Seven validators (n = 7, f = 2) from compose.yaml + compose.f2.yaml."""

from __future__ import annotations

import pytest

from .conftest import run, scenario

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def test_seven_node_cluster_tolerates_two_crashed_followers(make_cluster, log_dir):
    cluster = make_cluster(nodes=7)

    def kill_two(ctx):
        ctx["killed"] = [n for n in cluster.node_ids if n != ctx["leader"]][-2:]
        for node_id in ctx["killed"]:
            cluster.kill(node_id)

    def restart(ctx):
        for node_id in ctx["killed"]:
            cluster.start(node_id)
        cluster.wait_healthy(ctx["killed"], 150)

    ctx = run(scenario(cluster, log_dir, during=kill_two, after=restart, total=10, fault_after=2))
    report = ctx["report"]
    assert report.ok, report.summary()
    finals = [op for op in report.acknowledged if op.status]
    assert finals and all(op.validator_nodes >= 5 for op in finals), (
        f"a 7-node result needs 2f+1 = 5 signatures: {[(op.request_id, op.validator_nodes) for op in finals]}")
    assert len(ctx["status_after"]) == 7
