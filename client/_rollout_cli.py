"""``tensorgate rollout MODEL``: where a model's rollout split stands, and what its ramp's next step waits for.

    tensorgate rollout digits                      # once
    tensorgate rollout digits --watch 30 --interval 10

Exit status: 0 when answered, 1 when the server refused (e.g. NOT_FOUND: no such model, or no split), 2 for a
usage error.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from tensorgate.client._cli import (
    UsageError,
    add_connection_arguments,
    failed_call,
    headers_from_args,
    tls_from_args,
)
from tensorgate.client._rollout import describe
from tensorgate.client.config import DEFAULT_TIMEOUT_S
from tensorgate.client.errors import TensorgateClientError
from tensorgate.client.sync import InferenceClient

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("rollout", help="print where a model's rollout split stands and what its ramp waits for")
    p.add_argument("model", help="model name")
    p.add_argument("--watch", type=int, default=1, metavar="N", help="poll N times (default 1)")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between polls with --watch (default 10)")
    add_connection_arguments(p, DEFAULT_TIMEOUT_S)


def run(args: argparse.Namespace) -> int:
    try:
        if args.watch < 1:
            raise UsageError("--watch must be at least 1")
        if not (args.interval >= 0 and math.isfinite(args.interval)):
            raise UsageError("--interval must be a finite number of seconds, 0 or more")
        tls = tls_from_args(args)
        headers = headers_from_args(args)
    except UsageError as exc:
        print(f"tensorgate rollout: {exc}", file=sys.stderr)
        return 2
    try:
        with InferenceClient(args.server, timeout=args.timeout, tls=tls, headers=headers) as client:
            for poll in range(args.watch):
                if poll:
                    time.sleep(args.interval)
                print(describe(client.rollout(args.model)), flush=True)
    except TensorgateClientError as exc:
        print(f"tensorgate rollout: {failed_call(args, exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C ends a --watch: no traceback
        return 130
    except (OSError, ValueError, TypeError) as exc:  # unreadable TLS files, a timeout that is no number of seconds
        print(f"tensorgate rollout: {exc}", file=sys.stderr)
        return 2
    return 0
