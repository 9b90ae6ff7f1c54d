"""ONNX Runtime backend: session options from config, execution provider choice with a CPU fallback.

The provider decision is a pure function (`choose_providers`) so that it is tested on machines without a GPU;
whether CUDA really took is then read back from the session, because ONNX Runtime silently drops providers it
cannot initialise.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from tensorgate.protos import model_config_pb2 as mc
from tensorgate.server.backends import bf16
from tensorgate.server.backends.base import NO_CONTEXT, BatchContext
from tensorgate.server.cpus import usable_cpus
from tensorgate.server.errors import BackendError, InvalidRequestError, ModelLoadError, without_paths
from tensorgate.server.repository.config import BOOL_SPELLINGS, bool_parameter, parse_bool
from tensorgate.server.repository.paths import inside
from tensorgate.server.scheduling.batch import concat_rows

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
OPENVINO = "OpenVINOExecutionProvider"

# ONNX type strings as reported by onnxruntime's NodeArg.type -> ModelConfig data types.
ONNX_TYPES: dict[str, int] = {
    "tensor(bool)": mc.TYPE_BOOL,
    "tensor(uint8)": mc.TYPE_UINT8,
    "tensor(uint16)": mc.TYPE_UINT16,
    "tensor(uint32)": mc.TYPE_UINT32,
    "tensor(uint64)": mc.TYPE_UINT64,
    "tensor(int8)": mc.TYPE_INT8,
    "tensor(int16)": mc.TYPE_INT16,
    "tensor(int32)": mc.TYPE_INT32,
    "tensor(int64)": mc.TYPE_INT64,
    "tensor(float16)": mc.TYPE_FP16,
    "tensor(float)": mc.TYPE_FP32,
    "tensor(double)": mc.TYPE_FP64,
    "tensor(string)": mc.TYPE_STRING,
    "tensor(bfloat16)": mc.TYPE_BF16,
}

_GRAPH_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
# Triton's onnxruntime backend reads `optimization { graph { level } }` this way; any other level means "all".
_TRITON_GRAPH_LEVELS = {-1: "basic", 1: "extended", 2: "disable"}
# Triton's keys that are ONNX Runtime's own config keys: one of the session, one of its run options.
DEVICE_ALLOCATOR_FOR_INITIALIZERS = "session.use_device_allocator_for_initializers"
ARENA_SHRINKAGE = "memory.enable_memory_arena_shrinkage"
# More threads than this per session is a typo, not a tuning choice; onnxruntime would try to start them all.
_MAX_THREADS = 1024


_preload_lock = threading.Lock()
_preloaded = False


def preload_cuda_libraries(preload: Callable[[], object] | None = None) -> None:
    """Load the CUDA and cuDNN libraries that pip put beside onnxruntime-gpu (`onnxruntime-gpu[cuda,cudnn]`),
    once per process, with `preload` defaulting to ONNX Runtime's `preload_dlls` (1.21 and later).

    Its CUDA provider carries no search path for them, so without this step CUDA fails to start and every GPU
    model falls back to the CPU. `preload_dlls` prints what it cannot load; that text goes to this module's log
    (failures as warnings) instead of the server's stdout. Models load on several threads at once: the lock keeps
    the stdout redirection, which is process-wide, to one thread at a time. A no-op on a CPU build.
    """
    global _preloaded
    with _preload_lock:
        if _preloaded:
            return
        _preloaded = True
        run = preload if preload is not None else getattr(ort, "preload_dlls", None)
        if run is None:  # onnxruntime before 1.21: CUDA must be on the loader's path
            return
        said = io.StringIO()
        with contextlib.redirect_stdout(said):
            try:
                run()
            except Exception as exc:  # noqa: BLE001 - a failed preload leaves the loader's own search to decide
                print(f"onnxruntime.preload_dlls failed: {exc}")
    for line in (text.strip() for text in said.getvalue().splitlines()):
        if line:
            level = logging.WARNING if "fail" in line.lower() else logging.INFO
            log.log(level, "CUDA libraries: %s", line)


Provider = str | tuple[str, dict[str, str]]
"""An ONNX Runtime provider as InferenceSession takes it: its name, or its name and options."""


def provider_name(provider: Provider) -> str:
    return provider[0] if isinstance(provider, tuple) else provider


@dataclass(frozen=True, slots=True)
class ProviderChoice:
    """The providers to ask ONNX Runtime for, and a warning to log when the request cannot be honoured."""

    providers: list[Provider]
    wants_gpu: bool
    warning: str | None = None


@dataclass(frozen=True, slots=True)
class Accelerators:
    """`optimization { execution_accelerators }` as Triton's onnxruntime backend reads it, checked
    (`execution_accelerators`): TensorRT provider options when `tensorrt` is asked for, and whether `openvino` is.
    The `cuda` accelerator's parameters are CUDA provider options (`cuda_options`)."""

    tensorrt: Mapping[str, str] | None = None
    openvino: bool = False


def _missing_accelerator(model: str, name: str, provider: str, available: Sequence[str], instead: str) -> str:
    return (
        f"model '{model}' asks for the '{name}' execution accelerator but this onnxruntime build has no {provider} "
        f"(available: {', '.join(available)}); running on {instead} without it"
    )


