"""The sweep: start the load processes, run each level (concurrency or rate), merge their samples exactly, and
read the server's ModelStatistics around each measurement window."""

from __future__ import annotations

import multiprocessing as mp
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from types import FrameType
from typing import Any, Literal, TextIO

from tensorgate.client import InferenceClient, TensorgateClientError, TLSConfig
from tensorgate.loadtest.inputs import ModelShape, make_inputs
from tensorgate.loadtest.samples import Samples, merge
from tensorgate.loadtest.worker import COUNTERS, Level, Target, worker_main
from tensorgate.protos import grpc_service_pb2 as pb

__all__ = ["BenchConfig", "LevelResult", "ServerStats", "SweepResult", "run_sweep", "stats_delta"]

READY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class BenchConfig:
    """Everything ``tensorgate bench`` was asked to do."""

    model: str
    server: str = "127.0.0.1:8001"
    version: str = ""
    mode: Literal["closed", "open"] = "closed"
    concurrency: tuple[int, ...] = (1, 8, 32)
    rates: tuple[float, ...] = ()
    arrival: Literal["poisson", "constant"] = "poisson"
    duration_s: float = 10.0
    warmup_s: float = 2.0
    max_requests: int | None = None
    batch: int = 1
    inputs: str = "random"
    streaming: bool = False
    priority: int | None = None
    timeout_param_us: int | None = None
    deadline_s: float = 30.0
    tls: TLSConfig | None = None
    headers: tuple[tuple[str, str], ...] = ()
    """Metadata on every call (the bearer token of --token-file); only the names go into reports."""
    workers: int = 1
    max_in_flight: int = 1000
    seed: int = 0
    nice: int = 0

    def levels(self) -> tuple[float, ...]:
        return tuple(float(c) for c in self.concurrency) if self.mode == "closed" else self.rates

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            k: getattr(self, k)
            for k in (
                "model",
                "server",
                "version",
                "mode",
                "arrival",
                "duration_s",
                "warmup_s",
                "max_requests",
                "batch",
                "inputs",
                "streaming",
                "priority",
                "timeout_param_us",
                "deadline_s",
                "workers",
                "max_in_flight",
                "seed",
                "nice",
            )
        }
        out["concurrency"] = list(self.concurrency) if self.mode == "closed" else []
        out["rates"] = list(self.rates)
        out["tls"] = self.tls is not None
        out["headers"] = [name for name, _ in self.headers]
        return out


@dataclass
class ServerStats:
    """The server's own view of one window (delta of ModelStatistics): means per request in microseconds."""

    requests: int
    executions: int
    inferences: int
    queue_us: float
    compute_us: float
    compute_input_us: float
    compute_infer_us: float
    compute_output_us: float
    batch_sizes: dict[int, int] = field(default_factory=dict)

    @property
    def mean_batch(self) -> float | None:
        return self.inferences / self.executions if self.executions else None


@dataclass
class LevelResult:
    mode: str
    level: float
    samples: Samples
    server: ServerStats | None
    rows_per_request: int
    interrupted: bool = False


@dataclass
class SweepResult:
    config: BenchConfig
    model: ModelShape
    levels: list[LevelResult]
    interrupted: bool
    started_at: str


def _totals(response: pb.ModelStatisticsResponse) -> dict[str, Any]:
    t: dict[str, Any] = dict.fromkeys(
        ("success", "executions", "inferences", "queue_ns", "input_ns", "infer_ns", "output_ns"), 0
    )
    batches: dict[int, int] = {}
    for ms in response.model_stats:
        s = ms.inference_stats
        t["success"] += s.success.count
        t["executions"] += ms.execution_count
        t["inferences"] += ms.inference_count
        t["queue_ns"] += s.queue.ns
        t["input_ns"] += s.compute_input.ns
        t["infer_ns"] += s.compute_infer.ns
        t["output_ns"] += s.compute_output.ns
        for b in ms.batch_stats:
            batches[b.batch_size] = batches.get(b.batch_size, 0) + b.compute_infer.count
    t["batches"] = batches
    return t


