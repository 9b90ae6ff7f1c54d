"""A `--data-dir` kept across an upgrade or a rollback (a Kubernetes PersistentVolume): the store every earlier
release wrote is served as it was, and one a newer release wrote is refused, left as it was, with one line.

Each earlier layout is written here with the DDL that release ran, and rows as it stored them (outputs in the
``encode_arrays`` blob, labels with ``np.save``), so that no test depends on git. The store had no layout number
before `SCHEMA_VERSION`: a rollback to the release before it could not be told from an upgrade."""

from __future__ import annotations

import hashlib
import io
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tensorgate.client import InferenceClient, ModelQuality
from tensorgate.server.monitoring.store import DB_NAME, FiringAlert, PredictionStore, encode_arrays
from tests.onnx_models import identity_model, write_config
from tests.serving import ServerThread
from tests.test_rollout import _evaluate

_PREDICTIONS = """
CREATE TABLE predictions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    ts REAL NOT NULL,
    inputs BLOB,
    outputs BLOB NOT NULL,
    label BLOB,
    label_ts REAL
);
CREATE INDEX predictions_model_seq ON predictions (model, seq);
CREATE INDEX predictions_model_version_seq ON predictions (model, version, seq);
CREATE INDEX predictions_model_ts ON predictions (model, ts);
"""
_MODEL_ROWS = "CREATE TABLE model_rows (model TEXT PRIMARY KEY, rows INTEGER NOT NULL);"
_FIRING_ALERTS = """
CREATE TABLE firing_alerts (
    sink TEXT NOT NULL, rule TEXT NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL, expression TEXT NOT NULL,
    since REAL NOT NULL, fired_value REAL NOT NULL, value REAL, threshold REAL NOT NULL, updated REAL NOT NULL,
    interval_s REAL NOT NULL, PRIMARY KEY (sink, rule, model, version)
);
"""
_RAMP_PLACES = """
CREATE TABLE ramp_places (model TEXT PRIMARY KEY, place TEXT NOT NULL, step INTEGER NOT NULL, updated REAL NOT NULL);
"""
_LAYOUTS = {
    1: _PREDICTIONS + "CREATE UNIQUE INDEX predictions_model_id ON predictions (model, id);",
    2: _PREDICTIONS + "CREATE INDEX predictions_model_id_seq ON predictions (model, id, seq);" + _MODEL_ROWS,
    3: _PREDICTIONS
    + "CREATE INDEX predictions_model_id_seq ON predictions (model, id, seq);"
    + _MODEL_ROWS
    + _FIRING_ALERTS,
    4: _PREDICTIONS
    + "CREATE INDEX predictions_model_id_seq ON predictions (model, id, seq);"
    + _MODEL_ROWS
    + _FIRING_ALERTS
    + _RAMP_PLACES,
}
"""The releases' layouts: 1 until repeated request ids were kept (a unique (model, id) index), 2 with ``model_rows``,
3 with ``firing_alerts``, 4 with ``ramp_places``. None of them stamped ``PRAGMA user_version``."""

PREDICTED = [0, 1, 2, 0, 1, 2]
"""The class of each old capture (old-0 .. old-5): its output row is one-hot."""
LABELS = [0, 2, 0, 1]
"""The labels old-0 .. old-3 got: one right of four, so the rule below fires (accuracy 0.25)."""
RULE = "accuracy < 0.9 min_samples=2 for=1"
SINCE = 1000.0

CONFIG = f"""backend: "onnxruntime"
max_batch_size: 8
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ 3 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 3 ] }} ]
parameters {{ key: "tensorgate.alert.acc" value: {{ string_value: "{RULE.replace(" for=1", "")}" }} }}
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`m`: an FP32 identity of 3 columns read as a classifier (the argmax of its output)."""
    root = tmp_path_factory.mktemp("upgrade") / "models"
    identity_model(root / "m" / "1" / "model.onnx", "FP32", shape=("batch", 3))
    write_config(root, "m", CONFIG)
    return root


def _label_blob(label: int) -> bytes:
    """A label as every release stored it: ``np.save`` of its array (feedback's numbers as float64)."""
    buf = io.BytesIO()
    np.save(buf, np.array([float(label)]), allow_pickle=False)
    return buf.getvalue()


def _old_store(data_dir: Path, layout: int, *, user_version: int = 0, ddl: str = "") -> Path:
    """A store as the release of ``layout`` left it: six captures of `m` version 1, four labelled, and (from
    layout 3) the rule `acc` firing since SINCE, let go by that server's clean stop; then ``ddl`` and the layout
    number, as a later release would leave them."""
    data_dir.mkdir(parents=True)
    path = data_dir / DB_NAME
    db = sqlite3.connect(path)
    try:
        db.executescript(_LAYOUTS[layout])
        for i, k in enumerate(PREDICTED):
            outputs = encode_arrays({"OUTPUT0": np.eye(3, dtype=np.float32)[[k]]})
            label = _label_blob(LABELS[i]) if i < len(LABELS) else None
            db.execute(
                "INSERT INTO predictions (id, model, version, ts, inputs, outputs, label, label_ts) "
                "VALUES (?, 'm', '1', ?, NULL, ?, ?, ?)",
                (f"old-{i}", time.time() - 60 + i, outputs, label, None if label is None else time.time() - 30),
            )
        if layout >= 2:
            db.execute("INSERT INTO model_rows VALUES ('m', ?)", (len(PREDICTED),))
        if layout >= 3:
            db.execute(
                "INSERT INTO firing_alerts VALUES ('', 'acc', 'm', '1', ?, ?, 0.25, 0.25, 0.9, 0, 60)", (RULE, SINCE)
            )
        db.commit()
        db.executescript(ddl + f"PRAGMA user_version = {user_version};")  # what a later release did to it
    finally:
        db.close()
    return path


