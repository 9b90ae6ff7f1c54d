"""The ``tensorgate.v1`` monitoring messages, built from tensorgate's private descriptor pool.

Written by hand for the same reason as ``grpc_service_pb2``: every class of ``tensorgate.protos`` comes from
``POOL`` (see ``_pool``); mypy reads the generated ``monitoring_pb2.pyi`` beside this file. The service plumbing
is built from the descriptor by ``service.make_stub_class`` / ``add_servicer_to_server``.
"""

from __future__ import annotations

from google.protobuf.internal import builder as _builder

from ._pool import file_descriptor

DESCRIPTOR = file_descriptor("monitoring.proto")

_builder.BuildMessageAndEnumDescriptors(DESCRIPTOR, globals())
_builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, __name__, globals())
