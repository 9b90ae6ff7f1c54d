"""Poll mode: the server follows the repository on disk while clients keep calling it.

A client thread sends requests the whole time a change is made and counts every failure; the checks wait (bounded)
for the change to show on the wire and then require that no request failed. Files are moved into place with
renames, as deployment tools do, so that a scan never sees half a file.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.onnx_models import identity_model, scale_model
from tests.serving import ServerThread

POLL_SECS = 0.2
WAIT_S = 20.0
ROW = np.ones((1, 4), dtype=np.float32)


def wait_for(what: str, check: Callable[[], bool], timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def _infer(client: grpcclient.InferenceServerClient, model: str, version: str = "") -> np.ndarray:
    inp = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
    inp.set_data_from_numpy(ROW)
    out: np.ndarray | None = client.infer(model, [inp], model_version=version).as_numpy("OUTPUT0")
    assert out is not None
    return out


def _factor(client: grpcclient.InferenceServerClient, model: str, version: str = "") -> float:
    return float(_infer(client, model, version)[0, 0])


def _status(call: Callable[[], object]) -> str | None:
    """The gRPC status a call ends with, as tritonclient spells it; None when it succeeds."""
    try:
        call()
    except InferenceServerException as exc:
        return str(exc.status())
    return None


def _place(staged: Path, target: Path) -> None:
    """Move a prepared file or directory into the repository in one rename."""
    os.replace(staged, target)


def _stage_version(tmp: Path, factor: float) -> Path:
    staged = tmp / f"staged-{factor}-{time.monotonic_ns()}"
    scale_model(staged / "model.onnx", factor)
    return staged


def _stage_config(tmp: Path, text: str) -> Path:
    staged = tmp / f"config-{time.monotonic_ns()}.pbtxt"
    staged.write_text(text)
    return staged


class Traffic:
    """A client thread that calls one model in a loop until stopped (or 30 s), recording what it saw."""

    def __init__(self, address: str, model: str) -> None:
        self._address = address
        self._model = model
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"traffic-{model}", daemon=True)
        self._lock = threading.Lock()
        self.requests = 0
        self.failures: list[str] = []
        self.last_factor: float | None = None

    def _loop(self) -> None:
        client = grpcclient.InferenceServerClient(self._address)
        deadline = time.monotonic() + 30.0
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                try:
                    factor = _factor(client, self._model)
                except Exception as exc:  # noqa: BLE001 - every failure is recorded and asserted on
                    with self._lock:
                        self.requests += 1
                        self.failures.append(repr(exc))
                    continue
                with self._lock:
                    self.requests += 1
                    self.last_factor = factor
        finally:
            client.close()

    def factor(self) -> float | None:
        with self._lock:
            return self.last_factor

    def count(self) -> int:
        with self._lock:
            return self.requests

    def __enter__(self) -> Traffic:
        self._thread.start()
        wait_for("the first answer", lambda: self.count() > 0)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(35)
        assert not self._thread.is_alive()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """One model, `scale`, version 1 answering with factor 1."""
    root = tmp_path / "models"
    scale_model(root / "scale" / "1" / "model.onnx", 1.0)
    return root


@pytest.fixture
def server(repo: Path) -> Iterator[ServerThread]:
    with ServerThread(repo, model_control_mode="poll", repository_poll_secs=POLL_SECS) as s:
        yield s


@pytest.fixture
def client(server: ServerThread) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(server.address)
    yield c
    c.close()


def test_new_version_swaps_in_without_failing_requests(
    server: ServerThread, client: grpcclient.InferenceServerClient, repo: Path, tmp_path: Path
) -> None:
    model_dir = repo / "scale"
    with Traffic(server.address, "scale") as traffic:
        assert traffic.factor() == 1.0

        _place(_stage_version(tmp_path, 2.0), model_dir / "2")
        wait_for("version 2 to answer", lambda: traffic.factor() == 2.0)
        assert _factor(client, "scale") == 2.0
        assert _factor(client, "scale", "2") == 2.0
        assert _status(lambda: _infer(client, "scale", "1")) == str(grpc.StatusCode.NOT_FOUND)  # latest 1

        # Rolling back: take version 2 away again and version 1 is served once more.
        _place(model_dir / "2", tmp_path / "retired-2")
        wait_for("version 1 to answer again", lambda: traffic.factor() == 1.0)
        swapped_back_at = traffic.count()

        # Removing a version that is not served changes nothing for callers.
        _place(_stage_version(tmp_path, 3.0), model_dir / "3")
        wait_for("version 3 to answer", lambda: traffic.factor() == 3.0)
        _place(model_dir / "1", tmp_path / "retired-1")
        wait_for("more requests", lambda: traffic.count() > swapped_back_at + 20)
        wait_for("an index without version 1", lambda: _versions(client, "scale") == ["3"])
        assert traffic.factor() == 3.0

    assert traffic.count() > 0
    assert traffic.failures == []


def test_broken_new_version_leaves_the_old_one_serving(
    server: ServerThread, client: grpcclient.InferenceServerClient, repo: Path, tmp_path: Path
) -> None:
    def reason() -> str:
        return " ".join(m.reason for m in client.get_model_repository_index().models if m.name == "scale")

    with Traffic(server.address, "scale") as traffic:
        staged = tmp_path / "corrupt"
        staged.mkdir()
        (staged / "model.onnx").write_bytes(b"this is not an onnx model")
        _place(staged, repo / "scale" / "2")
        wait_for("the index to give the reason", lambda: "onnxruntime could not load model.onnx" in reason())
        assert "still serving the previous versions" in reason()
        assert str(tmp_path) not in reason()  # the server's paths stay in its log
        assert _factor(client, "scale") == 1.0

        _place(_stage_version(tmp_path, 2.0), tmp_path / "good-2")
        shutil.rmtree(repo / "scale" / "2")
        _place(tmp_path / "good-2", repo / "scale" / "2")
        wait_for("version 2 to answer", lambda: traffic.factor() == 2.0)
        assert reason() == ""
    assert traffic.failures == []


def _versions(client: grpcclient.InferenceServerClient, model: str) -> list[str]:
    return sorted(m.version for m in client.get_model_repository_index().models if m.name == model)


def test_model_directories_appearing_and_disappearing(
    client: grpcclient.InferenceServerClient, repo: Path, tmp_path: Path
) -> None:
    assert _status(lambda: _infer(client, "late")) == str(grpc.StatusCode.NOT_FOUND)
    staged = tmp_path / "late"
    identity_model(staged / "1" / "model.onnx", "FP32")
    _place(staged, repo / "late")
    wait_for("the new model to be ready", lambda: client.is_model_ready("late"))
    np.testing.assert_array_equal(_infer(client, "late"), ROW)

    _place(repo / "late", tmp_path / "gone")
    wait_for("the removed model to stop serving", lambda: not client.is_model_ready("late"))
    assert _status(lambda: _infer(client, "late")) == str(grpc.StatusCode.NOT_FOUND)
    assert "late" not in {m.name for m in client.get_model_repository_index().models}
    assert _factor(client, "scale") == 1.0  # the other model was never touched


def test_changed_config_reloads_without_failing_requests(
    server: ServerThread, client: grpcclient.InferenceServerClient, repo: Path, tmp_path: Path
) -> None:
    assert client.get_model_config("scale").config.max_batch_size == 4  # auto-completed default
    with Traffic(server.address, "scale") as traffic:
        _place(_stage_config(tmp_path, "max_batch_size: 2\n"), repo / "scale" / "config.pbtxt")
        wait_for("max_batch_size 2", lambda: client.get_model_config("scale").config.max_batch_size == 2)
        _place(_stage_config(tmp_path, "max_batch_size: 3\n"), repo / "scale" / "config.pbtxt")
        wait_for("max_batch_size 3", lambda: client.get_model_config("scale").config.max_batch_size == 3)
        before = traffic.count()
        wait_for("more requests", lambda: traffic.count() > before + 20)
    assert traffic.failures == []


def test_broken_config_keeps_the_old_version_serving(
    server: ServerThread,
    client: grpcclient.InferenceServerClient,
    repo: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="tensorgate")

    def reason() -> str:
        return " ".join(m.reason for m in client.get_model_repository_index().models if m.name == "scale")

    with Traffic(server.address, "scale") as traffic:
        _place(_stage_config(tmp_path, "max_batch_size: [ 2\n"), repo / "scale" / "config.pbtxt")
        wait_for("the index to give the reason", lambda: "config.pbtxt line 1" in reason())
        assert "still serving the previous versions" in reason()
        assert any("config.pbtxt line 1" in r.getMessage() for r in caplog.records)
        assert client.is_model_ready("scale")
        assert client.get_model_config("scale").config.max_batch_size == 4
        assert _factor(client, "scale") == 1.0

        _place(_stage_config(tmp_path, "max_batch_size: 2\n"), repo / "scale" / "config.pbtxt")
        wait_for("the fixed config", lambda: client.get_model_config("scale").config.max_batch_size == 2)
        assert reason() == ""
    assert traffic.failures == []


def test_broken_new_model_is_unavailable_until_fixed(
    client: grpcclient.InferenceServerClient, repo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With strict readiness one broken new model takes the replica out of rotation: the health log line names
    it, so that an operator whose every replica polls the same volume learns which model did that."""
    caplog.set_level(logging.INFO, logger="tensorgate")
    staged = tmp_path / "fresh"
    identity_model(staged / "1" / "model.onnx", "FP32")
    (staged / "config.pbtxt").write_text('backend: "python"\n')
    _place(staged, repo / "fresh")

    def failure() -> str:
        rows = [m for m in client.get_model_repository_index().models if m.name == "fresh"]
        return rows[0].reason if rows and rows[0].state == "UNAVAILABLE" else ""

    wait_for("the failure in the index", lambda: "unsupported backend 'python'" in failure())
    assert _status(lambda: _infer(client, "fresh")) == str(grpc.StatusCode.UNAVAILABLE)
    assert not client.is_server_ready()
    line = "inference service health: NOT_SERVING (not ready: fresh)"
    wait_for("the health line naming the model", lambda: line in caplog.text)
    _place(_stage_config(tmp_path, 'backend: "onnxruntime"\n'), repo / "fresh" / "config.pbtxt")
    wait_for("the fixed model", lambda: client.is_model_ready("fresh"))
    assert client.is_server_ready()


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda c: c.load_model("scale"), id="load"),
        pytest.param(lambda c: c.unload_model("scale"), id="unload"),
    ],
)
def test_model_control_rpcs_need_explicit_mode(
    client: grpcclient.InferenceServerClient, call: Callable[[grpcclient.InferenceServerClient], None]
) -> None:
    with pytest.raises(InferenceServerException) as info:
        call(client)
    assert info.value.status() == str(grpc.StatusCode.UNAVAILABLE)
    assert "explicit" in str(info.value.message())
    assert client.is_model_ready("scale")