def stats_delta(before: pb.ModelStatisticsResponse, after: pb.ModelStatisticsResponse) -> ServerStats:
    """What the server counted between two ModelStatistics answers (Triton's cumulative semantics)."""
    a, b = _totals(before), _totals(after)
    n = b["success"] - a["success"]

    def mean(key: str) -> float:
        return (b[key] - a[key]) / n / 1000.0 if n > 0 else 0.0

    hist = {k: v - a["batches"].get(k, 0) for k, v in sorted(b["batches"].items()) if v - a["batches"].get(k, 0)}
    return ServerStats(
        requests=n,
        executions=b["executions"] - a["executions"],
        inferences=b["inferences"] - a["inferences"],
        queue_us=mean("queue_ns"),
        compute_us=mean("input_ns") + mean("infer_ns") + mean("output_ns"),
        compute_input_us=mean("input_ns"),
        compute_infer_us=mean("infer_ns"),
        compute_output_us=mean("output_ns"),
        batch_sizes=hist,
    )


def describe_model(config: BenchConfig) -> ModelShape:
    """Metadata (required) and config (optional: MLServer has no ModelConfig RPC) of the model under test."""
    with InferenceClient(
        config.server, timeout=config.deadline_s, tls=config.tls, headers=dict(config.headers)
    ) as client:
        meta = client.metadata(config.model, config.version or None)
        try:
            max_batch: int | None = client.config(config.model, config.version or None).max_batch_size
        except TensorgateClientError:
            max_batch = None
    return ModelShape.from_metadata(meta, max_batch)


def _split(total: int, parts: int, index: int) -> int:
    return total // parts + (1 if index < total % parts else 0)


def worker_levels(config: BenchConfig, value: float, start: float) -> list[Level]:
    """Each worker's share of one level: concurrency, rate, in-flight cap and request budget split evenly."""
    w = config.workers
    out = []
    for i in range(w):
        budget = None if config.max_requests is None else _split(config.max_requests, w, i)
        base = Level(
            mode=config.mode,
            start=start,
            warmup_s=config.warmup_s,
            duration_s=config.duration_s,
            max_requests=budget,
            max_in_flight=max(1, _split(config.max_in_flight, w, i)),
            arrival=config.arrival,
            seed=config.seed * 1000 + i * 7919 + int(value),
        )
        if config.mode == "closed":
            out.append(replace(base, concurrency=_split(int(value), w, i)))
        else:
            # Constant arrivals interleave: worker i starts i/rate after worker 0.
            out.append(replace(base, rate=value / w, phase_s=i / value))
    return out


class _Stats:
    """Best-effort ModelStatistics: None when the server does not answer it."""

    def __init__(self, config: BenchConfig) -> None:
        self.config = config
        self.client = InferenceClient(
            config.server, timeout=min(config.deadline_s, 10.0), tls=config.tls, headers=dict(config.headers)
        )
        self.enabled = True

    def read(self) -> pb.ModelStatisticsResponse | None:
        if not self.enabled:
            return None
        try:
            return self.client.statistics(self.config.model, self.config.version or None)
        except TensorgateClientError:
            self.enabled = False
            return None

    def close(self) -> None:
        self.client.close()


ProgressFn = Callable[[str], None]


def _stderr_progress(stream: TextIO | None = None) -> ProgressFn:
    def show(line: str) -> None:
        print(line, file=stream or sys.stderr, flush=True)

    return show


