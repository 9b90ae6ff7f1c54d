"""A server certificate that runs out while the server serves it (a renewal that failed): clients refuse every new
handshake and nothing fails on the server's side, so each TLS port says why in its log, once, and /metrics shows
when the served certificate expires. Real handshakes on loopback, certificates made in the test."""

from __future__ import annotations

import datetime as dt
import logging
import socket
import ssl
import threading
import time
import urllib.error
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from grpc.experimental.session_cache import ssl_session_cache_lru

from tensorgate.server.auth import certs, tls
from tests.pki import CHANNEL_OPTIONS, Pki, infer_add_sub, secure_channel
from tests.scraping import metrics_url, scrape, scrape_text, value
from tests.serving import ServerThread
from tests.test_tls import EXPECTED, PORT_LOGGERS, _dated_server_cert, _replace

PORT_NAMES = {"grpc": "gRPC port", "metrics": "metrics port"}
"""How each port's log lines begin."""
LIFETIME_S = 5.0
"""How long the short-lived certificates are valid after their making: far more than an in-process start (~0.1 s)."""
EXPIRY_GAUGE = "tensorgate_tls_certificate_expiry_timestamp_seconds"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


def _cert_expiring_in(pki: Pki, directory: Path, seconds: float) -> tuple[Path, Path, float]:
    """A server certificate valid since yesterday and until `seconds` from now, and its not_after (Unix seconds)."""
    cert, key = _dated_server_cert(pki, directory, start_days=-1, days=1 + seconds / 86400)
    return cert, key, _not_after(cert)


def _not_after(cert: Path) -> float:
    return x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc.timestamp()


def _wait_until(t: float) -> None:
    while (left := t - time.time()) > 0:
        threading.Event().wait(min(left, 0.5))


def _connect(s: ServerThread, pki: Pki, port: str) -> None:
    """A new connection to the port, with its handshake, and a call over it, as a client does: raises if refused."""
    if port == "grpc":
        with secure_channel(s.address, pki.ca_path) as channel:
            np.testing.assert_array_equal(infer_add_sub(channel, timeout=10), EXPECTED)
    else:
        scrape_text(metrics_url(s, "https"), ssl.create_default_context(cafile=pki.ca_path))


def _refused(s: ServerThread, pki: Pki, port: str) -> str:
    """Why a client's new connection failed: its handshake, refused by the client."""
    with pytest.raises((grpc.RpcError, urllib.error.URLError)) as info:
        _connect(s, pki, port)
    error = info.value
    if isinstance(error, grpc.RpcError):
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        return str(error.details())
    assert isinstance(error, urllib.error.URLError)
    return str(error.reason)


def _lines(caplog: pytest.LogCaptureFixture, port: str, level: int) -> list[str]:
    """The port's own log lines at `level` (the load-time warning of auth/tls.py names the file, not the port)."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == PORT_LOGGERS[port] and r.levelno == level and r.getMessage().startswith(PORT_NAMES[port])
    ]


@pytest.mark.slow
def test_a_certificate_that_expires_while_served_is_logged_once_per_port(
    repo: Path, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    live = tmp_path / "live"
    cert, _, not_after = _cert_expiring_in(pki, live, LIFETIME_S)
    with caplog.at_level(logging.WARNING), ServerThread(repo, tls_cert=cert, tls_key=live / "server-key.pem") as s:
        for port in PORT_LOGGERS:
            _connect(s, pki, port)
        # Within 7 days at the start: one warning per port as the files load, and none more per connection.
        loaded = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(loaded) == 2 and all(f"{cert}: the certificate expires on" in m for m in loaded), loaded
        _wait_until(not_after + 1)
        for _ in range(3):  # each a new connection, each refused by the client
            for port in PORT_LOGGERS:
                assert "certificate has expired" in _refused(s, pki, port)
        for port in PORT_LOGGERS:
            (error,) = _lines(caplog, port, logging.ERROR)
            assert f"the certificate in {cert} expired on" in error and "clients refuse every handshake" in error
            assert _lines(caplog, port, logging.WARNING) == []
        assert len(caplog.records) == 4, [r.getMessage() for r in caplog.records]

        # A rotation to a good certificate serves again, and its own expiry is news again.
        caplog.clear()
        fresh = _cert_expiring_in(pki, tmp_path / "fresh", LIFETIME_S)
        _replace(fresh[0], cert)
        _replace(fresh[1], live / "server-key.pem")
        for port in PORT_LOGGERS:
            _connect(s, pki, port)
        _wait_until(fresh[2] + 1)
        for port in PORT_LOGGERS:
            _refused(s, pki, port)
            _refused(s, pki, port)
            assert len(_lines(caplog, port, logging.ERROR)) == 1


@pytest.mark.slow
def test_a_certificate_that_comes_within_the_warning_window_while_served_is_warned_about_once(
    repo: Path, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EXPIRY_WARNING is 7 days; here a certificate valid for a day enters a window of a day less LIFETIME_S."""
    live = tmp_path / "live"
    cert, _, not_after = _cert_expiring_in(pki, live, 86400)
    monkeypatch.setattr(tls, "EXPIRY_WARNING", dt.timedelta(days=1, seconds=-LIFETIME_S))
    with caplog.at_level(logging.WARNING), ServerThread(repo, tls_cert=cert, tls_key=live / "server-key.pem") as s:
        for port in PORT_LOGGERS:
            _connect(s, pki, port)
        assert caplog.records == []  # out of the window at the start
        _wait_until(not_after - tls.EXPIRY_WARNING.total_seconds() + 1)
        for _ in range(3):
            for port in PORT_LOGGERS:
                _connect(s, pki, port)  # still served: only the operator is told
    for port in PORT_LOGGERS:
        (warning,) = _lines(caplog, port, logging.WARNING)
        assert f"the certificate in {cert} expires on" in warning and "rotate it before then" in warning
    assert len(caplog.records) == 2, [r.getMessage() for r in caplog.records]


