"""Triton's ``inference.ModelConfig`` family, built from tensorgate's private descriptor pool.

Written by hand because protoc's ``_pb2.py`` would register these names in protobuf's default pool, where
``tritonclient`` already has them (see ``_pool``). The body does what generated code does, from ``POOL``;
mypy reads the generated ``model_config_pb2.pyi`` beside this file instead.
"""

from __future__ import annotations

from google.protobuf.internal import builder as _builder

from ._pool import file_descriptor

DESCRIPTOR = file_descriptor("model_config.proto")

_builder.BuildMessageAndEnumDescriptors(DESCRIPTOR, globals())
_builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, __name__, globals())
