"""The prediction log: captured requests and their joined ground truth, in SQLite (WAL) under ``--data-dir``.

    store = PredictionStore(data_dir / "tensorgate.sqlite3", retention=100_000)
    store.insert([Prediction("id-1", "digits", "1", time.time(), {"input": x}, {"label": y})])
    store.set_labels("digits", [("id-1", np.array([3]))])   # committed before it returns
    window = store.predictions("digits", "1", limit=1000, labelled_only=True)

Why SQLite in WAL mode: it is in the standard library, survives restarts, and lets the monitor and the export
read while the capture writer appends. One connection behind a lock keeps it thread-safe without a pool: the
writes are batched by the capture thread, so the lock is held for one transaction per batch.

Tensors are stored as raw bytes behind a small header (a name -> array mapping per column, see ``encode_arrays``),
which keeps dtype and shape exactly.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import re
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tensorgate.protos.tensors import BY_NAME, decode_bytes_tensor, encode_bytes_tensor

__all__ = [
    "BUSY_TIMEOUT_S",
    "DB_NAME",
    "FiringAlert",
    "Prediction",
    "PredictionStore",
    "StoreLayoutError",
    "StoreOpenError",
    "decode_arrays",
    "encode_arrays",
    "is_busy",
    "rows_in",
]

log = logging.getLogger(__name__)

DB_NAME = "tensorgate.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
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
DROP INDEX IF EXISTS predictions_model_id;
CREATE INDEX IF NOT EXISTS predictions_model_id_seq ON predictions (model, id, seq);
CREATE INDEX IF NOT EXISTS predictions_model_seq ON predictions (model, seq);
CREATE INDEX IF NOT EXISTS predictions_model_version_seq ON predictions (model, version, seq);
CREATE INDEX IF NOT EXISTS predictions_model_ts ON predictions (model, ts);
CREATE TABLE IF NOT EXISTS model_rows (
    model TEXT PRIMARY KEY,
    rows INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS ramp_places (
    model TEXT PRIMARY KEY,
    place TEXT NOT NULL,
    step INTEGER NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS firing_alerts (
    sink TEXT NOT NULL,
    rule TEXT NOT NULL,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    expression TEXT NOT NULL,
    since REAL NOT NULL,
    fired_value REAL NOT NULL,
    value REAL,
    threshold REAL NOT NULL,
    updated REAL NOT NULL,
    interval_s REAL NOT NULL,
    PRIMARY KEY (sink, rule, model, version)
);
"""
"""``predictions_model_id`` was a unique index (a repeated id replaced its row) in stores written before repeated ids
were kept. ``model_rows`` counts each model's rows for retention, in the database rather than in one process's
memory: several ``--reuse-port`` processes share the file, and each one counting only its own inserts kept up to
one retention's worth per process. ``firing_alerts`` (added after them: CREATE IF NOT EXISTS is its migration) holds
the alerts firing, so that a restart neither sends them again nor forgets to resolve them (``FiringAlert``)."""

SCHEMA_VERSION = 4
"""The store's layout, kept in SQLite's ``PRAGMA user_version``: 1 the first releases' (a unique (model, id)
index), 2 repeated ids kept and ``model_rows``, 3 ``firing_alerts``, 4 ``ramp_places``. 0 is a store written before
the layout was stamped, any of 1 to 4: _SCHEMA brings each to 4. A store stamped higher was written by a newer
tensorgate (a rollback after an upgrade): it is refused (`StoreLayoutError`), since this release cannot know what
that one changed. A release that only adds (a table, a column with a default) need not raise the number, so that
the release before it still opens its stores: every statement here names the columns it writes and reads."""

_ALERT_COLUMNS = "sink, rule, model, version, expression, since, fired_value, value, threshold, updated, interval_s"
"""``FiringAlert``'s fields in order: named, not ``*``, so that a column a later release adds is no field here."""

_CREATED = frozenset(re.findall(r"CREATE (?:TABLE|INDEX) IF NOT EXISTS (\w+)", _SCHEMA))
_DROPPED = frozenset(re.findall(r"DROP INDEX IF EXISTS (\w+)", _SCHEMA))
"""What a store at SCHEMA_VERSION holds and lacks (`PredictionStore._current`)."""


