"""A prediction store that cannot be used reads as one line naming the file, the problem and what to do.

`tensorgate serve --data-dir` on a store it cannot open exits 1 before it serves (monitoring half there would lose
every capture), `tensorgate export` exits 2; neither prints SQLite's traceback. A store refused for its newer
layout is left exactly as it was, its WAL included."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tensorgate.server.monitoring import store as store_module
from tensorgate.server.monitoring.store import DB_NAME, Prediction, PredictionStore
from tests.process import TENSORGATE
from tests.test_exhaustion import filled, small_disk
from tests.test_store_upgrade import repo

__all__ = ["repo", "small_disk"]  # fixtures, imported from their modules


def _serve(repo: Path, data_dir: Path) -> tuple[int, str]:
    """`tensorgate serve` on the data dir; its exit status and output (it is expected to stop on its own)."""
    args = [TENSORGATE, "serve", "--model-repository", str(repo), "--grpc-port", "0", "--metrics-port", "-1"]
    done = subprocess.run(
        [*args, "--data-dir", str(data_dir)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60
    )
    return done.returncode, done.stdout


def _export(data_dir: Path, out: Path) -> tuple[int, str]:
    args = [TENSORGATE, "export", "m", "--data-dir", str(data_dir), "--out", str(out)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    return done.returncode, done.stderr


def _refusal(output: str) -> str:
    """The one error line of a start that stopped: no traceback, nothing else at ERROR."""
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if " ERROR " in line]
    assert len(errors) == 1, output
    return errors[0]


def _capture(path: Path) -> None:
    store = PredictionStore(path)
    try:
        outputs = {"OUTPUT0": np.eye(3, dtype=np.float32)[[1]]}
        store.insert([Prediction("r-1", "m", "1", time.time(), None, outputs)])
    finally:
        store.close()


@pytest.mark.parametrize("made_by", ["an empty file", "a server stopped before its tables"])
def test_export_of_a_store_without_its_tables_is_one_line(tmp_path: Path, made_by: str) -> None:
    """A store SQLite reads as an empty database (0 bytes, or WAL mode set and nothing else) printed SQLite's "no
    such table: predictions" traceback."""
    path = tmp_path / DB_NAME
    path.touch()
    if made_by != "an empty file":
        db = sqlite3.connect(path)
        db.execute("PRAGMA journal_mode=WAL")
        db.close()
    out = tmp_path / "m.jsonl"
    code, err = _export(tmp_path, out)
    assert (code, "Traceback" in err) == (2, False), err
    assert err.startswith(f"tensorgate export: {path}: no predictions in this store yet"), err
    assert "start `tensorgate serve --data-dir`" in err and err.count("\n") == 1, err
    assert not out.exists()


def test_serve_on_a_file_that_is_no_database_is_one_line(repo: Path, tmp_path: Path) -> None:
    """Random bytes under the store's name: SQLite's "file is not a database" came as a traceback; the file is
    left as it was."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    junk = np.random.default_rng(7).bytes(8192)
    (data_dir / DB_NAME).write_bytes(junk)
    code, output = _serve(repo, data_dir)
    line = _refusal(output)
    assert code == 1, output
    what = "it is no SQLite database (file is not a database); nothing in it was changed; move it away"
    assert f"{data_dir / DB_NAME}: cannot open the prediction store: {what}" in line
    assert "another --data-dir" in line
    assert (data_dir / DB_NAME).read_bytes() == junk


def test_serve_on_a_directory_in_the_store_s_place_says_what_it_is(repo: Path, tmp_path: Path) -> None:
    """ "[Errno 21] Is a directory: '...'" named the path but not that it is the prediction store, nor the way out."""
    data_dir = tmp_path / "data"
    (data_dir / DB_NAME).mkdir(parents=True)
    code, output = _serve(repo, data_dir)
    line = _refusal(output)
    assert code == 1, output
    assert f"{data_dir / DB_NAME}: cannot open the prediction store: it is a directory, not a file; move it" in line


_HOLD = (
    "import sqlite3, sys\n"
    "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
    "db.execute('CREATE TABLE other (a)')\n"
    "db.execute('BEGIN EXCLUSIVE')\n"
    "db.execute('INSERT INTO other VALUES (1)')\n"
    "print('locked', flush=True)\n"
    "sys.stdin.read()\n"  # until the test closes it (or ends)
)
"""Another process holding a store not yet in WAL mode in an exclusive transaction (a tool writing to it): its
readers wait too."""


@pytest.fixture
def locked(tmp_path: Path) -> Iterator[Path]:
    """A data dir whose store another process holds in an exclusive transaction until the test ends."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(tmp_path / DB_NAME)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        yield tmp_path
    finally:
        holder.kill()
        holder.communicate(timeout=30)


