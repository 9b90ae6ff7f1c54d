"""TLS and mutual TLS for the gRPC and metrics ports, with certificates re-read from disk when they change.

    files = TlsFiles(cert=Path("server.pem"), key=Path("server-key.pem"), client_ca=Path("ca.pem"))
    creds = ReloadingCredentials(files).server_credentials()
    server.add_secure_port("0.0.0.0:8001", creds)
    contexts = TlsReloader(files, lambda _: ssl_server_context(files), "metrics port")  # .latest() per connection

gRPC calls the fetcher on every new handshake (grpc core asks before it builds each server handshaker). The
fetcher compares the files' stamps (server/file_stamp.py: size, times, inode) with the last ones it loaded and
answers None ("keep the current configuration") when nothing changed, so the cost per connection is three
`stat` calls and nothing per request.
When the files change it parses them, checks that the key belongs to the certificate, that the certificate is
within its validity period and that the client CA bundle holds a CA, and only then hands the new configuration to
gRPC; a half-written, mismatched, expired or not-yet-valid set is logged once and skipped (the previous files keep
serving) until the files change again, or, for a certificate not valid yet, until it is and ROTATION_SETTLE has
passed. So a rotation never serves a broken certificate. Connections already open keep their session: in-flight
calls survive. `TlsReloader` holds all of that, for the gRPC port's fetcher and for the metrics port's SSLContext
alike.

A served certificate can still run out while the server runs (a renewal that failed): clients then refuse every
new handshake and nothing fails on the server's side. So the reloader knows when the certificate it serves expires
(`not_after`, exported as tensorgate_tls_certificate_expiry_timestamp_seconds) and, on the handshake that first
sees it, logs a warning once it is within EXPIRY_WARNING of it and an error once it has passed; a rotation to a
good certificate starts over. That costs a handshake one clock read and a float compare.

The TLS versions are gRPC's defaults: TLS 1.2 minimum, TLS 1.3 preferred (grpc core's `grpc_ssl_server_credentials`
default range; Python gRPC exposes no knob to lower it).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tensorgate.server.file_stamp import FileStamp, file_stamp

log = logging.getLogger(__name__)

Stamp = tuple[FileStamp, ...]
T = TypeVar("T")

ROTATION_SETTLE = dt.timedelta(seconds=2)
"""How long a rotation waits past a new certificate's start before serving it, while the one it replaces still
serves. Clients check the start against their own clock: OpenSSL reads `time()`, which glibc serves from a
coarse clock up to a tick behind, and another host's clock may lag by more. A certificate served the moment it
starts is refused by those clients as not valid yet."""

EXPIRY_WARNING = dt.timedelta(days=7)
"""A server certificate that expires sooner than this is loaded with a warning, or warned about once while it
serves when it comes this close: time to rotate it."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The server's certificate chain and key, and optionally the CA bundle that client certificates must chain to."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    @property
    def paths(self) -> tuple[Path, ...]:
        return (self.cert, self.key) if self.client_ca is None else (self.cert, self.key, self.client_ca)

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None


class CertificateError(ValueError):
    """The files do not make a usable TLS configuration; the message says which file and why."""

    def __init__(self, message: str, *, valid_from: dt.datetime | None = None) -> None:
        super().__init__(message)
        self.valid_from = valid_from
        """For a certificate that is not valid yet: when it may serve, so that a rotation to it can wait for it."""


@dataclass(frozen=True, slots=True)
class LoadedFiles:
    cert: bytes
    key: bytes
    client_ca: bytes | None
    not_after: dt.datetime
    """When the leaf certificate expires (UTC)."""


