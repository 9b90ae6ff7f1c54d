"""The server keeps its long-lived objects out of full garbage collections (server/heap.py): frozen once the
models are loaded, and settled again (collected, refrozen) when the served models change. The latency this buys
is a benchmark figure (README, Benchmarks), not a test."""

from __future__ import annotations

import gc
import logging
import time
import weakref
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from tensorgate.server import heap
from tests.serving import ServerThread


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def _cycle() -> weakref.ref[_Node]:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_settle_freezes_survivors_and_collects_what_was_frozen_and_died() -> None:
    try:
        kept = _cycle()
        holder = kept()  # alive through the settle: frozen with everything else
        heap.settle()
        assert gc.get_freeze_count() > 0
        del holder
        gc.collect()
        assert kept() is not None  # frozen cyclic garbage waits for the next settle ...
        heap.settle()
        assert kept() is None  # ... which unfreezes, collects it, and freezes the rest again
        dead = _cycle()
        heap.settle()
        assert dead() is None  # garbage made since the last freeze goes before anything is frozen
    finally:
        gc.unfreeze()


def test_a_server_settles_its_heap_at_start_and_after_models_change(
    repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def settles() -> int:
        return sum("heap settled" in r.getMessage() for r in caplog.records)

    def wait_for(count: int) -> None:
        deadline = time.monotonic() + 15
        while settles() < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert settles() >= count

    try:
        with caplog.at_level(logging.DEBUG, logger="tensorgate.server.heap"):
            with ServerThread(repo, model_control_mode="explicit", load_model=[]) as server:
                assert settles() == 1 and gc.get_freeze_count() > 0  # once, before the server reported ready
                client = grpcclient.InferenceServerClient(server.address)
                client.load_model("add_sub")
                wait_for(2)
                client.unload_model("add_sub")
                wait_for(3)
                client.close()
    finally:
        gc.unfreeze()
