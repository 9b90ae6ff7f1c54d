"""Export captured predictions for retraining: inputs, outputs and joined ground truth, one record per row.

    tensorgate export digits --data-dir /var/lib/tensorgate --since -1h --format jsonl --out digits.jsonl

A captured request with a batch of N rows becomes N records, so a record is one training example::

    {"request_id": "4f3a...", "row": 0, "model": "digits", "version": "1", "timestamp": 1764220000.1,
     "inputs": {"input": [0.0, 3.0, ...]}, "outputs": {"label": 7, "probabilities": [...]},
     "label": 7, "label_timestamp": 1764220002.5}

A tensor with one element per row is a scalar, a wider row is a flat list (row-major); ``inputs`` is null when
input capture is off for the model and ``label`` null when no feedback came. A label with one value per row is
split over the rows; any other label shape is repeated whole on each row of its request. A NaN or infinite value
is written as null: ``NaN``/``Infinity`` are not JSON, and strict parsers (jq, most languages' JSON libraries)
refuse the whole line.

Parquet (``--format parquet``) has the same fields as columns (``input.<name>``, ``output.<name>``); it needs
pyarrow, from the ``tensorgate[export]`` extra. The store is read through engineer A's PredictionStore (the
SQLite file under the data directory), opened read-only: WAL mode lets us read while a server is writing to it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from tensorgate.server.monitoring.store import DB_NAME, Prediction, PredictionStore, StoreLayoutError

__all__ = ["FORMATS", "ExportError", "export", "open_store", "parse_time", "records"]

FORMATS = ("jsonl", "parquet")
_RELATIVE = re.compile(r"^-(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class ExportError(Exception):
    """Something the user can fix (a bad --since, a missing store, pyarrow not installed); one line, exit 2."""


def parse_time(text: str, now: float) -> float:
    """``-30m``/``-1h``/``-2d`` (before ``now``) or an ISO 8601 time (UTC when it has no offset) -> epoch seconds."""
    match = _RELATIVE.match(text.strip())
    if match:
        return now - float(match[1]) * _UNIT_S[match[2]]
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ExportError(
            f"time {text!r}: expected ISO 8601 (2026-11-27T06:00:00Z) or relative (-30m, -1h, -2d)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def open_store(data_dir: Path) -> PredictionStore:
    """The store of a data directory, read-only; an error (not a new empty database) when there is none.

    Read-only because a server may be writing to it: a read-write connection would checkpoint on close, taking
    the write lock that the server's capture writer needs."""
    path = Path(data_dir) / DB_NAME
    if not path.is_file():
        raise ExportError(f"{path}: no prediction store (is this the server's --data-dir?)")
    try:
        store = PredictionStore(path, read_only=True)
    except StoreLayoutError as exc:
        raise ExportError(str(exc)) from None
    except sqlite3.DatabaseError as exc:  # not a database, or one it cannot read: a line naming it, no traceback
        raise ExportError(f"{path}: cannot read the prediction store: {exc}{_what_to_do(path, exc)}") from None
    if not store.has_table("predictions"):
        store.close()
        raise ExportError(
            f"{path}: no predictions in this store yet: no server has finished opening it (an empty file, or one "
            "left by a server stopped while it started); start `tensorgate serve --data-dir` on this data dir "
            "first, or give the --data-dir a server captured to"
        )
    return store


def _what_to_do(path: Path, exc: sqlite3.DatabaseError) -> str:
    """The way out of what SQLite's words name: an export only reads, so a lock or a read-only directory (where
    SQLite cannot make a WAL store's -shm file) stops it where it would not stop a server's own reads."""
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return f"; another process holds it locked (`fuser {path}` names it): export again once it lets go"
    if code in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM):
        if not os.access(path, os.R_OK):
            return f"; this user (uid {os.getuid()}) may not read it: export as the user the server runs as"
        return (
            "; reading it needs its -wal and -shm files beside it, or a data dir where they can be made: copy the "
            "data dir (the store and its -wal file) somewhere writable and export from the copy"
        )
    return ""


def _value(row: np.ndarray) -> Any:
    """One row of a tensor as JSON: a scalar when it has one element, else a flat list."""
    flat = np.asarray(row).reshape(-1)
    values = [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else v for v in flat.tolist()]
    return values[0] if len(values) == 1 else values


