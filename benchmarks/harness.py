"""Shared pieces of the benchmarks: start servers on loopback, drive them with perf_analyzer (or, where it is
missing, one closed-loop level of the load-test harness, tensorgate.loadtest), read server statistics and CPU
use, write reports.

Every run is bounded (perf_analyzer's measurement windows and trial cap, or a fixed duration) and targets
127.0.0.1 only.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

import grpc
import numpy as np

from tensorgate.protos import GRPCInferenceServiceStub
from tensorgate.protos import grpc_service_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
# TENSORGATE_PERF_ANALYZER names a perf_analyzer to run as it is (one from a Triton SDK image, or one carried to
# a host with no package index); otherwise the wrapper installs and runs its pinned one.
PA = Path(os.environ.get("TENSORGATE_PERF_ANALYZER") or ROOT / "benchmarks" / "perf_analyzer.sh")
RESULTS = ROOT / "benchmarks" / "results"
_PORT = re.compile(r"listening on \S+:(\d+)")


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        """User + system CPU time so far of the server process and its live descendants (Linux /proc): a server
        that hands work to a child process (tensorgate's span exporter) is charged for it."""
        return sum(self.cpu_split())

    def cpu_split(self) -> tuple[float, float]:
        """cpu_seconds as (the server process, its live descendants): what a child process costs is work that a
        machine with spare cores would run beside the server rather than in its place."""
        own, *descendants = _tree(self.proc.pid)
        return _cpu_seconds(own), sum(_cpu_seconds(pid) for pid in descendants)


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _cpu_seconds(pid: int) -> float:
    try:
        fields = _stat(pid)
    except (FileNotFoundError, ProcessLookupError):  # exited meanwhile
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree(root: int) -> list[int]:
    """`root` and its live descendants."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents.setdefault(int(_stat(int(entry.name))[1]), []).append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError):
                continue
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(parents.get(pid, ()))
    return found


@contextmanager
def start_server(cmd: Sequence[str], ready_pattern: str = "ready", timeout: float = 120.0) -> Iterator[Server]:
    """Run a server command that logs `listening on HOST:PORT`; stop it with SIGTERM afterwards."""
    log = Path(tempfile.mkstemp(prefix="bench-server-", suffix=".log")[1])
    with log.open("wb") as out:
        proc = subprocess.Popen(
            list(cmd), stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    try:
        deadline = time.monotonic() + timeout
        port = None
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            m = _PORT.search(text)
            if m:
                port = int(m.group(1))
            if port is not None and ready_pattern in text:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{text}")
            time.sleep(0.1)
        else:
            raise RuntimeError(f"server not ready within {timeout}s:\n{log.read_text(errors='replace')}")
        yield Server(proc, port, log)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def perf_analyzer_available() -> bool:
    if os.environ.get("TENSORGATE_BENCH_NO_PA"):
        return False
    try:
        return subprocess.run([str(PA), "--version"], capture_output=True, timeout=300).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@dataclass
class Measurement:
    """One load run, as the client saw it; latencies in microseconds."""

    infer_per_s: float
    p50_us: float
    p90_us: float
    p99_us: float
    server_queue_us: float = 0.0
    server_compute_us: float = 0.0
    """Compute input + infer + output; input alone below (stacking requests into one batch, off the event loop)."""
    server_compute_input_us: float = 0.0
    server_cpu_cores: float = 0.0
    server_child_cpu_cores: float = 0.0
    """The part of server_cpu_cores used by the server's child processes (tensorgate's span exporter)."""
    client_cpu_cores: float = 0.0
    batch_sizes: dict[int, int] = field(default_factory=dict)
    tool: str = "perf_analyzer"


def run_perf_analyzer(
    address: str,
    model: str,
    concurrency: int,
    rows: int,
    streaming: bool,
    window_ms: int = 2000,
    stability_percent: float = 100,
) -> Measurement:
    """One perf_analyzer run (closed loop at `concurrency`), its CSV row parsed.

    perf_analyzer fails when no window is within `stability_percent` of its neighbours; on a busy shared machine a
    larger value (e.g. 1000) lets it report the last windows instead of failing."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pa.csv"
        args = [
            str(PA),
            "-i",
            "grpc",
            "-u",
            address,
            "-m",
            model,
            "-b",
            str(rows),
            "--concurrency-range",
            f"{concurrency}:{concurrency}",
            "--measurement-interval",
            str(window_ms),
            "--stability-percentage",
            str(stability_percent),
            "--max-trials",
            "4",
            "-f",
            str(out),
        ]
        if streaming:
            args += ["--async", "--streaming"]
        before = os.times()
        proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
        after = os.times()
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(
                f"perf_analyzer failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}"
            )
        row = next(csv.DictReader(out.open()))
    client_cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    # perf_analyzer reports per batch; with -b ROWS, Inferences/Second already counts rows.
    return Measurement(
        infer_per_s=float(row["Inferences/Second"]),
        p50_us=float(row["p50 latency"]),
        p90_us=float(row["p90 latency"]),
        p99_us=float(row["p99 latency"]),
        # The server columns exist only when the server lists the `statistics` extension.
        server_queue_us=float(row.get("Server Queue", 0)),
        server_compute_us=sum(
            float(row.get(k, 0)) for k in ("Server Compute Input", "Server Compute Infer", "Server Compute Output")
        ),
        server_compute_input_us=float(row.get("Server Compute Input", 0)),
        client_cpu_cores=client_cpu,  # divided by wall time by the caller
    )


