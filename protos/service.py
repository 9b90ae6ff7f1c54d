"""gRPC plumbing (client stubs, servicer base, server registration) derived from the descriptors in ``POOL``.

grpc_tools' ``_pb2_grpc.py`` is not used: it imports its ``_pb2`` module by absolute top-level name, which
does not exist here (our message classes come from the private pool, see ``_pool``). Everything below is
read from the ``ServiceDescriptor`` instead, so the generic helpers (``methods``, ``make_stub_class``,
``make_servicer_class``, ``method_handlers``, ``add_servicer_to_server``) serve any service in ``POOL`` —
including tensorgate's own ``tensorgate.v1`` services — and the ``GRPCInferenceService`` names at the bottom
are thin, typed specialisations of them.

Usage::

    stub = GRPCInferenceServiceStub(grpc.aio.insecure_channel(target))
    response = await stub.ModelInfer(request, timeout=5.0)

    class Servicer(GRPCInferenceServiceServicer):
        async def ServerLive(self, request, context):
            return pb.ServerLiveResponse(live=True)

    add_GRPCInferenceServiceServicer_to_server(Servicer(), server)
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NoReturn

import grpc
import grpc.aio
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message

from . import grpc_service_pb2 as pb
from ._pool import pb2_module_name, service_descriptor

__all__ = [
    "SERVICE_NAME",
    "GRPCInferenceServiceServicer",
    "GRPCInferenceServiceStub",
    "MethodSpec",
    "ServiceStub",
    "add_GRPCInferenceServiceServicer_to_server",
    "add_servicer_to_server",
    "make_servicer_class",
    "make_stub_class",
    "method_handlers",
    "methods",
]

SERVICE_NAME = "inference.GRPCInferenceService"

AnyChannel = grpc.Channel | grpc.aio.Channel
"""A stub works over a sync or an asyncio channel; the multicallables then block or return awaitables."""

AnyServer = grpc.Server | grpc.aio.Server

# (client_streaming, server_streaming) -> the name shared by the channel factory (`channel.unary_unary`)
# and, with `_rpc_method_handler`, the grpc handler factory.
_CARDINALITY = {
    (False, False): "unary_unary",
    (False, True): "unary_stream",
    (True, False): "stream_unary",
    (True, True): "stream_stream",
}


@dataclass(frozen=True)
class MethodSpec:
    """Everything grpc needs to call or serve one RPC, read from its ``MethodDescriptor``."""

    name: str
    path: str
    """The HTTP/2 path, ``/<package>.<Service>/<Method>``."""
    request_class: type[Message]
    response_class: type[Message]
    client_streaming: bool
    server_streaming: bool

    @property
    def cardinality(self) -> str:
        """``"unary_unary"``, ``"unary_stream"``, ``"stream_unary"`` or ``"stream_stream"``."""
        return _CARDINALITY[(self.client_streaming, self.server_streaming)]


def _message_class(descriptor: Any) -> type[Message]:
    """The class that the ``_pb2`` module of the descriptor's file defines for it.

    Importing that module first matters: otherwise protobuf would make a second, unrelated class for the
    same descriptor, and servicers would get instances that fail ``isinstance`` against our message classes.
    """
    importlib.import_module(pb2_module_name(descriptor.file.name))
    cls: type[Message] = message_factory.GetMessageClass(descriptor)
    return cls


def _spec(service_full_name: str, method: MethodDescriptor) -> MethodSpec:
    return MethodSpec(
        name=method.name,
        path=f"/{service_full_name}/{method.name}",
        request_class=_message_class(method.input_type),
        response_class=_message_class(method.output_type),
        client_streaming=method.client_streaming,
        server_streaming=method.server_streaming,
    )


@functools.cache
def methods(service_full_name: str) -> tuple[MethodSpec, ...]:
    """The RPCs of a service in ``POOL``, in declaration order. Raises ``KeyError`` for an unknown service."""
    service = service_descriptor(service_full_name)
    return tuple(_spec(service.full_name, m) for m in service.methods)


# --- client side ---------------------------------------------------------------------------------------


class ServiceStub:
    """Base of the client stubs: one multicallable attribute per RPC of ``SERVICE``.

    Works with ``grpc.Channel`` and ``grpc.aio.Channel`` alike, since both expose the same factories
    (``unary_unary``, ``stream_stream``, ...); serializers come from our message classes.
    """

    SERVICE: ClassVar[str]

    def __init__(self, channel: AnyChannel) -> None:
        for spec in methods(self.SERVICE):
            factory = getattr(channel, spec.cardinality)
            multicallable = factory(
                spec.path,
                request_serializer=spec.request_class.SerializeToString,
                response_deserializer=spec.response_class.FromString,
                # As grpc_tools' generated stubs do: lets grpc core pre-register the method path.
                _registered_method=True,
            )
            setattr(self, spec.name, multicallable)


def make_stub_class(service_full_name: str) -> type[ServiceStub]:
    """A stub class for any service in ``POOL``; an unknown name fails here, not at the first call."""
    methods(service_full_name)
    name = service_full_name.rpartition(".")[2] + "Stub"
    return type(name, (ServiceStub,), {"SERVICE": service_full_name, "__module__": __name__})


# --- server side ---------------------------------------------------------------------------------------


async def _abort_unimplemented(context: grpc.aio.ServicerContext[Any, Any], service: str, rpc: str) -> NoReturn:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{service}/{rpc} is not implemented by this server")


def _unimplemented_method(service_full_name: str, spec: MethodSpec) -> Callable[..., Any]:
    """An async servicer method (or async generator, for server-streaming RPCs) that aborts UNIMPLEMENTED."""
    if spec.server_streaming:

        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            await _abort_unimplemented(context, service_full_name, spec.name)
            yield  # pragma: no cover - unreachable; makes this an async generator as grpc expects

        method: Callable[..., Any] = stream
    else:

        async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await _abort_unimplemented(context, service_full_name, spec.name)

        method = unary
    method.__name__ = method.__qualname__ = spec.name
    return method


def make_servicer_class(service_full_name: str) -> type[Any]:
    """A grpc.aio servicer base for any service in ``POOL``: RPCs abort UNIMPLEMENTED until overridden."""
    namespace: dict[str, Any] = {"__module__": __name__, "SERVICE": service_full_name}
    for spec in methods(service_full_name):
        namespace[spec.name] = _unimplemented_method(service_full_name, spec)
    return type(service_full_name.rpartition(".")[2] + "Servicer", (), namespace)


def method_handlers(service_full_name: str, servicer: object) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """``{rpc name: handler}`` binding each RPC of the service to ``servicer``'s method of the same name.

    A servicer that lacks a method fails here with ``AttributeError`` rather than at the first call.
    """
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for spec in methods(service_full_name):
        factory = getattr(grpc, f"{spec.cardinality}_rpc_method_handler")
        handlers[spec.name] = factory(
            getattr(servicer, spec.name),
            request_deserializer=spec.request_class.FromString,
            response_serializer=spec.response_class.SerializeToString,
        )
    return handlers


def add_servicer_to_server(service_full_name: str, servicer: object, server: AnyServer) -> None:
    """Serve ``servicer`` for the service on ``server`` (sync or asyncio), as generated code would."""
    handlers = method_handlers(service_full_name, servicer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_full_name, handlers),))
    # Registered handlers let grpc core match the method path without the generic lookup.
    server.add_registered_method_handlers(service_full_name, handlers)


# --- inference.GRPCInferenceService --------------------------------------------------------------------


class GRPCInferenceServiceStub(ServiceStub):
    """Client stub of ``inference.GRPCInferenceService``; the wire twin of tritonclient's generated stub.

    The attributes are grpc multicallables, sync or asyncio depending on the channel, hence ``Any``.
    """

    SERVICE: ClassVar[str] = SERVICE_NAME

    ServerLive: Any
    ServerReady: Any
    ModelReady: Any
    ServerMetadata: Any
    ModelMetadata: Any
    ModelInfer: Any
    ModelStreamInfer: Any
    ModelConfig: Any
    ModelStatistics: Any
    RepositoryIndex: Any
    RepositoryModelLoad: Any
    RepositoryModelUnload: Any
    SystemSharedMemoryStatus: Any
    SystemSharedMemoryRegister: Any
    SystemSharedMemoryUnregister: Any
    CudaSharedMemoryStatus: Any
    CudaSharedMemoryRegister: Any
    CudaSharedMemoryUnregister: Any
    TraceSetting: Any
    LogSettings: Any


_Ctx = grpc.aio.ServicerContext


class GRPCInferenceServiceServicer:
    """grpc.aio servicer base of ``inference.GRPCInferenceService``: every RPC aborts with UNIMPLEMENTED.

    Subclass it and override the RPCs the server supports; the rest then answer UNIMPLEMENTED with a message
    naming the RPC, which is what tritonclient expects from a server without that extension.
    """

    SERVICE: ClassVar[str] = SERVICE_NAME

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: _Ctx[pb.ServerLiveRequest, pb.ServerLiveResponse]
    ) -> pb.ServerLiveResponse:
        await _abort_unimplemented(context, SERVICE_NAME, "ServerLive")

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: _Ctx[pb.ServerReadyRequest, pb.ServerReadyResponse]
    ) -> pb.ServerReadyResponse:
        await _abort_unimplemented(context, SERVICE_NAME, "ServerReady")

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: _Ctx[pb.ModelReadyRequest, pb.ModelReadyResponse]
    ) -> pb.ModelReadyResponse:
        await _abort_unimplemented(context, SERVICE_NAME, "ModelReady")

    async def ServerMetadata(
        self,
        request: pb.ServerMetadataRequest,
        context: _Ctx[pb.ServerMetadataRequest, pb.ServerMetadataResponse],
    ) -> pb.ServerMetadataResponse:
        await _abort_unimplemented(context, SERVICE_NAME, "ServerMetadata")

    async def ModelMetadata(
        self,
        request: pb.ModelMetadataRequest,
        context: _Ctx[pb.ModelMetadataRequest, pb.ModelMetadataResponse],
    ) -> pb.ModelMetadataResponse:
        await _abort_unimplemented(context, SERVICE_NAME, "ModelMetadata")

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: _Ctx[pb.ModelInferRequest, pb.ModelInferResponse]
    ) -> pb.ModelInferResponse:
        await _abort_unimplemented(context, SERVICE_NAME, "ModelInfer")

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: _Ctx[pb.ModelInferRequest, pb.ModelStreamInferResponse],
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        await _abort_unimplemented(context, SERVICE_NAME, "ModelStreamInfer")
        yield  # pragma: no cover - unreachable; makes this an async generator as grpc expects

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: _Ctx[pb.ModelConfigRequest, pb.ModelConfigResponse]
    ) -> pb.ModelConfigResponse:
        await _abort_unimplemented(context, SERVICE_NAME, "ModelConfig")

    async def ModelStatistics(
        self,
        request: pb.ModelStatisticsRequest,
        context: _Ctx[pb.ModelStatisticsRequest, pb.ModelStatisticsResponse],
    ) -> pb.ModelStatisticsResponse:
        await _abort_unimplemented(context, SERVICE_NAME, "ModelStatistics")

    async def RepositoryIndex(
        self,
        request: pb.RepositoryIndexRequest,
        context: _Ctx[pb.RepositoryIndexRequest, pb.RepositoryIndexResponse],
    ) -> pb.RepositoryIndexResponse:
        await _abort_unimplemented(context, SERVICE_NAME, "RepositoryIndex")

    async def RepositoryModelLoad(
        self,
        request: pb.RepositoryModelLoadRequest,
        context: _Ctx[pb.RepositoryModelLoadRequest, pb.RepositoryModelLoadResponse],
    ) -> pb.RepositoryModelLoadResponse:
        await _abort_unimplemented(context, SERVICE_NAME, "RepositoryModelLoad")

    async def RepositoryModelUnload(
        self,
        request: pb.RepositoryModelUnloadRequest,
        context: _Ctx[pb.RepositoryModelUnloadRequest, pb.RepositoryModelUnloadResponse],
    ) -> pb.RepositoryModelUnloadResponse:
        await _abort_unimplemented(context, SERVICE_NAME, "RepositoryModelUnload")

    async def SystemSharedMemoryStatus(
        self,
        request: pb.SystemSharedMemoryStatusRequest,
        context: _Ctx[pb.SystemSharedMemoryStatusRequest, pb.SystemSharedMemoryStatusResponse],
    ) -> pb.SystemSharedMemoryStatusResponse:
        await _abort_unimplemented(context, SERVICE_NAME, "SystemSharedMemoryStatus")

    async def SystemSharedMemoryRegister(
        self,
        request: pb.SystemSharedMemoryRegisterRequest,
        context: _Ctx[pb.SystemSharedMemoryRegisterRequest, pb.SystemSharedMemoryRegisterResponse],
    ) -> pb.SystemSharedMemoryRegisterResponse:
        await _abort_unimplemented(context, SERVICE_NAME, "SystemSharedMemoryRegister")

    async def SystemSharedMemoryUnregister(
        self,
        request: pb.SystemSharedMemoryUnregisterRequest,
        context: _Ctx[pb.SystemSharedMemoryUnregisterRequest, pb.SystemSharedMemoryUnregisterResponse],
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        await _abort_unimplemented(context, SERVICE_NAME, "SystemSharedMemoryUnregister")

    async def CudaSharedMemoryStatus(
        self,
        request: pb.CudaSharedMemoryStatusRequest,
        context: _Ctx[pb.CudaSharedMemoryStatusRequest, pb.CudaSharedMemoryStatusResponse],
    ) -> pb.CudaSharedMemoryStatusResponse:
        await _abort_unimplemented(context, SERVICE_NAME, "CudaSharedMemoryStatus")

    async def CudaSharedMemoryRegister(
        self,
        request: pb.CudaSharedMemoryRegisterRequest,
        context: _Ctx[pb.CudaSharedMemoryRegisterRequest, pb.CudaSharedMemoryRegisterResponse],
    ) -> pb.CudaSharedMemoryRegisterResponse:
        await _abort_unimplemented(context, SERVICE_NAME, "CudaSharedMemoryRegister")

    async def CudaSharedMemoryUnregister(
        self,
        request: pb.CudaSharedMemoryUnregisterRequest,
        context: _Ctx[pb.CudaSharedMemoryUnregisterRequest, pb.CudaSharedMemoryUnregisterResponse],
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        await _abort_unimplemented(context, SERVICE_NAME, "CudaSharedMemoryUnregister")

    async def TraceSetting(
        self, request: pb.TraceSettingRequest, context: _Ctx[pb.TraceSettingRequest, pb.TraceSettingResponse]
    ) -> pb.TraceSettingResponse:
        await _abort_unimplemented(context, SERVICE_NAME, "TraceSetting")

    async def LogSettings(
        self, request: pb.LogSettingsRequest, context: _Ctx[pb.LogSettingsRequest, pb.LogSettingsResponse]
    ) -> pb.LogSettingsResponse:
        await _abort_unimplemented(context, SERVICE_NAME, "LogSettings")


def add_GRPCInferenceServiceServicer_to_server(servicer: GRPCInferenceServiceServicer, server: AnyServer) -> None:
    """Serve ``servicer`` as ``inference.GRPCInferenceService`` (same name and role as generated code's)."""
    add_servicer_to_server(SERVICE_NAME, servicer, server)
