"""Memory soak: does the server's resident memory keep growing with traffic of one kind? For each kind (successes,
each error, cancellations, deadlines, new connections, streams, tracing, capture, shared memory and load/unload
cycles) it sends ROUNDS rounds of CALLS calls and reads the server's VmRSS after each round; the figure is the slope
of RSS against calls over the rounds after the warm-up ones, in KiB per 1,000 calls. A kind whose memory has
settled shows a slope near zero (allocator noise: tens of KiB either way); a leak shows the same positive slope
in every window, and grows with --rounds.

    .venv/bin/python benchmarks/soak.py [--rounds 12] [--calls 600] [--warmup-rounds 4] [--kinds unary_ok,...]
        [--tree OTHER_CHECKOUT]

Three servers on loopback, each `tensorgate serve` in its own process: a plain one (explicit model control, system
shared memory, the example MLP, two slow models and a model to load and unload), one tracing every call to an
OTLP sink in this process, and one capturing every prediction (--data-dir). The kinds run one after another on
their server, so a later kind starts from the heap the earlier ones left: only the slope within a kind counts.

Writes benchmarks/results/soak.json and soak.md.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.batching import EXAMPLE  # noqa: E402
from benchmarks.harness import Server, start_server, tensorgate_cmd, tree_cmd, write_report  # noqa: E402
from tensorgate.protos import GRPCInferenceServiceStub  # noqa: E402
from tensorgate.protos import grpc_service_pb2 as pb  # noqa: E402
from tests.onnx_models import ADD_SUB_CONFIG, add_sub_model, paced_model, write_config  # noqa: E402
from tests.otlp_sinks import grpc_sink  # noqa: E402

PACED = """max_batch_size: 1
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU, count: 1 } ]
"""
BOUNDED_QUEUE = "dynamic_batching { default_queue_policy { max_queue_size: 2 } }\n"
"""`full`: at most two requests wait, so a burst of slow ones is mostly refused (RESOURCE_EXHAUSTED)."""
SLOW_UNIT = 0.5
"""INPUT0 of a slow request: the paced models run INPUT0 * 2000 rounds of a small MatMul (a few milliseconds)."""
SHM_BYTES = 4096
MAX_ELEMENTS = 256 * 256
"""The plain server's --max-tensor-elements: 256 rows of the MLP's 256 inputs."""

Call = Callable[["Clients", int], Awaitable[grpc.StatusCode]]


@dataclass
class Clients:
    """One channel per server, shared by the calls of every kind but `new_connection`."""

    addresses: dict[str, str]
    stubs: dict[str, GRPCInferenceServiceStub] = field(default_factory=dict)
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    shm_dir: Path = Path("/dev/shm")
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def stub(self, server: str) -> GRPCInferenceServiceStub:
        if server not in self.stubs:
            channel = grpc.aio.insecure_channel(self.addresses[server])
            self.channels.append(channel)
            self.stubs[server] = GRPCInferenceServiceStub(channel)
        return self.stubs[server]

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


def _mlp_request(i: int, rows: int = 1, width: int = 256, datatype: str = "FP32", model: str = "mlp") -> Any:
    data = np.full((rows, width), 0.25, np.float32 if datatype == "FP32" else np.int32)
    return pb.ModelInferRequest(
        model_name=model,
        id=f"req-{i}",  # caller-chosen ids: a structure keyed by them must not outlive the call
        inputs=[pb.ModelInferRequest.InferInputTensor(name="INPUT0", datatype=datatype, shape=[rows, width])],
        raw_input_contents=[data.tobytes()],
    )


def _slow_request(i: int, model: str) -> Any:
    return pb.ModelInferRequest(
        model_name=model,
        id=f"slow-{i}",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="INPUT0", datatype="FP32", shape=[1, 1])],
        raw_input_contents=[np.array([[SLOW_UNIT]], np.float32).tobytes()],
    )


async def _code(call: Awaitable[object]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    except asyncio.CancelledError:  # a call this client cancelled (not this task)
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.OK


async def unary_ok(c: Clients, i: int) -> grpc.StatusCode:
    return await _code(c.stub("plain").ModelInfer(_mlp_request(i), timeout=30))


async def not_found(c: Clients, i: int) -> grpc.StatusCode:
    # A new name every call: what a typo'd or hostile client sends; nothing keyed by it may stay.
    return await _code(c.stub("plain").ModelInfer(_mlp_request(i, model=f"nope-{c.run_id}-{i}"), timeout=30))


async def bad_shape(c: Clients, i: int) -> grpc.StatusCode:
    return await _code(c.stub("plain").ModelInfer(_mlp_request(i, width=255), timeout=30))


async def bad_datatype(c: Clients, i: int) -> grpc.StatusCode:
    return await _code(c.stub("plain").ModelInfer(_mlp_request(i, datatype="INT32"), timeout=30))


async def too_large(c: Clients, i: int) -> grpc.StatusCode:
    # 257 rows of 256 > --max-tensor-elements on the plain server: RESOURCE_EXHAUSTED before the queue. A large
    # request (257 KiB), as oversized ones are: whatever keeps a refused call alive keeps this much.
    return await _code(c.stub("plain").ModelInfer(_mlp_request(i, rows=257), timeout=30))


async def queue_full(c: Clients, i: int) -> grpc.StatusCode:
    return await _code(c.stub("plain").ModelInfer(_slow_request(i, "full"), timeout=30))


async def cancelled(c: Clients, i: int) -> grpc.StatusCode:
    call = c.stub("plain").ModelInfer(_slow_request(i, "slow"), timeout=30)
    await asyncio.sleep(0.002 * (i % 3))  # queued, running, or just arrived
    call.cancel()
    return await _code(call)


async def deadline_queued(c: Clients, i: int) -> grpc.StatusCode:
    # Run at concurrency 8 on a one-instance model taking a few ms: most calls wait in the queue past 10 ms.
    return await _code(c.stub("plain").ModelInfer(_slow_request(i, "slow"), timeout=0.010))


async def new_connection(c: Clients, i: int) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(c.addresses["plain"]) as channel:
        return await _code(GRPCInferenceServiceStub(channel).ModelInfer(_mlp_request(i), timeout=30))


STREAM_LEN = 4


async def _stream(c: Clients, i: int, model: str) -> grpc.StatusCode:
    """One ModelStreamInfer call of STREAM_LEN requests; the call's code is OK only if every response is."""
    requests = [_mlp_request(i * STREAM_LEN + k, model=model) for k in range(STREAM_LEN)]
    call = c.stub("plain").ModelStreamInfer(iter(requests), timeout=30)
    errors = 0
    try:
        async for response in call:
            errors += bool(response.error_message)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK if not errors else grpc.StatusCode.NOT_FOUND


