"""The model repository: which models and versions are loaded, their states, and load/unload/poll.

Loading happens on a worker thread and the new versions replace the old ones in one step, so requests never see
a half-loaded model; versions that are replaced finish their in-flight requests before they are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import errno
import functools
import hashlib
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tensorgate.protos import model_config_pb2 as mc
from tensorgate.server.backends.base import Backend, SequenceId, backend_ready
from tensorgate.server.backends.ensemble import EnsembleBackend
from tensorgate.server.backends.onnx import ONNX_TYPES, OnnxBackend
from tensorgate.server.backends.triton import (
    DEFAULT_REMOTE_INSTANCES,
    REMOTE_VERSION,
    TritonBackend,
    check_override,
    complete_config,
)
from tensorgate.server.decimal_text import parse_canonical
from tensorgate.server.errors import (
    InvalidConfigError,
    InvalidRequestError,
    ModelLoadError,
    ModelNotFoundError,
    ModelUnavailableError,
    PermissionDeniedError,
    ResourceExhaustedError,
    TensorgateError,
    model_ref,
    unexpected_error_text,
    with_prefix,
)
from tensorgate.server.file_stamp import file_stamp
from tensorgate.server.repository.config import (
    CONFIG_FILE,
    DEFAULT_ONNX_FILENAME,
    TRITON_BACKEND,
    TensorInfo,
    autocomplete,
    check_backend,
    check_onnx_inputs,
    check_supported,
    fill_defaults,
    parse_config,
    read_config,
    select_versions,
    version_dirs,
)
from tensorgate.server.repository.ensemble import EnsemblePlan, Step, bind, is_ensemble, plan_of
from tensorgate.server.repository.labels import read_labels
from tensorgate.server.repository.parameters import check_parameter_keys
from tensorgate.server.repository.paths import inside, within
from tensorgate.server.repository.rollout import (
    PREFIX,
    NoRolloutError,
    Rollout,
    RolloutSpec,
    parse_rollout,
    with_rollout_parameters,
)
from tensorgate.server.repository.schema import ModelSchema
from tensorgate.server.repository.sequence import (
    SequenceSpec,
    check_sequence_config,
    scheduler_tensors,
    sequence_spec,
)
from tensorgate.server.repository.warmup import run_warmup
from tensorgate.server.scheduling.policy import SchedulingPolicy
from tensorgate.server.scheduling.remote_sequences import Order, RemoteSequences
from tensorgate.server.scheduling.scheduler import Scheduler
from tensorgate.server.scheduling.sequencer import Sequencer
from tensorgate.server.telemetry.statistics import LatencyHistograms, ModelStats
from tensorgate.server.telemetry.tracing import Tracing

log = logging.getLogger(__name__)

READY = "READY"
UNAVAILABLE = "UNAVAILABLE"
LOADING = "LOADING"

PROVIDER_PARAMETER = "tensorgate.execution_provider"
# config.pbtxt: parameters { key: "tensorgate.sha256" value { string_value: "<hex>" } } pins the model file's
# digest; "tensorgate.sha256:<version>" pins one version's file and wins for that version. Prefixed, as every
# tensorgate-only setting, so that the file stays valid for Triton.
SHA256_PARAMETER = "tensorgate.sha256"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
StepCheck = Callable[[str, bool], None]
"""The right of the caller loading an ensemble to one of its step models (the model, and whether this load would
load it): raises PermissionDeniedError. An ensemble reaches its steps, so one uploaded by a caller must not expose
a model that caller may not use."""

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,254}$")


@dataclass(slots=True)
class LoadedModel:
    """One servable version: config as served, schema for validation, backend, scheduler, counters."""

    name: str
    version: int
    config: mc.ModelConfig
    schema: ModelSchema
    backend: Backend
    scheduler: Scheduler | None
    """None for an ensemble: its steps queue in their composing models' schedulers."""
    stats: ModelStats
    signature: str
    load_seconds: float = 0.0
    """How long reading, building and warming up this version took."""
    plan: EnsemblePlan | None = None
    """An ensemble's steps (repository/ensemble.py); None for a model that runs itself."""
    sequencer: Sequencer | None = None
    """A sequence (stateful) model's sequences, in front of its scheduler; None for any other model."""
    remote_sequences: RemoteSequences | None = None
    """A sequence model on an upstream Triton: the order its sequences' requests go upstream in."""
    rollout: Rollout | None = None
    """The model's split (repository/rollout.py), the same on each of its versions; None without one."""


@dataclass(slots=True)
class IndexRow:
    name: str
    version: str
    state: str
    reason: str


@dataclass(slots=True)
class _Entry:
    name: str
    versions: dict[int, LoadedModel] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    state: str = LOADING
    reason: str = ""
    attempted: str | None = None
    """Signature of the files last tried, so that polling does not retry an unchanged broken model."""
    uploaded: bool = False
    """Serving files sent with RepositoryModelLoad: nothing on disk to load it again from."""
    transient: bool = False
    """Its last load failed only on what may change by itself (its upstream down): `retry_remote` tries again."""
    rollout: Rollout | None = None
    """The split of requests that name no version (tensorgate.rollout.*), as built for `versions`."""
    unloaded: tuple[int, ...] = ()
    """The versions it served when last unloaded: RepositoryIndex keeps a row for each, as Triton's does."""
    last_load: tuple[str | None, bool] = (None, False)
    """The config override and whether files were uploaded, of the last load tried: an ensemble loaded again when
    a step model comes back (`_refresh`) is loaded as it was, not as the disk has it."""


class _Override:
    """A config override (RepositoryModelLoad's `config`), parsed once, when its load is asked for: the checks
    (`check_override`) and the load (`_prepare`) read the same config. A text that does not parse keeps its error,
    which the load reports, naming where the text breaks, as it reports a config.pbtxt's."""

    __slots__ = ("_error", "parsed", "text")

    def __init__(self, name: str, text: str) -> None:
        self.text = text
        self.parsed: tuple[mc.ModelConfig, bool] | None = None
        """The config and whether it writes max_batch_size (`parse_config`); None when it does not parse."""
        self._error: InvalidConfigError | None = None
        try:
            self.parsed = parse_config(name, text)
        except InvalidConfigError as exc:
            self._error = exc

    def config(self) -> tuple[mc.ModelConfig, bool]:
        """`parsed`, or the parse error."""
        if self.parsed is None:
            assert self._error is not None
            raise self._error
        return self.parsed


@dataclass(slots=True)
class _Prepared:
    """A version built on a worker thread; the scheduler is added on the event loop."""

    version: int
    config: mc.ModelConfig
    schema: ModelSchema
    backend: Backend
    policy: SchedulingPolicy
    signature: str
    load_seconds: float = 0.0
    plan: EnsemblePlan | None = None
    sequence: SequenceSpec | None = None


UNLOADED = "unloaded"


def _write_files(name: str, model_dir: Path, files: dict[str, bytes]) -> None:
    """Write files sent with RepositoryModelLoad (paths checked by the codec) under `model_dir`; a path the file
    system refuses (too long, a file where a directory must be) is the caller's mistake."""
    for rel, data in files.items():
        target = model_dir / rel
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # the server's disk, not the caller's mistake
                raise ResourceExhaustedError(
                    f"{model_ref(name)}: 'file:{rel}' cannot be written: {exc.strerror} (the server's temporary "
                    "directory); nothing was loaded"
                ) from exc
            raise InvalidRequestError(name, None, f"'file:{rel}' cannot be written: {exc.strerror}") from exc


def _label_signature(model_dir: Path, filename: str) -> str:
    """A label file's part of a version's signature: only a file inside the model directory (anything else fails
    the load, and must not be walked first)."""
    path = inside(model_dir, filename)
    try:
        if path is None or not path.is_file():
            return ""
    except OSError:
        return ""
    return _file_signature(path)


