"""The composition root: builds the repository, pipeline and gRPC server, and owns start, drain and stop."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
import time
from typing import TYPE_CHECKING

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from opentelemetry.trace import TracerProvider
from prometheus_client import CollectorRegistry

from tensorgate.protos import POOL, SERVICE_NAME
from tensorgate.protos._pool import add_files
from tensorgate.server import heap
from tensorgate.server.auth.policy import Authorizer
from tensorgate.server.auth.tls import ReloadingCredentials, TlsFiles
from tensorgate.server.backends.base import interrupt_backend
from tensorgate.server.backends.onnx import default_intra_op_threads
from tensorgate.server.cpus import cgroup_cpu_limit, usable_cpus
from tensorgate.server.fd_limit import raise_open_file_limit
from tensorgate.server.pipeline.cache import ResponseCache
from tensorgate.server.pipeline.handler import InferenceHandler
from tensorgate.server.repository.manager import ModelRepository
from tensorgate.server.rpc import malformed
from tensorgate.server.rpc.byte_budget import ByteBudget
from tensorgate.server.rpc.codec import RequestLimits
from tensorgate.server.rpc.drain import DRAINING, DrainGate
from tensorgate.server.rpc.monitoring_off import MonitoringOff
from tensorgate.server.rpc.probes import ProbeAuthorization
from tensorgate.server.rpc.rollout import SERVICE_NAME as ROLLOUT
from tensorgate.server.rpc.rollout import RolloutServicer, add_rollout_servicer
from tensorgate.server.rpc.servicer import InferenceServicer
from tensorgate.server.rpc.shared_memory import SystemSharedMemory
from tensorgate.server.rpc.token_gate import TokenGate
from tensorgate.server.settings import ServerSettings
from tensorgate.server.telemetry.metrics import Metrics, MetricsServer
from tensorgate.server.telemetry.tracing import Tracing, TracingSettings, from_settings, parse_headers

if TYPE_CHECKING:
    from tensorgate.server.monitoring import Capture, Monitor, PredictionStore
    from tensorgate.server.rpc.monitoring import MonitoringServicer

log = logging.getLogger("tensorgate")
READINESS_POLL_S = 0.5
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""Each starts the same graceful drain; a second one during it stops at once (see `serve`)."""
SIGNAL_REPEAT_S = 1.0
"""The same signal again this soon after the first is the same stop (a supervisor signalling the process and then
its group), not a second one."""
HEAP_POLL_S = 1.0
"""How often the server looks whether the served models changed, to settle its heap (server/heap.py)."""
MAX_PING_STRIKES = 2
"""Pings sooner than --min-client-ping-interval-s forgiven before the connection is closed (gRPC's default)."""
REMOTE_RETRY_MIN_S = 2.0
REMOTE_RETRY_MAX_S = 60.0


def _tracing(settings: ServerSettings, provider: TracerProvider | None) -> Tracing | None:
    """An injected provider is the caller's to shut down; one built from the settings is ours."""
    if provider is not None:
        return Tracing(provider)
    return from_settings(
        TracingSettings(
            otlp_endpoint=settings.otlp_endpoint,
            otlp_protocol=settings.otlp_protocol,
            otlp_headers=parse_headers(settings.otlp_headers),
            otlp_ca=settings.otlp_ca,
            otlp_insecure=settings.otlp_insecure,
            sample_rate=settings.trace_sample_rate,
        )
    )


def _host_port(host: str, port: int) -> str:
    """``host:port`` as clients and gRPC take it: an IPv6 host in brackets (``::1:8001`` is itself an address)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bind_failure(host: str, port: int) -> str:
    """Why gRPC could not bind: its own error says only "Failed to bind ... set GRPC_VERBOSITY=debug". A plain socket
    bound the way gRPC binds (SO_REUSEADDR) gets the operating system's reason, e.g. "Address already in use"."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        return f"cannot resolve '{host}' (--host): {exc.strerror or exc}"
    for family, kind, proto, _, address in infos:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
                probe.listen()
        except OSError as exc:
            hint = " (another process listens there; --reuse-port shares a port between tensorgate processes)"
            return f"{exc.strerror or exc}{hint if exc.errno == errno.EADDRINUSE else ''}"
    return "gRPC gave no reason (set GRPC_VERBOSITY=debug to see its log)"


