"""Ensembles, the response cache and classification against Triton's semantics, end to end: a real server,
unmodified tritonclient, models built with onnx.helper; every expected tensor is computed with onnxruntime in
this process, step by step, not with the code under test."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc

from tests.onnx_models import add_sub_model, identity_model, scale_model, write_config
from tests.scraping import metrics_url, scrape, value
from tests.serving import ServerThread
from tests.test_infer import triton_inputs

CACHE = "response_cache { enable: true }\n"


def _model(name: str, mbs: int = 8, extra: str = "") -> str:
    return f'name: "{name}" backend: "onnxruntime" max_batch_size: {mbs}\n{extra}'


def _ensemble(root: Path, name: str, io: str, steps: str, extra: str = "") -> None:
    write_config(root, name, f'name: "{name}" platform: "ensemble" max_batch_size: 8\n{io}\n{steps}\n{extra}')
    (root / name / "1").mkdir(parents=True, exist_ok=True)


def _step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> str:
    ins = " ".join(f'input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items())
    outs = " ".join(f'output_map {{ key: "{k}" value: "{v}" }}' for k, v in outputs.items())
    return f'{{ model_name: "{model}" model_version: -1 {ins} {outs} }}'


def _steps(*steps: str) -> str:
    return "ensemble_scheduling { step [ " + ", ".join(steps) + " ] }"


def _repository(root: Path) -> Path:
    """`diamond` (cached): `double` (x2), whose output feeds `triple` (x3) and `halve` (x0.5), which meet in
    `add_sub`; `inner` (cached) runs `double`, and `outer` runs `inner` then `triple`. `text`: a cached BYTES
    identity model."""
    for name, factor in (("double", 2.0), ("triple", 3.0), ("halve", 0.5)):
        scale_model(root / name / "1" / "model.onnx", factor)
        write_config(root, name, _model(name))
    add_sub_model(root / "add_sub" / "1" / "model.onnx", shape=("batch", 4))
    write_config(root, "add_sub", _model("add_sub"))
    (root / "diamond").mkdir(parents=True)
    (root / "diamond" / "labels.txt").write_text("zero\none\n")  # shorter than the 4 classes
    four = "data_type: TYPE_FP32 dims: [ 4 ]"
    _ensemble(
        root,
        "diamond",
        f'input [ {{ name: "X" {four} }} ] output [ {{ name: "SUM" {four} label_filename: "labels.txt" }}, '
        f'{{ name: "DIFF" {four} }}, {{ name: "D" {four} }} ]',
        _steps(
            _step("double", {"INPUT0": "X"}, {"OUTPUT0": "D"}),
            _step("triple", {"INPUT0": "D"}, {"OUTPUT0": "T"}),
            _step("halve", {"INPUT0": "D"}, {"OUTPUT0": "H"}),
            _step("add_sub", {"INPUT0": "T", "INPUT1": "H"}, {"OUTPUT0": "SUM", "OUTPUT1": "DIFF"}),
        ),
        CACHE,
    )
    io = f'input [ {{ name: "X" {four} }} ] output [ {{ name: "Y" {four} }} ]'
    _ensemble(root, "inner", io, _steps(_step("double", {"INPUT0": "X"}, {"OUTPUT0": "Y"})), CACHE)
    _ensemble(
        root,
        "outer",
        io,
        _steps(_step("inner", {"X": "X"}, {"Y": "I"}), _step("triple", {"INPUT0": "I"}, {"OUTPUT0": "Y"})),
    )
    identity_model(root / "text" / "1" / "model.onnx", "BYTES", ("batch", 2))
    write_config(root, "text", _model("text", extra=CACHE))
    return root


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    root = _repository(tmp_path_factory.mktemp("pipeline_review") / "models")
    with ServerThread(root, response_cache_bytes=1 << 20) as s:
        yield s


@pytest.fixture
def client(served: ServerThread) -> Iterator[tc.InferenceServerClient]:
    c = tc.InferenceServerClient(served.address)
    yield c
    c.close()


def _run(served: ServerThread, model: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The model's ONNX file run in this process, as the server should run it."""
    path = served.settings.model_repository / model / "1" / "model.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [np.asarray(a) for a in session.run(None, feeds)]


def _stats(client: tc.InferenceServerClient, model: str) -> tuple[int, int, int]:
    """(cache hits, cache misses, executions) of a model's only version."""
    s = client.get_inference_statistics(model).model_stats[0]
    return s.inference_stats.cache_hit.count, s.inference_stats.cache_miss.count, s.execution_count


def _x(seed: int, rows: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 4)).astype(np.float32)


def test_a_nested_ensemble_step_answers_from_the_inner_ensemble_s_cache(
    served: ServerThread, client: tc.InferenceServerClient
) -> None:
    """The README: "a step uses its model's response cache, as a request sent to that model directly would" (and
    Triton's ensemble scheduler sends a composing ensemble its request as any other). A step that is itself an
    ensemble ran its steps every time, never looking at that ensemble's cache."""
    x = _x(1)
    (y,) = _run(served, "double", {"INPUT0": x})
    (expected,) = _run(served, "triple", {"INPUT0": y})
    np.testing.assert_array_equal(client.infer("inner", triton_inputs({"X": x})).as_numpy("Y"), y)
    assert _stats(client, "inner")[:2] == (0, 1)
    runs = _stats(client, "double")[2]

    result = client.infer("outer", triton_inputs({"X": x}))
    np.testing.assert_array_equal(result.as_numpy("Y"), expected)
    assert result.as_numpy("Y").shape == (3, 4)
    assert _stats(client, "inner")[:2] == (1, 1)  # the step found the answer `inner` gave before
    assert _stats(client, "double")[2] == runs  # and `double` did not run again

    # Other inputs miss, and that answer then serves a request sent to `inner` itself.
    x2 = _x(2)
    (y2,) = _run(served, "double", {"INPUT0": x2})
    np.testing.assert_array_equal(client.infer("outer", triton_inputs({"X": x2})).as_numpy("Y"), 3 * y2)
    np.testing.assert_array_equal(client.infer("inner", triton_inputs({"X": x2})).as_numpy("Y"), y2)
    assert _stats(client, "inner")[:2] == (2, 2)
    assert _stats(client, "double")[2] == runs + 1


