"""Server-side rollout of a new model version: which version a request that names none goes to.

    spec = parse_rollout(config, wanted=[1, 2], previously=[])      # at load; None without tensorgate.rollout.*
    rollout = Rollout(config.name, spec, served=[1, 2])
    version = rollout.choose(request_id)                            # per request that names no version
    if rollout.judges(version): ... rollout.outcome(version, failed)   # routed requests, as they end

The split is sticky per request id (a hash of the id, not a draw), so that a client retrying with its id reaches
the version that answered it first, and a label sent later for that id is judged against the version that made
the prediction; a sequence's requests are split by their sequence id instead, so that its steps all reach the
version that holds its state. Requests naming a version explicitly never come here (ModelRepository.get).

The monitor tells every rollout which alert rules fire on its canary (`follow`, through the repository on the
event loop, which also hands a new rollout the last word it had); while any does and
``tensorgate.rollout.rollback_on_alert`` is on, the canary's share is 0. The handler tells it how each request
routed to the canary or the stable version ended (`outcome`): once the canary's failure rate over its last
ERROR_WINDOW exceeds the stable version's by more than ``tensorgate.rollout.max_error_percent`` points (with at
least ERROR_MIN_FAILURES failures), the canary's share is 0 until its build or the gate changes, or the model is
unloaded and loaded again.

With ``tensorgate.rollout.ramp`` the share climbs by itself from canary_percent through the listed steps, one step
each time the canary has held its share for ramp_interval_s, answered ramp_min_requests routed requests at it, no
alert fires on it and the gate has judged it without tripping (and, with a monitor, once an evaluation that began
after the hold has ended). The rules are checked as routed requests end and as the monitor's evaluations arrive,
on the event loop: no timer of its own, since a canary that gets no requests has nothing to be judged by.
"""

from __future__ import annotations

import difflib
import logging
import math
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable, Collection, Mapping
from contextvars import ContextVar
from dataclasses import dataclass

import grpc

from tensorgate.protos import model_config_pb2 as mc
from tensorgate.server.decimal_text import parse_canonical
from tensorgate.server.errors import ModelLoadError, TensorgateError, model_ref

__all__ = [
    "DEFAULT_SHADOW_MAX_IN_FLIGHT",
    "ERROR_WINDOW",
    "PREFIX",
    "ROUTED_VERSION",
    "SHADOW_DEADLINE_S",
    "NoRolloutError",
    "Rollout",
    "RolloutSpec",
    "RolloutState",
    "parse_rollout",
    "with_rollout_parameters",
]

log = logging.getLogger(__name__)

ROUTED_VERSION: ContextVar[str | None] = ContextVar("tensorgate_routed_version", default=None)
"""The version a request that named none was sent to (by a split, or the version policy), set for the rest of its
call (each call, and each message of a stream, runs in a context of its own): a failure, a timeout included, is
counted in /metrics and named in its access line under the version that ran it, not guessed afterwards."""

PREFIX = "tensorgate.rollout."
CANARY_VERSION = PREFIX + "canary_version"
CANARY_PERCENT = PREFIX + "canary_percent"
STABLE_VERSION = PREFIX + "stable_version"
SHADOW_VERSION = PREFIX + "shadow_version"
SHADOW_PERCENT = PREFIX + "shadow_percent"
ROLLBACK_ON_ALERT = PREFIX + "rollback_on_alert"
MAX_ERROR_PERCENT = PREFIX + "max_error_percent"
SHADOW_MAX_IN_FLIGHT = PREFIX + "shadow_max_in_flight"
RAMP = PREFIX + "ramp"
RAMP_INTERVAL_S = PREFIX + "ramp_interval_s"
RAMP_MIN_REQUESTS = PREFIX + "ramp_min_requests"
_KEYS = (
    CANARY_VERSION,
    CANARY_PERCENT,
    STABLE_VERSION,
    SHADOW_VERSION,
    SHADOW_PERCENT,
    ROLLBACK_ON_ALERT,
    MAX_ERROR_PERCENT,
    SHADOW_MAX_IN_FLIGHT,
    RAMP,
    RAMP_INTERVAL_S,
    RAMP_MIN_REQUESTS,
)

DEFAULT_MAX_ERROR_PERCENT = 5.0
ERROR_WINDOW = 100
"""The canary's last routed requests whose failures the error gate counts: enough that one unlucky request
weighs 1%, few enough that a version failing a third of its requests goes within a few hundred requests."""
ERROR_MIN_REQUESTS = 20
"""Routed requests the canary must have ended before the gate judges it: 2 failures of the first 3 are not 66%.
The stable version's rate is the baseline only past as many of its own (before that, 0)."""
ERROR_MIN_FAILURES = 5
"""Failures the canary must have in its window before the gate trips: 2 slow cold-start requests of its first 20
are 10%, not a broken version."""

