"""Triton ensembles: a repository's `platform: "ensemble"` models serve as Triton serves them.

Each end-to-end test runs a real server on a repository of ONNX models built here and calls it with unmodified
tritonclient. Expected values are computed with numpy from the inputs, never by the code under test.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from google.protobuf import json_format, text_format
from tritonclient.utils import InferenceServerException

from tensorgate.protos import model_config_pb2 as mc
from tensorgate.server.errors import InvalidConfigError
from tensorgate.server.pipeline.ensemble import needed_steps, run_plan
from tensorgate.server.repository.config import parse_config
from tensorgate.server.repository.ensemble import Step, plan_of
from tests.onnx_models import ADD_SUB_CONFIG, add_sub_model, busy_model, identity_model, scale_model, write_config
from tests.serving import ServerThread
from tests.test_infer import triton_inputs
from tests.test_poll import wait_for

# A chain: OUT_SCALED = 2 * (A + B), DIFF = A - B. The steps are listed out of order on purpose.
PIPELINE = """
name: "pipeline"
platform: "ensemble"
max_batch_size: 8
input [ { name: "A" data_type: TYPE_FP32 dims: [ 16 ] }, { name: "B" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "OUT_SCALED" data_type: TYPE_FP32 dims: [ 16 ] },
         { name: "DIFF" data_type: TYPE_FP32 dims: [ 16 ] } ]
ensemble_scheduling {
  step [
    { model_name: "scale2" model_version: -1
      input_map { key: "INPUT0" value: "sum" } output_map { key: "OUTPUT0" value: "OUT_SCALED" } },
    { model_name: "add_sub" model_version: 1
      input_map { key: "INPUT0" value: "A" } input_map { key: "INPUT1" value: "B" }
      output_map { key: "OUTPUT0" value: "sum" } output_map { key: "OUTPUT1" value: "DIFF" } }
  ]
}
"""

# A diamond: two steps that can run at once, joined by a third; scale3 does not batch (dims [-1, 16]).
DIAMOND = """
name: "diamond"
platform: "ensemble"
max_batch_size: 8
input [ { name: "A" data_type: TYPE_FP32 dims: [ 16 ] }, { name: "B" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "JOINED" data_type: TYPE_FP32 dims: [ 16 ] }, { name: "SPREAD" data_type: TYPE_FP32 dims: [ 16 ] } ]
ensemble_scheduling {
  step [
    { model_name: "add_sub" input_map { key: "INPUT0" value: "A" } input_map { key: "INPUT1" value: "B" }
      output_map { key: "OUTPUT0" value: "s" } output_map { key: "OUTPUT1" value: "d" } },
    { model_name: "scale2" model_version: -1
      input_map { key: "INPUT0" value: "s" } output_map { key: "OUTPUT0" value: "s2" } },
    { model_name: "scale3" model_version: -1
      input_map { key: "INPUT0" value: "d" } output_map { key: "OUTPUT0" value: "d3" } },
    { model_name: "add_sub" model_version: -1
      input_map { key: "INPUT0" value: "s2" } input_map { key: "INPUT1" value: "d3" }
      output_map { key: "OUTPUT0" value: "JOINED" } output_map { key: "OUTPUT1" value: "SPREAD" } }
  ]
}
"""


def _scale_config(name: str, mbs: int = 8) -> str:
    dims = "[ 16 ]" if mbs else "[ -1, 16 ]"
    return textwrap.dedent(f"""
        name: "{name}"
        backend: "onnxruntime"
        max_batch_size: {mbs}
        input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: {dims} }} ]
        output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: {dims} }} ]
    """)


ONE_STEP = """
    name: "{name}"
    platform: "ensemble"
    max_batch_size: {mbs}
    input [ {{ name: "{x}" data_type: TYPE_FP32 dims: [ {width} ] }} ]
    output [ {{ name: "Y" data_type: TYPE_FP32 dims: [ {width} ] }} ]
    ensemble_scheduling {{ step [ {{ model_name: "{step}"
      input_map {{ key: "INPUT0" value: "{x}" }} output_map {{ key: "OUTPUT0" value: "Y" }} }} ] }}
"""
"""An ensemble of one step, `step`'s INPUT0 -> OUTPUT0, as {x} -> Y."""


def _ensemble(root: Path, name: str, text: str) -> None:
    (root / name / "1").mkdir(parents=True, exist_ok=True)  # an ensemble's version directory is empty, as in Triton
    write_config(root, name, textwrap.dedent(text).lstrip("\n"))


