"""Remote Triton backend: a model whose execution happens on an upstream Triton Inference Server.

tensorgate keeps the caller-facing side (the V2 API, mTLS and authorization, dynamic batching across callers,
tracing, metrics); the upstream only runs batches. A model directory needs only a `config.pbtxt`::

    backend: "tensorgate_triton"
    parameters { key: "tensorgate.triton.url" value { string_value: "triton.internal:8001" } }

Inputs, outputs and `max_batch_size` are read from the upstream's ModelMetadata and ModelConfig when the file does
not state them. Such a model has no version directories: it is served as version 1 (REMOTE_VERSION), whatever
upstream version it maps to. Parameters (all optional but the url; values are strings, as Triton writes them):

    tensorgate.triton.url                 host:port of the upstream's gRPC endpoint
    tensorgate.triton.model_name          upstream model (default: this model's name)
    tensorgate.triton.model_version       upstream version (default: "", the upstream's choice)
    tensorgate.triton.tls                 "true" for TLS to the upstream (implied by any of the three files)
    tensorgate.triton.ca_file             PEM roots to verify the upstream (default: the system's)
    tensorgate.triton.cert_file / key_file    client certificate and key, for mutual TLS
    tensorgate.triton.server_name         TLS name to verify when it differs from the url's host
    tensorgate.triton.timeout_s           per-call limit when the caller sets no deadline (default 60)
    tensorgate.triton.deadline_margin_ms  taken off the caller's deadline before it is sent upstream (default 5)
    tensorgate.triton.connections         gRPC connections to the upstream, used in turn (default 1)
    tensorgate.triton.load_balancing      round_robin (default) or pick_first: how each connection spreads its
                                          calls over a url with several addresses (ipv4:A,B, a headless DNS name)
    tensorgate.triton.max_connection_age_s  replace each connection this often, so that a url's addresses are
                                          resolved again and new upstreams get calls (default 0: never); a
                                          decoupled model's stream connection too, at the first stream after
                                          that age (streams running on the old one end there first)
    tensorgate.triton.health_interval_s   how often the upstream model's readiness is asked (default 2); an
                                          answer may take up to this long, and never less than 2 s
    tensorgate.triton.header.<name>       extra metadata on every upstream call (e.g. an access token); names
                                          [0-9a-z_.-], values printable ASCII
    tensorgate.triton.max_streams         decoupled models only: requests relayed at once; one more is refused
                                          with RESOURCE_EXHAUSTED (default 0: no limit)

An upstream sequence model's `sequence_batching` is served as it is, and each request goes upstream on its own
with its sequence parameters (BatchContext.sequence), in its sequence's order (server/scheduling/remote_sequences.py).
A decoupled upstream model's requests bypass the scheduler: each goes upstream on a ModelStreamInfer stream of its
own, and its responses are relayed as they come (`stream`).

File paths may be relative to the model directory, and then stay inside it once links are followed. In a config
override (RepositoryModelLoad's `config`), which comes from a caller rather than from whoever owns the repository,
they must be: relative, without `..`, so inside the model directory or the files uploaded with the load; and its
url must be one the server's --allowed-upstreams allows, or the one the model's config.pbtxt in the repository
names, with the same upstream model_name and model_version (`check_override`).

Without an `instance_group`, a remote model gets DEFAULT_REMOTE_INSTANCES instances (KIND_MODEL): each instance
is a worker thread that waits on one upstream call, so that several batches are in flight upstream while
tensorgate forms the next ones.

Threads: `execute` runs on the scheduler's worker threads and is synchronous; the tritonclient.grpc.aio clients
live on one event loop thread owned by the backend, and `execute` hands each call to it with
`run_coroutine_threadsafe`. Encoding and decoding tensors happen on the worker thread, not on that loop. A decoupled
model's streams are the exception: they run on the server's loop, which relays their responses as they come.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import re
import threading
import time
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterator, Mapping, Sequence
from concurrent.futures import CancelledError as FutureCancelled
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tca
from google.protobuf import json_format
from google.protobuf.message import Message
from opentelemetry.trace import SpanContext
from tritonclient.utils import InferenceServerException

from tensorgate.protos import SERVICE_NAME
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos import model_config_pb2 as mc
from tensorgate.protos.tensors import BY_CONFIG_TYPE, BY_NAME, RAN, STATUS_CODE, TensorFormatError, decode_raw
from tensorgate.server.backends.base import NO_CONTEXT, BatchContext, SequenceFlags, server_parameter
from tensorgate.server.backends.upstream_targets import (
    HEADER_PREFIX,
    PARAMETER_KEYS,
    PARAMETER_PREFIX,
    upstream_addresses,
    upstream_allowed,
)
from tensorgate.server.errors import (
    BackendError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidRequestError,
    ModelLoadError,
    ModelUnavailableError,
    ResourceExhaustedError,
    ServerUnavailableError,
    TensorgateError,
    model_ref,
)
from tensorgate.server.repository.config import TensorInfo, bool_parameter
from tensorgate.server.repository.paths import inside, relative_path
from tensorgate.server.telemetry.tracing import Tracing

log = logging.getLogger(__name__)

T = TypeVar("T")

PREFIX = PARAMETER_PREFIX
REMOTE_VERSION = 1
"""The version a remote model is served as: it has no version directories."""
DEFAULT_REMOTE_INSTANCES = 4
"""Batches in flight upstream per model when config.pbtxt has no instance_group (see the module docstring)."""
REDACTED = "<redacted>"
_PROBE_TIMEOUT_FLOOR_S = 2.0
"""A readiness probe of a busy upstream (or from a busy server) may take longer than a short health interval;
answering late is not being down, and a model flapping to not ready for it would fail callers and ServerReady."""
_NO_SEQUENCE = SequenceFlags(0)
"""What a request outside any sequence sends: tritonclient, as Triton, reads correlation ID 0 as none."""
_MAX_MESSAGE = 2**31 - 1
_CONNECT_TIMEOUT_MS = 5000
"""What one connection attempt may take: TCP, TLS and the upstream's first HTTP/2 SETTINGS. gRPC names it
`grpc.min_reconnect_backoff_ms`; at 100 ms, an upstream 50 ms away (or a loaded one, or a TLS handshake on a busy
machine) timed out on every first attempt, and the model failed its load "before receiving SETTINGS frame"."""
# Reconnect quickly once the upstream is back: gRPC's default backoff grows to two minutes between attempts, so a
# restarted Triton would stay unreachable that long. At most one attempt a second per connection costs nothing.
_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", _MAX_MESSAGE),
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", _CONNECT_TIMEOUT_MS),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # Without it, channels with the same target and options share one connection: `connections` would not add any.
    ("grpc.use_local_subchannel_pool", 1),
]
# Codes an upstream answers with that mean "the upstream cannot serve now", not "this request is wrong".
_UNAVAILABLE = {"StatusCode.UNAVAILABLE", "StatusCode.CANCELLED"}
_HEADER_NAME = re.compile(r"[0-9a-z_.-]+")
"""What gRPC (HTTP/2) takes as a metadata key, once lowercased; anything else fails the call in gRPC's core."""
LOAD_BALANCING = ("round_robin", "pick_first")
"""gRPC's policies for a url that names several upstreams (`ipv4:A,B`, a DNS name with several addresses)."""
_CLOSED_BY_PEER = "Socket closed"
"""grpc's words when the upstream closes a connection it accepted (see TritonSettings.closed_hint)."""


