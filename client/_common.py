"""What the sync and the asyncio client share: building requests, decoding responses, result types.

Both clients only differ in how they call the stub (blocking or awaiting); every message they send is built here
and every response is read here.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from opentelemetry import propagate

from tensorgate.client.errors import NotFound, ResponseFormatError
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos import model_config_pb2 as mc
from tensorgate.protos import tensors
from tensorgate.protos.service import SERVICE_NAME

__all__ = ["InferResult", "ModelMetadata", "TensorMetadata"]


@dataclass(frozen=True)
class InferResult:
    """One inference's outputs as numpy arrays (BYTES as object arrays of ``bytes``), by output name.

    ``result["OUTPUT0"]`` is ``result.outputs["OUTPUT0"]``. Fixed-size outputs are read-only views of the
    response bytes; ``.copy()`` one to modify it.
    """

    outputs: dict[str, np.ndarray]
    model: str
    version: str
    id: str
    parameters: dict[str, tensors.ParamValue] = field(default_factory=dict)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.outputs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.outputs)

    def __len__(self) -> int:
        return len(self.outputs)


@dataclass(frozen=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: tuple[int, ...]
    """-1 marks a variable dimension (the batch dimension first when the model batches)."""


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]


def infer_request(
    model: str,
    inputs: Mapping[str, np.ndarray],
    *,
    outputs: Sequence[str] | None = None,
    version: str | int | None = None,
    request_id: str | None = None,
    priority: int | None = None,
    class_counts: Mapping[str, int] | None = None,
    sequence_id: int | str | None = None,
    sequence_start: bool = False,
    sequence_end: bool = False,
    parameters: Mapping[str, tensors.ParamValue] | None = None,
) -> pb.ModelInferRequest:
    """ModelInferRequest with raw contents; the datatype of each input comes from its numpy dtype.

    Raises TypeError for an input that is not a numpy array or whose dtype the protocol cannot carry, or a
    parameter that is not a bool, int, float or str; ValueError for a class count that is not a positive integer,
    sequence flags without a sequence ID, or a parameter that a keyword argument sets.
    """
    arrays: list[tuple[str, np.ndarray]] = []
    for name, value in inputs.items():
        if not isinstance(value, np.ndarray):
            raise TypeError(f"input '{name}': expected a numpy array, got {type(value).__name__}")
        try:
            tensors.from_numpy(value.dtype)
        except KeyError as exc:
            raise TypeError(f"input '{name}': {exc.args[0]}") from None
        arrays.append((name, value))
    parameters = request_parameters(parameters)
    if priority is not None:
        parameters["priority"] = int(priority)
    if sequence_id is not None and sequence_id not in (0, ""):
        if not isinstance(sequence_id, str) and not 0 < int(sequence_id) < 2**64:
            raise ValueError(f"sequence_id must be a string or an integer in 1..2**64-1, got {sequence_id}")
        # As Triton's clients send them: the ID as int64 or string, both flags always. An ID past int64 goes as
        # its two's complement, as Triton's C++ client and perf_analyzer send their uint64 IDs: Triton reads
        # int64_param as uint64 and refuses uint64_param.
        if isinstance(sequence_id, str):
            parameters["sequence_id"] = sequence_id
        else:
            parameters["sequence_id"] = int(sequence_id) - 2**64 if int(sequence_id) >= 2**63 else int(sequence_id)
        parameters["sequence_start"] = bool(sequence_start)
        parameters["sequence_end"] = bool(sequence_end)
    elif sequence_start or sequence_end:
        raise ValueError("sequence_start and sequence_end need a sequence_id")
    return tensors.encode_infer_request(
        model,
        arrays,
        version="" if version is None else str(version),
        request_id=request_id or "",
        outputs=list(outputs or ()),
        parameters=parameters,
        class_counts=class_counts,
    )


_KEYWORD_PARAMETERS = ("priority", "sequence_id", "sequence_start", "sequence_end")
"""Request parameters that ``infer`` sets from its keyword arguments, which know their encodings (a sequence ID
past int64, the flags that go with it)."""


def request_parameters(parameters: Mapping[str, tensors.ParamValue] | None) -> dict[str, tensors.ParamValue]:
    """A call's ``parameters`` checked before they are encoded: protobuf's own errors name neither the parameter
    nor the rule, and a numpy scalar (np.int64(3), np.float32(0.5)) would be sent as a string."""
    out: dict[str, tensors.ParamValue] = {}
    for key, value in (parameters or {}).items():
        if key in _KEYWORD_PARAMETERS:
            raise ValueError(f"parameter '{key}': set it with the {key}= argument, not in parameters")
        if not isinstance(key, str) or not key:
            raise TypeError(f"parameter {key!r}: names are non-empty strings")
        if not isinstance(value, bool | int | float | str):
            raise TypeError(f"parameter '{key}': expected bool, int, float or str, got {type(value).__name__}")
        if isinstance(value, int) and not -(2**63) <= value < 2**64:
            raise ValueError(f"parameter '{key}': {value} is out of the int64/uint64 range")
        out[key] = value
    return out


def infer_result(msg: pb.ModelInferResponse) -> InferResult:
    try:
        outputs = tensors.decode_infer_response(msg)
    except (tensors.TensorFormatError, KeyError) as exc:
        raise ResponseFormatError(f"model '{msg.model_name}': {exc}", method="ModelInfer") from exc
    return InferResult(
        outputs=outputs,
        model=msg.model_name,
        version=msg.model_version,
        id=msg.id,
        parameters=tensors.parameters_of(msg.parameters),
    )


def stream_item_status(msg: pb.ModelInferResponse) -> tuple[grpc.StatusCode, bool, bool]:
    """A failed stream item's status code, whether its work was done, and whether it would be refused again, as
    tensorgate sends them in the item's parameters (tensors.STATUS_CODE, tensors.RAN, tensors.PERMANENT);
    UNKNOWN, False and False from a server that sends none (Triton)."""
    params = msg.parameters
    code, ran, permanent = (params.get(key) for key in (tensors.STATUS_CODE, tensors.RAN, tensors.PERMANENT))
    status = getattr(grpc.StatusCode, code.string_param, None) if code is not None else None
    if not isinstance(status, grpc.StatusCode) or status == grpc.StatusCode.OK:
        status = grpc.StatusCode.UNKNOWN
    return status, ran is not None and ran.bool_param, permanent is not None and permanent.bool_param


def model_metadata(msg: pb.ModelMetadataResponse) -> ModelMetadata:
    def tensor(t: pb.ModelMetadataResponse.TensorMetadata) -> TensorMetadata:
        return TensorMetadata(name=t.name, datatype=t.datatype, shape=tuple(t.shape))

    return ModelMetadata(
        name=msg.name,
        versions=tuple(msg.versions),
        platform=msg.platform,
        inputs=tuple(tensor(t) for t in msg.inputs),
        outputs=tuple(tensor(t) for t in msg.outputs),
    )


def load_request(model: str, config: mc.ModelConfig | Mapping[str, Any] | str | None) -> pb.RepositoryModelLoadRequest:
    """RepositoryModelLoad, with Triton's optional "config" parameter: a ModelConfig as JSON."""
    msg = pb.RepositoryModelLoadRequest(model_name=model)
    if config is not None:
        if isinstance(config, mc.ModelConfig):
            text = json_format.MessageToJson(config)
        elif isinstance(config, str):
            text = config
        else:
            text = json.dumps(dict(config))
        msg.parameters["config"].string_param = text
    return msg


