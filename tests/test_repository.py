"""The model repository as a caller sees it: config.pbtxt parsing, auto-complete, version policies, explicit model
control, strict readiness and warm-up.

Every check goes through a real server on a free loopback port with unmodified tritonclient (or tensorgate's own
stubs where tritonclient has no call), against ONNX models built here. Most cases share one explicit-mode server
per module and load their own model by name, so each case reads the status that RepositoryModelLoad returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto
from tritonclient.grpc import model_config_pb2 as triton_mc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from tensorgate.protos import GRPCInferenceServiceStub
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.server import ServerSettings, TensorgateServer
from tests.onnx_models import (
    add_sub_model,
    cast_model,
    identity_model,
    row_sum_model,
    scale_model,
    slow_model,
    write_config,
)
from tests.serving import ServerThread

# ----- helpers -------------------------------------------------------------------------------------------------


def _config(repo: Path, name: str, text: str) -> None:
    """Write config.pbtxt exactly as given (dedented, no leading blank line), so line numbers are known."""
    write_config(repo, name, textwrap.dedent(text).lstrip("\n"))


def _infer(
    client: grpcclient.InferenceServerClient,
    model: str,
    x: np.ndarray,
    *,
    version: str = "",
    input_name: str = "INPUT0",
    output: str = "OUTPUT0",
) -> np.ndarray:
    inp = grpcclient.InferInput(input_name, list(x.shape), np_to_triton_dtype(x.dtype))
    inp.set_data_from_numpy(x)
    result = client.infer(model, [inp], model_version=version)
    out: np.ndarray | None = result.as_numpy(output)
    assert out is not None
    return out


def _error(code: grpc.StatusCode, call: Callable[..., object], *args: object, **kwargs: object) -> str:
    """Run a tritonclient call that must fail with `code`; return the server's message."""
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    assert info.value.status() == str(code), info.value.message()
    return str(info.value.message())


def _index(client: grpcclient.InferenceServerClient) -> dict[tuple[str, str], tuple[str, str]]:
    """RepositoryIndex as {(name, version): (state, reason)}."""
    rows = client.get_model_repository_index().models
    return {(m.name, m.version): (m.state, m.reason) for m in rows}


def _assert_failed_in_index(client: grpcclient.InferenceServerClient, model: str, fragment: str) -> None:
    """The model's rows (one per failed version, or one without a version) are UNAVAILABLE with the reason."""
    rows = [(state, reason) for (name, _), (state, reason) in _index(client).items() if name == model]
    assert rows
    for state, reason in rows:
        assert state == "UNAVAILABLE"
        assert fragment in reason


ROW = np.arange(4, dtype=np.float32).reshape(1, 4)

# ----- one explicit-mode server over a repository of many small cases -------------------------------------------

TRITON_TEXT = """
    # A config as Triton users write it: comments, platform instead of backend, lists in both spellings.
    name: "triton_text"
    platform: "onnxruntime_onnx"
    max_batch_size: 8
    input [
      {
        name: "INPUT0"
        data_type: TYPE_FP32
        dims: [ 16 ]
      },
      {
        name: "INPUT1"
        data_type: TYPE_FP32
        dims: [ 16 ]
      }
    ]
    output { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] }
    output { name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 16 ] }
    instance_group [ { kind: KIND_CPU count: 2 } ]
    dynamic_batching { preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 100 }
    version_policy: { latest: { num_versions: 1 } }
    parameters { key: "tensorgate.graph_optimization_level" value: { string_value: "basic" } }
"""

# (model directory, config.pbtxt or None, fragments the load error must contain)
BROKEN_CONFIGS = [
    pytest.param(
        "syntax_error",
        """
        name: "syntax_error"
        max_batch_size: 4
        input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 } ]
        """,
        ["config.pbtxt", "line 3", 'Expected ","'],
        id="syntax-error-names-file-and-line",
    ),
    pytest.param(
        "unknown_field",
        """
        name: "unknown_field"

        max_batch_sise: 4
        """,
        ["config.pbtxt", "line 3", "max_batch_sise"],
        id="unknown-field-names-file-and-line",
    ),
    pytest.param(
        "name_mismatch",
        'name: "other_name"\n',
        ["'other_name'", "'name_mismatch'"],
        id="config-name-differs-from-directory",
    ),
    pytest.param(
        "python_backend",
        'backend: "python"\n',
        ["unsupported backend 'python'"],
        id="python-backend",
    ),
    pytest.param(
        "tensorflow_platform",
        'platform: "tensorflow_savedmodel"\n',
        ["unsupported backend 'tensorflow_savedmodel'"],
        id="tensorflow-platform",
    ),
    pytest.param(
        "unknown_input",
        'max_batch_size: 4\ninput [ { name: "NOT_THERE" data_type: TYPE_FP32 dims: [ 4 ] } ]\n',
        ["input 'NOT_THERE' is not in the model", "INPUT0"],
        id="config-input-not-in-model",
    ),
    pytest.param(
        "dtype_mismatch",
        'max_batch_size: 4\ninput [ { name: "INPUT0" data_type: TYPE_INT32 dims: [ 4 ] } ]\n',
        ["input 'INPUT0'", "TYPE_INT32 in config", "TYPE_FP32 in the model"],
        id="dtype-mismatch-names-both-types",
    ),
    pytest.param(
        "dims_mismatch",
        'max_batch_size: 4\noutput [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 5 ] } ]\n',
        ["output 'OUTPUT0'", "dims [5]", "[4]"],
        id="dims-mismatch",
    ),
    pytest.param(
        "batch_on_fixed_dim",
        "max_batch_size: 4\n",
        ["max_batch_size is 4", "INPUT0", "not dynamic", "set max_batch_size: 0"],
        id="max-batch-size-on-fixed-first-dim",
    ),
    pytest.param(
        "no_matching_version",
        "version_policy: { specific: { versions: [ 7 ] } }\n",
        ["no version directory matches the version policy", "[1, 2]"],
        id="no-version-matches-policy",
    ),
]


