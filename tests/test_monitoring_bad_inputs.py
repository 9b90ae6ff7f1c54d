"""GetModelQuality/GetModelDrift against what a caller or an operator can get wrong: a window too large to read
into memory, and a reference profile file that cannot be used. Each is a status naming the model and the problem
(never INTERNAL), and the server keeps answering."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tensorgate.client import InferenceClient
from tensorgate.client.errors import FailedPrecondition, InvalidArgument
from tensorgate.protos import monitoring_pb2 as mpb
from tensorgate.server.monitoring.drift import build_profile, profile_path, save_profile
from tensorgate.server.monitoring.monitor import MAX_WINDOW_COUNT
from tensorgate.server.rpc import monitoring as rpc_monitoring
from tests.monitoring import digits_repository
from tests.serving import ServerThread


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, np.ndarray]]:
    root = tmp_path_factory.mktemp("bad-inputs")
    repo, x, _ = digits_repository(root)
    with ServerThread(repo, data_dir=root / "data", monitor_interval_s=3600) as s:
        with InferenceClient(s.address) as client:
            for i in range(8):
                client.infer("digits", {"input": x[i : i + 1]})
        assert s.app.capture.flush()
        yield s, x


def _data_dir(server: ServerThread) -> Path:
    assert server.settings.data_dir is not None
    return server.settings.data_dir


@pytest.mark.parametrize("count", [2**63, 2**64 - 1, MAX_WINDOW_COUNT + 1])
def test_a_window_count_over_the_maximum_is_invalid_argument(
    served: tuple[ServerThread, np.ndarray], count: int
) -> None:
    """The count is the caller's uint64: 2**63 used to be INTERNAL (no SQLite INTEGER), and a huge one read every
    stored prediction into memory at once."""
    server, _ = served
    with InferenceClient(server.address) as client:
        for method, request_type in (("GetModelQuality", mpb.GetModelQualityRequest),
                                     ("GetModelDrift", mpb.GetModelDriftRequest)):  # fmt: skip
            with pytest.raises(InvalidArgument) as caught:
                client._call(method, request_type(model="digits", window=mpb.Window(count=count)), None)
            assert "model 'digits'" in caught.value.details and "window.count is at most" in caught.value.details
        assert client.model_quality("digits", count=MAX_WINDOW_COUNT).predictions == 8


def test_a_seconds_window_reads_at_most_the_maximum(
    served: tuple[ServerThread, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, _ = served
    monkeypatch.setattr(rpc_monitoring, "MAX_WINDOW_COUNT", 5)  # the name decode_window reads
    with InferenceClient(server.address) as client:
        assert client.model_quality("digits", seconds=3600).predictions == 5
        assert client.model_quality("digits", count=3, seconds=3600).predictions == 3


def _feature(**changes: object) -> dict[str, object]:
    feature: dict[str, object] = {"name": "input[0]", "source": "input", "role": "input", "kind": "numeric",
                                  "selector": 0, "edges": [1.0, 2.0], "counts": [1, 2, 3], "sample": [1.0]}  # fmt: skip
    feature.update(changes)
    return feature


def _profile(*features: object) -> str:
    return json.dumps({"format": 1, "model": "digits", "samples": 10, "bins": 10, "features": list(features)})


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        pytest.param('{"format": 1, "model": "digits"', "not a tensorgate reference profile", id="truncated"),
        pytest.param("[]", "a reference profile is a JSON object", id="json-list"),
        pytest.param(_profile(7), "a feature is a JSON object, got 7", id="feature-not-an-object"),
        pytest.param(_profile(_feature(edges=[1.0, "x"])), "edges must hold finite numbers, got 'x'", id="edge-text"),
        pytest.param(_profile(_feature(edges=[2.0, 1.0])), "edges must be strictly increasing", id="unsorted-edges"),
        pytest.param(_profile(_feature(edges=[1.0, 1.0])), "edges must be strictly increasing", id="repeated-edge"),
        pytest.param(_profile(_feature(counts=[1, -2, 3])), "counts must hold non-negative integers", id="count"),
        pytest.param(_profile(_feature(selector=[0])), "bad selector [0]", id="list-selector"),
        pytest.param(
            _profile(_feature(kind="categorical", categories={"a": -5, "b": 3})),
            "categories must hold non-negative integers, got -5",
            id="negative-category",
        ),
    ],
)
def test_an_unusable_profile_is_failed_precondition_naming_the_file(
    served: tuple[ServerThread, np.ndarray], text: str, problem: str
) -> None:
    """These used to be INTERNAL (unsorted edges: a wrong PSI); the message names the file, not the server's path."""
    server, x = served
    path = profile_path(_data_dir(server), "digits")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    try:
        with InferenceClient(server.address) as client:
            with pytest.raises(FailedPrecondition) as caught:
                client.model_drift("digits")
            details = caught.value.details
            assert details.startswith("model 'digits' version 1: profiles/digits.json in the data directory: ")
            assert problem in details and str(_data_dir(server)) not in details
            save_profile(build_profile("digits", {"input": x}), path)
            assert client.model_drift("digits").samples == 8  # the same server, once the file is fixed
    finally:
        path.unlink()
