"""The monitoring commands of `tensorgate`: ``profile``, ``export`` and ``monitor``.

    tensorgate profile digits --data reference.npy --server 127.0.0.1:8001 --data-dir /var/lib/tensorgate
    tensorgate export digits --data-dir /var/lib/tensorgate --since -1h --format parquet --out digits.parquet
    tensorgate monitor digits --server 127.0.0.1:8001 --out monitor/

``profile`` sends the reference rows through the server so that the output/score bins come from the model's real
outputs (without --server it profiles the inputs only) and writes the profile where the server looks for it
(``<data-dir>/profiles/<model>.json``, or ``--out FILE``, e.g. ``<model dir>/reference_profile.json``). A server
that captures (--data-dir) stores those rows like any traffic, in the window it monitors: ``profile`` warns, and
the README says to profile against a server of the same models without --data-dir.
Exit status: 0 on success, 1 when the server refused a call, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tensorgate.client._cli import (
    UsageError,
    add_connection_arguments,
    failed_call,
    headers_from_args,
    tls_from_args,
)
from tensorgate.client.config import DEFAULT_TIMEOUT_S

if TYPE_CHECKING:
    from tensorgate.client.sync import InferenceClient
    from tensorgate.protos import model_config_pb2 as mc

__all__ = ["COMMANDS", "add_parsers", "run"]

COMMANDS = ("profile", "export", "monitor")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("profile", help="build a model's reference profile for drift detection")
    p.add_argument("model", help="model name")
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        help="reference rows: FILE.npy (the model's one input, or --input NAME) or FILE.npz (one array per input)",
    )
    p.add_argument("--input", default=None, metavar="NAME", help="input name of a .npy file (default: from metadata)")
    p.add_argument("--model-version", default=None, help="model version to run (default: the server's choice)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per request (default: the model's max batch)")
    p.add_argument("--bins", type=int, default=10, help="quantile bins per numeric feature (default 10)")
    p.add_argument("--categorical", default="", metavar="NAMES", help="comma list of inputs to treat as categories")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, default=None, metavar="FILE", help="write the profile to FILE")
    where.add_argument(
        "--data-dir", type=Path, default=None, metavar="DIR", help="write DIR/profiles/MODEL.json (the server's dir)"
    )
    add_connection_arguments(p, DEFAULT_TIMEOUT_S)
    p.set_defaults(server=None)  # no server unless given: then the profile covers the inputs only

    e = sub.add_parser("export", help="export captured inputs, predictions and labels for retraining")
    e.add_argument("model", help="model name")
    e.add_argument("--data-dir", type=Path, required=True, metavar="DIR", help="the server's --data-dir")
    e.add_argument("--since", default=None, help="ISO 8601 time or relative (-30m, -1h, -7d); default: everything")
    e.add_argument("--until", default=None, help="ISO 8601 time or relative; default: now")
    e.add_argument("--model-version", default=None, help="only this version (default: all)")
    e.add_argument("--labelled-only", action="store_true", help="only predictions with joined ground truth")
    e.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl", help="jsonl (default) or parquet")
    e.add_argument("--out", type=Path, required=True, metavar="FILE", help="file to write")
    # "--since -1h": argparse takes a value starting with "-" for an option unless it looks like a negative
    # number; widen its (long-stable, if private) matcher so relative times read as values too.
    e._negative_number_matcher = re.compile(r"^-(\d+(\.\d*)?|\.\d+)[smhd]?$")

    m = sub.add_parser("monitor", help="print a model's quality, drift and alerts; write PNG plots with --out")
    m.add_argument("model", help="model name")
    m.add_argument("--model-version", default=None, help="model version (default: the newest loaded)")
    m.add_argument("--window-count", type=int, default=None, help="last N requests (default: the model's window)")
    m.add_argument("--window-seconds", type=float, default=None, help="requests of the last S seconds")
    m.add_argument("--out", type=Path, default=None, metavar="DIR", help="append to DIR/history.jsonl, write PNGs")
    m.add_argument("--watch", type=int, default=1, metavar="N", help="poll N times (default 1)")
    m.add_argument("--interval", type=float, default=10.0, help="seconds between polls with --watch (default 10)")
    m.add_argument("--top", type=int, default=10, help="features listed in the drift table (default 10)")
    add_connection_arguments(m, DEFAULT_TIMEOUT_S)


def run(args: argparse.Namespace) -> int:
    """Run one of COMMANDS; errors are one line on stderr."""
    prog = f"tensorgate {args.command}"
    from tensorgate.client._monitoring import describe_failure
    from tensorgate.client.errors import TensorgateClientError
    from tensorgate.server.monitoring.drift import ProfileError
    from tensorgate.server.monitoring.export import ExportError
    from tensorgate.server.monitoring.report import PlottingUnavailable

    try:
        if args.command == "profile":
            return _profile(args)
        if args.command == "export":
            return _export(args)
        return _monitor(args)
    except (UsageError, ProfileError, ExportError, OSError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except PlottingUnavailable as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except TensorgateClientError as exc:
        # profile calls the inference service only: its UNIMPLEMENTED is no sign of monitoring being off.
        text = describe_failure(exc) if args.command == "monitor" else None
        print(f"{prog}: {failed_call(args, exc, text)}", file=sys.stderr)
        return 1


# ----- profile -----------------------------------------------------------------------------------------------


def _read_data(path: Path, input_name: str | None) -> dict[str, np.ndarray] | np.ndarray:
    """An .npz's arrays by name, or the one array of an .npy (its input name is decided later)."""
    unreadable = (OSError, ValueError, EOFError, zipfile.BadZipFile)  # EOFError, BadZipFile: a file cut short
    try:
        # Opened here: np.load leaves the file open when it is no zip after all.
        with path.open("rb") as f:
            loaded = np.load(f, allow_pickle=False)
            if isinstance(loaded, np.ndarray):
                return {input_name: loaded} if input_name else loaded
            with loaded:
                if input_name:
                    raise UsageError("--input names the array of a .npy file; an .npz names its arrays itself")
                arrays = {}
                for name in loaded.files:
                    try:  # an .npz reads each array only now, and a pickled one (dtype=object) fails here
                        arrays[name] = loaded[name]
                    except unreadable as exc:
                        why = f"{exc}{_object_hint(exc)}"
                        raise UsageError(f"--data {path}: cannot read array '{name}': {why}") from None
                return arrays
    except unreadable as exc:
        raise UsageError(f"--data {path}: cannot read it as .npy/.npz: {exc}{_object_hint(exc)}") from None


