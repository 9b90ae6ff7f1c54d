"""Triton's onnxruntime backend settings beyond threads and graph level: execution mode, memory, CUDA provider
options, execution accelerators, and instance groups that ask for more places than a model's one session.

CPU settings are read back from real sessions built with the options the backend makes. CUDA, TensorRT and
OpenVINO options are tested up to the provider options the backend asks ONNX Runtime for, since this build has
none of them; what happens without them is the real fallback of this build.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf import text_format
from tritonclient.utils import InferenceServerException

from tensorgate.protos import model_config_pb2 as mc
from tensorgate.server.backends.onnx import (
    CPU,
    CUDA,
    OPENVINO,
    TENSORRT,
    OnnxBackend,
    choose_providers,
    cuda_options,
    execution_accelerators,
    instance_group_warning,
    model_dir_of,
    place_instance_groups,
    session_group,
    session_options,
)
from tensorgate.server.errors import ModelLoadError
from tests.onnx_models import identity_model, write_config
from tests.serving import ServerThread

KIND = mc.ModelInstanceGroup
BACKEND_LOGGER = "tensorgate.server.backends.onnx"


def _config(text: str = "", name: str = "tuned") -> mc.ModelConfig:
    config = text_format.Parse(text, mc.ModelConfig())
    config.name = name
    return config


def _params(params: dict[str, str]) -> str:
    return "".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}\n' for k, v in params.items())


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == BACKEND_LOGGER]


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    return identity_model(tmp_path / "tuned" / "1" / "model.onnx", "FP32")


def _runs(backend: OnnxBackend) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(backend.execute({"INPUT0": x}, ["OUTPUT0"])["OUTPUT0"], x)


# ----- session options, read back from a real session -------------------------------------------------------------


def test_triton_session_keys_reach_the_session(model_file: Path) -> None:
    config = _config(
        _params(
            {
                "execution_mode": "1",
                "inter_op_thread_count": "2",
                "enable_mem_arena": "0",
                "enable_mem_pattern": "off",
                "session.use_device_allocator_for_initializers": "true",
            }
        )
    )
    session = ort.InferenceSession(str(model_file), session_options(config), providers=[CPU])
    opts = session.get_session_options()
    assert opts.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    assert opts.inter_op_num_threads == 2
    assert opts.enable_cpu_mem_arena is False
    assert opts.enable_mem_pattern is False
    assert opts.get_session_config_entry("session.use_device_allocator_for_initializers") == "1"


def test_unset_keys_keep_onnxruntime_defaults(model_file: Path) -> None:
    defaults = ort.SessionOptions()
    opts = ort.InferenceSession(str(model_file), session_options(_config()), providers=[CPU]).get_session_options()
    assert opts.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert (opts.enable_cpu_mem_arena, opts.enable_mem_pattern) == (
        defaults.enable_cpu_mem_arena,
        defaults.enable_mem_pattern,
    )


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        pytest.param("execution_mode", "7", "expected values for execution_mode are 0 or 1", id="mode-7"),
        pytest.param("execution_mode", "parallel", "expected values for execution_mode are 0 or 1", id="mode-word"),
        pytest.param("enable_mem_arena", "maybe", "parameter 'enable_mem_arena' must be true or false", id="arena"),
        pytest.param("enable_mem_pattern", "2", "parameter 'enable_mem_pattern' must be true or false", id="pattern"),
        pytest.param(
            "session.use_device_allocator_for_initializers",
            "yes please",
            "parameter 'session.use_device_allocator_for_initializers' must be true or false",
            id="device-allocator",
        ),
    ],
)
def test_values_triton_refuses_fail_the_load(key: str, value: str, needle: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        session_options(_config(_params({key: value})))
    assert needle in info.value.message
    assert f"'{value}'" in info.value.message
    assert "'tuned'" in str(info.value)


def test_inter_op_threads_without_parallel_mode_are_said_to_do_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=BACKEND_LOGGER)
    session_options(_config(_params({"inter_op_thread_count": "4"})))
    (message,) = _warnings(caplog)
    assert "'tuned'" in message and "inter_op_thread_count" in message and "execution_mode 1" in message
    caplog.clear()
    session_options(_config(_params({"inter_op_thread_count": "4", "execution_mode": "1"})))
    assert _warnings(caplog) == []


def test_a_bad_setting_fails_the_load_over_the_wire(tmp_path: Path) -> None:
    root = tmp_path / "models"
    identity_model(root / "accel" / "1" / "model.onnx", "FP32")
    write_config(root, "accel", "max_batch_size: 8\n" + _params({"execution_mode": "7"}))
    with ServerThread(root, model_control_mode="explicit", load_model=[]) as s:
        client = grpcclient.InferenceServerClient(s.address)
        try:
            with pytest.raises(InferenceServerException) as info:
                client.load_model("accel")
            assert info.value.status() == str(grpc.StatusCode.UNAVAILABLE)
            assert "execution_mode are 0 or 1" in str(info.value.message())
            assert "'accel'" in str(info.value.message())
        finally:
            client.close()


# ----- memory.enable_memory_arena_shrinkage (run options) --------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "dropped"),
    [
        pytest.param({"memory.enable_memory_arena_shrinkage": "cpu:0"}, None, id="cpu-arena"),
        pytest.param({"memory.enable_memory_arena_shrinkage": "cpu:0;gpu:0"}, "gpu:0", id="gpu-arena-on-cpu"),
        pytest.param(
            {"memory.enable_memory_arena_shrinkage": "cpu:0", "enable_mem_arena": "0"}, "cpu:0", id="arena-off"
        ),
    ],
)
def test_arena_shrinkage_keeps_only_arenas_the_session_has(
    model_file: Path, caplog: pytest.LogCaptureFixture, params: dict[str, str], dropped: str | None
) -> None:
    """ONNX Runtime fails every run over an arena the session lacks; such an entry is left out, with a warning."""
    caplog.set_level(logging.WARNING, logger=BACKEND_LOGGER)
    backend = OnnxBackend(model_file, _config(_params(params)), version=1)
    try:
        _runs(backend)
        _runs(backend)
    finally:
        backend.close()
    warnings = _warnings(caplog)
    if dropped is None:
        assert warnings == []
    else:
        (message,) = warnings
        assert "'tuned'" in message and "memory.enable_memory_arena_shrinkage" in message and dropped in message


@pytest.mark.parametrize("value", ["bogus", "cpu", "gpu:x", "tpu:0"])
def test_bad_arena_shrinkage_fails_the_load(model_file: Path, value: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        OnnxBackend(model_file, _config(_params({"memory.enable_memory_arena_shrinkage": value})), version=1)
    assert "memory.enable_memory_arena_shrinkage" in info.value.message
    assert f"'{value}'" in info.value.message


# ----- CUDA provider options --------------------------------------------------------------------------------------


def test_triton_cuda_keys_become_provider_options() -> None:
    config = _config(
        _params({"gpu_mem_limit": "4294967296", "arena_extend_strategy": "1", "do_copy_in_default_stream": "false"})
        + 'optimization { execution_accelerators { gpu_execution_accelerator [ { name: "cuda" '
        'parameters { key: "cudnn_conv_use_max_workspace" value: "0" } '
        'parameters { key: "use_ep_level_unified_stream" value: "true" } '
        'parameters { key: "arena_extend_strategy" value: "kNextPowerOfTwo" } '
        'parameters { key: "device_id" value: "5" } } ] } }'
    )
    options = cuda_options(config)
    assert options == {
        "gpu_mem_limit": "4294967296",
        "arena_extend_strategy": "kSameAsRequested",  # the model-level key wins, as in Triton
        "do_copy_in_default_stream": "0",
        "cudnn_conv_use_max_workspace": "0",
        "use_ep_level_unified_stream": "1",
        "cudnn_conv_algo_search": "HEURISTIC",
    }
    # The device is the instance group's, whatever the accelerator's parameters say.
    choice = choose_providers(KIND.KIND_GPU, [1], [CUDA, CPU], model="m", cuda=options)
    assert choice.providers == [(CUDA, {**options, "device_id": "1"}), CPU]


def test_the_cuda_accelerator_picks_the_conv_search_when_the_model_level_key_is_absent() -> None:
    config = _config(
        'optimization { execution_accelerators { gpu_execution_accelerator [ { name: "cuda" '
        'parameters { key: "cudnn_conv_algo_search" value: "0" } } ] } }'
    )
    assert cuda_options(config)["cudnn_conv_algo_search"] == "EXHAUSTIVE"


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        pytest.param(_params({"arena_extend_strategy": "2"}), "'arena_extend_strategy' must be 0", id="arena-2"),
        pytest.param(_params({"gpu_mem_limit": "4GB"}), "'gpu_mem_limit' must be a number of bytes", id="mem-limit"),
        pytest.param(_params({"do_copy_in_default_stream": "maybe"}), "'do_copy_in_default_stream'", id="copy-stream"),
        pytest.param(
            'optimization { execution_accelerators { gpu_execution_accelerator [ { name: "cuda" '
            'parameters { key: "gpu_external_alloc" value: "140737488355328" } } ] } }',
            "'gpu_external_alloc' is an address",
            id="pointer",
        ),
    ],
)
def test_bad_cuda_values_fail_the_load_on_a_cpu_machine(model_file: Path, params: str, needle: str) -> None:
    config = _config(params + "instance_group [ { kind: KIND_CPU } ]")
    with pytest.raises(ModelLoadError) as info:
        OnnxBackend(model_file, config, version=1)
    assert needle in info.value.message
    assert "'tuned'" in str(info.value)


# ----- execution accelerators -------------------------------------------------------------------------------------

TENSORRT_CONFIG = """
optimization { execution_accelerators { gpu_execution_accelerator [ { name: "tensorrt"
  parameters { key: "precision_mode" value: "FP16" }
  parameters { key: "max_workspace_size_bytes" value: "1073741824" }
  parameters { key: "trt_engine_cache_enable" value: "true" }
  parameters { key: "trt_engine_cache_path" value: "trt_cache" } } ] } }