def ensemble_repository(root: Path, add_sub_extra: str = "") -> Path:
    add_sub_model(root / "add_sub" / "1" / "model.onnx")
    write_config(root, "add_sub", 'name: "add_sub"\n' + ADD_SUB_CONFIG + add_sub_extra)
    scale_model(root / "scale2" / "1" / "model.onnx", 2.0, width=16)
    write_config(root, "scale2", _scale_config("scale2"))
    scale_model(root / "scale3" / "1" / "model.onnx", 3.0, width=16)
    write_config(root, "scale3", _scale_config("scale3", mbs=0))
    _ensemble(root, "pipeline", PIPELINE)
    _ensemble(root, "diamond", DIAMOND)
    return root


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    with ServerThread(ensemble_repository(tmp_path_factory.mktemp("ensemble") / "models")) as s:
        yield s


@pytest.fixture
def client(served: ServerThread) -> Iterator[tc.InferenceServerClient]:
    c = tc.InferenceServerClient(served.address)
    yield c
    c.close()


def _inputs(a: np.ndarray, b: np.ndarray) -> list[tc.InferInput]:
    return triton_inputs({"A": a, "B": b})


def _rows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 16)).astype(np.float32), rng.standard_normal((n, 16)).astype(np.float32)


def _count(client: tc.InferenceServerClient, model: str) -> tuple[int, int]:
    """(successful requests, inferences) of a model's only version."""
    stats = client.get_inference_statistics(model).model_stats[0]
    return stats.inference_stats.success.count, stats.inference_count


def _executions(client: tc.InferenceServerClient, model: str) -> tuple[int, int]:
    """(executions, those of 2 rows in batch_stats) of a model's only version."""
    stats = client.get_inference_statistics(model).model_stats[0]
    return stats.execution_count, sum(b.compute_infer.count for b in stats.batch_stats if b.batch_size == 2)


