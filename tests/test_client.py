"""tensorgate.client against real servers over real gRPC: results, typed errors, deadlines, streams, retries, TLS.

Most tests share one module-scoped tensorgate (`server`). Retries and TLS use a small grpc.aio server of our own
(`Scripted`, a servicer that answers what the test scripts) because tensorgate cannot be told to refuse exactly
N attempts, and because the server's TLS lands with the security issue.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import json
import logging
import math
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tensorgate.client as client_pkg
from tensorgate.client import (
    AsyncInferenceClient,
    Cancelled,
    DeadlineExceeded,
    InferenceClient,
    InferResult,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ResponseFormatError,
    RetryPolicy,
    StreamItemError,
    TensorgateClientError,
    TLSConfig,
    Unavailable,
)
from tensorgate.client._common import MAX_TIMEOUT_S
from tensorgate.protos import GRPCInferenceServiceServicer, add_GRPCInferenceServiceServicer_to_server, tensors
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos import model_config_pb2 as mc
from tests.certificates import SERVER_NAME, make_pki
from tests.onnx_models import (
    ADD_SUB_CONFIG,
    ONNX_ELEM,
    add_sub_model,
    busy_model,
    identity_model,
    scale_model,
    tile_model,
    write_config,
)
from tests.process import free_port
from tests.serving import ServerThread
from tests.test_poll import wait_for

WAIT = 10.0
DATATYPES = sorted(ONNX_ELEM)
HELD_DELAY_S = 1.5

# ----- the shared server -----------------------------------------------------------------------------------------


def _repository(root: Path) -> Path:
    add_sub_model(root / "add_sub" / "1" / "model.onnx")
    write_config(root, "add_sub", 'name: "add_sub"\n' + ADD_SUB_CONFIG)
    for datatype in DATATYPES:
        identity_model(root / f"identity_{datatype.lower()}" / "1" / "model.onnx", datatype, ("batch", "n"))
    scale_model(root / "scaled" / "1" / "model.onnx", 1.0)
    scale_model(root / "scaled" / "2" / "model.onnx", 2.0)
    write_config(root, "scaled", 'name: "scaled"\nbackend: "onnxruntime"\nversion_policy: { all { } }\n')
    busy_model(root / "held" / "1" / "model.onnx", iterations=10)
    write_config(
        root,
        "held",
        f"""
name: "held"
max_batch_size: 8
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: {int(HELD_DELAY_S * 1e6)}
                    default_queue_policy {{ max_queue_size: 1 }} }}
