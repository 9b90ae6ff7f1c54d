"""How tensorgate.client fails, as a backend developer meets it: closed clients, TLS and address mistakes found
when the client is built or named when the handshake fails, an asyncio client made outside a loop, and errors
crossing process boundaries. Real servers on loopback, real TLS with certificates made in the test."""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import inspect
import multiprocessing
import pickle
import re
import subprocess
import sys
import textwrap
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

import tensorgate.client.errors as errors_module
from tensorgate.client import (
    AsyncInferenceClient,
    Cancelled,
    InferenceClient,
    RetryPolicy,
    StreamItemError,
    TensorgateClientError,
    TLSConfig,
    Unavailable,
)
from tests.pki import CHANNEL_OPTIONS, Pki
from tests.process import TENSORGATE, free_port
from tests.serving import ServerThread

WAIT = 10.0
X = np.arange(16, dtype=np.float32).reshape(1, 16)
ADD_SUB = {"INPUT0": X, "INPUT1": X}


@pytest.fixture
def served(repo: Path) -> Iterator[ServerThread]:
    with ServerThread(repo) as s:
        yield s


# ----- a closed client -------------------------------------------------------------------------------------------

# Every public method of each client, called as a user would; the tests check that none is left out.
SYNC_CALLS: dict[str, Callable[[InferenceClient], Any]] = {
    "infer": lambda c: c.infer("add_sub", ADD_SUB),
    "live": lambda c: c.live(),
    "ready": lambda c: c.ready("add_sub"),
    "health": lambda c: c.health(),
    "metadata": lambda c: c.metadata("add_sub"),
    "config": lambda c: c.config("add_sub"),
    "statistics": lambda c: c.statistics(),
    "load": lambda c: c.load("add_sub"),
    "unload": lambda c: c.unload("add_sub"),
    "submit_feedback": lambda c: c.submit_feedback("add_sub", "r", 1.0),
    "submit_feedback_batch": lambda c: c.submit_feedback_batch("add_sub", [("r", 1.0)]),
    "submit_feedback_stream": lambda c: list(c.submit_feedback_stream("add_sub", [("r", 1.0)])),
    "model_quality": lambda c: c.model_quality("add_sub"),
    "model_drift": lambda c: c.model_drift("add_sub"),
    "alerts": lambda c: c.alerts(),
    "rollout": lambda c: c.rollout("add_sub"),
}


async def _collect(items: Any) -> list[Any]:
    return [item async for item in items]


ASYNC_CALLS: dict[str, Callable[[AsyncInferenceClient], Awaitable[Any]]] = {
    "infer": lambda c: c.infer("add_sub", ADD_SUB),
    "stream_infer": lambda c: _collect(c.stream_infer([("add_sub", ADD_SUB)])),
    "live": lambda c: c.live(),
    "ready": lambda c: c.ready("add_sub"),
    "health": lambda c: c.health(),
    "metadata": lambda c: c.metadata("add_sub"),
    "config": lambda c: c.config("add_sub"),
    "statistics": lambda c: c.statistics(),
    "load": lambda c: c.load("add_sub"),
    "unload": lambda c: c.unload("add_sub"),
    "submit_feedback": lambda c: c.submit_feedback("add_sub", "r", 1.0),
    "submit_feedback_batch": lambda c: c.submit_feedback_batch("add_sub", [("r", 1.0)]),
    "submit_feedback_stream": lambda c: _collect(c.submit_feedback_stream("add_sub", [("r", 1.0)])),
    "model_quality": lambda c: c.model_quality("add_sub"),
    "model_drift": lambda c: c.model_drift("add_sub"),
    "alerts": lambda c: c.alerts(),
    "rollout": lambda c: c.rollout("add_sub"),
}


def _calls_of(cls: type) -> set[str]:
    return {name for name, _ in inspect.getmembers(cls, inspect.isfunction) if not name.startswith("_")} - {"close"}


def test_the_closed_client_tables_cover_every_call() -> None:
    assert set(SYNC_CALLS) == _calls_of(InferenceClient)
    assert set(ASYNC_CALLS) == _calls_of(AsyncInferenceClient)


def test_every_call_on_a_closed_sync_client_is_cancelled(served: ServerThread) -> None:
    """gRPC raised ValueError("Cannot invoke RPC on closed channel!") for every call after close()."""
    client = InferenceClient(served.address, timeout=WAIT)
    assert client.live()
    client.close()
    for name, call in SYNC_CALLS.items():
        with pytest.raises(Cancelled, match="the client is closed") as info:
            call(client)
        assert info.value.method and not info.value.retry_safe, name


