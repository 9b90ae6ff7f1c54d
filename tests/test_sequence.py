"""Sequence (stateful) models, as Triton's sequence batcher serves them: control tensors and implicit state fed by
the server, one request of a sequence at a time and in order, batched across sequences, idle sequences ended, a
backlog beyond the slots. Real servers, a real stateful ONNX model (tests/onnx_models.py accumulator_model),
unmodified tritonclient (unary and stream) and our client."""

from __future__ import annotations

import asyncio
import functools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from tensorgate.client import AsyncInferenceClient, InferenceClient
from tensorgate.protos import GRPCInferenceServiceStub
from tensorgate.protos.tensors import encode_infer_request
from tensorgate.server.auth.certs import spiffe_id
from tests.onnx_models import accumulator_config, accumulator_model, paced_model, write_config
from tests.pki import Pki
from tests.scraping import metrics_url, scrape, value
from tests.serving import ServerThread
from tests.test_poll import wait_for


def _x(value: float, rows: int = 1) -> list[tc.InferInput]:
    inp = tc.InferInput("INPUT", [rows, 1], "FP32")
    inp.set_data_from_numpy(np.full((rows, 1), value, np.float32))
    return [inp]


def _error(code: grpc.StatusCode, call: Callable[..., object], *args: object, **kwargs: object) -> str:
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    assert info.value.status() == str(code), info.value.message()
    return str(info.value.message())


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    root = tmp_path_factory.mktemp("sequence") / "models"
    models = {
        # Oldest with a delay, so that concurrent sequences' requests meet in batches.
        "acc": accumulator_config(
            "acc", extra="oldest { max_candidate_sequences: 16 max_queue_delay_microseconds: 50000 }"
        ),
        "acc_direct": accumulator_config("acc_direct", extra="max_sequence_idle_microseconds: 200000"),
        # A minute idle (not Triton's 1 s): a loaded machine must not end a sequence while a test looks at its slot.
        "acc_one": accumulator_config(
            "acc_one", extra="oldest { max_candidate_sequences: 1 } max_sequence_idle_microseconds: 60000000"
        ),
        "acc_unbatched": accumulator_config("acc_unbatched", max_batch_size=0),
    }
    for name, config in models.items():
        accumulator_model(root / name / "1" / "model.onnx", batching=name != "acc_unbatched")
        write_config(root, name, config)
    accumulator_model(root / "acc_text" / "1" / "model.onnx", corrid="BYTES")
    write_config(root, "acc_text", accumulator_config("acc_text", corrid="TYPE_STRING"))
    with ServerThread(root) as s:
        yield s


@pytest.fixture
def client(served: ServerThread) -> Iterator[tc.InferenceServerClient]:
    c = tc.InferenceServerClient(served.address)
    try:
        yield c
    finally:
        c.close()


def test_sequences_keep_their_own_state_and_see_their_controls(client: tc.InferenceServerClient) -> None:
    """Two interleaved sequences accumulate apart; the model sees START on the first request, END on the last,
    READY on every one, and the correlation ID; callers see only INPUT and the non-state outputs."""
    meta = client.get_model_metadata("acc")
    assert [i.name for i in meta.inputs] == ["INPUT"]
    # The served config says the idle time in force (Triton's default of 1 s), as Triton's does.
    assert client.get_model_config("acc").config.sequence_batching.max_sequence_idle_microseconds == 1_000_000
    assert sorted(o.name for o in meta.outputs) == ["CORRID_OUT", "FLAGS", "OUTPUT"]
    steps = [(101, True, False, 1.0), (202, True, False, 10.0), (101, False, False, 2.0), (202, False, True, 20.0)]
    steps.append((101, False, True, 3.0))
    seen = []
    for sid, start, end, x in steps:
        r = client.infer("acc", _x(x), sequence_id=sid, sequence_start=start, sequence_end=end)
        seen.append(
            (float(r.as_numpy("OUTPUT")[0, 0]), r.as_numpy("FLAGS")[0].tolist(), int(r.as_numpy("CORRID_OUT")[0, 0]))
        )
    assert seen == [
        (1.0, [1.0, 0.0, 1.0], 101),
        (10.0, [1.0, 0.0, 1.0], 202),
        (3.0, [0.0, 0.0, 1.0], 101),
        (30.0, [0.0, 1.0, 1.0], 202),
        (6.0, [0.0, 1.0, 1.0], 101),
    ]
    # Both ended: their state is gone.
    msg = _error(grpc.StatusCode.INVALID_ARGUMENT, client.infer, "acc", _x(1.0), sequence_id=101)
    assert "model 'acc' version 1: sequence 101 is not active: its first request must set sequence_start" in msg


