"""tensorgate's Python client: sync (``InferenceClient``) and asyncio (``AsyncInferenceClient``) over the stubs in
``tensorgate.protos``, with numpy in and out, a deadline on every call, typed errors, opt-in retries and TLS.

Usage::

    import numpy as np
    from tensorgate.client import InferenceClient, NotFound

    with InferenceClient("127.0.0.1:8001", timeout=10) as client:
        result = client.infer("mlp", {"INPUT0": np.zeros((1, 256), np.float32)})
        print(result["OUTPUT0"])

It works with any KServe V2 / Triton gRPC server; it does not import the server package.
"""

from __future__ import annotations

from tensorgate.client._common import InferResult, ModelMetadata, StreamRequest, TensorMetadata
from tensorgate.client._monitoring import (
    Alert,
    ClassQuality,
    FeatureDrift,
    FeedbackStatus,
    ModelDrift,
    ModelQuality,
)
from tensorgate.client._rollout import RolloutState
from tensorgate.client.aio import AsyncInferenceClient
from tensorgate.client.config import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_TIMEOUT_S, RetryPolicy, TLSConfig
from tensorgate.client.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ResponseFormatError,
    StreamItemError,
    TensorgateClientError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from tensorgate.client.sync import InferenceClient

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_TIMEOUT_S",
    "Alert",
    "AlreadyExists",
    "AsyncInferenceClient",
    "Cancelled",
    "ClassQuality",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FeatureDrift",
    "FeedbackStatus",
    "InferResult",
    "InferenceClient",
    "Internal",
    "InvalidArgument",
    "ModelDrift",
    "ModelMetadata",
    "ModelQuality",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "ResponseFormatError",
    "RetryPolicy",
    "RolloutState",
    "StreamItemError",
    "StreamRequest",
    "TLSConfig",
    "TensorMetadata",
    "TensorgateClientError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
]