def test_a_chain_and_a_diamond_answer_as_their_steps_compose(client: tc.InferenceServerClient) -> None:
    a, b = _rows(3, 0)
    result = client.infer("pipeline", _inputs(a, b))
    np.testing.assert_allclose(result.as_numpy("OUT_SCALED"), 2 * (a + b), rtol=1e-6)
    np.testing.assert_allclose(result.as_numpy("DIFF"), a - b, rtol=1e-6)
    assert result.get_response().model_name == "pipeline" and result.get_response().model_version == "1"

    joined = client.infer("diamond", _inputs(a, b))
    np.testing.assert_allclose(joined.as_numpy("JOINED"), 2 * (a + b) + 3 * (a - b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(joined.as_numpy("SPREAD"), 2 * (a + b) - 3 * (a - b), rtol=1e-5, atol=1e-6)


def test_metadata_config_and_readiness_describe_the_ensemble(client: tc.InferenceServerClient) -> None:
    meta = client.get_model_metadata("pipeline")
    assert meta.platform == "ensemble"
    assert [(t.name, list(t.shape)) for t in meta.inputs] == [("A", [-1, 16]), ("B", [-1, 16])]
    config = client.get_model_config("pipeline").config
    assert [s.model_name for s in config.ensemble_scheduling.step] == ["scale2", "add_sub"]
    assert not config.instance_group
    assert client.is_model_ready("pipeline") and client.is_server_ready()


def test_statistics_count_the_ensemble_and_each_composing_model(client: tc.InferenceServerClient) -> None:
    before = {m: _count(client, m) for m in ("pipeline", "add_sub", "scale2", "scale3")}
    executions, of_two = _executions(client, "pipeline")
    a, b = _rows(2, 1)
    client.infer("pipeline", _inputs(a, b))
    after = {m: _count(client, m) for m in before}
    assert after["pipeline"] == (before["pipeline"][0] + 1, before["pipeline"][1] + 2)
    # As Triton counts an ensemble: one execution per request, in batch_stats at the request's rows.
    assert _executions(client, "pipeline") == (executions + 1, of_two + 1)
    assert after["add_sub"] == (before["add_sub"][0] + 1, before["add_sub"][1] + 2)
    assert after["scale2"] == (before["scale2"][0] + 1, before["scale2"][1] + 2)
    assert after["scale3"] == before["scale3"]

    # Only the steps that lead to the outputs asked for run: DIFF needs add_sub alone.
    result = client.infer("pipeline", _inputs(a, b), outputs=[tc.InferRequestedOutput("DIFF")])
    np.testing.assert_allclose(result.as_numpy("DIFF"), a - b, rtol=1e-6)
    assert result.as_numpy("OUT_SCALED") is None
    assert _count(client, "scale2") == after["scale2"]
    assert _count(client, "add_sub")[0] == after["add_sub"][0] + 1


def test_a_step_that_refuses_its_input_fails_the_request_with_its_reason(tmp_path: Path) -> None:
    root = ensemble_repository(tmp_path / "models")
    # Variable dims in the ensemble pass the load (they may match at run time); 8 values do not fit add_sub's 16.
    _ensemble(root, "loose", PIPELINE.replace('"pipeline"', '"loose"').replace("dims: [ 16 ]", "dims: [ -1 ]"))
    with ServerThread(root) as s:
        c = tc.InferenceServerClient(s.address)
        try:
            with pytest.raises(InferenceServerException) as info:
                c.infer("loose", _inputs(np.zeros((1, 8), np.float32), np.zeros((1, 8), np.float32)))
            assert info.value.status() == str(grpc.StatusCode.INVALID_ARGUMENT)
            # Named as Triton names it: the ensemble first, then the step's model and its own message.
            assert info.value.message().startswith("in ensemble 'loose', model 'add_sub' version 1, tensor 'INPUT0'")
            stats = c.get_inference_statistics("loose").model_stats[0].inference_stats
            assert stats.fail.count == 1 and stats.success.count == 0
            a, b = _rows(1, 3)
            np.testing.assert_allclose(c.infer("loose", _inputs(a, b)).as_numpy("DIFF"), a - b, rtol=1e-6)
        finally:
            c.close()


def test_steps_batch_with_each_other_across_ensemble_requests(tmp_path: Path) -> None:
    """Four ensemble requests at once reach add_sub as one batch: its dynamic batcher waits (2 s at most) until
    its preferred size of 4 rows is there."""
    batcher = "dynamic_batching { max_queue_delay_microseconds: 2000000 preferred_batch_size: [ 4 ] }\n"
    root = ensemble_repository(tmp_path / "models", add_sub_extra=batcher)
    with ServerThread(root) as s:
        c = tc.InferenceServerClient(s.address)
        try:
            answers: dict[int, np.ndarray] = {}
            inputs = {i: _rows(1, 10 + i) for i in range(4)}

            def one(i: int) -> None:
                answers[i] = c.infer(
                    "pipeline", _inputs(*inputs[i]), outputs=[tc.InferRequestedOutput("DIFF")]
                ).as_numpy("DIFF")

            threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            for i, (a, b) in inputs.items():
                np.testing.assert_allclose(answers[i], a - b, rtol=1e-6)
            batches = {
                b.batch_size: b.compute_infer.count
                for b in c.get_inference_statistics("add_sub").model_stats[0].batch_stats
            }
            assert batches == {4: 1}
        finally:
            c.close()


def test_explicit_mode_loads_the_composing_models_with_the_ensemble(tmp_path: Path) -> None:
    root = ensemble_repository(tmp_path / "models")
    with ServerThread(root, model_control_mode="explicit", load_model=["pipeline"]) as s:
        c = tc.InferenceServerClient(s.address)
        try:
            assert c.is_model_ready("pipeline") and c.is_model_ready("add_sub") and c.is_model_ready("scale2")
            assert not c.is_model_ready("scale3")  # not a step of the pipeline
            c.unload_model("scale2")
            # The ensemble cannot run without its step: it is unloaded with it, the index says why, a request says
            # which model is missing, and the server stays ready (an unload on purpose is no failure).
            wait_for("the ensemble to go", lambda: _state(c, "pipeline")[0] == "UNAVAILABLE")
            assert _state(c, "pipeline")[1] == "unloaded with its step model 'scale2'"
            assert not c.is_model_ready("pipeline") and c.is_server_ready()
            with pytest.raises(InferenceServerException) as info:
                c.infer("pipeline", _inputs(*_rows(1, 4)))
            assert info.value.status() == str(grpc.StatusCode.UNAVAILABLE)
            assert "'scale2'" in info.value.message()
            c.load_model("scale2")  # the ensemble comes back with its step model
            wait_for("the ensemble to return", lambda: _state(c, "pipeline")[0] == "READY")
            c.unload_model("scale2")
            wait_for("the ensemble to go", lambda: _state(c, "pipeline")[0] == "UNAVAILABLE")
            c.load_model("pipeline")  # loads scale2 again, as Triton does
            assert c.is_model_ready("scale2") and c.is_model_ready("pipeline")
            a, b = _rows(1, 5)
            np.testing.assert_allclose(
                c.infer("pipeline", _inputs(a, b)).as_numpy("OUT_SCALED"), 2 * (a + b), rtol=1e-6
            )
        finally:
            c.close()


# ----- configs that cannot serve fail their load, with the reason, and leave the rest serving ----------------

_STEP = (
    '{ model_name: "scale2" model_version: -1 input_map { key: "INPUT0" value: "X" } '
    'output_map { key: "OUTPUT0" value: "Y" } }'
)


def _single(step: str = _STEP, *, x: str = "TYPE_FP32 dims: [ 16 ]", mbs: int = 8, extra: str = "") -> str:
    return f"""
        name: "bad"
        platform: "ensemble"
        max_batch_size: {mbs}
        input [ {{ name: "X" data_type: {x} }} ]
        output [ {{ name: "Y" data_type: TYPE_FP32 dims: [ 16 ] }} ]
        ensemble_scheduling {{ step [ {step} ] }}
        {extra}
    """


BAD = {
    "unknown-model": (_single(_STEP.replace("scale2", "nope")), "step 0 (model 'nope') cannot be served"),
    "no-such-input": (_single(_STEP.replace('key: "INPUT0"', 'key: "IN"')), "which is no input of it"),
    "no-such-output": (_single(_STEP.replace('key: "OUTPUT0"', 'key: "OUT"')), "which the model does not have"),
    "datatype": (_single(x="TYPE_INT32 dims: [ 16 ]"), "'X' is TYPE_INT32 in the ensemble but TYPE_FP32"),
    "dims": (_single(x="TYPE_FP32 dims: [ 8 ]"), "'X' has shape [-1, 8] in the ensemble but [-1, 16]"),
    "max-batch-size": (_single(mbs=16), "the ensemble's max_batch_size is 16 but the model's is 8"),
    "instance-group": (_single(extra="instance_group [ { count: 2 } ]"), "no instance_group of its own"),
    "output-not-written": (
        _single(_STEP.replace('value: "Y"', 'value: "Z"')),
        "ensemble output 'Y' is not written by any step",
    ),
    "step-cycle": (
        _single(
            _STEP.replace('value: "X"', 'value: "W"')
            + ", "
            + _STEP.replace('value: "X"', 'value: "Y"').replace('value: "Y" }', 'value: "W" }')
        ),
        "which no input or earlier step provides (or that form a cycle)",
    ),
    "written-twice": (_single(_STEP + ", " + _STEP), "ensemble tensor 'Y' is written by step 0 and step 1"),
    "no-steps": (_single("").replace("ensemble_scheduling { step [  ] }", "ensemble_scheduling { }"), "has no step"),
    "not-an-ensemble": (
        _single().replace('platform: "ensemble"', 'backend: "onnxruntime"'),
        'ensemble_scheduling needs platform "ensemble"',
    ),
}


def test_ensembles_that_cannot_serve_fail_their_load_and_nothing_else(tmp_path: Path) -> None:
    root = ensemble_repository(tmp_path / "models")
    names = []
    for case, (text, _) in BAD.items():
        name = f"bad_{case.replace('-', '_')}"
        _ensemble(root, name, textwrap.dedent(text).replace('name: "bad"', f'name: "{name}"'))
        names.append(name)
    # Two ensembles that include each other would wait for each other's load.
    loop = (
        '{ model_name: "%s" input_map { key: "A" value: "A" } input_map { key: "B" value: "B" } '
        'output_map { key: "DIFF" value: "DIFF" } }'
    )
    for me, other in (("loop_a", "loop_b"), ("loop_b", "loop_a")):
        _ensemble(
            root,
            me,
            f"""
            name: "{me}"
            platform: "ensemble"
            max_batch_size: 8
            input [ {{ name: "A" data_type: TYPE_FP32 dims: [ 16 ] }},
                    {{ name: "B" data_type: TYPE_FP32 dims: [ 16 ] }} ]
            output [ {{ name: "DIFF" data_type: TYPE_FP32 dims: [ 16 ] }} ]
            ensemble_scheduling {{ step [ {loop % other} ] }}
            """,
        )
    with ServerThread(root) as s:
        c = tc.InferenceServerClient(s.address)
        try:
            rows = {m.name: m for m in c.get_model_repository_index().models}
            for name, (case, (_, fragment)) in zip(names, BAD.items(), strict=True):
                assert rows[name].state == "UNAVAILABLE", case
                assert fragment in rows[name].reason, (case, rows[name].reason)
            for name in ("loop_a", "loop_b"):
                assert rows[name].state == "UNAVAILABLE"
                assert "ensemble steps form a cycle" in rows[name].reason, rows[name].reason
            a, b = _rows(1, 6)
            np.testing.assert_allclose(c.infer("pipeline", _inputs(a, b)).as_numpy("DIFF"), a - b, rtol=1e-6)
        finally:
            c.close()


# ----- the plan and its runner, without a server ---------------------------------------------------------------


def _plan(text: str) -> mc.ModelConfig:
    return parse_config("e", textwrap.dedent(text))[0]


def test_needed_steps_follow_the_outputs_back() -> None:
    plan = plan_of(_plan(DIAMOND.replace('"diamond"', '"e"')))
    assert [s.index for s in needed_steps(plan, ["JOINED"])] == [0, 1, 2, 3]
    chain = plan_of(_plan(PIPELINE.replace('"pipeline"', '"e"')))
    assert [s.model for s in needed_steps(chain, ["DIFF"])] == ["add_sub"]
    assert [s.model for s in needed_steps(chain, ["OUT_SCALED"])] == ["scale2", "add_sub"]


def test_independent_steps_run_at_once_and_a_failure_cancels_the_rest() -> None:
    plan = plan_of(_plan(DIAMOND.replace('"diamond"', '"e"')))
    both_running = asyncio.Event()
    running: set[int] = set()
    cancelled: list[int] = []

    async def step(s: Step, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        running.add(s.index)
        if {1, 2} <= running:
            both_running.set()
        if s.index in (1, 2):
            await asyncio.wait_for(both_running.wait(), 5)  # only returns if the other one runs too
        total = sum((v for v in feed.values()), np.zeros(1))
        return {t: total + s.index for t in s.outputs.values()}

    out = asyncio.run(run_plan(plan, {"A": np.ones(1), "B": np.ones(1)}, ["JOINED"], step))
    assert out["JOINED"].tolist() == [(2 + 1) + (2 + 2) + 3]

    async def failing(s: Step, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if s.index == 2:
            raise InvalidConfigError("e", "step 2 broke")
        if s.index == 1:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append(1)
                raise
        return {t: np.zeros(1) for t in s.outputs.values()}

    with pytest.raises(InvalidConfigError, match="step 2 broke"):
        asyncio.run(asyncio.wait_for(run_plan(plan, {"A": np.ones(1), "B": np.ones(1)}, ["JOINED"], failing), 10))
    assert cancelled == [1]


def test_a_plan_is_refused_when_an_input_is_unused() -> None:
    text = PIPELINE.replace('"pipeline"', '"e"').replace(
        'input [ { name: "A"', 'input [ { name: "C" data_type: TYPE_FP32 dims: [ 1 ] }, { name: "A"'
    )
    with pytest.raises(InvalidConfigError, match="ensemble input 'C' is not used by any step"):
        plan_of(_plan(text))


def test_an_ensemble_output_classifies_with_the_labels_of_the_step_that_writes_it(tmp_path: Path) -> None:
    root = ensemble_repository(tmp_path / "models")
    config = _scale_config("scale2").replace(
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]',
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] label_filename: "labels.txt" } ]',
    )
    assert "labels.txt" in config
    write_config(root, "scale2", config)
    (root / "scale2" / "labels.txt").write_text("".join(f"class{i}\n" for i in range(16)))
    with ServerThread(root) as s:
        c = tc.InferenceServerClient(s.address)
        try:
            a = np.zeros((1, 16), np.float32)
            a[0, 7] = 1.0
            result = c.infer(
                "pipeline", _inputs(a, np.zeros_like(a)), outputs=[tc.InferRequestedOutput("OUT_SCALED", class_count=1)]
            )
            assert result.as_numpy("OUT_SCALED").tolist() == [[b"2.000000:7:class7"]]
        finally:
            c.close()


