"""`tensorgate monitor`'s output: the quality and drift table, and PNG plots for people who would rather look.

The numbers come from the server (GetModelQuality, GetModelDrift, ListAlerts); this module only formats them. It
takes the client's results (``ModelQuality``, ``ModelDrift``, ``Alert``) or the server-side
dataclasses (``QualityReport``, ``DriftReport``, ``AlertTransition``) alike: it reads attributes both have.

Metric over time: each ``tensorgate monitor --out DIR`` run appends one line to ``DIR/history.jsonl``
(``--watch N`` polls N times), and ``quality.png``/``drift.png`` plot that whole history; ``features.png`` is
the per-feature PSI of the latest window (drifted features in red).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "HISTORY_FILE",
    "PlottingUnavailable",
    "Snapshot",
    "append_history",
    "format_alerts",
    "format_drift",
    "format_quality",
    "plot_feature_drift",
    "plot_history",
    "read_history",
    "snapshot",
]

HISTORY_FILE = "history.jsonl"
DRIFT_SUMMARY = ("psi_max", "psi_mean", "drifted_share", "score_drift")


class PlottingUnavailable(Exception):
    """matplotlib is not installed; the message says how to get it."""


class _Feature(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def psi(self) -> float: ...
    @property
    def statistic(self) -> float: ...
    @property
    def p_value(self) -> float: ...
    @property
    def drifted(self) -> bool: ...


class _Quality(Protocol):
    @property
    def model(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def predictions(self) -> int: ...
    @property
    def labelled(self) -> int: ...
    @property
    def metrics(self) -> Mapping[str, float]: ...


class _Drift(Protocol):
    @property
    def model(self) -> str: ...
    @property
    def samples(self) -> int: ...
    @property
    def features(self) -> Sequence[_Feature]: ...
    @property
    def psi_max(self) -> float: ...
    @property
    def psi_mean(self) -> float: ...
    @property
    def drifted_share(self) -> float: ...
    @property
    def drifted(self) -> bool: ...
    @property
    def score_drift(self) -> float: ...


class _Alert(Protocol):
    @property
    def rule(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def value(self) -> float: ...
    @property
    def threshold(self) -> float: ...
    @property
    def timestamp(self) -> float: ...


Snapshot = dict[str, Any]


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _num(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.4f}"


def format_quality(quality: _Quality) -> str:
    """Quality of one window: one line of counts, then one row per metric."""
    head = (
        f"quality of model '{quality.model}' version {quality.version or '?'}: "
        f"{quality.predictions} predictions, {quality.labelled} labelled"
    )
    if not quality.metrics:
        return head + "\n(no labelled predictions in the window: send feedback to get quality metrics)"
    rows = [["metric", "value"]] + [[name, _num(v)] for name, v in sorted(quality.metrics.items())]
    return head + "\n" + _table(rows)


def format_drift(drift: _Drift, top: int = 10) -> str:
    """The drift summary, then the ``top`` features by PSI (all drifted ones come first)."""
    verdict = "DRIFTED" if drift.drifted else "no drift"
    head = f"drift of model '{drift.model}' over {drift.samples} rows: {verdict}; " + ", ".join(
        f"{k} {_num(float(getattr(drift, k)))}" for k in DRIFT_SUMMARY
    )
    features = sorted(drift.features, key=lambda f: (not f.drifted, -f.psi))[:top]
    if not features:
        return head
    rows = [["feature", "kind", "psi", "statistic", "p_value", "drifted"]]
    rows += [
        [f.name, f.kind, _num(f.psi), _num(f.statistic), f"{f.p_value:.3g}", "yes" if f.drifted else "no"]
        for f in features
    ]
    more = len(drift.features) - len(features)
    return head + "\n" + _table(rows) + (f"\n... {more} more features" if more > 0 else "")


def format_alerts(alerts: Sequence[_Alert]) -> str:
    if not alerts:
        return "alerts: none firing"
    rows = [["alert", "model", "version", "value", "threshold", "since"]]
    rows += [
        [
            a.rule,
            a.model,
            a.version,
            _num(a.value),
            _num(a.threshold),
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(a.timestamp)),
        ]
        for a in alerts
    ]
    return "alerts firing:\n" + _table(rows)


def snapshot(quality: _Quality | None, drift: _Drift | None, alerts: Sequence[_Alert], now: float) -> Snapshot:
    """One point of the history: the window's metrics, drift summary and firing alert names."""
    return {
        "timestamp": now,
        "quality": dict(quality.metrics) if quality is not None else {},
        "drift": {k: float(getattr(drift, k)) for k in DRIFT_SUMMARY} if drift is not None else {},
        "alerts": sorted(a.rule for a in alerts),
    }


def append_history(out_dir: Path, point: Snapshot) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / HISTORY_FILE
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(point) + "\n")
    return path


def read_history(out_dir: Path) -> list[Snapshot]:
    path = out_dir / HISTORY_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise PlottingUnavailable(
            "PNG plots need matplotlib: pip install 'tensorgate[bench]' (the table above is complete without it)"
        ) from None
    matplotlib.use("Agg")  # files only: never open a window
    import matplotlib.pyplot as plt

    return plt


def _series(history: Iterable[Snapshot], group: str) -> dict[str, tuple[list[float], list[float]]]:
    series: dict[str, tuple[list[float], list[float]]] = {}
    for point in history:
        for name, value in point.get(group, {}).items():
            xs, ys = series.setdefault(name, ([], []))
            xs.append(float(point["timestamp"]))
            ys.append(float(value))
    return series


def plot_history(history: Sequence[Snapshot], out_dir: Path, model: str) -> list[Path]:
    """quality.png and drift.png: each metric against time (seconds since the first point); returns the files."""
    plt = _pyplot()
    written: list[Path] = []
    start = min((float(p["timestamp"]) for p in history), default=0.0)
    for group, title in (("quality", "quality"), ("drift", "drift")):
        series = _series(history, group)
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for name, (xs, ys) in sorted(series.items()):
            ax.plot([x - start for x in xs], ys, marker="o", label=name)
        ax.set_xlabel("seconds since the first snapshot")
        ax.set_ylabel(title)
        ax.set_title(f"{model}: {title} over time")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        path = out_dir / f"{group}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def plot_feature_drift(drift: _Drift, out_dir: Path) -> Path:
    """features.png: PSI per feature in profile order, drifted features in red."""
    plt = _pyplot()
    features = list(drift.features)
    fig, ax = plt.subplots(figsize=(max(8.0, len(features) * 0.12), 4.5))
    ax.bar(
        range(len(features)),
        [f.psi for f in features],
        color=["tab:red" if f.drifted else "tab:blue" for f in features],
    )
    step = max(1, len(features) // 40)
    ax.set_xticks(range(0, len(features), step))
    ax.set_xticklabels([features[i].name for i in range(0, len(features), step)], rotation=90, fontsize=6)
    ax.set_ylabel("PSI")
    ax.set_title(
        f"{drift.model}: per-feature drift over {drift.samples} rows "
        f"(red: drifted after Bonferroni; drifted share {drift.drifted_share:.2f})"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "features.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
