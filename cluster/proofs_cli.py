"""``hypermesh proofs`` — make proof sets and holder keys from the command line.

The lead wires ``add_commands(subparsers)`` into ``cluster/cli.py``; each registered
parser sets ``func`` (called as ``func(args) -> int``). ``python -m cluster.proofs_cli``
runs the same commands stand-alone.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import secrets
import time
from pathlib import Path
from typing import Any

import msgpack

from consensus.codec import DecodeError
from consensus.crypto import kem_scheme
from consensus.proofs.params import ValidationParams
from consensus.prover import FAULTS, HolderKeys, StorageCommitment, make_certificate_request, make_proof_set
from consensus.requests import REQUEST_ID_RE

from .cli import CliError, read_file, run_command, to_json

MAKE_EPILOG = """\
examples:
  # a valid proof set for consensus/validate_proofs, as JSON, sent with hypermesh call:
  hypermesh proofs make --request-id req-1 --manifest .cluster/manifest.json > p.json
  hypermesh call consensus/validate_proofs --payload-file p.json
  # a TrustChain certificate request, msgpack payload written to a file:
  hypermesh proofs make --kind certificate --request-id cert-7 --common-name api.example.com \\
      --san api.example.com --san www.example.com --manifest .cluster/manifest.json --out cert-7.msgpack
  # reuse one holder key (so the time chain continues) and break the space proof on purpose;
  # the cluster answers Invalid with reason space.bad_path:
  hypermesh proofs keygen --scheme ML-DSA-65 --out holder.json
  hypermesh proofs make --request-id req-2 --key holder.json --broken space:path \\
      --manifest .cluster/manifest.json --out req-2.msgpack
  hypermesh call consensus/validate_proofs --payload-file req-2.msgpack

JSON output writes bytes as "base64:<standard base64>" strings, the form that
`hypermesh call --payload`/`--payload-file` reads (and prints); --out writes msgpack.

The cluster's manifest is found as by the other commands: --cluster DIR, else
$HYPERMESH_CLUSTER, else .cluster when it holds one; --manifest FILE names the file itself
(JSON with a "validation" section, ValidationParams.to_json_dict(); a bare validation
object works too). With no manifest the defaults are used with a fresh cluster KEM key,
which no real cluster can open (its validators answer space.aead_failed): fine for trying
things, not for a cluster. With a manifest, --scheme (or --key) must be one of its
accepted stake schemes.

--broken PROOF[:HOW] builds a proof whose only defect is the one named; validators of the
cluster whose manifest is used must answer with the listed reason code (time:future when
sent within a minute, or within the cluster's max time offset if that is shorter). With no
manifest the space proof is sealed to a key no cluster holds, and a cluster answers
space.aead_failed as well, or instead:
""" + "\n".join(f"  {p + ':' + h:<18} -> {code}" for p, hows in FAULTS.items() for h, code in hows.items())

KEYGEN_EPILOG = """\
examples:
  hypermesh proofs keygen --out holder.json                 # FALCON-1024 (cluster default)
  hypermesh proofs keygen --scheme ML-DSA-87 --out holder.json

The file is JSON {"scheme", "public_key", "private_key"} with base64 keys. It holds a
private key: keep it private. The holder id (time chain key) is printed to stderr.
"""


def _b64(value: Any) -> Any:
    """Plain base64, for key files (``_load_holder`` reads them back)."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dict):
        return {k: _b64(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_b64(v) for v in value]
    return value


def _manifest_path(args: argparse.Namespace) -> str | None:
    """The manifest to build for: --manifest FILE, else that of --cluster DIR or
    $HYPERMESH_CLUSTER (a cluster was named: it must be there), else .cluster's if any.
    The same directories the other commands use, so proofs open on the cluster they call."""
    from .manifest import load_manifest

    if args.manifest is not None and args.cluster is not None:
        raise CliError("give --manifest FILE or --cluster DIR, not both")
    if args.manifest is not None:
        return args.manifest
    named = args.cluster or os.environ.get("HYPERMESH_CLUSTER")
    if named:
        return str(load_manifest(named).directory / "manifest.json")  # a ManifestError says what to do
    default = Path(".cluster") / "manifest.json"
    return str(default) if default.exists() else None


def _load_params(path: str | None) -> ValidationParams:
    if path is None:
        public, _private = kem_scheme("ML-KEM-1024").generate()
        print("warning: no cluster manifest (no --cluster, --manifest, $HYPERMESH_CLUSTER or .cluster); using "
              "default parameters and a fresh cluster KEM key (proofs sealed to it open on no real cluster)",
              file=sys.stderr)
        return ValidationParams(kem_public_key=public)
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict) and "validation" not in data and "kem_public_key" not in data:
        raise ValueError(f"{path} has no 'validation' section (ValidationParams.to_json_dict())")
    section = data.get("validation", data) if isinstance(data, dict) else data
    params = ValidationParams.from_json_dict(section)
    if not params.kem_public_key:
        raise CliError(f"--manifest {path}: validation.kem_public_key is empty")
    return params


def _load_holder(path: str | None, scheme: str) -> HolderKeys:
    if path is None:
        holder = HolderKeys.generate(scheme)
        print(f"warning: no --key given; made a one-off {scheme} holder {holder.holder_id.hex()}", file=sys.stderr)
        return holder
    try:
        data = json.loads(read_file(path, "--key"))
        return HolderKeys(data["scheme"], base64.b64decode(data["public_key"], validate=True),
                          base64.b64decode(data["private_key"], validate=True))
    except (ValueError, TypeError, KeyError) as exc:  # JSON, base64, a missing or mistyped field
        raise CliError(f"--key {path}: not a holder key file from 'hypermesh proofs keygen' ({exc!r})") from None


def _request_id(value: str) -> str:
    """``--request-id`` (an argparse type): the id the cluster would refuse is refused here."""
    if not REQUEST_ID_RE.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value!r}: must be 1..128 characters of [A-Za-z0-9._:-]")
    return value


