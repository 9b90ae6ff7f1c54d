"""What `tensorgate rollout` and the server's log tell an operator watching a ramp: the hold's seconds add up, and
a load that turns rollback_on_alert on or off while an alert fires says what the canary gets now. Real servers,
real ONNX models, a real `tensorgate rollout --watch` child process, real feedback firing a real alert."""

from __future__ import annotations

import logging
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tensorgate.client import InferenceClient
from tests.process import TENSORGATE
from tests.serving import ServerThread
from tests.test_rollout import _canary_share, _evaluate, _label_canary, _params, _repo, _two_digits, digits

__all__ = ["digits"]  # the module's fixture, used here

LOGGER = "tensorgate.server.repository.rollout"


def test_the_seconds_held_and_the_seconds_left_never_add_up_to_more_than_the_interval(tmp_path: Path) -> None:
    """`held H of 600 s` and `N s more at this share`: the hold was rounded to nearest and the rest up, so half
    of all polls read e.g. "held 2 of 5 s ... 4 s more"; a dozen polls a tenth of a second apart span a second,
    so some poll lands in the second half of one."""
    extra = _params(canary_version="2", canary_percent="10", ramp="50,100", ramp_interval_s="600")
    with ServerThread(_repo(tmp_path / "models", extra)) as server:
        done = subprocess.run(
            [TENSORGATE, "rollout", "m", "--server", server.address, "--watch", "12", "--interval", "0.1"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 0, done.stderr
    held = [int(h) for h in re.findall(r"held (\d+) of 600 s", done.stdout)]
    left = [int(n) for n in re.findall(r"(\d+) s more at this share \(ramp_interval_s 600\)", done.stdout)]
    assert len(held) == len(left) == 12, done.stdout
    assert [h + n for h, n in zip(held, left, strict=True) if h + n > 600] == []


def _config_with(repo: Path, rollback_on_alert: str) -> None:
    config = repo / "digits" / "config.pbtxt"
    text = re.sub(r'parameters \{ key: "tensorgate\.rollout\.rollback_on_alert".*\n', "", config.read_text())
    config.write_text(text + _params(rollback_on_alert=rollback_on_alert))


def test_turning_rollback_on_alert_off_or_on_while_the_alert_fires_is_said(
    digits: tuple[Path, np.ndarray], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The split rebuilt by the load keeps the firing alert, so no alert line was logged: the canary went from 0
    back to its share (or from its share to 0) with only the load's INFO line, and the last WARNING, "rolled
    back ... until it resolves", stayed the last word while the canary took traffic again."""
    x = digits[1]
    repo = _two_digits(digits, tmp_path / "models", _params(canary_version="2", canary_percent="30", ramp="60,100"))
    server = ServerThread(
        repo, data_dir=tmp_path / "data", monitor_interval_s=3600, model_control_mode="explicit", load_model=["digits"]
    )
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with server, InferenceClient(server.address) as client:
        _label_canary(client, x, slice(0, 60), right=False)
        _evaluate(server)
        assert _canary_share(server) == 0.0
        _config_with(repo, "false")
        client.load("digits")
        assert _canary_share(server) == 30.0
        _config_with(repo, "true")
        client.load("digits")
        assert _canary_share(server) == 0.0
    said = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert said[-2:] == [
        "model 'digits': rollback_on_alert is off now: canary version 2 takes 30% of the requests that name no "
        "version while alert accuracy_low fires on it; its ramp holds until the alert resolves",
        "model 'digits': rollback_on_alert is on now and alert accuracy_low fires on canary version 2: rolled back, "
        "requests that name no version all go to stable version 1 until it resolves",
    ]


def test_a_ramp_at_its_last_step_with_an_alert_firing_is_not_called_done(
    digits: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    """With rollback_on_alert off, an alert that fires once the ramp reached 100% leaves the canary its share and
    nothing rolled back: `tensorgate rollout` printed the alert and, under it, "ramp done: make the canary the
    stable version", telling the operator to promote the version the alert is about."""
    x = digits[1]
    rollout = _params(
        canary_version="2",
        canary_percent="30",
        ramp="100",
        ramp_interval_s="0.5",
        ramp_min_requests="5",
        rollback_on_alert="false",
    )
    repo = _two_digits(digits, tmp_path / "models", rollout)
    with ServerThread(repo, data_dir=tmp_path / "data", monitor_interval_s=3600) as server:
        with InferenceClient(server.address) as client:
            deadline = time.monotonic() + 30
            while _canary_share(server) < 100.0:  # 20 routed requests for the error gate, the hold, an evaluation
                assert time.monotonic() < deadline, "the ramp never reached 100%"
                for _ in range(10):
                    client.infer("digits", {"input": x[:1]})
                time.sleep(0.3)
                _evaluate(server)
                client.infer("digits", {"input": x[:1]})
            _label_canary(client, x, slice(0, 60), right=False)
            _evaluate(server)
            assert [a.rule for a in client.alerts("digits")] == ["accuracy_low"] and _canary_share(server) == 100.0
        done = subprocess.run(
            [TENSORGATE, "rollout", "digits", "--server", server.address], capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 0, done.stderr
    assert "alerts firing on the canary: accuracy_low" in done.stdout
    assert "ramp done" not in done.stdout
    assert "ramp at its last step, but alerts fire on the canary: do not make it stable yet" in done.stdout


@pytest.mark.parametrize("interval", ["inf", "nan", "-1"])
def test_a_watch_interval_that_is_no_finite_number_of_seconds_is_a_usage_error(interval: str) -> None:
    """`--interval inf` ended in an OverflowError traceback at the first sleep (review 125)."""
    done = subprocess.run(
        [TENSORGATE, "rollout", "m", "--server", "127.0.0.1:1", "--watch", "2", "--interval", interval],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "--interval must be a finite number of seconds" in done.stderr, done.stderr