""",
    )
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    with ServerThread(_repository(tmp_path_factory.mktemp("client") / "models")) as s:
        yield s


@pytest.fixture(scope="module")
def sync_client(server: ServerThread) -> Iterator[InferenceClient]:
    with InferenceClient(server.address, timeout=WAIT) as c:
        yield c


@pytest.fixture
async def aio_client(server: ServerThread) -> AsyncIterator[AsyncInferenceClient]:
    async with AsyncInferenceClient(server.address, timeout=WAIT) as c:
        yield c


def add_sub_inputs(rows: int = 2) -> dict[str, np.ndarray]:
    x = np.arange(rows * 16, dtype=np.float32).reshape(rows, 16)
    return {"INPUT0": x, "INPUT1": np.full_like(x, 3.0)}


def closed_port() -> str:
    """An address where nothing listens: a port the OS just handed out and took back."""
    return f"127.0.0.1:{free_port()}"


# ----- the package -----------------------------------------------------------------------------------------------


def test_all_matches_public_names() -> None:
    public = {
        name
        for name, value in vars(client_pkg).items()
        if not name.startswith("_") and not inspect.ismodule(value) and name != "annotations"
    }
    assert sorted(client_pkg.__all__) == sorted(public)
    assert all(hasattr(client_pkg, name) for name in client_pkg.__all__)


def test_client_does_not_import_the_server() -> None:
    code = "import sys, tensorgate.client; print(any(m.startswith('tensorgate.server') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----- inference -------------------------------------------------------------------------------------------------


def test_sync_infer(sync_client: InferenceClient) -> None:
    inputs = add_sub_inputs()
    result = sync_client.infer("add_sub", inputs, request_id="r-1", priority=0)
    assert isinstance(result, InferResult)
    assert (result.model, result.version, result.id) == ("add_sub", "1", "r-1")
    assert list(result) == ["OUTPUT0", "OUTPUT1"] and len(result) == 2
    np.testing.assert_array_equal(result["OUTPUT0"], inputs["INPUT0"] + 3)
    np.testing.assert_array_equal(result.outputs["OUTPUT1"], inputs["INPUT0"] - 3)


async def test_async_infer_picks_outputs_and_versions(aio_client: AsyncInferenceClient) -> None:
    inputs = add_sub_inputs(1)
    result = await aio_client.infer("add_sub", inputs, outputs=["OUTPUT1"])
    assert list(result.outputs) == ["OUTPUT1"]
    x = {"INPUT0": np.ones((1, 4), np.float32)}
    versions: list[tuple[str | int | None, float]] = [(1, 1.0), ("2", 2.0), (None, 2.0)]
    for version, factor in versions:
        result = await aio_client.infer("scaled", x, version=version)
        assert result.version == str(version or 2)
        np.testing.assert_array_equal(result["OUTPUT0"], x["INPUT0"] * factor)


def test_bytes_from_str_arrays(sync_client: InferenceClient) -> None:
    result = sync_client.infer("identity_bytes", {"INPUT0": np.array([["a", "bé", "", "d"]])})
    assert result["OUTPUT0"].dtype == object
    assert result["OUTPUT0"].tolist() == [[b"a", "bé".encode(), b"", b"d"]]


def test_inputs_that_cannot_be_sent_fail_before_the_call(sync_client: InferenceClient) -> None:
    with pytest.raises(TypeError, match="'INPUT0': expected a numpy array"):
        sync_client.infer("add_sub", {"INPUT0": [1.0, 2.0]})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="'INPUT0'.*complex"):
        sync_client.infer("add_sub", {"INPUT0": np.zeros(2, np.complex64)})


@st.composite
def tensors_of_every_type(draw: st.DrawFn) -> tuple[str, np.ndarray]:
    datatype = draw(st.sampled_from(DATATYPES))
    shape = (draw(st.integers(1, 4)), draw(st.integers(0, 5)))
    if datatype == "BYTES":
        count = shape[0] * shape[1]
        # ONNX strings are text: the server refuses non-UTF-8 BYTES for them (tested in test_bad_input).
        items = draw(st.lists(st.text(max_size=6).map(str.encode), min_size=count, max_size=count))
        array = np.empty(count, dtype=object)
        array[:] = items
        return datatype, array.reshape(shape)
    dtype = tensors.BY_NAME[datatype].np_dtype
    if datatype == "BF16":  # hypothesis has no bfloat16: any 16 bits, NaN payloads included
        return datatype, draw(hnp.arrays(np.uint16, shape)).view(dtype)
    return datatype, draw(hnp.arrays(dtype, shape))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=tensors_of_every_type())
def test_every_datatype_round_trips(sync_client: InferenceClient, case: tuple[str, np.ndarray]) -> None:
    datatype, x = case
    out = sync_client.infer(f"identity_{datatype.lower()}", {"INPUT0": x})["OUTPUT0"]
    assert out.shape == x.shape and out.dtype == x.dtype
    if datatype == "BYTES":
        assert out.tolist() == x.tolist()
    else:
        assert out.tobytes() == x.tobytes()  # bit for bit: NaN payloads, -0.0 and all


# ----- health, metadata, repository ------------------------------------------------------------------------------


def test_health_and_metadata(sync_client: InferenceClient) -> None:
    assert sync_client.live() and sync_client.ready()
    assert sync_client.ready("add_sub") and sync_client.ready("scaled", version=1)
    assert not sync_client.ready("no_such_model")
    assert sync_client.health() == "SERVING"
    assert sync_client.health("inference.GRPCInferenceService") == "SERVING"
    meta = sync_client.metadata("add_sub")
    assert (meta.name, meta.versions, meta.platform) == ("add_sub", ("1",), "onnxruntime_onnx")
    assert [(t.name, t.datatype, t.shape) for t in meta.inputs] == [
        ("INPUT0", "FP32", (-1, 16)),
        ("INPUT1", "FP32", (-1, 16)),
    ]
    config = sync_client.config("add_sub")
    assert isinstance(config, mc.ModelConfig) and config.max_batch_size == 8
    sync_client.infer("add_sub", add_sub_inputs())
    stats = sync_client.statistics("add_sub")
    assert [s.name for s in stats.model_stats] == ["add_sub"] and stats.model_stats[0].inference_count >= 2
    assert {s.name for s in sync_client.statistics().model_stats} >= {"add_sub", "scaled", "held"}


async def test_async_health_and_metadata(aio_client: AsyncInferenceClient) -> None:
    assert await aio_client.live() and await aio_client.ready() and await aio_client.ready("add_sub")
    assert not await aio_client.ready("no_such_model")
    assert await aio_client.health() == "SERVING"
    assert (await aio_client.metadata("scaled", version=1)).versions == ("1", "2")
    assert (await aio_client.config("scaled")).name == "scaled"
    assert isinstance(await aio_client.statistics(), pb.ModelStatisticsResponse)


def test_load_and_unload(tmp_path: Path) -> None:
    root = tmp_path / "models"
    identity_model(root / "idx" / "1" / "model.onnx", "FP32")
    with ServerThread(root, model_control_mode="explicit") as s, InferenceClient(s.address, timeout=WAIT) as c:
        assert not c.ready("idx")
        c.load("idx", config={"max_batch_size": 2})
        assert c.ready("idx") and c.config("idx").max_batch_size == 2
        c.load("idx", config=mc.ModelConfig(max_batch_size=3))
        assert c.config("idx").max_batch_size == 3
        c.unload("idx")
        assert not c.ready("idx")
        with pytest.raises(InvalidArgument):
            c.load("idx", config="{not json")


async def test_async_load_and_unload(tmp_path: Path) -> None:
    root = tmp_path / "models"
    identity_model(root / "idx" / "1" / "model.onnx", "FP32")
    with ServerThread(root, model_control_mode="explicit") as s:
        async with AsyncInferenceClient(s.address, timeout=WAIT) as c:
            await c.load("idx", config=json.dumps({"max_batch_size": 2}))
            assert await c.ready("idx")
            await c.unload("idx")
            assert not await c.ready("idx")


# ----- errors and deadlines --------------------------------------------------------------------------------------


def test_unknown_model_is_not_found(sync_client: InferenceClient) -> None:
    with pytest.raises(NotFound) as info:
        sync_client.infer("no_such_model", add_sub_inputs())
    err = info.value
    assert err.code == grpc.StatusCode.NOT_FOUND and not err.retry_safe and err.method == "ModelInfer"
    assert "'no_such_model'" in err.details and str(err).startswith("ModelInfer: NOT_FOUND: ")
    assert isinstance(err.__cause__, grpc.RpcError)
    with pytest.raises(NotFound):
        sync_client.metadata("no_such_model")
    with pytest.raises(NotFound):
        sync_client.health("no.such.Service")


async def test_async_errors_are_typed(aio_client: AsyncInferenceClient) -> None:
    with pytest.raises(NotFound):
        await aio_client.infer("no_such_model", add_sub_inputs())
    with pytest.raises(InvalidArgument) as info:
        await aio_client.infer("add_sub", {"INPUT0": np.zeros((1, 16), np.float32)})
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "INPUT1" in info.value.details
    with pytest.raises(Unavailable) as unavailable:
        await aio_client.load("add_sub")  # repository RPCs need explicit mode
    # ... for the server's life: sending it again would be refused again.
    assert not unavailable.value.retry_safe and unavailable.value.permanent


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_server_down_is_unavailable(kind: str) -> None:
    address = closed_port()
    if kind == "sync":
        with InferenceClient(address, timeout=WAIT) as c, pytest.raises(Unavailable) as info:
            c.infer("add_sub", add_sub_inputs())
    else:
        async with AsyncInferenceClient(address, timeout=WAIT) as ac:
            with pytest.raises(Unavailable) as info:
                await ac.infer("add_sub", add_sub_inputs())
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and info.value.retry_safe


def test_full_queue_is_resource_exhausted(server: ServerThread) -> None:
    """`held` keeps a request queued for 1.5 s and queues one at most: a second caller is refused at once."""
    x = {"INPUT0": np.ones((1, 4), np.float32)}
    with InferenceClient(server.address, timeout=WAIT) as c:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            queued = pool.submit(c.infer, "held", x)
            held = server.app.repository.get("held", "").scheduler
            wait_for("the first request in the queue", lambda: held.queued == 1)  # not a sleep: a loaded CI is slow
            with pytest.raises(ResourceExhausted) as info:
                c.infer("held", x)
            assert not queued.done()
            np.testing.assert_array_equal(queued.result(WAIT)["OUTPUT0"], x["INPUT0"] * 2)
    assert info.value.retry_safe and "max_queue_size 1" in info.value.details


@pytest.mark.parametrize(
    ("client_timeout", "call_timeout"),
    [pytest.param(0.3, None, id="client-default"), pytest.param(WAIT, 0.3, id="per-call")],
)
async def test_every_call_has_a_deadline(
    server: ServerThread, client_timeout: float, call_timeout: float | None
) -> None:
    """`held` keeps a lone request for 1.5 s, longer than the deadline."""
    x = {"INPUT0": np.ones((1, 4), np.float32)}
    async with AsyncInferenceClient(server.address, timeout=client_timeout) as c:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded) as info:
            await c.infer("held", x, timeout=call_timeout)
        assert time.monotonic() - started < HELD_DELAY_S
    assert not info.value.retry_safe
    await asyncio.sleep(HELD_DELAY_S)  # let the abandoned request leave the queue before other tests use it


def test_timeouts_must_be_positive(server: ServerThread) -> None:
    with pytest.raises(ValueError, match="timeout"):
        InferenceClient(server.address, timeout=0)
    with InferenceClient(server.address) as c, pytest.raises(ValueError, match="timeout"):
        c.live(timeout=-1)


async def test_timeouts_of_years_and_infinity_mean_no_deadline(server: ServerThread) -> None:
    """gRPC takes a deadline of 1e10 s or more for one already passed: such timeouts (math.inf, the obvious way
    to ask for none) failed every call at once with DEADLINE_EXCEEDED. They are capped at MAX_TIMEOUT_S."""
    x = add_sub_inputs(1)
    with InferenceClient(server.address, timeout=math.inf) as c:
        assert c.live() and c.timeout == MAX_TIMEOUT_S
        np.testing.assert_array_equal(c.infer("add_sub", x, timeout=1e11)["OUTPUT0"], x["INPUT0"] + x["INPUT1"])
    async with AsyncInferenceClient(server.address, timeout=1e12) as ac:
        assert await ac.live()
        result = await ac.infer("add_sub", x, timeout=math.inf)
        np.testing.assert_array_equal(result["OUTPUT0"], x["INPUT0"] + x["INPUT1"])


async def test_closing_the_async_client_fails_its_calls_with_cancelled(server: ServerThread) -> None:
    """As with the sync client: a call running when the client closes, and one made after, raise Cancelled (a
    TensorgateClientError), not asyncio.CancelledError, which `except Exception` and TaskGroups read as the
    task's own cancellation. A task that is itself cancelled still gets CancelledError."""
    x = {"INPUT0": np.ones((1, 4), np.float32)}
    c = AsyncInferenceClient(server.address, timeout=WAIT)
    running = asyncio.ensure_future(c.infer("held", x))  # held: kept 1.5 s in the queue
    await asyncio.sleep(0.3)
    await c.close()
    with pytest.raises(Cancelled, match="closed while the call ran"):
        await asyncio.wait_for(running, WAIT)
    with pytest.raises(Cancelled, match="the client is closed"):
        await c.live()
    async with AsyncInferenceClient(server.address, timeout=WAIT) as other:
        task = asyncio.ensure_future(other.infer("held", x))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await asyncio.sleep(HELD_DELAY_S)  # let the abandoned requests leave the queue before other tests use it