@dataclass(frozen=True, slots=True)
class TritonSettings:
    """The upstream as a model's config.pbtxt describes it (see the module docstring for the parameters)."""

    url: str
    model_name: str
    model_version: str = ""
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None
    timeout_s: float = 60.0
    deadline_margin_s: float = 0.005
    connections: int = 1
    health_interval_s: float = 2.0
    max_streams: int = 0
    load_balancing: str = "round_robin"
    max_connection_age_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    pem: tuple[bytes | None, bytes | None, bytes | None] = field(default=(None, None, None), repr=False)
    """The contents of ca_file, key_file and cert_file, read once at load: a channel made later (a decoupled
    model's, on first use) must not depend on files that may be gone by then (a load's uploaded files are)."""

    @classmethod
    def from_config(cls, config: mc.ModelConfig, model_dir: Path) -> TritonSettings:
        """Read and check the `tensorgate.triton.*` parameters; ModelLoadError names the bad one."""
        name = config.name
        params = {k: v.string_value for k, v in config.parameters.items() if k.startswith(PREFIX)}
        known = set(PARAMETER_KEYS)
        headers: dict[str, str] = {}
        for key, value in params.items():
            short = key.removeprefix(PREFIX)
            if short.startswith(HEADER_PREFIX):
                header = short.removeprefix(HEADER_PREFIX).lower()
                if not _HEADER_NAME.fullmatch(header) or header.startswith("grpc-") or header.endswith("-bin"):
                    raise ModelLoadError(
                        name,
                        None,
                        f"parameter '{key}' does not name a usable gRPC header: letters, digits, '_', '-' and '.' "
                        "only, neither 'grpc-*' (reserved) nor '*-bin' (binary)",
                    )
                if not all(" " <= c <= "~" for c in value):
                    # Not echoed: the value may be a credential.
                    raise ModelLoadError(
                        name,
                        None,
                        f"parameter '{key}': a gRPC header value must be printable ASCII (no newline or other "
                        "control character, no non-ASCII letter)",
                    )
                headers[header] = value
            elif short not in known:
                raise ModelLoadError(name, None, f"unknown parameter '{key}' (known: {', '.join(sorted(known))})")

        def number(key: str, default: float, low: float, high: float) -> float:
            text = params.get(PREFIX + key, "").strip()
            if not text:
                return default
            try:
                value = float(text)
            except ValueError:
                value = float("nan")
            if not low <= value <= high:  # also refuses nan
                raise ModelLoadError(name, None, f"parameter '{PREFIX}{key}' must be a number in {low}..{high}")
            return value

        def whole(key: str, default: int, low: int, high: int) -> int:
            value = number(key, default, low, high)
            if not float(value).is_integer():  # "0.5" must not read as 0 (for max_streams: no limit at all)
                raise ModelLoadError(name, None, f"parameter '{PREFIX}{key}' must be a whole number in {low}..{high}")
            return int(value)

        pem: dict[str, bytes] = {}

        def path(key: str) -> Path | None:
            """An absolute path as it is (config.pbtxt's owner may name any file: `check_override` refuses one in
            an override); a relative one only inside the model directory, links followed (`inside`)."""
            text = params.get(PREFIX + key, "").strip()
            if not text:
                return None
            p = Path(text) if Path(text).is_absolute() else inside(model_dir, text)
            if p is None:
                raise ModelLoadError(
                    name,
                    None,
                    f"parameter '{PREFIX}{key}': a relative path must name a file inside the model directory (no "
                    f"'..', no link leading out of it), got '{text}'; a file elsewhere takes an absolute path, in "
                    "the repository's config.pbtxt",
                )
            try:
                pem[key] = p.read_bytes()
            except (OSError, ValueError) as exc:  # ValueError: a NUL in an absolute path
                reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
                raise ModelLoadError(
                    name, None, f"parameter '{PREFIX}{key}': {text} is not a readable file ({reason})"
                ) from None
            return p

        url = params.get(PREFIX + "url", "").strip()
        if not url or "://" in url or ":" not in url:
            raise ModelLoadError(name, None, f"parameter '{PREFIX}url' must be the upstream's gRPC host:port")
        tls = bool_parameter(config, PREFIX + "tls") is True
        balancing = params.get(PREFIX + "load_balancing", "").strip() or "round_robin"
        if balancing not in LOAD_BALANCING:
            raise ModelLoadError(
                name,
                None,
                f"parameter '{PREFIX}load_balancing' must be one of {', '.join(LOAD_BALANCING)}, got '{balancing}'",
            )
        ca, cert, private_key = path("ca_file"), path("cert_file"), path("key_file")
        if (cert is None) != (private_key is None):
            raise ModelLoadError(name, None, f"'{PREFIX}cert_file' and '{PREFIX}key_file' go together")
        return cls(
            url=url,
            model_name=params.get(PREFIX + "model_name", "").strip() or name,
            model_version=params.get(PREFIX + "model_version", "").strip(),
            tls=tls or any(p is not None for p in (ca, cert, private_key)),
            ca_file=ca,
            cert_file=cert,
            key_file=private_key,
            server_name=params.get(PREFIX + "server_name", "").strip() or None,
            timeout_s=number("timeout_s", 60.0, 0.001, 86_400.0),
            deadline_margin_s=number("deadline_margin_ms", 5.0, 0.0, 10_000.0) / 1000,
            connections=whole("connections", 1, 1, 64),
            health_interval_s=number("health_interval_s", 2.0, 0.05, 3600.0),
            max_streams=whole("max_streams", 0, 0, 1_000_000),
            load_balancing=balancing,
            max_connection_age_s=number("max_connection_age_s", 0.0, 0.0, 30 * 86_400.0),
            headers=headers,
            pem=(pem.get("ca_file"), pem.get("key_file"), pem.get("cert_file")),
        )

    def closed_hint(self) -> str:
        """What to check when the upstream accepted the connection and closed it before answering: grpc says
        only "Socket closed" when the two sides disagree on TLS, or when a TLS upstream refuses the client."""
        if not self.tls:
            return f" (a TLS upstream does that to plaintext: set '{PREFIX}tls' or '{PREFIX}ca_file')"
        if self.cert_file is None:
            return (
                f" (during the TLS handshake: an upstream that requires client certificates does that; set "
                f"'{PREFIX}cert_file' and '{PREFIX}key_file')"
            )
        return f" (during the TLS handshake: does the upstream trust the certificate in '{PREFIX}cert_file'?)"

    def credentials(self) -> grpc.ChannelCredentials | None:
        """From the files as they were at load (`pem`): no file I/O, so callable on any loop."""
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(*self.pem)


@dataclass(frozen=True, slots=True)
class UpstreamModel:
    """What the upstream says about the model: its tensors (shape as in ModelMetadata) and max_batch_size."""

    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    max_batch_size: int
    """0 when the upstream does not batch, or would not say (a deployment that restricts ModelConfig)."""
    sequence_batching: mc.ModelSequenceBatching | None = None
    """The upstream model's sequence batcher: a stateful model, whose requests must carry their sequence."""
    decoupled: bool = False
    """The upstream model answers a request with any number of responses (model_transaction_policy), over
    ModelStreamInfer only."""
    config_known: bool = True
    """False when the upstream would not show its ModelConfig: what it says (max_batch_size, sequence_batching,
    decoupled) is unknown."""