async def stream_ok(c: Clients, i: int) -> grpc.StatusCode:
    return await _stream(c, i, "mlp")


async def stream_errors(c: Clients, i: int) -> grpc.StatusCode:
    return await _stream(c, i, f"nope-{c.run_id}-{i}")


async def stream_cancelled(c: Clients, i: int) -> grpc.StatusCode:
    """A stream the client drops after its first response, the rest still in flight."""
    requests = [_slow_request(i * STREAM_LEN + k, "slow") for k in range(STREAM_LEN)]
    call = c.stub("plain").ModelStreamInfer(iter(requests), timeout=30)
    try:
        async for _ in call:
            break
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    call.cancel()
    return grpc.StatusCode.CANCELLED


async def traced_ok(c: Clients, i: int) -> grpc.StatusCode:
    return await _code(c.stub("traced").ModelInfer(_mlp_request(i), timeout=30))


async def captured_ok(c: Clients, i: int) -> grpc.StatusCode:
    return await _code(c.stub("capture").ModelInfer(_mlp_request(i), timeout=30))


async def shm_cycle(c: Clients, i: int) -> grpc.StatusCode:
    """Register a region, read its status, unregister it: each region holds a descriptor while registered."""
    key = f"tg-soak-{c.run_id}-{i % 8}"
    (c.shm_dir / key).write_bytes(bytes(SHM_BYTES))
    stub = c.stub("plain")
    name = f"region-{c.run_id}-{i}"
    try:
        code = await _code(
            stub.SystemSharedMemoryRegister(
                pb.SystemSharedMemoryRegisterRequest(name=name, key=f"/{key}", offset=0, byte_size=SHM_BYTES),
                timeout=30,
            )
        )
        await _code(stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=30))
        unregistered = await _code(
            stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name=name), timeout=30)
        )
        return code if code != grpc.StatusCode.OK else unregistered
    finally:
        (c.shm_dir / key).unlink(missing_ok=True)


