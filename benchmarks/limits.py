"""The two physical limits of this machine for the example MLP, measured side by side:

- compute: in-process ONNX Runtime rows/s at batch 1/8/32/128 (the server's thread setting: ONNX Runtime's
  default, all cores);
- protocol: a bare grpc.aio V2 server that does no work, and the naive one that runs the MLP per request,
  driven by the same load generator as tensorgate (perf_analyzer, else the Python fallback).

    .venv/bin/python benchmarks/limits.py [--repeats 3] [--concurrency 1,8,32,64]

Writes benchmarks/results/limits.json and limits.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import (  # noqa: E402
    ROOT,
    Measurement,
    measure,
    median_of,
    perf_analyzer_available,
    start_server,
    write_report,
)
from benchmarks.inprocess import ort_rows_per_s  # noqa: E402
from tensorgate.server.backends.onnx import default_intra_op_threads  # noqa: E402

MODEL = ROOT / "examples" / "models" / "mlp" / "1" / "model.onnx"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", default="1,8,32,64")
    args = parser.parse_args()
    if not MODEL.exists():
        raise SystemExit("build the examples first: make examples")
    use_pa = perf_analyzer_available()
    levels = [int(c) for c in args.concurrency.split(",")]

    server_threads = default_intra_op_threads()
    compute = {b: ort_rows_per_s(MODEL, b, repeats=args.repeats) for b in (1, 8, 32, 128)}
    compute_all_cores = {b: ort_rows_per_s(MODEL, b, threads=0, repeats=args.repeats) for b in (1, 8, 32, 128)}
    runs: dict[str, dict[int, list[Measurement]]] = {"noop": {}, "naive": {}}
    bare = [sys.executable, str(ROOT / "benchmarks" / "bare_server.py"), "--model", str(MODEL)]
    with start_server([*bare, "--mode", "noop"]) as noop, start_server([*bare, "--mode", "naive"]) as naive:
        for _ in range(args.repeats):
            for c in levels:
                for name, server in (("noop", noop), ("naive", naive)):
                    m = measure(server, "mlp", c, 1, False, use_pa, stats=False)
                    runs[name].setdefault(c, []).append(m)
    protocol = {name: {c: median_of(ms) for c, ms in by_c.items()} for name, by_c in runs.items()}
    tool = "perf_analyzer" if use_pa else "python grpc.aio load generator"
    lines = [
        "# Limits of this machine for the example MLP",
        "",
        f"Load generator: {tool}. Medians over {args.repeats} repeats, servers measured alternately.",
        "",
        "## Compute: in-process ONNX Runtime (CPU), rows/s",
        "",
        f"| batch | {server_threads} intra-op thread(s), as tensorgate's default | onnxruntime's default (all cores) |",
        "|---|---|---|",
        *[f"| {b} | {r:,.0f} | {compute_all_cores[b]:,.0f} |" for b, r in compute.items()],
        "",
        "## Protocol: bare grpc.aio V2 servers, 1-row requests, unary",
        "",
        "| server | concurrency | infer/s | p50 ms | p99 ms | server cores | client cores |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, by_c in protocol.items():
        for c, r in by_c.items():
            lines.append(
                f"| {name} | {c} | {r.infer_per_s:,.0f} | {r.p50_us / 1000:.2f} | {r.p99_us / 1000:.2f} | "
                f"{r.server_cpu_cores:.2f} | {r.client_cpu_cores:.2f} |"
            )
    payload = {
        "tool": tool,
        "server_intra_op_threads": server_threads,
        "compute_rows_per_s": compute,
        "compute_rows_per_s_all_cores": compute_all_cores,
        "protocol": protocol,
    }
    js, md = write_report("limits", payload, "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {js} and {md}")


if __name__ == "__main__":
    main()
