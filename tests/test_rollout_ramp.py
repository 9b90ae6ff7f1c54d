"""A canary's automatic ramp (tensorgate.rollout.ramp): its share rises step by step once it has held each one
long enough, answered enough routed requests, no alert fires on it and the error gate holds; with a monitor, once
the monitor has evaluated it after the hold. Rollouts driven by a test clock for the rules, and real servers with
real ONNX models, real clients, real monitor evaluations and real scrapes of /metrics for the whole path."""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tensorgate.client import InferenceClient
from tensorgate.client.errors import Unavailable
from tensorgate.server.repository.rollout import CANARY_PERCENT, Rollout, RolloutSpec
from tests.onnx_models import busy_model, scale_model
from tests.scraping import metrics_url, scrape, value
from tests.serving import ServerThread
from tests.test_rollout import (
    _canary_share,
    _evaluate,
    _eventually,
    _failures,
    _label_canary,
    _one_row,
    _params,
    _repo,
    _share_of_m,
    _split,
    _two_digits,
    _version_of,
    digits,
)

__all__ = ["digits"]  # the module's fixture, used here

LOGGER = "tensorgate.server.repository.rollout"


class Clock:
    """Time that moves only when the test says."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _spec(
    ramp: tuple[float, ...] = (25.0, 100.0), interval: float = 60.0, min_requests: int = 20, **kw: object
) -> RolloutSpec:
    """Canary 2 from 10%, stable 1, as parse_rollout would make it."""
    return RolloutSpec(
        2,
        10.0,
        1,
        None,
        100.0,
        bool(kw.get("rollback_on_alert", True)),
        ((CANARY_PERCENT, "10"),),
        max_error_percent=kw.get("max_error_percent", 5.0),  # type: ignore[arg-type]
        ramp=ramp,
        ramp_interval_s=interval,
        ramp_min_requests=min_requests,
    )


def _end(rollout: Rollout, version: int, total: int, failed: int = 0) -> None:
    for i in range(total):
        rollout.outcome(version, i >= total - failed)


def test_the_share_rises_only_once_the_step_has_held_long_enough_with_enough_requests(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    clock = Clock()
    rollout = Rollout("m", _spec(), [1, 2], clock=clock)
    _end(rollout, 1, 50)
    _end(rollout, 2, 19)
    clock.now += 61
    _end(rollout, 2, 0)
    assert rollout.share == 10.0  # held long enough, but 19 requests of 20
    _end(rollout, 2, 1)
    assert rollout.share == 25.0
    _end(rollout, 2, 40)  # requests enough at once, but the hold starts over with the step
    assert rollout.share == 25.0
    clock.now += 59
    _end(rollout, 2, 1)
    assert rollout.share == 25.0
    clock.now += 2
    _end(rollout, 2, 1)
    assert rollout.share == 100.0 and rollout.step == 2
    clock.now += 1000
    _end(rollout, 2, 100)
    assert rollout.share == 100.0  # the last step: nothing above it
    assert [r.getMessage() for r in caplog.records] == [
        "model 'm': canary version 2 held 10% for 61 s and 20 requests (0.0% failed against 0.0% on stable version "
        "1, no alert firing): 25% of the requests that name no version go to it now (step 2 of 3)",
        "model 'm': canary version 2 held 25% for 61 s and 42 requests (0.0% failed against 0.0% on stable version "
        "1, no alert firing): 100% of the requests that name no version go to it now; the ramp is done: to retire "
        "version 1, make version 2 the stable one in the config (remove the tensorgate.rollout.* parameters and "
        "serve it)",
    ]


def test_a_ramp_counts_the_canarys_requests_with_the_error_gate_off() -> None:
    """judges() used to say no without the error gate: the ramp would never have seen a request end."""
    clock = Clock()
    rollout = Rollout("m", _spec(max_error_percent=None), [1, 2], clock=clock)
    assert rollout.judges(2)
    clock.now += 61
    _end(rollout, 2, 20, failed=20)  # no gate: failures roll nothing back
    assert rollout.share == 25.0 and not rollout.tripped
    clock.now += 61
    _end(rollout, 2, 20)
    assert rollout.share == 100.0 and not rollout.judges(2)  # no gate and no step left: nothing to count


def test_with_a_monitor_the_share_rises_only_after_an_evaluation_that_follows_the_hold() -> None:
    clock = Clock()
    rollout = Rollout("m", _spec(), [1, 2], monitored=True, clock=clock)
    rollout.follow([])  # an evaluation during the hold does not count
    clock.now += 61
    _end(rollout, 2, 30)
    assert rollout.share == 10.0
    rollout.follow([], evaluated=False)  # the last word handed to a new split is no evaluation
    assert rollout.share == 10.0
    rollout.follow([])
    assert rollout.share == 25.0


@pytest.mark.parametrize("rollback_on_alert", [True, False])
def test_an_alert_holds_the_ramp_and_its_step_starts_over_once_it_resolves(rollback_on_alert: bool) -> None:
    clock = Clock()
    rollout = Rollout("m", _spec(rollback_on_alert=rollback_on_alert), [1, 2], monitored=True, clock=clock)
    _end(rollout, 2, 30)
    clock.now += 61
    rollout.follow(["accuracy_low"])
    assert rollout.share == (0.0 if rollback_on_alert else 10.0)
    _end(rollout, 2, 30)
    rollout.follow(["accuracy_low"])
    assert rollout.step == 0  # no rise while it fires, rolled back or not
    rollout.follow([])
    assert (rollout.step, rollout.share) == (0, 10.0)  # resolved: the step's hold and its requests start over
    _end(rollout, 2, 30)
    rollout.follow([])
    assert rollout.step == 0
    clock.now += 61
    rollout.follow([])
    assert (rollout.step, rollout.share) == (1, 25.0)


def test_a_canary_the_error_gate_rolls_back_climbs_no_further() -> None:
    clock = Clock()
    rollout = Rollout("m", _spec(), [1, 2], clock=clock)
    _end(rollout, 1, 100)
    _end(rollout, 2, 20, failed=10)
    assert rollout.tripped and rollout.share == 0.0
    clock.now += 1000
    _end(rollout, 2, 100)
    assert (rollout.step, rollout.share) == (0, 0.0)


def test_a_rebuild_keeps_the_ramps_place_unless_the_ramp_or_the_canarys_build_changes() -> None:
    clock = Clock()
    stable, canary = object(), object()
    first = Rollout("m", _spec(), {1: stable, 2: canary}, clock=clock)
    clock.now += 61
    _end(first, 2, 20)
    _end(first, 2, 5)
    assert first.step == 1
    kept = Rollout("m", _spec(), {1: stable, 2: canary}, previous=first, clock=clock)
    assert (kept.step, kept.share, kept._step_requests) == (1, 25.0, 5)
    restarted = Rollout("m", _spec(ramp=(50.0, 100.0)), {1: stable, 2: canary}, previous=kept, clock=clock)
    assert (restarted.step, restarted.share) == (0, 10.0)
    rebuilt = Rollout("m", _spec(), {1: stable, 2: object()}, previous=kept, clock=clock)
    assert (rebuilt.step, rebuilt.share) == (0, 10.0)


# ----- real servers ------------------------------------------------------------------------------------------


def _ramp_repo(root: Path, **ramp: str) -> Path:
    return _repo(root, _params(canary_version="2", canary_percent="10", **ramp))


def test_a_served_canary_ramps_to_every_request_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """No monitor here (no --data-dir): the hold and the canary's requests decide."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    repo = _ramp_repo(tmp_path / "models", ramp="50, 100", ramp_interval_s="0.3", ramp_min_requests="5")
    with ServerThread(repo) as server, InferenceClient(server.address) as client:
        shares = [value(scrape(metrics_url(server)), "tensorgate_rollout_canary_share", model="m", version="2")]
        deadline, sent = time.monotonic() + 60, 0
        while shares[-1] < 100 and time.monotonic() < deadline and sent < 5000:
            for _ in range(20):
                _version_of(client, f"r-{sent}")
                sent += 1
            share = value(scrape(metrics_url(server)), "tensorgate_rollout_canary_share", model="m", version="2")
            if share != shares[-1]:
                shares.append(share)
            time.sleep(0.05)
        assert shares == [10.0, 50.0, 100.0]
        assert Counter(_version_of(client, f"after-{i}") for i in range(30)) == Counter({"2": 30})
        assert {_version_of(client, f"named-{i}", version="1") for i in range(5)} == {"1"}  # still served
    said = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(said) == 2 and "(step 2 of 3)" in said[0] and "the ramp is done" in said[1], said