# ----- composing models that change under a served ensemble ---------------------------------------------------


def _state(client: tc.InferenceServerClient, model: str) -> tuple[str, str]:
    rows = [(m.state, m.reason) for m in client.get_model_repository_index().models if m.name == model]
    return rows[0] if rows else ("", "")


def test_an_ensemble_follows_its_step_models_as_they_load_and_change(tmp_path: Path) -> None:
    """Triton reloads the ensembles that use a model when that model loads again. Here: an ensemble that failed
    because its step's model was broken serves once the model is fixed, and one whose step's model changes so that
    it no longer fits stops serving with the reason (rather than stay READY and answer every request with an
    error that blames the caller's shapes)."""
    root = ensemble_repository(tmp_path / "models")
    write_config(root, "scale2", _scale_config("scale2").replace("TYPE_FP32", "TYPE_FP64"))
    with ServerThread(root, model_control_mode="poll", repository_poll_secs=0.2) as s:
        c = tc.InferenceServerClient(s.address)
        try:
            assert _state(c, "scale2")[0] == "UNAVAILABLE" and _state(c, "pipeline")[0] == "UNAVAILABLE"
            assert not c.is_server_ready()
            write_config(root, "scale2", _scale_config("scale2"))
            wait_for("the ensemble to load", lambda: _state(c, "pipeline")[0] == "READY")
            a, b = _rows(1, 7)
            np.testing.assert_allclose(
                c.infer("pipeline", _inputs(a, b)).as_numpy("OUT_SCALED"), 2 * (a + b), rtol=1e-6
            )
            assert c.is_server_ready()

            scale_model(tmp_path / "narrow" / "model.onnx", 2.0, width=8)
            (root / "scale2" / "2").mkdir()
            (tmp_path / "narrow" / "model.onnx").rename(root / "scale2" / "2" / "model.onnx")
            write_config(root, "scale2", _scale_config("scale2").replace("[ 16 ]", "[ 8 ]"))
            wait_for("the ensemble to stop", lambda: _state(c, "pipeline")[0] == "UNAVAILABLE")
            reason = _state(c, "pipeline")[1]
            assert "a step's model changed" in reason and "[-1, 8] in model 'scale2'" in reason, reason
            with pytest.raises(InferenceServerException) as info:
                c.infer("pipeline", _inputs(a, b))
            assert info.value.status() == str(grpc.StatusCode.UNAVAILABLE)
        finally:
            c.close()


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_an_ensemble_request_keeps_its_step_models_until_it_ends(tmp_path: Path, nested: bool) -> None:
    """Unloading a step's model while a request runs an earlier step must not fail the request (Triton holds the
    models of an ensemble request for its lifetime); the ensemble is not ready afterwards. Nested: the second step
    is an ensemble over `scale`, whose model the request holds from its start too (it was looked up when the inner
    ensemble's step began, and the request failed UNAVAILABLE)."""
    root = tmp_path / "models"
    busy_model(root / "busy" / "1" / "model.onnx", iterations=200_000)
    write_config(root, "busy", 'name: "busy"\nmax_batch_size: 4\n')
    scale_model(root / "scale" / "1" / "model.onnx", 3.0)
    write_config(root, "scale", 'name: "scale"\nmax_batch_size: 4\n')
    _ensemble(
        root,
        "slow",
        """
        name: "slow"
        platform: "ensemble"
        max_batch_size: 4
        input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]
        output [ { name: "Y" data_type: TYPE_FP32 dims: [ 4 ] } ]
        ensemble_scheduling { step [
          { model_name: "busy" input_map { key: "INPUT0" value: "X" } output_map { key: "OUTPUT0" value: "t" } },
          { model_name: "scale" input_map { key: "INPUT0" value: "t" } output_map { key: "OUTPUT0" value: "Y" } } ] }
        """.replace(
            '"scale" input_map { key: "INPUT0" value: "t" } output_map { key: "OUTPUT0"',
            '"inner" input_map { key: "I" value: "t" } output_map { key: "Y"'
            if nested
            else '"scale" input_map { key: "INPUT0" value: "t" } output_map { key: "OUTPUT0"',
        ),
    )
    _ensemble(root, "inner", ONE_STEP.format(name="inner", mbs=4, x="I", width=4, step="scale"))
    with ServerThread(root, model_control_mode="explicit", load_model=["slow"]) as s:
        c = tc.InferenceServerClient(s.address)
        try:
            x = np.ones((1, 4), np.float32)
            inp = tc.InferInput("X", [1, 4], "FP32")
            inp.set_data_from_numpy(x)
            answers: list[object] = []
            done = threading.Event()

            def answered(result: object, error: object) -> None:
                answers.append(error or result)
                done.set()

            c.async_infer("slow", [inp], callback=answered)
            wait_for("the first step to run", lambda: s.app.repository.get("busy", "").scheduler._running > 0)  # noqa: SLF001
            c.unload_model("scale")
            assert done.wait(30)
            assert isinstance(answers[0], tc.InferResult), answers[0]
            np.testing.assert_array_equal(answers[0].as_numpy("Y"), 6 * x)
            wait_for("scale to be gone", lambda: not c.is_model_ready("scale"))
            assert not c.is_model_ready("slow")
        finally:
            c.close()