def choose_providers(
    kind: int,
    gpus: Sequence[int],
    available: Sequence[str],
    *,
    model: str,
    cuda: Mapping[str, str] | None = None,
    accelerators: Accelerators | None = None,
) -> ProviderChoice:
    """Pick providers for an instance group kind; `cuda` holds CUDA provider options (`cuda_options`).

    KIND_GPU asks for CUDA and warns when it is missing; KIND_AUTO takes CUDA when present and CPU quietly
    otherwise; KIND_CPU (and KIND_MODEL) use the CPU. `accelerators` put TensorRT before CUDA (on a GPU only, as
    Triton does) and OpenVINO before the CPU provider. Where this build lacks one, Triton fails the load; tensorgate
    warns and runs without it, as it runs a KIND_GPU model on the CPU: same results, only slower.
    """
    acc = accelerators or Accelerators()
    warnings: list[str] = []
    providers: list[Provider] = []
    wants_gpu = kind in (mc.ModelInstanceGroup.KIND_GPU, mc.ModelInstanceGroup.KIND_AUTO) and CUDA in available
    if wants_gpu:
        device = str(gpus[0]) if gpus else "0"
        if acc.tensorrt is not None:
            if TENSORRT in available:
                providers.append((TENSORRT, {**acc.tensorrt, "device_id": device}))
            else:
                warnings.append(_missing_accelerator(model, "tensorrt", TENSORRT, available, CUDA))
        providers.append((CUDA, {**(cuda or {}), "device_id": device}))
    elif kind == mc.ModelInstanceGroup.KIND_GPU:
        warnings.append(
            f"model '{model}' asks for a GPU (KIND_GPU) but this onnxruntime build has no {CUDA} "
            f"(available: {', '.join(available)}); running on the CPU"
        )
    if acc.openvino:
        if OPENVINO in available:
            providers.append((OPENVINO, {"device_type": "CPU"}))  # what Triton gives it; it reads no parameters
        else:
            warnings.append(_missing_accelerator(model, "openvino", OPENVINO, available, CPU))
    providers.append(CPU)
    return ProviderChoice(providers, wants_gpu=wants_gpu, warning="; ".join(warnings) or None)


def _string_param(config: mc.ModelConfig, key: str) -> str | None:
    p = config.parameters.get(key)
    return p.string_value if p is not None and p.string_value != "" else None


# Triton's onnxruntime backend numbers cuDNN's convolution algorithm searches; ONNX Runtime names them.
CONV_ALGO_SEARCH = {"0": "EXHAUSTIVE", "1": "HEURISTIC", "2": "DEFAULT"}
DEFAULT_CONV_ALGO_SEARCH = "HEURISTIC"
ARENA_EXTEND_STRATEGY = {"0": "kNextPowerOfTwo", "1": "kSameAsRequested"}
# Triton's model-level CUDA keys (its older spelling of the `cuda` accelerator's parameters); these win.
CUDA_PARAMETERS = ("cudnn_conv_algo_search", "gpu_mem_limit", "arena_extend_strategy", "do_copy_in_default_stream")
_CUDA_BOOLS = ("do_copy_in_default_stream", "use_ep_level_unified_stream")
# CUDA provider options that ONNX Runtime reads as addresses in this process (a stream, allocator functions): a
# config that sets them would have onnxruntime call or use whatever the number points at.
_CUDA_POINTERS = ("user_compute_stream", "gpu_external_alloc", "gpu_external_free", "gpu_external_empty_cache")


def _cuda_value(key: str, raw: str, where: str, model: str, version: int | None) -> str:
    """One CUDA provider option checked (Triton's numbers turned into ONNX Runtime's names); other keys pass on
    as written, for onnxruntime to judge, as Triton passes them."""
    value = raw.strip()
    if key == "cudnn_conv_algo_search":
        mode = CONV_ALGO_SEARCH.get(value, value.upper())
        if mode in CONV_ALGO_SEARCH.values():
            return mode
        rule = "0 (EXHAUSTIVE), 1 (HEURISTIC) or 2 (DEFAULT)"
    elif key == "arena_extend_strategy":
        strategy = ARENA_EXTEND_STRATEGY.get(value, value)
        if strategy in ARENA_EXTEND_STRATEGY.values():
            return strategy
        rule = "0 (kNextPowerOfTwo) or 1 (kSameAsRequested)"
    elif key == "gpu_mem_limit":
        if value.isdigit() and int(value) < 2**64:
            return value
        rule = "a number of bytes"
    elif key in _CUDA_BOOLS:
        flag = parse_bool(value)
        if flag is not None:
            return "1" if flag else "0"
        rule = BOOL_SPELLINGS
    elif key in _CUDA_POINTERS:
        raise ModelLoadError(model, version, f"{where} '{key}' is an address in the server's memory; not accepted")
    else:
        return raw
    raise ModelLoadError(model, version, f"{where} '{key}' must be {rule}, got '{raw}'")


