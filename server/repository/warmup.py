"""Triton's `model_warmup`: run sample requests before a model reports ready, so the first caller is not slow."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tensorgate.protos import model_config_pb2 as mc
from tensorgate.protos import tensors
from tensorgate.server import datatypes
from tensorgate.server.backends.base import Backend
from tensorgate.server.errors import ModelLoadError, TensorgateError, os_error_text
from tensorgate.server.repository.paths import inside
from tensorgate.server.repository.schema import ModelSchema

log = logging.getLogger(__name__)

WARMUP_DIR = "warmup"


def _sample_file(spec: mc.ModelWarmup.Input, dt: datatypes.DataType, model_dir: Path) -> np.ndarray:
    """One instance of the tensor (shape `dims`, no batch dimension) from `warmup/<input_data_file>`, read as
    Triton reads it: raw values of which the first prod(dims) are used, or for BYTES exactly prod(dims) elements,
    each after its 4-byte little-endian length (the wire's BYTES framing). Triton's repositories hold files written
    that way, so reading rows or whole files here would fail their loads or warm up on other data. As in Triton the
    name is a path under warmup/ (`batches/8.bin` too); unlike Triton it may not climb out with `..`."""
    path = inside(model_dir / WARMUP_DIR, spec.input_data_file, root=model_dir)
    if path is None:
        # A link or path out of the model's directory: a load error could otherwise tell a client about other files.
        raise ValueError(f"input_data_file '{spec.input_data_file}' leaves the model's directory")
    name = f"{WARMUP_DIR}/{spec.input_data_file}"
    raw = path.read_bytes()
    dims = tuple(spec.dims)
    count = math.prod(dims)
    if dt.name == "BYTES":
        try:
            return tensors.decode_bytes_tensor(raw, count).reshape(dims)
        except tensors.TensorFormatError as exc:
            raise ValueError(f"{name} is not one sample of dims {list(dims)}: {exc}") from exc
    need = count * dt.itemsize
    if len(raw) < need:
        raise ValueError(f"{name} has {len(raw)} bytes but one sample of {dt.name} dims {list(dims)} needs {need}")
    return np.frombuffer(raw, dtype=dt.np_dtype, count=count).reshape(dims)


def _instance(spec: mc.ModelWarmup.Input, model_dir: Path, rng: np.random.Generator) -> np.ndarray:
    """One instance of the tensor (its `dims`, no batch dimension): from the file, zeros, or random values."""
    dt = datatypes.BY_CONFIG_TYPE[spec.data_type]
    dims = tuple(spec.dims)
    choice = spec.WhichOneof("input_data_type")
    if choice == "input_data_file":
        return _sample_file(spec, dt, model_dir)
    if dt.name == "BYTES":
        fill = b"" if choice == "zero_data" else b"tensorgate"
        return np.array([fill] * math.prod(dims), dtype=object).reshape(dims)
    if choice == "random_data":
        if dt.floating:
            return rng.random(dims).astype(dt.np_dtype)
        if dt.np_dtype.kind == "b":
            return rng.integers(0, 2, dims).astype(bool)
        return rng.integers(0, 8, dims).astype(dt.np_dtype)
    return np.zeros(dims, dtype=dt.np_dtype)


def _sample(spec: mc.ModelWarmup.Input, lead: tuple[int, ...], model_dir: Path, rng: np.random.Generator) -> np.ndarray:
    """The input for one run: `lead` is (batch_size,) for a model that batches, else (). Every row is the same
    instance, random data included: Triton builds the sample once and sends it batch_size times."""
    instance = _instance(spec, model_dir, rng)
    return np.broadcast_to(instance, lead + instance.shape).copy()


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
        if sample.batch_size == 0:
            # As Triton (GenerateWarmupData): a sample of batch 0 is skipped, not run with one row. Said louder
            # than Triton says it: leaving batch_size out of a sample gives 0.
            log.warning(
                "model '%s': warm-up sample '%s' has batch_size 0 and is skipped, as in Triton (batch_size: 1 runs it)",
                config.name,
                sample.name,
            )
            continue
        rows = sample.batch_size
        try:
            inputs: dict[str, np.ndarray] = {}
            for name, spec in sample.inputs.items():
                if any(d < 0 for d in spec.dims):
                    raise ValueError(
                        f"input '{name}' has dims {list(spec.dims)}; a warm-up sample needs every dimension (no -1)"
                    )
                lead = (rows,) if schema.max_batch_size > 0 else ()
                array = _sample(spec, lead, model_dir, rng)
                tensor = schema.inputs.get(name)
                if tensor is not None and tensor.reshape is not None:
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
