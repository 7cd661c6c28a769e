"""The node's embedded store and result cache, on a real SQLite file."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from node.cache import ResultCache
from node.store import PendingRequest, Store, StoredResult
from node import store as store_module


def _result(request_id: str, agreeing: int = 3, seq: int = 1, index: int = 0) -> StoredResult:
    signatures = [[f"node-{i}", bytes([i]) * 8] for i in range(1, agreeing + 1)]
    certificate = {"cluster_id": "hm-test", "seq": seq, "root": b"r" * 32, "size": 2, "index": index,
                   "path": [bytes([index]) * 32], "signatures": signatures}
    return StoredResult(request_id, b"d" * 32, "Valid", b"result-bytes", certificate, agreeing, 4, seq, 0, "node-1")


def test_results_roundtrip_and_late_votes_only_raise_the_count(tmp_path: Path) -> None:
    store = Store(tmp_path / "node.db")
    store.put_results([_result("a", agreeing=3)])
    assert store.get_result("a").agreeing == 3
    store.put_results([_result("a", agreeing=4)])
    assert store.get_result("a").agreeing == 4
    store.put_results([_result("a", agreeing=3)])  # a stale late update never lowers it
    got = store.get_result("a")
    assert got.agreeing == 4 and len(got.certificate["signatures"]) == 4
    assert store.get_result("missing") is None


def test_certificates_share_the_batch_signatures_but_keep_their_own_paths(tmp_path: Path) -> None:
    store = Store(tmp_path / "node.db")
    store.put_results([_result("a", index=0), _result("b", index=1), _result("c", seq=2)])
    a, b, c = (store.get_result(x) for x in "abc")
    assert a.certificate["path"] == [b"\x00" * 32] and b.certificate["path"] == [b"\x01" * 32]
    assert (a.certificate["index"], b.certificate["index"]) == (0, 1)
    assert a.certificate["signatures"] == b.certificate["signatures"] and a.certificate["root"] == b"r" * 32
    store.put_results([_result("a", agreeing=4, index=0)])  # a late vote for batch 1 raises both a and b
    assert store.get_result("b").agreeing == 4 and store.get_result("c").agreeing == 3


def test_grouped_results_keep_the_certificate_with_the_most_signers(tmp_path: Path) -> None:
    """put_results writes each batch certificate once per call: the grouped write must
    keep what row-by-row upserts kept (the most signers, whatever the order), clear
    every pending entry, and store the page size that cuts the cost of large batches."""
    store = Store(tmp_path / "node.db")
    for rid in "abc":
        store.add_pending(PendingRequest(rid, b"d" * 32, "proofs", b""))
    store.put_results([_result("a", agreeing=3, index=0), _result("b", agreeing=4, index=1),
                       _result("c", agreeing=3, seq=2), _result("a", agreeing=2, index=0)])
    a, b, c = (store.get_result(x) for x in "abc")
    assert a.agreeing == b.agreeing == 4 and len(a.certificate["signatures"]) == 4
    assert c.agreeing == 3 and b.certificate["index"] == 1
    assert store.list_pending() == []
    store.put_results([_result("d", agreeing=3), _result("e", agreeing=3, index=1)])  # stale: never lowers
    assert store.get_result("d").agreeing == 4 and store.get_result("e").certificate["index"] == 1
    assert store._db.execute("PRAGMA page_size").fetchone()[0] == 16384


def test_a_final_result_clears_its_pending_entry(tmp_path: Path) -> None:
    store = Store(tmp_path / "node.db")
    store.add_pending(PendingRequest("a", b"d" * 32, "proofs", b"req"))
    store.add_pending(PendingRequest("b", b"e" * 32, "proofs", b"req2"))
    assert [p.request_id for p in store.list_pending()] == ["a", "b"]
    store.put_results([_result("a")])
    assert [p.request_id for p in store.list_pending()] == ["b"]


def test_consensus_records_put_and_delete(tmp_path: Path) -> None:
    store = Store(tmp_path / "node.db")
    store.apply_records([("view", b"\x01"), ("vote/1", b"x")])
    store.apply_records([("vote/1", None), ("vote/2", b"y")])
    assert dict(store.load_records()) == {"view": b"\x01", "vote/2": b"y"}


def test_evidence_is_stored_once_per_offence(tmp_path: Path) -> None:
    store = Store(tmp_path / "node.db")
    assert store.add_evidence("node-3", "equivocation", 5, 0, [b"m1", b"m2"], "two pre-prepares")
    assert not store.add_evidence("node-3", "equivocation", 5, 0, [b"m1", b"m2"], "again")
    assert store.add_evidence("node-3", "wrong-result", 6, 0, [b"m3"], "")
    assert store.evidence_counts() == {"node-3": 2}
    records = store.list_evidence("node-3")
    assert {r.kind for r in records} == {"equivocation", "wrong-result"}
    assert records[-1].messages == [b"m1", b"m2"]


def test_evidence_of_one_kind_against_one_node_is_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Byzantine node can equivocate at every slot forever: each offence was a new row.
    Past MAX_EVIDENCE_PER_KIND (shrunk to 3 here) of one kind, more are not stored."""
    monkeypatch.setattr(store_module, "MAX_EVIDENCE_PER_KIND", 3)
    store = Store(tmp_path / "node.db")
    stored = [store.add_evidence("node-3", "equivocation", seq, 0, [b"m" * 100], "") for seq in range(10)]
    assert stored == [True] * 3 + [False] * 7
    assert store.add_evidence("node-3", "wrong-result", 1, 0, [b"r"], "")  # another kind
    assert store.add_evidence("node-2", "equivocation", 1, 0, [b"e"], "")  # another node
    assert store.evidence_counts() == {"node-3": 4, "node-2": 1}
    newest = store.list_evidence("node-3", limit=2)
    older = store.list_evidence("node-3", limit=10, before_id=newest[-1].id)
    assert [r.id for r in newest + older] == sorted((r.id for r in store.list_evidence("node-3")), reverse=True)
    assert len(older) == 2