def _build_cases(root: Path) -> None:
    add_sub_model(root / "triton_text" / "1" / "model.onnx")
    _config(root, "triton_text", TRITON_TEXT)

    for param in BROKEN_CONFIGS:
        name, text = str(param.values[0]), str(param.values[1])
        if name == "batch_on_fixed_dim":
            identity_model(root / name / "1" / "model.onnx", "FP32", shape=(2, 4))
        else:
            identity_model(root / name / "1" / "model.onnx", "FP32")
        _config(root, name, text)
    identity_model(root / "no_matching_version" / "2" / "model.onnx", "FP32")

    # Auto-complete.
    identity_model(root / "auto_batch" / "1" / "model.onnx", "FP32")
    identity_model(root / "auto_fixed" / "1" / "model.onnx", "FP32", shape=(2, 4))
    identity_model(root / "only_max_batch" / "1" / "model.onnx", "INT32")
    _config(root, "only_max_batch", "max_batch_size: 2\n")
    identity_model(root / "names_only" / "1" / "model.onnx", "INT64")
    _config(root, "names_only", 'max_batch_size: 3\ninput [ { name: "INPUT0" } ]\noutput [ { name: "OUTPUT0" } ]\n')
    identity_model(root / "names_only_no_batch" / "1" / "model.onnx", "FP32")
    _config(root, "names_only_no_batch", 'input [ { name: "INPUT0" } ]\n')
    row_sum_model(root / "row_sum" / "1" / "model.onnx")

    # Version policies: version N answers with factor N.
    for name, versions in {
        "latest_default": (1, 2, 3),
        "latest_two": (1, 2, 3),
        "all_versions": (1, 2, 3),
        "specific_versions": (1, 2, 3),
        "odd_dirs": (1, 2),
        "missing_file": (1,),
    }.items():
        for v in versions:
            scale_model(root / name / str(v) / "model.onnx", float(v))
    _config(root, "latest_two", "version_policy: { latest: { num_versions: 2 } }\n")
    _config(root, "all_versions", "version_policy: { all: {} }\n")
    _config(root, "specific_versions", "version_policy: { specific: { versions: [ 1, 3 ] } }\n")
    _config(root, "odd_dirs", "version_policy: { all: {} }\n")
    for odd in ("latest", "v3", "4.0", "-5"):
        scale_model(root / "odd_dirs" / odd / "model.onnx", 99.0)
    (root / "odd_dirs" / "notes.txt").write_text("not a version")
    _config(root, "missing_file", "version_policy: { all: {} }\n")
    (root / "missing_file" / "2").mkdir()
    (root / "missing_file" / "2" / "README").write_text("the model file is missing")

    # Warm-up.
    warm = """
        max_batch_size: 4
        model_warmup [
          {{
            name: "{name}"
            batch_size: 2
            count: 3
            inputs {{ key: "{input}" value: {{ data_type: TYPE_FP32 dims: {dims} {kind}: true }} }}
          }}
        ]
    """
    for model, sample, input_name, dims, kind in (
        ("warm_zero", "zeros", "INPUT0", "[ 4 ]", "zero_data"),
        ("warm_random", "noise", "INPUT0", "[ 4 ]", "random_data"),
        ("warm_bad_name", "misnamed", "NOT_AN_INPUT", "[ 4 ]", "zero_data"),
        ("warm_bad_shape", "misshapen", "INPUT0", "[ 5 ]", "random_data"),
    ):
        scale_model(root / model / "1" / "model.onnx", 2.0)
        _config(root, model, warm.format(name=sample, input=input_name, dims=dims, kind=kind))
    from_file = warm.format(name="from_file", input="INPUT0", dims="[ 4 ]", kind="zero_data").replace(
        "zero_data: true", 'input_data_file: "in.bin"'
    )
    for model in ("warm_missing_file", "warm_linked_out"):
        scale_model(root / model / "1" / "model.onnx", 2.0)
        _config(root, model, from_file)
    (root / "warm_linked_out" / "warmup").mkdir()
    (root.parent / "outside.bin").write_bytes(bytes(32))
    (root / "warm_linked_out" / "warmup" / "in.bin").symlink_to(root.parent / "outside.bin")


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    root = tmp_path_factory.mktemp("cases") / "models"
    _build_cases(root)
    with ServerThread(root, model_control_mode="explicit") as s:
        yield s


@pytest.fixture
def client(cases: ServerThread) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(cases.address)
    yield c
    c.close()


# ----- config.pbtxt ------------------------------------------------------------------------------------------------