"""


def test_tensorrt_parameters_become_provider_options_before_cuda(tmp_path: Path) -> None:
    accelerators = execution_accelerators(_config(TENSORRT_CONFIG), tmp_path)
    trt = {
        "trt_fp16_enable": "1",
        "trt_max_workspace_size": "1073741824",
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": str(tmp_path / "trt_cache"),
    }
    assert accelerators.tensorrt == trt
    available = [TENSORRT, CUDA, CPU]
    choice = choose_providers(KIND.KIND_GPU, [2], available, model="m", cuda={}, accelerators=accelerators)
    assert choice.providers == [(TENSORRT, {**trt, "device_id": "2"}), (CUDA, {"device_id": "2"}), CPU]
    assert choice.warning is None
    # On a CPU instance the GPU accelerators do not apply, as in Triton.
    assert choose_providers(KIND.KIND_CPU, [], available, model="m", accelerators=accelerators).providers == [CPU]


def test_openvino_goes_before_the_cpu_provider(tmp_path: Path) -> None:
    config = _config('optimization { execution_accelerators { cpu_execution_accelerator [ { name: "openvino" } ] } }')
    accelerators = execution_accelerators(config, tmp_path)
    choice = choose_providers(KIND.KIND_CPU, [], [OPENVINO, CPU], model="m", accelerators=accelerators)
    assert choice.providers == [(OPENVINO, {"device_type": "CPU"}), CPU]


@pytest.mark.parametrize(
    ("accelerator", "needle"),
    [
        pytest.param('gpu_execution_accelerator [ { name: "tensorrtt" } ]', "unknown Execution Accelerator", id="typo"),
        pytest.param('cpu_execution_accelerator [ { name: "tensorrt" } ]', "'tensorrt' is requested", id="wrong-list"),
        pytest.param(
            'gpu_execution_accelerator [ { name: "tensorrt" parameters { key: "precision_mode" value: "FP8" } } ]',
            "unsupported precision mode 'FP8'",
            id="precision",
        ),
        pytest.param(
            'gpu_execution_accelerator [ { name: "tensorrt" parameters { key: "trt_fast" value: "1" } } ]',
            "'trt_fast' is not accepted: unknown parameter",
            id="unknown-parameter",
        ),
        pytest.param(
            'gpu_execution_accelerator [ { name: "tensorrt" parameters { key: "trt_dla_core" value: "one" } } ]',
            "'trt_dla_core' must be an integer",
            id="not-an-int",
        ),
        pytest.param(
            'gpu_execution_accelerator [ { name: "tensorrt" '
            'parameters { key: "trt_engine_cache_path" value: "/var/lib/engines" } } ]',
            "must be a relative path inside the model's directory",
            id="absolute-path",
        ),
        pytest.param(
            'gpu_execution_accelerator [ { name: "tensorrt" '
            'parameters { key: "trt_timing_cache_path" value: "../../elsewhere" } } ]',
            "must be a relative path inside the model's directory",
            id="path-out",
        ),
        pytest.param(
            'gpu_execution_accelerator [ { name: "tensorrt" '
            'parameters { key: "trt_extra_plugin_lib_paths" value: "libplugin.so" } } ]',
            "it loads shared libraries",
            id="plugin-libraries",
        ),
    ],
)
def test_accelerator_settings_triton_refuses_fail_the_load(model_file: Path, accelerator: str, needle: str) -> None:
    config = _config(f"optimization {{ execution_accelerators {{ {accelerator} }} }}")
    with pytest.raises(ModelLoadError) as info:
        OnnxBackend(model_file, config, version=1)
    assert needle in info.value.message
    assert "'tuned'" in str(info.value)


def test_tensorrt_missing_from_the_build_is_said_once_and_the_model_runs(
    model_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Told CUDA is there (as an onnxruntime-gpu wheel without TensorRT would say), the model warns about the
    missing TensorRT provider naming the model, and runs on what onnxruntime has."""
    caplog.set_level(logging.WARNING, logger=BACKEND_LOGGER)
    config = _config(TENSORRT_CONFIG + "instance_group [ { kind: KIND_GPU gpus: [ 0 ] } ]")
    backend = OnnxBackend(model_file, config, version=1, available_providers=[CUDA, CPU])
    try:
        _runs(backend)
    finally:
        backend.close()
    about_trt = [m for m in _warnings(caplog) if "tensorrt" in m]
    assert len(about_trt) == 1, _warnings(caplog)
    assert "'tuned'" in about_trt[0] and TENSORRT in about_trt[0]


