"""The node's embedded store: one SQLite file in WAL mode, no server.

What lives here, and why it must survive ``kill -9``:

* ``results`` — every final result by request id (with its inclusion path), so a client
  can ask any node for a result later and a retried request is answered, not re-run.
* ``batch_certificates`` — the signed part of a result certificate (root and the 2f+1+
  signatures), stored once per batch instead of once per request: with post-quantum
  signatures of 2.4-4.6 KB each it is most of a certificate's size.
* ``pending`` — requests this node accepted from a client but that are not final yet
  (id, digest, kind), so ``validation_status`` answers Pending across restarts. The
  request bytes are kept once, in the replica's records, which re-queue them on recovery.
* ``consensus_kv`` — the replica's own durable records (votes, certificates, checkpoint).
* ``evidence`` — signed proof of Byzantine behaviour, served by ``consensus/evidence``.
* ``audit`` — one row per client call outcome (who asked what, how it ended). ``peer``
  is the caller's client-certificate common name, or its address (``[::1]:53211``).

Durability: WAL with ``synchronous=NORMAL`` by default. A committed transaction is in
the WAL file (the OS page cache) before the call returns, so it survives ``kill -9`` of
the process; ``sync_commits=True`` (``--sync-commits``) also fsyncs every commit, which
survives power loss and costs ~0.3 ms per transaction on this machine. Writes are
grouped per batch of results so that cost is paid per batch, not per request.
All access happens on the event-loop thread, except WAL checkpoints, which a background
thread runs on its own connection (``WalCheckpointer``) so no COMMIT has to copy the log.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import msgpack

log = logging.getLogger("hypermesh.store")


class DataDirInUse(OSError):
    """Another process holds this data directory (two writers would corrupt the store)."""


class StoreError(Exception):
    """The store cannot be used as it is: unreadable, damaged, or another node's. The
    message says which and what to do; the node refuses to start rather than serve it."""


def lock_data_dir(data_dir: Path) -> TextIO:
    """Take ``data_dir/LOCK`` (an exclusive flock, released when the process exits, even
    by kill -9) and write our pid in it. Returns the open file: keep it open."""
    data_dir.mkdir(parents=True, exist_ok=True)
    handle = open(data_dir / "LOCK", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise DataDirInUse(
            f"data directory {data_dir} is in use by another consensus-server (pid {holder}): stop that one, "
            "or give this one its own --data-dir"
        ) from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    request_id     TEXT PRIMARY KEY,
    request_digest BLOB NOT NULL,
    status         TEXT NOT NULL,
    result         BLOB NOT NULL,
    certificate    BLOB NOT NULL,
    agreeing       INTEGER NOT NULL,
    n              INTEGER NOT NULL,
    seq            INTEGER NOT NULL,
    view           INTEGER NOT NULL,
    leader         TEXT NOT NULL,
    finalized_at   REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS batch_certificates (
    seq        INTEGER PRIMARY KEY,
    cluster_id TEXT NOT NULL,
    root       BLOB NOT NULL,
    size       INTEGER NOT NULL,
    signatures BLOB NOT NULL,
    agreeing   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS pending (
    request_id     TEXT PRIMARY KEY,
    request_digest BLOB NOT NULL,
    kind           TEXT NOT NULL,
    request        BLOB NOT NULL,
    accepted_at    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS consensus_kv (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS evidence (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    accused     TEXT NOT NULL,
    kind        TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    view        INTEGER NOT NULL,
    messages    BLOB NOT NULL,
    detail      TEXT NOT NULL,
    recorded_at REAL NOT NULL,
    UNIQUE (accused, kind, seq, view)
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          REAL NOT NULL,
    peer        TEXT,
    path        TEXT NOT NULL,
    request_id  TEXT,
    outcome     TEXT NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class StoredResult:
    request_id: str
    request_digest: bytes
    status: str
    result: bytes
    certificate: dict[str, object]
    agreeing: int
    n: int
    seq: int
    view: int
    leader: str


@dataclass(frozen=True, slots=True)
class PendingRequest:
    request_id: str
    request_digest: bytes
    kind: str
    request: bytes


@dataclass(frozen=True, slots=True)
class EvidenceRecord:
    id: int
    accused: str
    kind: str
    seq: int
    view: int
    messages: list[bytes]
    detail: str
    recorded_at: float


# WAL checkpoints copy the log into the database file and fsync it. SQLite's automatic
# checkpoint runs inside whichever COMMIT crosses the threshold: with 16 KB pages that
# stalled the event loop ~25 ms every 16 MB written (the single node's p99). A thread with
# its own connection checkpoints instead (PASSIVE: it never blocks writers); the
# automatic one stays as a far-off safety net should that thread fall behind.
CHECKPOINT_INTERVAL_S = 0.2
SAFETY_NET_PAGES = 16384  # 256 MB of WAL with 16 KB pages
# The WAL file keeps its high-water size (SQLite reuses it from the start). A larger one
# is truncated by the checkpointer once no write came for IDLE_ROUNDS_BEFORE_TRUNCATE
# rounds — never by SQLite's journal_size_limit, which truncates inside the COMMIT that
# resets the WAL: on ext4 that ftruncate stalled the event loop 50-65 ms (the p99 at
# 450 requests/s was that one COMMIT).
WAL_SIZE_LIMIT = 64 << 20
IDLE_ROUNDS_BEFORE_TRUNCATE = 10  # 2 s at the default interval
MAX_EVIDENCE_PER_KIND = 1000  # offences stored per accused node and kind (see add_evidence)
AUDIT_KEEP_ROWS = 1_000_000  # newest audit rows kept (~100 MB; 17 min at 1,000 calls/s)


class WalCheckpointer:
    """Checkpoints ``path``'s WAL from a background thread until ``stop()``."""

    def __init__(self, path: Path, interval_s: float = CHECKPOINT_INTERVAL_S, size_limit: int = WAL_SIZE_LIMIT) -> None:
        self._path = path
        self._wal = Path(f"{path}-wal")
        self._interval_s = interval_s
        self._size_limit = size_limit
        self._stopped = threading.Event()
        self.checkpoints = 0
        self.frames_copied = 0  # most WAL frames one checkpoint found copied (for tests and status)
        self.truncations = 0
        self.errors = 0
        self._thread = threading.Thread(target=self._run, name="wal-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        db = sqlite3.connect(str(self._path), isolation_level=None, check_same_thread=False)
        quiet_rounds, last_frames = 0, -1
        try:
            while not self._stopped.wait(self._interval_s):
                try:
                    _busy, frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    self.checkpoints += 1
                    self.frames_copied = max(self.frames_copied, copied)
                    quiet_rounds = quiet_rounds + 1 if frames == last_frames else 0
                    last_frames = frames
                    if quiet_rounds >= IDLE_ROUNDS_BEFORE_TRUNCATE and self._wal_size() > self._size_limit:
                        # Idle: a writer arriving now waits for this (busy timeout), once.
                        db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                        self.truncations += 1
                        quiet_rounds, last_frames = 0, -1
                except sqlite3.Error as exc:  # busy or I/O: the next round (or the safety net) retries
                    self.errors += 1
                    log.debug("background WAL checkpoint failed: %s", exc)
        finally:
            db.close()

    def _wal_size(self) -> int:
        try:
            return self._wal.stat().st_size
        except OSError:
            return 0

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=10)