async def load_unload(c: Clients, i: int) -> grpc.StatusCode:
    stub = c.stub("plain")
    code = await _code(stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="toggle"), timeout=60))
    if code != grpc.StatusCode.OK:
        return code
    if i % 2:  # half of the loaded versions serve a request first
        await _code(
            stub.ModelInfer(
                pb.ModelInferRequest(
                    model_name="toggle",
                    inputs=[
                        pb.ModelInferRequest.InferInputTensor(name=n, datatype="FP32", shape=[1, 16])
                        for n in ("INPUT0", "INPUT1")
                    ],
                    raw_input_contents=[bytes(64), bytes(64)],
                ),
                timeout=30,
            )
        )
    return await _code(stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="toggle"), timeout=60))


@dataclass(frozen=True)
class Kind:
    call: Call
    server: str
    concurrency: int = 16
    scale: float = 1.0
    """Calls per round relative to --calls: the slow kinds (load cycles, new connections) send fewer."""
    unit: str = "call"


KINDS: dict[str, Kind] = {
    "unary_ok": Kind(unary_ok, "plain"),
    "stream_ok": Kind(stream_ok, "plain", scale=0.5, unit=f"stream of {STREAM_LEN}"),
    "not_found": Kind(not_found, "plain"),
    "stream_not_found": Kind(stream_errors, "plain", scale=0.5, unit=f"stream of {STREAM_LEN}"),
    "bad_shape": Kind(bad_shape, "plain"),
    "bad_datatype": Kind(bad_datatype, "plain"),
    "too_large": Kind(too_large, "plain"),
    "queue_full": Kind(queue_full, "plain", concurrency=12, scale=0.5),
    "cancelled": Kind(cancelled, "plain", concurrency=8, scale=0.5),
    "deadline_queued": Kind(deadline_queued, "plain", concurrency=8, scale=0.5),
    "stream_cancelled": Kind(stream_cancelled, "plain", concurrency=4, scale=0.25, unit=f"stream of {STREAM_LEN}"),
    "new_connection": Kind(new_connection, "plain", concurrency=4, scale=0.5),
    "traced_ok": Kind(traced_ok, "traced"),
    "captured_ok": Kind(captured_ok, "capture"),
    "shm_cycle": Kind(shm_cycle, "plain", concurrency=4, scale=0.5, unit="register+status+unregister"),
    "load_unload": Kind(load_unload, "plain", concurrency=1, scale=0.1, unit="load+unload"),
}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def slope_per_1000(xs: list[int], ys: list[int]) -> float:
    """Least-squares slope of ys (KiB) against xs (calls), per 1,000 calls."""
    if len(xs) < 2:
        return float("nan")
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else float("nan")


async def run_round(clients: Clients, kind: Kind, start: int, count: int) -> Counter[str]:
    codes: Counter[str] = Counter()
    limit = asyncio.Semaphore(kind.concurrency)

    async def one(i: int) -> None:
        async with limit:
            codes[(await kind.call(clients, i)).name] += 1

    await asyncio.gather(*(one(i) for i in range(start, start + count)))
    return codes


async def soak_kind(
    clients: Clients, name: str, kind: Kind, pid: int, rounds: int, calls: int, warmup: int, deadline: float
) -> dict[str, object]:
    count = max(1, int(calls * kind.scale))
    # Warm-up: caches, arenas and gRPC's own pools reach their working size before anything is counted.
    codes = await run_round(clients, kind, 0, count)
    done, xs, ys = count, [0], [rss_kib(pid)]
    t0 = time.monotonic()
    for _ in range(rounds):
        if time.monotonic() > deadline:
            break
        codes += await run_round(clients, kind, done, count)
        done += count
        await asyncio.sleep(0.2)  # let the server finish what the calls left (closed streams, timers)
        xs.append(done - count)
        ys.append(rss_kib(pid))
    later_x, later_y = xs[warmup:], ys[warmup:]
    result = {
        "server": kind.server,
        "unit": kind.unit,
        "calls_per_round": count,
        "rounds": len(xs) - 1,
        "codes": dict(codes),
        "rss_kib": ys,
        "calls": xs,
        "growth_kib_per_1000": slope_per_1000(later_x, later_y),
        "growth_all_kib_per_1000": slope_per_1000(xs, ys),
        "rss_delta_kib": ys[-1] - ys[0],
        "seconds": time.monotonic() - t0,
    }
    print(
        f"{name:18s} {result['growth_kib_per_1000']:9.1f} KiB/1000 (all rounds "
        f"{result['growth_all_kib_per_1000']:.1f}) rss {ys[0]}..{ys[-1]} KiB codes {dict(codes)}",
        flush=True,
    )
    return result


