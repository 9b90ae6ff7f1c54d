"""Running an ensemble's steps: each once the tensors it reads are ready, independent steps at the same time.

Only the steps that lead to the outputs asked for run, as in Triton. A step reading an optional ensemble input
that the caller left out runs without it (its model then decides). The first step to fail ends the request: the
steps still running are cancelled, and its error is the request's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence

import numpy as np

from tensorgate.server.pipeline.validate import dims_match
from tensorgate.server.repository.ensemble import EnsemblePlan, Step

StepRunner = Callable[[Step, dict[str, np.ndarray]], Awaitable[dict[str, np.ndarray]]]
"""Runs one step on the tensors it reads (model input name -> array); returns ensemble tensor name -> array."""


def fit_batching(array: np.ndarray, dims: tuple[int, ...], batching: bool, batch: int) -> np.ndarray:
    """A tensor for a model input (or an ensemble output) of config `dims`, as Triton's ensembles pass tensors
    between models that batch and models that do not (its ReshapeTensorDims). `batch` is the rows of the request
    that made the tensor, 0 when that model did not batch. A tensor without a batch dimension for a batching model
    gets one of 1, when its shape is the dims; a batched tensor of one row for a model that does not batch loses it,
    when its shape is not the dims. Any other tensor is passed as it is (and validated as such)."""
    if batching == (batch != 0):
        return array
    shape = array.shape
    if batching:
        return array.reshape((1, *shape)) if dims_match(shape, dims) else array
    if batch == 1 and not dims_match(shape, dims):
        return array.reshape(shape[1:])
    return array


def needed_steps(plan: EnsemblePlan, outputs: Sequence[str]) -> list[Step]:
    """The steps that write `outputs` or what they read, in step order."""
    writer = {tensor: step for step in plan.steps for tensor in step.outputs.values()}
    chosen: set[int] = set()
    stack = list(outputs)
    while stack:
        step = writer.get(stack.pop())
        if step is not None and step.index not in chosen:
            chosen.add(step.index)
            stack.extend(step.inputs.values())
    return [s for s in plan.steps if s.index in chosen]


async def run_plan(
    plan: EnsemblePlan, inputs: Mapping[str, np.ndarray], outputs: Sequence[str], run_step: StepRunner
) -> dict[str, np.ndarray]:
    """The ensemble's `outputs` computed from its `inputs` (ensemble tensor names both)."""
    written = {tensor for step in plan.steps for tensor in step.outputs.values()}
    tensors = dict(inputs)
    waiting = needed_steps(plan, outputs)
    running: dict[asyncio.Future[dict[str, np.ndarray]], Step] = {}

    def ready(step: Step) -> bool:
        return all(t in tensors or t not in written for t in step.inputs.values())

    def feed(step: Step) -> dict[str, np.ndarray]:
        return {name: tensors[t] for name, t in step.inputs.items() if t in tensors}

    try:
        while waiting or running:
            runnable = [s for s in waiting if ready(s)]
            for step in runnable:
                waiting.remove(step)
            if len(runnable) == 1 and not running:  # a chain: no task needed for one step at a time
                tensors.update(await run_step(runnable[0], feed(runnable[0])))
                continue
            for step in runnable:
                running[asyncio.ensure_future(run_step(step, feed(step)))] = step
            if not running:
                raise RuntimeError(f"ensemble steps {[s.index for s in waiting]} can never run")  # checked at load
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                del running[task]
                tensors.update(task.result())
    finally:
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
    return {name: tensors[name] for name in outputs}