def test_triton_config_text_is_served_as_written(client: grpcclient.InferenceServerClient) -> None:
    client.load_model("triton_text")
    config = client.get_model_config("triton_text").config
    assert config.platform == "onnxruntime_onnx"
    assert config.backend == "onnxruntime"
    assert config.max_batch_size == 8
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        ("INPUT0", triton_mc.TYPE_FP32, [16]),
        ("INPUT1", triton_mc.TYPE_FP32, [16]),
    ]
    assert [t.name for t in config.output] == ["OUTPUT0", "OUTPUT1"]
    assert [(g.kind, g.count) for g in config.instance_group] == [(triton_mc.ModelInstanceGroup.KIND_CPU, 2)]
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    assert config.parameters["tensorgate.graph_optimization_level"].string_value == "basic"

    a = np.full((2, 16), 3.0, dtype=np.float32)
    b = np.ones((2, 16), dtype=np.float32)
    inputs = [grpcclient.InferInput(n, [2, 16], "FP32") for n in ("INPUT0", "INPUT1")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = client.infer("triton_text", inputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


@pytest.mark.parametrize(("model", "text", "fragments"), BROKEN_CONFIGS)
def test_bad_config_fails_the_load_with_its_reason(
    client: grpcclient.InferenceServerClient, model: str, text: str, fragments: list[str]
) -> None:
    message = _error(grpc.StatusCode.UNAVAILABLE, client.load_model, model)
    assert f"'{model}'" in message
    for fragment in fragments:
        assert fragment in message
    assert not client.is_model_ready(model)
    _assert_failed_in_index(client, model, fragments[-1])
    infer_message = _error(grpc.StatusCode.UNAVAILABLE, _infer, client, model, ROW)
    assert fragments[-1] in infer_message


# ----- auto-complete --------------------------------------------------------------------------------------------


def test_autocomplete_without_config_batches_a_dynamic_first_dim(client: grpcclient.InferenceServerClient) -> None:
    client.load_model("auto_batch")
    config = client.get_model_config("auto_batch").config
    assert config.name == "auto_batch"
    assert config.backend == "onnxruntime"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 4  # the server's default_max_batch_size
    assert config.HasField("dynamic_batching")
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [("INPUT0", triton_mc.TYPE_FP32, [4])]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [("OUTPUT0", triton_mc.TYPE_FP32, [4])]
    assert config.instance_group[0].kind == triton_mc.ModelInstanceGroup.KIND_CPU
    assert config.parameters["tensorgate.execution_provider"].string_value == "CPUExecutionProvider"
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(_infer(client, "auto_batch", x), x)


def test_autocomplete_without_config_keeps_a_fixed_first_dim(client: grpcclient.InferenceServerClient) -> None:
    client.load_model("auto_fixed")
    config = client.get_model_config("auto_fixed").config
    assert config.max_batch_size == 0
    assert not config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [2, 4]
    assert list(config.output[0].dims) == [2, 4]
    x = np.ones((2, 4), dtype=np.float32)
    np.testing.assert_array_equal(_infer(client, "auto_fixed", x), x)


@pytest.mark.parametrize(
    ("model", "max_batch_size", "data_type", "dims"),
    [
        pytest.param("only_max_batch", 2, triton_mc.TYPE_INT32, [4], id="only-max-batch-size"),
        pytest.param("names_only", 3, triton_mc.TYPE_INT64, [4], id="inputs-without-type-or-dims"),
        # As Triton: a config that does not list both inputs and outputs gets max_batch_size from the model (it
        # once stayed 0 here, serving the batch dimension as a model dimension), and dynamic batching with it.
        pytest.param("names_only_no_batch", 4, triton_mc.TYPE_FP32, [4], id="names-without-max-batch-size"),
    ],
)
def test_partial_config_is_completed(
    client: grpcclient.InferenceServerClient, model: str, max_batch_size: int, data_type: int, dims: list[int]
) -> None:
    client.load_model(model)
    config = client.get_model_config(model).config
    assert config.max_batch_size == max_batch_size
    # Only added when auto-complete chose the batch size.
    assert config.HasField("dynamic_batching") == (model == "names_only_no_batch")
    for tensors in (config.input, config.output):
        assert [(t.name, t.data_type, list(t.dims)) for t in tensors] == [(tensors[0].name, data_type, dims)]
    assert {t.name for t in config.output} == {"OUTPUT0"}


def test_batch_only_output_is_reshaped_to_one_column(client: grpcclient.InferenceServerClient) -> None:
    client.load_model("row_sum")
    config = client.get_model_config("row_sum").config
    out = config.output[0]
    assert list(out.dims) == [1]
    assert out.HasField("reshape")
    assert list(out.reshape.shape) == []
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    y = _infer(client, "row_sum", x)
    assert y.shape == (3, 1)
    np.testing.assert_array_equal(y, x.sum(axis=1, keepdims=True))


# ----- version policy -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "served", "not_served"),
    [
        pytest.param("latest_default", [3], [1, 2], id="latest-1-by-default"),
        pytest.param("latest_two", [2, 3], [1], id="latest-2"),
        pytest.param("all_versions", [1, 2, 3], [], id="all"),
        pytest.param("specific_versions", [1, 3], [2], id="specific"),
        pytest.param("odd_dirs", [1, 2], [4], id="non-numeric-dirs-ignored"),
    ],
)
def test_version_policy(
    client: grpcclient.InferenceServerClient, model: str, served: list[int], not_served: list[int]
) -> None:
    client.load_model(model)
    for v in served:
        assert client.is_model_ready(model, str(v))
        np.testing.assert_array_equal(_infer(client, model, ROW, version=str(v)), ROW * v)
    np.testing.assert_array_equal(_infer(client, model, ROW), ROW * max(served))
    for v in not_served:
        assert not client.is_model_ready(model, str(v))
        message = _error(grpc.StatusCode.NOT_FOUND, _infer, client, model, ROW, version=str(v))
        assert f"version {v} of model '{model}'" in message
    assert sorted(v for (n, v) in _index(client) if n == model) == [str(v) for v in served]
    metadata = client.get_model_metadata(model)
    assert sorted(metadata.versions) == [str(v) for v in served]


def test_version_without_model_file_is_unavailable_while_others_serve(
    client: grpcclient.InferenceServerClient,
) -> None:
    client.load_model("missing_file")
    np.testing.assert_array_equal(_infer(client, "missing_file", ROW, version="1"), ROW)
    np.testing.assert_array_equal(_infer(client, "missing_file", ROW), ROW)
    assert not client.is_model_ready("missing_file", "2")
    message = _error(grpc.StatusCode.UNAVAILABLE, _infer, client, "missing_file", ROW, version="2")
    assert "missing_file/2/model.onnx does not exist" in message
    index = _index(client)
    assert index[("missing_file", "1")] == ("READY", "")
    state, reason = index[("missing_file", "2")]
    assert state == "UNAVAILABLE"
    assert "model.onnx does not exist" in reason


# ----- warm-up ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [pytest.param("warm_zero", id="zero-data"), pytest.param("warm_random", id="random")])
def test_warmup_runs_before_ready_and_is_not_counted(client: grpcclient.InferenceServerClient, model: str) -> None:
    client.load_model(model)
    assert client.is_model_ready(model)
    stats = client.get_inference_statistics(model).model_stats[0]
    assert (stats.inference_count, stats.execution_count) == (0, 0)
    np.testing.assert_array_equal(_infer(client, model, ROW), ROW * 2)
    stats = client.get_inference_statistics(model).model_stats[0]
    assert (stats.inference_count, stats.execution_count) == (1, 1)


@pytest.mark.parametrize(
    ("model", "sample"),
    [
        pytest.param("warm_bad_name", "misnamed", id="unknown-input-name"),
        pytest.param("warm_bad_shape", "misshapen", id="wrong-dims"),
    ],
)
def test_failing_warmup_fails_the_load_naming_the_sample(
    client: grpcclient.InferenceServerClient, model: str, sample: str
) -> None:
    message = _error(grpc.StatusCode.UNAVAILABLE, client.load_model, model)
    assert f"warm-up sample '{sample}' failed" in message
    assert f"'{model}'" in message
    assert not client.is_model_ready(model)


@pytest.mark.parametrize(
    ("model", "detail"),
    [
        pytest.param("warm_missing_file", "warm_missing_file/warmup/in.bin: No such file or directory", id="missing"),
        pytest.param("warm_linked_out", "input_data_file 'in.bin' leaves the model's directory", id="link-out"),
    ],
)
def test_a_warmup_file_that_cannot_be_read_is_named_without_server_paths(
    cases: ServerThread, client: grpcclient.InferenceServerClient, model: str, detail: str
) -> None:
    """Clients read load errors (and RepositoryIndex): the file is named inside the repository, never by the
    server's absolute path, which an OSError's own text carries; a warm-up file may not lead out of its model."""
    message = _error(grpc.StatusCode.UNAVAILABLE, client.load_model, model)
    assert f"warm-up sample 'from_file' failed: {detail}" in message
    root = str(cases.settings.model_repository)
    assert root not in message and str(Path(root).resolve()) not in message
    (row,) = [m for m in client.get_model_repository_index().models if m.name == model]
    assert detail in row.reason and root not in row.reason


# ----- explicit model control -----------------------------------------------------------------------------------


@pytest.fixture
def explicit(repo: Path, tmp_path: Path) -> Iterator[ServerThread]:
    """The shared `repo` (add_sub, identity_fp32) in explicit mode with nothing loaded at start."""
    identity_model(tmp_path / "outside" / "1" / "model.onnx", "FP32")
    with ServerThread(repo, model_control_mode="explicit", load_model=[]) as s:
        yield s


@pytest.fixture
def explicit_client(explicit: ServerThread) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(explicit.address)
    yield c
    c.close()


def test_explicit_mode_starts_with_nothing_loaded(explicit_client: grpcclient.InferenceServerClient) -> None:
    c = explicit_client
    assert c.is_server_live()
    assert c.is_server_ready()
    for model in ("add_sub", "identity_fp32"):
        assert not c.is_model_ready(model)
    message = _error(grpc.StatusCode.UNAVAILABLE, _infer, c, "identity_fp32", ROW)
    assert "not loaded" in message
    assert _index(c) == {("add_sub", ""): ("", ""), ("identity_fp32", ""): ("", "")}


def test_load_then_unload(explicit_client: grpcclient.InferenceServerClient) -> None:
    c = explicit_client
    c.load_model("identity_fp32")
    assert c.is_model_ready("identity_fp32")
    np.testing.assert_array_equal(_infer(c, "identity_fp32", ROW), ROW)
    assert _index(c)[("identity_fp32", "1")] == ("READY", "")
    assert not c.is_model_ready("add_sub")

    c.unload_model("identity_fp32")
    assert not c.is_model_ready("identity_fp32")
    message = _error(grpc.StatusCode.UNAVAILABLE, _infer, c, "identity_fp32", ROW)
    assert "unloaded" in message
    # As Triton's index: the version it served stays listed, unloaded (not one row without a version).
    assert {k: v for k, v in _index(c).items() if k[0] == "identity_fp32"} == {
        ("identity_fp32", "1"): ("UNAVAILABLE", "unloaded")
    }
    assert c.is_server_ready()  # an unloaded model is not a failed one

    c.load_model("identity_fp32")
    np.testing.assert_array_equal(_infer(c, "identity_fp32", ROW), ROW)


def test_load_unknown_model_is_not_found(explicit_client: grpcclient.InferenceServerClient) -> None:
    message = _error(grpc.StatusCode.NOT_FOUND, explicit_client.load_model, "no_such_model")
    assert "'no_such_model'" in message
    _error(grpc.StatusCode.NOT_FOUND, explicit_client.unload_model, "no_such_model")


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("../outside", id="parent-relative"),
        pytest.param("a/b", id="slash"),
        pytest.param("..", id="dot-dot"),
        pytest.param(".", id="dot"),
        pytest.param("", id="empty"),
        pytest.param("ABSOLUTE", id="absolute-path"),
        pytest.param("add_sub/../identity_fp32", id="traversal-inside"),
    ],
)
def test_model_names_never_leave_the_repository(
    explicit: ServerThread, explicit_client: grpcclient.InferenceServerClient, tmp_path: Path, name: str
) -> None:
    if name == "ABSOLUTE":
        name = str(tmp_path / "outside")
    c = explicit_client
    message = _error(grpc.StatusCode.INVALID_ARGUMENT, c.load_model, name)
    assert "model names may use" in message
    _error(grpc.StatusCode.INVALID_ARGUMENT, c.unload_model, name)
    assert not c.is_model_ready(name)
    assert all(m.name in ("add_sub", "identity_fp32") for m in c.get_model_repository_index().models)
    assert explicit.app.repository.loaded() == []


