"""`tensorgate` command line: `serve` runs the server; `health`, `infer`, `bench`, `feedback`, `rollout` and the
monitoring commands call one; `certs` makes development certificates.

Every `serve` option can also come from the environment as TENSORGATE_<OPTION> (e.g. TENSORGATE_GRPC_PORT);
a flag on the command line wins over the variable. `health` takes its TLS files from TENSORGATE_HEALTH_TLS_CA,
_CERT, _KEY and _SERVER_NAME the same way, for a container HEALTHCHECK whose command line is fixed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tensorgate.server.settings import (
    AUTH_PROBES_MODES,
    CAPTURE_QUEUE_BYTES,
    CAPTURE_QUEUE_SIZE,
    MODEL_CONTROL_MODES,
    SHARED_MEMORY_MODES,
    ServerSettings,
)

_D = ServerSettings.__dataclass_fields__


_EXPECTED: dict[Callable[[str], Any], str] = {int: "a whole number", float: "a number"}
"""What a converter takes, in the words a refusal of a variable's value gives (as argparse's of a flag's)."""


def _env(name: str, default: Any, convert: Callable[[str], Any] = str) -> Any:
    variable = "TENSORGATE_" + name.upper().replace("-", "_")
    raw = os.environ.get(variable)
    if raw is None or raw == "":
        return default
    try:
        return convert(raw)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        why = f"expected {_EXPECTED[convert]}" if convert in _EXPECTED else str(exc)
        # A usage error, as the same value given as --NAME is (exit 2, one line).
        print(f"tensorgate: {variable}={raw!r}: {why}", file=sys.stderr)
        raise SystemExit(2) from exc


