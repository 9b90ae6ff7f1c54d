"""The timing half of dynamic batching: the per model-version queue, priorities, queue policies and instances.

Most tests drive a Scheduler directly with a FunctionBackend whose function blocks on a threading.Event (`Gate`),
so each test decides when an execution finishes and reads back the rows of every call. Waits are bounded (10 s),
so a batcher that holds a batch it should send fails instead of hanging; no test asserts a tight timing. The last
tests go through a real server and real ONNX models, as a client sees them.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tca
from google.protobuf import text_format
from tritonclient.utils import InferenceServerException

from tensorgate.protos import GRPCInferenceServiceStub
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos import model_config_pb2 as mc
from tensorgate.server.backends.base import SequenceFlags
from tensorgate.server.backends.function import FunctionBackend
from tensorgate.server.errors import (
    BackendError,
    DeadlineExceededError,
    ResourceExhaustedError,
    ServerUnavailableError,
)
from tensorgate.server.scheduling.policy import SchedulingPolicy
from tensorgate.server.scheduling.scheduler import Scheduler
from tensorgate.server.telemetry.statistics import ModelStats
from tests.onnx_models import add_sub_model, busy_model, slow_model, write_config
from tests.serving import ServerThread
from tests.test_poll import wait_for

WAIT = 10.0
"""Upper bound for anything that should happen "at once" or after a short delay (the machine is shared)."""

# ----- helpers ---------------------------------------------------------------------------------------------------


class Gate:
    """A model function: Y = X * 2, Z = X + 1. It records every call and blocks until `open()`.

    Request `i` sends X rows `[i, 0], [i, 1], ...`, so `requests` tells which requests shared each call.
    """

    def __init__(self) -> None:
        self._opened = threading.Event()
        self._lock = threading.Lock()
        self.rows: list[int] = []
        """Rows of each call, in call order."""
        self.requests: list[list[int]] = []
        """Request ids in each call, in batch order."""
        self.active = 0
        """Calls inside the function right now."""

    def open(self) -> None:
        self._opened.set()

    def __call__(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        x = inputs["X"]
        with self._lock:
            self.rows.append(x.shape[0])
            self.requests.append(list(dict.fromkeys(int(v) for v in x[:, 0])))
            self.active += 1
        try:
            if not self._opened.wait(WAIT):
                raise TimeoutError("the test never opened the gate")
        finally:
            with self._lock:
                self.active -= 1
        return {name: {"Y": x * 2, "Z": x + 1}[name] for name in outputs}


def request(i: int, rows: int = 1) -> dict[str, np.ndarray]:
    return {"X": np.stack([np.full(rows, i), np.arange(rows)], axis=1).astype(np.float32)}


async def infer(s: Scheduler, i: int, rows: int = 1, deadline: float | None = None, **kw: Any) -> np.ndarray:
    """Submit request `i` and check that its caller gets exactly its own rows back."""
    x = request(i, rows)
    outputs, times = await s.submit(x, ["Y"], rows, deadline, **kw)
    assert list(outputs) == ["Y"]
    np.testing.assert_array_equal(outputs["Y"], x["X"] * 2)
    assert times.queue_ns >= 0
    return outputs["Y"]


async def until(cond: Callable[[], bool], what: str) -> None:
    limit = time.monotonic() + WAIT
    while not cond():
        if time.monotonic() > limit:
            raise AssertionError(f"not within {WAIT} s: {what}")
        await asyncio.sleep(0.002)


async def queued() -> None:
    """Let every task created so far run up to its first wait: each submit() is then in the queue."""
    await asyncio.sleep(0)


def spawn(coro: Any) -> asyncio.Task[Any]:
    return asyncio.ensure_future(coro)


async def block(s: Scheduler, gate: Gate, i: int = 0, rows: int = 1, busy: int = 1) -> asyncio.Task[Any]:
    """Occupy an instance with request `i` (it runs and waits in the gate)."""
    task = spawn(infer(s, i, rows))
    await until(lambda: gate.active == busy, f"{busy} execution(s) in the gate")
    return task


Factory = Callable[..., tuple[Scheduler, FunctionBackend, ModelStats]]


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    yield g
    g.open()


@pytest.fixture
async def make(gate: Gate) -> AsyncIterator[Factory]:
    """Builds schedulers from config text, as the repository does; they are closed after the test."""
    made: list[Scheduler] = []

    def factory(
        dynamic_batching: str | None = "",
        max_batch_size: int = 8,
        instances: int = 1,
        fn: Callable[..., dict[str, np.ndarray]] | None = None,
    ) -> tuple[Scheduler, FunctionBackend, ModelStats]:
        text = f'name: "m" max_batch_size: {max_batch_size}'
        if dynamic_batching is not None:
            text += f" dynamic_batching {{ {dynamic_batching} }}"
        policy = SchedulingPolicy.from_config(text_format.Parse(text, mc.ModelConfig()))
        backend = FunctionBackend(fn or gate)
        stats = ModelStats()
        s = Scheduler("m", 1, backend, stats, instances, policy)
        made.append(s)
        return s, backend, stats

    yield factory
    gate.open()
    for s in made:
        await s.close(grace=WAIT)


async def gather(*tasks: asyncio.Future[Any]) -> list[Any]:
    return await asyncio.wait_for(asyncio.gather(*tasks), WAIT)


# ----- batch formation -------------------------------------------------------------------------------------------


async def test_full_batches_form_while_the_instance_is_busy(make: Factory, gate: Gate) -> None:
    s, backend, stats = make("max_queue_delay_microseconds: 0", max_batch_size=4)
    first = await block(s, gate, 0)
    rest = [spawn(infer(s, i)) for i in range(1, 7)]
    await queued()
    assert gate.rows == [1]
    gate.open()
    await gather(first, *rest)
    assert gate.rows == [1, 4, 2]
    assert gate.requests == [[0], [1, 2, 3, 4], [5, 6]]
    assert backend.calls == 3
    assert stats.execution_count == 3 and sorted(stats.batch) == [1, 2, 4]


async def test_full_batch_sends_without_waiting_for_the_delay(make: Factory, gate: Gate) -> None:
    s, _, _ = make("max_queue_delay_microseconds: 60000000", max_batch_size=4)
    gate.open()
    await gather(*(spawn(infer(s, i)) for i in range(4)))
    assert gate.rows == [4]


async def test_partial_batch_leaves_after_the_delay(make: Factory, gate: Gate) -> None:
    s, _, _ = make("max_queue_delay_microseconds: 100000", max_batch_size=8)
    gate.open()
    started = time.monotonic()
    await gather(*(spawn(infer(s, i)) for i in range(3)))
    assert gate.rows == [3], "the three requests waited together for the delay, then left as one batch"
    assert time.monotonic() - started < WAIT


async def test_no_delay_never_holds_a_batch_for_a_preferred_size(make: Factory, gate: Gate) -> None:
    s, _, _ = make("preferred_batch_size: [ 4 ] max_queue_delay_microseconds: 0", max_batch_size=8)
    gate.open()
    await gather(spawn(infer(s, 0)))
    assert gate.rows == [1]


async def test_preferred_size_cuts_early(make: Factory, gate: Gate) -> None:
    s, _, _ = make("preferred_batch_size: [ 2, 4 ] max_queue_delay_microseconds: 60000000", max_batch_size=8)
    first = await block(s, gate, 0, rows=8)  # a full batch leaves at once
    rest = [spawn(infer(s, i)) for i in range(1, 7)]
    await queued()
    gate.open()
    await gather(first, *rest)
    # The largest preferred size the queue allows is cut from it, then (as in Triton's GetDynamicBatch) the two
    # requests left make preferred size 2 and leave at once, without waiting out the 60 s delay.
    assert gate.rows == [8, 4, 2]


async def test_a_lone_request_below_every_preferred_size_waits_for_the_delay(make: Factory, gate: Gate) -> None:
    s, _, _ = make("preferred_batch_size: [ 2, 4 ] max_queue_delay_microseconds: 60000000", max_batch_size=8)
    gate.open()
    lone = spawn(infer(s, 0))
    await asyncio.sleep(0.05)
    assert gate.rows == [] and not lone.done()
    await s.close(grace=0)
    with pytest.raises(ServerUnavailableError):
        await lone


async def test_multi_row_requests_reach_a_preferred_size(make: Factory, gate: Gate) -> None:
    s, _, _ = make("preferred_batch_size: [ 4 ] max_queue_delay_microseconds: 60000000", max_batch_size=8)
    gate.open()
    await gather(spawn(infer(s, 1, rows=3)), spawn(infer(s, 2, rows=1)))
    assert gate.rows == [4]


async def test_multi_row_requests_overshoot_a_preferred_size(make: Factory, gate: Gate) -> None:
    """3 + 3 rows would pass preferred size 4: the first request leaves alone at once (Triton's cut before the
    largest preferred size), the second waits for company or the delay."""
    s, _, _ = make("preferred_batch_size: [ 4 ] max_queue_delay_microseconds: 100000", max_batch_size=8)
    first = await block(s, gate, 0, rows=8)
    rest = [spawn(infer(s, 1, rows=3)), spawn(infer(s, 2, rows=3))]
    await queued()
    gate.open()
    await gather(first, *rest)
    assert gate.rows == [8, 3, 3]


async def test_multi_row_requests_are_never_split(make: Factory, gate: Gate) -> None:
    s, _, stats = make("max_queue_delay_microseconds: 0", max_batch_size=4)
    first = await block(s, gate, 0)
    rest = [spawn(infer(s, i, rows)) for i, rows in [(1, 3), (2, 2), (3, 2), (4, 1), (5, 4)]]
    await queued()
    gate.open()
    await gather(first, *rest)
    assert gate.requests == [[0], [1], [2, 3], [4], [5]]
    assert gate.rows == [1, 3, 4, 1, 4]
    assert {size: b.compute_infer.count for size, b in stats.batch.items()} == {1: 2, 3: 1, 4: 2}


async def test_requests_of_different_shapes_batch_apart(make: Factory, gate: Gate) -> None:
    s, _, _ = make("max_queue_delay_microseconds: 0", max_batch_size=8)
    first = await block(s, gate, 0)
    wide = {"X": np.zeros((1, 3), np.float32)}
    odd = spawn(s.submit(wide, ["Y"], 1))
    same = [spawn(infer(s, i)) for i in (1, 2)]
    await queued()
    gate.open()
    (out, _), *_ = await gather(odd, first, *same)
    assert out["Y"].shape == (1, 3)
    assert sorted(gate.rows) == [1, 1, 2]


async def test_a_request_of_another_shape_is_not_overtaken(make: Factory, gate: Gate) -> None:
    """As in Triton: the batch is the run of requests shaped as the first, so a request of another shape ends it
    and goes next, before later requests of the first shape (a 60 s delay: only the other shape sends it)."""
    s, _, _ = make("max_queue_delay_microseconds: 60000000", max_batch_size=8)
    first = await block(s, gate, 0, rows=8)
    before = spawn(infer(s, 1))
    odd = spawn(s.submit({"X": np.full((1, 3), 7, np.float32)}, ["Y"], 1))
    after = [spawn(infer(s, 2, rows=7)), spawn(infer(s, 3))]  # 8 rows together: a full batch
    await queued()
    gate.open()
    await gather(first, before, odd, *after)
    assert gate.requests == [[0], [1], [7], [2, 3]]


async def test_without_dynamic_batching_each_request_runs_alone(make: Factory, gate: Gate) -> None:
    s, backend, _ = make(None, max_batch_size=8)
    first = await block(s, gate, 0)
    rest = [spawn(infer(s, i, rows)) for i, rows in [(1, 1), (2, 3), (3, 1)]]
    await queued()
    gate.open()
    await gather(first, *rest)
    assert gate.requests == [[0], [1], [2], [3]]
    assert gate.rows == [1, 1, 3, 1]
    assert backend.calls == 4


@pytest.mark.parametrize("dynamic_batching", [pytest.param(None, id="no-batching"), pytest.param("", id="batching")])
async def test_instances_run_batches_at_once(make: Factory, gate: Gate, dynamic_batching: str | None) -> None:
    s, _, _ = make(dynamic_batching, max_batch_size=1, instances=2)
    first = spawn(infer(s, 0))
    second = spawn(infer(s, 1))
    third = spawn(infer(s, 2))
    await until(lambda: gate.active == 2, "both instances inside the model at once")
    await asyncio.sleep(0.02)
    assert len(gate.rows) == 2, "a third execution waits for a free instance"
    gate.open()
    await gather(first, second, third)
    assert sorted(r for call in gate.requests for r in call) == [0, 1, 2]


async def test_busy_model_does_not_block_another(make: Factory, gate: Gate) -> None:
    busy, _, _ = make("")
    other, _, _ = make("", fn=lambda inputs, outputs: {"Y": inputs["X"] * 2})
    blocked = await block(busy, gate, 0)
    await gather(*(spawn(infer(other, i)) for i in range(1, 4)))
    assert not blocked.done()
    gate.open()
    await gather(blocked)


# ----- priorities and queue policies -----------------------------------------------------------------------------


async def test_priorities_order_service(make: Factory, gate: Gate) -> None:
    """Level 1 first; priority 0 and priorities past priority_levels take the default level, as in Triton."""
    s, _, _ = make("priority_levels: 3 default_priority_level: 2", max_batch_size=1)
    first = await block(s, gate, 0)
    rest = [spawn(infer(s, i, priority=p)) for i, p in [(1, 3), (2, 2), (3, 0), (4, 1), (5, None), (6, 99)]]
    await queued()
    gate.open()
    await gather(first, *rest)
    assert gate.requests == [[0], [4], [2], [3], [5], [6], [1]]


async def test_full_queue_rejects_at_once(make: Factory, gate: Gate) -> None:
    s, backend, _ = make("default_queue_policy { max_queue_size: 2 }")
    first = await block(s, gate, 0)
    waiting = [spawn(infer(s, i)) for i in (1, 2)]
    await queued()
    with pytest.raises(ResourceExhaustedError) as info:
        await asyncio.wait_for(infer(s, 3), WAIT)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "'m'" in info.value.message and "max_queue_size 2" in info.value.message
    gate.open()
    await gather(first, *waiting)
    assert backend.calls == 2 and gate.requests == [[0], [1, 2]]


async def test_delayed_requests_still_count_toward_the_queue_size(make: Factory, gate: Gate) -> None:
    """timeout_action DELAY moves a request behind the others, not out of its queue."""
    s, _, _ = make(
        "default_queue_policy { max_queue_size: 2 default_timeout_microseconds: 50000 timeout_action: DELAY }",
        max_batch_size=1,
    )
    first = await block(s, gate, 0)
    delayed = [spawn(infer(s, i)) for i in (1, 2)]
    await asyncio.sleep(0.2)  # their 50 ms queue timeouts have fired: both are in the delayed lane now
    assert not any(t.done() for t in delayed)
    with pytest.raises(ResourceExhaustedError) as info:
        await asyncio.wait_for(infer(s, 3), WAIT)
    assert "max_queue_size 2" in info.value.message
    gate.open()
    await gather(first, *delayed)


async def test_queue_limits_are_per_priority_level(make: Factory, gate: Gate) -> None:
    s, _, _ = make(
        "priority_levels: 2 default_priority_level: 2 default_queue_policy { max_queue_size: 1 }", max_batch_size=1
    )
    first = await block(s, gate, 0)
    low = spawn(infer(s, 1))
    high = spawn(infer(s, 2, priority=1))
    await queued()
    with pytest.raises(ResourceExhaustedError, match="priority level 2"):
        await infer(s, 3, priority=2)
    gate.open()
    await gather(first, low, high)


async def test_cancelled_requests_free_their_queue_places(make: Factory, gate: Gate) -> None:
    s, _, _ = make("default_queue_policy { max_queue_size: 2 }")
    first = await block(s, gate, 0)
    gone = [spawn(infer(s, i)) for i in (1, 2)]
    await queued()
    for t in gone:
        t.cancel()
    await asyncio.gather(*gone, return_exceptions=True)
    later = [spawn(infer(s, i)) for i in (3, 4)]
    await queued()
    gate.open()
    await gather(first, *later)
    assert gate.requests == [[0], [3, 4]]


async def test_expired_deadlines_never_reach_the_model(make: Factory, gate: Gate) -> None:
    s, backend, stats = make("max_queue_delay_microseconds: 0")
    first = await block(s, gate, 0)
    soon = time.monotonic() + 0.05
    expiring = [spawn(infer(s, i, 2, soon)) for i in (1, 2)]
    kept = spawn(infer(s, 3, 1, time.monotonic() + 3 * WAIT))
    await queued()
    for t in expiring:
        # The callers hear it at their deadline, not when an instance frees up.
        with pytest.raises(DeadlineExceededError, match="deadline"):
            await asyncio.wait_for(t, WAIT)
    assert gate.active == 1
    gate.open()
    await gather(first, kept)
    assert gate.requests == [[0], [3]] and gate.rows == [1, 1]
    assert backend.calls == 2 and stats.execution_count == 2


@pytest.mark.parametrize("fails", ["deadline", "unload"])
async def test_a_remote_sequence_request_failed_while_queued_may_be_cancelled_at_once(
    make: Factory, gate: Gate, fails: str
) -> None:
    """A remote sequence model's request (it carries `settled`) failed in the queue, by its deadline or an
    unload, whose caller is cancelled in the same loop iteration (gRPC cancels the handler at the deadline too):
    it never reached a batch, so the cancelled caller does not wait for one to settle it."""
    s, backend, _ = make(None, max_batch_size=0)
    flags = SequenceFlags(7, True, False)
    loop = asyncio.get_running_loop()
    if fails == "deadline":
        task = spawn(s.submit(request(1), ["Y"], 1, time.monotonic() - 1.0, sequence=flags))
        await queued()
        loop.call_soon(task.cancel)  # right after the dispatcher drops it as past its deadline
    else:
        first = await block(s, gate, 0)
        task = spawn(s.submit(request(1), ["Y"], 1, None, sequence=flags))
        await queued()
        s.reject_waiting("was unloaded before the request ran")
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, WAIT)
    if fails == "unload":
        gate.open()
        await gather(first)
    assert backend.calls == (0 if fails == "deadline" else 1) and s.queued == 0


@pytest.mark.parametrize("leaves", ["deadline", "cancel"])
async def test_a_full_batch_waits_staged_and_its_callers_may_still_leave(
    make: Factory, gate: Gate, leaves: str
) -> None:
    """While the instance is busy, a batch that is already full (max_batch_size rows) is handed to it in advance,
    so that it starts the moment the instance is free; a batch that could still grow is not. A caller of the
    staged batch whose deadline passes hears DEADLINE_EXCEEDED at that deadline, and one that goes away is
    forgotten: neither reaches the model."""
    s, backend, _ = make("max_queue_delay_microseconds: 0", max_batch_size=2)
    first = await block(s, gate, 0)
    leaving = spawn(infer(s, 1, 1, time.monotonic() + 0.05 if leaves == "deadline" else None))
    staying = spawn(infer(s, 2))
    later = [spawn(infer(s, i)) for i in (3, 4)]  # a second full batch: queued, one staged batch per instance
    await until(lambda: s.queued == 2, "[1, 2] staged, [3, 4] queued")
    if leaves == "deadline":
        with pytest.raises(DeadlineExceededError, match="deadline"):
            await asyncio.wait_for(leaving, WAIT)
        assert gate.active == 1  # heard at its deadline, while the instance was still busy
    else:
        leaving.cancel()
        await asyncio.gather(leaving, return_exceptions=True)
    gate.open()
    await gather(first, staying, *later)
    # Staged, [1, 2] stayed one batch: 2 ran alone rather than with 3, which joined 4.
    assert gate.requests == [[0], [2], [3, 4]] and backend.calls == 3


async def test_cancelled_caller_is_dropped_from_its_batch(make: Factory, gate: Gate) -> None:
    s, _, _ = make("max_queue_delay_microseconds: 0")
    first = await block(s, gate, 0)
    tasks = {i: spawn(infer(s, i)) for i in (1, 2, 3)}
    await queued()
    tasks[2].cancel()
    await asyncio.sleep(0)
    gate.open()
    await gather(first, tasks[1], tasks[3])
    assert tasks[2].cancelled()
    assert gate.requests == [[0], [1, 3]]


async def test_caller_cancelled_while_running_does_not_break_the_batch(make: Factory, gate: Gate) -> None:
    s, _, _ = make("max_queue_delay_microseconds: 0")
    first = await block(s, gate, 0)
    tasks = [spawn(infer(s, i)) for i in (1, 2, 3)]
    await queued()
    gate.open()
    await gather(first)
    await until(lambda: len(gate.rows) == 2, "the second batch started")
    tasks[1].cancel()
    await gather(tasks[0], tasks[2])
    assert gate.requests == [[0], [1, 2, 3]]
    second, _, _ = make("max_queue_delay_microseconds: 0")
    await gather(spawn(infer(second, 9)))


async def test_failing_batch_fails_every_request(make: Factory, gate: Gate) -> None:
    def model(inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        x = inputs["X"]
        if (x[:, 0] < 0).any():
            raise RuntimeError("a negative request poisons its batch")
        return gate(inputs, outputs)

    s, _, _ = make("max_queue_delay_microseconds: 0", fn=model)
    first = await block(s, gate, 0)
    doomed = [spawn(infer(s, i)) for i in (1, -2, 3)]
    await queued()
    gate.open()
    await gather(first)
    errors = await asyncio.wait_for(asyncio.gather(*doomed, return_exceptions=True), WAIT)
    assert all(isinstance(e, RuntimeError) for e in errors)
    assert errors[0] is errors[1] is errors[2]
    await gather(spawn(infer(s, 4)), spawn(infer(s, 5)))
    assert sorted(r for call in gate.requests[1:] for r in call) == [4, 5]


async def test_malformed_batched_output_fails_every_request(make: Factory, gate: Gate) -> None:
    calls: list[int] = []

    def model(inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        calls.append(len(inputs["X"]))
        if len(calls) == 1:
            return gate(inputs, outputs)
        return {"Y": inputs["X"][:1] * 2}

    s, _, _ = make("max_queue_delay_microseconds: 0", fn=model)
    first = await block(s, gate, 0)
    doomed = [spawn(infer(s, i)) for i in (1, 2)]
    await queued()
    gate.open()
    await gather(first)
    errors = await asyncio.wait_for(asyncio.gather(*doomed, return_exceptions=True), WAIT)
    assert all(isinstance(e, BackendError) and "malformed" in e.message for e in errors)
    assert calls == [1, 2]


@pytest.mark.parametrize("delay_us", [pytest.param(0, id="no-delay"), pytest.param(50_000, id="delay")])
async def test_queue_timeout_reject(make: Factory, gate: Gate, delay_us: int) -> None:
    s, backend, _ = make(
        f"max_queue_delay_microseconds: {delay_us}"
        " default_queue_policy { default_timeout_microseconds: 100000 timeout_action: REJECT }"
    )
    first = await block(s, gate, 0, rows=8)
    late = spawn(infer(s, 1))
    with pytest.raises(DeadlineExceededError, match="queue timeout") as info:
        await asyncio.wait_for(late, WAIT)
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert gate.active == 1, "rejected while the instance was still busy"
    gate.open()
    await gather(first, spawn(infer(s, 2)))
    assert gate.requests == [[0], [2]] and backend.calls == 2


@pytest.mark.parametrize("action", ["REJECT", "DELAY"])
async def test_queue_timeout_spares_a_running_request(make: Factory, gate: Gate, action: str) -> None:
    s, _, _ = make(f"default_queue_policy {{ default_timeout_microseconds: 50000 timeout_action: {action} }}")
    running = await block(s, gate, 0)
    await asyncio.sleep(0.2)  # the 50 ms queue timeout passes while the request is in the model
    gate.open()
    await gather(running)


async def test_queue_timeout_delay_moves_behind_its_own_level(make: Factory, gate: Gate) -> None:
    """Level 1 times out after 300 ms with DELAY; level 2 never times out. As in Triton, the delayed request goes
    behind the other requests of its level, still ahead of the lower level."""
    s, _, _ = make(
        "priority_levels: 2 default_priority_level: 2"
        " priority_queue_policy { key: 1 value { default_timeout_microseconds: 300000 timeout_action: DELAY } }",
        max_batch_size=1,
    )
    first = await block(s, gate, 0)
    delayed = spawn(infer(s, 1, priority=1))
    await asyncio.sleep(0.6)  # its queue timeout (an earlier timer) has fired
    assert not delayed.done()
    later = [spawn(infer(s, i, priority=2)) for i in (2, 3)] + [spawn(infer(s, 4, priority=1))]
    await queued()
    gate.open()
    await gather(first, delayed, *later)
    assert gate.requests == [[0], [4], [1], [2], [3]]


@pytest.mark.parametrize(
    ("policy", "timeout_us", "rejected"),
    [
        pytest.param("default_timeout_microseconds: 60000000", 50_000, True, id="lowers"),
        pytest.param("default_timeout_microseconds: 50000", 60_000_000, True, id="never-raises"),
        pytest.param("", 50_000, True, id="sets-when-no-default"),
        pytest.param("default_timeout_microseconds: 60000000", 0, False, id="zero-keeps-default"),
    ],
)
async def test_timeout_override(make: Factory, gate: Gate, policy: str, timeout_us: int, rejected: bool) -> None:
    s, _, _ = make(f"default_queue_policy {{ allow_timeout_override: true {policy} }}")
    first = await block(s, gate, 0, rows=8)
    task = spawn(infer(s, 1, timeout_us=timeout_us))
    if rejected:
        with pytest.raises(DeadlineExceededError):
            await asyncio.wait_for(task, WAIT)
        assert gate.active == 1
        gate.open()
        await gather(first)
    else:
        await asyncio.sleep(0.1)
        gate.open()
        await gather(first, task)


async def test_timeout_override_needs_allow(make: Factory, gate: Gate) -> None:
    s, _, _ = make("default_queue_policy { default_timeout_microseconds: 60000000 }")
    first = await block(s, gate, 0, rows=8)
    task = spawn(infer(s, 1, timeout_us=1))
    await asyncio.sleep(0.1)
    assert not task.done()
    gate.open()
    await gather(first, task)


# ----- lifecycle -------------------------------------------------------------------------------------------------


async def test_close_fails_queued_requests(make: Factory, gate: Gate) -> None:
    s, backend, _ = make("max_queue_delay_microseconds: 0", max_batch_size=1)
    first = await block(s, gate, 0)
    waiting = [spawn(infer(s, i)) for i in (1, 2)]
    await queued()
    await asyncio.wait_for(s.close(grace=0.05), WAIT)
    for t in waiting:
        with pytest.raises(ServerUnavailableError) as info:
            await asyncio.wait_for(t, WAIT)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(ServerUnavailableError, match="unloaded"):
        await infer(s, 3)
    gate.open()
    await gather(first)  # the execution that was running still completes
    assert backend.calls == 1


async def test_close_waits_for_queued_requests_within_grace(make: Factory, gate: Gate) -> None:
    s, backend, _ = make("max_queue_delay_microseconds: 0", max_batch_size=1)
    first = await block(s, gate, 0)
    waiting = [spawn(infer(s, i)) for i in (1, 2)]
    await queued()
    closing = spawn(s.close(grace=WAIT))
    await asyncio.sleep(0.02)
    assert not closing.done()
    gate.open()
    await gather(first, *waiting, closing)
    assert backend.calls == 3


# ----- end to end: a real server, real ONNX models ---------------------------------------------------------------


@pytest.fixture(scope="module")
def e2e_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sched") / "models"
    busy_model(root / "batched" / "1" / "model.onnx", iterations=20_000)
    write_config(
        root,
        "batched",
        """
