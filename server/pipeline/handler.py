"""The transport-free inference path: find the model, validate, schedule, shape the response.

The servicer calls this with decoded requests; tests and future transports can too.
"""

from __future__ import annotations

import time

from tensorgate.server.errors import InvalidRequestError
from tensorgate.server.pipeline.types import InferRequest, InferResponse
from tensorgate.server.pipeline.validate import reshape_out, validate_request
from tensorgate.server.repository.manager import ModelRepository


def _int_parameter(req: InferRequest, key: str, version: str) -> int | None:
    """Scheduling parameters arrive as int64 or uint64 (tritonclient sends uint64); anything else is a mistake."""
    value = req.parameters.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequestError(req.model, version, f"parameter '{key}' must be a non-negative integer")
    return value


class InferenceHandler:
    def __init__(self, repository: ModelRepository) -> None:
        self._repository = repository

    async def infer(self, req: InferRequest) -> InferResponse:
        """Run one request; raises TensorgateError subclasses that carry their gRPC status."""
        started = time.perf_counter_ns()
        model = self._repository.get(req.model, req.version)
        version = str(model.version)
        try:
            inputs, rows, outputs = validate_request(model.schema, req, version)
            results, times = await model.scheduler.submit(
                inputs,
                outputs,
                rows,
                req.deadline,
                priority=_int_parameter(req, "priority", version),
                timeout_us=_int_parameter(req, "timeout", version),
            )
        except Exception:
            model.stats.record_failure(time.perf_counter_ns() - started)
            raise
        schema = model.schema
        response = InferResponse(
            model=model.name,
            version=version,
            id=req.id,
            outputs=[
                (
                    name,
                    schema.outputs[name].datatype.name,
                    reshape_out(results[name], schema.outputs[name], schema.max_batch_size),
                )
                for name in outputs
            ],
        )
        model.stats.record_request(rows, time.perf_counter_ns() - started, times)
        return response