def load_files(files: TlsFiles, *, settle: dt.timedelta = dt.timedelta(0)) -> LoadedFiles:
    """Read and check the PEM files: a certificate chain valid now (and for `settle` already), the matching
    private key, and a CA bundle.

    Clients refuse a certificate outside its validity period, and grpc core takes any certificate as a client CA
    but then verifies nobody; either way every handshake fails with nothing in the server's log, so both are
    refused here, with the file and the reason."""
    cert, key = files.cert.read_bytes(), files.key.read_bytes()
    try:
        chain = x509.load_pem_x509_certificates(cert)
    except ValueError as exc:
        raise CertificateError(f"{files.cert}: not a PEM certificate chain ({exc})") from exc
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"{files.key}: not an unencrypted PEM private key ({exc})") from exc
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if chain[0].public_key().public_bytes(serialization.Encoding.DER, spki) != private.public_key().public_bytes(
        serialization.Encoding.DER, spki
    ):
        raise CertificateError(f"{files.key} is not the private key of the certificate in {files.cert}")
    _check_validity(files.cert, chain[0], settle)
    ca: bytes | None = None
    if files.client_ca is not None:
        ca = files.client_ca.read_bytes()
        try:
            bundle = x509.load_pem_x509_certificates(ca)
        except ValueError as exc:
            raise CertificateError(f"{files.client_ca}: not a PEM CA bundle ({exc})") from exc
        if not any(_is_ca(c) for c in bundle):
            raise CertificateError(
                f"{files.client_ca}: no CA certificate in the client CA bundle (none has BasicConstraints CA:TRUE); "
                "give the CA that issues the client certificates, not a client or server certificate"
            )
    return LoadedFiles(cert, key, ca, chain[0].not_valid_after_utc)


def _check_validity(path: Path, leaf: x509.Certificate, settle: dt.timedelta) -> None:
    now = dt.datetime.now(dt.UTC)
    start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    if now < start + settle:
        served = start + settle
        problem = f"the certificate is not valid before {start:%Y-%m-%d %H:%M:%S} UTC"
        if now >= start:  # valid already: "not valid before" a time past would read as a clock or parsing fault
            problem = (
                f"the certificate became valid at {start:%Y-%m-%d %H:%M:%S} UTC and serves from "
                f"{served:%H:%M:%S} UTC, {settle.total_seconds():g} s later, so that clients whose clocks lag a "
                "little take it too"
            )
        raise CertificateError(f"{path}: {problem}", valid_from=served)
    if now > end:
        raise CertificateError(f"{path}: the certificate expired on {end:%Y-%m-%d %H:%M:%S} UTC")
    if end - now < EXPIRY_WARNING:
        log.warning("%s: the certificate expires on %s UTC; rotate it before then", path, f"{end:%Y-%m-%d %H:%M:%S}")


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _stamp(paths: tuple[Path, ...]) -> Stamp:
    out = []
    for p in paths:
        out.append(file_stamp(os.stat(p)))
    return tuple(out)


