"""TLS material of a consortium: one CA, one SuperLink server certificate, checked before use.

The operator is the consortium's certificate authority: members are given ``ca.pem`` (never a
key) and pin it with ``flower-supernode --root-certificates``, so a SuperNode only talks to a
SuperLink whose certificate this CA signed. The server certificate names every address the
SuperLink is reached at (``subjectAltName``: TLS clients check it, not the common name), which
on one machine is ``127.0.0.1`` and ``localhost``. Keys are EC P-384 (what Flower's node
authentication also uses) and written owner-only; nothing here prints private material.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("127.0.0.1", "localhost")


class TLSError(ValueError):
    """TLS material is missing, unreadable or does not fit; the message says what to fix."""


@dataclass(frozen=True)
class TLSPaths:
    """Where the operator's TLS files live (``DIR/tls``)."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` owner-only (0600) from the start: a key is never world-readable, not even briefly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(hosts: tuple[str, ...] | list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_ca(name: str, days: int = 3650) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA that may sign server certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} consortium CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: tuple[str, ...] | list[str], days: int = 825
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A server certificate for ``hosts`` (IP addresses and DNS names, all in the SAN)."""
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def create_tls(root: Path, name: str, hosts: tuple[str, ...] | list[str] = DEFAULT_HOSTS) -> TLSPaths:
    """Write a fresh CA and server certificate under ``root``; refuses to replace existing files
    (members pin this CA: a new one would lock every member out until they fetch it again)."""
    paths = TLSPaths(Path(root))
    existing = [p for p in (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key) if p.exists()]
    if existing:
        raise TLSError(f"{existing[0]} already exists; refusing to replace the consortium's TLS material")
    ca_key, ca_cert = make_ca(name)
    key, cert = make_server_cert(ca_key, ca_cert, list(hosts))
    write_private(paths.ca_key, _pem_key(ca_key))
    write_private(paths.server_key, _pem_key(key))
    paths.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return paths


def load_cert(path: Path, what: str) -> x509.Certificate:
    """Read one PEM certificate; a missing or garbled file is a :class:`TLSError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise TLSError(f"{what} {path} does not exist")
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as err:
        raise TLSError(f"{what} {path} is not a PEM certificate: {err}") from None


def check_server_tls(paths: TLSPaths, host: str) -> None:
    """Refuse to start a SuperLink whose TLS files would fail every client: missing files, a key
    that is not the certificate's, an expired certificate, or one that does not name ``host``."""
    ca = load_cert(paths.ca_cert, "CA certificate")
    cert = load_cert(paths.server_cert, "server certificate")
    if not paths.server_key.is_file():
        raise TLSError(f"server key {paths.server_key} does not exist")
    try:
        key = serialization.load_pem_private_key(paths.server_key.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise TLSError(f"server key {paths.server_key} is not an unencrypted PEM private key ({err})") from None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if key.public_key().public_bytes(enc, pub) != cert.public_key().public_bytes(enc, pub):
        raise TLSError(f"server key {paths.server_key} does not belong to {paths.server_cert}")
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise TLSError(f"{paths.server_cert} is valid {cert.not_valid_before_utc} .. {cert.not_valid_after_utc} only")
    if cert.issuer != ca.subject:
        raise TLSError(f"{paths.server_cert} was not issued by {paths.ca_cert}")
    if host not in cert_hosts(cert):
        raise TLSError(
            f"{paths.server_cert} is for {cert_hosts(cert)}, not {host!r}: clients would refuse it "
            "(make a new one with kyodo-coordinator init --host)"
        )


def cert_hosts(cert: x509.Certificate) -> list[str]:
    """The names a certificate is valid for (its subjectAltName entries)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in san.get_values_for_type(x509.IPAddress)] + san.get_values_for_type(x509.DNSName)
