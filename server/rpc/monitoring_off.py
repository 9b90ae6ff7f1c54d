"""tensorgate.v1.Monitoring on a server without --data-dir: each call answers UNIMPLEMENTED saying why.

Without a handler gRPC answers "Method not found!", which reads as a client or version mismatch; a Python client
calling `model_quality` or `submit_feedback` has no way to learn that the server only needs `--data-dir`. Kept out
of server/rpc/monitoring.py, which loads the monitoring package (scipy) that a server without it never needs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc import aio

from tensorgate.protos import monitoring_pb2 as mpb

SERVICE = mpb.DESCRIPTOR.services_by_name["Monitoring"]
MONITORING_OFF = (
    "monitoring is off on this server: it has no tensorgate.v1.Monitoring service; start `tensorgate serve` with "
    "--data-dir DIR to capture predictions, take feedback and compute quality and drift"
)


async def _refuse(request: Any, context: aio.ServicerContext[Any, Any]) -> None:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, MONITORING_OFF)


async def _refuse_stream(requests: AsyncIterator[Any], context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, MONITORING_OFF)
    yield  # unreachable: abort raises; makes this an async generator, as a streaming handler must be


class MonitoringOff(grpc.GenericRpcHandler):
    """Answers every method of the Monitoring service (requests are not even decoded) and nothing else."""

    def __init__(self) -> None:
        prefix = f"/{SERVICE.full_name}/"
        self._handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            prefix + m.name: grpc.stream_stream_rpc_method_handler(_refuse_stream)
            if m.client_streaming or m.server_streaming
            else grpc.unary_unary_rpc_method_handler(_refuse)
            for m in SERVICE.methods
        }

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        return self._handlers.get(handler_call_details.method)


__all__ = ["MONITORING_OFF", "MonitoringOff"]