def test_openvino_missing_from_the_build_is_said_once_and_the_model_runs(
    model_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=BACKEND_LOGGER)
    config = _config('optimization { execution_accelerators { cpu_execution_accelerator [ { name: "openvino" } ] } }')
    backend = OnnxBackend(model_file, config, version=1)
    try:
        assert backend.execution_provider == CPU
        _runs(backend)
    finally:
        backend.close()
    (message,) = _warnings(caplog)
    assert "'tuned'" in message and "'openvino'" in message and OPENVINO in message


# ----- instance groups: one session per model version ------------------------------------------------------------


def _groups(text: str) -> list[mc.ModelInstanceGroup]:
    return list(_config(text).instance_group)


MIXED = "instance_group [ { kind: KIND_CPU count: 1 }, { kind: KIND_GPU count: 2 gpus: [ 0, 1 ] } ]"


@pytest.mark.parametrize(
    ("text", "available", "kind"),
    [
        pytest.param(MIXED, [CUDA, CPU], KIND.KIND_GPU, id="gpu-group-wins-with-cuda"),
        pytest.param(MIXED, [CPU], KIND.KIND_GPU, id="gpu-group-wins-without-cuda-and-warns"),
        pytest.param(
            "instance_group [ { kind: KIND_CPU }, { kind: KIND_AUTO } ]", [CPU], KIND.KIND_CPU, id="auto-no-cuda"
        ),
        pytest.param(
            "instance_group [ { kind: KIND_CPU }, { kind: KIND_AUTO } ]", [CUDA, CPU], KIND.KIND_AUTO, id="auto-cuda"
        ),
        pytest.param("", [CUDA, CPU], KIND.KIND_AUTO, id="none"),
    ],
)
def test_the_session_takes_the_first_group_that_can_have_a_gpu(text: str, available: list[str], kind: int) -> None:
    assert session_group(_groups(text), available).kind == kind