def test_a_stream_runs_each_sequence_in_order_batched_with_the_others(served: ServerThread) -> None:
    """Eight sequences of twelve requests each, all sent at once over one stream: every sequence's running sums
    come back right (two of its requests in one batch would read the same state), and the requests of different
    sequences ran together in batches."""
    c = tc.InferenceServerClient(served.address)
    answers: queue.Queue[tuple[object, object]] = queue.Queue()
    before = c.get_inference_statistics("acc").model_stats[0]
    sequences, length = 8, 12
    try:
        c.start_stream(callback=lambda result, error: answers.put((result, error)))
        for step in range(length):
            for seq in range(sequences):
                c.async_stream_infer(
                    "acc",
                    _x(float(seq * 100 + step)),
                    request_id=f"{seq}:{step}",
                    sequence_id=1000 + seq,
                    sequence_start=step == 0,
                    sequence_end=step == length - 1,
                )
        got: dict[int, list[float]] = {seq: [] for seq in range(sequences)}
        for _ in range(sequences * length):
            result, error = answers.get(timeout=60)
            assert error is None, error
            assert isinstance(result, tc.InferResult)
            seq, step = map(int, result.get_response().id.split(":"))
            assert len(got[seq]) == step  # each sequence answered in order
            got[seq].append(float(result.as_numpy("OUTPUT")[0, 0]))
        c.stop_stream()
        for seq in range(sequences):
            assert got[seq] == np.cumsum([seq * 100 + step for step in range(length)]).tolist()
        after = c.get_inference_statistics("acc").model_stats[0]
        inferences = after.inference_count - before.inference_count
        executions = after.execution_count - before.execution_count
        assert inferences == sequences * length
        assert executions < inferences  # batched across sequences
        assert max(b.batch_size for b in after.batch_stats) > 1
    finally:
        c.close()


def test_string_correlation_ids_from_our_client(served: ServerThread) -> None:
    """A TYPE_STRING CORRID takes string IDs (ours and tritonclient's send them as string_param); an integer ID
    is refused for it, and a string one for a UINT64 CORRID."""
    with InferenceClient(served.address, timeout=30) as c:
        x = {"INPUT": np.array([[2.0]], np.float32)}
        first = c.infer("acc_text", x, sequence_id="user-7", sequence_start=True)
        assert first.outputs["CORRID_OUT"].tolist() == [[b"user-7"]]
        last = c.infer("acc_text", x, sequence_id="user-7", sequence_end=True)
        assert last.outputs["OUTPUT"].tolist() == [[4.0]]
        with pytest.raises(Exception, match="sequence_id must be a string: the model's CORRID control is typed so"):
            c.infer("acc_text", x, sequence_id=7, sequence_start=True)
        with pytest.raises(Exception, match="sequence_id must be an integer"):
            c.infer("acc", x, sequence_id="user-7", sequence_start=True)
        # Beyond int64: our client sends its two's complement in int64_param, as Triton's C++ client and
        # perf_analyzer do, and the server reads it as uint64 (as Triton does); uint64_param is read too.
        big = 2**63 + 5
        r = c.infer("acc", x, sequence_id=big, sequence_start=True, sequence_end=True)
        assert r.outputs["CORRID_OUT"].tolist() == [[big]]
    request = encode_infer_request("acc", [("INPUT", np.array([[2.0]], np.float32))])
    for field, sent in (("int64_param", -3), ("uint64_param", 2**64 - 3)):
        request.parameters.clear()
        setattr(request.parameters["sequence_id"], field, sent)
        request.parameters["sequence_start"].bool_param = request.parameters["sequence_end"].bool_param = True
        with grpc.insecure_channel(served.address) as channel:
            reply = GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        corrid = next(i for i, o in enumerate(reply.outputs) if o.name == "CORRID_OUT")
        assert np.frombuffer(reply.raw_output_contents[corrid], np.uint64).tolist() == [2**64 - 3], field


def test_our_asyncio_client_streams_a_sequence(served: ServerThread) -> None:
    """Over ModelStreamInfer, to a model without a batch dimension (max_batch_size 0: controls shaped [1])."""

    async def run() -> list[object]:
        async with AsyncInferenceClient(served.address, timeout=30) as c:
            items = [
                {
                    "model": "acc_unbatched",
                    "inputs": {"INPUT": np.array([float(i)], np.float32)},
                    "sequence_id": 77,
                    "sequence_start": i == 1,
                    "sequence_end": i == 4,
                }
                for i in range(1, 5)
            ]
            return [r async for r in c.stream_infer(items)]

    results = asyncio.run(run())
    assert [r.outputs["OUTPUT"].tolist() for r in results] == [[1.0], [3.0], [6.0], [10.0]]  # type: ignore[attr-defined]
    assert [r.outputs["FLAGS"].tolist() for r in results][::3] == [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]  # type: ignore[attr-defined]


