"""Clients may ping as often as --min-client-ping-interval-s allows, even while idle, and keep their connection;
one that pings far more often is told so (GOAWAY ENHANCE_YOUR_CALM "too_many_pings") and dropped.

gRPC's default server allows a ping every 5 minutes only; tensorgate's interval is an option (5 s by default).
Pings sooner than it get strikes, as in gRPC's own policy: without them (the option was once ignored) a client
pinging every few milliseconds kept its connection. The last test shows, on a default server, that the first
one can fail.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.serving import ServerThread

# Pings every 0.5 s with no call in flight: far more often than gRPC's default server allows (5 minutes).
AGGRESSIVE = [
    ("grpc.keepalive_time_ms", 500),
    ("grpc.keepalive_timeout_ms", 2000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.use_local_subchannel_pool", 1),
]
IDLE_S = 4.0


def _states_across_idle(address: str) -> list[grpc.ChannelConnectivity]:
    """Connectivity states of one channel across a check, an idle period of pings, and another check."""
    states: list[grpc.ChannelConnectivity] = []
    with grpc.insecure_channel(address, options=AGGRESSIVE) as channel:
        channel.subscribe(states.append, try_to_connect=True)
        stub = health_pb2_grpc.HealthStub(channel)
        stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        time.sleep(IDLE_S)
        stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        time.sleep(0.2)  # let the last state change reach the callback
        channel.unsubscribe(states.append)
    return states


def _after_first_ready(states: list[grpc.ChannelConnectivity]) -> list[grpc.ChannelConnectivity]:
    return states[states.index(grpc.ChannelConnectivity.READY) :]


def test_a_client_pinging_within_the_interval_keeps_its_connection(repo: Path) -> None:
    with ServerThread(repo, min_client_ping_interval_s=0.1) as server:
        states = _states_across_idle(server.address)
    assert set(_after_first_ready(states)) == {grpc.ChannelConnectivity.READY}, states


def test_a_client_pinging_more_often_than_the_interval_is_dropped(server: ServerThread) -> None:
    """Every 0.5 s against the default 5 s: the connection goes (the channel leaves READY, and reconnects)."""
    states = _states_across_idle(server.address)
    assert set(_after_first_ready(states)) != {grpc.ChannelConnectivity.READY}, states


# ----- the same over raw HTTP/2 frames, to see the server's GOAWAY itself ----------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS, PING, GOAWAY = 0x4, 0x6, 0x7
ACK = 0x1
ENHANCE_YOUR_CALM = 0xB


def _frame(kind: int, flags: int = 0, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + (0).to_bytes(4, "big") + payload


class _RawConnection:
    """An HTTP/2 connection that only pings: no gRPC call, no data, as a client's keepalive while idle."""

    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.sock.sendall(PREFACE + _frame(SETTINGS))
        self.goaway: tuple[int, bytes] | None = None

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def ping(self) -> bool:
        """True when the server acknowledged the ping; False when it sent GOAWAY (kept in `goaway`) or closed."""
        self.sock.sendall(_frame(PING, 0, b"keepaliv"))
        try:
            while True:
                header = self._read(9)
                kind, flags, payload = header[3], header[4], self._read(int.from_bytes(header[:3], "big"))
                if kind == SETTINGS and not flags & ACK:
                    self.sock.sendall(_frame(SETTINGS, ACK))
                elif kind == GOAWAY:
                    (code,) = struct.unpack(">I", payload[4:8])
                    self.goaway = (code, payload[8:])
                    return False
                elif kind == PING and flags & ACK and payload == b"keepaliv":
                    return True
        except (EOFError, ConnectionError):
            return False

    def close(self) -> None:
        self.sock.close()


def test_too_many_pings_get_goaway_enhance_your_calm(server: ServerThread) -> None:
    """Pings back to back: two are forgiven (gRPC's default strikes), then GOAWAY, as gRPC's default server says
    it, and the connection closes."""
    conn = _RawConnection(server.address)
    try:
        answered = 0
        while answered < 10 and conn.ping():
            answered += 1
        assert conn.goaway == (ENHANCE_YOUR_CALM, b"too_many_pings"), (answered, conn.goaway)
        assert 1 <= answered <= 4
    finally:
        conn.close()


def test_pings_spaced_by_the_interval_are_all_answered(repo: Path) -> None:
    with ServerThread(repo, min_client_ping_interval_s=0.1) as server:
        conn = _RawConnection(server.address)
        try:
            for _ in range(6):
                assert conn.ping(), conn.goaway
                time.sleep(0.4)
        finally:
            conn.close()


_DEFAULT_SERVER = """
import asyncio, grpc
from grpc_health.v1 import health, health_pb2_grpc
async def main():
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    print(server.add_insecure_port("127.0.0.1:0"), flush=True)
    await server.start()
    await server.wait_for_termination(60)
asyncio.run(main())
"""


@pytest.fixture
def default_server() -> Iterator[str]:
    """A grpc.aio server with gRPC's default keepalive policy, in a process of its own."""
    proc = subprocess.Popen([sys.executable, "-c", _DEFAULT_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield f"127.0.0.1:{int(proc.stdout.readline())}"
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_a_default_grpc_server_drops_the_same_client(default_server: str) -> None:
    states = _states_across_idle(default_server)
    assert set(_after_first_ready(states)) != {grpc.ChannelConnectivity.READY}, states
