"""The sweep: start the load processes, run each level (concurrency or rate), merge their samples exactly, and
read the server's ModelStatistics around each measurement window.

A load process that dies (the OOM killer, a signal, a crash) ends the sweep with ``SweepResult.error`` set: the
levels measured before it are kept, since they are as valid as in a sweep that ran to the end, and the level it
was part of is dropped, since its samples are missing that process's share.
"""

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
from tensorgate.loadtest.inputs import InputError, ModelShape, make_inputs
from tensorgate.loadtest.samples import Samples, merge
from tensorgate.loadtest.worker import COUNTERS, RECONNECT_OPTIONS, Level, Target, worker_main
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos import model_config_pb2 as mc

__all__ = ["BenchConfig", "LevelResult", "ServerStats", "SweepResult", "WorkerDied", "run_sweep", "stats_delta"]

READY_TIMEOUT_S = 60.0


class WorkerDied(RuntimeError):
    """A load process ended in the middle of the sweep: killed (the OOM killer sends SIGKILL) or crashed."""

    def __init__(self, index: int, pid: int | None, exitcode: int | None, during: str) -> None:
        self.index = index
        self.pid = pid
        self.exitcode = exitcode
        """As ``multiprocessing`` gives it: -N when signal N ended the process, None if it was not reaped."""
        self.during = during
        """The level it died in ("c=8", "rate=500/s"), or "start-up"."""
        super().__init__(f"load process {index} (pid {pid}) {_how_it_ended(exitcode)} during {during}")


def _how_it_ended(exitcode: int | None) -> str:
    if exitcode is None:
        return "closed its pipe"
    if exitcode >= 0:
        return f"exited with code {exitcode}"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = f"signal {-exitcode}"
    hint = "; the OOM killer sends SIGKILL" if exitcode == -signal.SIGKILL else ""
    return f"was killed by {name} (exit code {exitcode}{hint})"


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
    shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    """--shape NAME:D1,D2: the variable dimensions of random and zeros inputs (after the batch one)."""
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
    sequence_length: int | None = None
    """Requests per sequence against a sequence model (None: DEFAULT_SEQUENCE_LENGTH)."""

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
                "sequence_length",
            )
        }
        out["shapes"] = {name: list(dims) for name, dims in self.shapes}
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
    error: WorkerDied | None = None
    """Why the sweep stopped early, if a load process died; ``levels`` are those measured before."""


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
            model_config = client.config(config.model, config.version or None)
        except TensorgateClientError:
            return ModelShape.from_metadata(meta, None)
    if model_config.model_transaction_policy.decoupled:
        raise InputError(
            f"model '{config.model}' is decoupled: it answers a request with any number of responses, over "
            "ModelStreamInfer only, which tensorgate bench does not measure (perf_analyzer --streaming does)"
        )
    shape = ModelShape.from_metadata(meta, model_config.max_batch_size)
    ids = "int64"
    for entry in model_config.sequence_batching.control_input:
        for control in entry.control:
            if control.kind == mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_CORRID:
                ids = _CORRID_IDS.get(control.data_type, "int64")
    return replace(shape, sequence=model_config.HasField("sequence_batching"), sequence_ids=ids)


_CORRID_IDS = {mc.TYPE_STRING: "string", mc.TYPE_INT32: "int32", mc.TYPE_UINT32: "uint32"}


DEFAULT_SEQUENCE_LENGTH = 20
"""Requests per sequence against a sequence model, unless --sequence-length says otherwise (perf_analyzer's)."""


def sequence_length(config: BenchConfig, model: ModelShape) -> int:
    """How many requests each sequence has (0: the requests are in no sequence); InputError for load that cannot
    be sent in sequences."""
    if not model.sequence:
        if config.sequence_length is not None:
            raise InputError(f"model '{config.model}' is not a sequence model: --sequence-length is for those")
        return 0
    if config.mode == "open":
        raise InputError(
            f"model '{config.model}' is a sequence (stateful) model: its requests go one after another in each "
            "sequence, so load it in closed loop (--concurrency: one sequence per request in flight), not --rate"
        )
    return config.sequence_length or DEFAULT_SEQUENCE_LENGTH


