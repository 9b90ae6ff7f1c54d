"""Shared by the monitoring tests: the example digits model built fresh into a temporary repository."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

import numpy as np

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "build_models.py"


def _builder() -> ModuleType:
    # examples/ is not a package: load the script by file, as tests/test_examples.py does.
    name = "tensorgate_examples_build_models"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def digits_repository(out: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """Build the digits model (config with its monitoring parameters) under ``out/models``; return the repository
    and the held-out split (float32 [N, 64], int64 [N]) that it was not trained on."""
    repo = out / "models"
    trained = _builder().build_digits(repo / "digits")
    return repo, trained.x_test, trained.y_test


def copy_repository(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
