"""Who is calling: the identity of a verified client certificate, and the contextvar that carries it.

The identity is the certificate's first URI SAN (a SPIFFE ID such as `spiffe://org/ns/svc`), else its first DNS
SAN, else its subject CN. gRPC's auth context lists all SANs under one key without saying which kind each is, so
the PEM of the peer certificate (`x509_pem_cert`, present only once the handshake verified it) is parsed with
`cryptography`; the result is cached per certificate, so a connection's requests after the first cost a dict
lookup.

`CURRENT_IDENTITY` is set at the RPC boundary (server/rpc/errors.py) for the duration of each call, so anything
below it (policy checks, log lines) can read who is calling without passing it around.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from contextvars import ContextVar

from cryptography import x509
from cryptography.x509.oid import NameOID

ANONYMOUS = "anonymous"
"""The identity of a caller without a verified certificate (plaintext, or TLS without client certificates)."""

CURRENT_IDENTITY: ContextVar[str] = ContextVar("tensorgate_identity", default=ANONYMOUS)
CURRENT_TOKEN: ContextVar[str | None] = ContextVar("tensorgate_token", default=None)
"""The SHA-256 of the bearer token the identity came from, if it came from one: a stream outlives policy
reloads, so each of its messages checks that the token still names that identity."""


def identity_of_certificate(cert: x509.Certificate) -> str | None:
    """URI SAN, else DNS SAN, else CN; None when the certificate names nobody."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        for kind in (x509.UniformResourceIdentifier, x509.DNSName):
            values = san.get_values_for_type(kind)
            if values:
                return str(values[0])
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if cns:
        value = cns[0].value
        return value if isinstance(value, str) else value.decode()
    return None


@functools.lru_cache(maxsize=1024)
def identity_of_pem(pem: bytes) -> str | None:
    return identity_of_certificate(x509.load_pem_x509_certificate(pem))


def identity_of_auth_context(auth: Mapping[str, Iterable[bytes]]) -> str:
    """The identity from `context.auth_context()`; ANONYMOUS when the peer presented no verified certificate."""
    pems = list(auth.get("x509_pem_cert") or ())
    if pems:
        return identity_of_pem(bytes(pems[0])) or ANONYMOUS
    return ANONYMOUS


__all__ = [
    "ANONYMOUS",
    "CURRENT_IDENTITY",
    "CURRENT_TOKEN",
    "identity_of_auth_context",
    "identity_of_certificate",
    "identity_of_pem",
]
