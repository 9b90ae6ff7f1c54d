"""Triton's TraceSetting RPC over tensorgate's OpenTelemetry tracing: read and change sampling while the server runs.

An operator raises the sample rate during an incident (or turns tracing off) without a restart. Triton's keys map
onto ours: `trace_level` OFF stops tracing altogether (sampled callers included; their context still reaches remote
backends as it came), TIMESTAMPS turns it back on;
`trace_rate` N keeps one new trace in N (a share of 1/N; `tensorgate.sample_rate` sets the share itself);
`trace_count` N traces the next N inference requests sampled and then stops (-1: no limit), reading back what is
left as it counts down; `log_frequency` is kept and read back as Triton's, though it only says how often Triton
writes its trace file (spans here go to the collector in batches); a key sent without a value goes back to the
start's setting.
TENSORS is refused (payloads are never traced), and so are settings tensorgate has no counterpart for
(`trace_file`, another `trace_mode`) unless they ask for what it already does.
Where the spans go is fixed at start (`--otlp-endpoint`); a server started without it has nothing to change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tensorgate.server.decimal_text import parse_decimal

KEYS = (
    "trace_level",
    "trace_rate",
    "trace_count",
    "log_frequency",
    "trace_mode",
    "trace_file",
    "tensorgate.sample_rate",
)
_FIXED = {"trace_mode": "opentelemetry", "trace_file": ""}
"""Settings with one value here: what Triton means by it is what tensorgate always does."""
UNLIMITED = -1
"""trace_count's "no limit", as in Triton."""
_INT32_MAX = 2**31 - 1  # trace_count is an int32 in Triton, log_frequency a uint32
_UINT32_MAX = 2**32 - 1


class TraceSettingsError(ValueError):
    """A change that cannot be made; the message names the setting."""


@dataclass(frozen=True, slots=True)
class TraceState:
    """What the settings describe: whether tracing runs, the share of new traces kept, how many inference traces
    are left to take (UNLIMITED: no limit), and Triton's log_frequency (read back, no effect here)."""

    enabled: bool
    rate: float
    count: int = UNLIMITED
    log_frequency: int = 0


def current(state: TraceState | None, *, injected: bool = False) -> dict[str, list[str]]:
    """Triton's view of `state`. None: tracing was not configured at start, so it is off, or (`injected`) an
    embedding application's TracerProvider samples, at a rate tensorgate does not know."""
    if injected:
        return {"trace_level": ["TIMESTAMPS"], "trace_mode": [_FIXED["trace_mode"]]}
    level = ["TIMESTAMPS"] if state is not None and state.enabled else ["OFF"]
    rate = 0.0 if state is None else state.rate
    return {
        "trace_level": level,
        "trace_rate": [str(round(1 / rate)) if rate > 0 else "0"],
        "trace_count": [str(UNLIMITED if state is None else state.count)],
        "log_frequency": [str(0 if state is None else state.log_frequency)],
        "trace_mode": [_FIXED["trace_mode"]],
        "tensorgate.sample_rate": [f"{rate:g}"],
    }


def _one(key: str, values: Sequence[str]) -> str:
    if len(values) != 1:
        raise TraceSettingsError(f"trace setting '{key}' takes one value, got {len(values)}")
    return values[0]


def _whole(key: str, values: Sequence[str], low: int, high: int) -> int:
    text = _one(key, values)
    number = -1 if text == "-1" else parse_decimal(text)
    if number is None or not low <= number <= high:
        raise TraceSettingsError(f"{key} must be a whole number in {low}..{high}, got '{text}'")
    return number


def apply(changes: Mapping[str, Sequence[str]], state: TraceState, initial: TraceState) -> TraceState:
    """The state after `changes`, every one checked first (nothing is half applied). A key without values goes
    back to how the server started (`initial`), as Triton resets a setting sent empty."""
    enabled, rate, count, log_frequency = state.enabled, state.rate, state.count, state.log_frequency
    if "trace_rate" in changes and "tensorgate.sample_rate" in changes:
        raise TraceSettingsError("send trace_rate or tensorgate.sample_rate, not both: each sets the sample rate")
    for key, values in changes.items():
        if not values and key in KEYS:
            if key == "trace_level":
                enabled = initial.enabled
            elif key in ("trace_rate", "tensorgate.sample_rate"):
                rate = initial.rate
            elif key == "trace_count":
                count = initial.count
            elif key == "log_frequency":
                log_frequency = initial.log_frequency
            continue
        if key == "trace_level":
            levels = set(values)
            if "TENSORS" in levels:
                raise TraceSettingsError("trace_level TENSORS is refused: tensorgate never traces payloads")
            if not levels or not levels <= {"OFF", "TIMESTAMPS"} or levels == {"OFF", "TIMESTAMPS"}:
                raise TraceSettingsError(f"trace_level must be OFF or TIMESTAMPS, got {sorted(levels)}")
            enabled = levels == {"TIMESTAMPS"}
        elif key == "trace_rate":
            text = _one(key, values)
            every = parse_decimal(text)
            if every is None or every < 1:
                raise TraceSettingsError(f"trace_rate must be a whole number >= 1 (one trace in N), got '{text}'")
            rate = 1 / every
        elif key == "tensorgate.sample_rate":
            text = _one(key, values)
            try:
                rate = float(text)
            except ValueError:
                rate = -1.0
            if not 0.0 <= rate <= 1.0:
                raise TraceSettingsError(f"tensorgate.sample_rate must be a number in 0..1, got '{text}'")
        elif key == "trace_count":
            count = _whole(key, values, UNLIMITED, _INT32_MAX)
        elif key == "log_frequency":
            log_frequency = _whole(key, values, 0, _UINT32_MAX)
        elif key in _FIXED:
            if list(values) != [_FIXED[key]]:
                raise TraceSettingsError(f"{key} can only be {_FIXED[key]!r} here")
        else:
            raise TraceSettingsError(f"unknown trace setting '{key}' (known: {', '.join(KEYS)})")
    return TraceState(enabled, rate, count, log_frequency)


__all__ = ["KEYS", "UNLIMITED", "TraceSettingsError", "TraceState", "apply", "current"]
