"""Sequence (stateful) models on an upstream: tensorgate forwards each request's sequence parameters and keeps a
sequence's requests in the order they arrived, and the upstream's sequence batcher keeps the state. The upstream
here is a second tensorgate (it speaks Triton's protocol and serves sequence models as Triton does), serving the
accumulator of tests/onnx_models.py; the front reaches it through the remote Triton backend, over real gRPC.
Clients are unmodified tritonclient (unary and stream) and ours."""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from google.protobuf import text_format
from tritonclient.utils import InferenceServerException

from tensorgate.client import InferenceClient
from tensorgate.protos import model_config_pb2 as mc
from tensorgate.server.backends.triton import UpstreamModel, complete_config
from tensorgate.server.errors import ModelLoadError
from tests.onnx_models import accumulator_config, accumulator_model, add_sub_model, write_config
from tests.pki import Pki
from tests.scraping import metrics_url, scrape, value
from tests.scripted_upstream import ScriptedUpstream
from tests.serving import ServerThread
from tests.test_poll import wait_for
from tests.test_sequence import _error, _mtls_client, _total, _x, check_sequences_belong_to_their_starter


def _pause(us: int) -> str:
    """A slow upstream's strategy: a request waits up to `us` there for others to batch with."""
    return f"oldest {{ max_candidate_sequences: 16 max_queue_delay_microseconds: {us} preferred_batch_size: [ 16 ] }}"


def _remote(root: Path, name: str, url: str, upstream_model: str, *extra: str) -> None:
    lines = [
        'backend: "tensorgate_triton"',
        f'parameters {{ key: "tensorgate.triton.url" value {{ string_value: "{url}" }} }}',
        f'parameters {{ key: "tensorgate.triton.model_name" value {{ string_value: "{upstream_model}" }} }}',
        *extra,
    ]
    (root / name).mkdir(parents=True)
    (root / name / "config.pbtxt").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    root = tmp_path_factory.mktemp("upstream") / "models"
    accumulator_model(root / "acc" / "1" / "model.onnx")
    write_config(root, "acc", accumulator_config("acc", max_batch_size=16))
    accumulator_model(root / "acc_slow" / "1" / "model.onnx")
    write_config(root, "acc_slow", accumulator_config("acc_slow", max_batch_size=16, extra=_pause(300_000)))
    accumulator_model(root / "acc_pause" / "1" / "model.onnx")
    write_config(root, "acc_pause", accumulator_config("acc_pause", max_batch_size=16, extra=_pause(3_000_000)))
    accumulator_model(root / "acc_text" / "1" / "model.onnx", corrid="BYTES")
    write_config(root, "acc_text", accumulator_config("acc_text", corrid="TYPE_STRING"))
    add_sub_model(root / "add_sub" / "1" / "model.onnx")
    with ServerThread(root) as s:
        yield s


