"""Certificate requests: the CSR and the issuance policy."""

from __future__ import annotations

import dataclasses

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from consensus.csr import dns_name_problem, normalize_name
from consensus.prover import make_certificate_request, make_csr
from consensus.validation import ValidationState, execute, parse_request, precheck

from .conftest import NOW


def codes(cluster, holder, params=None, **kw):
    params = params or cluster.params
    payload = make_certificate_request("cert-x", params, holder, NOW, storage=cluster.storage, **kw)
    request = parse_request("certificate", payload)
    out = execute(request, precheck(request, params, cluster.kem_private), ValidationState(), NOW, params)
    return [r.code for r in out.reasons]


@pytest.mark.parametrize("name", ["example.com", "a.b-c.example", "xn--bcher-kva.example", "*.example.com",
                                  "localhost", "A.EXAMPLE.COM", "a" * 63 + ".com", "1a.example"])
def test_valid_dns_names(name):
    assert dns_name_problem(name) is None


@pytest.mark.parametrize(("name", "words"), [
    ("", "1..253"), ("a" * 254, "1..253"), ("-a.example", "RFC 1123"), ("a-.example", "RFC 1123"),
    ("a..example", "RFC 1123"), ("under_score.example", "RFC 1123"), ("example.com.", "RFC 1123"),
    ("a" * 64 + ".com", "RFC 1123"), ("*.*.example.com", "left-most"), ("a.*.example.com", "left-most"),
    ("*a.example.com", "left-most"), ("*.com", "two labels"), ("*", "two labels"), ("1.2.3.999", "all digits"),
    ("ex ample.com", "RFC 1123"),
])
def test_invalid_dns_names(name, words):
    problem = dns_name_problem(name)
    assert problem is not None and words in problem


def test_name_normalization():
    assert normalize_name("2001:DB8::0:1") == ("ip", "2001:db8::1")
    assert normalize_name("10.0.0.1") == ("ip", "10.0.0.1")
    assert normalize_name("Api.Example.COM") == ("dns", "api.example.com")
    assert normalize_name("010.0.0.1") is None  # leading zeros are ambiguous, not an IP nor a DNS name


def test_valid_with_ip_and_wildcard(cluster, mldsa):
    assert codes(cluster, mldsa, common_name="*.example.com", san_entries=["*.example.com", "example.com", "192.0.2.7"]) == []


def test_case_insensitive_match_between_csr_and_request(cluster, mldsa):
    csr, _ = make_csr("API.example.com", ["API.example.com"])
    assert codes(cluster, mldsa, common_name="api.example.com", san_entries=["api.EXAMPLE.com"], csr=csr) == []


def test_bad_signature(cluster, mldsa):
    assert codes(cluster, mldsa, common_name="a.example.com", fault=("csr", "signature")) == ["csr.bad_signature"]


def test_cn_mismatch(cluster, mldsa):
    assert codes(cluster, mldsa, common_name="a.example.com", csr_common_name="b.example.com") == ["csr.name_mismatch"]


def test_csr_without_cn(cluster, mldsa):
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "No CN Inc")]))
           .add_extension(x509.SubjectAlternativeName([x509.DNSName("a.example.com")]), critical=False)
           .sign(key, hashes.SHA256()).public_bytes(Encoding.DER))
    assert codes(cluster, mldsa, common_name="a.example.com", csr=csr) == ["csr.name_mismatch"]


def test_bad_dns_name(cluster, mldsa):
    assert codes(cluster, mldsa, common_name="bad_name.example.com") == ["csr.invalid_dns_name"]


@pytest.mark.parametrize("name", ["*.*.example.com", "a.*.example.com", "*x.example.com", "*.com"])
def test_wildcard_misuse(cluster, mldsa, name):
    assert codes(cluster, mldsa, common_name="ok.example.com", san_entries=["ok.example.com", name]) == ["csr.invalid_dns_name"]


