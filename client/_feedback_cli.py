"""``tensorgate feedback MODEL``: send ground truth for answered requests (one, or a JSONL/CSV file of them).

    tensorgate feedback digits --id 7f0c... --label 3
    tensorgate feedback digits --file labels.jsonl      # {"id": "7f0c...", "label": 3} per line
    tensorgate feedback digits --file labels.csv        # header "id,label"; one row per request

The labels go over one SubmitFeedbackStream call, each acknowledged once the server has committed it; --timeout
is the deadline per 1000 labels.

Exit status: 0 when every label was accepted, 1 when some were refused (each refusal is printed to stderr),
2 for a usage error.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

from tensorgate.client._cli import (
    UsageError,
    add_connection_arguments,
    failed_call,
    headers_from_args,
    tls_from_args,
)
from tensorgate.client._monitoring import Label, describe_failure
from tensorgate.client.config import DEFAULT_TIMEOUT_S
from tensorgate.client.errors import TensorgateClientError
from tensorgate.client.sync import InferenceClient

__all__ = ["add_parser", "read_labels", "run"]

CHUNK = 1000
"""--timeout is the deadline per this many labels: the stream's deadline grows with the file."""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("feedback", help="send ground-truth labels for answered requests (the server needs --data-dir)")
    p.add_argument("model", help="model name")
    p.add_argument("--id", dest="request_id", default=None, help="request id that the inference response carried")
    p.add_argument("--label", default=None, help="the label: a number or text (a JSON list for several rows)")
    p.add_argument("--file", type=Path, default=None, help="labels.jsonl ({'id':..., 'label':...}) or labels.csv")
    add_connection_arguments(p, DEFAULT_TIMEOUT_S)


def _value(text: str) -> Label:
    """'3' -> 3.0, '[1, 2]' -> [1, 2], anything else stays text."""
    try:
        value: Any = json.loads(text)
    except ValueError:
        return text
    if isinstance(value, bool) or value is None or isinstance(value, dict):
        return text
    return value  # type: ignore[no-any-return]


def read_labels(path: Path) -> list[tuple[str, Label]]:
    """(request id, label) pairs from a JSONL or CSV file; UsageError names the line that is wrong."""
    items: list[tuple[str, Label]] = []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            if path.suffix.lower() == ".csv":
                reader = csv.DictReader(f)
                if reader.fieldnames is None or not {"id", "label"} <= set(reader.fieldnames):
                    raise UsageError(f"{path}: the CSV header must name the columns id and label")
                for n, row in enumerate(reader, start=2):
                    if not row.get("id"):
                        raise UsageError(f"{path}:{n}: empty id")
                    items.append((row["id"], _value(row.get("label") or "")))
            else:
                for n, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except ValueError as exc:
                        raise UsageError(f"{path}:{n}: not JSON: {exc}") from None
                    if not isinstance(obj, dict) or not isinstance(obj.get("id"), str) or "label" not in obj:
                        raise UsageError(f'{path}:{n}: expected {{"id": "...", "label": ...}}')
                    items.append((obj["id"], obj["label"]))
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror or exc}") from None
    return items


def run(args: argparse.Namespace) -> int:
    try:
        if args.file is not None:
            if args.request_id is not None or args.label is not None:
                raise UsageError("give either --file or --id with --label, not both")
            items = read_labels(args.file)
        elif args.request_id is not None and args.label is not None:
            items = [(args.request_id, _value(args.label))]
        else:
            raise UsageError("give --id and --label, or --file")
        tls = tls_from_args(args)
        headers = headers_from_args(args)
    except UsageError as exc:
        print(f"tensorgate feedback: {exc}", file=sys.stderr)
        return 2
    accepted = refused = 0
    try:
        with InferenceClient(args.server, timeout=args.timeout, tls=tls, headers=headers) as client:
            timeout = args.timeout * max(1, math.ceil(len(items) / CHUNK))
            for status in client.submit_feedback_stream(args.model, items, timeout=timeout):
                if status.ok:
                    accepted += 1
                else:
                    refused += 1
                    print(f"{status.request_id}: {status.code.name}: {status.message}", file=sys.stderr)
    except TensorgateClientError as exc:
        print(f"tensorgate feedback: {failed_call(args, exc, describe_failure(exc))}", file=sys.stderr)
        return 1
    except (OSError, ValueError, TypeError) as exc:  # unreadable TLS files, a timeout that is no number of seconds
        print(f"tensorgate feedback: {exc}", file=sys.stderr)
        return 2
    print(f"accepted {accepted} of {accepted + refused} label(s) for model '{args.model}'")
    return 0 if refused == 0 else 1