def test_requests_a_sequence_model_refuses(client: tc.InferenceServerClient) -> None:
    """Each refusal is INVALID_ARGUMENT naming the model and the problem, and the server goes on serving."""
    msg = _error(grpc.StatusCode.INVALID_ARGUMENT, client.infer, "acc", _x(1.0))
    assert "model 'acc' version 1: a sequence model needs a non-zero or non-empty correlation ID" in msg
    msg = _error(grpc.StatusCode.INVALID_ARGUMENT, client.infer, "acc", _x(1.0), sequence_id=5)
    assert "sequence 5 is not active" in msg
    msg = _error(
        grpc.StatusCode.INVALID_ARGUMENT, client.infer, "acc", _x(1.0, rows=2), sequence_id=5, sequence_start=True
    )
    assert "a sequence model takes one row per request (batch size 1), got 2" in msg
    # None of those started sequence 5: it still needs START, and works once it has it.
    assert "sequence 5 is not active" in _error(
        grpc.StatusCode.INVALID_ARGUMENT, client.infer, "acc", _x(1.0), sequence_id=5
    )
    r = client.infer("acc", _x(4.0), sequence_id=5, sequence_start=True, sequence_end=True)
    assert r.as_numpy("OUTPUT").tolist() == [[4.0]]


def test_start_again_begins_a_new_sequence(client: tc.InferenceServerClient) -> None:
    client.infer("acc", _x(5.0), sequence_id=9, sequence_start=True)
    assert client.infer("acc", _x(5.0), sequence_id=9).as_numpy("OUTPUT").tolist() == [[10.0]]
    restarted = client.infer("acc", _x(1.0), sequence_id=9, sequence_start=True)
    assert restarted.as_numpy("OUTPUT").tolist() == [[1.0]]
    assert restarted.as_numpy("FLAGS").tolist() == [[1.0, 0.0, 1.0]]
    assert client.infer("acc", _x(1.0), sequence_id=9, sequence_end=True).as_numpy("OUTPUT").tolist() == [[2.0]]


def test_an_idle_sequence_ends(client: tc.InferenceServerClient) -> None:
    """acc_direct ends a sequence after 0.2 s without requests (max_sequence_idle_microseconds): its state is
    gone and its next request must start it again."""
    client.infer("acc_direct", _x(1.0), sequence_id=31, sequence_start=True)
    client.infer("acc_direct", _x(1.0), sequence_id=32, sequence_start=True)
    assert client.infer("acc_direct", _x(1.0), sequence_id=31).as_numpy("OUTPUT").tolist() == [[2.0]]
    time.sleep(1.0)
    msg = _error(grpc.StatusCode.INVALID_ARGUMENT, client.infer, "acc_direct", _x(1.0), sequence_id=31)
    assert "sequence 31 is not active" in msg and "max_sequence_idle_microseconds" in msg
    assert "sequence 32 is not active" in _error(
        grpc.StatusCode.INVALID_ARGUMENT, client.infer, "acc_direct", _x(1.0), sequence_id=32
    )


def test_a_sequence_beyond_the_slots_waits_for_one(served: ServerThread, client: tc.InferenceServerClient) -> None:
    """acc_one has one slot (oldest max_candidate_sequences 1, one instance): a second sequence's first request
    waits in the backlog while the first sequence lasts, and runs once it ends."""
    client.infer("acc_one", _x(1.0), sequence_id=41, sequence_start=True)
    done: queue.Queue[object] = queue.Queue()

    def second() -> None:
        c = tc.InferenceServerClient(served.address)
        try:
            done.put(c.infer("acc_one", _x(7.0), sequence_id=42, sequence_start=True, sequence_end=True))
        except Exception as exc:  # noqa: BLE001 - handed to the test thread
            done.put(exc)
        finally:
            c.close()

    thread = threading.Thread(target=second)
    thread.start()
    try:
        # Reaching the backlog takes a loaded machine a while: wait for it rather than assume it after a sleep.
        wait_for("sequence 42 in the backlog", lambda: _sequencer(served, "acc_one").backlog == 1)
        with pytest.raises(queue.Empty):
            done.get(timeout=0.5)  # sequence 41 still holds the slot
        one = {"model": "acc_one", "version": "1"}
        samples = scrape(metrics_url(served))
        assert value(samples, "tensorgate_sequences_active", **one) == 2
        assert value(samples, "tensorgate_sequence_backlog", **one) == 1
        assert client.infer("acc_one", _x(1.0), sequence_id=41, sequence_end=True).as_numpy("OUTPUT").tolist() == [
            [2.0]
        ]
        result = done.get(timeout=30)
        assert isinstance(result, tc.InferResult), result
        assert result.as_numpy("OUTPUT").tolist() == [[7.0]]
        samples = scrape(metrics_url(served))  # both ended: nothing held
        assert value(samples, "tensorgate_sequences_active", **one) == 0
        assert value(samples, "tensorgate_sequence_backlog", **one) == 0
    finally:
        thread.join(30)