def _object_hint(exc: Exception) -> str:
    """A text column (a categorical feature) saved from a dtype=object array is pickled, which is not loaded: a
    file could run code. Fixed-width strings carry the same text without it."""
    if "allow_pickle" not in str(exc):
        return ""
    return "; save a text column as fixed-width strings, array.astype(str), not as dtype=object"


def _profile(args: argparse.Namespace) -> int:
    from tensorgate.server.monitoring.drift import build_profile, profile_path, save_profile

    if args.bins < 2:
        raise UsageError("--bins must be at least 2")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    data = _read_data(args.data, args.input)
    categorical = [c.strip() for c in args.categorical.split(",") if c.strip()]
    out = args.out if args.out is not None else profile_path(args.data_dir, args.model)
    if args.server is None:
        if isinstance(data, np.ndarray):
            raise UsageError("without --server, name the .npy file's input with --input NAME")
        inputs, outputs = data, None
    else:
        inputs, outputs = _through_server(args, data)
    profile = build_profile(args.model, inputs, outputs, bins=args.bins, categorical=categorical)
    save_profile(profile, out)
    rows = profile.samples
    scores = sum(1 for f in profile.features if f.role == "output")
    print(
        f"{out}: reference profile of model '{args.model}': {rows} rows, "
        f"{len(profile.features) - scores} input features, {scores} output features"
    )
    return 0


