"""Sequence models as a user moving from Triton sees them: the queue depth counts the requests waiting for their
sequence (behind an earlier one, or in the backlog), a request's `timeout` bounds its wait in the backlog, a stop
that runs out of grace tells a backlogged sequence that it never ran, and an INT64 CORRID takes every ID Triton's
clients send. Real servers, the real stateful ONNX model of tests/onnx_models.py, unmodified tritonclient."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from tests.onnx_models import accumulator_config, accumulator_model, write_config
from tests.scraping import metrics_url, scrape, value
from tests.serving import ServerThread
from tests.test_poll import wait_for
from tests.test_sequence import WRAPPED, _in_thread

# One slot, and a minute idle: a second sequence waits in the backlog for as long as a test needs it there.
ONE_SLOT = "oldest { max_candidate_sequences: 1 } max_sequence_idle_microseconds: 60000000"


def _x(value: float) -> list[tc.InferInput]:
    inp = tc.InferInput("INPUT", [1, 1], "FP32")
    inp.set_data_from_numpy(np.full((1, 1), value, np.float32))
    return [inp]


def _repository(root: Path) -> Path:
    for name in ("one", "one_timeout", "one_wrapped"):  # a model per test: no test's sequence holds another's slot
        accumulator_model(root / name / "1" / "model.onnx")
        write_config(root, name, accumulator_config(name, extra=ONE_SLOT))
    (root / "wrapped" / "1").mkdir(parents=True)
    write_config(root, "wrapped", WRAPPED.format(step="one_wrapped"))  # one step, one slot
    for corrid in ("INT64", "INT32"):
        name = f"acc_{corrid.lower()}"
        accumulator_model(root / name / "1" / "model.onnx", corrid=corrid)
        write_config(root, name, accumulator_config(name, corrid=f"TYPE_{corrid}"))
    return root


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    with ServerThread(_repository(tmp_path_factory.mktemp("sequence_review") / "models")) as s:
        yield s


def _depth(server: ServerThread, model: str) -> float:
    return value(scrape(metrics_url(server)), "tensorgate_queue_depth", model=model, version="1")


def test_the_queue_depth_counts_requests_waiting_for_their_sequence(served: ServerThread) -> None:
    """Sequence 2 waits for the only slot, which sequence 1 holds: its START (in the backlog) and the request
    sent behind it are queued, and tensorgate_queue_depth says so (it said 0 while they waited)."""
    sequencer = served.app.repository.get("one", "").sequencer
    c = tc.InferenceServerClient(served.address)
    answers: queue.Queue[tuple[object, object]] = queue.Queue()
    try:
        assert c.infer("one", _x(1.0), sequence_id=1, sequence_start=True).as_numpy("OUTPUT").tolist() == [[1.0]]
        c.start_stream(callback=lambda result, error: answers.put((result, error)))
        c.async_stream_infer("one", _x(2.0), sequence_id=2, sequence_start=True, request_id="a")
        c.async_stream_infer("one", _x(3.0), sequence_id=2, sequence_end=True, request_id="b")
        # Both taken in (the backlog holds sequence 2, with its two requests) before the scrape.
        wait_for(
            "both requests of sequence 2 waiting",
            lambda: [q.pending for q in list(sequencer._backlog)] == [2],
        )
        assert _depth(served, "one") == 2
        c.infer("one", _x(1.0), sequence_id=1, sequence_end=True)  # its slot goes to sequence 2
        got = []
        for _ in range(2):
            result, error = answers.get(timeout=30)
            assert error is None, error
            assert isinstance(result, tc.InferResult)
            got.append(result.as_numpy("OUTPUT").tolist())
        assert got == [[[2.0]], [[5.0]]]
        assert _depth(served, "one") == 0
    finally:
        c.stop_stream(cancel_requests=True)
        c.close()


def test_a_request_timeout_bounds_the_wait_for_a_slot(served: ServerThread) -> None:
    """As Triton's backlog honours a request's `timeout` parameter: sequence 12 waits for the slot that sequence
    11 holds no longer than its 0.2 s timeout (it waited for the call's deadline, or for ever: tritonclient sets
    none), and is dropped from the backlog; sequence 11, in its slot, is not bound by one."""
    sequencer = served.app.repository.get("one_timeout", "").sequencer
    c = tc.InferenceServerClient(served.address)
    try:
        c.infer("one_timeout", _x(1.0), sequence_id=11, sequence_start=True, timeout=1)
        with pytest.raises(InferenceServerException) as info:
            c.infer("one_timeout", _x(1.0), sequence_id=12, sequence_start=True, timeout=200_000, client_timeout=10)
        assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        message = str(info.value.message())
        assert "model 'one_timeout' version 1: the request's timeout (200000 us) passed while its sequence" in message
        assert "waited for a slot" in message
        wait_for("sequence 12 dropped from the backlog", lambda: sequencer.backlog == 0)
        last = c.infer("one_timeout", _x(2.0), sequence_id=11, sequence_end=True, timeout=1)
        assert last.as_numpy("OUTPUT").tolist() == [[3.0]]
    finally:
        c.close()


def test_a_request_timeout_bounds_an_ensembles_wait_for_a_sequence_slot(served: ServerThread) -> None:
    """The same through an ensemble whose step is the sequence model: its step waited for the call's deadline."""
    sequencer = served.app.repository.get("one_wrapped", "").sequencer
    c = tc.InferenceServerClient(served.address)
    x = tc.InferInput("X", [1, 1], "FP32")
    x.set_data_from_numpy(np.array([[2.0]], np.float32))
    try:
        c.infer("one_wrapped", _x(1.0), sequence_id=21, sequence_start=True, timeout=1)
        with pytest.raises(InferenceServerException) as info:
            c.infer("wrapped", [x], sequence_id=22, sequence_start=True, timeout=200_000, client_timeout=10)
        assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        assert "in ensemble 'wrapped', model 'one_wrapped' version 1: the request's timeout (200000 us) passed" in (
            str(info.value.message())
        )
        wait_for("sequence 22 dropped from the backlog", lambda: sequencer.backlog == 0)
        c.infer("one_wrapped", _x(2.0), sequence_id=21, sequence_end=True, timeout=1)
    finally:
        c.close()


