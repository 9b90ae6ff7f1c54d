"""A budget of bytes for the requests in flight (--max-in-flight-bytes): the in-flight caps count calls, and 40
concurrent 16 MiB requests took a server from 170 MiB to 1.9 GiB; this bounds what admitted requests hold.

A ModelInfer call, and each message of a ModelStreamInfer stream, is admitted once its tensors are decoded and
before the model sees it; it holds its bytes until its answer is made (success, error, cancel or deadline). One
that would take the bytes in flight past the budget answers RESOURCE_EXHAUSTED at once, without waiting.
"""

from __future__ import annotations

from tensorgate.server.errors import ResourceExhaustedError, model_ref
from tensorgate.server.pipeline.cache import tensor_bytes
from tensorgate.server.pipeline.types import InferRequest

FLAG = "--max-in-flight-bytes"


def request_bytes(req: InferRequest) -> int:
    """The bytes of a decoded request's input tensors: what the pipeline holds for it while it runs.

    Measured on the decoded arrays, not the protobuf message: upb's `ByteSize()` encodes the whole message (40 ms
    for a 16 MiB request here, slower than parsing it), and each read of a `raw_input_contents` entry copies it.
    An array's `nbytes` costs nothing; a BYTES tensor (an object array) counts its elements' bytes and a pointer
    each, a pass over elements its decoding made anyway. The protobuf message stays alive next to the arrays
    while the call runs, so the process holds up to twice this (plus the outputs) per request.
    """
    return sum(tensor_bytes(array) for array in req.inputs.values())


class ByteBudgetError(ResourceExhaustedError):
    """A request refused by the byte budget; its message names the model, the sizes, the budget and the flag."""

    def __init__(self, model: str, version: str, size: int, held: int, limit: int) -> None:
        budget = f"the server's budget for requests in flight ({limit} bytes, {FLAG})"
        if size > limit:
            why = f"can never fit {budget}"
        else:
            why = f"do not fit the {max(limit - held, 0)} bytes left of {budget}; retry later or on another replica"
        super().__init__(f"{model_ref(model, version)}: the request's {size} bytes of tensors {why}")
        self.model, self.version, self.size, self.limit = model, version, size, limit
        self.permanent = size > limit


class ByteBudget:
    """Bytes held by the requests admitted and not yet answered; used on the event loop only, so plain integers.

    Usage: `size = budget.admit(model, version, request_bytes(req))`, then `budget.release(size)` once the
    answer is made, in a `finally`.
    """

    __slots__ = ("limit", "held")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"a byte budget must be at least 1 byte, got {limit}")
        self.limit = limit
        self.held = 0

    def admit(self, model: str, version: str, size: int) -> int:
        """Take `size` bytes, or raise ByteBudgetError when they do not fit now (or ever); returns `size`."""
        held = self.held + size
        if held > self.limit:
            raise ByteBudgetError(model, version, size, self.held, self.limit)
        self.held = held
        return size

    def release(self, size: int) -> None:
        self.held -= size


__all__ = ["FLAG", "ByteBudget", "ByteBudgetError", "request_bytes"]
