"""The ONNX Runtime backend: provider choice, the CPU fallback, session options, strings and runtime failures.

`choose_providers` is pure and tested as such. Everything else runs real ONNX Runtime sessions on models built
here; the fallback is the real one of this CPU-only onnxruntime build, told (through the `available_providers`
constructor parameter) that CUDA is there, as an onnxruntime-gpu wheel on a machine without a usable GPU would.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as triton_mc
from tritonclient.utils import InferenceServerException

from tensorgate.protos import model_config_pb2 as mc
from tensorgate.server.backends.onnx import (
    CPU,
    CUDA,
    OnnxBackend,
    choose_providers,
    cuda_options,
    default_intra_op_threads,
    pad_feed,
    padding_hint,
    session_options,
)
from tensorgate.server.errors import ModelLoadError
from tensorgate.server.repository.manager import ModelRepository
from tests.onnx_models import broadcast_add_model, identity_model, rows_seen_model, scale_model, write_config
from tests.serving import ServerThread

KIND = mc.ModelInstanceGroup
BACKEND_LOGGER = "tensorgate.server.backends.onnx"

# ----- choose_providers (pure) ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "gpus", "available", "providers", "wants_gpu"),
    [
        pytest.param(KIND.KIND_CPU, [], [CUDA, CPU], [CPU], False, id="cpu-ignores-cuda"),
        pytest.param(KIND.KIND_AUTO, [], [CUDA, CPU], [(CUDA, {"device_id": "0"}), CPU], True, id="auto-with-cuda"),
        pytest.param(KIND.KIND_AUTO, [], [CPU], [CPU], False, id="auto-without-cuda"),
        pytest.param(KIND.KIND_GPU, [], [CUDA, CPU], [(CUDA, {"device_id": "0"}), CPU], True, id="gpu-default-0"),
        pytest.param(KIND.KIND_GPU, [2, 3], [CUDA, CPU], [(CUDA, {"device_id": "2"}), CPU], True, id="gpu-from-gpus"),
        pytest.param(KIND.KIND_MODEL, [], [CUDA, CPU], [CPU], False, id="model-kind-on-cpu"),
    ],
)
def test_choose_providers(
    kind: int, gpus: list[int], available: list[str], providers: list[object], wants_gpu: bool
) -> None:
    choice = choose_providers(kind, gpus, available, model="m")
    assert choice.providers == providers
    assert choice.wants_gpu is wants_gpu
    assert choice.warning is None


def test_choose_providers_gpu_without_cuda_warns() -> None:
    choice = choose_providers(KIND.KIND_GPU, [0], [CPU, "AzureExecutionProvider"], model="digits")
    assert choice.providers == [CPU]
    assert not choice.wants_gpu
    assert choice.warning is not None
    assert "'digits'" in choice.warning
    assert CUDA in choice.warning
    assert "KIND_GPU" in choice.warning


# ----- the real CPU fallback --------------------------------------------------------------------------------------


def _gpu_config(name: str) -> mc.ModelConfig:
    config = mc.ModelConfig(name=name)
    config.instance_group.add(kind=KIND.KIND_GPU, count=1, gpus=[0])
    return config


@pytest.mark.parametrize(
    "available",
    [
        pytest.param([CUDA, CPU], id="cuda-listed-but-not-enabled"),
        pytest.param([CPU], id="cuda-not-listed"),
    ],
)
def test_gpu_request_falls_back_to_cpu_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, available: list[str]
) -> None:
    path = scale_model(tmp_path / "scaler" / "1" / "model.onnx", 3.0)
    caplog.set_level(logging.WARNING, logger=BACKEND_LOGGER)
    backend = OnnxBackend(path, _gpu_config("scaler"), version=1, available_providers=available)
    try:
        assert backend.execution_provider == CPU
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        message = warnings[0].getMessage()
        assert "'scaler'" in message
        assert CUDA in message
        assert "CPU" in message
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        np.testing.assert_array_equal(backend.execute({"INPUT0": x}, ["OUTPUT0"])["OUTPUT0"], x * 3.0)
    finally:
        backend.close()


async def test_repository_reports_where_a_gpu_model_really_runs(tmp_path: Path) -> None:
    root = tmp_path / "models"
    scale_model(root / "scaler" / "1" / "model.onnx", 2.0)
    write_config(root, "scaler", "instance_group [ { kind: KIND_GPU count: 2 gpus: [ 0 ] } ]\n")
    repository = ModelRepository(root, available_providers=[CUDA, CPU])
    try:
        await repository.load("scaler")
        model = repository.get("scaler", "")
        assert [(g.kind, g.count) for g in model.config.instance_group] == [(KIND.KIND_CPU, 2)]
        assert model.config.parameters["tensorgate.execution_provider"].string_value == CPU
        assert model.backend.execution_provider == CPU
    finally:
        await repository.close()


def test_server_reports_cpu_for_a_gpu_config(tmp_path: Path) -> None:
    root = tmp_path / "models"
    scale_model(root / "scaler" / "1" / "model.onnx", 2.0)
    write_config(root, "scaler", 'name: "scaler"\ninstance_group [ { kind: KIND_GPU gpus: [ 0 ] } ]\n')
    with ServerThread(root) as s:
        client = grpcclient.InferenceServerClient(s.address)
        try:
            config = client.get_model_config("scaler").config
            assert config.instance_group[0].kind == triton_mc.ModelInstanceGroup.KIND_CPU
            assert config.parameters["tensorgate.execution_provider"].string_value == CPU
            inp = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
            inp.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
            np.testing.assert_array_equal(client.infer("scaler", [inp]).as_numpy("OUTPUT0"), np.full((1, 4), 2.0))
        finally:
            client.close()


# ----- session options --------------------------------------------------------------------------------------------


def _config_with(
    parameters: dict[str, str] | None = None, graph_level: int | None = None, name: str = "tuned"
) -> mc.ModelConfig:
    config = mc.ModelConfig(name=name)
    for key, value in (parameters or {}).items():
        config.parameters[key].string_value = value
    if graph_level is not None:
        config.optimization.graph.level = graph_level
    return config


def test_thread_counts_are_applied() -> None:
    opts = session_options(_config_with({"intra_op_thread_count": "3", "inter_op_thread_count": "2"}))
    assert opts.intra_op_num_threads == 3
    assert opts.inter_op_num_threads == 2
    defaults = session_options(_config_with())
    # Unconfigured, the intra-op pool leaves one core to the event loop.
    cores = len(os.sched_getaffinity(0))
    assert defaults.intra_op_num_threads == max(1, cores - 1) == default_intra_op_threads()
    assert defaults.inter_op_num_threads == ort.SessionOptions().inter_op_num_threads


@pytest.mark.parametrize(
    ("value", "entry"), [pytest.param(None, "0", id="default-off"), pytest.param("true", "1", id="on")]
)
def test_intra_op_spinning_is_off_unless_asked(value: str | None, entry: str) -> None:
    params = {} if value is None else {"tensorgate.intra_op_spinning": value}
    opts = session_options(_config_with(params))
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == entry


def test_bad_spinning_value_is_refused() -> None:
    with pytest.raises(ModelLoadError) as info:
        session_options(_config_with({"tensorgate.intra_op_spinning": "sometimes"}))
    assert "tensorgate.intra_op_spinning" in info.value.message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        pytest.param("intra_op_thread_count", "two", id="intra-not-a-number"),
        pytest.param("intra_op_thread_count", "1.5", id="intra-fraction"),
        pytest.param("inter_op_thread_count", "-1", id="inter-negative"),
        pytest.param("inter_op_thread_count", "99999999999999", id="inter-huge"),
    ],
)
def test_bad_thread_counts_name_the_parameter(key: str, value: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        session_options(_config_with({key: value}))
    assert f"parameter '{key}'" in info.value.message
    assert f"'{value}'" in info.value.message
    assert "'tuned'" in info.value.message


@pytest.mark.parametrize(
    ("parameters", "graph_level", "expected"),
    [
        pytest.param({}, None, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, id="default-all"),
        pytest.param({}, -1, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, id="triton-level-minus-1"),
        pytest.param({}, 0, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, id="triton-level-0"),
        pytest.param({}, 1, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, id="triton-level-1"),
        pytest.param({}, 2, ort.GraphOptimizationLevel.ORT_DISABLE_ALL, id="triton-level-2"),
        pytest.param(
            {"tensorgate.graph_optimization_level": "disable"},
            None,
            ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            id="param-disable",
        ),
        pytest.param(
            {"tensorgate.graph_optimization_level": "basic"},
            None,
            ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            id="param-basic",
        ),
        pytest.param(
            {"tensorgate.graph_optimization_level": "extended"},
            None,
            ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            id="param-extended",
        ),
        pytest.param(
            {"tensorgate.graph_optimization_level": "all"},
            -1,
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            id="param-wins-over-triton-level",
        ),
    ],
)
def test_graph_optimization_level(
    parameters: dict[str, str], graph_level: int | None, expected: ort.GraphOptimizationLevel
) -> None:
    assert session_options(_config_with(parameters, graph_level)).graph_optimization_level == expected


def test_unknown_graph_optimization_level_names_the_parameter() -> None:
    with pytest.raises(ModelLoadError) as info:
        session_options(_config_with({"tensorgate.graph_optimization_level": "fastest"}))
    assert "tensorgate.graph_optimization_level" in info.value.message
    assert "'extended'" in info.value.message


@pytest.mark.parametrize(
    ("value", "mode"),
    [
        pytest.param(None, "HEURISTIC", id="default-heuristic"),
        pytest.param("0", "EXHAUSTIVE", id="triton-0"),
        pytest.param("1", "HEURISTIC", id="triton-1"),
        pytest.param("2", "DEFAULT", id="triton-2"),
        pytest.param(" exhaustive ", "EXHAUSTIVE", id="by-name"),
    ],
)
def test_cudnn_conv_algo_search(value: str | None, mode: str) -> None:
    params = {} if value is None else {"cudnn_conv_algo_search": value}
    options = cuda_options(_config_with(params))
    assert options == {"cudnn_conv_algo_search": mode}
    # ... and they reach the CUDA provider's options beside the device, never the CPU's.
    choice = choose_providers(KIND.KIND_GPU, [1], [CUDA, CPU], model="m", cuda=options)
    assert choice.providers == [(CUDA, {"device_id": "1", "cudnn_conv_algo_search": mode}), CPU]


def test_bad_cudnn_conv_algo_search_fails_the_load_on_any_machine(tmp_path: Path) -> None:
    """Checked where the config is read, so a typo shows on the CPU machine it was tested on too."""
    path = identity_model(tmp_path / "convs" / "1" / "model.onnx", "FP32")
    config = _config_with({"cudnn_conv_algo_search": "fastest"}, name="convs")
    config.instance_group.add(kind=KIND.KIND_CPU, count=1)
    with pytest.raises(ModelLoadError) as info:
        OnnxBackend(path, config, version=1)
    assert "'convs'" in str(info.value)
    assert "cudnn_conv_algo_search" in info.value.message
    assert "'fastest'" in info.value.message


def test_session_options_reach_the_session(tmp_path: Path) -> None:
    path = identity_model(tmp_path / "tuned" / "1" / "model.onnx", "FP32")
    config = _config_with({"intra_op_thread_count": "1", "tensorgate.graph_optimization_level": "basic"})
    backend = OnnxBackend(path, config, version=1)
    try:
        x = np.ones((2, 4), dtype=np.float32)
        np.testing.assert_array_equal(backend.execute({"INPUT0": x}, ["OUTPUT0"])["OUTPUT0"], x)
    finally:
        backend.close()


# ----- padding batches to one shape (tensorgate.pad_batches) -----------------------------------------------------


def _padding_config(pad: str | None, max_batch_size: int = 8) -> mc.ModelConfig:
    config = _config_with({} if pad is None else {"tensorgate.pad_batches": pad}, name="rows")
    config.max_batch_size = max_batch_size
    return config


def _padded_backend(path: Path, pad: str | None) -> OnnxBackend:
    """As the repository makes one: the session, then the padding from the (completed) config."""
    config = _padding_config(pad)
    backend = OnnxBackend(path, config, version=1)
    backend.pad_to_max_batch_size(config)
    return backend


@pytest.mark.parametrize(
    ("pad", "rows", "seen"),
    [
        pytest.param(None, 3, 3, id="off-by-default"),
        pytest.param("true", 3, 8, id="padded-to-max"),
        pytest.param("true", 1, 8, id="one-row-padded"),
        pytest.param("true", 8, 8, id="full-batch-as-is"),
        pytest.param("false", 3, 3, id="off"),
        pytest.param("2,4", 1, 2, id="sizes-smallest-that-holds-it"),
        pytest.param("2,4", 3, 4, id="sizes-next-size"),
        pytest.param("4, 2", 5, 8, id="sizes-max-batch-size-added"),
        pytest.param("1,2,4", 1, 1, id="sizes-exact-size-as-is"),
        pytest.param("8", 3, 8, id="sizes-max-batch-size-alone"),
    ],
)
def test_padded_runs_compute_max_batch_size_rows_and_return_the_real_ones(
    tmp_path: Path, pad: str | None, rows: int, seen: int
) -> None:
    path = rows_seen_model(tmp_path / "rows" / "1" / "model.onnx")
    backend = _padded_backend(path, pad)
    try:
        x = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
        out = backend.execute({"INPUT0": x}, ["OUTPUT0", "ROWS"])
    finally:
        backend.close()
    np.testing.assert_array_equal(out["OUTPUT0"], x * 2)
    np.testing.assert_array_equal(out["ROWS"], np.full((rows, 1), seen, dtype=np.float32))


def test_each_padding_size_runs_on_a_session_of_its_own(tmp_path: Path) -> None:
    """ONNX Runtime's cuDNN convolutions keep the plan of their last input shape (per session): a session per size
    keeps each size's plans. "true" is one size, on the one session."""
    path = rows_seen_model(tmp_path / "rows" / "1" / "model.onnx")
    several = _padded_backend(path, "2,4")
    one = _padded_backend(path, "true")
    try:
        sessions = several._sessions  # noqa: SLF001 - which session runs which size is not visible from outside
        assert sorted(sessions) == [2, 4, 8]
        assert len({id(s) for s in sessions.values()}) == 3
        assert sessions[8] is several._session  # noqa: SLF001
        assert list(one._sessions) == [8]  # noqa: SLF001
        x = np.arange(12, dtype=np.float32).reshape(3, 4)
        np.testing.assert_array_equal(several.execute({"INPUT0": x}, ["OUTPUT0"])["OUTPUT0"], x * 2)
        # The model's bytes are gone once the padding is set: no session can be made after the load.
        with pytest.raises(ModelLoadError, match="padding sizes can only be set once"):
            several.pad_to_max_batch_size(_padding_config("3"))
    finally:
        several.close()
        one.close()
    assert several._sessions == {}  # noqa: SLF001 - closing drops every size's session