def _remote_sequence_model(config: mc.ModelConfig) -> bool:
    """A sequence model served by an upstream Triton, whose sequence batcher keeps the state: tensorgate forwards
    its requests in order (server/scheduling/remote_sequences.py) instead of sequencing them itself."""
    return config.backend == TRITON_BACKEND and config.HasField("sequence_batching")


def is_unloaded(reason: str) -> bool:
    """Unloaded on purpose (RepositoryModelUnload, a directory removed in poll mode), or with a step model of an
    ensemble that was: not a failure, so the server stays ready."""
    return reason == UNLOADED or reason.startswith(f"{UNLOADED} with its step model ")


def _reason(exc: TensorgateError) -> str:
    """The cause alone, without the "failed to load model ..." framing that the final error adds once."""
    if isinstance(exc, ModelLoadError):
        return exc.reason
    if isinstance(exc, InvalidConfigError):
        return exc.problem
    return exc.message


CLOSE_THREADS = 4
"""Backends closing at once (`ModelRepository._closer`); more wait their turn without holding up anything else."""


def _close_all(backends: list[Backend]) -> None:
    """On a close thread: a remote backend's close can take seconds."""
    for backend in backends:
        backend.close()


def _ramp_place(spec: RolloutSpec, versions: Mapping[int, LoadedModel]) -> str | None:
    """What a ramp's place depends on: the canary version and its build (its files' signature), and the ramp. A
    ramp kept across a restart resumes only while all of these are the same; None without a ramp."""
    canary = versions.get(spec.canary) if spec.canary is not None and spec.ramp else None
    if canary is None:
        return None
    return f"{spec.canary}:{canary.signature}:{spec.steps}:{spec.ramp_interval_s:g}:{spec.ramp_min_requests}"


def _file_signature(path: Path) -> str:
    """Names and stamps (`file_stamp`: size, times, inode) of the files under `path`. Files come and go while it
    is read (an rsync's temporary files, a version being copied in): one that vanishes is left out, and a
    directory that vanishes makes the signature of what could be read; either way the next poll sees a change
    and loads again."""
    h = hashlib.sha256()
    try:
        found = sorted(path.rglob("*")) if path.is_dir() else [path]
    except FileNotFoundError:
        found = []
    for p in found:
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        if stat.S_ISREG(st.st_mode):
            h.update(f"{p.relative_to(path.parent)}:{file_stamp(st)};".encode())
    return h.hexdigest()


def _check_alert_rules(config: mc.ModelConfig) -> None:
    """A malformed ``tensorgate.alert.*`` parameter fails the load with its reason: a rule that could not be read
    would otherwise never fire, which is worse than a model that does not load."""
    # The monitoring package (scipy and all) is imported only for a model that has alert rules.
    if not any(key.startswith("tensorgate.alert.") for key in config.parameters):
        return
    from tensorgate.server.monitoring.alerts import AlertRuleError, rules_from_config

    try:
        rules_from_config({k: v.string_value for k, v in config.parameters.items()}, model=config.name)
    except AlertRuleError as exc:
        raise ModelLoadError(config.name, None, str(exc)) from exc