def _shares(total: int, weights: Sequence[int]) -> list[int]:
    """``total`` in whole parts proportional to ``weights`` that add up to it (largest remainders get the rest,
    ties to the lower index); a zero weight gets nothing."""
    whole = sum(weights)
    if whole <= 0:
        return [0] * len(weights)
    out = [total * w // whole for w in weights]
    by_remainder = sorted(range(len(weights)), key=lambda i: -(total * weights[i] % whole))
    for i in by_remainder[: total - sum(out)]:
        out[i] += 1
    return out


def worker_levels(config: BenchConfig, value: float, start: float) -> list[Level]:
    """Each worker's share of one level: concurrency, rate and in-flight cap split evenly, and the request budget
    in proportion to the load each worker sends.

    The budget follows the load because a worker that sends nothing at this level (concurrency 1 over 4 workers)
    would otherwise keep its share unused and the level would end short of ``--max-requests``; in proportion, the
    workers also run out at about the same time.
    """
    w = config.workers
    even = [1] * w
    concurrency = _shares(int(value), even) if config.mode == "closed" else even
    budgets = None if config.max_requests is None else _shares(config.max_requests, concurrency)
    in_flight = _shares(config.max_in_flight, even)
    out = []
    for i in range(w):
        base = Level(
            mode=config.mode,
            start=start,
            warmup_s=config.warmup_s,
            duration_s=config.duration_s,
            max_requests=None if budgets is None else budgets[i],
            max_in_flight=max(1, in_flight[i]),
            arrival=config.arrival,
            seed=config.seed * 1000 + i * 7919 + int(value),
        )
        if config.mode == "closed":
            out.append(replace(base, concurrency=concurrency[i]))
        else:
            # Constant arrivals interleave: worker i starts i/rate after worker 0.
            out.append(replace(base, rate=value / w, phase_s=i / value))
    return out


class _Stats:
    """Best-effort ModelStatistics: None when the server does not answer it.

    After a failed read the level's other reads are skipped (a server that does not answer could cost a deadline
    each), and the next level tries again (``next_level``): a server restarted or busy during one level answers for
    the next."""

    def __init__(self, config: BenchConfig) -> None:
        self.config = config
        self.client = InferenceClient(
            config.server,
            timeout=min(config.deadline_s, 10.0),
            tls=config.tls,
            headers=dict(config.headers),
            channel_options=RECONNECT_OPTIONS,  # a restarted server is read again within a second, as it is loaded
        )
        self.enabled = True

    def next_level(self) -> None:
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


class _Workers:
    """The load processes and their pipes. A process found gone before it answered (its pipe at end of file, or
    its sentinel ready) is raised as ``WorkerDied``, never as the pipe's EOFError."""

    def __init__(self, ctx: Any, counters: Any, stop: Any) -> None:
        self.ctx = ctx
        self.counters = counters
        self.stop = stop
        self.conns: list[Connection] = []
        self.procs: list[Any] = []

    def __len__(self) -> int:
        return len(self.conns)

    def start(self, count: int, target: Target) -> None:
        for i in range(count):
            parent, child = self.ctx.Pipe()
            proc = self.ctx.Process(
                target=worker_main,
                args=(i, child, self.counters, self.stop),
                name=f"tensorgate-bench-{i}",
                daemon=True,
            )
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
            self.send(i, target, "start-up")
        for i in range(count):
            if not mp.connection.wait([self.conns[i], self.procs[i].sentinel], READY_TIMEOUT_S):
                raise RuntimeError("a load process did not start in time")
            self.poll(i, "start-up")

    def send(self, i: int, message: Any, during: str) -> None:
        try:
            self.conns[i].send(message)
        except OSError:
            raise self.died(i, during) from None

    def poll(self, i: int, during: str) -> Any:
        """Process ``i``'s message if one has come, else None; WorkerDied if the process is gone without one."""
        # Alive first, then the pipe: what a process sent before it died is read, not lost.
        alive = self.procs[i].is_alive()
        conn = self.conns[i]
        if conn.poll(0):
            try:
                return conn.recv()
            except (EOFError, OSError):  # closed, or cut in the middle of a message
                raise self.died(i, during) from None
        if not alive:
            raise self.died(i, during)
        return None

    def wait(self, pending: Sequence[int], timeout: float) -> None:
        """Until one of ``pending`` has a message or has ended, or ``timeout``."""
        objects: list[Any] = [self.conns[i] for i in pending] + [self.procs[i].sentinel for i in pending]
        mp.connection.wait(objects, timeout=timeout)

    def died(self, i: int, during: str) -> WorkerDied:
        proc = self.procs[i]
        proc.join(5)  # reaped: its exit code is known
        return WorkerDied(i, proc.pid, proc.exitcode, during)

    def close(self, abandon: bool) -> None:
        """Ask each process to end and wait for it; ``abandon`` (after a death) ends them at once instead.

        Abandoned processes are in a level whose results are dropped, and the shared stop event cannot end them:
        its lock may have died with the dead process's hold on it, and setting it could then block forever.
        """
        if not abandon:
            for conn in self.conns:
                try:
                    conn.send(None)
                except OSError:
                    pass
            for proc in self.procs:
                proc.join(10)
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for conn in self.conns:
            conn.close()


ProgressFn = Callable[[str], None]


def _stderr_progress(stream: TextIO | None = None) -> ProgressFn:
    def show(line: str) -> None:
        print(line, file=stream or sys.stderr, flush=True)

    return show


def run_sweep(config: BenchConfig, progress: ProgressFn | None = None) -> SweepResult:
    """Run every level of the sweep; Ctrl-C (SIGINT) ends the current level early and skips the rest, and a load
    process that dies ends the sweep with the levels measured before (``SweepResult.error``)."""
    show = progress or _stderr_progress()
    model = describe_model(config)
    length = sequence_length(config, model)
    config = replace(config, sequence_length=length or None)
    inputs = make_inputs(model, config.batch, config.inputs, config.seed, dict(config.shapes))
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
        sequence_length=length,
        sequence_ids=model.sequence_ids,
    )
    started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    counters = ctx.Array("q", COUNTERS * config.workers, lock=False)
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
    workers = _Workers(ctx, counters, stop)
    error: WorkerDied | None = None
    try:
        try:
            workers.start(config.workers, target)
            for value in config.levels():
                if interrupted:
                    break
                results.append(_run_level(config, value, model, workers, counters, stats, show, lambda: interrupted))
                results[-1].interrupted = interrupted
        except WorkerDied as exc:
            error = exc
    finally:
        workers.close(abandon=error is not None)
        stats.close()
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    return SweepResult(config, model, results, interrupted, started_at, error)