def _parse_broken(value: str) -> tuple[str, str]:
    """``--broken PROOF[:HOW]`` (an argparse type: a bad value is a usage error)."""
    proof, _, how = value.partition(":")
    if proof not in FAULTS:
        raise argparse.ArgumentTypeError(f"unknown proof {proof!r}; choose from {', '.join(FAULTS)}")
    how = how or next(iter(FAULTS[proof]))
    if how not in FAULTS[proof]:
        raise argparse.ArgumentTypeError(f"{proof}: unknown variant {how!r}; choose from {', '.join(FAULTS[proof])}")
    return proof, how


def _check_scheme(scheme: str, params: ValidationParams, what: str) -> None:
    """A stake scheme the cluster does not accept only gets stake.unsupported_scheme back."""
    if scheme not in params.accepted_stake_schemes:
        raise CliError(f"{what}: the cluster accepts stake signatures in {', '.join(params.accepted_stake_schemes)} "
                       f"only, not {scheme} (use --broken stake:scheme to be refused on purpose)")


def cmd_make(args: argparse.Namespace) -> int:
    manifest = _manifest_path(args)
    try:
        params = _load_params(manifest)
    except (OSError, ValueError, DecodeError) as exc:
        raise CliError(f"cannot read the manifest {manifest}: {exc}") from None
    fault = args.broken
    if fault is not None and args.kind == "proofs" and fault[0] in ("csr", "policy"):
        raise CliError("csr/policy faults need --kind certificate")
    if fault is not None and manifest is None:
        print(f"warning: --broken without a cluster manifest: the space proof is sealed to a key no cluster holds, so "
              f"a cluster answers space.aead_failed as well as, or instead of, {FAULTS[fault[0]][fault[1]]}",
              file=sys.stderr)
    check_scheme = manifest is not None and fault != ("stake", "scheme")  # that fault picks its own scheme
    if check_scheme and args.key is None:
        _check_scheme(args.scheme, params, f"--scheme {args.scheme}")
    holder = _load_holder(args.key, args.scheme)
    if check_scheme and args.key is not None:
        _check_scheme(holder.scheme, params, f"--key {args.key} (scheme {holder.scheme})")
    now = args.timestamp_ms if args.timestamp_ms is not None else int(time.time() * 1000)
    request_id = args.request_id or f"req-{secrets.token_hex(8)}"
    storage = StorageCommitment.generate(max(args.storage_bytes or params.min_space_bytes, 2048) // 1024 * 1024, 1024)
    if args.kind == "certificate":
        if not args.common_name:
            raise CliError("--kind certificate needs --common-name")
        csr = _load_csr(args.csr) if args.csr else None
        payload = make_certificate_request(
            request_id, params, holder, now, common_name=args.common_name,
            san_entries=args.san if args.san else None, validity_days=args.validity_days,
            csr=csr, storage=storage, amount=args.amount, fault=fault)
    else:
        payload = make_proof_set(request_id, params, holder, now, storage=storage, amount=args.amount, fault=fault)
    endpoint = "consensus/validate_certificate" if args.kind == "certificate" else "consensus/validate_proofs"
    if args.out:
        Path(args.out).write_bytes(msgpack.packb(payload, use_bin_type=True))
        print(f"wrote {args.out}: msgpack payload for {endpoint}", file=sys.stderr)
    else:
        # The same "base64:..." form `hypermesh call --payload-file` reads.
        json.dump(to_json(payload), sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    return 0


def _load_csr(path: str) -> bytes:
    """A PKCS#10 CSR file, PEM or DER, as DER."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    raw = read_file(path, "--csr")
    try:
        if raw.lstrip().startswith(b"-----"):
            return x509.load_pem_x509_csr(raw).public_bytes(Encoding.DER)
        x509.load_der_x509_csr(raw)
        return raw
    except ValueError as exc:
        raise CliError(f"--csr {path}: not a PKCS#10 certificate request in PEM or DER ({exc})") from None


def cmd_keygen(args: argparse.Namespace) -> int:
    holder = HolderKeys.generate(args.scheme)
    data = {"scheme": holder.scheme, "public_key": _b64(holder.public_key), "private_key": _b64(holder.private_key)}
    Path(args.out).write_text(json.dumps(data, indent=2) + "\n")
    Path(args.out).chmod(0o600)
    print(f"wrote {args.out}: {holder.scheme} holder {holder.holder_id.hex()}", file=sys.stderr)
    return 0


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more (use --broken stake:amount for a stake below the minimum)")
    return value


def add_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Register ``proofs make`` and ``proofs keygen`` under an existing subparsers object."""
    proofs = subparsers.add_parser("proofs", help="make proof sets and holder keys",
                                   description="Make four-proof sets (work, stake, time, space) and holder keys.")
    sub = proofs.add_subparsers(dest="proofs_command", metavar="{make,keygen}", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    make = sub.add_parser("make", help="build a proofs or certificate request payload", epilog=MAKE_EPILOG,
                          formatter_class=fmt, description="Build a request payload a client sends to the cluster.")
    make.add_argument("--request-id", default=None, type=_request_id,
                      help="1..128 characters of [A-Za-z0-9._:-]; every proof is bound to it (default: a fresh req-<random>)")
    make.add_argument("--kind", choices=("proofs", "certificate"), default="proofs",
                      help="proofs -> consensus/validate_proofs; certificate -> consensus/validate_certificate "
                      "(default proofs)")
    make.add_argument("--cluster", metavar="DIR",
                      help="cluster directory whose manifest.json to build for (default: $HYPERMESH_CLUSTER, else "
                      ".cluster when it holds one)")
    make.add_argument("--manifest", "--params", dest="manifest", metavar="FILE",
                      help="cluster manifest JSON (its 'validation' section gives the KEM key, difficulty, minimums); "
                      "instead of --cluster")
    make.add_argument("--key", metavar="FILE", help="holder key from 'proofs keygen' (default: a one-off key)")
    make.add_argument("--scheme", default="FALCON-1024",
                      choices=("FALCON-1024", "ML-DSA-87", "ML-DSA-65", "ML-DSA-44", "Ed25519"),
                      help="stake signature scheme for a one-off key (default FALCON-1024); one the cluster's "
                      "manifest accepts")
    make.add_argument("--amount", type=_non_negative, help="stake amount (default: the cluster minimum)")
    make.add_argument("--timestamp-ms", type=int, help="time proof in Unix ms (default: now); must be within the "
                      "cluster's offset of consensus time and after this holder's last accepted one")
    make.add_argument("--storage-bytes", type=int, help="size of the storage commitment (default: the cluster minimum)")
    make.add_argument("--common-name", help="certificate: subject CN (also the CSR's CN)")
    make.add_argument("--san", action="append", metavar="NAME", help="certificate: a subjectAltName (DNS or IP); repeat (default: the CN)")
    make.add_argument("--validity-days", type=int, default=90, help="certificate: requested validity (default 90)")
    make.add_argument("--csr", metavar="FILE", help="certificate: use this PKCS#10 CSR (PEM or DER) instead of a fresh EC P-256 one")
    make.add_argument("--broken", type=_parse_broken, metavar="PROOF[:HOW]", help="deliberately break one proof (see the list below)")
    make.add_argument("--out", metavar="FILE",
                      help='write the msgpack payload here (default: JSON on stdout, bytes as "base64:..." strings)')
    make.set_defaults(func=cmd_make)

    keygen = sub.add_parser("keygen", help="make a holder (stake) key file", epilog=KEYGEN_EPILOG,
                            formatter_class=fmt, description="Make a holder key: its public key is the holder's identity.")
    keygen.add_argument("--scheme", default="FALCON-1024", choices=("FALCON-1024", "ML-DSA-87", "ML-DSA-65", "ML-DSA-44"),
                        help="signature scheme (default FALCON-1024)")
    keygen.add_argument("--out", required=True, metavar="FILE", help="where to write the key file (mode 0600)")
    keygen.set_defaults(func=cmd_keygen)
    return proofs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hypermesh")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
