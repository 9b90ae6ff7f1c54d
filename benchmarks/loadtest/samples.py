"""Latency samples of one load level and their exact merge across load processes.

Each worker keeps the raw samples of the requests it measured (intended send time and latency); the parent
concatenates them. Percentiles are computed once, on the merged samples, by nearest rank, so they are exact and
never an average of per-worker percentiles.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

__all__ = ["PERCENTILES", "Samples", "merge", "percentile"]

PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)


@dataclass
class Samples:
    """What one worker (or, merged, every worker) measured at one load level.

    ``send_s`` is each successful request's intended send time in seconds from the start of the measurement
    window; ``latency_us`` its latency in microseconds, from that intended time to the response. ``sent`` counts
    every measured request (answered, failed or dropped), so ``sent == succeeded + sum(failed) + dropped``.
    """

    send_s: np.ndarray = field(default_factory=lambda: np.empty(0, np.float64))
    latency_us: np.ndarray = field(default_factory=lambda: np.empty(0, np.float64))
    sent: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)
    """The first message of each failure code in ``failed``: why a run that fails, fails."""
    dropped: int = 0
    window_s: float = 0.0
    """Seconds from the start of the measurement window to the last answer, or to when the level stopped sending
    (its end, its request budget spent, a stop request) if that came later."""
    cpu_s: float = 0.0
    """CPU seconds the load process(es) used in the measurement window (and the answers still due after it)."""

    @property
    def succeeded(self) -> int:
        return int(self.latency_us.size)

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())


def merge(parts: Iterable[Samples]) -> Samples:
    """Exact union of several workers' samples: arrays concatenated, counts summed, the longest window kept, the
    first message of each failure code."""
    items = list(parts)
    failed: dict[str, int] = {}
    messages: dict[str, str] = {}
    for part in items:
        for code, n in part.failed.items():
            failed[code] = failed.get(code, 0) + n
        for code, message in part.messages.items():
            messages.setdefault(code, message)
    return Samples(
        send_s=np.concatenate([p.send_s for p in items]) if items else np.empty(0, np.float64),
        latency_us=np.concatenate([p.latency_us for p in items]) if items else np.empty(0, np.float64),
        sent=sum(p.sent for p in items),
        failed=dict(sorted(failed.items())),
        messages=dict(sorted(messages.items())),
        dropped=sum(p.dropped for p in items),
        window_s=max((p.window_s for p in items), default=0.0),
        cpu_s=sum(p.cpu_s for p in items),
    )


def percentile(sorted_values: np.ndarray, p: float) -> float:
    """Nearest-rank percentile of an ascending array (a value that was measured, monotone in ``p``)."""
    n = int(sorted_values.size)
    if n == 0:
        return math.nan
    # Rounded first: 99.9 / 100 * 1000 is 999.0000000000001 in floating point, whose ceiling is one rank too high.
    rank = max(1, math.ceil(round(p * n / 100.0, 9)))
    return float(sorted_values[min(rank, n) - 1])


def latency_summary_ms(latency_us: np.ndarray) -> dict[str, float]:
    """p50 ... p99.9, max and mean in milliseconds (NaN when nothing succeeded)."""
    values = np.sort(latency_us)
    out = {_pname(p): percentile(values, p) / 1000.0 for p in PERCENTILES}
    out["max"] = float(values[-1]) / 1000.0 if values.size else math.nan
    out["mean"] = float(values.mean()) / 1000.0 if values.size else math.nan
    return out


def timeline(samples: Samples, bins: int = 50) -> list[dict[str, float]]:
    """Latency over time: requests, p50 and p99 (ms) per slice of the window, by intended send time."""
    if samples.succeeded == 0 or samples.window_s <= 0:
        return []
    width = max(samples.window_s / bins, 0.05)
    index = np.floor(samples.send_s / width).astype(np.int64)
    out: list[dict[str, float]] = []
    for b in np.unique(index):
        lat = np.sort(samples.latency_us[index == b])
        out.append(
            {
                "t_s": round(float(b) * width, 4),
                "requests": int(lat.size),
                "p50_ms": percentile(lat, 50) / 1000.0,
                "p99_ms": percentile(lat, 99) / 1000.0,
            }
        )
    return out


def _pname(p: float) -> str:
    return "p" + (f"{p:g}".replace(".", "_"))


def percentile_keys() -> tuple[str, ...]:
    return tuple(_pname(p) for p in PERCENTILES)
