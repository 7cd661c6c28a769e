"""``hypermesh cluster init``: every key, certificate and the manifest of a new cluster.

One run creates the cluster CA, a TLS certificate per node (usable as server and as
client certificate, so node-to-node connections are mutually authenticated), a
consensus signing key per node, the cluster ML-KEM-1024 key that space proofs are
sealed to, a client certificate, and the manifest that ties them together.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from consensus.codec import DecodeError
from consensus.crypto import kem_scheme
from consensus.keys import generate_node_key
from transport.tls import generate_ca, issue_certificate

from .manifest import (
    Manifest,
    ManifestError,
    NodeEntry,
    b64,
    parse_endpoint,
    write_manifest,
    write_secret_bytes,
    write_secret_json,
)

if TYPE_CHECKING:
    from consensus.validation import ValidationParams

DEFAULT_ADDRESS_TEMPLATE = "[::1]:{port}"


@dataclass(frozen=True, slots=True)
class InitOptions:
    nodes: int = 4
    address_template: str = DEFAULT_ADDRESS_TEMPLATE
    base_port: int = 9292
    signing_scheme: str = "ML-DSA-65"
    extra_dns: tuple[str, ...] = ("consensus",)
    force: bool = False
    validation_overrides: tuple[tuple[str, object], ...] = ()
    names: tuple[str, ...] = ()  # explicit node ids; default node-1..node-n


def node_id_for(index: int) -> str:
    return f"node-{index}"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _node_address(options: InitOptions, index: int) -> tuple[str, str, tuple[str, int]]:
    """(node id, address text, (host, port)) of node ``index`` from the address template."""
    node_id = options.names[index - 1] if options.names else node_id_for(index)
    try:
        address = options.address_template.format(i=index, port=options.base_port + index - 1, id=node_id)
    except (KeyError, IndexError, ValueError) as exc:
        raise ManifestError(
            f"--address-template {options.address_template!r}: {exc!r}; use the fields {{i}}, {{port}} and {{id}}"
        ) from None
    return node_id, address, parse_endpoint(address, options.base_port)


def _refuse_shared_addresses(template: str, addresses: Sequence[tuple[str, str, tuple[str, int]]]) -> None:
    """Two nodes at one host:port cannot both listen there, and peers would reach the
    wrong one: refuse the template before anything is written."""
    first: dict[tuple[str, int], str] = {}
    for node_id, address, (host, port) in addresses:
        # One host, however it is spelt: ::1 and 0::1 are one IP; DNS names ignore case.
        key = (ipaddress.ip_address(host).compressed if _is_ip(host) else host.lower(), port)
        if key in first:
            raise ManifestError(
                f"--address-template {template!r}: {first[key]} and {node_id} would both be at {address}; each node "
                "needs its own host:port: put {i} or {id} in the host, or {port} (base-port+i-1) as the port"
            )
        first[key] = node_id


def init_cluster(out: Path, options: InitOptions, progress: Callable[[str], None] = lambda _m: None) -> Manifest:
    out = Path(out)
    if options.nodes < 1:
        raise ManifestError("--nodes must be at least 1")
    if options.names and len(options.names) != options.nodes:
        raise ManifestError("give one name per node")
    if (options.nodes - 1) % 3 != 0:
        # Quorums of 2f+1 intersect in an honest node only when n = 3f+1.
        raise ManifestError(
            f"--nodes {options.nodes}: a cluster has n = 3f+1 validators (1, 4, 7, 10, ...); "
            f"{options.nodes} would tolerate no more faults than {3 * ((options.nodes - 1) // 3) + 1}"
        )
    # Everything that can be refused is checked before anything is written or replaced.
    addresses = [_node_address(options, index) for index in range(1, options.nodes + 1)]
    _refuse_shared_addresses(options.address_template, addresses)
    kem_public, kem_private = kem_scheme("ML-KEM-1024").generate()
    params = _validation_params(kem_public, options.validation_overrides)
    if (out / "manifest.json").exists():
        if not options.force:
            raise ManifestError(
                f"{out} already holds a cluster (manifest.json); keeping it. Use --force to replace every key."
            )
        for child in ("nodes", "client"):
            shutil.rmtree(out / child, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)

    cluster_id = f"hm-{secrets.token_hex(6)}"
    progress(f"cluster {cluster_id}: creating the cluster CA")
    ca_cert, ca_key = generate_ca(f"HyperMesh cluster CA {cluster_id}")
    (out / "ca.pem").write_bytes(ca_cert)
    write_secret_bytes(out / "ca.key", ca_key)

    progress("made the cluster ML-KEM-1024 key (space proofs are sealed to it)")

    entries: list[NodeEntry] = []
    for index in range(1, options.nodes + 1):
        node_id, address, (host, port) = addresses[index - 1]
        progress(f"{node_id}: {options.signing_scheme} signing key and TLS certificate for {address}")
        key = generate_node_key(node_id, options.signing_scheme)
        dns = [node_id, "localhost", *options.extra_dns]
        ips = ["::1", "127.0.0.1"]
        if _is_ip(host):
            ips.append(host)
        elif host not in dns:
            dns.append(host)
        cert, tls_key = issue_certificate(
            ca_cert, ca_key, node_id, dns_names=tuple(dict.fromkeys(dns)), ip_addresses=tuple(dict.fromkeys(ips))
        )
        node_dir = out / "nodes" / node_id
        node_dir.mkdir(parents=True, exist_ok=True)
        (node_dir / "tls.pem").write_bytes(cert)
        write_secret_bytes(node_dir / "tls.key", tls_key)
        write_secret_json(
            node_dir / "signing.json",
            {"node_id": node_id, "scheme": key.scheme, "public_key": b64(key.public_key), "private_key": b64(key.private_key)},
        )
        write_secret_json(
            node_dir / "cluster-kem.json",
            {"scheme": "ML-KEM-1024", "public_key": b64(kem_public), "private_key": b64(kem_private)},
        )
        entries.append(NodeEntry(node_id, host, port, node_id, key.scheme, key.public_key))

    progress("client certificate for mutual-TLS deployments")
    client_cert, client_key = issue_certificate(ca_cert, ca_key, "hypermesh-client", server=False, client=True)
    (out / "client").mkdir(exist_ok=True)
    (out / "client" / "tls.pem").write_bytes(client_cert)
    write_secret_bytes(out / "client" / "tls.key", client_key)

    manifest = Manifest(cluster_id, tuple(entries), params.to_json_dict(), out)
    write_manifest(manifest)
    progress(f"wrote {out / 'manifest.json'} (n={manifest.n}, f={manifest.f})")
    return manifest


def _validation_params(kem_public: bytes, overrides: Sequence[tuple[str, object]]) -> ValidationParams:
    """The default parameters with the cluster KEM key and the ``--param`` overrides;
    a bad override is a ManifestError."""
    from consensus.validation import ValidationParams  # late: keeps `--help` fast

    params = ValidationParams(kem_public_key=kem_public)
    if not overrides:
        return params
    wire = params.to_json_dict()
    wire.update(dict(overrides))
    try:
        return ValidationParams.from_json_dict(wire)
    except DecodeError as exc:
        raise ManifestError(f"--param: {exc.field}: {exc.message}") from None


def _param_value(name: str, text: str) -> object:
    """true/false -> bool, [..] -> JSON list, digits -> int, anything else stays a string."""
    text = text.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"--param {name}: not a JSON list ({exc.msg}); e.g. {name}='[\"a\", \"b\"]'") from None
    if text.lstrip("-").isdigit():
        return int(text)
    return text


def parse_overrides(items: Sequence[str]) -> tuple[tuple[str, object], ...]:
    """``--param min_stake=5000`` / ``allow_wildcards=false`` / ``accepted_ec_curves=["secp384r1"]``
    overrides of validation parameters."""
    parsed: list[tuple[str, object]] = []
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ManifestError(f"--param {item!r}: expected NAME=VALUE")
        parsed.append((name, _param_value(name, value)))
    return tuple(parsed)