def test_an_int64_corrid_takes_ids_past_int64_as_triton_feeds_them(served: ServerThread) -> None:
    """tritonclient sends sequence_id in int64_param, and the server reads it as uint64 (as Triton does): -5
    arrives as 2**64 - 5. An INT64 CORRID gets the same bits back, -5, as Triton copies them, rather than the
    request being refused as not fitting the control."""
    c = tc.InferenceServerClient(served.address)
    try:
        first = c.infer("acc_int64", _x(2.0), sequence_id=-5, sequence_start=True)
        assert first.as_numpy("CORRID_OUT").tolist() == [[-5]]
        last = c.infer("acc_int64", _x(3.0), sequence_id=-5, sequence_end=True)
        assert last.as_numpy("OUTPUT").tolist() == [[5.0]]
        assert last.as_numpy("CORRID_OUT").tolist() == [[-5]]
    finally:
        c.close()


def test_a_signed_corrid_takes_the_negative_id_the_client_sent(served: ServerThread) -> None:
    """An INT32 CORRID refused tritonclient's -5 as "sequence_id 18446744073709551611 does not fit" (it arrives
    as uint64); it gets -5, and an ID that does not fit is named as the client sent it."""
    c = tc.InferenceServerClient(served.address)
    try:
        first = c.infer("acc_int32", _x(2.0), sequence_id=-5, sequence_start=True)
        assert first.as_numpy("CORRID_OUT").tolist() == [[-5]]
        assert c.infer("acc_int32", _x(3.0), sequence_id=-5, sequence_end=True).as_numpy("OUTPUT").tolist() == [[5.0]]
        with pytest.raises(InferenceServerException, match=r"sequence_id -3000000000 does not fit the CORRID control"):
            c.infer("acc_int32", _x(1.0), sequence_id=-3_000_000_000, sequence_start=True)
    finally:
        c.close()


