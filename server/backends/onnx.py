"""ONNX Runtime backend: session options from config, execution provider choice with a CPU fallback.

The provider decision is a pure function (`choose_providers`) so that it is tested on machines without a GPU;
whether CUDA really took is then read back from the session, because ONNX Runtime silently drops providers it
cannot initialise.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
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
from tensorgate.server.errors import BackendError, InvalidRequestError, ModelLoadError, without_paths

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

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


def choose_providers(
    kind: int,
    gpus: Sequence[int],
    available: Sequence[str],
    *,
    model: str,
    cuda: Mapping[str, str] | None = None,
) -> ProviderChoice:
    """Pick providers for an instance group kind; `cuda` holds CUDA provider options (`cuda_options`).

    KIND_GPU asks for CUDA and warns when it is missing; KIND_AUTO takes CUDA when present and CPU quietly
    otherwise; KIND_CPU (and KIND_MODEL) use the CPU.
    """
    if kind in (mc.ModelInstanceGroup.KIND_GPU, mc.ModelInstanceGroup.KIND_AUTO) and CUDA in available:
        device = str(gpus[0]) if gpus else "0"
        return ProviderChoice([(CUDA, {"device_id": device, **(cuda or {})}), CPU], wants_gpu=True)
    if kind == mc.ModelInstanceGroup.KIND_GPU:
        return ProviderChoice(
            [CPU],
            wants_gpu=False,
            warning=(
                f"model '{model}' asks for a GPU (KIND_GPU) but this onnxruntime build has no {CUDA} "
                f"(available: {', '.join(available)}); running on the CPU"
            ),
        )
    return ProviderChoice([CPU], wants_gpu=False)


def _string_param(config: mc.ModelConfig, key: str) -> str | None:
    p = config.parameters.get(key)
    return p.string_value if p is not None and p.string_value != "" else None


# Triton's onnxruntime backend numbers cuDNN's convolution algorithm searches; ONNX Runtime names them.
CONV_ALGO_SEARCH = {"0": "EXHAUSTIVE", "1": "HEURISTIC", "2": "DEFAULT"}
DEFAULT_CONV_ALGO_SEARCH = "HEURISTIC"


def cuda_options(config: mc.ModelConfig, version: int | None = None) -> dict[str, str]:
    """CUDA provider options from config (Triton's key `cudnn_conv_algo_search`: 0/1/2 or the names).

    The default is HEURISTIC, where ONNX Runtime and Triton default to EXHAUSTIVE. ONNX Runtime's cuDNN
    convolutions build a new plan whenever their input shape changes, and a dynamic batcher changes the batch
    size almost every call; EXHAUSTIVE makes each plan far dearer. Measured on an H200 (benchmarks/gpu_batching.py,
    a ResNet-style CNN, 32-row requests at c=8): 7,205 rows/s with HEURISTIC against 1,297 with EXHAUSTIVE, whose
    batches took 83 ms against 15 ms. DEFAULT was not measured.
    Checked on every machine, so a typo fails the load where it is written, not only where a GPU is.
    """
    raw = _string_param(config, "cudnn_conv_algo_search")
    if raw is None:
        return {"cudnn_conv_algo_search": DEFAULT_CONV_ALGO_SEARCH}
    mode = CONV_ALGO_SEARCH.get(raw.strip(), raw.strip().upper())
    if mode not in CONV_ALGO_SEARCH.values():
        raise ModelLoadError(
            config.name,
            version,
            f"parameter 'cudnn_conv_algo_search' must be 0 (EXHAUSTIVE), 1 (HEURISTIC) or 2 (DEFAULT), got '{raw}'",
        )
    return {"cudnn_conv_algo_search": mode}


def pad_requested(config: mc.ModelConfig, version: int | None = None) -> bool:
    """Whether the config sets `tensorgate.pad_batches: "true"` (see `pad_rows`); any other value than true or
    false fails the load."""
    raw = _string_param(config, "tensorgate.pad_batches") or "false"
    if raw.strip().lower() not in ("true", "false"):
        raise ModelLoadError(config.name, version, f"tensorgate.pad_batches must be true or false, got '{raw}'")
    return raw.strip().lower() == "true"


def pad_rows(config: mc.ModelConfig, version: int | None = None) -> int:
    """Rows to pad every run to (`tensorgate.pad_batches: "true"` -> max_batch_size), or 0 for none. Read it from
    the completed config: a model whose config leaves max_batch_size out gets it from the model file.

    For convolutional models on CUDA: ONNX Runtime's cuDNN convolutions keep the plan of the last input shape
    only and build a new one whenever the batch size changes, which a dynamic batcher does almost every call
    (measured on an H200 with HEURISTIC search: about 15 ms per batch against 1.5 ms for the same batch run at one
    fixed size). Padding keeps one shape, at the price of computing the padding rows. Off by default: on the CPU
    the padding rows are pure cost. Correct only for models whose rows are independent (each output row depends
    on its input row alone), which is what batching already assumes. Statistics count the real rows.
    """
    if not pad_requested(config, version):
        return 0
    if config.max_batch_size <= 0:
        raise ModelLoadError(
            config.name, version, "tensorgate.pad_batches needs a batch dimension (max_batch_size > 0) to pad"
        )
    return config.max_batch_size


def pad_feed(feed: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Each input grown to `rows` along the batch dimension by repeating its last row: a copy of real data, so
    that the padding is valid input for any model and any data type (BYTES included)."""
    padded: dict[str, np.ndarray] = {}
    for name, array in feed.items():
        have = array.shape[0]
        if have >= rows or have == 0:
            padded[name] = array
            continue
        out = np.empty((rows, *array.shape[1:]), dtype=array.dtype)
        out[:have] = array
        out[have:] = array[have - 1]
        padded[name] = out
    return padded


def default_intra_op_threads() -> int:
    """Cores this process may use, minus one for the event loop; at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def session_options(config: mc.ModelConfig) -> ort.SessionOptions:
    """Threads and graph optimisation from config, using the keys of Triton's onnxruntime backend."""
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
    spinning = (_string_param(config, "tensorgate.intra_op_spinning") or "false").lower()
    if spinning not in ("true", "false"):
        raise ModelLoadError(config.name, None, f"tensorgate.intra_op_spinning must be true or false, got '{spinning}'")
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning == "true" else "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning == "true" else "0")
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
    return opts


def _load_error(model: str, version: int | None, path: Path, exc: Exception) -> ModelLoadError:
    """onnxruntime names the file by its absolute path, but this reason goes over the wire: callers get it from the
    model's directory (`1/model.onnx`; the message already names the model), never the server's directory layout."""
    detail = without_paths(str(exc), path.parent.parent, path, path.parent)
    return ModelLoadError(model, version, f"onnxruntime could not load {path.name}: {detail}")


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


class OnnxBackend:
    """One ONNX Runtime session; `execute` may be called from several threads at once (sessions allow it)."""

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
        # A bad value fails the load at once; a max_batch_size the repository completes later arrives through
        # pad_to_max_batch_size().
        self._pad_to = config.max_batch_size if pad_requested(config, version) and config.max_batch_size > 0 else 0
        self._version = version
        available = list(available_providers if available_providers is not None else ort.get_available_providers())
        group = config.instance_group[0] if config.instance_group else mc.ModelInstanceGroup()
        choice = choose_providers(
            group.kind, list(group.gpus), available, model=config.name, cuda=cuda_options(config, version)
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
        used = self._session.get_providers()
        if choice.wants_gpu and CUDA not in used and not fell_back:
            log.warning(
                "model '%s': %s was requested but onnxruntime did not enable it (providers in use: %s); "
                "running on the CPU",
                config.name,
                CUDA,
                ", ".join(used),
            )
        self._provider = used[0] if used else CPU
        self.inputs = {a.name: a for a in self._session.get_inputs()}
        self.outputs = {a.name: a for a in self._session.get_outputs()}
        self._string_inputs = {n for n, a in self.inputs.items() if a.type == "tensor(string)"}
        self._run_options = ort.RunOptions()
        """Shared by every run of this session: `interrupt` sets its terminate flag (an atomic in ONNX Runtime),
        which each run checks between nodes."""
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

    def pad_to_max_batch_size(self, config: mc.ModelConfig) -> None:
        """Take `tensorgate.pad_batches` from the completed config (max_batch_size filled in)."""
        self._pad_to = pad_rows(config, self._version)

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
        rows = next(iter(feed.values())).shape[0] if self._pad_to and feed else 0
        padded = 0 < rows < self._pad_to
        if padded:
            feed = pad_feed(feed, self._pad_to)
        try:
            if self._bf16:
                results = bf16.run(self._session, outputs, feed, self._run_options)
            else:
                results = self._session.run(list(outputs), feed, self._run_options)
        except Exception as exc:  # noqa: BLE001 - translate onnxruntime's errors at the boundary
            raise BackendError(self._model, self._version, f"onnxruntime: {exc}") from exc
        if padded:
            # Only the real rows go back; an output without the padded rows is left for the split to refuse.
            results = [r[:rows] if r.ndim and r.shape[0] == self._pad_to else r for r in results]
        return dict(zip(outputs, results, strict=True))

    def interrupt(self) -> None:
        """A forced stop: running batches end at their next node, with onnxruntime's "terminate flag" error."""
        self._run_options.terminate = True

    def close(self) -> None:
        # Dropping the session releases its memory (and GPU allocations) once running calls return.
        del self._session
