"""Real-world Triton configs served as they are (review 132): each case embeds a config.pbtxt collected from a public
repository, trimmed to what the case needs, and serves it over a real server with an ONNX model built to match.
"""

from __future__ import annotations

import resource
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.onnx_models import ADD_SUB_CONFIG, add_sub_model, identity_model, write_config
from tests.process import ServeProcess
from tests.serving import ServerThread

# triton-inference-server/server qa/L0_config_json/max_priority_level.pbtxt, backend "identity" made an ONNX one:
# Triton loads it (its priority queues are made per level in use), with every bound at its type's maximum.
MAX_PRIORITY_LEVEL = """
    name: "max_priority_level"
    backend: "onnxruntime"
    max_batch_size: 1
    input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 1 ] } ]
    output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 1 ] } ]

    dynamic_batching:
    {
        # Max uint64
        priority_levels: 18446744073709551615
        # Max uint32
        default_priority_level: 4294967295
        # Max uint32 + 1
        priority_queue_policy: [
           {key: 4294967296
            value: {
              timeout_action: REJECT
              default_timeout_microseconds: 18446744073709551615
              allow_timeout_override: true
              max_queue_size: 10
           }
        }
    ]
    }
"""

MEMORY_CAP = 3 << 30
"""Address space for the server under test: several times what it uses (about 1.2 GiB), so that a load that builds
something per priority level fails in seconds instead of taking the machine's memory."""


def _infer(client: grpcclient.InferenceServerClient, model: str, value: float, priority: int) -> np.ndarray:
    x = np.array([[value]], dtype=np.float32)
    inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(model, [inp], priority=priority, client_timeout=30)
    out = result.as_numpy("OUTPUT0")
    assert out is not None
    return out


def test_priority_levels_up_to_uint64_load_and_serve(tmp_path: Path) -> None:
    """The load used to build a queue policy per level (2^64-1 of them) and never finished: the load call hung,
    taking memory until the process died. It now loads, serves at any priority, and the other model serves on."""
    repo = tmp_path / "models"
    identity_model(repo / "max_priority_level" / "1" / "model.onnx", "FP32", ("batch", 1))
    write_config(repo, "max_priority_level", textwrap.dedent(MAX_PRIORITY_LEVEL))
    add_sub_model(repo / "add_sub" / "1" / "model.onnx")
    write_config(repo, "add_sub", 'name: "add_sub"\n' + ADD_SUB_CONFIG)
    args = ["--model-repository", str(repo), "--grpc-port", "0", "--model-control-mode", "explicit"]
    with ServeProcess([*args, "--load-model", "add_sub"]) as server:
        resource.prlimit(server.proc.pid, resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
        client = grpcclient.InferenceServerClient(server.address)
        try:
            client.load_model("max_priority_level", client_timeout=30)
            assert client.is_model_ready("max_priority_level"), server.output
            served = client.get_model_config("max_priority_level").config.dynamic_batching
            assert (served.priority_levels, served.default_priority_level) == (2**64 - 1, 2**32 - 1)
            # No priority (the default level), the highest, the level with its own policy, one past the levels.
            for i, priority in enumerate([0, 1, 2**32, 2**32 - 1, 2**63]):
                assert _infer(client, "max_priority_level", float(i), priority).tolist() == [[float(i)]]
            ones = np.ones((1, 16), dtype=np.float32)
            inputs = [grpcclient.InferInput(n, [1, 16], "FP32") for n in ("INPUT0", "INPUT1")]
            for inp in inputs:
                inp.set_data_from_numpy(ones)
            out = client.infer("add_sub", inputs, client_timeout=30).as_numpy("OUTPUT0")
            assert out is not None and out.tolist() == [[2.0] * 16]
        finally:
            client.close()
        assert server.terminate() == 0


# triton-inference-server/server docs/examples/model_repository/simple/config.pbtxt (licence header left out).
SIMPLE = """
    name: "simple"
    platform: "onnxruntime_onnx"
    max_batch_size: 8
    input [
      { name: "INPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
      { name: "INPUT1" data_type: TYPE_INT32 dims: [ 16 ] }
    ]
    output [
      { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
      { name: "OUTPUT1" data_type: TYPE_INT32 dims: [ 16 ] }
    ]
"""


def test_config_saved_with_a_byte_order_mark_says_so(tmp_path: Path) -> None:
    """Triton's own example config as Windows tools save it (UTF-8 with a BOM). protobuf refuses it, as Triton's
    C++ parser does, but its message quoted the BOM as is: "Expected identifier or number, got ." with an invisible
    character, which reads as if the first word of the file were wrong."""
    repo = tmp_path / "models"
    add_sub_model(repo / "simple" / "1" / "model.onnx", datatype="INT32")
    (repo / "simple" / "config.pbtxt").write_text(textwrap.dedent(SIMPLE), encoding="utf-8-sig")
    add_sub_model(repo / "add_sub" / "1" / "model.onnx")
    write_config(repo, "add_sub", 'name: "add_sub"\n' + ADD_SUB_CONFIG)
    with ServerThread(repo) as server:
        client = grpcclient.InferenceServerClient(server.address)
        try:
            x = np.ones((1, 16), dtype=np.int32)
            inputs = [grpcclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
            for inp in inputs:
                inp.set_data_from_numpy(x)
            with pytest.raises(InferenceServerException) as refused:
                client.infer("simple", inputs, client_timeout=30)
            message = refused.value.message()
            assert refused.value.status() == "StatusCode.UNAVAILABLE", message
            assert "model 'simple'" in message and "config.pbtxt line 1, column 1" in message, message
            assert "byte-order mark" in message and "\\ufeff" in message and "\ufeff" not in message, message
            ones = np.ones((1, 16), dtype=np.float32)
            floats = [grpcclient.InferInput(n, [1, 16], "FP32") for n in ("INPUT0", "INPUT1")]
            for inp in floats:
                inp.set_data_from_numpy(ones)
            out = client.infer("add_sub", floats, client_timeout=30).as_numpy("OUTPUT0")
            assert out is not None and out.tolist() == [[2.0] * 16]
        finally:
            client.close()