def test_a_stop_out_of_grace_says_a_request_behind_its_sequences_last_never_ran(tmp_path: Path) -> None:
    """Sequence 7 holds the slot; its request A waits in the queue for a batch, B behind A. A stop with
    0.1 s of grace fails A as not run; B, once A is over, went on to the Scheduler (and could run during the
    server's last half second) and was cut off with gRPC's bare cancel (review 122)."""
    root = tmp_path / "models"
    accumulator_model(root / "acc_slow" / "1" / "model.onnx")
    # A waits for a batch (3 s, past any slow start of B's client) until the stop refuses it.
    extra = (
        "max_sequence_idle_microseconds: 60000000 "
        "oldest { max_candidate_sequences: 1 max_queue_delay_microseconds: 3000000 preferred_batch_size: [ 8 ] }"
    )
    write_config(root, "acc_slow", accumulator_config("acc_slow", extra=extra))
    answers: dict[str, object] = {}
    with ServerThread(root) as s:
        c = tc.InferenceServerClient(s.address)
        try:
            c.infer("acc_slow", _x(1.0), sequence_id=7, sequence_start=True, client_timeout=30)  # holds the slot
        finally:
            c.close()
        model = s.app.repository.get("acc_slow", "")
        assert model.scheduler is not None and model.sequencer is not None
        a = _in_thread(s.address, answers, "a", 2.0, sequence_id=7)
        wait_for("A queued", lambda: model.scheduler is not None and model.scheduler.queued == 1)
        b = _in_thread(s.address, answers, "b", 3.0, sequence_id=7)
        wait_for("B waiting behind A", lambda: model.sequencer is not None and model.sequencer.waiting == 1)
        s.run(s.app.stop(grace=0.1))
        a.join(30)
        b.join(30)
    never_ran = "model 'acc_slow' version 1 did not run the request before the grace period ended"
    assert never_ran in str(answers["a"]) and never_ran in str(answers["b"]), answers


def test_a_stop_out_of_grace_says_a_backlogged_sequence_never_ran(tmp_path: Path) -> None:
    """The server stops while sequence 8 waits for the slot that sequence 7 holds (and keeps: a minute idle): once
    the grace is over its caller gets UNAVAILABLE saying the request did not run and to retry elsewhere, as the
    model's queued requests do, not gRPC's bare "Cancelling all calls", which cannot tell it from work that ran."""
    answers: queue.Queue[object] = queue.Queue()
    with ServerThread(_repository(tmp_path / "models")) as s:
        c = tc.InferenceServerClient(s.address)
        try:
            c.infer("one", _x(1.0), sequence_id=7, sequence_start=True)
        finally:
            c.close()

        def backlogged() -> None:
            other = tc.InferenceServerClient(s.address)
            try:
                answers.put(other.infer("one", _x(1.0), sequence_id=8, sequence_start=True, client_timeout=30))
            except InferenceServerException as exc:
                answers.put(exc)
            finally:
                other.close()

        thread = threading.Thread(target=backlogged)
        thread.start()
        try:
            wait_for("sequence 8 in the backlog", lambda: s.app.repository.get("one", "").sequencer.backlog == 1)
            s.run(s.app.stop(grace=0.5))
            answer = answers.get(timeout=30)
        finally:
            thread.join(30)
    assert isinstance(answer, InferenceServerException), answer
    assert answer.status() == "StatusCode.UNAVAILABLE", answer.message()
    assert (
        "model 'one' version 1 did not run the request before the grace period ended; the server is shutting "
        "down; retry on another replica" in str(answer.message())
    )
