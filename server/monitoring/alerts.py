"""Alert rules on a model's quality and drift metrics, and the engine that fires and resolves them.

A rule is "metric op threshold": ``accuracy < 0.9``, ``drift.drifted_share > 0.1``. It is evaluated once per
monitoring window (the monitor loop calls ``AlertEngine.evaluate`` with that window's values):

- windows with fewer than ``min_samples`` samples, or without the metric, change nothing (too little to judge);
- the rule fires after ``for_windows`` consecutive breaching windows, and resolves at the first window that no
  longer breaches; each change is one AlertTransition, handed to ``on_transition`` and the webhook;
- a window counts towards ``for_windows`` only when it holds new evidence (the caller's ``evidence`` differs from
  the last one judged): the monitor re-judging the same predictions every interval does not make a streak;
- a firing alert keeps firing through windows it cannot judge (as Prometheus keeps an alert without data), but
  ``active()`` then gives its value as NaN: there is no current value, and the last one is not shown as if it were;
- a "resolved" says why (``reason``): "recovered", "version no longer served", "rule removed" or "rule changed".

With an ``AlertLedger`` (the monitor's: the data dir's store) the firing alerts outlive the process: one fired
before is taken up again silently (``adopt``), and firing or resolving goes through the ledger, so that of the
processes sharing it only the one that changes it announces the change.

Rules come from a model's config.pbtxt, one parameter per rule::

    parameters { key: "tensorgate.alert.low_accuracy" value: { string_value: "accuracy < 0.9 min_samples=200 for=2" } }

or from a YAML file (``--alert-rules``)::

    rules:
      - name: digits_input_drift
        model: digits            # optional, default "*" (every model)
        metric: drift.drifted_share
        op: ">"
        threshold: 0.1
        min_samples: 200         # optional, default 100
        for_windows: 1           # optional, default 1 (``for``, the config.pbtxt spelling, is taken too)

A model has one rule per name: its config.pbtxt rule overrides a rules-file rule of the same name, and a file rule
naming the model overrides a ``"*"`` one (``model_rules``), so a model can tighten or relax a fleet-wide rule.

deploy/monitoring/prometheus-alerts.yaml holds similar conditions as Prometheus rules on the exported gauges (its
quality rules have no min_samples guard: no gauge exports how many labels a quality value rests on).
"""

from __future__ import annotations

import difflib
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import yaml

from tensorgate.server.monitoring.webhook import WebhookSender

__all__ = [
    "ALERT_PARAMETER_PREFIX",
    "DRIFT_METRICS",
    "METRICS",
    "QUALITY_METRICS",
    "AlertEngine",
    "AlertLedger",
    "AlertRule",
    "AlertRuleError",
    "AlertTransition",
    "WebhookSender",
    "dispatch",
    "load_rules_file",
    "model_rules",
    "parse_rule",
    "rules_from_config",
]

logger = logging.getLogger("tensorgate.monitoring.alerts")

ALERT_PARAMETER_PREFIX = "tensorgate.alert."
QUALITY_METRICS = (
    "accuracy",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "mae",
    "rmse",
    "nonfinite_share",
    "label_coverage",
)
DRIFT_METRICS = ("drift.psi_max", "drift.psi_mean", "drift.drifted_share", "drift.score_psi")
METRICS = QUALITY_METRICS + DRIFT_METRICS
"""The metric names the monitor loop passes to ``evaluate``; a rule naming anything else is refused."""
OPS = ("<", ">")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class AlertRuleError(ValueError):
    """A rule that cannot be parsed or makes no sense; the message names the rule and the problem."""


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    """A hint for a misspelt key or metric: what a user wrote is most often one letter or a prefix away."""
    close = difflib.get_close_matches(word, choices, n=1)
    return f": did you mean '{close[0]}'?" if close else ""