def test_removing_the_whole_repository_content_unloads(
    client: grpcclient.InferenceServerClient, repo: Path, tmp_path: Path
) -> None:
    shutil.move(str(repo / "scale"), str(tmp_path / "scale-gone"))
    wait_for("the model to go", lambda: not client.is_model_ready("scale"))
    assert _status(lambda: _infer(client, "scale")) == str(grpc.StatusCode.NOT_FOUND)
    assert client.get_model_repository_index().models == []
    assert client.is_server_ready()


def test_a_broken_version_of_a_multi_version_model_retires_no_served_version(tmp_path: Path) -> None:
    """Serving versions 1 and 2 (latest 2), a broken version 3 must not push version 1 out, and a served version
    whose file is broken in place keeps serving what it loaded: a reload that fails changes nothing served."""
    root = tmp_path / "models"
    scale_model(root / "scale" / "1" / "model.onnx", 1.0)
    scale_model(root / "scale" / "2" / "model.onnx", 2.0)
    (root / "scale" / "config.pbtxt").write_text("version_policy: { latest: { num_versions: 2 } }\n")
    with ServerThread(root, model_control_mode="poll", repository_poll_secs=POLL_SECS) as s:
        c = grpcclient.InferenceServerClient(s.address)

        def index() -> dict[str, tuple[str, str]]:
            return {m.version: (m.state, m.reason) for m in c.get_model_repository_index().models}

        try:
            staged = tmp_path / "corrupt"
            staged.mkdir()
            (staged / "model.onnx").write_bytes(b"this is not an onnx model")
            _place(staged, root / "scale" / "3")
            wait_for("version 3 to fail", lambda: index().get("3", ("", ""))[0] == "UNAVAILABLE")
            assert "onnxruntime could not load model.onnx" in index()["3"][1]
            assert index()["1"][0] == index()["2"][0] == "READY"
            assert "still serving the previous versions" in index()["1"][1]
            assert (_factor(c, "scale", "1"), _factor(c, "scale", "2"), _factor(c, "scale")) == (1.0, 2.0, 2.0)
            assert c.is_model_ready("scale", "1") and c.is_server_ready()
            assert _status(lambda: _infer(c, "scale", "3")) == str(grpc.StatusCode.UNAVAILABLE)

            shutil.rmtree(root / "scale" / "3")
            (tmp_path / "corrupt-2").write_bytes(b"this is not an onnx model either")
            _place(tmp_path / "corrupt-2", root / "scale" / "2" / "model.onnx")
            wait_for("the reload to fail", lambda: "3" not in index() and "could not load" in index()["2"][1])
            assert index()["2"][0] == "READY"  # still the session it loaded before the file broke
            assert (_factor(c, "scale", "1"), _factor(c, "scale", "2"), _factor(c, "scale")) == (1.0, 2.0, 2.0)

            _place(_stage_version(tmp_path, 3.0), root / "scale" / "3")
            _place(_stage_version(tmp_path, 2.5) / "model.onnx", root / "scale" / "2" / "model.onnx")
            wait_for("versions 2 and 3", lambda: sorted(index()) == ["2", "3"])
            assert (_factor(c, "scale", "2"), _factor(c, "scale", "3")) == (2.5, 3.0)
            assert all(state == "READY" and reason == "" for state, reason in index().values())
        finally:
            c.close()


