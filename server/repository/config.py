"""Reading `config.pbtxt` and completing it from the model file, as Triton's onnxruntime backend does.

The ModelConfig protobuf is the config format itself, so the repository keeps it as the model's effective
configuration (returned verbatim by the ModelConfig RPC) instead of copying it into look-alike classes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format

from tensorgate.protos import model_config_pb2 as mc
from tensorgate.protos.tensors import BY_CONFIG_TYPE
from tensorgate.server.decimal_text import parse_canonical
from tensorgate.server.errors import InvalidConfigError, ModelLoadError
from tensorgate.server.repository.ensemble import ENSEMBLE_PLATFORM
from tensorgate.server.repository.paths import inside

CONFIG_FILE = "config.pbtxt"
BOM = "\ufeff"
ONNX_PLATFORM = "onnxruntime_onnx"
ONNX_BACKEND = "onnxruntime"
TRITON_BACKEND = "tensorgate_triton"
"""A model run by an upstream Triton Inference Server (server/backends/triton.py)."""
DEFAULT_ONNX_FILENAME = "model.onnx"
SUPPORTED_BACKENDS = (
    f'backend "{ONNX_BACKEND}" or platform "{ONNX_PLATFORM}", platform "{ENSEMBLE_PLATFORM}", and backend '
    f'"{TRITON_BACKEND}" for a model on an upstream Triton'
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """A model file's view of one input or output: element type and shape (None for a dynamic dimension)."""

    name: str
    data_type: int
    shape: tuple[int | None, ...]
    default: bool = False
    """An ONNX initializer that is also a graph input: the model has a value for it, which a request may override
    (Triton's initializer_as_input). It is an input only where config.pbtxt lists it, and an optional one."""


def parse_config(model: str, text: str) -> tuple[mc.ModelConfig, bool]:
    """Parse config text; also says whether `max_batch_size` was written (proto3 cannot tell 0 from unset)."""
    config = mc.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        # protobuf prefixes its message with a bare "3:57 : "; spell the position out for whoever edits the file.
        detail, where = str(exc), CONFIG_FILE
        if exc.GetLine() is not None:
            detail = detail.removeprefix(f"{exc.GetLine()}:{exc.GetColumn()} : ")
            where = f"{CONFIG_FILE} line {exc.GetLine()}, column {exc.GetColumn()}"
        if text.startswith(BOM) and (exc.GetLine(), exc.GetColumn()) == (1, 1):
            # Written by Windows tools (Notepad, PowerShell's Out-File); protobuf's own message quotes it as is,
            # an invisible character, and reads as if the file's first word were wrong.
            detail = detail.replace(BOM, "\\ufeff") + (
                " (the file starts with a UTF-8 byte-order mark, which protobuf's text format refuses, as Triton "
                "does: save it as UTF-8 without one)"
            )
        raise InvalidConfigError(model, f"{where}: {detail}") from exc
    if config.name and config.name != model:
        raise InvalidConfigError(model, f"config names the model '{config.name}' but its directory is '{model}'")
    config.name = model
    return config, _writes_max_batch_size(text)


def _writes_max_batch_size(text: str) -> bool:
    """Whether the text sets the top-level max_batch_size, read with protobuf's own tokenizer so that comments
    (`# max_batch_size: 16`) and strings do not count."""
    tokens = text_format.Tokenizer(text.split("\n"))  # as text_format.Parse splits it: "\n" only
    depth = 0
    while not tokens.AtEnd():
        token = tokens.token
        if token in ("{", "<", "["):
            depth += 1
        elif token in ("}", ">", "]"):
            depth -= 1
        elif depth == 0 and token == "max_batch_size":
            return True
        tokens.NextToken()
    return False


