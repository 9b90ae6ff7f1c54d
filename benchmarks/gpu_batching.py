"""tensorgate on a GPU against in-process ONNX Runtime on the same GPU, side by side in one run.

The model is a ResNet-style CNN (benchmarks/cnn.py, built here with onnx.helper), large enough that batching
matters on a GPU. In one run:

- in-process ONNX Runtime with the CUDA provider at batch 1/8/32/64/128 (the compute limit), and alternating
  between two sizes (1 and 31, 96 and 128), as a batcher's batches do, on one session and on a session per size;
- tensorgate serving the same file, 1-row requests at concurrency 32 with dynamic batching off and on (unary and
  ModelStreamInfer), and 32-row requests at concurrency 8;
- the 32-row throughput over in-process rows/s at the batch size the server executed (the issue's ratio);
- the `tensorgate_gpu_*` series that /metrics shows while the model is loaded.

    python benchmarks/gpu_batching.py [--repeats 2] [--provider cuda|cpu] [--pad [SIZES]]

`--provider cpu` runs the same steps on the CPU (KIND_CPU), to try the script on a machine without a GPU. The run
stops with an error when CUDA was asked for and either side did not get it. Writes
benchmarks/results/gpu_batching_<search, lower case>[_padded[_sizes]].json and .md.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onnx  # noqa: E402

from benchmarks.cnn import build_resnet_model, resnet_config  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    SUMMARY_HEADER,
    Measurement,
    Server,
    measure,
    median_of,
    perf_analyzer_available,
    start_server,
    summary_cells,
    tensorgate_cmd,
    write_report,
)
from benchmarks.inprocess import ort_rows_per_s, ort_session  # noqa: E402
from tensorgate.server.backends.onnx import (  # noqa: E402
    CONV_ALGO_SEARCH,
    CPU,
    CUDA,
    DEFAULT_CONV_ALGO_SEARCH,
    Provider,
)

_LOADED = re.compile(r"model '(\w+)' version \S+ loaded on (\w+)")
_METRICS = re.compile(r"metrics listening on \S+:(\d+)")


def build_repository(
    root: Path, model: onnx.ModelProto, image: int, kind: str, conv_algo_search: str, pad: str | None
) -> tuple[Path, Path]:
    """`resnet` (dynamic batching, no queue delay, padded as `pad` says) and `resnet_nobatch` (requests one by one,
    never padded), one file."""
    repo = root / "models"
    for name, batching in (("resnet", True), ("resnet_nobatch", False)):
        (repo / name / "1").mkdir(parents=True)
        onnx.save(model, repo / name / "1" / "model.onnx")
        config = resnet_config(
            name,
            image=image,
            kind=kind,
            batching=batching,
            conv_algo_search=conv_algo_search,
            pad=pad if batching else None,
        )
        (repo / name / "config.pbtxt").write_text(config)
    return repo, repo / "resnet" / "1" / "model.onnx"


def loaded_on(server: Server) -> dict[str, str]:
    """Execution provider per model, as the server logged it after reading the session back."""
    return dict(_LOADED.findall(server.log.read_text(errors="replace")))


def gpu_series(server: Server) -> list[str]:
    """The tensorgate_gpu_* samples of one scrape (none when NVML cannot read a GPU)."""
    m = _METRICS.search(server.log.read_text(errors="replace"))
    if m is None:
        return []
    with urllib.request.urlopen(f"http://127.0.0.1:{m.group(1)}/metrics", timeout=10) as resp:  # noqa: S310
        text = resp.read().decode()
    return [line for line in text.splitlines() if line.startswith("tensorgate_gpu_")]


def _pad_suffix(pad: str | None) -> str:
    return "" if not pad else "_padded" if pad == "true" else "_padded_sizes"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--provider", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--image", type=int, default=32, help="input is [batch, 3, image, image]")
    parser.add_argument("--width", type=int, default=64, help="channels of every convolution")
    parser.add_argument("--blocks", type=int, default=4, help="residual blocks")
    parser.add_argument("--batches", default="1,8,32,64,128", help="in-process batch sizes")
    parser.add_argument(
        "--conv-algo-search",
        choices=sorted(CONV_ALGO_SEARCH.values()),
        default=DEFAULT_CONV_ALGO_SEARCH,
        help="cuDNN convolution algorithm search, for the server (config) and in-process alike",
    )
    parser.add_argument(
        "--pad",
        nargs="?",
        const="true",
        help="serve with tensorgate.pad_batches: alone, every run at max_batch_size rows; with sizes (1,8,32) each "
        "run at the smallest that holds it, on a session per size",
    )
    args = parser.parse_args()
    gpu = args.provider == "cuda"
    search = args.conv_algo_search
    providers: list[Provider] = [(CUDA, {"device_id": "0", "cudnn_conv_algo_search": search}), CPU] if gpu else [CPU]
    use_pa = perf_analyzer_available()
    model = build_resnet_model(image=args.image, width=args.width, blocks=args.blocks)

    with tempfile.TemporaryDirectory() as tmp:
        repo, model_file = build_repository(
            Path(tmp), model, args.image, "KIND_GPU" if gpu else "KIND_CPU", search, args.pad
        )
        session = ort_session(model_file, providers=providers)
        inprocess_provider = session.get_providers()[0]
        if gpu and inprocess_provider != CUDA:
            raise SystemExit(f"in-process ONNX Runtime did not start {CUDA} (providers: {session.get_providers()})")
        compute = {
            b: ort_rows_per_s(model_file, b, repeats=args.repeats, session=session)
            for b in (int(x) for x in args.batches.split(","))
        }
        # The batcher's batches change size from call to call; these show what that costs the runtime itself.
        alternating = {
            sizes: ort_rows_per_s(model_file, sizes, repeats=args.repeats, session=session)
            for sizes in ((1, 31), (96, 128))
        }
        # The same, each size on its own session: whether a session per size keeps each size's cuDNN plans.
        own_sessions = {
            sizes: ort_rows_per_s(
                model_file,
                sizes,
                repeats=args.repeats,
                sessions=[ort_session(model_file, providers=providers) for _ in sizes],
            )
            for sizes in ((1, 31), (96, 128))
        }
        print("in-process rows/s:", {b: round(v) for b, v in compute.items()}, flush=True)

        runs: dict[str, list[Measurement]] = {}
        with start_server(tensorgate_cmd(repo)) as tg:
            served_on = loaded_on(tg)
            if gpu and set(served_on.values()) != {CUDA}:
                raise SystemExit(f"tensorgate did not load every model on {CUDA}: {served_on}\n{tg.log.read_text()}")
            # (label, model, concurrency, rows, streaming)
            configs = [
                ("batching off, unary, 1-row @ c=32", "resnet_nobatch", 32, 1, False),
                ("batching on, unary, 1-row @ c=32", "resnet", 32, 1, False),
                ("batching on, stream, 1-row @ c=32", "resnet", 32, 1, True),
                ("batching on, unary, 32-row @ c=8", "resnet", 8, 32, False),
            ]
            # One unrecorded pass: the GPU provider picks its kernels for each new batch size on first sight.
            for _, name, c, rows, streaming in configs:
                measure(tg, name, c, rows, streaming, use_pa, stability_percent=1000)
            for _ in range(args.repeats):
                for label, name, c, rows, streaming in configs:
                    # A GPU's time per batch moves with the batch size the load makes, so perf_analyzer seldom finds
                    # windows within 100% of each other: 1000 reports its last windows instead of failing.
                    m = measure(tg, name, c, rows, streaming, use_pa, stability_percent=1000)
                    runs.setdefault(label, []).append(m)
            gpu_lines = gpu_series(tg)
        results = {key: median_of(ms) for key, ms in runs.items()}
        big = results["batching on, unary, 32-row @ c=8"]
        executed = int(round(big.mean_batch or 32))
        at_executed = ort_rows_per_s(model_file, executed, repeats=args.repeats, session=session)

    unary_on = results["batching on, unary, 1-row @ c=32"].infer_per_s
    ratios = {
        f"32-row rows/s / in-process at executed batch {executed}": big.infer_per_s / at_executed,
        "1-row unary, batching on / off @ c=32": unary_on / results["batching off, unary, 1-row @ c=32"].infer_per_s,
        "1-row stream / unary, batching on @ c=32": results["batching on, stream, 1-row @ c=32"].infer_per_s / unary_on,
        f"1-row unary batching on / in-process at batch {max(compute)}": unary_on / compute[max(compute)],
    }
    tool = "perf_analyzer 2.41 (C++)" if use_pa else "python grpc.aio load generator (perf_analyzer unavailable)"
    shape = f"[batch, 3, {args.image}, {args.image}], {args.blocks} residual blocks at {args.width} channels"
    lines = [
        f"# GPU batching benchmark: ResNet-style CNN {shape}",
        "",
        f"Provider: in-process {inprocess_provider}, tensorgate {', '.join(sorted(set(served_on.values())))}. "
        f"cuDNN convolution search: {search}. tensorgate.pad_batches: {args.pad or 'off'}.",
        f"Load generator: {tool}. Medians over {args.repeats} repeats after one unrecorded warm-up pass.",
        "Latencies in ms; server queue / compute in microseconds (ModelStatistics); cores = CPU seconds per wall",
        "second of the server / the load generator.",
        "",
        "| batch | in-process rows/s |",
        "|---|---|",
        *[f"| {b} | {v:,.0f} |" for b, v in compute.items()],
        f"| {executed} (executed, measured after the server runs) | {at_executed:,.0f} |",
        *[f"| {' and '.join(map(str, sizes))} in turn | {v:,.0f} |" for sizes, v in alternating.items()],
        *[
            f"| {' and '.join(map(str, sizes))} in turn, a session each | {v:,.0f} |"
            for sizes, v in own_sessions.items()
        ],
        "",
        SUMMARY_HEADER.replace("infer/s", "rows/s"),
        *[f"| {key} | {summary_cells(r)} |" for key, r in results.items()],
        "",
        "| ratio | value |",
        "|---|---|",
        *[f"| {k} | {v:.2f} |" for k, v in ratios.items()],
        "",
        "GPU series on /metrics:" if gpu_lines else "No tensorgate_gpu_* series on /metrics.",
        *[f"    {line}" for line in gpu_lines],
    ]
    payload = {
        "tool": tool,
        "model": shape,
        "cudnn_conv_algo_search": search,
        "pad_batches": args.pad,
        "providers": {"in_process": inprocess_provider, "tensorgate": served_on},
        "in_process_rows_per_s": compute,
        "in_process_at_executed": {"batch": executed, "rows_per_s": at_executed},
        "in_process_alternating_rows_per_s": {" and ".join(map(str, k)): v for k, v in alternating.items()},
        "in_process_alternating_session_each_rows_per_s": {
            " and ".join(map(str, k)): v for k, v in own_sessions.items()
        },
        "results": results,
        "ratios": ratios,
        "gpu_metrics": gpu_lines,
    }
    js, md = write_report(f"gpu_batching_{search.lower()}{_pad_suffix(args.pad)}", payload, "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {js} and {md}")


if __name__ == "__main__":
    main()
