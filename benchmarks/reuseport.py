"""Several tensorgate processes on one port (`--reuse-port`) against one process: does a second GIL pay here?

One tensorgate process is bound by its GIL (grpc.aio's compiled code, the codec and the scheduler share it) well
before it uses two cores. With `--reuse-port`, N processes listen on one port and the kernel spreads client
connections over them. This measures the example MLP served by 1 and by N processes, in turn within each repeat,
driven by perf_analyzer (1-row unary requests at --concurrency; it opens one connection per 6 requests in flight,
so the kernel has connections to spread). Server CPU sums every process.

    .venv/bin/python benchmarks/reuseport.py [--processes 1,2] [--repeats 3] [--concurrency 32]

Writes benchmarks/results/reuseport.json and reuseport.md.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.batching import build_repository  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    Measurement,
    perf_analyzer_available,
    run_perf_analyzer,
    start_server,
    tensorgate_cmd,
    write_report,
)
from tests.process import free_port  # noqa: E402


def measure(repo: Path, processes: int, concurrency: int) -> Measurement:
    """Start `processes` servers on one port, run perf_analyzer once, stop them."""
    port = free_port()
    cmd = tensorgate_cmd(repo, "--grpc-port", str(port), "--reuse-port", "--metrics-port", "-1")
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(start_server(cmd)) for _ in range(processes)]
        cpu0, t0 = sum(s.cpu_seconds() for s in servers), time.perf_counter()
        m = run_perf_analyzer(f"127.0.0.1:{port}", "mlp", concurrency, 1, False)
        m.server_cpu_cores = (sum(s.cpu_seconds() for s in servers) - cpu0) / (time.perf_counter() - t0)
    return m


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1,2", help="server process counts to compare, the first is the base")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    command = shlex.join([".venv/bin/python", "benchmarks/reuseport.py", *sys.argv[1:]])
    if not perf_analyzer_available():
        raise SystemExit("perf_analyzer is not available: see benchmarks/perf_analyzer.sh")
    counts = [int(n) for n in args.processes.split(",")]
    runs: dict[int, list[Measurement]] = {n: [] for n in counts}
    with tempfile.TemporaryDirectory() as tmp:
        repo = build_repository(Path(tmp))
        for r in range(args.repeats):
            for n in counts if r % 2 == 0 else counts[::-1]:
                m = measure(repo, n, args.concurrency)
                runs[n].append(m)
                print(f"repeat {r + 1}: {n} process(es): {m.infer_per_s:,.0f} infer/s", file=sys.stderr, flush=True)
    base = counts[0]
    rows = {
        n: {
            "infer_per_s": statistics.median(m.infer_per_s for m in ms),
            "p99_us": statistics.median(m.p99_us for m in ms),
            "server_cpu_cores": statistics.median(m.server_cpu_cores for m in ms),
            "runs": [round(m.infer_per_s, 1) for m in ms],
            "ratio_to_base": [round(m.infer_per_s / b.infer_per_s, 3) for m, b in zip(ms, runs[base], strict=True)],
        }
        for n, ms in runs.items()
    }
    lines = [
        "# tensorgate processes sharing one port (--reuse-port), example MLP, CPU",
        "",
        f"`{command}`",
        "",
        f"perf_analyzer, 1-row unary requests at concurrency {args.concurrency}; medians over {args.repeats} "
        "repeats, process counts measured in turn. Server cores sum every process.",
        "",
        f"| processes | infer/s | p99 ms | server cores | per-repeat ratio to {base} process(es) |",
        "|---|---|---|---|---|",
    ]
    for n, row in rows.items():
        ratios: list[float] = row["ratio_to_base"]  # type: ignore[assignment]
        lines.append(
            f"| {n} | {row['infer_per_s']:,.0f} | {row['p99_us'] / 1000:.2f} | {row['server_cpu_cores']:.2f} | "
            f"{', '.join(f'{x:.2f}' for x in ratios)} |"
        )
    text = "\n".join(lines) + "\n"
    js, md = write_report("reuseport", {"command": command, "args": vars(args), "processes": rows}, text)
    print(text)
    print(f"wrote {js} and {md}")


if __name__ == "__main__":
    main()