# ----- streams ---------------------------------------------------------------------------------------------------


async def test_stream_yields_results_and_item_errors(aio_client: AsyncInferenceClient) -> None:
    inputs = add_sub_inputs(1)
    requests: list[Any] = [
        ("add_sub", inputs),
        {"model": "no_such_model", "inputs": inputs, "request_id": "missing"},
        {"model": "add_sub", "inputs": inputs, "outputs": ["OUTPUT1"], "request_id": "only-1", "priority": 0},
        {"model": "scaled", "inputs": {"INPUT0": np.ones((1, 4), np.float32)}, "version": 1},
    ]
    items = [item async for item in aio_client.stream_infer(requests)]
    stream = items[0].id.removesuffix("-0")  # the prefix the client drew for this stream's ids
    by_id = {item.id.removeprefix(f"{stream}-"): item for item in items}  # results and errors alike
    assert sorted(by_id) == ["0", "3", "missing", "only-1"]
    ok = by_id["0"]
    assert isinstance(ok, InferResult)
    np.testing.assert_array_equal(ok["OUTPUT0"], inputs["INPUT0"] + 3)
    assert isinstance(by_id["only-1"], InferResult) and list(by_id["only-1"].outputs) == ["OUTPUT1"]
    assert isinstance(by_id["3"], InferResult) and by_id["3"].version == "1"
    failed = by_id["missing"]
    assert isinstance(failed, StreamItemError) and isinstance(failed, TensorgateClientError)
    assert failed.model == "no_such_model" and "'no_such_model'" in failed.details and not failed.retry_safe
    assert failed.code == grpc.StatusCode.NOT_FOUND  # from the item's parameters: the stream carries no status
    assert failed.id == failed.request_id == "missing"