def test_a_store_locked_past_the_busy_timeout_says_who_to_look_for(
    locked: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start failed with SQLite's "database is locked" traceback once the busy timeout ran out (30 s in the
    server, shortened here, in the process: a real start's wait is too long for a test)."""
    path = locked / DB_NAME
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_S", 0.5)
    with pytest.raises(OSError) as refused:  # what `tensorgate serve` reports in one line and exits 1 on
        PredictionStore(path)
    assert str(refused.value).startswith(
        f"{path}: cannot open the prediction store: another process held it locked for over 0.5 s"
    )
    assert f"`fuser {path}`" in str(refused.value)


def test_export_of_a_locked_store_says_what_to_do(locked: Path) -> None:
    """SQLite's "database is locked" (after its default 5 s) was the whole line."""
    out = locked / "m.jsonl"
    code, err = _export(locked, out)
    assert (code, "Traceback" in err) == (2, False), err
    assert err.startswith(f"tensorgate export: {locked / DB_NAME}: cannot read the prediction store: database is")
    assert f"another process holds it locked (`fuser {locked / DB_NAME}` names it): export again" in err, err
    assert not out.exists()


def test_serve_on_a_full_disk_without_a_store_is_one_line(repo: Path, small_disk: Path) -> None:
    """A new store on a disk with no room: the layout cannot be written (unlike a whole store's stamp, which a
    full disk only postpones), and "database or disk is full" came as a traceback."""
    data_dir = small_disk / "data"
    data_dir.mkdir()
    with filled(small_disk):
        code, output = _serve(repo, data_dir)
    line = _refusal(output)
    assert code == 1, output
    assert f"{data_dir / DB_NAME}: cannot open the prediction store: the disk is full" in line
    assert "free space on its disk" in line


@pytest.fixture
def read_only(small_disk: Path) -> Iterator[Path]:
    """A data dir on a read-only file system (a snapshot, a backup's mount), its store closed cleanly (no WAL)."""
    data_dir = small_disk / "data"
    _capture(data_dir / DB_NAME)
    done = subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot remount the tmpfs read-only: {done.stderr.strip()}")
    try:
        yield data_dir
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=False)


def test_serve_on_a_read_only_data_dir_says_it_cannot_write_there(repo: Path, read_only: Path) -> None:
    """ "[Errno 30] Read-only file system: '...'" named neither the prediction store nor the way out."""
    code, output = _serve(repo, read_only)
    line = _refusal(output)
    assert code == 1, output
    assert f"{read_only / DB_NAME}: cannot open the prediction store: it cannot be written (Read-only" in line
    assert f"readable and writable by this user (uid {os.getuid()})" in line


def test_export_reads_a_store_on_a_read_only_file_system(read_only: Path) -> None:
    """SQLite cannot make the -shm file a WAL store's reader needs there: "unable to open database file"."""
    out = read_only.parent.parent / "m.jsonl"
    code, err = _export(read_only, out)
    assert code == 0, err
    assert [line.count('"request_id":"r-1"') for line in out.read_text().splitlines()] == [1]


def test_export_of_a_store_this_user_may_not_read_says_whose_it_is(tmp_path: Path) -> None:
    """A store only the server's user may read (0600, or 0000 here), exported by another user: SQLite's "unable to
    open database file" was the whole line. Run as `nobody` (root reads any file)."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("running the export as another user needs root and setpriv")
    with tempfile.TemporaryDirectory(dir="/tmp") as shared:  # pytest's tmp_path is root's alone (0700)
        data_dir = Path(shared)
        data_dir.chmod(0o755)
        _capture(data_dir / DB_NAME)
        (data_dir / DB_NAME).chmod(0)
        args = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", TENSORGATE, "export", "m"]
        args += ["--data-dir", str(data_dir), "--out", str(tmp_path / "m.jsonl")]
        done = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd="/")
    assert (done.returncode, "Traceback" in done.stderr) == (2, False), done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"tensorgate export: {data_dir / DB_NAME}: cannot read the prediction store: unable to open database file; "
        "this user (uid 65534) may not read it: export as the user the server runs as"
    ), done.stderr


def _newer_store_left_by_a_crash(path: Path) -> None:
    """A newer tensorgate's store as its process left it when killed: layout 5 and its last commits in the WAL."""
    script = (
        "import os, sqlite3, sys\n"
        "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "db.execute('PRAGMA journal_mode=WAL')\n"
        "db.execute('PRAGMA wal_autocheckpoint=0')\n"
        "db.execute('CREATE TABLE future (a)')\n"
        "db.execute('INSERT INTO future VALUES (1)')\n"
        "db.execute('PRAGMA user_version = 5')\n"
        "os._exit(0)\n"  # no close: no checkpoint
    )
    subprocess.run([sys.executable, "-c", script, str(path)], check=True, timeout=60)


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def test_a_refused_store_keeps_its_wal_as_it_was(repo: Path, tmp_path: Path) -> None:
    """The refusal says "nothing in it was changed", but closing the read-write connection that read the layout
    (the file's last) checkpointed the WAL into the main file and emptied it."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    path = data_dir / DB_NAME
    _newer_store_left_by_a_crash(path)
    files = [path, path.with_name(DB_NAME + "-wal")]
    before = [_digest(f) for f in files]
    assert files[1].stat().st_size > 0
    code, output = _serve(repo, data_dir)
    assert "layout 5, written by a newer tensorgate" in _refusal(output)
    assert code == 1, output
    assert [_digest(f) for f in files] == before
