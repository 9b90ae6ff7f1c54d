"""Files a config names inside a model's directory: one rule (server/repository/paths.py) for every one of them.

A relative path that cannot climb (no `..`, not absolute), whose target, symlinks followed, stays inside: label
files, warm-up files, sequence initial states, TensorRT cache paths, config.pbtxt itself and the model file. Each
kind is served from one real repository, with a link out and a `..` path for each; every refusal fails that model's
load with its own reason, and the server goes on serving the rest.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tensorgate.server.repository.paths import inside, relative_path, within
from tests.onnx_models import accumulator_config, accumulator_model, scale_model, write_config
from tests.serving import ServerThread

# ----- the rule --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("labels.txt", "labels.txt", id="name"),
        pytest.param("batches/8.bin", "batches/8.bin", id="sub-folder"),
        pytest.param("./labels.txt", "labels.txt", id="dot"),
        pytest.param("../labels.txt", None, id="dotdot"),
        pytest.param("a/../../labels.txt", None, id="dotdot-inside"),
        pytest.param("a/../labels.txt", None, id="dotdot-that-would-stay"),
        pytest.param("/etc/passwd", None, id="absolute"),
        pytest.param("", None, id="empty"),
        pytest.param(".", None, id="only-dot"),
        pytest.param("a\0b", None, id="nul"),
    ],
)
def test_a_relative_path_is_one_that_cannot_climb(text: str, expected: str | None) -> None:
    assert relative_path(text) == (None if expected is None else PurePosixPath(expected))


def test_links_are_followed_before_the_path_is_taken(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    (model_dir / "warmup").mkdir(parents=True)
    (model_dir / "data.bin").write_bytes(b"x")
    (tmp_path / "outside.bin").write_bytes(b"x")
    (model_dir / "warmup" / "in.bin").symlink_to(model_dir / "data.bin")
    (model_dir / "warmup" / "out.bin").symlink_to(tmp_path / "outside.bin")
    (model_dir / "loop").symlink_to(model_dir / "loop")
    warmup = model_dir / "warmup"
    assert inside(warmup, "in.bin", root=model_dir) == warmup / "in.bin"
    assert inside(warmup, "in.bin") is None  # its target is outside warmup/ itself
    assert inside(warmup, "out.bin", root=model_dir) is None
    assert inside(model_dir, "loop") is None
    assert inside(model_dir, "missing.txt") == model_dir / "missing.txt"  # existence is the caller's question
    assert within(model_dir / "data.bin", model_dir) and not within(tmp_path / "outside.bin", model_dir)


# ----- every caller ----------------------------------------------------------------------------------------------

SCALE = """
backend: "onnxruntime"
max_batch_size: 4
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] {label} }} ]
{extra}
"""
WARMUP = """model_warmup [ {{ name: "sample" batch_size: 1
  inputs {{ key: "INPUT0" value: {{ data_type: TYPE_FP32 dims: [ 4 ] input_data_file: "{file}" }} }} }} ]"""
TENSORRT = """optimization {{ execution_accelerators {{ gpu_execution_accelerator [ {{ name: "tensorrt"
  parameters {{ key: "trt_engine_cache_path" value: "{path}" }} }} ] }} }}"""
STATE = 'dims: [ 1 ] initial_state {{ data_type: TYPE_FP32 dims: [ 1 ] data_file: "{file}" }} }}'

LABEL_OUT = "label_filename '{}' of output 'OUTPUT0' is outside the model directory"
WARMUP_OUT = "input_data_file '{}' leaves the model's directory"
TRT_OUT = "'trt_engine_cache_path' must be a relative path inside the model's directory"
STATE_OUT = "initial_state data_file '{}' is not a file in initial_state/"

CASES = {
    # label_filename
    "label_link": (SCALE.format(label='label_filename: "labels.txt"', extra=""), LABEL_OUT.format("labels.txt")),
    "label_dotdot": (
        SCALE.format(label='label_filename: "../outside.txt"', extra=""),
        LABEL_OUT.format("../outside.txt"),
    ),
    "label_dotdot_inside": (
        SCALE.format(label='label_filename: "1/../labels.txt"', extra=""),
        LABEL_OUT.format("1/../labels.txt"),
    ),
    # model_warmup's input_data_file
    "warm_link": (SCALE.format(label="", extra=WARMUP.format(file="in.bin")), WARMUP_OUT.format("in.bin")),
    "warm_dotdot": (SCALE.format(label="", extra=WARMUP.format(file="../in.bin")), WARMUP_OUT.format("../in.bin")),
    "warm_absolute": (
        SCALE.format(label="", extra=WARMUP.format(file="/etc/hostname")),
        WARMUP_OUT.format("/etc/hostname"),
    ),
    # a TensorRT path parameter (checked on every machine)
    "trt_link": (SCALE.format(label="", extra=TENSORRT.format(path="cache")), TRT_OUT),
    "trt_dotdot": (SCALE.format(label="", extra=TENSORRT.format(path="../cache")), TRT_OUT),
    # a sequence state's initial_state data_file
    "state_link": (
        accumulator_config("state_link").replace("dims: [ 1 ] }", STATE.format(file="in.bin")),
        STATE_OUT.format("in.bin"),
    ),
    "state_dotdot": (
        accumulator_config("state_dotdot").replace("dims: [ 1 ] }", STATE.format(file="../in.bin")),
        STATE_OUT.format("../in.bin"),
    ),
    # config.pbtxt and the model file
    "config_link": ("", "config.pbtxt leaves the model's directory"),
    "model_link": ("", "model_link/1/model.onnx resolves outside the model repository"),
    "model_dotdot": ('backend: "onnxruntime"\ndefault_model_filename: "../model.onnx"\n', "must be a file name"),
}


def _repository(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    outside = tmp_path / "outside"
    (outside / "cache").mkdir(parents=True)
    for name in ("labels.txt", "in.bin", "config.pbtxt"):
        (outside / name).write_bytes(b"cat\n" if name == "labels.txt" else bytes(16))
    (outside / "config.pbtxt").write_text(SCALE.format(label="", extra=""))
    scale_model(outside / "model.onnx", 2.0)
    for name, (config, _) in CASES.items():
        if name.startswith("state_"):
            accumulator_model(root / name / "1" / "model.onnx")
            (root / name / "1" / "initial_state").mkdir()
            (root / name / "1" / "in.bin").write_bytes(bytes(4))  # what "../in.bin" would reach
        elif name != "model_link":
            scale_model(root / name / "1" / "model.onnx", 2.0)
        if config:
            write_config(root, name, config)
        (root / name / "warmup").mkdir(parents=True)
        (root / name / "in.bin").write_bytes(bytes(16))  # what "../in.bin" under warmup/ would reach
    (root / "outside.txt").write_text("cat\n")  # what "../outside.txt" would reach, were it taken
    (root / "label_link" / "labels.txt").symlink_to(outside / "labels.txt")
    (root / "label_dotdot_inside" / "labels.txt").write_text("cat\n")  # inside, but named with `..`
    (root / "warm_link" / "warmup" / "in.bin").symlink_to(outside / "in.bin")
    (root / "trt_link" / "cache").symlink_to(outside / "cache")
    (root / "state_link" / "1" / "initial_state" / "in.bin").symlink_to(outside / "in.bin")
    (root / "config_link" / "config.pbtxt").symlink_to(outside / "config.pbtxt")
    (root / "model_link" / "1").mkdir(parents=True)
    (root / "model_link" / "1" / "model.onnx").symlink_to(outside / "model.onnx")
    # The same kinds of file, inside: served.
    scale_model(root / "inside" / "1" / "model.onnx", 2.0)
    warmup = WARMUP.format(file="batches/in.bin")
    write_config(root, "inside", SCALE.format(label='label_filename: "labels/animals.txt"', extra=warmup))
    (root / "inside" / "labels").mkdir()
    (root / "inside" / "labels" / "animals.txt").write_text("cat\ndog\nemu\nyak\n")
    (root / "inside" / "warmup" / "batches").mkdir(parents=True)
    (root / "inside" / "warmup" / "batches" / "in.bin").write_bytes(bytes(16))
    return root


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[grpcclient.InferenceServerClient]:
    with ServerThread(_repository(tmp_path_factory.mktemp("paths"))) as s:
        client = grpcclient.InferenceServerClient(s.address)
        try:
            yield client
        finally:
            client.close()


@pytest.fixture(scope="module")
def reasons(served: grpcclient.InferenceServerClient) -> dict[str, tuple[str, str]]:
    return {m.name: (m.state, m.reason) for m in served.get_model_repository_index().models}


@pytest.mark.parametrize(("model", "fragment"), [pytest.param(m, f, id=m) for m, (_, f) in CASES.items()])
def test_a_file_named_outside_the_model_directory_fails_its_load(
    reasons: dict[str, tuple[str, str]], model: str, fragment: str
) -> None:
    state, reason = reasons[model]
    assert state == "UNAVAILABLE" and fragment in reason, reason


def test_files_in_sub_folders_of_the_model_directory_are_taken(
    served: grpcclient.InferenceServerClient, reasons: dict[str, tuple[str, str]]
) -> None:
    """A label file under labels/, a warm-up file under warmup/batches/: the classification names its label."""
    assert reasons["inside"] == ("READY", "")
    inp = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
    inp.set_data_from_numpy(np.arange(1, 5, dtype=np.float32).reshape(1, 4))
    out = grpcclient.InferRequestedOutput("OUTPUT0", class_count=1)
    (top,) = served.infer("inside", [inp], outputs=[out]).as_numpy("OUTPUT0").reshape(-1)
    assert top.decode().endswith(":3:yak")
