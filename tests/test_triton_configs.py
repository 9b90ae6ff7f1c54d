"""Triton model repositories of ONNX models as Triton's onnxruntime backend takes them: what a config.pbtxt lists
is what is served, what it leaves out is completed as Triton completes it, and what Triton refuses at load (or
tensorgate cannot do) fails the load with its reason instead of failing every request later.

One explicit-mode server over a repository of small cases; each test loads its own model by RPC and reads what
the caller sees: the load status, ModelConfig, ModelMetadata and inference results.
"""

from __future__ import annotations

import queue
import textwrap
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

from tests.onnx_models import (
    OPSET,
    _save,
    add_sub_model,
    default_bias_model,
    identity_model,
    paced_model,
    side_outputs_model,
    write_config,
)
from tests.serving import ServerThread

LISTED = """
    max_batch_size: 8
    input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
    output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
"""

# (model, config.pbtxt, the field the load error names); every config would load on an identity model if the
# field were ignored.
UNSUPPORTED = [
    pytest.param(
        "ragged",
        'max_batch_size: 8\ninput [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] allow_ragged_batch: true } ]\n',
        "allow_ragged_batch (input 'INPUT0')",
        id="allow-ragged-batch",
    ),
    pytest.param(
        "batch_in",
        "max_batch_size: 8\n"
        'batch_input [ { kind: BATCH_ELEMENT_COUNT target_name: "COUNT" data_type: TYPE_FP32\n'
        '  source_input: "INPUT0" } ]\n',
        "batch_input",
        id="batch-input",
    ),
    pytest.param(
        "batch_out",
        "max_batch_size: 8\n"
        'batch_output [ { target_name: "OUTPUT0" kind: BATCH_SCATTER_WITH_INPUT_SHAPE source_input: "INPUT0" } ]\n',
        "batch_output",
        id="batch-output",
    ),
    pytest.param(
        "shape_tensor",
        'max_batch_size: 8\ninput [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] is_shape_tensor: true } ]\n',
        "is_shape_tensor (input 'INPUT0')",
        id="shape-tensor",
    ),
    pytest.param(
        "custom_ops",
        'max_batch_size: 8\nmodel_operations { op_library_filename: "libcustom_ops.so" }\n',
        "model_operations",
        id="model-operations",
    ),
    pytest.param(
        "checksum_agent",
        'max_batch_size: 8\nmodel_repository_agents { agents [ { name: "checksum"\n'
        '  parameters { key: "MD5:1/model.onnx" value: "0123" } } ] }\n',
        "model_repository_agents (agent 'checksum')",
        id="repository-agent",
    ),
    pytest.param(
        "cc_model",
        'max_batch_size: 8\ncc_model_filenames { key: "7.5" value: "other.onnx" }\n',
        "cc_model_filenames",
        id="cc-model-filenames",
    ),
    pytest.param(
        "passive",
        "max_batch_size: 8\ninstance_group [ { count: 1 kind: KIND_CPU passive: true } ]\n",
        "passive (instance_group 0)",
        id="passive-instances",
    ),
    pytest.param(
        "host_policy",
        'max_batch_size: 8\ninstance_group [ { name: "g" count: 1 kind: KIND_CPU host_policy: "numa0" } ]\n',
        "host_policy (instance_group 'g')",
        id="host-policy",
    ),
    pytest.param(
        "kind_model",
        "max_batch_size: 8\ninstance_group [ { count: 1 kind: KIND_MODEL } ]\n",
        "kind KIND_MODEL (instance_group 0)",
        id="kind-model-on-onnx",
    ),
    pytest.param(
        "ordered_decoupled",
        'backend: "tensorgate_triton"\nmax_batch_size: 8\nmodel_transaction_policy { decoupled: true }\n'
        "dynamic_batching { preserve_ordering: true }\n",
        "dynamic_batching.preserve_ordering",
        id="preserve-ordering-decoupled",
    ),
]

