"""Running out of disk under ``--data-dir``: inference goes on, the monitoring writes fail clearly and recover.

Each test mounts a small tmpfs (root only; skipped otherwise) and fills it with a file, as a disk fills in
production, then frees it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import socket
import sqlite3
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from google.protobuf import json_format, text_format
from tritonclient.utils import InferenceServerException

from tensorgate.client import InferenceClient
from tensorgate.client.errors import ResourceExhausted, Unavailable
from tensorgate.protos import model_config_pb2 as mc
from tensorgate.server.monitoring.drift import build_profile, save_profile
from tensorgate.server.monitoring.errors import StoreWriteError
from tensorgate.server.monitoring.export import export
from tensorgate.server.monitoring.store import DB_NAME, Prediction, PredictionStore
from tests.onnx_models import identity_model, write_config
from tests.process import TENSORGATE, free_port
from tests.scraping import scrape
from tests.serving import ServerThread

CONFIG = """
name: "ident"
backend: "onnxruntime"
max_batch_size: 8
input [{ name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] }]
output [{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] }]
"""


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB filesystem of its own."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@contextlib.contextmanager
def filled(disk: Path) -> Iterator[None]:
    """The disk full until the block ends (what the server has written stays)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            for _ in range(1024):  # bounded: 4 MiB at most on a 1 MiB disk
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    try:
        yield
    finally:
        filler.unlink()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("exhaustion")
    identity_model(root / "ident" / "1" / "model.onnx", "FP32")
    write_config(root, "ident", CONFIG)
    return root


def _infer(client: InferenceClient, request_id: str) -> None:
    result = client.infer("ident", {"INPUT0": np.ones((1, 4), np.float32)}, request_id=request_id)
    assert result["OUTPUT0"].tolist() == [[1.0, 1.0, 1.0, 1.0]]


def _failed_total(s: ServerThread) -> float:
    return scrape(f"http://127.0.0.1:{s.app.metrics_port}/metrics")[("tensorgate_capture_failed_total", frozenset())]


