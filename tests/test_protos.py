"""tensorgate.protos against the oracle: tritonclient's own generated ``inference`` modules.

tritonclient 2.73 is what real clients run, so its descriptors define "the same protocol": we check the
schema structurally, the wire bytes for every message in both directions, and live RPCs with tritonclient's
own stub and client against a server built from our servicer base. No mocks: real grpc.aio servers on
127.0.0.1, port 0.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import grpc
import grpc.aio
import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
from google.protobuf import descriptor_pb2, text_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor, FileDescriptor
from google.protobuf.message import Message
from tritonclient.grpc import model_config_pb2 as triton_mc
from tritonclient.grpc import service_pb2 as triton_pb
from tritonclient.grpc import service_pb2_grpc as triton_grpc

import tensorgate.protos as protos
from tensorgate.protos import _pool, generate, service, tensors
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos import model_config_pb2 as mc

TRITON_FILES = {"grpc_service.proto": triton_pb.DESCRIPTOR, "model_config.proto": triton_mc.DESCRIPTOR}
OUR_FILES = {name: _pool.file_descriptor(name) for name in TRITON_FILES}
OUR_MODULES = {"grpc_service.proto": pb, "model_config.proto": mc}
TRITON_MODULES = {"grpc_service.proto": triton_pb, "model_config.proto": triton_mc}


# --- walking descriptors -------------------------------------------------------------------------------


def _all_messages(container: Any) -> Iterator[Descriptor]:
    """Every message of a file or message, nested ones included, in declaration order."""
    if isinstance(container, FileDescriptor):
        types = list(container.message_types_by_name.values())
    else:
        types = list(container.nested_types)
    for message in types:
        yield message
        yield from _all_messages(message)


def _all_enums(file: FileDescriptor) -> Iterator[EnumDescriptor]:
    yield from file.enum_types_by_name.values()
    for message in _all_messages(file):
        yield from message.enum_types


def _full_names(file: FileDescriptor) -> set[str]:
    names = {m.full_name for m in _all_messages(file)}
    names |= {e.full_name for e in _all_enums(file)}
    names |= {f"{e.full_name}.{v.name}" for e in _all_enums(file) for v in e.values}
    names |= {s.full_name for s in file.services_by_name.values()}
    names |= {f"{s.full_name}.{m.name}" for s in file.services_by_name.values() for m in s.methods}
    return names


def _clear_json_names(proto: Message) -> None:
    """protoc's descriptor sets spell out each field's default json_name; generated _pb2 files leave it out.

    Both mean the same (the json_name tests compare the effective names), so drop it before comparing.
    """
    for field, value in proto.ListFields():
        if field.message_type is None:
            continue
        for item in value if field.is_repeated else [value]:
            if isinstance(item, descriptor_pb2.FieldDescriptorProto):
                item.ClearField("json_name")
            _clear_json_names(item)


def _as_proto(descriptor: Any, proto_type: type[Message]) -> Message:
    proto = proto_type()
    descriptor.CopyToProto(proto)
    _clear_json_names(proto)
    return proto


def _text(message: Message) -> str:
    return text_format.MessageToString(message)


def _triton_descriptors(kind: str) -> list[Any]:
    found: list[Any] = []
    for file in TRITON_FILES.values():
        if kind == "message":
            found += _all_messages(file)
        elif kind == "enum":
            found += _all_enums(file)
        else:
            found += file.services_by_name.values()
    return found


# --- importing beside tritonclient ---------------------------------------------------------------------

_IMPORTS = {
    "tritonclient-first": "import tritonclient.grpc; import tensorgate.protos",
    "tensorgate-first": "import tensorgate.protos; import tritonclient.grpc",
}
_WIRE_CHECK = (
    "from tritonclient.grpc import service_pb2 as tpb; "
    "from tensorgate.protos import grpc_service_pb2 as gpb; "
    "b = gpb.ModelInferRequest(model_name='m').SerializeToString(); "
    "assert tpb.ModelInferRequest.FromString(b).model_name == 'm'"
)
# With the default (upb) runtime the two sets of classes stay apart. The pure-Python runtime is only checked
# for not crashing: there protobuf's own builder also files our descriptors in the default pool by name.
_DISTINCT_CHECK = "; assert tpb.ModelInferRequest is not gpb.ModelInferRequest"


@pytest.mark.parametrize("implementation", ["upb", "python"])
@pytest.mark.parametrize("order", sorted(_IMPORTS))
def test_imports_beside_tritonclient_in_either_order(order: str, implementation: str) -> None:
    code = f"{_IMPORTS[order]}; {_WIRE_CHECK}" + (_DISTINCT_CHECK if implementation == "upb" else "")
    env = {**os.environ, "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": implementation}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr


def test_our_descriptors_stay_out_of_the_default_pool() -> None:
    assert pb.ModelInferRequest.DESCRIPTOR.file.pool is protos.POOL
    assert triton_pb.ModelInferRequest.DESCRIPTOR.file.pool is not protos.POOL


# --- structural equality -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TRITON_FILES))
def test_files_are_identical_descriptor_protos(name: str) -> None:
    """The whole FileDescriptorProto, declaration order included; the per-element tests say what differs."""
    ours = _as_proto(OUR_FILES[name], descriptor_pb2.FileDescriptorProto)
    theirs = _as_proto(TRITON_FILES[name], descriptor_pb2.FileDescriptorProto)
    assert _text(ours) == _text(theirs)


@pytest.mark.parametrize("theirs", _triton_descriptors("message"), ids=lambda d: d.full_name)
def test_message_matches_tritonclient(theirs: Descriptor) -> None:
    """Fields (name, number, type, label, type_name, oneof), nested types, enums, oneofs and map entries."""
    ours = protos.POOL.FindMessageTypeByName(theirs.full_name)
    assert ours.file.name == theirs.file.name
    assert _text(_as_proto(ours, descriptor_pb2.DescriptorProto)) == _text(
        _as_proto(theirs, descriptor_pb2.DescriptorProto)
    )
    assert ours.GetOptions().map_entry == theirs.GetOptions().map_entry

    def fields(d: Descriptor) -> list[tuple[str, str, str | None]]:
        return [(f.name, f.json_name, f.containing_oneof and f.containing_oneof.name) for f in d.fields]

    assert fields(ours) == fields(theirs)


@pytest.mark.parametrize("theirs", _triton_descriptors("enum"), ids=lambda d: d.full_name)
def test_enum_matches_tritonclient(theirs: EnumDescriptor) -> None:
    ours = protos.POOL.FindEnumTypeByName(theirs.full_name)
    assert [(v.name, v.number) for v in ours.values] == [(v.name, v.number) for v in theirs.values]


@pytest.mark.parametrize("theirs", _triton_descriptors("service"), ids=lambda d: d.full_name)
def test_service_matches_tritonclient(theirs: Any) -> None:
    ours = protos.POOL.FindServiceByName(theirs.full_name)

    def shape(s: Any) -> list[tuple[str, str, str, bool, bool]]:
        return [
            (m.name, m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming)
            for m in s.methods
        ]

    assert shape(ours) == shape(theirs)


@pytest.mark.parametrize("name", sorted(TRITON_FILES))
def test_we_define_nothing_extra(name: str) -> None:
    assert _full_names(OUR_FILES[name]) == _full_names(TRITON_FILES[name])


def test_every_inference_file_in_the_pool_is_a_tritonclient_file() -> None:
    data = (generate.PROTO_ROOT / generate.DESCRIPTOR_SET).read_bytes()
    files = descriptor_pb2.FileDescriptorSet.FromString(data).file
    assert sorted(f.name for f in files if f.package == "inference") == sorted(TRITON_FILES)
    assert all(not f.HasField("source_code_info") for f in files)


# --- wire round trips ----------------------------------------------------------------------------------

_INTS = {
    FieldDescriptor.TYPE_INT32: (-7, 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-7, 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-7, 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**40), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**40), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**40), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (7, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (7, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (7, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (7, 2**64 - 1),
}


def _scalar(field: FieldDescriptor, index: int) -> Any:
    """A deterministic non-default value; ``index`` tells repeated elements and map keys apart."""
    if field.type in _INTS:
        return _INTS[field.type][index % 2] - index // 2
    if field.type == FieldDescriptor.TYPE_FLOAT:
        return 1.5 + index  # exactly representable in float32
    if field.type == FieldDescriptor.TYPE_DOUBLE:
        return -2.25 - index
    if field.type == FieldDescriptor.TYPE_BOOL:
        return index % 2 == 0  # True first: a single bool must differ from the default
    if field.type == FieldDescriptor.TYPE_STRING:
        return f"{field.name}-{index}-é"
    if field.type == FieldDescriptor.TYPE_BYTES:
        return bytes([0, 255, index, 10])
    if field.type == FieldDescriptor.TYPE_ENUM:
        numbers = [v.number for v in field.enum_type.values]
        return numbers[(1 + index) % len(numbers)] if len(numbers) > 1 else numbers[0]
    raise AssertionError(f"unhandled field type {field.type} of {field.full_name}")


def _fill(message: Message, depth: int, choices: dict[str, str]) -> set[str]:
    """Set every field of ``message`` (one member per oneof: ``choices[oneof]`` or the first), recursively.

    Returns the names expected to be present afterwards (an enum with only a zero value stays default).
    """
    descriptor = message.DESCRIPTOR
    present: set[str] = set()
    for field in descriptor.fields:
        oneof = field.containing_oneof
        if oneof is not None and field.name != choices.get(oneof.name, oneof.fields[0].name):
            continue
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_field, value_field = (
                field.message_type.fields_by_name["key"],
                field.message_type.fields_by_name["value"],
            )
            for i in range(2):
                key = _scalar(key_field, i)
                if value_field.message_type is not None:
                    if depth > 0:
                        _fill(value[key], depth - 1, {})
                    else:
                        value[key].SetInParent()
                else:
                    value[key] = _scalar(value_field, i)
            present.add(field.name)
        elif field.is_repeated:
            for i in range(2):
                if field.message_type is not None:
                    element = value.add()
                    if depth > 0:
                        _fill(element, depth - 1, {})
                else:
                    value.append(_scalar(field, i))
            present.add(field.name)
        elif field.message_type is not None:
            if depth > 0:
                _fill(value, depth - 1, {})
            value.SetInParent()
            present.add(field.name)
        else:
            scalar = _scalar(field, 0)
            setattr(message, field.name, scalar)
            if scalar or oneof is not None:
                present.add(field.name)
    return present


def _round_trip_cases() -> list[Any]:
    cases = []
    for file_name, file in OUR_FILES.items():
        for message in _all_messages(file):
            if message.GetOptions().map_entry:
                continue  # covered through the maps that use them
            oneof_choices = [{o.name: f.name} for o in message.oneofs for f in o.fields] or [{}]
            for choices in oneof_choices:
                suffix = f"[{','.join(choices.values())}]" if choices else ""
                cases.append(pytest.param(file_name, message.full_name, choices, id=message.full_name + suffix))
    return cases


def _class(module: Any, full_name: str) -> type[Message]:
    cls: Any = module
    for part in full_name.removeprefix("inference.").split("."):
        cls = getattr(cls, part)
    return cls


@pytest.mark.parametrize(("file_name", "full_name", "choices"), _round_trip_cases())
def test_round_trip_is_byte_exact_both_ways(file_name: str, full_name: str, choices: dict[str, str]) -> None:
    ours_cls = _class(OUR_MODULES[file_name], full_name)
    theirs_cls = _class(TRITON_MODULES[file_name], full_name)
    assert ours_cls.DESCRIPTOR.file.pool is protos.POOL

    for source_cls, target_cls in ((ours_cls, theirs_cls), (theirs_cls, ours_cls)):
        source = source_cls()
        expected = _fill(source, depth=3, choices=choices)
        assert {f.name for f, _ in source.ListFields()} == expected
        data = source.SerializeToString(deterministic=True)
        target = target_cls.FromString(data)
        assert target.SerializeToString(deterministic=True) == data
        # Same text means every field was known to the other side (unknown fields are not printed).
        assert _text(target) == _text(source)


def test_enum_values_are_reachable_like_generated_code() -> None:
    assert mc.DataType.TYPE_FP32 == triton_mc.DataType.TYPE_FP32 == mc.TYPE_FP32 == 11
    assert mc.ModelInstanceGroup.KIND_GPU == triton_mc.ModelInstanceGroup.KIND_GPU == 1
    assert mc.DataType.Name(mc.TYPE_STRING) == "TYPE_STRING"
    config = pb.ModelConfigResponse(config=mc.ModelConfig(name="m", max_batch_size=8)).config
    assert type(config) is mc.ModelConfig


# --- the generator -------------------------------------------------------------------------------------


def test_generated_files_are_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tensorgate.protos.generate", "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_generator_needs_no_package_import() -> None:
    """A bad descriptor set must never block its own regeneration."""
    result = subprocess.run(
        [sys.executable, str(generate.PROTO_ROOT / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert generate.DESCRIPTOR_SET == _pool.DESCRIPTOR_SET


def test_generator_takes_every_proto() -> None:
    # Triton's two files and tensorgate's own tensorgate.v1 service (monitoring.proto).
    assert generate.find_protos() == sorted([*TRITON_FILES, "monitoring.proto"])


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        pytest.param(
            "import model_config_pb2 as _model_config_pb2",
            "from tensorgate.protos import model_config_pb2 as _model_config_pb2",
            id="top-level",
        ),
        pytest.param(
            "from tensorgate.v1 import monitor_pb2 as _monitor_pb2",
            "from tensorgate.protos.tensorgate.v1 import monitor_pb2 as _monitor_pb2",
            id="nested-package",
        ),
        pytest.param(
            "from google.protobuf import timestamp_pb2 as _timestamp_pb2",
            "from google.protobuf import timestamp_pb2 as _timestamp_pb2",
            id="well-known-untouched",
        ),
    ],
)
def test_pyi_import_rewrite(line: str, expected: str) -> None:
    own = {"model_config_pb2", "tensorgate.v1.monitor_pb2"}
    assert generate.rewrite_pyi_imports(line + "\n", own) == expected + "\n"


def test_stubs_import_siblings_from_the_package() -> None:
    stub = (generate.PROTO_ROOT / "grpc_service_pb2.pyi").read_text(encoding="utf-8")
    assert "from tensorgate.protos import model_config_pb2 as" in stub
    assert "\nimport model_config_pb2" not in stub


# --- the service plumbing ------------------------------------------------------------------------------


def test_public_api() -> None:
    assert sorted(protos.__all__) == sorted(
        [
            "POOL",
            "SERVICE_NAME",
            "GRPCInferenceServiceServicer",
            "GRPCInferenceServiceStub",
            "add_GRPCInferenceServiceServicer_to_server",
            "grpc_service_pb2",
            "model_config_pb2",
        ]
    )
    assert all(hasattr(protos, name) for name in protos.__all__)
    assert protos.SERVICE_NAME == "inference.GRPCInferenceService"


def test_typed_classes_list_exactly_the_rpcs() -> None:
    rpcs = [m.name for m in protos.POOL.FindServiceByName(protos.SERVICE_NAME).methods]
    assert list(protos.GRPCInferenceServiceStub.__annotations__) == ["SERVICE", *rpcs]
    servicer_methods = [n for n in vars(protos.GRPCInferenceServiceServicer) if n[0].isupper() and n != "SERVICE"]
    assert servicer_methods == rpcs


def test_unknown_service_fails_early() -> None:
    with pytest.raises(KeyError):
        service.make_stub_class("inference.NoSuchService")


class _LiveServicer(protos.GRPCInferenceServiceServicer):
    async def ServerLive(
        self,
        request: pb.ServerLiveRequest,
        context: grpc.aio.ServicerContext[pb.ServerLiveRequest, pb.ServerLiveResponse],
    ) -> pb.ServerLiveResponse:
        assert type(request) is pb.ServerLiveRequest
        return pb.ServerLiveResponse(live=True)


async def _start(servicer: Any) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    protos.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def live_server() -> Any:
    server, target = await _start(_LiveServicer())
    yield target
    await server.stop(None)


async def test_our_stub_over_an_aio_channel(live_server: str) -> None:
    async with grpc.aio.insecure_channel(live_server) as channel:
        response = await protos.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=5)
    assert type(response) is pb.ServerLiveResponse
    assert response.live is True


async def test_our_stub_over_a_sync_channel(live_server: str) -> None:
    def call() -> pb.ServerLiveResponse:
        with grpc.insecure_channel(live_server) as channel:
            response: pb.ServerLiveResponse = protos.GRPCInferenceServiceStub(channel).ServerLive(
                pb.ServerLiveRequest(), timeout=5
            )
            return response

    # The blocking call runs in a thread: the server shares this event loop.
    assert (await asyncio.to_thread(call)).live is True


async def test_tritonclient_generated_stub(live_server: str) -> None:
    async with grpc.aio.insecure_channel(live_server) as channel:
        stub = triton_grpc.GRPCInferenceServiceStub(channel)
        response = await stub.ServerLive(triton_pb.ServerLiveRequest(), timeout=5)
    assert type(response) is triton_pb.ServerLiveResponse
    assert response.live is True


async def test_tritonclient_client(live_server: str) -> None:
    client = triton_aio.InferenceServerClient(live_server)
    try:
        assert await client.is_server_live() is True
    finally:
        await client.close()


async def test_unimplemented_rpc_answers_unimplemented(live_server: str) -> None:
    async with grpc.aio.insecure_channel(live_server) as channel:
        stub = protos.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ModelStatistics(pb.ModelStatisticsRequest(name="m"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "ModelStatistics" in (caught.value.details() or "")


@pytest.mark.parametrize(
    "make_servicer",
    [
        pytest.param(protos.GRPCInferenceServiceServicer, id="typed-base"),
        pytest.param(service.make_servicer_class(protos.SERVICE_NAME), id="generic-base"),
    ],
)
async def test_every_rpc_of_a_bare_servicer_is_unimplemented(make_servicer: Any) -> None:
    server, target = await _start(make_servicer())
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = service.make_stub_class(protos.SERVICE_NAME)(channel)
            for spec in service.methods(protos.SERVICE_NAME):
                call = getattr(stub, spec.name)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    if spec.client_streaming:
                        async for _ in call(iter([spec.request_class()]), timeout=5):
                            pass
                    else:
                        await call(spec.request_class(), timeout=5)
                assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED, spec.name
                assert spec.name in (caught.value.details() or ""), spec.name
    finally:
        await server.stop(None)


def test_responses_with_typed_contents_decode() -> None:
    """KServe V2 lets a server answer in typed `contents` instead of raw_output_contents (MLServer does)."""
    msg = pb.ModelInferResponse(model_name="m")
    y = msg.outputs.add(name="Y", datatype="FP32", shape=[1, 2])
    y.contents.fp32_contents.extend([1.5, 2.5])
    t = msg.outputs.add(name="T", datatype="BYTES", shape=[2])
    t.contents.bytes_contents.extend([b"a", b"\x00b"])
    out = tensors.decode_infer_response(msg)
    np.testing.assert_array_equal(out["Y"], np.array([[1.5, 2.5]], np.float32))
    assert out["Y"].dtype == np.float32
    assert out["T"].tolist() == [b"a", b"\x00b"]
    short = pb.ModelInferResponse()
    short.outputs.add(name="Y", datatype="FP32", shape=[3]).contents.fp32_contents.extend([1.0])
    with pytest.raises(tensors.TensorFormatError, match="output 'Y': fp32_contents has 1 elements"):
        tensors.decode_infer_response(short)