def test_padding_needs_the_call_that_makes_its_sessions(tmp_path: Path) -> None:
    """The sessions are made once the model has passed its checks; a backend that was never told pads nothing."""
    path = rows_seen_model(tmp_path / "rows" / "1" / "model.onnx")
    backend = OnnxBackend(path, _padding_config("2,4"), version=1)
    try:
        assert backend._sessions == {}  # noqa: SLF001
        out = backend.execute({"INPUT0": np.ones((3, 4), dtype=np.float32)}, ["ROWS"])
    finally:
        backend.close()
    np.testing.assert_array_equal(out["ROWS"], np.full((3, 1), 3, dtype=np.float32))


_PAD = 'parameters {{ key: "tensorgate.pad_batches" value: {{ string_value: "{}" }} }}\n'


@pytest.mark.parametrize(
    ("on_gpu", "extra", "hinted"),
    [
        pytest.param(True, "dynamic_batching { }\n", True, id="cuda-batching-unpadded"),
        pytest.param(False, "dynamic_batching { }\n", False, id="cpu"),
        pytest.param(True, "", False, id="no-dynamic-batching"),
        pytest.param(True, "dynamic_batching { }\n" + _PAD.format("true"), False, id="padded"),
        pytest.param(True, "dynamic_batching { }\n" + _PAD.format("false"), True, id="padding-off"),
    ],
)
def test_a_model_batching_on_cuda_without_padding_is_told_about_it(on_gpu: bool, extra: str, hinted: bool) -> None:
    config = text_format.Parse(f'name: "cnn"\nmax_batch_size: 8\n{extra}', mc.ModelConfig())
    hint = padding_hint(config, on_gpu=on_gpu)
    assert (hint is not None) == hinted
    if hint:
        assert "model 'cnn'" in hint and "tensorgate.pad_batches" in hint and "cuDNN" in hint