# (model, config.pbtxt, what the load error says): what Triton refuses with preserve_ordering, refused the same.
ORDERING_REFUSED = [
    pytest.param(
        "ordered_priorities",
        "max_batch_size: 8\n"
        "dynamic_batching { preserve_ordering: true priority_levels: 2 default_priority_level: 1 }\n",
        "priority_levels 2, but only one priority level is allowed when 'preserve_ordering' is true",
        id="priority-levels",
    ),
    pytest.param(
        "ordered_delay",
        "max_batch_size: 8\ndynamic_batching { preserve_ordering: true\n"
        "  default_queue_policy { timeout_action: DELAY default_timeout_microseconds: 1000 } }\n",
        "default_queue_policy has timeout_action DELAY, which a queue policy cannot have when 'preserve_ordering'",
        id="default-policy-delay",
    ),
    pytest.param(
        "ordered_level_delay",
        "max_batch_size: 8\ndynamic_batching { preserve_ordering: true priority_levels: 1 default_priority_level: 1\n"
        "  priority_queue_policy { key: 1 value: { timeout_action: DELAY default_timeout_microseconds: 1000 } } }\n",
        "priority_queue_policy 1 has timeout_action DELAY",
        id="level-policy-delay",
    ),
]


def _config(repo: Path, name: str, text: str) -> None:
    write_config(repo, name, textwrap.dedent(text).lstrip("\n"))


def _build(root: Path) -> None:
    side_outputs_model(root / "listed_outputs" / "1" / "model.onnx")
    _config(root, "listed_outputs", LISTED)
    side_outputs_model(root / "all_outputs" / "1" / "model.onnx")
    side_outputs_model(root / "outputs_only" / "1" / "model.onnx")
    _config(root, "outputs_only", 'output [ { name: "OUTPUT0" } ]\n')
    identity_model(root / "inputs_only" / "1" / "model.onnx", "FP32")
    _config(root, "inputs_only", 'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n')
    add_sub_model(root / "input_left_out" / "1" / "model.onnx")
    _config(root, "input_left_out", 'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]\n')

    default_bias_model(root / "big" / "1" / "model.onnx" / "model.onnx", bias=2.0, external_data=True)
    outside = root.parent / "outside_dir"
    default_bias_model(outside / "model.onnx")
    (root / "linked_dir" / "1").mkdir(parents=True)
    (root / "linked_dir" / "1" / "model.onnx").symlink_to(outside, target_is_directory=True)

    add_sub_model(root / "optional_required" / "1" / "model.onnx", shape=(16,))
    _config(
        root,
        "optional_required",
        """
        input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] },
                { name: "INPUT1" data_type: TYPE_FP32 dims: [ 16 ] optional: true } ]
        """,
    )
    default_bias_model(root / "default_input" / "1" / "model.onnx", bias=1.0)
    _config(
        root,
        "default_input",
        'max_batch_size: 0\ninput [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "BIAS" } ]\n',
    )
    default_bias_model(root / "optional_batched" / "1" / "model.onnx", shape=("batch", 4))
    _config(
        root,
        "optional_batched",
        """
        max_batch_size: 8
        input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] },
                { name: "BIAS" data_type: TYPE_FP32 dims: [ 4 ] optional: true } ]
        """,
    )

    identity_model(root / "wildcard_on_fixed" / "1" / "model.onnx", "FP32")
    _config(root, "wildcard_on_fixed", LISTED.replace("dims: [ 4 ] }", "dims: [ -1 ] }", 1))
    identity_model(root / "scalar" / "1" / "model.onnx", "FP32", shape=())
    _config(
        root,
        "scalar",
        """
        max_batch_size: 0
        input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 1 ] } ]
        output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 1, 1 ] } ]
        """,
    )
    for param in [*UNSUPPORTED, *ORDERING_REFUSED]:
        name, text = str(param.values[0]), str(param.values[1])
        identity_model(root / name / "1" / "model.onnx", "FP32")
        _config(root, name, text)
    identity_model(root / "pair" / "1" / "model.onnx", "FP32")
    _config(root, "pair", 'platform: "pytorch_libtorch"\nbackend: "onnxruntime"\nmax_batch_size: 8\n')
    identity_model(root / "rate_limited" / "1" / "model.onnx", "FP32")
    _config(
        root,
        "rate_limited",
        'max_batch_size: 8\ninstance_group [ { name: "limited" count: 1 kind: KIND_CPU\n'
        '  rate_limiter { resources [ { name: "R1" count: 4 } ] priority: 2 } } ]\n',
    )
    identity_model(root / "bare" / "1" / "model.onnx", "FP32")
    identity_model(root / "groups" / "1" / "model.onnx", "FP32")
    _config(
        root,
        "groups",
        """
        max_batch_size: 8
        version_policy { all { } }
        instance_group [ { count: 1 kind: KIND_CPU }, { name: "mine" count: 1 kind: KIND_CPU }, { count: 1 } ]
        optimization { input_pinned_memory { enable: false } }
        """,
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    root = tmp_path_factory.mktemp("triton_configs") / "models"
    _build(root)
    with ServerThread(root, model_control_mode="explicit") as s:
        yield s


@pytest.fixture
def client(server: ServerThread) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(server.address)
    yield c
    c.close()


def _infer(
    client: grpcclient.InferenceServerClient,
    model: str,
    tensors: dict[str, np.ndarray],
    outputs: list[str] | None = None,
) -> grpcclient.InferResult:
    inputs = []
    for name, array in tensors.items():
        inp = grpcclient.InferInput(name, list(array.shape), "FP32")
        inp.set_data_from_numpy(array)
        inputs.append(inp)
    requested = [grpcclient.InferRequestedOutput(o) for o in outputs] if outputs else None
    return client.infer(model, inputs, outputs=requested)


def _load_error(client: grpcclient.InferenceServerClient, model: str) -> str:
    with pytest.raises(InferenceServerException) as info:
        client.load_model(model)
    assert info.value.status() == str(grpc.StatusCode.UNAVAILABLE), info.value.message()
    message = str(info.value.message())
    assert f"'{model}'" in message
    return message


def _output_names(result: grpcclient.InferResult) -> list[str]:
    return [o.name for o in result.get_response().outputs]


# ----- what the config lists is what is served ------------------------------------------------------------------


def test_a_config_listing_some_outputs_serves_only_those(client: grpcclient.InferenceServerClient) -> None:
    """The model's other outputs have no batch dimension (MEAN) or a type with no V2 datatype (PROBS, a ZipMap):
    left out of the config, they neither block the load nor reach a response."""
    client.load_model("listed_outputs")
    config = client.get_model_config("listed_outputs").config
    assert [t.name for t in config.output] == ["OUTPUT0"]
    assert [t.name for t in client.get_model_metadata("listed_outputs").outputs] == ["OUTPUT0"]
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    result = _infer(client, "listed_outputs", {"INPUT0": x})
    assert _output_names(result) == ["OUTPUT0"]
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x)
    with pytest.raises(InferenceServerException) as info:
        _infer(client, "listed_outputs", {"INPUT0": x}, outputs=["MEAN"])
    assert info.value.status() == str(grpc.StatusCode.INVALID_ARGUMENT)
    assert "MEAN" in str(info.value.message())


