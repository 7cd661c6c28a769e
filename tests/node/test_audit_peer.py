"""The audit table's ``peer`` column names the caller: the client certificate's identity
when the connection had one, else the address the call came from."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import node.service as service_module
from node.metrics import NodeMetrics
from node.service import ServiceLimits, ValidationService, wrap_handler
from node.store import Store
from transport.envelope import ApiError, ErrorCode
from transport.server import CallContext


@pytest.fixture
def service(tmp_path: Path) -> Iterator[ValidationService]:
    store = Store(tmp_path / "node.db", background_checkpoints=False)
    # wrap_handler needs the store and the replica's leader/view for the reply metadata.
    driver: Any = SimpleNamespace(store=store, replica=SimpleNamespace(leader="node-1", view=0))
    yield ValidationService(node_id="node-1", cluster_id="c", driver=driver, metrics=NodeMetrics(),
                            limits=ServiceLimits(), cache=None)
    store.close()


def _ctx(remote_address: tuple[Any, ...], peer_identity: str | None = None) -> CallContext:
    """The context the STOQ server builds for a call (transport/server.py)."""
    return CallContext(request_id="1", service="hypermesh", path="consensus/validate_proofs", metadata={},
                       remote_address=remote_address, alpn="stoq/1", peer_identity=peer_identity)


def _stored_peer(service: ValidationService, request_id: str) -> list[tuple[str | None, str]]:
    service.driver.store.flush_audit()
    return service.driver.store._db.execute(
        "SELECT peer, outcome FROM audit WHERE request_id = ?", (request_id,)
    ).fetchall()


async def _valid(payload: Any, ctx: Any) -> dict[str, Any]:
    return {"request_id": payload["request_id"], "status": "Valid"}


async def _refused(payload: Any, ctx: Any) -> dict[str, Any]:
    raise ApiError(ErrorCode.InvalidRequest, "proofs: missing")


def test_a_call_without_a_client_certificate_is_audited_with_its_address(service: ValidationService) -> None:
    handler = wrap_handler(service, "consensus/validate_proofs", _valid)
    # aioquic hands the server a 4-tuple for IPv6 (host, port, flowinfo, scope id).
    asyncio.run(handler({"request_id": "anon"}, _ctx(("::1", 53211, 0, 0))))
    assert _stored_peer(service, "anon") == [("[::1]:53211", "ok:Valid")]


def test_a_call_with_a_client_certificate_is_audited_with_its_identity(service: ValidationService) -> None:
    handler = wrap_handler(service, "consensus/validate_proofs", _valid)
    asyncio.run(handler({"request_id": "mtls"}, _ctx(("::1", 53212, 0, 0), peer_identity="hypermesh-client")))
    assert _stored_peer(service, "mtls") == [("hypermesh-client", "ok:Valid")]


def test_a_refused_call_is_audited_with_its_address(service: ValidationService) -> None:
    handler = wrap_handler(service, "consensus/validate_proofs", _refused)
    with pytest.raises(ApiError):
        asyncio.run(handler({"request_id": "bad"}, _ctx(("192.0.2.7", 5000))))
    assert _stored_peer(service, "bad") == [("192.0.2.7:5000", "error:InvalidRequest")]


@pytest.mark.parametrize(
    ("identity", "address", "expected"),
    [
        (None, ("::1", 53211, 0, 0), "[::1]:53211"),
        (None, ("2001:db8::7", 9292, 0, 0), "[2001:db8::7]:9292"),
        (None, ("192.0.2.7", 5000), "192.0.2.7:5000"),
        (None, ("::ffff:192.0.2.7", 5000, 0, 0), "192.0.2.7:5000"),  # IPv4 client of a dual-stack socket
        (None, ("fe80::1%eth0", 9292, 0, 2), "[fe80::1%eth0]:9292"),
        ("node-2", ("::1", 53211, 0, 0), "node-2"),
        (None, None, None),
    ],
)
def test_the_caller_is_formatted_for_the_audit(
    identity: str | None, address: tuple[Any, ...] | None, expected: str | None
) -> None:
    assert service_module.audit_caller(identity, address) == expected
