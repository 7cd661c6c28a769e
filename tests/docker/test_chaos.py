"""Chaos tests on the compose cluster: crash, pause, partition, loss, rolling restart.

Each test runs a small bounded load through a real client on the host, injects one
fault while requests are in flight, heals, and then checks the recorded history against
every node (see ``cluster.chaos.check_history``): every acknowledged request has exactly
one final result, on every node, with a certificate that verifies.
"""

from __future__ import annotations

import asyncio
import threading
import uuid

import pytest

from cluster.chaos import CHAIN_IN, wait_until

from .conftest import run, scenario

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def assert_history(ctx: dict) -> None:
    report = ctx["report"]
    assert report.acknowledged, "no request was acknowledged at all:\n" + report.summary()
    assert report.ok, report.summary()


def test_kill_leader_under_load_then_restart(make_cluster, log_dir):
    cluster = make_cluster()

    def kill_leader(ctx):
        ctx["killed"] = ctx["leader"]
        cluster.kill(ctx["leader"])

    def restart(ctx):
        cluster.start(ctx["killed"])
        cluster.wait_healthy([ctx["killed"]], 120)

    ctx = run(scenario(cluster, log_dir, during=kill_leader, after=restart, total=12))
    assert_history(ctx)
    leaders = {s.get("leader") for s in ctx["status_after"] if s.get("reachable")}
    assert ctx["killed"] not in leaders, f"the killed leader is still the leader everywhere: {ctx['status_after']}"


def test_pause_follower_past_checkpoint_then_state_transfer(make_cluster, log_dir):
    # Checkpoint every 4 sequence numbers and one request per batch: the load below is
    # many checkpoint intervals, so the paused node's peers truncate their logs and it
    # must catch up by state transfer, not by replaying the log.
    cluster = make_cluster(node_args="--checkpoint-interval 4 --batch-size 1")

    def pause_follower(ctx):
        ctx["paused"] = next(n for n in cluster.node_ids if n != ctx["leader"])
        cluster.pause(ctx["paused"])

    def resume(ctx):
        cluster.unpause(ctx["paused"])

    ctx = run(scenario(cluster, log_dir, during=pause_follower, after=resume, total=16, fault_after=1))
    assert_history(ctx)
    paused = next(s for s in ctx["status_after"] if s["node_id"] == ctx["paused"])
    assert paused.get("reachable"), paused
    assert paused.get("stable_checkpoint_seq", 0) >= 4, f"no checkpoint reached on the resumed node: {paused}"


def test_partition_leader_then_heal(make_cluster, log_dir):
    cluster = make_cluster()

    def isolate_leader(ctx):
        cluster.partition(ctx["leader"])
        ctx["rules"] = cluster.chaos_rules(ctx["leader"])
        # The main load may be over before the rules are in: do not hope it crossed the
        # partition. Send requests through the majority alone while the partition holds;
        # they can only become final once the majority has replaced the isolated leader.
        majority = [n for n in cluster.node_ids if n != ctx["leader"]]
        ctx["partition_ops"] = asyncio.run(load_through(cluster, majority, total=3))

    def heal(ctx):
        cluster.heal()

    ctx = run(scenario(cluster, log_dir, during=isolate_leader, after=heal, total=12))
    assert "DROP" in ctx["rules"], f"the partition installed no rules:\n{ctx['rules']}"
    during_partition = ctx["partition_ops"]
    assert during_partition and all(op.status in ("Valid", "Invalid") and op.certificate_ok for op in during_partition), (
        "requests sent to the majority while the leader was cut off did not become final:\n"
        + "\n".join(repr(op) for op in during_partition))
    assert_history(ctx)
    majority = [s for s in ctx["status_after"] if s.get("reachable") and s["node_id"] != ctx["leader"]]
    assert all(s.get("view", 0) != 0 for s in majority) and all(s.get("leader") != ctx["leader"] for s in majority), (
        f"the isolated leader {ctx['leader']} was never replaced: {ctx['status_after']}")


