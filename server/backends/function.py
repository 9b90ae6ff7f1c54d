"""A backend that runs a Python callable: for scheduler tests and for measuring the server's own overhead with a
model that costs nothing. Production models run on ONNX Runtime (onnx.py) or a remote Triton.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from tensorgate.server.backends.base import NO_CONTEXT, BatchContext

ModelFn = Callable[[Mapping[str, np.ndarray], Sequence[str]], dict[str, np.ndarray]]


class FunctionBackend:
    """Calls `fn(inputs, outputs)` on the scheduler's worker thread and counts the calls."""

    def __init__(self, fn: ModelFn, *, provider: str = "python") -> None:
        self._fn = fn
        self._provider = provider
        self.calls = 0

    @property
    def execution_provider(self) -> str:
        return self._provider

    def execute(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str], context: BatchContext = NO_CONTEXT
    ) -> dict[str, np.ndarray]:
        self.calls += 1
        return self._fn(inputs, outputs)

    def close(self) -> None:
        pass
