"""`tensorgate bench`: load-test a KServe V2 / Triton gRPC server, closed loop or open loop.

    tensorgate bench mlp --server 127.0.0.1:8001 --concurrency 1,8,32 --duration 10 --workers 2 --out bench/
    tensorgate bench mlp --rate 500,1000 --arrival poisson --duration 10 --out bench-open/
    tensorgate bench compare before/results.json after/results.json

Writes results.json, results.csv, report.md and PNG plots into --out, prints the table, and the first message of
each failure code. Exit status: 0; 1 when no request succeeded at any level, when the server cannot be reached, or
when a load process dies (with the levels measured before it); 2 for a bad argument; 130 after Ctrl-C (with a
partial report of the levels measured so far).
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tensorgate.client import TensorgateClientError
from tensorgate.client._cli import UsageError, add_connection_arguments, headers_from_args, tls_from_args
from tensorgate.loadtest.inputs import InputError
from tensorgate.loadtest.plots import MatplotlibMissing, write_plots
from tensorgate.loadtest.report import compare_table, load_report, markdown_table, sweep_dict, write_reports
from tensorgate.loadtest.runner import BenchConfig, run_sweep

__all__ = ["add_parser", "run"]

MAX_WORKERS_PER_CPU = 4

PROG = "tensorgate bench"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "bench",
        help="load-test a model: closed loop (--concurrency) or open loop (--rate); 'bench compare A.json B.json'",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="model name, or 'compare' followed by result JSON files")
    p.add_argument("files", nargs="*", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--model-version", default="", help="model version (default: the server's choice)")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", default=None, help="closed loop: requests in flight, a sweep (default 1,8,32)")
    load.add_argument("--rate", default=None, help="open loop: requests/s, a sweep (e.g. 500,1000)")
    p.add_argument("--arrival", choices=("poisson", "constant"), default="poisson", help="open-loop inter-arrivals")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per level (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each level (default 2)")
    p.add_argument("--max-requests", type=int, default=None, help="end a level after N measured requests")
    p.add_argument("--batch", type=int, default=1, help="rows per request (default 1)")
    p.add_argument("--inputs", default="random", help="random | zeros | a folder of NAME.npy files (default random)")
    p.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="NAME:D1,D2",
        help="an input's dims after the batch one (all of them if the model does not batch), for random and zeros "
        "inputs, as perf_analyzer's --shape",
    )
    p.add_argument("--streaming", action="store_true", help="send over ModelStreamInfer instead of ModelInfer")
    p.add_argument(
        "--sequence-length",
        type=int,
        default=None,
        metavar="N",
        help="a sequence model: requests per sequence, each request in flight running its own (default 20)",
    )
    p.add_argument("--priority", type=int, default=None, help="request 'priority' parameter")
    p.add_argument("--timeout-param", type=int, default=None, metavar="US", help="request 'timeout' parameter (us)")
    p.add_argument("--workers", type=int, default=1, help="load processes, each with its own loop and channels")
    p.add_argument("--max-in-flight", type=int, default=1000, help="open loop: cap on requests in flight (dropped)")
    p.add_argument("--seed", type=int, default=0, help="seed of random inputs and Poisson arrivals")
    p.add_argument(
        "--nice", type=int, default=0, help="niceness added to the load processes, so a server on the same cores wins"
    )
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench-MODEL-TIME)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    add_connection_arguments(p, timeout=30.0)


def _numbers(text: str, flag: str, kind: type[Any]) -> tuple[Any, ...]:
    try:
        values = tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated numbers") from None
    if not values or not all(0 < v < math.inf for v in values):  # nan fails both comparisons
        raise UsageError(f"{flag} {text!r}: expected positive finite numbers")
    return values


def _shapes(items: list[str]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    out: dict[str, tuple[int, ...]] = {}
    for item in items:
        name, sep, dims = item.rpartition(":")
        try:
            sizes = tuple(int(d) for d in dims.split(","))
        except ValueError:
            sizes = ()
        if not sep or not name or not sizes or min(sizes) < 1:
            raise UsageError(f"--shape {item!r}: expected NAME:D1,D2,... with positive sizes")
        out[name] = sizes
    return tuple(out.items())


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    if args.files:
        raise UsageError(f"unexpected arguments: {' '.join(map(str, args.files))}")
    for flag, value in (("--duration", args.duration), ("--warmup", args.warmup), ("--timeout", args.timeout)):
        # nan passes every comparison below and never ends a level; inf never ends one either.
        if not math.isfinite(value):
            raise UsageError(f"{flag} must be a finite number, got {value}")
    if args.duration <= 0 or args.warmup < 0:
        raise UsageError("--duration must be positive and --warmup not negative")
    if args.timeout <= 0:
        raise UsageError("--timeout must be positive")
    if args.workers < 1 or args.max_in_flight < 1:
        raise UsageError("--workers and --max-in-flight must be at least 1")
    cpus = os.cpu_count() or 1
    if args.workers > MAX_WORKERS_PER_CPU * cpus:
        # Each is a whole Python process: a slip of the finger (--workers 1000) would fork hundreds of them.
        raise UsageError(
            f"--workers {args.workers} is more than {MAX_WORKERS_PER_CPU} load processes per CPU ({cpus} here): "
            "more only compete with each other and the server for the same cores"
        )
    if args.sequence_length is not None and args.sequence_length < 1:
        raise UsageError("--sequence-length must be at least 1")
    if args.max_requests is not None and args.max_requests < 1:
        raise UsageError("--max-requests must be at least 1")
    if not 0 <= args.nice <= 19:
        raise UsageError("--nice must be between 0 and 19")
    if args.seed < 0:  # numpy's generators take none; its message did not name the flag
        raise UsageError("--seed must not be negative")
    common: dict[str, Any] = dict(
        model=args.model,
        server=args.server,
        version=args.model_version,
        duration_s=args.duration,
        warmup_s=args.warmup,
        max_requests=args.max_requests,
        batch=args.batch,
        inputs=args.inputs,
        shapes=_shapes(args.shape),
        streaming=args.streaming,
        priority=args.priority,
        timeout_param_us=args.timeout_param,
        deadline_s=args.timeout,
        tls=tls_from_args(args),
        headers=tuple(headers_from_args(args).items()),
        workers=args.workers,
        max_in_flight=args.max_in_flight,
        seed=args.seed,
        nice=args.nice,
        arrival=args.arrival,
        sequence_length=args.sequence_length,
    )
    if args.rate is not None:
        return BenchConfig(mode="open", rates=_numbers(args.rate, "--rate", float), **common)
    return BenchConfig(
        mode="closed", concurrency=_numbers(args.concurrency or "1,8,32", "--concurrency", int), **common
    )


def run(args: argparse.Namespace) -> int:
    if args.model == "compare":
        return _compare(args.files)
    try:
        config = config_from_args(args)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    out: Path = args.out or Path(f"bench-{args.model}-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        _check_writable(out)
    except OSError as exc:
        print(f"{PROG}: --out {out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    try:
        result = run_sweep(config)
    except InputError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:  # unreadable TLS files
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except TensorgateClientError as exc:
        where = f"cannot reach {config.server}: " if exc.code.name == "UNAVAILABLE" else ""
        print(f"{PROG}: {where}{exc.code.name}: {' '.join(exc.details.split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: aborted", file=sys.stderr)
        return 130
    doc = sweep_dict(result)
    print(markdown_table(doc))
    try:
        written = write_reports(doc, out)
    except OSError as exc:
        print(f"{PROG}: --out {out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if not args.no_plots and doc["levels"]:
        try:
            written += write_plots(doc, out)
        except MatplotlibMissing as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
        except Exception as exc:  # the plots are extras: never at the cost of the table and reports above
            print(f"{PROG}: no plots: {type(exc).__name__}: {' '.join(str(exc).split())}", file=sys.stderr)
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    for code, message in _first_messages(doc).items():
        print(f"{PROG}: {code}: {message}", file=sys.stderr)
    if result.error is not None:
        n = len(result.levels)
        measured = f"{n} level{'' if n == 1 else 's'} measured before it"
        print(f"{PROG}: {result.error}; the sweep stopped, {measured}", file=sys.stderr)
        return 1
    if result.interrupted:
        return 130
    if not any(level["succeeded"] for level in doc["levels"]):
        print(f"{PROG}: no request succeeded", file=sys.stderr)
        return 1
    return 0


def _first_messages(doc: dict[str, Any]) -> dict[str, str]:
    """The first message of each failure code across the sweep, on one line each (a server's message may not be)."""
    out: dict[str, str] = {}
    for level in doc["levels"]:
        for code, message in level["failed_messages"].items():
            out.setdefault(code, " ".join(message.split()) or "(no message)")
    return out


def _check_writable(out: Path) -> None:
    """OSError unless ``out`` is a folder that can be written, or can be created. Checked before the sweep, so that
    its measurements are not lost at the end; created only when the results are written, so that a run refused by
    a check at startup (a model not found) leaves no empty folder behind. Tried for real (the folders made and a
    file written, then removed), not by permission bits: root passes those where /proc or a read-only mount
    still refuses."""
    made: list[Path] = []
    try:
        for folder in reversed([out, *out.parents]):
            if not folder.exists():
                folder.mkdir()
                made.append(folder)
        if not out.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(out))
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    finally:
        for folder in reversed(made):
            folder.rmdir()


def _compare(files: list[Path]) -> int:
    if len(files) < 2:
        print(f"{PROG} compare: give two or more results.json files", file=sys.stderr)
        return 2
    try:
        docs = [(_name(path, files), load_report(path)) for path in files]
    except (OSError, ValueError) as exc:
        print(f"{PROG} compare: {exc}", file=sys.stderr)
        return 2
    print(compare_table(docs))
    return 0


def _name(path: Path, files: list[Path]) -> str:
    """A short column name: the folder name when files are all called results.json, else the file stem."""
    stems = [f.stem for f in files]
    if len(set(stems)) < len(stems):
        return path.parent.name or path.stem
    return path.stem
