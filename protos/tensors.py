"""Tensor wire format shared by the server and the client: datatypes, raw contents, BYTES framing.

Three spellings of an element type meet here: the wire name ("FP32"), Triton's ModelConfig enum (TYPE_FP32) and
the numpy dtype; everything that converts between them goes through one table so they never drift apart. Raw
contents decode to numpy views with ``np.frombuffer`` (no copy); a BYTES tensor is framed as a 4-byte
little-endian length followed by the bytes of each element, in row-major order.

It lives in ``tensorgate.protos`` so that the client can use it without importing the server. Malformed data
raises ``TensorFormatError`` (a ``ValueError``) with the rule broken; the server wraps it into its own
``InvalidRequestError`` naming model, version and tensor (``tensorgate.server.rpc.codec``).

Usage::

    request = encode_infer_request("add_sub", [("INPUT0", x), ("INPUT1", y)], outputs=["OUTPUT0"])
    outputs = decode_infer_response(await stub.ModelInfer(request, timeout=5))
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import numpy.typing as npt

from . import grpc_service_pb2 as pb
from . import model_config_pb2 as mc

__all__ = [
    "BY_CONFIG_TYPE",
    "BY_NAME",
    "DataType",
    "FINAL_RESPONSE",
    "ParamValue",
    "TensorFormatError",
    "TensorLimitError",
    "config_type_name",
    "decode_bytes_tensor",
    "decode_contents",
    "decode_infer_response",
    "decode_raw",
    "encode_array",
    "encode_bytes_tensor",
    "encode_infer_request",
    "from_npy",
    "from_numpy",
    "parameters_of",
    "set_parameter",
]

ParamValue = bool | int | str | float
"""What an ``InferParameter`` holds, as a plain Python value."""
FINAL_RESPONSE = "triton_final_response"
"""The response parameter that marks a request's last response on ModelStreamInfer, as Triton sets it."""
STATUS_CODE = "tensorgate_status_code"
"""The response parameter of a failed request's item on ModelStreamInfer: its gRPC status code's name (the stream
carries only the message). A client tells a refusal safe to send again (UNAVAILABLE: draining) from a failure of
the model (INTERNAL) by it; Triton's clients ignore it. `tensorgate_ran` (true) says the work was done anyway."""
RAN = "tensorgate_ran"
PERMANENT = "tensorgate_permanent"
"""Set (true) on a failed item, and as trailing metadata `tensorgate-permanent: 1` on a unary call, for a refusal
the same request would get again (a tensor over a size limit): a client's `retry_safe` is then False."""
PERMANENT_METADATA = ("tensorgate-permanent", "1")

_LEN = struct.Struct("<I")


class TensorFormatError(ValueError):
    """Tensor data that does not match its datatype and shape; the message states the rule broken."""


class TensorLimitError(TensorFormatError):
    """Well-formed tensor data over a size limit the reader set (a server refuses it as RESOURCE_EXHAUSTED)."""


@dataclass(frozen=True, slots=True)
class DataType:
    """One element type in all its spellings; `np_dtype` is little-endian, as the wire format is."""

    name: str
    config_type: int
    np_dtype: np.dtype[np.generic]
    contents_field: str | None

    @property
    def floating(self) -> bool:
        """FP16/32/64 and BF16: ml_dtypes.bfloat16 is no numpy float kind (`dtype.kind` is "V"), so ask this."""
        return self.np_dtype.kind == "f" or self.name == "BF16"

    @property
    def itemsize(self) -> int:
        """Bytes per element in `raw_*_contents`; BYTES has none (length-prefixed, variable)."""
        return 0 if self.name == "BYTES" else self.np_dtype.itemsize


def _dt(name: str, config_type: int, dtype: npt.DTypeLike, contents_field: str | None) -> DataType:
    return DataType(name, config_type, np.dtype(dtype), contents_field)


_ALL = (
    _dt("BOOL", mc.TYPE_BOOL, "?", "bool_contents"),
    _dt("UINT8", mc.TYPE_UINT8, "u1", "uint_contents"),
    _dt("UINT16", mc.TYPE_UINT16, "<u2", "uint_contents"),
    _dt("UINT32", mc.TYPE_UINT32, "<u4", "uint_contents"),
    _dt("UINT64", mc.TYPE_UINT64, "<u8", "uint64_contents"),
    _dt("INT8", mc.TYPE_INT8, "i1", "int_contents"),
    _dt("INT16", mc.TYPE_INT16, "<i2", "int_contents"),
    _dt("INT32", mc.TYPE_INT32, "<i4", "int_contents"),
    _dt("INT64", mc.TYPE_INT64, "<i8", "int64_contents"),
    # FP16 has no typed `contents` field in the protocol: it travels only as raw bytes.
    _dt("FP16", mc.TYPE_FP16, "<f2", None),
    _dt("FP32", mc.TYPE_FP32, "<f4", "fp32_contents"),
    _dt("FP64", mc.TYPE_FP64, "<f8", "fp64_contents"),
    # BF16 as tritonclient (r26.06 on) and JAX hold it: ml_dtypes.bfloat16, two bytes per element; raw bytes only.
    _dt("BF16", mc.TYPE_BF16, ml_dtypes.bfloat16, None),
    _dt("BYTES", mc.TYPE_STRING, "O", "bytes_contents"),
)

