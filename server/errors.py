"""tensorgate's exceptions: each one knows its gRPC status and builds its message from structured fields.

    TensorgateError                       (INTERNAL)
    ├── ModelNotFoundError                (NOT_FOUND)          unknown model, or unknown version of a model
    ├── ModelUnavailableError             (UNAVAILABLE)        known model that is not ready (loading, failed, unloaded)
    ├── InvalidRequestError               (INVALID_ARGUMENT)   a request that breaks the model's schema or the protocol
    ├── ResourceExhaustedError            (RESOURCE_EXHAUSTED) a limit was hit (queue full, size limit)
    ├── DeadlineExceededError             (DEADLINE_EXCEEDED)
    ├── ServerUnavailableError            (UNAVAILABLE)        the server is draining or model control is off
    ├── PermissionDeniedError             (PERMISSION_DENIED)  the authorization policy does not allow this call
    ├── UnauthenticatedError              (UNAUTHENTICATED)    a bearer token is required and missing or invalid
    ├── ModelLoadError                    (UNAVAILABLE)        a model could not be loaded; the reason is kept
    ├── InvalidConfigError                (INVALID_ARGUMENT)   config.pbtxt is malformed or contradicts the model
    ├── BackendError                      (INTERNAL)           the model itself failed while running
    └── UnimplementedError                (UNIMPLEMENTED)

The RPC layer maps these to statuses in one place (server/rpc/errors.py); anything else that escapes becomes
INTERNAL with a generic message, and only the log carries the details.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc

# Control characters but tab (C0, DEL and C1, whose 0x9B some terminals take for an escape sequence), the line
# breaks that str.splitlines (and some log viewers) split at besides, and the bidirectional overrides and isolates,
# which make a terminal show text in another order than it is written.
ESCAPED_CODES = [
    *(c for c in range(0x20) if c != ord("\t")),
    *range(0x7F, 0xA0),
    0x2028,
    0x2029,
    *range(0x202A, 0x202F),
    *range(0x2066, 0x206A),
]
CONTROL_ESCAPES = {c: ascii(chr(c))[1:-1] for c in ESCAPED_CODES}
"""Each of those characters as Python writes it escaped (a newline as `\\n`), for str.translate."""

SHOWN_NAME_CHARS = 256
"""The most of a caller's name (model, version, tensor) that a message quotes: a message travels in gRPC's status
header, and a client refuses a header over 8 KiB, reporting that instead of the error."""


def shown(name: object) -> str:
    """A name as messages quote it, cut when longer than SHOWN_NAME_CHARS."""
    text = str(name)
    if len(text) <= SHOWN_NAME_CHARS:
        return text
    return f"{text[:SHOWN_NAME_CHARS]}... ({len(text)} characters)"


def model_ref(model: str, version: str | int | None = None) -> str:
    """How every message names a model: `'digits'` or `'digits' version 2`."""
    return f"model '{shown(model)}'" if version in (None, "") else f"model '{shown(model)}' version {shown(version)}"


class TensorgateError(Exception):
    """Base class; `code` is the gRPC status the caller receives."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    ran: bool = False
    """The work was done before the error (a response over the size limit, a load that failed): the caller is told
    not to send it again, even for a code that is otherwise answered before anything runs."""
    permanent: bool = False
    """The same request would be refused again (a tensor over a size limit): answered so that gRPC's retry policies
    do not send it again, although its code (RESOURCE_EXHAUSTED) is one they retry."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ModelNotFoundError(TensorgateError):
    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, model: str, version: str | int | None = None, detail: str = "") -> None:
        what = f"version {shown(version)} of model '{shown(model)}'" if version not in (None, "") else model_ref(model)
        super().__init__(f"{what} is not found in the repository" + (f": {detail}" if detail else ""))
        self.model, self.version = model, version


class ModelUnavailableError(TensorgateError):
    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, model: str, version: str | int | None, reason: str) -> None:
        super().__init__(f"{model_ref(model, version)} is not ready: {reason}")
        self.model, self.version, self.reason = model, version, reason


class InvalidRequestError(TensorgateError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, model: str, version: str | int | None, problem: str, *, tensor: str | None = None) -> None:
        where = f"{model_ref(model, version)}" + (f", tensor '{shown(tensor)}'" if tensor is not None else "")
        super().__init__(f"{where}: {problem}")
        self.model, self.version, self.tensor, self.problem = model, version, tensor, problem


class ResourceExhaustedError(TensorgateError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceededError(TensorgateError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ServerUnavailableError(TensorgateError):
    code = grpc.StatusCode.UNAVAILABLE


class PermissionDeniedError(TensorgateError):
    code = grpc.StatusCode.PERMISSION_DENIED

    def __init__(
        self, identity: str, rpc: str, model: str | None = None, version: str | int | None = None, hint: str = ""
    ) -> None:
        what = f" on {model_ref(model, version)}" if model else ""
        super().__init__(f"identity '{identity}' may not call {rpc}{what}{hint}")
        self.identity, self.rpc, self.model, self.version = identity, rpc, model, version


class UnauthenticatedError(TensorgateError):
    code = grpc.StatusCode.UNAUTHENTICATED


class ModelLoadError(TensorgateError):
    code = grpc.StatusCode.UNAVAILABLE
    ran = True  # the load was attempted: sending RepositoryModelLoad again would only repeat it

    def __init__(self, model: str, version: str | int | None, reason: str, *, transient: bool = False) -> None:
        super().__init__(f"failed to load {model_ref(model, version)}: {reason}")
        self.model, self.version, self.reason = model, version, reason
        self.transient = transient
        """The load failed on something outside the files that may change by itself (an upstream server that is
        down, or that does not serve the model yet): worth trying again unasked."""


class InvalidConfigError(TensorgateError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, model: str, problem: str) -> None:
        super().__init__(f"invalid configuration for {model_ref(model)}: {problem}")
        self.model, self.problem = model, problem


class BackendError(TensorgateError):
    code = grpc.StatusCode.INTERNAL

    def __init__(self, model: str, version: str | int | None, detail: str) -> None:
        super().__init__(f"{model_ref(model, version)} failed during execution: {detail}")
        self.model, self.version = model, version


class InvalidSettingError(TensorgateError):
    """A server setting (LogSettings, TraceSetting) that cannot be changed as asked; names no model."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPreconditionError(TensorgateError):
    """What was asked needs the server started otherwise (TraceSetting on a server started without tracing)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class UnimplementedError(TensorgateError):
    code = grpc.StatusCode.UNIMPLEMENTED


def shown_path(path: Path, base: Path) -> str:
    """A server file as messages that clients read (load errors, RepositoryIndex) name it: relative to `base` (the
    model repository, or a model's directory), or by its name alone; never by the server's directory layout."""
    return str(path.relative_to(base) if path.is_relative_to(base) else Path(path.name))


def without_paths(text: str, base: Path, *paths: Path) -> str:
    """A foreign library's message (onnxruntime's names files by absolute path) with `paths` named as `shown_path`
    names them. The longest first: a folder's path begins its files' paths."""
    for path in sorted(paths, key=lambda p: len(str(p)), reverse=True):
        if path.parent != path:  # the root's "/" is in every path: not one to replace
            text = text.replace(str(path), shown_path(path, base))
    return text


def os_error_text(exc: OSError, base: Path) -> str:
    """An OSError as clients may read it: its own text carries the server's absolute path, which `shown_path`
    names instead."""
    why = exc.strerror or type(exc).__name__
    if exc.filename is None:
        return why
    return f"{shown_path(Path(os.fsdecode(exc.filename)), base)}: {why}"


def unexpected_error_text(exc: Exception, base: Path) -> str:
    """An error no check foresaw, for the reason a failed load records (the log has the traceback)."""
    detail = os_error_text(exc, base) if isinstance(exc, OSError) else str(exc)
    return f"unexpected error: {type(exc).__name__}: {detail}"


def with_prefix(exc: TensorgateError, prefix: str) -> TensorgateError:
    """A copy of `exc` (its class, status and fields) whose message starts with `prefix`, for an error passed up
    with where it happened (an ensemble's step). A copy: a failed batch hands one exception to every request in it,
    and the others must not read this request's context."""
    cls = type(exc)
    copy = cls.__new__(cls)
    copy.__dict__.update(exc.__dict__)
    message = prefix + exc.message
    Exception.__init__(copy, message)
    copy.message = message
    return copy