def _health_status(serving: bool) -> int:
    return int(health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING)


class TensorgateServer:
    """One server: `await start()` returns the bound port; `await stop()` drains and stops.

    `registry` receives the /metrics collectors (a fresh one when not given; never prometheus_client's global).
    `tracer_provider` receives the spans (never OpenTelemetry's global); without it, one is built when the
    settings name an OTLP endpoint, and flushed and shut down by `stop()`.
    """

    def __init__(
        self,
        settings: ServerSettings,
        *,
        registry: CollectorRegistry | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.settings = settings
        self._metrics_on = settings.metrics_port >= 0
        self.tracing = _tracing(settings, tracer_provider)
        self.repository = ModelRepository(
            settings.model_repository,
            default_max_batch_size=settings.default_max_batch_size,
            latency_histograms=self._metrics_on,
            tracing=self.tracing,
            allowed_upstreams=settings.allowed_upstreams,
            response_cache=settings.response_cache_bytes > 0,
            monitored=settings.data_dir is not None,
        )
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics: Metrics | None = None
        self._metrics_server: MetricsServer | None = None
        self.metrics_port = 0
        self._handler = InferenceHandler(self.repository, self.tracing)
        if settings.response_cache_bytes:
            self._handler.cache = ResponseCache(settings.response_cache_bytes)
        self.tls: ReloadingCredentials | None = None
        self.auth: Authorizer | None = None
        self._health = health.aio.HealthServicer()
        self._server: aio.Server | None = None
        self._poller: asyncio.Task[None] | None = None
        self._readiness: asyncio.Task[None] | None = None
        self._remote_retry: asyncio.Task[None] | None = None
        self._heap: asyncio.Task[None] | None = None
        self._gate: DrainGate | None = None
        self._started = False
        self._stopped = False
        self.port = 0
        # Monitoring (--data-dir): the prediction store, the capture writer and the periodic monitor.
        self.store: PredictionStore | None = None
        self.capture: Capture | None = None
        self.monitor: Monitor | None = None
        self.monitoring_servicer: MonitoringServicer | None = None
        """tensorgate.v1.Monitoring's servicer (feedback, late labels), kept for tests and embedders to reach."""

    @property
    def ready(self) -> bool:
        """ServerReady. With --strict-readiness false, as Triton's: started and not draining, whatever the models'
        readiness (one upstream down then does not take the whole replica out of rotation)."""
        draining = self._gate is not None and self._gate.draining
        if not self._started or draining:
            return False
        return not self.settings.strict_readiness or self.repository.all_ready()

    def _options(self) -> list[tuple[str, int]]:
        s = self.settings
        aging = [
            ("grpc.max_connection_age_ms", int(s.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(s.max_connection_age_grace_s * 1000)),
        ]
        return [
            *(aging if s.max_connection_age_s > 0 else []),
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.keepalive_time_ms", int(s.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(s.keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            # A client that pings more often than this while no data flows gets MAX_PING_STRIKES strikes, then
            # GOAWAY ENHANCE_YOUR_CALM "too_many_pings" (gRPC's own policy, with its interval of 5 minutes made
            # an option).
            ("grpc.http2.min_ping_interval_without_data_ms", int(s.min_client_ping_interval_s * 1000)),
            ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
            # Off unless asked: a second server started on the same port by mistake fails instead of silently
            # taking half the connections.
            ("grpc.so_reuseport", 1 if s.reuse_port else 0),
            # Advertised in HTTP/2 SETTINGS: one connection cannot make the server juggle unbounded streams.
            ("grpc.max_concurrent_streams", s.max_streams_per_connection),
        ]

    async def start(self) -> int:
        """Listen first (liveness answers during long loads), then load models, then report ready."""
        s = self.settings
        if not s.model_repository.is_dir():
            raise FileNotFoundError(f"model repository {s.model_repository} is not a directory")
        if s.model_control_mode == "explicit" and "*" not in s.load_model:
            # A mistyped name would otherwise leave the model out with nothing said and the server ready.
            on_disk = self.repository.names_on_disk()
            missing = sorted(set(s.load_model) - set(on_disk))
            if missing:
                raise FileNotFoundError(
                    f"--load-model names {', '.join(repr(m) for m in missing)}, not in model repository "
                    f"{s.model_repository} (it has: {', '.join(on_disk) or 'no models'})"
                )
        elif s.load_model and s.model_control_mode != "explicit":
            log.warning(
                "--load-model is for --model-control-mode explicit; in mode %s every model loads",
                s.model_control_mode,
            )
        # Certificates and policy are read before anything listens: a bad file stops the start with its reason.
        if s.tls_cert is not None and s.tls_key is not None:
            self.tls = ReloadingCredentials(TlsFiles(s.tls_cert, s.tls_key, s.tls_client_ca))
        self.auth = Authorizer(
            s.auth_policy, mtls=s.tls_client_ca is not None, max_in_flight=s.max_in_flight_per_identity
        )
        # --auth-probes policy: health and reflection are authorized like the inference service (rpc/probes.py).
        probes = s.auth_probes == "policy" and self.auth.enabled
        interceptors: list[aio.ServerInterceptor] = [ProbeAuthorization(self.auth)] if probes else []
        if s.auth_policy is not None and s.tls_client_ca is None:  # bearer tokens may apply (rpc/token_gate.py)
            interceptors.append(TokenGate(self.auth, self.tracing))
        server = aio.server(options=self._options(), interceptors=interceptors or None)
        self._gate = DrainGate(self.repository.sequence_live, self.repository.live_sequences)
        budget = ByteBudget(s.max_in_flight_bytes) if s.max_in_flight_bytes else None
        if self._metrics_on:
            self.metrics = Metrics(
                self.registry,
                self.repository,
                gate=self._gate,
                auth=self.auth,
                loop=asyncio.get_running_loop(),
                tracing=self.tracing,
                cache=self._handler.cache,
                budget=budget,
            )
            if self.tls is not None:
                self.metrics.certificates["grpc"] = self.tls.reloader
        servicer = InferenceServicer(
            self.repository,
            self._handler,
            model_control=s.model_control_mode,
            is_ready=lambda: self.ready,
            gate=self._gate,
            max_message_bytes=s.max_message_bytes,
            limits=RequestLimits(s.max_tensor_elements, s.max_bytes_element),
            auth=self.auth,
            requests=self.metrics.requests if self.metrics is not None else None,
            tracing=self.tracing,
            shared_memory=SystemSharedMemory(enabled=s.shared_memory == "system"),
            log_format=s.log_format,
            budget=budget,
        )
        malformed.add_servicer_to_server(SERVICE_NAME, servicer, server)
        add_rollout_servicer(
            RolloutServicer(self.repository, gate=self._gate, auth=self.auth, tracing=self.tracing), server
        )
        services = [SERVICE_NAME, ROLLOUT, health.SERVICE_NAME, reflection.SERVICE_NAME]
        if s.data_dir is not None:
            services.append(self._add_monitoring(server))
        else:
            server.add_generic_rpc_handlers([MonitoringOff()])
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        add_files(health_pb2.DESCRIPTOR.serialized_pb, reflection_pb2.DESCRIPTOR.serialized_pb)
        reflection.enable_server_reflection(services, server, pool=POOL)
        address = _host_port(s.host, s.grpc_port)
        try:
            if self.tls is None:
                self.port = server.add_insecure_port(address)
            else:
                self.port = server.add_secure_port(address, self.tls.server_credentials())
        except RuntimeError as exc:  # grpcio's words for a port in use or an address it cannot parse
            raise OSError(f"could not bind {address} (--grpc-port): {_bind_failure(s.host, s.grpc_port)}") from exc
        if self.port == 0:
            raise OSError(f"could not bind {address} (--grpc-port): {_bind_failure(s.host, s.grpc_port)}")
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self._server = server  # before the await: a stop signal during it must still stop the server
        await server.start()
        security = "plaintext" if self.tls is None else "mutual TLS" if self.tls.files.mutual else "TLS"
        log.info("listening on %s (gRPC, %s)", _host_port(s.host, self.port), security)
        if self.metrics is not None:
            await self._start_metrics()
        if s.model_control_mode == "explicit":
            names = self.repository.names_on_disk() if "*" in s.load_model else list(s.load_model)
        else:
            names = self.repository.names_on_disk()
        if self.monitor is not None:  # a canary an alert fired on before a restart serves rolled back from the start
            self.repository.follow_alerts(await asyncio.to_thread(self.monitor.stored_firing), evaluated=False)
        if self.store is not None:  # a canary ramp resumes where the last run left it
            await self._remember_ramps(self.store)
        await self.repository.load_many(names)
        heap.settle()  # before serving: the long-lived objects are all there now
        if s.model_control_mode == "poll":
            self._poller = asyncio.create_task(self._poll_forever())
        if self.monitor is not None:
            self.monitor.start()
        self._started = True
        # The whole server serves now; the inference service only if ServerReady says so (a model that failed to
        # load): a readiness probe must not put a replica in rotation that ServerReady keeps out.
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        serving = self.ready
        await self._health.set(SERVICE_NAME, _health_status(serving))
        self._readiness = asyncio.create_task(self._follow_readiness(serving))
        self._remote_retry = asyncio.create_task(self._retry_remote_forever())
        self._heap = asyncio.create_task(self._settle_heap_forever())
        log.info("ready: %d model version(s) loaded", len(self.repository.loaded()))
        return self.port

    def _add_monitoring(self, server: aio.Server) -> str:
        """Open the store under --data-dir, start the capture writer, serve tensorgate.v1.Monitoring."""
        from tensorgate.server.monitoring import DB_NAME, Capture, Monitor, MonitoringCollector, PredictionStore
        from tensorgate.server.rpc.monitoring import SERVICE_NAME as MONITORING
        from tensorgate.server.rpc.monitoring import MonitoringServicer, add_monitoring_servicer

        s = self.settings
        assert s.data_dir is not None and self._gate is not None
        self.store = PredictionStore(s.data_dir / DB_NAME, retention=s.capture_retention)
        self.capture = Capture(self.store, queue_size=s.capture_queue_size, queue_bytes=s.capture_queue_bytes)
        self.capture.start()
        self._handler.capture = self.capture
        self.monitor = Monitor(
            self.store,
            self.capture,
            self.repository,
            data_dir=s.data_dir,
            interval_s=s.monitor_interval_s,
            alert_rules=s.alert_rules,
            alert_webhook=s.alert_webhook,
            tracing=self.tracing,
        )
        if self.metrics is not None:
            self.registry.register(MonitoringCollector(self.monitor, self.capture))
        servicer = MonitoringServicer(self.monitor, self.capture, gate=self._gate, auth=self.auth, tracing=self.tracing)
        add_monitoring_servicer(servicer, server)
        self.monitoring_servicer = servicer
        log.info("monitoring on: predictions captured to %s", self.store.path)
        return MONITORING

    async def _remember_ramps(self, store: PredictionStore) -> None:
        """Hand the repository where each canary ramp was, and a way to keep each move in the data dir: written on
        a worker thread, so that a step (taken on the event loop, as a request ends) never waits for the disk."""
        try:
            places = await asyncio.to_thread(store.ramp_places)
        except Exception:  # noqa: BLE001 - a start must not fail on it: ramps then start over
            log.exception("cannot read the canary ramps' places from the data dir; ramps start over")
            places = {}
        loop = asyncio.get_running_loop()

        def written(future: asyncio.Future[None]) -> None:
            if not future.cancelled() and future.exception() is not None:
                log.warning("cannot keep a canary ramp's place in the data dir: %s", future.exception())

        def save(model: str, place: str, step: int) -> None:
            loop.run_in_executor(None, store.save_ramp_place, model, place, step).add_done_callback(written)

        self.repository.remember_ramps(places, save)

    async def _start_metrics(self) -> None:
        """/metrics on its own port, with the gRPC port's certificate (and client CA) when that one uses TLS."""
        s = self.settings
        assert self.metrics is not None
        tls = None if self.tls is None else self.tls.files
        host = s.host if s.metrics_host is None else s.metrics_host
        self._metrics_server = MetricsServer(self.metrics.registry, host, s.metrics_port, tls)
        if self._metrics_server.tls is not None:
            self.metrics.certificates["metrics"] = self._metrics_server.tls
        # Binding resolves the host name (getaddrinfo, getfqdn): off the event loop.
        try:
            self.metrics_port = await asyncio.to_thread(self._metrics_server.start)
        except OSError as exc:  # the errno alone ("Address already in use") would not say which of the two ports
            where = _host_port(host, s.metrics_port)
            raise OSError(f"could not bind the metrics port {where} (--metrics-port): {exc}") from exc
        log.info("metrics listening on %s (%s)", _host_port(host, self.metrics_port), self._metrics_server.scheme)

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status)

    async def _follow_readiness(self, serving: bool) -> None:
        """grpc.health.v1 for the inference service follows ServerReady (a failed model, an upstream Triton that
        is down); the whole server ("") stays SERVING until drain, so a liveness probe on "" does not restart a
        replica whose upstream is away, while a readiness probe on the service name takes it out of rotation."""
        while True:
            await asyncio.sleep(READINESS_POLL_S)
            if self.ready != serving:
                serving = not serving
                await self._health.set(SERVICE_NAME, _health_status(serving))
                # Which models took the replica out of rotation: with strict readiness, one broken model does.
                blocking = [] if serving or not self._started else self.repository.not_ready()
                why = f" (not ready: {', '.join(sorted(blocking))})" if blocking else ""
                log.info("inference service health: %s%s", "SERVING" if serving else "NOT_SERVING", why)

    async def _settle_heap_forever(self) -> None:
        """After a model loaded, reloaded or unloaded, once: the long-lived objects changed (server/heap.py)."""
        settled = self.repository.changes
        while True:
            await asyncio.sleep(HEAP_POLL_S)
            if self.repository.changes != settled:
                settled = self.repository.changes
                heap.settle()

    async def _retry_remote_forever(self) -> None:
        """Remote models whose upstream was unreachable at load time are tried again, backing off from 2 s to
        60 s while they keep failing, so that start order between tensorgate and Triton does not matter."""
        delay = REMOTE_RETRY_MIN_S
        while True:
            await asyncio.sleep(delay)
            try:
                loaded = await self.repository.retry_remote()
            except Exception:  # noqa: BLE001 - a failed round must not stop the retries
                log.exception("retrying remote models failed")
                loaded = []
            delay = REMOTE_RETRY_MIN_S if loaded else min(delay * 2, REMOTE_RETRY_MAX_S)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.repository_poll_secs)
            try:
                await self.repository.poll()
            except Exception:  # noqa: BLE001 - one failed scan must not stop polling
                log.exception("repository poll failed")

    async def stop(self, grace: float | None = None) -> None:
        """Mark not ready, refuse new calls (UNAVAILABLE), let running calls finish within `grace`, then stop. Once:
        a second call (an embedder's cleanup after a signal's stop) returns at once, the store being closed."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.settings.shutdown_grace_s if grace is None else grace
        for task in (self._readiness, self._remote_retry, self._heap):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        drained = True
        if self._gate is not None:
            sequences = self._gate.live_sequences()
            log.info(
                "refusing new calls; draining %d in-flight call(s)%s (grace %.0fs)",
                self._gate.in_flight,
                f" and {sequences} live sequence(s), whose next requests are still taken" if sequences else "",
                grace,
            )
            drained = await self._gate.drain(grace)
            if self._gate.refused:  # the calls a client without retries to another replica saw fail
                log.info("the drain refused %d call(s) and stream message(s) (UNAVAILABLE)", self._gate.refused)
            if not drained:
                hurried = self._gate.hurried
                sequences = self._gate.live_sequences()
                log.warning(
                    "%s with %d call(s) still running%s; cancelling them",
                    "stopping at once" if hurried else "grace period over",
                    self._gate.in_flight,
                    f" and {sequences} sequence(s) not ended (to be started again)" if sequences else "",
                )
                ended = "the server was told to stop at once" if hurried else "the grace period ended"
                # What has not started gets a status that says so (safe to send again elsewhere), rather than be
                # cut off below with gRPC's bare "Cancelling all calls", which cannot tell it from work that ran.
                self.repository.reject_waiting(f"did not run the request before {ended}; {DRAINING}")
        if self._server is not None:
            await self._server.stop(0.5)
        await self._handler.close()  # shadow runs: before the capture and the models they use go
        if not drained:
            # The callers have their answer (cancelled above): a batch still computing would hold the exit for as
            # long as it runs, past the grace the orchestrator was promised (the repository's close waits for it,
            # since a process that exits under a running ONNX Runtime session aborts), so it is cut short where
            # the backend can do that.
            for model in [*self.repository.loaded(), *self.repository.draining()]:  # a reload's old versions too
                interrupt_backend(model.backend)
        if self.monitor is not None:
            await self.monitor.stop()
        if self.capture is not None:  # store what was captured before the process goes
            self._handler.capture = None
            await asyncio.to_thread(self.capture.close)
        if self.store is not None:
            await asyncio.to_thread(self.store.close)
        await self.repository.close()
        if self.tracing is not None:
            # Spans of the drained calls are buffered: export them before the process goes.
            await asyncio.to_thread(self.tracing.shutdown)
        if self._metrics_server is not None:  # last: a scrape can still watch the drain
            await asyncio.to_thread(self._metrics_server.stop)
            self._metrics_server = None
        if self.metrics is not None:
            self.metrics.close()  # releases NVML when GPU metrics were on
        log.info("stopped")

    def hurry(self) -> None:
        """End the drain of `stop()` now, under way or to come, as if its grace were over: what waits in a queue
        is refused with UNAVAILABLE, calls still computing are cut off."""
        if self._gate is not None:
            self._gate.hurry()


async def serve(settings: ServerSettings) -> None:
    """Run until SIGTERM, SIGINT or SIGHUP, then drain and return (the process exits 0). SIGHUP (a terminal closed
    under the server, supervisors that stop with it) would otherwise kill the process with calls in flight.

    A signal during start-up (models still loading) stops at once: an orchestrator that gives up on a slow start
    must not wait for every model to load first. A second signal during the drain ends it at once (an operator
    pressing Ctrl-C twice, an orchestrator escalating); the process still stops in order and exits 0, as it does
    when the grace period runs out: the stop was asked for, and the log says what was cut off. ONNX Runtime
    batches already computing are cut short at their next node and then waited for (by the repository's close):
    a process that exits under a running session aborts.
    """
    raised = raise_open_file_limit()
    if raised is not None:
        log.info("open file limit raised from %d to %d: a descriptor per connection", *raised)
    limit, cpus = cgroup_cpu_limit(), usable_cpus()
    log.info(
        "ONNX Runtime's intra-op threads default to %d per model: %d usable CPU(s)%s, less one for the event loop "
        "(at least 1)",
        default_intra_op_threads(cpus),
        cpus,
        "" if limit is None else f" (the cgroup's CPU limit is {limit:g})",
    )
    app = TensorgateServer(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    first: list[tuple[signal.Signals, float]] = []

    def on_signal(sig: signal.Signals) -> None:
        now = time.monotonic()
        if not stop.is_set():
            stop.set()
            first.append((sig, now))
            return
        if first and first[0][0] == sig and now - first[0][1] < SIGNAL_REPEAT_S:
            # GNU timeout, and scripts that `kill $PID; kill -- -$PGID`, send one stop twice: that is not the
            # operator asking twice, and taking it so would cut off the calls the drain is for.
            log.info(
                "%s again within %.0f s: taken as the same stop (send it again to stop at once)",
                sig.name,
                SIGNAL_REPEAT_S,
            )
            return
        log.warning("%s again: stopping at once, without waiting for calls in flight", sig.name)
        app.hurry()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    starting = asyncio.ensure_future(app.start())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            log.info("shutting down on signal while starting (%s)", first[0][0].name)
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            return
        starting.result()  # a failed start raises here
        await stopping
        log.info("shutting down on signal (%s)", first[0][0].name)
    finally:
        stopping.cancel()
        await app.stop()


__all__ = ["TensorgateServer", "serve"]