def _unknown_metric(metric: str) -> str:
    """Why a metric is refused, with its right spelling when there is one: drift metrics are written with the
    ``drift.`` prefix the gauges' names do not show (``tensorgate_model_drift{metric="drifted_share"}``)."""
    if f"drift.{metric}" in DRIFT_METRICS:
        return f"unknown metric '{metric}': drift metrics are written drift.{metric}"
    if metric.removeprefix("drift.") == "score_drift":
        # What `tensorgate monitor` and GetModelDrift call it, where the gauge and the rules say score_psi.
        return f"unknown metric '{metric}': the output scores' PSI (score_drift in a drift report) is drift.score_psi"
    return f"unknown metric '{metric}'{_did_you_mean(metric, METRICS)} (one of: {', '.join(METRICS)})"


@dataclass(slots=True, frozen=True)
class AlertRule:
    """``metric op threshold``, judged on windows of at least ``min_samples``, firing after ``for_windows``."""

    name: str
    metric: str
    op: str  # "<" | ">"
    threshold: float
    min_samples: int = 100
    for_windows: int = 1
    model: str = "*"

    def __post_init__(self) -> None:
        where = f"alert rule '{self.name}'"
        if not _NAME.match(self.name):
            raise AlertRuleError(f"{where}: a name is letters, digits, '_', '.' or '-'")
        if self.metric not in METRICS:
            raise AlertRuleError(f"{where}: {_unknown_metric(self.metric)}")
        if self.op not in OPS:
            raise AlertRuleError(f"{where}: operator must be '<' or '>', got '{self.op}'")
        if not math.isfinite(self.threshold):
            raise AlertRuleError(f"{where}: threshold must be a finite number, got {self.threshold}")
        if self.min_samples < 1:
            raise AlertRuleError(f"{where}: min_samples must be at least 1, got {self.min_samples}")
        if self.for_windows < 1:
            raise AlertRuleError(f"{where}: for_windows must be at least 1, got {self.for_windows}")
        if not self.model:
            raise AlertRuleError(f"{where}: model must be a model name or '*'")

    def applies_to(self, model: str) -> bool:
        return self.model in ("*", model)

    def breached(self, value: float) -> bool:
        return value < self.threshold if self.op == "<" else value > self.threshold

    def expression(self) -> str:
        return f"{self.metric} {self.op} {self.threshold:g} min_samples={self.min_samples} for={self.for_windows}"


@dataclass(slots=True, frozen=True)
class AlertTransition:
    """A rule starting ("firing") or stopping ("resolved") for one model version; ``value`` is the window's (NaN:
    no window could be judged since the last one). ``active()`` returns the firing transitions with ``value`` the
    latest judged: ``timestamp`` is then when it started firing, ``fired_value`` the value it fired at.

    A "resolved" also carries ``reason``, ``since`` (when it fired) and ``fired_value``; a "firing" leaves them
    empty, since they are its own ``timestamp`` and ``value`` (the webhook sends only the fields that are set)."""

    rule: str
    model: str
    version: str
    state: str  # "firing" | "resolved"
    value: float
    threshold: float
    timestamp: float
    reason: str = ""
    since: float | None = None
    fired_value: float | None = None

    def describe(self) -> str:
        """The one-line account the logs give of it."""
        why = f" ({self.reason})" if self.reason else ""
        value = f"{self.value:.4g}" if math.isfinite(self.value) else "n/a"
        return (
            f"alert {self.rule} {self.state}{why}: model '{self.model}' version {self.version} "
            f"value {value} threshold {self.threshold:.4g}"
        )

    def resolution(self, reason: str, value: float, timestamp: float) -> AlertTransition:
        """The "resolved" of this firing transition."""
        return AlertTransition(
            self.rule,
            self.model,
            self.version,
            "resolved",
            value,
            self.threshold,
            timestamp,
            reason=reason,
            since=self.timestamp,
            fired_value=self.value,
        )