@pytest.fixture(scope="module")
def front(upstream: ServerThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    root = tmp_path_factory.mktemp("front") / "models"
    url = upstream.address
    _remote(root, "racc", url, "acc")
    _remote(root, "racc_slow", url, "acc_slow")
    _remote(root, "racc_text", url, "acc_text")
    # Contradictions between config.pbtxt and what the upstream model is: each fails its own load, with why.
    _remote(root, "stateless", url, "add_sub", "sequence_batching { }")
    _remote(root, "batched", url, "acc", "max_batch_size: 16", "dynamic_batching { }")
    # config.pbtxt may repeat the upstream's sequence batcher, not contradict it (the upstream's is what runs).
    _remote(root, "racc_same", url, "acc_slow", f"sequence_batching {{ {_pause(300_000)} }}")
    _remote(root, "racc_idle", url, "acc", "sequence_batching { max_sequence_idle_microseconds: 5 }")
    # The upstream's preferred_batch_size [16] is its batcher's business, not a limit on a smaller front.
    _remote(root, "racc_small", url, "acc_slow", "max_batch_size: 4")
    with ServerThread(root, model_control_mode="explicit", load_model=["*"]) as s:
        yield s


@pytest.fixture
def client(front: ServerThread) -> Iterator[tc.InferenceServerClient]:
    c = tc.InferenceServerClient(front.address)
    try:
        yield c
    finally:
        c.close()


def test_the_upstream_keeps_each_sequence_state(client: tc.InferenceServerClient) -> None:
    """Two interleaved sequences through the front: the upstream saw START, END, READY and the correlation ID of
    each request (the accumulator echoes them), so each sums on its own. The front serves the upstream's
    sequence_batching (perf_analyzer reads it to send sequences) and batches nothing itself."""
    config = client.get_model_config("racc").config
    assert [c.name for c in config.sequence_batching.control_input] == ["START", "END", "READY", "CORRID"]
    assert not config.HasField("dynamic_batching")
    assert [i.name for i in client.get_model_metadata("racc").inputs] == ["INPUT"]
    seen = []
    for sid, start, end, x in [(101, True, False, 1.0), (202, True, False, 10.0), (101, False, False, 2.0)]:
        r = client.infer("racc", _x(x), sequence_id=sid, sequence_start=start, sequence_end=end)
        seen.append(
            (float(r.as_numpy("OUTPUT")[0, 0]), r.as_numpy("FLAGS")[0].tolist(), int(r.as_numpy("CORRID_OUT")[0, 0]))
        )
    for sid, x in [(202, 20.0), (101, 3.0)]:
        r = client.infer("racc", _x(x), sequence_id=sid, sequence_end=True)
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


def test_refusals_name_the_model(client: tc.InferenceServerClient) -> None:
    """No correlation ID: refused here, before anything goes upstream. An ended sequence: the upstream refuses it,
    and the caller reads its reason under the front's model name. The front goes on serving."""
    msg = _error(grpc.StatusCode.INVALID_ARGUMENT, client.infer, "racc", _x(1.0))
    assert "model 'racc' version 1: a sequence model needs a non-zero or non-empty correlation ID" in msg
    msg = _error(grpc.StatusCode.INVALID_ARGUMENT, client.infer, "racc", _x(1.0), sequence_id=4242)
    assert "model 'racc' version 1:" in msg and "sequence 4242 is not active" in msg
    r = client.infer("racc", _x(4.0), sequence_id=4242, sequence_start=True, sequence_end=True)
    assert r.as_numpy("OUTPUT").tolist() == [[4.0]]


def test_string_ids_and_ids_past_int64_are_forwarded(front: ServerThread) -> None:
    """A string correlation ID goes upstream as a string; an integer past int64 goes as its two's complement in
    int64_param (tritonclient's field), which Triton, and a tensorgate upstream, read as the same uint64."""
    with InferenceClient(front.address, timeout=30) as c:
        x = {"INPUT": np.array([[2.0]], np.float32)}
        assert c.infer("racc_text", x, sequence_id="user-7", sequence_start=True).outputs["CORRID_OUT"].tolist() == [
            [b"user-7"]
        ]
        assert c.infer("racc_text", x, sequence_id="user-7", sequence_end=True).outputs["OUTPUT"].tolist() == [[4.0]]
        big = 2**63 + 5
        assert c.infer("racc", x, sequence_id=big, sequence_start=True).outputs["CORRID_OUT"].tolist() == [[big]]
        assert c.infer("racc", x, sequence_id=big, sequence_end=True).outputs["OUTPUT"].tolist() == [[4.0]]
        for beyond in (2**64, -3):  # no protocol field carries these: refused before anything is sent
            with pytest.raises(ValueError, match=r"sequence_id must be a string or an integer in 1\.\.2\*\*64-1"):
                c.infer("racc", x, sequence_id=beyond, sequence_start=True)


def test_a_sequence_has_one_request_upstream_at_a_time(front: ServerThread) -> None:
    """Two sequences of four requests each, all sent at once over one stream to a front with four upstream calls
    in flight, and an upstream that takes 0.2 s per call: the upstream never has two calls of one sequence at
    once (four would go together otherwise, and could reach a real upstream in any order), it sees each
    sequence's requests in the order they were sent, and the two sequences ran side by side."""
    with ScriptedUpstream() as up:
        up.script.sequence = True
        up.script.delay_s = 0.2
        root = front.settings.model_repository
        _remote(root, "scripted", up.url, "m")
        c = tc.InferenceServerClient(front.address)
        answers: queue.Queue[tuple[object, object]] = queue.Queue()
        try:
            c.load_model("scripted")
            assert c.get_model_config("scripted").config.HasField("sequence_batching")
            c.start_stream(callback=lambda result, error: answers.put((result, error)))
            # Held until the queue is seen: 6 queued lasted one 0.2 s call, too short for a loaded machine to see.
            up.script.held = True
            for step in range(4):
                for sid in (9, 10):
                    x = tc.InferInput("X", [1, 2], "FP32")
                    x.set_data_from_numpy(np.array([[sid, step]], np.float32))
                    c.async_stream_infer(
                        "scripted", [x], sequence_id=sid, sequence_start=step == 0, sequence_end=step == 3
                    )
            # Three of each sequence wait behind the first: /metrics counts them as queued.
            depth = {"model": "scripted", "version": "1"}
            wait_for("6 queued", lambda: value(scrape(metrics_url(front)), "tensorgate_queue_depth", **depth) == 6)
            wait_for("one call of each sequence upstream", lambda: up.script.in_flight == {9: 1, 10: 1})
            up.script.held = False
            for _ in range(8):
                _, error = answers.get(timeout=60)
                assert error is None, error
            c.stop_stream()
            c.unload_model("scripted")
        finally:
            c.close()
        assert up.script.most_in_flight == {9: 1, 10: 1}
        for sid in (9, 10):
            assert [(s, e, x) for k, s, e, x in up.script.seen if k == sid] == [
                (step == 0, step == 3, [sid, step]) for step in range(4)
            ]
        # Side by side: had the sequences gone one after the other, the second's first call would come last.
        assert {k for k, *_ in up.script.seen[:2]} == {9, 10}


def test_configs_that_contradict_the_upstream_fail_their_load(client: tc.InferenceServerClient) -> None:
    reasons = {m.name: (m.state, m.reason) for m in client.get_model_repository_index().models}
    state, reason = reasons["stateless"]
    assert state == "UNAVAILABLE" and "the upstream model is not a sequence model" in reason, reason
    state, reason = reasons["batched"]
    assert state == "UNAVAILABLE" and "must not ask for dynamic_batching" in reason, reason
    state, reason = reasons["racc_idle"]
    assert state == "UNAVAILABLE", reason
    assert "sets max_sequence_idle_microseconds other than the upstream model's sequence batcher" in reason, reason
    assert reasons["racc"][0] == "READY"
    assert reasons["racc_same"][0] == "READY"
    # What clients read is the upstream's batcher, controls and all, not the part config.pbtxt repeated.
    served = client.get_model_config("racc_same").config.sequence_batching
    assert served.oldest.max_queue_delay_microseconds == 300_000
    assert [c.name for c in served.control_input] == ["START", "END", "READY", "CORRID"]
    assert reasons["racc_small"][0] == "READY"


UPSTREAM_SEQUENCE = """
oldest { max_candidate_sequences: 4 preferred_batch_size: [ 8 ] }
max_sequence_idle_microseconds: 1000000
control_input [ { name: "START" control [ { kind: CONTROL_SEQUENCE_START fp32_false_true: [ 0, 1 ] } ] } ]
"""
"""A sequence batcher as Triton's ModelConfig shows it: defaults its config.pbtxt left out filled in."""


@pytest.mark.parametrize(
    ("local", "field"),
    [
        pytest.param("oldest { max_candidate_sequences: 4 }", None, id="a-copy-of-the-upstreams-config-pbtxt"),
        pytest.param(UPSTREAM_SEQUENCE, None, id="all-of-it"),
        pytest.param("direct { }", "direct", id="another-strategy"),
        pytest.param("oldest { max_candidate_sequences: 2 }", "oldest.max_candidate_sequences", id="strategy-field"),
        pytest.param("max_sequence_idle_microseconds: 5", "max_sequence_idle_microseconds", id="idle-time"),
        pytest.param('control_input [ { name: "BEGIN" } ]', "control_input", id="control-tensor"),
    ],
)
def test_a_local_sequence_batching_may_repeat_the_upstreams_not_change_it(local: str, field: str | None) -> None:
    """Only what config.pbtxt sets is compared (Triton fills in defaults its own config.pbtxt left out), the
    strategy included; what is served is the upstream's batcher."""
    upstream = UpstreamModel([], [], 8, text_format.Parse(UPSTREAM_SEQUENCE, mc.ModelSequenceBatching()))
    config = text_format.Parse(f"sequence_batching {{ {local} }}", mc.ModelConfig(name="front"))
    if field is not None:
        with pytest.raises(ModelLoadError, match=f"sequence_batching sets {field} other than the upstream"):
            complete_config(config, upstream, max_batch_size_given=False)
        return
    complete_config(config, upstream, max_batch_size_given=False)
    assert config.sequence_batching == upstream.sequence_batching


def _taken_in(front: ServerThread, model: str, n: int) -> bool:
    remote = front.app.repository.get(model, "").remote_sequences
    return remote is not None and remote.requests == n


def test_an_unload_runs_a_request_waiting_behind_its_sequence(upstream: ServerThread, tmp_path: Path) -> None:
    """The second request of a sequence waits at the front while the first waits upstream (up to 3 s, for a batch
    that never fills); an unload of the front's model lets both run (they were accepted) instead of failing the
    second once the first is answered."""
    root = tmp_path / "models"
    _remote(root, "racc_pause", upstream.address, "acc_pause")
    with ServerThread(root, model_control_mode="explicit", load_model=["racc_pause"]) as s:
        answers: dict[str, object] = {}

        def call(key: str, value: float, start: bool, end: bool) -> None:
            c = tc.InferenceServerClient(s.address)
            try:
                r = c.infer(
                    "racc_pause", _x(value), sequence_id=77, sequence_start=start, sequence_end=end, client_timeout=30
                )
                answers[key] = float(r.as_numpy("OUTPUT")[0, 0])
            except InferenceServerException as exc:
                answers[key] = f"{exc.status()} {exc.message()}"
            finally:
                c.close()

        first = threading.Thread(target=call, args=("a1", 1.0, True, False))
        first.start()
        wait_for("the first request at the front", functools.partial(_taken_in, s, "racc_pause", 1))
        second = threading.Thread(target=call, args=("a2", 2.0, False, True))
        second.start()
        wait_for("the second request behind the first", functools.partial(_taken_in, s, "racc_pause", 2))
        c = tc.InferenceServerClient(s.address)
        try:
            c.unload_model("racc_pause")
        finally:
            c.close()
        first.join(30)
        second.join(30)
    assert answers == {"a1": 1.0, "a2": 3.0}


def test_a_stop_out_of_grace_says_a_request_behind_its_sequences_last_never_ran(
    upstream: ServerThread, tmp_path: Path
) -> None:
    """As above, but the server stops with 0.1 s of grace: the first request, upstream, is cut off; the second,
    waiting at the front behind it, went upstream once the first was over, after the stop had told queued
    callers that their requests did not run (review 122). It is refused as not run now."""
    root = tmp_path / "models"
    _remote(root, "racc_pause", upstream.address, "acc_pause")
    answers: dict[str, object] = {}
    with ServerThread(root) as s:

        def call(key: str, value: float, start: bool) -> None:
            c = tc.InferenceServerClient(s.address)
            try:
                r = c.infer("racc_pause", _x(value), sequence_id=78, sequence_start=start, client_timeout=30)
                answers[key] = float(r.as_numpy("OUTPUT")[0, 0])
            except InferenceServerException as exc:
                answers[key] = f"{exc.status()} {exc.message()}"
            finally:
                c.close()

        first = threading.Thread(target=call, args=("a1", 1.0, True))
        first.start()
        wait_for("the first request at the front", functools.partial(_taken_in, s, "racc_pause", 1))
        second = threading.Thread(target=call, args=("a2", 2.0, False))
        second.start()
        wait_for("the second request behind the first", functools.partial(_taken_in, s, "racc_pause", 2))
        s.run(s.app.stop(grace=0.1))
        first.join(30)
        second.join(30)
    assert "model 'racc_pause' version 1 did not run the request before the grace period ended" in str(answers["a2"]), (
        answers
    )


def test_a_caller_that_leaves_while_waiting_does_not_let_the_next_overtake(front: ServerThread) -> None:
    """B waits behind A (0.5 s upstream) and its deadline passes there; C, sent after, still waits for A: the
    upstream never has two calls of the sequence at once, and B never reaches it."""
    with ScriptedUpstream() as up:
        up.script.sequence = True
        up.script.delay_s = 0.5
        _remote(front.settings.model_repository, "scripted_slow", up.url, "m")
        results: dict[str, str] = {}

        def call(key: str, value: float, timeout: float) -> None:
            x = tc.InferInput("X", [1, 2], "FP32")
            x.set_data_from_numpy(np.full((1, 2), value, np.float32))
            c = tc.InferenceServerClient(front.address)
            try:
                c.infer("scripted_slow", [x], sequence_id=5, sequence_start=key == "a", client_timeout=timeout)
                results[key] = "OK"
            except InferenceServerException as exc:
                results[key] = str(exc.status())
            finally:
                c.close()

        c = tc.InferenceServerClient(front.address)
        try:
            c.load_model("scripted_slow")
            a = threading.Thread(target=call, args=("a", 1.0, 30.0))
            a.start()
            wait_for("a at the front", functools.partial(_taken_in, front, "scripted_slow", 1))
            call("b", 2.0, 0.1)
            c_thread = threading.Thread(target=call, args=("c", 3.0, 30.0))
            c_thread.start()
            a.join(30)
            c_thread.join(30)
            c.unload_model("scripted_slow")
        finally:
            c.close()
    assert results == {"a": "OK", "b": "StatusCode.DEADLINE_EXCEEDED", "c": "OK"}
    assert up.script.most_in_flight == {5: 1}
    assert [x[0] for k, _, _, x in up.script.seen if k == 5] == [1.0, 3.0]


def test_a_sequence_keeps_its_order_across_a_reload(front: ServerThread) -> None:
    """A0 is upstream (1 s) and A1 waits behind it when the model is reloaded (its config changed); A2, sent to
    the new version, still waits for A1: the order belongs to the model, not to one of its versions."""
    with ScriptedUpstream() as up:
        up.script.sequence = True
        up.script.delay_s = 1.0
        root = front.settings.model_repository
        _remote(root, "reloaded", up.url, "m")
        results: dict[str, str] = {}

        def call(key: str, value: float, start: bool = False, end: bool = False) -> None:
            x = tc.InferInput("X", [1, 2], "FP32")
            x.set_data_from_numpy(np.full((1, 2), value, np.float32))
            with tc.InferenceServerClient(front.address) as c:
                c.infer("reloaded", [x], sequence_id=8, sequence_start=start, sequence_end=end, client_timeout=30)
                results[key] = "OK"

        c = tc.InferenceServerClient(front.address)
        try:
            c.load_model("reloaded")
            threads = [threading.Thread(target=call, args=("a0", 0.0, True))]
            threads[0].start()
            wait_for("a0 upstream", lambda: up.script.in_flight.get(8) == 1)
            threads.append(threading.Thread(target=call, args=("a1", 1.0)))
            threads[1].start()
            wait_for("a1 behind a0", functools.partial(_taken_in, front, "reloaded", 2))
            config = root / "reloaded" / "config.pbtxt"
            config.write_text(
                config.read_text() + 'parameters { key: "tensorgate.triton.timeout_s" value { string_value: "30" } }\n'
            )
            c.load_model("reloaded")
            threads.append(threading.Thread(target=call, args=("a2", 2.0, False, True)))
            threads[2].start()
            for thread in threads:
                thread.join(30)
            c.unload_model("reloaded")
        finally:
            c.close()
    assert results == {"a0": "OK", "a1": "OK", "a2": "OK"}
    assert up.script.most_in_flight == {8: 1}
    assert [x[0] for k, _, _, x in up.script.seen if k == 8] == [0.0, 1.0, 2.0]


def test_a_request_whose_caller_left_while_it_ran_still_goes_first(front: ServerThread) -> None:
    """A0 is upstream (1 s) when its caller cancels; A1, sent at once, goes upstream only after A0 is over there:
    the caller left, but its request was on its way, and the upstream takes a sequence's requests in order."""
    with ScriptedUpstream() as up:
        up.script.sequence = True
        up.script.delay_s = 1.0
        _remote(front.settings.model_repository, "cancelled", up.url, "m")
        c = tc.InferenceServerClient(front.address)
        try:
            c.load_model("cancelled")
            first = tc.InferInput("X", [1, 2], "FP32")
            first.set_data_from_numpy(np.zeros((1, 2), np.float32))
            call = c.async_infer(
                "cancelled", [first], callback=lambda result, error: None, sequence_id=6, sequence_start=True
            )
            wait_for("a0 upstream", lambda: up.script.in_flight.get(6) == 1)
            call.cancel()
            second = tc.InferInput("X", [1, 2], "FP32")
            second.set_data_from_numpy(np.ones((1, 2), np.float32))
            c.infer("cancelled", [second], sequence_id=6, sequence_end=True, client_timeout=30)
            c.unload_model("cancelled")
        finally:
            c.close()
    assert up.script.most_in_flight == {6: 1}
    assert [x[0] for k, _, _, x in up.script.seen if k == 6] == [0.0, 1.0]


def test_a_remote_sequence_takes_requests_from_the_identity_that_started_it_only(
    upstream: ServerThread, tmp_path: Path
) -> None:
    """The upstream sees one caller, the front: the front keeps two mTLS identities out of each other's
    sequences, and frees an ID once the upstream has dropped the sequence (its 1 s idle time) without an END."""
    root = tmp_path / "models"
    _remote(root, "racc", upstream.address, "acc")
    pki = Pki(tmp_path / "pki")
    with ServerThread(root, **pki.server_settings()) as s:
        check_sequences_belong_to_their_starter(s, pki, "racc", sid=7007)
        alice, bob = _mtls_client(s, pki, "alice"), _mtls_client(s, pki, "bob")
        try:
            assert _total(alice, "racc", 1.0, 7008, sequence_start=True) == 1.0  # and never ended
            _error(grpc.StatusCode.PERMISSION_DENIED, bob.infer, "racc", _x(1.0), sequence_id=7008)
            started = time.monotonic()
            wait_for(
                "alice's idle sequence to be dropped upstream and here",
                lambda: _try_start(bob, 7008),
                timeout=30,
            )
            assert time.monotonic() - started >= 0.5  # not at once: it waited for the upstream's idle time
        finally:
            alice.close()
            bob.close()


def _try_start(c: tc.InferenceServerClient, sid: int) -> bool:
    try:
        return _total(c, "racc", 5.0, sid, sequence_start=True, sequence_end=True) == 5.0
    except InferenceServerException as exc:
        assert exc.status() == str(grpc.StatusCode.PERMISSION_DENIED), exc.message()
        time.sleep(0.1)
        return False