def test_a_backlogged_sequence_whose_callers_left_is_dropped(
    served: ServerThread, client: tc.InferenceServerClient
) -> None:
    """Sequence 53 waits for acc_one's only slot and its caller gives up: it is dropped from the backlog, rather
    than take the slot when 51 ends and hold it, idle, until max_sequence_idle_microseconds."""
    client.infer("acc_one", _x(1.0), sequence_id=51, sequence_start=True)
    msg = _error(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        client.infer,
        "acc_one",
        _x(1.0),
        sequence_id=53,
        sequence_start=True,
        client_timeout=0.5,
    )
    assert "Deadline" in msg
    sequencer = _sequencer(served, "acc_one")
    wait_for("sequence 53 dropped from the backlog", lambda: sequencer.backlog == 0)
    assert sequencer.active == 1
    client.infer("acc_one", _x(1.0), sequence_id=51, sequence_end=True)
    assert sequencer.active == 0
    assert "sequence 53 is not active" in _error(
        grpc.StatusCode.INVALID_ARGUMENT, client.infer, "acc_one", _x(1.0), sequence_id=53
    )


def test_initial_state_from_a_file_and_a_state_output_asked_for(tmp_path: Path) -> None:
    """initial_state { data_file } is read from the version's initial_state/ directory; a state output listed in
    the config's outputs may be asked for, as in Triton."""
    root = tmp_path / "models"
    accumulator_model(root / "acc" / "1" / "model.onnx")
    (root / "acc" / "1" / "initial_state").mkdir()
    np.array([100.0], np.float32).tofile(root / "acc" / "1" / "initial_state" / "hundred.bin")
    config = accumulator_config("acc").replace(
        "dims: [ 1 ] }",
        'dims: [ 1 ] initial_state { name: "h" data_type: TYPE_FP32 dims: [ 1 ] data_file: "hundred.bin" } }',
    )
    # Outputs listed are the outputs served, as in Triton (auto-complete leaves a listed kind alone): OUTPUT too.
    config += 'output [ { name: "ACC_OUT" data_type: TYPE_FP32 dims: [ 1 ] }, { name: "OUTPUT" } ]\n'
    write_config(root, "acc", config)
    with ServerThread(root) as s:
        c = tc.InferenceServerClient(s.address)
        try:
            r = c.infer(
                "acc", _x(1.0), sequence_id=1, sequence_start=True, outputs=[tc.InferRequestedOutput("ACC_OUT")]
            )
            assert r.as_numpy("ACC_OUT").tolist() == [[101.0]]
            assert c.infer("acc", _x(1.0), sequence_id=1).as_numpy("OUTPUT").tolist() == [[102.0]]
        finally:
            c.close()


BAD_CONFIGS = {
    "no_start_input": (
        lambda c: c.replace('name: "START"', 'name: "BEGIN"'),
        "sequence_batching control_input 'BEGIN' is not an input of the model",
    ),
    "wrong_control_type": (
        lambda c: c.replace("fp32_false_true: [ 0, 1 ]", "int32_false_true: [ 0, 1 ]"),
        "control_input 'START' is FP32 in the model but its START control makes it INT32",
    ),
    "two_value_kinds": (
        lambda c: c.replace("fp32_false_true: [ 0, 1 ]", "fp32_false_true: [ 0, 1 ] int32_false_true: [ 0, 1 ]"),
        "a START control needs exactly one of fp32_false_true, int32_false_true or bool_false_true",
    ),
    "float_corrid": (
        lambda c: c.replace("data_type: TYPE_UINT64", "data_type: TYPE_FP32"),
        "CORRID data_type must be one of TYPE_UINT64",
    ),
    "state_dims": (lambda c: c.replace("dims: [ 1 ] }", "dims: [ 2 ] }"), "dims [2] do not fit input 'ACC_IN'"),
    "cached": (
        lambda c: c + "response_cache { enable: true }\n",
        "response_cache cannot be enabled for a sequence model",
    ),
    "control_listed": (
        lambda c: c + 'input [ { name: "START" data_type: TYPE_FP32 dims: [ 1 ] } ]\n',
        "'START' is a sequence_batching control or state input, which the scheduler feeds",
    ),
    "unbatched_controls": (
        lambda c: c.replace("max_batch_size: 8", "max_batch_size: 0"),
        "control_input 'START' has shape [-1, 1] in the model; a control takes [1]",
    ),
    "missing_file": (
        lambda c: c.replace(
            "dims: [ 1 ] }", 'dims: [ 1 ] initial_state { data_type: TYPE_FP32 dims: [ 1 ] data_file: "../x" } }'
        ),
        "initial_state data_file '../x' is not a file in initial_state/",
    ),
}


def test_a_sequence_config_that_does_not_fit_its_model_fails_its_load(tmp_path: Path) -> None:
    """Each mistake fails that model's load with the reason in RepositoryIndex; the rest serve. An ensemble with
    sequence_batching is refused too: it is stateful through its steps, never itself."""
    root = tmp_path / "models"
    for name, (edit, _) in BAD_CONFIGS.items():
        accumulator_model(root / name / "1" / "model.onnx")
        write_config(root, name, edit(accumulator_config(name)))
    (root / "stateful_ensemble" / "1").mkdir(parents=True)
    write_config(root, "stateful_ensemble", 'name: "stateful_ensemble"\nplatform: "ensemble"\nsequence_batching { }\n')
    accumulator_model(root / "good" / "1" / "model.onnx")
    write_config(root, "good", accumulator_config("good"))
    with ServerThread(root) as s:
        c = tc.InferenceServerClient(s.address)
        try:
            reasons = {m.name: (m.state, m.reason) for m in c.get_model_repository_index().models}
            for name, (_, fragment) in BAD_CONFIGS.items():
                state, reason = reasons[name]
                assert state == "UNAVAILABLE" and fragment in reason, (name, reason)
            state, reason = reasons["stateful_ensemble"]
            assert state == "UNAVAILABLE" and "not for 'ensemble'" in reason, reason
            assert reasons["good"][0] == "READY"
            r = c.infer("good", _x(3.0), sequence_id=1, sequence_start=True, sequence_end=True)
            assert r.as_numpy("OUTPUT").tolist() == [[3.0]]
        finally:
            c.close()