def test_committed_writes_survive_kill_9(tmp_path: Path) -> None:
    """A process that stored results and pending requests and then dies without
    closing anything (os._exit, like kill -9) loses none of them."""
    db = tmp_path / "node.db"
    script = textwrap.dedent(
        f"""
        import os
        from node.store import Store, PendingRequest, StoredResult
        s = Store(__import__('pathlib').Path({str(db)!r}))
        s.add_pending(PendingRequest("p", b"d" * 32, "proofs", b"req"))
        cert = {{"cluster_id": "c", "seq": 1, "root": b"r" * 32, "size": 1, "index": 0, "path": [], "signatures": []}}
        s.put_results([StoredResult("r", b"d" * 32, "Valid", b"x", cert, 3, 4, 1, 0, "node-1")])
        s.apply_records([("k", b"v")])
        os._exit(9)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 9
    store = Store(db)
    assert store.get_result("r") is not None
    assert [p.request_id for p in store.list_pending()] == ["p"]
    assert dict(store.load_records()) == {"k": b"v"}


def test_cache_expires_and_evicts() -> None:
    now = [100.0]
    cache = ResultCache(ttl_s=10, max_entries=2, clock=lambda: now[0])
    cache.put(b"a", 1)
    cache.put(b"b", 2)
    assert cache.get(b"a") == 1
    cache.put(b"c", 3)  # evicts the least recently used: b
    assert cache.get(b"b") is None and cache.stats.evictions == 1
    now[0] += 11
    assert cache.get(b"a") is None
    assert cache.stats.hits == 1 and cache.stats.misses == 2


def test_wal_is_checkpointed_in_the_background_not_inside_commits(tmp_path: Path) -> None:
    """The automatic checkpoint moved far away; the background thread keeps the WAL
    short, and the data stays readable through a fresh connection."""
    import sqlite3
    import time as clock

    from node.store import SAFETY_NET_PAGES

    store = Store(tmp_path / "node.db")
    try:
        assert store._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == SAFETY_NET_PAGES
        blob = bytes(range(256)) * 64  # 16 KB
        for i in range(200):  # ~3 MB of WAL
            store.apply_records([(f"k/{i}", blob)])
        checkpointer = store._checkpointer
        assert checkpointer is not None
        deadline = clock.monotonic() + 10
        while checkpointer.frames_copied < 200 and clock.monotonic() < deadline:
            clock.sleep(0.05)
        assert checkpointer.frames_copied >= 200 and checkpointer.errors == 0  # the thread copied the log
    finally:
        store.close()
    assert not store._checkpointer._thread.is_alive()
    with sqlite3.connect(str(tmp_path / "node.db")) as db:
        assert db.execute("SELECT COUNT(*) FROM consensus_kv").fetchone()[0] == 200


def test_an_oversized_wal_is_truncated_by_the_checkpointer_once_idle_never_in_a_commit(tmp_path: Path) -> None:
    """SQLite's journal_size_limit truncates the WAL inside the COMMIT that resets it
    (a 50-65 ms event-loop stall on ext4); the checkpointer does it instead, when no
    write came for a while."""
    import time as clock

    from node.store import WalCheckpointer

    store = Store(tmp_path / "node.db")
    assert store._db.execute("PRAGMA journal_size_limit").fetchone()[0] == -1  # SQLite never truncates
    store.close()
    store = Store(tmp_path / "node.db", background_checkpoints=False)
    store._db.execute("PRAGMA wal_autocheckpoint=0")  # only our checkpointer copies the log
    wal = tmp_path / "node.db-wal"
    checkpointer = WalCheckpointer(tmp_path / "node.db", interval_s=0.02, size_limit=1 << 20)
    try:
        blob = bytes(range(256)) * 64  # 16 KB
        for i in range(200):  # ~3 MB of WAL
            store.apply_records([(f"k/{i}", blob)])
        assert wal.stat().st_size > 1 << 20
        deadline = clock.monotonic() + 10
        while checkpointer.truncations == 0 and clock.monotonic() < deadline:
            clock.sleep(0.02)
        assert checkpointer.truncations >= 1 and checkpointer.errors == 0
        assert wal.stat().st_size < 1 << 20
        assert store._db.execute("SELECT COUNT(*) FROM consensus_kv").fetchone()[0] == 200
    finally:
        checkpointer.stop()
        store.close()


def test_the_audit_table_keeps_only_the_newest_rows(tmp_path: Path) -> None:
    store = Store(tmp_path / "node.db", audit_keep_rows=5)
    try:
        for i in range(12):
            store.audit("client", "consensus/validate_proofs", f"r{i}", "ok:Valid")
            if i % 4 == 3:
                store.flush_audit()
        rows = store.recent_audit(limit=100)
        assert [r[3] for r in rows] == ["r11", "r10", "r9", "r8", "r7"]
    finally:
        store.close()


def test_a_data_directory_has_one_owner(tmp_path: Path) -> None:
    """Two consensus-servers on one store would both write it under one identity."""
    from node.store import DataDirInUse, lock_data_dir

    held = lock_data_dir(tmp_path / "node-2")
    try:
        with pytest.raises(DataDirInUse, match=rf"in use by another consensus-server \(pid {os.getpid()}\)"):
            lock_data_dir(tmp_path / "node-2")
    finally:
        held.close()
    lock_data_dir(tmp_path / "node-2").close()  # free again once the owner is gone


def test_a_store_serves_only_the_node_and_cluster_that_created_it(tmp_path: Path) -> None:
    from node.store import StoreError

    store = Store(tmp_path / "node.db", background_checkpoints=False, owner="hm-one/node-2")
    store.put_results([_result("a")])
    store.close()
    for stranger in ("hm-one/node-4", "hm-other/node-2"):  # another node's copy; another cluster's
        with pytest.raises(StoreError, match=r"belongs to hm-one/node-2 \(cluster/node\), not " + stranger):
            Store(tmp_path / "node.db", background_checkpoints=False, owner=stranger)
    again = Store(tmp_path / "node.db", background_checkpoints=False, owner="hm-one/node-2")
    assert again.get_result("a") is not None
    again.close()


def test_a_damaged_store_is_refused_at_start_not_served(tmp_path: Path) -> None:
    """A page overwritten in the middle still opens; rows read from it would be missing,
    and final results would be answered Pending."""
    from node.store import StoreError

    path = tmp_path / "node.db"
    store = Store(path, background_checkpoints=False)
    store.put_results([_result(f"r{i}", seq=i + 1) for i in range(400)])
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    assert path.stat().st_size > 8 * 16384
    with open(path, "r+b") as handle:
        handle.seek(5 * 16384)  # a b-tree page's header
        handle.write(os.urandom(2048))
    with pytest.raises(StoreError, match=r"is damaged \(.*btreeInitPage.*\)\. In a cluster, move this node's node.db\* files aside, keep its vote-guard.json"):
        Store(path, background_checkpoints=False)
    (tmp_path / "garbage.db").write_bytes(b"not a database" * 100)
    with pytest.raises(StoreError, match=r"cannot open the store .*garbage\.db: file is not a database"):
        Store(tmp_path / "garbage.db", background_checkpoints=False)
