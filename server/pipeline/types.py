"""The transport-free request and response that flow from the RPC layer through the pipeline.

The servicer turns protobuf into these and back (server/rpc/codec.py); nothing below the RPC layer sees protobuf
messages, so the pipeline, scheduler and backends can be tested and reused without gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from tensorgate.protos.tensors import ParamValue

if TYPE_CHECKING:
    from tensorgate.server.rpc.shared_memory import Slice


@dataclass(slots=True)
class InferRequest:
    """One inference call: `inputs` are numpy views of the request bytes; BYTES tensors are object arrays."""

    model: str
    version: str
    id: str
    inputs: dict[str, np.ndarray]
    datatypes: dict[str, str]
    requested_outputs: list[str] = field(default_factory=list)
    parameters: dict[str, ParamValue] = field(default_factory=dict)
    deadline: float | None = None
    """Absolute `time.monotonic()` by which the caller stops waiting; None when the call has no deadline."""
    shared_outputs: dict[str, Slice] | None = None
    """Outputs the caller asked for in shared memory: where the response encoder writes them."""
    classifications: dict[str, int] | None = None
    """Outputs asked for as their top k classes (the `classification` output parameter), by name."""


@dataclass(slots=True)
class InferResponse:
    """The answer, outputs in the order the caller asked for them (or the model's order when it asked none)."""

    model: str
    version: str
    id: str
    outputs: list[tuple[str, str, np.ndarray]]
    """(name, V2 datatype, array) per output."""
