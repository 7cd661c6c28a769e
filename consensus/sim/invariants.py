"""The invariant checker: reads a recorded history, returns every violation found.

It trusts nothing the replicas say about themselves when it can look at ground truth:
agreement and exactly-once are checked on what each replica's *application* actually
executed (the app keeps its own log), and certificates are re-verified with the same
function a client uses. Only *honest* instances are held to the invariants; Byzantine
ones (wrapped replicas and both halves of a twin pair) can do anything.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

from consensus.actions import Committed, Evidence, Final
from consensus.sim.app import Execution, request_id_of

SAFETY_KINDS = ("agreement", "total-order", "validity", "exactly-once", "results", "final-certificate", "final-conflict", "evidence")


@dataclass(frozen=True, slots=True)
class Violation:
    kind: str  # agreement | total-order | validity | exactly-once | results | final-* | evidence | liveness | exception
    detail: str

    @property
    def is_safety(self) -> bool:
        return self.kind in SAFETY_KINDS

    def __str__(self) -> str:
        return f"[{self.kind}] {self.detail}"


@dataclass(slots=True)
class History:
    """Everything the checker needs, recorded by the simulator (or built by hand in tests).

    ``executions[node]`` holds each honest-or-not instance's app log over all its
    incarnations, in order; the key is the *instance* name (twins differ), ``node_of``
    maps it to the node id.
    """

    submitted: dict[str, bytes] = field(default_factory=dict)
    honest: set[str] = field(default_factory=set)
    node_of: dict[str, str] = field(default_factory=dict)
    executions: dict[str, list[Execution]] = field(default_factory=lambda: defaultdict(list))
    committed: list[tuple[str, Committed]] = field(default_factory=list)
    finals: list[tuple[str, Final]] = field(default_factory=list)
    evidence: list[tuple[str, Evidence]] = field(default_factory=list)
    exceptions: list[tuple[str, str]] = field(default_factory=list)
    expect_liveness: bool = False


CertificateCheck = Callable[[str, bytes, object], tuple[bool, str]]
EvidenceCheck = Callable[[Evidence], bool]


def check_history(
    history: History,
    *,
    verify_certificate: CertificateCheck | None = None,
    verify_evidence: EvidenceCheck | None = None,
) -> list[Violation]:
    """All violations in ``history``. The verifiers are injected so a hand-made history
    can be checked without real keys (tests), and a real run with the real ones."""
    found: list[Violation] = []
    honest = sorted(history.honest)
    _check_executions(history, honest, found)
    _check_committed(history, found)
    results = _honest_results(history, honest)
    _check_finals(history, results, verify_certificate, found)
    _check_evidence(history, verify_evidence, found)
    for instance, trace in history.exceptions:
        if instance in history.honest:
            found.append(Violation("exception", f"honest {instance} raised: {trace}"))
    if history.expect_liveness:
        final_ids = {final.request_id for instance, final in history.finals if instance in history.honest}
        missing = sorted(set(history.submitted) - final_ids)
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            found.append(Violation("liveness", f"{len(missing)} of {len(history.submitted)} requests never final: {shown}"))
    return found


def _check_executions(history: History, honest: list[str], found: list[Violation]) -> None:
    batch_at: dict[int, tuple[bytes, str]] = {}
    state_at: dict[int, tuple[bytes, str]] = {}
    for instance in honest:
        seq_of_request: dict[str, int] = {}
        # A restarted replica may re-execute a seq it executed before the crash: that is
        # fine as long as it is the same batch at the same seq (checked below).
        for execution in history.executions.get(instance, []):
            seq = execution.seq
            digest = execution.batch_digest
            first = batch_at.setdefault(seq, (digest, instance))
            if first[0] != digest:
                found.append(Violation("agreement", f"seq {seq}: {first[1]} executed batch {first[0].hex()[:16]}, {instance} executed {digest.hex()[:16]}"))
            state = state_at.setdefault(seq, (execution.state_after, instance))
            if state[0] != execution.state_after:
                found.append(Violation("total-order", f"seq {seq}: state after differs between {state[1]} and {instance}"))
            in_batch: set[str] = set()
            for request in execution.requests:
                request_id = request_id_of(request)
                if history.submitted.get(request_id) != request:
                    found.append(Violation("validity", f"{instance} executed at seq {seq} a request no client submitted (id {request_id!r})"))
                    continue
                if request_id in in_batch:
                    found.append(Violation("exactly-once", f"{instance} executed {request_id} twice in the batch at seq {seq}"))
                in_batch.add(request_id)
                earlier = seq_of_request.setdefault(request_id, seq)
                if earlier != seq:
                    found.append(Violation("exactly-once", f"{instance} executed {request_id} at seq {earlier} and again at seq {seq}"))


def _check_committed(history: History, found: list[Violation]) -> None:
    """The replicas' own Committed reports must agree too (cheap, catches reporting bugs)."""
    ids_at: dict[int, tuple[tuple[str, ...], str]] = {}
    for instance, committed in history.committed:
        if instance not in history.honest:
            continue
        first = ids_at.setdefault(committed.seq, (committed.request_ids, instance))
        if first[0] != committed.request_ids:
            found.append(Violation("agreement", f"seq {committed.seq}: {first[1]} reported committing {list(first[0])[:4]}, {instance} reported {list(committed.request_ids)[:4]}"))


def _honest_results(history: History, honest: list[str]) -> dict[str, bytes]:
    """request id -> the result honest replicas computed (the first one; mismatches
    are reported by ``_check_executions`` via the state chain, and here directly)."""
    results: dict[str, bytes] = {}
    for instance in honest:
        for execution in history.executions.get(instance, []):
            for request, result in zip(execution.requests, execution.results):
                results.setdefault(request_id_of(request), result)
    return results


def _check_finals(history: History, results: dict[str, bytes], verify: CertificateCheck | None, found: list[Violation]) -> None:
    accepted: dict[str, tuple[bytes, str]] = {}
    for instance, final in history.finals:
        honest = instance in history.honest
        if verify is not None:
            ok, reason = verify(final.request_id, final.result, final.certificate)
            if not ok:
                if honest:
                    found.append(Violation("final-certificate", f"honest {instance} emitted a Final for {final.request_id} whose certificate does not verify: {reason}"))
                continue  # a client would reject a Byzantine node's bad certificate
        elif not honest:
            continue
        first = accepted.setdefault(final.request_id, (final.result, instance))
        if first[0] != final.result:
            found.append(Violation("final-conflict", f"{final.request_id}: {first[1]} and {instance} gave verified Finals with different results"))
        expected = results.get(final.request_id)
        if expected is not None and expected != final.result:
            found.append(Violation("results", f"{final.request_id}: {instance}'s verified Final differs from what honest replicas executed"))


def _check_evidence(history: History, verify: EvidenceCheck | None, found: list[Violation]) -> None:
    """Evidence that verifies must never accuse an honest node: that would mean an
    honest replica really contradicted itself (e.g. after a crash) or evidence is forgeable."""
    honest_nodes = {history.node_of.get(i, i) for i in history.honest}
    byzantine_nodes = {history.node_of.get(i, i) for i in history.node_of if i not in history.honest}
    for instance, evidence in history.evidence:
        if instance not in history.honest:
            continue
        if evidence.accused in honest_nodes and evidence.accused not in byzantine_nodes:
            if verify is None or verify(evidence):
                found.append(Violation("evidence", f"{instance} holds valid {evidence.kind} evidence against honest {evidence.accused} (seq {evidence.seq}, view {evidence.view}): {evidence.detail}"))