def read_config(model_dir: Path) -> tuple[mc.ModelConfig, bool]:
    """The model's config.pbtxt, or an empty config to be completed from the model file."""
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        config = mc.ModelConfig(name=model_dir.name)
        return config, False
    if inside(model_dir, CONFIG_FILE) is None:
        # A link out of the model's directory: a parse error quotes the file, and goes to whoever asked to load.
        raise InvalidConfigError(model_dir.name, f"{CONFIG_FILE} leaves the model's directory")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        why = exc.strerror or type(exc).__name__  # not str(exc): it holds the server's absolute path
        raise InvalidConfigError(model_dir.name, f"cannot read {CONFIG_FILE}: {why}") from exc
    except UnicodeDecodeError as exc:
        raise InvalidConfigError(model_dir.name, f"cannot read {CONFIG_FILE}: {exc}") from exc
    return parse_config(model_dir.name, text)


BOOL_SPELLINGS = "true or false (1/0, on/off)"


def parse_bool(text: str) -> bool | None:
    """A boolean as Triton's backends spell one (ParseBoolValue): true/on/1 or false/off/0, in any case, spaces
    around ignored; None for anything else."""
    value = text.strip().lower()
    return True if value in ("true", "on", "1") else False if value in ("false", "off", "0") else None


def bool_parameter(config: mc.ModelConfig, key: str, version: int | None = None) -> bool | None:
    """`parameters { key }` read with `parse_bool`, None when unset or blank. Any other value fails the load,
    naming the model, the key and the value. Every boolean parameter, Triton's and tensorgate's own, is read here,
    so that a spelling that works for one key works for all of them."""
    param = config.parameters.get(key)
    raw = param.string_value if param is not None else ""
    if not raw.strip():
        return None
    value = parse_bool(raw)
    if value is None:
        raise ModelLoadError(config.name, version, f"parameter '{key}' must be {BOOL_SPELLINGS}, got '{raw}'")
    return value


def check_backend(config: mc.ModelConfig) -> None:
    """ONNX models run locally, `tensorgate_triton` ones on an upstream Triton, ensembles through their composing
    models; say so clearly for anything else. Sequence (stateful) models are ONNX models, whose state tensorgate
    keeps, or remote ones, whose upstream keeps it (tensorgate forwards their sequence parameters); an ensemble is
    stateful through its steps, never itself."""
    backend, platform = config.backend, config.platform
    if (backend and platform) and (backend in (ONNX_BACKEND, TRITON_BACKEND) or platform == ENSEMBLE_PLATFORM):
        # As Triton ("unexpected 'platform' and 'backend' pair"): both written, and they name different things.
        if (backend, platform) != (ONNX_BACKEND, ONNX_PLATFORM):
            raise InvalidConfigError(
                config.name,
                f"unexpected 'platform' and 'backend' pair: platform '{platform}' does not go with backend "
                f"'{backend}' (supported: {SUPPORTED_BACKENDS}; write only one of the two)",
            )
    if config.HasField("sequence_batching") and (
        config.platform == ENSEMBLE_PLATFORM or config.backend not in ("", ONNX_BACKEND, TRITON_BACKEND)
    ):
        raise InvalidConfigError(
            config.name,
            'sequence_batching is supported for ONNX models (backend "onnxruntime") and models on an upstream '
            f"Triton (backend \"{TRITON_BACKEND}\"), not for '{config.backend or config.platform}'",
        )
    if config.model_transaction_policy.decoupled and config.backend != TRITON_BACKEND:
        # An ONNX model answers each request once, and an ensemble runs its steps once each: served as decoupled,
        # neither could answer ModelInfer (which refuses decoupled models) nor stream more than one response.
        raise InvalidConfigError(
            config.name,
            f'a decoupled model is served for backend "{TRITON_BACKEND}" only (an upstream Triton\'s decoupled '
            f"model, relayed), not for '{config.backend or config.platform or ONNX_BACKEND}'",
        )
    if config.HasField("ensemble_scheduling") and config.platform != ENSEMBLE_PLATFORM:
        raise InvalidConfigError(config.name, 'ensemble_scheduling needs platform "ensemble"')
    if config.platform == ENSEMBLE_PLATFORM and config.backend == "":
        return
    if config.backend == TRITON_BACKEND and config.platform == "":
        return
    if config.backend in ("", ONNX_BACKEND) and config.platform in ("", ONNX_PLATFORM):
        config.backend = ONNX_BACKEND
        config.platform = ONNX_PLATFORM
        return
    raise InvalidConfigError(
        config.name, f"unsupported backend '{config.backend or config.platform}' (supported: {SUPPORTED_BACKENDS})"
    )