class ModelRepository:
    """Owns every loaded model; all methods run on the event loop."""

    def __init__(
        self,
        root: Path,
        *,
        default_max_batch_size: int = 4,
        available_providers: Sequence[str] | None = None,
        unload_grace: float = 30.0,
        latency_histograms: bool = False,
        tracing: Tracing | None = None,
        allowed_upstreams: Sequence[str] = (),
        response_cache: bool | None = None,
        monitored: bool | None = None,
    ) -> None:
        self.root = root.resolve()
        self._monitored = monitored
        """Whether the server monitors its models (--data-dir); False: a load that builds a canary split with
        rollback_on_alert on warns that no alert can roll it back. None: not said (no warning)."""
        self._response_cache = response_cache
        """Whether the server caches answers (--response-cache-bytes); False: a load of a model whose config enables
        response_cache warns that the setting does nothing. None: not said (no warning)."""
        self._allowed_upstreams = tuple(allowed_upstreams)
        """--allowed-upstreams: the upstream urls a config override may name besides its model's own on disk."""
        self._latency_histograms = latency_histograms
        self._tracing = tracing
        self._default_mbs = default_max_batch_size
        self._providers = available_providers
        self._grace = unload_grace
        self._entries: dict[str, _Entry] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._loading: set[asyncio.Task[None]] = set()
        """Loads in progress, held so that a load whose caller went away is not collected before it ends."""
        self._stopping = threading.Event()
        """Set by close(): loads still running on threads give up between versions and warm-up runs."""
        self._closing: set[asyncio.Task[None]] = set()
        self._retiring: dict[int, LoadedModel] = {}
        """Versions no longer served (`_retire`: an unload, a reload) still finishing what they took, by id: a stop
        whose grace ends must refuse their queues and cut their batches short too (`draining`)."""
        self._closer = ThreadPoolExecutor(CLOSE_THREADS, thread_name_prefix="tensorgate-close")
        """Where retired backends close: a remote one's close takes seconds when its upstream is gone, and on the
        default executor a few of those would hold up every model load behind them."""
        self._firing: dict[tuple[str, str], set[str]] = {}
        self._ramp_places: dict[str, tuple[str, int]] = {}
        """Each model's ramp place and step as last moved (`remember_ramps`), by model."""
        self._save_ramp: Callable[[str, str, int], None] | None = None
        """The alert rules firing per (model, version) as the monitor last said (`follow_alerts`): a split built
        later (a reload, a new canary, a load after an unload) starts from it rather than give the canary its share
        until the next evaluation."""
        self._sequence_order: dict[str, Order] = {}
        """Per remote sequence model, the order its sequences' requests go upstream in and who started each
        sequence, kept across reloads."""
        self._loading_plans: dict[str, EnsemblePlan] = {}
        """Ensembles whose steps are being checked, for the cycle check of others loaded at the same time."""
        self._dependents: dict[str, set[str]] = {}
        """Model -> the ensembles with a step on it: checked again when its versions change."""
        self._checking_ready: set[str] = set()
        self._explicit: set[str] = set()
        """Models a load asked for by name (RepositoryModelLoad, --load-model, the repository scan) since they were last
        unloaded, as against those only an ensemble's load brought in: what unload_dependents leaves loaded."""
        self.changes = 0
        """Counts changes to the served set (a load, an unload, a retired version closed): what lives as long as
        the models do has changed (the server settles its heap then; server/heap.py)."""
        self.after_artifact_read: Callable[[Path], None] | None = None
        """Called on the loading thread with a model file's path once its bytes are read and checked, before the
        session is built from them (tests/test_artifact_integrity.py swaps the file there)."""

    # ----- lookup (hot path) -------------------------------------------------------------------------------

    def get(self, name: str, version: str, request_id: str = "") -> LoadedModel:
        """The version to serve; NOT_FOUND for unknown models/versions, UNAVAILABLE for ones not ready. A request
        that names no version goes to the highest served one, or where the model's rollout sends `request_id` (the
        request's id, or its sequence's, so that a sequence's steps all reach one version)."""
        entry = self._entries.get(name)
        if entry is None:
            if self._model_dir(name, must_exist=False) is not None:
                raise ModelUnavailableError(name, version, "the model is not loaded")
            raise ModelNotFoundError(name, version)
        if version == "":
            if entry.versions:
                rollout = entry.rollout
                if rollout is None:
                    return entry.versions[max(entry.versions)]
                return entry.versions[rollout.choose(request_id)]
            raise ModelUnavailableError(name, None, entry.reason or entry.state.lower())
        number = parse_canonical(version)
        if number is None:
            raise ModelNotFoundError(name, version, "versions are written as plain decimal numbers")
        found = entry.versions.get(number)
        if found is not None:
            return found
        if number in entry.failed:
            raise ModelUnavailableError(name, version, entry.failed[number])
        if not entry.versions:
            raise ModelUnavailableError(name, version, entry.reason or entry.state.lower())
        raise ModelNotFoundError(name, version, f"served versions are {sorted(entry.versions)}")

    def loaded(self) -> list[LoadedModel]:
        return [m for e in self._entries.values() for m in e.versions.values()]

    def rollout(self, name: str) -> Rollout:
        """The model's split as it serves now (GetRollout): NOT_FOUND for an unknown model or one without a split,
        UNAVAILABLE for one that serves no version."""
        self.get(name, "")
        entry = self._entries[name]
        if entry.rollout is None:
            configured = any(k.startswith(PREFIX) for m in entry.versions.values() for k in m.config.parameters)
            raise NoRolloutError(name, configured=configured)
        return entry.rollout

    def rollouts(self) -> list[Rollout]:
        """The splits of the models served now (for metrics)."""
        return [e.rollout for e in list(self._entries.values()) if e.rollout is not None and e.versions]

    def follow_alerts(
        self, firing: dict[tuple[str, str], set[str]], *, evaluated: bool = True, started: float | None = None
    ) -> None:
        """The alert rules firing per (model, version), after each monitor evaluation, and at start those the data
        dir kept firing (`evaluated` False: no evaluation a ramp may count; on the event loop: the monitor hands
        it over; `started`: when the evaluation began, time.monotonic). Kept for the splits built later."""
        self._firing = firing
        for rollout in self.rollouts():
            self._follow(rollout, evaluated=evaluated, started=started)

    def _follow(self, rollout: Rollout, *, evaluated: bool, started: float | None = None) -> None:
        if rollout.canary is not None:
            firing = self._firing.get((rollout.model, str(rollout.canary)), set())
            rollout.follow(firing, evaluated=evaluated, started=started)

    def versions(self, name: str) -> list[LoadedModel]:
        """Every ready version of a model (for statistics), NOT_FOUND if unknown."""
        entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFoundError(name)
        return [entry.versions[v] for v in sorted(entry.versions)]

    def metric_labels(self, name: str, version: str) -> tuple[str, str]:
        """(model, version) labels for a request that did not succeed, bounded by what the repository knows: a
        name or version it has never loaded becomes "" so that callers cannot mint new time series."""
        entry = self._entries.get(name)
        if entry is None:
            return "", ""
        if version == "":
            return name, str(max(entry.versions)) if entry.versions else ""
        number = parse_canonical(version)
        if number is not None:
            if number in entry.versions or number in entry.failed:
                return name, version
        return name, ""

    def states(self) -> list[IndexRow]:
        """What every model the server has tried to load is doing now, without looking at the disk (for metrics):
        READY versions, failed versions, and one versionless row for a model that is loading, failed or unloaded."""
        rows: list[IndexRow] = []
        for name, entry in list(self._entries.items()):
            rows.extend(IndexRow(name, str(v), READY, "") for v in entry.versions)
            rows.extend(IndexRow(name, str(v), UNAVAILABLE, reason) for v, reason in entry.failed.items())
            if not entry.versions and not entry.failed:
                rows.append(IndexRow(name, "", entry.state, entry.reason))
        return rows

    def all_ready(self) -> bool:
        """Server readiness: every model that should be loaded is, none failed, and every upstream is ready."""
        return not self.not_ready()

    def not_ready(self) -> list[str]:
        """The models that keep the server from being ready (`all_ready`), for the log line that says why."""
        return [
            name
            for name, e in self._entries.items()
            if not is_unloaded(e.reason)
            and not (e.state == READY and all(backend_ready(m.backend) for m in e.versions.values()))
        ]

    # ----- the repository on disk --------------------------------------------------------------------------

    def _model_dir(self, name: str, *, must_exist: bool = True) -> Path | None:
        """Map a model name to its directory without letting it leave the repository. The path keeps the name
        asked for: a link to another model's directory serves under the link's name (the name comes from the
        directory), and every file read through it is checked again against the repository."""
        if not _NAME.match(name) or name in (".", ".."):
            if must_exist:
                raise InvalidRequestError(name, None, "model names may use letters, digits, '_', '-' and '.' only")
            return None
        path = self.root / name
        try:
            resolved = path.resolve(strict=True)
        except (FileNotFoundError, RuntimeError, OSError):
            return None
        if resolved.parent != self.root or not resolved.is_dir():
            if must_exist:
                raise InvalidRequestError(name, None, "the model directory leaves the model repository")
            return None
        return path

    def names_on_disk(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and self._model_dir(p.name, must_exist=False))

    def signature(self, name: str) -> str | None:
        """A digest of a model's directory listing (names, sizes, mtimes); None when it is gone."""
        model_dir = self._model_dir(name, must_exist=False)
        return None if model_dir is None else _file_signature(model_dir)

    # ----- loading -----------------------------------------------------------------------------------------

    def _prepare(
        self, model_dir: Path, override: _Override | None, reuse: dict[int, LoadedModel]
    ) -> tuple[dict[int, _Prepared | LoadedModel], dict[int, str], set[int], RolloutSpec | None]:
        """Blocking: read config, build each version's session, complete the config, warm up. Returns the
        versions built, the reasons of those that failed, which of those failed transiently, and the rollout the
        config asks for."""
        name = model_dir.name
        if override is not None:
            base, mbs_given = override.config()
        else:
            base, mbs_given = read_config(model_dir)
        check_backend(base)
        check_supported(base)
        check_parameter_keys(base)
        fill_defaults(base)
        _check_alert_rules(base)
        if base.response_cache.enable and self._response_cache is False:  # as Triton, it serves; but say why uncached
            log.warning(
                "model '%s' enables response_cache, but the server has no response cache: its answers are not "
                "cached (start the server with --response-cache-bytes N)",
                name,
            )
        plan = plan_of(base) if is_ensemble(base) else None
        # Without tensorgate.rollout.*: a new split changes no version (`_rollout` rebuilds only the split).
        base_text = with_rollout_parameters(base, ()).SerializeToString(deterministic=True).hex()
        on_disk = version_dirs(model_dir)
        # A model on an upstream Triton has no files to version: it serves as one version (backends/triton.py).
        wanted = [REMOTE_VERSION] if base.backend == TRITON_BACKEND else select_versions(base.version_policy, on_disk)
        if not wanted:
            raise ModelLoadError(
                name, None, f"no version directory matches the version policy (found {on_disk or 'none'})"
            )
        rollout = parse_rollout(base, wanted, reuse)  # before any session is built: a typo costs nothing
        ready: dict[int, _Prepared | LoadedModel] = {}
        failed: dict[int, str] = {}
        transient: set[int] = set()
        # Files beside the versions that a version is built from (label files): an edit must reload it too.
        shared = "".join(_label_signature(model_dir, o.label_filename) for o in base.output if o.label_filename)
        for v in wanted:
            if self._stopping.is_set():
                break
            vdir = model_dir / str(v)
            sig = hashlib.sha256((base_text + shared + _file_signature(vdir)).encode()).hexdigest()
            old = reuse.get(v)
            # Unchanged files keep the version that serves, unless it is a remote model whose upstream came back
            # as another model (backends/triton.py `changed`): a load reads that one afresh. One whose upstream is
            # only down is kept, as before (its watcher brings it back).
            if old is not None and old.signature == sig and getattr(old.backend, "changed", None) is None:
                ready[v] = old
                continue
            try:
                if plan is not None:
                    ready[v] = self._prepare_ensemble(base, plan, model_dir, v, sig)
                else:
                    ready[v] = self._prepare_version(base, mbs_given, vdir, v, sig)
            except TensorgateError as exc:
                failed[v] = _reason(exc)
                if isinstance(exc, ModelLoadError) and exc.transient:
                    transient.add(v)
                if not self._stopping.is_set():  # a warm-up cut short by the stop failed nothing (logged below)
                    log.error("%s", exc.message)
            except Exception as exc:  # noqa: BLE001 - a bug fails this version, not the model's other versions
                failed[v] = unexpected_error_text(exc, model_dir.parent)
                log.exception("unexpected error preparing model '%s' version %d", name, v)
        if self._stopping.is_set():  # nobody will serve what was built: release it here
            for item in ready.values():
                if isinstance(item, _Prepared):
                    item.backend.close()
            raise ModelLoadError(name, None, "the server is stopping")
        return ready, failed, transient, rollout

    def _prepare_ensemble(
        self, base: mc.ModelConfig, plan: EnsemblePlan, model_dir: Path, version: int, sig: str
    ) -> _Prepared:
        """An ensemble version: nothing to build; its steps are checked against the composing models on the loop
        (`_bind`), once those are loaded."""
        config = copy.deepcopy(base)
        for step in config.ensemble_scheduling.step:
            if step.model_version == 0:  # left out: served as Triton writes "the latest" (perf_analyzer reads it)
                step.model_version = -1
        try:
            schema = ModelSchema.from_config(config, labels=read_labels(config, model_dir))
            policy = SchedulingPolicy.from_config(config)
        except InvalidConfigError as exc:
            raise ModelLoadError(config.name, version, exc.problem) from exc
        name = config.name
        backend = EnsembleBackend(ready=lambda: self._steps_ready(name, plan))
        return _Prepared(version, config, schema, backend, policy, sig, 0.0, plan)

    def _plan_of(self, name: str) -> EnsemblePlan | None:
        """The steps another ensemble has: the ones being loaded, else the ones served, else those on disk."""
        plan = self._loading_plans.get(name)
        if plan is not None:
            return plan
        entry = self._entries.get(name)
        if entry is not None and entry.versions:
            return next(iter(entry.versions.values())).plan
        config = self._config_on_disk(name)
        try:
            return plan_of(config) if config is not None and is_ensemble(config) else None
        except TensorgateError:
            return None  # its own load says what is wrong with it

    def _config_on_disk(self, name: str) -> mc.ModelConfig | None:
        """A model's config.pbtxt as the repository holds it; None when it has none, or one that cannot be read
        (its own load says why)."""
        model_dir = self._model_dir(name, must_exist=False)
        if model_dir is None or not (model_dir / CONFIG_FILE).is_file():
            return None
        try:
            return read_config(model_dir)[0]
        except TensorgateError:
            return None

    def _check_no_cycle(self, name: str, plan: EnsemblePlan) -> None:
        """Refuse an ensemble that reaches itself through composing ensembles, as loaded, being loaded (a config
        given with RepositoryModelLoad) or on disk: loading it would wait for its own load."""
        path = [name]

        def visit(current: EnsemblePlan) -> None:
            for model, _ in current.models:
                if model in path:
                    raise InvalidConfigError(name, f"ensemble steps form a cycle: {' -> '.join([*path, model])}")
                inner = self._plan_of(model)
                if inner is not None:
                    path.append(model)
                    visit(inner)
                    path.pop()

        visit(plan)

    def _steps_ready(self, name: str, plan: EnsemblePlan) -> bool:
        """An ensemble is ready while every step's model has a ready version to run it (never on a cycle, which
        loading refuses anyway)."""
        if name in self._checking_ready:
            return False
        self._checking_ready.add(name)
        try:
            for model, version in plan.models:
                try:
                    if not backend_ready(self.get(model, version).backend):
                        return False
                except TensorgateError:
                    return False
            return True
        finally:
            self._checking_ready.discard(name)

    async def _bind(
        self, name: str, ready: dict[int, _Prepared | LoadedModel], check_step: StepCheck | None = None
    ) -> None:
        """Check new ensemble versions against their composing models, loading those not loaded yet (Triton loads
        an ensemble's composing models with it) and waiting for those being loaded."""
        # Versions kept from the last load count too: loading an ensemble again brings back unloaded steps.
        plan = next((item.plan for item in ready.values() if item.plan is not None), None)
        if plan is None:
            return
        # On the loop, with no await between the check and the registration: of two ensembles loaded at once with
        # configs that name each other, the second sees the first's steps.
        self._check_no_cycle(name, plan)
        self._loading_plans[name] = plan
        try:
            for model, _ in plan.models:
                self._dependents.setdefault(model, set()).add(name)
                entry = self._entries.get(model)
                loading = entry is None or is_unloaded(entry.reason)
                if check_step is not None:
                    try:
                        check_step(model, loading)
                    except PermissionDeniedError as exc:
                        raise with_prefix(exc, f"in ensemble '{name}', ") from None
                if loading:
                    try:
                        await self.load(model, check_step=check_step, explicit=False)
                    except PermissionDeniedError:
                        raise  # a nested ensemble's step the caller may not reach
                    except TensorgateError:
                        pass  # its reason is recorded: the lookup below fails with it
                elif entry is not None and entry.state == LOADING:
                    async with self._lock(model):
                        pass  # its load has ended
            for item in ready.values():
                if isinstance(item, _Prepared):
                    self._check_steps(name, item, plan)
        finally:
            del self._loading_plans[name]

    def _check_steps(self, name: str, item: _Prepared | LoadedModel, plan: EnsemblePlan) -> None:
        """The steps against the composing models as served now; the ensemble's labels follow theirs."""

        def composing(step: Step) -> mc.ModelConfig:
            try:
                return self.get(step.model, step.version).config
            except TensorgateError as exc:
                raise ModelLoadError(name, None, f"{step.ref} cannot be served: {exc.message}") from exc

        bind(item.config, plan, composing)
        item.schema = self._inherit_labels(item.schema, plan, item.config)

    def _refresh_dependents(self, name: str, unloaded: bool = False, check_step: StepCheck | None = None) -> None:
        """`name`'s served versions changed: the ensembles that use it are checked again, as Triton reloads them.
        One that failed to load (say its step's model was not there yet), or that was unloaded with it, loads now;
        one that serves is checked against the new versions, and stops serving, with the reason, if they no longer
        fit it. When `name` was `unloaded`, so are they (the server stays ready, as for the model itself).
        `check_step` is the caller's whose load of `name` set this off: an ensemble that loads now binds its step
        models only if that caller may (one whose load was refused for want of that right stays refused)."""
        loop = asyncio.get_running_loop()
        for ensemble in sorted(self._dependents.get(name, ())):
            entry = self._entries.get(ensemble)
            if entry is not None and entry.versions and not self._lock(ensemble).locked():
                # Checked now rather than in a task: until then the ensemble would take requests that meet the new
                # step (an unloaded one, or one of another shape, refused as the caller's INVALID_ARGUMENT).
                self._recheck(ensemble, entry, name if unloaded else None, check_step)
                continue
            task = loop.create_task(self._refresh(ensemble, name if unloaded else None, check_step))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _refresh(self, name: str, unloaded_step: str | None = None, check_step: StepCheck | None = None) -> None:
        entry = self._entries.get(name)
        if entry is None or entry.reason == UNLOADED or entry.state == LOADING:
            return  # a load in progress binds against what is served when it gets there
        if not entry.versions:
            override, uploaded = entry.last_load
            if uploaded:
                return  # its files were sent with a load: the repository's, if any, are another model
            try:
                await self.load(name, override, check_step=check_step, explicit=False)
            except TensorgateError:
                pass  # recorded and logged by the load
            return
        async with self._lock(name):
            self._recheck(name, entry, unloaded_step, check_step)

    def _recheck(self, name: str, entry: _Entry, unloaded_step: str | None, check_step: StepCheck | None) -> None:
        """The served ensemble against its steps as served now: it stops serving, with the reason, if they no
        longer fit. Without an await, so under the ensemble's lock or while nobody holds it."""
        versions = list(entry.versions.values())
        plan = next((m.plan for m in versions if m.plan is not None), None)
        if plan is None:
            return
        try:
            for model in versions:
                self._check_steps(name, model, plan)
        except TensorgateError as exc:
            if unloaded_step is not None:
                reason = f"{UNLOADED} with its step model '{unloaded_step}'"
                log.info("model '%s' %s", name, reason)
            else:
                reason = f"a step's model changed: {_reason(exc)}"
                log.error("model '%s' no longer serves: %s", name, reason)
            entry.unloaded = tuple(sorted(entry.versions)) if unloaded_step is not None else ()
            entry.versions, entry.failed = {}, {}
            entry.state, entry.reason = UNAVAILABLE, reason
            for model in versions:
                self._retire(model)
            self.changes += 1
            self._refresh_dependents(name, unloaded_step is not None, check_step)  # ensembles of this ensemble

    def _inherit_labels(self, schema: ModelSchema, plan: EnsemblePlan, config: mc.ModelConfig) -> ModelSchema:
        """An ensemble output without a label_filename classifies with the labels of the step output that writes
        it, as in Triton (taken again each time the steps are checked: they follow the step model's reloads)."""
        own = {o.name for o in config.output if o.label_filename}
        outputs = dict(schema.outputs)
        for step in plan.steps:
            for model_output, tensor in step.outputs.items():
                spec = outputs.get(tensor)
                if spec is not None and tensor not in own:
                    labels = self.get(step.model, step.version).schema.outputs[model_output].labels
                    outputs[tensor] = dataclasses.replace(spec, labels=labels)
        return dataclasses.replace(schema, outputs=outputs)

    def _prepare_version(self, base: mc.ModelConfig, mbs_given: bool, vdir: Path, version: int, sig: str) -> _Prepared:
        started = time.perf_counter()
        config = copy.deepcopy(base)
        name = config.name
        if config.backend == TRITON_BACKEND:
            return self._prepare_remote(config, mbs_given, vdir.parent, version, sig, started)
        if not config.instance_group:
            config.instance_group.add(name=name, kind=mc.ModelInstanceGroup.KIND_AUTO, count=1)
        filename = config.default_model_filename or "model.onnx"
        if "/" in filename or "\\" in filename or filename in (".", ".."):
            # Checked before the file is looked for: whether a path outside exists is none of the caller's business.
            raise ModelLoadError(name, version, f"default_model_filename must be a file name, got {filename!r}")
        model_file = vdir / filename
        if model_file.is_dir():
            # Triton's layout for a model over protobuf's 2 GB: a directory holding model.onnx and its external
            # data files, which are then read from that directory (`_read_artifact` keeps both in the repository).
            model_file = model_file / DEFAULT_ONNX_FILENAME
        if not model_file.is_file():
            raise ModelLoadError(name, version, f"{model_file.relative_to(vdir.parent.parent)} does not exist")
        model_bytes, external_data = self._read_artifact(config, vdir, model_file, version)
        backend = self._onnx_backend(config, model_file, version, model_bytes, external_data)
        del model_bytes  # onnxruntime keeps its own copy
        try:
            infos = [
                [
                    TensorInfo(
                        a.name,
                        ONNX_TYPES.get(a.type, mc.TYPE_INVALID),
                        tuple(d if isinstance(d, int) else None for d in a.shape),
                        a.name in backend.defaults,
                    )
                    for a in args.values()
                ]
                for args in (backend.inputs, backend.outputs)
            ]
            stateful = config.HasField("sequence_batching")
            # A sequence model's control and state tensors are the scheduler's to feed: not the callers'.
            hidden_in, hidden_out = scheduler_tensors(config) if stateful else (frozenset(), frozenset())
            if stateful:
                check_sequence_config(config)
            callers_inputs = [i for i in infos[0] if i.name not in hidden_in]
            autocomplete(
                config,
                callers_inputs,
                [o for o in infos[1] if o.name not in hidden_out],
                max_batch_size_given=mbs_given,
                default_max_batch_size=self._default_mbs,
                exact_dims=True,
            )
            check_onnx_inputs(config, callers_inputs)
            sequence = sequence_spec(config, infos[0], infos[1], vdir) if stateful else None
            backend.pad_to_max_batch_size(config)
            # The served config says where the model really runs (one session: every group its kind and GPU).
            backend.place_instance_groups(config)
            config.parameters[PROVIDER_PARAMETER].string_value = backend.execution_provider
            schema = ModelSchema.from_config(config, bytes_are_text=True, labels=read_labels(config, vdir.parent))
            policy = SchedulingPolicy.from_config(config)
            run_warmup(config, schema, backend, vdir.parent, version, self._stopping.is_set)
        except InvalidConfigError as exc:
            backend.close()
            raise ModelLoadError(name, version, exc.problem) from exc
        except TensorgateError:
            backend.close()
            raise
        except Exception as exc:
            # A bug here must fail this version's load, not escape and stop the server's start with every model.
            backend.close()
            log.exception("unexpected error preparing model '%s' version %d", name, version)
            raise ModelLoadError(name, version, unexpected_error_text(exc, vdir.parent.parent)) from exc
        elapsed = time.perf_counter() - started
        return _Prepared(version, config, schema, backend, policy, sig, elapsed, sequence=sequence)

    def _prepare_remote(
        self, config: mc.ModelConfig, mbs_given: bool, model_dir: Path, version: int, sig: str, started: float
    ) -> _Prepared:
        """A model on an upstream Triton: its tensors and max_batch_size come from the upstream when config.pbtxt
        leaves them out; its instances are threads waiting on upstream calls (KIND_MODEL: the upstream places it)."""
        if not config.instance_group:
            config.instance_group.add(
                name=config.name, kind=mc.ModelInstanceGroup.KIND_MODEL, count=DEFAULT_REMOTE_INSTANCES
            )
        backend = TritonBackend(config, model_dir, version=version)
        try:
            complete_config(config, backend.upstream, max_batch_size_given=mbs_given)
            if config.HasField("sequence_batching"):
                check_sequence_config(config)
            autocomplete(
                config,
                backend.upstream.inputs,
                backend.upstream.outputs,
                max_batch_size_given=True,
                default_max_batch_size=self._default_mbs,
            )
            config.ClearField("default_model_filename")  # no model file: autocomplete's ONNX default does not apply
            for group in config.instance_group:
                if group.kind == mc.ModelInstanceGroup.KIND_AUTO:
                    group.kind = mc.ModelInstanceGroup.KIND_MODEL
            config.parameters[PROVIDER_PARAMETER].string_value = backend.execution_provider
            schema = ModelSchema.from_config(config, labels=read_labels(config, model_dir))
            policy = SchedulingPolicy.from_config(config)
            run_warmup(config, schema, backend, model_dir, version, self._stopping.is_set)
        except InvalidConfigError as exc:
            backend.close()
            raise ModelLoadError(config.name, version, exc.problem) from exc
        except BaseException:
            backend.close()
            raise
        return _Prepared(version, config, schema, backend, policy, sig, time.perf_counter() - started)

    def _read_artifact(
        self, config: mc.ModelConfig, vdir: Path, model_file: Path, version: int
    ) -> tuple[bytes, Path | None]:
        """Read the model file once, refusing one that resolves outside the repository or whose digest is not the
        pinned one; return its bytes (the session is built from them, never from the path again, so the file
        cannot be swapped between the check and the load) and the directory its external tensors may come from
        (None when a digest is pinned: the pin covers this one file, so the model may have no other)."""
        # The repository, or the private directory of files sent with RepositoryModelLoad.
        root = vdir.parent.parent.resolve()
        name, rel = config.name, model_file.relative_to(vdir.parent.parent)
        key = next((k for k in (f"{SHA256_PARAMETER}:{version}", SHA256_PARAMETER) if k in config.parameters), None)
        expected = config.parameters[key].string_value.strip().lower() if key is not None else None
        if expected is not None and not _SHA256_HEX.fullmatch(expected):
            raise ModelLoadError(name, version, f"parameter '{key}' must be 64 hex digits, got {expected!r}")
        if not within(model_file, root):
            raise ModelLoadError(name, version, f"{rel} resolves outside the model repository")
        resolved = model_file.resolve()
        # O_NOFOLLOW: a symlink put in place of the file after resolve() is refused; O_NONBLOCK: a FIFO put there
        # cannot hang the loader (it is refused below as not a regular file).
        flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(resolved, flags)
        except OSError as exc:
            raise ModelLoadError(name, version, f"{rel} cannot be read: {exc.strerror}") from exc
        with os.fdopen(fd, "rb") as f:
            # Check where the opened file really is (a directory above it could have become a symlink since).
            proc = Path(f"/proc/self/fd/{fd}")
            opened = Path(os.readlink(proc)) if proc.is_symlink() else resolved
            if not opened.is_relative_to(root):
                raise ModelLoadError(name, version, f"{rel} resolves outside the model repository")
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ModelLoadError(name, version, f"{rel} is not a regular file")
            data = f.read()
        if expected is not None:
            digest = hashlib.sha256(data).hexdigest()
            if digest != expected:
                raise ModelLoadError(
                    name, version, f"{rel} has sha256 {digest} but parameter '{key}' pins {expected}; not loading it"
                )
        if self.after_artifact_read is not None:
            self.after_artifact_read(model_file)
        return data, None if expected is not None else opened.parent

    def _onnx_backend(
        self, config: mc.ModelConfig, model_file: Path, version: int, model_bytes: bytes, external_data: Path | None
    ) -> OnnxBackend:
        try:
            return OnnxBackend(
                model_file,
                config,
                version=version,
                available_providers=self._providers,
                model_bytes=model_bytes,
                external_data=external_data,
            )
        except ModelLoadError as exc:
            if external_data is None and "external data" in str(exc.__cause__).lower():
                raise ModelLoadError(
                    config.name,
                    version,
                    f"{model_file.relative_to(model_file.parents[2])} keeps tensors in external data files, which "
                    "its pinned sha256 does not cover; not loading it (pin a model saved as one file)",
                ) from exc
            raise

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    async def load(
        self,
        name: str,
        config_override: str | None = None,
        files: dict[str, bytes] | None = None,
        check_step: StepCheck | None = None,
        *,
        explicit: bool = True,
    ) -> None:
        """Load or reload a model; unchanged versions keep serving, changed ones are swapped in atomically.

        `files` (RepositoryModelLoad's "file:" parameters, with a `config_override`) are the whole model directory
        to load from instead of the repository's, as in Triton; the model need not be in the repository. They are
        written to a private temporary directory, removed once the load ends (what serves is in memory by then).
        `check_step` is the caller's right to an ensemble's step models (StepCheck), checked when one is bound.
        `explicit`: asked for by name, not only brought in by an ensemble (`unload` with `dependents` keeps it).

        Raises ModelLoadError (UNAVAILABLE) with the reason when nothing could be loaded; versions already
        serving keep serving in that case. INVALID_ARGUMENT, before anything is loaded, for an override that
        names an upstream TLS file outside the model directory, or an upstream that is neither its model's own on
        disk nor one --allowed-upstreams allows (backends/triton.py `check_override`).
        """
        override = None if config_override is None else _Override(name, config_override)
        if override is not None and override.parsed is not None:  # one that does not parse fails in the load
            check_override(name, override.parsed[0], self._allowed_upstreams, lambda: self._config_on_disk(name))
        if files is not None:
            if not _NAME.match(name) or name in (".", ".."):
                raise InvalidRequestError(name, None, "model names may use letters, digits, '_', '-' and '.' only")
            job = self._load_files(name, files, override, check_step)
        else:
            model_dir = self._model_dir(name)  # validates the name before it can own a lock
            if model_dir is None:
                raise ModelNotFoundError(name)
            job = self._load(name, model_dir, override, check_step)
        if explicit:
            self._explicit.add(name)
        # The load runs to its end in a task of its own: a caller that goes away (a client's deadline or cancel)
        # must not leave the model marked LOADING with the finished load thrown away (nor files staged for it).
        task = asyncio.get_running_loop().create_task(job)
        self._loading.add(task)
        task.add_done_callback(self._load_done)
        await asyncio.shield(task)

    def _load_done(self, task: asyncio.Task[None]) -> None:
        self._loading.discard(task)
        if not task.cancelled():
            task.exception()  # already logged and recorded by _load; retrieved here for a caller that went away

    async def _load_files(
        self,
        name: str,
        files: dict[str, bytes],
        override: _Override | None,
        check_step: StepCheck | None,
    ) -> None:
        staging = Path(tempfile.mkdtemp(prefix="tensorgate-load-"))
        writing = asyncio.ensure_future(asyncio.to_thread(_write_files, name, staging / name, files))
        try:
            await asyncio.shield(writing)
            await self._load(name, staging / name, override, check_step, uploaded=True)
        finally:
            with contextlib.suppress(BaseException):  # a write cut short by a stop finishes before the files go
                await asyncio.shield(writing)
            await asyncio.to_thread(shutil.rmtree, staging, True)

    async def _load(
        self,
        name: str,
        model_dir: Path,
        override: _Override | None,
        check_step: StepCheck | None = None,
        uploaded: bool = False,
    ) -> None:
        async with self._lock(name):
            entry = self._entries.setdefault(name, _Entry(name))
            entry.last_load = (None if override is None else override.text, uploaded)
            if not entry.versions:
                entry.state = LOADING
            try:
                entry.attempted = await asyncio.to_thread(_file_signature, model_dir)
                # Uploaded files are new files whatever their names and times: no version is kept as unchanged.
                reuse = {} if uploaded or entry.uploaded else entry.versions
                entry.transient = False
                ready, failed, transient, spec = await asyncio.to_thread(self._prepare, model_dir, override, reuse)
                await self._bind(name, ready, check_step)
            except Exception as exc:  # noqa: BLE001 - any failure is this model's, recorded and answered
                if isinstance(exc, PermissionDeniedError):
                    self._load_failed(entry, exc, model_dir)
                    raise  # the caller's right, not the model, is what failed: PERMISSION_DENIED, not retried
                raise self._load_failed(entry, exc, model_dir) from exc
            if not ready or (failed and entry.versions):
                # A reload is all or nothing: had the versions that loaded replaced the served set, a broken new
                # version would push a healthy one out of `latest N`, and a served version whose files broke in
                # place would stop serving. The versions that failed get index rows, unless they are served.
                reason = "; ".join(failed.values())
                # As in `_retire`, off the loop; one call closes them all, even if a stop cancels this wait.
                await self._close_backends([i.backend for i in ready.values() if isinstance(i, _Prepared)])
                if not entry.versions:
                    entry.state, entry.reason, entry.failed = UNAVAILABLE, reason, failed
                    # `retry_remote` loads what the disk has: not for a load that came with its own config or files.
                    own = override is not None or uploaded
                    entry.transient = bool(failed) and failed.keys() <= transient and not own
                else:
                    entry.reason = f"reload failed, still serving the previous versions: {reason}"
                    entry.failed = {v: r for v, r in failed.items() if v not in entry.versions}
                raise ModelLoadError(name, None, reason)
            new_versions: dict[int, LoadedModel] = {}
            built: list[LoadedModel] = []
            try:
                for v, item in ready.items():
                    if isinstance(item, LoadedModel):
                        new_versions[v] = item  # kept (same signature)
                    else:
                        new_versions[v] = self._serving(name, v, item)
                        built.append(new_versions[v])
            except Exception as exc:  # noqa: BLE001 - e.g. no thread left for an instance: this model's failure
                # Nothing of this load serves: what was built stops, and the prepared sessions close, as for a
                # load that failed earlier (this used to escape, leaving a first load LOADING for good).
                for model in built:
                    self._retire(model)
                done = {m.version for m in built}
                await self._close_backends(
                    [i.backend for v, i in ready.items() if isinstance(i, _Prepared) and v not in done]
                )
                raise self._load_failed(entry, exc, model_dir) from exc
            for item in ready.values():
                if isinstance(item, LoadedModel):
                    # Its config differs at most in tensorgate.rollout.*, as ModelConfig shows: once this load
                    # serves, not before (a load that failed above leaves the parameters in force shown).
                    item.config = with_rollout_parameters(item.config, spec.parameters if spec is not None else ())
            retired = [m for v, m in entry.versions.items() if new_versions.get(v) is not m]
            rollout = self._rollout(name, spec, new_versions, entry.rollout)
            if rollout is None and entry.rollout is not None:
                entry.rollout.retire()  # no split now: requests routed by the last one count nowhere
            entry.rollout = rollout
            for model in new_versions.values():
                model.rollout = entry.rollout
            entry.versions, entry.failed = new_versions, failed
            entry.state, entry.reason, entry.uploaded = READY, "", uploaded
            log.info("model '%s' ready (versions %s)", name, sorted(new_versions))
            for old in retired:
                self._retire(old)
            self.changes += 1
            self._refresh_dependents(name, check_step=check_step)

    def _rollout(
        self, name: str, spec: RolloutSpec | None, versions: dict[int, LoadedModel], previous: Rollout | None
    ) -> Rollout | None:
        """The split over the versions a load serves; none (with a warning) when its stable version is not among
        them (it failed to load): requests that name no version then go to the highest served one, as without. It
        starts rolled back when an alert fires on its canary now."""
        if spec is None:
            return None
        if spec.stable not in versions:
            log.warning(
                "model '%s': stable version %d is not served (it failed to load): no rollout split until it is",
                name,
                spec.stable,
            )
            return None
        place = _ramp_place(spec, versions)
        stored = self._ramp_places.get(name)
        rollout = Rollout(
            name,
            spec,
            versions,
            previous,
            monitored=bool(self._monitored),
            resume_at=stored[1] if place is not None and stored is not None and stored[0] == place else 0,
            on_step=None if place is None else functools.partial(self._ramp_moved, name, place),
        )
        self._follow(rollout, evaluated=False)
        if rollout.canary is not None and (previous is None or previous.spec != spec):
            log.info("model '%s': %s", name, rollout.describe())
        if self._monitored is False and rollout.canary is not None and spec.rollback_on_alert:
            # rollback_on_alert is on by default and acts on the monitor's alerts: without one, a canary that goes
            # wrong keeps its share though its config says it would be rolled back. Said at each load that builds
            # the split, at start or later (RepositoryModelLoad, a poll), not only for the models loaded at start.
            log.warning(
                "model '%s': tensorgate.rollout.rollback_on_alert is on for canary version %d, but the server has no "
                "--data-dir, so nothing is monitored and no alert can fire to roll it back; start the server with "
                "--data-dir (and alert rules, tensorgate.alert.*), or set rollback_on_alert to false",
                name,
                rollout.canary,
            )
        return rollout

    async def _close_backends(self, backends: list[Backend]) -> None:
        await asyncio.get_running_loop().run_in_executor(self._closer, _close_all, backends)

    def remember_ramps(self, places: dict[str, tuple[str, int]], save: Callable[[str, str, int], None]) -> None:
        """Where the data dir's last run left each canary ramp (store.ramp_places), before the models load, and
        how to keep each move: a split built at start resumes its ramp there when nothing it depends on changed."""
        self._ramp_places, self._save_ramp = dict(places), save

    def _ramp_moved(self, name: str, place: str, step: int) -> None:
        self._ramp_places[name] = (place, step)
        if self._save_ramp is not None:
            self._save_ramp(name, place, step)

    def _load_failed(self, entry: _Entry, exc: Exception, model_dir: Path) -> ModelLoadError:
        """Log a load's failure, record it on the model's entry (a model that served keeps serving) and make the
        error to answer it with."""
        name = entry.name
        if isinstance(exc, TensorgateError):
            reason = _reason(exc)
            if self._stopping.is_set():  # abandoned, not failed: no ERROR for log-based alerting
                log.info("load of model '%s' abandoned: the server is stopping", name)
            else:
                log.error("failed to load model '%s': %s", name, reason)
        else:
            reason = unexpected_error_text(exc, model_dir.parent)
            log.exception("failed to load model '%s'", name)
        if not entry.versions:
            entry.state, entry.reason, entry.failed = UNAVAILABLE, reason, {}
        else:
            entry.reason = f"reload failed, still serving the previous versions: {reason}"
        return ModelLoadError(name, None, reason)

    def _serving(self, name: str, version: int, item: _Prepared) -> LoadedModel:
        """A prepared version with what serves it: its statistics, scheduler (none for an ensemble), sequencer."""
        stats = ModelStats(latency=LatencyHistograms() if self._latency_histograms else None)
        count = sum(g.count for g in item.config.instance_group) or 1
        scheduler = (
            None
            if item.plan is not None
            else Scheduler(name, version, item.backend, stats, count, item.policy, self._tracing)
        )
        sequencer = (
            None
            if item.sequence is None or scheduler is None
            else Sequencer(name, version, scheduler, item.sequence, item.config.max_batch_size > 0)
        )
        remote_sequences = (
            RemoteSequences(
                name,
                version,
                scheduler,
                self._sequence_order.setdefault(name, Order()),
                item.config.sequence_batching.max_sequence_idle_microseconds,
            )
            if scheduler is not None and _remote_sequence_model(item.config)
            else None
        )
        return LoadedModel(
            name,
            version,
            item.config,
            item.schema,
            item.backend,
            scheduler,
            stats,
            item.signature,
            item.load_seconds,
            item.plan,
            sequencer,
            remote_sequences,
        )

    def _retire(self, model: LoadedModel) -> None:
        async def close() -> None:
            if model.sequencer is not None:
                model.sequencer.drain()
            if model.scheduler is not None:
                await model.scheduler.close(self._grace)
            if model.sequencer is not None:
                model.sequencer.close()
            # Off the loop: a remote backend's close joins its thread and closes its connections (seconds when the
            # upstream is slow to let go), and the loop serves every other model and relay meanwhile.
            await self._close_backends([model.backend])
            self.changes += 1

        task = asyncio.get_running_loop().create_task(close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        self._retiring[id(model)] = model
        task.add_done_callback(lambda _: self._retiring.pop(id(model), None))

    def draining(self) -> list[LoadedModel]:
        """The retired versions still finishing their requests (for the stop's end of grace)."""
        return list(self._retiring.values())

    async def unload(self, name: str, *, dependents: bool = False, check: Callable[[str], None] | None = None) -> None:
        """Stop serving a model; its in-flight requests finish first. With `dependents` (RepositoryModelUnload's
        unload_dependents), as Triton does: an ensemble's composing models go too, down nested ensembles, unless
        a load asked for them by name or another ensemble not unloaded has a step on them. An ensemble unloaded
        already (not only with a step model) leaves its steps as they are, as in Triton.

        `check` is the caller's right to unload a composing model (raises PermissionDeniedError): every model the
        call would unload is checked before anything is, so a refusal leaves all loaded, the ensemble included."""
        if name not in self._entries and self._model_dir(name) is None:
            raise ModelNotFoundError(name)
        entry = self._entries.get(name)
        steps = (
            self._dependents_to_unload(name) if dependents and entry is not None and entry.reason != UNLOADED else []
        )
        if check is not None:
            for step in steps:
                try:
                    check(step)
                except PermissionDeniedError as exc:
                    raise with_prefix(exc, f"unloading ensemble '{name}' with its dependents, ") from None
        await self._unload_one(name)
        gone = {name}
        for step in steps:  # re-judged: a load since the check may need one now
            if not self._needed(step, gone):
                await self._unload_one(step)
                gone.add(step)

    async def _unload_one(self, name: str) -> None:
        async with self._lock(name):
            entry = self._entries.get(name)
            self._explicit.discard(name)
            if entry is None:
                self._entries[name] = _Entry(name, state=UNAVAILABLE, reason=UNLOADED)
                return
            retired = list(entry.versions.values())
            entry.unloaded = tuple(sorted(entry.versions)) or entry.unloaded
            if entry.rollout is not None:
                entry.rollout.retire()
            if name in self._ramp_places:  # an unload starts a ramp over, this run or the next
                self._ramp_moved(name, self._ramp_places[name][0], 0)
            entry.versions, entry.failed, entry.rollout = {}, {}, None
            entry.state, entry.reason, entry.attempted = UNAVAILABLE, UNLOADED, None
            for model in retired:
                self._retire(model)
            self.changes += 1
            log.info("model '%s' unloaded", name)
            self._refresh_dependents(name, unloaded=True)

    def _dependents_to_unload(self, name: str) -> list[str]:
        """The composing models unloading ensemble `name` with unload_dependents would unload, nested ensembles'
        included, in the order to unload them: each step not `_needed` once the ensembles before it are gone."""
        gone, order = {name}, []

        def visit(ensemble: str) -> None:
            plan = self._plan_of(ensemble)
            for step in sorted({model for model, _ in plan.models} if plan is not None else ()):
                if step not in gone and not self._needed(step, gone):
                    gone.add(step)
                    order.append(step)
                    visit(step)

        visit(name)
        return order

    def _needed(self, model: str, gone: set[str]) -> bool:
        """Whether unload_dependents keeps a composing model: not loaded (nothing to unload), loaded by name, or a
        step of an ensemble being loaded or not unloaded (one unloaded only with another step model still counts,
        as in Triton: it comes back with that model); the ensembles in `gone` are being unloaded by this call."""
        entry = self._entries.get(model)
        if entry is None or entry.reason == UNLOADED or model in self._explicit:
            return True
        for ensemble in self._dependents.get(model, ()):
            if ensemble in gone:
                continue
            other = self._entries.get(ensemble)
            plan = self._plan_of(ensemble)
            live = ensemble in self._loading_plans or (other is not None and other.reason != UNLOADED)
            if live and plan is not None and any(step == model for step, _ in plan.models):
                return True
        return False

    async def load_many(self, names: Sequence[str]) -> None:
        """Load several models concurrently; failures are recorded per model and logged, not raised."""

        async def one(name: str) -> None:
            try:
                await self.load(name)
            except TensorgateError:
                pass  # recorded in the entry and logged by load()

        # Ensembles after the rest, so that their composing models are loaded once, by this call.
        ensembles = set(await asyncio.to_thread(lambda: [n for n in names if self._is_ensemble(n)]))
        await asyncio.gather(*(one(n) for n in names if n not in ensembles))
        await asyncio.gather(*(one(n) for n in names if n in ensembles))

    def _is_ensemble(self, name: str) -> bool:
        config = self._config_on_disk(name)
        return config is not None and is_ensemble(config)

    def _is_remote(self, name: str) -> bool:
        config = self._config_on_disk(name)
        return config is not None and config.backend == TRITON_BACKEND

    async def retry_remote(self) -> list[str]:
        """Load again the remote models that failed and serve nothing because of their upstream (e.g. their
        Triton was down when this server started): a replica must not depend on starting after its upstream.
        Returns those that loaded. An unloaded model is left alone, and so is one whose files are at fault (a bad
        parameter, a config that contradicts the upstream's): only a changed file or a load request helps it."""
        failed = [
            name
            for name, e in sorted(self._entries.items())
            if e.state == UNAVAILABLE and e.transient and not e.versions and not is_unloaded(e.reason)
        ]
        loaded = []
        for name in failed:
            if not await asyncio.to_thread(self._is_remote, name):
                continue
            try:
                await self.load(name)
            except TensorgateError:
                continue  # still down: its reason is updated, the next round tries again
            loaded.append(name)
        return loaded

    async def poll(self) -> None:
        """Bring the served set in line with the disk: new models load, removed ones unload, changed ones reload.
        The disk is read on a worker thread: listing every file of a large repository takes long enough (0.45 s
        for 20,000 files) that on the event loop every call would wait for it at each poll."""
        on_disk = set(await asyncio.to_thread(self.names_on_disk))
        for name in sorted(set(self._entries) - on_disk):
            entry = self._entries.get(name)
            if entry is not None and (entry.versions or entry.state != UNAVAILABLE):
                await self.unload(name)
            self._entries.pop(name, None)
        signatures = await asyncio.to_thread(lambda: {n: self.signature(n) for n in on_disk})
        changed = [n for n in sorted(on_disk) if n not in self._entries or self._entries[n].attempted != signatures[n]]
        await self.load_many(changed)

    def index(self, ready_only: bool = False, on_disk: Iterable[str] | None = None) -> list[IndexRow]:
        """`on_disk`: names_on_disk() as read off the event loop (RepositoryIndex): it stats every model directory,
        milliseconds per hundred models on a local disk and a round trip each on a network one."""
        rows: list[IndexRow] = []
        for name in sorted(set(self.names_on_disk() if on_disk is None else on_disk) | set(self._entries)):
            entry = self._entries.get(name)
            if entry is None:
                if not ready_only:
                    rows.append(IndexRow(name, "", "", ""))
                continue
            for v in sorted(entry.versions):
                # Empty unless a reload failed: the rows still serving then say why they were not replaced.
                rows.append(IndexRow(name, str(v), READY, entry.reason))
            if ready_only:
                continue
            for v, reason in sorted(entry.failed.items()):
                rows.append(IndexRow(name, str(v), UNAVAILABLE, reason))
            if not entry.versions and not entry.failed:
                # Unloaded: a row per version it served, as Triton keeps them ("1", UNAVAILABLE, "unloaded").
                versions = [str(v) for v in entry.unloaded] if is_unloaded(entry.reason) and entry.unloaded else [""]
                rows.extend(IndexRow(name, v, entry.state, entry.reason) for v in versions)
        return rows

    def sequence_live(self, name: str, sequence_id: SequenceId) -> bool:
        """Whether a request without START to model `name` would continue a live sequence (`Sequencer.live`):
        one that a served version of the model has started and not ended, or for an ensemble one of its sequence
        steps has, down nested ensembles. A draining server still takes such requests, as Triton's sequence
        batcher does, so that sequences their clients are in the middle of can end (server/rpc/drain.py)."""
        names, seen = [name], set()
        while names:
            current = names.pop()
            entry = self._entries.get(current)
            if current in seen or entry is None:
                continue
            seen.add(current)
            for model in entry.versions.values():
                sequences = model.sequencer or model.remote_sequences
                if sequences is not None and sequences.live(sequence_id):
                    return True
                if model.plan is not None:
                    names.extend(step.model for step in model.plan.steps)
        return False

    def live_sequences(self) -> int:
        """Sequences started and not yet ended or idle, those waiting for a slot included, over every served model:
        a drain waits for them (a remote model's versions share theirs, counted once)."""
        local, remote = 0, {}
        for model in self.loaded():
            if model.sequencer is not None:
                local += model.sequencer.active
            if model.remote_sequences is not None:
                order = model.remote_sequences.order
                remote[id(order)] = len(order.claims)
        return local + sum(remote.values())

    def reject_waiting(self, why: str) -> None:
        """Every model's requests that have not started fail with UNAVAILABLE (Scheduler.reject_waiting), those of
        sequences waiting for a slot included (Sequencer.reject_waiting)."""
        for model in [*self.loaded(), *self._retiring.values()]:
            if model.sequencer is not None:
                model.sequencer.reject_waiting(why)
            if model.remote_sequences is not None:
                model.remote_sequences.reject_waiting(why)
            if model.scheduler is not None:
                model.scheduler.reject_waiting(why)

    async def close(self) -> None:
        # Loads still running (a stop during start-up) are abandoned: their sessions never serve.
        self._stopping.set()
        loading = list(self._loading)
        for task in loading:
            task.cancel()
        if loading:
            await asyncio.gather(*loading, return_exceptions=True)
        for entry in self._entries.values():
            for model in entry.versions.values():
                self._retire(model)
            entry.versions = {}
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        self._closer.shutdown(wait=False)  # every close has returned: its threads end
