"""Decoupled models (any number of responses per request) on an upstream Triton: tensorgate serves their
transaction policy, refuses them over ModelInfer as Triton does, and over ModelStreamInfer relays each upstream
response as it arrives. The upstream is tests/scripted_upstream.py on loopback (its decoupled mode); the real
Triton's turn is in tests/test_triton_backend.py. Clients: unmodified tritonclient."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from tensorgate.client import AsyncInferenceClient, StreamItemError
from tensorgate.protos import GRPCInferenceServiceStub
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos.tensors import encode_infer_request
from tensorgate.server.backends.triton import TritonBackend
from tensorgate.server.cli import main
from tensorgate.server.rpc import servicer
from tests.onnx_models import add_sub_model, paced_model
from tests.scraping import metrics_url, scrape, value
from tests.scripted_upstream import ScriptedUpstream
from tests.serving import ServerThread
from tests.test_client_cli import infer
from tests.test_poll import wait_for


def _remote(root: Path, name: str, url: str, *extra: str) -> None:
    lines = [
        'backend: "tensorgate_triton"',
        f'parameters {{ key: "tensorgate.triton.url" value {{ string_value: "{url}" }} }}',
        'parameters { key: "tensorgate.triton.model_name" value { string_value: "m" } }',
        *extra,
    ]
    (root / name).mkdir(parents=True)
    (root / name / "config.pbtxt").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def upstream() -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream() as up:
        up.script.decoupled = True
        yield up


@pytest.fixture(scope="module")
def front(upstream: ScriptedUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    root = tmp_path_factory.mktemp("decoupled") / "models"
    _remote(root, "gen", upstream.url)
    _remote(root, "gen_batched", upstream.url, "max_batch_size: 8", "dynamic_batching { }")
    _remote(root, "gen_stats", upstream.url)  # only test_statistics_count_each_response_by_its_index calls it
    add_sub_model(root / "add_sub" / "1" / "model.onnx", shape=("batch", 2))
    paced_model(root / "paced" / "1" / "model.onnx")
    _remote(
        root,
        "gen_patient",
        upstream.url,
        'parameters { key: "tensorgate.triton.timeout_s" value { string_value: "2" } }',  # 5x the 0.4 s gaps
    )
    with ServerThread(root) as s:
        yield s


def _x(value: float) -> list[tc.InferInput]:
    x = tc.InferInput("X", [1, 2], "FP32")
    x.set_data_from_numpy(np.full((1, 2), value, np.float32))
    return [x]


class Stream:
    """tritonclient's stream to the front, its answers collected."""

    def __init__(self, address: str) -> None:
        self.client = tc.InferenceServerClient(address)
        self.answers: queue.Queue[tuple[tc.InferResult | None, InferenceServerException | None]] = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.answers.put((result, error)))

    def take(self, n: int) -> list[tuple[tc.InferResult | None, InferenceServerException | None]]:
        return [self.answers.get(timeout=30) for _ in range(n)]

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


def _outputs(result: tc.InferResult | None) -> tuple[str, list[float] | None, bool]:
    assert result is not None
    response = result.get_response()
    y = result.as_numpy("Y")
    return response.id, None if y is None else y[0].tolist(), response.parameters["triton_final_response"].bool_param


def test_the_front_serves_the_upstream_policy_and_refuses_model_infer(front: ServerThread) -> None:
    """Clients read model_transaction_policy to know they must stream; ModelInfer is refused as Triton refuses
    it (UNIMPLEMENTED), naming the model. A decoupled model is never batched by the front."""
    with tc.InferenceServerClient(front.address) as c:
        config = c.get_model_config("gen").config
        assert config.model_transaction_policy.decoupled
        assert not config.HasField("dynamic_batching")
        before = c.get_inference_statistics("gen").model_stats[0].inference_stats
        with pytest.raises(InferenceServerException) as info:
            c.infer("gen", _x(3.0))
        assert info.value.status() == str(grpc.StatusCode.UNIMPLEMENTED)
        assert "model 'gen' version 1 is decoupled" in str(info.value.message())
        # Refused before it counts, as Triton refuses it: no failed inference.
        assert c.get_inference_statistics("gen").model_stats[0].inference_stats.fail.count == before.fail.count
        reasons = {m.name: (m.state, m.reason) for m in c.get_model_repository_index().models}
        state, reason = reasons["gen_batched"]
        assert state == "UNAVAILABLE" and "config.pbtxt must not ask for dynamic_batching" in reason