async def test_stream_takes_an_async_iterable(aio_client: AsyncInferenceClient) -> None:
    async def requests() -> AsyncIterator[Any]:
        for i in range(5):
            await asyncio.sleep(0)
            yield {"model": "add_sub", "inputs": add_sub_inputs(1), "request_id": f"r{i}"}

    ids = sorted([item.id async for item in aio_client.stream_infer(requests()) if isinstance(item, InferResult)])
    assert ids == [f"r{i}" for i in range(5)]


async def test_stream_bad_item_is_raised_after_earlier_results(aio_client: AsyncInferenceClient) -> None:
    seen: list[Any] = []
    with pytest.raises(TypeError, match="stream request 1"):
        async for item in aio_client.stream_infer([("add_sub", add_sub_inputs(1)), {"inputs": {}}]):
            seen.append(item)
    assert [item.id.rpartition("-")[2] for item in seen] == ["0"]


async def test_stream_ids_the_client_picks_differ_between_streams(aio_client: AsyncInferenceClient) -> None:
    """A server keeps request ids (tensorgate's captures, found again by feedback): ids made up by the client must
    not repeat from one stream to the next, as "0", "1", ... did."""
    first = [item.id async for item in aio_client.stream_infer([("add_sub", add_sub_inputs(1))] * 2)]
    second = [item.id async for item in aio_client.stream_infer([("add_sub", add_sub_inputs(1))] * 2)]
    assert [i.rpartition("-")[2] for i in first + second] == ["0", "1", "0", "1"]
    assert len(set(first + second)) == 4