def _digest(data_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(data_dir.iterdir()) if p.is_file()}


@pytest.mark.parametrize("layout", sorted(_LAYOUTS))
def test_a_store_an_earlier_release_wrote_is_served_as_it_was(repo: Path, tmp_path: Path, layout: int) -> None:
    """Its captures and labels count in quality, its ids take feedback, a repeated id is kept as a capture of its
    own (layout 1 replaced it), an alert it kept firing keeps its `since`, and the store is stamped as today's."""
    path = _old_store(tmp_path / "data", layout)
    with (
        ServerThread(repo, data_dir=tmp_path / "data", monitor_interval_s=3600, metrics_port=-1) as server,
        InferenceClient(server.address) as client,
    ):
        quality = client.model_quality("m")
        assert (quality.predictions, quality.labelled, quality.metrics["accuracy"]) == (6, 4, 0.25)
        client.submit_feedback("m", "old-4", 1)  # a capture of the old release, labelled by this one
        quality = _capture_again(client, "old-0")
        assert (quality.predictions, quality.labelled, quality.metrics["accuracy"]) == (7, 5, 0.4)
        _evaluate(server)
        alerts = client.alerts("m")
        assert [(a.rule, a.state) for a in alerts] == [("acc", "firing")]
        if layout >= 3:
            assert alerts[0].timestamp == SINCE  # not announced again: the old release had
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 4
        assert db.execute("SELECT rows FROM model_rows WHERE model = 'm'").fetchone()[0] == 7
        indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "predictions_model_id" not in indexes
    finally:
        db.close()


def test_a_rollback_to_the_first_releases_and_back_again_keeps_repeated_ids(repo: Path, tmp_path: Path) -> None:
    """The first releases ignore the layout number and put their unique (model, id) index back: the next start of
    this one drops it again, or a shadow version's capture (its request's id) would be refused from then on."""
    unique = "CREATE UNIQUE INDEX predictions_model_id ON predictions (model, id);"
    _old_store(tmp_path / "data", 4, user_version=4, ddl=unique)
    with (
        ServerThread(repo, data_dir=tmp_path / "data", monitor_interval_s=3600, metrics_port=-1) as server,
        InferenceClient(server.address) as client,
    ):
        assert _capture_again(client, "old-0").predictions == 7


def _capture_again(client: InferenceClient, request_id: str) -> ModelQuality:
    """Send one more request under an id that is captured already; the quality once it is stored (or after 20 s)."""
    client.infer("m", {"INPUT0": np.array([[1.0, 0.0, 0.0]], np.float32)}, request_id=request_id)
    deadline = time.monotonic() + 20
    while (quality := client.model_quality("m")).predictions < 7 and time.monotonic() < deadline:
        time.sleep(0.05)
    return quality


def test_a_store_a_newer_release_wrote_is_refused_and_left_as_it_was(repo: Path, tmp_path: Path) -> None:
    """A rollback after an upgrade: the server does not start on the newer release's store (it cannot know what
    that release changed), says why in one line, and leaves every file as it was; `tensorgate export` likewise."""
    data_dir = tmp_path / "data"
    _old_store(data_dir, 4, user_version=5, ddl="CREATE TABLE later (x INTEGER);")
    before = _digest(data_dir)
    server = ServerThread(repo, data_dir=data_dir, monitor_interval_s=3600, metrics_port=-1)
    try:
        with pytest.raises(Exception, match="written by a newer tensorgate") as refused:
            server.__enter__()
    finally:
        server.__exit__(None, None, None)  # the loop's thread; a second stop of the app is harmless
    assert f"{data_dir / DB_NAME}: this prediction store has layout 5" in str(refused.value)
    assert _digest(data_dir) == before

    serve = [sys.executable, "-m", "tensorgate.server.cli", "serve", "--model-repository", str(repo)]
    serve += ["--grpc-port", "0", "--metrics-port", "-1", "--data-dir", str(data_dir)]
    result = subprocess.run(serve, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "layout 5, written by a newer tensorgate" in result.stderr
    out = tmp_path / "m.jsonl"
    export = [sys.executable, "-m", "tensorgate.server.cli", "export", "m", "--data-dir", str(data_dir)]
    result = subprocess.run([*export, "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert (result.returncode, "Traceback" in result.stderr) == (2, False), result.stderr
    assert "layout 5, written by a newer tensorgate" in result.stderr
    assert not out.exists()
    assert _digest(data_dir) == before


def test_a_column_a_later_release_adds_leaves_alerts_and_ramps_working(tmp_path: Path) -> None:
    """A later release that only adds a column with a default keeps the layout number, so that this one still
    opens its store: alerts and ramp places are written and read by column name, not by position."""
    extra = (
        "ALTER TABLE firing_alerts ADD COLUMN labels TEXT NOT NULL DEFAULT '';"
        "ALTER TABLE ramp_places ADD COLUMN reason TEXT NOT NULL DEFAULT '';"
    )
    path = _old_store(tmp_path / "data", 4, user_version=4, ddl=extra)
    store = PredictionStore(path)
    try:
        assert [a.since for a in store.firing_alerts("")] == [SINCE]
        new = FiringAlert("", "drift", "m", "1", "psi_max > 0.2 min_samples=2 for=1", 2000.0, 0.5, 0.5, 0.2, 1.0, 60)
        assert store.claim_alert(new) is None
        assert [a.rule for a in store.firing_alerts("")] == ["acc", "drift"]
        store.save_ramp_place("m", "2:abc", 1)
        assert store.ramp_places() == {"m": ("2:abc", 1)}
    finally:
        store.close()
