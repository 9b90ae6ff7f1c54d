"""Channel settings of the client: TLS/mTLS, opt-in retries, message size, keepalive.

Usage::

    tls = TLSConfig(ca_file="ca.pem", cert_file="client.pem", key_file="client.key")
    retry = RetryPolicy(max_attempts=4)
    client = InferenceClient("models.internal:8001", tls=tls, retry=retry)
"""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from tensorgate.protos.service import SERVICE_NAME, methods

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "DEFAULT_TIMEOUT_S", "ChannelSettings", "RetryPolicy", "TLSConfig"]

DEFAULT_TIMEOUT_S = 30.0
"""The deadline of every call that names none (tritonclient's default is no deadline at all)."""

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
"""As the server's default ``--max-message-bytes``; gRPC's own receive limit (4 MiB) is too small for tensors."""

HEALTH_SERVICE = "grpc.health.v1.Health"


@dataclass(frozen=True)
class TLSConfig:
    """Server authentication (``ca_file``) and, with ``cert_file`` + ``key_file``, client authentication (mTLS).

    ``ca_file=None`` trusts the system roots. ``server_name_override`` checks the server's certificate against
    this name instead of the host in the address (e.g. when connecting to an IP); for tests and odd networks.

    The files are checked when the config is made, since gRPC only finds a bad one at the first call, as an
    UNAVAILABLE that looks like a server down: FileNotFoundError (or another OSError) for a file that cannot be
    read, ValueError for a ``ca_file`` or ``cert_file`` without a PEM certificate, or a ``key_file`` without an
    unencrypted PEM private key or not the certificate's. Key sizes and digests are gRPC's TLS's to judge, not this
    check's. The files are read again when a client is made with it.
    """

    ca_file: str | Path | None = None
    cert_file: str | Path | None = None
    key_file: str | Path | None = None
    server_name_override: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("TLSConfig: cert_file and key_file go together (both for mTLS, or neither)")
        for name, path in (("ca_file", self.ca_file), ("cert_file", self.cert_file), ("key_file", self.key_file)):
            try:
                if path is not None:
                    Path(path).read_bytes()
            except OSError as exc:  # the same type (FileNotFoundError, ...), naming the setting and the file
                raise type(exc)(exc.errno, f"TLSConfig: {name} {path}: {exc.strerror or exc}") from None
        # ssl (OpenSSL) parses PEM as gRPC does; the client needs no other crypto library for this. Security level 0:
        # the check is about parsing and the pair, not about key sizes or digests, on which OpenSSL's default level
        # refuses (EE_KEY_TOO_SMALL for RSA-1024, CA_MD_TOO_WEAK) certificates that gRPC's own TLS stack takes.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        for name, path in (("ca_file", self.ca_file), ("cert_file", self.cert_file)):
            if path is not None:
                try:
                    context.load_verify_locations(cafile=path)
                except ssl.SSLError as exc:  # before OSError, which it is
                    raise ValueError(f"TLSConfig: {name} {path}: no PEM certificate in it ({exc.reason})") from None
        if self.cert_file is not None and self.key_file is not None:
            try:
                # An encrypted key gets the empty password rather than OpenSSL's prompt on the terminal.
                context.load_cert_chain(self.cert_file, self.key_file, password=b"")
            except ssl.SSLError as exc:
                raise ValueError(f"TLSConfig: key_file {self.key_file}: {_key_problem(exc, self.cert_file)}") from None

    def credentials(self) -> grpc.ChannelCredentials:
        """``grpc.ssl_channel_credentials`` from the files (read now, so a missing file fails here)."""

        def read(path: str | Path | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_file),
            private_key=read(self.key_file),
            certificate_chain=read(self.cert_file),
        )

    def options(self) -> list[tuple[str, Any]]:
        if self.server_name_override is None:
            return []
        return [("grpc.ssl_target_name_override", self.server_name_override)]


def _key_problem(exc: ssl.SSLError, cert_file: str | Path) -> str:
    """What OpenSSL found wrong with a key_file, in words that claim a mismatch only when OpenSSL says so."""
    if exc.reason == "KEY_VALUES_MISMATCH":
        return f"not the private key of cert_file {cert_file} ({exc.reason})"
    if exc.reason is None:  # "PEM lib": no PEM private key could be read (not PEM, encrypted, a certificate, ...)
        return "no unencrypted PEM private key in it"
    return f"OpenSSL refuses it as the private key of cert_file {cert_file} ({exc.reason})"


def _seconds(value: float) -> str:
    return f"{value:.3f}s"