def test_without_a_config_an_unservable_output_fails_the_load_with_the_way_out(
    client: grpcclient.InferenceServerClient,
) -> None:
    message = _load_error(client, "all_outputs")
    assert "tensor 'PROBS' has a type tensorgate cannot serve" in message
    assert "list the outputs to serve in config.pbtxt" in message


def test_a_config_listing_outputs_only_gets_the_inputs_and_max_batch_size(
    client: grpcclient.InferenceServerClient,
) -> None:
    """As Triton: inputs (left out) are completed from the model, outputs (listed) are not, and max_batch_size comes
    from the tensors served, whose first dimension is dynamic."""
    client.load_model("outputs_only")
    config = client.get_model_config("outputs_only").config
    assert config.max_batch_size == 4
    assert config.HasField("dynamic_batching")
    assert [(t.name, list(t.dims)) for t in config.input] == [("INPUT0", [4])]
    assert [(t.name, list(t.dims)) for t in config.output] == [("OUTPUT0", [4])]


def test_a_config_listing_inputs_only_gets_max_batch_size(client: grpcclient.InferenceServerClient) -> None:
    client.load_model("inputs_only")
    config = client.get_model_config("inputs_only").config
    assert config.max_batch_size == 4
    assert config.HasField("dynamic_batching")
    assert [(t.name, list(t.dims)) for t in config.output] == [("OUTPUT0", [4])]
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(_infer(client, "inputs_only", {"INPUT0": x}).as_numpy("OUTPUT0"), x)


def test_listed_inputs_must_include_every_input_the_model_requires(client: grpcclient.InferenceServerClient) -> None:
    message = _load_error(client, "input_left_out")
    assert "requires input(s) ['INPUT1']" in message
    assert "config.pbtxt" in message


# ----- model file ------------------------------------------------------------------------------------------------


def test_a_model_directory_is_read_with_its_external_data(client: grpcclient.InferenceServerClient) -> None:
    """Triton's layout for models over 2 GB: `1/model.onnx/` holds model.onnx and its external data files."""
    client.load_model("big")
    x = np.arange(4, dtype=np.float32)
    np.testing.assert_array_equal(_infer(client, "big", {"INPUT0": x}).as_numpy("OUTPUT0"), x + 2.0)


