"""Retries of tensorgate's refusals, and the Python client spread over replicas.

A refusal that a retry may pass (UNAVAILABLE: not loaded, draining; RESOURCE_EXHAUSTED: queue full) goes out
without a response message, so that gRPC's retry policies send it again; one that would fail again (a tensor over
a size limit, INVALID_ARGUMENT) is not retried. `load_balancing="round_robin"` sends each call to the next ready
address of its target, so that a retry goes to another replica, while gRPC's default, pick_first, keeps every call
and retry on one. Real servers on loopback; the server's own request counts say how often each call came."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from tensorgate.client import (
    AsyncInferenceClient,
    InferenceClient,
    InferResult,
    InvalidArgument,
    ResourceExhausted,
    RetryPolicy,
    StreamItemError,
    TensorgateClientError,
    Unavailable,
)
from tensorgate.client.config import ChannelSettings
from tests.onnx_models import ADD_SUB_CONFIG, add_sub_model, write_config
from tests.scraping import metrics_url, scrape
from tests.serving import ServerThread

CALLS = 30


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, ServerThread]]:
    root = tmp_path_factory.mktemp("balancing") / "models"
    add_sub_model(root / "add_sub" / "1" / "model.onnx")
    write_config(root, "add_sub", 'name: "add_sub"\n' + ADD_SUB_CONFIG)
    # The first replica answers UNAVAILABLE ("the model is not loaded") for add_sub, as a draining one would.
    # Tensors of 16 * 4 elements at most: 8 rows are over --max-tensor-elements (RESOURCE_EXHAUSTED, for good).
    limits = {"max_tensor_elements": 64}
    with (
        ServerThread(root, model_control_mode="explicit", **limits) as refusing,
        ServerThread(root, **limits) as serving,
    ):
        yield refusing, serving


def _inputs() -> dict[str, np.ndarray]:
    x = np.ones((1, 16), np.float32)
    return {"INPUT0": x, "INPUT1": x}


def _served(server: ServerThread) -> int:
    [model] = server.app.repository.versions("add_sub")
    return int(model.stats.inference_count)


def _outcomes(client: InferenceClient, calls: int) -> list[str]:
    """ "ok" or the error's code name, per call."""
    outcomes = []
    for _ in range(calls):
        try:
            np.testing.assert_array_equal(client.infer("add_sub", _inputs())["OUTPUT0"], np.full((1, 16), 2.0))
            outcomes.append("ok")
        except TensorgateClientError as exc:
            outcomes.append(exc.code.name)
    return outcomes


def _connected(client: InferenceClient) -> None:
    """Until a call has reached the serving replica: round_robin picks among the connections that are up, and the
    first calls may find only the other one."""
    deadline = time.monotonic() + 30
    while "ok" not in _outcomes(client, 1):
        assert time.monotonic() < deadline, "the serving replica was never reached"


def test_round_robin_retries_a_refusal_on_the_other_replica(replicas: tuple[ServerThread, ServerThread]) -> None:
    refusing, serving = replicas
    target = f"ipv4:{refusing.address},{serving.address}"
    retry = RetryPolicy(max_attempts=5)
    with InferenceClient(target, retry=retry, load_balancing="round_robin", timeout=30) as client:
        _connected(client)
        before = _served(serving)
        assert _outcomes(client, CALLS) == ["ok"] * CALLS  # every other pick is the refusing replica: retried
    assert _served(serving) - before == CALLS

    # gRPC's default keeps every call, and its retries, on one replica (whichever connected first).
    with InferenceClient(target, retry=retry, timeout=30) as client:
        outcomes = _outcomes(client, 10)
    assert len(set(outcomes)) == 1, outcomes


def _attempts(server: ServerThread, code: str) -> float:
    """Requests the server refused with `code` (tensorgate_inference_requests_total, summed over its labels)."""
    return sum(
        count
        for (name, labels), count in scrape(metrics_url(server)).items()
        if name == "tensorgate_inference_requests_total" and ("code", code) in labels
    )