def _unload_repository(root: Path) -> Path:
    """acc_slow waits up to 1 s to fill a batch (oldest max_queue_delay) and has one slot, so a test can catch a
    sequence's second request waiting behind its first, and a second sequence in the backlog."""
    accumulator_model(root / "acc_slow" / "1" / "model.onnx")
    extra = (
        "max_sequence_idle_microseconds: 60000000 "
        "oldest { max_candidate_sequences: 1 max_queue_delay_microseconds: 1000000 preferred_batch_size: [ 8 ] }"
    )
    write_config(root, "acc_slow", accumulator_config("acc_slow", extra=extra))
    return root


def _in_thread(address: str, answers: dict[str, object], key: str, value: float, **kwargs: object) -> threading.Thread:
    def call() -> None:
        c = tc.InferenceServerClient(address)
        try:
            r = c.infer("acc_slow", _x(value), client_timeout=30, **kwargs)
            answers[key] = float(r.as_numpy("OUTPUT")[0, 0])
        except InferenceServerException as exc:
            answers[key] = f"{exc.status()} {exc.message()}"
        finally:
            c.close()

    thread = threading.Thread(target=call)
    thread.start()
    return thread


def _sequencer(served: ServerThread, model: str) -> Any:
    return served.app.repository.get(model, "").sequencer


def _accepted(sequencer: Any) -> int:
    """Requests the sequencer has taken in and not finished (read from the test thread: a count, no mutation)."""
    sequences = {id(q): q for q in [*list(sequencer._sequences.values()), *list(sequencer._backlog)]}
    return sum(q.pending for q in sequences.values())


def _has_accepted(sequencer: Any, n: int) -> bool:
    return _accepted(sequencer) == n


def _unloading_server(root: Path) -> ServerThread:
    return ServerThread(_unload_repository(root), model_control_mode="explicit", load_model=["acc_slow"])


UNLOADED = "StatusCode.UNAVAILABLE model 'acc_slow' version 1 was unloaded before the request ran"


def test_an_unload_runs_what_it_accepted_and_refuses_the_backlog(tmp_path: Path) -> None:
    """A request waiting behind an earlier one of its sequence was accepted: the unload lets it run (it used to
    fail UNAVAILABLE "being unloaded"). A sequence waiting in the backlog gets no slot once the model is going,
    even one freed during the drain: it fails at once with UNAVAILABLE saying it never ran."""
    with _unloading_server(tmp_path / "models") as s:
        answers: dict[str, object] = {}
        sequencer = _sequencer(s, "acc_slow")
        threads = []
        # a2 ends sequence 1 during the drain: its slot must not go to sequence 2, which the unload would cut short.
        for key, value, (sid, start, end) in (
            ("a1", 1.0, (1, True, False)),
            ("a2", 2.0, (1, False, True)),
            ("b1", 5.0, (2, True, False)),
        ):
            threads.append(
                _in_thread(s.address, answers, key, value, sequence_id=sid, sequence_start=start, sequence_end=end)
            )
            wait_for(f"{key} accepted", functools.partial(_has_accepted, sequencer, len(threads)))
        assert sequencer.backlog == 1
        c = tc.InferenceServerClient(s.address)
        try:
            c.unload_model("acc_slow")
            for thread in threads:
                thread.join(30)
        finally:
            c.close()
    assert answers == {"a1": 1.0, "a2": 3.0, "b1": UNLOADED}


def test_an_unload_fails_a_sequence_started_again_in_the_backlog(tmp_path: Path) -> None:
    """Sequence 2 waits in the backlog with START and END, then START again (a new sequence behind the old one):
    the old one was no longer under its ID, and the unload left its callers waiting until their deadlines."""
    with _unloading_server(tmp_path / "models") as s:
        c = tc.InferenceServerClient(s.address)
        try:
            c.infer("acc_slow", _x(1.0), sequence_id=1, sequence_start=True)  # holds the only slot
            answers: dict[str, object] = {}
            sequencer = _sequencer(s, "acc_slow")
            threads = []
            for key, start, end in (("start", True, False), ("end", False, True), ("again", True, False)):
                threads.append(
                    _in_thread(s.address, answers, key, 1.0, sequence_id=2, sequence_start=start, sequence_end=end)
                )
                wait_for(f"{key} accepted", functools.partial(_has_accepted, sequencer, len(threads)))
            started = time.monotonic()
            c.unload_model("acc_slow")
            for thread in threads:
                thread.join(30)
            assert time.monotonic() - started < 20  # not the callers' 30 s deadlines
        finally:
            c.close()
    assert answers == {"start": UNLOADED, "end": UNLOADED, "again": UNLOADED}