class AlertLedger(Protocol):
    """Where the firing alerts outlive the process (the monitor's: the data dir's store). The engine announces a
    transition only when its call changed the ledger: a process sharing it may have announced it already."""

    def claim(self, fired: AlertTransition, expression: str) -> AlertTransition | None:
        """Record ``fired``; None when it is new, else the firing transition recorded before (kept as it is)."""
        ...

    def release(self, rule: str, model: str, version: str) -> bool:
        """Forget a firing alert; True when it was recorded (and this call removed it)."""
        ...


RECOVERED = "recovered"
VERSION_GONE = "version no longer served"
RULE_REMOVED = "rule removed"
RULE_CHANGED = "rule changed"


def _int_option(rule: str, key: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise AlertRuleError(f"alert rule '{rule}': {key}={raw!r} is not an integer") from None


def parse_rule(name: str, text: str, *, model: str = "*") -> AlertRule:
    """``"<metric> <op> <threshold> [min_samples=N] [for=N]"`` -> AlertRule (the config.pbtxt form)."""
    parts = text.split()
    if len(parts) < 3:
        raise AlertRuleError(
            f"alert rule '{name}': expected '<metric> <op> <threshold> [min_samples=N] [for=N]', got {text!r}"
        )
    metric, op, raw_threshold, *options = parts
    try:
        threshold = float(raw_threshold)
    except ValueError:
        raise AlertRuleError(f"alert rule '{name}': threshold {raw_threshold!r} is not a number") from None
    kwargs: dict[str, int] = {}
    for option in options:
        key, sep, raw = option.partition("=")
        field = _ALIASES.get(key, key)
        if not sep or field not in ("min_samples", "for_windows"):
            hint = _did_you_mean(key, ("min_samples", "for")) if sep else ""
            raise AlertRuleError(f"alert rule '{name}': unknown option {option!r}{hint} (min_samples=N or for=N)")
        kwargs[field] = _int_option(name, key, raw)
    return AlertRule(name=name, metric=metric, op=op, threshold=threshold, model=model, **kwargs)


def rules_from_config(parameters: Mapping[str, str], *, model: str = "*") -> list[AlertRule]:
    """The rules among a model's config.pbtxt parameters ("tensorgate.alert.<name>"), scoped to ``model``."""
    return [
        parse_rule(key.removeprefix(ALERT_PARAMETER_PREFIX), value, model=model)
        for key, value in sorted(parameters.items())
        if key.startswith(ALERT_PARAMETER_PREFIX)
    ]


_FILE_KEYS = {"name", "metric", "op", "threshold", "min_samples", "for_windows", "model"}
_ALIASES = {"for": "for_windows"}
"""Both forms take both spellings: ``for=2`` is what README and config.pbtxt rules show, ``for_windows`` the
field's name, and a rules file written after a config rule (or the other way round) should not fail on it."""


def _rule_from_mapping(path: Path, index: int, item: Any) -> AlertRule:
    where = f"{path}: rules[{index}]"
    if not isinstance(item, dict):
        raise AlertRuleError(f"{where}: a rule is a mapping with name, metric, op and threshold")
    both = [f"'{alias}' and '{key}'" for alias, key in _ALIASES.items() if alias in item and key in item]
    if both:
        raise AlertRuleError(f"{where}: {both[0]} are the same key: give one")
    item = {_ALIASES.get(k, k): v for k, v in item.items()}
    unknown = sorted(map(str, set(item) - _FILE_KEYS))
    if unknown:
        known = sorted(_FILE_KEYS | set(_ALIASES))
        hint = _did_you_mean(unknown[0], known) if len(unknown) == 1 else ""
        raise AlertRuleError(f"{where}: unknown key(s) {', '.join(unknown)}{hint} (allowed: {known})")
    missing = [k for k in ("name", "metric", "op", "threshold") if k not in item]
    if missing:
        raise AlertRuleError(f"{where}: missing {', '.join(missing)}")
    try:
        return AlertRule(
            name=str(item["name"]),
            metric=str(item["metric"]),
            op=str(item["op"]),
            threshold=float(item["threshold"]),
            min_samples=int(item.get("min_samples", 100)),
            for_windows=int(item.get("for_windows", 1)),
            model=str(item.get("model", "*")),
        )
    except AlertRuleError as exc:
        raise AlertRuleError(f"{where}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise AlertRuleError(f"{where}: {exc}") from None


def load_rules_file(path: Path) -> list[AlertRule]:
    """Rules from a YAML (or JSON) file with a top-level ``rules:`` list; see the module docstring."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        # One line (PyYAML's messages span several): `tensorgate serve` logs it as the reason it stopped.
        raise AlertRuleError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict) or not isinstance(data.get("rules"), list):
        raise AlertRuleError(f"{path}: expected a mapping with a 'rules' list")
    rules = [_rule_from_mapping(Path(path), i, item) for i, item in enumerate(data["rules"])]
    seen: set[tuple[str, str]] = set()
    for rule in rules:
        if (rule.name, rule.model) in seen:
            raise AlertRuleError(f"{path}: rule '{rule.name}' for model '{rule.model}' is defined twice")
        seen.add((rule.name, rule.model))
    return rules


def model_rules(model: str, file_rules: Sequence[AlertRule], config_rules: Sequence[AlertRule]) -> list[AlertRule]:
    """The rules judged for ``model``, one per name: the most specific wins (its config.pbtxt rule, then a file rule
    naming it, then a file rule for ``"*"``). Two same-named rules would share one alert state and flap."""
    chosen: dict[str, AlertRule] = {}
    for rule in file_rules:
        if rule.model == "*":
            chosen[rule.name] = rule
    for rule in (*file_rules, *config_rules):
        if rule.model != "*" and rule.applies_to(model):
            if rule.name in chosen:
                logger.info(
                    "alert rule '%s' of model '%s' (%s) overrides the one for model '%s' (%s)",
                    rule.name,
                    model,
                    rule.expression(),
                    chosen[rule.name].model,
                    chosen[rule.name].expression(),
                )
            chosen[rule.name] = rule
    return list(chosen.values())


def _check_unique(rules: Sequence[AlertRule]) -> None:
    # The state is keyed by (rule name, model, version): two same-named rules judging one model would share it.
    for i, rule in enumerate(rules):
        for other in rules[:i]:
            if rule.name == other.name and (rule.applies_to(other.model) or other.applies_to(rule.model)):
                raise AlertRuleError(
                    f"alert rule '{rule.name}' is defined for model '{other.model}' and for model '{rule.model}': "
                    "pick one per model with model_rules()"
                )


class AlertEngine:
    """Holds each (rule, model, version)'s state between windows; thread-safe. Rule names are unique per model
    (AlertRuleError otherwise): merge a rules file with a model's own rules through ``model_rules``.

    Usage::

        engine = AlertEngine(rules, webhook=WebhookSender(url), on_transition=log_and_count)
        engine.evaluate("digits", "1", {"accuracy": 0.82, "drift.drifted_share": 0.4}, samples=500)
        engine.active()   # the transitions of the rules firing now
    """

    def __init__(
        self,
        rules: Sequence[AlertRule],
        *,
        webhook: WebhookSender | None = None,
        on_transition: Callable[[AlertTransition], None] | None = None,
        ledger: AlertLedger | None = None,
    ) -> None:
        _check_unique(rules)
        self.rules = list(rules)
        self._webhook = webhook
        self._on_transition = on_transition
        self._ledger = ledger
        self._lock = threading.Lock()
        self._streak: dict[tuple[str, str, str], int] = {}
        self._firing: dict[tuple[str, str, str], AlertTransition] = {}
        self._evidence: dict[tuple[str, str, str], Hashable] = {}
        self._latest: dict[tuple[str, str, str], tuple[float, float]] = {}
        """(value, when) each rule was last judged at."""
        self._window: dict[tuple[str, str], float] = {}
        """When each model version's latest window began (``new_window``): a value judged before is not current."""

    def new_window(self, model: str, version: str, now: float) -> None:
        """A new window of ``model`` ``version`` is about to be judged (the monitor calls ``evaluate`` once per
        metric group with the same ``now``): a rule that none of them judges has no current value."""
        with self._lock:
            self._window[(model, version)] = now

    def evaluate(
        self,
        model: str,
        version: str,
        values: Mapping[str, float],
        samples: int,
        now: float | None = None,
        evidence: Hashable | None = None,
    ) -> list[AlertTransition]:
        """Judge one window of ``model`` ``version``; returns (and dispatches) the transitions it caused.

        ``evidence`` names what the window holds (the monitor: its newest capture and label times); a breaching
        window with the same evidence as the rule's last one does not lengthen the streak. None: always new."""
        timestamp = time.time() if now is None else now
        transitions: list[AlertTransition] = []
        with self._lock:
            for rule in self.rules:
                if not rule.applies_to(model) or samples < rule.min_samples:
                    continue
                raw = values.get(rule.metric)
                if raw is None or not math.isfinite(raw):
                    continue
                value = float(raw)
                key = (rule.name, model, version)
                self._latest[key] = (value, timestamp)
                fresh = evidence is None or self._evidence.get(key) != evidence
                self._evidence[key] = evidence
                if rule.breached(value):
                    if fresh:
                        self._streak[key] = self._streak.get(key, 0) + 1
                    if self._streak.get(key, 0) >= rule.for_windows and key not in self._firing:
                        fired = AlertTransition(rule.name, model, version, "firing", value, rule.threshold, timestamp)
                        held = self._claim(fired, rule)
                        self._firing[key] = fired if held is None else held
                        if held is None:
                            transitions.append(fired)
                else:
                    self._streak[key] = 0
                    if (f := self._firing.pop(key, None)) is not None and self._release(key):
                        transitions.append(f.resolution(RECOVERED, value, timestamp))
        for transition in transitions:
            self._dispatch(transition)
        return transitions

    def _claim(self, fired: AlertTransition, rule: AlertRule) -> AlertTransition | None:
        if self._ledger is None:
            return None
        try:
            held = self._ledger.claim(fired, rule.expression())
        except Exception:  # noqa: BLE001 - the store failing must not silence the alert: announce it
            logger.exception("alert %s: cannot record it in the data dir; announcing it anyway", fired.rule)
            return None
        if held is not None:
            logger.info(
                "alert %s of model '%s' version %s fires, as announced before (since %s)",
                fired.rule,
                fired.model,
                fired.version,
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(held.timestamp)),
            )
        return held

    def _release(self, key: tuple[str, str, str]) -> bool:
        """Whether this process announces the resolution: False when another process sharing the ledger did."""
        if self._ledger is None:
            return True
        try:
            return self._ledger.release(*key)
        except Exception:  # noqa: BLE001 - as in _claim: better a resolution twice than never
            logger.exception("alert %s: cannot remove it from the data dir; announcing its resolution anyway", key[0])
            return True

    def adopt(self, fired: AlertTransition, expression: str) -> str | None:
        """Take up an alert recorded as firing (before a restart, or by another process sharing the ledger)
        without announcing it; None when adopted (or already held), else why it cannot be: its rule is gone or
        no longer what it was (``RULE_REMOVED``, ``RULE_CHANGED``)."""
        key = (fired.rule, fired.model, fired.version)
        with self._lock:
            rule = next((r for r in self.rules if r.name == fired.rule and r.applies_to(fired.model)), None)
            if rule is None:
                return RULE_REMOVED
            if rule.expression() != expression:
                return RULE_CHANGED
            if key not in self._firing:
                self._firing[key] = fired
                # It fired: the next breaching window keeps it, the next one that does not resolves it.
                self._streak[key] = max(self._streak.get(key, 0), rule.for_windows)
        return None

    def drop(self, rule: str, model: str, version: str) -> None:
        """Forget a firing alert silently: another process sharing the ledger resolved it. Its streak stays, so
        a window that still breaches fires it again (and announces it)."""
        with self._lock:
            self._firing.pop((rule, model, version), None)

    def resolve_all(self, now: float | None = None) -> list[AlertTransition]:
        """Resolve every firing rule (its model version is no longer served); returns and dispatches them."""
        timestamp = time.time() if now is None else now
        with self._lock:
            fired = list(self._firing.values())
            self._firing.clear()
            self._streak.clear()
            self._evidence.clear()
        return self._resolved([(f, VERSION_GONE) for f in fired], timestamp)

    def set_rules(self, rules: Sequence[AlertRule], now: float | None = None) -> list[AlertTransition]:
        """Replace the rules (a model's config was reloaded): a rule left as it was keeps its streak and firing
        state; one removed or changed resolves (returned and dispatched), and its replacement starts afresh."""
        _check_unique(rules)
        timestamp = time.time() if now is None else now
        with self._lock:
            gone = [r for r in self.rules if r not in rules]
            self.rules = list(rules)
            fired: list[tuple[AlertTransition, str]] = []
            # Every key judged or adopted is in _evidence or _firing; _streak holds some of them.
            for key in {*self._evidence, *self._firing}:
                if any(r.name == key[0] and r.applies_to(key[1]) for r in gone):
                    self._streak.pop(key, None)
                    self._evidence.pop(key, None)
                    if (f := self._firing.pop(key, None)) is not None:
                        renamed = any(r.name == key[0] and r.applies_to(key[1]) for r in self.rules)
                        fired.append((f, RULE_CHANGED if renamed else RULE_REMOVED))
        return self._resolved(fired, timestamp)

    def _resolved(self, fired: list[tuple[AlertTransition, str]], timestamp: float) -> list[AlertTransition]:
        """Dispatch a "resolved" (with its reason) for each of ``fired`` whose release this call made; its value is
        the last one judged (NaN: none since it was adopted)."""
        transitions = []
        for f, reason in fired:
            key = (f.rule, f.model, f.version)
            if self._release(key):
                value = self._latest.get(key, (math.nan, 0.0))[0]
                transitions.append(f.resolution(reason, value, timestamp))
        for transition in transitions:
            self._dispatch(transition)
        return transitions

    def active(self) -> list[AlertTransition]:
        """The firing rules, oldest first: each its firing transition with ``value`` the latest judged (NaN when
        the model version's latest window could not judge it) and ``fired_value`` the value it fired at."""
        with self._lock:
            active = []
            for key, fired in self._firing.items():
                value, judged = self._latest.get(key, (math.nan, -math.inf))
                if judged < self._window.get((fired.model, fired.version), -math.inf):
                    value = math.nan
                active.append(replace(fired, value=value, fired_value=fired.value))
            return sorted(active, key=lambda t: t.timestamp)

    def _dispatch(self, transition: AlertTransition) -> None:
        dispatch(transition, self._on_transition, self._webhook)


def dispatch(
    transition: AlertTransition,
    on_transition: Callable[[AlertTransition], None] | None,
    webhook: WebhookSender | None,
) -> None:
    """Announce one transition: to the observer (the monitor logs, counts and traces it), then the webhook."""
    # The monitor's on_transition logs, counts and traces each transition; this line is for debugging only.
    logger.debug("%s", transition.describe())
    if on_transition is not None:
        try:
            on_transition(transition)
        except Exception:  # one broken observer must not stop the others or the monitor loop
            logger.exception("alert transition callback failed")
    if webhook is not None:
        webhook.send(transition)
