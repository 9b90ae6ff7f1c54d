"""Protobuf <-> numpy for the server's messages, errors naming model, version and tensor.

The tensor wire format itself (raw contents as `np.frombuffer` views, BYTES framing, the datatype table) lives in
`tensorgate.protos.tensors`, shared with the client; this module wraps its `TensorFormatError` into the server's
`InvalidRequestError`. The client-side helpers (`encode_infer_request`, `decode_infer_response`) are re-exported.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from google.protobuf import json_format, text_format

from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos import model_config_pb2 as mc
from tensorgate.protos import tensors
from tensorgate.server import datatypes
from tensorgate.server.errors import InvalidRequestError, ResourceExhaustedError, TensorgateError, model_ref
from tensorgate.server.pipeline.types import InferRequest, InferResponse
from tensorgate.server.repository.manager import IndexRow, LoadedModel
from tensorgate.server.repository.paths import relative_path
from tensorgate.server.rpc.shared_memory import REGION, RegionError, Slice, SystemSharedMemory
from tensorgate.server.telemetry.statistics import Duration

CLASSIFICATION = "classification"
"""The output parameter of Triton's classification extension (pipeline/classify.py)."""
_BY_NAME = datatypes.BY_NAME


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Per-tensor limits checked while decoding, before memory is spent on the data (RESOURCE_EXHAUSTED).

    The message size limit alone does not bound memory: 256 MiB of empty BYTES elements become 64 million
    Python objects, so element counts and lengths have limits of their own.
    """

    max_tensor_elements: int = 64 * 1024 * 1024
    max_bytes_element: int = 16 * 1024 * 1024


DEFAULT_LIMITS = RequestLimits()

LARGE_ELEMENTS = 1 << 14
"""A tensor over this many elements that needs work per element (BYTES framing, typed `contents`; about 0.35 and
0.06 us an element) is checked against the model's schema first, and decoded off the event loop: at the size
limits that work takes seconds, which the loop would otherwise take from every other caller."""

LARGE_SHARED_BYTES = 1 << 20
"""An input in shared memory over this many bytes is checked against the model's schema first, and read off the
event loop: the read copies every byte (about 60 us a MiB, what a hop to a worker thread costs), and a region may
name hundreds of megabytes."""

InputCheck = Callable[[str, str, str, str, tuple[int, ...]], None]
"""(model, version, tensor, datatype, shape): raises when the model does not take such an input."""


class DecodeOffLoop(Exception):
    """Raised by a decode on the event loop that met a large tensor (LARGE_ELEMENTS), once the model has accepted
    its name, datatype and shape: decode the request again on a worker thread."""


def _limit_error(model: str, version: str, tensor: str, detail: str) -> ResourceExhaustedError:
    error = ResourceExhaustedError(f"{model_ref(model, version)}, tensor '{tensor}': {detail}")
    error.permanent = True  # the same tensor is over the limit every time
    return error


def decode_bytes_tensor(buf: bytes, count: int, *, model: str, version: str, tensor: str) -> np.ndarray:
    """Split length-prefixed BYTES elements into a flat object array of `count` bytes objects."""
    try:
        return tensors.decode_bytes_tensor(buf, count)
    except tensors.TensorFormatError as exc:
        raise InvalidRequestError(model, version, str(exc), tensor=tensor) from exc


encode_bytes_tensor = tensors.encode_bytes_tensor


@contextlib.contextmanager
def _tensor_errors(model: str, version: str, name: str) -> Iterator[None]:
    """The wire format's errors for one input tensor, as the caller's status: over a limit is RESOURCE_EXHAUSTED
    naming the flag, anything else malformed INVALID_ARGUMENT."""
    try:
        yield
    except tensors.TensorLimitError as exc:
        raise _limit_error(model, version, name, f"{exc} (--max-bytes-element)") from exc
    except tensors.TensorFormatError as exc:
        raise InvalidRequestError(model, version, str(exc), tensor=name) from exc


def _decode_raw(
    raw: bytes,
    dt: datatypes.DataType,
    shape: tuple[int, ...],
    model: str,
    version: str,
    name: str,
    limits: RequestLimits = DEFAULT_LIMITS,
) -> np.ndarray:
    with _tensor_errors(model, version, name):
        return tensors.decode_raw(raw, dt, shape, limits.max_bytes_element)


def _decode_contents(
    tensor: pb.ModelInferRequest.InferInputTensor,
    dt: datatypes.DataType,
    shape: tuple[int, ...],
    model: str,
    version: str,
    limits: RequestLimits = DEFAULT_LIMITS,
) -> np.ndarray:
    with _tensor_errors(model, version, tensor.name):
        return tensors.decode_contents(
            tensor.contents, dt, shape, raw_field="raw_input_contents", max_element_bytes=limits.max_bytes_element
        )


_BOOL = datatypes.BY_NAME["BOOL"]


def _check_booleans(array: np.ndarray, model: str, version: str, name: str) -> None:
    """BOOL bytes other than 0 and 1 are refused: ONNX Runtime reads such a byte as neither value (Not of the byte 2
    answers 3, still true), so the model would answer wrong without a word. Typed `bool_contents` cannot hold one."""
    data = array.reshape(-1).view(np.uint8)
    if data.size and int(data.max()) > 1:
        i = int(np.argmax(data > 1))
        raise InvalidRequestError(
            model, version, f"BOOL element {i} is the byte {data[i]}; a BOOL element is one byte, 0 or 1", tensor=name
        )


MAX_DIMS = 64
"""numpy's limit on dimensions (NPY_MAXDIMS); a request over it is refused before any array is made."""


