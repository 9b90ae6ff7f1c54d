"""Prediction capture: request ids on every response, sampling, a bounded queue that drops samples (never requests),
retention, and a store that survives a server restart."""

from __future__ import annotations

import asyncio
import logging
import shutil
import sqlite3
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from tensorgate.client import AsyncInferenceClient, InferenceClient
from tensorgate.protos import model_config_pb2 as mc
from tensorgate.server import ServerSettings
from tensorgate.server.cli import build_parser, main
from tensorgate.server.monitoring.capture import Capture
from tensorgate.server.monitoring.store import DB_NAME, Prediction, PredictionStore
from tensorgate.server.settings import CAPTURE_QUEUE_BYTES, CAPTURE_QUEUE_SIZE
from tests.monitoring import digits_repository
from tests.onnx_models import identity_model, write_config
from tests.process import ServeProcess
from tests.scraping import scrape
from tests.serving import ServerThread

DROPPED: tuple[str, frozenset[tuple[str, str]]] = ("tensorgate_capture_dropped_total", frozenset())


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    return digits_repository(tmp_path_factory.mktemp("capture"))


def _stored(data_dir: Path, model: str = "digits") -> int:
    store = PredictionStore(data_dir / DB_NAME)
    try:
        return store.count(model)
    finally:
        store.close()


def test_every_response_carries_an_id(digits: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path) -> None:
    """The caller's id comes back unchanged; without one the server makes a UUID (also without --data-dir)."""
    repo, x, _ = digits
    with ServerThread(repo) as s, InferenceClient(s.address) as client:
        given = client.infer("digits", {"input": x[:1]}, request_id="my-id")
        made = client.infer("digits", {"input": x[:1]})
        other = client.infer("digits", {"input": x[:1]})
    assert given.id == "my-id"
    assert str(uuid.UUID(made.id)) == made.id
    assert made.id != other.id


def test_capture_survives_a_restart(digits: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path) -> None:
    """Two `tensorgate serve` processes, one after the other, on the same --data-dir."""
    repo, x, y = digits
    data = tmp_path / "data"
    args = ["--model-repository", str(repo), "--grpc-port", "0", "--data-dir", str(data)]
    with ServeProcess(args) as first:
        first.wait_for_line(r"\bready: \d+ model")
        with InferenceClient(first.address) as client:
            ids = [client.infer("digits", {"input": x[i : i + 2]}).id for i in range(0, 40, 2)]
            client.submit_feedback("digits", ids[0], y[0:2])
        assert first.terminate() == 0
    assert _stored(data) == len(ids)
    with ServeProcess(args) as second:
        second.wait_for_line(r"\bready: \d+ model")
        with InferenceClient(second.address) as client:
            # A label for a prediction the first process captured joins after the restart.
            client.submit_feedback("digits", ids[1], y[2:4])
            quality = client.model_quality("digits")
        assert second.terminate() == 0
    assert quality.predictions == len(ids)
    assert quality.labelled == 2
    assert quality.rows == 4