Headers = tuple[tuple[str, str], ...]

_HEADER_KEY = re.compile(r"[0-9a-z_.-]+")


def check_headers(headers: Mapping[str, str] | None) -> Headers:
    """The client's ``headers`` as gRPC metadata, checked when the client is made: gRPC itself only refuses bad
    metadata when a call is sent, with a message that does not name the header.

    Keys are lowercased (gRPC metadata keys are); values must be printable ASCII, and keys ending in ``-bin`` or
    starting with ``grpc-`` (binary and reserved metadata) are refused.
    """
    out: list[tuple[str, str]] = []
    for key, value in (headers or {}).items():
        name = str(key).lower()
        if not _HEADER_KEY.fullmatch(name) or name.startswith("grpc-") or name.endswith("-bin"):
            raise ValueError(
                f"header {key!r}: not a gRPC metadata key (letters, digits, '-', '_', '.'; no grpc- prefix, no -bin)"
            )
        if not isinstance(value, str) or not all(" " <= c <= "~" for c in value):
            # Never the value itself: it is likely a token.
            raise ValueError(f"header {key!r}: the value must be a string of printable ASCII characters")
        out.append((name, value))
    return tuple(out)


def call_metadata(headers: Headers, per_call: Mapping[str, str] | None = None) -> Headers | None:
    """The metadata of one call: the client's headers (``per_call`` ones replace those of the same name, then
    join them), then the caller's current OpenTelemetry context (W3C `traceparent`, `tracestate`, `baggage`,
    through the application's global propagator), so that the server's spans join the caller's trace.

    None when there is neither: an application without headers or OpenTelemetry sends nothing extra.
    """
    if per_call:
        extra = check_headers(per_call)
        names = {name for name, _ in extra}
        headers = tuple(pair for pair in headers if pair[0] not in names) + extra
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    if not carrier:
        return headers or None
    return headers + tuple(carrier.items())