async def test_every_call_on_a_closed_async_client_is_cancelled(served: ServerThread) -> None:
    """`health` and `stream_infer` bypassed the client's check and raised grpc.aio.UsageError."""
    client = AsyncInferenceClient(served.address, timeout=WAIT)
    assert await client.live()
    await client.close()
    for name, call in ASYNC_CALLS.items():
        with pytest.raises(Cancelled, match="the client is closed") as info:
            await call(client)
        assert info.value.method, name


# ----- TLS files and addresses, checked when the client is built --------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.mark.parametrize(
    "case, error, message",
    [
        pytest.param("ca-without-certificate", ValueError, "ca_file .*key.pem: no PEM certificate", id="ca-is-a-key"),
        pytest.param("ca-not-pem", ValueError, "ca_file .*notes.txt: no PEM certificate", id="ca-not-pem"),
        pytest.param("cert-is-a-key", ValueError, "cert_file .*key.pem: no PEM certificate", id="cert-is-a-key"),
        pytest.param("other-key", ValueError, "key_file .*other-key.pem: not the .*private key of", id="key-mismatch"),
        pytest.param(
            "key-is-a-cert",
            ValueError,
            "key_file .*scorer.pem: no unencrypted PEM private key in it$",
            id="key-is-a-cert",
        ),
        pytest.param(
            "encrypted-key",
            ValueError,
            "key_file .*locked.pem: no unencrypted PEM private key in it$",
            id="encrypted-key",
        ),
        pytest.param("missing-key", FileNotFoundError, "key_file .*missing.pem: No such file", id="missing-key"),
    ],
)
def test_tls_files_that_cannot_work_are_refused_when_built(
    pki: Pki, tmp_path: Path, case: str, error: type[Exception], message: str
) -> None:
    """gRPC took each of these and failed every call with UNAVAILABLE, retry_safe (RetryPolicy retried them)."""
    cert, key = pki.client("scorer")
    _, other_key = pki.client("other")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a certificate\n")
    locked = tmp_path / "locked.pem"
    private_key = serialization.load_pem_private_key(key.read_bytes(), password=None)
    encryption = serialization.BestAvailableEncryption(b"secret")
    locked.write_bytes(
        private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    )
    kwargs: dict[str, Any] = {
        "ca-without-certificate": {"ca_file": key},
        "ca-not-pem": {"ca_file": notes},
        "cert-is-a-key": {"ca_file": pki.ca_path, "cert_file": key, "key_file": key},
        "other-key": {"ca_file": pki.ca_path, "cert_file": cert, "key_file": other_key},
        "key-is-a-cert": {"ca_file": pki.ca_path, "cert_file": cert, "key_file": cert},
        "encrypted-key": {"ca_file": pki.ca_path, "cert_file": cert, "key_file": locked},
        "missing-key": {"ca_file": pki.ca_path, "cert_file": cert, "key_file": tmp_path / "missing.pem"},
    }[case]
    with pytest.raises(error, match=message):
        TLSConfig(**kwargs)
    TLSConfig(pki.ca_path, cert, key)  # the right files still make one