def test_responses_come_as_the_upstream_sends_them(front: ServerThread, upstream: ScriptedUpstream) -> None:
    """Two requests on one stream: every response of each, in its own order, under the front's model name and
    the request's id; an empty final response only for the request that asked for one. Statistics count each
    request once."""
    before = tc.InferenceServerClient(front.address).get_inference_statistics("gen").model_stats[0]
    stream = Stream(front.address)
    try:
        stream.client.async_stream_infer("gen", _x(3.0), request_id="three")
        stream.client.async_stream_infer("gen", _x(2.0), request_id="two", enable_empty_final_response=True)
        answers = stream.take(6)
    finally:
        stream.close()
    assert all(error is None for _, error in answers), answers
    got: dict[str, list[tuple[list[float] | None, bool]]] = {}
    for result, _ in answers:
        request_id, y, final = _outputs(result)
        assert result is not None and result.get_response().model_name == "gen"
        got.setdefault(request_id, []).append((y, final))
    assert got == {
        "three": [([3.0, 3.0], False), ([6.0, 6.0], False), ([9.0, 9.0], False)],
        "two": [([2.0, 2.0], False), ([4.0, 4.0], False), (None, True)],
    }
    after = tc.InferenceServerClient(front.address).get_inference_statistics("gen").model_stats[0]
    assert after.inference_stats.success.count - before.inference_stats.success.count == 2
    assert after.inference_count - before.inference_count == 2


def test_the_server_s_own_parameters_stay_here_as_a_batch_s_do(front: ServerThread, upstream: ScriptedUpstream) -> None:
    """A relayed request goes upstream with the parameters meant for the model only, as a batch of a model that is
    not decoupled does (`upstream_parameters`): `priority`, `timeout` and the other names the protocol reserves
    are the server's. The ask for an empty final response goes, since only the upstream can send it."""
    request = pb.ModelInferRequest(model_name="gen", id="p")
    request.inputs.add(name="X", datatype="FP32", shape=[1, 2])
    request.raw_input_contents.append(np.full((1, 2), 1.0, np.float32).tobytes())
    request.parameters["temperature"].double_param = 0.5
    request.parameters["stop"].string_param = "\n"
    request.parameters["priority"].uint64_param = 1
    request.parameters["timeout"].int64_param = 60_000_000
    request.parameters["binary_data_output"].bool_param = True
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    before = len(upstream.script.stream_requests)
    with grpc.insecure_channel(front.address) as channel:
        replies = list(GRPCInferenceServiceStub(channel).ModelStreamInfer(iter([request]), timeout=30))
    assert [r.error_message for r in replies] == ["", ""]  # one response, then the empty final one
    (sent,) = [r for r in upstream.script.stream_requests[before:] if r.id == "p"]
    assert sorted(sent.parameters) == ["stop", "temperature", "triton_enable_empty_final_response"]


