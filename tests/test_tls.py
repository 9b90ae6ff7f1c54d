"""TLS and mutual TLS on the gRPC port: real handshakes on loopback, certificates made in the test.

Refused handshakes surface to a gRPC client as UNAVAILABLE (the connection never carries a call).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tensorgate.server import ServerSettings, TensorgateServer
from tensorgate.server.auth import CertificateError, TlsFiles, certs
from tensorgate.server.auth.certs import write_dev_certs
from tensorgate.server.auth.tls import ROTATION_SETTLE, TlsReloader, load_files
from tests.pki import CHANNEL_OPTIONS, Pki, infer_add_sub, secure_channel
from tests.process import TENSORGATE, ServeProcess
from tests.scraping import metrics_url, scrape_text
from tests.serving import ServerThread

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = np.arange(16, dtype=np.float32) * 2


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
def mtls_server(repo: Path, pki: Pki):
    with ServerThread(repo, **pki.server_settings()) as s:
        yield s


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_mtls_client_infers(mtls_server: ServerThread, pki: Pki) -> None:
    with secure_channel(mtls_server.address, pki.ca_path, pki.client("scorer")) as channel:
        np.testing.assert_array_equal(infer_add_sub(channel), EXPECTED)


def test_plaintext_client_to_tls_server_is_unavailable(mtls_server: ServerThread) -> None:
    with grpc.insecure_channel(mtls_server.address, options=CHANNEL_OPTIONS) as channel:
        assert _code(lambda: infer_add_sub(channel, timeout=5)) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    "client",
    [
        pytest.param("none", id="no-client-certificate"),
        pytest.param("other-ca", id="certificate-from-another-ca"),
        pytest.param("expired", id="expired-certificate"),
    ],
)
def test_mtls_refuses_unverified_clients(mtls_server: ServerThread, pki: Pki, tmp_path: Path, client: str) -> None:
    if client == "none":
        pair = None
    elif client == "other-ca":
        pair = Pki(tmp_path / "other", ca_name="other CA").client("scorer")
    else:
        pair = pki.client("scorer", expired=True)
    with secure_channel(mtls_server.address, pki.ca_path, pair) as channel:
        assert _code(lambda: infer_add_sub(channel, timeout=5)) == grpc.StatusCode.UNAVAILABLE
    # The server keeps serving verified clients.
    with secure_channel(mtls_server.address, pki.ca_path, pki.client("scorer")) as channel:
        np.testing.assert_array_equal(infer_add_sub(channel), EXPECTED)


def test_client_that_does_not_trust_the_server_is_unavailable(mtls_server: ServerThread, pki: Pki, tmp_path) -> None:
    other = Pki(tmp_path / "other", ca_name="other CA")
    with secure_channel(mtls_server.address, other.ca_path, pki.client("scorer")) as channel:
        assert _code(lambda: infer_add_sub(channel, timeout=5)) == grpc.StatusCode.UNAVAILABLE


def test_server_tls_without_client_ca_accepts_clients_without_certificates(repo: Path, pki: Pki) -> None:
    with ServerThread(repo, **pki.server_settings(mutual=False)) as s:
        with secure_channel(s.address, pki.ca_path) as channel:
            np.testing.assert_array_equal(infer_add_sub(channel), EXPECTED)
        with grpc.insecure_channel(s.address, options=CHANNEL_OPTIONS) as channel:
            assert _code(lambda: infer_add_sub(channel, timeout=5)) == grpc.StatusCode.UNAVAILABLE


def test_health_service_is_reachable_over_mtls(mtls_server: ServerThread, pki: Pki) -> None:
    with secure_channel(mtls_server.address, pki.ca_path, pki.client("probe")) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_unmodified_tritonclient_infers_over_mtls(mtls_server: ServerThread, pki: Pki) -> None:
    cert, key = pki.client("scorer")
    client = tc.InferenceServerClient(
        mtls_server.address,
        ssl=True,
        root_certificates=str(pki.ca_path),
        private_key=str(key),
        certificate_chain=str(cert),
    )
    try:
        x = np.ones((2, 16), np.float32)
        inputs = [tc.InferInput(n, [2, 16], "FP32") for n in ("INPUT0", "INPUT1")]
        for i in inputs:
            i.set_data_from_numpy(x)
        result = client.infer("add_sub", inputs)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x * 2)
        assert client.is_server_ready()
    finally:
        client.close()


@pytest.mark.parametrize(
    "settings, message",
    [
        pytest.param({"tls_cert": Path("a.pem")}, "go together", id="cert-without-key"),
        pytest.param({"tls_client_ca": Path("ca.pem")}, "needs tls_cert", id="client-ca-without-cert"),
    ],
)
def test_incomplete_tls_settings_are_refused(repo: Path, settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServerSettings(model_repository=repo, **settings)


async def test_key_of_another_certificate_stops_the_start(repo: Path, pki: Pki, tmp_path: Path) -> None:
    other = Pki(tmp_path / "other")
    settings = ServerSettings(model_repository=repo, grpc_port=0, tls_cert=pki.server_cert, tls_key=other.server_key)
    with pytest.raises(CertificateError, match="is not the private key"):
        await TensorgateServer(settings).start()


def _presented_certificate(address: str, pki: Pki, client: tuple[Path, Path]) -> x509.Certificate:
    """The certificate the server presents on a new connection, read with Python's own TLS stack."""
    host, port = address.rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(pki.ca_path))
    ctx.load_cert_chain(str(client[0]), str(client[1]))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def _replace(src: Path, dst: Path) -> None:
    """Atomically, as rotation tools do (write beside, then rename over)."""
    tmp = dst.with_suffix(".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


@pytest.mark.slow
def test_rotation_swaps_certificates_without_failing_a_call(repo: Path, tmp_path: Path) -> None:
    old, new = Pki(tmp_path / "old", ca_name="old CA"), Pki(tmp_path / "new", ca_name="new CA")
    live = tmp_path / "live"
    live.mkdir()
    files = {"cert": live / "server.pem", "key": live / "server-key.pem", "ca": live / "ca.pem"}
    for src, dst in ((old.server_cert, "cert"), (old.server_key, "key"), (old.ca_path, "ca")):
        shutil.copyfile(src, files[dst])
    old_client, new_client = old.client("scorer"), new.client("scorer")

    with ServerThread(repo, tls_cert=files["cert"], tls_key=files["key"], tls_client_ca=files["ca"]) as s:
        assert _presented_certificate(s.address, old, old_client).serial_number == old.server.certificate.serial_number
        stop, swapped = threading.Event(), threading.Event()
        done = {"before": 0, "after": 0}
        failures: list[BaseException] = []

        def loop() -> None:
            with secure_channel(s.address, old.ca_path, old_client) as channel:
                for _ in range(5000):  # bounded: the test stops it long before
                    if stop.is_set():
                        return
                    try:
                        np.testing.assert_array_equal(infer_add_sub(channel), EXPECTED)
                    except BaseException as exc:  # noqa: BLE001 - reported below
                        failures.append(exc)
                        return
                    done["after" if swapped.is_set() else "before"] += 1

        worker = threading.Thread(target=loop)
        worker.start()
        try:
            while done["before"] < 20 and worker.is_alive():
                threading.Event().wait(0.01)
            _replace(new.server_cert, files["cert"])
            _replace(new.server_key, files["key"])
            _replace(new.ca_path, files["ca"])
            swapped.set()
            # New connections get the new certificate and trust the new CA ...
            presented = _presented_certificate(s.address, new, new_client)
            assert presented.serial_number == new.server.certificate.serial_number
            with secure_channel(s.address, new.ca_path, new_client) as channel:
                np.testing.assert_array_equal(infer_add_sub(channel), EXPECTED)
            # ... and no longer the old ones.
            with secure_channel(s.address, old.ca_path, old_client) as channel:
                assert _code(lambda: infer_add_sub(channel, timeout=5)) == grpc.StatusCode.UNAVAILABLE
            while done["after"] < 20 and worker.is_alive():
                threading.Event().wait(0.01)
        finally:
            stop.set()
            worker.join(30)
        assert not failures, failures
        assert done["before"] >= 20 and done["after"] >= 20
        assert s.app.tls is not None and s.app.tls.reloads == 1


def test_rotation_skips_a_mismatched_pair_until_it_is_complete(repo: Path, tmp_path: Path) -> None:
    old, new = Pki(tmp_path / "old", ca_name="old CA"), Pki(tmp_path / "new", ca_name="new CA")
    live = tmp_path / "live"
    shutil.copytree(old.dir, live)
    with ServerThread(repo, tls_cert=live / "server.pem", tls_key=live / "server-key.pem") as s:
        _replace(new.server_cert, live / "server.pem")  # the key is not there yet
        with secure_channel(s.address, old.ca_path) as channel:
            np.testing.assert_array_equal(infer_add_sub(channel), EXPECTED)  # still the old, consistent pair
        _replace(new.server_key, live / "server-key.pem")
        with secure_channel(s.address, new.ca_path) as channel:
            np.testing.assert_array_equal(infer_add_sub(channel), EXPECTED)
        assert s.app.tls is not None and s.app.tls.reloads == 1


@pytest.mark.slow
def test_certs_command_makes_files_that_work(repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "certs"
    run = subprocess.run(
        [TENSORGATE, "certs", str(out), "--client", "scorer", "--client", "admin"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    names = sorted(Path(line).name for line in run.stdout.split())
    assert names == sorted(
        f"{stem}{suffix}" for stem in ("ca", "server", "scorer", "admin") for suffix in (".pem", "-key.pem")
    )
    assert (out / "scorer-key.pem").stat().st_mode & 0o077 == 0
    scorer = x509.load_pem_x509_certificate((out / "scorer.pem").read_bytes())
    san = scorer.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://tensorgate.local/scorer"]
    serialization.load_pem_private_key((out / "admin-key.pem").read_bytes(), password=None)

    # A second run adds a client with the same CA and keeps the files that exist.
    again = subprocess.run(
        [TENSORGATE, "certs", str(out), "--client", "scorer", "--client", "late"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert sorted(Path(line).name for line in again.stdout.split()) == ["late-key.pem", "late.pem"]

    settings = {"tls_cert": out / "server.pem", "tls_key": out / "server-key.pem", "tls_client_ca": out / "ca.pem"}
    with ServerThread(repo, **settings) as s:
        for name in ("scorer", "late"):
            with secure_channel(s.address, out / "ca.pem", (out / f"{name}.pem", out / f"{name}-key.pem")) as ch:
                np.testing.assert_array_equal(infer_add_sub(ch), EXPECTED)
        # The server certificate names localhost too.
        port = s.address.rsplit(":", 1)[1]
        with secure_channel(f"localhost:{port}", out / "ca.pem", (out / "admin.pem", out / "admin-key.pem")) as ch:
            np.testing.assert_array_equal(infer_add_sub(ch), EXPECTED)


def test_certs_command_refuses_a_name_that_is_not_a_file_name(tmp_path: Path) -> None:
    run = subprocess.run(
        [TENSORGATE, "certs", str(tmp_path / "c"), "--client", "../evil"], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 2 and "client name '../evil'" in run.stderr
    assert not (tmp_path / "c").exists()


def test_readme_security_example_runs(repo: Path, tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Security", 1)[1].split("\n## ", 1)[0]
    (snippet,) = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        build_models = __import__("build_models")
    finally:
        sys.path.remove(str(ROOT / "examples"))
    build_models.build_mlp(repo / "mlp")
    out = tmp_path / "certs"
    write_dev_certs(out, ["scorer"])
    settings = {"tls_cert": out / "server.pem", "tls_key": out / "server-key.pem", "tls_client_ca": out / "ca.pem"}
    with ServerThread(repo, **settings) as s:
        port = s.address.rsplit(":", 1)[1]
        code = snippet.replace("localhost:8001", f"localhost:{port}").replace("certs/", f"{out}/")
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["result"].as_numpy("OUTPUT0").shape == (1, 10)


@pytest.mark.slow
def test_serve_takes_tls_and_policy_options_from_the_environment(repo: Path, pki: Pki, tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text('{"rules": [{"identities": "spiffe://tensorgate.local/scorer", "apis": ["inference"]}]}')
    env = {
        "TENSORGATE_TLS_CERT": str(pki.server_cert),
        "TENSORGATE_TLS_KEY": str(pki.server_key),
        "TENSORGATE_TLS_CLIENT_CA": str(pki.ca_path),
        "TENSORGATE_AUTH_POLICY": str(policy),
    }
    with ServeProcess(["--model-repository", str(repo), "--grpc-port", "0"], env=env) as server:
        server.wait_for_line(r"ready:")
        assert "(gRPC, mutual TLS)" in server.wait_for_line(r"listening on")
        with secure_channel(server.address, pki.ca_path, pki.client("scorer")) as channel:
            np.testing.assert_array_equal(infer_add_sub(channel), EXPECTED)
        with secure_channel(server.address, pki.ca_path, pki.client("other")) as channel:
            assert _code(lambda: infer_add_sub(channel, timeout=5)) == grpc.StatusCode.PERMISSION_DENIED
        assert server.terminate() == 0


def test_serve_exits_1_with_the_reason_when_the_policy_is_malformed(repo: Path, pki: Pki, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("rules:\n  - identities: [a]\n    apis: [admin]\n")
    args = ["--model-repository", str(repo), "--grpc-port", "0", "--auth-policy", str(policy)]
    with ServeProcess(args) as server:
        assert server.proc.wait(60) == 1
        server.wait_for_line(r"unknown group\(s\) \['admin'\]")


def test_client_ca_bundle_with_two_cas_accepts_clients_of_both(repo: Path, tmp_path: Path) -> None:
    old, new = Pki(tmp_path / "old", ca_name="old CA"), Pki(tmp_path / "new", ca_name="new CA")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(old.ca.cert + new.ca.cert)
    with ServerThread(repo, tls_cert=old.server_cert, tls_key=old.server_key, tls_client_ca=bundle) as s:
        for pki in (old, new):
            with secure_channel(s.address, old.ca_path, pki.client("scorer")) as channel:
                np.testing.assert_array_equal(infer_add_sub(channel), EXPECTED)


def test_health_command_probes_an_mtls_server(mtls_server: ServerThread, pki: Pki) -> None:
    """The container health check works when the server demands client certificates."""
    cert, key = pki.client("probe")
    base = [TENSORGATE, "health", "--server", mtls_server.address, "--tls-ca", str(pki.ca_path)]
    ok = subprocess.run([*base, "--tls-cert", str(cert), "--tls-key", str(key)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "SERVING" in ok.stdout
    refused = subprocess.run([*base, "--timeout", "2"], capture_output=True, text=True)
    assert refused.returncode == 1
    assert "UNAVAILABLE" in refused.stderr
    half = subprocess.run([*base, "--tls-cert", str(cert)], capture_output=True, text=True)
    assert half.returncode == 2


# ----- certificates that cannot serve: refused at start and on rotation, with the reason -----------------------


def _dated_server_cert(pki: Pki, directory: Path, *, start_days: float, days: float) -> tuple[Path, Path]:
    """A server certificate for localhost whose validity starts `start_days` from now (negative: in the past)."""
    start = dt.datetime.now(dt.UTC) + dt.timedelta(days=start_days)
    issued = certs.make_leaf(
        pki.ca,
        common_name="localhost",
        dns=("localhost",),
        ips=("127.0.0.1",),
        server=True,
        days=days,
        not_before=start,
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "server.pem", directory / "server-key.pem"
    issued.write(cert, key)
    return cert, key


@pytest.mark.parametrize(
    "start_days, days, message",
    [
        pytest.param(-30, 1, "the certificate expired on", id="expired"),
        pytest.param(2, 30, "the certificate is not valid before", id="not-yet-valid"),
    ],
)
async def test_a_server_certificate_outside_its_validity_stops_the_start(
    repo: Path, pki: Pki, tmp_path: Path, start_days: float, days: float, message: str
) -> None:
    """Clients would refuse every handshake with nothing in the server's log: the start stops with the reason."""
    cert, key = _dated_server_cert(pki, tmp_path / "dated", start_days=start_days, days=days)
    settings = ServerSettings(model_repository=repo, grpc_port=0, metrics_port=-1, tls_cert=cert, tls_key=key)
    with pytest.raises(CertificateError, match=f"{re.escape(str(cert))}: {message}"):
        await TensorgateServer(settings).start()


async def test_a_leaf_certificate_as_client_ca_stops_the_start(repo: Path, pki: Pki) -> None:
    """grpc core takes it, then verifies no client at all ("Socket closed" on every call)."""
    settings = ServerSettings(
        model_repository=repo,
        grpc_port=0,
        metrics_port=-1,
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.server_cert,
    )
    with pytest.raises(CertificateError, match="no CA certificate in the client CA bundle"):
        await TensorgateServer(settings).start()


def test_a_server_certificate_about_to_expire_is_loaded_with_a_warning(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = _dated_server_cert(pki, tmp_path / "short", start_days=-1, days=3)
    with caplog.at_level(logging.WARNING, logger="tensorgate.server.auth.tls"):
        load_files(TlsFiles(cert, key))
    (warning,) = [r.getMessage() for r in caplog.records]
    assert f"{cert}: the certificate expires on" in warning


def _started_a_moment_ago(pki: Pki, directory: Path) -> tuple[Path, Path, dt.datetime]:
    cert, key = _dated_server_cert(pki, directory, start_days=-0.5 / 86400, days=30)
    return cert, key, x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_before_utc


def test_a_rotation_waits_a_moment_past_the_new_certificates_start(pki: Pki, tmp_path: Path) -> None:
    """Served the instant it starts, a certificate is refused as not valid yet by a client whose clock is a tick
    behind (OpenSSL's `time()` is a coarse clock): the previous one serves ROTATION_SETTLE longer."""
    live = tmp_path / "live"
    shutil.copytree(pki.dir, live)
    files = TlsFiles(live / "server.pem", live / "server-key.pem")
    reloader = TlsReloader(files, lambda loaded: loaded.cert, "test port")
    cert, key, start = _started_a_moment_ago(pki, tmp_path / "new")
    _replace(cert, files.cert)
    _replace(key, files.key)
    assert reloader.poll() is None, "served before the settle had passed"
    assert reloader.value == pki.server_cert.read_bytes()
    settled = (start + ROTATION_SETTLE).timestamp()
    assert dt.datetime.now(dt.UTC).timestamp() < settled  # else the check above proved nothing
    new = None
    for _ in range(100):  # bounded: ROTATION_SETTLE from a start less than 2 s ago
        new = reloader.poll()
        if new is not None:
            break
        threading.Event().wait(0.05)
    assert new == cert.read_bytes()
    assert dt.datetime.now(dt.UTC).timestamp() >= settled


def test_a_rotation_away_from_an_expired_certificate_does_not_wait(pki: Pki, tmp_path: Path) -> None:
    """Once the served certificate has expired every client refuses it: waiting helps nobody."""
    expiring_cert, expiring_key = _dated_server_cert(pki, tmp_path / "expiring", start_days=-1, days=1 + 1 / 86400)
    files = TlsFiles(expiring_cert, expiring_key)
    reloader = TlsReloader(files, lambda loaded: loaded.cert, "test port")
    threading.Event().wait(max(0.0, reloader.not_after - dt.datetime.now(dt.UTC).timestamp() + 0.05))
    cert, key, _ = _started_a_moment_ago(pki, tmp_path / "new")
    _replace(cert, files.cert)
    _replace(key, files.key)
    assert reloader.poll() == cert.read_bytes()


# The two TLS ports follow the same files through one TlsReloader: each test below runs against both.
PORTS = [pytest.param("grpc", id="grpc-port"), pytest.param("metrics", id="metrics-port")]
PORT_LOGGERS = {"grpc": "tensorgate.server.auth.tls", "metrics": "tensorgate.server.telemetry.metrics"}


def _port_address(s: ServerThread, port: str) -> str:
    return s.address if port == "grpc" else f"127.0.0.1:{s.app.metrics_port}"


@pytest.mark.parametrize("port", PORTS)
def test_rotation_to_an_expired_certificate_is_refused_and_logged_once(
    repo: Path, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture, port: str
) -> None:
    live = tmp_path / "live"
    shutil.copytree(pki.dir, live)
    expired = _dated_server_cert(pki, tmp_path / "expired", start_days=-30, days=1)
    client, old_serial = pki.client("scorer"), pki.server.certificate.serial_number
    with ServerThread(repo, tls_cert=live / "server.pem", tls_key=live / "server-key.pem") as s:
        address = _port_address(s, port)
        with caplog.at_level(logging.WARNING, logger=PORT_LOGGERS[port]):
            _replace(expired[0], live / "server.pem")
            _replace(expired[1], live / "server-key.pem")
            for _ in range(3):  # each a new connection: each checks the files
                assert _presented_certificate(address, pki, client).serial_number == old_serial
                if port == "grpc":
                    with secure_channel(s.address, pki.ca_path) as channel:
                        np.testing.assert_array_equal(infer_add_sub(channel), EXPECTED)
                else:
                    scrape_text(metrics_url(s, "https"), ssl.create_default_context(cafile=pki.ca_path))
        if port == "grpc":
            assert s.app.tls is not None and s.app.tls.reloads == 0
    (warning,) = [r.getMessage() for r in caplog.records if r.name == PORT_LOGGERS[port]]
    assert "keeping the previous ones" in warning and "the certificate expired on" in warning
    assert warning.startswith(f"{port if port == 'metrics' else 'gRPC'} port: ")


def test_a_missing_tls_file_is_logged_once_not_per_connection(
    repo: Path, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    live = tmp_path / "live"
    shutil.copytree(pki.dir, live)
    https = ssl.create_default_context(cafile=pki.ca_path)
    with ServerThread(repo, tls_cert=live / "server.pem", tls_key=live / "server-key.pem") as s:
        with caplog.at_level(logging.WARNING):
            (live / "server-key.pem").unlink()  # a rotation that deletes before it writes
            for _ in range(5):  # new connections, each checking the files: the gRPC port's and the metrics port's
                with secure_channel(s.address, pki.ca_path) as channel:
                    np.testing.assert_array_equal(infer_add_sub(channel), EXPECTED)
                scrape_text(metrics_url(s, "https"), https)
        assert s.app.tls is not None and s.app.tls.reloads == 0
    for logger in ("tensorgate.server.auth.tls", "tensorgate.server.telemetry.metrics"):
        warnings = [r.getMessage() for r in caplog.records if r.name == logger]
        assert len(warnings) == 1 and "server-key.pem" in warnings[0], (logger, warnings)


@pytest.mark.parametrize("port", PORTS)
def test_rotation_to_a_certificate_not_valid_yet_waits_until_it_is(
    repo: Path, pki: Pki, tmp_path: Path, port: str
) -> None:
    """A certificate staged ahead of its start is refused until then, and served from then on without the files
    changing again: on the metrics port too, which once kept the old certificate until the files changed again."""
    live = tmp_path / "live"
    shutil.copytree(pki.dir, live)
    client = pki.client("scorer")
    with ServerThread(repo, tls_cert=live / "server.pem", tls_key=live / "server-key.pem") as s:
        address = _port_address(s, port)
        soon = _dated_server_cert(pki, tmp_path / "soon", start_days=3 / 86400, days=30)  # made after the start
        new_serial = x509.load_pem_x509_certificate(soon[0].read_bytes()).serial_number
        _replace(soon[0], live / "server.pem")
        _replace(soon[1], live / "server-key.pem")
        assert _presented_certificate(address, pki, client).serial_number == pki.server.certificate.serial_number
        serial = None
        for _ in range(300):  # bounded: valid 3 s from its making
            serial = _presented_certificate(address, pki, client).serial_number
            if serial == new_serial:
                break
            threading.Event().wait(0.1)
        assert serial == new_serial
        if port == "grpc":
            assert s.app.tls is not None and s.app.tls.reloads == 1
