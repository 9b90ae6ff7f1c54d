"""The cost of prediction capture: the batching benchmark's example MLP with monitoring off and on (sample rate 1.0,
inputs captured: 256 floats per row), measured in turn, repeated, medians reported.

    .venv/bin/python benchmarks/capture.py [--repeats 3] [--concurrency 8,32] [--rows 1] [--python-load]

Both servers run from one copy of the repository; the "on" server has --data-dir (SQLite capture, the monitor loop
every 10 s) and the default capture queue. The figure to watch is throughput on / off (aim: >= 0.90) and the drop
counter, which says whether capture kept up or shed samples to keep the request path unblocked.

Writes benchmarks/results/capture.json and capture.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.batching import EXAMPLE  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    Measurement,
    Server,
    measure,
    median_of,
    perf_analyzer_available,
    start_server,
    tensorgate_cmd,
    write_report,
)


def _capture_counters(server: Server, log: Path) -> tuple[float, float]:
    """(captured, dropped) from the server's /metrics; the metrics port is read from its log."""
    text = log.read_text(errors="replace")
    port = next(int(line.rsplit(":", 1)[1].split()[0]) for line in text.splitlines() if "metrics listening on" in line)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        body = reply.read().decode()
    values = {}
    for line in body.splitlines():
        if line.startswith(("tensorgate_captured_total ", "tensorgate_capture_dropped_total ")):
            name, value = line.split()
            values[name] = float(value)
    return values.get("tensorgate_captured_total", 0.0), values.get("tensorgate_capture_dropped_total", 0.0)


def capture_costs(n: int = 16384) -> dict[str, float]:
    """CPU cost of capture per sample, in process, free of the load generator's noise: what ``Capture.submit``
    adds to the request path (ns CPU), and what the writer thread spends to store one MLP sample (us)."""
    import numpy as np

    from tensorgate.protos import model_config_pb2 as mc
    from tensorgate.server.monitoring.capture import Capture
    from tensorgate.server.monitoring.store import Prediction, PredictionStore

    x = np.zeros((1, 256), np.float32)
    y = np.zeros((1, 10), np.float32)
    config = mc.ModelConfig(name="mlp")
    with tempfile.TemporaryDirectory() as tmp:
        store = PredictionStore(Path(tmp) / "bench.sqlite3")
        capture = Capture(store, queue_size=2 * n + 1)  # writer not started: submit only enqueues
        for i in range(n):  # warm-up: the first calls parse the config and grow the deque
            capture.submit("mlp", 1, config, str(i), {"INPUT0": x}, {"OUTPUT0": y})
        t0 = time.process_time_ns()
        for i in range(n):
            capture.submit("mlp", 1, config, str(i), {"INPUT0": x}, {"OUTPUT0": y})
        submit_ns = (time.process_time_ns() - t0) / n
        batch = [Prediction(str(i), "mlp", "1", time.time(), {"INPUT0": x}, {"OUTPUT0": y}) for i in range(n)]
        c0 = time.process_time()
        for start in range(0, n, 256):
            store.insert(batch[start : start + 256])
        insert_us = (time.process_time() - c0) / n * 1e6
        store.close()
    return {"submit_ns_per_request": submit_ns, "writer_cpu_us_per_sample": insert_us}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", default="8,32")
    parser.add_argument("--rows", type=int, default=1, help="rows per request")
    parser.add_argument(
        "--python-load", action="store_true", help="use the python load generator even where perf_analyzer exists"
    )
    args = parser.parse_args()
    if not EXAMPLE.exists():
        raise SystemExit("build the examples first: make examples")
    use_pa = perf_analyzer_available() and not args.python_load
    levels = [int(c) for c in args.concurrency.split(",")]
    runs: dict[str, list[Measurement]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "models"
        shutil.copytree(EXAMPLE, repo / "mlp")
        data = Path(tmp) / "data"
        with (
            start_server(tensorgate_cmd(repo)) as off,
            start_server(tensorgate_cmd(repo, "--data-dir", str(data))) as on,
        ):
            for _ in range(args.repeats):
                for c in levels:
                    for label, server in (("capture off", off), ("capture on", on)):
                        m = measure(server, "mlp", c, args.rows, False, use_pa)
                        runs.setdefault(f"{label} @ c={c}", []).append(m)
            captured, dropped = _capture_counters(on, on.log)
    results = {key: median_of(ms) for key, ms in runs.items()}
    costs = capture_costs()
    ratios = {
        f"capture on / off @ c={c}": results[f"capture on @ c={c}"].infer_per_s
        / results[f"capture off @ c={c}"].infer_per_s
        for c in levels
    }
    tool = "perf_analyzer (C++)" if use_pa else "python grpc.aio load generator (tensorgate bench)"
    lines = [
        f"# Capture benchmark: example MLP, {args.rows}-row unary requests, dynamic batching on, CPU",
        "",
        f"Load generator: {tool}. Medians over {args.repeats} repeats, off and on measured in turn.",
        "",
        "| run | infer/s | p50 ms | p99 ms | server cores |",
        "|---|---|---|---|---|",
        *[
            f"| {k} | {r.infer_per_s:,.0f} | {r.p50_us / 1000:.2f} | {r.p99_us / 1000:.2f} | {r.server_cpu_cores:.2f} |"
            for k, r in results.items()
        ],
        "",
        "| ratio (aim >= 0.90) | value |",
        "|---|---|",
        *[f"| {k} | {v:.3f} |" for k, v in ratios.items()],
        "",
        f"Capture-on server: {captured:,.0f} samples stored, {dropped:,.0f} dropped (queue full).",
        "",
        f"In process: Capture.submit adds {costs['submit_ns_per_request']:,.0f} ns to a request; the writer thread "
        f"spends {costs['writer_cpu_us_per_sample']:,.1f} us CPU per stored sample (batches of 256).",
    ]
    payload = {
        "tool": tool,
        "results": results,
        "ratios": ratios,
        "captured": captured,
        "dropped": dropped,
        "costs": costs,
    }
    js, md = write_report("capture", payload, "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {js} and {md}")


if __name__ == "__main__":
    main()