def test_an_ensemble_answers_as_its_steps_compose_with_subsets_classes_and_cache(
    served: ServerThread, client: tc.InferenceServerClient
) -> None:
    """A fan-out from one step to two and a fan-in, compared with each step run here; a requested subset; the
    classes of an ensemble output in Triton's "value:index[:label]" form, with a label file shorter than the
    classes; a repeat answered from the cache with the same tensors."""
    x = _x(3)
    (d,) = _run(served, "double", {"INPUT0": x})
    (t,) = _run(served, "triple", {"INPUT0": d})
    (h,) = _run(served, "halve", {"INPUT0": d})
    total, diff = _run(served, "add_sub", {"INPUT0": t, "INPUT1": h})
    for _ in range(2):  # the second from the cache
        result = client.infer("diamond", triton_inputs({"X": x}))
        for name, want in (("SUM", total), ("DIFF", diff), ("D", d)):
            np.testing.assert_array_equal(result.as_numpy(name), want)
    assert _stats(client, "diamond")[:2] == (1, 1)

    only = client.infer("diamond", triton_inputs({"X": x}), outputs=[tc.InferRequestedOutput("DIFF")])
    assert [o.name for o in only.get_response().outputs] == ["DIFF"]
    np.testing.assert_array_equal(only.as_numpy("DIFF"), diff)

    top = client.infer(
        "diamond", triton_inputs({"X": x}), outputs=[tc.InferRequestedOutput("SUM", class_count=9)]
    ).as_numpy("SUM")
    assert top.shape == (3, 4)  # capped at the 4 classes, one row of classes per batch row
    labels = ["zero", "one"]
    for row, scores in zip(top.tolist(), total.tolist(), strict=True):
        order = sorted(range(4), key=lambda i: -scores[i])
        classes = [
            f"{scores[i]:f}:{i}" + (f":{labels[i]}" if i < len(labels) else "")  # C's %f, as Triton's to_string
            for i in order
        ]
        assert [v.decode() for v in row] == classes


def test_text_inputs_that_join_to_the_same_bytes_do_not_share_an_entry(client: tc.InferenceServerClient) -> None:
    hits = _stats(client, "text")[0]
    for elements in ([b"ab", b"c"], [b"a", b"bc"], [b"abc", b""]):
        array = np.array([elements], dtype=object)
        np.testing.assert_array_equal(client.infer("text", triton_inputs({"INPUT0": array})).as_numpy("OUTPUT0"), array)
    assert _stats(client, "text")[0] == hits


def test_a_nested_ensemble_caches_its_answer_under_the_step_models_that_computed_it(tmp_path: Path) -> None:
    """An outer request holds the step models it found when it started. Its nested ensemble's cache key looked
    them up afresh: a step model reloaded meanwhile gave the key its new files while the answer came from the
    old ones, and the cache then served that old answer to requests for the new model (review 119)."""
    root = tmp_path / "models"
    scale_model(root / "slow" / "1" / "model.onnx", 1.0)
    # The outer request waits in slow's queue until a second request makes the preferred batch of 2.
    batching = "dynamic_batching { preferred_batch_size: [ 2 ] max_queue_delay_microseconds: 30000000 }"
    write_config(root, "slow", _model("slow", extra=batching))
    scale_model(root / "double" / "1" / "model.onnx", 2.0)
    write_config(root, "double", _model("double"))
    four = "data_type: TYPE_FP32 dims: [ 4 ]"
    io = f'input [ {{ name: "X" {four} }} ] output [ {{ name: "Y" {four} }} ]'
    _ensemble(root, "inner", io, _steps(_step("double", {"INPUT0": "X"}, {"OUTPUT0": "Y"})), CACHE)
    _ensemble(
        root,
        "outer",
        io,
        _steps(_step("slow", {"INPUT0": "X"}, {"OUTPUT0": "S"}), _step("inner", {"X": "S"}, {"Y": "Y"})),
    )
    x = np.ones((1, 4), np.float32)
    with (
        ServerThread(root, response_cache_bytes=1 << 20, model_control_mode="explicit", load_model=["*"]) as s,
        tc.InferenceServerClient(s.address) as client,
        ThreadPoolExecutor(1) as pool,
    ):
        outer = pool.submit(lambda: client.infer("outer", triton_inputs({"X": x})).as_numpy("Y"))
        deadline = time.monotonic() + 30
        while value(scrape(metrics_url(s)), "tensorgate_queue_depth", model="slow", version="1") < 1:
            assert time.monotonic() < deadline and not outer.done(), "the outer request never queued at slow"
            time.sleep(0.02)
        scale_model(root / "double" / "1" / "model.onnx", 5.0)
        client.load_model("double")  # new files: x5; the outer request still holds the x2 model
        client.infer("slow", triton_inputs({"INPUT0": x}))  # makes slow's batch of 2: the outer request goes on
        np.testing.assert_array_equal(outer.result(timeout=30), 2 * x)  # computed by the models it held
        np.testing.assert_array_equal(client.infer("inner", triton_inputs({"X": x})).as_numpy("Y"), 5 * x)
