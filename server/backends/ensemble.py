"""The backend slot of an ensemble: it runs nothing itself, and is ready while its composing models are.

An ensemble's requests never reach a worker thread: the pipeline runs its steps through the composing models'
own schedulers (pipeline/ensemble.py), so each step batches with that model's other traffic.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from tensorgate.server.backends.base import NO_CONTEXT, BatchContext

ENSEMBLE_PROVIDER = "ensemble"


class EnsembleBackend:
    def __init__(self, ready: Callable[[], bool]) -> None:
        self._ready = ready

    @property
    def execution_provider(self) -> str:
        return ENSEMBLE_PROVIDER

    @property
    def ready(self) -> bool:
        """Whether every composing model has a ready version to serve the steps (read by ModelReady)."""
        return self._ready()

    def execute(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str], context: BatchContext = NO_CONTEXT
    ) -> dict[str, np.ndarray]:
        raise RuntimeError("an ensemble runs its steps through its composing models, never as one execution")

    def close(self) -> None:
        """Nothing to release: the composing models own their sessions."""
