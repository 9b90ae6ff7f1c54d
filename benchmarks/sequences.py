"""What sequence batching costs: the same stateful graph served as a sequence model and as a stateless one.

`acc_seq` is tests/onnx_models.py's accumulator under `sequence_batching` (oldest, no delay): the server feeds its
control and state inputs and runs each sequence's requests one at a time. `acc_plain` is the same file served
with dynamic batching (no delay), the caller sending every input itself. perf_analyzer drives both from one
server, in turn within each repeat, at the same concurrency: against `acc_seq` it runs as many sequences as
requests in flight (its sequence mode), against `acc_plain` plain requests. The ratio seq/plain is what the
sequencer (ordering, controls, state) costs on the request path; server CPU per request says where.

    .venv/bin/python benchmarks/sequences.py [--repeats 3] [--concurrency 16] [--streaming]

Writes benchmarks/results/sequences.json and sequences.md.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import (  # noqa: E402
    Measurement,
    perf_analyzer_available,
    run_perf_analyzer,
    start_server,
    tensorgate_cmd,
    write_report,
)
from tests.onnx_models import accumulator_config, accumulator_model, write_config  # noqa: E402

MODELS = ("acc_plain", "acc_seq")


def build_repository(root: Path) -> Path:
    for name in MODELS:
        accumulator_model(root / name / "1" / "model.onnx")
    extra = "max_sequence_idle_microseconds: 10000000 oldest { max_candidate_sequences: 256 }"
    write_config(root, "acc_seq", accumulator_config("acc_seq", max_batch_size=32, extra=extra))
    plain = 'name: "acc_plain"\nbackend: "onnxruntime"\nmax_batch_size: 32\ndynamic_batching { }\n'
    write_config(root, "acc_plain", plain)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--streaming", action="store_true", help="ModelStreamInfer instead of unary calls")
    args = parser.parse_args()
    command = shlex.join([".venv/bin/python", "benchmarks/sequences.py", *sys.argv[1:]])
    if not perf_analyzer_available():
        raise SystemExit("perf_analyzer is not available: see benchmarks/perf_analyzer.sh")
    runs: dict[str, list[Measurement]] = {name: [] for name in MODELS}
    cpu_us: dict[str, list[float]] = {name: [] for name in MODELS}
    with tempfile.TemporaryDirectory() as tmp, start_server(tensorgate_cmd(build_repository(Path(tmp)))) as server:
        for r in range(args.repeats):
            for name in MODELS if r % 2 == 0 else MODELS[::-1]:
                cpu0, t0 = server.cpu_seconds(), time.perf_counter()
                m = run_perf_analyzer(server.address, name, args.concurrency, 1, args.streaming)
                cores = (server.cpu_seconds() - cpu0) / (time.perf_counter() - t0)
                runs[name].append(m)
                cpu_us[name].append(cores / m.infer_per_s * 1e6)
                print(f"repeat {r + 1}: {name}: {m.infer_per_s:,.0f} infer/s", file=sys.stderr, flush=True)
    ratios = [s.infer_per_s / p.infer_per_s for s, p in zip(runs["acc_seq"], runs["acc_plain"], strict=True)]
    rows = {
        name: {
            "infer_per_s": statistics.median(m.infer_per_s for m in ms),
            "p99_us": statistics.median(m.p99_us for m in ms),
            "server_cpu_us_per_request": statistics.median(cpu_us[name]),
            "runs": [round(m.infer_per_s, 1) for m in ms],
        }
        for name, ms in runs.items()
    }
    lines = [
        "# Sequence batching against the same graph served stateless, CPU",
        "",
        f"`{command}`",
        "",
        f"perf_analyzer, 1-row {'streaming' if args.streaming else 'unary'} requests at concurrency "
        f"{args.concurrency} (sequences of ~20 requests against acc_seq); medians over {args.repeats} repeats, the "
        "two models in turn. Server CPU is the whole process's, per request.",
        "",
        "| model | infer/s | p99 ms | server CPU us/request |",
        "|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['infer_per_s']:,.0f} | {row['p99_us'] / 1000:.2f} | "
            f"{row['server_cpu_us_per_request']:.0f} |"
        )
    lines += ["", f"acc_seq / acc_plain per repeat: {', '.join(f'{x:.2f}' for x in ratios)}; "
              f"median {statistics.median(ratios):.2f}"]  # fmt: skip
    text = "\n".join(lines) + "\n"
    payload = {"command": command, "args": vars(args), "models": rows, "ratios": ratios}
    js, md = write_report("sequences", payload, text)
    print(text)
    print(f"wrote {js} and {md}")


if __name__ == "__main__":
    main()
