"""tensorgate's wire contract: the KServe V2 / Triton ``inference`` protos, their messages and gRPC plumbing.

Why a private descriptor pool: ``tritonclient.grpc`` registers the very same ``inference.*`` names (from
files also called ``grpc_service.proto`` and ``model_config.proto``) in protobuf's process-wide default
pool, and a second definition there crashes at import with "duplicate symbol". tensorgate must run beside
tritonclient (tests drive our server with it; the remote-Triton backend uses it), so our descriptors are
loaded into ``POOL``, a ``DescriptorPool`` of our own, from the checked-in ``inference.binpb``. The message
classes (``grpc_service_pb2``, ``model_config_pb2``) and the gRPC stub/servicer (``service``) are built from
``POOL``; they are distinct Python classes from tritonclient's but byte-for-byte the same on the wire.

Edit the ``.proto`` files, then run ``python -m tensorgate.protos.generate`` (``--check`` in CI).

Usage::

    from tensorgate.protos import grpc_service_pb2 as pb, model_config_pb2 as mc
    from tensorgate.protos import GRPCInferenceServiceStub

    stub = GRPCInferenceServiceStub(grpc.aio.insecure_channel("127.0.0.1:8001"))
    live = (await stub.ServerLive(pb.ServerLiveRequest(), timeout=1.0)).live
"""

from __future__ import annotations

from . import grpc_service_pb2, model_config_pb2
from ._pool import POOL
from .service import (
    SERVICE_NAME,
    GRPCInferenceServiceServicer,
    GRPCInferenceServiceStub,
    add_GRPCInferenceServiceServicer_to_server,
)

__all__ = [
    "POOL",
    "SERVICE_NAME",
    "GRPCInferenceServiceServicer",
    "GRPCInferenceServiceStub",
    "add_GRPCInferenceServiceServicer_to_server",
    "grpc_service_pb2",
    "model_config_pb2",
]
