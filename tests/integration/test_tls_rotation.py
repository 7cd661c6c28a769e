"""A node's TLS certificate renewed in place: a real ``consensus-server`` picks up the new
certificate and key for new connections without a restart (``TlsConfig.load``, called
for every new connection by ``StoqServer``), connections opened before keep going, and
files that cannot be used (half-replaced, missing) leave the loaded pair in use."""

from __future__ import annotations

import asyncio
import os
import random
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from cluster.client import ClusterClient
from cluster.launcher import LocalCluster
from cluster.workload import ProofFactory
from node.store import Store
from transport.client import StoqClient
from transport.tls import issue_certificate

from .conftest import wait_until

pytestmark = pytest.mark.integration

PORTS = range(9650, 9700)  # this test's port range on [::1]
NODE = "node-1"


def _free_port() -> int:
    """A UDP port of PORTS that nothing holds on [::1] now."""
    ports = list(PORTS)
    random.shuffle(ports)  # two runs at once rarely pick the same one
    for port in ports:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(("::1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free UDP port in {PORTS.start}-{PORTS.stop - 1} on [::1]")


def reissue_node_certificate(cluster_dir: Path, node_id: str) -> tuple[bytes, bytes]:
    """A new certificate and key for ``node_id`` from the cluster CA, with the names of its
    current certificate (those ``hypermesh cluster init`` gave it): docs/OPERATIONS.md,
    "Rotating certificates and keys"."""
    current = x509.load_pem_x509_certificate((cluster_dir / "nodes" / node_id / "tls.pem").read_bytes())
    names = current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return issue_certificate(
        (cluster_dir / "ca.pem").read_bytes(), (cluster_dir / "ca.key").read_bytes(), node_id,
        dns_names=[n for n in names.get_values_for_type(x509.DNSName) if n != node_id],
        ip_addresses=[str(ip) for ip in names.get_values_for_type(x509.IPAddress)],
    )


def install_atomically(path: Path, data: bytes, mode: int) -> None:
    """Write beside ``path``, then rename over it: a reader sees the old or the new file."""
    tmp = path.with_name(path.name + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _serial(pem: bytes) -> int:
    return x509.load_pem_x509_certificate(pem).serial_number


def _peer_certificate(client: StoqClient) -> x509.Certificate:
    """The certificate the server showed on the client's (one) connection."""
    protocol = client._slots[0]
    assert protocol is not None, "the client has no open connection"
    cert = getattr(protocol._quic.tls, "_peer_certificate", None)  # as transport/peers.py reads it
    assert cert is not None, "no server certificate on this connection (a resumed session shows none)"
    return cert


@pytest.fixture
def node(tmp_path: Path) -> Iterator[LocalCluster]:
    """One real validator (a one-node cluster) on [::1]; always stopped."""
    cluster = LocalCluster.prepare(tmp_path / "cluster", nodes=1, base_port=_free_port(), metrics_base_port=0,
                                   signing_scheme="Ed25519")
    cluster.start()
    try:
        asyncio.run(cluster.wait_healthy(timeout_s=120))
        yield cluster
    finally:
        cluster.stop()


def test_a_renewed_node_certificate_is_served_to_new_connections_without_a_restart(node: LocalCluster) -> None:
    manifest = node.manifest
    entry = manifest.node(NODE)
    node_dir = manifest.node_dir(NODE)
    factory = ProofFactory(manifest.validation_params())
    process = node.nodes[NODE].process
    assert process is not None

    def client() -> StoqClient:
        # No session ticket: every new StoqClient does a full handshake, so it sees the certificate.
        return StoqClient(entry.host, entry.port, ca_pem=manifest.ca_pem, server_name=entry.server_name,
                          timeout_s=30.0, retries=0)

    async def served_serial() -> int:
        """The serial of the certificate the node shows a new connection."""
        async with client() as fresh:
            await fresh.call("consensus/health")
            assert fresh.stats.connections_opened == 1 and fresh.stats.sessions_resumed == 0
            return _peer_certificate(fresh).serial_number

    async def validate() -> None:
        async with ClusterClient(manifest, timeout_s=60.0) as cluster_client:
            answer = await cluster_client.validate_proofs(factory.proofs())  # its certificate checked too
            assert answer["status"] == "Valid", answer

    async def logged(text: str) -> None:
        async def present() -> bool:
            return text in node.nodes[NODE].log_path.read_text(errors="replace")

        await wait_until(present, 30, f"{text!r} in the node's log")

    async def scenario() -> None:
        old_serial = _serial((node_dir / "tls.pem").read_bytes())
        await validate()
        assert await served_serial() == old_serial

        async with client() as long_lived:  # a connection opened before the rotation
            await long_lived.call("consensus/health")
            assert _peer_certificate(long_lived).serial_number == old_serial

            new_cert, new_key = reissue_node_certificate(manifest.directory, NODE)
            new_serial = _serial(new_cert)
            assert new_serial != old_serial

            # Half-way (the certificate renamed into place, the key not yet): the pair does
            # not match, so the node keeps serving the old one; new connections still work.
            install_atomically(node_dir / "tls.pem", new_cert, 0o644)
            assert await served_serial() == old_serial
            await logged(f"still using the certificate with serial {old_serial:x}")

            install_atomically(node_dir / "tls.key", new_key, 0o600)
            # Read at the next connection's first packet: no waiting, no signal, no restart.
            assert await served_serial() == new_serial
            await logged(f"reloaded the TLS certificate and key from {node_dir / 'tls.pem'}: serial {new_serial:x}")
            await validate()

            # A botched rotation (here the key missing, as in 'rm tls.key; cp ...') leaves
            # the pair in use: new connections are still served, not dropped.
            os.rename(node_dir / "tls.key", node_dir / "tls.key.aside")
            try:
                assert await served_serial() == new_serial
                await logged("No such file or directory")
            finally:
                os.rename(node_dir / "tls.key.aside", node_dir / "tls.key")
            assert await served_serial() == new_serial

            # The connection from before the rotation is the same one and still works.
            assert (await long_lived.call("consensus/health"))["status"] == "healthy"
            assert long_lived.stats.connections_opened == 1
            assert _peer_certificate(long_lived).serial_number == old_serial

        assert process.poll() is None, "the node restarted or exited"

    try:
        asyncio.run(scenario())
    except Exception as exc:
        raise AssertionError(f"{exc!r}\n--- {NODE} log ---\n{node.log_tail(NODE, 60)}") from exc

    # The audit rows of these calls (no client certificate: --client-auth none) name the
    # address each call came from.
    assert node.stop_node(NODE) == 0
    store = Store(node.nodes[NODE].data_dir / "node.db", background_checkpoints=False)
    try:
        rows = [row for row in store.recent_audit(100) if row[2] == "consensus/validate_proofs"]
    finally:
        store.close()
    assert len(rows) == 2 and all(re.fullmatch(r"\[::1\]:\d+", str(row[1])) for row in rows), rows
