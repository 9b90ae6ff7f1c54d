"""OTLP trace endpoints on loopback that hand each export's raw body and headers to a callback: over HTTP (a
collector's /v1/traces) and over gRPC without decoding (the TraceService method, bytes in, empty response out).
Tests that check spans decode the bodies; the tracing benchmark only counts them (it must not pay a collector's
decoding on the machine it measures). Either can refuse every export instead, as a collector that rejects the
requests (a bad API key, a payload it cannot take) answers them."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc

Keep = Callable[[bytes, dict[str, str]], None]
"""Called with an export request's body and its headers or metadata (keys lower-case), from server threads."""


@contextmanager
def http_sink(keep: Keep, status: int = 200) -> Iterator[str]:
    """Yields the endpoint URL (http://127.0.0.1:PORT/v1/traces); every POST is answered `status` (200: taken),
    empty."""

    class Receiver(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a collector does

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            keep(body, {k.lower(): v for k, v in self.headers.items()} | {"path": self.path})
            self.send_response(status)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    class Server(ThreadingHTTPServer):
        # A client that keeps its connection open (keep-alive) must not hold up the shutdown.
        daemon_threads = True
        block_on_close = False

    httpd = Server(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1/traces"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@contextmanager
def grpc_sink(keep: Keep, refuse: grpc.StatusCode | None = None) -> Iterator[str]:
    """Yields the endpoint (127.0.0.1:PORT); every Export is answered with an empty (successful) response, or
    fails with `refuse`."""

    def export(request: bytes, context: grpc.ServicerContext) -> bytes:
        keep(request, {k: v for k, v in context.invocation_metadata() if isinstance(v, str)})
        if refuse is not None:
            context.abort(refuse, "refused by the test's collector")
        return b""

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "opentelemetry.proto.collector.trace.v1.TraceService",
                {"Export": grpc.unary_unary_rpc_method_handler(export)},
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)
