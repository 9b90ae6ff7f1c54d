"""Reloads and unloads in explicit mode while requests are on their way: every request the server accepted gets
its answer, or a status that names the model the caller asked for.

Each race is made deterministic with what the code offers: the repository's per-model lock (an ensemble's
refresh after its step model's unload waits for it), the response cache's key (made on a worker thread for a
large request), and a model whose request sets its run time (onnx_models.paced_model) for a batch still computing
on a retired version at a stop. Real servers, real ONNX models, real tritonclient.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from tensorgate.protos import GRPCInferenceServiceStub
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos.tensors import encode_infer_request
from tensorgate.server.errors import TensorgateError
from tests.onnx_models import identity_model, paced_model, scale_model, write_config
from tests.process import ServeProcess
from tests.serving import ServerThread
from tests.test_cli import _wait_ready
from tests.test_poll import wait_for

ENSEMBLE = """
name: "ens"
platform: "ensemble"
max_batch_size: 4
input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 4 ] } ]
ensemble_scheduling { step [
  { model_name: "step" model_version: -1
    input_map { key: "INPUT0" value: "X" } output_map { key: "OUTPUT0" value: "Y" } } ] }
"""


def _ensemble_repository(root: Path) -> Path:
    scale_model(root / "step" / "1" / "model.onnx", 2.0)
    write_config(root, "step", 'name: "step"\nbackend: "onnxruntime"\nmax_batch_size: 4\n')
    write_config(root, "ens", ENSEMBLE)
    (root / "ens" / "1").mkdir()
    return root


def _infer_ensemble(address: str) -> np.ndarray:
    x = tc.InferInput("X", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), np.float32))
    client = tc.InferenceServerClient(address)
    try:
        out: np.ndarray | None = client.infer("ens", [x], client_timeout=30).as_numpy("Y")
    finally:
        client.close()
    assert out is not None
    return out


def test_an_ensemble_request_between_its_step_models_unload_and_its_own_names_the_ensemble(tmp_path: Path) -> None:
    """Unloading a step model unloads its ensembles a moment later (their refresh runs after the unload, under
    each ensemble's lock). A request to the ensemble in between found the ensemble served and its step gone: it
    used to fail with "model 'step' is not ready: unloaded", which names a model the caller never asked for."""
    with ServerThread(
        _ensemble_repository(tmp_path / "models"), model_control_mode="explicit", load_model=["ens"]
    ) as s:
        np.testing.assert_array_equal(_infer_ensemble(s.address), np.full((1, 4), 2.0, np.float32))
        repository = s.app.repository

        async def unload_step_before_the_ensemble_refresh() -> asyncio.Lock:
            lock = repository._lock("ens")
            await lock.acquire()
            await repository.unload("step")
            return lock

        lock = s.run(unload_step_before_the_ensemble_refresh())
        try:
            with pytest.raises(InferenceServerException) as info:
                _infer_ensemble(s.address)
        finally:
            s._loop.call_soon_threadsafe(lock.release)
        assert info.value.status() == str(grpc.StatusCode.UNAVAILABLE)
        message = str(info.value.message())
        assert message.startswith("in ensemble 'ens', model 'step'"), message
        assert "unloaded" in message, message
        client = tc.InferenceServerClient(s.address)
        try:
            wait_for("the ensemble unloaded with its step", lambda: not client.is_model_ready("ens"))
            client.load_model("step")
            wait_for("the ensemble back with its step", lambda: client.is_model_ready("ens"))
        finally:
            client.close()
        np.testing.assert_array_equal(_infer_ensemble(s.address), np.full((1, 4), 2.0, np.float32))


@pytest.mark.parametrize("change", ["unload", "wider"])
def test_an_ensemble_stops_serving_when_its_step_model_changes_not_a_moment_later(tmp_path: Path, change: str) -> None:
    """The ensembles of a step model that is unloaded, or reloaded with a shape they no longer fit, are checked
    again before the unload or load returns. An unload left it to a task that ran later: in between, the ensemble
    was served and its requests failed naming a model their callers never asked for (a load's task happened to
    run before the load returned; "wider" keeps it so)."""
    root = _ensemble_repository(tmp_path / "models")
    with ServerThread(root, model_control_mode="explicit", load_model=["ens"]) as s:
        repository = s.app.repository

        async def change_the_step_then_ask_for_the_ensemble() -> TensorgateError | None:
            if change == "unload":
                await repository.unload("step")
            else:
                shutil.rmtree(root / "step" / "1")
                scale_model(root / "step" / "2" / "model.onnx", 3.0, width=8)
                await repository.load("step")
            try:
                repository.get("ens", "")  # what the next request finds, before any other task has run
            except TensorgateError as exc:
                return exc
            return None

        refused = s.run(change_the_step_then_ask_for_the_ensemble())
        assert refused is not None, "the ensemble was still served after its step model changed"
        assert refused.code == grpc.StatusCode.UNAVAILABLE, refused.message
        assert refused.message.startswith("model 'ens' is not ready"), refused.message
        with pytest.raises(InferenceServerException) as info:
            _infer_ensemble(s.address)
        assert info.value.status() == str(grpc.StatusCode.UNAVAILABLE), info.value.message()


WIDTH = 300_000  # 1.2 MB a row: above the response cache's 1 MiB, so its key is made on a worker thread
CACHED = 'name: "cached"\nbackend: "onnxruntime"\nmax_batch_size: 4\nresponse_cache { enable: true }\n'


def test_a_cached_models_large_request_survives_a_reload_while_its_key_is_made(tmp_path: Path) -> None:
    """The response cache makes a large request's key on a worker thread, after the request found its model
    version. A reload that retired that version meanwhile closed its scheduler, which then refused the request
    with UNAVAILABLE "version 1 is being unloaded", though the model never stopped serving: a request lost across
    a reload. Held while its key is made, it runs on the version it found."""
    root = tmp_path / "models"
    identity_model(root / "cached" / "1" / "model.onnx", "FP32", ("batch", WIDTH))
    write_config(root, "cached", CACHED)
    with ServerThread(root, model_control_mode="explicit", load_model=["cached"], response_cache_bytes=64 << 20) as s:
        cache = s.app._handler.cache
        assert cache is not None
        keying, go = threading.Event(), threading.Event()
        make_key = cache.key

        def key_after_the_reload(*args: Any) -> bytes:
            keying.set()
            assert go.wait(30)
            return make_key(*args)

        cache.key = key_after_the_reload  # type: ignore[method-assign,assignment]
        row = np.arange(WIDTH, dtype=np.float32)[np.newaxis]
        answers: dict[str, object] = {}

        def call() -> None:
            x = tc.InferInput("INPUT0", [1, WIDTH], "FP32")
            x.set_data_from_numpy(row)
            client = tc.InferenceServerClient(s.address)
            try:
                answers["out"] = client.infer("cached", [x], client_timeout=30).as_numpy("OUTPUT0")
            except InferenceServerException as exc:
                answers["out"] = f"{exc.status()} {exc.message()}"
            finally:
                client.close()

        caller = threading.Thread(target=call)
        caller.start()
        try:
            assert keying.wait(30)
            # A changed config: version 1 is built again and the one the request found is retired.
            write_config(root, "cached", CACHED + "dynamic_batching { }\n")
            control = tc.InferenceServerClient(s.address)
            try:
                control.load_model("cached")
                assert control.get_model_config("cached").config.HasField("dynamic_batching")
            finally:
                control.close()
            s.run(asyncio.sleep(0.2))  # the retired scheduler's close has its turns on the loop
        finally:
            go.set()
            caller.join(30)
        out = answers["out"]
        assert isinstance(out, np.ndarray), out
        np.testing.assert_array_equal(out, row)


def test_a_reload_asking_for_more_instances_than_threads_fails_clearly_and_the_old_version_serves(
    tmp_path: Path,
) -> None:
    """Each instance is a server thread. A reload with `count: 100000` ran out of threads part way: INTERNAL,
    and the threads it had started never ended, so every later load failed INTERNAL ("can't start new thread")
    while the process lived. It is refused before anything is built, naming the model and the limit."""
    root = tmp_path / "models"
    scale_model(root / "m" / "1" / "model.onnx", 2.0)
    config = 'name: "m"\nbackend: "onnxruntime"\nmax_batch_size: 4\ninstance_group [ { count: %d } ]\n'
    write_config(root, "m", config % 1)
    with ServerThread(root, model_control_mode="explicit", load_model=["m"]) as s:
        client = tc.InferenceServerClient(s.address)
        x = tc.InferInput("INPUT0", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), np.float32))
        try:
            write_config(root, "m", config % 100_000)
            with pytest.raises(InferenceServerException) as info:
                client.load_model("m")
            assert info.value.status() == str(grpc.StatusCode.UNAVAILABLE), info.value.message()
            message = str(info.value.message())
            assert "model 'm'" in message and "100000 instances" in message, message
            np.testing.assert_array_equal(client.infer("m", [x]).as_numpy("OUTPUT0"), np.full((1, 4), 2.0))
            write_config(root, "m", config % 2)
            client.load_model("m")  # a later load still works
            assert client.get_model_config("m").config.instance_group[0].count == 2
            np.testing.assert_array_equal(client.infer("m", [x]).as_numpy("OUTPUT0"), np.full((1, 4), 2.0))
        finally:
            client.close()


@pytest.mark.parametrize("change", ["unload", "reload"])
def test_a_stop_cuts_short_the_batch_of_a_version_an_unload_or_reload_retired(tmp_path: Path, change: str) -> None:
    """A version retired by an unload or a reload finishes what it took, apart from the served ones. At a stop
    whose grace ended, only the served versions had their queues refused and their batches cut short: the
    retired one computed on, the exit waited the repository's 30 s for it, then the process exited under the
    running ONNX Runtime session and aborted (exit -6) instead of exiting 0 within its grace."""
    repo = tmp_path / "models"
    paced_model(repo / "slow" / "1" / "model.onnx")  # 2,000 rounds of a matmul per unit of its input
    config = "max_batch_size: 8\ninstance_group [{ kind: KIND_CPU count: %d }]\n"
    write_config(repo, "slow", config % 1)
    args = ["--model-repository", str(repo), "--grpc-port", "0", "--shutdown-grace-s", "1"]
    with ServeProcess([*args, "--model-control-mode", "explicit", "--load-model", "slow"]) as server:
        _wait_ready(server.address).close()
        with grpc.insecure_channel(server.address) as channel:
            stub = GRPCInferenceServiceStub(channel)
            x = np.full((1, 1), 5000.0, np.float32)  # ten million rounds: minutes
            computing = stub.ModelInfer.future(encode_infer_request("slow", [("INPUT0", x)]), timeout=120)
            server.wait_in_flight()
            if change == "unload":
                stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="slow"), timeout=30)
            else:
                write_config(repo, "slow", config % 2)
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="slow"), timeout=60)
            server.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            with pytest.raises(grpc.RpcError) as cut:
                computing.result(60)
            assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
            assert server.proc.wait(60) == 0, server.output[-3000:]
        # Not the 30 s the repository waits for a retired version's batch; generous against a loaded machine.
        assert time.monotonic() - signalled < 20, time.monotonic() - signalled


def test_a_load_that_cannot_start_its_instances_fails_clearly_and_leaves_nothing_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process has no thread left for version 2's instance (as when its threads run out). Building what
    serves a version happened outside the load's error handling: the error escaped as INTERNAL, a first load
    stayed LOADING for good, and version 1's scheduler and both sessions stayed behind. Now the load fails
    UNAVAILABLE naming the model, nothing of it keeps running, a model that served keeps serving, and a later load
    works."""
    root = tmp_path / "models"
    for version in (1, 2):
        scale_model(root / "m" / str(version) / "model.onnx", float(version))
    write_config(root, "m", 'name: "m"\nmax_batch_size: 4\nversion_policy { all {} }\n')
    start = threading.Thread.start

    def no_thread_for_version_2(thread: threading.Thread) -> None:
        if thread.name.startswith("tg-m-2-"):
            raise RuntimeError("can't start new thread")
        start(thread)

    def instances(version: int) -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith(f"tg-m-{version}-")]

    with ServerThread(root, model_control_mode="explicit", load_model=[]) as s:
        client = tc.InferenceServerClient(s.address)
        try:
            with monkeypatch.context() as patch:
                patch.setattr(threading.Thread, "start", no_thread_for_version_2)
                with pytest.raises(InferenceServerException) as info:
                    client.load_model("m")
            assert info.value.status() == str(grpc.StatusCode.UNAVAILABLE), info.value.message()
            assert "model 'm'" in str(info.value.message()) and "can't start new thread" in str(info.value.message())
            (row,) = [r for r in client.get_model_repository_index().models if r.name == "m"]
            assert row.state == "UNAVAILABLE", row
            wait_for("version 1's instance to end", lambda: not instances(1))
            client.load_model("m")
            assert client.is_model_ready("m") and len(instances(1)) == len(instances(2)) == 1
            write_config(root, "m", 'name: "m"\nmax_batch_size: 8\nversion_policy { all {} }\n')
            with monkeypatch.context() as patch:
                patch.setattr(threading.Thread, "start", no_thread_for_version_2)
                with pytest.raises(InferenceServerException):
                    client.load_model("m")  # a reload: the versions served before keep serving
            ones = np.ones((1, 4), np.float32)
            x = tc.InferInput("INPUT0", [1, 4], "FP32")
            x.set_data_from_numpy(ones)
            np.testing.assert_array_equal(client.infer("m", [x], model_version="2").as_numpy("OUTPUT0"), 2 * ones)
            assert client.get_model_config("m").config.max_batch_size == 4
        finally:
            client.close()