def build_repository(root: Path) -> Path:
    repo = root / "models"
    shutil.copytree(EXAMPLE, repo / "mlp")
    for name, extra in (("slow", ""), ("full", BOUNDED_QUEUE)):
        paced_model(repo / name / "1" / "model.onnx")
        write_config(repo, name, f'name: "{name}"\n{PACED}{extra}')
    add_sub_model(repo / "toggle" / "1" / "model.onnx")
    write_config(repo, "toggle", 'name: "toggle"\n' + ADD_SUB_CONFIG)
    return repo


@contextmanager
def servers(root: Path, needed: set[str], tree: Path | None = None) -> Iterator[dict[str, Server]]:
    def serve(repository: Path, *extra: str) -> list[str]:
        return tensorgate_cmd(repository, *extra) if tree is None else [*tree_cmd(tree, repository), *extra]

    repo = build_repository(root)
    only_mlp = root / "mlp-only"
    shutil.copytree(EXAMPLE, only_mlp / "mlp")
    spans: Counter[str] = Counter()
    with ExitStack() as stack:
        out: dict[str, Server] = {}
        if "plain" in needed:
            plain = serve(
                repo,
                "--model-control-mode",
                "explicit",
                *("--load-model", "mlp", "--load-model", "slow", "--load-model", "full"),
                *("--shared-memory", "system", "--max-tensor-elements", str(MAX_ELEMENTS)),
            )
            out["plain"] = stack.enter_context(start_server(plain))
        if "traced" in needed:
            endpoint = stack.enter_context(grpc_sink(lambda body, headers: spans.update(("exports",))))
            traced = serve(
                only_mlp,
                *("--otlp-endpoint", endpoint, "--otlp-insecure", "true", "--trace-sample-rate", "1"),
            )
            out["traced"] = stack.enter_context(start_server(traced))
        if "capture" in needed:
            capture = serve(
                only_mlp, "--data-dir", str(root / "data"), "--capture-retention", "2000", "--monitor-interval-s", "2"
            )
            out["capture"] = stack.enter_context(start_server(capture))
        yield out


async def soak(args: argparse.Namespace, kinds: list[str], addresses: dict[str, str], pids: dict[str, int]) -> dict:
    clients = Clients(addresses)
    deadline = time.monotonic() + args.max_seconds
    results: dict[str, object] = {}
    try:
        for name in kinds:
            kind = KINDS[name]
            results[name] = await soak_kind(
                clients, name, kind, pids[kind.server], args.rounds, args.calls, args.warmup_rounds, deadline
            )
    finally:
        await clients.close()
    return results


@contextmanager
def servers_in_process(root: Path, needed: set[str]) -> Iterator[dict[str, str]]:
    """The three servers as `servers` starts them, in this process (tests/serving.py): for `cycle_garbage`."""
    from tests.serving import ServerThread

    repo = build_repository(root)
    only_mlp = root / "mlp-only"
    shutil.copytree(EXAMPLE, only_mlp / "mlp")
    with ExitStack() as stack:
        out: dict[str, str] = {}
        if "plain" in needed:
            plain = ServerThread(
                repo,
                model_control_mode="explicit",
                load_model=["mlp", "slow", "full"],
                shared_memory="system",
                max_tensor_elements=MAX_ELEMENTS,
            )
            out["plain"] = stack.enter_context(plain).address
        if "traced" in needed:
            endpoint = stack.enter_context(grpc_sink(lambda body, headers: None))
            traced = ServerThread(only_mlp, otlp_endpoint=endpoint, otlp_insecure=True, trace_sample_rate=1.0)
            out["traced"] = stack.enter_context(traced).address
        if "capture" in needed:
            capture = ServerThread(only_mlp, data_dir=root / "data", capture_retention=2000)
            out["capture"] = stack.enter_context(capture).address
        yield out


async def _left_for_collector(clients: Clients, kind: Kind, calls: int) -> tuple[float, Counter[str]]:
    await run_round(clients, kind, 0, min(calls, 50))  # warm-up: first-call caches are not garbage
    await asyncio.sleep(0.3)
    gc.collect()
    gc.disable()
    try:
        codes = await run_round(clients, kind, calls, calls)
        await asyncio.sleep(0.3)  # the server's loop finishes the calls' last steps
        return gc.collect() / calls, codes
    finally:
        gc.enable()


