"""Per-request cost of tensorgate's hot path: server CPU microseconds per request, and throughput against the
protocol limit (the bare no-op V2 server) and the compute limit (in-process ONNX Runtime), side by side in one run.

Server CPU per request (process CPU seconds / requests served) is much steadier than throughput on a shared
machine, so it is the figure to compare changes by. `--before TREE` starts a second tensorgate from another
checkout of the project (e.g. `git worktree add /tmp/hot-before HEAD`; its packages are imported through the
`build/mypy/tensorgate` symlinks, `make build/mypy/tensorgate`), so a change is measured before and after on the
same warm machine, the two servers taking turns within each repeat.

    .venv/bin/python benchmarks/hotpath.py [--repeats 3] [--before /tmp/hot-before] [--stream]

Writes benchmarks/results/hotpath.json and hotpath.md.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.batching import EXAMPLE, build_repository  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    ROOT,
    Measurement,
    Server,
    Summary,
    measure,
    median_of,
    perf_analyzer_available,
    start_server,
    tensorgate_cmd,
    tree_cmd,
    write_report,
)
from benchmarks.inprocess import ort_rows_per_s  # noqa: E402

DELAY_US = 1000


def add_delayed_model(repo: Path) -> None:
    """`mlp_delay`: the example MLP with `max_queue_delay_microseconds: DELAY_US` instead of 0.

    With no delay, 1-row requests at concurrency 32 mostly run alone (the instance is idle whenever one arrives), so
    each pays the hand-off to the model thread and back; the delay shows what batching them saves per request.
    """
    shutil.copytree(repo / "mlp", repo / "mlp_delay")
    config = repo / "mlp_delay" / "config.pbtxt"
    text = config.read_text().replace('name: "mlp"', 'name: "mlp_delay"')
    delayed = text.replace("max_queue_delay_microseconds: 0", f"max_queue_delay_microseconds: {DELAY_US}")
    if delayed == text:
        raise SystemExit(f"{config}: expected 'max_queue_delay_microseconds: 0' in the example's config")
    config.write_text(delayed)


def cpu_us_per_request(r: Summary, rows: int) -> float:
    """Server CPU microseconds per request (infer_per_s counts rows)."""
    return r.server_cpu_cores / (r.infer_per_s / rows) * 1e6


def _measure(
    server: Server, model: str, c: int, rows: int, streaming: bool, use_pa: bool, stats: bool = True
) -> Measurement:
    """`measure` with perf_analyzer's stability check relaxed: on a busy shared machine it rarely finds three
    windows within 100% of each other and would fail; server CPU per request does not need stable windows."""
    return measure(server, model, c, rows, streaming, use_pa, stats=stats, stability_percent=1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--before", type=Path, help="another checkout to measure side by side (the baseline)")
    parser.add_argument("--stream", action="store_true", help="also 1-row ModelStreamInfer at concurrency 32")
    parser.add_argument("--python-load", action="store_true", help="use the Python load generator")
    args = parser.parse_args()
    if not EXAMPLE.exists():
        raise SystemExit("build the examples first: make examples")
    use_pa = perf_analyzer_available() and not args.python_load
    model_file = EXAMPLE / "1" / "model.onnx"
    bare = [sys.executable, str(ROOT / "benchmarks" / "bare_server.py"), "--model", str(model_file), "--mode", "noop"]

    # (label, model, rows, streaming, concurrency)
    configs = [
        ("unary 1-row", "mlp", 1, False, 32),
        (f"unary 1-row, {DELAY_US} us delay", "mlp_delay", 1, False, 32),
        ("unary 32-row", "mlp", 32, False, 8),
    ]
    if args.stream:
        configs.append(("stream 1-row", "mlp", 1, True, 32))
    runs: dict[str, list[Measurement]] = {}
    # Ratios are taken within each repeat (the limit measured right after the server), then their median: on a
    # shared machine the load of the moment moves both sides of a pair alike.
    ratio_runs: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        repo = build_repository(Path(tmp))
        add_delayed_model(repo)
        with start_server(tensorgate_cmd(repo)) as after, start_server(bare) as noop:
            servers: list[tuple[str, Server]] = [("after", after)]
            with start_server(tree_cmd(args.before, repo)) if args.before else nullcontext() as before:
                if before is not None:
                    servers.insert(0, ("before", before))
                for repeat in range(args.repeats):
                    for label, model, rows, streaming, c in configs:
                        limit = None
                        if rows == 1 and not streaming:
                            limit = _measure(noop, "mlp", c, rows, streaming, use_pa, stats=False)
                            runs.setdefault(f"noop {label} @ c={c}", []).append(limit)
                        # Turns alternate between repeats: the second of two runs back to back measured about 5%
                        # more CPU per request in an A/A run (the same tree twice), whichever tree it was.
                        for name, server in servers if repeat % 2 == 0 else servers[::-1]:
                            m = _measure(server, model, c, rows, streaming, use_pa)
                            runs.setdefault(f"{name} {label} @ c={c}", []).append(m)
                            if limit is not None:
                                key = f"{name}: {label} / noop @ c={c} (target >= 0.90)"
                                ratio_runs.setdefault(key, []).append(m.infer_per_s / limit.infer_per_s)
                            elif rows > 1:
                                sizes = m.batch_sizes
                                mean = sum(k * v for k, v in sizes.items()) / sum(sizes.values()) if sizes else rows
                                executed = round(mean)
                                ort = ort_rows_per_s(model_file, executed, seconds=1.0, repeats=1)
                                key = f"{name}: {label} rows/s / in-process ORT at the executed batch (target >= 0.80)"
                                ratio_runs.setdefault(key, []).append(m.infer_per_s / ort)

    results = {key: median_of(ms) for key, ms in runs.items()}
    rows_of = {f"{label} @ c={c}": rows for label, _, rows, _, c in configs}
    ratios = {key: statistics.median(values) for key, values in ratio_runs.items()}

    tool = "perf_analyzer 2.41 (C++)" if use_pa else "python grpc.aio load generator"
    lines = [
        "# Hot path: server CPU per request and throughput, example MLP, CPU",
        "",
        f"Load generator: {tool}. Medians over {args.repeats} repeats; servers take turns within each repeat, "
        "in alternating order.",
        "infer/s counts rows; server CPU us per request = server process CPU seconds / requests served.",
        "",
        "| run | infer/s | p50 ms | p99 ms | mean batch | server cores | server CPU us / request |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {k} | {r.infer_per_s:,.0f} | {r.p50_us / 1000:.2f} | {r.p99_us / 1000:.2f} "
            f"| {'' if r.mean_batch is None else f'{r.mean_batch:.1f}'} | {r.server_cpu_cores:.2f} "
            f"| {cpu_us_per_request(r, rows_of[k.split(' ', 1)[1]]):.0f} |"
            for k, r in results.items()
        ],
        "",
        "| ratio (median of per-repeat ratios) | value | per repeat |",
        "|---|---|---|",
        *[f"| {k} | {v:.2f} | {', '.join(f'{x:.2f}' for x in ratio_runs[k])} |" for k, v in ratios.items()],
    ]
    payload = {"tool": tool, "results": results, "ratios": ratios, "ratio_runs": ratio_runs}
    js, md = write_report("hotpath", payload, "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {js} and {md}")


if __name__ == "__main__":
    main()
