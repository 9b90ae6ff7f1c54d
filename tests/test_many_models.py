"""A server with many models: what one model adds (threads) goes with it, and calls that read the repository's disk
do it off the event loop, so that a slow disk (a network volume) does not stall every other model's requests."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from tensorgate.client import InferenceClient
from tensorgate.protos import GRPCInferenceServiceStub
from tensorgate.protos import grpc_service_pb2 as pb
from tests.onnx_models import scale_model, write_config
from tests.serving import ServerThread

MODELS = 20


def _config(name: str, extra: str = "") -> str:
    return (
        f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: 8\n'
        'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n' + extra
    )


@pytest.fixture
def many(tmp_path: Path) -> Path:
    """MODELS small models: every fourth batches dynamically, m002 runs two instances."""
    root = tmp_path / "models"
    for i in range(MODELS):
        name = f"m{i:03d}"
        scale_model(root / name / "1" / "model.onnx", float(i))
        extra = "dynamic_batching { }\n" if i % 4 == 1 else ""
        extra += "instance_group [ { count: 2 kind: KIND_CPU } ]\n" if i == 2 else ""
        write_config(root, name, _config(name, extra))
    return root


def _threads() -> int:
    return len(list(Path("/proc/self/task").iterdir()))


def test_repository_index_reads_the_disk_off_the_event_loop(many: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While RepositoryIndex lists a slow disk, the other models answer (the old code listed it on the loop)."""
    with ServerThread(many) as s, InferenceClient(s.address, timeout=3) as client:
        repository = s.app.repository
        listing, release = threading.Event(), threading.Event()
        real = repository.names_on_disk

        def slow_disk() -> list[str]:
            listing.set()
            release.wait(10)  # a network volume that takes its time
            return real()

        monkeypatch.setattr(repository, "names_on_disk", slow_disk)
        with grpc.insecure_channel(s.address) as channel, ThreadPoolExecutor(1) as pool:
            stub = GRPCInferenceServiceStub(channel)
            index = pool.submit(stub.RepositoryIndex, pb.RepositoryIndexRequest(), timeout=30)
            assert listing.wait(10), "RepositoryIndex never listed the repository"
            try:
                answer = client.infer("m003", {"INPUT0": np.ones((1, 4), np.float32)})
            finally:
                release.set()
            np.testing.assert_array_equal(answer["OUTPUT0"], np.full((1, 4), 3.0, np.float32))
            rows = index.result(30).models
        assert sorted(r.name for r in rows) == [f"m{i:03d}" for i in range(MODELS)]
        assert {r.state for r in rows} == {"READY"}
        # A ready-only index lists what is loaded without reading the disk at all.
        monkeypatch.setattr(repository, "names_on_disk", lambda: pytest.fail("ready-only index read the disk"))
        with grpc.insecure_channel(s.address) as channel:
            ready = GRPCInferenceServiceStub(channel).RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=30)
        assert len(ready.models) == MODELS


def test_unloaded_models_leave_no_threads(many: Path) -> None:
    """Each instance keeps one idle thread while loaded; an unload ends them, so load/unload cycles of many models
    do not pile threads up."""
    with ServerThread(many, model_control_mode="explicit") as s, InferenceClient(s.address, timeout=30) as client:
        names = [f"m{i:03d}" for i in range(MODELS)]
        for name in names:  # warm-up: the pools that loads use start their threads
            client.load(name)
        for name in names:
            client.unload(name)
        base = _threads()
        for cycle in range(2):
            for name in names:
                client.load(name)
            loaded = _threads()
            # One thread per instance (MODELS + 1 with m002's two), and not several per model.
            assert base + MODELS <= loaded <= base + MODELS + 1 + 8, (cycle, base, loaded)
            for name in names:
                client.unload(name)
            pause = threading.Event()
            for _ in range(100):  # retired versions close on a task: allow it a moment
                if _threads() <= base + 2:
                    break
                pause.wait(0.05)
            assert _threads() <= base + 2, (cycle, base, _threads())
