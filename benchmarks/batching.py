"""tensorgate on the example MLP against the machine's limits, side by side in one run:

- 1-row requests at concurrency 1/8/32/64: the bare no-op V2 server (protocol limit), the naive per-request
  server, and tensorgate with dynamic batching off and on, unary and ModelStreamInfer;
- 32-row requests at concurrency 8 against in-process ONNX Runtime at the batch size the server executed.

Servers start once; every (concurrency, configuration) pair is measured in turn, repeated, and medians reported.

    .venv/bin/python benchmarks/batching.py [--repeats 3] [--concurrency 1,8,32,64]

Writes benchmarks/results/batching.json and batching.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import (  # noqa: E402
    ROOT,
    SUMMARY_HEADER,
    Measurement,
    Server,
    measure,
    median_of,
    perf_analyzer_available,
    start_server,
    summary_cells,
    tensorgate_cmd,
    write_report,
)
from benchmarks.inprocess import ort_rows_per_s  # noqa: E402

EXAMPLE = ROOT / "examples" / "models" / "mlp"
NO_BATCHING = """name: "mlp_nobatch"
backend: "onnxruntime"
max_batch_size: 128
input [{ name: "INPUT0" data_type: TYPE_FP32 dims: [256] }]
output [{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [10] }]
instance_group [{ kind: KIND_AUTO count: 1 }]
"""


def build_repository(root: Path) -> Path:
    """The example `mlp` (dynamic batching, no queue delay) and the same network without batching."""
    repo = root / "models"
    shutil.copytree(EXAMPLE, repo / "mlp")
    (repo / "mlp_nobatch" / "1").mkdir(parents=True)
    shutil.copy(EXAMPLE / "1" / "model.onnx", repo / "mlp_nobatch" / "1" / "model.onnx")
    (repo / "mlp_nobatch" / "config.pbtxt").write_text(NO_BATCHING)
    return repo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--skip-baselines", action="store_true", help="measure tensorgate only")
    args = parser.parse_args()
    if not EXAMPLE.exists():
        raise SystemExit("build the examples first: make examples")
    use_pa = perf_analyzer_available()
    levels = [int(c) for c in args.concurrency.split(",")]
    model_file = EXAMPLE / "1" / "model.onnx"
    bare = [sys.executable, str(ROOT / "benchmarks" / "bare_server.py"), "--model", str(model_file)]

    runs: dict[str, list[Measurement]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        repo = build_repository(Path(tmp))
        with (
            start_server(tensorgate_cmd(repo)) as tg,
            start_server([*bare, "--mode", "noop"]) as noop,
            start_server([*bare, "--mode", "naive"]) as naive,
        ):
            # (label, server, model, rows, streaming, has statistics)
            configs: list[tuple[str, Server, str, int, bool, bool]] = []
            if not args.skip_baselines:
                configs += [
                    ("noop unary", noop, "mlp", 1, False, False),
                    ("naive unary", naive, "mlp", 1, False, False),
                ]
            configs += [
                ("tensorgate batching off, unary", tg, "mlp_nobatch", 1, False, True),
                ("tensorgate batching on, unary", tg, "mlp", 1, False, True),
                ("tensorgate batching off, stream", tg, "mlp_nobatch", 1, True, True),
                ("tensorgate batching on, stream", tg, "mlp", 1, True, True),
            ]
            for _ in range(args.repeats):
                for c in levels:
                    for label, server, model, rows, streaming, stats in configs:
                        m = measure(server, model, c, rows, streaming, use_pa, stats=stats)
                        runs.setdefault(f"{label} @ c={c}", []).append(m)
                m = measure(tg, "mlp", 8, 32, False, use_pa)
                runs.setdefault("tensorgate batching on, unary, 32-row @ c=8", []).append(m)

    results = {key: median_of(ms) for key, ms in runs.items()}
    big = results["tensorgate batching on, unary, 32-row @ c=8"]
    executed = int(round(big.mean_batch or 32))
    ort_at_executed = ort_rows_per_s(model_file, executed, repeats=args.repeats)

    def ratio(a: str, b: str) -> float | None:
        if a not in results or b not in results:
            return None
        return results[a].infer_per_s / results[b].infer_per_s

    c_top = 32 if 32 in levels else levels[-1]
    targets = {
        f"unary batching on / noop @ c={c_top} (target >= 0.90)": ratio(
            f"tensorgate batching on, unary @ c={c_top}", f"noop unary @ c={c_top}"
        ),
        f"stream / unary, batching on @ c={c_top} (target >= 1.5)": ratio(
            f"tensorgate batching on, stream @ c={c_top}", f"tensorgate batching on, unary @ c={c_top}"
        ),
        f"32-row rows/s / in-process ORT at executed batch {executed} (target >= 0.80)": big.infer_per_s
        / ort_at_executed,
    }
    naive_key = f"naive unary @ c={c_top}"
    if naive_key in results:
        on = results[f"tensorgate batching on, unary @ c={c_top}"]
        targets[f"p99 batching on / naive p99 @ c={c_top} (target <= 1.0)"] = on.p99_us / results[naive_key].p99_us

    tool = "perf_analyzer 2.41 (C++)" if use_pa else "python grpc.aio load generator (perf_analyzer unavailable)"
    lines = [
        "# Batching benchmark: example MLP, CPU",
        "",
        f"Load generator: {tool}. Medians over {args.repeats} repeats; configurations measured in turn within each",
        "repeat. Latencies in ms; server queue / compute in microseconds (server-side, from ModelStatistics);",
        "cores = CPU seconds per wall second of the server / the load generator.",
        "",
        SUMMARY_HEADER,
        *[f"| {key} | {summary_cells(r)} |" for key, r in results.items()],
        "",
        f"In-process ONNX Runtime at batch {executed}: {ort_at_executed:,.0f} rows/s.",
        "",
        "| ratio | value |",
        "|---|---|",
        *[f"| {k} | {'n/a' if v is None else f'{v:.2f}'} |" for k, v in targets.items()],
    ]
    payload = {"tool": tool, "results": results, "ort_rows_per_s_at_executed": ort_at_executed, "targets": targets}
    js, md = write_report("batching", payload, "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {js} and {md}")


if __name__ == "__main__":
    main()
