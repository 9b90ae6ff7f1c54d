"""What the scheduler needs from anything that runs a model.

A backend executes one (possibly batched) set of inputs synchronously, on a worker thread owned by the scheduler,
never on the event loop. Backends are built by the repository from a model's effective config.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from opentelemetry.trace import SpanContext

    from tensorgate.protos import grpc_service_pb2 as pb


SequenceId = int | str


@dataclass(frozen=True, slots=True)
class SequenceFlags:
    """A request's place in its sequence (the `sequence_id`, `sequence_start` and `sequence_end` parameters)."""

    id: SequenceId
    start: bool = False
    end: bool = False


@dataclass(slots=True, frozen=True)
class BatchContext:
    """What a backend may want to know about the batch it runs, beyond its tensors.

    A remote backend passes the deadline, the trace context and a sequence request's flags on to its upstream; a
    local one ignores them (so the W3C headers are written only by the backend that sends them).
    """

    deadline: float | None = None
    """Absolute `time.monotonic()` after which no caller of the batch waits any more; None: some caller has none."""
    trace: SpanContext | None = None
    """The batch's span, or an unsampled caller's context, to carry upstream (None when the batch is not traced)."""
    sequence: SequenceFlags | None = None
    """A remote sequence model's request (a batch of one): its sequence parameters, which its upstream needs."""


NO_CONTEXT = BatchContext()


class Backend(Protocol):
    """A loaded model version, ready to execute."""

    @property
    def execution_provider(self) -> str:
        """Where the model really runs (e.g. "CPUExecutionProvider"), for logs, config and statistics."""
        ...

    def execute(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str], context: BatchContext = NO_CONTEXT
    ) -> dict[str, np.ndarray]:
        """Run the model; `outputs` names what to compute (never empty). Called from a worker thread."""
        ...

    def close(self) -> None:
        """Release the model's resources once no request can reach it any more."""
        ...


@runtime_checkable
class ReportsReadiness(Protocol):
    """A backend whose readiness can change after loading (a remote one: its upstream may go away and return)."""

    @property
    def ready(self) -> bool:
        """Cheap and non-blocking: read on the event loop by ModelReady and ServerReady."""
        ...


@runtime_checkable
class StreamsResponses(Protocol):
    """A backend that serves decoupled models (any number of responses per request): a remote one, whose upstream
    model is decoupled. Its responses are the upstream's, relayed as they arrive."""

    def admit(self, deadline: float | None) -> None:
        """Raise (a TensorgateError) if a request cannot start now; called right before `stream`."""
        ...

    def stream(
        self, request: pb.ModelInferRequest, deadline: float | None, trace: SpanContext | None
    ) -> AsyncGenerator[pb.ModelInferResponse, None]:
        """Called on the server's event loop; ends when the request is complete."""
        ...


@runtime_checkable
class Interrupts(Protocol):
    """A backend whose running batches can be cut short: a forced stop (a second signal) need not wait for a long
    batch before the process exits."""

    def interrupt(self) -> None:
        """Make the batches running now, and any started later, fail soon; called from the event loop."""
        ...


def interrupt_backend(backend: Backend) -> None:
    """Cut short what `backend` runs, if it can be (Interrupts); a no-op for the others."""
    if isinstance(backend, Interrupts):
        backend.interrupt()


def backend_ready(backend: Backend) -> bool:
    """Whether a loaded backend can serve now; local backends always can."""
    return backend.ready if isinstance(backend, ReportsReadiness) else True
