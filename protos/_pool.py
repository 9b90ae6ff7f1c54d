"""The private descriptor pool that holds every message and service of ``tensorgate.protos``.

``tritonclient.grpc`` registers ``inference.*`` (from files named ``grpc_service.proto`` and
``model_config.proto``) in protobuf's process-wide default pool. Defining the same full names there a second
time fails at import with "duplicate symbol", and we want tritonclient importable beside the server (tests,
the remote-Triton backend). So our descriptors live in their own ``DescriptorPool``, loaded once from the
``FileDescriptorSet`` that ``generate.py`` writes. Both sides then describe identical wire formats with
distinct Python classes.
"""

from __future__ import annotations

from importlib import resources
from typing import Protocol, cast

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor, ServiceDescriptor

__all__ = ["DESCRIPTOR_SET", "POOL", "add_files", "file_descriptor", "pb2_module_name", "service_descriptor"]

# Written by generate.py (which keeps its own copy of the name: it must run without importing this package,
# so that a broken descriptor set can always be regenerated; a test keeps the two equal).
DESCRIPTOR_SET = "inference.binpb"


class _TypedPool(Protocol):
    """The few ``DescriptorPool`` methods used here, typed (types-protobuf leaves them untyped)."""

    def AddSerializedFile(self, serialized_file_desc_proto: bytes) -> object: ...
    def FindFileByName(self, file_name: str) -> FileDescriptor: ...
    def FindServiceByName(self, full_name: str) -> ServiceDescriptor: ...


def _load(pool: descriptor_pool.DescriptorPool) -> descriptor_pool.DescriptorPool:
    """Add every file of the checked-in descriptor set to ``pool``, dependencies first.

    protoc writes ``--include_imports`` sets in dependency order, so adding them in sequence always finds a
    file's imports already present.
    """
    data = resources.files(__package__).joinpath(DESCRIPTOR_SET).read_bytes()
    typed = cast(_TypedPool, pool)
    for file_proto in descriptor_pb2.FileDescriptorSet.FromString(data).file:
        typed.AddSerializedFile(file_proto.SerializeToString())
    return pool


POOL: descriptor_pool.DescriptorPool = _load(descriptor_pool.DescriptorPool())
"""All of tensorgate's proto files; never the default pool (see the module docstring)."""


def add_files(*serialized: bytes) -> None:
    """Add serialized FileDescriptorProtos (e.g. another package's ``DESCRIPTOR.serialized_pb``) to ``POOL``,
    skipping files it already holds: server reflection answers from this pool, so the other services a server
    offers (health, reflection) must be described here too."""
    typed = cast(_TypedPool, POOL)
    for data in serialized:
        name = descriptor_pb2.FileDescriptorProto.FromString(data).name
        try:
            typed.FindFileByName(name)
        except KeyError:
            typed.AddSerializedFile(data)


def file_descriptor(name: str) -> FileDescriptor:
    """The ``FileDescriptor`` of one proto file in ``POOL``, by its path relative to ``protos/``.

    Raises ``KeyError`` when no such file was generated.
    """
    return cast(_TypedPool, POOL).FindFileByName(name)


def service_descriptor(full_name: str) -> ServiceDescriptor:
    """The ``ServiceDescriptor`` of ``full_name`` (e.g. ``"inference.GRPCInferenceService"``) in ``POOL``."""
    return cast(_TypedPool, POOL).FindServiceByName(full_name)


def pb2_module_name(file_name: str) -> str:
    """The ``tensorgate.protos`` submodule holding a proto file's classes: ``a/b.proto`` -> ``...a.b_pb2``."""
    return f"{__package__}." + file_name.removesuffix(".proto").replace("/", ".") + "_pb2"
