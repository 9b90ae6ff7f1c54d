"""OTLP ExportTraceServiceRequest bytes written straight from span records, for the span exporter process.

Why: the SDK's encoder builds a protobuf object per span, attribute and value in Python, about 18 us a span;
at four spans a request it was most of the exporter process's CPU, which on a small machine the server pays
for. Written as protobuf wire format directly, with the key/value pairs that repeat from span to span (RPC
system, model, provider) encoded once and cached, a span costs a few microseconds. The output is the message the
SDK's encoder makes for the same spans (tests/test_span_pipe.py compares them field by field).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as PbResource
from opentelemetry.sdk.resources import Resource

_FIXED64 = struct.Struct("<Q")
_DOUBLE = struct.Struct("<d")
_FIXED32 = struct.Struct("<I")
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200  # SpanFlags


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (strings, bytes, messages)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _any_value(value: Any) -> bytes:
    if isinstance(value, str):
        return _field(1, value.encode())
    if isinstance(value, bool):
        return _tag(2, 0) + _varint(int(value))
    if isinstance(value, int):
        return _tag(3, 0) + _varint(value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, float):
        return _tag(4, 1) + _DOUBLE.pack(value)
    if isinstance(value, bytes):
        return _field(7, value)
    if isinstance(value, Sequence):
        return _field(5, b"".join(_field(1, _any_value(v)) for v in value))
    raise TypeError(f"attribute value of type {type(value).__name__} cannot be exported")


@lru_cache(maxsize=4096, typed=True)
def _key_value(key: str, value: Any) -> bytes:
    """A KeyValue message (without its field tag); hashable values only, the common case."""
    return _field(1, key.encode()) + _field(2, _any_value(value))


def _attributes(number: int, attributes: dict[str, Any]) -> bytes:
    parts = []
    for key, value in attributes.items():
        try:
            kv = _key_value(key, value)
        except TypeError:  # unhashable (a list): not cached
            kv = _field(1, key.encode()) + _field(2, _any_value(value))
        parts.append(_field(number, kv))
    return b"".join(parts)


def _span(record: tuple[Any, ...]) -> bytes:
    name, trace_id, span_id, state, parent, kind, start, end, attrs, links, events, status = record
    out = [
        _field(1, trace_id.to_bytes(16, "big")),
        _field(2, span_id.to_bytes(8, "big")),
    ]
    if state:
        out.append(_field(3, ",".join(f"{k}={v}" for k, v in state).encode()))
    if parent is not None:
        out.append(_field(4, parent[0].to_bytes(8, "big")))
    out += [
        _field(5, name.encode()),
        _tag(6, 0) + _varint(kind + 1),  # the API's SpanKind counts from INTERNAL = 0; OTLP's from UNSPECIFIED
        _tag(7, 1) + _FIXED64.pack(start),
        _tag(8, 1) + _FIXED64.pack(end),
        _attributes(9, attrs),
    ]
    for event_name, time_ns, event_attrs in events:
        body = _tag(1, 1) + _FIXED64.pack(time_ns) + _field(2, event_name.encode()) + _attributes(3, event_attrs)
        out.append(_field(11, body))
    for link_trace, link_span, _flags, _state in links:
        body = (
            _field(1, link_trace.to_bytes(16, "big"))
            + _field(2, link_span.to_bytes(8, "big"))
            + _tag(6, 5)
            + _FIXED32.pack(_HAS_IS_REMOTE)  # as the SDK: a link's context counts as local
        )
        out.append(_field(13, body))
    code, description = status if status is not None else (0, None)
    body = (_field(2, description.encode()) if description else b"") + (_tag(3, 0) + _varint(code) if code else b"")
    out.append(_field(15, body))
    flags = _HAS_IS_REMOTE | (_IS_REMOTE if parent is not None and parent[1] else 0)
    out.append(_tag(16, 5) + _FIXED32.pack(flags))
    return b"".join(out)


class TraceRequestWriter:
    """ExportTraceServiceRequest bytes for span records, under one resource and one instrumentation scope."""

    def __init__(self, resource: Resource, scope_name: str, scope_version: str) -> None:
        pb_resource = PbResource()
        for key, value in resource.attributes.items():
            kv = pb_resource.attributes.add()
            kv.key = key
            kv.value.ParseFromString(_any_value(value))
        self._resource = _field(1, pb_resource.SerializeToString())
        self._resource_schema = _field(3, resource.schema_url.encode()) if resource.schema_url else b""
        self._scope = _field(1, InstrumentationScope(name=scope_name, version=scope_version).SerializeToString())

    def write(self, records: Sequence[tuple[Any, ...]]) -> bytes:
        scope_spans = self._scope + b"".join(_field(2, _span(r)) for r in records)
        resource_spans = self._resource + _field(2, scope_spans) + self._resource_schema
        return _field(1, resource_spans)


__all__ = ["TraceRequestWriter"]