NO_SHARED_MEMORY = SystemSharedMemory(enabled=False)
"""What a request naming a region meets on a server without --shared-memory system: the registry's own refusal."""


def _shared(
    shm: SystemSharedMemory,
    tensor: pb.ModelInferRequest.InferInputTensor,
    dt: datatypes.DataType,
    shape: tuple[int, ...],
    count: int,
    model: str,
    version: str,
    limits: RequestLimits,
) -> Slice:
    """Where an input's bytes are, once their size fits the shape; not read yet: a region names any number of
    bytes, and reading them first would let a small request hold the server's loop and memory."""
    if tensor.HasField("contents"):
        raise InvalidRequestError(
            model, version, "data given both in contents and in shared memory", tensor=tensor.name
        )
    piece = shm.slice(tensor.parameters, model=model, version=version, tensor=tensor.name)
    if dt.name != "BYTES" and piece.size != count * dt.itemsize:
        raise InvalidRequestError(
            model,
            version,
            f"shared_memory_byte_size of region '{piece.region.name}' is {piece.size} but shape {list(shape)} of "
            f"{dt.name} needs {count * dt.itemsize} bytes",
            tensor=tensor.name,
        )
    if dt.name == "BYTES" and piece.size > count * (4 + limits.max_bytes_element):
        raise InvalidRequestError(
            model,
            version,
            f"shared_memory_byte_size of region '{piece.region.name}' is {piece.size}, more than shape "
            f"{list(shape)} can hold: {count} BYTES elements of at most {limits.max_bytes_element} bytes each "
            "(--max-bytes-element) and their 4-byte lengths",
            tensor=tensor.name,
        )
    return piece


def _read_shared(piece: Slice, model: str, version: str, tensor: str) -> bytes:
    try:
        return piece.read()
    except RegionError as exc:
        raise InvalidRequestError(model, version, exc.message, tensor=tensor) from exc


