"""Errors of the monitoring service; each carries its gRPC status (see server/errors.py for the tree).

TensorgateError
├── PredictionNotFoundError   (NOT_FOUND)            feedback names a request id that was never captured
├── NoReferenceError          (FAILED_PRECONDITION)  drift asked of a model without a reference profile
└── StoreWriteError           (RESOURCE_EXHAUSTED when the disk is full, else UNAVAILABLE)  the data dir refused a write
"""

from __future__ import annotations

import sqlite3

import grpc

from tensorgate.server.errors import TensorgateError, model_ref

__all__ = ["NoReferenceError", "PredictionNotFoundError", "StoreWriteError"]


class PredictionNotFoundError(TensorgateError):
    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, model: str, request_id: str, *, model_unknown: bool = False) -> None:
        if model_unknown:  # a misspelt model name: no id could ever be found, whatever the caller checks
            why = f"{model_ref(model)} is not served here and has no captured predictions (is the name right?)"
        else:
            why = (
                f"{model_ref(model)}: no captured prediction with request id '{request_id}' (not captured: sample "
                "rate, full capture queue, a failed capture write, retention, or a wrong id)"
            )
        super().__init__(why)
        self.model, self.request_id = model, request_id


class NoReferenceError(TensorgateError):
    """Drift was asked of a model that has no reference profile (or nothing captured to compare)."""

    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, model: str, version: str, problem: str) -> None:
        super().__init__(f"{model_ref(model, version)}: {problem}")
        self.model, self.version = model, version


class StoreWriteError(TensorgateError):
    """The data dir's database refused a write (a full disk, an I/O error): nothing of the call was stored, and the
    same call succeeds once the cause is gone. Not INTERNAL: the caller can act on it (retry later), and the server
    keeps answering inferences meanwhile."""

    code = grpc.StatusCode.UNAVAILABLE

    ENVIRONMENTAL = frozenset(
        {sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_READONLY}
    )
    """SQLite's primary result codes for a write the machine refused (a full disk, a quota, an I/O error, a lock, a
    read-only file): sending it again can succeed. Anything else (a corrupt file, a bug) is no such error."""

    @classmethod
    def environmental(cls, exc: sqlite3.Error) -> bool:
        return (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF in cls.ENVIRONMENTAL

    def __init__(self, model: str, what: str, exc: sqlite3.Error) -> None:
        full = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF == sqlite3.SQLITE_FULL
        if full:
            self.code = grpc.StatusCode.RESOURCE_EXHAUSTED
        super().__init__(
            f"{model_ref(model)}: {what} not stored: the data dir's database cannot be written ({exc}); "
            "nothing of this call was kept, send it again "
            + ("once the data dir's disk has space" if full else "later")
        )
