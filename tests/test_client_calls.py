"""Per-call options of tensorgate.client, and the calls a restrictive server policy meets: per-call `headers` and
request `parameters`, `tensorgate infer` for a caller who may infer but not read metadata, and the health of a
service the server does not report. Real server on loopback, bearer tokens through a real policy file."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tensorgate.client import (
    AsyncInferenceClient,
    InferenceClient,
    InferResult,
    InvalidArgument,
    NotFound,
    StreamItemError,
    Unauthenticated,
)
from tensorgate.protos import SERVICE_NAME
from tests.process import TENSORGATE
from tests.serving import ServerThread

WAIT = 10.0
TOKEN = "per-call-token"
# The identity of TOKEN may infer with add_sub, and nothing else: not read its metadata.
POLICY = {
    "rules": [{"identities": "batch-job", "apis": ["inference"], "models": ["add_sub"]}],
    "tokens": [{"sha256": hashlib.sha256(TOKEN.encode()).hexdigest(), "identity": "batch-job"}],
}
BEARER = {"authorization": f"Bearer {TOKEN}"}
X = np.arange(16, dtype=np.float32).reshape(1, 16)
ADD_SUB = {"INPUT0": X, "INPUT1": X}


@pytest.fixture
def token_server(repo: Path, tmp_path: Path) -> Iterator[ServerThread]:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(POLICY))
    with ServerThread(repo, auth_policy=path) as s:
        yield s


# ----- per-call headers ------------------------------------------------------------------------------------------


def test_per_call_headers_go_with_the_call_over_the_clients(token_server: ServerThread) -> None:
    """A service calling for many users sends each call's token with the call; it could only make a client per
    token before."""
    with InferenceClient(token_server.address, timeout=WAIT) as c:
        with pytest.raises(Unauthenticated):
            c.infer("add_sub", ADD_SUB)
        np.testing.assert_array_equal(c.infer("add_sub", ADD_SUB, headers=BEARER)["OUTPUT0"], X * 2)
    wrong = {"Authorization": "Bearer wrong"}
    with InferenceClient(token_server.address, timeout=WAIT, headers=wrong) as c:
        np.testing.assert_array_equal(c.infer("add_sub", ADD_SUB, headers=BEARER)["OUTPUT0"], X * 2)
        with pytest.raises(Unauthenticated):
            c.infer("add_sub", ADD_SUB)  # the client's own header again


async def test_per_call_headers_of_the_async_client_and_its_streams(token_server: ServerThread) -> None:
    async with AsyncInferenceClient(token_server.address, timeout=WAIT, headers={"x-team": "a"}) as c:
        result = await c.infer("add_sub", ADD_SUB, headers=BEARER)
        np.testing.assert_array_equal(result["OUTPUT0"], X * 2)
        items = [item async for item in c.stream_infer([("add_sub", ADD_SUB)] * 2, headers=BEARER)]
        assert [type(item) for item in items] == [InferResult, InferResult]
        with pytest.raises(Unauthenticated):
            _ = [item async for item in c.stream_infer([("add_sub", ADD_SUB)])]
        with pytest.raises(ValueError, match="header 'grpc-x'"):
            await c.infer("add_sub", ADD_SUB, headers={"grpc-x": "1"})


# ----- per-call request parameters -------------------------------------------------------------------------------


def test_request_parameters_reach_the_server(server: ServerThread) -> None:
    """tensorgate reads the request parameter "timeout" (Triton's queue timeout, in microseconds): a bad one is
    refused naming it, which only a request that carries it can be. Other names are passed on, as Triton does."""
    with InferenceClient(server.address, timeout=WAIT) as c:
        with pytest.raises(InvalidArgument, match="parameter 'timeout' must be a non-negative integer"):
            c.infer("add_sub", ADD_SUB, parameters={"timeout": -1})
        extra: dict[str, Any] = {"timeout": 10_000_000, "note": "x", "ratio": 0.5, "flag": True, "big": 2**63}
        np.testing.assert_array_equal(c.infer("add_sub", ADD_SUB, parameters=extra)["OUTPUT0"], X * 2)


async def test_request_parameters_of_stream_items(server: ServerThread) -> None:
    requests: list[Any] = [
        {"model": "add_sub", "inputs": ADD_SUB, "parameters": {"timeout": "soon"}, "request_id": "bad"},
        {"model": "add_sub", "inputs": ADD_SUB, "parameters": {"timeout": 10_000_000}, "request_id": "good"},
    ]
    async with AsyncInferenceClient(server.address, timeout=WAIT) as c:
        bad, good = [item async for item in c.stream_infer(requests)]
    assert isinstance(bad, StreamItemError) and "parameter 'timeout'" in bad.details
    assert isinstance(good, InferResult) and good.id == "good"


@pytest.mark.parametrize(
    "parameters, error, message",
    [
        pytest.param({"priority": 1}, ValueError, "'priority': set it with the priority= argument", id="priority"),
        pytest.param({"sequence_id": 7}, ValueError, "sequence_id= argument", id="sequence-id"),
        pytest.param({"n": np.int64(3)}, TypeError, "'n': expected bool, int, float or str, got int64", id="numpy"),
        pytest.param({"n": None}, TypeError, "'n': expected bool, int, float or str", id="none"),
        pytest.param({"n": 2**64}, ValueError, "'n': 18446744073709551616 is out of", id="too-big"),
    ],
)
async def test_bad_request_parameters_are_refused_before_the_call(
    server: ServerThread, parameters: dict[str, Any], error: type[Exception], message: str
) -> None:
    with InferenceClient(server.address, timeout=WAIT) as c, pytest.raises(error, match=message):
        c.infer("add_sub", ADD_SUB, parameters=parameters)
    async with AsyncInferenceClient(server.address, timeout=WAIT) as ac:
        with pytest.raises(error, match=message):
            await ac.infer("add_sub", ADD_SUB, parameters=parameters)


# ----- tensorgate infer without the metadata permission ----------------------------------------------------------


def _infer(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TENSORGATE_TOKEN": TOKEN}
    command = [TENSORGATE, "infer", "add_sub", *args, "--server", address, "--timeout", str(WAIT)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)


def test_infer_cli_without_the_metadata_permission(token_server: ServerThread, tmp_path: Path) -> None:
    """It read the metadata first for every JSON or float .npy input, and stopped at PERMISSION_DENIED for
    ModelMetadata, although the caller may infer. .npy files carry their dtypes and go without it; JSON inputs
    need it, and the refusal says so and what to do instead."""
    np.save(tmp_path / "x.npy", X)
    x = f"{tmp_path / 'x.npy'}"
    done = _infer(token_server.address, "--input", f"INPUT0={x}", "--input", f"INPUT1={x}")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["outputs"]["OUTPUT0"]["data"] == (X * 2).tolist()

    done = _infer(token_server.address, "--input", f"INPUT0={json.dumps(X.tolist())}", "--input", f"INPUT1={x}")
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("tensorgate infer: PERMISSION_DENIED: ")
    assert "JSON inputs INPUT0 their datatypes: give them as .npy files" in done.stderr


# ----- the health of a service the server does not report -------------------------------------------------------


async def test_health_of_an_unknown_service_says_what_it_is(server: ServerThread) -> None:
    """grpc.health.v1 answers NOT_FOUND without a message: the error said "(the server sent no details)"."""
    with InferenceClient(server.address, timeout=WAIT) as c:
        assert c.health(SERVICE_NAME) == "SERVING"
        with pytest.raises(NotFound) as sync_error:
            c.health("nope")
    async with AsyncInferenceClient(server.address, timeout=WAIT) as ac:
        with pytest.raises(NotFound) as async_error:
            await ac.health("nope")
    for error in (sync_error.value, async_error.value):
        assert error.details.startswith("the server does not report health for service 'nope'")
        assert f"'{SERVICE_NAME}'" in error.details and error.method == "Health.Check"


def test_health_cli_names_the_unknown_service(server: ServerThread) -> None:
    done = subprocess.run(
        [TENSORGATE, "health", "--server", server.address, "--service", "nope", "--timeout", str(WAIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert "NOT_FOUND: the server does not report health for service 'nope'" in done.stderr