def test_a_failed_reload_leaves_the_kept_versions_config_as_it_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload that adds a canary split and new files for version 2, whose instance cannot start: version 1,
    kept as it was, had its config rewritten with the split's parameters before the failure, so ModelConfig
    showed a rollout that was not in force."""
    root = tmp_path / "models"
    for version in (1, 2):
        scale_model(root / "m" / str(version) / "model.onnx", float(version))
    base = 'name: "m"\nmax_batch_size: 4\nversion_policy { all {} }\n'
    write_config(root, "m", base)
    start = threading.Thread.start

    def no_thread_for_version_2(thread: threading.Thread) -> None:
        if thread.name.startswith("tg-m-2-"):
            raise RuntimeError("can't start new thread")
        start(thread)

    with ServerThread(root, model_control_mode="explicit", load_model=["m"]) as s:
        client = tc.InferenceServerClient(s.address)
        try:
            scale_model(root / "m" / "2" / "model.onnx", 3.0)  # new files: version 2 is built again
            split = 'parameters { key: "tensorgate.rollout.canary_version" value: { string_value: "2" } }\n'
            split += 'parameters { key: "tensorgate.rollout.canary_percent" value: { string_value: "10" } }\n'
            write_config(root, "m", base + split)
            with monkeypatch.context() as patch:
                patch.setattr(threading.Thread, "start", no_thread_for_version_2)
                with pytest.raises(InferenceServerException):
                    client.load_model("m")
            shown = client.get_model_config("m", "1").config.parameters
            assert not [key for key in shown if key.startswith("tensorgate.rollout.")], dict(shown)
        finally:
            client.close()