UNSUPPORTED = "is not supported by tensorgate"
LOCAL_KINDS = "KIND_AUTO, KIND_CPU and KIND_GPU"


def check_supported(config: mc.ModelConfig) -> None:
    """Refuse the Triton fields tensorgate does not implement rather than serve as if they were not written: each
    changes what the model is fed (ragged batches, batch_input tensors, shape tensors), what it returns
    (batch_output), what it can run (custom operator libraries), which file or device serves it
    (cc_model_filenames, host_policy, KIND_MODEL on a model run here, passive instances), whether its files are
    checked (repository agents) or the order its answers keep, so ignoring it would answer wrongly or silently
    drop a control. Checked on the config as written, once per load: `rate_limiter`, which Triton too ignores
    unless started with --rate-limit, is only warned about."""
    found = [
        f"{field} ({kind} '{t.name}') {UNSUPPORTED}"
        for kind, tensors in (("input", config.input), ("output", config.output))
        for t in tensors
        for field in ("allow_ragged_batch", "is_shape_tensor")
        if getattr(t, field, False)
    ]
    found += [f"{field} {UNSUPPORTED}" for field in ("batch_input", "batch_output") if getattr(config, field)]
    if config.model_operations.op_library_filename:
        found.append(f"model_operations {UNSUPPORTED}")
    if config.cc_model_filenames:
        found.append(f"cc_model_filenames {UNSUPPORTED} (name the one model file with default_model_filename)")
    if config.model_repository_agents.agents:
        agents = ", ".join(f"'{a.name}'" for a in config.model_repository_agents.agents)
        found.append(
            f"model_repository_agents (agent {agents}) {UNSUPPORTED}: nothing would run the agent, so a checksum "
            'it checks would go unchecked; pin the model file\'s digest with parameters { key: "tensorgate.sha256" '
            'value: { string_value: "<sha256 hex>" } } instead'
        )
    found += _unsupported_groups(config)
    found += _unsupported_ordering(config)
    found += _too_many_instances(config)
    if found:
        raise InvalidConfigError(config.name, "; ".join(found))
    limited = [g.name or str(i) for i, g in enumerate(config.instance_group) if g.HasField("rate_limiter")]
    if limited:
        log.warning(
            "model '%s': instance_group %s sets rate_limiter, which has no effect: tensorgate has no rate limiter "
            "(as Triton ignores it unless started with --rate-limit); instances take batches as soon as they are free",
            config.name,
            ", ".join(limited),
        )


def _unsupported_groups(config: mc.ModelConfig) -> list[str]:
    """Instance group fields that change what would run. KIND_MODEL lets the backend place the model itself: a
    model on an upstream Triton is placed by its upstream, but an ONNX model run here would be placed on the CPU
    whatever it asked for."""
    found: list[str] = []
    for i, group in enumerate(config.instance_group):
        which = f"instance_group '{group.name}'" if group.name else f"instance_group {i}"
        if group.passive:
            found.append(f"passive ({which}) {UNSUPPORTED}")
        if group.host_policy:
            found.append(f"host_policy ({which}) {UNSUPPORTED}")
        if group.kind == mc.ModelInstanceGroup.KIND_MODEL and config.backend != TRITON_BACKEND:
            found.append(
                f"kind KIND_MODEL ({which}) {UNSUPPORTED} for a model it runs itself (it takes {LOCAL_KINDS}; "
                f'KIND_MODEL is for a model on an upstream Triton, backend "{TRITON_BACKEND}")'
            )
    return found


MAX_INSTANCES = 1024
"""Instances a model version may have: each is a thread of the server, and threads are a resource of the whole
process (about 22,000 here). A load that asked for 100,000 ran out of them half way: the threads it had started
were never stopped, so every later load and worker-thread hand-off failed INTERNAL until the process restarted."""


