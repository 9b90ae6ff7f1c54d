"""Who is calling: the identity of a verified client certificate, and the contextvar that carries it.

The identity is the certificate's first URI SAN (a SPIFFE ID such as `spiffe://org/ns/svc`), else its first DNS
SAN, else its subject CN. It is an `Identity`: the name itself, as logs, metrics and errors show it, that also
knows which of the three kinds of name it is, so that a policy pattern matches only names of its own kind (a CN
spelled `spiffe://...` is not a SPIFFE ID; see policy.py).

gRPC's auth context lists all SANs under one key without saying which kind each is, so the PEM of the peer
certificate (`x509_pem_cert`, present only once the handshake verified it) is parsed with `cryptography`; the
result is cached per certificate, so a connection's requests after the first cost a dict lookup.

`CURRENT_IDENTITY` is set at the RPC boundary (server/rpc/errors.py) for the duration of each call, so anything
below it (policy checks, log lines) can read who is calling without passing it around.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Iterable, Mapping
from contextvars import ContextVar

from cryptography import x509
from cryptography.x509.oid import NameOID

URI, DNS, CN = "uri", "dns", "cn"
"""The kinds of name a certificate identity can be: URI SAN, DNS SAN, subject CN."""

ANONYMOUS = "anonymous"
"""The identity of a caller without a verified certificate (plaintext, or TLS without client certificates)."""

CURRENT_IDENTITY: ContextVar[str] = ContextVar("tensorgate_identity", default=ANONYMOUS)
CURRENT_TOKEN: ContextVar[str | None] = ContextVar("tensorgate_token", default=None)
"""The SHA-256 of the bearer token the identity came from, if it came from one: a stream outlives policy
reloads, so each of its messages checks that the token still names that identity."""


class Identity(str):
    """A certificate's identity: a str (the name, as everything that shows identities shows it) with its `kind`,
    URI, DNS or CN. Two identities are the same caller only when both agree: compare `identity_key`s.

    Identities that are not a certificate's (a bearer token's, ANONYMOUS) are plain strings without a kind: the
    policy that names them is the one that defines them."""

    kind: str

    def __new__(cls, name: str, kind: str) -> Identity:
        self = super().__new__(cls, name)
        self.kind = kind
        return self

    def __getnewargs__(self) -> tuple[str, str]:  # type: ignore[override]  # pickle and copy need the kind too
        return str(self), self.kind


def identity_key(identity: str) -> tuple[str | None, str]:
    """What tells two callers apart: the kind of name as well as the name (a CN 'x' is not the DNS SAN 'x')."""
    return getattr(identity, "kind", None), str(identity)


def identity_of_certificate(cert: x509.Certificate) -> Identity | None:
    """URI SAN, else DNS SAN, else CN; None when the certificate names nobody."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        for general, kind in ((x509.UniformResourceIdentifier, URI), (x509.DNSName, DNS)):
            values = san.get_values_for_type(general)
            if values:
                return Identity(str(values[0]), kind)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if cns:
        value = cns[0].value
        return Identity(value if isinstance(value, str) else value.decode(), CN)
    return None


@functools.lru_cache(maxsize=1024)
def _certificate_of_pem(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


@functools.lru_cache(maxsize=1024)
def identity_of_pem(pem: bytes) -> Identity | None:
    return identity_of_certificate(_certificate_of_pem(pem))


def expired_on_resumption(auth: Mapping[str, Iterable[bytes]]) -> dt.datetime | None:
    """When the peer's certificate expired, for a connection that resumed a TLS session after that; else None.

    A resumed session (a TLS 1.3 ticket, which gRPC's server hands out for two days) skips the certificate check
    of a full handshake: its peer certificate is the one verified when the session began, however long ago. So a
    client certificate that has expired since would keep opening connections; each call on one is refused instead.
    A connection that made a full handshake is not checked again (it was valid then), as before."""
    if list(auth.get("ssl_session_reused") or ()) != [b"true"]:
        return None
    pems = list(auth.get("x509_pem_cert") or ())
    if not pems:
        return None
    end = _certificate_of_pem(bytes(pems[0])).not_valid_after_utc
    return end if dt.datetime.now(dt.UTC) > end else None


def identity_of_auth_context(auth: Mapping[str, Iterable[bytes]]) -> str:
    """The identity from `context.auth_context()`; ANONYMOUS when the peer presented no verified certificate."""
    pems = list(auth.get("x509_pem_cert") or ())
    if pems:
        return identity_of_pem(bytes(pems[0])) or ANONYMOUS
    return ANONYMOUS


__all__ = [
    "ANONYMOUS",
    "CN",
    "CURRENT_IDENTITY",
    "CURRENT_TOKEN",
    "DNS",
    "URI",
    "Identity",
    "expired_on_resumption",
    "identity_key",
    "identity_of_auth_context",
    "identity_of_certificate",
    "identity_of_pem",
]