async def test_stream_to_a_server_that_is_down_raises_unavailable() -> None:
    async with AsyncInferenceClient(closed_port(), timeout=WAIT) as c:
        with pytest.raises(Unavailable):
            async for _ in c.stream_infer([("add_sub", add_sub_inputs(1))]):
                pass


# ----- retries, against a scripted server ------------------------------------------------------------------------


class Scripted(GRPCInferenceServiceServicer):
    """Refuses the first `failures` calls of ModelInfer and ServerLive with `code`, then answers."""

    def __init__(self, failures: int = 0, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        self.failures = failures
        self.code = code
        self.calls = 0
        self.reply: pb.ModelInferResponse | None = None
        """What ModelInfer answers, when set (default: no outputs, the request's model and id)."""

    async def _attempt(self, context: Any) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            await context.abort(self.code, f"attempt {self.calls} refused")

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        await self._attempt(context)
        return pb.ServerLiveResponse(live=True)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        await self._attempt(context)
        if self.reply is not None:
            return self.reply
        return pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)


async def start(servicer: Scripted, credentials: grpc.ServerCredentials | None = None) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    add_GRPCInferenceServiceServicer_to_server(servicer, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    return server, f"127.0.0.1:{port}"


FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.05)


@pytest.mark.parametrize(
    ("failures", "code", "retry", "calls", "raised"),
    [
        pytest.param(2, grpc.StatusCode.RESOURCE_EXHAUSTED, FAST_RETRY, 3, None, id="exhausted-retried"),
        pytest.param(2, grpc.StatusCode.UNAVAILABLE, FAST_RETRY, 3, None, id="unavailable-retried"),
        pytest.param(5, grpc.StatusCode.UNAVAILABLE, FAST_RETRY, 3, Unavailable, id="gives-up-after-max-attempts"),
        pytest.param(1, grpc.StatusCode.UNAVAILABLE, None, 1, Unavailable, id="off-by-default"),
        pytest.param(1, grpc.StatusCode.INTERNAL, FAST_RETRY, 1, Internal, id="internal-never-retried"),
        pytest.param(1, grpc.StatusCode.DEADLINE_EXCEEDED, FAST_RETRY, 1, DeadlineExceeded, id="deadline-never"),
    ],
)
async def test_retries(
    failures: int,
    code: grpc.StatusCode,
    retry: RetryPolicy | None,
    calls: int,
    raised: type[TensorgateClientError] | None,
) -> None:
    servicer = Scripted(failures, code)
    server, address = await start(servicer)
    try:
        async with AsyncInferenceClient(address, timeout=WAIT, retry=retry) as c:
            if raised is None:
                result = await c.infer("m", {"X": np.zeros(1, np.float32)}, request_id="once")
                assert result.id == "once"
            else:
                with pytest.raises(raised):
                    await c.infer("m", {"X": np.zeros(1, np.float32)})
        assert servicer.calls == calls
    finally:
        await server.stop(None)