WRAPPED = """
name: "wrapped"
platform: "ensemble"
max_batch_size: 8
input [ {{ name: "X" data_type: TYPE_FP32 dims: [ 1 ] }} ]
output [ {{ name: "Y" data_type: TYPE_FP32 dims: [ 1 ] }} ]
ensemble_scheduling {{ step [ {{ model_name: "{step}" model_version: -1
  input_map {{ key: "INPUT" value: "X" }} output_map {{ key: "OUTPUT" value: "Y" }} }} ] }}
"""
"""An ensemble of one step: a sequence model."""


def test_an_unload_fails_an_ensemble_waiting_in_the_backlog_at_once(tmp_path: Path) -> None:
    """An ensemble request holds its step model; its sequence waits for the one slot, held by an idle sequence
    whose END can no longer come. The unload used to wait out its whole grace (30 s) before failing it."""
    root = _unload_repository(tmp_path / "models")
    (root / "wrapped" / "1").mkdir(parents=True)
    write_config(root, "wrapped", WRAPPED.format(step="acc_slow"))
    with ServerThread(root, model_control_mode="explicit", load_model=["acc_slow", "wrapped"]) as s:
        c = tc.InferenceServerClient(s.address)
        try:
            c.infer("acc_slow", _x(1.0), sequence_id=1, sequence_start=True)  # holds the only slot, then idles
            sequencer = _sequencer(s, "acc_slow")
            answers: dict[str, object] = {}

            def ensemble() -> None:
                x = tc.InferInput("X", [1, 1], "FP32")
                x.set_data_from_numpy(np.array([[2.0]], np.float32))
                try:
                    c.infer("wrapped", [x], sequence_id=2, sequence_start=True, client_timeout=60)
                    answers["wrapped"] = "answered"
                except InferenceServerException as exc:
                    answers["wrapped"] = f"{exc.status()} {exc.message()}"

            thread = threading.Thread(target=ensemble)
            thread.start()
            wait_for("the ensemble's sequence in the backlog", lambda: sequencer.backlog == 1)
            started = time.monotonic()
            c.unload_model("acc_slow")
            thread.join(60)
            assert time.monotonic() - started < 10
        finally:
            c.close()
    assert answers == {"wrapped": UNLOADED.replace("model 'acc_slow'", "in ensemble 'wrapped', model 'acc_slow'")}


def test_an_ensemble_keeps_a_sequence_in_the_order_its_requests_arrived(tmp_path: Path) -> None:
    """A step whose run time the request chooses comes before the sequence model: the START request takes long
    there, the next one little, so the second would reach the sequence model first (and be refused as not
    started). The request's place in the sequence is taken when it reaches the server, so it waits its turn."""
    root = tmp_path / "models"
    paced_model(root / "paced" / "1" / "model.onnx")
    write_config(root, "paced", 'name: "paced"\nmax_batch_size: 8\ninstance_group [ { count: 2 } ]\n')
    accumulator_model(root / "acc" / "1" / "model.onnx")
    write_config(root, "acc", accumulator_config("acc"))
    (root / "paced_acc" / "1").mkdir(parents=True)
    write_config(
        root,
        "paced_acc",
        """
name: "paced_acc"
platform: "ensemble"
max_batch_size: 8
input [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] } ]
ensemble_scheduling { step [
  { model_name: "paced" input_map { key: "INPUT0" value: "X" } output_map { key: "OUTPUT0" value: "paced_x" } },
  { model_name: "acc" input_map { key: "INPUT" value: "paced_x" } output_map { key: "OUTPUT" value: "Y" } } ] }
""",
    )
    with ServerThread(root) as s:
        c = tc.InferenceServerClient(s.address)
        answers: queue.Queue[tuple[object, object]] = queue.Queue()
        try:
            c.start_stream(callback=lambda result, error: answers.put((result, error)))
            for request_id, value, start in (("slow-start", 40.0, True), ("quick-next", 0.5, False)):
                x = tc.InferInput("X", [1, 1], "FP32")
                x.set_data_from_numpy(np.array([[value]], np.float32))
                c.async_stream_infer("paced_acc", [x], request_id=request_id, sequence_id=3, sequence_start=start)
            got = {}
            for _ in range(2):
                result, error = answers.get(timeout=60)
                assert error is None, error
                assert isinstance(result, tc.InferResult)
                got[result.get_response().id] = float(result.as_numpy("Y")[0, 0])
            c.stop_stream()
        finally:
            c.close()
    assert got == {"slow-start": 40.0, "quick-next": 40.5}