class StoreLayoutError(Exception):
    """The data dir's store was written by a newer tensorgate: the server does not start on it and the export does
    not read it, rather than misreading or rewriting what that release keeps there."""

    def __init__(self, path: Path, found: int) -> None:
        super().__init__(
            f"{path}: this prediction store has layout {found}, written by a newer tensorgate than this one (which "
            f"knows layouts up to {SCHEMA_VERSION}); nothing in it was changed. Run the newer tensorgate on this "
            "--data-dir, or give this one another --data-dir"
        )
        self.path, self.found = path, found


BUSY_TIMEOUT_S = 30.0
"""How long a read-write open (and each write) waits for another process's lock on the store before giving up."""


class StoreOpenError(OSError):
    """The data dir's store cannot be opened (a directory in its place, a foreign or damaged file, a read-only or
    full disk, a lock held too long): one line naming the file, the problem and what to do, where SQLite's own
    words ("unable to open database file") name neither. An OSError, which ``tensorgate serve`` already reports in
    one line and exits on: a server must not start with monitoring half there."""

    def __init__(self, path: Path, problem: str, remedy: str) -> None:
        super().__init__(f"{path}: cannot open the prediction store: {problem}; {remedy}")
        self.path = path


def _code(exc: BaseException) -> int:
    """SQLite's primary result code of an error (0 for one that is not SQLite's)."""
    return (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path.parent).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _open_failure(path: Path, exc: OSError | sqlite3.Error) -> StoreOpenError:
    """What stopped a server opening its store, in words its operator can act on: SQLite's ("unable to open
    database file", "database is locked") name neither the file nor the way out."""
    code, errno_ = _code(exc), exc.errno if isinstance(exc, OSError) else None
    words = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
    another = "or give the server another --data-dir"
    move = f"move it away (the server makes a new, empty store in its place), {another}"
    if isinstance(exc, IsADirectoryError):
        return StoreOpenError(path, "it is a directory, not a file", move)
    if is_busy(exc):
        return StoreOpenError(
            path,
            f"another process held it locked for over {BUSY_TIMEOUT_S:g} s ({words})",
            f"stop what holds it (`fuser {path}` names the process), then start again, {another}",
        )
    if code == sqlite3.SQLITE_FULL or errno_ == errno.ENOSPC:
        return StoreOpenError(path, f"the disk is full ({words})", "free space on its disk, then start again")
    if code == sqlite3.SQLITE_NOTADB:  # its header, the first thing read: refused before any write
        return StoreOpenError(path, f"it is no SQLite database ({words}); nothing in it was changed", move)
    if code == sqlite3.SQLITE_CORRUPT:
        return StoreOpenError(path, f"it is damaged ({words})", move)
    unwritable = (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM, sqlite3.SQLITE_AUTH)
    if errno_ in (errno.EACCES, errno.EPERM, errno.EROFS) or code in unwritable:
        return StoreOpenError(
            path,
            f"it cannot be written ({words})",
            f"the server writes its captures there: make the data dir and the store's files readable and writable "
            f"by this user (uid {os.getuid()}), {another}",
        )
    if code == sqlite3.SQLITE_IOERR or isinstance(exc, OSError):
        return StoreOpenError(path, words, "check the disk that holds it, then start again")
    return StoreOpenError(path, f"it holds something this tensorgate cannot use ({words})", move)


_NEWEST = "seq IN (SELECT MAX(seq) FROM predictions WHERE model = ? AND id = ? GROUP BY version)"
"""The captures a request id names: its newest of each version. A shadow version's run of a request
(repository/rollout.py) shares the request's id, so that its label judges both; a client that used the id more
than once on one version labels its newest."""
_NEWEST_OF = "seq = (SELECT MAX(seq) FROM predictions WHERE model = ? AND id = ? AND version = ?)"
"""The capture a request id names on one version: each version's label is checked against its own prediction
(rpc/monitoring.py), so a label is written version by version."""


@dataclass(slots=True)
class Prediction:
    """One captured request: its outputs (and inputs when captured) with rows on the first axis."""

    id: str
    model: str
    version: str
    timestamp: float
    """``time.time()`` at capture."""
    inputs: dict[str, np.ndarray] | None
    """None when input capture is off for the model."""
    outputs: dict[str, np.ndarray]
    label: np.ndarray | None = None
    label_timestamp: float | None = None