def cuda_options(config: mc.ModelConfig, version: int | None = None) -> dict[str, str]:
    """CUDA provider options from config: the `cuda` execution accelerator's parameters, then Triton's model-level
    keys (`cudnn_conv_algo_search`: 0/1/2 or the names, `gpu_mem_limit`, `arena_extend_strategy`: 0/1 or the names,
    `do_copy_in_default_stream`), which win where both are given. `device_id` is the instance group's.

    The cudnn_conv_algo_search default is HEURISTIC, where ONNX Runtime and Triton default to EXHAUSTIVE. ONNX
    Runtime's cuDNN convolutions build a new plan whenever their input shape changes, and a dynamic batcher changes
    the batch size almost every call; EXHAUSTIVE makes each plan far dearer. Measured on an H200
    (benchmarks/gpu_batching.py, a ResNet-style CNN, 32-row requests at c=8): 7,205 rows/s with HEURISTIC against
    1,297 with EXHAUSTIVE, whose batches took 83 ms against 15 ms. DEFAULT was not measured.
    Checked on every machine, so a typo fails the load where it is written, not only where a GPU is.
    """
    options: dict[str, str] = {}
    for accelerator in config.optimization.execution_accelerators.gpu_execution_accelerator:
        if accelerator.name == "cuda":
            for key, raw in accelerator.parameters.items():
                if key != "device_id":
                    where = "the 'cuda' execution accelerator's parameter"
                    options[key] = _cuda_value(key, raw, where, config.name, version)
    for key in CUDA_PARAMETERS:
        given = _string_param(config, key)
        if given is not None:
            options[key] = _cuda_value(key, given, "parameter", config.name, version)
    options.setdefault("cudnn_conv_algo_search", DEFAULT_CONV_ALGO_SEARCH)
    return options


# Triton's TensorRT accelerator parameters -> the kind of value each takes; the ONNX Runtime option has the same
# name except where _TRT_RENAMED says otherwise (Triton's onnxruntime backend README, "Parameter mapping").
_TRT_PARAMETERS = {
    "max_workspace_size_bytes": "size",
    "trt_max_partition_iterations": "int",
    "trt_min_subgraph_size": "int",
    "int8_calibration_table_name": "file",
    "int8_use_native_calibration_table": "bool",
    "trt_dla_enable": "bool",
    "trt_dla_core": "int",
    "trt_engine_cache_enable": "bool",
    "trt_engine_cache_path": "path",
    "trt_engine_cache_prefix": "file",
    "trt_dump_subgraphs": "bool",
    "trt_force_sequential_engine_build": "bool",
    "trt_context_memory_sharing_enable": "bool",
    "trt_layer_norm_fp32_fallback": "bool",
    "trt_timing_cache_enable": "bool",
    "trt_timing_cache_path": "path",
    "trt_force_timing_cache": "bool",
    "trt_detailed_build_log": "bool",
    "trt_build_heuristics_enable": "bool",
    "trt_sparsity_enable": "bool",
    "trt_builder_optimization_level": "int",
    "trt_auxiliary_streams": "int",
    "trt_tactic_sources": "text",
    "trt_profile_min_shapes": "text",
    "trt_profile_max_shapes": "text",
    "trt_profile_opt_shapes": "text",
    "trt_cuda_graph_enable": "bool",
    "trt_dump_ep_context_model": "bool",
    "trt_ep_context_file_path": "path",
    "trt_ep_context_embed_mode": "int",
}
_TRT_RENAMED = {
    "max_workspace_size_bytes": "trt_max_workspace_size",
    "int8_calibration_table_name": "trt_int8_calibration_table_name",
    "int8_use_native_calibration_table": "trt_int8_use_native_calibration_table",
}
_TRT_PRECISION = {"FP32": None, "FP16": "trt_fp16_enable", "BF16": "trt_bf16_enable", "INT8": "trt_int8_enable"}
_TRT_KINDS = {
    "bool": BOOL_SPELLINGS,
    "int": "an integer",
    "size": "a number of bytes",
    "file": "a file name",
    "path": "a relative path inside the model's directory",
}


def _trt_value(key: str, raw: str, model_dir: Path) -> str | None:
    """The ONNX Runtime value of one TensorRT parameter, or None when `raw` is not a value of its kind. Paths are
    taken inside the model's directory (a config may come from a client through RepositoryModelLoad: it must not
    have the server write engines or read calibration tables anywhere else), as warm-up files are."""
    kind, value = _TRT_PARAMETERS[key], raw.strip()
    if kind == "bool":
        flag = parse_bool(value)
        return None if flag is None else "1" if flag else "0"
    if kind in ("int", "size"):
        digits = value[1:] if kind == "int" and value.startswith("-") else value
        return value if digits.isdigit() else None
    if kind == "file":
        return value if value and Path(value).name == value and value not in (".", "..") else None
    if kind == "path":
        path = inside(model_dir, value)
        return None if path is None else str(path)
    return raw


