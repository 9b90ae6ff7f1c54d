"""Triton ensembles (`platform: "ensemble"`): a config's steps checked and turned into a plan the pipeline runs.

Two checks, as Triton makes them. `plan_of` reads the config alone when the model loads: every step names a model
and maps inputs and outputs, each ensemble tensor is written by one step only, every output is written, and no
tensor is left unused (so there is no cycle either, as a tensor on a cycle is never ready). `bind` then checks the
steps against the configs of the composing models as they are loaded: names, datatypes, dims and max_batch_size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tensorgate.protos import model_config_pb2 as mc
from tensorgate.server.errors import InvalidConfigError

ENSEMBLE_PLATFORM = "ensemble"
ENSEMBLE_SOURCE = "the ensemble"


@dataclass(frozen=True, slots=True)
class Step:
    """One composing model call: its inputs are read from ensemble tensors, its outputs written to them."""

    index: int
    model: str
    version: str
    """The composing model's version as a request names it: "" for the latest (Triton's -1, and 0: a config that
    leaves model_version out, which proto3 cannot tell from 0)."""
    inputs: dict[str, str]
    """Composing model input -> ensemble tensor."""
    outputs: dict[str, str]
    """Composing model output -> ensemble tensor."""

    @property
    def ref(self) -> str:
        return f"step {self.index} (model '{self.model}')"


@dataclass(frozen=True, slots=True)
class EnsemblePlan:
    steps: tuple[Step, ...]

    @property
    def models(self) -> list[tuple[str, str]]:
        """(model, version) of every step, in step order, without repeats."""
        return list(dict.fromkeys((s.model, s.version) for s in self.steps))


def is_ensemble(config: mc.ModelConfig) -> bool:
    return config.platform == ENSEMBLE_PLATFORM


def plan_of(config: mc.ModelConfig) -> EnsemblePlan:
    """The steps of an ensemble config, checked on their own (InvalidConfigError names the rule broken)."""
    name = config.name

    def bad(problem: str) -> InvalidConfigError:
        return InvalidConfigError(name, problem)

    if not config.HasField("ensemble_scheduling"):
        raise bad('platform "ensemble" needs an ensemble_scheduling block')
    for field, what in (("instance_group", "instance_group"), ("model_warmup", "model_warmup")):
        if len(getattr(config, field)):
            raise bad(f"an ensemble has no {what} of its own (its composing models have)")
    if config.HasField("optimization"):
        raise bad("an ensemble has no optimization of its own (its composing models have)")
    if not config.input or not config.output:
        raise bad("an ensemble must declare its inputs and outputs: there is no model file to complete them from")
    steps: list[Step] = []
    written: dict[str, int] = {}
    for i, step in enumerate(config.ensemble_scheduling.step):
        where = f"step {i}"
        if not step.model_name:
            raise bad(f"{where} has no model_name")
        if step.model_name == name:
            raise bad(f"{where} names the ensemble itself")
        if step.model_namespace:
            raise bad(f"{where}: model namespaces are not supported")
        if not step.input_map or not step.output_map:
            raise bad(f"{where} (model '{step.model_name}') must map at least one input and one output")
        if step.model_version < -1:
            raise bad(f"{where} (model '{step.model_name}'): model_version must be -1 (the latest) or a version")
        for tensor in step.output_map.values():
            if tensor in written:
                raise bad(f"ensemble tensor '{tensor}' is written by step {written[tensor]} and {where}")
            written[tensor] = i
        steps.append(
            Step(
                index=i,
                model=step.model_name,
                version="" if step.model_version <= 0 else str(step.model_version),
                # Sorted: protobuf maps have no order, and a step's first bad input should be the same every time.
                inputs=dict(sorted(step.input_map.items())),
                outputs=dict(sorted(step.output_map.items())),
            )
        )
    if not steps:
        raise bad("ensemble_scheduling has no step")
    inputs = [t.name for t in config.input]
    for tensor in inputs:
        if tensor in written:
            raise bad(f"ensemble input '{tensor}' is also written by step {written[tensor]}")
    # Data flow: a step runs once every tensor it reads is ready. What never becomes ready is on a cycle or reads a
    # tensor nothing writes.
    ready = set(inputs)
    pending = list(steps)
    while True:
        runnable = [s for s in pending if set(s.inputs.values()) <= ready]
        if not runnable:
            break
        for s in runnable:
            ready.update(s.outputs.values())
            pending.remove(s)
    for s in pending:
        missing = sorted(set(s.inputs.values()) - ready)
        raise bad(f"{s.ref} reads {missing}, which no input or earlier step provides (or that form a cycle)")
    read = {t for s in steps for t in s.inputs.values()}
    outputs = {t.name for t in config.output}
    for tensor in outputs:
        if tensor not in written:
            raise bad(f"ensemble output '{tensor}' is not written by any step")
    for tensor in inputs:
        if tensor not in read:
            raise bad(f"ensemble input '{tensor}' is not used by any step")
    for tensor, i in written.items():
        if tensor not in read and tensor not in outputs:
            raise bad(f"ensemble tensor '{tensor}' written by step {i} is neither read nor an output")
    return EnsemblePlan(tuple(steps))


@dataclass(frozen=True, slots=True)
class _Tensor:
    data_type: int
    dims: tuple[int, ...]
    full: tuple[int, ...]
    """dims with the batch dimension (-1) in front when its model batches."""
    source: str


def _dims_agree(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) == len(b) and all(x == y or x == -1 or y == -1 for x, y in zip(a, b, strict=True))


def bind(config: mc.ModelConfig, plan: EnsemblePlan, composing: Callable[[Step], mc.ModelConfig]) -> None:
    """Check the steps against their models' configs (`composing(step)` returns the config it will be served
    with). Datatypes must be equal, and dims equal where both are fixed, either per row or with the batch dimension
    in front: a model that does not batch may take [-1, d...] where the ensemble batches [d...]."""
    name = config.name
    mbs = config.max_batch_size
    tensors: dict[str, _Tensor] = {}

    def note(tensor: str, io: mc.ModelInput | mc.ModelOutput, batching: bool, source: str, where: str) -> None:
        # The ensemble's own tensors are what its callers send, after any reshape; a composing model's, its dims.
        own = source == ENSEMBLE_SOURCE
        dims = tuple(io.reshape.shape) if own and io.HasField("reshape") else tuple(io.dims)
        new = _Tensor(io.data_type, dims, ((-1,) if batching else ()) + dims, source)
        old = tensors.get(tensor)
        if old is None:
            tensors[tensor] = new
            return
        if old.data_type != new.data_type:
            raise InvalidConfigError(
                name,
                f"{where}: ensemble tensor '{tensor}' is {mc.DataType.Name(old.data_type)} in {old.source} but "
                f"{mc.DataType.Name(new.data_type)} in {new.source}",
            )
        if not _dims_agree(old.dims, new.dims) and not _dims_agree(old.full, new.full):
            raise InvalidConfigError(
                name,
                f"{where}: ensemble tensor '{tensor}' has shape {list(old.full)} in {old.source} but {list(new.full)} "
                f"in {new.source}",
            )

    for i in config.input:
        note(i.name, i, mbs > 0, ENSEMBLE_SOURCE, "input")
    for o in config.output:
        note(o.name, o, mbs > 0, ENSEMBLE_SOURCE, "output")
    for step in plan.steps:
        model = composing(step)
        source = f"model '{step.model}'"
        if model.model_transaction_policy.decoupled:
            raise InvalidConfigError(
                name, f"{step.ref}: model '{step.model}' is decoupled (it answers over ModelStreamInfer only)"
            )
        if model.max_batch_size != 0 and model.max_batch_size < mbs:
            raise InvalidConfigError(
                name,
                f"{step.ref}: the ensemble's max_batch_size is {mbs} but the model's is {model.max_batch_size}",
            )
        batching = model.max_batch_size > 0
        inputs = {i.name: i for i in model.input}
        for model_input, tensor in step.inputs.items():
            if model_input not in inputs:
                raise InvalidConfigError(
                    name, f"{step.ref} maps ensemble tensor '{tensor}' to '{model_input}', which is no input of it"
                )
            note(tensor, inputs[model_input], batching, source, step.ref)
        for i in model.input:
            if i.name not in step.inputs and not i.optional:
                raise InvalidConfigError(name, f"{step.ref} does not map the model's required input '{i.name}'")
        outputs = {o.name: o for o in model.output}
        for model_output, tensor in step.outputs.items():
            if model_output not in outputs:
                raise InvalidConfigError(
                    name, f"{step.ref} maps output '{model_output}', which the model does not have, to '{tensor}'"
                )
            note(tensor, outputs[model_output], batching, source, step.ref)
