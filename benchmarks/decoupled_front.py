"""The cost of relaying a decoupled model: Triton's own streams against the same model through tensorgate, side by
side in one run. This is how an LLM behind Triton is served (tokens streamed as responses), so what matters is the
time to the first response and between responses, and how many responses per second go through.

The upstream is PyTriton's tritonserver (tests/pytriton_upstream.py, `countdown`: a decoupled model answering
X = n with n responses, not batching); tensorgate fronts it with a one-line config. Each of `--concurrency` callers
keeps one ModelStreamInfer stream and sends its requests one after another (the next when the last response of
the one before has come), for `--duration` seconds per run; the targets take turns within each repeat.

tensorgate's CPU per response (its process CPU time over the responses it relayed) is steadier than throughput on
a shared machine: compare changes by it. `--before TREE` runs a second tensorgate from another checkout (as
benchmarks/hotpath.py does) as one more target, so a change is measured before and after in one run.

    make .venv-triton/.installed-stamp    # once: PyTriton in its own environment
    .venv/bin/python benchmarks/decoupled_front.py [--repeats 3] [--concurrency 1,8] [--responses 32] [--before TREE]

Writes benchmarks/results/decoupled_front.json and decoupled_front.md.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from grpc import aio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import Server, start_server, tensorgate_cmd, tree_cmd, write_report  # noqa: E402
from tensorgate.protos import GRPCInferenceServiceStub  # noqa: E402
from tensorgate.protos import grpc_service_pb2 as pb  # noqa: E402
from tests.pytriton_upstream import Upstream, unavailable_reason  # noqa: E402

MODEL = "countdown"
MAX_REQUESTS = 100_000
"""Per caller and run, whatever the duration: every loop here is bounded in count as well as time."""


@dataclass
class Run:
    requests: int
    responses_per_s: float
    first_p50_ms: float
    first_p99_ms: float
    between_p50_ms: float
    between_p99_ms: float
    cpu_us_per_response: float
    """The tensorgate process's CPU per response relayed (nan for Triton direct)."""


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def _caller(address: str, responses: int, until: float, firsts: list[float], gaps: list[float]) -> int:
    """One stream; returns the requests completed. Records time to first response and gaps between responses."""
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="X", datatype="FP32", shape=[1])
    request.raw_input_contents.append(np.array([float(responses)], np.float32).tobytes())
    queue: asyncio.Queue[pb.ModelInferRequest | None] = asyncio.Queue()

    async def requests() -> AsyncIterator[pb.ModelInferRequest]:
        while (item := await queue.get()) is not None:
            yield item

    done = 0
    async with aio.insecure_channel(address) as channel:
        call = GRPCInferenceServiceStub(channel).ModelStreamInfer(requests())
        replies = call.__aiter__()
        while time.monotonic() < until and done < MAX_REQUESTS:
            sent = last = time.perf_counter()
            await queue.put(request)
            for i in range(responses):
                reply = await asyncio.wait_for(replies.__anext__(), 30)
                if reply.error_message:
                    raise RuntimeError(f"{address}: {reply.error_message}")
                now = time.perf_counter()
                (firsts if i == 0 else gaps).append((now - (sent if i == 0 else last)) * 1000)
                last = now
            done += 1
        await queue.put(None)
        async for _ in replies:  # the end of the stream (and PyTriton's final flag, if any)
            pass
    return done