def _through_server(
    args: argparse.Namespace, data: dict[str, np.ndarray] | np.ndarray
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Run the reference rows through the model in batches; (inputs as sent, outputs concatenated)."""
    from tensorgate.client.sync import InferenceClient
    from tensorgate.protos import tensors
    from tensorgate.server.monitoring.store import as_numbers

    tls = tls_from_args(args)
    headers = headers_from_args(args)
    with InferenceClient(args.server, timeout=args.timeout, tls=tls, headers=headers) as client:
        meta = client.metadata(args.model, args.model_version)
        if isinstance(data, np.ndarray):
            if len(meta.inputs) != 1:
                names = ", ".join(t.name for t in meta.inputs)
                raise UsageError(f"model '{args.model}' has inputs {names}: give an .npz with one array per input")
            data = {meta.inputs[0].name: data}
        declared = {t.name: t.datatype for t in meta.inputs}
        unknown = sorted(set(data) - set(declared))
        if unknown:
            raise UsageError(f"model '{args.model}' has no input {', '.join(unknown)} (it has {', '.join(declared)})")
        inputs = {
            name: a if declared[name] == "BYTES" else np.asarray(a, dtype=tensors.BY_NAME[declared[name]].np_dtype)
            for name, a in data.items()
        }
        rows = {a.shape[0] if a.ndim else 1 for a in inputs.values()}
        if len(rows) != 1:
            raise UsageError(f"--data: the arrays have different row counts {sorted(rows)}")
        n = rows.pop()
        config = client.config(args.model, args.model_version)
        warning = _capture_warning(client, args.server, args.model, config, n)
        if warning:
            print(f"tensorgate profile: warning: {warning}", file=sys.stderr)
        batch = args.batch_size or max(1, config.max_batch_size) or 1
        parts: dict[str, list[np.ndarray]] = {}
        for start in range(0, n, batch):
            result = client.infer(
                args.model, {k: v[start : start + batch] for k, v in inputs.items()}, version=args.model_version
            )
            for name, array in result.outputs.items():
                parts.setdefault(name, []).append(np.asarray(array))
    outputs = {name: np.concatenate(arrays, axis=0) for name, arrays in parts.items()}
    return {k: as_numbers(v) for k, v in inputs.items()}, {k: as_numbers(v) for k, v in outputs.items()}


def _capture_warning(client: InferenceClient, server: str, model: str, config: mc.ModelConfig, rows: int) -> str:
    """Why the reference rows about to be sent would sit in the model's monitored window ("" when they will not).

    A server with --data-dir captures answered requests, these too: in its window (the last 1000 requests by
    default) they pull drift toward the reference and hide a real shift until newer traffic replaces them. Requests
    cannot opt out of capture (any caller could then keep its traffic away from monitoring), so the remedy is a
    server that does not capture. Only such a server lacks the Monitoring service (UNIMPLEMENTED); a caller not
    allowed to read it cannot tell, and is warned conditionally.
    """
    import grpc

    from tensorgate.client.errors import TensorgateClientError
    from tensorgate.server.monitoring.capture import CaptureConfig

    if CaptureConfig.from_config(config).sample_rate <= 0.0:
        return ""
    advice = (
        f"the {rows} reference rows sent now are captured too and join the window the monitor judges, hiding drift "
        "until newer traffic replaces them; profile against a server of the same models without --data-dir "
        "(write the profile with --data-dir DIR or --out FILE)"
    )
    try:
        client.alerts(model)
    except TensorgateClientError as exc:
        if exc.code == grpc.StatusCode.UNIMPLEMENTED:
            return ""  # no Monitoring service: the server runs without --data-dir
        return f"cannot tell whether {server} captures ({exc.code.name}); if it runs with --data-dir, {advice}"
    return f"{server} captures model '{model}' predictions (--data-dir): {advice}"


# ----- export ------------------------------------------------------------------------------------------------


def _export(args: argparse.Namespace) -> int:
    from tensorgate.server.monitoring.export import export, open_store, parse_time

    now = time.time()
    since = None if args.since is None else parse_time(args.since, now)
    until = None if args.until is None else parse_time(args.until, now)
    store = open_store(args.data_dir)
    try:
        n = export(
            store,
            args.model,
            args.out,
            fmt=args.format,
            version=args.model_version,
            since=since,
            until=until,
            labelled_only=args.labelled_only,
        )
    finally:
        store.close()
    print(f"{args.out}: {n} rows of model '{args.model}' ({args.format})")
    return 0


# ----- monitor -----------------------------------------------------------------------------------------------


def _monitor(args: argparse.Namespace) -> int:
    from tensorgate.client.errors import FailedPrecondition
    from tensorgate.client.sync import InferenceClient
    from tensorgate.server.monitoring import report

    if args.watch < 1 or args.interval < 0:
        raise UsageError("--watch must be at least 1 and --interval not negative")
    tls = tls_from_args(args)
    headers = headers_from_args(args)
    window: dict[str, Any] = {"count": args.window_count, "seconds": args.window_seconds}
    drift = None
    with InferenceClient(args.server, timeout=args.timeout, tls=tls, headers=headers) as client:
        for poll in range(args.watch):
            if poll:
                time.sleep(args.interval)
            quality = client.model_quality(args.model, args.model_version, **window)
            try:
                drift = client.model_drift(args.model, args.model_version, **window)
            except FailedPrecondition as exc:  # no reference profile yet: quality alone is still worth printing
                drift = None
                print(f"drift: {exc.details}")
            alerts = client.alerts(args.model)
            print(report.format_quality(quality))
            if drift is not None:
                print(report.format_drift(drift, top=args.top))
            print(report.format_alerts(alerts))
            if args.out is not None:
                report.append_history(args.out, report.snapshot(quality, drift, alerts, time.time()))
    if args.out is not None:
        written = report.plot_history(report.read_history(args.out), args.out, args.model)
        if drift is not None and drift.features:
            written.append(report.plot_feature_drift(drift, args.out))
        for path in written:
            print(path)
    return 0