def _rows_of(p: Prediction) -> int:
    first = next(iter(p.outputs.values()), None)
    return 1 if first is None or np.ndim(first) == 0 else int(np.shape(first)[0])


def _row(array: np.ndarray, i: int) -> Any:
    a = np.asarray(array)
    return _value(a if a.ndim == 0 else a[i])


def records(predictions: Iterable[Prediction]) -> Iterator[dict[str, Any]]:
    """One dict per row of each captured request (see the module docstring for the fields)."""
    for p in predictions:
        n = _rows_of(p)
        label = None if p.label is None else np.asarray(p.label)
        per_row = label is not None and label.ndim > 0 and label.shape[0] == n
        for i in range(n):
            yield {
                "request_id": p.id,
                "row": i,
                "model": p.model,
                "version": p.version,
                "timestamp": p.timestamp,
                "inputs": None if p.inputs is None else {k: _row(v, i) for k, v in p.inputs.items()},
                "outputs": {k: _row(v, i) for k, v in p.outputs.items()},
                "label": None if label is None else (_row(label, i) if per_row else _value(label)),
                "label_timestamp": p.label_timestamp,
            }


def _strict(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None (null), the only JSON for "no number" (Parquet keeps
    them: it has NaN and infinities of its own)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [_strict(v) for v in value]
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    return value


def _write_jsonl(rows: Iterable[dict[str, Any]], out: Path) -> int:
    n = 0
    with out.open("w", encoding="utf-8") as f:
        for record in rows:
            f.write(json.dumps(_strict(record), separators=(",", ":"), allow_nan=False) + "\n")
            n += 1
    return n


def _write_parquet(rows: Iterable[dict[str, Any]], out: Path) -> int:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ExportError(
            "--format parquet needs pyarrow: pip install 'tensorgate[export]' (or use --format jsonl)"
        ) from None
    columns: dict[str, list[Any]] = {}
    n = 0
    for record in rows:
        flat = {k: v for k, v in record.items() if k not in ("inputs", "outputs")}
        for prefix, group in (("input", record["inputs"]), ("output", record["outputs"])):
            for name, value in (group or {}).items():
                flat[f"{prefix}.{name}"] = value
        for key in columns.keys() | flat.keys():
            columns.setdefault(key, [None] * n).append(flat.get(key))
        n += 1
    pq.write_table(pa.table(columns), out)
    return n


def export(
    store: PredictionStore,
    model: str,
    out: Path,
    *,
    fmt: str = "jsonl",
    version: str | None = None,
    since: float | None = None,
    until: float | None = None,
    labelled_only: bool = False,
) -> int:
    """Write the model's captured predictions (oldest first) to ``out``; returns the number of records (rows)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r} (one of: {', '.join(FORMATS)})")
    try:
        predictions = store.predictions(
            model, version, since=since, until=until, labelled_only=labelled_only, newest_first=False
        )
    except sqlite3.DatabaseError as exc:  # a foreign table of that name, a lock, a page damaged past the header
        raise ExportError(
            f"{store.path}: cannot read the prediction store: {exc}{_what_to_do(store.path, exc)}"
        ) from None
    rows = records(predictions)
    out.parent.mkdir(parents=True, exist_ok=True)
    write = _write_jsonl if fmt == "jsonl" else _write_parquet
    target = out.resolve() if out.is_symlink() else out  # a link to a file: the file is what is replaced
    if target.exists() and not target.is_file():  # /dev/stdout, a pipe: written as they are
        return write(rows, out)
    # Written beside it, then renamed over it: a full disk stops a file part-way, at a line boundary as likely as
    # not, and what is left would read as a complete export of fewer predictions; a refusal (parquet without
    # pyarrow) must not cost the user the export already there. A name of its own, so that two exports to one
    # path do not write one file, and the old file's mode (captured inputs may be private).
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        if target.exists():
            shutil.copymode(target, tmp)
        else:  # the mode open() would give it (mkstemp's is 0600); a command's own process, so the umask is ours
            umask = os.umask(0)
            os.umask(umask)
            tmp.chmod(0o666 & ~umask)
        n = write(rows, tmp)
        tmp.replace(target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n