async def test_sync_client_retries_too() -> None:
    servicer = Scripted(2, grpc.StatusCode.UNAVAILABLE)
    server, address = await start(servicer)
    try:

        def call() -> bool:
            with InferenceClient(address, timeout=WAIT, retry=FAST_RETRY) as c:
                return c.live()

        assert await asyncio.to_thread(call)
        assert servicer.calls == 3
    finally:
        await server.stop(None)


async def test_malformed_response_is_response_format_error() -> None:
    servicer = Scripted()
    servicer.reply = pb.ModelInferResponse(model_name="m")
    servicer.reply.outputs.add(name="Y", datatype="FP32", shape=[2, 2])
    servicer.reply.raw_output_contents.append(b"\0" * 12)  # 3 floats where the shape needs 4
    server, address = await start(servicer)
    try:
        async with AsyncInferenceClient(address, timeout=WAIT) as c:
            with pytest.raises(ResponseFormatError, match="output 'Y': raw content has 12 bytes") as info:
                await c.infer("m", {"X": np.zeros(1, np.float32)})
        assert info.value.code == grpc.StatusCode.INTERNAL and not info.value.retry_safe
    finally:
        await server.stop(None)


def test_retry_policy_service_config() -> None:
    config = RetryPolicy(max_attempts=4, initial_backoff_s=0.2, max_backoff_s=3, backoff_multiplier=1.5)
    [method] = config.service_config()["methodConfig"]
    assert method["retryPolicy"] == {
        "maxAttempts": 4,
        "initialBackoff": "0.200s",
        "maxBackoff": "3.000s",
        "backoffMultiplier": 1.5,
        "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
    }
    names = {(n["service"], n["method"]) for n in method["name"]}
    assert ("inference.GRPCInferenceService", "ModelInfer") in names
    assert ("grpc.health.v1.Health", "Check") in names
    assert ("inference.GRPCInferenceService", "ModelStreamInfer") not in names  # a stream is never replayed
    for bad in ({"max_attempts": 1}, {"max_attempts": 6}, {"initial_backoff_s": 0}, {"retryable_codes": ()}):
        with pytest.raises(ValueError, match="RetryPolicy"):
            RetryPolicy(**bad)


