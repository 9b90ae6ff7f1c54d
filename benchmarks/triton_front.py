"""The cost of fronting Triton: the same model served by Triton directly and through tensorgate's remote Triton
backend, side by side in one run.

The upstream is PyTriton's tritonserver (tests/pytriton_upstream.py, `add_sub`: FP32 [4] + [4], max_batch_size
16, Triton's dynamic batcher) on loopback; tensorgate fronts it with a one-line config (auto-completed, dynamic
batching, 4 instances). Each concurrency level is measured on both, in turn, repeated; medians are reported, and
the added latency at concurrency 1 (tensorgate p50 minus Triton p50).

    make .venv-triton/.installed-stamp    # once: PyTriton in its own environment
    .venv/bin/python benchmarks/triton_front.py [--repeats 3] [--concurrency 1,8,32] [--perf-analyzer]

Writes benchmarks/results/triton_front.json and triton_front.md. Every run is bounded (perf_analyzer's windows and
trial cap, or a fixed duration with the Python load generator).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import (  # noqa: E402
    Measurement,
    Summary,
    median_of,
    perf_analyzer_available,
    run_perf_analyzer,
    run_python_load,
    start_server,
    tensorgate_cmd,
    write_report,
)
from tests.pytriton_upstream import Upstream, unavailable_reason  # noqa: E402

MODEL = "add_sub"


def _load(address: str, concurrency: int, use_pa: bool) -> Measurement:
    if use_pa:
        return run_perf_analyzer(address, MODEL, concurrency, 1, False)
    return run_python_load(address, MODEL, concurrency, 1, False)


def _fmt(r: Summary) -> str:
    return f"{r.infer_per_s:,.0f} | {r.p50_us / 1000:.2f} | {r.p90_us / 1000:.2f} | {r.p99_us / 1000:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument(
        "--perf-analyzer",
        action="store_true",
        help="load with perf_analyzer instead of tensorgate's Python load generator (on 2 shared cores it often "
        "finds no stable window and fails)",
    )
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason is not None:
        raise SystemExit(f"PyTriton cannot run here: {reason}")
    if args.perf_analyzer and not perf_analyzer_available():
        raise SystemExit("perf_analyzer is not available (see benchmarks/perf_analyzer.sh)")
    levels = [int(c) for c in args.concurrency.split(",")]
    runs: dict[str, list[Measurement]] = {}
    with tempfile.TemporaryDirectory() as tmp, Upstream(Path(tmp) / "pytriton", slow_seconds=0.0, token="") as upstream:
        model_dir = Path(tmp) / "models" / MODEL
        model_dir.mkdir(parents=True)
        (model_dir / "config.pbtxt").write_text(
            'backend: "tensorgate_triton"\n'
            f'parameters {{ key: "tensorgate.triton.url" value {{ string_value: "{upstream.url}" }} }}\n'
        )
        with start_server(tensorgate_cmd(model_dir.parent)) as tg:
            targets = [("triton direct", upstream.url), ("through tensorgate", tg.address)]
            for _ in range(args.repeats):
                for c in levels:
                    for label, address in targets:
                        try:
                            m = _load(address, c, args.perf_analyzer)
                        except RuntimeError as exc:
                            tail = "".join(upstream.lines[-20:])
                            raise SystemExit(f"{label} at concurrency {c}: {exc}\nupstream log:\n{tail}") from exc
                        runs.setdefault(f"{label} @ c={c}", []).append(m)
    results = {key: median_of(ms) for key, ms in runs.items()}
    c1 = levels[0]
    added = {
        "added_p50_ms_at_c1": (
            results[f"through tensorgate @ c={c1}"].p50_us - results[f"triton direct @ c={c1}"].p50_us
        )
        / 1000,
        "added_p99_ms_at_c1": (
            results[f"through tensorgate @ c={c1}"].p99_us - results[f"triton direct @ c={c1}"].p99_us
        )
        / 1000,
    }
    tool = (
        "perf_analyzer 2.41 (C++)" if args.perf_analyzer else "tensorgate's Python load generator (tensorgate.loadtest)"
    )
    lines = [
        "# Fronting Triton: PyTriton add_sub direct vs through tensorgate, CPU",
        "",
        f"Load generator: {tool}; 1-row FP32 requests, unary. Medians over {args.repeats} repeats; both targets",
        f"measured in turn at each level. Machine: {os.cpu_count()} CPUs shared by tritonserver (+ its Python",
        "backend stub), tensorgate and the load generator. Latencies in ms.",
        "",
        "| target | concurrency | infer/s | p50 | p90 | p99 |",
        "|---|---|---|---|---|---|",
    ]
    for c in levels:
        for label in ("triton direct", "through tensorgate"):
            lines.append(f"| {label} | {c} | {_fmt(results[f'{label} @ c={c}'])} |")
    lines += [
        "",
        f"Added latency at concurrency {c1}: p50 {added['added_p50_ms_at_c1']:+.2f} ms, "
        f"p99 {added['added_p99_ms_at_c1']:+.2f} ms.",
        "",
    ]
    js, md = write_report("triton_front", {"tool": tool, "results": results, **added}, "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {js} and {md}")


if __name__ == "__main__":
    main()
