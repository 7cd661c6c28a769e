"""The cluster manifest: who the validators are, where they listen, their public keys,
f, and the validation parameters. Nodes and clients load the same file.

Layout of a cluster directory made by ``hypermesh cluster init``::

    manifest.json          public: node ids, addresses, signing public keys, f, params
    ca.pem                 the cluster CA certificate (trust anchor for TLS)
    ca.key                 the CA private key: move it offline once nodes are issued
    nodes/<id>/tls.pem     node TLS certificate (server and client auth: mTLS between nodes)
    nodes/<id>/tls.key
    nodes/<id>/signing.json  the node's consensus signing key (secret)
    nodes/<id>/cluster-kem.json  the cluster ML-KEM-1024 private key (space proofs are sealed to it)
    client/tls.pem, client/tls.key   a client certificate for mutual-TLS deployments
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from consensus.keys import KeyRing, NodeKey

MANIFEST_FORMAT = 1


class ManifestError(ValueError):
    """The cluster directory or manifest is missing, unreadable or inconsistent."""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise ManifestError(f"{what}: expected base64 text")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise ManifestError(f"{what}: not valid base64 ({exc})") from None


def parse_endpoint(text: str, default_port: int | None = 9292) -> tuple[str, int]:
    """``host:port``, ``[v6]:port``, ``host`` or a bare IPv6 address -> (host, port).
    With ``default_port=None`` the port is required, and so are the brackets of an IPv6
    address: unbracketed, ``::1:9600`` is host ``::1:9600``, not port 9600 of ``::1``."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
        if default_port is None and ":" in text:
            raise ManifestError(_brackets_needed(text))
    if not host:
        raise ManifestError(f"endpoint {text!r}: missing host")
    if not port_text and default_port is None:
        raise ManifestError(f"endpoint {text!r}: give the port too, HOST:PORT (e.g. {format_endpoint(host, 9292)})")
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise ManifestError(f"endpoint {text!r}: port must be a number") from None
    if not 0 < port < 65536:
        raise ManifestError(f"endpoint {text!r}: port out of range")
    return host, port


def _brackets_needed(text: str) -> str:
    """The error for an unbracketed IPv6 address: the bracketed forms it may have meant."""
    host, _, port = text.rpartition(":")
    try:
        ipaddress.IPv6Address(host)
        guess = f"[{host}]:{port} (port {port} of {host}), or " if port.isdigit() else ""
    except ValueError:
        guess = ""
    return f"endpoint {text!r}: write an IPv6 address in brackets before the port: {guess}[{text}]:PORT"


def format_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class NodeEntry:
    node_id: str
    host: str
    port: int
    server_name: str
    signing_scheme: str
    signing_public_key: bytes

    @property
    def endpoint(self) -> str:
        return format_endpoint(self.host, self.port)


@dataclass(frozen=True, slots=True)
class Manifest:
    cluster_id: str
    nodes: tuple[NodeEntry, ...]
    validation: dict[str, Any]  # ValidationParams.to_json_dict()
    directory: Path

    @property
    def n(self) -> int:
        return len(self.nodes)

    @property
    def f(self) -> int:
        return (self.n - 1) // 3

    @property
    def ca_pem(self) -> bytes:
        return (self.directory / "ca.pem").read_bytes()

    def keyring(self) -> KeyRing:
        return KeyRing(tuple((n.node_id, n.signing_scheme, n.signing_public_key) for n in self.nodes))

    def node(self, node_id: str) -> NodeEntry:
        for entry in self.nodes:
            if entry.node_id == node_id:
                return entry
        known = ", ".join(n.node_id for n in self.nodes)
        raise ManifestError(f"node {node_id!r} is not in the manifest of cluster {self.cluster_id} (known: {known})")

    def node_dir(self, node_id: str) -> Path:
        return self.directory / "nodes" / node_id

    def validation_params(self):  # -> consensus.validation.ValidationParams
        from consensus.validation import ValidationParams

        return ValidationParams.from_json_dict(self.validation)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "cluster_id": self.cluster_id,
            "n": self.n,
            "f": self.f,
            "nodes": [
                {
                    "id": n.node_id,
                    "host": n.host,
                    "port": n.port,
                    "server_name": n.server_name,
                    "signing_scheme": n.signing_scheme,
                    "signing_public_key": b64(n.signing_public_key),
                }
                for n in self.nodes
            ],
            "validation": self.validation,
            "ca": "ca.pem",
        }


def load_manifest(directory: str | os.PathLike[str]) -> Manifest:
    directory = Path(directory)
    path = directory / "manifest.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(
            f"no cluster manifest at {path}; point at an existing cluster directory with --cluster DIR "
            f"(hypermesh also reads HYPERMESH_CLUSTER), or create one with 'hypermesh cluster init --out {directory}'"
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read the manifest ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{path}: unsupported manifest format {data.get('format') if isinstance(data, dict) else '?'}")
    nodes = []
    for i, raw in enumerate(data.get("nodes") or []):
        try:
            nodes.append(
                NodeEntry(
                    node_id=str(raw["id"]),
                    host=str(raw["host"]),
                    port=int(raw["port"]),
                    server_name=str(raw.get("server_name") or raw["id"]),
                    signing_scheme=str(raw["signing_scheme"]),
                    signing_public_key=unb64(raw["signing_public_key"], f"nodes[{i}].signing_public_key"),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"{path}: nodes[{i}] is malformed ({exc})") from None
    if not nodes:
        raise ManifestError(f"{path}: the manifest lists no nodes")
    if (len(nodes) - 1) % 3 != 0:
        raise ManifestError(f"{path}: {len(nodes)} nodes; a cluster has n = 3f+1 validators (1, 4, 7, ...)")
    if len({n.node_id for n in nodes}) != len(nodes):
        raise ManifestError(f"{path}: duplicate node ids")
    manifest = Manifest(str(data.get("cluster_id", "")), tuple(nodes), dict(data.get("validation") or {}), directory)
    if data.get("f") is not None and int(data["f"]) != manifest.f:
        raise ManifestError(f"{path}: f={data['f']} does not match n={manifest.n} (f must be (n-1)//3)")
    return manifest


def write_manifest(manifest: Manifest) -> None:
    path = manifest.directory / "manifest.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    os.replace(tmp, path)


def write_secret_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")


def write_secret_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read {what} ({exc})") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: {what} must be a JSON object")
    return data


def load_node_key(manifest: Manifest, node_id: str) -> NodeKey:
    path = manifest.node_dir(node_id) / "signing.json"
    data = _read_json(path, "the node signing key")
    entry = manifest.node(node_id)
    key = NodeKey(
        node_id=node_id,
        scheme=str(data["scheme"]),
        private_key=unb64(data["private_key"], f"{path}: private_key"),
        public_key=unb64(data["public_key"], f"{path}: public_key"),
    )
    if key.public_key != entry.signing_public_key or key.scheme != entry.signing_scheme:
        raise ManifestError(f"{path}: the signing key does not match the manifest entry for {node_id}")
    return key


def load_kem_private_key(manifest: Manifest, node_id: str) -> bytes:
    path = manifest.node_dir(node_id) / "cluster-kem.json"
    data = _read_json(path, "the cluster KEM key")
    return unb64(data["private_key"], f"{path}: private_key")
