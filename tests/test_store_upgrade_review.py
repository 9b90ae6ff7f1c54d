"""Review 128 of the stamped store (3d6198a) and of `tensorgate rollout`'s held time (35c9986).

The stamp is the one write an upgrade's first start makes on a store that has every table already: on a disk too
full for it, the release before the stamp started and served (captures failing), so this one must too. Several
``--reuse-port`` processes that start together on an unstamped store take turns in its migration."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from tensorgate.client import InferenceClient
from tensorgate.client._rollout import describe
from tensorgate.server.monitoring.store import DB_NAME, SCHEMA_VERSION, Prediction, PredictionStore
from tests.serving import ServerThread
from tests.test_exhaustion import filled, small_disk
from tests.test_rollout_state import _client_state
from tests.test_store_upgrade import _old_store, repo

__all__ = ["repo", "small_disk"]  # fixtures, imported from their modules


def _user_version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    finally:
        db.close()


def test_an_upgrade_on_a_full_disk_serves_and_stamps_the_store_once_there_is_room(
    repo: Path, small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The previous release's store (every table, no stamp) on a disk with no room left: the server starts and
    serves, as the release before the stamp did, instead of failing to start on the stamp's one page; the next
    start with room stamps it. The store keeps its 0600 mode."""
    data_dir = small_disk / "data"
    path = _old_store(data_dir, 4)
    path.chmod(0o600)
    keeper = sqlite3.connect(path)  # the previous release's process, still up: the -wal and -shm files exist
    try:
        keeper.execute("PRAGMA journal_mode=WAL")
        assert keeper.execute("SELECT COUNT(*) FROM predictions").fetchone()[0] == 6
        with filled(small_disk):
            with (
                ServerThread(repo, data_dir=data_dir, monitor_interval_s=3600, metrics_port=-1) as server,
                InferenceClient(server.address) as client,
            ):
                result = client.infer("m", {"INPUT0": np.array([[1.0, 0.0, 0.0]], np.float32)})
                assert result["OUTPUT0"].tolist() == [[1.0, 0.0, 0.0]]
                assert client.model_quality("m").predictions >= 6
            assert _user_version(path) == 0
            assert "the disk is full: the store is not stamped" in caplog.text
    finally:
        keeper.close()
    store = PredictionStore(path)
    try:
        assert store.count("m") >= 6
    finally:
        store.close()
    assert _user_version(path) == SCHEMA_VERSION
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def _open_and_close(path: str) -> str:
    try:
        PredictionStore(Path(path)).close()
    except Exception as exc:  # reported to the parent, which names it
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def test_processes_starting_together_on_an_unstamped_store_take_turns(tmp_path: Path) -> None:
    """`--reuse-port` processes started at once on a store of the first releases: each migration waits for the
    one before (BEGIN IMMEDIATE under the busy timeout), none fails, and the unique index is gone."""
    path = _old_store(tmp_path / "data", 1)
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        results = pool.map_async(_open_and_close, [str(path)] * 4).get(timeout=120)
    assert results == ["ok"] * 4
    assert _user_version(path) == SCHEMA_VERSION
    db = sqlite3.connect(path)
    try:
        indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    finally:
        db.close()
    assert "predictions_model_id" not in indexes


def test_a_step_held_past_a_fractional_interval_says_so() -> None:
    """0.7 s held of a 0.5 s interval is past it: the whole seconds held (0) are below the interval, which made
    it read "held 0 of 0.5 s", as if the step still waited for its time."""
    text = describe(_client_state(step=0, canary_share=10.0, step_held_s=0.7, ramp_interval_s=0.5))
    assert "step 1 of 2: held 0.7 s (interval 0.5 s), 3 of 20 requests" in text, text
    text = describe(_client_state(step=0, canary_share=10.0, step_held_s=5.7, ramp_interval_s=5.5))
    assert "held 5.7 s (interval 5.5 s)" in text, text
    text = describe(_client_state(step=0, canary_share=10.0, step_held_s=0.3, ramp_interval_s=0.5))
    assert "held 0 of 0.5 s" in text, text
    text = describe(_client_state(step=0, canary_share=10.0, step_held_s=5.0, ramp_interval_s=5.0))
    assert "held 5 s (interval 5 s)" in text, text
    text = describe(_client_state(step=0, canary_share=10.0, step_held_s=80.2, ramp_interval_s=5.0))
    assert "held 80 s (interval 5 s)" in text, text