def test_expiry_gauge_is_the_served_certificates_not_after_and_follows_a_rotation(
    repo: Path, pki: Pki, tmp_path: Path
) -> None:
    live = tmp_path / "live"
    live.mkdir()
    _replace(pki.server_cert, live / "server.pem")
    _replace(pki.server_key, live / "server-key.pem")
    https = ssl.create_default_context(cafile=pki.ca_path)
    with ServerThread(repo, tls_cert=live / "server.pem", tls_key=live / "server-key.pem") as s:
        samples = scrape(metrics_url(s, "https"), https)
        for port in PORT_LOGGERS:
            assert value(samples, EXPIRY_GAUGE, port=port) == _not_after(pki.server_cert)
        new = _dated_server_cert(pki, tmp_path / "new", start_days=-1, days=30)
        _replace(new[0], live / "server.pem")
        _replace(new[1], live / "server-key.pem")
        _connect(s, pki, "grpc")  # the gRPC port takes new files at its next handshake, the metrics port at this scrape
        samples = scrape(metrics_url(s, "https"), https)
        for port in PORT_LOGGERS:
            assert value(samples, EXPIRY_GAUGE, port=port) == _not_after(new[0]) != _not_after(pki.server_cert)


def _client_cert_expiring_in(pki: Pki, name: str, seconds: float) -> tuple[Path, Path, float]:
    """A client certificate valid since a minute ago and until `seconds` from now, and its not_after."""
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    issued = certs.make_client_cert(pki.ca, name, days=(60 + seconds) / 86400, not_before=start)
    cert, key = pki.dir / f"{name}.pem", pki.dir / f"{name}-key.pem"
    issued.write(cert, key)
    return cert, key, issued.certificate.not_valid_after_utc.timestamp()


def test_a_resumed_tls_session_does_not_outlive_the_client_certificate(repo: Path, pki: Pki) -> None:
    """gRPC's server hands out TLS 1.3 session tickets, and a resumed session skips the certificate check: a client
    that kept its ticket went on connecting with a certificate that had expired (for two days). Its calls are now
    refused, naming the expiry; a fresh handshake with that certificate fails as before."""
    cert, key, not_after = _client_cert_expiring_in(pki, "short-lived", LIFETIME_S)
    creds = grpc.ssl_channel_credentials(pki.ca_path.read_bytes(), key.read_bytes(), cert.read_bytes())
    options = [*CHANNEL_OPTIONS, ("grpc.ssl_session_cache", ssl_session_cache_lru(4))]
    with ServerThread(repo, **pki.server_settings()) as s:
        address = s.address.replace(
            "127.0.0.1", "localhost"
        )  # gRPC caches a session under the server's name, never an IP address
        for _ in range(2):  # a full handshake, then one that resumes its session: both served while it is valid
            with grpc.secure_channel(address, creds, options=options) as channel:
                np.testing.assert_array_equal(infer_add_sub(channel, timeout=10), EXPECTED)
        _wait_until(not_after + 1)
        with grpc.secure_channel(address, creds, options=options) as channel, pytest.raises(grpc.RpcError) as info:
            infer_add_sub(channel, timeout=10)
        scraper = ssl.create_default_context(cafile=pki.ca_path)
        scraper.load_cert_chain(*map(str, pki.client("scraper")))
        samples = scrape(metrics_url(s, "https"), scraper)
    denials = {k: v for k, v in samples.items() if k[0] == "tensorgate_auth_denials_total"}
    assert [v for (_, labels), v in denials.items() if ("reason", "expired_certificate") in labels] == [1.0]
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value
    end = dt.datetime.fromtimestamp(not_after, dt.UTC)
    assert info.value.details() == (
        f"the client certificate expired on {end:%Y-%m-%d %H:%M:%S} UTC; a resumed TLS session does not extend it: "
        "connect with a valid certificate"
    )


def _scrape_resumed(port: int, context: ssl.SSLContext, session: ssl.SSLSession | None) -> ssl.SSLSession | None:
    """Scrape /metrics on a new connection that offers `session`; the session to offer next (None: none resumed
    nor given). A TLS 1.3 ticket arrives after the handshake, so the scrape reads the whole answer first."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost", session=session) as conn:
            conn.sendall(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            while conn.recv(65536):
                pass
            return conn.session if conn.session_reused or session is None else None


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"])
def test_the_metrics_port_gives_no_tls_session_to_resume(repo: Path, pki: Pki, version: ssl.TLSVersion) -> None:
    """Python's ssl server issued session tickets too (two hours), so a scraper's expired certificate kept working
    for as long: the metrics port now makes every connection show a valid certificate."""
    client = pki.client("scraper")
    context = ssl.create_default_context(cafile=str(pki.ca_path))
    context.load_cert_chain(str(client[0]), str(client[1]))
    context.minimum_version = context.maximum_version = version
    with ServerThread(repo, **pki.server_settings()) as s:
        session = _scrape_resumed(s.app.metrics_port, context, None)
        assert _scrape_resumed(s.app.metrics_port, context, session) is None


def test_expiry_gauge_has_no_sample_without_tls(repo: Path) -> None:
    with ServerThread(repo) as s:
        samples = scrape(metrics_url(s))
    assert not [key for key in samples if key[0] == EXPIRY_GAUGE]