def execution_accelerators(config: mc.ModelConfig, model_dir: Path, version: int | None = None) -> Accelerators:
    """`optimization { execution_accelerators }` checked as Triton's onnxruntime backend checks it: the GPU list takes
    `tensorrt` and `cuda`, the CPU list `openvino`; another name, a TensorRT parameter it does not know or a value of
    the wrong kind fails the load. Checked on every machine, like `cuda_options`, though TensorRT runs only on a
    GPU. `trt_extra_plugin_lib_paths` is refused: it loads shared libraries, as `model_operations` would."""
    found = config.optimization.execution_accelerators
    tensorrt: dict[str, str] | None = None
    openvino = False
    for field, known in (
        ("gpu_execution_accelerator", ("tensorrt", "cuda")),
        ("cpu_execution_accelerator", ("openvino",)),
    ):
        for accelerator in getattr(found, field):
            if accelerator.name not in known:
                raise ModelLoadError(
                    config.name,
                    version,
                    f"unknown Execution Accelerator '{accelerator.name}' is requested in {field} "
                    f"(the onnxruntime backend takes {', '.join(repr(k) for k in known)} there)",
                )
            openvino = openvino or accelerator.name == "openvino"
            if accelerator.name != "tensorrt":
                continue
            tensorrt = {}
            for key, raw in accelerator.parameters.items():
                if key == "precision_mode":
                    if raw not in _TRT_PRECISION:
                        raise ModelLoadError(
                            config.name,
                            version,
                            f"unsupported precision mode '{raw}' is requested for TensorRT (FP32, FP16, BF16 or INT8)",
                        )
                    flag = _TRT_PRECISION[raw]
                    if flag is not None:
                        tensorrt[flag] = "1"
                    continue
                if key not in _TRT_PARAMETERS:
                    why = "it loads shared libraries" if key == "trt_extra_plugin_lib_paths" else "unknown parameter"
                    raise ModelLoadError(
                        config.name, version, f"TensorRT Execution Accelerator parameter '{key}' is not accepted: {why}"
                    )
                value = _trt_value(key, raw, model_dir)
                if value is None:
                    raise ModelLoadError(
                        config.name,
                        version,
                        f"TensorRT Execution Accelerator parameter '{key}' must be {_TRT_KINDS[_TRT_PARAMETERS[key]]}, "
                        f"got '{raw}'",
                    )
                tensorrt[_TRT_RENAMED.get(key, key)] = value
    return Accelerators(tensorrt, openvino)


PAD_BATCHES = "tensorgate.pad_batches"
MAX_PAD_SIZES = 16


def _pad_setting(config: mc.ModelConfig, version: int | None) -> bool | list[int]:
    """`tensorgate.pad_batches` as written: a boolean, or a list of row counts ("1,8,32"). Anything else fails
    the load, naming the model, the key and the value, before max_batch_size is known."""
    param = config.parameters.get(PAD_BATCHES)
    raw = param.string_value if param is not None else ""
    if not raw.strip():
        return False
    flag = parse_bool(raw)  # "1" and "0" too, as for every boolean: one size of 1 is written "1,<max_batch_size>"
    if flag is not None:
        return flag
    parts = [part.strip() for part in raw.split(",")]
    if not all(re.fullmatch("[0-9]+", part) for part in parts):
        raise ModelLoadError(
            config.name,
            version,
            f"parameter '{PAD_BATCHES}' must be {BOOL_SPELLINGS}, got '{raw}' (or the batch sizes to pad to, "
            'such as "1,8,32")',
        )
    return [int(part) for part in parts]


def pad_requested(config: mc.ModelConfig, version: int | None = None) -> bool:
    """Whether the config asks for padding (see `pad_sizes`); a value that is neither a boolean nor a list of
    sizes fails the load."""
    return _pad_setting(config, version) is not False


def pad_sizes(config: mc.ModelConfig, version: int | None = None) -> tuple[int, ...]:
    """Row counts a run may be padded to, ascending: each batch runs at the smallest one that holds it.
    `tensorgate.pad_batches: "true"` is max_batch_size alone; a list ("1,8,32") is those sizes, with
    max_batch_size added when the list stops short of it; unset or false is none. Read it from the completed
    config: a model whose config leaves max_batch_size out gets it from the model file.

    For convolutional models on CUDA: ONNX Runtime's cuDNN convolutions keep the plan of the last input shape
    only and build a new one whenever the batch size changes, which a dynamic batcher does almost every call
    (measured on an H200 with HEURISTIC search: about 15 ms per batch against 1.5 ms for the same batch run at one
    fixed size). Padding keeps one shape per size, at the price of computing the padding rows; with several sizes
    each runs on its own session (`OnnxBackend`), which keeps its own plans. Off by default: on the CPU the
    padding rows are pure cost. Correct only for models whose rows are independent (each output row depends on
    its input row alone), which is what batching already assumes. Statistics count the real rows.
    """
    setting = _pad_setting(config, version)
    if setting is False:
        return ()
    mbs = config.max_batch_size
    if mbs <= 0:
        raise ModelLoadError(config.name, version, f"{PAD_BATCHES} needs a batch dimension (max_batch_size > 0) to pad")
    if setting is True:
        return (mbs,)
    wrong = [size for size in setting if not 1 <= size <= mbs]
    if wrong:
        raise ModelLoadError(
            config.name,
            version,
            f"{PAD_BATCHES} size {wrong[0]} is outside 1..{mbs} (max_batch_size): a batch is never larger",
        )
    sizes = tuple(sorted({*setting, mbs}))
    if len(sizes) > MAX_PAD_SIZES:
        raise ModelLoadError(
            config.name,
            version,
            f"{PAD_BATCHES} lists {len(sizes)} sizes with max_batch_size; at most {MAX_PAD_SIZES}: each is an "
            "onnxruntime session of its own, with its own weights and memory (powers of two up to 32768 fit)",
        )
    return sizes


def padding_hint(config: mc.ModelConfig, *, on_gpu: bool) -> str | None:
    """Advice for a model that batches dynamically on CUDA without padding, given once as it loads: whether its
    graph has convolutions is not known here, and for one that has, the rebuilt cuDNN plans cost more than
    anything else on the request path (see `pad_sizes`)."""
    if not on_gpu or not config.HasField("dynamic_batching") or config.max_batch_size <= 1:
        return None
    if pad_requested(config):
        return None
    return (
        f"model '{config.name}' batches dynamically on CUDA without {PAD_BATCHES}: if it has convolutions, ONNX "
        "Runtime rebuilds their cuDNN plans at every new batch size (3.5-7 times fewer rows/s measured on an "
        f'H200); {PAD_BATCHES} with a few sizes, such as "1,2,4,8,16,32,64,128", avoids it'
    )


