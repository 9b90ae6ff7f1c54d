"""What the scheduler needs from anything that runs a model.

A backend executes one (possibly batched) set of inputs synchronously, on a worker thread owned by the scheduler,
never on the event loop. Backends are built by the repository from a model's effective config.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np


class Backend(Protocol):
    """A loaded model version, ready to execute."""

    @property
    def execution_provider(self) -> str:
        """Where the model really runs (e.g. "CPUExecutionProvider"), for logs, config and statistics."""
        ...

    def execute(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """Run the model; `outputs` names what to compute (never empty). Called from a worker thread."""
        ...

    def close(self) -> None:
        """Release the model's resources once no request can reach it any more."""
        ...