def _run_level(
    config: BenchConfig,
    value: float,
    model: ModelShape,
    workers: _Workers,
    counters: Any,
    stats: _Stats,
    show: ProgressFn,
    interrupted: Callable[[], bool],
) -> LevelResult:
    label = f"c={int(value)}" if config.mode == "closed" else f"rate={value:g}/s"
    for i in range(len(counters)):
        counters[i] = 0
    stats.next_level()
    # Without a warm-up the window opens with the first request: the server's counters are read before any is
    # sent, so its view covers exactly the requests counted here (read at the window's start instead, the first
    # answers could land before it: 48 of 50 requests, seen once in CI). After a warm-up they are read when the
    # window opens, and requests in flight across it may count on either side.
    before = stats.read() if config.warmup_s == 0 else None
    start = time.monotonic() + 0.1
    for i, level in enumerate(worker_levels(config, value, start)):
        workers.send(i, level, label)
    window_start = start + config.warmup_s
    show(f"[{label}] warming up for {config.warmup_s:g}s")
    parts: dict[int, Samples] = {}
    # A line a second; more often in short levels, so that each level shows at least one.
    every = min(1.0, max(0.25, config.duration_s / 4))
    next_line = window_start + every
    while len(parts) < len(workers):
        now = time.monotonic()
        if before is None and now >= window_start:
            before = stats.read()
            next_line = time.monotonic() + every
        for i in range(len(workers)):
            if i not in parts and (part := workers.poll(i, label)) is not None:
                parts[i] = part
        if now >= next_line:
            show(_progress_line(label, now - window_start, config, counters))
            next_line += every
        if len(parts) < len(workers):
            workers.wait([i for i in range(len(workers)) if i not in parts], timeout=0.05)
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