def test_symlink_leaving_the_repository_is_refused(
    repo: Path, explicit_client: grpcclient.InferenceServerClient, tmp_path: Path
) -> None:
    (repo / "linked").symlink_to(tmp_path / "outside", target_is_directory=True)
    message = _error(grpc.StatusCode.INVALID_ARGUMENT, explicit_client.load_model, "linked")
    assert "leaves the model repository" in message
    assert not explicit_client.is_model_ready("linked")
    assert ("linked", "") not in _index(explicit_client)


def test_load_with_config_override(explicit_client: grpcclient.InferenceServerClient) -> None:
    c = explicit_client
    override = {
        "max_batch_size": 2,
        "instance_group": [{"kind": "KIND_CPU", "count": 2}],
        "parameters": {"intra_op_thread_count": {"string_value": "1"}},
    }
    c.load_model("identity_fp32", config=json.dumps(override))
    config = c.get_model_config("identity_fp32").config
    assert config.max_batch_size == 2
    assert [(g.kind, g.count) for g in config.instance_group] == [(triton_mc.ModelInstanceGroup.KIND_CPU, 2)]
    assert config.parameters["intra_op_thread_count"].string_value == "1"
    np.testing.assert_array_equal(_infer(c, "identity_fp32", np.ones((2, 4), np.float32)), np.ones((2, 4)))
    message = _error(grpc.StatusCode.INVALID_ARGUMENT, _infer, c, "identity_fp32", np.ones((3, 4), np.float32))
    assert "max_batch_size" in message

    # Loading again without the override goes back to config.pbtxt (here: none, so auto-complete).
    c.load_model("identity_fp32")
    assert c.get_model_config("identity_fp32").config.max_batch_size == 4