def _too_many_instances(config: mc.ModelConfig) -> list[str]:
    total = sum(max(g.count, 0) for g in config.instance_group)
    if total <= MAX_INSTANCES:
        return []
    return [
        f"instance_group counts add up to {total} instances, above the {MAX_INSTANCES} a model may have (each "
        "instance is a thread of the server)"
    ]


def _unsupported_ordering(config: mc.ModelConfig) -> list[str]:
    """`preserve_ordering` as Triton takes it: it refuses the settings that would let a later request overtake an
    earlier one (more than one priority level, a DELAY timeout action). tensorgate answers a stream in request
    order anyway; a decoupled model's responses are relayed as its upstream sends them, which no setting here
    could order, so preserve_ordering is refused there."""
    db = config.dynamic_batching
    oldest = config.sequence_batching.oldest
    found: list[str] = []
    if db.preserve_ordering:
        if db.priority_levels > 1:
            found.append(
                f"dynamic_batching has priority_levels {db.priority_levels}, but only one priority level is allowed "
                "when 'preserve_ordering' is true (as in Triton)"
            )
        policies = [("default_queue_policy", db.default_queue_policy)]
        policies += [(f"priority_queue_policy {level}", p) for level, p in sorted(db.priority_queue_policy.items())]
        for where, policy in policies:
            if policy.timeout_action == mc.ModelQueuePolicy.DELAY and policy.default_timeout_microseconds != 0:
                found.append(
                    f"dynamic_batching {where} has timeout_action DELAY, which a queue policy cannot have when "
                    "'preserve_ordering' is true (as in Triton)"
                )
    if config.model_transaction_policy.decoupled and (db.preserve_ordering or oldest.preserve_ordering):
        field = "dynamic_batching" if db.preserve_ordering else "sequence_batching.oldest"
        found.append(
            f"{field}.preserve_ordering {UNSUPPORTED} for a decoupled model (its responses are relayed as its "
            "upstream sends them)"
        )
    return found


def dims_fit(config_dims: Sequence[int], model_dims: Sequence[int | None]) -> bool:
    """Whether dims written in a config (-1 = any) describe a model file's shape (None = dynamic)."""
    return len(config_dims) == len(model_dims) and all(
        m is None or c in (-1, m) for c, m in zip(config_dims, model_dims, strict=True)
    )


def shape_text(model_dims: Sequence[int | None]) -> str:
    """A model file's shape as a config would write it: [-1, 4]."""
    return "[" + ", ".join("-1" if d is None else str(d) for d in model_dims) + "]"


def _can_batch(tensors: Sequence[TensorInfo]) -> bool:
    return all(len(t.shape) >= 1 and t.shape[0] is None for t in tensors)


def _served(
    model: str, kind: str, declared: Sequence[mc.ModelInput] | Sequence[mc.ModelOutput], actual: Sequence[TensorInfo]
) -> list[TensorInfo]:
    """The model's tensors of one kind that are served: those config.pbtxt lists or, where it lists none, all of
    them (initializers with a default aside), as Triton's auto-complete does. Only these must be of a type
    tensorgate serves: an output left out (a scikit-learn ZipMap's sequence of maps beside its probability tensor)
    is never computed."""
    by_name = {t.name: t for t in actual}
    for entry in declared:
        if entry.name not in by_name:
            raise InvalidConfigError(
                model, f"{kind} '{entry.name}' is not in the model (it has: {', '.join(sorted(by_name))})"
            )
    served = [by_name[e.name] for e in declared] if declared else [t for t in actual if not t.default]
    for info in served:
        if info.data_type not in BY_CONFIG_TYPE:
            what = "" if info.data_type == mc.TYPE_INVALID else f" ({mc.DataType.Name(info.data_type)})"
            hint = f"; list the {kind}s to serve in {CONFIG_FILE} to leave it out" if kind == "output" else ""
            raise InvalidConfigError(model, f"tensor '{info.name}' has a type tensorgate cannot serve{what}{hint}")
    return served