def test_captured_inputs_are_readable_by_the_server_s_user_alone(
    digits: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """The store holds callers' inputs (possibly personal data): SQLite made it, and its WAL, world-readable."""
    repo, x, _ = digits
    data = tmp_path / "data"
    with ServerThread(repo, data_dir=data) as s, InferenceClient(s.address) as client:
        client.infer("digits", {"input": x[:2]})
        deadline = time.monotonic() + 30
        while not (data / f"{DB_NAME}-wal").exists():  # the capture is written off the request path
            assert time.monotonic() < deadline, "nothing captured"
            time.sleep(0.05)
        modes = {p.name: p.stat().st_mode & 0o777 for p in (data, data / DB_NAME, data / f"{DB_NAME}-wal")}
    assert modes == {"data": 0o700, DB_NAME: 0o600, f"{DB_NAME}-wal": 0o600}


def test_saturated_queue_drops_samples_not_requests(
    digits: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    repo, x, _ = digits

    async def burst(address: str, n: int) -> list[str]:
        async with AsyncInferenceClient(address) as client:
            results = await asyncio.gather(
                *(client.infer("digits", {"input": x[i % 64 : i % 64 + 1]}) for i in range(n))
            )
        return [r.id for r in results]

    with ServerThread(repo, data_dir=tmp_path / "data", capture_queue_size=1) as s:
        url = f"http://127.0.0.1:{s.app.metrics_port}/metrics"
        answered = 0
        for _ in range(20):  # bounded: a queue of one fills within the first bursts
            ids = asyncio.run(burst(s.address, 200))
            assert len(ids) == 200 and all(ids)
            answered += len(ids)
            if scrape(url).get(DROPPED, 0) > 0:
                break
        dropped = scrape(url)[DROPPED]
        captured = scrape(url)[("tensorgate_captured_total", frozenset())]
    assert dropped > 0
    # Stopping the server stores what was still queued: every answered request was either stored or dropped.
    assert _stored(tmp_path / "data") + dropped == answered
    assert captured + dropped <= answered


def _with_parameters(repo: Path, dst: Path, **parameters: str) -> Path:
    """A copy of the repository whose digits config.pbtxt has these parameter values instead of its own."""
    shutil.copytree(repo, dst)
    config = dst / "digits" / "config.pbtxt"
    text = config.read_text()
    for key, value in parameters.items():
        head = f'key: "{key}"\n  value: {{ string_value: "'
        start = text.index(head) + len(head)
        text = text[:start] + value + text[text.index('"', start) :]
    config.write_text(text)
    return dst


@pytest.mark.parametrize(
    ("rate", "inputs", "expect_rows", "expect_inputs"),
    [
        pytest.param("0", "true", 0, None, id="rate-0"),
        pytest.param("1", "false", 30, False, id="outputs-only"),
    ],
)
def test_per_model_capture_settings(
    digits: tuple[Path, np.ndarray, np.ndarray],
    tmp_path: Path,
    rate: str,
    inputs: str,
    expect_rows: int,
    expect_inputs: bool | None,
) -> None:
    repo = _with_parameters(
        digits[0], tmp_path / "models", **{"tensorgate.capture.sample_rate": rate, "tensorgate.capture.inputs": inputs}
    )
    x = digits[1]
    with ServerThread(repo, data_dir=tmp_path / "data") as s, InferenceClient(s.address) as client:
        for i in range(30):
            client.infer("digits", {"input": x[i : i + 1]})
        assert s.app.capture is not None and s.app.capture.flush()
        quality = client.model_quality("digits", count=100)
    assert quality.predictions == expect_rows
    if expect_inputs is not None:
        store = PredictionStore(tmp_path / "data" / DB_NAME)
        try:
            assert all((p.inputs is not None) == expect_inputs for p in store.predictions("digits"))
        finally:
            store.close()


def test_retention_keeps_the_newest(digits: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path) -> None:
    repo, x, _ = digits
    with ServerThread(repo, data_dir=tmp_path / "data", capture_retention=5) as s, InferenceClient(s.address) as c:
        ids = [c.infer("digits", {"input": x[i : i + 1]}).id for i in range(12)]
    store = PredictionStore(tmp_path / "data" / DB_NAME)
    try:
        kept = [p.id for p in store.predictions("digits", newest_first=False)]
    finally:
        store.close()
    assert kept == ids[-5:]


def _prediction(request_id: str, outputs: dict[str, np.ndarray], model: str = "m") -> Prediction:
    return Prediction(request_id, model, "1", 1.0, None, outputs)


def test_a_repeated_id_keeps_both_captures_and_feedback_labels_the_newest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A repeated client-chosen id used to replace the first capture (INSERT OR REPLACE): the first request was lost
    to drift and quality, and feedback meant for it joined the second's prediction without a word."""
    store = PredictionStore(tmp_path / DB_NAME, retention=100)
    one, two = {"y": np.zeros((1, 1), np.float32)}, {"y": np.ones((2, 1), np.float32)}
    with caplog.at_level(logging.WARNING, logger="tensorgate.server.monitoring.store"):
        store.insert([_prediction("a", one), _prediction("b", one)])
        store.insert([_prediction("a", two)])
        store.insert([_prediction("b", two), _prediction("c", one), _prediction("c", one)])
    captured = [(p.id, p.outputs["y"].shape[0]) for p in store.predictions("m", None, newest_first=False)]
    assert captured == [("a", 1), ("b", 1), ("a", 2), ("b", 2), ("c", 1), ("c", 1)]
    assert [r.getMessage() for r in caplog.records] == [
        "model 'm': request id 'a' was captured before; both captures are kept, and feedback for a repeated id "
        "labels its newest (logged once per model)"
    ]
    assert store.rows_of("m", ["a", "zz"]) == {"a": 2}
    assert store.set_labels("m", [("a", np.array([1, 1]))], 5.0) == [True]
    assert [(p.id, p.outputs["y"].shape[0]) for p in store.predictions("m", None, labelled_only=True)] == [("a", 2)]
    # Retention counts captures: a client that repeats one id pushes the oldest out as any traffic does.
    for _ in range(100):
        store.insert([_prediction("a", one)])
    assert store.count("m") == 100
    store.close()


def test_retention_holds_across_processes_sharing_the_store(tmp_path: Path) -> None:
    """Each store (each --reuse-port process) counted only its own inserts: two writers kept twice the retention."""
    out = {"y": np.zeros((1, 1), np.float32)}
    first = PredictionStore(tmp_path / DB_NAME, retention=10)
    second = PredictionStore(tmp_path / DB_NAME, retention=10)
    for i in range(15):
        first.insert([_prediction(f"first-{i}", out)])
        second.insert([_prediction(f"second-{i}", out)])
    kept = [p.id for p in first.predictions("m", None, newest_first=False)]
    assert kept == [f"{name}-{i}" for i in range(10, 15) for name in ("first", "second")]
    first.close()
    second.close()
    third = PredictionStore(tmp_path / DB_NAME, retention=10)  # a restart reads the shared count
    third.insert([_prediction("third", out)])
    assert third.count("m") == 10
    third.close()


def test_text_and_bytes_outputs_are_stored_exactly(tmp_path: Path) -> None:
    """Non-ASCII text (ONNX string outputs come back as str) and bytes with trailing NULs round-trip; one such
    prediction used to fail its whole capture batch, other models' predictions included."""
    store = PredictionStore(tmp_path / DB_NAME)
    text = np.array([["café", "日本"]], dtype=object)
    raw = np.array([[b"ab\x00\x00", b""]], dtype=object)
    store.insert([_prediction("t", {"text": text, "raw": raw}), _prediction("n", {"y": np.ones((1, 2))}, "other")])
    (got,) = store.predictions("m", None)
    assert got.outputs["text"].tolist() == [["café".encode(), "日本".encode()]]
    assert got.outputs["raw"].tolist() == [[b"ab\x00\x00", b""]]
    assert len(store.predictions("other", None)) == 1
    store.close()


def test_a_model_without_a_batch_dimension_is_one_row_per_request(tmp_path: Path) -> None:
    """max_batch_size 0: a request's first dimension is the model's own, so the request is one row (one label)."""
    repo = tmp_path / "models"
    identity_model(repo / "flat" / "1" / "model.onnx", "FP32", shape=(10,))
    write_config(repo, "flat", "max_batch_size: 0\n")
    with ServerThread(repo, data_dir=tmp_path / "data") as s, InferenceClient(s.address) as c:
        result = c.infer("flat", {"INPUT0": np.arange(10, dtype=np.float32)})
        c.submit_feedback_batch("flat", [(result.id, 3)])
    store = PredictionStore(tmp_path / "data" / DB_NAME)
    (captured,) = store.predictions("flat", None)
    assert captured.outputs["OUTPUT0"].shape == (1, 10)
    assert captured.label is not None
    store.close()


def test_captures_wait_for_another_writer_instead_of_being_lost(
    digits: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """Another connection holding the write lock (a tool writing or checkpointing the same file) delays the capture
    writer; it used to fail the whole batch at once with SQLITE_BUSY ('they are lost')."""
    repo, x, _ = digits
    with ServerThread(repo, data_dir=tmp_path / "data") as s, InferenceClient(s.address) as c:
        c.infer("digits", {"input": x[:1]})
        assert s.app.capture.flush()
        other = sqlite3.connect(tmp_path / "data" / DB_NAME, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute(
                "INSERT INTO predictions (id, model, version, ts, outputs) VALUES ('x', 'other', '1', 0, x'00')"
            )
            for i in range(1, 9):
                c.infer("digits", {"input": x[i : i + 1]})
            time.sleep(1.0)  # the capture writer meets the lock (it polls every 50 ms)
            other.execute("COMMIT")
        finally:
            other.close()
        assert s.app.capture.flush()
        assert (s.app.capture.failed, s.app.capture.captured) == (0, 9)
    assert _stored(tmp_path / "data") == 9


def test_the_queue_is_bounded_in_bytes(tmp_path: Path) -> None:
    """Each queued sample pins its request's and response's buffers until stored: a writer that falls behind on
    large tensors used to pin up to queue_size of them (10,000 images: gigabytes), dropping nothing."""
    store = PredictionStore(tmp_path / DB_NAME)
    capture = Capture(store, queue_bytes=10 * 4096 + 100)
    config = mc.ModelConfig(name="images", max_batch_size=8)
    image = np.zeros((1, 1024), np.float32)  # 4 KiB, plus a 4-byte output
    for i in range(25):  # the writer is not started yet: nothing leaves the queue
        capture.submit("images", 1, config, f"r{i}", {"image": image}, {"score": np.zeros((1, 1), np.float32)})
    assert (len(capture._queue), capture.dropped) == (10, 15)
    capture.start()
    try:
        assert capture.flush()
        capture.submit("images", 1, config, "after", {"image": image}, {"score": np.zeros((1, 1), np.float32)})
        assert capture.flush() and capture.dropped == 15  # stored samples give their bytes back
    finally:
        capture.close()
    assert store.count("images") == 11
    store.close()


def test_the_capture_queue_defaults_are_defined_once(tmp_path: Path) -> None:
    """`serve`'s defaults (the settings') and Capture's are one definition, so that a new default cannot leave
    them apart (the settings held a copy of capture.py's, which they could not import without scipy)."""
    defaults = ServerSettings(model_repository=tmp_path)
    store = PredictionStore(tmp_path / DB_NAME)
    capture = Capture(store)
    assert (capture.queue_size, capture.queue_bytes) == (CAPTURE_QUEUE_SIZE, CAPTURE_QUEUE_BYTES)
    assert (defaults.capture_queue_size, defaults.capture_queue_bytes) == (CAPTURE_QUEUE_SIZE, CAPTURE_QUEUE_BYTES)
    args = build_parser().parse_args(["serve"])
    assert (args.capture_queue_size, args.capture_queue_bytes) == (CAPTURE_QUEUE_SIZE, CAPTURE_QUEUE_BYTES)
    store.close()


def test_the_queue_byte_budget_is_a_serve_option(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The 256 MiB budget could not be changed from the command line."""
    assert ServerSettings(model_repository=tmp_path).capture_queue_bytes == CAPTURE_QUEUE_BYTES == 256 * 2**20
    assert build_parser().parse_args(["serve", "--capture-queue-bytes", "1048576"]).capture_queue_bytes == 2**20
    monkeypatch.setenv("TENSORGATE_CAPTURE_QUEUE_BYTES", "4096")
    assert build_parser().parse_args(["serve"]).capture_queue_bytes == 4096
    monkeypatch.delenv("TENSORGATE_CAPTURE_QUEUE_BYTES")
    serve = ["serve", "--model-repository", str(tmp_path)]
    for argv, words in (
        (
            ["--data-dir", str(tmp_path / "data"), "--capture-queue-bytes", "0"],
            "--capture-queue-bytes must be at least 1",
        ),
        (["--data-dir", str(tmp_path / "data"), "--capture-queue-bytes", "-1"], "must be at least 1, got -1"),
        (["--capture-queue-bytes", "4096"], "--capture-queue-bytes needs --data-dir (monitoring is off without it)"),
    ):
        assert main([*serve, *argv]) == 2
        assert words in capsys.readouterr().err
    for bad in ("inf", "nan", "1e9"):  # a count of bytes: an integer, so never infinite or NaN
        with pytest.raises(SystemExit):
            main([*serve, "--data-dir", str(tmp_path / "data"), "--capture-queue-bytes", bad])
    (tmp_path / "models").mkdir()
    with ServerThread(tmp_path / "models", data_dir=tmp_path / "served", capture_queue_bytes=4096) as server:
        assert server.app.capture is not None and server.app.capture.queue_bytes == 4096  # the server's queue
        assert "invalid int value" in capsys.readouterr().err
