"""tensorgate.v1.Monitoring: feedback, quality, drift and alerts over gRPC; each RPC decodes, calls the monitoring
package off the event loop, and encodes.

The RPCs pass the same boundary as the inference service (server/rpc/errors.py: drain gate, identity, policy,
status mapping). Authorization groups (server/auth/policy.py): feedback is a write about a model's traffic, so
``SubmitFeedback``/``SubmitFeedbackBatch``/``SubmitFeedbackStream`` need ``inference`` on that model (whoever may
infer may label; the stream checks each message's model, as ModelStreamInfer does); the reads
(``GetModelQuality``, ``GetModelDrift``, ``ListAlerts``) need ``statistics``, like ModelStatistics.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from grpc import aio

from tensorgate.protos import monitoring_pb2 as mpb
from tensorgate.server.auth.policy import Authorizer
from tensorgate.server.errors import InvalidRequestError, TensorgateError
from tensorgate.server.monitoring.alerts import AlertTransition
from tensorgate.server.monitoring.capture import Capture
from tensorgate.server.monitoring.drift import DriftReport
from tensorgate.server.monitoring.errors import PredictionNotFoundError, StoreWriteError
from tensorgate.server.monitoring.label_check import LabelRule
from tensorgate.server.monitoring.monitor import MAX_WINDOW_COUNT, Monitor, Window
from tensorgate.server.monitoring.quality import QualityReport
from tensorgate.server.monitoring.store import Prediction, rows_in
from tensorgate.server.repository.rollout import SHADOW_DEADLINE_S, Rollout
from tensorgate.server.rpc import errors, malformed
from tensorgate.server.rpc.drain import DrainGate
from tensorgate.server.rpc.malformed import Malformed
from tensorgate.server.telemetry.tracing import Tracing

__all__ = ["SERVICE_NAME", "MonitoringServicer", "add_monitoring_servicer"]

SERVICE_NAME = "tensorgate.v1.Monitoring"
MAX_BATCH_ITEMS = 10_000
MAX_ID_CHARS = 256
# SubmitFeedbackStream commits the items that have arrived while the previous commit ran together, up to this many.
STREAM_COMMIT_ITEMS = 1000
LATE_LABEL_S = 2 * SHADOW_DEADLINE_S
"""How long a label waits for the shadow version's capture of its request (`LateLabels`): a shadow run ends by
SHADOW_DEADLINE_S, and its capture is stored soon after."""
MAX_LATE_LABELS = 100_000
"""Labels waiting at most (the oldest go first): a shadow whose runs are dropped, or a request of a sequence (never
mirrored), leaves labels that no capture will come for."""
MAX_LATE_LABEL_BYTES = 64 << 20
"""The bytes of the labels waiting at most (the oldest go first): a label may hold many rows."""

Context = aio.ServicerContext[Any, Any]


# ----- codec: proto <-> monitoring types --------------------------------------------------------------------


def decode_label(model: str, item: mpb.Feedback) -> np.ndarray:
    """The ground truth of one item as an array (one value per request row); INVALID_ARGUMENT names the problem."""
    if not item.request_id:
        raise InvalidRequestError(model, None, "feedback needs the request_id that the inference response carried")
    if len(item.request_id) > MAX_ID_CHARS:
        raise InvalidRequestError(model, None, f"request_id is longer than {MAX_ID_CHARS} characters")
    if bool(item.values) == bool(item.labels):
        raise InvalidRequestError(
            model, None, f"feedback for request '{item.request_id}' needs either values or labels (exactly one)"
        )
    if item.values:
        values = np.asarray(item.values, dtype=np.float64)
        if not np.all(np.isfinite(values)):
            raise InvalidRequestError(model, None, f"feedback for request '{item.request_id}' has a NaN or infinity")
        return values
    return np.asarray(list(item.labels), dtype=np.str_)


log = logging.getLogger(__name__)


@dataclass(slots=True)
class ServedModel:
    """A model loaded now, as feedback checks labels against it."""

    rules: dict[str, LabelRule | None] = field(default_factory=dict)
    """Each version's label rule, by version."""
    shadow: str | None = None
    """Its rollout's shadow version (repository/rollout.py): its runs repeat the ids of the requests the stable
    version answered, so an id captured there and on another version was answered by the other."""
    rollout: Rollout | None = None
    """Its rollout, which says which request ids its shadow runs (`Rollout.shadows`: a pure function of the id)."""


