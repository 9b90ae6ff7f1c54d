"""Development certificates: a CA, a server certificate and client certificates, as PEM files.

    paths = write_dev_certs(Path("certs"), clients=["scorer", "admin"])
    # certs/ca.pem, certs/server.pem + server-key.pem, certs/scorer.pem + scorer-key.pem, ...

Keys are ECDSA P-256 (quick to make, accepted by every gRPC TLS stack). Each client certificate carries the
identity twice: as a URI SAN `spiffe://tensorgate.local/NAME`, which tensorgate's identity prefers, and as the
subject CN. These are for development and tests; production certificates come from your own PKI.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TRUST_DOMAIN = "tensorgate.local"
SERVER_NAMES = ("localhost", "127.0.0.1", "::1")
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate and its private key, both as PEM bytes."""

    cert: bytes
    key: bytes
    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey

    def write(self, cert_path: Path, key_path: Path) -> None:
        """Write both files; the key is readable by its owner only."""
        cert_path.write_bytes(self.cert)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.key)


def _issued(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Issued:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), key_pem, cert, key)


def _validity(days: float, not_before: dt.datetime | None) -> tuple[dt.datetime, dt.datetime]:
    start = not_before or (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5))  # tolerate small clock skew
    return start, start + dt.timedelta(days=days)


def make_ca(common_name: str = "tensorgate dev CA", *, days: float = 3650) -> Issued:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start, end = _validity(days, None)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _issued(cert, key)


def make_leaf(
    ca: Issued,
    *,
    common_name: str | None,
    dns: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
    uris: tuple[str, ...] = (),
    server: bool = False,
    days: float = 825,
    not_before: dt.datetime | None = None,
) -> Issued:
    """A certificate signed by `ca` for a server (serverAuth) or a client (clientAuth).

    `not_before` and `days` let tests make certificates that are already expired.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else [])
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    sans += [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    start, end = _validity(days, not_before)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.private_key.public_key()), critical=False)
    )
    if sans:
        # RFC 5280: with an empty subject the SAN extension must be critical.
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=not common_name)
    return _issued(builder.sign(ca.private_key, hashes.SHA256()), key)


def make_server_cert(ca: Issued, *, names: tuple[str, ...] = SERVER_NAMES, days: float = 825) -> Issued:
    """A server certificate for `names` (host names become DNS SANs, addresses IP SANs)."""
    dns, ips = [], []
    for n in names:
        try:
            ipaddress.ip_address(n)
        except ValueError:
            dns.append(n)
        else:
            ips.append(n)
    return make_leaf(ca, common_name=names[0], dns=tuple(dns), ips=tuple(ips), server=True, days=days)


def spiffe_id(name: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/{name}"


def make_client_cert(ca: Issued, name: str, *, days: float = 825, not_before: dt.datetime | None = None) -> Issued:
    """A client certificate whose identity is `spiffe://tensorgate.local/NAME` (URI SAN), with CN NAME."""
    return make_leaf(ca, common_name=name, uris=(spiffe_id(name),), days=days, not_before=not_before)


def check_client_name(name: str) -> str:
    """Client names become file names: letters, digits, '.', '_' and '-', not starting with a punctuation mark."""
    if not _CLIENT_NAME.fullmatch(name) or name in ("ca", "server") or name.endswith("-key"):
        raise ValueError(
            f"client name {name!r} must match {_CLIENT_NAME.pattern} and not be 'ca', 'server' or end in '-key'"
        )
    return name


def write_dev_certs(directory: Path, clients: list[str] | tuple[str, ...] = ()) -> list[Path]:
    """Create the CA, server and client files in `directory`; return the paths written.

    Files that exist are kept, so clients can be added later: an existing `ca.pem` + `ca-key.pem` signs the
    new certificates.
    """
    for name in clients:
        check_client_name(name)
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = directory / "ca.pem", directory / "ca-key.pem"
    written: list[Path] = []
    reuse = ca_cert.exists() and ca_key.exists()
    if reuse:
        key = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{ca_key} is not an EC private key made by `tensorgate certs`")
        ca = _issued(x509.load_pem_x509_certificate(ca_cert.read_bytes()), key)
    else:
        ca = make_ca()
        ca.write(ca_cert, ca_key)
        written += [ca_cert, ca_key]
    wanted = [("server", None), *((name, name) for name in clients)]
    for stem, client in wanted:
        cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}-key.pem"
        if reuse and cert_path.exists() and key_path.exists():
            continue  # signed by the CA we kept; a new CA re-issues everything
        issued = make_server_cert(ca) if client is None else make_client_cert(ca, client)
        issued.write(cert_path, key_path)
        written += [cert_path, key_path]
    return written


__all__ = [
    "SERVER_NAMES",
    "TRUST_DOMAIN",
    "Issued",
    "check_client_name",
    "make_ca",
    "make_client_cert",
    "make_leaf",
    "make_server_cert",
    "spiffe_id",
    "write_dev_certs",
]
