"""Model artifact integrity: a pinned sha256 in config.pbtxt must match the model file, and model files may not
resolve outside the repository. Refusals are load failures (UNAVAILABLE with the reason); the server keeps serving.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from tests.onnx_models import ADD_SUB_CONFIG, add_sub_model, scale_model, write_config
from tests.serving import ServerThread


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _param(key: str, value: str) -> str:
    return f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}\n'


@pytest.fixture
def explicit(repo: Path):
    with ServerThread(repo, model_control_mode="explicit") as s:
        client = tc.InferenceServerClient(s.address)
        yield s, client
        client.close()


def _add(repo: Path, name: str, params: str, versions: tuple[int, ...] = (1,)) -> list[Path]:
    files = [add_sub_model(repo / name / str(v) / "model.onnx") for v in versions]
    write_config(repo, name, f'name: "{name}"\n' + ADD_SUB_CONFIG + params)
    return files


def _infer(client: tc.InferenceServerClient, model: str, version: str = "") -> np.ndarray:
    x = np.ones((1, 16), np.float32)
    inputs = [tc.InferInput(n, [1, 16], "FP32") for n in ("INPUT0", "INPUT1")]
    for i in inputs:
        i.set_data_from_numpy(x)
    return client.infer(model, inputs, model_version=version).as_numpy("OUTPUT0")


def _load_error(client: tc.InferenceServerClient, name: str) -> str:
    with pytest.raises(InferenceServerException) as info:
        client.load_model(name)
    assert info.value.status() == str(grpc.StatusCode.UNAVAILABLE), info.value.message()
    return str(info.value.message())


def test_matching_sha256_loads(repo: Path, explicit) -> None:
    _, client = explicit
    (path,) = _add(repo, "pinned", "")
    write_config(
        repo, "pinned", 'name: "pinned"\n' + ADD_SUB_CONFIG + _param("tensorgate.sha256", _digest(path).upper())
    )
    client.load_model("pinned")
    assert _infer(client, "pinned").tolist() == [[2.0] * 16]


def test_mismatching_sha256_refuses_to_load_and_the_server_keeps_serving(repo: Path, explicit) -> None:
    _, client = explicit
    (path,) = _add(repo, "tampered", _param("tensorgate.sha256", "0" * 64))
    message = _load_error(client, "tampered")
    assert (
        f"tampered/1/model.onnx has sha256 {_digest(path)} but parameter 'tensorgate.sha256' pins {'0' * 64}" in message
    )
    assert not client.is_model_ready("tampered")
    client.load_model("add_sub")
    assert _infer(client, "add_sub").tolist() == [[2.0] * 16]


def test_per_version_digest_wins_over_the_model_wide_one(repo: Path, explicit) -> None:
    _, client = explicit
    one, two = _add(repo, "versioned", "", versions=(1, 2))
    two.write_bytes(two.read_bytes() + b"\0")  # version 2's file no longer matches anything pinned below
    params = _param("tensorgate.sha256", _digest(one)) + _param("tensorgate.sha256:2", "f" * 64)
    write_config(repo, "versioned", 'name: "versioned"\nversion_policy { all {} }\n' + ADD_SUB_CONFIG + params)
    client.load_model("versioned")  # version 1 loads; version 2 fails its own pin
    assert client.is_model_ready("versioned", "1") and not client.is_model_ready("versioned", "2")


def test_malformed_digest_is_a_load_error(repo: Path, explicit) -> None:
    _, client = explicit
    _add(repo, "badpin", _param("tensorgate.sha256", "not-a-digest"))
    assert "parameter 'tensorgate.sha256' must be 64 hex digits, got 'not-a-digest'" in _load_error(client, "badpin")


def test_model_file_symlinked_outside_the_repository_is_refused(repo: Path, explicit, tmp_path: Path) -> None:
    _, client = explicit
    outside = add_sub_model(tmp_path / "elsewhere" / "model.onnx")
    (repo / "escape" / "1").mkdir(parents=True)
    (repo / "escape" / "1" / "model.onnx").symlink_to(outside)
    write_config(repo, "escape", 'name: "escape"\n' + ADD_SUB_CONFIG)
    assert "escape/1/model.onnx resolves outside the model repository" in _load_error(client, "escape")
    assert not client.is_model_ready("escape")


# ----- the bytes that were hashed are the bytes that run --------------------------------------------------


def _scale(client: tc.InferenceServerClient, model: str) -> list[float]:
    x = tc.InferInput("INPUT0", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), np.float32))
    return client.infer(model, [x]).as_numpy("OUTPUT0").ravel().tolist()


def _external(path: Path) -> Path:
    """Re-save an ONNX file with its initializers in `weights.bin` beside it (ONNX external data)."""
    onnx.save_model(onnx.load(path), path, save_as_external_data=True, location="weights.bin", size_threshold=0)
    assert (path.parent / "weights.bin").is_file()
    return path


def test_file_swapped_after_hashing_is_not_served(repo: Path, explicit, tmp_path: Path) -> None:
    server, client = explicit
    path = scale_model(repo / "scaled" / "1" / "model.onnx", 2.0)
    pinned = _digest(path)
    write_config(repo, "scaled", 'name: "scaled"\n' + _param("tensorgate.sha256", pinned))
    impostor = scale_model(tmp_path / "impostor.onnx", 1000.0).read_bytes()
    swapped: list[Path] = []

    def swap(model_file: Path) -> None:  # runs after the bytes were read and hashed, before the session is built
        model_file.write_bytes(impostor)
        swapped.append(model_file)

    server.app.repository.after_artifact_read = swap
    client.load_model("scaled")
    assert swapped == [path] and path.read_bytes() == impostor
    assert _scale(client, "scaled") == [2.0] * 4  # the hashed bytes run, not the file now on disk
    # The swapped file is what a reload reads: it fails its pin and the version that passed keeps serving.
    server.app.repository.after_artifact_read = None
    message = _load_error(client, "scaled")
    assert f"scaled/1/model.onnx has sha256 {_digest(path)} but parameter 'tensorgate.sha256' pins {pinned}" in message
    assert _scale(client, "scaled") == [2.0] * 4


def test_unpinned_model_with_external_data_loads_from_its_version_directory(repo: Path, explicit) -> None:
    _, client = explicit
    _external(scale_model(repo / "ext" / "1" / "model.onnx", 3.0))
    write_config(repo, "ext", 'name: "ext"\n')
    client.load_model("ext")
    assert _scale(client, "ext") == [3.0] * 4


def test_model_with_external_data_loads_a_session_per_padding_size(repo: Path, explicit) -> None:
    """Each padding size's session is made from the same bytes, and finds the same external data."""
    _, client = explicit
    _external(scale_model(repo / "extpad" / "1" / "model.onnx", 3.0))
    pad = _param("tensorgate.pad_batches", "1,2")
    write_config(repo, "extpad", 'name: "extpad"\nmax_batch_size: 4\n' + pad)
    client.load_model("extpad")
    assert _scale(client, "extpad") == [3.0] * 4


def test_pinned_model_with_external_data_is_refused(repo: Path, explicit) -> None:
    _, client = explicit
    path = _external(scale_model(repo / "extpin" / "1" / "model.onnx", 3.0))
    write_config(repo, "extpin", 'name: "extpin"\n' + _param("tensorgate.sha256", _digest(path)))
    message = _load_error(client, "extpin")
    assert "extpin/1/model.onnx keeps tensors in external data files, which its pinned sha256 does not cover" in message
    assert not client.is_model_ready("extpin")


def test_external_data_symlinked_outside_the_repository_is_refused(repo: Path, explicit, tmp_path: Path) -> None:
    _, client = explicit
    path = _external(scale_model(repo / "extlink" / "1" / "model.onnx", 3.0))
    outside = tmp_path / "weights.bin"
    (path.parent / "weights.bin").rename(outside)
    (path.parent / "weights.bin").symlink_to(outside)
    write_config(repo, "extlink", 'name: "extlink"\n')
    assert "External data path escapes model directory" in _load_error(client, "extlink")
    assert not client.is_model_ready("extlink")