async def test_a_client_that_stops_reading_stops_the_upstream_being_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decoupled request answers 2,000 responses of 32 KB to a client that reads none of them yet: the front
    holds at most STREAM_WINDOW of them and stops reading its upstream, whose writes then stall (HTTP/2 flow
    control), instead of taking in all 64 MB. Nothing is lost: once the client reads, every response comes, in
    order."""
    monkeypatch.setattr(servicer, "STREAM_WINDOW", 8)  # read by each stream as it runs
    n, rows = 2000, 4096
    request = encode_infer_request("gen", [("X", np.full((rows, 2), n, np.float32))], request_id="many")
    with ScriptedUpstream() as upstream:
        upstream.script.decoupled, upstream.script.max_batch_size = True, 0  # any number of rows
        _remote(tmp_path / "models", "gen", upstream.url)
        with ServerThread(tmp_path / "models") as front:
            answers = await _read_late(front.address, request, lambda: upstream.script.produced, n)
    assert [a.error_message for a in answers] == [""] * n
    assert [np.frombuffer(a.infer_response.raw_output_contents[0], np.float32)[0] for a in answers] == [
        float(n * i) for i in range(1, n + 1)
    ]


async def _read_late(
    address: str, request: pb.ModelInferRequest, produced: Callable[[], int], n: int
) -> list[pb.ModelStreamInferResponse]:
    """Send `request` on a stream, wait until the upstream has `produced` all it will without the client reading,
    check that is not all of the n responses, then read them."""
    async with grpc.aio.insecure_channel(address) as channel:
        stream = GRPCInferenceServiceStub(channel).ModelStreamInfer(timeout=120)
        await stream.write(request)
        counts = [produced()]
        while len(counts) < 4 or len(set(counts[-4:])) > 1:  # settled: the same over 1.5 s
            assert len(counts) < 120, counts
            await asyncio.sleep(0.5)
            counts.append(produced())
        assert 0 < counts[-1] < n // 2, counts  # the window and what gRPC's buffers took, not all of them
        answers = [await stream.read() for _ in range(n)]
        await stream.done_writing()
        assert await stream.read() == grpc.aio.EOF
    return answers


def test_other_models_answers_on_the_stream_do_not_wait_for_a_decoupled_request(
    front: ServerThread, upstream: ScriptedUpstream
) -> None:
    """A decoupled request (three responses 0.3 s apart) and then a request to a local model, on one stream: the
    local model's answer goes out as soon as it is ready, between the decoupled responses; the stream ends only
    after the last of those."""
    upstream.script.delay_s = 0.3
    stream = Stream(front.address)
    try:
        stream.client.async_stream_infer("gen", _x(3.0), request_id="slow")
        inputs = []
        for name in ("INPUT0", "INPUT1"):
            item = tc.InferInput(name, [1, 2], "FP32")
            item.set_data_from_numpy(np.ones((1, 2), np.float32))
            inputs.append(item)
        stream.client.async_stream_infer("add_sub", inputs, request_id="quick")
        answers = stream.take(4)
    finally:
        upstream.script.delay_s = 0.0
        stream.close()
    assert all(error is None for _, error in answers), answers
    ids = [result.get_response().id for result, _ in answers if result is not None]
    assert ids[0] == "quick" and ids[1:] == ["slow"] * 3


def test_a_decoupled_request_does_not_wait_for_a_slower_answer_before_it(
    front: ServerThread, upstream: ScriptedUpstream
) -> None:
    """A slow request to a local model (over a second of compute), then a decoupled request (three responses
    0.05 s apart), on one stream: the decoupled responses go out as they come, not behind the slow answer, which
    still goes out in its turn."""
    upstream.script.delay_s = 0.05
    stream = Stream(front.address)
    try:
        slow = tc.InferInput("INPUT0", [1, 1], "FP32")
        slow.set_data_from_numpy(np.array([[300.0]], np.float32))
        stream.client.async_stream_infer("paced", [slow], request_id="slow")
        stream.client.async_stream_infer("gen", _x(3.0), request_id="tokens")
        answers = stream.take(4)
    finally:
        upstream.script.delay_s = 0.0
        stream.close()
    assert all(error is None for _, error in answers), answers
    assert [result.get_response().id for result, _ in answers if result is not None] == ["tokens"] * 3 + ["slow"]


def test_timeout_s_bounds_the_wait_for_each_response_not_the_request(
    front: ServerThread, upstream: ScriptedUpstream
) -> None:
    """With tensorgate.triton.timeout_s 2: eight responses 0.4 s apart (3.2 s in all) all come; an upstream silent
    for longer than 2 s is DEADLINE_EXCEEDED, saying so. (With timeout_s 1, a loaded machine's stall of 0.6 s
    failed a gap that should pass.)"""
    upstream.script.delay_s = 0.4
    stream = Stream(front.address)
    try:
        stream.client.async_stream_infer("gen_patient", _x(8.0), request_id="long")
        answers = stream.take(8)
        assert [error for _, error in answers] == [None] * 8
        upstream.script.delay_s = 3.0
        stream.client.async_stream_infer("gen_patient", _x(2.0), request_id="silent")
        [(_, error)] = stream.take(1)
    finally:
        upstream.script.delay_s = 0.0
        stream.close()
    assert error is not None
    assert "model 'gen_patient' version 1:" in str(error.message())
    assert "sent no response for 2s (tensorgate.triton.timeout_s)" in str(error.message())


def test_errors_travel_on_the_stream_and_it_goes_on(front: ServerThread) -> None:
    """A request the front finds wrong (an unknown input) and one the upstream fails each get an error message
    that names the model; the stream stays open and answers the next request."""
    stream = Stream(front.address)
    try:
        wrong = tc.InferInput("Z", [1, 2], "FP32")
        wrong.set_data_from_numpy(np.ones((1, 2), np.float32))
        stream.client.async_stream_infer("gen", [wrong], request_id="wrong")
        [(_, error)] = stream.take(1)
        assert error is not None and "model 'gen' version 1" in str(error.message()) and "'Z'" in str(error.message())
        stream.client.async_stream_infer("gen", _x(-1.0), request_id="fails")
        [(_, error)] = stream.take(1)
        assert error is not None
        assert "model 'gen' version 1" in str(error.message())
        assert "scripted failure for request 'fails'" in str(error.message())
        stream.client.async_stream_infer("gen", _x(1.0), request_id="after")
        [(result, error)] = stream.take(1)
        assert error is None and _outputs(result) == ("after", [1.0, 1.0], False)
    finally:
        stream.close()


def test_a_caller_that_goes_away_cancels_the_upstream_call(front: ServerThread, upstream: ScriptedUpstream) -> None:
    """The caller closes its stream two responses into ten (0.2 s apart): the upstream call is cancelled rather
    than generating the rest for nobody."""
    upstream.script.delay_s = 0.2
    cancelled = upstream.script.cancelled
    try:
        stream = Stream(front.address)
        stream.client.async_stream_infer("gen", _x(10.0), request_id="long")
        stream.take(2)
        stream.client.stop_stream(cancel_requests=True)
        stream.client.close()
        wait_for("the upstream call to be cancelled", lambda: upstream.script.cancelled == cancelled + 1, 10)
        assert upstream.script.streaming == 0
    finally:
        upstream.script.delay_s = 0.0


def test_relayed_requests_are_counted_under_the_version_that_served_them(
    front: ServerThread, upstream: ScriptedUpstream
) -> None:
    """/metrics counts a relayed request once it ends: under version 1 even when no response named the version (a
    request answered with none), and as CANCELLED when its caller went away before the end (which
    ModelStatistics counts at the index of the response that never came)."""
    url = metrics_url(front)

    def counted(code: str) -> float:
        labels = frozenset({"model": "gen", "version": "1", "code": code}.items())
        return scrape(url).get(("tensorgate_inference_requests_total", labels), 0.0)

    def cancels_at_second_response() -> int:
        with tc.InferenceServerClient(front.address) as client:
            [stats] = client.get_inference_statistics("gen").model_stats
        return int(stats.response_stats["1"].cancel.count) if "1" in stats.response_stats else 0

    ok, cancelled, cancels = counted("OK"), counted("CANCELLED"), cancels_at_second_response()
    stream = Stream(front.address)
    upstream.script.delay_s = 0.3
    try:
        stream.client.async_stream_infer("gen", _x(0.0), request_id="none")
        wait_for("the request answered with no response to be counted", lambda: counted("OK") == ok + 1, 10)
        stream.client.async_stream_infer("gen", _x(10.0), request_id="left")
        stream.take(1)
    finally:
        stream.client.stop_stream(cancel_requests=True)
        stream.client.close()
        upstream.script.delay_s = 0.0
    wait_for("the request whose caller left to be counted", lambda: counted("CANCELLED") == cancelled + 1, 10)
    assert counted("OK") == ok + 1
    assert cancels_at_second_response() == cancels + 1


def test_bench_refuses_a_decoupled_model_up_front(front: ServerThread, tmp_path: Path, capsys: Any) -> None:
    """Its requests are answered over ModelStreamInfer only, with any number of responses: `tensorgate bench`
    says so at once rather than sending load that fails (unary) or waits (streaming) until its deadlines."""
    for mode in ([], ["--streaming"]):
        out = str(tmp_path / "o")
        assert main(["bench", "gen", "--server", front.address, "--out", out, "--duration", "1", *mode]) == 2
        assert "model 'gen' is decoupled" in capsys.readouterr().err


def test_the_cli_prints_each_response_as_it_comes(front: ServerThread, tmp_path: Path) -> None:
    """`tensorgate infer` on a decoupled model streams: one JSON line per response, NAME.<i>.npy files with
    --npy-out, and the upstream's error as one line with exit status 1."""
    done = infer("gen", "--input", "X=[[3, 1]]", "--server", front.address, "--request-id", "cli")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(b["model"], b["version"], b["id"]) for b in lines] == [("gen", "1", "cli")] * 3
    assert [b["outputs"]["Y"]["data"] for b in lines] == [[[3.0, 1.0]], [[6.0, 2.0]], [[9.0, 3.0]]]
    done = infer("gen", "--input", "X=[[2, 2]]", "--server", front.address, "--npy-out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(tmp_path / "out" / f"Y.{i}.npy") for i in range(2)]
    assert np.load(tmp_path / "out" / "Y.1.npy").tolist() == [[4.0, 4.0]]
    done = infer("gen", "--input", "X=[[-1, 0]]", "--server", front.address, "--request-id", "bad")
    assert done.returncode == 1 and not done.stdout
    assert done.stderr.startswith("tensorgate infer: INTERNAL: ") and len(done.stderr.splitlines()) == 1
    assert "scripted failure for request 'bad'" in done.stderr


def test_an_upstream_items_status_code_reaches_the_caller(front: ServerThread, upstream: ScriptedUpstream) -> None:
    """A tensorgate upstream says what a failed item was (its drain's UNAVAILABLE, say): the front maps it as it
    maps a unary call's status, rather than reporting the model as failing (INTERNAL)."""
    upstream.script.stream_error_code = "UNAVAILABLE"
    try:
        done = infer("gen", "--input", "X=[[-1, 0]]", "--server", front.address, "--request-id", "refused")
    finally:
        upstream.script.stream_error_code = None
    assert done.returncode == 1 and done.stderr.startswith("tensorgate infer: UNAVAILABLE: "), done.stderr
    assert "scripted failure for request 'refused'" in done.stderr


def test_an_upstream_item_that_ran_is_not_retry_safe_at_the_front(
    front: ServerThread, upstream: ScriptedUpstream
) -> None:
    """A tensorgate upstream marks a failed item whose request ran (a response over its size limit): the front
    passed the code on but not the mark, so its caller read the refusal as safe to send again (review 136)."""
    upstream.script.stream_error_code, upstream.script.stream_error_ran = "RESOURCE_EXHAUSTED", True

    async def streamed() -> list[object]:
        async with AsyncInferenceClient(front.address, timeout=30) as client:
            return [item async for item in client.stream_infer([("gen", {"X": np.array([[-1.0, 0.0]], np.float32)})])]

    try:
        [item] = asyncio.run(streamed())
    finally:
        upstream.script.stream_error_code, upstream.script.stream_error_ran = None, False
    assert isinstance(item, StreamItemError) and item.code == grpc.StatusCode.RESOURCE_EXHAUSTED, item
    assert (item.ran, item.retry_safe) == (True, False)


def test_statistics_count_each_response_by_its_index(front: ServerThread, upstream: ScriptedUpstream) -> None:
    """ModelStatistics' response_stats, as Triton keeps them for a decoupled model: per response index, the
    successes with the wait since the response before (for index 0, since the request came: the time to the
    first response), the empty final response apart, and a failed request at the index where it failed. /metrics
    has the same waits as histograms (time to first token and between tokens, for a model streaming them)."""
    upstream.script.delay_s = 0.05
    stream = Stream(front.address)
    try:
        stream.client.async_stream_infer("gen_stats", _x(3.0), request_id="three", enable_empty_final_response=True)
        assert [error for _, error in stream.take(4)] == [None] * 4
        stream.client.async_stream_infer("gen_stats", _x(-1.0), request_id="fails")
        [(_, error)] = stream.take(1)
        assert error is not None
    finally:
        stream.close()
        upstream.script.delay_s = 0.0
    with tc.InferenceServerClient(front.address) as client:
        [stats] = client.get_inference_statistics("gen_stats").model_stats
    assert (stats.inference_stats.success.count, stats.inference_stats.fail.count) == (1, 1)
    r = stats.response_stats
    assert sorted(r) == ["0", "1", "2", "3"]
    # compute_infer counts every response computed, the empty one and the failed one too, as Triton's does.
    assert [(r[k].success.count, r[k].compute_infer.count) for k in "0123"] == [(1, 2), (1, 1), (1, 1), (0, 1)]
    assert all(r[k].compute_infer.ns >= 40_000_000 for k in "012")  # each 0.05 s after the one before it
    assert r["3"].empty_response.count == 1 and r["0"].empty_response.count == 0
    assert (r["0"].fail.count, r["1"].fail.count, r["0"].cancel.count) == (1, 0, 0)
    samples = scrape(metrics_url(front))
    labels = {"model": "gen_stats", "version": "1"}
    assert value(samples, "tensorgate_first_response_seconds_count", **labels) == 1
    assert value(samples, "tensorgate_first_response_seconds_sum", **labels) >= 0.04
    assert value(samples, "tensorgate_response_gap_seconds_count", **labels) == 2
    assert value(samples, "tensorgate_response_gap_seconds_sum", **labels) >= 0.08
    plain = frozenset({"model": "add_sub", "version": "1"}.items())  # not decoupled: no such series
    assert ("tensorgate_first_response_seconds_count", plain) not in samples


def test_max_streams_refuses_a_request_past_the_limit(upstream: ScriptedUpstream, tmp_path: Path) -> None:
    """With `tensorgate.triton.max_streams` 1, a second request while one is being relayed is refused at once with
    RESOURCE_EXHAUSTED naming the model and the parameter: counted as such in /metrics, and as a failed request
    but no failed response in ModelStatistics (it asked the upstream for none). The first goes on to its end, and
    a request after it is relayed again."""
    root = tmp_path / "models"
    _remote(
        root, "gen", upstream.url, 'parameters { key: "tensorgate.triton.max_streams" value { string_value: "1" } }'
    )
    upstream.script.delay_s = 0.3

    def stats() -> Any:
        with tc.InferenceServerClient(s.address) as c:
            return c.get_inference_statistics("gen").model_stats[0]

    try:
        with ServerThread(root) as s:
            stream = Stream(s.address)
            try:
                stream.client.async_stream_infer("gen", _x(4.0), request_id="first")
                answers = stream.take(1)  # the first is being relayed
                stream.client.async_stream_infer("gen", _x(1.0), request_id="over")
                answers += stream.take(4)  # in whatever order the refusal and the first's responses come
                # The first's stream has ended once it is counted; only then is its place free.
                wait_for("the first request to end", lambda: stats().inference_stats.success.count == 1, 10)
                stream.client.async_stream_infer("gen", _x(1.0), request_id="after")
                after = stream.take(1)
            finally:
                stream.close()
            samples = scrape(metrics_url(s))
            final = stats()
    finally:
        upstream.script.delay_s = 0.0
    first = [result for result, error in answers if error is None]
    refused = [error for _, error in answers if error is not None]
    assert [_outputs(result)[:2] for result in first] == [("first", [v, v]) for v in (4.0, 8.0, 12.0, 16.0)]
    [error] = refused
    message = str(error.message())
    assert "model 'gen' version 1" in message and "tensorgate.triton.max_streams (1)" in message, message
    assert after[0][1] is None and _outputs(after[0][0])[:2] == ("after", [1.0, 1.0])
    labels = {"model": "gen", "version": "1"}
    assert value(samples, "tensorgate_inference_requests_total", code="RESOURCE_EXHAUSTED", **labels) == 1
    assert value(samples, "tensorgate_inference_requests_total", code="OK", **labels) == 2
    assert final.inference_stats.fail.count == 1 and final.inference_stats.success.count == 2
    assert sum(r.fail.count for r in final.response_stats.values()) == 0
    assert final.response_stats["0"].success.count == 2  # the first response of each relayed request


def test_an_unload_waits_for_a_request_being_answered(upstream: ScriptedUpstream, tmp_path: Path) -> None:
    """A request two responses into five when its model is unloaded still gets the other three."""
    root = tmp_path / "models"
    _remote(root, "gen", upstream.url)
    upstream.script.delay_s = 0.3
    try:
        with ServerThread(root, model_control_mode="explicit", load_model=["gen"]) as s:
            stream = Stream(s.address)
            try:
                stream.client.async_stream_infer("gen", _x(5.0), request_id="five")
                first = stream.take(2)
                unload = threading.Thread(target=lambda: tc.InferenceServerClient(s.address).unload_model("gen"))
                unload.start()
                rest = stream.take(3)
                unload.join(30)
            finally:
                stream.close()
    finally:
        upstream.script.delay_s = 0.0
    assert [error for _, error in first + rest] == [None] * 5
    assert [_outputs(result)[1] for result, _ in first + rest] == [[v, v] for v in (5.0, 10.0, 15.0, 20.0, 25.0)]


def test_an_unload_past_its_grace_ends_the_request_with_why(upstream: ScriptedUpstream, tmp_path: Path) -> None:
    """A request still being answered when its model's unload grace runs out ends with an error that says so,
    and its upstream call is cancelled, rather than the caller waiting on a model that is gone."""
    root = tmp_path / "models"
    _remote(root, "gen", upstream.url)
    upstream.script.delay_s = 0.3
    cancelled = upstream.script.cancelled
    try:
        with ServerThread(root, model_control_mode="explicit", load_model=["gen"]) as s:
            s.app.repository._grace = 0.5  # the unload grace (30 s by default) runs out mid-request
            stream = Stream(s.address)
            try:
                stream.client.async_stream_infer("gen", _x(50.0), request_id="long")
                stream.take(1)
                unload = threading.Thread(target=lambda: tc.InferenceServerClient(s.address).unload_model("gen"))
                unload.start()
                answers = [stream.answers.get(timeout=30)]
                while answers[-1][1] is None and len(answers) < 10:  # a few responses, then the end
                    answers.append(stream.answers.get(timeout=30))
            finally:
                stream.close()
            unload.join(30)
            wait_for("the upstream call to be cancelled", lambda: upstream.script.cancelled == cancelled + 1, 10)
    finally:
        upstream.script.delay_s = 0.0
    errors = [error for _, error in answers if error is not None]
    assert errors, "the request ran on past its model's unload"
    assert "model 'gen' version 1" in str(errors[0].message())
    assert "the model was unloaded while it answered" in str(errors[0].message())


def test_an_unload_closes_the_backend_off_the_event_loop(
    upstream: ScriptedUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A remote backend's close joins its thread and closes its connections, seconds when the upstream is slow to
    let go. Here it is held up on purpose (the real close runs after): the server keeps answering meanwhile, since
    the close runs on a thread of its own and not on the loop that serves every model."""
    root = tmp_path / "models"
    _remote(root, "gen", upstream.url)
    add_sub_model(root / "add_sub" / "1" / "model.onnx", shape=("batch", 2))
    closing, release = threading.Event(), threading.Event()
    threads: list[str] = []
    close = TritonBackend.close

    def held_close(self: TritonBackend) -> None:
        threads.append(threading.current_thread().name)
        closing.set()
        release.wait(30)
        close(self)

    monkeypatch.setattr(TritonBackend, "close", held_close)
    with ServerThread(root, model_control_mode="explicit", load_model=["gen", "add_sub"]) as s:
        try:
            with tc.InferenceServerClient(s.address) as c:
                c.unload_model("gen")
                assert closing.wait(30)
                assert c.is_model_ready("add_sub", client_timeout=10)  # a blocked loop would not answer
                assert not c.is_model_ready("gen", client_timeout=10)
        finally:
            release.set()
    assert threads and "tensorgate-test-server" not in threads


def test_slow_closes_do_not_hold_up_loads(
    upstream: ScriptedUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More remote backends closing slowly at once than asyncio's default executor has threads (where model loads
    run): a load still goes ahead, since closes run on threads of their own."""
    root = tmp_path / "models"
    many = min(32, (os.cpu_count() or 1) + 4) + 1  # asyncio's default executor size, plus one
    names = [f"gen{i}" for i in range(many)]
    for name in names:
        _remote(root, name, upstream.url)
    add_sub_model(root / "add_sub" / "1" / "model.onnx", shape=("batch", 2))
    release = threading.Event()
    held: list[str] = []
    close = TritonBackend.close

    def held_close(self: TritonBackend) -> None:
        held.append(threading.current_thread().name)
        release.wait(60)
        close(self)

    monkeypatch.setattr(TritonBackend, "close", held_close)
    with ServerThread(root, model_control_mode="explicit", load_model=names) as s:
        try:
            with tc.InferenceServerClient(s.address) as c:
                for name in names:
                    c.unload_model(name)
                wait_for("closes to start", lambda: len(held) >= 1, 10)
                c.load_model("add_sub", client_timeout=30)  # on the default executor: free of the closes
                assert c.is_model_ready("add_sub")
        finally:
            release.set()
    assert len(held) == many and all(name.startswith("tensorgate-close") for name in held)


def test_an_upstream_that_goes_away_mid_request_fails_it_and_the_stream_goes_on(tmp_path: Path) -> None:
    """The upstream stops two responses into twenty: the request ends with an error naming the model (not a hang
    to its deadline), the caller's stream answers its next request, and the model reports not ready."""
    root = tmp_path / "models"
    add_sub_model(root / "add_sub" / "1" / "model.onnx", shape=("batch", 2))
    interval = 'parameters { key: "tensorgate.triton.health_interval_s" value { string_value: "0.2" } }'
    with ScriptedUpstream() as up:
        up.script.decoupled, up.script.delay_s = True, 0.2
        _remote(root, "gen", up.url, interval)
        with ServerThread(root) as s, tc.InferenceServerClient(s.address) as client:
            stream = Stream(s.address)
            try:
                stream.client.async_stream_infer("gen", _x(20.0), request_id="long")
                stream.take(2)
                up.stop()
                answers = [stream.answers.get(timeout=30)]
                while answers[-1][1] is None and len(answers) < 20:
                    answers.append(stream.answers.get(timeout=30))
                x = tc.InferInput("INPUT0", [1, 2], "FP32")
                x.set_data_from_numpy(np.ones((1, 2), np.float32))
                y = tc.InferInput("INPUT1", [1, 2], "FP32")
                y.set_data_from_numpy(np.ones((1, 2), np.float32))
                stream.client.async_stream_infer("add_sub", [x, y], request_id="next")
                [(result, error)] = stream.take(1)
            finally:
                stream.close()
            wait_for("the model to be reported not ready", lambda: not client.is_model_ready("gen"), 10)
    error = answers[-1][1]
    assert error is not None, "the request went on after its upstream stopped"
    assert "model 'gen' version 1" in str(error.message()) and "upstream" in str(error.message()), error.message()
    assert result is not None, error
    assert result.get_response().id == "next" and result.as_numpy("OUTPUT0").tolist() == [[2.0, 2.0]]


def test_configs_that_cannot_be_served_as_decoupled_fail_their_load(upstream: ScriptedUpstream, tmp_path: Path) -> None:
    """Each with its reason, the rest of the repository serving: a config that says decoupled for an upstream
    model that is not, or not decoupled for one that is; a response cache for a decoupled model; a local ONNX
    model that says decoupled (it answers once); an ensemble with a decoupled step; an upstream model that is both
    decoupled and a sequence model; a relay limit on a model that is not decoupled."""
    root = tmp_path / "models"
    with ScriptedUpstream() as plain, ScriptedUpstream() as stateful:
        stateful.script.decoupled = stateful.script.sequence = True
        _remote(root, "claims", plain.url, "model_transaction_policy { decoupled: true }")
        _remote(root, "denies", upstream.url, "model_transaction_policy { decoupled: false }")
        _remote(root, "cached", upstream.url, "response_cache { enable: true }")
        _remote(root, "stateful", stateful.url)
        _remote(
            root, "capped", plain.url, 'parameters { key: "tensorgate.triton.max_streams" value { string_value: "4" } }'
        )
        _remote(root, "gen", upstream.url)
        add_sub_model(root / "local" / "1" / "model.onnx", shape=("batch", 2))
        (root / "local" / "config.pbtxt").write_text("model_transaction_policy { decoupled: true }\n")
        (root / "steps" / "1").mkdir(parents=True)
        (root / "steps" / "config.pbtxt").write_text(
            """
platform: "ensemble"
max_batch_size: 8
input [ { name: "X" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 2 ] } ]
ensemble_scheduling { step [
  { model_name: "gen" input_map { key: "X" value: "X" } output_map { key: "Y" value: "Y" } } ] }
"""
        )
        with ServerThread(root) as s, tc.InferenceServerClient(s.address) as c:
            models = {m.name: (m.state, m.reason) for m in c.get_model_repository_index().models}
    expected = {
        "claims": "config.pbtxt says the model is decoupled, but the upstream model is not",
        "denies": "config.pbtxt says the model is not decoupled, but the upstream model is",
        "cached": "the model is decoupled: its answer is a stream of responses, which the response cache does not",
        "stateful": "the upstream model is decoupled and a sequence model: tensorgate does not relay",
        "capped": "parameter 'tensorgate.triton.max_streams' bounds a decoupled model's relayed requests, and this",
        "local": 'a decoupled model is served for backend "tensorgate_triton" only',
        "steps": "model 'gen' is decoupled (it answers over ModelStreamInfer only)",
    }
    for name, fragment in expected.items():
        state, reason = models[name]
        assert state == "UNAVAILABLE" and fragment in reason, (name, reason)
    assert models["gen"][0] == "READY"


def test_a_denied_request_is_counted_as_a_denial_not_as_a_request(upstream: ScriptedUpstream, tmp_path: Path) -> None:
    """README (Metrics): a request refused by authorization is counted in tensorgate_auth_denials_total, not in
    tensorgate_inference_requests_total; over ModelStreamInfer a decoupled model's request was counted in both."""
    import hashlib

    from tensorgate.protos import GRPCInferenceServiceStub
    from tensorgate.protos import grpc_service_pb2 as pb

    root = tmp_path / "models"
    _remote(root, "gen", upstream.url)
    add_sub_model(root / "add_sub" / "1" / "model.onnx", shape=("batch", 2))
    policy = {
        "rules": [{"identities": ["scorer"], "apis": ["inference"], "models": ["add_sub"]}],
        "tokens": [{"sha256": hashlib.sha256(b"tok").hexdigest(), "identity": "scorer"}],
    }
    (tmp_path / "policy.json").write_text(json.dumps(policy))
    request = pb.ModelInferRequest(model_name="gen", id="denied")
    request.inputs.add(name="X", datatype="FP32", shape=[1, 2])
    request.raw_input_contents.append(np.zeros((1, 2), np.float32).tobytes())
    with ServerThread(root, auth_policy=tmp_path / "policy.json") as s, grpc.insecure_channel(s.address) as channel:
        stub = GRPCInferenceServiceStub(channel)
        metadata = [("authorization", "Bearer tok")]
        (reply,) = stub.ModelStreamInfer(iter([request]), metadata=metadata, timeout=30)
        assert reply.infer_response.id == "denied"
        assert "'scorer' may not call ModelStreamInfer on model 'gen'" in reply.error_message
        samples = scrape(metrics_url(s))
    denials = frozenset({"identity": "scorer", "rpc": "ModelStreamInfer", "reason": "policy"}.items())
    assert samples[("tensorgate_auth_denials_total", denials)] == 1
    assert not [key for key in samples if key[0] == "tensorgate_inference_requests_total"], samples