def decode_infer_request(
    msg: pb.ModelInferRequest,
    deadline: float | None = None,
    limits: RequestLimits = DEFAULT_LIMITS,
    shm: SystemSharedMemory = NO_SHARED_MEMORY,
    check_input: InputCheck | None = None,
    *,
    on_loop: bool = False,
) -> InferRequest:
    """Build the pipeline's request; checks what the protocol and the size limits require, and the model schema
    (`check_input`) only for large tensors that need work per element or a large read from shared memory
    (LARGE_ELEMENTS, LARGE_SHARED_BYTES): `on_loop`, such a tensor raises DecodeOffLoop instead of being decoded.

    This runs once per request on the event loop, so it reads each protobuf field once and indexes repeated
    fields rather than iterating them (upb's iterators and `tuple(repeated)` cost microseconds each); measured
    with benchmarks/hotpath.py.

    Inputs in shared memory (`shm`, the server's registry) take no raw_input_contents entry: as in Triton,
    the entries are for the other inputs, in order.
    """
    model, version = msg.model_name, msg.model_version
    tensors_in = msg.inputs
    n_inputs = len(tensors_in)
    raw: list[bytes] | None = msg.raw_input_contents[:] if len(msg.raw_input_contents) else None
    shared = 0
    """Inputs so far read from shared memory: raw_input_contents[i - shared] holds input i's data."""
    inputs: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for i in range(n_inputs):
        tensor = tensors_in[i]
        name = tensor.name
        if name in inputs:
            raise InvalidRequestError(model, version, "input given more than once", tensor=name)
        dt = _BY_NAME.get(tensor.datatype)
        if dt is None:
            raise InvalidRequestError(model, version, f"unknown datatype '{tensor.datatype}'", tensor=name)
        shape = tuple(tensor.shape[:])
        if shape and min(shape) < 0:
            raise InvalidRequestError(model, version, f"shape {list(shape)} has a negative dimension", tensor=name)
        if len(shape) > MAX_DIMS:
            raise InvalidRequestError(
                model, version, f"shape has {len(shape)} dimensions, more than the {MAX_DIMS} allowed", tensor=name
            )
        count = math.prod(shape)
        if count > limits.max_tensor_elements:
            raise _limit_error(
                model,
                version,
                name,
                f"shape {list(shape)} has {count} elements, over the limit of {limits.max_tensor_elements} "
                "(--max-tensor-elements)",
            )
        if count == 0 and math.prod(d for d in shape if d) > limits.max_tensor_elements:
            # Empty, yet no array can have this shape (numpy refuses it): say so rather than fail inside numpy.
            raise _limit_error(
                model,
                version,
                name,
                f"shape {list(shape)} is empty, but its other dimensions make more than the limit of "
                f"{limits.max_tensor_elements} elements "
                "(--max-tensor-elements)",
            )
        # Where the data is, once its size fits the shape; not read yet (only the region's bounds are checked).
        piece = _shared(shm, tensor, dt, shape, count, model, version, limits) if REGION in tensor.parameters else None
        # Long work (per element, or a large read): the model's schema answers first, then a worker thread does it.
        per_element = count > LARGE_ELEMENTS and (dt.name == "BYTES" or (raw is None and piece is None))
        if per_element or (piece is not None and piece.size > LARGE_SHARED_BYTES):
            if check_input is not None:
                check_input(model, version, name, dt.name, shape)
            if on_loop:
                raise DecodeOffLoop
        if piece is not None:
            shared += 1
            data = _read_shared(piece, model, version, name)
            inputs[name] = _decode_raw(data, dt, shape, model, version, name, limits)
        elif raw is not None:
            if tensor.HasField("contents"):
                raise InvalidRequestError(
                    model,
                    version,
                    "data given in contents, but the request carries raw_input_contents: every input that is not "
                    "in shared memory takes one raw_input_contents entry, in order",
                    tensor=name,
                )
            if i - shared >= len(raw):
                raise InvalidRequestError(
                    model, version, f"request has {n_inputs} inputs but {len(raw)} raw_input_contents entries"
                )
            data = raw[i - shared]
            if dt.name != "BYTES" and len(data) == count * dt.itemsize:
                # The common case, inline: a view of the request bytes (what tensors.decode_raw returns too).
                inputs[name] = np.frombuffer(data, dtype=dt.np_dtype).reshape(shape)
            else:
                inputs[name] = _decode_raw(data, dt, shape, model, version, name, limits)
        else:
            inputs[name] = _decode_contents(tensor, dt, shape, model, version, limits)
        if dt is _BOOL and (piece is not None or raw is not None):
            _check_booleans(inputs[name], model, version, name)
        dtypes[name] = dt.name
    if raw is not None and len(raw) != n_inputs - shared:
        raise InvalidRequestError(
            model,
            version,
            f"request has {n_inputs - shared} inputs to read from raw_input_contents but {len(raw)} entries",
        )
    requested: list[str] = []
    shared_outputs: dict[str, Slice] | None = None
    classifications: dict[str, int] | None = None
    outs = msg.outputs
    for j in range(len(outs)):
        out = outs[j]
        if out.name in requested:
            # As Triton: the same output asked for twice the same way is answered once. Asked for two ways (a
            # class count, a shared-memory region), which one to answer is anyone's guess: refused.
            if any(earlier.name == out.name and earlier == out for earlier in list(outs)[:j]):
                continue
            raise InvalidRequestError(
                model, version, "output requested more than once, with different parameters", tensor=out.name
            )
        if len(out.parameters):
            if CLASSIFICATION in out.parameters:
                k = _class_count(out, model, version)
                if k:
                    if classifications is None:
                        classifications = {}
                    classifications[out.name] = k
            if REGION in out.parameters:
                if classifications is not None and out.name in classifications:
                    raise InvalidRequestError(
                        model, version, "classification results cannot be written to shared memory", tensor=out.name
                    )
                if shared_outputs is None:
                    shared_outputs = {}
                shared_outputs[out.name] = shm.slice(out.parameters, model=model, version=version, tensor=out.name)
        requested.append(out.name)
    params = msg.parameters
    return InferRequest(
        model=model,
        version=version,
        id=msg.id,
        inputs=inputs,
        datatypes=dtypes,
        requested_outputs=requested,
        parameters=tensors.parameters_of(params) if len(params) else {},
        deadline=deadline,
        shared_outputs=shared_outputs,
        classifications=classifications,
    )