def test_mixed_groups_run_on_the_cpu_and_the_config_says_so(model_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=BACKEND_LOGGER)
    config = _config(MIXED)
    backend = OnnxBackend(model_file, config, version=1, available_providers=[CPU])
    try:
        assert backend.execution_provider == CPU
        _runs(backend)
        backend.place_instance_groups(config)
    finally:
        backend.close()
    (message,) = _warnings(caplog)
    assert "'tuned'" in message and "KIND_GPU" in message
    assert [(g.kind, g.count, list(g.gpus)) for g in config.instance_group] == [
        (KIND.KIND_CPU, 1, []),
        (KIND.KIND_CPU, 2, []),
    ]


def test_groups_on_a_gpu_read_that_gpu() -> None:
    groups = _groups(MIXED + "\ninstance_group [ { kind: KIND_AUTO } ]")
    place_instance_groups(groups, 1)
    assert [(g.kind, g.count, list(g.gpus)) for g in groups] == [
        (KIND.KIND_GPU, 1, [1]),
        (KIND.KIND_GPU, 2, [1]),
        (KIND.KIND_GPU, 0, [1]),
    ]


def test_groups_asking_for_more_than_the_sessions_gpu_are_warned_about() -> None:
    message = instance_group_warning(_groups(MIXED), model="tuned", device=0)
    assert message is not None
    assert "'tuned'" in message
    assert "KIND_CPU, KIND_GPU on GPUs [0, 1]" in message
    assert "all 3 instances run on GPU 0" in message
    one_gpu = _groups("instance_group [ { kind: KIND_GPU count: 2 gpus: [ 0 ] }, { kind: KIND_AUTO } ]")
    assert instance_group_warning(one_gpu, model="tuned", device=0) is None
    assert instance_group_warning(_groups(MIXED), model="tuned", device=None) is None