@pytest.mark.parametrize("one_way", [False, True], ids=["both-ways", "one-way"])
def test_partition_follower_with_a_client_then_heal_it_stays_in_the_view(make_cluster, log_dir, one_way):
    """A client's request waits on a follower cut off from every peer, both ways or only
    in what it sends (one-way: it still hears them, none of its packets arrive). The
    follower does not ask alone for a new view (nobody would join it); after the heal its
    request is ordered in the same view and it votes again."""
    cluster = make_cluster()

    def isolate_follower_with_a_request(ctx):
        cut = ctx["cut"] = next(n for n in cluster.node_ids if n != ctx["leader"])
        cluster.partition(cut, one_way=one_way)
        ctx["rules"] = cluster.chaos_rules(cut)
        waiting = ctx["through_cut"] = threading.Thread(
            target=lambda: ctx.__setitem__("cut_ops", asyncio.run(load_through(cluster, [cut], total=1))))
        waiting.start()
        ctx["status_during"] = wait_until(
            lambda: (s := asyncio.run(status_of(cluster, cut)))["replica"]["counters"].get("view_changes_deferred") and s,
            60, f"{cut} holding back its view change while cut off")

    def heal(ctx):
        cluster.heal()
        ctx["through_cut"].join(timeout=120)

    ctx = run(scenario(cluster, log_dir, during=isolate_follower_with_a_request, after=heal, total=12))
    assert "DROP" in ctx["rules"], f"the partition installed no rules:\n{ctx['rules']}"
    inbound_dropped = f"-A {CHAIN_IN} -s" in ctx["rules"]
    assert inbound_dropped != one_way, f"one_way={one_way} but the rules were:\n{ctx['rules']}"
    during = ctx["status_during"]["replica"]
    assert not during["in_view_change"] and not during["counters"].get("view_changes_started"), during
    assert_history(ctx)
    cut_ops = ctx.get("cut_ops") or []
    assert cut_ops and all(op.status in ("Valid", "Invalid") and op.certificate_ok for op in cut_ops), (
        "the request sent through the cut-off follower did not become final after the heal:\n"
        + "\n".join(repr(op) for op in cut_ops))
    rows = {s["node_id"]: s for s in ctx["status_after"] if s.get("reachable")}
    assert not rows[ctx["cut"]]["replica"]["in_view_change"], rows[ctx["cut"]]
    view = ctx["status_during"]["view"]
    assert {s["view"] for s in rows.values()} == {view}, f"the cluster left view {view}: {ctx['status_after']}"


async def status_of(cluster, node_id):
    client = cluster.client(only=[node_id])
    try:
        return await client.call_node(node_id, "cluster/status")
    finally:
        await client.close()


async def load_through(cluster, node_ids, total):
    """A small load through the given nodes only; returns its recorded operations."""
    from cluster.chaos import run_load_with, validation_params

    client = cluster.client(only=node_ids)
    try:
        runner = await run_load_with(client, validation_params(cluster.cluster_dir), None,
                                     total=total, concurrency=1, prefix=f"partition-{uuid.uuid4().hex[:6]}")
        return runner.operations
    finally:
        await client.close()


def test_random_packet_loss_on_one_node(make_cluster, log_dir):
    cluster = make_cluster()

    def counters(node_id):
        return cluster.exec_root(node_id, ["sh", "-c", "iptables -L HM_CHAOS_IN -v -n -x; "
                                                       "ip6tables -L HM_CHAOS_IN -v -n -x"])

    def dropped(text):
        return sum(int(line.split()[0]) for line in text.splitlines() if "statistic" in line)

    def lossy(ctx):
        ctx["lossy"] = next(n for n in cluster.node_ids if n != ctx["leader"])
        cluster.packet_loss(ctx["lossy"], 0.25)
        # The load may finish before the rule is in place; keepalives and retransmissions
        # between the validators still cross it: wait (bounded) until it has bitten.
        wait_until(lambda: dropped(counters(ctx["lossy"])) > 0, 60, f"packet loss on {ctx['lossy']} to drop something")

    def heal(ctx):
        ctx["counters"] = counters(ctx["lossy"])
        cluster.heal()

    ctx = run(scenario(cluster, log_dir, during=lossy, after=heal, total=12, fault_after=1))
    assert dropped(ctx["counters"]) > 0, f"the loss rule dropped nothing:\n{ctx['counters']}"
    assert_history(ctx)


def test_rolling_restart_under_load(make_cluster, log_dir):
    cluster = make_cluster()

    def roll(ctx):
        for node_id in cluster.node_ids:
            cluster.restart(node_id)
            cluster.wait_healthy([node_id], 120)

    ctx = run(scenario(cluster, log_dir, during=roll, total=16, concurrency=2, fault_after=1))
    assert_history(ctx)
    # Every node went down once while requests were in flight; all still agree.
    assert all(s.get("reachable") for s in ctx["status_after"]), ctx["status_after"]


def test_network_disconnect_keeps_alias_on_reconnect(make_cluster, log_dir):
    cluster = make_cluster()

    def cut(ctx):
        ctx["cut"] = next(n for n in cluster.node_ids if n != ctx["leader"])
        cluster.disconnect(ctx["cut"])

    def reconnect(ctx):
        cluster.connect(ctx["cut"])
        cluster.wait_healthy([ctx["cut"]], 120)
        # the shared `consensus` alias must answer from the reconnected node too
        ctx["alias"] = cluster.exec_root(ctx["cut"], ["python3", "-c",
            "import socket; print(sorted({a[4][0] for a in socket.getaddrinfo('consensus', 9292)}))"])

    ctx = run(scenario(cluster, log_dir, during=cut, after=reconnect, total=10))
    v6, v4 = cluster.addresses(ctx["cut"])
    assert v6 in ctx["alias"] or v4 in ctx["alias"], f"{ctx['cut']} lost the consensus alias: {ctx['alias']}"
    assert_history(ctx)