def _class_count(out: pb.ModelInferRequest.InferRequestedOutputTensor, model: str, version: str) -> int:
    """The `classification` parameter: how many classes to return (tritonclient's class_count, an int64; 0 asks
    for the tensor itself, as in Triton)."""
    param = out.parameters[CLASSIFICATION]
    choice = param.WhichOneof("parameter_choice")
    value = getattr(param, choice) if choice in ("int64_param", "uint64_param") else None
    if value is None or value < 0:
        raise InvalidRequestError(
            model, version, "output parameter 'classification' must be a non-negative integer", tensor=out.name
        )
    return int(value)


encode_array = tensors.encode_array


def encode_infer_response(resp: InferResponse, shared_outputs: dict[str, Slice] | None = None) -> pb.ModelInferResponse:
    """One raw_output_contents entry per output, in the same order as `outputs`; an output asked for in shared
    memory is written there, and its entry is empty (as Triton's, so that entries stay aligned with outputs)."""
    msg = pb.ModelInferResponse(model_name=resp.model, model_version=resp.version, id=resp.id)
    for name, datatype, array in resp.outputs:
        msg.outputs.add(name=name, datatype=datatype, shape=array.shape)
        data = encode_array(array, datatype)
        if shared_outputs is not None and name in shared_outputs:
            _write_shared(shared_outputs[name], data, resp, name)
            data = b""
        msg.raw_output_contents.append(data)
    return msg


def encode_on_loop(resp: InferResponse, shared_outputs: dict[str, Slice] | None = None) -> pb.ModelInferResponse | None:
    """`encode_infer_response`, or None when a BYTES output has over LARGE_ELEMENTS elements: the caller then
    encodes on a worker thread. Framing BYTES takes about 1 us an element, so one request's 5 million 2-byte
    strings (32 MiB) held the event loop, and every other caller, for 6 s. The hot path makes no coroutine for it."""
    for _, datatype, array in resp.outputs:
        if datatype == "BYTES" and array.size > LARGE_ELEMENTS:
            return None
    return encode_infer_response(resp, shared_outputs)


def _write_shared(target: Slice, data: bytes, resp: InferResponse, name: str) -> None:
    """An output into its shared memory region. The model has run, so an error is marked `ran`: sending the same
    request again would fail the same way."""
    failed: TensorgateError
    try:
        target.write(data)
        return
    except RegionError as exc:
        failed = InvalidRequestError(resp.model, resp.version, exc.message, tensor=name)
    except OSError as exc:
        failed = ResourceExhaustedError(
            f"{model_ref(resp.model, resp.version)}, tensor '{name}': cannot write it: {exc.strerror}"
        )
    failed.ran = True
    raise failed


# The client side of the codec (raw contents), shared with the client, warm-up and benchmarks.
encode_infer_request = tensors.encode_infer_request
decode_infer_response = tensors.decode_infer_response


def monotonic_deadline(time_remaining: float | None) -> float | None:
    """Convert grpc's `context.time_remaining()` to an absolute monotonic deadline."""
    return None if time_remaining is None else time.monotonic() + time_remaining


# ----- model-level messages ----------------------------------------------------------------------------------


def encode_model_metadata(model: LoadedModel, versions: Sequence[int]) -> pb.ModelMetadataResponse:
    """ModelMetadata: shapes start with -1 when the model batches, as Triton reports them."""
    schema = model.schema
    lead = [-1] if schema.max_batch_size > 0 else []
    # As Triton: a model run by a backend and not a platform names its backend (a Python model says "python").
    platform = model.config.platform or model.config.backend
    msg = pb.ModelMetadataResponse(name=model.name, versions=[str(v) for v in versions], platform=platform)
    for spec in schema.inputs.values():
        msg.inputs.add(name=spec.name, datatype=spec.datatype.name, shape=lead + list(spec.dims))
    for spec in schema.outputs.values():
        msg.outputs.add(name=spec.name, datatype=spec.datatype.name, shape=lead + list(spec.dims))
    return msg


def _duration(target: pb.StatisticDuration, d: Duration) -> None:
    target.count, target.ns = d.count, d.ns


