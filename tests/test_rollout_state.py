"""GetRollout (tensorgate.v1.Rollout) and `tensorgate rollout`: where a model's split stands and what its ramp's
next step waits for. The reasons come from the rules the ramp follows (driven by a test clock here, checked
against the ramp's own moves over random events), then a real server answers through both clients, raw stubs,
the CLI and the authorization policy."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from tensorgate.client import AsyncInferenceClient, InferenceClient, RolloutState
from tensorgate.client._rollout import describe
from tensorgate.client.errors import InvalidArgument, NotFound, PermissionDenied
from tensorgate.protos import monitoring_pb2 as mpb
from tensorgate.protos.service import make_stub_class
from tensorgate.server.repository.rollout import ERROR_MIN_REQUESTS, Rollout
from tests.serving import ServerThread
from tests.test_rollout import _params, _repo, _version_of
from tests.test_rollout_ramp import Clock, _end, _spec

READY = "the canary's next routed request to end, which takes the step"
READY_MONITORED = "the canary's next routed request to end, or the monitor's next evaluation: either takes the step"


def test_each_rule_that_holds_the_step_is_named_until_none_is_left() -> None:
    clock = Clock()
    rollout = Rollout("m", _spec(min_requests=30), [1, 2], clock=clock)
    assert rollout.waiting_for() == [
        "30 more routed requests to end at this share (ramp_min_requests 30)",
        f"the error gate's first {ERROR_MIN_REQUESTS} routed requests (0 so far)",
        "60 s more at this share (ramp_interval_s 60)",
    ]
    _end(rollout, 2, 25)
    clock.now += 20.5
    assert rollout.waiting_for() == [
        "5 more routed requests to end at this share (ramp_min_requests 30)",
        "40 s more at this share (ramp_interval_s 60)",
    ]
    _end(rollout, 2, 5)
    clock.now += 40
    assert rollout.waiting_for() == [READY]  # no timer runs the rules: the next request does
    state = rollout.state()
    assert (state.share, state.step, state.step_requests, state.canary_judged) == (10.0, 0, 30, 30)
    assert state.step_held_s == pytest.approx(60.5)
    _end(rollout, 2, 1)
    assert rollout.share == 25.0 and rollout.state().step_requests == 0
    clock.now += 61
    _end(rollout, 2, 30)
    assert rollout.share == 100.0 and rollout.waiting_for() == []  # the last step: nothing to wait for


def test_a_monitored_ramp_waits_for_an_evaluation_after_the_hold() -> None:
    clock = Clock()
    rollout = Rollout("m", _spec(), [1, 2], monitored=True, clock=clock)
    _end(rollout, 2, 20)
    clock.now += 61
    _end(rollout, 2, 1)
    assert rollout.waiting_for() == ["a monitor evaluation that begins after the hold"]
    rollout.follow([])
    assert rollout.share == 25.0


def test_an_alert_and_the_error_gate_are_named_and_shown_as_rollbacks() -> None:
    clock = Clock()
    rollout = Rollout("m", _spec(), [1, 2], clock=clock)
    _end(rollout, 1, 40)
    _end(rollout, 2, 15)
    clock.now += 50
    rollout.follow(["accuracy_drop", "drift"])
    state = rollout.state()
    assert (state.share, state.rolled_back, state.alerts) == (0.0, "alert", ("accuracy_drop", "drift"))
    assert rollout.waiting_for() == [
        "alert accuracy_drop, drift to resolve; then ramp_interval_s (60 s) and ramp_min_requests (20) count "
        "again from then"
    ]
    clock.now += 30
    rollout.follow([])  # resolved: the step's hold and requests start over, as _advance counts them
    assert rollout.state().rolled_back == "" and rollout.share == 10.0
    assert rollout.waiting_for() == [
        "20 more routed requests to end at this share (ramp_min_requests 20)",
        "the error gate's first 20 routed requests (15 so far)",  # the gate's window is not the step's
        "60 s more at this share (ramp_interval_s 60)",
    ]
    _end(rollout, 2, 20, failed=10)  # trips at its 5th failure, the 30th request: 16.7% against 0%
    state = rollout.state()
    assert (state.share, state.rolled_back, state.canary_judged) == (0.0, "errors", 30)
    assert state.canary_failed_percent == pytest.approx(100 * 5 / 30)
    assert (state.stable_failed_percent, state.stable_judged) == (0.0, 40)
    assert rollout.waiting_for() == [
        "new files for the canary, a new max_error_percent, or an unload and load: the error gate rolled it back "
        "for its errors"
    ]


@pytest.mark.parametrize("rollback_on_alert", [True, False])
def test_switching_rollback_on_alert_says_nothing_false_about_a_canary_rolled_back_for_errors(
    rollback_on_alert: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The error gate holds it whatever the alert does: "until it resolves" and "takes 0%" were false (review
    125). Its own WARNING, that it stays rolled back for its errors, is the one that stays true."""
    clock = Clock()
    builds = {1: object(), 2: object()}  # the same files on both sides: the gate's judgement is kept
    before = Rollout("m", _spec(rollback_on_alert=rollback_on_alert), builds, clock=clock)
    _end(before, 1, 40)
    _end(before, 2, 20, failed=10)
    assert before.tripped
    before.follow(["drift"])
    caplog.clear()
    caplog.set_level(logging.WARNING, logger="tensorgate.server.repository.rollout")
    after = Rollout("m", _spec(rollback_on_alert=not rollback_on_alert), builds, before, clock=clock)
    after.follow(["drift"])
    assert after.tripped and after.share == 0.0
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "until it resolves" not in said and "takes 0%" not in said, said