# ----- TLS and mTLS, with a real handshake -----------------------------------------------------------------------

# One connection per channel: grpc would otherwise reuse a connection between channels with equal arguments.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"), SERVER_NAME)


@pytest.fixture
async def mtls_server(pki: dict[str, Path]) -> AsyncIterator[tuple[Scripted, str]]:
    credentials = grpc.ssl_server_credentials(
        [(pki["server-key"].read_bytes(), pki["server"].read_bytes())],
        root_certificates=pki["ca"].read_bytes(),
        require_client_auth=True,
    )
    servicer = Scripted()
    server, address = await start(servicer, credentials)
    yield servicer, address
    await server.stop(None)


async def test_mtls_handshake(pki: dict[str, Path], mtls_server: tuple[Scripted, str]) -> None:
    _, address = mtls_server
    tls = TLSConfig(pki["ca"], pki["client"], pki["client-key"], server_name_override=SERVER_NAME)
    async with AsyncInferenceClient(address, tls=tls, timeout=WAIT, channel_options=OWN_CONNECTION) as c:
        assert await c.live()
        assert (await c.infer("m", {"X": np.zeros(1, np.float32)}, request_id="tls")).id == "tls"

    def sync_call() -> bool:
        with InferenceClient(address, tls=tls, timeout=WAIT, channel_options=OWN_CONNECTION) as sc:
            return sc.live()

    assert await asyncio.to_thread(sync_call)


@pytest.mark.parametrize(
    "case",
    [
        pytest.param({"cert": None}, id="no-client-certificate"),
        pytest.param({"ca": "other-ca"}, id="server-not-trusted"),
        pytest.param({"name": None}, id="name-mismatch"),
    ],
)
async def test_failed_handshakes_are_unavailable(
    pki: dict[str, Path], mtls_server: tuple[Scripted, str], case: dict[str, Any]
) -> None:
    servicer, address = mtls_server
    with_cert = case.get("cert", "client") is not None
    tls = TLSConfig(
        ca_file=pki[case.get("ca", "ca")],
        cert_file=pki["client"] if with_cert else None,
        key_file=pki["client-key"] if with_cert else None,
        server_name_override=case.get("name", SERVER_NAME),
    )
    async with AsyncInferenceClient(address, tls=tls, timeout=WAIT, channel_options=OWN_CONNECTION) as c:
        with pytest.raises(Unavailable):
            await c.live()
    assert servicer.calls == 0


def test_tls_config_checks_its_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cert_file and key_file"):
        TLSConfig(cert_file=tmp_path / "c.pem")
    assert TLSConfig(server_name_override="x").options() == [("grpc.ssl_target_name_override", "x")]
    with pytest.raises(FileNotFoundError):
        TLSConfig(ca_file=tmp_path / "missing.pem").credentials()