def encode_model_statistics(models: Sequence[LoadedModel]) -> pb.ModelStatisticsResponse:
    msg = pb.ModelStatisticsResponse()
    for model in models:
        s = model.stats
        out = msg.model_stats.add(
            name=model.name,
            version=str(model.version),
            last_inference=s.last_inference_ms,
            inference_count=s.inference_count,
            execution_count=s.execution_count,
        )
        st = out.inference_stats
        for field_name in (
            "success",
            "fail",
            "queue",
            "compute_input",
            "compute_infer",
            "compute_output",
            "cache_hit",
            "cache_miss",
        ):
            _duration(getattr(st, field_name), getattr(s, field_name))
        for size in sorted(s.batch):
            b = s.batch[size]
            entry = out.batch_stats.add(batch_size=size)
            _duration(entry.compute_input, b.compute_input)
            _duration(entry.compute_infer, b.compute_infer)
            _duration(entry.compute_output, b.compute_output)
        for index in sorted(s.responses):
            r, response = s.responses[index], out.response_stats[str(index)]
            for field_name in ("compute_infer", "compute_output", "success", "fail", "empty_response", "cancel"):
                _duration(getattr(response, field_name), getattr(r, field_name))
    return msg


def encode_repository_index(rows: Sequence[IndexRow]) -> pb.RepositoryIndexResponse:
    msg = pb.RepositoryIndexResponse()
    for row in rows:
        msg.models.add(name=row.name, version=row.version, state=row.state, reason=row.reason)
    return msg


def load_files(msg: pb.RepositoryModelLoadRequest) -> dict[str, bytes] | None:
    """RepositoryModelLoad's "file:<path>" parameters (tritonclient's `load_model(files=...)`): the model directory
    to load from, path relative to it -> content. As in Triton they come with a "config". Each path must stay
    inside the directory; None when there are none."""
    files: dict[str, bytes] = {}
    for key, param in msg.parameters.items():
        if key == "config":
            continue
        if not key.startswith("file:"):
            # Ignored, a misspelt "confg" would reload the model from disk and answer OK: the caller would believe
            # its override took effect. Triton refuses it too.
            raise InvalidRequestError(
                msg.model_name, None, f"unrecognized load parameter '{key}' (known: 'config', 'file:<path>')"
            )
        path = key.removeprefix("file:")
        rel = relative_path(path)
        # Written as it will be stored: one spelling per file (no "." or empty parts), no Windows separator.
        if rel is None or str(rel) != path or "\\" in path:
            raise InvalidRequestError(
                msg.model_name, None, f"'{key}' is not a path inside the model directory (like 'file:1/model.onnx')"
            )
        if param.WhichOneof("parameter_choice") != "bytes_param":
            raise InvalidRequestError(msg.model_name, None, f"'{key}' must carry the file's content as bytes_param")
        files[path] = param.bytes_param
    if not files:
        return None
    if "config" not in msg.parameters:
        raise InvalidRequestError(
            msg.model_name, None, "model files sent with RepositoryModelLoad need the 'config' parameter too"
        )
    return files


def unload_dependents(msg: pb.RepositoryModelUnloadRequest) -> bool:
    """RepositoryModelUnload's one parameter, `unload_dependents` (a bool_param; tritonclient's
    `unload_model(..., unload_dependents=True)`). Any other is refused, where Triton ignores it: a misspelt one
    would leave the composing models loaded while the caller believes them gone."""
    for key, param in msg.parameters.items():
        if key != "unload_dependents":
            raise InvalidRequestError(
                msg.model_name, None, f"unrecognized unload parameter '{key}' (known: 'unload_dependents')"
            )
        if param.WhichOneof("parameter_choice") != "bool_param":
            raise InvalidRequestError(msg.model_name, None, "unload parameter 'unload_dependents' must be a bool_param")
    return "unload_dependents" in msg.parameters and msg.parameters["unload_dependents"].bool_param


def load_config_override(msg: pb.RepositoryModelLoadRequest) -> str | None:
    """RepositoryModelLoad's optional "config" parameter: a ModelConfig in JSON, turned into text format.

    Returns None when absent.
    """
    if "config" not in msg.parameters:
        return None
    if msg.parameters["config"].WhichOneof("parameter_choice") != "string_param":
        raise InvalidRequestError(msg.model_name, None, "load parameter 'config' must be a string_param (JSON)")
    text = msg.parameters["config"].string_param
    config = mc.ModelConfig()
    try:
        json_format.Parse(text, config)
    except json_format.ParseError as exc:
        raise InvalidRequestError(
            msg.model_name, None, f"the 'config' parameter is not a valid ModelConfig: {exc}"
        ) from exc
    text_out = text_format.MessageToString(config)
    # Text format leaves a 0 out; written on purpose (no batch dimension), it must not be auto-completed to 4.
    if config.max_batch_size == 0 and {"max_batch_size", "maxBatchSize"} & set(json.loads(text)):
        text_out += "max_batch_size: 0\n"
    return text_out