@contextlib.contextmanager
def health_service(service: str) -> Iterator[None]:
    """A health check of a service the server does not report: grpc.health.v1 answers a bare NOT_FOUND, with no
    message at all, so the error says what it means and what tensorgate reports."""
    try:
        yield
    except NotFound as exc:
        raise NotFound(
            f"the server does not report health for service {service!r} (tensorgate reports '' for the whole "
            f"server and '{SERVICE_NAME}' for inference)",
            method=exc.method,
        ) from exc


def version_str(version: str | int | None) -> str:
    return "" if version is None else str(version)


# ----- construction shared by both clients -----------------------------------------------------------------------


MAX_TIMEOUT_S = 1e8
"""About three years: longer timeouts (math.inf included) are this long. gRPC takes a deadline much further out
(1e10 s) for one that has already passed, and every call would fail at once with DEADLINE_EXCEEDED."""


_URL_SCHEME = re.compile(r"(?:https?|grpcs?)://", re.IGNORECASE)


def check_url(url: str) -> str:
    """The client's address, refused with what to write instead when it is an http(s):// or grpc(s):// URL.

    gRPC takes host:port (or its own targets: dns:///host:port, unix:path, ...) and would look ``http://h:p`` up
    as a host name, failing every call with an UNAVAILABLE that RetryPolicy retries as if the server were down.
    It is refused rather than stripped: "https://" asks for TLS, which only ``tls=`` gives, and an http:// address
    is often a server's HTTP port rather than its gRPC one.
    """
    scheme = _URL_SCHEME.match(url)
    if scheme is not None:
        bare = url[scheme.end() :].rstrip("/")
        raise ValueError(
            f"url {url!r}: gRPC takes host:port without a scheme: use {bare!r} (with tls=TLSConfig(...) for TLS)"
        )
    return url


def check_timeout(timeout: float) -> float:
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
    return min(float(timeout), MAX_TIMEOUT_S)


StreamRequest = Mapping[str, Any] | tuple[str, Mapping[str, np.ndarray]]
"""One request of ``stream_infer``: ``(model, inputs)`` or a dict with the keyword arguments of ``infer``
(``model``, ``inputs``, and optionally ``outputs``, ``version``, ``request_id``, ``priority``, ``sequence_id``,
``sequence_start``, ``sequence_end``, ``parameters``)."""

_STREAM_KEYS = frozenset(
    {"model", "inputs", "outputs", "version", "request_id", "priority", "parameters", *_KEYWORD_PARAMETERS}
)


def unload_request(model: str, unload_dependents: bool) -> pb.RepositoryModelUnloadRequest:
    """``unload_dependents``: also the models an ensemble's load brought in that nothing else still needs, as
    Triton does."""
    request = pb.RepositoryModelUnloadRequest(model_name=model)
    if unload_dependents:
        request.parameters["unload_dependents"].bool_param = True
    return request


def stream_request(item: StreamRequest, index: int, stream: str) -> pb.ModelInferRequest:
    """A stream item as a request; one without ``request_id`` gets ``{stream}-{index}``: unique beyond its stream,
    because a server keeps ids (tensorgate's captures, which feedback finds by id), and index-only ids repeat
    on every stream."""
    if isinstance(item, tuple):
        model, inputs = item
        kwargs: dict[str, Any] = {}
    elif isinstance(item, Mapping):
        unknown = set(item) - _STREAM_KEYS
        if unknown or "model" not in item or "inputs" not in item:
            raise TypeError(
                f"stream request {index}: needs 'model' and 'inputs', may have {sorted(_STREAM_KEYS)}; "
                f"got {sorted(item)}"
            )
        kwargs = {k: v for k, v in item.items() if k not in ("model", "inputs")}
        model, inputs = item["model"], item["inputs"]
    else:
        raise TypeError(f"stream request {index}: expected (model, inputs) or a dict, got {type(item).__name__}")
    if kwargs.get("request_id") is None:
        kwargs["request_id"] = f"{stream}-{index}"
    return infer_request(model, inputs, **kwargs)
