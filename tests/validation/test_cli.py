"""``hypermesh proofs make|keygen`` through ``cluster.proofs_cli.main`` (and one real
subprocess to show the module runs stand-alone)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from cluster.cli import from_json
from cluster.proofs_cli import main
from consensus.validation import ValidationState, execute, parse_request, precheck

from .conftest import NOW


@pytest.fixture()
def manifest(tmp_path, cluster) -> Path:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"cluster_id": "test", "validation": cluster.params.to_json_dict()}))
    return path


def _validate(cluster, kind, payload):
    request = parse_request(kind, payload)
    return execute(request, precheck(request, cluster.params, cluster.kem_private), ValidationState(), NOW, cluster.params)


def test_keygen_then_make_msgpack_is_valid(tmp_path, manifest, cluster):
    key = tmp_path / "holder.json"
    assert main(["proofs", "keygen", "--scheme", "ML-DSA-44", "--out", str(key)]) == 0
    assert json.loads(key.read_text())["scheme"] == "ML-DSA-44"
    assert key.stat().st_mode & 0o077 == 0
    out = tmp_path / "req.msgpack"
    rc = main(["proofs", "make", "--request-id", "cli-1", "--manifest", str(manifest), "--key", str(key),
               "--timestamp-ms", str(NOW), "--out", str(out)])
    assert rc == 0
    payload = msgpack.unpackb(out.read_bytes(), raw=False)
    assert _validate(cluster, "proofs", payload).status == "Valid"


def test_make_certificate_json_stdout(manifest, cluster, capsys):
    rc = main(["proofs", "make", "--kind", "certificate", "--request-id", "cli-2", "--common-name", "api.example.com",
               "--san", "api.example.com", "--san", "2001:db8::5", "--manifest", str(manifest),
               "--scheme", "ML-DSA-44", "--timestamp-ms", str(NOW)])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert data["san_entries"] == ["api.example.com", "2001:db8::5"]
    assert data["csr"].startswith("base64:")  # JSON carries bytes as "base64:..." (what `hypermesh call` reads)
    data = from_json(data)
    assert isinstance(data["csr"], bytes) and isinstance(data["proofs"]["stake"]["signature"], bytes)
    assert _validate(cluster, "certificate", data).status == "Valid"


def test_broken_flag(tmp_path, manifest, cluster):
    out = tmp_path / "bad.msgpack"
    assert main(["proofs", "make", "--request-id", "cli-3", "--manifest", str(manifest), "--scheme", "ML-DSA-44",
                 "--timestamp-ms", str(NOW), "--broken", "space:path", "--out", str(out)]) == 0
    outcome = _validate(cluster, "proofs", msgpack.unpackb(out.read_bytes(), raw=False))
    assert [r.code for r in outcome.reasons] == ["space.bad_path"]


def test_usage_errors(manifest, capsys):
    with pytest.raises(SystemExit):
        main(["proofs", "make", "--request-id", "x", "--manifest", str(manifest), "--broken", "nope"])
    assert main(["proofs", "make", "--kind", "certificate", "--request-id", "x", "--manifest", str(manifest)]) == 2
    assert "--common-name" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["proofs", "make", "--kind", "nonsense"])
    assert exit_info.value.code == 2


def test_request_id_defaults_to_a_fresh_one(manifest, tmp_path):
    import msgpack

    ids = set()
    for name in ("a", "b"):
        out = tmp_path / f"{name}.msgpack"
        assert main(["proofs", "make", "--manifest", str(manifest), "--scheme", "ML-DSA-44", "--out", str(out)]) == 0
        ids.add(msgpack.unpackb(out.read_bytes(), raw=False)["request_id"])
    assert len(ids) == 2 and all(i.startswith("req-") for i in ids)


def test_subprocess_without_manifest_warns_and_prints_json(tmp_path):
    # Run where no .cluster is (the checkout has one after 'dev.py up'), without HYPERMESH_CLUSTER.
    code = "import sys; from cluster.proofs_cli import main; sys.exit(main(sys.argv[1:]))"
    env = {k: v for k, v in os.environ.items() if k != "HYPERMESH_CLUSTER"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    proc = subprocess.run([sys.executable, "-c", code, "proofs", "make", "--request-id", "sub-1", "--scheme", "ML-DSA-44"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "fresh cluster KEM key" in proc.stderr
    assert json.loads(proc.stdout)["request_id"] == "sub-1"


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        main(["proofs", "make", "--help"])
    text = capsys.readouterr().out
    assert "examples:" in text and "space:path" in text and "space.bad_path" in text


def test_bad_files_are_named_not_tracebacks(manifest, tmp_path, capsys):
    not_a_key = tmp_path / "k.json"
    not_a_key.write_text('{"public_key": "AA=="}')
    cases = [
        (["--key", str(tmp_path / "missing.json")], "--key"),
        (["--key", str(not_a_key)], "not a holder key file"),
        (["--kind", "certificate", "--common-name", "a.example", "--csr", str(tmp_path / "missing.csr")], "--csr"),
        (["--kind", "certificate", "--common-name", "a.example", "--csr", str(not_a_key)], "not a PKCS#10"),
    ]
    for argv, says in cases:
        assert main(["proofs", "make", "--manifest", str(manifest), "--scheme", "ML-DSA-44", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert "hypermesh: " in err and says in err and "Traceback" not in err, err
    assert main(["proofs", "keygen", "--out", str(tmp_path / "no-such-dir" / "k.json")]) == 2
    assert "no-such-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["proofs", "make", "--manifest", str(manifest), "--amount", "-5"])
    assert exit_info.value.code == 2 and "stake:amount" in capsys.readouterr().err