def test_export_of_a_file_that_is_no_database_says_so_in_one_line(tmp_path: Path) -> None:
    """The stamp is read when the store opens: a damaged or foreign file under the data dir's store name (or one
    SQLite cannot open) is one line naming it, exit status 2, not SQLite's traceback."""
    (tmp_path / DB_NAME).write_bytes(b"not a database, though it has the name of one\n" * 100)
    out = tmp_path / "m.jsonl"
    export = [sys.executable, "-m", "tensorgate.server.cli", "export", "m", "--data-dir", str(tmp_path)]
    result = subprocess.run([*export, "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert (result.returncode, "Traceback" in result.stderr) == (2, False), result.stderr
    assert result.stderr == (
        f"tensorgate export: {tmp_path / DB_NAME}: cannot read the prediction store: file is not a database\n"
    )
    assert not out.exists()


def test_a_start_on_a_current_store_does_not_wait_for_the_write_lock(tmp_path: Path) -> None:
    """Another process holds the write lock (one closing while an export reads: its checkpoint waits out the export,
    tens of seconds): a store already stamped and whole opens at once, as before the stamp, instead of waiting
    for the lock on every start (up to the 30 s busy timeout, then failing to start with "database is locked")."""
    path = tmp_path / DB_NAME
    PredictionStore(path).close()  # stamped and whole
    holder = sqlite3.connect(path, isolation_level=None)
    opened: list[PredictionStore] = []
    opener = threading.Thread(target=lambda: opened.append(PredictionStore(path)), daemon=True)
    try:
        holder.execute("BEGIN IMMEDIATE")
        opener.start()
        opener.join(timeout=10)
        assert opened, "the store waited for the write lock another process holds"
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        opener.join(timeout=60)
        for store in opened:
            store.close()


def test_a_stop_while_an_export_reads_neither_waits_nor_holds_up_the_other_writers(tmp_path: Path) -> None:
    """A process's close checkpointed with TRUNCATE under the 30 s busy timeout: while an export (any reader) held
    a read transaction it waited that long, holding the write lock, so the other processes on the data dir could
    store nothing meanwhile, and its own stop waited as long (review 128)."""
    path = tmp_path / DB_NAME
    closing, other = PredictionStore(path), PredictionStore(path)
    other.insert([Prediction("r0", "m", "1", 0.0, None, {"Y": np.zeros((1, 1), np.float32)})])
    reader = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
    closed = threading.Thread(target=closing.close, daemon=True)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM predictions").fetchall()  # a read transaction on the WAL
        other.insert([Prediction("r1", "m", "1", 0.0, None, {"Y": np.zeros((1, 1), np.float32)})])
        closed.start()
        closed.join(timeout=10)
        assert not closed.is_alive(), "the close waited for the reader"
        written = threading.Thread(
            target=lambda: other.insert([Prediction("r2", "m", "1", 0.0, None, {"Y": np.ones((1, 1), np.float32)})]),
            daemon=True,
        )
        written.start()
        written.join(timeout=10)
        assert not written.is_alive(), "another writer waited for the closing one"
    finally:
        reader.execute("ROLLBACK")
        reader.close()
        closed.join(timeout=60)
        other.close()
    store = PredictionStore(path, read_only=True)
    try:
        assert store.count("m") == 3  # nothing committed was lost
    finally:
        store.close()


def test_a_start_on_a_new_store_waits_for_another_starting_beside_it(tmp_path: Path) -> None:
    """`--reuse-port` processes started together on a new data dir: while one holds the write lock of the file, not
    yet in WAL mode, SQLite refuses another's change to WAL at once (no busy timeout), and that process failed to
    start with "database is locked" (in about one round of eight processes in three). It waits its turn now."""
    path = tmp_path / DB_NAME
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))  # as the first process to start makes it
    holder = sqlite3.connect(path, isolation_level=None)
    outcome: list[object] = []

    def start() -> None:
        try:
            outcome.append(PredictionStore(path))
        except sqlite3.Error as exc:
            outcome.append(exc)

    opener = threading.Thread(target=start, daemon=True)
    try:
        holder.execute("BEGIN IMMEDIATE")
        opener.start()
        opener.join(timeout=0.5)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    opener.join(timeout=60)
    assert len(outcome) == 1 and isinstance(outcome[0], PredictionStore), outcome
    try:
        assert outcome[0].count("m") == 0
    finally:
        outcome[0].close()
    assert _user_version(path) == SCHEMA_VERSION
