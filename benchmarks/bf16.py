"""What BF16 costs: the same graph with BF16 and with FP32 inputs and outputs, side by side.

ONNX Runtime's Python `run` takes no bfloat16, so a model with BF16 tensors runs through an IOBinding
(server/backends/bf16.py); this measures that against `run` on the twin FP32 model:

- in-process: `OnnxBackend.execute` per batch of 1, 32 and 128 rows (the per-batch cost of the binding);
- served: tensorgate with both models (dynamic batching), 1-row requests at one concurrency, the two models in
  turn within each repeat, driven by perf_analyzer (else the project's own load generator).

The graph: X (64 wide) -> Cast to float -> MatMul 64x64 -> Cast back, so the two differ only in I/O type.

    .venv/bin/python benchmarks/bf16.py [--repeats 3] [--concurrency 8]

Writes benchmarks/results/bf16.json and bf16.md.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import (  # noqa: E402
    Measurement,
    measure,
    perf_analyzer_available,
    start_server,
    tensorgate_cmd,
    write_report,
)
from tensorgate.protos import model_config_pb2 as mc  # noqa: E402
from tensorgate.protos.tensors import BY_NAME  # noqa: E402
from tensorgate.server.backends.onnx import OnnxBackend  # noqa: E402
from tests.onnx_models import OPSET, _save, write_config  # noqa: E402

WIDTH = 64
MODELS = {"fp32": (TensorProto.FLOAT, "FP32"), "bf16": (TensorProto.BFLOAT16, "BF16")}


def build_repository(root: Path) -> Path:
    weights = np.random.default_rng(0).standard_normal((WIDTH, WIDTH)).astype(np.float32)
    for name, (elem, _) in MODELS.items():
        graph = helper.make_graph(
            [
                helper.make_node("Cast", ["X"], ["XF"], to=TensorProto.FLOAT),
                helper.make_node("MatMul", ["XF", "W"], ["H"]),
                helper.make_node("Cast", ["H"], ["Y"], to=elem),
            ],
            name,
            [helper.make_tensor_value_info("X", elem, ["batch", WIDTH])],
            [helper.make_tensor_value_info("Y", elem, ["batch", WIDTH])],
            initializer=[numpy_helper.from_array(weights, "W")],
        )
        _save(
            helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), root / name / "1" / "model.onnx"
        )
        write_config(root, name, "max_batch_size: 128\ndynamic_batching { }\n")
    return root


def execute_us(root: Path, name: str, rows: int, repeats: int, calls: int = 2000) -> float:
    """Median over repeats of the mean time of one `execute` call, in microseconds."""
    backend = OnnxBackend(root / name / "1" / "model.onnx", mc.ModelConfig(name=name, max_batch_size=128), version=1)
    x = np.random.default_rng(1).standard_normal((rows, WIDTH)).astype(BY_NAME[MODELS[name][1]].np_dtype)
    backend.execute({"X": x}, ["Y"])  # first-call allocations out of the timing
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            backend.execute({"X": x}, ["Y"])
        times.append((time.perf_counter() - started) / calls * 1e6)
    backend.close()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    command = shlex.join([".venv/bin/python", "benchmarks/bf16.py", *sys.argv[1:]])
    use_pa = perf_analyzer_available()
    with tempfile.TemporaryDirectory() as tmp:
        root = build_repository(Path(tmp))
        inprocess = {
            rows: {name: execute_us(root, name, rows, args.repeats) for name in MODELS} for rows in (1, 32, 128)
        }
        runs: dict[str, list[Measurement]] = {name: [] for name in MODELS}
        with start_server(tensorgate_cmd(root)) as server:
            for r in range(args.repeats):
                for name in list(MODELS) if r % 2 == 0 else list(MODELS)[::-1]:
                    runs[name].append(measure(server, name, args.concurrency, 1, False, use_pa, stats=False))
                    print(f"repeat {r + 1}: {name}: {runs[name][-1].infer_per_s:,.0f} infer/s", file=sys.stderr)
    served = {
        name: {
            "infer_per_s": statistics.median(m.infer_per_s for m in ms),
            "p99_us": statistics.median(m.p99_us for m in ms),
            "server_cpu_us_per_request": statistics.median(m.server_cpu_cores / m.infer_per_s * 1e6 for m in ms),
        }
        for name, ms in runs.items()
    }
    ratios = [b.infer_per_s / f.infer_per_s for b, f in zip(runs["bf16"], runs["fp32"], strict=True)]
    tool = "perf_analyzer" if use_pa else "python grpc.aio load generator"
    lines = [
        "# BF16 (IOBinding) against FP32 (`run`), same graph",
        "",
        f"`{command}`; load generator: {tool}; medians over {args.repeats} repeats.",
        "",
        "## In-process `OnnxBackend.execute`, µs per batch",
        "",
        "| rows | FP32 | BF16 | BF16 - FP32 |",
        "|---|---|---|---|",
        *[
            f"| {rows} | {t['fp32']:.1f} | {t['bf16']:.1f} | {t['bf16'] - t['fp32']:+.1f} |"
            for rows, t in inprocess.items()
        ],
        "",
        f"## Served, 1-row requests, concurrency {args.concurrency}, unary",
        "",
        "| model | infer/s | p99 ms | server CPU µs/request |",
        "|---|---|---|---|",
        *[
            f"| {name} | {r['infer_per_s']:,.0f} | {r['p99_us'] / 1000:.2f} | {r['server_cpu_us_per_request']:.0f} |"
            for name, r in served.items()
        ],
        "",
        f"BF16 / FP32 throughput: median {statistics.median(ratios):.2f} (per repeat: "
        f"{', '.join(f'{x:.2f}' for x in ratios)}).",
    ]
    payload = {"command": command, "tool": tool, "execute_us": inprocess, "served": served, "ratios": ratios}
    js, md = write_report("bf16", payload, "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {js} and {md}")


if __name__ == "__main__":
    main()