def test_san_mismatch_and_unsupported_san(cluster, mldsa):
    assert codes(cluster, mldsa, common_name="a.example.com", csr_san_entries=["a.example.com", "b.example.com"]) == ["csr.san_mismatch"]
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a.example.com")]))
           .add_extension(x509.SubjectAlternativeName([x509.DNSName("a.example.com"), x509.RFC822Name("x@example.com")]), critical=False)
           .sign(key, hashes.SHA256()).public_bytes(Encoding.DER))
    assert codes(cluster, mldsa, common_name="a.example.com", csr=csr) == ["csr.unsupported_san"]


def test_validity_limits(cluster, mldsa):
    assert codes(cluster, mldsa, common_name="a.example.com", validity_days=399) == ["policy.validity_too_long"]
    assert codes(cluster, mldsa, common_name="a.example.com", validity_days=398) == []
    assert codes(cluster, mldsa, common_name="a.example.com", validity_days=0) == ["policy.validity_too_short"]


def test_san_count_duplicates_and_cn_presence(cluster, mldsa):
    many = [f"h{i}.example.com" for i in range(101)]
    assert codes(cluster, mldsa, common_name="h0.example.com", san_entries=many) == ["policy.too_many_san"]
    assert codes(cluster, mldsa, common_name="a.example.com", san_entries=["a.example.com", "A.example.com"],
                 csr_san_entries=["a.example.com"]) == ["csr.duplicate_san"]
    assert codes(cluster, mldsa, common_name="a.example.com", san_entries=["b.example.com"]) == ["policy.cn_not_in_san"]


def test_policy_switches(cluster, mldsa):
    strict = dataclasses.replace(cluster.params, allow_wildcards=False, allow_ip_sans=False)
    assert codes(cluster, mldsa, params=strict, common_name="*.example.com") == ["policy.wildcard_not_allowed"]
    assert codes(cluster, mldsa, params=strict, common_name="a.example.com",
                 san_entries=["a.example.com", "::1"]) == ["policy.ip_not_allowed"]


def test_key_checks(cluster, mldsa):
    weak, _ = make_csr("a.example.com", ["a.example.com"], rsa.generate_private_key(65537, 1024))
    assert codes(cluster, mldsa, common_name="a.example.com", csr=weak) == ["csr.weak_key"]
    k1, _ = make_csr("a.example.com", ["a.example.com"], ec.generate_private_key(ec.SECP256K1()))
    assert codes(cluster, mldsa, common_name="a.example.com", csr=k1) == ["csr.unsupported_key"]
    ed, _ = make_csr("a.example.com", ["a.example.com"], ed25519.Ed25519PrivateKey.generate())
    assert codes(cluster, mldsa, common_name="a.example.com", csr=ed) == []
    no_ed = dataclasses.replace(cluster.params, accepted_csr_key_types=("RSA", "EC"))
    assert codes(cluster, mldsa, params=no_ed, common_name="a.example.com", csr=ed) == ["csr.unsupported_key"]


def test_malformed_csr(cluster, mldsa):
    assert codes(cluster, mldsa, common_name="a.example.com", csr=b"\x30\x03\x02\x01\x00") == ["csr.malformed"]


def test_scoped_ipv6_is_no_certificate_name(cluster, mldsa):
    """'fe80::1%zone' parses as an IP in Python, but a zone is local to one host."""
    assert normalize_name("fe80::1%eth0") is None
    assert normalize_name("::1%evil.example.com") is None
    assert "csr.invalid_dns_name" in codes(cluster, mldsa, common_name="ok.example.com",
                                           san_entries=["ok.example.com", "fe80::1%eth0"])


def test_ip_text_in_a_dns_name_entry_does_not_match_an_ip_entry(cluster, mldsa):
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a.example.com")]))
           .add_extension(x509.SubjectAlternativeName([x509.DNSName("a.example.com"), x509.DNSName("192.0.2.7")]),
                          critical=False)
           .sign(key, hashes.SHA256()).public_bytes(Encoding.DER))
    assert codes(cluster, mldsa, common_name="a.example.com", san_entries=["a.example.com", "192.0.2.7"],
                 csr=csr) == ["csr.san_mismatch"]
