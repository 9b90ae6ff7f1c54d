"""Server settings: one dataclass, filled from the command line, each option also from a TENSORGATE_* variable.

Per-model settings live in the model repository (config.pbtxt), never here.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from tensorgate.server.backends.upstream_targets import pattern_problem

MODEL_CONTROL_MODES = ("none", "poll", "explicit")
AUTH_PROBES_MODES = ("open", "policy")
SHARED_MEMORY_MODES = ("off", "system")
_MONITORING_OPTIONS = (
    "alert_rules",
    "alert_webhook",
    "monitor_interval_s",
    "capture_queue_size",
    "capture_queue_bytes",
    "capture_retention",
)
_TRACING_OPTIONS = ("otlp_protocol", "otlp_headers", "otlp_ca", "otlp_insecure", "trace_sample_rate")


CAPTURE_QUEUE_SIZE = 10_000
CAPTURE_QUEUE_BYTES = 256 * 2**20
"""The capture queue's defaults (monitoring/capture.py's `Capture`), here: that package loads scipy, and the
settings and the command line must not."""

_MAX_GRPC_SECONDS = 2_147_483
"""gRPC takes keepalive times as int32 milliseconds: longer ones overflow when the server starts."""


def otlp_endpoint_given(endpoint: str | None) -> bool:
    """Whether a collector is named, by the flag or OpenTelemetry's own variables: what turns tracing on (here, so
    that the settings' checks and the tracing they configure agree; OTEL_SDK_DISABLED=true still turns it off)."""
    return bool(
        endpoint
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


@dataclass(slots=True)
class ServerSettings:
    model_repository: Path
    """Directory in Triton's layout: <model>/config.pbtxt and <model>/<version>/model.onnx."""
    host: str = "127.0.0.1"
    """Address to listen on; the default keeps an unconfigured server off the network."""
    grpc_port: int = 8001
    """0 picks a free port; the bound port is logged on the 'listening' line."""
    shared_memory: str = "off"
    """"system": clients on this host may register POSIX shared memory regions and name them for inputs and outputs
    (Triton's system shared memory extension). Off by default: a region maps any segment the server's user may
    open in /dev/shm."""
    reuse_port: bool = False
    """Let several tensorgate processes on this host listen on grpc_port together (SO_REUSEPORT): the kernel
    spreads new connections across them, each with its own GIL. Off, a second server on the port fails to start."""
    model_control_mode: str = "none"
    """none: load everything at start; poll: also follow changes on disk; explicit: load/unload by RPC only."""
    load_model: list[str] = field(default_factory=list)
    """Models to load at start in explicit mode ('*' for all)."""
    repository_poll_secs: float = 15.0
    strict_readiness: bool = True
    """As Triton's --strict-readiness. True: ServerReady (and the health of the inference service) is true only
    while every model that should be loaded is, and ready, a remote model's upstream included. False: true once
    the server has started, whatever its models' readiness (ModelReady still tells each model's)."""
    allowed_upstreams: list[str] = field(default_factory=list)
    """host:port patterns (shell wildcards: `triton-*.internal:8001`) of the upstream Triton servers that a config
    override sent with RepositoryModelLoad may name in `tensorgate.triton.url`. Empty: an override may name only
    the url its model's config.pbtxt in the repository names (a caller allowed to load a model must not make the
    server connect to any host it likes). The repository's own config.pbtxt files may name any upstream."""
    default_max_batch_size: int = 4
    """max_batch_size given to ONNX models whose config leaves it out and whose first dimension is dynamic."""
    max_message_bytes: int = 256 * 1024 * 1024
    """Largest request or response; bigger messages get RESOURCE_EXHAUSTED before they are decoded."""
    keepalive_time_s: float = 7200.0
    keepalive_timeout_s: float = 20.0
    min_client_ping_interval_s: float = 5.0
    """Clients may ping this often without being disconnected (gRPC's own default is 5 minutes); pinging more often
    while no data flows is forgiven twice, then answered with GOAWAY "too_many_pings"."""
    max_connection_age_s: float = 0.0
    """Each client connection gets a GOAWAY this long after it opened (gRPC adds up to 10% jitter), and clients
    reconnect: a client CA removed or a certificate revoked on rotation then reaches connections that are already
    open, and new replicas get their share of long-lived clients. 0: never."""
    max_connection_age_grace_s: float = 30.0
    """Calls still running on a connection past its age get this long before the connection closes under them."""
    shutdown_grace_s: float = 30.0
    """On SIGTERM, in-flight requests get this long to finish."""
    log_level: str = "INFO"
    tls_cert: Path | None = None
    """PEM certificate chain of the server; with tls_key, the gRPC port speaks TLS only. Re-read when it changes."""
    tls_key: Path | None = None
    """PEM private key of tls_cert (unencrypted)."""
    tls_client_ca: Path | None = None
    """PEM CA bundle: clients must present a certificate that chains to it (mutual TLS). Re-read when it changes."""
    auth_policy: Path | None = None
    """YAML/JSON authorization policy (identities -> models and API groups); re-read when it changes."""
    auth_probes: str = "open"
    """open: grpc.health.v1 and reflection answer every caller (probes); policy: they are authorized like the
    inference service (health group; reflection in the metadata group)."""
    max_tensor_elements: int = 64 * 1024 * 1024
    """Elements in one input tensor; more is RESOURCE_EXHAUSTED before the data is decoded."""
    max_bytes_element: int = 16 * 1024 * 1024
    """Bytes in one BYTES element."""
    max_streams_per_connection: int = 1024
    """HTTP/2 streams (calls) one connection may have open at once; clients queue calls beyond it."""
    max_in_flight_per_identity: int = 0
    """Calls one identity may have running at once (a stream counts as one); 0: no limit. RESOURCE_EXHAUSTED past it."""
    max_in_flight_bytes: int = 0
    """Bytes of input tensors that the requests admitted and not yet answered may hold together (each message of a
    stream counts on its own); a request that would go past it answers RESOURCE_EXHAUSTED at once. 0: no limit
    (the memory a server may take depends on its container, which the process cannot see reliably)."""
    response_cache_bytes: int = 0
    """Size of the response cache (Triton's): answers of models whose config has response_cache { enable: true }
    are kept and reused for identical requests. 0: no cache."""
    metrics_port: int = 8002
    """Prometheus /metrics over HTTP (HTTPS with tls_cert); 0 picks a free port, -1 turns metrics off."""
    metrics_host: str | None = None
    """Address of the metrics port; None: the same as `host`."""
    log_format: str = "text"
    """text, or json (one object per line); records inside a request carry its trace and span ids."""
    otlp_endpoint: str | None = None
    """OpenTelemetry collector for traces (grpc: host:port; http/protobuf: http(s)://host:port/v1/traces); tracing
    is off without it unless the standard OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT variable is set."""
    otlp_protocol: str | None = None
    """grpc or http/protobuf (None: OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, else grpc)."""
    otlp_headers: str = ""
    """key=value,key2=value2 sent with every export (e.g. a collector's API key)."""
    otlp_ca: Path | None = None
    """PEM CA bundle for the collector's TLS certificate."""
    otlp_insecure: bool = False
    """Plaintext gRPC to the collector (e.g. a sidecar on localhost)."""
    trace_sample_rate: float | None = None
    """Share of new traces sampled, 0..1; a sampled caller is always traced. None: OTEL_TRACES_SAMPLER (and its
    OTEL_TRACES_SAMPLER_ARG) decide, every new trace kept when they are unset."""
    data_dir: Path | None = None
    """Monitoring on: captured predictions, feedback and reference profiles live here (SQLite, WAL); off without it."""
    alert_rules: Path | None = None
    """YAML file of alert rules applied to every model (besides each model's tensorgate.alert.* parameters)."""
    alert_webhook: str | None = None
    """URL that receives a JSON POST per alert transition (fired, resolved)."""
    monitor_interval_s: float = 10.0
    """Seconds between two evaluations of quality, drift and alerts."""
    capture_queue_size: int = CAPTURE_QUEUE_SIZE
    """Predictions waiting to be stored; past it samples are dropped (and counted), never requests."""
    capture_queue_bytes: int = CAPTURE_QUEUE_BYTES
    """Tensor bytes the waiting predictions may hold (each keeps its request's and response's buffers alive); past
    it samples are dropped too."""
    capture_retention: int = 1_000_000
    """Predictions kept per model in the store; the oldest go first."""

    def __post_init__(self) -> None:
        for name in type(self).__dataclass_fields__:
            value = getattr(self, name)
            # nan passes every comparison below (nan <= 0 is False), and inf would never come round: both start a
            # server that then never polls, drains or evaluates as asked.
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        if self.model_control_mode not in MODEL_CONTROL_MODES:
            raise ValueError(
                f"model_control_mode must be one of {MODEL_CONTROL_MODES}, got {self.model_control_mode!r}"
            )
        if self.shared_memory not in SHARED_MEMORY_MODES:
            raise ValueError(f"shared_memory must be one of {SHARED_MEMORY_MODES}, got {self.shared_memory!r}")
        if self.auth_probes not in AUTH_PROBES_MODES:
            raise ValueError(f"auth_probes must be one of {AUTH_PROBES_MODES}, got {self.auth_probes!r}")
        if not 0 <= self.grpc_port <= 65535:
            raise ValueError(f"grpc_port must be in 0..65535, got {self.grpc_port}")
        if self.reuse_port and self.grpc_port == 0:
            raise ValueError("reuse_port needs a fixed grpc_port: with port 0 every process gets a port of its own")
        for name in ("keepalive_time_s", "keepalive_timeout_s", "min_client_ping_interval_s"):
            value = getattr(self, name)
            if not 0 < value <= _MAX_GRPC_SECONDS:
                raise ValueError(f"{name} must be in (0, {_MAX_GRPC_SECONDS}] seconds, got {value}")
        if not 0 <= self.max_connection_age_s <= _MAX_GRPC_SECONDS:
            raise ValueError(
                f"max_connection_age_s must be in [0, {_MAX_GRPC_SECONDS}] seconds (0: never), got "
                f"{self.max_connection_age_s}"
            )
        if not 0 < self.max_connection_age_grace_s <= _MAX_GRPC_SECONDS:
            raise ValueError(
                f"max_connection_age_grace_s must be in (0, {_MAX_GRPC_SECONDS}] seconds, got "
                f"{self.max_connection_age_grace_s}"
            )
        if self.shutdown_grace_s < 0:
            raise ValueError(f"shutdown_grace_s must be >= 0, got {self.shutdown_grace_s}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(f"log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {self.log_level!r}")
        if self.alert_webhook and not self.alert_webhook.startswith(("http://", "https://")):
            # Not echoed: webhook URLs carry their secret in the path or query, and this line lands in logs.
            raise ValueError("alert_webhook must be an http:// or https:// URL (the value given is not shown)")
        for pattern in self.allowed_upstreams:
            problem = pattern_problem(pattern)
            if problem is not None:
                raise ValueError(problem)
        if self.default_max_batch_size < 0:
            raise ValueError(f"default_max_batch_size must be >= 0, got {self.default_max_batch_size}")
        if self.repository_poll_secs <= 0:
            raise ValueError("repository_poll_secs must be positive")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key as well")
        if self.max_tensor_elements < 1 or self.max_bytes_element < 0:
            raise ValueError("max_tensor_elements must be >= 1 and max_bytes_element >= 0")
        if self.max_streams_per_connection < 1:
            raise ValueError("max_streams_per_connection must be at least 1")
        if self.max_in_flight_per_identity < 0:
            raise ValueError("max_in_flight_per_identity must be >= 0 (0: no limit)")
        if self.max_in_flight_bytes < 0:
            raise ValueError(f"max_in_flight_bytes must be >= 0 (0: no limit), got {self.max_in_flight_bytes}")
        if self.response_cache_bytes < 0:
            raise ValueError("response_cache_bytes must be >= 0 (0: no cache)")
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in 0..65535, or -1 to turn metrics off; got {self.metrics_port}")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format must be text or json, got {self.log_format!r}")
        if self.otlp_protocol not in (None, "grpc", "http/protobuf"):
            raise ValueError(f"otlp_protocol must be grpc or http/protobuf, got {self.otlp_protocol!r}")
        items = [h for h in self.otlp_headers.split(",") if h.strip()]
        bad = [i for i, h in enumerate(items, 1) if not h.partition("=")[0].strip() or "=" not in h]
        if bad:
            # Not echoed: the values are credentials (an API key), and this line lands in logs.
            raise ValueError(
                f"otlp_headers must be key=value pairs separated by commas; pair {bad[0]} of {len(items)} is not "
                "(the value given is not shown)"
            )
        if self.trace_sample_rate is not None and not 0.0 <= self.trace_sample_rate <= 1.0:
            raise ValueError(f"trace_sample_rate must be in 0..1, got {self.trace_sample_rate}")
        if self.monitor_interval_s <= 0:
            raise ValueError(f"monitor_interval_s must be positive, got {self.monitor_interval_s}")
        if self.capture_queue_size < 1 or self.capture_retention < 1:
            raise ValueError("capture_queue_size and capture_retention must be at least 1")
        if self.capture_queue_bytes < 1:
            raise ValueError(f"capture_queue_bytes must be at least 1, got {self.capture_queue_bytes}")
        # Options of a feature that is off would be accepted and do nothing: most likely the option that turns it
        # on was forgotten, and the operator believes predictions are watched, or spans sampled as asked.
        if self.data_dir is None:
            self._refuse_given(_MONITORING_OPTIONS, "data_dir (monitoring is off without it)")
        if not otlp_endpoint_given(self.otlp_endpoint):
            self._refuse_given(
                _TRACING_OPTIONS, "otlp_endpoint or OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT (tracing is off without one)"
            )
        if self.metrics_port == -1:
            self._refuse_given(("metrics_host",), "metrics on (metrics_port -1 turns them off)")
        if self.max_message_bytes <= 0 or self.max_message_bytes > 2**31 - 1:
            raise ValueError("max_message_bytes must be in 1..2147483647")

    def _refuse_given(self, names: tuple[str, ...], needed: str) -> None:
        fields = type(self).__dataclass_fields__
        given = [
            name
            for name in names
            # "" counts as not given: `--alert-webhook "$WEBHOOK"` with the variable unset; 0.0 is given
            if (value := getattr(self, name)) is not None and value != "" and value != fields[name].default
        ]
        if given:
            need = "needs" if len(given) == 1 else "need"
            raise ValueError(f"{', '.join(given)} {need} {needed}")