@pytest.mark.parametrize(
    ("config", "code", "fragment"),
    [
        pytest.param("{not json", grpc.StatusCode.INVALID_ARGUMENT, "not a valid ModelConfig", id="not-json"),
        pytest.param(
            json.dumps({"name": "someone_else"}), grpc.StatusCode.UNAVAILABLE, "'someone_else'", id="wrong-name"
        ),
        pytest.param(
            json.dumps({"backend": "pytorch"}), grpc.StatusCode.UNAVAILABLE, "unsupported backend", id="bad-backend"
        ),
    ],
)
def test_bad_config_override_is_refused(
    explicit_client: grpcclient.InferenceServerClient, config: str, code: grpc.StatusCode, fragment: str
) -> None:
    message = _error(code, explicit_client.load_model, "identity_fp32", config=config)
    assert fragment in message
    assert not explicit_client.is_model_ready("identity_fp32")


def test_load_with_model_files_sent_in_the_request(
    explicit: ServerThread, explicit_client: grpcclient.InferenceServerClient, tmp_path: Path
) -> None:
    """tritonclient's load_model(files=...), as Triton: the files are the model directory to load from, the model
    need not be in the repository, and a later load without files goes back to the repository's."""
    c = explicit_client
    staged_before = set(Path(tempfile.gettempdir()).glob("tensorgate-load-*"))
    scale_model(tmp_path / "five" / "model.onnx", 5.0)
    scale_model(tmp_path / "six" / "model.onnx", 6.0)
    model = (tmp_path / "five" / "model.onnx").read_bytes()
    config = json.dumps({"max_batch_size": 4})
    c.load_model("uploaded", config=config, files={"file:1/model.onnx": model, "file:notes.txt": b"kept aside"})
    assert _infer(c, "uploaded", ROW).tolist() == (ROW * 5).tolist()
    assert c.get_model_config("uploaded").config.max_batch_size == 4
    assert set(Path(tempfile.gettempdir()).glob("tensorgate-load-*")) == staged_before  # removed after the load
    # Over a model of the repository; its own files come back with a load that sends none.
    c.load_model(
        "identity_fp32", config=config, files={"file:1/model.onnx": (tmp_path / "six" / "model.onnx").read_bytes()}
    )
    assert _infer(c, "identity_fp32", ROW).tolist() == (ROW * 6).tolist()
    c.load_model("identity_fp32")
    assert _infer(c, "identity_fp32", ROW).tolist() == ROW.tolist()
    c.unload_model("uploaded")
    assert not c.is_model_ready("uploaded")


