"""--max-connection-age-s: connections are renewed, so that a change of the client CA reaches clients that are
already connected (a TLS handshake happens once per connection), while allowed clients go on without a failed
call. Real mutual TLS on loopback, certificates made in the test."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.pki import Pki, infer_add_sub, secure_channel
from tests.process import TENSORGATE
from tests.serving import ServerThread

EXPECTED = np.arange(16, dtype=np.float32) * 2


def _replace(path: Path, data: bytes) -> None:
    """As a secret mount or a careful operator does: the new file appears whole."""
    temporary = path.with_suffix(".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def test_a_client_ca_removed_reaches_open_connections_with_a_max_connection_age(repo: Path, tmp_path: Path) -> None:
    old, new = Pki(tmp_path / "old", ca_name="old CA"), Pki(tmp_path / "new", ca_name="new CA")
    bundle = tmp_path / "clients.pem"
    bundle.write_bytes(old.ca.cert + new.ca.cert)
    settings = {
        "tls_cert": old.server_cert,
        "tls_key": old.server_key,
        "tls_client_ca": bundle,
        "max_connection_age_s": 1.0,
        "max_connection_age_grace_s": 1.0,
    }
    with (
        ServerThread(repo, **settings) as s,
        secure_channel(s.address, old.ca_path, old.client("leaving")) as leaving,
        secure_channel(s.address, old.ca_path, new.client("staying")) as staying,
    ):
        np.testing.assert_array_equal(infer_add_sub(leaving), EXPECTED)
        np.testing.assert_array_equal(infer_add_sub(staying), EXPECTED)
        _replace(bundle, new.ca.cert)  # the old CA is no longer trusted
        refused: grpc.RpcError | None = None
        deadline = time.monotonic() + 30  # generous: the connection is renewed within about 1.1 s
        while refused is None and time.monotonic() < deadline:
            try:
                infer_add_sub(leaving)
            except grpc.RpcError as exc:
                refused = exc
            # The allowed client's calls all succeed across the renewals of its connection.
            np.testing.assert_array_equal(infer_add_sub(staying), EXPECTED)
            time.sleep(0.1)
        assert refused is not None, "a client of the removed CA still served after 30 s"
        assert refused.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--max-connection-age-s", "-1", "--max-connection-age-s must be in [0, "),
        ("--max-connection-age-grace-s", "0", "--max-connection-age-grace-s must be in (0, "),
    ],
)
def test_a_bad_max_connection_age_stops_the_start_naming_the_flag(
    repo: Path, flag: str, value: str, words: str
) -> None:
    result = subprocess.run(
        [TENSORGATE, "serve", "--model-repository", str(repo), "--grpc-port", "0", flag, value],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert words in result.stderr
