"""Request messages that protobuf cannot parse, answered INVALID_ARGUMENT by the RPC's own error boundary.

grpc parses a request before the servicer runs. A parse failure there is grpc's to handle: it logs an ERROR with a
traceback and answers UNKNOWN "Unexpected <class 'google.protobuf.message.DecodeError'>: ..." (inside a stream the
failure reaches the servicer as an exception, and the stream ends INTERNAL). A caller's malformed bytes are its
mistake, not the server's: the deserializers registered here hand the servicer a `Malformed` in the message's place,
which `errors.unary` refuses and ModelStreamInfer answers like any other bad message, the stream staying open.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from tensorgate.protos.service import AnyServer, methods
from tensorgate.server.errors import TensorgateError


class MalformedRequestError(TensorgateError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Malformed:
    """Stands in for a request message that did not parse; `error()` is what the caller is told."""

    __slots__ = ("type_name",)

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name

    def error(self, rpc: str) -> MalformedRequestError:
        return MalformedRequestError(f"{rpc}: the request is not a valid {self.type_name} message (it does not parse)")


def lenient(message_class: type[Message]) -> Callable[[bytes], Message | Malformed]:
    """`message_class.FromString`, returning a Malformed instead of raising."""
    parse = message_class.FromString
    type_name = message_class.DESCRIPTOR.full_name

    def deserialize(data: bytes) -> Message | Malformed:
        try:
            return parse(data)
        except DecodeError:
            return Malformed(type_name)

    return deserialize


def add_servicer_to_server(service_full_name: str, servicer: object, server: AnyServer) -> None:
    """`tensorgate.protos.service.add_servicer_to_server` with lenient request deserializers: every RPC of the
    servicer must expect a Malformed request (errors.unary refuses it; a stream's reader must answer it)."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for spec in methods(service_full_name):
        factory = getattr(grpc, f"{spec.cardinality}_rpc_method_handler")
        handlers[spec.name] = factory(
            getattr(servicer, spec.name),
            request_deserializer=lenient(spec.request_class),
            response_serializer=spec.response_class.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_full_name, handlers),))
    server.add_registered_method_handlers(service_full_name, handlers)