def run_python_load(
    address: str,
    model: str,
    concurrency: int,
    rows: int,
    streaming: bool,
    duration: float = 4.0,
    inputs: dict[str, np.ndarray] | None = None,
) -> Measurement:
    """The fallback where perf_analyzer cannot run: one closed-loop level of `tensorgate bench`
    (tensorgate.loadtest), one load process with its own grpc.aio channel, zero-filled inputs unless given."""
    from tensorgate.loadtest import BenchConfig, run_sweep
    from tensorgate.loadtest.report import level_dict

    with tempfile.TemporaryDirectory() as tmp:
        for name, array in (inputs or {}).items():
            np.save(Path(tmp) / f"{name}.npy", array)
        config = BenchConfig(
            model=model,
            server=address,
            concurrency=(concurrency,),
            duration_s=duration,
            warmup_s=0.5,
            batch=rows,
            inputs=tmp if inputs else "zeros",
            streaming=streaming,
            workers=1,
        )
        (level,) = (level_dict(lv) for lv in run_sweep(config, progress=lambda line: None).levels)
    if level["failed"] or not level["succeeded"]:
        raise RuntimeError(f"python load run failed: {level['failed']}")
    lat = level["latency_ms"]
    return Measurement(
        infer_per_s=level["rows_per_s"],
        p50_us=lat["p50"] * 1000,
        p90_us=lat["p90"] * 1000,
        p99_us=lat["p99"] * 1000,
        client_cpu_cores=level["client_cpu_cores"],
        tool="tensorgate-bench",
    )


def batch_histogram(address: str, model: str) -> dict[int, int]:
    """Executed batch sizes so far, from ModelStatistics (Triton's batch_stats)."""
    with grpc.insecure_channel(address) as channel:
        stats = GRPCInferenceServiceStub(channel).ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=10)
    hist: dict[int, int] = {}
    for ms in stats.model_stats:
        for b in ms.batch_stats:
            hist[b.batch_size] = hist.get(b.batch_size, 0) + b.compute_infer.count
    return hist


def measure(
    server: Server,
    model: str,
    concurrency: int,
    rows: int,
    streaming: bool,
    use_pa: bool,
    stats: bool = True,
    stability_percent: float = 100,
) -> Measurement:
    """One run with server CPU and executed batch sizes attached."""
    hist0 = batch_histogram(server.address, model) if stats else {}
    (own0, child0), t0 = server.cpu_split(), time.perf_counter()
    if use_pa:
        m = run_perf_analyzer(server.address, model, concurrency, rows, streaming, stability_percent=stability_percent)
    else:
        m = run_python_load(server.address, model, concurrency, rows, streaming)
    wall = time.perf_counter() - t0
    own1, child1 = server.cpu_split()
    m.server_cpu_cores = (own1 - own0 + child1 - child0) / wall
    m.server_child_cpu_cores = (child1 - child0) / wall
    if use_pa:
        m.client_cpu_cores /= wall
    if stats:
        hist1 = batch_histogram(server.address, model)
        m.batch_sizes = {k: v - hist0.get(k, 0) for k, v in sorted(hist1.items()) if v - hist0.get(k, 0)}
    return m


