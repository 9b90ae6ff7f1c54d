"""The client's exceptions: one per gRPC status a caller handles differently, mapped in one place.

Tree::

    TensorgateClientError            .code (grpc.StatusCode), .details (the server's message), .retry_safe
    ├── InvalidArgument              INVALID_ARGUMENT: the request breaks the model's schema; fix the request
    ├── NotFound                     NOT_FOUND: no such model or version
    ├── AlreadyExists                ALREADY_EXISTS
    ├── FailedPrecondition           FAILED_PRECONDITION
    ├── PermissionDenied             PERMISSION_DENIED: the client's identity may not call this
    ├── Unauthenticated              UNAUTHENTICATED: no or bad credentials
    ├── ResourceExhausted            RESOURCE_EXHAUSTED: model queue full, or a message over the size limit
    ├── Unavailable                  UNAVAILABLE: server down or draining, model not ready
    ├── DeadlineExceeded             DEADLINE_EXCEEDED: the call's deadline passed
    ├── Cancelled                    CANCELLED
    ├── Unimplemented                UNIMPLEMENTED: the server lacks this RPC
    ├── Internal                     INTERNAL / UNKNOWN / DATA_LOSS: the model or the server failed
    ├── StreamItemError              one failed request of a ModelStreamInfer stream (the stream goes on)
    └── ResponseFormatError          a response the client cannot decode (a server bug)

``retry_safe`` is True only where sending the same request again can neither run it twice nor be pointless:
UNAVAILABLE, RESOURCE_EXHAUSTED and ABORTED, which tensorgate answers before a request runs (not ready, draining,
queue full). After DEADLINE_EXCEEDED, CANCELLED or INTERNAL the model may have run; after INVALID_ARGUMENT or
NOT_FOUND the same request fails again, as after a refusal the server marks ``permanent`` (a tensor over its size
limit); nor is a TLS handshake the client refused (UNAVAILABLE whose details begin
"TLS handshake failed", with what to check): its certificates or address need fixing first.

Every error survives pickling (a ProcessPoolExecutor or a task queue hands it to another process).

Usage::

    try:
        result = client.infer("add_sub", inputs)
    except NotFound:
        ...
    except TensorgateClientError as exc:
        log.warning("%s (%s), retry safe: %s", exc.details, exc.code.name, exc.retry_safe)
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import grpc

from tensorgate.protos.tensors import PERMANENT_METADATA

__all__ = [
    "AlreadyExists",
    "Cancelled",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "ResponseFormatError",
    "StreamItemError",
    "TensorgateClientError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "from_rpc_error",
]

_CLIENT_LIMIT = re.compile(r"(?:Stream removed \()?CLIENT: ")
"""How gRPC's own refusals of a message over the client's limits begin (the sync client's say "Stream removed")."""
_RETRY_SAFE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED})
_TRANSPORT = "failed to connect to all addresses"
"""How gRPC's own UNAVAILABLE begins when no connection could be made; a server's UNAVAILABLE (e.g. about a model's
upstream) never does, whatever it says after."""
_HANDSHAKE_PREFIX = "TLS handshake failed"
_HANDSHAKE_HINTS = (
    (
        "Hostname Verification Check failed",
        "the server's certificate does not name the host of the address; connect by a name it has, or set "
        "TLSConfig(server_name_override=...)",
    ),
    ("WRONG_VERSION_NUMBER", "the port does not speak TLS (a plaintext port?); connect without tls"),
    (
        "CERTIFICATE_VERIFY_FAILED",
        "the server's certificate is not signed by the CA of TLSConfig.ca_file (the system roots without one), or "
        "has expired",
    ),
    ("Tls handshake failed", "check TLSConfig's files against the server's TLS settings"),
)
"""gRPC's words for a handshake the client itself refused, and what to check. A handshake the *server* refuses
(no or untrusted client certificate, a plaintext client on a TLS port) reaches the client as a bare "Socket
closed", which a server going away also gives: that one stays retry-safe."""


