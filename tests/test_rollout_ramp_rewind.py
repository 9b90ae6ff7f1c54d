"""A load that starts a canary's ramp over (a changed ramp key or canary_percent, new files for the canary) takes
its share back to canary_percent: a real server climbs a ramp, then a RepositoryModelLoad rewinds it, and the
operator must learn why the canary's traffic fell from the log, as each step up is logged."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from tensorgate.client import InferenceClient
from tensorgate.server.repository.rollout import Rollout
from tests.onnx_models import write_config
from tests.serving import ServerThread
from tests.test_rollout import _params, _repo, _share_of_m, _version_of
from tests.test_rollout_ramp import Clock, _end, _spec

LOGGER = "tensorgate.server.repository.rollout"


def _climb(client: InferenceClient, server: ServerThread, target: float) -> float:
    """Send routed requests until the canary's share reaches `target` (bounded in time and count)."""
    deadline, sent, share = time.monotonic() + 60, 0, _share_of_m(server)
    while share < target and time.monotonic() < deadline and sent < 5000:
        for _ in range(10):
            _version_of(client, f"climb-{sent}")
            sent += 1
        share = _share_of_m(server)
        time.sleep(0.05)
    return share


def test_a_load_that_starts_the_ramp_over_logs_the_share_it_takes_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ramp = {"canary_version": "2", "canary_percent": "10", "ramp": "100", "ramp_min_requests": "5"}
    repo = _repo(tmp_path / "models", _params(ramp_interval_s="0.2", **ramp))
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with (
        ServerThread(repo, model_control_mode="explicit", load_model=["m"]) as server,
        InferenceClient(server.address) as client,
    ):
        assert _climb(client, server, 100.0) == 100.0
        client.load("m")  # the same files and keys: the ramp keeps its place, and nothing is said
        assert _share_of_m(server) == 100.0
        caplog.clear()
        config = (repo / "m" / "config.pbtxt").read_text()
        write_config(repo, "m", config.replace('"0.2"', '"60"'))
        client.load("m")
        assert _share_of_m(server) == 10.0
    said = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(said) == 1, said
    assert "model 'm': canary version 2 was at 100% on its ramp (step 2 of 2)" in said[0], said
    assert "changed ramp_interval_s, so its ramp starts over at 10%" in said[0], said


def test_a_rewind_names_its_cause_and_a_kept_or_equal_share_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    clock = Clock()
    stable, canary = object(), object()
    first = Rollout("m", _spec(), {1: stable, 2: canary}, clock=clock)
    clock.now += 61
    _end(first, 2, 20)
    assert first.share == 25.0
    caplog.clear()
    Rollout("m", _spec(), {1: stable, 2: canary}, previous=first, clock=clock)  # kept: silent
    Rollout("m", _spec(ramp=()), {1: stable, 2: object()}, previous=first, clock=clock)  # files and ramp
    said = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(said) == 1, said
    assert "was at 25% on its ramp (step 2 of 3)" in said[0], said
    assert "this load changed the canary's files, ramp (removed), so its ramp starts over" in said[0], said
    assert "10% of the requests that name no version go to it now" in said[0], said


def test_an_alert_that_holds_a_ramp_without_rollback_says_so_and_when_it_lets_go(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """rollback_on_alert off: the canary keeps 10% and /metrics shows no rollback, so only the log can tell an
    operator why the share stopped climbing."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    clock = Clock()
    rollout = Rollout("m", _spec(rollback_on_alert=False), [1, 2], monitored=True, clock=clock)
    _end(rollout, 2, 30)
    clock.now += 61
    rollout.follow(["accuracy_low"])
    rollout.follow(["accuracy_low"])  # still firing: said once
    assert (rollout.step, rollout.share) == (0, 10.0)
    rollout.follow([])
    said = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert said == [
        "model 'm': alert accuracy_low fires on canary version 2: its ramp holds at 10% until it resolves "
        "(rollback_on_alert is off, so it keeps that share)",
        "model 'm': alert accuracy_low on canary version 2 resolved: its ramp's step at 10% counts again from now",
    ], said