def _complete_tensors(
    model: str,
    kind: str,
    declared: Sequence[mc.ModelInput] | Sequence[mc.ModelOutput],
    served: Sequence[TensorInfo],
    batching: bool,
    add: Callable[[], mc.ModelInput | mc.ModelOutput],
    exact_dims: bool,
) -> None:
    if not declared:
        for info in served:
            add().name = info.name
    by_name = {t.name: t for t in served}
    for entry in declared:
        info = by_name[entry.name]
        if entry.data_type == mc.TYPE_INVALID:
            entry.data_type = info.data_type  # type: ignore[assignment]
        elif entry.data_type != info.data_type:
            raise InvalidConfigError(
                model,
                f"{kind} '{info.name}' is {mc.DataType.Name(entry.data_type)} in config but "
                f"{mc.DataType.Name(info.data_type)} in the model",
            )
        model_dims = info.shape[1:] if batching else info.shape
        if not entry.dims:
            if model_dims:
                entry.dims.extend(-1 if d is None else d for d in model_dims)
            else:
                # A [batch]-shaped tensor: Triton writes it as dims [1] reshaped to [].
                entry.dims.append(1)
                entry.reshape.SetInParent()
        elif not info.shape and not entry.HasField("reshape") and all(d == 1 for d in entry.dims):
            # A scalar in the model, written as Triton accepts it (dims all 1): its one element is fed as the scalar.
            entry.reshape.SetInParent()
        config_dims = list(entry.reshape.shape) if entry.HasField("reshape") else list(entry.dims)
        if not dims_fit(config_dims, model_dims):
            # A [batch]-shaped tensor (a scikit-learn label) has no per-row dims, which config dims cannot say.
            hint = (
                "; write dims: [ 1 ] reshape: { shape: [ ] } (as ModelConfig shows it), or leave dims out"
                if not model_dims and not entry.HasField("reshape")
                else ""
            )
            raise InvalidConfigError(
                model,
                f"{kind} '{info.name}' has dims {config_dims} in config but the model's "
                f"{'per-row ' if batching else ''}shape is {shape_text(model_dims)}{hint}",
            )
        if (exact_dims and kind == "input") and any(
            c == -1 and m is not None for c, m in zip(config_dims, model_dims, strict=True)
        ):
            # As Triton (CompareDimsSupported): -1 takes any size, which this model cannot.
            raise InvalidConfigError(
                model,
                f"input '{info.name}' has dims {config_dims} in config, -1 where the model's "
                f"{'per-row ' if batching else ''}shape {shape_text(model_dims)} is fixed; write the model's sizes",
            )


def autocomplete(
    config: mc.ModelConfig,
    inputs: Sequence[TensorInfo],
    outputs: Sequence[TensorInfo],
    *,
    max_batch_size_given: bool,
    default_max_batch_size: int,
    exact_dims: bool = False,
) -> mc.ModelConfig:
    """Fill what config.pbtxt leaves out from the model file and check what it states against it, as Triton's
    onnxruntime backend does: a kind of tensor the config lists (inputs, outputs) is served as listed, never
    completed with the model's others, and max_batch_size comes from the model unless the config gives it or
    lists both inputs and outputs. Only the tensors served are checked: types, and a batch dimension first.
    `exact_dims` (an ONNX model, which ONNX Runtime runs at its fixed sizes only) also refuses a -1 in an input's
    dims where the model's dimension is fixed; an upstream Triton checks its own model's."""
    model = config.name
    served_in = _served(model, "input", config.input, inputs)
    served_out = _served(model, "output", config.output, outputs)
    served = [*served_in, *served_out]
    can_batch = _can_batch(served)
    if not max_batch_size_given and not (config.input and config.output):
        config.max_batch_size = default_max_batch_size if can_batch else 0
        if config.max_batch_size > 0 and not config.HasField("dynamic_batching"):
            if not config.HasField("sequence_batching"):  # a sequence model batches by its own strategy
                config.dynamic_batching.SetInParent()
    if config.max_batch_size < 0:
        raise InvalidConfigError(model, f"max_batch_size must be >= 0, got {config.max_batch_size}")
    if config.max_batch_size > 0 and not can_batch:
        fixed = [t.name for t in served if not t.shape or t.shape[0] is not None]
        raise InvalidConfigError(
            model,
            f"max_batch_size is {config.max_batch_size} but the first dimension of {', '.join(fixed)} is not "
            "dynamic; set max_batch_size: 0",
        )
    batching = config.max_batch_size > 0
    _complete_tensors(model, "input", config.input, served_in, batching, config.input.add, exact_dims)
    _complete_tensors(model, "output", config.output, served_out, batching, config.output.add, exact_dims)
    if not config.instance_group:
        config.instance_group.add(name=model, kind=mc.ModelInstanceGroup.KIND_AUTO, count=1)
    for i, group in enumerate(config.instance_group):
        if not group.name:  # as Triton names them (NormalizeInstanceGroup)
            group.name = f"{model}_{i}"
        if group.count == 0:
            group.count = 1
        if group.count < 0:
            raise InvalidConfigError(model, f"instance_group count must be positive, got {group.count}")
    if not config.default_model_filename:
        config.default_model_filename = DEFAULT_ONNX_FILENAME
    return config


