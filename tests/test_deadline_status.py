"""A call cancelled because its deadline passed is reported as DEADLINE_EXCEEDED, one its caller hung up on as
CANCELLED: in /metrics, the access log and the server span (all three take the code from `cancelled_code`)."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import pytest

from tensorgate.protos import GRPCInferenceServiceStub
from tensorgate.server.telemetry.tracing import cancelled_code
from tests.onnx_models import identity_model, write_config
from tests.pki import identity_request
from tests.scraping import metrics_url, scrape, value
from tests.serving import ServerThread
from tests.test_poll import wait_for


@pytest.mark.parametrize(
    ("time_remaining", "timeout", "code"),
    [
        pytest.param(0.02, 1.0, "DEADLINE_EXCEEDED", id="arrived-late"),
        pytest.param(0.099, 10.0, "DEADLINE_EXCEEDED", id="header-rounded-up"),
        pytest.param(0.0, 1.0, "DEADLINE_EXCEEDED", id="at-the-deadline"),
        pytest.param(0.02, None, "DEADLINE_EXCEEDED", id="timeout-unknown"),
        pytest.param(0.5, 1.0, "CANCELLED", id="hung-up-half-way"),
        pytest.param(9.95, 10.0, "CANCELLED", id="hung-up-at-once"),
        pytest.param(0.03, 0.04, "CANCELLED", id="short-call-hung-up-early"),
        pytest.param(None, None, "CANCELLED", id="no-deadline"),
    ],
)
def test_a_cancel_near_the_deadline_is_the_deadline(
    time_remaining: float | None, timeout: float | None, code: str
) -> None:
    """The server's deadline falls later than the caller's (grpc-timeout rounded up, read on arrival): the
    caller's own timer fires first and its cancel arrives while the server still has a little time left."""
    assert cancelled_code(time_remaining, timeout) == code


QUEUED = "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 600000000 }\n"
"""A batch of up to 8 that waits ten minutes for company: fewer requests stay queued, using no CPU."""
TIMEOUTS = (1.0, 1.0, 1.0, 10.0, 10.0, 10.0)
"""Round timeouts, as callers set them: grpc-timeout sends them rounded up one unit of three digits (1.01 s,
10.1 s), so the server's deadline falls 10 and 100 ms after the caller's."""
CODES = ("DEADLINE_EXCEEDED", "CANCELLED", "OK")


def test_calls_out_of_time_count_as_deadline_exceeded_and_a_hang_up_as_cancelled(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Queued calls whose deadline passes are counted DEADLINE_EXCEEDED, as their callers saw (they were counted
    CANCELLED: the server received each deadline later than the caller set it, and the caller's cancel came
    first); a call its caller cancels long before its deadline stays CANCELLED."""
    repo = tmp_path / "models"
    identity_model(repo / "queued" / "1" / "model.onnx", "FP32")
    write_config(repo, "queued", QUEUED)
    caplog.set_level(logging.DEBUG, logger="tensorgate.access")
    labels = {"model": "queued", "version": "1"}
    with ServerThread(repo) as server, grpc.insecure_channel(server.address) as channel:
        url = metrics_url(server)
        stub = GRPCInferenceServiceStub(channel)
        hung_up = stub.ModelInfer.future(identity_request("queued"), timeout=30)
        wait_for("the call in the queue", lambda: value(scrape(url), "tensorgate_queue_depth", **labels) >= 1)
        timed_out = [stub.ModelInfer.future(identity_request("queued"), timeout=t) for t in TIMEOUTS]
        hung_up.cancel()  # some 30 s before its deadline
        for call in timed_out:
            assert call.exception(timeout=30) is not None and call.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        def counted() -> dict[str, float]:
            samples = scrape(url)
            total = "tensorgate_inference_requests_total"
            return {c: samples.get((total, frozenset({**labels, "code": c}.items())), 0.0) for c in CODES}

        # Counted as each handler is cancelled, just after its caller's error.
        wait_for("every call counted", lambda: sum(counted().values()) >= 1 + len(TIMEOUTS))
        assert counted() == {"DEADLINE_EXCEEDED": len(TIMEOUTS), "CANCELLED": 1, "OK": 0}
    access = [r.getMessage() for r in caplog.records if r.name == "tensorgate.access"]
    statuses = sorted(line.split("status=")[1].split()[0] for line in access if "model=queued " in line)
    assert statuses == ["CANCELLED"] + ["DEADLINE_EXCEEDED"] * len(TIMEOUTS), access