OUTSIDE = "is not a path inside the model directory"


@pytest.mark.parametrize(
    ("files", "config", "fragment"),
    [
        pytest.param(
            {"file:../escape/model.onnx": b"x"}, "{}", "is not a path inside the model directory", id="dotdot"
        ),
        pytest.param({"file:/etc/model.onnx": b"x"}, "{}", "is not a path inside the model directory", id="absolute"),
        pytest.param({"file:1//model.onnx": b"x"}, "{}", "is not a path inside the model directory", id="empty-part"),
        pytest.param({"file:1/model.onnx": b"x"}, None, "need the 'config' parameter too", id="no-config"),
    ],
)
def test_model_files_that_cannot_be_loaded_are_refused(
    explicit: ServerThread,
    explicit_client: grpcclient.InferenceServerClient,
    files: dict[str, bytes],
    config: str | None,
    fragment: str,
) -> None:
    message = _error(
        grpc.StatusCode.INVALID_ARGUMENT, explicit_client.load_model, "uploaded", config=config, files=files
    )
    assert fragment in message
    with grpc.insecure_channel(explicit.address) as channel:
        request = pb.RepositoryModelLoadRequest(model_name="uploaded")
        request.parameters["config"].string_param = "{}"
        request.parameters["file:1/model.onnx"].string_param = "not bytes"
        with pytest.raises(grpc.RpcError) as info:
            GRPCInferenceServiceStub(channel).RepositoryModelLoad(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must carry the file's content as bytes_param" in (info.value.details() or "")
    # A file that is no model fails the load with the reason, as one in the repository would.
    bad = _error(
        grpc.StatusCode.UNAVAILABLE,
        explicit_client.load_model,
        "uploaded",
        config="{}",
        files={"file:1/model.onnx": b"no"},
    )
    assert "onnxruntime could not load" in bad


def test_load_model_star_loads_everything(repo: Path) -> None:
    with ServerThread(repo, model_control_mode="explicit", load_model=["*"]) as s:
        c = grpcclient.InferenceServerClient(s.address)
        try:
            assert c.is_server_ready()
            assert c.is_model_ready("add_sub")
            assert c.is_model_ready("identity_fp32")
            assert _index(c) == {("add_sub", "1"): ("READY", ""), ("identity_fp32", "1"): ("READY", "")}
        finally:
            c.close()


def test_repository_index_ready_filter(repo: Path) -> None:
    identity_model(repo / "broken" / "1" / "model.onnx", "FP32")
    _config(repo, "broken", 'backend: "python"\n')
    identity_model(repo / "unloaded" / "1" / "model.onnx", "FP32")
    with ServerThread(repo, model_control_mode="explicit", load_model=["add_sub", "broken", "unloaded"]) as s:
        c = grpcclient.InferenceServerClient(s.address)
        try:
            c.unload_model("unloaded")
            everything = _index(c)
            assert set(everything) == {
                ("add_sub", "1"),
                ("broken", ""),
                ("identity_fp32", ""),
                ("unloaded", "1"),  # the version it served, as Triton lists an unloaded model's
            }
            assert everything[("broken", "")][0] == "UNAVAILABLE"
            with grpc.insecure_channel(s.address) as channel:
                stub = GRPCInferenceServiceStub(channel)
                ready = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=10)
                assert [(m.name, m.version, m.state) for m in ready.models] == [("add_sub", "1", "READY")]
                with pytest.raises(grpc.RpcError) as info:
                    stub.RepositoryIndex(pb.RepositoryIndexRequest(repository_name="elsewhere"), timeout=10)
                assert info.value.code() == grpc.StatusCode.NOT_FOUND
        finally:
            c.close()


# ----- one model failing does not take the others down --------------------------------------------------------