class TritonBackend:
    """Runs batches on an upstream Triton over long-lived gRPC connections; see the module docstring.

    Usage (what the repository does)::

        backend = TritonBackend(config, model_dir)      # connects, reads the upstream model; ModelLoadError if not
        backend.upstream.inputs, backend.upstream.max_batch_size   # to complete config.pbtxt
        outputs = backend.execute({"INPUT0": x, "INPUT1": y}, ["OUTPUT0"], context)   # on a worker thread
        backend.close()
    """

    def __init__(self, config: mc.ModelConfig, model_dir: Path, *, version: int = REMOTE_VERSION) -> None:
        self._model, self._version = config.name, version
        self.settings = TritonSettings.from_config(config, model_dir)
        s = self.settings
        self._where = f"upstream Triton {s.url} (model '{s.model_name}')"
        self._ready = False
        self._changed: str | None = None
        """Why the upstream model is no longer the one that loaded (`_unchanged`); None while it is."""
        self._recheck = False
        """The upstream model was seen not ready (or unreachable) since it was last described: once it is ready
        again, the watcher describes it again before it counts as ready (`_unchanged`)."""
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"tg-triton-{config.name}", daemon=True)
        self._thread.start()
        self._probe: Future[None] | None = None
        self._renewer: Future[None] | None = None
        self._busy: dict[Any, int] = {}
        """Calls running on each client, counted on the backend's loop (`_on`): a replaced one closes at 0."""
        self._retiring: set[Any] = set()
        """Clients replaced by `_renew` whose calls have not all ended yet."""
        self._stream_channel: grpc.aio.Channel | None = None
        """For a decoupled model's streams (`stream`): made on first use, on the server's loop (`_stream_loop`),
        and again at a stream's start once `max_connection_age_s` has passed (`_stream_method`)."""
        self._stream_loop: asyncio.AbstractEventLoop | None = None
        self._stream_infer: Any = None
        self._stream_born = 0.0
        """time.monotonic() when `_stream_channel` was made."""
        self._stream_users: dict[grpc.aio.Channel, int] = {}
        """Streams running on each stream channel, the current one and those replaced while streams still ran
        on them (each closed once its last stream ends)."""
        self._streams = 0
        """Requests being relayed (`stream`, on the server's loop), for `max_streams`."""
        self._calls: set[Future[Any]] = set()
        """Calls that worker threads wait on (`_run`): `close` ends those its closed connections did not, and
        `interrupt` all of them."""
        self._interrupted = False
        """A forced stop (`interrupt`): no call goes upstream any more."""
        self._close_lock = threading.Lock()
        """`close` runs on a thread of its own (the repository's `_retire`) while `stream` makes the channel on the
        server's loop: one of them sees the other's work, so a channel made as the model closes is closed too."""
        try:
            self._clients: list[Any] = self._run(self._connect(), 10.0)
            """tritonclient.grpc.aio clients, one per connection, taken in turn (`_turn`); `_renew` replaces them."""
            self._turn = itertools.count()
            self.upstream = self._run(self._describe(), min(s.timeout_s, 30.0) + 1.0)
        except ModelLoadError:
            self.close()
            raise
        except TensorgateError as exc:
            self.close()
            reason = exc.reason if isinstance(exc, ModelUnavailableError) else exc.message
            if _CLOSED_BY_PEER in reason:
                reason += self.settings.closed_hint()
            # An upstream that cannot be reached, or does not serve the model yet, may by the next try; one
            # that refused the call (a bad token or model_version here, or a restricted protocol's header, which
            # Triton refuses as UNAVAILABLE) will refuse it again.
            transient = isinstance(
                exc, (ModelUnavailableError, ServerUnavailableError, DeadlineExceededError, ResourceExhaustedError)
            )
            raise ModelLoadError(self._model, version, reason, transient=transient) from exc
        except BaseException:
            self.close()
            raise
        self._ready = True
        self._types = {t.name: BY_CONFIG_TYPE[t.data_type].name for t in self.upstream.inputs}
        self._probe = asyncio.run_coroutine_threadsafe(self._watch(), self._loop)
        if s.max_connection_age_s > 0:
            self._renewer = asyncio.run_coroutine_threadsafe(self._renew(), self._loop)
        log.info("model '%s' fronts %s over %d connection(s)", self._model, self._where, s.connections)

    # ----- the backend protocol ----------------------------------------------------------------------------

    @property
    def execution_provider(self) -> str:
        return f"triton:{self.settings.url}"

    @property
    def runs_remotely(self) -> bool:
        """A batch whose callers all left has its upstream call cancelled (`_run`); a request's id and parameters
        go upstream with its batch (`execute`)."""
        return True

    @property
    def ready(self) -> bool:
        """Whether the upstream model answered ready the last time it was asked (or served the last call), and
        is still the model that loaded."""
        return self._ready and not self._closed and self._changed is None

    @property
    def changed(self) -> str | None:
        """Why the upstream model is no longer the one that loaded (another max_batch_size, inputs or outputs),
        or None: a load of unchanged files reads such a model afresh (repository/manager.py)."""
        return self._changed

    def execute(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str], context: BatchContext = NO_CONTEXT
    ) -> dict[str, np.ndarray]:
        """One upstream ModelInfer for the whole batch; tensors travel as raw contents both ways."""
        s = self.settings
        if self._changed is not None:
            raise ModelUnavailableError(self._model, self._version, self._changed)
        timeout = self._timeout(context)
        infer_inputs = []
        for name, array in inputs.items():
            item = tc.InferInput(name, list(array.shape), self._types.get(name, "BYTES"))
            try:
                item.set_data_from_numpy(array)
            except InferenceServerException as exc:
                raise InvalidRequestError(self._model, self._version, exc.message(), tensor=name) from exc
            infer_inputs.append(item)
        wanted = [tc.InferRequestedOutput(name) for name in outputs]
        headers = s.headers if context.trace is None else {**s.headers, **Tracing.headers(context.trace)}
        client = self._clients[next(self._turn) % len(self._clients)]
        sequence = context.sequence or _NO_SEQUENCE
        sequence_id = sequence.id
        if isinstance(sequence_id, int) and sequence_id >= 2**63:
            sequence_id -= 2**64  # tritonclient sends int64: its two's complement, which Triton reads as uint64
        # Only the parameters meant for the upstream (`upstream_parameters`): `priority` and `timeout` were this
        # server's queue's, and its batch mixes callers' values; the callers' deadline goes as the call's.
        coro = client.infer(
            s.model_name,
            infer_inputs,
            model_version=s.model_version,
            outputs=wanted,
            request_id=context.request_id,
            sequence_id=sequence_id,
            sequence_start=sequence.start,
            sequence_end=sequence.end,
            client_timeout=timeout,
            headers=headers or None,
            parameters=dict(context.parameters) if context.parameters else None,
        )
        result = self._run(self._on(client, coro), timeout + 1.0, timeout_error=timeout, abandoned=context.abandoned)
        self._ready = True
        response = result.get_response()
        out: dict[str, np.ndarray] = {}
        for i, tensor in enumerate(response.outputs):
            try:
                out[tensor.name] = decode_raw(
                    response.raw_output_contents[i], BY_NAME[tensor.datatype], tuple(tensor.shape)
                )
            except (IndexError, KeyError, TensorFormatError) as exc:
                raise BackendError(self._model, self._version, f"{self._where} sent a malformed output: {exc}") from exc
        missing = [name for name in outputs if name not in out]
        if missing:
            raise BackendError(self._model, self._version, f"{self._where} did not return {', '.join(missing)}")
        return out

    def _timeout(self, context: BatchContext) -> float:
        """Seconds to give a batch's upstream call: its callers' latest deadline less the margin, `timeout_s` when
        none set one, and the longer of the two when some did and some did not (a caller without a deadline must
        not cut short the call of one that allows longer, nor the other way round)."""
        s = self.settings
        if context.deadline is None:
            return s.timeout_s
        if context.open_ended:
            return max(s.timeout_s, context.deadline - time.monotonic() - s.deadline_margin_s)
        left = self._time_left(context.deadline)
        assert left is not None
        return left

    def _time_left(self, deadline: float | None) -> float | None:
        """Seconds to give the upstream call: the caller's deadline less the margin (None without a deadline);
        DEADLINE_EXCEEDED when none is left."""
        if deadline is None:
            return None
        left = deadline - time.monotonic() - self.settings.deadline_margin_s
        if left <= 0:
            raise DeadlineExceededError(f"{model_ref(self._model, self._version)}: the call's deadline passed")
        return left

    def admit(self, deadline: float | None) -> None:
        """Refuse a decoupled model's request before it starts, so that the refusal is no response of its: the
        model is being unloaded, the call's deadline has passed, or `max_streams` requests are being relayed.
        Called on the server's loop right before `stream`, with no await between them, so the count it reads is
        the one `stream` adds to."""
        s = self.settings
        if self._closed:
            raise ModelUnavailableError(self._model, self._version, "the model is being unloaded")
        self._time_left(deadline)
        if s.max_streams and self._streams >= s.max_streams:
            # Refused rather than queued: each relayed request holds an upstream stream for as long as the
            # upstream answers, so a queue here would grow without bound behind long generations.
            raise ResourceExhaustedError(
                f"{model_ref(self._model, self._version)}: {self._streams} requests are being relayed, the most "
                f"{PREFIX}max_streams ({s.max_streams}) allows; retry once one has ended"
            )

    async def stream(
        self, request: pb.ModelInferRequest, deadline: float | None, trace: SpanContext | None
    ) -> AsyncGenerator[pb.ModelInferResponse, None]:
        """A decoupled model's request, as the caller sent it but for the model's name upstream and the parameters
        the server reserves (`server_parameter`, as a batch's call strips them): sent on a ModelStreamInfer stream
        of its own, each response yielded as it arrives. The upstream ends the stream once the request is
        complete (it waits for the model's final flag), so the end needs no final response.

        The caller's deadline (less the margin) bounds the whole request; `timeout_s` bounds the wait for each
        response, so that a long generation is never cut while an upstream that went silent still is.

        Called on the server's event loop, and the stream runs there too, on a channel made on that loop (a
        grpc.aio channel belongs to the loop that made it): a response reaches its caller without crossing to
        another thread, which on a busy machine cost a GIL hand-over per response."""
        s = self.settings
        ref = model_ref(self._model, self._version)
        timeout = self._time_left(deadline)
        channel, method = self._stream_method()
        upstream = pb.ModelInferRequest()
        upstream.CopyFrom(request)
        upstream.model_name, upstream.model_version = s.model_name, s.model_version
        for key in [k for k in upstream.parameters if server_parameter(k, streaming=True)]:
            del upstream.parameters[key]
        headers = s.headers if trace is None else {**s.headers, **Tracing.headers(trace)}
        call = method(upstream, timeout=timeout, metadata=list(headers.items()) or None)
        responses = call.__aiter__()
        self._streams += 1
        self._stream_users[channel] = self._stream_users.get(channel, 0) + 1
        try:
            with self._errors(timeout, time.monotonic()):
                while True:
                    try:
                        async with asyncio.timeout(s.timeout_s):
                            response = await anext(responses)
                    except StopAsyncIteration:
                        break
                    except TimeoutError:
                        raise DeadlineExceededError(
                            f"{ref}: {self._where} sent no response for {s.timeout_s:g}s (tensorgate.triton.timeout_s)"
                        ) from None
                    except grpc.aio.AioRpcError as exc:  # as tritonclient reports it, for `_errors`
                        raise InferenceServerException(msg=exc.details() or "", status=str(exc.code())) from exc
                    except asyncio.CancelledError:
                        task = asyncio.current_task()
                        if self._closed and task is not None and not task.cancelling():
                            # The channel closed under the call (an unload whose grace ran out), not the caller.
                            raise ModelUnavailableError(
                                self._model, self._version, "the model was unloaded while it answered"
                            ) from None
                        raise
                    if response.error_message:
                        code = response.infer_response.parameters.get(STATUS_CODE)
                        if code is not None and code.string_param not in ("", "OK", "INTERNAL", "UNKNOWN"):
                            # A tensorgate upstream says what the failure was (its drain's UNAVAILABLE, say):
                            # mapped as a unary call's status is, rather than reported as the model failing.
                            status = f"StatusCode.{code.string_param}"
                            item_error = InferenceServerException(msg=response.error_message, status=status)
                            ran = response.infer_response.parameters.get(RAN)
                            item_error.upstream_ran = ran is not None and ran.bool_param
                            raise item_error
                        raise BackendError(self._model, self._version, f"{self._where}: {response.error_message}")
                    yield response.infer_response
            self._ready = True
        finally:
            self._streams -= 1
            call.cancel()  # the caller went away, or an error: the upstream call ends (nothing if it has)
            self._stream_users[channel] -= 1
            if not self._stream_users[channel] and channel is not self._stream_channel:
                del self._stream_users[channel]
                _close_later(channel)  # replaced (`_stream_method`), and its last stream is over

    def _stream_method(self) -> tuple[grpc.aio.Channel, Any]:
        """The channel for decoupled streams and its ModelStreamInfer, on the running loop (the server's): both made
        on first use (a stub per request would build every method's callable each time), and made again once the
        channel is `max_connection_age_s` old, as the clients' connections are (`_renew`), so that a url's
        addresses are resolved again and upstreams added behind it get new streams too. A stream is never moved:
        the one running on the replaced channel ends there, which closes once none does."""
        with self._close_lock:
            if self._closed:
                raise ModelUnavailableError(self._model, self._version, "the model is being unloaded")
            age = self.settings.max_connection_age_s
            old = self._stream_channel
            if old is not None and age > 0 and time.monotonic() - self._stream_born >= age:
                if not self._stream_users.get(old):
                    self._stream_users.pop(old, None)
                    _close_later(old)
                self._stream_infer = None
            if self._stream_infer is None:
                self._stream_channel = self._channel()
                self._stream_born = time.monotonic()
                self._stream_loop = asyncio.get_running_loop()
                # Called as unary-stream: one request, then the half-close, in one batch (what the upstream sees is
                # the same). As a stream-stream call, an upstream that refused the stream while the request was
                # still being written (a draining server refuses before it reads; the larger the request, the
                # likelier) lost its answer to grpc.aio's INTERNAL "Internal error from Core" for the cut write.
                self._stream_infer = self._stream_channel.unary_stream(
                    f"/{SERVICE_NAME}/ModelStreamInfer",
                    request_serializer=pb.ModelInferRequest.SerializeToString,
                    response_deserializer=pb.ModelStreamInferResponse.FromString,
                )
            assert self._stream_channel is not None
            return self._stream_channel, self._stream_infer

    def interrupt(self) -> None:
        """A forced stop (a second signal; base.Interrupts): the upstream calls that worker threads wait on are
        cancelled now, and later ones refused, so that the repository's close does not wait for an upstream that
        answers in minutes (a long generation, a slow queue) or never. The callers have had their answer already.
        Most calls would end anyway once their callers left (BatchContext.abandoned), but not a sequence model's
        request, which waits for its upstream so that its sequence's next request cannot overtake it."""
        self._interrupted = True
        for call in list(self._calls):
            call.cancel()

    def close(self) -> None:
        """Stop the readiness probe, close the connections, stop the loop thread. Blocks for up to seconds: the
        repository calls it on a thread of its own."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            # The current stream channel, and those replaced ones that streams still run on.
            channels = [c for c in {self._stream_channel, *list(self._stream_users)} if c is not None]
            loop = self._stream_loop
        for task in (self._probe, self._renewer):
            if task is not None:
                task.cancel()
        clients = [*getattr(self, "_clients", []), *self._retiring]
        if self._loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._close_clients(clients), self._loop).result(5.0)
            # Calls the closed connections have not ended yet (their tasks need more turns of a loop that stops
            # now) end here: their worker threads answer that the model was unloaded (`_run`) at once, instead of
            # waiting out their timeout for a loop that will never resolve them.
            for call in list(self._calls):
                call.cancel()
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        if not self._thread.is_alive():
            self._loop.close()
        # Streams still open (an unload whose grace ran out) end with their channel, closed on its own loop; their
        # callers hear that the model was unloaded (`stream`).
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile, and the channels' calls with it
                for channel in channels:
                    loop.call_soon_threadsafe(_close_later, channel)

    # ----- on the backend's loop ---------------------------------------------------------------------------

    def _options(self) -> list[tuple[str, Any]]:
        options = list(_CHANNEL_OPTIONS)
        # gRPC's default, pick_first, sends every call to the first address that answers: every replica behind
        # a headless Service but one would idle. round_robin spreads each connection's calls over them all (and
        # with a single address behaves as pick_first does).
        config: dict[str, Any] = {"loadBalancingConfig": [{self.settings.load_balancing: {}}]}
        options.append(("grpc.service_config", json.dumps(config)))
        if self.settings.server_name is not None:
            options.append(("grpc.ssl_target_name_override", self.settings.server_name))
        return options

    async def _connect(self) -> list[Any]:
        """Clients are made on the loop that will use them: a grpc.aio channel belongs to its loop."""
        return [self._client(i) for i in range(self.settings.connections)]

    def _client(self, i: int) -> Any:
        """Connection `i`: a channel of its own (its own subchannels: `grpc.use_local_subchannel_pool`), so that a
        new one makes a new connection, resolving the url again."""
        s = self.settings
        return tca.InferenceServerClient(
            s.url, creds=s.credentials(), channel_args=self._options() + [("tensorgate.connection", i)]
        )

    async def _on(self, client: Any, call: Coroutine[Any, Any, T]) -> T:
        """A call on `client`, counted while it runs so that `_renew` closes a replaced client only after it."""
        self._busy[client] = self._busy.get(client, 0) + 1
        try:
            return await call
        finally:
            self._busy[client] -= 1

    async def _renew(self) -> None:
        """Replace each connection every max_connection_age_s (in turn, spread over that time): gRPC resolves a
        url when a channel connects and keeps its connections for as long as they last, so an upstream added
        behind a DNS name (a scaled-out Deployment behind a headless Service) would get calls from a long-lived
        connection only once it broke. A replaced client closes once the calls already on it have ended."""
        s = self.settings
        for i in itertools.cycle(range(s.connections)):
            await asyncio.sleep(s.max_connection_age_s / s.connections)
            old, self._clients[i] = self._clients[i], self._client(i)
            self._retiring.add(old)
            task = asyncio.get_running_loop().create_task(self._retire(old))
            _closing.add(task)
            task.add_done_callback(_closing.discard)

    async def _retire(self, client: Any) -> None:
        while self._busy.get(client, 0):
            await asyncio.sleep(0.05)
        self._busy.pop(client, None)
        await client.close()
        self._retiring.discard(client)

    def _channel(self) -> grpc.aio.Channel:
        """A channel of our own for streams (tritonclient's streams cannot carry every parameter a caller sends),
        with the clients' settings, on the loop that calls this (`_stream_method`)."""
        creds = self.settings.credentials()
        options = self._options() + [("tensorgate.connection", "streams")]
        if creds is None:
            return grpc.aio.insecure_channel(self.settings.url, options=options)
        return grpc.aio.secure_channel(self.settings.url, creds, options=options)

    async def _describe(self) -> UpstreamModel:
        s = self.settings
        client = self._clients[0]
        call = {"model_version": s.model_version, "headers": s.headers or None, "client_timeout": s.timeout_s}
        with self._errors():
            meta = await self._on(client, client.get_model_metadata(s.model_name, as_json=True, **call))
        sequence, decoupled, known = None, False, True
        try:
            with self._errors():
                described = await self._on(client, client.get_model_config(s.model_name, as_json=True, **call))
                upstream_config = described.get("config", {})
            mbs = int(upstream_config.get("max_batch_size", 0))
            if "sequence_batching" in upstream_config:
                sequence = json_format.ParseDict(
                    upstream_config["sequence_batching"], mc.ModelSequenceBatching(), ignore_unknown_fields=True
                )
            decoupled = bool(upstream_config.get("model_transaction_policy", {}).get("decoupled", False))
        except TensorgateError as exc:
            if isinstance(exc, (ModelUnavailableError, ServerUnavailableError, DeadlineExceededError)):
                raise  # the upstream model itself is not there (or not reachable): the load fails with why
            # Some deployments restrict ModelConfig (Triton's --grpc-restricted-protocol answers UNAVAILABLE); the
            # metadata alone still describes the tensors.
            log.warning(
                "model '%s': %s; taking the upstream model as not batching (give tensorgate.triton.header.* with "
                "the key, or max_batch_size in config.pbtxt, to batch)",
                self._model,
                exc.message,
            )
            mbs, known = 0, False

        def infos(key: str) -> list[TensorInfo]:
            found: list[TensorInfo] = []
            for t in meta.get(key, []):
                datatype = BY_NAME.get(t.get("datatype", ""))
                if datatype is None:
                    raise ModelLoadError(
                        self._model,
                        self._version,
                        f"{self._where}: tensor '{t.get('name')}' has datatype "
                        f"{t.get('datatype')}, which tensorgate cannot serve",
                    )
                shape = tuple(None if int(d) < 0 else int(d) for d in t.get("shape", []))
                found.append(TensorInfo(t["name"], datatype.config_type, shape))
            return found

        return UpstreamModel(infos("inputs"), infos("outputs"), mbs, sequence, decoupled, known)

    async def _watch(self) -> None:
        """Ask the upstream whether the model is ready, for ModelReady and ServerReady; this also keeps a
        connection being re-tried while the upstream is down, so that it is back soon after the upstream is."""
        s = self.settings
        for turn in itertools.count():
            client = self._clients[turn % len(self._clients)]
            try:
                # Counted (`_on`) like every call, so that a renewed connection is not closed under it.
                asked = client.is_model_ready(
                    s.model_name,
                    s.model_version,
                    headers=s.headers or None,
                    client_timeout=max(s.health_interval_s, _PROBE_TIMEOUT_FLOOR_S),
                )
                ready = bool(await self._on(client, asked))
                if ready and (self._recheck or self._changed is not None):
                    ready = await self._unchanged()
                self._recheck = not ready
                self._ready = ready
            except InferenceServerException as exc:
                if self._ready:
                    log.warning("model '%s': %s is not ready: %s", self._model, self._where, exc.message())
                self._ready, self._recheck = False, True
            await asyncio.sleep(s.health_interval_s)

    async def _unchanged(self) -> bool:
        """The upstream model is ready again (a restart, a redeploy, a reload there), or had changed: is it still
        the one this model loaded? Its max_batch_size and tensors were read at load and are served from then on;
        a new upstream that differs would be sent batches and tensors it refuses (or, worse, reads otherwise).
        Any difference keeps the model not ready, its calls refused with why (`changed`), until it is reloaded
        here (which reads the upstream afresh) or the upstream is back to what it was."""
        try:
            now = await self._describe()
        except TensorgateError as exc:
            log.warning("model '%s': %s is back, but could not be described: %s", self._model, self._where, exc)
            return False
        was = self.upstream
        fields = (
            ("max_batch_size", was.max_batch_size, now.max_batch_size),
            ("inputs", was.inputs, now.inputs),
            ("outputs", was.outputs, now.outputs),
        )
        changed = [name for name, before, after in fields if before != after]
        if not changed:
            if self._changed is not None:
                log.info("model '%s': %s serves the model that loaded again", self._model, self._where)
            self._changed = None
            return True
        reason = (
            f"{self._where} now has another {' and '.join(changed)} than when the model loaded: reload the model "
            "to serve what the upstream serves now"
        )
        if reason != self._changed:
            log.error("model '%s' is not ready: %s", self._model, reason)
        self._changed = reason
        return False

    async def _close_clients(self, clients: Sequence[Any]) -> None:
        for client in clients:
            await client.close()

    # ----- helpers -----------------------------------------------------------------------------------------

    def _run(
        self,
        coro: Coroutine[Any, Any, T],
        wait: float,
        *,
        timeout_error: float | None = None,
        abandoned: Future[None] | None = None,
    ) -> T:
        """Run a coroutine on the backend's loop from another thread, translating tritonclient's errors. Once
        `abandoned` resolves (every caller of the batch left), the call is cancelled: the upstream hears it, and
        the instance waiting here is free again."""
        if self._closed or self._interrupted:
            coro.close()
            if self._interrupted:
                raise self._stopping()
            raise ModelUnavailableError(self._model, self._version, "the model is being unloaded")
        started = time.monotonic()
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        if abandoned is not None:
            abandoned.add_done_callback(lambda _: future.cancel())
        ref = model_ref(self._model, self._version)
        self._calls.add(future)
        if self._interrupted:  # `interrupt` ran since the check above, and may not have seen this call
            future.cancel()
        with self._errors(timeout_error, started):
            try:
                return future.result(wait)
            except FutureTimeout:
                future.cancel()
                raise DeadlineExceededError(f"{ref}: {self._where} did not answer within {wait:.3f}s") from None
            except FutureCancelled:
                if abandoned is not None and abandoned.done():
                    raise DeadlineExceededError(
                        f"{ref}: every caller of the batch left, so its call to {self._where} was cancelled"
                    ) from None
                if self._interrupted:
                    raise self._stopping() from None
                if self._closed:  # `close` closed the connections under the call: an unload whose grace ran out
                    raise self._unloaded() from None
                raise BackendError(self._model, self._version, f"the call to {self._where} was cancelled") from None
            finally:
                self._calls.discard(future)

    def _stopping(self) -> ServerUnavailableError:
        """For a call cut short, or refused, by `interrupt`: the server is stopping at once."""
        return ServerUnavailableError(
            f"{model_ref(self._model, self._version)}: the server was told to stop at once; its call to "
            f"{self._where} was cancelled"
        )

    def _unloaded(self) -> ModelUnavailableError:
        """For a call cut short by `close` (an unload or reload whose grace ran out): UNAVAILABLE, which the caller
        may retry once the model is back, rather than an internal error."""
        unloaded = ModelUnavailableError(self._model, self._version, "the model was unloaded while it ran")
        unloaded.ran = True  # the upstream may have run it: a retry policy must not send it again
        return unloaded

    @contextlib.contextmanager
    def _errors(self, timeout: float | None = None, started: float | None = None) -> Iterator[None]:
        """Map tritonclient's exceptions to tensorgate's, each naming the upstream: the caller sees the upstream's
        code where it means the same to them, UNAVAILABLE "not ready" where the upstream is gone or unreachable,
        and FAILED_PRECONDITION where the upstream refuses tensorgate itself (its credentials, or a restricted
        protocol's header): that is the operator's to fix, and neither the caller's credentials (which
        PERMISSION_DENIED or UNAUTHENTICATED would blame) nor worth retrying (as UNAVAILABLE invites) until it is.
        `timeout` and `started` (time.monotonic()) tell our own deadline from one the upstream answered early."""
        try:
            yield
        except InferenceServerException as exc:
            status, message = exc.status() or "", exc.message() or str(exc)
            code = status.removeprefix("StatusCode.")
            ref = model_ref(self._model, self._version)
            if status == "StatusCode.DEADLINE_EXCEEDED":
                waited = None if started is None else time.monotonic() - started
                if timeout is not None and waited is not None and waited < 0.9 * timeout:
                    # Not our deadline: the upstream's own (a queue policy's timeout, or its request timeout).
                    raise DeadlineExceededError(
                        f"{ref}: {self._where} answered DEADLINE_EXCEEDED after {waited:.3f}s: {message}"
                    ) from exc
                within = f" within {timeout:.3f}s" if timeout is not None else ""
                raise DeadlineExceededError(f"{ref}: {self._where} did not answer{within}") from exc
            if status == "StatusCode.INVALID_ARGUMENT":
                raise InvalidRequestError(self._model, self._version, f"{self._where}: {message}") from exc
            if status == "StatusCode.RESOURCE_EXHAUSTED":
                exhausted = ResourceExhaustedError(f"{ref}: {self._where}: {message}")
                exhausted.ran = _upstream_ran(exc)
                raise exhausted from exc
            if _restricted(message) or status in ("StatusCode.PERMISSION_DENIED", "StatusCode.UNAUTHENTICATED"):
                raise FailedPreconditionError(
                    f"{ref}: {self._where} refused tensorgate's call ({code}): {message}; the model's "
                    f"'{PREFIX}header.*' parameters (or its client certificate) must carry what the upstream asks for"
                ) from exc
            if status == "StatusCode.CANCELLED" and self._closed:
                raise self._unloaded() from exc
            if status == "StatusCode.NOT_FOUND" or (status in _UNAVAILABLE and _unreachable(message)):
                # Gone, unreachable, or the connection lost under the call: not ready until the watcher sees the
                # upstream model back (within health_interval_s when it is still there).
                self._ready, self._recheck = False, True
                gone = ModelUnavailableError(self._model, self._version, f"{self._where}: {message}")
                # A connection lost under the call: the upstream may have run it, and a retry policy would send it
                # again (for a sequence model, a step twice). One never made ran nothing.
                gone.ran = status != "StatusCode.NOT_FOUND" and not _never_sent(message)
                raise gone from exc
            if status in _UNAVAILABLE:
                # Answered by an upstream that is there (its queue is full, it is shutting down, it cancelled the
                # request): worth retrying, and the model stays ready (one such answer must not pull the replica).
                # Its UNAVAILABLE ran nothing, unless it says so; what it cancelled may have run in part.
                answered = ServerUnavailableError(f"{ref}: {self._where} answered {code}: {message}")
                answered.ran = status == "StatusCode.CANCELLED" or _upstream_ran(exc)
                raise answered from exc
            raise BackendError(self._model, self._version, f"{self._where}: [{status}] {message}") from exc


def _complete_sequence(config: mc.ModelConfig, upstream: UpstreamModel) -> None:
    """Take the upstream's sequence_batching when config.pbtxt has none; refuse a config that contradicts what
    the upstream model is (a sequence model batched here, or sequence parameters sent to a stateless model)."""
    if upstream.sequence_batching is not None and config.HasField("dynamic_batching"):
        # Checked first: sequence_batching and dynamic_batching are one protobuf oneof, so taking the upstream's
        # would drop dynamic_batching without a word.
        raise ModelLoadError(
            config.name,
            REMOTE_VERSION,
            "the upstream model is a sequence model: its own sequence batcher batches it, so config.pbtxt must not "
            "ask for dynamic_batching",
        )
    if upstream.sequence_batching is not None:
        if config.HasField("sequence_batching"):
            _check_same_sequence(config, upstream.sequence_batching)
        # The upstream's as it runs it (its defaults filled in): what clients read is what the upstream does.
        config.sequence_batching.CopyFrom(upstream.sequence_batching)
    if config.HasField("sequence_batching") and upstream.config_known and upstream.sequence_batching is None:
        raise ModelLoadError(
            config.name,
            REMOTE_VERSION,
            "config.pbtxt has sequence_batching, but the upstream model is not a sequence model (its ModelConfig "
            "has no sequence_batching)",
        )


def _check_same_sequence(config: mc.ModelConfig, upstream: mc.ModelSequenceBatching) -> None:
    """A sequence_batching in config.pbtxt may repeat what the upstream's says, field by field, but not say
    otherwise: tensorgate forwards the sequence parameters, and the upstream runs its own sequence batcher, so a
    different control tensor, strategy or idle time here would be served to clients and not be what runs. Only
    the fields config.pbtxt sets are compared: Triton fills in defaults (an `oldest` strategy's
    preferred_batch_size, the idle time) that a copy of its config.pbtxt does not repeat."""
    field = _first_difference(config.sequence_batching, upstream)
    if field is not None:
        raise ModelLoadError(
            config.name,
            REMOTE_VERSION,
            f"config.pbtxt's sequence_batching sets {field} other than the upstream model's sequence batcher, "
            "which is the one that runs: leave sequence_batching out of config.pbtxt to serve the upstream's",
        )


def _first_difference(local: Message, theirs: Message, path: str = "") -> str | None:
    """The first field set in `local` that `theirs` does not have the same, as a dotted path; None when every
    one matches. Messages compare by the fields `local` sets (one it leaves out claims nothing), so a strategy
    `local` names must be the one `theirs` has; lists compare item by item, and must be as long."""
    for descriptor, value in local.ListFields():
        name: str = path + descriptor.name
        other = getattr(theirs, descriptor.name)
        composite = descriptor.message_type is not None
        if descriptor.is_repeated:
            if len(value) != len(other):
                return name
            for a, b in zip(value, other, strict=True):
                if (_first_difference(a, b, name + ".") is not None) if composite else a != b:
                    return name
        elif composite:
            if not theirs.HasField(descriptor.name):
                return name
            found = _first_difference(value, other, name + ".")
            if found is not None:
                return found
        elif value != other:
            return name
    return None


def _complete_decoupled(config: mc.ModelConfig, upstream: UpstreamModel) -> None:
    """Serve the upstream's decoupled transaction policy (clients read it to use ModelStreamInfer); refuse a
    config that says otherwise, or asks to batch, sequence or cache such a model here."""
    if upstream.decoupled:
        if config.HasField("model_transaction_policy") and not config.model_transaction_policy.decoupled:
            raise ModelLoadError(
                config.name,
                REMOTE_VERSION,
                "config.pbtxt says the model is not decoupled, but the upstream model is (its ModelConfig has "
                "model_transaction_policy { decoupled: true }): it answers over ModelStreamInfer only",
            )
        config.model_transaction_policy.decoupled = True
    if not config.model_transaction_policy.decoupled:
        limit = config.parameters.get(PREFIX + "max_streams")
        if limit is not None and limit.string_value.strip():
            raise ModelLoadError(
                config.name,
                REMOTE_VERSION,
                f"parameter '{PREFIX}max_streams' bounds a decoupled model's relayed requests, and this model is not "
                "decoupled: bound its queue with dynamic_batching's default_queue_policy { max_queue_size }",
            )
        return
    if upstream.config_known and not upstream.decoupled:
        raise ModelLoadError(
            config.name,
            REMOTE_VERSION,
            "config.pbtxt says the model is decoupled, but the upstream model is not (its ModelConfig has no "
            "model_transaction_policy { decoupled: true })",
        )
    for block in ("dynamic_batching", "sequence_batching"):
        if config.HasField(block):
            raise ModelLoadError(
                config.name,
                REMOTE_VERSION,
                f"the model is decoupled: tensorgate sends each of its requests upstream on its own, and neither "
                f"batches nor sequences it, so config.pbtxt must not ask for {block}",
            )
    if config.response_cache.enable:
        raise ModelLoadError(
            config.name,
            REMOTE_VERSION,
            "the model is decoupled: its answer is a stream of responses, which the response cache does not keep, "
            "so config.pbtxt must not enable response_cache",
        )
    if upstream.sequence_batching is not None:
        raise ModelLoadError(
            config.name,
            REMOTE_VERSION,
            "the upstream model is decoupled and a sequence model: tensorgate does not relay decoupled sequence models",
        )


_closing: set[asyncio.Task[None]] = set()
"""Channels being closed by `_close_later`, kept referenced until they are."""


def _close_later(channel: grpc.aio.Channel) -> None:
    """On the channel's loop: close it (its calls end as cancelled) without waiting here."""
    task = asyncio.get_running_loop().create_task(channel.close())
    _closing.add(task)
    task.add_done_callback(_closing.discard)


def _restricted(message: str) -> bool:
    """Triton's refusal of an RPC it restricts to holders of a header (--grpc-restricted-protocol)."""
    return "protocol is restricted" in message.lower()


_TRANSPORT_WORDS = (
    "failed to connect",
    "connection refused",
    "connect failed",
    "socket closed",
    "connection reset",
    "broken pipe",
    "cancelling all calls",  # the upstream went away (a GOAWAY as it stops) with calls in flight
    "goaway",
    "stream removed",
    "end of tcp stream",
    "connections to all backends failing",  # round_robin with no connection, whatever its last error said
)


def _upstream_ran(exc: InferenceServerException) -> bool:
    """Whether the upstream ran the request before its RESOURCE_EXHAUSTED, as it says with gRPC's retry pushback
    (a response over its size limit, as tensorgate answers): passed on as `ran`, or the caller's retry policy would
    send it again through this server and run it again upstream. tritonclient raises its error `from None` inside
    its handler of grpc's, which stays the context. A decoupled upstream's failed item says it in its parameters
    (`upstream_ran`, set from tensorgate_ran)."""
    if getattr(exc, "upstream_ran", False):
        return True
    rpc_error = exc.__context__
    trailing = getattr(rpc_error, "trailing_metadata", None) if isinstance(rpc_error, grpc.RpcError) else None
    pairs = trailing() if callable(trailing) else None
    return any(key == "grpc-retry-pushback-ms" and str(value).startswith("-") for key, value in pairs or ())


_NEVER_SENT_WORDS = ("failed to connect", "connection refused", "connect failed", "connections to all backends failing")
"""gRPC's words for a call failed before it was sent: no connection could be made, or none was up to pick."""


def _never_sent(message: str) -> bool:
    """Whether a transport failure came before the call reached the upstream (no connection could be made). gRPC's
    round_robin fails a call it has no connection for with "connections to all backends failing; last error: ...",
    whatever that last error was (a connection reset as the upstream died, or closed by a proxy in front of it
    that has no upstream to reach): the call went nowhere."""
    text = message.lower()
    return any(words in text for words in _NEVER_SENT_WORDS)


def _unreachable(message: str) -> bool:
    """Whether an UNAVAILABLE or CANCELLED came from the transport (no connection, or the one there was lost under
    the call) rather than from the upstream server."""
    text = message.lower()
    return any(words in text for words in _TRANSPORT_WORDS)


FILE_PARAMETERS = ("ca_file", "cert_file", "key_file")


def _parameters(config: mc.ModelConfig) -> dict[str, str]:
    """The `tensorgate.triton.*` parameters of a config, by their short names, values stripped."""
    return {
        k.removeprefix(PREFIX): v.string_value.strip() for k, v in config.parameters.items() if k.startswith(PREFIX)
    }


def check_override(
    model: str,
    config: mc.ModelConfig,
    allowed_upstreams: Sequence[str],
    on_disk: Callable[[], mc.ModelConfig | None],
) -> None:
    """Refuse a config override (RepositoryModelLoad's `config`) that reaches past what the operator allows, with
    INVALID_ARGUMENT naming the parameter, before anything is read or connected to.

    A caller allowed RepositoryModelLoad on one model is not the repository's owner. An upstream TLS file at an
    absolute path or behind a `..` would let it make the server read any file the server may (a key, a token), and
    learn from the load's error whether it exists: the files must stay under the model directory (the
    repository's, whose owner put there what it holds, or the caller's own uploaded files; `relative_path` here,
    and links followed at the load, TritonSettings). An upstream url would let it make the server connect to any
    host it reaches, with whatever `header.*` the override adds (SSRF): the url must match --allowed-upstreams
    (`upstream_allowed`, which takes plain addresses only), or be the one the repository's own config.pbtxt of the
    model names (`on_disk`, read only when needed), in front of the same upstream model: with that url, another
    model_name would front any model of the operator's upstream, with the model directory's client certificate.
    A config.pbtxt on disk is the owner's and may name any path and upstream."""
    params = _parameters(config)
    for key in FILE_PARAMETERS:
        text = params.get(key, "")
        if text and relative_path(text) is None:
            raise InvalidRequestError(
                model,
                None,
                f"parameter '{PREFIX}{key}' of a config override must be a path inside the model directory "
                f"(relative, without '..'), got '{text}'; name other files in the repository's config.pbtxt",
            )
    url = params.get("url", "")
    if not url or upstream_allowed(url, allowed_upstreams):
        return
    disk = on_disk()
    theirs = {} if disk is None else _parameters(disk)
    if theirs.get("url") == url:
        for key, default in (("model_name", model), ("model_version", "")):
            if (params.get(key) or default) != (theirs.get(key) or default):
                raise InvalidRequestError(
                    model,
                    None,
                    f"parameter '{PREFIX}{key}' of a config override is not the one the repository's config.pbtxt "
                    "gives with the same url: an override that keeps the model's upstream keeps its upstream model, "
                    "unless the server's --allowed-upstreams allows the url",
                )
        return
    if upstream_addresses(url) is None:
        why = (
            "nor a plain address the server's --allowed-upstreams could allow (host:port, [ipv6]:port, "
            "dns:host:port, ipv4:a:p,b:p or ipv6:[a]:p,..., each host a DNS name or an IP address, without '%', "
            "'?', '#', '/' or '@')"
        )
    else:
        why = "and the server's --allowed-upstreams does not allow it"
    raise InvalidRequestError(
        model,
        None,
        f"parameter '{PREFIX}url' of a config override names the upstream {url!r}, which is not the one the "
        f"repository's config.pbtxt names, {why}: a config sent with a load may name another upstream only where "
        "the operator allows it",
    )


def complete_config(config: mc.ModelConfig, upstream: UpstreamModel, *, max_batch_size_given: bool) -> None:
    """Make the config to serve: take the upstream's max_batch_size (and dynamic batching) unless config.pbtxt
    says otherwise (a local max_batch_size larger than the upstream's would send batches the upstream refuses),
    and hide the values of `header.*` parameters, which may be credentials, from the ModelConfig RPC. Then
    `autocomplete` completes the tensors, with max_batch_size counted as given.

    An upstream sequence model's `sequence_batching` is served as it is (clients such as perf_analyzer read it to
    send sequences), and such a model is never batched here: its upstream batches sequences itself. Nor is a
    decoupled one: each of its requests goes upstream on a stream of its own (`TritonBackend.stream`)."""
    for key, value in config.parameters.items():
        if key.startswith(PREFIX + "header."):
            value.string_value = REDACTED
    _complete_decoupled(config, upstream)
    _complete_sequence(config, upstream)
    unbatched = config.HasField("sequence_batching") or config.model_transaction_policy.decoupled
    if not max_batch_size_given:
        config.max_batch_size = upstream.max_batch_size
        if upstream.max_batch_size > 0 and not config.HasField("dynamic_batching") and not unbatched:
            config.dynamic_batching.SetInParent()
    elif upstream.max_batch_size > 0 and config.max_batch_size > upstream.max_batch_size:
        raise ModelLoadError(
            config.name,
            REMOTE_VERSION,
            f"max_batch_size is {config.max_batch_size} but the upstream model's is {upstream.max_batch_size}: "
            "batches that large would be refused upstream",
        )
    elif upstream.max_batch_size == 0 and config.max_batch_size > 0:
        # Batching here in front of an upstream that does not batch works when every tensor's first dimension
        # is variable there (rows go through as they are); a fixed one would refuse every batch.
        for tensor in upstream.inputs + upstream.outputs:
            if not tensor.shape or tensor.shape[0] is not None:
                shape = [-1 if d is None else d for d in tensor.shape]
                raise ModelLoadError(
                    config.name,
                    REMOTE_VERSION,
                    f"max_batch_size is {config.max_batch_size} but the upstream model does not batch, and its "
                    f"tensor '{tensor.name}' has shape {shape}, with no variable "
                    "first dimension to carry the rows of a batch: leave max_batch_size out of config.pbtxt",
                )