Served = dict[str, ServedModel]
"""The models loaded now, by name."""


def _checked(
    model: str, request_id: str, label: np.ndarray, version: str, outputs: dict[str, np.ndarray], served: ServedModel
) -> np.ndarray:
    """The label as stored for one version's capture: its rows counted, checked and converted by that version's
    rule (a version no longer loaded: as sent). INVALID_ARGUMENT when that prediction cannot take it."""
    n = rows_in(outputs)
    if label.shape[0] != n:
        raise InvalidRequestError(
            model, None, f"request '{request_id}' had {n} row(s) but the feedback has {label.shape[0]} label(s)"
        )
    rule = served.rules.get(version)
    return label if rule is None else rule.check(version, request_id, label, outputs)


def _shadowed(served: ServedModel, request_id: str, answered: str | None) -> bool:
    """Whether a shadow capture of the request will come: the stable version answered it and the rollout mirrors
    its id. A label for any other id (the canary's, a named version's, one outside shadow_percent) waits for
    nothing."""
    rollout = served.rollout
    return rollout is not None and answered == str(rollout.stable) and rollout.shadows(request_id)


@dataclass(frozen=True, slots=True)
class _Waiting:
    label: np.ndarray
    """As sent: the shadow version's rule checks and converts it, as it would have at once."""
    served: ServedModel
    timestamp: float
    """When it was acknowledged (its label_ts)."""


