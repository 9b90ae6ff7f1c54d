"""PNG plots of a sweep, drawn with matplotlib (an optional extra: ``pip install 'tensorgate[bench]'``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["MatplotlibMissing", "write_plots"]


class MatplotlibMissing(RuntimeError):
    def __init__(self) -> None:
        super().__init__("matplotlib is not installed, so no plots: pip install 'tensorgate[bench]'")


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise MatplotlibMissing() from None
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _style(ax: Any, title: str) -> None:
    from matplotlib.ticker import FuncFormatter

    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 0.5, 2, 10 rather than 5x10^-1
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)


def write_plots(doc: dict[str, Any], out: Path) -> list[Path]:
    """latency_vs_throughput.png (percentiles against achieved throughput, one point per level) and
    latency_over_time.png (p50/p99 per slice of each level's window). Raises MatplotlibMissing.

    Latency is that of the requests that succeeded: a level where none did has no point, and a sweep where none
    did has no plots."""
    # Levels without a latency would put None on a log axis (a TypeError in matplotlib).
    levels = [lv for lv in doc["levels"] if lv["latency_ms"]["p50"] is not None]
    if not levels:
        return []
    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    cfg = doc["config"]
    title = f"{cfg['model']}: {cfg['mode']} loop, batch {cfg['batch']}, {'stream' if cfg['streaming'] else 'unary'}"
    paths = []

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    x = [lv["throughput_rps"] for lv in levels]
    for key, style in (("p50", "o-"), ("p90", "s-"), ("p99", "^-"), ("p99_9", "v--")):
        ax.plot(x, [lv["latency_ms"][key] for lv in levels], style, label=key.replace("_", "."))
    for lv, xi in zip(levels, x, strict=True):
        label = f"c={lv['concurrency']}" if lv["mode"] == "closed" else f"{lv['rate']:g}/s"
        ax.annotate(label, (xi, lv["latency_ms"]["p50"]), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlabel("throughput (requests/s)")
    _style(ax, title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "latency_vs_throughput.png")
    fig.savefig(paths[-1])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    offset = 0.0
    for lv in doc["levels"]:  # every level's window, so that the time axis is the sweep's
        label = f"c={lv['concurrency']}" if lv["mode"] == "closed" else f"{lv['rate']:g}/s"
        ts = [offset + p["t_s"] for p in lv["timeline"]]
        offset += lv["window_s"]
        if not ts:
            continue
        (line,) = ax.plot(ts, [p["p50_ms"] for p in lv["timeline"]], "-", label=f"{label} p50")
        ax.plot(ts, [p["p99_ms"] for p in lv["timeline"]], ":", color=line.get_color(), label=f"{label} p99")
    ax.set_xlabel("time in the measurement windows, levels in turn (s)")
    _style(ax, title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths.append(out / "latency_over_time.png")
    fig.savefig(paths[-1])
    plt.close(fig)
    return paths