def test_failed_model_is_unavailable_while_others_serve(repo: Path) -> None:
    identity_model(repo / "broken" / "1" / "model.onnx", "FP32")
    _config(repo, "broken", 'name: "broken"\nmax_batch_size: 4\ninput [ { name: "INPUT0" data_type: TYPE_BOOL } ]\n')
    with ServerThread(repo) as s:
        c = grpcclient.InferenceServerClient(s.address)
        try:
            assert c.is_server_live()
            assert not c.is_server_ready()  # strict readiness: a model that should serve does not
            assert not c.is_model_ready("broken")
            message = _error(grpc.StatusCode.UNAVAILABLE, _infer, c, "broken", ROW)
            assert "TYPE_BOOL in config but TYPE_FP32 in the model" in message
            _assert_failed_in_index(c, "broken", "TYPE_BOOL in config")
            # Its statistics say why there are none, instead of an empty answer.
            message = _error(grpc.StatusCode.UNAVAILABLE, c.get_inference_statistics, "broken")
            assert "TYPE_BOOL in config" in message

            assert c.is_model_ready("identity_fp32")
            np.testing.assert_array_equal(_infer(c, "identity_fp32", ROW), ROW)
            x = np.ones((1, 16), dtype=np.float32)
            inputs = [grpcclient.InferInput(n, [1, 16], "FP32") for n in ("INPUT0", "INPUT1")]
            for inp in inputs:
                inp.set_data_from_numpy(x)
            np.testing.assert_array_equal(c.infer("add_sub", inputs).as_numpy("OUTPUT0"), x + x)
        finally:
            c.close()


# ----- loads that go wrong in unusual ways -----------------------------------------------------------------------


def test_a_model_of_an_unservable_type_fails_alone(repo: Path) -> None:
    """FP8 has no V2 datatype: the model fails its load with the tensor named, and the server starts and serves
    the rest (it used to stop the whole start with a KeyError)."""
    cast_model(repo / "fp8" / "1" / "model.onnx", TensorProto.FLOAT8E4M3FN, opset=19)
    with ServerThread(repo) as s:
        c = grpcclient.InferenceServerClient(s.address)
        try:
            assert c.is_model_ready("identity_fp32")
            assert not c.is_model_ready("fp8")
            _assert_failed_in_index(c, "fp8", "tensor 'OUTPUT0' has a type tensorgate cannot serve")
        finally:
            c.close()


def test_a_load_whose_caller_gives_up_still_completes(repo: Path) -> None:
    """A client deadline on RepositoryModelLoad must not leave the model LOADING with the finished load lost."""
    slow_model(repo / "slow" / "1" / "model.onnx")
    _config(
        repo,
        "slow",
        """
        max_batch_size: 64
        model_warmup [ { name: "long" batch_size: 64 count: 400
          inputs { key: "INPUT0" value: { data_type: TYPE_FP32 dims: [ 512 ] random_data: true } } } ]
        """,
    )
    with ServerThread(repo, model_control_mode="explicit", load_model=[]) as s:
        c = grpcclient.InferenceServerClient(s.address)
        try:
            # Connected first, and 0.5 s (0.05 s on a new connection was gone, on a loaded machine, before the load
            # began): a deadline that passes while the warm-up (300 GFLOP: seconds) runs.
            assert c.is_server_live()
            with pytest.raises(InferenceServerException) as info:
                c.load_model("slow", client_timeout=0.5)
            assert info.value.status() == str(grpc.StatusCode.DEADLINE_EXCEEDED)
            deadline = time.monotonic() + 60
            while not c.is_model_ready("slow") and time.monotonic() < deadline:
                time.sleep(0.1)
            assert c.is_model_ready("slow")
            assert _index(c)[("slow", "1")] == ("READY", "")
            assert c.is_server_ready()
        finally:
            c.close()


def test_a_new_failure_replaces_the_old_reason(repo: Path) -> None:
    """A model that failed for one reason and then for another shows the new one everywhere."""
    model_dir = repo / "flaky"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "model.onnx").write_bytes(b"not an onnx model")
    with ServerThread(repo, model_control_mode="explicit", load_model=[]) as s:
        c = grpcclient.InferenceServerClient(s.address)
        try:
            _error(grpc.StatusCode.UNAVAILABLE, c.load_model, "flaky")
            identity_model(model_dir / "1" / "model.onnx", "FP32")
            _config(repo, "flaky", "bogus_field: 1\n")
            message = _error(grpc.StatusCode.UNAVAILABLE, c.load_model, "flaky")
            assert "bogus_field" in message
            _assert_failed_in_index(c, "flaky", "bogus_field")
        finally:
            c.close()


def test_max_batch_size_is_read_as_protobuf_reads_the_config(repo: Path) -> None:
    """`# max_batch_size: 16` is a comment: that config leaves max_batch_size out, and auto-complete fills it.
    A string holding a line separator other than newline does not hide a written `max_batch_size: 0`."""
    identity_model(repo / "commented" / "1" / "model.onnx", "FP32")
    _config(repo, "commented", "# max_batch_size: 16\n")
    identity_model(repo / "separator" / "1" / "model.onnx", "FP32")
    _config(repo, "separator", 'parameters { key: "note" value: { string_value: "a\u2028{" } }\nmax_batch_size: 0\n')
    with ServerThread(repo) as s:
        c = grpcclient.InferenceServerClient(s.address)
        try:
            assert c.get_model_config("commented").config.max_batch_size == 4
            separator = c.get_model_config("separator").config
            assert separator.max_batch_size == 0
            assert list(separator.input[0].dims) == [-1, 4]
        finally:
            c.close()