def run_sweep(config: BenchConfig, progress: ProgressFn | None = None) -> SweepResult:
    """Run every level of the sweep; Ctrl-C (SIGINT) ends the current level early and skips the rest."""
    show = progress or _stderr_progress()
    model = describe_model(config)
    inputs = make_inputs(model, config.batch, config.inputs, config.seed)
    target = Target(
        server=config.server,
        model=config.model,
        version=config.version,
        inputs=inputs,
        streaming=config.streaming,
        priority=config.priority,
        timeout_param_us=config.timeout_param_us,
        deadline_s=config.deadline_s,
        tls=config.tls,
        headers=config.headers,
        nice=config.nice,
    )
    started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    counters = ctx.Array("q", COUNTERS * config.workers, lock=False)
    conns: list[Connection] = []
    procs: list[Any] = []
    interrupted = False

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        nonlocal interrupted
        if interrupted:  # a second Ctrl-C: give up at once
            raise KeyboardInterrupt
        interrupted = True
        stop.set()
        show("interrupted: finishing the current level for a partial report (Ctrl-C again to abort)")

    # Signal handlers belong to the main thread; elsewhere (an embedding application) Ctrl-C stays as it was.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if main_thread else None
    stats = _Stats(config)
    results: list[LevelResult] = []
    try:
        for i in range(config.workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=worker_main, args=(i, child, counters, stop), name=f"tensorgate-bench-{i}", daemon=True
            )
            proc.start()
            child.close()
            parent.send(target)
            conns.append(parent)
            procs.append(proc)
        for conn in conns:
            if not conn.poll(READY_TIMEOUT_S):
                raise RuntimeError("a load process did not start in time")
            conn.recv()
        for value in config.levels():
            if interrupted:
                break
            results.append(_run_level(config, value, model, conns, counters, stats, show, lambda: interrupted))
            results[-1].interrupted = interrupted
    finally:
        for conn in conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        stats.close()
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    return SweepResult(config, model, results, interrupted, started_at)


def _run_level(
    config: BenchConfig,
    value: float,
    model: ModelShape,
    conns: Sequence[Connection],
    counters: Any,
    stats: _Stats,
    show: ProgressFn,
    interrupted: Callable[[], bool],
) -> LevelResult:
    label = f"c={int(value)}" if config.mode == "closed" else f"rate={value:g}/s"
    for i in range(len(counters)):
        counters[i] = 0
    start = time.monotonic() + 0.1
    for conn, level in zip(conns, worker_levels(config, value, start), strict=True):
        conn.send(level)
    window_start = start + config.warmup_s
    show(f"[{label}] warming up for {config.warmup_s:g}s")
    before = None
    parts: dict[int, Samples] = {}
    # A line a second; more often in short levels, so that each level shows at least one.
    every = min(1.0, max(0.25, config.duration_s / 4))
    next_line = window_start + every
    while len(parts) < len(conns):
        now = time.monotonic()
        if before is None and now >= window_start:
            before = stats.read()
            next_line = time.monotonic() + every
        for i, conn in enumerate(conns):
            if i not in parts and conn.poll(0):
                parts[i] = conn.recv()
        if now >= next_line:
            show(_progress_line(label, now - window_start, config, counters))
            next_line += every
        if len(parts) < len(conns):
            mp.connection.wait([c for i, c in enumerate(conns) if i not in parts], timeout=0.05)
    after = stats.read() if before is not None else None
    merged = merge(parts[i] for i in sorted(parts))
    server = stats_delta(before, after) if before is not None and after is not None else None
    return LevelResult(config.mode, value, merged, server, config.batch, interrupted())


def _progress_line(label: str, elapsed: float, config: BenchConfig, counters: Any) -> str:
    sent = ok = failed = dropped = 0
    for w in range(config.workers):
        sent += counters[w * COUNTERS]
        ok += counters[w * COUNTERS + 1]
        failed += counters[w * COUNTERS + 2]
        dropped += counters[w * COUNTERS + 3]
    rate = ok / elapsed if elapsed > 0 else 0.0
    line = f"[{label}] {elapsed:5.1f}/{config.duration_s:g}s sent {sent} ok {ok} failed {failed}"
    if config.mode == "open":
        line += f" dropped {dropped}"
    return line + f" ({rate:,.0f} req/s)"
