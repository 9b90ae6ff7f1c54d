"""`model_warmup` samples read from files as Triton reads them: a file holds ONE instance of the tensor (no batch
dimension), repeated `batch_size` times; BYTES files hold elements each after its 4-byte little-endian length.

What the model is fed is recorded by a FunctionBackend; the same repository is then served by a real server on
ONNX Runtime, written as a Triton user would write it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf import text_format

from tensorgate.protos import model_config_pb2 as mc
from tensorgate.protos.tensors import encode_bytes_tensor
from tensorgate.server.backends.function import FunctionBackend
from tensorgate.server.errors import ModelLoadError
from tensorgate.server.repository.schema import ModelSchema
from tensorgate.server.repository.warmup import WARMUP_DIR, run_warmup
from tests.onnx_models import identity_model, write_config
from tests.serving import ServerThread

CONFIG = """
max_batch_size: {max_batch_size}
input [ {{ name: "INPUT0" data_type: {datatype} dims: [ {width} ] }} ]
output [ {{ name: "OUTPUT0" data_type: {datatype} dims: [ {width} ] }} ]
model_warmup [ {{ name: "sample" batch_size: {batch_size}
  inputs {{ key: "INPUT0" value: {{ data_type: {datatype} dims: [ {width} ] {data} }} }} }} ]