def test_padding_repeats_the_last_row_for_any_type() -> None:
    """Real rows, not zeros, so that the padding is valid input: BYTES tensors included."""
    feed = {
        "T": np.array([[b"a"], [b"b"]], dtype=object),
        "X": np.array([[1.0, 2.0]], dtype=np.float32),
    }
    padded = pad_feed({"T": feed["T"]}, 4)["T"]
    assert padded.tolist() == [[b"a"], [b"b"], [b"b"], [b"b"]]
    x = pad_feed({"X": feed["X"]}, 3)["X"]
    np.testing.assert_array_equal(x, [[1.0, 2.0]] * 3)
    assert pad_feed(feed, 2)["T"] is feed["T"]  # already as long: no copy


@pytest.mark.parametrize(
    ("pad", "max_batch_size", "needle"),
    [
        pytest.param("yes", 8, "'yes'", id="not-a-boolean"),
        pytest.param("Yes please", 0, "'Yes please'", id="not-a-boolean-before-max-batch-size-is-known"),
        pytest.param("true", 0, "max_batch_size > 0", id="no-batch-dimension"),
        pytest.param("0,4", 8, "size 0 is outside 1..8", id="size-zero"),
        pytest.param("4,16", 8, "size 16 is outside 1..8", id="size-above-max-batch-size"),
        pytest.param("1;2", 8, "got '1;2'", id="not-a-list"),
        pytest.param("2,\u00b2", 8, "got '2,\u00b2'", id="not-ascii-digits"),
        pytest.param(",".join(map(str, range(1, 17))), 64, "at most 16", id="too-many-sessions"),
        pytest.param("2,4", 0, "max_batch_size > 0", id="sizes-without-batch-dimension"),
    ],
)
def test_bad_padding_settings_fail_the_load(tmp_path: Path, pad: str, max_batch_size: int, needle: str) -> None:
    """As the repository loads: the session first, then padding from the completed config."""
    path = rows_seen_model(tmp_path / "rows" / "1" / "model.onnx")
    config = _padding_config(pad, max_batch_size)
    with pytest.raises(ModelLoadError) as info:
        backend = OnnxBackend(path, config, version=1)
        backend.pad_to_max_batch_size(config)
    assert "tensorgate.pad_batches" in info.value.message
    assert needle in info.value.message
    assert info.value.version == 1