def cycle_garbage(kinds: list[str], calls: int) -> dict[str, float]:
    """Objects each call leaves to the cyclic garbage collector, servers and client in this process, the collector
    off while the calls run. Unlike RSS, this does not wait for the collector: a call that ends in a reference
    cycle holds what the cycle reaches (its request, its tensors) until a full collection, which a server with
    many long-lived objects may not run for thousands of calls. A successful unary call's figure (about 5, gRPC's
    own method-lookup closure) is the floor."""
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, servers_in_process(Path(tmp), {KINDS[k].server for k in kinds}) as at:

        async def run() -> None:
            clients = Clients(at)
            try:
                for name in kinds:
                    per_call, codes = await _left_for_collector(clients, KINDS[name], calls)
                    out[name] = per_call
                    print(
                        f"{name:18s} {per_call:7.1f} objects per call left to the collector {dict(codes)}", flush=True
                    )
            finally:
                await clients.close()

        asyncio.run(run())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12, help="measured rounds per kind")
    parser.add_argument("--calls", type=int, default=600, help="calls per round (slow kinds send a share of it)")
    parser.add_argument("--warmup-rounds", type=int, default=4, help="early samples left out of the slope")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated, of: " + ", ".join(KINDS))
    parser.add_argument("--max-seconds", type=float, default=600, help="stop starting new rounds after this long")
    parser.add_argument("--name", default="soak", help="report name under benchmarks/results")
    parser.add_argument(
        "--cycle-calls", type=int, default=100, help="calls per kind of the in-process cycle count (0: skip it)"
    )
    parser.add_argument(
        "--tree", type=Path, help="serve from this checkout instead (its build/mypy: `make build/mypy/tensorgate`)"
    )
    args = parser.parse_args()
    if not EXAMPLE.exists():
        raise SystemExit("build the examples first: make examples")
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise SystemExit(f"unknown kinds: {', '.join(sorted(unknown))}")
    started = time.monotonic()
    import tensorgate.server

    print(f"in process: {Path(tensorgate.server.__file__).parent}", flush=True)
    garbage = cycle_garbage(kinds, args.cycle_calls) if args.cycle_calls else {}
    with (
        tempfile.TemporaryDirectory() as tmp,
        servers(Path(tmp), {KINDS[k].server for k in kinds}, args.tree) as running,
    ):
        addresses = {k: s.address for k, s in running.items()}
        pids = {k: s.proc.pid for k, s in running.items()}
        results = asyncio.run(soak(args, kinds, addresses, pids))
        final_rss = {k: rss_kib(p) for k, p in pids.items()}
    lines = [
        "# Memory soak: server RSS growth per 1,000 calls of each kind, after warm-up",
        "",
        f"{args.rounds} rounds of {args.calls} calls (slow kinds a share of it) per kind after one warm-up round; "
        f"the slope leaves out the first {args.warmup_rounds} samples. RSS moves by up to a few MiB at a time "
        "(the allocator returning memory, a full garbage collection), so one run's slope is noise below about "
        "+-1,000 KiB per 1,000 calls; a leak is a positive slope in every run that grows with --rounds. "
        "`cycle garbage` is the steadier figure: objects each call left to the cyclic collector (in process, "
        f"{args.cycle_calls} calls, collector off); about 5 is gRPC's own floor, more means a failed call's "
        "request stays until a full collection.",
        "",
        "| kind | server | unit | calls/round | growth KiB / 1,000 | all rounds | RSS first..last KiB | cycle garbage "
        "per call | codes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        assert isinstance(r, dict)
        codes = ", ".join(f"{k} {v}" for k, v in sorted(r["codes"].items()))
        left = f"{garbage[name]:.1f}" if name in garbage else ""
        lines.append(
            f"| {name} | {r['server']} | {r['unit']} | {r['calls_per_round']} | {r['growth_kib_per_1000']:.1f} | "
            f"{r['growth_all_kib_per_1000']:.1f} | {r['rss_kib'][0]:,}..{r['rss_kib'][-1]:,} | {left} | {codes} |"
        )
    lines += ["", f"Total {time.monotonic() - started:.0f} s; final server RSS (KiB): {final_rss}."]
    payload = {"args": vars(args), "results": results, "cycle_garbage_per_call": garbage, "final_rss_kib": final_rss}
    js, md = write_report(args.name, payload, "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {js} and {md}")


if __name__ == "__main__":
    main()
