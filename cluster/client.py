"""The cluster client: talks to any node, prefers the leader, fails over, and never
believes a result it cannot verify.

Every final result carries a result certificate: 2f+1 validator signatures over a Merkle
root and the result's inclusion path. The client checks it against the manifest's public
keys, so the node it talked to need not be trusted. A short, forged or mismatched
certificate raises ``UnverifiedResult`` — it is never returned as a result.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from consensus.certificate import verify_result_certificate
from consensus.codec import DecodeError
from consensus.requests import parse_request
from consensus.validation import decode_outcome
from transport.client import StoqClient
from transport.envelope import ApiError, ErrorCode, Response

from .manifest import Manifest, NodeEntry, load_manifest

FINAL_STATUSES = ("Valid", "Invalid", "Error")
SHARED_SERVER_NAME = "consensus"  # in every node certificate (hypermesh cluster init --extra-dns)
# Errors worth trying on another node: the node is down, busy, or cut off.
CONNECT_TIMEOUT_S = 3.0  # per node, when the client has other nodes to try


class _Unreachable(Exception):
    """No node of the pass could be reached (every one failed to connect)."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error
FAILOVER_CODES = {ErrorCode.TransportError, ErrorCode.Timeout, ErrorCode.Overloaded, ErrorCode.RateLimited}


class UnverifiedResult(Exception):
    """A node returned a result whose certificate does not verify against the manifest."""


class NodeCallError(ApiError):
    """A transport failure (unreachable, TLS, no answer) talking to one node: the message
    names the node and its address, so an error that reaches the user says which one
    failed; ``cause`` is the transport's own error."""

    def __init__(self, entry: NodeEntry, cause: ApiError) -> None:
        super().__init__(cause.code, f"{_where(entry)}: {cause.message}")
        self.cause = cause


def _where(entry: NodeEntry) -> str:
    # An --endpoint entry's id is its address already.
    return entry.endpoint if entry.node_id == entry.endpoint else f"{entry.node_id} at {entry.endpoint}"


class DeadlineExceeded(ApiError):
    """The caller's ``deadline`` passed before the call was done. A ``Timeout`` error, so
    code that handles timeouts needs no change; ``detail`` says what was still missing."""

    def __init__(self, detail: str) -> None:
        super().__init__(ErrorCode.Timeout, f"deadline passed: {detail}")
        self.detail = detail