@pytest.mark.parametrize(("pad", "padded_to"), [("true", {8}), ("2,4", {2, 4, 8})])
def test_padded_batches_serve_every_caller_its_own_rows(tmp_path: Path, pad: str, padded_to: set[int]) -> None:
    """Through the server and its dynamic batcher, concurrent callers of different sizes."""
    root = tmp_path / "models"
    rows_seen_model(root / "rows" / "1" / "model.onnx")
    write_config(
        root,
        "rows",
        'max_batch_size: 8\ndynamic_batching { }\nparameters { key: "tensorgate.pad_batches" '
        f'value: {{ string_value: "{pad}" }} }}\n',
    )
    sizes = [1, 3, 2, 5, 1, 4, 8, 2] * 3
    with ServerThread(root) as server:
        client = grpcclient.InferenceServerClient(server.address)

        def call(i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            x = np.full((sizes[i], 4), i, dtype=np.float32)
            inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            res = client.infer("rows", [inp])
            y, seen = res.as_numpy("OUTPUT0"), res.as_numpy("ROWS")
            assert y is not None and seen is not None
            return x, y, seen

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(call, range(len(sizes))))
        client.close()
    for x, y, seen in answers:
        np.testing.assert_array_equal(y, x * 2)
        # The batch this caller was in ran at one of the sizes, one that holds at least its own rows.
        assert seen.shape == (x.shape[0], 1) and len(set(seen.ravel())) == 1
        assert int(seen[0, 0]) in padded_to and int(seen[0, 0]) >= x.shape[0]


