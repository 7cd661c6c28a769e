"""``hypermesh cluster init`` and the manifest: what nodes and clients load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from cluster.bootstrap import InitOptions, init_cluster
from cluster.cli import from_json, main, to_json
from cluster.manifest import ManifestError, load_kem_private_key, load_manifest, load_node_key, parse_endpoint
from consensus.crypto import kem_scheme
from transport.tls import verify_client_chain


def test_init_writes_a_consistent_cluster(tmp_path: Path) -> None:
    manifest = init_cluster(tmp_path / "c", InitOptions(nodes=4, base_port=9300, signing_scheme="Ed25519"))
    loaded = load_manifest(tmp_path / "c")
    assert loaded.cluster_id == manifest.cluster_id and loaded.n == 4 and loaded.f == 1
    assert [n.endpoint for n in loaded.nodes] == [f"[::1]:{9300 + i}" for i in range(4)]
    keyring = loaded.keyring()
    for entry in loaded.nodes:
        key = load_node_key(loaded, entry.node_id)
        assert keyring.verify(entry.node_id, b"m", key.sign(b"m"))
        assert not keyring.verify(entry.node_id, b"other", key.sign(b"m"))
        # Node TLS certificates chain to the cluster CA and name the node.
        cert = x509.load_pem_x509_certificate((loaded.node_dir(entry.node_id) / "tls.pem").read_bytes())
        assert verify_client_chain(cert.public_bytes(Encoding.DER), [], loaded.ca_pem) == entry.node_id
    # Every node holds the same cluster KEM key, matching the public key in the params.
    ciphertext, shared = kem_scheme().encapsulate(loaded.validation_params().kem_public_key)
    for entry in loaded.nodes:
        assert kem_scheme().decapsulate(load_kem_private_key(loaded, entry.node_id), ciphertext) == shared
    assert (tmp_path / "c" / "nodes" / "node-1" / "signing.json").stat().st_mode & 0o077 == 0


def test_init_refuses_to_overwrite_and_refuses_sizes_that_are_not_3f_plus_1(tmp_path: Path) -> None:
    init_cluster(tmp_path / "c", InitOptions(nodes=1))
    with pytest.raises(ManifestError, match="--force"):
        init_cluster(tmp_path / "c", InitOptions(nodes=1))
    first = load_manifest(tmp_path / "c").cluster_id
    init_cluster(tmp_path / "c", InitOptions(nodes=4, force=True))
    assert load_manifest(tmp_path / "c").cluster_id != first
    for bad in (2, 3, 5, 6):
        with pytest.raises(ManifestError, match="3f\\+1"):
            init_cluster(tmp_path / f"bad{bad}", InitOptions(nodes=bad))


def test_manifest_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="hypermesh cluster init"):
        load_manifest(tmp_path / "nowhere")
    init_cluster(tmp_path / "c", InitOptions(nodes=4))
    path = tmp_path / "c" / "manifest.json"
    data = json.loads(path.read_text())
    data["nodes"] = data["nodes"][:3]
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="3f\\+1"):
        load_manifest(tmp_path / "c")
    data["nodes"][0]["signing_public_key"] = "%%%"
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="base64"):
        load_manifest(tmp_path / "c")


def test_endpoints_parse_in_every_spelling() -> None:
    assert parse_endpoint("[::1]:9300") == ("::1", 9300)
    assert parse_endpoint("::1") == ("::1", 9292)
    assert parse_endpoint("node-1:9292") == ("node-1", 9292)
    assert parse_endpoint("consensus") == ("consensus", 9292)
    for bad in ("[::1]:x", "node:70000", ":9292"):
        with pytest.raises(ManifestError):
            parse_endpoint(bad)


def test_json_bytes_convention_roundtrips() -> None:
    value = {"a": b"\x00\xff", "b": [b"x", 1, "text"], "c": {"d": None}}
    assert from_json(json.loads(json.dumps(to_json(value)))) == value


def test_cli_init_and_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cluster", "init", "--nodes", "4", "--out", str(tmp_path / "c"), "--signing-scheme", "Ed25519"]) == 0
    out = capsys.readouterr().out
    assert "tolerates f=1" in out and "node-4" in out
    assert main(["cluster", "init", "--nodes", "4", "--out", str(tmp_path / "c")]) == 2
    assert "--force" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["cluster", "init", "--nodes", "4", "--out", str(tmp_path / "x"), "--signing-scheme", "RSA"])


def test_cli_init_params_take_booleans_lists_and_integers(tmp_path: Path) -> None:
    out = tmp_path / "c"
    assert main(["cluster", "init", "--nodes", "1", "--out", str(out), "--signing-scheme", "Ed25519",
                 "--param", "allow_wildcards=false", "--param", "allow_ip_sans=True",
                 "--param", 'accepted_ec_curves=["secp384r1"]', "--param", "min_stake=5000"]) == 0
    params = load_manifest(out).validation_params()
    assert params.allow_wildcards is False and params.allow_ip_sans is True
    assert params.accepted_ec_curves == ("secp384r1",) and params.min_stake == 5000


@pytest.mark.parametrize("param", ["allow_wildcards=maybe", "no_such_param=1", "accepted_ec_curves=[1]",
                                   "accepted_ec_curves=[oops", "min_stake=-5"])
def test_cli_init_refuses_a_bad_param_before_writing_anything(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], param: str) -> None:
    out = tmp_path / "c"
    assert main(["cluster", "init", "--nodes", "1", "--out", str(out), "--param", param]) == 2
    assert "--param" in capsys.readouterr().err
    assert not out.exists()


def test_cli_init_force_with_a_bad_param_keeps_the_existing_cluster(tmp_path: Path) -> None:
    out = tmp_path / "c"
    first = init_cluster(out, InitOptions(nodes=1, signing_scheme="Ed25519"))
    argv = ["cluster", "init", "--nodes", "1", "--out", str(out), "--force", "--param", "allow_wildcards=maybe"]
    assert main(argv) == 2
    assert load_manifest(out).cluster_id == first.cluster_id
    load_node_key(load_manifest(out), "node-1")  # the node keys are still there


@pytest.mark.parametrize("argv, says", [
    (["--address-template", "node-{x}:9292"], "{i}, {port} and {id}"),
    (["--base-port", "70000"], "port out of range"),
])
def test_cli_init_refuses_a_bad_address_before_writing_anything(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], says: str) -> None:
    out = tmp_path / "c"
    assert main(["cluster", "init", "--nodes", "4", "--out", str(out), *argv]) == 2
    assert says in capsys.readouterr().err
    assert not out.exists()


def test_extra_dns_keeps_the_shared_name_clients_check(tmp_path: Path) -> None:
    """Clients given --endpoint check the name 'consensus' (cluster/client.py)."""
    assert main(["cluster", "init", "--nodes", "1", "--out", str(tmp_path / "c"), "--signing-scheme", "Ed25519",
                 "--extra-dns", "validators.example"]) == 0
    cert = x509.load_pem_x509_certificate((tmp_path / "c" / "nodes" / "node-1" / "tls.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert "consensus" in names and "validators.example" in names
