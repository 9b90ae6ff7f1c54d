"""The KServe V2 / Triton ``inference`` messages, built from tensorgate's private descriptor pool.

Written by hand because protoc's ``_pb2.py`` would register these names in protobuf's default pool, where
``tritonclient`` already has them (see ``_pool``). The body does what generated code does, from ``POOL``;
mypy reads the generated ``grpc_service_pb2.pyi`` beside this file instead. The service plumbing (stub,
servicer, registration) is in ``service``.
"""

from __future__ import annotations

from google.protobuf.internal import builder as _builder

from . import model_config_pb2 as _model_config_pb2  # noqa: F401  (its classes must exist first)
from ._pool import file_descriptor

DESCRIPTOR = file_descriptor("grpc_service.proto")

_builder.BuildMessageAndEnumDescriptors(DESCRIPTOR, globals())
_builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, __name__, globals())