class LateLabels:
    """Labels of requests whose shadow run had not been captured yet when the label came, by (model, request id,
    shadow version), until that capture is stored. A label is sent as soon as the caller has its answer, while the
    shadow (slower, or queued behind the live traffic) still runs: without them only the stable version's capture
    would be labelled, and the shadow judged on the few labels that came late. Kept in memory for LATE_LABEL_S at
    most: labels sent to one process for a shadow run captured by another (--reuse-port), or before a restart,
    are not carried over. Thread-safe: feedback holds them, the capture writer takes them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: OrderedDict[tuple[str, str, str], _Waiting] = OrderedDict()
        self._bytes = 0
        """The bytes of the labels waiting."""

    def hold(self, key: tuple[str, str, str], waiting: _Waiting) -> None:
        with self._lock:
            replaced = self._waiting.pop(key, None)
            self._bytes += waiting.label.nbytes - (0 if replaced is None else replaced.label.nbytes)
            self._waiting[key] = waiting
            oldest = waiting.timestamp - LATE_LABEL_S
            while self._waiting and (
                len(self._waiting) > MAX_LATE_LABELS
                or self._bytes > MAX_LATE_LABEL_BYTES
                or next(iter(self._waiting.values())).timestamp < oldest
            ):
                self._bytes -= self._waiting.popitem(last=False)[1].label.nbytes

    def take(self, key: tuple[str, str, str]) -> _Waiting | None:
        """The label waiting for this capture, once: whoever takes it stores it."""
        if not self._waiting:  # most captures: no lock taken
            return None
        with self._lock:
            waiting = self._waiting.pop(key, None)
            if waiting is not None:
                self._bytes -= waiting.label.nbytes
            return waiting

    def __len__(self) -> int:
        return len(self._waiting)


def answered_by(versions: dict[str, dict[str, np.ndarray]], shadow: str | None) -> str | None:
    """Which of the versions that captured a request id answered its caller: the newest capture not made by the
    model's shadow version, or None when only the shadow captured it (the caller's own capture was not sampled). A
    version that was the shadow only before the last reload is taken as any other: its capture then counts if it
    is the newest."""
    return next((v for v in versions if v != shadow), None)


def decode_window(model: str, window: mpb.Window) -> Window:
    if not math.isfinite(window.seconds) or window.seconds < 0:
        raise InvalidRequestError(model, None, f"window.seconds must be a finite number >= 0, got {window.seconds}")
    if window.count > MAX_WINDOW_COUNT:
        raise InvalidRequestError(
            model, None, f"window.count is at most {MAX_WINDOW_COUNT} captured requests, got {window.count}"
        )
    # 0 with seconds: every request of those seconds, up to the cap (Window reads 0 as "no count limit" then).
    count = window.count or (MAX_WINDOW_COUNT if window.seconds > 0 else 0)
    return Window(count=int(count), seconds=float(window.seconds))


def encode_quality(report: QualityReport) -> mpb.ModelQuality:
    msg = mpb.ModelQuality(
        model=report.model,
        version=report.version,
        task=report.task,
        predictions=report.predictions,
        labelled=report.labelled,
        rows=report.rows,
        metrics=report.metrics,
        class_labels=report.class_labels,
        confusion=[n for row in report.confusion for n in row],
    )
    for c in report.classes:
        msg.classes.add(label=c.label, precision=c.precision, recall=c.recall, f1=c.f1, support=c.support)
    return msg


def encode_drift(model: str, version: str, report: DriftReport) -> mpb.ModelDrift:
    msg = mpb.ModelDrift(
        model=model,
        version=version,
        samples=int(report.samples),
        drifted=bool(report.drifted),
        psi_max=float(report.psi_max),
        psi_mean=float(report.psi_mean),
        drifted_share=float(report.drifted_share),
        score_drift=float(report.score_drift),
        skipped=report.skipped,
    )
    for f in report.features:
        msg.features.add(
            name=f.name,
            kind=f.kind,
            psi=float(f.psi),
            statistic=float(f.statistic),
            p_value=float(f.p_value),
            drifted=bool(f.drifted),
        )
    return msg


def encode_alert(a: AlertTransition) -> mpb.Alert:
    return mpb.Alert(
        rule=a.rule,
        model=a.model,
        version=a.version,
        state=a.state,
        value=float(a.value),
        threshold=float(a.threshold),
        timestamp=float(a.timestamp),
    )


# ----- the servicer ------------------------------------------------------------------------------------------


class MonitoringServicer:
    """The ``tensorgate.v1.Monitoring`` RPCs; registered by ``add_monitoring_servicer``."""

    def __init__(
        self,
        monitor: Monitor,
        capture: Capture | None,
        *,
        gate: DrainGate,
        auth: Authorizer | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.gate = gate
        self.auth = auth or Authorizer()
        self.tracing = tracing
        self._monitor = monitor
        self._capture = capture
        self._rules: dict[tuple[str, str, str], LabelRule | None] = {}
        """Label rules by (model, version, signature) of the versions loaded at the last call: built once per load,
        not per feedback item (the signature changes with the config and the label files)."""
        self._skips: set[tuple[str, str]] = set()
        """(model, version) that a label was skipped for (`_skipped`): logged at INFO once each."""
        self._late = LateLabels()
        monitor.store.after_insert = self._label_late

    def _served(self) -> Served:
        """The models loaded now with their label rules, read on the event loop (the repository lives there) for
        `_join`'s thread."""
        served: Served = {}
        rules: dict[tuple[str, str, str], LabelRule | None] = {}
        for m in self._monitor.repository.loaded():
            key = (m.name, str(m.version), m.signature)
            rules[key] = self._rules[key] if key in self._rules else LabelRule.of(m)
            versions = served.setdefault(m.name, ServedModel())
            versions.rules[key[1]] = rules[key]
            if m.rollout is not None and m.rollout.shadow is not None:
                versions.shadow, versions.rollout = str(m.rollout.shadow), m.rollout
        self._rules = rules
        return served

    def _join(self, model: str, items: list[tuple[str, np.ndarray]], served: Served) -> list[TensorgateError | None]:
        """Blocking: wait for queued captures, check row counts and labels against the version that made each
        prediction (one no longer loaded: as sent), commit them; one error (or None) per item. An id of a model that
        is not `served` and has no captured predictions at all is most likely a misspelt model name, and its
        NOT_FOUND says so.

        An id captured on several versions (a shadow version's run of the request, or an id sent again to another
        version) has its label checked against each one's prediction and stored on each as that one converts it.
        The caller hears only of the version that answered it (`answered_by`): a label that another version cannot
        take (fewer classes, other class names) is stored where it fits and skipped there. An id accepted before
        the model's shadow version captured it waits for that capture (`LateLabels`), if the stable version
        answered it and the rollout mirrors its id (`Rollout.shadows`): no capture comes for the others."""
        if self._capture is not None:
            self._capture.flush()
        store = self._monitor.store
        captured = store.captured(model, [request_id for request_id, _ in items])
        versions = served.get(model, ServedModel())
        outcome: list[TensorgateError | None] = []
        accepted: list[tuple[str, np.ndarray, str]] = []
        now = time.time()
        # Accepted ids, with the label that passed, to hold for the shadow version's capture once stored.
        held: list[tuple[str, np.ndarray]] = []
        unknown = (
            len(captured) < len(items)
            and model not in served
            and not store.predictions(model, limit=1, with_inputs=False)
        )
        for request_id, label in items:
            by_version = captured.get(request_id)
            if by_version is None:
                outcome.append(PredictionNotFoundError(model, request_id, model_unknown=unknown))
                continue
            answered = answered_by(by_version, versions.shadow)
            checked: list[tuple[str, np.ndarray, str]] = []
            error: TensorgateError | None = None
            for version, outputs in by_version.items():
                try:
                    checked.append(
                        (request_id, _checked(model, request_id, label, version, outputs, versions), version)
                    )
                except InvalidRequestError as exc:
                    if version == answered:
                        error = exc.with_traceback(None)  # a value from here on: no cycle through this frame
                        break
                    self._skipped(model, version, exc)
            if error is None and not checked:  # only a shadow captured it, and cannot take it: as if uncaptured
                error = PredictionNotFoundError(model, request_id)
            outcome.append(error)
            if error is None:
                accepted.extend(checked)
                shadow = versions.shadow
                if shadow is not None and shadow not in by_version and _shadowed(versions, request_id, answered):
                    held.append((request_id, label))
        try:
            found = store.set_labels(model, accepted, now)
        except sqlite3.OperationalError as exc:  # a full disk: the caller is told so, and may send them again
            if not StoreWriteError.environmental(exc):
                raise  # corruption or a bug: INTERNAL, with its traceback in the log
            raise StoreWriteError(model, "feedback", exc) from None
        if held and versions.shadow is not None:
            # Held for the shadow's capture only once stored: a call refused above leaves nothing that stores later.
            for request_id, label in held:  # the label that passed, not a refused one sent for the same id
                self._late.hold((model, request_id, versions.shadow), _Waiting(label, versions, now))
            late = store.captured(model, [request_id for request_id, _ in held])  # stored since `captured`
            self._label_late(
                [
                    Prediction(rid, model, versions.shadow, now, None, by_version[versions.shadow])
                    for rid, by_version in late.items()
                    if versions.shadow in by_version
                ]
            )
        # An id pruned by retention between the two statements (none of its captures left): NOT_FOUND after all.
        kept = {rid for (rid, _, _), ok in zip(accepted, found, strict=True) if ok}
        gone = {rid for rid, _, _ in accepted} - kept
        return [
            PredictionNotFoundError(model, rid) if err is None and rid in gone else err
            for (rid, _), err in zip(items, outcome, strict=True)
        ]

    def _label_late(self, predictions: Sequence[Prediction]) -> None:
        """The capture writer stored these: label those a label was waiting for (`LateLabels`), in one synced
        transaction per model, not one per label (each costs the writer a sync). Never raises: the captures are
        stored, whatever happens to a label."""
        if not len(self._late):  # most batches: nothing waits
            return
        by_model: dict[str, tuple[list[tuple[str, np.ndarray, str]], list[float]]] = {}
        for p in predictions:
            waiting = self._late.take((p.model, p.id, p.version))
            if waiting is None:
                continue
            try:
                label = _checked(p.model, p.id, waiting.label, p.version, p.outputs, waiting.served)
            except InvalidRequestError as exc:
                self._skipped(p.model, p.version, exc)
                continue
            items, stamps = by_model.setdefault(p.model, ([], []))
            items.append((p.id, label, p.version))
            stamps.append(waiting.timestamp)
        for model, (items, stamps) in by_model.items():
            try:
                self._monitor.store.set_labels(model, items, stamps)
            except Exception:  # noqa: BLE001 - the capture writer must not count a stored batch as lost
                log.exception("feedback: labelling %d late capture(s) of model '%s' failed", len(items), model)

    def _skipped(self, model: str, version: str, exc: InvalidRequestError) -> None:
        """A label stored for the version that answered, which another version's prediction cannot take: said
        once per model version at INFO (then at DEBUG), never to the caller."""
        first = (model, version) not in self._skips
        self._skips.add((model, version))
        log.log(
            logging.INFO if first else logging.DEBUG,
            "feedback: a label not stored for model '%s' version %s, which did not answer the request (a shadow "
            "run): %s%s",
            model,
            version,
            exc.message,
            " (such labels are skipped for it from now on, logged at DEBUG)" if first else "",
        )

    @errors.unary
    async def SubmitFeedback(self, request: mpb.SubmitFeedbackRequest, context: Context) -> mpb.SubmitFeedbackResponse:
        model = request.model
        if not model:
            raise InvalidRequestError("", None, "SubmitFeedback needs the model name")
        label = decode_label(model, request.feedback)
        (error,) = await asyncio.to_thread(self._join, model, [(request.feedback.request_id, label)], self._served())
        if error is not None:
            raise error
        return mpb.SubmitFeedbackResponse(request_id=request.feedback.request_id)

    @errors.unary
    async def SubmitFeedbackBatch(
        self, request: mpb.SubmitFeedbackBatchRequest, context: Context
    ) -> mpb.SubmitFeedbackBatchResponse:
        model = request.model
        if not model:
            raise InvalidRequestError("", None, "SubmitFeedbackBatch needs the model name")
        if len(request.items) > MAX_BATCH_ITEMS:
            raise InvalidRequestError(
                model, None, f"a batch holds at most {MAX_BATCH_ITEMS} items, got {len(request.items)}"
            )
        statuses: list[mpb.FeedbackStatus | None] = []
        valid: list[tuple[int, str, np.ndarray]] = []
        for i, item in enumerate(request.items):
            try:
                valid.append((i, item.request_id, decode_label(model, item)))
                statuses.append(None)
            except TensorgateError as exc:
                statuses.append(
                    mpb.FeedbackStatus(request_id=item.request_id, code=exc.code.value[0], message=exc.message)
                )
        results = await asyncio.to_thread(self._join, model, [(rid, label) for _, rid, label in valid], self._served())
        accepted = 0
        for (i, rid, _), err in zip(valid, results, strict=True):
            if err is None:
                accepted += 1
                statuses[i] = mpb.FeedbackStatus(request_id=rid, code=grpc.StatusCode.OK.value[0])
            else:
                statuses[i] = mpb.FeedbackStatus(request_id=rid, code=err.code.value[0], message=err.message)
        return mpb.SubmitFeedbackBatchResponse(statuses=[s for s in statuses if s is not None], accepted=accepted)

    def _status(self, request_id: str, error: TensorgateError | None) -> mpb.FeedbackStatus:
        if error is None:
            return mpb.FeedbackStatus(request_id=request_id, code=grpc.StatusCode.OK.value[0])
        return mpb.FeedbackStatus(request_id=request_id, code=error.code.value[0], message=error.message)

    def _commit_stream_items(
        self, items: list[tuple[str, str, np.ndarray]], served: Served
    ) -> list[TensorgateError | None]:
        """Blocking: ``_join`` per model, for (model, request id, label) items; one outcome per item, in order."""
        by_model: dict[str, list[int]] = {}
        for i, (model, _, _) in enumerate(items):
            by_model.setdefault(model, []).append(i)
        outcome: list[TensorgateError | None] = [None] * len(items)
        for model, indices in by_model.items():
            try:
                results = self._join(model, [(items[i][1], items[i][2]) for i in indices], served)
            except StoreWriteError as exc:  # each item is told, and the stream goes on (the disk may get space)
                results = [exc] * len(indices)
            for i, err in zip(indices, results, strict=True):
                outcome[i] = err
        return outcome

    @errors.stream
    async def SubmitFeedbackStream(
        self, request_iterator: AsyncIterator[mpb.SubmitFeedbackRequest | Malformed], context: Context
    ) -> AsyncIterator[mpb.FeedbackStatus]:
        """One status per item, in the order sent, each once its label is committed (or refused).

        Items that arrive while a commit runs are committed together in the next one (group commit, at most
        ``STREAM_COMMIT_ITEMS``), so a fast sender pays one SQLite fsync per group, not per item. An item's own
        problem (no model, not allowed, bad label, unknown id) is its status; the stream goes on.
        """
        pending: asyncio.Queue[mpb.SubmitFeedbackRequest | Malformed | None]
        pending = asyncio.Queue(maxsize=STREAM_COMMIT_ITEMS)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await pending.put(request)
            except Exception:
                # The request stream failed: the loop below ends, then `await reader` raises it.
                await pending.put(None)
                raise
            await pending.put(None)

        reader = asyncio.create_task(read())
        try:
            done = False
            while not done:
                group: list[mpb.SubmitFeedbackRequest | Malformed] = []
                first = await pending.get()
                if first is None:
                    break
                group.append(first)
                while len(group) < STREAM_COMMIT_ITEMS and not pending.empty():
                    request = pending.get_nowait()
                    if request is None:
                        done = True
                        break
                    group.append(request)
                statuses: list[mpb.FeedbackStatus | None] = []
                valid: list[tuple[int, tuple[str, str, np.ndarray]]] = []
                for i, request in enumerate(group):
                    if isinstance(request, Malformed):  # bytes that did not parse (rpc/malformed.py)
                        statuses.append(self._status("", request.error("SubmitFeedbackStream")))
                        continue
                    rid = request.feedback.request_id
                    try:
                        if not request.model:
                            raise InvalidRequestError(
                                "", None, "SubmitFeedbackStream needs the model name in each message"
                            )
                        if self.auth.enabled:
                            self.auth.check("SubmitFeedbackStream", request.model)
                        valid.append((i, (request.model, rid, decode_label(request.model, request.feedback))))
                        statuses.append(None)
                    except TensorgateError as exc:
                        statuses.append(self._status(rid, exc))
                if valid:
                    results = await asyncio.to_thread(
                        self._commit_stream_items, [item for _, item in valid], self._served()
                    )
                    for (i, (_, rid, _)), err in zip(valid, results, strict=True):
                        statuses[i] = self._status(rid, err)
                for status in statuses:
                    assert status is not None
                    yield status
            await reader  # surfaces a failure of the request stream itself
        finally:
            reader.cancel()

    @errors.unary
    async def GetModelQuality(self, request: mpb.GetModelQualityRequest, context: Context) -> mpb.ModelQuality:
        window = decode_window(request.model, request.window)
        target = self._monitor.target(request.model, request.version)
        report = await asyncio.to_thread(self._monitor.quality, target, window)
        return encode_quality(report)

    @errors.unary
    async def GetModelDrift(self, request: mpb.GetModelDriftRequest, context: Context) -> mpb.ModelDrift:
        window = decode_window(request.model, request.window)
        target = self._monitor.target(request.model, request.version)
        report = await asyncio.to_thread(self._monitor.drift, target, window)
        return encode_drift(target.name, target.version, report)

    @errors.unary
    async def ListAlerts(self, request: mpb.ListAlertsRequest, context: Context) -> mpb.ListAlertsResponse:
        return mpb.ListAlertsResponse(alerts=[encode_alert(a) for a in self._monitor.alerts(request.model)])


def add_monitoring_servicer(servicer: MonitoringServicer, server: aio.Server) -> None:
    malformed.add_servicer_to_server(SERVICE_NAME, servicer, server)