def test_a_refusal_a_retry_may_pass_is_retried_and_one_that_cannot_is_not(
    replicas: tuple[ServerThread, ServerThread],
) -> None:
    """grpc.aio sends an empty response message before a status set with `set_code`: a call that got a message is
    committed, and no client retried tensorgate's UNAVAILABLE or RESOURCE_EXHAUSTED, whatever its RetryPolicy."""
    refusing, serving = replicas
    retry = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.05)
    with InferenceClient(refusing.address, retry=retry, timeout=30) as client:
        before = _attempts(refusing, "UNAVAILABLE")
        with pytest.raises(Unavailable):
            client.infer("add_sub", _inputs())  # not loaded there
        assert _attempts(refusing, "UNAVAILABLE") - before == 3
    with InferenceClient(serving.address, retry=retry, timeout=30) as client:
        before = _attempts(serving, "RESOURCE_EXHAUSTED")
        too_large = {"INPUT0": np.ones((8, 16), np.float32), "INPUT1": np.ones((8, 16), np.float32)}
        with pytest.raises(ResourceExhausted, match="--max-tensor-elements") as exhausted:
            client.infer("add_sub", too_large)
        assert _attempts(serving, "RESOURCE_EXHAUSTED") - before == 1  # over a size limit: it would be again
        # ... and the client says so: not retry_safe, though nothing ran.
        assert (exhausted.value.retry_safe, exhausted.value.permanent, exhausted.value.ran) == (False, True, False)

        async def streamed() -> list[InferResult | StreamItemError]:
            async with AsyncInferenceClient(serving.address, timeout=30) as stream_client:
                return [item async for item in stream_client.stream_infer([("add_sub", too_large)])]

        [item] = asyncio.run(streamed())
        assert isinstance(item, StreamItemError) and item.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (item.retry_safe, item.permanent, item.ran) == (False, True, False)
        before = _attempts(serving, "INVALID_ARGUMENT")
        with pytest.raises(InvalidArgument):
            client.infer("add_sub", {"INPUT0": np.ones((1, 15), np.float32), "INPUT1": np.ones((1, 15), np.float32)})
        assert _attempts(serving, "INVALID_ARGUMENT") - before == 1


def test_an_unknown_load_balancing_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="load_balancing must be one of pick_first, round_robin, not 'random'"):
        InferenceClient("127.0.0.1:1", load_balancing="random")
    assert ChannelSettings().load_balancing == "pick_first"


@pytest.mark.slow
def test_a_client_tries_a_lost_address_again_every_second() -> None:
    """gRPC's reconnect backoff grows to 120 s: a client kept failing calls for seconds after a restarted replica
    was back (2.8-3.9 s after a 12 s outage, measured). Counted here at a port that takes each connection and
    closes it, as a server going down does: gRPC's default waits 1, 1.6, 2.6, 4.1 s (4 or 5 attempts in 10 s), the
    client's at most 1 s (9 or 10)."""
    attempts = 0
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        listener.settimeout(0.05)
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        with InferenceClient(address, timeout=0.5) as client:
            end = time.monotonic() + 10
            while time.monotonic() < end:  # bounded: 10 s, one call at most every 0.1 s
                with contextlib.suppress(Unavailable, TensorgateClientError):
                    client.live()
                with contextlib.suppress(TimeoutError):
                    while True:
                        connection, _ = listener.accept()
                        connection.close()
                        attempts += 1
                time.sleep(0.05)
    assert attempts >= 7, attempts


def test_channel_options_replace_the_clients_own(replicas: tuple[ServerThread, ServerThread]) -> None:
    """gRPC keeps the first of two channel arguments with one name: a caller's option added after the client's
    own was ignored. A receive limit of 1 byte must fail the answer (the client's own limit is 4 GiB)."""
    options = [("grpc.max_receive_message_length", 1)]
    with InferenceClient(replicas[1].address, timeout=30, channel_options=options) as client:
        with pytest.raises(ResourceExhausted):
            client.metadata("add_sub")
