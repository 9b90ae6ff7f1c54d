"""Boolean config parameters: one parser (`bool_parameter`) for every key, Triton's and tensorgate's own, so that a
spelling that works for one works for all (Triton's backends take true/on/1 and false/off/0, in any case), and a
value that is none of them fails the load with one message naming the model, the key and the value."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tensorgate.protos import model_config_pb2 as mc
from tensorgate.server.backends.onnx import pad_sizes, session_options
from tensorgate.server.backends.triton import TritonSettings
from tensorgate.server.errors import ModelLoadError
from tests.onnx_models import rows_seen_model, write_config
from tests.serving import ServerThread


def _config(key: str, value: str) -> mc.ModelConfig:
    config = mc.ModelConfig(name="flags", max_batch_size=8)
    config.parameters[key].string_value = value
    config.parameters["tensorgate.triton.url"].string_value = "127.0.0.1:1"  # read by the Triton reader only
    return config


READERS: dict[str, Callable[[mc.ModelConfig], bool]] = {
    "enable_mem_arena": lambda c: session_options(c).enable_cpu_mem_arena,
    "tensorgate.intra_op_spinning": (
        lambda c: session_options(c).get_session_config_entry("session.intra_op.allow_spinning") == "1"
    ),
    "tensorgate.pad_batches": lambda c: pad_sizes(c, 1) == (8,),
    "tensorgate.triton.tls": lambda c: TritonSettings.from_config(c, Path("unused")).tls,
}
SPELLINGS = {"true": True, "1": True, "on": True, "TRUE": True, " On ": True, "false": False, "0": False, "OFF": False}


@pytest.mark.parametrize("key", [pytest.param(k, id=k) for k in READERS])
def test_every_boolean_parameter_takes_the_same_spellings(key: str) -> None:
    read = READERS[key]
    assert {text: read(_config(key, text)) for text in SPELLINGS} == SPELLINGS


@pytest.mark.parametrize("key", [pytest.param(k, id=k) for k in READERS])
@pytest.mark.parametrize("value", ["yes", "-1", "sometimes"])  # "2" is a padding size
def test_every_boolean_parameter_refuses_other_values_alike(key: str, value: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        READERS[key](_config(key, value))
    assert "model 'flags'" in info.value.message
    assert f"parameter '{key}' must be true or false (1/0, on/off), got '{value}'" in info.value.message


CONFIG = """
backend: "onnxruntime"
max_batch_size: 8
parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}
"""


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[str, str]]]:
    root = tmp_path_factory.mktemp("flags") / "models"
    for name, key, value in (
        ("padded", "tensorgate.pad_batches", "On"),
        ("spinning", "tensorgate.intra_op_spinning", "1"),
        ("bad_pattern", "enable_mem_pattern", "yes"),
    ):
        rows_seen_model(root / name / "1" / "model.onnx")
        write_config(root, name, CONFIG.format(key=key, value=value))
    with ServerThread(root) as s:
        client = grpcclient.InferenceServerClient(s.address)
        try:
            found = {m.name: (m.state, m.reason) for m in client.get_model_repository_index().models}
            inp = grpcclient.InferInput("INPUT0", [3, 4], "FP32")
            inp.set_data_from_numpy(np.zeros((3, 4), np.float32))
            rows = client.infer("padded", [inp]).as_numpy("ROWS")
            found["padded rows"] = ("seen", str(rows.reshape(-1).tolist()))
            yield found
        finally:
            client.close()


def test_a_served_model_reads_its_booleans_as_triton_spells_them(index: dict[str, tuple[str, str]]) -> None:
    assert index["padded"] == ("READY", "")
    assert index["padded rows"] == ("seen", str([8.0] * 3))  # padded to max_batch_size: "On" is true
    assert index["spinning"] == ("READY", "")
    state, reason = index["bad_pattern"]
    assert state == "UNAVAILABLE"
    assert "parameter 'enable_mem_pattern' must be true or false (1/0, on/off), got 'yes'" in reason
