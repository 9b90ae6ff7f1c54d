"""Reports of a sweep: a JSON document (the format ``compare`` reads), a CSV row per level and a Markdown table."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tensorgate.loadtest.runner import LevelResult, SweepResult
from tensorgate.loadtest.samples import latency_summary_ms, percentile_keys, timeline

__all__ = ["compare_table", "level_dict", "load_report", "markdown_table", "sweep_dict", "write_reports"]

FORMAT = "tensorgate-bench/1"


def _num(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 4)


def level_dict(level: LevelResult) -> dict[str, Any]:
    s = level.samples
    window = s.window_s
    out: dict[str, Any] = {
        "mode": level.mode,
        "concurrency": int(level.level) if level.mode == "closed" else None,
        "rate": level.level if level.mode == "open" else None,
        "sent": s.sent,
        "succeeded": s.succeeded,
        "failed": s.failed,
        "failed_total": s.failed_total,
        "failed_messages": s.messages,
        "dropped": s.dropped,
        "window_s": round(window, 4),
        "throughput_rps": round(s.succeeded / window, 3) if window > 0 else 0.0,
        "rows_per_s": round(s.succeeded * level.rows_per_request / window, 3) if window > 0 else 0.0,
        "latency_ms": {k: _num(v) for k, v in latency_summary_ms(s.latency_us).items()},
        "client_cpu_cores": round(s.cpu_s / window, 3) if window > 0 else 0.0,
        "interrupted": level.interrupted,
        "server": None,
        "timeline": timeline(s),
    }
    if level.server is not None:
        st = level.server
        out["server"] = {
            "requests": st.requests,
            "executions": st.executions,
            "inferences": st.inferences,
            "mean_batch": None if st.mean_batch is None else round(st.mean_batch, 3),
            "queue_us": round(st.queue_us, 1),
            "compute_us": round(st.compute_us, 1),
            "compute_input_us": round(st.compute_input_us, 1),
            "compute_infer_us": round(st.compute_infer_us, 1),
            "compute_output_us": round(st.compute_output_us, 1),
            "batch_sizes": {str(k): v for k, v in st.batch_sizes.items()},
        }
    return out


def sweep_dict(result: SweepResult) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "started_at": result.started_at,
        "config": result.config.describe(),
        "interrupted": result.interrupted,
        "error": None if result.error is None else str(result.error),
        "levels": [level_dict(level) for level in result.levels],
    }


def load_report(path: Path) -> dict[str, Any]:
    """A results.json for ``compare``; ValueError naming the file and what is wrong with it, so that a file that is
    not one (or was edited) gets one line, not a traceback."""
    try:
        doc = json.loads(path.read_text())
    except ValueError as exc:  # not JSON, or not UTF-8
        raise ValueError(f"{path}: not a tensorgate bench result: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"{path}: not a tensorgate bench result (format {found!r})")
    levels = doc.get("levels")
    if not isinstance(levels, list):
        raise ValueError(f"{path}: 'levels' is {levels!r}, not a list of levels")
    for i, level in enumerate(levels, 1):
        problem = _level_problem(level)
        if problem:
            raise ValueError(f"{path}: level {i}: {problem}")
    return doc


def _level_problem(level: Any) -> str | None:
    """What ``compare`` would trip on in one level of a results.json, or None."""
    if not isinstance(level, dict):
        return f"{level!r} is not an object"
    if level.get("mode") not in ("closed", "open"):
        return f"mode {level.get('mode')!r}, not 'closed' or 'open'"
    load = "concurrency" if level["mode"] == "closed" else "rate"
    for key in (load, "throughput_rps", "rows_per_s", "failed_total", "dropped"):
        if not _is_number(level.get(key)):
            return f"{key} {level.get(key)!r} is not a number"
    latency = level.get("latency_ms")
    if not isinstance(latency, dict):
        return f"latency_ms {latency!r} is not an object"
    for key in ("p50", "p99"):  # None: nothing succeeded at that level
        if key not in latency or (latency[key] is not None and not _is_number(latency[key])):
            return f"latency_ms.{key} {latency.get(key)!r} is not a number"
    return None


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _label(level: dict[str, Any]) -> str:
    return f"c={level['concurrency']}" if level["mode"] == "closed" else f"{level['rate']:g}/s"


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


CSV_FIELDS = (
    "mode",
    "concurrency",
    "rate",
    "sent",
    "succeeded",
    "failed_total",
    "dropped",
    "window_s",
    "throughput_rps",
    "rows_per_s",
    *(f"{k}_ms" for k in (*percentile_keys(), "max", "mean")),
    "server_queue_us",
    "server_compute_us",
    "server_mean_batch",
    "client_cpu_cores",
    "errors",
)


def csv_text(doc: dict[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for lv in doc["levels"]:
        row = {k: lv.get(k) for k in CSV_FIELDS if k in lv}
        row.update({f"{k}_ms": v for k, v in lv["latency_ms"].items()})
        server = lv["server"] or {}
        row["server_queue_us"] = server.get("queue_us")
        row["server_compute_us"] = server.get("compute_us")
        row["server_mean_batch"] = server.get("mean_batch")
        row["errors"] = ";".join(f"{code}={n}" for code, n in lv["failed"].items())
        writer.writerow(row)
    return buf.getvalue()


def markdown_table(doc: dict[str, Any]) -> str:
    cfg = doc["config"]
    head = (
        f"**{cfg['model']}** @ {cfg['server']}: {cfg['mode']} loop, batch {cfg['batch']}, "
        f"{'stream' if cfg['streaming'] else 'unary'}, "
        # .get: results written before the key existed have none
        + (f"sequences of {cfg['sequence_length']}, " if cfg.get("sequence_length") else "")
        + f"{cfg['workers']} worker(s), "
        f"{cfg['duration_s']:g}s per level after {cfg['warmup_s']:g}s warm-up, latency of the requests that succeeded"
        + (" — INTERRUPTED, partial report" if doc["interrupted"] else "")
        # .get: results written before the key existed have none
        + (f" — STOPPED: {doc['error']}" if doc.get("error") else "")
    )
    cols = ["load", "sent", "ok", "errors", "dropped", "req/s", "rows/s"]
    cols += [f"{k.replace('_', '.')} ms" for k in percentile_keys()] + ["max ms", "srv queue us", "srv compute us"]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for lv in doc["levels"]:
        lat = lv["latency_ms"]
        server = lv["server"] or {}
        errors = ", ".join(f"{code} {n}" for code, n in lv["failed"].items()) or "0"
        cells = [
            _label(lv) + (" (partial)" if lv["interrupted"] else ""),
            str(lv["sent"]),
            str(lv["succeeded"]),
            errors,
            str(lv["dropped"]),
            _f(lv["throughput_rps"], 1),
            _f(lv["rows_per_s"], 1),
            *(_f(lat[k]) for k in percentile_keys()),
            _f(lat["max"]),
            _f(server.get("queue_us"), 0),
            _f(server.get("compute_us"), 0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_reports(doc: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.csv", out / "report.md"]
    paths[0].write_text(json.dumps(doc, indent=2) + "\n")
    paths[1].write_text(csv_text(doc))
    paths[2].write_text(markdown_table(doc))
    return paths


def compare_table(docs: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Side by side, level by level (matched by concurrency or rate): throughput, p50, p99, with ratios to the
    first result (throughput: higher is better; latency: lower is better)."""
    if len(docs) < 2:
        raise ValueError("compare needs two or more results")
    base_name, base = docs[0]
    cols = ["load", "metric", base_name] + [c for name, _ in docs[1:] for c in (name, f"{name} / {base_name}")]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    keyed = [{_label(lv): lv for lv in doc["levels"]} for _, doc in docs]
    labels = list(keyed[0]) + [k for d in keyed[1:] for k in d if k not in keyed[0]]
    metrics: tuple[tuple[str, Callable[[dict[str, Any]], float | None]], ...] = (
        ("req/s", lambda lv: lv["throughput_rps"]),
        ("rows/s", lambda lv: lv["rows_per_s"]),
        ("p50 ms", lambda lv: lv["latency_ms"]["p50"]),
        ("p99 ms", lambda lv: lv["latency_ms"]["p99"]),
        ("errors + dropped", lambda lv: lv["failed_total"] + lv["dropped"]),
    )
    for label in labels:
        for name, get in metrics:
            values = [None if label not in d else get(d[label]) for d in keyed]
            first = values[0]
            cells = [label, name, _f(first)]
            for v in values[1:]:
                ratio = f"{v / first:.2f}x" if v is not None and first else "-"
                cells += [_f(v), ratio]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
