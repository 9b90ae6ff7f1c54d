"""RepositoryModelLoad / RepositoryModelUnload parameters and ServerMetadata's extensions, as tritonclient and
perf_analyzer see them against Triton 2.51: unload_dependents, and parameters Triton does not know refused."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as tc

from tensorgate.protos import GRPCInferenceServiceStub
from tensorgate.protos import grpc_service_pb2 as pb
from tests.onnx_models import write_config
from tests.serving import ServerThread
from tests.test_ensemble import ensemble_repository

# An ensemble whose only step is the pipeline ensemble (add_sub -> scale2): unload_dependents goes down both.
OUTER = """
name: "outer"
platform: "ensemble"
max_batch_size: 8
input [ { name: "A" data_type: TYPE_FP32 dims: [ 16 ] }, { name: "B" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 16 ] } ]
ensemble_scheduling { step [
  { model_name: "pipeline" input_map { key: "A" value: "A" } input_map { key: "B" value: "B" }
    output_map { key: "OUT_SCALED" value: "OUT" } } ] }
"""


@pytest.fixture
def explicit(tmp_path: Path) -> Iterator[tuple[tc.InferenceServerClient, GRPCInferenceServiceStub]]:
    """A server in explicit mode with nothing loaded: add_sub, scale2, scale3, pipeline (add_sub -> scale2),
    diamond (add_sub, scale2, scale3) and outer (pipeline)."""
    root = ensemble_repository(tmp_path / "models")
    (root / "outer" / "1").mkdir(parents=True)
    write_config(root, "outer", textwrap.dedent(OUTER).lstrip("\n"))
    with ServerThread(root, model_control_mode="explicit") as s:
        client = tc.InferenceServerClient(s.address)
        with grpc.insecure_channel(s.address) as channel:
            try:
                yield client, GRPCInferenceServiceStub(channel)
            finally:
                client.close()


def _ready(client: tc.InferenceServerClient) -> set[str]:
    return {m.name for m in client.get_model_repository_index().models if m.state == "READY"}


def test_unload_dependents_unloads_the_composing_models_nothing_else_needs(
    explicit: tuple[tc.InferenceServerClient, GRPCInferenceServiceStub],
) -> None:
    """As Triton's: the composing models an ensemble's load brought in go with it, unless another ensemble
    still loaded has a step on them or a load asked for them by name; without the parameter they stay."""
    client, _ = explicit
    client.load_model("pipeline")
    client.load_model("diamond")
    assert _ready(client) == {"pipeline", "diamond", "add_sub", "scale2", "scale3"}
    client.unload_model("pipeline", unload_dependents=True)
    assert _ready(client) == {"diamond", "add_sub", "scale2", "scale3"}  # the diamond's steps, all
    client.unload_model("diamond", unload_dependents=True)
    assert _ready(client) == set()
    assert client.is_server_ready()  # unloaded on purpose: no failure

    client.load_model("scale2")  # by name: it stays
    client.load_model("pipeline")
    client.unload_model("pipeline", unload_dependents=True)
    assert _ready(client) == {"scale2"}

    client.load_model("pipeline")
    client.unload_model("pipeline")  # without the parameter, as before
    assert _ready(client) == {"scale2", "add_sub"}
    client.unload_model("pipeline", unload_dependents=True)  # unloaded already: its steps stay, as in Triton
    assert _ready(client) == {"scale2", "add_sub"}
    client.unload_model("add_sub")
    client.unload_model("scale2")

    client.load_model("outer")  # an ensemble of an ensemble: unloaded down the nesting
    assert _ready(client) == {"outer", "pipeline", "add_sub", "scale2"}
    client.unload_model("outer", unload_dependents=True)
    assert _ready(client) == set()


def _load(model: str, key: str, param: pb.ModelRepositoryParameter) -> pb.RepositoryModelLoadRequest:
    request = pb.RepositoryModelLoadRequest(model_name=model)
    request.parameters[key].CopyFrom(param)
    return request


def _unload(model: str, key: str, param: pb.ModelRepositoryParameter) -> pb.RepositoryModelUnloadRequest:
    request = pb.RepositoryModelUnloadRequest(model_name=model)
    request.parameters[key].CopyFrom(param)
    return request


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        pytest.param(
            _load("add_sub", "confg", pb.ModelRepositoryParameter(string_param='{"max_batch_size": 2}')),
            "model 'add_sub': unrecognized load parameter 'confg'",
            id="load-misspelt-config",
        ),
        pytest.param(
            _load("add_sub", "config", pb.ModelRepositoryParameter(bytes_param=b'{"max_batch_size": 2}')),
            "model 'add_sub': load parameter 'config' must be a string_param",
            id="load-config-as-bytes",
        ),
        pytest.param(
            _unload("add_sub", "unload_dependent", pb.ModelRepositoryParameter(bool_param=True)),
            "model 'add_sub': unrecognized unload parameter 'unload_dependent'",
            id="unload-misspelt",
        ),
        pytest.param(
            _unload("add_sub", "unload_dependents", pb.ModelRepositoryParameter(string_param="true")),
            "model 'add_sub': unload parameter 'unload_dependents' must be a bool_param",
            id="unload-dependents-as-string",
        ),
    ],
)
def test_parameters_triton_does_not_take_are_refused(
    explicit: tuple[tc.InferenceServerClient, GRPCInferenceServiceStub],
    request_: pb.RepositoryModelLoadRequest | pb.RepositoryModelUnloadRequest,
    message: str,
) -> None:
    """A misspelt parameter was ignored: the load answered OK from the disk's config (the caller believing its
    override in force), the unload left what the caller meant to unload. Neither is done now."""
    client, stub = explicit
    loading = isinstance(request_, pb.RepositoryModelLoadRequest)
    if not loading:
        client.load_model("add_sub")
    call = stub.RepositoryModelLoad if loading else stub.RepositoryModelUnload
    with pytest.raises(grpc.RpcError) as info:
        call(request_, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in str(info.value.details())
    assert _ready(client) == (set() if loading else {"add_sub"})


def test_our_clients_send_unload_dependents(tmp_path: Path) -> None:
    from tensorgate.client import AsyncInferenceClient, InferenceClient

    root = ensemble_repository(tmp_path / "models")
    with ServerThread(root, model_control_mode="explicit") as s, InferenceClient(s.address, timeout=30) as client:
        client.load("pipeline")
        client.unload("pipeline", unload_dependents=True)
        assert not any(client.ready(m) for m in ("pipeline", "add_sub", "scale2"))

        async def aio() -> None:
            async with AsyncInferenceClient(s.address, timeout=30) as c:
                await c.load("pipeline")
                await c.unload("pipeline")  # without it, as before: the steps stay
                assert await c.ready("add_sub") and await c.ready("scale2")
                await c.load("pipeline")
                await c.unload("pipeline", unload_dependents=True)
                assert not any([await c.ready(m) for m in ("pipeline", "add_sub", "scale2")])

        asyncio.run(aio())