class TlsReloader(Generic[T]):
    """What a TLS port serves (`value`), built from the files and rebuilt when they change (see the module doc).

    The gRPC port's certificate fetcher and the metrics port's SSLContext both follow their files through this one
    class, so both refuse, log and retry a rotation alike:

        reloader = TlsReloader(files, build, "gRPC port")  # a bad set at start raises: an error, not a retry
        new = reloader.poll()  # per connection: the new value, or None to keep serving reloader.value
    """

    def __init__(
        self, files: TlsFiles, build: Callable[[LoadedFiles], T], port: str, logger: logging.Logger = log
    ) -> None:
        self.files = files
        self._build = build
        self._port = port
        """Which port the files serve, for the log lines."""
        self._log = logger
        self._stamp = _stamp(files.paths)
        loaded = load_files(files)
        self.value = build(loaded)
        self._failed: object = None
        """The broken state last logged: the files' stamp, or (path, errno) while one cannot be read."""
        self._retry_at = math.inf
        """When to try the failed stamp again (a certificate not valid yet), as time.time()."""
        self.reloads = 0
        self._expiry_lock = threading.Lock()
        self._served(loaded)

    def _served(self, loaded: LoadedFiles) -> None:
        """Start watching the expiry of the certificate now served; load_files has warned if it is close already."""
        with self._expiry_lock:
            self.not_after = loaded.not_after.timestamp()
            """When the served certificate expires, as time.time() (Unix seconds)."""
            warn_at = self.not_after - EXPIRY_WARNING.total_seconds()
            self._expiry_alarm = warn_at if time.time() < warn_at else self.not_after
            """When the next expiry log line is due, as time.time(): the warning, the error, then never (inf)."""

    def poll(self) -> T | None:
        """A new value when the files changed into a set that can serve, else None (keep serving `value`); logs
        when the certificate served comes close to its expiry or passes it. Never raises: it runs inside
        handshakes."""
        value = self._reload()
        if time.time() >= self._expiry_alarm:
            self._log_expiry()
        return value

    def _log_expiry(self) -> None:
        with self._expiry_lock:  # concurrent handshakes: one of them logs
            now = time.time()
            if now < self._expiry_alarm:
                return
            end = f"{dt.datetime.fromtimestamp(self.not_after, dt.UTC):%Y-%m-%d %H:%M:%S}"
            if now < self.not_after:
                self._expiry_alarm = self.not_after
                self._log.warning(
                    "%s: the certificate in %s expires on %s UTC; rotate it before then",
                    self._port,
                    self.files.cert,
                    end,
                )
            else:
                self._expiry_alarm = math.inf
                self._log.error(
                    "%s: the certificate in %s expired on %s UTC: clients refuse every handshake; rotate it",
                    self._port,
                    self.files.cert,
                    end,
                )

    def _reload(self) -> T | None:
        stamp: Stamp | None = None
        try:
            stamp = _stamp(self.files.paths)
            if stamp == self._stamp:
                self._failed = None  # back to the files in use: a later breakage is news again
                return None
            if stamp == self._failed and time.time() < self._retry_at:
                return None
            # Wait out ROTATION_SETTLE only while the certificate served still works.
            settle = ROTATION_SETTLE if time.time() < self.not_after else dt.timedelta(0)
            loaded = load_files(self.files, settle=settle)
            value = self._build(loaded)
        except (OSError, CertificateError) as exc:  # ssl.SSLError is an OSError
            failed = stamp if stamp is not None else (getattr(exc, "filename", None), getattr(exc, "errno", None))
            if failed != self._failed:  # log each broken state once, not once per handshake
                self._log.warning(
                    "%s: TLS files changed but cannot be used yet; keeping the previous ones: %s", self._port, exc
                )
            self._failed = failed
            valid_from = exc.valid_from if isinstance(exc, CertificateError) else None
            self._retry_at = valid_from.timestamp() if valid_from is not None else math.inf
            return None
        except Exception:  # noqa: BLE001 - an exception must not escape into a handshake
            self._log.exception("%s: unexpected error while reloading TLS files", self._port)
            return None
        self._stamp, self._failed, self.value = stamp, None, value
        self._served(loaded)
        self.reloads += 1
        self._log.info("%s: TLS files reloaded (%s)", self._port, ", ".join(str(p) for p in self.files.paths))
        return value

    def latest(self) -> T:
        """`value` after a `poll`: for a server that builds each connection from the current value."""
        self.poll()
        return self.value


def _grpc_configuration(loaded: LoadedFiles) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(loaded.key, loaded.cert)], root_certificates=loaded.client_ca)


def ssl_server_context(files: TlsFiles) -> ssl.SSLContext:
    """The same files as an SSLContext, for a port that Python's ssl module serves (the metrics port): TLS 1.2 or
    newer, and a client certificate from the client CA required when there is one. Build it through a
    TlsReloader, whose `load_files` checks come first: the ssl module would take an expired certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # No session tickets: a resumed session skips the client certificate check, so a scraper's certificate that
    # expired would keep working for the ticket's lifetime; a scrape every few seconds pays one full handshake.
    context.options |= ssl.OP_NO_TICKET
    context.num_tickets = 0
    context.load_cert_chain(files.cert, files.key)
    if files.client_ca is not None:
        context.load_verify_locations(cafile=files.client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class ReloadingCredentials:
    """Server credentials whose certificate, key and client CA follow the files on disk (see the module doc)."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._reloader = TlsReloader(files, _grpc_configuration, "gRPC port")

    @property
    def reloads(self) -> int:
        return self._reloader.reloads

    @property
    def reloader(self) -> TlsReloader[grpc.ServerCertificateConfiguration]:
        """What the port serves, and when its certificate expires (`not_after`); poll it only through `fetch`."""
        return self._reloader

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate configuration fetcher: a new configuration when the files changed, else None."""
        return self._reloader.poll()

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._reloader.value,
            self.fetch,  # type: ignore[arg-type]  # the stub omits the None that grpc documents as "no change"
            require_client_authentication=self.files.mutual,
        )


__all__ = [
    "CertificateError",
    "LoadedFiles",
    "ReloadingCredentials",
    "TlsFiles",
    "TlsReloader",
    "load_files",
    "ssl_server_context",
]
