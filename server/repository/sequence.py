"""A stateful model's `sequence_batching` block, read and checked once at load (Triton's sequence batcher).

The scheduler, not the caller, feeds a sequence model its control tensors (START, END, READY, CORRID) and its
implicit state (each `state` input gets the previous request's `output_name` output). So those tensors are left out
of the config's inputs and outputs, which are what callers may send and ask for, and checked here against the
model file instead: a mistyped control would otherwise fail every request of every sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tensorgate.protos import model_config_pb2 as mc
from tensorgate.server.datatypes import BY_CONFIG_TYPE, DataType, config_type_name
from tensorgate.server.errors import InvalidConfigError
from tensorgate.server.repository.config import TensorInfo, dims_fit, shape_text
from tensorgate.server.repository.paths import inside

DEFAULT_IDLE_US = 1_000_000
"""Triton's default max_sequence_idle_microseconds."""

_Kind = mc.ModelSequenceBatching.Control
KIND_NAMES = {
    _Kind.CONTROL_SEQUENCE_START: "START",
    _Kind.CONTROL_SEQUENCE_END: "END",
    _Kind.CONTROL_SEQUENCE_READY: "READY",
    _Kind.CONTROL_SEQUENCE_CORRID: "CORRID",
}
_CORRID_TYPES = (mc.TYPE_UINT64, mc.TYPE_INT64, mc.TYPE_UINT32, mc.TYPE_INT32, mc.TYPE_STRING)
INITIAL_STATE_DIR = "initial_state"
"""Where a state's `initial_state { data_file }` lives, inside the version directory (as in Triton)."""


@dataclass(frozen=True, slots=True)
class Control:
    """One control tensor: the model input that carries it, and its false and true values in the model's type
    (unused for CORRID, which carries the correlation ID)."""

    name: str
    kind: str
    """"START", "END", "READY" or "CORRID"."""
    dtype: np.dtype[np.generic]
    false: object = None
    true: object = None


@dataclass(frozen=True, slots=True)
class State:
    """An implicit state: the model reads `input_name`, writes the next value to `output_name`."""

    input_name: str
    output_name: str
    initial: np.ndarray
    """A sequence's state before its first request, without the batch dimension."""


@dataclass(frozen=True, slots=True)
class SequenceSpec:
    idle_ns: int
    """A sequence with nothing to run for this long is ended and its state dropped."""
    controls: tuple[Control, ...]
    states: tuple[State, ...]
    max_sequences: int
    """Sequences that may be active at once; a new one waits (backlog) until one ends or goes idle."""
    string_ids: bool | None
    """What the CORRID control takes: string correlation IDs (True), integers (False), or either (no CORRID)."""


def scheduler_tensors(config: mc.ModelConfig) -> tuple[frozenset[str], frozenset[str]]:
    """The model inputs and outputs that the sequence scheduler feeds and reads, which callers never see (a
    state output listed in the config's outputs may be asked for, as in Triton, to look at the state)."""
    sb = config.sequence_batching
    inputs = {c.name for c in sb.control_input} | {s.input_name for s in sb.state}
    listed = {o.name for o in config.output}
    return frozenset(inputs), frozenset(s.output_name for s in sb.state if s.output_name not in listed)