class ClusterClient:
    def __init__(
        self,
        manifest: Manifest,
        *,
        endpoints: Sequence[NodeEntry] | None = None,
        timeout_s: float = 30.0,
        retries: int = 2,
        client_cert: tuple[bytes, bytes] | None = None,
        cache_results: bool = False,
    ) -> None:
        self.manifest = manifest
        self.keyring = manifest.keyring()
        self.endpoints = list(endpoints or manifest.nodes)
        self.timeout_s = timeout_s
        self.retries = retries
        self._client_cert = client_cert
        self._clients: dict[str, StoqClient] = {}
        self.leader: str | None = None
        # (request_id, request digest) -> verified result
        self._results: dict[tuple[str, bytes], dict[str, Any]] | None = {} if cache_results else None
        self._ids = itertools.count()

    @classmethod
    def from_manifest(
        cls, manifest: Manifest | str | os.PathLike[str], *, endpoints: Sequence[tuple[str, int]] | None = None, **kwargs: Any
    ) -> ClusterClient:
        """``endpoints`` overrides where to connect (a load balancer, a compose alias, published
        ports). Which validator answers there is unknown, so the TLS name checked is the
        cluster-wide ``consensus`` name that every node certificate carries."""
        if not isinstance(manifest, Manifest):
            manifest = load_manifest(Path(manifest))
        entries = None
        if endpoints:
            entries = [
                NodeEntry(f"{host}:{port}" if ":" not in host else f"[{host}]:{port}", host, port, SHARED_SERVER_NAME, "", b"")
                for host, port in endpoints
            ]
        return cls(manifest, endpoints=entries, **kwargs)

    async def __aenter__(self) -> ClusterClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.close()

    # -- plumbing ---------------------------------------------------------------------

    def _client_for(self, entry: NodeEntry) -> StoqClient:
        key = f"{entry.node_id}@{entry.endpoint}"
        client = self._clients.get(key)
        if client is None:
            cert, key_pem = self._client_cert or (None, None)
            # With other nodes to try, a node that does not answer the handshake is left
            # after one short attempt (a frozen node cost every call 3 x 5 s); call()
            # spends the retries on passes over all the nodes instead.
            alone = len(self.endpoints) == 1
            client = StoqClient(
                entry.host, entry.port, ca_pem=self.manifest.ca_pem, server_name=entry.server_name,
                client_cert_pem=cert, client_key_pem=key_pem, timeout_s=self.timeout_s,
                retries=self.retries if alone else 0, connect_timeout_s=5.0 if alone else CONNECT_TIMEOUT_S,
            )
            self._clients[key] = client
        return client

    def _ordered_endpoints(self) -> list[NodeEntry]:
        """The cached leader first (saves the forwarding hop), then the rest."""
        if self.leader is None:
            return list(self.endpoints)
        first = [e for e in self.endpoints if e.node_id == self.leader]
        return first + [e for e in self.endpoints if e.node_id != self.leader]

    async def _call_full(
        self, entry: NodeEntry, path: str, payload: Any, timeout_s: float | None, deadline: float | None
    ) -> Response:
        """One call to one node: it gets ``timeout_s`` (default: the client's), but never
        more than is left before ``deadline`` (a ``time.monotonic()`` value). A failure
        once the deadline has passed is DeadlineExceeded: trying on is pointless."""
        budget = self.timeout_s if timeout_s is None else timeout_s
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded(f"no answer to {path}")
            budget = min(budget, left)
        try:
            return await self._client_for(entry).call_full(path, payload, timeout_s=budget)
        except ApiError as exc:
            cut_short = exc.code in (ErrorCode.Timeout, ErrorCode.TransportError)  # what a spent budget gives
            if cut_short and deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded(f"no answer to {path} (last tried {_where(entry)}: {exc})") from None
            raise NodeCallError(entry, exc) from None

    async def call_node(
        self, node_id: str, path: str, payload: Any = None, timeout_s: float | None = None,
        *, deadline: float | None = None,
    ) -> Any:
        """One call to one named node, no failover."""
        entry = next((e for e in self.endpoints if e.node_id == node_id), None)
        if entry is None:
            known = ", ".join(e.node_id for e in self.endpoints)
            raise ApiError(ErrorCode.NotFound, f"node {node_id!r} is not among this client's endpoints (known: {known})")
        response = await self._call_full(entry, path, payload, timeout_s, deadline)
        self._note_leader(response.metadata)
        if not response.ok:
            raise response.error or ApiError(ErrorCode.HandlerError, "error response without an error")
        return response.payload

    async def call(
        self, path: str, payload: Any = None, timeout_s: float | None = None, *, deadline: float | None = None
    ) -> Any:
        """Call any node; on transport failure, timeout or overload try the next one.
        When no node could even be reached, try them all again (``retries`` more
        passes, backing off): a restarting cluster comes back. ``timeout_s`` bounds each
        node's answer; ``deadline`` (a ``time.monotonic()`` value) the whole call, every
        node and pass included: past it, DeadlineExceeded."""
        passes = 1 + (self.retries if len(self.endpoints) > 1 else 0)
        budget = self.timeout_s if timeout_s is None else timeout_s
        last_pass = time.monotonic() + budget  # no new pass starts after it
        if deadline is not None:
            last_pass = min(last_pass, deadline)
        delay = 0.2
        for attempt in range(passes):
            try:
                return await self._one_pass(path, payload, timeout_s, deadline)
            except _Unreachable as exc:
                if attempt == passes - 1 or time.monotonic() + delay >= last_pass:
                    raise exc.error from None
            await asyncio.sleep(delay * (1 + random.random() * 0.25))
            delay *= 2
        raise AssertionError("unreachable: the last pass raises")

    async def _one_pass(self, path: str, payload: Any, timeout_s: float | None, deadline: float | None) -> Any:
        """Each node in turn. Raises _Unreachable when no node could even be reached
        (a refused or unanswered handshake), so the caller may try them all again."""
        last: ApiError | None = None
        reached = False
        for entry in self._ordered_endpoints():
            try:
                response = await self._call_full(entry, path, payload, timeout_s, deadline)
            except DeadlineExceeded:
                raise  # a Timeout, but no other node has time left either
            except ApiError as exc:
                if exc.code in FAILOVER_CODES:
                    reached = reached or exc.code != ErrorCode.TransportError
                    last = exc if last is None or exc.code != ErrorCode.TransportError else last
                    if self.leader == entry.node_id:
                        self.leader = None
                    continue
                raise
            reached = True
            self._note_leader(response.metadata)
            if response.ok:
                return response.payload
            if response.error is not None and response.error.code in FAILOVER_CODES:
                last = response.error
                continue
            raise response.error or ApiError(ErrorCode.HandlerError, "error response without an error")
        error = last or ApiError(ErrorCode.TransportError, "no endpoints configured")
        if not reached and error.code == ErrorCode.TransportError:
            raise _Unreachable(error)
        raise error

    def _note_leader(self, metadata: dict[str, str] | None) -> None:
        if metadata and metadata.get("leader") and any(e.node_id == metadata["leader"] for e in self.endpoints):
            self.leader = metadata["leader"]

    # -- results ----------------------------------------------------------------------

    def verify_result(self, payload: dict[str, Any], request_digest: bytes | None = None) -> dict[str, Any]:
        """Check a final result's certificate and that the readable fields match the
        certified bytes; with ``request_digest`` (the client knows what it sent) also
        that the certified result is about exactly that request, so no node can swap
        the content behind a request id. Returns the payload; raises UnverifiedResult."""
        request_id = payload.get("request_id")
        result = payload.get("result")
        certificate = payload.get("certificate")
        if not isinstance(request_id, str) or not isinstance(result, bytes) or not isinstance(certificate, dict):
            raise UnverifiedResult("final result without request_id, result bytes and certificate")
        ok, reason = verify_result_certificate(self.keyring, self.manifest.cluster_id, request_id, result, certificate)
        if not ok:
            raise UnverifiedResult(f"result certificate for {request_id} does not verify: {reason}")
        try:
            outcome = decode_outcome(result)
        except DecodeError as exc:
            raise UnverifiedResult(f"the certified result for {request_id} is not an outcome: {exc}") from None
        # Every readable outcome field must be exactly the certified one (type too: True == 1).
        for name, certified in outcome.to_wire().items():
            shown = payload.get(name)
            if type(shown) is not type(certified) or shown != certified:
                raise UnverifiedResult(f"{name} of {request_id} does not match the certified result")
        if request_digest is not None and outcome.request_digest != request_digest:
            raise UnverifiedResult(f"the certified result for {request_id} is about a different request than the one sent")
        self._check_metrics(request_id, payload.get("metrics"), certificate)
        return payload

    def _check_metrics(self, request_id: str, metrics: Any, certificate: dict[str, Any]) -> None:
        """The vote counts are not signed, but they must be consistent with the certificate
        and the manifest, filled in as the node does (node/service.py result_payload)."""
        n = self.manifest.n
        signers = len(certificate.get("signatures") or [])
        metrics = metrics if isinstance(metrics, dict) else {}
        agreeing, total = metrics.get("validator_nodes"), metrics.get("total_validators")
        if type(total) is not int or total != n:
            raise UnverifiedResult(f"total_validators for {request_id} is not the manifest's {n}")
        if type(agreeing) is not int or not signers <= agreeing <= n:
            raise UnverifiedResult(
                f"validator_nodes for {request_id} is not between the certificate's {signers} signers and {n}"
            )
        if metrics.get("confidence_level") != round(agreeing / n, 6):
            raise UnverifiedResult(f"confidence_level for {request_id} is not validator_nodes / total_validators")
        if metrics.get("seq") != certificate.get("seq"):
            raise UnverifiedResult(f"seq for {request_id} is not the certified sequence number")

    async def _ask(self, path: str, payload: Any, node_id: str | None, deadline: float | None) -> Any:
        """One named node (no failover) when ``node_id`` is given, else any node."""
        if node_id is not None:
            return await self.call_node(node_id, path, payload, deadline=deadline)
        return await self.call(path, payload, deadline=deadline)

    async def _validate(
        self, path: str, payload: dict[str, Any], wait_s: float, node_id: str | None, deadline: float | None
    ) -> dict[str, Any]:
        request_id = payload.get("request_id") if isinstance(payload, dict) else None
        kind = "certificate" if path.endswith("validate_certificate") else "proofs"
        try:
            request_digest = parse_request(kind, payload).digest
        except DecodeError as exc:  # the node answers InvalidRequest naming the field
            hint = ""
            if kind == "proofs" and exc.field == "common_name":
                hint = " (a certificate request: send it to consensus/validate_certificate)"
            raise ApiError(ErrorCode.InvalidRequest, f"{exc.field}: {exc.message}{hint}") from None
        # Keyed by content too: a different request reusing an id must not get this result.
        cache_key = (request_id, request_digest) if isinstance(request_id, str) else None
        if self._results is not None and cache_key in self._results:
            return self._results[cache_key]
        result = await self._ask(path, payload, node_id, deadline)
        if isinstance(result, dict) and result.get("status") == "Pending" and isinstance(request_id, str):
            result = await self.wait_final(request_id, wait_s, node_id, deadline=deadline)
        verified = self.verify_result(result, request_digest)
        if self._results is not None and cache_key is not None:
            self._results[cache_key] = verified
        return verified

    async def validate_proofs(
        self, payload: dict[str, Any], wait_s: float = 60.0, node_id: str | None = None,
        *, deadline: float | None = None,
    ) -> dict[str, Any]:
        """Validate and wait (up to ``wait_s``) for the final result; ``deadline`` (a
        ``time.monotonic()`` value) bounds the whole of it: past it, DeadlineExceeded."""
        return await self._validate("consensus/validate_proofs", payload, wait_s, node_id, deadline)

    async def validate_certificate(
        self, payload: dict[str, Any], wait_s: float = 60.0, node_id: str | None = None,
        *, deadline: float | None = None,
    ) -> dict[str, Any]:
        """As ``validate_proofs``, for a certificate request."""
        return await self._validate("consensus/validate_certificate", payload, wait_s, node_id, deadline)

    async def validation_status(
        self, request_id: str, node_id: str | None = None, *, deadline: float | None = None
    ) -> dict[str, Any]:
        """The stored result (verified when final) or a ``Pending`` answer. Without
        ``node_id`` one node's ``NotFound`` or ``Pending`` is not the last word (it may
        be behind, or have been down): the other nodes are asked before answering so."""
        if node_id is not None:
            return self._checked_status(request_id, await self.call_node(
                node_id, "consensus/validation_status", {"request_id": request_id}, deadline=deadline))
        pending: dict[str, Any] | None = None
        error: ApiError | None = None
        forged: UnverifiedResult | None = None
        for entry in self._ordered_endpoints():
            try:
                result = await self.call_node(entry.node_id, "consensus/validation_status", {"request_id": request_id},
                                              deadline=deadline)
            except DeadlineExceeded:
                raise  # no time left to ask the others
            except ApiError as exc:
                if exc.code != ErrorCode.NotFound and exc.code not in FAILOVER_CODES:
                    raise
                if error is None or exc.code == ErrorCode.NotFound:
                    error = exc  # NotFound says more than a node that could not be reached
                continue
            if isinstance(result, dict) and result.get("status") in FINAL_STATUSES:
                try:
                    return self._checked_status(request_id, result)
                except UnverifiedResult as exc:
                    forged = forged or exc  # one lying node must not hide the others' answer
                    continue
            pending = pending or result
        if pending is not None:
            return pending
        if forged is not None:
            raise forged
        raise error or ApiError(ErrorCode.TransportError, "no endpoints configured")

    def _checked_status(self, request_id: str, result: Any) -> Any:
        if isinstance(result, dict) and result.get("status") in FINAL_STATUSES:
            self.verify_result(result)
            # The certificate proves the result is about its own request_id, not about ours.
            if result["request_id"] != request_id:
                raise UnverifiedResult(f"asked for {request_id}, got a certified result for {result['request_id']}")
        return result

    async def wait_final(
        self, request_id: str, timeout_s: float = 60.0, node_id: str | None = None, *, deadline: float | None = None
    ) -> dict[str, Any]:
        """Poll ``validation_status`` (of ``node_id`` only, if given) until the request is
        final (backing off), for at most ``timeout_s`` and never past ``deadline``."""
        started = time.monotonic()
        end = started + timeout_s if deadline is None else min(started + timeout_s, deadline)
        delay = 0.05
        while True:
            try:
                # Each poll within the wait too: one slow node must not stretch it.
                result = await self._ask("consensus/validation_status", {"request_id": request_id}, node_id, end)
                if isinstance(result, dict) and result.get("status") in FINAL_STATUSES:
                    return result
            except DeadlineExceeded:
                break  # "not final yet" (below) says more, and what to do next
            except ApiError as exc:
                if exc.code != ErrorCode.NotFound:
                    raise
            if time.monotonic() + delay > end:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        not_final = (
            f"{request_id} accepted but not final after waiting {time.monotonic() - started:.0f}s (is more than f "
            "of the cluster down?); it is durable and is decided once the cluster can order it: ask later with "
            f"consensus/validation_status {{\"request_id\": \"{request_id}\"}}")
        if deadline is not None and end == deadline:  # the caller's deadline, not this wait, ran out
            raise DeadlineExceeded(not_final)
        raise ApiError(ErrorCode.Timeout, not_final)

    # -- cluster information ----------------------------------------------------------

    async def health(self, node_id: str | None = None, *, deadline: float | None = None) -> dict[str, Any]:
        return await self._ask("consensus/health", None, node_id, deadline)

    async def status(self, *, deadline: float | None = None) -> list[dict[str, Any]]:
        """``cluster/status`` of every node; an unreachable node is reported, not raised."""
        async def one(entry: NodeEntry) -> dict[str, Any]:
            try:
                status = await self.call_node(entry.node_id, "cluster/status", timeout_s=3.0, deadline=deadline)
                return {"node_id": entry.node_id, "endpoint": entry.endpoint, "reachable": True, **status}
            except ApiError as exc:
                # The row names the node already; the CLI tells this client's own failures
                # (its deadline, TLS refused) from a node that is down.
                cause = exc.cause if isinstance(exc, NodeCallError) else exc
                return {"node_id": entry.node_id, "endpoint": entry.endpoint, "reachable": False, "error": str(cause),
                        "error_code": str(exc.code), "deadline_passed": isinstance(exc, DeadlineExceeded),
                        "client_side": isinstance(exc, DeadlineExceeded) or exc.code == ErrorCode.Unauthorized}

        return list(await asyncio.gather(*(one(e) for e in self.endpoints)))

    async def evidence(
        self, node_id: str | None = None, accused: str | None = None, limit: int | None = None,
        *, deadline: float | None = None,
    ) -> dict[str, Any]:
        """Evidence recorded by one node (any, without ``node_id``), newest first: only
        against ``accused`` if given, at most ``limit`` entries (the node's default: 100)."""
        payload: dict[str, Any] = {}
        if accused:
            payload["accused"] = accused
        if limit is not None:
            payload["limit"] = limit
        return await self._ask("consensus/evidence", payload, node_id, deadline)