def test_a_model_directory_linked_out_of_the_repository_is_refused(client: grpcclient.InferenceServerClient) -> None:
    message = _load_error(client, "linked_dir")
    assert "resolves outside the model repository" in message
    assert "outside_dir" not in message


# ----- optional inputs -------------------------------------------------------------------------------------------


def test_optional_on_an_input_the_model_requires_fails_the_load(client: grpcclient.InferenceServerClient) -> None:
    """Loaded, it would fail every request that leaves the input out, inside ONNX Runtime."""
    message = _load_error(client, "optional_required")
    assert "input 'INPUT1' is optional in config but the model requires it" in message


def test_an_initializer_listed_as_input_is_optional_and_overrides_the_default(
    client: grpcclient.InferenceServerClient,
) -> None:
    client.load_model("default_input")
    config = client.get_model_config("default_input").config
    assert [(t.name, t.optional) for t in config.input] == [("INPUT0", False), ("BIAS", True)]
    x = np.arange(4, dtype=np.float32)
    np.testing.assert_array_equal(_infer(client, "default_input", {"INPUT0": x}).as_numpy("OUTPUT0"), x + 1.0)
    bias = np.full(4, 10.0, dtype=np.float32)
    result = _infer(client, "default_input", {"INPUT0": x, "BIAS": bias})
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x + 10.0)


def test_an_optional_input_on_a_batching_model_fails_the_load(client: grpcclient.InferenceServerClient) -> None:
    message = _load_error(client, "optional_batched")
    assert "input 'BIAS' is optional" in message
    assert "max_batch_size 8" in message


# ----- dims ------------------------------------------------------------------------------------------------------


def test_a_wildcard_where_the_model_dimension_is_fixed_fails_the_load(client: grpcclient.InferenceServerClient) -> None:
    message = _load_error(client, "wildcard_on_fixed")
    assert "input 'INPUT0' has dims [-1] in config" in message
    assert "per-row shape [4] is fixed" in message


def test_a_scalar_is_written_as_dims_of_one(client: grpcclient.InferenceServerClient) -> None:
    client.load_model("scalar")
    meta = client.get_model_metadata("scalar")
    assert [list(t.shape) for t in (*meta.inputs, *meta.outputs)] == [[1], [1, 1]]
    result = _infer(client, "scalar", {"INPUT0": np.array([3.5], dtype=np.float32)})
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.array([[3.5]], dtype=np.float32))


# ----- fields tensorgate does not implement -----------------------------------------------------------------------


@pytest.mark.parametrize(("model", "text", "field"), UNSUPPORTED)
def test_an_unsupported_field_fails_the_load(
    client: grpcclient.InferenceServerClient, model: str, text: str, field: str
) -> None:
    message = _load_error(client, model)
    assert f"{field} is not supported by tensorgate" in message


def test_the_repository_agent_refusal_points_to_tensorgate_s_own_digest_pin(
    client: grpcclient.InferenceServerClient,
) -> None:
    """Triton's checksum agent would refuse a file whose MD5 does not match; loaded without it, the model would
    serve unchecked, so the refusal says how to pin the file here."""
    assert 'parameters { key: "tensorgate.sha256"' in _load_error(client, "checksum_agent")


def test_kind_model_on_an_onnx_model_names_the_kinds_it_takes(client: grpcclient.InferenceServerClient) -> None:
    assert "KIND_AUTO, KIND_CPU and KIND_GPU" in _load_error(client, "kind_model")


@pytest.mark.parametrize(("model", "text", "said"), ORDERING_REFUSED)
def test_preserve_ordering_refuses_what_triton_refuses(
    client: grpcclient.InferenceServerClient, model: str, text: str, said: str
) -> None:
    assert said in _load_error(client, model)


def test_a_platform_and_backend_that_do_not_match_are_named_as_a_pair(
    client: grpcclient.InferenceServerClient,
) -> None:
    message = _load_error(client, "pair")
    assert "unexpected 'platform' and 'backend' pair" in message
    assert "platform 'pytorch_libtorch' does not go with backend 'onnxruntime'" in message