def test_an_ensemble_output_that_needs_no_sequence_step_needs_no_sequence(tmp_path: Path) -> None:
    """Asking only for an output the sequence step does not feed: the request needs no correlation ID, and no
    sequence of the step model is started (none would be ended)."""
    root = tmp_path / "models"
    paced_model(root / "paced" / "1" / "model.onnx")
    write_config(root, "paced", 'name: "paced"\nmax_batch_size: 8\n')
    accumulator_model(root / "acc" / "1" / "model.onnx")
    write_config(root, "acc", accumulator_config("acc"))
    (root / "both" / "1").mkdir(parents=True)
    write_config(
        root,
        "both",
        """
name: "both"
platform: "ensemble"
max_batch_size: 8
input [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] }, { name: "Z" data_type: TYPE_FP32 dims: [ 1 ] } ]
ensemble_scheduling { step [
  { model_name: "acc" input_map { key: "INPUT" value: "X" } output_map { key: "OUTPUT" value: "Y" } },
  { model_name: "paced" input_map { key: "INPUT0" value: "X" } output_map { key: "OUTPUT0" value: "Z" } } ] }
""",
    )
    with ServerThread(root) as s:
        c = tc.InferenceServerClient(s.address)
        try:
            x = tc.InferInput("X", [1, 1], "FP32")
            x.set_data_from_numpy(np.array([[0.25]], np.float32))
            r = c.infer("both", [x], outputs=[tc.InferRequestedOutput("Z")])
            assert r.as_numpy("Z").tolist() == [[0.25]]
            r = c.infer("both", [x], outputs=[tc.InferRequestedOutput("Z")], sequence_id=8, sequence_start=True)
            assert _sequencer(s, "acc").active == 0
        finally:
            c.close()


def test_an_ensemble_response_cache_never_answers_a_sequence(tmp_path: Path) -> None:
    """An ensemble over a sequence model may enable response_cache; requests of a sequence skip it (the answer
    depends on the sequence's state), and the step sees each of them."""
    root = tmp_path / "models"
    accumulator_model(root / "acc" / "1" / "model.onnx")
    write_config(root, "acc", accumulator_config("acc"))
    (root / "wrapped" / "1").mkdir(parents=True)
    write_config(root, "wrapped", WRAPPED.format(step="acc") + "response_cache { enable: true }\n")
    with ServerThread(root, response_cache_bytes=1 << 20) as s:
        c = tc.InferenceServerClient(s.address)
        try:
            sums = []
            for step in range(3):
                x = tc.InferInput("X", [1, 1], "FP32")
                x.set_data_from_numpy(np.array([[1.0]], np.float32))
                r = c.infer("wrapped", [x], sequence_id=5, sequence_start=step == 0, sequence_end=step == 2)
                sums.append(float(r.as_numpy("Y")[0, 0]))
            assert sums == [1.0, 2.0, 3.0]
            stats = c.get_inference_statistics("wrapped").model_stats[0].inference_stats
            assert stats.cache_hit.count == 0 and stats.success.count == 3
        finally:
            c.close()


# ----- the Sequencer itself, in process: orders of events a client cannot pin down ---------------------------------


class _Gated:
    """A stateful model function that blocks each call until `release`: OUT = S_IN + X, S_OUT = OUT."""

    def __init__(self) -> None:
        self._calls = threading.Semaphore(0)
        self.active = 0

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self._calls.release()

    def __call__(self, inputs: Any, outputs: Any) -> dict[str, np.ndarray]:
        self.active += 1
        try:
            if not self._calls.acquire(timeout=10):
                raise TimeoutError("the test never released the call")
        finally:
            self.active -= 1
        total = inputs["S_IN"] + inputs["X"]
        return {name: total for name in outputs}


async def _sequencer_on(fn: _Gated, slots: int) -> tuple[Any, Any]:
    from google.protobuf import text_format

    from tensorgate.protos import model_config_pb2 as mc
    from tensorgate.server.backends.function import FunctionBackend
    from tensorgate.server.repository.sequence import SequenceSpec, State
    from tensorgate.server.scheduling.policy import SchedulingPolicy
    from tensorgate.server.scheduling.scheduler import Scheduler
    from tensorgate.server.scheduling.sequencer import Sequencer
    from tensorgate.server.telemetry.statistics import ModelStats

    config = text_format.Parse('name: "m" max_batch_size: 4 sequence_batching { }', mc.ModelConfig())
    scheduler = Scheduler("m", 1, FunctionBackend(fn), ModelStats(), 1, SchedulingPolicy.from_config(config))
    spec = SequenceSpec(10**10, (), (State("S_IN", "S_OUT", np.zeros((1,), np.float32)),), slots, None)
    return scheduler, Sequencer("m", 1, scheduler, spec, True)


async def _until(condition: Callable[[], bool], what: str) -> None:
    limit = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < limit, f"not within 10 s: {what}"
        await asyncio.sleep(0.002)