DEFAULT_SHADOW_MAX_IN_FLIGHT = 4
"""Shadow runs of one model at once unless ``tensorgate.rollout.shadow_max_in_flight`` says otherwise; beyond it a
shadow run is dropped (and counted): the shadow version shares the machine with the live path, which must never
wait for it."""

SHADOW_DEADLINE_S = 30.0
"""The longest a shadow run may take: the caller's own budget, at most this, or this when the caller set none. A
shadow version that never answers must give its places back, or every later run is dropped."""

DEFAULT_RAMP_INTERVAL_S = 600.0
"""How long the canary holds each share of a ramp at least: long enough for several of the monitor's evaluations
(every 10 s by default) and for a slow leak of quality to show in its window."""
DEFAULT_RAMP_MIN_REQUESTS = ERROR_WINDOW
"""Routed requests the canary must end at a share before the next: a full window for the error gate."""

_BUCKETS = 10_000
"""A request id's place in [0, 100) in steps of 0.01: percents with two decimals split exactly."""


@dataclass(frozen=True, slots=True)
class RolloutSpec:
    """A model's ``tensorgate.rollout.*`` parameters, checked."""

    canary: int | None
    canary_percent: float
    stable: int
    shadow: int | None
    shadow_percent: float
    rollback_on_alert: bool
    parameters: tuple[tuple[str, str], ...] = ()
    """The ``tensorgate.rollout.*`` parameters as the config writes them, sorted: what a version kept unchanged
    across a reload gets in its config (`with_rollout_parameters`), since they are no part of its signature."""
    max_error_percent: float | None = DEFAULT_MAX_ERROR_PERCENT
    """Percentage points by which the canary's failure rate (over its last ERROR_WINDOW routed requests) may
    exceed the stable version's before it is rolled back; None ("off") for no error gate."""
    shadow_max_in_flight: int = DEFAULT_SHADOW_MAX_IN_FLIGHT
    """Shadow runs of the model at once, beyond which one is dropped."""
    ramp: tuple[float, ...] = ()
    """The canary's next shares after canary_percent, ascending (``tensorgate.rollout.ramp``); () for none."""
    ramp_interval_s: float = DEFAULT_RAMP_INTERVAL_S
    ramp_min_requests: int = DEFAULT_RAMP_MIN_REQUESTS

    @property
    def steps(self) -> tuple[float, ...]:
        """Every share the canary may have, in order: canary_percent, then the ramp's."""
        return (self.canary_percent, *self.ramp)


class NoRolloutError(TensorgateError):
    """GetRollout for a served model that has no split: its config sets none, or (`configured`) the split's
    stable version is not served, which a load only logs."""

    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, model: str, *, configured: bool = False) -> None:
        why = (
            f"its config sets {PREFIX}* parameters, but the split's stable version is not served (it failed to load: "
            "RepositoryIndex says why)"
            if configured
            else f"its config sets no {PREFIX}* parameter"
        )
        super().__init__(
            f"{model_ref(model)} has no rollout split: {why}, so requests that name no version go to its highest "
            "served version"
        )


@dataclass(frozen=True, slots=True)
class RolloutState:
    """A split as it serves now (`Rollout.state`): what GetRollout answers."""

    model: str
    spec: RolloutSpec
    stable: int
    canary: int | None
    """None when the config names no canary, or the one it names is not served."""
    share: float
    step: int
    rolled_back: str
    """"alert" or "errors" while one holds the canary at 0; "" otherwise."""
    alerts: tuple[str, ...]
    step_held_s: float
    step_requests: int
    canary_judged: int
    canary_failed_percent: float
    stable_judged: int
    stable_failed_percent: float
    waiting_for: tuple[str, ...]
    shadow: int | None


def _version(model: str, key: str, raw: str, wanted: Collection[int], previously: Collection[int]) -> int:
    number = parse_canonical(raw)
    if number is None:
        raise ModelLoadError(model, None, f"parameter '{key}' must be a version number, got {raw!r}")
    if number not in wanted and number not in previously:
        raise ModelLoadError(
            model,
            None,
            f"parameter '{key}' names version {number}, which the model does not serve (it serves "
            f"{sorted(wanted) or 'none'}: check version_policy and the version directories)",
        )
    return number