def test_a_load_whose_files_cannot_be_listed_fails_with_its_reason(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files vanish while the repository is read (an rsync's temporary files): an error reading a model's
    directory fails that load with a reason that names the file inside the repository. It used to escape the
    load, leaving the model LOADING for good (and at start-up, ending the start), with the server's path in it."""
    import tensorgate.server.repository.manager as manager

    def vanished(path: Path) -> str:
        gone = path / "1" / ".model.onnx.tmp"
        raise FileNotFoundError(2, "No such file or directory", str(gone))

    with ServerThread(repo, model_control_mode="explicit", load_model=[]) as s:
        monkeypatch.setattr(manager, "_file_signature", vanished)
        client = grpcclient.InferenceServerClient(s.address)
        try:
            with pytest.raises(InferenceServerException) as info:
                client.load_model("scale")
            assert info.value.status() == "StatusCode.UNAVAILABLE"
            detail = "unexpected error: FileNotFoundError: scale/1/.model.onnx.tmp: No such file or directory"
            assert detail in info.value.message() and str(repo) not in info.value.message()
            (row,) = client.get_model_repository_index().models
            assert (row.state, row.reason) == ("UNAVAILABLE", detail)
            monkeypatch.undo()
            client.load_model("scale")  # the next load reads the directory again
            assert _factor(client, "scale") == 1.0
        finally:
            client.close()


def test_the_repository_is_read_off_the_event_loop(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Listing every file of a large repository takes a while (0.45 s for 20,000 files): a poll reads the disk
    on a worker thread, so that no call waits for it."""
    from tensorgate.server.repository.manager import ModelRepository

    threads: set[str] = set()
    signature = ModelRepository.signature

    def recorded(self: ModelRepository, name: str) -> str | None:
        threads.add(threading.current_thread().name)
        return signature(self, name)

    monkeypatch.setattr(ModelRepository, "signature", recorded)
    with ServerThread(repo, model_control_mode="poll", repository_poll_secs=POLL_SECS) as s:
        wait_for("a poll", lambda: bool(threads))
        assert s._thread.name not in threads, threads


@pytest.mark.parametrize("how", ["renamed-over", "written-in-place"])
def test_a_model_file_replaced_at_the_same_size_and_mtime_is_reloaded(
    server: ServerThread, client: grpcclient.InferenceServerClient, repo: Path, tmp_path: Path, how: str
) -> None:
    """A retrained model of the same architecture has the same size, and `cp -p`, `rsync -a`, `tar -x` and image
    layers keep the file's mtime: the poll compared size and mtime only, so the old model kept answering."""
    target = repo / "scale" / "1" / "model.onnx"
    assert _factor(client, "scale") == 1.0
    before = target.stat()
    retrained = scale_model(tmp_path / "retrained.onnx", 5.0)
    assert retrained.stat().st_size == before.st_size
    if how == "renamed-over":
        os.utime(retrained, ns=(before.st_atime_ns, before.st_mtime_ns))
        os.replace(retrained, target)
    else:
        shutil.copyfile(retrained, target)
        os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = target.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    wait_for("the retrained model to answer", lambda: _factor(client, "scale") == 5.0)