@pytest.mark.parametrize(
    ("seed", "monitored", "min_requests", "rollback_on_alert"),
    [
        (0, False, 5, True),
        (1, False, 25, True),
        (2, True, 5, True),
        (3, True, 25, True),
        (4, False, 5, False),
        (5, True, 5, False),
    ],
)
def test_the_reasons_agree_with_the_ramps_moves(
    seed: int, monitored: bool, min_requests: int, rollback_on_alert: bool
) -> None:
    """After the rules ran (a canary's request ended, an evaluation came), a ramp that did not step names what
    holds it, never READY; and READY means the canary's next request to end takes the step. An alert, or a
    rollback for errors, is the one reason while it lasts. (Few requests and no monitor: the hold is often the
    last rule met, so READY comes up; with a monitor the evaluation is the last, and takes the step itself.)"""
    rng = random.Random(seed)
    clock = Clock()
    spec = _spec(ramp=(20, 30, 40, 60, 80, 100), min_requests=min_requests, rollback_on_alert=rollback_on_alert)
    rollout = Rollout("m", spec, [1, 2], monitored=monitored, clock=clock)
    ready_text = [READY_MONITORED if monitored else READY]
    moves = taken_when_ready = alerts_seen = 0
    for _ in range(3000):
        if rollout.step + 1 >= len(rollout.spec.steps):
            break
        reasons = rollout.waiting_for()
        if rollout.tripped:
            assert len(reasons) == 1 and reasons[0].endswith("the error gate rolled it back for its errors")
            break
        if rollout.held:
            alerts_seen += 1
            assert len(reasons) == 1 and reasons[0].startswith("alert drift to resolve")
        before, ready = rollout.step, reasons == ready_text
        kind = rng.random()
        if kind < 0.4:
            rollout.outcome(2, rng.random() < 0.02)
        elif kind < 0.6:
            rollout.outcome(1, rng.random() < 0.02)
        elif kind < 0.7:
            rollout.follow(["drift"] if rng.random() < 0.1 else [])
        else:
            clock.now += rng.choice([0.5, 3.0, 10.0])  # the hold ends before the requests needed, or after
            continue
        moves += rollout.step - before
        if kind < 0.4 and ready and not rollout.tripped:
            assert rollout.step == before + 1 or rollout.held, "READY, yet the request that ended took no step"
            taken_when_ready += rollout.step - before
        ran = kind < 0.4 or kind >= 0.6  # a stable version's request does not run the rules
        if ran and rollout.step + 1 < len(rollout.spec.steps):
            assert rollout.waiting_for() != ready_text, "the rules just ran and did not step: something must hold it"
    assert moves > 0 and alerts_seen > 0
    assert taken_when_ready > 0 or monitored or min_requests > 5