def pad_feed(feed: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Each input grown to `rows` along the batch dimension by repeating its last row: a copy of real data, so
    that the padding is valid input for any model and any data type (BYTES included)."""
    padded: dict[str, np.ndarray] = {}
    for name, array in feed.items():
        have = array.shape[0]
        # One copy, as requests are stacked (concat_rows: without handing the GIL back and forth).
        padded[name] = array if have >= rows or have == 0 else concat_rows([array], rows)
    return padded


def default_intra_op_threads(cpus: int | None = None) -> int:
    """Cores this process may use (`cpus`, else read: its container's CPU limit included, server/cpus.py), minus
    one for the event loop; at least 1."""
    return max(1, (usable_cpus() if cpus is None else cpus) - 1)


def session_options(config: mc.ModelConfig) -> ort.SessionOptions:
    """Threads, graph optimisation, execution mode and memory from config, using the keys of Triton's onnxruntime
    backend (`intra_op_thread_count`, `inter_op_thread_count`, `optimization { graph { level } }`,
    `execution_mode`, `enable_mem_arena`, `enable_mem_pattern`, `session.use_device_allocator_for_initializers`),
    with Triton's checks: a value it would refuse fails the load."""
    opts = ort.SessionOptions()
    # Unless the config says otherwise, leave one core to the event loop that decodes and answers requests: an
    # intra-op pool as wide as the machine competes with it (measured on 2 cores: 1 thread served 3,750 infer/s
    # where onnxruntime's default of 2 served 2,300; benchmarks/batching.py).
    opts.intra_op_num_threads = default_intra_op_threads()
    for key, attr in (
        ("intra_op_thread_count", "intra_op_num_threads"),
        ("inter_op_thread_count", "inter_op_num_threads"),
    ):
        value = _string_param(config, key)
        if value is not None:
            # Checked here: onnxruntime takes a negative count silently and rejects a huge one with a TypeError.
            try:
                count = int(value)
            except ValueError:
                count = -1
            if not 0 <= count <= _MAX_THREADS:
                raise ModelLoadError(
                    config.name,
                    None,
                    f"parameter '{key}' must be an integer in 0..{_MAX_THREADS} (0: onnxruntime's default), "
                    f"got '{value}'",
                )
            setattr(opts, attr, count)
    # ONNX Runtime's intra-op threads spin while waiting for work by default. In a server they would spin against
    # the event loop thread that decodes and answers requests, for the same cores; so tensorgate turns spinning off
    # unless the model asks for it (`tensorgate.intra_op_spinning: "true"`, worth it only with spare cores).
    spinning = "1" if bool_parameter(config, "tensorgate.intra_op_spinning") else "0"
    opts.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    opts.add_session_config_entry("session.inter_op.allow_spinning", spinning)
    level_name = _string_param(config, "tensorgate.graph_optimization_level")
    if level_name is not None:
        if level_name not in _GRAPH_LEVELS:
            raise ModelLoadError(
                config.name,
                None,
                f"tensorgate.graph_optimization_level must be one of {sorted(_GRAPH_LEVELS)}",
            )
        opts.graph_optimization_level = _GRAPH_LEVELS[level_name]
    else:
        level = _TRITON_GRAPH_LEVELS.get(config.optimization.graph.level, "all")
        opts.graph_optimization_level = _GRAPH_LEVELS[level]
    mode = _string_param(config, "execution_mode")
    if mode is not None and mode.strip() not in ("0", "1"):
        raise ModelLoadError(
            config.name,
            None,
            f"parameter 'execution_mode': expected values for execution_mode are 0 or 1 (0: sequential, 1: "
            f"parallel), got '{mode}'",
        )
    parallel = mode is not None and mode.strip() == "1"
    opts.execution_mode = ort.ExecutionMode.ORT_PARALLEL if parallel else ort.ExecutionMode.ORT_SEQUENTIAL
    if not parallel and _string_param(config, "inter_op_thread_count") is not None:
        log.warning(
            "model '%s': inter_op_thread_count takes effect only with execution_mode 1 (parallel); "
            "this model runs its nodes one at a time (execution_mode 0)",
            config.name,
        )
    for key, attr in (("enable_mem_arena", "enable_cpu_mem_arena"), ("enable_mem_pattern", "enable_mem_pattern")):
        flag = bool_parameter(config, key)
        if flag is not None:
            setattr(opts, attr, flag)
    flag = bool_parameter(config, DEVICE_ALLOCATOR_FOR_INITIALIZERS)
    if flag is not None:
        opts.add_session_config_entry(DEVICE_ALLOCATOR_FOR_INITIALIZERS, "1" if flag else "0")
    return opts


def arena_shrinkage(config: mc.ModelConfig, version: int | None = None) -> list[tuple[str, int]]:
    """The arenas Triton's `memory.enable_memory_arena_shrinkage` (`cpu:0;gpu:1`) names, checked: ONNX Runtime
    shrinks them after every run, handing back memory that a peak took. Only its run options take the setting, and
    it fails every run, not the load, over a device it does not know or an arena the session does not have."""
    raw = _string_param(config, ARENA_SHRINKAGE)
    if raw is None:
        return []
    arenas: list[tuple[str, int]] = []
    for part in filter(None, (p.strip() for p in raw.split(";"))):
        device, _, number = part.partition(":")
        if device not in ("cpu", "gpu") or not number.isdigit():
            raise ModelLoadError(
                config.name,
                version,
                f"parameter '{ARENA_SHRINKAGE}' must list arenas as cpu:0 or gpu:<device id>, separated by ';', "
                f"got '{raw}'",
            )
        arenas.append((device, int(number)))
    return arenas


def model_dir_of(model_path: Path) -> Path:
    """The model's directory, for a file at `<model>/<version>/<file>`, or at `<model>/<version>/<dir>/model.onnx`
    for a model kept as a directory (Triton's layout for one with external data; repository/manager.py)."""
    version_dir = model_path.parent if model_path.parent.name.isdecimal() else model_path.parent.parent
    return version_dir.parent


def _load_error(model: str, version: int | None, path: Path, exc: Exception, what: str = "") -> ModelLoadError:
    """onnxruntime names the file by its absolute path, but this reason goes over the wire: callers get it from the
    model's directory (`1/model.onnx`; the message already names the model), never the server's directory layout.
    `what` names the session when it is not the first (a padding size's)."""
    detail = without_paths(str(exc), model_dir_of(path), path, path.parent)
    target = f"{path.name} ({what})" if what else path.name
    return ModelLoadError(model, version, f"onnxruntime could not load {target}: {detail}")


@contextlib.contextmanager
def _external_data_folder(opts: ort.SessionOptions, folder: Path | None) -> Iterator[None]:
    """Tell onnxruntime where a model built from bytes finds its external tensors: `folder`, or, for a model that
    must have none, a fresh empty directory (without one, onnxruntime would look in the working directory).
    onnxruntime (1.32) refuses external paths that leave the folder, absolute ones and symlinks out of it."""
    key = "session.model_external_initializers_file_folder_path"
    if folder is not None:
        opts.add_session_config_entry(key, str(folder))
        yield
        return
    with tempfile.TemporaryDirectory(prefix="tensorgate-no-external-data-") as empty:
        opts.add_session_config_entry(key, empty)
        yield


def _wants_gpu(group: mc.ModelInstanceGroup, available: Sequence[str]) -> bool:
    kind = group.kind
    return kind == mc.ModelInstanceGroup.KIND_GPU or (kind == mc.ModelInstanceGroup.KIND_AUTO and CUDA in available)


def session_group(groups: Sequence[mc.ModelInstanceGroup], available: Sequence[str]) -> mc.ModelInstanceGroup:
    """The instance group whose placement a model's one session takes: the first that can have a GPU (KIND_GPU, or
    KIND_AUTO where this build has CUDA), else the first (KIND_AUTO when there is none). A GPU first: Triton would
    run such a group's instances there, and they would take most of the work from CPU instances beside them."""
    return next((g for g in groups if _wants_gpu(g, available)), groups[0] if groups else mc.ModelInstanceGroup())


def _group_text(group: mc.ModelInstanceGroup) -> str:
    kind = mc.ModelInstanceGroup.Kind.Name(group.kind)
    return f"{kind} on GPUs {list(group.gpus)}" if group.gpus else kind


def instance_group_warning(groups: Sequence[mc.ModelInstanceGroup], *, model: str, device: int | None) -> str | None:
    """What to say when the groups ask for more places than the one the session has: tensorgate runs a model version
    in one session (its instances are threads sharing it), where Triton gives each instance its own on its own
    device. On the CPU nothing more is said: a group that asked for a GPU was warned about when it got none."""
    if device is None:
        return None
    elsewhere = [
        g
        for g in groups
        if g.kind in (mc.ModelInstanceGroup.KIND_CPU, mc.ModelInstanceGroup.KIND_MODEL) or set(g.gpus) - {device}
    ]
    if not elsewhere:
        return None
    count = sum(max(g.count, 1) for g in groups)
    return (
        f"model '{model}': instance_group asks for {', '.join(_group_text(g) for g in groups)}, but tensorgate runs "
        f"a model version in one onnxruntime session: all {count} instances run on GPU {device}, as the served "
        "config says"
    )


def place_instance_groups(groups: Sequence[mc.ModelInstanceGroup], device: int | None) -> None:
    """Rewrite instance groups to where the session runs: KIND_GPU on `device`, or KIND_CPU without gpus when it is
    None. KIND_AUTO is resolved, a KIND_GPU group that got no GPU reads KIND_CPU, and a group that asked for another
    device or the CPU reads what it got; counts stay (the instances are that many threads sharing the session)."""
    for group in groups:
        del group.gpus[:]
        if device is None:
            group.kind = mc.ModelInstanceGroup.KIND_CPU
        else:
            group.kind = mc.ModelInstanceGroup.KIND_GPU
            group.gpus.append(device)


@dataclass(frozen=True)
class _SessionSource:
    """How the backend's first session was made, to make more alike (one per padding size)."""

    model: str | bytes
    path: Path
    options: ort.SessionOptions
    providers: list[Provider]


class OnnxBackend:
    """A model version on ONNX Runtime: one session, or one per padding size (`pad_to_max_batch_size`); `execute`
    may be called from several threads at once (sessions allow it)."""

    def __init__(
        self,
        model_path: Path,
        config: mc.ModelConfig,
        *,
        version: int | None = None,
        available_providers: Sequence[str] | None = None,
        model_bytes: bytes | None = None,
        external_data: Path | None = None,
    ) -> None:
        """Build the session from `model_bytes` when given (the bytes the repository read and hashed, so that
        what runs is what was checked; `model_path` then only names the file in messages), else from the file.
        `external_data` is the only directory a model built from bytes may read external tensors from; None
        means it may not have any."""
        self._model = config.name
        self._version = version
        # A bad value fails the load at once; the sizes follow from max_batch_size, which the repository may
        # complete later, and their sessions are made once the model has passed its checks (pad_to_max_batch_size).
        pad_requested(config, version)
        available = list(available_providers if available_providers is not None else ort.get_available_providers())
        group = session_group(config.instance_group, available)
        shrink = arena_shrinkage(config, version)
        choice = choose_providers(
            group.kind,
            list(group.gpus),
            available,
            model=config.name,
            cuda=cuda_options(config, version),
            accelerators=execution_accelerators(config, model_dir_of(model_path), version),
        )
        if choice.warning:
            log.warning("%s", choice.warning)
        opts = session_options(config)
        # Ask onnxruntime only for providers this build has: it would warn about any other one on its own (a Python
        # UserWarning, an exception under `-W error`) before dropping it, and the read-back below says it once.
        built = set(ort.get_available_providers())
        providers = [p for p in choice.providers if provider_name(p) in built]
        if CUDA in built and choice.wants_gpu:
            preload_cuda_libraries()
        fell_back = False
        source: str | bytes = str(model_path) if model_bytes is None else model_bytes
        with contextlib.ExitStack() as stack:
            if model_bytes is not None:
                stack.enter_context(_external_data_folder(opts, external_data))
            try:
                self._session = ort.InferenceSession(source, sess_options=opts, providers=providers)
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises plain RuntimeError subclasses
                if not choice.wants_gpu:
                    raise _load_error(config.name, version, model_path, exc) from exc
                log.warning("model '%s': %s failed to initialise (%s); falling back to the CPU", config.name, CUDA, exc)
                self._session = self._cpu_session(source, model_path, opts, config.name, version)
                fell_back = True
        self._source: _SessionSource | None = _SessionSource(
            source, model_path, opts, [CPU] if fell_back else providers
        )
        """What the sessions of other padding sizes are made from; dropped once the padding is set, so that the
        model's bytes are not kept for the session's life."""
        self._sessions: dict[int, ort.InferenceSession] = {}
        """The session each padding size runs on, sizes ascending (empty: no padding): the first (`_session`) for
        the largest, a new one for each other size, so that each keeps the cuDNN plans of its one shape."""
        used = self._session.get_providers()
        if choice.wants_gpu and CUDA not in used and not fell_back:
            log.warning(
                "model '%s': %s was requested but onnxruntime did not enable it (providers in use: %s); "
                "running on the CPU",
                config.name,
                CUDA,
                ", ".join(used),
            )
        for accelerator in (TENSORRT, OPENVINO):
            asked = any(provider_name(p) == accelerator for p in providers)
            if asked and accelerator not in used and not fell_back and (accelerator != TENSORRT or CUDA in used):
                log.warning(
                    "model '%s': %s was requested (optimization.execution_accelerators) but onnxruntime did not "
                    "enable it (providers in use: %s); running without it",
                    config.name,
                    accelerator,
                    ", ".join(used),
                )
        self._provider = used[0] if used else CPU
        self._device = (group.gpus[0] if group.gpus else 0) if CUDA in used else None
        """The GPU the session runs on, None on the CPU."""
        spread = instance_group_warning(config.instance_group, model=config.name, device=self._device)
        if spread:
            log.warning("%s", spread)
        # Initializers that are also graph inputs hold a value a request may override: inputs in Triton too
        # (initializer_as_input), served where the config lists them, as optional ones.
        overridable = self._session.get_overridable_initializers()
        self.defaults = frozenset(a.name for a in overridable)
        self.inputs = {a.name: a for a in (*self._session.get_inputs(), *overridable)}
        self.outputs = {a.name: a for a in self._session.get_outputs()}
        self._string_inputs = {n for n, a in self.inputs.items() if a.type == "tensor(string)"}
        self._run_options = ort.RunOptions()
        """Shared by every run of this session: `interrupt` sets its terminate flag (an atomic in ONNX Runtime),
        which each run checks between nodes."""
        self._shrink_arenas(shrink, config.name, cpu_arena=opts.enable_cpu_mem_arena)
        self._bf16 = any(a.type == bf16.ONNX_TYPE for a in (*self.inputs.values(), *self.outputs.values()))
        if self._bf16 and self._string_inputs:
            raise ModelLoadError(
                config.name,
                version,
                "a model with bfloat16 tensors and string inputs is not served: onnxruntime's Python API takes "
                f"bfloat16 only as OrtValues, which cannot hold strings (string inputs: {sorted(self._string_inputs)})",
            )
        log.info(
            "model '%s' version %s loaded on %s",
            config.name,
            version if version is not None else "-",
            self._provider,
        )

    @staticmethod
    def _cpu_session(
        source: str | bytes, path: Path, opts: ort.SessionOptions, model: str, version: int | None
    ) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(source, sess_options=opts, providers=[CPU])
        except Exception as exc:  # noqa: BLE001
            raise _load_error(model, version, path, exc) from exc

    def _shrink_arenas(self, arenas: Sequence[tuple[str, int]], model: str, *, cpu_arena: bool) -> None:
        """Set `memory.enable_memory_arena_shrinkage` on the run options, for the arenas this session has: ONNX
        Runtime would fail every run over one it lacks (the CPU's with enable_mem_arena off, a GPU's when the model
        fell back to the CPU or runs on another GPU), so those are left out with a warning instead."""
        have = {("cpu", 0)} if cpu_arena else set()
        if self._device is not None:
            have.add(("gpu", self._device))
        kept = [f"{device}:{number}" for device, number in arenas if (device, number) in have]
        dropped = [f"{device}:{number}" for device, number in arenas if (device, number) not in have]
        if dropped:
            log.warning(
                "model '%s': %s names %s, which this session has no arena for (it runs on %s); %s",
                model,
                ARENA_SHRINKAGE,
                ", ".join(dropped),
                "the CPU" if self._device is None else f"GPU {self._device}",
                f"shrinking {';'.join(kept)} only" if kept else "not shrinking any",
            )
        if kept:
            self._run_options.add_run_config_entry(ARENA_SHRINKAGE, ";".join(kept))

    def place_instance_groups(self, config: mc.ModelConfig) -> None:
        """Make the served config's instance groups say where the model runs (`place_instance_groups`)."""
        place_instance_groups(config.instance_group, self._device)

    def pad_to_max_batch_size(self, config: mc.ModelConfig) -> None:
        """Take `tensorgate.pad_batches` from the completed config (max_batch_size filled in): make a session for
        each padding size but the largest, which runs on the first one. Without this call nothing is padded. The
        repository calls it once, after the model's checks, so that a model that fails them makes no more
        sessions; then the model's bytes are dropped and no other session can be made."""
        pads = pad_sizes(config, self._version)
        self._sessions = {
            size: self._session if size == pads[-1] else self._open_session(config.name, size) for size in pads
        }
        if len(pads) > 1:
            log.info(
                "model '%s' version %s: batches padded to %s rows, one onnxruntime session per size",
                config.name,
                self._version if self._version is not None else "-",
                ", ".join(map(str, pads)),
            )
        self._source = None
        hint = padding_hint(config, on_gpu=self._device is not None)
        if hint:
            log.info("%s", hint)

    def _open_session(self, model: str, size: int) -> ort.InferenceSession:
        source = self._source
        if source is None:
            raise ModelLoadError(model, self._version, "padding sizes can only be set once, as the model loads")
        # The options still name the external data folder the first session was made with (for a model that may
        # have none, an empty folder since removed): the same bytes loaded with it, so they load again.
        try:
            session = ort.InferenceSession(source.model, sess_options=source.options, providers=source.providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises plain RuntimeError subclasses
            raise _load_error(model, self._version, source.path, exc, f"its session for padding size {size}") from exc
        got, first = session.get_providers(), self._session.get_providers()
        if got != first:
            # A size on other providers would run elsewhere, unannounced, and fail every run over a GPU arena
            # setting the first session has.
            raise ModelLoadError(
                model,
                self._version,
                f"its session for padding size {size} runs on {', '.join(got)}, the first on {', '.join(first)}; "
                f"list fewer sizes in {PAD_BATCHES} (each session takes its own device memory)",
            )
        return session

    @property
    def execution_provider(self) -> str:
        return self._provider

    def _feed(self, name: str, array: np.ndarray) -> np.ndarray:
        if name not in self._string_inputs:
            return array
        # ONNX string tensors take Python str; BYTES that are not UTF-8 cannot be represented, so refuse them.
        flat = array.reshape(-1)
        out = np.empty(flat.shape, dtype=object)
        for i, item in enumerate(flat):
            try:
                out[i] = item.decode("utf-8") if isinstance(item, bytes) else str(item)
            except UnicodeDecodeError as exc:
                raise InvalidRequestError(
                    self._model,
                    self._version,
                    f"element {i} is not valid UTF-8; ONNX string tensors carry text only",
                    tensor=name,
                ) from exc
        return out.reshape(array.shape)

    def execute(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str], context: BatchContext = NO_CONTEXT
    ) -> dict[str, np.ndarray]:
        feed = {name: self._feed(name, arr) for name, arr in inputs.items()}
        rows = next(iter(feed.values())).shape[0] if self._sessions and feed else 0
        size = next((s for s in self._sessions if s >= rows), 0) if rows else 0
        padded = rows < size
        if padded:
            feed = pad_feed(feed, size)
        try:
            session = self._sessions[size] if size else self._session
            if self._bf16:
                results = bf16.run(session, outputs, feed, self._run_options)
            else:
                results = session.run(list(outputs), feed, self._run_options)
        except Exception as exc:  # noqa: BLE001 - translate onnxruntime's errors at the boundary
            raise BackendError(self._model, self._version, f"onnxruntime: {exc}") from exc
        if padded:
            # Only the real rows go back; an output without the padded rows is left for the split to refuse.
            results = [r[:rows] if r.ndim and r.shape[0] == size else r for r in results]
        return dict(zip(outputs, results, strict=True))

    def interrupt(self) -> None:
        """A forced stop: running batches end at their next node, with onnxruntime's "terminate flag" error."""
        self._run_options.terminate = True

    def close(self) -> None:
        # Dropping the sessions releases their memory (and GPU allocations) once running calls return.
        del self._session
        self._sessions.clear()
        self._source = None