def test_full_data_dir_fails_feedback_clearly_and_recovers(
    repo: Path, small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = small_disk / "data"
    with ServerThread(repo, data_dir=data) as s, InferenceClient(s.address, timeout=20) as client:
        for i in range(5):
            _infer(client, f"before-{i}")
        assert s.app.capture is not None and s.app.capture.flush()
        with filled(small_disk):
            caplog.clear()
            caplog.set_level(logging.WARNING, logger="tensorgate.server.monitoring.capture")
            # Inference answers on a full disk; each of these is its own capture batch, and each fails.
            for i in range(6):
                _infer(client, f"during-{i}")
                assert s.app.capture.flush()
            assert _failed_total(s) == 6
            failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
            assert len(failures) == 1, [r.getMessage() for r in failures]  # once, not once per batch
            assert "database or disk is full" in failures[0].getMessage()

            # Feedback for a stored prediction: told that the disk is full, not INTERNAL.
            with pytest.raises(ResourceExhausted) as raised:
                client.submit_feedback("ident", "before-0", 1)
            assert "model 'ident'" in raised.value.details and "disk" in raised.value.details
            with pytest.raises(ResourceExhausted):  # one transaction: the whole batch is refused
                client.submit_feedback_batch("ident", [("before-1", 1), ("before-2", 1)])
            # The stream answers each item and goes on.
            streamed = list(client.submit_feedback_stream("ident", [("before-3", 1), ("before-4", 1)]))
            assert [x.code for x in streamed] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
            assert "database or disk is full" in streamed[0].message

        # Space again: capture and feedback work without a restart.
        caplog.clear()
        _infer(client, "after-0")
        assert s.app.capture.flush()
        assert any("works again" in r.getMessage() for r in caplog.records)
        client.submit_feedback("ident", "after-0", 1)
        client.submit_feedback("ident", "before-0", 1)
        assert list(client.submit_feedback_stream("ident", [("before-3", 1)]))[0].code == grpc.StatusCode.OK
        assert _failed_total(s) == 6
    with sqlite3.connect(data / DB_NAME) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("SELECT COUNT(*) FROM predictions WHERE label IS NOT NULL").fetchone() == (3,)


def test_profile_on_a_full_disk_leaves_no_temp_file(small_disk: Path) -> None:
    profile = build_profile("ident", {"INPUT0": np.random.default_rng(0).random((2000, 8), np.float32)})
    target = small_disk / "profiles" / "ident.json"
    with filled(small_disk):
        with pytest.raises(OSError, match="No space left"):
            save_profile(profile, target)
        assert sorted(p.name for p in target.parent.iterdir()) == []
    assert save_profile(profile, target).is_file()


def test_export_on_a_full_disk_leaves_no_partial_file(tmp_path: Path, small_disk: Path) -> None:
    store = PredictionStore(tmp_path / DB_NAME)
    try:
        row = np.zeros((1, 256), np.float32)
        store.insert([Prediction(f"r{i}", "ident", "1", time.time(), {"x": row}, {"y": row}) for i in range(200)])
        out = small_disk / "ident.jsonl"
        with filled(small_disk):
            with pytest.raises(OSError, match="No space left"):
                export(store, "ident", out)
            assert not out.exists()
        # An export already there stays whole when the next one fails (review 122: it was removed).
        out.write_text('{"previous": true}\n')
        with filled(small_disk):
            with pytest.raises(OSError, match="No space left"):
                export(store, "ident", out)
        assert out.read_text() == '{"previous": true}\n'
        assert sorted(p.name for p in small_disk.iterdir() if p.name.endswith(".tmp")) == []
    finally:
        store.close()


def test_store_on_a_full_disk_says_so_and_closes(small_disk: Path) -> None:
    """The error names the full disk (not a failed ROLLBACK), and closing does not raise: a server stopping on a
    full disk still closes its models."""
    row = np.zeros((1, 256), np.float32)
    store = PredictionStore(small_disk / DB_NAME)
    store.insert([Prediction(f"a{i}", "ident", "1", time.time(), {"x": row}, {"y": row}) for i in range(20)])
    with filled(small_disk):
        with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
            for i in range(200):  # bounded: the disk has a few KiB left at most
                store.insert([Prediction(f"b{i}", "ident", "1", time.time(), {"x": row}, {"y": row})])
        store.close()
    reopened = PredictionStore(small_disk / DB_NAME)
    try:
        assert reopened.count("ident") >= 20
    finally:
        reopened.close()


def test_uploaded_model_on_a_full_disk_is_refused_and_leaves_nothing(
    repo: Path, small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RepositoryModelLoad's files are staged in the temporary directory: a full one is the server's problem
    (RESOURCE_EXHAUSTED, not INVALID_ARGUMENT), nothing half-written stays, and nothing half-loads."""
    monkeypatch.setattr(tempfile, "tempdir", str(small_disk))
    files = {
        "file:1/model.onnx": (repo / "ident" / "1" / "model.onnx").read_bytes(),
        "file:1/padding.bin": b"\0" * (256 << 10),
    }
    config = CONFIG.replace('"ident"', '"up"')
    with ServerThread(repo, model_control_mode="explicit") as s:
        client = tc.InferenceServerClient(s.address)
        with filled(small_disk):
            with pytest.raises(InferenceServerException) as raised:
                client.load_model("up", config=json.dumps(_config_json(config)), files=files)
            assert raised.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
            assert "model 'up'" in raised.value.message() and "No space left" in raised.value.message()
            assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]
            assert not client.is_model_ready("up")
        client.load_model("up", config=json.dumps(_config_json(config)), files=files)
        assert client.is_model_ready("up")
        client.close()
    assert list(small_disk.iterdir()) == []


def _config_json(text: str) -> dict[str, object]:
    return json_format.MessageToDict(text_format.Parse(text, mc.ModelConfig()))


@dataclass
class Exhausted:
    """A child server at its descriptor limit: every descriptor it may open is taken by a registered region."""

    pid: int
    address: str
    metrics_port: int
    triton: tc.InferenceServerClient
    client: InferenceClient
    refused: InferenceServerException


@contextlib.contextmanager
def out_of_descriptors(repo: Path) -> Iterator[Exhausted]:
    """`tensorgate serve` under ulimit -n 64, its descriptors taken by shared memory regions (each holds one)."""
    keys = [f"/tensorgate-exhaust-{os.getpid()}-{i}" for i in range(80)]
    port, metrics_port = free_port(), free_port()
    args = ["--model-repository", str(repo), "--grpc-port", str(port), "--metrics-port", str(metrics_port)]
    server = subprocess.Popen(
        [TENSORGATE, "serve", *args, "--shared-memory", "system"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)),
    )
    try:
        for key in keys:
            fd = os.open(f"/dev/shm{key}", os.O_RDWR | os.O_CREAT, 0o600)
            os.ftruncate(fd, 64)
            os.close(fd)
        with InferenceClient(f"127.0.0.1:{port}", timeout=20) as client:
            deadline = time.monotonic() + 60
            while not _ready(client) and time.monotonic() < deadline:  # the child is still starting
                time.sleep(0.2)
            _infer(client, "first")
            triton = tc.InferenceServerClient(f"127.0.0.1:{port}")
            refused: InferenceServerException | None = None
            for i, key in enumerate(keys):
                try:
                    triton.register_system_shared_memory(f"r{i}", key, 64)
                except InferenceServerException as exc:
                    refused = exc
                    break
            assert refused is not None, "80 regions registered under a limit of 64 descriptors"
            yield Exhausted(server.pid, f"127.0.0.1:{port}", metrics_port, triton, client, refused)
            triton.unregister_system_shared_memory()
            _infer(client, "after")  # the connections it has kept working throughout
            triton.close()
        assert server.poll() is None
    finally:
        server.terminate()
        server.wait(30)
        for key in keys:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/dev/shm{key}")


def test_out_of_descriptors_refuses_a_region_and_keeps_serving(repo: Path) -> None:
    """RESOURCE_EXHAUSTED naming the limit, not INVALID_ARGUMENT (the key is fine); a region fits again once
    others are unregistered."""
    with out_of_descriptors(repo) as server:
        assert server.refused.status() == "StatusCode.RESOURCE_EXHAUSTED", server.refused.message()
        assert "file descriptors" in server.refused.message()
        server.triton.unregister_system_shared_memory("r0")
        server.triton.register_system_shared_memory("again", f"/tensorgate-exhaust-{os.getpid()}-0", 64)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_out_of_descriptors_a_waiting_scrape_does_not_spin(repo: Path) -> None:
    """A scrape that cannot be accepted waits in the listen queue; the metrics thread must not poll and fail to
    accept it in a loop (a core of CPU, and the GIL the event loop needs), and it is answered once descriptors
    are free."""
    with out_of_descriptors(repo) as server:
        with socket.create_connection(("127.0.0.1", server.metrics_port), timeout=5) as scrape_:
            scrape_.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            before = _cpu_seconds(server.pid)
            time.sleep(3)
            used = _cpu_seconds(server.pid) - before
            assert used < 1.0, f"the server used {used:.2f} s of CPU in 3 s with one scrape waiting"
            server.triton.unregister_system_shared_memory()
            scrape_.settimeout(10)
            assert scrape_.recv(64).startswith(b"HTTP/1.0 200")


def _ready(client: InferenceClient) -> bool:
    try:
        return client.ready(timeout=2)
    except Unavailable:
        return False


def test_only_a_write_the_machine_refused_is_worth_sending_again(tmp_path: Path) -> None:
    """StoreWriteError (UNAVAILABLE or RESOURCE_EXHAUSTED, "send it again") is for the errors that can pass: a
    read-only or locked database, a full disk. A missing table is a bug, which must reach INTERNAL and the log
    (review 122: every sqlite3.Error was "send it again later")."""
    path = tmp_path / "t.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()
    read_only = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    with pytest.raises(sqlite3.OperationalError) as refused:
        read_only.execute("INSERT INTO t VALUES (1)")
    read_only.close()
    assert StoreWriteError.environmental(refused.value)
    assert StoreWriteError("m", "feedback", refused.value).code == grpc.StatusCode.UNAVAILABLE
    writer = sqlite3.connect(path)
    with pytest.raises(sqlite3.OperationalError) as bug:
        writer.execute("INSERT INTO missing VALUES (1)")
    writer.close()
    assert not StoreWriteError.environmental(bug.value)


def test_an_export_keeps_the_files_mode_and_replaces_a_links_target(tmp_path: Path) -> None:
    """Written beside the file and renamed over it (a full disk leaves the old one whole), an export keeps the
    old file's mode (captured inputs kept private stay so) and, through a link, replaces the file it points to,
    leaving the link; a new file gets the mode open() gives (review 123)."""
    store = PredictionStore(tmp_path / DB_NAME)
    try:
        row = np.zeros((1, 4), np.float32)
        store.insert([Prediction(f"r{i}", "ident", "1", time.time(), {"x": row}, {"y": row}) for i in range(3)])
        private = tmp_path / "private.jsonl"
        private.write_text("old\n")
        private.chmod(0o600)
        assert export(store, "ident", private) == 3
        assert stat.S_IMODE(private.stat().st_mode) == 0o600 and private.read_text().count("\n") == 3
        link = tmp_path / "latest.jsonl"
        link.symlink_to(private)
        assert export(store, "ident", link) == 3
        assert link.is_symlink() and link.resolve() == private.resolve()
        fresh = tmp_path / "fresh.jsonl"
        umask = os.umask(0)
        os.umask(umask)
        assert export(store, "ident", fresh) == 3
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask
        assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    finally:
        store.close()