def test_the_server_runs_a_batch_at_the_smallest_size_that_holds_it(tmp_path: Path) -> None:
    """One caller at a time, so that each batch is one request: its rows decide the size exactly."""
    root = tmp_path / "models"
    rows_seen_model(root / "rows" / "1" / "model.onnx")
    write_config(root, "rows", "max_batch_size: 8\ndynamic_batching { }\n" + _PAD.format("2,4"))
    seen = {}
    with ServerThread(root) as server:
        client = grpcclient.InferenceServerClient(server.address)
        try:
            for rows in (1, 2, 3, 5, 8):
                inp = grpcclient.InferInput("INPUT0", [rows, 4], "FP32")
                inp.set_data_from_numpy(np.ones((rows, 4), dtype=np.float32))
                out = client.infer("rows", [inp]).as_numpy("ROWS")
                assert out is not None and out.shape == (rows, 1)
                seen[rows] = int(out[0, 0])
        finally:
            client.close()
    assert seen == {1: 2, 2: 2, 3: 4, 5: 8, 8: 8}


def test_padding_string_inputs(tmp_path: Path) -> None:
    """ONNX string tensors are padded after their bytes become text, and come back row for row."""
    path = identity_model(tmp_path / "rows" / "1" / "model.onnx", "BYTES")
    backend = _padded_backend(path, "true")
    try:
        x = np.array([[b"a", b"b", b"c", b"d"], ["é".encode(), b"", b"x", b"y"]], dtype=object)
        out = backend.execute({"INPUT0": x}, ["OUTPUT0"])["OUTPUT0"]
    finally:
        backend.close()
    assert out.shape == (2, 4)
    assert [[str(v) for v in row] for row in out] == [["a", "b", "c", "d"], ["é", "", "x", "y"]]