def test_a_rate_limiter_loads_and_warns_once_that_it_does_nothing(
    client: grpcclient.InferenceServerClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Triton too ignores rate_limiter unless started with --rate-limit: accepted, with a warning at each load."""
    with caplog.at_level("WARNING", logger="tensorgate.server.repository.config"):
        client.load_model("rate_limited")
        said = [r for r in caplog.records if "rate_limiter" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in said]
    assert said[0].levelname == "WARNING"
    assert "model 'rate_limited': instance_group limited sets rate_limiter, which has no effect" in said[0].getMessage()
    x = np.ones((1, 4), dtype=np.float32)
    np.testing.assert_array_equal(_infer(client, "rate_limited", {"INPUT0": x}).as_numpy("OUTPUT0"), x)


def test_the_served_config_has_the_defaults_triton_fills(client: grpcclient.InferenceServerClient) -> None:
    """As Triton's NormalizeModelConfig and NormalizeInstanceGroup: latest 1 when no version_policy is written,
    pinned memory on, and the group added for a config without one named after the model."""
    client.load_model("bare")
    config = client.get_model_config("bare").config
    assert config.version_policy.WhichOneof("policy_choice") == "latest"
    assert config.version_policy.latest.num_versions == 1
    assert config.optimization.input_pinned_memory.enable
    assert config.optimization.output_pinned_memory.enable
    assert [g.name for g in config.instance_group] == ["bare"]


def test_written_fields_are_kept_and_unnamed_groups_named_by_their_index(
    client: grpcclient.InferenceServerClient,
) -> None:
    client.load_model("groups")
    config = client.get_model_config("groups").config
    assert config.version_policy.WhichOneof("policy_choice") == "all"
    assert [g.name for g in config.instance_group] == ["groups_0", "mine", "groups_2"]
    assert not config.optimization.input_pinned_memory.enable
    assert config.optimization.output_pinned_memory.enable


def test_a_stream_answers_a_preserve_ordering_model_in_request_order(tmp_path: Path) -> None:
    """preserve_ordering needs no work of its own here: a stream's answers always go out in request order. The
    first request runs long on one instance and the second little on the other, so the second is done first (the
    unary calls show it), yet the stream answers the first first."""
    paced_model(tmp_path / "paced" / "1" / "model.onnx")
    write_config(
        tmp_path,
        "paced",
        "max_batch_size: 8\ninstance_group [ { count: 2 kind: KIND_CPU } ]\n"
        "dynamic_batching { preserve_ordering: true }\n",
    )
    answers: queue.Queue[tuple[str, object]] = queue.Queue()

    def request(value: float) -> list[grpcclient.InferInput]:
        x = grpcclient.InferInput("INPUT0", [1, 1], "FP32")
        x.set_data_from_numpy(np.array([[value]], np.float32))
        return [x]

    def record(result: grpcclient.InferResult | None, error: object) -> None:
        assert error is None, error
        assert result is not None
        answers.put((result.get_response().id, result.as_numpy("OUTPUT0")[0, 0]))

    with ServerThread(tmp_path) as s:
        c = grpcclient.InferenceServerClient(s.address)
        try:
            for request_id, value in (("slow", 20.0), ("quick", 0.5)):
                c.async_infer("paced", request(value), lambda result, error, i=request_id: answers.put((i, error)))
            unary = [answers.get(timeout=60)[0] for _ in range(2)]
            c.start_stream(callback=record)
            for request_id, value in (("slow", 20.0), ("quick", 0.5)):
                c.async_stream_infer("paced", request(value), request_id=request_id)
            streamed = [answers.get(timeout=60) for _ in range(2)]
            c.stop_stream()
        finally:
            c.close()
    assert unary == ["quick", "slow"]
    assert streamed == [("slow", 20.0), ("quick", 0.5)]


def test_a_guessed_batch_size_on_a_model_not_batch_first_says_how_to_fix_it(tmp_path: Path) -> None:
    """Without a config, a model whose output has the batch dimension last gets max_batch_size guessed from its
    dynamic first dimensions, as in Triton; every request then fails, and the message must say what to write."""
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["INPUT0"], ["OUTPUT0"], perm=[1, 0])],
        "transposed",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", "k"])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["k", "batch"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    _save(model, tmp_path / "transposed" / "1" / "model.onnx")
    with ServerThread(tmp_path) as s:
        c = grpcclient.InferenceServerClient(s.address)
        try:
            assert c.get_model_config("transposed").config.max_batch_size == 4
            with pytest.raises(InferenceServerException) as info:
                _infer(c, "transposed", {"INPUT0": np.ones((1, 3), dtype=np.float32)})
            assert info.value.status() == str(grpc.StatusCode.INTERNAL)
            assert "batched output is malformed" in str(info.value.message())
            assert "needs max_batch_size: 0 in config.pbtxt" in str(info.value.message())
        finally:
            c.close()