name: "batched"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
dynamic_batching { max_queue_delay_microseconds: 20000 }
""",
    )
    busy_model(root / "held" / "1" / "model.onnx", iterations=10)
    write_config(
        root,
        "held",
        """
name: "held"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
dynamic_batching { max_queue_delay_microseconds: 1500000 default_queue_policy { max_queue_size: 2 } }
""",
    )
    busy_model(root / "waiting" / "1" / "model.onnx", iterations=10)
    write_config(
        root,
        "waiting",
        """
name: "waiting"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
dynamic_batching { max_queue_delay_microseconds: 800000 }
""",
    )
    busy_model(root / "counted" / "1" / "model.onnx", iterations=10)
    write_config(
        root,
        "counted",
        """
name: "counted"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
dynamic_batching { max_queue_delay_microseconds: 800000 }
""",
    )
    busy_model(root / "hog" / "1" / "model.onnx", iterations=40_000)
    write_config(
        root,
        "hog",
        """
name: "hog"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
""",
    )
    add_sub_model(root / "add_sub" / "1" / "model.onnx", shape=("batch", 4))
    return root


@pytest.fixture(scope="module")
def e2e_server(e2e_repo: Path) -> Iterator[ServerThread]:
    with ServerThread(e2e_repo) as s:
        yield s


def rows_of(i: int, rows: int = 1) -> np.ndarray:
    return (np.arange(rows * 4, dtype=np.float32).reshape(rows, 4) + 100 * i) / 7


def tc_input(x: np.ndarray, name: str = "INPUT0") -> tc.InferInput:
    inp = tc.InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


def statistics(server: ServerThread, model: str) -> Any:
    with tc.InferenceServerClient(server.address) as client:
        return client.get_inference_statistics(model, as_json=False).model_stats[0]


async def test_e2e_concurrent_requests_batch_on_a_busy_instance(e2e_server: ServerThread, e2e_repo: Path) -> None:
    session = ort.InferenceSession(str(e2e_repo / "batched" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    n = 12

    async def one(client: tca.InferenceServerClient, i: int) -> None:
        x = rows_of(i)
        result = await client.infer("batched", [tc_input(x)], request_id=str(i), client_timeout=WAIT)
        assert result.get_response().id == str(i)
        [expected] = session.run(["OUTPUT0"], {"INPUT0": x})
        np.testing.assert_allclose(result.as_numpy("OUTPUT0"), expected, rtol=1e-6)

    async with tca.InferenceServerClient(e2e_server.address) as client:
        await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(n))), 3 * WAIT)
    stats = statistics(e2e_server, "batched")
    sizes = {b.batch_size: b.compute_infer.count for b in stats.batch_stats}
    assert stats.inference_count == n
    assert sum(size * count for size, count in sizes.items()) == n
    assert stats.execution_count == sum(sizes.values()) < n
    assert max(sizes) > 1, f"no request shared an execution: {sizes}"


async def test_e2e_full_queue_answers_resource_exhausted(e2e_server: ServerThread) -> None:
    """`held` keeps a partial batch for 1.5 s: two requests fill its queue, a third is refused at once."""
    async with tca.InferenceServerClient(e2e_server.address) as client:
        held = [
            asyncio.ensure_future(client.infer("held", [tc_input(rows_of(i))], client_timeout=WAIT)) for i in (1, 2)
        ]
        queue = e2e_server.app.repository.get("held", "").scheduler
        # Both in the queue, where the 1.5 s delay keeps them (waited for: a loaded machine takes its time).
        await asyncio.to_thread(wait_for, "both held requests queued", lambda: queue.queued == 2)
        started = time.monotonic()
        with pytest.raises(InferenceServerException) as info:
            await client.infer("held", [tc_input(rows_of(3))], client_timeout=WAIT)
        refused_after = time.monotonic() - started
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "'held'" in info.value.message() and "max_queue_size 2" in info.value.message()
        assert not any(t.done() for t in held), "refused while the others were still queued"
        results = await asyncio.wait_for(asyncio.gather(*held), WAIT)
    for i, result in zip((1, 2), results, strict=True):
        np.testing.assert_allclose(result.as_numpy("OUTPUT0"), rows_of(i) * 2)
    assert refused_after < WAIT


async def test_e2e_deadline_while_queued_never_runs(e2e_server: ServerThread) -> None:
    """`waiting` holds a partial batch for 0.8 s; a call with a 0.6 s deadline leaves the queue without running.
    (Any deadline under 0.8 s passes in the queue; 0.2 s left a loaded machine too little to take the call in.)"""
    async with grpc.aio.insecure_channel(e2e_server.address) as channel:
        stub = GRPCInferenceServiceStub(channel)
        x = rows_of(1)
        req = pb.ModelInferRequest(model_name="waiting", id="late")
        req.inputs.add(name="INPUT0", datatype="FP32", shape=list(x.shape))
        req.raw_input_contents.append(x.tobytes())
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(req, timeout=0.6)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        req.id = "patient"
        response = await stub.ModelInfer(req, timeout=WAIT)
        assert response.id == "patient"
    stats = statistics(e2e_server, "waiting")
    assert stats.execution_count == 1 and stats.inference_count == 1
    assert [(b.batch_size, b.compute_infer.count) for b in stats.batch_stats] == [(1, 1)]


async def test_e2e_statistics_count_what_triton_counts(e2e_server: ServerThread) -> None:
    """`counted` holds a partial batch for 0.8 s. A request its caller cancels and one whose deadline passes while
    queued are failures; an invalid request is no inference at all (Triton refuses it before its statistics), and
    only an inference that ran moves last_inference."""
    x = rows_of(1)

    def request(rows: np.ndarray, request_id: str) -> pb.ModelInferRequest:
        req = pb.ModelInferRequest(model_name="counted", id=request_id)
        req.inputs.add(name="INPUT0", datatype="FP32", shape=list(rows.shape))
        req.raw_input_contents.append(rows.tobytes())
        return req

    async with grpc.aio.insecure_channel(e2e_server.address) as channel:
        stub = GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(request(np.zeros((1, 5), np.float32), "bad"), timeout=WAIT)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        before = statistics(e2e_server, "counted")
        assert (before.inference_stats.fail.count, before.last_inference) == (0, 0)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(request(x, "late"), timeout=0.6)  # any deadline under 0.8 s passes in the queue
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # Waited for, not slept: a loaded machine's server takes a call in, or lets it go, late.
        queue = e2e_server.app.repository.get("counted", "").scheduler
        await asyncio.to_thread(wait_for, "the late call out of the queue", lambda: queue.queued == 0)
        call = stub.ModelInfer(request(x, "gone"), timeout=WAIT)
        await asyncio.to_thread(wait_for, "the call to cancel in the queue", lambda: queue.queued == 1)
        call.cancel()
        response = await stub.ModelInfer(request(x, "patient"), timeout=WAIT)
        assert response.id == "patient"
    deadline = time.monotonic() + WAIT
    while (stats := statistics(e2e_server, "counted")).inference_stats.fail.count < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # the cancelled call's handler may finish after the patient one answered
    assert (stats.inference_stats.success.count, stats.inference_stats.fail.count) == (1, 2)
    assert (stats.inference_count, stats.execution_count) == (1, 1)
    assert stats.last_inference > 0


async def test_e2e_stream_answers_in_request_order(e2e_server: ServerThread) -> None:
    """As Triton answers a model that is not decoupled: a slow request first, then fast ones, come back in that
    order (the fast ones run meanwhile), each marked as its request's final response; errors keep their place."""
    slow = rows_of(1, 8)
    fast_a, fast_b = rows_of(2, 2), rows_of(3, 2)

    def request(model: str, request_id: str, inputs: dict[str, np.ndarray]) -> pb.ModelInferRequest:
        req = pb.ModelInferRequest(model_name=model, id=request_id)
        for name, x in inputs.items():
            req.inputs.add(name=name, datatype="FP32", shape=list(x.shape))
            req.raw_input_contents.append(x.tobytes())
        return req

    sent = [
        request("hog", "slow", {"INPUT0": slow}),
        request("add_sub", "fast", {"INPUT0": fast_a, "INPUT1": fast_b}),
        request("no_such_model", "missing", {"INPUT0": fast_a}),
        request("add_sub", "", {"INPUT0": fast_b, "INPUT1": fast_a}),  # no id: matched by position
    ]
    async with grpc.aio.insecure_channel(e2e_server.address) as channel:
        stub = GRPCInferenceServiceStub(channel)
        received = [r async for r in stub.ModelStreamInfer(iter(sent), timeout=3 * WAIT)]
    assert [r.infer_response.id for r in received[:3]] == ["slow", "fast", "missing"]
    assert received[3].infer_response.id != ""  # a generated id, for feedback
    assert [bool(r.error_message) for r in received] == [False, False, True, False]
    assert "no_such_model" in received[2].error_message
    assert all(r.infer_response.parameters["triton_final_response"].bool_param for r in received)
    out = np.frombuffer(received[3].infer_response.raw_output_contents[0], np.float32).reshape(2, 4)
    np.testing.assert_allclose(out, fast_b + fast_a)