def test_padding_takes_max_batch_size_from_the_model_when_the_config_leaves_it_out(tmp_path: Path) -> None:
    """The repository completes max_batch_size (4, as in Triton) after the session exists; padding follows it.
    A model without a batch dimension cannot pad, and says so."""
    root = tmp_path / "models"
    pad = 'parameters { key: "tensorgate.pad_batches" value: { string_value: "true" } }\n'
    rows_seen_model(root / "auto" / "1" / "model.onnx")
    write_config(root, "auto", pad)
    rows_seen_model(root / "flat" / "1" / "model.onnx")
    write_config(root, "flat", "max_batch_size: 0\n" + pad)
    with ServerThread(root, model_control_mode="explicit", load_model=["auto"]) as server:
        client = grpcclient.InferenceServerClient(server.address)
        try:
            inp = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
            inp.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
            seen = client.infer("auto", [inp]).as_numpy("ROWS")
            status, message = _status_and_message(lambda: client.load_model("flat"))
        finally:
            client.close()
    np.testing.assert_array_equal(seen, [[4.0]])
    assert status == str(grpc.StatusCode.UNAVAILABLE)
    assert "'flat'" in message and "tensorgate.pad_batches" in message and "max_batch_size > 0" in message


# ----- through a server: load errors, strings, runtime failures -------------------------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[grpcclient.InferenceServerClient]:
    root = tmp_path / "models"
    identity_model(root / "text" / "1" / "model.onnx", "BYTES")
    broadcast_add_model(root / "broadcast" / "1" / "model.onnx")
    write_config(root, "broadcast", "max_batch_size: 0\n")
    identity_model(root / "bad_threads" / "1" / "model.onnx", "FP32")
    write_config(root, "bad_threads", 'parameters { key: "intra_op_thread_count" value: { string_value: "many" } }\n')
    with ServerThread(root, model_control_mode="explicit", load_model=["text", "broadcast"]) as s:
        client = grpcclient.InferenceServerClient(s.address)
        yield client
        client.close()


def _status_and_message(call: object) -> tuple[str | None, str]:
    assert callable(call)
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value.status(), str(info.value.message())


def test_bad_session_parameter_fails_the_load(served: grpcclient.InferenceServerClient) -> None:
    status, message = _status_and_message(lambda: served.load_model("bad_threads"))
    assert status == str(grpc.StatusCode.UNAVAILABLE)
    assert "parameter 'intra_op_thread_count'" in message
    assert "'many'" in message


def _text_input(values: list[bytes]) -> grpcclient.InferInput:
    inp = grpcclient.InferInput("INPUT0", [1, len(values)], "BYTES")
    inp.set_data_from_numpy(np.array([values], dtype=object))
    return inp


def test_utf8_strings_round_trip(served: grpcclient.InferenceServerClient) -> None:
    values = ["héllo".encode(), "日本語".encode(), b"", b"plain ascii"]
    out = served.infer("text", [_text_input(values)]).as_numpy("OUTPUT0")
    assert out is not None
    assert out.shape == (1, 4)
    assert list(out[0]) == values


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(b"\xff\xfe", id="invalid-start-byte"),
        pytest.param("é".encode()[:1], id="truncated-sequence"),
        pytest.param("é".encode("latin-1"), id="latin-1"),
    ],
)
def test_non_utf8_bytes_into_a_string_model_are_invalid(served: grpcclient.InferenceServerClient, bad: bytes) -> None:
    status, message = _status_and_message(lambda: served.infer("text", [_text_input([b"ok", bad, b"a", b"b"])]))
    assert status == str(grpc.StatusCode.INVALID_ARGUMENT)
    assert "model 'text'" in message
    assert "tensor 'INPUT0'" in message
    assert "UTF-8" in message
    out = served.infer("text", [_text_input([b"ok", b"fine", b"a", b"b"])]).as_numpy("OUTPUT0")
    assert out is not None and list(out[0]) == [b"ok", b"fine", b"a", b"b"]


