"""Certificate-request checks for TrustChain: the PKCS#10 CSR and the issuance policy.

Pure and deterministic: the CSR signature check is the only costly step (it runs as its
own precheck part). Names are compared case-insensitively (DNS is case-insensitive);
IP addresses in their ``ipaddress`` normal form.
"""

from __future__ import annotations

import ipaddress
import re

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from consensus.proofs.params import ValidationParams
from consensus.proofs.reasons import Reason, reason
from consensus.requests import CertificateValidationRequest

_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def dns_name_problem(name: str) -> str | None:
    """None if ``name`` is a valid DNS name: RFC 1123 labels, <= 253 characters, no
    trailing dot, a last label that is not all digits, and ``*`` only as the whole
    left-most label with at least two labels after it."""
    if not name or len(name) > 253:
        return "must be 1..253 characters"
    labels = name.split(".")
    if labels[0] == "*":
        if len(labels) < 3:
            return "a wildcard needs at least two labels after it"
        labels = labels[1:]
    for label in labels:
        if "*" in label:
            return "'*' is only allowed as the whole left-most label"
        if not _LABEL.fullmatch(label):
            return f"label {label!r} is not an RFC 1123 label"
    if labels[-1].isdigit():
        return "the last label must not be all digits"
    return None


def normalize_name(name: str) -> tuple[str, str] | None:
    """('ip', canonical) or ('dns', lower-case), or None when neither is valid."""
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return None if dns_name_problem(name) else ("dns", name.lower())
    if getattr(address, "scope_id", None) is not None:
        return None  # 'fe80::1%eth0': a zone is local to one host, never a certificate name
    return ("ip", str(address))


def _name_reasons(name: str, where: str, params: ValidationParams) -> list[Reason]:
    norm = normalize_name(name)
    if norm is None:
        return [reason("csr.invalid_dns_name", f"{where} {name!r}: {dns_name_problem(name)}")]
    if norm[0] == "ip" and not params.allow_ip_sans:
        return [reason("policy.ip_not_allowed", f"{where} {name!r} is an IP address")]
    if norm[1].startswith("*.") and not params.allow_wildcards:
        return [reason("policy.wildcard_not_allowed", f"{where} {name!r} is a wildcard")]
    return []


def check_policy(request: CertificateValidationRequest, params: ValidationParams) -> list[Reason]:
    """Request fields only (cheap): names, validity, counts."""
    out: list[Reason] = []
    if request.validity_days < 1:
        out.append(reason("policy.validity_too_short", f"validity_days {request.validity_days} is below 1"))
    elif request.validity_days > params.max_validity_days:
        out.append(reason("policy.validity_too_long", f"validity_days {request.validity_days} exceeds {params.max_validity_days}"))
    if len(request.san_entries) > params.max_san_entries:
        out.append(reason("policy.too_many_san", f"{len(request.san_entries)} san_entries exceed {params.max_san_entries}"))
    out += _name_reasons(request.common_name, "common_name", params)
    seen: set[tuple[str, str]] = set()
    for i, name in enumerate(request.san_entries):
        out += _name_reasons(name, f"san_entries.{i}", params)
        norm = normalize_name(name)
        if norm is not None:
            if norm in seen:
                out.append(reason("csr.duplicate_san", f"san_entries.{i} {name!r} is listed twice"))
            seen.add(norm)
    cn = normalize_name(request.common_name)
    if params.require_cn_in_san and cn is not None and cn not in seen:
        out.append(reason("policy.cn_not_in_san", f"common_name {request.common_name!r} is not among san_entries"))
    return _dedupe(out)


def _dedupe(reasons: list[Reason]) -> list[Reason]:
    """One reason per code (the first), keeping order: enough to act on, bounded size."""
    seen: set[str] = set()
    return [r for r in reasons if not (r.code in seen or seen.add(r.code))]  # type: ignore[func-returns-value]


def _key_reasons(csr: x509.CertificateSigningRequest, params: ValidationParams) -> list[Reason]:
    try:
        key = csr.public_key()
    except Exception:  # unsupported algorithm or malformed key
        return [reason("csr.unsupported_key", "the CSR's public key algorithm is not supported")]
    if isinstance(key, rsa.RSAPublicKey):
        kind = "RSA"
    elif isinstance(key, ec.EllipticCurvePublicKey):
        kind = "EC"
    elif isinstance(key, ed25519.Ed25519PublicKey):
        kind = "Ed25519"
    elif isinstance(key, ed448.Ed448PublicKey):
        kind = "Ed448"
    else:
        kind = type(key).__name__
    if kind not in params.accepted_csr_key_types:
        return [reason("csr.unsupported_key", f"key type {kind} is not accepted")]
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < params.min_rsa_bits:
        return [reason("csr.weak_key", f"RSA key of {key.key_size} bits, {params.min_rsa_bits} required")]
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name not in params.accepted_ec_curves:
        return [reason("csr.unsupported_key", f"EC curve {key.curve.name} is not accepted")]
    return []


def check_csr(request: CertificateValidationRequest, params: ValidationParams) -> list[Reason]:
    """The CSR itself: parse, self-signature, key, CN and SANs against the request."""
    try:
        csr = x509.load_der_x509_csr(request.csr)
    except Exception:
        return [reason("csr.malformed", "csr is not a DER PKCS#10 certificate request")]
    out: list[Reason] = []
    try:
        if not csr.is_signature_valid:
            out.append(reason("csr.bad_signature", "the CSR's self-signature does not verify"))
    except Exception:
        out.append(reason("csr.bad_signature", "the CSR's signature algorithm is not supported"))
    out += _key_reasons(csr, params)
    try:
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        san_ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san_ext = None
    except Exception:
        return out + [reason("csr.malformed", "the CSR's subject or extensions cannot be parsed")]
    cn_values = [a.value for a in cns]
    if len(cn_values) != 1 or not isinstance(cn_values[0], str):
        out.append(reason("csr.name_mismatch", f"CSR subject has {len(cn_values)} CN attributes, expected exactly 1"))
    elif _key(cn_values[0]) != _key(request.common_name):
        out.append(reason("csr.name_mismatch", f"CSR subject CN {cn_values[0]!r} is not common_name {request.common_name!r}"))
    out += _san_reasons(san_ext, request)
    return out


def _key(name: str) -> tuple[str, str]:
    """Comparison key: the normal form, or the lower-cased raw text for invalid names
    (which are reported on their own; here they must still compare exactly)."""
    return normalize_name(name) or ("raw", name.lower())


def _san_reasons(san_ext: x509.SubjectAlternativeName | None, request: CertificateValidationRequest) -> list[Reason]:
    names: set[tuple[str, str]] = set()
    for general in san_ext or []:
        if isinstance(general, x509.DNSName):
            # A DNSName entry is only ever a DNS name: IP text in it matches no IP entry.
            key = _key(general.value)
            names.add(key if key[0] != "ip" else ("raw", general.value.lower()))
        elif isinstance(general, x509.IPAddress) and not isinstance(general.value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            names.add(("ip", str(general.value)))
        else:
            return [reason("csr.unsupported_san", f"CSR subjectAltName has a {type(general).__name__} entry")]
    wanted = {_key(name) for name in request.san_entries}
    if names != wanted:
        return [reason("csr.san_mismatch", f"the CSR's {len(names)} subjectAltName names differ from the {len(wanted)} in san_entries")]
    return []
