"""What the sync and asyncio clients share for ``tensorgate.v1.Rollout``: the stub and the result type."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tensorgate.protos import monitoring_pb2 as mpb
from tensorgate.protos.service import make_stub_class

__all__ = ["RolloutState", "RolloutStub", "describe", "state_result"]

ROLLOUT_SERVICE = "tensorgate.v1.Rollout"
RolloutStub = make_stub_class(ROLLOUT_SERVICE)


@dataclass(frozen=True)
class RolloutState:
    """A model's rollout split as the server serves it now (``tensorgate.rollout.*`` in its config)."""

    model: str
    stable_version: str
    canary_version: str | None
    """None when the config names no canary, or the one it names is not served."""
    canary_share: float
    """Percent of the requests that name no version going to the canary now: 0 while it is rolled back."""
    steps: tuple[float, ...]
    """canary_percent, then each step of the ramp; ``steps[step]`` is the canary's share unless rolled back."""
    step: int
    rolled_back: str | None
    """"alert" or "errors" while one of them holds the canary at 0."""
    alerts: tuple[str, ...]
    step_held_s: float
    step_requests: int
    ramp_interval_s: float
    ramp_min_requests: int
    canary_failed_percent: float
    canary_judged: int
    stable_failed_percent: float
    stable_judged: int
    max_error_percent: float | None
    """None when the error gate is off."""
    waiting_for: tuple[str, ...]
    """What keeps the ramp from its next step; empty when there is none."""
    shadow_version: str | None
    shadow_percent: float


def state_result(msg: mpb.RolloutState) -> RolloutState:
    return RolloutState(
        model=msg.model,
        stable_version=msg.stable_version,
        canary_version=msg.canary_version or None,
        canary_share=msg.canary_share,
        steps=tuple(msg.steps),
        step=msg.step,
        rolled_back=msg.rolled_back or None,
        alerts=tuple(msg.alerts),
        step_held_s=msg.step_held_s,
        step_requests=msg.step_requests,
        ramp_interval_s=msg.ramp_interval_s,
        ramp_min_requests=msg.ramp_min_requests,
        canary_failed_percent=msg.canary_failed_percent,
        canary_judged=msg.canary_judged,
        stable_failed_percent=msg.stable_failed_percent,
        stable_judged=msg.stable_judged,
        max_error_percent=msg.max_error_percent if msg.error_gate else None,
        waiting_for=tuple(msg.waiting_for),
        shadow_version=msg.shadow_version or None,
        shadow_percent=msg.shadow_percent,
    )


def describe(state: RolloutState) -> str:
    """The state as `tensorgate rollout` prints it: a few lines an operator reads at a glance."""
    lines = [f"model '{state.model}': stable version {state.stable_version}"]
    if state.canary_version is None:
        lines.append("  canary: none served")
    else:
        why = f" (rolled back: {state.rolled_back})" if state.rolled_back else ""
        lines.append(f"  canary: version {state.canary_version} at {state.canary_share:g}%{why}")
        if len(state.steps) > 1:
            marks = [f"[{s:g}%]" if i == state.step else f"{s:g}%" for i, s in enumerate(state.steps)]
            # Whole seconds held round down, as the server's "N s more" rounds up: the two add up to the interval.
            # Past the interval (requests, an alert or an evaluation still hold the step), "held 80 of 5 s" read
            # as a count gone wrong. Past a fractional interval (0.5 s), whole seconds would say "held 0 s": tenths.
            held = math.floor(state.step_held_s)
            interval = f"{state.ramp_interval_s:g} s"
            if state.step_held_s < state.ramp_interval_s:
                held_text = f"{held} of {interval}"
            else:
                past = held if held >= state.ramp_interval_s else math.floor(state.step_held_s * 10) / 10
                held_text = f"{past:g} s (interval {interval})"
            lines.append(
                f"  ramp: {' -> '.join(marks)}, step {state.step + 1} of {len(state.steps)}: held {held_text}, "
                f"{state.step_requests} of {state.ramp_min_requests} requests"
            )
        gate = "off" if state.max_error_percent is None else f"max {state.max_error_percent:g} points over stable"
        lines.append(
            f"  failed: canary {state.canary_failed_percent:.1f}% of {state.canary_judged}, stable "
            f"{state.stable_failed_percent:.1f}% of {state.stable_judged} (error gate {gate})"
        )
        if state.alerts:
            lines.append(f"  alerts firing on the canary: {', '.join(state.alerts)}")
        if state.waiting_for:
            lines.append("  next step waits for:")
            lines.extend(f"    - {reason}" for reason in state.waiting_for)
        elif len(state.steps) > 1 and state.alerts and not state.rolled_back:
            # rollback_on_alert off: the canary keeps its last step's share, but is no version to promote.
            lines.append("  ramp at its last step, but alerts fire on the canary: do not make it stable yet")
        elif len(state.steps) > 1 and not state.rolled_back:
            lines.append("  ramp done: make the canary the stable version in the config to retire the old one")
    if state.shadow_version is not None:
        lines.append(f"  shadow: version {state.shadow_version} mirrors {state.shadow_percent:g}% of stable's requests")
    return "\n".join(lines)