class Store:
    def __init__(self, path: Path, *, sync_commits: bool = False, background_checkpoints: bool = True,
                 audit_keep_rows: int = AUDIT_KEEP_ROWS, owner: str | None = None) -> None:
        """``owner`` ("cluster-id/node-id"): written into a new store and checked on every
        later open, so a node never serves another node's or another cluster's data."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self._audit_keep = audit_keep_rows
        self.path = path
        self._audit_buffer: list[tuple[float, str | None, str, str | None, str]] = []
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        try:
            self._open(sync_commits, owner)
        except StoreError:
            self._db.close()
            raise
        except sqlite3.Error as exc:
            self._db.close()
            raise StoreError(f"cannot open the store {path}: {exc}") from exc
        self._checkpointer: WalCheckpointer | None = None
        if background_checkpoints:
            self._db.execute(f"PRAGMA wal_autocheckpoint={SAFETY_NET_PAGES}")
            self._checkpointer = WalCheckpointer(path)

    def _open(self, sync_commits: bool, owner: str | None) -> None:
        # 16 KB pages (new databases only; an existing file keeps its page size): a batch
        # persists a few hundred KB of request bytes per transaction, and SQLite writes
        # (and checkpoints) them page by page — 4 KB pages cost ~1.6x the CPU per batch.
        # Durability does not depend on the page size.
        self._db.execute("PRAGMA page_size=16384")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if sync_commits else 'NORMAL'}")
        self._db.execute("PRAGMA foreign_keys=ON")
        # A damaged file can still open and answer most queries: results that read as
        # missing would turn final answers into Pending. Reading every page once at start
        # keeps the node from serving it.
        problems = [" ".join(row[0].split()) for row in self._db.execute("PRAGMA quick_check(3)")]
        if problems != ["ok"]:
            raise StoreError(
                f"the store {self.path} is damaged ({'; '.join(problems)}). In a cluster, move this node's node.db* "
                "files aside, keep its vote-guard.json, and start it: it catches up from its peers. A single node has no peers: "
                "restore the directory from a backup (docs/OPERATIONS.md, Backups)"
            )
        self._db.executescript(SCHEMA)
        if owner is not None:
            self._claim(owner)

    def _claim(self, owner: str) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'owner'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta (key, value) VALUES ('owner', ?)", (owner,))
        elif row[0] != owner:
            raise StoreError(
                f"the store {self.path} belongs to {row[0]} (cluster/node), not {owner}: give this node its own "
                "--data-dir (a node must never serve another node's or another cluster's results)"
            )

    def close(self) -> None:
        self.flush_audit()
        if self._checkpointer is not None:
            self._checkpointer.stop()
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic, durable unit. (In autocommit mode ``with connection:`` alone
        would commit every statement separately.) Nested use joins the outer one."""
        if self._db.in_transaction:
            yield self._db
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- results ----------------------------------------------------------------------

    def put_results(self, results: list[StoredResult]) -> None:
        """Insert final results (one transaction), or raise their agreeing count (late votes)."""
        if len(results) == 1:
            with self.transaction():
                self._put_result(results[0])
            return
        # A batch's results share one certificate: write it once per seq (the row with
        # the most signers; on a tie the first, as row-by-row upserts would keep), then
        # the result rows in one statement each — not three statements per request.
        best: dict[int, StoredResult] = {}
        for result in results:
            held = best.get(result.seq)
            if held is None or result.agreeing > held.agreeing:
                best[result.seq] = result
        now = time.time()
        with self.transaction():
            for result in best.values():
                self._put_batch_certificate(result)
            self._db.executemany(
                """INSERT INTO results VALUES (?,?,?,?,?,?,?,?,?,?,?)
                   ON CONFLICT(request_id) DO NOTHING""",
                [self._result_row(result, now) for result in results],
            )
            self._db.executemany("DELETE FROM pending WHERE request_id = ?", [(r.request_id,) for r in results])

    def _put_result(self, result: StoredResult) -> None:
        self._put_batch_certificate(result)
        self._db.execute(
            """INSERT INTO results VALUES (?,?,?,?,?,?,?,?,?,?,?)
               ON CONFLICT(request_id) DO NOTHING""",
            self._result_row(result, time.time()),
        )
        self._db.execute("DELETE FROM pending WHERE request_id = ?", (result.request_id,))

    def _put_batch_certificate(self, result: StoredResult) -> None:
        cert = result.certificate
        # Late votes only ever raise the count (and bring a certificate with more signers).
        self._db.execute(
            """INSERT INTO batch_certificates VALUES (?,?,?,?,?,?)
               ON CONFLICT(seq) DO UPDATE SET
                 signatures = CASE WHEN excluded.agreeing > agreeing THEN excluded.signatures ELSE signatures END,
                 agreeing = MAX(agreeing, excluded.agreeing)""",
            (result.seq, cert["cluster_id"], cert["root"], cert["size"],
             msgpack.packb(cert["signatures"], use_bin_type=True), result.agreeing),
        )

    @staticmethod
    def _result_row(result: StoredResult, now: float) -> tuple[object, ...]:
        cert = result.certificate
        return (
            result.request_id, result.request_digest, result.status, result.result,
            msgpack.packb({"index": cert["index"], "path": cert["path"]}, use_bin_type=True),
            result.agreeing, result.n, result.seq, result.view, result.leader, now,
        )

    def get_result(self, request_id: str) -> StoredResult | None:
        row = self._db.execute(
            "SELECT r.request_id, r.request_digest, r.status, r.result, r.certificate, b.agreeing, r.n, r.seq,"
            " r.view, r.leader, b.cluster_id, b.root, b.size, b.signatures"
            " FROM results r JOIN batch_certificates b ON b.seq = r.seq WHERE r.request_id = ?",
            (request_id,),
        ).fetchone()
        if row is None:
            return None
        inclusion = msgpack.unpackb(row[4], raw=False)
        certificate = {
            "cluster_id": row[10], "seq": row[7], "root": bytes(row[11]), "size": row[12],
            "index": inclusion["index"], "path": inclusion["path"],
            "signatures": msgpack.unpackb(row[13], raw=False),
        }
        return StoredResult(
            row[0], bytes(row[1]), row[2], bytes(row[3]), certificate, row[5], row[6], row[7], row[8], row[9],
        )

    def count_results(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0])

    # -- pending ----------------------------------------------------------------------

    def add_pending(self, pending: PendingRequest) -> None:
        """Durable before the node acknowledges acceptance of the request."""
        with self.transaction():
            self._db.execute(
                "INSERT OR IGNORE INTO pending VALUES (?,?,?,?,?)",
                (pending.request_id, pending.request_digest, pending.kind, pending.request, time.time()),
            )

    def drop_pending(self, request_ids: list[str]) -> None:
        """Requests the cluster refused (overloaded, expired): no longer Pending."""
        with self.transaction():
            self._db.executemany("DELETE FROM pending WHERE request_id = ?", [(r,) for r in request_ids])

    def get_pending(self, request_id: str) -> PendingRequest | None:
        row = self._db.execute(
            "SELECT request_id, request_digest, kind, request FROM pending WHERE request_id = ?", (request_id,)
        ).fetchone()
        return None if row is None else PendingRequest(row[0], bytes(row[1]), row[2], bytes(row[3]))

    def list_pending(self, older_than_s: float = 0.0, limit: int = 1_000_000) -> list[PendingRequest]:
        rows = self._db.execute(
            "SELECT request_id, request_digest, kind, request FROM pending WHERE accepted_at <= ?"
            " ORDER BY accepted_at LIMIT ?",
            (time.time() - older_than_s, limit),
        ).fetchall()
        return [PendingRequest(r[0], bytes(r[1]), r[2], bytes(r[3])) for r in rows]

    # -- consensus records ------------------------------------------------------------

    def apply_records(self, records: Iterable[tuple[str, bytes | None]]) -> None:
        """The replica's Persist action: atomically, before any later send."""
        with self.transaction():
            for key, value in records:
                if value is None:
                    self._db.execute("DELETE FROM consensus_kv WHERE key = ?", (key,))
                else:
                    self._db.execute(
                        "INSERT INTO consensus_kv VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                        (key, value),
                    )

    def load_records(self) -> Mapping[str, bytes]:
        return {k: bytes(v) for k, v in self._db.execute("SELECT key, value FROM consensus_kv")}

    # -- evidence and audit -----------------------------------------------------------

    def add_evidence(self, accused: str, kind: str, seq: int, view: int, messages: list[bytes], detail: str) -> bool:
        """True when this is new evidence and was stored. The same offence is stored once,
        and at most MAX_EVIDENCE_PER_KIND offences of one kind per accused node: a
        Byzantine node can commit one per slot forever, and its first thousand prove the
        point as well as its millionth (the caller still counts the rest)."""
        with self.transaction():
            (held,) = self._db.execute(
                "SELECT COUNT(*) FROM evidence WHERE accused = ? AND kind = ?", (accused, kind)).fetchone()
            if held >= MAX_EVIDENCE_PER_KIND:
                return False
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO evidence (accused, kind, seq, view, messages, detail, recorded_at)"
                " VALUES (?,?,?,?,?,?,?)",
                (accused, kind, seq, view, msgpack.packb(messages, use_bin_type=True), detail, time.time()),
            )
            return cursor.rowcount > 0

    def list_evidence(self, accused: str | None = None, limit: int = 100, before_id: int | None = None) -> list[EvidenceRecord]:
        """Newest first; ``before_id`` pages on to older records."""
        query = "SELECT id, accused, kind, seq, view, messages, detail, recorded_at FROM evidence WHERE 1"
        args: tuple[object, ...] = ()
        if accused is not None:
            query += " AND accused = ?"
            args = (accused,)
        if before_id is not None:
            query += " AND id < ?"
            args = (*args, before_id)
        query += " ORDER BY id DESC LIMIT ?"
        rows = self._db.execute(query, (*args, limit)).fetchall()
        return [
            EvidenceRecord(r[0], r[1], r[2], r[3], r[4], msgpack.unpackb(r[5], raw=False), r[6], r[7]) for r in rows
        ]

    def evidence_counts(self) -> dict[str, int]:
        return {a: c for a, c in self._db.execute("SELECT accused, COUNT(*) FROM evidence GROUP BY accused")}

    def audit(self, peer: str | None, path: str, request_id: str | None, outcome: str) -> None:
        """Buffered: audit rows are written in groups by ``flush_audit`` (called by the
        node every few hundred ms and on shutdown), not one transaction per call.
        ``peer`` names the caller (``node.service.audit_caller``): the common name of its
        client certificate, else its address such as ``[::1]:53211``."""
        self._audit_buffer.append((time.time(), peer, path, request_id, outcome))
        if len(self._audit_buffer) >= 1000:
            self.flush_audit()

    def flush_audit(self) -> None:
        if not self._audit_buffer:
            return
        rows, self._audit_buffer = self._audit_buffer, []
        with self.transaction():
            self._db.executemany("INSERT INTO audit (at, peer, path, request_id, outcome) VALUES (?,?,?,?,?)", rows)
            # Every call adds a row: keep the newest ones only (ids only grow: AUTOINCREMENT).
            self._db.execute("DELETE FROM audit WHERE id <= (SELECT MAX(id) FROM audit) - ?", (self._audit_keep,))

    def recent_audit(self, limit: int = 50) -> list[tuple[float, str | None, str, str | None, str]]:
        self.flush_audit()
        return list(self._db.execute(
            "SELECT at, peer, path, request_id, outcome FROM audit ORDER BY id DESC LIMIT ?", (limit,)
        ))