async def _measure(address: str, server: Server | None, concurrency: int, responses: int, duration: float) -> Run:
    firsts: list[float] = []
    gaps: list[float] = []
    cpu = server.cpu_seconds() if server is not None else 0.0
    started = time.perf_counter()
    until = time.monotonic() + duration
    counts = await asyncio.gather(*(_caller(address, responses, until, firsts, gaps) for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    total = sum(counts)
    cpu_us = float("nan") if server is None else (server.cpu_seconds() - cpu) * 1e6 / max(total * responses, 1)
    return Run(
        requests=total,
        responses_per_s=total * responses / elapsed,
        first_p50_ms=_percentile(firsts, 50),
        first_p99_ms=_percentile(firsts, 99),
        between_p50_ms=_percentile(gaps, 50),
        between_p99_ms=_percentile(gaps, 99),
        cpu_us_per_response=cpu_us,
    )


def _median(runs: list[Run]) -> Run:
    fields = asdict(runs[0]).keys()
    return Run(**{f: statistics.median(getattr(r, f) for r in runs) for f in fields})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--responses", type=int, default=32, help="responses per request (tokens)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    parser.add_argument("--before", type=Path, help="another checkout to measure side by side (the baseline)")
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason is not None:
        raise SystemExit(f"PyTriton cannot run here: {reason}")
    levels = [int(c) for c in args.concurrency.split(",")]
    runs: dict[tuple[str, int], list[Run]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "models"
        (root / MODEL).mkdir(parents=True)
        with Upstream(Path(tmp) / "pytriton", token="") as upstream:
            (root / MODEL / "config.pbtxt").write_text(
                'backend: "tensorgate_triton"\n'
                f'parameters {{ key: "tensorgate.triton.url" value {{ string_value: "{upstream.url}" }} }}\n'
            )
            with (
                start_server(tensorgate_cmd(root)) as front,
                start_server(tree_cmd(args.before, root)) if args.before else nullcontext() as before,
            ):
                targets: dict[str, tuple[str, Server | None]] = {"triton": (upstream.url, None)}
                if before is not None:
                    targets["before"] = (before.address, before)
                targets["tensorgate"] = (front.address, front)
                for _ in range(args.repeats):
                    for c in levels:
                        for name, (address, server) in targets.items():
                            run = asyncio.run(_measure(address, server, c, args.responses, args.duration))
                            runs.setdefault((name, c), []).append(run)
    medians = {key: _median(value) for key, value in runs.items()}
    lines = [
        "# Relaying a decoupled model: Triton direct and through tensorgate",
        "",
        f"PyTriton `countdown`, {args.responses} responses per request; each caller one stream, requests one after "
        f"another; {args.duration:.0f} s per run, medians of {args.repeats} repeats. Times in ms.",
        "",
        "| target | callers | requests | responses/s | first p50 | first p99 | between p50 | between p99 "
        "| CPU us / response |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (name, c), r in medians.items():
        cpu = "" if math.isnan(r.cpu_us_per_response) else f"{r.cpu_us_per_response:.0f}"
        lines.append(
            f"| {name} | {c} | {r.requests:,.0f} | {r.responses_per_s:,.0f} | {r.first_p50_ms:.2f} | "
            f"{r.first_p99_ms:.2f} | {r.between_p50_ms:.3f} | {r.between_p99_ms:.3f} | {cpu} |"
        )
    lines += ["", "| callers | responses/s, tensorgate / Triton | first response p50, tensorgate - Triton (ms) |"]
    lines.append("|---|---|---|")
    for c in levels:
        relayed, direct = medians[("tensorgate", c)], medians[("triton", c)]
        lines.append(
            f"| {c} | {relayed.responses_per_s / direct.responses_per_s:.2f} | "
            f"{relayed.first_p50_ms - direct.first_p50_ms:+.2f} |"
        )
    if args.before:
        lines += ["", "| callers | CPU per response, tensorgate / before (median of per-repeat ratios) |", "|---|---|"]
        for c in levels:
            ratios = [
                a.cpu_us_per_response / b.cpu_us_per_response
                for a, b in zip(runs[("tensorgate", c)], runs[("before", c)], strict=True)
            ]
            lines.append(f"| {c} | {statistics.median(ratios):.2f} ({', '.join(f'{r:.2f}' for r in ratios)}) |")
    payload = {f"{name}@{c}": [asdict(r) for r in rs] for (name, c), rs in runs.items()}
    js, md = write_report("decoupled_front", payload, "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {js} and {md}")


if __name__ == "__main__":
    main()
