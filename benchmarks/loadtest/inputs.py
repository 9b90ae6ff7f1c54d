"""Request tensors for a load test, made from the model's metadata and config: random, zeros or .npy files.

Random and zeros inputs need every size fixed by the model, the batch dimension aside (it is ``--batch``): they
have no way to choose a variable one, and 1, the old guess, measured a request the model may never see. A .npy
file gives its own sizes for the variable dimensions and is checked against the fixed ones and the datatype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
    sequence: bool = False
    """A sequence (stateful) model: its requests go in sequences (ModelConfig's sequence_batching)."""
    sequence_ids: str = "int64"
    """What its CORRID control takes: "int64" (also for UINT64, or no CORRID), "int32", "uint32" or "string"."""

    @classmethod
    def from_metadata(cls, meta: ModelMetadata, max_batch_size: int | None) -> ModelShape:
        return cls(meta.name, tuple((t.name, t.datatype, tuple(t.shape)) for t in meta.inputs), max_batch_size)

    @property
    def batches(self) -> bool:
        if self.max_batch_size is not None:
            return self.max_batch_size > 0
        return all(dims and dims[0] == -1 for _, _, dims in self.inputs)

    def leads(self, dims: Sequence[int]) -> bool:
        """Whether ``dims[0]`` counts the request's rows: the batch dimension, or the leading -1 of a model that
        does not batch (Triton's explicit batch dimension; a request of one row)."""
        return bool(dims) and (self.batches or dims[0] == -1)

    def request_shape(
        self, name: str, dims: Sequence[int], rows: int, given: Sequence[int] | None = None
    ) -> tuple[int, ...]:
        """Concrete shape of one request's tensor: the leading dimension is ``rows`` (see ``leads``), the others
        as the model fixes them or as ``given`` (``--shape``, perf_analyzer's: the dims after the batch one, or all
        of them for a model that does not batch) sets them; InputError for a variable one that nothing sets."""
        # A shape given for a model that does not batch covers all its dims, as perf_analyzer's --shape does.
        leads = self.leads(dims) and (given is None or self.batches)
        rest = tuple(dims[1 if leads else 0 :])
        first = " (the first is the batch)" if self.batches else ""
        if given is not None:
            fits = len(given) == len(rest) and all(g > 0 and d in (-1, g) for d, g in zip(rest, given, strict=True))
            if not fits:
                shown = ",".join(map(str, given))
                raise InputError(
                    f"--shape {name}:{shown} does not fit input '{name}', whose dims are {list(dims)}{first}"
                )
            rest = tuple(given)
        elif any(d < 0 for d in rest):
            raise InputError(
                f"input '{name}' has variable dims {list(dims)}{first}: random and zeros inputs cannot choose their "
                f"sizes; give them with --shape {name}:D1,D2,... or use --inputs DIR with a {name}.npy of the shape "
                "to send"
            )
        return (rows, *rest) if leads else rest


def make_inputs(
    model: ModelShape,
    rows: int,
    source: str,
    seed: int = 0,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, np.ndarray]:
    """One request's tensors with ``rows`` rows: ``source`` is "random", "zeros" or a folder of NAME.npy files;
    ``shapes`` (``--shape``) sets the variable dimensions of random and zeros inputs."""
    shapes = shapes or {}
    unknown = sorted(set(shapes) - {name for name, _, _ in model.inputs})
    if unknown:
        raise InputError(f"--shape names {unknown}, not inputs of model '{model.name}'")
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
    if folder is not None and shapes:
        raise InputError("--shape is for random and zeros inputs: a .npy file gives its own shape")
    out: dict[str, np.ndarray] = {}
    for name, datatype, dims in model.inputs:
        if datatype not in tensors.BY_NAME:
            raise InputError(f"input '{name}': datatype {datatype} is not supported by the harness")
        if folder is not None:
            out[name] = _from_file(folder / f"{name}.npy", name, datatype, model, dims, rows)
        elif source == "zeros":
            out[name] = _zeros(datatype, model.request_shape(name, dims, rows, shapes.get(name)))
        else:
            out[name] = _random(rng, datatype, model.request_shape(name, dims, rows, shapes.get(name)))
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
    if tensors.BY_NAME[datatype].floating:
        return rng.standard_normal(shape).astype(dtype)
    # Small non-negative integers: valid for every integer type, and as indices or ids for most models.
    return rng.integers(0, 100, size=shape).astype(dtype)


def _from_file(path: Path, name: str, datatype: str, model: ModelShape, dims: Sequence[int], rows: int) -> np.ndarray:
    """The file's tensor as the request's: its own sizes for variable dims, the fixed ones checked; a batching
    model takes the first ``rows`` rows, or one row (written with or without the batch dimension) repeated."""
    try:
        array = np.load(path, allow_pickle=datatype == "BYTES")
    except OSError as exc:
        raise InputError(f"input '{name}': cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise InputError(f"input '{name}': {path} is not a .npy file: {exc}") from None
    array = tensors.from_npy(array, datatype)  # .npy has no bfloat16
    _check_datatype(array, path, name, datatype)
    leads = model.leads(dims)
    given = array.shape
    one_row = leads and array.ndim == len(dims) - 1  # the file leaves out the leading dimension
    if one_row:
        array = array.reshape(1, *given)
    fits = array.ndim == len(dims) and all(
        d < 0 or d == n or (i == 0 and leads) for i, (d, n) in enumerate(zip(dims, array.shape, strict=True))
    )
    if not fits:
        raise InputError(f"input '{name}': {path} has shape {list(given)}; the model's dims are {list(dims)}")
    if model.batches:
        if array.shape[0] == 1:  # one row, with or without its batch dimension: repeated
            array = np.broadcast_to(array, (rows, *array.shape[1:]))
        elif array.shape[0] < rows:
            raise InputError(f"input '{name}': {path} has {array.shape[0]} rows, fewer than --batch {rows}")
        else:
            array = array[:rows]
    if datatype == "BYTES":
        return np.array([v if isinstance(v, bytes) else str(v).encode() for v in array.ravel()], object).reshape(
            array.shape
        )
    return np.ascontiguousarray(array, dtype=tensors.BY_NAME[datatype].np_dtype)


def _check_datatype(array: np.ndarray, path: Path, name: str, datatype: str) -> None:
    """Values that become ``datatype`` without loss of kind: strings or bytes for BYTES, booleans for BOOL,
    integers in range for an integer type, integers or floats for a float type (a narrower float rounds)."""
    kind = array.dtype.kind
    if datatype == "BYTES":
        ok = kind in "OSU"
    elif datatype == "BOOL":
        ok = kind == "b"
    else:
        target = np.dtype(tensors.BY_NAME[datatype].np_dtype)
        ok = kind in "biu" or (tensors.BY_NAME[datatype].floating and (kind == "f" or array.dtype == target))
        if ok and target.kind in "iu" and array.size:
            lo, hi = int(array.min()), int(array.max())
            info = np.iinfo(target.name)
            if lo < info.min or hi > info.max:
                raise InputError(
                    f"input '{name}': {path} holds values from {lo} to {hi}, outside {datatype}'s range "
                    f"[{info.min}, {info.max}]"
                )
    if not ok:
        raise InputError(f"input '{name}': {path} holds {array.dtype} values, the model takes {datatype}")