@dataclass(slots=True, frozen=True)
class FiringAlert:
    """An alert firing, as the data dir keeps it for the monitors that share it and for the next run.

    ``sink`` names who was told (a hash of the webhook URL, "" without one): processes that send to the same
    receiver share one row per alert, so each transition is sent once whichever of them sees it first.
    ``updated`` is when a monitor judging the alert last said it still holds it (0: its process stopped), and
    ``interval_s`` that monitor's interval: a row nobody has refreshed for a few intervals has no live holder."""

    sink: str
    rule: str
    model: str
    version: str
    expression: str
    """The rule as it was when it fired (``AlertRule.expression``): a rule changed since then resolves it."""
    since: float
    fired_value: float
    value: float | None
    """The value last judged (None: the last window could not be judged)."""
    threshold: float
    updated: float
    interval_s: float

    def orphaned(self, now: float) -> bool:
        """No running monitor has held it lately: released by a stopped process, or left by a crashed one."""
        return self.updated < now - 3 * self.interval_s


def as_numbers(array: np.ndarray) -> np.ndarray:
    """BF16 as the FP32 it converts to exactly, other arrays as they are: ml_dtypes.bfloat16 is no numpy float kind,
    so drift would profile its values as categories, and its dtype string ("<V2") reads back as opaque bytes."""
    return array.astype(np.float32) if array.dtype == BY_NAME["BF16"].np_dtype else array


def encode_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    """name -> array as one blob: a text header (name, dtype, shape per array) and the raw bytes, C order.

    Not ``np.save``: its header costs ~10 us per array, which the capture writer would pay per request. BYTES
    (object) arrays are stored as the V2 protocol sends them (each element length-prefixed, text as UTF-8), so that
    any bytes survive, trailing NULs and non-ASCII text included; they read back as bytes. BF16 is stored as FP32
    (`as_numbers`).
    """
    header: list[str] = []
    bodies: list[bytes] = []
    for name, value in arrays.items():
        array = as_numbers(np.asarray(value))
        if array.dtype == object:
            data = encode_bytes_tensor(array)
        else:
            data = np.ascontiguousarray(array).tobytes()
        header.append(f"{name}\t{array.dtype.str}\t{','.join(map(str, array.shape))}\t{len(data)}")
        bodies.append(data)
    head = "\n".join(header).encode()
    return len(head).to_bytes(4, "little") + head + b"".join(bodies)


def decode_arrays(blob: bytes) -> dict[str, np.ndarray]:
    """The inverse of ``encode_arrays`` (arrays are read-only views of the blob)."""
    n = int.from_bytes(blob[:4], "little")
    pos = 4 + n
    arrays: dict[str, np.ndarray] = {}
    for line in blob[4 : 4 + n].decode().split("\n") if n else []:
        name, dtype, shape, size = line.split("\t")
        dims = tuple(int(d) for d in shape.split(",")) if shape else ()
        count = int(np.prod(dims))
        if dtype == "|O":
            arrays[name] = decode_bytes_tensor(blob[pos : pos + int(size)], count).reshape(dims)
        else:
            arrays[name] = np.frombuffer(blob, dtype=np.dtype(dtype), count=count, offset=pos).reshape(dims)
        pos += int(size)
    return arrays


def _label_blob(label: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(label), allow_pickle=False)
    return buf.getvalue()


def rows_in(outputs: Mapping[str, np.ndarray]) -> int:
    """A capture's row count: the first-axis length of its first output."""
    first = next(iter(outputs.values()), None)
    return 1 if first is None or first.ndim == 0 else int(first.shape[0])


def is_busy(exc: BaseException) -> bool:
    """SQLITE_BUSY/LOCKED: another connection held the database past the busy timeout (or made this one's snapshot
    stale); the same write can succeed when tried again, unlike a full disk or a corrupt file."""
    code = getattr(exc, "sqlite_errorcode", None) if isinstance(exc, sqlite3.OperationalError) else None
    return code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


