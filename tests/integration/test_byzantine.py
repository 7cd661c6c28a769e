"""One Byzantine validator out of four, as real processes: results stay correct,
confidence shows the disagreement, and provable misbehaviour is recorded as evidence."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from consensus.actions import Evidence
from consensus.evidence import verify_evidence

from .conftest import wait_until

pytestmark = pytest.mark.integration

# The leader of view 0 is node-1: modes that matter most in the leader's seat run there.
SEATS = {
    "silent": "node-4", "equivocate": "node-1", "wrong-result": "node-4",
    "bad-signature": "node-4", "replay": "node-4", "slow": "node-1",
}
EVIDENCE_EXPECTED = {"equivocate", "wrong-result"}


@pytest.mark.parametrize("mode", sorted(SEATS))
def test_one_byzantine_node(make_cluster, mode: str) -> None:  # type: ignore[no-untyped-def]
    bad = SEATS[mode]
    running = make_cluster(4, extra_args={bad: ["--byzantine", mode]},
                           common_args=["--view-change-timeout-ms", "1000"])
    honest = [e for e in running.manifest.nodes if e.node_id != bad]
    valid = [running.factory.proofs() for _ in range(8)]
    invalid = [running.factory.proofs(fault=("work", "nonce")) for _ in range(2)]

    async def run() -> list[dict[str, Any]]:
        async with running.client(endpoints=honest, timeout_s=60) as client:
            return list(await asyncio.gather(*(client.validate_proofs(p, wait_s=90) for p in valid + invalid)))

    results = asyncio.run(run())  # every one verified against the manifest by the client
    assert [r["status"] for r in results] == ["Valid"] * len(valid) + ["Invalid"] * len(invalid)
    for result in results:
        signers = {node for node, _ in result["certificate"]["signatures"]}
        assert len(signers) >= 3
        if mode in ("silent", "wrong-result", "bad-signature"):
            # The Byzantine node never contributes a valid matching vote.
            assert bad not in signers
            assert result["metrics"]["confidence_level"] == 0.75

    if mode in EVIDENCE_EXPECTED:
        async def evidence_recorded() -> bool:
            async with running.client(endpoints=honest) as client:
                for entry in honest:
                    found = await client.evidence(node_id=entry.node_id, accused=bad)
                    if found["evidence"]:
                        return True
            return False

        asyncio.run(wait_until(evidence_recorded, 30, f"evidence against {bad} ({mode})"))

        async def check_evidence() -> None:
            async with running.client(endpoints=honest) as client:
                for entry in honest:
                    found = await client.evidence(node_id=entry.node_id, accused=bad)
                    for record in found["evidence"]:
                        assert record["accused"] == bad
                        # Anyone holding the manifest can re-check the signed messages.
                        evidence = Evidence(record["accused"], record["kind"], record["seq"], record["view"],
                                            tuple(record["messages"]), record["detail"])
                        assert verify_evidence(running.manifest.keyring(), evidence), record["kind"]

        asyncio.run(check_evidence())