def test_mtls_against_tensorgate(pki: dict[str, Path], tmp_path: Path) -> None:
    """The same settings against tensorgate's own TLS (`--tls-cert/--tls-key/--tls-client-ca`)."""
    root = tmp_path / "models"
    identity_model(root / "identity_fp32" / "1" / "model.onnx", "FP32")
    tls_settings = {"tls_cert": pki["server"], "tls_key": pki["server-key"], "tls_client_ca": pki["ca"]}
    with ServerThread(root, **tls_settings) as s:
        tls = TLSConfig(pki["ca"], pki["client"], pki["client-key"], server_name_override=SERVER_NAME)
        with InferenceClient(s.address, tls=tls, timeout=WAIT, channel_options=OWN_CONNECTION) as c:
            x = np.ones((1, 4), np.float32)
            np.testing.assert_array_equal(c.infer("identity_fp32", {"INPUT0": x})["OUTPUT0"], x)
        anonymous = TLSConfig(pki["ca"], server_name_override=SERVER_NAME)
        with InferenceClient(s.address, tls=anonymous, timeout=WAIT, channel_options=OWN_CONNECTION) as c:
            with pytest.raises(Unavailable):
                c.live()


def test_messages_over_the_clients_own_limits_are_not_retry_safe(tmp_path: Path) -> None:
    """gRPC answers RESOURCE_EXHAUSTED ("CLIENT: ...") for a message over the client's own max_message_bytes: a
    request too large to send always will be, and a response too large to receive was computed. Neither is safe
    to send again, unlike the server's RESOURCE_EXHAUSTED (a full queue)."""
    repo = tmp_path / "models"
    tile_model(repo / "tile" / "1" / "model.onnx", width=16, repeats=4096)  # [1, 16] in, 256 KiB out
    with ServerThread(repo) as s, InferenceClient(s.address, timeout=WAIT, max_message_bytes=64 * 1024) as c:
        with pytest.raises(ResourceExhausted) as received:
            c.infer("tile", {"INPUT0": np.ones((1, 16), np.float32)})
        with pytest.raises(ResourceExhausted) as sent:
            c.infer("tile", {"INPUT0": np.ones((1, 32 * 1024), np.float32)})
        assert c.statistics("tile").model_stats[0].inference_count == 1  # the first ran, the second never left
    for error in (received.value, sent.value):
        assert "CLIENT: " in error.details and "larger than max" in error.details and not error.retry_safe


def test_work_already_done_is_not_retried(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A response over the server's size limit (the model ran) and a failed RepositoryModelLoad (the load ran) come
    with gRPC's retry pushback, so configured retries do not repeat the work, and `retry_safe` is False."""
    repo = tmp_path / "models"
    tile_model(repo / "tile" / "1" / "model.onnx", width=16, repeats=4096)  # [1, 16] in, 256 KiB out
    identity_model(repo / "broken" / "1" / "model.onnx", "FP32")
    write_config(repo, "broken", 'backend: "python"\n')
    settings = {"max_message_bytes": 64 * 1024, "model_control_mode": "explicit", "load_model": ["tile"]}
    with ServerThread(repo, **settings) as s, InferenceClient(s.address, timeout=WAIT, retry=FAST_RETRY) as c:
        with pytest.raises(ResourceExhausted) as too_big:
            c.infer("tile", {"INPUT0": np.ones((1, 16), np.float32)})
        stats = c.statistics("tile").model_stats[0]
        with caplog.at_level(logging.ERROR, logger="tensorgate"), pytest.raises(Unavailable) as load:
            c.load("broken")
    assert not too_big.value.retry_safe and "message limit" in too_big.value.details
    assert stats.inference_count == 1  # ran once, not once per attempt
    assert not load.value.retry_safe
    assert sum("failed to load model 'broken'" in r.getMessage() for r in caplog.records) == 1
