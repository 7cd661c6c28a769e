"""One validator at run time: the sans-I/O replica wired to peers, store, clock and metrics.

The replica decides; this module only carries out its actions, in order:
``Persist`` goes to SQLite before any later ``Send`` leaves, ``Final`` results are stored
(one transaction per action list) and wake the client calls waiting for them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from consensus.actions import (
    AlreadyExecuted,
    Committed,
    Evidence,
    Final,
    Persist,
    Rejected,
    Send,
    StateTransferred,
    ViewChanged,
)
from consensus.codec import DecodeError
from consensus.evidence import EQUIVOCATION, WRONG_RESULT
from consensus.replica import Replica, ReplicaConfig
from consensus.validation import ValidationApp, decode_outcome
from transport.envelope import ApiError, ErrorCode

from .metrics import NodeMetrics
from .store import PendingRequest, Store, StoredResult, StoreError
from .vote_guard import VoteGuard

log = logging.getLogger("hypermesh.node")


CLOCK_STEP_MS = 1000  # a change of the wall clock's offset this large is a step, not drift


class SteadyClock:
    """Milliseconds that follow the monotonic clock, starting at the wall clock's value.
    The replica's timers run on it, so a stepped wall clock (NTP, an operator) neither
    stalls them for the size of a step back nor fires them all at once on a step forward.
    Agreed times still follow the wall clock: ``wall_offset_ms`` says how far it is."""

    def __init__(self) -> None:
        self._base_ns = time.time_ns() - time.monotonic_ns()

    def now_ms(self) -> int:
        return (self._base_ns + time.monotonic_ns()) // 1_000_000

    @staticmethod
    def wall_offset_ms(now: int) -> int:
        return time.time_ns() // 1_000_000 - now


class NodeStopping(Exception):
    """Set on a waiting validation when the node shuts down before it is final."""


class NotAccepted(Exception):
    """Set on a waiting validation whose request never reached the disk: the store
    refused the write, so this node does not have it and will not finish it."""


@dataclass(slots=True)
class Waiter:
    future: asyncio.Future[StoredResult]
    started: float = field(default_factory=time.perf_counter)
    durable: bool = False  # its pending row is committed: "Pending" is a promise we keep


class ReplicaDriver:
    """Owns the replica and everything it touches. All methods run on the event loop."""

    def __init__(
        self,
        *,
        replica_config: ReplicaConfig,
        key: Any,
        keyring: Any,
        params: Any,
        kem_private_key: bytes,
        store: Store,
        metrics: NodeMetrics,
        send: Callable[[str | None, bytes], None],
        byzantine: str | None = None,
        tick_interval_s: float = 0.025,
        vote_guard: VoteGuard | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self._clock = SteadyClock()
        self._wall_offset_ms = 0
        for node_id in keyring.node_ids:  # every series exists from 0: alerts on increase() see the first offence
            for kind in (EQUIVOCATION, WRONG_RESULT):
                metrics.evidence.labels(node_id, kind)
        self._send = send
        self.n = len(keyring.node_ids)
        self._pool_size = 2
        self._pool = ThreadPoolExecutor(max_workers=self._pool_size, thread_name_prefix="precheck")
        self.app = ValidationApp(params, kem_private_key, precheck_runner=self._run_prechecks,
                                 background=self._pool.submit, background_workers=self._pool_size)
        # What this node signed, as its vote guard recorded it outside the store (a lone
        # validator has none: no peer holds its votes, see docs/OPERATIONS.md).
        self._guard = vote_guard
        signed_bound = vote_guard.load() if vote_guard is not None else None
        try:
            replica: Any = Replica(replica_config, key, keyring, self.app, durable=store.load_records(),
                                    now_ms=self._clock.now_ms(), signed_bound=signed_bound)
        except DecodeError as exc:  # our own records do not decode or do not verify: refuse to run on them
            raise StoreError(f"the consensus records in {store.path} are damaged ({exc}); in a cluster, move this "
                             "node's node.db* files aside, keep its vote-guard.json, and start it: it catches up "
                             "from its peers") from exc
        if byzantine:
            from consensus.byzantine import ByzantineReplica

            replica = ByzantineReplica(replica, byzantine, key, keyring, rng_seed=int.from_bytes(key.public_key[:4], "big"))
        self.replica = replica
        floor = replica.vote_floor
        if floor is not None:
            log.warning("this node once signed votes up to view %d, seq %d, but its store %s remembers less (restored "
                        "from a backup, WAL lost, or emptied): it withholds its votes at or below that seq until the "
                        "cluster's stable checkpoint passes it, and counts as one of the f faulty nodes until then",
                        floor[0], floor[1], store.path)
        # The guard is written by _flush, after the records the constructor queued are
        # committed: writing signed_high now could put a vote on file that a crash
        # before that commit would leave out of the store (a false floor next time).
        self._now()  # the wall clock's offset, before anything is proposed
        self.tick_interval_s = tick_interval_s
        self._waiters: dict[str, list[Waiter]] = {}
        self._out_pending: list[PendingRequest] = []
        self._out_records: list[tuple[str, bytes | None]] = []
        self._out_sends: list[tuple[str | None, bytes]] = []
        self._out_finals: list[Final] = []
        self._out_answers: list[AlreadyExecuted | Rejected] = []
        self._flush_scheduled = False
        self._vote_events: dict[str, asyncio.Event] = {}
        self._tick_task: asyncio.Task[None] | None = None
        self._batch_timer: asyncio.TimerHandle | None = None
        self._batch_timer_at: int | None = None
        # Fail-stop: set when a write to the store failed; on_fatal (the node's main)
        # then shuts the process down with an error.
        self.failed: BaseException | None = None
        self.on_fatal: Callable[[BaseException], None] | None = None
        self._last_audit_flush = 0.0

    # -- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        # Accepted-but-unordered requests need no resubmission here: the replica keeps
        # them in its own durable records (pending/<id>) and re-queues them on recovery.
        pending = len(self.store.list_pending())
        if pending:
            log.info("%d accepted requests were not final at the last shutdown; the replica resumes them", pending)
        self._tick_task = asyncio.create_task(self._tick_loop(), name="replica-tick")

    async def stop(self) -> None:
        if self._flush_scheduled and self.failed is None:
            self._flush()
        if self._batch_timer is not None:
            self._batch_timer.cancel()
        if self._tick_task is not None:
            self._tick_task.cancel()
            try:
                await self._tick_task
            except asyncio.CancelledError:
                pass
        self.release_waiters()  # normally none left: the server's stop released them
        self._pool.shutdown(wait=True, cancel_futures=True)

    async def _tick_loop(self) -> None:
        while True:
            woke_due = time.monotonic() + self.tick_interval_s
            await asyncio.sleep(self.tick_interval_s)
            self.metrics.loop_lag.observe(max(0.0, time.monotonic() - woke_due))
            try:
                self._apply(self.replica.tick(self._now()))
                self._update_gauges()
                if time.monotonic() - self._last_audit_flush > 0.5:
                    self.store.flush_audit()
                    self._last_audit_flush = time.monotonic()
            except Exception:  # a bug must not stop the heartbeat of the node
                log.exception("replica tick failed")

    # -- events in --------------------------------------------------------------------

    def on_peer_message(self, sender: str, data: bytes) -> None:
        self.metrics.peer_frames_in.inc()
        try:
            self._apply(self.replica.receive(sender, data, self._now()))
        except Exception:
            log.exception("replica failed on a message from %s", sender)

    def _now(self) -> int:
        """The steady time for the replica's timers; tells it the wall clock's offset."""
        now = self._clock.now_ms()
        offset = self._clock.wall_offset_ms(now)
        if abs(offset - self._wall_offset_ms) > CLOCK_STEP_MS:
            self.metrics.clock_steps.inc()
            log.warning("the wall clock stepped by %+d ms: timers are unaffected, agreed times follow the wall clock",
                        offset - self._wall_offset_ms)
        if offset != self._wall_offset_ms:
            self._wall_offset_ms = offset
            self.replica.set_wall_offset(offset)
        return now

    def submit(self, request_id: str, request_digest: bytes, kind: str, request: bytes) -> asyncio.Future[StoredResult]:
        """Accept a client request: durable as pending first, then ordered."""
        future: asyncio.Future[StoredResult] = asyncio.get_running_loop().create_future()
        if self.failed is not None:  # fail-stop: nothing more is written
            future.set_exception(NotAccepted())
            return future
        self._waiters.setdefault(request_id, []).append(Waiter(future))
        # Durable (in this pass's transaction) before anything about it is sent or answered.
        # The request bytes themselves are persisted once, by the replica (pending/<id>);
        # this row only lets validation_status answer Pending and check the digest.
        self._out_pending.append(PendingRequest(request_id, request_digest, kind, b""))
        self._apply(self.replica.submit(request_id, request, self._now()))
        return future

    async def wait_for_votes(self, stored: StoredResult, grace_s: float) -> StoredResult:
        """A result is final at 2f+1 votes; the remaining validators' votes usually land
        a moment later. Wait up to ``grace_s`` for them so ``confidence_level`` reports
        every validator that agreed, not just the first quorum."""
        deadline = time.monotonic() + grace_s
        event = self._vote_events.setdefault(stored.request_id, asyncio.Event())
        # Late votes that landed before this wait began are in the store already.
        stored = self.store.get_result(stored.request_id) or stored
        try:
            while stored.agreeing < stored.n:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(event.wait(), remaining)
                except asyncio.TimeoutError:
                    break
                event.clear()
                stored = self.store.get_result(stored.request_id) or stored
        finally:
            self._vote_events.pop(stored.request_id, None)
        return stored

    def adopt_result(self, stored: StoredResult) -> None:
        """A certified result fetched from a peer (see repair.py): store it and answer
        the clients waiting for it, as if the Final had arrived here."""
        self.store.put_results([stored])
        for waiter in self._waiters.pop(stored.request_id, []):
            if not waiter.future.done():
                waiter.future.set_result(stored)

    def release_waiters(self) -> int:
        """Shutdown or a failed write: the clients still waiting are told "Pending" (their
        requests are durable; the cluster finishes them and validation_status answers),
        or NotAccepted where the write that was to save the request failed, rather than
        having their streams cancelled. Returns how many were waiting."""
        released = 0
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.future.done():
                    waiter.future.set_exception(NodeStopping() if waiter.durable else NotAccepted())
                    released += 1
        self._waiters.clear()
        return released

    def forget_waiter(self, request_id: str, future: asyncio.Future[StoredResult]) -> None:
        waiters = self._waiters.get(request_id)
        if waiters:
            waiters[:] = [w for w in waiters if w.future is not future]
            if not waiters:
                del self._waiters[request_id]

    # -- actions out ------------------------------------------------------------------

    def _apply(self, actions: list[Any], schedule: bool = True) -> None:
        """Queue the replica's output; ``_flush`` writes and sends it once per event-loop
        pass (group commit: one SQLite transaction for every event handled in the pass)."""
        for action in actions:
            if isinstance(action, Persist):
                self._out_records.extend(action.records)
            elif isinstance(action, Send):
                self._out_sends.append((action.to, action.payload))
            elif isinstance(action, Final):
                self._out_finals.append(action)
            elif isinstance(action, (AlreadyExecuted, Rejected)):
                self._out_answers.append(action)
            elif isinstance(action, Committed):
                self.metrics.batches.inc()
                self.metrics.batch_size.observe(len(action.request_ids))
            elif isinstance(action, ViewChanged):
                self.metrics.view_changes.inc()
                log.warning("view changed to %d; leader is now %s", action.view, action.leader)
            elif isinstance(action, Evidence):
                self._record_evidence(action)
            elif isinstance(action, StateTransferred):
                self.metrics.state_transfers.inc()
                log.warning("caught up by state transfer to checkpoint seq %d", action.seq)
        if schedule:
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and (self._out_records or self._out_sends or self._out_finals
                                          or self._out_answers or self._out_pending):
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Durable first (pending requests, consensus records, final results in one
        transaction), then the sends that depend on it, then the answers."""
        self._flush_scheduled = False
        if self.failed is not None:
            return  # fail-stop: nothing more is written, sent or answered
        # Every request that arrived in this pass is queued now: close a partial batch.
        self._apply(self.replica.propose(self._now()), schedule=False)
        pending, self._out_pending = self._out_pending, []
        records, self._out_records = self._out_records, []
        sends, self._out_sends = self._out_sends, []
        finals, self._out_finals = self._out_finals, []
        answers, self._out_answers = self._out_answers, []
        stored = [self._to_stored(final) for final in finals]
        refused = [a.request_id for a in answers if isinstance(a, Rejected)]
        if pending or records or stored or refused:
            try:
                with self.store.transaction():
                    for request in pending:
                        self.store.add_pending(request)
                    if records:
                        self.store.apply_records(records)
                    if stored:
                        self.store.put_results(stored)
                    if refused:
                        self.store.drop_pending(refused)
            except Exception as exc:  # disk full, I/O error, ...
                # The replica now believes records are on disk that are not: going on
                # could send or answer what a restart would not remember. Stop instead;
                # a restart recovers from what the disk does hold.
                self._fail_stop(exc, "the store refused a write")
                return
        if self._guard is not None:
            try:  # before the sends: a peer must never hold a vote the guard does not cover
                self._guard.raise_to(self.replica.signed_high)
            except OSError as exc:
                self._fail_stop(exc, f"the vote guard {self._guard.path} could not be written")
                return
        for request in pending:
            for waiter in self._waiters.get(request.request_id, ()):
                waiter.durable = True
        for to, payload in sends:
            try:
                self._send(to, payload)
            except (ValueError, KeyError) as exc:  # larger than a peer frame; unknown peer
                # The rest of this pass (other sends, the answers) must still go out.
                log.error("consensus message of %d bytes not sent to %s: %s", len(payload), to or "the peers", exc)
        for result, final in zip(stored, finals):
            if final.late and result.request_id in self._vote_events:
                self._vote_events[result.request_id].set()
            for waiter in self._waiters.pop(result.request_id, []):
                if not waiter.future.done():
                    waiter.future.set_result(result)
        for answer in answers:
            if isinstance(answer, AlreadyExecuted):
                self._answer_from_store(answer.request_id)
            else:
                self._fail(answer.request_id, ApiError(ErrorCode(answer.code), answer.message))
        self._arm_batch_timer()

    def _fail_stop(self, exc: BaseException, what: str) -> None:
        self.failed = exc
        log.critical("%s (%s): stopping this node; a restart recovers from what is on disk", what, exc)
        # Nothing here will be finished: answer every waiter now (Pending if its
        # request is on disk, NotAccepted if this pass's write was to save it).
        self.release_waiters()
        if self.on_fatal is not None:
            self.on_fatal(exc)

    def _arm_batch_timer(self) -> None:
        """A partial batch goes out when it is due (``batch_max_delay_ms`` after its
        oldest request arrived), not at the next tick: with a 10 ms tick that added 0-10 ms
        to every request at low load."""
        deadline = self.replica.batch_deadline_ms()
        if deadline == self._batch_timer_at:
            return
        if self._batch_timer is not None:
            self._batch_timer.cancel()
            self._batch_timer = self._batch_timer_at = None
        if deadline is not None:
            # now_ms truncates to whole ms: half a ms more, so the timer never fires early.
            delay = max(0, deadline - self._clock.now_ms()) / 1000 + 0.0005
            self._batch_timer_at = deadline
            self._batch_timer = asyncio.get_running_loop().call_later(delay, self._on_batch_timer)

    def _on_batch_timer(self) -> None:
        self._batch_timer = self._batch_timer_at = None
        try:
            self._apply(self.replica.propose(self._now()))
            self._arm_batch_timer()
        except Exception:
            log.exception("proposing a due batch failed")

    @staticmethod
    def _to_stored(final: Final) -> StoredResult:
        # The request digest comes from the certified outcome bytes (under the signed
        # root), not from Final.request_digest: for results fetched from a peer that
        # field travelled unsigned, and a wrong one would make this node refuse the
        # genuine request as "request_id already used for a different request".
        request_digest = final.request_digest
        try:
            outcome = decode_outcome(final.result)
            status, request_digest = outcome.status, outcome.request_digest
        except Exception:
            status = "Error"
        return StoredResult(
            final.request_id, request_digest, status, final.result, final.certificate.to_wire(),
            final.agreeing, final.n, final.certificate.seq, final.view, final.leader,
        )

    def _answer_from_store(self, request_id: str) -> None:
        stored = self.store.get_result(request_id)
        if stored is not None:
            for waiter in self._waiters.pop(request_id, []):
                if not waiter.future.done():
                    waiter.future.set_result(stored)
        # Otherwise the result is still on its way (final votes not in yet): keep waiting.

    def _fail(self, request_id: str, error: ApiError) -> None:
        for waiter in self._waiters.pop(request_id, []):
            if not waiter.future.done():
                waiter.future.set_exception(error)

    def _record_evidence(self, evidence: Evidence) -> None:
        if self.store.add_evidence(
            evidence.accused, evidence.kind, evidence.seq, evidence.view, list(evidence.messages), evidence.detail
        ):
            self.metrics.evidence.labels(evidence.accused, evidence.kind).inc()
            log.warning(
                "BYZANTINE EVIDENCE against %s: %s at view %d seq %d %s",
                evidence.accused, evidence.kind, evidence.view, evidence.seq, evidence.detail,
            )

    def _run_prechecks(self, parts: list[Callable[[], Any]]) -> list[Any]:
        """The proof checks are independent and their crypto releases the GIL, so they
        run on the pool — as one contiguous chunk per worker: a future per check would
        cost more in thread hand-offs than the smaller checks themselves."""
        workers = self._pool_size
        if len(parts) < 2 * workers:
            return [part() for part in parts]
        size = -(-len(parts) // workers)
        chunks = [parts[i:i + size] for i in range(0, len(parts), size)]
        results: list[Any] = []
        for chunk_results in self._pool.map(lambda chunk: [part() for part in chunk], chunks):
            results.extend(chunk_results)
        return results

    def _update_gauges(self) -> None:
        replica = self.replica
        self.metrics.view.set(replica.view)
        self.metrics.view_change_target.set(replica.view_change_target or 0)
        self.metrics.is_leader.set(1 if replica.is_leader else 0)
        self.metrics.last_executed.set(replica.last_executed_seq)
        self.metrics.stable_checkpoint.set(replica.stable_checkpoint_seq)
        floor = replica.vote_floor
        self.metrics.vote_floor.set(0 if floor is None else floor[1])