def _flag(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    # ArgumentTypeError: argparse shows this message; a ValueError would read "invalid _flag value".
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _patterns(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="serve a model repository over gRPC (KServe V2 / Triton protocol)")

    def opt(flag: str, convert: Callable[[str], Any], help_text: str, **kw: Any) -> None:
        name = flag.removeprefix("--")
        field = name.replace("-", "_")
        default = _D[field].default if field in _D and field != "model_repository" else None
        env_default = _env(name, default, convert)
        p.add_argument(
            flag,
            type=convert,
            default=env_default,
            help=f"{help_text} [env TENSORGATE_{field.upper()}]",
            **kw,
        )

    opt("--model-repository", Path, "model repository directory (Triton layout)")
    opt("--host", str, "address to listen on (default 127.0.0.1)")
    opt("--grpc-port", int, "gRPC port; 0 picks a free one (default 8001)")
    opt(
        "--reuse-port",
        _flag,
        "true: several tensorgate processes may share --grpc-port, the kernel spreading connections (default false)",
        nargs="?",
        const=True,
    )
    opt("--model-control-mode", str, "none | poll | explicit (default none)", choices=MODEL_CONTROL_MODES)
    opt(
        "--shared-memory",
        str,
        "off | system: let clients on this host pass tensors in POSIX shared memory regions (Triton's extension; "
        "a region maps any /dev/shm segment the server may open, so only where local callers are trusted; "
        "default off)",
        choices=SHARED_MEMORY_MODES,
    )
    p.add_argument(
        "--load-model",
        action="append",
        default=None,  # None: no flag given, and TENSORGATE_LOAD_MODEL applies (a flag replaces it, not adds)
        help="model to load at start in explicit mode; repeatable, '*' for all "
        "[env TENSORGATE_LOAD_MODEL, comma-separated]",
    )
    opt("--repository-poll-secs", float, "seconds between repository scans in poll mode (default 15)")
    opt(
        "--strict-readiness",
        _flag,
        "true: ServerReady only while every model is loaded and ready, remote upstreams included; false: once the "
        "server has started, whatever its models' readiness (default true, as Triton)",
        nargs="?",
        const=True,
    )
    p.add_argument(
        "--allowed-upstreams",
        type=_patterns,
        default=_env("allowed-upstreams", [], _patterns),
        help="comma-separated host:port patterns (wildcards: triton-*.internal:8001) of the upstream Tritons a "
        "config override sent with RepositoryModelLoad may name; default none: an override keeps its model's url "
        "on disk [env TENSORGATE_ALLOWED_UPSTREAMS]",
    )
    opt("--default-max-batch-size", int, "max_batch_size for ONNX models whose config omits it (default 4)")
    opt("--max-message-bytes", int, "largest request/response in bytes (default 256 MiB)")
    opt("--max-tensor-elements", int, "elements in one input tensor (default 64Mi); more is RESOURCE_EXHAUSTED")
    opt("--max-bytes-element", int, "bytes in one BYTES element (default 16 MiB); more is RESOURCE_EXHAUSTED")
    opt("--keepalive-time-s", float, "server keepalive ping interval (default 7200)")
    opt("--keepalive-timeout-s", float, "keepalive ping timeout (default 20)")
    opt("--min-client-ping-interval-s", float, "shortest client ping interval tolerated (default 5)")
    opt(
        "--max-connection-age-s",
        float,
        "send each client connection a GOAWAY after this long, so that clients reconnect: a rotated client CA "
        "reaches open connections (default 0: never)",
    )
    opt("--max-connection-age-grace-s", float, "calls running on an aged connection get this long (default 30)")
    opt("--shutdown-grace-s", float, "seconds in-flight requests get on SIGTERM (default 30)")
    opt("--log-level", str, "DEBUG | INFO | WARNING | ERROR | CRITICAL (default INFO)")
    opt("--tls-cert", Path, "PEM server certificate chain; with --tls-key the port speaks TLS only (re-read on change)")
    opt("--tls-key", Path, "PEM private key of --tls-cert")
    opt("--tls-client-ca", Path, "PEM CA bundle; clients must present a certificate it signed (mutual TLS)")
    opt("--auth-policy", Path, "YAML/JSON authorization policy mapping identities to models and APIs")
    opt(
        "--auth-probes",
        str,
        "open: health and reflection answer every caller; policy: they are authorized too (default open)",
        choices=AUTH_PROBES_MODES,
    )
    opt("--max-streams-per-connection", int, "concurrent calls per client connection (default 1024)")
    opt("--max-in-flight-per-identity", int, "calls one identity may run at once, a stream counts once (0: no limit)")
    opt("--max-in-flight-bytes", int, "input tensor bytes all requests running may hold together (0: no limit)")
    opt("--response-cache-bytes", int, "response cache size for models with response_cache enabled (0: none)")
    opt("--metrics-port", int, "Prometheus /metrics port, HTTPS with --tls-cert; 0 picks a free one, -1 is off (8002)")
    opt("--metrics-host", str, "address of the metrics port (default: --host; not with --metrics-port -1)")
    opt("--log-format", str, "text | json (default text)", choices=("text", "json"))
    opt("--otlp-endpoint", str, "OpenTelemetry collector for traces (off without it; OTEL_EXPORTER_OTLP_* also work)")
    opt("--otlp-protocol", str, "grpc | http/protobuf (default grpc)", choices=("grpc", "http/protobuf"))
    opt("--otlp-headers", str, "key=value,... headers sent to the collector")
    opt("--otlp-ca", Path, "PEM CA bundle of the collector's TLS certificate")
    opt("--otlp-insecure", _flag, "true: plaintext gRPC to the collector (default false)", nargs="?", const=True)
    opt(
        "--trace-sample-rate",
        float,
        "share of new traces kept, 0..1 (default: OTEL_TRACES_SAMPLER, else 1; a sampled caller is always traced)",
    )
    opt("--data-dir", Path, "turns monitoring on: prediction capture, feedback, quality, drift and alerts stored here")
    opt("--alert-rules", Path, "YAML alert rules for every model (needs --data-dir)")
    opt("--alert-webhook", str, "URL POSTed a JSON object per alert transition (needs --data-dir)")
    opt("--monitor-interval-s", float, "seconds between quality/drift/alert evaluations (default 10)")
    opt(
        "--capture-queue-size",
        int,
        f"captured predictions waiting to be stored; beyond it they are dropped ({CAPTURE_QUEUE_SIZE})",
    )
    opt(
        "--capture-queue-bytes",
        int,
        f"tensor bytes those waiting predictions may hold; beyond, dropped ({CAPTURE_QUEUE_BYTES // 2**20} MiB)",
    )
    opt("--capture-retention", int, "captured predictions kept per model; the oldest go first (default 1000000)")


def _health_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from tensorgate.client._cli import add_connection_arguments

    p = sub.add_parser("health", help="probe a server's grpc.health.v1 service; exit 0 when SERVING")
    add_connection_arguments(p, timeout=3.0)
    p.add_argument("--service", default="", help="service name to check (default: the whole server)")
    p.add_argument(
        "--live",
        action="store_true",
        help="liveness: exit 0 when the server answers at all, NOT_SERVING too (loading models, draining)",
    )
    # A container's HEALTHCHECK has a fixed command line: the probe's TLS files come from the environment
    # (TENSORGATE_HEALTH_TLS_CA, _CERT, _KEY, _SERVER_NAME); a flag wins over its variable.
    p.set_defaults(
        **{
            dest: _env(f"health-{dest}", None, convert)
            for dest, convert in (
                ("tls_ca", Path),
                ("tls_cert", Path),
                ("tls_key", Path),
                ("tls_server_name", str),
            )
        }
    )


def _certs_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("certs", help="create development certificates: a CA, a server cert and client certs")
    p.add_argument("directory", type=Path, help="where to write the PEM files (created if missing)")
    p.add_argument(
        "--client",
        action="append",
        default=[],
        metavar="NAME",
        help="a client certificate for spiffe://tensorgate.local/NAME (CN NAME); repeatable",
    )


def _infer_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # The command belongs to the client package; only the entry point is shared with the server.
    from tensorgate.client import _cli

    _cli.add_parser(sub)


def _bench_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # The load-test harness is a package of its own (tensorgate.loadtest); only the entry point is shared.
    from tensorgate.loadtest import cli

    cli.add_parser(sub)


def _feedback_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # Ground-truth feedback is a client command (tensorgate.client._feedback_cli); only the entry point is shared.
    from tensorgate.client import _feedback_cli

    _feedback_cli.add_parser(sub)


def _rollout_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # A client command too (tensorgate.client._rollout_cli).
    from tensorgate.client import _rollout_cli

    _rollout_cli.add_parser(sub)


def _monitoring_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # profile, export and monitor live with the monitoring package; only the entry point is shared.
    from tensorgate.server.monitoring import cli

    cli.add_parsers(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tensorgate", description=" ".join(__doc__.split("\n\n")[0].split()))
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _health_parser(sub)
    _certs_parser(sub)
    _infer_parser(sub)
    _bench_parser(sub)
    _feedback_parser(sub)
    _rollout_parser(sub)
    _monitoring_parsers(sub)
    return parser


def _run_serve(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("onnxruntime") is None:
        print(
            "tensorgate serve: ONNX Runtime is not installed; install tensorgate[cpu] or tensorgate[gpu]",
            file=sys.stderr,
        )
        return 2
    from tensorgate.server.app import serve

    if args.model_repository is None:
        print(
            "tensorgate serve: --model-repository (or TENSORGATE_MODEL_REPOSITORY) is required",
            file=sys.stderr,
        )
        return 2
    try:
        settings = ServerSettings(
            model_repository=args.model_repository,
            host=args.host,
            grpc_port=args.grpc_port,
            reuse_port=args.reuse_port,
            shared_memory=args.shared_memory,
            model_control_mode=args.model_control_mode,
            load_model=list(
                args.load_model
                if args.load_model is not None
                else _env("load-model", [], lambda v: [x for x in v.split(",") if x])
            ),
            repository_poll_secs=args.repository_poll_secs,
            strict_readiness=args.strict_readiness,
            allowed_upstreams=args.allowed_upstreams,
            default_max_batch_size=args.default_max_batch_size,
            max_message_bytes=args.max_message_bytes,
            max_tensor_elements=args.max_tensor_elements,
            max_bytes_element=args.max_bytes_element,
            keepalive_time_s=args.keepalive_time_s,
            keepalive_timeout_s=args.keepalive_timeout_s,
            min_client_ping_interval_s=args.min_client_ping_interval_s,
            max_connection_age_s=args.max_connection_age_s,
            max_connection_age_grace_s=args.max_connection_age_grace_s,
            shutdown_grace_s=args.shutdown_grace_s,
            log_level=args.log_level,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            auth_policy=args.auth_policy,
            auth_probes=args.auth_probes,
            max_streams_per_connection=args.max_streams_per_connection,
            max_in_flight_per_identity=args.max_in_flight_per_identity,
            max_in_flight_bytes=args.max_in_flight_bytes,
            response_cache_bytes=args.response_cache_bytes,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            log_format=args.log_format,
            otlp_endpoint=args.otlp_endpoint,
            otlp_protocol=args.otlp_protocol,
            otlp_headers=args.otlp_headers,
            otlp_ca=args.otlp_ca,
            otlp_insecure=args.otlp_insecure,
            trace_sample_rate=args.trace_sample_rate,
            data_dir=args.data_dir,
            alert_rules=args.alert_rules,
            alert_webhook=args.alert_webhook,
            monitor_interval_s=args.monitor_interval_s,
            capture_queue_size=args.capture_queue_size,
            capture_queue_bytes=args.capture_queue_bytes,
            capture_retention=args.capture_retention,
        )
    except ValueError as exc:
        print(f"tensorgate serve: {as_flags(str(exc))}", file=sys.stderr)
        return 2
    from tensorgate.server.telemetry.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    from tensorgate.server.auth import CertificateError, PolicyError

    stops: tuple[type[Exception], ...] = (FileNotFoundError, OSError, CertificateError, PolicyError)
    if settings.alert_rules is not None:  # imported only then: the monitoring package loads scipy
        from tensorgate.server.monitoring.alerts import AlertRuleError

        stops += (AlertRuleError,)
    if settings.data_dir is not None:  # a store written by a newer tensorgate: one line, not a traceback
        from tensorgate.server.monitoring.store import StoreLayoutError

        stops += (StoreLayoutError,)
    try:
        asyncio.run(serve(settings))
    except stops as exc:
        logging.getLogger("tensorgate").error("%s%s", _flag_of_file(settings, exc), exc)
        return 1
    return 0


def _flag_of_file(settings: ServerSettings, exc: Exception) -> str:
    """ "--tls-cert: " when `exc` is about the file a flag named (a missing --tls-cert said only "[Errno 2] No such
    file or directory: '...'", leaving the operator to guess which of the files it was), else ""."""
    filename = getattr(exc, "filename", None)
    if filename is None:
        return ""
    for f in dataclasses.fields(ServerSettings):
        value = getattr(settings, f.name)
        if isinstance(value, Path) and str(value) == str(filename):
            return f"--{f.name.replace('_', '-')}: "
    return ""


def as_flags(message: str) -> str:
    """ServerSettings' refusals name its fields, the words of its Python API; on the command line each is the flag
    spelled the same with dashes (a test holds every field to that), which is what the user typed."""
    fields = {f.name for f in dataclasses.fields(ServerSettings)}
    return re.sub(
        r"(?<![\w/.-])([a-z]+(?:_[a-z0-9]+)+)(?![\w/.-])",
        lambda m: "--" + m[1].replace("_", "-") if m[1] in fields else m[1],
        message,
    )


def _run_health(args: argparse.Namespace) -> int:
    from tensorgate.client import InferenceClient, TensorgateClientError
    from tensorgate.client._cli import UsageError, failed_call, headers_from_args, tls_from_args

    try:
        tls = tls_from_args(args)
        headers = headers_from_args(args)
    except UsageError as exc:
        print(f"tensorgate health: {exc}", file=sys.stderr)
        return 2
    try:
        with InferenceClient(args.server, timeout=args.timeout, tls=tls, headers=headers) as client:
            status = client.health(args.service)
    except TensorgateClientError as exc:
        print(f"tensorgate health: {failed_call(args, exc)}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:  # unreadable TLS files: one line, as `tensorgate infer` says it
        print(f"tensorgate health: {exc}", file=sys.stderr)
        return 2
    # A server that answers NOT_SERVING is up, still loading its models or draining: alive, not ready. A container
    # health check asks for liveness, and one that failed during a long load would have the container killed.
    live = args.live and status == "NOT_SERVING"
    print(f"{args.server}: {status}" + (" (live)" if live else ""))
    return 0 if status == "SERVING" or live else 1


def _run_certs(args: argparse.Namespace) -> int:
    from tensorgate.server.auth.certs import write_dev_certs

    try:
        written = write_dev_certs(args.directory, args.client)
    except (ValueError, OSError) as exc:
        print(f"tensorgate certs: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _run_serve(args)
    if args.command == "certs":
        return _run_certs(args)
    if args.command == "infer":
        from tensorgate.client import _cli

        return _cli.run(args)
    if args.command == "feedback":
        from tensorgate.client import _feedback_cli

        return _feedback_cli.run(args)
    if args.command == "rollout":
        from tensorgate.client import _rollout_cli

        return _rollout_cli.run(args)
    if args.command == "bench":
        from tensorgate.loadtest import cli as bench_cli

        return bench_cli.run(args)
    if args.command in ("profile", "export", "monitor"):
        from tensorgate.server.monitoring import cli as monitoring_cli

        return monitoring_cli.run(args)
    return _run_health(args)


if __name__ == "__main__":
    sys.exit(main())