@dataclass(frozen=True)
class RetryPolicy:
    """Opt-in retries with exponential backoff, done by gRPC itself from the channel's service config.

    Only codes that tensorgate answers *before* a request runs are retried: UNAVAILABLE (server starting or
    draining, model not ready, connection refused) and RESOURCE_EXHAUSTED (the model's queue is full). Where the
    work was done before the error (a response over the server's size limit, a failed RepositoryModelLoad), the
    server sends gRPC's retry pushback and the call is not retried either (``retry_safe`` is then False). A call
    that failed any other way (DEADLINE_EXCEEDED, INTERNAL, CANCELLED, ...) is never sent again, since the model
    may have run. gRPC also retries transparently, without this policy, a call that never left the client.
    gRPC picks what to retry by status code alone, so it also retries a TLS handshake the client refused (an
    UNAVAILABLE too) until the attempts run out; the error then says so and is not ``retry_safe``.
    Retries apply to the unary RPCs and the health check, not to ModelStreamInfer (a stream is not replayed).
    The pause before attempt n is random in [0, min(initial_backoff_s * multiplier**(n-1), max_backoff_s)];
    gRPC caps ``max_attempts`` at 5 and the whole call still ends at its deadline.
    """

    max_attempts: int = 3
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    backoff_multiplier: float = 2.0
    retryable_codes: tuple[grpc.StatusCode, ...] = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)

    def __post_init__(self) -> None:
        if not 2 <= self.max_attempts <= 5:
            raise ValueError(f"RetryPolicy: max_attempts must be 2..5 (gRPC's limit), not {self.max_attempts}")
        if self.initial_backoff_s <= 0 or self.max_backoff_s <= 0 or self.backoff_multiplier <= 0:
            raise ValueError("RetryPolicy: backoff times and multiplier must be positive")
        if not self.retryable_codes:
            raise ValueError("RetryPolicy: retryable_codes must not be empty")

    def service_config(self) -> dict[str, Any]:
        """The ``grpc.service_config`` document: one retryPolicy over every unary RPC and the health check."""
        names: list[dict[str, str]] = [
            {"service": SERVICE_NAME, "method": spec.name}
            for spec in methods(SERVICE_NAME)
            if not (spec.client_streaming or spec.server_streaming)
        ]
        names.append({"service": HEALTH_SERVICE, "method": "Check"})
        return {
            "methodConfig": [
                {
                    "name": names,
                    "retryPolicy": {
                        "maxAttempts": self.max_attempts,
                        "initialBackoff": _seconds(self.initial_backoff_s),
                        "maxBackoff": _seconds(self.max_backoff_s),
                        "backoffMultiplier": self.backoff_multiplier,
                        "retryableStatusCodes": [code.name for code in self.retryable_codes],
                    },
                }
            ]
        }


LOAD_BALANCING = ("pick_first", "round_robin")
"""gRPC's load-balancing policies a client may choose (`ChannelSettings.load_balancing`)."""

MAX_RECONNECT_BACKOFF_S = (2**31 - 1) // 1000
"""The most `ChannelSettings.max_reconnect_backoff_s` may be (about 24 days): gRPC reads channel arguments as C
ints, this one in milliseconds."""


@dataclass(frozen=True)
class ChannelSettings:
    """Everything that shapes the channel; the clients build one from their keyword arguments."""

    tls: TLSConfig | None = None
    retry: RetryPolicy | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    keepalive_time_s: float | None = 60.0
    """Ping an idle connection while calls are open, to notice a dead peer; None turns pings off. Pings only run
    while calls are open, since servers (tensorgate, Triton) close connections that ping too often without any."""
    keepalive_timeout_s: float = 20.0
    load_balancing: str = "pick_first"
    """How calls spread over the addresses a target names (``ipv4:10.0.0.1:8001,10.0.0.2:8001``, or a DNS name
    with several): "pick_first" (gRPC's default) sends them all to one, "round_robin" each to the next ready one,
    so that a retry goes to another replica. Never round_robin for a sequence model's requests: every request of a
    sequence must reach the replica that holds its state."""
    max_reconnect_backoff_s: float = 1.0
    """The longest wait between attempts to reconnect to an address that went away. gRPC's default grows to
    120 s (1 s, then 1.6 times longer each attempt), so a client kept calling through a replica's 12 s restart
    failed its calls for 2.8-3.9 s more after the replica was back; with 1 s, 0.5-0.6 s. A dead address then
    costs one connection attempt a second per channel."""
    extra_options: tuple[tuple[str, Any], ...] = field(default_factory=tuple)
    """Raw grpc channel arguments; one named as a setting above replaces it."""

    def __post_init__(self) -> None:
        if self.load_balancing not in LOAD_BALANCING:
            raise ValueError(f"load_balancing must be one of {', '.join(LOAD_BALANCING)}, not {self.load_balancing!r}")
        # gRPC takes it in milliseconds as a C int: a larger value failed later, as an OverflowError naming nothing.
        if not 0 < self.max_reconnect_backoff_s <= MAX_RECONNECT_BACKOFF_S:
            raise ValueError(
                f"max_reconnect_backoff_s must be positive and at most {MAX_RECONNECT_BACKOFF_S} s (gRPC's limit), "
                f"not {self.max_reconnect_backoff_s!r}"
            )

    def options(self) -> list[tuple[str, Any]]:
        opts: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
        ]
        backoff_ms = max(1, round(self.max_reconnect_backoff_s * 1000))
        opts.append(("grpc.max_reconnect_backoff_ms", backoff_ms))
        if backoff_ms < 1000:  # so that the first wait (1 s by default) is no longer than the longest
            opts.append(("grpc.initial_reconnect_backoff_ms", backoff_ms))
        if self.keepalive_time_s is not None:
            opts += [
                ("grpc.keepalive_time_ms", int(self.keepalive_time_s * 1000)),
                ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_s * 1000)),
                ("grpc.keepalive_permit_without_calls", 0),
            ]
        config: dict[str, Any] = {}
        if self.load_balancing != "pick_first":
            config["loadBalancingConfig"] = [{self.load_balancing: {}}]
        if self.retry is not None:
            opts.append(("grpc.enable_retries", 1))
            config.update(self.retry.service_config())
        if config:  # one document: gRPC takes a single service config per channel
            opts.append(("grpc.service_config", json.dumps(config)))
        if self.tls is not None:
            opts += self.tls.options()
        # gRPC keeps the first of two arguments with one name (measured: a second max_receive_message_length was
        # ignored), so the caller's would lose to the settings above if merely added after them.
        own = {name for name, _ in self.extra_options}
        return [option for option in opts if option[0] not in own] + list(self.extra_options)