def fill_defaults(config: mc.ModelConfig) -> None:
    """What Triton writes into every config it serves when the file leaves it out (NormalizeModelConfig), so that
    ModelConfig reads as Triton's would: `version_policy { latest { num_versions: 1 } }` (what `select_versions`
    serves without one) and, except on an ensemble (which has no optimization of its own), input and output pinned
    memory on. Instance groups are named as Triton names them in `autocomplete`, once they are all there."""
    if not config.HasField("version_policy"):
        config.version_policy.latest.num_versions = 1
    if config.platform == ENSEMBLE_PLATFORM or config.HasField("ensemble_scheduling"):
        return
    optimization = config.optimization
    if not optimization.HasField("input_pinned_memory"):
        optimization.input_pinned_memory.enable = True
    if not optimization.HasField("output_pinned_memory"):
        optimization.output_pinned_memory.enable = True


def check_onnx_inputs(config: mc.ModelConfig, inputs: Sequence[TensorInfo]) -> None:
    """A completed config's inputs against what ONNX Runtime needs, checked at load as Triton's onnxruntime
    backend does, where serving would fail every request inside the runtime: every input the model requires is
    listed, and only an initializer with a default may be left out (`optional`, which such an input always is), on
    a model that does not batch (Triton refuses optional inputs there). Their dims were checked by `autocomplete`
    (`exact_dims`)."""
    listed = {t.name for t in config.input}
    missing = [t.name for t in inputs if not t.default and t.name not in listed]
    if missing:
        raise InvalidConfigError(config.name, f"the model requires input(s) {missing}, which {CONFIG_FILE} leaves out")
    defaults = {t.name for t in inputs if t.default}
    for entry in config.input:
        if entry.name in defaults:
            entry.optional = True
        elif entry.optional:
            raise InvalidConfigError(
                config.name,
                f"input '{entry.name}' is optional in config but the model requires it (only an initializer with a "
                "default value may be left out of a request)",
            )
        if entry.optional and config.max_batch_size > 0:
            raise InvalidConfigError(
                config.name,
                f"input '{entry.name}' is optional, which is not supported for a model that batches (max_batch_size "
                f"{config.max_batch_size}), as in Triton: set max_batch_size: 0 or leave the input out of the config",
            )


def select_versions(policy: mc.ModelVersionPolicy, available: Sequence[int]) -> list[int]:
    """Versions to serve under Triton's version_policy (latest 1 by default), ascending."""
    ordered = sorted(available)
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return ordered
    if choice == "specific":
        wanted = set(policy.specific.versions)
        return [v for v in ordered if v in wanted]
    n = policy.latest.num_versions if choice == "latest" and policy.latest.num_versions > 0 else 1
    return ordered[-n:]


def version_dirs(model_dir: Path) -> list[int]:
    """Numbered version sub-directories; anything else in the model directory is ignored, as in Triton."""
    out: list[int] = []
    for child in model_dir.iterdir():
        number = parse_canonical(child.name)
        if number is not None and child.is_dir():
            out.append(number)
    return sorted(out)
