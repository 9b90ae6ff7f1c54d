"""Triton's `model_warmup`: run sample requests before a model reports ready, so the first caller is not slow."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tensorgate.protos import model_config_pb2 as mc
from tensorgate.server import datatypes
from tensorgate.server.backends.base import Backend
from tensorgate.server.errors import ModelLoadError, TensorgateError, os_error_text
from tensorgate.server.repository.schema import ModelSchema

WARMUP_DIR = "warmup"


def _sample(
    spec: mc.ModelWarmup.Input, shape: tuple[int, ...], model_dir: Path, rng: np.random.Generator
) -> np.ndarray:
    dt = datatypes.BY_CONFIG_TYPE[spec.data_type]
    count = math.prod(shape)
    choice = spec.WhichOneof("input_data_type")
    if choice == "input_data_file":
        path = model_dir / WARMUP_DIR / Path(spec.input_data_file).name
        if not path.resolve().is_relative_to(model_dir.resolve()):
            # A link out of the model's directory: a load error could otherwise tell a client about other files.
            raise ValueError(f"{WARMUP_DIR}/{path.name} leaves the model's directory")
        raw = path.read_bytes()
        if dt.name == "BYTES":
            return np.array([raw] * count, dtype=object).reshape(shape)
        return np.frombuffer(raw, dtype=dt.np_dtype, count=count).reshape(shape)
    if dt.name == "BYTES":
        fill = b"" if choice == "zero_data" else b"tensorgate"
        return np.array([fill] * count, dtype=object).reshape(shape)
    if choice == "random_data":
        if dt.floating:
            return rng.random(shape).astype(dt.np_dtype)
        if dt.np_dtype.kind == "b":
            return rng.integers(0, 2, shape).astype(bool)
        return rng.integers(0, 8, shape).astype(dt.np_dtype)
    return np.zeros(shape, dtype=dt.np_dtype)


def run_warmup(
    config: mc.ModelConfig,
    schema: ModelSchema,
    backend: Backend,
    model_dir: Path,
    version: int,
    stopping: Callable[[], bool] = lambda: False,
) -> None:
    """Run every warm-up sample `count` times; a failure makes the load fail with the sample's name. Between
    runs it asks `stopping`, so that a server told to stop does not first finish a long warm-up."""
    rng = np.random.default_rng(0)
    outputs = list(schema.outputs)
    for sample in config.model_warmup:
        rows = max(sample.batch_size, 1)
        try:
            inputs: dict[str, np.ndarray] = {}
            for name, spec in sample.inputs.items():
                dims = tuple(spec.dims)
                shape = ((rows,) + dims) if schema.max_batch_size > 0 else dims
                array = _sample(spec, shape, model_dir, rng)
                tensor = schema.inputs.get(name)
                if tensor is not None and tensor.reshape is not None:
                    lead = shape[:1] if schema.max_batch_size > 0 else ()
                    array = array.reshape(lead + tensor.reshape)
                inputs[name] = array
            for _ in range(max(sample.count, 1)):
                if stopping():
                    raise ModelLoadError(config.name, version, "the server is stopping")
                backend.execute(inputs, outputs)
        except (TensorgateError, OSError, ValueError, KeyError) as exc:
            if isinstance(exc, TensorgateError):
                detail = exc.message
            elif isinstance(exc, OSError):
                detail = os_error_text(exc, model_dir.parent)
            else:
                detail = str(exc)
            raise ModelLoadError(config.name, version, f"warm-up sample '{sample.name}' failed: {detail}") from exc