"""
FROM_FILE = 'input_data_file: "x.bin"'

STRINGS = encode_bytes_tensor(np.array([b"ab", b"cde"], dtype=object))


def _model_dir(tmp_path: Path, data: bytes) -> Path:
    (tmp_path / WARMUP_DIR).mkdir()
    (tmp_path / WARMUP_DIR / "x.bin").write_bytes(data)
    return tmp_path


def _text(datatype: str, batch_size: int, max_batch_size: int = 8, data: str = FROM_FILE, width: int = 2) -> str:
    return CONFIG.format(
        max_batch_size=max_batch_size, datatype=datatype, batch_size=batch_size, data=data, width=width
    )


def _warm(
    model_dir: Path, datatype: str, batch_size: int, max_batch_size: int = 8, data: str = FROM_FILE, width: int = 2
) -> list[np.ndarray]:
    """Run the warm-up of a model written as CONFIG; return what the model was fed."""
    config = text_format.Parse(_text(datatype, batch_size, max_batch_size, data, width), mc.ModelConfig())
    config.name = "warm"
    fed: list[np.ndarray] = []

    def record(inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        fed.append(inputs["INPUT0"])
        return {name: inputs["INPUT0"] for name in outputs}

    run_warmup(config, ModelSchema.from_config(config), FunctionBackend(record), model_dir, 1)
    return fed


@pytest.mark.parametrize(
    ("data", "batch_size", "max_batch_size", "expected"),
    [
        pytest.param(b"", 8, 8, np.tile(np.array([[1, 2]], np.float32), (8, 1)), id="batch-8"),
        pytest.param(b"", 1, 8, np.array([[1, 2]], np.float32), id="batch-1"),
        pytest.param(b"\x00" * 8, 3, 8, np.tile(np.array([[1, 2]], np.float32), (3, 1)), id="extra-bytes-unused"),
        pytest.param(b"", 1, 0, np.array([1, 2], np.float32), id="no-batching"),
    ],
)
def test_a_file_holds_one_sample_repeated_to_batch_size(
    tmp_path: Path, data: bytes, batch_size: int, max_batch_size: int, expected: np.ndarray
) -> None:
    model_dir = _model_dir(tmp_path, np.array([1, 2], np.float32).tobytes() + data)
    (fed,) = _warm(model_dir, "TYPE_FP32", batch_size, max_batch_size)
    np.testing.assert_array_equal(fed, expected)
    assert fed.dtype == np.float32


def test_a_bytes_file_holds_length_prefixed_elements(tmp_path: Path) -> None:
    (fed,) = _warm(_model_dir(tmp_path, STRINGS), "TYPE_STRING", batch_size=3)
    assert fed.tolist() == [[b"ab", b"cde"]] * 3


@pytest.mark.parametrize(
    ("datatype", "data", "needle"),
    [
        pytest.param(
            "TYPE_FP32", bytes(4), "warmup/x.bin has 4 bytes but one sample of FP32 dims [2] needs 8", id="short"
        ),
        pytest.param(
            "TYPE_STRING",
            encode_bytes_tensor(np.array([b"a", b"b", b"c"], dtype=object)),
            "warmup/x.bin is not one sample of dims [2]",
            id="three-strings",
        ),
        pytest.param("TYPE_STRING", b"ab", "warmup/x.bin is not one sample of dims [2]", id="unframed-strings"),
    ],
)
def test_a_file_that_is_not_one_sample_fails_the_load_naming_it(
    tmp_path: Path, datatype: str, data: bytes, needle: str
) -> None:
    with pytest.raises(ModelLoadError) as info:
        _warm(_model_dir(tmp_path, data), datatype, batch_size=2)
    assert "warm-up sample 'sample' failed" in info.value.message
    assert needle in info.value.message


def test_a_triton_repository_with_warmup_files_is_served(tmp_path: Path) -> None:
    root = tmp_path / "models"
    for name, datatype, data in (
        ("warm_fp32", "FP32", np.array([1, 2], np.float32).tobytes()),
        ("warm_str", "BYTES", STRINGS),
    ):
        identity_model(root / name / "1" / "model.onnx", datatype, shape=("batch", 2))
        config_type = "TYPE_STRING" if datatype == "BYTES" else "TYPE_FP32"
        write_config(root, name, _text(config_type, batch_size=8))
        _model_dir(root / name, data)
    with ServerThread(root) as s:
        client = grpcclient.InferenceServerClient(s.address)
        try:
            index = {m.name: (m.state, m.reason) for m in client.get_model_repository_index().models}
            assert index == {"warm_fp32": ("READY", ""), "warm_str": ("READY", "")}
        finally:
            client.close()


@pytest.mark.parametrize("max_batch_size", [pytest.param(8, id="batching"), pytest.param(0, id="no-batching")])
def test_a_sample_of_batch_size_0_is_skipped_as_triton_skips_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, max_batch_size: int
) -> None:
    """Triton's GenerateWarmupData skips it rather than run it with one row; leaving batch_size out gives 0, so the
    log says so."""
    model_dir = _model_dir(tmp_path, np.array([1, 2], np.float32).tobytes())
    with caplog.at_level(logging.WARNING, logger="tensorgate.server.repository.warmup"):
        fed = _warm(model_dir, "TYPE_FP32", batch_size=0, max_batch_size=max_batch_size)
    assert fed == []
    assert "model 'warm': warm-up sample 'sample' has batch_size 0 and is skipped" in caplog.text


def test_a_file_in_a_sub_folder_of_warmup_is_read_from_there(tmp_path: Path) -> None:
    """Triton joins warmup/ and input_data_file, so `batches/x.bin` is warmup/batches/x.bin, not warmup/x.bin."""
    model_dir = _model_dir(tmp_path, np.array([1, 2], np.float32).tobytes())
    (model_dir / WARMUP_DIR / "batches").mkdir()
    (model_dir / WARMUP_DIR / "batches" / "x.bin").write_bytes(np.array([5, 6], np.float32).tobytes())
    (fed,) = _warm(model_dir, "TYPE_FP32", batch_size=2, data='input_data_file: "batches/x.bin"')
    np.testing.assert_array_equal(fed, [[5, 6], [5, 6]])


@pytest.mark.parametrize("data", ['input_data_file: "../x.bin"', 'input_data_file: "/etc/hostname"'])
def test_a_file_named_out_of_warmup_with_a_path_is_refused(tmp_path: Path, data: str) -> None:
    """Not read as the file of that name in warmup/ (warmup/x.bin exists here), nor from where it points."""
    model_dir = _model_dir(tmp_path, np.array([1, 2], np.float32).tobytes())
    (model_dir / "x.bin").write_bytes(np.array([5, 6], np.float32).tobytes())
    with pytest.raises(ModelLoadError) as info:
        _warm(model_dir, "TYPE_FP32", batch_size=1, data=data)
    name = data.split('"')[1]
    assert (
        f"warm-up sample 'sample' failed: input_data_file '{name}' leaves the model's directory" in info.value.message
    )


@pytest.mark.parametrize("datatype", ["TYPE_FP32", "TYPE_INT32", "TYPE_BOOL", "TYPE_STRING"])
def test_random_data_is_one_sample_repeated_to_batch_size(tmp_path: Path, datatype: str) -> None:
    """As Triton builds it: one random instance, sent batch_size times; and the same on every load."""
    fed = [_warm(tmp_path, datatype, batch_size=4, data="random_data: true", width=16)[0] for _ in range(2)]
    assert fed[0].shape == (4, 16)
    for row in fed[0][1:]:
        np.testing.assert_array_equal(row, fed[0][0])
    np.testing.assert_array_equal(fed[0], fed[1])
    if datatype != "TYPE_STRING":
        assert len(set(fed[0][0].tolist())) > 1  # random: not one value repeated
