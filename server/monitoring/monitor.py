"""The background monitor: every ``--monitor-interval-s`` it computes quality and drift per loaded model version,
updates the Prometheus gauges, feeds the alert engine and records its transitions.

    monitor = Monitor(store, capture, repository, data_dir=path, interval_s=10.0)
    monitor.start()                      # on the event loop; the work itself runs in a worker thread
    monitor.quality(monitor.target("digits", "1"), Window(count=500))   # GetModelQuality's answer (blocking)
    await monitor.stop()

The server (server/app.py) builds it when ``--data-dir`` is given. Everything heavy (SQLite reads, metrics,
statistical tests) runs through ``asyncio.to_thread``: the event loop only snapshots which models are loaded.

Alert transitions are logged, counted (``tensorgate_alert_transitions_total``), POSTed to the optional webhook and,
when the server traces, recorded as a short span ``alert <rule>`` with an ``alert.firing``/``alert.resolved`` event.

The firing alerts are kept in the data dir's store (``_Ledger``), per webhook URL: a restart takes them up without
announcing them again, and resolves those it can no longer judge (their version is not served, their rule is gone
or changed). Processes sharing the data dir and the webhook share them: each transition is announced by the one
process whose write changed the store, and an alert is resolved for a reason other than its values only once no
running process holds it (``FiringAlert.orphaned``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from opentelemetry import context as otel_context
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from tensorgate.protos import model_config_pb2 as mc
from tensorgate.server.decimal_text import parse_decimal
from tensorgate.server.errors import InvalidRequestError, ModelNotFoundError
from tensorgate.server.file_stamp import FileStamp, file_stamp
from tensorgate.server.monitoring import drift as drift_stats
from tensorgate.server.monitoring.alerts import (
    QUALITY_METRICS,
    VERSION_GONE,
    AlertEngine,
    AlertRule,
    AlertTransition,
    WebhookSender,
    dispatch,
    load_rules_file,
    model_rules,
    rules_from_config,
)
from tensorgate.server.monitoring.capture import Capture, parameter
from tensorgate.server.monitoring.drift import DriftReport, ReferenceProfile
from tensorgate.server.monitoring.errors import NoReferenceError
from tensorgate.server.monitoring.quality import QualityReport, TaskSpec, TaskSpecError, compute_quality
from tensorgate.server.monitoring.store import FiringAlert, Prediction, PredictionStore
from tensorgate.server.telemetry.metrics import FamilySpec, markdown_table

if TYPE_CHECKING:
    from tensorgate.server.repository.manager import ModelRepository
    from tensorgate.server.telemetry.tracing import Tracing

__all__ = ["MONITORING_FAMILIES", "Monitor", "MonitoringCollector", "Window", "reference_markdown", "trace_transition"]

log = logging.getLogger(__name__)

DEFAULT_WINDOW_COUNT = 1000
MAX_WINDOW_COUNT = 100_000
"""The most captured requests one window reads: a window is decoded in memory at once (about 250 MiB for 100,000
digits requests of 64 floats), so neither a caller's uint64 (GetModelQuality/GetModelDrift) nor a model's
parameter may size it without bound. A window by time alone is capped to its newest MAX_WINDOW_COUNT requests."""
WINDOW_REQUESTS = "tensorgate.monitor.window_requests"
WINDOW_SECONDS = "tensorgate.monitor.window_s"

_MV = ("model", "version")
QUALITY = FamilySpec(
    "tensorgate_model_quality",
    "gauge",
    (*_MV, "metric"),
    "Quality over the model's monitoring window (by default its last 1000 requests): accuracy, "
    "precision/recall/f1_macro, mae, rmse, nonfinite_share (regression rows left out of mae/rmse as NaN or "
    "infinite), label_coverage",
)
DRIFT = FamilySpec(
    "tensorgate_model_drift",
    "gauge",
    (*_MV, "metric"),
    "Drift of the monitor's window against the reference profile: psi_max, psi_mean, drifted_share, score_psi, "
    "and samples (the rows compared)",
)
ALERTS_FIRING = FamilySpec("tensorgate_alerts_firing", "gauge", (*_MV, "rule"), "1 while an alert rule fires")
ALERT_TRANSITIONS = FamilySpec(
    "tensorgate_alert_transitions_total", "counter", ("model", "rule", "state"), "Alert rules that fired or resolved"
)
CAPTURE_DROPPED = FamilySpec(
    "tensorgate_capture_dropped_total",
    "counter",
    (),
    "Prediction samples dropped because the capture queue was full (the requests themselves were answered)",
)
CAPTURED = FamilySpec("tensorgate_captured_total", "counter", (), "Prediction samples stored by the capture writer")
CAPTURE_FAILED = FamilySpec(
    "tensorgate_capture_failed_total",
    "counter",
    (),
    "Prediction samples lost because the capture writer could not store them (a full --data-dir disk; see the log)",
)
MONITORING_FAMILIES = (QUALITY, DRIFT, ALERTS_FIRING, ALERT_TRANSITIONS, CAPTURE_DROPPED, CAPTURED, CAPTURE_FAILED)
"""What MonitoringCollector adds to /metrics with --data-dir (README's monitoring section lists them)."""


def reference_markdown() -> str:
    """The metrics table of README's monitoring section; regenerate it with
    `python -c 'from tensorgate.server.monitoring.monitor import reference_markdown as r; print(r())'`."""
    return markdown_table(MONITORING_FAMILIES)


@dataclass(frozen=True, slots=True)
class Window:
    """The last ``count`` predictions and/or those of the last ``seconds``; neither: the model's own window
    (``model_window``: the monitor loop, /metrics, alerts, and the RPCs that name no window)."""

    count: int = 0
    seconds: float = 0.0

    def bounds(self, now: float) -> tuple[float | None, int | None]:
        """(since, limit) for ``PredictionStore.predictions``."""
        count = self.count if self.count > 0 else (DEFAULT_WINDOW_COUNT if self.seconds <= 0 else None)
        since = now - self.seconds if self.seconds > 0 else None
        return since, count


def model_window(config: mc.ModelConfig) -> tuple[Window, list[str]]:
    """The window a model is judged over, from ``tensorgate.monitor.window_requests`` (its last N captured
    requests; default 1000) and ``tensorgate.monitor.window_s`` (only those of the last S seconds; default: no time
    bound), and why a malformed value was replaced by its default. A count suits steady traffic; labels that
    arrive late (fraud, churn) need a window long enough to still hold their predictions."""
    problems: list[str] = []
    count = DEFAULT_WINDOW_COUNT
    raw = parameter(config, WINDOW_REQUESTS)
    if raw is not None:
        n = parse_decimal(raw)
        if n is None or not 1 <= n <= MAX_WINDOW_COUNT:
            problems.append(
                f"parameter '{WINDOW_REQUESTS}' must be a whole number in 1..{MAX_WINDOW_COUNT}, got {raw!r}"
            )
        else:
            count = n
    seconds = 0.0
    raw = parameter(config, WINDOW_SECONDS)
    if raw is not None:
        try:
            seconds = float(raw)
            if not (math.isfinite(seconds) and seconds > 0):
                raise ValueError
        except ValueError:
            problems.append(f"parameter '{WINDOW_SECONDS}' must be a number of seconds above 0, got {raw!r}")
            seconds = 0.0
    return Window(count, seconds), problems


@dataclass(frozen=True, slots=True)
class _Target:
    name: str
    version: str
    config: mc.ModelConfig
    model_dir: Path


@dataclass(slots=True)
class _Engine:
    config: mc.ModelConfig
    engine: AlertEngine


@dataclass(slots=True)
class _State:
    """What the gauges show; replaced as a whole after each evaluation (the scraping thread reads it)."""

    quality: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    drift: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    firing: dict[tuple[str, str], set[str]] = field(default_factory=dict)


def _stack(window: Sequence[Prediction], attr: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Concatenate one side (inputs or outputs) of a window along the rows; requests without it are skipped.

    A tensor whose shape after the batch axis varies between requests (a -1 dim) cannot be one array of rows: it
    is left out, and returned in the second mapping with why, so that the monitor can say it is not watched."""
    parts: dict[str, list[np.ndarray]] = {}
    for p in window:
        arrays = getattr(p, attr)
        if arrays is None:
            continue
        for name, array in arrays.items():
            parts.setdefault(name, []).append(np.asarray(array))
    out: dict[str, np.ndarray] = {}
    skipped: dict[str, str] = {}
    for name, arrays in parts.items():
        try:
            out[name] = np.concatenate(arrays, axis=0)
        except ValueError:
            shapes = sorted({a.shape[1:] for a in arrays})
            seen = ", ".join(str(list(shape)) for shape in shapes[:3]) + (", ..." if len(shapes) > 3 else "")
            skipped[name] = f"its shape after the batch axis varies between requests ({seen})"
    return out, skipped


def trace_transition(tracing: Tracing, transition: AlertTransition) -> None:
    """One alert transition as OpenTelemetry sees it: a short root span ``alert <rule>`` holding an
    ``alert.firing`` or ``alert.resolved`` event, both with the model, version, rule, state, value and threshold
    (and a resolution's reason)."""
    attributes: dict[str, str | float] = {
        "tensorgate.model.name": transition.model,
        "tensorgate.model.version": transition.version,
        "tensorgate.alert.rule": transition.rule,
        "tensorgate.alert.state": transition.state,
        "tensorgate.alert.value": float(transition.value),
        "tensorgate.alert.threshold": float(transition.threshold),
    }
    if transition.reason:
        attributes["tensorgate.alert.reason"] = transition.reason
    # A new trace (the monitor runs outside any request), whatever span the calling thread has current.
    span = tracing.tracer.start_span(f"alert {transition.rule}", context=otel_context.Context(), attributes=attributes)
    span.add_event(f"alert.{transition.state}", attributes=attributes)
    span.end()


class _Ledger:
    """The alert engines' ``AlertLedger``: the firing alerts of one webhook (``sink``) in the data dir's store."""

    def __init__(self, store: PredictionStore, sink: str, interval_s: float) -> None:
        self.store = store
        self.sink = sink
        self.interval_s = interval_s

    def claim(self, fired: AlertTransition, expression: str) -> AlertTransition | None:
        row = FiringAlert(
            self.sink,
            fired.rule,
            fired.model,
            fired.version,
            expression,
            since=fired.timestamp,
            fired_value=fired.value,
            value=fired.value,
            threshold=fired.threshold,
            updated=fired.timestamp,
            interval_s=self.interval_s,
        )
        held = self.store.claim_alert(row)
        return None if held is None else firing_of(held)

    def release(self, rule: str, model: str, version: str) -> bool:
        return self.store.release_alert(self.sink, rule, model, version)


def firing_of(row: FiringAlert) -> AlertTransition:
    """The firing transition a stored alert stands for."""
    return AlertTransition(row.rule, row.model, row.version, "firing", row.fired_value, row.threshold, row.since)


def _sink(webhook: str | None) -> str:
    """Who the alerts are announced to, as the store keys them: never the URL itself (it may hold a secret)."""
    return hashlib.sha256(webhook.encode()).hexdigest()[:32] if webhook else ""


class Monitor:
    """Quality, drift and alerts of every loaded model, computed off the event loop."""

    def __init__(
        self,
        store: PredictionStore,
        capture: Capture | None,
        repository: ModelRepository,
        *,
        data_dir: Path,
        interval_s: float = 10.0,
        alert_rules: Path | None = None,
        alert_webhook: str | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"monitor interval must be positive, got {interval_s}")
        self.store = store
        self.capture = capture
        self.repository = repository
        self.data_dir = data_dir
        self.interval_s = interval_s
        self.tracing = tracing
        # A malformed rules file raises AlertRuleError here, before anything else is started.
        self._file_rules: list[AlertRule] = [] if alert_rules is None else load_rules_file(alert_rules)
        self._webhook = WebhookSender(alert_webhook) if alert_webhook else None
        self._ledger = _Ledger(store, _sink(alert_webhook), interval_s)
        self._engines: dict[tuple[str, str], _Engine] = {}
        self._skipped: set[tuple[str, str, str]] = set()
        """(model, version, tensor) that drift left out and the log has said so."""
        self._broken_profiles: dict[tuple[str, str], tuple[str, tuple[FileStamp | None, ...]]] = {}
        """The unusable reference profile last logged per model version: its message and its files' mtime and size
        (only the monitor's thread touches it)."""
        self._window_problems: set[tuple[str, str, str]] = set()
        """Malformed window parameters already logged, per model version."""
        self._quality_problems: dict[tuple[str, str], str] = {}
        """Why quality could not judge (some of) a model version's labels, as last logged (the monitor's thread only):
        the same problem is logged once, not on every run."""
        self._lock = threading.Lock()
        self.state = _State()
        self.transitions: Counter[tuple[str, str, str]] = Counter()
        self._task: asyncio.Task[None] | None = None
        self._event_loop: asyncio.AbstractEventLoop | None = None
        """The server's loop, once started: where the repository hears of the alerts (`follow_alerts`)."""
        self._running: asyncio.Future[None] | None = None
        """The evaluation the loop runs in a worker thread now (or ran last)."""
        self.evaluations = 0

    # ----- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the periodic evaluation on the running loop."""
        self._event_loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._loop(), name="tensorgate-monitor")

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop, waiting up to ``timeout`` seconds for an evaluation already running in its thread.

        Cancelling the loop does not stop that thread (a thread cannot be cancelled): without the wait, the server
        would close the store and the webhook under it."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        running, self._running = self._running, None
        if running is not None and not running.done():
            await asyncio.wait([running], timeout=timeout)
            if not running.done():
                log.warning("monitor: an evaluation still runs after %.0fs; stopping without it", timeout)
        held = [(a.rule, a.model, a.version) for a in self.alerts()]
        if held:  # the next run (or another process) may resolve at once what it cannot judge
            try:
                await asyncio.to_thread(self.store.let_go_alerts, self._ledger.sink, held)
            except Exception:  # noqa: BLE001 - they are then taken as held for a few more intervals
                log.exception("monitor: cannot mark its firing alerts as no longer held")
        if self._webhook is not None:
            await asyncio.to_thread(self._webhook.close)

    def targets(self, model: str | None = None) -> list[_Target]:
        """The loaded versions (call on the event loop: the repository lives there)."""
        root = Path(self.repository.root)
        return [
            _Target(m.name, str(m.version), m.config, root / m.name)
            for m in self.repository.loaded()
            if model is None or m.name == model
        ]

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            # Shielded: cancelling the loop leaves the thread's future for stop() to wait on.
            self._running = asyncio.ensure_future(asyncio.to_thread(self._evaluate_logged, self.targets()))
            await asyncio.shield(self._running)

    def _evaluate_logged(self, targets: list[_Target]) -> None:
        try:
            self.evaluate(targets)
        except Exception:  # noqa: BLE001 - one failed evaluation must not stop monitoring
            log.exception("monitor: evaluation failed")

    # ----- one evaluation ----------------------------------------------------------------------------------

    def evaluate(self, targets: Iterable[_Target], now: float | None = None) -> None:
        """Compute quality and drift of each target, update the gauges and feed the alert engine (blocking)."""
        now = time.time() if now is None else now
        started = time.monotonic()  # what a canary's ramp may take this run's verdict to cover: the captures by now
        state = _State()
        targets = list(targets)
        # Engines first, then what the store holds: an alert fired before is taken up, and one no longer judged
        # resolved, before this window fires anything (a changed rule's old alert must go before the new fires).
        engines = {(t.name, t.version): self._engine(t, now) for t in targets}
        self._sweep(engines, now)
        for t in targets:
            key = (t.name, t.version)
            quality: QualityReport | None = None
            window: list[Prediction] = []
            problem: str | None = None
            try:
                window = self._window(t, Window(), now, with_inputs=False)  # kept: the alerts' evidence
                quality = self._quality(t, window)
                if quality.unreadable:
                    problem = (
                        f"model '{t.name}' version {t.version}: labelled requests captured without the prediction "
                        "output are not judged (they were stored before the server captured it for every request)"
                    )
            except TaskSpecError as exc:
                problem = str(exc)
            except Exception:  # noqa: BLE001 - quality of one model must not stop the others
                log.exception("monitor: quality of model '%s' version %s failed", t.name, t.version)
            if problem is None:
                self._quality_problems.pop(key, None)  # solved: a new problem is news again
            elif self._quality_problems.get(key) != (known := problem.split("; captured:")[0]):
                self._quality_problems[key] = known  # which outputs the first such request had is no new problem
                log.warning("monitor: %s", problem)
            if quality is not None:
                state.quality[key] = {m: v for m, v in quality.metrics.items() if m in QUALITY_METRICS}
            drift: DriftReport | None = None
            try:
                drift = self._drift(t, Window(), now)
                self._broken_profiles.pop(key, None)  # fixed (or gone): a new break is news again
            except (NoReferenceError, drift_stats.ProfileError) as exc:
                self._profile_broken(t, exc)
            except Exception:  # noqa: BLE001 - drift of one model must not stop the others
                log.exception("monitor: drift of model '%s' version %s failed", t.name, t.version)
            if drift is not None:
                state.drift[key] = {
                    "psi_max": float(drift.psi_max),
                    "psi_mean": float(drift.psi_mean),
                    "drifted_share": float(drift.drifted_share),
                    "score_psi": float(drift.score_drift),
                    "samples": float(drift.samples),
                }
            engine = engines[key]
            engine.new_window(t.name, t.version, now)
            # What `for=N` counts: windows with something new (a capture, a label), not runs of this loop.
            captured = max((p.timestamp for p in window), default=None)
            labelled = max((p.label_timestamp for p in window if p.label_timestamp is not None), default=None)
            evidence = (len(window), captured, labelled)
            if quality is not None and state.quality.get(key):
                # Coverage is judged on the predictions it is a share of; the other metrics on labelled rows.
                metrics = dict(state.quality[key])
                if "label_coverage" in metrics:
                    coverage = {"label_coverage": metrics.pop("label_coverage")}
                    engine.evaluate(t.name, t.version, coverage, quality.predictions, now, evidence)
                if "nonfinite_share" in metrics:  # a share of all labelled rows, the left-out ones included
                    nonfinite = {"nonfinite_share": metrics.pop("nonfinite_share")}
                    engine.evaluate(t.name, t.version, nonfinite, quality.rows + quality.nonfinite, now, evidence)
                if metrics:
                    engine.evaluate(t.name, t.version, metrics, quality.rows, now, evidence)
            if drift is not None:
                values = {f"drift.{k}": v for k, v in state.drift[key].items() if k != "samples"}
                engine.evaluate(t.name, t.version, values, int(drift.samples), now, (len(window), captured))
            state.firing[key] = {a.rule for a in engine.active() if a.model == t.name and a.version == t.version}
        with self._lock:  # a version no longer served resolves its alerts instead of firing for ever
            gone = {key: self._engines.pop(key) for key in list(self._engines) if key not in engines}
        for cached in gone.values():
            cached.engine.resolve_all(now)
        self._refresh(engines, now)
        self.state = state
        self._tell_repository(state.firing, started)
        self.evaluations += 1

    def _tell_repository(self, firing: dict[tuple[str, str], set[str]], started: float) -> None:
        """Hand the alerts firing to the repository, whose splits roll back a canary an alert fires on: on the
        event loop, where the repository lives (directly when this monitor was never started, as in tests).
        `started`: when the evaluation began (time.monotonic), which is what its verdict covers, not when it ends."""
        loop = self._event_loop
        if loop is None:
            self.repository.follow_alerts(firing, started=started)
            return
        with contextlib.suppress(RuntimeError):  # the loop closed under a last evaluation: nobody serves any more
            loop.call_soon_threadsafe(functools.partial(self.repository.follow_alerts, firing, started=started))

    def stored_firing(self) -> dict[tuple[str, str], set[str]]:
        """Blocking: the alerts the data dir keeps firing for this monitor's webhook, by (model, version): before
        the first evaluation (one interval after start), a canary an alert fired on before a restart starts
        rolled back. Empty when the store cannot be read (logged): the first evaluation then decides."""
        try:
            rows = self.store.firing_alerts(self._ledger.sink)
        except Exception:  # noqa: BLE001 - a start must not fail on it
            log.exception("monitor: cannot read the firing alerts from the data dir")
            return {}
        firing: dict[tuple[str, str], set[str]] = {}
        for row in rows:
            firing.setdefault((row.model, row.version), set()).add(row.rule)
        return firing

    def _sweep(self, engines: dict[tuple[str, str], AlertEngine], now: float) -> None:
        """Take up the stored alerts this monitor judges, and resolve (announcing it) those nobody holds any more
        that it cannot judge: their version is not served here, or their rule is gone or changed."""
        try:
            rows = self.store.firing_alerts(self._ledger.sink)
        except Exception:  # noqa: BLE001 - the alerts then live in memory only, as they did before
            log.exception("monitor: cannot read the firing alerts from the data dir")
            return
        for row in rows:
            engine = engines.get((row.model, row.version))
            fired = firing_of(row)
            reason = VERSION_GONE if engine is None else engine.adopt(fired, row.expression)
            if reason is None or not row.orphaned(now):
                continue  # taken up, or another running process holds it (its own monitor decides)
            try:
                released = self.store.release_alert(row.sink, row.rule, row.model, row.version, updated=row.updated)
            except Exception:  # noqa: BLE001 - tried again at the next evaluation
                log.exception("monitor: cannot resolve alert %s of model '%s' in the data dir", row.rule, row.model)
                continue
            if released:
                value = math.nan if row.value is None else row.value
                dispatch(fired.resolution(reason, value, now), self._on_transition, self._webhook)

    def _refresh(self, engines: dict[tuple[str, str], AlertEngine], now: float) -> None:
        """Store the latest value of the alerts firing here and mark them held; one another process resolved
        meanwhile is dropped here too (its engine fires it again if its window still breaches)."""
        held = [a for e in engines.values() for a in e.active()]
        try:
            gone = self.store.refresh_alerts(
                self._ledger.sink,
                [(a.rule, a.model, a.version, a.value if math.isfinite(a.value) else None) for a in held],
                now,
                self.interval_s,
            )
        except Exception:  # noqa: BLE001 - held for a few more intervals by the last refresh
            log.exception("monitor: cannot store the firing alerts' values")
            return
        for rule, model, version in gone:
            engines[(model, version)].drop(rule, model, version)

    def _profile_broken(self, t: _Target, exc: Exception) -> None:
        """Log an unusable reference profile as one line, once per broken state: the same problem in the same
        files is not news on every run (a traceback per run buried everything else in the log). It is logged
        again when a profile file changes, or once it was fixed and breaks again."""
        files: list[FileStamp | None] = []
        with contextlib.suppress(drift_stats.ProfileError):  # a model name that cannot name a file: no files
            for path, _ in drift_stats.profile_candidates(self.data_dir, t.model_dir, t.name):
                try:
                    files.append(file_stamp(path.stat()))
                except OSError:
                    files.append(None)
        state = (str(exc), tuple(files))
        if self._broken_profiles.get((t.name, t.version)) == state:
            return
        self._broken_profiles[(t.name, t.version)] = state
        log.error("monitor: no drift: %s", exc)  # the message names the model (and the file)

    def _engine(self, t: _Target, now: float) -> AlertEngine:
        """The alert engine of a model version: rules file + the model's ``tensorgate.alert.*`` parameters.

        A reload (a new config) keeps the state of the rules it leaves as they were and resolves the others: a
        firing alert neither fires again nor goes silent without a "resolved".
        """
        key = (t.name, t.version)
        with self._lock:
            cached = self._engines.get(key)
            if cached is not None and cached.config is t.config:
                return cached.engine
            params = {k: v.string_value for k, v in t.config.parameters.items()}
            rules = model_rules(t.name, self._file_rules, rules_from_config(params, model=t.name))
            if cached is None:
                engine = AlertEngine(
                    rules, webhook=self._webhook, on_transition=self._on_transition, ledger=self._ledger
                )
                self._engines[key] = _Engine(t.config, engine)
                return engine
            cached.config = t.config
        cached.engine.set_rules(rules, now)  # outside the lock: it dispatches what it resolves
        return cached.engine

    def _on_transition(self, transition: AlertTransition) -> None:
        """Log, count and (when the server traces) record one alert transition as an OpenTelemetry span + event."""
        self.transitions[(transition.model, transition.rule, transition.state)] += 1
        log.warning("%s", transition.describe())
        if self.tracing is not None:
            trace_transition(self.tracing, transition)

    # ----- what the RPCs answer (blocking: call through asyncio.to_thread) -----------------------------------

    def _window(self, t: _Target, window: Window, now: float, *, with_inputs: bool = True) -> list[Prediction]:
        """The captures of ``window``; the model's own window (``model_window``) when it names none."""
        if window == Window():
            window, problems = model_window(t.config)
            for problem in problems:
                if (t.name, t.version, problem) not in self._window_problems:  # once, not every run
                    self._window_problems.add((t.name, t.version, problem))
                    log.warning("model '%s': %s; using its default", t.name, problem)
        since, limit = window.bounds(now)
        return self.store.predictions(t.name, t.version, since=since, limit=limit, with_inputs=with_inputs)

    def _quality(self, t: _Target, window: list[Prediction]) -> QualityReport:
        """Quality of a window read with ``with_inputs=False`` (quality needs outputs and labels only)."""
        return compute_quality(TaskSpec.from_config(t.config), window, t.version)

    def _flush(self) -> None:
        """An RPC reads its caller's writes: the predictions queued before it are stored first (bounded wait)."""
        if self.capture is not None and not self.capture.flush():
            log.warning("monitor: the capture queue did not drain in time; answering from what is stored")

    def quality(self, t: _Target, window: Window) -> QualityReport:
        """GetModelQuality: a malformed task/prediction parameter is INVALID_ARGUMENT naming the model."""
        self._flush()
        try:
            return self._quality(t, self._window(t, window, time.time(), with_inputs=False))
        except TaskSpecError as exc:
            raise InvalidRequestError(t.name, t.version, str(exc)) from exc

    def profile(self, t: _Target) -> ReferenceProfile | None:
        """The reference profile: from the data dir or the model dir, else built from the first N captured
        requests when ``tensorgate.drift.reference_requests`` asks for it (and saved to the data dir).

        A profile file that cannot be used is FAILED_PRECONDITION naming the file: the server's setup, not the
        request, is wrong."""
        try:
            profile = drift_stats.load_profile(self.data_dir, t.model_dir, t.name)
        except drift_stats.ProfileFileError as exc:
            raise NoReferenceError(t.name, t.version, f"{exc.where}: {exc.problem}") from exc
        if profile is not None:
            return profile
        n = parse_decimal(parameter(t.config, "tensorgate.drift.reference_requests") or "")
        if n is None or n < 1:
            return None
        if self.store.count(t.name) < n:
            return None
        first = self.store.predictions(t.name, limit=n, newest_first=False)
        inputs, skipped = _stack(first, "inputs")
        outputs, skipped_outputs = _stack(first, "outputs")
        self._report_skipped(t, {**skipped, **skipped_outputs})
        categorical = [c.strip() for c in (parameter(t.config, "tensorgate.drift.categorical") or "").split(",")]
        try:
            profile = drift_stats.build_profile(t.name, inputs, outputs, categorical=[c for c in categorical if c])
        except drift_stats.ProfileError as exc:  # the model's setup, not the request: as for a bad profile file
            raise NoReferenceError(
                t.name, t.version, f"cannot build a reference profile from the first {n} captured requests: {exc}"
            ) from exc
        path = drift_stats.save_profile(profile, drift_stats.profile_path(self.data_dir, t.name))
        log.info("monitor: reference profile of model '%s' built from its first %d requests: %s", t.name, n, path)
        return profile

    def _drift(self, t: _Target, window: Window, now: float) -> DriftReport | None:
        profile = self.profile(t)
        if profile is None:
            return None
        predictions = self._window(t, window, now)
        if not predictions:
            return None
        inputs, skipped = _stack(predictions, "inputs")
        outputs, skipped_outputs = _stack(predictions, "outputs")
        report = drift_stats.compare(profile, inputs, outputs)
        report.skipped.update(skipped)
        report.skipped.update(skipped_outputs)
        self._report_skipped(t, report.skipped)
        return report

    def _report_skipped(self, t: _Target, skipped: dict[str, str]) -> None:
        """Log each tensor that drift leaves out, once per model version: otherwise an operator would believe it
        watched (GetModelDrift lists only the features it compared)."""
        with self._lock:
            new = {name: why for name, why in skipped.items() if (t.name, t.version, name) not in self._skipped}
            self._skipped.update((t.name, t.version, name) for name in new)
        for name, why in sorted(new.items()):
            log.warning(
                "monitor: drift of model '%s' version %s leaves out tensor '%s': %s", t.name, t.version, name, why
            )

    def drift(self, t: _Target, window: Window) -> DriftReport:
        """GetModelDrift: FAILED_PRECONDITION when the model has no reference profile or nothing captured."""
        self._flush()
        report = self._drift(t, window, time.time())
        if report is None:
            raise NoReferenceError(
                t.name,
                t.version,
                "no reference profile (run `tensorgate profile`, or set tensorgate.drift.reference_requests) "
                "or no captured predictions in the window",
            )
        return report

    def alerts(self, model: str = "") -> list[AlertTransition]:
        """The alerts firing now, of one model or all."""
        with self._lock:
            engines = [e.engine for e in self._engines.values()]
        active = [a for e in engines for a in e.active()]
        return [a for a in active if not model or a.model == model]

    def target(self, model: str, version: str) -> _Target:
        """The loaded version an RPC names (on the event loop); NOT_FOUND names the model."""
        found = self.targets(model)
        if not found:
            raise ModelNotFoundError(model, version or None, "the model is not loaded")
        if version:
            for t in found:
                if t.version == version:
                    return t
            raise ModelNotFoundError(model, version, f"loaded versions are {sorted(int(t.version) for t in found)}")
        return max(found, key=lambda t: int(t.version))


class MonitoringCollector(Collector):
    """The monitoring families on the server's registry, read from the monitor's last evaluation."""

    def __init__(self, monitor: Monitor | None, capture: Capture | None) -> None:
        self._monitor = monitor
        self._capture = capture

    def collect(self) -> Iterable[Metric]:
        if self._capture is not None:
            dropped = CAPTURE_DROPPED.family()
            dropped.add_metric([], self._capture.dropped)
            yield dropped
            captured = CAPTURED.family()
            captured.add_metric([], self._capture.captured)
            yield captured
            failed = CAPTURE_FAILED.family()
            failed.add_metric([], self._capture.failed)
            yield failed
        monitor = self._monitor
        if monitor is None:
            return
        state = monitor.state
        quality = QUALITY.family()
        for (model, version), metrics in sorted(state.quality.items()):
            for name, value in sorted(metrics.items()):
                quality.add_metric([model, version, name], value)
        yield quality
        drift = DRIFT.family()
        for (model, version), metrics in sorted(state.drift.items()):
            for name, value in sorted(metrics.items()):
                drift.add_metric([model, version, name], value)
        yield drift
        firing = ALERTS_FIRING.family()
        for (model, version), rules in sorted(state.firing.items()):
            for rule in sorted(rules):
                firing.add_metric([model, version, rule], 1)
        yield firing
        transitions = ALERT_TRANSITIONS.family()
        for (model, rule, what), n in sorted(monitor.transitions.items()):
            transitions.add_metric([model, rule, what], n)
        yield transitions