# ----- real servers ------------------------------------------------------------------------------------------


RAMP = {
    "canary_version": "2",
    "canary_percent": "10",
    "ramp": "50,100",
    "ramp_interval_s": "600",
    "ramp_min_requests": "5",
}


def test_get_rollout_tells_a_servers_split_through_each_client_and_the_cli(tmp_path: Path) -> None:
    repo = _repo(tmp_path / "models", _params(**RAMP))
    _repo(repo, name="plain")
    with ServerThread(repo) as server, InferenceClient(server.address) as client:
        fresh = client.rollout("m")
        assert (fresh.model, fresh.stable_version, fresh.canary_version, fresh.canary_share) == ("m", "1", "2", 10.0)
        assert (fresh.steps, fresh.step, fresh.rolled_back, fresh.step_requests) == ((10.0, 50.0, 100.0), 0, None, 0)
        assert (fresh.ramp_interval_s, fresh.ramp_min_requests, fresh.max_error_percent) == (600.0, 5, 5.0)
        assert fresh.waiting_for[0] == "5 more routed requests to end at this share (ramp_min_requests 5)"
        assert fresh.waiting_for[-1].endswith("s more at this share (ramp_interval_s 600)")
        versions = Counter(_version_of(client, f"r-{i}") for i in range(60))
        named = [_version_of(client, f"n-{i}", version="2") for i in range(3)]  # naming a version: not routed
        assert versions["2"] > 0 and named == ["2"] * 3
        after = client.rollout("m")
        assert (after.step_requests, after.canary_judged, after.stable_judged) == (
            versions["2"],
            versions["2"],
            versions["1"],
        )
        assert after.canary_failed_percent == after.stable_failed_percent == 0.0

        async def from_asyncio() -> float:
            async with AsyncInferenceClient(server.address) as aclient:
                return (await aclient.rollout("m")).canary_share

        assert asyncio.run(from_asyncio()) == 10.0
        with grpc.insecure_channel(server.address) as channel:
            stub: Any = make_stub_class("tensorgate.v1.Rollout")(channel)  # its methods are made at run time
            raw = stub.GetRollout(mpb.GetRolloutRequest(model="m"), timeout=10)
            assert (raw.canary_version, raw.error_gate, list(raw.steps)) == ("2", True, [10.0, 50.0, 100.0])
        with pytest.raises(NotFound, match="model 'plain' has no rollout split: its config sets no tensorgate"):
            client.rollout("plain")
        with pytest.raises(NotFound, match="model 'nope' is not found"):
            client.rollout("nope")
        with pytest.raises(InvalidArgument, match="GetRollout needs the model name"):
            client.rollout("")
        cli = [sys.executable, "-m", "tensorgate.server.cli", "rollout"]
        shown = subprocess.run([*cli, "m", "--server", server.address], capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        assert "model 'm': stable version 1\n  canary: version 2 at 10%\n  ramp: [10%] -> 50% -> 100%, step 1 of 3" in (
            shown.stdout
        )
        assert re.search(r"next step waits for:\n    - \d+ more routed requests? to end", shown.stdout), shown.stdout
        assert "error gate max 5 points over stable" in shown.stdout
        refused = subprocess.run(
            [*cli, "plain", "--server", server.address], capture_output=True, text=True, timeout=60
        )
        assert refused.returncode == 1 and "NOT_FOUND: model 'plain' has no rollout split" in refused.stderr


def test_get_rollout_is_a_statistics_read_under_the_policy(tmp_path: Path) -> None:
    repo = _repo(tmp_path / "models", _params(**RAMP))
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        yaml.safe_dump(
            {
                "rules": [
                    {"identities": ["reader"], "apis": ["statistics"], "models": ["m"]},
                    {"identities": ["caller"], "apis": ["inference"], "models": ["m"]},
                ],
                "tokens": [
                    {"sha256": hashlib.sha256(b"reader-token").hexdigest(), "identity": "reader"},
                    {"sha256": hashlib.sha256(b"caller-token").hexdigest(), "identity": "caller"},
                ],
            }
        )
    )
    with ServerThread(repo, auth_policy=policy) as server:
        with InferenceClient(server.address, headers={"authorization": "Bearer reader-token"}) as reader:
            assert reader.rollout("m").canary_version == "2"
        with InferenceClient(server.address, headers={"authorization": "Bearer caller-token"}) as caller:
            with pytest.raises(PermissionDenied):
                caller.rollout("m")