def test_the_served_config_says_where_mixed_groups_run(tmp_path: Path) -> None:
    """Over the wire: ModelConfig of a model whose groups ask for the CPU and two GPUs, served on a machine where
    it runs on the CPU, says KIND_CPU without gpus for every group (it used to keep `gpus: [0, 1]`)."""
    repo = tmp_path / "models"
    identity_model(repo / "mixed" / "1" / "model.onnx", "FP32")
    write_config(
        repo,
        "mixed",
        "instance_group [ { kind: KIND_CPU count: 1 }, { kind: KIND_GPU count: 2 gpus: [ 0, 1 ] } ]\n",
    )
    with ServerThread(repo) as s:
        client = grpcclient.InferenceServerClient(s.address)
        try:
            served = client.get_model_config("mixed").config
        finally:
            client.close()
    assert [(g.kind, g.count, list(g.gpus)) for g in served.instance_group] == [
        (KIND.KIND_CPU, 1, []),
        (KIND.KIND_CPU, 2, []),
    ]


def test_the_model_directory_of_a_model_kept_as_a_directory() -> None:
    """TensorRT's cache paths are taken inside the model's directory, and load errors name files from it: for a
    model kept as a directory (`1/model.onnx/model.onnx`) that is still the model's, not its version's."""
    assert model_dir_of(Path("/repo/m/1/model.onnx")) == Path("/repo/m")
    assert model_dir_of(Path("/repo/m/1/model.onnx/model.onnx")) == Path("/repo/m")