class PredictionStore:
    """SQLite (WAL) log of predictions, thread-safe; keeps at most ``retention`` rows per model (oldest go).

    ``read_only=True`` (``tensorgate export`` beside a running server) opens the file with SQLite's ``mode=ro``: it
    never takes the write lock, not even to checkpoint on close, so the server's capture writer never waits on it.
    """

    def __init__(self, path: Path, *, retention: int = 1_000_000, read_only: bool = False) -> None:
        if retention < 1:
            raise ValueError(f"retention must be at least 1 prediction per model, got {retention}")
        self.path = path
        self.retention = retention
        self.read_only = read_only
        self._lock = threading.Lock()
        self._closed = False
        self._repeats_logged: set[str] = set()
        """Models whose repeated request ids were logged (once per model and store)."""
        self.after_insert: Callable[[Sequence[Prediction]], None] | None = None
        """Called with the predictions `insert` stored, once committed, on the thread that stored them: feedback
        labels a shadow version's capture that is stored after its request's label came (rpc/monitoring.py)."""
        if read_only:  # its errors are SQLite's own: the export words them for what it does (export.open_store)
            self._db = self._open_read_only(timeout=5.0)
            self._refuse_newer()
            return
        # Captured inputs may be personal data: a store made here is its owner's alone (SQLite would make the file
        # 0644, and its -wal and -shm files take the file's mode). An existing one keeps the mode it was given.
        # A data dir that cannot be made is the flag's failure, not the store's: `tensorgate serve` names --data-dir.
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            self._open_read_write()
        except (OSError, sqlite3.Error) as exc:
            raise _open_failure(path, exc) from exc

    def _open_read_write(self) -> None:
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        self._refuse_newer_unwritten()
        # isolation_level=None: transactions are explicit (BEGIN ... COMMIT), so a commit is never implicit.
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_S)
        self._refuse_newer()  # again (stamped since?), before WAL mode, which would rewrite the file's header
        self._use_wal()
        # NORMAL is durable across process crashes in WAL mode (only an OS crash may lose the last commits);
        # feedback asks for FULL on its own transactions (set_labels) because it is acknowledged to a caller.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._migrate()

    def _use_wal(self) -> None:
        """WAL mode, which the first start on a new file sets. While another connection holds the write lock of a
        file not yet in WAL mode, SQLite refuses the change at once (SQLITE_BUSY, without its busy timeout):
        several --reuse-port processes starting together on a new data dir, one failing to start. It is tried
        again for as long as the busy timeout."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        try:
            while True:
                try:
                    self._db.execute("PRAGMA journal_mode=WAL")
                    return
                except sqlite3.OperationalError as exc:
                    if not is_busy(exc) or time.monotonic() >= deadline:
                        raise
                time.sleep(0.01)
        except BaseException:
            self._db.close()
            raise

    def _open_read_only(self, *, timeout: float) -> sqlite3.Connection:
        """``mode=ro``, which never writes the store. On a read-only file system (a snapshot, a mount of a backup)
        SQLite cannot make the shared-memory file (-shm) that reading a WAL database needs: a store with no WAL
        beside it (closed cleanly: its main file holds everything) is then read as immutable, which needs none,
        and which nothing on this host can make untrue while that file system stays read-only."""
        uri = f"{self.path.resolve().as_uri()}?mode=ro"
        db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None, timeout=timeout)
        try:
            db.execute("PRAGMA user_version").fetchone()
            return db
        except sqlite3.Error as exc:
            db.close()
            wal = self.path.with_name(self.path.name + "-wal")
            if _code(exc) != sqlite3.SQLITE_CANTOPEN or not _read_only_fs(self.path) or wal.exists():
                raise
        return sqlite3.connect(f"{uri}&immutable=1", uri=True, check_same_thread=False, isolation_level=None)

    def _refuse_newer_unwritten(self) -> None:
        """The layout, read through a read-only connection before the read-write one opens: SQLite checkpoints a
        WAL database when its last connection closes, and a connection that can write would so copy a refused
        store's WAL (what the newer tensorgate committed last) into its main file and delete the WAL, where the
        refusal says nothing was changed. A store the read-only connection cannot read (a hot rollback journal,
        left by a crash of a release before WAL mode, needs a write to roll back) is checked on the read-write
        one, as before."""
        try:
            probe = self._open_read_only(timeout=BUSY_TIMEOUT_S)
        except sqlite3.OperationalError as exc:
            if _code(exc) == sqlite3.SQLITE_READONLY:
                return
            raise
        try:
            found = int(probe.execute("PRAGMA user_version").fetchone()[0])
        finally:
            probe.close()
        if found > SCHEMA_VERSION:
            raise StoreLayoutError(self.path, found)

    def _refuse_newer(self) -> None:
        try:
            found = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        except BaseException:
            self._db.close()
            raise
        if found > SCHEMA_VERSION:
            self._db.close()
            raise StoreLayoutError(self.path, found)

    def _migrate(self) -> None:
        """Bring the store to SCHEMA_VERSION and stamp it, in one transaction: processes sharing the data dir that
        start together take turns, and one that stops halfway leaves the store as it was. The layout is read again
        inside it: a newer tensorgate may have stamped the store since `_refuse_newer`.

        _SCHEMA runs on a stamped store too unless it holds all of it (`_current`): a release from before the stamp
        ignores it, and one run on the data dir since (a rollback, then this upgrade again) put back layout 1's
        unique index, which would refuse a shadow version's capture of its request's id.

        On a disk too full for the stamp (SQLITE_FULL), a store that needs nothing else opens unstamped, as the
        releases before the stamp opened it: inference goes on (captures fail and are counted) rather than the
        server failing to start, and a later start with room stamps it."""
        try:
            if self._current():
                return
            try:
                self._migrate_once(stamp=True)
            except sqlite3.OperationalError as exc:
                if getattr(exc, "sqlite_errorcode", 0) & 0xFF != sqlite3.SQLITE_FULL:
                    raise
                self._migrate_once(stamp=False)  # raises again if the layout itself needs a write
                log.warning(
                    "%s: the disk is full: the store is not stamped with its layout until a later start", self.path
                )
        except BaseException:
            self._db.close()
            raise

    def _current(self) -> bool:
        """Stamped with this layout and holding all of it, read without the write lock: a start need not wait for
        it while another process holds it (one closing while an export reads holds it for its checkpoint, up to
        its busy timeout), as no start did before the stamp."""
        found = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        names = {row[0] for row in self._db.execute("SELECT name FROM sqlite_master")}
        return found == SCHEMA_VERSION and _CREATED <= names and not _DROPPED & names

    def _migrate_once(self, *, stamp: bool) -> None:
        with self._lock, self._write():
            found = int(self._db.execute("PRAGMA user_version").fetchone()[0])
            if found > SCHEMA_VERSION:
                raise StoreLayoutError(self.path, found)
            for statement in _SCHEMA.split(";"):  # executescript would commit the transaction first
                if statement.strip():
                    self._db.execute(statement)
            if stamp and found < SCHEMA_VERSION:
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # ----- writes ------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction, committed at the end of the block and rolled back if it raises; hold `_lock`.

        IMMEDIATE: take the write lock first, waiting out the busy timeout. A deferred BEGIN would read first, and a
        read transaction that must then upgrade while another connection writes or checkpoints gets SQLITE_BUSY at
        once, without waiting (it cannot wait without deadlocking)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            # SQLite rolls back by itself on some errors (SQLITE_FULL at COMMIT): a ROLLBACK then would raise "no
            # transaction is active" in place of the error that says what went wrong (the disk is full).
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def insert(self, predictions: Sequence[Prediction]) -> None:
        """Append predictions in one transaction, then trim every touched model to the retention limit.

        A repeated (model, id) adds a row like any other capture: drift and quality see every request, and
        retention counts requests. Feedback for such an id labels its newest capture (the server cannot tell
        which one a label means); the first repeat of each model is logged, since it means the client's ids are
        not unique.
        """
        if not predictions:
            return
        rows = [
            (
                p.id,
                p.model,
                p.version,
                p.timestamp,
                None if p.inputs is None else encode_arrays(p.inputs),
                encode_arrays(p.outputs),
            )
            for p in predictions
        ]
        ids: dict[tuple[str, str], list[str]] = {}
        for p in predictions:
            ids.setdefault((p.model, p.version), []).append(p.id)
        with self._lock:
            with self._write():  # reads model_rows, then writes: the write lock first
                repeated = [(model, self._repeated(model, version, new)) for (model, version), new in ids.items()]
                self._db.executemany(
                    "INSERT INTO predictions (id, model, version, ts, inputs, outputs) VALUES (?, ?, ?, ?, ?, ?)",
                    rows,
                )
                for model, added in Counter(p.model for p in predictions).items():
                    self._trim(model, added)
            for model, request_id in repeated:
                if request_id is not None and model not in self._repeats_logged:
                    self._repeats_logged.add(model)
                    log.warning(
                        "model '%s': request id '%s' was captured before; both captures are kept, and feedback for "
                        "a repeated id labels its newest (logged once per model)",
                        model,
                        request_id,
                    )
        if self.after_insert is not None:  # outside the lock: it may label what was stored
            self.after_insert(predictions)

    def _repeated(self, model: str, version: str, request_ids: list[str]) -> str | None:
        """One of these ids that the model version already has (or that repeats among them); None when all are
        new, or when this model's repeats were logged already (the look-up is then not worth its cost). Per
        version: a shadow version's captures repeat the ids of the stable version's on purpose."""
        if model in self._repeats_logged:
            return None
        seen: set[str] = set()
        for request_id in request_ids:
            if request_id in seen:
                return request_id
            seen.add(request_id)
        batch = sorted(seen)
        for start in range(0, len(batch), 500):  # under SQLite's limit on bound parameters
            chunk = batch[start : start + 500]
            marks = ",".join("?" * len(chunk))
            found = self._db.execute(
                f"SELECT id FROM predictions WHERE model = ? AND version = ? AND id IN ({marks}) LIMIT 1",  # noqa: S608
                (model, version, *chunk),
            ).fetchone()
            if found is not None:
                return str(found[0])
        return None

    def _trim(self, model: str, added: int) -> None:
        """Delete the oldest rows beyond the retention limit, in O(rows deleted) through the (model, seq) index.

        The count lives in ``model_rows``, updated in this same write transaction by every process that shares the
        file, rather than re-counted per batch (COUNT(*) scans); it is counted once when a model has no entry.
        """
        row = self._db.execute("SELECT rows FROM model_rows WHERE model = ?", (model,)).fetchone()
        if row is None:  # after this batch's insert: the count includes it
            rows = self._db.execute("SELECT COUNT(*) FROM predictions WHERE model = ?", (model,)).fetchone()[0]
        else:
            rows = int(row[0]) + added
        excess = rows - self.retention
        if excess > 0:
            self._db.execute(
                "DELETE FROM predictions WHERE seq IN "
                "(SELECT seq FROM predictions WHERE model = ? ORDER BY seq ASC LIMIT ?)",
                (model, excess),
            )
            rows = self.retention
        self._db.execute(
            "INSERT INTO model_rows (model, rows) VALUES (?, ?) ON CONFLICT (model) DO UPDATE SET rows = excluded.rows",
            (model, rows),
        )

    def set_labels(
        self,
        model: str,
        labels: Iterable[tuple[str, np.ndarray] | tuple[str, np.ndarray, str]],
        timestamp: float | Sequence[float],
    ) -> list[bool]:
        """Join ground truth to captured predictions by id: (id, label) labels the id's newest capture of each
        version, (id, label, version) that version's only (a label checked against it); one flag per item: False
        when there is no such capture. `timestamp`: when the labels were acknowledged, one for all or one per item
        (late labels, each held since its own feedback, stored in one transaction).

        Committed with ``synchronous=FULL`` before returning, so an acknowledged label survives a power cut too.
        """
        found: list[bool] = []
        each = timestamp if isinstance(timestamp, Sequence) else None
        with self._lock:
            self._db.execute("PRAGMA synchronous=FULL")
            try:
                with self._write():
                    for i, item in enumerate(labels):
                        where, args = (_NEWEST, item[:1]) if len(item) == 2 else (_NEWEST_OF, (item[0], item[2]))
                        cur = self._db.execute(
                            f"UPDATE predictions SET label = ?, label_ts = ? WHERE {where}",  # noqa: S608
                            (_label_blob(item[1]), each[i] if each is not None else timestamp, model, *args),
                        )
                        found.append(cur.rowcount > 0)
            finally:
                self._db.execute("PRAGMA synchronous=NORMAL")
        return found

    def rows_of(self, model: str, request_ids: Sequence[str]) -> dict[str, int]:
        """How many rows (first-axis length of the first output) each known request id captured (its newest)."""
        return {
            rid: rows_in(next(iter(by_version.values())))
            for rid, by_version in self.captured(model, request_ids).items()
        }

    def captured(self, model: str, request_ids: Sequence[str]) -> dict[str, dict[str, dict[str, np.ndarray]]]:
        """The outputs each known request id captured, by version (its newest on each, the newest first): what
        its feedback is checked against, version by version."""
        result: dict[str, dict[str, dict[str, np.ndarray]]] = {}
        with self._lock:
            for request_id in request_ids:
                rows = self._db.execute(
                    f"SELECT version, outputs FROM predictions WHERE {_NEWEST} ORDER BY seq DESC",  # noqa: S608
                    (model, request_id),
                ).fetchall()
                if rows:
                    result[request_id] = {version: decode_arrays(outputs) for version, outputs in rows}
        return result

    # ----- canary ramps (repository/rollout.py) ---------------------------------------------------------------

    def ramp_places(self) -> dict[str, tuple[str, int]]:
        """Where each model's canary ramp was: (its place key, the step), as the last process to move it wrote."""
        with self._lock:
            return {
                model: (place, step)
                for model, place, step in self._db.execute("SELECT model, place, step FROM ramp_places")
            }

    def save_ramp_place(self, model: str, place: str, step: int) -> None:
        with self._lock, self._write():
            self._db.execute(
                "INSERT OR REPLACE INTO ramp_places (model, place, step, updated) VALUES (?, ?, ?, ?)",
                (model, place, step, time.time()),
            )

    # ----- firing alerts (shared by the processes on this data dir) -------------------------------------------

    def claim_alert(self, alert: FiringAlert) -> FiringAlert | None:
        """Record an alert that starts firing: None when it is new (the caller announces it), else the row already
        there (another process sending to the same sink, or this data dir's previous run, announced it)."""
        with self._lock, self._write():
            inserted = self._db.execute(
                f"INSERT OR IGNORE INTO firing_alerts ({_ALERT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                (
                    alert.sink,
                    alert.rule,
                    alert.model,
                    alert.version,
                    alert.expression,
                    alert.since,
                    alert.fired_value,
                    alert.value,
                    alert.threshold,
                    alert.updated,
                    alert.interval_s,
                ),
            ).rowcount
            existing = (
                None
                if inserted
                else self._alerts(
                    "sink = ? AND rule = ? AND model = ? AND version = ?",
                    (alert.sink, alert.rule, alert.model, alert.version),
                )
            )
        return existing[0] if existing else None

    def release_alert(self, sink: str, rule: str, model: str, version: str, *, updated: float | None = None) -> bool:
        """Forget a firing alert; True when this call removed it (the caller announces the resolution), False when
        it was gone already. ``updated``: only if nobody refreshed the row since it was read."""
        where = "sink = ? AND rule = ? AND model = ? AND version = ?"
        args: list[object] = [sink, rule, model, version]
        if updated is not None:
            where += " AND updated = ?"
            args.append(updated)
        with self._lock:
            return self._db.execute(f"DELETE FROM firing_alerts WHERE {where}", args).rowcount > 0  # noqa: S608

    def refresh_alerts(
        self, sink: str, held: Sequence[tuple[str, str, str, float | None]], now: float, interval_s: float
    ) -> list[tuple[str, str, str]]:
        """Store the latest value of each (rule, model, version, value) this monitor holds firing and mark it held
        now; returns the ones whose row is gone (another process resolved them)."""
        gone: list[tuple[str, str, str]] = []
        if not held:
            return gone
        with self._lock, self._write():
            for rule, model, version, value in held:
                changed = self._db.execute(
                    "UPDATE firing_alerts SET value = ?, updated = ?, interval_s = ? "
                    "WHERE sink = ? AND rule = ? AND model = ? AND version = ?",
                    (value, now, interval_s, sink, rule, model, version),
                ).rowcount
                if not changed:
                    gone.append((rule, model, version))
        return gone

    def let_go_alerts(self, sink: str, held: Sequence[tuple[str, str, str]]) -> None:
        """A stopping process no longer holds these: the next monitor (a restart, another process) may resolve
        them at once if it cannot judge them (their version is not served there, their rule is gone)."""
        with self._lock:
            self._db.executemany(
                "UPDATE firing_alerts SET updated = 0 WHERE sink = ? AND rule = ? AND model = ? AND version = ?",
                [(sink, *key) for key in held],
            )

    def firing_alerts(self, sink: str) -> list[FiringAlert]:
        """The alerts firing for ``sink``, oldest first."""
        with self._lock:
            return self._alerts("sink = ?", (sink,))

    def _alerts(self, where: str, args: tuple[object, ...]) -> list[FiringAlert]:
        rows = self._db.execute(
            f"SELECT {_ALERT_COLUMNS} FROM firing_alerts WHERE {where} ORDER BY since",  # noqa: S608 - constant clauses
            args,
        ).fetchall()
        return [FiringAlert(*row) for row in rows]

    # ----- reads -------------------------------------------------------------------------------------------

    @staticmethod
    def _where(
        model: str, version: str | None, since: float | None, until: float | None, labelled_only: bool
    ) -> tuple[str, list[object]]:
        clauses: list[str] = ["model = ?"]
        args: list[object] = [model]
        if version:
            clauses.append("version = ?")
            args.append(version)
        if since is not None:
            clauses.append("ts >= ?")
            args.append(since)
        if until is not None:
            clauses.append("ts < ?")
            args.append(until)
        if labelled_only:
            clauses.append("label IS NOT NULL")
        return " AND ".join(clauses), args

    def predictions(
        self,
        model: str,
        version: str | None = None,
        *,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = None,
        labelled_only: bool = False,
        newest_first: bool = True,
        with_inputs: bool = True,
    ) -> list[Prediction]:
        """Captured predictions of a model (one version, or all with None), in capture order or its reverse.

        `with_inputs=False` leaves the inputs out (None): quality needs only outputs and labels, and decoding a
        window of inputs is most of the cost of reading it."""
        where, args = self._where(model, version, since, until, labelled_only)
        order = "DESC" if newest_first else "ASC"
        inputs = "inputs" if with_inputs else "NULL"
        sql = f"SELECT id, model, version, ts, {inputs}, outputs, label, label_ts FROM predictions WHERE {where}"
        sql += f" ORDER BY seq {order}"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [
            Prediction(
                id=r[0],
                model=r[1],
                version=r[2],
                timestamp=r[3],
                inputs=None if r[4] is None else decode_arrays(r[4]),
                outputs=decode_arrays(r[5]),
                label=None if r[6] is None else np.load(io.BytesIO(r[6]), allow_pickle=False),
                label_timestamp=r[7],
            )
            for r in rows
        ]

    def has_table(self, name: str) -> bool:
        """Whether the store holds the table: a file SQLite reads as an empty database (0 bytes, or made by a
        server that stopped before `_migrate`) holds none, which a read-only reader cannot create."""
        with self._lock:
            row = self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,))
            return row.fetchone() is not None

    def count(self, model: str, version: str | None = None, *, since: float | None = None) -> int:
        """How many predictions of the model (version) are stored, optionally since a time."""
        where, args = self._where(model, version, since, None, False)
        with self._lock:
            row = self._db.execute(f"SELECT COUNT(*) FROM predictions WHERE {where}", args).fetchone()
        return int(row[0])

    def _checkpoint_at_close(self) -> None:
        """Empty the WAL into the main file, without waiting: under the busy timeout, a TRUNCATE checkpoint waits
        for every reader (an export, another process's quality query) while it holds the write lock, so the other
        processes on the data dir could not store a capture or a label for up to 30 s, and this one's stop waited
        as long. Without it, the checkpoint copies what no reader still needs and leaves the rest to the WAL, which
        the next open reads."""
        self._db.execute("PRAGMA busy_timeout = 0")
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def close(self) -> None:
        """Checkpoint the WAL into the main file (unless read-only) and close; the store is unusable afterwards. A
        second call does nothing (sqlite3 would refuse the checkpoint on the closed connection)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if not self.read_only:
                    self._checkpoint_at_close()
            except sqlite3.Error as exc:
                # A full disk: what is committed is safe in the WAL, which the next open reads; raising would cut
                # the server's shutdown short (its models' sessions left open) for a file tidy-up.
                log.warning("prediction store %s: not checkpointed on close (%s); the WAL keeps it", self.path, exc)
            finally:
                self._db.close()
