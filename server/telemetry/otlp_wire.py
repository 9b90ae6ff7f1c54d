"""OTLP ExportTraceServiceRequest bytes written straight from span records, for the span exporter process.

Why: the SDK's encoder builds a protobuf object per span, attribute and value in Python, about 18 us a span;
at four spans a request it was most of the exporter process's CPU, which on a small machine the server pays
for. Written as protobuf wire format directly, with the key/value pairs that repeat from span to span (RPC
system, model, provider) encoded once and cached, and tags, lengths and fixed fields taken from tables rather than
computed, a span costs under 2 us (7 us when every varint was computed in Python). The output is the message the
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


def _varint_long(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SHORT_VARINTS = tuple(_varint_long(n) for n in range(1 << 14))
"""Every varint of one or two bytes, made once: lengths and tags are nearly all under 16384."""


def _varint(n: int) -> bytes:
    return _SHORT_VARINTS[n] if n < 16384 else _varint_long(n)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (strings, bytes, messages); `_varint` written inline, as this runs about ten times
    a span."""
    n = len(payload)
    return _SHORT_VARINTS[number << 3 | 2] + (_SHORT_VARINTS[n] if n < 16384 else _varint_long(n)) + payload


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _any_value(value: Any) -> bytes:
    if isinstance(value, str):
        return _field(1, value.encode())
    if isinstance(value, bool):
        return _tag(2, 0) + _varint(int(value))
    if isinstance(value, int):
        return _tag(3, 0) + _varint_long(value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, float):
        return _tag(4, 1) + _DOUBLE.pack(value)
    if isinstance(value, bytes):
        return _field(7, value)
    if isinstance(value, Sequence):
        return _field(5, b"".join(_field(1, _any_value(v)) for v in value))
    raise TypeError(f"attribute value of type {type(value).__name__} cannot be exported")


_CACHE_LIMIT = 4096
_CACHED_TYPES = frozenset((str, int, bool))
"""Values cached by (type, value). Not floats (0.0 == -0.0, and every NaN is a new key) nor sequences ((1, 2) ==
(1.0, 2.0) and (1, 0) == (True, False), whatever the outer type): those are encoded every time."""
_attribute_fields: dict[tuple[int, str, type, Any], bytes] = {}
"""(field number, key, value type, value) -> the KeyValue as that field. Most pairs repeat from span to span (RPC
system, model, provider); the few that do not (request ids) are why the cache starts over when full."""


def _attributes(number: int, attributes: dict[str, Any]) -> bytes:
    parts = []
    for key, value in attributes.items():
        kind = type(value)
        if kind not in _CACHED_TYPES:
            parts.append(_field(number, _field(1, key.encode()) + _field(2, _any_value(value))))
            continue
        cache_key = (number, key, kind, value)  # the type: True and 1 are equal keys, not equal values
        encoded = _attribute_fields.get(cache_key)
        if encoded is None:
            encoded = _field(number, _field(1, key.encode()) + _field(2, _any_value(value)))
            if len(_attribute_fields) >= _CACHE_LIMIT:
                _attribute_fields.clear()
            _attribute_fields[cache_key] = encoded
        parts.append(encoded)
    return b"".join(parts)


@lru_cache(maxsize=256)
def _name_field(name: str) -> bytes:
    return _field(5, name.encode())


# The span's fixed fields, tags written out: trace_id (1), span_id (2), parent_span_id (4), kind (6), start and end
# times (7, 8: fixed64), an empty status (15), flags (16: fixed32).
_TRACE_ID, _SPAN_ID, _PARENT_ID = b"\x0a\x10", b"\x12\x08", b"\x22\x08"
_KINDS = tuple(_tag(6, 0) + _varint(kind + 1) for kind in range(5))  # the API's SpanKind counts from INTERNAL = 0
_TIMES = struct.Struct("<BQBQ")
_TIME_TAGS = (7 << 3 | 1, 8 << 3 | 1)
_NO_STATUS = _field(15, b"")
_LOCAL_FLAGS = _tag(16, 5) + _FIXED32.pack(_HAS_IS_REMOTE)
_REMOTE_FLAGS = _tag(16, 5) + _FIXED32.pack(_HAS_IS_REMOTE | _IS_REMOTE)
# A link (13): trace_id (1), span_id (2), flags (6: fixed32), 33 bytes in all.
_LOCAL_LINK_FLAGS = _tag(6, 5) + _FIXED32.pack(_HAS_IS_REMOTE)
_REMOTE_LINK_FLAGS = _tag(6, 5) + _FIXED32.pack(_HAS_IS_REMOTE | _IS_REMOTE)
_LINK_HEAD = _field(13, b"\0" * 33)[:-33] + _TRACE_ID


def _span(record: tuple[Any, ...]) -> bytes:
    name, trace_id, span_id, state, parent, kind, start, end, attrs, links, events, status = record
    out = [_TRACE_ID, trace_id.to_bytes(16, "big"), _SPAN_ID, span_id.to_bytes(8, "big")]
    if state:
        out.append(_field(3, ",".join(f"{k}={v}" for k, v in state).encode()))
    if parent is not None:
        out += (_PARENT_ID, parent[0].to_bytes(8, "big"))
    out += (_name_field(name), _KINDS[kind], _TIMES.pack(_TIME_TAGS[0], start, _TIME_TAGS[1], end))
    if attrs:
        out.append(_attributes(9, attrs))
    for event_name, time_ns, event_attrs in events:
        body = _tag(1, 1) + _FIXED64.pack(time_ns) + _field(2, event_name.encode()) + _attributes(3, event_attrs)
        out.append(_field(11, body))
    for link_trace, link_span, _flags, _state, remote in links:
        flags = _REMOTE_LINK_FLAGS if remote else _LOCAL_LINK_FLAGS
        out += (_LINK_HEAD, link_trace.to_bytes(16, "big"), _SPAN_ID, link_span.to_bytes(8, "big"), flags)
    if status is None or not (status[0] or status[1]):
        out.append(_NO_STATUS)
    else:
        code, description = status
        body = (_field(2, description.encode()) if description else b"") + (_tag(3, 0) + _varint(code) if code else b"")
        out.append(_field(15, body))
    out.append(_REMOTE_FLAGS if parent is not None and parent[1] else _LOCAL_FLAGS)
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