async def test_e2e_other_models_are_served_while_one_is_busy(e2e_server: ServerThread) -> None:
    async with tca.InferenceServerClient(e2e_server.address) as client:
        hog = [
            asyncio.ensure_future(client.infer("hog", [tc_input(rows_of(i, 8))], client_timeout=3 * WAIT))
            for i in range(6)
        ]
        await asyncio.sleep(0.05)
        a, b = rows_of(1, 2), rows_of(2, 2)
        for _ in range(3):
            result = await client.infer("add_sub", [tc_input(a, "INPUT0"), tc_input(b, "INPUT1")], client_timeout=WAIT)
            np.testing.assert_allclose(result.as_numpy("OUTPUT0"), a + b)
        assert not all(t.done() for t in hog), "add_sub waited for the busy model"
        await asyncio.wait_for(asyncio.gather(*hog), 3 * WAIT)


# ----- model code that misbehaves (found by an audit) -------------------------------------------------------------


@pytest.mark.parametrize("error", [SystemExit(3), KeyboardInterrupt(), StopIteration()], ids=lambda e: type(e).__name__)
async def test_a_model_raising_a_base_exception_fails_its_callers_only(make: Factory, error: BaseException) -> None:
    """SystemExit or KeyboardInterrupt raised in a caller's task would stop the event loop, and a future refuses
    StopIteration (the batch went unanswered): callers get a BackendError naming the model, the next batch runs."""
    calls = []

    def model(inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        calls.append(1)
        if len(calls) == 1:
            raise error
        return {"Y": inputs["X"] * 2}

    s, _, _ = make(None, fn=model)
    with pytest.raises(BackendError) as info:
        await asyncio.wait_for(infer(s, 1), WAIT)
    assert "'m'" in info.value.message and type(error).__name__ in info.value.message
    await asyncio.wait_for(infer(s, 2), WAIT)


async def test_the_delay_counts_from_the_oldest_request(make: Factory, gate: Gate) -> None:
    """A later request of higher priority at the front of the queue must not restart the queue-delay clock of
    one that has waited longer (Triton counts from the oldest)."""
    s, _, _ = make("max_queue_delay_microseconds: 2000000 priority_levels: 2 default_priority_level: 2")
    low = spawn(infer(s, 1))
    await asyncio.sleep(1.0)  # half the delay: a loaded machine's late wake-up still finds the first one queued
    second = time.monotonic()
    high = spawn(infer(s, 2, priority=1))
    gate.open()
    await gather(low, high)
    assert gate.requests == [[2, 1]]
    # 2 s from the first request, 1 s after the second; at least 2 s after the second if it restarted the clock.
    assert time.monotonic() - second < 2.0


async def test_a_lone_request_is_checked_for_its_rows_too(make: Factory) -> None:
    """A model that answers more rows than it was given fails the request alone as it would in a batch."""

    def extra_row(inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        x = inputs["X"]
        return {"Y": np.concatenate([x, x[:1]])}

    s, _, _ = make(None, fn=extra_row)
    with pytest.raises(BackendError, match="batched output is malformed"):
        await asyncio.wait_for(infer(s, 1, rows=2), WAIT)


def test_work_still_queued_when_the_grace_period_ends_is_told_it_never_ran(tmp_path: Path) -> None:
    """A queue longer than the shutdown grace cannot all run. What has not started gets UNAVAILABLE saying it did not
    run (safe to send elsewhere) instead of gRPC's bare "Cancelling all calls", which reads the same for a request
    that was cut off mid-compute."""
    repo = tmp_path / "models"
    slow_model(repo / "slow" / "1" / "model.onnx", repeats=400)
    write_config(repo, "slow", 'name: "slow"\nmax_batch_size: 256\n')  # no batching: one request at a time
    x = np.full((256, 512), 0.01, np.float32)
    outcomes: list[str] = []
    done = threading.Semaphore(0)

    def record(result: object, error: InferenceServerException | None) -> None:
        outcomes.append("OK" if error is None else f"{error.status()} {error.message()}")
        done.release()

    with ServerThread(repo) as s:
        client = tc.InferenceServerClient(s.address)
        inp = tc.InferInput("INPUT0", [256, 512], "FP32")
        inp.set_data_from_numpy(x)
        for _ in range(8):
            client.async_infer("slow", [inp], callback=record, client_timeout=60)
        deadline = time.monotonic() + 30
        while s.app.repository.get("slow", "").stats.execution_count == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        s.run(s.app.stop(grace=0.05))
        for _ in range(8):
            assert done.acquire(timeout=30)
        client.close()
    never_ran = [o for o in outcomes if "did not run the request before the grace period ended" in o]
    assert never_ran and all(o.startswith("StatusCode.UNAVAILABLE model 'slow' version 1") for o in never_ran)
    assert "retry on another replica" in never_ran[0]
    # Besides those: answers, and at most the one request that was computing when the server stopped.
    others = [o for o in outcomes if o not in never_ran]
    assert sum(o != "OK" for o in others) <= 1, others
