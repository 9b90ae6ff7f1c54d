"""The README's monitoring walk-through as one script: quality, drift and an alert on the example digits model.

It starts nothing itself: it talks to a server already running with monitoring on, e.g.::

    python examples/build_models.py
    tensorgate serve --model-repository examples/models --data-dir /tmp/tensorgate-data \\
        --alert-rules examples/monitoring-alerts.yaml --monitor-interval-s 2
    python examples/monitoring_walkthrough.py --server 127.0.0.1:8001 --data-dir /tmp/tensorgate-data

Steps:
1. ``tensorgate profile``: the classifier's training split, sent through the server, becomes the reference
   profile (inputs and the model's real output scores) in ``<data-dir>/profiles/digits.json``.
2. The held-out digits go to the server in batches of 10, and their true labels follow as feedback: accuracy and
   F1 are high, and the window's drift stays below the alert thresholds.
3. The same digits inverted (16 - pixel), with their labels: accuracy falls, the input features drift, and the
   monitor loop fires the alert rules of examples/monitoring-alerts.yaml (printed once the server lists them).

Two flags write the files that README's by-hand steps read, and stop there:

    python examples/monitoring_walkthrough.py --write-reference reference.npy    # the training rows; no server
    python examples/monitoring_walkthrough.py --server 127.0.0.1:8001 --labels-out labels.jsonl

``--labels-out`` sends the held-out digits as step 2 does, and writes each request's id with its true labels
(``{"id": "...", "label": [2, 0, ...]}`` per line) for ``tensorgate feedback digits --file labels.jsonl``,
instead of sending them itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from tensorgate.client import InferenceClient
from tensorgate.server.cli import main as tensorgate
from tensorgate.server.monitoring.report import format_alerts, format_drift, format_quality

MODEL = "digits"
BATCH = 10
HERE = Path(__file__).resolve().parent


def reference_rows(models: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(training inputs, held-out inputs, held-out labels): the split examples/build_models.py trained on."""
    held_out = np.load(models / MODEL / "test_data.npz")
    x, y = load_digits(return_X_y=True)
    x_train, x_test, _, _ = train_test_split(
        x.astype(np.float32), y.astype(np.int64), test_size=0.25, random_state=0, stratify=y
    )
    if not np.array_equal(x_test, held_out["X_test"]):
        raise SystemExit(f"{models}/{MODEL}/test_data.npz is not build_models.py's split (built with another seed?)")
    return x_train, held_out["X_test"], held_out["y_test"]


def infer(client: InferenceClient, x: np.ndarray, y: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Infer in batches of BATCH rows; each request's id (the one its response carries) with its true labels."""
    labelled: list[tuple[str, np.ndarray]] = []
    for start in range(0, len(x), BATCH):
        result = client.infer(MODEL, {"input": x[start : start + BATCH]})
        labelled.append((result.id, y[start : start + BATCH]))
    return labelled


def write_labels(path: Path, labelled: list[tuple[str, np.ndarray]]) -> None:
    """The JSONL file `tensorgate feedback --file` reads: one request a line, one label per row of it."""
    with path.open("w", encoding="utf-8") as f:
        for request_id, labels in labelled:
            f.write(json.dumps({"id": request_id, "label": labels.tolist()}) + "\n")


def send(client: InferenceClient, x: np.ndarray, y: np.ndarray) -> int:
    """Infer in batches of BATCH rows, then send each request's true labels as feedback; returns requests sent."""
    labelled = infer(client, x, y)
    refused = [s for s in client.submit_feedback_batch(MODEL, labelled) if not s.ok]
    if refused:
        raise SystemExit(f"feedback refused: {refused[0].code.name}: {refused[0].message}")
    return len(labelled)


def show(client: InferenceClient, requests: int) -> None:
    """Quality and drift of the last ``requests`` requests, and the alerts firing now."""
    print(format_quality(client.model_quality(MODEL, count=requests)))
    print(format_drift(client.model_drift(MODEL, count=requests), top=5))
    print(format_alerts(client.alerts(MODEL)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--server", default="127.0.0.1:8001", help="host:port of the running server")
    parser.add_argument("--data-dir", type=Path, default=None, help="the server's --data-dir (for the profile)")
    parser.add_argument("--models", type=Path, default=HERE / "models", help="the repository build_models.py wrote")
    parser.add_argument("--wait-s", type=float, default=60.0, help="how long to wait for the alerts (default 60)")
    parser.add_argument(
        "--alert-rules", type=Path, default=HERE / "monitoring-alerts.yaml", help="the server's --alert-rules"
    )
    by_hand = parser.add_mutually_exclusive_group()
    by_hand.add_argument(
        "--write-reference", type=Path, default=None, metavar="FILE", help="write the training rows to FILE.npy, stop"
    )
    by_hand.add_argument(
        "--labels-out",
        type=Path,
        default=None,
        metavar="FILE",
        help="send the held-out digits, write their request ids and labels to FILE.jsonl (no feedback), stop",
    )
    args = parser.parse_args(argv)

    x_train, x_test, y_test = reference_rows(args.models)
    if args.write_reference is not None:
        np.save(args.write_reference, x_train)
        print(f"{args.write_reference}: {len(x_train)} training rows of {MODEL}")
        return 0
    if args.labels_out is not None:
        with InferenceClient(args.server, timeout=30) as client:
            labelled = infer(client, x_test, y_test)
        write_labels(args.labels_out, labelled)
        print(f"{args.labels_out}: the labels of {len(labelled)} requests ({len(x_test)} held-out digits)")
        return 0
    if args.data_dir is None:
        parser.error("--data-dir is required (unless --write-reference or --labels-out)")
    with tempfile.TemporaryDirectory() as tmp:
        reference = Path(tmp) / "reference.npy"
        np.save(reference, x_train)
        print(f"$ tensorgate profile {MODEL} --data reference.npy --server {args.server} --data-dir {args.data_dir}")
        code = tensorgate(
            ["profile", MODEL, "--data", str(reference), "--server", args.server, "--data-dir", str(args.data_dir)]
        )
        if code != 0:
            return code

    with InferenceClient(args.server, timeout=30) as client:
        print("\n== held-out digits, with their labels as feedback ==")
        show(client, send(client, x_test, y_test))

        print("\n== the same digits inverted (16 - pixel) ==")
        show(client, send(client, (16.0 - x_test).astype(np.float32), y_test))

        print(f"\n== waiting up to {args.wait_s:g} s for the monitor loop to fire the alert rules ==")
        # Every rule of the model, not the first to fire: a monitor run that saw part of the inverted digits may
        # fire one rule a run before the others.
        rules = {r["name"] for r in yaml.safe_load(args.alert_rules.read_text())["rules"] if r.get("model") == MODEL}
        deadline = time.monotonic() + args.wait_s
        while {a.rule for a in client.alerts(MODEL)} < rules and time.monotonic() < deadline:
            time.sleep(0.5)
        alerts = client.alerts(MODEL)
        print(format_alerts(alerts))
    return 0 if {a.rule for a in alerts} >= rules else 1


if __name__ == "__main__":
    sys.exit(main())
