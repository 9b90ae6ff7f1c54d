"""What tracing costs: the batching benchmark's tensorgate runs with tracing off and on (sample rate 1.0 by default,
every sampled span exported over OTLP, gRPC by default or HTTP, to a collector on loopback), side by side in one
run.

The servers (tracing off, and one per sample rate) start once on the same repository; each repeat measures every
(configuration, concurrency) pair on all of them in turn. The collector is a sink in a separate process that
accepts export requests without decoding them (it counts requests and bytes), so that the figures show
tensorgate's cost, not a collector's. Server CPU counts the span exporter (a child process) and is also shown
without it: on a machine with a spare core the exporter runs beside the server, not in its place.

    .venv/bin/python benchmarks/tracing.py [--repeats 3] [--concurrency 8,32] [--sample-rates 1.0,0.1]
        [--protocol grpc|http/protobuf]

Writes benchmarks/results/tracing.json and tracing.md.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import multiprocessing.connection
import multiprocessing.synchronize
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.batching import EXAMPLE, build_repository  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    Measurement,
    Summary,
    measure,
    median_of,
    perf_analyzer_available,
    start_server,
    tensorgate_cmd,
    write_report,
)
from tensorgate.server.telemetry.tracing import OTLP_PROTOCOLS  # noqa: E402
from tests.otlp_sinks import grpc_sink, http_sink  # noqa: E402


def _sink(port_out: mp.connection.Connection, stop: mp.synchronize.Event, protocol: str) -> None:
    """An OTLP trace endpoint (gRPC, or HTTP at /v1/traces) that counts export requests and their bytes."""
    received = {"requests": 0, "bytes": 0}

    def keep(body: bytes, headers: dict[str, str]) -> None:
        received["requests"] += 1
        received["bytes"] += len(body)

    with (grpc_sink if protocol == "grpc" else http_sink)(keep) as endpoint:
        port_out.send(endpoint)
        stop.wait(3600)
    port_out.send(received)


def _cpu_us(r: Summary) -> float:
    """Server CPU microseconds per inference (per row for multi-row requests)."""
    return r.server_cpu_cores / r.infer_per_s * 1e6


def _own_cpu_us(r: Summary) -> float:
    """The same without the server's child processes (the span exporter)."""
    return (r.server_cpu_cores - r.server_child_cpu_cores) / r.infer_per_s * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", default="8,32")
    parser.add_argument("--sample-rates", default="1.0", help="tracing-on servers to compare, e.g. 1.0,0.1")
    parser.add_argument("--protocol", choices=OTLP_PROTOCOLS, default="grpc", help="OTLP transport to the sink")
    parser.add_argument(
        "--python-load", action="store_true", help="drive with the Python load generator even if perf_analyzer exists"
    )
    args = parser.parse_args()
    if not EXAMPLE.exists():
        raise SystemExit("build the examples first: make examples")
    use_pa = perf_analyzer_available() and not args.python_load
    levels = [int(c) for c in args.concurrency.split(",")]

    parent, child = mp.Pipe()
    stop = mp.Event()
    sink = mp.Process(target=_sink, args=(child, stop, args.protocol), daemon=True)
    sink.start()
    endpoint = parent.recv()
    rates = [float(r) for r in args.sample_rates.split(",")]
    states = ["off", *[f"on at rate {r:g}" for r in rates]]

    def flags(rate: float) -> tuple[str, ...]:
        return (
            "--otlp-endpoint",
            endpoint,
            "--otlp-protocol",
            args.protocol,
            "--otlp-insecure",
            "--trace-sample-rate",
            str(rate),
        )

    runs: dict[str, list[Measurement]] = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        repo = build_repository(Path(tmp))
        servers = [stack.enter_context(start_server(tensorgate_cmd(repo)))]
        servers += [stack.enter_context(start_server(tensorgate_cmd(repo, *flags(r)))) for r in rates]
        # (label, model, rows, streaming, concurrency levels)
        configs = [
            ("batching on, unary, 1-row", "mlp", 1, False, levels),
            ("batching on, stream, 1-row", "mlp", 1, True, levels),
            ("batching on, unary, 32-row", "mlp", 32, False, [8]),
        ]
        for _ in range(args.repeats):
            for label, model, rows, streaming, cs in configs:
                for c in cs:
                    for state, server in zip(states, servers, strict=True):
                        m = measure(server, model, c, rows, streaming, use_pa)
                        runs.setdefault(f"{label} @ c={c}, tracing {state}", []).append(m)
    stop.set()
    exported = parent.recv()
    sink.join(10)

    results = {key: median_of(ms) for key, ms in runs.items()}
    ratios: dict[str, tuple[float, float, float]] = {}
    for key in results:
        if ", tracing on" in key:
            base, _, state = key.partition(", tracing ")
            on, off = results[key], results[f"{base}, tracing off"]
            # Server CPU per request is steadier than throughput on a shared machine: both are reported.
            ratios[f"{base}, {state}"] = (
                on.infer_per_s / off.infer_per_s,
                _cpu_us(on) / _cpu_us(off),
                _own_cpu_us(on) / _own_cpu_us(off),
            )
    tool = "perf_analyzer 2.41 (C++)" if use_pa else "python grpc.aio load generator (perf_analyzer unavailable)"
    lines = [
        "# Tracing overhead: example MLP, CPU",
        "",
        f"Load generator: {tool}. Medians over {args.repeats} repeats; tracing off and on measured in turn.",
        f"Tracing on: sample rates {args.sample_rates}, OTLP over {args.protocol} to a loopback sink",
        f"({exported['requests']} export requests, {exported['bytes'] / 1e6:.1f} MB received).",
        "",
        "| run | infer/s | p50 ms | p99 ms | server cores | of which exporter process | server CPU us / request |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {k} | {r.infer_per_s:,.0f} | {r.p50_us / 1000:.2f} | {r.p99_us / 1000:.2f} "
            f"| {r.server_cpu_cores:.2f} | {r.server_child_cpu_cores:.2f} | {_cpu_us(r):.0f} |"
            for k, r in results.items()
        ],
        "",
        "| tracing on / off | throughput (target >= 0.90) | server CPU per request | without the exporter process |",
        "|---|---|---|---|",
        *[f"| {k} | {t:.2f} | {c:.2f} | {o:.2f} |" for k, (t, c, o) in ratios.items()],
    ]
    payload = {"tool": tool, "protocol": args.protocol, "results": results, "ratios": ratios, "exported": exported}
    js, md = write_report("tracing", payload, "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {js} and {md}")


if __name__ == "__main__":
    main()