def test_cli_names_the_flag_of_a_key_that_is_not_the_certificates(pki: Pki) -> None:
    """`tensorgate health` (as every command that calls a server) took the files and reported UNAVAILABLE."""
    cert, _ = pki.client("scorer")
    _, other_key = pki.client("other")
    flags = ["--tls-ca", str(pki.ca_path), "--tls-cert", str(cert), "--tls-key", str(other_key)]
    done = subprocess.run(
        [TENSORGATE, "health", "--server", f"127.0.0.1:{free_port()}", *flags, "--timeout", "5"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"tensorgate health: --tls-key {other_key}: not the ")
    assert f"private key of --tls-cert {cert}" in done.stderr


def _rsa_client(pki: Pki, name: str, bits: int) -> tuple[Path, Path]:
    """A client certificate with an RSA key of `bits`, signed by pki's CA (tensorgate's certs make ECDSA keys)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(pki.ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=1))
        .sign(pki.ca.private_key, hashes.SHA256())
    )
    cert, key_file = pki.dir / f"{name}.pem", pki.dir / f"{name}-key.pem"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key_file.write_bytes(key_pem)
    return cert, key_file


def test_an_rsa_1024_client_certificate_that_grpc_takes_is_not_refused(repo: Path, pki: Pki) -> None:
    """TLSConfig refused it as "not the (unencrypted, PEM) private key of cert_file ... (EE_KEY_TOO_SMALL)": the
    check ran at OpenSSL's default security level, which judges key sizes, and gRPC's TLS takes the pair."""
    cert, key = _rsa_client(pki, "legacy", 1024)
    tls = TLSConfig(pki.ca_path, cert, key)
    with ServerThread(repo, **pki.server_settings()) as s:
        with InferenceClient(s.address, tls=tls, timeout=WAIT, channel_options=CHANNEL_OPTIONS) as c:
            assert c.live()  # a real mTLS handshake with the RSA-1024 pair
    _, other_key = _rsa_client(pki, "other", 1024)
    mismatch = f"key_file {other_key}: not the private key of cert_file {cert} (KEY_VALUES_MISMATCH)"
    with pytest.raises(ValueError, match=re.escape(mismatch)):
        TLSConfig(pki.ca_path, cert, other_key)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8001", "https://127.0.0.1:8001/", "grpc://127.0.0.1:8001"])
def test_urls_with_a_scheme_are_refused_with_the_address_to_use(url: str) -> None:
    """gRPC looked 'http://...' up as a host name: every call UNAVAILABLE and retry-safe, never a hint."""
    for make in (InferenceClient, AsyncInferenceClient):
        with pytest.raises(ValueError, match="without a scheme: use '127.0.0.1:8001'"):
            make(url)


# ----- handshakes the client refuses -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case, hint",
    [
        pytest.param("server-not-trusted", "not signed by the CA", id="server-not-trusted"),
        pytest.param("name-mismatch", "does not name the host", id="name-mismatch"),
        pytest.param("tls-to-plaintext-port", "does not speak TLS", id="tls-to-plaintext-port"),
    ],
)
async def test_a_failed_tls_handshake_says_so_and_is_not_retry_safe(
    repo: Path, pki: Pki, tmp_path: Path, case: str, hint: str
) -> None:
    """Such a call failed as a bare UNAVAILABLE "failed to connect to all addresses" with retry_safe True, like a
    server that is down; it can only succeed once the certificates or the address change."""
    other = Pki(tmp_path / "other", ca_name="other CA")
    settings = {} if case == "tls-to-plaintext-port" else pki.server_settings(mutual=False)
    with ServerThread(repo, **settings) as s:
        address = s.address
        tls = TLSConfig(other.ca_path if case == "server-not-trusted" else pki.ca_path)
        if case == "name-mismatch":
            tls = TLSConfig(pki.ca_path, server_name_override="elsewhere.example")
        with InferenceClient(address, tls=tls, timeout=WAIT, channel_options=CHANNEL_OPTIONS) as c:
            with pytest.raises(Unavailable) as sync_error:
                c.live()
        retry = RetryPolicy(max_attempts=2, initial_backoff_s=0.01, max_backoff_s=0.01)
        options = CHANNEL_OPTIONS
        async with AsyncInferenceClient(address, tls=tls, timeout=WAIT, retry=retry, channel_options=options) as ac:
            with pytest.raises(Unavailable) as async_error:
                await ac.infer("add_sub", ADD_SUB)
    for error in (sync_error.value, async_error.value):
        assert error.code == grpc.StatusCode.UNAVAILABLE and not error.retry_safe
        assert error.details.startswith("TLS handshake failed: ") and hint in error.details
        assert "failed to connect to all addresses" in error.details  # gRPC's own words are kept


async def test_a_server_that_is_down_stays_retry_safe() -> None:
    """The handshake check reads only gRPC's connection failures: connection refused is still worth retrying."""
    async with AsyncInferenceClient(f"127.0.0.1:{free_port()}", timeout=WAIT) as ac:
        with pytest.raises(Unavailable) as info:
            await ac.live()
    assert info.value.retry_safe and not info.value.details.startswith("TLS")


# ----- an asyncio client made outside a loop ----------------------------------------------------------------------

OUTSIDE_A_LOOP = """
import asyncio, sys, threading
import numpy as np
from tensorgate.client import AsyncInferenceClient

client = AsyncInferenceClient(sys.argv[1], timeout=10)  # at import time, as a FastAPI app keeps one

async def call():
    x = np.ones((1, 16), np.float32)
    return float((await client.infer("add_sub", {"INPUT0": x, "INPUT1": x}))["OUTPUT0"][0, 0])

print("first loop", asyncio.run(call()))
print("second loop", asyncio.run(call()))  # the first loop has ended: its channel with it
other = asyncio.new_event_loop()  # a loop that stays open while another tries the client
threading.Thread(target=other.run_forever, daemon=True).start()
print("loop of a thread", asyncio.run_coroutine_threadsafe(call(), other).result(10))
try:
    asyncio.run(call())
except RuntimeError as exc:
    print("two live loops:", exc)
asyncio.run_coroutine_threadsafe(client.close(), other).result(10)
"""


def test_an_async_client_made_outside_a_loop_works_in_the_loop_that_uses_it(served: ServerThread) -> None:
    """It failed with "... attached to a different loop" (or "Event loop is closed" on a second asyncio.run)."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(OUTSIDE_A_LOOP), served.address],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:3] == ["first loop 2.0", "second loop 2.0", "loop of a thread 2.0"], done.stdout + done.stderr
    assert lines[3].startswith("two live loops: AsyncInferenceClient(") and "another event loop" in lines[3]
    assert "Traceback" not in done.stderr


def test_two_loops_making_their_first_call_at_once_get_one_channel(served: ServerThread) -> None:
    """Both first calls could make a channel and succeed, one channel lost (about one try in two with Python's thread
    switch interval at a microsecond); the "another event loop" error then hit a later call instead of the first."""
    loops = [asyncio.new_event_loop() for _ in range(2)]
    threads = [threading.Thread(target=loop.run_forever, daemon=True) for loop in loops]
    for thread in threads:
        thread.start()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns often, as on a busy machine, so the first calls interleave
    try:
        for attempt in range(40):
            client = AsyncInferenceClient(served.address, timeout=WAIT)
            both_ready = threading.Barrier(2)

            async def first_call(client: AsyncInferenceClient = client, ready: threading.Barrier = both_ready) -> bool:
                ready.wait(WAIT)  # blocks this loop's thread only: the two calls start together
                return await client.live()

            calls = [asyncio.run_coroutine_threadsafe(first_call(), loop) for loop in loops]
            failures = [call.exception(WAIT) for call in calls]
            refused = [isinstance(f, RuntimeError) and "another event loop" in str(f) for f in failures]
            assert sorted(refused) == [False, True], (attempt, failures)
            winner = refused.index(False)
            assert calls[winner].result() is True
            asyncio.run_coroutine_threadsafe(client.close(), loops[winner]).result(WAIT)
    finally:
        sys.setswitchinterval(interval)
        for loop in loops:
            loop.call_soon_threadsafe(loop.stop)
        for thread in threads:
            thread.join(WAIT)
        for loop in loops:
            loop.close()


# ----- errors across processes -----------------------------------------------------------------------------------


def _every_error() -> list[TensorgateClientError]:
    classes = [
        getattr(errors_module, name)
        for name in errors_module.__all__
        if isinstance(getattr(errors_module, name), type)
        and issubclass(getattr(errors_module, name), TensorgateClientError)
    ]
    made: list[TensorgateClientError] = []
    for cls in classes:
        if cls is StreamItemError:
            made.append(StreamItemError("model failed", request_id="s-3", model="m", version="2"))
        else:
            made.append(cls("no such model 'm'", method="ModelInfer", ran=cls is Unavailable))
    assert len(made) == len(classes) > 10
    return made


@pytest.mark.parametrize("error", _every_error(), ids=lambda e: type(e).__name__)
def test_every_error_survives_pickling(error: TensorgateClientError) -> None:
    """A ProcessPoolExecutor (or a task queue) pickles what its worker raised: StreamItemError failed to unpickle
    (its keyword-only arguments) and the others came back with the message as details and the code lost."""
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error)
    assert (back.code, back.details, back.method, back.ran, back.retry_safe) == (
        error.code,
        error.details,
        error.method,
        error.ran,
        error.retry_safe,
    )
    assert str(back) == str(error) and back.args == error.args
    if isinstance(error, StreamItemError):
        assert isinstance(back, StreamItemError)
        assert (back.request_id, back.model, back.version, back.id) == ("s-3", "m", "2", "s-3")


def test_an_error_raised_in_a_worker_process_arrives_whole() -> None:
    spawn = multiprocessing.get_context("spawn")  # not fork: this process runs gRPC's threads
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
        future = pool.submit(_raise_stream_item_error)
        with pytest.raises(StreamItemError) as info:
            future.result(60)
    assert info.value.request_id == "r-1" and info.value.details == "boom"


def _raise_stream_item_error() -> None:
    raise StreamItemError("boom", request_id="r-1", model="m", version="1")