def _control(
    model: str, entry: mc.ModelSequenceBatching.ControlInput, actual: TensorInfo | None, batching: bool
) -> Control:
    where = f"sequence_batching control_input '{entry.name}'"
    if len(entry.control) != 1:
        raise InvalidConfigError(model, f"{where} must have exactly one control, has {len(entry.control)}")
    c = entry.control[0]
    kind = KIND_NAMES.get(c.kind)
    if kind is None:
        raise InvalidConfigError(model, f"{where} has an unknown control kind {c.kind}")
    config_type: int
    if kind == "CORRID":
        if c.data_type not in _CORRID_TYPES:
            allowed = ", ".join(mc.DataType.Name(t) for t in _CORRID_TYPES)
            raise InvalidConfigError(model, f"{where}: CORRID data_type must be one of {allowed}")
        config_type, false, true = c.data_type, None, None
    else:
        listed: list[tuple[int, list[float] | list[int] | list[bool]]] = [
            (mc.TYPE_FP32, list(c.fp32_false_true)),
            (mc.TYPE_INT32, list(c.int32_false_true)),
            (mc.TYPE_BOOL, list(c.bool_false_true)),
        ]
        given = [(t, values) for t, values in listed if values]
        if len(given) != 1 or len(given[0][1]) != 2:
            raise InvalidConfigError(
                model,
                f"{where}: a {kind} control needs exactly one of fp32_false_true, int32_false_true or "
                "bool_false_true, with two values (false, then true)",
            )
        config_type, (false, true) = given[0][0], given[0][1]
    if actual is None:
        raise InvalidConfigError(model, f"{where} is not an input of the model")
    model_dims = actual.shape[1:] if batching else actual.shape
    if not dims_fit([1], model_dims):
        # The scheduler feeds one value per request: [batch, 1], or [1] for a model without a batch dimension.
        raise InvalidConfigError(
            model,
            f"{where} has {'per-row ' if batching else ''}shape {shape_text(model_dims)} in the model; a control "
            "takes [1]",
        )
    if actual.data_type != config_type:
        raise InvalidConfigError(
            model,
            f"{where} is {config_type_name(actual.data_type)} in the model but its {kind} control makes it "
            f"{config_type_name(config_type)}",
        )
    dtype = BY_CONFIG_TYPE[config_type].np_dtype
    if kind == "CORRID":
        return Control(entry.name, kind, dtype)
    return Control(entry.name, kind, dtype, dtype.type(false), dtype.type(true))


def _initial(model: str, state: mc.ModelSequenceBatching.State, version_dir: Path) -> np.ndarray:
    """The state before a sequence's first request: `initial_state`'s zeros or file; without one, zeros shaped as
    Triton shapes its (uninitialized) first state, a variable dimension 1 long."""
    where = f"sequence_batching state '{state.input_name}'"
    dt = BY_CONFIG_TYPE[state.data_type]
    if not state.initial_state:
        return _zeros([d if d >= 0 else 1 for d in state.dims], dt)
    if len(state.initial_state) > 1:
        raise InvalidConfigError(model, f"{where} has {len(state.initial_state)} initial_state entries; at most one")
    init = state.initial_state[0]
    if init.data_type not in (mc.TYPE_INVALID, state.data_type):
        raise InvalidConfigError(
            model, f"{where}: initial_state is {config_type_name(init.data_type)}, the state is {dt.name}"
        )
    dims = list(init.dims)
    if any(d < 0 for d in dims) or not dims_fit(state.dims, dims):
        raise InvalidConfigError(
            model, f"{where}: initial_state dims {dims} must be fixed and fit the state's dims {list(state.dims)}"
        )
    choice = init.WhichOneof("state_data")
    if choice == "data_file":
        if dt.name == "BYTES":
            raise InvalidConfigError(model, f"{where}: a BYTES initial_state can only be zero_data")
        path = inside(version_dir / INITIAL_STATE_DIR, init.data_file)
        if path is None or not path.is_file():
            raise InvalidConfigError(
                model, f"{where}: initial_state data_file '{init.data_file}' is not a file in {INITIAL_STATE_DIR}/"
            )
        data = path.read_bytes()
        want = int(np.prod(dims, dtype=np.int64)) * dt.itemsize
        if len(data) < want:  # as Triton: a longer file is read up to what the dims need
            raise InvalidConfigError(
                model,
                f"{where}: initial_state data_file '{init.data_file}' has {len(data)} bytes, dims {dims} of "
                f"{dt.name} need {want}",
            )
        return np.frombuffer(data[:want], dtype=dt.np_dtype).reshape(dims).copy()
    if choice != "zero_data" or not init.zero_data:
        raise InvalidConfigError(model, f"{where}: initial_state needs zero_data: true or a data_file")
    return _zeros(dims, dt)


def _zeros(shape: list[int], dt: DataType) -> np.ndarray:
    """A zero state; empty elements for BYTES."""
    if dt.name == "BYTES":
        return np.full(shape, b"", dtype=object)
    return np.zeros(shape, dtype=dt.np_dtype)