async def test_requests_of_a_sequence_that_waited_for_its_slot_run_through_an_unload() -> None:
    """Sequence 2 waits in the backlog with two requests; it gets the slot, its first runs and its second waits
    behind it when the unload begins: both were accepted, and both run (the second was refused "being unloaded"
    when the places taken in the backlog did not hold the model's Scheduler once the slot came)."""
    from tensorgate.server.backends.base import SequenceFlags

    fn = _Gated()
    scheduler, sequencer = await _sequencer_on(fn, slots=1)

    def send(value: float, sid: int, start: bool, end: bool) -> asyncio.Task[Any]:
        x = {"X": np.full((1, 1), value, np.float32)}
        return asyncio.ensure_future(sequencer.submit(x, ["S_OUT"], 1, None, SequenceFlags(sid, start, end)))

    a = send(1.0, 1, True, True)
    await _until(lambda: fn.active == 1, "sequence 1 runs")
    b1, b2 = send(10.0, 2, True, False), send(20.0, 2, False, True)
    await asyncio.sleep(0.01)
    assert sequencer.backlog == 1
    fn.release()  # sequence 1 ends: sequence 2 takes the slot, and its first request runs
    await a
    await _until(lambda: fn.active == 1, "sequence 2's first request runs")
    sequencer.drain()
    closing = asyncio.ensure_future(scheduler.close(grace=10))
    await asyncio.sleep(0.05)
    fn.release(2)
    await asyncio.wait_for(closing, 15)
    sequencer.close()
    results = [float(r[0]["S_OUT"][0, 0]) for r in await asyncio.gather(b1, b2)]
    assert results == [10.0, 30.0]


async def test_no_new_sequence_starts_once_the_unload_has_begun_even_with_a_free_slot() -> None:
    """A START that reaches the sequencer after `drain` (an ensemble's later step, which took the old version
    before the unload) is refused as never run, though a slot is free: the unload would cut the sequence short."""
    from tensorgate.server.backends.base import SequenceFlags
    from tensorgate.server.errors import ServerUnavailableError

    fn = _Gated()
    scheduler, sequencer = await _sequencer_on(fn, slots=2)
    sequencer.drain()
    with pytest.raises(ServerUnavailableError, match="unloaded before the request ran"):
        x = {"X": np.ones((1, 1), np.float32)}
        await asyncio.wait_for(sequencer.submit(x, ["S_OUT"], 1, None, SequenceFlags(5, True, False)), 10)
    assert fn.active == 0 and sequencer.active == 0
    await scheduler.close(grace=1)
    sequencer.close()


# ----- sequences belong to the identity that started them (mTLS) --------------------------------------------


def _mtls_client(server: ServerThread, pki: Pki, name: str) -> tc.InferenceServerClient:
    cert, key = pki.client(name)
    return tc.InferenceServerClient(
        server.address, ssl=True, root_certificates=str(pki.ca_path), private_key=str(key), certificate_chain=str(cert)
    )


def _total(c: tc.InferenceServerClient, model: str, x: float, sid: int, **flags: bool) -> float:
    return float(c.infer(model, _x(x), sequence_id=sid, **flags).as_numpy("OUTPUT")[0, 0])


def check_sequences_belong_to_their_starter(server: ServerThread, pki: Pki, model: str, sid: int = 7) -> None:
    """Two identities both allowed to infer (the default mTLS policy): bob can neither continue, end nor restart
    alice's sequence, and his tries leave its state alone; once she ends it, the ID is free for him. Shared with
    test_remote_sequences.py, where the upstream keeps the state."""
    alice, bob = _mtls_client(server, pki, "alice"), _mtls_client(server, pki, "bob")
    try:
        assert _total(alice, model, 1.0, sid, sequence_start=True) == 1.0
        refused = f"sequence {sid} was started by another identity; identity '{spiffe_id('bob')}' may not send"
        for flags in ({}, {"sequence_end": True}, {"sequence_start": True}):
            msg = _error(grpc.StatusCode.PERMISSION_DENIED, bob.infer, model, _x(100.0), sequence_id=sid, **flags)
            assert f"model '{model}' version 1: {refused}" in msg, msg
        assert _total(alice, model, 2.0, sid) == 3.0  # undisturbed: bob's 100s never reached the state
        assert _total(alice, model, 3.0, sid, sequence_end=True) == 6.0
        assert _total(bob, model, 5.0, sid, sequence_start=True) == 5.0  # ended: the ID is anyone's again
        msg = _error(grpc.StatusCode.PERMISSION_DENIED, alice.infer, model, _x(1.0), sequence_id=sid, sequence_end=True)
        assert f"identity '{spiffe_id('alice')}' may not send" in msg
        assert _total(bob, model, 1.0, sid, sequence_end=True) == 6.0
    finally:
        alice.close()
        bob.close()


def test_a_sequence_takes_requests_from_the_identity_that_started_it_only(tmp_path: Path) -> None:
    root = tmp_path / "models"
    accumulator_model(root / "acc" / "1" / "model.onnx")
    write_config(root, "acc", accumulator_config("acc"))
    pki = Pki(tmp_path / "pki")
    with ServerThread(root, **pki.server_settings()) as s:
        check_sequences_belong_to_their_starter(s, pki, "acc")
