"""A request against its model's schema: names, datatypes, ranks, dims, batch size.

Each failure names the model, version, tensor and rule, so a caller can fix the request from the message alone.
"""

from __future__ import annotations

import numpy as np

from tensorgate.server.errors import InvalidRequestError
from tensorgate.server.pipeline.classify import CLASSIFIABLE
from tensorgate.server.pipeline.types import InferRequest
from tensorgate.server.repository.schema import ModelSchema, TensorSpec


def dims_match(shape: tuple[int, ...], dims: tuple[int, ...]) -> bool:
    """A shape against config dims, where -1 takes any size."""
    return len(shape) == len(dims) and all(d == -1 or d == s for s, d in zip(shape, dims, strict=True))


def check_input(
    schema: ModelSchema, model: str, version: str, name: str, datatype: str, shape: tuple[int, ...]
) -> TensorSpec:
    """One input's name, datatype and shape against the model's; a batching model's first dimension is the rows.

    Also called before a large tensor is decoded (`InferenceHandler.check_input`), so that a request the model
    cannot take does not cost per-element work first."""
    spec = schema.inputs.get(name)
    if spec is None:
        raise InvalidRequestError(
            model,
            version,
            f"unexpected input; the model's inputs are {sorted(schema.inputs)}",
            tensor=name,
        )
    if datatype != spec.datatype.name:
        raise InvalidRequestError(
            model,
            version,
            f"datatype {datatype} does not match the model's {spec.datatype.name}",
            tensor=name,
        )
    if schema.max_batch_size > 0:
        if len(shape) != len(spec.dims) + 1 or not dims_match(shape[1:], spec.dims):
            raise InvalidRequestError(
                model,
                version,
                f"shape {list(shape)} does not match the model's {spec.shape_text(schema.max_batch_size)}",
                tensor=name,
            )
        rows = shape[0]
        if rows < 1 or rows > schema.max_batch_size:
            # A model without config.pbtxt takes 4 rows (Triton's default): a caller sending a data set whole
            # needs to know the limit is the server's setting, not the model's.
            hint = (
                "; split the rows into requests of at most that many, or raise max_batch_size in the model's "
                "config.pbtxt (without one, the server's --default-max-batch-size sets it)"
                if rows > schema.max_batch_size
                else ""
            )
            raise InvalidRequestError(
                model,
                version,
                f"batch size {rows} is outside 1..{schema.max_batch_size} (max_batch_size){hint}",
                tensor=name,
            )
    elif not dims_match(shape, spec.dims):
        raise InvalidRequestError(
            model,
            version,
            f"shape {list(shape)} does not match the model's {spec.shape_text(0)}",
            tensor=name,
        )
    return spec


def validate_request(
    schema: ModelSchema, req: InferRequest, version: str
) -> tuple[dict[str, np.ndarray], int, list[str]]:
    """Check `req`; return the inputs as the model takes them (reshaped), the batch size and the outputs to compute.

    The batch size is the shared first dimension when the model batches, else 1.
    """
    model = req.model
    batch: int | None = None
    inputs: dict[str, np.ndarray] = {}
    for name, array in req.inputs.items():
        spec = check_input(schema, model, version, name, req.datatypes[name], array.shape)
        if spec.text:
            _check_text(array, model, version, name)
        if schema.max_batch_size > 0:
            rows = array.shape[0]
            if batch is not None and rows != batch:
                raise InvalidRequestError(
                    model, version, f"batch size {rows} differs from other inputs' {batch}", tensor=name
                )
            batch = rows
        inputs[name] = _reshape_in(array, spec, schema.max_batch_size)
    missing = [n for n, s in schema.inputs.items() if n not in inputs and not s.optional]
    if missing:
        raise InvalidRequestError(model, version, f"missing required input(s) {missing}")
    outputs = req.requested_outputs or list(schema.outputs)
    for name in req.requested_outputs:
        if name not in schema.outputs:
            raise InvalidRequestError(
                model,
                version,
                f"unknown output requested; the model's outputs are {sorted(schema.outputs)}",
                tensor=name,
            )
    if req.classifications is not None:
        _check_classifications(schema, req.classifications, model, version)
    return inputs, batch if batch is not None else 1, outputs


def _check_classifications(schema: ModelSchema, classifications: dict[str, int], model: str, version: str) -> None:
    """Refused before the model runs, as the caller would otherwise wait for compute it cannot use."""
    for name in classifications:
        spec = schema.outputs.get(name)
        if spec is not None and spec.datatype.name not in CLASSIFIABLE:
            raise InvalidRequestError(
                model,
                version,
                f"classification is not available for datatype {spec.datatype.name}; it needs integers, FP32 or FP64",
                tensor=name,
            )


def _check_text(array: np.ndarray, model: str, version: str, name: str) -> None:
    items = array.reshape(-1).tolist()
    try:
        # One C call for the tensor: NUL cannot sit inside a multi-byte sequence, so the joined text is valid UTF-8
        # exactly when every element is (a bare join would let a cut-off character be completed by the next one).
        b"\0".join(items).decode("utf-8")
        return
    except (UnicodeDecodeError, TypeError):
        pass  # an invalid element (found below, with its index), or str elements, which are text already
    for i, item in enumerate(items):
        if isinstance(item, bytes):
            try:
                item.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidRequestError(
                    model,
                    version,
                    f"element {i} is not valid UTF-8; this model's string tensors carry text only",
                    tensor=name,
                ) from exc


def _reshape_in(array: np.ndarray, spec: TensorSpec, max_batch_size: int) -> np.ndarray:
    if spec.reshape is None:
        return array
    lead = array.shape[:1] if max_batch_size > 0 else ()
    return array.reshape(lead + spec.reshape)


def reshape_out(array: np.ndarray, spec: TensorSpec, max_batch_size: int) -> np.ndarray:
    """Undo an output `reshape`: the caller sees the config's dims, not the model's shape."""
    if spec.reshape is None:
        return array
    lead = array.shape[:1] if max_batch_size > 0 else ()
    return array.reshape(lead + spec.dims)