def test_a_monitored_canary_ramps_only_after_an_evaluation_and_not_while_an_alert_fires(
    digits: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    """The digits model's accuracy_low rule on a canary of itself; the monitor evaluates when the test says."""
    x = digits[1]
    ramp = _params(canary_version="2", canary_percent="50", ramp="100", ramp_interval_s="0.2", ramp_min_requests="5")
    repo = _two_digits(digits, tmp_path / "models", ramp)
    with (
        ServerThread(repo, data_dir=tmp_path / "data", monitor_interval_s=3600) as server,
        InferenceClient(server.address) as client,
    ):
        assert set(_split(client, x, "a")) == {"1", "2"}
        time.sleep(0.3)
        assert set(_split(client, x, "b")) == {"1", "2"} and _canary_share(server) == 50.0  # no evaluation yet
        _label_canary(client, x, slice(0, 60), right=False)
        _evaluate(server)  # the alert fires: rolled back, no rise
        assert _split(client, x, "c") == Counter({"1": 40}) and _canary_share(server) == 0.0
        _label_canary(client, x, slice(60, 360), right=True)
        _evaluate(server)  # resolved: back to 50%, and the step's hold starts over
        assert _canary_share(server) == 50.0
        assert set(_split(client, x, "d")) == {"1", "2"}
        time.sleep(0.3)
        _evaluate(server)
        assert _canary_share(server) == 100.0
        assert _split(client, x, "e") == Counter({"2": 40})


@pytest.mark.parametrize(
    "ramp, problem",
    [
        ({"ramp": "5,25"}, "parameter 'tensorgate.rollout.ramp' needs 'tensorgate.rollout.canary_version'"),
        (
            {"canary_version": "2", "canary_percent": "10", "ramp": "25,20"},
            "parameter 'tensorgate.rollout.ramp' must list shares that rise, each above the one before and the first "
            "above 'tensorgate.rollout.canary_percent' (10), got '25,20'",
        ),
        (
            {"canary_version": "2", "canary_percent": "30", "ramp": "25,100"},
            "must list shares that rise, each above the one before and the first above",
        ),
        (
            {"canary_version": "2", "canary_percent": "10", "ramp": "50,150"},
            "parameter 'tensorgate.rollout.ramp' must be a number from 0 to 100, got '150'",
        ),
        (
            {"canary_version": "2", "canary_percent": "0", "ramp": "50"},
            "parameter 'tensorgate.rollout.ramp' needs 'tensorgate.rollout.canary_percent' above 0",
        ),
        (
            {"canary_version": "2", "canary_percent": "10", "ramp": "50", "ramp_interval_s": "0"},
            "parameter 'tensorgate.rollout.ramp_interval_s' must be a number of seconds > 0, got '0'",
        ),
        (
            {"canary_version": "2", "canary_percent": "10", "ramp": "50", "ramp_interval_s": "inf"},
            "parameter 'tensorgate.rollout.ramp_interval_s' must be a number of seconds > 0, got 'inf'",
        ),
        (
            {"canary_version": "2", "canary_percent": "10", "ramp": "50", "ramp_min_requests": "1.5"},
            "parameter 'tensorgate.rollout.ramp_min_requests' must be a whole number of requests >= 1, got '1.5'",
        ),
        (
            {"canary_version": "2", "canary_percent": "10", "ramp_interval_s": "60"},
            "parameter 'tensorgate.rollout.ramp_interval_s' needs 'tensorgate.rollout.ramp'",
        ),
    ],
    ids=["no-canary", "falls", "below-start", "over-100", "zero-start", "zero-hold", "endless-hold", "half", "no-ramp"],
)
def test_a_ramp_that_cannot_be_followed_fails_the_load_naming_the_parameter(
    tmp_path: Path, ramp: dict[str, str], problem: str
) -> None:
    repo = _repo(tmp_path / "models", _params(**ramp))
    with ServerThread(repo, model_control_mode="explicit", load_model=[]) as server:
        with InferenceClient(server.address) as client:
            with pytest.raises(Unavailable, match=re.escape(problem)):
                client.load("m")
            assert not client.ready("m")


# ----- review 112: the gate judges before a step; a request that ends after a rebuild -------------------------


def test_a_canary_failing_every_request_climbs_no_step_before_the_error_gate_can_judge_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """ramp_min_requests 5, below the 20 routed requests the error gate needs to judge: canary version 2 fails
    every two-row request (INTERNAL). It used to climb to 50% and 100% on its first 10 failures (each step logged
    "100.0% failed ... no alert firing"), and only the gate's trip at 20 took it back to 0."""
    extra = _params(canary_version="2", canary_percent="25", ramp="50,100", ramp_interval_s="0.05")
    repo = _repo(tmp_path / "models", extra + _params(ramp_min_requests="5"), v2=_one_row)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with ServerThread(repo) as server, InferenceClient(server.address) as client:
        shares, deadline = [_share_of_m(server)], time.monotonic() + 60
        for i in range(100):
            if shares[-1] == 0.0 or time.monotonic() > deadline:
                break
            _failures(client, 5, f"r{i}")
            time.sleep(0.06)  # past the step's hold, each time
            shares.append(_share_of_m(server))
    assert shares[-1] == 0.0 and set(shares) == {25.0, 0.0}, shares  # rolled back by the gate, from 25%
    said = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(said) == 1 and "requests routed to canary version 2 failed" in said[0], said


def test_a_canary_request_that_ends_after_a_rebuild_counts_on_the_split_that_serves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A load of the same files rebuilds the split (its ramp's place kept) while a slow request routed to the
    canary runs. That request ended on the split it was routed by: its count was lost to the one that serves, and
    the old one raised its own share, logging a step nobody saw (the share on /metrics stayed where it was)."""
    extra = _params(canary_version="2", canary_percent="99", ramp="100", ramp_interval_s="0.05")
    extra += _params(ramp_min_requests="2", max_error_percent="off")
    repo = _repo(tmp_path / "models", extra, v2=lambda p: busy_model(p, iterations=200_000))
    caplog.set_level(logging.WARNING, logger=LOGGER)
    served = ServerThread(repo, model_control_mode="explicit", load_model=["m"])
    with served as server, InferenceClient(server.address) as client, InferenceClient(server.address) as other:
        assert _version_of(client, "first") == "2"
        time.sleep(0.1)
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(_version_of, other, "second")
            time.sleep(0.3)  # routed, and running on the canary
            client.load("m")
            assert not running.done(), "the canary answered before the load: make it slower"
            assert running.result(timeout=60) == "2"
        assert _share_of_m(server) == 100.0
    said = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(said) == 1 and "held 99% for" in said[0] and "2 requests" in said[0], said


def test_a_step_waits_for_an_evaluation_that_began_after_its_hold(
    digits: tuple[Path, np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An evaluation that read the canary's captures before its hold ended and handed its verdict over after it
    (slowed here past the hold) used to count as the step's: the ramp took the verdict's arrival for its time."""
    x = digits[1]
    ramp = _params(canary_version="2", canary_percent="50", ramp="100", ramp_interval_s="4", ramp_min_requests="5")
    repo = _two_digits(digits, tmp_path / "models", ramp)
    with (
        ServerThread(repo, data_dir=tmp_path / "data", monitor_interval_s=3600) as server,
        InferenceClient(server.address) as client,
    ):
        for tag in ("a", "b"):  # 20 routed requests at least for the error gate, some 40 at 50%
            assert set(_split(client, x, tag)) == {"1", "2"}
        (rollout,) = server.app.repository.rollouts()
        due = rollout._step_since + rollout.spec.ramp_interval_s
        monitor = server.app.monitor
        assert monitor is not None
        refresh = monitor._refresh

        def slow(*args: Any) -> None:
            time.sleep(max(0.0, due + 0.3 - time.monotonic()))
            refresh(*args)

        monkeypatch.setattr(monitor, "_refresh", slow)
        assert time.monotonic() < due, "the requests took the whole hold: lengthen ramp_interval_s"
        _evaluate(server)
        assert time.monotonic() > due and _canary_share(server) == 50.0
        monkeypatch.undo()
        _evaluate(server)
        assert _canary_share(server) == 100.0


def test_the_load_that_builds_a_split_logs_it_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A restart starts a ramp over at canary_percent: nothing at start said so, nor what the split was. The load
    that builds a split logs it; a load that keeps it says nothing again."""
    caplog.set_level(logging.INFO, logger="tensorgate.server.repository.manager")
    repo = _ramp_repo(tmp_path / "models", ramp="50,100")

    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records if "canary version 2 takes" in r.getMessage()]

    with ServerThread(repo, model_control_mode="explicit", load_model=["m"]) as server:
        with InferenceClient(server.address) as client:
            assert said() == [
                "model 'm': canary version 2 takes 10% of the requests that name no version, stable version 1 the "
                "rest; ramp 50%, 100% (step 1 of 3), each step held 600 s and 100 requests at least"
            ]
            client.load("m")  # the same files and config: the split is kept, not said again
            assert len(said()) == 1
            _repo(repo.parent / "models", _params(canary_version="2", canary_percent="20"))
            client.load("m")
            assert said()[1:] == [
                "model 'm': canary version 2 takes 20% of the requests that name no version, stable version 1 the rest"
            ]


def _climb_one_step(server: ServerThread, client: InferenceClient) -> None:
    """Model m's canary from 50% to 80% (ramp "80,100", held 0.2 s and 5 requests), the test evaluating."""
    for i in range(60):  # about 30 reach the canary: the gate's 20 and the step's 5
        _version_of(client, f"a-{i}")
    time.sleep(0.3)
    _evaluate(server)
    assert _share_of_m(server) == 80.0


def test_a_restart_on_the_same_data_dir_resumes_the_ramp_where_it_was(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The ramp's place was kept in memory only: every restart (a deploy, a rescheduled pod) sent a canary that had
    climbed to 80% back to its canary_percent. With --data-dir it resumes at its step; an unload, as within a run,
    starts it over, and that is kept too."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    ramp = _params(canary_version="2", canary_percent="50", ramp="80,100", ramp_interval_s="0.2", ramp_min_requests="5")
    repo = _repo(tmp_path / "models", ramp)
    settings = {
        "data_dir": tmp_path / "data",
        "monitor_interval_s": 3600,  # evaluated by the test
        "model_control_mode": "explicit",
        "load_model": ["m"],
    }

    def kept(server: ServerThread) -> dict[str, tuple[str, int]]:
        assert server.app.store is not None
        return server.app.store.ramp_places()

    with (server := ServerThread(repo, **settings)), InferenceClient(server.address) as client:
        _climb_one_step(server, client)
        _eventually(lambda: [step for _, step in kept(server).values()] == [1])
    with (server := ServerThread(repo, **settings)), InferenceClient(server.address) as client:
        assert _share_of_m(server) == 80.0
        resumed = [r.getMessage() for r in caplog.records if "resumes its ramp" in r.getMessage()]
        assert resumed == [
            "model 'm': canary version 2 resumes its ramp at 80% (step 2 of 3), where the data dir's last run left "
            "it; the step's hold and requests count from now"
        ]
        client.unload("m")
        client.load("m")
        assert _share_of_m(server) == 50.0
        _eventually(lambda: [step for _, step in kept(server).values()] == [0])
    with (server := ServerThread(repo, **settings)):
        assert _share_of_m(server) == 50.0


def test_a_restart_with_new_files_for_the_canary_starts_its_ramp_over(tmp_path: Path) -> None:
    """The place is the canary's build's: new files under its version number are judged from canary_percent."""
    ramp = _params(canary_version="2", canary_percent="50", ramp="80,100", ramp_interval_s="0.2", ramp_min_requests="5")
    repo = _repo(tmp_path / "models", ramp)
    settings: dict[str, object] = {"data_dir": tmp_path / "data", "monitor_interval_s": 3600}
    with (server := ServerThread(repo, **settings)), InferenceClient(server.address) as client:
        _climb_one_step(server, client)
        _eventually(lambda: server.app.store is not None and bool(server.app.store.ramp_places()))
    scale_model(repo / "m" / "2" / "model.onnx", 2.0)  # the same model written again: new files
    with (server := ServerThread(repo, **settings)):
        assert _share_of_m(server) == 50.0


def test_the_ramp_tells_each_move_and_a_rollback_for_errors_as_a_move_to_the_start() -> None:
    """What the data dir keeps: each step taken, and 0 when the error gate rolls the canary back, so that a
    restart judges it afresh from canary_percent rather than resuming the share it failed at."""
    clock, moves = Clock(), list[int]()
    rollout = Rollout("m", _spec(), [1, 2], clock=clock, on_step=moves.append)
    clock.now += 61
    _end(rollout, 2, 20)
    assert (rollout.share, moves) == (25.0, [1])
    _end(rollout, 1, 100)
    _end(rollout, 2, 20, failed=20)
    assert (rollout.tripped, moves) == (True, [1, 0])
    resumed = Rollout("m", _spec(), [1, 2], clock=clock, resume_at=1)
    assert (resumed.step, resumed.share) == (1, 25.0)
    assert Rollout("m", _spec(), [1, 2], clock=clock, resume_at=7).step == 0  # a place the ramp does not have