def _state(
    model: str,
    state: mc.ModelSequenceBatching.State,
    inputs: dict[str, TensorInfo],
    outputs: dict[str, TensorInfo],
    batching: bool,
    version_dir: Path,
) -> State:
    where = f"sequence_batching state '{state.input_name}'"
    if state.data_type not in BY_CONFIG_TYPE:
        raise InvalidConfigError(model, f"{where} has a type tensorgate cannot serve")
    if not state.dims:
        raise InvalidConfigError(model, f"{where} needs dims")
    for name, tensors, kind in ((state.input_name, inputs, "input"), (state.output_name, outputs, "output")):
        actual = tensors.get(name)
        if actual is None:
            raise InvalidConfigError(model, f"{where}: '{name}' is not an {kind} of the model")
        if actual.data_type != state.data_type:
            raise InvalidConfigError(
                model,
                f"{where}: {kind} '{name}' is {config_type_name(actual.data_type)} in the model, "
                f"{config_type_name(state.data_type)} in the config",
            )
        model_dims = actual.shape[1:] if batching else actual.shape
        if not dims_fit(state.dims, model_dims):
            raise InvalidConfigError(
                model,
                f"{where}: dims {list(state.dims)} do not fit {kind} '{name}' of the model "
                f"({'per-row ' if batching else ''}shape {shape_text(model_dims)})",
            )
    return State(state.input_name, state.output_name, _initial(model, state, version_dir))


def check_sequence_config(config: mc.ModelConfig) -> None:
    """What any sequence model's config must satisfy, before its model file is read."""
    model, sb = config.name, config.sequence_batching
    if sb.iterative_sequence:
        raise InvalidConfigError(model, "sequence_batching iterative_sequence is not supported (decoupled models)")
    if config.response_cache.enable:
        raise InvalidConfigError(
            model, "response_cache cannot be enabled for a sequence model: its answers depend on the sequence"
        )
    names = [c.name for c in sb.control_input] + [s.input_name for s in sb.state]
    listed = {t.name for t in config.input}
    for name in names:
        if name in listed:
            raise InvalidConfigError(
                model,
                f"'{name}' is a sequence_batching control or state input, which the scheduler feeds; it cannot "
                "also be listed in input",
            )
    if len(set(names)) != len(names):
        raise InvalidConfigError(model, "a sequence_batching control or state input is named twice")


def sequence_spec(
    config: mc.ModelConfig,
    inputs: Sequence[TensorInfo],
    outputs: Sequence[TensorInfo],
    version_dir: Path,
) -> SequenceSpec:
    """The completed config's sequence batching (`check_sequence_config` has passed it before autocomplete),
    checked against the model file's tensors. The served config gets the idle time in force written in, as
    Triton's does."""
    model, sb = config.name, config.sequence_batching
    if sb.max_sequence_idle_microseconds == 0:
        sb.max_sequence_idle_microseconds = DEFAULT_IDLE_US
    by_input = {t.name: t for t in inputs}
    batching = config.max_batch_size > 0
    controls = tuple(_control(model, entry, by_input.get(entry.name), batching) for entry in sb.control_input)
    kinds = [c.kind for c in controls]
    for kind in set(kinds):
        if kinds.count(kind) > 1:
            raise InvalidConfigError(model, f"sequence_batching has {kinds.count(kind)} {kind} controls; at most one")
    by_output = {t.name: t for t in outputs}
    states = tuple(_state(model, s, by_input, by_output, batching, version_dir) for s in sb.state)
    # As Triton's slots: per instance, max_batch_size (Direct: a batch slot per sequence), or Oldest's
    # max_candidate_sequences when it is set.
    per_instance = max(config.max_batch_size, 1)
    if sb.WhichOneof("strategy_choice") == "oldest" and sb.oldest.max_candidate_sequences > 0:
        per_instance = sb.oldest.max_candidate_sequences
    max_sequences = per_instance * (sum(g.count for g in config.instance_group) or 1)
    corrid = next((c for c in controls if c.kind == "CORRID"), None)
    return SequenceSpec(
        idle_ns=sb.max_sequence_idle_microseconds * 1000,
        controls=controls,
        states=states,
        max_sequences=max_sequences,
        string_ids=None if corrid is None else corrid.dtype == np.dtype(object),
    )