BY_NAME: dict[str, DataType] = {d.name: d for d in _ALL}
BY_CONFIG_TYPE: dict[int, DataType] = {d.config_type: d for d in _ALL}


def from_numpy(dtype: np.dtype[np.generic]) -> DataType:
    """The wire type for a numpy dtype; str/bytes/object arrays are BYTES.

    Raises KeyError for dtypes the protocol cannot carry (complex, datetime, ...).
    """
    if dtype.kind in "OUS":
        return BY_NAME["BYTES"]
    for d in _ALL:
        if d.name != "BYTES" and d.np_dtype == dtype.newbyteorder("<"):
            return d
    raise KeyError(f"numpy dtype {dtype} has no V2 datatype")


def from_npy(array: np.ndarray, datatype: str) -> np.ndarray:
    """An array read from a .npy file, for a tensor of `datatype`. .npy has no bfloat16: for BF16, a bfloat16 array
    saved as it is (raw two-byte elements, "|V2") is viewed as one again, and a float array is rounded to one.
    Other arrays come back as they are."""
    if datatype != "BF16":
        return array
    if array.dtype == np.dtype("V2"):
        return array.view(BY_NAME["BF16"].np_dtype)
    if array.dtype.kind == "f":
        return array.astype(BY_NAME["BF16"].np_dtype)
    return array


def config_type_name(config_type: int) -> str:
    """The wire name for a ModelConfig data type (TYPE_STRING -> BYTES), or the enum name when unsupported."""
    d = BY_CONFIG_TYPE.get(config_type)
    if d is not None:
        return d.name
    return str(mc.DataType.Name(config_type)).removeprefix("TYPE_")


# ----- raw contents ----------------------------------------------------------------------------------------------


def decode_bytes_tensor(buf: bytes, count: int, max_element_bytes: int | None = None) -> np.ndarray:
    """Split length-prefixed BYTES elements into a flat object array of `count` bytes objects.

    `max_element_bytes` refuses (TensorLimitError) an element longer than that before copying it.
    """
    offset, size = 0, len(buf)
    if count > size // _LEN.size:
        # Checked before allocating: every element takes at least its 4-byte length, so a shape far larger than
        # the data is refused here instead of reserving memory for it.
        raise TensorFormatError(
            f"malformed BYTES data: the shape needs {count} elements but {size} bytes hold at most {size // 4}"
        )
    out = np.empty(count, dtype=object)
    view = memoryview(buf)
    for i in range(count):
        if offset + 4 > size:
            raise TensorFormatError(f"malformed BYTES data: expected {count} elements, found {i}")
        (length,) = _LEN.unpack_from(view, offset)
        offset += 4
        # Framing first: a length beyond the data is malformed, not over a limit that a larger one would pass.
        if offset + length > size:
            raise TensorFormatError(
                f"malformed BYTES data: element {i} declares {length} bytes but only {size - offset} remain"
            )
        if max_element_bytes is not None and length > max_element_bytes:
            raise TensorLimitError(f"BYTES element {i} has {length} bytes, over the limit of {max_element_bytes}")
        out[i] = bytes(view[offset : offset + length])
        offset += length
    if offset != size:
        raise TensorFormatError(f"malformed BYTES data: {size - offset} bytes left over after {count} elements")
    return out


def encode_bytes_tensor(array: np.ndarray) -> bytes:
    """Length-prefix every element (bytes as is, str as UTF-8, anything else via str())."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        data = item if isinstance(item, bytes) else str(item).encode("utf-8")
        parts.append(_LEN.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def decode_raw(raw: bytes, dt: DataType, shape: tuple[int, ...], max_element_bytes: int | None = None) -> np.ndarray:
    """One tensor's raw contents as an array of `shape` (a read-only view for fixed-size types)."""
    count = math.prod(shape)
    if dt.name == "BYTES":
        return decode_bytes_tensor(raw, count, max_element_bytes).reshape(shape)
    expected = count * dt.itemsize
    if len(raw) != expected:
        raise TensorFormatError(
            f"raw content has {len(raw)} bytes but shape {list(shape)} of {dt.name} needs {expected}"
        )
    return np.frombuffer(raw, dtype=dt.np_dtype).reshape(shape)


def encode_array(array: np.ndarray, datatype: str) -> bytes:
    """The raw wire bytes of one tensor."""
    if datatype == "BYTES":
        return encode_bytes_tensor(array)
    dt = BY_NAME[datatype].np_dtype
    if array.dtype != dt:
        array = array.astype(dt)
    return np.ascontiguousarray(array).tobytes()