def _add(client: grpcclient.InferenceServerClient, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    inputs = [grpcclient.InferInput(n, list(x.shape), "FP32") for n, x in (("INPUT0", a), ("INPUT1", b))]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    out: np.ndarray | None = client.infer("broadcast", inputs).as_numpy("OUTPUT0")
    assert out is not None
    return out


def test_failure_inside_onnxruntime_is_internal_and_the_model_keeps_serving(
    served: grpcclient.InferenceServerClient,
) -> None:
    a = np.arange(3, dtype=np.float32)
    config = served.get_model_config("broadcast").config
    assert config.max_batch_size == 0
    assert [list(t.dims) for t in config.input] == [[-1], [-1]]  # both lengths pass schema validation

    status, message = _status_and_message(lambda: _add(served, a, np.ones(2, dtype=np.float32)))
    assert status == str(grpc.StatusCode.INTERNAL)
    assert "model 'broadcast' version 1 failed during execution" in message
    assert "onnxruntime" in message

    np.testing.assert_array_equal(_add(served, a, np.ones(3, dtype=np.float32)), a + 1)
    np.testing.assert_array_equal(_add(served, a, np.full(1, 2.0, dtype=np.float32)), a + 2)
    stats = served.get_inference_statistics("broadcast").model_stats[0].inference_stats
    assert (stats.success.count, stats.fail.count) == (2, 1)


def test_bad_text_fails_its_own_request_not_its_batch(tmp_path: Path) -> None:
    """Non-UTF-8 bytes for an ONNX string input are refused before the request queues: a good request that the
    batcher would have put in the same batch still succeeds, and the element index is the caller's own."""
    root = tmp_path / "models"
    identity_model(root / "text" / "1" / "model.onnx", "BYTES")
    write_config(root, "text", "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 200000 }\n")
    with ServerThread(root) as server:
        client = grpcclient.InferenceServerClient(server.address)

        def call(values: list[bytes]) -> object:
            try:
                out = client.infer("text", [_text_input(values)]).as_numpy("OUTPUT0")
                return None if out is None else list(out[0])
            except InferenceServerException as exc:
                return exc

        with ThreadPoolExecutor(2) as pool:
            good, bad = pool.map(call, [[b"a", b"b", b"c", b"d"], [b"w", b"\xff\xfe", b"y", b"z"]])
        client.close()
    assert good == [b"a", b"b", b"c", b"d"]
    assert isinstance(bad, InferenceServerException)
    assert bad.status() == str(grpc.StatusCode.INVALID_ARGUMENT)
    assert "'text'" in str(bad.message()) and "'INPUT0'" in str(bad.message())
    assert "element 1 is not valid UTF-8" in str(bad.message())


def test_text_is_checked_element_by_element(tmp_path: Path) -> None:
    """The whole tensor is checked in one call (elements joined by NUL): a character cut between two elements
    must not pass as the one it would make joined, and NUL inside an element is fine."""
    root = tmp_path / "models"
    identity_model(root / "text" / "1" / "model.onnx", "BYTES")
    write_config(root, "text", "max_batch_size: 8\n")
    with ServerThread(root) as server, grpcclient.InferenceServerClient(server.address) as client:
        # Refused by the check before the queue (its words), not by the model's feed, which would fail a batch.
        with pytest.raises(InferenceServerException, match="element 1 is not valid UTF-8; this model's string"):
            client.infer("text", [_text_input([b"a", b"\xc3", b"\xa9", b"d"])])  # "é" cut in two
        out = client.infer("text", [_text_input([b"a\x00b", "é".encode(), b"", b"d"])]).as_numpy("OUTPUT0")
    assert out is not None and list(out[0]) == [b"a\x00b", "é".encode(), b"", b"d"]
