"""Fetch certified results this node missed from its peers.

A node that was down, paused or cut off while its accepted requests became final
elsewhere may never see their ``Final`` (it catches up by checkpoint, and the votes
were exchanged while it was away). Its ``pending`` rows would then say Pending
forever. Every few seconds this looks at pending rows older than a threshold and asks
the other validators' ``consensus/validation_status``; a result is adopted only if its
certificate verifies against the manifest and it is about exactly the request this
node accepted (same request digest) — a peer is never trusted, only checked.

A node that caught up by state transfer also holds no results for the requests the
skipped batches executed (accepted elsewhere, so not in its pending rows); the service
asks ``fetch_certified`` for one of those when a client asks about it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any, Callable

from consensus.certificate import verify_result_certificate
from consensus.validation import decode_outcome
from transport.client import StoqClient
from transport.envelope import ApiError
from transport.tls import TlsConfig

from .store import Store, StoredResult

log = logging.getLogger("hypermesh.repair")


def _small_int(value: Any) -> int:
    """A peer's unsigned, informational number (the view): anything odd reads as 0."""
    return value if type(value) is int and 0 <= value < 1 << 62 else 0


class ResultRepair:
    def __init__(self, *, node_id: str, manifest: Any, store: Store, adopt: Callable[[StoredResult], None],
                 interval_s: float = 2.0, min_age_s: float = 5.0, per_round: int = 50,
                 client_tls: TlsConfig | None = None) -> None:
        self.node_id = node_id
        self.client_tls = client_tls  # our certificate, shown to peers: they may require one
        self.manifest = manifest
        self.keyring = manifest.keyring()
        self.store = store
        self.adopt = adopt
        self.interval_s = interval_s
        self.min_age_s = min_age_s
        self.per_round = per_round
        self.repaired = 0
        self._clients: dict[str, StoqClient] = {}
        self._tls_files_seen: tuple[int, int] | None = None  # mtimes of our cert/key when the clients were made
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="result-repair")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for client in self._clients.values():
            await client.close()

    async def _client(self, entry: Any) -> StoqClient:
        tls = self.client_tls
        if tls is not None:
            # Our certificate may have been renewed in place (OPERATIONS.md, "Rotating
            # certificates and keys"): clients made with the old files are replaced.
            seen = (os.stat(tls.cert_file).st_mtime_ns, os.stat(tls.key_file).st_mtime_ns)
            if seen != self._tls_files_seen:
                self._tls_files_seen = seen
                old, self._clients = self._clients, {}
                for stale in old.values():
                    await stale.close()
        client = self._clients.get(entry.node_id)
        if client is None:
            cert = Path(tls.cert_file).read_bytes() if tls is not None else None
            key = Path(tls.key_file).read_bytes() if tls is not None else None
            client = StoqClient(entry.host, entry.port, ca_pem=self.manifest.ca_pem, server_name=entry.server_name,
                                client_cert_pem=cert, client_key_pem=key, timeout_s=3.0, retries=0)
            self._clients[entry.node_id] = client
        return client

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.repair_once()
            except Exception:  # keep trying next round; a bug here must not stop the node
                log.exception("result repair round failed")

    async def repair_once(self) -> int:
        adopted = 0
        for pending in self.store.list_pending(older_than_s=self.min_age_s, limit=self.per_round):
            stored = await self._from_peers(pending.request_id, pending.request_digest)
            if stored is not None and self.store.get_pending(pending.request_id) is not None:
                self.adopt(stored)
                adopted += 1
        if adopted:
            self.repaired += adopted
            log.info("adopted %d certified results from peers for requests accepted here", adopted)
        return adopted

    async def fetch_certified(self, request_id: str, seq: int) -> StoredResult | None:
        """A certified result for ``request_id`` executed at ``seq``, or None. For
        requests this node knows were executed but holds no result of."""
        stored = await self._from_peers(request_id, None, seq)
        if stored is not None:
            self.repaired += 1
        return stored

    async def _from_peers(self, request_id: str, request_digest: bytes | None,
                          seq: int | None = None) -> StoredResult | None:
        """The first peer's certified result (certificate checked against the manifest,
        and the request digest or seq when given), or None."""
        for entry in self.manifest.nodes:
            if entry.node_id == self.node_id:
                continue
            try:
                stored = await self._fetch(entry, request_id, request_digest)
            except Exception as exc:  # one peer's odd answer must not stop the others' turn
                log.warning("%s: unusable answer about %s (%s)", entry.node_id, request_id, exc)
                continue
            if stored is not None and seq is not None and stored.seq != seq:
                log.warning("%s sent a result of seq %d for %s, executed here at %d", entry.node_id,
                            stored.seq, request_id, seq)
                continue
            if stored is not None:
                return stored
        return None

    async def _fetch(self, entry: Any, request_id: str, request_digest: bytes | None) -> StoredResult | None:
        """``request_digest`` None: any request certified under this id (the cluster
        executes one request per id, and the certificate proves which). The peer is
        asked to answer from its own store only (``local``): it never asks onwards."""
        try:
            client = await self._client(entry)
            answer = await client.call("consensus/validation_status", {"request_id": request_id, "local": True})
        except ApiError:
            return None
        if not isinstance(answer, dict) or answer.get("status") not in ("Valid", "Invalid", "Error"):
            return None
        result, certificate = answer.get("result"), answer.get("certificate")
        if not isinstance(result, bytes) or not isinstance(certificate, dict):
            return None
        ok, reason = verify_result_certificate(self.keyring, self.manifest.cluster_id, request_id, result, certificate)
        if not ok:
            log.warning("%s sent an unverifiable result for %s: %s", entry.node_id, request_id, reason)
            return None
        try:
            outcome = decode_outcome(result)
        except Exception:
            return None
        if outcome.request_id != request_id or request_digest not in (None, outcome.request_digest):
            log.warning("%s sent a certified result for a different request under %s", entry.node_id, request_id)
            return None
        return StoredResult(
            request_id, outcome.request_digest, outcome.status, result, certificate,
            len(certificate.get("signatures") or []), self.manifest.n, int(certificate["seq"]),
            _small_int(answer.get("view")), str(answer.get("leader") or "")[:128],
        )