# ----- inference messages (the client side) ----------------------------------------------------------------------


def parameters_of(params: Mapping[str, pb.InferParameter]) -> dict[str, ParamValue]:
    """A protobuf parameter map as plain values (set_parameter's inverse); unknown keys are kept."""
    out: dict[str, ParamValue] = {}
    for key, value in params.items():
        choice = value.WhichOneof("parameter_choice")
        if choice is not None:
            out[key] = getattr(value, choice)
    return out


def set_parameter(params: Mapping[str, pb.InferParameter], key: str, value: ParamValue) -> None:
    """Store a plain value in a protobuf parameter map under the matching oneof field."""
    target = params[key]  # protobuf message maps create the entry on access
    if isinstance(value, bool):  # before int: bool is an int
        target.bool_param = value
    elif isinstance(value, int):
        if value > 2**63 - 1:  # only uint64 carries it (a sequence ID, say)
            target.uint64_param = value
        else:
            target.int64_param = value
    elif isinstance(value, float):
        target.double_param = value
    else:
        target.string_param = value


def encode_infer_request(
    model: str,
    inputs: Iterable[tuple[str, np.ndarray]],
    *,
    version: str = "",
    request_id: str = "",
    outputs: Sequence[str] = (),
    parameters: Mapping[str, ParamValue] | None = None,
    class_counts: Mapping[str, int] | None = None,
) -> pb.ModelInferRequest:
    """A ModelInferRequest with raw contents, the datatype of each input read from its numpy dtype.

    `class_counts` asks for outputs as their top k classes (Triton's classification extension); they are requested
    alongside `outputs`. Raises KeyError for a dtype the protocol cannot carry, ValueError for a class count that is
    not a positive integer.
    """
    msg = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for name, array in inputs:
        dt = from_numpy(array.dtype)
        msg.inputs.add(name=name, datatype=dt.name, shape=array.shape)
        msg.raw_input_contents.append(encode_array(array, dt.name))
    counts = dict(class_counts or {})
    for name, k in counts.items():
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"output '{name}': the class count must be a positive integer, got {k!r}")
    for name in [*outputs, *(n for n in counts if n not in outputs)]:
        out = msg.outputs.add(name=name)
        if name in counts:
            out.parameters["classification"].int64_param = counts[name]
    for key, value in (parameters or {}).items():
        set_parameter(msg.parameters, key, value)
    return msg


def decode_infer_response(msg: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Outputs of a response as numpy arrays (BYTES as object arrays of bytes).

    Raises TensorFormatError (naming the output) for contents that do not match the declared shape, and
    KeyError for an unknown datatype.
    """
    out: dict[str, np.ndarray] = {}
    raw = msg.raw_output_contents
    if len(raw) and len(raw) != len(msg.outputs):
        raise TensorFormatError(f"response has {len(msg.outputs)} outputs but {len(raw)} raw_output_contents entries")
    for i, tensor in enumerate(msg.outputs):
        dt = BY_NAME[tensor.datatype]
        shape = tuple(tensor.shape)
        try:
            if len(raw):
                out[tensor.name] = decode_raw(raw[i], dt, shape)
            else:  # the protocol also allows typed `contents` (MLServer answers that way)
                out[tensor.name] = decode_contents(tensor.contents, dt, shape, raw_field="raw_output_contents")
        except TensorFormatError as exc:
            raise TensorFormatError(f"output '{tensor.name}': {exc}") from exc
    return out


def decode_contents(
    contents: pb.InferTensorContents,
    dt: DataType,
    shape: tuple[int, ...],
    *,
    raw_field: str,
    max_element_bytes: int | None = None,
) -> np.ndarray:
    """One tensor's typed `contents` (the protocol's alternative to raw contents) as an array of `shape`.

    `raw_field` names where a type without a typed field must travel instead, for the message. Raises
    TensorFormatError, or TensorLimitError for a BYTES element longer than `max_element_bytes`.
    """
    if dt.contents_field is None:
        raise TensorFormatError(f"{dt.name} data must be sent in {raw_field}")
    values = getattr(contents, dt.contents_field)
    count = math.prod(shape)
    if len(values) != count:
        raise TensorFormatError(f"{dt.contents_field} has {len(values)} elements but shape {list(shape)} needs {count}")
    if dt.name == "BYTES":
        longest = max(map(len, values), default=0)
        if max_element_bytes is not None and longest > max_element_bytes:
            raise TensorLimitError(f"a BYTES element has {longest} bytes, over the limit of {max_element_bytes}")
        flat = np.empty(count, dtype=object)
        flat[:] = list(values)
        return flat.reshape(shape)
    try:
        return np.asarray(values, dtype=dt.np_dtype).reshape(shape)
    except OverflowError as exc:
        raise TensorFormatError(f"value out of range for {dt.name}") from exc
