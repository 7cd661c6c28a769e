"""Cluster PKI (ECDSA P-256) and the TLS material a STOQ endpoint loads.

aioquic verifies server certificates itself on the client side; client certificates
are verified here (``verify_client_chain``) because aioquic's server does not.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

ClientAuth = Literal["none", "optional", "required"]

log = logging.getLogger("hypermesh.tls")


class CertificateError(Exception):
    """A peer certificate that does not chain to the cluster CA (or is missing)."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def generate_ca(common_name: str, *, days: int = 3650) -> tuple[bytes, bytes]:
    """A self-signed cluster CA. Returns (cert_pem, key_pem)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def issue_certificate(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    common_name: str,
    *,
    dns_names: Iterable[str] = (),
    ip_addresses: Iterable[str] = (),
    server: bool = True,
    client: bool = True,
    days: int = 825,
) -> tuple[bytes, bytes]:
    """A leaf certificate signed by the CA. Returns (cert_pem, key_pem).

    The common name is the identity a peer is known by (e.g. the node id); it is also
    added as a DNS name so it can serve as the TLS server_name."""
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for dns in dict.fromkeys([common_name, *dns_names]):
        names.append(x509.DNSName(dns))
    for ip in ip_addresses:
        names.append(x509.IPAddress(ipaddress.ip_address(ip)))
    usages = []
    if server:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    if client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    if not usages:
        raise ValueError("a certificate needs server or client usage")
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False  # type: ignore[arg-type]
        )
    )
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _common_name(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        raise CertificateError("client certificate has no common name")
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode()


def verify_client_chain(leaf_der: bytes, intermediates: list[bytes], ca_pem: bytes) -> str:
    """Verify a client certificate chain against the CA; return the leaf's common name.

    Raises CertificateError with the reason when the chain does not verify."""
    try:
        leaf = x509.load_der_x509_certificate(leaf_der)
        extra = [x509.load_der_x509_certificate(der) for der in intermediates]
        roots = x509.load_pem_x509_certificates(ca_pem)
    except ValueError as exc:
        raise CertificateError(f"unparseable certificate: {exc}") from None
    verifier = PolicyBuilder().store(Store(roots)).time(_now()).build_client_verifier()
    try:
        verifier.verify(leaf, extra)
    except VerificationError as exc:
        raise CertificateError(f"client certificate does not chain to the cluster CA: {exc}") from None
    return _common_name(leaf)


@dataclass(slots=True)
class TlsConfig:
    """TLS material of one endpoint, read from files so it can be rotated on disk.

    ``ca_pem`` is the cluster CA: it verifies servers we dial and client/peer
    certificates presented to us. ``client_auth`` applies to the client API ALPN; the
    peer ALPN always requires a verified client certificate."""

    cert_file: str | Path
    key_file: str | Path
    ca_pem: bytes | None = None
    client_auth: ClientAuth = "none"
    _loaded: tuple[float, float, x509.Certificate, list[x509.Certificate], object] | None = field(
        default=None, repr=False
    )
    _unusable: tuple[int | None, int | None] | None = field(default=None, repr=False)  # files' mtimes last refused

    def load(self) -> tuple[x509.Certificate, list[x509.Certificate], object]:
        """(leaf, chain, private key), re-read when either file's mtime changed.

        Once a pair is loaded, files that cannot be used (missing, unreadable, not PEM,
        or a key that does not match the certificate) leave the previous pair in use:
        that is the state between the two renames of a rotation, and a botched rotation
        must not cut the node off from new clients and peers. It is logged once per
        state of the files, and the files are looked at again on the next connection."""
        cert_m: int | None = None
        key_m: int | None = None
        try:
            cert_m = os.stat(self.cert_file).st_mtime_ns
            key_m = os.stat(self.key_file).st_mtime_ns
            if self._loaded is not None and self._loaded[0] == cert_m and self._loaded[1] == key_m:
                return self._loaded[2], self._loaded[3], self._loaded[4]
            certs = x509.load_pem_x509_certificates(Path(self.cert_file).read_bytes())
            key = serialization.load_pem_private_key(Path(self.key_file).read_bytes(), password=None)
            if certs[0].public_key() != key.public_key():  # type: ignore[union-attr]
                raise ValueError(f"{self.key_file} does not match the certificate in {self.cert_file}")
        except (OSError, ValueError) as exc:
            if self._loaded is None:
                raise
            if self._unusable != (cert_m, key_m):
                self._unusable = (cert_m, key_m)
                log.warning("TLS files changed but cannot be used (%s); still using the certificate "
                            "with serial %x until both files are readable and match", exc,
                            self._loaded[2].serial_number)
            return self._loaded[2], self._loaded[3], self._loaded[4]
        if self._loaded is not None:
            log.info("reloaded the TLS certificate and key from %s: serial %x, valid until %s", self.cert_file,
                     certs[0].serial_number, certs[0].not_valid_after_utc.isoformat())
        self._loaded = (cert_m, key_m, certs[0], certs[1:], key)
        self._unusable = None
        return self._loaded[2], self._loaded[3], self._loaded[4]

    def reload(self) -> None:
        """Forget the cached material; the next connection reads the files again."""
        self._loaded = None


def write_pem_files(directory: str | Path, name: str, cert_pem: bytes, key_pem: bytes) -> tuple[Path, Path]:
    """Write ``name.crt``/``name.key`` (key mode 0600); returns both paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert_pem)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key_pem)
    return cert_path, key_path
