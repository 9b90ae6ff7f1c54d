"""Review 133: what the operator and the client developer read when today's changes refuse or wait.

A rotation that waits out ROTATION_SETTLE past a new certificate's start logged that the certificate was "not valid
before" a time already past, which reads as a clock or parsing fault. A client's reconnect backoff that gRPC cannot
take failed only when the channel was made, as an OverflowError naming no setting.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pytest

from tensorgate.client.config import ChannelSettings
from tensorgate.server.auth import TlsFiles
from tensorgate.server.auth.tls import ROTATION_SETTLE, TlsReloader
from tests.pki import Pki
from tests.test_tls import _dated_server_cert, _replace


def test_a_rotation_waiting_out_the_settle_says_when_the_certificate_serves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The new certificate started a moment ago: it is valid, and served ROTATION_SETTLE after its start. The
    warning says that, not that it is "not valid before" its start, a time the operator sees has passed."""
    pki = Pki(tmp_path / "pki")
    files = TlsFiles(pki.server_cert, pki.server_key)
    reloader = TlsReloader(files, lambda loaded: loaded.cert, "test port")
    cert, key = _dated_server_cert(pki, tmp_path / "new", start_days=-0.2 / 86400, days=30)
    _replace(cert, files.cert)
    _replace(key, files.key)
    caplog.set_level(logging.WARNING, logger="tensorgate.server.auth.tls")
    waited_from = dt.datetime.now(dt.UTC)
    assert reloader.poll() is None  # waits out the settle
    if dt.datetime.now(dt.UTC) - waited_from > ROTATION_SETTLE / 2:
        pytest.skip("the machine took too long to tell the settle from the start")
    warnings = [r.getMessage() for r in caplog.records if "cannot be used yet" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "not valid before" not in warnings[0], warnings[0]
    assert "became valid at" in warnings[0] and "s later, so that clients whose clocks lag" in warnings[0], warnings


@pytest.mark.parametrize("seconds", [float("inf"), 3e6, float("nan"), 0.0, -1.0])
def test_a_reconnect_backoff_grpc_cannot_take_is_refused_when_the_settings_are_made(seconds: float) -> None:
    with pytest.raises(ValueError, match=r"max_reconnect_backoff_s must be positive and at most 2147483 s"):
        ChannelSettings(max_reconnect_backoff_s=seconds)


def test_the_longest_reconnect_backoff_allowed_reaches_grpc() -> None:
    options = dict(ChannelSettings(max_reconnect_backoff_s=2_147_483).options())
    assert options["grpc.max_reconnect_backoff_ms"] == 2_147_483_000