def test_a_config_override_may_say_max_batch_size_0(explicit_client: grpcclient.InferenceServerClient) -> None:
    """Written as 0 on purpose (no batch dimension); text format would drop the 0 and auto-complete make it 4."""
    explicit_client.load_model("identity_fp32", config=json.dumps({"max_batch_size": 0}))
    config = explicit_client.get_model_config("identity_fp32").config
    assert config.max_batch_size == 0
    assert list(config.input[0].dims) == [-1, 4]


def test_a_mistyped_load_model_stops_the_start(repo: Path) -> None:
    settings = ServerSettings(model_repository=repo, model_control_mode="explicit", load_model=["add_sbu"], grpc_port=0)
    with pytest.raises(FileNotFoundError) as info:
        asyncio.run(TensorgateServer(settings).start())
    assert "'add_sbu'" in str(info.value)
    assert "add_sub, identity_fp32" in str(info.value)


def test_negative_default_max_batch_size_is_refused(repo: Path) -> None:
    with pytest.raises(ValueError, match="default_max_batch_size"):
        ServerSettings(model_repository=repo, default_max_batch_size=-1)


def test_files_staged_for_a_load_are_removed_whatever_happens(
    explicit: ServerThread, explicit_client: grpcclient.InferenceServerClient, tmp_path: Path
) -> None:
    """A caller that goes away while its files are being written, a file the file system refuses, and a default
    model file name that would leave the version directory: nothing stays behind in the temporary directory."""
    staged_before = set(Path(tempfile.gettempdir()).glob("tensorgate-load-*"))
    scale_model(tmp_path / "m" / "model.onnx", 2.0)
    files = {"1/model.onnx": (tmp_path / "m" / "model.onnx").read_bytes()}
    files.update({f"junk/{i // 100}/{i}": b"x" for i in range(3000)})

    async def give_up_at_once() -> None:
        task = asyncio.ensure_future(explicit.app.repository.load("big", "max_batch_size: 4\n", files))
        await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for _ in range(600):  # the load goes on in a task of its own: wait for it (bounded)
            if not explicit.app.repository._loading:  # noqa: SLF001
                return
            await asyncio.sleep(0.05)

    explicit.run(give_up_at_once())
    assert explicit_client.is_model_ready("big")
    assert set(Path(tempfile.gettempdir()).glob("tensorgate-load-*")) == staged_before

    load = explicit_client.load_model
    clash = {"file:1": b"a file", "file:1/model.onnx": files["1/model.onnx"]}
    assert "cannot be written" in _error(grpc.StatusCode.INVALID_ARGUMENT, load, "clash", config="{}", files=clash)
    outside = json.dumps({"default_model_filename": "../../../../etc/passwd"})
    message = _error(grpc.StatusCode.UNAVAILABLE, load, "sneaky", config=outside, files={"file:1/x": b""})
    assert "default_model_filename must be a file name" in message
    assert set(Path(tempfile.gettempdir()).glob("tensorgate-load-*")) == staged_before


def test_symlink_inside_the_repository_serves_under_its_own_name(
    repo: Path, explicit_client: grpcclient.InferenceServerClient
) -> None:
    """A directory linked to another model's (an alias, as Triton serves one) is the model its link names: the
    target's name would make metadata, statistics and errors name a model the caller did not ask for."""
    (repo / "alias").symlink_to(repo / "identity_fp32", target_is_directory=True)
    c = explicit_client
    c.load_model("alias")
    assert c.get_model_metadata("alias").name == "alias"
    assert c.get_model_config("alias").config.name == "alias"
    np.testing.assert_array_equal(_infer(c, "alias", np.ones((2, 4), np.float32)), np.ones((2, 4)))
    assert not c.is_model_ready("identity_fp32")
    assert [s.name for s in c.get_inference_statistics("alias").model_stats] == ["alias"]
    assert _index(explicit_client)[("alias", "1")] == ("READY", "")


def test_config_linked_out_of_the_model_directory_is_refused(
    repo: Path, explicit_client: grpcclient.InferenceServerClient, tmp_path: Path
) -> None:
    """A parse error quotes the file it read: a config.pbtxt linked to a file elsewhere would show it to a caller."""
    secret = tmp_path / "secret.txt"
    secret.write_text("password: hunter2\n")
    (repo / "identity_fp32" / "config.pbtxt").symlink_to(secret)
    message = _error(grpc.StatusCode.UNAVAILABLE, explicit_client.load_model, "identity_fp32")
    assert "config.pbtxt leaves the model's directory" in message
    assert "hunter2" not in message and "password" not in message


# ----- stop, twice -------------------------------------------------------------------------------------------------


def test_a_second_stop_returns_at_once_with_the_store_closed(tmp_path: Path) -> None:
    """With --data-dir, a second stop() (an embedder's cleanup after its signal handler's) raised
    sqlite3.ProgrammingError: the prediction store was closed again."""
    repo = tmp_path / "models"
    identity_model(repo / "identity_fp32" / "1" / "model.onnx", "FP32")
    with ServerThread(repo, data_dir=tmp_path / "data") as server:
        store = server.app.store
        assert store is not None
        server.run(server.app.stop(grace=1.0))
        server.run(server.app.stop(grace=1.0))  # and ServerThread's exit stops it a third time
    store.close()
