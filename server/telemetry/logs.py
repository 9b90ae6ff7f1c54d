"""Log records that can be joined with traces: every record made inside a request carries its trace and span ids
and the caller's identity; `json` format writes one JSON object per line for log shippers.

Access lines (logger `tensorgate.access`, DEBUG) are written by the RPC boundary, server/rpc/errors.py.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

from opentelemetry import trace

from tensorgate.server.auth.identity import ANONYMOUS, CURRENT_IDENTITY
from tensorgate.server.errors import CONTROL_ESCAPES, ESCAPED_CODES

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s%(request_context)s"


class RequestContextFilter(logging.Filter):
    """Adds `trace_id`, `span_id` and `identity` to each record (empty outside a traced request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = trace.get_current_span().get_span_context()
        identity = CURRENT_IDENTITY.get()
        identity = "" if identity == ANONYMOUS else identity
        trace_id = format(ctx.trace_id, "032x") if ctx.is_valid else ""
        span_id = format(ctx.span_id, "016x") if ctx.is_valid else ""
        parts = []
        if trace_id:
            parts.append(f"trace_id={trace_id} span_id={span_id}")
        if identity:
            parts.append(f"identity={identity}")
        record.__dict__.update(
            trace_id=trace_id,
            span_id=span_id,
            identity=identity,
            request_context=f" [{' '.join(parts)}]" if parts else "",
        )
        return True


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT with the line's control characters escaped (a newline as `\\n`): a log line quotes strings the
    caller chose (an access line's model name and request id), and one with a newline in it would otherwise start
    a line of its own that a reader, or a log shipper, takes for the server's. A traceback, appended after the
    line, keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        return super().formatMessage(record).translate(CONTROL_ESCAPES)


JSON_ESCAPES = {c: f"\\u{c:04x}" for c in ESCAPED_CODES if c >= 0x7F}
"""The characters of ESCAPED_CODES that json.dumps leaves as they are, as JSON's own escapes (still valid JSON)."""


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, trace/span ids, identity, exception text."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("trace_id", "span_id", "identity"):
            value = getattr(record, key, "")
            if value:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        # json.dumps escapes C0 controls only: NEL, the line separators, C1 and bidirectional controls would go out
        # raw, and a reader splitting lines as str.splitlines does (some log viewers) would see a forged line.
        return json.dumps(out, ensure_ascii=False).translate(JSON_ESCAPES)


class CallAlreadyOverFilter(logging.Filter):
    """grpc.aio logs an ERROR with a traceback when it cannot send an answer because the call has already ended
    (the caller's deadline passed, or it cancelled, while the answer was on its way). The caller has its status
    from gRPC already and the server is fine, so that is a DEBUG line without the traceback."""

    PREFIX = "ExecuteBatchError raised in core by servicer method"

    def filter(self, record: logging.LogRecord) -> bool:
        if not (isinstance(record.msg, str) and record.msg.startswith(self.PREFIX)):
            return True
        record.msg = "the call ended (deadline or cancel) before its answer was sent: %s"
        record.args = (record.args[0] if isinstance(record.args, tuple) and record.args else "",)
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.exc_info, record.exc_text = None, None
        return logging.getLogger().isEnabledFor(logging.DEBUG)


class LoopNoticeFilter(logging.Filter):
    """grpc.aio logs `[_cygrpc] Loaded running loop` at DEBUG once per RPC: at DEBUG, where an operator turns on
    one access line per request, it would double the lines and say nothing. Dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith("[_cygrpc] Loaded running loop"))


GRPC_CORE_LOGGER = "grpc._cython.cygrpc"


def configure_logging(level: str, fmt: str = "text", stream: TextIO | None = None) -> None:
    """Set up the root logger for `tensorgate serve` (UTC timestamps, request context on every record)."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, got {fmt!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(RequestContextFilter())
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else TextFormatter(TEXT_FORMAT)
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    core = logging.getLogger(GRPC_CORE_LOGGER)
    for kind in (CallAlreadyOverFilter, LoopNoticeFilter):
        if not any(isinstance(f, kind) for f in core.filters):
            core.addFilter(kind())


def current_setup() -> tuple[str, str]:
    """The root logger's level and format (`configure_logging`'s arguments as they took effect), for a child
    process whose lines land on the same stream and must read like the server's."""
    root = logging.getLogger()
    fmt = "json" if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers) else "text"
    return logging.getLevelName(root.getEffectiveLevel()), fmt


__all__ = [
    "GRPC_CORE_LOGGER",
    "LOG_FORMATS",
    "CallAlreadyOverFilter",
    "JsonFormatter",
    "LoopNoticeFilter",
    "RequestContextFilter",
    "TextFormatter",
    "configure_logging",
    "current_setup",
]
