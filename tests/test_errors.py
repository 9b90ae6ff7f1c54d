"""Errors passed up with context keep what they were: class, gRPC status and fields."""

from __future__ import annotations

import errno
from pathlib import Path

import grpc
import pytest

from tensorgate.protos import model_config_pb2 as mc
from tensorgate.server.backends.onnx import OnnxBackend
from tensorgate.server.errors import (
    InvalidRequestError,
    ModelLoadError,
    ModelUnavailableError,
    os_error_text,
    with_prefix,
    without_paths,
)


def test_a_prefixed_error_is_a_copy_and_the_original_is_untouched() -> None:
    """A failed batch hands one exception to every request in it: an ensemble naming itself in its request's
    error must not change what the batch's other callers read."""
    shared = InvalidRequestError("add_sub", "1", "shape [1, 8] does not match", tensor="INPUT0")
    named = with_prefix(shared, "in ensemble 'loose', ")
    assert type(named) is InvalidRequestError and named.code == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        named.message == "in ensemble 'loose', model 'add_sub' version 1, tensor 'INPUT0': shape [1, 8] does not match"
    )
    assert str(named) == named.message and (named.model, named.tensor) == ("add_sub", "INPUT0")
    assert shared.message == "model 'add_sub' version 1, tensor 'INPUT0': shape [1, 8] does not match"
    assert str(shared) == shared.message
    nested = with_prefix(
        with_prefix(ModelUnavailableError("scale", None, "unloaded"), "in ensemble 'b', "), "in ensemble 'a', "
    )
    assert nested.message == "in ensemble 'a', in ensemble 'b', model 'scale' is not ready: unloaded"
    assert nested.code == grpc.StatusCode.UNAVAILABLE


def test_load_errors_name_files_without_the_server_s_directories(tmp_path: Path) -> None:
    """Load errors go over the wire. An OSError (a warm-up file) and onnxruntime's own message (which names the
    model by its absolute path) name files one way: from the repository, or from the model's directory."""
    repo = tmp_path / "models"
    model = repo / "m" / "1" / "model.onnx"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError) as info:
        OnnxBackend(model, mc.ModelConfig(name="m"), version=1)
    message = info.value.message
    assert "onnxruntime could not load model.onnx" in message and "Load model from 1/model.onnx failed" in message
    assert str(tmp_path) not in message
    missing = OSError(errno.ENOENT, "No such file or directory", str(repo / "m" / "warmup" / "in.bin"))
    assert os_error_text(missing, repo) == "m/warmup/in.bin: No such file or directory"
    assert os_error_text(OSError(errno.EACCES, "Permission denied", "/etc/in.bin"), repo) == "in.bin: Permission denied"
    # A model at the root: its folder "/" begins every path, and is left alone.
    assert without_paths("open /m.onnx, then /x", Path("/"), Path("/m.onnx"), Path("/")) == "open m.onnx, then /x"