@dataclass
class Summary:
    """Medians over repeats of one configuration; batch-size histograms are summed."""

    infer_per_s: float
    p50_us: float
    p90_us: float
    p99_us: float
    server_queue_us: float
    server_compute_us: float
    server_compute_input_us: float
    server_cpu_cores: float
    server_child_cpu_cores: float
    client_cpu_cores: float
    batch_sizes: dict[int, int]
    mean_batch: float | None
    tool: str
    runs: list[Measurement]


def median_of(runs: Sequence[Measurement]) -> Summary:
    med = {
        k: statistics.median(getattr(r, k) for r in runs)
        for k in (
            "infer_per_s",
            "p50_us",
            "p90_us",
            "p99_us",
            "server_queue_us",
            "server_compute_us",
            "server_compute_input_us",
            "server_cpu_cores",
            "server_child_cpu_cores",
            "client_cpu_cores",
        )
    }
    hist: dict[int, int] = {}
    for r in runs:
        for k, v in r.batch_sizes.items():
            hist[k] = hist.get(k, 0) + v
    mean = (sum(k * v for k, v in hist.items()) / sum(hist.values())) if hist else None
    return Summary(**med, batch_sizes=dict(sorted(hist.items())), mean_batch=mean, tool=runs[0].tool, runs=list(runs))


SUMMARY_HEADER = (
    "| run | infer/s | p50 | p90 | p99 | queue / compute us | mean batch | cores server / client |\n"
    "|---|---|---|---|---|---|---|---|"
)


def summary_cells(r: Summary) -> str:
    """One Summary as the cells under SUMMARY_HEADER after the run's label: latencies in ms, server queue and
    compute in microseconds, cores as CPU seconds per wall second."""
    mean = "" if r.mean_batch is None else f"{r.mean_batch:.1f}"
    return (
        f"{r.infer_per_s:,.0f} | {r.p50_us / 1000:.2f} | {r.p90_us / 1000:.2f} | {r.p99_us / 1000:.2f} | "
        f"{r.server_queue_us:.0f} / {r.server_compute_us:.0f} | {mean} | "
        f"{r.server_cpu_cores:.2f} / {r.client_cpu_cores:.2f}"
    )


def _jsonable(o: object) -> object:
    if is_dataclass(o) and not isinstance(o, type):
        return asdict(o)
    return str(o)


def write_report(name: str, payload: object, markdown: str) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    js = RESULTS / f"{name}.json"
    md = RESULTS / f"{name}.md"
    js.write_text(json.dumps(payload, indent=2, default=_jsonable))
    md.write_text(markdown)
    return js, md


def python_cmd() -> list[str]:
    return [sys.executable]


def tensorgate_cmd(repo: Path, *extra: str) -> list[str]:
    exe = shutil.which("tensorgate", path=str(Path(sys.executable).parent))
    # Without the console script (a checkout on PYTHONPATH rather than installed) the module runs the same CLI.
    cli = [exe] if exe else [sys.executable, "-m", "tensorgate.server.cli"]
    # A free metrics port too: benchmarks run several servers side by side (a later flag in `extra` wins).
    return [*cli, "serve", "--model-repository", str(repo), "--grpc-port", "0", "--metrics-port", "0", *extra]


def tree_cmd(tree: Path, repo: Path) -> list[str]:
    """`tensorgate serve` from another checkout: its packages come first on the path, ahead of the editable
    install of this one (setuptools' editable finder is consulted after the path)."""
    mapped = tree / "build" / "mypy"
    if not (mapped / "tensorgate" / "server").exists():
        raise SystemExit(f"{mapped}/tensorgate/server is missing: run `make build/mypy/tensorgate` in {tree}")
    serve = tensorgate_cmd(repo)[1:]
    return ["env", f"PYTHONPATH={mapped}", sys.executable, "-m", "tensorgate.server.cli", *serve]
