"""Clients that send keepalive pings often, even while idle, keep their connection.

A gRPC server with default settings answers such clients with GOAWAY "too_many_pings" and drops the
connection; tensorgate tolerates the pings (README: --min-client-ping-interval-s, and no ping strikes).
The second test shows, on a default server, that the first one can fail.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

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


def test_tensorgate_keeps_a_connection_that_pings_often(server: ServerThread) -> None:
    states = _states_across_idle(server.address)
    assert set(_after_first_ready(states)) == {grpc.ChannelConnectivity.READY}, states


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