def _percent(model: str, key: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 100:  # NaN fails too
        raise ModelLoadError(model, None, f"parameter '{key}' must be a number from 0 to 100, got {raw!r}")
    return value


def _shadow_cap(model: str, raw: str | None) -> int:
    if raw is None:
        return DEFAULT_SHADOW_MAX_IN_FLIGHT
    number = parse_canonical(raw)
    if number is None or number < 1:
        raise ModelLoadError(
            model, None, f"parameter '{SHADOW_MAX_IN_FLIGHT}' must be a whole number of shadow runs >= 1, got {raw!r}"
        )
    return number


def _ramp(model: str, params: Mapping[str, str], start: float) -> tuple[float, ...]:
    """The ramp's shares, each above the one before it, starting above canary_percent (`start`)."""
    if RAMP not in params:
        for key in (RAMP_INTERVAL_S, RAMP_MIN_REQUESTS):
            if key in params:
                raise ModelLoadError(model, None, f"parameter '{key}' needs '{RAMP}'")
        return ()
    raw = params[RAMP]
    steps = tuple(_percent(model, RAMP, item.strip()) for item in raw.split(","))
    if start <= 0:
        raise ModelLoadError(
            model,
            None,
            f"parameter '{RAMP}' needs '{CANARY_PERCENT}' above 0: the canary's first share, whose requests the "
            "ramp judges before it raises the share",
        )
    earlier = (start, *steps)
    if any(b <= a for a, b in zip(earlier, steps, strict=False)):
        raise ModelLoadError(
            model,
            None,
            f"parameter '{RAMP}' must list shares that rise, each above the one before and the first above "
            f"'{CANARY_PERCENT}' ({start:g}), got {raw!r}",
        )
    return steps


def _ramp_settings(model: str, params: Mapping[str, str]) -> tuple[float, int]:
    interval = DEFAULT_RAMP_INTERVAL_S
    if RAMP_INTERVAL_S in params:
        raw = params[RAMP_INTERVAL_S]
        try:
            interval = float(raw)
        except ValueError:
            interval = math.nan
        if not 0 < interval < math.inf:
            raise ModelLoadError(
                model, None, f"parameter '{RAMP_INTERVAL_S}' must be a number of seconds > 0, got {raw!r}"
            )
    requests = DEFAULT_RAMP_MIN_REQUESTS
    if RAMP_MIN_REQUESTS in params:
        raw = params[RAMP_MIN_REQUESTS]
        number = parse_canonical(raw)
        if number is None or number < 1:
            raise ModelLoadError(
                model, None, f"parameter '{RAMP_MIN_REQUESTS}' must be a whole number of requests >= 1, got {raw!r}"
            )
        requests = number
    return interval, requests


def parse_rollout(config: mc.ModelConfig, wanted: Collection[int], previously: Collection[int]) -> RolloutSpec | None:
    """The rollout a config asks for, checked against the versions this load serves (`wanted`); None when it sets
    no ``tensorgate.rollout.*`` parameter. A canary or shadow version among those served until now
    (`previously`) is accepted though this load no longer serves it (its directory was removed): the split then
    sends everything to the stable version (`Rollout`). Raises ModelLoadError naming the parameter."""
    model = config.name
    params = {k: v.string_value.strip() for k, v in config.parameters.items() if k.startswith(PREFIX)}
    if not params:
        return None
    for key in params:
        if key not in _KEYS:
            close = difflib.get_close_matches(key, _KEYS, n=1)
            hint = (
                f": did you mean '{close[0]}'?" if close else f" (known: {', '.join(k[len(PREFIX) :] for k in _KEYS)})"
            )
            raise ModelLoadError(model, None, f"unknown parameter '{key}'{hint}")
    needs = (
        (CANARY_VERSION, CANARY_PERCENT),
        (SHADOW_VERSION, SHADOW_PERCENT),
        (SHADOW_VERSION, SHADOW_MAX_IN_FLIGHT),
        (CANARY_VERSION, RAMP),
    )
    for version_key, percent_key in needs:
        if percent_key in params and version_key not in params:
            raise ModelLoadError(model, None, f"parameter '{percent_key}' needs '{version_key}'")
    if CANARY_VERSION in params and CANARY_PERCENT not in params:
        raise ModelLoadError(model, None, f"parameter '{CANARY_VERSION}' needs '{CANARY_PERCENT}' (0 to 100)")
    canary = (
        _version(model, CANARY_VERSION, params[CANARY_VERSION], wanted, previously)
        if CANARY_VERSION in params
        else None
    )
    shadow = (
        _version(model, SHADOW_VERSION, params[SHADOW_VERSION], wanted, previously)
        if SHADOW_VERSION in params
        else None
    )
    if STABLE_VERSION in params:
        stable = _version(model, STABLE_VERSION, params[STABLE_VERSION], wanted, ())
    else:
        others = [v for v in wanted if v not in (canary, shadow)]
        if not others:
            raise ModelLoadError(
                model,
                None,
                f"no served version is left to be the stable one besides the canary and the shadow "
                f"(it serves {sorted(wanted)}); serve one, or name it with '{STABLE_VERSION}'",
            )
        stable = max(others)
    for key, other in ((CANARY_VERSION, canary), (SHADOW_VERSION, shadow)):
        if other == stable:
            raise ModelLoadError(model, None, f"parameter '{key}' names version {stable}, the stable version")
    rollback = params.get(ROLLBACK_ON_ALERT, "true").lower()
    if rollback not in ("true", "false"):
        raise ModelLoadError(model, None, f"parameter '{ROLLBACK_ON_ALERT}' must be true or false, got {rollback!r}")
    if canary is not None and canary == shadow:
        raise ModelLoadError(
            model,
            None,
            f"parameters '{CANARY_VERSION}' and '{SHADOW_VERSION}' both name version {canary}: a canary answers "
            "callers, a shadow only mirrors the stable version; name another version for one of them",
        )
    max_error: float | None = DEFAULT_MAX_ERROR_PERCENT
    if MAX_ERROR_PERCENT in params:
        raw = params[MAX_ERROR_PERCENT]
        try:
            max_error = None if raw.lower() == "off" else _percent(model, MAX_ERROR_PERCENT, raw)
        except ModelLoadError:
            why = f"parameter '{MAX_ERROR_PERCENT}' must be a number from 0 to 100, or off, got {raw!r}"
            raise ModelLoadError(model, None, why) from None
    canary_percent = _percent(model, CANARY_PERCENT, params[CANARY_PERCENT]) if canary is not None else 0.0
    ramp = _ramp(model, params, canary_percent)
    interval, min_requests = _ramp_settings(model, params)
    return RolloutSpec(
        canary,
        canary_percent,
        stable,
        shadow,
        _percent(model, SHADOW_PERCENT, params[SHADOW_PERCENT]) if SHADOW_PERCENT in params else 100.0,
        rollback == "true",
        tuple(sorted((k, v.string_value) for k, v in config.parameters.items() if k.startswith(PREFIX))),
        max_error_percent=max_error,
        shadow_max_in_flight=_shadow_cap(model, params.get(SHADOW_MAX_IN_FLIGHT)),
        ramp=ramp,
        ramp_interval_s=interval,
        ramp_min_requests=min_requests,
    )


def with_rollout_parameters(config: mc.ModelConfig, parameters: tuple[tuple[str, str], ...]) -> mc.ModelConfig:
    """`config` with these ``tensorgate.rollout.*`` parameters instead of its own (a copy; `config` itself when
    they are the same). With none, what a version's signature is computed from: a new split (canary_percent 10 to
    50) rebuilds the Rollout, not every version's session, statistics and cached answers."""
    if tuple(sorted((k, v.string_value) for k, v in config.parameters.items() if k.startswith(PREFIX))) == parameters:
        return config
    copy = mc.ModelConfig()
    copy.CopyFrom(config)
    for key in [k for k in copy.parameters if k.startswith(PREFIX)]:
        del copy.parameters[key]
    for key, text in parameters:
        copy.parameters[key].string_value = text
    return copy


def _bucket(request_id: str) -> tuple[float, float]:
    """Two places in [0, 100) for a request id: one for the canary split, one (from the hash's other bits) for
    the shadow's sample, so that the shadow's share of the stable traffic does not depend on the canary's."""
    h = zlib.crc32(request_id.encode())
    return (h % _BUCKETS) * (100 / _BUCKETS), (h >> 16) * (100 / 65536)


class _Outcomes:
    """Whether each of a version's last ERROR_WINDOW routed requests failed on the server's side."""

    __slots__ = ("failures", "window")

    def __init__(self) -> None:
        self.window: deque[bool] = deque(maxlen=ERROR_WINDOW)
        self.failures = 0

    def add(self, failed: bool) -> None:
        if len(self.window) == self.window.maxlen:
            self.failures -= self.window[0]
        self.window.append(failed)
        self.failures += failed

    def percent(self) -> float:
        return self.failures * 100 / len(self.window) if self.window else 0.0


class _InFlight:
    """Shadow runs going now: one count shared by a model's successive Rollouts, since the runs a rebuild finds
    going still hold their places (and give them back to this count when they end)."""

    __slots__ = ("runs",)

    def __init__(self) -> None:
        self.runs = 0


class Rollout:
    """One model's split as served now: `choose` for each request that names no version, `shadows` for those
    that go to the stable version, `follow` for the alerts the monitor sees on the canary, `outcome` for how the
    requests routed to the canary or the stable version end (while `judges` says they count)."""

    def __init__(
        self,
        model: str,
        spec: RolloutSpec,
        served: Collection[int],
        previous: Rollout | None = None,
        *,
        monitored: bool = False,
        clock: Callable[[], float] = time.monotonic,
        resume_at: int = 0,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        """`served`: the versions this load serves; a mapping to their builds (the repository's LoadedModels)
        tells a canary kept across a reload from one built anew, which the error gate judges afresh.
        `monitored`: the monitor evaluates the canary's alert rules (--data-dir), so that a ramp waits for an
        evaluation after each hold before it raises the share. `resume_at`: the step a new split (no `previous`)
        starts its ramp at, where the data dir's last run left it; `on_step`: told each step the ramp moves to (0
        when the error gate rolls the canary back), for the data dir to keep."""
        self.model = model
        self.spec = spec
        self.stable = spec.stable
        self.canary = spec.canary if spec.canary in served else None
        """None when the canary is not served (any more): everything goes to stable."""
        self.shadow = spec.shadow if spec.shadow in served else None
        self._canary_build = served.get(self.canary) if isinstance(served, Mapping) else None
        self.held: frozenset[str] = frozenset()
        """The alert rules firing on the canary, as the monitor last said."""
        self.shadow_runs: Counter[tuple[str, str]] = Counter()
        """Shadow runs by (shadow version, outcome: ok, failed, dropped), kept across reloads as a counter must be:
        keyed by version, so that a new shadow version's runs are not added to the last one's."""
        self._in_flight = _InFlight()
        self.outcomes = _Outcomes()
        """The canary's last routed requests (`outcome`)."""
        self.stable_outcomes = _Outcomes()
        """The stable version's last routed requests: the baseline, so that a load spike or a deadline too short
        for both versions is not taken for the canary's fault."""
        self.tripped = False
        """The error gate rolled the canary back (until its build or the gate changes, or an unload)."""
        self._clock = clock
        self._monitored = monitored
        self.step = 0
        """Where the canary is on its ramp: spec.steps[step] is its share while nothing rolls it back."""
        self._step_since = clock()
        self._step_requests = 0
        """Routed requests the canary ended since its share last changed, or an alert on it last resolved."""
        self._evaluated_at = -math.inf
        """When the monitor last evaluated the canary's alert rules."""
        self._retired = False
        self._successor: Rollout | None = None
        """The split that replaced this one (`retire`)."""
        self._on_step = on_step
        if previous is None and self.canary is not None and 0 < resume_at < len(spec.steps):
            self.step = resume_at
            log.info(
                "model '%s': canary version %d resumes its ramp at %g%% (step %d of %d), where the data dir's last "
                "run left it; the step's hold and requests count from now",
                model,
                self.canary,
                spec.steps[resume_at],
                resume_at + 1,
                len(spec.steps),
            )
        if previous is not None:
            self.shadow_runs = previous.shadow_runs
            self._in_flight = previous._in_flight
            if previous.canary == self.canary:
                self.held = previous.held  # the alert still fires: no second "rolled back" line
            self._carry_judgement(previous)
            self._carry_ramp(previous)
            same_build = self.canary == previous.canary and self._canary_build is previous._canary_build
            previous.retire(self if self.canary is not None and same_build else None)
        self.share = self._share()
        """The canary's share now, in percent: 0 while rolled back or not served."""
        if previous is not None:
            self._say_if_ramp_rewound(previous)
            self._say_if_rollback_switched(previous)
        if previous is not None and previous.tripped and not self.tripped and self.canary == previous.canary:
            log.warning(
                "model '%s': canary version %d, rolled back for its errors, is judged afresh (%s): %g%% of the "
                "requests that name no version go to it again",
                model,
                self.canary,
                "a new build" if self._canary_build is not previous._canary_build else "a new max_error_percent",
                self.share,
            )
        for key, version, now in (
            (CANARY_VERSION, spec.canary, self.canary),
            (SHADOW_VERSION, spec.shadow, self.shadow),
        ):
            if version is not None and now is None:
                log.warning(
                    "model '%s': parameter '%s' names version %d, which is no longer served: requests that name no "
                    "version all go to stable version %d",
                    model,
                    key,
                    version,
                    self.stable,
                )

    def describe(self) -> str:
        """The split in a line, for the log of the load that builds it: a restart starts a ramp over, and this is
        where an operator sees from which share."""
        spec = self.spec
        text = f"canary version {self.canary} takes {self.share:g}% of the requests that name no version"
        if self.share != spec.steps[self.step]:
            text += f" (rolled back from {spec.steps[self.step]:g}%)"
        text += f", stable version {self.stable} the rest"
        if spec.ramp:
            text += (
                f"; ramp {', '.join(f'{s:g}%' for s in spec.ramp)} (step {self.step + 1} of {len(spec.steps)}), "
                f"each step held {spec.ramp_interval_s:g} s and {spec.ramp_min_requests} requests at least"
            )
        if self.shadow is not None:
            text += f"; shadow version {self.shadow}"
        return text

    def _carry_judgement(self, previous: Rollout) -> None:
        """Keep the error gate's judgement across a rebuild that keeps the canary's build and the gate (a
        canary_percent ramp step): a new split must not give a canary rolled back for its errors traffic again."""
        same_canary = self.canary is not None and self.canary == previous.canary
        if not same_canary or self._canary_build is not previous._canary_build:
            return
        if self.spec.max_error_percent != previous.spec.max_error_percent:
            return
        self.tripped, self.outcomes = previous.tripped, previous.outcomes
        if self.stable == previous.stable:
            self.stable_outcomes = previous.stable_outcomes

    def _carry_ramp(self, previous: Rollout) -> None:
        """Keep the ramp's place across a rebuild that changes neither the canary's build nor the ramp (another
        key changed, or the same files were loaded again); any change to the ramp starts it over."""
        same = self.canary is not None and self.canary == previous.canary
        if not same or self._canary_build is not previous._canary_build or not self.spec.ramp:
            return
        mine, theirs = self.spec, previous.spec
        if (mine.steps, mine.ramp_interval_s, mine.ramp_min_requests) != (
            theirs.steps,
            theirs.ramp_interval_s,
            theirs.ramp_min_requests,
        ):
            return
        self.step, self._step_since = previous.step, previous._step_since
        self._step_requests, self._evaluated_at = previous._step_requests, previous._evaluated_at

    def _say_if_ramp_rewound(self, previous: Rollout) -> None:
        """A load that starts a ramp over takes back the shares it had climbed (100% to canary_percent when
        only ramp_interval_s changed): each step up is logged, so this step down must be too, with its cause."""
        if self.canary is None or self.canary != previous.canary or previous.step == 0 or self.step != 0:
            return
        was, now = previous.spec.steps[previous.step], self.spec.steps[0]
        if was == now:
            return
        mine, theirs = self.spec, previous.spec
        changed = [
            key.removeprefix(PREFIX)
            for key, a, b in (
                (CANARY_PERCENT, mine.canary_percent, theirs.canary_percent),
                (RAMP, mine.ramp, theirs.ramp),
                (RAMP_INTERVAL_S, mine.ramp_interval_s, theirs.ramp_interval_s),
                (RAMP_MIN_REQUESTS, mine.ramp_min_requests, theirs.ramp_min_requests),
            )
            if a != b
        ]
        if not mine.ramp and "ramp" in changed:
            changed[changed.index("ramp")] = "ramp (removed)"
        if self._canary_build is not previous._canary_build:
            changed.insert(0, "the canary's files")
        log.warning(
            "model '%s': canary version %d was at %g%% on its ramp (step %d of %d); this load changed %s, so its "
            "ramp starts over at %g%%: %g%% of the requests that name no version go to it now",
            self.model,
            self.canary,
            was,
            previous.step + 1,
            len(previous.spec.steps),
            ", ".join(changed) or "the split",
            now,
            self.share,
        )

    def _say_if_rollback_switched(self, previous: Rollout) -> None:
        """A load that turns rollback_on_alert on or off while an alert fires on the canary moves its share at once
        (to 0, or back to its step) with the alert unchanged, so `follow` says nothing: the last WARNING would
        still claim the other, and the canary would take traffic, or lose it, unsaid."""
        if self.canary is None or self.canary != previous.canary or not self.held or self.tripped:
            return  # (rolled back for its errors: the line that said so stays true, whatever the alert does)
        if self.spec.rollback_on_alert == previous.spec.rollback_on_alert:
            return
        alerts = ", ".join(sorted(self.held))
        if self.spec.rollback_on_alert:
            log.warning(
                "model '%s': rollback_on_alert is on now and alert %s fires on canary version %d: rolled back, "
                "requests that name no version all go to stable version %d until it resolves",
                self.model,
                alerts,
                self.canary,
                self.stable,
            )
            return
        holds = "" if self.step + 1 >= len(self.spec.steps) else "; its ramp holds until the alert resolves"
        log.warning(
            "model '%s': rollback_on_alert is off now: canary version %d takes %g%% of the requests that name no "
            "version while alert %s fires on it%s",
            self.model,
            self.canary,
            self.share,
            alerts,
            holds,
        )

    def _say_ramp_held(self, held: frozenset[str], was: frozenset[str]) -> None:
        """Without rollback_on_alert an alert leaves the canary its share but stops its ramp: nothing else says
        why the share no longer climbs (no rolled_back gauge, no rollback line), so the hold is logged. Not for a
        canary the error gate rolled back: that holds it whatever the alert does, and its line says so."""
        if self.step + 1 >= len(self.spec.steps) or self.tripped:
            return
        if held and not was:
            log.warning(
                "model '%s': alert %s fires on canary version %d: its ramp holds at %g%% until it resolves "
                "(rollback_on_alert is off, so it keeps that share)",
                self.model,
                ", ".join(sorted(held)),
                self.canary,
                self.share,
            )
        elif was and not held:
            log.warning(
                "model '%s': alert %s on canary version %d resolved: its ramp's step at %g%% counts again from now",
                self.model,
                ", ".join(sorted(was)),
                self.canary,
                self.share,
            )

    def retire(self, successor: Rollout | None = None) -> None:
        """No longer the model's split (a rebuild, an unload). A request routed here may still end later: it is
        judged by `successor`, the split that replaced this one for the same canary build, or else by none.
        Counted here it was lost to the split that serves, and could raise a share or trip a gate nobody used
        (each with its WARNING)."""
        self._retired, self._successor = True, successor

    @property
    def shadow_in_flight(self) -> int:
        """The model's shadow runs going now, across rebuilds (`_InFlight`)."""
        return self._in_flight.runs

    @shadow_in_flight.setter
    def shadow_in_flight(self, runs: int) -> None:
        self._in_flight.runs = runs

    def _share(self) -> float:
        if self.canary is None or self.tripped or (self.held and self.spec.rollback_on_alert):
            return 0.0
        return self.spec.steps[self.step]

    def _gated(self) -> bool:
        """Whether the error gate judges the canary (100: nothing could trip it)."""
        limit = self.spec.max_error_percent
        return limit is not None and limit < 100

    def _restart_step(self) -> None:
        self._step_since = self._clock()
        self._step_requests = 0

    def _advance(self) -> None:
        """Raise the canary's share to the ramp's next step once it has held this one for ramp_interval_s, ended
        ramp_min_requests routed requests at it, no alert fires on it and the error gate, when on, has judged it
        (ERROR_MIN_REQUESTS) without tripping; with a monitor, once an evaluation of the canary's alert rules that
        began after the hold has ended, so that its verdict covers the requests of the step. Called as routed
        requests end and after each of the monitor's evaluations."""
        spec = self.spec
        if self.step + 1 >= len(spec.steps) or self.share <= 0 or self.held:
            return
        if self._step_requests < spec.ramp_min_requests:
            return
        if self._gated() and len(self.outcomes.window) < ERROR_MIN_REQUESTS:
            return  # the gate judges nothing yet: a ramp_min_requests below it let a canary failing all climb
        due = self._step_since + spec.ramp_interval_s
        if self._clock() < due or (self._monitored and self._evaluated_at < due):
            return
        held_for, requests, before = self._clock() - self._step_since, self._step_requests, self.share
        self.step += 1
        self._restart_step()
        self.share = self._share()
        if self._on_step is not None:
            self._on_step(self.step)
        final = self.step + 1 == len(spec.steps)
        log.warning(
            "model '%s': canary version %d held %g%% for %.0f s and %d requests (%.1f%% failed against %.1f%% on "
            "stable version %d, no alert firing): %g%% of the requests that name no version go to it now%s",
            self.model,
            self.canary,
            before,
            held_for,
            requests,
            self.outcomes.percent(),
            self.stable_outcomes.percent(),
            self.stable,
            self.share,
            (
                f"; the ramp is done: to retire version {self.stable}, make version {self.canary} the stable one "
                "in the config (remove the tensorgate.rollout.* parameters and serve it)"
                if final
                else f" (step {self.step + 1} of {len(spec.steps)})"
            ),
        )

    def choose(self, request_id: str) -> int:
        """The version for a request that names none. A lookup without a request (metadata, an ensemble's step,
        a check before decoding) gets the stable version."""
        share = self.share
        if share <= 0 or not request_id:
            return self.stable
        return self.canary if _bucket(request_id)[0] < share and self.canary is not None else self.stable

    def judges(self, version: int) -> bool:
        """Whether a request routed to `version` counts towards the error gate: the canary's and the stable
        version's, while there is a canary, the gate is on and has not tripped (the only cost of the gate, for the
        requests of models with a rollout)."""
        return (
            (version == self.canary or version == self.stable)
            and self.canary is not None
            and not self.tripped
            and (self.spec.max_error_percent is not None or self.step + 1 < len(self.spec.steps))
        )

    def outcome(self, version: int, failed: bool) -> None:
        """How a request routed to `version` ended (`judges`): failed on the server's side or not. Once the canary
        has ended ERROR_MIN_REQUESTS, with ERROR_MIN_FAILURES failures at least, a failure rate over its last
        ERROR_WINDOW more than max_error_percent points above the stable version's rolls it back: no routed
        request reaches it after that, so nothing could judge it well again, and it stays rolled back until its
        build or the gate changes, or the model is unloaded and loaded again."""
        if self._retired:  # a request that started before a rebuild or an unload
            # Only for a version the successor judges: a stable version it no longer has would count in the new
            # stable's window (its own failures raising the baseline the canary is judged against).
            if self._successor is not None and self._successor.judges(version):
                self._successor.outcome(version, failed)
            return
        limit = self.spec.max_error_percent
        if self.tripped or self.canary is None:  # a request that started before the gate tripped
            return
        if version != self.canary:
            self.stable_outcomes.add(failed)
            return
        canary = self.outcomes
        canary.add(failed)
        self._step_requests += 1
        if (
            limit is None
            or not failed
            or len(canary.window) < ERROR_MIN_REQUESTS
            or canary.failures < ERROR_MIN_FAILURES
        ):
            self._advance()
            return
        stable = self.stable_outcomes
        baseline = stable.percent() if len(stable.window) >= ERROR_MIN_REQUESTS else 0.0
        if canary.percent() - baseline <= limit:
            self._advance()
            return
        self.tripped = True
        self.share = self._share()
        if self._on_step is not None:
            self._on_step(0)  # a restart judges it afresh: from canary_percent, not from the share it failed at
        log.warning(
            "model '%s': %d of the last %d requests routed to canary version %d failed (%.1f%%, against %.1f%% "
            "on stable version %d: over max_error_percent %g points): rolled back, requests that name no version "
            "all go to stable version %d. None reaches the canary now to judge it again: it stays rolled back until "
            "its build or max_error_percent changes, or the model is unloaded and loaded again",
            self.model,
            canary.failures,
            len(canary.window),
            self.canary,
            canary.percent(),
            baseline,
            self.stable,
            limit,
            self.stable,
        )

    def waiting_for(self) -> list[str]:
        """What keeps the canary from its ramp's next step, one phrase each: `_advance`'s rules, for an operator
        asking why the share has not moved (GetRollout). Empty when there is no next step. A rollback for errors,
        or an alert, is the one reason while it lasts (an alert that resolves starts the step's hold and requests
        over). With every rule met, the step waits only for what runs them: no timer does, so a canary that gets
        no traffic never moves."""
        spec = self.spec
        if self.canary is None or self.step + 1 >= len(spec.steps):
            return []
        if self.tripped:
            return [
                "new files for the canary, a new max_error_percent, or an unload and load: the error gate rolled it "
                "back for its errors"
            ]
        if self.held:
            return [
                f"alert {', '.join(sorted(self.held))} to resolve; then ramp_interval_s ({spec.ramp_interval_s:g} s) "
                f"and ramp_min_requests ({spec.ramp_min_requests}) count again from then"
            ]
        reasons = []
        if self._step_requests < spec.ramp_min_requests:
            more = spec.ramp_min_requests - self._step_requests
            reasons.append(
                f"{more} more routed request{'' if more == 1 else 's'} to end at this share "
                f"(ramp_min_requests {spec.ramp_min_requests})"
            )
        judged = len(self.outcomes.window)
        if self._gated() and judged < ERROR_MIN_REQUESTS:
            reasons.append(f"the error gate's first {ERROR_MIN_REQUESTS} routed requests ({judged} so far)")
        due = self._step_since + spec.ramp_interval_s
        left = due - self._clock()
        if left > 0:
            reasons.append(f"{math.ceil(left):.0f} s more at this share (ramp_interval_s {spec.ramp_interval_s:g})")
        elif self._monitored and self._evaluated_at < due:
            reasons.append("a monitor evaluation that begins after the hold")
        if reasons:
            return reasons
        if self._monitored:
            return ["the canary's next routed request to end, or the monitor's next evaluation: either takes the step"]
        return ["the canary's next routed request to end, which takes the step"]

    def state(self) -> RolloutState:
        """The split as it serves now, for GetRollout."""
        rolled_back = "errors" if self.tripped else "alert" if self.held and self.spec.rollback_on_alert else ""
        return RolloutState(
            model=self.model,
            spec=self.spec,
            stable=self.stable,
            canary=self.canary,
            share=self.share,
            step=self.step,
            rolled_back=rolled_back if self.canary is not None else "",
            alerts=tuple(sorted(self.held)),
            step_held_s=max(0.0, self._clock() - self._step_since),
            step_requests=self._step_requests,
            canary_judged=len(self.outcomes.window),
            canary_failed_percent=self.outcomes.percent(),
            stable_judged=len(self.stable_outcomes.window),
            stable_failed_percent=self.stable_outcomes.percent(),
            waiting_for=tuple(self.waiting_for()),
            shadow=self.shadow,
        )

    def shadows(self, request_id: str) -> bool:
        """Whether a request the stable version answered also runs on the shadow version."""
        percent = self.spec.shadow_percent
        return self.shadow is not None and (percent >= 100 or _bucket(request_id)[1] < percent)

    def follow(self, firing: Collection[str], *, evaluated: bool = True, started: float | None = None) -> None:
        """The alert rules firing on the canary version now (the monitor's last evaluation; `evaluated` False for
        the last word handed to a split built since): while any fires, the canary gets nothing and its ramp
        waits; once it resolves, the step's hold starts over. Logged once when that starts and once when it
        ends. `started`: when the evaluation began (on this split's clock; now when not said): a ramp's step
        needs one that began after its hold, since an evaluation that reads the captures before the hold ends
        may hand its verdict over after it."""
        if self.canary is None:
            return
        held, was = frozenset(firing), self.held
        if evaluated:
            self._evaluated_at = self._clock() if started is None else started
        if held == was:
            self._advance()
            return
        self.held = held
        self.share = self._share()
        if was and not held:
            self._restart_step()
        if not self.spec.rollback_on_alert:
            self._say_ramp_held(held, was)
            return
        if held and not was:
            log.warning(
                "model '%s': alert %s fires on canary version %d: rolled back, requests that name no version all "
                "go to stable version %d until it resolves",
                self.model,
                ", ".join(sorted(held)),
                self.canary,
                self.stable,
            )
        elif was and not held and self.tripped:
            log.warning(
                "model '%s': alert %s on canary version %d resolved: it stays rolled back for its errors until its "
                "build or max_error_percent changes, or the model is unloaded and loaded again",
                self.model,
                ", ".join(sorted(was)),
                self.canary,
            )
        elif was and not held:
            log.warning(
                "model '%s': alert %s on canary version %d resolved: %g%% of the requests that name no version go to "
                "it again",
                self.model,
                ", ".join(sorted(was)),
                self.canary,
                self.share,
            )
