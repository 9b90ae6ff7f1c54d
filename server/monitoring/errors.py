"""Errors of the monitoring service; each carries its gRPC status (see server/errors.py for the tree).

TensorgateError
├── PredictionNotFoundError   (NOT_FOUND)            feedback names a request id that was never captured
└── NoReferenceError          (FAILED_PRECONDITION)  drift asked of a model without a reference profile
"""

from __future__ import annotations

import grpc

from tensorgate.server.errors import TensorgateError, model_ref

__all__ = ["NoReferenceError", "PredictionNotFoundError"]


class PredictionNotFoundError(TensorgateError):
    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, model: str, request_id: str, *, model_unknown: bool = False) -> None:
        if model_unknown:  # a misspelt model name: no id could ever be found, whatever the caller checks
            why = f"{model_ref(model)} is not served here and has no captured predictions (is the name right?)"
        else:
            why = (
                f"{model_ref(model)}: no captured prediction with request id '{request_id}' (not captured: sample "
                "rate, full capture queue, retention, or a wrong id)"
            )
        super().__init__(why)
        self.model, self.request_id = model, request_id


class NoReferenceError(TensorgateError):
    """Drift was asked of a model that has no reference profile (or nothing captured to compare)."""

    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, model: str, version: str, problem: str) -> None:
        super().__init__(f"{model_ref(model, version)}: {problem}")
        self.model, self.version = model, version
