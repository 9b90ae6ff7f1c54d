"""Request tensors for a load test, made from the model's metadata and config: random, zeros or .npy files."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tensorgate.client import ModelMetadata
from tensorgate.protos import tensors

__all__ = ["InputError", "ModelShape", "make_inputs"]

INPUT_SOURCES = ("random", "zeros")


class InputError(ValueError):
    """Inputs that cannot be made for this model (the message says which input and why)."""


@dataclass(frozen=True)
class ModelShape:
    """What the harness needs to know about a model: its inputs and whether the first dimension is the batch."""

    name: str
    inputs: tuple[tuple[str, str, tuple[int, ...]], ...]
    """(name, datatype, dims as the metadata gives them: -1 for variable, the batch dimension first if any)."""
    max_batch_size: int | None
    """From ModelConfig; None when the server has no ModelConfig RPC (then a leading -1 is taken as the batch)."""

    @classmethod
    def from_metadata(cls, meta: ModelMetadata, max_batch_size: int | None) -> ModelShape:
        return cls(meta.name, tuple((t.name, t.datatype, tuple(t.shape)) for t in meta.inputs), max_batch_size)

    @property
    def batches(self) -> bool:
        if self.max_batch_size is not None:
            return self.max_batch_size > 0
        return all(dims and dims[0] == -1 for _, _, dims in self.inputs)

    def request_shape(self, dims: Sequence[int], rows: int) -> tuple[int, ...]:
        """Concrete shape of one request's tensor: the batch dimension is ``rows``, other variable dims 1."""
        shape = [max(d, 1) for d in dims]
        if self.batches and shape:
            shape[0] = rows
        return tuple(shape)


def make_inputs(model: ModelShape, rows: int, source: str, seed: int = 0) -> dict[str, np.ndarray]:
    """One request's tensors with ``rows`` rows: ``source`` is "random", "zeros" or a folder of NAME.npy files."""
    if rows < 1:
        raise InputError(f"--batch must be at least 1, not {rows}")
    if not model.batches and rows != 1:
        raise InputError(f"model '{model.name}' does not batch (max_batch_size 0): use --batch 1")
    if model.max_batch_size and rows > model.max_batch_size:
        raise InputError(f"--batch {rows} is above model '{model.name}''s max_batch_size {model.max_batch_size}")
    rng = np.random.default_rng(seed)
    folder = None if source in INPUT_SOURCES else Path(source)
    if folder is not None and not folder.is_dir():
        raise InputError(f"--inputs {source!r}: not 'random', 'zeros' or a folder of NAME.npy files")
    out: dict[str, np.ndarray] = {}
    for name, datatype, dims in model.inputs:
        if datatype not in tensors.BY_NAME:
            raise InputError(f"input '{name}': datatype {datatype} is not supported by the harness")
        shape = model.request_shape(dims, rows)
        if folder is not None:
            out[name] = _from_file(folder / f"{name}.npy", name, datatype, shape)
        elif source == "zeros":
            out[name] = _zeros(datatype, shape)
        else:
            out[name] = _random(rng, datatype, shape)
    return out


def _zeros(datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    if datatype == "BYTES":
        return np.full(shape, b"", dtype=object)
    return np.zeros(shape, tensors.BY_NAME[datatype].np_dtype)


def _random(rng: np.random.Generator, datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    dtype = tensors.BY_NAME[datatype].np_dtype
    if datatype == "BYTES":
        letters = rng.integers(ord("a"), ord("z") + 1, size=(*shape, 8), dtype=np.uint8)
        flat = [row.tobytes() for row in letters.reshape(-1, 8)]
        return np.array(flat, dtype=object).reshape(shape)
    if datatype == "BOOL":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    # Small non-negative integers: valid for every integer type, and as indices or ids for most models.
    return rng.integers(0, 100, size=shape).astype(dtype)


def _from_file(path: Path, name: str, datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=datatype == "BYTES")
    except OSError as exc:
        raise InputError(f"input '{name}': cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise InputError(f"input '{name}': {path} is not a .npy file: {exc}") from None
    if array.shape == shape[1:] and len(shape) > array.ndim:  # one row: repeat it to the batch
        array = np.broadcast_to(array, shape)
    elif array.ndim == len(shape) and array.shape[1:] == shape[1:] and array.shape[0] >= shape[0]:
        array = array[: shape[0]]
    elif array.shape != shape:
        raise InputError(f"input '{name}': {path} has shape {list(array.shape)}, the request needs {list(shape)}")
    if datatype == "BYTES":
        return np.array([v if isinstance(v, bytes) else str(v).encode() for v in array.ravel()], object).reshape(
            array.shape
        )
    return np.ascontiguousarray(array, dtype=tensors.BY_NAME[datatype].np_dtype)
