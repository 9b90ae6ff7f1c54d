from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.onnx_models import ADD_SUB_CONFIG, add_sub_model, identity_model, write_config
from tests.serving import ServerThread


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository with `add_sub` (FP32 [-1,16], config.pbtxt given) and `identity_fp32` (no config)."""
    root = tmp_path / "models"
    add_sub_model(root / "add_sub" / "1" / "model.onnx")
    write_config(root, "add_sub", 'name: "add_sub"\n' + ADD_SUB_CONFIG)
    identity_model(root / "identity_fp32" / "1" / "model.onnx", "FP32")
    return root


@pytest.fixture
def server(repo: Path) -> Iterator[ServerThread]:
    with ServerThread(repo) as s:
        yield s