def _client_state(**changes: object) -> RolloutState:
    base = RolloutState(
        model="m",
        stable_version="1",
        canary_version="2",
        canary_share=100.0,
        steps=(10.0, 100.0),
        step=1,
        rolled_back=None,
        alerts=(),
        step_held_s=5.0,
        step_requests=3,
        ramp_interval_s=60.0,
        ramp_min_requests=20,
        canary_failed_percent=0.0,
        canary_judged=40,
        stable_failed_percent=1.0,
        stable_judged=100,
        max_error_percent=None,
        waiting_for=(),
        shadow_version=None,
        shadow_percent=0.0,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_the_cli_text_says_when_a_ramp_is_done_and_only_then() -> None:
    done = describe(_client_state())
    assert "ramp: 10% -> [100%], step 2 of 2" in done and "error gate off" in done
    assert done.endswith("ramp done: make the canary the stable version in the config to retire the old one")
    rolled = describe(_client_state(canary_share=0.0, rolled_back="errors"))
    assert "canary: version 2 at 0% (rolled back: errors)" in rolled and "ramp done" not in rolled
    none = describe(_client_state(canary_version=None, shadow_version="3", shadow_percent=50.0))
    assert (
        none
        == "model 'm': stable version 1\n  canary: none served\n  shadow: version 3 mirrors 50% of stable's requests"
    )


def test_a_step_held_past_its_interval_does_not_read_as_more_than_the_interval() -> None:
    """Requests or an alert hold the step after its interval: "held 80 of 5 s" read as a count gone wrong."""
    early = describe(_client_state(step=0, canary_share=10.0, step_held_s=2.7, ramp_interval_s=5.0))
    assert "step 1 of 2: held 2 of 5 s, 3 of 20 requests" in early, early
    late = describe(_client_state(step=0, canary_share=10.0, step_held_s=80.2, ramp_interval_s=5.0))
    assert "step 1 of 2: held 80 s (interval 5 s), 3 of 20 requests" in late, late


def test_a_split_whose_stable_version_failed_to_load_says_so(tmp_path: Path) -> None:
    """The load only logs that the split waits for its stable version; GetRollout said the config set no
    tensorgate.rollout.* parameter at all (review 119)."""
    root = _repo(tmp_path / "models", _params(canary_version="2", canary_percent="10"))
    (root / "m" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    with ServerThread(root, strict_readiness=False) as server, InferenceClient(server.address) as client:
        with pytest.raises(NotFound) as info:
            client.rollout("m")
    assert (
        "model 'm' has no rollout split: its config sets tensorgate.rollout.* parameters, but the split's stable "
        "version is not served (it failed to load" in str(info.value)
    )
