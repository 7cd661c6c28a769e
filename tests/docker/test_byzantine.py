"""Byzantine validators in a real compose cluster (consensus-server --byzantine MODE).

One faulty node out of four (f = 1): results stay correct and certified, the faulty
node's disagreement shows in the confidence level, provable misbehaviour is recorded as
evidence and served by ``consensus/evidence``. Two faulty nodes out of four exceed f:
the test checks only safety (no two conflicting certified results) and states plainly
whether the cluster stayed live.
"""

from __future__ import annotations

import pytest

from .conftest import run, scenario

pytestmark = [pytest.mark.docker, pytest.mark.slow]

# Leader-side attacks go on node-1 (the leader of view 0); vote-side ones on node-4.
PLACEMENT = {"silent": "node-1", "equivocate": "node-1", "slow": "node-1",
             "wrong-result": "node-4", "bad-signature": "node-4", "replay": "node-4"}
# Modes whose misbehaviour is provable (two validly signed, conflicting messages).
PROVABLE = {"equivocate", "wrong-result"}
# Modes where the faulty node never signs the agreed result: confidence stays below 1.
NEVER_AGREES = {"silent", "wrong-result", "bad-signature"}


async def collect_evidence(client, ctx):
    ctx["evidence"] = {}
    for node_id in ctx["honest"]:
        try:
            ctx["evidence"][node_id] = await client.evidence(node_id=node_id)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            ctx["evidence"][node_id] = {"error": repr(exc)}


@pytest.mark.parametrize("mode", sorted(PLACEMENT))
def test_one_byzantine_node(make_cluster, log_dir, mode):
    bad = PLACEMENT[mode]
    cluster = make_cluster(byzantine={bad: mode})
    honest = [n for n in cluster.node_ids if n != bad]

    async def inspect(client, ctx):
        ctx["honest"] = honest
        await collect_evidence(client, ctx)

    ctx = run(scenario(cluster, log_dir, total=8, concurrency=2, byzantine=(bad,), inspect=inspect))
    report = ctx["report"]
    assert report.acknowledged, report.summary()
    assert report.ok, report.summary()
    finals = [op for op in report.acknowledged if op.status]
    assert all(op.validator_nodes is not None and op.validator_nodes >= 3 for op in finals), (
        [(op.request_id, op.validator_nodes) for op in finals])
    if mode in NEVER_AGREES:
        assert all(op.confidence is not None and op.confidence < 1 for op in finals), (
            f"{bad} ({mode}) never agrees, yet confidence is 1: {[(op.request_id, op.confidence) for op in finals]}")
    if mode in PROVABLE:
        accused = {rec.get("accused") for ev in ctx["evidence"].values() for rec in ev.get("evidence", [])}
        assert bad in accused, f"no honest node recorded evidence against {bad} ({mode}): {ctx['evidence']}"


def test_two_byzantine_nodes_of_four_keep_safety(make_cluster, log_dir, capsys):
    byzantine = {"node-1": "equivocate", "node-4": "wrong-result"}
    cluster = make_cluster(byzantine=byzantine)
    ctx = run(scenario(cluster, log_dir, total=6, concurrency=2, byzantine=tuple(byzantine),
                       ack_deadline_s=20, final_deadline_s=20, converge_s=10, require_final_at_client=False))
    report = ctx["report"]
    conflicts = [p for p in report.problems if "CONFLICTING" in p]
    forged = [p for p in report.problems if "certificate fails" in p]
    final = [op for op in report.operations if op.status]
    live = len(final) == len(report.operations)
    statement = (f"2 Byzantine of 4 (f=1 exceeded): liveness {'KEPT' if live else 'NOT kept'} - "
                 f"{len(final)}/{len(report.operations)} requests final; safety: {len(conflicts)} conflicting "
                 f"certified results")
    (log_dir / "liveness.txt").write_text(statement + "\n" + report.summary() + "\n")
    with capsys.disabled():
        print("\n" + statement)
    assert not conflicts, "\n".join(conflicts)
    assert not forged, "\n".join(forged)
