"""What the scheduler needs from anything that runs a model.

A backend executes one (possibly batched) set of inputs synchronously, on a worker thread owned by the scheduler,
never on the event loop. Backends are built by the repository from a model's effective config.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
from tritonclient.utils import TRITON_RESERVED_REQUEST_PARAMS, TRITON_RESERVED_REQUEST_PARAMS_PREFIX

if TYPE_CHECKING:
    from opentelemetry.trace import SpanContext

    from tensorgate.protos import grpc_service_pb2 as pb
    from tensorgate.protos.tensors import ParamValue


SequenceId = int | str


@dataclass(frozen=True, slots=True)
class SequenceFlags:
    """A request's place in its sequence (the `sequence_id`, `sequence_start` and `sequence_end` parameters)."""

    id: SequenceId
    start: bool = False
    end: bool = False


def sequence_id_of(parameters: Mapping[str, object]) -> SequenceId | None:
    """A request's `sequence_id` (int64 read as uint64, uint64 or string, as Triton's clients send it); None
    without a correlation ID (0 and "" mean none, as in Triton) or with one of another type (which the request
    path refuses)."""
    sequence_id = parameters.get("sequence_id")
    if sequence_id is None or sequence_id == 0 or sequence_id == "":
        return None
    if isinstance(sequence_id, bool) or not isinstance(sequence_id, int | str):
        return None
    if isinstance(sequence_id, int) and sequence_id < 0:
        # An int64_param is read as uint64, as Triton reads it: Triton's C++ client and perf_analyzer send IDs past
        # 2**63 - 1 as their two's complement.
        sequence_id += 2**64
    return sequence_id


@dataclass(slots=True, frozen=True)
class BatchContext:
    """What a backend may want to know about the batch it runs, beyond its tensors.

    A remote backend passes the deadline, the trace context and a sequence request's flags on to its upstream; a
    local one ignores them (so the W3C headers are written only by the backend that sends them).
    """

    deadline: float | None = None
    """Absolute `time.monotonic()` of the latest deadline among the batch's callers that set one; None: none did."""
    open_ended: bool = False
    """Some caller of the batch set no deadline (with `deadline` set: others did). A remote backend then gives the
    call its own limit or until `deadline`, whichever is later, so that neither kind of caller cuts the other's
    call short."""
    trace: SpanContext | None = None
    """The batch's span, or an unsampled caller's context, to carry upstream (None when the batch is not traced)."""
    sequence: SequenceFlags | None = None
    """A remote sequence model's request (a batch of one): its sequence parameters, which its upstream needs."""
    abandoned: Future[None] | None = None
    """Resolved once every caller of the batch has left (cancelled, or past its deadline): nobody reads its result
    any more, so a remote backend cancels its upstream call, which would hold an instance, and the upstream, until
    it answered. None where the scheduler does not say: a local backend (RunsRemotely), or a sequence's request,
    which must reach its upstream in its sequence's order."""
    request_id: str = ""
    """A remote backend's batch of one request: that request's id, for its upstream ("" for a batch of several)."""
    parameters: Mapping[str, ParamValue] | None = None
    """A remote backend's batch: the request parameters its requests carry for the upstream (`upstream_parameters`:
    an LLM's sampling parameters, say), all alike (the scheduler batches only requests with equal ones together)."""


NO_CONTEXT = BatchContext()

_SERVER_PARAMETERS = frozenset(TRITON_RESERVED_REQUEST_PARAMS)


def upstream_parameters(parameters: Mapping[str, ParamValue] | None) -> dict[str, ParamValue] | None:
    """The request parameters meant for the model, which a remote backend sends upstream with its batch; None when
    there are none. The names the protocol reserves (tritonclient's list) are the server's: it consumes them
    itself (`priority` and `timeout` in its queue, `sequence_*` in its sequencing, which hands them on in
    BatchContext.sequence), and `triton_*` are Triton's own. Left in, they would keep requests that differ only in
    them (two callers' timeouts) out of each other's batches."""
    if not parameters:
        return None
    kept = {k: v for k, v in parameters.items() if not server_parameter(k)}
    return kept or None


EMPTY_FINAL_RESPONSE = "triton_enable_empty_final_response"
"""A decoupled request's ask for an empty response that marks its end: the upstream's to send, so it goes there."""


def server_parameter(name: str, *, streaming: bool = False) -> bool:
    """Whether a request parameter is the server's own, which a remote backend does not send upstream
    (`upstream_parameters`; a decoupled model's relayed request, `streaming`, strips the same ones). A relayed
    request's EMPTY_FINAL_RESPONSE is the exception: only the upstream knows which of its responses is the last."""
    if streaming and name == EMPTY_FINAL_RESPONSE:
        return False
    return name in _SERVER_PARAMETERS or name.startswith(TRITON_RESERVED_REQUEST_PARAMS_PREFIX)


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
class RunsRemotely(Protocol):
    """A backend whose batches run on another server (a remote one). The scheduler tells it when none of a
    batch's callers waits any more (BatchContext.abandoned), and gives it what to send on with the batch: the
    request's id, and its `upstream_parameters`, which only requests that carry the same ones are batched
    together with. A local backend gets none of these: they would only split its batches."""

    @property
    def runs_remotely(self) -> bool:
        """True: the scheduler fills BatchContext's abandoned, request_id and parameters for this backend."""
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
    """Whether a loaded backend can serve now; local backends always can. Read as an attribute, not by
    isinstance against the runtime-checkable protocol, which takes some 8 us a model: ServerReady, every scrape
    and the half-second readiness watch ask it of every model (1.7 ms a time for 200 models, on the loop)."""
    ready: bool = getattr(backend, "ready", True)
    return ready