def _add_sub_ensemble(name: str, step_model: str, version: int = -1) -> str:
    return f"""
        name: "{name}"
        platform: "ensemble"
        max_batch_size: 8
        input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] }},
                {{ name: "INPUT1" data_type: TYPE_FP32 dims: [ 16 ] }} ]
        output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] }} ]
        ensemble_scheduling {{ step [ {{ model_name: "{step_model}" model_version: {version}
          input_map {{ key: "INPUT0" value: "INPUT0" }} input_map {{ key: "INPUT1" value: "INPUT1" }}
          output_map {{ key: "OUTPUT0" value: "OUTPUT0" }} }} ] }}
    """


def test_configs_given_at_load_cannot_make_a_cycle(tmp_path: Path) -> None:
    """The cycle check looked at other ensembles on disk only: configs given with RepositoryModelLoad could make
    two ensembles name each other (a recursion on every readiness check), or, loaded at once, wait for each
    other's load for ever."""
    root = ensemble_repository(tmp_path / "models")
    for name in ("e1", "e2", "e3", "e4"):
        _ensemble(root, name, _add_sub_ensemble(name, "add_sub"))
    with ServerThread(root, model_control_mode="explicit", load_model=["e1", "e2", "e3", "e4"]) as s:
        c = tc.InferenceServerClient(s.address)
        try:
            c.load_model("e1", config=json.dumps(_json(_add_sub_ensemble("e1", "e2"))))
            with pytest.raises(InferenceServerException, match="ensemble steps form a cycle: e2 -> e1 -> e2"):
                c.load_model("e2", config=json.dumps(_json(_add_sub_ensemble("e2", "e1"))))
            a, b = _rows(1, 8)
            ins = triton_inputs({"INPUT0": a, "INPUT1": b})
            np.testing.assert_allclose(c.infer("e1", ins).as_numpy("OUTPUT0"), a + b, rtol=1e-6)
            assert c.is_server_ready()

            errors: list[str] = []

            def load(name: str, other: str) -> None:
                client = tc.InferenceServerClient(s.address)
                try:
                    client.load_model(name, config=json.dumps(_json(_add_sub_ensemble(name, other))), client_timeout=30)
                except InferenceServerException as exc:
                    errors.append(str(exc.message()))
                finally:
                    client.close()

            threads = [threading.Thread(target=load, args=p) for p in (("e3", "e4"), ("e4", "e3"))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(40)
            assert not any(t.is_alive() for t in threads)
            assert len(errors) == 1 and "ensemble steps form a cycle" in errors[0], errors
            assert c.is_model_ready("e3") and c.is_model_ready("e4")
        finally:
            c.close()


def _json(text: str) -> dict[str, object]:
    config = mc.ModelConfig()
    text_format.Parse(textwrap.dedent(text), config)
    return json.loads(json_format.MessageToJson(config))


def test_a_step_without_model_version_is_served_as_the_latest(client: tc.InferenceServerClient) -> None:
    """perf_analyzer reads the steps from ModelConfig and asks for version "0" when model_version is left out."""
    steps = client.get_model_config("diamond").config.ensemble_scheduling.step
    assert [s.model_version for s in steps] == [-1, -1, -1, -1]


def test_an_ensemble_loaded_with_a_config_comes_back_with_it(tmp_path: Path) -> None:
    """An ensemble loaded with a config override, unloaded with its step model, comes back with that config when
    the step returns, not with the repository's (it came back as the disk's, max_batch_size 8 here)."""
    root = ensemble_repository(tmp_path / "models")
    config = _json(PIPELINE.replace("max_batch_size: 8", "max_batch_size: 4"))
    with ServerThread(root, model_control_mode="explicit", load_model=["pipeline"]) as s:
        c = tc.InferenceServerClient(s.address)
        try:
            c.load_model("pipeline", config=json.dumps(config))
            assert c.get_model_config("pipeline").config.max_batch_size == 4
            c.unload_model("scale2")
            wait_for("the ensemble to go", lambda: _state(c, "pipeline")[0] == "UNAVAILABLE")
            c.load_model("scale2")
            wait_for("the ensemble to come back", lambda: _state(c, "pipeline")[0] == "READY")
            assert c.get_model_config("pipeline").config.max_batch_size == 4
        finally:
            c.close()


def test_an_ensemble_sent_with_its_files_keeps_them(tmp_path: Path) -> None:
    """An ensemble loaded from files sent with RepositoryModelLoad reads its label file from them, and when it is
    unloaded with its step model it is not replaced by the repository's own `pipeline` when the step returns."""
    root = ensemble_repository(tmp_path / "models")
    config = _json(
        PIPELINE.replace(
            'dims: [ 16 ] },\n         { name: "DIFF"',
            'dims: [ 16 ] label_filename: "l.txt" },\n         { name: "DIFF"',
        )
    )
    assert config["output"][0]["labelFilename"] == "l.txt"  # type: ignore[index]
    labels = "".join(f"up{i}\n" for i in range(16)).encode()
    with ServerThread(root, model_control_mode="explicit", load_model=["pipeline"]) as s:
        c = tc.InferenceServerClient(s.address)
        try:
            c.load_model("pipeline", config=json.dumps(config), files={"file:1/.keep": b"", "file:l.txt": labels})
            a = np.zeros((1, 16), np.float32)
            a[0, 3] = 1.0
            top = c.infer(
                "pipeline", _inputs(a, np.zeros_like(a)), outputs=[tc.InferRequestedOutput("OUT_SCALED", class_count=1)]
            )
            assert top.as_numpy("OUT_SCALED").tolist() == [[b"2.000000:3:up3"]]
            c.unload_model("scale2")
            wait_for("the ensemble to go", lambda: _state(c, "pipeline")[0] == "UNAVAILABLE")
            c.load_model("scale2")
            time.sleep(1)  # a reload from the repository, were it to happen, would be done by now
            assert _state(c, "pipeline") == ("UNAVAILABLE", "unloaded with its step model 'scale2'")
        finally:
            c.close()


def test_tensors_pass_between_models_that_batch_and_models_that_do_not(tmp_path: Path) -> None:
    """As Triton's ensembles do (ReshapeTensorDims): an ensemble that does not batch sends its [16] tensor to a
    batching step as [1, 16] and answers [16]; one that batches sends a 1-row [1, 16] tensor to a step that does
    not batch (dims [16]) as [16] and answers [1, 16]. Both loaded and then failed every request."""
    root = ensemble_repository(tmp_path / "models")
    identity_model(root / "ident" / "1" / "model.onnx", "FP32", shape=(16,))
    write_config(
        root,
        "ident",
        'name: "ident"\nmax_batch_size: 0\ninput [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]\n',
    )
    _ensemble(root, "unbatched", ONE_STEP.format(name="unbatched", mbs=0, x="X", width=16, step="scale2"))
    _ensemble(root, "batched", ONE_STEP.format(name="batched", mbs=8, x="X", width=16, step="ident"))
    x = np.arange(16, dtype=np.float32)
    with ServerThread(root) as s:
        c = tc.InferenceServerClient(s.address)
        try:
            np.testing.assert_array_equal(c.infer("unbatched", triton_inputs({"X": x})).as_numpy("Y"), 2 * x)
            one = c.infer("batched", triton_inputs({"X": x[np.newaxis]})).as_numpy("Y")
            np.testing.assert_array_equal(one, x[np.newaxis])
            # Two rows cannot go to a model that takes [16]: refused, naming the ensemble, the step and the shape.
            with pytest.raises(InferenceServerException) as info:
                c.infer("batched", triton_inputs({"X": np.stack([x, x])}))
            assert info.value.message().startswith(
                "in ensemble 'batched', model 'ident' version 1, tensor 'INPUT0': shape [2, 16] does not match"
            )
        finally:
            c.close()