class TensorgateClientError(Exception):
    """A failed call: the gRPC status code, the server's message, and whether sending it again is safe."""

    code_default: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        details: str,
        code: grpc.StatusCode | None = None,
        *,
        method: str = "",
        ran: bool = False,
        permanent: bool = False,
    ) -> None:
        self.code: grpc.StatusCode = code if code is not None else self.code_default
        self.details = details
        self.method = method
        """The RPC that failed (e.g. "ModelInfer"), when known."""
        self.ran = ran
        """The server said the work was done before it failed (gRPC retry pushback < 0): never send it again."""
        self.permanent = permanent
        """The server said the same request would be refused again (a tensor over a size limit): fix it first."""
        where = f"{method}: " if method else ""
        super().__init__(f"{where}{self.code.name}: {details}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception's own pickling calls cls(*self.args), which gives the message as ``details`` and cannot call a
        # subclass with keyword-only arguments (StreamItemError) at all.
        return _restore, (type(self), self.args), self.__dict__

    @property
    def retry_safe(self) -> bool:
        """True when a retry may succeed and cannot make the server run the request twice. Not for a message over
        the client's own size limits ("CLIENT: ..."): a request too large to send always will be, and a response
        too large to receive means the server ran the request. Not for a failed TLS handshake either."""
        client_side = self.code == grpc.StatusCode.RESOURCE_EXHAUSTED and bool(_CLIENT_LIMIT.match(self.details))
        handshake = self.code == grpc.StatusCode.UNAVAILABLE and self.details.startswith(_HANDSHAKE_PREFIX)
        return self.code in _RETRY_SAFE and not (self.ran or self.permanent or client_side or handshake)


def _restore(cls: type[TensorgateClientError], args: tuple[Any, ...]) -> TensorgateClientError:
    error = cls.__new__(cls)
    error.args = args
    return error


class InvalidArgument(TensorgateClientError):
    code_default = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(TensorgateClientError):
    code_default = grpc.StatusCode.NOT_FOUND


class AlreadyExists(TensorgateClientError):
    code_default = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(TensorgateClientError):
    code_default = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(TensorgateClientError):
    code_default = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(TensorgateClientError):
    code_default = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(TensorgateClientError):
    code_default = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(TensorgateClientError):
    code_default = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(TensorgateClientError):
    code_default = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(TensorgateClientError):
    code_default = grpc.StatusCode.CANCELLED


class Unimplemented(TensorgateClientError):
    code_default = grpc.StatusCode.UNIMPLEMENTED


class Internal(TensorgateClientError):
    code_default = grpc.StatusCode.INTERNAL


class StreamItemError(TensorgateClientError):
    """One request of a stream failed; the stream and its other requests go on.

    ModelStreamInfer carries a failed request's message but no status code: ``code`` is the one tensorgate sends
    in the item's parameters (so that ``retry_safe`` holds for a draining server's refusal), and UNKNOWN from a
    server that sends none (Triton), ``retry_safe`` then False. ``request_id``, ``model`` and ``version`` say which
    request it was.
    """

    def __init__(
        self,
        details: str,
        *,
        request_id: str,
        model: str,
        version: str,
        code: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
        ran: bool = False,
        permanent: bool = False,
    ) -> None:
        super().__init__(details, code, method="ModelStreamInfer", ran=ran, permanent=permanent)
        self.request_id = request_id
        self.model = model
        self.version = version

    @property
    def id(self) -> str:
        """The request's id, as ``InferResult.id``: a loop over a stream's items reads it from either."""
        return self.request_id


class ResponseFormatError(TensorgateClientError):
    """The server answered, but its response breaks the protocol (e.g. tensor bytes not matching the shape)."""

    code_default = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[TensorgateClientError]] = {
    cls.code_default: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        PermissionDenied,
        Unauthenticated,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        Unimplemented,
        Internal,
    )
}
_BY_CODE[grpc.StatusCode.UNKNOWN] = Internal
_BY_CODE[grpc.StatusCode.DATA_LOSS] = Internal


def from_rpc_error(exc: grpc.RpcError, method: str = "") -> TensorgateClientError:
    """The typed exception for a failed grpc call (sync ``grpc.RpcError`` or ``grpc.aio.AioRpcError``)."""
    code_fn = getattr(exc, "code", None)
    details_fn = getattr(exc, "details", None)
    code = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    details = (details_fn() if callable(details_fn) else None) or "(the server sent no details)"
    trailing_fn = getattr(exc, "trailing_metadata", None)
    trailing = (trailing_fn() if callable(trailing_fn) else None) or ()
    permanent = PERMANENT_METADATA in [(key, str(value)) for key, value in trailing]
    ran = not permanent and any(
        key == "grpc-retry-pushback-ms" and str(value).startswith("-") for key, value in trailing
    )
    if code == grpc.StatusCode.UNAVAILABLE and details.startswith(_TRANSPORT):
        details = _handshake_details(details)
    cls = _BY_CODE.get(code, TensorgateClientError)
    return cls(details, code, method=method, ran=ran, permanent=permanent)


def _handshake_details(details: str) -> str:
    """gRPC's details of a failed connection, led by what to check when the client refused the TLS handshake."""
    for words, hint in _HANDSHAKE_HINTS:
        if words in details:
            return f"{_HANDSHAKE_PREFIX}: {hint} (gRPC: {details})"
    return details
